r"""The event log: ``events.jsonl``, one :class:`~lr_monitor.events.GuardEvent` per line.

The guard's decisions and the faults of lr-monitor are the run's record. This module owns
the file format, so the writer (:class:`~lr_monitor.alerts.JsonlSink`, through
:class:`EventLogWriter`) and the readers (``lr-monitor report``/``plot``, through
:func:`read_events`) cannot disagree about it:

* **Encoding.** A line is :meth:`GuardEvent.to_dict` as compact, strict ASCII JSON
  (non-finite numbers are the strings ``"nan"``, ``"inf"``, ``"-inf"``) ending in ``\n``
  (:func:`encode_event`, :func:`decode_event`).
* **Durability.** :meth:`EventLogWriter.append` writes a line in one call, then flushes and
  ``os.fsync``-s it, so a killed process loses at most the line being written.
* **Torn tail.** A process killed mid-write leaves an incomplete last line. The reader skips
  it with a warning; a writer reopening the file removes it before appending.
* **Rotation.** Before a line would take the file past ``max_bytes``, ``events.jsonl``
  becomes ``events.jsonl.1`` (``.1`` becomes ``.2``, ...; the oldest beyond
  ``backup_count`` is deleted), so the log never holds more than
  ``max_bytes * (backup_count + 1)`` bytes.

Only the standard library and :mod:`lr_monitor.events` are used: reading a run's record
needs neither torch nor Lightning.

Example:
    >>> import os, tempfile
    >>> from lr_monitor.events import GuardEvent
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, EVENTS_FILENAME)
    ...     with EventLogWriter(path) as log:
    ...         log.append(GuardEvent(step=5, kind="spike", signal="loss", value=8.0,
    ...                               threshold=2.0, actions=("cut_lr",), time=0.0))
    ...     [(e.step, e.actions == ("cut_lr",)) for e in read_events(path)]
    [(5, True)]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO

from lr_monitor._validation import check_bool, check_int, check_path
from lr_monitor.events import GuardEvent
from lr_monitor.tags import EVENTS_FILENAME

__all__ = [
    "DEFAULT_BACKUP_COUNT",
    "DEFAULT_MAX_BYTES",
    "EVENTS_FILENAME",
    "EventFileError",
    "EventLogWriter",
    "backup_path",
    "decode_event",
    "encode_event",
    "read_events",
]

#: Default size at which :class:`EventLogWriter` rotates its file (50 MiB).
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
#: Default number of rotated files kept (``events.jsonl.1`` ... ``.5``).
DEFAULT_BACKUP_COUNT = 5

_log = logging.getLogger("lr_monitor.eventlog")
_BLANK = b" \t\r\x00"


class EventFileError(ValueError):
    """A corrupt record in an event file (other than a truncated last line).

    Attributes:
        path: The file.
        line: 1-based line number of the corrupt record.

    Example:
        >>> err = EventFileError("run/events.jsonl", 3, "missing key 'step'")
        >>> err.line, str(err).split(":")[0]
        (3, 'run/events.jsonl, line 3')
    """

    def __init__(self, path: str | os.PathLike[str], line: int, detail: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        super().__init__(
            f"{self.path}, line {line}: corrupt event record ({detail}); only a truncated "
            "last line (an interrupted write) is tolerated"
        )


# --------------------------------------------------------------------------- encoding


def _json_default(obj: object) -> object:
    """JSON for the odd value an event may carry: numpy/torch scalars, else float or str."""
    item = getattr(obj, "item", None)
    if callable(item):
        with contextlib.suppress(Exception):
            return item()
    try:
        return float(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(obj)


def encode_event(event: GuardEvent) -> bytes:
    r"""One line of the event log: compact ASCII JSON of :meth:`GuardEvent.to_dict` and ``\n``.

    Args:
        event: The event.

    Returns:
        The bytes to append, newline included.

    Example:
        >>> e = GuardEvent(step=1, kind="nonfinite", signal="loss", value=float("nan"),
        ...                threshold=0.0, actions=("skip",), time=0.0)
        >>> encode_event(e)[:60]
        b'{"step":1,"kind":"nonfinite","signal":"loss","value":"nan","'
    """
    text = json.dumps(event.to_dict(), separators=(",", ":"), default=_json_default)
    return text.encode("ascii") + b"\n"


def decode_event(line: bytes | str) -> GuardEvent:
    """The event stored in one line of the event log.

    Args:
        line: The line, with or without its newline.

    Returns:
        The event (see :meth:`GuardEvent.from_dict`).

    Raises:
        ValueError: If the line is not UTF-8, not JSON, not a JSON object, or a field has
            a value no event can have.
        KeyError: If a required field (``step``, ``kind``, ``signal``) is missing.

    Example:
        >>> decode_event(b'{"step": 3, "kind": "spike", "signal": "loss", "value": 9}').value
        9.0
        >>> decode_event(b"[1, 2]")
        Traceback (most recent call last):
        ...
        ValueError: expected a JSON object, got list
    """
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return GuardEvent.from_dict(obj)


def backup_path(path: str | os.PathLike[str], index: int) -> Path:
    """The ``index``-th rotated file of ``path`` (``1`` is the newest).

    Example:
        >>> backup_path("run/events.jsonl", 2).as_posix()
        'run/events.jsonl.2'
    """
    return Path(f"{os.fspath(path)}.{index}")


# --------------------------------------------------------------------------- writer


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


class EventLogWriter:
    """Appends events to an event log: durable lines, torn-tail repair, size rotation.

    The file and its directory are created on the first :meth:`append`. Appending is
    thread-safe. A writer pickles without its open file (the copy reopens in append mode).

    Args:
        path: The file, e.g. ``<log_dir>/events.jsonl``.
        max_bytes: Rotation size in bytes; ``None`` or ``0`` never rotates.
        backup_count: Rotated files kept (``path.1`` ... ``path.N``), at least 1.
        fsync: ``os.fsync`` after every line. Turn it off only on file systems where
            fsync is very slow and losing the last events on a crash is acceptable.

    Raises:
        ValueError: For a ``path`` that is not a path, ``max_bytes`` that is not an int
            ``>= 0`` or ``None``, ``backup_count`` that is not an int ``>= 1``, or a
            non-bool ``fsync``.

    Example:
        >>> EventLogWriter("events.jsonl", max_bytes=float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: max_bytes=nan is invalid: must be an int >= 0 or None
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        backup_count: int = DEFAULT_BACKUP_COUNT,
        fsync: bool = True,
    ) -> None:
        checked = check_path("path", path)
        assert checked is not None
        self.path: Path = checked
        self.max_bytes: int | None = check_int("max_bytes", max_bytes, 0, allow_none=True) or None
        self.backup_count: int = check_int("backup_count", backup_count, 1)
        self.fsync: bool = check_bool("fsync", fsync)
        self._file: BinaryIO | None = None
        self._size = 0
        self._lock = threading.Lock()

    # -- public

    def append(self, event: GuardEvent) -> None:
        """Write ``event`` as one line, flushed (and fsync-ed); rotate first if needed.

        Args:
            event: The event.

        Raises:
            OSError: If the file cannot be written.
        """
        data = encode_event(event)
        with self._lock:
            file = self._file if self._file is not None else self._open()
            if self.max_bytes and self._size > 0 and self._size + len(data) > self.max_bytes:
                self._rotate()
                file = self._open()
            file.write(data)
            file.flush()
            if self.fsync:
                os.fsync(file.fileno())
            self._size += len(data)

    def close(self) -> None:
        """Close the file; a later :meth:`append` reopens it in append mode. Idempotent."""
        with self._lock:
            self._close_file()

    def __enter__(self) -> EventLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- file handling (the lock is held)

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        file = open(self.path, "ab")  # noqa: SIM115 - kept open across events
        self._file = file
        self._size = os.fstat(file.fileno()).st_size
        return file

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

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
            start = _last_line_start(f, size)
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

    def _rotate(self) -> None:
        self._close_file()
        for i in range(self.backup_count - 1, 0, -1):
            src = backup_path(self.path, i)
            if src.exists():
                os.replace(src, backup_path(self.path, i + 1))
        os.replace(self.path, backup_path(self.path, 1))
        _fsync_dir(self.path.parent)

    # -- pickling: never the open file

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
        return (f"EventLogWriter(path={str(self.path)!r}, max_bytes={self.max_bytes}, "
                f"backup_count={self.backup_count})")


def _last_line_start(f: BinaryIO, size: int) -> int:
    """Offset of the first byte after the last newline of an open file (0 if none)."""
    pos = size
    while pos > 0:
        step = min(65536, pos)
        f.seek(pos - step)
        nl = f.read(step).rfind(b"\n")
        if nl >= 0:
            return pos - step + nl + 1
        pos -= step
    return 0


# --------------------------------------------------------------------------- reader


def read_events(path: str | os.PathLike[str], *, include_rotated: bool = False) -> list[GuardEvent]:
    r"""Read an event log written by :class:`EventLogWriter`.

    A corrupt or incomplete *last* line of a file -- what a process killed mid-write
    leaves behind -- is skipped with a warning. Any other corrupt line is an error.

    Args:
        path: The ``events.jsonl`` file.
        include_rotated: Also read the rotated files ``path.N`` ... ``path.1`` that exist,
            oldest first, so the result is in chronological order.

    Returns:
        The events, in file order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        EventFileError: For a corrupt line that is not the last one, naming file and line.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, EVENTS_FILENAME)
        ...     with open(path, "w") as f:
        ...         _ = f.write('{"step": 1, "kind": "spike", "signal": "loss"}\n{"step": 2, "ki')
        ...     [e.step for e in read_events(path)]  # the torn last line is skipped
        [1]
    """
    files: list[Path] = []
    if include_rotated:
        i = 1
        while backup_path(path, i).exists():
            files.append(backup_path(path, i))
            i += 1
        files.reverse()
    files.append(Path(path))
    events: list[GuardEvent] = []
    for file in files:
        events.extend(_read_one(file))
    return events


def _read_one(path: Path) -> list[GuardEvent]:
    lines = path.read_bytes().split(b"\n")
    numbered = [(n, raw) for n, raw in enumerate(lines, start=1) if raw.strip(_BLANK)]
    events: list[GuardEvent] = []
    for index, (lineno, raw) in enumerate(numbered):
        try:
            events.append(decode_event(raw))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            if index == len(numbered) - 1:
                _log.warning("%s, line %d: ignoring an incomplete last line (%s)", path,
                             lineno, exc)
                break
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise EventFileError(path, lineno, detail) from exc
    return events
