"""The most recent optimizer step, per parameter: effective learning rate and update.

Call these right after ``optimizer.step()`` and before ``scheduler.step()`` (the rules
read ``group["lr"]`` as the step used it): in a step post-hook
(``optimizer.register_step_post_hook``), or in a plain loop between the two calls.

Optimizers without an exact rule (see :data:`lr_monitor.functional.SUPPORTED_OPTIMIZERS`)
are measured by :class:`ParamSnapshot`, which copies the parameters before the steps
you want to record and diffs them after. That costs one parameter-sized copy on those
steps; nothing is ever guessed.

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

import torch
from torch import Tensor

from lr_monitor.functional.rules import ParamStep, find_rule, group_steps

__all__ = ["ParamSnapshot", "effective_lr", "is_supported", "last_update", "optimizer_steps"]


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
        and dtype as the parameter). Parameters without a gradient or state are absent.

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

    def take(self) -> None:
        """Copy every trainable parameter (call before ``step()``).

        Gradients may not exist yet: with a closure (Lightning's automatic optimization)
        the backward pass runs inside ``step()``, after the step pre-hooks.
        """
        self._before = {
            p: p.detach().clone()
            for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad
        }

    @property
    def taken(self) -> bool:
        """Whether a copy is held (between :meth:`take` and :meth:`updates`)."""
        return bool(self._before)

    def updates(self) -> dict[Tensor, Tensor]:
        """``θ_after − θ_before`` per parameter that had a gradient; releases the copy.

        Raises:
            RuntimeError: if :meth:`take` was not called before the step.
        """
        if not self._before:
            raise RuntimeError("ParamSnapshot.updates() called without take() before step()")
        before, self._before = self._before, {}
        return {p: p.detach() - b for p, b in before.items() if p.grad is not None}


def is_supported(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`last_update` has an exact rule for this optimizer's class."""
    return find_rule(optimizer) is not None

