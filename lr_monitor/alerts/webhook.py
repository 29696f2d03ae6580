"""Webhook alerts: a threaded HTTP client that never blocks training and never leaks its URL.

:class:`WebhookSink` posts each event to a Slack incoming webhook (or any endpoint taking
JSON). :meth:`~WebhookSink.send` only rate-limits and enqueues; a daemon thread does the
HTTP work with bounded retries. The URL is a secret: it is hidden from ``repr``, scrubbed
from every reported error (in all its encoded forms and by its path tokens), not followed
through redirects, and never pickled; credentials written in it (``user:password@``) are
sent as HTTP Basic authentication, never in the request line.

:meth:`~WebhookSink.close` waits at most ``close_timeout`` seconds (a worker stuck in a
request is abandoned, never waited for), and a sink that was closed opens again on its
next event: one sink serves any number of runs. Sinks still open when the interpreter
exits get a bounded chance to flush.

Example:
    >>> sink = WebhookSink("https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXX")
    >>> "XXXXXXXXXXXX" in repr(sink) + repr(sink.__getstate__())
    False
    >>> sink.close()
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import http.client
import json
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Literal

from lr_monitor._validation import (
    check_callable,
    check_choice,
    check_http_url,
    check_int,
    check_real,
    invalid,
)
from lr_monitor.alerts.sink import AlertSink, _log, event_line
from lr_monitor.eventlog import _json_default
from lr_monitor.events import GuardEvent

__all__ = ["DEFAULT_CLOSE_TIMEOUT", "MAX_TIMEOUT", "WEBHOOK_URL_ENV", "WebhookFormat",
           "WebhookSink"]

#: Environment variable :class:`WebhookSink` reads its URL from when none is passed.
WEBHOOK_URL_ENV = "LR_MONITOR_WEBHOOK_URL"
#: Longest ``timeout`` (one HTTP attempt) and ``close_timeout``, in seconds.
MAX_TIMEOUT = 600.0
#: Default ``close_timeout`` of :class:`WebhookSink`: the longest :meth:`WebhookSink.close`
#: (and so the end of ``fit``) waits for queued alerts, in seconds.
DEFAULT_CLOSE_TIMEOUT = 2.0
#: Longest wait between two attempts, in seconds (also the cap on ``Retry-After``).
_MAX_DELAY = 30.0

#: ``format`` values of :class:`WebhookSink`.
WebhookFormat = Literal["slack", "json"]

_HIDDEN = "<webhook url hidden>"


def _check_interval(arg: str, value: Any) -> float:
    """Seconds ``>= 0``; ``inf`` is allowed (one message per key for the whole run)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)  # NaN fails the comparison
    raise invalid(arg, value, "a number of seconds >= 0 (inf: once per kind and signal)")


class _Secret:
    """Holds a secret; never shows it and never pickles it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def reveal(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return repr(_HIDDEN)

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Secret, (None,))


def _secret_fragments(url: str) -> list[str]:
    """Every substring of ``url`` that could identify it, longest first."""
    parts = urllib.parse.urlsplit(url)
    frags = {url, url.split("://", 1)[-1], parts.path, parts.query, parts.fragment}
    if parts.query:
        frags.add(f"{parts.path}?{parts.query}")
    if parts.password:
        frags.add(parts.password)
    if parts.username:
        frags.add(parts.username)
    tokens = [t for t in parts.path.split("/") if t]
    tokens += [v for _, v in urllib.parse.parse_qsl(parts.query)]
    for tok in tokens:
        # Tokens carry the secret; plain words ("services", "api") do not.
        if len(tok) >= 16 or (len(tok) >= 6 and any(c.isdigit() or c.isupper() for c in tok)):
            frags.add(tok)
    more = {urllib.parse.unquote(f) for f in frags} | {urllib.parse.quote(f) for f in frags}
    return sorted((f for f in frags | more if len(f) >= 4 and f != "/"), key=len, reverse=True)


def _split_credentials(url: str) -> tuple[str, str | None]:
    """The URL to request and the ``Authorization`` header for credentials written in ``url``.

    ``http://user:pa%40ss@host/x`` is requested as ``http://host/x`` with
    ``Authorization: Basic base64("user:pa@ss")`` (percent-decoded, UTF-8, RFC 7617); a URL
    without ``@`` is requested as it is. The fragment is never sent.

    Example:
        >>> _split_credentials("https://bot:pa%40ss@hooks.example.com/x?a=1#f")
        ('https://hooks.example.com/x?a=1', 'Basic Ym90OnBhQHNz')
        >>> _split_credentials("https://hooks.example.com/x")
        ('https://hooks.example.com/x', None)
    """
    parts = urllib.parse.urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    target = urllib.parse.urlunsplit((parts.scheme, hostport, parts.path, parts.query, ""))
    if not at or not userinfo:
        return target, None
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return target, "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def _scrub(text: str, fragments: Iterable[str]) -> str:
    for frag in fragments:
        if frag in text:
            text = text.replace(frag, _HIDDEN)
    return text


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is reported as a failure: the body must go to the configured URL only."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_LIVE_WEBHOOKS: weakref.WeakSet[WebhookSink] = weakref.WeakSet()
_AT_EXIT_BUDGET = 5.0
_STOP = object()


class _Session:
    """One run of a sink, from its first event to :meth:`WebhookSink.close`.

    A queue, a stop flag and the worker thread emptying the queue. A session is never
    reused: :meth:`~WebhookSink.close` ends it (an abandoned worker keeps its own queue and
    flag, so it cannot touch the next session) and the next event starts a new one.
    """

    def __init__(self, sink: WebhookSink) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=sink.queue_size)
        self.stop = threading.Event()
        self.pid = os.getpid()
        self.thread = threading.Thread(target=sink._run, args=(self,),
                                       name="lr_monitor-webhook", daemon=True)


def _wait_done(q: queue.Queue[Any], deadline: float | None) -> bool:
    """Wait until every item of ``q`` is done or ``deadline`` (monotonic) passes.

    Returns:
        Whether the queue is done.
    """
    cond = q.all_tasks_done
    with cond:
        while q.unfinished_tasks:
            if deadline is None:
                cond.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            cond.wait(remaining)
    return True


@atexit.register
def _flush_webhooks_at_exit() -> None:
    """Give queued alerts a bounded chance to go out when the interpreter exits."""
    deadline = time.monotonic() + _AT_EXIT_BUDGET
    for sink in list(_LIVE_WEBHOOKS):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        with contextlib.suppress(Exception):
            sink.flush(remaining)


class WebhookSink(AlertSink):
    """POST each event to a webhook (Slack incoming webhook by default) from a thread.

    :meth:`send` only applies the rate limit and enqueues with ``put_nowait``; a
    background daemon thread does the HTTP POST with ``timeout``, retrying on 5xx,
    429, connection errors and timeouts (not on other 4xx) up to ``max_retries``
    times with exponential backoff (``backoff * 2**attempt`` seconds). A full queue
    drops the event (counted in :attr:`dropped`); training never waits.

    Rate limit: at most one message per ``(kind, signal)`` per ``min_interval``
    seconds; the events in between are counted in :attr:`suppressed` and the next
    message for that key ends with ``(+N similar suppressed)``. At most
    ``max_per_run`` messages are sent per run (until :meth:`close`); the last one says so.

    Runs: the first event starts a worker thread, :meth:`close` ends it within
    ``close_timeout`` seconds, and the next event starts a new one with a fresh rate limit.
    The guard closes its sinks at the end of every ``fit``, so the same sink (and a guard
    holding it) can be used for any number of fits. The counters add up over all runs.

    Failures are reported once per failure streak on the ``lr_monitor.alerts`` logger,
    with the reason but never the URL. Every event also stays in the JSONL record
    (:class:`~lr_monitor.alerts.JsonlSink`), which does not depend on this sink.

    The URL is a secret: it is hidden from ``repr``, never logged, and never pickled.
    A pickled copy (e.g. sent to ``ddp_spawn`` workers) reads the URL again from
    :data:`WEBHOOK_URL_ENV` if that is where it came from; otherwise the copy is
    disabled and says so on its first event. Credentials in the URL
    (``https://user:password@host/...``, percent-encoded) are sent as HTTP Basic
    authentication (``Authorization`` header), never in the request line, and are as
    secret as the rest of the URL; redirects are never followed, so they go to that host
    only.

    Payload: ``format="slack"`` posts ``{"text": line}`` (``&``, ``<``, ``>`` escaped
    as Slack requires); ``format="json"`` posts :meth:`GuardEvent.to_dict` plus
    ``"text"``.

    Args:
        url: The webhook URL: ``http://`` or ``https://``, a host, a port (when written)
            in ``1..65535``, no whitespace or control characters; ``None`` reads
            :data:`WEBHOOK_URL_ENV`.
        format: ``"slack"`` or ``"json"``.
        timeout: Socket timeout in seconds of each HTTP attempt, at most
            :data:`MAX_TIMEOUT`.
        max_retries: Retries after the first attempt (so at most ``1 + max_retries``
            requests per message).
        backoff: First retry delay in seconds, doubled on each retry (at most 30 s).
        queue_size: Messages waiting for the thread; more are dropped.
        min_interval: Seconds between two messages with the same ``(kind, signal)``.
        max_per_run: Most messages this sink sends per run (until :meth:`close`);
            ``None`` for no cap.
        close_timeout: The longest :meth:`close` waits, in seconds, in
            ``[0, MAX_TIMEOUT]``: queued alerts get this long to go out, then the rest is
            dropped and a worker still inside a request is abandoned (it sends nothing
            more and ends when its request times out). The guard closes its sinks at the
            end of ``fit``, so this is also the longest the alerts delay ``fit``.
        rank_zero: See :class:`~lr_monitor.alerts.AlertSink`.
        is_rank_zero: See :class:`~lr_monitor.alerts.AlertSink`.
        clock: Monotonic clock used by the rate limit (injectable for tests).

    Raises:
        ValueError: If there is no URL (naming both ``url`` and
            :data:`WEBHOOK_URL_ENV`), the URL is not an http(s) URL (the message names
            where it came from but never shows it, only a bad port number), or an
            option is out of range: ``timeout`` must be in ``(0, MAX_TIMEOUT]``,
            ``close_timeout`` in ``[0, MAX_TIMEOUT]``, ``min_interval`` a number ``>= 0``
            (``inf``: one message per ``(kind, signal)`` per run), counts ints.

    Example:
        >>> sink = WebhookSink("https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXX")
        >>> repr(sink)[:50]
        "WebhookSink(url='<webhook url hidden>', format='sl"
        >>> "XXXXXXXXXXXX" in repr(sink.__getstate__())
        False
        >>> sink.close()
        >>> WebhookSink(123)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: url='<webhook url hidden>' is invalid: must be an http:// or https:// URL...
        >>> WebhookSink("https://hooks.example.com:99999/T000/XXXX")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: url='<webhook url hidden>' is invalid: must be ... in 1..65535, not 99999...
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        format: WebhookFormat = "slack",
        timeout: float = 5.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        queue_size: int = 100,
        min_interval: float = 60.0,
        max_per_run: int | None = 50,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        rank_zero: bool = True,
        is_rank_zero: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rank_zero=rank_zero, is_rank_zero=is_rank_zero)
        self.format: WebhookFormat = check_choice(  # type: ignore[assignment]
            "format", format, ("slack", "json"))
        self.timeout: float = check_real("timeout", timeout, low=0.0, high=MAX_TIMEOUT,
                                         high_closed=True)
        self.max_retries: int = check_int("max_retries", max_retries, 0)
        self.backoff: float = check_real("backoff", backoff, low=0.0, low_closed=True)
        self.queue_size: int = check_int("queue_size", queue_size, 1)
        self.min_interval: float = _check_interval("min_interval", min_interval)
        self.max_per_run: int | None = check_int("max_per_run", max_per_run, 1, allow_none=True)
        self.close_timeout: float = check_real("close_timeout", close_timeout, low=0.0,
                                               high=MAX_TIMEOUT, low_closed=True,
                                               high_closed=True)
        self.clock: Callable[[], float] = check_callable("clock", clock, "a clock () -> seconds")
        from_env = url is None
        if url is None:
            url = os.environ.get(WEBHOOK_URL_ENV) or None
            if url is None:
                raise invalid("url", None, "an http:// or https:// URL, or None with the "
                              f"environment variable {WEBHOOK_URL_ENV} set")
        self._check_url(url, WEBHOOK_URL_ENV if from_env else "url")
        self._url = _Secret(url)
        self._url_from_env = from_env
        self._delivered = self._failed = self._dropped = self._suppressed = 0
        self._accepted = self._abandoned = 0
        self._last_sent: dict[tuple[str, str], float] = {}
        self._pending_suppressed: dict[tuple[str, str], int] = {}
        self._init_runtime()

    @staticmethod
    def _check_url(url: object, arg: str = "url") -> None:
        """Raise ``ValueError`` naming ``arg`` (never showing the URL) unless it is usable."""
        check_http_url(arg, url, shown=_Secret(None))

    def _init_runtime(self) -> None:
        """State that is rebuilt rather than pickled."""
        self._lock = threading.Lock()
        self._session: _Session | None = None  # the current run's queue and worker
        self._failing = False  # inside a failure streak
        self._streak_failed = 0
        self._dropping = False  # inside a queue-full streak
        self._opener = urllib.request.build_opener(_NoRedirect())

    # -- counters

    @property
    def delivered(self) -> int:
        """Messages the server accepted (2xx)."""
        return self._delivered

    @property
    def failed(self) -> int:
        """Messages given up on after the retries (or on a non-retryable error)."""
        return self._failed

    @property
    def dropped(self) -> int:
        """Events not sent: a full queue, :meth:`close` out of time, or no URL (unpickled)."""
        return self._dropped

    @property
    def abandoned(self) -> int:
        """Workers :meth:`close` left inside a request when ``close_timeout`` ran out."""
        return self._abandoned

    @property
    def suppressed(self) -> int:
        """Events not sent because of ``min_interval`` or ``max_per_run``."""
        return self._suppressed

    @property
    def pending(self) -> int:
        """Messages enqueued or in flight in the current run."""
        session = self._session
        return 0 if session is None else session.queue.unfinished_tasks

    # -- AlertSink

    def send(self, event: GuardEvent) -> None:
        """Rate-limit and enqueue ``event``; never blocks and never does I/O.

        Args:
            event: The event.
        """
        if not self.active():
            return
        key = (event.kind, event.signal)
        with self._lock:
            if self._url.reveal() is None:
                self._dropped += 1
                self._warn_once("unusable", "WebhookSink got an event but its URL was not "
                                "pickled with it; set %s. The event stays in the event file "
                                "only", WEBHOOK_URL_ENV)
                return
            now = self.clock()
            last = self._last_sent.get(key)
            if last is not None and now - last < self.min_interval:
                self._suppressed += 1
                self._pending_suppressed[key] = self._pending_suppressed.get(key, 0) + 1
                return
            if self.max_per_run is not None and self._accepted >= self.max_per_run:
                self._suppressed += 1
                return
            n_similar = self._pending_suppressed.pop(key, 0)
            last_of_run = self.max_per_run is not None and self._accepted + 1 == self.max_per_run
            session = self._open()
            try:
                session.queue.put_nowait((event, n_similar, last_of_run))
            except queue.Full:
                self._dropped += 1
                if n_similar:
                    self._pending_suppressed[key] = n_similar
                if not self._dropping:
                    self._dropping = True
                    _log.warning("WebhookSink queue is full (%d messages): dropping alerts "
                                 "until it drains; they stay in the event file",
                                 self.queue_size)
                return
            self._dropping = False
            self._accepted += 1
            self._last_sent[key] = now

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every enqueued message is delivered or given up on.

        Args:
            timeout: Longest wait in seconds; ``None`` waits until done (each message
                is bounded by its timeout and retries).
        """
        session = self._session
        if session is not None:
            _wait_done(session.queue, None if timeout is None else
                       time.monotonic() + timeout)

    def close(self) -> None:
        """End the run within ``close_timeout`` seconds; the next event starts a new one.

        Queued alerts get up to ``close_timeout`` seconds to go out. What is still queued
        then is dropped (counted in :attr:`dropped`, reported once; every event stays in
        ``events.jsonl``), and a worker still inside a request is abandoned (counted in
        :attr:`abandoned`): it is a daemon thread, it sends nothing more and it ends when
        its request times out. The rate limit and ``max_per_run`` start again with the
        next event. Safe to call twice.
        """
        deadline = time.monotonic() + self.close_timeout
        with self._lock:
            session, self._session = self._session, None
            self._last_sent.clear()
            self._pending_suppressed.clear()
            self._accepted = 0
            self._dropping = False
        _LIVE_WEBHOOKS.discard(self)
        if session is None or session.pid != os.getpid():
            return  # never started, or a forked child's copy of its parent's run
        _wait_done(session.queue, deadline)
        session.stop.set()
        discarded = 0
        while True:
            try:
                item = session.queue.get_nowait()
            except queue.Empty:
                break
            discarded += item is not _STOP
            session.queue.task_done()
        with contextlib.suppress(queue.Full):
            session.queue.put_nowait(_STOP)
        session.thread.join(max(0.0, deadline - time.monotonic()))
        abandoned = session.thread.is_alive()
        with self._lock:
            self._dropped += discarded
            self._abandoned += abandoned
        if discarded:
            _log.warning("WebhookSink closed with %d alert(s) not yet sent after waiting "
                         "close_timeout=%g s; they stay in the event file", discarded,
                         self.close_timeout)
        if abandoned:
            _log.info("WebhookSink: a request was still in flight after close_timeout=%g s; "
                      "its thread is left to end on its own and sends nothing more",
                      self.close_timeout)

    # -- worker

    def _open(self) -> _Session:
        """The current run, started on its first event (again in a forked child).

        The lock is held.
        """
        session = self._session
        if session is not None and session.pid == os.getpid():
            return session
        session = self._session = _Session(self)
        session.thread.start()
        _LIVE_WEBHOOKS.add(self)
        return session

    def _run(self, session: _Session) -> None:
        q = session.queue
        while True:
            item = q.get()
            try:
                if item is _STOP:
                    return
                if session.stop.is_set():
                    with self._lock:
                        self._dropped += 1
                    continue
                self._deliver(session, *item)
            except Exception as exc:  # never let the thread die
                with self._lock:
                    self._failed += 1
                self._report_failure(None, f"internal error: {type(exc).__name__}: {exc}", 0)
            finally:
                q.task_done()

    def text(self, event: GuardEvent, n_similar: int = 0, last_of_run: bool = False) -> str:
        """The message line for ``event`` (before Slack escaping).

        Args:
            event: The event.
            n_similar: Events with the same ``(kind, signal)`` suppressed since the last
                message.
            last_of_run: Whether this is the last message ``max_per_run`` allows.

        Returns:
            ``"lr_monitor guard: " + event_line(event)`` plus the notes.
        """
        text = f"lr_monitor guard: {event_line(event)}"
        if n_similar:
            text += f" (+{n_similar} similar suppressed)"
        if last_of_run:
            text += (f" (alert limit of {self.max_per_run} messages reached: later events "
                     "are only in the event log)")
        return text

    def payload(self, event: GuardEvent, n_similar: int = 0, last_of_run: bool = False) -> bytes:
        """The JSON body posted for ``event``.

        Args:
            event: The event.
            n_similar: See :meth:`text`.
            last_of_run: See :meth:`text`.

        Returns:
            UTF-8 JSON: ``{"text": ...}`` for Slack, ``to_dict() | {"text": ...}`` for json.
        """
        text = self.text(event, n_similar, last_of_run)
        if self.format == "slack":
            text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            body: dict[str, Any] = {"text": text}
        else:
            body = {**event.to_dict(), "text": text}
        return json.dumps(body, default=_json_default).encode("utf-8")

    def _deliver(self, session: _Session, event: GuardEvent, n_similar: int,
                 last_of_run: bool) -> None:
        body = self.payload(event, n_similar, last_of_run)
        attempt = 0
        while True:
            ok, retry_after, reason = self._post(body)
            if ok:
                with self._lock:
                    self._delivered += 1
                    recovered, self._failing = self._failing, False
                    streak, self._streak_failed = self._streak_failed, 0
                if recovered:
                    _log.info("WebhookSink delivers again (%d alert(s) were not delivered)",
                              streak)
                return
            if retry_after is None or attempt >= self.max_retries or session.stop.is_set():
                with self._lock:
                    self._failed += 1
                self._report_failure(event, reason, attempt + 1)
                return
            delay = max(retry_after, min(_MAX_DELAY, self.backoff * 2.0 ** min(attempt, 32)))
            if session.stop.wait(delay):
                with self._lock:
                    self._failed += 1
                return
            attempt += 1

    def _report_failure(self, event: GuardEvent | None, reason: str, attempts: int) -> None:
        with self._lock:
            first, self._failing = not self._failing, True
            self._streak_failed += 1
        if event is None:
            what = "an alert"
        else:
            what = f"the alert for step {event.step} ({event.kind} on {event.signal})"
        msg = "WebhookSink could not deliver %s after %d attempt(s): %s"
        url = self._url.reveal()
        reason = _scrub(reason, _secret_fragments(url)) if url else reason
        args: tuple[object, ...] = (what, attempts, reason)
        if first:
            _log.warning(msg + "; further failures are not reported until a delivery "
                         "succeeds; every event stays in the event file", *args)
        else:
            _log.debug(msg, *args)

    def _post(self, body: bytes) -> tuple[bool, float | None, str]:
        """One attempt. Returns (ok, retry delay or None if not retryable, reason)."""
        url = self._url.reveal()
        assert url is not None
        target, auth = _split_credentials(url)
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "User-Agent": "lr-monitor-webhook"}
        if auth is not None:
            headers["Authorization"] = auth
        request = urllib.request.Request(target, data=body, method="POST", headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read(65536)
                status = response.status
            if 200 <= status < 300:
                return True, None, ""
            return False, None, f"HTTP {status}"
        except urllib.error.HTTPError as exc:
            status = exc.code
            detail = ""
            with contextlib.suppress(Exception):
                detail = exc.read(200).decode("utf-8", "replace").strip()
            exc.close()
            reason = f"HTTP {status} {exc.reason}" + (f" ({detail})" if detail else "")
            if status == 429:
                return False, self._retry_after(exc.headers), reason
            return False, (0.0 if status >= 500 else None), reason
        except http.client.InvalidURL as exc:
            return False, None, f"invalid URL: {exc}"
        except urllib.error.URLError as exc:
            return False, 0.0, f"connection error: {exc.reason}"
        except TimeoutError:
            return False, 0.0, f"timed out after {self.timeout:g} s"
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            return False, 0.0, f"{type(exc).__name__}: {exc}"
        except ValueError as exc:
            return False, None, f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _retry_after(headers: Any) -> float:
        with contextlib.suppress(Exception):
            return min(_MAX_DELAY, max(0.0, float(headers.get("Retry-After") or 0)))
        return 0.0

    # -- secrecy

    def __getstate__(self) -> dict[str, Any]:
        keep = ("format", "timeout", "max_retries", "backoff", "queue_size", "min_interval",
                "max_per_run", "close_timeout", "clock", "rank_zero", "is_rank_zero",
                "_url_from_env", "_delivered", "_failed", "_dropped", "_suppressed",
                "_accepted", "_abandoned")
        state = {k: self.__dict__[k] for k in keep if k in self.__dict__}
        state["_url"] = _Secret(None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("close_timeout", DEFAULT_CLOSE_TIMEOUT)  # pickled by an older version
        state.setdefault("_abandoned", 0)
        self.__dict__.update(state)
        self._last_sent = {}
        self._pending_suppressed = {}
        url = (os.environ.get(WEBHOOK_URL_ENV) or None) if self._url_from_env else None
        if url is not None:
            try:
                self._check_url(url)
            except ValueError:
                url = None
        self._url = _Secret(url)
        self._init_runtime()

    def __repr__(self) -> str:
        return (f"WebhookSink(url={_HIDDEN!r}, format={self.format!r}, timeout={self.timeout}, "
                f"max_retries={self.max_retries}, min_interval={self.min_interval}, "
                f"max_per_run={self.max_per_run}, close_timeout={self.close_timeout})")

