"""Statistics of Adam-form steps read straight from the optimizer state, in one pass.

The generic path (:mod:`~lr_monitor.functional.rules` then
:func:`~lr_monitor.functional.statistics.step_sums`) materializes every
:class:`~lr_monitor.functional.rules.ParamStep` (update, effective lr, direction, masks)
and then reduces it: a dozen passes over every parameter. For Adam and AdamW the
statistics need only θ, g, m and v, each read once:

.. code-block:: text

    d   = √v / √bc2                     (√v̂, computed once)
    den = d + ε
    a   = −s · m / den                  (s = lr / bc1: torch's step size)
    Δ   = a − k·(θ − a)                 (decoupled decay, k = (1 − f)/f, f = 1 − lr·wd)
    eff = c / den                       (c = s·bc1 ≈ lr)

:func:`moment_fields` reduces one flat tensor (or a pack of small ones) to
:data:`MOMENT_FIELDS`: ``Σg²``, ``Σθ²``, ``ΣΔ²``, ``Σm²``, ``Σ√v``, the ε-dominated and
rounded-away counts and ``min``/``max`` of ``den`` (``eff_max = c/min den``,
``eff_min = c/max den``). It is written once, with out-of-place tensor ops, so that
``torch.compile`` turns it into one fused loop (C++ on the CPU, Triton on a GPU); the same
math runs eagerly in :func:`moment_fields_eager`, in place on slices of
:data:`SLICE_NUMEL` elements so that its temporaries stay in the cache. Both give the same
statistics as the generic path (float tolerance: the sums are accumulated in a different
order).

Small tensors are packed (:data:`PACK_NUMEL`): every tensor of at most that many elements
in a chunk is concatenated into one flat buffer with its per-tensor scalars expanded
alongside, so a model of 10,000 biases costs a few kernel launches instead of tens of
thousands of Python-level operations.

Nothing here holds state or reads a tensor back to the host; which kernel runs (compiled
or eager) is the caller's choice (:class:`lr_monitor.recording.compiler.FieldKernel`).

Example:
    >>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    >>> opt = torch.optim.Adam([p], lr=0.1)
    >>> p.grad = torch.tensor([0.5, 0.5, -1.0]); opt.step()
    >>> group = moment_group(opt, opt.param_groups[0])
    >>> f = moment_fields_eager(*group.flat(0), *group.scalars(0))
    >>> round(float(f[2]) ** 0.5, 4)  # ‖Δ‖: every element moved by lr
    0.1732
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "EAGER",
    "MOMENT_FIELDS",
    "PACK_NUMEL",
    "ROW_NUMEL",
    "SLICE_NUMEL",
    "MomentGroup",
    "MomentKernel",
    "MomentStep",
    "as_flat",
    "combine_rows",
    "eff_bins",
    "moment_fields",
    "moment_fields_eager",
    "moment_group",
    "moment_pack",
    "moment_pack_eager",
    "moment_rows",
    "segment_ids",
]

#: What :func:`moment_fields` returns, in order (float64).
MOMENT_FIELDS = ("grad_sq", "param_sq", "update_sq", "first_sq", "second_sqrt_sum",
                 "eps_dominated", "lost", "eff_min", "eff_max")

#: Tensors of at most this many elements are packed into one flat buffer per chunk (at most
#: the effective-lr histogram's sample size, so that a packed tensor enters it whole).
PACK_NUMEL = 1 << 16

#: Elements per slice of the eager kernel: its temporaries (a few float32 buffers of this
#: size) stay in a core's L2 cache.
SLICE_NUMEL = 1 << 18



class MomentKernel(Protocol):
    """What runs the two kernels (:data:`EAGER`, or a compiled set).

    :class:`lr_monitor.recording.compiler.MomentKernels` compiles them when it can.
    """

    def __call__(self, theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
                 sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None) -> Tensor:
        """:func:`moment_fields`."""
        ...

    def pack(self, theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
             sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None,
             log10_min: float, bins_per_decade: float, nbins: int
             ) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`moment_pack`."""
        ...


class _Eager:
    """The eager kernels, as a :class:`MomentKernel`."""

    def __call__(self, theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
                 sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None) -> Tensor:
        return moment_fields_eager(theta, grad, m, v, neg_step, sqrt_bc2, eps, eff_c, decay)

    def pack(self, theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
             sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None,
             log10_min: float, bins_per_decade: float, nbins: int
             ) -> tuple[Tensor, Tensor, Tensor]:
        return moment_pack_eager(theta, grad, m, v, neg_step, sqrt_bc2, eps, eff_c, decay,
                                 log10_min, bins_per_decade, nbins)


#: The eager kernels (:func:`moment_fields_eager`, :func:`moment_pack_eager`).
EAGER: MomentKernel = _Eager()


def moment_fields(theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
                  sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None) -> Tensor:
    """The :data:`MOMENT_FIELDS` of one flat Adam-form step, as one expression.

    The form ``torch.compile`` fuses into one loop; every input is read once. Sums are
    accumulated in float64.

    Args:
        theta: Parameter after the step, flat (float32 or float64).
        grad: Its gradient, flat (pass ``theta`` again when the gradient norm is known
            already; the result's first value is then ``Σθ²``).
        m: First moment ``exp_avg``, flat.
        v: Second moment (``exp_avg_sq``, or ``max_exp_avg_sq`` with amsgrad), flat.
        neg_step: ``−lr/bc1`` in the parameter's dtype (0-d, or one per element).
        sqrt_bc2: ``√bc2`` (0-d or per element).
        eps: ``ε`` (0-d or per element).
        eff_c: ``c`` of ``eff = c/den`` (0-d or per element).
        decay: ``k = (1 − f)/f`` of decoupled weight decay (0-d or per element); 0 or
            ``None`` without.

    Returns:
        A float64 vector in :data:`MOMENT_FIELDS` order.
    """
    return _fields(theta, grad, m, v, neg_step, sqrt_bc2, eps, eff_c, decay)[0]


def moment_pack(theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
                sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None,
                log10_min: float, bins_per_decade: float, nbins: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`moment_fields` of a pack, with each element's histogram bin and update.

    A pack (small tensors concatenated) enters the effective-lr histogram and the cosine
    whole, so the same pass also yields the bin of every element
    (:func:`eff_bins`) and the update.

    Args:
        theta: See :func:`moment_fields`.
        grad: See :func:`moment_fields`.
        m: See :func:`moment_fields`.
        v: See :func:`moment_fields`.
        neg_step: See :func:`moment_fields` (usually one per element).
        sqrt_bc2: See :func:`moment_fields`.
        eps: See :func:`moment_fields`.
        eff_c: See :func:`moment_fields`.
        decay: See :func:`moment_fields`.
        log10_min: See :func:`eff_bins`.
        bins_per_decade: See :func:`eff_bins`.
        nbins: See :func:`eff_bins`.

    Returns:
        ``(fields, bins, update)``.
    """
    fields, eff, u = _fields(theta, grad, m, v, neg_step, sqrt_bc2, eps, eff_c, decay)
    return fields, eff_bins(eff, log10_min, bins_per_decade, nbins), u


def _fields(theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
            sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None
            ) -> tuple[Tensor, Tensor, Tensor]:
    f64 = torch.float64
    sv = v.sqrt()
    d = sv / sqrt_bc2
    den = d + eps
    a = m / den * neg_step
    u = a if decay is None else torch.where(decay == 0, a, a - decay * (theta - a))
    lost = (u != 0) & ((theta - u) == theta)
    eff = eff_c / den
    fields = torch.stack([
        (grad.to(f64) * grad).sum(), (theta.to(f64) * theta).sum(), (u.to(f64) * u).sum(),
        (m.to(f64) * m).sum(), sv.to(f64).sum(), (d < eps).sum().to(f64),
        lost.sum().to(f64), eff.min().to(f64), eff.max().to(f64)])
    return fields, eff, u


#: Row length of :func:`moment_rows`: a row of every input stays in the L1/L2 cache while
#: the kernel's reductions (which inductor emits as one loop each) read it.
ROW_NUMEL = 1 << 11


def moment_rows(theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
                sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None) -> Tensor:
    """:func:`moment_fields` of each row of 2-D views (``rows × ROW_NUMEL``): ``9 × rows``.

    Combine the columns with :func:`combine_rows`. On the CPU inductor emits one loop per
    reduction; over a tensor larger than the cache each such loop reads the inputs from
    memory again, over short rows it reads them from the cache: 13 ms instead of 21 ms on
    4M float32 elements, measured here.

    Args:
        theta: See :func:`moment_fields`, as ``rows × cols``.
        grad: See :func:`moment_fields`, as ``rows × cols``.
        m: See :func:`moment_fields`, as ``rows × cols``.
        v: See :func:`moment_fields`, as ``rows × cols``.
        neg_step: See :func:`moment_fields` (0-d).
        sqrt_bc2: See :func:`moment_fields` (0-d).
        eps: See :func:`moment_fields` (0-d).
        eff_c: See :func:`moment_fields` (0-d).
        decay: See :func:`moment_fields` (0-d or ``None``).

    Returns:
        A float64 ``9 × rows`` tensor, the rows' :data:`MOMENT_FIELDS`.
    """
    f64 = torch.float64
    sv = v.sqrt()
    d = sv / sqrt_bc2
    den = d + eps
    a = m / den * neg_step
    u = a if decay is None else torch.where(decay == 0, a, a - decay * (theta - a))
    lost = (u != 0) & ((theta - u) == theta)
    eff = eff_c / den
    return torch.stack([
        (grad.to(f64) * grad).sum(-1), (theta.to(f64) * theta).sum(-1),
        (u.to(f64) * u).sum(-1), (m.to(f64) * m).sum(-1), sv.to(f64).sum(-1),
        (d < eps).sum(-1).to(f64), lost.sum(-1).to(f64), eff.amin(-1).to(f64),
        eff.amax(-1).to(f64)])


def combine_rows(rows: Tensor) -> Tensor:
    """The :data:`MOMENT_FIELDS` of all the columns of ``rows`` (``9 × k``) together.

    Example:
        >>> combine_rows(torch.tensor([[1.0, 2.0]] * 7 + [[3.0, 1.0], [3.0, 4.0]])).tolist()
        [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0, 4.0]
    """
    return torch.cat([rows[:7].sum(1), rows[7].amin().reshape(1), rows[8].amax().reshape(1)])


def eff_bins(eff: Tensor, log10_min: float, bins_per_decade: float, nbins: int) -> Tensor:
    """The histogram bin of each effective lr; ``nbins`` for NaN (to be dropped).

    Bin ``i`` holds ``log10(eff)`` in ``[log10_min + i/bins_per_decade, … + 1/…)``,
    computed in float32 or better; values below or above the range land in the end bins
    (0 and ∞ included).

    Args:
        eff: Effective learning rates (any shape).
        log10_min: Left edge of bin 0, in log10 units.
        bins_per_decade: Bins per factor of 10.
        nbins: Number of bins.

    Returns:
        int64 bins, flat.

    Example:
        >>> eff_bins(torch.tensor([1e-3, 0.0, float("nan")]), -16.0, 50.0, 1100).tolist()
        [650, 0, 1100]
    """
    logv = eff.reshape(-1)
    logv = logv.to(torch.float32).log10() if logv.dtype != torch.float64 else logv.log10()
    pos = ((logv - log10_min) * bins_per_decade).floor().clamp(0, nbins - 1)
    return pos.nan_to_num(nbins).long()


def moment_fields_eager(theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
                        sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None,
                        slice_numel: int = SLICE_NUMEL) -> Tensor:
    """:func:`moment_fields` in eager mode: in place, slice by slice.

    Same arguments and result as :func:`moment_fields`; the kernels and their operand
    order are torch's own step's (``√v``, ``/√bc2``, ``+ε``, ``m/den·(−s)``), so the
    update rounds as the step did. At most a few temporaries of ``slice_numel`` elements
    are alive at a time. Norms are accumulated in float32 (``_foreach_norm``, as on the
    generic path): relative error up to ~1e-4 on a few hundred thousand float32 elements,
    where the compiled kernel sums in float64.

    Args:
        theta: See :func:`moment_fields`.
        grad: See :func:`moment_fields`.
        m: See :func:`moment_fields`.
        v: See :func:`moment_fields`.
        neg_step: See :func:`moment_fields`.
        sqrt_bc2: See :func:`moment_fields`.
        eps: See :func:`moment_fields`.
        eff_c: See :func:`moment_fields`.
        decay: See :func:`moment_fields`; ``None`` without decoupled decay.
        slice_numel: Elements per slice (≥ 1).

    Returns:
        A float64 vector in :data:`MOMENT_FIELDS` order.
    """
    n = theta.numel()
    known = grad is theta  # the caller knows the gradient norm: do not compute it
    if n <= slice_numel:
        return _eager_slice(theta, None if known else grad, m, v, neg_step, sqrt_bc2, eps,
                            eff_c, decay)[0]
    parts = []
    for i in range(0, n, slice_numel):
        sl = slice(i, i + slice_numel)
        parts.append(_eager_slice(theta[sl], None if known else grad[sl], m[sl], v[sl],
                                  _part(neg_step, sl),
                                  _part(sqrt_bc2, sl), _part(eps, sl), _part(eff_c, sl),
                                  None if decay is None else _part(decay, sl))[0])
    return combine_rows(torch.stack(parts, dim=1))


def moment_pack_eager(theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
                      sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None,
                      log10_min: float, bins_per_decade: float, nbins: int
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`moment_pack` in eager mode (one slice: a pack is at most one chunk).

    Args:
        theta: See :func:`moment_pack`.
        grad: See :func:`moment_pack`.
        m: See :func:`moment_pack`.
        v: See :func:`moment_pack`.
        neg_step: See :func:`moment_pack`.
        sqrt_bc2: See :func:`moment_pack`.
        eps: See :func:`moment_pack`.
        eff_c: See :func:`moment_pack`.
        decay: See :func:`moment_pack`.
        log10_min: See :func:`eff_bins`.
        bins_per_decade: See :func:`eff_bins`.
        nbins: See :func:`eff_bins`.

    Returns:
        ``(fields, bins, update)``.
    """
    fields, eff, u = _eager_slice(theta, None if grad is theta else grad, m, v, neg_step,
                                  sqrt_bc2, eps, eff_c, decay, keep=True)
    assert eff is not None and u is not None
    # eff_bins, in place on the buffer that held eff
    logv = eff.log10_().sub_(log10_min).mul_(bins_per_decade).floor_().clamp_(0, nbins - 1)
    return fields, logv.nan_to_num_(nbins).long(), u


def _part(x: Tensor, sl: slice) -> Tensor:
    """A scalar's slice: a 0-d one is the same for every slice."""
    return x if x.dim() == 0 else x[sl]


def _eager_slice(theta: Tensor, grad: Tensor | None, m: Tensor, v: Tensor, neg_step: Tensor,
                 sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None,
                 keep: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The fields of one slice; with ``keep`` also its effective lrs and update."""
    d = v.sqrt()
    sqrt_sum = d.sum()
    d.div_(sqrt_bc2)  # √v̂
    eps_count = torch.count_nonzero(d < eps)
    d.add_(eps)  # den
    u = torch.div(m, d).mul_(neg_step)
    if decay is not None:
        u = torch.where(decay == 0, u, u - decay * (theta - u))
    if grad is None:  # the gradient norm is known already: θ's norm stands in
        theta_n, u_n, m_n = torch._foreach_norm([theta, u, m])
        norms: Sequence[Tensor] = (theta_n, theta_n, u_n, m_n)
    else:
        norms = torch._foreach_norm([grad, theta, u, m])
    lost = torch.count_nonzero(torch.eq(theta - u, theta).logical_and_(u != 0))
    if keep or eff_c.dim() > 0:
        eff = torch.div(eff_c, d, out=d) if eff_c.shape == d.shape or eff_c.dim() == 0 \
            else eff_c / d
        lo, hi = torch.aminmax(eff)
    else:  # one c: min(c/den) = c/max(den) exactly (a correctly rounded division is monotone)
        eff = None
        den_lo, den_hi = torch.aminmax(d)
        lo, hi = eff_c / den_hi, eff_c / den_lo
    f64 = torch.float64
    fields = torch.stack([
        *(x.to(f64).square() for x in norms), sqrt_sum.to(f64), eps_count.to(f64),
        lost.to(f64), lo.to(f64), hi.to(f64)])
    return (fields, eff, u) if keep else (fields, None, None)


# ----------------------------------------------------------------------------- the inputs


class MomentStep:
    """One parameter of a :class:`MomentGroup`: what :func:`step_sums` chunks and counts.

    A slotted class: a model of 10,000 tensors makes 10,000 of them per record.

    Args:
        group: The group it belongs to.
        index: Its position in the group's lists.
        param: The parameter.
    """

    __slots__ = ("group", "index", "param", "size")

    def __init__(self, group: MomentGroup, index: int, param: Tensor) -> None:
        self.group = group
        self.index = index
        self.param = param
        self.size = param.numel()

    def numel(self) -> int:
        """Elements of the parameter."""
        return self.size

    def __repr__(self) -> str:
        return f"MomentStep(index={self.index}, shape={tuple(self.param.shape)})"


@dataclass
class MomentGroup:
    """The inputs of one Adam/AdamW param group's statistics, nothing materialized.

    Per-parameter scalars are vectors with one float64 value per parameter, computed
    with torch's own expressions (bias corrections from each parameter's ``step``), and
    rounded to the parameter's dtype where torch's kernels round them.

    Args:
        params: Parameters that took part in the step.
        grads: Their gradients (dense).
        exp_avgs: First moments.
        exp_avg_sqs: Second moments (``max_exp_avg_sq`` with amsgrad).
        neg_step: ``−lr/bc1`` per parameter.
        sqrt_bc2: ``√bc2`` per parameter.
        eff_c: ``c`` of ``eff = c/den`` per parameter: ``s·bc1`` rounded as the rule does.
        eps: ``ε``.
        decay: ``1 − lr·wd`` for decoupled decay, else ``None``.
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    neg_step: Tensor
    sqrt_bc2: Tensor
    eff_c: Tensor
    eps: float
    decay: float | None

    def steps(self) -> list[MomentStep]:
        """One :class:`MomentStep` per parameter, in group order."""
        return [MomentStep(self, i, p) for i, p in enumerate(self.params)]

    def flat(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(θ, g, m, v)`` of parameter ``i``, flat (θ detached)."""
        return (as_flat(self.params[i].detach()), as_flat(self.grads[i]),
                as_flat(self.exp_avgs[i]), as_flat(self.exp_avg_sqs[i]))

    def scalars(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """``(neg_step, sqrt_bc2, eps, eff_c, decay)`` of parameter ``i``: 0-d, its dtype."""
        p = self.params[i]
        return self.scalars_of([i], p.dtype, p.device)

    def scalars_of(self, rows: Sequence[int], dtype: torch.dtype, device: torch.device,
                   sizes: Sequence[int] | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The scalars of the parameters ``rows`` in ``dtype``.

        Args:
            rows: Parameter positions.
            dtype: The parameters' dtype.
            device: Their device.
            sizes: Elements per parameter: the scalars are expanded to one per element
                (a pack, by one gather through :func:`segment_ids`); ``None`` for one
                parameter (0-d scalars).

        Returns:
            ``(neg_step, sqrt_bc2, eps, eff_c, decay)``; ``decay`` is ``None`` without
            decoupled decay.
        """
        per = torch.stack([self.neg_step, self.sqrt_bc2, self.eff_c])
        if len(rows) != per.shape[1] or list(rows) != list(range(len(rows))):
            per = per.index_select(1, torch.tensor(list(rows), device=per.device))
        per = per.to(device=device, dtype=dtype)
        if sizes is None:
            neg, sb, c = per[:, 0].unbind()
        else:
            neg, sb, c = per.index_select(1, segment_ids(sizes, device)).unbind(0)
        eps = torch.tensor(self.eps, dtype=dtype, device=device)
        return neg, sb, eps, c, _decay_k(self.decay, dtype, device)


#: Segment ids of recent pack layouts (a layout repeats every recorded step).
_SEGMENTS: dict[tuple[tuple[int, ...], str], Tensor] = {}
_SEGMENTS_KEPT = 64


def segment_ids(sizes: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """For tensors of ``sizes`` elements concatenated: the position of each element's tensor.

    Cached per layout, so a pack that recurs every step costs no index computation.

    Args:
        sizes: Elements per tensor.
        device: Where the ids live.

    Returns:
        An int64 tensor of ``sum(sizes)`` elements.

    Example:
        >>> segment_ids([2, 1, 3]).tolist()
        [0, 0, 1, 2, 2, 2]
    """
    key = (tuple(sizes), str(device))
    ids = _SEGMENTS.get(key)
    if ids is None:
        ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(key[0]))
        ids = ids.to(device)
        if len(_SEGMENTS) >= _SEGMENTS_KEPT:
            _SEGMENTS.pop(next(iter(_SEGMENTS)))
        _SEGMENTS[key] = ids
    return ids


def as_flat(t: Tensor) -> Tensor:
    """``t`` as one dimension (itself when it already is: a call less per small tensor).

    Example:
        >>> as_flat(torch.zeros(2, 3)).shape
        torch.Size([6])
    """
    return t if t.dim() == 1 else t.reshape(-1)


def _decay_k(factor: float | None, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """``k = (1 − f)/f`` with ``f`` rounded to ``dtype`` as torch's ``mul_`` rounds it."""
    if factor is None:
        return None
    f = torch.tensor(factor, dtype=torch.float64, device=device).to(dtype)
    return (1 - f) / f


def moment_group(optimizer: torch.optim.Optimizer,
                 group: dict[str, Any]) -> MomentGroup | None:
    """The :class:`MomentGroup` of ``group`` when its statistics can be read in one pass.

    That is an exact ``torch.optim.Adam`` or ``AdamW`` group on the single-tensor or
    ``foreach`` path (not ``fused``, ``capturable`` or ``differentiable``) with Python
    number hyper-parameters, whose participating parameters are dense, real float32 or
    float64 plain tensors (not DTensors) with dense gradients. Anything else: ``None``,
    and the generic path measures it.

    Args:
        optimizer: The optimizer that just stepped.
        group: One of its param groups (or a copy with a subset of its ``params``).

    Returns:
        The group's inputs, or ``None``.
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return None
    if group.get("capturable") or group.get("differentiable") or group.get("fused"):
        return None  # (fused: torch's kernel rounds its scalars its own way)
    hp = (group["lr"], *group["betas"], group["eps"], group.get("weight_decay", 0.0))
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in hp):
        return None
    params, states = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        st = optimizer.state.get(p)
        if not st:
            continue
        if (type(p) not in (Tensor, torch.nn.Parameter) or p.dtype not in _DTYPES
                or p.grad.is_sparse or p.grad.dtype != p.dtype
                or not isinstance(st.get("step"), Tensor)):
            return None
        params.append(p)
        states.append(st)
    lr, beta1, beta2 = (float(x) for x in (group["lr"], *group["betas"]))
    eps, wd = float(group["eps"]), float(group.get("weight_decay", 0.0))
    amsgrad = bool(group.get("amsgrad", False))
    decoupled = type(optimizer) is torch.optim.AdamW or bool(
        group.get("decoupled_weight_decay", False))
    if not params:
        return MomentGroup([], [], [], [], *(torch.zeros(0, dtype=torch.float64),) * 3,
                           eps=eps, decay=None)
    dev = states[0]["step"].device
    steps = [st["step"] for st in states]
    if any(t.dim() != 0 or t.device != dev for t in steps):
        return None
    step = torch.stack(steps).to(torch.float64)
    # torch evaluates these as Python floats (float64), then rounds them into the kernel.
    bc1 = 1 - torch.pow(beta1, step)
    bc2 = 1 - torch.pow(beta2, step)
    step_size = lr / bc1
    # The rule's c = s·bc1, each rounded to the parameter dtype first (float32 math there).
    dt = params[0].dtype
    same = all(p.dtype == dt for p in params)
    eff_c = (step_size.to(dt) * bc1.to(dt)).double() if same else torch.stack([
        (step_size[i].to(p.dtype) * bc1[i].to(p.dtype)).double() for i, p in enumerate(params)])
    return MomentGroup(
        # Gradients and optimizer state never require grad (differentiable=True is left
        # out above): no detach needed.
        params=params, grads=[p.grad for p in params],  # type: ignore[misc]
        exp_avgs=[st["exp_avg"] for st in states],
        exp_avg_sqs=[st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"] for st in states],
        neg_step=-step_size, sqrt_bc2=bc2.sqrt(), eff_c=eff_c, eps=eps,
        decay=1 - lr * wd if decoupled and wd != 0 else None)


_DTYPES = (torch.float32, torch.float64)
