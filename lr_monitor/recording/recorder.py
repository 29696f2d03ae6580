"""Framework-free recording of optimizer steps: the engine behind :class:`StepSizeMonitor`.

A :class:`StepRecorder` watches one optimizer through torch's step hooks
(``register_step_pre_hook``/``register_step_post_hook``): on the steps you ask it to
record it measures the gradients, reconstructs the step from the post-step state
(:mod:`lr_monitor.functional`) and produces a flat dict of scalars, with exactly one
device-to-host transfer. On other steps the hooks return immediately.

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
    >>> p.grad = torch.ones(3); opt.step()
    >>> step, metrics = seen[0]
    >>> step, round(metrics["optim/update_norm/Adam/pg0"], 4)
    (0, 0.1732)
    >>> handle.detach()
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lr_monitor._validation import check_bool, check_choice, check_int, invalid
from lr_monitor.faults import FaultBarrier
from lr_monitor.functional import ParamSnapshot, find_rule
from lr_monitor.functional.rules import (
    ParamStep,
    is_low_precision,
    iter_group_steps,
    supports_group,
)
from lr_monitor.functional.statistics import (
    HostStepSums,
    StepSums,
    UpdateHistory,
    grad_values,
    rounded_away,
    step_sums,
    summarize,
    tensor_norms,
)
from lr_monitor.functional.step import applied_update, with_applied_update
from lr_monitor.tags import group_names

__all__ = [
    "GRANULARITIES",
    "MonitorHandle",
    "ScalarWriter",
    "StepRecorder",
    "attach",
    "check_recorder_args",
]

GRANULARITIES = ("group", "tensor")


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

    Nothing here can end the run: every hook runs behind a
    :class:`~lr_monitor.faults.FaultBarrier`. A parameter whose statistics raise is
    reported once and left out of later records; a failure that cannot be pinned on a
    parameter disables this recorder.

    Args:
        optimizer: The optimizer to watch.
        name: Its name in the tags (``Adam``, ``Adam-1``).
        should_record: Called before each step with this optimizer's step index (the
            number of its steps so far); ``True`` records the step.
        on_record: Called after a recorded step with ``(metrics, host_sums)``.
        prefix: Tag prefix (``optim``).
        granularity: ``"group"`` (rows per param group and ``global``) or ``"tensor"``
            (also one row per selected parameter tensor).
        param_names: Parameter → name, for tensor rows, ``include``/``exclude`` and fault
            reports.
        include: Regex; with ``granularity="tensor"``, only matching names get rows.
        exclude: Regex; matching names get no tensor row.
        update_cosine: Keep a subsample of the last recorded update for
            ``update_cosine`` (memory: ≤ ``cosine_samples`` values per tensor).
        cosine_samples: Subsample size per tensor.
        log_global: Also emit the ``global`` row (all groups together).
        reduce: Applied to the device sums before the host transfer; for sharded
            parameters pass ``lambda sums: sums.all_reduce()`` (every rank must record).
        faults: The barrier the hooks run behind (default: one that only logs).

    Raises:
        ValueError: for an unknown granularity, a bad regex or ``cosine_samples`` < 1.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        *,
        should_record: Callable[[int], bool],
        on_record: Callable[[dict[str, float], HostStepSums], None],
        prefix: str = "optim",
        granularity: str = "group",
        param_names: Mapping[Tensor, str] | None = None,
        include: str | None = None,
        exclude: str | None = None,
        update_cosine: bool = True,
        cosine_samples: int = 4096,
        log_global: bool = True,
        reduce: Callable[[StepSums], None] | None = None,
        faults: FaultBarrier | None = None,
    ) -> None:
        check_recorder_args(prefix=prefix, granularity=granularity, include=include,
                            exclude=exclude, update_cosine=update_cosine,
                            cosine_samples=cosine_samples, log_global=log_global)
        self.optimizer = optimizer
        self.name = name
        self.prefix = prefix
        self.granularity = granularity
        self.should_record = should_record
        self.on_record = on_record
        self.param_names = dict(param_names or {})
        self._include = _compile("include", include)
        self._exclude = _compile("exclude", exclude)
        self.history = UpdateHistory(cosine_samples) if update_cosine else None
        self.log_global = log_global
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
        self.last_metrics: dict[str, float] = {}
        self.last_recorded_index: int | None = None

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

        Returns:
            Whether the coming step will be recorded.
        """
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
        norms = tensor_norms([grad_values(p.grad) for p in params])  # type: ignore[arg-type]
        return {p: n.square() for p, n in zip(params, norms.unbind(), strict=True)}

    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._recording = False
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
        if not self._recording:
            return
        self._recording = False
        self._before = self._snapshot.pop() if self._snapshot.taken else {}
        try:
            self.faults.call("record", self._record, subject=self.name)
        finally:
            self._before = {}
            self._grad_sq = None

    def _record(self) -> None:
        grad_sq = self._grad_sq
        saved = self.history.checkpoint() if self.history is not None else None
        try:
            metrics, host = self.measure(grad_sq)
        except Exception:
            # Pin the failure on the parameters that cause it, leave them out from now
            # on and measure the rest; if no parameter alone fails, the barrier disables
            # the recorder.
            culprits = self._faulty_params(grad_sq)
            if not culprits:
                raise
            for p, exc in culprits:
                self._excluded.add(id(p))
                pname = self.param_names.get(p, f"tensor of shape {tuple(p.shape)}")
                self.faults.fail("statistics", exc, subject=f"{self.name} {pname}")
            if self.history is not None and saved is not None:
                self.history.restore(saved)
            metrics, host = self.measure(grad_sq)
        self.last_metrics = metrics
        self.last_recorded_index = self.step_index - 1
        self.on_record(metrics, host)

    def _faulty_params(self, grad_sq: dict[Tensor, Tensor] | None
                       ) -> list[tuple[Tensor, Exception]]:
        out = []
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p.grad is None or id(p) in self._excluded:
                    continue
                try:
                    sums = step_sums([self._group_steps(g, [p])], grad_sq=grad_sq)
                    summarize(sums.to_host())
                except Exception as exc:
                    out.append((p, exc))
        return out

    # -- measurement ---------------------------------------------------------------------
    def _tensor_row(self, p: Tensor) -> bool:
        if self.granularity != "tensor":
            return False
        name = self.param_names.get(p)
        if name is None:
            return False
        if self._include is not None and not self._include.search(name):
            return False
        return not (self._exclude is not None and self._exclude.search(name))

    def _group_steps(self, group: dict[str, Any],
                     params: list[Tensor] | None = None) -> Iterator[ParamStep]:
        """The steps of ``params`` (default: the group's, minus excluded ones), lazily."""
        if params is None:
            params = [p for p in group["params"] if id(p) not in self._excluded]
        if self._measured(group):
            yield from self._measured_steps(group, params)
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

    def measure(self, grad_sq: dict[Tensor, Tensor] | None = None
                ) -> tuple[dict[str, float], HostStepSums]:
        """Statistics of the step just taken, as ``{tag: value}``; one host transfer.

        Args:
            grad_sq: Per-parameter squared gradient norms measured before clipping.

        Returns:
            The metrics and the host sums they were computed from.

        Raises:
            UnsupportedOptimizerError: if a group has no rule and no copy was taken.
        """
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        steps = [self._group_steps(g) for g in self.optimizer.param_groups]
        sums = step_sums(steps, history=self.history, grad_sq=grad_sq,
                         tensor_rows=self._tensor_row if self.granularity == "tensor" else None,
                         extra=lrs)
        tensor_params = sums.tensor_params
        if self.reduce is not None:
            self.reduce(sums)
        host = sums.to_host()
        rows = summarize(host)
        names = group_names(self.optimizer.param_groups)
        lr_values = [float(x) for x in host.extra[: len(lrs)]]
        metrics: dict[str, float] = {}
        pre = self.prefix
        for i, (gname, row) in enumerate(zip(names, rows, strict=False)):
            metrics[f"{pre}/lr/{self.name}/{gname}"] = lr_values[i]
            for k, v in row.items():
                metrics[f"{pre}/{k}/{self.name}/{gname}"] = v
        for p, row in zip(tensor_params, rows[len(names):], strict=True):
            tname = self.param_names[p]
            for k, v in row.items():
                metrics[f"{pre}/{k}/{self.name}/{tname}"] = v
        if self.log_global:
            glob = summarize(host.combine(range(len(names))))[0]
            for k, v in glob.items():
                metrics[f"{pre}/{k}/{self.name}/global"] = v
            if len(set(lr_values)) == 1:
                metrics[f"{pre}/lr/{self.name}/global"] = lr_values[0]
        return metrics, host


def check_recorder_args(*, prefix: Any = "optim", granularity: Any = "group",
                        include: Any = None, exclude: Any = None, update_cosine: Any = True,
                        cosine_samples: Any = 4096, log_global: Any = True) -> None:
    """Validate the recording options of :class:`StepRecorder`, :func:`attach` and the monitor.

    Raises:
        ValueError: naming the argument, its value and what is allowed.

    Example:
        >>> check_recorder_args(update_cosine="False")
        Traceback (most recent call last):
        ...
        ValueError: update_cosine='False' is invalid: must be True or False
    """
    if not isinstance(prefix, str) or not prefix or prefix.startswith("/"):
        raise invalid("prefix", prefix, "a non-empty string not starting with '/'")
    check_choice("granularity", granularity, GRANULARITIES)
    _compile("include", include)
    _compile("exclude", exclude)
    check_bool("update_cosine", update_cosine)
    check_int("cosine_samples", cosine_samples, 1)
    check_bool("log_global", log_global)


def _compile(arg: str, pattern: Any) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise invalid(arg, pattern, "None or a regular expression (a string)")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise invalid(arg, pattern, f"a valid regular expression ({e})") from e


class MonitorHandle:
    """What :func:`attach` returns: call :meth:`detach` to stop recording."""

    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder

    @property
    def latest(self) -> dict[str, float]:
        """The metrics of the last recorded step."""
        return self.recorder.last_metrics

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

    Args:
        optimizer: The optimizer to watch.
        writer: A ``SummaryWriter`` (anything with ``add_scalar``) or a callable
            ``fn(metrics, step)``.
        every_n_steps: Record every n-th ``optimizer.step()`` (the first step is recorded).
        name: Optimizer name in the tags (default: its class name).
        model: Gives parameter names, needed for ``granularity="tensor"``.
        **recorder_kwargs: Passed to :class:`StepRecorder` (``prefix``, ``granularity``,
            ``include``, ``exclude``, ``update_cosine``, ``cosine_samples``, ``log_global``).

    Returns:
        A :class:`MonitorHandle`.

    Raises:
        ValueError: for a bad ``every_n_steps`` or recorder argument.
        TypeError: if ``writer`` is neither callable nor has ``add_scalar``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise invalid("optimizer", optimizer, "a torch.optim.Optimizer")
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
        {p: n for n, p in model.named_parameters()} if model is not None else None)
    box: dict[str, StepRecorder] = {}

    def on_record(metrics: dict[str, float], host: HostStepSums) -> None:
        emit(metrics, box["r"].step_index - 1)

    rec = StepRecorder(
        optimizer, name or type(optimizer).__name__,
        should_record=lambda index: index % every_n_steps == 0,
        on_record=on_record, param_names=names, **recorder_kwargs,
    )
    box["r"] = rec
    rec.attach()
    return MonitorHandle(rec)

