"""DivergenceGuard: catch overshooting and divergence within a few steps, and act.

The guard watches, at every optimizer step, the training loss (from ``on_before_backward``,
averaged over gradient-accumulation micro-batches) and the global gradient norm (in
``on_before_optimizer_step``: after unscaling and accumulation, before clipping), and —
when a :class:`~lr_monitor.StepSizeMonitor` is attached — the recorded ``update_cosine``
and ``update_ratio``. Framework-free detectors (:mod:`lr_monitor.guard.detectors`) turn these
into :class:`~lr_monitor.Detection` s; a small policy maps each kind to an action, and the
action is carried out *before* the optimizer applies the step:

==============  ==========================  ==============================================
detector        default action              why
==============  ==========================  ==============================================
nonfinite       ``rollback``                NaN/inf already reached the loss or gradients:
                                            the state may be poisoned; restore and cut
spike           ``skip``                    one bad batch or one bad step; do not apply it
divergence      ``rollback``                the loss exploded (10× its starting level,
                                            from the second step on) or has given back its
                                            progress for many steps: restore, cut the LR
oscillation     ``cut``                     successive updates point back and forth
update_ratio    ``cut``                     steps are ~100× the usual size of the weights
==============  ==========================  ==============================================

Actions: ``"log"`` (record only), ``"skip"`` (drop this step's gradients: parameters and
moments stay bit-identical), ``"cut"`` (multiply every LR by ``lr_factor`` in a way that
survives LR schedulers), ``"rollback"`` (restore the older of the in-memory CPU snapshots
taken every ``snapshot_every_n_steps`` healthy steps, skip this step, then cut),
``"stop"`` (``trainer.should_stop``, reason recorded). When ``max_cuts`` is reached a cut
escalates to ``escalate`` (``"stop"`` by default).

Every decision becomes a :class:`~lr_monitor.GuardEvent` in :attr:`DivergenceGuard.events`,
goes to the alert sinks (a log line and ``events.jsonl`` in the logger's directory always;
TensorBoard text with a ``TensorBoardLogger``; whatever ``alerts=[...]`` adds), and to the
loggers as ``guard/lr_scale`` and ``guard/events``.

Distributed: the loss, gradient norm and non-finite flags are averaged across ranks in one
small all-reduce per step before any detector sees them, so every rank feeds identical
values to identical detectors and takes the same decision — a NaN on one rank is a NaN in
the average. No decision is ever taken on one rank alone.

Example::

    trainer = Trainer(callbacks=[StepSizeMonitor(), DivergenceGuard()])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from lr_monitor._validation import check_bool, check_choice, check_int, check_real, invalid
from lr_monitor.alerts import (
    AlertSink,
    TensorBoardSink,
    as_sink,
    close_sinks,
    dispatch,
    make_default_sinks,
)
from lr_monitor.callbacks._compat import is_tensorboard_logger, pl, rank_zero_warn, run_dir
from lr_monitor.events import Detection, GuardEvent
from lr_monitor.faults import FaultBarrier
from lr_monitor.guard.detectors import (
    Detector,
    DivergenceDetector,
    ExplosionDetector,
    NonFiniteDetector,
    OscillationDetector,
    SpikeDetector,
    UpdateRatioDetector,
)
from lr_monitor.guard.interventions import LRCut, RollbackBuffer, skip_step
from lr_monitor.tags import group_names, lr_key, optimizer_names

__all__ = ["ACTIONS", "DEFAULT_POLICY", "DivergenceGuard"]

#: Actions by severity: when several detectors fire at one step, the most severe wins.
ACTIONS = ("log", "skip", "cut", "rollback", "stop")
_SEVERITY = {a: i for i, a in enumerate(ACTIONS)}

#: Default action per detector kind.
DEFAULT_POLICY: dict[str, str] = {
    "nonfinite": "rollback",
    "spike": "skip",
    "divergence": "rollback",
    "oscillation": "cut",
    "update_ratio": "cut",
}


def _grad_scaler(trainer: pl.Trainer) -> Any:
    """The enabled fp16 ``GradScaler`` of the trainer's precision plugin, or ``None``."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    enabled = getattr(scaler, "is_enabled", None)
    return scaler if scaler is not None and callable(enabled) and enabled() else None


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
        lr_factor: Multiplier of every learning rate per cut, in (0, 1). The default 0.1
            (one decade): a too-high LR is typically off by an order of magnitude or more;
            in ``benchmarks/divergence_suite.py`` 0.3 recovered fewer runs and 0.03 helped
            only at 1000x the tuned LR.
        cooldown: Minimum optimizer steps between two ``cut`` actions (≥ 0). A rollback
            always cuts: the repeated blow-up is the evidence that the last cut was not
            enough.
        min_lr: No cut takes a learning rate below this (≥ 0).
        max_cuts: Cuts allowed before a further cut escalates (≥ 1).
        escalate: What a cut becomes once ``max_cuts`` is used up: ``"stop"`` or ``"log"``.
        snapshot_every_n_steps: Take an in-memory CPU snapshot (model, optimizers,
            schedulers) every n healthy steps for ``rollback`` (≥ 1).
        snapshot_keep: Snapshots held (≥ 1). A rollback restores the oldest, which is the
            one least likely to already contain the beginning of the blow-up.
        spike_window: Values in the spike detectors' robust baseline (median/MAD).
        spike_threshold: Robust z-score above which a value is a spike.
        explosion_factor: A loss this many times its level in the first steps is a
            divergence immediately, even during the detectors' warm-up (> 1). The
            benchmark's sensitivity sweep favours 4 (runs recovered within 10% of the tuned
            result at 10x/100x/1000x the LR: 93/87/89% against 91/69/64% with 10), but with
            small noisy batches a single batch loss can reach 4x the first one on a healthy
            run (seen with batch 8 on a regression), so the default stays at 10. Use 4 when
            batches are large; raise it when the loss legitimately starts far below its
            typical level (fine-tuning).
        divergence_patience: Steps the smoothed loss must stay above its bound.
        watch_grad_norm: Also watch the gradient norm (one ``foreach`` norm per step).
        amp_patience: With an fp16 ``GradScaler`` (``precision="16-mixed"`` on GPU),
            non-finite steps are the scaler's to handle (it skips them and lowers the
            scale); the guard acts only after this many in a row (≥ 1).
        alerts: Extra sinks (:mod:`lr_monitor.alerts`) or callables ``fn(event)``.
        log_events: Keep the log-line sink (the run's record; on by default).
        jsonl: Keep the ``events.jsonl`` sink (the run's record; on by default).
        events_dir: Where ``events.jsonl`` goes (default: the logger's ``log_dir``, else
            the trainer's ``default_root_dir``).
        name: Distinguishes two guards in one checkpoint (part of :attr:`state_key`).

    Raises:
        ValueError: for an argument outside its allowed values (the message names it).
    """

    def __init__(
        self,
        *,
        on_nonfinite: str = DEFAULT_POLICY["nonfinite"],
        on_spike: str = DEFAULT_POLICY["spike"],
        on_divergence: str = DEFAULT_POLICY["divergence"],
        on_oscillation: str = DEFAULT_POLICY["oscillation"],
        on_update_ratio: str = DEFAULT_POLICY["update_ratio"],
        lr_factor: float = 0.1,
        cooldown: int = 10,
        min_lr: float = 0.0,
        max_cuts: int = 6,
        escalate: str = "stop",
        snapshot_every_n_steps: int = 50,
        snapshot_keep: int = 2,
        spike_window: int = 100,
        spike_threshold: float = 8.0,
        explosion_factor: float = 10.0,
        divergence_patience: int = 20,
        watch_grad_norm: bool = True,
        amp_patience: int = 20,
        alerts: Sequence[AlertSink | Callable[[GuardEvent], object]] | None = None,
        log_events: bool = True,
        jsonl: bool = True,
        events_dir: str | Path | None = None,
        name: str = "",
    ) -> None:
        self.policy = {
            "nonfinite": check_choice("on_nonfinite", on_nonfinite, ACTIONS),
            "spike": check_choice("on_spike", on_spike, ACTIONS),
            "divergence": check_choice("on_divergence", on_divergence, ACTIONS),
            "oscillation": check_choice("on_oscillation", on_oscillation, ACTIONS),
            "update_ratio": check_choice("on_update_ratio", on_update_ratio, ACTIONS),
        }
        self.escalate = check_choice("escalate", escalate, ("stop", "log"))
        check_real("explosion_factor", explosion_factor, low=1.0)
        # Checked here under the names the user typed; LRCut and RollbackBuffer check
        # them again under their own names.
        check_real("lr_factor", lr_factor, low=0.0, high=1.0)
        check_int("cooldown", cooldown, 0)
        check_real("min_lr", min_lr, low=0.0, low_closed=True)
        check_int("max_cuts", max_cuts, 1)
        check_int("snapshot_every_n_steps", snapshot_every_n_steps, 1)
        check_int("snapshot_keep", snapshot_keep, 1)
        check_int("divergence_patience", divergence_patience, 1)
        check_int("spike_window", spike_window, 3)
        check_int("amp_patience", amp_patience, 1)
        check_real("spike_threshold", spike_threshold, low=0.0)
        check_bool("watch_grad_norm", watch_grad_norm)
        check_bool("log_events", log_events)
        check_bool("jsonl", jsonl)
        if not isinstance(name, str):
            raise invalid("name", name, "a string")
        if events_dir is not None and not isinstance(events_dir, (str, Path)):
            raise invalid("events_dir", events_dir, "None, a str or a pathlib.Path")
        self.cut_policy = LRCut(factor=lr_factor, cooldown=cooldown, min_lr=min_lr,
                                max_cuts=max_cuts)
        self.snapshots = RollbackBuffer(every_n_steps=snapshot_every_n_steps,
                                        keep=snapshot_keep)
        self.explosion_factor = float(explosion_factor)
        self.watch_grad_norm = bool(watch_grad_norm)
        self.spike_window = spike_window
        self.spike_threshold = float(spike_threshold)
        self.divergence_patience = divergence_patience
        # One stream of detectors per optimizer: in manual optimization with several
        # optimizers, each optimizer's losses and gradients are judged on their own.
        self.streams: list[dict[str, Detector]] = [self._make_detectors()]
        if alerts is not None and (isinstance(alerts, (str, bytes))
                                   or not isinstance(alerts, Iterable)):
            raise invalid("alerts", alerts, "None or a list of alert sinks or callables")
        for i, a in enumerate(alerts or []):
            if not (isinstance(a, AlertSink) or callable(a)):
                raise invalid(f"alerts[{i}]", a, "an AlertSink or a callable fn(event)")
        self.extra_sinks = [as_sink(a) for a in (alerts or [])]
        self.log_events = log_events
        self.jsonl = jsonl
        self.events_dir = None if events_dir is None else Path(events_dir)
        self.name = name
        self.events: list[GuardEvent] = []
        self.sinks: list[AlertSink] = []
        self.stop_reason: str | None = None
        # per-step signals
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._decided_step: int | None = None
        self._decision: str | None = None
        self._trainer: pl.Trainer | None = None
        self._pending: list[Detection] = []  # from monitor statistics, acted on next step
        self._last_event_step = -(10**9)
        self._consumed: dict[int, int] = {}
        self.amp_patience = amp_patience
        self._amp_nonfinite = 0
        self.faults = FaultBarrier("DivergenceGuard", report=self._report_fault,
                                   step=lambda: None if self._trainer is None
                                   else self._trainer.global_step)

    def _make_detectors(self) -> dict[str, Detector]:
        window = self.spike_window
        return {
            "nonfinite/loss": NonFiniteDetector("loss"),
            "nonfinite/grad_norm": NonFiniteDetector("grad_norm"),
            "explosion/loss": ExplosionDetector("loss", factor=self.explosion_factor),
            "spike/loss": SpikeDetector("loss", window=window, warmup=min(20, window),
                                        threshold=self.spike_threshold, min_rel_increase=1.0),
            "spike/grad_norm": SpikeDetector("grad_norm", window=window, warmup=min(20, window),
                                             threshold=self.spike_threshold,
                                             min_rel_increase=2.0),
            "divergence/loss": DivergenceDetector("loss", patience=self.divergence_patience,
                                                  warmup=20, progress=0.25),
            "oscillation/update_cosine": OscillationDetector("update_cosine"),
            "update_ratio/update_ratio": UpdateRatioDetector("update_ratio"),
        }

    @property
    def detectors(self) -> dict[str, Detector]:
        """The detectors of the first optimizer (see :attr:`streams` for the others)."""
        return self.streams[0]

    def _stream(self, index: int) -> dict[str, Detector]:
        while len(self.streams) <= index:
            self.streams.append(self._make_detectors())
        return self.streams[index]

    def _detector_states(self) -> list[dict[str, Any]]:
        return [{k: d.state_dict() for k, d in s.items()} for s in self.streams]

    def _load_detector_states(self, states: list[dict[str, Any]]) -> None:
        for i, state in enumerate(states):
            stream = self._stream(i)
            for key, st in state.items():
                if key in stream:
                    stream[key].load_state_dict(st)

    @property
    def state_key(self) -> str:
        """Key in the checkpoint's ``callbacks`` dict (set ``name`` to run two guards)."""
        return self._generate_state_key(name=self.name)

    @property
    def lr_scale(self) -> float:
        """The cumulative LR multiplier applied by this guard (1.0 = no cut)."""
        return self.cut_policy.scale

    # -- lifecycle -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Open the alert sinks (rank zero only sends anything)."""
        self._trainer = trainer
        if stage == "fit" and not self.sinks:
            self.faults.call("setup", self._open_sinks, trainer)

    def _report_fault(self, event: GuardEvent) -> None:
        """A fault of the guard itself goes to its sinks (the log line at least)."""
        dispatch(self.sinks or make_default_sinks(None), event)

    def _open_sinks(self, trainer: pl.Trainer) -> None:
        log_dir = self.events_dir if self.events_dir is not None else run_dir(trainer)
        def is_zero() -> bool:
            return trainer.is_global_zero
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
        """Flush and close the sinks (queued webhooks get a bounded time)."""
        if self.sinks:
            sinks, self.sinks = self.sinks, []
            self.faults.call("teardown", close_sinks, sinks, timeout=10.0)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Whatever was decided is already on disk; give queued alerts a chance to go out."""
        self.teardown(trainer, pl_module, "fit")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Snapshot the starting state: a blow-up in the first steps can be undone too."""
        if not len(self.snapshots):
            self.faults.call("snapshot", self._snapshot, trainer, pl_module, trainer.global_step)

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                  force: bool = True) -> None:
        take = self.snapshots.take if force else self.snapshots.maybe_take
        take(step, pl_module, self._optimizers(trainer),
             extra={"detectors": self._detector_states()})

    # -- signals -------------------------------------------------------------------------
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        """Accumulate the loss of each micro-batch (kept on the device)."""
        if trainer.training:
            self.faults.call("loss", self._add_loss, trainer, loss)

    def _add_loss(self, trainer: pl.Trainer, loss: torch.Tensor) -> None:
        value = loss.detach().float().reshape(())
        scaler = _grad_scaler(trainer)
        if scaler is not None:
            # fp16 AMP: Lightning hands callbacks the *scaled* loss; divide the scale back
            # out on the device (the scale changes as the scaler calibrates).
            scale = getattr(scaler, "_scale", None)
            value = value / (scale.to(value.device).reshape(()) if isinstance(
                scale, torch.Tensor) else float(scaler.get_scale()))
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Decide (once per optimizer step) and act before the optimizer applies the step."""
        opt = getattr(optimizer, "optimizer", optimizer)
        step = trainer.global_step
        if self._decided_step != step:
            self._decided_step = step
            self._decision = self.faults.call("decide", self._decide, trainer, pl_module,
                                              step, opt)
        if self._decision in ("skip", "rollback", "stop"):
            self.faults.call("skip", skip_step, opt)

    def _optimizer_index(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
        for i, o in enumerate(self._optimizers(trainer)):
            if o is optimizer:
                return i
        return 0

    def _signals(self, trainer: pl.Trainer,
                 optimizer: torch.optim.Optimizer) -> tuple[float | None, float]:
        """Loss and gradient norm, averaged across ranks: one reduce, one host transfer.

        The loss is ``None`` when no backward pass happened since the last decision.
        """
        has_loss = self._loss_sum is not None and self._loss_count > 0
        # No backward since the last decision (e.g. a second optimizer stepping on the same
        # backward pass): there is no new loss to judge, only gradients.
        loss = (self._loss_sum / self._loss_count if self._loss_sum is not None and has_loss
                else torch.zeros(()))
        self._loss_sum, self._loss_count = None, 0
        device = loss.device
        parts = [loss.to(torch.float64)]
        if self.watch_grad_norm:
            grads = [p.grad for grp in optimizer.param_groups for p in grp["params"]
                     if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)  # type: ignore[arg-type]
                gsq = torch.stack(norms).double().square().sum().to(device)
            else:
                gsq = torch.zeros((), dtype=torch.float64, device=device)
            parts.append(gsq)
        vec = torch.stack(parts)
        if trainer.world_size > 1:
            vec = trainer.strategy.reduce(vec, reduce_op="mean")
        values = vec.tolist()
        gnorm = math.sqrt(values[1]) if self.watch_grad_norm and values[1] >= 0 else math.nan
        if self.watch_grad_norm and not math.isfinite(values[1]):
            gnorm = values[1]  # keep nan/inf visible
        return (values[0] if has_loss else None), gnorm

    def _detect(self, d: dict[str, Detector], step: int, loss: float | None,
                gnorm: float) -> list[Detection]:
        """Run the detectors in order; a non-finite value or an explosion ends the round."""
        on_loss = loss is not None
        on_grad = self.watch_grad_norm
        rounds = (
            ["nonfinite/loss"] * on_loss + ["nonfinite/grad_norm"] * on_grad,
            ["explosion/loss"] * on_loss,
            ["spike/loss", "divergence/loss"] * on_loss + ["spike/grad_norm"] * on_grad,
        )
        for keys in rounds:
            out = []
            for key in keys:
                value = gnorm if key.endswith("grad_norm") else loss
                assert value is not None
                hit = d[key].update(step, value)
                if hit:
                    out.append(hit)
            if out:
                return out
        return []

    # -- decisions -----------------------------------------------------------------------
    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                optimizer: torch.optim.Optimizer) -> str | None:
        index = self._optimizer_index(trainer, optimizer)
        loss, gnorm = self._signals(trainer, optimizer)
        found = self._detect(self._stream(index), step, loss, gnorm) + self._pending
        self._pending = []
        if found and _grad_scaler(trainer) is not None and all(
                d.kind == "nonfinite" for d in found):
            # fp16 AMP: overflowing steps are the GradScaler's business (it skips them and
            # lowers the scale). Only a run of them longer than its calibration is ours.
            self._amp_nonfinite += 1
            if self._amp_nonfinite < self.amp_patience:
                return None
            self._amp_nonfinite = 0
        else:
            self._amp_nonfinite = 0
        if not found:
            return None
        actions = [self.policy[det.kind] for det in found]
        worst = max(range(len(found)), key=lambda i: _SEVERITY[actions[i]])
        return self._act(trainer, pl_module, step, found[worst], actions[worst], found)

    def _optimizers(self, trainer: pl.Trainer) -> list[torch.optim.Optimizer]:
        return [getattr(o, "optimizer", o) for o in trainer.optimizers]

    def _schedulers(self, trainer: pl.Trainer) -> list[Any]:
        return [c.scheduler for c in trainer.lr_scheduler_configs]

    def _lrs(self, trainer: pl.Trainer) -> dict[str, float]:
        opts = self._optimizers(trainer)
        out = {}
        for opt, oname in zip(opts, optimizer_names(opts), strict=True):
            for gname, g in zip(group_names(opt.param_groups), opt.param_groups, strict=True):
                out[lr_key(oname, gname)] = float(g["lr"])
        return out

    def _act(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
             det: Detection, action: str, found: list[Detection]) -> str:
        lr_before = self._lrs(trainer)
        done: list[str] = []
        cp = self.cut_policy
        if action in ("cut", "rollback") and cp.max_cuts is not None \
                and cp.num_cuts >= cp.max_cuts:
            action = self.escalate  # every cut used up
        elif action == "cut" and not cp.can_cut(step):
            action = "log"  # cooling down after the previous cut
        if action == "rollback":
            if self._rollback(trainer, pl_module):
                done.append("rollback")
            else:
                done.append("skip")  # nothing healthy to go back to yet
            self._cut(trainer, step, done, ignore_cooldown=True)
        elif action == "cut":
            self._cut(trainer, step, done)
            for stream in self.streams:
                div = stream["divergence/loss"]
                if isinstance(div, DivergenceDetector):
                    div.rebase()
        elif action == "skip":
            done.append("skip")
        elif action == "stop":
            done.append("skip")
            done.append("stop")
            self.stop_reason = f"step {step}: {det.kind} on {det.signal} ({det.message})"
            trainer.should_stop = True
        if action == "log" or not done:
            done.append("log")
        self._record(trainer, det, tuple(done), lr_before, step, found)
        return action

    def _cut(self, trainer: pl.Trainer, step: int, done: list[str],
             ignore_cooldown: bool = False) -> None:
        if self.cut_policy.cut(step, self._optimizers(trainer), self._schedulers(trainer),
                               ignore_cooldown=ignore_cooldown):
            done.append("cut_lr")

    def _rollback(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Restore weights, optimizer state and detectors; keep the LR schedule where it is.

        The trainer's step count goes on (the data is not replayed), so the schedulers and
        the param groups' hyper-parameters (lr with every cut so far, momentum, ...) stay
        as they are now; only the weights and the optimizer's per-parameter state go back.
        """
        if not len(self.snapshots):
            return False
        opts = self._optimizers(trainer)
        hyper = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
                 for o in opts]
        try:
            restored = self.snapshots.restore(pl_module, opts)
        except (LookupError, ValueError) as e:
            rank_zero_warn(f"DivergenceGuard: rollback failed ({e}); skipping the step instead")
            return False
        for o, groups in zip(opts, hyper, strict=True):
            for g, h in zip(o.param_groups, groups, strict=True):
                g.update(h)
        extra = next((s.extra for s in self.snapshots.snapshots if s.step == restored), {})
        # The detectors go back with the weights: their history matches the restored model.
        self._load_detector_states(extra.get("detectors", []))
        for p in pl_module.parameters():
            p.grad = None
        return True

    def _record(self, trainer: pl.Trainer, det: Detection, actions: tuple[str, ...],
                lr_before: dict[str, float], step: int, found: list[Detection]) -> None:
        others = [f"{d.kind}/{d.signal}" for d in found if d is not det]
        message = det.message + (f" (also: {', '.join(others)})" if others else "")
        logger = trainer.logger
        run = None
        if logger is not None:
            run = f"{logger.name}/version_{logger.version}" if logger.version is not None \
                else str(logger.name)
        event = GuardEvent.from_detection(
            Detection(step=det.step, kind=det.kind, signal=det.signal, value=det.value,
                      threshold=det.threshold, message=message),
            actions=actions, lr_before=lr_before, lr_after=self._lrs(trainer),
            lr_scale=self.lr_scale, epoch=trainer.current_epoch, run=run,
        )
        self.events.append(event)
        self._last_event_step = step
        dispatch(self.sinks, event)
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics({"guard/lr_scale": self.lr_scale,
                                "guard/events": float(len(self.events))}, step=step)

    # -- after the step ------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Feed recorded update statistics to their detectors; take healthy snapshots."""
        self.faults.call("after_step", self._after_step, trainer, pl_module)

    def _after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step - 1
        if self._decided_step != step:
            return  # no optimizer step happened on this batch (accumulation)
        self._watch_monitor(trainer, step)
        healthy = self._decision is None and \
            step - self._last_event_step > 2 * self.divergence_patience
        for stream in self.streams:
            div = stream["divergence/loss"]
            if isinstance(div, DivergenceDetector):
                bound, smoothed = div.bound(), div.smoothed
                if bound is not None and smoothed is not None and smoothed > bound:
                    healthy = False  # climbing towards a divergence: not a state to return to
        if healthy:
            self.faults.call("snapshot", self._snapshot, trainer, pl_module, step + 1,
                             force=False)
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        if trainer.is_global_zero and (step + 1) % every == 0:
            for lg in trainer.loggers:
                lg.log_metrics({"guard/lr_scale": self.lr_scale,
                                "guard/events": float(len(self.events))}, step=step)

    def _watch_monitor(self, trainer: pl.Trainer, step: int) -> None:
        from lr_monitor.callbacks.monitor import StepSizeMonitor

        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if not isinstance(cb, StepSizeMonitor):
                continue
            for rec in cb.recorders:
                stream = self._stream(self._optimizer_index(trainer, rec.optimizer))
                if rec.last_recorded_index is None or \
                        self._consumed.get(id(rec)) == rec.last_recorded_index:
                    continue
                self._consumed[id(rec)] = rec.last_recorded_index
                m = rec.last_metrics
                for stat, key in (("update_cosine", "oscillation/update_cosine"),
                                  ("update_ratio", "update_ratio/update_ratio")):
                    v = m.get(f"{cb.prefix}/{stat}/{rec.name}/global")
                    if v is not None:
                        hit = stream[key].update(step, v)
                        if hit:
                            self._pending.append(hit)

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Detectors (per optimizer), LR cut policy (scale, count, cooldown) and events.

        In-memory rollback snapshots are not saved: after a resume the first snapshot is
        taken again after ``snapshot_every_n_steps`` healthy steps.
        """
        return {
            "detectors": self._detector_states(),
            "cut_policy": self.cut_policy.state_dict(),
            "events": [e.to_dict() for e in self.events[-1000:]],
            "last_event_step": self._last_event_step,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the LRs themselves come back with the optimizer."""
        self._load_detector_states(state_dict.get("detectors", []))
        if "cut_policy" in state_dict:
            self.cut_policy.load_state_dict(state_dict["cut_policy"])
        self.events = [GuardEvent.from_dict(e) for e in state_dict.get("events", [])]
        self._last_event_step = int(state_dict.get("last_event_step", -(10**9)))
        self.stop_reason = state_dict.get("stop_reason")

