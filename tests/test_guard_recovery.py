"""Recovery that cannot wedge: poisoned optimizer state, all-or-nothing rollback, no
skipping forever, and the snapshot a rollback goes back to.

Faults are written into the state at chosen steps by a callback, so every outcome here is
certain on any CPU: a NaN in a moment makes the next update NaN, whatever the kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lr_monitor import DivergenceGuard
from lr_monitor.guard.policy import NONFINITE_STREAK
from tests.lightning_models import DigitsMLP, Faulty, digits_loaders, trainer

pytestmark = pytest.mark.integration


class Poison(pl.Callback):
    """At the end of batch ``at`` (``global_step == at``), write a fault into the state.

    Placed *before* the guard in ``callbacks``, it runs before the guard's snapshot of the
    same step, so a snapshot would take the poison in.
    """

    def __init__(self, at: int, what: str) -> None:
        self.at, self.what, self.done = at, what, False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self.at or self.done:
            return
        self.done = True
        opt = trainer.optimizers[0]
        first = pl_module.net[0].weight
        with torch.no_grad():
            if self.what == "exp_avg_sq":
                opt.state[first]["exp_avg_sq"][0, 0] = float("nan")
            elif self.what == "weights":
                first[0, 0] = float("nan")
            elif self.what == "add_group+exp_avg_sq":
                extra = torch.nn.Parameter(torch.zeros(3))
                pl_module.register_parameter("extra", extra)
                opt.add_param_group({"params": [extra]})
                opt.state[first]["exp_avg_sq"][0, 0] = float("nan")


def _fit(tmp_path: Path, callbacks: list[Any], module: pl.LightningModule | None = None,
         epochs: int = 4) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    module = module if module is not None else DigitsMLP(lr=3e-3)
    train, _ = digits_loaders(32, 0)
    trainer(tmp_path, max_epochs=epochs, logger=False, callbacks=callbacks).fit(module, train)
    return module


def _accuracy(module: pl.LightningModule) -> float:
    _, val = digits_loaders(32, 0)
    with torch.no_grad():
        hits = sum(int((module.net(x).argmax(1) == y).sum()) for x, y in val)
    return hits / sum(len(y) for _, y in val)


def _finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


@pytest.mark.parametrize("deferred", [False, True])
def test_a_poisoned_moment_is_never_snapshot_and_is_rolled_back(tmp_path: Path,
                                                                deferred: bool) -> None:
    """NaN in Adam's ``exp_avg_sq`` just before the step-100 snapshot: that snapshot is not
    kept, the guard reports the poisoned state and rolls back to the newest finite one."""
    guard = DivergenceGuard(jsonl=False, log_events=False, deferred=deferred)
    module = _fit(tmp_path, [Poison(100, "exp_avg_sq"), guard])
    acted = [e for e in guard.events if e.actions]
    assert acted and acted[0].kind == "nonfinite" and "rollback" in acted[0].actions
    assert 100 <= acted[0].step <= 101
    assert guard.snapshots.last_restored is not None
    assert guard.snapshots.last_restored.step == 50  # the newest finite one before step 100
    assert _finite(module) and _accuracy(module) > 0.9


@pytest.mark.parametrize("deferred", [False, True])
def test_a_rollback_goes_to_the_newest_snapshot_before_the_trouble(tmp_path: Path,
                                                                  deferred: bool) -> None:
    """A NaN loss at step 120 (snapshots at 50 and 100): back to 100, not to 50 — going
    back further than the trouble only throws progress away."""
    guard = DivergenceGuard(jsonl=False, log_events=False, deferred=deferred)
    module = _fit(tmp_path, [guard], Faulty(nan_at=(120,), lr=3e-3))
    assert [(e.step, e.kind) for e in guard.events] == [(120, "nonfinite")]
    assert guard.snapshots.last_restored is not None
    assert guard.snapshots.last_restored.step == 100
    assert _finite(module) and _accuracy(module) > 0.9


@pytest.mark.parametrize("deferred", [False, True])
def test_a_skip_that_cannot_cure_non_finite_weights_rolls_back(tmp_path: Path,
                                                              deferred: bool) -> None:
    """``on_nonfinite="skip"`` and a NaN written into a weight: skipping would skip every
    step from then on; the guard sees the weights are non-finite and rolls back (no cut:
    the policy asked for none)."""
    guard = DivergenceGuard(jsonl=False, log_events=False, on_nonfinite="skip",
                            deferred=deferred)
    module = _fit(tmp_path, [Poison(100, "weights"), guard])
    acted = [e for e in guard.events if e.actions]
    assert len(acted) == 1 and acted[0].kind == "nonfinite"
    assert "rollback" in acted[0].actions and "cut_lr" not in acted[0].actions
    assert guard.lr_scale == 1.0
    assert _finite(module) and _accuracy(module) > 0.9


@pytest.mark.parametrize("deferred", [False, True])
def test_after_add_param_group_no_snapshot_fits_and_the_moments_are_reset(
        tmp_path: Path, deferred: bool) -> None:
    """A parameter group added mid-run makes every snapshot unfit: the rollback touches
    nothing (all-or-nothing), and the poisoned moments are reset instead, so the run goes
    on with finite weights."""
    guard = DivergenceGuard(jsonl=False, log_events=False, deferred=deferred)
    module = _fit(tmp_path, [Poison(100, "add_group+exp_avg_sq"), guard])
    acted = [e for e in guard.events if e.actions]
    assert acted and acted[0].kind == "nonfinite"
    assert "reset_state" in acted[0].actions and "rollback" not in acted[0].actions
    assert "no snapshot could be restored" in acted[0].message
    assert "was reset" in acted[0].message
    assert _finite(module) and _accuracy(module) > 0.9


def test_non_finite_batches_that_never_end_stop_the_run(tmp_path: Path) -> None:
    """Every batch NaN from step 30 on and a ``skip`` policy: the guard stops after
    ``NONFINITE_STREAK`` of them in a row instead of skipping to the end of training."""
    guard = DivergenceGuard(jsonl=False, log_events=False, on_nonfinite="skip")
    module = Faulty(nan_at=tuple(range(30, 1000)), lr=3e-3)
    _fit(tmp_path, [guard], module, epochs=10)
    assert guard.stop_reason is not None and "nonfinite" in guard.stop_reason
    last = guard.events[-1]
    assert last.step == 30 + NONFINITE_STREAK - 1 and "stop" in last.actions
    assert all("skip" in e.actions for e in guard.events)
    assert _finite(module)


class MaskedMLP(DigitsMLP):
    """DigitsMLP with a ``-inf`` buffer, as an additive attention mask holds one."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("mask", torch.full((4,), float("-inf")))


@pytest.mark.parametrize("deferred", [False, True])
def test_an_infinite_buffer_is_no_poisoned_state(tmp_path: Path, deferred: bool) -> None:
    """Only parameters and optimizer state are checked: a ``-inf`` mask buffer is a
    healthy model's, and the run trains untouched."""
    guard = DivergenceGuard(jsonl=False, log_events=False, deferred=deferred)
    module = _fit(tmp_path, [guard], MaskedMLP(lr=3e-3), epochs=1)
    assert guard.events == [] and len(guard.snapshots) >= 1
    assert _accuracy(module) > 0.8


def test_a_poisoned_state_under_an_fp16_scaler_is_acted_on_at_once(tmp_path: Path) -> None:
    """The scaler handles overflowing steps, not a NaN moment: the snapshot that finds it
    acts before the next update, as without a scaler."""
    from pytorch_lightning.plugins import MixedPrecision

    guard = DivergenceGuard(jsonl=False, log_events=False, deferred=False)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    pl.seed_everything(0, verbose=False)
    module = DigitsMLP(lr=3e-3)
    train, _ = digits_loaders(32, 0)
    trainer(tmp_path, max_epochs=4, logger=False, plugins=[plugin],
            callbacks=[Poison(100, "exp_avg_sq"), guard]).fit(module, train)
    acted = [e for e in guard.events if e.actions]
    assert acted and (acted[0].step, acted[0].kind, acted[0].signal) == (100, "nonfinite", "state")
    assert "rollback" in acted[0].actions
    assert _finite(module)


class Weights(pl.Callback):
    """The first layer's weights after every batch."""

    def __init__(self) -> None:
        self.after: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after[trainer.global_step] = pl_module.net[0].weight.detach().clone()


def test_a_skip_found_between_steps_is_carried_out_on_the_next_update(tmp_path: Path) -> None:
    """Read every step, the poisoned snapshot is found after step 100's update; with no
    snapshot to restore, the moments are reset and the event says "skip": the next update
    is the one skipped, so the event describes what happened."""
    guard = DivergenceGuard(jsonl=False, log_events=False, deferred=False)
    weights = Weights()
    _fit(tmp_path, [Poison(100, "add_group+exp_avg_sq"), guard, weights])
    acted = [e for e in guard.events if e.actions]
    assert acted[0].step == 100 and "skip" in acted[0].actions
    assert torch.equal(weights.after[100], weights.after[101])  # update 100 was skipped
    assert not torch.equal(weights.after[101], weights.after[102])  # and only that one


def test_a_state_that_keeps_turning_non_finite_is_cut_and_escalates(tmp_path: Path) -> None:
    """``on_nonfinite="skip"`` and a NaN written into a weight every 10 steps: the first
    rollback comes without a cut; as the trouble recurs before the run was healthy long
    enough to snapshot again, the rollbacks cut, and once the cuts are used up the run
    stops instead of rolling back forever."""

    class Again(Poison):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step >= self.at and trainer.global_step % 10 == 0:
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = float("nan")

    guard = DivergenceGuard(jsonl=False, log_events=False, on_nonfinite="skip", max_cuts=2)
    _fit(tmp_path, [Again(60, "weights"), guard])
    acted = [[str(a) for a in e.actions] for e in guard.events if e.actions]
    assert acted[0] == ["rollback"]
    assert acted[1] == ["rollback", "cut_lr"] and acted[2] == ["rollback", "cut_lr"]
    assert acted[3] == ["skip", "stop"] and guard.stop_reason is not None
