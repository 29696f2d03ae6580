"""The records that flow from detectors through the guard to the alert sinks.

A detector (:mod:`lr_monitor.guard.detectors`) returns a :class:`Detection` when a signal
crosses its threshold. The guard (:class:`lr_monitor.DivergenceGuard`) decides what
to do about it and turns it into a :class:`GuardEvent`, which carries the actions
taken and the learning rates before and after. Alert sinks (:mod:`lr_monitor.alerts`)
receive only :class:`GuardEvent` objects; the JSON Lines file stores
:meth:`GuardEvent.to_dict` one object per line, and :meth:`GuardEvent.from_dict`
reads it back.

Example:
    >>> d = Detection(step=12, kind="spike", signal="loss", value=51.0, threshold=4.2)
    >>> e = GuardEvent.from_detection(d, actions=("cut_lr",), lr_before={"Adam/pg0": 0.1},
    ...                               lr_after={"Adam/pg0": 0.05}, lr_scale=0.5, time=0.0)
    >>> e.to_dict()["actions"]
    ['cut_lr']
    >>> GuardEvent.from_dict(e.to_dict()) == e
    True
"""

from __future__ import annotations

import contextlib
import math
import time as _time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from lr_monitor._validation import invalid

__all__ = ["DETECTION_KINDS", "Action", "Detection", "GuardEvent"]


class Action(str, Enum):
    """What the guard does about a detection, from the least to the most severe.

    One vocabulary for the policy (``on_spike="skip"``), the events (:attr:`GuardEvent.actions`,
    ``events.jsonl``), the report and the plots. The members are ordered by severity:
    when several detectors fire at one step the most severe action wins. ``value`` is what
    the event log records; :meth:`parse` also accepts the member name in lower case
    (``"cut"`` for :attr:`CUT`, as the policy arguments are written).

    * ``LOG`` — record the detection, change nothing. An event whose only action is to
      record has empty ``actions``.
    * ``SKIP`` — drop this step's gradients: parameters and moments stay bit-identical.
    * ``CUT`` — multiply every learning rate by the guard's factor (survives schedulers).
    * ``ROLLBACK`` — restore an in-memory snapshot, skip this step, then cut.
    * ``STOP`` — end training (``trainer.should_stop``).
    * ``DISABLE`` — not a policy choice: a component of lr-monitor raised and that part of
      it was switched off (:mod:`lr_monitor.faults`).
    * ``RESET`` — not a policy choice: a rollback was asked for but no usable snapshot was
      held, so the optimizer state (moments, step count) of the parameters whose state was
      non-finite was dropped; the optimizer starts them afresh at its next step.

    Example:
        >>> Action.parse("cut"), Action.parse("cut_lr").value
        (<Action.CUT: 'cut_lr'>, 'cut_lr')
        >>> max(Action.SKIP, Action.ROLLBACK, key=Action.severity)
        <Action.ROLLBACK: 'rollback'>
    """

    LOG = "log"
    SKIP = "skip"
    CUT = "cut_lr"
    ROLLBACK = "rollback"
    STOP = "stop"
    DISABLE = "disable"
    RESET = "reset_state"

    def __str__(self) -> str:
        return self.value

    def severity(self) -> int:
        """Rank by severity (``LOG`` lowest); ``DISABLE`` and ``RESET`` rank with ``LOG``."""
        return _ORDER.index(self) if self in _ORDER else 0

    @property
    def label(self) -> str:
        """The name users write in the policy arguments: ``"cut"`` for :attr:`CUT`."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: object) -> Action:
        """The action named ``text``: a member, its value or its lower-case name.

        Raises:
            ValueError: for anything else.
        """
        if isinstance(text, cls):
            return text
        if isinstance(text, str):
            for a in cls:
                if text in (a.value, a.label):
                    return a
        raise ValueError(f"{text!r} is not an action: one of "
                         f"{', '.join(repr(a.label) for a in cls)}")

    @classmethod
    def policy_choices(cls) -> tuple[str, ...]:
        """The names a policy argument accepts, by severity: log, skip, cut, rollback, stop."""
        return tuple(a.label for a in _ORDER)


_ORDER = (Action.LOG, Action.SKIP, Action.CUT, Action.ROLLBACK, Action.STOP)
_ACTION_BY_VALUE = {a.value: a for a in Action}

#: Every value of :attr:`Detection.kind`, one per detector.
DETECTION_KINDS = ("nonfinite", "spike", "divergence", "oscillation", "update_ratio",
                   "overshoot")


@dataclass(frozen=True)
class Detection:
    """One signal crossing its threshold at one step.

    Args:
        step: The optimizer step (``trainer.global_step`` in Lightning) the value belongs to.
        kind: Which detector fired; one of :data:`DETECTION_KINDS`.
        signal: The monitored quantity, e.g. ``"loss"``, ``"grad_norm"``, ``"update_cosine"``.
        value: The value that crossed the threshold (may be ``nan``/``inf``).
        threshold: The threshold it crossed, in the units of ``value``.
        message: A one-line human explanation.
        onset: The first step of the evidence (``None``: ``step`` itself). A rule that
            judges a window or waits ``patience`` steps fires after the trouble began; a
            rollback goes back to a snapshot taken before ``onset``.
    """

    step: int
    kind: str
    signal: str
    value: float
    threshold: float
    message: str = ""
    onset: int | None = None

    @property
    def first_step(self) -> int:
        """:attr:`onset`, or :attr:`step` when the evidence is the step itself."""
        return self.step if self.onset is None else min(self.onset, self.step)

    def __post_init__(self) -> None:
        if self.kind not in DETECTION_KINDS:
            raise invalid("kind", self.kind, f"one of {DETECTION_KINDS}")


def _json_float(x: float) -> float | str:
    """JSON has no nan/inf: store them as the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    return x if math.isfinite(x) else str(x)


def _actions(value: object) -> tuple[Action | str, ...]:
    """``value`` as a tuple: :class:`Action` members where the value is one, else the string.

    Strings that name no action (written by another version) are kept, never guessed.
    """
    items = None
    if not isinstance(value, (str, bytes, Mapping)) and isinstance(value, Iterable):
        items = tuple(value)
    if items is None or not all(isinstance(a, str) for a in items):
        raise invalid("actions", value if items is None else list(items),
                      "a sequence of action names (strings)")
    return tuple(a if isinstance(a, Action) else _ACTION_BY_VALUE.get(a, a) for a in items)


# Readers of a stored event (GuardEvent.from_dict): each raises ValueError naming the key.


def _read_int(key: str, x: object, low: int) -> int:
    """A stored integer in ``[low, 2**63 - 1]`` (an integral float such as ``3.0`` too).

    ``step`` starts at -1 (a fault before the first step), ``epoch`` at 0; the top is
    int64's, so every stored step fits the readers' arrays.
    """
    if isinstance(x, float) and math.isfinite(x) and x.is_integer():
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, int) or not low <= x < 2**63:
        raise invalid(key, x, f"an integer in [{low}, 2**63 - 1]")
    return x


def _read_float(key: str, x: object, *, null: bool = False) -> float:
    """A stored real number: a JSON number or ``"nan"``/``"inf"``/``"-inf"``.

    With ``null``, JSON null also stands for nan (as for ``value`` and learning rates).
    """
    if x is None and null:
        return math.nan
    if isinstance(x, (int, float, str)) and not isinstance(x, bool):
        try:
            return float(x)
        except (ValueError, OverflowError):
            pass
    raise invalid(key, x, 'a number, "nan", "inf" or "-inf"' + (" or null" if null else ""))


def _read_finite(key: str, x: object, low: float = -math.inf) -> float:
    """A stored finite number ``>= low`` (``lr_scale``, ``time``)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        with contextlib.suppress(OverflowError):
            value = float(x)
            if math.isfinite(value) and value >= low:
                return value
    raise invalid(key, x, "a finite number" + (f" >= {low:g}" if low > -math.inf else ""))


def _read_str(key: str, x: object, *, allow_none: bool = False) -> Any:
    if x is None and allow_none:
        return None
    if not isinstance(x, str):
        raise invalid(key, x, "a string" + (" or null" if allow_none else ""))
    return x


def _read_lrs(key: str, x: object) -> dict[str, float]:
    if not isinstance(x, dict) or not all(isinstance(k, str) for k in x):
        raise invalid(key, x, "an object of learning rates by group")
    return {k: _read_float(f"{key}[{k!r}]", v, null=True) for k, v in x.items()}


@dataclass(frozen=True)
class GuardEvent:
    """A decision of the guard: what was detected and what was done about it.

    Args:
        step: Optimizer step of the detection.
        kind: Detector kind (see :data:`DETECTION_KINDS`), or ``"fault"``
            (:mod:`lr_monitor.faults`).
        signal: The monitored quantity.
        value: Its value at ``step``.
        threshold: The threshold it crossed.
        message: One-line explanation.
        actions: What the guard did, in order: :class:`Action` members (``"skip"``,
            ``"rollback"``, ``"cut_lr"``, ``"stop"``, ``"disable"``; they compare equal to
            these strings). Empty when the detection was only recorded. Strings that name
            no :class:`Action` (from a file written by another version) are kept as they are.
        lr_before: Learning rate per ``"<optimizer>/<group>"`` before the actions.
        lr_after: Learning rate per ``"<optimizer>/<group>"`` after the actions.
        lr_scale: The guard's cumulative LR multiplier after the actions (1.0 = no cut).
        epoch: Trainer epoch, when known.
        time: Unix time of the decision.
        run: Run name/version (e.g. ``"lightning_logs/version_3"``), when known.

    Raises:
        ValueError: If ``actions`` is not a sequence of strings, ``step`` is not an integer
            ≥ −1, ``epoch`` one ≥ 0, or ``lr_scale`` (≥ 0) or ``time`` is not finite.

    Example:
        >>> e = GuardEvent(step=3, kind="spike", signal="loss", value=9.0, threshold=3.0,
        ...                actions=["skip", "cut_lr"], time=0.0)
        >>> e.actions == (Action.SKIP, Action.CUT), e.acted
        (True, True)
        >>> GuardEvent(step=3, kind="spike", signal="loss", value=9.0, threshold=3.0).acted
        False
    """

    step: int
    kind: str
    signal: str
    value: float
    threshold: float
    message: str = ""
    actions: tuple[Action | str, ...] = ()
    lr_before: dict[str, float] = field(default_factory=dict)
    lr_after: dict[str, float] = field(default_factory=dict)
    lr_scale: float = 1.0
    epoch: int | None = None
    time: float = field(default_factory=_time.time)
    run: str | None = None

    def __post_init__(self) -> None:
        # The same checks as a stored event gets: every event can be written and read back.
        object.__setattr__(self, "actions", _actions(self.actions))
        object.__setattr__(self, "step", _read_int("step", self.step, -1))
        if self.epoch is not None:
            object.__setattr__(self, "epoch", _read_int("epoch", self.epoch, 0))
        object.__setattr__(self, "lr_scale", _read_finite("lr_scale", self.lr_scale, low=0.0))
        object.__setattr__(self, "time", _read_finite("time", self.time))

    @property
    def acted(self) -> bool:
        """Whether the guard did something: any action other than :attr:`Action.LOG`.

        ``False`` for a record-only event: empty ``actions``, or ``("log",)`` as guards
        before 0.1 wrote it.
        """
        return any(a != Action.LOG for a in self.actions)

    @classmethod
    def from_detection(cls, detection: Detection, **kwargs: Any) -> GuardEvent:
        """Build an event from a detection plus the guard's decision (keyword fields)."""
        return cls(
            step=detection.step,
            kind=detection.kind,
            signal=detection.signal,
            value=detection.value,
            threshold=detection.threshold,
            message=detection.message,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite floats become strings, actions their values)."""
        d = asdict(self)
        d["actions"] = [str(a) for a in self.actions]
        d["value"] = _json_float(self.value)
        d["threshold"] = _json_float(self.threshold)
        d["lr_before"] = {k: _json_float(v) for k, v in self.lr_before.items()}
        d["lr_after"] = {k: _json_float(v) for k, v in self.lr_after.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuardEvent:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, optional ones default.

        Args:
            d: A dict as :meth:`to_dict` returns it (e.g. one line of ``events.jsonl``).

        Returns:
            The event.

        Raises:
            KeyError: If ``step``, ``kind`` or ``signal`` is missing.
            ValueError: If a known key has a value no event can have, naming the key: a
                wrong type, ``step`` outside ``[-1, 2**63 - 1]``, ``epoch`` outside
                ``[0, 2**63 - 1]``, a non-finite ``time``, a negative or non-finite
                ``lr_scale``.

        Example:
            >>> GuardEvent.from_dict({"step": 1e400, "kind": "spike", "signal": "loss"})
            Traceback (most recent call last):
            ...
            ValueError: step=inf is invalid: must be an integer in [-1, 2**63 - 1]
        """
        epoch = d.get("epoch")
        return cls(
            step=_read_int("step", d["step"], -1),
            kind=_read_str("kind", d["kind"]),
            signal=_read_str("signal", d["signal"]),
            value=_read_float("value", d.get("value"), null=True),
            threshold=_read_float("threshold", d.get("threshold"), null=True),
            message=_read_str("message", d.get("message", ""), allow_none=True) or "",
            actions=_actions(d.get("actions", ())),
            lr_before=_read_lrs("lr_before", d.get("lr_before", {})),
            lr_after=_read_lrs("lr_after", d.get("lr_after", {})),
            lr_scale=_read_finite("lr_scale", d.get("lr_scale", 1.0), low=0.0),
            epoch=None if epoch is None else _read_int("epoch", epoch, 0),
            time=_read_finite("time", d.get("time", 0.0)),
            run=_read_str("run", d.get("run"), allow_none=True),
        )

    def summary(self) -> str:
        """One readable line, e.g. for a log record or a chat message.

        Example:
            >>> GuardEvent(step=4, kind="update_ratio", signal="update_ratio", value=0.31,
            ...            threshold=0.1, time=0.0).summary()
            'step 4: update_ratio on update_ratio = 0.31 (threshold 0.1) -> recorded only'
        """
        acts = ", ".join(str(a) for a in self.actions) if self.acted else "recorded only"
        lr = ""
        if self.lr_before and self.lr_after and self.lr_before != self.lr_after:
            k = next(iter(self.lr_before))
            lr = f"; lr {self.lr_before[k]:.3g} -> {self.lr_after.get(k, float('nan')):.3g}"
            if len(self.lr_before) > 1:
                lr += f" (and {len(self.lr_before) - 1} more groups)"
        return (
            f"step {self.step}: {self.kind} on {self.signal} = {self.value:.4g} "
            f"(threshold {self.threshold:.4g}) -> {acts}{lr}"
        )
