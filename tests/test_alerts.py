"""Tests for lr_monitor.alerts: every sink, the JSONL record, and the webhook against a
real HTTP server on 127.0.0.1 (standard library only, every wait bounded)."""

from __future__ import annotations

import base64
import copy
import json
import logging
import math
import os
import pickle
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lr_monitor import eventlog
from lr_monitor.alerts import (
    RANK_ENV_VARS,
    WEBHOOK_URL_ENV,
    AlertSink,
    CallableSink,
    EventFileError,
    JsonlSink,
    LoggingSink,
    TensorBoardSink,
    WebhookSink,
    as_sink,
    close_sinks,
    dispatch,
    env_rank,
    event_line,
    make_default_sinks,
    read_events,
)
from lr_monitor.alerts import webhook as webhook_module
from lr_monitor.events import GuardEvent

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # upper bound of every wait for a background thread


# --------------------------------------------------------------------------- helpers


def ev(step: int = 12, kind: str = "spike", signal: str = "loss", **kw: Any) -> GuardEvent:
    fields: dict[str, Any] = {
        "value": 51.0,
        "threshold": 4.2,
        "actions": ("cut_lr",),
        "lr_before": {"Adam/pg0": 0.1},
        "lr_after": {"Adam/pg0": 0.05},
        "lr_scale": 0.5,
        "epoch": 0,
        "time": 1700000000.0,
        "run": "lightning_logs/version_0",
        "message": "loss jumped",
    }
    fields.update(kw)
    return GuardEvent(step=step, kind=kind, signal=signal, **fields)


def wait_until(pred: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.005)


def failure_reports(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records
        if r.levelno == logging.WARNING and "could not deliver" in r.getMessage()
    ]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy (requests must reach 127.0.0.1 directly), no rank, no webhook URL."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    for name in (*RANK_ENV_VARS, WEBHOOK_URL_ENV):
        monkeypatch.delenv(name, raising=False)


class Recorder:
    """State shared with the request handler."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.status = 200
        self.body: Callable[[str], bytes] = lambda path: b"ok"
        self.headers: dict[str, str] = {}
        self.delay = 0.0  # handler waits this long (or until release) before answering
        self.release = threading.Event()
        self.port = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)


class Handler(BaseHTTPRequestHandler):
    timeout = 10  # bounds every read of the server

    def do_POST(self) -> None:
        rec: Recorder = self.server.recorder  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with rec.lock:
            rec.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if rec.delay:
            rec.release.wait(rec.delay)
        out = rec.body(self.path)
        self.send_response(rec.status)
        for k, v in rec.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that timed out and left are expected here


@pytest.fixture
def server() -> Iterator[Recorder]:
    rec = Recorder()
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.recorder = rec  # type: ignore[attr-defined]
    rec.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        rec.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(WAIT)


@pytest.fixture
def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def webhook() -> Iterator[Callable[..., WebhookSink]]:
    """Build webhook sinks that are closed at teardown."""
    made: list[WebhookSink] = []

    def make(url: str | None = None, **kw: Any) -> WebhookSink:
        kw.setdefault("timeout", 2.0)
        kw.setdefault("backoff", 0.01)
        sink = WebhookSink(url, **kw)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


class FakeWriter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int | None]] = []
        self.flushes = 0

    def add_text(self, tag: str, text: str, global_step: int | None = None) -> None:
        self.calls.append((tag, text, global_step))

    def flush(self) -> None:
        self.flushes += 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- rank


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "1"}, 1),
        ({"LOCAL_RANK": "2"}, 2),
        ({"SLURM_PROCID": "3"}, 3),
        ({"JSM_NAMESPACE_RANK": "4"}, 4),
        ({"RANK": "0", "LOCAL_RANK": "1"}, 0),
        ({"RANK": "x", "LOCAL_RANK": "2"}, 2),
    ],
    ids=["unset", "RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK",
         "RANK-before-LOCAL_RANK", "non-integer-skipped"],
)
def test_env_rank(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], rank: int) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert env_rank() == rank


SINK_FACTORIES: dict[str, Callable[[Path, list[Any], Any], AlertSink]] = {
    "logging": lambda tmp, got, kw: LoggingSink(**kw),
    "jsonl": lambda tmp, got, kw: JsonlSink(tmp / "events.jsonl", **kw),
    "tensorboard": lambda tmp, got, kw: TensorBoardSink(got[0], **kw),
    "callable": lambda tmp, got, kw: CallableSink(got.append, **kw),
    "webhook": lambda tmp, got, kw: WebhookSink("http://127.0.0.1:9/x", **kw),
}


@pytest.mark.parametrize("kind", list(SINK_FACTORIES))
@pytest.mark.parametrize(
    ("env_rank_value", "kw", "sends"),
    [
        ("1", {}, False),
        ("0", {"is_rank_zero": lambda: False}, False),
        ("1", {"is_rank_zero": lambda: True}, True),
        ("1", {"rank_zero": False}, True),
    ],
    ids=["rank1-silent", "injected-not-zero", "injected-zero", "rank_zero-off"],
)
def test_only_rank_zero_sends(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                              caplog: pytest.LogCaptureFixture, kind: str,
                              env_rank_value: str, kw: dict[str, Any], sends: bool) -> None:
    monkeypatch.setenv("RANK", env_rank_value)
    caplog.set_level(logging.INFO)
    writer = FakeWriter()
    got: list[Any] = [writer]
    sink = SINK_FACTORIES[kind](tmp_path, got, kw)
    try:
        if isinstance(sink, WebhookSink):
            sink.min_interval = 0
            sink.send(ev())
            assert (sink._session is not None) is sends
            return
        sink.send(ev())
        outputs = {
            "logging": lambda: [r for r in caplog.records if r.name == "lr_monitor.guard"],
            "jsonl": lambda: list(tmp_path.iterdir()),
            "tensorboard": lambda: writer.calls,
            "callable": lambda: got[1:],
        }
        assert bool(outputs[kind]()) is sends
    finally:
        sink.close()


# --------------------------------------------------------------------------- logging


@pytest.mark.parametrize(
    ("actions", "level"),
    [(("cut_lr",), logging.WARNING), (("log",), logging.WARNING), ((), logging.INFO)],
    ids=["action-warning", "log-action-warning", "record-only-info"],
)
def test_logging_sink_level_and_line(caplog: pytest.LogCaptureFixture,
                                     actions: tuple[str, ...], level: int) -> None:
    caplog.set_level(logging.INFO, logger="lr_monitor.guard")
    LoggingSink().send(ev(actions=actions, message="two\nlines"))
    (record,) = [r for r in caplog.records if r.name == "lr_monitor.guard"]
    assert record.levelno == level
    assert "\n" not in record.getMessage()
    assert record.getMessage().startswith("[lightning_logs/version_0] step 12: spike on loss")
    assert record.lr_monitor_event["step"] == 12  # type: ignore[attr-defined]


def test_event_line_non_finite_and_no_run() -> None:
    e = ev(value=float("inf"), run=None, message="", actions=(), lr_before={}, lr_after={})
    assert event_line(e) == "step 12: spike on loss = inf (threshold 4.2) -> recorded only"


# --------------------------------------------------------------------------- dispatch, callable


class Boom(AlertSink):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def send(self, event: GuardEvent) -> None:
        raise self.exc


class DuckSink:
    """Not an AlertSink subclass: dispatch still contains it."""

    def send(self, event: GuardEvent) -> None:
        raise RuntimeError("duck")


def test_dispatch_contains_faults_and_reports_once(caplog: pytest.LogCaptureFixture) -> None:
    got: list[GuardEvent] = []
    sinks: list[Any] = [Boom(OSError("disk full")), DuckSink(), CallableSink(got.append)]
    for step in range(3):
        assert dispatch(sinks, ev(step=step)) == 2
    assert [e.step for e in got] == [0, 1, 2]
    boom = [r for r in caplog.records if "Boom" in r.getMessage()]
    assert len(boom) == 1 and "disk full" in boom[0].getMessage()
    duck = [r for r in caplog.records if "DuckSink" in r.getMessage()]
    assert len(duck) == 3  # foreign objects cannot remember; still never raised


def test_callable_sink_contains_and_reports_once_per_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = []

    def flaky(event: GuardEvent) -> None:
        calls.append(event.step)
        raise (KeyError if event.step % 2 else ValueError)("nope")

    sink = CallableSink(flaky)
    for step in range(6):
        sink.send(ev(step=step))  # never raises
    assert calls == list(range(6)) and sink.errors == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(type(r.exc_info[1]).__name__ for r in warnings if r.exc_info) == [
        "KeyError", "ValueError"]
    assert all("flaky" in r.getMessage() for r in warnings)


def test_callable_sink_rejects_non_callable_and_as_sink() -> None:
    with pytest.raises(TypeError, match="callable"):
        CallableSink(42)  # type: ignore[arg-type]
    sink = LoggingSink()
    assert as_sink(sink) is sink
    assert isinstance(as_sink(print), CallableSink)
    with pytest.raises(TypeError):
        as_sink(42)  # type: ignore[arg-type]


def test_close_sinks_contains_faults(caplog: pytest.LogCaptureFixture) -> None:
    class BadTeardown(AlertSink):
        def send(self, event: GuardEvent) -> None:
            pass

        def flush(self, timeout: float | None = None) -> None:
            raise RuntimeError("flush broke")

        def close(self) -> None:
            raise RuntimeError("close broke")

    writer = FakeWriter()
    close_sinks([BadTeardown(), TensorBoardSink(writer)], timeout=1.0)
    assert writer.flushes >= 1
    text = caplog.text
    assert "flush broke" in text and "close broke" in text


# --------------------------------------------------------------------------- tensorboard


def test_tensorboard_sink_writes_text_at_step() -> None:
    writer = FakeWriter()
    sink = TensorBoardSink(writer, tag="guard/events")
    sink.send(ev(step=7))
    sink.close()
    assert writer.calls == [("guard/events", event_line(ev(step=7)), 7)]
    assert writer.flushes == 1


# --------------------------------------------------------------------------- default sinks


@pytest.mark.parametrize(
    ("log_dir", "kw", "expected"),
    [
        ("run", {}, ["LoggingSink", "JsonlSink"]),
        (None, {}, ["LoggingSink"]),
        ("run", {"jsonl": False}, ["LoggingSink"]),
        ("run", {"logging": False}, ["JsonlSink"]),
        ("run", {"jsonl": False, "logging": False}, []),
    ],
    ids=["both", "no-log-dir", "jsonl-off", "logging-off", "both-off"],
)
def test_make_default_sinks(tmp_path: Path, log_dir: str | None, kw: dict[str, Any],
                            expected: list[str]) -> None:
    sinks = make_default_sinks(None if log_dir is None else tmp_path / log_dir, **kw)
    assert [type(s).__name__ for s in sinks] == expected
    for s in sinks:
        if isinstance(s, JsonlSink):
            assert s.path == tmp_path / "run" / "events.jsonl"
            assert s.max_bytes == 50 * 1024 * 1024


# --------------------------------------------------------------------------- JSONL


def test_jsonl_flushed_and_fsynced_per_event(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    path = tmp_path / "sub" / "events.jsonl"
    sink = JsonlSink(path)
    sent = []
    for step in range(5):
        sent.append(ev(step=step))
        sink.send(sent[-1])
        # read back through a separate handle while the sink is still open
        assert read_events(path) == sent
    assert len(synced) >= 5
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [e.to_dict() for e in sent]
    sink.close()
    sink.send(ev(step=5))  # reopens in append mode
    sink.close()
    assert [e.step for e in read_events(path)] == list(range(6))


def test_jsonl_round_trips_non_finite(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with JsonlSink(path) as sink:
        sink.send(ev(kind="nonfinite", value=float("nan"), threshold=float("inf")))
    (back,) = read_events(path)
    assert math.isnan(back.value) and back.threshold == math.inf
    assert "NaN" not in path.read_text()  # strict JSON


def write_events(path: Path, n: int) -> list[GuardEvent]:
    events = [ev(step=i) for i in range(n)]
    with JsonlSink(path) as sink:
        for e in events:
            sink.send(e)
    return events


@pytest.mark.parametrize("cut", [1, 10, -2, -1],
                         ids=["one-byte", "ten-bytes", "all-but-brace", "all-but-newline"])
def test_read_tolerates_truncated_last_line_and_sink_repairs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cut: int
) -> None:
    path = tmp_path / "events.jsonl"
    events = write_events(path, 3)
    partial = json.dumps(ev(step=3).to_dict(), separators=(",", ":")).encode() + b"\n"
    with open(path, "ab") as f:  # what a SIGKILL in the middle of a write leaves
        f.write(partial[:cut])
    complete = cut == -1
    assert read_events(path) == ([*events, ev(step=3)] if complete else events)
    # A new sink (the resumed run) repairs the tail before appending.
    with JsonlSink(path) as sink:
        sink.send(ev(step=4))
    assert [e.step for e in read_events(path)] == ([0, 1, 2, 3, 4] if complete else [0, 1, 2, 4])


@pytest.mark.parametrize(
    ("garbage", "detail"),
    [
        (b'{"step": 1, "kind": "spi', "Unterminated string"),
        (b"[1, 2, 3]", "JSON object"),
        (b'{"kind": "spike"}', "missing key"),
        (b"\xff\xfe not utf-8", "utf-8"),
    ],
    ids=["broken-json", "not-an-object", "missing-key", "bad-encoding"],
)
def test_read_corrupt_middle_line_names_file_and_line(
    tmp_path: Path, garbage: bytes, detail: str
) -> None:
    path = tmp_path / "events.jsonl"
    write_events(path, 1)
    with open(path, "ab") as f:
        f.write(garbage + b"\n")
    write_events(path, 1)
    with pytest.raises(EventFileError) as info:
        read_events(path)
    assert info.value.line == 2 and info.value.path == str(path)
    assert str(path) in str(info.value) and "line 2" in str(info.value)
    assert detail.lower() in str(info.value).lower()


def test_jsonl_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    line_len = len(eventlog.encode_event(ev(step=0)))
    max_bytes = 3 * line_len + 1
    with JsonlSink(path, max_bytes=max_bytes, backup_count=2) as sink:
        for step in range(10):
            sink.send(ev(step=step))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    assert all(p.stat().st_size <= max_bytes for p in tmp_path.iterdir())
    assert [e.step for e in read_events(path)] == [9]
    assert [e.step for e in read_events(path, include_rotated=True)] == list(range(3, 10))


@pytest.mark.parametrize(
    "kw", [{"max_bytes": -1}, {"backup_count": 0}], ids=["negative-max_bytes", "no-backups"]
)
def test_jsonl_rejects_bad_options(tmp_path: Path, kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        JsonlSink(tmp_path / "e.jsonl", **kw)


def test_jsonl_sink_pickles_without_its_file(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "events.jsonl")
    sink.send(ev(step=0))
    clone = pickle.loads(pickle.dumps(sink))
    clone.send(ev(step=1))
    clone.close()
    sink.close()
    assert [e.step for e in read_events(tmp_path / "events.jsonl")] == [0, 1]


# --------------------------------------------------------------------------- webhook: setup


def test_webhook_requires_a_url() -> None:
    with pytest.raises(ValueError) as info:
        WebhookSink()
    assert "url" in str(info.value) and WEBHOOK_URL_ENV in str(info.value)


def test_webhook_reads_url_from_env(monkeypatch: pytest.MonkeyPatch, server: Recorder,
                                    webhook: Callable[..., WebhookSink]) -> None:
    monkeypatch.setenv(WEBHOOK_URL_ENV, server.url("/from-env"))
    sink = webhook()
    sink.send(ev())
    sink.flush(WAIT)
    assert sink.delivered == 1 and server.requests[0]["path"] == "/from-env"


@pytest.mark.parametrize(
    "url",
    ["ftp://example.invalid/SECRETtoken1", "not a url SECRETtoken1",
     "http:///SECRETtoken1", "http://127.0.0.1/a b/SECRETtoken1", "http://[::1/SECRETtoken1"],
    ids=["ftp", "no-scheme", "no-host", "whitespace", "malformed-ipv6"],
)
def test_webhook_rejects_bad_url_without_showing_it(url: str) -> None:
    with pytest.raises(ValueError) as info:
        WebhookSink(url)
    assert "SECRETtoken1" not in str(info.value)


@pytest.mark.parametrize(
    ("port", "shown"),
    [("99999", ", not 99999"), ("65536", ", not 65536"), ("0", ", not 0"), ("+80", ""),
     ("８０", ""), ("abc", ""), ("-1", "")],
    ids=["99999", "65536", "zero", "plus-sign", "fullwidth-digits", "letters", "negative"],
)
def test_webhook_rejects_ports_outside_1_to_65535(port: str, shown: str) -> None:
    # urllib would take :99999 and connect to 99999 % 65536 = 34463: the secret goes elsewhere
    for host in ("127.0.0.1", "[::1]", "user:SECRETtoken1@127.0.0.1"):
        with pytest.raises(ValueError) as info:
            WebhookSink(f"http://{host}:{port}/SECRETtoken1")
        text = str(info.value)
        assert text == ("url='<webhook url hidden>' is invalid: must be an http:// or https:// "
                        f"URL with a port in 1..65535{shown} (the URL itself is not shown: "
                        "it is a secret)"), text


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/x", "http://127.0.0.1:65535/x",
                                 "HTTPS://[::1]:443/x", "http://127.0.0.1:/x",
                                 "http://u:p@127.0.0.1:8080/x"])
def test_webhook_accepts_ports_in_range(url: str) -> None:
    WebhookSink(url).close()


def test_webhook_sends_url_credentials_as_basic_auth_and_never_shows_them(
    server: Recorder, webhook: Callable[..., WebhookSink], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "pa@ss:w0rd/SECRETpw"
    url = (f"http://bot%20one:{urllib.parse.quote(password, safe='')}@127.0.0.1:{server.port}"
           "/hook?x=1#frag")
    sink = webhook(url, format="json")
    sink.send(ev())
    sink.flush(WAIT)
    assert sink.delivered == 1
    (request,) = server.requests
    assert request["path"] == "/hook?x=1"  # no credentials, no fragment in the request line
    assert request["headers"]["Host"] == f"127.0.0.1:{server.port}"
    expected = base64.b64encode(f"bot one:{password}".encode()).decode()
    assert request["headers"]["Authorization"] == f"Basic {expected}"
    # a failure is reported without them, and neither repr nor a pickle holds them
    server.status = 401
    server.body = lambda path: f"bad credentials for bot one:{password}".encode()
    sink.send(ev(step=13, kind="divergence"))
    sink.flush(WAIT)
    assert sink.failed == 1 and "could not deliver" in caplog.text
    stored = caplog.text + repr(sink) + repr(sink.__getstate__())
    for needle in ("SECRETpw", urllib.parse.quote(password, safe=""), expected):
        assert needle not in stored and needle.encode() not in pickle.dumps(sink)


@pytest.mark.parametrize(
    "kw",
    [{"format": "xml"}, {"timeout": 0}, {"max_retries": -1}, {"backoff": -1.0},
     {"queue_size": 0}, {"min_interval": -1.0}, {"max_per_run": 0}, {"close_timeout": -1},
     {"close_timeout": math.inf}],
    ids=lambda kw: next(iter(kw)),
)
def test_webhook_rejects_bad_options(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        WebhookSink("http://127.0.0.1:9/x", **kw)


def test_webhook_rejects_nan_interval_and_endless_timeout() -> None:
    for kw, start in [({"min_interval": math.nan}, "min_interval=nan is invalid: must be "),
                      ({"timeout": 1e300}, "timeout=1e+300 is invalid: must be a number in (0, "),
                      ({"backoff": math.inf}, "backoff=inf is invalid"),
                      ({"max_retries": 1.5}, "max_retries=1.5 is invalid: must be an int >= 0"),
                      ({"clock": 5}, "clock=5 is invalid")]:
        with pytest.raises(ValueError) as info:
            WebhookSink("http://127.0.0.1:9/x", **kw)
        assert str(info.value).startswith(start), str(info.value)
    sink = WebhookSink("http://127.0.0.1:9/x", min_interval=math.inf)  # once per key per run
    assert sink.min_interval == math.inf
    sink.close()


@pytest.mark.parametrize("url", [123, b"https://hooks.example.com/SECRETtoken1", ["x"]],
                         ids=["int", "bytes", "list"])
def test_webhook_rejects_non_string_url_naming_it_without_showing_it(url: Any) -> None:
    with pytest.raises(ValueError) as info:
        WebhookSink(url)
    text = str(info.value)
    assert text.startswith("url='<webhook url hidden>' is invalid: must be an http"), text
    assert "SECRETtoken1" not in text and "123" not in text


def test_webhook_bad_url_from_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEBHOOK_URL_ENV, "ftp://example.invalid/SECRETtoken1")
    with pytest.raises(ValueError) as info:
        WebhookSink()
    assert str(info.value).startswith(f"{WEBHOOK_URL_ENV}='<webhook url hidden>' is invalid")
    assert "SECRETtoken1" not in str(info.value)


@pytest.mark.parametrize(
    ("make", "start"),
    [(lambda p: JsonlSink(p, backup_count=1.5), "backup_count=1.5 is invalid: must be an int"),
     (lambda p: JsonlSink(p, max_bytes=math.nan), "max_bytes=nan is invalid: must be an int"),
     (lambda p: JsonlSink(p, max_bytes=1e6), "max_bytes=1000000.0 is invalid"),
     (lambda p: JsonlSink(None), "path=None is invalid: must be a path"),
     (lambda p: JsonlSink(p, rank_zero="yes"), "rank_zero='yes' is invalid: must be True"),
     (lambda p: JsonlSink(p, is_rank_zero=True), "is_rank_zero=True is invalid: must be None"),
     (lambda p: LoggingSink(5), "logger=5 is invalid: must be a logger name"),
     (lambda p: LoggingSink(action_level="WARNING"), "action_level='WARNING' is invalid"),
     (lambda p: TensorBoardSink(object()), "writer=<object object"),
     (lambda p: TensorBoardSink(FakeWriter(), tag=""), "tag='' is invalid"),
     (lambda p: CallableSink(print, name=3), "name=3 is invalid"),
     (lambda p: make_default_sinks(p, jsonl="yes"), "jsonl='yes' is invalid"),
     (lambda p: make_default_sinks(p, max_bytes=-5, jsonl=False), "max_bytes=-5 is invalid"),
     (lambda p: make_default_sinks(p, filename=None), "filename=None is invalid")],
    ids=["backup_count", "max_bytes-nan", "max_bytes-float", "path", "rank_zero",
         "is_rank_zero", "logger", "level", "writer", "tag", "name", "default-jsonl",
         "default-max_bytes", "default-filename"],
)
def test_sink_arguments_fail_naming_the_argument(tmp_path: Path, make: Callable[[Path], Any],
                                                 start: str) -> None:
    with pytest.raises(ValueError) as info:
        make(tmp_path / "events.jsonl")
    assert str(info.value).startswith(start), str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_as_sink_names_the_argument() -> None:
    with pytest.raises(TypeError, match=r"^sink=1 is invalid: must be an AlertSink or a callable"):
        as_sink(1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^alerts\[2\]='x' is invalid"):
        as_sink("x", "alerts[2]")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^fn=42 is invalid: must be a callable"):
        CallableSink(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- webhook: delivery


SLACK_TEXT = ("lr_monitor guard: [lightning_logs/version_0] step 12: spike on loss = 51 "
              "(threshold 4.2) -&gt; cut_lr; lr 0.1 -&gt; 0.05 | loss jumped")
PLAIN_TEXT = SLACK_TEXT.replace("&gt;", ">")


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("slack", {"text": SLACK_TEXT}), ("json", {**ev().to_dict(), "text": PLAIN_TEXT})],
    ids=["slack", "json"],
)
def test_webhook_delivers_exact_payload(server: Recorder, webhook: Callable[..., WebhookSink],
                                        fmt: str, expected: dict[str, Any]) -> None:
    sink = webhook(server.url("/services/hook"), format=fmt)
    sink.send(ev())
    sink.flush(WAIT)
    assert (sink.delivered, sink.failed, sink.dropped, sink.suppressed) == (1, 0, 0, 0)
    (req,) = server.requests
    assert req["path"] == "/services/hook"
    assert req["headers"]["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(req["body"]) == expected


@pytest.mark.parametrize("mode", ["server-down", "slow", "http-500"])
def test_webhook_never_blocks_and_reports_once(
    server: Recorder, closed_port: int, webhook: Callable[..., WebhookSink],
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    timeout = 0.5
    if mode == "server-down":
        url = f"http://127.0.0.1:{closed_port}/hook"
    elif mode == "slow":
        server.delay = 10 * timeout  # answers long after the client gave up
        url = server.url()
    else:
        server.status = 500
        url = server.url()
    sink = webhook(url, timeout=timeout, max_retries=1, min_interval=0.0, max_per_run=None)
    jsonl = JsonlSink(tmp_path / "events.jsonl")
    events = [ev(step=i) for i in range(100)]

    elapsed = 0.0  # time spent in the webhook's send() only (the JSONL fsync is not its cost)
    for e in events:
        dispatch([jsonl], e)
        start = time.perf_counter()
        sink.send(e)
        elapsed += time.perf_counter() - start
    assert elapsed < 0.2 * timeout, f"enqueueing 100 events took {elapsed:.3f} s"

    wait_until(lambda: sink.failed >= 2)
    sink.close()
    # a request still in flight at close is abandoned and counted when it times out
    wait_until(lambda: sink.failed + sink.dropped == 100)
    assert sink.delivered == 0 and sink.abandoned <= 1
    (report,) = failure_reports(caplog)
    reason = {"server-down": "connection error", "slow": "timed out", "http-500": "HTTP 500"}
    assert reason[mode] in report.getMessage()
    assert read_events(jsonl.path) == events  # the record is complete regardless
    jsonl.close()


@pytest.mark.parametrize("max_retries", [0, 2], ids=["no-retries", "two-retries"])
@pytest.mark.parametrize("status", [500, 503, 429], ids=["500", "503", "429"])
def test_webhook_retries_are_bounded(server: Recorder, webhook: Callable[..., WebhookSink],
                                     status: int, max_retries: int) -> None:
    server.status = status
    server.headers = {"Retry-After": "0"}
    sink = webhook(server.url(), max_retries=max_retries)
    sink.send(ev())
    sink.flush(WAIT)
    assert server.count == 1 + max_retries
    assert (sink.delivered, sink.failed) == (0, 1)


@pytest.mark.parametrize("status", [400, 403, 404, 410], ids=lambda s: f"http-{s}")
def test_webhook_does_not_retry_4xx(server: Recorder, webhook: Callable[..., WebhookSink],
                                    caplog: pytest.LogCaptureFixture, status: int) -> None:
    server.status = status
    server.body = lambda path: b"invalid_token"
    sink = webhook(server.url(), max_retries=3)
    sink.send(ev())
    sink.flush(WAIT)
    assert server.count == 1 and sink.failed == 1
    (report,) = failure_reports(caplog)
    assert f"HTTP {status}" in report.getMessage() and "invalid_token" in report.getMessage()


def test_webhook_recovers_then_reports_a_new_streak(
    server: Recorder, webhook: Callable[..., WebhookSink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lr_monitor.alerts")
    sink = webhook(server.url(), max_retries=0, min_interval=0.0)
    for status, step in [(500, 0), (500, 1), (200, 2), (500, 3), (500, 4)]:
        server.status = status
        sink.send(ev(step=step))
        sink.flush(WAIT)
    assert (sink.delivered, sink.failed) == (1, 4)
    assert len(failure_reports(caplog)) == 2
    assert "delivers again (2 alert(s) were not delivered)" in caplog.text


def test_webhook_redirect_is_not_followed(server: Recorder,
                                          webhook: Callable[..., WebhookSink]) -> None:
    server.status = 307
    server.headers = {"Location": "http://127.0.0.1:9/elsewhere"}
    sink = webhook(server.url(), max_retries=2)
    sink.send(ev())
    sink.flush(WAIT)
    assert server.count == 1 and sink.failed == 1


# --------------------------------------------------------------------------- webhook: limits


def test_webhook_rate_limit_per_kind_and_signal(server: Recorder,
                                                webhook: Callable[..., WebhookSink]) -> None:
    clock = FakeClock()
    sink = webhook(server.url(), min_interval=0.2, clock=clock)
    for step in range(20):
        sink.send(ev(step=step))
    sink.send(ev(step=20, signal="grad_norm"))  # another key is not suppressed
    sink.flush(WAIT)
    assert (sink.delivered, sink.suppressed) == (2, 19)

    clock.now += 0.1
    sink.send(ev(step=21))  # still inside the interval
    clock.now += 0.15
    sink.send(ev(step=22))
    sink.flush(WAIT)
    assert (sink.delivered, sink.suppressed) == (3, 20)
    last = json.loads(server.requests[-1]["body"])["text"]
    assert "step 22:" in last and last.endswith("(+20 similar suppressed)")
    first = json.loads(server.requests[0]["body"])["text"]
    assert "suppressed" not in first


def test_webhook_max_per_run(server: Recorder, webhook: Callable[..., WebhookSink]) -> None:
    sink = webhook(server.url(), max_per_run=2, min_interval=0.0)
    for kind in ("spike", "divergence", "oscillation", "nonfinite"):
        sink.send(ev(kind=kind))
    sink.flush(WAIT)
    assert (sink.delivered, sink.suppressed) == (2, 2)
    texts = [json.loads(r["body"])["text"] for r in server.requests]
    assert "alert limit of 2 messages reached" in texts[-1]
    assert "alert limit" not in texts[0]


def test_webhook_full_queue_drops_counts_and_warns_once(
    server: Recorder, webhook: Callable[..., WebhookSink], caplog: pytest.LogCaptureFixture
) -> None:
    server.delay = WAIT  # hold the first request until released
    sink = webhook(server.url(), timeout=WAIT, queue_size=2, min_interval=0.0)
    sink.send(ev(step=0))
    wait_until(lambda: server.count == 1)  # in flight; the queue is empty again
    start = time.perf_counter()
    for step in range(1, 11):
        sink.send(ev(step=step))
    assert time.perf_counter() - start < 0.2 * sink.timeout
    assert sink.dropped == 8
    drops = [r for r in caplog.records if "queue is full" in r.getMessage()]
    assert len(drops) == 1
    server.release.set()
    sink.flush(WAIT)
    assert sink.delivered == 3 and sink.pending == 0


def test_webhook_flush_and_close_are_bounded_and_close_abandons_a_stuck_worker(
    server: Recorder, webhook: Callable[..., WebhookSink], caplog: pytest.LogCaptureFixture
) -> None:
    server.delay = 4 * WAIT  # answers only when released
    # the socket timeout is far beyond close_timeout: only abandoning the worker is quick
    sink = webhook(server.url(), timeout=4 * WAIT, close_timeout=0.5, min_interval=0.0,
                   max_retries=0)
    for step in range(5):
        sink.send(ev(step=step))
    start = time.perf_counter()
    sink.flush(0.1)
    assert time.perf_counter() - start < 0.5 * WAIT
    assert sink.pending == 5
    worker = sink._session.thread  # type: ignore[union-attr]
    start = time.perf_counter()
    sink.close()
    assert time.perf_counter() - start < sink.close_timeout + 5.0
    assert worker.is_alive() and sink.abandoned == 1  # left inside its request
    assert sink.dropped == 4 and sink.pending == 0
    assert "closed with 4 alert(s) not yet sent" in caplog.text
    sink.close()  # idempotent
    assert sink.abandoned == 1 and sink.dropped == 4
    server.release.set()  # the abandoned request ends; its thread sends nothing more
    worker.join(WAIT)
    assert not worker.is_alive() and server.count == 1


def test_webhook_opens_again_after_close(server: Recorder,
                                         webhook: Callable[..., WebhookSink]) -> None:
    sink = webhook(server.url(), min_interval=math.inf, max_per_run=1)
    for run in range(3):  # as the guard does: one run per fit, closed at its end
        sink.send(ev(step=run))
        sink.send(ev(step=run + 100))  # the rate limit and max_per_run hold within a run
        sink.close()
        assert sink.delivered == run + 1 and sink.suppressed == run + 1
    assert [json.loads(r["body"])["text"].split(": ")[1] for r in server.requests] == \
        ["[lightning_logs/version_0] step 0", "[lightning_logs/version_0] step 1",
         "[lightning_logs/version_0] step 2"]
    assert sink.dropped == 0 and sink.abandoned == 0


# --------------------------------------------------------------------------- webhook: secrecy


SECRET_PATH = "/services/T0SECRET1/B0SECRET2/xoxbSuperSecretToken123"
SECRET_TOKENS = ("xoxbSuperSecretToken123", "T0SECRET1", "B0SECRET2")


def assert_no_secret(text: str | bytes, where: str, url: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for needle in (url, SECRET_PATH, *SECRET_TOKENS):
        assert needle.encode() not in data, f"secret {needle!r} found in {where}"


def test_webhook_url_is_never_stored(server: Recorder, webhook: Callable[..., WebhookSink],
                                     tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from torch.utils.tensorboard import SummaryWriter

    caplog.set_level(logging.DEBUG)
    url = server.url(SECRET_PATH)
    # The server rejects the hook and echoes the path, the way some services do.
    server.status = 404
    server.body = lambda path: f"no_service for {path}".encode()
    handler = logging.FileHandler(tmp_path / "run.log")
    logging.getLogger().addHandler(handler)
    tb = SummaryWriter(str(tmp_path / "tb"))
    try:
        hook = webhook(url, format="json", min_interval=0.0, max_retries=1)
        sinks = [*make_default_sinks(tmp_path), TensorBoardSink(tb), hook]
        for step in range(3):
            dispatch(sinks, ev(step=step))
        hook.flush(WAIT)
        assert server.count == 3 and hook.failed == 3
        assert "no_service for" in caplog.text  # the reason is reported, scrubbed
        (tmp_path / "sink.pkl").write_bytes(pickle.dumps(hook))
        (tmp_path / "sinks.pkl").write_bytes(pickle.dumps([*sinks[:2], hook]))
        (tmp_path / "repr.txt").write_text(f"{hook!r} {sinks!r} {hook.__getstate__()!r}")
        logging.getLogger("lr_monitor.test").warning("configured sinks: %r", sinks)
        close_sinks(sinks, timeout=WAIT)
    finally:
        tb.close()
        logging.getLogger().removeHandler(handler)
        handler.close()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"events.jsonl", "run.log", "sink.pkl", "repr.txt"}
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    for p in files:
        assert_no_secret(p.read_bytes(), str(p), url)
    assert_no_secret(caplog.text, "caplog", url)
    assert_no_secret(repr(copy.deepcopy(hook).__dict__), "deepcopy", url)
    assert "<webhook url hidden>" in repr(hook)


@pytest.mark.parametrize(
    "message",
    [
        "unknown url type: {url!r}",
        "URL can't contain control characters. {path!r}",
        "failed to open {quoted}",
        "token {token} rejected",
    ],
    ids=["full-url", "path", "percent-encoded", "bare-token"],
)
def test_scrub_removes_every_form_of_the_url(message: str) -> None:
    url = f"https://hooks.example.com{SECRET_PATH}?key=AbCdEf123456"
    import urllib.parse

    text = message.format(url=url, path=SECRET_PATH, quoted=urllib.parse.quote(url, safe=""),
                          token=SECRET_TOKENS[0])
    scrubbed = webhook_module._scrub(text, webhook_module._secret_fragments(url))
    assert_no_secret(scrubbed, "scrubbed message", url)
    assert "AbCdEf123456" not in scrubbed
    assert "<webhook url hidden>" in scrubbed or "hooks.example.com" not in text


def test_unpickled_webhook_from_explicit_url_is_disabled(
    server: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    sink = WebhookSink(server.url(SECRET_PATH))
    clone = pickle.loads(pickle.dumps(sink))
    try:
        clone.send(ev())
        clone.send(ev(step=13))
        assert clone.dropped == 2 and server.count == 0
        warnings = [r for r in caplog.records if "not pickled" in r.getMessage()]
        assert len(warnings) == 1 and WEBHOOK_URL_ENV in warnings[0].getMessage()
    finally:
        clone.close()
        sink.close()


def test_unpickled_webhook_from_env_reads_env_again(
    monkeypatch: pytest.MonkeyPatch, server: Recorder
) -> None:
    monkeypatch.setenv(WEBHOOK_URL_ENV, server.url(SECRET_PATH))
    sink = WebhookSink(timeout=2.0)
    data = pickle.dumps(sink)
    assert SECRET_TOKENS[0].encode() not in data
    clone = pickle.loads(data)
    try:
        clone.send(ev())
        clone.flush(WAIT)
        assert clone.delivered == 1 and server.requests[0]["path"] == SECRET_PATH
    finally:
        clone.close()
        sink.close()
