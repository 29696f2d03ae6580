"""Batched summaries of an optimizer step, read back to the host in one transfer.

The summaries are computed in two phases, the way torchmetrics computes metrics:

1. :func:`step_sums` reduces every parameter's :class:`~lr_monitor.functional.ParamStep`
   to *fields* (sums of squares, counts, min and max, listed below) in one float64 matrix
   with a row per param group (and, on request, per tensor), plus a histogram of
   ``log10(eff_lr)`` per row. Nothing leaves the device.
2. :meth:`StepSums.to_host` moves everything in one ``.tolist()`` and
   :func:`summarize` finishes the statistics on the host.

Fields and how they combine
---------------------------
Every field declares in :data:`FIELD_COMBINE` how two values of it combine (a
:class:`Combine` rule, like torchmetrics' ``dist_reduce_fx``), and that one rule is applied
at every level: across the tensors of a row (on the device, chunk by chunk), across ranks
for sharded parameters (:meth:`StepSums.all_reduce`) and across rows, param groups into the
``global`` row (:meth:`HostStepSums.combine`). Norms are therefore ``√Σ``: *sum squares,
then take the root* on the host. Summed across ranks, every element must enter once
(``step_sums(across_ranks=True)``, :func:`counted_part`): a DTensor's shard on the ranks
holding its first replica, a plain (replicated) tensor on rank 0. Per tensor, a field holds:

====================  =======  ==========================================================
field                 combine  value for one tensor
====================  =======  ==========================================================
``numel``             sum      elements of the update
``grad_sq``           sum      ``Σg²`` (or the pre-step ``‖g‖²`` passed as ``grad_sq``)
``param_sq``          sum      ``Σθ²`` of the parameter after the step
``update_sq``         sum      ``ΣΔ²`` of the update
``first_sq``          sum      ``Σm²`` of the first moment (0 without one)
``first_numel``       sum      elements of the first moment (0 without one)
``second_sqrt_sum``   sum      ``Σ√v`` of the denominator statistic (``Σv`` for a root)
``second_numel``      sum      elements of the denominator statistic (0 without one)
``eps_dominated``     sum      elements where ε dominates the denominator
``eps_numel``         sum      elements of the ε mask (0 without one)
``nonfinite_tensors`` sum      non-finite norms among ``grad_sq``/``param_sq`` (0–2); on
                               the host, flagged rows get exact non-finite element counts
``cos_dot``           sum      ``w·⟨Δ, Δ_prev⟩`` on the update sample (``w`` = elements
                               per sampled coordinate)
``cos_prev_sq``       sum      ``w·‖Δ_prev‖²`` on the sample (0 for the first step)
``cos_cur_sq``        sum      ``w·‖Δ‖²`` on the sample
``lost``              sum      elements whose update was rounded away
``lost_numel``        sum      elements of the rounding mask (0 without one)
``eff_min``           min      smallest effective learning rate (``+∞`` for no tensor)
``eff_max``           max      largest effective learning rate (``−∞`` for no tensor)
====================  =======  ==========================================================

The histograms (:attr:`StepSums.hist`) combine by :data:`HIST_COMBINE` (sum). A field's
value for no tensor at all is its rule's :attr:`Combine.identity`.

Statistics per row (the names are the monitor's tag stems). Every reduction runs in
float32 or better whatever the parameter dtype (bf16/fp16 tensors are upcast chunk by
chunk), and fields are accumulated in float64:

* ``grad_norm``, ``param_norm``, ``update_norm`` = ``√Σx²``; ``update_ratio`` =
  ``update_norm / param_norm``; ``exp_avg_norm`` = ``√Σm²`` (first moment, where there is
  one); ``exp_avg_sq_sqrt_mean`` = mean over elements of the optimizer's denominator
  statistic at gradient scale: ``√v`` of ``exp_avg_sq``, ``sum``, ``square_avg``,
  Adafactor's ``V̂``, and Adamax's ``exp_inf`` as it is (it already is a root). A sparse
  gradient enters through its coalesced values.
* ``eff_lr/p05``, ``eff_lr/p50``, ``eff_lr/p95``: quantiles of the per-element effective
  learning rate, from a histogram of ``log10(eff_lr)`` with :data:`BINS_PER_DECADE` bins
  per decade over ``[LOG10_MIN, LOG10_MAX]`` (linear interpolation within a bin: relative
  error below ``10^(1/BINS_PER_DECADE) − 1`` ≈ 4.7%), built from at most
  :data:`HIST_SAMPLES` elements per tensor (the fixed stratified random subsample of
  :func:`sample_index`, each element weighted by the population it stands for; exact
  below); ``eff_lr/min``, ``eff_lr/max`` exact.
* ``eps_dominated_frac``: share of elements where ε exceeds the gradient-based part of
  the denominator (the optimizer behaves like SGD with lr/ε there).
* ``update_lost_frac``: share of elements whose update was rounded away (non-zero
  intended update, parameter unchanged), from :attr:`ParamStep.update_lost` where the
  step carries one.
* ``nonfinite``: number of non-finite elements in the gradients and the (post-step)
  parameters; a non-finite update always leaves a non-finite parameter. Healthy steps
  cost nothing extra; only when a norm comes back non-finite are the elements of the
  affected rows counted, in a second (small) transfer.
* ``update_cosine``: cosine between this update and the one recorded last time (kept by
  a :class:`SupportsSwap` store, e.g. :class:`lr_monitor.recording.history.UpdateHistory`),
  on the fixed random subsample of at most ``samples_per_tensor`` coordinates per tensor
  (exact for smaller tensors); each sampled coordinate is weighted by the elements it
  stands for, so a small tensor counts as much as its size. Negative: the steps go back
  and forth.

Example:
    >>> import torch
    >>> from lr_monitor.functional import optimizer_steps
    >>> p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> opt = torch.optim.SGD([p], lr=0.1)
    >>> p.grad = torch.tensor([1.0, 0.0]); opt.step()
    >>> rows = summarize(step_sums(optimizer_steps(opt)).to_host())
    >>> round(rows[0]["update_norm"], 6), round(rows[0]["eff_lr/p50"], 3)
    (0.1, 0.1)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from lr_monitor.functional.fused import (
    EAGER,
    PACK_NUMEL,
    MomentKernel,
    MomentStep,
    as_flat,
    eff_bins,
    segment_ids,
)
from lr_monitor.functional.rules import ParamStep, compute_dtype

__all__ = [
    "BINS_PER_DECADE",
    "CHUNK_NUMEL",
    "FIELDS",
    "FIELD_COMBINE",
    "HIST_COMBINE",
    "HIST_SAMPLES",
    "LOG10_MAX",
    "LOG10_MIN",
    "Combine",
    "HostStepSums",
    "StepSums",
    "SupportsSwap",
    "counted_part",
    "grad_values",
    "histogram_buckets",
    "is_dtensor",
    "quantile_from_histogram",
    "quantiles_from_histograms",
    "rounded_away",
    "sample_index",
    "step_sums",
    "subsample",
    "summarize",
    "tensor_norms",
]

#: Histogram range of log10(eff_lr) and its resolution.
LOG10_MIN, LOG10_MAX, BINS_PER_DECADE = -16.0, 6.0, 50
_NBINS = int((LOG10_MAX - LOG10_MIN) * BINS_PER_DECADE)


# ----------------------------------------------------------------------------- combine rules


class Combine(str, Enum):
    """How two values of a field combine: across tensors, across rows and across ranks.

    One rule per field (:data:`FIELD_COMBINE`), applied the same way on the device
    (:meth:`fold`, :meth:`reduce`), on the host (:meth:`reduce_array`) and between ranks
    (:meth:`dist_op`).

    Example:
        >>> Combine.MIN.reduce(torch.tensor([[3.0], [1.0]])).tolist()
        [1.0]
        >>> Combine.MAX.reduce_array(np.zeros((0, 2))).tolist()
        [-inf, -inf]
        >>> Combine("sum").identity
        0.0
    """

    SUM = "sum"
    MIN = "min"
    MAX = "max"

    @property
    def identity(self) -> float:
        """The value of no tensor at all, which combines with ``x`` to ``x``."""
        return _IDENTITY[self]

    def fold(self, acc: Tensor, new: Tensor) -> Tensor:
        """``acc`` combined with ``new`` elementwise (on the device).

        Args:
            acc: The values so far.
            new: Values of the same shape to add in.

        Returns:
            A new tensor.
        """
        if self is Combine.SUM:
            return acc + new
        return torch.minimum(acc, new) if self is Combine.MIN else torch.maximum(acc, new)

    def reduce(self, rows: Tensor) -> Tensor:
        """Combine the rows (dim 0) of a non-empty tensor into one (on the device).

        Args:
            rows: ``n × k`` values, ``n ≥ 1``.

        Returns:
            ``k`` values.
        """
        if self is Combine.SUM:
            return rows.sum(0)
        return rows.amin(0) if self is Combine.MIN else rows.amax(0)

    def reduce_array(self, rows: np.ndarray) -> np.ndarray:
        """Combine the rows (axis 0) of a host array into one; the identity for no rows.

        Args:
            rows: ``n × k`` values, ``n ≥ 0``.

        Returns:
            ``k`` values.
        """
        return _UFUNC[self].reduce(rows, axis=0, initial=self.identity)

    def dist_op(self) -> Any:
        """The matching :class:`torch.distributed.ReduceOp`."""
        import torch.distributed as dist

        return getattr(dist.ReduceOp, self.name)


_IDENTITY = {Combine.SUM: 0.0, Combine.MIN: math.inf, Combine.MAX: -math.inf}
_UFUNC = {Combine.SUM: np.add, Combine.MIN: np.minimum, Combine.MAX: np.maximum}

#: Every column of :attr:`StepSums.values`, in column order, with its combine rule (the
#: table in the module docstring says what each holds).
FIELD_COMBINE: dict[str, Combine] = {
    "numel": Combine.SUM,
    "grad_sq": Combine.SUM,
    "param_sq": Combine.SUM,
    "update_sq": Combine.SUM,
    "first_sq": Combine.SUM,
    "first_numel": Combine.SUM,
    "second_sqrt_sum": Combine.SUM,
    "second_numel": Combine.SUM,
    "eps_dominated": Combine.SUM,
    "eps_numel": Combine.SUM,
    "nonfinite_tensors": Combine.SUM,
    "cos_dot": Combine.SUM,
    "cos_prev_sq": Combine.SUM,
    "cos_cur_sq": Combine.SUM,
    "lost": Combine.SUM,
    "lost_numel": Combine.SUM,
    "eff_min": Combine.MIN,
    "eff_max": Combine.MAX,
}

#: The column names of :attr:`StepSums.values`, in order.
FIELDS = tuple(FIELD_COMBINE)

#: How the effective-lr histograms (:attr:`StepSums.hist`) combine: counts add up.
HIST_COMBINE = Combine.SUM

_F = {name: i for i, name in enumerate(FIELDS)}

#: A rule and the columns it applies to, by position.
_Spans = tuple[tuple[Combine, slice], ...]


def _spans(rules: Iterable[Combine]) -> _Spans:
    """Runs of consecutive columns with the same rule, as slices (one per run)."""
    out, start = [], 0
    for rule, run in itertools.groupby(rules):
        stop = start + len(list(run))
        out.append((rule, slice(start, stop)))
        start = stop
    return tuple(out)


#: The columns of :attr:`StepSums.values` and of :attr:`StepSums.hist` by rule.
_FIELD_SPANS = _spans(FIELD_COMBINE.values())
_HIST_SPANS: _Spans = ((HIST_COMBINE, slice(None)),)


def _identity_rows(n: int, width: int, spans: _Spans, dev: torch.device) -> Tensor:
    """``n`` rows of no tensor: every column at its rule's identity."""
    rows = torch.empty(n, width, dtype=torch.float64, device=dev)
    for rule, cols in spans:
        rows[:, cols] = rule.identity
    return rows


def _fold_rows(acc: Tensor, rows: Tensor, spans: _Spans) -> None:
    """Combine the ``rows`` (``n × width``, on the device) into the row ``acc``, in place."""
    for rule, cols in spans:
        acc[cols] = rule.fold(acc[cols], rule.reduce(rows[:, cols]))


def _combine_host(rows: np.ndarray, spans: _Spans) -> np.ndarray:
    """The rows (``n × width``, ``n ≥ 0``) of a host array combined into one row."""
    out = np.empty(rows.shape[1:], dtype=np.float64)
    for rule, cols in spans:
        out[cols] = rule.reduce_array(rows[:, cols])
    return out


def _all_reduce(values: Tensor, spans: _Spans, group: Any) -> None:
    """Combine ``values`` elementwise across ranks, in place (one call per rule span)."""
    import torch.distributed as dist

    for rule, cols in spans:
        view = values[:, cols]
        part = view.contiguous()  # collectives need contiguous buffers
        dist.all_reduce(part, op=rule.dist_op(), group=group)
        if part is not view:
            view.copy_(part)


# ----------------------------------------------------------------------------- the sums


class SupportsSwap(Protocol):
    """Where ``update_cosine`` finds each parameter's previous update.

    The statistics only call :meth:`swap`; the state lives with the caller
    (:class:`lr_monitor.recording.history.UpdateHistory`).
    """

    def swap(self, param: Tensor, update: Tensor) -> tuple[Tensor | None, Tensor]:
        """Keep a sample of ``update`` for ``param``; return the previous one and this one.

        Args:
            param: The parameter (the key).
            update: Its update in this step.

        Returns:
            ``(previous sample or None, current sample)``: flat float32/float64 tensors of
            the same length, each value standing for ``update.numel() / len(sample)``
            elements; ``None`` when nothing comparable was kept.
        """
        ...


def rounded_away(param: Tensor, update: Tensor) -> Tensor:
    """Predicted mask of elements whose update ``Δ`` did not change the parameter.

    An update below half a unit in the last place of ``θ`` is rounded away when it is
    added. Without a copy of ``θ_before`` that is predicted from the parameter after the
    step: ``Δ ≠ 0`` and ``θ_after − Δ`` rounds back to ``θ_after`` in the parameter's
    dtype (exact but for updates within rounding of half an ulp). Where the applied
    update is measured (bf16/fp16 parameters in the recorder), the count is exact instead.

    Args:
        param: The parameter after the step.
        update: The update the optimizer computed (the real view for complex params).

    Returns:
        A bool tensor of the update's shape.

    Example:
        >>> theta = torch.tensor([1.0, 1.0, 0.0])
        >>> rounded_away(theta, torch.tensor([1e-9, 1e-3, 0.0])).tolist()
        [True, False, False]
    """
    theta = param.detach()
    theta = torch.view_as_real(theta) if torch.is_complex(theta) else theta
    return (update != 0) & ((theta - update.to(theta.dtype)) == theta)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (FSDP2, tensor parallelism): it has ``to_local``."""
    return callable(getattr(t, "to_local", None))


def counted_part(t: Tensor, *, across_ranks: bool) -> Tensor | None:
    """This rank's part of ``t`` in a sum over ranks, or ``None`` when another rank counts it.

    A sum over ranks (an all-reduce with ``SUM``) must see every element once. A DTensor's
    local shard counts on the ranks at coordinate 0 of every mesh dimension it is
    replicated over (one copy of each distinct shard: FSDP2 counts every shard, HSDP and a
    tensor-parallel ``Replicate`` parameter one replica); a plain tensor is replicated (as
    under DDP, or a layer a tensor-parallel plan leaves alone) and counts on rank 0 only.
    Without ``across_ranks`` the local part always counts.

    Args:
        t: A tensor or a DTensor (a parameter, its gradient, an update).
        across_ranks: Whether the sums are combined across ranks afterwards.

    Returns:
        The local tensor (a DTensor's shard, possibly empty), or ``None``.

    Raises:
        ValueError: For a DTensor with a ``Partial`` placement: its local values are
            addends of the tensor, not a part of it (reduce it first).

    Example:
        >>> counted_part(torch.ones(2), across_ranks=False).tolist()
        [1.0, 1.0]
    """
    if not is_dtensor(t):
        if not across_ranks:
            return t
        import torch.distributed as dist

        counted = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        return t if counted else None
    placements = tuple(t.placements)  # type: ignore[attr-defined]
    if any(p.is_partial() for p in placements):
        raise ValueError(f"a DTensor with placements {placements} is a partial sum "
                         "(Partial): its norm needs the reduced tensor")
    if across_ranks:
        coordinate = t.device_mesh.get_coordinate()  # type: ignore[attr-defined]
        if coordinate is None or any(c != 0 for c, p in zip(coordinate, placements, strict=True)
                                     if not p.is_shard()):
            return None
    return t.to_local()  # type: ignore[attr-defined, no-any-return]


@dataclass
class StepSums:
    """Reducible fields of one optimizer step, still on the device.

    Args:
        values: ``rows × len(FIELDS)`` float64.
        hist: ``rows × bins`` float64 counts of log10(eff_lr).
        extra: Extra float64 scalars that ride along in the same transfer (e.g. the
            group learning rates when they are tensors, pre-step gradient norms).
        nonfinite_tensors: Per row, the tensors (gradients, parameters) to count exactly
            when a norm comes back non-finite.
        tensor_params: The parameters of the tensor rows, in row order.
    """

    values: Tensor
    hist: Tensor
    extra: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    nonfinite_tensors: list[list[Tensor]] = field(default_factory=list)
    tensor_params: list[Tensor] = field(default_factory=list)
    #: ``(group,)`` once :meth:`all_reduce` ran: the exact non-finite counts are summed
    #: over the same group.
    reduced: tuple[Any] | None = None

    def all_reduce(self, group: Any = None) -> None:
        """Combine across ranks for sharded parameters (FSDP2/DTensor), by each field's rule.

        The sums must come from ``step_sums(across_ranks=True)`` on every rank of
        ``group`` (each element counted on one rank). Replicated parameters alone (DDP)
        need no reduction: every rank holds the same values. One collective per run of
        columns with the same :class:`Combine` rule, and one for the histograms.

        Args:
            group: The process group (default: the world).
        """
        _all_reduce(self.values, _FIELD_SPANS, group)
        _all_reduce(self.hist, _HIST_SPANS, group)
        self.reduced = (group,)

    def to_host(self) -> HostStepSums:
        """Everything to the host in one transfer (one ``.cpu()``)."""
        rows, nf = self.values.shape
        device = self.values.device
        flat = torch.cat([self.values.reshape(-1), self.hist.reshape(-1),
                          self.extra.to(device).reshape(-1)])
        # The one device-to-host copy; numpy then views that host memory.
        host = np.asarray(flat.cpu(), dtype=np.float64)
        nv, nh = rows * nf, self.hist.numel()
        values = host[:nv].reshape(rows, nf)
        if values[:, _F["nonfinite_tensors"]].any():  # (the same on every rank once reduced)
            _count_nonfinite(values, self.nonfinite_tensors, device, self.reduced)
        return HostStepSums(values=values,
                            hist=host[nv:nv + nh].reshape(self.hist.shape),
                            extra=host[nv + nh:])


@dataclass
class HostStepSums:
    """:class:`StepSums` on the host (numpy)."""

    values: np.ndarray
    hist: np.ndarray
    extra: np.ndarray

    def combine(self, rows: Sequence[int] | None = None) -> HostStepSums:
        """Combine the given rows (default: all) into one, by each field's rule.

        This is how the ``global`` row is made from the group rows.

        Args:
            rows: Row indices.

        Returns:
            One row; ``extra`` is kept as it is.
        """
        idx = list(range(self.values.shape[0])) if rows is None else list(rows)
        return HostStepSums(values=_combine_host(self.values[idx], _FIELD_SPANS)[None],
                            hist=_combine_host(self.hist[idx], _HIST_SPANS)[None],
                            extra=self.extra)


def _count_nonfinite(values: np.ndarray, tensors: list[list[Tensor]], device: torch.device,
                     reduced: tuple[Any] | None = None) -> None:
    """Second, small transfer: exact non-finite element counts of the flagged rows.

    ``reduced``: ``(group,)`` when the sums were summed across ranks: so are the counts
    (every rank has the same rows and flags, so every rank joins).
    """
    counts = []
    for row in tensors:
        c = [torch.count_nonzero(~torch.isfinite(t)) for t in row]
        counts.append(torch.stack(c).sum() if c else torch.zeros((), dtype=torch.int64))
    if counts:
        total = torch.stack([c.to(device) for c in counts])
        if reduced is not None:
            import torch.distributed as dist

            dist.all_reduce(total, group=reduced[0])
        host = total.to("cpu").tolist()
        for i, n in enumerate(host):
            values[i, _F["nonfinite_tensors"]] = n


# ----------------------------------------------------------------------------- subsamples

#: Elements per tensor that enter the effective-lr histogram (a fixed random subsample
#: beyond that): the quantiles' rank error is then about 0.1% (binomial, at p05).
HIST_SAMPLES = 1 << 16

#: Distinct sample index sets kept (one per tensor size, sample size and device).
_INDEX_CACHE_SIZE = 256
_INDEX_CACHE: dict[tuple[int, int, str], Tensor] = {}


def sample_index(n: int, k: int, device: torch.device | str = "cpu") -> Tensor | None:
    """A fixed, stratified pseudo-random set of ``min(n, k)`` indices into ``range(n)``.

    Stratum ``i`` covers ``[⌊i·n/k⌋, ⌊(i+1)·n/k⌋)`` and contributes one index, uniform
    within it (``u_i ~ U[0, 1)``) drawn once from a generator seeded by ``n``
    and ``k``. Every index stands for ``n/k`` elements (to within one element), the set is
    the same on every call (so successive samples of a tensor cover the same coordinates,
    on every rank and every machine), and — unlike a strided subsample — it cannot alias
    with the layout of a tensor: a ``Conv2d(256, 256, 3)`` weight with stride 9 would see
    only one kernel tap.

    Args:
        n: Elements in the tensor (≥ 0).
        k: Sample size (≥ 1).
        device: Where the index tensor lives.

    Returns:
        A sorted int64 tensor of ``k`` distinct indices, or ``None`` when ``n ≤ k`` (take
        every element).

    Example:
        >>> idx = sample_index(1000, 10)
        >>> idx.numel(), bool((idx[1:] > idx[:-1]).all()), int(idx.max()) < 1000
        (10, True, True)
        >>> bool((sample_index(1000, 10) == idx).all()), sample_index(5, 10) is None
        (True, True)
    """
    if n <= k:
        return None
    key = (n, k, str(device))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        gen = torch.Generator().manual_seed((n * 1_000_003 + k) % (2**63))
        u = torch.rand(k, generator=gen, dtype=torch.float64)
        bounds = torch.div(torch.arange(k + 1, dtype=torch.int64) * n, k, rounding_mode="floor")
        start, size = bounds[:-1], bounds[1:] - bounds[:-1]  # every size is ≥ 1 (n > k)
        idx = (start + (u * size).long().clamp_(max=size - 1)).to(device)
        if len(_INDEX_CACHE) >= _INDEX_CACHE_SIZE:
            _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
        _INDEX_CACHE[key] = idx
    return idx


def subsample(t: Tensor, k: int) -> Tensor:
    """The fixed random subsample of :func:`sample_index`: at most ``k`` elements, flat.

    Args:
        t: Any tensor.
        k: Sample size (≥ 1).

    Returns:
        ``t`` flattened (a view) when it has at most ``k`` elements, else the ``k``
        elements at ``sample_index(t.numel(), k)`` (a copy).

    Example:
        >>> subsample(torch.ones(2, 3), 10).shape, subsample(torch.arange(1e4), 10).shape
        (torch.Size([6]), torch.Size([10]))
    """
    flat = t.reshape(-1)
    idx = sample_index(flat.numel(), k, flat.device)
    return flat if idx is None else flat.index_select(0, idx)


# ----------------------------------------------------------------------------- step_sums

#: Elements reduced per chunk: the statistics pass holds the temporaries of about this
#: many elements (or of the largest single tensor, if larger) at a time.
CHUNK_NUMEL = 1 << 22


def step_sums(
    steps: Sequence[Iterable[ParamStep | MomentStep]],
    *,
    history: SupportsSwap | None = None,
    grad_sq: dict[Tensor, Tensor] | None = None,
    tensor_rows: Callable[[Tensor], bool] | None = None,
    extra: Sequence[Tensor | float] = (),
    chunk_numel: int = CHUNK_NUMEL,
    across_ranks: bool = False,
    kernel: MomentKernel | None = None,
) -> StepSums:
    """Reduce the steps of one optimizer to per-row fields, on the device.

    The steps are consumed lazily and reduced in chunks of about ``chunk_numel``
    elements, so with the generators of
    :func:`~lr_monitor.functional.rules.iter_group_steps` the peak extra memory is a few
    temporaries of one chunk (or of the largest tensor), never of the whole model.

    Args:
        steps: Per param group, the :class:`ParamStep` of each parameter (lists or
            iterators, e.g. ``[iter_group_steps(opt, g) for g in opt.param_groups]``),
            or for an Adam/AdamW group the
            :class:`~lr_monitor.functional.fused.MomentStep` of each
            (``moment_group(opt, g).steps()``): its statistics are then read from the
            optimizer state in one pass (:mod:`lr_monitor.functional.fused`).
        history: Where the previous update samples live, for ``update_cosine`` (e.g. a
            :class:`lr_monitor.recording.history.UpdateHistory`); ``None`` leaves the
            cosine fields at zero.
        grad_sq: Per parameter, ``‖g‖²`` measured before the step (e.g. before gradient
            clipping); default: from ``p.grad`` after the step.
        tensor_rows: Which parameters also get a row of their own (after the group rows,
            in the order met). ``None``: group rows only.
        extra: Scalars to carry in the same host transfer (floats or 0-d tensors).
        chunk_numel: Elements per chunk (≥ 1).
        across_ranks: The sums will be summed across ranks (:meth:`StepSums.all_reduce`,
            sharded parameters): a parameter enters only where :func:`counted_part` counts
            it, elsewhere its tensor row (if any) holds the identities. An empty local
            shard (FSDP2 shards a dimension smaller than the world) never enters.
        kernel: What runs the kernels of :class:`~lr_monitor.functional.fused.MomentStep`
            tensors (:class:`~lr_monitor.functional.fused.MomentKernel`); default the
            eager ones (:data:`~lr_monitor.functional.fused.EAGER`).

    Returns:
        The sums; rows are the param groups, then the selected tensors
        (:attr:`StepSums.tensor_params`).

    Example:
        >>> from lr_monitor.functional import optimizer_steps
        >>> p = torch.nn.Parameter(torch.ones(4))
        >>> opt = torch.optim.SGD([p], lr=0.5)
        >>> p.grad = torch.ones(4); opt.step()
        >>> sums = step_sums(optimizer_steps(opt))
        >>> host = sums.to_host()
        >>> host.values[0, FIELDS.index("update_sq")], host.values[0, FIELDS.index("eff_max")]
        (np.float64(1.0), np.float64(0.5))
    """
    acc = _Accumulator(len(steps), history, grad_sq, tensor_rows, kernel)
    for gi, group in enumerate(steps):
        chunk: list[ParamStep | MomentStep] = []
        size = 0
        for s in group:
            if isinstance(s, MomentStep) and not across_ranks:  # a plain local tensor
                part = s.param if s.size else None
            else:
                part = counted_part(s.param, across_ranks=across_ranks)
            if part is None or part.numel() == 0:
                if tensor_rows is not None and tensor_rows(s.param):
                    if chunk:  # tensor rows stay in parameter order, the same on every rank
                        acc.reduce(gi, chunk)
                        chunk, size = [], 0
                    acc.skip(s)
                continue
            chunk.append(s)
            size += s.numel() if isinstance(s, MomentStep) else s.update.numel()
            if size >= chunk_numel:
                acc.reduce(gi, chunk)
                chunk, size = [], 0
        if chunk:
            acc.reduce(gi, chunk)
    return acc.finish(extra)


class _Accumulator:
    """Combines the per-tensor rows of each chunk into group rows; keeps tensor rows."""

    def __init__(self, n_groups: int, history: SupportsSwap | None,
                 grad_sq: dict[Tensor, Tensor] | None,
                 tensor_rows: Callable[[Tensor], bool] | None,
                 kernel: MomentKernel | None = None) -> None:
        self.n_groups = n_groups
        self.kernel = kernel or EAGER
        self.history = history
        self.grad_sq = grad_sq
        self.tensor_rows = tensor_rows
        self.device: torch.device | None = None
        self.group_values: Tensor | None = None
        self.group_hist: Tensor | None = None
        self.tensor_params: list[Tensor] = []
        self.tensor_values: list[Tensor] = []
        self.tensor_hist: list[Tensor] = []
        self.nonfinite: list[list[Tensor]] = [[] for _ in range(n_groups)]

    def _init(self, dev: torch.device) -> None:
        self.device = dev
        self.group_values = _identity_rows(self.n_groups, len(FIELDS), _FIELD_SPANS, dev)
        self.group_hist = _identity_rows(self.n_groups, _NBINS, _HIST_SPANS, dev)

    def skip(self, step: ParamStep | MomentStep) -> None:
        """The tensor row of a step counted elsewhere (another rank): the identities."""
        dev = self.device or (step.param.device if isinstance(step, MomentStep)
                              else _local(step.update).device)
        self.tensor_params.append(step.param)
        self.tensor_values.append(_identity_rows(1, len(FIELDS), _FIELD_SPANS, dev)[0])
        self.tensor_hist.append(_identity_rows(1, _NBINS, _HIST_SPANS, dev)[0])
        self.nonfinite.append([])

    def reduce(self, group: int, steps: Sequence[ParamStep | MomentStep]) -> None:
        first = steps[0]
        if self.device is None:
            self._init(first.param.device if isinstance(first, MomentStep)
                       else first.update.device)
        assert self.device is not None
        assert self.group_values is not None and self.group_hist is not None
        if isinstance(first, MomentStep):
            moments = [s for s in steps if isinstance(s, MomentStep)]
            for row in _moment_rows(moments, self.device, self.history, self.grad_sq,
                                    self.tensor_rows, self.kernel):
                self.add(group, row)
            return
        chunk = _Chunk.of([s for s in steps if isinstance(s, ParamStep)], self.device)
        values, hists = _chunk_sums(chunk, self.history, self.grad_sq)
        _fold_rows(self.group_values[group], values, _FIELD_SPANS)
        _fold_rows(self.group_hist[group], hists, _HIST_SPANS)
        for i, s in enumerate(steps):
            kept = [chunk.grads[i], chunk.params[i]]
            self.nonfinite[group].extend(kept)
            if self.tensor_rows is not None and self.tensor_rows(s.param):
                self.tensor_params.append(s.param)
                self.tensor_values.append(values[i])
                self.tensor_hist.append(hists[i])
                self.nonfinite.append(kept)

    def add(self, group: int, row: _Row) -> None:
        """Fold one row (a tensor, or a pack of them) into its group; keep a tensor row."""
        assert self.group_values is not None and self.group_hist is not None
        if row.fold:
            _fold_rows(self.group_values[group], row.values[None], _FIELD_SPANS)
            _fold_rows(self.group_hist[group], row.hist[None], _HIST_SPANS)
            self.nonfinite[group].extend(row.nonfinite)
        if row.param is not None:
            self.tensor_params.append(row.param)
            self.tensor_values.append(row.values)
            self.tensor_hist.append(row.hist)
            self.nonfinite.append(row.nonfinite)

    def finish(self, extra: Sequence[Tensor | float]) -> StepSums:
        dev = self.device or torch.device("cpu")
        if self.group_values is None:
            self._init(dev)
        assert self.group_values is not None and self.group_hist is not None
        values, hist = self.group_values, self.group_hist
        if self.tensor_values:
            values = torch.cat([values, torch.stack(self.tensor_values)])
            hist = torch.cat([hist, torch.stack(self.tensor_hist)])
        extra_t = torch.stack([
            (e.detach().reshape(()) if isinstance(e, Tensor) else torch.tensor(float(e)))
            .to(device=dev, dtype=torch.float64) for e in extra
        ]) if extra else torch.zeros(0, dtype=torch.float64, device=dev)
        return StepSums(values, hist, extra_t, self.nonfinite, list(self.tensor_params))


def grad_values(g: Tensor) -> Tensor:
    """The values of a gradient that enter its norm: a sparse one's coalesced values.

    Args:
        g: A gradient (dense, sparse or a DTensor).

    Returns:
        The local dense tensor, or a sparse gradient's coalesced values.

    Raises:
        ValueError: For a ``Partial`` DTensor (see :func:`counted_part`).

    Example:
        >>> g = torch.sparse_coo_tensor([[0, 0, 2]], [1.0, 2.0, 5.0], (4,), check_invariants=True)
        >>> grad_values(g).tolist()
        [3.0, 5.0]
    """
    g = counted_part(g, across_ranks=False)  # type: ignore[assignment]
    return g.coalesce().values() if g.is_sparse else g


def tensor_norms(tensors: list[Tensor]) -> Tensor:
    """``‖t‖₂`` of each tensor as float64, computed in float32 or better.

    One ``foreach`` launch per dtype class: bf16/fp16 tensors are reduced with a float32
    accumulator, float32/float64 in their own precision.

    Args:
        tensors: Dense tensors on one device.

    Returns:
        A float64 vector, one norm per tensor.

    Example:
        >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.ones(4, dtype=torch.bfloat16)])
        tensor([5., 2.], dtype=torch.float64)
    """
    dev = tensors[0].device if tensors else torch.device("cpu")
    if len(tensors) >= _MANY_TENSORS:
        many = _many_small_norms(tensors)
        if many is not None:
            return many
    low = [i for i, t in enumerate(tensors) if t.dtype in (torch.bfloat16, torch.float16)]
    rest = [i for i, t in enumerate(tensors) if t.dtype not in (torch.bfloat16, torch.float16)]
    if not low or not rest:  # one dtype class: no scatter (no index copied to the device)
        if not tensors:
            return torch.zeros(0, dtype=torch.float64, device=dev)
        n = torch._foreach_norm(tensors, 2, dtype=torch.float32) if low \
            else torch._foreach_norm(tensors)
        return torch.stack(n).to(torch.float64)
    out = torch.zeros(len(tensors), dtype=torch.float64, device=dev)
    n = torch._foreach_norm([tensors[i] for i in low], 2, dtype=torch.float32)
    out[low] = torch.stack(n).to(out.device, torch.float64)
    n = torch._foreach_norm([tensors[i] for i in rest])
    out[rest] = torch.stack(n).to(out.device, torch.float64)
    return out


#: From this many tensors on, :func:`tensor_norms` reduces the small ones of one dtype as
#: one concatenation (a launch per tensor costs more than the arithmetic there).
_MANY_TENSORS = 64
_SMALL_NUMEL = 1 << 14


def _many_small_norms(tensors: list[Tensor]) -> Tensor | None:
    """:func:`tensor_norms` of many small tensors of one dtype and device: segment sums.

    ``None`` when they are not all small, or differ in dtype or device.
    """
    first = tensors[0]
    if any(t.dtype != first.dtype or t.device != first.device or t.numel() > _SMALL_NUMEL
           for t in tensors):
        return None
    sizes = [t.numel() for t in tensors]
    with torch.no_grad():
        flat = torch.cat([as_flat(t) for t in tensors]).to(compute_dtype(first))
    seg = segment_ids(sizes, first.device)
    sq = torch.zeros(len(tensors), dtype=flat.dtype, device=flat.device)
    sq.index_add_(0, seg, flat.square())
    return sq.sqrt().to(torch.float64)


# ----------------------------------------------------------------------------- one chunk


@dataclass
class _Chunk:
    """A chunk of steps and the local (shard) views of the tensors the parts read."""

    steps: list[ParamStep]
    device: torch.device
    grads: list[Tensor]
    params: list[Tensor]
    updates: list[Tensor]
    effs: list[Tensor]

    @classmethod
    def of(cls, steps: list[ParamStep], device: torch.device) -> _Chunk:
        return cls(steps, device,
                   grads=[grad_values(s.grad) for s in steps],
                   params=[_local(s.param.detach()) for s in steps],
                   updates=[_local(s.update) for s in steps],
                   effs=[_local(s.eff_lr) for s in steps])

    def floats(self, values: Sequence[float]) -> Tensor:
        """A float64 column on the chunk's device."""
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def spread(self, rows: list[int], values: Tensor) -> Tensor:
        """A column with ``values`` at ``rows`` and 0 (the sum identity) elsewhere."""
        if len(rows) == len(self.steps):
            return values.to(self.device)
        col = torch.zeros(len(self.steps), dtype=torch.float64, device=self.device)
        col[rows] = values.to(self.device)
        return col


def _chunk_sums(chunk: _Chunk, history: SupportsSwap | None,
                grad_sq: dict[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Per-tensor fields (``len(steps) × len(FIELDS)``) and log10 eff-lr histograms.

    Each part reads one kind of tensor and fills its own fields; only ``eff_lr`` (whole
    for the extremes, a subsample for the histogram) and the update (whole for its norm, a
    subsample for the cosine) are read twice, nothing is read back to the host:

    ============================  ==============================  =========================
    part                          reads                           fills
    ============================  ==============================  =========================
    :func:`_norm_fields`          parameters, updates, gradients  numel, grad/param/update_sq
    :func:`_moment_fields`        first and second moments        first_*, second_*
    :func:`_mask_fields`          ε and rounding masks            eps_*, lost*
    :func:`_extreme_fields`       effective lrs                   eff_min, eff_max
    :func:`_cosine_fields`        update samples (and history)    cos_*
    :func:`_nonfinite_flags`      the norms above                 nonfinite_tensors
    :func:`_eff_lr_histograms`    effective-lr subsamples         the histogram rows
    ============================  ==============================  =========================

    A field no part fills (no first moment in the chunk, no history) holds its identity.
    """
    cols = {
        **_norm_fields(chunk, grad_sq),
        **_moment_fields(chunk),
        **_mask_fields(chunk),
        **_extreme_fields(chunk),
        **_cosine_fields(chunk, history),
    }
    cols["nonfinite_tensors"] = _nonfinite_flags(cols, chunk.device)
    return _field_rows(cols, chunk), _eff_lr_histograms(chunk)


def _field_rows(cols: dict[str, Tensor], chunk: _Chunk) -> Tensor:
    """The columns side by side in :data:`FIELDS` order; a missing one at its identity."""
    return _columns(cols, len(chunk.steps), chunk.device)


def _norm_fields(chunk: _Chunk, grad_sq: dict[Tensor, Tensor] | None) -> dict[str, Tensor]:
    """``numel``, ``param_sq``, ``update_sq``, ``grad_sq``: one ``foreach`` norm per kind."""
    cols = {
        "numel": chunk.floats([float(u.numel()) for u in chunk.updates]),
        "param_sq": tensor_norms(chunk.params).square(),
        "update_sq": tensor_norms(chunk.updates).square(),
    }
    if grad_sq is None:
        cols["grad_sq"] = tensor_norms(chunk.grads).square()
    else:  # measured before the step (clipping); the gradients are not read
        zero = torch.zeros((), dtype=torch.float64, device=chunk.device)
        cols["grad_sq"] = torch.stack([
            grad_sq[s.param].double().reshape(()).to(chunk.device) if s.param in grad_sq
            else zero for s in chunk.steps])
    return cols


def _moment_fields(chunk: _Chunk) -> dict[str, Tensor]:
    """``first_*`` and ``second_*`` of the steps with moments: one ``foreach`` norm each.

    The second moment enters at gradient scale: ``Σ√v`` for a squared-gradient statistic,
    ``Σv`` where the state already is a root (Adamax's ``exp_inf``).
    """
    cols: dict[str, Tensor] = {}
    steps = chunk.steps
    first = [i for i, s in enumerate(steps) if s.first_moment is not None]
    if first:
        firsts = [_local(steps[i].first_moment) for i in first]  # type: ignore[arg-type]
        cols["first_sq"] = chunk.spread(first, tensor_norms(firsts).square())
        cols["first_numel"] = chunk.spread(first, chunk.floats([f.numel() for f in firsts]))
    second = [i for i, s in enumerate(steps) if s.second_moment is not None]
    if second:
        stats = [_local(steps[i].second_moment) for i in second]  # type: ignore[arg-type]
        stats = [v.to(compute_dtype(v)) for v in stats]
        squared = [j for j, i in enumerate(second) if not steps[i].second_moment_is_root]
        if squared:
            for j, r in zip(squared, torch._foreach_sqrt([stats[j] for j in squared]),
                            strict=True):
                stats[j] = r
        sums = torch.stack(torch._foreach_norm(stats, ord=1)).to(chunk.device, torch.float64)
        cols["second_sqrt_sum"] = chunk.spread(second, sums)
        cols["second_numel"] = chunk.spread(second, chunk.floats([v.numel() for v in stats]))
    return cols


def _mask_fields(chunk: _Chunk) -> dict[str, Tensor]:
    """``eps_dominated``/``eps_numel`` and ``lost``/``lost_numel``: one count per mask."""
    cols: dict[str, Tensor] = {}
    zero = torch.zeros((), dtype=torch.float64, device=chunk.device)
    for count, numel, masks in (
            ("eps_dominated", "eps_numel", [s.eps_dominated for s in chunk.steps]),
            ("lost", "lost_numel", [s.update_lost for s in chunk.steps])):
        if all(m is None for m in masks):
            continue  # both fields stay at 0
        cols[count] = torch.stack([
            zero if m is None else torch.count_nonzero(_local(m)) for m in masks]).double()
        cols[numel] = chunk.floats([0.0 if m is None else float(u.numel())
                                    for m, u in zip(masks, chunk.updates, strict=True)])
    return cols


def _extreme_fields(chunk: _Chunk) -> dict[str, Tensor]:
    """``eff_min``, ``eff_max``: one ``aminmax`` pass over each effective lr."""
    lows, highs = zip(*(torch.aminmax(e) for e in chunk.effs), strict=True)
    return {"eff_min": torch.stack(lows).to(chunk.device, torch.float64),
            "eff_max": torch.stack(highs).to(chunk.device, torch.float64)}


def _cosine_fields(chunk: _Chunk, history: SupportsSwap | None) -> dict[str, Tensor]:
    """``cos_dot``, ``cos_prev_sq``, ``cos_cur_sq`` on the update samples of ``history``.

    Each sampled coordinate is weighted by the elements it stands for, so the combined
    cosine estimates the cosine of the whole update, not of the small tensors.
    """
    if history is None:
        return {}
    zero = torch.zeros((), dtype=torch.float64, device=chunk.device)
    terms = []
    for s, u in zip(chunk.steps, chunk.updates, strict=True):
        prev, cur = history.swap(s.param, u)
        c = cur.double()
        w = u.numel() / max(c.numel(), 1)
        if prev is None:
            terms.append(torch.stack([zero, zero, w * c.dot(c)]))
        else:
            p = prev.double()
            terms.append(w * torch.stack([c.dot(p), p.dot(p), c.dot(c)]))
    dot, prev_sq, cur_sq = torch.stack(terms).to(chunk.device).unbind(1)
    return {"cos_dot": dot, "cos_prev_sq": prev_sq, "cos_cur_sq": cur_sq}


def _nonfinite_flags(cols: dict[str, Tensor], dev: torch.device) -> Tensor:
    """``nonfinite_tensors``: how many of a tensor's two norms are not finite (0–2)."""
    finite = torch.stack([cols["grad_sq"].to(dev), cols["param_sq"].to(dev)]).isfinite()
    return (~finite).sum(0).double()


#: A bin position: one number or an array of them.
_Position = TypeVar("_Position", float, np.ndarray)


def _log10_at(position: _Position) -> _Position:
    """``log10(eff_lr)`` at a (fractional) bin position: bin ``i`` starts at ``_log10_at(i)``."""
    return LOG10_MIN + position / BINS_PER_DECADE


def _eff_lr_histograms(chunk: _Chunk) -> Tensor:
    """One row of ``log10(eff_lr)`` counts per tensor, from at most HIST_SAMPLES elements.

    log10 runs in float32 (bins are 0.02 decades wide), clamped so 0 and inf land in the end
    bins; NaN is left out (``nonfinite`` counts it). A large tensor is histogrammed on the
    fixed random subsample of :func:`sample_index`, each sampled element standing for
    ``n / HIST_SAMPLES`` of them (min and max stay exact). Bins are
    :func:`~lr_monitor.functional.fused.eff_bins`, counted by ``bincount`` (int64: exact).
    """
    rows = [_histogram_row(subsample(e, HIST_SAMPLES), u.numel()).to(chunk.device)
            for e, u in zip(chunk.effs, chunk.updates, strict=True)]
    return torch.stack(rows)


def _histogram_row(sample: Tensor, n: int) -> Tensor:
    """The log10 histogram of ``n`` effective lrs from a ``sample`` of them (all, or few)."""
    k = max(sample.numel(), 1)
    counts = _bin_counts(eff_bins(sample, LOG10_MIN, BINS_PER_DECADE, _NBINS))
    return counts * (n / k) if k != n else counts


def _bin_counts(bins: Tensor) -> Tensor:
    """Counts per bin (float64) of :func:`~lr_monitor.functional.fused.eff_bins` output."""
    return torch.bincount(bins, minlength=_NBINS + 1)[:_NBINS].double()


# ----------------------------------------------------------------------------- Adam-form steps


@dataclass
class _Row:
    """Fields and histogram of one tensor or of a pack of small ones, on the device.

    ``param`` is set for a tensor row (a row of its own besides its group's).
    """

    values: Tensor
    hist: Tensor
    nonfinite: list[Tensor]
    param: Tensor | None = None
    #: Whether the row enters its group's row (a pack's tensor rows do not: the pack does).
    fold: bool = True


def _moment_rows(steps: list[MomentStep], device: torch.device, history: SupportsSwap | None,
                 grad_sq: dict[Tensor, Tensor] | None,
                 tensor_rows: Callable[[Tensor], bool] | None,
                 kernel: MomentKernel) -> list[_Row]:
    """The rows of a chunk of :class:`MomentStep` (one group): tensors, then packs.

    A tensor gets a kernel call of its own when it is large (> ``PACK_NUMEL``), or when
    it has a tensor row and is larger than the cosine's sample; the other ones are packed
    by dtype and device and the pack is reduced by one kernel call, with the scalars of
    each tensor expanded to its elements. Every tensor of a pack enters the histogram
    whole, as it does on the generic path (it is no larger than the histogram's sample),
    and its update goes to ``history`` whole. The tensor rows of a pack come from segment
    sums over the pack's elements (:func:`_pack_tensor_rows`).
    """
    cos_k = _cosine_samples(history)
    whole_ok = history is None or (callable(getattr(history, "swap_whole", None))
                                   and cos_k is not None)
    own_limit = PACK_NUMEL if history is None else min(PACK_NUMEL, cos_k or 0)
    singles: list[tuple[MomentStep, bool]] = []
    packs: dict[tuple[torch.dtype, torch.device], list[tuple[MomentStep, bool]]] = {}
    where: dict[int, int] = {}  # id(param) -> position in the chunk (tensor rows keep it)
    for pos, s in enumerate(steps):
        own = tensor_rows is not None and tensor_rows(s.param)
        if own:
            where[id(s.param)] = pos
        if s.numel() > PACK_NUMEL or (own and not (whole_ok and s.numel() <= own_limit)):
            singles.append((s, own))
        else:
            packs.setdefault((s.param.dtype, s.param.device), []).append((s, own))
    rows = _single_rows(singles, device, history, grad_sq, kernel) if singles else []
    for members in packs.values():
        rows += _pack_rows(members, device, history, grad_sq, kernel)
    # Tensor rows in parameter order (the same on every rank); group-only rows first.
    return sorted(rows, key=lambda r: -1 if r.param is None else where[id(r.param)])


def _cosine_samples(history: SupportsSwap | None) -> int | None:
    """Values per tensor the history keeps (``None``: unknown, give it whole updates)."""
    k = getattr(history, "samples_per_tensor", None)
    return k if isinstance(k, int) and not isinstance(k, bool) and k >= 1 else None


def _moment_update(theta: Tensor, m: Tensor, v: Tensor, neg_step: Tensor, sqrt_bc2: Tensor,
                   eps: Tensor, decay: Tensor | None) -> Tensor:
    """The update ``Δ`` (eager, out of place: for samples and packs)."""
    den = v.sqrt().div_(sqrt_bc2).add_(eps)
    a = torch.div(m, den).mul_(neg_step)
    return a if decay is None else torch.where(decay == 0, a, a - decay * (theta - a))


def _moment_cosine(history: SupportsSwap, param: Tensor, update: Tensor, n: int) -> Tensor:
    """``(cos_dot, cos_prev_sq, cos_cur_sq)`` of one tensor, from its update (sample)."""
    prev, cur = history.swap(param, update)
    return _moment_cosine_terms(prev, cur, n)


def _moment_cosine_terms(prev: Tensor | None, cur: Tensor, n: int) -> Tensor:
    """The weighted cosine terms of a tensor of ``n`` elements from its two samples."""
    c = cur.double()
    w = n / max(c.numel(), 1)
    if prev is None:
        zero = torch.zeros((), dtype=torch.float64, device=c.device)
        return torch.stack([zero, zero, w * c.dot(c)])
    p = prev.double()
    return w * torch.stack([c.dot(p), p.dot(p), c.dot(c)])


def _single_rows(singles: list[tuple[MomentStep, bool]], device: torch.device,
                 history: SupportsSwap | None, grad_sq: dict[Tensor, Tensor] | None,
                 kernel: MomentKernel) -> list[_Row]:
    """One kernel call per tensor; the rows assembled for all of them at once."""
    cos_k = _cosine_samples(history)
    fields, hists, coss, keep = [], [], [], []
    for s, _ in singles:
        g = s.group
        theta, grad, m, v = g.flat(s.index)
        neg, sb, eps, c, decay = g.scalars(s.index)
        n = theta.numel()
        fields.append(kernel(theta, theta if grad_sq is not None else grad, m, v, neg, sb,
                             eps, c, decay).to(device))
        idx = sample_index(n, HIST_SAMPLES, theta.device)
        vs = v if idx is None else v.index_select(0, idx)
        den = vs.sqrt().div_(sb).add_(eps)
        hists.append(_histogram_row(c / den, n).to(device))
        if history is not None:
            idx = sample_index(n, cos_k, theta.device) if cos_k is not None else None
            if idx is None:  # every element (a custom store samples the update itself)
                u = _moment_update(theta, m, v, neg, sb, eps, decay)
            else:
                u = _moment_update(theta.index_select(0, idx), m.index_select(0, idx),
                                   v.index_select(0, idx), neg, sb, eps, decay)
            coss.append(_moment_cosine(history, s.param, u, n).to(device))
        keep.append([grad, theta])
    f = torch.stack(fields)
    cols: dict[str, Tensor] = {
        "numel": torch.tensor([float(s.numel()) for s, _ in singles], dtype=torch.float64,
                              device=device),
        "param_sq": f[:, 1], "update_sq": f[:, 2], "first_sq": f[:, 3],
        "second_sqrt_sum": f[:, 4], "eps_dominated": f[:, 5], "lost": f[:, 6],
        # eff = c/den in the parameter dtype, as the rule computes it
        "eff_min": f[:, 7], "eff_max": f[:, 8],
    }
    cols["grad_sq"] = f[:, 0] if grad_sq is None else _known_grad_sq(
        grad_sq, [s.param for s, _ in singles], device)
    for name in ("first_numel", "second_numel", "eps_numel", "lost_numel"):
        cols[name] = cols["numel"]
    if coss:
        cos = torch.stack(coss)
        cols["cos_dot"], cols["cos_prev_sq"], cols["cos_cur_sq"] = cos.unbind(1)
    cols["nonfinite_tensors"] = _nonfinite_flags(cols, device)
    values = _columns(cols, len(singles), device)
    return [_Row(values[i], hists[i], keep[i], s.param if own else None)
            for i, (s, own) in enumerate(singles)]


def _known_grad_sq(grad_sq: dict[Tensor, Tensor], params: list[Tensor],
                   device: torch.device) -> Tensor:
    """The pre-step ``‖g‖²`` of ``params`` (0 for one not measured), float64."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    values = [grad_sq.get(p, zero) for p in params]
    try:  # 0-d values (what StepRecorder.capture_gradients keeps): one stack
        return torch.stack(values).to(device, torch.float64).reshape(len(values))
    except RuntimeError:  # other shapes or devices: one at a time
        return torch.stack([x.reshape(()).to(device, torch.float64) for x in values])


def _pack_rows(members: list[tuple[MomentStep, bool]], device: torch.device,
               history: SupportsSwap | None, grad_sq: dict[Tensor, Tensor] | None,
               kernel: MomentKernel) -> list[_Row]:
    """Many small tensors of one dtype: one flat buffer, one kernel call, one group row.

    Plus a row for each tensor that has one (``members``: ``(step, has a tensor row)``),
    from segment sums over the same buffers.
    """
    pack = [s for s, _ in members]
    g = pack[0].group
    idx = [s.index for s in pack]
    with torch.no_grad():  # (parameters concatenated without a graph)
        theta, grad, m, v = (torch.cat([as_flat(ts[i]) for i in idx]) for ts in (
            g.params, g.grads, g.exp_avgs, g.exp_avg_sqs))
    dev, dtype = theta.device, theta.dtype
    sizes_list = [s.size for s in pack]
    n = theta.numel()
    neg, sb, eps, c, decay = g.scalars_of(idx, dtype, dev, sizes_list)
    f, bins, u = kernel.pack(theta, theta if grad_sq is not None else grad, m, v, neg, sb,
                             eps, c, decay, LOG10_MIN, float(BINS_PER_DECADE), _NBINS)
    f = f.to(device)
    cols: dict[str, Tensor] = {
        "numel": torch.tensor([float(n)], dtype=torch.float64, device=device),
        "param_sq": f[1:2], "update_sq": f[2:3], "first_sq": f[3:4],
        "second_sqrt_sum": f[4:5], "eps_dominated": f[5:6], "lost": f[6:7],
        "eff_min": f[7:8], "eff_max": f[8:9],
    }
    cols["grad_sq"] = f[0:1] if grad_sq is None else _known_grad_sq(
        grad_sq, [s.param for s in pack], device).sum().reshape(1)
    for name in ("first_numel", "second_numel", "eps_numel", "lost_numel"):
        cols[name] = cols["numel"]
    cos_k = _cosine_samples(history)
    swap_whole = getattr(history, "swap_whole", None)
    whole = prev = None
    if history is not None and callable(swap_whole) and cos_k is not None \
            and max(sizes_list) <= cos_k:  # every tensor whole: one call for the pack
        prev_t, cur_t = swap_whole([s.param for s in pack], u, sizes_list)
        whole, prev = cur_t.double(), prev_t.double()
        terms = torch.stack([whole.dot(prev), prev.dot(prev), whole.dot(whole)])
        cols["cos_dot"], cols["cos_prev_sq"], cols["cos_cur_sq"] = (
            x.reshape(1).to(device) for x in terms.unbind())
    elif history is not None:
        prevs, curs, sampled = [], [], []
        for s, part in zip(pack, u.split(sizes_list), strict=True):
            prev, cur = history.swap(s.param, part)  # copies, as the store keeps them
            if cur.numel() != part.numel():  # the store keeps a sample of this one
                sampled.append(_moment_cosine_terms(prev, cur, part.numel()))
                prev, cur = None, torch.zeros_like(part)  # in its own terms instead
            curs.append(cur)
            prevs.append(torch.zeros_like(cur) if prev is None else prev)
        whole, prev = torch.cat(curs).double(), torch.cat(prevs).double()
        terms = torch.stack([whole.dot(prev), prev.dot(prev), whole.dot(whole)])
        for t in sampled:
            terms = terms + t
        cols["cos_dot"], cols["cos_prev_sq"], cols["cos_cur_sq"] = (
            x.reshape(1).to(device) for x in terms.unbind())
    cols["nonfinite_tensors"] = _nonfinite_flags(cols, device)
    keep = [t for i in idx for t in (g.grads[i], g.params[i])]
    rows = [_Row(_columns(cols, 1, device)[0], _bin_counts(bins).to(device), keep)]
    own = [j for j, (_, has_row) in enumerate(members) if has_row]
    if own:
        cos = None if history is None else (whole, prev)
        rows += _pack_tensor_rows(pack, own, theta, grad, m, v, u, bins, (neg, sb, eps, c),
                                  grad_sq, cos, device)
    return rows


def _pack_tensor_rows(pack: list[MomentStep], own: list[int], theta: Tensor, grad: Tensor,
                      m: Tensor, v: Tensor, u: Tensor, bins: Tensor,
                      scalars: tuple[Tensor, Tensor, Tensor, Tensor],
                      grad_sq: dict[Tensor, Tensor] | None,
                      cos: tuple[Tensor | None, Tensor | None] | None,
                      device: torch.device) -> list[_Row]:
    """The tensor rows of a pack's tensors ``own``: segment sums over the pack's elements.

    Each field per tensor is an ``index_add`` (``scatter_reduce`` for the extremes, one
    ``bincount`` for all the histograms) over the pack's buffers, so a model of thousands of
    small tensors with a row each costs a few kernel launches, not a loop over tensors.
    """
    _, sb, eps, c = scalars
    sizes = [s.size for s in pack]
    k, dev = len(pack), theta.device
    seg = segment_ids(sizes, dev)
    f64 = torch.float64

    def seg_sum(x: Tensor) -> Tensor:
        return torch.zeros(k, dtype=f64, device=dev).index_add_(0, seg, x.to(f64))

    d = v.sqrt()
    den = d / sb + eps
    eff = c / den
    cols: dict[str, Tensor] = {
        "numel": torch.tensor([float(n) for n in sizes], dtype=f64, device=dev),
        "param_sq": seg_sum(theta.square()), "update_sq": seg_sum(u.square()),
        "first_sq": seg_sum(m.square()), "second_sqrt_sum": seg_sum(d),
        "eps_dominated": seg_sum(d / sb < eps),
        "lost": seg_sum((u != 0) & ((theta - u) == theta)),
        "eff_min": torch.full((k,), math.inf, dtype=eff.dtype, device=dev).scatter_reduce_(
            0, seg, eff, "amin").to(f64),
        "eff_max": torch.full((k,), -math.inf, dtype=eff.dtype, device=dev).scatter_reduce_(
            0, seg, eff, "amax").to(f64),
    }
    cols["grad_sq"] = seg_sum(grad.square()) if grad_sq is None else _known_grad_sq(
        grad_sq, [s.param for s in pack], dev)
    for name in ("first_numel", "second_numel", "eps_numel", "lost_numel"):
        cols[name] = cols["numel"]
    whole, prev = cos if cos is not None else (None, None)
    if whole is not None and prev is not None:
        cols["cos_dot"] = seg_sum(whole * prev)
        cols["cos_prev_sq"] = seg_sum(prev * prev)
        cols["cos_cur_sq"] = seg_sum(whole * whole)
    cols["nonfinite_tensors"] = _nonfinite_flags(cols, dev)
    values = _columns(cols, k, device)
    at = torch.tensor(own, device=dev)
    hist = torch.bincount(seg * (_NBINS + 1) + bins, minlength=k * (_NBINS + 1))
    hist = hist.view(k, _NBINS + 1).index_select(0, at)[:, :_NBINS].double().to(device)
    g = pack[0].group
    return [_Row(values[j], hist[r], [g.grads[pack[j].index], g.params[pack[j].index]],
                 pack[j].param, fold=False) for r, j in enumerate(own)]


def _columns(cols: dict[str, Tensor], n: int, device: torch.device) -> Tensor:
    """``n`` rows with the columns in :data:`FIELDS` order; a missing one at its identity."""
    out = []
    for name, rule in FIELD_COMBINE.items():
        col = cols.get(name)
        out.append(torch.full((n,), rule.identity, dtype=torch.float64, device=device)
                   if col is None else col.to(device, torch.float64))
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------- on the host


def quantile_from_histogram(hist: np.ndarray, q: float) -> float:
    """The ``q`` quantile of a log10 histogram (interpolated within its bin), as a value.

    Args:
        hist: Counts per bin over ``[LOG10_MIN, LOG10_MAX]``.
        q: Quantile in [0, 1].

    Returns:
        ``10 ** x`` where ``x`` is the interpolated log10 quantile; ``nan`` for an empty
        histogram.

    Example:
        >>> h = np.zeros(_NBINS); h[int((-3 - LOG10_MIN) * BINS_PER_DECADE)] = 10
        >>> round(math.log10(quantile_from_histogram(h, 0.5)), 2)
        -2.99
    """
    total = float(hist.sum())
    if total <= 0:
        return math.nan
    cum = np.cumsum(hist)
    target = q * total
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(hist) - 1)
    before = cum[i - 1] if i > 0 else 0.0
    frac = (target - before) / hist[i] if hist[i] > 0 else 0.5
    return float(10.0**_log10_at(i + min(max(frac, 0.0), 1.0)))


def quantiles_from_histograms(hists: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """:func:`quantile_from_histogram` of every row of ``hists`` for every ``q`` at once.

    Args:
        hists: ``rows × bins`` counts.
        qs: Quantiles in [0, 1].

    Returns:
        ``rows × len(qs)`` values (``nan`` for an empty row).

    Example:
        >>> h = np.zeros((2, _NBINS)); h[0, int((-3 - LOG10_MIN) * BINS_PER_DECADE)] = 10
        >>> np.round(np.log10(quantiles_from_histograms(h, [0.5])), 2).tolist()
        [[-2.99], [nan]]
    """
    rows, nb = hists.shape
    out = np.full((rows, len(qs)), math.nan)
    if rows == 0:
        return out
    cum = np.cumsum(hists, axis=1)
    total = cum[:, -1]
    ok = total > 0
    r = np.arange(rows)
    for j, q in enumerate(qs):
        target = q * total
        i = np.minimum((cum < target[:, None]).sum(axis=1), nb - 1)
        before = np.where(i > 0, cum[r, np.maximum(i - 1, 0)], 0.0)
        here = hists[r, i]
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(here > 0, (target - before) / here, 0.5)
        out[:, j] = np.where(ok, 10.0 ** _log10_at(i + np.clip(frac, 0.0, 1.0)), math.nan)
    return out


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def summarize(sums: HostStepSums) -> list[dict[str, float]]:
    """Finish the statistics of every row: the monitor's values, per row.

    Args:
        sums: Host sums (:meth:`StepSums.to_host`, possibly :meth:`HostStepSums.combine`).

    Returns:
        One dict per row with the keys ``grad_norm``, ``param_norm``, ``update_norm``,
        ``update_ratio``, ``eff_lr/p05``, ``eff_lr/p50``, ``eff_lr/p95``,
        ``eff_lr/min``, ``eff_lr/max``, ``nonfinite``, and where defined
        ``exp_avg_norm``, ``exp_avg_sq_sqrt_mean``, ``eps_dominated_frac``,
        ``update_lost_frac``, ``update_cosine``.

    Example:
        >>> values = np.zeros((1, len(FIELDS)))
        >>> values[0, [_F["update_sq"], _F["param_sq"]]] = 9.0, 16.0
        >>> values[0, [_F["eff_min"], _F["eff_max"]]] = math.inf, -math.inf
        >>> row = summarize(HostStepSums(values, np.zeros((1, _NBINS)), np.zeros(0)))[0]
        >>> row["update_norm"], row["update_ratio"], math.isnan(row["eff_lr/p50"])
        (3.0, 0.75, True)
    """
    out = []
    quantiles = quantiles_from_histograms(sums.hist, (0.05, 0.5, 0.95))
    for v, qrow in zip(sums.values.tolist(), quantiles.tolist(), strict=True):
        f = {k: v[i] for k, i in _F.items()}
        row = {
            "grad_norm": math.sqrt(f["grad_sq"]) if f["grad_sq"] >= 0 else math.nan,
            "param_norm": math.sqrt(f["param_sq"]) if f["param_sq"] >= 0 else math.nan,
            "update_norm": math.sqrt(f["update_sq"]) if f["update_sq"] >= 0 else math.nan,
        }
        row["update_ratio"] = _div(row["update_norm"], row["param_norm"])
        lo = f["eff_min"] if math.isfinite(f["eff_min"]) else math.nan
        hi = f["eff_max"] if f["eff_max"] != -math.inf else math.nan
        for x, name in zip(qrow, ("p05", "p50", "p95"), strict=True):
            # The exact extremes bound every quantile (exact when all elements are equal).
            row[f"eff_lr/{name}"] = min(max(x, lo), hi) if lo <= hi else x
        row["eff_lr/min"], row["eff_lr/max"] = lo, hi
        row["nonfinite"] = f["nonfinite_tensors"]
        if f["first_numel"] > 0:
            row["exp_avg_norm"] = math.sqrt(f["first_sq"]) if f["first_sq"] >= 0 else math.nan
        if f["second_numel"] > 0:
            row["exp_avg_sq_sqrt_mean"] = f["second_sqrt_sum"] / f["second_numel"]
        if f["eps_numel"] > 0:
            row["eps_dominated_frac"] = f["eps_dominated"] / f["eps_numel"]
        if f["lost_numel"] > 0:
            row["update_lost_frac"] = f["lost"] / f["lost_numel"]
        if f["cos_prev_sq"] > 0 and f["cos_cur_sq"] > 0:
            row["update_cosine"] = f["cos_dot"] / math.sqrt(f["cos_prev_sq"] * f["cos_cur_sq"])
        out.append(row)
    return out


def histogram_buckets(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The occupied part of a log10(eff_lr) histogram, as TensorBoard-style buckets.

    The bins of :data:`LOG10_MIN` .. :data:`LOG10_MAX` (:data:`BINS_PER_DECADE` per
    decade) are trimmed to the occupied ones plus one empty bin either side (where the
    range allows), so a histogram viewer shows the distribution, not 1,100 empty bins.

    Args:
        counts: Counts per bin over the full range (a row of :attr:`HostStepSums.hist`).

    Returns:
        ``(bucket_limits, bucket_counts, centers)``: the right edge of each kept bin (in
        log10 units), its count and its centre; three empty arrays when no bin is occupied.

    Example:
        >>> h = np.zeros(_NBINS); h[int((-3 - LOG10_MIN) * BINS_PER_DECADE)] = 4
        >>> limits, kept, centers = histogram_buckets(h)
        >>> kept.tolist(), limits.round(2).tolist(), round(float(centers[1]), 2)
        ([0.0, 4.0, 0.0], [-3.0, -2.98, -2.96], -2.99)
    """
    occupied = np.nonzero(counts)[0]
    if occupied.size == 0:
        empty = np.zeros(0, dtype=np.float64)
        return empty, empty.copy(), empty.copy()
    lo, hi = max(int(occupied[0]) - 1, 0), min(int(occupied[-1]) + 2, counts.size)
    limits = _log10_at(np.arange(lo, hi) + 1)
    return limits, np.asarray(counts[lo:hi], dtype=np.float64), limits - 0.5 / BINS_PER_DECADE
