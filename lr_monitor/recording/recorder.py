"""Framework-free recording of optimizer steps: the engine behind :class:`StepSizeMonitor`.

A :class:`StepRecorder` watches one optimizer through torch's step hooks
(``register_step_pre_hook``/``register_step_post_hook``): on the steps you ask it to
record it measures the gradients, reconstructs the step from the post-step state
(:mod:`lr_monitor.functional`) and publishes one
:class:`~lr_monitor.recording.record.StepRecord` to its listeners, with exactly one
device-to-host transfer. On other steps the hooks return at once, or, with
``consecutive=True``, only feed the consecutive-step statistics
(:mod:`lr_monitor.recording.consecutive`: a few device operations on a fixed subsample,
nothing read back). What is measured and which rows become tags is one
:class:`~lr_monitor.recording.config.RecorderConfig`.

:func:`attach` is the same thing for plain PyTorch loops and Fabric::

    writer = torch.utils.tensorboard.SummaryWriter("runs/exp1")
    handle = lr_monitor.attach(optimizer, writer, every_n_steps=50)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    handle.detach()

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(3))
    >>> opt = torch.optim.Adam([p], lr=0.1)
    >>> seen = []
    >>> handle = attach(opt, lambda metrics, step: seen.append((step, metrics)))
    >>> records = []
    >>> handle.subscribe(records.append)
    >>> p.grad = torch.ones(3); opt.step()
    >>> step, metrics = seen[0]
    >>> step, round(metrics["optim/update_norm/Adam/pg0"], 4)
    (0, 0.1732)
    >>> records[0].index, round(records[0].value("update_ratio"), 4)  # 0.1 / 0.9
    (0, 0.1111)
    >>> handle.detach()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lr_monitor._validation import check_int, invalid
from lr_monitor.faults import FaultBarrier
from lr_monitor.functional import ParamSnapshot, find_rule
from lr_monitor.functional.fused import MomentStep, moment_group
from lr_monitor.functional.rules import (
    ParamStep,
    is_low_precision,
    iter_group_steps,
    supports_group,
)
from lr_monitor.functional.statistics import (
    StepSums,
    grad_values,
    is_dtensor,
    rounded_away,
    step_sums,
    summarize,
    tensor_norms,
)
from lr_monitor.functional.step import applied_update, with_applied_update
from lr_monitor.recording.compiler import MomentKernels
from lr_monitor.recording.config import GRANULARITIES, RecorderConfig
from lr_monitor.recording.consecutive import TOTALS, ConsecutiveTracker, consecutive_statistics
from lr_monitor.recording.history import UpdateHistory
from lr_monitor.recording.record import Listeners, RecordListener, StepRecord
from lr_monitor.tags import DEFAULT_PREFIX, GLOBAL, group_names

__all__ = [
    "GRANULARITIES",
    "MonitorHandle",
    "ScalarWriter",
    "StepRecorder",
    "attach",
]


class ScalarWriter(Protocol):
    """Anything with TensorBoard's ``add_scalar(tag, value, global_step)``."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = ...) -> Any:
        """Write one scalar."""


class StepRecorder:
    """Records the steps of one optimizer on chosen steps, through torch's step hooks.

    How each parameter's update is known, per recorded step:

    * *exact*: the optimizer has a rule for the group's settings
      (:func:`~lr_monitor.functional.rules.supports_group`): reconstructed from the
      post-step state, no copy. Elements whose update was too small to change the
      parameter are predicted from the rounding of ``θ − Δ`` (``update_lost_frac``).
    * *applied*: bf16/fp16 parameters: torch rounds the update into the parameter's
      dtype, so the rule's update is not what happened. A copy of those parameters
      (2 bytes per element) is taken before the step and the applied update is
      ``θ_after − θ_before``; ``update_lost_frac`` counts the elements whose non-zero
      update was rounded away.
    * *measured*: no rule (or a setting the rule cannot reconstruct): every parameter of
      the group is copied before the step and ``eff_lr`` is the group's lr.

    With ``consecutive=True``, at every step (recorded or not) a
    :class:`~lr_monitor.recording.consecutive.ConsecutiveTracker` adds the step's
    cos(Δ_t, Δ_{t−1}), cos(g_t, Δ_{t−1}) and [g_t·Δ_{t−1} > 0] to running sums on the
    device; a recorded step publishes their means since the previous record in the
    ``global`` row.

    After each recorded step the recorder builds one
    :class:`~lr_monitor.recording.record.StepRecord` (every row, ``global`` included),
    keeps it as :attr:`last_record` and calls each listener with it, in the order they
    subscribed.

    Nothing here can end the run: every hook and every listener runs behind a
    :class:`~lr_monitor.faults.FaultBarrier`. A parameter whose statistics raise is
    reported once and left out of later records; a failure that cannot be pinned on a
    parameter disables this recorder; a listener that raises is reported once and not
    called again.

    Args:
        optimizer: The optimizer to watch.
        name: Its name in the tags (``Adam``, ``Adam-1``).
        should_record: Called before each step with this optimizer's step index (the
            number of its steps so far); ``True`` records the step.
        listeners: Called with each :class:`StepRecord` (see :meth:`subscribe`).
        prefix: See :class:`~lr_monitor.recording.config.RecorderConfig`.
        granularity: See :class:`~lr_monitor.recording.config.RecorderConfig`.
        param_names: Parameter → name, for tensor rows, ``include``/``exclude`` and fault
            reports.
        include: See :class:`~lr_monitor.recording.config.RecorderConfig`.
        exclude: See :class:`~lr_monitor.recording.config.RecorderConfig`.
        update_cosine: See :class:`~lr_monitor.recording.config.RecorderConfig`.
        cosine_samples: See :class:`~lr_monitor.recording.config.RecorderConfig`.
        consecutive: See :class:`~lr_monitor.recording.config.RecorderConfig`.
        consecutive_tensors: See :class:`~lr_monitor.recording.config.RecorderConfig`.
        log_global: See :class:`~lr_monitor.recording.config.RecorderConfig`.
        statistics: See :class:`~lr_monitor.recording.config.RecorderConfig`.
        reduce: Applied to the device sums before the host transfer; for sharded
            parameters pass ``lambda sums: sums.all_reduce()`` (every rank must record).
            With it, the sums count each element on one rank only
            (``step_sums(across_ranks=True)``).
        faults: The barrier the hooks run behind (default: one that only logs).

    Raises:
        ValueError: for a recording option outside its allowed values
            (:class:`~lr_monitor.recording.config.RecorderConfig`) or a listener that is
            not callable.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        *,
        should_record: Callable[[int], bool],
        listeners: Iterable[RecordListener] = (),
        prefix: str = DEFAULT_PREFIX,
        granularity: str = "group",
        param_names: Mapping[Tensor, str] | None = None,
        include: str | None = None,
        exclude: str | None = None,
        update_cosine: bool = True,
        cosine_samples: int = 4096,
        consecutive: bool = False,
        consecutive_tensors: int = 64,
        log_global: bool = True,
        statistics: str = "auto",
        reduce: Callable[[StepSums], None] | None = None,
        faults: FaultBarrier | None = None,
    ) -> None:
        self.config = RecorderConfig(prefix=prefix, granularity=granularity, include=include,
                                     exclude=exclude, update_cosine=update_cosine,
                                     cosine_samples=cosine_samples, consecutive=consecutive,
                                     consecutive_tensors=consecutive_tensors,
                                     log_global=log_global, statistics=statistics)
        #: The kernel of Adam/AdamW groups (compiled or eager).
        self.kernels = MomentKernels(statistics)
        self.optimizer = optimizer
        self.name = name
        self.should_record = should_record
        self.listeners = Listeners(listeners)
        self.param_names = dict(param_names or {})
        self.history = UpdateHistory(cosine_samples) if update_cosine else None
        #: The every-step consecutive statistics (``None`` with ``consecutive=False``).
        self.consecutive = ConsecutiveTracker(
            optimizer, samples_per_tensor=cosine_samples, max_tensors=consecutive_tensors,
        ) if consecutive else None
        self.reduce = reduce
        self.faults = faults or FaultBarrier(f"StepRecorder({name})")
        self.exact = find_rule(optimizer) is not None
        self._recording = False
        self._snapshot = ParamSnapshot(optimizer)
        self._before: dict[Tensor, Tensor] = {}
        self._excluded: set[int] = set()
        self._grad_sq: dict[Tensor, Tensor] | None = None
        self._handles: list[RemovableHandle] = []
        self.step_index = 0
        #: The record of the last recorded step (``None`` before the first).
        self.last_record: StepRecord | None = None

    # -- listeners -----------------------------------------------------------------------
    def subscribe(self, listener: RecordListener) -> None:
        """Call ``listener(record)`` after every recorded step (once, however often added).

        Args:
            listener: A callable taking a :class:`StepRecord`; what it returns is ignored.

        Raises:
            ValueError: if ``listener`` is not callable.

        Example:
            >>> p = torch.nn.Parameter(torch.ones(1))
            >>> opt = torch.optim.SGD([p], lr=0.1)
            >>> rec = StepRecorder(opt, "SGD", should_record=lambda index: True)
            >>> seen = []
            >>> rec.subscribe(seen.append); rec.subscribe(seen.append); rec.attach()
            >>> p.grad = torch.ones(1); opt.step(); rec.detach()
            >>> len(seen), seen[0].optimizer, seen[0].index
            (1, 'SGD', 0)
        """
        self.listeners.subscribe(listener)

    def unsubscribe(self, listener: RecordListener) -> None:
        """Stop calling ``listener`` (nothing happens if it was not subscribed).

        Args:
            listener: A listener given to :meth:`subscribe`.
        """
        self.listeners.unsubscribe(listener)

    # -- hooks ---------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the step hooks (idempotent)."""
        if self._handles:
            return
        self._handles = [
            self.optimizer.register_step_pre_hook(self._pre_hook),
            self.optimizer.register_step_post_hook(self._post_hook),
        ]

    def detach(self) -> None:
        """Remove the step hooks and drop held tensors."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._grad_sq = None
        self._before = {}
        if self.history is not None:
            self.history.clear()
        if self.consecutive is not None:
            self.consecutive.clear()

    @property
    def disabled(self) -> bool:
        """Whether a fault has switched this recorder off."""
        return self.faults.disabled("record", self.name)

    def capture_gradients(self) -> bool:
        """Measure gradient norms now (before clipping), if this step will be recorded.

        Lightning calls this from ``on_before_optimizer_step``; in a plain loop, call it
        before ``clip_grad_norm_`` to record unclipped norms (otherwise they are taken after
        the step from the gradient the optimizer used, i.e. after clipping). Sparse
        gradients are measured by their coalesced values.

        Also gathers the gradient's sample for the consecutive-step statistics, on every
        step.

        Returns:
            Whether the coming step will be recorded.
        """
        if self.consecutive is not None and not self.disabled:
            self.faults.call("consecutive", self.consecutive.capture_gradients,
                             subject=self.name)
        due = not self.disabled and bool(self.should_record(self.step_index))
        if not due:
            self._grad_sq = None
            return False
        self._grad_sq = self.faults.call("capture_gradients", self._grad_norms,
                                         subject=self.name)
        return True

    def _grad_norms(self) -> dict[Tensor, Tensor]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None and id(p) not in self._excluded]
        if not params:
            return {}
        norms = tensor_norms([g if type(g) is Tensor and g.layout == torch.strided  # plain:
                              else grad_values(g)  # itself; DTensor, sparse: their values
                              for g in (p.grad for p in params)])  # type: ignore[misc]
        return dict(zip(params, norms.square().unbind(), strict=True))

    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._recording = False
        if self.consecutive is not None and not self.disabled:
            # With a closure (Lightning) the gradient is computed inside step(). ``args``
            # starts with the optimizer itself.
            closure = (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None
            self.faults.call("consecutive", self.consecutive.before_step, closure=closure,
                             subject=self.name)
        self.faults.call("record", self._before_step, subject=self.name)

    def _before_step(self) -> None:
        if not self.should_record(self.step_index):
            return
        self._recording = True
        # Copies: every parameter of a group without an exact rule; bf16/fp16 parameters
        # of the others (their applied update differs from the rule's by rounding).
        self._snapshot.take([p for g in self.optimizer.param_groups for p in g["params"]
                             if self._measured(g) or is_low_precision(p)])

    def _measured(self, group: dict[str, Any]) -> bool:
        """Whether ``group``'s steps are measured from copies (no exact rule for it)."""
        return not (self.exact and supports_group(self.optimizer, group))

    def _post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step_index += 1
        if self.consecutive is not None and not self.disabled:
            self.faults.call("consecutive", self.consecutive.after_step,
                             full_check=self._recording, subject=self.name)
        if not self._recording:
            return
        self._recording = False
        self._before = self._snapshot.pop() if self._snapshot.taken else {}
        try:
            record = self.faults.call("record", self._record, subject=self.name)
        finally:
            self._before = {}
            self._grad_sq = None
        if record is not None:
            self.listeners.publish(record, self.faults, self.name)

    def _record(self) -> StepRecord:
        saved = self.history.checkpoint() if self.history is not None else None
        try:
            record = self.measure()
        except Exception:
            # Pin the failure on the parameters that cause it, leave them out from now
            # on and measure the rest; if no parameter alone fails, the barrier disables
            # the recorder.
            culprits = self._faulty_params(self._grad_sq)
            if not culprits:
                raise
            for p, exc in culprits:
                self._excluded.add(id(p))
                pname = self.param_names.get(p, f"tensor of shape {tuple(p.shape)}")
                self.faults.fail("statistics", exc, subject=f"{self.name} {pname}")
            if self.history is not None and saved is not None:
                self.history.restore(saved)
            record = self.measure()
        if self.consecutive is not None:
            self.consecutive.reset_totals()
        self.last_record = record
        return record

    def _faulty_params(self, grad_sq: dict[Tensor, Tensor] | None
                       ) -> list[tuple[Tensor, Exception]]:
        out = []
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p.grad is None or id(p) in self._excluded:
                    continue
                try:
                    sums = step_sums([self._group_steps(g, [p])], grad_sq=grad_sq,
                                     kernel=self.kernels)
                    summarize(sums.to_host())
                except Exception as exc:
                    out.append((p, exc))
        return out

    # -- measurement ---------------------------------------------------------------------
    def _tensor_row(self, p: Tensor) -> bool:
        return self.config.tensor_row(self.param_names.get(p))

    def _group_steps(self, group: dict[str, Any],
                     params: list[Tensor] | None = None) -> Iterator[ParamStep | MomentStep]:
        """The steps of ``params`` (default: the group's, minus excluded ones), lazily.

        Adam/AdamW groups that qualify (:func:`~lr_monitor.functional.fused.moment_group`)
        give :class:`MomentStep` items, read from the optimizer state in one pass.
        """
        if params is None:
            params = [p for p in group["params"] if id(p) not in self._excluded]
        if self._measured(group):
            yield from self._measured_steps(group, params)
            return
        moments = moment_group(self.optimizer, {**group, "params": params})
        if moments is not None:
            yield from moments.steps()
            return
        for s in iter_group_steps(self.optimizer, {**group, "params": params}):
            before = self._before.get(s.param)
            if before is not None:
                yield with_applied_update(s, before)
            else:
                yield replace(s, update_lost=rounded_away(s.param, s.update))

    def _measured_steps(self, group: dict[str, Any], params: list[Tensor]
                        ) -> Iterator[ParamStep]:
        lr = group["lr"]
        for p in params:
            before = self._before.get(p)
            if before is None or p.grad is None:
                continue
            u = applied_update(p.detach(), before)
            eff = lr.detach().reshape(()).to(u) if isinstance(lr, Tensor) else torch.tensor(
                float(lr), dtype=u.dtype, device=u.device)
            yield ParamStep(param=p, grad=p.grad, update=u, eff_lr=eff, direction=-u / eff)

    def measure(self) -> StepRecord:
        """The statistics of the step just taken, as a record; one host transfer.

        Uses the gradient norms of :meth:`capture_gradients` when they were taken for this
        step, else the gradients as the optimizer left them. The consecutive-step sums
        since the previous record ride along in the same transfer (they are reset by the
        hooks after a record, not here). The hooks call this on recorded steps; calling it
        directly (e.g. to time it) records nothing.

        Returns:
            The record, indexed as the step just taken (``step_index - 1``).

        Raises:
            UnsupportedOptimizerError: if a group has no rule and no copy was taken.
        """
        groups = self.optimizer.param_groups
        lrs = [g["lr"] for g in groups]
        tensor_rows = self._tensor_row if self.config.granularity == "tensor" else None
        consecutive = self._consecutive_totals()
        sums = step_sums([self._group_steps(g) for g in groups], history=self.history,
                         grad_sq=self._grad_sq, tensor_rows=tensor_rows,
                         extra=[*lrs, *consecutive], across_ranks=self.reduce is not None,
                         kernel=self.kernels)
        tensor_params = sums.tensor_params
        if self.reduce is not None:
            self.reduce(sums)
        host = sums.to_host()
        summaries = summarize(host)
        names = group_names(groups)
        lr_values = [float(x) for x in host.extra[: len(lrs)]]
        rows: dict[str, dict[str, float]] = {}
        # summaries: the group rows, then the tensor rows.
        for gname, lr, row in zip(names, lr_values, summaries, strict=False):
            rows[gname] = {"lr": lr, **row}
        for p, row in zip(tensor_params, summaries[len(names):], strict=True):
            rows[self.param_names[p]] = row
        # All groups together: one combine of the host sums. Its lr only when they agree.
        glob = summarize(host.combine(range(len(names))))[0]
        rows[GLOBAL] = {"lr": lr_values[0], **glob} if len(set(lr_values)) == 1 else glob
        if consecutive:
            n = len(lrs)
            rows[GLOBAL].update(consecutive_statistics(host.extra[n:n + len(TOTALS)]))
        return StepRecord(optimizer=self.name, index=self.step_index - 1, rows=rows,
                          groups=tuple(names), host=host)


    def _consecutive_totals(self) -> list[Tensor]:
        """The consecutive-step sums as 0-d device tensors (none when off or faulted)."""
        if self.consecutive is None:
            return []
        totals = self.faults.call("consecutive", self.consecutive.totals, subject=self.name)
        return [] if totals is None else list(totals.unbind())


class MonitorHandle:
    """What :func:`attach` returns: call :meth:`detach` to stop recording.

    Args:
        recorder: The recorder :func:`attach` set up.
    """

    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder

    @property
    def latest(self) -> dict[str, float]:
        """The metrics of the last recorded step, as written (``{}`` before the first)."""
        record = self.recorder.last_record
        return {} if record is None else self.recorder.config.metrics(record)

    def subscribe(self, listener: RecordListener) -> None:
        """Also call ``listener(record)`` with every record (:meth:`StepRecorder.subscribe`).

        Args:
            listener: A callable taking a :class:`StepRecord`.

        Raises:
            ValueError: if ``listener`` is not callable.
        """
        self.recorder.subscribe(listener)

    def unsubscribe(self, listener: RecordListener) -> None:
        """Stop calling ``listener`` (:meth:`StepRecorder.unsubscribe`).

        Args:
            listener: A listener given to :meth:`subscribe`.
        """
        self.recorder.unsubscribe(listener)

    def capture_gradients(self) -> None:
        """Measure gradient norms now, before clipping (see ``StepRecorder``)."""
        self.recorder.capture_gradients()

    def detach(self) -> None:
        """Remove the hooks; the optimizer is left as it was."""
        self.recorder.detach()


def attach(
    optimizer: torch.optim.Optimizer,
    writer: ScalarWriter | Callable[[dict[str, float], int], Any],
    *,
    every_n_steps: int = 1,
    name: str | None = None,
    model: torch.nn.Module | None = None,
    **recorder_kwargs: Any,
) -> MonitorHandle:
    """Record an optimizer's step sizes without Lightning (raw loops, Fabric).

    Fabric's optimizer wrapper (what ``fabric.setup`` returns) is unwrapped: the
    statistics and the tags are those of the optimizer inside (``Adam``, not
    ``FabricAdam``, whose class has no exact rule). With sharded parameters (DTensor:
    FSDP2's ``fully_shard``, tensor parallelism) under ``torch.distributed``, the sums are
    combined across ranks (``reduce=lambda sums: sums.all_reduce()``, each element counted
    on one rank): call ``attach`` on every rank with the same ``every_n_steps``; every
    rank's writer then gets the same values.

    Args:
        optimizer: The optimizer to watch.
        writer: A ``SummaryWriter`` (anything with ``add_scalar``) or a callable
            ``fn(metrics, step)``; ``step`` is the optimizer's own step index.
        every_n_steps: Record every n-th ``optimizer.step()`` (the first step is recorded).
        name: Optimizer name in the tags (default: its class name).
        model: Gives parameter names, needed for ``granularity="tensor"``; a wrapper
            whose ``module`` holds the same parameters (Fabric's, DDP) gives the names in
            the wrapped module.
        **recorder_kwargs: Passed to :class:`StepRecorder`: the recording options of
            :class:`~lr_monitor.recording.config.RecorderConfig` (``prefix``,
            ``granularity``, ``include``, ``exclude``, ``update_cosine``,
            ``cosine_samples``, ``consecutive``, ``consecutive_tensors``, ``log_global``,
            ``statistics``),
            ``listeners`` and ``reduce``.

    Returns:
        A :class:`MonitorHandle`.

    Raises:
        ValueError: for a bad ``every_n_steps`` or recorder argument.
        TypeError: if ``writer`` is neither callable nor has ``add_scalar``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise invalid("optimizer", optimizer, "a torch.optim.Optimizer")
    inner = getattr(optimizer, "_optimizer", None)  # Fabric's wrapper (a subclass made on
    if isinstance(inner, torch.optim.Optimizer):    # the fly) steps the optimizer inside
        optimizer = inner
    check_int("every_n_steps", every_n_steps, 1)
    if name is not None and (not isinstance(name, str) or not name):
        raise invalid("name", name, "None or a non-empty string")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise invalid("model", model, "None or a torch.nn.Module")
    if hasattr(writer, "add_scalar"):
        sw = writer

        def emit(metrics: dict[str, float], step: int) -> None:
            for k, v in metrics.items():
                sw.add_scalar(k, v, step)  # type: ignore[union-attr]
    elif callable(writer):
        emit = writer  # type: ignore[assignment]
    else:
        raise TypeError(f"writer={writer!r} is invalid: needs add_scalar() or to be callable")

    names: dict[Tensor, str] | None = (
        {p: n for n, p in _unwrapped(model).named_parameters()} if model is not None else None)
    if "reduce" not in recorder_kwargs and _distributed() and any(
            is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
        recorder_kwargs["reduce"] = _sum_across_ranks
    rec = StepRecorder(
        optimizer, name or type(optimizer).__name__,
        should_record=lambda index: index % every_n_steps == 0,
        param_names=names, **recorder_kwargs,
    )

    def write(record: StepRecord) -> None:
        emit(rec.config.metrics(record), record.index)

    rec.subscribe(write)
    rec.attach()
    return MonitorHandle(rec)


def _distributed() -> bool:
    """Whether ``torch.distributed`` runs with more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_across_ranks(sums: StepSums) -> None:
    """The ``reduce`` of sharded parameters: every field combined across ranks by its rule."""
    sums.all_reduce()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside wrappers (Fabric's, DDP) that only hold it as ``module``."""
    inner = getattr(model, "module", None)
    while isinstance(inner, torch.nn.Module) and inner is not model and \
            {id(p) for p in inner.parameters()} == {id(p) for p in model.parameters()}:
        model, inner = inner, getattr(inner, "module", None)
    return model
