"""StepSizeMonitor on a real Trainer, read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lr_monitor import StepSizeMonitor, attach
from lr_monitor.functional import effective_lr, last_update, optimizer_steps
from tests.lightning_models import (
    HostReads,
    Regressor,
    TwoOptimizers,
    regression_loader,
    trainer,
)

OPTIMIZERS = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9),
    "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=1e-2),
}


def read_scalars(log_dir: str | Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


class Oracle(pl.Callback):
    """Computes the expected statistics from lr_monitor.functional with full tensors."""

    def __init__(self) -> None:
        self.expected: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self._grad = torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()
                                if p.grad is not None]).double().norm().item()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        opt = trainer.optimizers[0]
        step = trainer.global_step - 1
        upd = last_update(opt)
        eff = effective_lr(opt)
        ps = [p for g in opt.param_groups for p in g["params"]]
        cat = lambda d: torch.cat([d[p].reshape(-1) for p in ps]).double()  # noqa: E731
        u, e = cat(upd), cat(eff)
        theta = torch.cat([p.detach().reshape(-1) for p in ps]).double()
        exp = {
            "update_norm": u.norm().item(), "param_norm": theta.norm().item(),
            "update_ratio": (u.norm() / theta.norm()).item(), "grad_norm": self._grad,
            "eff_lr/min": e.min().item(), "eff_lr/max": e.max().item(),
            "eff_lr/p50": torch.quantile(e, 0.5).item(), "lr": opt.param_groups[0]["lr"],
        }
        first = [s.first_moment for g in optimizer_steps(opt) for s in g]
        if all(f is not None for f in first):
            exp["exp_avg_norm"] = torch.cat([f.reshape(-1) for f in first]).double().norm().item()
        self.expected[step] = exp


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_tensorboard_values_equal_functional(tmp_path: Path, opt_name: str) -> None:
    model = Regressor(OPTIMIZERS[opt_name])
    oracle = Oracle()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    tr = trainer(tmp_path, logger=logger, max_steps=7,
                 callbacks=[StepSizeMonitor(logging_interval=3), oracle])
    tr.fit(model, regression_loader())
    scalars = read_scalars(logger.log_dir)
    name = type(tr.optimizers[0]).__name__
    for stat in ("lr", "eff_lr/p05", "eff_lr/p50", "eff_lr/p95", "eff_lr/min", "eff_lr/max",
                 "grad_norm", "param_norm", "update_norm", "update_ratio", "nonfinite"):
        for row in ("pg0", "global"):
            tag = f"optim/{stat}/{name}/{row}"
            assert tag in scalars, tag
            assert sorted(scalars[tag]) == [0, 3, 6], tag  # every 3rd step, the first included
    assert f"optim/update_cosine/{name}/global" in scalars
    assert sorted(scalars[f"optim/update_cosine/{name}/global"]) == [3, 6]
    for step in (0, 3, 6):
        exp = oracle.expected[step]
        for stat, value in exp.items():
            got = scalars[f"optim/{stat}/{name}/global"][step]
            rel = 0.05 if stat == "eff_lr/p50" else 1e-5  # histogram quantile vs exact
            assert got == pytest.approx(value, rel=rel), (step, stat)
        assert scalars[f"optim/nonfinite/{name}/global"][step] == 0
    if opt_name in ("adam", "adamw", "rmsprop", "adagrad"):
        assert f"optim/eps_dominated_frac/{name}/global" in scalars
        assert f"optim/exp_avg_sq_sqrt_mean/{name}/global" in scalars
    # custom scalars layout and effective-lr histograms are in the event file
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    assert f"optim/log10_eff_lr/{name}/pg0" in acc.Tags()["histograms"]


def test_two_optimizers_and_named_groups(tmp_path: Path) -> None:
    class TwoOpt(TwoOptimizers):
        def configure_optimizers(self) -> Any:
            first, second = self.net[0], self.net[2]
            return [
                torch.optim.Adam([{"params": [first.weight], "name": "w", "lr": 1e-2},
                                  {"params": [first.bias], "name": "b", "lr": 1e-3}]),
                torch.optim.Adam(second.parameters(), lr=5e-3),
            ]

    logger = TensorBoardLogger(str(tmp_path), name="two")
    tr = trainer(tmp_path, logger=logger, max_steps=4, callbacks=[StepSizeMonitor(1)])
    tr.fit(TwoOpt(), regression_loader())
    tags = read_scalars(logger.log_dir)
    for tag in ("optim/lr/Adam/w", "optim/lr/Adam/b", "optim/lr/Adam-1/pg0",
                "optim/update_norm/Adam/global", "optim/update_norm/Adam-1/global"):
        assert tag in tags, tag
    assert tags["optim/lr/Adam/w"][0] == pytest.approx(1e-2)
    assert tags["optim/lr/Adam/b"][0] == pytest.approx(1e-3)
    assert "optim/lr/Adam/global" not in tags  # groups disagree: no single global lr


def test_csv_logger_gets_scalars_and_one_histogram_warning(tmp_path: Path) -> None:
    logger = CSVLogger(str(tmp_path), name="csv")
    tr = trainer(tmp_path, logger=logger, max_steps=4, callbacks=[StepSizeMonitor(2)])
    with pytest.warns(UserWarning, match="histograms need a TensorBoardLogger") as rec:
        tr.fit(Regressor(OPTIMIZERS["adam"]), regression_loader())
    assert sum("histograms need" in str(w.message) for w in rec) == 1
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    vals = [float(r["optim/update_ratio/Adam/global"]) for r in rows
            if r.get("optim/update_ratio/Adam/global")]
    assert len(vals) == 2 and all(math.isfinite(v) and v > 0 for v in vals)


def test_scheduler_frozen_params_and_accumulation(tmp_path: Path) -> None:
    def make(m: Any) -> Any:
        m.net[0].weight.requires_grad_(False)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    logger = TensorBoardLogger(str(tmp_path), name="sched")
    tr = trainer(tmp_path, logger=logger, max_steps=4, accumulate_grad_batches=2,
                 callbacks=[StepSizeMonitor(1)])
    tr.fit(Regressor(make), regression_loader())
    tags = read_scalars(logger.log_dir)
    # the lr the step used: 0.1, 0.05, 0.025, 0.0125 on optimizer steps 0..3
    assert [tags["optim/lr/Adam/pg0"][s] for s in range(4)] == pytest.approx(
        [0.1, 0.05, 0.025, 0.0125])


def test_unknown_optimizer_uses_the_documented_fallback(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="rprop")
    seen: dict[int, float] = {}

    class Delta(pl.Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self.before = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *a: Any) -> None:
            d = torch.cat([(p.detach() - b).reshape(-1)
                           for p, b in zip(pl_module.parameters(), self.before, strict=True)])
            seen[trainer.global_step - 1] = d.double().norm().item()

    tr = trainer(tmp_path, logger=logger, max_steps=3, callbacks=[StepSizeMonitor(1), Delta()])
    with pytest.warns(UserWarning, match="no exact update rule for Rprop"):
        tr.fit(Regressor(lambda m: torch.optim.Rprop(m.parameters(), lr=0.01)),
               regression_loader())
    tags = read_scalars(logger.log_dir)
    for step, value in seen.items():
        assert tags["optim/update_norm/Rprop/global"][step] == pytest.approx(value, rel=1e-5)


def test_tensor_granularity_with_filters(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tensor")
    mon = StepSizeMonitor(1, granularity="tensor", include=r"weight", exclude=r"^net\.2")
    tr = trainer(tmp_path, logger=logger, max_steps=2, callbacks=[mon])
    tr.fit(Regressor(OPTIMIZERS["adam"]), regression_loader())
    tags = read_scalars(logger.log_dir)
    assert "optim/update_ratio/Adam/net.0.weight" in tags
    assert not any(t.endswith("net.0.bias") or t.endswith("net.2.weight") for t in tags)


@pytest.mark.parametrize("consecutive", [False, True], ids=["default", "consecutive"])
def test_host_transfers_one_per_recorded_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              consecutive: bool) -> None:
    """Count every host read issued from lr_monitor code, step by step.

    With ``consecutive=True`` the every-step statistics run on all 8 steps, and their means
    still ride in the recorded steps' one transfer.
    """
    reads = HostReads(monkeypatch)

    logger = TensorBoardLogger(str(tmp_path), name="count")
    monitor = StepSizeMonitor(4, consecutive=consecutive)
    records: list[Any] = []
    monitor.subscribe(records.append)
    tr = trainer(tmp_path, logger=logger, max_steps=8, callbacks=[reads, monitor])
    tr.fit(Regressor(OPTIMIZERS["adam"]), regression_loader())
    per_step = reads.per_step(8)
    assert per_step == {0: 1, 1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 0, 7: 0}
    # steps 2, 3 and 4 have a cosine; their means are in the record of step 4
    assert (records[1].value("consecutive_update_cosine") is not None) == consecutive


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"update_cosine": "False"}, "update_cosine='False'"),
    ({"grad_histograms": "yes"}, "grad_histograms='yes'"),
    ({"custom_scalars": 0}, "custom_scalars=0"),
    ({"log_global": "False"}, "log_global='False'"),
    ({"include": 5}, "include=5"),
    ({"exclude": 5}, "exclude=5"),
    ({"logging_interval": 0}, "logging_interval=0"),
    ({"logging_interval": 2.5}, "logging_interval=2.5"),
    ({"granularity": "layer"}, "granularity='layer'"),
    ({"include": "("}, "include='\\('"),
    ({"histogram_every_n_steps": -1}, "histogram_every_n_steps=-1"),
    ({"cosine_samples": 0}, "cosine_samples=0"),
    ({"prefix": ""}, "prefix=''"),
], ids=["cosine-str", "grad-hist-str", "custom-scalars-int", "global-str", "include-int",
        "exclude-int", "interval-zero", "interval-float", "granularity", "regex",
        "hist-negative", "cosine-samples", "prefix-empty"])
def test_bad_arguments_name_themselves(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match="^" + match):
        StepSizeMonitor(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"every_n_steps": 0}, "every_n_steps=0"),
    ({"update_cosine": "False"}, "update_cosine='False'"),
    ({"log_global": "no"}, "log_global='no'"),
    ({"prefix": ""}, "prefix=''"),
    ({"prefix": 5}, "prefix=5"),
    ({"name": 5}, "name=5"),
    ({"model": "m"}, "model='m'"),
])
def test_attach_bad_arguments_name_themselves(kwargs: dict[str, Any], match: str) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="^" + match):
        attach(opt, lambda metrics, step: None, **kwargs)
    with pytest.raises(ValueError, match=r"^optimizer=None is invalid"):
        attach(None, lambda metrics, step: None)  # type: ignore[arg-type]


def test_state_dict_in_checkpoint(tmp_path: Path) -> None:
    mon = StepSizeMonitor(2)
    tr = trainer(tmp_path, max_steps=4, callbacks=[mon], enable_checkpointing=False)
    tr.fit(Regressor(OPTIMIZERS["adam"]), regression_loader())
    ckpt = tmp_path / "c.ckpt"
    tr.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"][mon.state_key]
    assert state == {"recorded_steps": 2, "step_counts": {"Adam": 4}, "batches": 4}
    other = StepSizeMonitor(2)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert not mon.recorders  # hooks removed on teardown
    assert not tr.optimizers[0]._optimizer_step_post_hooks


def test_attach_in_a_plain_loop(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    writer = SummaryWriter(str(tmp_path))
    handle = attach(opt, writer, every_n_steps=2, model=model, granularity="tensor")
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        handle.capture_gradients()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
    handle.detach()
    writer.close()
    tags = read_scalars(tmp_path)
    assert sorted(tags["optim/update_norm/RMSprop/global"]) == [0, 2, 4]
    assert "optim/update_ratio/RMSprop/weight" in tags
    # the recorded grad norm is the unclipped one
    assert tags["optim/grad_norm/RMSprop/global"][4] > 1e-3
    assert not opt._optimizer_step_post_hooks


# ------------------------------------------------------------------ every optimizer, every dtype


def test_manual_optimization_records_every_optimizer_on_self_logs_axis(tmp_path: Path) -> None:
    """Each opt.step() advances global_step; each optimizer still records every 2nd step."""
    logger = TensorBoardLogger(str(tmp_path), name="manual")
    tr = trainer(tmp_path, logger=logger, max_steps=12, callbacks=[StepSizeMonitor(2)])
    tr.fit(TwoOptimizers(), regression_loader())
    assert tr.global_step == 12  # 6 batches, 2 optimizer steps each
    tags = read_scalars(logger.log_dir)
    assert sorted(tags["train/loss"]) == [0, 1, 2, 3, 4, 5]
    assert sorted(tags["optim/update_norm/Adam/global"]) == [0, 2, 4]
    assert sorted(tags["optim/update_norm/SGD/global"]) == [0, 2, 4]


class CriticEveryOtherBatch(TwoOptimizers):
    """GAN-critic pattern: the second optimizer steps on even batches only."""

    def second_steps(self, batch_idx: int) -> bool:
        return batch_idx % 2 == 0


def test_an_optimizer_that_steps_every_other_batch_is_plotted_at_its_batches(
        tmp_path: Path) -> None:
    class Norms(pl.Callback):
        def __init__(self) -> None:
            self.sgd: dict[int, float] = {}

        def on_train_batch_start(self, trainer: Any, pl_module: Any, *a: Any) -> None:
            self.before = pl_module.net[2].weight.detach().clone()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            if batch_idx % 2 == 0:  # SGD stepped: its own step count is batch_idx // 2
                delta = pl_module.net[2].weight.detach() - self.before
                self.sgd[batch_idx] = delta.double().norm().item()

    logger = TensorBoardLogger(str(tmp_path), name="critic")
    norms = Norms()
    tr = trainer(tmp_path, logger=logger, max_epochs=1,
                 callbacks=[StepSizeMonitor(2, granularity="tensor"), norms])
    tr.fit(CriticEveryOtherBatch(), regression_loader())  # 8 batches
    tags = read_scalars(logger.log_dir)
    assert sorted(tags["optim/update_norm/Adam/global"]) == [0, 2, 4, 6]
    # SGD's own steps 0, 2 happen at batches 0 and 4: plotted there, on self.log's axis.
    sgd = tags["optim/update_norm/SGD/net.2.weight"]
    assert sorted(sgd) == [0, 4]
    for batch_idx, value in sgd.items():
        assert value == pytest.approx(norms.sgd[batch_idx], rel=1e-5)


def test_a_group_added_mid_run_to_an_optimizer_without_a_rule(tmp_path: Path) -> None:
    class GrowsAGroup(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 2:
                extra = torch.nn.Parameter(torch.zeros(3))
                self.extra = extra
                self.optimizers().optimizer.add_param_group({"params": [extra]})
            loss = super().training_step(batch, batch_idx)
            return loss + (self.extra.sum() ** 2 if hasattr(self, "extra") else 0)

    logger = TensorBoardLogger(str(tmp_path), name="grow")
    tr = trainer(tmp_path, logger=logger, max_steps=6, callbacks=[StepSizeMonitor(1)])
    with pytest.warns(UserWarning, match="no exact update rule for Rprop"):
        tr.fit(GrowsAGroup(lambda m: torch.optim.Rprop(m.parameters(), lr=0.01)),
               regression_loader())
    tags = read_scalars(logger.log_dir)
    assert sorted(tags["optim/update_norm/Rprop/pg0"]) == [0, 1, 2, 3, 4, 5]
    assert not (Path(logger.log_dir) / "events.jsonl").exists()  # no fault


def test_resume_continues_each_optimizers_step_count(tmp_path: Path) -> None:
    mon = StepSizeMonitor(2)
    tr = trainer(tmp_path, max_steps=6, callbacks=[mon])
    tr.fit(TwoOptimizers(), regression_loader())
    ckpt = tmp_path / "c.ckpt"
    tr.save_checkpoint(ckpt)
    logger = TensorBoardLogger(str(tmp_path), name="resumed")
    tr2 = trainer(tmp_path, logger=logger, max_steps=12, max_epochs=3,
                  callbacks=[StepSizeMonitor(2)])
    tr2.fit(TwoOptimizers(), regression_loader(), ckpt_path=str(ckpt))
    tags = read_scalars(logger.log_dir)
    assert sorted(tags["optim/update_norm/SGD/global"]) == [4]  # steps 3, 4, 5 of each


class Bf16Ones(pl.LightningModule):
    """Weights of 1.0 in bf16; AdamW's lr·sign step (~lr) is below half an ulp of 1.0."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Linear(8, 2, bias=False)
        torch.nn.init.ones_(self.net.weight)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class AppliedDelta(pl.Callback):
    """Measures θ_after − θ_before of every step in float64."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.before = [p.detach().double().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *a: Any) -> None:
        d = torch.cat([(p.detach().double() - b).reshape(-1)
                       for p, b in zip(pl_module.parameters(), self.before, strict=True)])
        self.norms[trainer.global_step - 1] = d.norm().item()


def test_bf16_weights_that_do_not_move_are_reported_as_not_moving(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="bf16")
    delta = AppliedDelta()
    tr = trainer(tmp_path, logger=logger, max_steps=3, precision="bf16-true",
                 callbacks=[StepSizeMonitor(1), delta])
    tr.fit(Bf16Ones(lr=1e-3), regression_loader())
    tags = read_scalars(logger.log_dir)
    assert set(delta.norms.values()) == {0.0}  # the weights really did not move
    for step in range(3):
        assert tags["optim/update_norm/AdamW/global"][step] == 0.0
        assert tags["optim/update_ratio/AdamW/global"][step] == 0.0
        assert tags["optim/update_lost_frac/AdamW/global"][step] == 1.0


def test_bf16_update_norm_is_the_applied_update(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="bf16-moving")
    delta = AppliedDelta()
    tr = trainer(tmp_path, logger=logger, max_steps=4, precision="bf16-true",
                 callbacks=[StepSizeMonitor(1), delta])
    tr.fit(Regressor(lambda m: torch.optim.Adam(m.parameters(), lr=3e-3)), regression_loader())
    tags = read_scalars(logger.log_dir)
    assert min(delta.norms.values()) > 0
    lost = [tags["optim/update_lost_frac/Adam/global"][s] for s in range(4)]
    assert all(0.0 <= v < 1.0 for v in lost) and max(lost) > 0  # some updates rounded away
    for step, value in delta.norms.items():
        assert tags["optim/update_norm/Adam/global"][step] == pytest.approx(value, rel=1e-6)


def test_float32_updates_are_not_lost(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="fp32")
    tr = trainer(tmp_path, logger=logger, max_steps=2, callbacks=[StepSizeMonitor(1)])
    tr.fit(Regressor(OPTIMIZERS["adam"]), regression_loader())
    tags = read_scalars(logger.log_dir)
    assert tags["optim/update_lost_frac/Adam/global"] == {0: 0.0, 1: 0.0}


class SparseEmbedding(pl.LightningModule):
    """Token classification with ``nn.Embedding(sparse=True)``: sparse gradients."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8, sparse=True)
        self.head = torch.nn.Linear(8, 3)
        self._make = make

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, y = batch
        return torch.nn.functional.cross_entropy(self.head(self.emb(tokens).mean(1)), y)

    def configure_optimizers(self) -> Any:
        if self._make is SPARSE["sparse-adam"]:
            self.head.requires_grad_(False)  # SparseAdam takes sparse gradients only
        return self._make(self)


def token_loader() -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (64, 5), generator=g)
    return DataLoader(TensorDataset(tokens, tokens[:, 0] % 3), batch_size=16)


SPARSE = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1),
    "sparse-adam": lambda m: torch.optim.SparseAdam([m.emb.weight], lr=0.01),
}


@pytest.mark.parametrize("opt_name", list(SPARSE))
def test_sparse_gradients_get_real_statistics(tmp_path: Path, opt_name: str) -> None:
    class Grad(pl.Callback):
        def __init__(self) -> None:
            self.norms: dict[int, float] = {}

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            g = pl_module.emb.weight.grad
            if g is not None:
                self.norms[trainer.global_step] = g.coalesce().values().double().norm().item()

    logger = TensorBoardLogger(str(tmp_path), name="sparse")
    grad = Grad()
    model = SparseEmbedding(SPARSE[opt_name])
    delta = AppliedDelta()
    callbacks: list[pl.Callback] = [StepSizeMonitor(1, granularity="tensor"), grad, delta]
    tr = trainer(tmp_path, logger=logger, max_steps=3, callbacks=callbacks)
    tr.fit(model, token_loader())
    tags = read_scalars(logger.log_dir)
    name = {"sgd": "SGD", "adagrad": "Adagrad", "sparse-adam": "SparseAdam"}[opt_name]
    emb = tags[f"optim/grad_norm/{name}/emb.weight"]
    assert len(emb) == 3 and all(math.isfinite(v) and v > 0 for v in emb.values())
    for step, value in emb.items():
        assert value == pytest.approx(grad.norms[step], rel=1e-6)
    for step, value in delta.norms.items():
        assert tags[f"optim/update_norm/{name}/global"][step] == pytest.approx(value, rel=1e-5)


def test_differentiable_optimizer_is_recorded() -> None:
    """``differentiable=True`` (meta-learning) used to raise from the post-step hook."""
    torch.manual_seed(0)
    base = torch.randn(6, dtype=torch.float64, requires_grad=True)
    p = base.clone()  # a non-leaf parameter: the step stays part of the autograd graph
    opt = torch.optim.Adam([p], lr=1e-2, differentiable=True)
    seen: list[dict[str, float]] = []
    handle = attach(opt, lambda metrics, step: seen.append(metrics))
    for k in range(3):
        p.grad = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64) * (k + 1)
        before = p.detach().clone()
        opt.step()
        delta = (p.detach() - before).norm().item()
        assert seen[-1]["optim/update_norm/Adam/global"] == pytest.approx(delta, rel=1e-9)
    handle.detach()
    p.sum().backward()  # the graph through the steps is intact
    assert base.grad is not None and len(seen) == 3


# ------------------------------------------------------------------ records and listeners


def test_listeners_get_every_record_before_it_is_logged(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from lr_monitor.recording import StepRecord
    from lr_monitor.tags import parse_stat_tag

    order: list[tuple[str, str, int]] = []
    real_log = StepSizeMonitor._log

    def log(trainer: Any, metrics: dict[str, float], step: int) -> None:
        parsed = parse_stat_tag(next(iter(metrics)))
        assert parsed is not None
        order.append(("log", parsed[1], step))
        real_log(trainer, metrics, step)

    monkeypatch.setattr(StepSizeMonitor, "_log", staticmethod(log))
    records: list[StepRecord] = []

    def listener(record: StepRecord) -> None:
        records.append(record)
        order.append(("record", record.optimizer, record.index))

    logger = TensorBoardLogger(str(tmp_path), name="listen")
    mon = StepSizeMonitor(2, log_global=False)
    mon.subscribe(listener)  # before the recorders exist
    mon.subscribe(listener)  # once only
    tr = trainer(tmp_path, logger=logger, max_steps=12, callbacks=[mon])
    tr.fit(TwoOptimizers(), regression_loader())
    assert [(r.optimizer, r.index) for r in records] == [
        (o, i) for i in (0, 2, 4) for o in ("Adam", "SGD")]
    # each record reaches the listener before the monitor logs it
    assert [e[0] for e in order] == ["record", "log"] * 6
    assert [e[1] for e in order[::2]] == [e[1] for e in order[1::2]]
    tags = read_scalars(logger.log_dir)
    for r in records:
        assert r.groups == ("pg0",) and r.value("update_norm") is not None
        # the global row is always in the record, logged only with log_global=True
        assert r.value("update_norm") == pytest.approx(r.value("update_norm", "pg0"))
        assert f"optim/update_norm/{r.optimizer}/global" not in tags
        logged = tags[f"optim/update_norm/{r.optimizer}/pg0"][r.index]
        assert logged == pytest.approx(r.value("update_norm", "pg0"), rel=1e-6)
    mon.unsubscribe(listener)
    mon.unsubscribe(listener)  # not subscribed: nothing happens
    with pytest.raises(ValueError, match=r"^listener=5 is invalid"):
        mon.subscribe(5)  # type: ignore[arg-type]


def test_a_failing_listener_is_reported_once_and_logging_goes_on(tmp_path: Path) -> None:
    from lr_monitor.eventlog import read_events

    def broken(record: Any) -> None:
        raise RuntimeError("listener bug")

    logger = TensorBoardLogger(str(tmp_path), name="broken")
    mon = StepSizeMonitor(1)
    mon.subscribe(broken)
    tr = trainer(tmp_path, logger=logger, max_steps=4, callbacks=[mon])
    tr.fit(Regressor(OPTIMIZERS["adam"]), regression_loader())
    faults = read_events(Path(logger.log_dir) / "events.jsonl")
    assert [e.signal for e in faults] == ["StepSizeMonitor/listener"]
    assert "RuntimeError: listener bug" in faults[0].message
    assert sorted(read_scalars(logger.log_dir)["optim/update_norm/Adam/global"]) == [0, 1, 2, 3]


def test_recorder_publishes_records_and_attach_writes_what_the_config_logs() -> None:
    from lr_monitor.recording import RecorderConfig, StepRecord, StepRecorder

    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([{"params": [p], "name": "w"}], lr=0.5)
    written: list[tuple[int, dict[str, float]]] = []
    records: list[StepRecord] = []
    handle = attach(opt, lambda metrics, step: written.append((step, metrics)),
                    every_n_steps=2, log_global=False, listeners=[records.append])
    rec = handle.recorder
    assert rec.config == RecorderConfig(log_global=False)
    assert handle.latest == {} and rec.last_record is None
    for _ in range(3):
        p.grad = torch.tensor([1.0, 0.0])
        opt.step()
    assert [r.index for r in records] == [0, 2] and rec.last_record is records[-1]
    assert [step for step, _ in written] == [0, 2]
    assert handle.latest == written[-1][1] == rec.config.metrics(records[-1])
    assert "optim/update_norm/SGD/w" in handle.latest
    assert not any(tag.endswith("/global") for tag in handle.latest)
    assert records[-1].value("update_norm") == pytest.approx(0.5)  # global row, not logged
    assert records[-1].value("lr") == 0.5  # one group: the global lr is the group's
    handle.unsubscribe(records.append)
    p.grad = torch.tensor([1.0, 0.0])
    opt.step()
    opt.step()
    assert len(records) == 2 and [s for s, _ in written] == [0, 2, 4]
    handle.detach()

    standalone = StepRecorder(opt, "SGD", should_record=lambda index: True)
    with pytest.raises(ValueError, match=r"^listener=None is invalid"):
        standalone.subscribe(None)  # type: ignore[arg-type]


def test_a_failing_recorder_listener_is_disabled_alone() -> None:
    from lr_monitor.faults import FaultBarrier
    from lr_monitor.recording import StepRecord, StepRecorder

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p], lr=0.1)
    reported: list[Any] = []
    seen: list[StepRecord] = []
    calls = {"broken": 0}

    def broken(record: StepRecord) -> None:
        calls["broken"] += 1
        raise RuntimeError("boom")

    rec = StepRecorder(opt, "Adam", should_record=lambda index: True,
                       listeners=[broken, seen.append],
                       faults=FaultBarrier("X", report=reported.append))
    rec.attach()
    for _ in range(3):
        p.grad = torch.ones(2)
        opt.step()
    rec.detach()
    assert calls["broken"] == 1 and len(seen) == 3 and not rec.disabled
    assert [e.signal for e in reported] == ["X/listener"]


def test_recorder_config_validates_under_the_users_names() -> None:
    from lr_monitor.recording import RecorderConfig

    config = RecorderConfig(granularity="tensor", include="weight", exclude=r"^head\.")
    assert config.tensor_row("net.0.weight") and not config.tensor_row("net.0.bias")
    assert not config.tensor_row("head.weight") and not config.tensor_row(None)
    assert not RecorderConfig().tensor_row("net.0.weight")  # group granularity
    assert RecorderConfig(**config.as_kwargs()) == config
    for kwargs, match in (({"prefix": "/x"}, "prefix='/x'"), ({"exclude": ")"}, "exclude='\\)'"),
                          ({"cosine_samples": True}, "cosine_samples=True"),
                          ({"granularity": "layer"}, "granularity='layer'")):
        with pytest.raises(ValueError, match="^" + match + " is invalid: must be"):
            RecorderConfig(**kwargs)
