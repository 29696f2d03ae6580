"""Alert sinks: where the guard's decisions go.

The guard (:class:`lr_monitor.DivergenceGuard`) turns every decision into a
:class:`~lr_monitor.events.GuardEvent` and hands it to a list of sinks with
:func:`dispatch`. Each sink implements :class:`AlertSink`:

* :class:`LoggingSink` -- one readable line per event on the ``lr_monitor.guard`` logger
  (``WARNING`` when the guard acted, ``INFO`` when it only recorded). On by default.
* :class:`JsonlSink` -- one JSON object per event in ``events.jsonl``, flushed and
  ``fsync``-ed per event, with size-based rotation. On by default; read it back with
  :func:`read_events`.
* :class:`TensorBoardSink` -- the event line as a text summary (TensorBoard's Text tab)
  through any ``SummaryWriter``-like object.
* :class:`WebhookSink` -- an HTTP POST (Slack-compatible or generic JSON) from a
  background thread, rate-limited, with bounded retries; the URL is a secret and is
  never logged, printed or pickled; closing waits at most ``close_timeout``.
* :class:`CallableSink` -- wraps any ``fn(event)``.

Guarantees: no sink blocks training (the webhook only enqueues), no sink exception
reaches the training loop when called through :func:`dispatch`, on multi-process runs
only rank zero sends anything, every sink pickles and serves any number of runs (a closed
sink opens again on its next event), and a run resumed from a checkpoint writes each event
to ``events.jsonl`` once (:func:`checkpoint_sinks`, :func:`resume_sinks`). This package
does not import Lightning.

The package is split by concern; every name is importable from here:

* :mod:`lr_monitor.alerts.sink` -- the protocol: :class:`AlertSink`, :class:`CallableSink`,
  :func:`as_sink`, :func:`as_sinks`, :func:`dispatch`, :func:`close_sinks`,
  :func:`checkpoint_sinks`, :func:`resume_sinks`, :func:`event_line`.
* :mod:`lr_monitor.alerts.sinks` -- the log line, the event log, TensorBoard text and
  :func:`make_default_sinks`.
* :mod:`lr_monitor.alerts.webhook` -- :class:`WebhookSink`.
* :mod:`lr_monitor.alerts.ranks` -- which process is rank zero (:class:`GlobalZero` asks
  a trainer, and pickles).
* The file format of ``events.jsonl`` (:func:`read_events`, :class:`EventFileError`) is
  :mod:`lr_monitor.eventlog`, re-exported here.

Example:
    The run's record, written and read back:

    >>> import tempfile
    >>> from lr_monitor.events import GuardEvent
    >>> event = GuardEvent(step=3, kind="spike", signal="loss", value=9.0, threshold=4.0,
    ...                    actions=("skip",), time=0.0)
    >>> with tempfile.TemporaryDirectory() as run:
    ...     sinks = make_default_sinks(run, logging=False)
    ...     failed = dispatch(sinks, event)
    ...     close_sinks(sinks)
    ...     [(e.step, e.summary()) for e in read_events(f"{run}/{EVENTS_FILENAME}")]
    [(3, 'step 3: spike on loss = 9 (threshold 4) -> skip')]
"""

from __future__ import annotations

from lr_monitor.alerts.ranks import RANK_ENV_VARS, GlobalZero, env_rank, is_env_rank_zero
from lr_monitor.alerts.sink import (
    AlertSink,
    CallableSink,
    as_sink,
    as_sinks,
    checkpoint_sinks,
    close_sinks,
    dispatch,
    event_line,
    resume_sinks,
)
from lr_monitor.alerts.sinks import (
    GUARD_LOGGER_NAME,
    JsonlSink,
    LoggingSink,
    TensorBoardSink,
    TextSummaryWriter,
    make_default_sinks,
)
from lr_monitor.alerts.webhook import (
    DEFAULT_CLOSE_TIMEOUT,
    WEBHOOK_URL_ENV,
    WebhookFormat,
    WebhookSink,
)
from lr_monitor.eventlog import (
    DEFAULT_MAX_BYTES,
    EVENTS_FILENAME,
    SUPERSEDED_EVENTS_FILENAME,
    EventFileError,
    read_events,
    unique_events,
)

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_MAX_BYTES",
    "EVENTS_FILENAME",
    "GUARD_LOGGER_NAME",
    "RANK_ENV_VARS",
    "SUPERSEDED_EVENTS_FILENAME",
    "WEBHOOK_URL_ENV",
    "AlertSink",
    "CallableSink",
    "EventFileError",
    "GlobalZero",
    "JsonlSink",
    "LoggingSink",
    "TensorBoardSink",
    "TextSummaryWriter",
    "WebhookFormat",
    "WebhookSink",
    "as_sink",
    "as_sinks",
    "checkpoint_sinks",
    "close_sinks",
    "dispatch",
    "env_rank",
    "event_line",
    "is_env_rank_zero",
    "make_default_sinks",
    "read_events",
    "resume_sinks",
    "unique_events",
]
