"""Never end the run being watched: every stage of the monitor and the guard runs behind a barrier.

A monitoring tool that raises from an optimizer hook or a callback takes the training run
down with it. :class:`FaultBarrier` is the one mechanism that prevents it: the monitor and
the guard run each of their stages through :meth:`FaultBarrier.call`. When a stage raises
an :class:`Exception`,

1. the exception is caught and training goes on;
2. it is reported **once**: a warning with the traceback on the ``lr_monitor`` logger, and
   a :class:`~lr_monitor.events.GuardEvent` of kind :data:`FAULT_KIND` (action
   :data:`FAULT_ACTION`) to the given report function — the callbacks send it to their
   alert sinks, so it lands in ``events.jsonl`` next to the guard's decisions;
3. that stage, for that subject (an optimizer, a parameter), is disabled: later calls
   return ``None`` at once, everything else keeps working.

``KeyboardInterrupt``/``SystemExit`` and other non-``Exception`` errors are never caught.

Example:
    >>> seen = []
    >>> barrier = FaultBarrier("StepSizeMonitor", report=seen.append)
    >>> barrier.call("statistics", lambda: 1 // 0, subject="Adam")  # reported, returns None
    >>> barrier.call("statistics", lambda: 2, subject="Adam") is None  # disabled now
    True
    >>> barrier.call("statistics", lambda: 2, subject="SGD")  # other subjects still run
    2
    >>> seen[0].kind, seen[0].signal, [str(a) for a in seen[0].actions]
    ('fault', 'StepSizeMonitor/statistics', ['disable'])
    >>> print(seen[0].message)  # doctest: +NORMALIZE_WHITESPACE
    StepSizeMonitor: statistics of Adam raised ZeroDivisionError:
    integer division or modulo by zero; disabled for Adam
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lr_monitor.events import Action, GuardEvent

__all__ = ["FAULT_ACTION", "FAULT_KIND", "Fault", "FaultBarrier"]

#: :attr:`GuardEvent.kind` of a fault record.
FAULT_KIND = "fault"
#: The action a fault record carries: the failing stage was disabled for its subject.
FAULT_ACTION = Action.DISABLE

_log = logging.getLogger("lr_monitor")
T = TypeVar("T")


@dataclass(frozen=True)
class Fault:
    """One exception caught inside the monitor or the guard.

    Args:
        component: The callback or recorder it happened in, e.g. ``"StepSizeMonitor"``.
        stage: The stage that raised, e.g. ``"statistics"``.
        subject: What it concerns: an optimizer name, ``"<optimizer> <parameter>"``, or
            ``""`` for the whole component.
        error: ``"<ExceptionType>: <message>"``.
        step: The optimizer step, when known.
    """

    component: str
    stage: str
    subject: str
    error: str
    step: int | None = None

    @property
    def message(self) -> str:
        """One line: where, what, and what was disabled."""
        where = f" of {self.subject}" if self.subject else ""
        what = f"for {self.subject}" if self.subject else "from now on"
        return (f"{self.component}: {self.stage}{where} raised {self.error}; "
                f"disabled {what}")

    def to_event(self) -> GuardEvent:
        """The record of this fault, for the alert sinks and ``events.jsonl``."""
        return GuardEvent(step=-1 if self.step is None else self.step, kind=FAULT_KIND,
                          signal=f"{self.component}/{self.stage}", value=math.nan,
                          threshold=math.nan, message=self.message, actions=(FAULT_ACTION,))


class FaultBarrier:
    """Runs stages so that an exception never escapes; reports and disables instead.

    Args:
        component: Name of the owner, used in every report.
        report: Called with the :class:`GuardEvent` of each fault (once per stage and
            subject). An exception raised by ``report`` itself is logged and swallowed.
        step: Returns the current optimizer step for the record (or ``None``).
    """

    def __init__(self, component: str, *,
                 report: Callable[[GuardEvent], object] | None = None,
                 step: Callable[[], int | None] | None = None) -> None:
        self.component = component
        self.report = report
        self.step = step
        self.faults: list[Fault] = []
        self._disabled: set[tuple[str, str]] = set()

    def disabled(self, stage: str, subject: str = "") -> bool:
        """Whether ``stage`` (for ``subject``, or for the whole component) is disabled."""
        return (stage, subject) in self._disabled or (stage, "") in self._disabled

    def call(self, stage: str, fn: Callable[..., T], *args: Any, subject: str = "",
             **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)``, or ``None`` if it raised or the stage is disabled.

        Args:
            stage: The stage's name (reported, and the unit that gets disabled).
            fn: What to run.
            *args: Its positional arguments.
            subject: What the call concerns (an optimizer or parameter name).
            **kwargs: Its keyword arguments.

        Returns:
            What ``fn`` returned; ``None`` when it raised or the stage is disabled.
        """
        if self.disabled(stage, subject):
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.fail(stage, exc, subject=subject)
            return None

    def fail(self, stage: str, exc: BaseException, *, subject: str = "") -> Fault:
        """Record ``exc`` as a fault of ``stage`` for ``subject``: log, report, disable.

        Returns:
            The :class:`Fault` recorded.
        """
        step = None
        if self.step is not None:
            try:
                step = self.step()
            except Exception:
                step = None
        fault = Fault(self.component, stage, subject, f"{type(exc).__name__}: {exc}", step)
        self.faults.append(fault)
        self._disabled.add((stage, subject))
        _log.warning("%s\n%s", fault.message,
                     "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        if self.report is not None:
            try:
                self.report(fault.to_event())
            except Exception:
                _log.exception("lr_monitor: could not report a fault of %s", self.component)
        return fault
