"""Pure tensor math of optimizer steps: no Lightning import, no host reads.

* :mod:`~lr_monitor.functional.rules` — the exact update rule of every supported
  ``torch.optim`` optimizer, reconstructed from post-step state.
* :mod:`~lr_monitor.functional.step` — :func:`effective_lr`, :func:`last_update` and the
  :class:`ParamSnapshot` fallback for optimizers without a rule.
* :mod:`~lr_monitor.functional.statistics` — batched summaries of a step (norms,
  effective-lr quantiles, ε dominance, non-finite counts) as reducible sums, read back in
  one host transfer.
"""

from __future__ import annotations

from lr_monitor.functional.rules import (
    SUPPORTED_OPTIMIZERS,
    ParamStep,
    UnsupportedOptimizerError,
    find_rule,
    register_rule,
)
from lr_monitor.functional.step import (
    ParamSnapshot,
    effective_lr,
    is_supported,
    last_update,
    optimizer_steps,
)

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "ParamSnapshot",
    "ParamStep",
    "UnsupportedOptimizerError",
    "effective_lr",
    "find_rule",
    "is_supported",
    "last_update",
    "optimizer_steps",
    "register_rule",
]
