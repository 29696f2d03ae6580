"""Plot lr-monitor runs to PNG (``lr-monitor plot``).

One figure shows one run per column and five rows, sharing the step axis within a
column and the y axis within a row, so runs compare at a glance:

1. **loss** -- the training loss (``--loss-tag``, else the tags
   :func:`lr_monitor.tags.find_loss_tags` finds: ``train/loss``, ``train_loss``,
   ``loss``, ..., a GAN's ``d_loss`` and ``g_loss``) and the validation loss as dots,
   log scale when every value is positive (linear otherwise), non-finite values marked
   ``x`` at the top, every guard event marked by a vertical line coloured and labelled
   by the action taken;
2. **learning rate** -- ``lr`` of each optimizer/param group (log scale) and the guard's
   cumulative ``guard/lr_scale`` on a second axis (the lr axis divided by the largest
   LR); an event that changed the LR changes both lines at the event's own step, not at
   the next recorded one;
3. **effective learning rate** -- the ``eff_lr`` p05-p95 band shaded with the p50 line,
   per optimizer (``global``), log scale;
4. **update ratio** -- ``|update| / |param|`` per optimizer (``global``), log scale;
5. **gradient norm** -- per optimizer (``global``), log scale.

A column's title says what the signals show before what the guard did: the loss from
start to best to last (``ended 112× best`` when it did), then the guard's events or
"no guard output".

**Scale.** A figure holds at most ``per_page`` runs (:data:`DEFAULT_PER_PAGE`); more runs
go to numbered pages (``run-p01.png``, ``run-p02.png``, ...), at most ``max_files`` files
(:data:`DEFAULT_MAX_FILES`), the rest left out with a warning that counts them. Runs given
as :class:`~lr_monitor.cli.report.RunSource` are read one page at a time, so memory holds
one page. Every line is cut to at most ``max_points`` points (:func:`decimate`: the
smallest and largest value of each of ``max_points / 2`` stretches, so a one-step spike
is still drawn); guard events are drawn as one collection per action, however many.

Non-finite points are left out of the lines (and counted in the title and the report).
matplotlib is imported lazily and drawn through its object-oriented Agg canvas, so the
process-wide pyplot backend is never touched. Names from the files (runs, tags, actions)
are drawn as plain text: control characters escaped
(:func:`~lr_monitor.cli.safe_text.terminal_safe`), ``$`` never starting mathtext, very long
run names shortened in the middle. This module only reads
:class:`~lr_monitor.cli.report.RunData`; it does not import Lightning.

Example:
    >>> import tempfile, os
    >>> from lr_monitor.cli.report import RunData, Series
    >>> s = Series(np.arange(3), np.array([2.3, 1.9, 1.2]))
    >>> run = RunData("demo", Path("demo"), (), scalars={"train/loss": s})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     out = plot_runs([run], os.path.join(d, "run.png"))
    ...     [p.name for p in out], out[0].stat().st_size > 10_000
    (['run.png'], True)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lr_monitor._validation import check_int
from lr_monitor.cli.report import (
    RunData,
    RunSource,
    build_report,
    guard_headline,
    loss_headline,
)
from lr_monitor.cli.safe_text import terminal_safe
from lr_monitor.cli.tfevents import Series
from lr_monitor.events import Action, GuardEvent
from lr_monitor.tags import (
    DEFAULT_PREFIX,
    GLOBAL,
    GUARD_LR_SCALE,
    lr_key,
    stat_tag,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "ACTION_COLORS",
    "DEFAULT_MAX_FILES",
    "DEFAULT_MAX_POINTS",
    "DEFAULT_PER_PAGE",
    "RECORDED",
    "decimate",
    "make_figure",
    "page_path",
    "per_run_path",
    "plot_runs",
]

_log = logging.getLogger("lr_monitor.cli.plot")

#: Runs (columns) per figure; more go to numbered pages.
DEFAULT_PER_PAGE = 6
#: PNG files written at most (pages, or runs with ``per_run``); the runs beyond are left
#: out with a warning.
DEFAULT_MAX_FILES = 20
#: Points drawn at most per line (:func:`decimate`).
DEFAULT_MAX_POINTS = 2000

#: Colour of the event marker for the strongest action of an event; an event that took
#: no action (recorded only; ``log`` in files of older versions) is drawn in
#: ``ACTION_COLORS[Action.LOG]``, dotted.
ACTION_COLORS: dict[Action, str] = {
    Action.STOP: "#d62728",
    Action.ROLLBACK: "#9467bd",
    Action.CUT: "#ff7f0e",
    Action.SKIP: "#7f7f7f",
    Action.LOG: "#bcbd22",
}
#: The label of an event that took no action.
RECORDED = "recorded"
# Strongest first: the actions that change something, by severity.
_ACTION_ORDER = tuple(sorted((a for a in ACTION_COLORS if a is not Action.LOG),
                             key=Action.severity, reverse=True))
_MAX_LABELLED_EVENTS = 12
_MIN_LABEL_GAP = 0.03  # event labels closer than this fraction of the step range overlap
_ROWS = ("loss", "learning rate", "effective lr (eff_lr)", "update ratio", "grad norm")
_MAX_TITLE = 60  # characters of a run name in a column title
_MAX_FILE_STEM = 100  # characters of a run name in a --per-run file name
_COLUMN_INCHES = 5.4
_HEIGHT_INCHES = 13.0
# A fixed layout, in inches (matplotlib's constrained layout measured every tick label of
# every axis, about 40 % of the time of a page): room for the y label and ticks on the
# left, the guard scale's axis on the right of each column, three title lines on top.
_LEFT, _RIGHT, _TOP, _BOTTOM, _COLUMN_GAP, _ROW_GAP = 0.95, 0.75, 0.72, 0.55, 0.9, 0.22


def _label(text: str, limit: int | None = None) -> str:
    r"""A name from the files as figure text: terminal-safe, shortened past ``limit``.

    Every ``$`` is escaped, so a name never starts mathtext (matplotlib draws ``\$`` as
    ``$``), while the axes keep their mathtext tick labels (``10^{-3}``).

    Example:
        >>> _label("$\\frac{a}$ run\x1b")
        '\\$\\frac{a}\\$ run\\x1b'
    """
    text = terminal_safe(text)
    if limit is not None and len(text) > limit:
        half = (limit - 1) // 2
        text = f"{text[:half]}…{text[-half:]}"
    return text.replace("$", r"\$")


def per_run_path(output: str | os.PathLike[str], run_name: str) -> Path:
    """The file of one run when plotting one PNG per run: ``<stem>-<run>.png``.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` in the run name
    become ``_``; a name longer than 100 characters keeps its first 80 and a short hash
    of the whole name, so every file name stays valid.

    Args:
        output: The ``-o`` path, e.g. ``run.png``.
        run_name: The run's name, e.g. ``too-high-lr1/version_0``.

    Returns:
        The path.

    Example:
        >>> per_run_path("plots/run.png", "too-high-lr1/version_0").as_posix()
        'plots/run-too-high-lr1_version_0.png'
        >>> len(per_run_path("run.png", "z" * 300).name)
        101
    """
    out = Path(output)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_name).strip("_") or "run"
    if len(safe) > _MAX_FILE_STEM:
        digest = hashlib.sha1(run_name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        safe = f"{safe[:_MAX_FILE_STEM - 20]}-{digest}"
    return out.with_name(f"{out.stem}-{safe}{out.suffix or '.png'}")


def page_path(output: str | os.PathLike[str], page: int, pages: int) -> Path:
    """The file of page ``page`` (from 1) of ``pages``.

    ``output`` itself for one page, else ``<stem>-p<page>.png`` with as many digits as
    ``pages`` needs (at least 2).

    Args:
        output: The ``-o`` path.
        page: The page number, from 1.
        pages: The number of pages.

    Returns:
        The path.

    Example:
        >>> page_path("run.png", 1, 1).name, page_path("out/run.png", 3, 17).as_posix()
        ('run.png', 'out/run-p03.png')
        >>> page_path("run.png", 7, 500).name
        'run-p007.png'
    """
    out = Path(output)
    if pages <= 1:
        return out
    width = max(2, len(str(pages)))
    return out.with_name(f"{out.stem}-p{page:0{width}d}{out.suffix or '.png'}")


def decimate(steps: np.ndarray, values: np.ndarray,
             max_points: int = DEFAULT_MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` of the points, keeping each stretch's lowest and highest.

    The points are cut, in order, into ``max_points // 2 - 1`` stretches of equal length;
    of each, the smallest and the largest value are kept (in their order), and the first
    and last point of all. A line through them has the same envelope as the full line at
    the resolution of a plot: a one-step spike stays. ``values`` should be finite (NaN
    compares with nothing).

    Args:
        steps: The x values.
        values: The y values, as many.
        max_points: The most points returned (at least 4).

    Returns:
        ``(steps, values)``, unchanged when there are at most ``max_points``.

    Raises:
        ValueError: If ``max_points`` < 4 or the arrays differ in length.

    Example:
        >>> y = np.ones(10_000); y[6_789] = 1e6
        >>> s, v = decimate(np.arange(10_000), y, 100)
        >>> len(s) <= 100, float(v.max()), int(s[v.argmax()])
        (True, 1000000.0, 6789)
    """
    check_int("max_points", max_points, 4)
    if len(steps) != len(values):
        raise ValueError("steps and values differ in length")
    n = len(values)
    if n <= max_points:
        return steps, values
    buckets = max_points // 2 - 1
    size = -(-n // buckets)
    buckets = -(-n // size)  # no bucket of padding only
    pad = buckets * size - n
    low = np.concatenate([values, np.full(pad, np.inf)]).reshape(buckets, size)
    high = np.concatenate([values, np.full(pad, -np.inf)]).reshape(buckets, size)
    base = np.arange(buckets) * size
    keep = np.unique(np.concatenate([base + low.argmin(axis=1), base + high.argmax(axis=1),
                                     [0, n - 1]]))
    return steps[keep], values[keep]


def _envelope(steps: np.ndarray, low: np.ndarray, high: np.ndarray,
              max_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A band cut to at most ``max_points`` stretches, each its min of ``low`` and max of ``high``.

    Each stretch is drawn from its first step.
    """
    n = len(steps)
    if n <= max_points:
        return steps, low, high
    size = -(-n // max_points)
    starts = np.arange(0, n, size)
    return steps[starts], np.minimum.reduceat(low, starts), np.maximum.reduceat(high, starts)


def plot_runs(
    runs: Sequence[RunData | RunSource],
    output: str | os.PathLike[str],
    *,
    per_run: bool = False,
    prefix: str = DEFAULT_PREFIX,
    dpi: int = 110,
    per_page: int = DEFAULT_PER_PAGE,
    max_files: int | None = DEFAULT_MAX_FILES,
    max_points: int = DEFAULT_MAX_POINTS,
    loss_tags: Sequence[str] | None = None,
) -> list[Path]:
    """Draw runs and save PNGs, at most ``per_page`` runs per figure.

    Runs given as :class:`~lr_monitor.cli.report.RunSource` are read one page at a time
    (a run none of whose event files could be opened is left out); only one page of
    runs is in memory at once. When the runs need more than ``max_files`` files, the
    first ``max_files`` are written and the runs left out are counted in a warning on the
    ``lr_monitor.cli.plot`` logger.

    Args:
        runs: The runs, in the order to draw them (from
            :func:`lr_monitor.cli.report.find_runs` or
            :func:`lr_monitor.cli.report.load_runs`).
        output: The PNG to write; with several pages, :func:`page_path` of it. With
            ``per_run`` it is the name pattern instead: each run goes to
            :func:`per_run_path` ``(output, run.name)``.
        per_run: One PNG per run instead of pages with a column per run.
        prefix: The monitor's tag prefix.
        dpi: Resolution.
        per_page: Runs per figure (without ``per_run``).
        max_files: Files written at most; ``None`` for no limit.
        max_points: Points per line at most (:func:`decimate`).
        loss_tags: The training-loss tags to draw (``None``: the ones
            :func:`lr_monitor.tags.find_loss_tags` finds in each run).

    Returns:
        The files written (empty when no run could be read).

    Raises:
        ValueError: If ``runs`` is empty, or ``per_page``, ``max_files`` or
            ``max_points`` is out of range.
        ImportError: If matplotlib is not installed.
        OSError: If a file cannot be written.
    """
    if not runs:
        raise ValueError("no runs to plot")
    check_int("per_page", per_page, 1)
    check_int("max_files", max_files, 1, allow_none=True)
    check_int("max_points", max_points, 4)
    size = 1 if per_run else per_page
    pages = -(-len(runs) // size)
    drawn = pages if max_files is None else min(pages, max_files)
    if drawn < pages:
        left = len(runs) - drawn * size
        _log.warning(
            "drew %d of %d runs (%d %s of %d run%s, the limit --max-files=%d); %d runs left "
            "out, from %s on: choose runs with --runs GLOB or raise --max-files",
            drawn * size, len(runs), drawn, "files" if drawn != 1 else "file", size,
            "s" if size != 1 else "", drawn, left, terminal_safe(runs[drawn * size].name))
    written: list[Path] = []
    for page in range(drawn):
        loaded = list(_loaded(runs[page * size:(page + 1) * size]))
        if not loaded:
            continue
        if per_run:
            path = per_run_path(output, loaded[0].name)
            if path in written:  # two names that differ only in replaced characters
                digest = hashlib.sha1(loaded[0].name.encode("utf-8", "surrogateescape"))
                path = path.with_name(f"{path.stem}-{digest.hexdigest()[:12]}{path.suffix}")
        else:
            path = page_path(output, page + 1, pages)
        written.append(_save(loaded, path, dpi, prefix=prefix, max_points=max_points,
                             loss_tags=loss_tags))
    return written


def _loaded(runs: Sequence[RunData | RunSource]) -> Iterator[RunData]:
    """The runs, read when given as sources.

    A source none of whose event files could be opened is left out (each file was warned
    about).
    """
    for run in runs:
        if isinstance(run, RunSource):
            data = run.load()
            if data.event_files:
                yield data
        else:
            yield run


def _save(runs: list[RunData], path: Path, dpi: int, *, prefix: str, max_points: int,
          loss_tags: Sequence[str] | None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    with _text_as_typed():
        fig = make_figure(runs, prefix=prefix, max_points=max_points, loss_tags=loss_tags)
        FigureCanvasAgg(fig)
        fig.savefig(path, dpi=dpi, format="png")
        fig.clear()
    return path


@contextmanager
def _text_as_typed() -> Iterator[None]:
    """Names are text, never LaTeX (and never mathtext: :func:`_label` escapes ``$``)."""
    import matplotlib

    with matplotlib.rc_context({"text.usetex": False}), warnings.catch_warnings():
        # a name in a script the font lacks is drawn as boxes; say nothing about it
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from",
                                category=UserWarning)
        yield


def make_figure(runs: Sequence[RunData], *, prefix: str = DEFAULT_PREFIX,
                max_points: int = DEFAULT_MAX_POINTS,
                loss_tags: Sequence[str] | None = None) -> Figure:
    """The figure of some runs, one column each (what :func:`plot_runs` saves per page).

    Args:
        runs: The runs.
        prefix: The monitor's tag prefix.
        max_points: Points per line at most (:func:`decimate`).
        loss_tags: The training-loss tags (``None``: found in each run).

    Returns:
        A matplotlib ``Figure`` without a canvas (attach ``FigureCanvasAgg`` to draw it).

    Example:
        >>> from lr_monitor.cli.report import Series
        >>> s = Series(np.arange(50_000), np.linspace(3, 1, 50_000))
        >>> fig = make_figure([RunData("r", Path("r"), (), scalars={"loss": s})],
        ...                   max_points=500)
        >>> sizes = [len(line.get_xdata()) for ax in fig.axes for line in ax.get_lines()]
        >>> sizes, max(sizes) <= 500
        ([498], True)
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator

    ncols = len(runs)
    width = 1.2 + _COLUMN_INCHES * ncols
    fig = Figure(figsize=(width, _HEIGHT_INCHES))
    axis_w = (width - _LEFT - _RIGHT - (ncols - 1) * _COLUMN_GAP) / ncols
    axis_h = (_HEIGHT_INCHES - _TOP - _BOTTOM - (len(_ROWS) - 1) * _ROW_GAP) / len(_ROWS)
    grid = {"left": _LEFT / width, "right": 1 - _RIGHT / width,
            "bottom": _BOTTOM / _HEIGHT_INCHES, "top": 1 - _TOP / _HEIGHT_INCHES,
            "wspace": _COLUMN_GAP / axis_w, "hspace": _ROW_GAP / axis_h}
    axes = fig.subplots(len(_ROWS), ncols, sharex="col", sharey="row", squeeze=False,
                        gridspec_kw=grid)
    twins = []
    for col, run in enumerate(runs):
        column = [axes[row][col] for row in range(len(_ROWS))]
        twin = _plot_run(run, column, prefix=prefix, max_points=max_points,
                         loss_tags=loss_tags)
        if twin is not None:
            twins.append((column[1], *twin))
    # The guard's lr scale shares the lr axis, divided by the largest lr: when every LR
    # change came from the guard, the two lines coincide. Done last, once the shared
    # lr axis has its final limits.
    for ax_lr, twin_ax, lr_peak in twins:
        low, high = ax_lr.get_ylim()
        twin_ax.set_ylim(low / lr_peak, high / lr_peak)
    # Minor ticks at 2 and 5 of each decade, not 2 to 9: a third of the tick objects,
    # which were most of the time of a page (subs=(2, 5): 3.7-6.8 s a 6-run page, against
    # 6.5-10.3 s with matplotlib's default, on the loaded 2-core machine).
    for ax in fig.axes:
        if ax.get_yscale() == "log":
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    for row, label in enumerate(_ROWS):
        axes[row][0].set_ylabel(label)
    for col in range(ncols):
        axes[-1][col].set_xlabel("step")
    return fig


def _positive(series: Series) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(series.values) & (series.values > 0)
    return series.steps[keep], series.values[keep]


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, _label(f"no {what}"), transform=ax.transAxes, ha="center", va="center",
            color="0.5", fontsize=9)


def _event_color(actions: Sequence[str]) -> tuple[str, str]:
    """The label and colour of an event: its strongest action, or :data:`RECORDED`."""
    for action in _ACTION_ORDER:
        if action in actions:
            return action.value, ACTION_COLORS[action]
    return RECORDED, ACTION_COLORS[Action.LOG]


def _event_label(actions: Sequence[str]) -> str:
    """``rollback+cut_lr``; :data:`RECORDED` for an event that took no action."""
    return "+".join(a for a in actions if a != Action.LOG) or RECORDED


def _plot_loss(run: RunData, ax: Axes, tags: Sequence[str], val_tags: Sequence[str],
               max_points: int) -> bool:
    """The training losses as lines, the validation loss as dots, non-finite as ``x``."""
    drawn = []
    styles = [*({"lw": 1.0, "color": f"C{i}"} for i in (0, 1, 3, 4, 5)), {"lw": 1.0}]
    for i, tag in enumerate(tags):
        series = run.scalars.get(tag)
        if series is not None and len(series):
            drawn.append((tag, series, styles[min(i, len(styles) - 1)]))
    for tag in val_tags:
        series = run.scalars.get(tag)
        if series is not None and len(series):
            drawn.append((tag, series, {"marker": "o", "ms": 3, "lw": 1.0, "color": "C2"}))
    if not drawn:
        _no_data(ax, ", ".join(tags) if tags else "loss tag (pass --loss-tag)")
        return False
    finite = [s.finite() for _, s, _ in drawn]
    log = all(bool(np.all(f.values > 0)) for f in finite) and any(len(f) for f in finite)
    for (tag, _, style), f in zip(drawn, finite, strict=True):
        ax.plot(*decimate(f.steps, f.values, max_points), label=_label(tag),
                **style)  # type: ignore[arg-type]
    bad = np.concatenate([s.steps[~np.isfinite(s.values)] for _, s, _ in drawn])
    if len(bad):
        bad = np.unique(bad)
        if len(bad) > max_points:
            bad = bad[np.linspace(0, len(bad) - 1, max_points).astype(int)]
        ax.plot(bad, np.full(len(bad), 0.97), "x", ms=4, color="#d62728",
                transform=ax.get_xaxis_transform(), label="non-finite")
    if log:
        ax.set_yscale("log")
    return True


def _with_events(series: Series, points: list[tuple[int, float]]) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """A step line's points plus ``points`` from the guard's events, in step order.

    An event's point comes after a recorded one at the same step, so the line takes the
    event's value from the event's own step on.
    """
    steps, values = _positive(series)
    if not points:
        return steps, values
    ev_steps = np.array([p[0] for p in points], dtype=np.int64)
    ev_values = np.array([p[1] for p in points], dtype=np.float64)
    ok = np.isfinite(ev_values) & (ev_values > 0)
    all_steps = np.concatenate([steps, ev_steps[ok]])
    all_values = np.concatenate([values, ev_values[ok]])
    source = np.concatenate([np.zeros(len(steps), np.int8), np.ones(int(ok.sum()), np.int8)])
    order = np.lexsort((source, all_steps))
    return all_steps[order], all_values[order]


def _changes(events: Sequence[GuardEvent]) -> tuple[dict[str, list[tuple[int, float]]],
                                                    list[tuple[int, float]]]:
    """The learning rates (by ``Optimizer/group``) and LR scales the guard's events set."""
    lrs: dict[str, list[tuple[int, float]]] = {}
    scales: list[tuple[int, float]] = []
    for e in events:
        changed = [k for k, v in e.lr_after.items() if e.lr_before.get(k) != v]
        if e.step < 0 or not changed:
            continue
        for k in changed:
            lrs.setdefault(k, []).append((e.step, e.lr_after[k]))
        scales.append((e.step, e.lr_scale))
    return lrs, scales


def _plot_lr(run: RunData, ax: Axes, lrs: Mapping[tuple[str, str], Series], prefix: str,
             max_points: int) -> tuple[Axes, float] | None:
    """LR per group and the guard's LR scale; returns ``(twin axis, largest lr)``.

    The scale's axis is the lr axis divided by the first group's largest LR: scale 1 is
    drawn at the LR's peak, so a warm-up that starts 100× below it does not push the
    scale's line (and its cuts) off the axis.
    """
    from matplotlib.ticker import NullFormatter

    event_lrs, event_scales = _changes(run.events)
    peaks = []
    for (opt, group), series in sorted(lrs.items()):
        steps, values = _with_events(series, event_lrs.get(lr_key(opt, group), []))
        if len(steps):
            peaks.append(float(values.max()))
            ax.plot(*decimate(steps, values, max_points), lw=2.2, alpha=0.6,
                    label=_label(f"lr {opt}/{group}"), drawstyle="steps-post")
    if lrs:
        ax.set_yscale("log")
    scale = run.scalars.get(GUARD_LR_SCALE)
    if scale is None or not len(_positive(scale)[0]):
        if lrs:
            ax.legend(fontsize=7, loc="best")
        else:
            _no_data(ax, f"{stat_tag(prefix, 'lr', '*', '*')} or {GUARD_LR_SCALE}")
        return None
    twin = ax.twinx()
    scale_steps, scale_values = _with_events(scale, event_scales)
    twin.plot(*decimate(scale_steps, scale_values, max_points), color="0.2", ls="--", lw=1.0,
              drawstyle="steps-post", label="guard lr scale (right axis)")
    twin.set_yscale("log")
    twin.yaxis.set_minor_formatter(NullFormatter())
    twin.set_ylabel("guard lr scale", color="0.35", fontsize=8)
    twin.tick_params(axis="y", labelsize=8, colors="0.35")
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    # On the twin, which is drawn above ax; the centre right is clear of the lines for a
    # constant LR and for an LR cut early.
    twin.legend(handles + h2, labels + l2, fontsize=7, loc="center right")
    if not peaks:  # no lr tags: show the scale on its own range
        twin.set_ylim(float(scale_values.min()) * 0.7, 1.4)
        return None
    return twin, peaks[0]


def _plot_eff_lr(run: RunData, ax: Axes, lrs: Mapping[tuple[str, str], Series],
                 prefix: str, max_points: int) -> None:
    p50s = run.global_tags("eff_lr/p50", prefix)
    p05s = run.global_tags("eff_lr/p05", prefix)
    p95s = run.global_tags("eff_lr/p95", prefix)
    event_lrs, _ = _changes(run.events)
    for i, (opt, p50) in enumerate(sorted(p50s.items())):
        color = f"C{i % 10}"
        lo, hi = p05s.get(opt), p95s.get(opt)
        if lo is not None and hi is not None and np.array_equal(lo.steps, hi.steps):
            ok = np.isfinite(lo.values) & np.isfinite(hi.values) & (lo.values > 0)
            ax.fill_between(*_envelope(lo.steps[ok], lo.values[ok], hi.values[ok], max_points),
                            color=color, alpha=0.25, lw=0, label=_label(f"{opt} p05–p95"))
        ax.plot(*decimate(*_positive(p50), max_points), color=color, lw=1.2,
                label=_label(f"{opt} p50"))
    for (opt, group), series in sorted(lrs.items())[:3]:  # the nominal lr, for reference
        steps, values = _with_events(series, event_lrs.get(lr_key(opt, group), []))
        ax.plot(*decimate(steps, values, max_points), color="0.4", ls=":", lw=1.0,
                label=_label(f"lr {opt}/{group}"), drawstyle="steps-post")
    if p50s:
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
    else:
        _no_data(ax, stat_tag(prefix, "eff_lr/*", "*", GLOBAL))


def _plot_stat(run: RunData, ax: Axes, stat: str, prefix: str, max_points: int) -> None:
    found = run.global_tags(stat, prefix)
    for i, (opt, series) in enumerate(sorted(found.items())):
        ax.plot(*decimate(*_positive(series), max_points), color=f"C{i % 10}", lw=1.0,
                label=_label(opt))
    if found:
        ax.set_yscale("log")
        if len(found) > 1:
            ax.legend(fontsize=7, loc="upper right")
    else:
        _no_data(ax, stat_tag(prefix, stat, "*", GLOBAL))


def _mark_events(run: RunData, axes: list[Axes]) -> set[str]:
    """Vertical lines at the guard's events on every row, labels on the top row.

    The lines of one action are one collection per row, however many events there are.
    Labels are placed by importance (stop, rollback, cut_lr, skip, recorded) and left out
    where they would overlap one already placed; the legend still names every colour. An
    event that took no action (empty ``actions``, or ``log`` in files of older versions)
    is a dotted line labelled ``recorded``.
    """
    ax_loss = axes[0]
    steps = [int(s.steps.max()) for s in run.scalars.values() if len(s)]
    if run.events:
        steps += [min(e.step for e in run.events), max(e.step for e in run.events)]
    span = max(max(steps) - min(steps), 1) if steps else 1
    by_action: dict[str, list[int]] = {}
    for event in run.events:
        by_action.setdefault(_event_color(event.actions)[0], []).append(event.step)
    rank = {a: i for i, a in enumerate((*(a.value for a in _ACTION_ORDER), RECORDED))}
    for action in sorted(by_action, key=rank.__getitem__):
        acted = action != RECORDED
        color = ACTION_COLORS[Action(action)] if acted else ACTION_COLORS[Action.LOG]
        xs = np.unique(np.array(by_action[action], dtype=np.int64))
        for ax in axes:
            ax.vlines(xs, 0, 1, transform=ax.get_xaxis_transform(), colors=color,
                      lw=1.0 if acted else 0.8, alpha=0.75,
                      linestyles="solid" if acted else "dotted", zorder=0.5,
                      label=f"guard: {action}" if ax is ax_loss else "_nolegend_")
    by_importance = sorted(run.events, key=lambda e: (rank[_event_color(e.actions)[0]], e.step))
    placed: list[int] = []
    for event in by_importance:
        if len(placed) >= _MAX_LABELLED_EVENTS:
            break
        if any(abs(event.step - p) / span < _MIN_LABEL_GAP for p in placed):
            continue
        placed.append(event.step)
        _, color = _event_color(event.actions)
        ax_loss.annotate(_label(_event_label(event.actions)), xy=(event.step, 1.0),
                         xycoords=("data", "axes fraction"), xytext=(3, -3),
                         textcoords="offset points", rotation=90, va="top", ha="left",
                         fontsize=7, color=color,
                         bbox={"fc": "white", "ec": "none", "alpha": 0.75, "pad": 0.5})
    return set(by_action)


def _title(run: RunData, report: Mapping[str, Any]) -> str:
    """Run name, what the loss did, what the guard did."""
    lines = [_label(run.name, _MAX_TITLE)]
    train = report["loss"]["train"]
    if train:
        tag, summary = next(iter(train.items()))
        lines.append(_label(loss_headline(tag, summary), 2 * _MAX_TITLE))
    else:
        lines.append("no training loss found")
    lines.append(_label(guard_headline(report["guard"]), 2 * _MAX_TITLE))
    return "\n".join(lines)


def _plot_run(run: RunData, axes: list[Axes], *, prefix: str, max_points: int,
              loss_tags: Sequence[str] | None) -> tuple[Axes, float] | None:
    """Draw one run into its column; returns the lr row's twin axis and largest lr."""
    ax_loss, ax_lr, ax_eff, ax_ratio, ax_grad = axes
    report = build_report(run, prefix=prefix, loss_tags=loss_tags)
    ax_loss.set_title(_title(run, report), fontsize=9, loc="left")
    tags = list(loss_tags) if loss_tags else list(report["loss"]["train"])
    drawn = _plot_loss(run, ax_loss, tags, list(report["loss"]["val"]), max_points)
    lrs = run.monitor_tags("lr", prefix, groups=True)
    twin = _plot_lr(run, ax_lr, lrs, prefix, max_points)
    _plot_eff_lr(run, ax_eff, lrs, prefix, max_points)
    _plot_stat(run, ax_ratio, "update_ratio", prefix, max_points)
    _plot_stat(run, ax_grad, "grad_norm", prefix, max_points)
    seen = _mark_events(run, axes)
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    if drawn or seen:
        ax_loss.legend(fontsize=7, loc="best")
    return twin

