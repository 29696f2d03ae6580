"""Oracle tests: lr_monitor.functional against torch's own optimizers.

For every supported optimizer and flag combination, a few real steps are taken on a
small model; after each step the reconstructed update must equal the measured parameter
delta, and ``effective_lr × direction`` must reproduce the adaptive part of the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lr_monitor.functional import (
    SUPPORTED_OPTIMIZERS,
    ParamSnapshot,
    UnsupportedOptimizerError,
    effective_lr,
    last_update,
    optimizer_steps,
)

O = torch.optim  # noqa: E741 - short alias keeps the case table readable


def _fused_ok(cls: type[torch.optim.Optimizer]) -> bool:
    p = torch.nn.Parameter(torch.zeros(2))
    try:
        cls([p], fused=True)  # type: ignore[call-arg]
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


# (id, optimizer class, kwargs for group 0, overrides for group 1, decoupled decay?)
CASES: list[tuple[str, type[torch.optim.Optimizer], dict[str, Any]]] = [
    ("adam", O.Adam, {}),
    ("adam-amsgrad", O.Adam, {"amsgrad": True}),
    ("adam-maximize", O.Adam, {"maximize": True}),
    ("adam-wd-coupled", O.Adam, {"weight_decay": 0.1}),
    ("adam-wd-decoupled", O.Adam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("adam-foreach", O.Adam, {"foreach": True, "amsgrad": True, "weight_decay": 0.05}),
    ("adam-loop", O.Adam, {"foreach": False}),
    ("adam-tensor-lr", O.Adam, {"lr": torch.tensor(0.01), "foreach": False}),
    ("adam-betas-tensor", O.Adam, {"betas": (torch.tensor(0.8), torch.tensor(0.99)),
                                   "foreach": False}),
    ("adamw", O.AdamW, {}),
    ("adamw-amsgrad-maximize", O.AdamW, {"amsgrad": True, "maximize": True}),
    ("adamw-wd0.3-foreach", O.AdamW, {"weight_decay": 0.3, "foreach": True}),
    ("adamw-loop", O.AdamW, {"foreach": False, "weight_decay": 0.1}),
    ("adagrad", O.Adagrad, {}),
    ("adagrad-lr_decay", O.Adagrad, {"lr_decay": 0.05}),
    ("adagrad-wd", O.Adagrad, {"weight_decay": 0.1}),
    ("adagrad-init-acc", O.Adagrad, {"initial_accumulator_value": 0.1, "eps": 1e-6}),
    ("adagrad-maximize-foreach", O.Adagrad, {"maximize": True, "foreach": True,
                                             "weight_decay": 0.01}),
    ("adagrad-loop", O.Adagrad, {"foreach": False, "lr_decay": 0.01}),
    ("rmsprop", O.RMSprop, {}),
    ("rmsprop-centered", O.RMSprop, {"centered": True}),
    ("rmsprop-momentum", O.RMSprop, {"momentum": 0.9}),
    ("rmsprop-centered-momentum-wd", O.RMSprop, {"centered": True, "momentum": 0.5,
                                                 "weight_decay": 0.1}),
    ("rmsprop-wd", O.RMSprop, {"weight_decay": 0.1}),
    ("rmsprop-maximize-foreach", O.RMSprop, {"maximize": True, "foreach": True}),
    ("rmsprop-loop", O.RMSprop, {"foreach": False, "alpha": 0.9}),
    ("adamax", O.Adamax, {}),
    ("adamax-wd-maximize", O.Adamax, {"weight_decay": 0.1, "maximize": True}),
    ("adamax-foreach", O.Adamax, {"foreach": True}),
    ("adamax-loop", O.Adamax, {"foreach": False}),
    ("nadam", O.NAdam, {}),
    ("nadam-wd-coupled", O.NAdam, {"weight_decay": 0.1}),
    ("nadam-wd-decoupled", O.NAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("nadam-momentum_decay", O.NAdam, {"momentum_decay": 0.01, "maximize": True}),
    ("nadam-foreach", O.NAdam, {"foreach": True, "weight_decay": 0.05}),
    ("nadam-loop", O.NAdam, {"foreach": False}),
    ("radam", O.RAdam, {}),
    ("radam-wd-coupled", O.RAdam, {"weight_decay": 0.1}),
    ("radam-wd-decoupled", O.RAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("radam-maximize-foreach", O.RAdam, {"maximize": True, "foreach": True}),
    ("radam-loop", O.RAdam, {"foreach": False}),
    ("adadelta", O.Adadelta, {}),
    ("adadelta-wd", O.Adadelta, {"weight_decay": 0.1}),
    ("adadelta-lr-rho", O.Adadelta, {"lr": 0.5, "rho": 0.5, "eps": 1e-4}),
    ("adadelta-maximize-foreach", O.Adadelta, {"maximize": True, "foreach": True}),
    ("adadelta-loop", O.Adadelta, {"foreach": False, "weight_decay": 0.05}),
    ("adafactor", O.Adafactor, {}),
    ("adafactor-wd", O.Adafactor, {"weight_decay": 0.1}),
    ("adafactor-eps-d", O.Adafactor, {"eps": (1e-20, 1e-2), "d": 2.0, "beta2_decay": -0.5}),
    ("adafactor-maximize-foreach", O.Adafactor, {"maximize": True, "foreach": True}),
    ("adafactor-loop", O.Adafactor, {"foreach": False, "lr": 0.1}),
    ("sgd", O.SGD, {}),
    ("sgd-wd", O.SGD, {"weight_decay": 0.1}),
    ("sgd-momentum", O.SGD, {"momentum": 0.9}),
    ("sgd-momentum-dampening-wd", O.SGD, {"momentum": 0.9, "dampening": 0.5,
                                          "weight_decay": 0.1}),
    ("sgd-nesterov", O.SGD, {"momentum": 0.9, "nesterov": True}),
    ("sgd-nesterov-wd", O.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("sgd-maximize-foreach", O.SGD, {"maximize": True, "foreach": True, "momentum": 0.5}),
    ("sgd-loop", O.SGD, {"foreach": False, "weight_decay": 0.01}),
    ("sgd-tensor-lr", O.SGD, {"lr": torch.tensor(0.05), "momentum": 0.9}),
]
for _cls in (O.Adam, O.AdamW, O.Adagrad, O.SGD):
    if _fused_ok(_cls):
        _extra = {"momentum": 0.9} if _cls is O.SGD else {}
        CASES.append((f"{_cls.__name__.lower()}-fused", _cls, {"fused": True, **_extra}))
        CASES.append((f"{_cls.__name__.lower()}-fused-wd-maximize", _cls,
                      {"fused": True, "weight_decay": 0.1, "maximize": True, **_extra}))

DEFAULT_LR = {O.Adadelta: 1.0, O.Adafactor: 1e-2, O.SGD: 0.05}


def test_every_supported_optimizer_is_covered() -> None:
    covered = {cls for _, cls, _ in CASES}
    assert covered == set(SUPPORTED_OPTIMIZERS)


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).to(dtype)


def _make_opt(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any],
              model: torch.nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    kw = dict(kwargs)
    lr = kw.pop("lr", DEFAULT_LR.get(cls, 1e-2))
    if isinstance(lr, torch.Tensor):
        lr = lr.clone()
        lr1: Any = lr * 3
    else:
        lr1 = lr * 3
    # two groups with different hyper-parameters: the rule must read each group's own.
    groups = [{"params": params[:2], "lr": lr}, {"params": params[2:], "lr": lr1}]
    return cls(groups, **kw)  # type: ignore[arg-type]


def _decoupled_factor(opt: torch.optim.Optimizer, group: dict[str, Any]) -> float:
    """lr·wd when the optimizer applies decoupled decay, else 0."""
    wd = float(group.get("weight_decay", 0.0))
    decoupled = type(opt) in (O.AdamW, O.Adafactor) or group.get("decoupled_weight_decay", False)
    return float(group["lr"]) * wd if decoupled else 0.0


def _coupled_condition(opt: torch.optim.Optimizer, group: dict[str, Any], p: torch.Tensor,
                       eff: torch.Tensor) -> torch.Tensor:
    """1/|1 − wd·∂Δ/∂g'|: how coupled weight decay amplifies rounding of θ_after.

    With coupled decay Δ depends on g' = g + wd·θ_before = g + wd·(θ_after − Δ): solving
    for Δ divides by (1 − wd·s), s = ∂|Δ|/∂g'. When g' nearly cancels (g ≈ −wd·θ) and the
    effective lr is large, θ_after's own rounding (one ulp) is amplified by that factor.
    This is a property of the information available after the step, not of the rule.
    """
    wd = float(group.get("weight_decay", 0.0))
    if wd == 0 or _decoupled_factor(opt, group) or (
            type(opt) in (O.SGD,) and group["momentum"] and not group["nesterov"]) or (
            type(opt) is O.RMSprop and group["momentum"]):
        return torch.ones_like(eff)
    s = eff.abs()
    if type(opt) is O.NAdam:
        st = opt.state[p]
        t = float(st["step"])
        b1 = float(group["betas"][0])
        mu = b1 * (1.0 - 0.5 * 0.96 ** (t * group["momentum_decay"]))
        s = s * (1 - mu) / (1 - float(st["mu_product"]))
    return 1 / (1 - wd * s).abs().clamp(min=1e-3)


def _check_close(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor,
                 rtol: float, what: str) -> None:
    # A measured delta θ_after − θ_before carries rounding of order ulp(θ): allow that,
    # plus rtol of the value itself. `scale` is |θ| times any conditioning factor.
    ulp = torch.finfo(expected.dtype).eps
    tol = rtol * expected.abs() + 4 * ulp * scale + 1e-30
    err = (actual - expected).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{what}: max err {err.max().item():.3g}, worst rel "
        f"{(err / expected.abs().clamp(min=1e-30)).max().item():.3g}"
    )


@pytest.mark.parametrize(("cls", "kwargs"), [(c, k) for _, c, k in CASES],
                         ids=[i for i, _, _ in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_last_update_and_effective_lr_match_torch(cls: type[torch.optim.Optimizer],
                                                  kwargs: dict[str, Any],
                                                  dtype: torch.dtype) -> None:
    if dtype == torch.float64 and kwargs.get("fused"):
        pytest.skip("fused kernels are exercised in float32")
    model = _model(dtype)
    opt = _make_opt(cls, kwargs, model)
    x = torch.randn(16, 6, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = torch.randn(16, 3, dtype=dtype, generator=torch.Generator().manual_seed(2))
    # torch rounds tensor hyper-parameters (lr, betas) in their own dtype (float32 here).
    tensor_hp = any(isinstance(v, torch.Tensor) or (isinstance(v, tuple) and any(
        isinstance(b, torch.Tensor) for b in v)) for v in kwargs.values())
    rtol = 1e-5 if dtype == torch.float32 else (1e-6 if tensor_hp else 1e-10)
    prev_buf: dict[torch.Tensor, torch.Tensor] = {}
    for step in range(8):  # RAdam leaves its un-rectified phase at step 6 (β2 = 0.999)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean() * (1 + step)  # varying gradient scale
        loss.backward()
        before = {p: p.detach().clone() for p in model.parameters()}
        opt.step()
        upd = last_update(opt)
        eff = effective_lr(opt)
        assert set(upd) == set(model.parameters())
        for group, steps in zip(opt.param_groups, optimizer_steps(opt), strict=True):
            c = _decoupled_factor(opt, group)
            for s in steps:
                p = s.param
                delta = p.detach() - before[p]
                scale = torch.maximum(before[p].abs(), p.detach().abs()) * _coupled_condition(
                    opt, group, p, eff[p])
                _check_close(upd[p], delta, scale, rtol, f"step {step} update")
                # eff_lr × direction reproduces the adaptive part of the step.
                adaptive = delta + c * before[p]
                if type(opt) is O.RMSprop and group["momentum"] > 0:
                    buf = opt.state[p]["momentum_buffer"]
                    prev = prev_buf.get(p, torch.zeros_like(buf))
                    adaptive = -float(group["lr"]) * (buf - group["momentum"] * prev)
                    prev_buf[p] = buf.clone()
                _check_close(-(eff[p] * s.direction), adaptive, scale, rtol,
                             f"step {step} eff_lr×direction")
                assert eff[p].shape == p.shape


def test_params_without_grad_or_state_are_left_out() -> None:
    a, b, frozen = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    frozen.requires_grad_(False)
    opt = O.Adam([a, b, frozen], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()  # b has no grad: no state
    assert set(last_update(opt)) == {a}
    b.grad = torch.ones(3)  # b now has a grad but the optimizer never stepped it
    assert set(last_update(opt)) == {a, b} - {b}
    assert frozen not in effective_lr(opt)


def test_nonfinite_state_propagates_instead_of_hiding() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = O.Adam([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), float("inf"), 1.0])
    opt.step()
    upd = last_update(opt)[p]
    assert torch.isfinite(upd[[0, 3]]).all()
    assert not torch.isfinite(upd[[1, 2]]).any()


def test_unknown_optimizer_raises_and_snapshot_measures_it() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = O.Rprop([p], lr=0.01)
    p.grad = torch.tensor([1.0, -1.0, 0.0])
    with pytest.raises(UnsupportedOptimizerError, match="Rprop"):
        last_update(opt)
    snap = ParamSnapshot(opt)
    snap.take()
    before = p.detach().clone()
    opt.step()
    torch.testing.assert_close(snap.updates()[p], p.detach() - before)
    with pytest.raises(RuntimeError, match="take"):
        snap.updates()


def test_subclass_is_not_silently_treated_as_its_parent() -> None:
    class Halved(O.SGD):
        def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad.mul_(0.5)
            super().step(closure)

    p = torch.nn.Parameter(torch.ones(2))
    opt = Halved([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    with pytest.raises(UnsupportedOptimizerError):
        last_update(opt)


def test_differentiable_flag_is_refused() -> None:
    leaf = torch.ones(2, requires_grad=True)
    p = leaf * 1.0  # differentiable optimizers update non-leaf tensors
    p.retain_grad()
    opt = O.Adam([p], lr=0.1, differentiable=True)
    p.grad = torch.ones(2)
    opt.step()
    with pytest.raises(UnsupportedOptimizerError, match="differentiable"):
        last_update(opt)


@pytest.mark.parametrize("cls", [O.Adam, O.SGD, O.RMSprop], ids=lambda c: c.__name__)
def test_complex_parameters(cls: type[torch.optim.Optimizer]) -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    kw: dict[str, Any] = {"momentum": 0.9} if cls is O.SGD else {}
    opt = cls([p], lr=0.01, **kw)
    for _ in range(3):
        p.grad = torch.randn(4, dtype=torch.complex64)
        before = p.detach().clone()
        opt.step()
        torch.testing.assert_close(last_update(opt)[p], p.detach() - before,
                                   rtol=1e-5, atol=1e-6)


def test_kingma_bound_counterexample_is_real() -> None:
    """Kingma & Ba's |Δ| ≤ lr·(1−β1)/√(1−β2) holds for sparse gradients, not for all.

    A gradient history growing towards the present as (β1/β2)^k makes |m|/√v reach the
    Cauchy–Schwarz bound, about 2.3× Kingma & Ba's figure at β = (0.9, 0.999).
    """
    b1, b2, lr = 0.9, 0.999, 1.0
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = O.Adam([p], lr=lr, betas=(b1, b2), eps=1e-300)
    n = 5000
    for k in reversed(range(n)):
        p.grad = torch.tensor([(b1 / b2) ** k], dtype=torch.float64)
        opt.step()
    step = last_update(opt)[p].abs().item()
    assert step > 2.0 * lr * (1 - b1) / math.sqrt(1 - b2)
    assert step <= _cs_bound(lr, b1, b2, n) * (1 + 1e-9)


def _cs_bound(lr: float, b1: float, b2: float, t: int) -> float:
    """Tight bound on |Δ_t| for Adam with ε = 0 (Cauchy–Schwarz on m against v)."""
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    r = b1 * b1 / b2
    geo = t if r == 1 else (1 - r**t) / (1 - r)
    return lr * (1 - b1) / bc1 * math.sqrt(bc2 / (1 - b2)) * math.sqrt(geo)
