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

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lr_monitor._validation import check_callable
from lr_monitor.faults import FaultBarrier
from lr_monitor.tags import GLOBAL, stat_tag

if TYPE_CHECKING:
    from lr_monitor.functional.statistics import HostStepSums

__all__ = ["Listeners", "RecordListener", "StepRecord", "listener_name"]


@dataclass(frozen=True)
class StepRecord:
    """The statistics of one recorded step of one optimizer.

    Args:
        optimizer: The optimizer's name in the tags (``Adam``, ``Adam-1``).
        index: The optimizer's own step index (0 for its first ``step()``).
        rows: Statistic values per row: each param group by name, :data:`~lr_monitor.tags.GLOBAL`
            (all groups together; always present) and, with
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
    host: HostStepSums | None = field(default=None, repr=False, compare=False)

    def value(self, stat: str, row: str = GLOBAL) -> float | None:
        """One statistic of one row, or ``None`` when it was not recorded.

        Args:
            stat: One of :data:`lr_monitor.tags.STATISTICS`.
            row: A row name (default: :data:`~lr_monitor.tags.GLOBAL`).

        Returns:
            The value, or ``None`` (e.g. ``update_cosine`` on the first recorded step).
        """
        return self.rows.get(row, {}).get(stat)

    def metrics(self, prefix: str, rows: Iterable[str] | None = None) -> dict[str, float]:
        """The scalars as ``{tag: value}`` (:func:`lr_monitor.tags.stat_tag`).

        Args:
            prefix: The tag prefix.
            rows: The rows to include (default: all).

        Returns:
            One entry per statistic of each row, rows in the order given.
        """
        keep = self.rows.keys() if rows is None else rows
        return {stat_tag(prefix, stat, self.optimizer, row): v
                for row in keep for stat, v in self.rows.get(row, {}).items()}


#: A function a recorder calls with each :class:`StepRecord` (what it returns is ignored).
RecordListener = Callable[[StepRecord], object]


def listener_name(listener: Callable[..., Any]) -> str:
    """A listener's name for fault reports: its qualified name, or its class's.

    Example:
        >>> listener_name(print), listener_name(Listeners.publish)
        ('print', 'Listeners.publish')
    """
    name = getattr(listener, "__qualname__", None)
    return name if isinstance(name, str) else type(listener).__qualname__


class Listeners:
    """The listeners of a source of records: each called once per record, in order.

    A listener that raises is reported through the source's
    :class:`~lr_monitor.faults.FaultBarrier` (stage ``listener``) and switched off alone;
    the record still reaches the others.

    Args:
        listeners: The first listeners.

    Raises:
        ValueError: for a listener that is not callable.

    Example:
        >>> seen = []
        >>> listeners = Listeners([seen.append])
        >>> listeners.subscribe(seen.append)  # once, however often added
        >>> listeners.publish(StepRecord("SGD", 0, {}), FaultBarrier("demo"), "SGD")
        >>> len(seen), len(listeners)
        (1, 1)
    """

    def __init__(self, listeners: Iterable[RecordListener] = ()) -> None:
        self._items: list[RecordListener] = []
        for listener in listeners:
            self.subscribe(listener)

    def subscribe(self, listener: RecordListener) -> None:
        """Add ``listener`` (nothing happens if it is already there).

        Raises:
            ValueError: if ``listener`` is not callable.
        """
        check_callable("listener", listener, "a callable taking a StepRecord")
        if listener not in self._items:
            self._items.append(listener)

    def unsubscribe(self, listener: RecordListener) -> None:
        """Remove ``listener`` (nothing happens if it is not there)."""
        if listener in self._items:
            self._items.remove(listener)

    def publish(self, record: StepRecord, faults: FaultBarrier, source: str) -> None:
        """Call every listener with ``record``, each behind ``faults``.

        Args:
            record: The record.
            faults: The barrier of the source (stage ``listener``).
            source: Names the source in a fault report (e.g. the optimizer).
        """
        for listener in list(self._items):
            faults.call("listener", listener, record,
                        subject=f"{source} {listener_name(listener)}")

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[RecordListener]:
        return iter(list(self._items))
