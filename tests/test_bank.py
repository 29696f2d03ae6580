"""DetectorBank (per-optimizer detectors, rounds, recorded statistics, state) and StepSignals."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from lr_monitor.guard.bank import OVERSHOOT_RULES, TREND_SPAN, DetectorBank
from lr_monitor.guard.detectors import DivergenceDetector
from lr_monitor.guard.signals import GRAD_NORM, LOSS, StepSignals, loss_scale
from lr_monitor.recording.record import StepRecord
from lr_monitor.tags import GLOBAL, STATISTICS

#: The detector names of one stream: the guard's checkpoint format since 0.1 (a state
#: without the later names loads: those detectors start afresh).
NAMES = {"nonfinite/loss", "nonfinite/grad_norm", "explosion/loss", "spike/loss",
         "spike/grad_norm", "divergence/loss", "oscillation/update_cosine",
         "update_ratio/update_ratio", "trend/loss", "overshoot/step_quality",
         "overshoot/stability_ratio", "recovery/loss", "dead/grad_norm"}


def warm(bank: DetectorBank, steps: int = 40, index: int = 0) -> None:
    for t in range(steps):
        assert bank.detect(index, t, {LOSS: 2.0 + 0.01 * (t % 3), GRAD_NORM: 1.0 + 0.01 * (t % 2)}
                           ) == []


def record(**stats: float) -> StepRecord:
    return StepRecord(optimizer="Adam", index=0, rows={GLOBAL: stats, "pg0": {
        k: 1e9 for k in stats}}, groups=("pg0",))


def test_a_stream_has_the_checkpointed_names_and_signals_by_name() -> None:
    stream = DetectorBank().stream(0)
    assert set(stream) == NAMES
    for name, det in stream.items():
        assert name.split("/", 1)[1] == det.signal
    assert all(d.signal in STATISTICS for d in stream.recorded)  # read from a StepRecord
    assert [[d.signal for d in r] for r in stream.rounds] == [
        [LOSS, LOSS, GRAD_NORM], [LOSS], [LOSS, LOSS, GRAD_NORM, LOSS, GRAD_NORM]]


def test_a_nonfinite_value_ends_the_round() -> None:
    bank = DetectorBank()
    warm(bank)
    before = bank.state_dict()[0]["spike/loss"]
    found = bank.detect(0, 40, {LOSS: math.nan, GRAD_NORM: math.inf})
    assert [(d.kind, d.signal) for d in found] == [("nonfinite", LOSS), ("nonfinite", GRAD_NORM)]
    assert bank.state_dict()[0]["spike/loss"] == before  # the later rounds did not run


def test_an_explosion_ends_the_round_and_stays_out_of_the_baselines() -> None:
    bank = DetectorBank()
    warm(bank)
    before = bank.state_dict()[0]
    found = bank.detect(0, 40, {LOSS: 1e4, GRAD_NORM: 1e4})
    assert [(d.kind, d.signal) for d in found] == [("divergence", LOSS)]
    after = bank.state_dict()[0]
    for name in ("spike/loss", "spike/grad_norm", "divergence/loss"):
        assert after[name] == before[name], name


def test_each_detector_reads_its_own_signal_and_a_missing_one_is_left_alone() -> None:
    bank = DetectorBank()
    warm(bank)
    before = bank.state_dict()[0]
    # a second optimizer stepping on the same backward: gradients only, no loss
    found = bank.detect(0, 40, {GRAD_NORM: 500.0})
    assert [(d.kind, d.signal) for d in found] == [("spike", GRAD_NORM)]
    after = bank.state_dict()[0]
    assert after["spike/loss"] == before["spike/loss"]
    assert after["divergence/loss"] == before["divergence/loss"]
    assert after["explosion/loss"] == before["explosion/loss"]
    # the gradient norm not watched: its detectors never run
    assert bank.detect(0, 41, {LOSS: 50.0}) != []
    assert bank.state_dict()[0]["spike/grad_norm"] == after["spike/grad_norm"]


def test_spike_and_divergence_fire_in_the_same_round() -> None:
    losses = [2.3 * 0.9**t for t in range(40)] + [2.3] * 40  # back at the starting level

    def feed(bank: DetectorBank, spike_at: int | None = None) -> list[list[str]]:
        out = []
        for t, v in enumerate(losses):
            g = 100.0 if t == spike_at else 1.0 + 0.01 * (t % 2)
            # a bad batch: loss and gradient both spike (the loss window spans the whole
            # descent, a wide spread in log space: only a huge loss is a spike there, still
            # below the explosion bound of 1e6 x the start)
            x = 1.5e6 if t == spike_at else v
            out.append([f"{d.kind}/{d.signal}" for d in bank.detect(0, t, {LOSS: x, GRAD_NORM: g})])
        return out

    plain = feed(DetectorBank(explosion_factor=1e6))
    at = next(t for t, hits in enumerate(plain) if "divergence/loss" in hits)
    both = feed(DetectorBank(explosion_factor=1e6), spike_at=at)
    # one round, in the stream's order
    assert both[at] == ["spike/loss", "divergence/loss", "spike/grad_norm"]


def test_spikes_count_in_pairs_when_the_step_has_both_signals() -> None:
    """A bad batch spikes its loss and its gradient; either alone is a healthy run's noise."""
    def fresh() -> DetectorBank:
        bank = DetectorBank(explosion_factor=1e6)
        for t in range(40):
            bank.detect(0, t, {LOSS: 1.0 + 0.01 * (t % 3), GRAD_NORM: 1.0 + 0.01 * (t % 2)})
        return bank

    assert fresh().detect(0, 40, {LOSS: 30.0, GRAD_NORM: 1.0}) == []  # a hard batch
    assert fresh().detect(0, 40, {LOSS: 1.0, GRAD_NORM: 30.0}) == []  # a noisy gradient
    pair = fresh().detect(0, 40, {LOSS: 30.0, GRAD_NORM: 30.0})
    assert [(d.kind, d.signal) for d in pair] == [("spike", LOSS), ("spike", GRAD_NORM)]
    # one signal only (no loss: a second optimizer; no norm: not watched): it counts alone
    assert [d.signal for d in fresh().detect(0, 40, {GRAD_NORM: 30.0})] == [GRAD_NORM]
    assert [d.signal for d in fresh().detect(0, 40, {LOSS: 30.0})] == [LOSS]
    # the tripwires say the same, before the values are known
    bank = fresh()
    trips = bank.tripwires(0, {"spike"})
    assert len(trips) == 1 and set(trips[0].above) == {LOSS, GRAD_NORM}
    assert set(trips[0].at_most) == {LOSS}  # above the explosion bound that rule fires first
    assert [set(c.above) for c in bank.tripwires(0, {"spike"}, signals=(GRAD_NORM,))] == \
        [{GRAD_NORM}]


def test_streams_are_independent_per_optimizer() -> None:
    bank = DetectorBank()
    warm(bank, index=1)
    assert len(bank.streams) == 2
    assert bank.detect(0, 0, {LOSS: 5.0}) == []  # optimizer 0 has its own starting level
    assert bank.detect(1, 40, {LOSS: 500.0})[0].kind == "divergence"


def test_recorded_statistics_are_read_from_the_global_row() -> None:
    bank = DetectorBank()
    hits = [bank.observe(0, t, record(update_ratio=0.5)) for t in range(3)]
    assert [len(h) for h in hits] == [0, 0, 1]
    assert (hits[2][0].kind, hits[2][0].signal, hits[2][0].value) == (
        "update_ratio", "update_ratio", 0.5)
    assert bank.observe(0, 3, record(update_norm=1.0)) == []  # nothing it watches
    cosines = [bank.observe(0, t, record(update_cosine=-0.9)) for t in range(4, 24)]
    assert [(d.kind, d.signal) for h in cosines for d in h] == [("oscillation", "update_cosine")]


def stuck(bank: DetectorBank, start: int, steps: int) -> None:
    """Losses that neither fall nor rise (a run stuck at a bad level)."""
    for t in range(start, start + steps):
        bank.detect(0, t, {LOSS: 2.3 + 0.01 * (t % 2)})


def test_overshoot_rules_fire_on_a_stuck_or_rising_loss_only() -> None:
    bank = DetectorBank(overshoot_rules=list(OVERSHOOT_RULES))
    overshooting = {"step_quality": -0.5, "step_slope": -1.0, "overshoot_frac": 0.9}
    for t in range(100):  # a falling loss: the signals alone do not fire
        bank.detect(0, t, {LOSS: 3.0 - 0.01 * t})
        if t % 5 == 4:
            assert bank.observe(0, t, record(**overshooting)) == []
    stuck(bank, 100, 2 * TREND_SPAN)  # now it neither falls nor rises
    hits = [h for t in range(200, 225, 5) for h in bank.observe(0, t, record(**overshooting))]
    # ρ < 0 needs the loss not to fall; g·Δ > 0 needs it to rise
    assert [(h.kind, h.signal) for h in hits] == [("overshoot", "step_quality")]
    for t in range(225, 300):
        bank.detect(0, t, {LOSS: 2.3 + 0.02 * (t - 224)})
    hits = [h for t in range(300, 315, 5) for h in bank.observe(0, t, record(**overshooting))]
    assert ("overshoot", "overshoot_frac") in [(h.kind, h.signal) for h in hits]


def test_overshoot_rules_are_chosen_by_name() -> None:
    assert "overshoot/overshoot_frac" not in DetectorBank().stream(0)  # opt-in
    only = DetectorBank(overshoot_rules=("overshoot_frac",)).stream(0)
    assert [n for n in only if n.startswith("overshoot/")] == ["overshoot/overshoot_frac"]
    assert not [n for n in DetectorBank(overshoot_rules=()).stream(0)
                if n.startswith("overshoot/")]
    for bad in ("step_quality", ["rho"], [1], None):
        with pytest.raises(ValueError, match=r"overshoot_rules=.* is invalid"):
            DetectorBank(overshoot_rules=bad)  # type: ignore[arg-type]


def test_step_quality_counts_on_descent_steps_only() -> None:
    bank = DetectorBank()
    stuck(bank, 0, 100)
    for t in range(100, 200, 5):  # ρ < 0 on a step that pointed uphill: no overshoot
        bank.detect(0, t, {LOSS: 2.3})
        assert bank.observe(0, t, record(step_quality=-0.5, step_slope=1.0)) == []
        assert bank.observe(0, t, record(step_quality=-0.5)) == []  # slope unknown


def test_stability_ratio_needs_a_rising_loss() -> None:
    bank = DetectorBank()
    stuck(bank, 0, 60)
    assert [bank.observe(0, t, record(stability_ratio=30.0)) for t in (40, 50, 59)] == [
        [], [], []]
    for t in range(60, 90):
        bank.detect(0, t, {LOSS: 2.3 + 0.1 * (t - 59)})
    hits = bank.observe(0, 89, record(stability_ratio=30.0))
    assert [(h.kind, h.signal, h.threshold) for h in hits] == [
        ("overshoot", "stability_ratio", 4.0)]


def test_rebase_forgets_the_overshoot_values_of_the_old_learning_rate() -> None:
    bank = DetectorBank(overshoot_rules=list(OVERSHOOT_RULES))
    stuck(bank, 0, 60)
    for t in (40, 45):
        bank.observe(0, t, record(overshoot_frac=0.9))
    assert bank.stream(0)["overshoot/overshoot_frac"].state_dict()["values"] == [0.9, 0.9]
    bank.rebase()
    assert bank.stream(0)["overshoot/overshoot_frac"].state_dict()["values"] == []


def test_rebase_judges_the_new_regime_and_healthy_sees_the_climb() -> None:
    bank = DetectorBank(divergence_patience=5, explosion_factor=1e6)
    assert bank.healthy()
    for t in range(60):
        bank.detect(0, t, {LOSS: 2.0 / (1 + t)})
    found: list[Any] = []
    t = 60
    while not found:
        found = [d for d in bank.detect(0, t, {LOSS: 2.3}) if d.kind == "divergence"]
        if not found:
            assert not bank.healthy() or t < 62
        t += 1
    assert not bank.healthy()
    bank.rebase()
    assert bank.healthy()
    assert all(not bank.detect(0, s, {LOSS: 2.3}) for s in range(t, t + 50))


def test_state_round_trip_is_plain_json_and_creates_streams() -> None:
    bank = DetectorBank()
    warm(bank)
    warm(bank, index=1)
    bank.observe(1, 40, record(update_ratio=0.5))
    state = json.loads(json.dumps(bank.state_dict()))
    assert [set(s) for s in state] == [NAMES, NAMES]
    fresh = DetectorBank()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == bank.state_dict()
    for t in range(40, 60):
        v = {LOSS: 2.0 if t != 50 else 40.0, GRAD_NORM: 1.0}
        assert fresh.detect(1, t, v) == bank.detect(1, t, v)


def test_unknown_names_in_a_state_are_ignored() -> None:
    bank = DetectorBank()
    bank.load_state_dict([{"retired/loss": {"type": "X"},
                           "divergence/loss": DivergenceDetector(warmup=20).state_dict()}])
    assert set(bank.stream(0)) == NAMES


def test_bank_arguments_are_validated_under_the_guards_names() -> None:
    for kwargs, needle in [({"spike_window": 2}, "spike_window=2"),
                           ({"spike_threshold": 0}, "spike_threshold=0"),
                           ({"explosion_factor": 1.0}, "explosion_factor=1.0"),
                           ({"divergence_patience": 0}, "divergence_patience=0")]:
        with pytest.raises(ValueError, match="is invalid: must be") as info:
            DetectorBank(**kwargs)  # type: ignore[arg-type]
        assert str(info.value).startswith(needle)


# -- StepSignals ---------------------------------------------------------------------------


def test_signals_average_the_micro_batches_and_unscale_the_loss() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    signals = StepSignals()
    signals.add_loss(torch.tensor(2048.0), torch.tensor(1024.0))  # on-device scale
    signals.add_loss(torch.tensor([4096.0]), 1024.0)  # a float scale, a 1-element loss
    assert signals.pending_losses == 2
    w.grad = torch.tensor([3.0, 0.0, 4.0])
    assert signals.collect([w]) == {LOSS: 3.0, GRAD_NORM: 5.0}
    assert signals.pending_losses == 0


def test_signals_make_one_reduce_call_with_everything_in_it() -> None:
    calls: list[torch.Tensor] = []

    def mean_with_a_nan_rank(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.clone())
        return (v + torch.tensor([math.nan, 0.0], dtype=v.dtype)) / 2

    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
    a.grad, b.grad = torch.tensor([1.0, 2.0]), None  # parameters without a gradient skipped
    signals = StepSignals()
    signals.add_loss(torch.tensor(1.0))
    out = signals.collect([a, b], reduce=mean_with_a_nan_rank)
    assert len(calls) == 1 and calls[0].dtype == torch.float64
    assert calls[0].tolist() == pytest.approx([1.0, 5.0])
    assert math.isnan(out[LOSS]) and out[GRAD_NORM] == pytest.approx(math.sqrt(2.5))


def test_signals_without_a_loss_or_a_grad_norm_leave_them_out() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.tensor([math.inf, 0.0])
    assert StepSignals().collect([w]) == {GRAD_NORM: math.inf}
    quiet = StepSignals(watch_grad_norm=False)
    quiet.add_loss(torch.tensor(0.5))
    assert quiet.collect([w]) == {LOSS: 0.5}
    seen: list[torch.Tensor] = []
    assert quiet.collect([w], reduce=lambda v: seen.append(v) or v) == {}
    assert len(seen) == 1  # every rank still joins the all-reduce
    with pytest.raises(ValueError, match=r"^watch_grad_norm=0 is invalid"):
        StepSignals(watch_grad_norm=0)  # type: ignore[arg-type]


def test_loss_scale_of_an_enabled_scaler_only() -> None:
    assert loss_scale(None) is None
    assert loss_scale(torch.amp.GradScaler("cpu", enabled=False)) is None
    scale = loss_scale(torch.amp.GradScaler("cpu", init_scale=8.0))
    assert scale is not None and float(scale) == 8.0


def test_after_a_cut_the_recovery_is_watched_with_the_best_before_the_trouble() -> None:
    bank = DetectorBank(divergence_patience=5)
    for t in range(60):  # a healthy descent to ~0.5, then stuck at chance (2.3)
        bank.detect(0, t, {LOSS: 2.3 * math.exp(-t / 10) + 0.5 if t < 40 else 2.3})
    best = bank.stream(0)["divergence/loss"].best
    bank.after_cut(60, rebase=True)  # the new regime is 2.3; best before it ~0.5
    watch = bank.stream(0)["recovery/loss"].state_dict()
    assert watch["since"] == 60 and watch["best"] == best < 0.7
    assert watch["start"] == pytest.approx(2.3 * math.exp(-2 / 10) + 0.5)  # min of 3
    assert not bank.healthy()  # no snapshot while recovering
    found = [d for t in range(61, 71) for d in bank.detect(0, t, {LOSS: 2.3})]
    assert [(d.kind, d.step) for d in found] == [("divergence", 70)]
    assert "did not resume falling" in found[0].message
    assert bank.healthy()


def test_a_spike_far_below_the_starting_level_is_left_alone() -> None:
    bank = DetectorBank()
    for t in range(200):  # from 2.3 down to ~1e-3 with a little multiplicative noise
        level = max(2.3 * math.exp(-t / 15), 1e-3) * (1 + 0.05 * (t % 3 - 1))
        bank.detect(0, t, {LOSS: level, GRAD_NORM: 1.0 + 0.01 * (t % 2)})
    assert bank.detect(0, 200, {LOSS: 0.05}) == []  # 50x, but 2 % of 2.3
    found = bank.detect(0, 201, {LOSS: 1.0})
    assert [(d.kind, d.signal) for d in found] == [("spike", LOSS)]  # 43 % of the start


def test_a_loss_that_reached_exactly_zero_is_not_spiking_on_rounding_blips() -> None:
    """Issue 15's noise-free regression: once loss and gradient norm are exactly 0, blips
    of 1e-9 are many times the window's median (0) but far below where the run started —
    harmless, never a skip."""
    bank = DetectorBank()
    found = []
    for t in range(3000):
        loss = 0.99**t if t < 2000 else (0.0 if t % 7 else 1e-9)
        grad = 2.0 * 0.99**t if t < 2000 else (0.0 if t % 5 else 1e-9)
        found += bank.detect(0, t, {"loss": loss, "grad_norm": grad})
    assert found == []
