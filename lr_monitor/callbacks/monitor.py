"""StepSizeMonitor: the Lightning callback that records the step each weight takes.

Every ``logging_interval`` optimizer steps it logs, per optimizer and param group and for
all groups together (``global``), the learning rate, the effective per-element learning
rate (quantiles, min, max), the share of elements where ε dominates, gradient,
parameter, update and moment norms, the update/parameter ratio, the cosine between
successive recorded updates and non-finite counts. Tags are
``<prefix>/<stat>/<optimizer>/<group>``, e.g. ``optim/eff_lr/p50/Adam/pg0``; every tag
is listed in ``docs/metrics.md``.

How it works: gradient norms are measured in ``on_before_optimizer_step`` (after AMP
unscaling and accumulation, before clipping); the step itself is reconstructed in a
``register_step_post_hook`` from the optimizer's post-step state, so no parameter copy
is taken (except for optimizers without an exact rule, see
:class:`lr_monitor.functional.ParamSnapshot`). Steps that are not recorded cost two
Python calls and no host sync; a recorded step costs one device-to-host transfer.

Example::

    from pytorch_lightning import Trainer
    from lr_monitor import StepSizeMonitor

    trainer = Trainer(callbacks=[StepSizeMonitor()])  # TensorBoardLogger by default
    trainer.fit(model)
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch

from lr_monitor._validation import check_bool, check_int
from lr_monitor.alerts import AlertSink, close_sinks, dispatch, make_default_sinks
from lr_monitor.callbacks._compat import is_tensorboard_logger, pl, rank_zero_warn, run_dir
from lr_monitor.events import GuardEvent
from lr_monitor.faults import FaultBarrier
from lr_monitor.functional.statistics import (
    BINS_PER_DECADE,
    LOG10_MIN,
    HostStepSums,
    grad_values,
)
from lr_monitor.recording import StepRecorder, check_recorder_args
from lr_monitor.tags import STATISTICS, group_names, optimizer_names

__all__ = ["StepSizeMonitor"]


class StepSizeMonitor(pl.Callback):
    """Record effective step sizes, gradient statistics and moments to the logger.

    Args:
        logging_interval: Record every n-th optimizer step (the first step is recorded).
            ``None``: the trainer's ``log_every_n_steps``.
        prefix: First component of every tag.
        granularity: ``"group"``: one series per param group plus ``global``.
            ``"tensor"``: also one per parameter tensor (filtered by ``include`` and
            ``exclude``); can be thousands of series on a large model.
        include: Regex on parameter names; with ``granularity="tensor"`` only matches
            get a series.
        exclude: Regex on parameter names that get no per-tensor series.
        histogram_every_n_steps: TensorBoard only: write the histogram of log10
            effective lr per group every n-th step (rounded to recorded steps: it is
            built from the recorded statistics, at no extra cost). ``None``: every
            recorded step; ``0``: never.
        grad_histograms: TensorBoard only: also write gradient histograms per group on
            the histogram steps (copies the gradients to the host: off by default).
        custom_scalars: TensorBoard only: write a Custom Scalars layout with one chart
            per statistic and every group on it.
        update_cosine: Keep a subsample of the last recorded update per tensor (at most
            ``cosine_samples`` values) to log ``update_cosine``.
        cosine_samples: Subsample size per tensor for ``update_cosine``.
        log_global: Also log the ``global`` series (all groups of an optimizer).

    Raises:
        ValueError: for an argument outside its allowed values (the message names it).
    """

    def __init__(
        self,
        logging_interval: int | None = None,
        *,
        prefix: str = "optim",
        granularity: str = "group",
        include: str | None = None,
        exclude: str | None = None,
        histogram_every_n_steps: int | None = None,
        grad_histograms: bool = False,
        custom_scalars: bool = True,
        update_cosine: bool = True,
        cosine_samples: int = 4096,
        log_global: bool = True,
    ) -> None:
        check_int("logging_interval", logging_interval, 1, allow_none=True)
        check_recorder_args(prefix=prefix, granularity=granularity, include=include,
                            exclude=exclude, update_cosine=update_cosine,
                            cosine_samples=cosine_samples, log_global=log_global)
        check_int("histogram_every_n_steps", histogram_every_n_steps, 0, allow_none=True)
        check_bool("grad_histograms", grad_histograms)
        check_bool("custom_scalars", custom_scalars)
        self.logging_interval = logging_interval
        self.prefix = prefix
        self.granularity = granularity
        self.include = include
        self.exclude = exclude
        self.histogram_every_n_steps = histogram_every_n_steps
        self.grad_histograms = grad_histograms
        self.custom_scalars = custom_scalars
        self.update_cosine = update_cosine
        self.cosine_samples = cosine_samples
        self.log_global = log_global
        self.recorders: list[StepRecorder] = []
        self._trainer: pl.Trainer | None = None
        self._interval = 1
        self._warned_histograms = False
        self._layout_written = False
        self._recorded_steps = 0
        self._loaded_step_counts: dict[str, int] = {}  # from a checkpoint, used once
        self._step_counts: dict[str, int] = {}  # of the recorders, kept after teardown
        # The x-axis: batches in which an optimizer stepped (self.log's step).
        self._batches = 0
        self._loaded_batches: int | None = None
        self._steps_at_batch_start = 0
        self._sinks: list[AlertSink] | None = None
        self.faults = FaultBarrier("StepSizeMonitor", report=self._report_fault,
                                   step=self._current_step)

    @property
    def state_key(self) -> str:
        """Key in the checkpoint's ``callbacks`` dict; monitors with other prefixes coexist."""
        return self._generate_state_key(prefix=self.prefix, granularity=self.granularity)

    # -- lifecycle -----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach one recorder per optimizer (after a checkpoint has been restored)."""
        self._detach()
        self._trainer = trainer
        self.faults.call("attach", self._attach, trainer, pl_module)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._interval = self.logging_interval or max(
            1, int(getattr(trainer, "log_every_n_steps", 50)))
        optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        if not optimizers:
            rank_zero_warn("StepSizeMonitor: the trainer has no optimizer; nothing to record")
            return
        names = optimizer_names(optimizers)
        param_names: dict[torch.Tensor, str] = {
            p: n for n, p in pl_module.named_parameters()}
        sharded = any(callable(getattr(p, "to_local", None)) for p in param_names)
        # Replicated parameters (single device, DDP): rank zero alone measures and logs.
        # Sharded parameters (FSDP2/DTensor): every rank measures its shard and the sums
        # are reduced before the statistics are finished.
        active = trainer.is_global_zero or sharded
        for opt, name in zip(optimizers, names, strict=True):
            rec = StepRecorder(
                opt, name,
                should_record=lambda index: active and self._due(index),
                on_record=self._make_on_record(name),
                reduce=(lambda sums: sums.all_reduce()) if sharded else None,
                prefix=self.prefix, granularity=self.granularity, param_names=param_names,
                include=self.include, exclude=self.exclude,
                update_cosine=self.update_cosine, cosine_samples=self.cosine_samples,
                log_global=self.log_global, faults=self.faults,
            )
            # Each optimizer counts its own steps: with several optimizers in manual
            # optimization every opt.step() advances trainer.global_step, so recording
            # on global_step would catch one optimizer only.
            rec.step_index = self._loaded_step_counts.get(
                name, trainer.global_step // len(optimizers))
            if not rec.exact:
                rank_zero_warn(
                    f"StepSizeMonitor: no exact update rule for {type(opt).__name__}; its "
                    "updates are measured by copying the parameters on recorded steps and "
                    "eff_lr is reported as the group lr."
                )
            rec.attach()
            self.recorders.append(rec)
        self._batches = (self._loaded_batches if self._loaded_batches is not None
                         else trainer.global_step // len(optimizers))
        self._loaded_step_counts, self._loaded_batches = {}, None
        self.faults.call("layout", self._write_layout, trainer)

    def _optimizer_steps(self) -> int:
        return sum(r.step_index for r in self.recorders)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        """Remember the step counts, to tell whether this batch stepped an optimizer."""
        self._steps_at_batch_start = self._optimizer_steps()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Advance the x-axis after a batch that stepped an optimizer (as ``self.log``)."""
        if self._optimizer_steps() != self._steps_at_batch_start:
            self._batches += 1

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the optimizer hooks; close the fault record."""
        self._detach()
        if self._sinks:
            close_sinks(self._sinks, timeout=5.0)
        self._sinks = None

    def _detach(self) -> None:
        for r in self.recorders:
            r.detach()
            self._step_counts[r.name] = r.step_index
        self.recorders = []

    def _due(self, index: int) -> bool:
        t = self._trainer
        return t is not None and t.training and index % self._interval == 0

    def _current_step(self) -> int | None:
        return None if self._trainer is None else self._trainer.global_step

    def _report_fault(self, event: GuardEvent) -> None:
        """Send a fault record to the run's record (log line and ``events.jsonl``)."""
        trainer = self._trainer
        if self._sinks is None:
            self._sinks = make_default_sinks(
                None if trainer is None else run_dir(trainer),
                is_rank_zero=lambda: trainer is None or trainer.is_global_zero)
        dispatch(self._sinks, event)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Measure gradient norms before clipping, on recorded steps only."""
        opt = getattr(optimizer, "optimizer", optimizer)
        for r in self.recorders:
            if r.optimizer is opt and r.capture_gradients() and self.grad_histograms \
                    and self._histogram_due(self._batches):
                self.faults.call("grad_histograms", self._write_grad_histograms, trainer, r,
                                 subject=r.name)

    # -- output --------------------------------------------------------------------------
    def _make_on_record(self, name: str) -> Any:
        def on_record(metrics: dict[str, float], host: HostStepSums) -> None:
            trainer = self._trainer
            rec = next((r for r in self.recorders if r.name == name), None)
            if trainer is None or not trainer.is_global_zero or rec is None:
                return
            step = self._batches
            self._recorded_steps += 1
            self.faults.call("log", self._log, trainer, metrics, step, subject=name)
            if self._histogram_due(step):
                self.faults.call("histograms", self._write_lr_histograms, trainer, rec, host,
                                 step, subject=name)

        return on_record

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _histogram_due(self, step: int) -> bool:
        n = self.histogram_every_n_steps
        if n == 0 or self._trainer is None:
            return False
        return n is None or step % n == 0

    def _tb_writers(self, trainer: pl.Trainer) -> list[Any]:
        writers = [cast(Any, lg).experiment for lg in trainer.loggers
                   if is_tensorboard_logger(lg)]
        wants = self.histogram_every_n_steps != 0 or self.grad_histograms
        if not writers and wants and not self._warned_histograms and trainer.loggers:
            self._warned_histograms = True
            rank_zero_warn("StepSizeMonitor: histograms need a TensorBoardLogger; with "
                           f"{type(trainer.loggers[0]).__name__} only scalars are logged.")
        return writers

    def _write_lr_histograms(self, trainer: pl.Trainer, rec: StepRecorder,
                             host: HostStepSums, step: int) -> None:
        writers = self._tb_writers(trainer)
        if not writers:
            return
        name = rec.name
        gnames = group_names(rec.optimizer.param_groups)
        for gname, counts in zip(gnames, host.hist, strict=False):
            nz = np.nonzero(counts)[0]
            if nz.size == 0:
                continue
            lo, hi = max(int(nz[0]) - 1, 0), min(int(nz[-1]) + 2, counts.size)
            c = counts[lo:hi]
            edges = LOG10_MIN + (np.arange(lo, hi) + 1) / BINS_PER_DECADE
            centers = edges - 0.5 / BINS_PER_DECADE
            total = float(c.sum())
            for w in writers:
                w.add_histogram_raw(
                    tag=f"{self.prefix}/log10_eff_lr/{name}/{gname}",
                    min=float(centers[c > 0][0]), max=float(centers[c > 0][-1]),
                    num=total, sum=float((c * centers).sum()),
                    sum_squares=float((c * centers**2).sum()),
                    bucket_limits=edges.tolist(), bucket_counts=c.tolist(),
                    global_step=step,
                )

    def _write_grad_histograms(self, trainer: pl.Trainer, rec: StepRecorder) -> None:
        writers = self._tb_writers(trainer)
        if not writers or not trainer.is_global_zero:
            return
        for gname, g in zip(group_names(rec.optimizer.param_groups), rec.optimizer.param_groups,
                            strict=True):
            grads = [grad_values(p.grad).detach().reshape(-1).float() for p in g["params"]
                     if p.grad is not None]
            if not grads:
                continue
            flat = torch.cat(grads).cpu()
            flat = flat[torch.isfinite(flat)]
            if flat.numel():
                for w in writers:
                    w.add_histogram(f"{self.prefix}/grad/{rec.name}/{gname}", flat,
                                    self._batches)

    def _write_layout(self, trainer: pl.Trainer) -> None:
        if not self.custom_scalars or self._layout_written or not trainer.is_global_zero:
            return
        writers = [cast(Any, lg).experiment for lg in trainer.loggers
                   if is_tensorboard_logger(lg)]
        if not writers:
            return
        charts = {
            stat: ["Multiline", [rf"^{self.prefix}/{stat}/.*"]]
            for stat in STATISTICS if not (stat.startswith("eff_lr/") and stat != "eff_lr/p50")
        }
        for r in self.recorders:
            charts[f"eff_lr band {r.name} (p05-p95)"] = ["Margin", [
                f"{self.prefix}/eff_lr/{q}/{r.name}/global" for q in ("p50", "p05", "p95")]]
        layout = {"lr-monitor": charts}
        for w in writers:
            w.add_custom_scalars(layout)
        self._layout_written = True

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What survives a resume: recorded steps, each optimizer's steps, the x-axis.

        The subsample of the last update kept for ``update_cosine`` is not saved (it is
        parameter-sized in the worst case): after a resume the first recorded step has no
        ``update_cosine``.
        """
        counts = {**self._step_counts, **self._loaded_step_counts,
                  **{r.name: r.step_index for r in self.recorders}}
        batches = self._batches if self._loaded_batches is None else self._loaded_batches
        return {"recorded_steps": self._recorded_steps, "step_counts": counts,
                "batches": batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._recorded_steps = int(state_dict.get("recorded_steps", 0))
        self._loaded_step_counts = {str(k): int(v) for k, v in
                                   state_dict.get("step_counts", {}).items()}
        if "batches" in state_dict:
            self._loaded_batches = int(state_dict["batches"])
