"""Which Lightning package the callbacks subclass.

Lightning ships under two import names: ``pytorch_lightning`` (the declared dependency)
and ``lightning.pytorch`` (the unified ``lightning`` package). A ``Trainer`` accepts only
callbacks derived from its own package's ``Callback``. :mod:`lr_monitor` builds its
callbacks on ``pytorch_lightning``; :mod:`lr_monitor.lightning` offers the same classes
built on ``lightning.pytorch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn

__all__ = ["is_tensorboard_logger", "pl", "rank_zero_warn", "run_dir"]


def is_tensorboard_logger(logger: object) -> bool:
    """A ``TensorBoardLogger`` of either Lightning package (checked by class name)."""
    return any(c.__name__ == "TensorBoardLogger" for c in type(logger).__mro__)


def run_dir(trainer: Any) -> Path:
    """Where a run's own files go: the logger's ``log_dir``, else ``default_root_dir``."""
    lg = trainer.logger
    lg_dir = getattr(lg, "log_dir", None) if lg is not None else None
    return Path(lg_dir) if lg_dir else Path(trainer.default_root_dir)
