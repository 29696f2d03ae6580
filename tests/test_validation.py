"""Bad arguments fail at once, naming the argument the user typed, its value and what is allowed."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lr_monitor import DivergenceGuard
from lr_monitor._validation import check_bool, check_int, check_real

GUARD_BAD = [
    ("lr_factor", 2.0), ("lr_factor", 0), ("lr_factor", 1.0), ("lr_factor", math.nan),
    ("lr_factor", "0.1"), ("cooldown", -1), ("cooldown", 1.5), ("min_lr", -1e-3),
    ("min_lr", math.inf), ("max_cuts", 0), ("snapshot_every_n_steps", 0),
    ("snapshot_every_n_steps", 2.0), ("snapshot_keep", 0), ("snapshot_keep", True),
    ("spike_window", 2), ("spike_threshold", 0), ("spike_threshold", math.nan),
    ("explosion_factor", 1.0), ("explosion_factor", math.inf), ("divergence_patience", 0),
    ("amp_patience", 0), ("watch_grad_norm", "False"), ("watch_grad_norm", 0),
    ("log_events", None), ("jsonl", "yes"), ("on_spike", "explode"), ("on_nonfinite", None),
    ("escalate", "rollback"), ("events_dir", 123), ("name", 5),
    ("alerts", "https://hooks.example.invalid/x"), ("alerts", 5),
]


@pytest.mark.parametrize(("arg", "value"), GUARD_BAD, ids=[f"{a}={v!r}" for a, v in GUARD_BAD])
def test_guard_errors_name_the_argument_the_user_typed(arg: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        DivergenceGuard(**{arg: value})
    assert str(info.value).startswith(f"{arg}={value!r} is invalid: must be "), str(info.value)


def test_guard_defaults_are_valid() -> None:
    DivergenceGuard()


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                 st.booleans(), st.text(max_size=3), st.none()))
def test_check_real_accepts_exactly_the_finite_numbers_in_range(value: Any) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and 0 < value < 1)
    if ok:
        assert check_real("x", value, low=0.0, high=1.0) == float(value)
    else:
        with pytest.raises(ValueError, match=r"^x=.* is invalid: must be a number in \(0, 1\)$"):
            check_real("x", value, low=0.0, high=1.0)


@given(st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=2)))
def test_check_int_and_check_bool_refuse_lookalikes(value: Any) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and value >= 1:
        assert check_int("n", value, 1) == value
    else:
        with pytest.raises(ValueError, match=r"^n=.* is invalid: must be an int >= 1$"):
            check_int("n", value, 1)
    if isinstance(value, bool):
        assert check_bool("flag", value) is value
    else:
        with pytest.raises(ValueError, match=r"^flag=.* is invalid: must be True or False$"):
            check_bool("flag", value)


def test_guard_alert_entries_are_named_by_position() -> None:
    with pytest.raises(ValueError, match=r"^alerts\[1\]=5 is invalid: must be an AlertSink"):
        DivergenceGuard(alerts=[print, 5])
