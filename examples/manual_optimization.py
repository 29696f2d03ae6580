"""Manual optimization with two optimizers (a GAN-style split), monitored and guarded.

The generator and the discriminator each have their own optimizer; the monitor names them
``Adam`` and ``Adam-1`` and records each at its own steps. The guard watches the loss
passed to ``manual_backward`` and decides once per step for both optimizers::

    python examples/manual_optimization.py
"""

from __future__ import annotations

import argparse
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lr_monitor import DivergenceGuard, StepSizeMonitor


class TwoPlayer(pl.LightningModule):
    """A generator learns to produce samples of a 2-D Gaussian mixture; a critic judges."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 2))
        self.critic = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(),
                                          torch.nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_c = self.optimizers()
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        z = torch.randn(real.shape[0], 4, device=real.device)

        fake = self.gen(z).detach()
        c_loss = bce(self.critic(real), torch.ones(len(real), 1)) + bce(
            self.critic(fake), torch.zeros(len(fake), 1))
        opt_c.zero_grad()
        self.manual_backward(c_loss)
        opt_c.step()

        g_loss = bce(self.critic(self.gen(z)), torch.ones(len(real), 1))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log_dict({"train/critic_loss": c_loss, "train/gen_loss": g_loss})

    def configure_optimizers(self) -> Any:
        return (torch.optim.Adam(self.gen.parameters(), lr=1e-3, betas=(0.5, 0.999)),
                torch.optim.Adam(self.critic.parameters(), lr=1e-3, betas=(0.5, 0.999)))


def mixture(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    return centers[torch.randint(4, (n,), generator=g)] + 0.2 * torch.randn(n, 2, generator=g)


def main(argv: list[str] | None = None) -> DivergenceGuard:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=400,
                        help="optimizer steps (two per batch: critic and generator)")
    parser.add_argument("--out", default="lr_monitor_runs/examples")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    data = DataLoader(TensorDataset(mixture(4096)), batch_size=128, shuffle=True)
    guard = DivergenceGuard(on_spike="log")  # adversarial losses jump by design: record only
    trainer = pl.Trainer(
        max_steps=args.max_steps, accelerator="cpu",
        logger=TensorBoardLogger(args.out, name="two-optimizers"),
        callbacks=[StepSizeMonitor(logging_interval=10), guard],
        log_every_n_steps=10, enable_checkpointing=False,
    )
    trainer.fit(TwoPlayer(), data)
    print(f"guard events: {len(guard.events)}; logs in {trainer.logger.log_dir}")
    return guard


if __name__ == "__main__":
    main()
