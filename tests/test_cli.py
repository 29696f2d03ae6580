"""Tests for the ``lr-monitor`` command line: report, plot and demo.

``report`` and ``plot`` run on TensorBoard event files written here with
``torch.utils.tensorboard.SummaryWriter`` (the monitor's and the guard's tags) and an
``events.jsonl`` written with :meth:`GuardEvent.to_dict`, so every expected number is
known exactly. Values are powers of two, which float32 event files store exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lr_monitor.cli import main
from lr_monitor.events import GuardEvent

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------- fixtures

HEALTHY_STEPS = 40
BAD_STEPS = 30
BAD_EVENTS = (
    GuardEvent(step=3, kind="divergence", signal="loss", value=512.0, threshold=16.0,
               message="loss exploded", actions=("rollback", "cut_lr"),
               lr_before={"Adam/pg0": 1.0}, lr_after={"Adam/pg0": 0.125}, lr_scale=0.125,
               epoch=0, time=1000.0, run="too-high/version_0"),
    GuardEvent(step=9, kind="update_ratio", signal="update_ratio", value=0.25, threshold=0.125,
               message="update ratio high", actions=("log",), lr_before={"Adam/pg0": 0.125},
               lr_after={"Adam/pg0": 0.125}, lr_scale=0.125, epoch=0, time=1001.0,
               run="too-high/version_0"),
    GuardEvent(step=17, kind="spike", signal="loss", value=64.0, threshold=8.0,
               message="loss spike", actions=("skip", "cut_lr"),
               lr_before={"Adam/pg0": 0.125}, lr_after={"Adam/pg0": 0.015625},
               lr_scale=0.015625, epoch=1, time=1002.0, run="too-high/version_0"),
    GuardEvent(step=25, kind="nonfinite", signal="loss", value=float("nan"), threshold=0.0,
               message="loss is nan", actions=("stop",), lr_before={"Adam/pg0": 0.015625},
               lr_after={"Adam/pg0": 0.015625}, lr_scale=0.015625, epoch=1, time=1003.0,
               run="too-high/version_0"),
)


def write_run(
    run_dir: Path,
    *,
    steps: int,
    lr: float,
    events: Sequence[GuardEvent] = (),
    monitor: bool = True,
    guard: bool = True,
) -> None:
    """Write a run like Lightning + StepSizeMonitor + DivergenceGuard would."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    by_step = {e.step: e for e in events}
    cur_lr, scale, count = lr, 1.0, 0
    for step in range(steps):
        if step in by_step:
            cur_lr = by_step[step].lr_after["Adam/pg0"]
            scale = by_step[step].lr_scale
            count += 1
        loss = 2.0 ** (1 - step // 4) if lr < 0.5 else (512.0 if step == 3 else 2.0)
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/acc", 0.5, step)
        if monitor:
            for group in ("pg0", "global"):
                writer.add_scalar(f"optim/lr/Adam/{group}", cur_lr, step)
                writer.add_scalar(f"optim/eff_lr/p05/Adam/{group}", cur_lr / 4, step)
                writer.add_scalar(f"optim/eff_lr/p50/Adam/{group}", cur_lr * 2, step)
                writer.add_scalar(f"optim/eff_lr/p95/Adam/{group}", cur_lr * 64, step)
                ratio = 2.0 ** -(10 - (step == 2) * 12)  # 1/1024 except at step 2: 4
                writer.add_scalar(f"optim/update_ratio/Adam/{group}", ratio, step)
                writer.add_scalar(f"optim/grad_norm/Adam/{group}", loss / 2, step)
                nonfinite = float(step == 25 and lr >= 0.5)
                writer.add_scalar(f"optim/nonfinite/Adam/{group}", nonfinite, step)
        if guard:
            writer.add_scalar("guard/lr_scale", scale, step)
            writer.add_scalar("guard/events", count, step)
        if step % 10 == 9:
            writer.add_scalar("val/loss", loss, step)
            writer.add_scalar("val/acc", 0.75 if lr < 0.5 else 0.125, step)
    writer.close()
    if events:
        with open(run_dir / "events.jsonl", "w", encoding="utf-8") as f:
            for event in events:
                f.write(json.dumps(event.to_dict()) + "\n")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two runs: healthy (lr 2^-10, no events) and too-high (lr 1, four guard events)."""
    root = tmp_path_factory.mktemp("logs")
    write_run(root / "healthy" / "version_0", steps=HEALTHY_STEPS, lr=2.0**-10)
    write_run(root / "too-high" / "version_0", steps=BAD_STEPS, lr=1.0, events=BAD_EVENTS)
    return root


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich wraps table cells at the terminal width (80 when not a terminal)."""
    monkeypatch.setenv("COLUMNS", "200")


def copy_logdir(logdir: Path, dest: Path) -> Path:
    shutil.copytree(logdir, dest)
    return dest


def report_json(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    assert main(["report", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def by_name(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["run"]: r for r in payload["runs"]}


# ------------------------------------------------------------------------------ report


def test_report_table_names_runs_and_numbers(logdir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(logdir)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err == ""
    assert "run healthy/version_0" in out
    assert "run too-high/version_0" in out
    assert out.index("run healthy/version_0") < out.index("run too-high/version_0")
    assert "40 (last logged step 39)" in out  # healthy steps
    assert "30 (last logged step 29)" in out
    # healthy train/loss = 2^(1 - step // 4): from 2 down to 2^-8, first reached at step 36
    assert re.search(r"loss \(train/loss\) +│ 2 at step 0 → best 0.003906 at step 36 → last "
                     r"0.003906 at step 39 +│", out)  # nothing to add: no ratio, no peak
    # too-high: 512 at step 3, back to 2 after the rollback
    assert "2 at step 0 → best 2 at step 0 → last 2 at step 29: peak 512 at step 3, 256× " \
           "its start" in out
    assert "2 (steps 3, 17)" in out  # LR cuts of too-high
    assert "1 (step 17)" in out  # the skip
    assert "1 (step 25)" in out  # the stop
    assert "4 (divergence ×1, nonfinite ×1, spike ×1, update_ratio ×1)" in out
    assert "1 → 0.01562" in out  # lr first → last
    assert "4 at step 2" in out  # max update ratio
    assert "step 3: divergence on loss = 512" in out  # event lines


def test_report_json_equals_what_was_written(logdir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    payload = report_json(capsys, logdir)
    assert payload["logdir"] == str(logdir)
    runs = by_name(payload)
    assert sorted(runs) == ["healthy/version_0", "too-high/version_0"]

    healthy = runs["healthy/version_0"]
    assert healthy["steps"] == HEALTHY_STEPS and healthy["last_step"] == HEALTHY_STEPS - 1
    assert healthy["metrics"]["train/loss"] == {
        "last": 2.0**-8, "step": 39, "min": 2.0**-8, "max": 2.0, "points": 40}
    assert healthy["metrics"]["val/acc"]["last"] == 0.75
    assert healthy["events"] == [] and healthy["events_file"] is None
    assert healthy["alerts"] == 0
    assert healthy["guard"]["actions"] == {"cut_lr": [], "skip": [], "rollback": [], "stop": []}
    assert healthy["guard"]["final_lr_scale"] == 1.0
    adam = healthy["step_size"]["Adam"]
    assert adam["eff_lr_p50_median"] == 2.0**-9
    assert adam["update_ratio_max"] == 4.0 and adam["update_ratio_max_step"] == 2
    assert adam["lr"] == {"pg0": {"first": 2.0**-10, "first_step": 0, "last": 2.0**-10,
                                  "step": 39, "min": 2.0**-10, "min_step": 0,
                                  "max": 2.0**-10, "max_step": 0}}
    assert adam["update_ratio_median"] == 2.0**-10
    assert healthy["loss"]["source"] == "found"
    assert healthy["loss"]["train"]["train/loss"] == {
        "first": 2.0, "first_step": 0, "best": 2.0**-8, "best_step": 36, "max": 2.0,
        "max_step": 0, "last": 2.0**-8, "last_step": 39, "points": 40, "nonfinite": 0,
        "first_nonfinite_step": None, "last_over_best": 1.0, "max_over_first": 1.0,
        "gave_back": 0.0}
    assert list(healthy["loss"]["val"]) == ["val/loss"] and healthy["guard"]["output"]
    assert adam["nonfinite_steps"] == 0

    bad = runs["too-high/version_0"]
    assert bad["steps"] == BAD_STEPS
    assert bad["events"] == [json.loads(json.dumps(e.to_dict())) for e in BAD_EVENTS]
    assert bad["events"][3]["value"] == "nan"  # non-finite floats as strings, strict JSON
    assert bad["guard"]["actions"] == {
        "cut_lr": [3, 17], "skip": [17], "rollback": [3], "stop": [25], "log": [9]}
    assert bad["guard"]["kinds"] == {"divergence": 1, "update_ratio": 1, "spike": 1,
                                     "nonfinite": 1}
    assert bad["guard"]["events"] == 4 and bad["guard"]["logged_events"] == 4
    assert bad["guard"]["final_lr_scale"] == 0.015625
    assert bad["alerts"] == 4
    assert bad["events_file"] == str(logdir / "too-high" / "version_0" / "events.jsonl")
    adam = bad["step_size"]["Adam"]
    # p50 = 2 * lr: lr is 1 for steps 0-2, 1/8 for 3-16, 1/64 for 17-29 -> median 1/4
    assert adam["eff_lr_p50_median"] == 0.25
    assert adam["lr"]["pg0"] == {"first": 1.0, "first_step": 0, "last": 0.015625, "step": 29,
                                 "min": 0.015625, "min_step": 17, "max": 1.0, "max_step": 0}
    loss = bad["loss"]["train"]["train/loss"]
    assert (loss["max"], loss["max_step"], loss["max_over_first"]) == (512.0, 3, 256.0)
    assert adam["nonfinite_steps"] == 1
    assert bad["metrics"]["train/loss"]["max"] == 512.0


def test_report_single_run_directory_and_event_file(logdir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = logdir / "too-high" / "version_0"
    payload = report_json(capsys, run_dir)
    assert [r["run"] for r in payload["runs"]] == ["version_0"]
    assert payload["runs"][0]["alerts"] == 4
    event_file = next(run_dir.glob("events.out.tfevents.*"))
    payload = report_json(capsys, event_file)
    assert payload["runs"][0]["steps"] == BAD_STEPS


def test_report_tolerates_a_truncated_last_line(logdir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_logdir(logdir, tmp_path / "logs")
    with open(root / "too-high" / "version_0" / "events.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 28, "kind": "spike", "sig')  # a write interrupted by a kill
    runs = by_name(report_json(capsys, root))
    assert [e["step"] for e in runs["too-high/version_0"]["events"]] == [3, 9, 17, 25]


def test_report_counts_an_event_recorded_twice_once(logdir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # a log a resumed run could not rewind (an older version wrote it): the steps after the
    # checkpoint are in it twice, the resumed run's copy last
    root = copy_logdir(logdir, tmp_path / "logs")
    path = root / "too-high" / "version_0" / "events.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    replayed = [json.loads(line) | {"value": 99.0} for line in lines[2:]]
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in replayed)
    assert main(["report", str(root), "--json"]) == 0
    out, err = capsys.readouterr()
    run = by_name(json.loads(out))["too-high/version_0"]
    assert run["guard"]["events"] == 4
    assert sum(run["guard"]["kinds"].values()) == 4  # per kind, each decision counted once
    assert [e["step"] for e in run["events"]] == [3, 9, 17, 25]
    assert [e["value"] for e in run["events"]][2:] == [99.0, 99.0]  # the resumed run's copy
    assert "2 event(s) recorded twice" in err


def test_report_without_monitor_or_guard(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "plain", steps=5, lr=2.0**-10, monitor=False, guard=False)
    run = report_json(capsys, tmp_path)["runs"][0]
    assert run["step_size"] == {} and run["guard"]["final_lr_scale"] is None
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no StepSizeMonitor tags" in out and "no DivergenceGuard output" in out


def test_report_plain_text_without_rich(logdir: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails -> plain text
    assert main(["report", str(logdir)]) == 0
    out = capsys.readouterr().out
    assert "run too-high/version_0" in out and "2 (steps 3, 17)" in out
    assert "┌" not in out


def _corrupt_middle_line(root: Path) -> Path:
    path = root / "too-high" / "version_0" / "events.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1][:20]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _garbage_event_file(root: Path) -> Path:
    path = root / "broken" / "events.out.tfevents.123.host"
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(range(256)) * 4)
    return path


@pytest.mark.parametrize("command", ["report", "plot"])
@pytest.mark.parametrize(
    ("case", "make", "expected"),
    [
        ("missing", lambda root: root / "does-not-exist", "no such file or directory"),
        ("empty", lambda root: root / "too-high" / "version_0" / "empty-subdir",
         "no TensorBoard event files"),
        ("not-an-event-file", lambda root: root / "too-high" / "version_0" / "events.jsonl",
         "not a TensorBoard event file"),
    ],
)
def test_errors_are_one_line_naming_the_file(logdir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], command: str,
                                             case: str, make: Any, expected: str) -> None:
    root = copy_logdir(logdir, tmp_path / "logs")
    (root / "too-high" / "version_0" / "empty-subdir").mkdir()
    bad = make(root)
    argv = [command, str(bad)]
    if command == "plot":
        argv += ["-o", str(tmp_path / "out.png")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"lr-monitor {command}: error: ")
    assert str(bad) in captured.err
    assert expected in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("command", ["report", "plot"])
@pytest.mark.parametrize(
    ("case", "make", "expected"),
    [
        ("corrupt-jsonl", _corrupt_middle_line, "line 2: skipped a corrupt event record"),
        ("garbage-tfevents", _garbage_event_file,
         "not a TensorBoard event file (no intact record in its 1024 bytes), skipped"),
    ],
)
def test_damage_is_one_warning_line_and_the_rest_is_read(
        logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
        case: str, make: Any, expected: str) -> None:
    root = copy_logdir(logdir, tmp_path / "logs")
    bad = make(root)
    argv = [command, str(root)]
    argv += ["-o", str(tmp_path / "out.png")] if command == "plot" else ["--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"lr-monitor {command}: warning: {bad}")
    assert expected in captured.err
    if command == "report":
        runs = by_name(json.loads(captured.out))
        assert runs["healthy/version_0"]["steps"] == HEALTHY_STEPS
        events = [e["step"] for e in runs["too-high/version_0"]["events"]]
        assert events == ([3, 17, 25] if case == "corrupt-jsonl" else [3, 9, 17, 25])
    else:
        assert png_size(tmp_path / "out.png")[0] > 500


def test_usage_errors_exit_2_and_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert capsys.readouterr().err == ("lr-monitor: error: the following arguments are "
                                       "required: COMMAND (see lr-monitor --help)\n")
    assert main(["report"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line, not usage + error
    assert main(["demo", "--epochs", "0"]) == 2
    assert capsys.readouterr().err == ("lr-monitor demo: error: --epochs=0 is invalid: must be "
                                       "an int in [1, 10000]\n")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("demo", "report", "plot"))
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("lr-monitor ")


# -------------------------------------------------------------------------------- plot


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_one_png_with_a_column_per_run(logdir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    both, single = tmp_path / "both.png", tmp_path / "single.png"
    assert main(["plot", str(logdir), "-o", str(both)]) == 0
    assert capsys.readouterr().out == f"wrote {both}\n"
    assert main(["plot", str(logdir / "healthy"), "-o", str(single)]) == 0
    (w2, h2), (w1, h1) = png_size(both), png_size(single)
    assert both.stat().st_size > 50_000
    assert h2 == h1 and w2 > 1.7 * w1  # a second column, same rows


def test_plot_per_run(logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.png"
    assert main(["plot", str(logdir), "-o", str(out), "--per-run"]) == 0
    expected = [tmp_path / "run-healthy_version_0.png", tmp_path / "run-too-high_version_0.png"]
    assert capsys.readouterr().out.split() == [w for p in expected for w in ("wrote", str(p))]
    assert not out.exists()
    for path in expected:
        assert png_size(path)[0] > 500


def test_plot_run_without_monitor_tags(tmp_path: Path) -> None:
    write_run(tmp_path / "plain", steps=5, lr=2.0**-10, monitor=False, guard=False)
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "p.png")]) == 0
    assert png_size(tmp_path / "p.png")[0] > 500


@pytest.mark.parametrize(
    ("output", "expected"),
    [("missing-dir/run.png", "in a directory that exists"), ("run.pdf", "must be a .png file")],
)
def test_plot_bad_output(logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         output: str, expected: str) -> None:
    assert main(["plot", str(logdir), "-o", str(tmp_path / output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / output) in err and expected in err


# ------------------------------------------------------------------ the console script


def console_script() -> list[str]:
    """The installed ``lr-monitor`` script, else ``python -m lr_monitor.cli``."""
    script = Path(sys.executable).parent / "lr-monitor"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lr_monitor.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([*console_script(), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env, check=False)


def test_console_script_report_and_error(logdir: Path, tmp_path: Path) -> None:
    done = run_cli("report", str(logdir), "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(by_name(json.loads(done.stdout))) == ["healthy/version_0",
                                                         "too-high/version_0"]
    root = copy_logdir(logdir, tmp_path / "logs")
    bad = _corrupt_middle_line(root)
    done = run_cli("report", str(root))
    assert done.returncode == 0 and "run too-high/version_0" in done.stdout
    assert done.stderr.count("\n") == 1 and f"warning: {bad}, line 2: skipped" in done.stderr
    done = run_cli("report", str(root / "missing"))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (f"lr-monitor report: error: {root / 'missing'}: no such file or "
                           "directory\n")


def test_module_entry_point(logdir: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "lr_monitor.cli", "report", str(logdir)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "run too-high/version_0" in done.stdout


# -------------------------------------------------------------------------------- demo


def test_demo_summary_plain_and_rich(logdir: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from lr_monitor.cli.demo import DemoResult, DemoRun, print_summary
    from lr_monitor.cli.report import build_report, load_run

    runs = []
    for name, lr, events in (("healthy", 2.0**-10, ()), ("too-high", 1.0, BAD_EVENTS)):
        run_dir = logdir / name / "version_0"
        report = build_report(load_run(run_dir, name=f"{name}/version_0"))
        runs.append(DemoRun(name=name, lr=lr, log_dir=run_dir, events=list(events),
                            stop_reason="loss is nan" if events else None, report=report))
    result = DemoResult(out=logdir, runs=runs, plot=logdir / "summary.png", epochs=2,
                        quick=True)
    print_summary(result)
    rich_out = capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "rich.console", None)
    print_summary(result)
    plain_out = capsys.readouterr().out
    for out in (rich_out, plain_out):
        assert "healthy: no divergence detected; the guard did nothing." in out
        assert "too-high: the guard detected 4 problems" in out
        assert "step 17: spike on loss = 64 (threshold 8) -> skip, cut_lr" in out
        assert "training stopped: loss is nan" in out
        assert f"--logdir {logdir}" in out
        assert str(logdir / "summary.png") in out
    assert "final loss: 0.00391" in plain_out and "val acc: 0.75" in plain_out


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    """A report without what legitimately differs between two runs: paths and times."""
    out = {k: v for k, v in report.items() if k not in ("path", "event_files", "events_file")}
    out["events"] = [{k: v for k, v in e.items() if k not in ("time", "run")}
                     for e in report["events"]]
    return out


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    # no wall-clock bound (it depends on the machine and its kernels): --quick is checked
    # by its size instead, 16 optimizer steps per run (below)
    assert "healthy-lr1e-3" in text and "too-high-lr1" in text
    assert f"--logdir {out}" in text and str(out / "summary.png") in text
    assert png_size(out / "summary.png")[0] > 1000

    runs = by_name(report_json(capsys, out))
    assert sorted(runs) == ["healthy-lr1e-3/version_0", "too-high-lr1/version_0"]
    for run in runs.values():
        assert run["steps"] == 16  # --quick: 2 epochs x 8 batches
        assert set(run["metrics"]) == {"train/loss", "train/acc", "val/loss", "val/acc"}
        assert run["step_size"]["Adam"]["eff_lr_p50_median"] > 0
    healthy, bad = runs["healthy-lr1e-3/version_0"], runs["too-high-lr1/version_0"]
    assert not any(healthy["guard"]["actions"][a] for a in ("cut_lr", "rollback", "stop"))
    assert healthy["step_size"]["Adam"]["lr"]["pg0"]["last"] == pytest.approx(1e-3)
    # lr=1.0 blows the loss up at once; the guard must have cut the learning rate.
    assert bad["metrics"]["train/loss"]["max"] > 10 * healthy["metrics"]["train/loss"]["max"]
    assert bad["guard"]["actions"]["cut_lr"], bad["guard"]
    assert bad["step_size"]["Adam"]["lr"]["pg0"]["last"] < 1.0
    assert bad["events_file"] is not None and len(bad["events"]) == bad["alerts"] >= 1
    assert math.isfinite(bad["metrics"]["val/acc"]["last"])

    assert main(["plot", str(out), "-o", str(tmp_path / "demo.png")]) == 0
    assert png_size(tmp_path / "demo.png")[0] > 1000


@pytest.mark.slow
def test_demo_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reports = []
    for name in ("a", "b"):
        assert main(["demo", "--quick", "--out", str(tmp_path / name), "--no-progress",
                     "--epochs", "1"]) == 0
        capsys.readouterr()
        reports.append(by_name(report_json(capsys, tmp_path / name)))
    assert reports[0].keys() == reports[1].keys()
    for run in reports[0]:
        assert _comparable(reports[0][run]) == _comparable(reports[1][run])


# ------------------------------------------------------------------- record-only events


def test_record_only_events_are_reported_and_plotted_as_recorded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lr_monitor.cli.plot import ACTION_COLORS, RECORDED, _event_color, _event_label
    from lr_monitor.events import Action

    def event(step: int, kind: str, actions: tuple[str, ...]) -> GuardEvent:
        return GuardEvent(step=step, kind=kind, signal=kind, value=0.25, threshold=0.125,
                          actions=actions, lr_before={"Adam/pg0": 1.0},
                          lr_after={"Adam/pg0": 1.0}, time=float(step))

    # The guard now records with no action; files of older versions hold ("log",).
    events = (event(2, "update_ratio", ()), event(4, "update_ratio", ("log",)),
              event(6, "fault", ("disable",)))
    write_run(tmp_path / "run", steps=8, lr=1.0, events=events)
    guard = report_json(capsys, tmp_path)["runs"][0]["guard"]
    assert guard["actions"] == {"cut_lr": [], "skip": [], "rollback": [], "stop": [],
                                "log": [4], "disable": [6]}
    assert guard["recorded_only"] == [2, 4]
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "recorded only" in out and "2 (steps 2, 4)" in out
    assert "action disable" in out and "action log" not in out
    assert _event_color(()) == _event_color(("log",)) == (RECORDED, ACTION_COLORS[Action.LOG])
    assert _event_label(()) == _event_label(("log",)) == RECORDED
    assert _event_color(("skip", "cut_lr")) == ("cut_lr", ACTION_COLORS[Action.CUT])
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "p.png")]) == 0
    assert png_size(tmp_path / "p.png")[0] > 500


def test_report_names_come_from_tags_and_actions() -> None:
    from lr_monitor import tags
    from lr_monitor.cli import report
    from lr_monitor.events import Action

    assert report.MONITOR_STATS == tags.STATISTICS and "update_lost_frac" in report.MONITOR_STATS
    assert report.parse_monitor_tag("optim/update_lost_frac/Adam/global") == (
        "update_lost_frac", "Adam", "global")
    assert report.EVENTS_JSONL == tags.EVENTS_FILENAME
    # (a rare "reset_state" is listed only when it happened, with the other actions)
    assert set(report.GUARD_ACTIONS) == {a.value for a in Action} - {
        "log", "disable", "reset_state"}
    assert set(report.ACTION_LABELS) == set(report.GUARD_ACTIONS)


@pytest.mark.parametrize(("field", "value"), [("step", -5), ("lr_scale", float("nan")),
                                              ("time", float("inf")), ("epoch", -1)])
def test_no_event_is_built_that_no_events_jsonl_line_could_hold(field: str,
                                                                value: float) -> None:
    """Every event can be written and read back: the reader's checks run at construction."""
    kwargs: dict[str, Any] = {"step": 2, "kind": "spike", "signal": "loss", "value": 9.0,
                              "threshold": 3.0, "time": 0.0, field: value}
    with pytest.raises(ValueError, match=f"{field}=.* is invalid"):
        GuardEvent(**kwargs)


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_events_built_in_code_are_rendered(rich: bool, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An event built in code gets its line (the table used to re-read every event)."""
    from lr_monitor.cli.report import RunData, build_report, render_reports

    if not rich:
        monkeypatch.setitem(sys.modules, "rich.console", None)
    events = [GuardEvent(step=-1, kind="spike", signal="loss", value=9.0, threshold=3.0,
                         time=0.0),
              GuardEvent(step=2, kind="spike", signal="loss", value=9.0, threshold=3.0,
                         actions=("skip",), time=0.0)]
    render_reports([build_report(RunData("r", Path("r"), (), events=events))])
    out = capsys.readouterr().out
    assert "step -1: spike on loss" in out
    assert "step 2: spike on loss = 9 (threshold 3) -> skip" in out


# ------------------------------------------------------- what the signals show (issue 15)


def write_scalars(run_dir: Path, series: dict[str, Sequence[tuple[int, float]]]) -> None:
    """A run holding exactly these ``{tag: [(step, value), ...]}``, one event per scalar."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir)) as writer:
        for tag, points in series.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)


def write_events(run_dir: Path, events: Sequence[GuardEvent]) -> None:
    with open(run_dir / "events.jsonl", "w", encoding="utf-8") as f:
        for event in events:
            f.write(json.dumps(event.to_dict()) + "\n")


def figure_of(path: Path, **kwargs: Any) -> Any:
    from lr_monitor.cli.plot import make_figure
    from lr_monitor.cli.report import load_runs

    return make_figure(load_runs(path), **kwargs)


def test_a_warm_up_peak_and_the_minimum_are_reported(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # nanoGPT-like: warm-up from 2^-13 to 2^-10 at step 8, cosine-like decay to 2^-12
    lrs = [2.0**-13] * 2 + [2.0**-12] * 3 + [2.0**-11] * 3 + [2.0**-10] * 4 + [2.0**-12] * 4
    write_scalars(tmp_path / "run", {"optim/lr/AdamW/pg0": list(enumerate(lrs)),
                                     "train/loss": [(s, 1.0) for s in range(len(lrs))]})
    lr = report_json(capsys, tmp_path)["runs"][0]["step_size"]["AdamW"]["lr"]["pg0"]
    assert (lr["first"], lr["last"]) == (2.0**-13, 2.0**-12)
    assert (lr["max"], lr["max_step"], lr["min"], lr["min_step"]) == (2.0**-10, 8, 2.0**-13, 0)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.0001221 → 0.0002441 (peak 0.0009766 at step 8, last at step 15)" in out


def test_an_exploded_loss_is_said_before_the_guard_did_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The guard ran (its tags are there) and took no action; the loss blew up anyway."""
    loss = [4.0, 2.0, 1.0, 0.5, 0.5, 8.0, 64.0, 128.0]
    ratio = [2.0**-10] * 5 + [2.0**-2] + [2.0**-10] * 2
    write_scalars(tmp_path / "run", {
        "train/loss": list(enumerate(loss)),
        "optim/update_ratio/Adam/global": list(enumerate(ratio)),
        "guard/lr_scale": [(s, 1.0) for s in range(8)],
        "guard/events": [(s, 0.0) for s in range(8)]})
    report = report_json(capsys, tmp_path)["runs"][0]
    summary = report["loss"]["train"]["train/loss"]
    assert (summary["best"], summary["best_step"], summary["last"]) == (0.5, 3, 128.0)
    assert summary["last_over_best"] == 256.0 and summary["max_over_first"] == 32.0
    assert summary["gave_back"] == (128.0 - 0.5) / (4.0 - 0.5)
    assert report["guard"]["output"] and report["guard"]["events"] == 0
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("4 at step 0 → best 0.5 at step 3 → last 128 at step 7: ended 256× its best; "
            "peak 128 at step 7, 32× its start") in out
    assert "0.25 at step 5 (256× its median 0.0009766)" in out
    assert out.index("ended 256× its best") < out.index("LR cuts")
    title = figure_of(tmp_path).axes[0].get_title(loc="left").splitlines()
    assert title == ["run", "train/loss 4 → 128, best 0.5 at 3: ended 256× best, "
                            "peak 32× start at 7", "0 guard events"]


def test_a_small_rebound_near_zero_is_not_called_an_explosion(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """4× its best, but all but 0.04 % of the way down from the start is kept."""
    write_scalars(tmp_path / "run", {"train/loss": [(0, 2.0), (1, 2.0**-12), (2, 2.0**-10)]})
    summary = report_json(capsys, tmp_path)["runs"][0]["loss"]["train"]["train/loss"]
    assert summary["last_over_best"] == 4.0 and summary["gave_back"] < 0.001
    out = _out(capsys, ["report", str(tmp_path)])
    assert "2 at step 0 → best 0.0002441 at step 1 → last 0.0009766 at step 2 " in out
    assert "ended" not in out


@pytest.mark.parametrize(
    ("tags", "found", "val"),
    [
        (("train_loss", "val_loss", "epoch"), ["train_loss"], "val_loss"),
        (("loss", "epoch"), ["loss"], None),
        (("g_loss", "d_loss", "epoch"), ["d_loss", "g_loss"], None),
        (("recon_loss_step", "recon_loss_epoch", "val/recon_loss"), ["recon_loss_step"],
         "val/recon_loss"),
    ],
)
def test_lightning_loss_names_are_found(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        tags: tuple[str, ...], found: list[str],
                                        val: str | None) -> None:
    write_scalars(tmp_path / "run", {t: [(0, 2.0), (1, 1.0)] for t in tags})
    loss = report_json(capsys, tmp_path)["runs"][0]["loss"]
    assert list(loss["train"]) == found and loss["source"] == "found"
    assert list(loss["val"]) == ([val] if val else [])
    ax = figure_of(tmp_path).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == found + ([val] if val else [])


def test_loss_tag_option_names_the_loss(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    write_scalars(tmp_path / "run", {"g_loss": [(0, 2.0), (1, 4.0)],
                                     "d_loss": [(0, 1.0), (1, 0.5)]})
    loss = by_name(json.loads(_out(capsys, ["report", str(tmp_path), "--json",
                                            "--loss-tag", "g_loss"])))["run"]["loss"]
    assert list(loss["train"]) == ["g_loss"] and loss["source"] == "--loss-tag"
    out = _out(capsys, ["report", str(tmp_path), "--loss-tag", "generator_loss"])
    assert "loss (generator_loss)" in out and "not in this run" in out
    assert "tags like a loss: d_loss, g_loss" in out
    ax = figure_of(tmp_path, loss_tags=["d_loss"]).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["d_loss"]


def _out(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_a_lightning_train_loss_is_found(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """What Lightning's own examples log: ``self.log("train_loss", ...)``, step and epoch."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger

    from tests.lightning_models import Regressor, regression_loader

    class LogsTrainLoss(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, logger=TensorBoardLogger(str(tmp_path), name="lit"),
                         log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(LogsTrainLoss(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)),
                regression_loader(n=64, batch_size=16))
    loss = report_json(capsys, tmp_path)["runs"][0]["loss"]
    assert list(loss["train"]) == ["train_loss_step"]
    assert loss["train"]["train_loss_step"]["points"] == 8  # 2 epochs x 4 batches


def test_a_cut_is_drawn_at_the_events_own_step(tmp_path: Path) -> None:
    """The monitor records every 5 steps; the guard cut at step 1: the lines change at 1."""
    write_scalars(tmp_path / "run", {
        "train/loss": [(s, 1.0) for s in range(0, 16)],
        "optim/lr/Adam/pg0": [(0, 1.0), (5, 0.125), (10, 0.125), (15, 0.125)],
        "guard/lr_scale": [(0, 1.0), (5, 0.125), (10, 0.125), (15, 0.125)]})
    write_events(tmp_path / "run", [GuardEvent(
        step=1, kind="divergence", signal="loss", value=64.0, threshold=8.0,
        actions=("cut_lr",), lr_before={"Adam/pg0": 1.0}, lr_after={"Adam/pg0": 0.125},
        lr_scale=0.125, time=0.0)])
    fig = figure_of(tmp_path)
    ax_lr = fig.axes[1]
    (lr_line,) = [ln for ln in ax_lr.get_lines() if ln.get_label() == "lr Adam/pg0"]
    assert list(zip(lr_line.get_xdata(), lr_line.get_ydata(), strict=True))[:3] == [
        (0, 1.0), (1, 0.125), (5, 0.125)]
    twin = next(a for a in fig.axes if a is not ax_lr and a.bbox.bounds == ax_lr.bbox.bounds)
    (scale_line,) = twin.get_lines()
    assert list(scale_line.get_xdata()[:2]) == [0, 1] and scale_line.get_ydata()[1] == 0.125
    marks = [c for c in fig.axes[0].collections if c.get_label() == "guard: cut_lr"]
    assert len(marks) == 1 and marks[0].get_segments()[0][0][0] == 1.0


def test_the_guard_scale_stays_on_its_axis_after_a_warm_up(tmp_path: Path) -> None:
    """Warm-up from 2^-12 to 2^-6, then a cut to 1/8: the scale line stays in view."""
    lrs = [2.0**-12, 2.0**-9, 2.0**-6, 2.0**-6, 2.0**-9, 2.0**-9]
    scale = [1.0, 1.0, 1.0, 1.0, 0.125, 0.125]
    write_scalars(tmp_path / "run", {"optim/lr/Adam/pg0": list(enumerate(lrs)),
                                     "guard/lr_scale": list(enumerate(scale))})
    fig = figure_of(tmp_path)
    ax_lr = fig.axes[1]
    twin = next(a for a in fig.axes if a is not ax_lr and a.bbox.bounds == ax_lr.bbox.bounds)
    low, high = twin.get_ylim()
    assert low < 0.125 and high > 1.0
    assert twin.get_ylim() == pytest.approx(tuple(y / 2.0**-6 for y in ax_lr.get_ylim()))


def test_no_guard_output_is_said_instead_of_zero_actions(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "plain", steps=5, lr=2.0**-10, monitor=False, guard=False)
    out = _out(capsys, ["report", str(tmp_path)])
    assert "no DivergenceGuard output" in out
    for label in ("skipped steps", "LR cuts", "rollbacks", "stops", "alerts"):
        assert label not in out
    assert not report_json(capsys, tmp_path)["runs"][0]["guard"]["output"]
    assert figure_of(tmp_path).axes[0].get_title(loc="left").endswith("no guard output")


def test_non_finite_and_negative_losses_are_not_hidden(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_scalars(tmp_path / "nan", {"loss": [(0, 2.0), (1, 1.0), (2, math.nan),
                                              (3, math.inf)]})
    write_scalars(tmp_path / "neg", {"loss": [(0, 2.0), (1, -1.0), (2, -3.0)]})
    runs = by_name(report_json(capsys, tmp_path))
    nan = runs["nan"]["loss"]["train"]["loss"]
    assert (nan["nonfinite"], nan["first_nonfinite_step"], nan["best"]) == (2, 2, 1.0)
    out = _out(capsys, ["report", str(tmp_path)])
    assert "non-finite at 2 steps (first at step 2)" in out
    fig = figure_of(tmp_path / "nan")
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["loss", "non-finite"]
    assert list(fig.axes[0].get_lines()[1].get_xdata()) == [2, 3]
    ax = figure_of(tmp_path / "neg").axes[0]  # log scale would drop the negative values
    assert ax.get_yscale() == "linear" and list(ax.get_lines()[0].get_ydata()) == [2, -1, -3]


# ---------------------------------------------------------------------- scale (issue 15)


def test_many_runs_go_to_bounded_pages_and_the_rest_is_not_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "template"
    write_run(template, steps=3, lr=2.0**-10)
    logs = tmp_path / "logs"
    for i in range(500):
        shutil.copytree(template, logs / f"run{i:03d}")
    # The last run is not a TensorBoard file: reading it would print a warning.
    for f in (logs / "run499").iterdir():
        f.write_bytes(b"\0" * 64)
    out = tmp_path / "p.png"
    assert main(["plot", str(logs), "-o", str(out), "--max-files", "2", "--per-page", "1"]) == 0
    captured = capsys.readouterr()
    written = [Path(w.removeprefix("wrote ")) for w in captured.out.splitlines()]
    assert written == [tmp_path / "p-p001.png", tmp_path / "p-p002.png"]  # of 500 pages
    assert captured.err == (
        "lr-monitor plot: warning: drew 2 of 500 runs (2 files of 1 run, the limit "
        "--max-files=2); 498 runs left out, from run002 on: choose runs with --runs GLOB or "
        "raise --max-files\n")
    for path in written:  # a column of 5.4 in + 1.2 in at 110 dpi, 13 in high
        width, height = png_size(path)
        assert width <= (1.2 + 5.4) * 110 + 1 and height <= 13 * 110 + 1
    assert main(["plot", str(logs), "-o", str(out), "--runs", "run000", "--runs", "run499",
                 "--per-page", "2"]) == 0
    captured = capsys.readouterr()  # run499 is read now: its file is named in a warning
    assert captured.out == f"wrote {out}\n"  # one page: the name given
    assert captured.err.count("\n") == 1 and "run499" in captured.err
    assert png_size(out)[0] <= (1.2 + 5.4 * 2) * 110 + 1


def test_runs_glob_selects_and_a_glob_matching_nothing_is_an_error(
        logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = json.loads(_out(capsys, ["report", str(logdir), "--json", "--runs", "too-*"]))
    assert [r["run"] for r in payload["runs"]] == ["too-high/version_0"]
    payload = json.loads(_out(capsys, ["report", str(logdir), "--json", "--runs", "he*",
                                       "--runs", "*/version_0"]))
    assert len(payload["runs"]) == 2  # a run matching two globs is there once
    assert main(["report", str(logdir), "--runs", "*/version_0", "--runs", "helthy*"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"lr-monitor report: error: --runs='helthy*' is invalid: must be a glob matching the "
        f"name of a run below {logdir} (2 runs: 'healthy/version_0', 'too-high/version_0')\n")
    out = tmp_path / "one.png"
    assert main(["plot", str(logdir), "--runs", "healthy/*", "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert png_size(out)[0] < 1000  # one column


def test_long_series_are_cut_to_max_points_keeping_spikes(tmp_path: Path) -> None:
    steps = 5000
    loss = [(s, 2.0 - s / steps) for s in range(steps)]
    loss[3333] = (3333, 512.0)
    ratio = [(s, 2.0**-10) for s in range(steps)]
    ratio[4321] = (4321, 0.5)
    write_scalars(tmp_path / "long", {"train/loss": loss,
                                      "optim/update_ratio/Adam/global": ratio})
    fig = figure_of(tmp_path, max_points=200)
    lines = [ln for ax in fig.axes for ln in ax.get_lines()]
    assert len(lines) == 2 and all(len(ln.get_xdata()) <= 200 for ln in lines)
    for line, (step, value) in zip(lines, [(3333, 512.0), (4321, 0.5)], strict=True):
        i = int(np.argmax(line.get_ydata()))
        assert (line.get_xdata()[i], line.get_ydata()[i]) == (step, value)
        assert line.get_xdata()[0] == 0 and line.get_xdata()[-1] == steps - 1


def test_thousands_of_events_are_one_collection_per_action(tmp_path: Path) -> None:
    write_scalars(tmp_path / "run", {"train/loss": [(s, 1.0) for s in range(3000)]})
    write_events(tmp_path / "run", [
        GuardEvent(step=s, kind="update_ratio", signal="update_ratio", value=0.5,
                   threshold=0.1, actions=("cut_lr",) if s % 1000 == 0 else (), time=0.0)
        for s in range(3000)])
    ax = figure_of(tmp_path).axes[0]
    labels = sorted(c.get_label() for c in ax.collections)
    assert labels == ["guard: cut_lr", "guard: recorded"]
    sizes = {c.get_label(): len(c.get_segments()) for c in ax.collections}
    assert sizes == {"guard: cut_lr": 3, "guard: recorded": 2997}


def test_plot_runs_and_decimate_check_their_arguments(tmp_path: Path) -> None:
    from lr_monitor.cli.plot import decimate, plot_runs
    from lr_monitor.cli.report import RunData

    run = RunData("r", tmp_path, ())
    for kwargs, message in (({"per_page": 0}, "per_page=0 is invalid: must be an int >= 1"),
                            ({"max_files": 1.5}, "max_files=1.5 is invalid"),
                            ({"max_points": 3}, "max_points=3 is invalid: must be an int >= 4")):
        with pytest.raises(ValueError, match=re.escape(message)):
            plot_runs([run], tmp_path / "x.png", **kwargs)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="differ in length"):
        decimate(np.arange(3), np.arange(4))
    steps, values = decimate(np.arange(7), np.arange(7.0), 4)  # the smallest cap
    assert list(steps) == [0, 6] and list(values) == [0.0, 6.0]
