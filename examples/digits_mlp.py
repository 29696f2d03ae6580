"""Digits MLP with StepSizeMonitor and DivergenceGuard: the everyday setup.

Trains an MLP on scikit-learn's bundled digits (no download). Run it at a sensible and a
too-high learning rate and compare in TensorBoard::

    python examples/digits_mlp.py --lr 1e-3
    python examples/digits_mlp.py --lr 1.0        # the guard rolls back and cuts the LR
    tensorboard --logdir lr_monitor_runs/examples
"""

from __future__ import annotations

import argparse
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from lr_monitor import DivergenceGuard, StepSizeMonitor


class DigitsMLP(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[: int(0.8 * len(x))], perm[int(0.8 * len(x)):]
    return (DataLoader(TensorDataset(x[tr], y[tr]), batch_size=32, shuffle=True),
            DataLoader(TensorDataset(x[va], y[va]), batch_size=256))


def main(argv: list[str] | None = None) -> DivergenceGuard:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps")
    parser.add_argument("--out", default="lr_monitor_runs/examples")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    train, val = loaders()
    guard = DivergenceGuard()
    trainer = pl.Trainer(
        max_epochs=args.epochs, max_steps=args.max_steps, accelerator="cpu",
        logger=TensorBoardLogger(args.out, name=f"digits-lr{args.lr:g}"),
        callbacks=[StepSizeMonitor(logging_interval=10), guard],
        log_every_n_steps=10, enable_checkpointing=False,
    )
    trainer.fit(DigitsMLP(args.lr), train, val)
    for event in guard.events:
        print(event.summary())
    print(f"guard events: {len(guard.events)}, lr scale {guard.lr_scale:g}; "
          f"logs in {trainer.logger.log_dir}")
    return guard


if __name__ == "__main__":
    main()
