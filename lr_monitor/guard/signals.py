"""The signals the guard judges at each optimizer step: the loss and the gradient norm.

Framework-free (plain :mod:`torch`). A :class:`StepSignals` accumulates the loss of every
micro-batch on the device (:meth:`~StepSignals.add_loss`, dividing an fp16 ``GradScaler``'s
scale back out without a host sync), then, once per optimizer step,
:meth:`~StepSignals.collect` stacks the mean loss and the squared gradient norm (one
``foreach`` norm, float32 at least) into one small tensor, averages it across ranks with the
reduce function it is given (one all-reduce) and reads it back in one host transfer. Every
rank therefore gets identical values, and a NaN on one rank is a NaN in the average.

Each rank has its own batch, so the loss is averaged. The squared gradient norm is
averaged too where every rank holds the whole (all-reduced) gradient, as under DDP; a
sharded gradient (a DTensor: FSDP2, tensor parallelism) enters as its shard times the world
size, so that the average is the *sum* over the shards, each replica counted once
(:func:`~lr_monitor.functional.statistics.counted_part`).

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

Read one step late (:meth:`StepSignals.stage`): the same vector stays on the device, is
compared there with the guard's *tripwires* (the values above which the step would be
skipped), and goes to a host buffer by a non-blocking copy; :meth:`StagedStep.read` turns
it into floats at the next step, when the copy is long done. No host transfer on the way:
on an accelerator the CPU keeps running ahead of the device.

    >>> w.grad = None
    >>> signals.add_loss((w * 2.0).sum()); (w * 2.0).sum().backward()
    >>> trips = [Tripwire({"loss": 100.0}), Tripwire({"grad_norm": 3.0})]
    >>> staged = signals.stage([w], step=5, tripwires=trips)
    >>> bool(staged.over)  # on the device: the gradient norm 4 is above 3
    True
    >>> staged.read()
    ({'loss': 8.0, 'grad_norm': 4.0}, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lr_monitor._validation import check_bool
from lr_monitor.functional.statistics import counted_part, is_dtensor, tensor_norms

__all__ = ["GRAD_NORM", "LOSS", "StagedStep", "StepSignals", "Tripwire", "loss_scale"]

#: Signal name of the training loss (mean over the micro-batches of one step).
LOSS = "loss"
#: Signal name of the global gradient norm (after unscaling and accumulation, before clipping).
GRAD_NORM = "grad_norm"

#: A function averaging a tensor across all ranks (e.g. a strategy's reduce with ``"mean"``).
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


@dataclass(frozen=True)
class Tripwire:
    """A condition on one step's values under which the step is skipped on the device.

    It holds when every signal of ``above`` is strictly above its bound and every signal
    of ``at_most`` is at most its bound (a rule of an earlier round would fire first).
    Conditions hold only on steps whose values are all finite: a NaN or inf is the first
    round's business.

    Attributes:
        above: Signal → lower bound (exclusive).
        at_most: Signal → upper bound (inclusive).
    """

    above: Mapping[str, float]
    at_most: Mapping[str, float] = field(default_factory=dict)

    def holds(self, values: Mapping[str, float]) -> bool:
        """The condition, evaluated on the host (for tests and checks).

        Example:
            >>> Tripwire({"loss": 2.0}, {"loss": 20.0}).holds({"loss": 3.0})
            True
            >>> Tripwire({"loss": 2.0}, {"loss": 20.0}).holds({"loss": 30.0})
            False
        """
        return all(math.isfinite(v) for v in values.values()) and \
            all(s in values and values[s] > b for s, b in self.above.items()) and \
            all(s not in values or values[s] <= b for s, b in self.at_most.items())


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
        self._host = _HostBuffers()  # the staged values, on their way to the host
        self._tripwires = _HostBuffers()  # the tripwires, on their way to the device

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

    def _vector(self, params: Iterable[Tensor], reduce: Reduce | None
                ) -> tuple[Tensor, bool]:
        """``[mean loss, gradient norm]`` in float64 on the device, averaged across ranks.

        Forgets the losses added so far. The loss is a placeholder 0 when none was added
        (second return value ``False``); the norm is left out when not watched and is 0
        without gradients: every rank stacks the same shape and joins the same
        all-reduce, which averages the loss and the *squared* norm (for sharded gradients
        a sum over the shards, see :func:`_sharded_norm_sq`).
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
            if any(is_dtensor(g) for g in grads):
                parts.append(_sharded_norm_sq(grads, device, reduce is not None))
                if reduce is None:
                    parts[-1] = parts[-1].sqrt()
            else:
                if grads:  # one norm per tensor (float32 at least), the norm of the norms
                    norm = torch.linalg.vector_norm(tensor_norms(grads)).to(device)
                else:
                    norm = torch.zeros((), dtype=torch.float64, device=device)
                parts.append(norm if reduce is None else norm.square())
        vec = torch.stack(parts)
        if reduce is not None:
            vec = reduce(vec)
            if self.watch_grad_norm:
                vec = torch.stack([vec[0], vec[1].sqrt()])
        return vec, has_loss

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
        vec, has_loss = self._vector(params, reduce)
        values = vec.tolist()
        out: dict[str, float] = {}
        if has_loss:
            out[LOSS] = values[0]
        if self.watch_grad_norm:
            out[GRAD_NORM] = values[1]
        return out

    @property
    def signals(self) -> tuple[str, ...]:
        """The signals the next :meth:`collect` or :meth:`stage` will hold."""
        return ((LOSS,) if self._loss_count else ()) + \
            ((GRAD_NORM,) if self.watch_grad_norm else ())

    def stage(self, params: Iterable[Tensor], *, step: int, index: int = 0,
              reduce: Reduce | None = None,
              tripwires: Sequence[Tripwire] = (),
              nonfinite_trips: bool = True) -> StagedStep:
        """Like :meth:`collect`, but nothing leaves the device before the next step.

        The vector of :meth:`collect` is compared on the device with ``tripwires``: the
        step trips when one of them holds (or, with ``nonfinite_trips``, when a value is
        NaN/inf). The vector with that verdict is
        copied to a host buffer without blocking (pinned memory on an accelerator). Read
        it with :meth:`StagedStep.read` once the next step is under way.

        Args:
            params: The parameters whose gradients make the norm.
            step: The optimizer step the values belong to.
            index: The optimizer's position (for the guard's detector streams).
            reduce: Averages a tensor across ranks, or ``None`` on a single process. The
                verdict is taken on the averaged values, so every rank reaches the same one.
            tripwires: Conditions, any of which trips the step (as from
                :meth:`~lr_monitor.guard.bank.DetectorBank.tripwires`); one with a lower
                bound on a signal the step does not have never trips.
            nonfinite_trips: Whether a NaN/inf value trips.

        Returns:
            The :class:`StagedStep`; its :attr:`~StagedStep.over` is the verdict as a 0-d
            bool tensor on the device (for a skip that needs no host decision).
        """
        present = self.signals
        vec, _ = self._vector(params, reduce)
        names = (LOSS, GRAD_NORM) if self.watch_grad_norm else (LOSS,)
        rows = tuple(i for i, name in enumerate(names) if name in present)
        conditions = [c for c in tripwires if c.above and all(n in present for n in c.above)]
        if conditions:  # per condition a row of lower and of upper bounds
            lows = [c.above.get(n, -math.inf) for c in conditions for n in names]
            highs = [c.at_most.get(n, math.inf) if n in present else math.inf
                     for c in conditions for n in names]
            bounds = self._tripwires.upload(lows + highs, vec.device).reshape(
                2, len(conditions), len(names))
            over = ((vec > bounds[0]) & (vec <= bounds[1])).all(dim=1).any() \
                & torch.isfinite(vec).all()
        else:
            over = torch.zeros((), dtype=torch.bool, device=vec.device)
        if nonfinite_trips:  # (a missing loss is a finite placeholder)
            over = over.logical_or(torch.isfinite(vec).logical_not_().any())
        payload = torch.cat([vec, over.reshape(1).to(vec.dtype)])
        return StagedStep(step=step, index=index, names=tuple(names[i] for i in rows),
                          rows=rows, over=over, host=self._host.copy(payload))


def _sharded_norm_sq(grads: list[Tensor], device: torch.device, reduced: bool) -> Tensor:
    """The squared gradient norm when some gradients are DTensors, ready for a rank mean.

    A replicated gradient (a plain tensor: the same on every rank once all-reduced, as
    under DDP or outside a tensor-parallel plan) enters whole and is averaged by the
    reduction. A sharded one (FSDP2, tensor parallelism) enters as this rank's shard,
    counted on one replica (:func:`~lr_monitor.functional.statistics.counted_part`) and
    multiplied by the world size, so that the mean over ranks is the *sum* over shards.
    """
    plain = [g for g in grads if not is_dtensor(g)]
    shards = [s for g in grads if is_dtensor(g)
              if (s := counted_part(g, across_ranks=reduced)) is not None and s.numel()]
    total = torch.zeros((), dtype=torch.float64, device=device)
    if plain:
        total = total + tensor_norms(plain).square().sum().to(device)
    if shards:
        weight = _world_size() if reduced else 1
        total = total + weight * tensor_norms(shards).square().sum().to(device)
    return total


def _world_size() -> int:
    """The processes of the default group (what the guard's reduction averages over)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _HostBuffers:
    """Host buffers for small vectors crossing between host and device, two per device.

    Allocated once (pinned off the CPU, so that copies do not block), each with a numpy view
    made at allocation: the host reads and writes them as plain memory, no device transfer.
    Two in turn, each with the event of its last copy, so that a buffer is never reused
    while a copy from it (started a step earlier) may still run.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], list[_HostCopy]] = {}
        self._turn = 0

    def _next(self, n: int, device: torch.device) -> tuple[Tensor, _HostCopy]:
        key = (str(device), n)
        if key not in self._buffers:
            self._buffers[key] = [self._allocate(n, device) for _ in range(2)]
        self._turn = 1 - self._turn
        slot = self._buffers[key][self._turn]
        slot.wait()
        return slot.tensor, slot

    def copy(self, payload: Tensor) -> _HostCopy:
        """Start a non-blocking copy of ``payload`` (1-d float64) into the next buffer.

        Returns:
            The buffer; :meth:`_HostCopy.wait` before reading its ``array``.
        """
        buf, slot = self._next(payload.numel(), payload.device)
        can_wait = payload.device.type == "cpu" or _event_type(payload.device) is not None
        buf.copy_(payload, non_blocking=can_wait)  # (no event to wait on: a blocking copy)
        slot.record(payload.device)
        return _HostCopy(buf, slot.array, slot.event)

    def upload(self, values: list[float], device: torch.device) -> Tensor:
        """``values`` as a float64 tensor on ``device``, copied there without blocking."""
        buf, slot = self._next(len(values), device)
        slot.array[:] = values
        if device.type == "cpu":
            return buf
        out = buf.to(device, non_blocking=_event_type(device) is not None)
        slot.record(device)
        return out

    @staticmethod
    def _allocate(n: int, device: torch.device) -> _HostCopy:
        if device.type == "cpu":
            array = np.zeros(n, dtype=np.float64)
            return _HostCopy(torch.from_numpy(array), array, None)
        try:
            buf = torch.zeros(n, dtype=torch.float64, pin_memory=True)
        except RuntimeError:  # no pinned memory: copies then block, and are still right
            buf = torch.zeros(n, dtype=torch.float64)
        return _HostCopy(buf, buf.numpy(), None)


def _event_type(device: torch.device) -> Callable[[torch.device], Any] | None:
    """How to make an event on ``device``, or ``None`` (the copies then block).

    ``torch.Event`` where torch has it; ``torch.cuda.Event`` on CUDA with an older torch.
    """
    if hasattr(torch, "Event"):
        return lambda d: torch.Event(device=d)
    if device.type == "cuda":
        return lambda d: torch.cuda.Event()
    return None


@dataclass
class _HostCopy:
    """A host buffer, its numpy view and the event of the last copy to or from it."""

    tensor: Tensor
    array: Any  # numpy view of the buffer: reading it is a memory read, no transfer
    event: Any | None

    def record(self, device: torch.device) -> None:
        """Mark the copy just started on ``device`` (nothing to wait for on the CPU)."""
        make = _event_type(device) if device.type != "cpu" else None
        if make is not None:
            self.event = make(device)
            self.event.record()

    def wait(self) -> None:
        """Wait for the last copy (started a step ago, so normally done already)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None


@dataclass
class StagedStep:
    """One optimizer step's signals on their way to the host (see :meth:`StepSignals.stage`).

    Attributes:
        step: The optimizer step the values belong to.
        index: The optimizer's position.
        names: The signals held, in order (``loss`` only when a loss was added).
        rows: Their rows in the staged vector.
        over: Whether a value tripped its tripwire, as a 0-d bool tensor on the device.
        exact_skip: Set by whoever skips the step on ``over``: whether that skip was exact
            (a fused optimizer's ``found_inf``), so that even a non-finite gradient was
            kept from the weights.
    """

    step: int
    index: int
    names: tuple[str, ...]
    rows: tuple[int, ...]
    over: Tensor
    host: _HostCopy
    exact_skip: bool = False

    def read(self) -> tuple[dict[str, float], bool]:
        """The signals as floats, and whether the step tripped (waits for the copy).

        Returns:
            ``({signal: value}, tripped)``.
        """
        self.host.wait()
        array = self.host.array
        values = {name: float(array[row]) for name, row in zip(self.names, self.rows,
                                                                strict=True)}
        return values, bool(array[-1] != 0)

    def state_dict(self) -> dict[str, Any]:
        """The step as plain Python types, for a checkpoint taken before it was judged.

        Waits for the copy (a checkpoint is a host round trip anyway).
        """
        values, tripped = self.read()
        return {"step": self.step, "index": self.index, "values": values, "tripped": tripped,
                "exact_skip": self.exact_skip}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> StagedStep:
        """A step saved by :meth:`state_dict`, to be judged after a resume.

        Example:
            >>> saved = {"step": 3, "index": 0, "values": {"loss": 2.5}, "tripped": False}
            >>> StagedStep.from_state_dict(saved).read()
            ({'loss': 2.5}, False)
        """
        values = {str(k): float(v) for k, v in dict(state["values"]).items()}
        tripped = bool(state["tripped"])
        array = np.array([*values.values(), float(tripped)], dtype=np.float64)
        return cls(step=int(state["step"]), index=int(state["index"]), names=tuple(values),
                   rows=tuple(range(len(values))), over=torch.tensor(tripped),
                   host=_HostCopy(torch.from_numpy(array), array, None),
                   exact_skip=bool(state.get("exact_skip", False)))
