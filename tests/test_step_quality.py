"""Step quality ρ = (L_B(θ+Δ) − L_B(θ)) / (g_B·Δ): closed forms, exact replay, no disturbance.

Unit tests of :mod:`lr_monitor.recording.step_quality` against closed forms in float64 and
integration tests of :class:`~lr_monitor.callbacks.step_quality.StepQualityMonitor` on real
Trainers. Run as a script (``python tests/test_step_quality.py OUT``) this file is the DDP
worker of :func:`test_ddp_averages_losses_across_ranks`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lr_monitor.alerts import read_events
from lr_monitor.callbacks.step_quality import StepQualityMonitor
from lr_monitor.guard.interventions import skip_step
from lr_monitor.recording.record import StepRecord
from lr_monitor.recording.step_quality import (
    BufferState,
    RNGState,
    StepQualityMeter,
    StepQualityValues,
    replay,
    step_alpha,
    step_quality,
)
from tests.lightning_models import (
    HostReads,
    Regressor,
    TwoOptimizers,
    regression_loader,
    trainer,
)

ROOT = Path(__file__).resolve().parents[1]

# -- closed forms -------------------------------------------------------------------------


def _hessian(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random SPD H = Q diag(λ) Qᵀ in float64: (H, eigenvalues, eigenvectors as columns)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.5, 4.0, n, dtype=torch.float64)
    return q @ torch.diag(lam) @ q.T, lam, q


def _gd_rho(h: torch.Tensor, theta0: torch.Tensor, lr: float, steps: int,
            make_opt: Any = None) -> list[StepQualityValues]:
    """Measure every step of an optimizer on L(θ) = ½θᵀHθ with the meter (plain loop)."""
    theta = nn.Parameter(theta0.clone())
    opt = (make_opt or (lambda p: torch.optim.SGD([p], lr=lr)))(theta)
    meter = StepQualityMeter()

    def loss_fn() -> torch.Tensor:
        return 0.5 * theta @ h @ theta

    out = []
    for t in range(steps):
        meter.start()
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        assert meter.capture([theta]) == 1
        opt.step()
        out.append(StepQualityValues.from_tensor(t, meter.measure(loss, loss_fn)))
    return out


def test_formula_and_alpha() -> None:
    assert step_quality(2.0, 1.5, -1.0) == 0.5
    assert step_quality(2.0, 2.5, -1.0) == -0.5  # the loss went up: overshoot
    assert math.isnan(step_quality(1.0, 1.0, 0.0))
    assert math.isnan(step_quality(math.nan, 1.0, -1.0))
    assert [step_alpha(r) for r in (1.0, 0.5, 0.0)] == [-1.0, 0.0, 1.0]
    v = StepQualityValues(3, 2.0, 2.5, -1.0)
    assert (v.rho, v.alpha, v.descent) == (-0.5, 2.0, True)
    assert v.rows() == {"global": {"step_quality": -0.5, "step_alpha": 2.0, "step_slope": -1.0}}


@pytest.mark.parametrize("eta_lambda", [0.1, 1.0, 1.5, 1.9, 2.0, 2.5])
def test_gd_along_an_eigenvector_gives_one_minus_half_eta_lambda(eta_lambda: float) -> None:
    h, lam, q = _hessian()
    for k in (0, 3, 5):  # several eigen-directions
        lr = eta_lambda / float(lam[k])
        # ηλ = 1 lands on the minimum: later steps start from rounding noise
        for v in _gd_rho(h, 0.7 * q[:, k], lr, steps=1 if eta_lambda == 1.0 else 4):
            assert v.rho == pytest.approx(1 - eta_lambda / 2, abs=1e-10)
            assert v.alpha == pytest.approx(eta_lambda - 1, abs=1e-10)


def test_any_direction_any_optimizer_matches_the_quadratic_model() -> None:
    """On a quadratic ρ = 1 + ½ΔᵀHΔ/(gᵀΔ) for any step Δ (here Adam and heavy ball)."""
    h, _, _ = _hessian(seed=1)
    theta0 = torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for make in (lambda p: torch.optim.Adam([p], lr=0.3),
                 lambda p: torch.optim.SGD([p], lr=0.2, momentum=0.9)):
        param = nn.Parameter(theta0.clone())
        opt = make(param)
        meter = StepQualityMeter()

        def loss_fn(p: torch.Tensor = param) -> torch.Tensor:
            return 0.5 * p @ h @ p

        for t in range(8):
            before = param.detach().clone()
            meter.start()
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            g = param.grad.clone()
            meter.capture([param])
            opt.step()
            delta = param.detach() - before
            expected = 1 + 0.5 * float(delta @ h @ delta) / float(g @ delta)
            got = StepQualityValues.from_tensor(t, meter.measure(loss, loss_fn))
            assert got.rho == pytest.approx(expected, abs=1e-10)
            assert got.slope == pytest.approx(float(g @ delta), rel=1e-12)


def test_slope_divides_out_a_gradient_scale_and_skips_parameters_without_gradient() -> None:
    a = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    frozen = nn.Parameter(torch.ones(3, dtype=torch.float64))
    a.grad = torch.tensor([3.0, -1.0], dtype=torch.float64) * 1024.0
    meter = StepQualityMeter()
    assert meter.capture([a, frozen, a], grad_scale=torch.tensor(1024.0)) == 1
    with torch.no_grad():
        a -= torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert float(meter.slope()) == 3.0 * -0.5 + -1.0 * -0.25


def test_sixteen_bit_parameters_are_measured_in_float32() -> None:
    p = nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.bfloat16))
    p.grad = torch.tensor([1.0, 1.0], dtype=torch.bfloat16)
    meter = StepQualityMeter()
    meter.capture([p])
    with torch.no_grad():
        p -= torch.tensor([2.0**-4, 2.0**-4], dtype=torch.bfloat16)
    slope = meter.slope()
    assert slope.dtype == torch.float64 and float(slope) == -(2.0**-3)


def test_loss_function_must_return_one_number() -> None:
    meter = StepQualityMeter()
    with pytest.raises(RuntimeError, match="start"):
        meter.loss_after(lambda: torch.zeros(()))
    meter.start()
    with pytest.raises(TypeError, match=r"1-element tensor.*\(2,\)"):
        meter.loss_after(lambda: torch.zeros(2))


# -- the re-run leaves no trace -----------------------------------------------------------


def test_rng_state_covers_torch_numpy_and_python() -> None:
    state = RNGState.capture()
    first = (torch.rand(3), np.random.rand(3), random.random())
    state.restore()
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_buffers_come_back_even_when_replaced() -> None:
    class Replaces(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count = self.count + 1  # a new tensor, not an in-place change
            return self.bn(x)

    m = Replaces()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    original = m.count
    saved = BufferState.capture(m)
    m(torch.randn(8, 3))
    assert m.count is not original
    saved.restore()
    assert m.count is original
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_replay_restores_the_stream_and_buffers_when_the_block_raises() -> None:
    bn = nn.BatchNorm1d(2)
    start = RNGState.capture()
    torch.rand(5)
    reached = torch.get_rng_state()
    with pytest.raises(ZeroDivisionError), replay(start, bn):
        bn(torch.randn(4, 2))
        assert not torch.is_grad_enabled()
        1 // 0  # noqa: B018
    assert torch.equal(torch.get_rng_state(), reached)
    assert int(bn.num_batches_tracked) == 0 and torch.is_grad_enabled()


def test_rerun_reproduces_the_dropout_masks_bit_for_bit() -> None:
    """Before the step, the re-run must give the training loss exactly: same masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5), nn.Linear(64, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def loss_fn() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    meter = StepQualityMeter()
    for _ in range(3):
        meter.start()
        loss = loss_fn()
        loss.backward()
        again = meter.loss_after(loss_fn, model)
        assert again.item() == loss.item()  # bit for bit (as float32 → float64)
        other = loss_fn().item()  # another draw of the masks
        assert other != loss.item()


# -- Lightning ----------------------------------------------------------------------------


class Quadratic(pl.LightningModule):
    """L(θ) = ½ Σ λ_i θ_i² (elementwise: no op autocast would lower), SGD with ``lr``."""

    def __init__(self, lam: torch.Tensor, theta0: torch.Tensor, lr: float,
                 fused: bool = False) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta0.clone())
        self.register_buffer("lam", lam.clone())
        self.lr, self.fused = lr, fused

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = 0.5 * (self.lam * self.theta * self.theta).sum()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([self.theta], lr=self.lr, fused=self.fused or None)


def _dummy(n: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def read_scalars(log_dir: str | Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_trainer_quadratic_is_exact_published_and_logged(tmp_path: Path) -> None:
    lam = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    eta = 1.5 / 2.0  # ηλ = 1.5 along e_1: ρ = 0.25
    monitor = StepQualityMonitor(every_n_steps=3)
    records: list[StepRecord] = []
    monitor.subscribe(records.append)
    logger = TensorBoardLogger(str(tmp_path), name="q")
    tr = trainer(tmp_path, logger=logger, max_steps=10, precision="64-true",
                 callbacks=[monitor])
    tr.fit(Quadratic(lam, torch.tensor([0.0, 0.8, 0.0], dtype=torch.float64), eta), _dummy())
    assert [r.index for r in records] == [0, 3, 6, 9]
    assert {r.optimizer for r in records} == {"SGD"}
    for r in records:
        assert r.value("step_quality") == pytest.approx(0.25, abs=1e-10)
        assert r.value("step_alpha") == pytest.approx(0.5, abs=1e-10)
    scalars = read_scalars(logger.log_dir)
    rho = scalars["optim/step_quality/SGD/global"]
    alpha = scalars["optim/step_alpha/SGD/global"]
    assert sorted(rho) == sorted(alpha) == [0, 3, 6, 9]
    assert all(v == pytest.approx(0.25, abs=1e-6) for v in rho.values())
    assert all(v == pytest.approx(0.5, abs=1e-6) for v in alpha.values())
    assert monitor.measured == 4 and monitor.last is not None and monitor.last.step == 9


@pytest.mark.parametrize("fused", [False, True], ids=["unscaled-by-lightning", "fused"])
def test_fp16_grad_scaler_gradients_are_unscaled(tmp_path: Path, fused: bool) -> None:
    from pytorch_lightning.plugins.precision import MixedPrecision

    lam = torch.tensor([1.0, 3.0])
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu",
                                                                           init_scale=1024.0))
    monitor = StepQualityMonitor(every_n_steps=1)
    tr = trainer(tmp_path, logger=False, max_steps=4, plugins=[plugin], callbacks=[monitor])
    tr.fit(Quadratic(lam, torch.tensor([0.0, 1.0]), 0.5, fused=fused), _dummy())
    assert monitor.measured == 4 and monitor.last is not None
    assert monitor.last.rho == pytest.approx(1 - 0.5 * 3.0 / 2, abs=1e-5)


def test_a_step_the_grad_scaler_skips_is_not_measured(tmp_path: Path) -> None:
    from pytorch_lightning.plugins.precision import MixedPrecision

    class Overflow(Quadratic):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * math.inf if batch_idx == 1 else loss

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    monitor = StepQualityMonitor(every_n_steps=1)
    records: list[StepRecord] = []
    monitor.subscribe(records.append)
    tr = trainer(tmp_path, logger=False, max_steps=3, plugins=[plugin], callbacks=[monitor])
    tr.fit(Overflow(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]), 0.5), _dummy())
    assert [r.index for r in records] == [0, 2] and not monitor.faults.faults


class DropBN(pl.LightningModule):
    """Dropout, BatchNorm, and draws from NumPy and Python ``random`` in the training step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                 nn.Dropout(0.3), nn.Linear(32, 2))
        self.log_calls = 0
        self.steps_run = 0

    def log(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self.log_calls += 1
        super().log(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        self.steps_run += 1
        x, y = batch
        jitter = (1 + 1e-3 * random.random()) * (1 + 1e-3 * float(np.random.rand()))
        loss = nn.functional.mse_loss(self.net(x), y) * jitter
        self.log("train/loss", loss)
        return {"loss": loss, "jitter": torch.tensor(jitter)}

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit_dropbn(tmp_path: Path, callbacks: list[pl.Callback], max_steps: int = 12,
                **kwargs: Any) -> tuple[DropBN, tuple[Any, ...]]:
    pl.seed_everything(0, verbose=False)
    model = DropBN()
    data = regression_loader(n=96, batch_size=16)
    # shuffled by the global torch RNG at every epoch start: a disturbed stream shows
    data = DataLoader(data.dataset, batch_size=16, shuffle=True)
    opts: dict[str, Any] = {"logger": False, "max_epochs": 2, **kwargs}
    tr = trainer(tmp_path, max_steps=max_steps, callbacks=callbacks, **opts)
    tr.fit(model, data)
    return model, (torch.get_rng_state(), np.random.rand(), random.random())


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path: Path) -> None:
    plain, rng_plain = _fit_dropbn(tmp_path / "a", [])
    monitor = StepQualityMonitor(every_n_steps=2)
    measured, rng_measured = _fit_dropbn(tmp_path / "b", [monitor])
    assert monitor.measured == 6
    a, b = plain.state_dict(), measured.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights and BatchNorm buffers
    assert torch.equal(rng_plain[0], rng_measured[0])  # the streams continue as without it
    assert rng_plain[1:] == rng_measured[1:]
    # self.log was a no-op during the 6 re-runs; training_step itself ran again
    assert measured.log_calls == plain.log_calls == 12
    assert measured.steps_run == 12 + 6


class Reference(pl.Callback):
    """After the monitor: recompute L_B(θ+Δ) by hand with the RNG state of the forward."""

    def __init__(self, monitor: StepQualityMonitor) -> None:
        self.monitor = monitor
        self.checked = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        self.rng = torch.get_rng_state()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        last = self.monitor.last
        if last is None or last.step != trainer.global_step - 1:
            return
        x, y = batch
        clone = copy.deepcopy(pl_module.net)  # the buffers of the real module stay
        reached = torch.get_rng_state()
        with torch.no_grad():
            torch.set_rng_state(self.rng)
            same = nn.functional.mse_loss(clone(x), y)
            other = nn.functional.mse_loss(copy.deepcopy(pl_module.net)(x), y)  # new masks
        torch.set_rng_state(reached)
        assert last.loss_after == same.item()  # bit for bit
        assert last.loss_after != other.item()
        assert last.loss_before == outputs["loss"].item()
        self.checked += 1


def test_rerun_loss_equals_a_reference_with_the_same_rng_state(tmp_path: Path) -> None:
    monitor = StepQualityMonitor(
        every_n_steps=1, loss_fn=lambda m, b: nn.functional.mse_loss(m.net(b[0]), b[1]))
    ref = Reference(monitor)
    pl.seed_everything(0, verbose=False)
    model = DropBN()
    model.training_step = (  # type: ignore[method-assign]
        lambda batch, batch_idx: nn.functional.mse_loss(model.net(batch[0]), batch[1]))
    tr = trainer(tmp_path, logger=False, max_steps=5, callbacks=[monitor, ref])
    tr.fit(model, regression_loader(n=96, batch_size=16))
    assert ref.checked == 5


def test_a_fault_in_the_rerun_is_reported_once_and_training_goes_on(tmp_path: Path) -> None:
    plain, _ = _fit_dropbn(tmp_path / "a", [])

    def broken(module: Any, batch: Any) -> torch.Tensor:
        module.net(batch[0])  # draws dropout masks and moves BatchNorm statistics first
        raise RuntimeError("boom")

    monitor = StepQualityMonitor(every_n_steps=2, loss_fn=broken)
    logger = TensorBoardLogger(str(tmp_path), name="f")
    measured, _ = _fit_dropbn(tmp_path / "b", [monitor], logger=logger)
    assert measured.trainer.global_step == 12
    assert len(monitor.faults.faults) == 1
    assert "boom" in monitor.faults.faults[0].error
    events = read_events(Path(logger.log_dir) / "events.jsonl")
    assert [(e.kind, e.signal) for e in events] == [("fault", "StepQualityMonitor/measure")]
    assert monitor.measured == 0
    a, b = plain.state_dict(), measured.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_skipped_step_is_not_measured(tmp_path: Path) -> None:
    class SkipOdd(pl.Callback):  # after the monitor: the gradients it copied are dropped
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any,
                                     optimizer: Any) -> None:
            if trainer.global_step % 2:
                skip_step(optimizer)

    monitor = StepQualityMonitor(every_n_steps=1)
    records: list[StepRecord] = []
    monitor.subscribe(records.append)
    tr = trainer(tmp_path, logger=False, max_steps=6, callbacks=[monitor, SkipOdd()])
    tr.fit(Regressor(lambda m: torch.optim.SGD(m.parameters(), lr=0.1)), regression_loader())
    assert [r.index for r in records] == [0, 2, 4]
    assert all(math.isfinite(r.value("step_quality") or math.nan) for r in records)


def test_training_step_without_batch_idx_and_bf16_autocast(tmp_path: Path) -> None:
    class NoIdx(Regressor):
        def training_step(self, batch: Any) -> torch.Tensor:  # type: ignore[override]
            return super().training_step(batch, 0)

    monitor = StepQualityMonitor(every_n_steps=2)
    tr = trainer(tmp_path, logger=False, max_steps=4, precision="bf16-mixed",
                 callbacks=[monitor])
    tr.fit(NoIdx(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)), regression_loader())
    assert monitor.measured == 2 and monitor.last is not None
    assert math.isfinite(monitor.last.rho) and not monitor.faults.faults


@pytest.mark.parametrize("case", ["manual", "accumulate"])
def test_unsupported_setups_warn_once_and_measure_nothing(tmp_path: Path, case: str) -> None:
    monitor = StepQualityMonitor(every_n_steps=1)
    if case == "manual":
        model: pl.LightningModule = TwoOptimizers()
        kwargs: dict[str, Any] = {}
    else:
        model = Regressor(lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
        kwargs = {"accumulate_grad_batches": 2}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):  # a second fit with the same callback: still one warning
            tr = trainer(tmp_path, logger=False, max_steps=3, callbacks=[monitor], **kwargs)
            tr.fit(model, regression_loader())
    ours = [w for w in seen if "StepQualityMonitor" in str(w.message)]
    assert len(ours) == 1
    assert ("manual optimization" if case == "manual" else "accumulate_grad_batches=2") \
        in str(ours[0].message)
    assert monitor.measured == 0 and not monitor.faults.faults


def test_host_transfers_one_per_measured_step(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reads = HostReads(monkeypatch)

    logger = TensorBoardLogger(str(tmp_path), name="count")
    tr = trainer(tmp_path, logger=logger, max_steps=8,
                 callbacks=[reads, StepQualityMonitor(every_n_steps=4)])
    tr.fit(Regressor(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)), regression_loader())
    assert reads.per_step(8) == {0: 1, 1: 0, 2: 0, 3: 0, 4: 1, 5: 0,
                                                     6: 0, 7: 0}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"every_n_steps": 0}, "every_n_steps=0"),
    ({"every_n_steps": 2.5}, "every_n_steps=2.5"),
    ({"loss_fn": "mse"}, "loss_fn='mse'"),
    ({"prefix": ""}, "prefix=''"),
])
def test_bad_arguments_name_themselves(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match="^" + match + " is invalid: must be"):
        StepQualityMonitor(**kwargs)


# -- DDP (2 CPU processes, gloo) ---------------------------------------------------------


class Linear64(pl.LightningModule):
    """Float64 least squares: the loss is a mean, so L of the union batch = mean over ranks.

    Rank r of w trains on the samples r, r+w, r+2w, ... in order, ``32 // w`` per batch:
    the union of the ranks' batches is the single process's batch of 32.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.3)

    def train_dataloader(self) -> DataLoader:
        x, y = regression_loader(n=128).dataset.tensors  # type: ignore[attr-defined]
        r, w = self.global_rank, self.trainer.world_size
        return DataLoader(TensorDataset(x[r::w].double(), y[r::w].double()),
                          batch_size=32 // w, shuffle=False)


def _ddp_run(out: Path, devices: int) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    monitor = StepQualityMonitor(every_n_steps=2)
    kwargs: dict[str, Any] = {"strategy": "ddp"} if devices > 1 else {}
    tr = pl.Trainer(accelerator="cpu", devices=devices, max_steps=4, precision="64-true",
                    callbacks=[monitor], logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    use_distributed_sampler=False, default_root_dir=str(out), **kwargs)
    tr.fit(Linear64())
    values = [[v.step, v.loss_before, v.loss_after, v.slope] for v in [monitor.last]
              if v is not None]
    (out / f"devices{devices}_rank{tr.global_rank}.json").write_text(json.dumps(
        {"last": values, "measured": monitor.measured, "faults": len(monitor.faults.faults)}))


@pytest.mark.slow
def test_ddp_averages_losses_across_ranks(tmp_path: Path) -> None:
    """2 ranks × 16 samples give the ρ of one process with the same 32 samples."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29700 + os.getpid() % 200),
               PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1")
    for devices in (1, 2):
        proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(devices)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "devices1_rank0.json").read_text())
    r0 = json.loads((tmp_path / "devices2_rank0.json").read_text())
    r1 = json.loads((tmp_path / "devices2_rank1.json").read_text())
    assert r0 == r1  # every rank has the same, averaged values
    assert r0["measured"] == single["measured"] == 2 and r0["faults"] == 0
    (step, before, after, slope), = r0["last"]
    (step1, before1, after1, slope1), = single["last"]
    assert step == step1 == 2
    assert (before, after, slope) == pytest.approx((before1, after1, slope1), rel=1e-10)


@pytest.mark.slow
def test_benchmark_smoke_writes_its_tables(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_quality.py"),
                           "--smoke", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    md = (tmp_path / "step_quality_smoke.md").read_text()
    for text in ("| Adam lr 1e-3 |", "| SGD lr 1.0 |", "| every 1 |", "| every 50 |",
                 "extra / training step"):
        assert text in md


if __name__ == "__main__":  # the DDP worker (and its spawned rank)
    warnings.filterwarnings("ignore")
    _ddp_run(Path(sys.argv[1]), int(sys.argv[2]))
