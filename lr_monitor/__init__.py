"""lr-monitor: see the step each weight takes, catch divergence, cut the learning rate."""

from __future__ import annotations

from lr_monitor.events import Detection, GuardEvent

__version__ = "0.1.0"

__all__ = ["Detection", "GuardEvent", "__version__"]
