"""SharpnessMonitor: curvature against each optimizer's stability threshold, every n steps.

Every ``every_n_steps`` optimizer steps (and after the first), on one fixed batch, it logs
per optimizer (row ``global``, tags from :data:`lr_monitor.tags.CURVATURE_STATISTICS`):

* ``<prefix>/sharpness/<optimizer>/global`` — ``λ_max(H)`` of the loss over the
  optimizer's parameters;
* ``<prefix>/preconditioned_sharpness/<optimizer>/global`` — ``λ_max(P^{-1/2} H P^{-1/2})``,
  ``P`` from the optimizer's state (Adam: ``(1−β1^t)·(√v̂+ε)``; SGD: the identity, so it
  equals ``sharpness``);
* ``<prefix>/stability_threshold/<optimizer>/global`` — ``2/η`` for GD, ``38/η`` for Adam
  with β1 = 0.9, … (:func:`lr_monitor.functional.curvature.stability_threshold`);
* ``<prefix>/stability_ratio/<optimizer>/global`` — preconditioned sharpness / threshold.

A ratio near 1 is the **normal edge-of-stability regime**: full-batch GD and Adam drive
their (preconditioned) sharpness up to the threshold and train on there (Cohen et al.
2021, 2022). It is not a reason to cut the learning rate; a ratio well above 1 while the
loss rises is. The math and its choices are in :mod:`lr_monitor.functional.curvature`.

What it costs: one forward and one ``create_graph`` backward on the fixed batch, then
``iters`` Hessian-vector products (each about two backward passes) per estimate: two
estimates per adaptive optimizer (one with ``raw_sharpness=False``), one for SGD with a
single lr — about ``2×iters`` backward passes. Hence sparse by default. One host transfer
per measurement.

Which batch: the ``batch`` given (a fixed held-out batch is best; it is moved to the
module's device), else the first training batch of the run (copied when it arrives). Not
a validation batch: iterating a dataloader outside the loop would advance samplers and
RNG and so change training, and one may not exist. After a resume the first batch after
the resume is used.

Which loss: ``loss_fn(module, batch)`` when given, else the module's own
``training_step(batch, 0)`` (a dict return's ``"loss"``), with ``self.log``/``self.log_dict``
silenced during the call. Metric objects a ``training_step`` updates (torchmetrics) would
see the batch: pass a ``loss_fn`` for such modules. Manual optimization needs a
``loss_fn`` (its ``training_step`` steps the optimizers).

Training is left exactly as it was: the global RNG state is forked (dropout draws from a
generator seeded with ``seed``, so every measurement sees the same masks), buffers
(BatchNorm statistics) are restored, ``.grad`` is never written (``torch.autograd.grad``),
the graph is freed before returning. ``mode="train"`` (default) measures the loss the
optimizer descends (dropout on, batch statistics); ``mode="eval"`` switches the module to
eval for the measurement and restores each submodule's mode after.

A fault (an exception anywhere in a measurement) is reported once (log line,
``events.jsonl``) and switches the monitor off; training goes on. Logging is done by rank
zero; listeners (:meth:`SharpnessMonitor.subscribe`) get the same
:class:`~lr_monitor.recording.StepRecord` on every rank (measured on rank zero and
broadcast). The values are in float32 for float32 models, outside any autocast.

Example::

    from pytorch_lightning import Trainer
    from lr_monitor import SharpnessMonitor

    trainer = Trainer(callbacks=[SharpnessMonitor(every_n_steps=200, batch=held_out)])
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.utilities import move_data_to_device

from lr_monitor._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_real,
    check_str,
    invalid,
)
from lr_monitor.callbacks._compat import logging_off, loss_tensor, pl, rank_zero_warn
from lr_monitor.callbacks._publisher import Publisher
from lr_monitor.functional.curvature import DEFAULT_TOL, Curvature, LossFn, measure_curvature
from lr_monitor.recording.record import StepRecord
from lr_monitor.tags import DEFAULT_PREFIX, GLOBAL, optimizer_names

__all__ = ["SharpnessMonitor"]

#: The modes a measurement can run in.
MODES = ("train", "eval")




def training_step_loss(module: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The loss of ``module.training_step(batch, 0)``, with ``self.log`` silenced.

    Args:
        module: A ``LightningModule`` with automatic optimization.
        batch: The batch, on the module's device.

    Returns:
        The loss tensor (``training_step``'s return, or its ``"loss"`` entry).

    Raises:
        TypeError: when ``training_step`` returns neither a tensor nor a dict with a
            ``"loss"`` tensor.
    """
    with logging_off(module):
        out = module.training_step(batch, 0)  # type: ignore[operator]
    return loss_tensor(out, "training_step")


@contextlib.contextmanager
def _mode(module: torch.nn.Module, mode: str) -> Iterator[None]:
    flags = [(m, m.training) for m in module.modules()]
    if mode == "eval":
        module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's CPU and ``device`` generators with ``seed`` inside; restore on exit.

    Python's ``random`` and NumPy's global generator are restored too (a ``training_step``
    may draw from them).
    """
    accel = device.type not in ("cpu", "meta")
    devices = [device.index or 0] if accel else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices,
                                   device_type=device.type if accel else None):
            torch.random.default_generator.manual_seed(seed)
            if accel:
                getattr(torch, device.type).manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _clone(batch: Any) -> Any:
    return apply_to_collection(batch, torch.Tensor, lambda t: t.detach().clone())


class SharpnessMonitor(Publisher):
    """Log sharpness, preconditioned sharpness, stability threshold and their ratio.

    Args:
        every_n_steps: Measure after every n-th step of each optimizer (its step indices
            0, n, 2n, …), ≥ 1. Sparse by default: a measurement costs about
            ``2×iters`` backward passes.
        batch: The fixed batch to measure on (moved to the module's device), or ``None``:
            the first training batch of the run.
        loss_fn: ``loss_fn(module, batch)`` returning a scalar loss, or ``None``: the
            module's ``training_step(batch, 0)`` with ``self.log`` silenced.
        iters: Lanczos steps (Hessian-vector products) per estimate, ≥ 1.
        tol: Relative residual below which an estimate counts as converged; a measurement
            that does not converge is logged anyway, with one warning (> 0).
        raw_sharpness: Also estimate the unpreconditioned sharpness of adaptive optimizers
            (doubles their cost; for SGD it is free).
        mode: ``"train"`` (the loss the optimizer descends: dropout with a fixed seed,
            batch statistics) or ``"eval"``.
        seed: Seed of the dropout masks and the Lanczos start vectors (≥ 0).
        prefix: The tag prefix.

    Raises:
        ValueError: for an argument outside its allowed values (the message names it).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        *,
        batch: Any = None,
        loss_fn: LossFn | None = None,
        iters: int = 20,
        tol: float = DEFAULT_TOL,
        raw_sharpness: bool = True,
        mode: str = "train",
        seed: int = 0,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        super().__init__("SharpnessMonitor")
        check_int("every_n_steps", every_n_steps, 1)
        if loss_fn is not None:
            check_callable("loss_fn", loss_fn, "None or a callable loss_fn(module, batch)")
        check_int("iters", iters, 1)
        check_real("tol", tol, low=0.0)
        check_bool("raw_sharpness", raw_sharpness)
        check_choice("mode", mode, MODES)
        check_int("seed", seed, 0)
        check_str("prefix", prefix)
        self.every_n_steps = every_n_steps
        self.batch = batch
        self.loss_fn = loss_fn
        self.iters = iters
        self.tol = tol
        self.raw_sharpness = raw_sharpness
        self.mode = mode
        self.seed = seed
        self.prefix = prefix
        #: The last measurement of each optimizer, by name.
        self.last: dict[str, Curvature] = {}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._names: list[str] = []
        self._counts: list[int] = []
        self._at_batch_start: list[int] = []
        self._hooks: list[Any] = []
        self._fixed: Any = None
        self._has_fixed = False
        self._batches = 0
        self._loaded: dict[str, Any] = {}
        self._warned = False

    @property
    def state_key(self) -> str:
        """Key in the checkpoint's ``callbacks`` dict (monitors with other prefixes coexist)."""
        return self._generate_state_key(prefix=self.prefix)

    # -- lifecycle -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse manual optimization without a ``loss_fn`` (its step would step).

        Raises:
            ValueError: for a module with ``automatic_optimization = False`` and no
                ``loss_fn``.
        """
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise invalid("loss_fn", None, "a callable loss_fn(module, batch) under manual "
                          "optimization (training_step steps the optimizers itself)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count each optimizer's steps (a step post-hook each)."""
        self._detach()
        self._trainer = trainer
        self.faults.call("attach", self._attach, trainer)

    def _attach(self, trainer: pl.Trainer) -> None:
        self._optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        self._names = optimizer_names(self._optimizers)
        n = max(1, len(self._optimizers))
        counts = self._loaded.get("step_counts", {})
        self._counts = [int(counts.get(name, trainer.global_step // n)) for name in self._names]
        self._batches = int(self._loaded.get("batches", trainer.global_step // n))
        self._loaded = {}
        for i, opt in enumerate(self._optimizers):
            self._hooks.append(opt.register_step_post_hook(
                lambda *_, i=i: self._count(i)))

    def _count(self, i: int) -> None:
        self._counts[i] += 1

    def _detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the step hooks, release the fixed batch, close the fault record."""
        self._detach()
        self._fixed, self._has_fixed = None, False
        self._close_fault_record()



    # -- measuring -----------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        """Keep a copy of the first training batch (without a ``batch``); note step counts."""
        self._at_batch_start = list(self._counts)
        if not self._has_fixed and self.batch is None:
            self._fixed = self.faults.call("batch", _clone, batch)
            self._has_fixed = self._fixed is not None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Measure the optimizers whose step index crossed a multiple of ``every_n_steps``."""
        if not self._optimizers or len(self._at_batch_start) != len(self._counts):
            return
        stepped = self._counts != self._at_batch_start
        due = [i for i, (a, b) in enumerate(zip(self._at_batch_start, self._counts,
                                                 strict=True)) if self._crossed(a, b)]
        step = self._batches
        if stepped:
            self._batches += 1
        multi = trainer.world_size > 1 and bool(self._listeners)
        if not due or (self.faults.disabled("measure") and not multi):
            return
        rows = None
        if trainer.is_global_zero:
            rows = self.faults.call("measure", self._measure, pl_module, due)
        if multi:  # every rank publishes rank zero's values: same decisions everywhere
            rows = trainer.strategy.broadcast(rows, src=0)
        if rows is None:
            return
        for i, row in zip(due, rows, strict=True):
            record = StepRecord(optimizer=self._names[i], index=self._counts[i] - 1,
                                rows={GLOBAL: row})
            self._publish(record)
            if trainer.is_global_zero:
                self.faults.call("log", self._log, trainer, record.metrics(self.prefix), step,
                                 subject=record.optimizer)

    def _crossed(self, before: int, after: int) -> bool:
        """Whether a step index in ``[before, after)`` is a multiple of ``every_n_steps``."""
        if after <= before:
            return False
        n = self.every_n_steps
        return -(-before // n) * n < after

    def _batch_on(self, pl_module: pl.LightningModule) -> Any:
        if self.batch is not None and not self._has_fixed:
            self._fixed = move_data_to_device(self.batch, pl_module.device)
            self._has_fixed = True
        if not self._has_fixed:
            raise RuntimeError("no batch to measure on")
        return self._fixed

    def _measure(self, pl_module: pl.LightningModule, due: list[int]) -> list[dict[str, float]]:
        batch = self._batch_on(pl_module)
        loss_fn = self.loss_fn or training_step_loss
        opts = [self._optimizers[i] for i in due]
        with _mode(pl_module, self.mode), _seeded(self.seed, pl_module.device):
            results = measure_curvature(pl_module, loss_fn, batch, opts, iters=self.iters,
                                        tol=self.tol, seed=self.seed, raw=self.raw_sharpness)
        rows = []
        for i, c in zip(due, results, strict=True):
            self.last[self._names[i]] = c
            rows.append(c.row())
            if not c.converged and not self._warned:
                worst = max((e for e in (c.sharpness, c.preconditioned_sharpness)
                             if e is not None and not math.isnan(e.value)),
                            key=lambda e: e.residual, default=None)
                if worst is not None:
                    self._warned = True
                    rank_zero_warn(
                        f"SharpnessMonitor: the curvature of {self._names[i]} did not "
                        f"converge in {self.iters} iterations (relative residual "
                        f"{worst.residual:.2g} > tol={self.tol}); the values are lower "
                        "bounds, raise iters for closer estimates (warned once)")
        return rows

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Each optimizer's step count and the x-axis (the fixed batch is not saved)."""
        counts = dict(zip(self._names, self._counts, strict=True)) if self._names else \
            dict(self._loaded.get("step_counts", {}))
        return {"step_counts": counts, "batches": int(self._loaded.get("batches", self._batches))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (applied when training starts)."""
        self._loaded = {"step_counts": {str(k): int(v) for k, v in
                                        state_dict.get("step_counts", {}).items()},
                        "batches": int(state_dict.get("batches", 0))}
