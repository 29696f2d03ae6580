"""Overhead of StepSizeMonitor / DivergenceGuard against the baseline and peers.

Three parts, all on the CPU with one torch thread:

1. **Step time.** The same model, data and seed trained by a Lightning ``Trainer``
   (``TensorBoardLogger`` to a temporary directory for every configuration,
   ``log_every_n_steps`` = the interval) under each configuration; configurations are
   interleaved in rounds (A B C … then … C B A) in one process. The time of a step is the
   time between two consecutive ``on_train_batch_start`` calls (everything: data, forward,
   backward, optimizer step, every callback, logging). Per fit: mean step time over
   ``measure`` steps after ``warmup`` steps (a multiple of the interval, so a recorded step
   is counted exactly 1/interval of the time). Reported: the median over rounds of the
   per-round ratio to the baseline of the same round and interval.
2. **Statistics pass / Adam step.** Outside Lightning: one ``optimizer.step()`` of
   ``torch.optim.Adam(foreach=True)`` against one full statistics pass of
   :class:`lr_monitor.StepRecorder` (``capture_gradients()`` + ``measure()``) on each path
   (compiled kernels at group and tensor granularity, the eager kernels, the generic
   ParamStep path) and the per-parameter ``.item()`` loop, alternating within every rep;
   the median over reps of each rep's ratio.
3. **Peak RSS.** Every configuration in its own subprocess (``ru_maxrss``), as a ratio to
   the baseline subprocess.

Configurations (interval N = 1 and N = 50): ``baseline`` (no callback);
``lightning`` (``LearningRateMonitor`` + ``grad_norm`` logged from
``on_before_optimizer_step`` on every N-th step); ``wandb`` (``WandbLogger.watch(model,
log="all", log_freq=N)``, offline; the WandbLogger is a second logger next to the
TensorBoardLogger); ``item_loop`` (per-parameter grad, param, update and exp_avg norms
with one ``.item()`` each, the update from a parameter copy, as Composer's
``OptimizerMonitor`` and most hand-written callbacks do); ``monitor_group`` /
``monitor_tensor`` (``StepSizeMonitor`` at group / tensor granularity); ``guard``
(``DivergenceGuard`` alone; it works at every step whatever N is); ``guard_deferred``
(``DivergenceGuard(deferred=True)``: the accelerator path forced on the CPU, where it only
adds work); ``monitor+guard``.

Usage::

    .venv/bin/python benchmarks/overhead.py            # full, ~10 min
    .venv/bin/python benchmarks/overhead.py --quick    # digits model only, < 2 min
    .venv/bin/python benchmarks/overhead.py --smoke --out /tmp/x   # for the tests
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import RESULTS, Batches, digits_data, machine_info, make_batches, median, mlp, quiet
from torch import Tensor, nn

CONFIGS = ("baseline", "lightning", "wandb", "item_loop", "monitor_group", "monitor_eager",
           "monitor_tensor", "guard", "guard_deferred", "monitor+guard")


# -- models ------------------------------------------------------------------------------------


class ManyTensors(nn.Module):
    """A Linear(16, 16) plus 5,000 bias vectors of 16 elements (5,002 tensors, 80k params).

    The per-tensor stress test: almost no arithmetic per tensor, so every per-tensor
    Python call (optimizer, statistics, logging) shows.
    """

    def __init__(self, n: int = 5000, d: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(d)) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + torch.stack(list(self.biases)).mean(0)


@dataclass(frozen=True)
class BenchModel:
    name: str
    description: str
    make: Callable[[], nn.Module]
    batches: Callable[[], list[tuple[Tensor, Tensor]]]
    loss: Callable[[Tensor, Tensor], Tensor]


def _digits_batches() -> list[tuple[Tensor, Tensor]]:
    x, y, _, _ = digits_data()
    return make_batches(x, y, 64, 0)


def _random_batches(shape: tuple[int, ...], target: Callable[[torch.Generator], Tensor],
                    n: int = 32) -> Callable[[], list[tuple[Tensor, Tensor]]]:
    def make() -> list[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(*shape, generator=g), target(g)) for _ in range(n)]
    return make


MODELS: dict[str, BenchModel] = {
    "digits_mlp": BenchModel(
        "digits_mlp", "MLP 64-256-256-10 on sklearn digits, batch 64 (85k params, 6 tensors)",
        lambda: mlp([64, 256, 256, 10]), _digits_batches, nn.functional.cross_entropy),
    "mlp_10m": BenchModel(
        "mlp_10m", "MLP 1024-2048-2048-2048-10, random data, batch 32 (10.5M params, "
        "8 tensors)", lambda: mlp([1024, 2048, 2048, 2048, 10]),
        _random_batches((32, 1024), lambda g: torch.randint(10, (32,), generator=g)),
        nn.functional.cross_entropy),
    "many_tensors": BenchModel(
        "many_tensors", "Linear(16,16) + 5,000 bias vectors of 16, random data, batch 16 "
        "(5,002 tensors, 80k params)", ManyTensors,
        _random_batches((16, 16), lambda g: torch.randn(16, 16, generator=g)),
        nn.functional.mse_loss),
    "small_2000": BenchModel(
        "small_2000", "Linear(16,16) + 2,000 bias vectors of 16, random data, batch 16 "
        "(2,002 tensors, 32k params)", lambda: ManyTensors(2000),
        _random_batches((16, 16), lambda g: torch.randn(16, 16, generator=g)),
        nn.functional.mse_loss),
    "many_10k": BenchModel(
        "many_10k", "Linear(16,16) + 10,000 bias vectors of 16, random data, batch 16 "
        "(10,002 tensors, 160k params)", lambda: ManyTensors(10_000),
        _random_batches((16, 16), lambda g: torch.randn(16, 16, generator=g)),
        nn.functional.mse_loss),
}


# -- Lightning pieces --------------------------------------------------------------------------


def _lightning() -> dict[str, Any]:
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self, bm: BenchModel) -> None:
            super().__init__()
            self.net = bm.make()
            self.loss_fn = bm.loss

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            loss = self.loss_fn(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3, foreach=True)

    class StepClock(pl.Callback):
        """Wall time at every on_train_batch_start (must be the first callback)."""

        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 batch: Any, batch_idx: int) -> None:
            self.t.append(time.perf_counter())

    class LightningWay(pl.Callback):
        """Lightning's documented recipe: ``self.log_dict(grad_norm(...))`` before the step."""

        def __init__(self, every: int) -> None:
            self.every = every

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                     optimizer: torch.optim.Optimizer) -> None:
            from pytorch_lightning.utilities import grad_norm

            if trainer.global_step % self.every == 0:
                pl_module.log_dict(grad_norm(pl_module, norm_type=2))

    class ItemLoop(pl.Callback):
        """Per-parameter statistics with one ``.item()`` each (Composer-style).

        grad norm before the step, parameter copy for the update; after the step param
        norm, update norm and exp_avg norm; everything to ``logger.log_metrics``.
        """

        def __init__(self, every: int) -> None:
            self.every = every
            self._grad: dict[str, float] = {}
            self._copy: dict[str, Tensor] = {}

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                     optimizer: torch.optim.Optimizer) -> None:
            if trainer.global_step % self.every:
                return
            for n, p in pl_module.named_parameters():
                if p.grad is not None:
                    self._grad[n] = p.grad.norm().item()
                    self._copy[n] = p.detach().clone()

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               outputs: Any, batch: Any, batch_idx: int) -> None:
            if not self._copy:
                return
            opt = trainer.optimizers[0]
            metrics: dict[str, float] = {}
            for n, p in pl_module.named_parameters():
                if n not in self._copy:
                    continue
                metrics[f"grad_norm/{n}"] = self._grad[n]
                metrics[f"param_norm/{n}"] = p.detach().norm().item()
                metrics[f"update_norm/{n}"] = (p.detach() - self._copy[n]).norm().item()
                st = opt.state.get(p, {})
                if "exp_avg" in st:
                    metrics[f"exp_avg_norm/{n}"] = st["exp_avg"].norm().item()
            self._copy.clear()
            self._grad.clear()
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step - 1)

    return {"Module": Module, "StepClock": StepClock, "LightningWay": LightningWay,
            "ItemLoop": ItemLoop}


def wandb_available() -> str | None:
    """None if wandb is importable, else the reason it is skipped."""
    try:
        import wandb  # noqa: F401
    except Exception as e:
        return f"wandb cannot be imported ({type(e).__name__}: {e})"
    return None


def fit_once(bm: BenchModel, config: str, interval: int, steps: int, tmp: str
             ) -> list[float]:
    """One Trainer.fit of ``steps`` steps under ``config``; the batch-start timestamps."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import TensorBoardLogger

    from lr_monitor import DivergenceGuard, StepSizeMonitor

    parts = _lightning()
    torch.manual_seed(0)
    module = parts["Module"](bm)
    clock = parts["StepClock"]()
    callbacks: list[Any] = [clock]
    loggers: list[Any] = [TensorBoardLogger(tmp, name=f"{bm.name}-{config}-{interval}")]
    wandb_logger = None
    if config == "lightning":
        callbacks += [LearningRateMonitor(logging_interval="step"),
                      parts["LightningWay"](interval)]
    elif config == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        os.environ["WANDB_MODE"] = "offline"
        wandb_logger = WandbLogger(save_dir=tmp, offline=True, project="lr-monitor-bench")
        wandb_logger.watch(module, log="all", log_freq=interval)
        loggers.append(wandb_logger)
    elif config == "item_loop":
        callbacks.append(parts["ItemLoop"](interval))
    elif config in ("monitor_group", "monitor+guard"):
        callbacks.append(StepSizeMonitor())  # statistics="auto": the compiled kernel
    elif config == "monitor_eager":
        callbacks.append(StepSizeMonitor(statistics="eager"))
    elif config == "monitor_tensor":
        callbacks.append(StepSizeMonitor(granularity="tensor"))
    if config in ("guard", "monitor+guard"):
        callbacks.append(DivergenceGuard())
    elif config == "guard_deferred":  # the accelerator path, forced on the CPU
        callbacks.append(DivergenceGuard(deferred=True))
    trainer = pl.Trainer(
        max_steps=steps, logger=loggers, callbacks=callbacks, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1,
        log_every_n_steps=interval, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=tmp)
    trainer.fit(module, train_dataloaders=Batches(bm.batches()))
    if wandb_logger is not None:
        import wandb

        wandb.finish()
    return clock.t


def step_times(stamps: list[float], warmup: int, measure: int) -> list[float]:
    return [stamps[i + 1] - stamps[i] for i in range(warmup, warmup + measure)]


# -- part 1: interleaved step time -------------------------------------------------------------


def timing(models: list[str], configs: list[str], intervals: list[int],
           rounds: dict[str, int], windows: dict[str, dict[int, tuple[int, int]]]
           ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mname in models:
            bm = MODELS[mname]
            per: dict[str, dict[str, list[float]]] = {}
            t0 = time.perf_counter()
            mconfigs = [c for c in configs if c in MODEL_CONFIGS.get(mname, configs)]
            for r in range(rounds[mname]):
                for interval in intervals:
                    if interval not in windows[mname]:
                        continue
                    warmup, m = windows[mname][interval]
                    order = mconfigs if r % 2 == 0 else mconfigs[::-1]
                    for cfg in order:
                        stamps = fit_once(bm, cfg, interval, warmup + m + 1, tmp)
                        st = step_times(stamps, warmup, m)
                        d = per.setdefault(f"{cfg}@{interval}", {"mean": [], "median": []})
                        d["mean"].append(statistics.fmean(st))
                        d["median"].append(statistics.median(st))
            res: dict[str, Any] = {}
            for key, d in per.items():
                cfg, interval = key.split("@")
                base = per[f"baseline@{interval}"]["mean"]
                ratios = [a / b for a, b in zip(d["mean"], base, strict=True)]
                res[key] = {
                    "config": cfg, "interval": int(interval),
                    "ratio_median": median(ratios), "ratio_min": min(ratios),
                    "ratio_max": max(ratios), "ratios": ratios,
                    "step_ms_mean_median": 1e3 * median(d["mean"]),
                    "step_ms_median_median": 1e3 * median(d["median"]),
                }
            out[mname] = {"description": bm.description,
                          "windows": {str(i): {"warmup": w, "measure": n}
                                      for i, (w, n) in windows[mname].items()},
                          "rounds": rounds[mname],
                          "wall_s": time.perf_counter() - t0, "results": res}
            print(f"timing {mname}: {time.perf_counter() - t0:.0f} s", flush=True)
            for key, v in res.items():
                print(f"  {key:22s} ratio {v['ratio_median']:.3f} "
                      f"[{v['ratio_min']:.3f}, {v['ratio_max']:.3f}]  "
                      f"{v['step_ms_mean_median']:.2f} ms/step", flush=True)
    return out


# -- part 2: one statistics pass against one Adam step -----------------------------------------


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def stats_pass(models: list[str], reps: int) -> dict[str, Any]:
    """Each statistics path against one foreach Adam step, alternating.

    Every rep runs, for each path in a rotating order, one Adam step and then that path
    (as in training, where the pass follows the step); a path's ratio is the median over
    reps of (pass time / the Adam step just before it), so load that comes and goes on a
    shared machine hits both sides of a ratio alike.
    """
    import lr_monitor.recording.recorder as recorder
    from lr_monitor import StepRecorder

    out: dict[str, Any] = {}
    for mname in models:
        bm = MODELS[mname]
        torch.manual_seed(0)
        net = bm.make()
        params = list(net.parameters())
        names = {p: n for n, p in net.named_parameters()}
        opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
        x, y = bm.batches()[0]
        bm.loss(net(x), y).backward()
        for _ in range(3):
            opt.step()
        paths: dict[str, Callable[[], object]] = {}
        # group/tensor: the default path (compiled kernels); eager: the fallback kernels;
        # generic: every ParamStep materialized (the path of the other optimizers).
        for key, gran, path in (("group", "group", "compiled"), ("tensor", "tensor", "compiled"),
                                ("eager", "group", "eager"), ("generic", "group", "eager")):
            rec = StepRecorder(opt, "Adam", should_record=lambda index: True,
                               granularity=gran, param_names=names, statistics=path)

            def full_pass(rec: StepRecorder = rec, generic: bool = key == "generic") -> None:
                real = recorder.moment_group
                if generic:
                    recorder.moment_group = lambda optimizer, group: None  # type: ignore[assignment]
                try:
                    rec.capture_gradients()  # the pre-clipping gradient norms, as in training
                    rec.measure()
                finally:
                    recorder.moment_group = real  # type: ignore[assignment]

            paths[f"monitor_{key}"] = full_pass

        def item_loop(params: list[nn.Parameter] = params,
                      opt: torch.optim.Optimizer = opt) -> None:
            copies = {p: p.detach().clone() for p in params}
            vals = [p.grad.norm().item() for p in params if p.grad is not None]
            for p in params:
                vals.append(p.detach().norm().item())
                vals.append((p.detach() - copies[p]).norm().item())
                vals.append(opt.state[p]["exp_avg"].norm().item())

        paths["item_loop"] = item_loop
        for fn in [opt.step, *paths.values()]:  # warm up (and compile) outside the timing
            fn()
        names_ = list(paths)
        times: dict[str, list[float]] = {k: [] for k in names_}
        adams: dict[str, list[float]] = {k: [] for k in names_}
        for r in range(reps):
            # As in training, every pass follows an Adam step (whose data it then reads).
            for k in names_[r % len(names_):] + names_[:r % len(names_)]:
                adams[k].append(_timed(opt.step))
                times[k].append(_timed(paths[k]))
        every_adam = [t for k in names_ for t in adams[k]]
        res: dict[str, Any] = {"adam_step_ms": 1e3 * statistics.median(every_adam),
                               "n_tensors": len(params),
                               "n_params": sum(p.numel() for p in params), "reps": reps}
        for k in names_:
            res[f"{k}_ms"] = 1e3 * statistics.median(times[k])
            res[f"{k}_over_adam"] = statistics.median(
                [a / b for a, b in zip(times[k], adams[k], strict=True)])
        out[mname] = res
        print(f"stats pass {mname}: Adam {res['adam_step_ms']:.2f} ms, monitor group "
              f"{res['monitor_group_over_adam']:.2f}×, tensor "
              f"{res['monitor_tensor_over_adam']:.2f}×, eager "
              f"{res['monitor_eager_over_adam']:.2f}×, generic "
              f"{res['monitor_generic_over_adam']:.2f}×, item loop "
              f"{res['item_loop_over_adam']:.2f}×", flush=True)
    return out


# -- part 3: peak RSS per configuration in a subprocess ----------------------------------------


def _vm_hwm_mb() -> float | None:
    """Peak resident set of this process image (``VmHWM``), in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_child(model: str, config: str, interval: int, steps: int) -> None:
    torch.set_num_threads(1)
    quiet()
    with tempfile.TemporaryDirectory() as tmp:
        fit_once(MODELS[model], config, interval, steps, tmp)
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"vm_hwm_mb": _vm_hwm_mb(), "ru_maxrss_mb": kb / 1024}))


def peak_rss(models: list[str], configs: list[str], interval: int, steps: int,
             parallel: int) -> dict[str, Any]:
    # ru_maxrss of a child counts the pages it shared with its parent at fork time (the
    # high-water mark of the forked image is carried over exec), so a child of a big
    # parent reports at least the parent's size. VmHWM belongs to the exec'ed image only:
    # it is the number used; ru_maxrss is kept in the JSON for reference.
    def one(job: tuple[str, str]) -> tuple[str, str, dict[str, Any]]:
        model, cfg = job
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", model, cfg,
               str(interval), str(steps)]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        try:
            d = json.loads(p.stdout.strip().splitlines()[-1])
            return model, cfg, {"maxrss_mb": d["vm_hwm_mb"] or d["ru_maxrss_mb"],
                                "ru_maxrss_mb": d["ru_maxrss_mb"], "error": None}
        except (ValueError, IndexError, KeyError):
            return model, cfg, {"maxrss_mb": None, "error": p.stderr[-500:]}

    jobs = [(m, c) for m in models for c in configs]
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(parallel) as ex:
        for model, cfg, res in ex.map(one, jobs):
            out.setdefault(model, {})[cfg] = res
    for d in out.values():
        base = d.get("baseline", {}).get("maxrss_mb")
        for v in d.values():
            v["ratio"] = v["maxrss_mb"] / base if base and v["maxrss_mb"] else None
    print(f"peak RSS: {len(jobs)} subprocesses in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


# -- report ------------------------------------------------------------------------------------


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt.format(v)


def markdown(doc: dict[str, Any]) -> str:
    cfgs: list[str] = doc["config"]["configs"]
    intervals: list[int] = doc["config"]["intervals"]
    lines = [f"# Overhead ({doc['config']['mode']})", "",
             f"{doc['machine']['nproc']} cores ({doc['machine']['cpu_model']}), torch "
             f"{doc['machine']['torch']}, pytorch_lightning "
             f"{doc['machine']['pytorch_lightning']}, wandb {doc['machine']['wandb']}, "
             "1 torch thread. Wall time "
             f"{doc['wall_s']:.0f} s.", ""]
    if doc.get("skipped"):
        lines += [f"Skipped: {doc['skipped']}", ""]
    lines += ["## Step time ratio to the no-callback baseline (median over rounds "
              "[min, max])", ""]
    for mname, m in doc["timing"].items():
        win = ", ".join(f"every {i}: {w['measure']} steps after {w['warmup']}"
                        for i, w in m["windows"].items())
        lines += [f"**{mname}** — {m['description']}; {m['rounds']} rounds; measured "
                  f"window per fit: {win}.", "",
                  "| config | " + " | ".join(f"every {i} step(s)" for i in intervals) + " |",
                  "|---|" + "---|" * len(intervals)]
        for c in cfgs:
            cells = []
            for i in intervals:
                v = m["results"].get(f"{c}@{i}")
                cells.append("–" if v is None else
                             f"{v['ratio_median']:.3f} [{v['ratio_min']:.2f}, "
                             f"{v['ratio_max']:.2f}] ({v['step_ms_mean_median']:.1f} ms)")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## One full statistics pass / one foreach Adam step (medians)", "",
              f"Compiled kernel: {doc.get('compile', {}).get('status', '–')} after "
              f"{_f(doc.get('compile', {}).get('seconds'), '{:.1f}')} s (one compile per "
              "process and dtype). group/tensor: the default path (compiled kernel); eager: "
              "the fallback kernel; generic: every ParamStep materialized (the path of the "
              "optimizers without a one-pass kernel).", "",
              "| model | tensors | Adam step | monitor (group) | monitor (tensor) | "
              "eager (group) | generic (group) | .item() loop |",
              "|---|---|---|---|---|---|---|---|"]
    for mname, r in doc["stats_pass"].items():
        cells = " | ".join(f"{r[f'{k}_over_adam']:.2f}× ({r[f'{k}_ms']:.2f} ms)" for k in (
            "monitor_group", "monitor_tensor", "monitor_eager", "monitor_generic", "item_loop"))
        lines.append(f"| {mname} | {r['n_tensors']} | {r['adam_step_ms']:.2f} ms | {cells} |")
    if doc.get("rss"):
        lines += ["", "## Peak RSS ratio to baseline (VmHWM of one fresh subprocess per "
                  "configuration, interval "
                  f"{doc['config']['rss_interval']})", "",
                  "| model | " + " | ".join(cfgs) + " |", "|---|" + "---|" * len(cfgs)]
        for mname, d in doc["rss"].items():
            cells = []
            for c in cfgs:
                v = d.get(c)
                cells.append("–" if v is None or v["ratio"] is None else
                             f"{v['ratio']:.3f} ({v['maxrss_mb']:.0f} MB)")
            lines.append(f"| {mname} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    for t in doc["targets"]:
        lines.append(f"* {t['target']}: {t['value']} → **{'met' if t['met'] else 'NOT met'}**")
    return "\n".join(lines) + "\n"


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(target: str, v: float, limit: float, fmt: str = "{:.3f}") -> None:
        out.append({"target": target, "value": fmt.format(v), "met": v <= limit})

    for mname, m in doc["timing"].items():
        res = m["results"]
        if mname == "many_10k":
            if "monitor_group@1" in res:
                add(f"{mname}: 10,000 tensors recorded every step ≤ 2× the baseline fit",
                    res["monitor_group@1"]["ratio_median"], 2.0)
        else:
            if "monitor_group@1" in res:
                add(f"{mname}: monitor every step ≤ 1.3×", res["monitor_group@1"]["ratio_median"],
                    1.3)
            if "monitor_group@50" in res:
                add(f"{mname}: monitor at the default interval (50) ≤ 1.01×",
                    res["monitor_group@50"]["ratio_median"], 1.01)
        for i in doc["config"]["intervals"]:
            for cfg in ("guard", "guard_deferred"):
                if f"{cfg}@{i}" in res:
                    add(f"{mname}: {cfg} (acts every step; logging every {i}) ≤ 1.02×",
                        res[f"{cfg}@{i}"]["ratio_median"], 1.02)
        for i in doc["config"]["intervals"]:
            peer = res.get(f"item_loop@{i}")
            for cfg in ("monitor_group", "monitor_tensor"):
                ours = res.get(f"{cfg}@{i}")
                if ours and peer:
                    out.append({"target": f"{mname}: {cfg} every {i} ahead of the .item() loop "
                                "(equal statistics)",
                                "value": f"{ours['ratio_median']:.3f} vs "
                                f"{peer['ratio_median']:.3f}",
                                "met": ours["ratio_median"] <= peer["ratio_median"]})
    for mname, r in doc["stats_pass"].items():
        if mname == "mlp_10m":
            add(f"{mname}: one statistics pass (compiled) ≤ 0.5× one Adam step",
                r["monitor_group_over_adam"], 0.5, "{:.2f}")
            add(f"{mname}: one statistics pass (eager fallback) ≤ 1.5× one Adam step",
                r["monitor_eager_over_adam"], 1.5, "{:.2f}")
        if mname == "small_2000":
            add(f"{mname}: one statistics pass on 2,000 small tensors ≤ 1.5× one Adam step",
                r["monitor_group_over_adam"], 1.5, "{:.2f}")
        out.append({"target": f"{mname}: one statistics pass (group) ahead of the .item() loop",
                    "value": f"{r['monitor_group_over_adam']:.2f} vs "
                    f"{r['item_loop_over_adam']:.2f}",
                    "met": r["monitor_group_over_adam"] <= r["item_loop_over_adam"]})
    return out


@dataclass
class Mode:
    models: tuple[str, ...]
    configs: tuple[str, ...]
    intervals: tuple[int, ...]
    rounds: dict[str, int]
    windows: dict[str, dict[int, tuple[int, int]]]  # model -> interval -> (warmup, measure)
    reps: int
    rss_models: tuple[str, ...]
    rss_configs: tuple[str, ...]
    rss_steps: int


#: Models timed with fewer configurations (the 10,000-tensor fit is slow in every one).
MODEL_CONFIGS = {"many_10k": ("baseline", "item_loop", "monitor_group", "monitor_eager")}

MODES = {
    "full": Mode(tuple(MODELS), CONFIGS, (1, 50),
                 {"digits_mlp": 5, "mlp_10m": 3, "many_tensors": 2, "small_2000": 2,
                  "many_10k": 2},
                 {"digits_mlp": {1: (10, 100), 50: (10, 200)},
                  "mlp_10m": {1: (3, 10), 50: (10, 50)},
                  "many_tensors": {1: (2, 4), 50: (10, 50)},
                  "small_2000": {1: (2, 6), 50: (10, 50)},
                  "many_10k": {1: (2, 4)}},
                 30, ("digits_mlp", "mlp_10m", "many_tensors"), CONFIGS, 61),
    "quick": Mode(("digits_mlp",), CONFIGS, (1, 50), {"digits_mlp": 3},
                  {"digits_mlp": {1: (10, 50), 50: (10, 100)}}, 20, ("digits_mlp",),
                  ("baseline", "monitor_group", "guard"), 61),
    "smoke": Mode(("digits_mlp",), ("baseline", "item_loop", "monitor_group", "guard"), (1,),
                  {"digits_mlp": 1}, {"digits_mlp": {1: (3, 10)}}, 3, ("digits_mlp",),
                  ("baseline", "guard"), 12),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="digits model only, < 2 minutes")
    g.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    ap.add_argument("--rounds", type=int, default=None, help="override rounds")
    ap.add_argument("--no-wandb", action="store_true", help="skip the wandb peer")
    ap.add_argument("--parts", default="stats,timing,rss",
                    help="comma list of stats,timing,rss; parts not run are kept from an "
                         "existing result file of the same mode")
    ap.add_argument("--rss-child", nargs=4, metavar=("MODEL", "CONFIG", "INTERVAL", "STEPS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    quiet()
    if args.rss_child:
        m, c, i, s = args.rss_child
        _rss_child(m, c, int(i), int(s))
        return 0
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[name]
    configs = list(mode.configs)
    skipped = None
    if "wandb" in configs:
        skipped = "wandb: --no-wandb given" if args.no_wandb else wandb_available()
        if skipped:
            print(f"skipping the wandb peer: {skipped}", flush=True)
            configs.remove("wandb")
    rounds = {m: args.rounds or r for m, r in mode.rounds.items()}
    t0 = time.perf_counter()
    doc: dict[str, Any] = {
        "config": {"mode": name, "models": list(mode.models), "configs": configs,
                   "intervals": list(mode.intervals), "rounds": rounds,
                   "rss_interval": mode.intervals[-1], "rss_steps": mode.rss_steps,
                   "command": " ".join([".venv/bin/python", "benchmarks/overhead.py",
                                        *(argv if argv is not None else sys.argv[1:])])},
        "machine": machine_info(),
        "skipped": skipped,
    }
    parts = set(args.parts.split(","))
    # The compiled statistics kernel, once per process (what "auto" does in the background
    # at a run's first recorded step); its one-time cost is reported, not timed per step.
    from lr_monitor.recording.compiler import MomentKernels

    state = MomentKernels("compiled").state(torch.float32, torch.device("cpu"))
    doc["compile"] = {"status": state.status if state else "off",
                      "seconds": state.seconds if state else None,
                      "error": state.error if state else None}
    print(f"compiled statistics kernel: {doc['compile']}", flush=True)
    stem = "overhead" if name == "full" else f"overhead_{name}"
    previous = args.out / f"{stem}.json"
    old = json.loads(previous.read_text()) if parts != {"stats", "timing", "rss"} \
        and previous.exists() else {}
    doc["stats_pass"] = stats_pass(list(mode.models), mode.reps) if "stats" in parts \
        else old["stats_pass"]
    doc["timing"] = timing(list(mode.models), configs, list(mode.intervals), rounds,
                           mode.windows) if "timing" in parts else old["timing"]
    doc["rss"] = peak_rss(list(mode.rss_models), [c for c in configs if c in mode.rss_configs],
                          mode.intervals[-1], mode.rss_steps, parallel=2) if "rss" in parts \
        else old["rss"]
    if old:
        doc["previous_wall_s"] = old.get("wall_s")
    doc["targets"] = targets(doc)
    doc["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
