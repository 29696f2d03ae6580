"""GradientNoiseScale: the Lightning callback that logs B_simple = tr Σ / |G|².

The gradient noise scale (McCandlish et al. 2018) is about the batch size above which a
larger batch stops buying proportionally fewer steps; its ratio to the batch size B in use
says whether the step is limited by gradient noise (B ≪ B_simple: the best learning rate
is about B/B_simple of the noiseless one, a larger one mostly amplifies noise) or by
curvature (B ≫ B_simple). It is estimated without
per-example gradients from the micro-batch gradients each step already computes — under
gradient accumulation each micro-batch's, under DDP each rank's local gradient before the
all-reduce — by :class:`~lr_monitor.recording.noise.NoiseScaleEstimator`: a gradient hook
per parameter keeps each backward pass's gradient norm on the device, and
``on_before_optimizer_step`` compares their mean with the norm of the step's gradient.

Lightning divides the loss by ``accumulate_grad_batches`` and an fp16 ``GradScaler``
multiplies it by its scale; the callback undoes both, so the norms are those of each
micro-batch's mean-loss gradient. Every ``every_n_steps`` optimizer steps it logs
``<prefix>/gradient_noise_scale/<optimizer>/global`` and publishes a
:class:`~lr_monitor.recording.StepRecord` to its listeners (:meth:`GradientNoiseScale.subscribe`)
on every rank; the one host transfer (after one all-reduce under DDP) happens then.

Cost: one Python call and one norm kernel per parameter tensor per backward pass (about
10–15 µs per tensor on CPU; ``measure_every_n_steps`` skips most of it), about ten small
device operations per step, no host transfer except on logged steps. With one process and
no accumulation there is a single gradient per step and nothing to compare: the callback
warns once and does nothing (no hooks).

Example::

    from pytorch_lightning import Trainer
    from lr_monitor.callbacks.noise import GradientNoiseScale

    trainer = Trainer(accumulate_grad_batches=4, callbacks=[GradientNoiseScale()])
    trainer.fit(model)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pytorch_lightning.utilities.data import extract_batch_size

from lr_monitor._validation import check_int, check_real, check_str
from lr_monitor.callbacks._compat import grad_scaler, pl, rank_zero_warn
from lr_monitor.callbacks._publisher import Publisher
from lr_monitor.guard.signals import loss_scale
from lr_monitor.recording.noise import NoiseScale, NoiseScaleEstimator
from lr_monitor.recording.record import StepRecord
from lr_monitor.tags import DEFAULT_PREFIX, GLOBAL, NOISE_STATISTICS, optimizer_names

__all__ = ["GradientNoiseScale"]

#: The statistic this callback logs.
_STAT = NOISE_STATISTICS[0]



class GradientNoiseScale(Publisher):
    """Log the gradient noise scale B_simple from micro-batch (or per-rank) gradients.

    Needs at least two gradients per optimizer step: ``Trainer(accumulate_grad_batches=k)``
    with k ≥ 2, or DDP on ≥ 2 processes (then B_small = micro-batch size and B_big =
    B_small × micro-batches × processes). Automatic optimization only (in manual
    optimization the scaling of each backward is the user's, so it cannot be undone).

    Args:
        every_n_steps: Log (and publish) every n-th optimizer step, when
            ``(global_step + 1) % n == 0`` like Lightning's own logging; ``None``: the
            trainer's ``log_every_n_steps``. The averages are updated at every measured step.
        ema: Decay of the moving averages of |G|² and tr Σ, in [0, 1); they span about
            ``2/(1 − ema)`` steps.
        prefix: First component of the tag (``<prefix>/gradient_noise_scale/<optimizer>/global``).
        batch_size: Examples per micro-batch (per rank); ``None``: read from each batch
            (Lightning's ``extract_batch_size``, the first dimension of its first tensor).
        dataset_size: Number of training examples, for the exact correction when a step's
            micro-batches are drawn without replacement from a small data set (a shuffled
            epoch); ``None`` (default) assumes N ≫ B_big·B_simple, where it does not matter.
        measure_every_n_steps: Measure only the steps whose ``global_step`` is a multiple of
            n: the hooks of the other steps return at once (about 1 µs instead of ~10 µs
            per parameter tensor per backward pass on CPU), and the averages then span
            n times more steps.

    Raises:
        ValueError: for an argument outside its allowed values (the message names it).
    """

    def __init__(self, every_n_steps: int | None = None, *, ema: float = 0.99,
                 prefix: str = DEFAULT_PREFIX, batch_size: int | None = None,
                 dataset_size: int | None = None, measure_every_n_steps: int = 1) -> None:
        super().__init__("GradientNoiseScale")
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1, allow_none=True)
        self.measure_every_n_steps: int = check_int("measure_every_n_steps",
                                                    measure_every_n_steps, 1)
        self.ema = check_real("ema", ema, low=0.0, high=1.0, low_closed=True)
        self.prefix: str = check_str("prefix", prefix)
        self.batch_size = check_int("batch_size", batch_size, 1, allow_none=True)
        self.dataset_size = check_int("dataset_size", dataset_size, 2, allow_none=True)
        #: The framework-free estimator (``None`` until the hooks are attached).
        self.estimator: NoiseScaleEstimator | None = None
        self._enabled = False  # hooks on and every stage healthy
        #: The last estimate read (on logged steps), or ``None``.
        self.last: NoiseScale | None = None
        self.optimizer_name = ""
        self._micro_batch_size: int | None = None
        self._loaded: dict[str, float] | None = None
        self._warned = False

    @property
    def state_key(self) -> str:
        """Key in the checkpoint's ``callbacks`` dict; callbacks with other prefixes coexist."""
        return self._generate_state_key(prefix=self.prefix)



    # -- lifecycle -----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the gradient hooks, if the run has ≥ 2 gradients per step."""
        self._detach()
        self._trainer = trainer
        self.estimator, self._enabled = None, False
        self._guarded("attach", self._attach, trainer, pl_module)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        if not optimizers:
            self._warn("the trainer has no optimizer; nothing to measure")
            return
        if not pl_module.automatic_optimization:
            self._warn("manual optimization is not supported (how each backward pass is "
                       "scaled is up to the training_step); nothing will be logged")
            return
        per_step = trainer.accumulate_grad_batches * trainer.world_size
        scheduled = any(type(cb).__name__ == "GradientAccumulationScheduler"
                        for cb in trainer.callbacks)  # type: ignore[attr-defined]
        if per_step < 2 and not scheduled:
            self._warn("one process without gradient accumulation has a single gradient per "
                       "step, so tr Σ and |G|² cannot be told apart; set "
                       "Trainer(accumulate_grad_batches=2) or more, or train with DDP on "
                       "two or more devices. Nothing will be logged")
            return
        params = [p for g in optimizers[0].param_groups for p in g["params"]]
        if any(callable(getattr(p, "to_local", None)) for p in params):
            self._warn("sharded parameters (FSDP/DTensor) are not supported; nothing will "
                       "be logged")
            return
        self.optimizer_name = optimizer_names(optimizers)[0]
        est = NoiseScaleEstimator(params, ema=self.ema, dataset_size=self.dataset_size)
        if self._loaded is not None:
            est.load_state_dict(self._loaded)
            self._loaded = None
        est.attach()
        self.estimator, self._enabled = est, True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the gradient hooks; close the fault record."""
        self._detach()
        self._close_fault_record()

    def _detach(self) -> None:
        self._enabled = False
        if self.estimator is not None:
            self.estimator.detach()

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            rank_zero_warn(f"GradientNoiseScale: {why}.")

    def _guarded(self, stage: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` behind the barrier; after a fault the hooks come off (no more cost)."""
        before = len(self.faults.faults)
        out = self.faults.call(stage, fn, *args)
        if len(self.faults.faults) != before:
            self._detach()
        return out


    # -- per micro-batch and per step ----------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        """Note the micro-batch's size; pause the hooks on steps that are not measured."""
        if self._enabled and self.estimator is not None:
            paused = trainer.global_step % self.measure_every_n_steps != 0
            self.estimator.paused = paused
            if not paused:
                self._micro_batch_size = self.batch_size or self._guarded(
                    "batch_size", _extract_batch_size, batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        """Start a micro-batch: drop gradients other code computed since the last backward."""
        if self._enabled and self.estimator is not None:
            self.estimator.begin_backward()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close one micro-batch: its gradient norm, with the loss scaling undone."""
        if self._enabled:
            self._guarded("backward", self._end_backward, trainer)

    def _end_backward(self, trainer: pl.Trainer) -> None:
        est, size = self.estimator, self._micro_batch_size
        if est is None or size is None:
            return
        factor: torch.Tensor | float = float(trainer.accumulate_grad_batches)
        scale = loss_scale(grad_scaler(trainer))
        if scale is not None:
            factor = factor / scale
        est.end_backward(size, factor)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Close the step (``.grad`` is reduced and unscaled here); log when due."""
        if self._enabled:
            self._guarded("step", self._end_step, trainer)
        est = self.estimator
        if est is None or not self._due(trainer):
            return
        # Under DDP every rank joins the all-reduce on the same steps, also a rank whose
        # stages failed (it sends NaN: nothing is logged anywhere, no rank waits forever).
        state = self._guarded("state", est.state_tensor) if self._enabled else None
        if state is None:
            state = torch.full((3,), math.nan, dtype=torch.float64, device=_device(est))
        if trainer.world_size > 1:
            state = trainer.strategy.reduce(state, reduce_op="mean")
        if self._enabled:
            self._guarded("log", self._log_estimate, trainer, est, state)

    def _end_step(self, trainer: pl.Trainer) -> None:
        est = self.estimator
        if est is None:
            return
        backwards = est.pending_backwards
        # Lightning divides every micro-batch's loss by accumulate_grad_batches, also in a
        # short last accumulation of an epoch: .grad is backwards/k times their mean.
        factor = trainer.accumulate_grad_batches / backwards if backwards else 1.0
        est.end_step(grad_factor=factor, world_size=trainer.world_size)

    def _due(self, trainer: pl.Trainer) -> bool:
        n = self.every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        return (trainer.global_step + 1) % n == 0

    def _log_estimate(self, trainer: pl.Trainer, est: NoiseScaleEstimator,
                 state: torch.Tensor) -> None:
        result = est.summarize(state.tolist())  # the one host transfer
        self.last = result
        if result is None or result.value is None or not math.isfinite(result.value):
            return
        record = StepRecord(optimizer=self.optimizer_name, index=trainer.global_step,
                            rows={GLOBAL: {_STAT: result.value}})
        self._publish(record, self.optimizer_name)
        if trainer.is_global_zero:
            metrics = record.metrics(self.prefix)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The moving averages (three numbers; one host transfer when saved)."""
        if self.estimator is not None:
            return {"averages": self.estimator.state_dict()}
        return {"averages": self._loaded} if self._loaded is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (applied when the hooks are attached)."""
        averages = state_dict.get("averages")
        self._loaded = None if averages is None else {
            str(k): float(v) for k, v in averages.items()}


def _extract_batch_size(batch: Any) -> int:
    return int(extract_batch_size(batch))


def _device(est: NoiseScaleEstimator) -> torch.device:
    return est.params[0].device if est.params else torch.device("cpu")
