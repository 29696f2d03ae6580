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
import dataclasses
import functools
import inspect
import json
import math
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import (
    RESULTS,
    TASKS,
    Batches,
    Task,
    machine_info,
    make_batches,
    median,
    quantile,
    quiet,
)

OPTIMIZERS = ("adam", "adamw", "rmsprop", "adagrad", "sgd")
LR_MULTS = (1, 10, 100, 1000)
SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
POLICIES = ("none", "early_stop", "lightning_spike", "plateau", "olmo_skip", "foundry_kill",
            "guard", "guard_cut", "guard_skip", "guard_monitor", "guard_overshoot",
            "guard_overshoot_all")
BLOWUP_FACTOR = 3.0
WITHIN = 0.10


# -- optimizers and module -----------------------------------------------------------------


#: Optimizer class and its constructor arguments besides ``lr`` (a parameter group's own
#: ``weight_decay`` overrides AdamW's 0.01).
_OPTIMIZER_ARGS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.01}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
}


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter] | list[dict[str, Any]],
                   lr: float) -> torch.optim.Optimizer:
    """The grid's optimizer ``name`` over ``params`` (tensors or parameter groups).

    Parameter groups keep their own keys (e.g. ``weight_decay``) where the optimizer's
    constructor takes that argument; keys it does not take are dropped, so one
    :attr:`Task.param_groups` serves every optimizer of the grid.

    Args:
        name: One of :data:`OPTIMIZERS`.
        params: Parameters, or parameter-group dicts with a ``"params"`` key.
        lr: Learning rate.

    Returns:
        The optimizer.

    Raises:
        ValueError: If ``name`` is unknown.
    """
    if name not in _OPTIMIZER_ARGS:
        raise ValueError(f"unknown optimizer {name!r}")
    cls, kwargs = _OPTIMIZER_ARGS[name]
    items: list[Any] = list(params)
    if items and isinstance(items[0], dict):
        takes = set(inspect.signature(cls).parameters) | {"params"}
        items = [{k: v for k, v in group.items() if k in takes} for group in items]
    factory: Callable[..., torch.optim.Optimizer] = cls
    return factory(items, lr=lr, **kwargs)


def _module_class() -> type:
    import pytorch_lightning as pl

    class TaskModule(pl.LightningModule):
        def __init__(self, task: Task, optimizer: str, lr: float, plateau: bool) -> None:
            super().__init__()
            self.task = task
            self.net = task.make_model()
            if task.dtype != torch.float32:
                self.net.to(task.dtype)
            self.opt_name = optimizer
            self.lr = lr
            self.plateau = plateau

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = self.task.loss_fn(self.net(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> Any:
            params: Any = (self.task.param_groups(self.net) if self.task.param_groups
                           else self.parameters())
            opt = make_optimizer(self.opt_name, params, self.lr)
            if self.task.lr_lambda is not None:
                if self.plateau:
                    raise ValueError(f"task {self.task.name} has its own LR schedule; the "
                                     "plateau policy would fight it")
                lr_lambda: Callable[..., float] = self.task.lr_lambda
                schedule = functools.partial(lr_lambda, total_steps=self.trainer.max_steps)
                warmup = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
                return {"optimizer": opt, "lr_scheduler": {
                    "scheduler": warmup, "interval": "step", "frequency": 1}}
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


def parse_value(text: str) -> Any:
    """A policy argument's value: int, float, bool, None, a tuple, or else the string.

    ``true``/``false`` (any case) are bools, ``none`` is None, ``a|b|c`` is a tuple of
    parsed values (e.g. ``overshoot_rules=step_quality|stability_ratio``; ``|`` alone is
    the empty tuple), numbers parse as int when they can and as float otherwise (``1e-3``,
    ``inf``); anything else is the string itself (``reads=deferred``).

    Args:
        text: The value as written after ``=``.

    Returns:
        The parsed value.
    """
    text = text.strip()
    if "|" in text:
        return tuple(parse_value(v) for v in text.split("|") if v.strip())
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_guard_kwargs(text: str) -> dict[str, Any]:
    """``k=v,k=v`` (the part of a ``guard:…`` policy after the colon) as keyword arguments.

    Args:
        text: Comma-separated ``name=value`` items; values as in :func:`parse_value`.

    Returns:
        The keyword arguments of ``DivergenceGuard``.

    Raises:
        ValueError: If an item has no ``=``, an empty name, or a name given twice.
    """
    kwargs: dict[str, Any] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"policy argument {item!r} is not name=value")
        if name in kwargs:
            raise ValueError(f"policy argument {name!r} given twice")
        kwargs[name] = parse_value(value)
    return kwargs


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
    # Tuned-LR (×1) runs only: what the training loss did around each intervention.
    healthy_actions: list[dict[str, Any]] = field(default_factory=list)


#: Steps on each side of an intervention averaged for ``RunResult.healthy_actions``.
CONTEXT_STEPS = 20


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def action_context(losses: list[float], lrs: list[float], interventions: list[tuple[int, str]],
                   causes: list[str]) -> list[dict[str, Any]]:
    """Each intervention with the mean training loss just before and after it.

    Args:
        losses: Per-step training loss (``Probe.losses``, step ``i`` at index ``i``).
        lrs: Per-step learning rate of the first parameter group.
        interventions: ``(step, action)`` pairs.
        causes: ``kind/signal`` of each intervention (may be shorter: peers have none).

    Returns:
        One dict per intervention: step, action, cause, loss_before / loss_after (means
        over ``CONTEXT_STEPS`` steps), the LR at the step and at the end of the run.
    """
    out = []
    for i, (step, action) in enumerate(interventions):
        out.append({
            "step": step, "action": action, "cause": causes[i] if i < len(causes) else None,
            "loss_before": _mean(losses[max(0, step - CONTEXT_STEPS):step]),
            "loss_after": _mean(losses[step + 1:step + 1 + CONTEXT_STEPS]),
            "lr_at_step": lrs[step] if step < len(lrs) else math.nan,
            "lr_final": lrs[-1] if lrs else math.nan,
        })
    return out


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
    train: Any
    if task.make_train is not None:
        train = task.make_train(xtr, ytr, task.batch_size, spec.seed)
    else:
        train = Batches(make_batches(xtr, ytr, task.batch_size, spec.seed),
                        shuffle_seed=spec.seed)
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
        if p.startswith("guard:"):  # guard:explosion_factor=4,reads=deferred
            kw = parse_guard_kwargs(p.split(":", 1)[1])
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
        wall_s=time.perf_counter() - t0, error=error,
        healthy_actions=(action_context(probe.losses, probe.lrs, interventions, causes)
                         if spec.lr_mult == 1 else []))


def _init_worker() -> None:
    torch.set_num_threads(1)
    quiet()


def run_many(specs: list[RunSpec], workers: int, label: str,
             log_runs: Path | None = None) -> list[RunResult]:
    """Run ``specs`` (in a spawn pool of ``workers``; in-process for 1), longest first.

    Args:
        specs: The runs.
        workers: Process pool size.
        label: Name of the batch in the progress lines.
        log_runs: When given, every finished run is appended to this file as one JSON line
            (the CSV row), so that a long grid shows its results before it ends.

    Returns:
        The results, in completion order.
    """
    t0 = time.perf_counter()
    out: list[RunResult] = []

    def done(r: RunResult) -> None:
        out.append(r)
        if log_runs is not None:
            with log_runs.open("a") as f:
                f.write(json.dumps(_clean({"label": label, **_row(r)})) + "\n")

    # Seed by seed (a grid cut short still covers every cell for its first seeds), longest
    # runs first within a seed so that the pool drains evenly. Long (> 500 steps) unguarded
    # references go last: a guarded run without an intervention has their trajectory.
    cost = {"char_gpt": 0, "char_gpt_bf16": 1, "markov_lm": 2, "digits_cnn": 3,
            "char_gpt_b8": 4}
    has_char = any(s.task.startswith("char_gpt") for s in specs)
    order = sorted(specs, key=lambda s: (
        -s.steps, s.policy == "none" and s.steps > 500, s.seed if has_char else 0,
        cost.get(s.task, 5)))
    if workers <= 1:
        for s in order:
            done(run_one(s))
    else:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            chunk = 1 if order and order[0].steps > 500 else 2
            for i, r in enumerate(pool.imap_unordered(run_one, order, chunksize=chunk), 1):
                done(r)
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


def _failing_pairs(runs: list[RunResult], policy: str
                   ) -> Iterable[tuple[RunResult, RunResult, RunResult]]:
    """``(run, unguarded twin, tuned unguarded run)`` for the failing runs of ``policy``.

    A too-high-LR run of ``policy`` is listed when its unguarded twin (same task, optimizer,
    multiplier, seed) fails: it blows up or ends more than ``WITHIN`` worse than the tuned
    unguarded run of the same seed.
    """
    ref = {(r.spec.task, r.spec.optimizer, r.spec.lr_mult, r.spec.seed): r
           for r in runs if r.spec.policy == "none"}
    for r in runs:
        if r.spec.policy != policy or r.spec.lr_mult <= 1:
            continue
        base = ref.get((r.spec.task, r.spec.optimizer, r.spec.lr_mult, r.spec.seed))
        tref = ref.get((r.spec.task, r.spec.optimizer, 1, r.spec.seed))
        if base is None or tref is None:
            continue
        task = TASKS[r.spec.task]
        if base.blowup_step is not None or not better_or_within(task, base.metric, tref.metric):
            yield r, base, tref


def delay_table(runs: list[RunResult], policies: list[str]) -> dict[str, dict[str, Any]]:
    """Steps from the unguarded blow-up to a policy's first action, per task and policy.

    Over the too-high-LR runs whose unguarded twin blows up and in which the policy acted:
    median, 90th percentile, max and count of ``first action step − blow-up step``
    (negative: the policy acted before the unguarded loss crossed the blow-up bound).
    ``blown_up`` counts the unguarded blow-ups the policy had the chance to act on.

    Returns:
        ``{policy: {task: {"median", "p90", "max", "count", "blown_up"}}}`` for every
        policy but ``none``.
    """
    out: dict[str, dict[str, Any]] = {}
    for pol in policies:
        if pol == "none":
            continue
        delays: dict[str, list[float]] = {}
        blown: collections.Counter[str] = collections.Counter()
        for r, base, _ in _failing_pairs(runs, pol):
            if base.blowup_step is None:
                continue
            blown[r.spec.task] += 1
            if r.interventions:
                delays.setdefault(r.spec.task, []).append(
                    float(r.interventions[0][0] - base.blowup_step))
        tasks = sorted(set(blown) | set(delays))
        out[pol] = {t: {"median": median(delays.get(t, [])),
                        "p90": quantile(delays.get(t, []), 0.9),
                        "max": max(delays[t]) if delays.get(t) else math.nan,
                        "count": len(delays.get(t, [])), "blown_up": blown[t]}
                    for t in tasks}
    return out


def recovery_table(runs: list[RunResult], policies: list[str]) -> dict[str, dict[str, Any]]:
    """What a policy did with the too-high-LR runs that fail unguarded, per LR multiplier.

    For each policy but ``none`` and each multiplier > 1, of the runs whose unguarded twin
    fails: how many the policy acted in (``detected``), how many ended within ``WITHIN`` of
    the tuned unguarded run (``recovered``), the number of interventions of the detected
    runs (1 / 2 / 3+) and of the recovered detected runs, and how many ended before the
    last step (``stopped``: a stop action, an exception such as SpikeDetection's, or a
    guard's escalation).

    Returns:
        ``{policy: {"x10": {...}, ...}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for pol in policies:
        if pol == "none":
            continue
        table: dict[str, dict[str, Any]] = {}
        for r, _, tref in _failing_pairs(runs, pol):
            m = table.setdefault(f"x{r.spec.lr_mult:g}", {
                "failing_unguarded": 0, "detected": 0, "recovered": 0,
                "recovered_undetected": 0, "interventions_1": 0, "interventions_2": 0,
                "interventions_3plus": 0, "recovered_1": 0, "recovered_2": 0,
                "recovered_3plus": 0, "stopped": 0})
            ok = better_or_within(TASKS[r.spec.task], r.metric, tref.metric)
            n = len(r.interventions)
            m["failing_unguarded"] += 1
            m["stopped"] += r.stopped
            m["recovered"] += ok
            if not n:
                m["recovered_undetected"] += ok
                continue
            m["detected"] += 1
            bucket = "1" if n == 1 else "2" if n == 2 else "3plus"
            m[f"interventions_{bucket}"] += 1
            m[f"recovered_{bucket}"] += ok
        out[pol] = dict(sorted(table.items(), key=lambda kv: float(kv[0][1:])))
    return out


def healthy_actions(runs: list[RunResult]) -> list[dict[str, Any]]:
    """Every intervention in a tuned-LR (×1) run, with the loss around it (false positives).

    Returns:
        One dict per intervention: the run's task, optimizer, seed, policy, its final
        metric and the unguarded twin's, and :func:`action_context`'s fields.
    """
    ref = {(r.spec.task, r.spec.optimizer, r.spec.seed): r for r in runs
           if r.spec.policy == "none" and r.spec.lr_mult == 1}
    out = []
    for r in runs:
        if r.spec.lr_mult != 1 or not r.healthy_actions:
            continue
        twin = ref.get((r.spec.task, r.spec.optimizer, r.spec.seed))
        for a in r.healthy_actions:
            out.append({"task": r.spec.task, "optimizer": r.spec.optimizer,
                        "seed": r.spec.seed, "policy": r.spec.policy, "metric": r.metric,
                        "unguarded_metric": twin.metric if twin else None, **a})
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
             + (f"read from the run log {doc['config']['rows_from']} (summed run time "
                f"{doc['run_wall_s_sum']:.0f} s, median {_fmt(doc['run_wall_s_median'])} s "
                "a run)" if doc["config"].get("rows_from") else f"wall {doc['wall_s']:.0f} s")
             + f" on {doc['machine']['nproc']} cores ({doc['machine']['cpu_model']}).", "",
             "Batch size per task: " + ", ".join(
                 f"{t} {b}" for t, b in doc["config"].get("batch_size", {}).items()) + ".",
             "",
             "Median run time per task (s; one thread per run, the machine shared): " + ", ".join(
                 f"{t} {median([r['wall_s'] for r in doc['runs'] if r['task'] == t]):.1f}"
                 for t in doc["config"]["tasks"]) + ".",
             "",
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
    if doc.get("delays"):
        lines += ["", "## Delay: unguarded blow-up → first action, per task", "",
                  "Steps from the unguarded run's blow-up (first loss non-finite or above "
                  f"{BLOWUP_FACTOR:g}× the first loss) to the policy's first action in the "
                  "same task, optimizer, multiplier and seed; negative = before. count = "
                  "runs with an action / unguarded blow-ups.", "",
                  "| policy | task | median | p90 | max | count |",
                  "|---|---|---|---|---|---|"]
        for p in pols:
            for task, d in doc["delays"].get(p, {}).items():
                lines.append(_row_md([p, task, _fmt(d["median"]), _fmt(d["p90"]),
                                      _fmt(d["max"]), f"{d['count']}/{d['blown_up']}"]))
    if doc.get("recovery"):
        lines += ["", "## Recovery of the runs that fail unguarded", "",
                  "Of the too-high-LR runs whose unguarded twin fails: detected = the policy "
                  "acted; within 10 % = ended within 10 % of the tuned run (undetected ones "
                  "included, in brackets); interventions 1/2/3+ = detected runs by number of "
                  "actions (of them within 10 %); stopped = ended before the last step.", "",
                  "| policy | lr | failing | detected | within 10 % (undetected) | "
                  "1 / 2 / 3+ interventions | within 10 % by 1 / 2 / 3+ | stopped |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in pols:
            for mult, m in doc["recovery"].get(p, {}).items():
                lines.append(_row_md([
                    p, mult, str(m["failing_unguarded"]), str(m["detected"]),
                    f"{m['recovered']} ({m['recovered_undetected']})",
                    f"{m['interventions_1']} / {m['interventions_2']} / "
                    f"{m['interventions_3plus']}",
                    f"{m['recovered_1']} / {m['recovered_2']} / {m['recovered_3plus']}",
                    str(m["stopped"])]))
    if doc.get("healthy_actions"):
        lines += ["", "## Interventions in tuned-LR runs (false positives)", "",
                  f"Mean training loss over the {CONTEXT_STEPS} steps before / after each "
                  "action; metric = final validation metric of this run and of its unguarded "
                  "twin (same seed).", "",
                  "| task/optimizer | seed | policy | step | action | cause | loss before → "
                  "after | lr at step → final | metric (unguarded) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for a in doc["healthy_actions"]:
            lines.append(_row_md([
                f"{a['task']}/{a['optimizer']}", str(a["seed"]), a["policy"], str(a["step"]),
                a["action"], a["cause"] or "–",
                f"{_fmt(a['loss_before'])} → {_fmt(a['loss_after'])}",
                f"{_fmt(a['lr_at_step'])} → {_fmt(a['lr_final'])}",
                f"{_fmt(a['metric'])} ({_fmt(a['unguarded_metric'])})"]))
    lines += ["", "## Median final validation metric (accuracy ↑, diabetes MSE ↓, char LM "
              "bits per char ↓; a diverged run counts as 0 / inf)", "",
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


@dataclass(frozen=True)
class Mode:
    tasks: tuple[str, ...]
    optimizers: tuple[str, ...]
    mults: tuple[int, ...]
    seeds: tuple[int, ...]
    policies: tuple[str, ...]
    sweep: tuple[float, ...]
    steps: int
    sweep_steps: int | None = None  # steps of the tuning sweep; None: ``steps``


ORIGINAL_TASKS = ("digits_mlp", "digits_cnn", "markov_lm", "diabetes")
GPT_TASKS = ("char_gpt", "char_gpt_b8", "char_gpt_bf16")
GPT_POLICIES = ("none", "early_stop", "lightning_spike", "olmo_skip", "guard", "guard_monitor")

MODES: dict[str, Mode] = {
    "full": Mode(ORIGINAL_TASKS, OPTIMIZERS, LR_MULTS, (0, 1, 2), POLICIES, SWEEP, 150),
    "quick": Mode(("digits_mlp", "diabetes"), ("adam", "sgd"), LR_MULTS, (0,), POLICIES,
                  (1e-3, 1e-2, 1e-1), 200),
    "smoke": Mode(("digits_mlp",), ("adam",), (1, 100), (0,), ("none", "olmo_skip", "guard"),
                  (1e-3, 1e-2), 60),
    # The character LMs (issue 13): warm-up + cosine, decay groups, batch 256 / 8 / bf16.
    "gpt": Mode(GPT_TASKS, ("adam", "adamw", "sgd"), LR_MULTS, (0, 1, 2, 3, 4), GPT_POLICIES,
                SWEEP, 150),
    # False positives: the tuned LR only, 2,000 steps of warm-up + cosine, 5 seeds. The
    # tuned LR is the 150-step sweep's (or --tuned-from's).
    "long_healthy": Mode(("char_gpt", "char_gpt_b8"), ("adamw",), (1,), (0, 1, 2, 3, 4),
                         ("none", "guard", "guard_monitor"), SWEEP, 2000, sweep_steps=150),
    # End-to-end check of the character LM path (tests): the tiny model, both tables.
    "smoke_gpt": Mode(("char_gpt_tiny",), ("adamw",), (1, 1000), (0,),
                      ("none", "guard", "guard:explosion_factor=10,on_spike=skip"),
                      (1e-3, 1e-2), 60),
}


def _counts(text: str | None) -> dict[str, int]:
    """``"1000=2,char_gpt=3"`` → ``{"1000": 2, "char_gpt": 3}`` (seed counts by key)."""
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        if item.strip():
            key, _, n = item.partition("=")
            out[key.strip()] = int(n)
    return out


def _run_from_row(row: dict[str, Any]) -> RunResult:
    """A :class:`RunResult` back from its CSV/JSON row (:func:`_row`)."""
    spec = RunSpec(**{f.name: row[f.name] for f in dataclasses.fields(RunSpec)})
    known = {f.name for f in dataclasses.fields(RunResult)} - {"spec"}
    kw = {k: row[k] for k in known if k in row}
    kw["interventions"] = [(int(st), a) for st, a in (
        item.split(":", 1) for item in (row.get("interventions") or "").split(";") if item)]
    kw["causes"] = [c for c in (row.get("causes") or "").split(";") if c]
    for k in ("init_loss", "final_train_loss"):
        kw[k] = math.nan if kw.get(k) is None else kw[k]
    return RunResult(spec=spec, **kw)


def load_logged_runs(path: Path, label: str = "grid") -> list[RunResult]:
    """The runs of one ``--log-runs`` file (last entry wins for a repeated spec)."""
    runs: dict[tuple[Any, ...], RunResult] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("label") != label:
            continue
        r = _run_from_row(row)
        runs[tuple(asdict(r.spec).values())] = r
    return list(runs.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--mode", choices=sorted(MODES), default=None,
                   help="grid to run (default full)")
    g.add_argument("--quick", action="store_true", help="subset, < 2 minutes")
    g.add_argument("--smoke", action="store_true", help="tiny subset for the tests")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    ap.add_argument("--workers", type=int, default=None,
                    help="process pool size (default 2; 1 = in-process for --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="override steps per run")
    ap.add_argument("--seeds", type=int, default=None, help="override number of seeds")
    ap.add_argument("--seeds-per-mult", default=None,
                    help="fewer seeds for some multipliers, e.g. '1000=2' (seeds 0 and 1)")
    ap.add_argument("--seeds-per-task", default=None,
                    help="fewer seeds for some tasks, e.g. 'char_gpt=2'")
    ap.add_argument("--rows-from", type=Path, default=None,
                    help="no runs: summarize the grid runs of this --log-runs file (e.g. a "
                         "grid cut short); needs --tuned-from")
    ap.add_argument("--mults", default=None,
                    help="comma list overriding the LR multipliers (e.g. '1' for healthy runs)")
    ap.add_argument("--optimizers", default=None,
                    help="comma list overriding the mode's optimizers")
    ap.add_argument("--tuned-from", type=Path, default=None,
                    help="take the tuned LRs from this results JSON instead of sweeping")
    ap.add_argument("--sweep-only", action="store_true",
                    help="run the tuning sweep and write its JSON (tuned LRs), no grid")
    ap.add_argument("--tasks", default=None, help="comma list overriding the mode's tasks")
    ap.add_argument("--policies", default=None,
                    help="semicolon list overriding the mode's policies; 'guard:k=v,k=v' "
                         "is a DivergenceGuard with those arguments (numbers, true/false, "
                         "none, a|b tuples or strings)")
    ap.add_argument("--stem", default=None, help="output file name stem")
    ap.add_argument("--log-runs", type=Path, default=None,
                    help="append every finished run to this file as a JSON line")
    args = ap.parse_args(argv)
    name = args.mode or ("smoke" if args.smoke else "quick" if args.quick else "full")
    mode = MODES[name]
    if args.tasks:
        mode = dataclasses.replace(mode, tasks=tuple(args.tasks.split(",")))
    if args.optimizers:
        mode = dataclasses.replace(mode, optimizers=tuple(args.optimizers.split(",")))
    if args.policies:
        mode = dataclasses.replace(mode, policies=tuple(args.policies.split(";")))
    if args.mults:
        mode = dataclasses.replace(mode, mults=tuple(int(m) for m in args.mults.split(",")))
    for t in mode.tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r} (known: {', '.join(TASKS)})")
    for o in mode.optimizers:
        if o not in OPTIMIZERS:
            ap.error(f"unknown optimizer {o!r} (known: {', '.join(OPTIMIZERS)})")
    steps = args.steps or mode.steps
    sweep_steps = args.steps or mode.sweep_steps or steps
    workers = args.workers or (1 if name.startswith("smoke") else 2)
    seeds = tuple(range(args.seeds)) if args.seeds else mode.seeds
    per_mult = _counts(args.seeds_per_mult)
    per_task = _counts(args.seeds_per_task)
    torch.set_num_threads(1)
    quiet()
    t0 = time.perf_counter()
    sweep_specs = [RunSpec(t, o, lr, 0, 0, "none", sweep_steps, "sweep")
                   for t in mode.tasks for o in mode.optimizers for lr in mode.sweep]
    sweep_runs: list[RunResult] = []
    if args.rows_from is not None and args.tuned_from is None:
        ap.error("--rows-from needs --tuned-from")
    if args.tuned_from is not None:
        sweep_specs = []
        tuned = json.loads(args.tuned_from.read_text())["tuned"]
        missing = [f"{t}/{o}" for t in mode.tasks for o in mode.optimizers
                   if f"{t}/{o}" not in tuned]
        if missing:
            ap.error(f"{args.tuned_from} has no tuned LR for {', '.join(missing)}")
    else:
        sweep_runs = run_many(sweep_specs, workers, "sweep", args.log_runs)
        tuned = pick_tuned(sweep_runs)
    specs = [] if args.sweep_only else [
        RunSpec(t, o, tuned[f"{t}/{o}"]["lr"] * m, m, s, p, steps)
        for t in mode.tasks for o in mode.optimizers for m in mode.mults
        for s in seeds[:min(per_mult.get(str(m), len(seeds)), per_task.get(t, len(seeds)))]
        for p in mode.policies]
    if args.rows_from is not None:
        wanted = {tuple(asdict(sp).values()) for sp in specs}
        runs = [r for r in load_logged_runs(args.rows_from)
                if tuple(asdict(r.spec).values()) in wanted]
        print(f"{len(runs)} of {len(specs)} runs read from {args.rows_from}")
    else:
        runs = run_many(specs, workers, "grid", args.log_runs)
    runs.sort(key=lambda r: (r.spec.task, r.spec.optimizer, r.spec.lr_mult, r.spec.seed,
                             mode.policies.index(r.spec.policy)))
    errors = [r for r in runs + sweep_runs if r.error]
    for r in errors[:5]:
        print(f"error in {r.spec}: {r.error}", file=sys.stderr)
    pols = list(mode.policies)
    doc = {
        "config": {"mode": name, "tasks": list(mode.tasks), "optimizers": list(mode.optimizers),
                   "lr_mults": list(mode.mults), "seeds": list(seeds),
                   "seeds_per_mult": per_mult, "seeds_per_task": per_task,
                   "rows_from": str(args.rows_from) if args.rows_from else None,
                   "policies": pols, "sweep": list(mode.sweep), "steps": steps,
                   "sweep_steps": sweep_steps, "workers": workers,
                   "blowup_factor": BLOWUP_FACTOR, "within": WITHIN, "n_runs": len(runs),
                   "n_sweep_runs": len(sweep_specs), "errors": len(errors),
                   "batch_size": {t: TASKS[t].batch_size for t in mode.tasks},
                   "command": " ".join([".venv/bin/python", "benchmarks/divergence_suite.py",
                                        *(argv if argv is not None else sys.argv[1:])])},
        "machine": machine_info(),
        "tuned": {k: {"lr": v["lr"], "metric": v["metric"], "sweep": v["sweep"]}
                  for k, v in tuned.items()
                  if k.split("/")[0] in mode.tasks and k.split("/")[1] in mode.optimizers},
        "summary": summarize(runs, pols),
        "delays": delay_table(runs, pols),
        "recovery": recovery_table(runs, pols),
        "healthy_actions": healthy_actions(runs),
        "metric_table": metric_table(runs, pols),
        "guard_events": guard_events(runs),
        "wall_s": time.perf_counter() - t0,
        "run_wall_s_sum": sum(r.wall_s for r in runs),
        "run_wall_s_median": median([r.wall_s for r in runs]),
        "sweep_runs": [_row(r) for r in sweep_runs],
        "runs": [_row(r) for r in runs],
    }
    stem = args.stem or ("divergence" if name == "full" else f"divergence_{name}")
    for p in write(doc, runs or sweep_runs, args.out, stem):
        print(f"wrote {p}")
    print(markdown(doc).split("## Median")[0])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
