"""Curvature against the optimizer's stability threshold: sharpness, preconditioned sharpness.

On a quadratic with Hessian ``H``, gradient descent with step ``η`` is stable iff
``λ_max(H) < 2/η``; in real training, full-batch GD drives ``λ_max`` up to ``2/η`` and
then hovers there (the *edge of stability*, Cohen et al. 2021), and adaptive methods do
the same with the *preconditioned* sharpness ``λ_max(P⁻¹H)`` (Cohen et al. 2022). This
module measures both on one batch, and gives the threshold of each optimizer:

============================  ===========================  =================================
optimizer                     threshold                    on
============================  ===========================  =================================
SGD (gradient descent)        ``2/η``                      ``λ_max(H)``
SGD, momentum β, dampening d  ``(2+2β)/((1−d)·η)``         ``λ_max(H)``
SGD, Nesterov                 ``(2+2β)/((1+2β)·η)``        ``λ_max(H)``
RMSprop, momentum μ           ``(2+2μ)/η`` (μ = 0: 2/η)    ``λ_max(P⁻¹H)``, ``P = √v + ε``
Adagrad                       ``2/η``                      ``λ_max(P⁻¹H)``, ``P = √sum + ε``
Adam, AdamW                   ``(2+2β1)/((1−β1)·η)``       ``λ_max(P⁻¹H)``,
                              (38/η at β1 = 0.9)           ``P = (1−β1^t)·(√v̂ + ε)``
============================  ===========================  =================================

(``P`` is diagonal; Adagrad's includes ``1 + (t−1)·lr_decay``; see :func:`preconditioner`.)

Each comes from the linearisation of the update on ``L(θ) ≈ ½θᵀHθ`` with the
preconditioner frozen at its current value: heavy ball ``θ' = θ − ηg + β(θ − θ₋)`` is
stable iff ``ηλ < 2 + 2β``; Adam's ``θ' = θ − η·P⁻¹m``, ``m' = β1·m + (1−β1)·g`` is heavy
ball with step ``(1−β1)·η`` on ``P⁻¹H``; dampening scales the step by ``1 − d``.
``P⁻¹H`` is similar to the symmetric ``P^{-1/2} H P^{-1/2}``, whose top eigenvalue is what
is computed.

Choices (``docs/metrics.md`` gives the reasons in full):

* **Lanczos, not power iteration.** After ``k`` Hessian-vector products the top Ritz
  value is the largest Rayleigh quotient over the Krylov space that also holds power
  iteration's iterate, so it is never worse (up to one product), and it converges with
  the square root of the relative gap instead of the gap itself. It returns the
  algebraically largest eigenvalue (power iteration returns the largest ``|λ|``, so a
  strong negative direction — a saddle — would be reported as sharpness). No
  reorthogonalisation: three vectors of memory; in finite precision the
  lost orthogonality only duplicates converged Ritz values, which leaves the top one
  where it is (Paige 1976). The start vector comes from ``torch.Generator`` seeded with
  ``seed``: the same call gives the same answer.
* **Convergence is reported**, not hidden: :class:`CurvatureEstimate` carries the
  residual ``‖Ax − θx‖/|θ|`` of the top Ritz pair: an eigenvalue lies within
  ``residual·|θ|`` of ``θ``, and the error is about ``residual²·|θ|²/gap`` when the top
  eigenvalue is separated. A Ritz value never exceeds ``λ_max``: an unconverged estimate
  is a lower bound. All ``iters`` steps run (no host read to test convergence in between);
  they stop early only when the Krylov space is exhausted (exact answer).
* **One forward pass and one first-order backward** (``create_graph=True``) per call; the
  graph is kept for the Hessian-vector products of that call only (``retain_graph``), and
  freed when it returns. Each product is one double-backward, about two backward passes.
  The same graph serves every optimizer and both operators. ``.grad`` is never touched
  (``torch.autograd.grad``), module buffers (BatchNorm statistics) are restored, the
  global RNG state is restored (the forward's dropout draws from it), the module's mode
  is the caller's (:class:`~lr_monitor.SharpnessMonitor` decides for training).
* **One host transfer** per call: the Lanczos coefficients of every run are read back in
  one ``.tolist()``, and the small tridiagonal eigenproblems are solved on the host.
* **The optimizer's parameters only**: the Hessian block of the parameters the optimizer
  steps (``requires_grad``); other parameters are held fixed. The preconditioned operator
  leaves out params with no state yet (they have not moved) and groups with ``lr = 0``.
* **Several learning rates**: a group's ``lr`` scales its block of the operator by
  ``lr_g/lr_max``, and the threshold is the one of ``lr_max``. The ratio
  sharpness/threshold is then exact for any mix of ``lr``, ``eps``, ``betas[1]``,
  ``weight_decay``, ``centered``, ``amsgrad``. Groups must agree on what sets the threshold's
  constant (``momentum``, ``dampening``, ``nesterov``, ``betas[0]``): otherwise
  :class:`~lr_monitor.functional.rules.UnsupportedOptimizerError`.
* **Weight decay**: coupled (L2: SGD, RMSprop, Adagrad, Adam without decoupling) adds
  ``wd·I`` to the Hessian the optimizer descends, and is included in the preconditioned
  operator (it is the objective whose stability matters). Decoupled (AdamW,
  ``decoupled_weight_decay=True``) multiplies θ by ``1 − η·wd`` outside the
  preconditioner: a contraction that only adds stability, by ``η·wd`` (≈1e-5); it is left
  out. The raw :func:`sharpness` is always of the loss alone.
* **No threshold** (``UnsupportedOptimizerError``, naming the optimizer and setting): other
  optimizers (NAdam, RAdam, Adamax, Adadelta, Adafactor, SparseAdam, Rprop, ASGD, LBFGS,
  subclasses of the supported ones, which may override ``step``), ``maximize=True``, and
  groups that disagree on the momentum constants. RMSprop ``centered=True`` uses the
  denominator torch divides by, ``√(v − ḡ²) + ε``.

Example:
    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> def loss_fn(m, batch):
    ...     x = m.weight[0]
    ...     return 0.5 * x @ batch @ x
    >>> est = sharpness(model, loss_fn, A, iters=10)
    >>> round(est.value, 12), est.converged, est.iterations
    (3.0, True, 3)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    >>> stability_threshold(opt)  # (2 + 2·0.9) / 0.5
    7.6
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lr_monitor._validation import check_callable, check_int, check_real
from lr_monitor.functional.rules import UnsupportedOptimizerError
from lr_monitor.tags import CURVATURE_STATISTICS

__all__ = [
    "CURVATURE_OPTIMIZERS",
    "Curvature",
    "CurvatureEstimate",
    "LossFn",
    "hessian_vector_product",
    "measure_curvature",
    "preconditioned_sharpness",
    "preconditioner",
    "sharpness",
    "stability_threshold",
]

#: ``loss_fn(model, batch)``: a scalar loss tensor with autograd history.
LossFn = Callable[[torch.nn.Module, Any], Tensor]

#: The optimizers with a known stability threshold (exact classes: a subclass may override
#: ``step``).
CURVATURE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adam,
    torch.optim.AdamW)

#: Default relative residual below which an estimate counts as converged.
DEFAULT_TOL = 1e-2


@dataclass(frozen=True)
class CurvatureEstimate:
    """The top eigenvalue of a symmetric operator, estimated by Lanczos.

    Args:
        value: The top Ritz value (NaN when the loss or a product was not finite).
        residual: ``‖Ax − θx‖ / |θ|`` of the top Ritz pair ``(θ, x)`` (0 when the Krylov
            space was exhausted: then ``value`` is exact up to rounding).
        iterations: Hessian-vector products that contributed.
        converged: ``residual <= tol``.

    Example:
        >>> est = CurvatureEstimate(value=2.5, residual=1e-6, iterations=20, converged=True)
        >>> float(est)
        2.5
    """

    value: float
    residual: float
    iterations: int
    converged: bool

    def __float__(self) -> float:
        return self.value


@dataclass(frozen=True)
class Curvature:
    """The curvature of one optimizer's parameters against its stability threshold.

    Args:
        sharpness: ``λ_max(H)`` of the loss over the optimizer's parameters, or ``None``
            when not measured (``raw=False``).
        preconditioned_sharpness: ``λ_max`` of the operator the threshold applies to:
            ``D^{1/2}(H + W)D^{1/2}`` with ``D = (lr_g/lr_max)·P⁻¹`` per parameter and
            ``W`` the coupled weight decay; for plain SGD with one lr and no weight decay
            this equals ``sharpness``. NaN when no parameter can move (every ``lr`` 0).
        stability_threshold: :func:`stability_threshold` of the optimizer.

    Example:
        >>> c = Curvature(None, CurvatureEstimate(19.0, 0.0, 5, True), 38.0)
        >>> c.stability_ratio
        0.5
        >>> c.row()
        {'preconditioned_sharpness': 19.0, 'stability_threshold': 38.0, 'stability_ratio': 0.5}
    """

    sharpness: CurvatureEstimate | None
    preconditioned_sharpness: CurvatureEstimate
    stability_threshold: float

    @property
    def stability_ratio(self) -> float:
        """``preconditioned_sharpness / stability_threshold`` (1: at the edge of stability).

        0 when the threshold is infinite (nothing moves).
        """
        if math.isinf(self.stability_threshold):
            return 0.0
        return self.preconditioned_sharpness.value / self.stability_threshold

    @property
    def converged(self) -> bool:
        """Whether every estimate converged."""
        return self.preconditioned_sharpness.converged and (
            self.sharpness is None or self.sharpness.converged)

    def row(self) -> dict[str, float]:
        """The values by statistic name (:data:`lr_monitor.tags.CURVATURE_STATISTICS`)."""
        values = (None if self.sharpness is None else self.sharpness.value,
                  self.preconditioned_sharpness.value, self.stability_threshold,
                  self.stability_ratio)
        return {stat: v for stat, v in zip(CURVATURE_STATISTICS, values, strict=True)
                if v is not None}


# -- thresholds and preconditioners ----------------------------------------------------------


def _describe(optimizer: torch.optim.Optimizer, keys: Sequence[str]) -> str:
    """``Adam(betas=(0.9, 0.999) in group 0, betas=(0.5, 0.999) in group 1)``."""
    parts = []
    groups = optimizer.param_groups
    for key in keys:
        values = [g.get(key) for g in groups]
        if len(groups) == 1 or all(v == values[0] for v in values):
            parts.append(f"{key}={values[0]!r}")
        else:
            parts.extend(f"{key}={v!r} in group {i}" for i, v in enumerate(values))
    return f"{type(optimizer).__name__}({', '.join(parts)})"


def _check_supported(optimizer: torch.optim.Optimizer) -> None:
    cls = type(optimizer)
    if cls not in CURVATURE_OPTIMIZERS:
        base = next((c.__name__ for c in CURVATURE_OPTIMIZERS if isinstance(optimizer, c)), None)
        why = (f"a subclass of {base}, which may override step()" if base else
               "its update is not a (preconditioned) momentum method with a known bound")
        raise UnsupportedOptimizerError(
            f"no stability threshold is known for {cls.__name__}: {why}; supported: "
            f"{', '.join(c.__name__ for c in CURVATURE_OPTIMIZERS)}")
    if any(g.get("maximize", False) for g in optimizer.param_groups):
        raise UnsupportedOptimizerError(
            f"no stability threshold for {_describe(optimizer, ['maximize'])}: "
            "maximize=True is not supported")


def _constant(optimizer: torch.optim.Optimizer) -> float:
    """The threshold's numerator ``c`` (threshold = ``c / lr``), the same for every group."""
    _check_supported(optimizer)
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SGD):
        keys = ["momentum", "dampening", "nesterov"]
    elif isinstance(optimizer, torch.optim.RMSprop):
        keys = ["momentum"]
    elif isinstance(optimizer, torch.optim.Adam):
        keys = ["betas"]
    else:
        keys = []
    first = [_first(g, k) for k in keys for g in groups[:1]]
    for g in groups[1:]:
        if [_first(g, k) for k in keys] != first:
            raise UnsupportedOptimizerError(
                f"no single stability threshold for {_describe(optimizer, keys)}: the param "
                f"groups disagree on {', '.join(keys)}, which set the threshold's constant")
    g = groups[0]
    if isinstance(optimizer, torch.optim.SGD):
        beta, damp, nesterov = (float(g["momentum"]), float(g["dampening"]),
                                bool(g["nesterov"]))
        if nesterov:
            return (2 + 2 * beta) / (1 + 2 * beta)
        return math.inf if damp >= 1 else (2 + 2 * beta) / (1 - damp)
    if isinstance(optimizer, torch.optim.RMSprop):
        return 2 + 2 * float(g["momentum"])
    if isinstance(optimizer, torch.optim.Adam):
        beta1 = float(g["betas"][0])
        return (2 + 2 * beta1) / (1 - beta1)
    return 2.0  # Adagrad


def _first(group: Mapping[str, Any], key: str) -> Any:
    value = group.get(key)
    if key == "betas" and value is not None:
        return float(value[0])
    return float(value) if isinstance(value, (int, float, Tensor)) else value


def _lr(group: Mapping[str, Any]) -> float:
    return float(group["lr"])


def stability_threshold(optimizer: torch.optim.Optimizer) -> float:
    """The largest (preconditioned) sharpness at which the optimizer's step is stable.

    ``c / lr`` with ``c`` from the table in the module docstring: GD 2, heavy ball
    ``2 + 2β`` (``(2+2β)/(1−d)`` with dampening ``d``), Nesterov ``(2+2β)/(1+2β)``, RMSprop
    ``2 + 2μ``, Adagrad 2, Adam/AdamW ``(2+2β1)/(1−β1)``. With several param groups, ``lr``
    is the largest group ``lr`` (the others enter the operator scaled, see
    :func:`measure_curvature`); ``inf`` when every ``lr`` is 0 (or dampening is 1): nothing
    can become unstable.

    Args:
        optimizer: A ``torch.optim`` optimizer of :data:`CURVATURE_OPTIMIZERS`.

    Returns:
        The threshold, in units of the Hessian's eigenvalues.

    Raises:
        UnsupportedOptimizerError: for another optimizer, ``maximize=True``, or groups that
            disagree on ``momentum``/``dampening``/``nesterov``/``betas[0]`` (the message
            names them).

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> round(stability_threshold(torch.optim.Adam([p], lr=1e-3)), 6)  # 38 / lr
        38000.0
        >>> stability_threshold(torch.optim.SGD([p], lr=0.1, momentum=0.5, nesterov=True))
        15.0
        >>> stability_threshold(torch.optim.NAdam([p]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lr_monitor...UnsupportedOptimizerError: no stability threshold is known for NAdam...
    """
    c = _constant(optimizer)
    lr = max((_lr(g) for g in optimizer.param_groups), default=0.0)
    return math.inf if lr <= 0 or math.isinf(c) else c / lr


def _group_preconditioner(optimizer: torch.optim.Optimizer, group: Mapping[str, Any],
                          p: Tensor) -> Tensor | None:
    """``P`` of one parameter (``θ −= lr/P · direction``), or ``None`` without state."""
    if isinstance(optimizer, torch.optim.SGD):
        return torch.ones_like(p, memory_format=torch.contiguous_format)
    state = optimizer.state.get(p)
    if not state or "step" not in state:
        return None
    step = state["step"]  # a float32 tensor: bias corrections in float64, as torch does
    step = step.to(torch.float64) if isinstance(step, Tensor) else float(step)
    eps = group["eps"]
    if isinstance(optimizer, torch.optim.RMSprop):
        v = state["square_avg"]
        if group["centered"]:
            v = v.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
        return v.sqrt().add_(eps)
    if isinstance(optimizer, torch.optim.Adagrad):
        decay = 1 + (step - 1) * group["lr_decay"]
        return state["sum"].sqrt().add_(eps).mul_(decay)
    beta1, beta2 = group["betas"]
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    return (v.sqrt() / bc2 ** 0.5).add_(eps).mul_(bc1)


def preconditioner(optimizer: torch.optim.Optimizer) -> dict[Tensor, Tensor]:
    """The diagonal ``P`` of each parameter in ``λ(P⁻¹H)``, from the optimizer's state.

    The optimizer's last step was ``θ −= (lr/P)·direction`` elementwise: Adam/AdamW
    ``P = (1−β1^t)·(√v̂ + ε)``, ``v̂ = v/(1−β2^t)`` (``v`` = ``max_exp_avg_sq`` with
    ``amsgrad``); RMSprop ``P = √v + ε`` (centered: ``√(v − ḡ²) + ε``); Adagrad
    ``P = (√sum + ε)·(1 + (t−1)·lr_decay)``; SGD ``P = 1``. ``t`` is each parameter's
    ``state["step"]``. Computed on the parameters' device, no host read.

    Args:
        optimizer: An optimizer of :data:`CURVATURE_OPTIMIZERS`.

    Returns:
        ``{param: P}`` for every parameter that requires grad and has state (SGD: every
        parameter that requires grad).

    Raises:
        UnsupportedOptimizerError: as :func:`stability_threshold`.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.Adam([p], lr=0.1, betas=(0.5, 0.75), eps=0.0)
        >>> p.grad = torch.tensor([2.0, -4.0]); opt.step()
        >>> preconditioner(opt)[p]  # (1 − 0.5)·|g| after one step
        tensor([1., 2.])
    """
    _check_supported(optimizer)
    out: dict[Tensor, Tensor] = {}
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                pre = _group_preconditioner(optimizer, group, p)
                if pre is not None:
                    out[p] = pre
    return out


@dataclass
class _Block:
    """The operators of one optimizer: its params, the preconditioned params, ``√D``, decay."""

    raw: list[Tensor]
    params: list[Tensor]
    scale: list[Tensor] | None  # √D per param of ``params``; None: the identity
    decay: list[float]  # coupled weight decay per param of ``params``
    threshold: float
    shift: float | None  # preconditioned = raw + shift exactly (identity, one decay)


def _block(optimizer: torch.optim.Optimizer) -> _Block:
    threshold = stability_threshold(optimizer)
    groups = optimizer.param_groups
    lr_max = max((_lr(g) for g in groups), default=0.0)
    raw = [p for g in groups for p in g["params"] if p.requires_grad]
    # Plain SGD with one lr > 0 everywhere: D = I, nothing to build.
    identity = isinstance(optimizer, torch.optim.SGD) and all(
        _lr(g) == lr_max > 0 for g in groups)
    params: list[Tensor] = []
    scale: list[Tensor] = []
    decay: list[float] = []
    with torch.no_grad():
        for g in groups:
            lr = _lr(g)
            if lr <= 0:
                continue
            decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(
                g.get("decoupled_weight_decay", False))
            wd = 0.0 if decoupled else float(g.get("weight_decay", 0.0))
            for p in g["params"]:
                if not p.requires_grad:
                    continue
                if identity:
                    params.append(p)
                    decay.append(wd)
                    continue
                pre = _group_preconditioner(optimizer, g, p)
                if pre is None:
                    continue
                params.append(p)
                decay.append(wd)
                scale.append(pre.reciprocal_().mul_(lr / lr_max).sqrt_())
    shift = (decay[0] if decay else 0.0) if identity and len(set(decay)) <= 1 else None
    return _Block(raw=raw, params=params, scale=None if identity else scale, decay=decay,
                  threshold=threshold, shift=shift)


# -- Hessian-vector products -----------------------------------------------------------------


@contextlib.contextmanager
def _untouched(model: torch.nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Restore the global torch RNG state (CPU and the params' devices) and every buffer.

    Buffers are copied back into the original tensors, and the original tensors are put
    back where the forward replaced a buffer by a new one.
    """
    buffers = [(m, name, b, b.detach().clone()) for m in model.modules()
               for name, b in m._buffers.items() if b is not None]
    accel = sorted({(p.device.type, p.device.index or 0) for p in params
                    if p.device.type not in ("cpu", "meta")})
    kinds = {t for t, _ in accel}
    with contextlib.ExitStack() as stack:
        if kinds:
            for kind in kinds:
                stack.enter_context(torch.random.fork_rng(
                    devices=[i for t, i in accel if t == kind], device_type=kind))
        else:
            stack.enter_context(torch.random.fork_rng(devices=[]))
        try:
            yield
        finally:
            with torch.no_grad():
                for m, name, b, saved in buffers:
                    b.copy_(saved)
                    if m._buffers.get(name) is not b:
                        m._buffers[name] = b


class _Hessian:
    """The Hessian of one loss evaluation, for products until :meth:`close`."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, batch: Any,
                 params: Sequence[Tensor]) -> None:
        with torch.enable_grad():
            loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError(
                    f"loss_fn returned {type(loss).__name__}"
                    f"{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}: it must "
                    "return a scalar tensor that depends on the parameters")
            grads = torch.autograd.grad(loss.reshape(()), list(params), create_graph=True,
                                        allow_unused=True)
        self.grads: dict[Tensor, Tensor] = {
            p: g for p, g in zip(params, grads, strict=True)
            if g is not None and g.requires_grad}

    def product(self, params: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
        """``H_BB v`` for the block ``B = params`` (``vectors`` shaped like ``params``)."""
        outs = [(self.grads[p], v) for p, v in zip(params, vectors, strict=True)
                if p in self.grads]
        if not outs:
            return [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            hv = torch.autograd.grad([g for g, _ in outs], list(params),
                                     grad_outputs=[v.to(g.dtype) for g, v in outs],
                                     retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv, strict=True)]

    def close(self) -> None:
        self.grads = {}


def _work_dtype(params: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _device(params: Sequence[Tensor]) -> torch.device:
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"the parameters are on {len(devices)} devices "
                         f"({sorted(map(str, devices))}): curvature needs them on one")
    return devices.pop()


def _check_params(params: Sequence[Tensor]) -> None:
    if any(p.is_complex() for p in params):
        raise ValueError("complex parameters are not supported by the curvature estimates")


def _split(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    sizes = [p.numel() for p in params]
    return [x.view(p.shape) for x, p in zip(torch.split(flat, sizes), params, strict=True)]


def _flat(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


# -- Lanczos ---------------------------------------------------------------------------------


def _lanczos(matvec: Callable[[Tensor], Tensor], n: int, device: torch.device,
             dtype: torch.dtype, iters: int, seed: int) -> Tensor:
    """``iters`` Lanczos steps; returns ``[α_0..α_{k−1}, β_0..β_{k−1}]`` on the device.

    ``β_j = 0`` marks a breakdown (the Krylov space is exhausted); the later steps then
    run on a zero vector and contribute zeros. No value is read back to the host.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q = q / q.norm()
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros((), device=device, dtype=dtype)
    scale = torch.zeros((), device=device, dtype=dtype)
    tiny = 64 * torch.finfo(dtype).eps
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for _ in range(iters):
        w = matvec(q)
        a = torch.dot(w, q)
        w = w - a * q - b_prev * q_prev
        c = torch.dot(w, q)  # local reorthogonalisation: keeps α accurate in float32
        w = w - c * q
        a = a + c
        b = w.norm()
        scale = torch.maximum(scale, a.abs() + b_prev)
        alive = b > tiny * scale
        b = torch.where(alive, b, torch.zeros_like(b))
        q_prev, q = q, w / torch.where(alive, b, torch.ones_like(b)) * alive
        b_prev = b
        alphas.append(a)
        betas.append(b)
    return torch.stack(alphas + betas)


def _top_ritz(coeffs: Sequence[float], tol: float) -> CurvatureEstimate:
    """The top Ritz value of the tridiagonal from :func:`_lanczos` (on the host)."""
    k = len(coeffs) // 2
    alpha = np.asarray(coeffs[:k], dtype=np.float64)
    beta = np.asarray(coeffs[k:], dtype=np.float64)
    if not (np.isfinite(alpha).all() and np.isfinite(beta).all()):
        return CurvatureEstimate(math.nan, math.nan, k, False)
    zero = np.flatnonzero(beta == 0)
    m = int(zero[0]) + 1 if zero.size else k
    t = np.diag(alpha[:m]) + np.diag(beta[:m - 1], 1) + np.diag(beta[:m - 1], -1)
    evals, evecs = np.linalg.eigh(t)
    top = float(evals[-1])
    res = float(beta[m - 1] * abs(evecs[-1, -1]))
    rel = 0.0 if res == 0 else (res / abs(top) if top != 0 else math.inf)
    return CurvatureEstimate(top, rel, m, rel <= tol)


# -- public API ------------------------------------------------------------------------------


def _check_common(loss_fn: Any, iters: Any, tol: Any, seed: Any) -> None:
    check_callable("loss_fn", loss_fn, "a callable loss_fn(model, batch) -> scalar tensor")
    check_int("iters", iters, 1)
    check_real("tol", tol, low=0.0)
    check_int("seed", seed, 0)


def _trainable(model: torch.nn.Module, params: Sequence[Tensor] | None) -> list[Tensor]:
    chosen = list(model.parameters()) if params is None else list(params)
    out: list[Tensor] = []
    for p in chosen:
        if p.requires_grad and not any(p is q for q in out):
            out.append(p)
    if not out:
        raise ValueError("no parameter that requires grad: nothing to measure")
    _check_params(out)
    return out


def hessian_vector_product(model: torch.nn.Module, loss_fn: LossFn, batch: Any,
                           vector: Sequence[Tensor], *,
                           params: Sequence[Tensor] | None = None) -> list[Tensor]:
    """``H·v`` of ``loss_fn(model, batch)`` over ``params``, by double backward.

    ``Hv = ∂(∇L·v)/∂θ``: one forward, one backward with ``create_graph=True`` and one
    backward through that graph, which is then freed. ``.grad`` is not touched, buffers and
    the global RNG state are restored, the module's mode is left as the caller set it.

    Args:
        model: The module.
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss.
        batch: Passed to ``loss_fn``.
        vector: One tensor per parameter, shaped like it.
        params: The parameters (default: every parameter of ``model`` that requires grad).

    Returns:
        One tensor per parameter, shaped like it (zeros where the gradient does not depend
        on the parameters).

    Raises:
        ValueError: for a ``loss_fn`` that is not callable or does not return a scalar
            with autograd history, or ``vector`` of the wrong length.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> f = lambda m, a: 0.5 * m.weight[0] @ a @ m.weight[0]
        >>> hessian_vector_product(model, f, A, [torch.tensor([[1.0, 0.0]], dtype=A.dtype)])
        [tensor([[2., 1.]], dtype=torch.float64)]
    """
    check_callable("loss_fn", loss_fn, "a callable loss_fn(model, batch) -> scalar tensor")
    ps = _trainable(model, params)
    vs = list(vector)
    if len(vs) != len(ps):
        raise ValueError(f"vector has {len(vs)} tensors for {len(ps)} parameters")
    with _untouched(model, ps):
        hess = _Hessian(model, loss_fn, batch, ps)
        try:
            return [h.detach() for h in hess.product(ps, vs)]
        finally:
            hess.close()


def sharpness(model: torch.nn.Module, loss_fn: LossFn, batch: Any, *, iters: int = 20,
              tol: float = DEFAULT_TOL, seed: int = 0,
              params: Sequence[Tensor] | None = None) -> CurvatureEstimate:
    """The top Hessian eigenvalue ``λ_max(H)`` of ``loss_fn(model, batch)``, by Lanczos.

    Cost: one forward, one backward with ``create_graph=True``, then ``iters``
    Hessian-vector products (each a backward through the first backward's graph, about two
    backward passes); one host transfer. See the module docstring for the method and what
    is restored.

    Args:
        model: The module, in the mode the caller wants (train: dropout and batch
            statistics, as the optimizer sees the loss; eval: the deterministic function).
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss.
        batch: Passed to ``loss_fn``.
        iters: Lanczos steps (Hessian-vector products), ≥ 1.
        tol: Relative residual at or below which the estimate is marked converged (> 0).
        seed: Seed of the start vector (≥ 0).
        params: The parameters (default: every parameter of ``model`` that requires grad).

    Returns:
        The estimate, with its residual and whether it converged.

    Raises:
        ValueError: for a bad argument (named), or a ``loss_fn`` that does not return a
            scalar with autograd history.
    """
    _check_common(loss_fn, iters, tol, seed)
    ps = _trainable(model, params)
    device, dtype = _device(ps), _work_dtype(ps)
    n = sum(p.numel() for p in ps)
    with _untouched(model, ps):
        hess = _Hessian(model, loss_fn, batch, ps)
        try:
            coeffs = _lanczos(lambda v: _flat(hess.product(ps, _split(v, ps)), dtype),
                              n, device, dtype, iters, seed)
        finally:
            hess.close()
    return _top_ritz(coeffs.tolist(), tol)


def preconditioned_sharpness(model: torch.nn.Module, loss_fn: LossFn, batch: Any,
                             optimizer: torch.optim.Optimizer, *, iters: int = 20,
                             tol: float = DEFAULT_TOL, seed: int = 0) -> CurvatureEstimate:
    """``λ_max(P^{-1/2} H P^{-1/2})`` with ``P`` from the optimizer's current state.

    What :func:`stability_threshold` applies to (see :func:`measure_curvature` for several
    groups and weight decay). For SGD it is ``λ_max(H)`` of the optimizer's parameters.

    Args:
        model: The module (in the mode the caller wants).
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss.
        batch: Passed to ``loss_fn``.
        optimizer: An optimizer of :data:`CURVATURE_OPTIMIZERS` over (some of) ``model``'s
            parameters, after at least one step for the adaptive ones.
        iters: Lanczos steps, ≥ 1.
        tol: Relative residual at or below which the estimate is marked converged.
        seed: Seed of the start vector.

    Returns:
        The estimate (NaN when every group has ``lr`` 0).

    Raises:
        UnsupportedOptimizerError: as :func:`stability_threshold`.
        ValueError: for a bad argument, or an adaptive optimizer without state (no step
            yet).
    """
    result = measure_curvature(model, loss_fn, batch, optimizer, iters=iters, tol=tol,
                               seed=seed, raw=False)[0]
    return result.preconditioned_sharpness


def measure_curvature(model: torch.nn.Module, loss_fn: LossFn, batch: Any,
                      optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], *,
                      iters: int = 20, tol: float = DEFAULT_TOL, seed: int = 0,
                      raw: bool = True) -> list[Curvature]:
    """Sharpness, preconditioned sharpness and threshold of each optimizer, from one graph.

    For each optimizer, over the parameters it steps: ``sharpness = λ_max(H)`` (when
    ``raw``), and ``preconditioned_sharpness = λ_max(D^{1/2}(H + W)D^{1/2})`` where, per
    parameter of group ``g``, ``D = (lr_g / lr_max)·P⁻¹`` (:func:`preconditioner`) and
    ``W = wd_g`` for coupled weight decay (0 for AdamW). Its ratio to
    :func:`stability_threshold` is the stability ratio: ``> 1`` means the linearised update
    is unstable on this batch, ``≈ 1`` is the edge of stability, where healthy full-batch
    training settles. For SGD with one ``lr`` the second value is ``sharpness + wd`` and
    costs nothing extra.

    Cost: one forward and one ``create_graph`` backward for all optimizers together, then
    ``iters`` Hessian-vector products per estimate (two estimates per adaptive optimizer
    with ``raw``, one without; one for SGD with a single ``lr``), and one host transfer.

    Args:
        model: The module (in the mode the caller wants).
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss.
        batch: Passed to ``loss_fn``.
        optimizers: One optimizer or several.
        iters: Lanczos steps per estimate, ≥ 1.
        tol: Relative residual at or below which an estimate is marked converged.
        seed: Seed of the start vectors.
        raw: Also estimate the unpreconditioned ``λ_max(H)``.

    Returns:
        One :class:`Curvature` per optimizer, in order.

    Raises:
        UnsupportedOptimizerError: as :func:`stability_threshold`.
        ValueError: for a bad argument, an adaptive optimizer without state, or parameters
            on several devices.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> A = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
        >>> f = lambda m, a: 0.5 * m.weight[0] @ a @ m.weight[0]
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.9, 0.99), eps=0.0)
        >>> model.weight.grad = torch.tensor([[1.0, 0.5]], dtype=A.dtype); opt.step()
        >>> c = measure_curvature(model, f, A, opt)[0]
        >>> round(c.sharpness.value, 9), round(c.preconditioned_sharpness.value, 9)  # P = 0.1·|g|
        (4.0, 40.0)
        >>> round(c.stability_threshold, 9), round(c.stability_ratio, 9)  # 38/0.1
        (380.0, 0.105263158)
    """
    _check_common(loss_fn, iters, tol, seed)
    opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    blocks = [_block(o) for o in opts]
    for o, b in zip(opts, blocks, strict=True):
        if not isinstance(o, torch.optim.SGD) and b.raw and not b.params and any(
                _lr(g) > 0 for g in o.param_groups):
            raise ValueError(f"{type(o).__name__} has no state yet: the preconditioned "
                             "sharpness needs at least one optimizer step")
    everything: list[Tensor] = []
    for b in blocks:
        everything.extend(p for p in b.raw if not any(p is q for q in everything))
    if not everything:
        raise ValueError("no parameter that requires grad: nothing to measure")
    _check_params(everything)
    device, dtype = _device(everything), _work_dtype(everything)
    runs: list[Tensor] = []
    plan: list[tuple[int | None, int | None]] = []  # run index of (raw, preconditioned)
    with _untouched(model, everything):
        hess = _Hessian(model, loss_fn, batch, everything)
        try:
            for b in blocks:
                raw_at = pre_at = None
                if raw and b.raw:
                    raw_at = len(runs)
                    runs.append(_lanczos(_raw_operator(hess, b.raw, dtype),
                                         sum(p.numel() for p in b.raw), device, dtype, iters,
                                         seed))
                if b.params and not (raw_at is not None and b.shift is not None):
                    pre_at = len(runs)
                    runs.append(_lanczos(_preconditioned_operator(hess, b, dtype),
                                         sum(p.numel() for p in b.params), device, dtype,
                                         iters, seed))
                plan.append((raw_at, pre_at))
        finally:
            hess.close()
        host = torch.stack(runs).tolist() if runs else []  # the one host transfer
    results = []
    for b, (raw_at, pre_at) in zip(blocks, plan, strict=True):
        raw_est = None if raw_at is None else _top_ritz(host[raw_at], tol)
        if pre_at is not None:
            pre = _top_ritz(host[pre_at], tol)
        elif raw_est is not None and b.shift is not None and b.params:
            pre = CurvatureEstimate(raw_est.value + b.shift, raw_est.residual,
                                    raw_est.iterations, raw_est.converged)
        else:
            pre = CurvatureEstimate(math.nan, math.nan, 0, False)
        results.append(Curvature(raw_est, pre, b.threshold))
    return results


def _raw_operator(hess: _Hessian, params: list[Tensor],
                  dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    def op(v: Tensor) -> Tensor:
        return _flat(hess.product(params, _split(v, params)), dtype)
    return op


def _preconditioned_operator(hess: _Hessian, block: _Block,
                             dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    params = block.params
    scale = None if block.scale is None else _flat(block.scale, dtype)
    decay = None
    if any(block.decay):
        decay = torch.cat([torch.full((p.numel(),), wd, dtype=dtype, device=p.device)
                           for p, wd in zip(params, block.decay, strict=True)])

    def op(v: Tensor) -> Tensor:
        u = v if scale is None else v * scale
        hu = _flat(hess.product(params, _split(u, params)), dtype)
        if decay is not None:
            hu = hu + decay * u
        return hu if scale is None else hu * scale
    return op
