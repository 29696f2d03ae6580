"""lr-monitor: see the step each weight takes, catch divergence, cut the learning rate.

* :class:`StepSizeMonitor` — Lightning callback recording effective step sizes,
  gradient statistics and optimizer moments to TensorBoard or any Lightning logger.
* :class:`DivergenceGuard` — Lightning callback that detects divergence and skips,
  rolls back, cuts the learning rate or stops; alerts via :mod:`lr_monitor.alerts`.
* :func:`attach` — the same statistics for plain PyTorch loops and Fabric.
* :mod:`lr_monitor.functional` — the pure tensor math underneath.
"""

from __future__ import annotations

from lr_monitor.events import Detection, GuardEvent
from lr_monitor.guard import DivergenceGuard
from lr_monitor.monitor import StepSizeMonitor
from lr_monitor.recorder import MonitorHandle, StepRecorder, attach

__version__ = "0.1.0"

__all__ = [
    "Detection",
    "DivergenceGuard",
    "GuardEvent",
    "MonitorHandle",
    "StepRecorder",
    "StepSizeMonitor",
    "__version__",
    "attach",
]
