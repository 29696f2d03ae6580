"""What a recorded optimizer step produces: one :class:`StepRecord`, handed to listeners.

A :class:`~lr_monitor.recording.StepRecorder` publishes a record after each recorded
step to every listener subscribed to it. The monitor callback turns it into logger
scalars and TensorBoard histograms; the guard reads the statistics it watches from it.
Nobody parses tag strings to get a value back: :meth:`StepRecord.value` reads a row.

Example:
    >>> r = StepRecord(optimizer="Adam", index=0,
    ...                rows={"pg0": {"lr": 0.1, "update_ratio": 2e-3},
    ...                      "global": {"update_ratio": 2e-3}})
    >>> r.value("update_ratio")
    0.002
    >>> r.metrics("optim", rows=["pg0"])
    {'optim/lr/Adam/pg0': 0.1, 'optim/update_ratio/Adam/pg0': 0.002}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lr_monitor.tags import GLOBAL, stat_tag

__all__ = ["RecordListener", "StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """The statistics of one recorded step of one optimizer.

    Args:
        optimizer: The optimizer's name in the tags (``Adam``, ``Adam-1``).
        index: The optimizer's own step index (0 for its first ``step()``).
        rows: Statistic values per row: each param group by name, :data:`~lr_monitor.tags.GLOBAL`
            (all groups; always present when the optimizer has parameters) and, with
            ``granularity="tensor"``, each selected parameter by name. Statistic names are
            those of :data:`lr_monitor.tags.STATISTICS`.
        groups: The names of the rows that are param groups, in the optimizer's order.
        host: The host-side sums the rows were summarised from
            (:class:`~lr_monitor.functional.statistics.HostStepSums`; its ``hist`` holds
            one effective-lr histogram per group), or ``None``.
    """

    optimizer: str
    index: int
    rows: Mapping[str, Mapping[str, float]]
    groups: tuple[str, ...] = ()
    host: Any = field(default=None, repr=False, compare=False)

    def value(self, stat: str, row: str = GLOBAL) -> float | None:
        """One statistic of one row, or ``None`` when it was not recorded."""
        return self.rows.get(row, {}).get(stat)

    def metrics(self, prefix: str, rows: Iterable[str] | None = None) -> dict[str, float]:
        """The scalars as ``{tag: value}`` (:func:`lr_monitor.tags.stat_tag`).

        Args:
            prefix: The tag prefix.
            rows: The rows to include (default: all).
        """
        keep = self.rows.keys() if rows is None else rows
        return {stat_tag(prefix, stat, self.optimizer, row): v
                for row in keep for stat, v in self.rows.get(row, {}).items()}


#: A function a recorder calls with each :class:`StepRecord`.
RecordListener = Callable[[StepRecord], None]
