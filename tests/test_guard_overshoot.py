"""The guard's overshoot rules on a real Trainer: a run that overshoots without exploding.

The construction (certain on any machine, float64, no randomness): 8 coordinates, each
with the pseudo-Huber loss ``L_c(θ) = √(1 + (θ − c)²) − 1`` of two alternating one-sample
batches ``c = +1, −1``, trained by plain gradient descent at lr 10. The gradient is bounded
(|L'| < 1), so nothing explodes; instead every step jumps from one side of its batch's
minimum far to the other, to a *stable* period-2 orbit (θ ≈ ±4.84, the two-step map
contracts by ~0.7): each step raises the loss of the very batch it was computed from
(ρ ≈ −0.21 on every step), while the loss neither falls nor rises (≈ 2.97 for ever) — no
NaN, no spike, no divergence, no explosion. Started on the orbit, nothing but the overshoot
signals can tell. After one cut to lr 1 (ηL'' ≤ 1 < 2) the loss falls to ≈ 0.4.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lr_monitor import DivergenceGuard, StepQualityMonitor, StepSizeMonitor
from lr_monitor.guard.bank import TREND_SPAN
from tests.lightning_models import HostReads, trainer

START = 4.84  # on the orbit of lr 10: no transient the loss rules could see


class PseudoHuber(pl.LightningModule):
    """θ ∈ R⁸ in float64; the batch is the centre ``c`` of the loss."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.full((8,), START, dtype=torch.float64))
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = (torch.sqrt(1 + (self.theta - batch[0]) ** 2) - 1).sum()
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def alternating(steps: int) -> DataLoader:
    centres = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(steps)],
                           dtype=torch.float64)
    return DataLoader(centres, batch_size=1, shuffle=False)


def fit(tmp_path: Any, lr: float, callbacks: list[Any], steps: int = 200) -> PseudoHuber:
    module = PseudoHuber(lr)
    trainer(tmp_path, max_steps=steps, logger=False, callbacks=callbacks).fit(
        module, alternating(steps))
    return module


@pytest.mark.integration
def test_a_run_stuck_overshooting_is_cut_once_and_then_falls(tmp_path: Any) -> None:
    guard = DivergenceGuard(jsonl=False)
    module = fit(tmp_path, 10.0, [StepQualityMonitor(5), guard])
    # unguarded it would sit at ~2.97 per coordinate for ever (checked below)
    assert [(e.kind, e.signal, e.actions) for e in guard.events] == [
        ("overshoot", "step_quality", ("cut_lr",))]
    event = guard.events[0]
    # the first measurement whose span has a span of TREND_SPAN steps before it
    assert TREND_SPAN <= event.step <= TREND_SPAN + 15
    assert event.value < 0 and "the steps overshoot" in event.message
    assert event.lr_after == {"SGD/pg0": pytest.approx(1.0)}
    orbit = 8 * 2.9666
    assert module.losses[event.step - 1] == pytest.approx(orbit, rel=0.02)
    assert max(module.losses[-20:]) < 0.3 * orbit  # falls once the steps fit


@pytest.mark.integration
def test_the_same_run_without_the_signal_or_at_a_sound_lr_is_left_alone(tmp_path: Any) -> None:
    blind = DivergenceGuard(jsonl=False)  # no StepQualityMonitor: nothing to see
    module = fit(tmp_path / "blind", 10.0, [blind])
    assert blind.events == []
    assert module.losses[-1] == pytest.approx(8 * 2.9666, rel=0.02)  # stuck for ever
    sound = DivergenceGuard(jsonl=False)
    fit(tmp_path / "sound", 1.0, [StepQualityMonitor(5), sound])
    assert sound.events == []


@pytest.mark.integration
def test_the_g_dot_delta_rule_is_opt_in_and_wants_a_rising_loss(tmp_path: Any) -> None:
    rules = ("overshoot_frac",)
    guard = DivergenceGuard(jsonl=False, overshoot_rules=rules, on_update_ratio="log",
                            on_oscillation="log")  # (these see it too: update_ratio ≈ 2)
    monitor = StepSizeMonitor(5, consecutive=True, custom_scalars=False)
    fit(tmp_path, 10.0, [monitor, guard])
    # every new gradient points back along the last step (overshoot_frac = 1), but the
    # loss is flat, not rising: the opt-in rule does not act
    assert [e for e in guard.events if e.kind == "overshoot" or e.actions] == []
    assert guard.detectors["overshoot/overshoot_frac"].state_dict()["values"][-1] == 1.0


@pytest.mark.integration
def test_the_rules_add_no_host_read(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = []
    for rules in ((), ("step_quality", "overshoot_frac", "stability_ratio")):
        with monkeypatch.context() as patch:
            reads = HostReads(patch)
            monitors = [StepQualityMonitor(5), StepSizeMonitor(5, consecutive=True)]
            fit(tmp_path / str(len(rules)), 10.0,
                [reads, *monitors, DivergenceGuard(jsonl=False, overshoot_rules=rules)],
                steps=80)
            counts.append(reads.per_step(80))
    assert counts[0] == counts[1]  # the overshoot rules read only the published records
