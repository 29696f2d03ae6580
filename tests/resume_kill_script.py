"""Run by tests/test_alerts_lifecycle.py: a guarded run that checkpoints, then is SIGKILLed.

``python tests/resume_kill_script.py ROOT DEFERRED`` trains with a checkpoint every
:data:`EVERY` steps and kills itself with ``SIGKILL`` at the start of step :data:`KILL_AT`,
after the guard has written events (:data:`NAN_AT`, :data:`SPIKE_AT`) past the last
checkpoint. The test
resumes the run in its own process with :func:`make_trainer`.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lr_monitor import DivergenceGuard
from tests.lightning_models import Faulty, digits_loaders, trainer

#: Steps whose loss is NaN: one guard event (rollback and cut).
NAN_AT = (5,)
#: Steps whose loss is 1000 times too high: one guard event each. Finite, so that the
#: weights stay finite when the guard reads a step one step late (``deferred``) and a
#: rollback after the resume finds no snapshot yet.
SPIKE_AT = (19, 22, 25)
#: Checkpoint interval in optimizer steps: the last checkpoint before the kill is step 20.
EVERY = 10
#: The step at whose start the process kills itself.
KILL_AT = 27
#: Where the resumed run ends.
MAX_STEPS = 32


class Kill(pl.Callback):
    """SIGKILL this process at the start of step :data:`KILL_AT`: no teardown, no flush."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def make_trainer(root: Path, guard: DivergenceGuard,
                 *callbacks: pl.Callback) -> tuple[pl.Trainer, pl.LightningModule, Any]:
    """The run: trainer, model and training data, the same in both processes."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    train, _ = digits_loaders()
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=EVERY,
                           save_top_k=-1)
    tr = trainer(root, max_steps=MAX_STEPS, callbacks=[guard, ckpt, *callbacks],
                 logger=TensorBoardLogger(str(root), name="run", version=0),
                 enable_checkpointing=True, num_sanity_val_steps=0)
    return tr, Faulty(nan_at=NAN_AT, scale_at=SPIKE_AT, lr=1e-3, hidden=32), train


def main(root: Path, deferred: bool) -> None:
    warnings.filterwarnings("ignore")
    tr, model, train = make_trainer(root, DivergenceGuard(deferred=deferred), Kill())
    tr.fit(model, train)
    raise SystemExit("not killed")  # the test expects -SIGKILL


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] == "deferred")
