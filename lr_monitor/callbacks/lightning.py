"""The callbacks for the unified ``lightning`` package (``lightning.pytorch``).

A ``lightning.pytorch.Trainer`` accepts only subclasses of ``lightning.pytorch.Callback``;
the classes in :mod:`lr_monitor` derive from ``pytorch_lightning.Callback``. The classes here
are the same callbacks with ``lightning.pytorch.Callback`` added as a base, so either
trainer accepts them::

    import lightning.pytorch as L
    from lr_monitor.lightning import DivergenceGuard, StepSizeMonitor

    L.Trainer(callbacks=[StepSizeMonitor(), DivergenceGuard()])

Importing this module raises ``ImportError`` when ``lightning`` is not installed.
"""

from __future__ import annotations

try:
    import lightning.pytorch as _L
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lr_monitor.lightning needs the 'lightning' package (pip install lightning); "
        "with pytorch_lightning use the classes in lr_monitor directly"
    ) from e

from lr_monitor.callbacks.guard import DivergenceGuard as _DivergenceGuard
from lr_monitor.callbacks.monitor import StepSizeMonitor as _StepSizeMonitor
from lr_monitor.callbacks.noise import GradientNoiseScale as _GradientNoiseScale
from lr_monitor.callbacks.sharpness import SharpnessMonitor as _SharpnessMonitor
from lr_monitor.callbacks.step_quality import StepQualityMonitor as _StepQualityMonitor

__all__ = [
    "DivergenceGuard",
    "GradientNoiseScale",
    "SharpnessMonitor",
    "StepQualityMonitor",
    "StepSizeMonitor",
]


class StepSizeMonitor(_StepSizeMonitor, _L.Callback):  # type: ignore[misc]
    """:class:`lr_monitor.StepSizeMonitor` for ``lightning.pytorch`` trainers."""


class DivergenceGuard(_DivergenceGuard, _L.Callback):  # type: ignore[misc]
    """:class:`lr_monitor.DivergenceGuard` for ``lightning.pytorch`` trainers."""


class StepQualityMonitor(_StepQualityMonitor, _L.Callback):  # type: ignore[misc]
    """:class:`lr_monitor.StepQualityMonitor` for ``lightning.pytorch`` trainers."""


class SharpnessMonitor(_SharpnessMonitor, _L.Callback):  # type: ignore[misc]
    """:class:`lr_monitor.SharpnessMonitor` for ``lightning.pytorch`` trainers."""


class GradientNoiseScale(_GradientNoiseScale, _L.Callback):  # type: ignore[misc]
    """:class:`lr_monitor.GradientNoiseScale` for ``lightning.pytorch`` trainers."""
