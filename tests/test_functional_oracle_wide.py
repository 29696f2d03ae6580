"""Wide oracle: every supported optimizer × every flag × every implementation path.

The combinations are generated (``itertools.product``) from a per-optimizer flag table
crossed with the implementation variants — ``foreach`` off/on, ``fused``, torch's own
default selection as on an accelerator (where it picks ``foreach``), ``differentiable``,
``capturable``, tensor ``lr``/betas/weight decay — and run against torch's own
optimizers on small real models (a dense MLP; for SGD, Adagrad and SparseAdam also
sparse embeddings with repeated and untouched rows), several steps, two param groups with
different learning rates. After every step each reconstructed
:class:`~lr_monitor.functional.ParamStep` must match the same step, measured:

* float64: ``|rule − Δ| ≤ 2·ulp(θ)·κ + 1e-12·|Δ|`` (κ: the coupled weight-decay
  conditioning, 1 without coupled decay);
* float32: ``|rule − Δ| ≤ 2·ulp(θ)·κ + 16·ulp(1)·|Δ|``, the noise floor of a measured
  delta;
* bf16: ``with_applied_update(step, θ_before).update`` equals the measured delta exactly,
  and the intended update matches it to bf16 rounding: ``≤ n·ulp_bf16(θ)·κ + 2⁻⁷·|Δ|``
  with ``n`` the number of times torch rounds θ in the step (1 for most).

``−eff_lr·direction`` must reproduce the adaptive part of the step, ``ParamStep.grad``
the gradient the optimizer saw (``p.grad`` before the step), and nothing may carry
autograd history. Combinations torch itself rejects (an exception raised from inside
torch by the constructor or the first step) are skipped with torch's message; torch bugs
(:data:`TORCH_BUGS`) are checked for being visible instead of matched. The default run
covers every flag combination on every implementation path and every mode/hyper-parameter
kind at the extreme flag combinations; the rest of the product is marked ``slow``.
"""

from __future__ import annotations

import inspect
import itertools
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lr_monitor.functional import (
    SUPPORTED_OPTIMIZERS,
    ParamStep,
    optimizer_steps,
    supports_group,
    with_applied_update,
)

O = torch.optim  # noqa: E741 - short alias keeps the tables readable
TORCH_DIR = Path(torch.__file__).resolve().parent

Options = dict[str, dict[str, Any]]


def _flag(key: str, value: Any = True) -> Options:
    return {"": {}, key: {key: value}}


MAXIMIZE = _flag("maximize")
WD: Options = {"": {}, "wd": {"weight_decay": 0.1}}
WD3: Options = {**WD, "dwd": {"weight_decay": 0.1, "decoupled_weight_decay": True}}

#: Per optimizer, its semantic flags; every combination is run.
FLAGS: dict[type[torch.optim.Optimizer], dict[str, Options]] = {
    O.Adam: {"amsgrad": _flag("amsgrad"), "maximize": MAXIMIZE, "wd": WD3},
    O.AdamW: {"amsgrad": _flag("amsgrad"), "maximize": MAXIMIZE,
              "wd": {"": {}, "wd0.3": {"weight_decay": 0.3}}},
    O.Adagrad: {"maximize": MAXIMIZE, "wd": WD, "lr_decay": _flag("lr_decay", 0.05),
                "init": {"": {}, "init_acc": {"initial_accumulator_value": 0.1, "eps": 1e-6}}},
    O.RMSprop: {"maximize": MAXIMIZE, "wd": WD, "centered": _flag("centered"),
                "momentum": _flag("momentum", 0.9)},
    O.Adamax: {"maximize": MAXIMIZE, "wd": WD},
    O.NAdam: {"maximize": MAXIMIZE, "wd": WD3, "psi": _flag("momentum_decay", 0.01)},
    O.RAdam: {"maximize": MAXIMIZE, "wd": WD3},
    O.Adadelta: {"maximize": MAXIMIZE, "wd": WD,
                 "rho": {"": {}, "rho0.5": {"rho": 0.5, "eps": 1e-4}}},
    O.Adafactor: {"maximize": MAXIMIZE, "wd": WD,
                  "shape": {"": {}, "eps-d": {"eps": (1e-20, 1e-2), "d": 2.0,
                                              "beta2_decay": -0.5}}},
    O.SGD: {"maximize": MAXIMIZE, "wd": WD,
            "momentum": {"": {}, "heavy": {"momentum": 0.9},
                         "damped": {"momentum": 0.9, "dampening": 0.5},
                         "nesterov": {"momentum": 0.9, "nesterov": True}}},
    O.SparseAdam: {"maximize": MAXIMIZE},
}

#: Implementation paths: loop, foreach, fused, and torch's default selection as on an
#: accelerator (foreach/fused None with foreach kernels available, e.g. CUDA).
IMPLS = ("single", "foreach", "fused", "accel-default")
MODES = ("plain", "differentiable", "capturable")
HPS = ("float", "tensor-lr", "tensor-betas", "tensor-wd")
SPARSE_CAPABLE = (O.SGD, O.Adagrad, O.SparseAdam)
DEFAULT_LR = {O.Adadelta: 1.0, O.SGD: 0.05, O.Adagrad: 0.05}
DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any]
    impl: str
    mode: str
    hp: str
    model: str
    core: bool  # in the default run; the rest is marked slow

    @property
    def steps(self) -> int:
        return 7 if self.cls is O.RAdam else 3  # RAdam rectifies from step 6 at β2=0.999


def _signature(cls: type[torch.optim.Optimizer]) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


def _cases() -> list[tuple[str, Case]]:
    """The product of flags × implementation × mode × hyper-parameter kind × model.

    The default run (``core``) has every flag combination on every implementation path
    with float hyper-parameters, and every mode/hyper-parameter kind on every path with
    all flags off and all flags on; the remaining combinations are marked slow.
    """
    out = []
    for cls, dims in FLAGS.items():
        sig = _signature(cls)
        names = list(dims)
        models = ("sparse",) if cls is O.SparseAdam else (
            ("dense", "sparse") if cls in SPARSE_CAPABLE else ("dense",))
        for choice in itertools.product(*(dims[n].items() for n in names)):
            kwargs: dict[str, Any] = {}
            for _, kw in choice:
                kwargs.update(kw)
            flag_id = "-".join(k for k, _ in choice if k) or "defaults"
            extreme = [k for k, _ in choice] in (
                [next(iter(dims[n])) for n in names], [list(dims[n])[-1] for n in names])
            for impl, mode, hp, model in itertools.product(IMPLS, MODES, HPS, models):
                if impl in ("foreach", "accel-default") and "foreach" not in sig:
                    continue
                if impl == "fused" and "fused" not in sig:
                    continue
                if mode != "plain" and mode not in sig:
                    continue
                if hp == "tensor-betas" and "betas" not in sig:
                    continue
                if hp == "tensor-wd" and not kwargs.get("weight_decay"):
                    continue
                core = (mode == "plain" and hp == "float") or extreme
                case = Case(cls, kwargs, impl, mode, hp, model, core)
                out.append((f"{cls.__name__}-{flag_id}-{impl}-{mode}-{hp}-{model}", case))
    return out


CASES = _cases()


def test_every_supported_optimizer_is_covered() -> None:
    assert {c.cls for _, c in CASES} == set(SUPPORTED_OPTIMIZERS)


# ----------------------------------------------------------------------------- models


def _dense_model(dtype: torch.dtype) -> tuple[list[torch.Tensor], Callable[..., torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 6), (5,), (3, 5), (3,)]
    params = [(torch.randn(s, generator=gen) * 0.5).to(dtype) for s in shapes]

    def loss(ps: list[torch.Tensor], step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(16, 6, generator=g).to(dtype)
        y = torch.randn(16, 3, generator=g).to(dtype)
        h = torch.tanh(F.linear(x, ps[0], ps[1]))
        return ((F.linear(h, ps[2], ps[3]) - y) ** 2).mean() * (1 + step)

    return params, loss


def _sparse_model(dtype: torch.dtype) -> tuple[list[torch.Tensor], Callable[..., torch.Tensor]]:
    """Two embeddings (sparse gradients: repeated rows, untouched rows) and a dense head."""
    gen = torch.Generator().manual_seed(0)
    params = [(torch.randn(s, generator=gen) * 0.5).to(dtype)
              for s in [(12, 4), (3, 4), (6, 4), (3,)]]  # E1, W, E2, b

    def loss(ps: list[torch.Tensor], step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + step)
        i1 = torch.randint(0, 8, (10,), generator=g)  # rows 8..11 are never touched
        i2 = torch.randint(0, 6, (10,), generator=g)
        y = torch.randn(10, 3, generator=g).to(dtype)
        h = torch.tanh(F.embedding(i1, ps[0], sparse=True) + F.embedding(i2, ps[2], sparse=True))
        return ((F.linear(h, ps[1], ps[3]) - y) ** 2).mean() * (1 + step)

    return params, loss


# ----------------------------------------------------------------------------- running


def _raised_by_torch(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(TORCH_DIR)


def _hyper(case: Case, diff: bool) -> tuple[Any, Any, dict[str, Any]]:
    """(lr of group 0, lr of group 1, constructor kwargs) for the case's hp variant."""
    kw = dict(case.kwargs)
    lr: Any = DEFAULT_LR.get(case.cls, 1e-2)
    lr1: Any = lr * 3
    if case.hp == "tensor-lr":
        lr = torch.tensor(lr, requires_grad=diff)
        lr1 = torch.tensor(lr1, requires_grad=diff)
    elif case.hp == "tensor-betas":
        kw["betas"] = (torch.tensor(0.9, requires_grad=diff),
                       torch.tensor(0.999, requires_grad=diff))
    elif case.hp == "tensor-wd":
        kw["weight_decay"] = torch.tensor(kw["weight_decay"], requires_grad=diff)
    if case.impl == "single":
        if "foreach" in _signature(case.cls):
            kw["foreach"] = False
    elif case.impl == "foreach":
        kw["foreach"] = True
    elif case.impl == "fused":
        kw["fused"] = True
    if case.mode != "plain":
        kw[case.mode] = True
    return lr, lr1, kw


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if torch.is_complex(t) else t


def _coupled_condition(opt: torch.optim.Optimizer, group: dict[str, Any],
                       s: ParamStep) -> torch.Tensor | float:
    """1/|1 − wd·∂|Δ|/∂g'|: how coupled weight decay amplifies the rounding of θ_after.

    With coupled decay Δ depends on g' = g + wd·(θ_after − Δ); solving for Δ divides by
    (1 − wd·s). A property of the information available after the step, not of a rule.
    """
    wd = float(group.get("weight_decay", 0.0))
    cls = type(opt)
    if wd == 0 or group.get("decoupled_weight_decay") or cls in (O.AdamW, O.Adafactor):
        return 1.0
    if cls not in (O.Adagrad, O.RMSprop, O.NAdam, O.SGD, O.Adadelta):
        return 1.0  # the update depends on g' only through the stored moments
    if (cls is O.RMSprop and group["momentum"]) or (
            cls is O.SGD and group["momentum"] and not group["nesterov"]):
        return 1.0
    sens = s.eff_lr.double().abs()
    if cls is O.NAdam:
        st = opt.state[s.param]
        t = float(st["step"])
        mu = float(group["betas"][0]) * (1.0 - 0.5 * 0.96 ** (t * group["momentum_decay"]))
        sens = sens * (1 - mu) / (1 - float(st["mu_product"]))
    return 1 / (1 - wd * sens).abs().clamp(min=1e-3)


def _decoupled_c(opt: torch.optim.Optimizer, group: dict[str, Any], dtype: torch.dtype) -> float:
    """1 − f with f = 1 − lr·wd the factor decoupled decay multiplies θ by, else 0.

    f as torch multiplies by it: a float32 tensor for a tensor lr, else a Python float
    the kernel rounds to the parameter's dtype.
    """
    wd = group.get("weight_decay", 0.0)
    decoupled = type(opt) in (O.AdamW, O.Adafactor) or group.get("decoupled_weight_decay")
    if not decoupled or float(wd) == 0:
        return 0.0
    if group.get("fused"):  # the fused kernels compute in double
        return float(group["lr"]) * float(wd)
    f = 1 - group["lr"] * wd
    return 1 - (float(f) if isinstance(f, torch.Tensor) else float(torch.tensor(f, dtype=dtype)))


RTOL = {torch.float64: 1e-12, torch.float32: 16 * torch.finfo(torch.float32).eps}
#: The one place exactness stops at float32: Adafactor with a tensor lr rounds its step
#: size α to float32, and two θ_before one ulp of α apart give the same θ_after.
RTOL_LIMITS = {(O.Adafactor, "tensor-lr"): 2.0**-22}


def _check(actual: torch.Tensor, expected: torch.Tensor, theta: torch.Tensor,
           cond: torch.Tensor | float, dtype: torch.dtype, rtol: float, what: str) -> None:
    """|actual − expected| ≤ 2·ulp(θ)·κ + rtol·|expected| elementwise."""
    actual, expected = actual.double(), expected.double()
    floor = 2 * torch.finfo(dtype).eps * theta.double() * cond
    err = (actual - expected).abs()
    tol = floor + rtol * expected.abs() + 1e-300
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements off; worst err {float((err - tol).max()):.3g} "
        f"over tolerance, max rel {float((err / expected.abs().clamp(min=1e-300)).max()):.3g}"
    )


def _ulp_bf16(t: torch.Tensor) -> torch.Tensor:
    """Unit in the last place of bf16 values (8 significant bits)."""
    mag = t.float().abs()
    return torch.where(mag > 0, 2.0 ** (torch.floor(torch.log2(mag.clamp(min=1e-38))) - 7),
                       torch.zeros_like(mag))


def _max_duplicates(t: torch.Tensor | None) -> int:
    """How many entries of a sparse tensor share one index (torch adds them one by one)."""
    if t is None or not t.is_sparse or t._nnz() == 0:
        return 0
    rows = t._indices()[0] if t.sparse_dim() == 1 else t._indices().T.contiguous().view(-1)
    return int(torch.bincount(rows).max()) if t.sparse_dim() == 1 else t._nnz()


def _check_applied(s: ParamStep, before: torch.Tensor, what: str) -> None:
    """``with_applied_update`` gives exactly the measured delta and the lost elements."""
    measured = s.param.detach().float() - before.float()
    applied = with_applied_update(s, before)
    assert applied.update.dtype == torch.float32
    assert torch.equal(applied.update, measured), f"{what}: applied update != measured"
    assert applied.update_lost is not None
    assert torch.equal(applied.update_lost, (s.update != 0) & (measured == 0))
    assert applied.eff_lr is s.eff_lr and applied.direction is s.direction


def _check_intended(s: ParamStep, before: torch.Tensor, cond: torch.Tensor | float,
                    roundings: int, what: str) -> None:
    """The intended (rule) update is within torch's bf16 rounding of the applied one."""
    theta = s.param.detach()
    measured = theta.float() - before.float()
    # θ is rounded to bf16 once per in-place op torch applies (twice with decoupled
    # decay, once per duplicate entry of an uncoalesced sparse update), each ≤ ½ ulp;
    # torch's own bf16 intermediates add a few 2⁻⁹ of Δ; coupled decay amplifies the
    # rounding of θ_after by κ.
    ulp = torch.maximum(_ulp_bf16(theta), _ulp_bf16(before))
    err = (s.update.float() - measured).abs()
    tol = roundings * ulp * cond + 2.0**-7 * measured.abs() + 1e-30
    bad = err > tol
    assert not bad.any(), (
        f"{what}: intended update off the applied one by more than bf16 rounding at "
        f"{int(bad.sum())} elements (worst {float((err / ulp.clamp(min=1e-38)).max()):.3g} ulp)"
    )


def _no_autograd(s: ParamStep) -> None:
    for name in ("grad", "update", "eff_lr", "direction", "first_moment", "second_moment"):
        t = getattr(s, name)
        assert t is None or not t.requires_grad, f"{name} carries autograd history"


def _seen_grad(g: torch.Tensor) -> torch.Tensor:
    g = g.detach()
    return _real(g.coalesce().to_dense() if g.is_sparse else g)


#: torch bugs the oracle documents instead of matching: (class, impl) → description.
#: The applied update (with_applied_update) still equals the measured one there, and
#: ``update_lost`` flags the elements torch failed to move.
TORCH_BUGS = {
    (O.SGD, "fused"): "torch 2.13's fused CPU SGD leaves bf16/fp16 parameters in full "
                      "16-element vector chunks unchanged (and their momentum buffer "
                      "stale); only the tail moves",
}


class Rejected(Exception):
    """torch itself refused the combination (constructor or first step)."""


def _run(case: Case, dtype: torch.dtype) -> None:
    diff = case.mode == "differentiable"
    base, loss_fn = (_sparse_model if case.model == "sparse" else _dense_model)(dtype)
    leaves = [b.requires_grad_(diff) for b in base]
    params = [leaf * 1.0 for leaf in leaves] if diff else [torch.nn.Parameter(b) for b in base]
    if diff:
        for p in params:
            p.retain_grad()
    # SparseAdam trains only the embeddings (it rejects dense gradients).
    idx = [0, 2] if case.cls is O.SparseAdam else list(range(len(params)))
    trained = [params[i] for i in idx]
    groups = [trained[: len(trained) // 2], trained[len(trained) // 2:]]
    lr, lr1, kw = _hyper(case, diff)
    opt: torch.optim.Optimizer | None = None
    prev_buf: dict[torch.Tensor, torch.Tensor] = {}
    torch_bug = dtype == torch.bfloat16 and (case.cls, case.impl) in TORCH_BUGS
    for step in range(case.steps):
        args = [p.detach().requires_grad_(i in idx) for i, p in enumerate(params)]
        grads = torch.autograd.grad(loss_fn(args, step), [args[i] for i in idx])
        for i, g in zip(idx, grads, strict=True):
            params[i].grad = g
        seen = {p: _seen_grad(p.grad).clone() for p in trained}
        before = {p: p.detach().clone() for p in trained}
        applied_dupes = {p: _max_duplicates(p.grad) for p in trained}
        if opt is None:
            try:
                opt = case.cls([{"params": groups[0], "lr": lr},
                                {"params": groups[1], "lr": lr1}], **kw)
                for g in opt.param_groups:
                    assert supports_group(opt, g)
                opt.step()
            except (RuntimeError, ValueError, TypeError, AssertionError,
                    NotImplementedError) as exc:
                if not _raised_by_torch(exc):
                    raise
                msg = str(exc).splitlines()[0][:100] if str(exc) else ""
                raise Rejected(f"torch rejects it: {type(exc).__name__}: {msg}") from exc
        else:
            opt.step()
        steps = optimizer_steps(opt)
        assert {s.param for ss in steps for s in ss} == set(trained)
        for group, gsteps in zip(opt.param_groups, steps, strict=True):
            c = _decoupled_c(opt, group, dtype)
            for s in gsteps:
                p = s.param
                what = f"{dtype} step {step}, shape {tuple(p.shape)}"
                _no_autograd(s)
                assert s.eff_lr.dim() == 0 or s.eff_lr.shape == _real(p).shape
                # exact, or one rounding of an overwritten p.grad (g + μ·buf, g + wd·θ)
                # (sparse: the overwritten sum of duplicate entries may cancel, so one
                # ulp of the largest entry as a floor)
                after = _seen_grad(p.grad).abs()
                added = s.first_moment.abs() if s.first_moment is not None else 0.0
                gtol = 4 * torch.finfo(seen[p].dtype).eps * (
                    seen[p].abs() + 2 * after + added + after.max()).double()
                gerr = (s.grad.double() - seen[p].double()).abs()
                assert (gerr <= gtol).all(), (
                    f"{what}: ParamStep.grad is not the gradient the optimizer saw "
                    f"(max err {float(gerr.max()):.3g}, max |g| {float(seen[p].abs().max()):.3g})")
                cond = _coupled_condition(opt, group, s)
                if dtype == torch.bfloat16:
                    assert s.update.dtype == torch.float32
                    _check_applied(s, before[p], what)
                    if not torch_bug:
                        buf = opt.state[p].get("momentum_buffer")
                        # one rounding of θ per in-place op: + decoupled decay, + NAdam's
                        # second addcdiv_, + each duplicate of an uncoalesced sparse update
                        roundings = (1 + (c != 0) + (type(opt) is O.NAdam)
                                     + applied_dupes[p] + _max_duplicates(buf))
                        _check_intended(s, before[p], cond, roundings, what)
                    continue
                theta_b, theta_a = _real(before[p]), _real(p.detach())
                delta = theta_a - theta_b
                scale = torch.maximum(theta_b.abs(), theta_a.abs())
                rtol = max(RTOL[dtype], RTOL_LIMITS.get((case.cls, case.hp), 0.0))
                _check(s.update, delta, scale, cond, dtype, rtol, f"{what} update")
                # −eff_lr × direction reproduces the adaptive part of the step.
                adaptive = delta + c * theta_b
                if type(opt) is O.RMSprop and group["momentum"] > 0:
                    buf = opt.state[p]["momentum_buffer"].detach()
                    prev = prev_buf.get(p, torch.zeros_like(buf))
                    adaptive = -float(group["lr"]) * (buf - group["momentum"] * prev)
                    prev_buf[p] = buf.clone()
                _check(-(s.eff_lr * s.direction), adaptive, scale, cond, dtype, rtol,
                       f"{what} eff_lr×direction")


@pytest.mark.parametrize("case", [
    pytest.param(c, id=i, marks=() if c.core else pytest.mark.slow) for i, c in CASES])
def test_rule_matches_torch(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.impl == "accel-default":
        import torch.optim.optimizer as torch_optimizer

        monkeypatch.setattr(torch_optimizer, "_get_foreach_kernels_supported_devices",
                            lambda: ["cpu", "cuda"])
    rejected = []
    for dtype in DTYPES.values():
        try:
            _run(case, dtype)
        except Rejected as exc:
            rejected.append(str(exc))
    if len(rejected) == len(DTYPES):
        pytest.skip(rejected[0])
