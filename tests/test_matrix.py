"""The training matrix in one process (``docs/support.md``): each cell a run or a clear error.

Precision (bf16-mixed, bf16-true), gradient accumulation, gradient clipping, manual
optimization with one and two optimizers, several optimizers in automatic optimization,
``torch.compile``, :func:`lr_monitor.attach` in a Fabric loop and the strategies the
callbacks refuse. The references are closed forms or another run that must give the same
numbers: a probe reading the gradients before clipping, the same global batch without
accumulation, automatic optimization for manual, eager for compiled, a plain loop for
Fabric. (DDP, FSDP2 and tensor parallelism: ``tests/test_sharded.py``.)
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lr_monitor import DivergenceGuard, StepSizeMonitor, attach
from tests.lightning_models import Regressor, TwoOptimizers, regression_loader, trainer

pytestmark = pytest.mark.integration


# -- what the callbacks saw ------------------------------------------------------------
def spy(guard: DivergenceGuard) -> list[tuple[int, int, dict[str, float]]]:
    """``(optimizer index, step, values)`` of every step the guard's detectors judge."""
    seen: list[tuple[int, int, dict[str, float]]] = []
    detect = guard.bank.detect

    def wrapper(index: int, step: int, values: dict[str, float]) -> Any:
        seen.append((index, step, dict(values)))
        return detect(index, step, values)

    guard.bank.detect = wrapper  # type: ignore[method-assign]
    return seen


def records(monitor: StepSizeMonitor) -> list[tuple[str, int, dict[str, dict[str, float]]]]:
    """``(optimizer, index, rows)`` of every record the monitor publishes."""
    seen: list[tuple[str, int, dict[str, dict[str, float]]]] = []
    monitor.subscribe(lambda r: seen.append((r.optimizer, r.index, r.rows)))
    return seen


class Probe(pl.Callback):
    """Each optimizer step's gradient norm in float64, read before Lightning clips.

    Put it before the guard (which may drop the gradients of a skipped step).
    """

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad.detach().double().reshape(-1) for g in optimizer.param_groups
                 for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))


class Losses(Regressor):
    """Adam on the MLP; keeps the loss of every ``training_step`` (as a float)."""

    def __init__(self, lr: float = 1e-2, sgd: bool = False) -> None:
        super().__init__(lambda m: torch.optim.SGD(m.parameters(), lr=lr) if sgd
                         else torch.optim.Adam(m.parameters(), lr=lr))
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss))
        return loss


def run(tmp_path: Path, make: Callable[[], Any] = Losses, batch_size: int = 32,
        steps: int = 4, **kwargs: Any) -> SimpleNamespace:
    """Train ``make()`` with a probe, a monitor recording every step and a guard.

    Every run starts from the same seed, so the same model class starts from the same
    weights. Returns what the callbacks saw.
    """
    pl.seed_everything(0, verbose=False)
    model = make()
    monitor, guard, probe = StepSizeMonitor(1), DivergenceGuard(jsonl=False), Probe()
    seen, recs = spy(guard), records(monitor)
    tr = trainer(tmp_path, max_steps=steps, logger=False, callbacks=[probe, monitor, guard],
                 **kwargs)
    tr.fit(model, regression_loader(batch_size=batch_size))
    return SimpleNamespace(guard=seen, records=recs, norms=probe.norms, model=model,
                           events=guard.events, trainer=tr,
                           faults=guard.faults.faults + monitor.faults.faults)


def same_records(got: list[Any], want: list[Any], rel: float, rows: tuple[str, ...] = ()
                 ) -> None:
    assert [(o, i) for o, i, _ in got] == [(o, i) for o, i, _ in want]
    for (_, index, have), (_, _, expected) in zip(got, want, strict=True):
        for row in rows or tuple(expected):
            assert have[row].keys() == expected[row].keys(), (index, row)
            assert have[row] == pytest.approx(expected[row], rel=rel, abs=1e-9), (index, row)


def same_guard(got: list[Any], want: list[Any], rel: float) -> None:
    assert [(i, s, v.keys()) for i, s, v in got] == [(i, s, v.keys()) for i, s, v in want]
    for (_, step, have), (_, _, expected) in zip(got, want, strict=True):
        assert have == pytest.approx(expected, rel=rel), step


# -- precision -------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_guard_and_monitor_read_the_loss_and_the_gradient(tmp_path: Path,
                                                               precision: str) -> None:
    """bf16 gradients are normed with a float32 accumulator: the exact norm to 1e-6."""
    r = run(tmp_path, precision=precision)
    assert not r.faults and not r.events
    assert [s for _, s, _ in r.guard] == [0, 1, 2, 3]
    for (_, step, values), loss, norm in zip(r.guard, r.model.losses, r.norms, strict=True):
        assert values["loss"] == pytest.approx(loss, rel=1e-7), step
        assert values["grad_norm"] == pytest.approx(norm, rel=1e-6), step
    for (_, index, rows), norm in zip(r.records, r.norms, strict=True):
        assert rows["global"]["grad_norm"] == pytest.approx(norm, rel=1e-6), index
    if precision == "bf16-true":  # the weights really are bf16
        assert next(r.model.parameters()).dtype is torch.bfloat16


# -- gradient accumulation -------------------------------------------------------------
def test_accumulation_equals_the_same_batch_in_one_step(tmp_path: Path) -> None:
    """2 micro-batches of 16 = one batch of 32: the same loss, gradient and statistics.

    Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` before the
    backward pass (and before ``on_before_backward``); the guard multiplies it back.
    """
    whole = run(tmp_path / "whole", batch_size=32)
    accumulated = run(tmp_path / "accumulated", batch_size=16, accumulate_grad_batches=2)
    assert not whole.faults and not accumulated.faults
    same_guard(accumulated.guard, whole.guard, rel=1e-6)
    same_records(accumulated.records, whole.records, rel=1e-5)


# -- gradient clipping -----------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_guard_and_monitor_report_the_norm_before_clipping(tmp_path: Path,
                                                                    algorithm: str) -> None:
    clip, lr = 0.05, 0.1
    r = run(tmp_path, lambda: Losses(lr=lr, sgd=True), gradient_clip_val=clip,
            gradient_clip_algorithm=algorithm)
    assert not r.faults
    for (_, step, values), norm in zip(r.guard, r.norms, strict=True):
        assert norm > 5 * clip  # every step was clipped
        assert values["grad_norm"] == pytest.approx(norm, rel=1e-6), step
    for (_, index, rows), norm in zip(r.records, r.norms, strict=True):
        row = rows["global"]
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-6), index
        if algorithm == "norm":  # SGD applied lr × the clipped gradient (torch's 1e-6)
            assert row["update_norm"] == pytest.approx(lr * clip * norm / (norm + 1e-6),
                                                       rel=1e-5)
        else:
            assert row["update_norm"] < lr * norm


# -- manual optimization ---------------------------------------------------------------
class ManualLosses(Losses):
    """:class:`Losses` in manual optimization: the same steps by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]


def test_manual_optimization_equals_automatic(tmp_path: Path) -> None:
    automatic = run(tmp_path / "automatic")
    manual = run(tmp_path / "manual", ManualLosses)
    assert not manual.faults
    same_guard(manual.guard, automatic.guard, rel=1e-9)
    same_records(manual.records, automatic.records, rel=1e-9)


class TwoLosses(TwoOptimizers):
    """Two optimizers on one backward pass (manual); keeps every loss."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.losses.append(float(loss))
        super().manual_backward(loss, *args, **kwargs)


def test_manual_optimization_with_two_optimizers(tmp_path: Path) -> None:
    """Each ``opt.step()`` is a guard step: the first gets the loss, each its own norm."""
    r = run(tmp_path, TwoLosses, steps=6)
    assert not r.faults and not r.events
    assert [(i, s) for i, s, _ in r.guard] == [(0, 0), (1, 1), (0, 2), (1, 3), (0, 4), (1, 5)]
    for (index, step, values), norm in zip(r.guard, r.norms, strict=True):
        assert values["grad_norm"] == pytest.approx(norm, rel=1e-6), step
        assert ("loss" in values) == (index == 0)  # one backward pass, one loss
    assert [v["loss"] for i, _, v in r.guard if i == 0] == pytest.approx(r.model.losses)
    assert [(o, i) for o, i, _ in r.records] == [("Adam", 0), ("SGD", 0), ("Adam", 1),
                                                 ("SGD", 1), ("Adam", 2), ("SGD", 2)]
    for (_, _, rows), norm in zip(r.records, r.norms, strict=True):
        assert rows["global"]["grad_norm"] == pytest.approx(norm, rel=1e-6)


class AutomaticTwo(Losses):
    def configure_optimizers(self) -> Any:
        return [torch.optim.Adam(self.net[0].parameters()), torch.optim.SGD(
            self.net[2].parameters(), lr=0.1)]


def test_two_optimizers_in_automatic_optimization_are_lightnings_error(tmp_path: Path) -> None:
    """Lightning 2 refuses it before any step (our callbacks attached change nothing)."""
    with pytest.raises(RuntimeError, match="only supported with manual optimization"):
        run(tmp_path, AutomaticTwo)


# -- torch.compile ---------------------------------------------------------------------
class CompiledLosses(Losses):
    """:class:`Losses` with its network compiled (inductor on CPU).

    (``trainer.fit(torch.compile(module))`` fails in torch 2.13 / Lightning 2.6 before
    any callback runs: dynamo cannot trace ``self.log`` in ``training_step``.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(self.net)  # type: ignore[assignment]


@pytest.mark.slow
def test_a_compiled_module_gives_the_eager_values(tmp_path: Path) -> None:
    """A ``torch.compile``d network equals eager to rounding (same initial weights)."""
    eager = run(tmp_path / "eager", steps=3)
    torch._dynamo.reset()
    try:
        compiled = run(tmp_path / "compiled", CompiledLosses, steps=3)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        # torch 2.13's generated C++ does not build under ATEN_CPU_CAPABILITY=default
        # ("'at::vec' has not been declared"): torch's compiler, before any callback ran
        if "CppCompileError" not in str(exc):
            raise
        pytest.skip("inductor's C++ does not build with ATEN_CPU_CAPABILITY="
                    f"{os.environ.get('ATEN_CPU_CAPABILITY', '(native)')}")
    assert not compiled.faults and not compiled.events
    same_guard(compiled.guard, eager.guard, rel=1e-5)
    same_records(compiled.records, eager.records, rel=1e-4)


# -- Fabric ----------------------------------------------------------------------------
def _loop(fabric: Any | None) -> list[Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if fabric is not None:
        model, opt = fabric.setup(model, opt)
    written: list[Any] = []
    handle = attach(opt, lambda metrics, step: written.append((step, metrics)), model=model,
                    granularity="tensor")
    for x, y in list(regression_loader())[:3]:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        if fabric is not None:
            fabric.backward(loss)
        else:
            loss.backward()
        handle.capture_gradients()
        opt.step()
    handle.detach()
    return written


def test_attach_in_a_fabric_loop_equals_a_plain_loop() -> None:
    """Fabric's optimizer wrapper is unwrapped: tags, exact rule and values of Adam."""
    fabric_mod = pytest.importorskip("lightning.fabric")
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1)
    got, want = _loop(fabric), _loop(None)
    assert [s for s, _ in got] == [0, 1, 2]
    assert "optim/eff_lr/p50/Adam/global" in got[0][1]
    for (_, metrics), (_, expected) in zip(got, want, strict=True):
        assert metrics.keys() == expected.keys()
        assert metrics == pytest.approx(expected, rel=1e-9)


# -- strategies the callbacks refuse ---------------------------------------------------
@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
@pytest.mark.parametrize("strategy", ["DeepSpeedStrategy", "FSDPStrategy"])
def test_deepspeed_and_fsdp1_are_refused_naming_the_strategy(package: str, strategy: str) -> None:
    """Before any step, with what to use instead.

    Neither runs here (DeepSpeed is not installed, Lightning's FSDP1 wants a GPU): the
    callbacks' ``setup`` gets the real strategy class, not constructed.
    """
    strategies = pytest.importorskip(f"{package}.strategies")
    callbacks = importlib.import_module("lr_monitor" if package == "pytorch_lightning"
                                        else "lr_monitor.lightning")
    cls = getattr(strategies, strategy)
    stand_in = SimpleNamespace(strategy=cls.__new__(cls))
    for callback in (callbacks.StepSizeMonitor(), callbacks.DivergenceGuard()):
        name = type(callback).__name__
        with pytest.raises(RuntimeError, match=f"{name} does not support {strategy}: "
                                               r".*(fully_shard|strategy='ddp')"):
            callback.setup(stand_in, None, "fit")  # type: ignore[arg-type]
        callback.setup(stand_in, None, "validate")  # only training is measured


def test_supported_strategies_pass_the_check() -> None:
    from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy

    from lr_monitor.callbacks._compat import check_strategy

    for cls in (DDPStrategy, ModelParallelStrategy):
        check_strategy(SimpleNamespace(strategy=cls.__new__(cls)), "StepSizeMonitor")


def test_every_test_the_support_matrix_names_exists() -> None:
    """``docs/support.md`` cannot point at a test that was renamed or removed."""
    root = Path(__file__).resolve().parents[1]
    refs = re.findall(r"tests/(test_\w+)\.py(?:::(test_\w+))?",
                      (root / "docs" / "support.md").read_text())
    assert len(refs) > 20
    for module, name in refs:
        text = (root / "tests" / f"{module}.py").read_text()
        assert not name or f"def {name}(" in text, f"tests/{module}.py::{name}"
