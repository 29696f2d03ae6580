"""Shared helpers of the benchmarks: quiet Lightning, in-memory data, tasks, machine info.

Everything here is deterministic given a seed and uses only data bundled with
scikit-learn or generated on the fly (no download).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

Batch = tuple[Tensor, Tensor]


def quiet() -> None:
    """Silence Lightning's start-up chatter and the warnings tiny runs trigger."""
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric",
                 "lightning.fabric", "lr_monitor", "wandb"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


class Batches:
    """A re-iterable list of pre-made batches: no DataLoader, no collate cost.

    Lightning accepts any iterable with ``__len__``; a plain list would be taken as a
    collection of dataloaders. With ``shuffle_seed`` the batch order is permuted every
    epoch by a private generator (the global RNG is untouched).
    """

    def __init__(self, batches: Sequence[Batch], shuffle_seed: int | None = None) -> None:
        self.batches = list(batches)
        self._gen = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)

    def __iter__(self) -> Iterator[Batch]:
        if self._gen is None:
            return iter(self.batches)
        order = torch.randperm(len(self.batches), generator=self._gen).tolist()
        return iter([self.batches[i] for i in order])

    def __len__(self) -> int:
        return len(self.batches)


def make_batches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> list[Batch]:
    """Shuffle once with ``seed`` and cut into full batches (the remainder is dropped)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = len(x) // batch_size * batch_size
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(t - mu) / sd for t in (train, *others)]


def _split(n: int, seed: int, frac: float = 0.8) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(frac * n)
    return perm[:k], perm[k:]


def digits_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits: standardised 64 features, 80/20 split (split seed fixed to 0)."""
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.long)
    tr, va = _split(len(x), 0)
    xtr, xva = _standardise(x[tr], x[va])
    return xtr, y[tr], xva, y[va]


def diabetes_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's diabetes: standardised features and target, 80/20 split."""
    from sklearn.datasets import load_diabetes

    x_np, y_np = load_diabetes(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.float32).unsqueeze(1)
    tr, va = _split(len(x), 0)
    xtr, xva = _standardise(x[tr], x[va])
    ytr, yva = _standardise(y[tr], y[va])
    return xtr, ytr, xva, yva


def markov_data(vocab: int = 16, seq_len: int = 16, n_train: int = 1280, n_val: int = 256
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sequences from a fixed random Markov chain (each token has 2 likely successors).

    Inputs are tokens ``0..T-2``, targets tokens ``1..T-1``; the best achievable
    next-token accuracy is about 0.7.
    """
    g = torch.Generator().manual_seed(1234)
    probs = torch.full((vocab, vocab), 0.02 / vocab)
    for s in range(vocab):
        a, b = torch.randperm(vocab, generator=g)[:2].tolist()
        probs[s, a] += 0.7
        probs[s, b] += 0.28
    probs /= probs.sum(1, keepdim=True)
    n = n_train + n_val
    seq = torch.empty(n, seq_len + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(seq_len):
        seq[:, t + 1] = torch.multinomial(probs[seq[:, t]], 1, generator=g).squeeze(1)
    x, y = seq[:, :-1], seq[:, 1:]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# -- models ------------------------------------------------------------------------------


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions on the 8×8 digit images, max-pool, linear head (~3k params)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x.view(-1, 1, 8, 8)).flatten(1))


class TinyLM(nn.Module):
    """A one-layer causal Transformer (d=32, 2 heads), no dropout."""

    def __init__(self, vocab: int = 16, d: int = 32, seq_len: int = 16, layers: int = 1,
                 heads: int = 2, ff: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)
        mask = torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.out(h)


@dataclass(frozen=True)
class Task:
    """A training task of the divergence suite.

    ``higher_is_better`` tells how to read ``metric``; ``init_loss`` is the loss of an
    untrained model (ln C for classification, ≈1 for the standardised regression), used
    for EarlyStopping's absolute ``divergence_threshold``.
    """

    name: str
    metric: str
    higher_is_better: bool
    init_loss: float
    batch_size: int
    make_model: Callable[[], nn.Module]
    data: Callable[[], tuple[Tensor, Tensor, Tensor, Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    eval_fn: Callable[[Tensor, Tensor], float]


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _acc(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def _mse(pred: Tensor, y: Tensor) -> float:
    v = float(nn.functional.mse_loss(pred, y))
    return v if math.isfinite(v) else math.inf


TASKS: dict[str, Task] = {
    "digits_mlp": Task("digits_mlp", "val_acc", True, math.log(10), 128,
                       lambda: mlp([64, 64, 10]), digits_data, _ce, _acc),
    "digits_cnn": Task("digits_cnn", "val_acc", True, math.log(10), 64,
                       DigitsCNN, digits_data, _ce, _acc),
    "markov_lm": Task("markov_lm", "val_token_acc", True, math.log(16), 32,
                      TinyLM, markov_data, _ce, _acc),
    "diabetes": Task("diabetes", "val_mse", False, 1.0, 64,
                     lambda: mlp([10, 32, 1]), diabetes_data, nn.functional.mse_loss, _mse),
}


# -- machine -------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, Python/torch/Lightning versions (and wandb when installed)."""
    import pytorch_lightning as pl

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import wandb

        info["wandb"] = wandb.__version__
    except ImportError:
        info["wandb"] = None
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
            text=True, check=False).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    return info


def median(values: Sequence[float]) -> float:
    """Median ignoring NaN; NaN for an empty input."""
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return math.nan
    k = len(vals) // 2
    return vals[k] if len(vals) % 2 else 0.5 * (vals[k - 1] + vals[k])
