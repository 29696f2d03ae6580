"""lr-monitor: see the step each weight takes, catch divergence, cut the learning rate.

* :class:`StepSizeMonitor` — Lightning callback recording effective step sizes,
  gradient statistics and optimizer moments to TensorBoard or any Lightning logger.
* :class:`DivergenceGuard` — Lightning callback that detects divergence and skips,
  rolls back, cuts the learning rate or stops; alerts via :mod:`lr_monitor.alerts`.
* :class:`StepQualityMonitor` — the step quality ρ: did the step overshoot on its own batch?
* :class:`SharpnessMonitor` — curvature on a fixed batch against the optimizer's stability
  threshold (edge of stability).
* :class:`GradientNoiseScale` — the gradient noise scale B_simple from micro-batch or
  per-rank gradient norms (gradient accumulation or DDP).
* :func:`attach` — the same statistics for plain PyTorch loops and Fabric.
* :mod:`lr_monitor.functional` — the pure tensor math underneath.

The Lightning callbacks are imported on first use, so the file-reading CLI
(``lr-monitor report``/``plot``) starts without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lr_monitor import _moved
from lr_monitor.events import Detection, GuardEvent

if TYPE_CHECKING:
    from lr_monitor.callbacks.guard import DivergenceGuard
    from lr_monitor.callbacks.monitor import StepSizeMonitor
    from lr_monitor.callbacks.noise import GradientNoiseScale
    from lr_monitor.callbacks.sharpness import SharpnessMonitor
    from lr_monitor.callbacks.step_quality import StepQualityMonitor
    from lr_monitor.recording import MonitorHandle, StepRecorder, attach

__version__ = "0.1.0"

_moved.install()

__all__ = [
    "Detection",
    "DivergenceGuard",
    "GradientNoiseScale",
    "GuardEvent",
    "MonitorHandle",
    "SharpnessMonitor",
    "StepQualityMonitor",
    "StepRecorder",
    "StepSizeMonitor",
    "__version__",
    "attach",
]

_LAZY = {
    "DivergenceGuard": "lr_monitor.callbacks.guard",
    "StepSizeMonitor": "lr_monitor.callbacks.monitor",
    "SharpnessMonitor": "lr_monitor.callbacks.sharpness",
    "StepQualityMonitor": "lr_monitor.callbacks.step_quality",
    "GradientNoiseScale": "lr_monitor.callbacks.noise",
    "MonitorHandle": "lr_monitor.recording",
    "StepRecorder": "lr_monitor.recording",
    "attach": "lr_monitor.recording",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lr_monitor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
