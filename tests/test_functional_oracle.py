"""Oracle tests: targeted cases of lr_monitor.functional against torch's own optimizers.

The programmatic product of every optimizer, flag and implementation path is in
``test_functional_oracle_wide.py``; this file holds the regressions and behaviours that
need a setup of their own (paths torch only takes on accelerators, GradScaler, sparse
embeddings, autograd through ``differentiable=True``, low-precision parameters, the
parameter-copy fallback).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import lr_monitor.functional.rules as rules
from lr_monitor.functional import (
    ParamSnapshot,
    ParamStep,
    UnsupportedOptimizerError,
    effective_lr,
    iter_group_steps,
    last_update,
    optimizer_steps,
    supports_group,
    with_applied_update,
)
from lr_monitor.functional.statistics import step_sums, summarize

O = torch.optim  # noqa: E741 - short alias


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((actual - expected).abs() / expected.abs().clamp(min=1e-300)).max())


def _mlp(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3)).to(dtype)


def _backward(model: torch.nn.Module, step: int, dtype: torch.dtype = torch.float64) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 6, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)
    model.zero_grad()
    (((model(x) - y) ** 2).mean() * (1 + step)).backward()


def _accelerator_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torch's default implementation choice what it is on CUDA: foreach."""
    import torch.optim.optimizer as torch_optimizer

    monkeypatch.setattr(torch_optimizer, "_get_foreach_kernels_supported_devices",
                        lambda: ["cpu", "cuda"])


# ------------------------------------------------------------------ SGD Nesterov + foreach


@pytest.mark.parametrize("foreach", [True, "accelerator-default"])
def test_sgd_nesterov_foreach_reads_the_gradient_torch_overwrote(
        foreach: bool | str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's foreach SGD adds μ·buf into p.grad in place (no weight decay, no maximize).

    The rule used to read the overwritten gradient as g: relative error 0.47 at step 1.
    """
    if foreach == "accelerator-default":
        _accelerator_default(monkeypatch)
    model = _mlp()
    opt = O.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                foreach=None if foreach == "accelerator-default" else True)
    for step in range(4):
        _backward(model, step)
        grads = {p: p.grad.clone() for p in model.parameters()}
        before = {p: p.detach().clone() for p in model.parameters()}
        opt.step()
        for s in optimizer_steps(opt)[0]:
            p, buf = s.param, opt.state[s.param]["momentum_buffer"]
            assert torch.allclose(p.grad, grads[p] + 0.9 * buf)  # torch overwrote p.grad
            assert _rel_err(s.update, p.detach() - before[p]) < 1e-12
            torch.testing.assert_close(s.grad, grads[p], rtol=1e-15, atol=1e-15)
            torch.testing.assert_close(s.direction, grads[p] + 0.9 * buf)


def test_foreach_default_is_found_without_torchs_private_helper(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """If torch drops ``_default_to_fused_or_foreach``, the rule applies its known logic."""
    import torch.optim.optimizer as torch_optimizer
    import torch.utils._foreach_utils as foreach_utils

    _accelerator_default(monkeypatch)
    monkeypatch.setattr(foreach_utils, "_get_foreach_kernels_supported_devices",
                        lambda: ["cpu", "cuda"])
    model = _mlp()
    opt = O.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    _backward(model, 0)
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.step()  # torch's sgd module still holds its own reference to the helper
    monkeypatch.delattr(torch_optimizer, "_default_to_fused_or_foreach")
    assert rules._default_foreach(list(model.parameters()), differentiable=False)
    assert not rules._default_foreach(list(model.parameters()), differentiable=True)
    for p, u in last_update(opt).items():
        assert _rel_err(u, p.detach() - before[p]) < 1e-12


# ------------------------------------------------------------------ fused + GradScaler


@pytest.mark.parametrize(("cls", "kwargs"), [(O.Adam, {}), (O.AdamW, {}), (O.Adagrad, {}),
                                             (O.SGD, {"momentum": 0.9})],
                         ids=["Adam", "AdamW", "Adagrad", "SGD"])
def test_fused_step_skipped_by_grad_scaler_moved_nothing(
        cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
    """A fused optimizer under a GradScaler skips the step on inf/NaN gradients.

    The post-step hooks still run and the state is the previous step's, so a rule alone
    would report the previous update again; ``found_inf`` makes it 0.
    """
    model = _mlp(torch.float32)
    opt = cls(model.parameters(), lr=0.01, fused=True, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean() * (math.inf if step == 2 else 1.0)
        scaler.scale(loss).backward()
        before = {p: p.detach().clone() for p in model.parameters()}
        seen: list[list[ParamStep]] = []

        def record(o: Any, a: Any, k: Any, seen: list[list[ParamStep]] = seen) -> None:
            seen.extend(optimizer_steps(o))

        handle = opt.register_step_post_hook(record)
        scaler.step(opt)
        scaler.update()
        handle.remove()
        assert seen, "the post-step hook ran"
        for s in (s for steps in seen for s in steps):
            delta = s.param.detach() - before[s.param]
            if step == 2:
                assert not delta.any() and not s.update.any()
            else:
                torch.testing.assert_close(s.update, delta, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ sparse gradients


def _embedding_model() -> tuple[torch.nn.Embedding, list[torch.Tensor]]:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(12, 4, sparse=True).double()
    idx = [torch.tensor([1, 2, 2, 5, 1]), torch.tensor([0, 2, 7]), torch.tensor([5, 5, 3])]
    return emb, idx


@pytest.mark.parametrize(("cls", "kwargs"), [
    (O.SGD, {"lr": 0.1}),
    (O.SGD, {"lr": 0.1, "momentum": 0.9}),
    (O.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
    (O.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "foreach": True}),
    (O.Adagrad, {"lr": 0.1}),
    (O.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "maximize": True}),
    (O.SparseAdam, {"lr": 0.01}),
    (O.SparseAdam, {"lr": 0.01, "maximize": True}),
], ids=["sgd", "sgd-momentum", "sgd-dampening", "sgd-nesterov-foreach", "adagrad",
        "adagrad-decay-maximize", "sparse_adam", "sparse_adam-maximize"])
def test_sparse_embedding_steps_are_exact_and_get_statistics(
        cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
    emb, batches = _embedding_model()
    opt = cls(emb.parameters(), **kwargs)
    p = emb.weight
    for step, idx in enumerate(batches):
        opt.zero_grad()
        (emb(idx) ** 2).sum().mul(1 + step).backward()
        assert p.grad is not None and p.grad.is_sparse
        dense = p.grad.coalesce().to_dense()
        before = p.detach().clone()
        opt.step()
        (s,) = optimizer_steps(opt)[0]
        delta = p.detach() - before
        assert not s.grad.is_sparse
        # exact; Nesterov + foreach reconstructs it from the overwritten p.grad
        torch.testing.assert_close(s.grad, dense, rtol=4e-16, atol=4e-15)
        floor = 4 * torch.finfo(torch.float64).eps * before.abs()
        assert ((s.update - delta).abs() <= floor + 1e-12 * delta.abs()).all()
        untouched = (dense == 0).all(dim=1) & ~torch.isin(torch.arange(12), idx)
        if cls is O.SparseAdam:  # only the rows of this step's indices move
            assert not s.update[untouched].any() and not delta[untouched].any()
        row = summarize(step_sums([[s]]).to_host())[0]
        assert row["grad_norm"] == pytest.approx(float(dense.norm()), rel=1e-12)
        assert row["update_norm"] == pytest.approx(float(delta.norm()), rel=1e-9)


def test_sparse_adam_adds_eps_to_sqrt_v_not_sqrt_v_hat() -> None:
    """torch's SparseAdam: Δ = −lr·√bc2/bc1 · m/(√v + ε), unlike Adam's √v̂ + ε."""
    p = torch.nn.Parameter(torch.zeros(3, 1, dtype=torch.float64))
    opt = O.SparseAdam([p], lr=1.0, eps=0.1)
    p.grad = torch.sparse_coo_tensor([[0]], torch.tensor([[1e-2]], dtype=torch.float64), (3, 1))
    opt.step()
    (s,) = optimizer_steps(opt)[0]
    m, v, bc1, bc2 = 0.1 * 1e-2, 0.001 * 1e-4, 0.1, 0.001
    expected = -math.sqrt(bc2) / bc1 * m / (math.sqrt(v) + 0.1)
    assert float(s.update[0, 0]) == pytest.approx(expected, rel=1e-12)
    assert float(p.detach()[0, 0]) == pytest.approx(expected, rel=1e-12)
    assert not s.update[1:].any()


# ------------------------------------------------------------------ differentiable=True


DIFFERENTIABLE = [O.Adam, O.AdamW, O.Adagrad, O.RMSprop, O.Adamax, O.NAdam, O.RAdam,
                  O.Adadelta, O.SGD]


#: torch accepts a tensor lr requiring grad (a meta-learned lr) for these.
TENSOR_LR = (O.Adam, O.AdamW, O.NAdam, O.RAdam, O.SGD)


@pytest.mark.parametrize("cls", DIFFERENTIABLE, ids=lambda c: c.__name__)
def test_differentiable_steps_are_exact_and_leave_autograd_alone(
        cls: type[torch.optim.Optimizer]) -> None:
    """differentiable=True used to be refused from the post-step hook, ending training."""
    torch.manual_seed(0)
    leaf = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    p = leaf * 1.0  # differentiable optimizers update non-leaf tensors in place
    p.retain_grad()
    lr: Any = torch.tensor(0.01, dtype=torch.float64, requires_grad=True) if (
        cls in TENSOR_LR) else 0.01
    kw: dict[str, Any] = {"momentum": 0.9} if cls in (O.SGD, O.RMSprop) else {}
    opt = cls([p], lr=lr, differentiable=True, weight_decay=0.1, **kw)
    assert supports_group(opt, opt.param_groups[0])
    for step in range(3):
        p.grad = torch.randn(4, 3, dtype=torch.float64) * (1 + step)
        before = p.detach().clone()
        opt.step()
        state = [t for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        versions = [p._version] + [t._version for t in state]
        steps = iter_group_steps(opt, opt.param_groups[0])
        s = next(steps)
        assert torch.is_grad_enabled()  # no_grad covers the rule only, not the consumer
        assert [p._version] + [t._version for t in state] == versions  # nothing mutated
        assert _rel_err(s.update, p.detach() - before) < 1e-10
        for name in ("grad", "update", "eff_lr", "direction", "first_moment", "second_moment"):
            t = getattr(s, name)
            assert t is None or not t.requires_grad, name
    assert p.requires_grad and p.grad_fn is not None  # still part of the unrolled graph


def test_tensor_weight_decay_requiring_grad_overwrites_p_grad() -> None:
    """SGD's single-tensor path does ``grad.addcmul_(param.clone(), weight_decay)``."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    wd = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    opt = O.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd, foreach=False)
    for _ in range(3):
        g = torch.randn(5, dtype=torch.float64)
        p.grad = g.clone()
        before = p.detach().clone()
        opt.step()
        assert torch.allclose(p.grad, g + 0.1 * before)  # torch overwrote p.grad
        (s,) = optimizer_steps(opt)[0]
        assert _rel_err(s.update, p.detach() - before) < 1e-12
        torch.testing.assert_close(s.grad, g, rtol=0, atol=1e-15)


# ------------------------------------------------------------------ supports_group


def test_supports_group_says_before_the_step_what_the_rules_can_do() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    yes = [O.Adam([p], differentiable=True), O.SGD([p], momentum=0.9, nesterov=True,
                                                   foreach=True),
           O.Adagrad([p]), O.SparseAdam([p]), O.Adafactor([p])]
    for opt in yes:
        assert supports_group(opt, opt.param_groups[0]), type(opt).__name__
    no = [O.Rprop([p]), O.ASGD([p]), O.LBFGS([p]), O.Adafactor([p], lr=1.0)]
    if hasattr(O, "Muon"):
        no.append(O.Muon([torch.nn.Parameter(torch.ones(3, 3))]))
    for opt in no:
        assert not supports_group(opt, opt.param_groups[0]), type(opt).__name__


def test_adafactor_with_steps_as_large_as_the_parameter_is_refused() -> None:
    """lr=1, d=1: θ_after = θ_before − RMS(θ_before)·U at step 1 has two θ_before."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = O.Adafactor([p], lr=1.0)
    p.grad = torch.tensor([0.3, 0.1, -0.2])
    opt.step()
    with pytest.raises(UnsupportedOptimizerError, match="lr=1 with d=1"):
        optimizer_steps(opt)


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
    assert not supports_group(opt, opt.param_groups[0])
    p.grad = torch.ones(2)
    opt.step()
    with pytest.raises(UnsupportedOptimizerError):
        last_update(opt)


def test_rules_read_nothing_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scalars derived from the step counters stay tensors (Python-float semantics)."""
    steps_before: list[torch.optim.Optimizer] = []
    for cls in (O.Adam, O.AdamW, O.Adagrad, O.RMSprop, O.Adamax, O.NAdam, O.RAdam,
                O.Adadelta, O.Adafactor, O.SGD):
        model = _mlp(torch.float32)
        opt = cls(model.parameters(), lr=0.01, weight_decay=0.01)
        _backward(model, 0, torch.float32)
        opt.step()
        steps_before.append(opt)
    calls: list[str] = []
    for name in ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *a: object, _o: Any = orig, _n: str = name,
                    **k: object) -> object:
            calls.append(_n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    for opt in steps_before:
        optimizer_steps(opt)
    assert calls == []


# ------------------------------------------------------------------ low precision


def test_with_applied_update_measures_what_bf16_rounding_kept() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0, 65.0, -0.5], dtype=torch.bfloat16))
    opt = O.SGD([p], lr=1.0)
    p.grad = torch.tensor([1e-3, 0.25, 0.2, 3e-3], dtype=torch.bfloat16)
    before = p.detach().clone()
    opt.step()
    (s,) = optimizer_steps(opt)[0]
    assert s.update.dtype == torch.float32 and s.update_lost is None
    applied = with_applied_update(s, before)
    # 1e-3 < ½ulp(1) and 0.2 < ½ulp(65) are rounded away; 3e-3 moves by one ulp(0.5)
    assert applied.update.tolist() == [0.0, -0.25, 0.0, -0.00390625]
    assert applied.update_lost.tolist() == [True, False, True, False]
    assert applied.eff_lr is s.eff_lr and applied.direction is s.direction
    # the intended update is the float32 value of torch's formula on its bf16 inputs
    torch.testing.assert_close(s.update, -p.grad.float())


def test_with_applied_update_keeps_float64_and_uses_the_real_view() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    z = torch.nn.Parameter(torch.tensor([1 + 1j, -2j], dtype=torch.complex64))
    opt = O.SGD([p, z], lr=0.5)
    p.grad = torch.tensor([1e-20, 1.0], dtype=torch.float64)
    z.grad = torch.tensor([1j, 1.0], dtype=torch.complex64)
    before = {q: q.detach().clone() for q in (p, z)}
    opt.step()
    sp, sz = optimizer_steps(opt)[0]
    ap, az = with_applied_update(sp, before[p]), with_applied_update(sz, before[z])
    assert ap.update.dtype == torch.float64 and ap.update.tolist() == [0.0, -0.5]
    assert ap.update_lost.tolist() == [True, False]
    assert az.update.shape == (2, 2) and az.update.tolist() == [[0.0, -0.5], [-0.5, 0.0]]


def test_with_applied_update_rejects_a_wrong_copy() -> None:
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = O.SGD([p], lr=0.1)
    p.grad = torch.ones(3, dtype=torch.bfloat16)
    opt.step()
    (s,) = optimizer_steps(opt)[0]
    with pytest.raises(ValueError, match=r"before=Tensor\(shape=\(3,\), dtype=torch.float32\) "
                                         r"is invalid: must be a copy of the parameter"):
        with_applied_update(s, torch.ones(3))


def test_snapshot_copies_only_the_requested_params_in_their_dtype() -> None:
    a = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.ones(4))
    opt = O.SGD([a, b], lr=1e-3)
    snap = ParamSnapshot(opt)
    snap.take([a])
    a.grad, b.grad = torch.ones(4, dtype=torch.bfloat16), torch.ones(4)
    opt.step()
    before = snap.pop()
    assert set(before) == {a} and before[a].dtype == torch.bfloat16
    assert not snap.taken
    snap.take()
    a.grad = torch.full((4,), 64.0, dtype=torch.bfloat16)
    opt.step()
    upd = snap.updates()
    assert upd[a].dtype == torch.float32 and upd[a].tolist() == [-0.0625] * 4


def test_adamax_second_moment_is_already_at_gradient_scale() -> None:
    for cls, root in ((O.Adamax, True), (O.Adam, False), (O.RMSprop, False)):
        p = torch.nn.Parameter(torch.ones(2))
        opt = cls([p], lr=0.1)
        p.grad = torch.tensor([0.5, -2.0])
        opt.step()
        (s,) = optimizer_steps(opt)[0]
        assert s.second_moment_is_root is root
        if root:  # exp_inf = max(β2·0, |g| + ε): the gradient's own scale
            torch.testing.assert_close(s.second_moment, torch.tensor([0.5, 2.0]))


def test_fused_sgd_low_precision_torch_bug_is_visible_not_hidden() -> None:
    """torch 2.13's fused CPU SGD leaves bf16 parameters in 16-element chunks unchanged.

    The rule reports the update torch intended; the applied update (from a copy of θ)
    shows that nothing moved and flags every such element as lost.
    """
    p = torch.nn.Parameter(torch.ones(20, dtype=torch.bfloat16))
    opt = O.SGD([p], lr=0.5, fused=True)
    p.grad = torch.ones(20, dtype=torch.bfloat16)
    before = p.detach().clone()
    opt.step()
    (s,) = optimizer_steps(opt)[0]
    applied = with_applied_update(s, before)
    assert (s.update == -0.5).all()
    moved = applied.update != 0
    assert torch.equal(applied.update_lost, ~moved)
    assert (applied.update[moved] == -0.5).all()


@pytest.mark.xfail(strict=True, reason="torch 2.13 fused CPU SGD skips bf16/fp16 vector "
                   "chunks; when this passes, drop TORCH_BUGS in the wide oracle")
def test_fused_sgd_low_precision_moves_every_element() -> None:
    p = torch.nn.Parameter(torch.ones(32, dtype=torch.bfloat16))
    opt = O.SGD([p], lr=0.5, fused=True)
    p.grad = torch.ones(32, dtype=torch.bfloat16)
    opt.step()
    assert (p.detach() == 0.5).all()


# ------------------------------------------------------------------ general behaviour


def test_adadelta_rho_zero_does_not_invent_nan() -> None:
    """With ρ = 0 and g' = 0 the acc_delta inversion divides 0 by 0; the step is 0."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = O.Adadelta([p], rho=0.0)
    p.grad = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    before = p.detach().clone()
    opt.step()
    upd = last_update(opt)[p]
    assert torch.isfinite(upd).all() and upd[1] == 0
    assert _rel_err(upd[[0, 2]], (p.detach() - before)[[0, 2]]) < 1e-12


def test_params_without_grad_or_state_are_left_out() -> None:
    a, b, frozen = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    frozen.requires_grad_(False)
    opt = O.Adam([a, b, frozen], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()  # b has no grad: no state
    assert set(last_update(opt)) == {a}
    b.grad = torch.ones(3)  # b now has a grad but the optimizer never stepped it
    assert set(last_update(opt)) == {a}
    assert frozen not in effective_lr(opt)


def test_nonfinite_state_propagates_instead_of_hiding() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = O.Adam([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), float("inf"), 1.0])
    opt.step()
    upd = last_update(opt)[p]
    assert torch.isfinite(upd[[0, 3]]).all()
    assert not torch.isfinite(upd[[1, 2]]).any()


COMPLEX = [O.Adam, O.AdamW, O.Adagrad, O.RMSprop, O.Adamax, O.NAdam, O.RAdam, O.Adadelta,
           O.SGD]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("cls", COMPLEX, ids=lambda c: c.__name__)
def test_complex_parameters(cls: type[torch.optim.Optimizer], foreach: bool) -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex128))
    kw: dict[str, Any] = {"momentum": 0.9} if cls in (O.SGD, O.RMSprop) else {}
    opt = cls([p], lr=0.01, foreach=foreach, weight_decay=0.1, **kw)
    for _ in range(3):
        p.grad = torch.randn(4, dtype=torch.complex128)
        before = p.detach().clone()
        opt.step()
        delta = torch.view_as_real(p.detach() - before)
        (s,) = optimizer_steps(opt)[0]
        assert s.update.shape == (4, 2)
        floor = 4 * torch.finfo(torch.float64).eps * torch.view_as_real(before).abs()
        assert ((s.update - delta).abs() <= floor + 1e-10 * delta.abs()).all()
        torch.testing.assert_close(last_update(opt)[p], p.detach() - before)


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
