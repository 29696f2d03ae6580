"""StepQualityMonitor: the Lightning callback that measures the step quality ρ every n steps.

Every ``every_n_steps`` optimizer steps it measures, on the step's own mini-batch B,

    ρ = (L_B(θ+Δ) − L_B(θ)) / (g_B·Δ)          and Cockpit's α = 1 − 2ρ

and logs them as ``<prefix>/step_quality/<optimizer>/global`` and
``<prefix>/step_alpha/<optimizer>/global`` (:mod:`lr_monitor.tags`). Each measurement is
also handed, as a :class:`~lr_monitor.recording.StepRecord`, to the listeners added with
:meth:`StepQualityMonitor.subscribe` (on every rank), the way
:class:`~lr_monitor.StepSizeMonitor` publishes its records. The math and the bookkeeping
are framework-free in :mod:`lr_monitor.recording.step_quality`; this module holds the
hooks only.

How a measured step goes (nothing happens on the other steps but one comparison):

* ``on_train_batch_start``: the random states (torch CPU and CUDA, NumPy, Python) are
  captured right before the training forward.
* ``on_before_optimizer_step`` (after backward and AMP unscaling, **before** gradient
  clipping): θ and g are copied. g·Δ uses the loss's own, unclipped gradient: the ratio
  compares the loss change with the change the loss's gradient predicts.
* ``on_train_batch_end`` (after ``optimizer.step()``): g·Δ is summed on the device, then
  ``training_step(batch, batch_idx)`` (or ``loss_fn(module, batch)``) runs once more on
  the same batch under ``torch.no_grad()``, inside the precision plugin's autocast, with
  the captured random states (identical dropout masks) and ``self.log``/``self.log_dict``
  turned into no-ops; afterwards the module's buffers (BatchNorm statistics) and the
  random states the training had reached are put back, so training continues exactly as
  without the callback. L_B(θ) is the training loss of the step (``outputs["loss"]``,
  unscaled). Under DDP the two losses and g·Δ (with a failure flag) are averaged across
  ranks in one all-reduce: L_B is then the loss of the global batch, whose gradient is the
  all-reduced g every rank applied. Then one host transfer.

Supported: automatic optimization with ``accumulate_grad_batches=1`` (anything else:
one warning, no measurement), fp32/bf16/fp16 AMP, DDP. A fault anywhere is reported once
(log line and ``events.jsonl``) and measuring stops; training is never disturbed.

Example::

    from pytorch_lightning import Trainer
    from lr_monitor.callbacks.step_quality import StepQualityMonitor

    trainer = Trainer(callbacks=[StepQualityMonitor(every_n_steps=50)])
    trainer.fit(model)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature

from lr_monitor._validation import check_callable, check_int, check_str
from lr_monitor.callbacks._compat import (
    grad_scaler,
    logging_off,
    loss_tensor,
    pl,
    rank_zero_warn,
)
from lr_monitor.callbacks._publisher import Publisher
from lr_monitor.guard.signals import loss_scale
from lr_monitor.recording.record import StepRecord
from lr_monitor.recording.step_quality import StepQualityMeter, StepQualityValues
from lr_monitor.tags import DEFAULT_PREFIX, optimizer_names

__all__ = ["LossFn", "StepQualityMonitor"]

#: A user loss for the re-run: ``loss_fn(module, batch)`` returns a 1-element tensor.
LossFn = Callable[[Any, Any], torch.Tensor]

#: The stages whose fault switches measuring off (the ``log`` stage only stops logging).
_MEASURING = ("capture", "measure", "finish")



class StepQualityMonitor(Publisher):
    """Measure the step quality ρ (and Cockpit's α = 1 − 2ρ) every n optimizer steps.

    Costs, on a measured step only: one forward pass without autograd graph (about a third
    of a training step for an MLP), one copy of the parameters and one of the gradients
    (held from ``on_before_optimizer_step`` to ``on_train_batch_end``; float32 for 16-bit
    parameters), one copy of the module's buffers, one all-reduce of 5 numbers under DDP
    and one host transfer. Other steps: one integer comparison.

    The re-run calls ``training_step`` again (or ``loss_fn``): side effects it has besides
    logging and buffers — counters on the module, reads of ``self.global_step`` (already
    advanced by one during the re-run), in-place changes to the batch — happen twice; pass
    a ``loss_fn`` without them. It must compute the same loss as the training step (the one
    whose gradient the optimizer used), in the module's current (training) mode.

    Args:
        every_n_steps: Measure every n-th optimizer step, starting with the first (≥ 1).
        loss_fn: ``loss_fn(module, batch) -> loss`` for the re-run; ``None``: the module's
            own ``training_step(batch, batch_idx)`` (a tensor or a dict with ``"loss"``).
        prefix: The first component of the tags (:data:`lr_monitor.tags.DEFAULT_PREFIX`).

    Raises:
        ValueError: for an argument outside its allowed values (the message names it).

    Example:
        >>> monitor = StepQualityMonitor(every_n_steps=10)
        >>> qualities = []
        >>> monitor.subscribe(lambda record: qualities.append(record.value("step_quality")))
        >>> StepQualityMonitor(every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: every_n_steps=0 is invalid: must be an int >= 1
    """

    def __init__(self, every_n_steps: int = 50, *, loss_fn: LossFn | None = None,
                 prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__("StepQualityMonitor")
        self.every_n_steps: int = check_int("every_n_steps", every_n_steps, 1)
        self.loss_fn = (None if loss_fn is None else
                        check_callable("loss_fn", loss_fn, "None or a callable "
                                       "loss_fn(module, batch) returning a loss tensor"))
        self.prefix: str = check_str("prefix", prefix)
        self.meter = StepQualityMeter()
        #: The values of the most recent measurement (``None`` before the first).
        self.last: StepQualityValues | None = None
        #: Steps measured so far (on this rank).
        self.measured = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._name = ""
        self._hook: Any = None
        self._active = False
        self._warned: set[str] = set()
        # The step being measured.
        self._pending = False
        self._failed = False
        self._stepped = False
        self._step = 0

    # -- lifecycle -----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the set-up (warn once when unsupported); hook the optimizer's step."""
        self._remove_hook()
        self._trainer = trainer
        self.faults.call("setup", self._setup, trainer, pl_module)

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = False
        if not pl_module.automatic_optimization:
            self._warn_once("manual", "StepQualityMonitor: manual optimization is not "
                            "supported (which loss and batch belong to which optimizer "
                            "step is the module's own business); nothing is measured")
            return
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1))
        if accumulate != 1:
            self._warn_once("accumulate", "StepQualityMonitor: accumulate_grad_batches="
                            f"{accumulate} is not supported (the step's loss spans "
                            f"{accumulate} micro-batches, a re-run would need them all); "
                            "nothing is measured")
            return
        optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        if not optimizers:
            self._warn_once("optimizer", "StepQualityMonitor: the trainer has no optimizer; "
                            "nothing is measured")
            return
        self._optimizer = optimizers[0]
        self._name = optimizer_names(optimizers)[0]
        self._hook = self._optimizer.register_step_post_hook(self._on_step)
        self._active = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the optimizer hook; close the fault record."""
        self._remove_hook()
        self._pending = False
        self.meter.reset()
        self._close_fault_record()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._active = False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)



    def _enabled(self) -> bool:
        return self._active and not any(self.faults.disabled(s) for s in _MEASURING)

    def _guarded(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` behind the barrier; a fault marks the step as failed."""
        faults = len(self.faults.faults)
        out = self.faults.call(stage, fn, *args)
        if len(self.faults.faults) > faults:
            self._failed = True
        return out

    # -- the measured step ---------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        """On a measured step, capture the random states the training forward starts from."""
        self._pending = False
        if not self._enabled() or trainer.global_step % self.every_n_steps:
            return
        self._pending, self._failed, self._stepped = True, False, False
        self._step = trainer.global_step
        self._guarded("capture", self.meter.start)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Copy θ and the unclipped (AMP-unscaled) gradient g before the step."""
        if self._pending and not self._failed:
            self._guarded("capture", self._capture, trainer, optimizer)

    def _capture(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        opt = getattr(optimizer, "optimizer", optimizer)
        scale = None
        if getattr(opt, "_step_supports_amp_scaling", False):
            # An optimizer that unscales inside step() (fused Adam): Lightning did not
            # unscale, so g still carries the loss scale.
            scale = loss_scale(grad_scaler(trainer))
        self.meter.capture([p for g in opt.param_groups for p in g["params"]], scale)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Step post-hook: the optimizer did step (an fp16 ``GradScaler`` may skip it)."""
        if self._pending:
            self._stepped = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Re-run the loss at θ+Δ, combine across ranks, publish and log ρ and α."""
        if not self._pending:
            return
        self._pending = False
        try:
            values = None
            skipped = not self._stepped or not self.meter.captured or \
                all(p.grad is None for p in self.meter.params)  # a guard dropped the step
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if not isinstance(loss, torch.Tensor):
                skipped = True  # training_step returned None: nothing was optimized
            if not (skipped or self._failed):
                values = self._guarded("measure", self._measure, trainer, pl_module, loss,
                                       batch, batch_idx)
            self._guarded("finish", self._finish, trainer, values, skipped)
        finally:
            self.meter.reset()

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 loss: torch.Tensor, batch: Any, batch_idx: int) -> torch.Tensor:
        precision = getattr(trainer, "precision_plugin", None)
        context = getattr(precision, "train_step_context", None)

        def rerun() -> torch.Tensor:
            with logging_off(pl_module), (context() if callable(context)
                                           else nullcontext()):
                if self.loss_fn is not None:
                    return loss_tensor(self.loss_fn(pl_module, batch), "loss_fn")
                step = pl_module.training_step
                if is_param_in_hook_signature(step, "batch_idx", min_args=2):
                    return loss_tensor(step(batch, batch_idx), "training_step")
                return loss_tensor(step(batch), "training_step")

        return self.meter.measure(loss, rerun, pl_module)

    def _finish(self, trainer: pl.Trainer, values: torch.Tensor | None,
                skipped: bool) -> None:
        """Combine across ranks (one all-reduce), read back (one transfer), publish, log."""
        failed = self._failed
        if trainer.world_size > 1:
            # Every rank joins the same all-reduce, whatever happened to it, so that a
            # fault on one rank cannot leave the others waiting.
            device = values.device if values is not None else trainer.strategy.root_device
            nan = torch.full((3,), torch.nan, dtype=torch.float64, device=device)
            flags = torch.tensor([float(failed), float(skipped)], dtype=torch.float64,
                                 device=device)
            packed = torch.cat([nan if values is None else values, flags])
            packed = trainer.strategy.reduce(packed, reduce_op="mean")
            host = packed.tolist()
            if host[3] > 0 and not failed:
                self.faults.fail("measure", RuntimeError(
                    "another rank's step-quality measurement failed"))
            if host[3] > 0 or host[4] > 0:
                return
            result = StepQualityValues(self._step, *map(float, host[:3]))
        else:
            if failed or skipped or values is None:
                return
            result = StepQualityValues.from_tensor(self._step, values)
        self.last = result
        self.measured += 1
        record = StepRecord(optimizer=self._name, index=result.step, rows=result.rows())
        self._publish(record, self._name)
        if trainer.is_global_zero:
            self.faults.call("log", self._log, trainer, record, subject=self._name)

    def _log(self, trainer: pl.Trainer, record: StepRecord) -> None:
        metrics = record.metrics(self.prefix)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record.index)
