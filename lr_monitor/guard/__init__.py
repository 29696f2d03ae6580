"""The guard's logic, framework-free (plain :mod:`torch`, no Lightning import).

One step of the guard, module by module:

* :mod:`~lr_monitor.guard.signals` — the step's loss and gradient norm
  (:class:`StepSignals`): one all-reduce; one host transfer, or (deferred) compared
  with the :class:`~lr_monitor.guard.signals.Tripwire` s on the device and read a step late.
* :mod:`~lr_monitor.guard.detectors` — one detector per failure kind; each turns a stream
  of values into :class:`~lr_monitor.events.Detection` s.
* :mod:`~lr_monitor.guard.bank` — :class:`DetectorBank`: the detectors of each optimizer,
  run in rounds, fed recorded statistics, rebased after a cut, saved in checkpoints.
* :mod:`~lr_monitor.guard.policy` — :class:`GuardPolicy`: which action for which
  detections (severity, escalation, cooldown, fp16 patience), a pure function from
  detections and a :class:`DecisionContext` to a :class:`Decision`.
* :mod:`~lr_monitor.guard.interventions` — what can be done: cut the LR in a way that
  survives schedulers, skip a step, roll back to a snapshot.

:class:`~lr_monitor.DivergenceGuard`, the Lightning callback that wires these into a
``Trainer``, lives in :mod:`lr_monitor.callbacks.guard`; ``from lr_monitor.guard import
DivergenceGuard`` (its old path) still works, with a ``DeprecationWarning``, and imports
Lightning only then.
"""

from __future__ import annotations

from typing import Any

from lr_monitor._moved import moved_attribute
from lr_monitor.guard.bank import DetectorBank, DetectorStream
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
from lr_monitor.guard.policy import (
    ACTIONS,
    DEFAULT_POLICY,
    Decision,
    DecisionContext,
    GuardPolicy,
)
from lr_monitor.guard.signals import StepSignals

__all__ = [
    "ACTIONS",
    "DEFAULT_POLICY",
    "Decision",
    "DecisionContext",
    "Detector",
    "DetectorBank",
    "DetectorStream",
    "DivergenceDetector",
    "ExplosionDetector",
    "GuardPolicy",
    "LRCut",
    "NonFiniteDetector",
    "OscillationDetector",
    "RollbackBuffer",
    "Snapshot",
    "SpikeDetector",
    "StepSignals",
    "UpdateRatioDetector",
    "scale_lr",
    "skip_step",
]


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name)  # DivergenceGuard: lr_monitor.callbacks.guard
