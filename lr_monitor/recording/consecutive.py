"""Overshoot and oscillation between consecutive steps, measured at every step on a subsample.

``update_cosine`` compares two *recorded* updates, 50 steps apart at the default interval:
an optimizer that goes back and forth every step shows up as ``+1`` there. The
:class:`ConsecutiveTracker` of a :class:`~lr_monitor.recording.StepRecorder` looks at every
step instead, on a fixed random subsample of coordinates, and keeps running sums on the
device; a recorded step turns them into three means over the steps since the previous
record (:data:`lr_monitor.tags.CONSECUTIVE_STATISTICS`, ``global`` row):

* ``consecutive_update_cosine`` = mean of cos(Δ_t, Δ_{t−1}): −1 when the steps go back and
  forth (period-2 oscillation), +1 when they keep their direction;
* ``grad_update_cosine`` = mean of cos(g_t, Δ_{t−1}): > 0 when the new gradient points back
  along the last step, i.e. the loss rises along the step just taken (it overshot);
* ``overshoot_frac`` = share of steps with g_t·Δ_{t−1} > 0.

How (per optimizer, at every step):

1. *Which coordinates.* At most ``max_tensors`` parameter tensors, a fixed
   probability-proportional-to-size sample (:func:`select_tensors`: all of them when there
   are that few, else the largest for certain and a systematic sample of the rest), and in
   each at most ``samples_per_tensor`` coordinates, the fixed stratified subsample of
   :func:`~lr_monitor.functional.statistics.sample_index`. Each sampled coordinate is
   weighted by the elements it stands for (``numel / k`` within its tensor, divided by the
   tensor's inclusion probability), so every dot product below is an unbiased estimate of
   the full one (Horvitz–Thompson), as for ``update_cosine``.
2. *Gradient* g_t: gathered at the sample when the recorder measures gradients
   (``capture_gradients``, i.e. before clipping in Lightning), else in the step pre-hook,
   else (a closure that computes the gradient inside ``step()``) in the post-hook.
3. *Update* Δ_t = θ_t − θ_{t−1}: the parameters are gathered at the sample after every step
   and differenced with the previous gather — the applied update, exact in bf16, including
   anything that moved the weights between two steps (a projection, a constraint).
4. One ``3 × 3`` Gram matrix of ``[√w·g_t, √w·Δ_t, √w·Δ_{t−1}]`` per step (one ``mm``)
   goes into a small device buffer; the cosines of the buffered steps are folded into the
   running sums every 64 steps and on each recorded step. Nothing is read back to the host
   in between: the sums ride along in the recorded step's single transfer.

A cosine is counted on the steps where it is defined: both vectors non-zero and finite
(``lr = 0`` or a step that did not move the sample counts for nothing). A step without
any gradient (the guard's skip or rollback drops them) is no step: its parameter change
(zero, or the rollback's jump) is never compared, and the next step has no previous
update. The first two steps have no cosine (Δ needs two gathers), nor have the first two
after :meth:`ConsecutiveTracker.clear` (detach; a checkpoint resume: the previous update
is not saved) or after the optimizer's parameters change (a param group added, noticed at
once; a parameter given new storage, noticed when a copy fails or on the next recorded
step — until then a parameter whose storage was swapped for one of the same shape reads
as not moving). Parameters with sparse gradients, complex parameters, DTensor (FSDP2)
shards and parameters on another device than the first one are left out.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    >>> opt = torch.optim.SGD([p], lr=1.0)
    >>> tracker = ConsecutiveTracker(opt)
    >>> for _ in range(4):  # L = ½‖θ‖², θ ← θ − 2g = −θ: a period-2 oscillation
    ...     p.grad = p.detach().clone()
    ...     tracker.before_step(closure=False)
    ...     with torch.no_grad():
    ...         _ = p.sub_(2 * p.grad)
    ...     tracker.after_step()
    >>> consecutive_statistics(tracker.totals().tolist())
    {'consecutive_update_cosine': -1.0, 'grad_update_cosine': 1.0, 'overshoot_frac': 1.0}
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lr_monitor._validation import check_int
from lr_monitor.functional.statistics import sample_index
from lr_monitor.tags import CONSECUTIVE_STATISTICS

__all__ = [
    "GRAM_SLOTS",
    "TOTALS",
    "ConsecutiveTracker",
    "consecutive_statistics",
    "select_tensors",
]

#: What :meth:`ConsecutiveTracker.totals` holds, in order: the sum of cos(Δ_t, Δ_{t−1})
#: and the number of steps it is defined on; the sum of cos(g_t, Δ_{t−1}), its number of
#: steps, and among those the steps with g_t·Δ_{t−1} > 0.
TOTALS = ("update_cos_sum", "update_steps", "grad_cos_sum", "grad_steps", "overshoot_steps")

#: Steps whose Gram matrices are buffered on the device before they are folded into the
#: running sums (per parity of the step).
GRAM_SLOTS = 64


def select_tensors(sizes: Sequence[int], budget: int, seed: int = 0
                   ) -> tuple[list[int], list[float]]:
    """A fixed probability-proportional-to-size sample of at most ``budget`` tensors.

    With ``n ≤ budget`` tensors every one is taken. Otherwise tensor ``i`` is taken with
    probability ``π_i = min(1, c·size_i)``, ``Σπ_i = budget``: the tensors with
    ``π_i = 1`` (the largest, found iteratively) for certain, the others by systematic
    sampling in a random order (a seeded :class:`random.Random`, so the same sample on
    every rank and every machine). Weighting a sampled tensor's sums by ``1/π_i`` makes
    them unbiased estimates of the sums over all tensors.

    Args:
        sizes: Elements per tensor (each ≥ 1).
        budget: Largest number of tensors to take (≥ 1).
        seed: Seeds the order and the start of the systematic sample.

    Returns:
        ``(indices, inclusion_probabilities)``: the chosen tensors in increasing order and
        their ``π_i``.

    Raises:
        ValueError: for ``budget < 1``.

    Example:
        >>> select_tensors([5, 3], budget=4)
        ([0, 1], [1.0, 1.0])
        >>> idx, pi = select_tensors([1000] + [10] * 99, budget=10)
        >>> len(idx), idx[0], pi[0], round(sum(pi[1:]) * 99 / len(pi[1:]), 6)
        (10, 0, 1.0, 9.0)
    """
    check_int("budget", budget, 1)
    n = len(sizes)
    if n <= budget:
        return list(range(n)), [1.0] * n
    certain: set[int] = set()
    while True:
        rest = [i for i in range(n) if i not in certain]
        room = budget - len(certain)
        total = sum(sizes[i] for i in rest)
        new = {i for i in rest if room * sizes[i] >= total}
        if not new:
            break
        certain |= new
    # room ≥ 1 here: `room` tensors of size ≥ total/room would leave nothing for the rest.
    pi = {i: room * sizes[i] / total for i in rest}
    rng = random.Random(seed)
    order = rest[:]
    rng.shuffle(order)
    start = rng.random()
    chosen = set(certain)
    cum = 0.0
    for i in order:
        lo, cum = cum, cum + pi[i]
        if math.ceil(cum - start) > math.ceil(lo - start):  # a point start + j in [lo, cum)
            chosen.add(i)
    idx = sorted(chosen)
    return idx, [1.0 if i in certain else pi[i] for i in idx]


def consecutive_statistics(totals: Iterable[float]) -> dict[str, float]:
    """The ``global`` row entries of :data:`lr_monitor.tags.CONSECUTIVE_STATISTICS`.

    Args:
        totals: The host values of :meth:`ConsecutiveTracker.totals` (:data:`TOTALS`).

    Returns:
        The means over the steps each is defined on; a statistic defined on no step is
        left out (as ``update_cosine`` on the first recorded step).

    Example:
        >>> consecutive_statistics([-1.5, 2.0, 0.5, 2.0, 1.0])
        {'consecutive_update_cosine': -0.75, 'grad_update_cosine': 0.25, 'overshoot_frac': 0.5}
        >>> consecutive_statistics([0.0, 0.0, 0.0, 0.0, 0.0])
        {}
    """
    u_sum, u_n, g_sum, g_n, over = (float(x) for x in totals)
    update_cos, grad_cos, frac = CONSECUTIVE_STATISTICS
    out: dict[str, float] = {}
    if u_n > 0:
        out[update_cos] = u_sum / u_n
    if g_n > 0:
        out[grad_cos] = g_sum / g_n
        out[frac] = over / g_n
    return out


@dataclass
class _Large:
    """A tensor gathered at its sample index: the parameter and its buffer slices."""

    param: Tensor
    flat: Tensor | None  # the parameter's data, detached and flat (a view when contiguous)
    index: Tensor
    theta: tuple[Tensor, Tensor]  # slices of the two parameter rows
    grad: Tensor  # slice of the gradient row


#: Identity, storage, shape and dtype of every parameter of an optimizer.
_FullKey = tuple[tuple[int, int, tuple[int, ...], torch.dtype], ...]


@dataclass
class _Layout:
    """Where each chosen tensor's sample lives in the buffers, for one parameter set."""

    key: tuple[tuple[int, int], ...]
    full_key: _FullKey
    params: list[Tensor]  # every chosen tensor (for the has-a-gradient test)
    small: list[Tensor]  # chosen tensors taken whole (numel ≤ samples)
    small_data: list[Tensor]  # their data, detached (views)
    small_theta: tuple[list[Tensor], list[Tensor]]  # their views in the parameter rows
    small_grad: list[Tensor]  # their views in the gradient row
    large: list[_Large]
    theta: Tensor  # 2 × M: θ at the last two gathers (ping-pong)
    x: Tensor  # 3 × M: g_t, Δ of even steps, Δ of odd steps
    first: int  # the coordinates from here on have weights other than 1
    root: Tensor | None  # √weight of those (None: every weight is 1)
    grams: tuple[Tensor, Tensor]  # per parity, GRAM_SLOTS × 3 × 3
    filled: list[int] = field(default_factory=lambda: [0, 0])

    @property
    def numel(self) -> int:
        return self.x.shape[1]


def _eligible(p: Tensor, device: torch.device) -> bool:
    grad = p.grad
    return (p.numel() > 0 and not p.is_complex() and p.device == device
            and not callable(getattr(p, "to_local", None))
            and (grad is None or grad.layout == torch.strided))


class ConsecutiveTracker:
    """Running cos(Δ_t, Δ_{t−1}), cos(g_t, Δ_{t−1}) and [g_t·Δ_{t−1} > 0] of one optimizer.

    Call :meth:`capture_gradients` (optional: where gradients are final, before clipping),
    :meth:`before_step` and :meth:`after_step` around every ``optimizer.step()`` (the
    :class:`~lr_monitor.recording.StepRecorder` does, from its step hooks); read
    :meth:`totals` when recording and :meth:`reset_totals` after. No call reads anything
    back to the host. The module docstring explains the method.

    Cost per step: one copy of the small chosen tensors and one ``index_select`` per
    larger one, for the gradient and for the parameters; a subtraction, two scalings by
    √w (when some tensors are subsampled) and one ``3 × M × 3`` matrix product over the
    ``M ≤ max_tensors · samples_per_tensor`` sampled coordinates; a Python loop over the
    param groups. About ten device operations, none waiting for the device. Memory:
    ``5·M`` floats, ``M`` weights and the sample indices.

    Args:
        optimizer: The optimizer to watch.
        samples_per_tensor: Coordinates sampled per tensor (≥ 1): the whole tensor when it
            has no more.
        max_tensors: Tensors gathered per step (≥ 1): a fixed size-proportional sample of
            them when the optimizer has more (:func:`select_tensors`).

    Raises:
        ValueError: for a bad ``samples_per_tensor`` or ``max_tensors``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, samples_per_tensor: int = 4096,
                 max_tensors: int = 64) -> None:
        self.optimizer = optimizer
        self.samples_per_tensor = check_int("samples_per_tensor", samples_per_tensor, 1)
        self.max_tensors = check_int("max_tensors", max_tensors, 1)
        self._layout: _Layout | None = None
        self._totals: Tensor | None = None
        self._captured = False  # g_t gathered for the coming step
        self._have_theta = False  # θ_{t−1} gathered (same layout)
        self._have_delta = False  # Δ_{t−1} known and a real step's
        self._parity = 0
        self._rebuilt = False  # rebuilt after a failed gather, none succeeded since

    # -- the parameter set ---------------------------------------------------------------
    def _key(self) -> tuple[tuple[int, int], ...]:
        return tuple((id(g["params"]), len(g["params"])) for g in self.optimizer.param_groups)

    def _full_key(self) -> _FullKey:
        return tuple((id(p), p.data_ptr(), tuple(p.shape), p.dtype)
                     for g in self.optimizer.param_groups for p in g["params"])

    def _build(self) -> _Layout | None:
        """Choose the tensors and coordinates; allocate the buffers; forget the past."""
        self._captured = self._have_theta = self._have_delta = False
        self._parity = 0
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if not params:
            self._layout = None
            return None
        device = params[0].device
        params = [p for p in params if _eligible(p, device)]
        sizes = [p.numel() for p in params]
        seed = (len(sizes) * 1_000_003 + sum(sizes)) % (2**32)
        chosen, pi = select_tensors(sizes, self.max_tensors, seed) if params else ([], [])
        k = self.samples_per_tensor
        dtype = (torch.float64 if any(params[i].dtype == torch.float64 for i in chosen)
                 else torch.float32)
        # Each coordinate stands for w = numel / k elements of its tensor, / π for the
        # tensor sample. The g and Δ rows are scaled by √w, so that their plain Gram matrix
        # is the weighted one; the tensors with w = 1 come first and are not scaled.
        weights = [sizes[i] / min(sizes[i], k) / q for i, q in zip(chosen, pi, strict=True)]
        order = sorted(range(len(chosen)), key=lambda j: weights[j] != 1.0)
        chosen = [chosen[j] for j in order]
        weights = [weights[j] for j in order]
        counts = [min(sizes[i], k) for i in chosen]
        m = sum(counts)
        first = sum(c for c, w in zip(counts, weights, strict=True) if w == 1.0)
        theta = torch.zeros(2, m, dtype=dtype, device=device)
        x = torch.zeros(3, m, dtype=dtype, device=device)
        root = None
        if first < m:
            root = torch.cat([torch.full((c,), math.sqrt(w), dtype=dtype, device=device)
                              for c, w in zip(counts, weights, strict=True) if w != 1.0])
        small: list[Tensor] = []
        small_data: list[Tensor] = []
        small_theta: tuple[list[Tensor], list[Tensor]] = ([], [])
        small_grad: list[Tensor] = []
        large: list[_Large] = []
        offset = 0
        for i, c in zip(chosen, counts, strict=True):
            p, part = params[i], slice(offset, offset + c)
            offset += c
            index = sample_index(sizes[i], k, device)
            if index is None:
                small.append(p)
                small_data.append(p.detach())
                small_theta[0].append(theta[0, part].view(p.shape))
                small_theta[1].append(theta[1, part].view(p.shape))
                small_grad.append(x[0, part].view(p.shape))
            else:
                flat = p.detach().view(-1) if p.is_contiguous() else None
                large.append(_Large(p, flat, index, (theta[0, part], theta[1, part]),
                                    x[0, part]))
        grams = tuple(torch.zeros(GRAM_SLOTS, 3, 3, dtype=dtype, device=device)
                      for _ in range(2))
        self._layout = _Layout(
            key=self._key(), full_key=self._full_key(), params=[params[i] for i in chosen],
            small=small, small_data=small_data, small_theta=small_theta,
            small_grad=small_grad, large=large, theta=theta, x=x, first=first, root=root,
            grams=(grams[0], grams[1]))
        if self._totals is None or self._totals.device != device:
            self._totals = torch.zeros(len(TOTALS), dtype=torch.float64, device=device)
        return self._layout

    def _current(self, full_check: bool = False) -> _Layout | None:
        """The layout of the optimizer's parameters now (rebuilt when they changed)."""
        layout = self._layout
        if layout is None or layout.key != self._key() or (
                full_check and layout.full_key != self._full_key()):
            if layout is not None:
                self._fold(layout)
            layout = self._build()
        return layout

    @property
    def tensors(self) -> int:
        """Tensors gathered per step (0 before the first step)."""
        return 0 if self._layout is None else len(self._layout.params)

    @property
    def samples(self) -> int:
        """Coordinates gathered per step (0 before the first step)."""
        return 0 if self._layout is None else self._layout.numel

    def nbytes(self) -> int:
        """Device memory held by the buffers, in bytes (the sample indices not counted)."""
        lay = self._layout
        if lay is None:
            return 0
        ts = [lay.theta, lay.x, *lay.grams] + ([lay.root] if lay.root is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    # -- every step ----------------------------------------------------------------------
    def capture_gradients(self) -> None:
        """Gather g_t at the sample now (the first call of a step counts; later ones not)."""
        if self._captured:
            return
        layout = self._current()
        if layout is None:
            return
        grad_mode = torch.is_grad_enabled()  # a create_graph gradient must not record
        torch._C._set_grad_enabled(False)
        try:
            self._captured = self._guarded(layout, self._gather_grads)
        finally:
            torch._C._set_grad_enabled(grad_mode)

    def before_step(self, *, closure: bool) -> None:
        """The step pre-hook: gather g_t unless the gradient is computed inside ``step()``.

        Args:
            closure: Whether ``step()`` got a closure (then the gradient is not there yet;
                it is gathered by :meth:`capture_gradients` or :meth:`after_step`).
        """
        if not closure:
            self.capture_gradients()

    def after_step(self, *, full_check: bool = False) -> None:
        """The step post-hook: gather θ_t, form Δ_t and buffer the step's Gram matrix.

        Args:
            full_check: Also compare every parameter's identity, storage, shape and dtype
                with the layout (an O(tensors) Python loop: the recorder asks on recorded
                steps; a new param group is noticed at every step).
        """
        if not self._captured:
            self.capture_gradients()  # the gradient as the optimizer left it
        layout = self._current(full_check)
        if layout is None:
            return
        captured, self._captured = self._captured, False
        # A step without any gradient is no optimizer step (the guard's skip or rollback).
        stepped = any(p.grad is not None for p in layout.params)
        c = self._parity
        if not self._guarded(layout, self._gather_theta, c):
            return
        self._parity = 1 - c
        if not (stepped and self._have_theta):
            self._have_theta, self._have_delta = True, False
            return
        delta = torch.sub(layout.theta[c], layout.theta[1 - c], out=layout.x[1 + c])
        if layout.root is not None:
            delta[layout.first:].mul_(layout.root)
        if captured and self._have_delta:
            self._gram(layout, c)
        self._have_delta = True

    def _guarded(self, layout: _Layout, gather: Any, *args: Any) -> bool:
        """Run a gather; on a tensor that no longer fits, rebuild once and report failure.

        A parameter replaced with another shape or a gradient turned sparse makes the
        copy raise; the layout is rebuilt from the parameters as they are now (sparse
        gradients left out) and this step has no statistics. A second failure right after
        a rebuild is raised (the recorder's fault barrier reports it).
        """
        try:
            gather(layout, *args)
        except RuntimeError:
            if self._layout is not layout or self._rebuilt:
                raise
            self._fold(layout)
            self._build()
            self._rebuilt = True
            return False
        self._rebuilt = False
        return True

    @staticmethod
    def _gather_grads(layout: _Layout) -> None:
        if layout.small:
            grads = [p.grad for p in layout.small]
            try:
                torch._foreach_copy_(layout.small_grad, grads)  # type: ignore[arg-type]
            except TypeError:  # some gradients are None: those count as 0
                for dst, g in zip(layout.small_grad, grads, strict=True):
                    if g is None:
                        dst.zero_()
                    else:
                        dst.copy_(g)
        for t in layout.large:
            g = t.param.grad
            if g is None:
                t.grad.zero_()
            else:
                _take(g.reshape(-1), t.index, t.grad)
        if layout.root is not None:
            layout.x[0, layout.first:].mul_(layout.root)

    @staticmethod
    def _gather_theta(layout: _Layout, row: int) -> None:
        if layout.small:
            torch._foreach_copy_(layout.small_theta[row], layout.small_data)
        for t in layout.large:
            flat = t.flat if t.flat is not None else t.param.detach().reshape(-1)
            _take(flat, t.index, t.theta[row])

    def _gram(self, layout: _Layout, c: int) -> None:
        """``[g, Δ_even, Δ_odd]`` Gram matrix (weighted) into the parity-``c`` buffer."""
        x = layout.x
        slot = layout.filled[c]
        torch.mm(x, x.T, out=layout.grams[c][slot])
        layout.filled[c] = slot + 1
        if slot + 1 == GRAM_SLOTS:
            self._fold(layout)

    def _fold(self, layout: _Layout) -> None:
        """Add the cosines of the buffered steps to the running sums (on the device)."""
        if not any(layout.filled) or self._totals is None:
            return
        parts = []
        for c in (0, 1):
            n = layout.filled[c]
            if n:
                g = layout.grams[c][:n].double()
                cur, prev = 1 + c, 2 - c
                # Δ_t · Δ_{t−1}, |Δ_t|², |Δ_{t−1}|², g·Δ_{t−1}, |g|²
                parts.append(torch.stack([g[:, 1, 2], g[:, cur, cur], g[:, prev, prev],
                                          g[:, 0, prev], g[:, 0, 0]]))
        dot, cur_sq, prev_sq, gdot, g_sq = torch.cat(parts, dim=1)
        self._totals += _cosine_sums(dot, cur_sq, prev_sq, gdot, g_sq)
        layout.filled[0] = layout.filled[1] = 0

    # -- records -------------------------------------------------------------------------
    def totals(self) -> Tensor:
        """The running sums since :meth:`reset_totals` (:data:`TOTALS`), on the device.

        Returns:
            A float64 vector of ``len(TOTALS)`` values (zeros before the first step);
            ``consecutive_statistics(totals.tolist())`` finishes them on the host.
        """
        if self._layout is not None:
            self._fold(self._layout)
        if self._totals is None:
            return torch.zeros(len(TOTALS), dtype=torch.float64)
        return self._totals.clone()

    def reset_totals(self) -> None:
        """Start new running sums (after a record has read them)."""
        if self._totals is not None:
            self._totals.zero_()

    def clear(self) -> None:
        """Forget the parameters, the last update and the sums (detach, rollback, resume)."""
        self._layout = None
        self._totals = None
        self._captured = self._have_theta = self._have_delta = False
        self._parity = 0
        self._rebuilt = False


def _cosine_sums(dot: Tensor, cur_sq: Tensor, prev_sq: Tensor, gdot: Tensor, g_sq: Tensor
                 ) -> Tensor:
    """Per-step cosines from Gram entries, summed: the :data:`TOTALS` of these steps.

    A cosine with a zero (or non-finite) vector is not defined on that step and not
    counted.
    """
    cos_u = (dot / (cur_sq * prev_sq).sqrt()).clamp(-1.0, 1.0)
    ok_u = (cur_sq > 0) & (prev_sq > 0) & cos_u.isfinite()
    cos_g = (gdot / (g_sq * prev_sq).sqrt()).clamp(-1.0, 1.0)
    ok_g = (g_sq > 0) & (prev_sq > 0) & cos_g.isfinite()
    zero = torch.zeros((), dtype=dot.dtype, device=dot.device)
    return torch.stack([
        torch.where(ok_u, cos_u, zero).sum(), ok_u.sum(),
        torch.where(ok_g, cos_g, zero).sum(), ok_g.sum(), (ok_g & (gdot > 0)).sum(),
    ]).to(torch.float64)


def _take(flat: Tensor, index: Tensor, out: Tensor) -> None:
    """``out[:] = flat[index]`` (converted to ``out``'s dtype)."""
    if flat.dtype == out.dtype:
        torch.index_select(flat, 0, index, out=out)
    else:
        out.copy_(flat.index_select(0, index))
