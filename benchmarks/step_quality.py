"""Step quality ρ on the digits MLP: its distribution per optimizer, and what it costs.

Two parts, on the CPU with one torch thread:

1. **ρ per optimizer.** A Lightning ``Trainer`` with
   :class:`~lr_monitor.callbacks.step_quality.StepQualityMonitor` (``every_n_steps=1``)
   trains an MLP on scikit-learn's digits for 300 steps with Adam lr 1e-3, Adam lr 0.1,
   plain SGD lr 1.0 and RMSprop lr 0.01, three seeds each, on two models: the tests'
   ``DigitsMLP`` (64-64-64-10, batch 32) and the demo's MLP (64-128-10, batch 32).
   Reported per optimizer: median ρ, quartiles, share of steps with ρ < 0, share of steps
   with g·Δ ≥ 0 (not a descent step on its own batch: there ρ < 0 means the loss went
   *down*), NaN steps, and the loss at the end.
2. **Cost.** (a) In one process, Lightning fits alternate (A B C, then C B A, ...)
   between no callback, ``every_n_steps=1`` and ``every_n_steps=50``; the time of a step is
   the time between two ``on_train_batch_start`` calls; reported is the median over rounds
   of the ratio to the baseline of the same round. (b) In a plain loop, training steps
   with and without a measurement alternate; reported: the median extra time of a measured
   step (capture, copies, g·Δ, re-run forward) over the median training step (zero_grad,
   forward, backward, Adam step), for the digits MLP and a wide MLP.

   Times are CPU times of the training thread (``time.thread_time``; torch runs on one
   thread): on a shared machine wall-clock times include preemption, which hits longer
   steps more often and inflated the measured/plain ratio of the small MLP from 0.9 to 3.

Usage::

    .venv/bin/python benchmarks/step_quality.py               # ~5 min on 2 cores
    .venv/bin/python benchmarks/step_quality.py --smoke --out /tmp/x   # for the tests

Writes ``step_quality.md`` (``step_quality_smoke.md`` with ``--smoke``) to ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from common import RESULTS, Batches, digits_data, machine_info, make_batches, mlp, quiet
from torch import Tensor, nn

from lr_monitor.callbacks.step_quality import StepQualityMonitor
from lr_monitor.recording.step_quality import StepQualityMeter, StepQualityValues

#: (label, optimizer, lr) of part 1, in the issue's order (RMSprop from docs/optimizers).
OPTIMIZERS = (("Adam lr 1e-3", "adam", 1e-3), ("Adam lr 0.1", "adam", 0.1),
              ("SGD lr 1.0", "sgd", 1.0), ("RMSprop lr 0.01", "rmsprop", 0.01))
#: The values issue 12 quotes (and ../shared/notes for RMSprop), for comparison only.
QUOTED = {"Adam lr 1e-3": "≈0.87", "Adam lr 0.1": "≈0.5", "SGD lr 1.0": "≈0.15, 20 % < 0",
          "RMSprop lr 0.01": "≈0.25"}
#: (label, layer sizes, batch size) of part 1.
MODELS = (("tests DigitsMLP 64-64-64-10, batch 32", (64, 64, 64, 10), 32),
          ("demo MLP 64-128-10, batch 32", (64, 128, 10), 32))


@dataclass(frozen=True)
class Mode:
    steps: int
    seeds: tuple[int, ...]
    rounds: int
    timing_steps: int
    micro_iters: int


MODES = {"full": Mode(300, (0, 1, 2), 5, 200, 200),
         "smoke": Mode(20, (0,), 1, 20, 10)}


def _optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.RMSprop(params, lr=lr)


def _module(sizes: tuple[int, ...], opt: str, lr: float) -> Any:
    import pytorch_lightning as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(sizes)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return _optimizer(opt, self.parameters(), lr)

    return Classifier()


def _trainer(callbacks: list[Any], steps: int) -> Any:
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1,
                      logger=False, callbacks=callbacks, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0)


def _data(batch: int, seed: int) -> Batches:
    x, y, _, _ = digits_data()
    return Batches(make_batches(x, y, batch, seed), shuffle_seed=seed)


# -- part 1 ------------------------------------------------------------------------------


def _run_rho(sizes: tuple[int, ...], batch: int, opt: str, lr: float, seed: int,
             steps: int) -> list[StepQualityValues]:
    import pytorch_lightning as pl

    pl.seed_everything(seed, verbose=False)
    monitor = StepQualityMonitor(every_n_steps=1)
    values: list[StepQualityValues] = []
    monitor.subscribe(lambda record: values.append(monitor.last) if monitor.last else None)
    _trainer([monitor], steps).fit(_module(sizes, opt, lr), _data(batch, seed))
    return values


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def _summary(runs: list[list[StepQualityValues]]) -> dict[str, float]:
    every = [v for run in runs for v in run]
    rhos = sorted(v.rho for v in every if math.isfinite(v.rho))
    seed_medians = [statistics.median([v.rho for v in run if math.isfinite(v.rho)])
                    for run in runs if any(math.isfinite(v.rho) for v in run)]
    n = max(1, len(every))
    return {
        "n": len(every),
        "median": _quantile(rhos, 0.5),
        "q25": _quantile(rhos, 0.25),
        "q75": _quantile(rhos, 0.75),
        "seed_min": min(seed_medians, default=math.nan),
        "seed_max": max(seed_medians, default=math.nan),
        "neg": sum(r < 0 for r in rhos) / n,
        "ascent": sum(v.slope >= 0 for v in every) / n,
        "neg_descent": sum(v.rho < 0 for v in every if v.descent) / n,
        "nan": sum(not math.isfinite(v.rho) for v in every) / n,
        "final_loss": statistics.median(run[-1].loss_after for run in runs if run),
    }


# -- part 2 ------------------------------------------------------------------------------


class _Clock:
    """Times between consecutive ``on_train_batch_start`` calls (after ``skip`` steps)."""

    def __init__(self, skip: int) -> None:
        self.skip, self.times, self._last = skip, [], None  # type: ignore[var-annotated]

    def hooks(self) -> Any:
        import pytorch_lightning as pl

        clock = self

        class Hook(pl.Callback):
            def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
                now = time.thread_time()
                if clock._last is not None and trainer.global_step > clock.skip:
                    clock.times.append(now - clock._last)
                clock._last = now

        return Hook()


def _lightning_timing(mode: Mode) -> dict[str, list[float]]:
    import pytorch_lightning as pl

    configs: dict[str, Callable[[], list[Any]]] = {
        "baseline": list,
        "every 1": lambda: [StepQualityMonitor(every_n_steps=1)],
        "every 50": lambda: [StepQualityMonitor(every_n_steps=50)],
    }
    ratios: dict[str, list[float]] = {k: [] for k in configs}
    ms: dict[str, list[float]] = {k: [] for k in configs}
    names = list(configs)
    for r in range(mode.rounds):
        order = names if r % 2 == 0 else names[::-1]
        step_time: dict[str, float] = {}
        for name in order:
            pl.seed_everything(0, verbose=False)
            clock = _Clock(skip=10)
            _trainer([*configs[name](), clock.hooks()], mode.timing_steps).fit(
                _module((64, 64, 64, 10), "adam", 1e-3), _data(32, 0))
            step_time[name] = statistics.fmean(clock.times)
        for name in names:
            ratios[name].append(step_time[name] / step_time["baseline"])
            ms[name].append(1e3 * step_time[name])
    return {**{f"{k} ratio": v for k, v in ratios.items()},
            **{f"{k} ms": v for k, v in ms.items()}}


def _micro(sizes: tuple[int, ...], batch: int, iters: int) -> dict[str, float]:
    """Plain loop: a training step with and without a measurement, alternating."""
    torch.manual_seed(0)
    model = mlp(sizes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, sizes[0])
    y = torch.randint(0, sizes[-1], (batch,))
    meter = StepQualityMeter()

    def loss_fn() -> Tensor:
        return nn.functional.cross_entropy(model(x), y)

    plain: list[float] = []
    measured: list[float] = []
    for i in range(2 * iters + 10):
        measure = i % 2 == 1
        t0 = time.thread_time()
        if measure:
            meter.start()
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if measure:
            meter.capture(model.parameters())
        opt.step()
        if measure:
            StepQualityValues.from_tensor(i, meter.measure(loss, loss_fn, model))
        dt = time.thread_time() - t0
        if i >= 10:
            (measured if measure else plain).append(dt)
    base, meas = statistics.median(plain), statistics.median(measured)
    return {"params": sum(p.numel() for p in model.parameters()),
            "train_ms": 1e3 * base, "measured_ms": 1e3 * meas,
            "extra_over_train": (meas - base) / base}


# -- output -------------------------------------------------------------------------------


def _fmt(x: float, digits: int = 2) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


def _markdown(mode_name: str, mode: Mode, rho: dict[str, dict[str, dict[str, float]]],
              timing: dict[str, list[float]], micro: dict[str, dict[str, float]],
              wall: float) -> str:
    info = machine_info()
    lines = [
        f"# Step quality ({mode_name})",
        "",
        f"{info['nproc']} cores ({info['cpu_model']}), torch {info['torch']}, "
        f"pytorch_lightning {info['pytorch_lightning']}, 1 torch thread. "
        f"Wall time {wall:.0f} s. Command: `.venv/bin/python benchmarks/step_quality.py"
        f"{' --smoke' if mode_name == 'smoke' else ''}`.",
        "",
        f"## ρ per optimizer ({mode.steps} steps, every step measured, seeds "
        f"{', '.join(map(str, mode.seeds))})",
        "",
        "ρ = (L_B(θ+Δ) − L_B(θ)) / (g_B·Δ) on the step's own batch. *median* pools the "
        "steps of all seeds; *seeds* is the range of the per-seed medians; *ρ<0* the share "
        "of steps with ρ < 0, *of which descent* those with g·Δ < 0 (the loss went up); "
        "*g·Δ≥0* the share of steps that were not a descent direction on their own batch; "
        "*quoted* what issue 12 (and the notes, for RMSprop) quote for an unspecified digits "
        "MLP, for comparison.",
        "",
    ]
    for model, table in rho.items():
        lines += [f"**{model}**", "",
                  "| optimizer | median ρ | [q25, q75] | seeds | ρ<0 | of which descent "
                  "| g·Δ≥0 | NaN | final loss | quoted |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, s in table.items():
            lines.append(
                f"| {label} | {_fmt(s['median'])} | [{_fmt(s['q25'])}, {_fmt(s['q75'])}] "
                f"| {_fmt(s['seed_min'])}–{_fmt(s['seed_max'])} | {s['neg']:.0%} "
                f"| {s['neg_descent']:.0%} | {s['ascent']:.0%} | {s['nan']:.0%} "
                f"| {_fmt(s['final_loss'], 3)} | {QUOTED.get(label, '')} |")
        lines.append("")
    lines += [
        "## Cost",
        "",
        f"**Lightning** (tests' DigitsMLP, Adam, batch 32; {mode.rounds} rounds of "
        f"{mode.timing_steps}-step fits, the first 10 steps not timed): step time ratio to "
        "the no-callback baseline, median over rounds [min, max] (median ms per step). "
        "All times are CPU times of the training thread (`time.thread_time`).",
        "",
        "| config | ratio | ms/step |",
        "|---|---|---|",
    ]
    for name in ("baseline", "every 1", "every 50"):
        r = timing[f"{name} ratio"]
        lines.append(f"| {name} | {statistics.median(r):.3f} [{min(r):.2f}, {max(r):.2f}] "
                     f"| {statistics.median(timing[f'{name} ms']):.2f} |")
    lines += [
        "",
        "**Plain loop** (Adam, one process, measured and plain steps alternating; median of "
        f"{mode.micro_iters} each): extra time of a measured step as a share of a training "
        "step.",
        "",
        "| model | params | training step ms | measured step ms | extra / training step |",
        "|---|---|---|---|---|",
    ]
    for label, m in micro.items():
        lines.append(f"| {label} | {int(m['params']):,} | {m['train_ms']:.2f} "
                     f"| {m['measured_ms']:.2f} | {m['extra_over_train']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    quiet()
    name = "smoke" if args.smoke else "full"
    mode = MODES[name]
    t0 = time.perf_counter()
    rho: dict[str, dict[str, dict[str, float]]] = {}
    for model, sizes, batch in MODELS:
        rho[model] = {}
        for label, opt, lr in OPTIMIZERS:
            runs = [_run_rho(sizes, batch, opt, lr, seed, mode.steps) for seed in mode.seeds]
            rho[model][label] = s = _summary(runs)
            print(f"{model} | {label}: median ρ {_fmt(s['median'])}, ρ<0 {s['neg']:.0%}, "
                  f"g·Δ≥0 {s['ascent']:.0%}", flush=True)
    timing = _lightning_timing(mode)
    print("lightning:", {k: round(statistics.median(v), 3) for k, v in timing.items()},
          flush=True)
    micro = {"tests DigitsMLP 64-64-64-10, batch 32": _micro((64, 64, 64, 10), 32,
                                                            mode.micro_iters),
             "wide MLP 256-1024-1024-10, batch 256": _micro((256, 1024, 1024, 10), 256,
                                                           mode.micro_iters)}
    print("plain loop:", micro, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if args.smoke else ""
    path = args.out / f"step_quality{suffix}.md"
    path.write_text(_markdown(name, mode, rho, timing, micro, time.perf_counter() - t0))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
