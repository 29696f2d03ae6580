r"""``lr-monitor report`` and ``plot`` at scale: wall time and peak RSS (issue 15).

Generates four log directories once (TensorBoard event files written with
``torch.utils.tensorboard.SummaryWriter``, one event per scalar as Lightning's
``TensorBoardLogger`` writes them, and ``events.jsonl`` lines from
:meth:`lr_monitor.events.GuardEvent.to_dict`), then runs each command on each in a fresh
process and records its wall time and peak RSS:

* ``runs100`` -- a sweep of 100 runs of 400 steps, 11 scalar tags at every step (loss,
  the monitor's lr / eff_lr band / update ratio / grad norm / non-finite count, the
  guard's tags) and ``val/loss`` every 50 steps; 70 healthy, 15 whose loss explodes with
  no guard event, 15 where the guard cut the LR;
* ``long100k`` -- one run of 100,000 steps, the same tags at every step (1.1 M points);
* ``events10k`` -- one run of 10,000 steps with 10,000 guard events (the guard recording
  a high update ratio at every step, cutting the LR three times);
* ``runs3000`` -- 3,000 runs: hard links to the files of ``runs100`` (every file is a
  regular file of its own name; they are read 3,000 times).

Each command runs as ``python -c <child> <lr-monitor args>`` with ``PYTHONPATH`` and the
working directory set to ``--code`` (the checkout whose ``lr_monitor`` is measured:
``--code /path/to/main --label before`` measures the code before a change). The child
prints its ``VmHWM`` (peak resident set, from ``/proc/self/status``) when it ends; the
parent polls ``VmRSS`` every 0.1 s and kills a child that passes ``--rss-limit-mib`` or
``--timeout`` (recorded as killed, with the RSS it had reached).

Usage::

    .venv/bin/python benchmarks/report_scale.py --data /tmp/lrm-scale --label after
    .venv/bin/python benchmarks/report_scale.py --data /tmp/lrm-scale --label before \
        --code ../main
    .venv/bin/python benchmarks/report_scale.py --smoke --out /tmp/x   # tiny, for tests

Results: ``benchmarks/results/report_scale.json`` (one entry per label, merged with what
is there) and ``report_scale.md`` (every label side by side); ``--smoke`` writes
``report_scale_smoke.*`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: The lr-monitor child: runs ``main`` and prints its peak RSS last on stderr.
CHILD = """\
import sys
code = 99
try:
    import lr_monitor
    sys.stderr.write("LR_MONITOR_FILE " + lr_monitor.__file__ + "\\n")
    from lr_monitor.cli import main
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as f:
        hwm = [line.split()[1] for line in f if line.startswith("VmHWM")]
    sys.stderr.write("\\nVMHWM_KB " + (hwm[0] if hwm else "0") + "\\n")
sys.exit(code)
"""

TAGS_PER_STEP = 11


# ------------------------------------------------------------------------------- data


def _schedule(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 10 % of the steps to ``peak``, then cosine to 5 % of it."""
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def write_run(run_dir: Path, *, steps: int, kind: str, seed: int,
              n_events: int = 0) -> None:
    """One run as Lightning + StepSizeMonitor + DivergenceGuard would leave it.

    ``kind``: ``healthy``; ``exploding`` (the loss blows up at 60 % of the steps and stays
    up, no guard event); ``guarded`` (the same, and the guard cut the LR tenfold there);
    ``noisy`` (``n_events`` guard events spread over the run, three of them cuts).
    """
    from torch.utils.tensorboard import SummaryWriter

    from lr_monitor.events import GuardEvent

    rng = random.Random(seed)
    peak = 10 ** rng.uniform(-4, -2.5)
    blow = int(steps * 0.6) if kind in ("exploding", "guarded") else None
    events: list[GuardEvent] = []
    cut_steps: dict[int, float] = {}
    if kind == "guarded" and blow is not None:
        cut_steps[blow] = 0.1
    if kind == "noisy" and n_events:
        stride = max(1, steps // n_events)
        every = list(range(0, steps, stride))[:n_events]
        for k in (len(every) // 4, len(every) // 2, 3 * len(every) // 4):
            cut_steps[every[k]] = 0.5
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(run_dir), max_queue=10_000, flush_secs=600)
    scale, count = 1.0, 0
    event_steps = set(range(0, steps, max(1, steps // n_events))) if n_events else set()
    for step in range(steps):
        lr = _schedule(step, steps, peak) * scale
        loss = 2.3 * math.exp(-3 * step / steps) + 0.1 + 0.02 * rng.random()
        ratio = 1e-3 * (1 + 0.1 * rng.random())
        if blow is not None and step >= blow and not (kind == "guarded" and step > blow + 5):
            loss *= 100 * (1 + rng.random())
            ratio *= 300
        if step in cut_steps or (step in event_steps and len(events) < n_events):
            factor = cut_steps.get(step)
            lr_before = {"Adam/pg0": lr}
            if factor is not None:
                scale *= factor
                lr = _schedule(step, steps, peak) * scale
            events.append(GuardEvent(
                step=step, kind="divergence" if kind == "guarded" else "update_ratio",
                signal="loss" if kind == "guarded" else "update_ratio", value=ratio,
                threshold=0.1, message="benchmark event",
                actions=("cut_lr",) if factor is not None else (),
                lr_before=lr_before, lr_after={"Adam/pg0": lr}, lr_scale=scale, epoch=0,
                time=1000.0 + step, run=run_dir.name))
            count += 1
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("optim/lr/Adam/pg0", lr, step)
        writer.add_scalar("optim/lr/Adam/global", lr, step)
        writer.add_scalar("optim/eff_lr/p05/Adam/global", lr * 0.3, step)
        writer.add_scalar("optim/eff_lr/p50/Adam/global", lr * 2.0, step)
        writer.add_scalar("optim/eff_lr/p95/Adam/global", lr * 30.0, step)
        writer.add_scalar("optim/update_ratio/Adam/global", ratio, step)
        writer.add_scalar("optim/grad_norm/Adam/global", loss * 0.5, step)
        writer.add_scalar("optim/nonfinite/Adam/global", 0.0, step)
        writer.add_scalar("guard/lr_scale", scale, step)
        writer.add_scalar("guard/events", count, step)
        if step % 50 == 49:
            writer.add_scalar("val/loss", loss * 1.1, step)
    writer.close()
    if events:
        with open(run_dir / "events.jsonl", "w", encoding="utf-8") as f:
            for event in events:
                f.write(json.dumps(event.to_dict(), separators=(",", ":")) + "\n")


def _sweep_kind(i: int) -> str:
    return "exploding" if i % 10 in (3, 7) and i % 20 != 7 else (
        "guarded" if i % 10 in (5, 9) and i % 20 != 9 else "healthy")


def make_data(data: Path, *, smoke: bool) -> dict[str, Path]:
    """The log directories of every case, generated on first use (a ``.done`` marker)."""
    n_runs, run_steps, long_steps, n_events, n_links = (
        (4, 40, 2_000, 200, 30) if smoke else (100, 400, 100_000, 10_000, 3_000))
    cases = {"runs100": data / "runs100", "long100k": data / "long100k",
             "events10k": data / "events10k", "runs3000": data / "runs3000"}

    def sweep(d: Path) -> None:
        for i in range(n_runs):
            write_run(d / f"lr{i:03d}-{_sweep_kind(i)}" / "version_0", steps=run_steps,
                      kind=_sweep_kind(i), seed=i)

    makers: dict[str, Callable[[Path], None]] = {
        "runs100": sweep,
        "long100k": lambda d: write_run(d / "long" / "version_0", steps=long_steps,
                                        kind="healthy", seed=1),
        "events10k": lambda d: write_run(d / "events" / "version_0", steps=n_events,
                                         kind="noisy", seed=2, n_events=n_events),
        "runs3000": lambda d: _link_runs(cases["runs100"], d, n_links),
    }
    for name in ("runs100", "long100k", "events10k", "runs3000"):
        done = cases[name] / ".done"
        if not done.exists():
            start = time.monotonic()
            print(f"generating {name} in {cases[name]} ...", flush=True)
            makers[name](cases[name])
            done.write_text(f"{time.monotonic() - start:.0f} s\n")
    return cases


def _link_runs(source: Path, dest: Path, n: int) -> None:
    """``n`` runs under ``dest``, each a directory of hard links to one run of ``source``."""
    templates = sorted(p.parent for p in source.rglob("events.out.tfevents.*"))
    for i in range(n):
        src = templates[i % len(templates)]
        run = dest / f"sweep{i // 100:02d}" / f"run{i:04d}"
        run.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            target = run / f.name
            if not target.exists():
                os.link(f, target)
    dest.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------ measure


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _png_size(path: Path) -> tuple[int, int] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def measure(argv: list[str], *, code: Path, timeout: float, rss_limit_mib: float,
            workdir: Path) -> dict[str, Any]:
    """Run ``lr-monitor argv`` in a fresh process; wall time, peak RSS, what it wrote."""
    env = {**os.environ, "PYTHONPATH": str(code), "COLUMNS": "120",
           "MPLBACKEND": "Agg"}
    out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], cwd=code, env=env,
                                stdout=out, stderr=err)
        peak_polled, killed = 0, None
        while proc.poll() is None:
            rss = _rss_kb(proc.pid)
            peak_polled = max(peak_polled, rss)
            elapsed = time.monotonic() - start
            if rss > rss_limit_mib * 1024:
                killed = f"RSS passed {rss_limit_mib:.0f} MiB"
            elif elapsed > timeout:
                killed = f"still running after {timeout:.0f} s"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.1)
        seconds = time.monotonic() - start
    stderr = err_path.read_text(errors="replace")
    stdout = out_path.read_text(errors="replace")
    hwm = [int(line.split()[1]) for line in stderr.splitlines() if line.startswith("VMHWM_KB")]
    used = [line.split(" ", 1)[1] for line in stderr.splitlines()
            if line.startswith("LR_MONITOR_FILE ")]
    written = [Path(line[len("wrote "):]) for line in stdout.splitlines()
               if line.startswith("wrote ")]
    sizes = [s for s in (_png_size(p) for p in written) if s is not None]
    problems = [line for line in stderr.splitlines()
                if line and not line.startswith(("VMHWM_KB", "LR_MONITOR_FILE"))]
    result: dict[str, Any] = {
        "argv": argv,
        "rc": proc.returncode if killed is None else None,
        "killed": killed,
        "seconds": round(seconds, 2),
        "peak_rss_mib": round((hwm[0] if hwm else peak_polled) / 1024, 1),
        "lr_monitor": used[0] if used else None,
        "pngs": len(written),
        "largest_png": max(sizes, key=lambda s: s[0] * s[1]) if sizes else None,
        "stdout_bytes": len(stdout.encode()),
        "stderr_tail": problems[-3:],
    }
    for p in written:  # PNGs can be large; only their sizes are kept
        p.unlink(missing_ok=True)
    return result


COMMANDS = ("report", "plot")


def run_cases(cases: dict[str, Path], names: list[str], *, code: Path, timeout: float,
              rss_limit_mib: float, commands: tuple[str, ...] = COMMANDS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="report_scale-") as tmp:
        work = Path(tmp)
        for name in names:
            for command in commands:
                argv = ([command, str(cases[name]), "--json"] if command == "report"
                        else [command, str(cases[name]), "-o", str(work / "plot.png")])
                result = measure(argv, code=code, timeout=timeout,
                                 rss_limit_mib=rss_limit_mib, workdir=work)
                out[f"{name}/{command}"] = result
                status = (f"killed ({result['killed']})" if result["killed"]
                          else f"exit {result['rc']}")
                print(f"{name:10s} {command:6s} {result['seconds']:8.1f} s "
                      f"{result['peak_rss_mib']:8.0f} MiB  {status}  pngs={result['pngs']} "
                      f"largest={result['largest_png']}", flush=True)
    return out


# ------------------------------------------------------------------------------ output


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "python": sys.version.split()[0]}


def markdown(doc: dict[str, Any]) -> str:
    labels = list(doc["labels"])
    lines = ["# `lr-monitor report` / `plot` at scale (`benchmarks/report_scale.py`)", "",
             f"Machine: {doc['machine']['nproc']} CPUs, {doc['machine']['cpu_model']}, "
             f"Python {doc['machine']['python']}. Each command in a fresh process; peak RSS "
             "is the child's `VmHWM`. A killed run shows the RSS it had reached.", "",
             "| case | command | " + " | ".join(f"{lb}: time, peak RSS, PNGs (largest)"
                                              for lb in labels) + " |",
             "| --- | --- | " + " | ".join("---" for _ in labels) + " |"]
    keys = sorted({k for lb in labels for k in doc["labels"][lb]["results"]},
                  key=lambda k: (list(doc["cases"]).index(k.split("/")[0])
                                 if k.split("/")[0] in doc["cases"] else 99,
                                 COMMANDS.index(k.split("/")[1])))
    for key in keys:
        cells = []
        for lb in labels:
            r = doc["labels"][lb]["results"].get(key)
            if r is None:
                cells.append("-")
                continue
            state = f"**killed**: {r['killed']}" if r["killed"] else (
                "" if r["rc"] == 0 else f"exit {r['rc']}: {' '.join(r['stderr_tail'])[:160]}")
            size = (f", {r['pngs']} ({r['largest_png'][0]}×{r['largest_png'][1]} px)"
                    if r["largest_png"] else "")
            cells.append(f"{r['seconds']:.1f} s, {r['peak_rss_mib']:.0f} MiB{size}"
                         + (f" {state}" if state else ""))
        case, command = key.split("/")
        lines.append(f"| {case} | {command} | " + " | ".join(cells) + " |")
    lines += ["", "Cases:", ""]
    lines += [f"* `{name}`: {text}" for name, text in doc["cases"].items()]
    lines += ["", "Labels:", ""]
    lines += [f"* `{lb}`: code `{doc['labels'][lb]['code']}` ({doc['labels'][lb]['commit']}), "
              f"{doc['labels'][lb]['date']}" for lb in labels]
    return "\n".join(lines) + "\n"


CASE_TEXT = {
    "runs100": "100 runs × 400 steps, 11 scalar tags per step + val/loss every 50 steps "
               "(70 healthy, 15 exploding without a guard event, 15 guarded)",
    "long100k": "1 run × 100,000 steps, the same 11 tags per step (1.1 M points)",
    "events10k": "1 run × 10,000 steps with 10,000 guard events in events.jsonl",
    "runs3000": "3,000 runs (hard links to the runs100 files)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="where the log directories are generated (kept for reruns; "
                             "default: a directory under the system temp dir)")
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="checkout whose lr_monitor is measured (default: this one)")
    parser.add_argument("--label", default="after", help="name of this measurement")
    parser.add_argument("--cases", default="runs100,long100k,events10k,runs3000")
    parser.add_argument("--commands", default="report,plot",
                        help="which of report,plot to run (default: both)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--rss-limit-mib", type=float, default=3072.0)
    parser.add_argument("--smoke", action="store_true", help="tiny data, for the tests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    stem = "report_scale_smoke" if args.smoke else "report_scale"
    data = args.data or Path(tempfile.gettempdir()) / f"lr_monitor_{stem}"
    cases = make_data(data, smoke=args.smoke)
    code = args.code.resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code,
                            capture_output=True, text=True, check=False).stdout.strip()
    commands = tuple(c for c in args.commands.split(",") if c in COMMANDS)
    results = run_cases(cases, names, code=code, timeout=args.timeout,
                        rss_limit_mib=args.rss_limit_mib, commands=commands)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{stem}.json"
    doc: dict[str, Any] = {"machine": _machine(), "cases": CASE_TEXT, "labels": {}}
    if json_path.exists() and not args.smoke:
        doc["labels"] = json.loads(json_path.read_text())["labels"]
    entry = doc["labels"].setdefault(args.label, {"results": {}})
    entry.update(code=str(code), commit=commit or None,
                 date=time.strftime("%Y-%m-%d %H:%M"))
    entry["results"].update(results)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(doc))
    print(f"wrote {json_path} and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
