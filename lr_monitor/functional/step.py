"""The most recent optimizer step, per parameter: effective learning rate and update.

Call these right after ``optimizer.step()`` and before ``scheduler.step()`` (the rules
read ``group["lr"]`` as the step used it): in a step post-hook
(``optimizer.register_step_post_hook``), or in a plain loop between the two calls.

Optimizers without an exact rule (see :data:`lr_monitor.functional.SUPPORTED_OPTIMIZERS`)
and param groups :func:`~lr_monitor.functional.rules.supports_group` refuses are measured
by :class:`ParamSnapshot`, which copies the parameters before the steps you want to
record and diffs them after. That costs one parameter-sized copy on those steps; nothing
is ever guessed.

bf16/fp16 parameters: torch computes the step in the parameter's dtype and rounds it
when adding it, so the rule's update is the *intended* one. :func:`with_applied_update`
turns it into the applied ``θ_after − θ_before`` from a copy of the parameter taken
before the step (2 bytes per element, on recorded steps only) and marks the elements
whose update was rounded away.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> opt = torch.optim.Adam([p], lr=0.1)
    >>> p.grad = torch.tensor([0.5, 0.5]); opt.step()
    >>> last_update(opt)[p]  # the first Adam step moves every element by ≈ lr
    tensor([-0.1000, -0.1000])
    >>> effective_lr(opt)[p]  # lr / (|g| + ε): the factor on the bias-corrected moment
    tensor([0.2000, 0.2000])
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import Tensor

from lr_monitor.functional.rules import ParamStep, compute_dtype, find_rule, group_steps

__all__ = [
    "ParamSnapshot",
    "applied_update",
    "effective_lr",
    "is_supported",
    "last_update",
    "optimizer_steps",
    "with_applied_update",
]


def optimizer_steps(optimizer: torch.optim.Optimizer) -> list[list[ParamStep]]:
    """The :class:`~lr_monitor.functional.ParamStep` of every parameter, per param group.

    Args:
        optimizer: An optimizer with an exact rule, right after its ``step()``.

    Returns:
        One list per ``optimizer.param_groups`` entry (possibly empty).

    Raises:
        UnsupportedOptimizerError: for an optimizer or setting without an exact rule.
    """
    return [group_steps(optimizer, g) for g in optimizer.param_groups]


def _as_param_shape(t: Tensor, p: Tensor) -> Tensor:
    real = torch.view_as_real(p.detach()) if torch.is_complex(p) else p.detach()
    return t.expand_as(real)


def effective_lr(optimizer: torch.optim.Optimizer) -> dict[Tensor, Tensor]:
    """Per element, the effective learning rate of the step the optimizer just took.

    It is the factor that multiplies the (bias-corrected) first moment or the gradient:
    Adam ``lr / (√v̂ + ε)``, Adagrad ``clr / (√sum + ε)``, RMSprop
    ``lr / (√(v [− ḡ²]) + ε)``, SGD ``lr`` (the full table is in
    :mod:`lr_monitor.functional.rules` and ``docs/optimizers.md``).

    Args:
        optimizer: A supported optimizer, right after ``step()``.

    Returns:
        A dict from each parameter that took part in the step to a tensor of its shape
        (complex parameters: the shape of ``torch.view_as_real(p)``). Parameters without
        a gradient or without state are absent.

    Raises:
        UnsupportedOptimizerError: for an optimizer or setting without an exact rule.
    """
    return {s.param: _as_param_shape(s.eff_lr, s.param)
            for steps in optimizer_steps(optimizer) for s in steps}


def last_update(optimizer: torch.optim.Optimizer) -> dict[Tensor, Tensor]:
    """The exact update ``θ_after − θ_before`` of the most recent ``optimizer.step()``.

    Reconstructed from the post-step state, the hyper-parameters and ``p.grad`` (still set
    after the step); no copy of the parameters is needed.

    Args:
        optimizer: A supported optimizer, right after ``step()``.

    Returns:
        A dict from each parameter that took part in the step to its update (same shape
        and dtype as the parameter; float32 for bf16/fp16 parameters, whose update is the
        *intended* one — see :func:`with_applied_update`). Parameters without a gradient
        or state are absent.

    Raises:
        UnsupportedOptimizerError: for an optimizer or setting without an exact rule;
            use :class:`ParamSnapshot` for those.
    """
    out = {}
    for steps in optimizer_steps(optimizer):
        for s in steps:
            u = s.update
            out[s.param] = torch.view_as_complex(u.contiguous()) if torch.is_complex(s.param) else u
    return out


class ParamSnapshot:
    """Measure updates of any optimizer by copying parameters before the step.

    The documented fallback for optimizers without an exact rule: :meth:`take` before
    ``step()`` (only on the steps you record), :meth:`updates` after. Memory: one copy of
    the optimizer's parameters, held from :meth:`take` to :meth:`updates`.

    Args:
        optimizer: Any ``torch.optim.Optimizer``.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.Rprop([p], lr=0.01)
        >>> snap = ParamSnapshot(opt)
        >>> p.grad = torch.ones(3)
        >>> snap.take(); opt.step(); snap.updates()[p]
        tensor([-0.0100, -0.0100, -0.0100])
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._before: dict[Tensor, Tensor] = {}

    def take(self, params: Iterable[Tensor] | None = None) -> None:
        """Copy the parameters (call before ``step()``).

        Gradients may not exist yet: with a closure (Lightning's automatic optimization)
        the backward pass runs inside ``step()``, after the step pre-hooks.

        Args:
            params: The parameters to copy (e.g. only the bf16 ones, or only the groups
                :func:`~lr_monitor.functional.rules.supports_group` refuses); default:
                every trainable parameter of the optimizer. Copies keep the parameter's
                dtype (2 bytes per element for bf16/fp16).
        """
        if params is None:
            params = (p for g in self.optimizer.param_groups for p in g["params"])
        self._before = {p: p.detach().clone() for p in params if p.requires_grad}

    @property
    def taken(self) -> bool:
        """Whether a copy is held (between :meth:`take` and :meth:`updates`)."""
        return bool(self._before)

    def updates(self) -> dict[Tensor, Tensor]:
        """``θ_after − θ_before`` per parameter that had a gradient; releases the copy.

        In the parameter's dtype, except bf16/fp16 parameters: float32, in which the
        difference is exact.

        Raises:
            RuntimeError: if :meth:`take` was not called before the step.
        """
        before = self.pop()
        out = {}
        for p, b in before.items():
            if p.grad is None:
                continue
            if torch.is_complex(p):
                out[p] = torch.view_as_complex(applied_update(p.detach(), b).contiguous())
            else:
                out[p] = applied_update(p.detach(), b)
        return out

    def pop(self) -> dict[Tensor, Tensor]:
        """The copies taken before the step (parameter → ``θ_before``); releases them.

        For :func:`with_applied_update`, which needs ``θ_before`` itself.

        Raises:
            RuntimeError: if :meth:`take` was not called before the step.
        """
        if not self._before:
            raise RuntimeError("ParamSnapshot: take() was not called before step()")
        before, self._before = self._before, {}
        return before


def is_supported(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`last_update` has an exact rule for this optimizer's class.

    Per param group settings: :func:`~lr_monitor.functional.rules.supports_group`.
    """
    return find_rule(optimizer) is not None


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if torch.is_complex(t) else t


def applied_update(after: Tensor, before: Tensor) -> Tensor:
    """``after − before`` in the real view, in float32 (float64 for float64 tensors).

    Exact for bf16/fp16 tensors, whose difference is representable in float32.

    Args:
        after: The parameter after the step.
        before: A copy taken before the step.

    Returns:
        The applied update (the real view's shape for complex parameters).

    Example:
        >>> a = torch.tensor([1.0, 1.0078125], dtype=torch.bfloat16)
        >>> applied_update(a, torch.ones(2, dtype=torch.bfloat16))
        tensor([0.0000, 0.0078])
    """
    dtype = compute_dtype(after)
    return _real(after).to(dtype) - _real(before.detach().to(after.device)).to(dtype)


def with_applied_update(step: ParamStep, before: Tensor) -> ParamStep:
    """``step`` with the update torch actually applied, measured from ``θ_before``.

    torch adds a bf16/fp16 parameter's update in the parameter's dtype, so elements
    whose update is below about half an ulp of θ do not move, and the others move by a
    rounded amount: the rule's (intended) update is not what happened. Given a copy of
    the parameter taken before the step, this returns the step with

    * ``update = θ_after − θ_before``, computed in float32 (float64 for float64
      parameters; the real view for complex ones) — exact for bf16/fp16, whose
      difference is representable in float32;
    * ``update_lost = (intended ≠ 0) & (applied = 0)``: the elements whose update was
      rounded away;

    and every other field (``eff_lr``, ``direction``, moments) unchanged. A pure function:
    nothing is modified in place.

    Args:
        step: A step from the rules (its ``update`` is the intended update).
        before: ``θ_before``, a copy of ``step.param`` taken before the step (same shape
            and dtype).

    Returns:
        The step with the applied update and the ``update_lost`` mask.

    Raises:
        ValueError: if ``before`` does not have the parameter's shape and dtype.

    Example:
        >>> p = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.bfloat16))
        >>> opt = torch.optim.SGD([p], lr=1.0)
        >>> before = p.detach().clone()
        >>> p.grad = torch.tensor([1e-3, 0.25], dtype=torch.bfloat16); opt.step()
        >>> s = with_applied_update(optimizer_steps(opt)[0][0], before)
        >>> s.update.tolist(), s.update_lost.tolist()  # 1e-3 < ulp(1)/2 is rounded away
        ([0.0, -0.25], [True, False])
    """
    param = step.param.detach()
    if before.shape != param.shape or before.dtype != param.dtype:
        raise ValueError(
            f"before={type(before).__name__}(shape={tuple(before.shape)}, "
            f"dtype={before.dtype}) is invalid: must be a copy of the parameter "
            f"(shape={tuple(param.shape)}, dtype={param.dtype}) taken before the step"
        )
    applied = applied_update(param, before)
    lost = (step.update != 0) & (applied == 0)
    return replace(step, update=applied, update_lost=lost)

