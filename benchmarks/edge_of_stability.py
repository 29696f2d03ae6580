"""Edge of stability on digits, and the overshoot signals on a healthy and a too-high-LR run.

Two parts, on the CPU with one torch thread, every run on a real Lightning ``Trainer``
with the project's callbacks (nothing is re-implemented here):

1. **Full batch: the edge-of-stability plateaus.** Gradient descent (``SGD``, no
   momentum) at η = 0.2 and 0.5 and Adam (β1 = 0.9) at lr 1e-3 and 1e-2 train a tanh MLP
   64-64-64-10 (float32) on all 1,437 training images of scikit-learn's digits at once
   (standardised features, MSE on one-hot targets: ``L = (1/2n)·Σᵢ‖f(xᵢ) − e_{yᵢ}‖²``),
   three seeds each. :class:`~lr_monitor.callbacks.sharpness.SharpnessMonitor` measures,
   on that same full batch every ``k`` steps, the sharpness ``λ_max(H)`` (GD) or the
   preconditioned sharpness ``λ_max(P⁻¹H)`` (Adam) and its ratio to the stability
   threshold ``2/η`` (GD) or ``(2+2β1)/((1−β1)η) = 38/η`` (Adam);
   :class:`~lr_monitor.callbacks.monitor.StepSizeMonitor` (``consecutive=True``) logs the
   consecutive-step cosines (running means over the same ``k`` steps).

   *On the plateau*: ``t*`` is the first
   measurement at which the ratio reaches 0.9 after having been below 0.9 (this skips
   Adam's first steps, where ``v̂`` rests on a few gradients and the ratio is ≫ 1), and
   the plateau is the last half of the measurements from ``t*`` to the end of the run.
   Reported per run: mean, sd, min and max of the ratio there and the deviation
   ``|mean − 1|``; per setting, the seeds' range.

2. **Mini-batch: a healthy and a too-high learning rate.** The benchmarks' ReLU MLP
   64-64-64-10 with cross-entropy, batch 32 (as ``benchmarks/step_quality.py``), Adam
   lr 1e-3 vs 0.1 and SGD lr 0.1 vs 1.0, three seeds each, with
   :class:`~lr_monitor.callbacks.step_quality.StepQualityMonitor` at every step (ρ),
   :class:`~lr_monitor.callbacks.monitor.StepSizeMonitor` at ``logging_interval=25``,
   ``consecutive=True`` (``consecutive_update_cosine``, ``grad_update_cosine``,
   ``overshoot_frac``: means over the 25 steps of each record) and a ``SharpnessMonitor``
   every 50 steps on a fixed held-out batch of 256 (``stability_ratio``).

Every value comes from a listener (``subscribe``) of the callbacks; the training loss is
collected as tensors and read back once at the end of a run.

Usage::

    .venv/bin/python benchmarks/edge_of_stability.py            # 6–10 min on 2 cores
    .venv/bin/python benchmarks/edge_of_stability.py --quick    # ~1 min, one seed
    .venv/bin/python benchmarks/edge_of_stability.py --smoke --out /tmp/x --img /tmp/x

Writes ``edge_of_stability.{md,json}`` to ``--out`` (default ``benchmarks/results``) and
``edge_of_stability.png`` and ``overshoot_signals.png`` to ``--img`` (default
``docs/img``); ``--quick`` and ``--smoke`` add ``_quick``/``_smoke`` to every name.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytorch_lightning as pl
import torch
from common import RESULTS, ROOT, Batches, digits_data, machine_info, make_batches, mlp, quiet
from torch import Tensor, nn

from lr_monitor.callbacks.guard import DivergenceGuard
from lr_monitor.callbacks.monitor import StepSizeMonitor
from lr_monitor.callbacks.sharpness import SharpnessMonitor
from lr_monitor.callbacks.step_quality import StepQualityMonitor
from lr_monitor.guard.bank import OVERSHOOT_RULES
from lr_monitor.recording.record import StepRecord

IMAGES = ROOT / "docs" / "img"

#: Part 1: (label, optimizer, lr).
FULL_BATCH = (("GD η=0.2", "sgd", 0.2), ("GD η=0.5", "sgd", 0.5),
              ("Adam lr=1e-3", "adam", 1e-3), ("Adam lr=1e-2", "adam", 1e-2))
#: Part 2: (name, (label, optimizer, healthy lr), (label, optimizer, too-high lr)).
PAIRS = (("Adam", ("Adam lr=1e-3", "adam", 1e-3), ("Adam lr=0.1", "adam", 0.1)),
         ("SGD", ("SGD lr=0.1", "sgd", 0.1), ("SGD lr=1.0", "sgd", 1.0)))
#: The ratio at which the plateau is taken to be reached (after having been below it).
REACHED = 0.9
#: The share of the measurements from t* to the end that forms the plateau (the last ones).
PLATEAU_SHARE = 0.5
#: Width of the band the Done-when of issue 12 asks for.
TOLERANCE = 0.05
#: Part 2: the StepSizeMonitor's logging interval, the SharpnessMonitor's period and the
#: size of its held-out batch; the training batch size.
MB_LOG, MB_SHARP, MB_HELD_OUT, MB_BATCH = 25, 50, 256, 32
#: Part 2: the signals are also reported separately up to and after this step (the
#: healthy runs' cosines reach the mini-batch noise floor about then).
MB_EARLY = 150
CONSECUTIVE = ("consecutive_update_cosine", "grad_update_cosine", "overshoot_frac")


@dataclass(frozen=True)
class Mode:
    """How much to run: steps and measurement period of part 1, steps of part 2, seeds."""

    fb_steps: int
    fb_every: int
    mb_steps: int
    seeds: tuple[int, ...]


MODES = {"full": Mode(2000, 20, 600, (0, 1, 2)),
         "quick": Mode(1000, 20, 300, (0,)),
         "smoke": Mode(40, 10, 30, (0,))}


# -- models ---------------------------------------------------------------------------------


def _optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def tanh_mlp() -> nn.Sequential:
    """The part-1 network: 64-64-64-10, tanh (8,970 parameters, float32)."""
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 10))


def half_mse(out: Tensor, target: Tensor) -> Tensor:
    """``(1/2n)·Σᵢ‖outᵢ − targetᵢ‖²``: half the squared error, summed over classes."""
    return 0.5 * (out - target).pow(2).sum(1).mean()


class FullBatchRegression(pl.LightningModule):
    """Part 1: the tanh MLP on one-hot targets with :func:`half_mse`."""

    def __init__(self, optimizer: str, lr: float) -> None:
        super().__init__()
        self.net = tanh_mlp()
        self.optimizer_name, self.lr = optimizer, lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, target = batch
        return half_mse(self.net(x), target)

    def configure_optimizers(self) -> Any:
        return _optimizer(self.optimizer_name, self.parameters(), self.lr)


class Classifier(pl.LightningModule):
    """Part 2: the benchmarks' ReLU MLP 64-64-64-10 with cross-entropy."""

    def __init__(self, optimizer: str, lr: float) -> None:
        super().__init__()
        self.net = mlp((64, 64, 64, 10))
        self.optimizer_name, self.lr = optimizer, lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return _optimizer(self.optimizer_name, self.parameters(), self.lr)


class LossLog(pl.Callback):
    """The training loss of every step, kept on the device, read back once."""

    def __init__(self) -> None:
        self._losses: list[Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self._losses.append(loss.detach().reshape(()))

    def values(self) -> list[float]:
        """The losses in step order (one host transfer)."""
        return torch.stack(self._losses).tolist() if self._losses else []


class Rows:
    """A listener keeping chosen statistics of every record: ``{stat: [(index, value)]}``."""

    def __init__(self, stats: Sequence[str]) -> None:
        self.stats = tuple(stats)
        self.rows: dict[str, list[tuple[int, float]]] = {s: [] for s in self.stats}

    def __call__(self, record: StepRecord) -> None:
        for stat in self.stats:
            value = record.value(stat)
            if value is not None:
                self.rows[stat].append((record.index, float(value)))

    def series(self, stat: str) -> tuple[list[int], list[float]]:
        """Steps and values of one statistic."""
        pairs = self.rows[stat]
        return [i for i, _ in pairs], [v for _, v in pairs]


def _fit(module: pl.LightningModule, data: Batches, callbacks: list[Any], steps: int) -> None:
    """Train without logger or checkpoints; any file a callback writes goes to a temp dir."""
    with tempfile.TemporaryDirectory() as root:
        pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1,
                   logger=False, callbacks=callbacks, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, default_root_dir=root).fit(module, data)


def log_only_guard() -> DivergenceGuard:
    """A ``DivergenceGuard`` with its default detectors whose every action is ``log``.

    It changes nothing in training; its events say what the default guard would have
    acted on (defaults: spike → skip, divergence and non-finite → rollback, oscillation,
    update ratio and overshoot → cut), with every overshoot rule on, the opt-in g·Δ rule
    included.
    """
    return DivergenceGuard(on_nonfinite="log", on_spike="log", on_divergence="log",
                           on_oscillation="log", on_update_ratio="log", on_overshoot="log",
                           overshoot_rules=tuple(OVERSHOOT_RULES), log_events=False,
                           jsonl=False)


def guard_events(guard: DivergenceGuard) -> dict[str, list[int]]:
    """The steps of the guard's detections, by ``"<kind>/<signal>"``."""
    out: dict[str, list[int]] = {}
    for event in guard.events:
        out.setdefault(f"{event.kind}/{event.signal}", []).append(int(event.step))
    return out


# -- part 1 -------------------------------------------------------------------------------


@dataclass
class FullBatchRun:
    """The series of one part-1 run."""

    label: str
    seed: int
    lr: float
    threshold: float
    steps: list[int]  # measured steps
    value: list[float]  # sharpness (GD) or preconditioned sharpness (Adam)
    ratio: list[float]
    raw: list[float]  # sharpness λ_max(H) (the same as ``value`` for GD)
    cos_steps: list[int]
    cosines: dict[str, list[float]]
    loss: list[float]  # every step
    guard: dict[str, list[int]]  # the log-only guard's detections: steps by kind/signal
    seconds: float
    plateau: dict[str, Any] = field(default_factory=dict)


def full_batch_run(label: str, optimizer: str, lr: float, seed: int, mode: Mode
                   ) -> FullBatchRun:
    """Train one part-1 run and return its series (plateau filled in by the caller)."""
    x, y, _, _ = digits_data()
    batch = (x, nn.functional.one_hot(y, 10).to(x.dtype))
    pl.seed_everything(seed, verbose=False)
    module = FullBatchRegression(optimizer, lr)
    sharp = SharpnessMonitor(every_n_steps=mode.fb_every, batch=batch,
                             raw_sharpness=optimizer != "sgd")
    curvature = Rows(("sharpness", "preconditioned_sharpness", "stability_threshold",
                      "stability_ratio"))
    sharp.subscribe(curvature)
    monitor = StepSizeMonitor(logging_interval=mode.fb_every, consecutive=True)
    cos = Rows(CONSECUTIVE)
    monitor.subscribe(cos)
    losses = LossLog()
    guard = log_only_guard()
    t0 = time.perf_counter()
    _fit(module, Batches([batch]), [sharp, monitor, guard, losses], mode.fb_steps)
    seconds = time.perf_counter() - t0
    steps, value = curvature.series("preconditioned_sharpness")
    _, ratio = curvature.series("stability_ratio")
    _, threshold = curvature.series("stability_threshold")
    raw = curvature.series("sharpness")[1] if optimizer != "sgd" else list(value)
    cos_steps, _ = cos.series(CONSECUTIVE[0])
    return FullBatchRun(
        label=label, seed=seed, lr=lr, threshold=threshold[0] if threshold else math.nan,
        steps=steps, value=value, ratio=ratio, raw=raw, cos_steps=cos_steps,
        cosines={s: cos.series(s)[1] for s in CONSECUTIVE}, loss=losses.values(),
        guard=guard_events(guard), seconds=seconds)


def plateau(steps: Sequence[int], ratios: Sequence[float], *, reached: float = REACHED,
            share: float = PLATEAU_SHARE) -> dict[str, Any]:
    """The plateau of a ratio series, by the rule of the module docstring.

    Args:
        steps: The measured steps, increasing.
        ratios: The stability ratio at each.
        reached: The ratio that counts as reaching the threshold (from below).
        share: The last share of the measurements from ``t*`` on that forms the plateau.

    Returns:
        ``{"t_star": None}`` when the ratio never rises to ``reached`` from below; else
        ``t_star``, the plateau's first and last step, ``n`` and the mean, sd, min, max,
        ``deviation = |mean − 1|`` and ``within`` (the share of plateau measurements
        within ±5 % of 1).

    Example:
        >>> p = plateau([0, 10, 20, 30, 40, 50], [5.0, 0.5, 0.95, 1.1, 1.0, 0.96])
        >>> p["t_star"], p["start"], p["n"], round(p["mean"], 2)
        (20, 40, 2, 0.98)
    """
    below = False
    first = None
    for i, r in enumerate(ratios):
        if below and r >= reached:
            first = i
            break
        below = below or r < reached
    if first is None:
        return {"t_star": None}
    rest = list(range(first, len(ratios)))
    take = rest[len(rest) - max(1, math.ceil(share * len(rest))):]
    window = [ratios[i] for i in take]
    mean = statistics.fmean(window)
    return {
        "t_star": steps[first], "start": steps[take[0]], "end": steps[take[-1]],
        "n": len(window), "mean": mean,
        "sd": statistics.stdev(window) if len(window) > 1 else 0.0,
        "min": min(window), "max": max(window), "deviation": abs(mean - 1.0),
        "within": sum(abs(r - 1.0) <= TOLERANCE for r in window) / len(window),
    }


def _mean_between(steps: Sequence[int], values: Sequence[float], lo: float,
                  hi: float) -> float:
    vals = [v for s, v in zip(steps, values, strict=True) if lo <= s <= hi]
    return statistics.fmean(vals) if vals else math.nan


def _loss_near(loss: Sequence[float], step: int, width: int = 20) -> float:
    """Mean training loss over the ``width`` steps ending at ``step``."""
    part = loss[max(0, step - width + 1):step + 1]
    return statistics.fmean(part) if part else math.nan


def _spikes(loss: Sequence[float], start: int, end: int, window: int = 50
            ) -> dict[str, float]:
    """How non-monotone the loss is on ``[start, end]``.

    ``loss_rises``: the share of steps whose loss is above the previous step's;
    ``largest_spike``: the largest ``loss_t / min(loss over the previous window steps)``.
    """
    rises = [loss[t] > loss[t - 1] for t in range(max(1, start), end + 1)]
    spikes = [loss[t] / min(loss[t - window:t]) for t in range(max(window, start), end + 1)]
    return {"loss_rises": sum(rises) / len(rises) if rises else math.nan,
            "largest_spike": max(spikes, default=math.nan)}


def summarise_full_batch(run: FullBatchRun) -> None:
    """Fill ``run.plateau`` with the plateau, the cosines and the loss around it."""
    p = plateau(run.steps, run.ratio)
    if p["t_star"] is not None:
        t_star, start, end = p["t_star"], p["start"], p["end"]
        p["value_mean"] = _mean_between(run.steps, run.value, start, end)
        p["raw_at_t_star"] = _mean_between(run.steps, run.raw, t_star, t_star)
        p["raw_at_end"] = run.raw[-1] if run.raw else math.nan
        p["loss_at_start"] = _loss_near(run.loss, start)
        p["loss_at_end"] = _loss_near(run.loss, len(run.loss) - 1)
        p.update(_spikes(run.loss, start, len(run.loss) - 1))
        p["cos_before"] = {s: _mean_between(run.cos_steps, run.cosines[s], 0, t_star - 1)
                           for s in CONSECUTIVE}
        # A record's means cover the steps since the previous record: start from the
        # first record after the plateau's first measurement.
        p["cos_plateau"] = {s: _mean_between(run.cos_steps, run.cosines[s], start + 1,
                                             math.inf) for s in CONSECUTIVE}
    run.plateau = p


# -- part 2 -------------------------------------------------------------------------------


@dataclass
class PairRun:
    """The series of one part-2 run."""

    label: str
    optimizer: str
    lr: float
    seed: int
    rho_steps: list[int]
    rho: list[float]
    slope: list[float]
    cos_steps: list[int]
    cosines: dict[str, list[float]]
    ratio_steps: list[int]
    ratio: list[float]
    loss: list[float]
    guard: dict[str, list[int]]  # the log-only guard's detections: steps by kind/signal
    seconds: float


def pair_run(label: str, optimizer: str, lr: float, seed: int, mode: Mode) -> PairRun:
    """Train one part-2 run with the three monitors."""
    x, y, xv, yv = digits_data()
    pl.seed_everything(seed, verbose=False)
    module = Classifier(optimizer, lr)
    quality = StepQualityMonitor(every_n_steps=1)
    rho = Rows(("step_quality", "step_slope"))
    quality.subscribe(rho)
    monitor = StepSizeMonitor(logging_interval=MB_LOG, consecutive=True)
    cos = Rows(CONSECUTIVE)
    monitor.subscribe(cos)
    sharp = SharpnessMonitor(every_n_steps=MB_SHARP, batch=(xv[:MB_HELD_OUT], yv[:MB_HELD_OUT]),
                             raw_sharpness=False)
    curv = Rows(("stability_ratio",))
    sharp.subscribe(curv)
    losses = LossLog()
    data = Batches(make_batches(x, y, MB_BATCH, seed), shuffle_seed=seed)
    guard = log_only_guard()
    t0 = time.perf_counter()
    _fit(module, data, [quality, monitor, sharp, guard, losses], mode.mb_steps)
    seconds = time.perf_counter() - t0
    rho_steps, rhos = rho.series("step_quality")
    slope_steps, slopes = rho.series("step_slope")
    assert slope_steps == rho_steps
    cos_steps, _ = cos.series(CONSECUTIVE[0])
    ratio_steps, ratios = curv.series("stability_ratio")
    return PairRun(label=label, optimizer=optimizer, lr=lr, seed=seed,
                   rho_steps=rho_steps, rho=rhos, slope=slopes, cos_steps=cos_steps,
                   cosines={s: cos.series(s)[1] for s in CONSECUTIVE},
                   ratio_steps=ratio_steps, ratio=ratios, loss=losses.values(),
                   guard=guard_events(guard), seconds=seconds)


def _quantile(values: Sequence[float], q: float) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.quantile(finite, q)) if finite else math.nan


def summarise_pair(runs: Sequence[PairRun]) -> dict[str, Any]:
    """Pooled over seeds: ρ quantiles and shares, cosine means, stability ratio, loss."""
    rhos = [r for run in runs for r in run.rho]
    finite = [r for r in rhos if math.isfinite(r)]
    slopes = [s for run in runs for s in run.slope]
    n = max(1, len(rhos))
    out: dict[str, Any] = {
        "steps": len(rhos),
        "rho_median": _quantile(finite, 0.5),
        "rho_q25": _quantile(finite, 0.25),
        "rho_q75": _quantile(finite, 0.75),
        "rho_negative": sum(r < 0 for r in finite) / n,
        "not_descent": sum(s >= 0 for s in slopes) / n,
        "rho_nan": (len(rhos) - len(finite)) / n,
        "seed_rho_medians": [_quantile(run.rho, 0.5) for run in runs],
    }
    for stat in CONSECUTIVE:
        per_seed = [statistics.fmean(run.cosines[stat]) if run.cosines[stat] else math.nan
                    for run in runs]
        out[stat] = statistics.fmean(per_seed)
        out[f"seed_{stat}"] = per_seed
    # The first measurement (after step 0) is left out: Adam's v̂ rests on one gradient.
    ratios = [r for run in runs for s, r in zip(run.ratio_steps, run.ratio, strict=True)
              if s > 0 and math.isfinite(r)]
    out["stability_ratio_median"] = _quantile(ratios, 0.5)
    out["stability_ratio_max"] = max(ratios, default=math.nan)
    out["stability_ratio_above_1"] = (sum(r > 1 for r in ratios) / len(ratios)
                                      if ratios else math.nan)
    tail = [statistics.fmean(run.loss[-50:]) for run in runs if run.loss]
    out["final_loss"] = statistics.fmean(tail) if tail else math.nan
    out["seed_final_loss"] = tail
    out["seed_guard"] = [run.guard for run in runs]
    for name, lo, hi in (("early", 0, MB_EARLY), ("late", MB_EARLY + 1, math.inf)):
        part = {"rho_median": _quantile([r for run in runs for s, r in
                                         zip(run.rho_steps, run.rho, strict=True)
                                         if lo <= s <= hi], 0.5)}
        for stat in CONSECUTIVE:
            # A record covers the steps since the previous one: it belongs to the window
            # its index is in.
            vals = [v for run in runs for s, v in zip(run.cos_steps, run.cosines[stat],
                                                        strict=True) if lo <= s <= hi]
            part[stat] = statistics.fmean(vals) if vals else math.nan
        out[name] = part
    return out


# -- plots ----------------------------------------------------------------------------------


def _rolling(values: Sequence[float], width: int, how: str = "mean") -> np.ndarray:
    """Trailing rolling mean or median over ``width`` values (fewer at the start)."""
    arr = np.asarray(values, dtype=np.float64)
    out = np.empty_like(arr)
    for i in range(len(arr)):
        part = arr[max(0, i - width + 1):i + 1]
        part = part[np.isfinite(part)]
        out[i] = (np.median(part) if how == "median" else part.mean()) if part.size else np.nan
    return out


def _save(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")


COLORS = ("tab:blue", "tab:orange")


def plot_full_batch(runs: Sequence[FullBatchRun], path: Path) -> None:
    """Loss, (preconditioned) sharpness with the threshold, ratio and update cosine."""
    from matplotlib.figure import Figure

    groups = {"GD": [r for r in runs if r.label.startswith("GD")],
              "Adam": [r for r in runs if r.label.startswith("Adam")]}
    fig = Figure(figsize=(11, 11), layout="constrained")
    axes = fig.subplots(4, 2, sharex="col")
    for col, (name, group) in enumerate(groups.items()):
        for color, run in zip(COLORS, group, strict=False):
            ax = axes[0, col]
            ax.plot(range(len(run.loss)), run.loss, color=color, lw=1, label=run.label)
            ax = axes[1, col]
            ax.plot(run.steps, run.value, color=color, lw=1.2, label=run.label)
            ax.axhline(run.threshold, color=color, ls="--", lw=1,
                       label=f"{'2' if name == 'GD' else '38'}/η = {run.threshold:g}")
            ax = axes[2, col]
            ax.plot(run.steps, run.ratio, color=color, lw=1.2, label=run.label)
            p = run.plateau
            if p.get("t_star") is not None:
                ax.axvspan(p["start"], p["end"], color=color, alpha=0.08)
            ax = axes[3, col]
            ax.plot(run.cos_steps, run.cosines[CONSECUTIVE[0]], color=color, lw=1.2,
                    label=f"{run.label}: cos(Δ_t, Δ_t−1)")
            ax.plot(run.cos_steps, run.cosines[CONSECUTIVE[1]], color=color, lw=1,
                    ls=":", label=f"{run.label}: cos(g_t, Δ_t−1)")
        axes[0, col].set_title(f"full-batch {name}, MSE, seed "
                               f"{group[0].seed if group else 0}")
        axes[0, col].set_yscale("log")
        axes[0, col].set_ylabel("training loss")
        axes[1, col].set_yscale("log")
        axes[1, col].set_ylabel("sharpness λ_max(H)" if name == "GD"
                                else "preconditioned sharpness λ_max(P⁻¹H)")
        axes[2, col].axhspan(1 - TOLERANCE, 1 + TOLERANCE, color="grey", alpha=0.2,
                             label="1 ± 5 %")
        axes[2, col].set_ylim(0, 1.5)
        axes[2, col].set_ylabel("stability ratio (shaded: plateau)")
        axes[3, col].set_ylim(-1.05, 1.05)
        axes[3, col].set_ylabel("running mean of cosines")
        axes[3, col].set_xlabel("step")
        for row in range(4):
            axes[row, col].grid(alpha=0.3)
            axes[row, col].legend(fontsize=7, loc="lower right" if row == 3 else "best",
                                  framealpha=0.6)
    _save(fig, path)


def plot_pairs(runs: dict[str, tuple[PairRun, PairRun]], path: Path) -> None:
    """Per pair: loss, ρ, the two consecutive cosines and overshoot_frac over steps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 13), layout="constrained")
    axes = fig.subplots(5, len(runs), sharex="col", squeeze=False)
    width = MB_LOG
    for col, (name, pair) in enumerate(runs.items()):
        for color, run, kind in zip(COLORS, pair, ("healthy", "too high"), strict=True):
            label = f"{run.label} ({kind})"
            axes[0, col].plot(range(len(run.loss)), _rolling(run.loss, width), color=color,
                              lw=1.2, label=label)
            axes[1, col].scatter(run.rho_steps, run.rho, s=2, color=color, alpha=0.25)
            axes[1, col].plot(run.rho_steps, _rolling(run.rho, width, "median"), color=color,
                              lw=1.5, label=f"{label}, rolling median")
            for row, stat in zip((2, 3, 4), CONSECUTIVE, strict=True):
                axes[row, col].plot(run.cos_steps, run.cosines[stat], color=color, lw=1.2,
                                    marker="o", ms=3, label=label)
        seed = pair[0].seed
        axes[0, col].set_title(f"mini-batch {name}, batch {MB_BATCH}, seed {seed}")
        axes[0, col].set_ylabel(f"training loss (mean of {width} steps)")
        axes[0, col].set_yscale("log")
        axes[1, col].set_ylim(-1.0, 1.2)
        axes[1, col].axhline(0, color="k", lw=0.8)
        axes[1, col].set_ylabel("step quality ρ (every step)")
        labels = ("consecutive_update_cosine", "grad_update_cosine", "overshoot_frac")
        for row, lab in zip((2, 3, 4), labels, strict=True):
            axes[row, col].set_ylabel(f"{lab}\n(mean of {MB_LOG} steps)")
            axes[row, col].axhline(0.5 if lab == "overshoot_frac" else 0, color="k", lw=0.8)
            axes[row, col].set_ylim(-1.05, 1.05)
        axes[4, col].set_ylim(-0.02, 1.02)
        axes[4, col].set_xlabel("step")
        for row in range(5):
            axes[row, col].grid(alpha=0.3)
        axes[0, col].legend(fontsize=7)
        axes[1, col].legend(fontsize=7)
    _save(fig, path)


# -- output ----------------------------------------------------------------------------------


def _f(x: Any, digits: int = 2) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}"


def _g(x: Any) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "–"
    return f"{x:.3g}"


def guard_cell(events: dict[str, list[int]]) -> str:
    """``spike/grad_norm ×20 (steps 1066–1085)``, one entry per kind/signal; or ``none``."""
    if not events:
        return "none"
    return "; ".join(f"{k} ×{len(v)} (steps {v[0]}–{v[-1]})" if len(v) > 1 else
                     f"{k} ×1 (step {v[0]})" for k, v in sorted(events.items()))


def full_batch_verdict(by_label: dict[str, list[FullBatchRun]]) -> dict[str, dict[str, Any]]:
    """Per setting: the seeds' plateau means, their range, worst deviation, within 5 %."""
    out: dict[str, dict[str, Any]] = {}
    for label, runs in by_label.items():
        means = [r.plateau["mean"] for r in runs if r.plateau.get("t_star") is not None]
        reached = len(means) == len(runs)
        worst = max((abs(m - 1) for m in means), default=math.nan)
        out[label] = {"seeds": len(runs), "reached": sum(r.plateau.get("t_star") is not None
                                                          for r in runs),
                      "mean": statistics.fmean(means) if means else math.nan,
                      "min": min(means, default=math.nan), "max": max(means, default=math.nan),
                      "worst_deviation": worst,
                      "within_5pct": bool(reached and worst <= TOLERANCE)}
    return out


def markdown(mode_name: str, mode: Mode, by_label: dict[str, list[FullBatchRun]],
             verdict: dict[str, dict[str, Any]], pairs: dict[str, dict[str, Any]],
             images: list[str], wall: float) -> str:
    """The results page."""
    info = machine_info()
    flag = "" if mode_name == "full" else f" --{mode_name}"
    lines = [
        f"# Edge of stability and overshoot signals on digits ({mode_name})",
        "",
        f"{info['nproc']} cores ({info['cpu_model']}), torch {info['torch']}, "
        f"pytorch_lightning {info['pytorch_lightning']}, 1 torch thread. Wall time "
        f"{wall:.0f} s. Command: `.venv/bin/python benchmarks/edge_of_stability.py{flag}`. "
        f"Seeds {', '.join(map(str, mode.seeds))}. Plots: "
        + ", ".join(f"`{p}`" for p in images) + ". Explained in `docs/edge_of_stability.md`.",
        "",
        f"## 1. Full batch: the plateaus ({mode.fb_steps} steps, measured every "
        f"{mode.fb_every})",
        "",
        "Tanh MLP 64-64-64-10 in float32 on all 1,437 training images, MSE on one-hot "
        "targets, `SharpnessMonitor(every_n_steps="
        f"{mode.fb_every}, iters=20)` on that full batch. Ratio = sharpness / (2/η) for GD, "
        "preconditioned sharpness / (38/η) for Adam. *t\\** is the first measurement at "
        f"which the ratio reaches {REACHED} after having been below it; the plateau is the "
        f"last {PLATEAU_SHARE:.0%} of the measurements from t\\* to the end.",
        "",
        "**Per setting** (the seeds' plateau means):",
        "",
        "| setting | threshold | seeds reaching t* | plateau mean ratio | seeds' range "
        "| worst \\|mean − 1\\| | within 5 % |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, v in verdict.items():
        thr = by_label[label][0].threshold
        span = f"{_f(v['min'], 3)}–{_f(v['max'], 3)}" if v["reached"] else "–"
        lines.append(f"| {label} | {_g(thr)} | {v['reached']}/{v['seeds']} | {_f(v['mean'], 3)} "
                     f"| {span} | {_f(v['worst_deviation'], 3)} "
                     f"| {'yes' if v['within_5pct'] else 'no'} |")
    lines += [
        "",
        "**Per run**: plateau statistics of the ratio; the loss averaged over the 20 steps "
        "before the plateau's start and before the end (it still falls: the plateau is "
        "not a stall); from the plateau's start to the end, the share of steps whose loss "
        "rose and the largest loss_t / min(loss of the 50 steps before); Adam's raw "
        "sharpness λ_max(H) at t\\* and at the end.",
        "",
        "| run | t* | plateau steps | n | mean | sd | min | max | ±5 % | value / threshold "
        "| loss start → end | loss rises | largest spike | raw λ_max(H) t* → end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in by_label.items():
        for r in runs:
            p = r.plateau
            if p.get("t_star") is None:
                lines.append(f"| {label}, seed {r.seed} | not reached |" + " |" * 12)
                continue
            raw = (f"{_g(p['raw_at_t_star'])} → {_g(p['raw_at_end'])}"
                   if label.startswith("Adam") else "(= sharpness)")
            lines.append(
                f"| {label}, seed {r.seed} | {p['t_star']} | {p['start']}–{p['end']} "
                f"| {p['n']} | {_f(p['mean'], 3)} | {_f(p['sd'], 3)} | {_f(p['min'], 3)} "
                f"| {_f(p['max'], 3)} | {p['within']:.0%} | {_g(p['value_mean'])} / "
                f"{_g(r.threshold)} | {_g(p['loss_at_start'])} → {_g(p['loss_at_end'])} "
                f"| {p['loss_rises']:.0%} | {_f(p['largest_spike'], 1)}× | {raw} |")
    lines += [
        "",
        "**Consecutive-step cosines** (`StepSizeMonitor(consecutive=True, logging_interval="
        f"{mode.fb_every})`, the mean of its records) before t\\* and on the plateau. "
        "For GD, g_t = −Δ_t/η, so cos(g_t, Δ_t−1) = −cos(Δ_t, Δ_t−1) exactly.",
        "",
        "| run | cos(Δ_t, Δ_t−1) before → plateau | cos(g_t, Δ_t−1) before → plateau "
        "| overshoot_frac before → plateau |",
        "|---|---|---|---|",
    ]
    for label, runs in by_label.items():
        for r in runs:
            p = r.plateau
            if p.get("t_star") is None:
                continue
            cells = [f"{_f(p['cos_before'][s])} → {_f(p['cos_plateau'][s])}"
                     for s in CONSECUTIVE]
            lines.append(f"| {label}, seed {r.seed} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**The guard on these healthy runs**: a `DivergenceGuard` with its default "
        "detectors, every overshoot rule (the opt-in `overshoot_frac` one included) and "
        "every action set to `log` (training unchanged): what the guard would have acted "
        "on (spike → skip; divergence, non-finite → rollback; oscillation, update ratio, "
        "overshoot → cut). *ratio ≥ 1* is the first measurement at or above the threshold.",
        "",
        "| run | t* | ratio ≥ 1 | detections (kind/signal ×count, steps) |",
        "|---|---|---|---|",
    ]
    for label, runs in by_label.items():
        for r in runs:
            above = next((st for st, v in zip(r.steps[1:], r.ratio[1:], strict=True)
                          if v >= 1 and st >= (r.plateau.get("t_star") or 0)), None)
            t_star = r.plateau.get("t_star")
            lines.append(f"| {label}, seed {r.seed} | {'–' if t_star is None else t_star} "
                         f"| {'–' if above is None else above} | {guard_cell(r.guard)} |")
    lines += [
        "",
        f"## 2. Mini-batch: healthy vs too-high learning rate ({mode.mb_steps} steps)",
        "",
        f"ReLU MLP 64-64-64-10, cross-entropy, batch {MB_BATCH}. ρ from "
        "`StepQualityMonitor(every_n_steps=1)`, pooled over steps and seeds; the cosines "
        "and overshoot_frac are the mean of the `StepSizeMonitor(logging_interval="
        f"{MB_LOG}, consecutive=True)` records (per seed, then over seeds; seeds' range "
        "in brackets); the stability "
        f"ratio from `SharpnessMonitor(every_n_steps={MB_SHARP}, raw_sharpness=False)` on "
        f"a fixed held-out batch of {MB_HELD_OUT} (measurements after step 0); the final "
        "loss is the mean training loss of the last 50 steps.",
        "",
        "| run | median ρ [q25, q75] | ρ < 0 | g·Δ ≥ 0 | cos(Δ_t, Δ_t−1) "
        "| cos(g_t, Δ_t−1) | overshoot_frac | stability ratio median (max, > 1) "
        "| final loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in pairs.items():
        cells = []
        for stat in CONSECUTIVE:
            seeds = s[f"seed_{stat}"]
            cells.append(f"{_f(s[stat])} [{_f(min(seeds))}, {_f(max(seeds))}]")
        lines.append(
            f"| {label} | {_f(s['rho_median'])} [{_f(s['rho_q25'])}, {_f(s['rho_q75'])}] "
            f"| {s['rho_negative']:.0%} | {s['not_descent']:.0%} | " + " | ".join(cells)
            + f" | {_f(s['stability_ratio_median'])} ({_f(s['stability_ratio_max'])}, "
            f"{_f(100 * s['stability_ratio_above_1'], 0)} %) | {_g(s['final_loss'])} "
            f"[{', '.join(_g(v) for v in s['seed_final_loss'])}] |")
    lines += [
        "",
        f"**Early and late**: the same signals up to step {MB_EARLY} and after it (ρ: "
        "median of the steps; the others: mean of the records, pooled over seeds).",
        "",
        "| run | median ρ early → late | cos(Δ_t, Δ_t−1) early → late "
        "| cos(g_t, Δ_t−1) early → late | overshoot_frac early → late |",
        "|---|---|---|---|---|",
    ]
    for label, s in pairs.items():
        keys = ("rho_median", *CONSECUTIVE)
        lines.append(f"| {label} | " + " | ".join(
            f"{_f(s['early'][k])} → {_f(s['late'][k])}" for k in keys) + " |")
    lines += [
        "",
        "**The guard** (log-only, as in part 1) per seed:",
        "",
        "| run | " + " | ".join(f"seed {seed}" for seed in mode.seeds) + " |",
        "|---|" + "---|" * len(mode.seeds),
    ]
    for label, s in pairs.items():
        lines.append(f"| {label} | " + " | ".join(guard_cell(g) for g in s["seed_guard"])
                     + " |")
    lines.append("")
    return "\n".join(lines)


def _finite(x: Any) -> Any:
    """``x`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _series(run: FullBatchRun | PairRun) -> dict[str, Any]:
    """The run as JSON (the loss every 10th step)."""
    d = asdict(run)
    d["loss_every_10"] = d.pop("loss")[::10]
    return d


def main(argv: list[str] | None = None) -> int:
    """Run the experiment; write the results and the plots."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="one seed, shorter runs (~1 min)")
    group.add_argument("--smoke", action="store_true", help="tiny runs, for the tests")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory of the .md/.json")
    ap.add_argument("--img", type=Path, default=IMAGES, help="directory of the PNGs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    quiet()
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[name]
    suffix = "" if name == "full" else f"_{name}"
    t0 = time.perf_counter()

    by_label: dict[str, list[FullBatchRun]] = {}
    for label, opt, lr in FULL_BATCH:
        by_label[label] = []
        for seed in mode.seeds:
            run = full_batch_run(label, opt, lr, seed, mode)
            summarise_full_batch(run)
            by_label[label].append(run)
            p = run.plateau
            print(f"{label} seed {seed}: {run.seconds:.0f} s, t*={p.get('t_star')}, "
                  f"plateau mean {_f(p.get('mean'), 3)} ± {_f(p.get('sd'), 3)}", flush=True)
    verdict = full_batch_verdict(by_label)

    pair_runs: dict[str, list[PairRun]] = {}
    first: dict[str, tuple[PairRun, PairRun]] = {}
    for pair_name, healthy, too_high in PAIRS:
        made = []
        for label, opt, lr in (healthy, too_high):
            runs = [pair_run(label, opt, lr, seed, mode) for seed in mode.seeds]
            pair_runs[label] = runs
            made.append(runs[0])
            print(f"{runs[0].label}: {sum(r.seconds for r in runs):.0f} s", flush=True)
        first[pair_name] = (made[0], made[1])
    pairs = {label: summarise_pair(runs) for label, runs in pair_runs.items()}
    for label, s in pairs.items():
        print(f"{label}: median ρ {_f(s['rho_median'])}, ρ<0 {s['rho_negative']:.0%}, "
              + ", ".join(f"{k} {_f(s[k])}" for k in CONSECUTIVE), flush=True)

    args.img.mkdir(parents=True, exist_ok=True)
    eos_png = args.img / f"edge_of_stability{suffix}.png"
    pairs_png = args.img / f"overshoot_signals{suffix}.png"
    plot_full_batch([runs[0] for runs in by_label.values()], eos_png)
    plot_pairs(first, pairs_png)
    wall = time.perf_counter() - t0

    def shown(path: Path) -> str:
        try:
            return str(path.resolve().relative_to(ROOT))
        except ValueError:
            return str(path)

    images = [shown(eos_png), shown(pairs_png)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"edge_of_stability{suffix}.md").write_text(
        markdown(name, mode, by_label, verdict, pairs, images, wall))
    doc = {
        "machine": machine_info(),
        "config": {"mode": name, **asdict(mode), "reached": REACHED,
                   "plateau_share": PLATEAU_SHARE, "tolerance": TOLERANCE,
                   "full_batch": [list(c) for c in FULL_BATCH],
                   "pairs": [[n, list(h), list(t)] for n, h, t in PAIRS],
                   "mb_log": MB_LOG, "mb_sharp": MB_SHARP, "mb_held_out": MB_HELD_OUT,
                   "mb_batch": MB_BATCH, "dtype": "float32"},
        "wall_seconds": wall,
        "images": images,
        "full_batch": {"verdict": verdict,
                       "runs": {label: [_series(r) for r in runs]
                                for label, runs in by_label.items()}},
        "pairs": {"summary": pairs,
                  "runs": {label: [_series(r) for r in runs]
                           for label, runs in pair_runs.items()}},
    }
    (args.out / f"edge_of_stability{suffix}.json").write_text(
        json.dumps(_finite(doc), indent=1, allow_nan=False, default=str))
    print(f"wrote {args.out / f'edge_of_stability{suffix}.md'}, {eos_png}, {pairs_png} "
          f"in {wall:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
