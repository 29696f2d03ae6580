"""Run by tests/test_guard_ddp.py: DDP on 2 CPU processes (gloo), a fault on rank 1 only.

Each rank writes what it decided and where it ended to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lr_monitor import DivergenceGuard
from tests.lightning_models import Faulty, digits_loaders

warnings.filterwarnings("ignore")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    train, _ = digits_loaders()
    model = Faulty(nan_at=(6,), scale_at=(25,), scale=8.0, rank=1, lr=1e-3, hidden=64)
    guard = DivergenceGuard(jsonl=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=40,
                         callbacks=[guard], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(out))
    trainer.fit(model, train)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "events": [[e.step, e.kind, list(e.actions)] for e in guard.events],
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "params": flat.tolist(),
        "finite": bool(torch.isfinite(flat).all()),
        "global_step": trainer.global_step,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
