"""Read lr-monitor runs back from disk and summarise them (``lr-monitor report``).

A *run* is a directory holding one or more TensorBoard event files
(``events.out.tfevents.*``), e.g. a Lightning ``TensorBoardLogger`` ``log_dir`` such as
``lr_monitor_runs/healthy-lr1e-3/version_0``. If the :class:`lr_monitor.DivergenceGuard`
was attached, the same directory also holds ``events.jsonl``, one
:meth:`~lr_monitor.events.GuardEvent.to_dict` object per line.

:func:`load_runs` finds every run below a directory, :func:`build_report` reduces one run
to a JSON-serialisable dict, and :func:`render_reports` prints reports as tables (with
``rich`` when it is installed, plain text otherwise). Every problem with the files on
disk -- a missing path, no event files, an unreadable event file, a corrupt
``events.jsonl`` line other than a truncated last one -- raises :class:`ReportError`,
whose one-line message names the file.

This module only reads files; it does not import Lightning.

Example:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> with tempfile.TemporaryDirectory() as logdir:
    ...     writer = SummaryWriter(f"{logdir}/my-run")
    ...     for step in range(5):
    ...         writer.add_scalar("train/loss", 2.0 / 2**step, step)
    ...         writer.add_scalar("optim/eff_lr/p50/Adam/global", 2.0**-10, step)
    ...     writer.close()
    ...     report = build_report(load_runs(logdir)[0])
    >>> report["run"], report["steps"], report["metrics"]["train/loss"]["last"]
    ('my-run', 5, 0.125)
    >>> report["step_size"]["Adam"]["eff_lr_p50_median"]
    0.0009765625
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from lr_monitor.eventlog import EventFileError, read_events
from lr_monitor.events import Action, GuardEvent
from lr_monitor.tags import (
    DEFAULT_PREFIX,
    EVENTS_FILENAME,
    GLOBAL,
    GUARD_EVENTS,
    GUARD_LR_SCALE,
    STATISTICS,
    TRAIN_LOSS,
    USER_METRICS,
    is_tensorboard_file,
    parse_stat_tag,
)

__all__ = [
    "ACTION_LABELS",
    "EVENTS_JSONL",
    "GUARD_ACTIONS",
    "METRIC_TAGS",
    "MONITOR_STATS",
    "ReportError",
    "RunData",
    "Series",
    "build_report",
    "find_event_files",
    "format_value",
    "load_run",
    "load_runs",
    "parse_monitor_tag",
    "render_reports",
    "reports_to_json",
]

#: Name of the guard's event log in a run directory (:data:`lr_monitor.tags.EVENTS_FILENAME`).
EVENTS_JSONL = EVENTS_FILENAME

#: The guard's actions the report always lists (with their steps), from the least to the
#: most severe: the values of :meth:`lr_monitor.events.Action.policy_choices` that change
#: something (``skip``, ``cut_lr``, ``rollback``, ``stop``).
GUARD_ACTIONS = tuple(a.value for a in map(Action.parse, Action.policy_choices())
                      if a is not Action.LOG)

#: How the table names each of :data:`GUARD_ACTIONS`.
ACTION_LABELS: dict[str, str] = {
    Action.SKIP.value: "skipped steps",
    Action.CUT.value: "LR cuts",
    Action.ROLLBACK.value: "rollbacks",
    Action.STOP.value: "stops",
}

#: Scalars logged by the LightningModule that the report summarises when present
#: (:data:`lr_monitor.tags.USER_METRICS`).
METRIC_TAGS = USER_METRICS

#: Every statistic :class:`lr_monitor.StepSizeMonitor` logs (:data:`lr_monitor.tags.STATISTICS`).
MONITOR_STATS = STATISTICS

#: Kept for existing callers: :func:`lr_monitor.tags.parse_stat_tag`.
parse_monitor_tag = parse_stat_tag


class ReportError(Exception):
    """A run on disk could not be read. The message is one line and names the file.

    Attributes:
        path: The offending file or directory.
    """

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = os.fspath(path)
        one_line = " ".join(message.split())
        super().__init__(one_line if self.path in one_line else f"{self.path}: {one_line}")


@dataclass(frozen=True, eq=False)
class Series:
    """One scalar tag of a run: steps and values in logging order.

    Args:
        steps: Global steps, as logged.
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


@dataclass(eq=False)
class RunData:
    """Everything read from one run directory.

    Args:
        name: Display name: the directory relative to the log dir that was searched.
        path: The run directory.
        event_files: The TensorBoard event files read, in name order.
        scalars: Every scalar tag.
        events: The guard's events from ``events.jsonl`` (empty when there is none).
        events_path: The ``events.jsonl`` that was read, if any.
    """

    name: str
    path: Path
    event_files: tuple[Path, ...]
    scalars: dict[str, Series] = field(default_factory=dict)
    events: list[GuardEvent] = field(default_factory=list)
    events_path: Path | None = None

    def monitor_tags(
        self, stat: str, prefix: str = DEFAULT_PREFIX, *, groups: bool = False
    ) -> dict[tuple[str, str], Series]:
        """The series of one monitor statistic, keyed by ``(optimizer, group)``.

        Args:
            stat: One of :data:`MONITOR_STATS`, e.g. ``"eff_lr/p50"``.
            prefix: The monitor's tag prefix.
            groups: Leave out an optimizer's ``global`` series when it has per-group
                series (e.g. for ``lr``, where ``global`` repeats the groups).

        Example:
            >>> s = Series(np.array([0]), np.array([0.1]))
            >>> run = RunData("r", Path("r"), (), scalars={"optim/lr/Adam/pg0": s})
            >>> list(run.monitor_tags("lr"))
            [('Adam', 'pg0')]
        """
        found: dict[tuple[str, str], Series] = {}
        for tag, series in self.scalars.items():
            parsed = parse_stat_tag(tag, prefix)
            if parsed is not None and parsed[0] == stat:
                found[(parsed[1], parsed[2])] = series
        if groups:
            has_groups = {opt for opt, group in found if group != GLOBAL}
            found = {k: v for k, v in found.items() if k[1] != GLOBAL or k[0] not in has_groups}
        return found

    def global_tags(self, stat: str, prefix: str = DEFAULT_PREFIX) -> dict[str, Series]:
        """The :data:`~lr_monitor.tags.GLOBAL` series of one statistic, keyed by optimizer.

        Args:
            stat: One of :data:`MONITOR_STATS`.
            prefix: The monitor's tag prefix.

        Returns:
            ``{optimizer: series}``.

        Example:
            >>> s = Series(np.array([0]), np.array([0.5]))
            >>> run = RunData("r", Path("r"), (), scalars={"optim/update_ratio/SGD/global": s})
            >>> list(run.global_tags("update_ratio"))
            ['SGD']
        """
        return {opt: s for (opt, row), s in self.monitor_tags(stat, prefix).items()
                if row == GLOBAL}


def find_event_files(logdir: str | os.PathLike[str]) -> list[Path]:
    """Every TensorBoard event file below ``logdir`` (recursively), sorted.

    Args:
        logdir: The directory to search.

    Returns:
        Paths of TensorBoard event files (:func:`lr_monitor.tags.is_tensorboard_file`),
        sorted by path.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(logdir):
        dirnames.sort()
        found.extend(Path(dirpath, f) for f in filenames if is_tensorboard_file(f))
    return sorted(found)


def load_runs(logdir: str | os.PathLike[str]) -> list[RunData]:
    """Load every run below ``logdir``: one per directory that holds event files.

    Args:
        logdir: A log directory (searched recursively), a single run directory, or a
            single event file.

    Returns:
        The runs, sorted by name.

    Raises:
        ReportError: If ``logdir`` does not exist, holds no event files, or a file in it
            is unreadable or corrupt.
    """
    root = Path(logdir)
    if not root.exists():
        raise ReportError(root, f"{root}: no such file or directory")
    if root.is_file():
        if not is_tensorboard_file(root.name):
            raise ReportError(root, f"{root}: not a TensorBoard event file or a directory")
        return [load_run(root.parent, name=root.parent.name or str(root.parent), files=[root])]
    files = find_event_files(root)
    if not files:
        raise ReportError(
            root, f"{root}: no TensorBoard event files (events.out.tfevents.*) found below it"
        )
    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        by_dir.setdefault(f.parent, []).append(f)
    runs = []
    for run_dir, run_files in by_dir.items():
        rel = run_dir.relative_to(root).as_posix()
        name = rel if rel != "." else (root.resolve().name or str(root))
        runs.append(load_run(run_dir, name=name, files=run_files))
    return sorted(runs, key=lambda r: r.name)


def load_run(
    run_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    files: Sequence[str | os.PathLike[str]] | None = None,
) -> RunData:
    """Load one run: its scalars and, if present, its ``events.jsonl``.

    Args:
        run_dir: The run directory.
        name: Display name (default: the directory's name).
        files: The event files to read (default: every TensorBoard event file directly in
            ``run_dir``). When given, only these are read.

    Returns:
        The run.

    Raises:
        ReportError: If an event file is not a readable TensorBoard event file, or
            ``events.jsonl`` has a corrupt line other than a truncated last one.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(run_dir)
    in_dir = sorted(p for p in path.iterdir() if p.is_file() and is_tensorboard_file(p.name))
    event_files = in_dir if files is None else sorted(Path(f) for f in files)
    for f in event_files:
        _check_event_file(f)

    # The accumulator reads a directory's files in order and handles restarts (purges);
    # a subset of a directory's files is read file by file.
    sources = [path] if event_files == in_dir else event_files
    raw: dict[str, tuple[list[int], list[float]]] = {}
    for source in sources:
        try:
            acc = EventAccumulator(str(source), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                steps, values = raw.setdefault(tag, ([], []))
                for ev in acc.Scalars(tag):
                    steps.append(int(ev.step))
                    values.append(float(ev.value))
        except Exception as exc:  # third-party reader: report, never a traceback
            raise ReportError(source, f"{source}: cannot read TensorBoard events ({exc})") from exc
    scalars = {
        tag: Series(np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
        for tag, (s, v) in sorted(raw.items())
    }

    jsonl = path / EVENTS_JSONL
    events_path = jsonl if jsonl.is_file() else None
    events = _read_guard_events(jsonl) if events_path is not None else []
    return RunData(
        name=name if name is not None else path.name,
        path=path,
        event_files=tuple(event_files),
        scalars=scalars,
        events=events,
        events_path=events_path,
    )


def _check_event_file(path: Path) -> None:
    """Raise :class:`ReportError` unless ``path`` starts with a readable event record."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    try:
        if path.stat().st_size == 0:
            return  # a writer that has not flushed yet: nothing to read, nothing wrong
        first = next(iter(EventFileLoader(str(path)).Load()), None)
    except OSError as exc:
        raise ReportError(path, f"{path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # third-party reader
        raise ReportError(path, f"{path}: not a readable TensorBoard event file ({exc})") from exc
    if first is None:
        raise ReportError(path, f"{path}: not a readable TensorBoard event file (no records)")


def _read_guard_events(path: Path) -> list[GuardEvent]:
    try:
        return read_events(path, include_rotated=True)
    except EventFileError as exc:
        raise ReportError(exc.path, str(exc)) from exc
    except OSError as exc:
        raise ReportError(path, f"{path}: {exc.strerror or exc}") from exc


# ------------------------------------------------------------------------------- report


def _series_summary(series: Series) -> dict[str, Any]:
    step, last = series.last()
    finite = series.finite()
    return {
        "last": last,
        "step": step,
        "min": float(finite.values.min()) if len(finite) else None,
        "max": float(finite.values.max()) if len(finite) else None,
        "points": len(series),
    }


def build_report(run: RunData, *, prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """Reduce a run to a JSON-serialisable dict.

    Keys: ``run``, ``path``, ``event_files``, ``events_file``, ``last_step`` (the
    largest step logged, or ``None``), ``steps`` (``last_step + 1``: Lightning logs the
    i-th optimizer step, counting from 0, at step i, so this is the number of optimizer
    steps), ``metrics`` (last/step/min/max/points of each of
    :data:`METRIC_TAGS` present), ``guard`` (event count, steps of each action in
    :data:`GUARD_ACTIONS` plus any other action seen, e.g. ``log`` in files of older
    versions, the steps of the record-only events (``recorded_only``: no action, or only
    ``log``), counts per detection kind, final LR scale), ``events`` (the guard's events
    as dicts), ``step_size`` (per optimizer: median of ``eff_lr/p50`` global, max of
    ``update_ratio`` global and its step, number of steps with non-finite values,
    first/last ``lr`` per group) and ``alerts`` (number of guard events). Floats may be
    ``nan``/``inf``; :func:`reports_to_json` encodes them.

    Args:
        run: The run.
        prefix: The monitor's tag prefix.

    Returns:
        The report.
    """
    last_steps = [int(s.steps.max()) for s in run.scalars.values() if len(s)]
    metrics = {tag: _series_summary(run.scalars[tag]) for tag in METRIC_TAGS if tag in run.scalars}

    actions: dict[str, list[int]] = {a: [] for a in GUARD_ACTIONS}
    recorded_only: list[int] = []
    kinds: dict[str, int] = {}
    for event in run.events:
        for action in event.actions:
            actions.setdefault(str(action), []).append(event.step)
        if all(a == Action.LOG for a in event.actions):
            recorded_only.append(event.step)
        kinds[event.kind] = kinds.get(event.kind, 0) + 1
    logged = run.scalars.get(GUARD_EVENTS)
    logged_count = int(logged.last()[1]) if logged is not None and len(logged) else None
    lr_scale = run.scalars.get(GUARD_LR_SCALE)
    if lr_scale is not None and len(lr_scale):
        final_scale: float | None = lr_scale.last()[1]
    elif run.events:
        final_scale = run.events[-1].lr_scale
    else:
        final_scale = None
    guard: dict[str, Any] = {
        "events": len(run.events),
        "logged_events": logged_count,
        "actions": actions,
        "recorded_only": recorded_only,
        "kinds": kinds,
        "final_lr_scale": final_scale,
    }

    step_size: dict[str, dict[str, Any]] = {}

    def entry(optimizer: str) -> dict[str, Any]:
        return step_size.setdefault(
            optimizer,
            {
                "eff_lr_p50_median": None,
                "update_ratio_max": None,
                "update_ratio_max_step": None,
                "nonfinite_steps": 0,
                "lr": {},
            },
        )

    for opt, series in run.global_tags("eff_lr/p50", prefix).items():
        finite = series.finite()
        if len(finite):
            entry(opt)["eff_lr_p50_median"] = float(np.median(finite.values))
    for opt, series in run.global_tags("update_ratio", prefix).items():
        finite = series.finite()
        if len(finite):
            i = int(np.argmax(finite.values))
            entry(opt)["update_ratio_max"] = float(finite.values[i])
            entry(opt)["update_ratio_max_step"] = int(finite.steps[i])
    for opt, series in run.global_tags("nonfinite", prefix).items():
        values = np.nan_to_num(series.values, nan=1.0)
        entry(opt)["nonfinite_steps"] = int(np.count_nonzero(values))
    for (opt, group), series in run.monitor_tags("lr", prefix, groups=True).items():
        if len(series):
            entry(opt)["lr"][group] = {
                "first": float(series.values[0]),
                "last": series.last()[1],
                "step": series.last()[0],
            }

    return {
        "run": run.name,
        "path": str(run.path),
        "event_files": [str(p) for p in run.event_files],
        "events_file": str(run.events_path) if run.events_path else None,
        "steps": max(last_steps) + 1 if last_steps else None,
        "last_step": max(last_steps) if last_steps else None,
        "metrics": metrics,
        "guard": guard,
        "events": [e.to_dict() for e in run.events],
        "step_size": dict(sorted(step_size.items())),
        "alerts": max(len(run.events), logged_count or 0),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float | np.floating):
        x = float(obj)
        return x if math.isfinite(x) else str(x)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def reports_to_json(reports: Sequence[Mapping[str, Any]], logdir: str | os.PathLike[str]) -> str:
    """Encode reports as strict JSON: ``{"logdir": ..., "runs": [...]}``.

    Non-finite floats become the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (as in
    ``events.jsonl``).

    Args:
        reports: Reports from :func:`build_report`.
        logdir: The directory they were read from.

    Returns:
        The JSON text (indented, no trailing newline).

    Example:
        >>> print(reports_to_json([{"run": "a", "steps": 3, "loss": float("nan")}], "logs"))
        {
          "logdir": "logs",
          "runs": [
            {
              "run": "a",
              "steps": 3,
              "loss": "nan"
            }
          ]
        }
    """
    payload = {"logdir": os.fspath(logdir), "runs": _jsonable(list(reports))}
    return json.dumps(payload, indent=2, allow_nan=False)


# ------------------------------------------------------------------------------- render


def format_value(x: float | None, digits: int = 4) -> str:
    """A number for a table cell: ``-`` for missing, ``digits`` significant digits.

    Args:
        x: The value.
        digits: Significant digits.

    Example:
        >>> format_value(0.000123456), format_value(None), format_value(float("inf"))
        ('0.0001235', '-', 'inf')
    """
    if x is None:
        return "-"
    return f"{float(x):.{digits}g}"


def _steps_text(steps: Sequence[int], limit: int = 8) -> str:
    if not steps:
        return "0"
    shown = ", ".join(str(s) for s in steps[:limit])
    more = f", … +{len(steps) - limit}" if len(steps) > limit else ""
    word = "step" if len(steps) == 1 else "steps"
    return f"{len(steps)} ({word} {shown}{more})"


def _rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The key/value rows of one run's table."""
    rows: list[tuple[str, str]] = [("path", str(report["path"]))]
    rows.append(("steps", "-" if report["steps"] is None
                 else f"{report['steps']} (last logged step {report['last_step']})"))
    for tag in METRIC_TAGS:  # "train/loss" -> "final train loss"
        m = report["metrics"].get(tag)
        if m is not None:
            extra = f" (max {format_value(m['max'])})" if tag == TRAIN_LOSS else ""
            rows.append((f"final {tag.replace('/', ' ')}",
                         f"{format_value(m['last'])} at step {m['step']}{extra}"))
    guard = report["guard"]
    for action in GUARD_ACTIONS:
        rows.append((ACTION_LABELS[action], _steps_text(guard["actions"].get(action, []))))
    for action, steps in guard["actions"].items():
        if action not in GUARD_ACTIONS and action != Action.LOG and steps:
            rows.append((f"action {action}", _steps_text(steps)))
    if guard.get("recorded_only"):
        rows.append(("recorded only", _steps_text(guard["recorded_only"])))
    if guard["final_lr_scale"] is not None:
        rows.append(("final LR scale", format_value(guard["final_lr_scale"])))
    kinds = ", ".join(f"{k} ×{n}" for k, n in sorted(guard["kinds"].items()))
    rows.append(("alerts", f"{report['alerts']}" + (f" ({kinds})" if kinds else "")))
    if report["events_file"] is None and guard["logged_events"] is None:
        rows.append(("guard", "no DivergenceGuard output (no events.jsonl, no guard/* tags)"))
    if not report["step_size"]:
        rows.append(("step sizes", "no StepSizeMonitor tags"))
    for opt, s in report["step_size"].items():
        rows.append((f"{opt} eff. lr p50 (median)", format_value(s["eff_lr_p50_median"])))
        ratio = format_value(s["update_ratio_max"])
        if s["update_ratio_max_step"] is not None:
            ratio += f" at step {s['update_ratio_max_step']}"
        rows.append((f"{opt} update ratio (max)", ratio))
        for group, lr in s["lr"].items():
            change = (
                f"{format_value(lr['first'])} → {format_value(lr['last'])}"
                if lr["first"] != lr["last"]
                else format_value(lr["last"])
            )
            rows.append((f"{opt}/{group} lr", f"{change} (last at step {lr['step']})"))
        if s["nonfinite_steps"]:
            rows.append((f"{opt} non-finite steps", str(s["nonfinite_steps"])))
    return rows


def _event_lines(report: Mapping[str, Any], limit: int = 10) -> list[str]:
    events = [GuardEvent.from_dict(d) for d in report["events"]]
    lines = [e.summary() for e in events[:limit]]
    if len(events) > limit:
        lines.append(f"… and {len(events) - limit} more (lr-monitor report --json lists all)")
    return lines


def render_reports(reports: Iterable[Mapping[str, Any]], file: IO[str] | None = None) -> None:
    """Print one table per report, followed by the run's guard events.

    Uses ``rich`` when it is installed, aligned plain text otherwise.

    Args:
        reports: Reports from :func:`build_report`.
        file: Where to write (default: ``sys.stdout`` at call time).
    """
    import sys

    out = file if file is not None else sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: plain text
        for report in reports:
            rows = _rows(report)
            width = max(len(k) for k, _ in rows)
            print(f"run {report['run']}", file=out)
            for key, value in rows:
                print(f"  {key:<{width}}  {value}", file=out)
            for line in _event_lines(report):
                print(f"  - {line}", file=out)
            print(file=out)
        return

    console = Console(file=out, highlight=False, soft_wrap=False)
    for report in reports:
        table = Table(title=f"run {report['run']}", title_justify="left", show_header=False)
        table.add_column("", style="bold", no_wrap=True)
        table.add_column("", overflow="fold")
        for key, value in _rows(report):
            table.add_row(key, value)
        console.print(table)
        for line in _event_lines(report):
            console.print(f"  • {line}", markup=False, soft_wrap=True)
        console.print()
