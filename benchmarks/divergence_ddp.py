"""The divergence suite under DDP: 2 CPU processes (gloo), each rank on its own batches.

Every run is a real ``Trainer(strategy="ddp", devices=2, accelerator="cpu").fit`` in a
subprocess of its own (Lightning starts rank 1 by running this script again with
``LOCAL_RANK`` set). Rank ``r`` trains on every second batch of the single-process suite's
shuffled batches, starting at ``r``, so the global batch is twice the suite's and the two
ranks see different data: their losses and gradients differ, and the guard's decisions
come from the rank-averaged signals (one all-reduce per step).

Each rank writes what its guard did and a hash of its final weights; the driver checks
that **both ranks took the same decisions and ended bit-identical**, and summarises the
runs as :mod:`divergence_suite` does (the tuned learning rates are the single-process
suite's, ``--tuned-from``; "within 10 %" is judged against the DDP run at that learning
rate without a guard, same seed).

Usage::

    .venv/bin/python benchmarks/divergence_ddp.py                      # default grid
    .venv/bin/python benchmarks/divergence_ddp.py --seeds 1 --mults 1,1000 --out /tmp/x

Outputs (``--out``): ``<stem>.json``, ``.csv``, ``.md`` as the suite writes them, plus the
rank-agreement count in the JSON (``ranks_agree``) and the Markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from common import RESULTS, TASKS, Batches, machine_info, make_batches, quiet
from divergence_suite import (
    RunResult,
    RunSpec,
    _callbacks,
    _data,
    _module_class,
    _row,
    blowup_step,
    delay_table,
    guard_events,
    healthy_actions,
    markdown,
    metric_table,
    recovery_table,
    summarize,
    write,
)

WORLD = 2
POLICIES = ("none", "guard")


def worker(spec: RunSpec, out: Path) -> None:
    """One rank of one DDP run; writes ``out/rank<r>.json``."""
    import pytorch_lightning as pl

    from lr_monitor import DivergenceGuard

    torch.set_num_threads(1)
    quiet()
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    task = TASKS[spec.task]
    xtr, ytr, xva, yva = _data(task)
    batches = make_batches(xtr, ytr, task.batch_size, spec.seed)
    n = len(batches) // WORLD
    mine = batches[rank::WORLD][:n]  # equal counts: no rank waits for a missing batch
    train = Batches(mine, shuffle_seed=spec.seed * WORLD + rank)
    torch.manual_seed(spec.seed)  # the same initial weights on both ranks (DDP checks)
    module = _module_class()(task, spec.optimizer, spec.lr, plateau=False)
    probe = _callbacks()["Probe"]()
    callbacks: list[Any] = [probe]
    guard = None
    if spec.policy == "guard":
        guard = DivergenceGuard(log_events=False, jsonl=False)
        callbacks.append(guard)
    elif spec.policy != "none":
        raise ValueError(f"unknown policy {spec.policy!r}")
    error = None
    trainer = pl.Trainer(
        max_steps=spec.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=WORLD, strategy="ddp", limit_val_batches=0, num_sanity_val_steps=0,
        log_every_n_steps=10, default_root_dir=str(out), callbacks=callbacks,
        use_distributed_sampler=False)
    try:
        trainer.fit(module, train_dataloaders=train)
    except Exception as e:  # recorded; the driver reports it
        error = f"{type(e).__name__}: {e}"
    module.net.eval()
    with torch.no_grad():
        metric = task.eval_fn(module.net(xva), yva)
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    events = [] if guard is None else [
        [e.step, e.kind, e.signal, [str(a) for a in e.actions]] for e in guard.events]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "losses": probe.losses, "lrs": probe.lrs,
        "metric": metric if metric is not None and math.isfinite(metric) else None,
        "events": events, "stopped": bool(trainer.should_stop) or error is not None,
        "weights": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
        "error": error,
    }))


def run(spec: RunSpec, port: int) -> tuple[RunResult, bool]:
    """Launch one DDP run; ``(result, ranks agree)``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONWARNINGS="ignore")
        env.pop("LOCAL_RANK", None)
        proc = subprocess.run([sys.executable, __file__, "--worker",
                               json.dumps(asdict(spec)), tmp], env=env, capture_output=True,
                              text=True, timeout=1800)
        ranks = []
        for r in range(WORLD):
            path = Path(tmp) / f"rank{r}.json"
            ranks.append(json.loads(path.read_text()) if path.exists() else None)
    if proc.returncode != 0 or any(r is None for r in ranks):
        tail = (proc.stderr or "")[-500:]
        res = RunResult(spec=spec, steps_run=0, init_loss=math.nan,
                        final_train_loss=math.nan, metric=None, blowup_step=None,
                        wall_s=time.perf_counter() - t0,
                        error=f"exit {proc.returncode}: {tail}")
        return res, False
    r0, r1 = ranks
    assert r0 is not None and r1 is not None
    agree = r0["events"] == r1["events"] and r0["weights"] == r1["weights"]
    steps = min(len(r0["losses"]), len(r1["losses"]))
    losses = [(a + b) / 2 for a, b in zip(r0["losses"][:steps], r1["losses"][:steps],
                                          strict=True)]
    acted = [e for e in r0["events"] if set(e[3]) - {"log"}]
    interventions = [(int(e[0]), "+".join(e[3])) for e in acted]
    stopped = r0["stopped"] or steps < spec.steps
    if stopped and not any("stop" in a for _, a in interventions):
        interventions.append((max(steps - 1, 0), "stop"))
    tail_losses = losses[-10:]
    init = losses[0] if losses else math.nan
    return RunResult(
        spec=spec, steps_run=steps, init_loss=init,
        final_train_loss=sum(tail_losses) / len(tail_losses) if tail_losses else math.nan,
        metric=r0["metric"], blowup_step=blowup_step(losses, init),
        interventions=interventions, causes=[f"{e[1]}/{e[2]}" for e in acted],
        stopped=stopped, wall_s=time.perf_counter() - t0, error=r0["error"]), agree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--tasks", default="digits_mlp,digits_cnn,diabetes")
    ap.add_argument("--optimizers", default="adam,sgd")
    ap.add_argument("--mults", default="1,10,100,1000")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--tuned-from", type=Path, default=RESULTS / "divergence_v2.json")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--stem", default="divergence_ddp")
    args = ap.parse_args(argv)
    if args.worker:
        worker(RunSpec(**json.loads(args.worker[0])), Path(args.worker[1]))
        return 0
    tuned = json.loads(args.tuned_from.read_text())["tuned"]
    tasks = args.tasks.split(",")
    optimizers = args.optimizers.split(",")
    mults = [float(m) for m in args.mults.split(",")]
    specs = [RunSpec(task=t, optimizer=o, lr=tuned[f"{t}/{o}"]["lr"] * m,
                     lr_mult=m, seed=s, policy=p, steps=args.steps)
             for s in range(args.seeds) for t in tasks for o in optimizers for m in mults
             for p in POLICIES]
    t0 = time.perf_counter()
    runs: list[RunResult] = []
    agree = 0
    port = 29700 + os.getpid() % 200
    for i, spec in enumerate(specs, 1):
        res, ok = run(spec, port + i % 50)
        runs.append(res)
        agree += ok
        if res.error:
            print(f"  {spec}: {res.error}", flush=True)
        if i % 10 == 0:
            print(f"  {i}/{len(specs)} runs, {time.perf_counter() - t0:.0f} s", flush=True)
    policies = list(POLICIES)
    doc: dict[str, Any] = {
        "config": {"mode": "ddp", "world_size": WORLD, "tasks": tasks,
                   "optimizers": optimizers, "lr_mults": mults, "seeds": args.seeds,
                   "steps": args.steps, "policies": policies, "n_runs": len(runs),
                   "errors": sum(r.error is not None for r in runs),
                   "tuned_from": str(args.tuned_from),
                   "command": " ".join([Path(sys.executable).name, *sys.argv])},
        "machine": machine_info(),
        "tuned": {k: v for k, v in tuned.items() if k.split("/")[0] in tasks},
        "ranks_agree": {"runs": len(runs), "agree": agree},
        "summary": summarize(runs, policies),
        "delays": delay_table(runs, policies),
        "recovery": recovery_table(runs, policies),
        "healthy_actions": healthy_actions(runs),
        "metric_table": metric_table(runs, policies),
        "guard_events": guard_events(runs),
        "runs": [_row(r) for r in runs],
        "wall_s": time.perf_counter() - t0,
    }
    paths = write(doc, runs, args.out, args.stem)
    with paths[2].open("a") as f:
        f.write(f"\n**Ranks agree** (same events and bit-identical final weights on both "
                f"ranks): {agree} of {len(runs)} runs.\n")
    print(markdown(doc))
    print(f"ranks agree: {agree}/{len(runs)}; wrote {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
