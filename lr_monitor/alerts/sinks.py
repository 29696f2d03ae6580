"""The simple sinks: the log line, the event log file, TensorBoard text; the default pair.

* :class:`LoggingSink` -- one readable line per event on the ``lr_monitor.guard`` logger,
  ``WARNING`` when the guard acted, ``INFO`` when it only recorded.
* :class:`JsonlSink` -- the run's record, ``events.jsonl``: a thin sink over
  :class:`lr_monitor.eventlog.EventLogWriter` (one fsync-ed line per event, rotation).
* :class:`TensorBoardSink` -- the event line as a text summary (TensorBoard's Text tab).
* :func:`make_default_sinks` -- the log line and the event log, which the guard always adds.

Example:
    >>> import os, tempfile
    >>> from lr_monitor.eventlog import read_events
    >>> from lr_monitor.events import GuardEvent
    >>> with tempfile.TemporaryDirectory() as d:
    ...     sinks = make_default_sinks(d, logging=False)
    ...     sinks[0].send(GuardEvent(step=2, kind="spike", signal="loss", value=8.0,
    ...                              threshold=2.0, actions=("skip",), time=0.0))
    ...     sinks[0].close()
    ...     [e.summary() for e in read_events(os.path.join(d, EVENTS_FILENAME))]
    ['step 2: spike on loss = 8 (threshold 2) -> skip']
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from lr_monitor._validation import check_bool, check_int, check_path, check_str, invalid
from lr_monitor.alerts.sink import AlertSink, _check_is_rank_zero, event_line
from lr_monitor.eventlog import (
    DEFAULT_BACKUP_COUNT,
    DEFAULT_MAX_BYTES,
    EVENTS_FILENAME,
    EventLogWriter,
)
from lr_monitor.events import GuardEvent
from lr_monitor.tags import GUARD_EVENTS

__all__ = [
    "GUARD_LOGGER_NAME",
    "JsonlSink",
    "LoggingSink",
    "TensorBoardSink",
    "TextSummaryWriter",
    "make_default_sinks",
]

#: Logger that :class:`LoggingSink` writes the event lines to.
GUARD_LOGGER_NAME = "lr_monitor.guard"


class LoggingSink(AlertSink):
    """One readable line per event on a :mod:`logging` logger.

    Events with actions are logged at ``action_level`` (``WARNING``), record-only events
    (no actions) at ``record_level`` (``INFO``). The record carries the event dict in
    ``record.lr_monitor_event`` for structured handlers.

    Args:
        logger: Logger or logger name; defaults to :data:`GUARD_LOGGER_NAME`.
        action_level: Level for events with actions.
        record_level: Level for record-only events.
        rank_zero: See :class:`~lr_monitor.alerts.AlertSink`.
        is_rank_zero: See :class:`~lr_monitor.alerts.AlertSink`.

    Raises:
        ValueError: If ``logger`` is neither a name nor a ``logging.Logger``, or a level
            is not an int ``>= 0``.

    Example:
        >>> LoggingSink(action_level="WARNING")
        Traceback (most recent call last):
        ...
        ValueError: action_level='WARNING' is invalid: must be an int >= 0
    """

    def __init__(
        self,
        logger: str | logging.Logger = GUARD_LOGGER_NAME,
        *,
        action_level: int = logging.WARNING,
        record_level: int = logging.INFO,
        rank_zero: bool = True,
        is_rank_zero: Callable[[], bool] | None = None,
    ) -> None:
        if not isinstance(logger, (str, logging.Logger)):
            raise invalid("logger", logger, "a logger name or a logging.Logger")
        self.action_level: int = check_int("action_level", action_level, 0)
        self.record_level: int = check_int("record_level", record_level, 0)
        super().__init__(rank_zero=rank_zero, is_rank_zero=is_rank_zero)
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger

    def send(self, event: GuardEvent) -> None:
        """Log :func:`~lr_monitor.alerts.event_line` of ``event``.

        Args:
            event: The event.
        """
        if not self.active():
            return
        level = self.action_level if event.actions else self.record_level
        self.logger.log(level, "%s", event_line(event),
                        extra={"lr_monitor_event": event.to_dict()})

    def __repr__(self) -> str:
        return f"LoggingSink(logger={self.logger.name!r})"


class JsonlSink(AlertSink):
    """Append each event to the run's event log (``events.jsonl``); the run's record.

    A thin sink over :class:`~lr_monitor.eventlog.EventLogWriter`: every line is written
    in one call, flushed and ``os.fsync``-ed before :meth:`send` returns, so a killed
    process loses nothing already decided. The file and its directory are created on the
    first event (on rank zero only). If a previous process was killed mid-write, the
    incomplete last line is removed when the file is reopened. :meth:`close` closes the
    file and the next :meth:`send` reopens it, so the sink serves any number of runs.

    Resume: :meth:`checkpoint` says where the file ends; a run resumed from that
    checkpoint calls :meth:`resume`, which moves the events written after it (by a run
    that was killed, or that went on past the checkpoint) to ``events.superseded.jsonl``
    (:meth:`~lr_monitor.eventlog.EventLogWriter.rewind`): the resumed run decides those
    steps again, and each decision is in ``events.jsonl`` once.

    Rotation: before a line would take the file past ``max_bytes``, ``events.jsonl``
    becomes ``events.jsonl.1`` (``.1`` becomes ``.2`` and so on; the oldest beyond
    ``backup_count`` is deleted), so the disk used stays below
    ``max_bytes * (backup_count + 1)``.

    Args:
        path: The file, e.g. ``<log_dir>/events.jsonl``.
        max_bytes: Rotation size in bytes (default 50 MiB); ``None`` or ``0`` never rotates.
        backup_count: Rotated files kept (``events.jsonl.1`` ... ``.N``), at least 1.
        fsync: ``os.fsync`` after every line (default). Turn off only on file systems
            where fsync is very slow and losing the last events on a crash is acceptable.
        rank_zero: See :class:`~lr_monitor.alerts.AlertSink`.
        is_rank_zero: See :class:`~lr_monitor.alerts.AlertSink`.

    Raises:
        ValueError: If ``max_bytes`` is not an int ``>= 0`` or ``None``, ``backup_count``
            not an int ``>= 1``, or another argument has the wrong type.

    Example:
        >>> import tempfile, os
        >>> from lr_monitor.eventlog import read_events
        >>> with tempfile.TemporaryDirectory() as d:
        ...     sink = JsonlSink(os.path.join(d, "events.jsonl"))
        ...     sink.send(GuardEvent(step=5, kind="spike", signal="loss", value=8.0,
        ...                          threshold=2.0, actions=("cut_lr",), time=0.0))
        ...     sink.close()
        ...     [[str(a) for a in e.actions] for e in read_events(sink.path)]
        [['cut_lr']]
        >>> JsonlSink("events.jsonl", backup_count=1.5)
        Traceback (most recent call last):
        ...
        ValueError: backup_count=1.5 is invalid: must be an int >= 1
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        backup_count: int = DEFAULT_BACKUP_COUNT,
        fsync: bool = True,
        rank_zero: bool = True,
        is_rank_zero: Callable[[], bool] | None = None,
    ) -> None:
        self.writer = EventLogWriter(path, max_bytes=max_bytes, backup_count=backup_count,
                                     fsync=fsync)
        super().__init__(rank_zero=rank_zero, is_rank_zero=is_rank_zero)

    @property
    def path(self) -> Path:
        """The event log file (a :class:`~pathlib.Path`)."""
        return self.writer.path

    @property
    def max_bytes(self) -> int | None:
        """Rotation size in bytes; ``None`` never rotates."""
        return self.writer.max_bytes

    @property
    def backup_count(self) -> int:
        """Rotated files kept."""
        return self.writer.backup_count

    @property
    def fsync(self) -> bool:
        """Whether every line is ``os.fsync``-ed."""
        return self.writer.fsync

    def send(self, event: GuardEvent) -> None:
        """Append ``event`` as one line, flushed and fsync-ed.

        Args:
            event: The event.

        Raises:
            OSError: If the file cannot be written (contained by
                :func:`~lr_monitor.alerts.dispatch`).
        """
        if not self.active():
            return
        self.writer.append(event)

    def flush(self, timeout: float | None = None) -> None:
        """Nothing to do: every :meth:`send` is already on disk.

        Args:
            timeout: Ignored.
        """

    def close(self) -> None:
        """Close the file; a later :meth:`send` reopens it in append mode."""
        self.writer.close()

    def checkpoint(self) -> dict[str, Any] | None:
        """Where the file ends now (:meth:`~lr_monitor.eventlog.EventLogWriter.mark`).

        Returns:
            The mark, or ``None`` on a process that does not write (not rank zero).
        """
        if not self.active():
            return None
        return {"sink": type(self).__name__, **self.writer.mark()}

    def resume(self, saved: Sequence[Mapping[str, Any]]) -> None:
        """Rewind the file to this file's mark in ``saved``, if there is one.

        Args:
            saved: The checkpoint's sink states (:func:`~lr_monitor.alerts.checkpoint_sinks`);
                marks of other files are ignored.

        Raises:
            ValueError: If this file's mark is malformed (contained by
                :func:`~lr_monitor.alerts.resume_sinks`).
            OSError: If the file cannot be rewound.
        """
        if not self.active():
            return
        path = os.path.abspath(self.path)
        for state in saved:
            if state.get("sink") == type(self).__name__ and state.get("path") == path:
                self.writer.rewind(state)

    def __repr__(self) -> str:
        return (f"JsonlSink(path={str(self.path)!r}, max_bytes={self.max_bytes}, "
                f"backup_count={self.backup_count})")


class TextSummaryWriter(Protocol):
    """What :class:`TensorBoardSink` needs: ``torch.utils.tensorboard.SummaryWriter`` fits."""

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> Any:
        """Write a text summary."""


class TensorBoardSink(AlertSink):
    """Write each event as a text summary (TensorBoard's Text tab) at the event's step.

    The guard builds it from ``TensorBoardLogger.experiment``. The writer belongs to
    the logger: :meth:`close` flushes it but does not close it.

    Args:
        writer: A ``SummaryWriter``-like object with ``add_text(tag, text, global_step)``.
        tag: The text tag.
        rank_zero: See :class:`~lr_monitor.alerts.AlertSink`.
        is_rank_zero: See :class:`~lr_monitor.alerts.AlertSink`.

    Raises:
        ValueError: If ``writer`` has no ``add_text`` method or ``tag`` is not a
            non-empty string.

    Example:
        >>> class Writer:
        ...     def add_text(self, tag, text, step):
        ...         print(tag, step, text)
        >>> TensorBoardSink(Writer()).send(GuardEvent(step=7, kind="spike", signal="loss",
        ...     value=10.0, threshold=3.0, actions=("skip",), time=0.0))
        guard/events 7 step 7: spike on loss = 10 (threshold 3) -> skip
    """

    def __init__(
        self,
        writer: TextSummaryWriter,
        *,
        tag: str = GUARD_EVENTS,
        rank_zero: bool = True,
        is_rank_zero: Callable[[], bool] | None = None,
    ) -> None:
        if not callable(getattr(writer, "add_text", None)):
            raise invalid("writer", writer,
                          "an object with add_text(tag, text, global_step), e.g. a SummaryWriter")
        super().__init__(rank_zero=rank_zero, is_rank_zero=is_rank_zero)
        self.writer = writer
        self.tag: str = check_str("tag", tag)

    def send(self, event: GuardEvent) -> None:
        """Add :func:`~lr_monitor.alerts.event_line` as a text summary at ``event.step``.

        Args:
            event: The event.
        """
        if not self.active():
            return
        self.writer.add_text(self.tag, event_line(event), event.step)

    def flush(self, timeout: float | None = None) -> None:
        """Flush the writer if it can be flushed.

        Args:
            timeout: Ignored.
        """
        flush = getattr(self.writer, "flush", None)
        if callable(flush) and self.active():
            flush()

    def close(self) -> None:
        """Flush the writer (it is owned by the logger and stays open)."""
        self.flush()

    def __repr__(self) -> str:
        return f"TensorBoardSink(writer={type(self.writer).__name__}, tag={self.tag!r})"


def make_default_sinks(
    log_dir: str | os.PathLike[str] | None,
    *,
    jsonl: bool = True,
    logging: bool = True,
    filename: str = EVENTS_FILENAME,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    is_rank_zero: Callable[[], bool] | None = None,
) -> list[AlertSink]:
    """The run's record: the log line and the JSONL file (what the guard always adds).

    They stay on when users add other sinks; only these options turn them off.

    Args:
        log_dir: The logger's log directory; ``None`` (no logger) means no JSONL file.
        jsonl: Add :class:`JsonlSink` at ``log_dir/filename``.
        logging: Add :class:`LoggingSink`.
        filename: The event file's name.
        max_bytes: Rotation size of the event file.
        is_rank_zero: Passed to every sink (see :class:`~lr_monitor.alerts.AlertSink`).

    Returns:
        The sinks, logging first.

    Raises:
        ValueError: For an argument of the wrong type (named as typed here).

    Example:
        >>> [type(s).__name__ for s in make_default_sinks("/tmp/run")]
        ['LoggingSink', 'JsonlSink']
        >>> [type(s).__name__ for s in make_default_sinks(None)]
        ['LoggingSink']
    """
    directory = check_path("log_dir", log_dir, allow_none=True)
    check_bool("jsonl", jsonl)
    check_bool("logging", logging)
    check_str("filename", filename)
    check_int("max_bytes", max_bytes, 0, allow_none=True)
    _check_is_rank_zero(is_rank_zero)
    sinks: list[AlertSink] = []
    if logging:
        sinks.append(LoggingSink(is_rank_zero=is_rank_zero))
    if jsonl and directory is not None:
        sinks.append(JsonlSink(directory / filename, max_bytes=max_bytes,
                               is_rank_zero=is_rank_zero))
    return sinks
