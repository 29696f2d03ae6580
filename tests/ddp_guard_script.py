"""Run by tests/test_guard_ddp.py: DDP on 2 CPU processes (gloo), a fault on rank 1 only.

``script OUT`` — a NaN loss and a spike on rank 1; ``script OUT poison`` — a NaN written
into rank 1's optimizer state just before a snapshot; ``script OUT snapfail`` — rank 1
fails to copy a snapshot, then a NaN loss on rank 1.

Each rank writes what it decided and where it ended to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lr_monitor import DivergenceGuard
from tests.lightning_models import Faulty, digits_loaders

warnings.filterwarnings("ignore")


class PoisonRankOne(pl.Callback):
    """At the end of step ``at`` on rank 1 only, a NaN into Adam's ``exp_avg_sq``: a state
    only one rank holds poisoned, just before the guard's snapshot of that step."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        if trainer.global_step == self.at and trainer.global_rank == 1:
            first = pl_module.net[0].weight
            with torch.no_grad():
                trainer.optimizers[0].state[first]["exp_avg_sq"][0, 0] = float("nan")


def main(out: Path, mode: str = "fault") -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    train, _ = digits_loaders()
    if mode == "poison":  # snapshots every 25 steps: the one at step 50 is poisoned
        model = Faulty(lr=1e-3, hidden=64)
        guard = DivergenceGuard(jsonl=False, snapshot_every_n_steps=25)
        callbacks: list[pl.Callback] = [PoisonRankOne(50), guard]
        steps = 60
    elif mode == "snapfail":  # rank 1 cannot copy its snapshot at step 20; NaN at 30
        model = Faulty(nan_at=(30,), rank=1, lr=1e-3, hidden=64)
        guard = DivergenceGuard(jsonl=False, snapshot_every_n_steps=10)
        callbacks = [guard]
        steps = 40
        if int(os.environ.get("LOCAL_RANK", "0")) == 1:
            copy = guard.snapshots.copy

            def failing(step: int, *args: object, **kwargs: object) -> object:
                if step == 20:
                    raise OSError("out of host memory (injected)")
                return copy(step, *args, **kwargs)  # type: ignore[arg-type]

            guard.snapshots.copy = failing  # type: ignore[method-assign]
    else:
        model = Faulty(nan_at=(6,), scale_at=(25,), scale=8.0, rank=1, lr=1e-3, hidden=64)
        guard = DivergenceGuard(jsonl=False)
        callbacks = [guard]
        steps = 40
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps,
                         callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(out))
    trainer.fit(model, train)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "snapshots": guard.snapshots.steps,
        "events": [[e.step, e.kind, list(e.actions)] for e in guard.events],
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "params": flat.tolist(),
        "finite": bool(torch.isfinite(flat).all()),
        "global_step": trainer.global_step,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
