"""Read lr-monitor runs back from disk and summarise them (``lr-monitor report``).

A *run* is a directory holding one or more TensorBoard event files
(``events.out.tfevents.*``), e.g. a Lightning ``TensorBoardLogger`` ``log_dir`` such as
``lr_monitor_runs/healthy-lr1e-3/version_0``. If the :class:`lr_monitor.DivergenceGuard`
was attached, the same directory also holds ``events.jsonl``, one
:meth:`~lr_monitor.events.GuardEvent.to_dict` object per line.

:func:`load_runs` finds every run below a directory, :func:`build_report` reduces one run
to a JSON-serialisable dict, and :func:`render_reports` prints reports as tables (with
``rich`` when it is installed, plain text otherwise).

Nothing on disk can make the readers hang, crash or read without bound: only regular
files are opened, event files are read record by record with every CRC checked
(:func:`lr_monitor.cli.tfevents.read_scalars`), ``events.jsonl`` line by line with every
field checked (:func:`lr_monitor.eventlog.read_events`). What cannot be read -- a FIFO or
a device named like an event file, an unreadable file or directory, a corrupt line or
record -- is skipped with one warning naming it (file, line, record and byte offset) on
the ``lr_monitor.cli.report``, ``lr_monitor.cli.tfevents`` or ``lr_monitor.eventlog``
logger, and the rest is read. Only what leaves nothing to report -- a missing path, no
event files, none readable -- raises :class:`ReportError`, whose one-line message names
the path. Names are printed :func:`~lr_monitor.cli.safe_text.terminal_safe`.

:class:`~lr_monitor.cli.tfevents.Series` and :func:`~lr_monitor.cli.safe_text.terminal_safe`
/ :func:`~lr_monitor.cli.safe_text.display_path` are importable from here too, for
existing callers. This module only reads files; it does not import Lightning.

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

import fnmatch
import json
import logging
import math
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from lr_monitor.cli.safe_text import display_path, terminal_safe
from lr_monitor.cli.tfevents import Series, read_scalars
from lr_monitor.eventlog import file_kind, read_events, unique_events
from lr_monitor.events import Action, GuardEvent
from lr_monitor.tags import (
    DEFAULT_PREFIX,
    EVENTS_FILENAME,
    GLOBAL,
    GUARD_EVENTS,
    GUARD_LR_SCALE,
    STATISTICS,
    TRAIN_ACC,
    USER_METRICS,
    VAL_ACC,
    find_loss_tags,
    find_val_loss_tag,
    is_loss_like,
    is_tensorboard_file,
    parse_stat_tag,
)

__all__ = [
    "ACTION_LABELS",
    "EVENTS_JSONL",
    "GUARD_ACTIONS",
    "LOSS_GIVEN_BACK_SHOWN",
    "LOSS_RATIO_SHOWN",
    "METRIC_TAGS",
    "MONITOR_STATS",
    "ReportError",
    "RunData",
    "RunSource",
    "Series",
    "build_report",
    "describe_loss",
    "display_path",
    "find_event_files",
    "find_runs",
    "format_value",
    "guard_headline",
    "load_run",
    "load_runs",
    "loss_headline",
    "no_readable_runs",
    "parse_monitor_tag",
    "render_reports",
    "reports_to_json",
    "select_runs",
    "summarise_loss",
    "terminal_safe",
]

_log = logging.getLogger("lr_monitor.cli.report")

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
        named = self.path in one_line or display_path(self.path) in one_line
        super().__init__(one_line if named else f"{display_path(self.path)}: {one_line}")


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
    """Every TensorBoard event file name below ``logdir`` (recursively), sorted.

    Names only: a name that is not a regular file (a FIFO, a device, ...) is listed too,
    and :func:`load_run` skips it with a warning. A directory that cannot be listed is
    skipped with a warning on the ``lr_monitor.cli.report`` logger; symbolic links to
    directories are not followed.

    Args:
        logdir: The directory to search.

    Returns:
        Paths of TensorBoard event files (:func:`lr_monitor.tags.is_tensorboard_file`),
        sorted by path.

    Raises:
        ReportError: If ``logdir`` itself cannot be listed.
    """
    top = os.fspath(logdir)

    def unlistable(exc: OSError) -> None:
        where = exc.filename if exc.filename is not None else top
        if os.path.normpath(os.fspath(where)) == os.path.normpath(top):
            raise ReportError(top, f"{display_path(top)}: cannot list the directory "
                                   f"({exc.strerror or exc})")
        _log.warning("%s: skipped, cannot list the directory (%s)", display_path(where),
                     exc.strerror or exc)

    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top, onerror=unlistable):
        dirnames.sort()
        found.extend(Path(dirpath, f) for f in filenames if is_tensorboard_file(f))
    return sorted(found)


@dataclass(frozen=True)
class RunSource:
    """A run found on disk, not read yet: :meth:`load` reads it.

    :func:`find_runs` lists these by name only, so that selecting and paging runs costs
    nothing per run; ``plot`` reads one page of runs at a time.

    Args:
        name: Display name: the directory relative to the log dir that was searched.
        path: The run directory.
        files: Its TensorBoard event file names, sorted.
    """

    name: str
    path: Path
    files: tuple[Path, ...]

    def load(self) -> RunData:
        """Read the run (:func:`load_run`); what cannot be read is skipped with a warning."""
        return load_run(self.path, name=self.name, files=self.files)


def find_runs(logdir: str | os.PathLike[str]) -> list[RunSource]:
    """Every run below ``logdir``, found by name without reading a file.

    A run is a directory that holds TensorBoard event files.

    Args:
        logdir: A log directory (searched recursively), a single run directory, or a
            single event file.

    Returns:
        The runs, sorted by name.

    Raises:
        ReportError: If ``logdir`` is empty, does not exist, cannot be listed, is neither
            a directory nor a regular event file, or holds no event file names.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with tempfile.TemporaryDirectory() as logdir:
        ...     for name in ("b", "a/version_0"):
        ...         with SummaryWriter(f"{logdir}/{name}") as w:
        ...             w.add_scalar("loss", 1.0, 0)
        ...     [r.name for r in find_runs(logdir)]
        ['a/version_0', 'b']
    """
    if not os.fspath(logdir):
        raise ReportError("", "logdir='' is invalid: must be a log directory, run directory "
                              "or event file")
    root = Path(logdir)
    mode = _stat_mode(root)
    if stat.S_ISREG(mode):
        if not is_tensorboard_file(root.name):
            raise ReportError(root, f"{display_path(root)}: not a TensorBoard event file or a "
                                    "directory")
        return [RunSource(root.parent.name or str(root.parent), root.parent, (root,))]
    if not stat.S_ISDIR(mode):
        raise ReportError(root, f"{display_path(root)}: not a directory or a regular file "
                                f"({file_kind(mode)})")
    files = find_event_files(root)
    if not files:
        raise ReportError(root, f"{display_path(root)}: no TensorBoard event files "
                                "(events.out.tfevents.*) found below it")
    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        by_dir.setdefault(f.parent, []).append(f)
    runs = []
    for run_dir, run_files in by_dir.items():
        rel = run_dir.relative_to(root).as_posix()
        name = rel if rel != "." else (root.resolve().name or str(root))
        runs.append(RunSource(name, run_dir, tuple(sorted(run_files))))
    return sorted(runs, key=lambda r: r.name)


def select_runs(runs: Sequence[RunSource], patterns: Sequence[str] | None,
                ) -> tuple[list[RunSource], list[str]]:
    """The runs whose name matches any of ``patterns`` (shell globs), in order.

    ``*`` matches across ``/`` (``lr1e-3*`` matches ``lr1e-3/version_0``); matching is
    case-sensitive. ``None`` or no patterns selects every run.

    Args:
        runs: From :func:`find_runs`.
        patterns: Globs, e.g. ``["healthy*", "*/version_1"]``.

    Returns:
        ``(selected runs, patterns that matched no run)``.

    Example:
        >>> runs = [RunSource(n, Path(n), ()) for n in ("a/version_0", "b/version_0")]
        >>> chosen, unmatched = select_runs(runs, ["a*", "zz*"])
        >>> [r.name for r in chosen], unmatched
        (['a/version_0'], ['zz*'])
    """
    if not patterns:
        return list(runs), []
    hits = [[fnmatch.fnmatchcase(r.name, p) for r in runs] for p in patterns]
    chosen = [r for i, r in enumerate(runs) if any(h[i] for h in hits)]
    return chosen, [p for p, h in zip(patterns, hits, strict=True) if not any(h)]


def load_runs(logdir: str | os.PathLike[str]) -> list[RunData]:
    """Load every run below ``logdir``: one per directory that holds event files.

    Nothing below ``logdir`` can make this hang, crash or read without bound (see
    :func:`~lr_monitor.cli.tfevents.read_scalars` and :func:`lr_monitor.eventlog.read_events`):
    an event file or ``events.jsonl`` that cannot be read is skipped with one warning
    naming it, a corrupt line or record with one warning naming its line or record and
    byte offset, and the rest is read. Warnings go to the ``lr_monitor.cli.report``,
    ``lr_monitor.cli.tfevents`` and ``lr_monitor.eventlog`` loggers (``lr-monitor`` prints
    them on stderr). Every run is held in memory: for many runs, read them one at a time
    from :func:`find_runs` instead (as ``lr-monitor`` does).

    Args:
        logdir: A log directory (searched recursively), a single run directory, or a
            single event file.

    Returns:
        The runs, sorted by name. A directory whose event files could all not be opened
        is not a run.

    Raises:
        ReportError: If ``logdir`` is empty, does not exist, cannot be listed, is neither
            a directory nor a regular event file, or no event file below it could be
            opened.
    """
    sources = find_runs(logdir)
    runs = [run for run in (s.load() for s in sources) if run.event_files]
    if not runs:
        raise no_readable_runs(logdir, sum(len(s.files) for s in sources))
    return runs


def no_readable_runs(logdir: str | os.PathLike[str], skipped: int) -> ReportError:
    """The error when no event file of the runs found could be opened."""
    return ReportError(logdir, f"{display_path(logdir)}: no readable TensorBoard event files "
                               f"({skipped} skipped, see the warnings above)")


def _stat_mode(path: Path) -> int:
    """``os.stat(path).st_mode``, or :class:`ReportError` with one line saying why not."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        raise ReportError(path, f"{display_path(path)}: no such file or directory") from None
    except OSError as exc:  # name too long, permission denied, a symbolic-link loop, ...
        raise ReportError(path, f"{display_path(path)}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte in the path
        raise ReportError(path, f"{display_path(path)}: not a valid path (it holds a NUL "
                                "byte)") from None


def load_run(
    run_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    files: Sequence[str | os.PathLike[str]] | None = None,
) -> RunData:
    """Load one run: its scalars and, if present, its ``events.jsonl``.

    Event files are read with :func:`~lr_monitor.cli.tfevents.read_scalars` (as one run, in
    name order); ``events.jsonl`` and its rotated files with
    :func:`lr_monitor.eventlog.read_events` (``errors="warn"``), each decision once
    (:func:`lr_monitor.eventlog.unique_events`: a log a resumed run could not rewind holds
    the steps after its checkpoint twice). Whatever they hold, this returns: what could not
    be read is skipped with a warning naming it.

    Args:
        run_dir: The run directory.
        name: Display name (default: the directory's name).
        files: The event files to read (default: every TensorBoard event file name
            directly in ``run_dir``). When given, only these are read.

    Returns:
        The run; ``event_files`` holds the event files that could be opened (empty when
        none could).
    """
    path = Path(run_dir)
    if files is None:
        try:
            names = sorted(n for n in os.listdir(path) if is_tensorboard_file(n))
        except OSError as exc:
            _log.warning("%s: skipped, cannot list the directory (%s)", display_path(path),
                         exc.strerror or exc)
            names = []
        event_files = [path / n for n in names]
    else:
        event_files = sorted(Path(f) for f in files)
    opened: list[Path] = []
    scalars = read_scalars(event_files, opened=opened)

    jsonl = path / EVENTS_JSONL
    events: list[GuardEvent] = []
    events_path = jsonl if os.path.lexists(jsonl) else None
    if events_path is not None:
        try:
            read = read_events(jsonl, include_rotated=True, errors="warn")
            events = unique_events(read)
            if len(events) < len(read):
                _log.warning("%s: %d event(s) recorded twice (by a run resumed from a "
                             "checkpoint); each is counted once", display_path(jsonl),
                             len(read) - len(events))
        except OSError as exc:
            _log.warning("%s: skipped (%s)", display_path(jsonl), exc.strerror or exc)
    return RunData(
        name=name if name is not None else path.name,
        path=path,
        event_files=tuple(opened),
        scalars=scalars,
        events=events,
        events_path=events_path,
    )


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


#: A loss that ended at least this many times its best is said to have (``ended N× its
#: best``) when it also gave back at least :data:`LOSS_GIVEN_BACK_SHOWN` of the way from
#: its start down to its best; a peak at least this many times the start is named
#: (``peak … N× its start``). They decide what the sentence mentions, never what is
#: computed (``--json`` has every number).
LOSS_RATIO_SHOWN = 2.0
#: See :data:`LOSS_RATIO_SHOWN`: a loss that went from 2.3 to 0.0002 and ended at 0.001
#: is 6× its best but has kept all but 0.04 % of its progress; that is not said.
LOSS_GIVEN_BACK_SHOWN = 0.1


def summarise_loss(series: Series) -> dict[str, Any]:
    """What a loss series shows: start, best, peak and last, with their steps.

    Args:
        series: The loss, in logging order.

    Returns:
        ``first``/``first_step`` (the first point), ``best``/``best_step`` (the smallest
        finite value, its first step), ``max``/``max_step`` (the largest finite value),
        ``last``/``last_step`` (the last point, possibly non-finite), ``points``,
        ``nonfinite`` (how many points are NaN or infinite) and ``first_nonfinite_step``,
        ``last_over_best`` and ``max_over_first`` (``None`` when not both finite and the
        divisor positive), ``gave_back`` (``(last - best) / (first - best)``: the share of
        the way down from the start that was lost by the end; ``None`` unless all three
        are finite and the best is below the start).

    Raises:
        IndexError: If the series is empty.

    Example:
        >>> s = Series(np.arange(5), np.array([2.0, 0.5, 0.25, 8.0, np.nan]))
        >>> d = summarise_loss(s)
        >>> d["best"], d["best_step"], d["max"], d["max_step"], d["nonfinite"]
        (0.25, 2, 8.0, 3, 1)
        >>> d["max_over_first"], d["last_over_best"], d["first_nonfinite_step"], d["gave_back"]
        (4.0, None, 4, None)
    """
    last_step, last = series.last()
    finite = np.isfinite(series.values)
    good = series.values[finite]
    best_i = int(np.argmin(good)) if len(good) else None
    max_i = int(np.argmax(good)) if len(good) else None
    good_steps = series.steps[finite]
    first = float(series.values[0])
    bad = np.flatnonzero(~finite)
    best = float(good[best_i]) if best_i is not None else None
    peak = float(good[max_i]) if max_i is not None else None

    def ratio(a: float | None, b: float | None) -> float | None:
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
            return None
        return a / b

    return {
        "first": first,
        "first_step": int(series.steps[0]),
        "best": best,
        "best_step": int(good_steps[best_i]) if best_i is not None else None,
        "max": peak,
        "max_step": int(good_steps[max_i]) if max_i is not None else None,
        "last": last,
        "last_step": last_step,
        "points": len(series),
        "nonfinite": len(bad),
        "first_nonfinite_step": int(series.steps[bad[0]]) if len(bad) else None,
        "last_over_best": ratio(last, best),
        "gave_back": (None if best is None or not (math.isfinite(first) and math.isfinite(last))
                      or first <= best else (last - best) / (first - best)),
        "max_over_first": ratio(peak, first),
    }


def _times(x: float) -> str:
    """A ratio as ``19.6×``, ``4,096×``, ``2.1e+07×``.

    Example:
        >>> _times(19.64), _times(4096.0), _times(2.1e7)
        ('19.6×', '4,096×', '2.1e+07×')
    """
    if x < 1000:
        return f"{x:.3g}×"
    return f"{x:,.0f}×" if x < 1e6 else f"{x:.2g}×"


def _ended_above_best(summary: Mapping[str, Any]) -> float | None:
    """``last_over_best`` when it is worth saying (:data:`LOSS_RATIO_SHOWN`), else ``None``."""
    over_best = summary.get("last_over_best")
    gave_back = summary.get("gave_back")
    if over_best is None or over_best < LOSS_RATIO_SHOWN:
        return None
    if gave_back is not None and gave_back < LOSS_GIVEN_BACK_SHOWN:
        return None
    return float(over_best)


def describe_loss(summary: Mapping[str, Any]) -> str:
    r"""A loss summary (:func:`summarise_loss`) as one sentence for the report.

    Example:
        >>> s = Series(np.arange(4) * 10, np.array([2.3, 0.4, 30.0, 45.0]))
        >>> print(describe_loss(summarise_loss(s)).replace("; ", ";\n"))
        2.3 at step 0 → best 0.4 at step 10 → last 45 at step 30: ended 112× its best;
        peak 45 at step 30, 19.6× its start
    """
    text = (f"{format_value(summary['first'])} at step {summary['first_step']}"
            f" → best {format_value(summary['best'])} at step {summary['best_step']}"
            f" → last {format_value(summary['last'])} at step {summary['last_step']}")
    notes = []
    over_best = _ended_above_best(summary)
    if over_best is not None:
        notes.append(f"ended {_times(over_best)} its best")
    over_first = summary.get("max_over_first")
    if over_first is not None and over_first >= LOSS_RATIO_SHOWN:
        notes.append(f"peak {format_value(summary['max'])} at step {summary['max_step']}, "
                     f"{_times(over_first)} its start")
    if summary.get("nonfinite"):
        n = summary["nonfinite"]
        notes.append(f"non-finite at {n} step{'s' if n != 1 else ''} (first at step "
                     f"{summary['first_nonfinite_step']})")
    return text + (": " + "; ".join(notes) if notes else "")


def loss_headline(tag: str, summary: Mapping[str, Any]) -> str:
    """A loss summary in a few words, for a plot title.

    Example:
        >>> s = Series(np.arange(4) * 10, np.array([2.3, 0.4, 30.0, 45.0]))
        >>> loss_headline("train_loss", summarise_loss(s))
        'train_loss 2.3 → 45, best 0.4 at 10: ended 112× best, peak 19.6× start at 30'
    """
    text = (f"{tag} {format_value(summary['first'], 3)} → {format_value(summary['last'], 3)}"
            f", best {format_value(summary['best'], 3)} at {summary['best_step']}")
    notes = []
    over_best = _ended_above_best(summary)
    if over_best is not None:
        notes.append(f"ended {_times(over_best)} best")
    over_first = summary.get("max_over_first")
    if over_first is not None and over_first >= LOSS_RATIO_SHOWN:
        notes.append(f"peak {_times(over_first)} start at {summary['max_step']}")
    if summary.get("nonfinite"):
        notes.append(f"non-finite from {summary['first_nonfinite_step']}")
    return text + (": " + ", ".join(notes) if notes else "")


def guard_headline(guard: Mapping[str, Any]) -> str:
    """What the guard did, in a few words (``guard`` of :func:`build_report`).

    Example:
        >>> guard_headline({"output": False, "events": 0})
        'no guard output'
        >>> guard_headline({"output": True, "events": 3, "actions": {"cut_lr": [4, 9],
        ...                 "stop": []}, "recorded_only": [7]})
        '3 guard events: cut_lr ×2, recorded ×1'
    """
    if not guard.get("output"):
        return "no guard output"
    n = guard["events"]
    if not n:
        return "0 guard events"
    counts = [f"{a} ×{len(steps)}" for a, steps in guard["actions"].items()
              if steps and a != Action.LOG]
    if guard.get("recorded_only"):
        counts.append(f"recorded ×{len(guard['recorded_only'])}")
    return f"{n} guard event{'s' if n != 1 else ''}" + (": " + ", ".join(counts) if counts
                                                        else "")


def _loss_section(run: RunData, prefix: str, loss_tags: Sequence[str] | None,
                  ) -> dict[str, Any]:
    """``loss`` of :func:`build_report`."""
    tags = list(run.scalars)
    if loss_tags:
        wanted, source = list(dict.fromkeys(loss_tags)), "--loss-tag"
    else:
        wanted, source = find_loss_tags(tags, prefix), "found"
    train = {t: summarise_loss(run.scalars[t]) for t in wanted
             if t in run.scalars and len(run.scalars[t])}
    val_tag = find_val_loss_tag(tags, prefix)
    val = run.scalars.get(val_tag) if val_tag is not None else None
    section: dict[str, Any] = {
        "source": source if train else None,
        "train": train,
        "missing": [t for t in wanted if t not in train] if loss_tags else [],
        "val": ({val_tag: summarise_loss(val)} if val_tag is not None and val is not None
                and len(val) else {}),
    }
    if not train:  # what there is instead, for the message
        section["loss_like_tags"] = sorted(t for t in tags if is_loss_like(t, prefix))[:10]
    return section


def build_report(run: RunData, *, prefix: str = DEFAULT_PREFIX,
                 loss_tags: Sequence[str] | None = None) -> dict[str, Any]:
    """Reduce a run to a JSON-serialisable dict.

    Keys: ``run``, ``path``, ``event_files``, ``events_file``, ``last_step`` (the
    largest step logged, or ``None``), ``steps`` (``last_step + 1``: Lightning logs the
    i-th optimizer step, counting from 0, at step i, so this is the number of optimizer
    steps), ``metrics`` (last/step/min/max/points of each of
    :data:`METRIC_TAGS` present), ``loss`` (``train``: :func:`summarise_loss` of each
    training-loss tag, ``loss_tags`` or else the ones
    :func:`lr_monitor.tags.find_loss_tags` finds; ``val``: the same for the validation
    loss :func:`lr_monitor.tags.find_val_loss_tag` finds; ``source``: ``"--loss-tag"``,
    ``"found"`` or ``None``; ``missing``: the ``loss_tags`` not in this run;
    ``loss_like_tags``: when no training loss was found, the tags that look like one),
    ``guard`` (``output``: whether the guard left anything -- ``events.jsonl`` or its
    ``guard/*`` tags; event count, steps of each action in
    :data:`GUARD_ACTIONS` plus any other action seen, e.g. ``log`` in files of older
    versions, the steps of the record-only events (``recorded_only``: no action, or only
    ``log``), counts per detection kind, final LR scale), ``events`` (the guard's events
    as dicts), ``step_size`` (per optimizer: median of ``eff_lr/p50`` global, max of
    ``update_ratio`` global, its step and the median, number of steps with non-finite
    values, per group the ``lr``'s first, last, smallest and largest values with their
    steps) and ``alerts`` (number of guard events). Floats may be ``nan``/``inf``;
    :func:`reports_to_json` encodes them.

    Args:
        run: The run.
        prefix: The monitor's tag prefix.
        loss_tags: The training-loss tags to summarise (``--loss-tag``); ``None`` finds
            them (:func:`lr_monitor.tags.find_loss_tags`).

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
        "output": bool(run.events_path is not None or run.events or logged is not None
                       or lr_scale is not None),
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
                "update_ratio_median": None,
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
            entry(opt)["update_ratio_median"] = float(np.median(finite.values))
    for opt, series in run.global_tags("nonfinite", prefix).items():
        values = np.nan_to_num(series.values, nan=1.0)
        entry(opt)["nonfinite_steps"] = int(np.count_nonzero(values))
    for (opt, group), series in run.monitor_tags("lr", prefix, groups=True).items():
        if len(series):
            finite = series.finite()
            lo = int(np.argmin(finite.values)) if len(finite) else None
            hi = int(np.argmax(finite.values)) if len(finite) else None
            entry(opt)["lr"][group] = {
                "first": float(series.values[0]),
                "first_step": int(series.steps[0]),
                "last": series.last()[1],
                "step": series.last()[0],
                "min": float(finite.values[lo]) if lo is not None else None,
                "min_step": int(finite.steps[lo]) if lo is not None else None,
                "max": float(finite.values[hi]) if hi is not None else None,
                "max_step": int(finite.steps[hi]) if hi is not None else None,
            }

    return {
        "run": run.name,
        "path": str(run.path),
        "event_files": [str(p) for p in run.event_files],
        "events_file": str(run.events_path) if run.events_path else None,
        "steps": max(last_steps) + 1 if last_steps else None,
        "last_step": max(last_steps) if last_steps else None,
        "metrics": metrics,
        "loss": _loss_section(run, prefix, loss_tags),
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


def _lr_text(lr: Mapping[str, Any]) -> str:
    """``first → last`` of one group's lr, with its peak and minimum when outside them."""
    first, last = lr["first"], lr["last"]
    text = format_value(last) if first == last else (
        f"{format_value(first)} → {format_value(last)}")
    extra = []
    ends = [x for x in (first, last) if math.isfinite(x)]
    if lr.get("max") is not None and ends and lr["max"] > max(ends):
        extra.append(f"peak {format_value(lr['max'])} at step {lr['max_step']}")
    if lr.get("min") is not None and ends and lr["min"] < min(ends):
        extra.append(f"min {format_value(lr['min'])} at step {lr['min_step']}")
    extra.append(f"last at step {lr['step']}")
    return f"{text} ({', '.join(extra)})"


def _loss_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The rows of what the recorded losses show."""
    loss = report.get("loss")
    if loss is None:  # a report of an earlier version
        return []
    rows = [(f"loss ({tag})", describe_loss(s)) for tag, s in loss["train"].items()]
    for tag in loss["missing"]:
        rows.append((f"loss ({tag})", "not in this run"))
    if not loss["train"]:
        others = loss.get("loss_like_tags") or []
        hint = (f"tags like a loss: {', '.join(others)}" if others
                else "no tag named like a loss")
        if not loss["missing"]:
            rows.append(("loss", f"no training loss tag found ({hint}; --loss-tag TAG "
                                 "names it)"))
        else:
            rows.append(("loss", hint))
    for tag, s in loss["val"].items():
        rows.append((f"val loss ({tag})", f"last {format_value(s['last'])} at step "
                                        f"{s['last_step']} (best {format_value(s['best'])} at "
                                        f"step {s['best_step']})"))
    return rows


def _rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The key/value rows of one run's table: what the signals show, then the guard."""
    rows: list[tuple[str, str]] = [("path", str(report["path"]))]
    rows.append(("steps", "-" if report["steps"] is None
                 else f"{report['steps']} (last logged step {report['last_step']})"))
    rows.extend(_loss_rows(report))
    shown = set(report.get("loss", {}).get("train", {})) | set(report.get("loss", {})
                                                                .get("val", {}))
    for tag in METRIC_TAGS:  # "train/acc" -> "final train acc"
        m = report["metrics"].get(tag)
        if m is not None and tag not in shown and (tag in (TRAIN_ACC, VAL_ACC)
                                                   or "loss" not in report):
            rows.append((f"final {tag.replace('/', ' ')}",
                         f"{format_value(m['last'])} at step {m['step']}"))
    for opt, s in report["step_size"].items():
        ratio = format_value(s["update_ratio_max"])
        if s["update_ratio_max_step"] is not None:
            ratio += f" at step {s['update_ratio_max_step']}"
        median = s.get("update_ratio_median")
        if median and s["update_ratio_max"] is not None:
            ratio += (f" ({_times(s['update_ratio_max'] / median)} its median "
                      f"{format_value(median)})")
        rows.append((f"{opt} update ratio (max)", ratio))
        if s["nonfinite_steps"]:
            rows.append((f"{opt} non-finite steps", str(s["nonfinite_steps"])))
    guard = report["guard"]
    if not guard.get("output", True):
        rows.append(("guard", "no DivergenceGuard output (no events.jsonl, no guard/* tags)"))
    else:
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
    if not report["step_size"]:
        rows.append(("step sizes", "no StepSizeMonitor tags"))
    for opt, s in report["step_size"].items():
        rows.append((f"{opt} eff. lr p50 (median)", format_value(s["eff_lr_p50_median"])))
        for group, lr in s["lr"].items():
            rows.append((f"{opt}/{group} lr", _lr_text(lr)))
    return rows


def _event_summary(event: Mapping[str, Any]) -> str:
    """:meth:`GuardEvent.summary` of a report's event, or its step, kind and signal.

    An event built in code may hold what no event file can (``lr_scale=nan``, ``step=-5``):
    :meth:`GuardEvent.from_dict` refuses it, and the table still gets its line.
    """
    try:
        return GuardEvent.from_dict(dict(event)).summary()
    except (KeyError, TypeError, ValueError):
        return f"step {event.get('step')}: {event.get('kind')} on {event.get('signal')}"


def _event_lines(report: Mapping[str, Any], limit: int = 10) -> list[str]:
    lines = [terminal_safe(_event_summary(d)) for d in report["events"][:limit]]
    if len(report["events"]) > limit:
        lines.append(f"… and {len(report['events']) - limit} more (lr-monitor report --json "
                     "lists all)")
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
        from rich.text import Text
    except ImportError:  # rich is optional: plain text
        for report in reports:
            rows = _safe_rows(report)
            width = max(len(k) for k, _ in rows)
            print(f"run {terminal_safe(str(report['run']))}", file=out)
            for key, value in rows:
                print(f"  {key:<{width}}  {value}", file=out)
            for line in _event_lines(report):
                print(f"  - {line}", file=out)
            print(file=out)
        return

    # Text objects, never markup: a run named "[/]" is a name, not a closing tag.
    console = Console(file=out, highlight=False, soft_wrap=False)
    for report in reports:
        title = Text(f"run {terminal_safe(str(report['run']))}")
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column("", style="bold", no_wrap=True)
        table.add_column("", overflow="fold")
        for key, value in _safe_rows(report):
            table.add_row(Text(key), Text(value))
        console.print(table)
        for line in _event_lines(report):
            console.print(Text(f"  • {line}"), soft_wrap=True)
        console.print()


def _safe_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """:func:`_rows` with every cell terminal-safe (names come from files)."""
    return [(terminal_safe(k), terminal_safe(v)) for k, v in _rows(report)]
