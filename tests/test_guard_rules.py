"""Guard v2 rules on real Trainers: a network killed at the start, recovery after a cut.

Each scenario is built so that its outcome does not hang on the machine: a ReLU network at
SGD lr 5 dies in its first steps on every seed tried (an absorbing state: no unit ever
switches back on), and the guarded runs are judged with wide margins.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lr_monitor import DivergenceGuard
from tests.lightning_models import digits_loaders, trainer


class DigitsCNN(pl.LightningModule):
    """A small ReLU CNN on the 8×8 digits, plain SGD."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 8, 8)),
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10))
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(tmp_path: Path, seed: int, callbacks: list[Any], steps: int = 250) -> DigitsCNN:
    pl.seed_everything(seed, verbose=False)
    module = DigitsCNN(lr=5.0)
    train, _ = digits_loaders(batch_size=64, seed=seed)
    trainer(tmp_path, max_steps=steps, max_epochs=-1, logger=False,
            callbacks=callbacks).fit(module, train)
    return module


@pytest.mark.integration
@pytest.mark.parametrize("seed", [0, 2])
def test_a_network_killed_at_the_start_is_seen_by_the_dead_rule(tmp_path: Path,
                                                                seed: int) -> None:
    dead = fit(tmp_path / "unguarded", seed, [], steps=120)
    assert max(dead.losses[:20]) < 4 * dead.losses[0]  # no explosion on these seeds ...
    assert statistics.median(dead.losses[-60:]) > 2.2  # ... the net just died: chance level
    # the loss rules of this guard cannot fire (the loss sits at its starting level)
    guard = DivergenceGuard(jsonl=False, explosion_factor=1e6)
    fit(tmp_path / "guarded", seed, [guard], steps=120)
    first = guard.events[0]
    assert (first.kind, first.signal) == ("divergence", "grad_norm")
    assert 99 <= first.step <= 119 and "the network died" in first.message
    assert "rollback" in first.actions


@pytest.mark.integration
@pytest.mark.parametrize("seed", [0, 1])
def test_a_network_killed_at_the_start_is_rolled_back_and_trains(tmp_path: Path,
                                                                 seed: int) -> None:
    guard = DivergenceGuard(jsonl=False)
    alive = fit(tmp_path, seed, [guard])
    first = guard.events[0]
    assert first.step <= 120 and first.kind == "divergence" and "rollback" in first.actions
    assert statistics.median(alive.losses[-50:]) < 0.5  # trains at the cut learning rate


class OneCycleCNN(DigitsCNN):
    """The same CNN under Adam and ``OneCycleLR(max_lr=1)``, stepped every batch."""

    def __init__(self, steps: int) -> None:
        super().__init__(lr=1e-3)
        self.steps = steps

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _accuracy(module: DigitsCNN, seed: int) -> float:
    _, val = digits_loaders(batch_size=64, seed=seed)
    module.eval()
    with torch.no_grad():
        hits = sum(int((module.net(x).argmax(1) == y).sum()) for x, y in val)
    return hits / sum(len(y) for _, y in val)


@pytest.mark.integration
def test_a_one_cycle_peak_that_gives_back_everything_is_rolled_back(tmp_path: Path) -> None:
    """Adam + OneCycleLR(max_lr=1): the loss falls in the warm-up, blows up as the LR
    climbs, and the unguarded run ends near chance; the guard rolls back and cuts (the cut
    scales the schedule's own ``max_lr``) and the run ends trained, on both seeds, read at
    once or one step late."""
    steps = 300
    pl.seed_everything(0, verbose=False)
    unguarded = OneCycleCNN(steps)
    train, _ = digits_loaders(batch_size=64, seed=0)
    trainer(tmp_path / "none", max_steps=steps, max_epochs=-1, logger=False).fit(unguarded, train)
    assert min(unguarded.losses[:60]) < 0.5 and max(unguarded.losses) > 2.0
    assert _accuracy(unguarded, 0) < 0.3
    for seed, deferred in ((0, False), (1, True)):  # seed 1 read one step late
        pl.seed_everything(seed, verbose=False)
        guard = DivergenceGuard(jsonl=False, log_events=False, deferred=deferred)
        guarded = OneCycleCNN(steps)
        train, _ = digits_loaders(batch_size=64, seed=seed)
        trainer(tmp_path / str(seed), max_steps=steps, max_epochs=-1, logger=False,
                callbacks=[guard]).fit(guarded, train)
        first = next(e for e in guard.events if e.actions)
        assert first.kind == "divergence" and first.step < 150
        assert "rollback" in first.actions
        assert _accuracy(guarded, seed) > 0.8
