"""What the callbacks need from Lightning: its package, a run's directory, the fp16 scaler.

Lightning ships under two import names: ``pytorch_lightning`` (the declared dependency)
and ``lightning.pytorch`` (the unified ``lightning`` package). A ``Trainer`` accepts only
callbacks derived from its own package's ``Callback``. :mod:`lr_monitor` builds its
callbacks on ``pytorch_lightning``; :mod:`lr_monitor.lightning` offers the same classes
built on ``lightning.pytorch``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

__all__ = ["UNSUPPORTED_STRATEGIES", "check_strategy", "grad_scaler", "is_tensorboard_logger",
           "logging_off", "loss_tensor", "pl", "rank_zero_warn", "run_dir"]

#: Strategies whose gradients, parameters or optimizer steps the callbacks cannot see as
#: they are (by class name, so that both Lightning packages match): why, and what to use.
UNSUPPORTED_STRATEGIES: dict[str, str] = {
    "DeepSpeedStrategy": (
        "DeepSpeed keeps gradients and optimizer state in its own partitioned flat buffers "
        "and steps its own optimizer, so parameters have no .grad to measure; use "
        "strategy='ddp', or ModelParallelStrategy with torch.distributed.fsdp.fully_shard "
        "(FSDP2) for sharding"),
    "FSDPStrategy": (
        "FSDP1 flattens and pads each rank's parameters into FlatParameter shards, so "
        "norms, counts and effective learning rates would describe padded pieces; use "
        "ModelParallelStrategy with torch.distributed.fsdp.fully_shard (FSDP2) in "
        "configure_model(), whose DTensor shards are supported"),
}


def check_strategy(trainer: Any, who: str) -> None:
    """Refuse a strategy the callbacks cannot measure (:data:`UNSUPPORTED_STRATEGIES`).

    Args:
        trainer: The trainer (its ``strategy`` is checked).
        who: The callback, for the message.

    Raises:
        RuntimeError: Naming the strategy, why, and what to use instead.
    """
    names = {c.__name__ for c in type(getattr(trainer, "strategy", None)).__mro__}
    for name, why in UNSUPPORTED_STRATEGIES.items():
        if name in names:
            raise RuntimeError(f"{who} does not support {name}: {why}.")


def is_tensorboard_logger(logger: object) -> bool:
    """A ``TensorBoardLogger`` of either Lightning package (checked by class name)."""
    return any(c.__name__ == "TensorBoardLogger" for c in type(logger).__mro__)


def run_dir(trainer: Any) -> Path:
    """Where a run's own files go: the logger's ``log_dir``, else ``default_root_dir``."""
    lg = trainer.logger
    lg_dir = getattr(lg, "log_dir", None) if lg is not None else None
    return Path(lg_dir) if lg_dir else Path(trainer.default_root_dir)


def grad_scaler(trainer: Any) -> Any:
    """The enabled fp16 ``GradScaler`` of the trainer's precision plugin, or ``None``."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    enabled = getattr(scaler, "is_enabled", None)
    return scaler if scaler is not None and callable(enabled) and enabled() else None


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log``/``log_dict`` while a callback re-runs a step."""


@contextmanager
def logging_off(module: Any) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` do nothing inside the block.

    For a callback that calls ``training_step`` itself (a re-run, a curvature probe): the
    values it logs must not reach the loggers. Instance attributes shadow the methods and
    are removed (or put back) afterwards.
    """
    names = ("log", "log_dict")
    saved = {n: module.__dict__[n] for n in names if n in module.__dict__}
    try:
        for n in names:
            module.__dict__[n] = _no_log
        yield
    finally:
        for n in names:
            if n in saved:
                module.__dict__[n] = saved[n]
            else:
                module.__dict__.pop(n, None)


def loss_tensor(output: Any, what: str) -> torch.Tensor:
    """The loss tensor in what ``training_step`` (or a ``loss_fn``) returned.

    A tensor, or a dict with a ``"loss"`` tensor; for a callback that re-computes a step's
    loss.

    Args:
        output: The return value.
        what: Who returned it, for the message (``"training_step"``, ``"loss_fn"``).

    Returns:
        The loss tensor.

    Raises:
        TypeError: For anything else (``None``, a dict without ``"loss"``), naming ``what``.
    """
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor):
        shown = "a dict without a 'loss' tensor" if isinstance(output, Mapping) \
            else type(output).__name__
        raise TypeError(f"{what} returned {shown}: a loss tensor or a dict with a 'loss' "
                        "tensor is needed (pass loss_fn=fn(module, batch) otherwise)")
    return loss
