"""A small Transformer language model on generated sequences, monitored per tensor.

The data is generated: sequences from a random first-order Markov chain over a small
vocabulary, so the best achievable loss is the chain's entropy. The monitor records per
tensor for the attention blocks (``granularity="tensor"``), where Adam's effective step
sizes differ most between embeddings, attention and feed-forward weights::

    python examples/transformer_lm.py
    tensorboard --logdir lr_monitor_runs/examples
"""

from __future__ import annotations

import argparse
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lr_monitor import DivergenceGuard, StepSizeMonitor


def markov_sequences(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens from a random sparse Markov chain."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=g) * 3.0
    probs = torch.softmax(logits, dim=1)
    seqs = torch.empty(n, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(1, length):
        seqs[:, t] = torch.multinomial(probs[seqs[:, t - 1]], 1, generator=g).squeeze(1)
    return seqs


class TinyLM(pl.LightningModule):
    def __init__(self, vocab: int = 32, d_model: int = 64, layers: int = 2,
                 lr: float = 3e-3, context: int = 32) -> None:
        super().__init__()
        self.lr = lr
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.pos = torch.nn.Parameter(torch.zeros(context, d_model))
        block = torch.nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model,
                                                 dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d_model, vocab)
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        return self.head(self.blocks(h, mask=self.mask[:t, :t], is_causal=True))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (seq,) = batch
        logits = self(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 seq[:, 1:].reshape(-1))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "pos" not in n]
        no_decay = [p for n, p in self.named_parameters() if p.dim() < 2 or "pos" in n]
        return torch.optim.AdamW([
            {"params": decay, "weight_decay": 0.1, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ], lr=self.lr, betas=(0.9, 0.95))


def main(argv: list[str] | None = None) -> DivergenceGuard:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--out", default="lr_monitor_runs/examples")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    data = DataLoader(TensorDataset(markov_sequences(2048, 33, 32)), batch_size=32, shuffle=True)
    guard = DivergenceGuard()
    monitor = StepSizeMonitor(logging_interval=20, granularity="tensor",
                              include=r"blocks\.layers\.\d+\.(self_attn|linear)")
    trainer = pl.Trainer(
        max_steps=args.max_steps, accelerator="cpu", gradient_clip_val=1.0,
        logger=TensorBoardLogger(args.out, name="tiny-lm"), callbacks=[monitor, guard],
        log_every_n_steps=20, enable_checkpointing=False,
    )
    trainer.fit(TinyLM(lr=args.lr), data)
    print(f"guard events: {len(guard.events)}; logs in {trainer.logger.log_dir}")
    return guard


if __name__ == "__main__":
    main()
