"""TensorBoard event files (``events.out.tfevents.*``), read so that nothing on disk can hurt.

An event file is a sequence of TFRecord records::

    length   8 bytes, little-endian
    crc      4 bytes: masked CRC-32C of the 8 length bytes
    data     length bytes: one serialised ``Event`` protocol buffer
    crc      4 bytes: masked CRC-32C of the data

TensorBoard's own reader believes a length whose header CRC matches, however large (a
crafted header makes it allocate terabytes), and stops without a word at the first record
that fails a check. :func:`read_scalars` reads the records itself:

* only a regular file is opened (:func:`lr_monitor.eventlog.open_regular`);
* no length is believed before its header CRC is checked, nor beyond the bytes left in
  the file, and at most :data:`MAX_EVENT_FILE_BYTES` are read per file and
  :data:`MAX_RECORD_BYTES` per record;
* a record whose data fails its CRC is skipped (its header was intact, so the next
  record is where it says); after a damaged header, reading resumes at the next intact
  header; a truncated last record is skipped; each is one warning naming the record
  number and byte offset, on the ``lr_monitor.cli.tfevents`` logger;
* the CRCs are checked with numpy, across records and across 1 KiB lanes of long ones
  (:func:`masked_crc32c` is the same function, one buffer at a time).

The data are parsed with TensorBoard's ``Event`` protocol buffer and the scalars kept as
TensorBoard's ``EventAccumulator`` keeps them (see :func:`read_scalars`): the same tags,
steps and values, in the same order, restarts purging the points they orphaned.

This module only reads files; it does not import Lightning or torch.

Example:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with SummaryWriter(d) as w:
    ...         for step in range(3):
    ...             w.add_scalar("train/loss", 1.0 / (step + 1), step)
    ...     series = read_scalars(sorted(Path(d).iterdir()))["train/loss"]
    >>> series.steps.tolist(), series.values.tolist()
    ([0, 1, 2], [1.0, 0.5, 0.3333333432674408])
"""

from __future__ import annotations

import logging
import os
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from lr_monitor.cli.safe_text import display_path
from lr_monitor.eventlog import NotRegularFileError, open_regular

__all__ = [
    "MAX_EVENT_FILE_BYTES",
    "MAX_RECORD_BYTES",
    "Series",
    "masked_crc32c",
    "read_scalars",
]

_log = logging.getLogger("lr_monitor.cli.tfevents")

#: The most bytes read from one event file (4 GiB); the rest is skipped with a warning.
MAX_EVENT_FILE_BYTES = 4 << 30

#: The longest record read (256 MiB; no summary is this big); a longer one is skipped
#: unread, with a warning, and reading goes on after it.
MAX_RECORD_BYTES = 256 << 20

_CHUNK = 4 << 20  # bytes read at a time
_MAX_NAMED = 20  # damaged places named one by one per file


@dataclass(frozen=True, eq=False)
class Series:
    """One scalar tag of a run: steps and values in logging order.

    Args:
        steps: Global steps, as logged (``int64``).
        values: The values (``float64``; may contain ``nan``/``inf``).
    """

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    def last(self) -> tuple[int, float]:
        """The last ``(step, value)`` pair.

        Raises:
            IndexError: If the series is empty.

        Example:
            >>> Series(np.array([0, 1]), np.array([3.0, 2.5])).last()
            (1, 2.5)
        """
        if not len(self.steps):
            raise IndexError("empty series")
        return int(self.steps[-1]), float(self.values[-1])

    def finite(self) -> Series:
        """The points whose value is finite.

        Example:
            >>> len(Series(np.array([0, 1, 2]), np.array([1.0, np.nan, np.inf])).finite())
            1
        """
        keep = np.isfinite(self.values)
        return Series(self.steps[keep], self.values[keep])


# ------------------------------------------------------------------------------ CRC-32C
#
# CRC-32C (Castagnoli, reflected polynomial 0x82f63b78), as TFRecord stores it: masked,
# i.e. rotated right by 15 bits plus 0xa282ead8. The register update is linear over
# GF(2), so the register after A||B from c is R(c, A||B) = R(0, B) ^ Z(R(c, A)), where Z
# runs len(B) zero bytes through the register. A long buffer is cut into lanes of
# _LANE bytes (the first one shorter): every lane of every record is run through the
# table at once with numpy, from the initial register for a first lane and from 0 for
# the others, then each record's lanes are chained with Z for _LANE bytes (four
# 256-entry tables).

_LANE = 1024


def _crc32c_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table.astype(np.uint32)


_TABLE = _crc32c_table()
_TABLE_LIST = [int(x) for x in _TABLE]


def _zeros_tables(n: int) -> list[list[int]]:
    """Four tables: ``Z(c) = T0[c & 255] ^ T1[c >> 8 & 255] ^ T2[...] ^ T3[c >> 24]``."""
    basis = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
    for _ in range(n):
        basis = _TABLE[basis & 0xFF] ^ (basis >> np.uint32(8))
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8): the bits of a byte
    return [np.bitwise_xor.reduce(np.where(bits, basis[8 * j:8 * j + 8], 0), axis=1)
            .astype(np.uint32).tolist() for j in range(4)]


_Z0, _Z1, _Z2, _Z3 = _zeros_tables(_LANE)


def _mask(crc: Any) -> Any:
    """TFRecord's masking of a final CRC (works on ints and on ``uint32`` arrays)."""
    if isinstance(crc, np.ndarray):
        return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _registers(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
               init: np.ndarray) -> np.ndarray:
    """The CRC register after ``buf[s:s+n]`` from ``init``, for every ``(s, n, init)``."""
    out = np.empty(len(starts), dtype=np.uint32)
    if not len(starts):
        return out
    order = np.argsort(-lengths, kind="stable")
    s, n = starts[order], lengths[order]
    crc = init[order].astype(np.uint32)
    active = len(s)
    eight = np.uint32(8)
    for k in range(int(n[0])):
        while n[active - 1] <= k:
            active -= 1
        c = crc[:active]
        crc[:active] = _TABLE[(c ^ buf[s[:active] + k]) & 0xFF] ^ (c >> eight)
    out[order] = crc
    return out


def _masked_crcs(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Masked CRC-32C of ``buf[s:s+n]`` for every ``(s, n)``, vectorised across them."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    lanes = np.maximum(1, -(-lengths // _LANE))  # lanes per buffer
    first = lengths - (lanes - 1) * _LANE  # the first lane takes the remainder
    owner = np.repeat(np.arange(len(starts)), lanes)
    head = np.cumsum(lanes) - lanes  # index of each buffer's first lane
    j = np.arange(len(owner)) - head[owner]  # lane number within its buffer
    lane_starts = starts[owner] + np.where(j == 0, 0, first[owner] + (j - 1) * _LANE)
    lane_lengths = np.where(j == 0, first[owner], _LANE)
    init = np.where(j == 0, np.uint32(0xFFFFFFFF), np.uint32(0))
    regs = _registers(buf, lane_starts, lane_lengths, init)
    crcs = regs[head]
    long = np.flatnonzero(lanes > 1)
    if len(long):
        values = regs.tolist()
        z0, z1, z2, z3 = _Z0, _Z1, _Z2, _Z3
        for i in long.tolist():
            lo = int(head[i])
            c = values[lo]
            for lane in values[lo + 1:lo + int(lanes[i])]:
                c = z0[c & 255] ^ z1[c >> 8 & 255] ^ z2[c >> 16 & 255] ^ z3[c >> 24] ^ lane
            crcs[i] = c
    return np.asarray(_mask(crcs ^ np.uint32(0xFFFFFFFF)), dtype=np.uint32)


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C (Castagnoli) of ``data``, as TFRecord files store it.

    Args:
        data: The bytes (a record's 8-byte length, or its data).

    Returns:
        The CRC, rotated right by 15 bits plus ``0xa282ead8`` (mod 2**32).

    Example:
        >>> hex(masked_crc32c(b"123456789"))  # CRC-32C check value 0xe3069283, masked
        '0xc78ab0e5'
    """
    if len(data) > 64:
        buf = np.frombuffer(data, dtype=np.uint8)
        return int(_masked_crcs(buf, np.zeros(1, np.int64), np.array([len(data)]))[0])
    table = _TABLE_LIST
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return int(_mask(crc ^ 0xFFFFFFFF))


# ------------------------------------------------------------------------------ records


class _RecordReader:
    """The intact records of one open event file; every damaged place is warned about.

    Iterate to get ``(record number, file offset, data)``; :meth:`note` warns about a
    place (at most :data:`_MAX_NAMED` warnings per file, then one count).
    """

    def __init__(self, file: IO[bytes], path: Path, size: int) -> None:
        self.file = file
        self.path = path
        self.size = size
        self.end = min(size, MAX_EVENT_FILE_BYTES)
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.index = 0  # records met so far (intact or not), for the messages
        self.damaged = 0

    def note(self, message: str, *args: Any) -> None:
        self.damaged += 1
        if self.damaged <= _MAX_NAMED:
            _log.warning("%s: " + message, display_path(self.path), *args)

    def finish(self) -> None:
        if self.damaged > _MAX_NAMED:
            _log.warning("%s: %d more damaged places skipped (only the first %d are named)",
                         display_path(self.path), self.damaged - _MAX_NAMED, _MAX_NAMED)

    def _cap(self, start: int) -> None:
        """Reading stops at ``start``: the next record would cross the size limit."""
        _log.warning("%s: read the first %d bytes (the limit per event file is %d); the last "
                     "%d bytes were skipped", display_path(self.path), start,
                     MAX_EVENT_FILE_BYTES, self.size - start)

    # -- buffer

    def _drop(self, pos: int) -> None:
        """Forget ``buf[:pos]``."""
        self.buf, self.base = self.buf[pos:], self.base + pos

    def _fill(self, need: int) -> bool:
        """Make ``buf`` hold at least ``need`` bytes (False when the file ends first)."""
        want = min(max(need, _CHUNK), self.end - self.base) - len(self.buf)
        if want > 0:
            more = self.file.read(want)
            self.buf += more
            if len(more) < want:  # the file shrank while being read: it ends here now
                self.end = self.size = self.base + len(self.buf)
        return len(self.buf) >= need

    def _header_ok(self, pos: int) -> bool:
        stored = struct.unpack_from("<I", self.buf, pos + 8)[0]
        return bool(masked_crc32c(self.buf[pos:pos + 8]) == stored)

    # -- reading

    def __iter__(self) -> Iterator[tuple[int, int, bytes]]:
        while True:
            if not self._fill(12):
                if self.end < self.size:
                    self._cap(self.base)
                elif self.buf:
                    self.note("ends in a truncated record (record %d at byte %d: %d bytes, "
                              "less than a record header), skipped", self.index + 1,
                              self.base, len(self.buf))
                return
            spans, pos = self._walk()
            bad_header = self._bad_header(spans)
            yield from self._checked(spans if bad_header is None else spans[:bad_header])
            if bad_header is not None:
                pos = spans[bad_header][0]
            elif pos + 12 > len(self.buf):  # no whole header left in the buffer: read on
                self._drop(pos)
                continue
            elif self._header_ok(pos):  # an intact header whose record is not in the buffer
                if self._read_whole(pos):
                    continue
                return
            self.index += 1
            found = self._resync(pos)
            if found is None:
                return
            self._drop(found)

    def _walk(self) -> tuple[list[tuple[int, int]], int]:
        """``(offset, length)`` of the records wholly in ``buf``, and where they end."""
        spans: list[tuple[int, int]] = []
        pos, buf = 0, self.buf
        unpack = struct.Struct("<Q").unpack_from
        while pos + 12 <= len(buf):
            (length,) = unpack(buf, pos)
            if pos + 16 + length > len(buf):
                break
            spans.append((pos, length))
            pos += 16 + length
        return spans, pos

    def _bad_header(self, spans: list[tuple[int, int]]) -> int | None:
        """Index of the first span whose header fails its CRC (its length is a lie)."""
        if not spans:
            return None
        data = np.frombuffer(self.buf, dtype=np.uint8)
        starts = np.fromiter((s for s, _ in spans), dtype=np.int64, count=len(spans))
        computed = _masked_crcs(data, starts, np.full(len(starts), 8, dtype=np.int64))
        bad = np.flatnonzero(computed != _words(data, starts + 8))
        return int(bad[0]) if len(bad) else None

    def _checked(self, spans: list[tuple[int, int]]) -> Iterator[tuple[int, int, bytes]]:
        """The spans' data in order; one whose data fails its CRC is warned about."""
        if not spans:
            return
        data = np.frombuffer(self.buf, dtype=np.uint8)
        starts = np.fromiter((s + 12 for s, _ in spans), dtype=np.int64, count=len(spans))
        lengths = np.fromiter((n for _, n in spans), dtype=np.int64, count=len(spans))
        ok = (_masked_crcs(data, starts, lengths) == _words(data, starts + lengths)).tolist()
        for i, (start, n) in enumerate(spans):
            self.index += 1
            if ok[i]:
                yield self.index, self.base + start, self.buf[start + 12:start + 12 + n]
            else:
                self.note("record %d at byte %d is corrupt (data CRC mismatch), skipped; the "
                          "records after it were read", self.index, self.base + start)

    def _read_whole(self, pos: int) -> bool:
        """Get the record at ``buf[pos]`` (intact header) into ``buf``; False: reading ends."""
        (length,) = struct.unpack_from("<Q", self.buf, pos)
        start = self.base + pos
        stop = start + 16 + length
        if stop > self.size:
            self.note("ends in a truncated record (record %d at byte %d: %d of its %d bytes "
                      "present), skipped", self.index + 1, start, self.size - start,
                      16 + length)
            return False
        if stop > self.end:
            self._cap(start)
            return False
        if length > MAX_RECORD_BYTES:
            self.index += 1
            self.note("record %d at byte %d holds %d bytes, more than the %d bytes one record "
                      "may hold here, skipped", self.index, start, length, MAX_RECORD_BYTES)
            self.file.seek(stop)
            self.base, self.buf = stop, b""
            return True
        self._drop(pos)
        if self._fill(16 + length):
            return True
        self.note("ends in a truncated record (record %d at byte %d), skipped", self.index + 1,
                  self.base)
        return False

    def _resync(self, pos: int) -> int | None:
        """Offset in ``buf`` of the next intact header after the damaged one at ``pos``."""
        damaged_at = self.base + pos
        search = pos + 1
        while True:
            found = _find_header(self.buf, search, self.base, self.end)
            if found is not None:
                self.note("record %d at byte %d is corrupt (header CRC mismatch): bytes %d to "
                          "%d skipped, reading resumed at the next intact record", self.index,
                          damaged_at, damaged_at, self.base + found)
                return found
            if self.base + len(self.buf) >= self.end:
                if damaged_at == 0:
                    self.note("not a TensorBoard event file (no intact record in its %d "
                              "bytes), skipped", self.end)
                else:
                    self.note("corrupt from record %d at byte %d (header CRC mismatch): no "
                              "intact record after it, the last %d bytes skipped", self.index,
                              damaged_at, self.end - damaged_at)
                return None
            keep = max(search, len(self.buf) - 11)
            self._drop(keep)
            search = 0
            self._fill(len(self.buf) + 1)


def _words(data: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The little-endian ``uint32`` at each offset of ``at`` in ``data``."""
    b = data[at[:, None] + np.arange(4)].astype(np.uint32)
    return b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24


def _find_header(buf: bytes, start: int, base: int, end: int) -> int | None:
    """The first offset ``>= start`` in ``buf`` holding an intact record header."""
    data = np.frombuffer(buf, dtype=np.uint8)
    window = 1 << 20
    last = len(buf) - 12  # the last offset with a whole header in buf
    for lo in range(start, last + 1, window):
        hi = min(lo + window, last + 1)
        crc = np.full(hi - lo, 0xFFFFFFFF, dtype=np.uint32)
        for k in range(8):
            crc = _TABLE[(crc ^ data[lo + k:hi + k]) & 0xFF] ^ (crc >> np.uint32(8))
        masked = _mask(crc ^ np.uint32(0xFFFFFFFF))
        stored = (data[lo + 8:hi + 8].astype(np.uint32)
                  | data[lo + 9:hi + 9].astype(np.uint32) << 8
                  | data[lo + 10:hi + 10].astype(np.uint32) << 16
                  | data[lo + 11:hi + 11].astype(np.uint32) << 24)
        for p in np.flatnonzero(masked == stored):
            offset = lo + int(p)
            (length,) = struct.unpack_from("<Q", buf, offset)
            if base + offset + 16 + length <= end:
                return offset
    return None


# ------------------------------------------------------------------------------ scalars


def _parse_file_version(text: str) -> float:
    """``"brain.Event:2"`` -> 2.0, as TensorBoard's ``event_util`` reads it (-1 if it cannot)."""
    try:
        return float(text.split("brain.Event:")[-1])
    except ValueError:
        return -1.0


class _Scalars:
    """The scalars of a run's events, as TensorBoard's ``EventAccumulator`` keeps them.

    Points are ``simple_value`` summaries and scalar tensors of the ``scalars`` plugin
    (``add_scalar(..., new_style=True)``, ``tf.summary.scalar``), per tag in file order.
    A restart purges what it orphaned: in files of version 2 and later a
    ``SessionLog.START`` drops every point at its step or later; in older files (or
    without a version), an event with a summary whose step is below the latest step
    drops the points of its tags from its step on.

    Points are kept in flat arrays (20 bytes each) and purges are recorded, not applied:
    whether a purge happens never depends on the points, so :meth:`series` applies them
    all at the end, with numpy, in ``O(n log n)`` however many purges a file holds.
    """

    def __init__(self) -> None:
        from tensorboard.compat.proto import event_pb2, types_pb2
        from tensorboard.util.tensor_util import make_ndarray

        self._start = event_pb2.SessionLog.START
        self._numbers = frozenset(types_pb2.DataType.Value(name) for name in _NUMBER_TYPES)
        self._make_ndarray = make_ndarray
        self.tag_ids: dict[str, int] = {}
        self.plugins: dict[str, str] = {}  # a tag's plugin, from its first metadata
        self.tags = array("i")
        self.steps = array("q")
        self.values = array("d")
        self.purges: list[tuple[int, int, tuple[int, ...] | None]] = []  # (points, step, tags)
        self.file_version: float | None = None
        self.most_recent_step = -1

    def add(self, event: Any) -> None:
        what = event.WhichOneof("what")  # file_version, summary, session_log, graph_def, ...
        step = event.step
        if what == "file_version":
            self.file_version = _parse_file_version(event.file_version)
        version = self.file_version
        if version is not None and version >= 2:
            if what == "session_log" and event.session_log.status == self._start:
                self.purges.append((len(self.steps), step, None))
        elif step < self.most_recent_step and what == "summary":
            known = tuple(self.tag_ids[v.tag] for v in event.summary.value
                          if v.tag in self.tag_ids)
            if known:
                self.purges.append((len(self.steps), step, known))
        else:
            self.most_recent_step = step
        if what != "summary":
            return
        plugins, ids = self.plugins, self.tag_ids
        for value in event.summary.value:
            tag = value.tag
            if tag not in plugins and value.HasField("metadata"):
                plugins[tag] = value.metadata.plugin_data.plugin_name
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                x: float | None = value.simple_value
            elif kind == "tensor" and plugins.get(tag) == "scalars":
                x = _tensor_scalar(value.tensor, self._numbers, self._make_ndarray)
                tag = tag or value.node_name
            else:
                continue
            if x is not None:
                tid = ids.get(tag)
                if tid is None:
                    tid = ids[tag] = len(ids)
                self.tags.append(tid)
                self.steps.append(step)
                self.values.append(x)

    def series(self) -> dict[str, Series]:
        """Every tag's points once every purge is applied, sorted by tag."""
        tags = np.frombuffer(self.tags, dtype=np.int32) if len(self.tags) else \
            np.empty(0, np.int32)
        steps = np.frombuffer(self.steps, dtype=np.int64) if len(self.steps) else \
            np.empty(0, np.int64)
        values = np.frombuffer(self.values, dtype=np.float64) if len(self.values) else \
            np.empty(0, np.float64)
        keep = np.ones(len(steps), dtype=bool)
        order = np.argsort(tags, kind="stable")  # each tag's points, in file order
        bounds = np.searchsorted(tags[order], np.arange(len(self.tag_ids) + 1))
        everywhere = [(n, s) for n, s, t in self.purges if t is None]
        if everywhere:
            _apply(keep, np.arange(len(steps)), steps, everywhere)
        by_tag: dict[int, list[tuple[int, int]]] = {}
        for n, s, t in self.purges:
            for tid in t or ():
                by_tag.setdefault(tid, []).append((n, s))
        for tid, purges in by_tag.items():
            index = order[bounds[tid]:bounds[tid + 1]]
            _apply(keep, index, steps, purges)
        out = {}
        for tag, tid in sorted(self.tag_ids.items()):
            index = order[bounds[tid]:bounds[tid + 1]]
            index = index[keep[index]]
            out[tag] = Series(steps[index], values[index])
        return out


def _apply(keep: np.ndarray, index: np.ndarray, steps: np.ndarray,
           purges: list[tuple[int, int]]) -> None:
    """Drop the points ``index`` (ascending) that a later purge of ``purges`` orphaned.

    A purge ``(n, s)`` came after the first ``n`` points and drops those at step ``s`` or
    later: a point survives iff its step is below the smallest ``s`` of the purges that
    came after it.
    """
    came_after = np.array([n for n, _ in purges], dtype=np.int64)  # ascending
    lowest = np.minimum.accumulate(np.array([s for _, s in purges], dtype=np.int64)[::-1])[::-1]
    first = np.searchsorted(came_after, index, side="right")  # first purge after the point
    later = first < len(purges)
    hit = index[later]
    keep[hit] &= steps[hit] < lowest[first[later]]


#: The tensor types a scalar may have (``DataType`` names of TensorFlow's ``types.proto``).
_NUMBER_TYPES = ("DT_FLOAT", "DT_DOUBLE", "DT_HALF", "DT_BFLOAT16", "DT_INT8", "DT_INT16",
                 "DT_INT32", "DT_INT64", "DT_UINT8", "DT_UINT16", "DT_UINT32", "DT_UINT64",
                 "DT_BOOL")


def _tensor_scalar(tensor: Any, numbers: frozenset[int], make_ndarray: Any) -> float | None:
    """The value of a one-element numeric tensor, as TensorBoard reads it; else ``None``.

    The shape is checked first: TensorBoard's ``make_ndarray`` fills a tensor of the shape
    a record claims, however large, from one stored value.
    """
    if tensor.dtype not in numbers or any(d.size != 1 for d in tensor.tensor_shape.dim):
        return None
    try:
        return float(make_ndarray(tensor).item())
    except (TypeError, ValueError, OverflowError):
        return None


def read_scalars(
    files: Sequence[str | os.PathLike[str]], *, opened: list[Path] | None = None,
) -> dict[str, Series]:
    """The scalars of a run's TensorBoard event files, read so that nothing can go wrong.

    The files are read in the order given, as one run: what TensorBoard's
    ``EventAccumulator`` returns for a directory holding them (it reads its files in name
    order), tag for tag and point for point. Points are ``simple_value`` summaries
    (``SummaryWriter.add_scalar``, Lightning's ``TensorBoardLogger``) and one-element
    numeric tensors of the ``scalars`` plugin (``add_scalar(..., new_style=True)``,
    ``tf.summary.scalar``), which TensorBoard's Scalars dashboard shows too; histograms,
    images, text, hparams and the custom-scalars layout are not scalars. A restart
    purges the points it orphaned, as TensorBoard does: for files of version 2 and later
    (every writer of the last years), a ``SessionLog.START`` event drops every point at
    its step or later; in older files, a summary whose step is below the latest step seen
    drops its tags' points from that step on. A run resumed into a new file without a
    ``SessionLog.START`` (PyTorch, Lightning) keeps every point, repeated steps included.

    For every file:

    * only a regular file is opened (:func:`lr_monitor.eventlog.open_regular`); one that is
      not, or cannot be opened, is skipped with a warning;
    * at most :data:`MAX_EVENT_FILE_BYTES` are read, record by record (never more than a
      record header says, never a length no header CRC vouched for, never a record over
      :data:`MAX_RECORD_BYTES`);
    * a record whose data fails its CRC is skipped and named (record number, byte
      offset); after a damaged header, reading resumes at the next intact one, and the
      bytes in between are named; a truncated last record is named. Every record before
      and after the damage is kept.

    Warnings go to the ``lr_monitor.cli.tfevents`` logger.

    Args:
        files: The event files.
        opened: If given, the files that could be opened are appended to it.

    Returns:
        ``{tag: Series}`` of every scalar tag, sorted by tag.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with SummaryWriter(d) as w:
        ...         w.add_scalar("train/loss", 0.5, 3)
        ...         w.add_scalar("val/acc", 0.25, 3, new_style=True)
        ...     found: list[Path] = []
        ...     scalars = read_scalars(sorted(Path(d).iterdir()), opened=found)
        >>> scalars["train/loss"].last(), scalars["val/acc"].last(), len(found)
        ((3, 0.5), (3, 0.25), 1)
    """
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2

    parse = event_pb2.Event.FromString
    scalars = _Scalars()
    for name in files:
        path = Path(name)
        try:
            file = open_regular(path)
        except NotRegularFileError as exc:
            _log.warning("%s: skipped (%s)", display_path(path), exc.strerror)
            continue
        except (OSError, ValueError) as exc:
            _log.warning("%s: skipped (%s)", display_path(path),
                         getattr(exc, "strerror", None) or exc)
            continue
        if opened is not None:
            opened.append(path)
        with file:
            reader = _RecordReader(file, path, os.fstat(file.fileno()).st_size)
            for index, offset, data in reader:
                try:
                    event = parse(data)
                except (DecodeError, ValueError, RecursionError) as exc:
                    reader.note("record %d at byte %d is not a TensorBoard event (%s), "
                                "skipped", index, offset, " ".join(str(exc).split())[:200])
                    continue
                scalars.add(event)
            reader.finish()
    return scalars.series()
