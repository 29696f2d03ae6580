"""DivergenceGuard on real Trainers: digits scenarios, faults, skip, rollback, resume."""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lr_monitor import DivergenceGuard, StepSizeMonitor
from lr_monitor.alerts import read_events
from tests.lightning_models import DigitsMLP, Faulty, digits_loaders, trainer


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        self.values.append(loss.item())

    def final(self) -> float:
        """Typical training loss at the end: median of the last 50 steps."""
        return statistics.median(self.values[-50:])


def run(tmp_path: Path, make_model: Callable[[], pl.LightningModule],
        guard: DivergenceGuard | None, epochs: int = 7, batch_size: int = 32, seed: int = 0,
        **kwargs: Any) -> tuple[Losses, pl.Trainer]:
    pl.seed_everything(seed, verbose=False)
    # built after seeding: the initial weights do not depend on which tests ran before
    model = make_model()
    train, val = digits_loaders(batch_size=batch_size, seed=seed)
    losses = Losses()
    cbs: list[pl.Callback] = [losses] + ([guard] if guard else []) + kwargs.pop("callbacks", [])
    tr = trainer(tmp_path, max_epochs=epochs, callbacks=cbs, num_sanity_val_steps=0,
                 logger=kwargs.pop("logger", False), **kwargs)
    tr.fit(model, train, val)
    return losses, tr


HEALTHY = {
    "adam-1e-3": lambda: DigitsMLP(lr=1e-3, hidden=256),
    "adam-3e-3-small-net": lambda: DigitsMLP(lr=3e-3, hidden=32),
    "sgd-momentum-0.01": lambda: DigitsMLP(lr=0.01, hidden=128, optimizer="sgd"),
}


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred"])
def test_cuts_go_on_until_the_run_is_healthy(tmp_path: Path, deferred: bool) -> None:
    """Adam at lr 100 (10^5 x the tuned LR): one cut is not enough, nor are three.

    Certain on any CPU: at every LR from 0.1 up, Adam's first step from these weights
    multiplies the loss by more than 10 (at 0.1 by > 18; ``test_too_high_lr_...``), and at
    0.01 it trains. So each rollback-and-cut is followed by another until the LR is 0.01:
    exactly four, all within the first dozen steps; then the run trains.
    """
    guard = DivergenceGuard(jsonl=False, deferred=deferred)
    _, tr = run(tmp_path, lambda: DigitsMLP(lr=100.0, hidden=256), guard, epochs=3)
    acted = [e for e in guard.events if e.actions]
    assert [e.kind for e in acted] == ["divergence"] * 4, [e.summary() for e in acted]
    assert all("rollback" in e.actions and "cut_lr" in e.actions for e in acted)
    assert acted[-1].step < 12
    assert guard.lr_scale == pytest.approx(1e-4)
    assert float(tr.callback_metrics["val/acc"]) > 0.85


@pytest.mark.parametrize("name", list(HEALTHY))
@pytest.mark.parametrize("batch_size", [32, 8], ids=["b32", "b8-noisy"])
def test_no_event_on_healthy_runs(tmp_path: Path, name: str, batch_size: int) -> None:
    guard = DivergenceGuard(jsonl=False)
    losses, _ = run(tmp_path, HEALTHY[name], guard, epochs=5 if batch_size == 32 else 2,
                    batch_size=batch_size)
    assert guard.events == [], [e.summary() for e in guard.events]
    assert guard.lr_scale == 1.0
    assert losses.final() < 0.5


RECOVERY_SEEDS = range(5)


@pytest.mark.parametrize("lr", [0.1, 1.0], ids=["lr0.1", "lr1.0"])
def test_too_high_lr_is_caught_and_recovered(tmp_path: Path, lr: float) -> None:
    accuracies: list[float] = []
    recovered: list[bool] = []
    for seed in RECOVERY_SEEDS:
        def make() -> DigitsMLP:
            return DigitsMLP(lr=lr, hidden=256)

        unguarded, _ = run(tmp_path / f"u{seed}", make, None, seed=seed)
        blowup = next(i for i, v in enumerate(unguarded.values) if v > 10 * unguarded.values[0])
        guard = DivergenceGuard(jsonl=False)
        guarded, tr = run(tmp_path / f"g{seed}", make, guard, seed=seed)
        # Certain for every seed: Adam's first step at this LR multiplies the loss by > 18
        # (lr 0.1) or > 1e4 (lr 1.0), against the 10x that counts as a blow-up, and the two
        # runs are the same run (same seed, same initial weights) up to the first event.
        assert guard.events, f"seed {seed}: nothing detected"
        first = guard.events[0]
        assert first.step - blowup <= 3, seed  # within a few steps of the blow-up
        assert "rollback" in first.actions and "cut_lr" in first.actions, seed
        assert guard.lr_scale < 1.0
        # Where training goes after the rollback is chaotic (it depends on the CPU's
        # kernels), so recovery is judged over seeds, each with a clear margin: recovered
        # runs end at loss 0.01-0.3 and val/acc 0.92-0.98, unguarded ones above 1.6 and
        # below 0.35. (At lr 1.0 seed 1 is not recovered on any CPU: the loss after the
        # first cut peaks at 0.92x the explosion bound, so the LR is never cut again.)
        acc = float(tr.callback_metrics["val/acc"])
        accuracies.append(acc)
        recovered.append(guarded.final() < 0.25 * unguarded.final() and acc > 0.85)
    assert sum(recovered) >= len(recovered) - 1, (recovered, accuracies)
    assert statistics.median(accuracies) > 0.9, accuracies


def test_nan_loss_rolls_back_to_the_snapshot(tmp_path: Path) -> None:
    start: dict[str, torch.Tensor] = {}

    class Check(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            start.update({k: v.clone() for k, v in pl_module.state_dict().items()})

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *a: Any) -> None:
            if trainer.global_step - 1 == 7:  # the NaN step: rolled back to step 0, not applied
                for k, v in pl_module.state_dict().items():
                    assert torch.equal(v, start[k]), k

    guard = DivergenceGuard(jsonl=False, snapshot_every_n_steps=50)
    _, tr = run(tmp_path, lambda: Faulty(nan_at=(7,), lr=1e-3, hidden=64), guard, epochs=1,
                callbacks=[Check()])
    assert [(e.step, e.kind, e.actions) for e in guard.events] == [
        (7, "nonfinite", ("rollback", "cut_lr"))]
    assert all(torch.isfinite(p).all() for p in tr.lightning_module.parameters())


def test_skip_leaves_parameters_and_moments_bit_identical(tmp_path: Path) -> None:
    saved: dict[str, Any] = {}

    class Check(pl.Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if trainer.global_step == 30:
                saved["params"] = [p.detach().clone() for p in pl_module.parameters()]
                saved["state"] = {k: {n: t.clone() for n, t in s.items()}
                                  for k, s in optimizer.state.items()}

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *a: Any) -> None:
            if trainer.global_step - 1 == 30:
                opt = trainer.optimizers[0]
                for p, q in zip(pl_module.parameters(), saved["params"], strict=True):
                    assert torch.equal(p, q)
                for k, s in opt.state.items():
                    for n, t in s.items():
                        assert torch.equal(t, saved["state"][k][n]), n

    # a bad batch, 50x loss and gradient: a spike of both, or an explosion; either skips
    guard = DivergenceGuard(jsonl=False, on_divergence="skip")
    run(tmp_path, lambda: Faulty(scale_at=(30,), scale=50.0, lr=1e-3, hidden=64), guard,
        epochs=1, callbacks=[Check()])  # Check runs after the guard: it sees the dropped gradients
    assert [(e.step, e.actions) for e in guard.events] == [(30, ("skip",))]


def test_events_reach_the_logger_jsonl_and_text(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="g")
    guard = DivergenceGuard()
    run(tmp_path, lambda: Faulty(nan_at=(5,), lr=1e-3, hidden=64), guard, epochs=1,
        logger=logger, callbacks=[StepSizeMonitor(10)])
    log_dir = Path(logger.log_dir)
    events = read_events(log_dir / "events.jsonl")
    assert [e.step for e in events] == [5]
    assert events[0].run == "g/version_0"
    raw = json.loads((log_dir / "events.jsonl").read_text().splitlines()[0])
    assert raw["value"] == "nan" and raw["actions"] == ["rollback", "cut_lr"]
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scale = {e.step: e.value for e in acc.Scalars("guard/lr_scale")}
    assert scale[5] == pytest.approx(0.1)
    assert {e.step: e.value for e in acc.Scalars("guard/events")}[5] == 1
    assert any("guard" in t for t in acc.Tags()["tensors"])  # the Text tab entry


def test_cut_survives_the_scheduler_in_a_real_run(tmp_path: Path) -> None:
    class Sched(Faulty):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            s = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}

    guard = DivergenceGuard(jsonl=False)
    _, tr = run(tmp_path, lambda: Sched(nan_at=(12,), hidden=64), guard, epochs=1)
    steps = tr.global_step
    expected = 1e-2 * 0.5 ** (steps // 10) * 0.1
    assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr_factor": 1.5}, "factor=1.5"),
    ({"lr_factor": 0}, "factor=0"),
    ({"on_spike": "explode"}, "on_spike='explode'"),
    ({"escalate": "rollback"}, "escalate='rollback'"),
    ({"snapshot_every_n_steps": 0}, "every_n_steps=0"),
    ({"spike_window": -3}, "window=-3"),
    ({"divergence_patience": 0}, "divergence_patience=0"),
    ({"explosion_factor": 0.5}, "explosion_factor=0.5"),
    ({"max_cuts": 0}, "max_cuts=0"),
    ({"cooldown": -1}, "cooldown=-1"),
    ({"spike_threshold": 0}, "spike_threshold=0"),
    ({"amp_patience": 0}, "amp_patience=0"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_configuration_is_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DivergenceGuard(**kwargs)


def test_resume_makes_the_same_decisions(tmp_path: Path) -> None:
    def model() -> Faulty:
        return Faulty(nan_at=(60,), scale_at=(70,), lr=0.1, hidden=64)

    straight = DivergenceGuard(jsonl=False)
    run(tmp_path / "a", model, straight, epochs=2)

    first = DivergenceGuard(jsonl=False)
    _, tr = run(tmp_path / "b", model, first, epochs=1)
    ckpt = tmp_path / "b.ckpt"
    tr.save_checkpoint(ckpt)
    resumed = DivergenceGuard(jsonl=False)
    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    tr2 = trainer(tmp_path / "b", max_epochs=2, callbacks=[resumed], num_sanity_val_steps=0,
                  logger=False)
    tr2.fit(model(), train, val, ckpt_path=str(ckpt))

    def key(e: Any) -> tuple[Any, ...]:
        return (e.step, e.kind, e.signal, e.actions, e.lr_scale)

    assert [key(e) for e in resumed.events] == [key(e) for e in straight.events]
    assert any(e.step >= 45 for e in straight.events)  # decisions after the resume point
    assert resumed.lr_scale == straight.lr_scale
    assert math.isclose(tr2.optimizers[0].param_groups[0]["lr"], 0.1 * straight.lr_scale)


def test_fp16_grad_scaler_loss_is_unscaled_and_overflows_are_left_to_it(tmp_path: Path) -> None:
    from pytorch_lightning.plugins.precision import MixedPrecision

    seen: list[float] = []

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = DivergenceGuard(jsonl=False, amp_patience=3)
    detect = guard.bank.detect

    def spy(index: int, step: int, values: Any) -> Any:
        if "loss" in values:
            seen.append(values["loss"])
        return detect(index, step, values)

    guard.bank.detect = spy  # type: ignore[method-assign]
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    # two isolated overflows (the scaler's business) and then a run of NaN losses (ours)
    run(tmp_path, lambda: Faulty(nan_at=(5, 9, 20, 21, 22, 23), lr=1e-3, hidden=64), guard,
        epochs=1, plugins=[plugin])
    assert 1.5 < seen[0] < 3.5  # the unscaled cross-entropy at chance level (~2.3), not 2.3e3
    assert [(e.step, e.kind) for e in guard.events] == [(22, "nonfinite")]


def test_no_event_on_a_small_batch_regression(tmp_path: Path) -> None:
    """Batch 8 on a noise-only regression: single batch losses reach 4x the first one.

    This is the run that keeps ``explosion_factor`` at 10 (4 fires here at step 1).
    """
    from torch.utils.data import DataLoader, TensorDataset

    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 4, generator=g),
                                    torch.randn(64, 1, generator=g)), batch_size=8)
    guard = DivergenceGuard(jsonl=False)
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, max_epochs=5, callbacks=[guard], logger=False)
    tr.fit(Linear(), data)
    assert guard.events == [], [e.summary() for e in guard.events]


def test_recorded_statistics_reach_the_guard_without_log_global(tmp_path: Path) -> None:
    """The guard subscribes to the monitor; a record-only decision has no actions."""
    from tests.lightning_models import Regressor, regression_loader

    monitor = StepSizeMonitor(1, log_global=False)
    guard = DivergenceGuard(jsonl=False, on_update_ratio="log", on_divergence="log",
                            on_spike="log", on_nonfinite="log")
    tr = trainer(tmp_path, max_steps=8, callbacks=[monitor, guard], logger=False)
    tr.fit(Regressor(lambda m: torch.optim.Adam(m.parameters(), lr=1.0)), regression_loader())
    ratio = [e for e in guard.events if e.kind == "update_ratio"]
    assert ratio, [e.summary() for e in guard.events]
    # recorded at step 2 (the third too-large update), acted on at the next step
    assert ratio[0].step == 2 and ratio[0].actions == ()
    assert guard.lr_scale == 1.0
    assert len(monitor._listeners) == 0  # unsubscribed at teardown


@pytest.mark.integration
def test_an_event_storm_keeps_the_guard_bounded(tmp_path: Path) -> None:
    """A NaN loss at every step, only recorded: 2,100 events, at most 2,000 in memory."""
    from torch.utils.data import DataLoader

    class AlwaysNaN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return (self.w * batch).sum() * float("nan")

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    steps = 2100
    guard = DivergenceGuard(on_nonfinite="log", jsonl=False, log_events=False,
                            watch_grad_norm=False)
    tr = trainer(tmp_path, max_steps=steps, logger=False, callbacks=[guard])
    tr.fit(AlwaysNaN(), DataLoader(torch.ones(steps, 1), batch_size=1))
    assert guard.event_total == steps and guard.event_counts == {"nonfinite": steps}
    assert 1000 <= len(guard.events) <= 2000
    assert guard.events[-1].step == steps - 1  # the most recent ones are kept
    state = guard.state_dict()
    assert len(state["events"]) == 1000 and state["event_counts"] == {"nonfinite": steps}
    resumed = DivergenceGuard()
    resumed.load_state_dict(state)
    assert resumed.event_total == steps


def test_a_rule_that_needs_a_monitor_warns_when_there_is_none(tmp_path: Path) -> None:
    """``on_oscillation="stop"`` without a StepSizeMonitor would never fire: the guard says
    so at setup, naming the argument; with a monitor, or at the default, it says nothing."""
    train, _ = digits_loaders(32, 0)
    guard = DivergenceGuard(jsonl=False, log_events=False, on_oscillation="stop")
    with pytest.warns(UserWarning, match=r"on_oscillation='stop' has no effect: it needs a "
                                         r"StepSizeMonitor"):
        trainer(tmp_path, max_steps=2, logger=False, callbacks=[guard]).fit(DigitsMLP(), train)
    for callbacks in ([DivergenceGuard(jsonl=False, log_events=False)],
                      [StepSizeMonitor(), DivergenceGuard(jsonl=False, log_events=False,
                                                          on_oscillation="stop")]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path, max_steps=2, logger=False, callbacks=callbacks).fit(
                DigitsMLP(), train)
        assert not [w for w in caught if "has no effect" in str(w.message)]
