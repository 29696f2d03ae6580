"""The state behind ``update_cosine``: each parameter's previous update, on a subsample.

The statistics in :mod:`lr_monitor.functional.statistics` are pure; they reach the
previous update through anything with a ``swap(param, update)`` method
(:class:`~lr_monitor.functional.statistics.SupportsSwap`). :class:`UpdateHistory` is that
store for a :class:`~lr_monitor.recording.StepRecorder`: bounded memory, and
checkpoint/restore so a failed or repeated measurement leaves it as it was.
"""

from __future__ import annotations

from torch import Tensor

from lr_monitor._validation import check_int
from lr_monitor.functional.rules import compute_dtype
from lr_monitor.functional.statistics import subsample

__all__ = ["UpdateHistory"]


class UpdateHistory:
    """The previous recorded update of each parameter, on a bounded subsample.

    Keeps the update at the fixed random index set of
    :func:`~lr_monitor.functional.statistics.sample_index`, so at most
    ``samples_per_tensor`` values per tensor (all of them for smaller tensors), stored in
    float32 or better. Successive samples of a tensor cover the same coordinates.
    Parameters are keyed by ``id``: call :meth:`clear` when they are replaced.

    Args:
        samples_per_tensor: Upper bound on the values kept per tensor (≥ 1).

    Raises:
        ValueError: if ``samples_per_tensor`` < 1.

    Example:
        >>> import torch
        >>> history, p = UpdateHistory(samples_per_tensor=3), torch.zeros(10)
        >>> prev, cur = history.swap(p, torch.ones(10))
        >>> prev is None, cur.tolist(), history.nbytes()
        (True, [1.0, 1.0, 1.0], 12)
        >>> history.swap(p, torch.full((10,), 2.0))[0].tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(self, samples_per_tensor: int = 4096) -> None:
        self.samples_per_tensor = check_int("samples_per_tensor", samples_per_tensor, 1)
        self._prev: dict[int, Tensor] = {}

    def sample(self, update: Tensor) -> Tensor:
        """The fixed subsample of ``update``, flat (a view when it is the whole tensor).

        Args:
            update: An update (any shape).

        Returns:
            At most ``samples_per_tensor`` of its values.
        """
        return subsample(update, self.samples_per_tensor)

    def swap(self, param: Tensor, update: Tensor) -> tuple[Tensor | None, Tensor]:
        """Store this update's sample; return (previous sample or None, current sample).

        Both samples are copies in float32 (float64 for float64 updates); each value stands
        for ``update.numel() / len(sample)`` elements of the tensor. A previous sample of
        another length (the parameter changed size) counts as none.

        Args:
            param: The parameter (its ``id`` is the key).
            update: Its update in this step.

        Returns:
            ``(previous sample or None, current sample)``.
        """
        cur = self.sample(update.detach()).to(compute_dtype(update), copy=True)
        prev = self._prev.get(id(param))
        if prev is not None and prev.shape != cur.shape:
            prev = None
        self._prev[id(param)] = cur
        return prev, cur

    def checkpoint(self) -> dict[int, Tensor]:
        """The stored samples (to :meth:`restore` after a failed or repeated pass).

        Returns:
            A shallow copy of the store (the samples are never modified in place).
        """
        return dict(self._prev)

    def restore(self, saved: dict[int, Tensor]) -> None:
        """Go back to a :meth:`checkpoint`.

        Args:
            saved: What :meth:`checkpoint` returned.
        """
        self._prev = dict(saved)

    def clear(self) -> None:
        """Forget every stored update (e.g. after a rollback or a resume)."""
        self._prev.clear()

    def nbytes(self) -> int:
        """Memory held by the stored samples, in bytes."""
        return sum(t.numel() * t.element_size() for t in self._prev.values())
