"""The signals the guard judges at each optimizer step: the loss and the gradient norm.

Framework-free (plain :mod:`torch`). A :class:`StepSignals` accumulates the loss of every
micro-batch on the device (:meth:`~StepSignals.add_loss`, dividing an fp16 ``GradScaler``'s
scale back out without a host sync), then, once per optimizer step,
:meth:`~StepSignals.collect` stacks the mean loss and the squared gradient norm (one
``foreach`` norm) into one small tensor, averages it across ranks with the reduce function
it is given (one all-reduce) and reads it back in one host transfer. Every rank therefore
gets identical values, and a NaN on one rank is a NaN in the average.

The values come back keyed by the detectors' signal names (:data:`LOSS`,
:data:`GRAD_NORM`), which is how :class:`~lr_monitor.guard.bank.DetectorBank` feeds them
to its detectors.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(4))
    >>> signals = StepSignals()
    >>> for x in (1.0, 3.0):  # two micro-batches of one step
    ...     loss = (w * x).sum()
    ...     signals.add_loss(loss)
    ...     loss.backward()
    >>> signals.collect([w])
    {'loss': 8.0, 'grad_norm': 8.0}
    >>> signals.collect([w])  # no backward since: no loss to judge, only gradients
    {'grad_norm': 8.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lr_monitor._validation import check_bool

__all__ = ["GRAD_NORM", "LOSS", "StepSignals", "loss_scale"]

#: Signal name of the training loss (mean over the micro-batches of one step).
LOSS = "loss"
#: Signal name of the global gradient norm (after unscaling and accumulation, before clipping).
GRAD_NORM = "grad_norm"

#: A function averaging a tensor across ranks (e.g. a strategy's reduce with ``"mean"``).
Reduce = Callable[[Tensor], Tensor]


def loss_scale(scaler: Any) -> Tensor | float | None:
    """The factor an fp16 ``GradScaler`` multiplied the loss by, without a host sync.

    Args:
        scaler: A ``torch.amp.GradScaler`` (or anything with ``get_scale()``), or ``None``.

    Returns:
        The scale as a 0-d tensor when the scaler keeps one on the device, else as a float;
        ``None`` when there is no enabled scaler.

    Example:
        >>> import torch
        >>> float(loss_scale(torch.amp.GradScaler("cpu", init_scale=1024.0)))
        1024.0
        >>> loss_scale(None) is None
        True
    """
    if scaler is None:
        return None
    enabled = getattr(scaler, "is_enabled", None)
    if callable(enabled) and not enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, Tensor):
        return scale.reshape(())
    return float(scaler.get_scale())


class StepSignals:
    """The loss and gradient norm of one optimizer step, gathered with one host transfer.

    Args:
        watch_grad_norm: Also compute the global gradient norm in :meth:`collect`.

    Raises:
        ValueError: If ``watch_grad_norm`` is not a bool.
    """

    def __init__(self, watch_grad_norm: bool = True) -> None:
        self.watch_grad_norm = check_bool("watch_grad_norm", watch_grad_norm)
        self._loss_sum: Tensor | None = None
        self._loss_count = 0

    @property
    def pending_losses(self) -> int:
        """Micro-batch losses added since the last :meth:`collect`."""
        return self._loss_count

    def add_loss(self, loss: Tensor, scale: Tensor | float | None = None) -> None:
        """Add the loss of one micro-batch (kept on its device: no sync).

        Args:
            loss: The loss the backward pass starts from (a 1-element tensor).
            scale: The factor it was multiplied by (an fp16 ``GradScaler``'s scale, see
                :func:`loss_scale`), divided back out; ``None`` for an unscaled loss.
        """
        value = loss.detach().float().reshape(())
        if isinstance(scale, Tensor):
            value = value / scale.to(value.device).reshape(())
        elif scale is not None:
            value = value / float(scale)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def reset(self) -> None:
        """Forget the losses added since the last :meth:`collect`."""
        self._loss_sum, self._loss_count = None, 0

    def collect(self, params: Iterable[Tensor], reduce: Reduce | None = None
                ) -> dict[str, float]:
        """The mean loss and the gradient norm of this step, averaged across ranks.

        One stacked tensor, one call of ``reduce``, one host transfer. The loss is left
        out when no loss was added since the last call (e.g. a second optimizer stepping on
        the same backward pass); the stacked tensor still holds a placeholder, so every
        rank joins the same all-reduce. The gradient norm is left out unless
        ``watch_grad_norm``; a non-finite squared norm is reported as it is (``nan``/``inf``).

        Args:
            params: The parameters whose gradients make the norm (those without a
                gradient are skipped).
            reduce: Averages a tensor across ranks, or ``None`` on a single process.

        Returns:
            ``{LOSS: ..., GRAD_NORM: ...}`` with the entries that apply, as Python floats.
        """
        has_loss = self._loss_sum is not None and self._loss_count > 0
        loss = None if not has_loss or self._loss_sum is None \
            else self._loss_sum / self._loss_count
        self.reset()
        grads = [p.grad for p in params if p.grad is not None] if self.watch_grad_norm else []
        device = loss.device if loss is not None else (
            grads[0].device if grads else torch.device("cpu"))
        parts = [torch.zeros((), dtype=torch.float64, device=device) if loss is None
                 else loss.to(torch.float64)]
        if self.watch_grad_norm:
            if grads:
                norms = torch._foreach_norm(grads)
                parts.append(torch.stack(norms).double().square().sum().to(device))
            else:
                parts.append(torch.zeros((), dtype=torch.float64, device=device))
        vec = torch.stack(parts)
        if reduce is not None:
            vec = reduce(vec)
        values = vec.tolist()
        out: dict[str, float] = {}
        if has_loss:
            out[LOSS] = values[0]
        if self.watch_grad_norm:
            gsq = values[1]
            out[GRAD_NORM] = math.sqrt(gsq) if math.isfinite(gsq) and gsq >= 0 else gsq
        return out
