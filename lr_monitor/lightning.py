"""The callbacks for the unified ``lightning`` package (``lightning.pytorch``).

The public name of :mod:`lr_monitor.callbacks.lightning`, which explains the difference::

    import lightning.pytorch as L
    from lr_monitor.lightning import DivergenceGuard, StepSizeMonitor

    L.Trainer(callbacks=[StepSizeMonitor(), DivergenceGuard()])

Importing this module raises ``ImportError`` when ``lightning`` is not installed.
"""

from __future__ import annotations

from lr_monitor.callbacks.lightning import (
    DivergenceGuard,
    GradientNoiseScale,
    SharpnessMonitor,
    StepQualityMonitor,
    StepSizeMonitor,
)

__all__ = [
    "DivergenceGuard",
    "GradientNoiseScale",
    "SharpnessMonitor",
    "StepQualityMonitor",
    "StepSizeMonitor",
]
