"""lr_monitor.functional.curvature against closed forms and dense eigen-solves (float64)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lr_monitor.functional.curvature import (
    CurvatureEstimate,
    hessian_vector_product,
    measure_curvature,
    preconditioned_sharpness,
    preconditioner,
    sharpness,
    stability_threshold,
)
from lr_monitor.functional.rules import UnsupportedOptimizerError

F64 = torch.float64


# -- a quadratic with a known spectrum ------------------------------------------------------

class Quadratic(torch.nn.Module):
    """L(x) = ½ xᵀAx over one parameter vector x."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.nn.Parameter(torch.randn(n, generator=g, dtype=F64))


def quad_loss(model: Quadratic, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * model.x @ a @ model.x


def spd(eigs: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    return q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ q.T


@pytest.mark.parametrize("iters", [10, 12, 30])
def test_sharpness_of_a_quadratic_is_exact(iters: int) -> None:
    eigs = [7.5, 3.0, 2.9, 1.0, 0.5, 0.1, -0.2, -1.0, -3.0, 0.0, 0.01, 4.0]
    a = spd(eigs)
    est = sharpness(Quadratic(len(eigs)), quad_loss, a, iters=iters)
    assert est.value == pytest.approx(7.5, rel=1e-8)
    assert est.converged
    assert est.iterations <= iters


def test_an_exhausted_krylov_space_stops_early_and_exactly() -> None:
    est = sharpness(Quadratic(3), quad_loss, spd([2.0, 1.0, -1.0]), iters=20)
    assert est.iterations == 3 and est.residual == 0.0
    assert est.value == pytest.approx(2.0, rel=1e-12)


def test_an_unconverged_estimate_says_so_and_bounds_its_error() -> None:
    eigs = [7.5, 3.0, 2.9, 1.0, 0.5, 0.1, -0.2, -1.0, -3.0, 0.0, 0.01, 4.0]
    est = sharpness(Quadratic(len(eigs)), quad_loss, spd(eigs), iters=4)
    assert not est.converged
    assert est.value <= 7.5  # a Ritz value: a lower bound of the top eigenvalue
    assert 7.5 - est.value <= est.residual * abs(est.value)


def test_sharpness_is_the_largest_eigenvalue_not_the_largest_magnitude() -> None:
    """Power iteration would return −5 (a saddle direction); Lanczos returns the top."""
    a = spd([1.0, 0.5, -5.0, -4.0], seed=3)
    assert sharpness(Quadratic(4), quad_loss, a, iters=10).value == pytest.approx(1.0, rel=1e-10)


def test_sharpness_is_deterministic_in_the_seed_and_reports_convergence() -> None:
    eigs = [1.0 + 0.001 * i for i in range(200)]  # tight cluster: slow convergence
    a = spd(eigs, seed=1)
    model = Quadratic(200)
    first = sharpness(model, quad_loss, a, iters=4, seed=7)
    again = sharpness(model, quad_loss, a, iters=4, seed=7)
    other = sharpness(model, quad_loss, a, iters=4, seed=8)
    assert first == again
    assert first.value != other.value
    assert not first.converged and first.residual > 1e-3
    assert first.value <= max(eigs) + 1e-12  # Ritz values are lower bounds
    long = sharpness(model, quad_loss, a, iters=150, tol=1e-6)
    assert long.converged and long.value == pytest.approx(max(eigs), rel=1e-9)


def test_hessian_vector_product_matches_dense() -> None:
    model, batch, loss = tiny_problem()
    params = list(model.parameters())
    h = dense_hessian(model, batch, loss, params)
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
    hv = hessian_vector_product(model, loss, batch, v)
    flat = torch.cat([x.reshape(-1) for x in hv])
    torch.testing.assert_close(flat, h @ torch.cat([x.reshape(-1) for x in v]),
                               rtol=1e-10, atol=1e-12)


# -- preconditioned sharpness against a dense eigen-solve -----------------------------------

def tiny_problem(seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor],
                                         Callable[[torch.nn.Module, Any], torch.Tensor]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (32,), generator=g)

    def loss(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    return model, (x, y), loss


def dense_hessian(model: torch.nn.Module, batch: Any, loss: Callable[..., torch.Tensor],
                  params: list[torch.Tensor]) -> torch.Tensor:
    """torch.autograd.functional.hessian over the flat vector of ``params``."""
    names = {p: n for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params]

    def f(theta: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(theta, sizes)
        override = {names[p]: t.view(p.shape) for p, t in zip(params, pieces, strict=True)}
        return loss(_Functional(model, override), batch)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(f, flat)


class _Functional(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, override: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.override = model, override

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, self.override, (x,))


def expected_p(opt: torch.optim.Optimizer, group: dict[str, Any], p: torch.Tensor
               ) -> torch.Tensor:
    """P from the formulas of docs/optimizers.md, written out independently of the module."""
    s = opt.state[p]
    if isinstance(opt, torch.optim.SGD):
        return torch.ones_like(p)
    t = float(s["step"])
    if isinstance(opt, torch.optim.Adam):  # Adam and AdamW
        b1, b2 = group["betas"]
        v = s["max_exp_avg_sq"] if group["amsgrad"] else s["exp_avg_sq"]
        return (1 - b1 ** t) * ((v / (1 - b2 ** t)).sqrt() + group["eps"])
    if isinstance(opt, torch.optim.RMSprop):
        v = s["square_avg"] - (s["grad_avg"] ** 2 if group["centered"] else 0)
        return v.sqrt() + group["eps"]
    assert isinstance(opt, torch.optim.Adagrad)
    return (s["sum"].sqrt() + group["eps"]) * (1 + (t - 1) * group["lr_decay"])


OPTIMIZERS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.05),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1),
    "adam-amsgrad-l2": lambda m: torch.optim.Adam(m.parameters(), lr=0.05, amsgrad=True,
                                                  weight_decay=0.05, betas=(0.8, 0.95)),
    "adam-groups": lambda m: torch.optim.Adam([
        {"params": m[0].parameters(), "lr": 0.02, "eps": 1e-3},
        {"params": m[2].parameters(), "lr": 0.05, "betas": (0.9, 0.9)}]),
    "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01),
    "rmsprop-centered-momentum": lambda m: torch.optim.RMSprop(
        m.parameters(), lr=0.01, centered=True, momentum=0.5, weight_decay=0.01),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, lr_decay=0.1,
                                             weight_decay=0.02),
    "sgd-groups-l2": lambda m: torch.optim.SGD([
        {"params": m[0].parameters(), "lr": 0.1},
        {"params": m[2].parameters(), "lr": 0.4, "weight_decay": 0.3}], momentum=0.9),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_preconditioned_sharpness_matches_dense_eigensolve(name: str) -> None:
    model, batch, loss = tiny_problem()
    opt = OPTIMIZERS[name](model)
    for _ in range(5):
        opt.zero_grad()
        loss(model, batch).backward()
        opt.step()
    params = [p for g in opt.param_groups for p in g["params"]]
    h = dense_hessian(model, batch, loss, params)
    lr_max = max(g["lr"] for g in opt.param_groups)
    d, w = [], []
    decoupled = isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        for p in g["params"]:
            d.append((g["lr"] / lr_max / expected_p(opt, g, p)).reshape(-1))
            w.append(torch.full((p.numel(),), 0.0 if decoupled else g["weight_decay"],
                                dtype=F64))
    s = torch.cat(d).sqrt()
    m = s[:, None] * (h + torch.diag(torch.cat(w))) * s[None, :]
    want_pre = torch.linalg.eigvalsh(m)[-1].item()
    want_raw = torch.linalg.eigvalsh(h)[-1].item()

    c = measure_curvature(model, loss, batch, opt, iters=40)[0]
    assert c.sharpness is not None
    assert c.sharpness.value == pytest.approx(want_raw, rel=1e-8)
    assert c.preconditioned_sharpness.value == pytest.approx(want_pre, rel=1e-8)
    assert c.stability_ratio == pytest.approx(want_pre / stability_threshold(opt), rel=1e-8)
    alone = preconditioned_sharpness(model, loss, batch, opt, iters=40)
    assert alone.value == pytest.approx(want_pre, rel=1e-8)
    # preconditioner() is the same P, computed on the parameters' device
    for g in opt.param_groups:
        for p in g["params"]:
            torch.testing.assert_close(preconditioner(opt)[p], expected_p(opt, g, p),
                                       rtol=1e-12, atol=0)


def test_sgd_with_one_lr_reuses_the_raw_estimate() -> None:
    model, batch, loss = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.25)
    c = measure_curvature(model, loss, batch, opt, iters=30)[0]
    assert c.sharpness is not None
    assert c.preconditioned_sharpness.value == c.sharpness.value + 0.25
    want = torch.linalg.eigvalsh(dense_hessian(model, batch, loss,
                                               list(model.parameters())))[-1].item()
    assert c.sharpness.value == pytest.approx(want, rel=1e-8)
    no_raw = measure_curvature(model, loss, batch, opt, iters=30, raw=False)[0]
    assert no_raw.sharpness is None
    assert no_raw.preconditioned_sharpness.value == pytest.approx(want + 0.25, rel=1e-8)


def test_an_optimizer_over_some_parameters_measures_its_block() -> None:
    model, batch, loss = tiny_problem()
    head = list(model[2].parameters())
    opt = torch.optim.SGD(head, lr=0.1)
    want = torch.linalg.eigvalsh(dense_hessian(model, batch, loss, head))[-1].item()
    c = measure_curvature(model, loss, batch, opt, iters=30)[0]
    assert c.sharpness is not None and c.sharpness.value == pytest.approx(want, rel=1e-8)
    sub = sharpness(model, loss, batch, iters=30, params=head)
    assert sub.value == pytest.approx(want, rel=1e-8)


def test_two_optimizers_share_one_graph_and_one_host_transfer(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    model, batch, loss = tiny_problem()
    adam = torch.optim.Adam(model[0].parameters(), lr=0.01)
    sgd = torch.optim.SGD(model[2].parameters(), lr=0.1)
    for _ in range(3):
        adam.zero_grad(); sgd.zero_grad()  # noqa: E702
        loss(model, batch).backward()
        adam.step(); sgd.step()  # noqa: E702
    calls: list[str] = []
    for name in ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *a: Any, _o: Any = orig, _n: str = name, **k: Any
                    ) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if "lr_monitor" in caller and "tests" not in caller:
                calls.append(_n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    both = measure_curvature(model, loss, batch, [adam, sgd], iters=20)
    assert calls == ["tolist"]
    monkeypatch.undo()
    head = dense_hessian(model, batch, loss, list(model[2].parameters()))
    assert both[1].preconditioned_sharpness.value == pytest.approx(
        torch.linalg.eigvalsh(head)[-1].item(), rel=1e-8)
    assert both[0].stability_threshold == pytest.approx(3800.0)
    assert both[1].stability_threshold == pytest.approx(20.0)


# -- thresholds ------------------------------------------------------------------------------

def _p() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize(("make", "want"), [
    (lambda: torch.optim.SGD([_p()], lr=0.1), 2 / 0.1),
    (lambda: torch.optim.SGD([_p()], lr=0.1, momentum=0.9), (2 + 1.8) / 0.1),
    (lambda: torch.optim.SGD([_p()], lr=0.1, momentum=0.9, dampening=0.5),
     (2 + 1.8) / (0.5 * 0.1)),
    (lambda: torch.optim.SGD([_p()], lr=0.1, momentum=0.9, nesterov=True),
     (2 + 1.8) / ((1 + 1.8) * 0.1)),
    (lambda: torch.optim.RMSprop([_p()], lr=0.01), 2 / 0.01),
    (lambda: torch.optim.RMSprop([_p()], lr=0.01, momentum=0.5), 3 / 0.01),
    (lambda: torch.optim.Adagrad([_p()], lr=0.01, lr_decay=0.1), 2 / 0.01),
    (lambda: torch.optim.Adam([_p()], lr=1e-3), 38 / 1e-3),
    (lambda: torch.optim.Adam([_p()], lr=1e-3, betas=(0.5, 0.9)), 6 / 1e-3),
    (lambda: torch.optim.AdamW([_p()], lr=3e-4, weight_decay=0.1), 38 / 3e-4),
    (lambda: torch.optim.SGD([{"params": [_p()], "lr": 0.1}, {"params": [_p()], "lr": 0.4},
                              {"params": [_p()], "lr": 0.0}]), 2 / 0.4),
    (lambda: torch.optim.Adam([_p()], lr=0.0), math.inf),
    (lambda: torch.optim.SGD([_p()], lr=0.1, momentum=0.5, dampening=1.0), math.inf),
], ids=["gd", "heavy-ball", "dampening", "nesterov", "rmsprop", "rmsprop-momentum", "adagrad",
        "adam-38", "adam-beta1", "adamw", "groups-max-lr", "lr-zero", "dampening-one"])
def test_thresholds_match_the_formulas(make: Callable[[], torch.optim.Optimizer],
                                       want: float) -> None:
    assert stability_threshold(make()) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kind", ["gd", "heavy-ball", "nesterov", "dampening"])
@pytest.mark.parametrize("ratio", [0.95, 1.05])
def test_the_threshold_is_the_stability_edge(kind: str, ratio: float) -> None:
    """torch's own optimizer on ½λx² with λ = ratio × threshold: shrinks below, grows above."""
    kwargs = {"gd": {}, "heavy-ball": {"momentum": 0.9}, "nesterov": {"momentum": 0.9,
              "nesterov": True}, "dampening": {"momentum": 0.9, "dampening": 0.3}}[kind]
    x = torch.nn.Parameter(torch.tensor([1.0], dtype=F64))
    opt = torch.optim.SGD([x], lr=0.05, **kwargs)
    lam = ratio * stability_threshold(opt)
    for _ in range(400):
        opt.zero_grad()
        (0.5 * lam * x ** 2).sum().backward()
        opt.step()
    size = abs(x.item())
    assert (size < 1e-3) if ratio < 1 else (size > 1e3)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: torch.optim.NAdam([_p()]), r"no stability threshold is known for NAdam"),
    (lambda: type("MyAdam", (torch.optim.Adam,), {})([_p()]),
     r"MyAdam: a subclass of Adam, which may override step"),
    (lambda: torch.optim.Adam([_p()], maximize=True), r"Adam\(maximize=True\)"),
    (lambda: torch.optim.SGD([{"params": [_p()], "momentum": 0.9}, {"params": [_p()]}],
                             lr=0.1),
     r"SGD\(momentum=0.9 in group 0, momentum=0 in group 1, dampening=0, nesterov=False\)"),
    (lambda: torch.optim.Adam([{"params": [_p()]}, {"params": [_p()], "betas": (0.5, 0.9)}]),
     r"betas=\(0.9, 0.999\) in group 0, betas=\(0.5, 0.9\) in group 1"),
], ids=["nadam", "subclass", "maximize", "sgd-momentum-mix", "adam-beta1-mix"])
def test_unsupported_settings_are_named(make: Callable[[], torch.optim.Optimizer],
                                        match: str) -> None:
    opt = make()
    with pytest.raises(UnsupportedOptimizerError, match=match):
        stability_threshold(opt)
    model, batch, loss = tiny_problem()
    with pytest.raises(UnsupportedOptimizerError, match=match):
        measure_curvature(model, loss, batch, opt)


def test_adam_without_state_asks_for_a_step() -> None:
    model, batch, loss = tiny_problem()
    with pytest.raises(ValueError, match="no state yet"):
        preconditioned_sharpness(model, loss, batch, torch.optim.Adam(model.parameters()))


def test_every_lr_zero_means_nothing_can_become_unstable() -> None:
    model, batch, loss = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    c = measure_curvature(model, loss, batch, opt, iters=5)[0]
    assert c.stability_threshold == math.inf and c.stability_ratio == 0.0
    assert math.isnan(c.preconditioned_sharpness.value)
    assert c.row()["stability_ratio"] == 0.0


# -- no side effects -------------------------------------------------------------------------

class Noisy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                                        torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                        torch.nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_grads_buffers_rng_and_mode_are_untouched() -> None:
    torch.manual_seed(0)
    model = Noisy().double()
    frozen = model.body[4].bias
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(16, 5, dtype=F64)
    y = torch.randn(16, 2, dtype=F64)

    def loss(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    for _ in range(2):
        opt.zero_grad()
        loss(model, (x, y)).backward()
        opt.step()
    grads = {p: torch.randn_like(p) for p in model.parameters()}
    for p, g in grads.items():
        p.grad = g.clone()
    frozen.grad = None
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    measure_curvature(model, loss, (x, y), opt, iters=5)
    sharpness(model, loss, (x, y), iters=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert frozen.grad is None
    assert all(torch.equal(p.grad, grads[p]) for p in model.parameters() if p is not frozen)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert model.training and model.body[3].training


def test_a_buffer_the_forward_replaces_is_put_back() -> None:
    class Counting(torch.nn.Linear):
        def __init__(self) -> None:
            super().__init__(3, 1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls = self.calls + 1  # a new tensor, not an in-place update
            return super().forward(x)

    model = Counting()
    original = model.calls
    sharpness(model, lambda m, x: m(x).pow(2).mean(), torch.randn(4, 3), iters=3)
    assert model.calls is original and model.calls.item() == 0


def test_dropout_sees_one_mask_per_call() -> None:
    """The graph is kept for the call: one forward, one mask, a fixed operator that converges;
    the same global RNG state gives the same answer."""
    torch.manual_seed(0)
    model = Noisy().double().train()
    x = torch.randn(64, 5, dtype=F64)
    y = torch.randn(64, 2, dtype=F64)

    def loss(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    torch.manual_seed(5)
    a = sharpness(model, loss, (x, y), iters=60, tol=1e-6)
    torch.manual_seed(5)
    b = sharpness(model, loss, (x, y), iters=60, tol=1e-6)
    assert a == b and a.converged


def test_a_nonfinite_loss_gives_nan_not_an_exception() -> None:
    model, (x, y), loss = tiny_problem()
    est = sharpness(model, loss, (x * float("nan"), y), iters=5)
    assert math.isnan(est.value) and not est.converged


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"iters": 0}, "^iters=0 is invalid"),
    ({"tol": 0.0}, "^tol=0.0 is invalid"),
    ({"seed": -1}, "^seed=-1 is invalid"),
    ({"loss_fn": 3}, "^loss_fn=3 is invalid"),
    ({"loss_fn": lambda m, b: m(b[0])}, "loss_fn returned Tensor"),
], ids=["iters", "tol", "seed", "loss-fn", "not-scalar"])
def test_bad_arguments_name_themselves(kwargs: dict[str, Any], match: str) -> None:
    model, batch, loss = tiny_problem()
    args: dict[str, Any] = {"loss_fn": loss, **kwargs}
    fn = args.pop("loss_fn")
    with pytest.raises(ValueError, match=match):
        sharpness(model, fn, batch, **args)


def test_estimate_is_a_float() -> None:
    assert float(CurvatureEstimate(1.5, 0.0, 1, True)) == 1.5
