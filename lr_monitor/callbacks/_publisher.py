"""What every measuring callback shares: subscribers of its records and a fault record.

:class:`Publisher` is the base of :class:`~lr_monitor.StepSizeMonitor`,
:class:`~lr_monitor.StepQualityMonitor` and :class:`~lr_monitor.SharpnessMonitor`: each
publishes :class:`~lr_monitor.recording.StepRecord` s to the listeners of
:meth:`Publisher.subscribe` (the guard subscribes), and runs its stages behind a
:class:`~lr_monitor.faults.FaultBarrier` whose faults go to the run's record (a log line
and ``events.jsonl``), opened on the first fault.
"""

from __future__ import annotations

from lr_monitor.alerts import AlertSink, close_sinks, dispatch, make_default_sinks
from lr_monitor.callbacks._compat import pl, run_dir
from lr_monitor.events import GuardEvent
from lr_monitor.faults import FaultBarrier
from lr_monitor.recording.record import Listeners, RecordListener, StepRecord

__all__ = ["Publisher"]


class Publisher(pl.Callback):
    """A callback that publishes step records and reports its own faults.

    Args:
        component: The name in fault reports (the class name).
    """

    def __init__(self, component: str) -> None:
        self._trainer: pl.Trainer | None = None
        self._listeners = Listeners()
        self._sinks: list[AlertSink] | None = None
        self.faults = FaultBarrier(component, report=self._report_fault,
                                   step=self._current_step)

    def subscribe(self, listener: RecordListener) -> None:
        """Call ``listener(record)`` with every record, on every rank (once, however often added).

        Args:
            listener: A callable taking a :class:`~lr_monitor.recording.StepRecord`. A
                listener that raises is reported once and switched off; the others and
                training go on.

        Raises:
            ValueError: if ``listener`` is not callable.
        """
        self._listeners.subscribe(listener)

    def unsubscribe(self, listener: RecordListener) -> None:
        """Stop calling ``listener`` (nothing happens if it was not subscribed).

        Args:
            listener: A listener given to :meth:`subscribe`.
        """
        self._listeners.unsubscribe(listener)

    def _publish(self, record: StepRecord, source: str | None = None) -> None:
        """Hand ``record`` to the listeners (``source`` names it in fault reports)."""
        self._listeners.publish(record, self.faults, source or record.optimizer)

    def _current_step(self) -> int | None:
        return None if self._trainer is None else self._trainer.global_step

    def _report_fault(self, event: GuardEvent) -> None:
        """Send a fault record to the run's record (log line and ``events.jsonl``)."""
        trainer = self._trainer
        if self._sinks is None:
            self._sinks = make_default_sinks(
                None if trainer is None else run_dir(trainer),
                is_rank_zero=lambda: trainer is None or trainer.is_global_zero)
        dispatch(self._sinks, event)

    def _close_fault_record(self) -> None:
        """Flush and close the fault record's sinks (at teardown)."""
        if self._sinks:
            close_sinks(self._sinks, timeout=5.0)
        self._sinks = None
