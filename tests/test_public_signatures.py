"""Every public constructor and function refuses bad arguments by the name the user typed.

Table-driven over the public API: every class and function in the ``__all__`` of the
packages below is found by itself (a new one cannot be forgotten), and every parameter
with a ``bool``, ``int``, ``float`` or ``str`` default gets values of the wrong kind — a
string for a bool (``bool("False")`` is true), a bool or a float for an int, NaN or a
string for a float, a number for a string, ``None`` where the annotation does not allow
it. Each must raise ``ValueError`` or ``TypeError`` whose message begins with
``<parameter>=``, the one format of :mod:`lr_monitor._validation`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lr_monitor.guard import detectors as D

#: Packages whose ``__all__`` is the public API.
PUBLIC_MODULES = (
    "lr_monitor", "lr_monitor.alerts", "lr_monitor.eventlog", "lr_monitor.guard",
    "lr_monitor.guard.detectors", "lr_monitor.guard.interventions", "lr_monitor.guard.bank",
    "lr_monitor.guard.policy", "lr_monitor.recording", "lr_monitor.functional",
)

#: Public names that are records, enums, protocols or errors — values the library builds
#: and hands out, not configuration a user types — or that take no typed configuration.
NOT_CONFIGURATION = {
    "Action", "Combine", "Decision", "DecisionContext", "Detection", "GuardEvent",
    "HostStepSums", "ParamStep", "Snapshot", "StepRecord", "StepSums", "StepQualityValues",
    "NoiseScale", "EventFileError", "NotRegularFileError", "Fault", "SupportsSwap",
    "TextSummaryWriter", "ScalarWriter", "AlertSink", "Listeners", "MonitorHandle",
    "DetectorStream", "Detector", "StepQualityMeter", "Tripwire", "StagedStep",
    # functions on tensors and optimizers whose typed defaults are internal knobs of a
    # computation (tested with the numerics): chunk sizes, sparse-gradient flags
    "step_sums", "register_rule", "skip_on_device", "as_sink", "read_events",
    "preconditioned_sharpness", "sharpness",
}


class _Writer:
    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_text(self, *args: Any, **kwargs: Any) -> None:
        pass


def _required(tmp: Path) -> dict[str, dict[str, Any]]:
    """Valid values for the required parameters, by public name."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    return {
        "CallableSink": {"fn": print},
        "JsonlSink": {"path": tmp / "a.jsonl"},
        "EventLogWriter": {"path": tmp / "b.jsonl"},
        "TensorBoardSink": {"writer": _Writer()},
        "make_default_sinks": {"log_dir": tmp},
        "close_sinks": {"sinks": []},
        "attach": {"optimizer": opt, "writer": _Writer()},
        "StepRecorder": {"optimizer": opt, "name": "Adam", "should_record": lambda s: True},
        "OvershootDetector": {"signal": "rho", "threshold": 0.0, "direction": "below"},
        "DeadStartDetector": {"trend": D.LossTrend()},
        "ConsecutiveTracker": {"optimizer": opt},
        "NoiseScaleEstimator": {"params": list(model.parameters())},
        "scale_lr": {"optimizers": [opt]},
    }


def _public() -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                continue  # errors are built by the library
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and attr not in NOT_CONFIGURATION:
                found.setdefault(attr, obj)
    return found


def _wrong_values(param: inspect.Parameter) -> list[Any]:
    default = param.default
    if isinstance(default, bool):
        wrong: list[Any] = ["False", 0]
    elif isinstance(default, int):
        wrong = [1.5, True, "3"]
    elif isinstance(default, float):
        wrong = [math.nan, "0.1", True]
    elif isinstance(default, str):
        wrong = [5]
    else:
        return []
    if "None" not in str(param.annotation):
        wrong.append(None)
    return wrong


def _cases() -> list[tuple[str, str, Any]]:
    cases = []
    for name, obj in sorted(_public().items()):
        for param in inspect.signature(obj).parameters.values():
            if param.default is not param.empty:
                cases += [(name, param.name, v) for v in _wrong_values(param)]
    return cases


CASES = _cases()


def test_the_table_covers_the_public_api() -> None:
    """Hundreds of cases over every configurable public name (none silently dropped)."""
    names = {name for name, _, _ in CASES}
    assert len(CASES) > 400
    assert {"DivergenceGuard", "StepSizeMonitor", "WebhookSink", "JsonlSink", "SpikeDetector",
            "RollbackBuffer", "attach", "close_sinks", "LRCut", "GuardPolicy"} <= names


@pytest.mark.parametrize(("name", "arg", "value"), CASES,
                         ids=[f"{n}-{a}={v!r}" for n, a, v in CASES])
def test_a_wrong_value_is_refused_by_the_name_the_user_typed(tmp_path: Path, name: str,
                                                            arg: str, value: Any) -> None:
    target = _public()[name]
    kwargs = dict(_required(tmp_path).get(name, {}))
    kwargs[arg] = value
    with pytest.raises((ValueError, TypeError)) as info:
        made = target(**kwargs)
        close = getattr(made, "close", None)
        if callable(close):  # accepted by mistake: do not leave a thread or file behind
            close()
    assert str(info.value).startswith(f"{arg}="), str(info.value)
