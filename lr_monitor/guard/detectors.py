"""Streaming detectors that turn a scalar training signal into detections.

Every detector sees one value per optimizer step through ``update(step, value)`` and returns
a :class:`~lr_monitor.events.Detection` when the value (or the recent history) crosses its
threshold, else ``None``. They are framework-free and cheap (pure Python, O(window) per call,
no tensor allocation); pass Python floats, which the caller gets with one host sync per step
for all signals together (a 0-d tensor also works, but ``float()`` on a CUDA tensor syncs).

Which detector watches what (default signal in brackets):

* :class:`NonFiniteDetector` (``loss``): a ``nan``/``inf`` value.
* :class:`SpikeDetector` (``loss``): one value far above the robust recent level.
* :class:`DivergenceDetector` (``loss``): the smoothed value stays far above its best.
* :class:`OscillationDetector` (``update_cosine``): successive updates point back and forth.
* :class:`UpdateRatioDetector` (``update_ratio``): ‖Δθ‖/‖θ‖ stays far above the usual ~1e-3.
* :class:`OvershootDetector` (``step_quality``, ``overshoot_frac``, ``stability_ratio``): an
  overshoot signal stays on the wrong side of its threshold while the loss, according to
  a :class:`LossTrend`, is not falling (or is rising).
* :class:`RecoveryWatch` (``loss``): after a cut, the loss did not resume falling.
* :class:`DeadStartDetector` (``grad_norm``): the gradient collapsed and the loss never
  moved from its start (a network killed in its first steps).
* :class:`LossTrend` (``loss``) never fires: it keeps the recent losses and tells the
  overshoot detectors whether the loss fell or rose over a span of steps.

Only :class:`NonFiniteDetector` looks at non-finite values; all the others ignore them (they
neither fire nor enter any statistic), so one ``nan`` cannot poison a baseline.

Every detector has ``reset()`` (forget everything) and ``state_dict()`` / ``load_state_dict()``
holding plain Python types only (ints, floats, lists, ``None``), so the state fits in a Lightning
checkpoint and a resumed run makes the same decisions as an uninterrupted one. The
configuration (constructor arguments) is not part of the state: build the detector with the
same arguments before loading.

Example:
    >>> spikes = SpikeDetector(window=20, warmup=5)
    >>> events = [spikes.update(t, 1.0 + 0.01 * (t % 3)) for t in range(30)]
    >>> any(events)
    False
    >>> spikes.update(30, 40.0).kind
    'spike'
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

from lr_monitor._validation import (
    check_bool,
    check_choice,
    check_int,
    check_real,
    check_str,
    invalid,
)
from lr_monitor.events import Detection

__all__ = [
    "DeadStartDetector",
    "Detector",
    "DivergenceDetector",
    "ExplosionDetector",
    "LossTrend",
    "NonFiniteDetector",
    "OscillationDetector",
    "OvershootDetector",
    "RecoveryWatch",
    "SpikeDetector",
    "UpdateRatioDetector",
]

_STATE_VERSION = 1

#: MAD × 1.4826 estimates the standard deviation of normally distributed values.
MAD_TO_SIGMA = 1.4826


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    if n % 2:
        return sorted_values[mid]
    return 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def _median_mad(values: Iterable[float]) -> tuple[float, float]:
    """Median and median absolute deviation (unscaled) of a non-empty iterable."""
    return _median_mad_sorted(sorted(values))


def _median_mad_sorted(s: list[float]) -> tuple[float, float]:
    """:func:`_median_mad` of values already sorted.

    The deviations below and above the median are two ascending runs of the sorted values,
    which ``sorted`` merges in linear time.
    """
    med = _median(s)
    k = bisect.bisect_left(s, med)
    devs = [med - v for v in s[:k]]
    devs.reverse()
    devs += [v - med for v in s[k:]]
    return med, _median(sorted(devs))


class _SortedWindow:
    """The last ``maxlen`` finite values, in arrival order and sorted (medians in O(n)).

    Appending keeps the sorted list by bisection instead of sorting the window at every
    step: the detectors that judge every step read their median from it.
    """

    __slots__ = ("order", "sorted")

    def __init__(self, maxlen: int, values: Iterable[float] = ()) -> None:
        self.order: deque[float] = deque(maxlen=maxlen)
        self.sorted: list[float] = []
        for v in values:
            self.append(v)

    def append(self, x: float) -> float | None:
        """Add ``x``; return the value that fell out (``None`` while not full)."""
        old = None
        if len(self.order) == self.order.maxlen:
            old = self.order[0]
            del self.sorted[bisect.bisect_left(self.sorted, old)]
        self.order.append(x)
        bisect.insort(self.sorted, x)
        return old

    def clear(self) -> None:
        """Forget every value."""
        self.order.clear()
        self.sorted.clear()

    def __len__(self) -> int:
        return len(self.order)


def _sigma(*groups: list[float]) -> float:
    """Robust standard deviation (MAD × 1.4826) of the residuals about each group's median."""
    residuals: list[float] = []
    for g in groups:
        med = _median(sorted(g))
        residuals += [abs(v - med) for v in g]
    return MAD_TO_SIGMA * _median(sorted(residuals))


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------


class Detector:
    """Common interface of all detectors (see the module docstring).

    Subclasses set :attr:`kind` and implement :meth:`update`, :meth:`reset`,
    :meth:`_get_state` and :meth:`_set_state`.

    Args:
        signal: Name of the monitored quantity, copied into every
            :class:`~lr_monitor.events.Detection`.

    Raises:
        ValueError: If ``signal`` is not a non-empty string.
    """

    #: The :attr:`Detection.kind <lr_monitor.events.Detection.kind>` this detector emits.
    kind: ClassVar[str] = ""

    def __init__(self, signal: str) -> None:
        self.signal: str = check_str("signal", signal)

    def update(self, step: int, value: float) -> Detection | None:
        """Feed the value of one step.

        Args:
            step: Optimizer step the value belongs to.
            value: The signal's value (a Python float; ``nan``/``inf`` allowed).

        Returns:
            A detection when the threshold is crossed, else ``None``.
        """
        raise NotImplementedError

    def reset(self) -> None:
        """Forget all history, as if freshly constructed."""
        raise NotImplementedError

    def tripwire(self) -> float | None:
        """The value above which the next :meth:`update` fires on that value alone.

        Only rules that judge one value against a bound known beforehand have one (the
        spike and explosion rules); the guard compares the next value with it on the
        device, so that such a step can be skipped without a host decision
        (:meth:`lr_monitor.guard.signals.StepSignals.stage`). Rules that judge a history
        return ``None``.

        Returns:
            The bound (the next value fires iff it is finite and strictly above it), or
            ``None``.
        """
        return None

    def _hit(self, step: int, value: float, threshold: float, message: str,
             onset: int | None = None) -> Detection:
        """This detector's :class:`~lr_monitor.events.Detection` at ``step``.

        ``onset``: the first step of the evidence, for a rule that fires after the trouble
        began (``None``: the step itself).
        """
        return Detection(step=int(step), kind=self.kind, signal=self.signal, value=value,
                         threshold=threshold, message=message,
                         onset=None if onset is None else int(onset))

    def state_dict(self) -> dict[str, Any]:
        """The detector's state as plain Python types (fits a Lightning checkpoint).

        Returns:
            A dict with ``"type"``, ``"version"`` and the detector-specific fields.
        """
        state = self._get_state()
        state["type"] = type(self).__name__
        state["version"] = _STATE_VERSION
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Args:
            state_dict: A dict produced by :meth:`state_dict` of the same detector class.

        Raises:
            ValueError: If the state comes from another detector class or a newer version.
        """
        kind = state_dict.get("type", type(self).__name__)
        if kind != type(self).__name__:
            raise ValueError(
                f"state_dict of type {kind!r} cannot be loaded into {type(self).__name__}"
            )
        version = int(state_dict.get("version", _STATE_VERSION))
        if version > _STATE_VERSION:
            raise ValueError(
                f"state_dict version={version} is newer than supported ({_STATE_VERSION})"
            )
        self._set_state(state_dict)

    def _get_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _set_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(signal={self.signal!r})"


# --------------------------------------------------------------------------------------------
# detectors
# --------------------------------------------------------------------------------------------


class NonFiniteDetector(Detector):
    """Fires on every ``nan``, ``+inf`` or ``-inf`` value.

    Formula: fires iff ``not math.isfinite(value)``. The reported threshold is ``inf``.

    Args:
        signal: Name of the monitored quantity (default ``"loss"``).

    Raises:
        ValueError: If ``signal`` is not a non-empty string.

    Example:
        >>> d = NonFiniteDetector()
        >>> d.update(0, 1.5) is None
        True
        >>> e = d.update(1, float("nan"))
        >>> e.kind, e.step, d.count
        ('nonfinite', 1, 1)
    """

    kind: ClassVar[str] = "nonfinite"

    def __init__(self, signal: str = "loss") -> None:
        super().__init__(signal)
        self.count = 0

    def update(self, step: int, value: float) -> Detection | None:
        """Return a ``"nonfinite"`` detection iff ``value`` is nan or ±inf.

        Args:
            step: Optimizer step the value belongs to.
            value: The signal's value.

        Returns:
            A detection for a non-finite value, else ``None``.
        """
        x = float(value)
        if math.isfinite(x):
            return None
        self.count += 1
        return self._hit(
            step, x, math.inf,
            f"{self.signal} is {x} at step {step} (non-finite #{self.count})",
        )

    def reset(self) -> None:
        """Reset the count of non-finite values."""
        self.count = 0

    def _get_state(self) -> dict[str, Any]:
        return {"count": self.count}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])


class SpikeDetector(Detector):
    """Fires when one value jumps far above the robust level of the recent values.

    The baseline is the median ``m`` and the scaled median absolute deviation
    ``s = 1.4826·MAD`` of the last ``window`` accepted values (finite, not spikes). With ``n``
    values in the window (``n ≥ warmup``) a value ``x`` is a spike iff::

        x > m + k(n)·max(s, 1e-3·|m| + 1e-12)          (robust z-score bound)
        and, when m > 0,  x > m·(1 + min_rel_increase)  (relative guard)

    where ``k(n) = threshold·(1 + (17/n)²)`` is a small-sample correction: a MAD from a
    handful of values is unreliable, and without it a 10-value window would raise false
    alarms ~100× as often as a 50-value one (``k`` is 1.12·threshold at n = 50, ≈ threshold
    for large windows). The relative guard keeps the detector quiet on tiny absolute wiggles
    of an almost-converged loss.

    With ``log_space=True`` (default) and a positive value and window, ``m``, ``s`` and the
    first bound are computed on ``log(x)`` (floor ``1e-3``, i.e. 0.1 % relative) and mapped
    back with ``exp``: loss noise is multiplicative (it shrinks with the loss), and the
    right-skewed spread of raw loss values otherwise makes a fixed z-score fire on healthy
    noise. Values ``≤ 0`` fall back to the linear formula.

    Spikes never enter the window, so a blow-up cannot poison its own baseline. If
    ``adapt_after`` spikes arrive in a row the detector treats it as a level shift (e.g. a
    new data phase): it fires for that value too, then rebuilds the window from the run of
    spikes, so it does not fire on every step forever. Sustained blow-ups are the business of
    :class:`DivergenceDetector`. Non-finite values are ignored.

    The detection's ``threshold`` is the bound that was crossed (the larger of the two),
    in the units of ``value``.

    Args:
        signal: Name of the monitored quantity (default ``"loss"``).
        window: Number of recent accepted values the baseline uses (int ≥ 3).
        warmup: Accepted values needed before the detector can fire (int in [3, window]).
        threshold: Robust z-score ``k`` (number of scaled MADs above the median), > 0.
        min_rel_increase: Relative guard: a spike must also exceed ``median·(1 + this)``
            when the median is positive (≥ 0).
        log_space: Compute the statistics on ``log(value)`` when everything is positive.
        adapt_after: Consecutive spikes after which the level is accepted as the new
            baseline (int ≥ 1), or ``None`` to never adapt.

    Raises:
        ValueError: If an argument is outside its range (the message names it).

    Example:
        >>> d = SpikeDetector(window=20, warmup=20)
        >>> any(d.update(t, 1.0 + 0.05 * (t % 5 - 2)) for t in range(20))
        False
        >>> e = d.update(20, 9.0)
        >>> e.kind, round(e.threshold, 3)
        ('spike', 2.194)
        >>> d.update(21, 1.02) is None  # the spike did not enter the baseline
        True
    """

    kind: ClassVar[str] = "spike"

    def __init__(
        self,
        signal: str = "loss",
        window: int = 50,
        warmup: int = 10,
        threshold: float = 6.0,
        min_rel_increase: float = 0.5,
        *,
        log_space: bool = True,
        adapt_after: int | None = 20,
    ) -> None:
        super().__init__(signal)
        self.window: int = check_int("window", window, 3)
        self.warmup: int = check_int("warmup", warmup, 3)
        if self.warmup > self.window:
            raise invalid("warmup", warmup, f"an int in [3, window={window}]")
        self.threshold: float = check_real("threshold", threshold, low=0.0)
        self.min_rel_increase: float = check_real("min_rel_increase", min_rel_increase,
                                                  low=0.0, low_closed=True)
        self.log_space = check_bool("log_space", log_space)
        if adapt_after is not None:
            adapt_after = check_int("adapt_after", adapt_after, 1)
        self.adapt_after = adapt_after
        self._values = _SortedWindow(self.window)
        self._logs: list[float] = []  # sorted logs of the positive values of the window
        self._run: list[float] = []  # current run of consecutive spikes
        self._bound: float | None = None
        self._bound_known = False  # bound() is cached until the window changes

    def _keep(self, values: Iterable[float]) -> None:
        """Append ``values`` to the window (the oldest fall out); the bound is recomputed."""
        for v in values:
            old = self._values.append(v)
            if old is not None and old > 0.0:
                del self._logs[bisect.bisect_left(self._logs, math.log(old))]
            if v > 0.0:
                bisect.insort(self._logs, math.log(v))
        self._bound_known = False

    def bound(self) -> float | None:
        """The value above which the next value would be a spike (``None`` during warmup).

        Returns:
            The current spike bound in the units of the signal, or ``None``.
        """
        if not self._bound_known:
            self._bound, self._bound_known = self._compute_bound(), True
        return self._bound

    def _compute_bound(self) -> float | None:
        n = len(self._values)
        if n < self.warmup:
            return None
        k = self.threshold * (1.0 + (17.0 / n) ** 2)
        ordered = self._values.sorted
        if self.log_space and ordered[0] > 0.0:
            med, mad = _median_mad_sorted(self._logs)
            z_bound = _safe_exp(med + k * max(MAD_TO_SIGMA * mad, 1e-3))
            med = math.exp(med)
        else:
            med, mad = _median_mad_sorted(ordered)
            z_bound = med + k * max(MAD_TO_SIGMA * mad, 1e-3 * abs(med) + 1e-12)
        if med > 0.0:
            return max(z_bound, med * (1.0 + self.min_rel_increase))
        return z_bound

    def tripwire(self) -> float | None:
        """:meth:`bound`: the next value fires iff it is finite and above it."""
        return self.bound()

    def update(self, step: int, value: float) -> Detection | None:
        """Feed one value; return a ``"spike"`` detection if it is a spike.

        Args:
            step: Optimizer step the value belongs to.
            value: The signal's value; non-finite values are ignored.

        Returns:
            A detection if ``value`` is above :meth:`bound`, else ``None``.
        """
        x = float(value)
        if not math.isfinite(x):
            return None
        bound = self.bound()
        if bound is None or x <= bound:
            self._run.clear()
            self._keep((x,))
            return None
        median = _median(self._values.sorted)
        n = len(self._values)
        self._run.append(x)
        note = ""
        if self.adapt_after is not None and len(self._run) >= self.adapt_after:
            note = f"; {len(self._run)} in a row: accepted as the new level"
            self._values.clear()
            self._logs.clear()
            self._keep(self._run)
            self._run.clear()
        return self._hit(
            step, x, bound,
            (
                f"{self.signal} spiked to {x:.4g} at step {step}, above {bound:.4g} "
                f"(median {median:.4g} of the last {n} values, {x / median:.3g}x){note}"
                if median > 0
                else f"{self.signal} spiked to {x:.4g} at step {step}, above {bound:.4g} "
                f"(median {median:.4g} of the last {n} values){note}"
            ),
        )

    def reset(self) -> None:
        """Forget the window (the detector warms up again)."""
        self._values.clear()
        self._logs.clear()
        self._run.clear()
        self._bound_known = False

    def _get_state(self) -> dict[str, Any]:
        return {"values": list(self._values.order), "run": list(self._run)}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.reset()
        self._keep(float(v) for v in state["values"])
        self._run = [float(v) for v in state["run"]]


#: Progress counts for the give-back rule when it exceeds this many noise deviations.
_PROGRESS_SIGMAS = 3.0


class DivergenceDetector(Detector):
    """Fires when the smoothed signal stays far above the best smoothed value seen so far.

    Each finite value ``x`` (clipped, see below) updates a bias-corrected exponential moving
    average ``μ_t = β·μ_{t-1} + (1-β)·x``, ``s_t = μ_t / (1 - β^t)``. After ``warmup`` values
    the best (minimum) ``b = min s`` is tracked and the bound is::

        bound = b + (ratio - 1)·|b| + min_delta      (= ratio·b + min_delta for b ≥ 0)

    The detector fires when ``s > bound`` for ``patience`` consecutive updates, then re-arms:
    a persisting divergence fires again only after another ``patience`` updates above the
    bound (no event storm). This catches both a slow drift upward and "blew up to 1e4, then
    sits at chance level 2.3 while the best was 0.3" (2.3 > 2 × 0.3), but not a healthy noisy
    descent: the EMA averages the noise away and the best only goes down with the loss.

    Robustness to single spikes: once the best exists, each input is clipped to
    ``s_{t-1} + clip·(bound - b)`` before smoothing, so one huge value (the
    :class:`SpikeDetector`'s business) moves the average by at most ``(1-β)·clip`` "gaps"
    ``bound - b`` and cannot hold it above the bound for ``patience`` steps, while a sustained
    blow-up still climbs ``(1-β)·clip`` gaps per step (0.4 with the defaults) and crosses the
    bound within a few steps. The reported value is this robust smoothed value.

    The early, high loss is handled by ``warmup``: the best is not tracked (and nothing
    fires) until ``warmup`` values have been smoothed, so the first noisy values neither
    set an unreachable best nor count as divergence.

    For a signal that may reach 0 or go negative, use ``min_delta > 0`` (an absolute margin).

    After an LR cut that keeps the current weights, call :meth:`rebase`: it makes the current
    level (the median of the last ``patience`` raw values) both the smoothed value and the
    best, so the detector judges the new regime instead of comparing against a best the run
    may never reach again, and does not fire again on the divergence it just reported. After
    a rollback, prefer restoring the detector's :meth:`state_dict` saved together with the
    weights (its history then matches the restored model); :meth:`rebase` also works (the best
    follows the loss back down), :meth:`reset` costs ``warmup`` blind steps.

    Args:
        signal: Name of the monitored quantity (default ``"loss"``).
        ema: Smoothing factor β of the moving average, in [0, 1) (0 = no smoothing).
        ratio: Relative bound (≥ 1): diverged when the smoothed value exceeds ``ratio ×`` best.
        patience: Consecutive updates above the bound needed to fire (int ≥ 1).
        warmup: Values smoothed before the best is tracked (int ≥ 1).
        min_delta: Absolute margin added to the bound (≥ 0); ``ratio > 1`` or
            ``min_delta > 0`` is required.
        clip: Inputs are clipped to ``smoothed + clip·(bound - best)`` (> 0), or ``None`` for
            no clipping.
        progress: Also require the smoothed value to have given back this fraction of the
            progress made since warm-up: ``bound = max(ratio-bound, b + progress·(r − b))``
            with ``r`` the highest smoothed value during warm-up (the starting level). In
            (0, 1], or ``None`` (off). A healthy run near a tiny loss wobbles by multiples of
            its best (0.01 → 0.03) without losing any real progress; this keeps such wobbles
            quiet while "back at chance level" (r) still fires.
        giveback: Fire also when the smoothed value has given back this fraction of the
            progress, whatever the ratio rule says: ``bound = min(above, b + giveback·(r −
            b))``, in (0, 1], or ``None`` (off). A run that went from 2.29 to 1.33 and sits
            at chance (2.3) again has lost everything, though 2.3 < 2 × 1.33. Only progress
            that stands out from the noise counts: ``r − b > 3·σ``, with ``σ`` the robust
            standard deviation (1.4826·MAD) of the last ``patience`` raw values — a loss
            that never really moved has nothing to give back.

    Raises:
        ValueError: If an argument is outside its range (the message names it).

    Example:
        >>> d = DivergenceDetector(warmup=5, patience=3)
        >>> healthy = [d.update(t, 2.0 / (1 + t)) for t in range(50)]
        >>> any(healthy)
        False
        >>> events = [d.update(t, 2.3) for t in range(50, 100)]  # stuck at chance level
        >>> first = next(e for e in events if e)
        >>> first.kind, first.threshold < first.value
        ('divergence', True)
        >>> d.rebase()  # e.g. after the guard cut the LR: judge the new regime
        >>> d.best
        2.3
        >>> any(d.update(t, 2.3) for t in range(100, 150))
        False
    """

    kind: ClassVar[str] = "divergence"

    def __init__(
        self,
        signal: str = "loss",
        ema: float = 0.9,
        ratio: float = 2.0,
        patience: int = 10,
        warmup: int = 20,
        min_delta: float = 0.0,
        *,
        clip: float | None = 4.0,
        progress: float | None = None,
        giveback: float | None = None,
    ) -> None:
        super().__init__(signal)
        if progress is not None:
            progress = check_real("progress", progress, low=0.0, high=1.0, high_closed=True)
        self.progress = progress
        if giveback is not None:
            giveback = check_real("giveback", giveback, low=0.0, high=1.0, high_closed=True)
        self.giveback = giveback
        self.ema: float = check_real("ema", ema, low=0.0, high=1.0, low_closed=True)
        self.ratio: float = check_real("ratio", ratio, low=1.0, low_closed=True)
        self.patience: int = check_int("patience", patience, 1)
        self.warmup = check_int("warmup", warmup, 1)
        self.min_delta: float = check_real("min_delta", min_delta, low=0.0, low_closed=True)
        if self.ratio == 1.0 and self.min_delta == 0.0:
            raise invalid("ratio", ratio, "a number > 1 when min_delta is 0 (or set min_delta > 0)")
        if clip is not None:
            clip = check_real("clip", clip, low=0.0)
        self.clip = clip
        self.reset()

    def reset(self) -> None:
        """Forget the average, the best and the counter (warmup starts again)."""
        self._avg = 0.0
        self._n = 0
        self._best: float | None = None
        self._reference: float | None = None
        self._above = 0
        self._recent: deque[float] = deque(maxlen=self.patience)

    @property
    def smoothed(self) -> float | None:
        """The bias-corrected moving average, or ``None`` before the first finite value."""
        if self._n == 0:
            return None
        return self._avg / (1.0 - self.ema**self._n)

    @property
    def best(self) -> float | None:
        """The lowest smoothed value since warmup (or the last :meth:`rebase`)."""
        return self._best

    def bound(self) -> float | None:
        """The current divergence bound, or ``None`` while the best is not established.

        Returns:
            ``best + (ratio - 1)·|best| + min_delta`` or ``None``.
        """
        if self._best is None:
            return None
        return self._bound(self._best)

    def _bound(self, best: float) -> float:
        bound = best + (self.ratio - 1.0) * abs(best) + self.min_delta
        ref = self._reference
        if self.progress is not None and ref is not None:
            bound = max(bound, best + self.progress * (ref - best))
        if self.giveback is not None and ref is not None and len(self._recent) >= 3:
            _, mad = _median_mad(self._recent)
            if ref - best > _PROGRESS_SIGMAS * MAD_TO_SIGMA * mad:
                bound = min(bound, best + self.giveback * (ref - best))
        return bound

    def rebase(self) -> None:
        """Judge a new regime: the current level becomes the smoothed value and the best.

        The current level is the median of the last ``patience`` finite raw values (not the
        lagging average). Also clears the consecutive counter and ends the warmup. Call it
        after an LR cut that keeps the weights (see the class docstring). Before the first
        value it only clears the counter.
        """
        self._above = 0
        if not self._recent:
            return
        level = _median(sorted(self._recent))
        self._n = max(self._n, self.warmup)
        self._avg = level * (1.0 - self.ema**self._n)
        self._best = level
        self._reference = level

    def update(self, step: int, value: float) -> Detection | None:
        """Feed one value; return a ``"divergence"`` detection on sustained divergence.

        Args:
            step: Optimizer step the value belongs to.
            value: The signal's value; non-finite values are ignored.

        Returns:
            A detection when the smoothed value has been above :meth:`bound` for
            ``patience`` consecutive updates, else ``None``.
        """
        x = float(value)
        if not math.isfinite(x):
            return None
        self._recent.append(x)
        if self._best is not None and self.clip is not None:
            gap = self._bound(self._best) - self._best
            if gap > 0.0:
                x = min(x, self._avg / (1.0 - self.ema**self._n) + self.clip * gap)
        self._avg = self.ema * self._avg + (1.0 - self.ema) * x
        self._n += 1
        s = self._avg / (1.0 - self.ema**self._n)
        if self._best is None:
            self._reference = s if self._reference is None else max(self._reference, s)
        if self._n < self.warmup:
            return None
        if self._best is None or s < self._best:
            self._best = s
        bound = self._bound(self._best)
        if s <= bound:
            self._above = 0
            return None
        self._above += 1
        if self._above < self.patience:
            return None
        self._above = 0
        # the raw values crossed about β/(1−β) steps (the average's lag) before the
        # smoothed one, which then stayed above for ``patience`` updates
        lag = math.ceil(self.ema / (1.0 - self.ema) - 1e-9)
        return self._hit(
            step, s, bound,
            (
                f"{self.signal} diverged: smoothed value {s:.4g} above {bound:.4g} "
                f"(best {self._best:.4g}) for {self.patience} steps at step {step}"
            ),
            onset=int(step) - self.patience + 1 - lag,
        )

    def _get_state(self) -> dict[str, Any]:
        return {
            "avg": self._avg,
            "n": self._n,
            "best": self._best,
            "above": self._above,
            "recent": list(self._recent),
            "reference": self._reference,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._avg = float(state["avg"])
        self._n = int(state["n"])
        self._best = None if state["best"] is None else float(state["best"])
        self._above = int(state["above"])
        self._recent = deque((float(v) for v in state["recent"]), maxlen=self.patience)
        ref = state.get("reference")
        self._reference = None if ref is None else float(ref)


class ExplosionDetector(Detector):
    """Fires when a value exceeds a multiple of its starting level — from the second step on.

    The starting level ``r`` is the *minimum* of the first ``reference_steps`` finite values:
    a blow-up in those steps cannot raise it (a median could take in a first blow-up just
    under the bound, and the rule would then never fire). A value ``x > f·r`` (with
    ``r > 0``) is a ``"divergence"`` at once when ``x > factor·r``, and when
    ``persist`` values in a row are above ``f·r``, where the factor ``f`` follows the
    signal's own noise::

        σ = 1.4826 · MAD(ln x_t − ln x_{t−1}) / √2        (over the last ``window`` steps)
        f = clamp(exp(z·σ), min_factor, factor)           once ``noise_values`` are seen
        f = factor                                        before

    A single batch between the two bounds is a spike (one bad batch: skipped by the guard,
    not worth a rollback and a cut); staying there is a blow-up.

    Differences of logarithms take out the descent of the loss (its trend) and leave the
    step-to-step noise, relative to the loss: a batch of 8 regression samples moves the
    loss by ~50 % from one step to the next (σ ≈ 0.5, so ``f`` = ``factor``), a batch of
    512 images by ~1 % (σ ≈ 0.01, so ``f`` = ``min_factor``). One default thus fits both: a
    loss 4× its start is a blow-up when the loss is quiet, and only 10× is when single
    batches already vary that much. Values above the bound enter neither the level nor the
    noise.

    This is the rule for the first steps of a run, where every windowed detector is still
    warming up: on digits at lr 1.0, Adam's loss jumps from 2.3 to ~3e4 at step 1 and then
    sits at chance level — the run's best loss *is* its starting loss, so "well above its
    best" never holds afterwards. A loss many times its starting level is a blow-up in any
    task whose loss starts near its worst value (classification, regression from scratch).

    Args:
        signal: Name of the monitored quantity (default ``"loss"``).
        factor: The largest factor, used until the noise is known (> 1).
        reference_steps: Values whose minimum is the starting level (int ≥ 1).
        min_factor: The smallest factor, for a quiet signal (in (1, factor]).
        z: Robust standard deviations of the step-to-step log change in the factor (> 0).
        noise_values: Log changes needed before the noise sets the factor (int ≥ 2).
        window: Log changes kept for the noise estimate (int ≥ noise_values).
        persist: Values in a row above the noise bound (but below ``factor·r``) that make
            a blow-up (int ≥ 1).

    Raises:
        ValueError: If an argument is outside its range (the message names it).

    Example:
        >>> d = ExplosionDetector(factor=10)
        >>> [d.update(0, 2.3), d.update(1, 2.2)]
        [None, None]
        >>> e = d.update(2, 3.4e4)
        >>> e.kind, round(e.threshold, 1)
        ('divergence', 22.0)
        >>> quiet = ExplosionDetector()
        >>> for t in range(20):  # ~1 % noise: the factor comes down to min_factor
        ...     _ = quiet.update(t, 2.3 * (1 + 0.01 * (-1) ** t))
        >>> round(quiet.factor_now(), 1), [quiet.update(20 + t, 9.5) for t in range(2)]
        (4.0, [None, None])
        >>> quiet.update(22, 9.5).kind  # the third in a row above 4x
        'divergence'
    """

    kind: ClassVar[str] = "divergence"

    def __init__(self, signal: str = "loss", factor: float = 10.0,
                 reference_steps: int = 3, *, min_factor: float = 4.0, z: float = 8.0,
                 noise_values: int = 10, window: int = 50, persist: int = 3) -> None:
        super().__init__(signal)
        self.factor: float = check_real("factor", factor, low=1.0)
        self.reference_steps: int = check_int("reference_steps", reference_steps, 1)
        self.min_factor: float = check_real("min_factor", min_factor, low=1.0,
                                            high=self.factor, high_closed=True)
        self.z: float = check_real("z", z, low=0.0)
        self.noise_values: int = check_int("noise_values", noise_values, 2)
        self.window: int = check_int("window", window, self.noise_values)
        self.persist: int = check_int("persist", persist, 1)
        self._factor: float | None = None
        self.reset()

    @property
    def level(self) -> float | None:
        """The starting level (``None`` before the first value)."""
        return min(self._first) if self._first else None

    def factor_now(self) -> float:
        """The factor of the current bound: ``factor`` until the noise is known."""
        factor = self._factor
        if factor is None:
            if len(self._changes) < self.noise_values:
                factor = self.factor
            else:
                _, mad = _median_mad_sorted(self._changes.sorted)
                sigma = MAD_TO_SIGMA * mad / math.sqrt(2.0)
                factor = min(self.factor, max(self.min_factor, _safe_exp(self.z * sigma)))
            self._factor = factor
        return factor

    def tripwire(self) -> float | None:
        """The bound of the next value; ``None`` before a positive starting level.

        ``factor·r``, or ``f·r`` when the next value would be the ``persist``-th in a row
        above that noise bound.

        Example:
            >>> d = ExplosionDetector(factor=10)
            >>> d.tripwire() is None
            True
            >>> [d.update(t, 2.0) for t in range(3)] == [None] * 3
            True
            >>> d.tripwire()
            20.0
        """
        level = self.level
        if level is None or level <= 0:
            return None
        factor = self.factor if self._above + 1 < self.persist else self.factor_now()
        return factor * level

    def reset(self) -> None:
        """Forget the starting level and the noise."""
        self._first: list[float] = []
        self._changes = _SortedWindow(self.window)
        self._last_log: float | None = None
        self._above = 0
        self._factor = None  # factor_now(), until the noise changes

    def update(self, step: int, value: float) -> Detection | None:
        """Feed one value; return a detection if it exceeds the factor × the starting level.

        Args:
            step: Optimizer step the value belongs to.
            value: The signal's value; non-finite values are ignored.

        Returns:
            A ``"divergence"`` detection or ``None``.
        """
        x = float(value)
        if not math.isfinite(x):
            return None
        level = self.level
        factor = self.factor_now()
        if level is not None and level > 0 and x > factor * level:
            self._above += 1
            if x <= self.factor * level and self._above < self.persist:
                return None  # one batch up there is a spike, not (yet) a blow-up
            above, self._above = self._above, 0
            return self._hit(
                step, x, factor * level,
                f"{self.signal} exploded to {x:.4g}, more than {factor:.3g}x its "
                f"starting level {level:.4g}",
                onset=int(step) - above + 1,
            )
        self._above = 0
        if len(self._first) < self.reference_steps:
            self._first.append(x)  # values above the bound never enter the starting level
        if x > 0.0:
            log = math.log(x)
            if self._last_log is not None:
                self._changes.append(log - self._last_log)
                self._factor = None
            self._last_log = log
        return None

    def _get_state(self) -> dict[str, Any]:
        return {"first": list(self._first), "changes": list(self._changes.order),
                "last_log": self._last_log, "above": self._above}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._first = [float(v) for v in state["first"]]
        self._changes = _SortedWindow(self.window,
                                      (float(v) for v in state.get("changes", [])))
        self._factor = None
        last = state.get("last_log")
        self._last_log = None if last is None else float(last)
        self._above = int(state.get("above", 0))


class OscillationDetector(Detector):
    """Fires when successive updates keep pointing back and forth.

    Over the last ``window`` values ``c_i`` (cosines), with ``σ = -1`` for
    ``direction="negative"`` and ``σ = +1`` for ``direction="positive"``, it fires iff::

        #{i : σ·c_i > 0} / window ≥ min_fraction   and   σ·mean(c) ≥ σ·threshold

    Two conventions are supported:

    * ``direction="negative"`` (default) for ``update_cosine = cos(Δ_t, Δ_{t-1})``, the cosine
      between successive updates: values near -1 mean each step undoes the previous one
      (overshooting along the update direction). Default threshold -0.5 (fires when
      ``mean ≤ -0.5``).
    * ``direction="positive"`` for an overshoot signal such as
      ``g_t·Δ_{t-1} / (|g_t||Δ_{t-1}|)``: a positive value means the new gradient points
      along the last update, i.e. the last step jumped past the minimum. Default threshold
      +0.5 (fires when ``mean ≥ 0.5``).

    After firing the window is cleared, so a persisting oscillation fires again only after
    ``window`` new values. The first ``warmup`` finite values are ignored (the first steps of
    an adaptive optimizer are often erratic). Non-finite values are ignored.

    Args:
        signal: Name of the monitored quantity (default ``"update_cosine"``).
        window: Number of recent values judged together (int ≥ 2).
        threshold: Bound on the window mean, on the oscillation side of 0: in [-1, 0) for
            ``direction="negative"``, in (0, 1] for ``"positive"``; ``None`` = ∓0.5.
        min_fraction: Minimum fraction of values on the oscillation side of 0, in (0, 1].
        warmup: Number of initial finite values ignored (int ≥ 0).
        direction: ``"negative"`` or ``"positive"``: which sign means oscillation.

    Raises:
        ValueError: If an argument is outside its range (the message names it).

    Example:
        >>> d = OscillationDetector(window=10)
        >>> any(d.update(t, 0.3) for t in range(30))  # consistent direction
        False
        >>> events = [d.update(t, -0.9) for t in range(30, 40)]  # back and forth
        >>> e = next(e for e in events if e)
        >>> e.kind, e.step, round(e.value, 2)
        ('oscillation', 37, -0.66)
        >>> o = OscillationDetector(signal="overshoot", direction="positive", window=4)
        >>> [e is not None for e in (o.update(t, 0.8) for t in range(4))]
        [False, False, False, True]
    """

    kind: ClassVar[str] = "oscillation"

    def __init__(
        self,
        signal: str = "update_cosine",
        window: int = 20,
        threshold: float | None = None,
        min_fraction: float = 0.8,
        warmup: int = 0,
        *,
        direction: Literal["negative", "positive"] = "negative",
    ) -> None:
        super().__init__(signal)
        check_choice("direction", direction, ("negative", "positive"))
        self.direction = direction
        self._sign = -1.0 if direction == "negative" else 1.0
        self.window = check_int("window", window, 2)
        if threshold is None:
            threshold = 0.5 * self._sign
        if direction == "negative":
            self.threshold = check_real("threshold", threshold, low=-1.0, high=0.0,
                                        low_closed=True)
        else:
            self.threshold = check_real("threshold", threshold, low=0.0, high=1.0,
                                        high_closed=True)
        self.min_fraction: float = check_real("min_fraction", min_fraction, low=0.0, high=1.0,
                                              high_closed=True)
        self.warmup = check_int("warmup", warmup, 0)
        self.reset()

    def reset(self) -> None:
        """Forget the window and the warmup count."""
        self._values: deque[float] = deque(maxlen=self.window)
        self._seen = 0

    def update(self, step: int, value: float) -> Detection | None:
        """Feed one value; return an ``"oscillation"`` detection when the window oscillates.

        Args:
            step: Optimizer step the value belongs to.
            value: The cosine; non-finite values are ignored.

        Returns:
            A detection when the full window satisfies both conditions, else ``None``.
        """
        x = float(value)
        if not math.isfinite(x):
            return None
        self._seen += 1
        if self._seen <= self.warmup:
            return None
        self._values.append(x)
        if len(self._values) < self.window:
            return None
        sign = self._sign
        fraction = sum(1 for v in self._values if sign * v > 0.0) / self.window
        mean = math.fsum(self._values) / self.window
        if fraction < self.min_fraction or sign * mean < sign * self.threshold:
            return None
        self._values.clear()
        side = "negative" if sign < 0 else "positive"
        return self._hit(
            step, mean, self.threshold,
            (
                f"{self.signal} oscillates at step {step}: mean {mean:.3f} over the last "
                f"{self.window} steps ({fraction:.0%} {side}, threshold {self.threshold:g})"
            ),
        )

    def _get_state(self) -> dict[str, Any]:
        return {"values": list(self._values), "seen": self._seen}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._values = deque((float(v) for v in state["values"]), maxlen=self.window)
        self._seen = int(state["seen"])


class UpdateRatioDetector(Detector):
    """Fires when ‖Δθ‖/‖θ‖ stays far above the usual ~1e-3.

    The rule of thumb is an update-to-parameter norm ratio around 1e-3 per layer (much higher
    means the learning rate is too high). Formula: fires when ``value > threshold`` for
    ``patience`` consecutive updates, then re-arms (fires again only after another
    ``patience`` values above). A value at or below the threshold clears the counter;
    non-finite values are ignored. The default threshold 0.1 is 100× the rule of thumb, so it
    flags real trouble (each step rewrites ~10 % of the weights), not a slightly hot LR.

    Args:
        signal: Name of the monitored quantity (default ``"update_ratio"``).
        threshold: Ratio above which a step counts as too large (> 0).
        patience: Consecutive values above ``threshold`` needed to fire (int ≥ 1).

    Raises:
        ValueError: If an argument is outside its range (the message names it).

    Example:
        >>> d = UpdateRatioDetector(threshold=0.1, patience=3)
        >>> [d.update(t, v) is not None for t, v in enumerate([1e-3, 0.5, 0.4, 0.3, 1e-3])]
        [False, False, False, True, False]
    """

    kind: ClassVar[str] = "update_ratio"

    def __init__(
        self, signal: str = "update_ratio", threshold: float = 0.1, patience: int = 3
    ) -> None:
        super().__init__(signal)
        self.threshold = check_real("threshold", threshold, low=0.0)
        self.patience = check_int("patience", patience, 1)
        self._above = 0

    def reset(self) -> None:
        """Clear the consecutive counter."""
        self._above = 0

    def update(self, step: int, value: float) -> Detection | None:
        """Feed one value; fire after ``patience`` consecutive values above the threshold.

        Args:
            step: Optimizer step the value belongs to.
            value: The update-to-parameter norm ratio; non-finite values are ignored.

        Returns:
            A detection on the ``patience``-th consecutive value above the threshold.
        """
        x = float(value)
        if not math.isfinite(x):
            return None
        if x <= self.threshold:
            self._above = 0
            return None
        self._above += 1
        if self._above < self.patience:
            return None
        self._above = 0
        return self._hit(
            step, x, self.threshold,
            (
                f"{self.signal} = {x:.3g} above {self.threshold:g} for {self.patience} "
                f"consecutive steps at step {step} (typical ~1e-3: the LR is far too high)"
            ),
        )

    def _get_state(self) -> dict[str, Any]:
        return {"above": self._above}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._above = int(state["above"])


#: The standard error of a median is about √(π/2) ≈ 1.2533 times that of a mean.
_MEDIAN_SE = math.sqrt(math.pi / 2)


def _median_shift(before: list[float], after: list[float]) -> tuple[float, float, float, float]:
    """How far the median moved from ``before`` to ``after``, and how noisy that is.

    Returns:
        ``(m_before, m_after, σ, se)``: the two medians, the robust standard deviation of
        both groups about their medians and the standard error of ``m_after − m_before``,
        ``1.2533·σ·√(1/n_before + 1/n_after)``.
    """
    sigma = _sigma(before, after)
    se = _MEDIAN_SE * sigma * math.sqrt(1.0 / len(before) + 1.0 / len(after))
    return _median(sorted(before)), _median(sorted(after)), sigma, se

LossCondition = Literal["rising", "not_falling", "any"]


class LossTrend(Detector):
    """The recent losses, and whether they rose or fell over a span of steps; never fires.

    It answers one question for the overshoot detectors of its optimizer: over
    the steps ``[since, t]`` (``t`` the last step it saw), did the loss rise or fall
    compared with the equally long span just before? With the medians ``m_now``,
    ``m_before`` of the two spans and their standard error ``se`` (``σ`` the robust
    standard deviation of both spans about their medians, ``n`` the value counts)::

        Δ = m_now − m_before,   se = 1.2533 · σ · √(1/n_now + 1/n_before)
        rising      ⇔  Δ > z·se + rtol·|m_before|
        not falling ⇔  Δ ≥ −rtol·|m_before|

    Medians, so that one spike does not decide; "not falling" asks only that the loss did
    not go down (by more than a rounding margin), which a noisy run stuck at a bad level
    satisfies about half the time. Each span
    needs ``min_count`` values, else the answer is "unknown" and both conditions are false:
    the first steps of a run cannot vouch for a trend. Non-finite values are ignored.

    Args:
        signal: Name of the monitored quantity (default ``"loss"``).
        capacity: Values kept (int ≥ 2·min_count); older ones are forgotten.
        z: Standard errors the median must rise by to count as rising (> 0).
        rtol: Relative margin of both conditions (≥ 0): a rise must also exceed it, a fall
            must exceed it to count (for noise-free losses).
        min_count: Values each span needs (int ≥ 1).

    Raises:
        ValueError: If an argument is outside its range (the message names it).

    Example:
        >>> trend = LossTrend()
        >>> for t in range(20):
        ...     _ = trend.update(t, 2.0 - 0.05 * t)  # falling
        >>> trend.rising(10), trend.not_falling(10)
        (False, False)
        >>> for t in range(20, 30):
        ...     _ = trend.update(t, 3.0 + 0.01 * (t % 2))  # up to a higher level
        >>> trend.rising(20), trend.not_falling(20)
        (True, True)
        >>> round(trend.change(20)[0], 3)
        1.73
    """

    kind: ClassVar[str] = ""

    def __init__(self, signal: str = "loss", *, capacity: int = 1024, z: float = 2.0,
                 rtol: float = 1e-3, min_count: int = 3, min_span: int = 1) -> None:
        super().__init__(signal)
        self.min_count: int = check_int("min_count", min_count, 1)
        self.min_span: int = check_int("min_span", min_span, 1)
        self.capacity: int = check_int("capacity", capacity, 2 * self.min_count)
        self.z: float = check_real("z", z, low=0.0)
        self.rtol: float = check_real("rtol", rtol, low=0.0, low_closed=True)
        self.reset()

    @property
    def start(self) -> float | None:
        """The first finite value (the loss before any step; ``None`` before it)."""
        return self._start

    def recent(self, n: int) -> list[float]:
        """The last ``n`` values kept (fewer at the start of a run)."""
        return list(self._values)[-n:]

    def reset(self) -> None:
        """Forget every value."""
        self._steps: deque[int] = deque(maxlen=self.capacity)
        self._values: deque[float] = deque(maxlen=self.capacity)
        self._start: float | None = None

    def update(self, step: int, value: float) -> Detection | None:
        """Keep one finite value.

        Args:
            step: Optimizer step the value belongs to.
            value: The loss; non-finite values are ignored.

        Returns:
            ``None``, always.
        """
        x = float(value)
        if math.isfinite(x):
            if self._start is None:
                self._start = x
            self._steps.append(int(step))
            self._values.append(x)
        return None

    def change(self, since: int) -> tuple[float, float, float] | None:
        """``(Δ, se, m_before)`` for the span from ``since`` to the last step (see above).

        Args:
            since: First step of the span judged.

        Returns:
            The change of the median, its standard error and the earlier median, or
            ``None`` when a span has fewer than ``min_count`` values.
        """
        if not self._steps:
            return None
        last = self._steps[-1]
        span = max(self.min_span, last - int(since) + 1)
        since = last - span + 1
        pairs = list(zip(self._steps, self._values, strict=True))
        now = [v for s, v in pairs if s >= since]
        before = [v for s, v in pairs if since - span <= s < since]
        if len(now) < self.min_count or len(before) < self.min_count:
            return None
        m_before, m_now, _, se = _median_shift(before, now)
        return m_now - m_before, se, m_before

    def rising(self, since: int) -> bool:
        """Whether the loss rose significantly from the span before ``since`` to the one after.

        Args:
            since: First step of the span judged.
        """
        c = self.change(since)
        return c is not None and c[0] > self.z * c[1] + self.rtol * abs(c[2])

    def not_falling(self, since: int) -> bool:
        """Whether the median loss since ``since`` is at least that of the span before.

        Args:
            since: First step of the span judged.
        """
        c = self.change(since)
        return c is not None and c[0] >= -self.rtol * abs(c[2])

    def holds(self, condition: LossCondition, since: int) -> bool:
        """Whether ``condition`` (``"rising"``, ``"not_falling"`` or ``"any"``) holds.

        Args:
            condition: The loss condition of an :class:`OvershootDetector`.
            since: First step of the span judged.
        """
        if condition == "rising":
            return self.rising(since)
        if condition == "not_falling":
            return self.not_falling(since)
        return True

    def _get_state(self) -> dict[str, Any]:
        return {"steps": list(self._steps), "values": list(self._values),
                "start": self._start}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._steps = deque((int(s) for s in state["steps"]), maxlen=self.capacity)
        self._values = deque((float(v) for v in state["values"]), maxlen=self.capacity)
        start = state.get("start")
        self._start = None if start is None else float(start)


class DeadStartDetector(Detector):
    """Fires when the gradient has collapsed and the loss never moved from its start.

    A learning rate far too high can kill a network in its first step without a NaN or a
    spike: SGD at lr 5 on a ReLU CNN switches every unit off, the loss sits at ln 10 from
    then on and only the output bias still gets a gradient (0.2–0.25 of the first one on
    the digits CNN, 5 seeds). Over the last ``window`` values, with ``g₀`` the first gradient norm
    (taken before any step, so it does not depend on the learning rate), ``L₀`` the first
    loss, ``m`` the median of the last ``window`` losses and ``σ`` their robust standard
    deviation, it fires iff::

        median(gradient norms) ≤ collapse·g₀,   L₀ − m₂ < max(3σ, 5 %·|L₀|)
        and  m₁ − m₂ ≤ 2·se                 (the loss is flat)

    with ``m₁``, ``m₂`` the medians of the first and second half of the losses and ``se``
    the standard error of their difference. A healthy run whose gradient shrinks has moved
    its loss far from ``L₀``, or is still moving it; a run that sits at ``L₀`` with a
    gradient that has not collapsed may just be slow. The window is long (100 steps): a
    regression at a sound learning rate halves its gradient within 20 steps while its
    noisy loss has not yet moved by 3σ (the divergence suite's diabetes task, batch 64),
    and over 50 steps its slow fall can still hide in the noise; a dead network is
    caught a little later, and rolled back to the snapshot taken before its first step (the
    detection's ``onset`` is the first step this rule saw). After
    firing the window is cleared (a rollback restores the detector with the weights).

    Args:
        signal: Name of the monitored quantity (default ``"grad_norm"``).
        trend: The optimizer's :class:`LossTrend` (the losses).
        collapse: Fraction of the first gradient norm that counts as collapsed, in (0, 1).
        window: Values judged together (int ≥ 3).

    Raises:
        ValueError: If an argument is outside its range (the message names it).

    Example:
        >>> trend = LossTrend()
        >>> dead = DeadStartDetector(trend=trend, window=5)
        >>> events = []
        >>> for t, (loss, grad) in enumerate([(2.30, 0.6)] + [(2.31, 0.1)] * 5):
        ...     _ = trend.update(t, loss)
        ...     events.append(dead.update(t, grad))
        >>> [(e.step, e.kind, e.signal) for e in events if e]
        [(4, 'divergence', 'grad_norm')]
    """

    kind: ClassVar[str] = "divergence"

    def __init__(self, signal: str = "grad_norm", *, trend: LossTrend,
                 collapse: float = 0.5, window: int = 100) -> None:
        super().__init__(signal)
        if not isinstance(trend, LossTrend):
            raise invalid("trend", trend, "a LossTrend")
        self.trend = trend
        self.collapse: float = check_real("collapse", collapse, low=0.0, high=1.0)
        self.window: int = check_int("window", window, 3)
        self.reset()

    @property
    def first(self) -> float | None:
        """The first value (the gradient norm before any step; ``None`` before it)."""
        return self._first

    def reset(self) -> None:
        """Forget the first gradient norm and the window."""
        self._first: float | None = None
        self._first_step: int | None = None
        self._values: deque[float] = deque(maxlen=self.window)
        self._low = 0  # values in the window at or below collapse·first

    def update(self, step: int, value: float) -> Detection | None:
        """Feed one gradient norm; fire when it collapsed and the loss did not move.

        Args:
            step: Optimizer step the value belongs to.
            value: The gradient norm; non-finite values are ignored.

        Returns:
            A ``"divergence"`` detection or ``None``.
        """
        x = float(value)
        if not math.isfinite(x):
            return None
        if self._first is None:
            self._first, self._first_step = x, int(step)
        low = self.collapse * self._first
        if len(self._values) == self.window and self._values[0] <= low:
            self._low -= 1
        self._values.append(x)
        self._low += x <= low
        start, first = self.trend.start, self._first
        n = len(self._values)
        if n < self.window or start is None or first <= 0.0 or self._low < (n + 1) // 2:
            return None  # (fewer than half at or below collapse·first: the median is above)
        grad = _median(sorted(self._values))
        losses = self.trend.recent(self.window)
        if grad > self.collapse * first or len(losses) < 4:
            return None
        half = len(losses) // 2
        m1, m2, sigma, se = _median_shift(losses[:half], losses[half:])
        if m1 - m2 > 2.0 * se:
            return None  # still falling: a slow run, not a dead one
        if start - m2 >= max(3.0 * sigma, 0.05 * abs(start)):
            return None  # the loss moved from its start: a shrinking gradient is no death
        self._values.clear()
        self._low = 0
        return self._hit(
            step, grad, self.collapse * first,
            f"{self.signal} collapsed to {grad:.3g} ({grad / first:.2g}x its first value "
            f"{first:.3g}) while the loss stayed at {m2:.4g} (start {start:.4g}) for "
            f"{self.window} steps: the network died",
            # never moved from its start: dead since the first update (the first gradient,
            # taken before it, was sound)
            onset=None if self._first_step is None else self._first_step + 1,
        )

    def _get_state(self) -> dict[str, Any]:
        return {"first": self._first, "first_step": self._first_step,
                "values": list(self._values)}

    def _set_state(self, state: dict[str, Any]) -> None:
        first = state.get("first")
        self._first = None if first is None else float(first)
        first_step = state.get("first_step")
        self._first_step = None if first_step is None else int(first_step)
        self._values = deque((float(v) for v in state.get("values", [])), maxlen=self.window)
        low = math.inf if self._first is None else self.collapse * self._first
        self._low = sum(v <= low for v in self._values)


class OvershootDetector(Detector):
    """Fires when an overshoot signal stays beyond its threshold and the loss does not fall.

    Over the last ``window`` finite values ``x_i`` (recorded steps ``s_1 … s_w``), it fires
    iff::

        #{i : x_i beyond threshold} / window ≥ min_fraction   and
        loss condition over [s_1, s_w]  (see :class:`LossTrend`)

    where "beyond" is ``>`` for ``direction="above"`` and ``<`` for ``"below"``. The
    signals it is made for (defaults in :class:`~lr_monitor.guard.bank.DetectorBank`):

    * ``step_quality`` ρ below 0 on descent steps: the step raised the loss of the very
      batch it was computed from;
    * ``overshoot_frac`` above ½: on most steps the new gradient points back along the
      last update (g_t·Δ_{t−1} > 0), i.e. each step jumped past the minimum along it;
    * ``stability_ratio`` far above 1: the sharpness the optimizer sees is far beyond
      what its step size can stably take.

    Each of these also happens on healthy runs for a while (at the edge of stability the
    ratio hovers around 1 and GD reverses every step while the loss keeps falling), which
    is why the loss must not be falling (or must be rising) over the same steps. A window
    whose loss condition fails is kept, so the detector fires on the next value once the
    loss stops falling; after firing the window is cleared.

    Args:
        signal: Name of the monitored quantity.
        threshold: The bound (finite).
        direction: ``"above"`` or ``"below"``: which side of the bound is overshoot.
        window: Values judged together (int ≥ 1).
        min_fraction: Fraction of them that must be beyond the bound, in (0, 1].
        loss: The loss condition: ``"not_falling"``, ``"rising"`` or ``"any"`` (no
            condition).
        trend: The optimizer's :class:`LossTrend` (required unless ``loss="any"``).

    Raises:
        ValueError: If an argument is outside its range, or ``trend`` is missing for a
            loss condition (the message names it).

    Example:
        >>> trend = LossTrend()
        >>> d = OvershootDetector("step_quality", threshold=0.0, direction="below",
        ...                       window=3, trend=trend)
        >>> for t in range(10):
        ...     _ = trend.update(t, 1.0 - 0.01 * t)  # the loss falls: no detection
        ...     assert d.update(t, -0.5) is None
        >>> for t in range(10, 20):
        ...     _ = trend.update(t, 2.0)  # the loss stopped falling
        >>> e = d.update(20, -0.5)
        >>> e.kind, e.signal, e.value
        ('overshoot', 'step_quality', -0.5)
    """

    kind: ClassVar[str] = "overshoot"

    def __init__(self, signal: str, *, threshold: float,
                 direction: Literal["above", "below"], window: int = 5,
                 min_fraction: float = 0.8, loss: LossCondition = "not_falling",
                 trend: LossTrend | None = None) -> None:
        super().__init__(signal)
        self.threshold: float = check_real("threshold", threshold)
        self.direction: str = check_choice("direction", direction, ("above", "below"))
        self.window: int = check_int("window", window, 1)
        self.min_fraction: float = check_real("min_fraction", min_fraction, low=0.0,
                                              high=1.0, high_closed=True)
        self.loss: str = check_choice("loss", loss, ("rising", "not_falling", "any"))
        if loss != "any" and not isinstance(trend, LossTrend):
            raise invalid("trend", trend, f"a LossTrend for loss={loss!r}")
        self.trend = trend
        self.reset()

    def reset(self) -> None:
        """Forget the window."""
        self._steps: deque[int] = deque(maxlen=self.window)
        self._values: deque[float] = deque(maxlen=self.window)

    def _beyond(self, x: float) -> bool:
        return x > self.threshold if self.direction == "above" else x < self.threshold

    def update(self, step: int, value: float) -> Detection | None:
        """Feed one value; return an ``"overshoot"`` detection when both conditions hold.

        Args:
            step: Optimizer step the value belongs to.
            value: The signal's value; non-finite values are ignored.

        Returns:
            A detection (its value: the median of the window) or ``None``.
        """
        x = float(value)
        if not math.isfinite(x):
            return None
        self._steps.append(int(step))
        self._values.append(x)
        if len(self._values) < self.window:
            return None
        fraction = sum(map(self._beyond, self._values)) / self.window
        since = self._steps[0]
        if fraction < self.min_fraction:
            return None
        if self.trend is not None and not self.trend.holds(self.loss, since):  # type: ignore[arg-type]
            return None
        med = _median(sorted(self._values))
        change = None if self.trend is None else self.trend.change(since)
        self.reset()
        side = ">" if self.direction == "above" else "<"
        loss_text = "" if change is None else (
            f"; the loss's median went {change[2]:.4g} -> {change[2] + change[0]:.4g}")
        return self._hit(
            step, med, self.threshold,
            f"{self.signal} {side} {self.threshold:g} on {fraction:.0%} of the last "
            f"{self.window} values (steps {since}-{step}, median {med:.3g}){loss_text}: "
            f"the steps overshoot",
            onset=since,
        )

    def _get_state(self) -> dict[str, Any]:
        return {"steps": list(self._steps), "values": list(self._values)}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._steps = deque((int(s) for s in state["steps"]), maxlen=self.window)
        self._values = deque((float(v) for v in state["values"]), maxlen=self.window)


class RecoveryWatch(Detector):
    """After a cut: fires when the loss does not resume falling within ``window`` steps.

    A cut of the learning rate (with or without a rollback) is a bet that shorter steps
    fix the run; one cut of ×0.1 leaves a ×100 learning rate still ×10 too high, and the
    run may then sit at a bad level without a spike or a divergence, because the
    divergence rule judges the new regime after the cut. :meth:`arm` starts the watch;
    over the next ``window`` finite values, with the medians ``m₁``, ``m₂`` of their first
    and second half and ``σ`` their robust standard deviation (1.4826·MAD about each
    half's median), the run has recovered iff::

        m₁ − m₂ > z·1.2533·σ·√(1/n₁ + 1/n₂)     (it resumed falling; = √(4/window) for halves)

    where ``best`` and ``start`` are the run's best smoothed loss before the trouble and its
    starting level, given to :meth:`arm`. Otherwise it fires once (``"divergence"``; the
    guard's next cut arms it again, so recovery goes on until the run is healthy or
    ``max_cuts`` escalates) — but only at a bad level: nearer ``start`` than ``best``
    (``m₂ > best + ½·(start − best)``), or, without progress before the trouble, no lower
    than ``start − z·σ``. A run that was cut when it was already near its floor cannot
    fall much further and is left alone; so is a run that merely falls slowly at the new,
    smaller learning rate through a noisy loss.

    Args:
        signal: Name of the monitored quantity (default ``"loss"``).
        window: Steps watched after a cut (int ≥ 4).
        z: Noise deviations a fall, or the distance to the best, is judged by (> 0).

    Raises:
        ValueError: If an argument is outside its range (the message names it).

    Example:
        >>> watch = RecoveryWatch(window=10)
        >>> watch.arm(100, best=0.4, start=2.3)
        >>> [watch.update(100 + t, 2.3) for t in range(9)] == [None] * 9
        True
        >>> watch.update(109, 2.3).kind  # stuck at chance after the cut
        'divergence'
        >>> watch.arm(110, best=0.4, start=2.3)
        >>> any(watch.update(110 + t, 2.3 - 0.1 * t) for t in range(10))  # falls again
        False
    """

    kind: ClassVar[str] = "divergence"

    def __init__(self, signal: str = "loss", window: int = 40, z: float = 3.0) -> None:
        super().__init__(signal)
        self.window: int = check_int("window", window, 4)
        self.z: float = check_real("z", z, low=0.0)
        self.reset()

    @property
    def armed(self) -> bool:
        """Whether a watch is running."""
        return self._since is not None

    def reset(self) -> None:
        """Stop watching."""
        self._since: int | None = None
        self._best: float | None = None
        self._start: float | None = None
        self._values: list[float] = []

    def arm(self, step: int, *, best: float | None, start: float | None) -> None:
        """Start watching the steps after a cut at ``step``.

        Args:
            step: The step of the cut.
            best: The run's best smoothed loss before the trouble (``None``: unknown).
            start: The run's starting level (``None``: unknown).
        """
        self._since, self._values = int(step), []
        self._best = None if best is None or not math.isfinite(best) else float(best)
        self._start = None if start is None or not math.isfinite(start) else float(start)

    def update(self, step: int, value: float) -> Detection | None:
        """Feed one value; at the end of the watch, fire unless the run recovered.

        Args:
            step: Optimizer step the value belongs to.
            value: The loss; non-finite values are ignored.

        Returns:
            A ``"divergence"`` detection or ``None``.
        """
        x = float(value)
        if self._since is None or not math.isfinite(x):
            return None
        self._values.append(x)
        if len(self._values) < self.window:
            return None
        half = self.window // 2
        first, second = self._values[:half], self._values[half:]
        since, best, start = self._since, self._best, self._start
        self.reset()
        m1, m2, sigma, se = _median_shift(first, second)
        if m1 - m2 > self.z * se:
            return None  # falling again
        if start is None:
            return None  # nothing to judge the level by
        if best is not None and start - best > self.z * sigma:
            if m2 <= best + 0.5 * (start - best):
                return None  # nearer its healthy best than its start: recovering
        elif m2 < start - self.z * sigma:
            return None  # no progress before the trouble, but some now
        best_text = "" if best is None else f", best before {best:.4g}"
        return self._hit(
            step, m2, m1,
            f"{self.signal} did not resume falling in the {self.window} steps after the cut "
            f"at step {since}: median {m1:.4g} -> {m2:.4g}{best_text}",
            onset=since,
        )

    def _get_state(self) -> dict[str, Any]:
        return {"since": self._since, "best": self._best, "start": self._start,
                "values": list(self._values)}

    def _set_state(self, state: dict[str, Any]) -> None:
        since = state.get("since")
        self._since = None if since is None else int(since)
        self._best = None if state.get("best") is None else float(state["best"])
        self._start = None if state.get("start") is None else float(state["start"])
        self._values = [float(v) for v in state.get("values", [])]
