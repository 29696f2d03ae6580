"""Batched summaries of an optimizer step, read back to the host in one transfer.

The summaries are computed in two phases, the way torchmetrics computes metrics:

1. :func:`step_sums` reduces every parameter's :class:`~lr_monitor.functional.ParamStep`
   to *sums* (sums of squares, counts, a histogram of ``log10(eff_lr)``, min and max) in
   one float64 matrix with a row per param group (and, on request, per tensor), plus the
   histograms. Nothing leaves the device. Sums are what a sharded run reduces across
   ranks (:meth:`StepSums.all_reduce`): norms are ``√Σ``, so *sum squares, then sqrt*.
2. :meth:`StepSums.to_host` moves everything in one ``.tolist()`` and
   :func:`summarize` finishes the statistics on the host.

Statistics per row (the names are the monitor's tag stems). Every reduction runs in
float32 or better whatever the parameter dtype (bf16/fp16 tensors are upcast chunk by
chunk), and sums are accumulated in float64:

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
* ``update_cosine``: cosine between this update and the one recorded last time
  (:class:`UpdateHistory`), on the fixed random subsample of at most
  ``samples_per_tensor`` coordinates per tensor (exact for smaller tensors); each sampled
  coordinate is weighted by the elements it stands for, so a small tensor counts as much
  as its size. Negative: the steps go back and forth.

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

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lr_monitor.functional.rules import ParamStep, compute_dtype

__all__ = [
    "BINS_PER_DECADE",
    "CHUNK_NUMEL",
    "FIELDS",
    "HIST_SAMPLES",
    "LOG10_MAX",
    "LOG10_MIN",
    "HostStepSums",
    "StepSums",
    "UpdateHistory",
    "grad_values",
    "quantile_from_histogram",
    "rounded_away",
    "sample_index",
    "step_sums",
    "summarize",
    "tensor_norms",
]

#: Histogram range of log10(eff_lr) and its resolution.
LOG10_MIN, LOG10_MAX, BINS_PER_DECADE = -16.0, 6.0, 50
_NBINS = int((LOG10_MAX - LOG10_MIN) * BINS_PER_DECADE)

#: Columns of :attr:`StepSums.values`. All are sums across elements/tensors except
#: ``eff_min`` (min) and ``eff_max`` (max).
FIELDS = (
    "numel", "grad_sq", "param_sq", "update_sq", "first_sq", "first_numel",
    "second_sqrt_sum", "second_numel", "eps_dominated", "eps_numel", "nonfinite_tensors",
    "cos_dot", "cos_prev_sq", "cos_cur_sq", "lost", "lost_numel", "eff_min", "eff_max",
)
_F = {name: i for i, name in enumerate(FIELDS)}


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


class UpdateHistory:
    """The previous recorded update of each parameter, on a bounded subsample.

    Keeps the update at the fixed random index set of :func:`sample_index`, so at most
    ``samples_per_tensor`` values per tensor (all of them for smaller tensors), stored in
    float32 or better. Successive samples of a tensor cover the same coordinates.

    Args:
        samples_per_tensor: Upper bound on the values kept per tensor (≥ 1).

    Raises:
        ValueError: if ``samples_per_tensor`` < 1.
    """

    def __init__(self, samples_per_tensor: int = 4096) -> None:
        if isinstance(samples_per_tensor, bool) or not isinstance(samples_per_tensor, int) \
                or samples_per_tensor < 1:
            raise ValueError(
                f"samples_per_tensor={samples_per_tensor!r} is invalid: must be an int >= 1"
            )
        self.samples_per_tensor = samples_per_tensor
        self._prev: dict[int, Tensor] = {}

    def sample(self, update: Tensor) -> Tensor:
        """The fixed subsample of ``update``, flat (a view when it is the whole tensor)."""
        return _subsample(update, self.samples_per_tensor)

    def swap(self, param: Tensor, update: Tensor) -> tuple[Tensor | None, Tensor]:
        """Store this update's sample; return (previous sample or None, current sample).

        Both samples are copies in float32 (float64 for float64 updates); each value stands for
        ``update.numel() / len(sample)`` elements of the tensor.
        """
        cur = self.sample(update.detach()).to(compute_dtype(update), copy=True)
        prev = self._prev.get(id(param))
        if prev is not None and prev.shape != cur.shape:
            prev = None
        self._prev[id(param)] = cur
        return prev, cur

    def checkpoint(self) -> dict[int, Tensor]:
        """The stored samples (to :meth:`restore` after a failed or repeated pass)."""
        return dict(self._prev)

    def restore(self, saved: dict[int, Tensor]) -> None:
        """Go back to a :meth:`checkpoint`."""
        self._prev = dict(saved)

    def clear(self) -> None:
        """Forget every stored update (e.g. after a rollback or a resume)."""
        self._prev.clear()

    def nbytes(self) -> int:
        """Memory held, in bytes."""
        return sum(t.numel() * t.element_size() for t in self._prev.values())


@dataclass
class StepSums:
    """Reducible sums of one optimizer step, still on the device.

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

    def all_reduce(self, group: Any = None) -> None:
        """Reduce across ranks for sharded parameters (FSDP2/DTensor): sum, min, max.

        Replicated parameters (DDP) must not be reduced: every rank holds the same values.

        Args:
            group: The process group (default: the world).
        """
        import torch.distributed as dist

        v = self.values
        mins = v[:, _F["eff_min"]].clone()
        maxs = v[:, _F["eff_max"]].clone()
        dist.all_reduce(v, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(self.hist, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(mins, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(maxs, op=dist.ReduceOp.MAX, group=group)
        v[:, _F["eff_min"]] = mins
        v[:, _F["eff_max"]] = maxs

    def to_host(self) -> HostStepSums:
        """Everything to the host in one transfer (one ``.tolist()``)."""
        rows, nf = self.values.shape
        device = self.values.device
        flat = torch.cat([self.values.reshape(-1), self.hist.reshape(-1),
                          self.extra.to(device).reshape(-1)])
        host = np.asarray(flat.tolist(), dtype=np.float64)
        nv, nh = rows * nf, self.hist.numel()
        values = host[:nv].reshape(rows, nf)
        if values[:, _F["nonfinite_tensors"]].any():
            _count_nonfinite(values, self.nonfinite_tensors)
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
        """Sum the given rows (default: all) into one row: the ``global`` statistics."""
        idx = list(range(self.values.shape[0])) if rows is None else list(rows)
        v = self.values[idx]
        out = v.sum(axis=0, keepdims=True)
        out[0, _F["eff_min"]] = v[:, _F["eff_min"]].min() if len(idx) else math.inf
        out[0, _F["eff_max"]] = v[:, _F["eff_max"]].max() if len(idx) else -math.inf
        return HostStepSums(values=out, hist=self.hist[idx].sum(axis=0, keepdims=True),
                            extra=self.extra)


def _count_nonfinite(values: np.ndarray, tensors: list[list[Tensor]]) -> None:
    """Second, small transfer: exact non-finite element counts of the flagged rows."""
    counts = []
    for row in tensors:
        c = [torch.count_nonzero(~torch.isfinite(t)) for t in row]
        counts.append(torch.stack(c).sum() if c else torch.zeros((), dtype=torch.int64))
    if counts:
        host = torch.stack([c.to("cpu") for c in counts]).tolist()
        for i, n in enumerate(host):
            values[i, _F["nonfinite_tensors"]] = n


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


def _subsample(t: Tensor, k: int) -> Tensor:
    """The fixed random subsample of at most ``k`` elements (all of them if fewer)."""
    flat = t.reshape(-1)
    idx = sample_index(flat.numel(), k, flat.device)
    return flat if idx is None else flat.index_select(0, idx)


#: Elements reduced per chunk: the statistics pass holds the temporaries of about this
#: many elements (or of the largest single tensor, if larger) at a time.
CHUNK_NUMEL = 1 << 22


def step_sums(
    steps: Sequence[Iterable[ParamStep]],
    *,
    history: UpdateHistory | None = None,
    grad_sq: dict[Tensor, Tensor] | None = None,
    tensor_rows: Callable[[Tensor], bool] | None = None,
    extra: Sequence[Tensor | float] = (),
    chunk_numel: int = CHUNK_NUMEL,
) -> StepSums:
    """Reduce the steps of one optimizer to per-row sums, on the device.

    The steps are consumed lazily and reduced in chunks of about ``chunk_numel``
    elements, so with the generators of
    :func:`~lr_monitor.functional.rules.iter_group_steps` the peak extra memory is a few
    temporaries of one chunk (or of the largest tensor), never of the whole model.

    Args:
        steps: Per param group, the :class:`ParamStep` of each parameter (lists or
            iterators, e.g. ``[iter_group_steps(opt, g) for g in opt.param_groups]``).
        history: Where the previous update samples live, for ``update_cosine``;
            ``None`` leaves the cosine columns at zero.
        grad_sq: Per parameter, ``‖g‖²`` measured before the step (e.g. before gradient
            clipping); default: from ``p.grad`` after the step.
        tensor_rows: Which parameters also get a row of their own (after the group rows,
            in the order met). ``None``: group rows only.
        extra: Scalars to carry in the same host transfer (floats or 0-d tensors).
        chunk_numel: Elements per chunk (≥ 1).

    Returns:
        The sums; rows are the param groups, then the selected tensors
        (:attr:`StepSums.tensor_params`).
    """
    acc = _Accumulator(len(steps), history, grad_sq, tensor_rows)
    for gi, group in enumerate(steps):
        chunk: list[ParamStep] = []
        size = 0
        for s in group:
            chunk.append(s)
            size += s.update.numel()
            if size >= chunk_numel:
                acc.reduce(gi, chunk)
                chunk, size = [], 0
        if chunk:
            acc.reduce(gi, chunk)
    return acc.finish(extra)


class _Accumulator:
    """Reduces chunks of :class:`ParamStep` into group rows and tensor rows."""

    def __init__(self, n_groups: int, history: UpdateHistory | None,
                 grad_sq: dict[Tensor, Tensor] | None,
                 tensor_rows: Callable[[Tensor], bool] | None) -> None:
        self.n_groups = n_groups
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
        self.group_values = _empty_rows(self.n_groups, dev)
        self.group_hist = torch.zeros(self.n_groups, _NBINS, dtype=torch.float64, device=dev)

    def reduce(self, group: int, chunk: list[ParamStep]) -> None:
        dev = chunk[0].update.device
        if self.device is None:
            self._init(dev)
        assert self.group_values is not None and self.group_hist is not None
        per_tensor, hists = _chunk_sums(chunk, self.history, self.grad_sq, dev)
        sums = per_tensor.clone()
        sums[:, [_F["eff_min"], _F["eff_max"]]] = 0
        self.group_values[group] += sums.sum(0)
        v = self.group_values
        v[group, _F["eff_min"]] = torch.minimum(v[group, _F["eff_min"]],
                                                per_tensor[:, _F["eff_min"]].min())
        v[group, _F["eff_max"]] = torch.maximum(v[group, _F["eff_max"]],
                                                per_tensor[:, _F["eff_max"]].max())
        self.group_hist[group] += hists.sum(0)
        for i, s in enumerate(chunk):
            kept = [grad_values(s.grad), _local(s.param.detach())]
            self.nonfinite[group].extend(kept)
            if self.tensor_rows is not None and self.tensor_rows(s.param):
                self.tensor_params.append(s.param)
                self.tensor_values.append(per_tensor[i])
                self.tensor_hist.append(hists[i])
                self.nonfinite.append(kept)

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


def _empty_rows(n: int, dev: torch.device) -> Tensor:
    values = torch.zeros(n, len(FIELDS), dtype=torch.float64, device=dev)
    values[:, _F["eff_min"]] = math.inf
    values[:, _F["eff_max"]] = -math.inf
    return values


def grad_values(g: Tensor) -> Tensor:
    """The values of a gradient that enter its norm: a sparse one's coalesced values."""
    g = _local(g)
    return g.coalesce().values() if g.is_sparse else g


def tensor_norms(tensors: list[Tensor]) -> Tensor:
    """``‖t‖₂`` of each tensor as float64, computed in float32 or better.

    One ``foreach`` launch per dtype class: bf16/fp16 tensors are reduced with a float32
    accumulator, float32/float64 in their own precision.
    """
    out = torch.zeros(len(tensors), dtype=torch.float64,
                      device=tensors[0].device if tensors else "cpu")
    low = [i for i, t in enumerate(tensors) if t.dtype in (torch.bfloat16, torch.float16)]
    rest = [i for i, t in enumerate(tensors) if t.dtype not in (torch.bfloat16, torch.float16)]
    if low:
        n = torch._foreach_norm([tensors[i] for i in low], 2, dtype=torch.float32)
        out[low] = torch.stack(n).to(out.device, torch.float64)
    if rest:
        n = torch._foreach_norm([tensors[i] for i in rest])
        out[rest] = torch.stack(n).to(out.device, torch.float64)
    return out


def _chunk_sums(flat: list[ParamStep], history: UpdateHistory | None,
                grad_sq: dict[Tensor, Tensor] | None,
                dev: torch.device) -> tuple[Tensor, Tensor]:
    """Per-tensor sums (``len(flat) × len(FIELDS)``) and log10 eff-lr histograms.

    Every reduction runs in float32 or better whatever the parameter dtype, and the
    per-tensor rows are float64.
    """
    grads = [grad_values(s.grad) for s in flat]
    params = [_local(s.param.detach()) for s in flat]
    updates = [_local(s.update) for s in flat]
    cols: dict[str, Tensor] = {
        "numel": torch.tensor([float(u.numel()) for u in updates], dtype=torch.float64),
        "param_sq": tensor_norms(params).square(),
        "update_sq": tensor_norms(updates).square(),
    }
    if grad_sq is not None:
        cols["grad_sq"] = torch.stack([
            grad_sq[s.param].double().reshape(()).to(dev) if s.param in grad_sq
            else torch.zeros((), dtype=torch.float64, device=dev) for s in flat])
    else:
        cols["grad_sq"] = tensor_norms(grads).square()
    with_first = [i for i, s in enumerate(flat) if s.first_moment is not None]
    if with_first:
        firsts = [_local(flat[i].first_moment) for i in with_first]  # type: ignore[arg-type]
        col = torch.zeros(len(flat), dtype=torch.float64, device=dev)
        col[with_first] = tensor_norms(firsts).to(dev).square()
        cols["first_sq"] = col
        cnt = torch.zeros(len(flat), dtype=torch.float64)
        cnt[with_first] = torch.tensor([float(f.numel()) for f in firsts], dtype=torch.float64)
        cols["first_numel"] = cnt
    with_second = [i for i, s in enumerate(flat) if s.second_moment is not None]
    if with_second:
        # Mean of the denominator at gradient scale: √v for a second moment, the state
        # itself where it already is a root (Adamax's exp_inf).
        roots = []
        for i in with_second:
            r = _local(flat[i].second_moment)  # type: ignore[arg-type]
            r = r.to(compute_dtype(r))
            roots.append(r if flat[i].second_moment_is_root else r.sqrt())
        col = torch.zeros(len(flat), dtype=torch.float64, device=dev)
        col[with_second] = torch.stack(
            torch._foreach_norm(roots, ord=1)).to(dev, torch.float64)
        cols["second_sqrt_sum"] = col
        cnt = torch.zeros(len(flat), dtype=torch.float64)
        cnt[with_second] = torch.tensor([float(t.numel()) for t in roots], dtype=torch.float64)
        cols["second_numel"] = cnt
    effs = [_local(s.eff_lr) for s in flat]

    # Per-tensor work that foreach cannot express: min/max in one pass, eps and lost
    # counts, histograms, cosines.
    extremes = []
    masks: dict[str, list[Tensor]] = {"eps_dominated": [], "lost": []}
    numels: dict[str, list[float]] = {"eps_numel": [], "lost_numel": []}
    cos = []
    hists = torch.zeros(len(flat), _NBINS, dtype=torch.float64, device=dev)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    for i, s in enumerate(flat):
        n = updates[i].numel()
        extremes.append(torch.stack(torch.aminmax(effs[i])).to(torch.float64))
        for count_key, numel_key, mask in (("eps_dominated", "eps_numel", s.eps_dominated),
                                           ("lost", "lost_numel", s.update_lost)):
            masks[count_key].append(zero if mask is None else torch.count_nonzero(_local(mask)))
            numels[numel_key].append(0.0 if mask is None else float(n))
        # log10 in float32 (bins are 0.02 decades wide), clamped in place so 0 and inf
        # land in the end bins; NaN is left out (it is counted by `nonfinite`). Large
        # tensors are histogrammed on the fixed random subsample of HIST_SAMPLES elements
        # of sample_index, each standing for n/HIST_SAMPLES of them (min and max stay
        # exact). histc counts in float32: exact up to 2^24 per bin.
        sample = _subsample(effs[i], HIST_SAMPLES)
        logv = sample.to(torch.float32).log10().clamp_(LOG10_MIN, LOG10_MAX)
        if logv.numel() == 1 and n > 1:  # one learning rate for every element (SGD)
            idx = ((logv.double() - LOG10_MIN) * BINS_PER_DECADE).floor().clamp(
                0, _NBINS - 1).long()
            hists[i].index_add_(0, idx, torch.full_like(idx, n, dtype=torch.float64))
        else:
            h = torch.histc(logv, bins=_NBINS, min=LOG10_MIN, max=LOG10_MAX).double()
            hists[i] = h * (n / logv.numel()) if logv.numel() != n else h
        if history is not None:
            # Weighted by the elements each sampled coordinate stands for, so the global
            # cosine estimates the cosine of the whole update, not of the small tensors.
            prev, cur = history.swap(s.param, updates[i])
            c = cur.double()
            w = n / max(c.numel(), 1)
            if prev is None:
                cos.append(torch.stack([zero, zero, w * c.dot(c)]))
            else:
                p_ = prev.double()
                cos.append(w * torch.stack([c.dot(p_), p_.dot(p_), c.dot(c)]))
    cols["eff_min"], cols["eff_max"] = torch.stack(extremes).unbind(1)
    for key, counts in masks.items():
        cols[key] = torch.stack(counts).double()
    for key, values in numels.items():
        cols[key] = torch.tensor(values, dtype=torch.float64)
    if cos:
        cols["cos_dot"], cols["cos_prev_sq"], cols["cos_cur_sq"] = torch.stack(cos).unbind(1)
    finite = torch.stack([cols["grad_sq"].to(dev), cols["param_sq"].to(dev)]).isfinite()
    cols["nonfinite_tensors"] = (~finite).sum(0).double()

    per_tensor = _empty_rows(len(flat), dev)
    for name, col in cols.items():
        per_tensor[:, _F[name]] = col.to(dev)
    return per_tensor, hists


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
    x = LOG10_MIN + (i + min(max(frac, 0.0), 1.0)) / BINS_PER_DECADE
    return float(10.0**x)


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
        ``update_cosine``.
    """
    out = []
    for v, h in zip(sums.values, sums.hist, strict=True):
        f = {k: float(v[i]) for k, i in _F.items()}
        row = {
            "grad_norm": math.sqrt(f["grad_sq"]) if f["grad_sq"] >= 0 else math.nan,
            "param_norm": math.sqrt(f["param_sq"]) if f["param_sq"] >= 0 else math.nan,
            "update_norm": math.sqrt(f["update_sq"]) if f["update_sq"] >= 0 else math.nan,
        }
        row["update_ratio"] = _div(row["update_norm"], row["param_norm"])
        lo = f["eff_min"] if math.isfinite(f["eff_min"]) else math.nan
        hi = f["eff_max"] if f["eff_max"] != -math.inf else math.nan
        for q, name in ((0.05, "p05"), (0.5, "p50"), (0.95, "p95")):
            x = quantile_from_histogram(h, q)
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
