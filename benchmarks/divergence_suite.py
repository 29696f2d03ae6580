"""Detection and recovery: DivergenceGuard against Lightning's callbacks and published rules.

Grid: tasks × optimizers × learning rates (tuned, ×10, ×100, ×1000) × seeds × policies.
Every run is a real Lightning ``Trainer.fit`` of ``--steps`` optimizer steps on the CPU
(one thread per run, a process pool of ``--workers``). The tuned learning rate of each
task × optimizer is the best of a half-decade sweep (1e-4 … 1) on seed 0 without any
policy, by final validation metric.

Policies:

* ``none`` — no callback (the reference trajectory; defines the blow-up step).
* ``early_stop`` — Lightning ``EarlyStopping(monitor="train_loss", check_finite=True,
  divergence_threshold=3 × initial loss, check_on_train_epoch_end=True)`` on the epoch
  mean of the training loss; ``patience`` is effectively infinite so that it acts only as
  a divergence check (its plateau stopping would otherwise end healthy runs).
* ``lightning_spike`` — Lightning's ``SpikeDetection`` with its defaults (raises
  ``TrainingSpikeException``: the run ends there).
* ``plateau`` — ``ReduceLROnPlateau(factor=0.1, patience=2)`` on the epoch mean of the
  training loss (interval ``"epoch"``).
* ``olmo_skip`` — reimplementation of the published rule of OLMo-core's skip-step
  optimizer: skip the step when loss or grad norm > mean + 6σ of the previous 128 values,
  active once 64 values are in the window; NaN is not filtered (as published).
* ``foundry_kill`` — reimplementation of the published rule of llm-foundry's
  ``KillLossSpike``: loss ≥ 2× the window mean for more than 4 consecutive steps, or half
  the window above the loss cap (10); window = max(100, 5 % of the run); action: stop.
* ``guard`` — ``DivergenceGuard()`` defaults (rollback on divergence/non-finite).
* ``guard_cut`` — ``on_divergence="cut", on_nonfinite="cut"``.
* ``guard_skip`` — every ``on_*="skip"``.
* ``guard_monitor`` — ``StepSizeMonitor()`` + ``DivergenceGuard()`` as in the README (the
  monitor records every ``log_every_n_steps`` = 10 steps and feeds the oscillation and
  update-ratio detectors).
* ``guard_overshoot`` — ``guard_monitor`` with the overshoot signals of the default
  overshoot rules: ``StepQualityMonitor(5)`` (ρ every 5 steps) and
  ``SharpnessMonitor(10, iters=10)`` (stability ratio every 10 steps, on the first batch).
* ``guard_overshoot_all`` — ``guard_overshoot`` plus the opt-in g·Δ rule:
  ``StepSizeMonitor(consecutive=True)`` and
  ``DivergenceGuard(overshoot_rules=("step_quality", "overshoot_frac", "stability_ratio"))``.

Usage::

    .venv/bin/python benchmarks/divergence_suite.py            # full grid
    .venv/bin/python benchmarks/divergence_suite.py --quick    # subset, < 2 min
    .venv/bin/python benchmarks/divergence_suite.py --smoke --out /tmp/x   # for the tests

Outputs (``--out``, default ``benchmarks/results``): ``divergence[_quick|_smoke].json``
(config, tuned LRs, every run, summaries), ``.csv`` (one row per run) and ``.md`` (tables).
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import RESULTS, TASKS, Batches, Task, machine_info, make_batches, median, quiet

OPTIMIZERS = ("adam", "adamw", "rmsprop", "adagrad", "sgd")
LR_MULTS = (1, 10, 100, 1000)
SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
POLICIES = ("none", "early_stop", "lightning_spike", "plateau", "olmo_skip", "foundry_kill",
            "guard", "guard_cut", "guard_skip", "guard_monitor", "guard_overshoot",
            "guard_overshoot_all")
BLOWUP_FACTOR = 3.0
WITHIN = 0.10


# -- optimizers and module -----------------------------------------------------------------


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float
                   ) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")


def _module_class() -> type:
    import pytorch_lightning as pl

    class TaskModule(pl.LightningModule):
        def __init__(self, task: Task, optimizer: str, lr: float, plateau: bool) -> None:
            super().__init__()
            self.task = task
            self.net = task.make_model()
            self.opt_name = optimizer
            self.lr = lr
            self.plateau = plateau

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = self.task.loss_fn(self.net(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> Any:
            opt = make_optimizer(self.opt_name, self.parameters(), self.lr)
            if not self.plateau:
                return opt
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=2)
            return {"optimizer": opt, "lr_scheduler": {
                "scheduler": sched, "monitor": "train_loss", "interval": "epoch"}}

    return TaskModule


# -- callbacks -------------------------------------------------------------------------------


def _callbacks() -> dict[str, type]:
    import pytorch_lightning as pl

    class Probe(pl.Callback):
        """Per-step loss (of the batch, before the step) and the first group's LR."""

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.lrs: list[float] = []

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss.detach()))
            self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))

    class OlmoSkipStep(pl.Callback):
        """Reimplementation of the published rule of OLMo-core's skip-step optimizer.

        Skip the optimizer step when the loss or the gradient norm exceeds mean + 6σ of
        the previous 128 values; active once 64 values are held. Every value enters the
        window, skipped or not. NaN is not filtered: NaN > x is False, so a NaN step is
        applied (as in the published rule, where the update is multiplied by 0 and
        0 × NaN = NaN).
        """

        def __init__(self, window: int = 128, sigma: float = 6.0) -> None:
            self.window = window
            self.sigma = sigma
            self.losses: collections.deque[float] = collections.deque(maxlen=window)
            self.norms: collections.deque[float] = collections.deque(maxlen=window)
            self.skipped: list[int] = []
            self._loss = math.nan

        def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               loss: torch.Tensor) -> None:
            self._loss = float(loss.detach())

        def _outlier(self, hist: collections.deque[float], value: float) -> bool:
            if len(hist) < max(2, self.window // 2):
                return False
            std, mean = torch.std_mean(torch.tensor(list(hist), dtype=torch.float64))
            return bool(value > float(mean) + self.sigma * float(std))

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                     optimizer: torch.optim.Optimizer) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack(
                torch._foreach_norm(grads)))) if grads else 0.0  # type: ignore[arg-type]
            skip = self._outlier(self.losses, self._loss) or self._outlier(self.norms, norm)
            self.losses.append(self._loss)
            self.norms.append(norm)
            if skip:
                self.skipped.append(trainer.global_step)
                for p in pl_module.parameters():
                    p.grad = None  # torch optimizers leave grad-less params untouched

    class KillLossSpike(pl.Callback):
        """Reimplementation of the published rule of llm-foundry's ``KillLossSpike``.

        Once the window (max(100, 5 % of max_steps) losses) is full: a loss ≥ 2× the
        window mean for more than ``patience`` (4) consecutive steps is a spike; half of
        the window above ``loss_cap`` (10) is a high-loss run. Either stops training
        (``log_only=False``).
        """

        def __init__(self, patience: int = 4, outlier_multiplier: float = 2.0,
                     window_size: int = 100, loss_cap: float = 10.0) -> None:
            self.patience = patience
            self.mult = outlier_multiplier
            self.window_size = window_size
            self.loss_cap = loss_cap
            self.window: collections.deque[float] = collections.deque()
            self.counter = 0
            self.stopped_at: int | None = None

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.window_size = max(self.window_size, round(trainer.max_steps * 0.05))
            self.window = collections.deque(maxlen=self.window_size)

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = float((outputs["loss"] if isinstance(outputs, dict) else outputs).detach())
            if len(self.window) == self.window_size:
                avg = sum(self.window) / len(self.window)
                spike = False
                if loss >= avg * self.mult:
                    self.counter += 1
                    spike = self.counter > self.patience
                elif self.counter > 0:
                    self.counter = 0
                high = sum(v > self.loss_cap for v in self.window) >= self.window_size / 2
                if (spike or high) and self.stopped_at is None:
                    self.stopped_at = trainer.global_step - 1
                    trainer.should_stop = True
            self.window.append(loss)

    return {"Probe": Probe, "OlmoSkipStep": OlmoSkipStep, "KillLossSpike": KillLossSpike}


# -- one run ----------------------------------------------------------------------------------


@dataclass
class RunSpec:
    task: str
    optimizer: str
    lr: float
    lr_mult: float
    seed: int
    policy: str
    steps: int
    phase: str = "grid"


@dataclass
class RunResult:
    spec: RunSpec
    steps_run: int
    init_loss: float
    final_train_loss: float
    metric: float | None
    blowup_step: int | None
    interventions: list[tuple[int, str]] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)  # kind/signal of each guard intervention
    stopped: bool = False
    wall_s: float = 0.0
    error: str | None = None


_DATA: dict[str, Any] = {}


def _data(task: Task) -> Any:
    if task.name not in _DATA:
        _DATA[task.name] = task.data()
    return _DATA[task.name]


def blowup_step(losses: list[float], init: float) -> int | None:
    """First step whose loss is non-finite or above ``BLOWUP_FACTOR`` × the initial loss."""
    for i, v in enumerate(losses):
        if not math.isfinite(v) or v > BLOWUP_FACTOR * init:
            return i
    return None


def run_one(spec: RunSpec) -> RunResult:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping

    from lr_monitor import DivergenceGuard, StepSizeMonitor

    torch.set_num_threads(1)
    quiet()
    t0 = time.perf_counter()
    task = TASKS[spec.task]
    xtr, ytr, xva, yva = _data(task)
    train = Batches(make_batches(xtr, ytr, task.batch_size, spec.seed), shuffle_seed=spec.seed)
    torch.manual_seed(spec.seed)
    module = _module_class()(task, spec.optimizer, spec.lr, plateau=spec.policy == "plateau")
    cbs = _callbacks()
    probe = cbs["Probe"]()
    callbacks: list[Any] = [probe]
    guard: Any = None
    extra: Any = None
    p = spec.policy
    if p == "early_stop":
        extra = EarlyStopping(monitor="train_loss", mode="min", check_finite=True,
                              divergence_threshold=BLOWUP_FACTOR * task.init_loss,
                              patience=10**9, check_on_train_epoch_end=True)
    elif p == "lightning_spike":
        from pytorch_lightning.callbacks.spike import SpikeDetection

        extra = SpikeDetection()
    elif p == "olmo_skip":
        extra = cbs["OlmoSkipStep"]()
    elif p == "foundry_kill":
        extra = cbs["KillLossSpike"]()
    elif p.startswith("guard"):
        kw: dict[str, Any] = {}
        if p.startswith("guard:"):  # guard:explosion_factor=4,divergence_patience=10
            for item in p.split(":", 1)[1].split(","):
                k, v = item.split("=")
                kw[k] = int(v) if v.isdigit() else float(v)
        elif p == "guard_cut":
            kw = {"on_divergence": "cut", "on_nonfinite": "cut"}
        elif p == "guard_skip":
            kw = {f"on_{k}": "skip" for k in ("nonfinite", "spike", "divergence",
                                               "oscillation", "update_ratio")}
        elif p == "guard_overshoot_all":
            kw = {"overshoot_rules": ("step_quality", "overshoot_frac", "stability_ratio")}
        guard = DivergenceGuard(log_events=False, jsonl=False, **kw)
        if p == "guard_monitor":
            callbacks.append(StepSizeMonitor(custom_scalars=False))
        elif p.startswith("guard_overshoot"):
            from lr_monitor import SharpnessMonitor, StepQualityMonitor

            callbacks += [StepSizeMonitor(custom_scalars=False, consecutive=p.endswith("all")),
                          StepQualityMonitor(5),
                          SharpnessMonitor(10, iters=10, raw_sharpness=False)]
        callbacks.append(guard)
    elif p not in ("none", "plateau"):
        raise ValueError(f"unknown policy {p!r}")
    if extra is not None:
        callbacks.append(extra)
    error = None
    stopped = False
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=spec.steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
            devices=1, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10,
            default_root_dir=tmp, callbacks=callbacks)
        try:
            trainer.fit(module, train_dataloaders=train)
        except Exception as e:  # SpikeDetection ends the run by raising
            if type(e).__name__ != "TrainingSpikeException":
                error = f"{type(e).__name__}: {e}"
            stopped = True
    steps_run = len(probe.losses)
    stopped = stopped or steps_run < spec.steps
    interventions: list[tuple[int, str]] = []
    causes: list[str] = []
    if guard is not None:
        acted = [e for e in guard.events if set(e.actions) - {"log"}]
        interventions = [(e.step, "+".join(e.actions)) for e in acted]
        causes = [f"{e.kind}/{e.signal}" for e in acted]
    elif p == "olmo_skip":
        interventions = [(s, "skip") for s in extra.skipped]
    elif p == "plateau":
        interventions = [(i, "cut_lr") for i in range(1, steps_run)
                         if probe.lrs[i] < probe.lrs[i - 1]]
    if stopped and not any("stop" in a for _, a in interventions):
        interventions.append((max(steps_run - 1, 0), "stop"))
    module.net.eval()
    with torch.no_grad():
        metric: float | None = task.eval_fn(module.net(xva), yva)
    if metric is not None and not math.isfinite(metric):
        metric = None
    init = probe.losses[0] if probe.losses else math.nan
    tail = probe.losses[-10:]
    return RunResult(
        spec=spec, steps_run=steps_run, init_loss=init,
        final_train_loss=sum(tail) / len(tail) if tail else math.nan,
        metric=metric, blowup_step=blowup_step(probe.losses, init),
        interventions=interventions, causes=causes, stopped=stopped,
        wall_s=time.perf_counter() - t0, error=error)


def _init_worker() -> None:
    torch.set_num_threads(1)
    quiet()


def run_many(specs: list[RunSpec], workers: int, label: str) -> list[RunResult]:
    t0 = time.perf_counter()
    out: list[RunResult] = []
    # Longest runs first so that the pool drains evenly.
    order = sorted(specs, key=lambda s: (s.task != "markov_lm", s.task != "digits_cnn"))
    if workers <= 1:
        for s in order:
            out.append(run_one(s))
    else:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            for i, r in enumerate(pool.imap_unordered(run_one, order, chunksize=2), 1):
                out.append(r)
                if i % 200 == 0:
                    print(f"  {label}: {i}/{len(order)} runs, {time.perf_counter() - t0:.0f} s",
                          flush=True)
    print(f"{label}: {len(out)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


# -- analysis ---------------------------------------------------------------------------------


def better_or_within(task: Task, metric: float | None, ref: float | None) -> bool:
    """``metric`` is no worse than ``ref`` by more than ``WITHIN`` (relative)."""
    if metric is None or ref is None:
        return False
    if task.higher_is_better:
        return metric >= ref - WITHIN * abs(ref)
    return metric <= ref + WITHIN * abs(ref)


def pick_tuned(sweep: list[RunResult]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for r in sweep:
        task = TASKS[r.spec.task]
        key = f"{r.spec.task}/{r.spec.optimizer}"
        if r.metric is None:
            continue
        score = r.metric if task.higher_is_better else -r.metric
        if key not in best or score > best[key]["score"]:
            best[key] = {"lr": r.spec.lr, "metric": r.metric, "score": score}
    table: dict[str, dict[str, Any]] = {}
    for r in sorted(sweep, key=lambda r: r.spec.lr):
        key = f"{r.spec.task}/{r.spec.optimizer}"
        table.setdefault(key, {"lr": best[key]["lr"], "metric": best[key]["metric"],
                               "sweep": {}})["sweep"][f"{r.spec.lr:g}"] = r.metric
    return table


def summarize(runs: list[RunResult], policies: list[str]) -> dict[str, Any]:
    ref: dict[tuple[str, str, float, int], RunResult] = {}
    for r in runs:
        if r.spec.policy == "none":
            ref[(r.spec.task, r.spec.optimizer, r.spec.lr_mult, r.spec.seed)] = r
    out: dict[str, Any] = {}
    for pol in policies:
        rows = [r for r in runs if r.spec.policy == pol]
        tuned = [r for r in rows if r.spec.lr_mult == 1]
        false = [r for r in tuned if r.interventions]
        high = [r for r in rows if r.spec.lr_mult > 1]
        s: dict[str, Any] = {
            "runs": len(rows),
            "tuned_runs": len(tuned),
            "false_intervention_runs": len(false),
            "false_interventions": sum(len(r.interventions) for r in false),
            "false_causes": dict(collections.Counter(c for r in false for c in r.causes)),
        }
        failing, detected, delays, never_blow_fail = 0, 0, [], 0
        per_mult: dict[str, dict[str, Any]] = {}
        for r in high:
            key = (r.spec.task, r.spec.optimizer, r.spec.lr_mult, r.spec.seed)
            base = ref.get(key)
            tref = ref.get((r.spec.task, r.spec.optimizer, 1, r.spec.seed))
            task = TASKS[r.spec.task]
            if base is None or tref is None:
                continue
            ok_base = better_or_within(task, base.metric, tref.metric)
            fails = base.blowup_step is not None or not ok_base
            ok = better_or_within(task, r.metric, tref.metric)
            m = per_mult.setdefault(f"x{r.spec.lr_mult:g}", {"runs": 0, "within_10pct": 0,
                                                            "failing_unguarded": 0,
                                                            "detected": 0})
            m["runs"] += 1
            m["within_10pct"] += ok
            if fails:
                failing += 1
                m["failing_unguarded"] += 1
                if base.blowup_step is None:
                    never_blow_fail += 1
                if r.interventions:
                    detected += 1
                    m["detected"] += 1
                    if base.blowup_step is not None:
                        delays.append(r.interventions[0][0] - base.blowup_step)
        for m in per_mult.values():
            m["within_10pct_share"] = m["within_10pct"] / m["runs"] if m["runs"] else math.nan
            m["detected_share"] = (m["detected"] / m["failing_unguarded"]
                                   if m["failing_unguarded"] else math.nan)
        s.update({
            "too_high_runs": len(high),
            "failing_unguarded": failing,
            "failing_without_blowup": never_blow_fail,
            "detected": detected,
            "detected_share": detected / failing if failing else math.nan,
            "median_steps_blowup_to_detection": median([float(d) for d in delays]),
            "per_mult": per_mult,
        })
        out[pol] = s
    return out


def metric_table(runs: list[RunResult], policies: list[str]) -> dict[str, dict[str, float]]:
    """Median final metric per task × LR multiplier (rows) and policy (columns).

    Diverged runs (non-finite metric) count as the worst value: 0 accuracy, +inf MSE.
    """
    cells: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        task = TASKS[r.spec.task]
        v = r.metric
        if v is None:
            v = 0.0 if task.higher_is_better else math.inf
        row = f"{r.spec.task} x{r.spec.lr_mult:g}"
        cells.setdefault(row, {}).setdefault(r.spec.policy, []).append(v)
    return {row: {p: median(cells[row].get(p, [])) for p in policies} for row in cells}


def guard_events(runs: list[RunResult]) -> dict[str, dict[str, int]]:
    """Count of guard actions by LR multiplier (to judge the defaults)."""
    out: dict[str, dict[str, int]] = {}
    for r in runs:
        if not r.spec.policy.startswith("guard"):
            continue
        key = f"{r.spec.policy} x{r.spec.lr_mult:g}"
        c = out.setdefault(key, {})
        for _, a in r.interventions:
            c[a] = c.get(a, 0) + 1
    return out


# -- output -----------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}g}"
    return str(v)


def _row_md(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(doc: dict[str, Any]) -> str:
    pols: list[str] = doc["config"]["policies"]
    summ = doc["summary"]
    lines = [f"# Divergence suite ({doc['config']['mode']})", "",
             f"{doc['config']['n_runs']} runs, {doc['config']['steps']} steps each, "
             f"wall {doc['wall_s']:.0f} s on {doc['machine']['nproc']} cores "
             f"({doc['machine']['cpu_model']}).", "",
             "## Tuned learning rates (best of the sweep, seed 0)", "",
             "| task/optimizer | tuned lr | val metric |", "|---|---|---|"]
    for k, v in doc["tuned"].items():
        lines.append(f"| {k} | {v['lr']:g} | {_fmt(v['metric'])} |")
    mults = sorted({k for s in summ.values() for k in s["per_mult"]},
                   key=lambda s: float(s[1:]))
    lines += ["", "## Detection and recovery per policy", "",
              "false = tuned runs with any intervention; detected = share of too-high-LR "
              "runs that fail without a policy (blow-up or >10 % worse) in which the policy "
              "intervened; delay = median steps from the unguarded blow-up to the first "
              "intervention (negative: before); within 10 % = share of runs ending within "
              "10 % of the tuned run's validation metric.", "",
              _row_md(["policy", "false (runs/tuned)", "false: causes", "detected", "delay",
                       *(f"within 10% {m}" for m in mults)]),
              _row_md(["---"] * (5 + len(mults)))]
    for p in pols:
        s = summ[p]
        within = [_fmt(s["per_mult"].get(m, {}).get("within_10pct_share"), 2) for m in mults]
        causes = ", ".join(f"{k} ×{v}" for k, v in sorted(s.get("false_causes", {}).items()))
        lines.append(_row_md([
            p, f"{s['false_intervention_runs']}/{s['tuned_runs']}", causes or "–",
            f"{s['detected']}/{s['failing_unguarded']} ({_fmt(s['detected_share'], 2)})",
            _fmt(s["median_steps_blowup_to_detection"]), *within]))
    fail = summ.get("none", {})
    if fail:
        lines += ["", f"Unguarded too-high-LR runs that fail: {fail['failing_unguarded']} of "
                  f"{fail['too_high_runs']}, of which {fail['failing_without_blowup']} never "
                  f"blow up (loss stays below {BLOWUP_FACTOR:g}× its initial value) but end "
                  "more than 10 % worse than the tuned run."]
    lines += ["", "## Median final validation metric (accuracy ↑, diabetes MSE ↓; a diverged "
              "run counts as 0 / inf)", "",
              "| task × lr | " + " | ".join(pols) + " |", "|---|" + "---|" * len(pols)]
    for row, vals in doc["metric_table"].items():
        lines.append(f"| {row} | " + " | ".join(_fmt(vals[p]) for p in pols) + " |")
    lines += ["", "## Guard actions (count of events by action)", "",
              "| policy × lr | actions |", "|---|---|"]
    for k, c in sorted(doc["guard_events"].items()):
        lines.append(f"| {k} | " + ", ".join(f"{a}: {n}" for a, n in sorted(c.items())) + " |")
    return "\n".join(lines) + "\n"


def _row(r: RunResult) -> dict[str, Any]:
    d = asdict(r.spec)
    d.update({k: v for k, v in asdict(r).items() if k != "spec"})
    d["first_intervention"] = r.interventions[0][0] if r.interventions else None
    d["n_interventions"] = len(r.interventions)
    d["interventions"] = ";".join(f"{s}:{a}" for s, a in r.interventions)
    d["causes"] = ";".join(r.causes)
    return d


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write(doc: dict[str, Any], runs: list[RunResult], out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.csv", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(_clean(doc), indent=1, allow_nan=False))
    rows = [_row(r) for r in runs]
    with paths[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths[2].write_text(markdown(doc))
    return paths


# -- main ---------------------------------------------------------------------------------------


@dataclass
class Mode:
    tasks: tuple[str, ...]
    optimizers: tuple[str, ...]
    mults: tuple[int, ...]
    seeds: tuple[int, ...]
    policies: tuple[str, ...]
    sweep: tuple[float, ...]
    steps: int


MODES: dict[str, Mode] = {
    "full": Mode(tuple(TASKS), OPTIMIZERS, LR_MULTS, (0, 1, 2), POLICIES, SWEEP, 150),
    "quick": Mode(("digits_mlp", "diabetes"), ("adam", "sgd"), LR_MULTS, (0,), POLICIES,
                  (1e-3, 1e-2, 1e-1), 200),
    "smoke": Mode(("digits_mlp",), ("adam",), (1, 100), (0,), ("none", "olmo_skip", "guard"),
                  (1e-3, 1e-2), 60),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="subset, < 2 minutes")
    g.add_argument("--smoke", action="store_true", help="tiny subset for the tests")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    ap.add_argument("--workers", type=int, default=None,
                    help="process pool size (default 2; 1 = in-process for --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="override steps per run")
    ap.add_argument("--seeds", type=int, default=None, help="override number of seeds")
    ap.add_argument("--mults", default=None,
                    help="comma list overriding the LR multipliers (e.g. '1' for healthy runs)")
    ap.add_argument("--tuned-from", type=Path, default=None,
                    help="take the tuned LRs from this results JSON instead of sweeping")
    ap.add_argument("--tasks", default=None, help="comma list overriding the mode's tasks")
    ap.add_argument("--policies", default=None,
                    help="semicolon list overriding the mode's policies; 'guard:k=v,k=v' "
                         "is a DivergenceGuard with those arguments")
    ap.add_argument("--stem", default=None, help="output file name stem")
    args = ap.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[name]
    if args.tasks:
        mode.tasks = tuple(args.tasks.split(","))
    if args.policies:
        mode.policies = tuple(args.policies.split(";"))
    if args.mults:
        mode.mults = tuple(int(m) for m in args.mults.split(","))
    steps = args.steps or mode.steps
    workers = args.workers or (1 if name == "smoke" else 2)
    seeds = tuple(range(args.seeds)) if args.seeds else mode.seeds
    torch.set_num_threads(1)
    quiet()
    t0 = time.perf_counter()
    sweep_specs = [RunSpec(t, o, lr, 0, 0, "none", steps, "sweep")
                   for t in mode.tasks for o in mode.optimizers for lr in mode.sweep]
    if args.tuned_from is not None:
        sweep_specs = []
        tuned = json.loads(args.tuned_from.read_text())["tuned"]
    else:
        tuned = pick_tuned(run_many(sweep_specs, workers, "sweep"))
    specs = [RunSpec(t, o, tuned[f"{t}/{o}"]["lr"] * m, m, s, p, steps)
             for t in mode.tasks for o in mode.optimizers for m in mode.mults
             for s in seeds for p in mode.policies]
    runs = run_many(specs, workers, "grid")
    runs.sort(key=lambda r: (r.spec.task, r.spec.optimizer, r.spec.lr_mult, r.spec.seed,
                             mode.policies.index(r.spec.policy)))
    errors = [r for r in runs if r.error]
    for r in errors[:5]:
        print(f"error in {r.spec}: {r.error}", file=sys.stderr)
    pols = list(mode.policies)
    doc = {
        "config": {"mode": name, "tasks": list(mode.tasks), "optimizers": list(mode.optimizers),
                   "lr_mults": list(mode.mults), "seeds": list(seeds), "policies": pols,
                   "sweep": list(mode.sweep), "steps": steps, "workers": workers,
                   "blowup_factor": BLOWUP_FACTOR, "within": WITHIN, "n_runs": len(runs),
                   "n_sweep_runs": len(sweep_specs), "errors": len(errors),
                   "command": " ".join([".venv/bin/python", "benchmarks/divergence_suite.py",
                                        *(argv if argv is not None else sys.argv[1:])])},
        "machine": machine_info(),
        "tuned": {k: {"lr": v["lr"], "metric": v["metric"], "sweep": v["sweep"]}
                  for k, v in tuned.items()},
        "summary": summarize(runs, pols),
        "metric_table": metric_table(runs, pols),
        "guard_events": guard_events(runs),
        "wall_s": time.perf_counter() - t0,
        "runs": [_row(r) for r in runs],
    }
    stem = args.stem or ("divergence" if name == "full" else f"divergence_{name}")
    for p in write(doc, runs, args.out, stem):
        print(f"wrote {p}")
    print(markdown(doc).split("## Median")[0])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
