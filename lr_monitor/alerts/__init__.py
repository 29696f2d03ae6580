"""Alert sinks: where the guard's decisions go.

The guard (:class:`lr_monitor.DivergenceGuard`) turns every decision into a
:class:`~lr_monitor.events.GuardEvent` and hands it to a list of sinks with
:func:`dispatch`. Each sink implements :class:`AlertSink`:

* :class:`LoggingSink` -- one readable line per event on the ``lr_monitor.guard`` logger
  (``WARNING`` when the guard acted, ``INFO`` when it only recorded). On by default.
* :class:`JsonlSink` -- one JSON object per event in ``events.jsonl``, flushed and
  ``fsync``-ed per event, with size-based rotation. On by default; read it back with
  :func:`read_events`.
* :class:`TensorBoardSink` -- the event line as a text summary (TensorBoard's Text tab)
  through any ``SummaryWriter``-like object.
* :class:`WebhookSink` -- an HTTP POST (Slack-compatible or generic JSON) from a
  background thread, rate-limited, with bounded retries; the URL is a secret and is
  never logged, printed or pickled.
* :class:`CallableSink` -- wraps any ``fn(event)``.

Guarantees: no sink blocks training (the webhook only enqueues), no sink exception
reaches the training loop when called through :func:`dispatch`, and on multi-process
runs only rank zero sends anything. This module does not import Lightning.

Example:
    >>> from lr_monitor.events import GuardEvent
    >>> class Broken(AlertSink):
    ...     def send(self, event):
    ...         raise OSError("disk full")
    >>> seen = []
    >>> sinks = [Broken(), CallableSink(seen.append)]
    >>> event = GuardEvent(step=12, kind="spike", signal="loss", value=51.0,
    ...                    threshold=4.2, actions=("cut_lr",), time=0.0)
    >>> dispatch(sinks, event)  # the fault is logged, not raised; the others still run
    1
    >>> [e.step for e in seen]
    [12]
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import http.client
import json
import logging
import math
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Protocol

from lr_monitor.events import GuardEvent

__all__ = [
    "DEFAULT_MAX_BYTES",
    "EVENTS_FILENAME",
    "GUARD_LOGGER_NAME",
    "RANK_ENV_VARS",
    "WEBHOOK_URL_ENV",
    "AlertSink",
    "CallableSink",
    "EventFileError",
    "JsonlSink",
    "LoggingSink",
    "TensorBoardSink",
    "TextSummaryWriter",
    "WebhookFormat",
    "WebhookSink",
    "as_sink",
    "close_sinks",
    "dispatch",
    "env_rank",
    "event_line",
    "is_env_rank_zero",
    "make_default_sinks",
    "read_events",
]

#: Logger that :class:`LoggingSink` writes the event lines to.
GUARD_LOGGER_NAME = "lr_monitor.guard"
#: Default file name of the JSON Lines event record, inside the logger's log directory.
EVENTS_FILENAME = "events.jsonl"
#: Default size at which :class:`JsonlSink` rotates its file (50 MiB).
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
#: Environment variable :class:`WebhookSink` reads its URL from when none is passed.
WEBHOOK_URL_ENV = "LR_MONITOR_WEBHOOK_URL"
#: Environment variables holding the process rank, in the order they are consulted
#: (the same order as Lightning's ``rank_zero_only``).
RANK_ENV_VARS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")

#: ``format`` values of :class:`WebhookSink`.
WebhookFormat = Literal["slack", "json"]

_log = logging.getLogger("lr_monitor.alerts")
_HIDDEN = "<webhook url hidden>"


# --------------------------------------------------------------------------- rank


def env_rank() -> int:
    """The global rank of this process according to the environment.

    The first of :data:`RANK_ENV_VARS` that is set to an integer wins; ``0`` when none is.

    Returns:
        The rank (``0`` on a single-process run).

    Example:
        >>> import os
        >>> env_rank() if not any(v in os.environ for v in RANK_ENV_VARS) else 0
        0
    """
    for name in RANK_ENV_VARS:
        value = os.environ.get(name)
        if value is None or not value.strip():
            continue
        try:
            return int(value)
        except ValueError:
            continue
    return 0


def is_env_rank_zero() -> bool:
    """Whether :func:`env_rank` is ``0``."""
    return env_rank() == 0


# --------------------------------------------------------------------------- base


def event_line(event: GuardEvent) -> str:
    """One readable line for an event: ``[run] summary | message``, never a newline.

    Args:
        event: The event to describe.

    Returns:
        :meth:`GuardEvent.summary`, prefixed with the run name and followed by the
        detector's message when they are known.

    Example:
        >>> e = GuardEvent(step=3, kind="nonfinite", signal="loss", value=float("nan"),
        ...                threshold=0.0, message="loss is nan", actions=("skip",),
        ...                run="version_1", time=0.0)
        >>> event_line(e)
        '[version_1] step 3: nonfinite on loss = nan (threshold 0) -> skip | loss is nan'
    """
    line = event.summary()
    if event.run:
        line = f"[{event.run}] {line}"
    if event.message:
        line = f"{line} | {event.message}"
    return " ".join(line.splitlines())


class AlertSink(abc.ABC):
    """Where guard events go. Subclasses implement :meth:`send`.

    A sink sends only on rank zero by default: ``send`` is expected to return at once
    when :meth:`active` is false. Subclasses must call ``super().__init__``.

    Args:
        rank_zero: Send only from the rank-zero process (default). ``False`` sends from
            every process.
        is_rank_zero: How to tell rank zero; defaults to :func:`is_env_rank_zero`
            (environment variables). The guard can inject e.g.
            ``lambda: trainer.is_global_zero``, which is also right under ``ddp_spawn``.
    """

    def __init__(
        self, *, rank_zero: bool = True, is_rank_zero: Callable[[], bool] | None = None
    ) -> None:
        self.rank_zero = rank_zero
        self.is_rank_zero = is_rank_zero

    def active(self) -> bool:
        """Whether this process should send (always true when ``rank_zero=False``)."""
        if not getattr(self, "rank_zero", True):
            return True
        check = getattr(self, "is_rank_zero", None) or is_env_rank_zero
        return bool(check())

    @abc.abstractmethod
    def send(self, event: GuardEvent) -> None:
        """Deliver (or enqueue) one event.

        Args:
            event: The guard's decision.
        """

    def flush(self, timeout: float | None = None) -> None:  # noqa: B027 - optional hook
        """Wait until what was sent so far is delivered (no-op by default).

        Args:
            timeout: Longest wait in seconds; ``None`` waits until done.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (no-op by default). Safe to call twice."""

    def __enter__(self) -> AlertSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _warn_once(self, key: object, msg: str, *args: object) -> bool:
        """Log ``msg`` at WARNING the first time ``key`` is seen on this sink."""
        seen: set[object] = self.__dict__.setdefault("_reported_keys", set())
        if key in seen:
            _log.debug(msg, *args)
            return False
        seen.add(key)
        _log.warning(msg, *args)
        return True


def _sink_name(sink: object) -> str:
    return type(sink).__name__


def dispatch(sinks: Iterable[AlertSink], event: GuardEvent) -> int:
    """Send ``event`` to every sink; an exception in one sink never stops the others.

    Faults are reported on the ``lr_monitor.alerts`` logger (at WARNING once per sink
    and exception type, at DEBUG after that) and are never raised, so a broken sink
    cannot crash a training run.

    Args:
        sinks: The sinks, in order.
        event: The event to send.

    Returns:
        How many sinks raised.

    Example:
        >>> got = []
        >>> dispatch([CallableSink(got.append)], GuardEvent(step=1, kind="spike",
        ...          signal="loss", value=9.0, threshold=3.0, time=0.0))
        0
        >>> len(got)
        1
    """
    failures = 0
    for sink in sinks:
        try:
            sink.send(event)
        except Exception as exc:
            failures += 1
            msg = "alert sink %s failed on the event at step %s: %s: %s"
            args = (_sink_name(sink), event.step, type(exc).__name__, exc)
            if isinstance(sink, AlertSink):
                sink._warn_once(("dispatch", type(exc)), msg, *args)
            else:
                _log.warning(msg, *args)
    return failures


def close_sinks(sinks: Iterable[AlertSink], timeout: float | None = 10.0) -> None:
    """Flush, then close, every sink, containing any exception (for training teardown).

    Args:
        sinks: The sinks.
        timeout: Total time budget in seconds for all the flushes; ``None`` waits until
            each sink is done. Closing itself is bounded by each sink.
    """
    sinks = list(sinks)
    deadline = None if timeout is None else time.monotonic() + timeout
    for sink in sinks:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            sink.flush(remaining)
        except Exception as exc:
            _log.warning("flushing alert sink %s failed: %s: %s", _sink_name(sink),
                         type(exc).__name__, exc)
    for sink in sinks:
        try:
            sink.close()
        except Exception as exc:
            _log.warning("closing alert sink %s failed: %s: %s", _sink_name(sink),
                         type(exc).__name__, exc)


# --------------------------------------------------------------------------- logging


class LoggingSink(AlertSink):
    """One readable line per event on a :mod:`logging` logger.

    Guard actions are logged at ``action_level`` (``WARNING``), record-only events
    (no actions) at ``record_level`` (``INFO``). The record carries the event dict in
    ``record.lr_monitor_event`` for structured handlers.

    Args:
        logger: Logger or logger name; defaults to :data:`GUARD_LOGGER_NAME`.
        action_level: Level for events with actions.
        record_level: Level for record-only events.
        rank_zero: See :class:`AlertSink`.
        is_rank_zero: See :class:`AlertSink`.
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
        super().__init__(rank_zero=rank_zero, is_rank_zero=is_rank_zero)
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.action_level = action_level
        self.record_level = record_level

    def send(self, event: GuardEvent) -> None:
        """Log :func:`event_line` of ``event``.

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


# --------------------------------------------------------------------------- JSONL


class EventFileError(ValueError):
    """A corrupt record in an event file (other than a truncated last line).

    Attributes:
        path: The file.
        line: 1-based line number of the corrupt record.
    """

    def __init__(self, path: str | os.PathLike[str], line: int, detail: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        super().__init__(
            f"{self.path}, line {line}: corrupt event record ({detail}); only a truncated "
            "last line (an interrupted write) is tolerated"
        )


def _json_default(obj: object) -> object:
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        with contextlib.suppress(Exception):
            return item()
    try:
        return float(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(obj)


def _encode(event: GuardEvent) -> bytes:
    text = json.dumps(event.to_dict(), separators=(",", ":"), default=_json_default)
    return text.encode("ascii") + b"\n"


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort; not possible on every platform)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class JsonlSink(AlertSink):
    """Append each event as one JSON line (:meth:`GuardEvent.to_dict`); the run's record.

    Every line is written in one call, flushed and ``os.fsync``-ed before :meth:`send`
    returns, so a killed process loses nothing already decided. The file and its
    directory are created on the first event (on rank zero only). If a previous process
    was killed mid-write, the incomplete last line is removed when the file is reopened.

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
        rank_zero: See :class:`AlertSink`.
        is_rank_zero: See :class:`AlertSink`.

    Raises:
        ValueError: If ``max_bytes`` is negative or ``backup_count < 1``.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     sink = JsonlSink(os.path.join(d, "events.jsonl"))
        ...     sink.send(GuardEvent(step=5, kind="spike", signal="loss", value=8.0,
        ...                          threshold=2.0, actions=("cut_lr",), time=0.0))
        ...     sink.close()
        ...     [e.actions for e in read_events(sink.path)]
        [('cut_lr',)]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        backup_count: int = 5,
        fsync: bool = True,
        rank_zero: bool = True,
        is_rank_zero: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(rank_zero=rank_zero, is_rank_zero=is_rank_zero)
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        if backup_count < 1:
            raise ValueError(f"backup_count must be >= 1, got {backup_count}")
        self.path = Path(path)
        self.max_bytes = max_bytes or None
        self.backup_count = backup_count
        self.fsync = fsync
        self._file: Any = None  # BinaryIO, opened lazily
        self._size = 0
        self._lock = threading.Lock()

    # -- file handling

    def _repair_tail(self) -> None:
        """Deal with an incomplete last line left by a process killed mid-write."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            # Find the start of the last line, reading backwards in chunks.
            pos, start = size, 0
            while pos > 0:
                step = min(65536, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    start = pos - step + nl + 1
                    break
                pos -= step
            f.seek(start)
            tail = f.read()
            try:
                complete = isinstance(json.loads(tail.decode("utf-8")), dict)
            except (UnicodeDecodeError, ValueError):
                complete = False
            if complete:  # only the newline was lost
                f.seek(size)
                f.write(b"\n")
            else:
                f.truncate(start)
                _log.warning("%s: removed an incomplete last line (%d bytes) left by an "
                             "interrupted write", self.path, size - start)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across events
        self._size = os.fstat(self._file.fileno()).st_size

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    def _rotate(self) -> None:
        self._close_file()
        base = str(self.path)
        for i in range(self.backup_count - 1, 0, -1):
            src = f"{base}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{base}.{i + 1}")
        os.replace(base, f"{base}.1")
        _fsync_dir(self.path.parent)
        self._open()

    # -- AlertSink

    def send(self, event: GuardEvent) -> None:
        """Append ``event`` as one line, flushed and fsync-ed.

        Args:
            event: The event.

        Raises:
            OSError: If the file cannot be written (contained by :func:`dispatch`).
        """
        if not self.active():
            return
        data = _encode(event)
        with self._lock:
            if self._file is None:
                self._open()
            if self.max_bytes and self._size > 0 and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._file.write(data)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._size += len(data)

    def flush(self, timeout: float | None = None) -> None:
        """Nothing to do: every :meth:`send` is already on disk.

        Args:
            timeout: Ignored.
        """

    def close(self) -> None:
        """Close the file; a later :meth:`send` reopens it in append mode."""
        with self._lock:
            self._close_file()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_size"] = 0
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"JsonlSink(path={str(self.path)!r}, max_bytes={self.max_bytes}, "
                f"backup_count={self.backup_count})")


def read_events(path: str | os.PathLike[str], *, include_rotated: bool = False) -> list[GuardEvent]:
    """Read an event file written by :class:`JsonlSink`.

    A corrupt or incomplete *last* line -- what a process killed mid-write leaves
    behind -- is skipped (with a log warning). Any other corrupt line is an error.

    Args:
        path: The ``events.jsonl`` file.
        include_rotated: Also read the rotated files ``path.N`` ... ``path.1`` that exist,
            oldest first, so the result is in chronological order.

    Returns:
        The events, in file order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        EventFileError: For a corrupt line that is not the last one, naming file and line.
    """
    files: list[Path] = []
    if include_rotated:
        i = 1
        while Path(f"{os.fspath(path)}.{i}").exists():
            files.append(Path(f"{os.fspath(path)}.{i}"))
            i += 1
        files.reverse()
    files.append(Path(path))
    events: list[GuardEvent] = []
    for file in files:
        events.extend(_read_one(file))
    return events


def _read_one(path: Path) -> list[GuardEvent]:
    lines = path.read_bytes().split(b"\n")
    numbered = [(n, raw) for n, raw in enumerate(lines, start=1) if raw.strip(b" \t\r\x00")]
    events: list[GuardEvent] = []
    for index, (lineno, raw) in enumerate(numbered):
        try:
            obj = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            events.append(GuardEvent.from_dict(obj))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            if index == len(numbered) - 1:
                _log.warning("%s, line %d: ignoring an incomplete last line (%s)", path,
                             lineno, exc)
                break
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise EventFileError(path, lineno, detail) from exc
    return events


# --------------------------------------------------------------------------- TensorBoard


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
        rank_zero: See :class:`AlertSink`.
        is_rank_zero: See :class:`AlertSink`.

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
        tag: str = "guard/events",
        rank_zero: bool = True,
        is_rank_zero: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(rank_zero=rank_zero, is_rank_zero=is_rank_zero)
        self.writer = writer
        self.tag = tag

    def send(self, event: GuardEvent) -> None:
        """Add :func:`event_line` as a text summary at ``event.step``.

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


# --------------------------------------------------------------------------- callable


class CallableSink(AlertSink):
    """Call ``fn(event)`` for every event; exceptions are reported, never raised.

    An exception inside ``fn`` is logged at WARNING (with its traceback) once per
    exception type, and at DEBUG after that. The call happens on the training thread:
    keep ``fn`` fast, or hand the work to a thread of your own.

    Args:
        fn: Any callable taking one :class:`~lr_monitor.events.GuardEvent`.
        name: Name used in reports; defaults to ``fn.__qualname__``.
        rank_zero: See :class:`AlertSink`.
        is_rank_zero: See :class:`AlertSink`.

    Raises:
        TypeError: If ``fn`` is not callable.

    Example:
        >>> sink = CallableSink(lambda e: print("alert:", e.kind, e.step))
        >>> sink.send(GuardEvent(step=4, kind="divergence", signal="loss", value=3.0,
        ...                      threshold=2.0, time=0.0))
        alert: divergence 4
        >>> broken = CallableSink(lambda e: {}["missing"])
        >>> broken.send(GuardEvent(step=4, kind="spike", signal="loss", value=3.0,
        ...                        threshold=2.0, time=0.0))  # logged once, not raised
        >>> broken.errors
        1
    """

    def __init__(
        self,
        fn: Callable[[GuardEvent], object],
        *,
        name: str | None = None,
        rank_zero: bool = True,
        is_rank_zero: Callable[[], bool] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"CallableSink needs a callable, got {type(fn).__name__}")
        super().__init__(rank_zero=rank_zero, is_rank_zero=is_rank_zero)
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or type(fn).__name__
        self.errors = 0

    def send(self, event: GuardEvent) -> None:
        """Call the function; an exception is counted in :attr:`errors` and logged.

        Args:
            event: The event.
        """
        if not self.active():
            return
        try:
            self.fn(event)
        except Exception as exc:
            self.errors += 1
            seen: set[object] = self.__dict__.setdefault("_reported_keys", set())
            key = ("callable", type(exc))
            if key in seen:
                _log.debug("alert callable %s raised again: %s: %s", self.name,
                           type(exc).__name__, exc)
            else:
                seen.add(key)
                _log.warning("alert callable %s raised on the event at step %s (reported "
                             "once per exception type): %s: %s", self.name, event.step,
                             type(exc).__name__, exc, exc_info=True)

    def __repr__(self) -> str:
        return f"CallableSink({self.name})"


def as_sink(obj: AlertSink | Callable[[GuardEvent], object]) -> AlertSink:
    """Return ``obj`` if it is a sink, else wrap a callable in :class:`CallableSink`.

    Args:
        obj: A sink or a ``fn(event)``.

    Returns:
        An :class:`AlertSink`.

    Raises:
        TypeError: If ``obj`` is neither.

    Example:
        >>> as_sink(print).__class__.__name__
        'CallableSink'
    """
    if isinstance(obj, AlertSink):
        return obj
    if callable(obj):
        return CallableSink(obj)
    raise TypeError(f"not an alert sink or a callable: {type(obj).__name__}")


# --------------------------------------------------------------------------- webhook


class _Secret:
    """Holds a secret; never shows it and never pickles it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def reveal(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return repr(_HIDDEN)

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Secret, (None,))


def _secret_fragments(url: str) -> list[str]:
    """Every substring of ``url`` that could identify it, longest first."""
    parts = urllib.parse.urlsplit(url)
    frags = {url, url.split("://", 1)[-1], parts.path, parts.query, parts.fragment}
    if parts.query:
        frags.add(f"{parts.path}?{parts.query}")
    if parts.password:
        frags.add(parts.password)
    if parts.username:
        frags.add(parts.username)
    tokens = [t for t in parts.path.split("/") if t]
    tokens += [v for _, v in urllib.parse.parse_qsl(parts.query)]
    for tok in tokens:
        # Tokens carry the secret; plain words ("services", "api") do not.
        if len(tok) >= 16 or (len(tok) >= 6 and any(c.isdigit() or c.isupper() for c in tok)):
            frags.add(tok)
    more = {urllib.parse.unquote(f) for f in frags} | {urllib.parse.quote(f) for f in frags}
    return sorted((f for f in frags | more if len(f) >= 4 and f != "/"), key=len, reverse=True)


def _scrub(text: str, fragments: Iterable[str]) -> str:
    for frag in fragments:
        if frag in text:
            text = text.replace(frag, _HIDDEN)
    return text


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is reported as a failure: the body must go to the configured URL only."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_LIVE_WEBHOOKS: weakref.WeakSet[WebhookSink] = weakref.WeakSet()
_AT_EXIT_BUDGET = 5.0
_STOP = object()


@atexit.register
def _flush_webhooks_at_exit() -> None:
    """Give queued alerts a bounded chance to go out when the interpreter exits."""
    deadline = time.monotonic() + _AT_EXIT_BUDGET
    for sink in list(_LIVE_WEBHOOKS):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        with contextlib.suppress(Exception):
            sink.flush(remaining)


class WebhookSink(AlertSink):
    """POST each event to a webhook (Slack incoming webhook by default) from a thread.

    :meth:`send` only applies the rate limit and enqueues with ``put_nowait``; a
    background daemon thread does the HTTP POST with ``timeout``, retrying on 5xx,
    429, connection errors and timeouts (not on other 4xx) up to ``max_retries``
    times with exponential backoff (``backoff * 2**attempt`` seconds). A full queue
    drops the event (counted in :attr:`dropped`); training never waits.

    Rate limit: at most one message per ``(kind, signal)`` per ``min_interval``
    seconds; the events in between are counted in :attr:`suppressed` and the next
    message for that key ends with ``(+N similar suppressed)``. At most
    ``max_per_run`` messages are sent per sink; the last one says so.

    Failures are reported once per failure streak on the ``lr_monitor.alerts`` logger,
    with the reason but never the URL. Every event also stays in the JSONL record
    (:class:`JsonlSink`), which does not depend on this sink.

    The URL is a secret: it is hidden from ``repr``, never logged, and never pickled.
    A pickled copy (e.g. sent to ``ddp_spawn`` workers) reads the URL again from
    :data:`WEBHOOK_URL_ENV` if that is where it came from; otherwise the copy is
    disabled and says so on its first event.

    Payload: ``format="slack"`` posts ``{"text": line}`` (``&``, ``<``, ``>`` escaped
    as Slack requires); ``format="json"`` posts :meth:`GuardEvent.to_dict` plus
    ``"text"``.

    Args:
        url: The webhook URL (``http://`` or ``https://``); ``None`` reads
            :data:`WEBHOOK_URL_ENV`.
        format: ``"slack"`` or ``"json"``.
        timeout: Socket timeout in seconds of each HTTP attempt.
        max_retries: Retries after the first attempt (so at most ``1 + max_retries``
            requests per message).
        backoff: First retry delay in seconds, doubled on each retry (at most 30 s).
        queue_size: Messages waiting for the thread; more are dropped.
        min_interval: Seconds between two messages with the same ``(kind, signal)``.
        max_per_run: Most messages this sink sends; ``None`` for no cap.
        rank_zero: See :class:`AlertSink`.
        is_rank_zero: See :class:`AlertSink`.
        clock: Monotonic clock used by the rate limit (injectable for tests).

    Raises:
        ValueError: If there is no URL (naming both ``url`` and
            :data:`WEBHOOK_URL_ENV`), the URL is not http(s), or an option is out of range.

    Example:
        >>> sink = WebhookSink("https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXX")
        >>> repr(sink)[:50]
        "WebhookSink(url='<webhook url hidden>', format='sl"
        >>> "XXXXXXXXXXXX" in repr(sink.__getstate__())
        False
        >>> sink.close()
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        format: WebhookFormat = "slack",
        timeout: float = 5.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        queue_size: int = 100,
        min_interval: float = 60.0,
        max_per_run: int | None = 50,
        rank_zero: bool = True,
        is_rank_zero: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rank_zero=rank_zero, is_rank_zero=is_rank_zero)
        from_env = url is None
        if url is None:
            url = os.environ.get(WEBHOOK_URL_ENV) or None
        if url is None:
            raise ValueError(
                f"WebhookSink needs a URL: pass url=... or set the environment variable "
                f"{WEBHOOK_URL_ENV}"
            )
        self._check_url(url)
        if format not in ("slack", "json"):
            raise ValueError(f"format must be 'slack' or 'json', got {format!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0, got {backoff}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if min_interval < 0:
            raise ValueError(f"min_interval must be >= 0, got {min_interval}")
        if max_per_run is not None and max_per_run < 1:
            raise ValueError(f"max_per_run must be >= 1 or None, got {max_per_run}")
        self._url = _Secret(url)
        self._url_from_env = from_env
        self.format: WebhookFormat = format
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.queue_size = int(queue_size)
        self.min_interval = float(min_interval)
        self.max_per_run = max_per_run
        self.clock = clock
        self._delivered = self._failed = self._dropped = self._suppressed = 0
        self._accepted = 0
        self._last_sent: dict[tuple[str, str], float] = {}
        self._pending_suppressed: dict[tuple[str, str], int] = {}
        self._init_runtime()

    @staticmethod
    def _check_url(url: str) -> None:
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
        except ValueError:  # e.g. a malformed IPv6 host
            host = None
        if host is None or parts.scheme not in ("http", "https"):
            raise ValueError("the webhook URL must be an http:// or https:// URL with a host "
                             "(the URL itself is not shown: it is a secret)")
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
            raise ValueError("the webhook URL contains whitespace or control characters "
                             "(the URL itself is not shown: it is a secret)")

    def _init_runtime(self) -> None:
        """State that is rebuilt rather than pickled."""
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._failing = False  # inside a failure streak
        self._streak_failed = 0
        self._dropping = False  # inside a queue-full streak
        self._opener = urllib.request.build_opener(_NoRedirect())

    # -- counters

    @property
    def delivered(self) -> int:
        """Messages the server accepted (2xx)."""
        return self._delivered

    @property
    def failed(self) -> int:
        """Messages given up on after the retries (or on a non-retryable error)."""
        return self._failed

    @property
    def dropped(self) -> int:
        """Events not sent because the queue was full or the sink was closed/disabled."""
        return self._dropped

    @property
    def suppressed(self) -> int:
        """Events not sent because of ``min_interval`` or ``max_per_run``."""
        return self._suppressed

    @property
    def pending(self) -> int:
        """Messages enqueued or in flight."""
        return self._queue.unfinished_tasks

    # -- AlertSink

    def send(self, event: GuardEvent) -> None:
        """Rate-limit and enqueue ``event``; never blocks and never does I/O.

        Args:
            event: The event.
        """
        if not self.active():
            return
        key = (event.kind, event.signal)
        with self._lock:
            if self._closed or self._url.reveal() is None:
                self._dropped += 1
                reason = ("it was closed" if self._closed else
                          "its URL was not pickled with it; set " + WEBHOOK_URL_ENV)
                self._warn_once(("unusable", self._closed),
                                "WebhookSink got an event but %s; the event stays in the "
                                "event file only", reason)
                return
            now = self.clock()
            last = self._last_sent.get(key)
            if last is not None and now - last < self.min_interval:
                self._suppressed += 1
                self._pending_suppressed[key] = self._pending_suppressed.get(key, 0) + 1
                return
            if self.max_per_run is not None and self._accepted >= self.max_per_run:
                self._suppressed += 1
                return
            n_similar = self._pending_suppressed.pop(key, 0)
            last_of_run = self.max_per_run is not None and self._accepted + 1 == self.max_per_run
            self._ensure_thread()
            try:
                self._queue.put_nowait((event, n_similar, last_of_run))
            except queue.Full:
                self._dropped += 1
                if n_similar:
                    self._pending_suppressed[key] = n_similar
                if not self._dropping:
                    self._dropping = True
                    _log.warning("WebhookSink queue is full (%d messages): dropping alerts "
                                 "until it drains; they stay in the event file",
                                 self.queue_size)
                return
            self._dropping = False
            self._accepted += 1
            self._last_sent[key] = now

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every enqueued message is delivered or given up on.

        Args:
            timeout: Longest wait in seconds; ``None`` waits until done (each message
                is bounded by its timeout and retries).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._queue.all_tasks_done
        with cond:
            while self._queue.unfinished_tasks:
                if deadline is None:
                    cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                cond.wait(remaining)

    def close(self) -> None:
        """Stop the thread; messages still queued are discarded and counted as dropped.

        Call :meth:`flush` first to give them a chance. Waits at most ``timeout``
        seconds for a request in flight.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        _LIVE_WEBHOOKS.discard(self)
        self._stop.set()
        discarded = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            discarded += 1
            self._queue.task_done()
        if thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)
            thread.join(self.timeout + 1.0)
        if discarded:
            with self._lock:
                self._dropped += discarded
            _log.warning("WebhookSink closed with %d alert(s) not yet sent; they stay in the "
                         "event file", discarded)

    # -- worker

    def _ensure_thread(self) -> None:
        """Start the worker on first use (and again in a forked child). Holds the lock."""
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        if self._pid != os.getpid():  # forked: the parent's thread and queue are not ours
            self._queue = queue.Queue(maxsize=self.queue_size)
            self._pid = os.getpid()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lr_monitor-webhook",
                                        daemon=True)
        self._thread.start()
        _LIVE_WEBHOOKS.add(self)

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            try:
                if item is _STOP:
                    return
                if self._stop.is_set():
                    with self._lock:
                        self._dropped += 1
                    continue
                self._deliver(*item)
            except Exception as exc:  # never let the thread die
                with self._lock:
                    self._failed += 1
                self._report_failure(None, f"internal error: {type(exc).__name__}: {exc}", 0)
            finally:
                q.task_done()

    def text(self, event: GuardEvent, n_similar: int = 0, last_of_run: bool = False) -> str:
        """The message line for ``event`` (before Slack escaping).

        Args:
            event: The event.
            n_similar: Events with the same ``(kind, signal)`` suppressed since the last
                message.
            last_of_run: Whether this is the last message ``max_per_run`` allows.

        Returns:
            ``"lr_monitor guard: " + event_line(event)`` plus the notes.
        """
        text = f"lr_monitor guard: {event_line(event)}"
        if n_similar:
            text += f" (+{n_similar} similar suppressed)"
        if last_of_run:
            text += (f" (alert limit of {self.max_per_run} messages reached: later events "
                     "are only in the event log)")
        return text

    def payload(self, event: GuardEvent, n_similar: int = 0, last_of_run: bool = False) -> bytes:
        """The JSON body posted for ``event``.

        Args:
            event: The event.
            n_similar: See :meth:`text`.
            last_of_run: See :meth:`text`.

        Returns:
            UTF-8 JSON: ``{"text": ...}`` for Slack, ``to_dict() | {"text": ...}`` for json.
        """
        text = self.text(event, n_similar, last_of_run)
        if self.format == "slack":
            text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            body: dict[str, Any] = {"text": text}
        else:
            body = {**event.to_dict(), "text": text}
        return json.dumps(body, default=_json_default).encode("utf-8")

    def _deliver(self, event: GuardEvent, n_similar: int, last_of_run: bool) -> None:
        body = self.payload(event, n_similar, last_of_run)
        attempt = 0
        while True:
            ok, retry_after, reason = self._post(body)
            if ok:
                with self._lock:
                    self._delivered += 1
                    recovered, self._failing = self._failing, False
                    streak, self._streak_failed = self._streak_failed, 0
                if recovered:
                    _log.info("WebhookSink delivers again (%d alert(s) were not delivered)",
                              streak)
                return
            if retry_after is None or attempt >= self.max_retries or self._stop.is_set():
                with self._lock:
                    self._failed += 1
                self._report_failure(event, reason, attempt + 1)
                return
            delay = max(retry_after, min(30.0, self.backoff * 2**attempt))
            if self._stop.wait(delay):
                with self._lock:
                    self._failed += 1
                return
            attempt += 1

    def _report_failure(self, event: GuardEvent | None, reason: str, attempts: int) -> None:
        with self._lock:
            first, self._failing = not self._failing, True
            self._streak_failed += 1
        if event is None:
            what = "an alert"
        else:
            what = f"the alert for step {event.step} ({event.kind} on {event.signal})"
        msg = "WebhookSink could not deliver %s after %d attempt(s): %s"
        url = self._url.reveal()
        reason = _scrub(reason, _secret_fragments(url)) if url else reason
        args: tuple[object, ...] = (what, attempts, reason)
        if first:
            _log.warning(msg + "; further failures are not reported until a delivery "
                         "succeeds; every event stays in the event file", *args)
        else:
            _log.debug(msg, *args)

    def _post(self, body: bytes) -> tuple[bool, float | None, str]:
        """One attempt. Returns (ok, retry delay or None if not retryable, reason)."""
        url = self._url.reveal()
        assert url is not None
        request = urllib.request.Request(
            url, data=body, method="POST",
            headers={"Content-Type": "application/json; charset=utf-8",
                     "User-Agent": "lr-monitor-webhook"},
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read(65536)
                status = response.status
            if 200 <= status < 300:
                return True, None, ""
            return False, None, f"HTTP {status}"
        except urllib.error.HTTPError as exc:
            status = exc.code
            detail = ""
            with contextlib.suppress(Exception):
                detail = exc.read(200).decode("utf-8", "replace").strip()
            exc.close()
            reason = f"HTTP {status} {exc.reason}" + (f" ({detail})" if detail else "")
            if status == 429:
                return False, self._retry_after(exc.headers), reason
            return False, (0.0 if status >= 500 else None), reason
        except http.client.InvalidURL as exc:
            return False, None, f"invalid URL: {exc}"
        except urllib.error.URLError as exc:
            return False, 0.0, f"connection error: {exc.reason}"
        except TimeoutError:
            return False, 0.0, f"timed out after {self.timeout:g} s"
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            return False, 0.0, f"{type(exc).__name__}: {exc}"
        except ValueError as exc:
            return False, None, f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _retry_after(headers: Any) -> float:
        with contextlib.suppress(Exception):
            return min(30.0, max(0.0, float(headers.get("Retry-After") or 0)))
        return 0.0

    # -- secrecy

    def __getstate__(self) -> dict[str, Any]:
        keep = ("format", "timeout", "max_retries", "backoff", "queue_size", "min_interval",
                "max_per_run", "clock", "rank_zero", "is_rank_zero", "_url_from_env",
                "_delivered", "_failed", "_dropped", "_suppressed", "_accepted")
        state = {k: self.__dict__[k] for k in keep if k in self.__dict__}
        state["_url"] = _Secret(None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._last_sent = {}
        self._pending_suppressed = {}
        url = (os.environ.get(WEBHOOK_URL_ENV) or None) if self._url_from_env else None
        if url is not None:
            try:
                self._check_url(url)
            except ValueError:
                url = None
        self._url = _Secret(url)
        self._init_runtime()

    def __repr__(self) -> str:
        return (f"WebhookSink(url={_HIDDEN!r}, format={self.format!r}, timeout={self.timeout}, "
                f"max_retries={self.max_retries}, min_interval={self.min_interval}, "
                f"max_per_run={self.max_per_run})")


# --------------------------------------------------------------------------- defaults


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
        is_rank_zero: Passed to every sink (see :class:`AlertSink`).

    Returns:
        The sinks, logging first.

    Example:
        >>> [type(s).__name__ for s in make_default_sinks("/tmp/run")]
        ['LoggingSink', 'JsonlSink']
        >>> [type(s).__name__ for s in make_default_sinks(None)]
        ['LoggingSink']
    """
    sinks: list[AlertSink] = []
    if logging:
        sinks.append(LoggingSink(is_rank_zero=is_rank_zero))
    if jsonl and log_dir is not None:
        sinks.append(JsonlSink(Path(log_dir) / filename, max_bytes=max_bytes,
                               is_rank_zero=is_rank_zero))
    return sinks
