"""Framework-free recording of optimizer steps (no Lightning import).

* :mod:`~lr_monitor.recording.config` — :class:`RecorderConfig`, the recording options,
  declared and validated once.
* :mod:`~lr_monitor.recording.recorder` — :class:`StepRecorder` (one optimizer, through
  torch's step hooks) and :func:`attach` for plain PyTorch loops and Fabric.
* :mod:`~lr_monitor.recording.record` — :class:`StepRecord`, what a recorded step
  publishes to its listeners (the monitor logs it, the guard reads it).
* :mod:`~lr_monitor.recording.consecutive` — :class:`ConsecutiveTracker`: overshoot and
  oscillation between consecutive steps, at every step, on a fixed subsample.
* :mod:`~lr_monitor.recording.noise` — :class:`NoiseScaleEstimator`: the gradient noise
  scale from gradient norms at two batch sizes.
* :mod:`~lr_monitor.recording.step_quality` — :class:`StepQualityMeter`: the step quality ρ
  from one extra forward pass on the step's own batch, training left bit-identical.
"""

from __future__ import annotations

from lr_monitor.recording.config import GRANULARITIES, RecorderConfig
from lr_monitor.recording.consecutive import ConsecutiveTracker
from lr_monitor.recording.history import UpdateHistory
from lr_monitor.recording.noise import NoiseScale, NoiseScaleEstimator
from lr_monitor.recording.record import Listeners, RecordListener, StepRecord
from lr_monitor.recording.recorder import (
    MonitorHandle,
    ScalarWriter,
    StepRecorder,
    attach,
)
from lr_monitor.recording.step_quality import StepQualityMeter, StepQualityValues

__all__ = [
    "GRANULARITIES",
    "ConsecutiveTracker",
    "Listeners",
    "MonitorHandle",
    "NoiseScale",
    "NoiseScaleEstimator",
    "RecordListener",
    "RecorderConfig",
    "ScalarWriter",
    "StepQualityMeter",
    "StepQualityValues",
    "StepRecord",
    "StepRecorder",
    "UpdateHistory",
    "attach",
]
