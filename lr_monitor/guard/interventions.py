"""What the guard can do about a detection: cut the learning rate, skip a step, roll back.

Framework-free (plain :mod:`torch`); the Lightning callback wires these into the training
loop. Three tools:

* :func:`scale_lr` multiplies learning rates in a way that **survives LR schedulers**:
  after a cut by ``f`` every later learning rate is ``f ×`` what the schedule would have
  given. :class:`LRCut` is the stateful policy around it (cooldown, cumulative scale,
  maximum number of cuts).
* :func:`skip_step` drops the gradients so the next ``optimizer.step()`` leaves the
  parameters and the optimizer state bit-identical.
* :class:`RollbackBuffer` keeps the last few healthy in-memory CPU snapshots of the weights,
  optimizer and scheduler state. :meth:`~RollbackBuffer.roll_back` is the recovery a running
  loop wants (and the one :class:`~lr_monitor.DivergenceGuard` performs): the weights and the
  per-parameter optimizer state go back bit-identically, while the current param-group
  hyper-parameters (the LR with every cut so far) and the schedulers stay where they are.
  :meth:`~RollbackBuffer.restore` rewinds everything it is given, the snapshot's learning
  rates included.

Order of operations when the guard does several things at one step: roll back first, then
cut (the cut applies to the kept learning rates); skipping is independent.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> opt = torch.optim.SGD([w], lr=0.1)
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    >>> scale_lr(opt, sched, 0.5)
    {'0/0': (0.1, 0.05)}
    >>> for _ in range(2):
    ...     opt.step()
    ...     sched.step()
    >>> opt.param_groups[0]["lr"]  # 0.5 × the scheduled 0.05
    0.025
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lr_monitor._validation import check_choice, check_int, check_real
from lr_monitor.tags import group_names, lr_key, optimizer_names

__all__ = ["LRCut", "RollbackBuffer", "Snapshot", "clear_device_skip", "learning_rates",
           "nonfinite_state", "reset_state", "scale_lr", "skip_on_device", "skip_step"]

#: Param-group keys holding a learning rate that torch schedulers read: the current LR, the
#: scheduler start value (``initial_lr``, all schedulers) and OneCycleLR's ``max_lr``/``min_lr``.
LR_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
#: Per-group LR lists on scheduler objects: ``base_lrs`` (all), ``_last_lr`` (all),
#: ``max_lrs`` (CyclicLR), ``min_lrs`` (ReduceLROnPlateau).
LR_SCHEDULER_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")
#: Scalar LR attributes shared by all groups: ``eta_min`` (CosineAnnealingLR,
#: CosineAnnealingWarmRestarts) and ReduceLROnPlateau's ``default_min_lr``.
LR_SCHEDULER_SCALARS = ("eta_min", "default_min_lr")

GroupSpec = int | tuple[int, int] | str


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a wrapper such as Lightning's ``LightningOptimizer``."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "_optimizer"):
        inner = inner._optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer")
    return inner


def _as_list(obj: Any) -> list[Any]:
    if obj is None:
        return []
    if isinstance(obj, (list, tuple)):
        return list(obj)
    return [obj]


def _walk_schedulers(schedulers: Iterable[Any]) -> Iterator[Any]:
    """Every scheduler object once, recursing into SequentialLR/ChainedScheduler."""
    seen: set[int] = set()
    stack = list(reversed(list(schedulers)))
    while stack:
        s = stack.pop()
        if id(s) in seen:
            continue
        seen.add(id(s))
        yield s
        stack.extend(reversed(list(getattr(s, "_schedulers", ()) or ())))


def _scaled(value: Any, factor: float, done: set[int]) -> Any:
    """``value × factor``; tensors in place (once each) so their identity is kept."""
    if isinstance(value, Tensor):
        if id(value) not in done:
            done.add(id(value))
            with torch.no_grad():
                value.mul_(factor)
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * factor
    return value


def _parse_groups(
    groups: Iterable[GroupSpec] | None, optimizers: Sequence[torch.optim.Optimizer]
) -> set[tuple[int, int]]:
    every = {(i, j) for i, o in enumerate(optimizers) for j in range(len(o.param_groups))}
    if groups is None:
        return every
    chosen: set[tuple[int, int]] = set()
    for g in groups:
        if isinstance(g, str):
            try:
                i_s, j_s = g.split("/")
                pair = (int(i_s), int(j_s))
            except ValueError:
                raise ValueError(
                    f"groups entry {g!r} is invalid: must be 'optimizer/group', e.g. '0/1'"
                ) from None
            items = [pair]
        elif isinstance(g, int) and not isinstance(g, bool):
            if not 0 <= g < len(optimizers):
                raise ValueError(
                    f"groups entry {g!r} is invalid: optimizer index must be in "
                    f"[0, {len(optimizers) - 1}]"
                )
            items = [(g, j) for j in range(len(optimizers[g].param_groups))]
        elif isinstance(g, tuple) and len(g) == 2:
            items = [(int(g[0]), int(g[1]))]
        else:
            raise ValueError(
                f"groups entry {g!r} is invalid: must be an optimizer index, an "
                "(optimizer, group) pair or an 'optimizer/group' string"
            )
        for pair in items:
            if pair not in every:
                raise ValueError(f"groups entry {g!r} is invalid: no param group {pair}")
            chosen.add(pair)
    return chosen


# --------------------------------------------------------------------------------------------
# learning-rate cut
# --------------------------------------------------------------------------------------------


def learning_rates(optimizers: Sequence[Any]) -> dict[str, float]:
    """Every param group's learning rate, keyed as in guard events (:func:`lr_monitor.tags.lr_key`).

    Args:
        optimizers: The optimizers (wrappers with ``optimizer``/``_optimizer`` are unwrapped).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> learning_rates([torch.optim.SGD([{"params": [w], "name": "head"}], lr=0.1)])
        {'SGD/head': 0.1}
    """
    opts = [_unwrap(o) for o in optimizers]
    return {lr_key(oname, gname): float(g["lr"])
            for opt, oname in zip(opts, optimizer_names(opts), strict=True)
            for gname, g in zip(group_names(opt.param_groups), opt.param_groups, strict=True)}


def scale_lr(
    optimizers: Any,
    schedulers: Any = (),
    factor: float = 0.5,
    *,
    groups: Iterable[GroupSpec] | None = None,
    min_lr: float = 0.0,
) -> dict[str, tuple[float, float]]:
    """Multiply learning rates by ``factor`` so that every LR scheduler keeps the cut.

    A plain ``group["lr"] *= f`` is undone by the next ``scheduler.step()`` of most
    schedulers (they recompute the LR from ``base_lrs``). Because every torch schedule is
    linear in its LR-valued fields, scaling *all* of them by ``f`` makes every later LR
    exactly ``f ×`` the reference schedule. Scaled fields, for each selected group ``j``
    of optimizer ``i``:

    * param group: ``lr``, ``initial_lr``, OneCycleLR's ``max_lr`` and ``min_lr``;
    * every scheduler of optimizer ``i`` (recursing into SequentialLR / ChainedScheduler
      ``_schedulers``): ``base_lrs[j]``, ``_last_lr[j]``, CyclicLR's ``max_lrs[j]``,
      ReduceLROnPlateau's ``min_lrs[j]``;
    * the scalars shared by all groups of a scheduler, CosineAnnealingLR /
      CosineAnnealingWarmRestarts ``eta_min`` and ReduceLROnPlateau's ``default_min_lr``, only
      when all groups of that optimizer get the same effective factor. Otherwise they cannot be
      scaled per group: a :class:`UserWarning` says so and those groups follow
      ``eta_min + f·(schedule - eta_min)`` instead (exact only when ``eta_min = 0``).

    This covers StepLR, MultiStepLR, ConstantLR, LinearLR, ExponentialLR, PolynomialLR,
    LambdaLR, MultiplicativeLR, CosineAnnealingLR, CosineAnnealingWarmRestarts, CyclicLR,
    OneCycleLR, SequentialLR, ChainedScheduler and ReduceLROnPlateau (whose absolute ``eps``
    is not scaled). A tensor ``lr`` (fused/capturable optimizers) is scaled in place, so the
    optimizer keeps the same tensor object.

    ``min_lr`` floors the new LR of each group at the time of the cut: a group whose
    ``lr × factor`` would fall below ``min_lr`` gets the smaller effective cut
    ``max(factor, min_lr / lr)`` (and none at all if its LR is already at or below ``min_lr``),
    applied to all its fields, so its later LRs are ``effective factor × schedule`` (the
    schedule may still decay below ``min_lr`` later). The returned dict shows what happened.

    Nothing is needed on resume: the optimizer and scheduler state dicts saved in a checkpoint
    already hold the scaled values.

    Args:
        optimizers: One optimizer or a sequence (Lightning's ``trainer.optimizers``); wrappers
            with an ``_optimizer`` attribute are unwrapped.
        schedulers: One scheduler, a sequence, or ``()``; each must belong to one of
            ``optimizers`` (in Lightning: ``[c.scheduler for c in trainer.lr_scheduler_configs]``).
        factor: Multiplier in (0, 1].
        groups: Which param groups to cut: ``None`` (all) or an iterable of optimizer indices
            ``i``, ``(i, j)`` pairs or ``"i/j"`` strings.
        min_lr: Floor for the new LR of each group (≥ 0).

    Returns:
        ``{"i/j": (lr_before, lr_after)}`` for every cut group, as Python floats.

    Raises:
        ValueError: If ``factor``, ``min_lr`` or ``groups`` is invalid, or a scheduler belongs
            to an optimizer not in ``optimizers``.
        TypeError: If an optimizer is not a torch optimizer.

    Example:
        >>> import torch
        >>> w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([{"params": [w], "lr": 0.1}, {"params": [b], "lr": 0.01}])
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        >>> scale_lr([opt], [sched], 0.5, groups=["0/0"])
        {'0/0': (0.1, 0.05)}
        >>> scale_lr(opt, sched, 0.5, min_lr=0.008)  # group 1 is floored: a smaller cut
        {'0/0': (0.05, 0.025), '0/1': (0.01, 0.008)}
    """
    factor = check_real("factor", factor, low=0.0, high=1.0, high_closed=True)
    min_lr = check_real("min_lr", min_lr, low=0.0, low_closed=True)
    opts = [_unwrap(o) for o in _as_list(optimizers)]
    selected = _parse_groups(groups, opts)
    done: set[int] = set()  # tensors already scaled in place

    effective: dict[tuple[int, int], float] = {}
    result: dict[str, tuple[float, float]] = {}
    for i, opt in enumerate(opts):
        for j, group in enumerate(opt.param_groups):
            if (i, j) not in selected:
                continue
            before = float(group["lr"])
            eff = factor
            if min_lr > 0.0 and before * factor < min_lr:
                eff = min(1.0, min_lr / before) if before > 0.0 else 1.0
            effective[(i, j)] = eff
            if eff != 1.0:
                for key in LR_GROUP_KEYS:
                    if key in group:
                        group[key] = _scaled(group[key], eff, done)
            result[f"{i}/{j}"] = (before, float(group["lr"]))

    index = {id(o): i for i, o in enumerate(opts)}
    lists_done: set[int] = set()
    for sched in _walk_schedulers(_as_list(schedulers)):
        sched_opt = getattr(sched, "optimizer", None)
        if sched_opt is None:
            continue
        found = index.get(id(_unwrap(sched_opt)))
        if found is None:
            raise ValueError(
                f"scheduler {type(sched).__name__} belongs to an optimizer that is not in "
                "optimizers"
            )
        n_groups = len(opts[found].param_groups)
        factors = {j: effective[(found, j)] for j in range(n_groups) if (found, j) in effective}
        for name in LR_SCHEDULER_LISTS:
            values = getattr(sched, name, None)
            if not isinstance(values, list) or id(values) in lists_done:
                continue
            lists_done.add(id(values))
            for j, eff in factors.items():
                if j < len(values) and eff != 1.0:
                    values[j] = _scaled(values[j], eff, done)
        uniform = set(factors.values())
        for name in LR_SCHEDULER_SCALARS:
            value = getattr(sched, name, None)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value == 0:
                continue
            if len(factors) == n_groups and len(uniform) == 1:
                setattr(sched, name, _scaled(value, next(iter(uniform)), done))
            elif uniform - {1.0}:
                warnings.warn(
                    f"{type(sched).__name__}.{name}={value:g} is shared by all param groups "
                    "but they were cut by different factors; it is left unscaled, so the "
                    "cut groups decay towards the unscaled value",
                    UserWarning,
                    stacklevel=2,
                )
    return result


class LRCut:
    """Stateful learning-rate cut policy: factor, cooldown, floor and a maximum number of cuts.

    Each :meth:`cut` calls :func:`scale_lr` (so the cut survives schedulers) and multiplies
    :attr:`scale` by ``factor``. :attr:`scale` is the cumulative *nominal* multiplier, for
    reporting (e.g. :attr:`lr_monitor.events.GuardEvent.lr_scale`): when ``min_lr`` floors a
    group its actual multiplier is larger (a smaller cut); the dict returned by :meth:`cut`
    has the real LRs.

    :meth:`state_dict` holds the counters only. On resume from a checkpoint the optimizer and
    scheduler state dicts already contain the scaled learning rates, so :meth:`load_state_dict`
    restores the counters (cooldown, ``max_cuts`` and reporting stay right) and never
    re-applies a cut.

    Args:
        factor: Multiplier per cut, in (0, 1).
        cooldown: Minimum number of steps between two cuts (int ≥ 0): a cut at step ``k``
            allows the next one at ``k + cooldown`` at the earliest.
        min_lr: Floor for the new LR of each group (see :func:`scale_lr`), ≥ 0.
        max_cuts: Maximum number of cuts in the run (int ≥ 1), or ``None`` for no limit.

    Raises:
        ValueError: If an argument is outside its range (the message names it).

    Example:
        >>> import torch
        >>> opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        >>> policy = LRCut(factor=0.5, cooldown=10, max_cuts=2)
        >>> policy.cut(100, opt)
        {'0/0': (0.001, 0.0005)}
        >>> policy.can_cut(105), policy.cut(105, opt)
        (False, None)
        >>> policy.cut(110, opt)["0/0"][1], policy.scale, policy.num_cuts, policy.can_cut(500)
        (0.00025, 0.25, 2, False)
    """

    def __init__(
        self,
        factor: float = 0.5,
        cooldown: int = 0,
        min_lr: float = 0.0,
        max_cuts: int | None = None,
    ) -> None:
        self.factor: float = check_real("factor", factor, low=0.0, high=1.0)
        self.cooldown: int = check_int("cooldown", cooldown, 0)
        self.min_lr: float = check_real("min_lr", min_lr, low=0.0, low_closed=True)
        self.max_cuts: int | None = check_int("max_cuts", max_cuts, 1, allow_none=True)
        self.scale = 1.0
        self.num_cuts = 0
        self.last_cut_step: int | None = None

    @property
    def exhausted(self) -> bool:
        """Whether every cut ``max_cuts`` allows has been made."""
        return self.max_cuts is not None and self.num_cuts >= self.max_cuts

    def can_cut(self, step: int) -> bool:
        """Whether a cut at ``step`` is allowed (cooldown over, ``max_cuts`` not reached).

        Args:
            step: The current optimizer step.

        Returns:
            ``True`` if :meth:`cut` at ``step`` would cut.
        """
        if self.exhausted:
            return False
        return self.last_cut_step is None or step - self.last_cut_step >= self.cooldown

    def cut(
        self,
        step: int,
        optimizers: Any,
        schedulers: Any = (),
        *,
        groups: Iterable[GroupSpec] | None = None,
        ignore_cooldown: bool = False,
    ) -> dict[str, tuple[float, float]] | None:
        """Cut the learning rates by :attr:`factor` if :meth:`can_cut` allows it.

        Args:
            step: The current optimizer step.
            optimizers: As for :func:`scale_lr`.
            schedulers: As for :func:`scale_lr`.
            groups: As for :func:`scale_lr`.
            ignore_cooldown: Cut even within the cooldown (``max_cuts`` still holds): for a
                rollback, where the repeated blow-up is itself the evidence that the
                previous cut was not enough.

        Returns:
            ``{"i/j": (lr_before, lr_after)}`` as from :func:`scale_lr`, or ``None`` when the
            cut is refused (cooldown or ``max_cuts``); nothing is changed then.
        """
        if self.exhausted or not (ignore_cooldown or self.can_cut(step)):
            return None
        result = scale_lr(optimizers, schedulers, self.factor, groups=groups, min_lr=self.min_lr)
        self.scale *= self.factor
        self.num_cuts += 1
        self.last_cut_step = int(step)
        return result

    def state_dict(self) -> dict[str, Any]:
        """The counters as plain Python types (the configuration is informational).

        Returns:
            A dict with ``scale``, ``num_cuts``, ``last_cut_step`` and the configuration.
        """
        return {
            "scale": self.scale,
            "num_cuts": self.num_cuts,
            "last_cut_step": self.last_cut_step,
            "factor": self.factor,
            "cooldown": self.cooldown,
            "min_lr": self.min_lr,
            "max_cuts": self.max_cuts,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the counters; never touches any optimizer (see the class docstring).

        Args:
            state_dict: A dict from :meth:`state_dict`. The configuration stored in it is
                ignored: the constructor arguments of this instance win.
        """
        self.scale = float(state_dict["scale"])
        self.num_cuts = int(state_dict["num_cuts"])
        last = state_dict.get("last_cut_step")
        self.last_cut_step = None if last is None else int(last)

    def __repr__(self) -> str:
        return (
            f"LRCut(factor={self.factor}, cooldown={self.cooldown}, min_lr={self.min_lr}, "
            f"max_cuts={self.max_cuts}, scale={self.scale}, num_cuts={self.num_cuts})"
        )


# --------------------------------------------------------------------------------------------
# skip
# --------------------------------------------------------------------------------------------


def skip_step(optimizer: Any) -> int:
    """Drop every gradient of ``optimizer`` so its next ``step()`` changes nothing.

    torch optimizers skip parameters whose ``grad`` is ``None``: parameters, moments and the
    per-parameter ``step`` counters stay bit-identical (tested for Adam, AdamW, SGD with
    momentum, RMSprop and Adagrad). Call it after the backward pass and before
    ``optimizer.step()`` (in Lightning: ``on_before_optimizer_step``). With AMP's
    ``GradScaler``, call it after ``scaler.unscale_(optimizer)`` (Lightning does that before
    ``on_before_optimizer_step``): ``scaler.step`` on an optimizer that was never unscaled and
    has no gradients raises "No inf checks were recorded". Only the optimizer step is
    skipped: side effects of the forward pass (BatchNorm running statistics) remain.

    Args:
        optimizer: A torch optimizer (or a wrapper with ``_optimizer``).

    Returns:
        The number of gradients dropped.

    Raises:
        TypeError: If ``optimizer`` is not a torch optimizer.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.Adam([w], lr=0.1)
        >>> (w**2).sum().backward()
        >>> skip_step(opt)
        1
        >>> opt.step()
        >>> w.tolist(), opt.state[w]
        ([1.0, 1.0, 1.0], {})
    """
    dropped = 0
    for group in _unwrap(optimizer).param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = None
                dropped += 1
    return dropped


def skip_on_device(optimizer: Any, skip: Tensor, *, exact: bool = True) -> bool:
    """Drop the next step's update when ``skip`` is true, without reading ``skip`` on the host.

    ``skip`` is a 0-d bool tensor on the device, decided there (the guard's tripwires).

    * A **fused** optimizer (``fused=True`` in every group; torch's Adam, AdamW, SGD and
      Adagrad have one) gets it as its ``found_inf``, the flag an fp16 ``GradScaler``
      hands it: the step is skipped entirely, as by :func:`skip_step` — parameters,
      moments and step counters unchanged. Call :func:`clear_device_skip` after the step.
    * Any other optimizer gets its dense gradients multiplied by ``not skip`` (one
      ``foreach`` multiply per device). The optimizer then steps with a zero
      gradient: momentum, weight decay and the step counter still move. A NaN or inf
      gradient stays non-finite (``0·NaN`` is NaN): only a rollback after the step can
      undo that.

    Args:
        optimizer: A torch optimizer (or a wrapper with ``_optimizer``).
        skip: Whether to skip, as a 0-d bool tensor (any device).
        exact: Allow the ``found_inf`` path; pass ``False`` when a ``GradScaler`` owns
            ``found_inf`` (it would overwrite the flag).

    Returns:
        ``True`` when the skip is exact (``found_inf`` set), ``False`` when the gradients
        were masked.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.Adam([w], lr=0.1, fused=True)
        >>> (w**2).sum().backward()
        >>> skip_on_device(opt, torch.tensor(True))
        True
        >>> opt.step(); clear_device_skip(opt)
        >>> w.tolist(), float(opt.state[w]["step"])
        ([1.0, 1.0, 1.0], 0.0)
        >>> sgd = torch.optim.SGD([w], lr=0.1)
        >>> skip_on_device(sgd, torch.tensor(True)), w.grad.tolist()
        (False, [0.0, 0.0, 0.0])
    """
    opt = _unwrap(optimizer)
    if exact and getattr(opt, "_step_supports_amp_scaling", False) and all(
            g.get("fused") for g in opt.param_groups):
        opt.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
        return True
    keep = torch.logical_not(skip)
    groups: dict[torch.device, list[Tensor]] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is not None and g.layout is torch.strided:
                groups.setdefault(g.device, []).append(g)
    for device, grads in groups.items():  # (a bool factor multiplies any dtype)
        torch._foreach_mul_(grads, keep if device == keep.device else keep.to(device))
    return False


def clear_device_skip(optimizer: Any) -> None:
    """Take back the ``found_inf`` :func:`skip_on_device` gave a fused optimizer.

    Args:
        optimizer: A torch optimizer (or a wrapper with ``_optimizer``).
    """
    opt = _unwrap(optimizer)
    if hasattr(opt, "found_inf"):
        del opt.found_inf


# --------------------------------------------------------------------------------------------
# rollback
# --------------------------------------------------------------------------------------------


def _copy_state(obj: Any, device: str | torch.device | None, counter: list[int]) -> Any:
    """Deep copy of a (nested) state dict; tensors are detached and copied to ``device``."""
    if isinstance(obj, Tensor):
        t = obj.detach().to(device if device is not None else obj.device, copy=True)
        counter[0] += t.numel() * t.element_size()
        return t
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping type (e.g. OrderedDict) and attributes
        out.clear()
        for k, v in obj.items():
            out[k] = _copy_state(v, device, counter)
        return out
    if isinstance(obj, list):
        return [_copy_state(v, device, counter) for v in obj]
    if isinstance(obj, tuple):
        items = [_copy_state(v, device, counter) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return copy.deepcopy(obj)


@dataclass
class Snapshot:
    """One in-memory copy of the training state at the end of an optimizer step.

    Args:
        step: The optimizer step the state belongs to.
        module: ``module.state_dict()`` with every tensor copied to CPU.
        optimizers: ``optimizer.state_dict()`` per optimizer, tensors copied to CPU.
        schedulers: ``scheduler.state_dict()`` per scheduler, deep-copied (tensors stay on
            their device; they are scalars).
        extra: Anything else the caller stored with it (deep-copied), e.g. detector state
            dicts or the :class:`LRCut` scale at that time.
        nbytes: Bytes held by the tensors of this snapshot.
        finite: Whether every floating-point tensor of ``module`` and ``optimizers`` is
            finite (a snapshot that is not would restore the trouble; the buffer keeps none).
    """

    step: int
    module: dict[str, Any]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    finite: bool = True


def _tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nested state dict."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every floating-point tensor is finite (CPU tensors: no device sync)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors
               if t.is_floating_point() or t.is_complex())


class RollbackBuffer:
    """Keeps the last ``keep`` healthy snapshots (in CPU memory) and restores one exactly.

    The caller takes a snapshot every ``every_n_steps`` steps *while healthy*
    (:meth:`maybe_take`, right after the optimizer and scheduler steps, only when no detector
    fired) and restores one with :meth:`restore` after a divergence. Snapshots are deep copies:
    ``module.state_dict()`` and ``optimizer.state_dict()`` tensors are copied to CPU
    (``.detach().to("cpu", copy=True)``), scheduler state dicts are deep-copied. Restoring
    copies the weights back **in place** (``copy_``), so the optimizer's parameter references
    and any DDP/FSDP hooks stay valid, and loads the optimizer and scheduler state dicts (which
    cast the state back to each parameter's device and dtype); the result is bit-identical
    to the state at the snapshot. A tensor ``lr`` in a param group keeps its tensor object.

    Which snapshot: the **newest** one that predates the trouble and fits the model and
    optimizers as they are now. Detection has latency — a divergence is reported
    ``patience`` steps after it starts, and a blow-up inflates Adam's second moments before
    the loss shows it — so the caller passes ``before``, the first step of the evidence
    (:attr:`~lr_monitor.events.Detection.onset`), and snapshots taken from then on are
    passed over. Going back further than that only throws progress away. ``which="oldest"``
    takes the oldest candidate instead. Snapshots newer than the restored one are discarded
    (they are suspect); the restored one is kept, so a repeated failure can roll back again.

    Only a state worth returning to is kept: :meth:`take` checks the CPU copies (no device
    sync beyond the copy itself) and keeps no snapshot with a non-finite weight or optimizer
    state (``Snapshot.finite``). A restore is all-or-nothing: every candidate is checked
    against the live objects first (state keys, shapes and dtypes, the number of optimizers,
    param groups and parameters per group, schedulers), incompatible ones are passed over,
    and nothing is touched unless one fits — after ``add_param_group`` or a changed module,
    a snapshot from before the change cannot half-restore.

    Two ways back, which differ in the hyper-parameters:

    * :meth:`roll_back` — recovery inside a training loop that goes on (the guard's): the
      weights and the per-parameter optimizer state (moments, step counts) go back; the
      param groups' current hyper-parameters (``lr`` with every cut made so far, momentum,
      ...) and the schedulers are kept, because the step count goes on and the data is not
      replayed. The gradients are cleared and the snapshot is handed back with its ``extra``
      (e.g. detector states saved with the weights). Cut *after* rolling back.
    * :meth:`restore` — an exact rewind of everything it is given: the optimizer's state dict
      including the param groups, so the learning rates are the snapshot's and cuts made
      since are undone (store the :class:`LRCut` scale in ``extra`` and re-apply
      ``scale_lr(..., cut.scale / snapshot.extra["lr_scale"])`` if you want them back). Pass
      the schedulers too, so the schedule rewinds with the optimizer.

    Snapshots are not saved in checkpoints (too large); after a resume the buffer is empty
    until the next snapshot. Memory: :attr:`nbytes` (about ``keep × (weights + optimizer
    state)``, e.g. 3× the weights per snapshot for Adam).

    Args:
        every_n_steps: Snapshot period in optimizer steps (int ≥ 1): :meth:`maybe_take`
            snapshots when ``step % every_n_steps == 0``.
        keep: Maximum number of snapshots held (int ≥ 1); the oldest is dropped first.
            Keep at least 2, so that a snapshot predates a trouble that began less than
            ``every_n_steps`` steps before it was detected.

    Raises:
        ValueError: If an argument is outside its range (the message names it).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> buf = RollbackBuffer(every_n_steps=10, keep=2)
        >>> for step in range(1, 31):
        ...     model(torch.ones(1, 2)).sum().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        ...     _ = buf.maybe_take(step, model, [opt])
        >>> buf.steps
        [20, 30]
        >>> weights = model.weight.detach().clone()
        >>> buf.restore(model, [opt], before=25)  # the newest taken before step 25
        20
        >>> buf.steps, bool((model.weight != weights).all())
        ([20], True)
    """

    def __init__(self, every_n_steps: int = 100, keep: int = 2) -> None:
        self.every_n_steps: int = check_int("every_n_steps", every_n_steps, 1)
        self.keep: int = check_int("keep", keep, 1)
        self._snapshots: list[Snapshot] = []
        #: The snapshot restored last, or ``None`` (its ``extra`` holds what was stored).
        self.last_restored: Snapshot | None = None

    def __len__(self) -> int:
        return len(self._snapshots)

    @property
    def steps(self) -> list[int]:
        """Steps of the held snapshots, oldest first."""
        return [s.step for s in self._snapshots]

    @property
    def snapshots(self) -> list[Snapshot]:
        """The held snapshots, oldest first (do not modify them)."""
        return list(self._snapshots)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors of all snapshots."""
        return sum(s.nbytes for s in self._snapshots)

    def clear(self) -> None:
        """Drop every snapshot."""
        self._snapshots.clear()

    def due(self, step: int) -> bool:
        """Whether :meth:`maybe_take` would snapshot at ``step``.

        Args:
            step: The optimizer step just completed.

        Returns:
            ``True`` iff ``step`` is a multiple of ``every_n_steps`` not yet snapshotted.
        """
        if step % self.every_n_steps:
            return False
        return not self._snapshots or self._snapshots[-1].step != step

    def maybe_take(
        self,
        step: int,
        module: torch.nn.Module,
        optimizers: Sequence[Any] = (),
        schedulers: Sequence[Any] = (),
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Take a snapshot if :meth:`due`; call it only while training is healthy.

        Args:
            step: The optimizer step just completed.
            module: The model.
            optimizers: Its optimizers.
            schedulers: Its LR schedulers.
            extra: Extra state to store with the snapshot (deep-copied).

        Returns:
            Whether a snapshot was taken.
        """
        if not self.due(step):
            return False
        self.take(step, module, optimizers, schedulers, extra=extra)
        return True

    def take(
        self,
        step: int,
        module: torch.nn.Module,
        optimizers: Sequence[Any] = (),
        schedulers: Sequence[Any] = (),
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> Snapshot:
        """Snapshot now: :meth:`copy` (the arguments are its own), then :meth:`hold` if finite.

        Returns:
            The new snapshot; when it is not :attr:`~Snapshot.finite` it is not kept (the
            held ones stay).
        """
        snap = self.copy(step, module, optimizers, schedulers, extra=extra)
        if snap.finite:
            self.hold(snap)
        return snap

    def copy(
        self,
        step: int,
        module: torch.nn.Module,
        optimizers: Sequence[Any] = (),
        schedulers: Sequence[Any] = (),
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> Snapshot:
        """A snapshot of the state now, not (yet) held: see :meth:`hold`.

        Its :attr:`~Snapshot.finite` says whether every parameter and optimizer-state
        tensor is finite, checked on the CPU copies. Buffers are not checked: an attention
        mask of ``-inf`` or an observer's ``min_val=inf`` are finite states' business.

        Args:
            step: The optimizer step just completed.
            module: The model.
            optimizers: Its optimizers (wrappers with ``_optimizer`` are unwrapped).
            schedulers: Its LR schedulers (anything with ``state_dict``/``load_state_dict``).
            extra: Extra state to store with the snapshot (deep-copied).

        Returns:
            The snapshot.
        """
        counter = [0]
        snap = Snapshot(
            step=int(step),
            module=_copy_state(module.state_dict(), "cpu", counter),
            optimizers=[
                _copy_state(_unwrap(o).state_dict(), "cpu", counter) for o in _as_list(optimizers)
            ],
            schedulers=[_copy_state(s.state_dict(), None, counter) for s in _as_list(schedulers)],
            extra=copy.deepcopy(dict(extra or {})),
        )
        snap.nbytes = counter[0]
        params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
        snap.finite = _all_finite(_tensors(
            [{k: v for k, v in snap.module.items() if k in params}, snap.optimizers]))
        return snap

    def hold(self, snapshot: Snapshot) -> None:
        """Hold ``snapshot`` (from :meth:`copy`), dropping the oldest beyond ``keep``.

        Args:
            snapshot: The snapshot to hold.
        """
        self._snapshots.append(snapshot)
        del self._snapshots[: -self.keep]

    def fits(self, snapshot: Snapshot, module: torch.nn.Module, optimizers: Sequence[Any] = (),
             schedulers: Sequence[Any] = ()) -> str | None:
        """Why ``snapshot`` cannot be restored into these objects, or ``None`` if it can.

        Args:
            snapshot: A held snapshot.
            module: The model.
            optimizers: The optimizers, in the order given to :meth:`take` (``()``: not
                restored, not checked).
            schedulers: The schedulers, likewise.

        Returns:
            ``None``, or one line naming the first mismatch.
        """
        live = module.state_dict()
        if set(live) != set(snapshot.module):
            missing = sorted(set(snapshot.module) - set(live))[:5]
            new = sorted(set(live) - set(snapshot.module))[:5]
            return f"module state keys differ: missing {missing}, new {new}"
        for name, saved in snapshot.module.items():
            target = live[name]
            if isinstance(saved, Tensor) and isinstance(target, Tensor) and (
                    saved.shape != target.shape or saved.dtype != target.dtype):
                return (f"module entry {name!r} is {tuple(target.shape)} {target.dtype}, "
                        f"the snapshot's {tuple(saved.shape)} {saved.dtype}")
        opts = [_unwrap(o) for o in _as_list(optimizers)]
        if opts and len(opts) != len(snapshot.optimizers):
            return f"optimizers has {len(opts)} entries, the snapshot {len(snapshot.optimizers)}"
        for k, (opt, state) in enumerate(zip(opts, snapshot.optimizers, strict=False)):
            groups = state.get("param_groups", [])
            sizes = [len(g["params"]) for g in opt.param_groups]
            saved_sizes = [len(g.get("params", ())) for g in groups]
            if sizes != saved_sizes:
                return (f"optimizer {k} has param groups of {sizes} parameters, the "
                        f"snapshot {saved_sizes} (add_param_group since?)")
            params = [p for g in opt.param_groups for p in g["params"]]
            ids = [i for g in groups for i in g.get("params", ())]
            for p, i in zip(params, ids, strict=True):
                live_state = opt.state.get(p, {})
                for key, value in state.get("state", {}).get(i, {}).items():
                    live_value = live_state.get(key) if isinstance(live_state, Mapping) \
                        else None
                    # per-parameter state need not be shaped like the parameter (factored
                    # second moments, 8-bit block scales): compare like with like
                    if isinstance(value, Tensor) and isinstance(live_value, Tensor) and \
                            value.shape != live_value.shape:
                        return (f"optimizer {k} state {key!r} of a parameter is "
                                f"{tuple(live_value.shape)}, the snapshot's "
                                f"{tuple(value.shape)}")
        scheds = _as_list(schedulers)
        if scheds and len(scheds) != len(snapshot.schedulers):
            return f"schedulers has {len(scheds)} entries, the snapshot {len(snapshot.schedulers)}"
        return None

    def restore(
        self,
        module: torch.nn.Module,
        optimizers: Sequence[Any] = (),
        schedulers: Sequence[Any] = (),
        *,
        which: Literal["oldest", "newest"] = "newest",
        before: int | None = None,
    ) -> int:
        """Restore a snapshot bit-identically and drop the snapshots newer than it.

        Args:
            module: The model (same architecture as at :meth:`take`).
            optimizers: The optimizers, in the order given to :meth:`take`; ``()`` leaves the
                optimizer state alone.
            schedulers: The schedulers, in the order given to :meth:`take`; ``()`` leaves the
                schedules alone.
            which: ``"newest"`` (default, see the class docstring) or ``"oldest"`` of the
                candidates.
            before: If given, only snapshots with ``step < before`` are candidates (the first
                step of the trouble).

        Returns:
            The step of the restored snapshot; also :attr:`last_restored` holds it.

        Raises:
            LookupError: If no snapshot was taken before ``before``.
            ValueError: If ``which`` is invalid, or no candidate fits the objects given
                (:meth:`fits`: the message names the newest candidate's mismatch); nothing
                was changed then.
        """
        check_choice("which", which, ("oldest", "newest"))
        candidates = [k for k, s in enumerate(self._snapshots) if before is None or s.step < before]
        if not candidates:
            raise LookupError(f"no snapshot to restore (held: {self.steps}, before={before})")
        if which == "newest":
            candidates.reverse()
        opts = [_unwrap(o) for o in _as_list(optimizers)]
        scheds = _as_list(schedulers)
        reasons = {k: self.fits(self._snapshots[k], module, opts, scheds) for k in candidates}
        fitting = [k for k in candidates if reasons[k] is None]
        if not fitting:
            k = candidates[0]
            raise ValueError(f"no snapshot fits (step {self._snapshots[k].step}: {reasons[k]})")
        k = fitting[0]
        snap = self._snapshots[k]
        _restore_module(module, snap.module)
        for opt, state in zip(opts, snap.optimizers, strict=False):
            _restore_optimizer(opt, state)
        for sched, state in zip(scheds, snap.schedulers, strict=False):
            sched.load_state_dict(_copy_state(state, None, [0]))
        del self._snapshots[k + 1 :]
        self.last_restored = snap
        return snap.step

    def roll_back(
        self,
        module: torch.nn.Module,
        optimizers: Sequence[Any] = (),
        *,
        which: Literal["oldest", "newest"] = "newest",
        before: int | None = None,
    ) -> Snapshot:
        """Recover from a blow-up: weights and moments go back, the current LRs stay.

        The procedure of a training loop that goes on after the rollback (the guard's):

        1. the weights and each optimizer's per-parameter state (moments, step counts) are
           restored bit-identically from the snapshot (as :meth:`restore`, which also
           drops the newer snapshots);
        2. every param group gets its *current* hyper-parameters back — ``lr`` with every
           cut made so far, momentum, betas, ...; a tensor ``lr`` keeps its object and its
           current value. Schedulers are not touched: the step count goes on;
        3. every gradient of ``module`` is cleared.

        Cut the learning rate after this call, not before: the cut then applies to the
        kept learning rates.

        Args:
            module: The model (same architecture as at :meth:`take`).
            optimizers: The optimizers, in the order given to :meth:`take`.
            which: ``"newest"`` (default, see the class docstring) or ``"oldest"``.
            before: If given, only snapshots with ``step < before`` are candidates (the first
                step of the trouble).

        Returns:
            The restored snapshot; its ``extra`` holds what was stored with it (e.g. detector
            states to load back). Do not modify it: it stays in the buffer.

        Raises:
            LookupError: If no snapshot was taken before ``before`` (or none at all).
            ValueError: As :meth:`restore`: no candidate fits; nothing was changed.

        Example:
            >>> import torch
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            >>> buf = RollbackBuffer(every_n_steps=1)
            >>> _ = buf.take(0, model, [opt], extra={"note": "start"})
            >>> weights = model.weight.detach().clone()
            >>> model(torch.ones(1, 2)).sum().backward()
            >>> opt.step()
            >>> _ = scale_lr(opt, (), 0.5)  # a cut made after the snapshot
            >>> buf.roll_back(model, [opt]).extra
            {'note': 'start'}
            >>> torch.equal(model.weight, weights), opt.param_groups[0]["lr"]
            (True, 0.05)
            >>> model.weight.grad is None, opt.state[model.weight]
            (True, {})
        """
        opts = [_unwrap(o) for o in _as_list(optimizers)]
        kept = [_hyperparameters(o) for o in opts]
        self.restore(module, opts, which=which, before=before)
        for opt, groups in zip(opts, kept, strict=True):
            _put_hyperparameters(opt, groups)
        for p in module.parameters():
            p.grad = None
        assert self.last_restored is not None
        return self.last_restored


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every param group's entries but ``params``; tensors are copied (their values count)."""
    return [{k: v.detach().clone() if isinstance(v, Tensor) else v
             for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _put_hyperparameters(optimizer: torch.optim.Optimizer,
                         groups: Sequence[Mapping[str, Any]]) -> None:
    """Give each param group the entries of :func:`_hyperparameters` back.

    A tensor entry that is a tensor in the group too is copied into the group's tensor, so
    a fused/capturable optimizer keeps its tensor objects.
    """
    with torch.no_grad():
        for group, saved in zip(optimizer.param_groups, groups, strict=True):
            for key, value in saved.items():
                live = group.get(key)
                if isinstance(value, Tensor) and isinstance(live, Tensor):
                    live.copy_(value)
                else:
                    group[key] = value


def _restore_module(module: torch.nn.Module, saved: Mapping[str, Any]) -> None:
    live = module.state_dict()
    if set(live) != set(saved):
        missing = sorted(set(saved) - set(live))[:5]
        unexpected = sorted(set(live) - set(saved))[:5]
        raise ValueError(
            f"module state keys differ from the snapshot: missing {missing}, new {unexpected}"
        )
    other: dict[str, Any] = {}
    with torch.no_grad():
        for name, value in saved.items():
            target = live[name]
            if isinstance(value, Tensor) and isinstance(target, Tensor):
                target.copy_(value)
            else:
                other[name] = copy.deepcopy(value)
    if other:  # e.g. ``get_extra_state`` entries
        module.load_state_dict(other, strict=False)


def _restore_optimizer(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    # Tensor-valued group entries (a tensor lr of a fused/capturable optimizer) must keep
    # their identity and device: load_state_dict would replace them with the CPU copies.
    keep = [{k: v for k, v in g.items() if isinstance(v, Tensor)} for g in optimizer.param_groups]
    # load_state_dict aliases tensors that are already on the right device (and keeps
    # ``step`` as is): load a fresh copy so the snapshot stays pristine for a later restore.
    optimizer.load_state_dict(_copy_state(saved, None, [0]))
    with torch.no_grad():
        for group, tensors in zip(optimizer.param_groups, keep, strict=True):
            for key, original in tensors.items():
                loaded = group.get(key)
                if isinstance(loaded, Tensor):
                    original.copy_(loaded)
                elif loaded is not None:
                    original.fill_(loaded)
                group[key] = original


def nonfinite_state(module: torch.nn.Module,
                    optimizers: Sequence[Any] = ()) -> tuple[list[str], list[list[Tensor]]]:
    """Which parameters, and which parameters' optimizer state, hold a NaN or an infinity.

    Buffers are not looked at (an attention mask of ``-inf`` is no fault).

    One host read per device (a trouble step's cost, never a healthy step's): a skipped
    step cannot cure either, so the guard checks after a non-finite step.

    Args:
        module: The model.
        optimizers: Its optimizers (wrappers with ``_optimizer`` are unwrapped).

    Returns:
        ``(weights, state)``: the names of the non-finite parameters, and per
        optimizer the parameters whose state (moments, ...) has a non-finite entry.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(model.parameters())
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> opt.step()
        >>> opt.state[model.bias]["exp_avg_sq"].fill_(float("nan"))  # doctest: +ELLIPSIS
        tensor(...)
        >>> weights, state = nonfinite_state(model, [opt])
        >>> weights, [p is model.bias for p in state[0]]
        ([], [True])
    """
    named = [(name, t) for name, t in module.named_parameters()
             if t.is_floating_point() or t.is_complex()]
    opts = [_unwrap(o) for o in _as_list(optimizers)]
    owners: list[tuple[int, Tensor]] = []  # (optimizer, parameter) of each state tensor
    tensors = [t.detach() for _, t in named]
    for k, opt in enumerate(opts):
        for p, entry in opt.state.items():
            for v in entry.values() if isinstance(entry, Mapping) else ():
                if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex()):
                    owners.append((k, p))
                    tensors.append(v.detach())
    bad: list[bool] = [False] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        flags = torch.stack([~torch.isfinite(tensors[i]).all() for i in indices])
        for i, flag in zip(indices, flags.tolist(), strict=True):
            bad[i] = bool(flag)
    weights = [name for (name, _), b in zip(named, bad, strict=False) if b]
    state: list[list[Tensor]] = [[] for _ in opts]
    for (k, p), b in zip(owners, bad[len(named):], strict=True):
        if b and all(q is not p for q in state[k]):
            state[k].append(p)
    return weights, state


def reset_state(optimizer: Any, params: Iterable[Tensor]) -> int:
    """Drop the optimizer state of ``params``: the optimizer starts them afresh.

    The repair of a poisoned moment when no snapshot can be restored: Adam re-creates
    ``exp_avg``, ``exp_avg_sq`` and ``step`` for those parameters at its next step (its
    bias correction starts again for them); momentum buffers start from the next gradient.

    Args:
        optimizer: The optimizer (a wrapper with ``_optimizer`` is unwrapped).
        params: Parameters whose state goes.

    Returns:
        How many parameters had a state that was dropped.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adam([w])
        >>> w.sum().backward(); opt.step()
        >>> reset_state(opt, [w]), dict(opt.state)
        (1, {})
    """
    opt = _unwrap(optimizer)
    return sum(opt.state.pop(p, None) is not None for p in params)
