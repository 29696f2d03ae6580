"""The gradient noise scale B_simple = tr Σ / |G|², without per-example gradients.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A): the
squared norm of a mini-batch gradient G_B (of the *mean* loss over B examples drawn at
random) is, in expectation,

    E|G_B|² = |G|² + c(B)·tr Σ,        c(B) = 1/B

where G is the full-data gradient and Σ the covariance of the per-example gradients. Two
batch sizes give two equations, solved for the two unknowns:

    |G|²  ≈ (c_small·|G_big|² − c_big·|G_small|²) / (c_small − c_big)
    tr Σ  ≈ (|G_small|² − |G_big|²) / (c_small − c_big)

(with c = 1/B these are the paper's (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small)
and (|G_small|² − |G_big|²)/(1/B_small − 1/B_big)). Both parts are unbiased but very noisy
for one step, so each is smoothed with an exponential moving average and B_simple is the
ratio of the two averages (their bias corrections cancel in the ratio).

Where the two batch sizes come from, at no extra forward or backward pass: the n
micro-batch gradients that make up one optimizer step — the micro-batches of gradient
accumulation and, under DDP, each rank's local gradient before the all-reduce. A
:meth:`torch.Tensor.register_hook` on each parameter receives the gradient of one backward
pass *before* it is accumulated into ``.grad`` (and before DDP's reducer, which runs after
the accumulation, averages it); the hook keeps only its norm (one kernel writing into a
preallocated buffer on the device). ``|G_small|²`` is the mean of the n micro-batch squared
norms and ``|G_big|²`` the squared norm of their mean, i.e. of ``.grad`` once the step's
backward passes are done. For n micro-batches of sizes b_i,

    c_small = mean_i c(b_i),     c_big = c_small/n − (n − 1)/(n·(N − 1))

which is exact in expectation for unequal sizes too (the equal-weight mean Lightning and
DDP take). ``N`` is the data set size when the micro-batches of a step are drawn without
replacement from N examples (a shuffled epoch): then c(b) = (N − b)/(b·(N − 1)) and Σ is
the covariance over the N examples; ``N = None`` (the default) is sampling with
replacement, or a data set so large that it does not matter (N ≫ B_big·B_simple).

Cost: one Python call and one norm kernel per parameter per backward pass, ~10 small
device operations per step, no host transfer; :meth:`NoiseScaleEstimator.estimate` makes
one.

Example (a plain PyTorch loop, 4 micro-batches of 8 per step, against the exact value):
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(512, 3, dtype=torch.float64)
    >>> y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + torch.randn(512).double()
    >>> w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    >>> per_example = -(y[:, None] * x)  # ∇ of ½(x·w − y)² at w = 0
    >>> exact = per_example.var(0, correction=0).sum() / per_example.mean(0).square().sum()
    >>> est = NoiseScaleEstimator([w], ema=0.99)
    >>> est.attach()
    >>> for step in range(300):
    ...     w.grad = None
    ...     for micro in range(4):
    ...         idx = torch.randint(0, 512, (8,))  # with replacement
    ...         loss = 0.5 * ((x[idx] @ w - y[idx]) ** 2).mean() / 4  # divided, as Lightning does
    ...         loss.backward()
    ...         est.end_backward(batch_size=8, grad_factor=4)  # undo the division
    ...     counted = est.end_step()
    >>> result = est.estimate()
    >>> result.steps, abs(result.value / float(exact) - 1) < 0.2
    (300.0, True)
    >>> est.detach()
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lr_monitor._validation import check_int, check_real, invalid
from lr_monitor.functional.statistics import grad_values

__all__ = [
    "NoiseScale",
    "NoiseScaleEstimator",
    "Reduce",
    "noise_scale_parts",
    "sampling_factor",
    "step_factors",
]

#: A function averaging a tensor across ranks (e.g. a strategy's reduce with ``"mean"``).
Reduce = Callable[[Tensor], Tensor]

_vector_norm = torch.linalg.vector_norm

#: A squared norm or a factor: a Python number or a 0-d tensor (kept on the device).
Scalar = Tensor | float


def sampling_factor(batch_size: int, dataset_size: int | None = None) -> float:
    """c(b) in E|G_b|² = |G|² + c(b)·tr Σ for the mean gradient of a batch of ``batch_size``.

    Args:
        batch_size: Examples in the batch (≥ 1).
        dataset_size: N when the batch is drawn without replacement from N examples;
            ``None`` for sampling with replacement (or N → ∞).

    Returns:
        ``1/b``, or ``(N − b)/(b·(N − 1))`` without replacement (0 for the full data set).

    Raises:
        ValueError: for a batch size < 1 or a data set smaller than the batch.

    Example:
        >>> sampling_factor(8)
        0.125
        >>> sampling_factor(8, dataset_size=8), sampling_factor(1, dataset_size=8)
        (0.0, 1.0)
    """
    check_int("batch_size", batch_size, 1)
    if dataset_size is None:
        return 1.0 / batch_size
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) \
            or dataset_size < max(2, batch_size):
        raise invalid("dataset_size", dataset_size,
                      f"None or an int >= max(2, batch_size={batch_size})")
    return (dataset_size - batch_size) / (batch_size * (dataset_size - 1))


def step_factors(batch_sizes: Sequence[int], world_size: int = 1,
                 dataset_size: int | None = None) -> tuple[float, float]:
    """``(c_small, c_big)`` of one step made of equally weighted micro-batch gradients.

    The step's gradient is the plain mean of ``n = len(batch_sizes)·world_size`` micro-batch
    gradients (each rank is assumed to have micro-batches of the same sizes). Then
    E(mean_i |G_i|²) = |G|² + c_small·tr Σ and E|mean_i G_i|² = |G|² + c_big·tr Σ with

        c_small = mean_i c(b_i),     c_big = c_small/n − (n − 1)/(n·(N − 1))

    (the second term is the negative covariance of disjoint batches drawn without
    replacement; it vanishes for ``dataset_size=None``).

    Args:
        batch_sizes: This rank's micro-batch sizes in the step.
        world_size: Ranks whose gradients are averaged (DDP), ≥ 1.
        dataset_size: See :func:`sampling_factor`.

    Returns:
        ``(c_small, c_big)``.

    Raises:
        ValueError: for no micro-batch, a bad size or world size.

    Example:
        >>> step_factors([8, 8, 8, 8])  # accumulation of 4 micro-batches of 8: 1/8, 1/32
        (0.125, 0.03125)
        >>> step_factors([8, 8], world_size=2, dataset_size=32)  # the whole data set
        (0.0967741935483871, 0.0)
    """
    check_int("world_size", world_size, 1)
    if len(batch_sizes) == 0:
        raise invalid("batch_sizes", list(batch_sizes), "at least one micro-batch size")
    n = len(batch_sizes) * world_size
    c_small = sum(sampling_factor(b, dataset_size) for b in batch_sizes) / len(batch_sizes)
    c_big = c_small / n
    if dataset_size is not None:
        c_big -= (n - 1) / (n * (dataset_size - 1))
    return c_small, max(c_big, 0.0)  # < 0 only by rounding: n·b ≤ N


def noise_scale_parts(small_sq: Scalar, big_sq: Scalar, c_small: float, c_big: float
                      ) -> tuple[Scalar, Scalar]:
    """Unbiased one-step estimates ``(|G|², tr Σ)`` from the squared norms at two batch sizes.

    Solves E|G_small|² = |G|² + c_small·tr Σ and E|G_big|² = |G|² + c_big·tr Σ:

        |G|² = (c_small·|G_big|² − c_big·|G_small|²)/(c_small − c_big)
        tr Σ = (|G_small|² − |G_big|²)/(c_small − c_big)

    Works on Python numbers and on tensors alike (on the device, no host transfer).

    Args:
        small_sq: |G_small|² (the mean over the micro-batches of their squared norms).
        big_sq: |G_big|² (the squared norm of their mean).
        c_small: The sampling factor of the small batches (:func:`step_factors`).
        c_big: The sampling factor of the big batch, ``< c_small``.

    Returns:
        ``(grad_sq, trace)``; their ratio ``trace/grad_sq`` is one step's B_simple.

    Raises:
        ValueError: if ``c_small <= c_big`` (one batch size only: nothing to solve).

    Example:
        >>> # |G|² = 4, tr Σ = 8, B_small = 2, B_big = 8: E|G_small|² = 8, E|G_big|² = 5
        >>> noise_scale_parts(8.0, 5.0, 1 / 2, 1 / 8)
        (4.0, 8.0)
    """
    span = c_small - c_big
    if not span > 0:
        raise invalid("c_small", c_small, f"greater than c_big={c_big}")
    return (c_small * big_sq - c_big * small_sq) / span, (small_sq - big_sq) / span


@dataclass(frozen=True)
class NoiseScale:
    """A gradient noise scale estimate.

    Args:
        value: B_simple = ``trace / grad_sq`` (in examples), or ``None`` while the averaged
            |G|² is not positive (the mean gradient is not resolved from the noise yet).
        trace: The averaged (bias-corrected) estimate of tr Σ.
        grad_sq: The averaged (bias-corrected) estimate of |G|².
        steps: Steps in the averages (on average over ranks).
    """

    value: float | None
    trace: float
    grad_sq: float
    steps: float


def _norm_dtype(g: Tensor) -> torch.dtype:
    return torch.float64 if g.dtype == torch.float64 else torch.float32


class NoiseScaleEstimator:
    """B_simple from the micro-batch gradients of each optimizer step (no per-example grads).

    Per backward pass (a micro-batch), call :meth:`end_backward` after it (and
    :meth:`begin_backward` before it, if anything else computes gradients of these
    parameters in between); per optimizer step, once
    every micro-batch's backward is done and ``.grad`` holds their mean (times
    ``grad_factor``), call :meth:`end_step`; read the estimate with :meth:`estimate` (one
    host transfer). Between :meth:`attach` and :meth:`detach` each parameter carries a
    gradient hook that writes the norm of the gradient computed for it into its slot of a
    preallocated buffer (no allocation; one kernel per parameter per backward pass).

    Every value stays on the device: steps whose estimate is not finite (an fp16 overflow)
    are left out of the averages without a host sync.

    Args:
        params: The parameters (those with ``requires_grad`` get a hook).
        ema: Decay of the moving averages of |G|² and tr Σ, in [0, 1). The averages span
            about ``2/(1 − ema)`` steps (0.99: 200); the estimate of one step is very
            noisy, so keep it high.
        dataset_size: See :func:`sampling_factor` (``None``: sampling with replacement).

    Raises:
        ValueError: for an argument outside its allowed values.
    """

    def __init__(self, params: Iterable[Tensor], *, ema: float = 0.99,
                 dataset_size: int | None = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.ema = check_real("ema", ema, low=0.0, high=1.0, low_closed=True)
        if dataset_size is not None:
            check_int("dataset_size", dataset_size, 2)
        self.dataset_size = dataset_size
        self._handles: list[Any] = []
        # The norm of each parameter's gradient in this backward pass, written by its hook
        # into a slot (a 0-d view) of one buffer per (device, accumulation dtype).
        self._buffers: list[Tensor] = []
        self._fired = 0  # hook calls since the buffers were last read
        self._micro: list[Tensor] = []  # |G_i|/|factor_i| of this step's micro-batches
        self._factors: list[float] = []  # |factor_i| (1.0 when a tensor was folded in)
        self._batch_sizes: list[int] = []
        # The update of the averages is linear in (Σ|G_i|², |G_big|²): its matrix per
        # step shape (sizes, world size, factors), built once on the device.
        self._matrices: dict[tuple[Any, ...], tuple[Tensor, Tensor, Tensor]] = {}
        self._error: Exception | None = None
        self._state: Tensor | None = None  # [EMA of tr Σ, EMA of |G|², steps] (float64)
        self.steps = 0  # end_step calls that had ≥ 2 micro-batch gradients
        #: While ``True`` the hooks return at once and the step is not measured: set it for
        #: whole steps (before their first backward pass) to measure only some of them.
        self.paused = False

    # -- hooks ---------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Whether the gradient hooks are registered."""
        return bool(self._handles)

    def attach(self) -> None:
        """Register one gradient hook per parameter (idempotent)."""
        if self._handles:
            return
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in self.params:
            groups.setdefault((p.device, _norm_dtype(p)), []).append(p)
        self._buffers, self._fired = [], 0
        for (device, dtype), params in groups.items():
            buffer = torch.zeros(len(params), dtype=dtype, device=device)
            self._buffers.append(buffer)
            for i, p in enumerate(params):
                self._handles.append(p.register_hook(functools.partial(self._hook, buffer[i])))

    def detach(self) -> None:
        """Remove the gradient hooks and forget the current step's partial sums."""
        for h in self._handles:
            h.remove()
        self._handles, self._buffers, self._fired = [], [], 0
        self._micro, self._factors, self._batch_sizes = [], [], []

    def _hook(self, slot: Tensor, grad: Tensor) -> None:
        # Runs inside autograd for every parameter: no exception may escape (it would end
        # the backward pass); the first one is kept and raised by end_backward.
        if self._error is None and not self.paused:
            try:
                if grad.is_sparse or type(grad) is not Tensor:
                    grad = grad_values(grad)
                if grad.requires_grad:  # a backward with create_graph=True
                    grad = grad.detach()
                _vector_norm(grad, dtype=slot.dtype, out=slot)
                self._fired += 1
            except Exception as exc:  # reported by end_backward
                self._error = exc

    # -- per backward and per step -------------------------------------------------------
    @property
    def pending_backwards(self) -> int:
        """Micro-batches counted since the last :meth:`end_step`."""
        return len(self._batch_sizes)

    def begin_backward(self) -> None:
        """Forget gradients the hooks saw since the last :meth:`end_backward`.

        The hooks see every gradient computed for the parameters, also those of
        ``torch.autograd.grad`` calls (a Hessian-vector product, a gradient penalty).
        Call this right before each micro-batch's backward pass when other code computes
        such gradients between two backward passes (the Lightning callback always does).
        """
        if self._fired:
            for buffer in self._buffers:
                buffer.zero_()
        self._fired, self._error = 0, None

    def end_backward(self, batch_size: int, grad_factor: Scalar = 1.0) -> None:
        """Close one backward pass: its gradients, times ``grad_factor``, are one micro-batch's.

        Args:
            batch_size: Examples in the micro-batch (its loss is their mean).
            grad_factor: What turns the gradients the hooks saw into the gradient of the
                micro-batch's mean loss: the accumulation divisor (Lightning divides the
                loss by ``accumulate_grad_batches``) over an AMP loss scale, which may be a
                0-d tensor on the device.

        Raises:
            Exception: the first exception raised inside a gradient hook since the last
                call (the hooks keep it: raising inside autograd would end the backward).
            ValueError: for a batch size < 1.
        """
        check_int("batch_size", batch_size, 1)
        if self.paused:
            return
        error = self._error
        if error is not None:
            self.begin_backward()
            raise error
        if not self._fired:  # no gradient reached the parameters: not a micro-batch
            return
        norms = [_vector_norm(b, dtype=torch.float64) for b in self._buffers]
        norm = norms[0] if len(norms) == 1 else _vector_norm(
            torch.stack([n.to(norms[0].device) for n in norms]))
        self.begin_backward()  # zero the slots for the next backward pass
        if isinstance(grad_factor, Tensor):
            norm = norm * grad_factor.to(norm.device, torch.float64).reshape(()).abs()
            factor = 1.0
        else:
            factor = abs(float(grad_factor))
        self._micro.append(norm)
        self._factors.append(factor)
        self._batch_sizes.append(batch_size)

    def end_step(self, grad_factor: float = 1.0, world_size: int = 1) -> bool:
        """Close one optimizer step: update the averages from this step's micro-batches.

        Call it when ``.grad`` holds ``1/grad_factor`` times the mean of the step's
        micro-batch gradients (after DDP's all-reduce and AMP unscaling, before clipping).
        About ten small device operations, no host transfer.

        Args:
            grad_factor: What turns ``.grad`` into the mean of the micro-batch gradients
                (Lightning: ``accumulate_grad_batches`` / micro-batches in this step, which
                is 1 except for a short last accumulation of an epoch).
            world_size: Ranks whose gradients ``.grad`` averages (DDP), ≥ 1. Every rank is
                assumed to have had as many micro-batches, of the same sizes.

        Returns:
            Whether the step counted (it needs n ≥ 2 micro-batch gradients in all).

        Raises:
            ValueError: for a world size < 1.
        """
        check_int("world_size", world_size, 1)
        micro, factors, sizes = self._micro, self._factors, self._batch_sizes
        self._micro, self._factors, self._batch_sizes = [], [], []
        if self.paused or not micro or len(sizes) * world_size < 2:
            return False
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return False
        device = micro[0].device
        stacked = torch.stack(micro)
        if any(f != factors[0] for f in factors):
            stacked = stacked * torch.tensor(factors, dtype=torch.float64, device=device)
            factors = [1.0] * len(factors)
        # v = (Σ_i |G_i|²/f_i², |.grad|²): the factors are folded into the matrix.
        big = _global_norm(grads).to(device)
        v = torch.stack([torch.linalg.vector_norm(stacked), big]).square()
        key = (tuple(sizes), world_size, factors[0], float(grad_factor))
        if key not in self._matrices:
            if len(self._matrices) > 64:
                self._matrices.clear()
            self._matrices[key] = self._update_matrix(sizes, world_size, factors[0] ** 2,
                                                      float(grad_factor) ** 2, device)
        matrix, decay, count = self._matrices[key]
        state = self._state if self._state is not None else torch.zeros(
            3, dtype=torch.float64, device=device)
        updated = torch.addmv(torch.addcmul(count, decay, state), matrix, v)
        self._state = torch.where(torch.isfinite(v).all(), updated, state)
        self.steps += 1
        return True

    def _update_matrix(self, sizes: list[int], world_size: int, small_factor: float,
                       big_factor: float, device: torch.device
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """``(M, a, c)``: the averages become ``a ⊙ state + c + M·v``, linear in ``v``."""
        c_small, c_big = step_factors(sizes, world_size, self.dataset_size)
        # noise_scale_parts is linear in (small, big): its columns at (1, 0) and (0, 1).
        g_s, t_s = noise_scale_parts(small_factor / len(sizes), 0.0, c_small, c_big)
        g_b, t_b = noise_scale_parts(0.0, big_factor, c_small, c_big)
        w = 1.0 - self.ema
        rows = [[w * float(t_s), w * float(t_b)], [w * float(g_s), w * float(g_b)], [0.0, 0.0]]

        def on_device(values: list[Any]) -> Tensor:
            return torch.tensor(values, dtype=torch.float64, device=device)

        return on_device(rows), on_device([self.ema, self.ema, 1.0]), on_device([0.0, 0.0, 1.0])

    # -- reading -------------------------------------------------------------------------
    def state_tensor(self) -> Tensor:
        """``[EMA of tr Σ, EMA of |G|², steps]`` on the device (float64; zeros before a step).

        Averaging it across ranks (DDP) averages the estimates made from the ranks' local
        micro-batch norms, which is the estimate from all of them: it is linear in them.
        """
        if self._state is not None:
            return self._state
        device = self.params[0].device if self.params else torch.device("cpu")
        return torch.zeros(3, dtype=torch.float64, device=device)

    def summarize(self, values: Sequence[float]) -> NoiseScale | None:
        """The estimate from :meth:`state_tensor`'s values, read back to the host.

        Args:
            values: ``[EMA of tr Σ, EMA of |G|², steps]`` (e.g. averaged over ranks).

        Returns:
            The estimate, or ``None`` when no step counted or a value is not finite.

        Example:
            >>> NoiseScaleEstimator([], ema=0.5).summarize([3.0, 1.5, 1.0])
            NoiseScale(value=2.0, trace=6.0, grad_sq=3.0, steps=1.0)
        """
        trace, grad_sq, steps = (float(v) for v in values)
        if not steps > 0 or not (math.isfinite(trace) and math.isfinite(grad_sq)):
            return None
        correction = 1.0 - self.ema ** steps  # cancels in the ratio
        value = trace / grad_sq if grad_sq > 0 else None
        return NoiseScale(value=value, trace=trace / correction,
                          grad_sq=grad_sq / correction, steps=steps)

    def estimate(self, reduce: Reduce | None = None) -> NoiseScale | None:
        """The current estimate: one host transfer (and one call of ``reduce``).

        Args:
            reduce: Averages a tensor across ranks, or ``None`` on a single process.
                Under DDP every rank must call it at the same step.

        Returns:
            The estimate, or ``None`` before the first counted step.
        """
        state = self.state_tensor()
        if reduce is not None:
            state = reduce(state)
        return self.summarize(state.tolist())

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, float]:
        """The averages (one host transfer): ``{"trace", "grad_sq", "steps"}`` as EMAs."""
        values = [0.0, 0.0, 0.0] if self._state is None else self._state.tolist()
        return {"trace": values[0], "grad_sq": values[1], "steps": values[2]}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict` (on the device of the first parameter)."""
        device = self.params[0].device if self.params else torch.device("cpu")
        values = [float(state.get(k, 0.0)) for k in ("trace", "grad_sq", "steps")]
        self._state = None if values[2] <= 0 else torch.tensor(
            values, dtype=torch.float64, device=device)


def _global_norm(grads: list[Tensor]) -> Tensor:
    """√Σ |g|² over gradients (float64; computed in float32 or better)."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        v = grad_values(g)
        groups.setdefault((v.device, _norm_dtype(v)), []).append(v)
    norms = []
    for (_, dtype), vs in groups.items():
        low = any(v.dtype in (torch.float16, torch.bfloat16) for v in vs)
        n = torch._foreach_norm(vs, 2, dtype=dtype) if low else torch._foreach_norm(vs)
        norms.append(torch.linalg.vector_norm(torch.stack(n), dtype=torch.float64))
    if len(norms) == 1:
        return norms[0]
    first = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]))
