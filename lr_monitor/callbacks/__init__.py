"""The Lightning callbacks: the only modules of :mod:`lr_monitor` that import Lightning.

* :class:`StepSizeMonitor` (:mod:`~lr_monitor.callbacks.monitor`) records the step each
  weight takes through :mod:`lr_monitor.recording`.
* :class:`DivergenceGuard` (:mod:`~lr_monitor.callbacks.guard`) feeds the signals of each
  step to :mod:`lr_monitor.guard` and carries out its decisions.
* :class:`StepQualityMonitor` (:mod:`~lr_monitor.callbacks.step_quality`) measures the
  step quality ρ from one extra forward pass every n steps.
* :class:`SharpnessMonitor` (:mod:`~lr_monitor.callbacks.sharpness`) measures the curvature
  on a fixed batch against the optimizer's stability threshold.
* :class:`GradientNoiseScale` (:mod:`~lr_monitor.callbacks.noise`) estimates the gradient
  noise scale from micro-batch or per-rank gradient norms.
* :mod:`~lr_monitor.callbacks.lightning` — the same classes for ``lightning.pytorch``.
"""

from __future__ import annotations

from lr_monitor.callbacks.guard import DivergenceGuard
from lr_monitor.callbacks.monitor import StepSizeMonitor
from lr_monitor.callbacks.noise import GradientNoiseScale
from lr_monitor.callbacks.sharpness import SharpnessMonitor
from lr_monitor.callbacks.step_quality import StepQualityMonitor

__all__ = [
    "DivergenceGuard",
    "GradientNoiseScale",
    "SharpnessMonitor",
    "StepQualityMonitor",
    "StepSizeMonitor",
]
