"""Plot lr-monitor runs to PNG (``lr-monitor plot``).

One figure shows one run per column and five rows, sharing the step axis within a
column and the y axis within a row, so runs compare at a glance:

1. **loss** -- ``train/loss`` (and ``val/loss`` when logged), log scale, with every guard
   event marked by a vertical line coloured and labelled by the action taken;
2. **learning rate** -- ``lr`` of each optimizer/param group (log scale) and the guard's
   cumulative ``guard/lr_scale`` on a second axis;
3. **effective learning rate** -- the ``eff_lr`` p05-p95 band shaded with the p50 line,
   per optimizer (``global``), log scale;
4. **update ratio** -- ``|update| / |param|`` per optimizer (``global``), log scale;
5. **gradient norm** -- per optimizer (``global``), log scale.

Guard events are marked on every row; non-finite points are left out of log-scale rows.
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
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lr_monitor.cli.report import RunData
from lr_monitor.cli.safe_text import terminal_safe
from lr_monitor.cli.tfevents import Series
from lr_monitor.events import Action
from lr_monitor.tags import (
    DEFAULT_PREFIX,
    GLOBAL,
    GUARD_LR_SCALE,
    TRAIN_LOSS,
    VAL_LOSS,
    stat_tag,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["ACTION_COLORS", "RECORDED", "per_run_path", "plot_runs"]

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


def _label(text: str, limit: int | None = None) -> str:
    """A name from the files as figure text: terminal-safe, shortened past ``limit``."""
    text = terminal_safe(text)
    if limit is not None and len(text) > limit:
        half = (limit - 1) // 2
        text = f"{text[:half]}…{text[-half:]}"
    return text


def per_run_path(output: str | os.PathLike[str], run_name: str) -> Path:
    """The file of one run when plotting one PNG per run: ``<stem>-<run>.png``.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` in the run name
    become ``_``; a name longer than 100 characters keeps its first 80 and a short hash
    of the whole name, so every file name stays valid.

    Args:
        output: The ``-o`` path, e.g. ``run.png``.
        run_name: The run's name, e.g. ``too-high-lr1/version_0``.

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


def plot_runs(
    runs: Sequence[RunData],
    output: str | os.PathLike[str],
    *,
    per_run: bool = False,
    prefix: str = DEFAULT_PREFIX,
    dpi: int = 110,
) -> list[Path]:
    """Draw runs and save PNGs.

    Args:
        runs: The runs (from :func:`lr_monitor.cli.report.load_runs`).
        output: The PNG to write. With ``per_run`` it is the name pattern instead: each
            run goes to :func:`per_run_path` ``(output, run.name)``.
        per_run: One PNG per run instead of one PNG with a column per run.
        prefix: The monitor's tag prefix.
        dpi: Resolution.

    Returns:
        The files written.

    Raises:
        ValueError: If ``runs`` is empty.
        ImportError: If matplotlib is not installed.
        OSError: If a file cannot be written.
    """
    if not runs:
        raise ValueError("no runs to plot")
    if per_run:
        written: list[Path] = []
        for run in runs:
            path = per_run_path(output, run.name)
            if path in written:  # two names that differ only in replaced characters
                digest = hashlib.sha1(run.name.encode("utf-8", "surrogateescape"))
                path = path.with_name(f"{path.stem}-{digest.hexdigest()[:12]}{path.suffix}")
            written.append(_save([run], path, dpi, prefix))
        return written
    return [_save(list(runs), Path(output), dpi, prefix)]


def _save(runs: list[RunData], path: Path, dpi: int, prefix: str) -> Path:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # Names are text, never mathtext or LaTeX: a run named "$\frac{a}$" is drawn as typed.
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}), \
            warnings.catch_warnings():
        # a name in a script the font lacks is drawn as boxes; say nothing about it
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        fig = _figure(runs, prefix=prefix)
        FigureCanvasAgg(fig)
        fig.savefig(path, dpi=dpi, format="png")
    return path


def _figure(runs: list[RunData], *, prefix: str) -> Any:
    from matplotlib.figure import Figure

    ncols = len(runs)
    fig = Figure(figsize=(1.2 + 5.4 * ncols, 13.0), layout="constrained")
    axes = fig.subplots(len(_ROWS), ncols, sharex="col", sharey="row", squeeze=False)
    twins = []
    for col, run in enumerate(runs):
        column = [axes[row][col] for row in range(len(_ROWS))]
        twin = _plot_run(run, column, prefix=prefix)
        if twin is not None:
            twins.append((column[1], *twin))
    # The guard's lr scale shares the lr axis, divided by the initial lr: when every LR
    # change came from the guard, the two lines coincide. Done last, once the shared
    # lr axis has its final limits.
    for ax_lr, twin_ax, lr0 in twins:
        low, high = ax_lr.get_ylim()
        twin_ax.set_ylim(low / lr0, high / lr0)
    for row, label in enumerate(_ROWS):
        axes[row][0].set_ylabel(label)
    for col in range(ncols):
        axes[-1][col].set_xlabel("step")
    return fig


def _positive(series: Series) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(series.values) & (series.values > 0)
    return series.steps[keep], series.values[keep]


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", transform=ax.transAxes, ha="center", va="center",
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


def _plot_loss(run: RunData, ax: Axes) -> bool:
    drawn = False
    for tag, style in (
        (TRAIN_LOSS, {"lw": 1.0, "color": "C0"}),
        (VAL_LOSS, {"marker": "o", "ms": 3, "lw": 1.0, "color": "C2"}),
    ):
        series = run.scalars.get(tag)
        if series is not None and len(_positive(series)[0]):
            ax.plot(*_positive(series), label=tag, **style)  # type: ignore[arg-type]
            drawn = True
    if drawn:
        ax.set_yscale("log")
    else:
        _no_data(ax, TRAIN_LOSS)
    return drawn


def _plot_lr(run: RunData, ax: Axes, lrs: dict[tuple[str, str], Series],
             prefix: str) -> tuple[Axes, float] | None:
    """LR per group and the guard's LR scale; returns ``(twin axis, initial lr)``."""
    from matplotlib.ticker import NullFormatter

    for (opt, group), series in sorted(lrs.items()):
        steps, values = _positive(series)
        if len(steps):
            ax.plot(steps, values, lw=2.2, alpha=0.6, label=_label(f"lr {opt}/{group}"),
                    drawstyle="steps-post")
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
    twin.plot(*_positive(scale), color="0.2", ls="--", lw=1.0, drawstyle="steps-post",
              label="guard lr scale (right axis)")
    twin.set_yscale("log")
    twin.yaxis.set_minor_formatter(NullFormatter())
    twin.set_ylabel("guard lr scale", color="0.35", fontsize=8)
    twin.tick_params(axis="y", labelsize=8, colors="0.35")
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    # On the twin, which is drawn above ax; the centre right is clear of the lines for a
    # constant LR and for an LR cut early.
    twin.legend(handles + h2, labels + l2, fontsize=7, loc="center right")
    first = [_positive(s)[1] for _, s in sorted(lrs.items())]
    lr0 = next((float(v[0]) for v in first if len(v)), None)
    if lr0 is None:  # no lr tags: show the scale on its own range
        twin.set_ylim(float(_positive(scale)[1].min()) * 0.7, 1.4)
        return None
    return twin, lr0


def _plot_eff_lr(run: RunData, ax: Axes, lrs: dict[tuple[str, str], Series],
                 prefix: str) -> None:
    p50s = run.global_tags("eff_lr/p50", prefix)
    p05s = run.global_tags("eff_lr/p05", prefix)
    p95s = run.global_tags("eff_lr/p95", prefix)
    for i, (opt, p50) in enumerate(sorted(p50s.items())):
        color = f"C{i % 10}"
        lo, hi = p05s.get(opt), p95s.get(opt)
        if lo is not None and hi is not None and np.array_equal(lo.steps, hi.steps):
            ok = np.isfinite(lo.values) & np.isfinite(hi.values) & (lo.values > 0)
            ax.fill_between(lo.steps[ok], lo.values[ok], hi.values[ok], color=color,
                            alpha=0.25, lw=0, label=_label(f"{opt} p05–p95"))
        ax.plot(*_positive(p50), color=color, lw=1.2, label=_label(f"{opt} p50"))
    for (opt, group), series in sorted(lrs.items())[:3]:  # the nominal lr, for reference
        ax.plot(*_positive(series), color="0.4", ls=":", lw=1.0,
                label=_label(f"lr {opt}/{group}"), drawstyle="steps-post")
    if p50s:
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
    else:
        _no_data(ax, stat_tag(prefix, "eff_lr/*", "*", GLOBAL))


def _plot_stat(run: RunData, ax: Axes, stat: str, prefix: str) -> None:
    found = run.global_tags(stat, prefix)
    for i, (opt, series) in enumerate(sorted(found.items())):
        ax.plot(*_positive(series), color=f"C{i % 10}", lw=1.0, label=_label(opt))
    if found:
        ax.set_yscale("log")
        if len(found) > 1:
            ax.legend(fontsize=7, loc="upper right")
    else:
        _no_data(ax, stat_tag(prefix, stat, "*", GLOBAL))


def _mark_events(run: RunData, axes: list[Axes]) -> set[str]:
    """Vertical lines at the guard's events on every row, labels on the top row.

    Labels are placed by importance (stop, rollback, cut_lr, skip, recorded) and left out
    where they would overlap one already placed; the legend still names every colour. An
    event that took no action (empty ``actions``, or ``log`` in files of older versions)
    is a dotted line labelled ``recorded``.
    """
    ax_loss = axes[0]
    steps = [int(s.steps.max()) for s in run.scalars.values() if len(s)]
    steps += [e.step for e in run.events]
    span = max(max(steps) - min(steps), 1) if steps else 1
    seen: set[str] = set()
    for event in run.events:
        action, color = _event_color(event.actions)
        acted = action != RECORDED
        for ax in axes:
            ax.axvline(event.step, color=color, lw=1.0 if acted else 0.8, alpha=0.75,
                       ls="-" if acted else ":", zorder=0.5,
                       label=f"guard: {action}" if ax is ax_loss and action not in seen
                       else None)
        seen.add(action)
    rank = {a: i for i, a in enumerate((*(a.value for a in _ACTION_ORDER), RECORDED))}
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
    return seen


def _plot_run(run: RunData, axes: list[Axes], *, prefix: str) -> tuple[Axes, float] | None:
    """Draw one run into its column; returns the lr row's twin axis and initial lr."""
    ax_loss, ax_lr, ax_eff, ax_ratio, ax_grad = axes
    n_events = len(run.events)
    title = f"{_label(run.name, _MAX_TITLE)}\n{n_events} guard event{'s' if n_events != 1 else ''}"
    loss = run.scalars.get(TRAIN_LOSS)
    if loss is not None and len(loss):
        title += f", final train loss {loss.last()[1]:.3g}"
    ax_loss.set_title(title, fontsize=10, loc="left")

    drawn = _plot_loss(run, ax_loss)
    lrs = run.monitor_tags("lr", prefix, groups=True)
    twin = _plot_lr(run, ax_lr, lrs, prefix)
    _plot_eff_lr(run, ax_eff, lrs, prefix)
    _plot_stat(run, ax_ratio, "update_ratio", prefix)
    _plot_stat(run, ax_grad, "grad_norm", prefix)
    seen = _mark_events(run, axes)
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    if drawn or seen:
        ax_loss.legend(fontsize=7, loc="best")
    return twin
