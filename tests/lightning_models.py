"""Small real Lightning models on generated and scikit-learn data, shared by the tests."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def digits_loaders(batch_size: int = 32, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's bundled digits (8x8 images, 10 classes), standardised, 80/20 split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_train = int(0.8 * len(x))
    tr, va = perm[:n_train], perm[n_train:]
    train = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(x[va], y[va]), batch_size=256)
    return train, val


def regression_loader(n: int = 256, batch_size: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 2, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Regressor(pl.LightningModule):
    """A two-layer MLP; ``make_optimizer(module)`` returns what configure_optimizers does."""

    def __init__(self, make_optimizer: Callable[[pl.LightningModule], Any]) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 2))
        self._make = make_optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self) -> Any:
        return self._make(self)


class TwoOptimizers(Regressor):
    """Manual optimization: two optimizers on one backward pass, each stepping per batch.

    Override :meth:`second_steps` to step the second one on some batches only.
    """

    def __init__(self) -> None:
        super().__init__(lambda m: None)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        a, b = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        a.zero_grad(); b.zero_grad()  # noqa: E702
        self.manual_backward(loss)
        a.step()
        if self.second_steps(batch_idx):
            b.step()
        self.log("train/loss", loss)

    def second_steps(self, batch_idx: int) -> bool:
        """Whether the second optimizer steps on this batch."""
        return True

    def configure_optimizers(self) -> Any:
        return [torch.optim.Adam(self.net[0].parameters(), lr=1e-2),
                torch.optim.SGD(self.net[2].parameters(), lr=1e-2)]


class DigitsMLP(pl.LightningModule):
    """MLP 64-hidden-hidden-10 on digits."""

    def __init__(self, lr: float = 1e-3, hidden: int = 64, optimizer: str = "adam") -> None:
        super().__init__()
        self.lr = lr
        self.opt_name = optimizer
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, on_step=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val/loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        if self.opt_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer writing under tmp_path."""
    opts: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
        "enable_model_summary": False, "enable_checkpointing": False,
        "default_root_dir": str(tmp_path), "log_every_n_steps": 1,
    }
    opts.update(kwargs)
    return pl.Trainer(**opts)


class Faulty(DigitsMLP):
    """DigitsMLP whose loss is corrupted on chosen steps (fault injection).

    Args:
        nan_at: Optimizer steps whose loss becomes NaN.
        scale_at: Optimizer steps whose loss is multiplied by ``scale`` (a loss spike).
        rank: Only this global rank injects (``None``: every rank).
    """

    def __init__(self, *, nan_at: tuple[int, ...] = (), scale_at: tuple[int, ...] = (),
                 scale: float = 1e3, rank: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_at, self.scale_at, self.scale, self.rank = set(nan_at), set(scale_at), scale, rank

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.rank is None or self.global_rank == self.rank:
            if self.global_step in self.nan_at:
                loss = loss * float("nan")
            if self.global_step in self.scale_at:
                loss = loss * self.scale
        return loss


class HostReads(pl.Callback):
    """Counts the host reads issued from lr_monitor's own code, per ``global_step``.

    Patches ``tolist``, ``item``, ``cpu``, ``numpy`` and the scalar conversions of
    ``torch.Tensor`` for the test (through ``monkeypatch``); attach it as a callback so it
    knows the step. A GPU-ready callback reads the host once per recorded step, never else.
    """

    NAMES = ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch: Any) -> None:
        self.calls: list[int] = []
        self.step = -1
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrapper(tensor: torch.Tensor, *a: Any, _o: Any = orig, **k: Any) -> Any:
                caller = sys._getframe(1).f_code.co_filename
                if "lr_monitor" in caller and "tests" not in caller:
                    self.calls.append(self.step)
                return _o(tensor, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapper)

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self.step = trainer.global_step

    def per_step(self, steps: int) -> dict[int, int]:
        """Host reads at each of the first ``steps`` steps."""
        return {s: self.calls.count(s) for s in range(steps)}
