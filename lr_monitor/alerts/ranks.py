"""Which process may send: the rank of this process according to its environment.

Alert sinks send on rank zero only (:class:`~lr_monitor.alerts.AlertSink`). Launchers tell a
process its rank through environment variables; this module reads them in the order
Lightning's ``rank_zero_only`` does, so the sinks agree with Lightning without importing it.
:class:`GlobalZero` asks a trainer instead, and stays picklable.

Example:
    >>> env_rank({"LOCAL_RANK": "2"}), env_rank({"RANK": "x", "SLURM_PROCID": "3"})
    (2, 3)
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Any

__all__ = ["RANK_ENV_VARS", "GlobalZero", "env_rank", "is_env_rank_zero"]

#: Environment variables holding the process rank, in the order they are consulted
#: (the same order as Lightning's ``rank_zero_only``).
RANK_ENV_VARS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def env_rank(environ: Mapping[str, str] | None = None) -> int:
    """The global rank of this process according to the environment.

    The first of :data:`RANK_ENV_VARS` that is set to an integer wins; ``0`` when none is.

    Args:
        environ: The environment to read; ``None`` reads :data:`os.environ`.

    Returns:
        The rank (``0`` on a single-process run).

    Example:
        >>> env_rank({}), env_rank({"RANK": "0", "LOCAL_RANK": "1"})
        (0, 0)
    """
    env = os.environ if environ is None else environ
    for name in RANK_ENV_VARS:
        value = env.get(name)
        if value is None or not value.strip():
            continue
        try:
            return int(value)
        except ValueError:
            continue
    return 0


def is_env_rank_zero() -> bool:
    """Whether :func:`env_rank` is ``0``.

    Returns:
        ``True`` on rank zero and on single-process runs.
    """
    return env_rank() == 0


class GlobalZero:
    """``is_rank_zero`` for a sink: ``owner.is_global_zero``, and picklable.

    The guard hands one to its sinks, built from the trainer (right under ``ddp_spawn``
    too). It holds the owner weakly, so a sink does not keep a finished trainer alive,
    and it pickles without it: a copy, like a call after the owner is gone, falls back to
    :func:`is_env_rank_zero`.

    Args:
        owner: Anything with an ``is_global_zero`` attribute, e.g. a Lightning ``Trainer``.

    Example:
        >>> import pickle
        >>> class Trainer:
        ...     is_global_zero = False
        >>> trainer = Trainer()
        >>> check = GlobalZero(trainer)
        >>> check(), pickle.loads(pickle.dumps(check))()  # the copy reads the environment
        (False, True)
    """

    def __init__(self, owner: Any) -> None:
        self._owner: weakref.ref[Any] | None = weakref.ref(owner)

    def __call__(self) -> bool:
        """Whether the owner is global rank zero (:func:`is_env_rank_zero` without one).

        Returns:
            ``owner.is_global_zero``, or :func:`is_env_rank_zero` when the owner is gone.
        """
        owner = None if self._owner is None else self._owner()
        if owner is None:
            return is_env_rank_zero()
        return bool(owner.is_global_zero)

    def __getstate__(self) -> dict[str, Any]:
        return {"_owner": None}

    def __repr__(self) -> str:
        owner = None if self._owner is None else self._owner()
        return f"GlobalZero({type(owner).__name__ if owner is not None else 'environment'})"
