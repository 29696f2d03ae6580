"""The state behind ``update_cosine``: each parameter's previous update, on a subsample.

The statistics in :mod:`lr_monitor.functional.statistics` are pure; they reach the
previous update through anything with a ``swap(param, update)`` method
(:class:`~lr_monitor.functional.statistics.SupportsSwap`). :class:`UpdateHistory` is that
store for a :class:`~lr_monitor.recording.StepRecorder`: bounded memory, and
checkpoint/restore so a failed or repeated measurement leaves it as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
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
    Many small tensors can be swapped at once (:meth:`swap_whole`): their updates are then
    kept as one copy per *pack* (the same tensors in the same order) until a swap touches
    one of them another way.

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
        #: Packs: parameter ids in order -> (their updates concatenated, their sizes, the
        #: ids as a set). Pairwise disjoint, and newer than ``_prev`` for their ids.
        self._packs: dict[tuple[int, ...], tuple[Tensor, list[int], frozenset[int]]] = {}

    def _unpack(self, key: tuple[int, ...]) -> None:
        """Move a pack's updates to the per-parameter store, as copies.

        A view would keep the whole pack alive until every one of its tensors is swapped
        again.
        """
        flat, sizes, _ = self._packs.pop(key)
        self._prev.update(zip(key, (t.clone() for t in flat.split(sizes)), strict=True))

    def _unpack_overlapping(self, ids: frozenset[int] | set[int], keep: object = None) -> None:
        for key in [k for k, (_, _, s) in self._packs.items()
                    if k != keep and not s.isdisjoint(ids)]:
            self._unpack(key)

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
        if self._packs:
            self._unpack_overlapping({id(param)})
        cur = self.sample(update.detach()).to(compute_dtype(update), copy=True)
        prev = self._prev.get(id(param))
        if prev is not None and prev.shape != cur.shape:
            prev = None
        self._prev[id(param)] = cur
        return prev, cur

    def swap_whole(self, params: Sequence[Tensor], updates: Tensor, sizes: Sequence[int]
                   ) -> tuple[Tensor, Tensor]:
        """:meth:`swap` for many small tensors at once, their updates concatenated.

        Every tensor must be kept whole (``size ≤ samples_per_tensor``). The result is
        what one :meth:`swap` per tensor would give, concatenated, with zeros where a
        tensor has no previous update. When the same tensors come in the same order as
        last time (the usual case) this is one copy, with no Python work per tensor.

        Args:
            params: The parameters (keys), in the order of ``updates``.
            updates: Their updates, flat and concatenated.
            sizes: Elements of each.

        Returns:
            ``(previous, current)``, both of ``updates``' length.

        Raises:
            ValueError: if a tensor is larger than ``samples_per_tensor``.

        Example:
            >>> a, b = torch.zeros(2), torch.zeros(3)
            >>> h = UpdateHistory()
            >>> h.swap_whole([a, b], torch.arange(5.0), [2, 3])[0].tolist()
            [0.0, 0.0, 0.0, 0.0, 0.0]
            >>> h.swap(b, torch.ones(3))[0].tolist()  # b's part of the pack
            [2.0, 3.0, 4.0]
        """
        sizes = list(sizes)
        if sizes and max(sizes) > self.samples_per_tensor:
            raise ValueError(f"sizes has a tensor of {max(sizes)} elements: swap_whole "
                             f"keeps tensors of at most {self.samples_per_tensor} whole")
        key = tuple(map(id, params))
        cur = updates.detach().to(compute_dtype(updates), copy=True)
        hit = self._packs.get(key)
        if hit is not None and hit[1] == sizes:
            prev = hit[0]
        else:
            ids = frozenset(key)
            self._unpack_overlapping(ids)
            parts = cur.split(sizes)
            old = [self._prev.get(i) for i in key]
            prev = torch.cat([o if o is not None and o.shape == c.shape
                              else torch.zeros_like(c) for o, c in zip(old, parts, strict=True)]
                             ) if parts else cur
            for i in key:  # the pack holds them now
                self._prev.pop(i, None)
            hit = (cur, sizes, ids)
        self._packs[key] = (cur, sizes, hit[2])
        return prev, cur

    def checkpoint(self) -> tuple[dict[int, Tensor], dict[Any, Any]]:
        """The stored samples (to :meth:`restore` after a failed or repeated pass).

        Returns:
            Shallow copies of the store (the samples are never modified in place).
        """
        return dict(self._prev), dict(self._packs)

    def restore(self, saved: tuple[dict[int, Tensor], dict[Any, Any]]) -> None:
        """Go back to a :meth:`checkpoint`.

        Args:
            saved: What :meth:`checkpoint` returned.
        """
        self._prev, self._packs = dict(saved[0]), dict(saved[1])

    def clear(self) -> None:
        """Forget every stored update (e.g. after a rollback or a resume)."""
        self._prev.clear()
        self._packs.clear()

    def nbytes(self) -> int:
        """Memory held by the stored samples, in bytes (shared copies counted once)."""
        seen: dict[int, int] = {}
        for t in [*self._prev.values(), *(p[0] for p in self._packs.values())]:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())
