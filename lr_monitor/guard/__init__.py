"""The guard's logic, framework-free (plain :mod:`torch`, no Lightning import).

* :mod:`~lr_monitor.guard.detectors` — one detector per failure kind; each turns a stream
  of values into :class:`~lr_monitor.events.Detection` s.
* :mod:`~lr_monitor.guard.interventions` — what can be done: cut the LR in a way that
  survives schedulers, skip a step, roll back to a snapshot.

:class:`~lr_monitor.DivergenceGuard`, the Lightning callback that wires these into a
``Trainer``, lives in :mod:`lr_monitor.callbacks.guard`; ``from lr_monitor.guard import
DivergenceGuard`` still works and imports Lightning only then.
"""

from __future__ import annotations

import importlib
from typing import Any

from lr_monitor.guard.detectors import (
    Detector,
    DivergenceDetector,
    ExplosionDetector,
    NonFiniteDetector,
    OscillationDetector,
    SpikeDetector,
    UpdateRatioDetector,
)
from lr_monitor.guard.interventions import LRCut, RollbackBuffer, Snapshot, scale_lr, skip_step

__all__ = [
    "Detector",
    "DivergenceDetector",
    "ExplosionDetector",
    "LRCut",
    "NonFiniteDetector",
    "OscillationDetector",
    "RollbackBuffer",
    "Snapshot",
    "SpikeDetector",
    "UpdateRatioDetector",
    "scale_lr",
    "skip_step",
]


def __getattr__(name: str) -> Any:
    if name == "DivergenceGuard":
        return importlib.import_module("lr_monitor.callbacks.guard").DivergenceGuard
    raise AttributeError(f"module 'lr_monitor.guard' has no attribute {name!r}")
