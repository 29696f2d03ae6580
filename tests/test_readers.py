"""Readers that cannot hang or crash: ``lr-monitor report``/``plot`` against hostile files.

Every file here is real: TensorBoard event files written with
``torch.utils.tensorboard.SummaryWriter``, by a Lightning ``Trainer`` with
``TensorBoardLogger`` or by TensorBoard's own writer (restarts, file versions), read back
by :mod:`lr_monitor.cli.tfevents` and compared with TensorBoard's ``EventAccumulator``;
``events.jsonl`` lines, FIFOs, sockets, symbolic links to devices, unreadable files and
directories. What could hang or needs another user (a process running as root reads
anything) runs :func:`lr_monitor.cli.main` in a forked child with a timeout, as ``nobody``
when the tests run as root; a hang is a failure, not a stuck suite.

Property tests (hypothesis) mutate event-file bytes (truncation, bit flips, garbage) and
``events.jsonl`` lines (any JSON value in any field, any bytes): the readers return, keep
every intact record and line, and name everything they skip. Random event sequences
(versions, session logs, steps going back, several files) read as TensorBoard reads them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lr_monitor import eventlog
from lr_monitor.cli import main, tfevents
from lr_monitor.cli.report import ReportError, load_runs
from lr_monitor.cli.safe_text import display_path, terminal_safe
from lr_monitor.cli.tfevents import masked_crc32c, read_scalars
from lr_monitor.eventlog import (
    EventFileError,
    NotRegularFileError,
    open_regular,
    read_events,
)
from lr_monitor.events import GuardEvent

STEPS = 12
NOBODY = 65534
BASE = {"step": 0, "kind": "spike", "signal": "loss", "value": 9.0, "threshold": 3.0,
        "message": "m", "actions": ["cut_lr"], "lr_before": {"Adam/pg0": 0.5},
        "lr_after": {"Adam/pg0": 0.25}, "lr_scale": 0.5, "epoch": 0, "time": 1.0, "run": "r"}

LINUX = sys.platform.startswith("linux")


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


# --------------------------------------------------------------------------- helpers


def write_run(run_dir: Path, steps: int = STEPS, **extra: float) -> Path:
    """A run of ``train/loss`` = step / 4 at steps 0..steps-1 (exact in float32)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir)) as writer:
        for step in range(steps):
            writer.add_scalar("train/loss", step / 4, step)
            for tag, value in extra.items():
                writer.add_scalar(tag.replace("__", "/"), value, step)
    return event_file(run_dir)


def event_file(run_dir: Path) -> Path:
    return next(p for p in sorted(run_dir.iterdir()) if "tfevents" in p.name)


def records(data: bytes) -> list[tuple[int, int]]:
    """``(offset, data length)`` of every record of a well-formed event file."""
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        out.append((pos, length))
        pos += 16 + length
    return out


def jsonl(step: int, **changes: Any) -> bytes:
    return json.dumps({**BASE, "step": step, **changes}).encode() + b"\n"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


_UNSAFE = ("Cc", "Cf", "Cs", "Zl", "Zp")


def unsafe(text: str) -> list[str]:
    import unicodedata

    return [hex(ord(c)) for c in text
            if c not in "\n" and unicodedata.category(c) in _UNSAFE]


@dataclass
class Done:
    rc: int | None  # None: still running after the timeout (killed)
    out: str
    err: str


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A real temporary directory that ``nobody`` can enter (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="lr-monitor-readers-"))
    path.chmod(0o777)
    yield path
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
    shutil.rmtree(path, ignore_errors=True)


def run_forked(argv: list[str], *, unprivileged: bool = False, timeout: float = 60.0) -> Done:
    """``main(argv)`` in a forked child with a timeout (and as nobody when asked and root)."""
    import lr_monitor.cli.plot  # noqa: F401 - imported before the fork (nobody cannot)

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        return _run_forked([out, err], argv, unprivileged, timeout)


def _run_forked(outs: list[Any], argv: list[str], unprivileged: bool, timeout: float) -> Done:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        rc = 98
        try:
            os.dup2(outs[0].fileno(), 1)
            os.dup2(outs[1].fileno(), 2)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), encoding="utf-8")
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), encoding="utf-8")
            if unprivileged and os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            logging.getLogger().handlers.clear()
            rc = main(argv)
        except BaseException:
            traceback.print_exc()
            rc = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        status = None
    texts = []
    for f in outs:
        f.seek(0)
        texts.append(f.read().decode("utf-8", "surrogateescape"))
    rc = None if status is None else os.waitstatus_to_exitcode(status)
    return Done(rc, texts[0], texts[1])


def allow_nobody(path: Path) -> None:
    """Let nobody read and write what the test wrote (modes set on purpose stay)."""
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full) and os.stat(full).st_mode & 0o777 in (0o644, 0o755):
                os.chmod(full, os.stat(full).st_mode | 0o777 if os.path.isdir(full) else 0o666)


# ------------------------------------------------------------------------ CRC-32C


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300) | st.binary(min_size=1000, max_size=5000))
def test_masked_crc32c_is_tensorboards(data: bytes) -> None:
    """Short buffers byte by byte, long ones in 1 KiB lanes chained; both are TensorBoard's."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb

    assert masked_crc32c(data) == tb(data)
    buf = np.frombuffer(b"\0" * 3 + data + b"\0", dtype=np.uint8)
    starts = np.array([3, 3, 3 + len(data) // 2], dtype=np.int64)
    lengths = np.array([len(data), 0, len(data) - len(data) // 2], dtype=np.int64)
    assert tfevents._masked_crcs(buf, starts, lengths).tolist() == [
        tb(data), tb(b""), tb(data[len(data) // 2:])]


def test_masked_crc32c_at_lane_boundaries() -> None:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb

    data = bytes(np.random.default_rng(1).integers(0, 256, 3 * 1024 + 7, dtype=np.uint8))
    sizes = [0, 1, 4, 64, 65, 1023, 1024, 1025, 2048, 2049, 3 * 1024 + 7]
    assert [masked_crc32c(data[:n]) for n in sizes] == [tb(data[:n]) for n in sizes]


# --------------------------------------------------------- the event-file reader


def points(scalars: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of :func:`read_scalars`' result."""
    return {tag: list(zip(s.steps.tolist(), s.values.tolist(), strict=True))
            for tag, s in scalars.items()}


def accumulator_points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard's EventAccumulator reads from a directory: every scalar, in full.

    ``simple_value`` scalars, and the scalar tensors of the ``scalars`` plugin (which it
    keeps as tensors) with their values as TensorBoard's scalars plugin reads them.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    for tag in acc.Tags()["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars":
            out[tag] = [(e.step, float(make_ndarray(e.tensor_proto).item()))
                        for e in acc.Tensors(tag)]
    return out


def run_dirs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("*") if "tfevents" in p.name})


def test_scalars_are_tensorboards_own(tmp_path: Path) -> None:
    """Every kind of summary SummaryWriter writes; only the scalars come back, as TB reads them.

    Histograms, images, audio, text, PR curves, hparams and a custom-scalars layout are
    not scalars; new-style (tensor) scalars in float32 and float64 are; a second writer
    with ``purge_step`` (PyTorch's restart: a ``SessionLog.START``) drops the points it
    orphaned; ``add_scalars`` and ``add_hparams`` write runs of their own below the run.
    """
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    for part, (first, purge) in enumerate([(0, None), (20, 20)]):
        with SummaryWriter(str(run), filename_suffix=f".{part}", purge_step=purge) as writer:
            if part == 0:
                writer.add_custom_scalars({"optim": {"lr": ["Multiline", ["optim/lr/.*"]]}})
                writer.add_hparams({"lr": 0.1, "opt": "adam"}, {"hp/best": 0.5})
            for step in range(first, first + 25):
                wall = 1000.0 + step
                writer.add_scalar("train/loss", float(rng.random()), step, walltime=wall)
                writer.add_scalar("optim/lr/Adam/pg0", 0.1, step)
                writer.add_scalar("val/acc", float(rng.random()), step, new_style=True)
                writer.add_scalar("val/f64", float(rng.random()) / 3, step, new_style=True,
                                  double_precision=True)
                writer.add_scalars("pair", {"a": step, "b": -step}, step)
                writer.add_histogram("optim/log10_eff_lr/Adam/pg0", rng.normal(size=500), step)
                if step % 10 == 0:
                    writer.add_image("img", rng.random((3, 40, 40)), step)  # > 4 KiB record
                    writer.add_text("note", "x" * 5000, step)
                    writer.add_audio("beep", rng.uniform(-1, 1, 800), step)
                    writer.add_pr_curve("pr", rng.integers(0, 2, 50), rng.random(50), step)
    dirs = run_dirs(run)
    assert len(dirs) == 4  # the run, pair_a, pair_b and the hparams run
    for run_dir in dirs[1:]:
        files = sorted(p for p in run_dir.iterdir() if "tfevents" in p.name)
        assert points(read_scalars(files)) == accumulator_points(run_dir), run_dir
    mine = read_scalars(sorted(p for p in run.iterdir() if "tfevents" in p.name))
    assert sorted(mine) == ["optim/lr/Adam/pg0", "train/loss", "val/acc", "val/f64"]
    assert mine["train/loss"].steps.tolist() == list(range(45))  # 20..24 of part 0 purged
    theirs = accumulator_points(run)
    for tag in ("optim/lr/Adam/pg0", "train/loss"):
        assert points(mine)[tag] == theirs[tag]
    for tag in ("val/acc", "val/f64"):  # EventAccumulator never purges tensors; the UI does
        assert points(mine)[tag] == theirs[tag][:20] + theirs[tag][25:]
    assert mine["val/f64"].values.dtype == np.float64 and mine["val/f64"].values[1] != \
        np.float32(mine["val/f64"].values[1])  # double precision kept


def test_a_lightning_run_reads_as_tensorboard_reads_it(tmp_path: Path) -> None:
    """A real Trainer with TensorBoardLogger, StepSizeMonitor and DivergenceGuard, resumed.

    The resumed fit writes a second event file in the same version directory; the
    monitor's histograms (records of several KiB), its custom-scalars layout and
    Lightning's hparams are in the files too.
    """
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger

    from lr_monitor import DivergenceGuard, StepSizeMonitor
    from tests.lightning_models import Regressor, regression_loader

    def fit(max_steps: int, ckpt: str | None = None) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            max_steps=max_steps, logger=TensorBoardLogger(str(tmp_path), name="run", version=0),
            callbacks=[StepSizeMonitor(1, histogram_every_n_steps=4, grad_histograms=True),
                       DivergenceGuard()],
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
            default_root_dir=str(tmp_path))
        model = Regressor(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2))
        trainer.fit(model, regression_loader(n=64), ckpt_path=ckpt)
        return trainer

    first = fit(8)
    # TensorBoard orders a run's files by name: the creation second, then a per-process
    # counter that is not zero-padded (".99" sorts after ".100"). Two files of the same
    # second late in a long test session can sort backwards, and the first file's steps then
    # purge the second's: a resumed run is a later second.
    time.sleep(1.1)
    fit(14, first.checkpoint_callback.best_model_path)  # type: ignore[union-attr]
    log_dir = tmp_path / "run" / "version_0"
    files = sorted(p for p in log_dir.iterdir() if "tfevents" in p.name)
    assert len(files) == 2
    data = b"".join(f.read_bytes() for f in files)  # whole records, so still records
    assert max(n for _, n in records(data)) > 4096  # the histograms
    mine = read_scalars(files)
    assert points(mine) == accumulator_points(log_dir)
    assert "optim/eff_lr/p50/Adam/global" in mine and "train/loss" in mine
    assert mine["train/loss"].steps.tolist()[-1] == 13


def _scalar_event(step: int, *values: tuple[str, float], tensor: bool = False) -> Any:
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2

    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    if tensor:
        vals = [summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, float_val=[x])) for tag, x in values]
    else:
        vals = [summary_pb2.Summary.Value(tag=tag, simple_value=x) for tag, x in values]
    return event_pb2.Event(step=step, wall_time=float(step), summary=summary_pb2.Summary(
        value=vals))


def test_restarts_purge_as_tensorboard_does(tmp_path: Path) -> None:
    """SessionLog.START drops the orphaned points (version 2); old files: steps going back."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    for version in ("brain.Event:2", "brain.Event:1"):
        run = tmp_path / version.replace(":", "_")
        writer = EventFileWriter(str(run))
        writer.add_event(event_pb2.Event(wall_time=0.0, file_version=version))
        for step in range(10):
            writer.add_event(_scalar_event(step, ("loss", step)))
            writer.add_event(_scalar_event(step, ("acc", step)))
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        writer.add_event(event_pb2.Event(step=6, wall_time=20.0, session_log=start))
        for step in range(6, 9):
            writer.add_event(_scalar_event(step, ("loss", 100 + step)))
        writer.close()
        mine = read_scalars([event_file(run)])
        assert points(mine) == accumulator_points(run)
        assert mine["loss"].values.tolist()[-3:] == [106, 107, 108]


def test_a_file_version_is_parsed_as_tensorboard_parses_it(tmp_path: Path) -> None:
    """``x:2`` is no version to TensorBoard (it splits on ``brain.Event:``): steps going back
    purge. The first version of this reader took the number after any colon."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    run = tmp_path / "run"
    writer = EventFileWriter(str(run))
    writer.add_event(event_pb2.Event(file_version="x:2"))
    for step in (*range(6), *range(3, 5)):
        writer.add_event(_scalar_event(step, ("loss", step)))
    writer.close()
    mine = read_scalars([event_file(run)])
    assert points(mine) == accumulator_points(run)
    assert mine["loss"].steps.tolist() == [0, 1, 2, 3, 4]


_KINDS = st.sampled_from(["summary", "summary", "summary", "session", "version"])
_EVENT = st.tuples(_KINDS, st.integers(0, 12),
                   st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), min_size=1,
                            max_size=3, unique_by=lambda v: v[0]),
                   st.sampled_from([1, 2, 3]), st.sampled_from(
                       ["brain.Event:1", "brain.Event:2", "brain.Event:3", "x:2", "junk"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_EVENT, max_size=20), min_size=1, max_size=3))
def test_any_event_sequence_reads_as_tensorboard_reads_it(files: list[list[Any]]) -> None:
    """Random runs of 1-3 files: file versions, session logs, steps going back and forth.

    ``simple_value`` scalars come back exactly as EventAccumulator's; a tensor (new-style)
    scalar comes back exactly as the same ``simple_value`` would (EventAccumulator keeps
    tensors apart and never purges them; TensorBoard's Scalars dashboard does).
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    def write(run: Path, tensors: bool) -> list[Path]:
        for i, file in enumerate(files):
            writer = EventFileWriter(str(run / str(i)))
            for kind, step, values, status, version in file:
                if kind == "version":
                    writer.add_event(event_pb2.Event(step=step, file_version=version))
                elif kind == "session":
                    writer.add_event(event_pb2.Event(step=step, session_log=event_pb2.SessionLog(
                        status=status)))
                else:
                    for is_tensor in (False, True):
                        chosen = [(f"t{t}" if t_ else t, step + 0.5) for t, t_ in values
                                  if t_ == is_tensor]
                        if chosen:
                            writer.add_event(_scalar_event(step, *chosen,
                                                           tensor=is_tensor and tensors))
            writer.close()
            os.replace(event_file(run / str(i)), run / f"events.out.tfevents.{i:02d}")
            (run / str(i)).rmdir()
        return sorted(run.iterdir())

    with tempfile.TemporaryDirectory() as d:
        mixed, simple = Path(d, "mixed"), Path(d, "simple")
        mine = points(read_scalars(write(mixed, True)))
        write(simple, False)
        assert mine == accumulator_points(simple)
        tensors_apart = accumulator_points(mixed)
        assert {t: p for t, p in mine.items() if not t.startswith("t")} == \
            {t: p for t, p in tensors_apart.items() if not t.startswith("t")}


@pytest.mark.parametrize("restart", ["steps-going-back", "session-start"])
def test_many_purges_take_linear_time(tmp_path: Path, restart: str) -> None:
    """A file where every event purges (or scans for) orphaned points is read, not hung on.

    The first version of this reader purged as EventAccumulator does, scanning a tag's
    points at every purge: a 4 MB file took minutes, quadratic in its size.
    Purges are now applied once, at the end. Run in a child with a timeout: a hang fails.
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    n = 80_000 if restart == "steps-going-back" else 40_000
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / "events.out.tfevents.1.host", "wb") as f:
        writer = RecordWriter(f)  # TensorBoard's own framing, without the writer thread
        if restart == "steps-going-back":  # version 1: every step below the latest purges
            writer.write(event_pb2.Event(file_version="brain.Event:1").SerializeToString())
            writer.write(_scalar_event(10**12, ("train/acc", 0.0)).SerializeToString())
        else:
            writer.write(event_pb2.Event(file_version="brain.Event:2").SerializeToString())
        for step in range(n):
            writer.write(_scalar_event(step, ("train/loss", 1.0)).SerializeToString())
        if restart == "session-start":  # each purges nothing (no point at 10**12)
            start = event_pb2.Event(step=10**12, session_log=event_pb2.SessionLog(
                status=event_pb2.SessionLog.START)).SerializeToString()
            for _ in range(2 * n):
                writer.write(start)
    done = run_forked(["report", str(tmp_path / "run"), "--json"], timeout=60)
    assert done.rc == 0, done
    assert json.loads(done.out)["runs"][0]["metrics"]["train/loss"]["points"] == n


def test_a_tensor_claiming_a_huge_shape_is_not_a_scalar(tmp_path: Path) -> None:
    """TensorBoard fills a tensor of the shape a record claims from one stored value; a
    one-value tensor claiming 2**40 elements is skipped, not allocated."""
    import tracemalloc

    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    event = _scalar_event(1, ("val/acc", 0.5), tensor=True)
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(
        size=1 << 40)])
    event.summary.value[0].tensor.tensor_shape.CopyFrom(shape)
    writer = EventFileWriter(str(tmp_path / "run"))
    writer.add_event(_scalar_event(0, ("val/acc", 0.25), tensor=True))
    writer.add_event(event)
    writer.add_event(_scalar_event(2, ("val/acc", 0.75), tensor=True))
    odd = _scalar_event(3, ("val/acc", 0.0), tensor=True)  # a string is no scalar either
    odd.summary.value[0].tensor.CopyFrom(tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, string_val=[b"x"]))
    writer.add_event(odd)
    writer.close()
    tracemalloc.start()
    try:
        series = read_scalars([event_file(tmp_path / "run")])["val/acc"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert points({"v": series}) == {"v": [(0, 0.25), (2, 0.75)]} and peak < 64 << 20


def test_a_bit_flip_loses_one_record_and_says_which(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = write_run(tmp_path / "run")
    data = bytearray(path.read_bytes())
    offset, length = records(bytes(data))[5]  # record 6: the point of step 4
    data[offset + 12 + length // 2] ^= 0x10
    path.write_bytes(data)
    series = read_scalars([path])["train/loss"]
    assert series.steps.tolist() == [s for s in range(STEPS) if s != 4]
    assert warnings_of(caplog) == [
        f"{path}: record 6 at byte {offset} is corrupt (data CRC mismatch), skipped; the "
        "records after it were read"]


def test_a_damaged_header_is_skipped_to_the_next_intact_record(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_run(tmp_path / "run")
    data = bytearray(path.read_bytes())
    spans = records(bytes(data))
    offset = spans[3][0]
    data[offset + 2] ^= 0x01  # the length of record 4 (step 2) is a lie now
    path.write_bytes(data)
    assert read_scalars([path])["train/loss"].steps.tolist() == [
        s for s in range(STEPS) if s != 2]
    assert warnings_of(caplog) == [
        f"{path}: record 4 at byte {offset} is corrupt (header CRC mismatch): bytes {offset} "
        f"to {spans[4][0]} skipped, reading resumed at the next intact record"]


@pytest.mark.parametrize("cut", [1, 11, 12, 20], ids=lambda c: f"cut-{c}")
def test_a_truncated_last_record_keeps_the_others(tmp_path: Path, cut: int,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = write_run(tmp_path / "run")
    data = path.read_bytes()
    last = records(data)[-1][0]
    path.write_bytes(data[:last + cut])
    assert read_scalars([path])["train/loss"].steps.tolist() == list(range(STEPS - 1))
    (message,) = warnings_of(caplog)
    assert message.startswith(f"{path}: ends in a truncated record (record {STEPS + 1} at "
                              f"byte {last}")


def test_a_crafted_length_is_never_allocated(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    import tracemalloc

    path = write_run(tmp_path / "run")
    header = struct.pack("<Q", 1 << 40)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + header + struct.pack("<I", masked_crc32c(header))
                     + b"x" * 100)
    tracemalloc.start()
    try:
        series = read_scalars([path])["train/loss"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(series) == STEPS and peak < 64 << 20
    (message,) = warnings_of(caplog)
    assert message.startswith(f"{path}: ends in a truncated record (record {STEPS + 2} at "
                              f"byte {size}: 112 of its {(1 << 40) + 16} bytes present)")


def test_garbage_is_not_an_event_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(bytes(range(256)) * 3)
    assert read_scalars([path]) == {}
    assert warnings_of(caplog) == [
        f"{path}: not a TensorBoard event file (no intact record in its 768 bytes), skipped"]


def test_reading_stops_at_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    path = write_run(tmp_path / "run")
    data = path.read_bytes()
    limit = records(data)[7][0]  # the first 7 records fit: file version + steps 0..5
    monkeypatch.setattr(tfevents, "MAX_EVENT_FILE_BYTES", limit)
    assert read_scalars([path])["train/loss"].steps.tolist() == list(range(6))
    assert warnings_of(caplog) == [
        f"{path}: read the first {limit} bytes (the limit per event file is {limit}); the "
        f"last {len(data) - limit} bytes were skipped"]


def test_many_damaged_places_are_named_up_to_a_limit(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = write_run(tmp_path / "run", steps=40)
    data = bytearray(path.read_bytes())
    for offset, length in records(bytes(data))[1:31]:  # 30 damaged records
        data[offset + 12 + length - 1] ^= 0xFF
    path.write_bytes(data)
    assert read_scalars([path])["train/loss"].steps.tolist() == list(range(30, 40))
    messages = warnings_of(caplog)
    assert len(messages) == 21 and all("data CRC mismatch" in m for m in messages[:20])
    assert messages[-1] == f"{path}: 10 more damaged places skipped (only the first 20 are named)"


def well_formed(data: bytes) -> bool:
    """Whether ``data`` is a sequence of intact records, by TensorBoard's own CRC."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb

    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            return False
        (length,) = struct.unpack_from("<Q", data, pos)
        if tb(data[pos:pos + 8]) != struct.unpack_from("<I", data, pos + 8)[0]:
            return False
        if pos + 16 + length > len(data) or tb(data[pos + 12:pos + 12 + length]) != \
                struct.unpack_from("<I", data, pos + 12 + length)[0]:
            return False
        pos += 16 + length
    return True


def _mutations() -> st.SearchStrategy[list[tuple[str, int, int]]]:
    op = st.tuples(st.sampled_from(["flip", "truncate", "splice", "insert"]),
                   st.integers(0, 10**6), st.integers(0, 255))
    return st.lists(op, min_size=1, max_size=4)


_FUZZ_RUN: dict[str, bytes] = {}


def _fuzz_original() -> bytes:
    if "data" not in _FUZZ_RUN:
        with tempfile.TemporaryDirectory() as d:
            _FUZZ_RUN["data"] = write_run(Path(d), steps=STEPS).read_bytes()
    return _FUZZ_RUN["data"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_fuzzed_event_files_never_raise_and_name_what_they_lose(
        mutations: list[tuple[str, int, int]]) -> None:
    original = _fuzz_original()
    data = bytearray(original)
    for op, where, value in mutations:
        pos = where % (len(data) + 1)
        if op == "flip" and data:
            data[pos % len(data)] ^= 1 << (value % 8)
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            data[pos:pos + value % 40] = bytes((value * 7 + i) % 256 for i in range(value % 40))
        else:
            data[pos:pos] = bytes([value]) * (1 + value % 16)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "events.out.tfevents.1.host"
        path.write_bytes(bytes(data))
        logger = logging.getLogger("lr_monitor.cli.tfevents")
        seen: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
        logger.addHandler(handler)
        try:
            series = read_scalars([path]).get("train/loss")
        finally:
            logger.removeHandler(handler)
    points = [] if series is None else list(zip(series.steps.tolist(), series.values.tolist(),
                                                strict=True))
    expected = [(s, s / 4) for s in range(STEPS)]
    assert all(p in expected for p in points), points  # no phantom data
    if well_formed(bytes(data)):  # e.g. cut at a record boundary: nothing to warn about
        assert seen == [], seen
    elif points != expected:  # lost to damage: a warning names file, record and byte
        assert seen and all(str(path) in m for m in seen), seen
        assert all(("record" in m and "byte" in m) or "skipped" in m for m in seen), seen


# ------------------------------------------------------------------ events.jsonl


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6)


@settings(max_examples=120, deadline=None)
@given(key=st.sampled_from(sorted(BASE)), value=_JSON)
def test_fuzzed_fields_skip_one_line_with_one_warning(key: str, value: Any) -> None:
    line = json.dumps({**BASE, "step": 1, key: value}).encode() + b"\n"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "events.jsonl"
        path.write_bytes(jsonl(0) + line + jsonl(2))
        seen: list[str] = []
        logger = logging.getLogger("lr_monitor.eventlog")
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
        logger.addHandler(handler)
        try:
            steps = [e.step for e in read_events(path, errors="warn")]
            try:
                strict = [e.step for e in read_events(path)]
            except EventFileError as exc:
                assert exc.line == 2 and exc.path == str(path)
                strict = None
        finally:
            logger.removeHandler(handler)
    assert steps[0] == 0 and steps[-1] == 2 and len(steps) in (2, 3)  # line 2 kept or not
    if len(steps) == 2:
        assert len(seen) == 1 and seen[0].startswith(f"{path}, line 2: skipped a corrupt")
        assert strict is None
    else:
        assert seen == [] and strict == steps


@settings(max_examples=120, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_bytes_lines_never_raise(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "events.jsonl"
        path.write_bytes(jsonl(0) + raw + b"\n" + jsonl(9))
        events = read_events(path, errors="warn")
    assert events[0].step == 0 and events[-1].step == 9


def test_deep_nesting_and_huge_numbers_are_corrupt_lines(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.jsonl"
    bad = [b"[" * 200_000, b'{"a":' * 100_000, b'{"step": ' + b"9" * 5000 + b"}",
           jsonl(2**63).rstrip(), jsonl(1, lr_scale=float("inf")).rstrip(),
           jsonl(1, time=float("nan")).rstrip(), jsonl(1, epoch=-1).rstrip()]
    path.write_bytes(jsonl(0) + b"\n".join(bad) + b"\n" + jsonl(2))
    assert [e.step for e in read_events(path, errors="warn")] == [0, 2]
    messages = warnings_of(caplog)
    assert [m.split(":")[0].rsplit(", ", 1)[1] for m in messages] == [
        f"line {n}" for n in range(2, 9)]
    assert "nested too deeply" in messages[0] and "nested too deeply" in messages[1]
    assert "step=9223372036854775808 is invalid: must be an integer in [-1, 2**63 - 1]" \
        in messages[3]


def test_an_overlong_line_is_skipped_without_reading_it_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(eventlog, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "events.jsonl"
    path.write_bytes(jsonl(0) + jsonl(1, message="m" * 5000) + jsonl(2))
    assert [e.step for e in read_events(path, errors="warn")] == [0, 2]
    assert warnings_of(caplog) == [f"{path}, line 2: skipped a corrupt event record (longer "
                                   "than 1000 bytes, the limit for one event record)"]
    with pytest.raises(EventFileError, match=r"line 2: corrupt event record \(longer than"):
        read_events(path)


def test_a_file_beyond_the_size_limit_is_read_in_part(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(jsonl(s) for s in range(10)))
    limit = 3 * len(jsonl(0))
    monkeypatch.setattr(eventlog, "MAX_FILE_BYTES", limit)
    assert [e.step for e in read_events(path)] == [0, 1, 2]
    assert warnings_of(caplog) == [f"{path}: read the first {limit} bytes (the limit per file); "
                                   f"the last {7 * len(jsonl(0))} bytes were skipped"]


def test_many_corrupt_lines_are_named_up_to_a_limit(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(jsonl(0) + b"{bad\n" * 30 + jsonl(1))
    assert [e.step for e in read_events(path, errors="warn")] == [0, 1]
    messages = warnings_of(caplog)
    assert len(messages) == 21
    assert messages[-1] == f"{path}: 10 more corrupt lines skipped (only the first 20 are named)"


def test_errors_must_be_raise_or_warn(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^errors='skip' is invalid: must be one of "
                                         r"\('raise', 'warn'\)$"):
        read_events(tmp_path / "events.jsonl", errors="skip")


# ------------------------------------------------------------ files that are not files


@pytest.mark.skipif(not LINUX, reason="FIFOs and /dev/zero")
def test_open_regular_refuses_without_opening(tmp_path: Path) -> None:
    fifo = tmp_path / "events.jsonl"
    os.mkfifo(fifo)  # opening it for reading would block: it must not be opened at all
    with pytest.raises(NotRegularFileError) as info:
        open_regular(fifo)
    assert str(info.value) == f"{fifo}: not a regular file (a FIFO)"
    os.symlink("/dev/zero", tmp_path / "zero")
    with pytest.raises(NotRegularFileError, match=r"a character device"):
        read_events(tmp_path / "zero")
    with pytest.raises(NotRegularFileError, match=r"a directory"):
        open_regular(tmp_path)
    with open_regular(__file__) as f:
        assert f.read(3) == b'"""'


@pytest.mark.skipif(not LINUX, reason="FIFOs, sockets and /dev/zero")
def test_fifos_devices_sockets_and_links_are_skipped_by_name(shared_dir: Path) -> None:
    """Each odd file is one warning line; the good run is read; nothing hangs."""
    write_run(shared_dir / "good")
    (shared_dir / "good" / "events.jsonl").write_bytes(jsonl(3))
    os.mkfifo(shared_dir / "good" / "events.jsonl.1")
    os.symlink("/dev/urandom", shared_dir / "good" / "events.jsonl.2")
    os.mkfifo(shared_dir / "good" / "events.out.tfevents.9.fifo")
    odd = shared_dir / "odd"
    odd.mkdir()
    os.symlink("/dev/zero", odd / "events.out.tfevents.1.zero")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(odd / "events.out.tfevents.2.sock"))
    sock.close()
    os.symlink(odd / "nowhere", odd / "events.out.tfevents.3.dangling")
    done = run_forked(["report", str(shared_dir), "--json"], timeout=60)
    assert done.rc == 0, done
    run = json.loads(done.out)["runs"]
    assert [r["run"] for r in run] == ["good"] and run[0]["metrics"]["train/loss"]["points"] == 12
    assert [e["step"] for e in run[0]["events"]] == [3]
    prefix = "lr-monitor report: warning: "
    assert sorted(done.err.splitlines()) == sorted([
        f"{prefix}{shared_dir}/good/events.jsonl.2: skipped (not a regular file (a character "
        "device))",
        f"{prefix}{shared_dir}/good/events.jsonl.1: skipped (not a regular file (a FIFO))",
        f"{prefix}{shared_dir}/good/events.out.tfevents.9.fifo: skipped (not a regular file "
        "(a FIFO))",
        f"{prefix}{odd}/events.out.tfevents.1.zero: skipped (not a regular file (a character "
        "device))",
        f"{prefix}{odd}/events.out.tfevents.2.sock: skipped (not a regular file (a socket))",
        f"{prefix}{odd}/events.out.tfevents.3.dangling: skipped (No such file or directory)",
    ])


@pytest.mark.skipif(not LINUX, reason="FIFOs")
def test_a_fifo_given_as_logdir_is_an_error(shared_dir: Path) -> None:
    fifo = shared_dir / "events.out.tfevents.1.host"
    os.mkfifo(fifo)
    done = run_forked(["plot", str(fifo), "-o", str(shared_dir / "x.png")], timeout=60)
    assert (done.rc, done.out) == (2, "")
    assert done.err == (f"lr-monitor plot: error: {fifo}: not a directory or a regular file "
                        "(a FIFO)\n")


@pytest.mark.skipif(not hasattr(os, "fork") or not LINUX, reason="fork and setuid")
@pytest.mark.parametrize(
    ("case", "expected_rc", "expected"),
    [
        ("file-0000", 0, ["{odd}/events.out.tfevents.1.host: skipped (Permission denied)"]),
        ("jsonl-0000", 0, ["{good}/events.jsonl: skipped (Permission denied)"]),
        ("dir-0444", 0, ["{odd}/events.out.tfevents.1.host: skipped (Permission denied)"]),
        ("dir-0000", 0, ["{odd}: skipped, cannot list the directory (Permission denied)"]),
        ("only-dir-0444", 2,
         ["{odd}/events.out.tfevents.1.host: skipped (Permission denied)",
          "error: {odd}: no readable TensorBoard event files (1 skipped, see the warnings above)"]),
        ("logdir-0000", 2, ["error: {root}: cannot list the directory (Permission denied)"]),
    ],
)
def test_permissions_are_one_line_each(shared_dir: Path, case: str, expected_rc: int,
                                       expected: list[str]) -> None:
    root = shared_dir / "logs"
    good, odd = root / "good", root / "odd"
    write_run(good)
    write_run(odd)
    os.replace(event_file(odd), odd / "events.out.tfevents.1.host")
    (good / "events.jsonl").write_bytes(jsonl(0))
    allow_nobody(shared_dir)
    target = root
    if case == "file-0000":
        (odd / "events.out.tfevents.1.host").chmod(0)
    elif case == "jsonl-0000":
        (good / "events.jsonl").chmod(0)
    elif case in ("dir-0444", "only-dir-0444"):
        odd.chmod(0o444)
        target = odd if case == "only-dir-0444" else root
    elif case == "dir-0000":
        odd.chmod(0)
    else:
        root.chmod(0)
    done = run_forked(["report", str(target)], unprivileged=True, timeout=60)
    assert done.rc == expected_rc, done
    lines = done.err.splitlines()
    want = [line.format(root=root, good=good, odd=odd) for line in expected]
    want = [f"lr-monitor report: {w if w.startswith('error: ') else 'warning: ' + w}"
            for w in want]
    assert lines == want
    assert ("run good" in done.out) == (expected_rc == 0)


# ------------------------------------------------------------ paths and names


def test_long_and_nul_paths_are_one_line_errors(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    long = str(tmp_path / ("x" * 5000))
    assert main(["report", long]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400 and "File name too long" in err
    assert err.startswith(f"lr-monitor report: error: {long[:70]}…") and "(5," in err
    assert main(["report", str(tmp_path / ("y" * 300) / "z")]) == 2
    assert "File name too long" in capsys.readouterr().err
    with pytest.raises(ReportError, match="holds a NUL byte"):
        load_runs(f"{tmp_path}/a\0b")


def test_terminal_safe_and_display_path() -> None:
    surrogate = b"\xff".decode("utf-8", "surrogateescape")
    assert terminal_safe("a\x1b[2Jb\r\x07\u202e\u2028\ud800" + surrogate + "\t") == \
        "a\\x1b[2Jb\\r\\x07\\u202e\\u2028\\ud800\\xff\\t"
    assert terminal_safe("naïve run ×2 🚀") == "naïve run ×2 🚀"
    assert display_path("r\x1b") == "r\\x1b"
    shown = display_path("/" + "d" * 1000)
    assert len(shown) < 200 and shown.endswith(" (1,001 characters)")


HOSTILE_NAMES = ["red\x1b[31mrun", "car\rriage", "rtl\u202eevil", "[/]", "[bold]x[/bold]",
                 "$\\frac{a}$", "new\nline", "z" * 250]


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_hostile_names_are_printed_escaped(tmp_path: Path, rich: bool,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    if not rich:
        monkeypatch.setitem(sys.modules, "rich.console", None)
    for name in HOSTILE_NAMES:
        write_run(tmp_path / name, steps=3, **{"optim__lr__Ad\x1b[1mam__pg0": 0.5})
        (tmp_path / name / "events.jsonl").write_bytes(
            jsonl(1, kind="sp\x1b[2Jike", signal="lo\u202ess", actions=["cut\x1b_lr"]))
    write_run(tmp_path / "staging", steps=3)  # TensorBoard's writer needs a UTF-8 name
    os.rename(tmp_path / "staging", os.path.join(os.fsencode(tmp_path), b"bad\xffname"))
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert unsafe(captured.out) == []
    for name in HOSTILE_NAMES[:6]:
        assert f"run {terminal_safe(name)}" in captured.out
    assert "run new\\nline" in captured.out and "run bad\\xffname" in captured.out
    assert "Ad\\x1b[1mam/pg0 lr" in captured.out and "sp\\x1b[2Jike on lo\\u202ess" in captured.out
    assert main(["report", str(tmp_path), "--json"]) == 0
    names = {r["run"] for r in json.loads(capsys.readouterr().out)["runs"]}
    assert set(HOSTILE_NAMES) <= names


def test_hostile_names_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """mathtext, control characters, a name too long for a file name, two that collide."""
    for name in ("$\\frac{a}$", "red\x1b[31mrun", "z" * 250, "a/b", "a_b"):
        write_run(tmp_path / "logs" / name, steps=3, **{"optim__lr__A$d\x1b__pg0": 0.5})
    out = tmp_path / "p.png"
    assert main(["plot", str(tmp_path / "logs"), "-o", str(out), "--per-run"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and unsafe(captured.out) == []
    written = [Path(line.removeprefix("wrote ")) for line in captured.out.splitlines()]
    assert len(written) == len(set(written)) == 5  # a/b and a_b do not overwrite each other
    assert all(p.stat().st_size > 10_000 and len(p.name) < 120 for p in written)


# ------------------------------------------------------------------ CLI options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--seed", "-1"], "--seed=-1 is invalid: must be an int in [0, 4294967295]"),
        (["demo", "--seed", "4294967296"],
         "--seed=4294967296 is invalid: must be an int in [0, 4294967295]"),
        (["demo", "--seed", "1.5"], "--seed='1.5' is invalid: must be an int in [0, 4294967295]"),
        (["demo", "--seed", ""], "--seed='' is invalid: must be an int in [0, 4294967295]"),
        (["demo", "--epochs", "0"], "--epochs=0 is invalid: must be an int in [1, 10000]"),
        (["demo", "--epochs", "abc"], "--epochs='abc' is invalid: must be an int in [1, 10000]"),
        (["demo", "--epochs", "9" * 30],
         f"--epochs={'9' * 30} is invalid: must be an int in [1, 10000]"),
        (["demo", "--out", ""], "--out='' is invalid: must be a directory to write the runs to"),
        (["demo", "--out", "{tmp}/file"], "--out='{tmp}/file' is invalid: must be a directory "
                                          "to write the runs to ({tmp}/file is a regular file, "
                                          "not a directory)"),
        (["demo", "--out", "{tmp}/file/runs"],
         "--out='{tmp}/file/runs' is invalid: must be a directory to write the runs to "
         "({tmp}/file is a regular file, not a directory)"),
        (["report", ""], "LOGDIR='' is invalid: must be a log directory, run directory or "
                         "event file"),
        (["report", "a\0b"], "LOGDIR='a\\x00b' is invalid: must be a log directory, run "
                             "directory or event file (without NUL bytes)"),
        (["report", "{tmp}", "--prefix", ""],
         "--prefix='' is invalid: must be a non-empty string not starting with '/'"),
        (["plot", "{tmp}", "--prefix", "/optim"],
         "--prefix='/optim' is invalid: must be a non-empty string not starting with '/'"),
        (["plot", "{tmp}", "-o", ""], "-o='' is invalid: must be a .png file to write"),
        (["plot", "{tmp}", "--output", "{tmp}/x.pdf"],
         "--output='{tmp}/x.pdf' is invalid: must be a .png file to write (ending in .png)"),
        (["plot", "{tmp}", "-o", "{tmp}/d.png"],
         "-o='{tmp}/d.png' is invalid: must be a .png file to write (it is a directory)"),
        (["plot", "{tmp}", "-o", "{tmp}/missing/x.png"],
         "-o='{tmp}/missing/x.png' is invalid: must be a .png file to write in a directory "
         "that exists ({tmp}/missing does not)"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus (see lr-monitor --help)"),
        (["report", "{tmp}", "--runs", ""], "--runs='' is invalid: must be a glob matched "
                                            "against run names (non-empty, without NUL bytes)"),
        (["plot", "{tmp}", "--runs", "a*", "--runs", "b\0"],
         "--runs='b\\x00' is invalid: must be a glob matched against run names (non-empty, "
         "without NUL bytes)"),
        (["report", "{tmp}", "--loss-tag", ""],
         "--loss-tag='' is invalid: must be a scalar tag (non-empty, without NUL bytes)"),
        (["plot", "{tmp}", "--per-page", "0"], "--per-page=0 is invalid: must be an int in "
                                               "[1, 24]"),
        (["plot", "{tmp}", "--per-page", "six"], "--per-page='six' is invalid: must be an int "
                                                 "in [1, 24]"),
        (["plot", "{tmp}", "--per-run", "--per-page", "3"],
         "--per-page=3 is invalid: must be left out with --per-run (one run per PNG)"),
        (["plot", "{tmp}", "--max-files", "0"], "--max-files=0 is invalid: must be an int in "
                                                "[1, 100000]"),
        (["plot", "{tmp}", "--max-points", "9"], "--max-points=9 is invalid: must be an int in "
                                                 "[10, 10000000]"),
        (["report", "{tmp}", "--max-points", "100"],
         "unrecognized arguments: --max-points 100 (see lr-monitor --help)"),
    ],
    ids=lambda x: repr(x)[:40] if isinstance(x, list) else "",
)
def test_every_option_is_checked_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           argv: list[str], message: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "d.png").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.rstrip("\n").endswith(message.replace("{tmp}", str(tmp_path)))
    assert captured.err.startswith("lr-monitor")


@pytest.mark.skipif(not LINUX, reason="FIFOs")
def test_plot_never_writes_into_a_fifo(tmp_path: Path) -> None:
    write_run(tmp_path / "run", steps=3)
    os.mkfifo(tmp_path / "f.png")  # writing a PNG into it would block: it must be refused
    done = run_forked(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "f.png")])
    assert (done.rc, done.out) == (2, "")
    assert done.err == (f"lr-monitor plot: error: -o='{tmp_path}/f.png' is invalid: must be a "
                        ".png file to write (it is a FIFO)\n")


@pytest.mark.skipif(not hasattr(os, "fork") or not LINUX, reason="fork and setuid")
@pytest.mark.parametrize("command", ["demo", "plot"])
def test_a_read_only_directory_is_named_before_anything_runs(shared_dir: Path,
                                                             command: str) -> None:
    write_run(shared_dir / "run", steps=3)
    allow_nobody(shared_dir)
    (shared_dir / "ro").mkdir()
    (shared_dir / "ro").chmod(0o555)
    if command == "demo":
        argv = ["demo", "--quick", "--out", str(shared_dir / "ro" / "runs")]
        option, what = "--out", "a directory to write the runs to"
        value = shared_dir / "ro" / "runs"
    else:
        argv = ["plot", str(shared_dir / "run"), "-o", str(shared_dir / "ro" / "x.png")]
        option, what = "-o", "a .png file to write"
        value = shared_dir / "ro" / "x.png"
    done = run_forked(argv, unprivileged=True, timeout=60)
    assert (done.rc, done.out) == (2, "")
    assert done.err == (f"lr-monitor {command}: error: {option}='{value}' is invalid: must be "
                        f"{what} ({shared_dir / 'ro'} is not writable)\n")


def test_run_demo_checks_its_arguments() -> None:
    from lr_monitor.cli.demo import run_demo

    for kwargs, message in (
        ({"seed": -1}, "seed=-1 is invalid: must be an int in [0, 4294967295]"),
        ({"seed": True}, "seed=True is invalid"),
        ({"epochs": 0}, "epochs=0 is invalid: must be an int >= 1 or None"),
        ({"quick": "yes"}, "quick='yes' is invalid: must be True or False"),
        ({"out": ""}, "out='' is invalid: must be a path"),
    ):
        with pytest.raises(ValueError) as info:
            run_demo(**kwargs)
        assert str(info.value).startswith(message)


def test_guard_events_survive_a_round_trip_with_hostile_text() -> None:
    e = GuardEvent(step=-1, kind="fault", signal="x\x1b", value=math.inf, threshold=0.0,
                   message="\u202e", actions=("disable",), time=0.0)
    assert eventlog.decode_event(eventlog.encode_event(e)) == e
