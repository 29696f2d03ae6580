"""``lr-monitor demo``: watch the guard catch a learning rate that is too high.

Trains a small MLP (64-128-10) on scikit-learn's bundled digits data (1,797 8x8 images,
no download; features standardised on the training split; stratified 80/20 split) twice
with Adam, batch 64:

* ``healthy-lr1e-3`` -- ``lr=1e-3``, a sensible learning rate;
* ``too-high-lr1`` -- ``lr=1.0``, which blows the loss up to the hundreds or thousands
  within a couple of steps.

Both runs have :class:`lr_monitor.StepSizeMonitor` and :class:`lr_monitor.DivergenceGuard`
attached and log to TensorBoard under ``OUT/<run name>/version_<n>``. At the end the demo
prints what the guard detected and did, the final train loss and validation accuracy of
both runs, where the logs are, the PNG of both runs (``OUT/summary.png``) and the
``tensorboard`` command to open them.

Everything is seeded (:func:`pytorch_lightning.seed_everything`, deterministic trainer,
CPU), so the same seed gives the same numbers and the same guard events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lr_monitor._validation import check_bool, check_int, check_path, invalid
from lr_monitor.cli.report import build_report, format_value, load_run
from lr_monitor.events import GuardEvent
from lr_monitor.tags import EVENTS_FILENAME, TENSORBOARD_FILE_MARK

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_OUT",
    "DEMO_RUNS",
    "DemoResult",
    "DemoRun",
    "print_summary",
    "run_demo",
    "tensorboard_command",
]

#: Where the demo logs unless ``--out`` says otherwise.
DEFAULT_OUT = "lr_monitor_runs"
#: Epochs of a full demo run (23 optimizer steps each).
DEFAULT_EPOCHS = 6
#: ``(run name, Adam learning rate)`` of the two runs.
DEMO_RUNS: tuple[tuple[str, float], ...] = (("healthy-lr1e-3", 1e-3), ("too-high-lr1", 1.0))

_BATCH_SIZE = 64
_QUICK_EPOCHS = 2
_QUICK_TRAIN_BATCHES = 8
_QUICK_VAL_BATCHES = 2
# Lightning's start-up chatter that says nothing about the demo.
_QUIET_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "pytorch_lightning.accelerators.cuda",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "lightning_fabric.utilities.seed",
)


@dataclass(frozen=True)
class DemoRun:
    """The outcome of one demo run.

    Args:
        name: Run name, e.g. ``"too-high-lr1"``.
        lr: Adam's learning rate at the start.
        log_dir: The TensorBoard logger's directory (holds ``events.jsonl`` too).
        events: The guard's events (``DivergenceGuard.events``).
        stop_reason: Why the guard stopped training, if it did.
        report: :func:`lr_monitor.cli.report.build_report` of ``log_dir``.
    """

    name: str
    lr: float
    log_dir: Path
    events: list[GuardEvent]
    stop_reason: str | None
    report: dict[str, Any] = field(repr=False)

    def metric(self, tag: str) -> float | None:
        """The last logged value of ``tag`` (e.g. ``"val/acc"``), or ``None``."""
        m = self.report["metrics"].get(tag)
        return None if m is None else float(m["last"])


@dataclass(frozen=True)
class DemoResult:
    """Both runs of the demo, and where their outputs went.

    Args:
        out: The log directory holding both runs.
        runs: One :class:`DemoRun` per entry of :data:`DEMO_RUNS`.
        plot: The PNG written (``None`` when plotting was off or matplotlib is missing).
        epochs: Epochs per run.
        quick: Whether the runs were shortened (``--quick``).
    """

    out: Path
    runs: list[DemoRun]
    plot: Path | None
    epochs: int
    quick: bool


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up info lines and its single-process dataloader hints."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*available but not used.*")
            # torch's deprecation of LeafSpec, raised inside Lightning's own code
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _digits(seed: int) -> tuple[Any, Any, Any, Any]:
    """Standardised digits features and labels as tensors: ``(x_train, y_train, x_val, y_val)``."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0  # border pixels that are always blank
    x_tr = ((x_tr - mean) / std).astype(np.float32)
    x_va = ((x_va - mean) / std).astype(np.float32)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
            torch.from_numpy(x_va), torch.from_numpy(y_va).long())


def _make_module(lr: float) -> Any:
    """A 64-128-10 MLP LightningModule logging ``train/loss``, ``train/acc``, ``val/*``."""
    import pytorch_lightning as pl
    import torch
    from torch import nn

    class DigitsMLP(pl.LightningModule):
        def __init__(self, lr: float) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[Any, Any]:
            x, y = batch
            logits = self(x)
            loss = nn.functional.cross_entropy(logits, y)
            acc = (logits.argmax(dim=1) == y).float().mean()
            return loss, acc

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                          batch_idx: int) -> torch.Tensor:
            loss, acc = self._step(batch)
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
            self.log("train/acc", acc, on_step=True, on_epoch=False)
            return loss

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                            batch_idx: int) -> None:
            loss, acc = self._step(batch)
            self.log("val/loss", loss, on_epoch=True, prog_bar=True)
            self.log("val/acc", acc, on_epoch=True, prog_bar=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])

    return DigitsMLP(lr)


def _train_one(name: str, lr: float, out: Path, *, epochs: int, quick: bool, seed: int,
               progress_bar: bool) -> DemoRun:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lr_monitor import DivergenceGuard, StepSizeMonitor

    pl.seed_everything(seed, workers=True, verbose=False)
    x_tr, y_tr, x_va, y_va = _digits(seed)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=_BATCH_SIZE, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(x_va, y_va), batch_size=256)
    module = _make_module(lr)
    logger = TensorBoardLogger(save_dir=str(out), name=name, default_hp_metric=False)
    guard = DivergenceGuard()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=logger,
        callbacks=[StepSizeMonitor(), guard],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        num_sanity_val_steps=0,
        limit_train_batches=_QUICK_TRAIN_BATCHES if quick else 1.0,
        limit_val_batches=_QUICK_VAL_BATCHES if quick else 1.0,
    )
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    log_dir = Path(logger.log_dir)
    logger.experiment.flush()
    report = build_report(load_run(log_dir, name=f"{name}/{log_dir.name}"))
    return DemoRun(name=name, lr=lr, log_dir=log_dir, events=list(guard.events),
                   stop_reason=getattr(guard, "stop_reason", None), report=report)


def run_demo(
    out: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    epochs: int | None = None,
    quick: bool = False,
    seed: int = 0,
    plot: bool = True,
    progress_bar: bool = True,
) -> DemoResult:
    """Train both demo runs, read their logs back and plot them.

    Args:
        out: Log directory; each run goes to ``out/<run name>/version_<n>`` (a new version
            each time, so earlier demos are kept).
        epochs: Epochs per run (default :data:`DEFAULT_EPOCHS`, or 2 with ``quick``).
        quick: A few steps only (8 batches per epoch, 2 validation batches), for tests.
        seed: Seed of data split, initialisation and batch order.
        plot: Write ``out/summary.png`` (skipped, with ``plot=None`` in the result, when
            matplotlib is not installed).
        progress_bar: Show Lightning's progress bar.

    Returns:
        The result.

    Raises:
        ValueError: If ``out`` is not a path, ``epochs`` not an int ``>= 1`` or ``None``,
            ``seed`` not an int in ``[0, 2**32 - 1]``, or a flag not a bool (each named).
        OSError: If ``out`` cannot be created or written.
        ImportError: If Lightning, scikit-learn or the lr_monitor callbacks are missing.

    Example:
        >>> run_demo("runs", seed=-1)
        Traceback (most recent call last):
        ...
        ValueError: seed=-1 is invalid: must be an int in [0, 4294967295]
    """
    out_dir = check_path("out", out)
    assert out_dir is not None
    check_int("epochs", epochs, 1, allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise invalid("seed", seed, f"an int in [0, {2**32 - 1}]")
    for name, flag in (("quick", quick), ("plot", plot), ("progress_bar", progress_bar)):
        check_bool(name, flag)
    n_epochs = epochs if epochs is not None else (_QUICK_EPOCHS if quick else DEFAULT_EPOCHS)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[DemoRun] = []
    with _quiet_lightning():
        for name, lr in DEMO_RUNS:
            runs.append(_train_one(name, lr, out_dir, epochs=n_epochs, quick=quick, seed=seed,
                                   progress_bar=progress_bar))
    png: Path | None = None
    if plot:
        try:
            from lr_monitor.cli.plot import plot_runs
        except ImportError:  # pragma: no cover - matplotlib is optional
            png = None
        else:
            loaded = [load_run(r.log_dir, name=r.report["run"]) for r in runs]
            png = plot_runs(loaded, out_dir / "summary.png")[0]
    return DemoResult(out=out_dir, runs=runs, plot=png, epochs=n_epochs, quick=quick)


def tensorboard_command(logdir: str | os.PathLike[str]) -> str:
    """The shell command that opens ``logdir`` in TensorBoard.

    Uses ``tensorboard`` when it is on ``PATH``, else the one installed beside this
    Python (e.g. an inactive virtualenv).

    Args:
        logdir: The log directory.

    Example:
        >>> tensorboard_command("lr_monitor_runs").endswith("tensorboard --logdir lr_monitor_runs")
        True
    """
    exe = "tensorboard"
    if shutil.which(exe) is None:
        beside = Path(sys.executable).parent / "tensorboard"
        if beside.exists():
            exe = str(beside)
    return f"{shlex.quote(exe)} --logdir {shlex.quote(os.fspath(logdir))}"


def _actions_text(run: DemoRun) -> str:
    counts: dict[str, int] = {}
    for event in run.events:
        for action in event.actions or ("recorded",):
            counts[action] = counts.get(action, 0) + 1
    return ", ".join(f"{a} ×{n}" for a, n in counts.items()) or "nothing to do"


def print_summary(result: DemoResult, file: IO[str] | None = None) -> None:
    """Print what happened in both runs and where to look next.

    Uses ``rich`` when installed, plain text otherwise.

    Args:
        result: From :func:`run_demo`.
        file: Where to write (default: ``sys.stdout`` at call time).
    """
    out = file if file is not None else sys.stdout
    header = (f"lr-monitor demo: 64-128-10 MLP on scikit-learn digits, Adam, batch "
              f"{_BATCH_SIZE}, {result.epochs} epoch{'s' if result.epochs != 1 else ''}"
              f"{' (quick)' if result.quick else ''}")
    columns = ("run", "Adam lr", "steps", "final loss", "max loss", "val acc",
               "guard events")
    rows = []
    for run in result.runs:
        loss = run.report["metrics"].get("train/loss", {})
        rows.append((
            run.name,
            format_value(run.lr),
            "-" if run.report["steps"] is None else str(run.report["steps"]),
            format_value(run.metric("train/loss"), 3),
            format_value(loss.get("max"), 3),
            format_value(run.metric("val/acc"), 3),
            str(len(run.events)),
        ))
    details: list[str] = []
    for run in result.runs:
        if not run.events:
            details.append(f"{run.name}: no divergence detected; the guard did nothing.")
            continue
        details.append(f"{run.name}: the guard detected {len(run.events)} problem"
                       f"{'s' if len(run.events) != 1 else ''} ({_actions_text(run)}):")
        details.extend(f"  {e.summary()}" for e in run.events)
        if run.stop_reason:
            details.append(f"  training stopped: {run.stop_reason}")
    where = []
    for run in result.runs:
        files = f"events.out.{TENSORBOARD_FILE_MARK}.*" + (
            f", {EVENTS_FILENAME}" if run.report["events_file"] else "")
        where.append(f"logs     {run.log_dir}  ({files})")
    if result.plot is not None:
        where.append(f"plot     {result.plot}")
    where.append(f"report   lr-monitor report {shlex.quote(os.fspath(result.out))}")
    where.append(f"open     {tensorboard_command(result.out)}")

    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional
        print(header, file=out)
        for row in rows:
            cells = (f"{c}: {v}" for c, v in zip(columns, row, strict=True))
            print("  " + " | ".join(cells), file=out)
        for line in (*details, *where):
            print(line, file=out)
        return
    console = Console(file=out, highlight=False, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for i, col in enumerate(columns):
        table.add_column(col, justify="right" if i else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(header, markup=False)
    console.print(table)
    console.print()
    for line in details:
        console.print(line, markup=False)
    console.print()
    for line in where:
        console.print(line, markup=False)
