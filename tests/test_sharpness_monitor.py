"""SharpnessMonitor on real Trainers: tags, values, no effect on training, faults."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lr_monitor.alerts import read_events
from lr_monitor.callbacks.sharpness import SharpnessMonitor
from lr_monitor.faults import FAULT_KIND
from lr_monitor.functional.curvature import measure_curvature
from lr_monitor.recording.record import StepRecord
from lr_monitor.tags import CURVATURE_STATISTICS
from tests.lightning_models import (
    DigitsMLP,
    HostReads,
    TwoOptimizers,
    digits_loaders,
    regression_loader,
    trainer,
)
from tests.test_monitor import read_scalars

pytestmark = pytest.mark.filterwarnings("ignore:SharpnessMonitor.*did not converge")


def tag(stat: str, optimizer: str = "Adam") -> str:
    return f"optim/{stat}/{optimizer}/global"


class FirstBatch(pl.Callback):
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if not hasattr(self, "batch"):
            self.batch = [t.clone() for t in batch]


def test_logs_the_four_tags_with_the_values_of_the_functional(tmp_path: Path) -> None:
    train, _ = digits_loaders()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    monitor = SharpnessMonitor(every_n_steps=3, iters=20)
    records: list[StepRecord] = []
    monitor.subscribe(records.append)
    first = FirstBatch()
    tr = trainer(tmp_path, logger=logger, max_steps=7, callbacks=[first, monitor])
    model = DigitsMLP(lr=1e-2)
    tr.fit(model, train)
    tags = read_scalars(logger.log_dir)
    for stat in CURVATURE_STATISTICS:
        assert sorted(tags[tag(stat)]) == [0, 3, 6], stat
    assert [r.index for r in records] == [0, 3, 6]
    assert all(set(r.rows["global"]) == set(CURVATURE_STATISTICS) for r in records)
    assert tags[tag("stability_threshold")][6] == pytest.approx(38 / 1e-2)
    # The last measurement came after the last step: recompute it from the final state,
    # on the first training batch, with the loss training_step computes.
    opt = tr.optimizers[0]
    want = measure_curvature(
        model, lambda m, b: torch.nn.functional.cross_entropy(m.net(b[0]), b[1]),
        first.batch, opt, iters=20)[0]
    assert want.sharpness is not None
    logged = records[-1].rows["global"]
    assert logged["sharpness"] == pytest.approx(want.sharpness.value, rel=1e-6)
    assert logged["preconditioned_sharpness"] == pytest.approx(
        want.preconditioned_sharpness.value, rel=1e-6)
    assert logged["stability_ratio"] == pytest.approx(want.stability_ratio, rel=1e-6)
    assert tags[tag("stability_ratio")][6] == pytest.approx(logged["stability_ratio"], rel=1e-6)
    assert monitor.last["Adam"].stability_ratio == logged["stability_ratio"]


class Noisy(pl.LightningModule):
    """Dropout, BatchNorm and self.log: everything a re-run of training_step could disturb."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.opt_name = optimizer
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
            torch.nn.Dropout(0.3), torch.nn.Linear(32, 10))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, on_step=True)
        # Draws from Python's and NumPy's generators (augmentations do): a re-run must not
        # shift them.
        self.log("train/draw", random.random() + float(np.random.rand()), on_step=True)
        return {"loss": loss}

    def configure_optimizers(self) -> Any:
        if self.opt_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(tmp_path: Path, name: str, optimizer: str, callbacks: list[Any]
         ) -> tuple[Noisy, pl.Trainer, dict[str, dict[int, float]]]:
    pl.seed_everything(0, verbose=False)
    train, _ = digits_loaders()
    model = Noisy(optimizer)
    logger = TensorBoardLogger(str(tmp_path), name=name)
    tr = trainer(tmp_path, logger=logger, max_steps=8, callbacks=callbacks)
    tr.fit(model, train)
    return model, tr, read_scalars(logger.log_dir)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_is_identical_with_and_without_the_monitor(tmp_path: Path,
                                                            optimizer: str) -> None:
    plain, tr_plain, tags_plain = _fit(tmp_path, "plain", optimizer, [])
    monitor = SharpnessMonitor(every_n_steps=2, iters=4)
    watched, tr_watched, tags = _fit(tmp_path, "watched", optimizer, [monitor])
    assert len(tags[tag("sharpness", "Adam" if optimizer == "adam" else "SGD")]) == 4
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics, bit for bit
    s_plain = tr_plain.optimizers[0].state_dict()["state"]
    s_watched = tr_watched.optimizers[0].state_dict()["state"]
    for k in s_plain:
        for key, v in s_plain[k].items():
            assert torch.equal(v, s_watched[k][key]), key
    assert tags["train/loss"] == tags_plain["train/loss"]  # self.log silenced when re-run
    assert tags["train/draw"] == tags_plain["train/draw"]  # random and NumPy restored


def test_sgd_ratio_is_the_raw_sharpness_over_the_heavy_ball_threshold(tmp_path: Path) -> None:
    monitor = SharpnessMonitor(every_n_steps=4, iters=10)
    _, _, tags = _fit(tmp_path, "sgd", "sgd", [monitor])
    assert tags[tag("preconditioned_sharpness", "SGD")] == tags[tag("sharpness", "SGD")]
    threshold = (2 + 2 * 0.9) / 0.05
    assert tags[tag("stability_threshold", "SGD")][4] == pytest.approx(threshold)
    assert tags[tag("stability_ratio", "SGD")][4] == pytest.approx(
        tags[tag("sharpness", "SGD")][4] / threshold, rel=1e-6)


def _raise(module: Any, batch: Any) -> torch.Tensor:
    raise RuntimeError("injected fault")


def test_a_fault_is_reported_once_and_training_goes_on(tmp_path: Path) -> None:
    train, _ = digits_loaders()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    tr = trainer(tmp_path, logger=logger, max_steps=6,
                 callbacks=[SharpnessMonitor(every_n_steps=1, loss_fn=_raise)])
    tr.fit(DigitsMLP(), train)
    assert tr.global_step == 6
    faults = [e for e in read_events(Path(logger.log_dir) / "events.jsonl")
              if e.kind == FAULT_KIND]
    assert [e.signal for e in faults] == ["SharpnessMonitor/measure"]
    assert "RuntimeError: injected fault" in faults[0].message
    assert not any("sharpness" in t for t in read_scalars(logger.log_dir))


def test_manual_optimization_needs_a_loss_fn_and_gets_one_row_per_optimizer(
        tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^loss_fn=None is invalid: must be a callable"):
        trainer(tmp_path, max_steps=2, callbacks=[SharpnessMonitor()]).fit(
            TwoOptimizers(), regression_loader())

    def mse(module: Any, batch: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(module.net(batch[0]), batch[1])

    x, y = next(iter(regression_loader(batch_size=64)))
    logger = TensorBoardLogger(str(tmp_path), name="two")
    monitor = SharpnessMonitor(every_n_steps=2, loss_fn=mse, batch=(x, y), iters=8,
                               mode="eval")

    class StillTraining(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            assert all(m.training for m in module.modules())  # eval mode was undone

    tr = trainer(tmp_path, logger=logger, max_steps=8, callbacks=[monitor, StillTraining()])
    tr.fit(TwoOptimizers(), regression_loader())
    tags = read_scalars(logger.log_dir)
    for name in ("Adam", "SGD"):
        assert sorted(tags[tag("stability_ratio", name)]) == [0, 2], name
    assert tags[tag("stability_threshold", "SGD")][0] == pytest.approx(2 / 1e-2)
    assert tags[tag("preconditioned_sharpness", "SGD")] == tags[tag("sharpness", "SGD")]


def test_host_transfers_one_per_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    reads = HostReads(monkeypatch)

    train, _ = digits_loaders()
    tr = trainer(tmp_path, logger=False, max_steps=6,
                 callbacks=[reads, SharpnessMonitor(every_n_steps=4, iters=3)])
    tr.fit(DigitsMLP(), train)
    assert reads.per_step(6) == {0: 1, 1: 0, 2: 0, 3: 0, 4: 1, 5: 0}


def test_state_dict_round_trip() -> None:
    monitor = SharpnessMonitor()
    monitor.load_state_dict({"step_counts": {"Adam": 7}, "batches": 7})
    assert monitor.state_dict() == {"step_counts": {"Adam": 7}, "batches": 7}
    assert SharpnessMonitor(prefix="x").state_key != monitor.state_key


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"every_n_steps": 0}, "every_n_steps=0"),
    ({"iters": 0}, "iters=0"),
    ({"tol": -1.0}, "tol=-1.0"),
    ({"loss_fn": "mse"}, "loss_fn='mse'"),
    ({"raw_sharpness": 1}, "raw_sharpness=1"),
    ({"mode": "test"}, "mode='test'"),
    ({"seed": -2}, "seed=-2"),
    ({"prefix": ""}, "prefix=''"),
], ids=["every", "iters", "tol", "loss-fn", "raw", "mode", "seed", "prefix"])
def test_bad_arguments_name_themselves(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match="^" + match + " is invalid: must be"):
        SharpnessMonitor(**kwargs)
