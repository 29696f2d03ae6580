"""The callbacks work with the unified `lightning` package too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

L = pytest.importorskip("lightning.pytorch", reason="the 'lightning' package is not installed")


def test_callbacks_on_a_lightning_pytorch_trainer(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader, TensorDataset

    from lr_monitor.lightning import (
        DivergenceGuard,
        SharpnessMonitor,
        StepQualityMonitor,
        StepSizeMonitor,
    )

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if self.global_step == 6:
                loss = loss * float("nan")
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 4, generator=g),
                                    torch.randn(64, 1, generator=g)), batch_size=8)
    logger = TensorBoardLogger(str(tmp_path), name="L")
    guard = DivergenceGuard()
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_checkpointing=False,
                        callbacks=[StepSizeMonitor(2), guard, StepQualityMonitor(2),
                                   SharpnessMonitor(4, iters=5)])
    trainer.fit(Model(), data)
    assert [(e.step, e.kind) for e in guard.events] == [(6, "nonfinite")]
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "optim/update_norm/Adam/global" in tags
    assert "optim/step_quality/Adam/global" in tags
    assert "optim/stability_ratio/Adam/global" in tags
    assert (Path(logger.log_dir) / "events.jsonl").exists()
