"""StepSizeMonitor: the Lightning callback that records the step each weight takes.

Every ``logging_interval`` optimizer steps it logs, per optimizer and param group and for
all groups together (``global``), the learning rate, the effective per-element learning
rate (quantiles, min, max), the share of elements where ε dominates, gradient,
parameter, update and moment norms, the update/parameter ratio, the cosine between
successive recorded updates and non-finite counts; and with ``consecutive=True``, for all
groups together, the means since the previous record of three every-step overshoot signals
(:data:`~lr_monitor.tags.CONSECUTIVE_STATISTICS`: cos(Δ_t, Δ_{t−1}), cos(g_t, Δ_{t−1}) and
the share of steps with g_t·Δ_{t−1} > 0, see :mod:`lr_monitor.recording.consecutive`). Tags are
``<prefix>/<stat>/<optimizer>/<group>``, e.g. ``optim/eff_lr/p50/Adam/pg0``
(:mod:`lr_monitor.tags`); every tag is listed in ``docs/metrics.md``.

The measuring is done by one :class:`~lr_monitor.recording.StepRecorder` per optimizer;
this callback only wires the recorders to the trainer and writes what they publish (a
:class:`~lr_monitor.recording.StepRecord` per recorded step). Other components read the
same records through :meth:`StepSizeMonitor.subscribe` (the guard does), never the tags.

How it works: gradient norms are measured in ``on_before_optimizer_step`` (after AMP
unscaling and accumulation, before clipping); the step itself is reconstructed in a
``register_step_post_hook`` from the optimizer's post-step state, so no parameter copy
is taken (except for optimizers without an exact rule, see
:class:`lr_monitor.functional.ParamSnapshot`). Steps that are not recorded cost two
Python calls and no host sync (with ``consecutive=True`` also about ten device operations
on a fixed subsample of at most ``consecutive_tensors × cosine_samples`` coordinates); a
recorded step costs one device-to-host transfer.

Example::

    from pytorch_lightning import Trainer
    from lr_monitor import StepSizeMonitor

    trainer = Trainer(callbacks=[StepSizeMonitor()])  # TensorBoardLogger by default
    trainer.fit(model)
"""

from __future__ import annotations

from typing import Any, cast

import torch

from lr_monitor._validation import check_bool, check_int
from lr_monitor.callbacks._compat import (
    check_strategy,
    is_tensorboard_logger,
    pl,
    rank_zero_warn,
)
from lr_monitor.callbacks._publisher import Publisher
from lr_monitor.functional.statistics import grad_values, histogram_buckets
from lr_monitor.recording import RecorderConfig, StepRecord, StepRecorder
from lr_monitor.tags import (
    CONSECUTIVE_STATISTICS,
    DEFAULT_PREFIX,
    GLOBAL,
    GRAD_HISTOGRAM,
    LR_HISTOGRAM,
    STEP_STATISTICS,
    group_names,
    histogram_tag,
    optimizer_names,
    stat_pattern,
    stat_tag,
)

__all__ = ["StepSizeMonitor"]


class StepSizeMonitor(Publisher):
    """Record effective step sizes, gradient statistics and moments to the logger.

    Listeners added with :meth:`subscribe` receive every record of every optimizer on every
    rank, before it is logged; logging is done by rank zero only.

    Args:
        logging_interval: Record every n-th optimizer step (the first step is recorded).
            ``None``: the trainer's ``log_every_n_steps``.
        prefix: See :class:`~lr_monitor.recording.RecorderConfig`.
        granularity: See :class:`~lr_monitor.recording.RecorderConfig`.
        include: See :class:`~lr_monitor.recording.RecorderConfig`.
        exclude: See :class:`~lr_monitor.recording.RecorderConfig`.
        histogram_every_n_steps: TensorBoard only: write the histogram of log10
            effective lr per group every n-th step (rounded to recorded steps: it is
            built from the recorded statistics, at no extra cost). ``None``: every
            recorded step; ``0``: never.
        grad_histograms: TensorBoard only: also write gradient histograms per group on
            the histogram steps (copies the gradients to the host: off by default).
        custom_scalars: TensorBoard only: write a Custom Scalars layout with one chart
            per statistic and every group on it.
        update_cosine: See :class:`~lr_monitor.recording.RecorderConfig`.
        cosine_samples: See :class:`~lr_monitor.recording.RecorderConfig`.
        consecutive: See :class:`~lr_monitor.recording.RecorderConfig`.
        consecutive_tensors: See :class:`~lr_monitor.recording.RecorderConfig`.
        log_global: See :class:`~lr_monitor.recording.RecorderConfig` (the ``global``
            row is computed and published to listeners either way).
        statistics: See :class:`~lr_monitor.recording.RecorderConfig`: ``"auto"``
            compiles the Adam/AdamW statistics kernels at the first recorded step.

    Raises:
        ValueError: for an argument outside its allowed values (the message names it).
    """

    def __init__(
        self,
        logging_interval: int | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        granularity: str = "group",
        include: str | None = None,
        exclude: str | None = None,
        histogram_every_n_steps: int | None = None,
        grad_histograms: bool = False,
        custom_scalars: bool = True,
        update_cosine: bool = True,
        cosine_samples: int = 4096,
        consecutive: bool = False,
        consecutive_tensors: int = 64,
        log_global: bool = True,
        statistics: str = "auto",
    ) -> None:
        super().__init__("StepSizeMonitor")
        check_int("logging_interval", logging_interval, 1, allow_none=True)
        self.config = RecorderConfig(prefix=prefix, granularity=granularity, include=include,
                                     exclude=exclude, update_cosine=update_cosine,
                                     cosine_samples=cosine_samples, consecutive=consecutive,
                                     consecutive_tensors=consecutive_tensors,
                                     log_global=log_global, statistics=statistics)
        check_int("histogram_every_n_steps", histogram_every_n_steps, 0, allow_none=True)
        check_bool("grad_histograms", grad_histograms)
        check_bool("custom_scalars", custom_scalars)
        self.logging_interval = logging_interval
        self.histogram_every_n_steps = histogram_every_n_steps
        self.grad_histograms = grad_histograms
        self.custom_scalars = custom_scalars
        self.recorders: list[StepRecorder] = []
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

    @property
    def prefix(self) -> str:
        """The first component of every tag (``config.prefix``)."""
        return self.config.prefix

    @property
    def state_key(self) -> str:
        """Key in the checkpoint's ``callbacks`` dict; monitors with other prefixes coexist."""
        return self._generate_state_key(prefix=self.config.prefix,
                                        granularity=self.config.granularity)

    # -- lifecycle -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a strategy whose steps cannot be measured (DeepSpeed, FSDP1).

        Raises:
            RuntimeError: Naming the strategy and what to use instead.
        """
        if stage == "fit":
            check_strategy(trainer, type(self).__name__)

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
        # Replicated parameters (single device, DDP): rank zero alone measures and logs,
        # unless a listener (the guard) needs the records on every rank. Sharded
        # parameters (FSDP2/DTensor): every rank measures its shard and the sums are
        # reduced before the statistics are finished.
        active = trainer.is_global_zero or sharded
        # The every-step consecutive statistics only where records can be made.
        options = {**self.config.as_kwargs(),
                   "consecutive": self.config.consecutive and (active or bool(self._listeners))}
        for opt, name in zip(optimizers, names, strict=True):
            rec = StepRecorder(
                opt, name,
                should_record=lambda index: (active or bool(self._listeners))
                and self._due(index),
                listeners=[self._on_record],
                reduce=(lambda sums: sums.all_reduce()) if sharded else None,
                param_names=param_names, faults=self.faults, **options,
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
        self._close_fault_record()

    def _detach(self) -> None:
        for r in self.recorders:
            r.detach()
            self._step_counts[r.name] = r.step_index
        self.recorders = []

    def _due(self, index: int) -> bool:
        t = self._trainer
        return t is not None and t.training and index % self._interval == 0



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
    def _on_record(self, record: StepRecord) -> None:
        """Hand the record to the listeners, then log it (rank zero)."""
        self._publish(record)
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return
        step = self._batches
        self._recorded_steps += 1
        self.faults.call("log", self._log, trainer, self.config.metrics(record), step,
                         subject=record.optimizer)
        if self._histogram_due(step):
            self.faults.call("histograms", self._write_lr_histograms, trainer, record, step,
                             subject=record.optimizer)

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

    def _write_lr_histograms(self, trainer: pl.Trainer, record: StepRecord, step: int) -> None:
        writers = self._tb_writers(trainer)
        if not writers or record.host is None:
            return
        for group, hist in zip(record.groups, record.host.hist, strict=False):
            limits, counts, centers = histogram_buckets(hist)
            if not counts.size:
                continue
            occupied = centers[counts > 0]
            for w in writers:
                w.add_histogram_raw(
                    tag=histogram_tag(self.config.prefix, LR_HISTOGRAM, record.optimizer, group),
                    min=float(occupied[0]), max=float(occupied[-1]), num=float(counts.sum()),
                    sum=float((counts * centers).sum()),
                    sum_squares=float((counts * centers**2).sum()),
                    bucket_limits=limits.tolist(), bucket_counts=counts.tolist(),
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
                tag = histogram_tag(self.config.prefix, GRAD_HISTOGRAM, rec.name, gname)
                for w in writers:
                    w.add_histogram(tag, flat, self._batches)

    def _write_layout(self, trainer: pl.Trainer) -> None:
        if not self.custom_scalars or self._layout_written or not trainer.is_global_zero:
            return
        writers = [cast(Any, lg).experiment for lg in trainer.loggers
                   if is_tensorboard_logger(lg)]
        if not writers:
            return
        prefix = self.config.prefix
        # One chart per statistic (of the eff_lr quantiles only the median), every row on it.
        stats = STEP_STATISTICS + (CONSECUTIVE_STATISTICS if self.config.consecutive else ())
        charts = {
            stat: ["Multiline", [stat_pattern(prefix, stat)]]
            for stat in stats if not (stat.startswith("eff_lr/") and stat != _BAND[0])
        }
        for r in self.recorders:
            charts[f"eff_lr band {r.name} (p05-p95)"] = ["Margin", [
                stat_tag(prefix, stat, r.name, GLOBAL) for stat in _BAND]]
        layout = {"lr-monitor": charts}
        for w in writers:
            w.add_custom_scalars(layout)
        self._layout_written = True

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What survives a resume: recorded steps, each optimizer's steps, the x-axis.

        The subsample of the last update kept for ``update_cosine`` is not saved (it is
        parameter-sized in the worst case): after a resume the first recorded step has no
        ``update_cosine``. Neither is the consecutive statistics' last update: the first two
        steps after a resume have no cosine, and their first record averages the steps
        since the resume.
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


#: The effective-lr band of the Custom Scalars layout: value, lower and upper line.
_BAND = ("eff_lr/p50", "eff_lr/p05", "eff_lr/p95")


