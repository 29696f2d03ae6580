"""Pure tensor math of optimizer steps: no Lightning import, no host reads.

* :mod:`~lr_monitor.functional.rules` — the exact update rule of every supported
  ``torch.optim`` optimizer, reconstructed from post-step state, and
  :func:`supports_group`, which says before a step whether a param group's next step
  can be reconstructed.
* :mod:`~lr_monitor.functional.step` — :func:`effective_lr`, :func:`last_update`, the
  :class:`ParamSnapshot` fallback for optimizers without a rule, and
  :func:`with_applied_update` for bf16/fp16 parameters (whose applied update is the
  rounded intended one).
* :mod:`~lr_monitor.functional.statistics` — batched summaries of a step (norms,
  effective-lr quantiles, ε dominance, non-finite counts): :func:`step_sums` reduces a
  step to fields that each declare how they combine (:class:`Combine`: across tensors,
  param groups and ranks), :meth:`StepSums.to_host` reads them back in one host transfer
  and :func:`summarize` finishes the statistics. The previous update that
  ``update_cosine`` compares with is kept by the caller (any :class:`SupportsSwap`, e.g.
  :class:`lr_monitor.recording.history.UpdateHistory`): nothing here holds state.
* :mod:`~lr_monitor.functional.curvature` — :func:`sharpness` (top Hessian eigenvalue by
  Lanczos on Hessian-vector products), :func:`preconditioned_sharpness` (the same for the
  optimizer's preconditioned Hessian) and :func:`stability_threshold` (the step-size
  limit each optimizer's update rule puts on them).
"""

from __future__ import annotations

from lr_monitor.functional.curvature import (
    preconditioned_sharpness,
    sharpness,
    stability_threshold,
)
from lr_monitor.functional.rules import (
    SUPPORTED_OPTIMIZERS,
    ParamStep,
    UnsupportedOptimizerError,
    find_rule,
    is_low_precision,
    iter_group_steps,
    register_rule,
    supports_group,
)
from lr_monitor.functional.statistics import (
    Combine,
    HostStepSums,
    StepSums,
    SupportsSwap,
    step_sums,
    summarize,
)
from lr_monitor.functional.step import (
    ParamSnapshot,
    effective_lr,
    is_supported,
    last_update,
    optimizer_steps,
    with_applied_update,
)

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "Combine",
    "HostStepSums",
    "ParamSnapshot",
    "ParamStep",
    "StepSums",
    "SupportsSwap",
    "UnsupportedOptimizerError",
    "effective_lr",
    "find_rule",
    "is_low_precision",
    "is_supported",
    "iter_group_steps",
    "last_update",
    "optimizer_steps",
    "preconditioned_sharpness",
    "register_rule",
    "sharpness",
    "stability_threshold",
    "step_sums",
    "summarize",
    "supports_group",
    "with_applied_update",
]
