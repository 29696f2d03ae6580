"""DivergenceGuard: catch overshooting and divergence within a few steps, and act.

The Lightning hooks only; the logic is framework-free in :mod:`lr_monitor.guard`. At each
optimizer step the guard gathers the loss (``on_before_backward``, averaged over
gradient-accumulation micro-batches) and the gradient norm (``on_before_optimizer_step``:
after unscaling, before clipping) with :mod:`~lr_monitor.guard.signals` — combined across
ranks in one all-reduce (the loss averaged; the squared norm averaged when replicated as
under DDP, summed over the shards of FSDP2/DTensor gradients), so every rank takes the same
decision. DeepSpeed and FSDP1 (``FSDPStrategy``) are refused in ``setup``. A
:class:`~lr_monitor.StepSizeMonitor` hands it its recorded ``update_cosine`` and
``update_ratio`` (the guard subscribes to it). :mod:`~lr_monitor.guard.bank` detects,
:mod:`~lr_monitor.guard.policy` decides, and the decision is carried out with
:mod:`~lr_monitor.guard.interventions` *before* the optimizer applies the step: ``skip``
drops the step's gradients, ``cut`` multiplies every LR by ``lr_factor`` (surviving LR
schedulers), ``rollback`` restores weights and moments from an in-memory snapshot while
keeping the current LRs, skips the step and cuts, ``stop`` sets ``trainer.should_stop``,
``log`` only records. Defaults and reasons: ``docs/guard.md``.

Every decision becomes a :class:`~lr_monitor.GuardEvent` in :attr:`DivergenceGuard.events`
(``actions`` empty when only recorded), goes to the alert sinks (a log line and
``events.jsonl`` always; TensorBoard text with a ``TensorBoardLogger``; ``alerts=[...]``)
and to the loggers as :data:`~lr_monitor.tags.GUARD_LR_SCALE` and
:data:`~lr_monitor.tags.GUARD_EVENTS`.

Example::

    trainer = Trainer(callbacks=[StepSizeMonitor(), DivergenceGuard()])
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor

from lr_monitor._validation import check_bool, check_int, check_path, check_real, check_str
from lr_monitor.alerts import (
    AlertSink,
    GlobalZero,
    TensorBoardSink,
    as_sinks,
    checkpoint_sinks,
    close_sinks,
    dispatch,
    make_default_sinks,
    resume_sinks,
)
from lr_monitor.callbacks._compat import (
    check_strategy,
    grad_scaler,
    is_tensorboard_logger,
    pl,
    rank_zero_warn,
    run_dir,
)
from lr_monitor.callbacks._publisher import Publisher
from lr_monitor.events import Action, Detection, GuardEvent
from lr_monitor.faults import FaultBarrier
from lr_monitor.guard.bank import DEFAULT_OVERSHOOT_RULES, DetectorBank, DetectorStream
from lr_monitor.guard.interventions import (
    LRCut,
    RollbackBuffer,
    clear_device_skip,
    learning_rates,
    nonfinite_state,
    reset_state,
    skip_on_device,
    skip_step,
)
from lr_monitor.guard.policy import (
    ACTIONS,
    DEFAULT_POLICY,
    Decision,
    DecisionContext,
    GuardPolicy,
)
from lr_monitor.guard.signals import StagedStep, StepSignals, loss_scale
from lr_monitor.recording.record import StepRecord
from lr_monitor.tags import GUARD_EVENTS, GUARD_LR_SCALE, optimizer_names

__all__ = ["ACTIONS", "DEFAULT_POLICY", "DivergenceGuard"]

#: Recorded steps held between two batches at most (a guard whose stage failed drops more).
_QUEUE = 1024

#: Events held in memory: the most recent ``_KEEP_EVENTS`` at least, ``2 × _KEEP_EVENTS`` at
#: most (an event storm cannot grow the guard without bound); the checkpoint keeps the
#: most recent ``_KEEP_EVENTS``. ``events.jsonl`` has every one.
_KEEP_EVENTS = 1000



#: The rules fed by a monitor's records, and which monitor each needs.
_NEEDS_A_MONITOR = {
    "oscillation": "a StepSizeMonitor (recording update_cosine)",
    "update_ratio": "a StepSizeMonitor",
    "overshoot": "a StepQualityMonitor, a SharpnessMonitor or StepSizeMonitor(consecutive=True)",
}


def _read(staged: StagedStep) -> tuple[dict[str, float], bool]:
    """A staged step's values, and whether it tripped *and* was kept from the weights.

    A fused optimizer's skip is exact; zeroing the gradients leaves a NaN as NaN.
    """
    values, tripped = staged.read()
    kept = staged.exact_skip or all(math.isfinite(v) for v in values.values())
    return values, tripped and kept


class DivergenceGuard(pl.Callback):
    """Detect overshooting and divergence; skip, roll back, cut the LR or stop.

    Args:
        on_nonfinite: Action when the loss or gradient norm is NaN/inf.
        on_spike: Action on a spike of the loss or the gradient norm.
        on_divergence: Action on sustained divergence or an explosion of the loss.
        on_oscillation: Action when recorded updates keep reversing direction
            (needs a :class:`~lr_monitor.StepSizeMonitor` recording ``update_cosine``).
        on_update_ratio: Action when ``update_ratio`` stays far above the usual 1e-3
            (needs a :class:`~lr_monitor.StepSizeMonitor`).
        on_overshoot: Action when the steps overshoot while the loss does not fall: step
            quality ρ < 0 (needs a :class:`~lr_monitor.StepQualityMonitor`), most new
            gradients pointing back along the last update (a
            ``StepSizeMonitor(consecutive=True)``) or the stability ratio far above 1 with
            the loss rising (a :class:`~lr_monitor.SharpnessMonitor`); ``docs/guard.md``.
            Set away from its default with no monitor among the callbacks, each of these
            three rules warns at setup that it cannot fire.
        overshoot_rules: Which overshoot rules run, by signal: ``"step_quality"``,
            ``"stability_ratio"`` (the default: they never fired on a healthy benchmark
            run) and ``"overshoot_frac"`` (opt-in: g·Δ > 0 on most steps with the loss
            rising; it cut 5 of 100 long healthy mini-batch runs and fired on 9 of 12
            healthy full-batch runs at the edge of stability).
        lr_factor: Multiplier of every learning rate per cut, in (0, 1); 0.1 is one decade,
            as a too-high LR is typically off by one or more (``docs/guard.md``).
        cooldown: Minimum optimizer steps between two ``cut`` actions (≥ 0). A rollback
            always cuts: the repeated blow-up is the evidence that the last cut was not
            enough.
        min_lr: No cut takes a learning rate below this (≥ 0).
        max_cuts: Cuts allowed before a further cut escalates (≥ 1).
        escalate: What a cut becomes once ``max_cuts`` is used up: ``"stop"`` or ``"log"``.
        snapshot_every_n_steps: Take an in-memory CPU snapshot (model, optimizers,
            detectors) every n healthy steps for ``rollback`` (≥ 1).
        snapshot_keep: Snapshots held (≥ 1). A rollback restores the newest one taken before
            the trouble began (the detection's onset: a divergence is reported ``patience``
            steps after it starts) that fits the model and optimizers as they are now; with
            none before the onset, the oldest that fits. A snapshot with a non-finite weight
            or moment is never kept (and is reported as a ``nonfinite`` detection).
        spike_window: Values in the spike detectors' robust baseline (median/MAD).
        spike_threshold: Robust z-score above which a value is a spike.
        explosion_factor: A loss this many times its starting level (the minimum of the
            first three) is a divergence at once, even during the detectors' warm-up
            (> 1). Three losses in a row above a factor set by the loss's own step-to-step
            noise — 4 for a quiet loss, up to ``explosion_factor`` for a noisy one — are
            one too. Raise it when the loss starts far below its typical level
            (fine-tuning).
        divergence_patience: Steps the smoothed loss must stay above its bound.
        watch_grad_norm: Also watch the gradient norm (one ``foreach`` norm per step).
        deferred: Read each step's signals one step late, so that a healthy step costs no
            host transfer (the CPU keeps running ahead of the device). ``None`` (default):
            deferred when the parameters are off the CPU; on the CPU reading is free and
            the guard judges every step before its update. Deferred, a step whose own
            value trips a rule whose action skips it (non-finite, spike, explosion) is
            skipped on the device — exactly for a fused optimizer, by zeroing its
            gradients otherwise (a non-finite gradient cannot be zeroed: it reaches the
            weights and the next step rolls back) — and every other decision comes one
            step late, a rollback undoing the step that was applied (``docs/guard.md``).
        amp_patience: With an fp16 ``GradScaler`` (``precision="16-mixed"`` on GPU),
            non-finite steps are the scaler's to handle (it skips them and lowers the
            scale); the guard acts only after this many in a row (≥ 1).
        alerts: Extra sinks (:mod:`lr_monitor.alerts`) or callables ``fn(event)``.
        log_events: Keep the log-line sink (the run's record; on by default).
        jsonl: Keep the ``events.jsonl`` sink (the run's record; on by default).
        events_dir: Where ``events.jsonl`` goes (default: the logger's ``log_dir``, else
            the trainer's ``default_root_dir``).
        name: Distinguishes two guards in one checkpoint (part of :attr:`state_key`).

    The actions are :class:`~lr_monitor.events.Action` members or their policy names
    (``"log"``, ``"skip"``, ``"cut"``, ``"rollback"``, ``"stop"``).

    Raises:
        ValueError: for an argument outside its allowed values (the message names it).
    """

    def __init__(
        self,
        *,
        on_nonfinite: Action | str = DEFAULT_POLICY["nonfinite"],
        on_spike: Action | str = DEFAULT_POLICY["spike"],
        on_divergence: Action | str = DEFAULT_POLICY["divergence"],
        on_oscillation: Action | str = DEFAULT_POLICY["oscillation"],
        on_update_ratio: Action | str = DEFAULT_POLICY["update_ratio"],
        on_overshoot: Action | str = DEFAULT_POLICY["overshoot"],
        lr_factor: float = 0.1,
        cooldown: int = 10,
        min_lr: float = 0.0,
        max_cuts: int = 6,
        escalate: Action | str = "stop",
        snapshot_every_n_steps: int = 50,
        snapshot_keep: int = 2,
        spike_window: int = 100,
        spike_threshold: float = 8.0,
        explosion_factor: float = 10.0,
        divergence_patience: int = 20,
        overshoot_rules: Sequence[str] = DEFAULT_OVERSHOOT_RULES,
        watch_grad_norm: bool = True,
        deferred: bool | None = None,
        amp_patience: int = 20,
        alerts: Sequence[AlertSink | Callable[[GuardEvent], object]] | None = None,
        log_events: bool = True,
        jsonl: bool = True,
        events_dir: str | Path | None = None,
        name: str = "",
    ) -> None:
        self.policy = GuardPolicy(
            on_nonfinite=on_nonfinite, on_spike=on_spike, on_divergence=on_divergence,
            on_oscillation=on_oscillation, on_update_ratio=on_update_ratio,
            on_overshoot=on_overshoot, escalate=escalate, amp_patience=amp_patience)
        self.bank = DetectorBank(spike_window=spike_window, spike_threshold=spike_threshold,
                                 explosion_factor=explosion_factor,
                                 divergence_patience=divergence_patience,
                                 overshoot_rules=overshoot_rules)
        self.signals = StepSignals(watch_grad_norm=watch_grad_norm)
        self.deferred: bool | None = None if deferred is None else \
            check_bool("deferred", deferred)
        # Checked under the names the user typed; LRCut and RollbackBuffer check them again
        # under their own names.
        check_real("lr_factor", lr_factor, low=0.0, high=1.0)
        check_int("cooldown", cooldown, 0)
        check_real("min_lr", min_lr, low=0.0, low_closed=True)
        check_int("max_cuts", max_cuts, 1)
        check_int("snapshot_every_n_steps", snapshot_every_n_steps, 1)
        check_int("snapshot_keep", snapshot_keep, 1)
        self.cut_policy = LRCut(factor=lr_factor, cooldown=cooldown, min_lr=min_lr,
                                max_cuts=max_cuts)
        self.snapshots = RollbackBuffer(every_n_steps=snapshot_every_n_steps,
                                        keep=snapshot_keep)
        self.log_events = check_bool("log_events", log_events)
        self.jsonl = check_bool("jsonl", jsonl)
        self.name: str = check_str("name", name, allow_empty=True)
        self.extra_sinks = as_sinks("alerts", alerts)
        self.events_dir = check_path("events_dir", events_dir, allow_none=True)
        #: The most recent events (at least 1,000 of them; :attr:`event_counts` counts all).
        self.events: list[GuardEvent] = []
        #: Every event of the run by kind (``"spike"``, ``"divergence"``, ...).
        self.event_counts: Counter[str] = Counter()
        self.sinks: list[AlertSink] = []
        self.stop_reason: str | None = None
        self._trainer: pl.Trainer | None = None
        self._monitors: list[Publisher] = []  # every callback that publishes records
        self._records: deque[StepRecord] = deque(maxlen=_QUEUE)  # from the monitors
        self._pending: list[Detection] = []  # from recorded statistics, acted on next step
        self._decided_step: int | None = None
        self._decision: Decision | None = None
        self._deferred_now: bool | None = None  # ``deferred`` resolved at the first step
        self._staged: StagedStep | None = None  # the last step's signals, read at the next
        self._skip_now = False  # drop this step's update on the host
        self._late_skips: set[int] = set()  # optimizers whose next update a late skip drops
        self._device_skip: Tensor | None = None  # ... or on the device (deferred)
        self._found_inf: list[torch.optim.Optimizer] = []  # fused optimizers to clear
        self._last_event_step = -(10**9)
        self._amp_streak = 0
        self._nonfinite_streak = 0  # non-finite steps in a row
        self._state_rollbacks = 0  # rollbacks for a non-finite state a skip could not cure
        self.faults = FaultBarrier("DivergenceGuard", report=self._report_fault,
                                   step=self._fault_step)

    def _fault_step(self) -> int | None:
        """The step a fault is recorded at (a method, not a lambda: the guard pickles)."""
        return None if self._trainer is None else self._trainer.global_step

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the trainer, the subscriptions and the open sinks (setup reopens)."""
        state = self.__dict__.copy()
        state.update(_trainer=None, _monitors=[], sinks=[])
        return state

    @property
    def streams(self) -> list[DetectorStream]:
        """The detectors of each optimizer (see :class:`~lr_monitor.guard.bank.DetectorBank`)."""
        return self.bank.streams

    @property
    def detectors(self) -> DetectorStream:
        """The detectors of the first optimizer (see :attr:`streams` for the others)."""
        return self.bank.streams[0]

    @property
    def state_key(self) -> str:
        """Key in the checkpoint's ``callbacks`` dict (set ``name`` to run two guards)."""
        return self._generate_state_key(name=self.name)

    @property
    def event_total(self) -> int:
        """Events of the run so far (the scalar :data:`~lr_monitor.tags.GUARD_EVENTS`)."""
        return sum(self.event_counts.values())

    @property
    def lr_scale(self) -> float:
        """The cumulative LR multiplier applied by this guard (1.0 = no cut)."""
        return self.cut_policy.scale

    # -- lifecycle -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Subscribe to the monitors; open the alert sinks (rank zero only sends anything).

        Raises:
            RuntimeError: For a strategy whose gradients it cannot see (DeepSpeed, FSDP1).
        """
        self._trainer = trainer
        if stage == "fit":
            check_strategy(trainer, type(self).__name__)
            self.faults.call("setup", self._subscribe, trainer)
            if not self.sinks:
                self.faults.call("setup", self._open_sinks, trainer)

    def _subscribe(self, trainer: pl.Trainer) -> None:
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, Publisher) and all(cb is not m for m in self._monitors):
                cb.subscribe(self._on_record)
                self._monitors.append(cb)
        if not self._monitors:  # a rule the user set that can never fire: say so once
            for kind, needs in _NEEDS_A_MONITOR.items():
                action = self.policy.actions[kind]
                if action is not Action.parse(DEFAULT_POLICY[kind]):
                    rank_zero_warn(f"DivergenceGuard: on_{kind}={action.label!r} has no effect: "
                                   f"it needs {needs} among the trainer's callbacks")

    def _on_record(self, record: StepRecord) -> None:
        """A monitor recorded a step (inside the optimizer's step, on every rank): queue it."""
        self._records.append(record)

    def _report_fault(self, event: GuardEvent) -> None:
        """A fault of the guard itself goes to its sinks (the log line at least)."""
        dispatch(self.sinks or make_default_sinks(None), event)

    def _open_sinks(self, trainer: pl.Trainer) -> None:
        log_dir = self.events_dir if self.events_dir is not None else run_dir(trainer)
        is_zero = GlobalZero(trainer)  # picklable, and does not keep the trainer alive
        sinks = make_default_sinks(str(log_dir) if trainer.is_global_zero else None,
                                   jsonl=self.jsonl, logging=self.log_events,
                                   is_rank_zero=is_zero)
        for lg in trainer.loggers:
            if is_tensorboard_logger(lg) and trainer.is_global_zero:
                sinks.append(TensorBoardSink(cast(Any, lg).experiment, is_rank_zero=is_zero))
        for s in self.extra_sinks:
            s.is_rank_zero = is_zero  # type: ignore[attr-defined]
        self.sinks = sinks + self.extra_sinks

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Unsubscribe; flush and close the sinks (queued webhooks get a bounded time)."""
        monitors, self._monitors = self._monitors, []
        for m in monitors:
            self.faults.call("teardown", m.unsubscribe, self._on_record)
        if self.sinks:
            sinks, self.sinks = self.sinks, []
            self.faults.call("teardown", close_sinks, sinks)  # each within its own bound

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Whatever was decided is already on disk; give queued alerts a chance to go out."""
        self.teardown(trainer, pl_module, "fit")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Snapshot the starting state: a blow-up in the first steps can be undone too."""
        if not len(self.snapshots) and self._staged is None:  # (a resumed unread step is
            # judged first: its weights may be the ones to roll back from)
            self.faults.call("snapshot", self._snapshot, trainer, pl_module, trainer.global_step)

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                  force: bool = True) -> None:
        """Take a snapshot if due (or ``force``); a poisoned state is acted on at once.

        Called on every rank at the same points. The copy has a fault barrier of its own
        (``snapshot_copy``), so that a copy failing on one rank never keeps that rank from
        the all-reduce in which the ranks agree on the outcome: a failed copy, or a shard
        that is not finite, drops the snapshot on every rank.
        """
        if not (force or self.snapshots.due(step)):
            return
        snap = self.faults.call("snapshot_copy", self.snapshots.copy, step, pl_module,
                                self._optimizers(trainer),
                                extra={"detectors": self.bank.state_dict()})
        failed, poisoned = snap is None, snap is not None and not snap.finite
        failed, poisoned = self._any_ranks(trainer, failed, poisoned)
        if snap is not None and not failed and not poisoned:
            self.snapshots.hold(snap)
            if not force:
                self._state_rollbacks = 0  # healthy long enough to snapshot again
        if poisoned:
            self.faults.call("decide", self._poisoned, trainer, pl_module, step)

    def _poisoned(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """A snapshot found a non-finite parameter or optimizer state: act before it is used."""
        found = Detection(
            step=step, kind="nonfinite", signal="state", value=math.nan, threshold=math.inf,
            message=f"a parameter or optimizer state is non-finite before step {step}'s "
                    "update (found when taking a snapshot)")
        # not the fp16 scaler's business: it skips overflowing steps, it cannot cure a state
        context = replace(self._context(trainer, step), amp=False)
        decision = self.policy.decide([found], context)
        if decision is None:
            return
        if decision.plan == (Action.SKIP,):
            decision = self._cannot_skip(decision, context)
        self._carry_out(trainer, pl_module, decision)
        if decision.skips_step:
            if self._decided_step == step:  # deferred: before this step's update
                self._skip_now = True
            else:  # after a step (or at the start): the next update of each optimizer
                self._late_skips.update(range(len(self._optimizers(trainer))))

    def _cannot_skip(self, decision: Decision, context: DecisionContext) -> Decision:
        """A skip cannot cure a non-finite parameter or moment: roll back instead.

        The first time without a cut (the policy asked for none); when it recurs before
        the run was healthy long enough to snapshot again, with a cut, so repeated trouble
        runs into ``max_cuts`` and escalates instead of rolling back forever.
        """
        self._state_rollbacks += 1
        if self._state_rollbacks == 1:
            return replace(decision, plan=(Action.ROLLBACK,))
        action, plan = self.policy.plan(Action.ROLLBACK, context)
        return replace(decision, action=action, plan=plan)

    # -- the step ------------------------------------------------------------------------
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        """Accumulate the loss of each micro-batch (kept on the device)."""
        if trainer.training:
            self.faults.call("loss", self._add_loss, trainer, loss)

    def _add_loss(self, trainer: pl.Trainer, loss: torch.Tensor) -> None:
        # fp16 AMP: Lightning hands callbacks the *scaled* loss; the scale comes back out.
        # Accumulating (automatic optimization only), it first divided the loss by
        # accumulate_grad_batches, also in a short last window: that comes back out too.
        scale = loss_scale(grad_scaler(trainer))
        k = int(getattr(trainer, "accumulate_grad_batches", 1))
        if k > 1 and trainer.lightning_module.automatic_optimization:
            scale = 1.0 / k if scale is None else scale / k
        self.signals.add_loss(loss, scale)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Decide (once per optimizer step) and act before the optimizer applies the step."""
        opt = getattr(optimizer, "optimizer", optimizer)
        step = trainer.global_step
        index = self._optimizer_index(trainer, opt)
        self.faults.call("skip", self._clear_device_skips)
        if self._decided_step != step:
            self._decided_step = step
            self._decision, self._skip_now, self._device_skip = None, False, None
            self.faults.call("decide", self._decide, trainer, pl_module, step, opt, index)
        if self._skip_now or index in self._late_skips:
            self._late_skips.discard(index)
            self.faults.call("skip", skip_step, opt)
        elif self._device_skip is not None:
            self.faults.call("skip", self._skip_on_device, trainer, opt, self._device_skip)

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                optimizer: torch.optim.Optimizer, index: int) -> None:
        reduce = None if trainer.world_size <= 1 else \
            (lambda v: trainer.strategy.reduce(v, reduce_op="mean"))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self._deferred_now is None:
            self._deferred_now = self.deferred if self.deferred is not None else any(
                p.device.type != "cpu" for p in params[:1])
        staged, self._staged = self._staged, None
        if staged is not None:  # the last step, read now (deferred, or saved in a checkpoint)
            values, tripped = _read(staged)
            decision = self._judge(trainer, pl_module, staged.index, staged.step, values,
                                   tripped=tripped)
            if decision is not None and (Action.ROLLBACK in decision.plan
                                         or Action.STOP in decision.plan):
                self._skip_now = True  # rolled back or stopping: not this update either
            elif decision is not None and Action.SKIP in decision.plan and not tripped:
                self._late_skips.add(staged.index)  # that optimizer's next update instead
            elif decision is None and (not len(self.snapshots) or (
                    self._quiet(staged.step) and self.bank.healthy())):
                # the weights about to be updated passed judgement: keep them (at once
                # when there is no snapshot yet, as after a resume with an unread step:
                # a state to go back to beats none, even shortly after an event)
                self._snapshot(trainer, pl_module, step, force=not len(self.snapshots))
            self._decision = decision
        if self._skip_now or index in self._late_skips:
            self.signals.reset()  # values of weights that are gone or of an update not taken
        elif not self._deferred_now:
            self._decision = self._judge(trainer, pl_module, index, step,
                                         self.signals.collect(params, reduce))
            self._skip_now = self._decision is not None and self._decision.skips_step
        else:
            kinds = self.policy.skipping_kinds(self._context(trainer, step))
            trips = self.bank.tripwires(index, kinds, self.signals.signals)
            self._staged = self.signals.stage(params, step=step, index=index, reduce=reduce,
                                              tripwires=trips,
                                              nonfinite_trips="nonfinite" in kinds)
            if trips or "nonfinite" in kinds:
                self._device_skip = self._staged.over

    def _judge(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int,
               step: int, values: dict[str, float], tripped: bool | None = None,
               final: bool = False) -> Decision | None:
        """Detect and decide on one step's values; carry the decision out.

        ``tripped`` is ``None`` when the step has not been applied yet, else whether it
        was kept from the weights on the device (read one step late); ``final``: after
        the last step (no update left to skip).
        """
        found = self.bank.detect(index, step, values)
        found, self._pending = found + self._pending, []
        context = self._context(trainer, step)
        self._amp_streak = self.policy.next_amp_streak(found, context)
        nonfinite = any(d.kind == "nonfinite" for d in found)
        self._nonfinite_streak = self._nonfinite_streak + 1 if nonfinite else 0
        decision = self.policy.decide(found, context)
        if decision is not None and nonfinite and decision.plan == (Action.SKIP,) \
                and grad_scaler(trainer) is None:
            # a skip leaves the weights and moments as they are: it cannot cure a NaN in
            # them (one host read, on a non-finite step only)
            weights, state = nonfinite_state(pl_module, self._optimizers(trainer))
            if self._any_rank(trainer, bool(weights or any(state))):
                decision = self._cannot_skip(decision, context)
        if decision is not None and tripped is False and decision.skips_step \
                and Action.ROLLBACK not in decision.plan and grad_scaler(trainer) is None \
                and not all(math.isfinite(v) for v in values.values()):
            # read late, a non-finite update already reached the weights: a skip of the
            # next update would leave them so; only a rollback does what the skip meant
            kept = [a for a in decision.plan if a is not Action.SKIP]
            decision = replace(decision, plan=(Action.ROLLBACK, *kept))
        if decision is not None:
            self._carry_out(trainer, pl_module, decision, tripped=tripped, final=final)
        elif tripped:  # cannot happen: the same detectors set the tripwire from this state
            rank_zero_warn(f"DivergenceGuard: step {step} was skipped on the device but no "
                           f"detector fired on {values}")
        return decision

    @classmethod
    def _any_rank(cls, trainer: pl.Trainer, flag: bool) -> bool:
        """``flag`` on any rank (see :meth:`_any_ranks`)."""
        return cls._any_ranks(trainer, flag)[0]

    @staticmethod
    def _any_ranks(trainer: pl.Trainer, *flags: bool) -> list[bool]:
        """Each flag, true if it is true on any rank: one all-reduce and one host read.

        Weights and moments may be sharded, and a fault may hit one rank: every rank must
        take the decision any rank's state asks for, or the ranks would part ways. Only on
        a snapshot step or a trouble step.
        """
        if trainer.world_size <= 1 or not flags:
            return list(flags)
        marks = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
        total = trainer.strategy.reduce(marks, reduce_op="sum")
        return [bool(v > 0) for v in total.tolist()]

    def _context(self, trainer: pl.Trainer, step: int) -> DecisionContext:
        cut = self.cut_policy
        return DecisionContext(step=step, cuts_left=not cut.exhausted,
                               cooling_down=not cut.can_cut(step),
                               amp=grad_scaler(trainer) is not None,
                               amp_streak=self._amp_streak,
                               nonfinite_streak=self._nonfinite_streak)

    def _skip_on_device(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer,
                        skip: Tensor) -> None:
        exact = skip_on_device(optimizer, skip, exact=grad_scaler(trainer) is None)
        if exact:
            self._found_inf.append(optimizer)
        if self._staged is not None:
            self._staged.exact_skip = exact

    def _clear_device_skips(self) -> None:
        optimizers, self._found_inf = self._found_inf, []
        for opt in optimizers:
            clear_device_skip(opt)

    def _quiet(self, step: int) -> bool:
        """No event for long enough that the state after ``step`` may be snapshot."""
        return step - self._last_event_step > 2 * self.bank.divergence_patience

    def _carry_out(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                   decision: Decision, tripped: bool | None = None,
                   final: bool = False) -> None:
        optimizers = self._optimizers(trainer)
        lr_before = learning_rates(optimizers)
        reference = self.bank.recovery_reference()  # what the run reached, before a rollback
        # Read one step late, the step itself was skipped on the device or not at all.
        done: list[Action] = [Action.SKIP] if tripped else []
        notes: list[str] = []
        late_skip = False
        for action in decision.plan:
            if action is Action.SKIP and tripped is not None:
                if not tripped and not final:  # that optimizer's next update instead
                    late_skip = True
                    done.append(action)
                continue
            if action is Action.ROLLBACK:
                done += self._rollback(trainer, pl_module, decision, notes)
                if Action.STOP in done:
                    break  # nothing to restore and nothing to repair: the run ends here
            elif action is Action.CUT:  # the policy allowed it (a rollback always cuts)
                if self.cut_policy.cut(decision.step, self._optimizers(trainer),
                                       self._schedulers(trainer), ignore_cooldown=True):
                    done.append(Action.CUT)
            elif action is Action.STOP:
                self.stop_reason = decision.reason
                trainer.should_stop = True
                done.append(action)
            else:
                done.append(action)
        if Action.CUT in done:  # watch that the loss falls again; after a plain cut (same
            # weights, smaller steps) the detectors judge the new regime
            self.bank.after_cut(decision.step, rebase=decision.action is Action.CUT,
                                reference=reference)
        event = decision.event(
            done, lr_before=lr_before, lr_after=learning_rates(optimizers), lr_scale=self.lr_scale,
            epoch=trainer.current_epoch, run=self._run_name(trainer))
        if late_skip:
            notes.append("read one step late, so the optimizer's next update was skipped "
                         "instead")
        if notes:
            event = replace(event, message="; ".join([event.message, *notes]))
        self._record(trainer, event, decision.step)

    def _rollback(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                  decision: Decision, notes: list[str]) -> list[Action]:
        """Weights, moments and detectors go back; the LRs (with every cut) stay.

        To the newest snapshot taken before the trouble's first step that fits the model
        and optimizers (else the oldest that fits). Without one, a non-finite state is
        repaired where it can be: non-finite moments are reset; non-finite weights cannot
        be, and the run escalates. Returns what was done (``notes`` get the why).
        """
        optimizers = self._optimizers(trainer)
        onset = min(d.first_step for d in decision.detections)
        snapshot = None
        tries: tuple[tuple[int | None, Literal["newest", "oldest"]], ...] = (
            (onset, "newest"), (None, "oldest"))
        for before, which in tries:
            try:
                snapshot = self.snapshots.roll_back(pl_module, optimizers, which=which,
                                                    before=before)
            except LookupError:
                continue
            except ValueError as e:
                notes.append(f"no snapshot could be restored ({e})")
                break
            if before is None:
                notes.append(f"no snapshot predates the trouble (step {onset}): rolled back "
                             f"to the oldest, step {snapshot.step}")
            break
        if snapshot is not None:
            # The detectors' history goes back with the weights it describes.
            self.bank.load_state_dict(snapshot.extra.get("detectors", []))
            return [Action.ROLLBACK]
        if not len(self.snapshots):
            notes.append("no snapshot held")
        weights, state = nonfinite_state(pl_module, optimizers)
        if self._any_rank(trainer, bool(weights)):  # nothing healthy to go back to, and a
            # skip cannot cure it
            where = (", ".join(weights[:3]) + (", ..." if len(weights) > 3 else "")
                     if weights else "on another rank")
            notes.append(f"non-finite weights ({where}) cannot be repaired")
            if self.policy.escalate is Action.STOP:
                self.stop_reason = f"{decision.reason}; non-finite weights, nothing to restore"
                trainer.should_stop = True
                return [Action.SKIP, Action.STOP]
            return [Action.SKIP]
        # the union over ranks (a rank-local reset would part the ranks' moments)
        owned = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        poisoned = {id(p) for params in state for p in params}
        union = self._any_ranks(trainer, *(id(p) in poisoned for p in owned))
        bad = {id(p) for p, b in zip(owned, union, strict=True) if b}
        reset = sum(reset_state(opt, [p for g in opt.param_groups for p in g["params"]
                                      if id(p) in bad]) for opt in optimizers)
        if reset:
            notes.append(f"the optimizer state of {reset} parameter(s) was non-finite and "
                         "was reset")
            return [Action.RESET, Action.SKIP]
        return [Action.SKIP]

    def _record(self, trainer: pl.Trainer, event: GuardEvent, step: int) -> None:
        self.events.append(event)
        self.event_counts[event.kind] += 1
        if len(self.events) > 2 * _KEEP_EVENTS:
            del self.events[:-_KEEP_EVENTS]
        self._last_event_step = step
        dispatch(self.sinks, event)
        self._log_scalars(trainer, step)

    def _log_scalars(self, trainer: pl.Trainer, step: int) -> None:
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics({GUARD_LR_SCALE: self.lr_scale,
                                GUARD_EVENTS: float(self.event_total)}, step=step)

    # -- after the step ------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Feed recorded update statistics to their detectors; take healthy snapshots."""
        self.faults.call("after_step", self._after_step, trainer, pl_module)

    def _after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step - 1
        if self._decided_step != step:
            return  # no optimizer step happened on this batch (accumulation)
        names = optimizer_names(self._optimizers(trainer))
        while self._records:
            record = self._records.popleft()
            if record.optimizer in names:
                self._pending += self.bank.observe(names.index(record.optimizer), step, record)
        self._clear_device_skips()
        if not self._deferred_now and self._decision is None and self._quiet(step) \
                and self.bank.healthy():
            self.faults.call("snapshot", self._snapshot, trainer, pl_module, step + 1,
                             force=False)
        if (step + 1) % max(1, int(getattr(trainer, "log_every_n_steps", 50))) == 0:
            self._log_scalars(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Judge the last step's signals (deferred): a blow-up in it is still recorded."""
        self.faults.call("decide", self._judge_last, trainer, pl_module)

    def _judge_last(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        staged, self._staged = self._staged, None
        if staged is not None:
            values, tripped = _read(staged)
            self._judge(trainer, pl_module, staged.index, staged.step, values,
                        tripped=tripped, final=True)

    # -- trainer state -------------------------------------------------------------------
    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[torch.optim.Optimizer]:
        return [getattr(o, "optimizer", o) for o in trainer.optimizers]

    @staticmethod
    def _schedulers(trainer: pl.Trainer) -> list[Any]:
        return [c.scheduler for c in trainer.lr_scheduler_configs]

    def _optimizer_index(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
        return next((i for i, o in enumerate(self._optimizers(trainer)) if o is optimizer), 0)


    @staticmethod
    def _run_name(trainer: pl.Trainer) -> str | None:
        lg = trainer.logger
        if lg is None:
            return None
        return str(lg.name) if lg.version is None else f"{lg.name}/version_{lg.version}"

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Detectors (per optimizer), LR cut policy (scale, count, cooldown) and events.

        In-memory rollback snapshots are not saved: after a resume the first snapshot is
        taken again after ``snapshot_every_n_steps`` healthy steps. A step whose signals
        were not read yet (``deferred``) is saved with them and judged after the resume.
        """
        return {
            "detectors": self.bank.state_dict(),
            "cut_policy": self.cut_policy.state_dict(),
            "events": [e.to_dict() for e in self.events[-_KEEP_EVENTS:]],
            "event_counts": dict(self.event_counts),
            "last_event_step": self._last_event_step,
            "nonfinite_streak": self._nonfinite_streak,
            "state_rollbacks": self._state_rollbacks,
            "stop_reason": self.stop_reason,
            "staged": None if self._staged is None else self._staged.state_dict(),
            "sinks": checkpoint_sinks(self.sinks),  # where events.jsonl ends
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the LRs themselves come back with the optimizer."""
        self.bank.load_state_dict(state_dict.get("detectors", []))
        if "cut_policy" in state_dict:
            self.cut_policy.load_state_dict(state_dict["cut_policy"])
        self.events = [GuardEvent.from_dict(e) for e in state_dict.get("events", [])]
        saved = state_dict.get("event_counts")
        self.event_counts = Counter({str(k): int(v) for k, v in saved.items()}) \
            if isinstance(saved, dict) else Counter(e.kind for e in self.events)
        self._last_event_step = int(state_dict.get("last_event_step", -(10**9)))
        self._nonfinite_streak = int(state_dict.get("nonfinite_streak", 0))
        self._state_rollbacks = int(state_dict.get("state_rollbacks", 0))
        self.stop_reason = state_dict.get("stop_reason")
        staged = state_dict.get("staged")
        self._staged = None if not staged else StagedStep.from_state_dict(staged)
        # events.jsonl goes back to where this checkpoint left it: the steps after it are
        # decided again, and each decision is written once
        resume_sinks(self.sinks, state_dict.get("sinks"))
