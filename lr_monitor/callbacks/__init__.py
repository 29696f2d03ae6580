"""The Lightning callbacks: the only modules of :mod:`lr_monitor` that import Lightning.

* :class:`StepSizeMonitor` (:mod:`~lr_monitor.callbacks.monitor`) records the step each
  weight takes through :mod:`lr_monitor.recording`.
* :class:`DivergenceGuard` (:mod:`~lr_monitor.callbacks.guard`) feeds the signals of each
  step to :mod:`lr_monitor.guard` and carries out its decisions.
* :mod:`~lr_monitor.callbacks.lightning` — the same classes for ``lightning.pytorch``.
"""

from __future__ import annotations

from lr_monitor.callbacks.guard import DivergenceGuard
from lr_monitor.callbacks.monitor import StepSizeMonitor

__all__ = ["DivergenceGuard", "StepSizeMonitor"]
