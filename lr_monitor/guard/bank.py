"""The guard's detectors, one stream per optimizer: rounds, recorded statistics, rebase, state.

Framework-free. A :class:`DetectorBank` is built from the guard's detector settings and
holds one :class:`DetectorStream` per optimizer: in manual optimization with several
optimizers, each optimizer's losses and gradients are judged on their own. Each stream has

* the step detectors, run by :meth:`DetectorBank.detect` in three rounds — non-finite
  values first, then the loss explosion, then spikes and divergence. A round that fires
  ends the step: a NaN is not also a spike, and an exploded loss does not enter the
  spike and divergence baselines. Each detector reads the value named by its
  :attr:`~lr_monitor.guard.detectors.Detector.signal` (:data:`~lr_monitor.guard.signals.LOSS`,
  :data:`~lr_monitor.guard.signals.GRAD_NORM`); a signal missing from the step's values
  (no backward pass, gradient norm not watched) leaves its detectors alone;
* the detectors of recorded statistics (``update_cosine`` →
  :class:`~lr_monitor.guard.detectors.OscillationDetector`, ``update_ratio`` →
  :class:`~lr_monitor.guard.detectors.UpdateRatioDetector`, and the overshoot signals →
  :class:`~lr_monitor.guard.detectors.OvershootDetector`, see :data:`OVERSHOOT_RULES`),
  fed by :meth:`DetectorBank.observe` from the ``global`` row of a
  :class:`~lr_monitor.recording.record.StepRecord`. The overshoot detectors ask the
  stream's :class:`~lr_monitor.guard.detectors.LossTrend` (fed every step's loss in the
  first round; it never fires) whether the loss fell over the steps they judge.

State: :meth:`DetectorBank.state_dict` is a list with one ``{name: detector state}`` dict
per stream (the names are the stream's keys, e.g. ``"spike/loss"``) — the format of the
guard's checkpoints and snapshots since 0.1.

Example:
    >>> bank = DetectorBank(spike_window=20)
    >>> [bank.detect(0, t, {"loss": 2.0 - 0.01 * t, "grad_norm": 1.0}) for t in range(3)]
    [[], [], []]
    >>> [(d.kind, d.signal) for d in bank.detect(0, 3, {"loss": 40.0, "grad_norm": 1.0})]
    [('divergence', 'loss')]
    >>> [(d.kind, d.signal) for d in bank.detect(0, 4, {"loss": float("nan")})]
    [('nonfinite', 'loss')]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from lr_monitor._validation import check_int, check_real, invalid
from lr_monitor.events import Detection
from lr_monitor.guard.detectors import (
    DeadStartDetector,
    Detector,
    DivergenceDetector,
    ExplosionDetector,
    LossTrend,
    NonFiniteDetector,
    OscillationDetector,
    OvershootDetector,
    RecoveryWatch,
    SpikeDetector,
    UpdateRatioDetector,
)
from lr_monitor.guard.signals import GRAD_NORM, LOSS, Tripwire

if TYPE_CHECKING:
    from lr_monitor.recording.record import StepRecord

__all__ = ["DEFAULT_OVERSHOOT_RULES", "OVERSHOOT_RULES", "SPIKE_FLOOR", "TREND_SPAN",
           "DetectorBank", "DetectorStream"]

#: Warm-up (values) of the spike and divergence detectors, capped by the spike window.
_WARMUP = 20

#: The explosion factor of a quiet loss (the noise sets it between this and
#: ``explosion_factor``): the sensitivity sweep's best (``docs/guard.md``).
_MIN_EXPLOSION_FACTOR = 4.0

#: A spike of the loss (gradient norm) below this share of its starting level (first
#: value) is left alone: too small to hurt the weights (see ``_harmless_spike``).
SPIKE_FLOOR = 0.1

#: A run that has given back this share of its progress (smoothed loss back near the
#: starting level) has diverged, wherever its best was.
_GIVEBACK = 0.9

#: The overshoot rules: signal → :class:`~lr_monitor.guard.detectors.OvershootDetector`
#: arguments. Each is fed only when a callback records the signal
#: (``StepQualityMonitor``; ``StepSizeMonitor(consecutive=True)``; ``SharpnessMonitor``);
#: why these bounds and how often they fire on healthy runs: ``docs/guard.md``.
OVERSHOOT_RULES: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    # ρ < 0 on descent steps: the step raised the loss of its own batch.
    "step_quality": MappingProxyType(dict(threshold=0.0, direction="below", window=5,
                                          min_fraction=0.8, loss="not_falling")),
    # g_t·Δ_{t−1} > 0 on most steps of each recorded interval, and the loss going up.
    # Opt-in: with "not falling" it fired on 29 of 60 long healthy mini-batch runs, with
    # "rising" on 9 of 12 healthy full-batch runs at the edge of stability (docs/guard.md).
    "overshoot_frac": MappingProxyType(dict(threshold=0.5, direction="above", window=3,
                                            min_fraction=1.0, loss="rising")),
    # λ well beyond the optimizer's stability threshold, and the loss going up.
    "stability_ratio": MappingProxyType(dict(threshold=4.0, direction="above", window=2,
                                             min_fraction=1.0, loss="rising")),
})

#: The overshoot rules a guard uses unless told otherwise: the two that never fired on a
#: healthy run of the benchmarks (``docs/guard.md``).
DEFAULT_OVERSHOOT_RULES = ("step_quality", "stability_ratio")

#: Steps over which the loss trend is judged at least (against as many before): a
#: mini-batch loss needs that many values before the median of a span stops following the
#: noise; over fewer, the trend of a healthy run at a plateau reads "not falling" far too
#: often (measured: ``docs/guard.md``).
TREND_SPAN = 50

#: ρ means "the step overshot" only when the step pointed downhill on its batch: the
#: step-quality rule is fed only records whose slope g·Δ is negative.
_RHO, _SLOPE = "step_quality", "step_slope"


class DetectorStream(Mapping[str, Detector]):
    """The detectors of one optimizer, by name (``"spike/loss"``), in the order they run.

    Args:
        rounds: The step detectors, by name, one mapping per round.
        recorded: The detectors of recorded statistics, by name.
    """

    def __init__(self, rounds: Sequence[Mapping[str, Detector]],
                 recorded: Mapping[str, Detector]) -> None:
        self.rounds: tuple[tuple[Detector, ...], ...] = tuple(
            tuple(r.values()) for r in rounds)
        self.recorded: tuple[Detector, ...] = tuple(recorded.values())
        self._by_name: dict[str, Detector] = {}
        for part in (*rounds, recorded):
            self._by_name.update(part)

    def __getitem__(self, name: str) -> Detector:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"DetectorStream({list(self._by_name)})"

    @property
    def divergence(self) -> list[DivergenceDetector]:
        """The divergence detectors of this stream (rebased after a cut)."""
        return [d for d in self._by_name.values() if isinstance(d, DivergenceDetector)]


class DetectorBank:
    """The detectors of every optimizer, built from the guard's settings.

    Args:
        spike_window: Values in the spike detectors' robust baseline (int ≥ 3).
        spike_threshold: Robust z-score above which a value is a spike (> 0).
        explosion_factor: A loss this many times its starting level is a divergence at
            once; three in a row above the noise-relative factor (at least
            ``min(4, explosion_factor)``) are too (> 1).
        divergence_patience: Steps the smoothed loss must stay above its bound (int ≥ 1).
        overshoot_rules: The signals of :data:`OVERSHOOT_RULES` whose overshoot detector
            runs (each also needs a callback recording its signal).

    Raises:
        ValueError: If an argument is outside its range (the message names it).
    """

    def __init__(self, *, spike_window: int = 100, spike_threshold: float = 8.0,
                 explosion_factor: float = 10.0, divergence_patience: int = 20,
                 overshoot_rules: Sequence[str] = DEFAULT_OVERSHOOT_RULES) -> None:
        self.spike_window: int = check_int("spike_window", spike_window, 3)
        self.spike_threshold: float = check_real("spike_threshold", spike_threshold, low=0.0)
        self.explosion_factor: float = check_real("explosion_factor", explosion_factor,
                                                  low=1.0)
        self.divergence_patience: int = check_int("divergence_patience",
                                                  divergence_patience, 1)
        self.overshoot_rules: tuple[str, ...] = check_rules("overshoot_rules", overshoot_rules)
        self.streams: list[DetectorStream] = [self._make_stream()]

    def _make_stream(self) -> DetectorStream:
        window, warmup = self.spike_window, min(_WARMUP, self.spike_window)
        trend = LossTrend(LOSS, min_span=TREND_SPAN)
        rounds: list[dict[str, Detector]] = [
            {"trend/loss": trend,
             "nonfinite/loss": NonFiniteDetector(LOSS),
             "nonfinite/grad_norm": NonFiniteDetector(GRAD_NORM)},
            {"explosion/loss": ExplosionDetector(
                LOSS, factor=self.explosion_factor,
                min_factor=min(_MIN_EXPLOSION_FACTOR, self.explosion_factor))},
            {"spike/loss": SpikeDetector(LOSS, window=window, warmup=warmup,
                                         threshold=self.spike_threshold, min_rel_increase=1.0),
             "divergence/loss": DivergenceDetector(LOSS, patience=self.divergence_patience,
                                                   warmup=_WARMUP, progress=0.25,
                                                   giveback=_GIVEBACK),
             "spike/grad_norm": SpikeDetector(GRAD_NORM, window=window, warmup=warmup,
                                              threshold=self.spike_threshold,
                                              min_rel_increase=2.0),
             "recovery/loss": RecoveryWatch(LOSS, window=2 * self.divergence_patience),
             "dead/grad_norm": DeadStartDetector(GRAD_NORM, trend=trend)},
        ]
        recorded: dict[str, Detector] = {
            "oscillation/update_cosine": OscillationDetector(),
            "update_ratio/update_ratio": UpdateRatioDetector(),
        }
        for signal in self.overshoot_rules:
            recorded[f"overshoot/{signal}"] = OvershootDetector(signal, trend=trend,
                                                                **OVERSHOOT_RULES[signal])
        return DetectorStream(rounds, recorded)

    def stream(self, index: int) -> DetectorStream:
        """The detectors of optimizer ``index`` (created on first use).

        Args:
            index: The optimizer's position in the trainer's optimizers.

        Returns:
            Its stream.
        """
        while len(self.streams) <= index:
            self.streams.append(self._make_stream())
        return self.streams[index]

    def detect(self, index: int, step: int, values: Mapping[str, float]) -> list[Detection]:
        """Feed one step's signals to optimizer ``index``'s detectors, round by round.

        Args:
            index: The optimizer's position.
            step: The optimizer step the values belong to.
            values: Signal values by name (as from
                :meth:`~lr_monitor.guard.signals.StepSignals.collect`); a missing signal
                leaves its detectors alone.

        Returns:
            The detections of the first round that fired (empty when none did).
        """
        stream = self.stream(index)
        for detectors in stream.rounds:
            found = [d for d in _feed(detectors, step, values.get)
                     if not _harmless_spike(stream, d)]
            found = _paired_spikes(found, values)
            if found:
                return found
        return []

    def tripwires(self, index: int, kinds: Collection[str],
                  signals: Collection[str] = (LOSS, GRAD_NORM)) -> list[Tripwire]:
        """When optimizer ``index``'s next step, by its values alone, trips a rule of ``kinds``.

        The rules that judge one step's values against bounds known beforehand: the
        explosion rule (its :meth:`~lr_monitor.guard.detectors.Detector.tripwire`) and the
        spike rules (their bounds, no lower than the harmless floor, :data:`SPIKE_FLOOR` ×
        the starting level), which fire together: a loss spike and a gradient-norm spike
        in the same step, or either alone when the step has only that signal. The rounds
        are kept: the spikes' condition holds only at or below the explosion bound (above
        it the explosion rule fires first, whatever its action), and no condition holds
        on a non-finite step (the first round's). Compared on the device with the step's
        values, they let the guard skip such a step before the host has read them; the
        detectors, fed the same values a step later from the same state, then fire on
        exactly the steps that tripped.

        Args:
            index: The optimizer's position.
            kinds: Detection kinds whose action skips the step (see
                :meth:`~lr_monitor.guard.policy.GuardPolicy.skipping_kinds`).
            signals: The signals the step will have.

        Returns:
            The conditions (:class:`~lr_monitor.guard.signals.Tripwire`); the step trips
            when one holds.

        Example:
            >>> bank = DetectorBank()
            >>> for t in range(3):
            ...     _ = bank.detect(0, t, {"loss": 2.0, "grad_norm": 1.0})
            >>> [dict(t.above) for t in bank.tripwires(0, {"divergence"})]
            [{'loss': 20.0}]
            >>> bank.tripwires(0, {"spike"})  # the spike rules are still warming up
            []
        """
        stream = self.stream(index)
        out: list[Tripwire] = []
        spikes: dict[str, float] = {}
        first: dict[str, float] = {}  # bounds of the explosion rule, a round before spikes
        for det in stream.values():
            if det.signal not in signals:
                continue
            bound = det.tripwire()
            if bound is None or not math.isfinite(bound):
                continue
            if isinstance(det, ExplosionDetector):
                first[det.signal] = bound
            if det.kind not in kinds:
                continue
            if det.kind == "spike":
                floor = _spike_floor(stream, det.signal)
                spikes[det.signal] = bound if floor is None else max(bound, floor)
            else:
                out.append(Tripwire({det.signal: bound}))
        if spikes and (len(spikes) == 2 or not _pairs(stream, signals)):
            out.append(Tripwire(spikes, first))  # (a warming-up spike rule pairs with nothing)
        return out

    def observe(self, index: int, step: int, record: StepRecord) -> list[Detection]:
        """Feed the statistics of a recorded step to optimizer ``index``'s detectors.

        Args:
            index: The optimizer's position.
            step: The optimizer step the record belongs to.
            record: The recorded step; each detector reads its signal from the ``global``
                row (a statistic missing from the record is skipped).

        Returns:
            The detections, in the stream's order.
        """
        return _feed(self.stream(index).recorded, step, lambda signal: _recorded(record, signal))

    def recovery_reference(self) -> list[tuple[float | None, float | None]]:
        """Per stream, ``(best, start)``: what a :class:`RecoveryWatch` judges recovery by.

        ``best`` is the divergence detector's best smoothed loss, ``start`` the explosion
        rule's starting level (``None`` where unknown). Take it before a rollback and give
        it to :meth:`after_cut`: the restored detectors may know less (a rollback to the
        first step knows neither), and the run did reach that best.

        Returns:
            One pair per stream, in optimizer order.
        """
        out: list[tuple[float | None, float | None]] = []
        for stream in self.streams:
            divergence = stream.divergence
            explosion = stream.get("explosion/loss")
            out.append((divergence[0].best if divergence else None,
                        explosion.level if isinstance(explosion, ExplosionDetector) else None))
        return out

    def after_cut(self, step: int, *, rebase: bool,
                  reference: Sequence[tuple[float | None, float | None]] = ()) -> None:
        """A cut was made at ``step``: watch the recovery, and rebase after a plain cut.

        Each stream's :class:`~lr_monitor.guard.detectors.RecoveryWatch` is armed with the
        best smoothed loss of its divergence detector (before any rebase) and the explosion
        rule's starting level — after a rollback, the lower best and the known start of the
        restored detectors and of ``reference`` (:meth:`recovery_reference` taken before
        the rollback).

        Args:
            step: The step of the cut.
            rebase: Also :meth:`rebase` (a cut that keeps the weights; a rollback restored
                the detectors with the weights instead).
            reference: :meth:`recovery_reference` from before a rollback (``()``: none).
        """
        now = self.recovery_reference()
        for k, stream in enumerate(self.streams):
            watch = stream.get("recovery/loss")
            if not isinstance(watch, RecoveryWatch):
                continue
            best, start = now[k]
            if k < len(reference):
                old_best, old_start = reference[k]
                if old_best is not None and (best is None or old_best < best):
                    best = old_best
                start = start if start is not None else old_start
            watch.arm(step, best=best, start=start)
        if rebase:
            self.rebase()

    def rebase(self) -> None:
        """After a cut that keeps the weights: the detectors judge the new regime.

        Every divergence detector rebases
        (:meth:`~lr_monitor.guard.detectors.DivergenceDetector.rebase`) and every overshoot
        detector forgets the values recorded at the old learning rate.
        """
        for stream in self.streams:
            for det in stream.divergence:
                det.rebase()
            for name in stream:
                if isinstance(stream[name], OvershootDetector):
                    stream[name].reset()

    def healthy(self) -> bool:
        """Whether no smoothed loss is above its divergence bound (a state to return to).

        A run climbing towards a divergence that has not fired yet is no state to snapshot.

        Example:
            >>> bank = DetectorBank()
            >>> bank.healthy()
            True
        """
        for stream in self.streams:
            for det in stream.divergence:
                bound, smoothed = det.bound(), det.smoothed
                if bound is not None and smoothed is not None and smoothed > bound:
                    return False
            if any(isinstance(d, RecoveryWatch) and d.armed for d in stream.values()):
                return False  # still recovering from a cut
        return True

    def state_dict(self) -> list[dict[str, dict[str, Any]]]:
        """One ``{name: detector state}`` dict per stream (plain Python types).

        Returns:
            The states, in optimizer order.
        """
        return [{name: det.state_dict() for name, det in stream.items()}
                for stream in self.streams]

    def load_state_dict(self, state: Sequence[Mapping[str, Mapping[str, Any]]]) -> None:
        """Restore :meth:`state_dict`; streams are created as needed, unknown names ignored.

        Args:
            state: A list from :meth:`state_dict` (or the guard's ``"detectors"`` entry of
                a checkpoint or snapshot, which is the same).
        """
        for index, saved in enumerate(state):
            stream = self.stream(index)
            for name, det_state in saved.items():
                if name in stream:
                    stream[name].load_state_dict(dict(det_state))


def check_rules(arg: str, value: Any) -> tuple[str, ...]:
    """``value`` as a tuple of :data:`OVERSHOOT_RULES` names (a list, tuple or set of them).

    Raises:
        ValueError: ``<arg>=<value> is invalid: must be ...`` for anything else.

    Example:
        >>> check_rules("overshoot_rules", ["step_quality"])
        ('step_quality',)
        >>> check_rules("overshoot_rules", "step_quality")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: overshoot_rules='step_quality' is invalid: must be a list of names from ...
    """
    allowed = tuple(OVERSHOOT_RULES)
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
            isinstance(v, str) and v in allowed for v in value):
        raise invalid(arg, value, f"a list of names from {allowed}")
    return tuple(v for v in allowed if v in value)


def _spike_floor(stream: DetectorStream, signal: str) -> float | None:
    """:data:`SPIKE_FLOOR` × the signal's starting level; a spike up to it is harmless."""
    if signal == LOSS:
        explosion = stream.get("explosion/loss")
        start = explosion.level if isinstance(explosion, ExplosionDetector) else None
    elif signal == GRAD_NORM:
        dead = stream.get("dead/grad_norm")
        start = dead.first if isinstance(dead, DeadStartDetector) else None
    else:
        return None
    return SPIKE_FLOOR * start if start is not None and start > 0 else None


def _pairs(stream: DetectorStream, signals: Collection[str]) -> bool:
    """Whether spikes must come in pairs: the stream watches both signals and has both."""
    return all(s in signals and f"spike/{s}" in stream for s in (LOSS, GRAD_NORM))


def _paired_spikes(found: list[Detection], values: Mapping[str, float]) -> list[Detection]:
    """Spikes count only when the loss and the gradient norm spiked in the same step.

    A batch whose loss and gradient are both far outside their recent range is the
    signature of a bad batch, and its update is the one worth dropping. Either alone is
    the noise of a healthy run: near zero loss a single hard batch spikes the loss 20–100×
    with an ordinary gradient (the digits CNN under Adam: hundreds of skips over 1,000
    steps), and a batch of 8 spikes the gradient norm of a transformer with an ordinary
    loss (the character GPT: 3 of 5 healthy runs touched) — measured in
    ``docs/benchmarks.md``. When the step has only one of the two signals (no loss for a
    second optimizer, or the gradient norm not watched), that one spike counts.
    """
    spiked = {d.signal for d in found if d.kind == "spike"}
    if not spiked or spiked >= {LOSS, GRAD_NORM} or not (LOSS in values and GRAD_NORM in values):
        return found
    return [d for d in found if d.kind != "spike"]


def _harmless_spike(stream: DetectorStream, detection: Detection) -> bool:
    """A spike too small to matter: at most :data:`SPIKE_FLOOR` of where the run started.

    Near convergence a loss of 1e-3 spikes to 0.05 and back every few steps on healthy
    runs (the digits CNN under Adam: hundreds of skipped steps over 1,000 steps): many
    times the recent level, but a twentieth of the starting loss, and its gradient no
    larger than those of the first steps, which the learning rate was chosen for. The
    same for the gradient norm against its first value.
    """
    if detection.kind != "spike":
        return False
    floor = _spike_floor(stream, detection.signal)
    return floor is not None and detection.value <= floor


def _recorded(record: StepRecord, signal: str) -> float | None:
    """A recorded statistic for its detector; ρ only on descent steps (``step_slope < 0``)."""
    if signal == _RHO:
        slope = record.value(_SLOPE)
        if slope is None or not slope < 0.0:
            return None
    return record.value(signal)


def _feed(detectors: Sequence[Detector], step: int,
          value_of: Callable[[str], float | None]) -> list[Detection]:
    """Update each detector with its signal's value (skipped when there is none)."""
    found = []
    for det in detectors:
        value = value_of(det.signal)
        if value is not None:
            hit = det.update(step, value)
            if hit is not None:
                found.append(hit)
    return found
