"""The guard's alert sinks across a run's life, on real Trainers: pickling, a second fit,
teardown against a server that never answers, and a resume after a SIGKILL."""

from __future__ import annotations

import copy
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl

from lr_monitor import DivergenceGuard
from lr_monitor.alerts import (
    SUPERSEDED_EVENTS_FILENAME,
    GlobalZero,
    JsonlSink,
    WebhookSink,
    read_events,
)
from lr_monitor.cli.report import build_report, load_run
from tests import resume_kill_script as killed
from tests import test_alerts
from tests.lightning_models import Faulty, digits_loaders, trainer
from tests.test_alerts import WAIT, Recorder, wait_until

# the fixtures of test_alerts: a real HTTP server on 127.0.0.1, an environment without proxies
server = test_alerts.server
_clean_env = test_alerts._clean_env

pytestmark = pytest.mark.timeout(300)


def fit(root: Path, guard: DivergenceGuard, nan_at: tuple[int, ...] = (5,),
        max_steps: int = 12, **kwargs: Any) -> pl.Trainer:
    """A short digits run whose loss is NaN at ``nan_at``: one guard event each."""
    pl.seed_everything(0, verbose=False)
    train, _ = digits_loaders()
    tr = trainer(root, max_steps=max_steps, callbacks=[*kwargs.pop("callbacks", []), guard],
                 logger=False, num_sanity_val_steps=0, **kwargs)
    tr.fit(Faulty(nan_at=nan_at, lr=1e-3, hidden=32), train)
    return tr


# --------------------------------------------------------------------------- pickling, reuse


def record(event: Any) -> None:
    """A module-level alert callable, so that it pickles."""


def test_guard_pickles_before_during_and_after_fit(tmp_path: Path, server: Recorder) -> None:
    hook = WebhookSink(server.url(), min_interval=0.0)
    guard = DivergenceGuard(alerts=[hook, record])
    pickle.loads(pickle.dumps(guard))  # a fresh guard

    class PickleDuringFit(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 8:
                self.copy = pickle.loads(pickle.dumps(guard))

    during = PickleDuringFit()
    tr = fit(tmp_path / "a", guard, callbacks=[during])
    assert [e.step for e in during.copy.events] == [5] and during.copy.sinks == []
    clone = pickle.loads(pickle.dumps(guard))
    twin = copy.deepcopy(guard)
    del tr  # the sinks' rank check holds the trainer weakly: it may go
    for other in (clone, twin):
        assert [e.step for e in other.events] == [5] and other.lr_scale == guard.lr_scale
        assert other._trainer is None and other.sinks == []
        sink = other.extra_sinks[0]
        assert isinstance(sink, WebhookSink) and isinstance(sink.is_rank_zero, GlobalZero)
    assert isinstance(guard.extra_sinks[0].is_rank_zero, GlobalZero)  # type: ignore[attr-defined]
    fit(tmp_path / "b", clone, nan_at=(3,))  # the copy trains, with its own sinks
    assert [e.step for e in clone.events] == [5, 3]


def test_a_guard_reused_for_a_second_fit_still_alerts(tmp_path: Path, server: Recorder) -> None:
    hook = WebhookSink(server.url(), min_interval=3600.0, timeout=WAIT)
    guard = DivergenceGuard(alerts=[hook], events_dir=tmp_path / "events")
    for run, nan_at in enumerate([(5,), (7,), (4,)]):
        fit(tmp_path / f"run{run}", guard, nan_at=nan_at)
        # each fit is a new run of the sink: its rate limit does not hold the next fit back
        assert hook.delivered == run + 1 and hook.dropped == 0 and hook.pending == 0
    steps = [int(r["body"].split(b"step ")[1].split(b":")[0]) for r in server.requests]
    assert steps == [5, 7, 4]
    assert [e.step for e in read_events(tmp_path / "events" / "events.jsonl")] == [5, 7, 4]


# --------------------------------------------------------------------------- silent server


class SilentServer:
    """Accepts connections on 127.0.0.1 and never answers (nor closes them)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()
        self.thread.join(WAIT)


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    srv = SilentServer()
    try:
        yield srv
    finally:
        srv.close()


def test_teardown_waits_at_most_close_timeout_for_a_silent_server(
    tmp_path: Path, silent: SilentServer
) -> None:
    # without the bound, teardown would wait for the request: a minute (the socket timeout)
    hook = WebhookSink(f"http://127.0.0.1:{silent.port}/hook", timeout=60.0, max_retries=0,
                       close_timeout=1.0, min_interval=0.0)
    guard = DivergenceGuard(alerts=[hook])

    class Clock(pl.Callback):  # tears down before the guard: starts the guard's teardown clock
        def teardown(self, *args: Any, **kwargs: Any) -> None:
            self.start = time.monotonic()

    clock = Clock()
    fit(tmp_path, guard, nan_at=(5, 9), callbacks=[clock])
    waited = time.monotonic() - clock.start
    assert waited < hook.close_timeout + 5.0, waited
    assert len(silent.accepted) == 1  # the first alert is in flight, never answered
    assert hook.abandoned == 1 and hook.delivered == hook.failed == 0
    assert hook.dropped == 1  # the second waited in the queue: dropped, still in the record
    assert [e.step for e in guard.events] == [5, 9]
    workers = [t for t in threading.enumerate() if t.name == "lr_monitor-webhook"]
    assert any(t.is_alive() for t in workers)  # abandoned, not waited for
    silent.close()  # the connection drops: the abandoned worker ends and sends nothing more
    wait_until(lambda: hook.failed == 1)
    assert hook.delivered == 0 and len(silent.accepted) == 1


def test_jsonl_sink_reopens_after_the_guard_closed_it(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "mine.jsonl")
    guard = DivergenceGuard(alerts=[sink], jsonl=False)
    fit(tmp_path / "a", guard, nan_at=(5,))
    fit(tmp_path / "b", guard, nan_at=(6,))
    assert [e.step for e in read_events(sink.path)] == [5, 6]


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred"])
def test_resume_after_sigkill_records_each_event_once(tmp_path: Path, deferred: bool) -> None:
    # Killed at step 27 after a checkpoint at step 20: the events of steps 22 and 25 are on
    # disk, and the resumed run decides them again. Deferred, step 19's event is written
    # after the checkpoint too (read at step 20): a cut by step would keep it twice.
    env = dict(os.environ, PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1")
    proc = subprocess.run([sys.executable, killed.__file__, str(tmp_path),
                           "deferred" if deferred else "immediate"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    log_dir = tmp_path / "run" / "version_0"
    events_file = log_dir / "events.jsonl"
    before = [e.step for e in read_events(events_file)]
    assert before == [5, 19, 22, 25]  # fsync-ed before the kill

    guard = DivergenceGuard(deferred=deferred)
    tr, model, train = killed.make_trainer(tmp_path, guard)
    tr.fit(model, train, ckpt_path=str(tmp_path / "checkpoints" / "epoch=0-step=20.ckpt"))

    after = read_events(events_file)
    assert [e.step for e in after] == [5, 19, 22, 25]  # each once: no 22, 25 from the dead run
    assert [e.step for e in guard.events] == [5, 19, 22, 25]
    dead = read_events(log_dir / SUPERSEDED_EVENTS_FILENAME)
    assert [e.step for e in dead] == ([19, 22, 25] if deferred else [22, 25])
    assert all(a.time > d.time for a, d in zip(after[-2:], dead[-2:], strict=True))
    report = build_report(load_run(log_dir))
    assert report["guard"]["events"] == 4
    assert report["guard"]["kinds"] == {"nonfinite": 1, "divergence": 3}
