"""LR cuts that survive schedulers, bit-identical skips and rollbacks."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as S

from lr_monitor.guard.interventions import (
    LRCut,
    RollbackBuffer,
    nonfinite_state,
    reset_state,
    scale_lr,
    skip_step,
)

LRS = (0.1, 0.01)  # two param groups with different learning rates
F = 0.5


def two_group_sgd() -> torch.optim.SGD:
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD(
        [{"params": [a], "lr": LRS[0]}, {"params": [b], "lr": LRS[1]}], lr=LRS[0], momentum=0.9
    )


# Each factory gets the optimizer and the number of scheduler steps the run will take.
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, int], Any]] = {
    "StepLR": lambda o, n: S.StepLR(o, step_size=4, gamma=0.5),
    "MultiStepLR": lambda o, n: S.MultiStepLR(o, milestones=[3, 9, 14], gamma=0.3),
    "ExponentialLR": lambda o, n: S.ExponentialLR(o, gamma=0.93),
    "CosineAnnealingLR": lambda o, n: S.CosineAnnealingLR(o, T_max=12),
    "CosineAnnealingLR-eta_min": lambda o, n: S.CosineAnnealingLR(o, T_max=12, eta_min=2e-3),
    "CosineAnnealingWarmRestarts": lambda o, n: S.CosineAnnealingWarmRestarts(
        o, T_0=4, T_mult=2, eta_min=1e-3
    ),
    "OneCycleLR": lambda o, n: S.OneCycleLR(o, max_lr=[0.2, 0.02], total_steps=n + 1),
    "OneCycleLR-3phase-linear": lambda o, n: S.OneCycleLR(
        o, max_lr=0.1, total_steps=n + 1, three_phase=True, anneal_strategy="linear"
    ),
    "CyclicLR": lambda o, n: S.CyclicLR(
        o, base_lr=[0.01, 0.001], max_lr=[0.1, 0.01], step_size_up=3
    ),
    "CyclicLR-exp_range": lambda o, n: S.CyclicLR(
        o, base_lr=0.01, max_lr=0.1, step_size_up=2, mode="exp_range", gamma=0.9
    ),
    "LambdaLR": lambda o, n: S.LambdaLR(o, [lambda t: 1 / (1 + t), lambda t: 0.9**t]),
    "MultiplicativeLR": lambda o, n: S.MultiplicativeLR(o, lambda t: 0.95),
    "LinearLR": lambda o, n: S.LinearLR(o, start_factor=0.25, total_iters=8),
    "ConstantLR": lambda o, n: S.ConstantLR(o, factor=0.5, total_iters=6),
    "PolynomialLR": lambda o, n: S.PolynomialLR(o, total_iters=n - 2, power=2.0),
    "SequentialLR": lambda o, n: S.SequentialLR(
        o,
        [S.LinearLR(o, start_factor=0.1, total_iters=4), S.CosineAnnealingLR(o, 10, 1e-4)],
        milestones=[4],
    ),
    "ChainedScheduler": lambda o, n: S.ChainedScheduler(
        [S.ExponentialLR(o, gamma=0.97), S.StepLR(o, step_size=3, gamma=0.5)]
    ),
    "ReduceLROnPlateau": lambda o, n: S.ReduceLROnPlateau(
        o, factor=0.3, patience=1, min_lr=[2e-3, 1e-4]
    ),
}

CUT_MODES = {
    "per-step": {"every": 1, "steps": 30, "cut_at": 11},
    "per-epoch": {"every": 4, "steps": 84, "cut_at": 30},  # cut between scheduler steps
}


def run_schedule(
    name: str | Callable[[torch.optim.Optimizer, int], Any],
    every: int,
    steps: int,
    cut_at: int | None,
    cut: Callable[..., Any] | None = None,
) -> tuple[list[list[float]], list[list[float]]]:
    """Group lrs used at each optimizer step, and the scheduler's last lr after each step."""
    opt = two_group_sgd()
    factory = SCHEDULERS[name] if isinstance(name, str) else name
    sched = factory(opt, steps // every)
    used: list[list[float]] = []
    last: list[list[float]] = []
    for t in range(steps):
        if t == cut_at:
            (cut or (lambda o, s: scale_lr(o, s, F)))(opt, sched)
        used.append([float(g["lr"]) for g in opt.param_groups])
        opt.step()  # no grads: a no-op that keeps the scheduler's call-order check quiet
        if (t + 1) % every == 0:
            if isinstance(sched, S.ReduceLROnPlateau):
                sched.step(1.0)  # never improves: reduces every patience + 1 epochs
            else:
                sched.step()
        last.append([float(v) for v in sched.get_last_lr()])
    return used, last


def assert_scaled(ref: list[list[float]], got: list[list[float]], cut_at: int, factor: float):
    for t, (r, g) in enumerate(zip(ref, got, strict=True)):
        expected = [x * factor for x in r] if t >= cut_at else r
        for j, (e, v) in enumerate(zip(expected, g, strict=True)):
            assert math.isclose(v, e, rel_tol=1e-6, abs_tol=1e-12), (t, j, v, e)


@pytest.mark.parametrize("mode", list(CUT_MODES), ids=list(CUT_MODES))
@pytest.mark.parametrize("name", list(SCHEDULERS), ids=list(SCHEDULERS))
def test_cut_survives_scheduler(name: str, mode: str):
    cfg = CUT_MODES[mode]
    ref_used, ref_last = run_schedule(name, cfg["every"], cfg["steps"], cut_at=None)
    assert len({round(v[0], 12) for v in ref_used[cfg["cut_at"] :]}) > 1 or name.startswith(
        ("ReduceLROnPlateau", "ConstantLR", "LinearLR", "PolynomialLR")
    ), "the schedule must move after the cut for the test to mean anything"
    used, last = run_schedule(name, cfg["every"], cfg["steps"], cut_at=cfg["cut_at"])
    assert_scaled(ref_used, used, cfg["cut_at"], F)
    # get_last_lr() is scaled from the cut on as well (recorded after the cut step)
    assert_scaled(ref_last, last, cfg["cut_at"], F)


@pytest.mark.parametrize(
    "name", ["LambdaLR", "OneCycleLR", "CyclicLR", "CosineAnnealingWarmRestarts", "SequentialLR"]
)
def test_naive_cut_does_not_survive(name: str):
    """Control: ``group["lr"] *= f`` alone is undone or distorted by these schedulers.

    (Purely multiplicative ones such as StepLR or ExponentialLR happen to keep it.)
    """

    def naive(opt, sched):
        for g in opt.param_groups:
            g["lr"] *= F

    cfg = CUT_MODES["per-step"]
    ref, _ = run_schedule(name, cfg["every"], cfg["steps"], cut_at=None)
    got, _ = run_schedule(name, cfg["every"], cfg["steps"], cfg["cut_at"], cut=naive)
    with pytest.raises(AssertionError):
        assert_scaled(ref, got, cfg["cut_at"], F)


def test_reduce_on_plateau_floor_is_scaled_too():
    cfg = CUT_MODES["per-step"]
    ref, _ = run_schedule("ReduceLROnPlateau", cfg["every"], cfg["steps"], cut_at=None)
    assert ref[-1] == [2e-3, 1e-4]  # the reference ended on its floors
    got, _ = run_schedule("ReduceLROnPlateau", cfg["every"], cfg["steps"], cfg["cut_at"])
    assert got[-1] == pytest.approx([1e-3, 5e-5])


def test_cut_a_subset_of_groups():
    cfg = CUT_MODES["per-step"]
    ref, _ = run_schedule("LambdaLR", 1, cfg["steps"], cut_at=None)

    def cut_second(opt, sched):
        out = scale_lr([opt], [sched], F, groups=["0/1"])
        assert list(out) == ["0/1"]
        assert out["0/1"][1] == pytest.approx(F * out["0/1"][0])

    got, _ = run_schedule("LambdaLR", 1, cfg["steps"], cfg["cut_at"], cut=cut_second)
    assert_scaled([[r[0]] for r in ref], [[g[0]] for g in got], cfg["cut_at"], 1.0)
    assert_scaled([[r[1]] for r in ref], [[g[1]] for g in got], cfg["cut_at"], F)


def test_shared_eta_min_warns_when_groups_are_cut_differently():
    opt = two_group_sgd()
    sched = S.CosineAnnealingLR(opt, T_max=10, eta_min=1e-3)
    with pytest.warns(UserWarning, match="eta_min"):
        scale_lr(opt, sched, F, groups=[(0, 0)])
    assert sched.eta_min == 1e-3
    sched2 = S.CosineAnnealingLR(two_group_sgd(), T_max=10, eta_min=1e-3)
    scale_lr(sched2.optimizer, sched2, F)  # all groups: scaled, no warning
    assert sched2.eta_min == pytest.approx(5e-4)


def test_min_lr_floors_the_cut_and_the_schedule_stays_proportional():
    def exp09(o: torch.optim.Optimizer, n: int) -> Any:
        return S.ExponentialLR(o, gamma=0.9)

    lr0, lr1 = 0.1 * 0.9**5, 0.01 * 0.9**5  # the lrs at the cut (step 5)

    def cut_with_floor(opt, sched):
        out = scale_lr(opt, sched, 0.1, min_lr=0.004)
        assert out["0/0"] == pytest.approx((lr0, 0.1 * lr0))
        assert out["0/1"] == pytest.approx((lr1, 0.004))

    ref, _ = run_schedule(exp09, 1, 20, cut_at=None)
    got, _ = run_schedule(exp09, 1, 20, cut_at=5, cut=cut_with_floor)
    assert_scaled([[r[0]] for r in ref], [[g[0]] for g in got], 5, 0.1)
    # the floored group got the smaller cut 0.004 / lr1, and keeps following the schedule
    assert_scaled([[r[1]] for r in ref], [[g[1]] for g in got], 5, 0.004 / lr1)
    assert got[-1][1] < 0.004


def test_group_already_below_min_lr_is_left_alone():
    opt = two_group_sgd()
    assert scale_lr(opt, (), F, min_lr=0.05) == {"0/0": (0.1, 0.05), "0/1": (0.01, 0.01)}


def test_tensor_lr_is_scaled_in_place():
    p = torch.nn.Parameter(torch.zeros(2))
    lr = torch.tensor(0.01)
    opt = torch.optim.Adam([p], lr=lr, foreach=False)
    sched = S.StepLR(opt, step_size=2, gamma=0.5)
    ref_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.01))
    ref_sched = S.StepLR(ref_opt, step_size=2, gamma=0.5)
    tensor = opt.param_groups[0]["lr"]
    out = scale_lr(opt, sched, F)
    assert out == {"0/0": (pytest.approx(0.01), pytest.approx(0.005))}
    assert opt.param_groups[0]["lr"] is tensor  # same object: fused/capturable keep working
    for _ in range(5):
        opt.step()
        sched.step()
        ref_opt.step()
        ref_sched.step()
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(
            F * float(ref_opt.param_groups[0]["lr"]), rel=1e-6
        )
    assert opt.param_groups[0]["lr"] is tensor


def test_several_optimizers_and_index_selection():
    opt_a, opt_b = two_group_sgd(), two_group_sgd()
    sa, sb = S.StepLR(opt_a, 3), S.LambdaLR(opt_b, lambda t: 1.0)
    out = scale_lr([opt_a, opt_b], [sa, sb], F, groups=[1])
    assert set(out) == {"1/0", "1/1"}
    assert [g["lr"] for g in opt_a.param_groups] == list(LRS)
    assert [g["lr"] for g in opt_b.param_groups] == [F * x for x in LRS]
    assert sa.base_lrs == list(LRS) and sb.base_lrs == [F * x for x in LRS]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"factor": 0.0}, "factor=0.0"),
        ({"factor": 1.5}, "factor=1.5"),
        ({"factor": math.nan}, "factor=nan"),
        ({"min_lr": -1.0}, "min_lr=-1.0"),
        ({"groups": [5]}, "groups entry 5"),
        ({"groups": [(0, 7)]}, "groups entry (0, 7)"),
        ({"groups": ["x"]}, "groups entry 'x'"),
    ],
    ids=["factor-0", "factor-1.5", "factor-nan", "min_lr-neg", "bad-index", "bad-pair", "bad-str"],
)
def test_scale_lr_bad_arguments(kwargs: dict[str, Any], needle: str):
    with pytest.raises(ValueError, match="invalid") as info:
        scale_lr(two_group_sgd(), (), **{"factor": F, **kwargs})
    assert needle in str(info.value)


def test_scheduler_of_another_optimizer_is_rejected():
    with pytest.raises(ValueError, match="not in optimizers"):
        scale_lr(two_group_sgd(), S.StepLR(two_group_sgd(), 3), F)


@pytest.mark.parametrize("name", ["StepLR", "OneCycleLR", "CyclicLR", "ReduceLROnPlateau"])
def test_resume_from_checkpoint_keeps_the_cut_without_reapplying(name: str):
    n, cut_at, save_at = 24, 6, 13
    ref, _ = run_schedule(name, 1, n, cut_at=cut_at)  # uninterrupted run with a cut
    opt = two_group_sgd()
    sched = SCHEDULERS[name](opt, n)
    policy = LRCut(factor=F)
    used = []
    for t in range(save_at):
        if t == cut_at:
            policy.cut(t, opt, sched)
        used.append([float(g["lr"]) for g in opt.param_groups])
        opt.step()
        sched.step(1.0) if isinstance(sched, S.ReduceLROnPlateau) else sched.step()
    ckpt = copy.deepcopy(
        {"opt": opt.state_dict(), "sched": sched.state_dict(), "cut": policy.state_dict()}
    )
    # fresh objects, as after a process restart: scheduler first, then the state dicts
    opt2 = two_group_sgd()
    sched2 = SCHEDULERS[name](opt2, n)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    policy2 = LRCut(factor=F)
    policy2.load_state_dict(ckpt["cut"])
    assert (policy2.scale, policy2.num_cuts, policy2.last_cut_step) == (F, 1, cut_at)
    for _ in range(save_at, n):
        used.append([float(g["lr"]) for g in opt2.param_groups])
        opt2.step()
        sched2.step(1.0) if isinstance(sched2, S.ReduceLROnPlateau) else sched2.step()
    assert_scaled(ref, used, n, 1.0)  # identical to the uninterrupted run


# ------------------------------------------------------------------------------------------
# LRCut policy
# ------------------------------------------------------------------------------------------


def test_lrcut_cooldown_max_cuts_and_scale():
    opt = two_group_sgd()
    policy = LRCut(factor=0.5, cooldown=5, max_cuts=3)
    assert policy.can_cut(0)
    assert policy.cut(10, opt) == {"0/0": (0.1, 0.05), "0/1": (0.01, 0.005)}
    assert not policy.can_cut(14) and policy.cut(14, opt) is None
    assert opt.param_groups[0]["lr"] == 0.05  # a refused cut changes nothing
    assert policy.cut(15, opt) is not None and policy.cut(20, opt) is not None
    assert (policy.scale, policy.num_cuts, policy.last_cut_step) == (0.125, 3, 20)
    assert not policy.can_cut(1000) and policy.cut(1000, opt) is None
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_lrcut_state_dict_round_trip_does_not_touch_the_optimizer():
    opt = two_group_sgd()
    policy = LRCut(factor=0.3, cooldown=2)
    policy.cut(4, opt)
    state = policy.state_dict()
    fresh_opt = two_group_sgd()
    restored = LRCut(factor=0.3, cooldown=2)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert [g["lr"] for g in fresh_opt.param_groups] == list(LRS)
    assert not restored.can_cut(5) and restored.can_cut(6)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"factor": 1.0}, "factor=1.0"),
        ({"factor": 0}, "factor=0"),
        ({"cooldown": -1}, "cooldown=-1"),
        ({"min_lr": -0.1}, "min_lr=-0.1"),
        ({"max_cuts": 0}, "max_cuts=0"),
    ],
    ids=["factor-1", "factor-0", "cooldown", "min_lr", "max_cuts"],
)
def test_lrcut_bad_arguments(kwargs: dict[str, Any], needle: str):
    with pytest.raises(ValueError, match="invalid") as info:
        LRCut(**kwargs)
    assert needle in str(info.value)


# ------------------------------------------------------------------------------------------
# skip
# ------------------------------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "Adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "SGD-nesterov": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-2),
    "RMSprop-centered-momentum": lambda p: torch.optim.RMSprop(
        p, lr=1e-2, momentum=0.9, centered=True
    ),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, t: int) -> None:
    x, y = batch(t)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-identical comparison of nested state (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{k}]")
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("name", list(OPTIMIZERS), ids=list(OPTIMIZERS))
def test_skip_leaves_params_and_state_bit_identical(name: str):
    model = small_model()
    opt = OPTIMIZERS[name](model.parameters())
    for t in range(3):
        train_step(model, opt, t)
    params = copy.deepcopy(dict(model.named_parameters()))
    state = copy.deepcopy(opt.state_dict())
    x, y = batch(3)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert skip_step(opt) == len(list(model.parameters()))
    opt.step()
    assert all(p.grad is None for p in model.parameters())
    # (BatchNorm running stats did move in the forward pass: skipping is about the step)
    assert_same(params, dict(model.named_parameters()))
    assert_same(state, opt.state_dict())


@pytest.mark.parametrize("name", ["Adam", "SGD-momentum"])
def test_without_skip_the_step_does_change_things(name: str):
    """Control for the test above: the same step without skip_step changes the state."""
    model = small_model()
    opt = OPTIMIZERS[name](model.parameters())
    for t in range(3):
        train_step(model, opt, t)
    state = copy.deepcopy(opt.state_dict())
    train_step(model, opt, 3)
    with pytest.raises(AssertionError):
        assert_same(state, opt.state_dict())


# ------------------------------------------------------------------------------------------
# rollback
# ------------------------------------------------------------------------------------------


def make_run(opt_name: str = "Adam") -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = small_model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    sched = S.OneCycleLR(opt, max_lr=0.05, total_steps=100)
    return model, opt, sched


def advance(model, opt, sched, steps: range) -> None:
    model.train()
    for t in steps:
        train_step(model, opt, t)
        sched.step()


@pytest.mark.parametrize("opt_name", ["Adam", "SGD-momentum", "RMSprop"])
def test_rollback_restores_bit_identical_state(opt_name: str):
    model, opt, sched = make_run(opt_name)
    buf = RollbackBuffer(every_n_steps=5, keep=2)
    advance(model, opt, sched, range(5))
    buf.take(5, model, [opt], [sched])
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    )
    param_ids = [id(p) for p in model.parameters()]
    advance(model, opt, sched, range(5, 12))
    after_first_pass = copy.deepcopy(model.state_dict())
    with pytest.raises(AssertionError):  # things did move
        assert_same(saved["model"], model.state_dict())

    assert buf.restore(model, [opt], [sched]) == 5
    assert_same(saved["model"], model.state_dict())
    assert_same(saved["opt"], opt.state_dict())
    assert_same(saved["sched"], sched.state_dict())
    # in place: same parameter objects, still the ones the optimizer updates
    assert [id(p) for p in model.parameters()] == param_ids
    assert [id(p) for p in opt.param_groups[0]["params"]] == param_ids

    # replaying the same batches reproduces the first pass exactly
    advance(model, opt, sched, range(5, 12))
    assert_same(after_first_pass, model.state_dict())

    # the snapshot stayed pristine (no aliasing with the live objects, which a cut mutates
    # in place): a second restore works too
    scale_lr(opt, sched, 0.5)
    assert buf.restore(model, [opt], [sched]) == 5
    assert_same(saved["model"], model.state_dict())
    assert_same(saved["opt"], opt.state_dict())
    assert_same(saved["sched"], sched.state_dict())


def test_rollback_keep_and_every_n_semantics():
    model, opt, sched = make_run()
    buf = RollbackBuffer(every_n_steps=5, keep=3)
    taken = []
    for t in range(1, 24):
        advance(model, opt, sched, range(t, t + 1))
        if buf.maybe_take(t, model, [opt], [sched]):
            taken.append(t)
    assert taken == [5, 10, 15, 20]
    assert buf.steps == [10, 15, 20] and len(buf) == 3
    assert not buf.due(20) and not buf.due(21) and buf.due(25)
    assert buf.maybe_take(20, model, [opt], [sched]) is False  # no duplicate
    # default: the newest before ``before``, and the newer (suspect) ones are dropped
    assert buf.restore(model, [opt], [sched], before=20) == 15
    assert buf.steps == [10, 15]
    assert buf.restore(model, [opt], [sched], which="oldest") == 10
    assert buf.steps == [10]


def test_rollback_which_and_before():
    model, opt, sched = make_run()
    buf = RollbackBuffer(every_n_steps=1, keep=4)
    for t in range(1, 6):
        advance(model, opt, sched, range(t, t + 1))
        buf.take(t, model, [opt], [sched])
    assert buf.steps == [2, 3, 4, 5]
    assert buf.restore(model, [opt], [sched], which="newest", before=5) == 4
    assert buf.steps == [2, 3, 4]
    assert buf.restore(model, [opt], [sched], which="newest") == 4
    assert buf.restore(model, [opt], [sched], before=3) == 2
    assert buf.steps == [2]
    with pytest.raises(LookupError):
        buf.restore(model, [opt], [sched], before=2)
    buf.clear()
    with pytest.raises(LookupError):
        buf.restore(model)


def test_rollback_memory_accounting():
    model, opt, sched = make_run()
    advance(model, opt, sched, range(3))
    buf = RollbackBuffer(every_n_steps=1, keep=2)
    snap = buf.take(3, model, [opt], [sched])

    def nbytes(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(v) for v in obj)
        return 0

    expected = nbytes(model.state_dict()) + nbytes(opt.state_dict()) + nbytes(sched.state_dict())
    assert snap.nbytes == expected == buf.nbytes
    buf.take(4, model, [opt], [sched])
    buf.take(5, model, [opt], [sched])
    assert buf.nbytes == 2 * expected  # keep=2
    assert all(t.device.type == "cpu" for t in snap.module.values())


def test_rollback_keeps_tensor_lr_object():
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), foreach=False)
    tensor = opt.param_groups[0]["lr"]
    buf = RollbackBuffer(every_n_steps=1)
    train_step(model, opt, 0)
    buf.take(1, model, [opt])
    scale_lr(opt, (), 0.5)
    train_step(model, opt, 1)
    buf.restore(model, [opt])
    assert opt.param_groups[0]["lr"] is tensor
    assert float(tensor) == pytest.approx(0.01)  # the snapshot's lr


def test_rollback_then_reapply_cuts_made_after_the_snapshot():
    model, opt, sched = make_run()
    cut = LRCut(factor=0.5)
    buf = RollbackBuffer(every_n_steps=5, keep=2)
    advance(model, opt, sched, range(5))
    buf.take(5, model, [opt], [sched], extra={"lr_scale": cut.scale})
    lr_at_snapshot = opt.param_groups[0]["lr"]
    cut.cut(6, opt, sched)
    advance(model, opt, sched, range(5, 8))
    buf.restore(model, [opt], [sched])
    assert opt.param_groups[0]["lr"] == lr_at_snapshot  # the later cut was undone
    assert buf.last_restored is not None
    scale_lr(opt, sched, cut.scale / buf.last_restored.extra["lr_scale"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr_at_snapshot)


@pytest.mark.parametrize("opt_name", ["Adam", "SGD-momentum"])
def test_roll_back_restores_weights_and_moments_but_keeps_the_current_lrs(opt_name: str):
    model, opt, sched = make_run(opt_name)
    buf = RollbackBuffer(every_n_steps=5, keep=2)
    advance(model, opt, sched, range(5))
    buf.take(5, model, [opt], extra={"detectors": [{"spike/loss": {"values": [1.0]}}]})
    saved = copy.deepcopy({"model": model.state_dict(), "state": opt.state_dict()["state"]})
    advance(model, opt, sched, range(5, 9))
    cut = LRCut(factor=0.5)
    cut.cut(9, opt, sched)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    sched_state = copy.deepcopy(sched.state_dict())
    x, y = batch(9)
    torch.nn.functional.mse_loss(model(x), y).backward()

    snap = buf.roll_back(model, [opt])
    assert snap.step == 5 and snap.extra == {"detectors": [{"spike/loss": {"values": [1.0]}}]}
    assert_same(saved["model"], model.state_dict())
    assert_same(saved["state"], opt.state_dict()["state"])
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == hyper
    assert_same(sched_state, sched.state_dict())  # the schedule goes on
    assert all(p.grad is None for p in model.parameters())


def test_roll_back_keeps_a_tensor_lr_object_and_its_current_value():
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), foreach=False)
    tensor = opt.param_groups[0]["lr"]
    buf = RollbackBuffer(every_n_steps=1)
    train_step(model, opt, 0)
    buf.take(1, model, [opt])
    scale_lr(opt, (), 0.5)
    train_step(model, opt, 1)
    buf.roll_back(model, [opt])
    assert opt.param_groups[0]["lr"] is tensor
    assert float(tensor) == pytest.approx(0.005)  # the cut made after the snapshot stays


def test_roll_back_of_an_empty_buffer_or_other_objects_raises():
    model, opt, _ = make_run()
    buf = RollbackBuffer()
    with pytest.raises(LookupError):
        buf.roll_back(model, [opt])
    buf.take(0, model, [opt])
    with pytest.raises(ValueError, match="state keys"):
        buf.roll_back(torch.nn.Linear(2, 2), [opt])


def test_rollback_rejects_mismatched_objects():
    model, opt, sched = make_run()
    buf = RollbackBuffer()
    buf.take(0, model, [opt], [sched])
    with pytest.raises(ValueError, match="optimizers"):
        buf.restore(model, [opt, opt], [sched])
    with pytest.raises(ValueError, match="state keys"):
        buf.restore(torch.nn.Linear(2, 2), [opt], [sched])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"keep": 0}, "keep=0"),
        ({"keep": 1.5}, "keep=1.5"),
    ],
    ids=["every_n_steps", "keep-0", "keep-float"],
)
def test_rollback_bad_arguments(kwargs: dict[str, Any], needle: str):
    with pytest.raises(ValueError, match="invalid") as info:
        RollbackBuffer(**kwargs)
    assert needle in str(info.value)


def test_cut_can_ignore_the_cooldown_but_not_max_cuts() -> None:
    import torch

    from lr_monitor.guard.interventions import LRCut

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    policy = LRCut(factor=0.5, cooldown=100, max_cuts=2)
    assert policy.cut(0, opt) is not None
    assert policy.cut(1, opt) is None
    assert policy.cut(1, opt, ignore_cooldown=True) == {"0/0": (0.5, 0.25)}
    assert policy.cut(2, opt, ignore_cooldown=True) is None  # max_cuts reached


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t.clone() for t in model.state_dict().values()] + [
        v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]


def test_a_restore_that_does_not_fit_touches_nothing():
    """After ``add_param_group`` a snapshot from before cannot half-restore: the weights,
    the moments and the buffer all stay as they were, and the error names the mismatch."""
    model, opt, sched = make_run()
    buf = RollbackBuffer(every_n_steps=1, keep=2)
    advance(model, opt, sched, range(3))
    buf.take(3, model, [opt])
    advance(model, opt, sched, range(3, 5))
    extra = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra], "lr": 0.01})
    before = _state_bytes(model, opt)
    with pytest.raises(ValueError, match=r"param groups of \[\d+, 1\] parameters"):
        buf.roll_back(model, [opt])
    after = _state_bytes(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert buf.steps == [3]


def test_the_newest_snapshot_that_fits_is_chosen():
    """A newer snapshot that no longer fits is passed over for an older one that does."""
    model, opt, _ = make_run("SGD-momentum")
    buf = RollbackBuffer(every_n_steps=1, keep=3)
    train_step(model, opt, 0)
    buf.take(1, model, [opt])
    weights = model[0].weight.detach().clone()
    train_step(model, opt, 1)
    buf.take(2, model, [opt])
    # the newest snapshot now describes a different model: it cannot be restored
    buf.snapshots[-1].module["0.weight"] = torch.zeros(9, 4)
    assert "'0.weight' is (8, 4)" in str(buf.fits(buf.snapshots[-1], model, [opt]))
    assert buf.restore(model, [opt]) == 1
    assert torch.equal(model[0].weight, weights)


@pytest.mark.parametrize("where", ["weight", "exp_avg_sq", "exp_avg"])
def test_non_finite_state_is_found_and_never_snapshot(where: str):
    model, opt, _ = make_run()
    buf = RollbackBuffer(every_n_steps=1, keep=2)
    advance(model, opt, S.LambdaLR(opt, lambda t: 1.0), range(2))
    assert nonfinite_state(model, [opt]) == ([], [[]])
    assert buf.take(2, model, [opt]).finite and buf.steps == [2]
    param = model[0].weight
    if where == "weight":
        with torch.no_grad():
            param[0, 0] = float("nan")
    else:
        opt.state[param][where][0, 0] = float("inf")
    weights, state = nonfinite_state(model, [opt])
    assert weights == (["0.weight"] if where == "weight" else [])
    assert [[p is param for p in ps] for ps in state] == [[] if where == "weight" else [True]]
    snap = buf.take(3, model, [opt])
    assert not snap.finite and buf.steps == [2]  # the held one stays, the bad one is not kept
    if where != "weight":
        assert reset_state(opt, [param]) == 1 and param not in opt.state
        assert nonfinite_state(model, [opt]) == ([], [[]])


def test_a_factored_optimizer_state_fits_its_own_snapshot():
    """Adafactor keeps row and column statistics, not shaped like the parameter: a
    snapshot of it fits and restores bit-identically."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adafactor(model.parameters(), lr=0.01)
    buf = RollbackBuffer(every_n_steps=1, keep=2)
    x = torch.randn(8, 4)
    model(x).square().mean().backward()
    opt.step()
    buf.take(1, model, [opt])
    weights = model.weight.detach().clone()
    model(x).square().mean().backward()
    opt.step()
    assert buf.fits(buf.snapshots[0], model, [opt]) is None
    assert buf.roll_back(model, [opt]).step == 1
    assert torch.equal(model.weight, weights)
