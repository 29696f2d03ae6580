"""DivergenceGuard(deferred=True): no host transfer on a healthy step, same verdicts.

The deferred guard reads each step's signals one step late from a host buffer filled by a
non-blocking copy, and skips a step whose own value trips a skip-type rule on the device.
These tests run it on the CPU (``deferred=True`` forces the accelerator path) and check:

* host reads: 0 on every healthy step (1 per recorded step with a monitor);
* the device skip is the detectors' verdict, step for step (a property test over
  generated loss series, and whole runs against the immediate guard);
* with a fused optimizer, a deferred skip is bit-identical to an immediate one;
* a non-finite gradient never survives a step: skipped exactly (fused) or rolled back at
  the next step (others);
* the last step is judged at the end of training, and a step not yet read when a
  checkpoint is written is judged after the resume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_lightning.callbacks import ModelCheckpoint

from lr_monitor import DivergenceGuard, StepSizeMonitor
from lr_monitor.guard.bank import DetectorBank
from lr_monitor.guard.interventions import clear_device_skip, skip_on_device, skip_step
from lr_monitor.guard.policy import DecisionContext, GuardPolicy
from lr_monitor.guard.signals import GRAD_NORM, LOSS, StagedStep, StepSignals, Tripwire
from tests.lightning_models import HostReads, TwoOptimizers, regression_loader, trainer

MakeOpt = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, MakeOpt] = {
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
    "adagrad_fused": lambda p: torch.optim.Adagrad(p, lr=1e-2, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "sgd_plain": lambda p: torch.optim.SGD(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


class Corrupted(pl.LightningModule):
    """A two-layer regression MLP whose loss is corrupted on chosen steps.

    Args:
        make_opt: Builds the optimizer from the parameters.
        scale_at: Steps whose loss is multiplied by ``scale`` (a spike of loss and gradient).
        nan_at: Steps whose loss becomes NaN.
        shift_at: Steps whose loss is raised by ``shift`` (same gradient, higher level).
    """

    def __init__(self, make_opt: MakeOpt, *, scale_at: tuple[int, ...] = (),
                 nan_at: tuple[int, ...] = (), scale: float = 1e3,
                 shift_at: tuple[int, ...] = (), shift: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 2))
        self.make_opt, self.scale = make_opt, scale
        self.scale_at, self.nan_at = set(scale_at), set(nan_at)
        self.shift_at, self.shift = set(shift_at), shift

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.global_step in self.scale_at:
            loss = loss * self.scale
        if self.global_step in self.nan_at:
            loss = loss * float("nan")
        if self.global_step in self.shift_at:
            loss = loss + self.shift
        return loss

    def configure_optimizers(self) -> Any:
        return self.make_opt(list(self.parameters()))


class Weights(pl.Callback):
    """The flattened weights after every step, and whether each step changed them."""

    def __init__(self) -> None:
        self.after: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           *args: Any) -> None:
        self.after.append(torch.cat([p.detach().reshape(-1).clone()
                                     for p in pl_module.parameters()]))


def _fit(tmp_path: Path, model: pl.LightningModule, *callbacks: pl.Callback,
         steps: int = 40, **kwargs: Any) -> pl.Trainer:
    tr = trainer(tmp_path, max_steps=steps, max_epochs=-1, callbacks=list(callbacks),
                 logger=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "skipped ... but no detector fired"
        warnings.filterwarnings("ignore", message=".*(does not have many workers|"
                                "LeafSpec|GPU available|TPU available|HPU available).*")
        tr.fit(model, regression_loader(n=512, batch_size=16))
    return tr


def _events(guard: DivergenceGuard) -> list[tuple[int, str, str, tuple[str, ...]]]:
    return [(e.step, e.kind, e.signal, e.actions) for e in guard.events]


# -- host reads ---------------------------------------------------------------------------------


def test_healthy_steps_read_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = HostReads(monkeypatch)
    guard = DivergenceGuard(deferred=True, jsonl=False, log_events=False)
    _fit(tmp_path, Corrupted(OPTIMIZERS["adam"]), reads, guard, steps=30)
    assert guard.events == []
    assert reads.per_step(30) == {s: 0 for s in range(30)}


def test_immediate_guard_reads_every_step(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The contrast: judging each step before its update costs one read per step."""
    reads = HostReads(monkeypatch)
    guard = DivergenceGuard(deferred=False, jsonl=False, log_events=False)
    _fit(tmp_path, Corrupted(OPTIMIZERS["adam"]), reads, guard, steps=6)
    assert reads.per_step(6) == {s: 1 for s in range(6)}


def test_with_a_monitor_only_recorded_steps_read(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard takes the monitor's record (already on the host): no read of its own."""
    reads = HostReads(monkeypatch)
    guard = DivergenceGuard(deferred=True, jsonl=False, log_events=False)
    monitor = StepSizeMonitor(5, custom_scalars=False)
    tr = trainer(tmp_path, max_steps=20, callbacks=[reads, monitor, guard])
    tr.fit(Corrupted(OPTIMIZERS["adam"]), regression_loader(n=512, batch_size=16))
    assert reads.per_step(20) == {s: int(s % 5 == 0) for s in range(20)}


def test_a_trigger_costs_no_read_either(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Even the step that trips is skipped on the device and read from the host buffer."""
    reads = HostReads(monkeypatch)
    guard = DivergenceGuard(deferred=True, on_divergence="skip", jsonl=False,
                            log_events=False)
    _fit(tmp_path, Corrupted(OPTIMIZERS["adam"], scale_at=(12,)), reads, guard, steps=20)
    assert _events(guard) == [(12, "divergence", "loss", ("skip",))]
    assert sum(reads.per_step(20).values()) == 0


# -- the device skip is the detectors' verdict ------------------------------------------------


STEP_LOCAL = frozenset({"spike", "divergence"})


def _series() -> st.SearchStrategy[list[tuple[float, float]]]:
    value = st.one_of(st.floats(0.5, 2.0), st.floats(2.0, 1e4),  # ordinary, or a spike
                      st.sampled_from([math.nan, math.inf, 0.0]))
    return st.lists(st.tuples(value, value), min_size=30, max_size=120)


KINDS = [frozenset({"spike", "divergence"}), frozenset({"spike"}), frozenset({"divergence"})]


@settings(max_examples=120, deadline=None)
@given(_series(), st.floats(0.01, 0.5), st.sampled_from(["both", "loss", "grad_norm"]),
       st.sampled_from(KINDS))
def test_tripwires_are_the_detectors_verdict(series: list[tuple[float, float]], decay: float,
                                             which: str, kinds: frozenset[str]) -> None:
    """Fed the values in order, a rule of ``kinds`` fires by the step's values iff it tripped.

    The spike and explosion rules judge a step's values against bounds known beforehand,
    and :meth:`DetectorBank.tripwires` are those bounds (spike bounds no lower than the
    harmless floor, the two spike rules firing together when the step has both signals,
    the rounds kept: non-finite first, the explosion before the spikes): the device's
    verdict and the host's, a step later, agree on every step — whatever kinds skip.
    """
    bank = DetectorBank(spike_window=20)
    signals = (LOSS, GRAD_NORM) if which == "both" else (which,)
    for t, (x, g) in enumerate(series):
        values = {LOSS: x * math.exp(-decay * t / len(series)), GRAD_NORM: g}
        values = {k: v for k, v in values.items() if k in signals}
        trips = bank.tripwires(0, kinds, signals)
        tripped = any(c.holds(values) for c in trips)
        found = bank.detect(0, t, values)
        local = [d for d in found if d.kind in kinds and (
            d.kind == "spike" or "exploded" in d.message)]
        assert bool(local) == tripped, (t, values, trips, found)


def test_skipping_kinds_follow_the_policy() -> None:
    ctx = DecisionContext(step=0)
    assert GuardPolicy().skipping_kinds(ctx) == {"nonfinite", "spike", "divergence"}
    assert GuardPolicy(on_spike="log", on_divergence="cut").skipping_kinds(ctx) == \
        {"nonfinite"}
    # an fp16 GradScaler skips overflows by itself
    assert "nonfinite" not in GuardPolicy().skipping_kinds(DecisionContext(step=0, amp=True))
    # every cut used up: a rollback escalates to stop (skips) or to log (does not)
    spent = DecisionContext(step=0, cuts_left=False)
    assert "divergence" in GuardPolicy().skipping_kinds(spent)
    assert "divergence" not in GuardPolicy(escalate="log").skipping_kinds(spent)


def test_staged_values_match_collect() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    a, b = StepSignals(), StepSignals()
    for s in (a, b):
        w.grad = None
        loss = (w ** 2).sum() * 1.7
        s.add_loss(loss)
        loss.backward()
    staged = b.stage([w], step=0, tripwires=[Tripwire({GRAD_NORM: 1e9})])
    assert staged.read() == (a.collect([w]), False)
    assert StagedStep.from_state_dict(staged.state_dict()).read() == staged.read()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_trips_unless_left_to_the_scaler(bad: float) -> None:
    w = torch.nn.Parameter(torch.ones(3))
    for trips in (True, False):
        s = StepSignals()
        s.add_loss(torch.tensor(bad))
        w.grad = torch.ones(3)
        staged = s.stage([w], step=0, nonfinite_trips=trips)
        values, tripped = staged.read()
        assert tripped is trips and bool(staged.over) is trips
        assert not math.isfinite(values[LOSS])


# -- skipping on the device ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n.endswith("_fused")])
def test_fused_device_skip_is_skip_step(name: str) -> None:
    """found_inf leaves parameters, moments and step counters as skip_step does."""
    def run(skip: Callable[[torch.optim.Optimizer], object]) -> tuple[Any, ...]:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 3))
        opt = OPTIMIZERS[name]([w])
        for t in range(4):
            opt.zero_grad()
            (w.sin() * (t + 1)).sum().backward()
            if t == 2:
                skip(opt)
            opt.step()
            clear_device_skip(opt)
        return w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}

    def on_device(opt: torch.optim.Optimizer) -> None:
        assert skip_on_device(opt, torch.tensor(True))

    w1, s1 = run(skip_step)
    w2, s2 = run(on_device)
    assert torch.equal(w1, w2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_masked_skip_zeroes_every_dtype_and_keeps_a_false_flag() -> None:
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    opt = torch.optim.SGD([a, b], lr=0.1)
    a.grad, b.grad = torch.full((3,), 2.0), torch.full((2,), 3.0, dtype=torch.bfloat16)
    assert not skip_on_device(opt, torch.tensor(False))
    assert a.grad.tolist() == [2.0] * 3 and b.grad.tolist() == [3.0] * 2
    assert not skip_on_device(opt, torch.tensor(True))
    assert a.grad.tolist() == [0.0] * 3 and b.grad.tolist() == [0.0] * 2
    assert not hasattr(opt, "found_inf")


# -- whole runs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adam_fused", "sgd_fused", "adamw_fused"])
def test_deferred_fused_equals_immediate(tmp_path: Path, name: str) -> None:
    """Skips of spikes and explosions: same events, bit-identical weights at every step."""
    runs = {}
    for deferred in (False, True):
        guard = DivergenceGuard(deferred=deferred, on_divergence="skip", spike_window=20,
                                jsonl=False, log_events=False)
        weights = Weights()
        model = Corrupted(OPTIMIZERS[name], scale_at=(25, 31, 32))
        _fit(tmp_path / str(deferred), model, guard, weights, steps=45)
        runs[deferred] = (_events(guard), torch.stack(weights.after))
    events, weights_imm = runs[False]
    assert [e[0] for e in events] == [25, 31, 32]
    assert all(e[3] == ("skip",) for e in events)
    assert runs[True][0] == events
    assert torch.equal(runs[True][1], weights_imm)
    assert torch.equal(weights_imm[24], weights_imm[25])  # the skipped step moved nothing


def test_masked_skip_moves_only_by_momentum(tmp_path: Path) -> None:
    """Plain SGD: a zeroed gradient moves nothing, so the skipped step leaves the weights."""
    guard = DivergenceGuard(deferred=True, on_divergence="skip", jsonl=False,
                            log_events=False)
    weights = Weights()
    _fit(tmp_path, Corrupted(OPTIMIZERS["sgd_plain"], scale_at=(20,)), guard, weights,
         steps=25)
    assert _events(guard) == [(20, "divergence", "loss", ("skip",))]
    assert torch.equal(weights.after[19], weights.after[20])
    assert not torch.equal(weights.after[20], weights.after[21])


@pytest.mark.parametrize("name", ["adam", "adam_fused", "rmsprop"])
def test_default_policy_events_match_immediate(tmp_path: Path, name: str) -> None:
    """Rollback on an explosion: decided on the same step, carried out one step later."""
    found = {}
    for deferred in (False, True):
        guard = DivergenceGuard(deferred=deferred, snapshot_every_n_steps=5, jsonl=False,
                                log_events=False)
        _fit(tmp_path / str(deferred), Corrupted(OPTIMIZERS[name], scale_at=(30,)), guard,
             steps=40)
        found[deferred] = _events(guard)
    assert found[False] == [(30, "divergence", "loss", ("rollback", "cut_lr"))]
    assert found[True] == [(30, "divergence", "loss", ("skip", "rollback", "cut_lr"))]


@pytest.mark.parametrize("name", ["adam", "adam_fused", "sgd_plain"])
def test_nonfinite_never_survives_a_step(tmp_path: Path, name: str) -> None:
    """Fused: skipped on the device. Others: the NaN is applied and rolled back next step."""
    guard = DivergenceGuard(deferred=True, snapshot_every_n_steps=5, jsonl=False,
                            log_events=False)
    weights = Weights()
    _fit(tmp_path, Corrupted(OPTIMIZERS[name], nan_at=(22,)), guard, weights, steps=30)
    finite = [bool(torch.isfinite(w).all()) for w in weights.after]
    if name.endswith("_fused"):
        assert _events(guard) == [(22, "nonfinite", "loss", ("skip", "rollback", "cut_lr"))]
        assert all(finite)
    else:  # no "skip": zeroing a NaN gradient leaves NaN, the rollback undid the step
        assert _events(guard) == [(22, "nonfinite", "loss", ("rollback", "cut_lr"))]
        assert finite[22] is False and all(finite[:22]) and all(finite[23:])


def test_the_last_step_is_judged_at_the_end(tmp_path: Path) -> None:
    guard = DivergenceGuard(deferred=True, on_divergence="skip", jsonl=False,
                            log_events=False)
    _fit(tmp_path, Corrupted(OPTIMIZERS["adam"], scale_at=(24,)), guard, steps=25)
    assert _events(guard) == [(24, "divergence", "loss", ("skip",))]


def test_a_late_history_skip_drops_the_next_update(tmp_path: Path) -> None:
    """A skip asked by a rule of the history comes one step late, and says so."""
    guard = DivergenceGuard(deferred=True, on_divergence="skip", on_spike="log",
                            divergence_patience=3, jsonl=False, log_events=False)
    weights = Weights()
    # the loss raised by 20 from step 30 on (the same gradients): far above twice its best
    # for good, below 4x its starting level (no explosion); spikes are only logged
    model = Corrupted(OPTIMIZERS["sgd_plain"], shift_at=tuple(range(30, 60)), shift=20.0)
    _fit(tmp_path, model, guard, weights, steps=60)
    first = next(e for e in guard.events if e.actions)
    assert first.kind == "divergence" and "exploded" not in first.message
    assert first.actions == ("skip",)
    assert "next update was skipped instead" in first.message
    assert torch.equal(weights.after[first.step], weights.after[first.step + 1])


def test_unread_step_in_a_checkpoint_is_judged_after_resume(tmp_path: Path) -> None:
    """The checkpoint after step 2 holds step 2's signals; the resumed run judges them."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                           save_top_k=-1, save_on_train_epoch_end=False)
    kw: dict[str, Any] = dict(deferred=True, on_divergence="skip", jsonl=False,
                              log_events=False)
    first = DivergenceGuard(**kw)
    tr = trainer(tmp_path, max_steps=3, max_epochs=-1, callbacks=[first, ckpt],
                 enable_checkpointing=True, logger=False)
    tr.fit(Corrupted(OPTIMIZERS["adam"], scale_at=(2,)),
           regression_loader(n=512, batch_size=16))
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    state = torch.load(path, weights_only=False)["callbacks"][first.state_key]
    assert state["staged"]["step"] == 2 and state["staged"]["tripped"] is True
    assert state["events"] == []  # written before step 2 was read
    resumed = DivergenceGuard(**kw)
    tr2 = trainer(tmp_path, max_steps=6, max_epochs=-1, callbacks=[resumed], logger=False)
    tr2.fit(Corrupted(OPTIMIZERS["adam"]), regression_loader(n=512, batch_size=16),
            ckpt_path=str(path))
    assert _events(resumed) == [(2, "divergence", "loss", ("skip",))]


def test_a_resumed_run_has_a_snapshot_before_the_next_trouble(tmp_path: Path) -> None:
    """Resumed right after an event (not yet quiet), a NaN at step 5 reaches the non-fused
    weights a step before it is read: the first state judged clean after the resume was
    kept, so the guard rolls back to it instead of being left with NaN weights."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                           save_top_k=-1, save_on_train_epoch_end=False)
    kw: dict[str, Any] = dict(deferred=True, on_divergence="skip", jsonl=False,
                              log_events=False)
    tr = trainer(tmp_path, max_steps=3, max_epochs=-1, callbacks=[DivergenceGuard(**kw), ckpt],
                 enable_checkpointing=True, logger=False)
    tr.fit(Corrupted(OPTIMIZERS["adam"], scale_at=(2,)),
           regression_loader(n=512, batch_size=16))
    resumed = DivergenceGuard(**kw)
    weights = Weights()
    tr2 = trainer(tmp_path, max_steps=9, max_epochs=-1, callbacks=[resumed, weights],
                  logger=False)
    tr2.fit(Corrupted(OPTIMIZERS["adam"], nan_at=(5,)), regression_loader(n=512, batch_size=16),
            ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert _events(resumed) == [(2, "divergence", "loss", ("skip",)),
                                (5, "nonfinite", "loss", ("rollback", "cut_lr"))]
    assert resumed.snapshots.last_restored is not None
    assert resumed.snapshots.last_restored.step == 4
    assert resumed.stop_reason is None
    assert all(bool(torch.isfinite(w).all()) for w in weights.after[-2:])


def test_a_nonfinite_step_asked_to_be_skipped_is_rolled_back(tmp_path: Path) -> None:
    """on_nonfinite="skip", not fused: the NaN reached the weights a step before it was
    read, and skipping the next update would leave it there; the guard rolls back."""
    guard = DivergenceGuard(deferred=True, on_nonfinite="skip", snapshot_every_n_steps=5,
                            jsonl=False, log_events=False)
    weights = Weights()
    _fit(tmp_path, Corrupted(OPTIMIZERS["adam"], nan_at=(10,)), guard, weights, steps=16)
    assert _events(guard) == [(10, "nonfinite", "loss", ("rollback",))]
    assert all(bool(torch.isfinite(w).all()) for w in weights.after[11:])


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred"])
def test_an_explosion_only_logged_is_not_skipped_as_a_spike(tmp_path: Path,
                                                            deferred: bool) -> None:
    """The explosion rule fires before the spike rules: with on_divergence="log" the blown-up
    step is applied in both read modes, although its loss and gradient also spiked."""
    guard = DivergenceGuard(deferred=deferred, on_divergence="log", spike_window=20,
                            jsonl=False, log_events=False)
    weights = Weights()
    _fit(tmp_path, Corrupted(OPTIMIZERS["adam_fused"], scale_at=(25,)), guard, weights,
         steps=28)
    assert _events(guard) == [(25, "divergence", "loss", ())]
    assert not torch.equal(weights.after[24], weights.after[25])  # the update was applied


class ShiftedTwo(TwoOptimizers):
    """Two optimizers on one backward; from the 41st batch the loss is raised by 20."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        a, b = self.optimizers()
        x, y = batch
        self.calls = getattr(self, "calls", 0) + 1
        loss = torch.nn.functional.mse_loss(self.net(x), y) + (20.0 if self.calls > 40 else 0.0)
        a.zero_grad(); b.zero_grad()  # noqa: E702
        self.manual_backward(loss)
        a.step(); b.step()  # noqa: E702


def test_a_late_skip_drops_the_same_optimizers_next_update(tmp_path: Path) -> None:
    """With two optimizers, a late skip of optimizer 0's step is its own next update."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    class Before(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any,
                                     optimizer: Any) -> None:
            seen[trainer.global_step] = (pl_module.net[0].weight.detach().clone(),
                                         pl_module.net[2].weight.detach().clone())

    guard = DivergenceGuard(deferred=True, on_divergence="skip", on_spike="log",
                            divergence_patience=3, jsonl=False, log_events=False)
    torch.manual_seed(0)
    _fit(tmp_path, ShiftedTwo(), guard, Before(), steps=120)
    first = next(e for e in guard.events if e.actions)
    s = first.step  # optimizer 0's step (global steps alternate between the two)
    assert first.kind == "divergence" and first.actions == ("skip",)
    assert not torch.equal(seen[s + 1][1], seen[s + 2][1])  # optimizer 1 stepped
    assert torch.equal(seen[s + 2][0], seen[s + 3][0])  # optimizer 0's next update dropped
