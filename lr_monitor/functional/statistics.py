"""Batched summaries of an optimizer step, read back to the host in one transfer.

The summaries are computed in two phases, the way torchmetrics computes metrics:

1. :func:`step_sums` reduces every parameter's :class:`~lr_monitor.functional.ParamStep`
   to *sums* (sums of squares, counts, a histogram of ``log10(eff_lr)``, min and max) in
   one float64 matrix with a row per param group (and, on request, per tensor), plus the
   histograms. Nothing leaves the device. Sums are what a sharded run reduces across
   ranks (:meth:`StepSums.all_reduce`): norms are ``√Σ``, so *sum squares, then sqrt*.
2. :meth:`StepSums.to_host` moves everything in one ``.tolist()`` and
   :func:`summarize` finishes the statistics on the host.

Statistics per row (the names are the monitor's tag stems):

* ``grad_norm``, ``param_norm``, ``update_norm`` = ``√Σx²``; ``update_ratio`` =
  ``update_norm / param_norm``; ``exp_avg_norm`` = ``√Σm²`` (first moment, where there is
  one); ``exp_avg_sq_sqrt_mean`` = mean of ``√v`` over elements (the optimizer's raw
  second-moment state: ``exp_avg_sq``, ``sum``, ``square_avg``, ``exp_inf``, Adafactor's
  ``V̂``).
* ``eff_lr/p05``, ``eff_lr/p50``, ``eff_lr/p95``: quantiles of the per-element effective
  learning rate, from a histogram of ``log10(eff_lr)`` with :data:`BINS_PER_DECADE` bins
  per decade over ``[LOG10_MIN, LOG10_MAX]`` (linear interpolation within a bin: relative
  error below ``10^(1/BINS_PER_DECADE) − 1`` ≈ 4.7%); ``eff_lr/min``, ``eff_lr/max``
  exact.
* ``eps_dominated_frac``: share of elements where ε exceeds the gradient-based part of
  the denominator (the optimizer behaves like SGD with lr/ε there).
* ``nonfinite``: number of non-finite elements in gradients, parameters and updates.
  Healthy steps cost nothing extra; only when a norm comes back non-finite are the
  elements of the affected tensors counted, in a second (small) transfer.
* ``update_cosine``: cosine between this update and the one recorded last time
  (:class:`UpdateHistory`), on a fixed subsample of at most ``samples_per_tensor``
  coordinates per tensor (exact for smaller tensors). Negative: the steps go back and
  forth.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lr_monitor.functional.rules import ParamStep

__all__ = [
    "BINS_PER_DECADE",
    "FIELDS",
    "LOG10_MAX",
    "LOG10_MIN",
    "HostStepSums",
    "StepSums",
    "UpdateHistory",
    "quantile_from_histogram",
    "step_sums",
    "summarize",
]

#: Histogram range of log10(eff_lr) and its resolution.
LOG10_MIN, LOG10_MAX, BINS_PER_DECADE = -16.0, 6.0, 50
_NBINS = int((LOG10_MAX - LOG10_MIN) * BINS_PER_DECADE)

#: Columns of :attr:`StepSums.values`. All are sums across elements/tensors except
#: ``eff_min`` (min) and ``eff_max`` (max).
FIELDS = (
    "numel", "grad_sq", "param_sq", "update_sq", "first_sq", "first_numel",
    "second_sqrt_sum", "second_numel", "eps_dominated", "eps_numel", "nonfinite_tensors",
    "cos_dot", "cos_prev_sq", "cos_cur_sq", "eff_min", "eff_max",
)
_F = {name: i for i, name in enumerate(FIELDS)}


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class UpdateHistory:
    """The previous recorded update of each parameter, on a bounded subsample.

    Keeps ``update.flatten()[offset::stride]`` with ``stride = ⌈numel / samples⌉``, so at
    most ``samples_per_tensor`` values per tensor (all of them for smaller tensors). The
    offset is fixed per tensor, so successive samples cover the same coordinates.

    Args:
        samples_per_tensor: Upper bound on the values kept per tensor (≥ 1).

    Raises:
        ValueError: if ``samples_per_tensor`` < 1.
    """

    def __init__(self, samples_per_tensor: int = 4096) -> None:
        if not isinstance(samples_per_tensor, int) or samples_per_tensor < 1:
            raise ValueError(
                f"samples_per_tensor={samples_per_tensor!r} is invalid: must be an int >= 1"
            )
        self.samples_per_tensor = samples_per_tensor
        self._prev: dict[int, Tensor] = {}

    def sample(self, update: Tensor) -> Tensor:
        """The fixed subsample of ``update`` (a view; no copy)."""
        flat = update.reshape(-1)
        n = flat.numel()
        stride = max(1, -(-n // self.samples_per_tensor))
        offset = (n * 7919) % stride  # fixed per shape, avoids always sampling index 0
        return flat[offset::stride]

    def swap(self, param: Tensor, update: Tensor) -> tuple[Tensor | None, Tensor]:
        """Store this update's sample; return (previous sample or None, current sample)."""
        cur = self.sample(update).detach().clone()
        prev = self._prev.get(id(param))
        if prev is not None and prev.shape != cur.shape:
            prev = None
        self._prev[id(param)] = cur
        return prev, cur

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
        nonfinite_tensors: Per row, the tensors (grad, param, update) to count exactly
            when a norm comes back non-finite.
    """

    values: Tensor
    hist: Tensor
    extra: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    nonfinite_tensors: list[list[Tensor]] = field(default_factory=list)

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
        c = [(~torch.isfinite(t)).sum() for t in row]
        counts.append(torch.stack(c).sum() if c else torch.zeros((), dtype=torch.int64))
    if counts:
        host = torch.stack([c.to("cpu") for c in counts]).tolist()
        for i, n in enumerate(host):
            values[i, _F["nonfinite_tensors"]] = n


def _row_of(steps: Sequence[Sequence[ParamStep]],
            tensor_rows: Callable[[Tensor], bool] | None) -> tuple[list[int], int, list[int]]:
    """Map each ParamStep to its row: group rows first, then selected tensors' rows."""
    group_row = []
    tensor_row = []
    n_groups = len(steps)
    extra = 0
    for gi, g in enumerate(steps):
        for s in g:
            group_row.append(gi)
            if tensor_rows is not None and tensor_rows(s.param):
                tensor_row.append(n_groups + extra)
                extra += 1
            else:
                tensor_row.append(-1)
    return group_row, n_groups + extra, tensor_row


def step_sums(
    steps: Sequence[Sequence[ParamStep]],
    *,
    history: UpdateHistory | None = None,
    grad_sq: dict[Tensor, Tensor] | None = None,
    tensor_rows: Callable[[Tensor], bool] | None = None,
    extra: Sequence[Tensor | float] = (),
) -> StepSums:
    """Reduce the steps of one optimizer to per-row sums, on the device.

    Args:
        steps: Per param group, the :class:`ParamStep` of each parameter
            (:func:`~lr_monitor.functional.optimizer_steps`).
        history: Where the previous update samples live, for ``update_cosine``;
            ``None`` leaves the cosine columns at zero.
        grad_sq: Per parameter, ``‖g‖²`` measured before the step (e.g. before gradient
            clipping); default: from ``p.grad`` after the step.
        tensor_rows: Which parameters also get a row of their own (after the group rows,
            in order). ``None``: group rows only.
        extra: Scalars to carry in the same host transfer (floats or 0-d tensors).

    Returns:
        The sums; rows are the param groups, then the selected tensors.
    """
    flat = [s for g in steps for s in g]
    group_row, n_rows, tensor_row = _row_of(steps, tensor_rows)
    dev = flat[0].update.device if flat else torch.device("cpu")
    values = torch.zeros(n_rows, len(FIELDS), dtype=torch.float64, device=dev)
    values[:, _F["eff_min"]] = math.inf
    values[:, _F["eff_max"]] = -math.inf
    hist = torch.zeros(n_rows, _NBINS, dtype=torch.float64, device=dev)
    nonfinite: list[list[Tensor]] = [[] for _ in range(n_rows)]
    extra_t = torch.stack([
        (e.detach().reshape(()) if isinstance(e, Tensor) else torch.tensor(float(e)))
        .to(device=dev, dtype=torch.float64) for e in extra
    ]) if extra else torch.zeros(0, dtype=torch.float64, device=dev)
    if not flat:
        return StepSums(values, hist, extra_t, nonfinite)

    grads = [_local(s.grad) for s in flat]
    params = [_local(s.param.detach()) for s in flat]
    updates = [_local(s.update) for s in flat]
    # Batched reductions (foreach): one kernel launch per list on GPU.
    norm = torch._foreach_norm
    cols: dict[str, Tensor] = {
        "numel": torch.tensor([float(u.numel()) for u in updates], dtype=torch.float64),
        "param_sq": torch.stack(norm(params)).double().square(),
        "update_sq": torch.stack(norm(updates)).double().square(),
    }
    if grad_sq is not None:
        cols["grad_sq"] = torch.stack([
            grad_sq[s.param].double().reshape(()) if s.param in grad_sq
            else torch.zeros((), dtype=torch.float64, device=dev) for s in flat])
    else:
        cols["grad_sq"] = torch.stack(norm(grads)).double().square()
    with_first = [i for i, s in enumerate(flat) if s.first_moment is not None]
    if with_first:
        firsts = [_local(flat[i].first_moment) for i in with_first]  # type: ignore[arg-type]
        col = torch.zeros(len(flat), dtype=torch.float64, device=dev)
        col[with_first] = torch.stack(norm(firsts)).double().square()
        cols["first_sq"] = col
        cnt = torch.zeros(len(flat), dtype=torch.float64)
        cnt[with_first] = torch.tensor([float(f.numel()) for f in firsts], dtype=torch.float64)
        cols["first_numel"] = cnt
    with_second = [i for i, s in enumerate(flat) if s.second_moment is not None]
    if with_second:
        sq = torch._foreach_sqrt([_local(flat[i].second_moment).abs()  # type: ignore[arg-type]
                                  for i in with_second])
        col = torch.zeros(len(flat), dtype=torch.float64, device=dev)
        col[with_second] = torch.stack(norm(sq, ord=1)).double()
        cols["second_sqrt_sum"] = col
        cnt = torch.zeros(len(flat), dtype=torch.float64)
        cnt[with_second] = torch.tensor([float(t.numel()) for t in sq], dtype=torch.float64)
        cols["second_numel"] = cnt
    effs = [_local(s.eff_lr) for s in flat]
    cols["eff_max"] = torch.stack(torch._foreach_max(effs)).double()
    cols["eff_min"] = -torch.stack(torch._foreach_max(torch._foreach_neg(effs))).double()

    # Per-tensor work that foreach cannot express: eps counts, histograms, cosines.
    eps_cnt = []
    eps_num = []
    cos = []
    per_tensor_hist = torch.zeros(len(flat), _NBINS, dtype=torch.float64, device=dev)
    for i, s in enumerate(flat):
        eff = effs[i]
        n = updates[i].numel()
        if s.eps_dominated is not None:
            eps_cnt.append(_local(s.eps_dominated).sum())
            eps_num.append(float(n))
        else:
            eps_cnt.append(torch.zeros((), dtype=torch.int64, device=dev))
            eps_num.append(0.0)
        logv = torch.nan_to_num(eff.reshape(-1).double().log10(), nan=LOG10_MAX,
                                posinf=LOG10_MAX, neginf=LOG10_MIN)
        if logv.numel() == 1 and n > 1:  # one learning rate for every element (SGD)
            idx = ((logv - LOG10_MIN) * BINS_PER_DECADE).floor().clamp(0, _NBINS - 1).long()
            per_tensor_hist[i].index_add_(0, idx, torch.full_like(logv, float(n)))
        else:
            per_tensor_hist[i] = torch.histc(logv.clamp(LOG10_MIN, LOG10_MAX), bins=_NBINS,
                                             min=LOG10_MIN, max=LOG10_MAX)
        if history is not None:
            prev, cur = history.swap(s.param, updates[i])
            c = cur.double()
            if prev is None:
                cos.append(torch.stack([torch.zeros((), dtype=torch.float64, device=dev),
                                        torch.zeros((), dtype=torch.float64, device=dev),
                                        c.dot(c)]))
            else:
                p_ = prev.double()
                cos.append(torch.stack([c.dot(p_), p_.dot(p_), c.dot(c)]))
    cols["eps_dominated"] = torch.stack(eps_cnt).double()
    cols["eps_numel"] = torch.tensor(eps_num, dtype=torch.float64)
    if cos:
        cmat = torch.stack(cos)
        cols["cos_dot"], cols["cos_prev_sq"], cols["cos_cur_sq"] = cmat.unbind(1)
    finite = torch.stack([cols["grad_sq"], cols["param_sq"], cols["update_sq"]]).isfinite()
    cols["nonfinite_tensors"] = (~finite).sum(0).double()

    per_tensor = torch.zeros(len(flat), len(FIELDS), dtype=torch.float64, device=dev)
    per_tensor[:, _F["eff_min"]] = math.inf
    per_tensor[:, _F["eff_max"]] = -math.inf
    for name, col in cols.items():
        per_tensor[:, _F[name]] = col.to(dev)

    for rows in (group_row, tensor_row):
        sel = [i for i, r in enumerate(rows) if r >= 0]
        if not sel:
            continue
        idx = torch.tensor([rows[i] for i in sel], device=dev)
        src = per_tensor[sel]
        sums = src.clone()
        sums[:, _F["eff_min"]] = 0
        sums[:, _F["eff_max"]] = 0
        values.index_add_(0, idx, sums)
        mins = values[:, _F["eff_min"]].scatter_reduce(0, idx, src[:, _F["eff_min"]], "amin")
        maxs = values[:, _F["eff_max"]].scatter_reduce(0, idx, src[:, _F["eff_max"]], "amax")
        values[:, _F["eff_min"]] = mins
        values[:, _F["eff_max"]] = maxs
        hist.index_add_(0, idx, per_tensor_hist[sel])
        for i in sel:
            nonfinite[rows[i]].extend([grads[i], params[i], updates[i]])
    return StepSums(values, hist, extra_t, nonfinite)


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
        if f["cos_prev_sq"] > 0 and f["cos_cur_sq"] > 0:
            row["update_cosine"] = f["cos_dot"] / math.sqrt(f["cos_prev_sq"] * f["cos_cur_sq"])
        out.append(row)
    return out
