"""What the guard does about the detections of a step: a framework-free, frozen policy.

:class:`GuardPolicy` maps each detection kind to an :class:`~lr_monitor.events.Action`
and :meth:`GuardPolicy.decide` turns the detections of one step into a :class:`Decision`.
Everything it needs about the run comes in a :class:`DecisionContext` (the step, whether
the learning rate may be cut now, whether an fp16 ``GradScaler`` is active and how many
non-finite steps in a row it has had), so the whole policy is a pure function, tested
without any ``Trainer``. The rules, in order:

1. **AMP patience.** With an active fp16 ``GradScaler``, steps whose detections are all
   ``nonfinite`` are the scaler's business (it skips them and lowers the scale): the
   policy decides nothing until ``amp_patience`` of them came in a row. The streak is
   state the caller keeps: :meth:`GuardPolicy.next_amp_streak` gives the value for the next
   step's context.
2. **Severity.** Each detection asks for the action of its kind; the most severe wins
   (``log`` < ``skip`` < ``cut`` < ``rollback`` < ``stop``; the first detection among
   equals is the cause).
3. **Escalation.** A ``cut`` or ``rollback`` when every cut ``max_cuts`` allows has been
   made becomes ``escalate`` (``stop`` by default, or ``log``).
4. **Cooldown.** A ``cut`` within the cooldown after the previous cut is only recorded
   (``log``). A ``rollback`` always cuts: the repeated blow-up is the evidence that the
   last cut was not enough.
5. **No skipping forever.** A ``skip`` of a non-finite step, once :data:`NONFINITE_STREAK`
   steps in a row were non-finite, becomes ``stop`` (with ``escalate="stop"``, the
   default; with ``"log"`` such steps are still skipped, never applied): skipping has not
   helped, and a run that skips every step trains nothing. (The guard also checks the
   weights and the optimizer state after a non-finite step: a skip cannot cure a
   non-finite state, so it rolls back instead.)

The :class:`Decision` lists what to carry out, in order (:attr:`Decision.plan`):
``skip`` → skip; ``cut`` → cut; ``rollback`` → roll back, then cut (a rollback also drops
the step); ``stop`` → skip, then stop; ``log`` → nothing, so its event has empty
``actions``. :meth:`Decision.event` assembles the :class:`~lr_monitor.events.GuardEvent`
once the caller knows what was actually done.

Example:
    >>> from lr_monitor.events import Detection
    >>> policy = GuardPolicy()
    >>> nan = Detection(step=7, kind="nonfinite", signal="loss", value=float("nan"),
    ...                 threshold=float("inf"))
    >>> d = policy.decide([nan], DecisionContext(step=7))
    >>> d.action, [str(a) for a in d.plan]
    (<Action.ROLLBACK: 'rollback'>, ['rollback', 'cut_lr'])
    >>> policy.decide([nan], DecisionContext(step=7, cuts_left=False)).plan
    (<Action.SKIP: 'skip'>, <Action.STOP: 'stop'>)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from lr_monitor._validation import check_int, invalid
from lr_monitor.events import DETECTION_KINDS, Action, Detection, GuardEvent

__all__ = ["ACTIONS", "DEFAULT_POLICY", "NONFINITE_STREAK", "Decision", "DecisionContext",
           "GuardPolicy", "parse_action"]

#: The policy's choices by severity: when several detectors fire at one step, the most
#: severe wins. These are the names the guard's ``on_<kind>`` arguments accept.
ACTIONS: tuple[str, ...] = Action.policy_choices()

#: Default action per detector kind, as written in the guard's arguments.
DEFAULT_POLICY: dict[str, str] = {
    "nonfinite": "rollback",
    "spike": "skip",
    "divergence": "rollback",
    "oscillation": "cut",
    "update_ratio": "cut",
    "overshoot": "cut",
}

_ESCALATIONS = (Action.STOP.label, Action.LOG.label)

#: Non-finite steps in a row after which a ``skip`` escalates (rule 5 of the module). Ten
#: batches in a row with NaN/inf are no passing glitch (one bad batch, an fp16 overflow
#: the scaler has not absorbed yet): the data or the model is broken.
NONFINITE_STREAK = 10


def parse_action(arg: str, value: Any, choices: Sequence[str] = ACTIONS) -> Action:
    """The :class:`~lr_monitor.events.Action` a policy argument names.

    Args:
        arg: The argument's name as the user typed it (for the error message).
        value: An :class:`~lr_monitor.events.Action` or its policy name (``"cut"``).
        choices: The policy names allowed.

    Returns:
        The action.

    Raises:
        ValueError: ``<arg>=<value> is invalid: must be one of (...)`` for anything else.

    Example:
        >>> parse_action("on_spike", "cut"), parse_action("on_spike", Action.SKIP)
        (<Action.CUT: 'cut_lr'>, <Action.SKIP: 'skip'>)
        >>> parse_action("escalate", "rollback", ("stop", "log"))
        Traceback (most recent call last):
        ...
        ValueError: escalate='rollback' is invalid: must be one of ('stop', 'log')
    """
    if isinstance(value, Action) and value.label in choices:
        return value
    if isinstance(value, str) and not isinstance(value, Action) and value in choices:
        return Action.parse(value)
    raise invalid(arg, value, f"one of {tuple(choices)}")


@dataclass(frozen=True)
class DecisionContext:
    """What the policy needs to know about the run at one step.

    Args:
        step: The optimizer step being decided.
        cuts_left: Whether a cut is still allowed by ``max_cuts`` (otherwise a cut or a
            rollback escalates).
        cooling_down: Whether the previous cut is less than ``cooldown`` steps ago (a
            plain cut is then only recorded).
        amp: Whether an fp16 ``GradScaler`` is active.
        amp_streak: Non-finite steps in a row the policy left to the scaler before this one
            (from :meth:`GuardPolicy.next_amp_streak` of the previous step).
        nonfinite_streak: Non-finite steps in a row just before this one.
    """

    step: int
    cuts_left: bool = True
    cooling_down: bool = False
    amp: bool = False
    amp_streak: int = 0
    nonfinite_streak: int = 0


@dataclass(frozen=True)
class Decision:
    """What the policy decided about one step.

    Args:
        step: The optimizer step decided.
        action: The action taken, after escalation and cooldown.
        cause: The detection that asked for the most severe action.
        detections: Every detection of the step, in the order they were given.
        plan: What to carry out, in order (empty for ``log``: record only).
        requested: The action ``cause`` asked for before escalation and cooldown.
    """

    step: int
    action: Action
    cause: Detection
    detections: tuple[Detection, ...]
    plan: tuple[Action, ...]
    requested: Action

    @property
    def skips_step(self) -> bool:
        """Whether the step's gradients are dropped (skip, rollback and stop do)."""
        return Action.SKIP in self.plan or Action.ROLLBACK in self.plan

    @property
    def message(self) -> str:
        """The cause's message, naming the other detections of the step."""
        others = [f"{d.kind}/{d.signal}" for d in self.detections if d is not self.cause]
        return self.cause.message + (f" (also: {', '.join(others)})" if others else "")

    @property
    def reason(self) -> str:
        """One line for a stop: the step decided, what fired and why."""
        c = self.cause
        return f"step {self.step}: {c.kind} on {c.signal} ({c.message})"

    def event(self, actions: Sequence[Action], **fields: Any) -> GuardEvent:
        """The event recording this decision.

        Args:
            actions: What was actually done, in order (a rollback without a snapshot is a
                skip, a refused cut is left out); empty when the detection was only
                recorded.
            **fields: The other :class:`~lr_monitor.events.GuardEvent` fields (``lr_before``,
                ``lr_after``, ``lr_scale``, ``epoch``, ``run``, ``time``).

        Returns:
            The event, with the cause's step, kind, signal, value and threshold and
            :attr:`message`.

        Example:
            >>> from lr_monitor.events import Detection
            >>> spike = Detection(step=3, kind="spike", signal="loss", value=9.0,
            ...                   threshold=2.0, message="loss spiked")
            >>> d = GuardPolicy(on_spike="log").decide([spike], DecisionContext(step=3))
            >>> d.event(d.plan, time=0.0).actions
            ()
        """
        c = self.cause
        return GuardEvent(step=c.step, kind=c.kind, signal=c.signal, value=c.value,
                          threshold=c.threshold, message=self.message,
                          actions=tuple(actions), **fields)


_PLANS: Mapping[Action, tuple[Action, ...]] = MappingProxyType({
    Action.LOG: (),
    Action.SKIP: (Action.SKIP,),
    Action.CUT: (Action.CUT,),
    Action.ROLLBACK: (Action.ROLLBACK, Action.CUT),
    Action.STOP: (Action.SKIP, Action.STOP),
})


@dataclass(frozen=True)
class GuardPolicy:
    """The action per detection kind, escalation and fp16-AMP patience (see the module).

    Args:
        on_nonfinite: Action when the loss or gradient norm is NaN/inf.
        on_spike: Action on a spike of the loss or the gradient norm.
        on_divergence: Action on sustained divergence or an explosion of the loss.
        on_oscillation: Action when recorded updates keep reversing direction.
        on_update_ratio: Action when ``update_ratio`` stays far above the usual 1e-3.
        on_overshoot: Action when an overshoot signal (step quality, g·Δ, stability
            ratio) stays beyond its bound while the loss does not fall.
        escalate: What a cut or rollback becomes once every cut is used up: ``"stop"`` or
            ``"log"``.
        amp_patience: With an fp16 ``GradScaler``, non-finite steps in a row left to the
            scaler before the policy acts (≥ 1).

    Each action is an :class:`~lr_monitor.events.Action` or its policy name
    (:data:`ACTIONS`: ``"log"``, ``"skip"``, ``"cut"``, ``"rollback"``, ``"stop"``); the
    fields hold :class:`~lr_monitor.events.Action` members.

    Raises:
        ValueError: For an argument outside its allowed values (the message names it).

    Example:
        >>> GuardPolicy(on_spike="cut").actions["spike"]
        <Action.CUT: 'cut_lr'>
    """

    on_nonfinite: Action | str = DEFAULT_POLICY["nonfinite"]
    on_spike: Action | str = DEFAULT_POLICY["spike"]
    on_divergence: Action | str = DEFAULT_POLICY["divergence"]
    on_oscillation: Action | str = DEFAULT_POLICY["oscillation"]
    on_update_ratio: Action | str = DEFAULT_POLICY["update_ratio"]
    on_overshoot: Action | str = DEFAULT_POLICY["overshoot"]
    escalate: Action | str = Action.STOP
    amp_patience: int = 20
    actions: Mapping[str, Action] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parsed = {kind: parse_action(f"on_{kind}", getattr(self, f"on_{kind}"))
                  for kind in DETECTION_KINDS}
        for kind, action in parsed.items():
            object.__setattr__(self, f"on_{kind}", action)
        object.__setattr__(self, "escalate",
                           parse_action("escalate", self.escalate, _ESCALATIONS))
        check_int("amp_patience", self.amp_patience, 1)
        object.__setattr__(self, "actions", MappingProxyType(parsed))

    def __reduce__(self) -> tuple[Any, ...]:
        # ``actions`` (a read-only view) is derived: rebuild it rather than pickle it
        return type(self), tuple(getattr(self, f.name) for f in fields(self) if f.init)

    def _amp_deferred(self, detections: Sequence[Detection], context: DecisionContext) -> bool:
        """Whether these detections are an overflow the fp16 scaler handles by itself."""
        return bool(detections) and context.amp and all(
            d.kind == "nonfinite" for d in detections)

    def next_amp_streak(self, detections: Sequence[Detection],
                        context: DecisionContext) -> int:
        """The ``amp_streak`` for the next step's context.

        One more after a non-finite step left to the scaler; back to 0 after any other
        step, and once the streak reached ``amp_patience`` (the policy acted on it).

        Example:
            >>> from lr_monitor.events import Detection
            >>> policy = GuardPolicy(amp_patience=2)
            >>> nan = [Detection(step=0, kind="nonfinite", signal="loss",
            ...                  value=float("nan"), threshold=float("inf"))]
            >>> ctx = DecisionContext(step=0, amp=True)
            >>> policy.decide(nan, ctx), policy.next_amp_streak(nan, ctx)
            (None, 1)
            >>> ctx = DecisionContext(step=1, amp=True, amp_streak=1)
            >>> policy.decide(nan, ctx).action, policy.next_amp_streak(nan, ctx)
            (<Action.ROLLBACK: 'rollback'>, 0)
        """
        if not self._amp_deferred(detections, context):
            return 0
        streak = context.amp_streak + 1
        return 0 if streak >= self.amp_patience else streak

    def _resolve(self, action: Action, context: DecisionContext) -> Action:
        """``action`` after escalation (no cuts left) and cooldown (a cut too soon)."""
        if action in (Action.CUT, Action.ROLLBACK) and not context.cuts_left:
            return Action.parse(self.escalate)
        if action is Action.CUT and context.cooling_down:
            return Action.LOG
        return action

    def plan(self, action: Action, context: DecisionContext) -> tuple[Action, tuple[Action, ...]]:
        """``action`` after escalation and cooldown, and what carrying it out means.

        Args:
            action: The action asked for.
            context: The run's state at this step.

        Returns:
            ``(action, plan)`` as a :class:`Decision` would hold them.

        Example:
            >>> GuardPolicy().plan(Action.ROLLBACK, DecisionContext(step=0, cuts_left=False))
            (<Action.STOP: 'stop'>, (<Action.SKIP: 'skip'>, <Action.STOP: 'stop'>))
        """
        resolved = self._resolve(action, context)
        return resolved, _PLANS[resolved]

    def skipping_kinds(self, context: DecisionContext) -> frozenset[str]:
        """The detection kinds that, in this context, drop the step's update.

        Those whose action (after escalation) is ``skip``, ``rollback`` or ``stop``; with
        an fp16 ``GradScaler`` not ``nonfinite``, which the scaler skips by itself. The
        guard skips a step on the device when a value trips a rule of these kinds.

        Example:
            >>> sorted(GuardPolicy().skipping_kinds(DecisionContext(step=0)))
            ['divergence', 'nonfinite', 'spike']
            >>> sorted(GuardPolicy(escalate="log").skipping_kinds(
            ...     DecisionContext(step=0, cuts_left=False)))
            ['spike']
        """
        kinds = set()
        for kind, action in self.actions.items():
            if kind == "nonfinite" and context.amp:
                continue
            plan = _PLANS[self._resolve(action, context)]
            if Action.SKIP in plan or Action.ROLLBACK in plan:
                kinds.add(kind)
        return frozenset(kinds)

    def decide(self, detections: Sequence[Detection],
               context: DecisionContext) -> Decision | None:
        """The decision about one step's detections, or ``None`` when there is nothing to do.

        Args:
            detections: Every detection of the step (the step's detectors first, then those
                of recorded statistics).
            context: The run's state at this step.

        Returns:
            ``None`` without detections or while fp16 overflows are left to the scaler;
            else the :class:`Decision`.
        """
        if not detections:
            return None
        if self._amp_deferred(detections, context) and \
                context.amp_streak + 1 < self.amp_patience:
            return None
        asked = [self.actions[d.kind] for d in detections]
        worst = max(range(len(detections)), key=lambda i: asked[i].severity())
        requested = asked[worst]
        action = self._resolve(requested, context)
        if action is Action.SKIP and self.escalate is Action.STOP \
                and context.nonfinite_streak + 1 >= NONFINITE_STREAK \
                and any(d.kind == "nonfinite" for d in detections):
            action = Action.STOP  # skipping has not helped (with "log": skip on, never apply)
        return Decision(step=context.step, action=action, cause=detections[worst],
                        detections=tuple(detections), plan=_PLANS[action], requested=requested)
