"""GuardPolicy: every rule of the guard's decisions, as a pure function — no Trainer."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError

import pytest

from lr_monitor.callbacks.guard import ACTIONS as GUARD_ACTIONS
from lr_monitor.callbacks.guard import DEFAULT_POLICY as GUARD_DEFAULT_POLICY
from lr_monitor.events import DETECTION_KINDS, Action, Detection
from lr_monitor.guard import ACTIONS, DEFAULT_POLICY, DecisionContext, GuardPolicy


def det(kind: str, signal: str = "loss", step: int = 5) -> Detection:
    return Detection(step=step, kind=kind, signal=signal, value=math.nan, threshold=1.0,
                     message=f"{kind} on {signal}")


ALL_ACTIONS = ("log", "skip", "cut", "rollback", "stop")
PLANS = {
    "log": (),
    "skip": (Action.SKIP,),
    "cut": (Action.CUT,),
    "rollback": (Action.ROLLBACK, Action.CUT),
    "stop": (Action.SKIP, Action.STOP),
}


def test_old_public_names_are_importable_from_both_places() -> None:
    assert ACTIONS == GUARD_ACTIONS == ALL_ACTIONS
    assert DEFAULT_POLICY is GUARD_DEFAULT_POLICY
    assert DEFAULT_POLICY == {"nonfinite": "rollback", "spike": "skip", "divergence": "rollback",
                              "oscillation": "cut", "update_ratio": "cut", "overshoot": "cut"}


def test_defaults_map_every_kind_to_an_action() -> None:
    policy = GuardPolicy()
    assert set(policy.actions) == set(DETECTION_KINDS)
    assert {k: a.label for k, a in policy.actions.items()} == DEFAULT_POLICY
    assert policy.escalate is Action.STOP and policy.amp_patience == 20


def test_the_policy_is_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        GuardPolicy().on_spike = "stop"  # type: ignore[misc]


def test_nothing_detected_is_no_decision() -> None:
    assert GuardPolicy().decide([], DecisionContext(step=3)) is None


@pytest.mark.parametrize("name", ALL_ACTIONS)
def test_each_action_has_its_plan(name: str) -> None:
    decision = GuardPolicy(on_spike=name).decide([det("spike")], DecisionContext(step=9))
    assert decision is not None
    assert decision.action is Action.parse(name) and decision.requested is Action.parse(name)
    assert decision.plan == PLANS[name]
    assert decision.step == 9
    assert decision.skips_step == (name in ("skip", "rollback", "stop"))


def test_policy_arguments_accept_names_and_members() -> None:
    by_name = GuardPolicy(on_oscillation="cut", escalate="log")
    by_member = GuardPolicy(on_oscillation=Action.CUT, escalate=Action.LOG)
    assert by_name == by_member
    assert by_name.actions["oscillation"] is Action.CUT and by_name.escalate is Action.LOG


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"on_spike": "explode"}, "on_spike='explode' is invalid: must be one of ('log', 'skip', "
                              "'cut', 'rollback', 'stop')"),
    ({"on_spike": "cut_lr"}, "on_spike='cut_lr' is invalid"),  # the event value, not a choice
    ({"on_nonfinite": None}, "on_nonfinite=None is invalid"),
    ({"on_divergence": Action.DISABLE}, "on_divergence=<Action.DISABLE: 'disable'> is invalid"),
    ({"escalate": "rollback"}, "escalate='rollback' is invalid: must be one of ('stop', 'log')"),
    ({"escalate": Action.CUT}, "escalate=<Action.CUT: 'cut_lr'> is invalid"),
    ({"amp_patience": 0}, "amp_patience=0 is invalid: must be an int >= 1"),
])
def test_bad_arguments_name_themselves(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        GuardPolicy(**kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


# -- severity ------------------------------------------------------------------------------


def test_the_most_severe_action_wins_whatever_the_order() -> None:
    policy = GuardPolicy(on_spike="skip", on_divergence="rollback", on_oscillation="cut")
    found = [det("spike"), det("oscillation", "update_cosine"), det("divergence")]
    for order in (found, found[::-1], found[1:] + found[:1]):
        decision = policy.decide(order, DecisionContext(step=5))
        assert decision is not None
        assert decision.action is Action.ROLLBACK and decision.cause.kind == "divergence"
        assert decision.detections == tuple(order)


def test_severity_order_is_log_skip_cut_rollback_stop() -> None:
    kinds = ("update_ratio", "spike", "oscillation", "divergence", "nonfinite")
    policy = GuardPolicy(**{f"on_{k}": a for k, a in zip(kinds, ALL_ACTIONS, strict=True)})
    for n in range(1, len(kinds) + 1):
        decision = policy.decide([det(k) for k in kinds[:n]], DecisionContext(step=1))
        assert decision is not None and decision.action is Action.parse(ALL_ACTIONS[n - 1])


def test_among_equals_the_first_detection_is_the_cause() -> None:
    found = [det("spike", "loss"), det("spike", "grad_norm")]
    decision = GuardPolicy().decide(found, DecisionContext(step=2))
    assert decision is not None and decision.cause is found[0]
    assert decision.message == "spike on loss (also: spike/grad_norm)"


# -- escalation and cooldown ----------------------------------------------------------------


@pytest.mark.parametrize("asked", ["cut", "rollback"])
def test_a_cut_or_rollback_escalates_when_the_cuts_are_used_up(asked: str) -> None:
    found = [det("divergence")]
    stop = GuardPolicy(on_divergence=asked).decide(found, DecisionContext(5, cuts_left=False))
    assert stop is not None and stop.action is Action.STOP
    assert stop.plan == (Action.SKIP, Action.STOP) and stop.requested is Action.parse(asked)
    log = GuardPolicy(on_divergence=asked, escalate="log").decide(
        found, DecisionContext(5, cuts_left=False))
    assert log is not None and log.action is Action.LOG and log.plan == ()


@pytest.mark.parametrize("asked", ["skip", "stop", "log"])
def test_other_actions_do_not_escalate(asked: str) -> None:
    decision = GuardPolicy(on_spike=asked).decide(
        [det("spike")], DecisionContext(5, cuts_left=False, cooling_down=True))
    assert decision is not None and decision.action is Action.parse(asked)


def test_a_cut_during_the_cooldown_is_only_recorded() -> None:
    decision = GuardPolicy(on_oscillation="cut").decide(
        [det("oscillation", "update_cosine")], DecisionContext(5, cooling_down=True))
    assert decision is not None
    assert decision.action is Action.LOG and decision.requested is Action.CUT
    assert decision.plan == () and not decision.skips_step


def test_a_rollback_always_cuts_even_during_the_cooldown() -> None:
    decision = GuardPolicy().decide([det("nonfinite")], DecisionContext(5, cooling_down=True))
    assert decision is not None
    assert decision.action is Action.ROLLBACK and decision.plan == (Action.ROLLBACK, Action.CUT)


def test_escalation_comes_before_the_cooldown() -> None:
    decision = GuardPolicy(on_oscillation="cut").decide(
        [det("oscillation")], DecisionContext(5, cuts_left=False, cooling_down=True))
    assert decision is not None and decision.action is Action.STOP


# -- fp16 AMP patience ---------------------------------------------------------------------


def run_steps(policy: GuardPolicy, steps: list[list[Detection]], amp: bool = True
              ) -> list[Action | None]:
    """Decide a sequence of steps, carrying the AMP streak as the guard does."""
    streak, out = 0, []
    for t, found in enumerate(steps):
        ctx = DecisionContext(step=t, amp=amp, amp_streak=streak)
        decision = policy.decide(found, ctx)
        streak = policy.next_amp_streak(found, ctx)
        out.append(None if decision is None else decision.action)
    return out


def test_amp_overflows_are_left_to_the_scaler_until_the_patience_runs_out() -> None:
    nan = [det("nonfinite")]
    policy = GuardPolicy(amp_patience=3)
    assert run_steps(policy, [nan, [], nan, nan, [], nan, nan, nan, nan]) == [
        None, None, None, None, None, None, None, Action.ROLLBACK, None]


def test_amp_patience_one_acts_at_once_and_without_amp_there_is_no_patience() -> None:
    nan = [det("nonfinite")]
    assert run_steps(GuardPolicy(amp_patience=1), [nan, nan]) == [Action.ROLLBACK] * 2
    assert run_steps(GuardPolicy(amp_patience=3), [nan, nan], amp=False) == [Action.ROLLBACK] * 2


def test_amp_patience_covers_only_steps_with_nothing_but_nonfinite_values() -> None:
    policy = GuardPolicy(amp_patience=3)
    mixed = [det("nonfinite"), det("oscillation", "update_cosine")]
    ctx = DecisionContext(step=1, amp=True, amp_streak=1)
    decision = policy.decide(mixed, ctx)
    assert decision is not None and decision.action is Action.ROLLBACK
    assert policy.next_amp_streak(mixed, ctx) == 0
    assert policy.next_amp_streak([det("spike")], ctx) == 0
    assert policy.next_amp_streak([], ctx) == 0


# -- events --------------------------------------------------------------------------------


def test_a_record_only_event_has_no_actions() -> None:
    decision = GuardPolicy(on_spike="log").decide([det("spike")], DecisionContext(step=4))
    assert decision is not None
    event = decision.event(decision.plan, lr_before={"Adam/pg0": 0.1},
                           lr_after={"Adam/pg0": 0.1}, lr_scale=1.0, time=0.0)
    assert event.actions == ()
    assert event.summary().endswith("-> recorded only")


def test_the_event_carries_the_cause_and_what_was_done() -> None:
    found = [det("nonfinite", "grad_norm", step=7), det("nonfinite", "loss", step=7)]
    decision = GuardPolicy().decide(found, DecisionContext(step=7))
    assert decision is not None
    event = decision.event((Action.SKIP, Action.CUT), lr_before={"SGD/pg0": 1.0},
                           lr_after={"SGD/pg0": 0.1}, lr_scale=0.1, epoch=0, run="r", time=1.0)
    assert (event.step, event.kind, event.signal) == (7, "nonfinite", "grad_norm")
    assert event.actions == ("skip", "cut_lr") and all(isinstance(a, Action)
                                                       for a in event.actions)
    assert event.message == "nonfinite on grad_norm (also: nonfinite/loss)"
    assert event.to_dict()["actions"] == ["skip", "cut_lr"]
    assert decision.reason == "step 7: nonfinite on grad_norm (nonfinite on grad_norm)"
