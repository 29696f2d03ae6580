"""Per-optimizer update rules: the step each parameter just took, from post-step state.

Every ``torch.optim`` optimizer listed in :data:`SUPPORTED_OPTIMIZERS` has a *rule*
here: a function that, right after ``optimizer.step()`` (and before an LR scheduler
steps), reads the post-step state, ``p.grad`` (still set after the step) and the
param group's hyper-parameters, and returns for each parameter a :class:`ParamStep`:

* ``update``: the exact parameter change ``Δθ = θ_after − θ_before`` of that step,
  reconstructed without a copy of the parameters taken before the step;
* ``eff_lr`` and ``direction``: the per-element *effective learning rate* and the
  vector it multiplies, so that ``eff_lr · direction`` is the adaptive part of the
  step (``Δθ = −eff_lr · direction`` apart from decoupled weight decay);
* the optimizer's first and second moment estimates and where ε dominates the
  denominator.

Notation: ``t`` = ``state["step"]`` after the step, ``bc1 = 1 − β1^t``,
``bc2 = 1 − β2^t``, ``g`` the gradient (negated when ``maximize=True``), ``g' = g + wd·θ``
with coupled weight decay, ``m``/``v`` the first/second moment after the step.

Effective learning rate (``eff_lr``) and the direction it multiplies, per optimizer:

* Adam, AdamW: ``lr / (√v / √bc2 + ε)`` on ``m / bc1`` (``v`` = ``max_exp_avg_sq`` with
  amsgrad; ε is added after bias correction).
* Adagrad: ``lr / (1 + (t−1)·lr_decay) / (√sum + ε)`` on ``g'``.
* RMSprop: ``lr / (√(v − ḡ²) + ε)`` (centered) or ``lr / (√v + ε)`` on ``g'``; with
  momentum the update is ``−lr·buf``.
* Adamax: ``lr / u`` with ``u = max(β2·u, |g'| + ε)`` (ε inside the max) on ``m / bc1``.
* NAdam: ``lr / (√(v / bc2) + ε)`` on ``(1−μ_t)/(1−Πμ)·g' + μ_{t+1}/(1−Πμ·μ_{t+1})·m``.
* RAdam: ``lr·r_t·√bc2 / (√v + ε)`` when ``ρ_t > 5`` (ε added to √v, not √v̂), else
  ``lr``, on ``m / bc1``.
* Adadelta: ``lr·√(u_{t−1} + ε) / √(v + ε)`` on ``g'``.
* Adafactor: ``max(ε2, RMS(θ))·min(lr, t^−½) / max(1, RMS(U)/d) / √max(V̂, ε1²)`` on ``g``.
* SGD: ``lr`` on ``g'``; momentum: on ``buf``; nesterov: on ``g' + μ·buf``.

Decoupled weight decay (AdamW, ``decoupled_weight_decay=True``, Adafactor) multiplies
θ by ``1 − lr·wd`` before the adaptive step; ``update`` includes it, ``eff_lr`` does not.
Coupled weight decay makes ``g' = g + wd·θ_before`` depend on the unknown ``θ_before =
θ_after − Δ``; the rules solve that equation exactly (it is linear in Δ for all but
Adadelta and Adafactor, which are solved by a contracting fixed-point iteration). Its
rounding error is ``ulp(θ)·wd·s/|1 − wd·s|`` with ``s = ∂|Δ|/∂g'``: negligible unless
the decayed gradient nearly cancels while the effective lr is large.

Group-level scalars (bias corrections, ``clr``, NAdam's μ) are computed in float64 as
tensors from the step tensors, so no value is read back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "ParamStep",
    "Rule",
    "UnsupportedOptimizerError",
    "find_rule",
    "group_steps",
    "iter_group_steps",
    "register_rule",
]


class UnsupportedOptimizerError(TypeError):
    """Raised when no exact rule is known for an optimizer (or for one of its settings)."""


@dataclass(frozen=True)
class ParamStep:
    """The step one parameter took in the most recent ``optimizer.step()``.

    Complex parameters are described through their real view
    (``torch.view_as_real``), as torch's optimizers treat them.

    Args:
        param: The parameter (after the step).
        grad: ``p.grad`` as the optimizer saw it (unscaled, before ``maximize``).
        update: ``θ_after − θ_before``, same shape as the (real view of the) parameter.
        eff_lr: Effective learning rate, elementwise or a 0-d tensor (SGD, RAdam warm-up).
        direction: The vector ``eff_lr`` multiplies; ``−eff_lr · direction`` is the
            adaptive part of ``update``.
        first_moment: ``exp_avg``/``momentum_buffer`` where the optimizer keeps one.
        second_moment: The per-element denominator statistic (``exp_avg_sq``, ``sum``,
            ``square_avg``, ``exp_inf``, Adafactor's ``V̂``) where there is one.
        eps_dominated: Boolean mask of elements where ε is larger than the gradient-based
            part of the denominator, or ``None`` when the optimizer has no ε there.
    """

    param: Tensor
    grad: Tensor
    update: Tensor
    eff_lr: Tensor
    direction: Tensor
    first_moment: Tensor | None = None
    second_moment: Tensor | None = None
    eps_dominated: Tensor | None = None


Rule = Callable[[dict[str, Any], list[Tensor], list[dict[str, Any]]], Iterator[ParamStep]]
"""A rule maps (param group, params with grad and state, their states) to steps.

Rules are generators: a consumer that reduces each step before asking for the next keeps
only one parameter's temporaries alive (:func:`iter_group_steps`)."""

_RULES: dict[type[torch.optim.Optimizer], Rule] = {}


def register_rule(optimizer_cls: type[torch.optim.Optimizer]) -> Callable[[Rule], Rule]:
    """Register ``rule`` as the exact update rule of ``optimizer_cls`` (not its subclasses).

    A subclass may override ``step`` and so change the math: it gets no rule unless it is
    registered itself, and is measured by the parameter-copy fallback instead.

    Args:
        optimizer_cls: The optimizer class the rule describes.

    Returns:
        A decorator that stores the rule and returns it unchanged.

    Raises:
        TypeError: if ``optimizer_cls`` is not a ``torch.optim.Optimizer`` subclass.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(
            f"optimizer_cls={optimizer_cls!r} is not a torch.optim.Optimizer subclass"
        )

    def deco(rule: Rule) -> Rule:
        _RULES[optimizer_cls] = rule
        return rule

    return deco


def find_rule(optimizer: torch.optim.Optimizer) -> Rule | None:
    """The registered rule for ``type(optimizer)`` exactly, or ``None``.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> find_rule(torch.optim.Adam([p])) is not None
        True
        >>> class MyAdam(torch.optim.Adam): pass
        >>> find_rule(MyAdam([p])) is None
        True
    """
    return _RULES.get(type(optimizer))


def iter_group_steps(optimizer: torch.optim.Optimizer,
                     group: dict[str, Any]) -> Iterator[ParamStep]:
    """Steps of the parameters of ``group`` that took part in the last step.

    A parameter took part when it has a gradient and optimizer state. Parameters without
    a gradient (frozen, unused) or without state yet (the optimizer never stepped them)
    are left out: they did not move.

    Args:
        optimizer: The optimizer that just stepped.
        group: One of ``optimizer.param_groups``.

    Yields:
        One :class:`ParamStep` per participating parameter, in group order, computed when
        asked for (reduce each before asking for the next to bound memory).

    Raises:
        UnsupportedOptimizerError: if the optimizer has no exact rule, or uses a setting
            the rule cannot reconstruct (sparse gradients, ``differentiable=True``).
    """
    rule = find_rule(optimizer)
    if rule is None:
        raise UnsupportedOptimizerError(
            f"no exact update rule for {type(optimizer).__name__}; supported: "
            f"{', '.join(sorted(c.__name__ for c in _RULES))}. Measure it with "
            "lr_monitor.functional.ParamSnapshot (copies parameters on recorded steps)."
        )
    if group.get("differentiable", False):
        raise UnsupportedOptimizerError(
            f"{type(optimizer).__name__}(differentiable=True) is not supported: the "
            "update may depend on autograd-tracked hyper-parameters"
        )
    params: list[Tensor] = []
    states: list[dict[str, Any]] = []
    for p in group["params"]:
        if p.grad is None:
            continue
        st = optimizer.state.get(p)
        if not st and _needs_state(optimizer, group):
            continue
        if p.grad.is_sparse:
            raise UnsupportedOptimizerError(
                f"{type(optimizer).__name__}: sparse gradients are not supported"
            )
        params.append(p)
        states.append(st if st is not None else {})
    if params:
        yield from rule(group, params, states)


def group_steps(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> list[ParamStep]:
    """:func:`iter_group_steps` as a list (every parameter's temporaries at once).

    Raises:
        UnsupportedOptimizerError: as :func:`iter_group_steps`.
    """
    return list(iter_group_steps(optimizer, group))


def _needs_state(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    # Plain SGD without momentum keeps no state, every other optimizer does.
    return not (type(optimizer) is torch.optim.SGD and group.get("momentum", 0) == 0)


# ----------------------------------------------------------------------------- helpers


def _real(t: Tensor | None) -> Tensor | None:
    if t is None:
        return None
    return torch.view_as_real(t) if torch.is_complex(t) else t


def _hp(value: Any, device: torch.device) -> Tensor:
    """A hyper-parameter (float or tensor) as a float64 0-d tensor on ``device``."""
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device=device, dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _steps(states: Sequence[dict[str, Any]]) -> Tensor:
    """The ``step`` of every state as one float64 vector (on the step tensors' device)."""
    vals = [s["step"] for s in states]
    if all(isinstance(v, Tensor) for v in vals):
        return torch.stack([v.detach().reshape(()) for v in vals]).to(torch.float64)
    return torch.tensor([float(v) for v in vals], dtype=torch.float64)


def _per_param(vec: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Split a float64 vector of per-parameter scalars into 0-d tensors, one per param.

    Each scalar is rounded once to the parameter's dtype, as torch rounds its Python
    float scalars when it applies them.
    """
    out = []
    for v, p in zip(vec.unbind(), params, strict=True):
        dtype = p.real.dtype if torch.is_complex(p) else p.dtype
        out.append(v.to(device=p.device, dtype=dtype))
    return out


def _scalar_like(x: Tensor, p: Tensor) -> Tensor:
    dtype = p.real.dtype if torch.is_complex(p) else p.dtype
    return x.to(device=p.device, dtype=dtype)


def _signed_grad(p: Tensor, maximize: bool) -> Tensor:
    g = _real(p.grad)
    assert g is not None
    return -g if maximize else g


def _decoupled(adaptive: Tensor, theta: Tensor, lr_wd: Tensor) -> Tensor:
    """Δ for ``θ_after = θ_before·(1 − c) + adaptive`` with ``c = lr·wd``.

    ``Δ = adaptive − c·θ_before`` and ``θ_before = (θ_after − adaptive)/(1 − c)``, so
    ``Δ = adaptive − c/(1 − c)·(θ_after − adaptive)``; computed in that form it keeps the
    precision of ``adaptive`` (no difference of two nearly equal parameter tensors).
    """
    k = lr_wd / (1 - lr_wd)
    return adaptive - k * (theta - adaptive)


# ----------------------------------------------------------------------------- rules


def _adam_like(group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]],
               *, decoupled: bool) -> Iterator[ParamStep]:
    dev = states[0]["step"].device if isinstance(states[0]["step"], Tensor) else None
    dev = dev or torch.device("cpu")
    beta1, beta2 = (_hp(b, dev) for b in group["betas"])
    lr = _hp(group["lr"], dev)
    t = _steps(states).to(dev)
    bc1 = 1 - beta1**t
    bc2_sqrt = (1 - beta2**t).sqrt()
    wd = float(group.get("weight_decay", 0.0))
    eps = float(group["eps"])
    amsgrad = bool(group.get("amsgrad", False))
    for p, st, bc1_i, bc2s_i in zip(params, states, _per_param(bc1, params),
                                    _per_param(bc2_sqrt, params), strict=True):
        m = _real(st["exp_avg"])
        v = _real(st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"])
        assert m is not None and v is not None
        lr_p = _scalar_like(lr, p)
        # In place on two buffers (this pass runs over the whole model): eff, direction.
        eff = v.sqrt().div_(bc2s_i)  # √v̂
        eps_dominated = eff < eps
        eff.add_(eps).reciprocal_().mul_(lr_p)  # lr / (√v̂ + ε)
        direction = m / bc1_i
        adaptive = torch.mul(eff, direction).neg_()
        theta = _real(p.detach())
        assert theta is not None
        update = _decoupled(adaptive, theta, _scalar_like(lr * wd, p)) if (
            decoupled and wd != 0) else adaptive
        yield ParamStep(
            param=p, grad=p.grad, update=update, eff_lr=eff, direction=direction,  # type: ignore[arg-type]
            first_moment=m, second_moment=v, eps_dominated=eps_dominated,
        )


@register_rule(torch.optim.Adam)
def _adam(group: dict[str, Any], params: list[Tensor],
          states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    yield from _adam_like(group, params, states,
                          decoupled=bool(group.get("decoupled_weight_decay", False)))


@register_rule(torch.optim.AdamW)
def _adamw(group: dict[str, Any], params: list[Tensor],
           states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    yield from _adam_like(group, params, states, decoupled=True)


def _solve_coupled(rhs_scale: Tensor, gp: Tensor, theta: Tensor, wd: float,
                   extra: Tensor | None = None) -> Tensor:
    """Δ for ``Δ = −s·(g + wd·θ_before) [− extra]`` with ``θ_before = θ_after − Δ``.

    Linear in Δ: ``Δ·(1 − s·wd) = −s·(g + wd·θ_after) [− extra]``.
    """
    num = rhs_scale * (gp + wd * theta) if wd != 0 else rhs_scale * gp
    if extra is not None:
        num = num + extra
    return -num / (1 - rhs_scale * wd) if wd != 0 else -num


@register_rule(torch.optim.Adagrad)
def _adagrad(group: dict[str, Any], params: list[Tensor],
             states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    dev = states[0]["step"].device if isinstance(states[0]["step"], Tensor) else torch.device("cpu")
    lr = _hp(group["lr"], dev)
    t = _steps(states).to(dev)
    clr = lr / (1 + (t - 1) * float(group["lr_decay"]))
    wd = float(group["weight_decay"])
    eps = float(group["eps"])
    for p, st, clr_i in zip(params, states, _per_param(clr, params), strict=True):
        s = _real(st["sum"])
        assert s is not None
        gp = _signed_grad(p, bool(group.get("maximize", False)))
        theta = _real(p.detach())
        assert theta is not None
        s_sqrt = s.sqrt()
        eff = clr_i / (s_sqrt + eps)
        update = _solve_coupled(eff, gp, theta, wd)
        direction = gp + wd * (theta - update) if wd != 0 else gp
        yield ParamStep(param=p, grad=p.grad, update=update, eff_lr=eff,  # type: ignore[arg-type]
                             direction=direction, second_moment=s, eps_dominated=s_sqrt < eps)


@register_rule(torch.optim.RMSprop)
def _rmsprop(group: dict[str, Any], params: list[Tensor],
             states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    lr = float(group["lr"]) if not isinstance(group["lr"], Tensor) else group["lr"]
    wd = float(group["weight_decay"])
    eps = float(group["eps"])
    momentum = float(group["momentum"])
    centered = bool(group["centered"])
    for p, st in zip(params, states, strict=True):
        lr_p = _scalar_like(_hp(lr, p.device), p)
        v = _real(st["square_avg"])
        assert v is not None
        gp = _signed_grad(p, bool(group.get("maximize", False)))
        theta = _real(p.detach())
        assert theta is not None
        if centered:
            ga = _real(st["grad_avg"])
            avg_core = v.addcmul(ga, ga, value=-1).sqrt()  # type: ignore[arg-type]
        else:
            avg_core = v.sqrt()
        eff = lr_p / (avg_core + eps)
        first = None
        if momentum > 0:
            buf = _real(st["momentum_buffer"])
            assert buf is not None
            update = -lr_p * buf
            direction = gp + wd * (theta - update) if wd != 0 else gp
            first = buf
        else:
            update = _solve_coupled(eff, gp, theta, wd)
            direction = gp + wd * (theta - update) if wd != 0 else gp
        yield ParamStep(param=p, grad=p.grad, update=update, eff_lr=eff,  # type: ignore[arg-type]
                             direction=direction, first_moment=first, second_moment=v,
                             eps_dominated=avg_core < eps)


@register_rule(torch.optim.Adamax)
def _adamax(group: dict[str, Any], params: list[Tensor],
            states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    dev = states[0]["step"].device if isinstance(states[0]["step"], Tensor) else torch.device("cpu")
    beta1 = _hp(group["betas"][0], dev)
    lr = _hp(group["lr"], dev)
    t = _steps(states).to(dev)
    bc1 = 1 - beta1**t
    eps = float(group["eps"])
    for p, st, bc1_i in zip(params, states, _per_param(bc1, params), strict=True):
        m, u = _real(st["exp_avg"]), _real(st["exp_inf"])
        assert m is not None and u is not None
        eff = _scalar_like(lr, p) / u
        direction = m / bc1_i
        yield ParamStep(param=p, grad=p.grad, update=-eff * direction, eff_lr=eff,  # type: ignore[arg-type]
                             direction=direction, first_moment=m, second_moment=u,
                             eps_dominated=u < 2 * eps)


@register_rule(torch.optim.NAdam)
def _nadam(group: dict[str, Any], params: list[Tensor],
           states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    dev = states[0]["step"].device if isinstance(states[0]["step"], Tensor) else torch.device("cpu")
    beta1, beta2 = (_hp(b, dev) for b in group["betas"])
    lr = _hp(group["lr"], dev)
    t = _steps(states).to(dev)
    psi = float(group["momentum_decay"])
    bc2 = 1 - beta2**t
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    mu_prod = torch.stack([_hp(s["mu_product"], dev) for s in states])
    c_g = (1.0 - mu) / (1.0 - mu_prod)
    c_m = mu_next / (1.0 - mu_prod * mu_next)
    wd = float(group["weight_decay"])
    eps = float(group["eps"])
    decoupled = bool(group.get("decoupled_weight_decay", False))
    for p, st, bc2_i, cg_i, cm_i in zip(params, states, _per_param(bc2, params),
                                        _per_param(c_g, params), _per_param(c_m, params),
                                        strict=True):
        m, v = _real(st["exp_avg"]), _real(st["exp_avg_sq"])
        assert m is not None and v is not None
        gp = _signed_grad(p, bool(group.get("maximize", False)))
        theta = _real(p.detach())
        assert theta is not None
        lr_p = _scalar_like(lr, p)
        vhat_sqrt = v.div(bc2_i).sqrt()
        eff = lr_p / (vhat_sqrt + eps)
        if wd != 0 and not decoupled:
            # g' = g + wd·θ_before enters linearly with coefficient eff·c_g.
            update = _solve_coupled(eff * cg_i, gp, theta, wd, extra=eff * cm_i * m)
            g_eff = gp + wd * (theta - update)
        else:
            g_eff = gp
            update = -eff * (cg_i * gp + cm_i * m)
            if wd != 0:
                update = _decoupled(update, theta, _scalar_like(lr * wd, p))
        direction = cg_i * g_eff + cm_i * m
        yield ParamStep(param=p, grad=p.grad, update=update, eff_lr=eff,  # type: ignore[arg-type]
                             direction=direction, first_moment=m, second_moment=v,
                             eps_dominated=vhat_sqrt < eps)


@register_rule(torch.optim.RAdam)
def _radam(group: dict[str, Any], params: list[Tensor],
           states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    dev = states[0]["step"].device if isinstance(states[0]["step"], Tensor) else torch.device("cpu")
    beta1, beta2 = (_hp(b, dev) for b in group["betas"])
    lr = _hp(group["lr"], dev)
    t = _steps(states).to(dev)
    bc1 = 1 - beta1**t
    bc2 = 1 - beta2**t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / bc2
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).clamp(
        min=0).sqrt()
    rectified = rho_t > 5.0
    # Per parameter: multiplier of 1/(√v + ε) when rectified, 0 otherwise; and plain lr.
    scale = torch.where(rectified, lr * rect * bc2.sqrt(), torch.zeros_like(rect))
    wd = float(group["weight_decay"])
    eps = float(group["eps"])
    decoupled = bool(group.get("decoupled_weight_decay", False))
    for p, st, bc1_i, sc_i, on_i in zip(params, states, _per_param(bc1, params),
                                        _per_param(scale, params), rectified.unbind(),
                                        strict=True):
        m, v = _real(st["exp_avg"]), _real(st["exp_avg_sq"])
        assert m is not None and v is not None
        theta = _real(p.detach())
        assert theta is not None
        v_sqrt = v.sqrt()
        on = on_i.to(p.device)
        eff = torch.where(on, sc_i / (v_sqrt + eps), _scalar_like(lr, p))
        direction = m / bc1_i
        adaptive = -eff * direction
        update = _decoupled(adaptive, theta, _scalar_like(lr * wd, p)) if (
            decoupled and wd != 0) else adaptive
        yield ParamStep(param=p, grad=p.grad, update=update, eff_lr=eff,  # type: ignore[arg-type]
                             direction=direction, first_moment=m, second_moment=v,
                             eps_dominated=(v_sqrt < eps) & on)


@register_rule(torch.optim.Adadelta)
def _adadelta(group: dict[str, Any], params: list[Tensor],
              states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    rho = float(group["rho"])
    eps = float(group["eps"])
    wd = float(group["weight_decay"])
    for p, st in zip(params, states, strict=True):
        lr_p = _scalar_like(_hp(group["lr"], p.device), p)
        v, u = _real(st["square_avg"]), _real(st["acc_delta"])
        assert v is not None and u is not None
        gp = _signed_grad(p, bool(group.get("maximize", False)))
        theta = _real(p.detach())
        assert theta is not None
        std = v.add(eps).sqrt()
        # Invert u_t = ρ·u_{t−1} + (1−ρ)·δ², δ = √(u_{t−1}+ε)/std·g', for u_{t−1}:
        # u_{t−1} = (u_t − (1−ρ)·ε·s) / (ρ + (1−ρ)·s), s = g'²/(v+ε).
        # With weight decay g' depends on θ_before = θ_after + lr·δ: a contraction with
        # factor lr·wd·√(u+ε)/std, solved by fixed-point iteration.
        g_eff = gp + wd * theta if wd != 0 else gp
        for _ in range(40 if wd != 0 else 1):
            s = g_eff.square() / (v + eps)
            u_prev = ((u - (1 - rho) * eps * s) / (rho + (1 - rho) * s)).clamp(min=0)
            eff_core = u_prev.add(eps).sqrt() / std
            if wd == 0:
                break
            g_eff = gp + wd * (theta + lr_p * eff_core * g_eff)
        eff = lr_p * eff_core
        yield ParamStep(param=p, grad=p.grad, update=-eff * g_eff, eff_lr=eff,  # type: ignore[arg-type]
                             direction=g_eff, second_moment=v, eps_dominated=v < eps)


@register_rule(torch.optim.Adafactor)
def _adafactor(group: dict[str, Any], params: list[Tensor],
               states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    dev = states[0]["step"].device if isinstance(states[0]["step"], Tensor) else torch.device("cpu")
    lr = _hp(group["lr"], dev)
    t = _steps(states).to(dev)
    rho_t = torch.minimum(lr.expand_as(t), t.rsqrt())
    eps1_cfg, eps2 = group["eps"]
    d = float(group["d"])
    wd = float(group["weight_decay"])
    lr_wd = lr * wd
    for p, st, rho_i in zip(params, states, _per_param(rho_t, params), strict=True):
        eps1 = torch.finfo(p.dtype).eps if eps1_cfg is None else float(eps1_cfg)
        gp = _signed_grad(p, bool(group.get("maximize", False)))
        theta = p.detach()
        if gp.dim() > 1:
            row, col = st["row_var"], st["col_var"]
            var = (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp(min=eps1))
        else:
            var = st["variance"]
        inv = var.clamp(min=eps1 * eps1).rsqrt()
        u_dir = inv * gp
        n = p.numel()
        u_norm = u_dir.norm()
        denom = torch.clamp(u_norm / (math.sqrt(n) * d), min=1.0)
        # alpha = max(ε2, RMS(θ_before))·ρ_t with θ_before = (θ_after + c·U)/(1 − lr·wd),
        # c = alpha/denom: a scalar fixed point, solved from three reductions.
        lw = _scalar_like(lr_wd, p)
        a2 = theta.square().sum()
        b = (theta * u_dir).sum()
        c2 = u_norm.square()
        rms = a2.sqrt() / math.sqrt(n) / (1 - lw)
        c = torch.clamp(rms, min=eps2) * rho_i / denom
        for _ in range(20):
            rms = (a2 + 2 * c * b + c * c * c2).clamp(min=0).sqrt() / math.sqrt(n) / (1 - lw)
            c = torch.clamp(rms, min=eps2) * rho_i / denom
        eff = c * inv
        adaptive = -c * u_dir
        update = _decoupled(adaptive, theta, lw) if wd != 0 else adaptive
        yield ParamStep(param=p, grad=p.grad, update=update, eff_lr=eff,  # type: ignore[arg-type]
                             direction=gp, second_moment=var, eps_dominated=var < eps1 * eps1)


@register_rule(torch.optim.SGD)
def _sgd(group: dict[str, Any], params: list[Tensor],
         states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    wd = float(group["weight_decay"])
    momentum = float(group["momentum"])
    nesterov = bool(group["nesterov"])
    for p, st in zip(params, states, strict=True):
        lr_p = _scalar_like(_hp(group["lr"], p.device), p)
        gp = _signed_grad(p, bool(group.get("maximize", False)))
        theta = _real(p.detach())
        assert theta is not None
        buf = _real(st.get("momentum_buffer")) if momentum != 0 else None
        if buf is None:
            update = _solve_coupled(lr_p, gp, theta, wd)
            direction = -update / lr_p if wd != 0 else gp
        elif nesterov:
            update = _solve_coupled(lr_p, gp, theta, wd, extra=lr_p * momentum * buf)
            direction = -update / lr_p
        else:
            update = -lr_p * buf
            direction = buf
        yield ParamStep(param=p, grad=p.grad, update=update, eff_lr=lr_p,  # type: ignore[arg-type]
                             direction=direction, first_moment=buf)


#: The optimizers with an exact rule (each with all its flags).
SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = tuple(_RULES)
