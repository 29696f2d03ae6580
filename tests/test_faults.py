"""No stage of the monitor or the guard can end the run it watches.

Each internal stage is made to raise in turn; the fit must complete, the fault must be
reported once (log line and a ``fault`` record in ``events.jsonl``), and only that part
must be switched off.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lr_monitor import DivergenceGuard, StepSizeMonitor
from lr_monitor.alerts import read_events
from lr_monitor.faults import FAULT_ACTION, FAULT_KIND, FaultBarrier
from lr_monitor.guard.interventions import RollbackBuffer
from lr_monitor.recording import StepRecorder
from tests.lightning_models import Regressor, regression_loader, trainer
from tests.test_monitor import read_scalars

STEPS = 6


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected fault")


# (class, attribute to break, the fault's signal)
STAGES = [
    (StepRecorder, "_grad_norms", "StepSizeMonitor/capture_gradients"),
    (StepRecorder, "_before_step", "StepSizeMonitor/record"),
    (StepRecorder, "measure", "StepSizeMonitor/record"),
    (StepSizeMonitor, "_attach", "StepSizeMonitor/attach"),
    (StepSizeMonitor, "_log", "StepSizeMonitor/log"),
    (StepSizeMonitor, "_write_lr_histograms", "StepSizeMonitor/histograms"),
    (StepSizeMonitor, "_write_layout", "StepSizeMonitor/layout"),
    (DivergenceGuard, "_add_loss", "DivergenceGuard/loss"),
    (DivergenceGuard, "_decide", "DivergenceGuard/decide"),
    (DivergenceGuard, "_after_step", "DivergenceGuard/after_step"),
    (DivergenceGuard, "_snapshot", "DivergenceGuard/snapshot"),
    (RollbackBuffer, "copy", "DivergenceGuard/snapshot_copy"),
]


@pytest.mark.parametrize(("cls", "attr", "signal"), STAGES,
                         ids=[f"{c.__name__}.{a}" for c, a, _ in STAGES])
def test_a_failing_stage_is_reported_once_and_training_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cls: type, attr: str,
        signal: str) -> None:
    monkeypatch.setattr(cls, attr, _boom)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    monitor, guard = StepSizeMonitor(1), DivergenceGuard()
    tr = trainer(tmp_path, logger=logger, max_steps=STEPS, callbacks=[monitor, guard])
    tr.fit(Regressor(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)), regression_loader())
    assert tr.global_step == STEPS
    faults = [e for e in read_events(Path(logger.log_dir) / "events.jsonl")
              if e.kind == FAULT_KIND]
    assert [e.signal for e in faults] == [signal]  # once, although the stage ran every step
    assert faults[0].actions == (FAULT_ACTION,)
    assert "RuntimeError: injected fault" in faults[0].message
    # Whatever did not fail kept working.
    tags = read_scalars(logger.log_dir)
    if signal.startswith("DivergenceGuard"):
        assert len(tags["optim/update_norm/Adam/global"]) == STEPS
    if signal in ("StepSizeMonitor/histograms", "StepSizeMonitor/layout"):
        assert len(tags["optim/update_norm/Adam/global"]) == STEPS


@pytest.mark.parametrize("path", ["generic", "fused"])
def test_a_failing_parameter_is_left_out_and_the_rest_is_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    import lr_monitor.recording.recorder as recorder

    if path == "generic":
        real = recorder.iter_group_steps

        def fails_on_the_bias(optimizer: Any, group: dict[str, Any]) -> Any:
            for s in real(optimizer, group):
                if s.param.dim() == 1 and s.param.numel() == 2:
                    raise RuntimeError("cannot reconstruct this one")
                yield s

        monkeypatch.setattr(recorder, "moment_group", lambda optimizer, group: None)
        monkeypatch.setattr(recorder, "iter_group_steps", fails_on_the_bias)
    else:  # Adam's one-pass statistics: every tensor, single or packed, goes through as_flat
        import lr_monitor.functional.fused as fused
        import lr_monitor.functional.statistics as statistics

        real_flat = fused.as_flat

        def flat_fails_on_the_bias(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 1 and t.numel() == 2:
                raise RuntimeError("cannot read this one")
            return real_flat(t)

        monkeypatch.setattr(fused, "as_flat", flat_fails_on_the_bias)
        monkeypatch.setattr(statistics, "as_flat", flat_fails_on_the_bias)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    tr = trainer(tmp_path, logger=logger, max_steps=3, callbacks=[
        StepSizeMonitor(1, granularity="tensor")])
    tr.fit(Regressor(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)), regression_loader())
    faults = [e for e in read_events(Path(logger.log_dir) / "events.jsonl")
              if e.kind == FAULT_KIND]
    assert len(faults) == 1 and "Adam net.2.bias" in faults[0].message
    tags = read_scalars(logger.log_dir)
    assert sorted(tags["optim/update_norm/Adam/net.0.weight"]) == [0, 1, 2]
    assert "optim/update_norm/Adam/net.2.bias" not in tags


def test_a_guard_that_cannot_open_its_sinks_still_reports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(DivergenceGuard, "_open_sinks", _boom)
    tr = trainer(tmp_path, max_steps=3, callbacks=[DivergenceGuard()])
    with caplog.at_level(logging.WARNING):
        tr.fit(Regressor(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)),
               regression_loader())
    assert tr.global_step == 3
    assert sum("DivergenceGuard: setup raised RuntimeError" in r.getMessage()
               for r in caplog.records) >= 1


def test_barrier_never_lets_a_report_failure_through() -> None:
    def bad_report(event: Any) -> None:
        raise OSError("disk full")

    barrier = FaultBarrier("X", report=bad_report)
    assert barrier.call("stage", _boom) is None
    assert barrier.disabled("stage") and len(barrier.faults) == 1


def test_barrier_does_not_swallow_keyboard_interrupt() -> None:
    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        FaultBarrier("X").call("stage", interrupt)
