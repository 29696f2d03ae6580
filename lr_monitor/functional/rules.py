"""Per-optimizer update rules: the step each parameter just took, from post-step state.

Every ``torch.optim`` optimizer listed in :data:`SUPPORTED_OPTIMIZERS` has a *rule*
here: a function that, right after ``optimizer.step()`` (and before an LR scheduler
steps), reads the post-step state, ``p.grad`` (still set after the step) and the
param group's hyper-parameters, and returns for each parameter a :class:`ParamStep`:

* ``update``: the parameter change ``Δθ = θ_after − θ_before`` of that step,
  reconstructed without a copy of the parameters taken before the step (exact for
  float32/float64 parameters; for bf16/fp16 parameters it is the *intended* update, see
  below);
* ``eff_lr`` and ``direction``: the per-element *effective learning rate* and the
  vector it multiplies;
* the optimizer's first and second moment estimates and where ε dominates the
  denominator.

How ``eff_lr · direction`` relates to the step:

* Adam, Adamax, NAdam, RAdam, Adagrad, Adadelta, SparseAdam, RMSprop without momentum,
  SGD (with or without momentum or Nesterov): ``Δθ = −eff_lr · direction`` exactly when
  there is no decoupled weight decay. With decoupled decay (AdamW,
  ``decoupled_weight_decay=True``, Adafactor's ``weight_decay``) θ is first multiplied
  by ``f = 1 − lr·wd``: ``Δθ = −eff_lr · direction − (1 − f)·θ_before``.
* RMSprop with momentum μ > 0: the step is ``Δθ = −lr·buf`` with
  ``buf = μ·buf_prev + g'/(√v + ε)``; ``eff_lr · direction = lr·g'/(√v + ε)`` is only
  this step's *increment* of ``lr·buf``, so ``Δθ = −eff_lr · direction − μ·lr·buf_prev``.

Notation: ``t`` = ``state["step"]`` after the step, ``bc1 = 1 − β1^t``,
``bc2 = 1 − β2^t``, ``g`` the gradient (negated when ``maximize=True``), ``g' = g + wd·θ``
with coupled weight decay, ``m``/``v`` the first/second moment after the step.

Effective learning rate (``eff_lr``) and the direction it multiplies, per optimizer:

* Adam, AdamW: ``lr / (√v / √bc2 + ε)`` on ``m / bc1`` (``v`` = ``max_exp_avg_sq`` with
  amsgrad; ε is added after bias correction).
* Adagrad: ``lr / (1 + (t−1)·lr_decay) / (√sum + ε)`` on ``g'``.
* RMSprop: ``lr / (√(v − ḡ²) + ε)`` (centered) or ``lr / (√v + ε)`` on ``g'``.
* Adamax: ``lr / u`` with ``u = max(β2·u, |g'| + ε)`` (ε inside the max) on ``m / bc1``;
  ``u`` is already at gradient scale (:attr:`ParamStep.second_moment_is_root`).
* NAdam: ``lr / (√(v / bc2) + ε)`` on ``(1−μ_t)/(1−Πμ)·g' + μ_{t+1}/(1−Πμ·μ_{t+1})·m``.
* RAdam: ``lr·r_t·√bc2 / (√v + ε)`` when ``ρ_t > 5`` (ε added to √v, not √v̂), else
  ``lr``, on ``m / bc1``.
* Adadelta: ``lr·√(u_{t−1} + ε) / √(v + ε)`` on ``g'``.
* Adafactor: ``max(ε2, RMS(θ_before))·min(lr, t^−½) / max(1, RMS(U)/d) / √max(V̂, ε1²)``
  on ``g``.
* SGD: ``lr`` on ``g'``; momentum: on ``buf``; nesterov: on ``g' + μ·buf``.
* SparseAdam: ``lr·√bc2 / (√v + ε)`` (ε added to √v, not √v̂) on ``m / bc1`` restricted
  to the elements the sparse gradient touched (the others do not move).

Decoupled weight decay is in ``update``, not in ``eff_lr``. Coupled weight decay makes
``g' = g + wd·θ_before`` depend on the unknown ``θ_before = θ_after − Δ``; the rules solve
that equation exactly: it is linear in Δ for all but Adadelta (a contracting fixed-point
iteration) and Adafactor (a quadratic in ``RMS(θ_before)``, with a unique positive root
when ``min(lr, 1)·d < 1 − lr·wd``; :func:`supports_group` refuses the other groups). Its
rounding error is ``ulp(θ)·wd·s/|1 − wd·s|`` with ``s = ∂|Δ|/∂g'``: negligible unless the
decayed gradient nearly cancels while the effective lr is large.

Scalars (bias corrections, ``clr``, NAdam's μ, RAdam's ``r_t``) are evaluated with the
same expressions and operand types as torch's step, so that their rounding is torch's
own. Where torch reads ``state["step"]`` into a Python float, the rule keeps that value
in a float64 0-d tensor with Python-float semantics (float64 arithmetic; next to a
tensor operand it is converted to that tensor's dtype, as a Python scalar is), so a
float32 tensor ``lr``, betas or weight decay rounds as in torch; on the
``differentiable``/``capturable`` paths the float32 step tensor itself is used, as torch
does; fused kernels take the hyper-parameters as doubles. No tensor is read back to the
host (a recorded step keeps its single device-to-host transfer), except a tensor
``weight_decay``, compared with 0 as torch's step itself does, and Adafactor's ``lr`` in
the :func:`supports_group` check.

Implementation paths: the rules know which implementation the step ran where it
matters, mirroring torch's dispatch (``foreach``/``fused`` flags, and torch's own default
selection when they are ``None`` — foreach on CUDA, single-tensor on CPU):

* ``foreach`` SGD with Nesterov momentum (no weight decay, no ``maximize``) adds
  ``μ·buf`` into ``p.grad`` in place: the rule reads the overwritten gradient as the
  Nesterov direction and subtracts ``μ·buf`` again for :attr:`ParamStep.grad`.
* SGD's single-tensor path with a tensor ``weight_decay`` that requires grad (and Adam's
  under ``differentiable=True``) overwrites ``p.grad`` with ``g + wd·θ``: handled alike.
* foreach Adamax and NAdam read a tensor ``lr`` as a Python float, foreach RAdam folds it
  into float32 step sizes, the single-tensor paths keep it a tensor; fused CPU SGD takes
  ``lr`` and ``momentum`` in the parameter's dtype (bf16 for bf16 parameters).
* A step a ``GradScaler`` skipped on a fused optimizer (``found_inf``) has ``update`` 0:
  the kernels leave parameters and state untouched, but the post-step hooks run.

Low-precision parameters (bf16/fp16): torch computes the step in the parameter's dtype
and rounds it when adding, so the rule computes, in float32, the *intended* update
(``update`` is float32 for those parameters); the applied one is ``θ_after − θ_before``
and needs a 2-byte copy of θ (:func:`lr_monitor.functional.step.with_applied_update`,
which also sets :attr:`ParamStep.update_lost`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "ParamStep",
    "Rule",
    "UnsupportedOptimizerError",
    "compute_dtype",
    "find_rule",
    "group_steps",
    "is_low_precision",
    "iter_group_steps",
    "register_rule",
    "supports_group",
]


class UnsupportedOptimizerError(TypeError):
    """Raised when no exact rule is known for an optimizer (or for one of its settings)."""


@dataclass(frozen=True)
class ParamStep:
    """The step one parameter took in the most recent ``optimizer.step()``.

    Complex parameters are described through their real view
    (``torch.view_as_real``), as torch's optimizers treat them. Every tensor here is
    detached from autograd (also under ``differentiable=True``).

    Args:
        param: The parameter (after the step).
        grad: The gradient as the optimizer saw it: ``p.grad`` (unscaled, before
            ``maximize``), in the real view for complex parameters. A sparse gradient is
            given coalesced and densified (one tensor at a time). Where torch overwrote
            ``p.grad`` during the step (``foreach`` SGD with Nesterov momentum: ``g + μ·buf``;
            a tensor weight decay that requires grad: ``g + wd·θ``) it is reconstructed by
            subtracting the added term again, exact up to the rounding of the overwritten
            value (about one ulp of ``p.grad``); no copy of the gradient is ever taken.
        update: ``θ_after − θ_before``, same shape as the (real view of the) parameter,
            in the parameter's dtype; for bf16/fp16 parameters the *intended* update in
            float32 (before torch rounded it into the parameter), until
            :func:`~lr_monitor.functional.step.with_applied_update` replaces it by the
            applied one.
        eff_lr: Effective learning rate, elementwise or a 0-d tensor (SGD).
        direction: The vector ``eff_lr`` multiplies (see the module docstring for how
            ``−eff_lr · direction`` relates to ``update``).
        first_moment: ``exp_avg``/``momentum_buffer`` where the optimizer keeps one.
        second_moment: The per-element denominator statistic (``exp_avg_sq``, ``sum``,
            ``square_avg``, ``exp_inf``, Adafactor's ``V̂``) where there is one.
        eps_dominated: Boolean mask of elements where ε is larger than the gradient-based
            part of the denominator, or ``None`` when the optimizer has no ε there.
        update_lost: Boolean mask of elements whose intended update was non-zero but whose
            applied update is exactly zero (rounded away when added to a low-precision
            parameter). Set by
            :func:`~lr_monitor.functional.step.with_applied_update`; ``None`` when the
            applied update was not measured.
        second_moment_is_root: ``True`` when :attr:`second_moment` is already at gradient
            scale (Adamax's ``exp_inf = max(β2·u, |g| + ε)``), so its square root must not
            be taken; ``False`` for the squared-gradient statistics (take ``√``).
    """

    param: Tensor
    grad: Tensor
    update: Tensor
    eff_lr: Tensor
    direction: Tensor
    first_moment: Tensor | None = None
    second_moment: Tensor | None = None
    eps_dominated: Tensor | None = None
    update_lost: Tensor | None = None
    second_moment_is_root: bool = False


Rule = Callable[[dict[str, Any], list[Tensor], list[dict[str, Any]]], Iterator[ParamStep]]
"""A rule maps (param group, params with grad and state, their states) to steps.

Rules are generators: a consumer that reduces each step before asking for the next keeps
only one parameter's temporaries alive (:func:`iter_group_steps`)."""

Check = Callable[[dict[str, Any]], "str | None"]
"""Says why a param group cannot be reconstructed exactly (a message), or ``None``."""


@dataclass(frozen=True)
class _Entry:
    rule: Rule
    sparse_grads: bool
    check: Check | None


_RULES: dict[type[torch.optim.Optimizer], _Entry] = {}


def register_rule(optimizer_cls: type[torch.optim.Optimizer], *, sparse_grads: bool = False,
                  check: Check | None = None) -> Callable[[Rule], Rule]:
    """Register ``rule`` as the exact update rule of ``optimizer_cls`` (not its subclasses).

    A subclass may override ``step`` and so change the math: it gets no rule unless it is
    registered itself, and is measured by the parameter-copy fallback instead.

    Args:
        optimizer_cls: The optimizer class the rule describes.
        sparse_grads: Whether the rule reconstructs steps with sparse gradients.
        check: Optional ``check(group) -> str | None``: a reason why a param group's
            settings cannot be reconstructed exactly, or ``None`` when they can. Used by
            :func:`supports_group` before the step and by :func:`iter_group_steps`.

    Returns:
        A decorator that stores the rule and returns it unchanged.

    Raises:
        TypeError: if ``optimizer_cls`` is not a ``torch.optim.Optimizer`` subclass.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(
            f"optimizer_cls={optimizer_cls!r} is invalid: must be a torch.optim.Optimizer "
            "subclass"
        )

    def deco(rule: Rule) -> Rule:
        _RULES[optimizer_cls] = _Entry(rule, sparse_grads, check)
        return rule

    return deco


def find_rule(optimizer: torch.optim.Optimizer) -> Rule | None:
    """The registered rule for ``type(optimizer)`` exactly, or ``None``.

    Args:
        optimizer: Any optimizer.

    Returns:
        The rule, or ``None`` when the class (not a parent) has none.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> find_rule(torch.optim.Adam([p])) is not None
        True
        >>> class MyAdam(torch.optim.Adam): pass
        >>> find_rule(MyAdam([p])) is None
        True
    """
    entry = _RULES.get(type(optimizer))
    return entry.rule if entry is not None else None


def supports_group(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether :func:`iter_group_steps` will reconstruct ``group``'s next step exactly.

    Cheap and decided *before* the step from the optimizer's class and the group's
    hyper-parameters only (no tensor is read but an Adafactor tensor ``lr``), so a
    recorder can take a parameter copy
    (:class:`~lr_monitor.functional.step.ParamSnapshot`) for the groups it returns
    ``False`` for. ``True`` means: no :class:`UnsupportedOptimizerError` for this group
    after the step, whatever the gradients (dense or sparse — torch itself rejects sparse
    gradients where no rule handles them) and whatever the implementation path
    (single-tensor, ``foreach``, ``fused``, ``differentiable``, ``capturable``).
    Low-precision parameters are supported (the update is the intended one; see
    :func:`~lr_monitor.functional.step.with_applied_update`).

    ``False`` for optimizers without a rule (e.g. ``Rprop``, ``ASGD``, ``LBFGS``,
    ``Muon``, subclasses of supported optimizers) and for Adafactor groups with
    ``min(lr, 1)·d ≥ 1 − lr·weight_decay``, where a step can be as large as the
    parameter and ``θ_before`` is no longer determined by the post-step state.

    Args:
        optimizer: The optimizer.
        group: One of ``optimizer.param_groups``.

    Returns:
        Whether the group's steps can be reconstructed exactly.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, foreach=True)
        >>> supports_group(opt, opt.param_groups[0])
        True
        >>> opt = torch.optim.Rprop([p])
        >>> supports_group(opt, opt.param_groups[0])
        False
    """
    entry = _RULES.get(type(optimizer))
    if entry is None:
        return False
    return entry.check is None or entry.check(group) is None


def is_low_precision(t: Tensor) -> bool:
    """Whether ``t`` (or its real view) is bf16/fp16: torch rounds its steps visibly.

    Args:
        t: A parameter or tensor.

    Returns:
        ``True`` for bfloat16, float16 and complex32 tensors.

    Example:
        >>> is_low_precision(torch.zeros(2, dtype=torch.bfloat16))
        True
        >>> is_low_precision(torch.zeros(2, dtype=torch.complex64))
        False
    """
    return t.dtype.to_real() in (torch.bfloat16, torch.float16)


def _no_rule_message(optimizer: torch.optim.Optimizer) -> str:
    return (
        f"no exact update rule for {type(optimizer).__name__}; supported: "
        f"{', '.join(sorted(c.__name__ for c in _RULES))}. Measure it with "
        "lr_monitor.functional.ParamSnapshot (copies parameters on recorded steps)."
    )


def iter_group_steps(optimizer: torch.optim.Optimizer,
                     group: dict[str, Any]) -> Iterator[ParamStep]:
    """Steps of the parameters of ``group`` that took part in the last step.

    A parameter took part when it has a gradient and optimizer state. Parameters without
    a gradient (frozen, unused) or without state yet (the optimizer never stepped them)
    are left out: they did not move. The rule runs under ``torch.no_grad()`` (only while
    it computes a step, never around the consumer's code) and every tensor it returns
    is detached, so ``differentiable=True`` optimizers build no autograd graph here.

    Args:
        optimizer: The optimizer that just stepped.
        group: One of ``optimizer.param_groups`` (or a copy with a subset of its
            ``params``).

    Yields:
        One :class:`ParamStep` per participating parameter, in group order, computed when
        asked for (reduce each before asking for the next to bound memory).

    Raises:
        UnsupportedOptimizerError: if the optimizer has no exact rule, if
            :func:`supports_group` is ``False`` for the group, or for a sparse gradient
            where the rule has no sparse form.
    """
    entry = _RULES.get(type(optimizer))
    if entry is None:
        raise UnsupportedOptimizerError(_no_rule_message(optimizer))
    reason = entry.check(group) if entry.check is not None else None
    if reason is not None:
        raise UnsupportedOptimizerError(
            f"{type(optimizer).__name__}: {reason}. Measure it with "
            "lr_monitor.functional.ParamSnapshot (copies parameters on recorded steps)."
        )
    params: list[Tensor] = []
    states: list[dict[str, Any]] = []
    for p in group["params"]:
        if p.grad is None:
            continue
        st = optimizer.state.get(p)
        if not st and _needs_state(optimizer, group):
            continue
        if p.grad.is_sparse and not entry.sparse_grads:
            raise UnsupportedOptimizerError(
                f"{type(optimizer).__name__}: sparse gradients are not supported by its "
                "rule (torch.optim.SGD, Adagrad and SparseAdam have sparse rules)"
            )
        params.append(p)
        states.append(st if st is not None else {})
    if not params:
        return
    found_inf = getattr(optimizer, "found_inf", None) if group.get("fused") else None
    steps = entry.rule(group, params, states)
    while True:
        with torch.no_grad():
            s = next(steps, None)
            if s is not None and isinstance(found_inf, Tensor):
                s = _skipped_if_inf(s, found_inf)
        if s is None:
            return
        yield s


def group_steps(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> list[ParamStep]:
    """:func:`iter_group_steps` as a list (every parameter's temporaries at once).

    Args:
        optimizer: The optimizer that just stepped.
        group: One of ``optimizer.param_groups``.

    Returns:
        The steps of the group's participating parameters, in group order.

    Raises:
        UnsupportedOptimizerError: as :func:`iter_group_steps`.
    """
    return list(iter_group_steps(optimizer, group))


def _needs_state(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    # Plain SGD without momentum keeps no state, every other optimizer does.
    return not (type(optimizer) is torch.optim.SGD and group.get("momentum", 0) == 0)


def _skipped_if_inf(s: ParamStep, found_inf: Tensor) -> ParamStep:
    """A fused step skipped by a GradScaler (``found_inf`` ≠ 0) moved nothing.

    The fused kernels return before touching parameters and state, and the step counter
    is decremented again, so the state is the previous step's: its update is 0.
    """
    skipped = found_inf.detach().to(s.update.device) != 0
    return replace(s, update=torch.where(skipped, torch.zeros_like(s.update), s.update))


# ----------------------------------------------------------------------------- scalars


class _Py:
    """A Python float of torch's step, held in a float64 0-d tensor (never read back).

    torch's steps read ``state["step"]`` to the host (``_get_value``) and compute their
    scalars (bias corrections, step sizes) as Python floats. The rules read no tensor to
    the host, so they keep such a value in a 0-d float64 tensor and give it the semantics
    of a Python float: arithmetic with numbers and other ``_Py`` values is float64;
    next to a tensor it is a *wrapped scalar*, converted to that tensor's dtype first,
    as torch converts a Python float argument. So float32 tensor hyper-parameters (a
    tensor ``lr`` or betas) are rounded exactly as in torch's step.
    """

    __slots__ = ("t",)

    def __init__(self, t: Tensor) -> None:
        self.t = t

    def _on(self, other: Tensor) -> Tensor:
        return self.t.to(dtype=other.dtype) if other.dtype != self.t.dtype else self.t

    def _op(self, other: Any, fn: Callable[[Any, Any], Any], reflected: bool) -> Any:
        if isinstance(other, _Py):
            a, b = self.t, other.t
        elif isinstance(other, Tensor):
            a, b = self._on(other), other
        else:
            a, b = self.t, other
        out = fn(b, a) if reflected else fn(a, b)
        return out if isinstance(other, Tensor) else _Py(out)

    def __add__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a + b, False)

    def __radd__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a + b, True)

    def __sub__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a - b, False)

    def __rsub__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a - b, True)

    def __mul__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a * b, False)

    def __rmul__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a * b, True)

    def __truediv__(self, o: Any) -> Any:
        if isinstance(o, Tensor):  # torch's `float / tensor` is tensor.reciprocal() * float
            return o.reciprocal() * self._on(o)
        return self._op(o, lambda a, b: a / b, False)

    def __rtruediv__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a / b, True)

    def __pow__(self, o: Any) -> Any:
        return self._op(o, lambda a, b: a**b, False)

    def __rpow__(self, o: Any) -> Any:
        if isinstance(o, Tensor):
            # `tensor ** python_float`: ATen squares and cubes for exponents 2 and 3
            # instead of calling pow; the step count is an integer ≥ 1.
            e = self._on(o)
            return torch.where(e == 2, o * o, torch.where(e == 3, o * o * o, torch.pow(o, e)))
        return self._op(o, lambda a, b: a**b, True)

    def __neg__(self) -> _Py:
        return _Py(-self.t)

    def _cmp(self, o: Any, fn: Callable[[Tensor, Any], Tensor]) -> Tensor:
        if isinstance(o, _Py):
            return fn(self.t, o.t)
        return fn(self._on(o), o) if isinstance(o, Tensor) else fn(self.t, o)

    def __gt__(self, o: Any) -> Tensor:  # a bool tensor: decisions stay on the device
        return self._cmp(o, torch.gt)

    def __lt__(self, o: Any) -> Tensor:
        return self._cmp(o, torch.lt)


def compute_dtype(p: Tensor) -> torch.dtype:
    """Dtype the rules and statistics compute in: float64 or float32, never lower.

    float64 for float64 (and complex128) tensors, float32 for every other dtype (bf16 and
    fp16 are upcast).

    Example:
        >>> compute_dtype(torch.zeros(1, dtype=torch.bfloat16))
        torch.float32
    """
    return torch.float64 if p.dtype.to_real() == torch.float64 else torch.float32


def _v(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` for arithmetic: detached, dense, real view, upcast from bf16/fp16.

    A view of ``t`` (no copy) for dense float32/float64 tensors: never modify it in place.
    """
    t = t.detach()
    if t.is_sparse:
        t = t.coalesce().to_dense()
    if torch.is_complex(t):
        t = torch.view_as_real(t)
    return t if t.dtype in (torch.float32, torch.float64) else t.to(dtype)


def _grad_out(p: Tensor) -> Tensor:
    """``p.grad`` as :attr:`ParamStep.grad`: detached, dense, real view, own dtype."""
    g = p.grad
    assert g is not None
    g = g.detach()
    if g.is_sparse:
        g = g.coalesce().to_dense()
    return torch.view_as_real(g) if torch.is_complex(g) else g


def _hp(x: Any) -> Any:
    """A hyper-parameter as torch's step uses it: a Python number or a detached 0-d tensor.

    torch's ``_to_scalar`` squeezes one-element tensors to 0-d; autograd history is
    dropped (the rules run under ``no_grad``).
    """
    return x.detach().reshape(()) if isinstance(x, Tensor) else x


def _py(x: Any) -> Any:
    """A hyper-parameter torch reads as a Python float (``_get_value``, fused kernels)."""
    return _Py(x.to(torch.float64)) if isinstance(x, Tensor) else x


def _step_of(st: dict[str, Any], *, tensor_path: bool) -> Any:
    """The step count as torch's step evaluates its scalars with it.

    ``tensor_path`` (torch's ``differentiable``/``capturable`` branches): the step tensor
    itself (float32, so those scalars are float32 tensor math). Otherwise the Python
    float torch reads with ``_get_value``, as a :class:`_Py` (no host read).
    """
    s = st["step"]
    if not isinstance(s, Tensor):
        return float(s)  # SparseAdam keeps a Python int
    s = s.detach()
    return s if tensor_path else _Py(s.to(torch.float64))


def _round(x: Any, dtype: torch.dtype) -> Any:
    """A Python float (or :class:`_Py`) rounded to ``dtype``, as a kernel rounds a scalar.

    0-d tensors are returned unchanged (torch uses their value as it is).
    """
    if dtype == torch.float64 or isinstance(x, Tensor):
        return x
    t = x.t if isinstance(x, _Py) else torch.tensor(x, dtype=torch.float64)
    return _Py(t.to(dtype).to(torch.float64))


def _s(x: Any, dtype: torch.dtype) -> Any:
    """A scalar for exact arithmetic in ``dtype``: 0-d tensors converted, floats kept.

    For values torch applies as they are (``alpha=-lr``, ``value=-lr``), so that a
    float32 tensor ``lr`` is not rounded again in products such as ``lr·μ``.
    """
    if isinstance(x, _Py):
        return x.t.to(dtype)
    return x.to(dtype) if isinstance(x, Tensor) and x.dim() == 0 else x


def _as_tensor(x: Any, like: Tensor) -> Tensor:
    """A scalar (float, :class:`_Py` or 0-d tensor) as a 0-d tensor usable with ``like``."""
    if isinstance(x, _Py):
        x = x.t
    if isinstance(x, Tensor):
        return x.to(device=like.device, dtype=like.dtype)
    return torch.tensor(x, dtype=like.dtype, device=like.device)


def _is_nonzero(x: Any) -> bool:
    """``x != 0`` for a hyper-parameter (a tensor weight decay is read, as torch reads it)."""
    return bool(x != 0)


def _decoupled(adaptive: Tensor, theta: Tensor, factor: Any) -> Tensor:
    """Δ for ``θ_after = θ_before·f + adaptive`` (decoupled decay, ``f = 1 − lr·wd``).

    ``f`` is the value torch multiplied by (rounded as its kernel rounds it). With
    ``c = 1 − f`` (exact), ``Δ = adaptive − c·θ_before`` and
    ``θ_before = (θ_after − adaptive)/f``, so ``Δ = adaptive − c/f·(θ_after − adaptive)``;
    computed in that form it keeps the precision of ``adaptive`` (no difference of two
    nearly equal parameter tensors).
    """
    f = _round(factor, adaptive.dtype)
    f = _s(f, adaptive.dtype) if isinstance(f, Tensor) else f
    k = (1 - f) / f
    return adaptive - k * (theta - adaptive)


def _solve_coupled(rhs_scale: Any, gp: Tensor, theta: Tensor, wd: Any,
                   extra: Tensor | None = None) -> Tensor:
    """Δ for ``Δ = −s·(g + wd·θ_before) [− extra]`` with ``θ_before = θ_after − Δ``.

    Linear in Δ: ``Δ·(1 − s·wd) = −s·(g + wd·θ_after) [− extra]``.
    """
    on = _is_nonzero(wd)
    rhs_scale, wd = _s(rhs_scale, gp.dtype), _s(wd, gp.dtype)
    num = rhs_scale * (gp + wd * theta) if on else rhs_scale * gp
    if extra is not None:
        num = num + extra
    return -num / (1 - rhs_scale * wd) if on else -num


def _coupled_direction(gp: Tensor, theta: Tensor, update: Tensor, wd: Any) -> Tensor:
    """``g' = g + wd·θ_before`` with ``θ_before = θ_after − Δ``."""
    return gp + _s(wd, gp.dtype) * (theta - update) if _is_nonzero(wd) else gp


def _wd_overwrites_grad(group: dict[str, Any]) -> bool:
    """Whether torch's step overwrote ``p.grad`` with ``g + wd·θ`` (``addcmul_`` in place).

    SGD's and Adam's single-tensor paths take it for a weight decay tensor that requires
    grad (Adam: only with ``differentiable=True``) unless ``maximize`` (then the
    gradient is a negated copy). The foreach and fused paths never do.
    """
    wd = group.get("weight_decay", 0)
    return (isinstance(wd, Tensor) and wd.requires_grad and _is_nonzero(wd)
            and not group.get("maximize", False))


def _default_foreach(params: list[Tensor], *, differentiable: bool) -> bool:
    """Whether torch picks its foreach implementation when ``foreach`` is ``None``.

    Asks torch's own (private) ``_default_to_fused_or_foreach``; if that helper is missing
    or changed, applies the rule it has implemented since torch 2.0: foreach when not
    differentiable and every parameter is a plain tensor on a device with foreach
    kernels (CUDA, XPU, MTIA, the private-use backend).
    """
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        return bool(_default_to_fused_or_foreach(list(params), differentiable=differentiable,
                                                 use_fused=False)[1])
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    if differentiable:
        return False
    try:
        from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

        devices = list(_get_foreach_kernels_supported_devices())
    except (ImportError, AttributeError):  # pragma: no cover - depends on torch internals
        devices = ["cuda", "xpu", "mtia", torch._C._get_privateuse1_backend_name()]
    return all(type(p) in (Tensor, torch.nn.Parameter) and p.device.type in devices
               for p in params)


def _impl_path(group: dict[str, Any], params: list[Tensor], *, style: str) -> str:
    """The implementation torch's functional API ran: ``fused``, ``foreach`` or ``single``.

    Mirrors the dispatch of the installed torch (2.x):

    * ``sgd``: a default is chosen only when ``foreach`` and ``fused`` are both ``None``,
      with ``differentiable=False`` whatever the group's flag;
    * ``adam`` (Adam, AdamW) and ``adagrad``: a default only when both are ``None``;
      Adam then keeps the single-tensor path for a tensor ``lr`` without ``capturable``;
    * ``foreach`` (RMSprop, Adamax, NAdam, RAdam, Adadelta): a default when ``foreach``
      is ``None``;
    * ``adafactor``: foreach only when ``foreach`` is true.

    Args:
        group: The param group.
        params: Its parameters that had a gradient (what torch passes to the selection).
        style: One of the names above.

    Returns:
        ``"fused"``, ``"foreach"`` or ``"single"``.
    """
    foreach, fused = group.get("foreach"), group.get("fused")
    if style == "adafactor":
        return "foreach" if foreach else "single"
    if fused and not foreach:
        return "fused"
    if style in ("sgd", "adam", "adagrad"):
        if foreach is None and fused is None:
            diff = False if style == "sgd" else bool(group.get("differentiable", False))
            foreach = _default_foreach(params, differentiable=diff)
            if (style == "adam" and foreach and isinstance(group["lr"], Tensor)
                    and not group.get("capturable", False)):
                foreach = False
    elif foreach is None:
        foreach = _default_foreach(params, differentiable=bool(group.get("differentiable")))
    return "foreach" if foreach else "single"


# ----------------------------------------------------------------------------- rules


def _adam_like(group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]],
               *, decoupled: bool) -> Iterator[ParamStep]:
    lr = _hp(group["lr"])
    beta1, beta2 = (_hp(b) for b in group["betas"])
    wd = _hp(group.get("weight_decay", 0.0))
    wd_on = _is_nonzero(wd)
    eps = float(group["eps"])
    amsgrad = bool(group.get("amsgrad", False))
    fused = _impl_path(group, params, style="adam") == "fused"
    if fused:  # the fused kernels take every hyper-parameter as a double
        lr, beta1, beta2, wd = _py(lr), _py(beta1), _py(beta2), _py(wd)
    # torch's single-tensor `capturable or differentiable` branch computes its scalars from
    # the (float32) step tensor; the foreach capturable branch runs on accelerators only.
    tensor_path = not fused and bool(group.get("differentiable", False)
                                     or group.get("capturable", False))
    grad_overwritten = (not decoupled and group.get("differentiable", False)
                        and _wd_overwrites_grad(group))
    for p, st in zip(params, states, strict=True):
        dt = compute_dtype(p)
        step = _step_of(st, tensor_path=tensor_path)
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        m = _v(st["exp_avg"], dt)
        v = _v(st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"], dt)
        if tensor_path:
            # denom = √v/(√bc2·(−lr/bc1)) + ε/(−lr/bc1); θ += m/denom (all scalars float32).
            v_sqrt = v.sqrt()
            step_size_neg = (lr / bc1).neg()
            denom = v_sqrt / (bc2.sqrt() * step_size_neg) + eps / step_size_neg
            adaptive = m / denom
            eff = (-bc1) / denom
            eps_dominated = v_sqrt / bc2.sqrt() < eps
        else:
            # In place on two buffers (this pass runs over the whole model), with the same
            # kernels and operand order as torch's step, so the rounding is the same.
            step_size = lr / bc1
            denom = v.sqrt().div_(_s(bc2**0.5, dt))  # √v̂
            eps_dominated = denom < eps
            denom.add_(eps)
            adaptive = torch.div(m, denom).mul_(_s(-step_size, dt))
            # lr up to torch's rounding of lr/bc1, so that −eff·(m/bc1) is the step. A
            # Python float over a tensor is reciprocal-then-multiply in torch.
            c = _s(step_size, dt) * _s(bc1, dt)
            eff = c / denom if isinstance(c, Tensor) else denom.reciprocal_().mul_(c)
        direction = m / bc1
        theta = _v(p, dt)
        update = _decoupled(adaptive, theta, 1 - lr * wd) if decoupled and wd_on else adaptive
        grad = _grad_out(p)
        if grad_overwritten:
            grad = _v(p.grad, dt) - _s(wd, dt) * (theta - update)  # type: ignore[arg-type]
        yield ParamStep(
            param=p, grad=grad, update=update, eff_lr=eff, direction=direction,
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


@register_rule(torch.optim.Adagrad, sparse_grads=True)
def _adagrad(group: dict[str, Any], params: list[Tensor],
             states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    lr = _hp(group["lr"])
    lr_decay = group["lr_decay"]
    wd = _hp(group["weight_decay"])
    eps = float(group["eps"])
    maximize = bool(group.get("maximize", False))
    if _impl_path(group, params, style="adagrad") == "fused":
        lr = _py(lr)  # the fused kernel computes clr in double
    for p, st in zip(params, states, strict=True):
        dt = compute_dtype(p)
        step = _step_of(st, tensor_path=False)  # _get_value on every path
        clr = lr / (1 + (step - 1) * lr_decay)
        s = _v(st["sum"], dt)
        g = _v(p.grad, dt)  # type: ignore[arg-type]
        gp = -g if maximize else g
        theta = _v(p, dt)
        s_sqrt = s.sqrt()
        eff = clr / (s_sqrt + eps)
        # Sparse gradients (no weight decay there): untouched elements have g = 0 and
        # do not move, exactly as torch's sparse_mask update.
        update = _solve_coupled(eff, gp, theta, wd)
        yield ParamStep(param=p, grad=_grad_out(p), update=update, eff_lr=eff,
                        direction=_coupled_direction(gp, theta, update, wd),
                        second_moment=s, eps_dominated=s_sqrt < eps)


@register_rule(torch.optim.RMSprop)
def _rmsprop(group: dict[str, Any], params: list[Tensor],
             states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    lr0 = _hp(group["lr"])
    wd = _hp(group["weight_decay"])
    eps = float(group["eps"])
    momentum = float(group["momentum"])
    centered = bool(group["centered"])
    maximize = bool(group.get("maximize", False))
    for p, st in zip(params, states, strict=True):
        dt = compute_dtype(p)
        lr = _s(lr0, dt)  # applied by value (value=-lr, alpha=-lr)
        v = _v(st["square_avg"], dt)
        g = _v(p.grad, dt)  # type: ignore[arg-type]
        gp = -g if maximize else g
        theta = _v(p, dt)
        if centered:
            ga = _v(st["grad_avg"], dt)
            avg_core = v.addcmul(ga, ga, value=-1).sqrt()
        else:
            avg_core = v.sqrt()
        eff = lr / (avg_core + eps)
        first = None
        if momentum > 0:
            buf = _v(st["momentum_buffer"], dt)
            update = -lr * buf
            first = buf
        else:
            update = _solve_coupled(eff, gp, theta, wd)
        yield ParamStep(param=p, grad=_grad_out(p), update=update, eff_lr=eff,
                        direction=_coupled_direction(gp, theta, update, wd),
                        first_moment=first, second_moment=v, eps_dominated=avg_core < eps)


@register_rule(torch.optim.Adamax)
def _adamax(group: dict[str, Any], params: list[Tensor],
            states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    lr = _hp(group["lr"])
    beta1 = _hp(group["betas"][0])
    eps = float(group["eps"])
    capturable = bool(group.get("capturable", False))
    if not capturable and _impl_path(group, params, style="foreach") == "foreach":
        lr = _py(lr)  # foreach reads a tensor lr with _get_value
    for p, st in zip(params, states, strict=True):
        dt = compute_dtype(p)
        step = _step_of(st, tensor_path=capturable)
        m, u = _v(st["exp_avg"], dt), _v(st["exp_inf"], dt)
        bc = 1 - beta1**step
        if capturable:
            # θ += m / (u·(β1^t − 1)/lr), scalars on the step tensor's device and dtype.
            scaled_u = u * ((beta1**step - 1) / lr)
            adaptive = m / scaled_u
            eff = (-bc) / scaled_u
        else:
            clr = lr / bc
            adaptive = m / u * (-clr)
            eff = (_s(clr, dt) * _s(bc, dt)) / u
        yield ParamStep(param=p, grad=_grad_out(p), update=adaptive, eff_lr=eff,
                        direction=m / bc, first_moment=m, second_moment=u,
                        eps_dominated=u < 2 * eps, second_moment_is_root=True)


@register_rule(torch.optim.NAdam)
def _nadam(group: dict[str, Any], params: list[Tensor],
           states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    lr = _hp(group["lr"])
    beta1, beta2 = (_hp(b) for b in group["betas"])
    psi = group["momentum_decay"]
    wd = _hp(group["weight_decay"])
    wd_on = _is_nonzero(wd)
    eps = float(group["eps"])
    decoupled = bool(group.get("decoupled_weight_decay", False))
    maximize = bool(group.get("maximize", False))
    capturable = bool(group.get("capturable", False))
    # The step is read (_get_value) unless capturable; the addcdiv coefficients are
    # tensor math on the float32 mu_product when differentiable or capturable.
    tensor_coefficients = capturable or bool(group.get("differentiable", False))
    decay_factor = 1 - lr * wd  # θ *= 1 − lr·wd with lr as the group holds it
    if not capturable and _impl_path(group, params, style="foreach") == "foreach":
        lr = _py(lr)  # foreach reads a tensor lr with _get_value for its step sizes
    for p, st in zip(params, states, strict=True):
        dt = compute_dtype(p)
        step = _step_of(st, tensor_path=capturable)
        bc2 = 1 - beta2**step
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * psi)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * psi)))
        mp_t = st["mu_product"].detach()  # Π μ including this step's μ (post-step)
        mp = mp_t if tensor_coefficients else _py(mp_t)
        mp_next = mp * mu_next
        # torch's two addcdiv_ coefficients (negative), with its operand types.
        c_g = -lr * (1.0 - mu) / (1.0 - mp)
        c_m = (-lr * mu_next) / (1.0 - mp_next)
        m, v = _v(st["exp_avg"], dt), _v(st["exp_avg_sq"], dt)
        g = _v(p.grad, dt)  # type: ignore[arg-type]
        gp = -g if maximize else g
        theta = _v(p, dt)
        vhat_sqrt = v.div(_s(bc2, dt) if isinstance(bc2, _Py) else bc2).sqrt()
        denom = vhat_sqrt + eps
        if wd_on and not decoupled:
            # g' = g + wd·θ_before enters linearly with coefficient c_g/denom.
            update = _solve_coupled(-c_g / denom, gp, theta, wd, extra=-c_m * m / denom)
        else:
            update = c_g * gp / denom + c_m * m / denom
            if wd_on:
                update = _decoupled(update, theta, decay_factor)
        g_eff = _coupled_direction(gp, theta, update, wd if not decoupled else 0)
        # direction = c_g/(−lr)·g' + c_m/(−lr)·m, i.e. (1−μ_t)/(1−Πμ)·g' + ... up to
        # torch's rounding of c_g, c_m; the exact-math coefficients where lr = 0.
        lr_d = _as_tensor(lr, vhat_sqrt)
        k_g = torch.where(lr_d != 0, _as_tensor(c_g, vhat_sqrt) / -lr_d,
                          _as_tensor((1.0 - mu) / (1.0 - mp), vhat_sqrt))
        k_m = torch.where(lr_d != 0, _as_tensor(c_m, vhat_sqrt) / -lr_d,
                          _as_tensor(mu_next / (1.0 - mp_next), vhat_sqrt))
        direction = k_g * g_eff + k_m * m
        yield ParamStep(param=p, grad=_grad_out(p), update=update, eff_lr=lr / denom,
                        direction=direction, first_moment=m, second_moment=v,
                        eps_dominated=vhat_sqrt < eps)


@register_rule(torch.optim.RAdam)
def _radam(group: dict[str, Any], params: list[Tensor],
           states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    lr = _hp(group["lr"])
    beta1, beta2 = (_hp(b) for b in group["betas"])
    wd = _hp(group["weight_decay"])
    eps = float(group["eps"])
    decoupled = bool(group.get("decoupled_weight_decay", False))
    capturable = bool(group.get("capturable", False))  # differentiable reads the step
    foreach = not capturable and _impl_path(group, params, style="foreach") == "foreach"
    for p, st in zip(params, states, strict=True):
        dt = compute_dtype(p)
        step = _step_of(st, tensor_path=capturable)
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bc2
        m, v = _v(st["exp_avg"], dt), _v(st["exp_avg_sq"], dt)
        theta = _v(p, dt)
        direction = m / bc1
        v_sqrt = v.sqrt()
        # ρ_t > 5 decides per parameter; kept on the device (no host read), both branches
        # computed and selected.
        rectified = _as_tensor(rho_t > 5.0, v_sqrt).bool()
        rect_sq = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        rect = (_Py(rect_sq.t.clamp(min=0) ** 0.5) if isinstance(rect_sq, _Py)
                else rect_sq.clamp(min=0) ** 0.5)
        if foreach:
            # θ += m / ((√v + ε) / s), s = √bc2·(lr·r_t/bc1)·(−1), and the warm-up step
            # θ += m·((lr·1.0/bc1)·(−1)): torch's scalars with their types.
            scale = (bc2**0.5) * (lr * rect / bc1) * -1
            on = -(1 / ((v_sqrt + eps) / _as_tensor(scale, v_sqrt))) * _s(bc1, dt)
            off = -_as_tensor((lr * 1.0 / bc1) * -1, v_sqrt) * _s(bc1, dt)
        else:
            on = (_as_tensor(bc2**0.5, v_sqrt) / (v_sqrt + eps)) * _s(lr, dt) * _s(rect, dt)
            off = _as_tensor(lr, v_sqrt)
        eff = torch.where(rectified, on, off)
        eps_dominated = (v_sqrt < eps) & rectified
        adaptive = -(eff * direction)
        update = _decoupled(adaptive, theta, 1 - lr * wd) if (
            decoupled and _is_nonzero(wd)) else adaptive
        yield ParamStep(param=p, grad=_grad_out(p), update=update, eff_lr=eff,
                        direction=direction, first_moment=m, second_moment=v,
                        eps_dominated=eps_dominated)


@register_rule(torch.optim.Adadelta)
def _adadelta(group: dict[str, Any], params: list[Tensor],
              states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    lr0 = _hp(group["lr"])
    rho = float(group["rho"])
    eps = float(group["eps"])
    wd = _hp(group["weight_decay"])
    wd_on = _is_nonzero(wd)
    maximize = bool(group.get("maximize", False))
    for p, st in zip(params, states, strict=True):
        dt = compute_dtype(p)
        lr = _s(lr0, dt)  # applied by value (alpha=-lr)
        wd_d = _s(wd, dt)
        v, u = _v(st["square_avg"], dt), _v(st["acc_delta"], dt)
        g = _v(p.grad, dt)  # type: ignore[arg-type]
        gp = -g if maximize else g
        theta = _v(p, dt)
        std = v.add(eps).sqrt()
        # Invert u_t = ρ·u_{t−1} + (1−ρ)·δ², δ = √(u_{t−1}+ε)/std·g', for u_{t−1}:
        # u_{t−1} = (u_t − (1−ρ)·ε·s) / (ρ + (1−ρ)·s), s = g'²/(v+ε). Where the
        # denominator is 0 (ρ = 0 and g' = 0) δ = 0 whatever u_{t−1} was.
        # With weight decay g' depends on θ_before = θ_after + lr·δ: a contraction with
        # factor lr·wd·√(u+ε)/std, solved by fixed-point iteration.
        g_eff = gp + wd_d * theta if wd_on else gp
        for _ in range(40 if wd_on else 1):
            s = g_eff.square() / (v + eps)
            den = rho + (1 - rho) * s
            u_prev = torch.where(den > 0, (u - (1 - rho) * eps * s) / den,
                                 torch.zeros_like(u)).clamp(min=0)
            eff_core = u_prev.add(eps).sqrt() / std
            if not wd_on:
                break
            g_eff = gp + wd_d * (theta + lr * eff_core * g_eff)
        eff = lr * eff_core
        yield ParamStep(param=p, grad=_grad_out(p), update=-eff * g_eff, eff_lr=eff,
                        direction=g_eff, second_moment=v, eps_dominated=v < eps)


def _adafactor_check(group: dict[str, Any]) -> str | None:
    lr_f, d, wd = float(group["lr"]), float(group["d"]), float(group["weight_decay"])
    if min(lr_f, 1.0) * d < 1 - lr_f * wd:
        return None
    return (f"lr={lr_f:g} with d={d:g} and weight_decay={wd:g} allows a step as large as the "
            "parameter (min(lr, 1)·d ≥ 1 − lr·weight_decay), where RMS(θ_before), and so "
            "the step, is not determined by the post-step state")


@register_rule(torch.optim.Adafactor, check=_adafactor_check)
def _adafactor(group: dict[str, Any], params: list[Tensor],
               states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    lr = _hp(group["lr"])
    eps1_cfg, eps2 = group["eps"]
    d = float(group["d"])
    wd = _hp(group["weight_decay"])
    maximize = bool(group.get("maximize", False))
    for p, st in zip(params, states, strict=True):
        dt = compute_dtype(p)
        step = _step_of(st, tensor_path=False)  # torch: step_t.item()
        inv_sqrt = 1 / (step**0.5)
        eps1 = torch.finfo(p.dtype).eps if eps1_cfg is None else float(eps1_cfg)
        g = _v(p.grad, dt)  # type: ignore[arg-type]
        gp = -g if maximize else g
        theta = _v(p, dt)
        if gp.dim() > 1:
            row, col = _v(st["row_var"], dt), _v(st["col_var"], dt)
            var = (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp(min=eps1))
        else:
            var = _v(st["variance"], dt)
        inv = var.clamp(min=eps1 * eps1).rsqrt()
        u_dir = inv * gp
        n = p.numel()
        u_norm = u_dir.norm().double()
        # torch: max(1, ‖U‖.item()/(√n·d)) in double
        denom = torch.clamp(u_norm / ((n**0.5) * d), min=1.0)
        # ρ_t = min(lr, t^−½): torch's Python min keeps lr unless t^−½ < lr.
        take_inv = inv_sqrt < lr if isinstance(lr, Tensor) else None
        rho64 = (torch.where(take_inv, _as_tensor(inv_sqrt, denom), _as_tensor(lr, denom))
                 if take_inv is not None else torch.clamp(_as_tensor(inv_sqrt, denom), max=lr))
        # θ_after = f·θ_before − c·U with f = 1 − lr·wd, c = max(ε2, r)·ρ_t/denom and
        # r = RMS(θ_before) = ‖θ_after + c·U‖/(√n·f). For r ≥ ε2, c = k·r (k = ρ_t/denom):
        # A·r² − 2·k·b·r − a2 = 0, A = n·f² − k²·‖U‖², a2 = ‖θ_after‖², b = θ_after·U, whose
        # only positive root (A > 0, guaranteed by _adafactor_check) is a2/(S − k·b) =
        # (k·b + S)/A, S = √(k²b² + A·a2). If that root is below ε2, then c = k·ε2.
        f = _as_tensor(_round(1 - lr * wd, dt), denom)
        k = rho64 / denom
        a2 = theta.square().sum().double()
        b = (theta * u_dir).sum().double()
        big_a = n * f * f - k * k * u_norm.square()
        kb = k * b
        root = (kb * kb + big_a * a2).clamp(min=0).sqrt()
        r = torch.where(kb < 0, a2 / (root - kb), (kb + root) / big_a)
        r = torch.clamp(torch.where(a2 > 0, r, torch.zeros_like(r)), min=eps2)
        c = r * rho64 / denom  # Python floats: double
        if take_inv is not None:
            # tensor lr: alpha = max(ε2, r)·lr and −alpha/denom are float32 tensor math.
            # c is then a step function of r, and two θ_before one float32 ulp of c apart
            # can give the same θ_after: exact to that ulp (≤ 1.2e-7 of the step).
            c32 = r.to(lr.dtype) * lr / denom.to(lr.dtype)
            c = torch.where(take_inv, c, c32.double())
        c = c.to(dt)
        eff = c * inv
        adaptive = -c * u_dir
        update = _decoupled(adaptive, theta, f) if _is_nonzero(wd) else adaptive
        yield ParamStep(param=p, grad=_grad_out(p), update=update, eff_lr=eff,
                        direction=gp, second_moment=var, eps_dominated=var < eps1 * eps1)


@register_rule(torch.optim.SGD, sparse_grads=True)
def _sgd(group: dict[str, Any], params: list[Tensor],
         states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    lr0 = _hp(group["lr"])
    wd0 = _hp(group["weight_decay"])
    wd_on = _is_nonzero(wd0)
    momentum = float(group["momentum"])
    nesterov = bool(group["nesterov"])
    maximize = bool(group.get("maximize", False))
    path = _impl_path(group, params, style="sgd")
    # foreach + Nesterov adds μ·buf into p.grad in place when the gradient list is
    # p.grad itself (no maximize copy, no weight-decay copy).
    nesterov_in_grad = (path == "foreach" and nesterov and momentum != 0 and not wd_on
                        and not maximize)
    # single-tensor path with a weight decay tensor requiring grad: p.grad = g + wd·θ.
    wd_in_grad = path == "single" and _wd_overwrites_grad(group)
    for p, st in zip(params, states, strict=True):
        dt = compute_dtype(p)
        lr, wd = _s(lr0, dt), _s(wd0, dt)  # torch applies both by value (alpha=...)
        mu: Any = momentum
        if path == "fused" and is_low_precision(p):
            # the fused CPU kernel takes scalar_t(lr), scalar_t(momentum): bf16/fp16
            lr, mu = _s(_round(_py(lr0), p.dtype), dt), _s(_round(momentum, p.dtype), dt)
        theta = _v(p, dt)
        g_after = _v(p.grad, dt)  # type: ignore[arg-type]
        buf_t = st.get("momentum_buffer") if momentum != 0 else None
        buf = _v(buf_t, dt) if buf_t is not None else None
        grad: Tensor = _grad_out(p)
        if nesterov_in_grad and buf is not None:
            update = -lr * g_after  # p.grad = g + μ·buf: exactly what was applied
            direction = g_after
            grad = g_after - mu * buf
        elif wd_in_grad:
            g_dec = g_after  # g' = g + wd·θ_before, known
            direction = g_dec + mu * buf if nesterov and buf is not None else (
                buf if buf is not None else g_dec)
            update = -lr * direction
            grad = g_after - wd * (theta - update)
        else:
            gp = -g_after if maximize else g_after
            if buf is None:
                update = _solve_coupled(lr, gp, theta, wd)
                direction = _coupled_direction(gp, theta, update, wd)
            elif nesterov:
                update = _solve_coupled(lr, gp, theta, wd, extra=lr * mu * buf)
                direction = _coupled_direction(gp, theta, update, wd) + mu * buf
            else:
                update = -lr * buf
                direction = buf
        yield ParamStep(param=p, grad=grad, update=update, eff_lr=_as_tensor(lr, update),
                        direction=direction, first_moment=buf)


@register_rule(torch.optim.SparseAdam, sparse_grads=True)
def _sparse_adam(group: dict[str, Any], params: list[Tensor],
                 states: list[dict[str, Any]]) -> Iterator[ParamStep]:
    lr = _hp(group["lr"])
    beta1, beta2 = (_hp(b) for b in group["betas"])
    eps = float(group["eps"])
    for p, st in zip(params, states, strict=True):
        dt = compute_dtype(p)
        step = _step_of(st, tensor_path=False)  # a Python int in SparseAdam's state
        g = p.grad
        assert g is not None
        m, v = _v(st["exp_avg"], dt), _v(st["exp_avg_sq"], dt)
        # Only the elements at the (coalesced) gradient's indices move.
        touched = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        if g.is_sparse:
            idx = g.detach().coalesce()._indices()
            if idx.numel():
                touched[tuple(idx)] = True
        else:  # torch raises for dense gradients; keep the rule total anyway
            touched.fill_(True)
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        # torch: lr·math.sqrt(bc2)/bc1 — math.sqrt gives a Python float even for a tensor.
        sqrt_bc2 = _py(bc2) ** 0.5 if isinstance(bc2, Tensor) else math.sqrt(bc2)
        step_size = lr * sqrt_bc2 / bc1
        v_sqrt = v.sqrt()
        denom = v_sqrt + eps
        update = torch.where(touched, -step_size * (m / denom), torch.zeros_like(m))
        direction = torch.where(touched, m / bc1, torch.zeros_like(m))
        eff = (_s(step_size, dt) * _s(bc1, dt)) / denom  # lr·√bc2/(√v + ε)
        yield ParamStep(param=p, grad=_grad_out(p), update=update, eff_lr=eff,
                        direction=direction, first_moment=m, second_moment=v,
                        eps_dominated=v_sqrt < eps)


#: The optimizers with an exact rule: every flag, on every implementation path (Adafactor:
#: while ``min(lr, 1)·d < 1 − lr·weight_decay``; see :func:`supports_group`).
SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = tuple(_RULES)
