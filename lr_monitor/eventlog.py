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
* **Hostile files.** The reader opens only regular files (:func:`open_regular`: a FIFO or
  a device named ``events.jsonl`` is refused, never read), reads at most
  :data:`MAX_LINE_BYTES` per line and :data:`MAX_FILE_BYTES` per file, and validates every
  field of every line; a corrupt line raises :class:`EventFileError` naming file and line,
  or, with ``errors="warn"`` (what ``lr-monitor report`` uses), is skipped with one
  warning naming them.
* **Rotation.** Before a line would take the file past ``max_bytes``, ``events.jsonl``
  becomes ``events.jsonl.1`` (``.1`` becomes ``.2``, ...; the oldest beyond
  ``backup_count`` is deleted), so the log never holds more than
  ``max_bytes * (backup_count + 1)`` bytes.
* **Resume.** A checkpoint stores :meth:`EventLogWriter.mark`: where the log ended when it
  was taken (size, and a digest of the bytes before). A run resumed from it calls
  :meth:`EventLogWriter.rewind`, which moves every line written after the mark -- the
  events of a timeline the resume replaces, e.g. between the last checkpoint and a
  ``SIGKILL`` -- to ``events.superseded.jsonl``, so each event of the resumed run is in
  ``events.jsonl`` once. :func:`unique_events` keeps a reader right on logs written
  without it.

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
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from lr_monitor._validation import check_bool, check_choice, check_int, check_path
from lr_monitor.events import GuardEvent
from lr_monitor.tags import EVENTS_FILENAME, SUPERSEDED_EVENTS_FILENAME

__all__ = [
    "DEFAULT_BACKUP_COUNT",
    "DEFAULT_MAX_BYTES",
    "EVENTS_FILENAME",
    "MAX_FILE_BYTES",
    "MAX_LINE_BYTES",
    "MAX_NAMED_LINES",
    "SUPERSEDED_EVENTS_FILENAME",
    "EventFileError",
    "EventLogWriter",
    "NotRegularFileError",
    "backup_path",
    "decode_event",
    "encode_event",
    "event_key",
    "file_kind",
    "open_regular",
    "read_events",
    "rotated_paths",
    "superseded_path",
    "unique_events",
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
        ValueError: If the line is not UTF-8, not JSON (nested too deeply, an integer of
            more than 4,300 digits, ...), not a JSON object, or a field has a value no
            event can have (:meth:`GuardEvent.from_dict`).
        KeyError: If a required field (``step``, ``kind``, ``signal``) is missing.

    Example:
        >>> decode_event(b'{"step": 3, "kind": "spike", "signal": "loss", "value": 9}').value
        9.0
        >>> decode_event(b"[1, 2]")
        Traceback (most recent call last):
        ...
        ValueError: expected a JSON object, got list
        >>> decode_event(b"[" * 100_000)
        Traceback (most recent call last):
        ...
        ValueError: nested too deeply
    """
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return GuardEvent.from_dict(obj)


def superseded_path(path: str | os.PathLike[str]) -> Path:
    """Where :meth:`EventLogWriter.rewind` moves the lines of a replaced timeline.

    ``.superseded`` goes before the suffix, so a reader of ``events.jsonl`` and its rotated
    files never reads it.

    Example:
        >>> superseded_path("run/events.jsonl").name == SUPERSEDED_EVENTS_FILENAME
        True
    """
    p = Path(path)
    return p.with_name(f"{p.stem}.superseded{p.suffix}")


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

    def mark(self) -> dict[str, Any]:
        """Where the log ends now, for a checkpoint; :meth:`rewind` comes back to it.

        Returns:
            Plain data: ``path`` (absolute), ``size`` (bytes up to the end of the last
            complete line; ``0`` when there is no file yet) and ``digest`` (SHA-256 of the
            up to 4 KiB before ``size``, which identifies the file on resume, even once
            rotated).
        """
        with self._lock:
            size, digest = 0, _digest(b"")
            with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
                end = os.fstat(f.fileno()).st_size
                size = _last_line_start(f, end)
                f.seek(max(0, size - _MARK_BYTES))
                digest = _digest(f.read(size - max(0, size - _MARK_BYTES)))
            return {"path": os.path.abspath(self.path), "size": size, "digest": digest}

    def rewind(self, mark: Mapping[str, Any]) -> int:
        """Make the log end where ``mark`` (:meth:`mark`) says; move what followed aside.

        The lines written after the mark are appended to :func:`superseded_path` (the
        file is created if needed, flushed and fsync-ed first), then cut from the log.
        The mark is looked for in ``events.jsonl`` and then in the rotated files: if the
        log rotated after the mark, the newer files are moved aside as well and the
        rotated files are renamed back. An incomplete last line (an interrupted write) is
        dropped. A mark for another file changes nothing.

        Args:
            mark: What :meth:`mark` returned when the checkpoint was taken.

        Returns:
            How many lines were moved aside (``0`` when the log ends at the mark).

        Raises:
            ValueError: If ``mark`` is not a mark (from a corrupt checkpoint).
            OSError: If the files cannot be read or written.
        """
        size, digest, path = _check_mark(mark)
        if path != os.path.abspath(self.path):
            return 0
        with self._lock:
            self._close_file()
            files = [self.path] + [backup_path(self.path, i)
                                   for i in range(1, len(rotated_paths(self.path)) + 1)]
            index = next((i for i, f in enumerate(files) if _ends_at(f, size, digest)), None)
            if index is None:
                _log.warning("%s: the point where the checkpoint left the event log was not "
                             "found (the log was replaced, edited or rotated beyond its %d "
                             "kept files); events written after the checkpoint may be in it "
                             "twice (lr-monitor report counts each once)", self.path,
                             self.backup_count)
                return 0
            moved = self._move_aside(files[: index + 1], size)
            if index == 0 and _size_of(files[0]) <= size:
                return moved
            with open(files[index], "rb+") as f:
                f.truncate(size)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            if index:
                for newer in files[:index]:
                    with contextlib.suppress(FileNotFoundError):
                        newer.unlink()
                for i in range(index, len(files)):  # the rotated files move back by ``index``
                    if files[i].exists():
                        os.replace(files[i], files[i - index])
            _fsync_dir(self.path.parent)
            if moved:
                _log.info("%s: resumed from a checkpoint; moved the %d event(s) written "
                             "after it to %s", self.path, moved,
                             superseded_path(self.path).name)
            return moved

    def _move_aside(self, files: list[Path], size: int) -> int:
        """Append ``files[-1][size:]``, then ``files[-2]`` ... ``files[0]`` to the superseded file.

        Whole lines only. Returns how many.
        """
        chunks: list[bytes] = []
        for i, file in enumerate(reversed(files)):
            try:
                with open(file, "rb") as f:
                    if i == 0:
                        f.seek(size)
                    data = f.read()
            except FileNotFoundError:
                continue
            chunks.append(data[: data.rfind(b"\n") + 1])
        lines = sum(c.count(b"\n") for c in chunks)
        if lines:
            with open(superseded_path(self.path), "ab") as out:
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
        return lines

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


#: Bytes before a mark whose digest identifies the file (:meth:`EventLogWriter.mark`).
_MARK_BYTES = 4096


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _size_of(file: Path) -> int:
    try:
        return file.stat().st_size
    except FileNotFoundError:
        return 0


def _check_mark(mark: object) -> tuple[int, str, str]:
    """``(size, digest, path)`` of a mark read back from a checkpoint."""
    if isinstance(mark, Mapping):
        size, digest, path = mark.get("size"), mark.get("digest"), mark.get("path")
        if (isinstance(size, int) and not isinstance(size, bool) and size >= 0
                and isinstance(digest, str) and isinstance(path, str)):
            return size, digest, path
    raise ValueError(f"not an event log mark: {mark!r:.200}")


def _ends_at(file: Path, size: int, digest: str) -> bool:
    """Whether ``file`` holds at least ``size`` bytes and the digest matches before them."""
    try:
        with open(file, "rb") as f:
            if os.fstat(f.fileno()).st_size < size:
                return False
            start = max(0, size - _MARK_BYTES)
            f.seek(start)
            return _digest(f.read(size - start)) == digest
    except FileNotFoundError:
        return size == 0  # no file yet is where an empty mark left it


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

#: The longest line :func:`read_events` decodes (1 MiB; an event is about 300 bytes, a few
#: KiB with many parameter groups). A longer line is skipped like a corrupt one.
MAX_LINE_BYTES = 1 << 20
#: The most bytes :func:`read_events` reads from one file (1 GiB, about 3.5 million
#: events); the rest of a larger file is skipped with a warning.
MAX_FILE_BYTES = 1 << 30
#: Corrupt lines named one by one per file; the rest are counted in one more warning.
MAX_NAMED_LINES = 20

_ERRORS = ("raise", "warn")
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"),
          (stat.S_ISREG, "a regular file"))


class NotRegularFileError(OSError):
    """A path that is not a regular file (a FIFO, a device, a socket, a directory).

    Reading one could block forever (a FIFO with no writer) or never end (``/dev/zero``),
    so the readers refuse it before opening it.

    Attributes:
        filename: The path.
        kind: What it is instead (:func:`file_kind`), e.g. ``"a FIFO"``.

    Example:
        >>> err = NotRegularFileError("run/events.jsonl", "a FIFO")
        >>> str(err)
        'run/events.jsonl: not a regular file (a FIFO)'
        >>> isinstance(err, OSError), err.strerror
        (True, 'not a regular file (a FIFO)')
    """

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        super().__init__(f"not a regular file ({kind})")
        self.filename = os.fspath(path)
        self.strerror = f"not a regular file ({kind})"
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, for a message: ``"a FIFO"``, ``"a socket"``, ...

    Args:
        mode: ``os.stat(path).st_mode``.

    Returns:
        ``"a regular file"``, ``"a directory"``, ``"a FIFO"``, ``"a character device"``,
        ``"a block device"``, ``"a socket"`` or ``"a symbolic link"``.

    Example:
        >>> file_kind(os.stat("/dev/null").st_mode)
        'a character device'
    """
    return next((name for test, name in _KINDS if test(mode)), "an unknown kind of file")


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading in binary mode, refusing anything that could block.

    ``path`` is checked with :func:`os.stat` (symbolic links followed) *before* it is
    opened, so a FIFO, a device or a socket is never opened; it is then opened
    non-blocking and checked again with :func:`os.fstat`, so a file swapped in between
    cannot slip through either.

    Args:
        path: The file.

    Returns:
        The open file (the caller closes it).

    Raises:
        NotRegularFileError: If ``path`` is not a regular file.
        OSError: If it cannot be opened (missing, permission denied, name too long, a
            symbolic-link loop, ...).

    Example:
        >>> open_regular("/dev/null")
        Traceback (most recent call last):
        ...
        lr_monitor.eventlog.NotRegularFileError: /dev/null: not a regular file (a character device)
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(path, file_kind(mode))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, file_kind(mode))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def rotated_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The rotated files of ``path`` that exist, oldest first: ``path.N`` ... ``path.1``.

    A name that exists as anything (a broken symbolic link, a FIFO) counts, so that the
    reader can say why it skipped it.

    Args:
        path: The event log, e.g. ``run/events.jsonl``.

    Returns:
        ``[path.N, ..., path.1]``, the consecutive rotated names that exist.

    Example:
        >>> rotated_paths("/nonexistent/events.jsonl")
        []
    """
    found: list[Path] = []
    index = 1
    while os.path.lexists(backup_path(path, index)):
        found.append(backup_path(path, index))
        index += 1
    return found[::-1]


def read_events(
    path: str | os.PathLike[str], *, include_rotated: bool = False, errors: str = "raise"
) -> list[GuardEvent]:
    r"""Read an event log written by :class:`EventLogWriter`, never blocking, never unbounded.

    Guarantees, whatever the file holds:

    * Only regular files are opened (:func:`open_regular`): a FIFO, a device or a socket
      named ``events.jsonl`` raises :class:`NotRegularFileError` instead of hanging.
    * Reads are bounded: a line longer than :data:`MAX_LINE_BYTES` is not decoded (it is
      a corrupt line), and reading a file stops after :data:`MAX_FILE_BYTES` with a
      warning.
    * A line is an event only if :meth:`GuardEvent.from_dict` accepts every field; deep
      nesting, huge numbers or bytes that are not UTF-8 make a corrupt line, never
      another exception.
    * A corrupt or incomplete *last* line -- what a process killed mid-write leaves
      behind -- is skipped with a warning on the ``lr_monitor.eventlog`` logger.
    * Any other corrupt line raises :class:`EventFileError` (``errors="raise"``) or is
      skipped with one warning naming the file and the line (``errors="warn"``; after
      :data:`MAX_NAMED_LINES` in one file the rest are counted in one more warning);
      every other line is kept.

    Args:
        path: The ``events.jsonl`` file.
        include_rotated: Also read the rotated files ``path.N`` ... ``path.1`` that exist,
            oldest first, so the result is in chronological order. With
            ``errors="warn"``, a rotated file that cannot be read is skipped with a
            warning.
        errors: ``"raise"`` or ``"warn"``, what to do about a corrupt line that is not the
            last one.

    Returns:
        The events, in file order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        NotRegularFileError: If ``path`` is not a regular file.
        OSError: If ``path`` (or, with ``errors="raise"``, a rotated file) cannot be read.
        EventFileError: With ``errors="raise"``, for a corrupt line that is not the last
            one, naming file and line.
        ValueError: For an ``errors`` other than ``"raise"`` or ``"warn"``.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, EVENTS_FILENAME)
        ...     with open(path, "w") as f:
        ...         _ = f.write('{"step": 1, "kind": "spike", "signal": "loss"}\n'
        ...                     '{"step": "one", "kind": "spike", "signal": "loss"}\n'
        ...                     '{"step": 3, "kind": "spike", "signal": "loss"}\n{"step": 4, "ki')
        ...     [e.step for e in read_events(path, errors="warn")]  # line 2 and 4 skipped
        [1, 3]
    """
    check_choice("errors", errors, _ERRORS)
    files = [*rotated_paths(path), Path(path)] if include_rotated else [Path(path)]
    events: list[GuardEvent] = []
    for file in files:
        try:
            events.extend(_read_one(file, strict=errors == "raise"))
        except OSError as exc:
            if file == files[-1] or errors == "raise":
                raise
            _log.warning("%s: skipped (%s)", file, exc.strerror or exc)
    return events


def event_key(event: GuardEvent) -> tuple[str | None, int, str, str]:
    """What makes an event one decision: its run, step, kind and signal.

    A guard records at most one event per step, and a component's fault once, so two
    events with the same key are the same decision written twice -- by a run resumed
    from a checkpoint, replaying the steps after it.

    Example:
        >>> event_key(GuardEvent(step=4, kind="spike", signal="loss", value=9.0,
        ...                      threshold=3.0, time=0.0))
        (None, 4, 'spike', 'loss')
    """
    return event.run, event.step, event.kind, event.signal


def unique_events(events: Iterable[GuardEvent]) -> list[GuardEvent]:
    """``events`` with each decision once (:func:`event_key`): the last copy is kept.

    A run resumed from a checkpoint decides the steps after it again; when that record
    could not be rewound (:meth:`EventLogWriter.rewind`: a log written by an older version,
    or replaced), both copies are in the file, and the later one is the resumed run's.

    Args:
        events: Events in file order.

    Returns:
        The events whose key does not appear again later, in file order.

    Example:
        >>> def e(step, value):
        ...     return GuardEvent(step=step, kind="spike", signal="loss", value=value,
        ...                       threshold=3.0, time=0.0)
        >>> [(x.step, x.value) for x in unique_events([e(1, 5.0), e(2, 6.0), e(2, 7.0)])]
        [(1, 5.0), (2, 7.0)]
    """
    events = list(events)
    last = {event_key(e): i for i, e in enumerate(events)}
    return [e for i, e in enumerate(events) if last[event_key(e)] == i]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing key {exc}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return " ".join(str(exc).split()) or type(exc).__name__


def _lines(file: BinaryIO, path: Path) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, line)`` up to :data:`MAX_FILE_BYTES`; ``None`` for an over-long line."""
    read = 0
    lineno = 0
    while True:
        if read >= MAX_FILE_BYTES:
            rest = os.fstat(file.fileno()).st_size - read
            if rest > 0:
                _log.warning("%s: read the first %d bytes (the limit per file); the last %d "
                             "bytes were skipped", path, MAX_FILE_BYTES, rest)
            return
        line = file.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        lineno += 1
        read += len(line)
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip to the end of this line
                line = file.readline(65536)
                read += len(line)
            yield lineno, None
        else:
            yield lineno, line


def _read_one(path: Path, *, strict: bool) -> list[GuardEvent]:
    events: list[GuardEvent] = []
    pending: tuple[int, str] | None = None  # a corrupt line, unless it turns out to be the last
    unnamed = 0
    named = 0
    with open_regular(path) as file:
        for lineno, raw in _lines(file, path):
            if raw is not None and not raw.strip(_BLANK + b"\n"):
                continue
            if pending is not None:
                if strict:
                    raise EventFileError(path, *pending)
                if named < MAX_NAMED_LINES:
                    _log.warning("%s, line %d: skipped a corrupt event record (%s)", path,
                                 *pending)
                    named += 1
                else:
                    unnamed += 1
                pending = None
            if raw is None:
                pending = (lineno, f"longer than {MAX_LINE_BYTES} bytes, the limit for one "
                                   "event record")
                continue
            try:
                events.append(decode_event(raw.rstrip(b"\n")))
            except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as exc:
                pending = (lineno, _describe(exc))
    if unnamed:
        _log.warning("%s: %d more corrupt lines skipped (only the first %d are named)", path,
                     unnamed, MAX_NAMED_LINES)
    if pending is not None:
        _log.warning("%s, line %d: skipped an incomplete last line, as an interrupted write "
                     "leaves it (%s)", path, *pending)
    return events
