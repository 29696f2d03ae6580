"""Hostile inputs for ``lr-monitor report``/``plot``/``demo``: tracebacks, hangs, wrong messages.

Re-measures the adversarial figures of issue 15 for the command line and its readers.
Every case builds its files in a fresh temporary directory and runs
:func:`lr_monitor.cli.main` in a forked child process (the modules are imported once,
in the parent) with stdout and stderr sent to files and a per-case timeout; a case is

* a **traceback** when an exception escaped ``main`` (the child prints it and exits 99),
* a **hang** when the child had not finished after ``--timeout`` seconds (it is killed),
* a **wrong message** when the outcome breaks the contract in ``docs/cli.md``: the exit
  code; an error or a skipped line/file/record that is not named (file, line number,
  record and byte offset, the option as typed with its value and what is allowed); a
  raw control character (ESC, CR, BEL, a bidi override, an unencodable surrogate) in
  what was printed; output on stderr that is not a ``lr-monitor <cmd>: warning:`` or
  ``error:`` line,
* **silent data loss** when fewer events or scalar points came back than were written
  intact and no warning named the file.

Areas: bad CLI options (35 cases), ``events.jsonl`` lines (hostile field values, raw lines,
seeded random mutations of a valid line), event-file bytes (seeded truncations, bit flips,
garbage, a crafted header), file types and permissions (FIFOs, devices, sockets, symlinks,
unreadable files and directories: run as ``nobody`` when the benchmark runs as root) and
names (control characters, rich markup and mathtext in run names, tags and events).

Usage::

    .venv/bin/python benchmarks/readers_fuzz.py              # ~300 cases, < 2 min on 2 cores
    .venv/bin/python benchmarks/readers_fuzz.py --seed 3 --timeout 20 --jobs 2
    .venv/bin/python benchmarks/readers_fuzz.py --show wrong # print every failing case

Exit status 0 when every count is 0, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import traceback
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AREAS = ("CLI options", "events.jsonl lines", "event-file bytes", "file types & permissions",
         "names (terminal safety)")
NOBODY = 65534
GOOD_STEPS = 20  # scalar points of train/loss in every generated run

BASE_EVENT = {"step": 0, "kind": "spike", "signal": "loss", "value": 9.0, "threshold": 3.0,
              "message": "loss spike", "actions": ["cut_lr"], "lr_before": {"Adam/pg0": 0.5},
              "lr_after": {"Adam/pg0": 0.25}, "lr_scale": 0.5, "epoch": 0, "time": 1000.0,
              "run": "r"}


# ---------------------------------------------------------------------------- results


@dataclass
class Result:
    """What one case did."""

    rc: int | None  # None: killed after the timeout
    out: str
    err: str
    seconds: float

    @property
    def hang(self) -> bool:
        return self.rc is None

    @property
    def traceback(self) -> bool:
        return self.rc == 99 or "Traceback (most recent call last)" in self.err

    def json(self) -> dict[str, Any] | None:
        try:
            obj = json.loads(self.out)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None


Check = Callable[[Result, Path], "str | None"]


@dataclass
class Case:
    """One hostile input: ``build(dir)`` makes the files and returns argv; ``check`` judges."""

    area: str
    name: str
    build: Callable[[Path], list[str]]
    check: Check
    unprivileged: bool = False  # run as nobody when the benchmark runs as root
    loss_check: Check | None = None  # silent data loss


@dataclass
class Tally:
    cases: int = 0
    tracebacks: int = 0
    hangs: int = 0
    wrong: int = 0
    silent: int = 0
    failures: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- fixtures

_TEMPLATE: Path | None = None  # the mkdtemp directory holding the template run


def _write_tb_run(run_dir: Path, steps: int = GOOD_STEPS, tags: tuple[str, ...] = ()) -> None:
    """A TensorBoard run: ``train/loss`` at steps 0..steps-1 (and extra tags), one file."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(run_dir))
    for step in range(steps):
        writer.add_scalar("train/loss", 2.0 ** -(step % 8), step)
        for tag in tags:
            writer.add_scalar(tag, 0.5, step)
    writer.close()


def template() -> Path:
    """One good run written once; every case copies it."""
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = Path(tempfile.mkdtemp(prefix="readers-fuzz-template-"))
        _write_tb_run(_TEMPLATE / "run")
    return _TEMPLATE / "run"


def good_run(dest: Path) -> Path:
    shutil.copytree(template(), dest)
    return dest


def tb_file(run: Path) -> Path:
    return next(p for p in run.iterdir() if "tfevents" in p.name)


def jsonl_line(step: int, **changes: Any) -> bytes:
    obj = {**BASE_EVENT, "step": step, **changes}
    return json.dumps(obj).encode() + b"\n"


def with_jsonl(run: Path, middle: bytes) -> Path:
    """events.jsonl: a good line (step 0), ``middle`` (line 2), a good line (step 2)."""
    path = run / "events.jsonl"
    path.write_bytes(jsonl_line(0) + middle.rstrip(b"\n") + b"\n" + jsonl_line(2))
    return path


# ---------------------------------------------------------------------------- checks

_ALLOWED_CONTROLS = {"\n", "\t"}


def _unsafe_chars(text: str) -> list[str]:
    bad = []
    for ch in text:
        if ch in _ALLOWED_CONTROLS:
            continue
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            bad.append(f"U+{ord(ch):04X}")
    return bad


def _stderr_lines_ok(res: Result) -> str | None:
    for line in res.err.splitlines():
        if not line.startswith("lr-monitor") or not any(
                m in line for m in (": warning: ", ": error: ")):
            return f"stderr line not a warning/error line: {line[:120]!r}"
    return None


def generic(res: Result) -> str | None:
    unsafe = _unsafe_chars(res.out + res.err)
    if unsafe:
        return f"raw control characters printed: {sorted(set(unsafe))[:5]}"
    return _stderr_lines_ok(res)


def warnings_naming(res: Result, path: Path) -> list[str]:
    return [line for line in res.err.splitlines() if ": warning: " in line and str(path) in line]


def expect_error(*needles: str) -> Check:
    """Exit 2, one error line on stderr holding every needle."""

    def check(res: Result, tmp: Path) -> str | None:
        if res.rc != 2:
            return f"exit {res.rc}, expected 2"
        errors = [line for line in res.err.splitlines() if ": error: " in line]
        if len(errors) != 1:
            return f"{len(errors)} error lines, expected 1: {res.err[:200]!r}"
        needles_now = [n.replace("{tmp}", str(tmp)) for n in needles]
        missing = [n for n in needles_now if n not in errors[0]]
        if missing:
            return f"error line lacks {missing}: {errors[0][:200]!r}"
        return generic(res)

    return check


def expect_option_error(option: str, value: str) -> Check:
    """A bad option: exit 2, one line naming the option as typed, its value, what is allowed."""
    return expect_error(option, value, "must be")


def _events_of(res: Result, run_name: str) -> list[int] | None:
    payload = res.json()
    if payload is None:
        return None
    for run in payload.get("runs", []):
        if run.get("run") == run_name:
            return [e["step"] for e in run.get("events", [])]
    return None


def _points_of(res: Result, run_name: str, tag: str = "train/loss") -> int | None:
    payload = res.json()
    if payload is None:
        return None
    for run in payload.get("runs", []):
        if run.get("run") == run_name:
            metric = run.get("metrics", {}).get(tag)
            return 0 if metric is None else int(metric["points"])
    return None


def expect_jsonl_line_kept_or_named(run_name: str = "run") -> Check:
    """Exit 0; the good lines (steps 0 and 2) kept; a skipped line 2 named with its number."""

    def check(res: Result, tmp: Path) -> str | None:
        if res.rc != 0:
            return f"exit {res.rc}, expected 0 (a bad line is skipped): {res.err[:200]!r}"
        steps = _events_of(res, run_name)
        if steps is None:
            return "no JSON report"
        if 0 not in steps or 2 not in steps:
            return f"good lines lost: steps {steps}"
        path = tmp / run_name / "events.jsonl"
        named = warnings_naming(res, path)
        if len(steps) == 2 and not any("line 2" in w for w in named):
            return f"line 2 skipped without a warning naming {path.name} and line 2"
        if len(named) > 1:
            return f"{len(named)} warnings for one bad line"
        return generic(res)

    return check


def jsonl_loss(run_name: str = "run") -> Check:
    def check(res: Result, tmp: Path) -> str | None:
        steps = _events_of(res, run_name)
        if steps is None or res.rc != 0:
            return None  # counted elsewhere
        if len(steps) < 2 and not warnings_naming(res, tmp / run_name / "events.jsonl"):
            return f"events silently dropped: {steps}"
        return None

    return check


def expect_tb_bytes(well_formed: int | None, run_name: str = "bad") -> Check:
    """Exit 0; the other run intact; damage to ``bad``'s file named with record and byte.

    ``well_formed``: the number of scalar points when the file is still a well-formed
    record sequence (cut at a record boundary, duplicated: nothing to warn about), else
    ``None`` (damaged: a warning must name the file, the record and the byte).
    """

    def check(res: Result, tmp: Path) -> str | None:
        if res.rc != 0:
            return f"exit {res.rc}, expected 0 (the good run is still readable): {res.err[:200]!r}"
        if _points_of(res, "good") != GOOD_STEPS:
            return "the good run was not read in full"
        named = warnings_naming(res, tb_file(tmp / run_name))
        if well_formed is None and not named:
            return "a damaged event file without a warning naming it"
        if well_formed is not None and _points_of(res, run_name) != well_formed:
            return f"{_points_of(res, run_name)} points read from {well_formed} well-formed ones"
        if named and not all(("record" in w and "byte" in w) or "skipped" in w for w in named):
            return f"warning does not say where: {named[0][:200]!r}"
        return generic(res)

    return check


def tb_loss(well_formed: int | None, run_name: str = "bad") -> Check:
    def check(res: Result, tmp: Path) -> str | None:
        points = _points_of(res, run_name) or 0
        expected = GOOD_STEPS if well_formed is None else well_formed
        if points < expected and not warnings_naming(res, tb_file(tmp / run_name)):
            return f"{expected - points} of {expected} points silently dropped"
        return None

    return check


def expect_ok_with_warning(*needles: str, json_run: str | None = "good") -> Check:
    """Exit 0 (the good run is read), one warning line holding every needle."""

    def check(res: Result, tmp: Path) -> str | None:
        if res.rc != 0:
            return f"exit {res.rc}, expected 0: {res.err[:200]!r}"
        if json_run is not None and _points_of(res, json_run) != GOOD_STEPS:
            return "the good run was not read in full"
        needles_now = [n.replace("{tmp}", str(tmp)) for n in needles]
        hits = [line for line in res.err.splitlines() if ": warning: " in line
                and all(n in line for n in needles_now)]
        if len(hits) != 1:
            return f"{len(hits)} warning lines with {needles_now}: {res.err[:300]!r}"
        return generic(res)

    return check


def expect_ok_clean(json_runs: int | None = None) -> Check:
    """Exit 0, nothing unsafe printed (names escaped)."""

    def check(res: Result, tmp: Path) -> str | None:
        if res.rc != 0:
            return f"exit {res.rc}, expected 0: {res.err[:200]!r}"
        if json_runs is not None:
            payload = res.json()
            if payload is None or len(payload.get("runs", [])) != json_runs:
                return "JSON report lacks runs"
        return generic(res)

    return check


# ---------------------------------------------------------------------------- cases


def _report_json(target: Path) -> list[str]:
    return ["report", str(target), "--json"]


def _plot(target: Path, tmp: Path) -> list[str]:
    return ["plot", str(target), "-o", str(tmp / "out.png")]


def cli_cases() -> list[Case]:
    area = AREAS[0]
    cases: list[Case] = []

    def add(name: str, build: Callable[[Path], list[str]], check: Check,
            unprivileged: bool = False) -> None:
        cases.append(Case(area, name, build, check, unprivileged))

    def demo(*extra: str) -> Callable[[Path], list[str]]:
        return lambda tmp: ["demo", "--quick", "--no-progress", "--out", str(tmp / "runs"),
                            *extra]

    for value, needle in (("-1", "-1"), ("4294967296", "4294967296"), ("abc", "abc"),
                          ("1.5", "1.5"), ("", "''")):
        add(f"demo --seed {value!r}", demo("--seed", value), expect_option_error("--seed", needle))
    for value in ("0", "-3", "abc", "1e3", "99999999999999999999999"):
        add(f"demo --epochs {value!r}", demo("--epochs", value),
            expect_option_error("--epochs", value))

    def out_file(tmp: Path) -> list[str]:
        (tmp / "file").write_text("x")
        return ["demo", "--quick", "--no-progress", "--out", str(tmp / "file")]

    def out_under_file(tmp: Path) -> list[str]:
        (tmp / "file").write_text("x")
        return ["demo", "--quick", "--no-progress", "--out", str(tmp / "file" / "runs")]

    def out_read_only(tmp: Path) -> list[str]:
        ro = tmp / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ["demo", "--quick", "--no-progress", "--out", str(ro / "runs")]

    add("demo --out <existing file>", out_file, expect_option_error("--out", "file"))
    add("demo --out <below a file>", out_under_file, expect_option_error("--out", "file"))
    add("demo --out <read-only parent>", out_read_only, expect_option_error("--out", "ro"),
        unprivileged=True)
    add("demo --out ''", lambda tmp: ["demo", "--quick", "--out", ""],
        expect_option_error("--out", "''"))
    add("demo --out <5,000 chars>",
        lambda tmp: ["demo", "--quick", "--no-progress", "--out", str(tmp / ("d" * 5000))],
        expect_option_error("--out", "ddd"))

    add("report ''", lambda tmp: ["report", ""], expect_option_error("LOGDIR", "''"))
    add("report <5,000-char path>", lambda tmp: ["report", str(tmp / ("x" * 5000))],
        expect_error("xxx"))
    add("report <300-char component>", lambda tmp: ["report", str(tmp / ("y" * 300) / "z")],
        expect_error("yyy"))
    add("report <path with NUL>", lambda tmp: ["report", f"{tmp}/a\0b"],
        expect_option_error("LOGDIR", "a\\x00b"))
    add("report --prefix ''", lambda tmp: ["report", str(good_run(tmp / "run")), "--prefix", ""],
        expect_option_error("--prefix", "''"))
    add("report --prefix '/optim'",
        lambda tmp: ["report", str(good_run(tmp / "run")), "--prefix", "/optim"],
        expect_option_error("--prefix", "/optim"))
    add("report --prefix '('",
        lambda tmp: ["report", str(good_run(tmp / "run")), "--prefix", "("],
        expect_ok_clean())
    add("report /dev/null", lambda tmp: ["report", "/dev/null"], expect_error("/dev/null"))

    def unreadable_logdir(tmp: Path) -> list[str]:
        run = good_run(tmp / "logs" / "run")
        (tmp / "logs").chmod(0)
        del run
        return ["report", str(tmp / "logs")]

    add("report <unreadable logdir>", unreadable_logdir, expect_error("logs"), unprivileged=True)

    def plot_out(out: str, flag: str = "-o") -> Callable[[Path], list[str]]:
        def build(tmp: Path) -> list[str]:
            good_run(tmp / "run")
            return ["plot", str(tmp / "run"), flag, out.replace("{tmp}", str(tmp))]

        return build

    add("plot -o ''", plot_out(""), expect_option_error("-o", "''"))
    add("plot -o x.pdf", plot_out("{tmp}/x.pdf"), expect_option_error("-o", "x.pdf"))
    add("plot --output <missing dir>", plot_out("{tmp}/missing/x.png", "--output"),
        expect_option_error("--output", "missing"))

    def out_is_dir(tmp: Path) -> list[str]:
        good_run(tmp / "run")
        (tmp / "d.png").mkdir()
        return ["plot", str(tmp / "run"), "-o", str(tmp / "d.png")]

    def out_is_fifo(tmp: Path) -> list[str]:
        good_run(tmp / "run")
        os.mkfifo(tmp / "f.png")
        return ["plot", str(tmp / "run"), "-o", str(tmp / "f.png")]

    def out_read_only_dir(tmp: Path) -> list[str]:
        good_run(tmp / "run")
        (tmp / "ro").mkdir()
        (tmp / "ro").chmod(0o555)
        return ["plot", str(tmp / "run"), "-o", str(tmp / "ro" / "x.png")]

    add("plot -o <a directory>", out_is_dir, expect_option_error("-o", "d.png"))
    add("plot -o <a FIFO>", out_is_fifo, expect_option_error("-o", "f.png"))
    add("plot -o <read-only dir>", out_read_only_dir, expect_option_error("-o", "ro"),
        unprivileged=True)
    add("plot -o <5,000 chars>.png", plot_out("{tmp}/" + "p" * 5000 + ".png"),
        expect_option_error("-o", "ppp"))
    add("plot --prefix ''", lambda tmp: [*_plot(good_run(tmp / "run"), tmp), "--prefix", ""],
        expect_option_error("--prefix", "''"))
    add("plot ''", lambda tmp: ["plot", "", "-o", str(tmp / "x.png")],
        expect_option_error("LOGDIR", "''"))
    add("report --bogus", lambda tmp: ["report", str(tmp), "--bogus"], expect_error("--bogus"))
    add("demo --epochs (no value)", lambda tmp: ["demo", "--epochs"], expect_error("--epochs"))
    return cases


# Field values no event can have (each is line 2 of a three-line events.jsonl).
BAD_FIELDS: list[tuple[str, str]] = [
    ("step", "1e400"), ("step", "-1e400"), ("step", '"3"'), ("step", "true"), ("step", "null"),
    ("step", "1.5"), ("step", "[1]"), ("step", "{}"), ("step", "-2"),
    ("step", "9223372036854775808"), ("step", "1" + "0" * 30), ("step", "NaN"),
    ("step", "Infinity"), ("kind", "5"), ("kind", "null"), ("kind", "[]"), ("kind", "{}"),
    ("signal", "null"), ("signal", "7"), ("signal", '["loss"]'), ("value", "[1]"),
    ("value", "{}"), ("value", '"high"'), ("value", "true"), ("threshold", "{}"),
    ("threshold", "[]"), ("threshold", '"x"'), ("message", "3"), ("message", "[]"),
    ("actions", "[1]"), ("actions", '"skip"'), ("actions", '{"a": 1}'), ("actions", "[null]"),
    ("actions", "[[]]"), ("actions", "5"), ("lr_before", "[1]"), ("lr_before", '"x"'),
    ("lr_before", '{"a": "fast"}'), ("lr_before", '{"a": []}'), ("lr_before", "5"),
    ("lr_after", '{"a": {}}'), ("lr_after", "[]"), ("lr_scale", "null"), ("lr_scale", "true"),
    ("lr_scale", '"x"'), ("lr_scale", "[1]"), ("lr_scale", "1e400"), ("lr_scale", "-1"),
    ("lr_scale", "NaN"), ("epoch", "0.5"), ("epoch", '"x"'), ("epoch", "-1"),
    ("epoch", "1e400"), ("time", '"noon"'), ("time", "[1]"), ("time", "1e400"),
    ("time", "NaN"), ("run", "7"), ("run", "[]"), ("run", "{}"),
]


def _field_line(key: str, raw: str) -> bytes:
    obj = {**BASE_EVENT, "step": 1}
    # the raw JSON text in place of the key's value
    head = json.dumps({k: v for k, v in obj.items() if k != key})[:-1]
    return f'{head}, "{key}": {raw}}}'.encode()


def jsonl_cases(rng: random.Random) -> list[Case]:
    area = AREAS[1]
    cases: list[Case] = []

    def add(name: str, middle: bytes | Callable[[], bytes], plot: bool = False) -> None:
        def build(tmp: Path, middle: Any = middle) -> list[str]:
            run = good_run(tmp / "run")
            with_jsonl(run, middle() if callable(middle) else middle)
            return _plot(tmp, tmp) if plot else _report_json(tmp)

        check = expect_ok_clean() if plot else expect_jsonl_line_kept_or_named()
        cases.append(Case(area, name, build, check,
                          loss_check=None if plot else jsonl_loss()))

    for key, raw in BAD_FIELDS:
        add(f"{key}: {raw[:20]}", _field_line(key, raw))
    for key in ("step", "kind", "signal"):
        obj = {k: v for k, v in {**BASE_EVENT, "step": 1}.items() if k != key}
        add(f"missing {key}", json.dumps(obj).encode())
    for raw in (b"[1, 2]", b"3", b'"s"', b"null", b"true", b"{}"):
        add(f"not an event: {raw.decode()}", raw)
    add("deep nesting [", b"[" * 100_000)
    add('deep nesting {"a":', b'{"a":' * 50_000)
    add("balanced nesting 1,000", b"[" * 1000 + b"]" * 1000)
    add("2 MiB line", lambda: jsonl_line(1, message="m" * (2 << 20)))
    add("5,000-digit step", _field_line("step", "9" * 5000))
    add("1e99999 step", _field_line("step", "1e99999"))
    add("not UTF-8", b'{"step": 1, "kind": "\xff\xfe"}')
    add("NUL inside", jsonl_line(1)[:20] + b"\x00" + jsonl_line(1)[20:])
    add("UTF-8 BOM", b"\xef\xbb\xbf" + jsonl_line(1))
    add("trailing garbage", jsonl_line(1).rstrip(b"\n") + b" }{")
    add("lone surrogate in kind", _field_line("kind", '"\\ud800"'))
    add("10,000 lr groups", lambda: jsonl_line(1, lr_before={f"g{i}": 0.1 for i in range(10_000)}))
    for i in range(60):
        line = bytearray(jsonl_line(1))
        for _ in range(rng.randint(1, 4)):
            op = rng.choice(("flip", "delete", "insert", "truncate"))
            pos = rng.randrange(len(line))
            if op == "flip":
                line[pos] ^= 1 << rng.randrange(8)
            elif op == "delete":
                del line[pos]
            elif op == "insert":
                line[pos:pos] = bytes([rng.randrange(256)])
            else:
                del line[pos:]
            if not line:
                line = bytearray(b"{")
        add(f"random mutation #{i}", bytes(line).replace(b"\n", b" "), plot=(i % 12 == 0))
    return cases


def _records(data: bytes) -> list[tuple[int, int]]:
    """``(offset, length)`` of every record of an intact event file."""
    out, pos = [], 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        out.append((pos, length))
        pos += 16 + length
    return out


def _well_formed_points(data: bytes) -> int | None:
    """Scalar points in ``data`` if it is a well-formed record sequence, else ``None``.

    The oracle is TensorBoard's own CRC function and protocol buffer, not the reader
    under test.
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    pos, points = 0, 0
    while pos < len(data):
        if pos + 12 > len(data):
            return None
        (length,) = struct.unpack_from("<Q", data, pos)
        if masked_crc32c(data[pos:pos + 8]) != struct.unpack_from("<I", data, pos + 8)[0]:
            return None
        if pos + 16 + length > len(data):
            return None
        body = data[pos + 12:pos + 12 + length]
        if masked_crc32c(body) != struct.unpack_from("<I", data, pos + 12 + length)[0]:
            return None
        event = event_pb2.Event.FromString(body)
        points += sum(v.HasField("simple_value") and v.tag == "train/loss"
                      for v in event.summary.value)
        pos += 16 + length
    return points


def tb_cases(rng: random.Random) -> list[Case]:
    area = AREAS[2]
    cases: list[Case] = []
    original = tb_file(template()).read_bytes()
    records = _records(original)

    def add(name: str, mutate: Callable[[bytes], bytes], plot: bool = False) -> None:
        damaged = mutate(original)
        well_formed = _well_formed_points(damaged)

        def build(tmp: Path) -> list[str]:
            good_run(tmp / "good")
            bad = good_run(tmp / "bad")
            tb_file(bad).write_bytes(damaged)
            return _plot(tmp, tmp) if plot else _report_json(tmp)

        check = expect_ok_clean() if plot else expect_tb_bytes(well_formed)
        cases.append(Case(area, name, build, check,
                          loss_check=None if plot else tb_loss(well_formed)))

    for i in range(15):
        cut = rng.randrange(1, len(original))
        add(f"truncated at byte {cut}", lambda d, cut=cut: d[:cut], plot=(i == 0))
    for i in range(25):
        bit = rng.randrange(len(original) * 8)
        add(f"bit flip at bit {bit}", lambda d, bit=bit: d[:bit // 8]
            + bytes([d[bit // 8] ^ (1 << bit % 8)]) + d[bit // 8 + 1:], plot=(i == 0))
    for _ in range(10):
        start = rng.randrange(len(original))
        size = rng.randint(1, 64)
        junk = rng.randbytes(size)
        add(f"garbage over bytes {start}..{start + size}",
            lambda d, s=start, j=junk: (d[:s] + j + d[s + len(j):])[:len(d)])
    for _ in range(5):
        junk = rng.randbytes(rng.randint(1, 200))
        add(f"garbage appended ({len(junk)} bytes)", lambda d, j=junk: d + j)
    for _ in range(3):
        junk = rng.randbytes(rng.randint(1, 200))
        add(f"garbage prepended ({len(junk)} bytes)", lambda d, j=junk: j + d)
    add("zero-filled tail", lambda d: d[:len(d) // 2] + bytes(len(d) - len(d) // 2))
    add("empty file", lambda d: b"")
    add("only the first record", lambda d: d[:16 + records[0][1]])
    add("random bytes", lambda d: rng.randbytes(len(d)))

    def huge_length(d: bytes) -> bytes:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

        header = struct.pack("<Q", 1 << 40)
        return d + header + struct.pack("<I", masked_crc32c(header)) + b"x" * 64

    add("crafted header: length 2**40 with a valid CRC", huge_length)
    add("duplicate of itself", lambda d: d + d)
    return cases


def filetype_cases() -> list[Case]:
    area = AREAS[3]
    cases: list[Case] = []

    def add(name: str, build: Callable[[Path], list[str]], check: Check,
            unprivileged: bool = False) -> None:
        cases.append(Case(area, name, build, check, unprivileged))

    def extra(make: Callable[[Path], None], plot: bool = False) -> Callable[[Path], list[str]]:
        def build(tmp: Path) -> list[str]:
            good_run(tmp / "good")
            make(tmp)
            return _plot(tmp, tmp) if plot else _report_json(tmp)

        return build

    tfname = "events.out.tfevents.1.host"

    def fifo_tb(tmp: Path) -> None:
        (tmp / "odd").mkdir()
        os.mkfifo(tmp / "odd" / tfname)

    def fifo_beside_good(tmp: Path) -> None:
        os.mkfifo(tmp / "good" / "events.out.tfevents.9.host")

    def fifo_jsonl(tmp: Path) -> None:
        os.mkfifo(tmp / "good" / "events.jsonl")

    def fifo_jsonl_1(tmp: Path) -> None:
        (tmp / "good" / "events.jsonl").write_bytes(jsonl_line(0))
        os.mkfifo(tmp / "good" / "events.jsonl.1")

    def dev_zero_tb(tmp: Path) -> None:
        (tmp / "odd").mkdir()
        os.symlink("/dev/zero", tmp / "odd" / tfname)

    def dev_zero_jsonl(tmp: Path) -> None:
        os.symlink("/dev/zero", tmp / "good" / "events.jsonl")

    def dev_urandom_jsonl_2(tmp: Path) -> None:
        (tmp / "good" / "events.jsonl").write_bytes(jsonl_line(0))
        os.symlink("/dev/urandom", tmp / "good" / "events.jsonl.1")

    def dir_tb(tmp: Path) -> None:
        (tmp / "odd" / tfname).mkdir(parents=True)

    def socket_tb(tmp: Path) -> None:
        (tmp / "odd").mkdir()
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(tmp / "odd" / tfname))
        finally:
            sock.close()

    def dangling_tb(tmp: Path) -> None:
        (tmp / "odd").mkdir()
        os.symlink(tmp / "nowhere", tmp / "odd" / tfname)

    def loop_tb(tmp: Path) -> None:
        (tmp / "odd").mkdir()
        os.symlink(tmp / "odd" / "b", tmp / "odd" / tfname)
        os.symlink(tmp / "odd" / tfname, tmp / "odd" / "b")

    def unreadable_tb(tmp: Path) -> None:
        bad = good_run(tmp / "odd")
        tb_file(bad).chmod(0)

    def unreadable_jsonl(tmp: Path) -> None:
        (tmp / "good" / "events.jsonl").write_bytes(jsonl_line(0))
        (tmp / "good" / "events.jsonl").chmod(0)

    def dir_0444(tmp: Path) -> None:
        good_run(tmp / "odd")
        (tmp / "odd").chmod(0o444)

    def dir_0000(tmp: Path) -> None:
        good_run(tmp / "odd")
        (tmp / "odd").chmod(0)

    add("FIFO named events.out.tfevents.*", extra(fifo_tb),
        expect_ok_with_warning(f"odd/{tfname}", "FIFO"))
    add("FIFO beside a good event file", extra(fifo_beside_good),
        expect_ok_with_warning("events.out.tfevents.9.host", "FIFO"))
    add("FIFO named events.out.tfevents.* (plot)", extra(fifo_tb, plot=True),
        expect_ok_with_warning(f"odd/{tfname}", "FIFO", json_run=None))
    add("FIFO named events.jsonl", extra(fifo_jsonl),
        expect_ok_with_warning("events.jsonl", "FIFO"))
    add("FIFO named events.jsonl.1", extra(fifo_jsonl_1),
        expect_ok_with_warning("events.jsonl.1", "FIFO"))
    add("FIFO named events.jsonl.1 (plot)", extra(fifo_jsonl_1, plot=True),
        expect_ok_with_warning("events.jsonl.1", "FIFO", json_run=None))
    add("symlink to /dev/zero as event file", extra(dev_zero_tb),
        expect_ok_with_warning(f"odd/{tfname}", "device"))
    add("symlink to /dev/zero as events.jsonl", extra(dev_zero_jsonl),
        expect_ok_with_warning("events.jsonl", "device"))
    add("symlink to /dev/urandom as events.jsonl.1", extra(dev_urandom_jsonl_2),
        expect_ok_with_warning("events.jsonl.1", "device"))
    add("directory named events.out.tfevents.*", extra(dir_tb), expect_ok_clean())
    add("socket named events.out.tfevents.*", extra(socket_tb),
        expect_ok_with_warning(f"odd/{tfname}", "socket"))
    add("dangling symlink as event file", extra(dangling_tb),
        expect_ok_with_warning(f"odd/{tfname}"))
    add("symlink loop as event file", extra(loop_tb), expect_ok_with_warning(f"odd/{tfname}"))
    add("event file mode 0000", extra(unreadable_tb),
        expect_ok_with_warning("odd/events.out", "ermission denied"), unprivileged=True)
    add("events.jsonl mode 0000", extra(unreadable_jsonl),
        expect_ok_with_warning("events.jsonl", "ermission denied"), unprivileged=True)
    add("run directory mode 0444 beside a good run", extra(dir_0444),
        expect_ok_with_warning("odd", "ermission denied"), unprivileged=True)
    add("run directory mode 0000 beside a good run", extra(dir_0000),
        expect_ok_with_warning("odd", "ermission denied"), unprivileged=True)

    def only_0444(tmp: Path) -> list[str]:
        good_run(tmp / "odd")
        (tmp / "odd").chmod(0o444)
        return ["report", str(tmp / "odd")]

    def error_after_warning(res: Result, tmp: Path) -> str | None:
        if "ermission denied" not in res.err:
            return "no line says 'Permission denied'"
        return expect_error("odd")(res, tmp)

    add("report <run directory mode 0444>", only_0444, error_after_warning, unprivileged=True)

    def logdir_fifo(tmp: Path) -> list[str]:
        os.mkfifo(tmp / tfname)
        return ["report", str(tmp / tfname)]

    add("report <a FIFO named like an event file>", logdir_fifo, expect_error(tfname, "FIFO"))
    add("report /dev/zero", lambda tmp: ["report", "/dev/zero"], expect_error("/dev/zero"))
    return cases


def name_cases() -> list[Case]:
    area = AREAS[4]
    cases: list[Case] = []
    names = ["red\x1b[31mrun\x1b[0m", "car\rriage", "bell\x07", "rtl\u202eevil", "[/]",
             "[bold]x[/bold]", "$\\frac{a}$", "new\nline", "z" * 250]

    def run_named(name: str | bytes, plot: bool) -> Callable[[Path], list[str]]:
        def build(tmp: Path) -> list[str]:
            dest = os.path.join(os.fsencode(tmp), name if isinstance(name, bytes)
                                else os.fsencode(name))
            shutil.copytree(template(), os.fsdecode(dest))
            with_jsonl(Path(os.fsdecode(dest)), jsonl_line(1))
            if plot:
                return [*_plot(tmp, tmp), "--per-run"]
            return ["report", str(tmp)]

        return build

    for name in names:
        for plot in (False, True):
            cases.append(Case(area, f"run named {name[:30]!r}{' (plot)' if plot else ''}",
                              run_named(name, plot), expect_ok_clean()))
    cases.append(Case(area, "run named with invalid UTF-8", run_named(b"bad\xff\xfename", False),
                      expect_ok_clean()))

    def hostile_tags(tmp: Path) -> list[str]:
        _write_tb_run(tmp / "run", steps=3, tags=("optim/lr/Ad\x1b[2Jam/pg0",
                                                  "optim/lr/[/]/global", "train/lo\rss"))
        return ["report", str(tmp)]

    def hostile_events(tmp: Path) -> list[str]:
        run = good_run(tmp / "run")
        with_jsonl(run, jsonl_line(1, kind="sp\x1b[2Jike", signal="lo\u202ess",
                                   message="\x1b]0;owned\x07", run="r\rx",
                                   lr_before={"Ad\x1b[1mam/pg0": 0.5}))
        return ["report", str(tmp)]

    cases.append(Case(area, "tags with control characters and markup", hostile_tags,
                      expect_ok_clean()))
    cases.append(Case(area, "events with control characters", hostile_events, expect_ok_clean()))

    def hostile_tags_plot(tmp: Path) -> list[str]:
        hostile_tags(tmp)
        return _plot(tmp, tmp)

    cases.append(Case(area, "tags with control characters (plot)", hostile_tags_plot,
                      expect_ok_clean()))
    return cases


def all_cases(seed: int) -> list[Case]:
    rng = random.Random(seed)
    return [*cli_cases(), *jsonl_cases(rng), *tb_cases(rng), *filetype_cases(), *name_cases()]


# ---------------------------------------------------------------------------- runner


def _child(case: Case, argv: list[str], tmp: Path, out_fd: int, err_fd: int,
           drop: bool) -> None:
    """In the forked child: redirect, maybe drop root, run main, exit with its code."""
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    rc = 98
    try:
        os.chdir(tmp)  # a relative path (``--out ''``) stays inside the case
        if drop:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        from lr_monitor.cli import main

        rc = main(argv)
        if not isinstance(rc, int):
            rc = 97
    except BaseException:  # the point is to see it
        traceback.print_exc()
        rc = 99
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


@dataclass
class Running:
    case: Case
    tmp: Path
    pid: int
    out: Path
    err: Path
    start: float


def _start(case: Case, root: Path, index: int) -> Running:
    tmp = root / f"case{index:04d}"
    tmp.mkdir()
    drop = case.unprivileged and os.geteuid() == 0
    if drop:
        tmp.chmod(0o777)
    argv = case.build(tmp)
    if drop:
        for dirpath, dirnames, filenames in os.walk(tmp):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    mode = stat.S_IMODE(os.lstat(path).st_mode)
                    if mode not in (0, 0o444, 0o555):
                        os.chmod(path, mode | 0o666 | (0o111 if os.path.isdir(path) else 0))
            dirnames[:] = [d for d in dirnames
                           if stat.S_IMODE(os.lstat(os.path.join(dirpath, d)).st_mode) & 0o100]
    out, err = tmp.parent / f"case{index:04d}.out", tmp.parent / f"case{index:04d}.err"
    out_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    err_fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        _child(case, argv, tmp, out_fd, err_fd, drop)
    os.close(out_fd)
    os.close(err_fd)
    return Running(case, tmp, pid, out, err, time.monotonic())


def _finish(run: Running, status: int | None) -> Result:
    rc = None if status is None else os.waitstatus_to_exitcode(status)
    out, err = (p.read_bytes().decode("utf-8", "surrogateescape") for p in (run.out, run.err))
    return Result(rc, out, err, time.monotonic() - run.start)


def _judge(case: Case, res: Result, tmp: Path, tally: Tally) -> str:
    tally.cases += 1
    if res.hang:
        tally.hangs += 1
        verdict = "hang"
    elif res.traceback:
        tally.tracebacks += 1
        verdict = "traceback: " + res.err.strip().splitlines()[-1][:150]
    else:
        try:
            reason = case.check(res, tmp)
        except Exception as exc:  # a checker bug is a wrong outcome too
            reason = f"checker failed: {exc!r}"
        lost = case.loss_check(res, tmp) if case.loss_check is not None else None
        if lost:
            tally.silent += 1
        if reason:
            tally.wrong += 1
        verdict = "; ".join(r for r in (reason, lost) if r) or "ok"
    if verdict != "ok":
        tally.failures.append(f"[{case.area}] {case.name}: {verdict}")
    return verdict


def run_all(cases: list[Case], *, jobs: int, timeout: float) -> dict[str, Tally]:
    tallies = {area: Tally() for area in AREAS}
    root = Path(tempfile.mkdtemp(prefix="readers-fuzz-"))
    root.chmod(0o755)
    pending = list(enumerate(cases))
    running: list[Running] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                index, case = pending.pop(0)
                running.append(_start(case, root, index))
            time.sleep(0.005)
            for run in list(running):
                pid, status = os.waitpid(run.pid, os.WNOHANG)
                timed_out = pid == 0 and time.monotonic() - run.start > timeout
                if pid == 0 and not timed_out:
                    continue
                if timed_out:
                    os.kill(run.pid, signal.SIGKILL)
                    os.waitpid(run.pid, 0)
                    res = _finish(run, None)
                else:
                    res = _finish(run, status)
                running.remove(run)
                _judge(run.case, res, run.tmp, tallies[run.case.area])
    finally:
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                path = os.path.join(dirpath, d)
                if not os.path.islink(path):
                    os.chmod(path, 0o755)
        shutil.rmtree(root, ignore_errors=True)
    return tallies


def table(tallies: dict[str, Tally]) -> str:
    rows = ["| area | cases | tracebacks | hangs | wrong or missing message | silent data loss |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    total = Tally()
    for area, t in tallies.items():
        rows.append(f"| {area} | {t.cases} | {t.tracebacks} | {t.hangs} | {t.wrong} | "
                    f"{t.silent} |")
        total.cases += t.cases
        total.tracebacks += t.tracebacks
        total.hangs += t.hangs
        total.wrong += t.wrong
        total.silent += t.silent
    rows.append(f"| **total** | {total.cases} | {total.tracebacks} | {total.hangs} | "
                f"{total.wrong} | {total.silent} |")
    return "\n".join(rows)


def _preload() -> None:
    """Import everything the children use, once (a child may run as nobody)."""
    import lr_monitor.cli.main
    import lr_monitor.cli.plot
    import lr_monitor.cli.report  # noqa: F401
    from lr_monitor.cli import main

    tmp = Path(tempfile.mkdtemp(prefix="readers-fuzz-warm-"))
    try:
        good_run(tmp / "run")
        with open(os.devnull, "w") as null:
            saved = sys.stdout
            sys.stdout = null
            try:
                main(["report", str(tmp)])
                main(["plot", str(tmp), "-o", str(tmp / "w.png")])
            finally:
                sys.stdout = saved
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random cases")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds before a case counts as a hang (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="cases run at once (default: the number of CPUs)")
    parser.add_argument("--show", choices=("none", "wrong"), default="none",
                        help="print every case that failed")
    args = parser.parse_args(argv)
    os.environ["COLUMNS"] = "160"
    start = time.monotonic()
    cases = all_cases(args.seed)
    try:
        _preload()
        tallies = run_all(cases, jobs=args.jobs, timeout=args.timeout)
    finally:
        if _TEMPLATE is not None:  # the mkdtemp directory itself, never its parent
            shutil.rmtree(_TEMPLATE)
    print(table(tallies))
    print(f"\n{sum(t.cases for t in tallies.values())} cases in "
          f"{time.monotonic() - start:.0f} s (seed {args.seed}, timeout {args.timeout:g} s, "
          f"{args.jobs} at a time, {'as nobody' if os.geteuid() == 0 else 'unprivileged'} for "
          "the permission cases)")
    failures = [f for t in tallies.values() for f in t.failures]
    if args.show == "wrong":
        for line in failures:
            print(line)
    bad = sum(t.tracebacks + t.hangs + t.wrong + t.silent for t in tallies.values())
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main_())
