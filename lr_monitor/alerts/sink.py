"""The sink protocol: what a sink is, how events reach sinks, and how sinks end.

:class:`AlertSink` is the interface every sink implements (:meth:`~AlertSink.send`, optional
:meth:`~AlertSink.flush` and :meth:`~AlertSink.close`, rank-zero gating through
:meth:`~AlertSink.active`). :class:`CallableSink` makes any ``fn(event)`` a sink and
:func:`as_sink` applies it where needed. :func:`dispatch` sends one event to many sinks with
every fault contained; :func:`close_sinks` flushes and closes them, each within its own
bound. :func:`checkpoint_sinks` and :func:`resume_sinks` carry what a sink needs across a
resume from a checkpoint (the event log's end, so a resumed run writes each event once).
:func:`event_line` is the one readable line the text sinks share.

A sink can serve several runs: :meth:`~AlertSink.close` ends one, and a later
:meth:`~AlertSink.send` opens the sink again (the guard closes its sinks at the end of
every ``fit`` and uses them again in the next one).

Faults are reported on the ``lr_monitor.alerts`` logger, never raised into training.

Example:
    >>> from lr_monitor.events import GuardEvent
    >>> class Broken(AlertSink):
    ...     def send(self, event):
    ...         raise OSError("disk full")
    >>> seen = []
    >>> sinks = [Broken(), as_sink(seen.append)]
    >>> event = GuardEvent(step=12, kind="spike", signal="loss", value=51.0,
    ...                    threshold=4.2, actions=("cut_lr",), time=0.0)
    >>> dispatch(sinks, event)  # the fault is logged, not raised; the others still run
    1
    >>> [e.step for e in seen]
    [12]
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lr_monitor._validation import check_bool, check_real, check_str, invalid
from lr_monitor.alerts.ranks import is_env_rank_zero
from lr_monitor.events import GuardEvent

__all__ = [
    "ALERTS_LOGGER_NAME",
    "AlertSink",
    "CallableSink",
    "as_sink",
    "as_sinks",
    "checkpoint_sinks",
    "close_sinks",
    "dispatch",
    "event_line",
    "resume_sinks",
]

#: Logger on which sink faults, webhook failures and dropped alerts are reported.
ALERTS_LOGGER_NAME = "lr_monitor.alerts"

_log = logging.getLogger(ALERTS_LOGGER_NAME)


def event_line(event: GuardEvent) -> str:
    """One readable line for an event: ``[run] summary | message``, never a newline.

    Args:
        event: The event to describe.

    Returns:
        :meth:`GuardEvent.summary`, prefixed with the run name and followed by the
        detector's message when they are known.

    Example:
        >>> e = GuardEvent(step=3, kind="nonfinite", signal="loss", value=float("nan"),
        ...                threshold=0.0, message="loss is nan", actions=("skip",),
        ...                run="version_1", time=0.0)
        >>> event_line(e)
        '[version_1] step 3: nonfinite on loss = nan (threshold 0) -> skip | loss is nan'
    """
    line = event.summary()
    if event.run:
        line = f"[{event.run}] {line}"
    if event.message:
        line = f"{line} | {event.message}"
    return " ".join(line.splitlines())


def _check_is_rank_zero(value: Any) -> Callable[[], bool] | None:
    """``value`` if it can be the ``is_rank_zero`` argument of a sink: a callable or ``None``.

    Args:
        value: The argument.

    Returns:
        ``value``.

    Raises:
        ValueError: Otherwise.

    Example:
        >>> _check_is_rank_zero(True)
        Traceback (most recent call last):
        ...
        ValueError: is_rank_zero=True is invalid: must be None or a callable returning a bool
    """
    if value is not None and not callable(value):
        raise invalid("is_rank_zero", value, "None or a callable returning a bool")
    return value


class AlertSink(abc.ABC):
    """Where guard events go. Subclasses implement :meth:`send`.

    A sink sends only on rank zero by default: ``send`` is expected to return at once
    when :meth:`active` is false. Subclasses must call ``super().__init__``.

    Args:
        rank_zero: Send only from the rank-zero process (default). ``False`` sends from
            every process.
        is_rank_zero: How to tell rank zero; defaults to
            :func:`~lr_monitor.alerts.ranks.is_env_rank_zero` (environment variables). The
            guard can inject e.g. ``lambda: trainer.is_global_zero``, which is also right
            under ``ddp_spawn``.

    Raises:
        ValueError: If ``rank_zero`` is not a bool or ``is_rank_zero`` not a callable/None.
    """

    def __init__(
        self, *, rank_zero: bool = True, is_rank_zero: Callable[[], bool] | None = None
    ) -> None:
        self.rank_zero = check_bool("rank_zero", rank_zero)
        self.is_rank_zero = _check_is_rank_zero(is_rank_zero)

    def active(self) -> bool:
        """Whether this process should send (always true when ``rank_zero=False``).

        Returns:
            ``True`` if :meth:`send` should deliver.
        """
        if not getattr(self, "rank_zero", True):
            return True
        check = getattr(self, "is_rank_zero", None) or is_env_rank_zero
        return bool(check())

    @abc.abstractmethod
    def send(self, event: GuardEvent) -> None:
        """Deliver (or enqueue) one event.

        Args:
            event: The guard's decision.
        """

    def flush(self, timeout: float | None = None) -> None:  # noqa: B027 - optional hook
        """Wait until what was sent so far is delivered (no-op by default).

        Args:
            timeout: Longest wait in seconds; ``None`` waits until done.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """End a run: deliver what is buffered and release resources, in bounded time.

        No-op by default. Safe to call twice; a later :meth:`send` must open the sink
        again (the guard closes its sinks after every ``fit`` and uses them in the next).
        """

    def checkpoint(self) -> dict[str, Any] | None:
        """What a run resumed from a checkpoint taken now needs from this sink (plain data).

        Returns:
            ``None`` by default: nothing. :class:`~lr_monitor.alerts.JsonlSink` returns
            where its file ends (:meth:`lr_monitor.eventlog.EventLogWriter.mark`).
        """
        return None

    def resume(self, saved: Sequence[Mapping[str, Any]]) -> None:  # noqa: B027
        """Continue from a checkpoint: ``saved`` is what the sinks' :meth:`checkpoint` said.

        No-op by default; a sink picks its own entry.

        Args:
            saved: The non-``None`` results of :meth:`checkpoint` of the checkpoint's
                sinks (:func:`checkpoint_sinks`).
        """

    def __enter__(self) -> AlertSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _warn_once(self, key: object, msg: str, *args: object,
                   exc_info: bool = False) -> bool:
        """Log ``msg`` at WARNING the first time ``key`` is seen on this sink, else at DEBUG.

        Returns:
            Whether it was the first time.
        """
        seen: set[object] = self.__dict__.setdefault("_reported_keys", set())
        if key in seen:
            _log.debug(msg, *args)
            return False
        seen.add(key)
        _log.warning(msg, *args, exc_info=exc_info)
        return True


class CallableSink(AlertSink):
    """Call ``fn(event)`` for every event; exceptions are reported, never raised.

    An exception inside ``fn`` is logged at WARNING (with its traceback) once per
    exception type, and at DEBUG after that. The call happens on the training thread:
    keep ``fn`` fast, or hand the work to a thread of your own.

    Args:
        fn: Any callable taking one :class:`~lr_monitor.events.GuardEvent`.
        name: Name used in reports; defaults to ``fn.__qualname__``.
        rank_zero: See :class:`AlertSink`.
        is_rank_zero: See :class:`AlertSink`.

    Raises:
        TypeError: If ``fn`` is not callable.
        ValueError: If ``name`` is not a non-empty string or ``None``.

    Example:
        >>> sink = CallableSink(lambda e: print("alert:", e.kind, e.step))
        >>> sink.send(GuardEvent(step=4, kind="divergence", signal="loss", value=3.0,
        ...                      threshold=2.0, time=0.0))
        alert: divergence 4
        >>> broken = CallableSink(lambda e: {}["missing"])
        >>> broken.send(GuardEvent(step=4, kind="spike", signal="loss", value=3.0,
        ...                        threshold=2.0, time=0.0))  # logged once, not raised
        >>> broken.errors
        1
    """

    def __init__(
        self,
        fn: Callable[[GuardEvent], object],
        *,
        name: str | None = None,
        rank_zero: bool = True,
        is_rank_zero: Callable[[], bool] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(invalid("fn", fn, "a callable fn(event)").args[0])
        check_str("name", name, allow_none=True)
        super().__init__(rank_zero=rank_zero, is_rank_zero=is_rank_zero)
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or type(fn).__name__
        self.errors = 0

    def send(self, event: GuardEvent) -> None:
        """Call the function; an exception is counted in :attr:`errors` and logged.

        Args:
            event: The event.
        """
        if not self.active():
            return
        try:
            self.fn(event)
        except Exception as exc:
            self.errors += 1
            self._warn_once(("callable", type(exc)),
                            "alert callable %s raised on the event at step %s (reported once "
                            "per exception type): %s: %s", self.name, event.step,
                            type(exc).__name__, exc, exc_info=True)

    def __repr__(self) -> str:
        return f"CallableSink({self.name})"


def as_sink(obj: AlertSink | Callable[[GuardEvent], object], arg: str = "sink") -> AlertSink:
    """Return ``obj`` if it is a sink, else wrap a callable in :class:`CallableSink`.

    Args:
        obj: A sink or a ``fn(event)``.
        arg: The argument's name as the user typed it, for the error message
            (e.g. ``"alerts[1]"``).

    Returns:
        An :class:`AlertSink`.

    Raises:
        TypeError: If ``obj`` is neither.

    Example:
        >>> as_sink(print).__class__.__name__
        'CallableSink'
        >>> as_sink(1, "alerts[0]")
        Traceback (most recent call last):
        ...
        TypeError: alerts[0]=1 is invalid: must be an AlertSink or a callable fn(event)
    """
    if isinstance(obj, AlertSink):
        return obj
    if callable(obj):
        return CallableSink(obj)
    raise TypeError(invalid(arg, obj, "an AlertSink or a callable fn(event)").args[0])


def as_sinks(arg: str, sinks: Any) -> list[AlertSink]:
    """A user's list of sinks and callables, each as an :class:`AlertSink`.

    Args:
        arg: The argument's name as the user typed it (``"alerts"``).
        sinks: ``None`` or an iterable of sinks and ``fn(event)`` callables.

    Returns:
        The sinks (an empty list for ``None``).

    Raises:
        ValueError: for anything else, naming the argument or the entry (``alerts[1]``).

    Example:
        >>> [type(s).__name__ for s in as_sinks("alerts", [print])]
        ['CallableSink']
        >>> as_sinks("alerts", [print, 5])
        Traceback (most recent call last):
        ...
        ValueError: alerts[1]=5 is invalid: must be an AlertSink or a callable fn(event)
    """
    if sinks is None:
        return []
    if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable):
        raise invalid(arg, sinks, "None or a list of alert sinks or callables")
    out = []
    for i, sink in enumerate(sinks):
        if not (isinstance(sink, AlertSink) or callable(sink)):
            raise invalid(f"{arg}[{i}]", sink, "an AlertSink or a callable fn(event)")
        out.append(as_sink(sink))
    return out


def _sink_name(sink: object) -> str:
    return type(sink).__name__


def dispatch(sinks: Iterable[AlertSink], event: GuardEvent) -> int:
    """Send ``event`` to every sink; an exception in one sink never stops the others.

    Faults are reported on the ``lr_monitor.alerts`` logger (at WARNING once per sink
    and exception type, at DEBUG after that) and are never raised, so a broken sink
    cannot crash a training run.

    Args:
        sinks: The sinks, in order.
        event: The event to send.

    Returns:
        How many sinks raised.

    Example:
        >>> got = []
        >>> dispatch([CallableSink(got.append)], GuardEvent(step=1, kind="spike",
        ...          signal="loss", value=9.0, threshold=3.0, time=0.0))
        0
        >>> len(got)
        1
    """
    failures = 0
    for sink in sinks:
        try:
            sink.send(event)
        except Exception as exc:
            failures += 1
            msg = "alert sink %s failed on the event at step %s: %s: %s"
            args = (_sink_name(sink), event.step, type(exc).__name__, exc)
            if isinstance(sink, AlertSink):
                sink._warn_once(("dispatch", type(exc)), msg, *args)
            else:
                _log.warning(msg, *args)
    return failures


def close_sinks(sinks: Iterable[AlertSink], timeout: float | None = 0.0) -> None:
    """Flush, then close, every sink, containing any exception (for training teardown).

    Each :meth:`~AlertSink.close` is bounded by its sink (a
    :class:`~lr_monitor.alerts.WebhookSink` waits at most its ``close_timeout`` for queued
    alerts; the other built-in sinks do local work only), so with the default ``timeout``
    this returns within the sum of those bounds.

    Args:
        sinks: The sinks.
        timeout: Extra time budget in seconds for all the flushes before closing, in
            total (default ``0``: flush what can be flushed at once, wait for nothing);
            ``None`` waits until each sink is done.

    Raises:
        ValueError: If ``timeout`` is not a number ``>= 0`` or ``None`` (checked before
            anything is flushed).

    Example:
        >>> close_sinks([CallableSink(print)])
    """
    if timeout is not None:
        timeout = check_real("timeout", timeout, low=0.0, low_closed=True)
    sinks = list(sinks)
    deadline = None if timeout is None else time.monotonic() + timeout
    for sink in sinks:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            sink.flush(remaining)
        except Exception as exc:
            _log.warning("flushing alert sink %s failed: %s: %s", _sink_name(sink),
                         type(exc).__name__, exc)
    for sink in sinks:
        try:
            sink.close()
        except Exception as exc:
            _log.warning("closing alert sink %s failed: %s: %s", _sink_name(sink),
                         type(exc).__name__, exc)


def checkpoint_sinks(sinks: Iterable[AlertSink]) -> list[dict[str, Any]]:
    """Every sink's :meth:`~AlertSink.checkpoint`, for a checkpoint; faults are contained.

    Args:
        sinks: The sinks.

    Returns:
        The states that are not ``None`` (plain data), in sink order.

    Example:
        >>> checkpoint_sinks([CallableSink(print)])
        []
    """
    saved = []
    for sink in sinks:
        try:
            state = sink.checkpoint()
        except Exception as exc:
            _log.warning("alert sink %s could not say where its record ends (%s: %s); a run "
                         "resumed from this checkpoint may repeat its events", _sink_name(sink),
                         type(exc).__name__, exc)
            continue
        if state is not None:
            saved.append(state)
    return saved


def resume_sinks(sinks: Iterable[AlertSink], saved: object) -> None:
    """Hand every sink what :func:`checkpoint_sinks` saved; faults are logged, never raised.

    Args:
        sinks: The sinks of the resumed run.
        saved: What :func:`checkpoint_sinks` returned when the checkpoint was taken (read
            back from it: anything else is ignored with a warning).

    Example:
        >>> resume_sinks([CallableSink(print)], [{"path": "run/events.jsonl"}])
    """
    if saved is None:
        return
    if not isinstance(saved, Sequence) or isinstance(saved, (str, bytes)) or not all(
            isinstance(s, Mapping) for s in saved):
        _log.warning("the checkpoint's alert sink states are not a list of dicts (%.80r); "
                     "ignored", saved)
        return
    for sink in sinks:
        try:
            sink.resume(saved)
        except Exception as exc:
            _log.warning("alert sink %s could not resume from the checkpoint: %s: %s",
                         _sink_name(sink), type(exc).__name__, exc)
