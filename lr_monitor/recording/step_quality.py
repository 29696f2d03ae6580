"""Step quality: how much of the loss decrease a step promised it actually delivered.

The trust-region ratio of one optimizer step, measured on the step's own mini-batch B::

    ρ = (L_B(θ+Δ) − L_B(θ)) / (g_B·Δ)          Cockpit's α = 1 − 2ρ

``L_B(θ)`` is the training loss of the step, ``g_B`` the gradient the optimizer was given
(before clipping, after AMP unscaling), ``Δ = θ_after − θ_before`` the update it applied, and
``L_B(θ+Δ)`` one extra forward pass on the same batch after the step, without a backward
pass or an autograd graph, with the random state the training forward had (the same
dropout masks). With ``g_B·Δ < 0`` (a descent step): ρ ≈ 1 means the step is small
against the curvature along it, ρ = ½ that it landed at the minimum along its own
direction, ρ ≤ 0 that it overshot — the loss of the very batch it was computed from went
up. For gradient descent along an eigen-direction of a quadratic with eigenvalue λ,
ρ = 1 − ηλ/2 exactly, so ρ = 0 is the stability edge ηλ = 2. ``docs/metrics.md`` explains
how to read it.

Framework-free (plain :mod:`torch`): the math (:func:`step_quality`, :func:`step_alpha`),
the random state and module buffers that a re-run must not disturb (:class:`RNGState`,
:class:`BufferState`, :func:`replay`) and the measurement of one step
(:class:`StepQualityMeter`). The Lightning callback
(:class:`lr_monitor.callbacks.step_quality.StepQualityMonitor`) only calls these from its
hooks.

Example (a plain loop; dropout makes the re-run depend on the random state):
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5),
    ...                             torch.nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
    >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
    >>> def loss_fn() -> torch.Tensor:
    ...     return torch.nn.functional.mse_loss(model(x), y)
    >>> meter = StepQualityMeter()
    >>> meter.start()                      # right before the training forward
    >>> loss = loss_fn(); loss.backward()
    >>> meter.capture(model.parameters())  # after backward, before clipping and step()
    4
    >>> opt.step()
    >>> values = StepQualityValues.from_tensor(0, meter.measure(loss, loss_fn, model))
    >>> 0.0 < values.rho < 1.0, values.alpha == 1 - 2 * values.rho
    (True, True)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lr_monitor.tags import GLOBAL, STEP_QUALITY_STATISTICS

__all__ = [
    "STEP_ALPHA",
    "STEP_QUALITY",
    "STEP_SLOPE",
    "BufferState",
    "RNGState",
    "StepQualityMeter",
    "StepQualityValues",
    "replay",
    "step_alpha",
    "step_quality",
]

#: The statistic names of ρ and α (:data:`lr_monitor.tags.STEP_QUALITY_STATISTICS`).
STEP_QUALITY, STEP_ALPHA, STEP_SLOPE = STEP_QUALITY_STATISTICS


def step_quality(loss_before: float, loss_after: float, slope: float) -> float:
    """The trust-region ratio ρ = (L(θ+Δ) − L(θ)) / (g·Δ): actual over predicted change.

    ``g·Δ`` is the change a linear model of the loss predicts for the step; ρ is the share
    of it that happened. For a quadratic, ρ = 1 + ½ ΔᵀHΔ / (g·Δ); for gradient descent
    (Δ = −ηg) along an eigenvector of H with eigenvalue λ, ρ = 1 − ηλ/2.

    Args:
        loss_before: L(θ), the loss the gradient was computed from.
        loss_after: L(θ+Δ), the same loss after the step.
        slope: g·Δ, the directional derivative along the step times its length
            (negative for a descent step).

    Returns:
        ρ; NaN when ``slope`` is 0 (no step) or any input is not finite.

    Example:
        >>> eta, lam = 0.5, 3.0   # GD on L = λθ²/2 from θ = 1: Δ = −ηλ
        >>> after = lam * (1 - eta * lam) ** 2 / 2
        >>> step_quality(lam / 2, after, slope=lam * -eta * lam), 1 - eta * lam / 2
        (0.25, 0.25)
        >>> step_quality(1.0, 1.0, 0.0)
        nan
    """
    if slope == 0 or not all(map(math.isfinite, (loss_before, loss_after, slope))):
        return math.nan
    return (loss_after - loss_before) / slope


def step_alpha(rho: float) -> float:
    """Cockpit's α = 1 − 2ρ (Schneider et al. 2021) from the step quality ρ.

    α = −1: the step made no progress along its direction (ρ = 1, tiny step against the
    curvature); 0: it landed at the minimum along its direction (ρ = ½); 1: on the
    opposite wall at the starting height (ρ = 0); > 1: the loss went up (ρ < 0).

    Args:
        rho: The step quality (:func:`step_quality`).

    Returns:
        α (NaN for a NaN ρ).

    Example:
        >>> step_alpha(1.0), step_alpha(0.5), step_alpha(0.0), step_alpha(-0.25)
        (-1.0, 0.0, 1.0, 1.5)
    """
    return 1.0 - 2.0 * rho


@dataclass(frozen=True)
class StepQualityValues:
    """The measured quantities of one step, as Python floats.

    Args:
        step: The optimizer step they belong to.
        loss_before: L_B(θ), the training loss of the step.
        loss_after: L_B(θ+Δ), from the re-run after the step.
        slope: g_B·Δ.
    """

    step: int
    loss_before: float
    loss_after: float
    slope: float

    @property
    def rho(self) -> float:
        """The step quality ρ (:func:`step_quality`)."""
        return step_quality(self.loss_before, self.loss_after, self.slope)

    @property
    def alpha(self) -> float:
        """Cockpit's α = 1 − 2ρ (:func:`step_alpha`)."""
        return step_alpha(self.rho)

    @property
    def descent(self) -> bool:
        """Whether the step pointed downhill on its own batch (g·Δ < 0).

        Only then does ρ < 0 mean "the loss went up": with g·Δ > 0 (a momentum step
        against this batch's gradient) a negative ρ means the loss went *down*.
        """
        return self.slope < 0

    def rows(self) -> dict[str, dict[str, float]]:
        """The rows of a :class:`~lr_monitor.recording.StepRecord`: ρ, α and g·Δ in ``global``.

        Example:
            >>> StepQualityValues(7, 2.0, 1.5, -1.0).rows()
            {'global': {'step_quality': 0.5, 'step_alpha': 0.0, 'step_slope': -1.0}}
        """
        return {GLOBAL: {STEP_QUALITY: self.rho, STEP_ALPHA: self.alpha,
                         STEP_SLOPE: self.slope}}

    @classmethod
    def from_tensor(cls, step: int, values: Tensor) -> StepQualityValues:
        """Read ``[L_B(θ), L_B(θ+Δ), g·Δ]`` (:meth:`StepQualityMeter.measure`) to the host.

        The one device-to-host transfer of a measured step.

        Args:
            step: The optimizer step.
            values: A tensor whose first three entries are the two losses and the slope.

        Returns:
            The values as floats.
        """
        before, after, slope = values.reshape(-1)[:3].tolist()
        return cls(step, float(before), float(after), float(slope))


# -- the random state and the buffers a re-run must leave as they were -------------------


@dataclass
class RNGState:
    """Every global random state a forward pass may draw from.

    torch's CPU generator and, when CUDA is initialised, every CUDA device's; NumPy's
    global generator; Python's ``random``. Capturing copies a few kilobytes on the host
    (no device transfer, no sync). Private ``torch.Generator`` objects a model keeps for
    itself are not covered.

    Example:
        >>> state = RNGState.capture()
        >>> a = torch.rand(2)
        >>> state.restore()
        >>> torch.equal(a, torch.rand(2))
        True
    """

    torch_cpu: Tensor
    cuda: list[Tensor] | None
    numpy: Any
    python: Any

    @classmethod
    def capture(cls) -> RNGState:
        """The current states (copies: later draws do not change them)."""
        cuda = (torch.cuda.get_rng_state_all()
                if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
        return cls(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def restore(self) -> None:
        """Set every generator back to this state."""
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


@dataclass
class BufferState:
    """A copy of every buffer of a module, to put back after a forward pass in training mode.

    Buffers are BatchNorm's running statistics, ``num_batches_tracked`` and the like.
    :meth:`restore` copies the values back into the original tensors and re-installs
    them where the forward replaced a buffer by a new tensor. Memory: one copy of the
    buffers (small for usual models), held until :meth:`restore`.

    Args:
        entries: ``(submodule, name, original tensor, copy)`` per buffer.

    Example:
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> saved = BufferState.capture(bn)
        >>> _ = bn(torch.randn(8, 3))
        >>> int(bn.num_batches_tracked)
        1
        >>> saved.restore()
        >>> int(bn.num_batches_tracked), bool(bn.running_mean.eq(0).all())
        (0, True)
    """

    entries: list[tuple[torch.nn.Module, str, Tensor, Tensor]]

    @classmethod
    def capture(cls, module: torch.nn.Module) -> BufferState:
        """Copy the buffers of ``module`` and all its submodules."""
        entries = []
        for sub in module.modules():
            for name, buf in sub._buffers.items():
                if buf is not None:
                    entries.append((sub, name, buf, buf.detach().clone()))
        return cls(entries)

    def restore(self) -> None:
        """Put every buffer back as it was at :meth:`capture`."""
        with torch.no_grad():
            for sub, name, original, saved in self.entries:
                original.copy_(saved)
                if sub._buffers.get(name) is not original:
                    sub._buffers[name] = original


@contextmanager
def replay(rng: RNGState, module: torch.nn.Module | None = None) -> Iterator[None]:
    """Run a block as if at ``rng``, without gradients, then undo its side effects.

    On entry the current random state is saved, ``rng`` is set and gradients are
    disabled; on exit — also when the block raises — the module's buffers and the saved
    random state are put back, so the random stream continues exactly as without the
    block.

    Args:
        rng: The random state to run the block with (e.g. captured right before the
            training forward: the block then draws the same dropout masks).
        module: The module whose buffers the block may change (``None``: none).

    Example:
        >>> start = RNGState.capture()
        >>> first = torch.rand(3)
        >>> with replay(start):
        ...     again = torch.rand(3)
        >>> torch.equal(first, again), torch.equal(torch.rand(3), torch.rand(3))
        (True, False)
    """
    after = RNGState.capture()
    buffers = BufferState.capture(module) if module is not None else None
    try:
        rng.restore()
        with torch.no_grad():
            yield
    finally:
        if buffers is not None:
            buffers.restore()
        after.restore()


# -- one measured step --------------------------------------------------------------------


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class StepQualityMeter:
    """Measures the step quality of one optimizer step at a time (framework-free).

    Call, for a step you want to measure:

    1. :meth:`start` right before the training forward pass (captures the random state);
    2. :meth:`capture` after the backward pass, before gradient clipping and
       ``optimizer.step()`` (copies θ and g of the parameters with a gradient);
    3. :meth:`measure` after ``optimizer.step()``, with the training loss and a function
       computing the same loss on the same batch: returns ``[L_B(θ), L_B(θ+Δ), g·Δ]``
       as one float64 tensor on the device (no host transfer), and forgets the copies.

    :meth:`reset` forgets a step that is not measured after all.

    Memory: from :meth:`capture` to :meth:`measure`, one copy of the parameters and one
    of their gradients (float32 for 16-bit parameters), plus one copy of the module's
    buffers during the re-run. Time: two copies, one fused subtraction and product, and
    one forward pass without autograd graph.
    """

    def __init__(self) -> None:
        self._rng: RNGState | None = None
        self._scale: Tensor | float | None = None
        self._params: list[Tensor] = []
        self._before: list[Tensor] = []
        self._grads: list[Tensor] = []

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called for the current step."""
        return self._rng is not None

    @property
    def captured(self) -> bool:
        """Whether :meth:`capture` copied at least one parameter for the current step."""
        return bool(self._params)

    @property
    def params(self) -> list[Tensor]:
        """The parameters captured for the current step."""
        return list(self._params)

    def start(self) -> None:
        """Capture the random state the training forward will start from."""
        self._rng = RNGState.capture()

    def capture(self, params: Iterable[Tensor], grad_scale: Tensor | float | None = None
                ) -> int:
        """Copy θ and g of every parameter that has a gradient.

        Args:
            params: The parameters the optimizer is about to update.
            grad_scale: The factor the gradients are still multiplied by (the AMP loss
                scale, for an optimizer that unscales inside its own ``step()``), divided
                out of :meth:`slope`; ``None`` for unscaled gradients.

        Returns:
            How many parameters were copied.
        """
        self._scale = (grad_scale.detach().clone() if isinstance(grad_scale, Tensor)
                       else grad_scale)
        self._params, self._before, self._grads = [], [], []
        seen: set[int] = set()
        for p in params:
            if p.grad is None or id(p) in seen:
                continue
            seen.add(id(p))
            dtype = _compute_dtype(p)
            self._params.append(p)
            self._before.append(_real(p.detach()).to(dtype=dtype, copy=True))
            self._grads.append(_real(p.grad.detach()).to(dtype=dtype, copy=True))
        return len(self._params)

    def slope(self) -> Tensor:
        """g·Δ = Σ g ⊙ (θ_after − θ_before) over the captured parameters, after the step.

        Reuses the copies in place (call once per step).

        Returns:
            A float64 0-d tensor on the parameters' device (summed per tensor in the
            parameter's precision, at least float32).

        Raises:
            RuntimeError: if nothing was captured.
        """
        if not self._params:
            raise RuntimeError("StepQualityMeter.slope() needs capture() before the step")
        minus_delta = self._before
        # θ_before − θ_after = −Δ, in place in the copies (exact for nearby values).
        for d, p in zip(minus_delta, self._params, strict=True):
            d.sub_(_real(p.detach()))
        torch._foreach_mul_(minus_delta, self._grads)
        device = self._params[0].device
        sums = torch.stack([t.sum().to(device=device, dtype=torch.float64)
                            for t in minus_delta])
        slope = -sums.sum()
        if isinstance(self._scale, Tensor):
            slope = slope / self._scale.to(device=device, dtype=torch.float64).reshape(())
        elif self._scale is not None:
            slope = slope / float(self._scale)
        return slope

    def loss_after(self, fn: Callable[[], Any], module: torch.nn.Module | None = None
                   ) -> Tensor:
        """``fn()`` under :func:`replay` of the random state captured by :meth:`start`.

        Args:
            fn: Computes the loss on the step's batch; returns a 1-element tensor.
            module: The module whose buffers ``fn`` may change (restored afterwards).

        Returns:
            The loss, detached, as a float64 0-d tensor.

        Raises:
            RuntimeError: if :meth:`start` was not called.
            TypeError: if ``fn`` does not return a 1-element tensor.
        """
        if self._rng is None:
            raise RuntimeError("StepQualityMeter.loss_after() needs start() before the "
                               "training forward")
        with replay(self._rng, module):
            loss = fn()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError("the loss function must return a 1-element tensor, got "
                            f"{type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor)
                               else ""))
        return loss.detach().reshape(()).to(torch.float64)

    def measure(self, loss_before: Tensor, fn: Callable[[], Any],
                module: torch.nn.Module | None = None) -> Tensor:
        """``[L_B(θ), L_B(θ+Δ), g·Δ]`` of the step just taken, on the device; then reset.

        Args:
            loss_before: The training loss of the step (its gradient is the one captured;
                divide an AMP loss scale back out first).
            fn: Computes the same loss on the same batch (see :meth:`loss_after`).
            module: The module whose buffers ``fn`` may change.

        Returns:
            A float64 tensor of 3 elements on the parameters' device.
        """
        try:
            slope = self.slope()
            after = self.loss_after(fn, module).to(slope.device)
            before = loss_before.detach().reshape(()).to(device=slope.device,
                                                         dtype=torch.float64)
            return torch.stack([before, after, slope])
        finally:
            self.reset()

    def reset(self) -> None:
        """Forget the random state and the copies of the current step."""
        self._rng, self._scale = None, None
        self._params, self._before, self._grads = [], [], []
