"""Framework-free recording of optimizer steps (no Lightning import).

* :mod:`~lr_monitor.recording.recorder` — :class:`StepRecorder` (one optimizer, through
  torch's step hooks) and :func:`attach` for plain PyTorch loops and Fabric.
"""

from __future__ import annotations

from lr_monitor.recording.recorder import (
    GRANULARITIES,
    MonitorHandle,
    ScalarWriter,
    StepRecorder,
    attach,
    check_recorder_args,
)

__all__ = [
    "GRANULARITIES",
    "MonitorHandle",
    "ScalarWriter",
    "StepRecorder",
    "attach",
    "check_recorder_args",
]
