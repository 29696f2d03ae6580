"""Tests for lr_monitor.eventlog (the events.jsonl format) and GuardEvent's stored form."""

from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import pytest

from lr_monitor.alerts import JsonlSink, checkpoint_sinks, resume_sinks
from lr_monitor.eventlog import (
    EVENTS_FILENAME,
    SUPERSEDED_EVENTS_FILENAME,
    EventFileError,
    EventLogWriter,
    backup_path,
    decode_event,
    encode_event,
    read_events,
    rotated_paths,
    superseded_path,
    unique_events,
)
from lr_monitor.events import Action, GuardEvent
from lr_monitor.tags import EVENTS_FILENAME as TAGS_EVENTS_FILENAME


def ev(step: int = 0, **kw: Any) -> GuardEvent:
    fields: dict[str, Any] = {"kind": "spike", "signal": "loss", "value": 9.0,
                              "threshold": 3.0, "actions": ("cut_lr",), "time": 0.0}
    fields.update(kw)
    return GuardEvent(step=step, **fields)


def good_line(step: int) -> bytes:
    return encode_event(ev(step))


def test_file_name_comes_from_tags() -> None:
    assert EVENTS_FILENAME is TAGS_EVENTS_FILENAME


# --------------------------------------------------------------------------- encoding


def test_encode_is_one_strict_ascii_json_line() -> None:
    e = ev(value=math.nan, threshold=math.inf, message="naïve\nline",
           lr_before={"Adam/pg0": math.inf})
    data = encode_event(e)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    data.decode("ascii")
    obj = json.loads(data, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert obj["value"] == "nan" and obj["threshold"] == "inf"
    assert obj["actions"] == ["cut_lr"] and type(obj["actions"][0]) is str
    back = decode_event(data)
    assert back.message == e.message and back.lr_before == {"Adam/pg0": math.inf}


def test_encode_handles_numpy_like_scalars() -> None:
    class Scalar:  # a 0-d tensor: a float to math, an object to json
        def __float__(self) -> float:
            return 0.25

        def item(self) -> float:
            return 0.25

    obj = json.loads(encode_event(ev(lr_before={"Adam/pg0": Scalar()})))  # type: ignore[dict-item]
    assert obj["lr_before"] == {"Adam/pg0": 0.25}


# --------------------------------------------------------------------------- actions


def test_actions_are_action_members_where_known_and_strings_otherwise() -> None:
    e = GuardEvent.from_dict({"step": 1, "kind": "spike", "signal": "loss",
                              "actions": ["rollback", "cut_lr", "teleport"]})
    assert e.actions == ("rollback", "cut_lr", "teleport")
    assert e.actions[0] is Action.ROLLBACK and e.actions[1] is Action.CUT
    assert type(e.actions[2]) is str
    assert json.loads(encode_event(e))["actions"] == ["rollback", "cut_lr", "teleport"]


@pytest.mark.parametrize(
    ("actions", "acted", "shown"),
    [((), False, "recorded only"), (("log",), False, "recorded only"),
     (("skip",), True, "skip"), (("log", "skip"), True, "log, skip"),
     (("disable",), True, "disable"), (("teleport",), True, "teleport")],
    ids=["empty", "old-log", "skip", "log-and-skip", "disable", "unknown"],
)
def test_record_only_events(actions: tuple[str, ...], acted: bool, shown: str) -> None:
    e = ev(actions=actions)
    assert e.acted is acted
    assert e.summary() == f"step 0: spike on loss = 9 (threshold 3) -> {shown}"


@pytest.mark.parametrize("actions", ["skip", [1], None, 5], ids=["bare-str", "int", "none", "5"])
def test_guard_event_rejects_actions_that_are_not_names(actions: Any) -> None:
    with pytest.raises(ValueError, match=r"^actions=.* is invalid: must be a sequence"):
        ev(actions=actions)


# --------------------------------------------------------------------------- from_dict


BASE = {"step": 3, "kind": "spike", "signal": "loss"}


@pytest.mark.parametrize(
    ("key", "value"),
    [("step", 1e400), ("step", 1.5), ("step", True), ("step", "3"), ("kind", 5),
     ("signal", None), ("value", [1]), ("value", "high"), ("threshold", {}), ("message", 3),
     ("actions", [1]), ("actions", "skip"), ("actions", {"a": 1}), ("lr_before", [1]),
     ("lr_after", {"Adam/pg0": "fast"}), ("lr_scale", None), ("lr_scale", True),
     ("epoch", 0.5), ("time", "noon"), ("run", 7), ("step", -2), ("step", 2**63),
     ("step", 1e300), ("epoch", -1), ("lr_scale", -0.5), ("lr_scale", math.inf),
     ("lr_scale", "0.5"), ("time", math.nan), ("time", -math.inf)],
    ids=lambda x: repr(x),
)
def test_from_dict_rejects_malformed_values_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        GuardEvent.from_dict({**BASE, key: value})
    assert str(info.value).startswith(key), str(info.value)


def test_from_dict_defaults_and_lenient_forms() -> None:
    e = GuardEvent.from_dict({**BASE, "step": 3.0, "value": None, "message": None,
                              "threshold": "-inf", "unknown": [1, 2]})
    assert e.step == 3 and type(e.step) is int
    assert math.isnan(e.value) and e.threshold == -math.inf and e.message == ""
    assert (e.actions, e.lr_before, e.lr_scale, e.epoch, e.run) == ((), {}, 1.0, None, None)


def test_to_dict_round_trips() -> None:
    e = ev(3, actions=("rollback", "cut_lr"), lr_before={"Adam/pg0": 0.1},
           lr_after={"Adam/pg0": 0.05}, lr_scale=0.5, epoch=1, run="v0", message="m")
    assert GuardEvent.from_dict(json.loads(json.dumps(e.to_dict()))) == e


# --------------------------------------------------------------------------- reader


@pytest.mark.parametrize(
    "bad",
    [b'{"step": 1e400, "kind": "spike", "signal": "loss"}',
     b'{"step": 1, "kind": "spike", "signal": "loss", "actions": [1]}',
     b'{"step": 1, "kind": "spike", "signal": "loss", "lr_before": [1]}',
     b'{"step": 1, "kind": "spike", "signal": "loss", "epoch": "x"}',
     b"[" * 100_000],
    ids=["huge-step", "int-action", "list-lr", "str-epoch", "deep-nesting"],
)
def test_reader_turns_malformed_middle_lines_into_event_file_errors(tmp_path: Path,
                                                                     bad: bytes) -> None:
    path = tmp_path / EVENTS_FILENAME
    path.write_bytes(good_line(0) + bad + b"\n" + good_line(2))
    with pytest.raises(EventFileError) as info:
        read_events(path)
    assert info.value.line == 2 and info.value.path == str(path)
    assert isinstance(info.value, ValueError)


def test_reader_warns_and_keeps_the_other_lines(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / EVENTS_FILENAME
    path.write_bytes(good_line(0) + b'{"step": -7, "kind": "spike", "signal": "loss"}\n'
                     + good_line(2) + b"[" * 100_000 + b"\n" + good_line(4))
    assert [e.step for e in read_events(path, errors="warn")] == [0, 2, 4]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}, line 2: skipped a corrupt event record (step=-7 is invalid: must be an "
        "integer in [-1, 2**63 - 1])",
        f"{path}, line 4: skipped a corrupt event record (nested too deeply)"]


def test_fault_events_keep_step_minus_one() -> None:
    assert GuardEvent.from_dict({**BASE, "step": -1}).step == -1
    assert GuardEvent.from_dict({**BASE, "step": 2**63 - 1, "epoch": 0}).step == 2**63 - 1


def test_reader_skips_a_malformed_last_line(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / EVENTS_FILENAME
    path.write_bytes(good_line(0) + b'{"step": 1e400, "kind": "spike", "signal": "loss"}\n\n')
    assert [e.step for e in read_events(path)] == [0]
    assert "line 2" in caplog.text


def test_reader_needs_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_events(tmp_path / EVENTS_FILENAME)


def test_old_log_action_is_read(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILENAME
    path.write_text(json.dumps({**BASE, "actions": ["log"]}) + "\n")
    (e,) = read_events(path)
    assert e.actions == (Action.LOG,) and not e.acted


# --------------------------------------------------------------------------- writer


def test_writer_appends_rotates_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / EVENTS_FILENAME
    line = len(good_line(0))
    with EventLogWriter(path, max_bytes=2 * line, backup_count=2) as log:
        for step in range(7):
            log.append(ev(step))
    assert backup_path(path, 1).exists() and backup_path(path, 2).exists()
    assert not backup_path(path, 3).exists()
    assert [e.step for e in read_events(path, include_rotated=True)] == [2, 3, 4, 5, 6]
    assert [e.step for e in read_events(path)] == [6]


def test_writer_repairs_a_torn_tail_and_pickles_without_its_file(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILENAME
    log = EventLogWriter(path, fsync=False)
    log.append(ev(0))
    with open(path, "ab") as f:
        f.write(good_line(1)[:7])
    clone = pickle.loads(pickle.dumps(log))
    log.close()
    clone.append(ev(2))
    clone.close()
    clone.close()  # idempotent
    assert [e.step for e in read_events(path)] == [0, 2]


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"max_bytes": math.nan}, "max_bytes=nan is invalid: must be an int >= 0 or None"),
     ({"max_bytes": -1}, "max_bytes=-1 is invalid"),
     ({"backup_count": 1.5}, "backup_count=1.5 is invalid: must be an int >= 1"),
     ({"backup_count": 0}, "backup_count=0 is invalid"),
     ({"fsync": "no"}, "fsync='no' is invalid: must be True or False")],
    ids=["nan-max_bytes", "negative-max_bytes", "fractional-backups", "no-backups", "fsync"],
)
def test_writer_validates(tmp_path: Path, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        EventLogWriter(tmp_path / EVENTS_FILENAME, **kw)
    assert str(info.value).startswith(message)


def test_writer_path_must_be_a_path() -> None:
    with pytest.raises(ValueError, match=r"^path=3 is invalid"):
        EventLogWriter(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- resume


def steps(path: Path, **kw: Any) -> list[int]:
    return [e.step for e in read_events(path, **kw)] if path.exists() else []


def test_rewind_moves_what_followed_the_mark_aside(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "lr_monitor.eventlog")
    path = tmp_path / EVENTS_FILENAME
    log = EventLogWriter(path)
    for step in range(3):
        log.append(ev(step))
    mark = log.mark()
    assert mark["path"] == str(path.resolve()) and mark["size"] == path.stat().st_size
    json.dumps(mark)  # plain data, for a checkpoint
    for step in (3, 4):  # the killed run went on past its checkpoint ...
        log.append(ev(step))
    with open(path, "ab") as f:  # ... and died mid-write
        f.write(good_line(5)[:9])
    resumed = EventLogWriter(path)
    assert resumed.rewind(mark) == 2
    assert steps(path) == [0, 1, 2]
    assert superseded_path(path).name == SUPERSEDED_EVENTS_FILENAME
    assert steps(superseded_path(path)) == [3, 4]  # whole lines only: the torn one is gone
    assert "moved the 2 event(s) written after it" in caplog.text
    resumed.append(ev(3))  # the resumed run decides step 3 again: once in the log
    log.append(ev(4))  # the old writer's handle appends at the new end
    assert steps(path) == [0, 1, 2, 3, 4]
    assert resumed.rewind(mark) == 2 and steps(superseded_path(path)) == [3, 4, 3, 4]
    assert resumed.rewind(mark) == 0 and steps(path) == [0, 1, 2]  # at the mark: nothing


def test_rewind_to_a_mark_taken_before_the_file_existed(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILENAME
    log = EventLogWriter(path)
    mark = log.mark()
    assert mark["size"] == 0 and not path.exists()
    assert log.rewind(mark) == 0 and not path.exists() and not superseded_path(path).exists()
    log.append(ev(1))
    assert log.rewind(mark) == 1
    assert steps(path) == [] and steps(superseded_path(path)) == [1]


def test_rewind_undoes_a_rotation_after_the_mark(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILENAME
    line = len(good_line(0))
    log = EventLogWriter(path, max_bytes=3 * line + 5, backup_count=4)  # 3 lines a file
    for step in range(5):  # events.jsonl.1 = [0, 1, 2], events.jsonl = [3, 4]
        log.append(ev(step))
    mark = log.mark()
    for step in range(5, 12):  # two more rotations: .3 = [0..2], .2 = [3..5], .1 = [6..8]
        log.append(ev(step))
    assert len(rotated_paths(path)) == 3
    assert log.rewind(mark) == 7
    assert steps(path, include_rotated=True) == [0, 1, 2, 3, 4]
    assert steps(path) == [3, 4] and len(rotated_paths(path)) == 1
    assert steps(superseded_path(path)) == list(range(5, 12))
    log.append(ev(5))
    assert steps(path, include_rotated=True) == [0, 1, 2, 3, 4, 5]


def test_rewind_leaves_a_file_it_cannot_place_alone(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / EVENTS_FILENAME
    log = EventLogWriter(path)
    for step in range(3):
        log.append(ev(step))
    mark = log.mark()
    other = EventLogWriter(tmp_path / "other" / EVENTS_FILENAME)
    other.append(ev(7))
    assert other.rewind(mark) == 0 and steps(other.path) == [7]  # another file's mark
    path.write_bytes(good_line(9) * 5)  # replaced since the checkpoint
    assert log.rewind(mark) == 0
    assert steps(path) == [9] * 5 and not superseded_path(path).exists()
    assert "the point where the checkpoint left the event log was not found" in caplog.text
    for bad in ({}, {"path": str(path), "size": -1, "digest": ""}, [1], None):
        with pytest.raises(ValueError, match="not an event log mark"):
            log.rewind(bad)  # type: ignore[arg-type]


def test_jsonl_sink_checkpoint_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    sink = JsonlSink(tmp_path / EVENTS_FILENAME)
    for step in range(2):
        sink.send(ev(step))
    saved = checkpoint_sinks([sink])
    assert [s["sink"] for s in saved] == ["JsonlSink"]
    saved = json.loads(json.dumps(saved))  # as read back from a checkpoint
    for step in range(2, 4):
        sink.send(ev(step))
    sink.close()
    resumed = pickle.loads(pickle.dumps(sink))
    resume_sinks([resumed], saved)
    for step in range(2, 5):
        resumed.send(ev(step))
    assert steps(resumed.path) == [0, 1, 2, 3, 4]
    resume_sinks([resumed], [{"sink": "JsonlSink", "path": str(resumed.path.resolve())}])
    assert "could not resume from the checkpoint: ValueError" in caplog.text  # contained
    resume_sinks([resumed], "garbage")
    assert "not a list of dicts" in caplog.text
    monkeypatch.setenv("RANK", "1")  # another rank neither marks nor rewinds
    assert checkpoint_sinks([resumed]) == []
    resume_sinks([resumed], saved)
    assert steps(resumed.path) == [0, 1, 2, 3, 4]


def test_unique_events_keeps_the_last_copy_of_each_decision() -> None:
    events = [ev(1), ev(2, value=5.0), ev(2, kind="nonfinite"), ev(3), ev(2, value=6.0),
              ev(2, run="other")]
    assert [(e.step, e.kind, e.value, e.run) for e in unique_events(events)] == [
        (1, "spike", 9.0, None), (2, "nonfinite", 9.0, None), (3, "spike", 9.0, None),
        (2, "spike", 6.0, None), (2, "spike", 9.0, "other")]
