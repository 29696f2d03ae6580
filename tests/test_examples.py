"""Every example runs (smoke: a few steps) and does what its docstring says."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _main(name: str) -> Any:
    return runpy.run_path(str(EXAMPLES / name), run_name="example")["main"]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(tmp_path: Path, name: str) -> None:
    result = _main(name)(["--max-steps", "12", "--out", str(tmp_path)])
    assert result is not None
    assert any(tmp_path.rglob("events.out.tfevents.*"))


def test_digits_example_guard_acts_at_a_too_high_lr(tmp_path: Path) -> None:
    guard = _main("digits_mlp.py")(["--lr", "1.0", "--max-steps", "20", "--out", str(tmp_path)])
    assert guard.events and "rollback" in guard.events[0].actions


def test_raw_loop_example_skips_and_cuts(tmp_path: Path) -> None:
    log = _main("raw_pytorch_loop.py")(["--lr", "5.0", "--max-steps", "60", "--out",
                                        str(tmp_path)])
    assert log, "a too-high LR on diabetes must trigger the hand-made guard"


def test_manual_optimization_one_backward_two_steps_is_not_a_fault(tmp_path: Path) -> None:
    """A second optimizer stepping on the same backward has no new loss: no false NaN."""
    import pytorch_lightning as pl

    from lr_monitor import DivergenceGuard
    from tests.lightning_models import TwoOptimizers, regression_loader, trainer

    guard = DivergenceGuard(jsonl=False)
    tr = trainer(tmp_path, max_steps=40, callbacks=[guard])
    pl.seed_everything(0, verbose=False)
    tr.fit(TwoOptimizers(), regression_loader())
    assert guard.events == []
    assert len(guard.streams) == 2
