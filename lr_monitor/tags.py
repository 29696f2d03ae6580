"""Every name lr-monitor writes: tags, statistics, file names, optimizer and group names.

The one place to look up what a tag means and where it comes from. Writers
(:mod:`lr_monitor.recording`, :mod:`lr_monitor.callbacks`) build names with these functions
and readers (:mod:`lr_monitor.cli`) parse them with these functions; no other module spells
a tag. Every tag is documented in ``docs/metrics.md``.

Scalar tags of the step statistics::

    <prefix>/<stat>/<optimizer>/<row>        e.g. optim/eff_lr/p50/Adam/pg0

``<prefix>`` is :data:`DEFAULT_PREFIX` unless the user chose another, ``<stat>`` one of
:data:`STATISTICS`, ``<optimizer>`` from :func:`optimizer_names`, ``<row>`` a param-group
name from :func:`group_names`, :data:`GLOBAL` (all groups of the optimizer) or a parameter
name (``granularity="tensor"``).

Example:
    >>> stat_tag("optim", "eff_lr/p50", "Adam", "pg0")
    'optim/eff_lr/p50/Adam/pg0'
    >>> parse_stat_tag("optim/eff_lr/p50/Adam-1/global")
    ('eff_lr/p50', 'Adam-1', 'global')
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "CONSECUTIVE_STATISTICS",
    "CURVATURE_STATISTICS",
    "DEFAULT_PREFIX",
    "EVENTS_FILENAME",
    "GLOBAL",
    "GRAD_HISTOGRAM",
    "GUARD_EVENTS",
    "GUARD_LR_SCALE",
    "LR_HISTOGRAM",
    "MAX_FOUND_LOSS_TAGS",
    "NOISE_STATISTICS",
    "STATISTICS",
    "STEP_QUALITY_STATISTICS",
    "STEP_STATISTICS",
    "SUPERSEDED_EVENTS_FILENAME",
    "TENSORBOARD_FILE_MARK",
    "TRAIN_ACC",
    "TRAIN_LOSS",
    "TRAIN_LOSS_NAMES",
    "USER_METRICS",
    "VAL_ACC",
    "VAL_LOSS",
    "VAL_LOSS_NAMES",
    "find_loss_tags",
    "find_val_loss_tag",
    "group_names",
    "histogram_tag",
    "is_loss_like",
    "is_tensorboard_file",
    "lr_key",
    "optimizer_names",
    "parse_stat_tag",
    "stat_pattern",
    "stat_tag",
]

#: The first component of every statistics tag unless the user chooses another.
DEFAULT_PREFIX = "optim"

#: The row of all param groups of one optimizer together.
GLOBAL = "global"

#: The statistics of one recorded step (:mod:`lr_monitor.functional.statistics` and the
#: group's ``lr``), as the part of the tag between the prefix and ``<optimizer>/<row>``, in
#: the order ``docs/metrics.md`` explains them.
STEP_STATISTICS = (
    "lr",
    "eff_lr/p05",
    "eff_lr/p50",
    "eff_lr/p95",
    "eff_lr/min",
    "eff_lr/max",
    "eps_dominated_frac",
    "grad_norm",
    "param_norm",
    "update_norm",
    "update_ratio",
    "exp_avg_norm",
    "exp_avg_sq_sqrt_mean",
    "update_lost_frac",
    "update_cosine",
    "nonfinite",
)

#: Overshoot between consecutive steps, measured at every step on a fixed subsample and
#: logged as running means since the previous record (``global`` row only):
#: ``consecutive_update_cosine`` = cos(Δ_t, Δ_{t−1}), ``grad_update_cosine`` =
#: cos(g_t, Δ_{t−1}) (> 0: the new gradient points back along the last step),
#: ``overshoot_frac`` = share of steps with g_t·Δ_{t−1} > 0.
CONSECUTIVE_STATISTICS = ("consecutive_update_cosine", "grad_update_cosine", "overshoot_frac")

#: Step quality from one extra forward pass on the step's own batch (``global`` row):
#: ``step_quality`` ρ = (L_B(θ+Δ) − L_B(θ)) / (g_B·Δ), Cockpit's ``step_alpha`` = 1 − 2ρ and
#: ``step_slope`` = g_B·Δ (< 0: the step pointed downhill on its batch; only then does ρ < 0
#: mean that the loss went up).
STEP_QUALITY_STATISTICS = ("step_quality", "step_alpha", "step_slope")

#: Curvature on a fixed batch (``global`` row): the top Hessian eigenvalue, the top
#: eigenvalue of the preconditioned Hessian, the optimizer's stability threshold and
#: their ratio (sharpness that matters for the optimizer / threshold).
CURVATURE_STATISTICS = ("sharpness", "preconditioned_sharpness", "stability_threshold",
                        "stability_ratio")

#: The gradient noise scale B_simple = tr Σ / |G|² (``global`` row).
NOISE_STATISTICS = ("gradient_noise_scale",)

#: Every statistic name that can stand in a statistics tag.
STATISTICS = (STEP_STATISTICS + CONSECUTIVE_STATISTICS + STEP_QUALITY_STATISTICS
              + CURVATURE_STATISTICS + NOISE_STATISTICS)

#: TensorBoard histogram of log10 of the effective learning rate, per group.
LR_HISTOGRAM = "log10_eff_lr"
#: TensorBoard histogram of the gradient values, per group (``grad_histograms=True``).
GRAD_HISTOGRAM = "grad"

#: The guard's cumulative learning-rate multiplier (1.0: never cut).
GUARD_LR_SCALE = "guard/lr_scale"
#: The number of guard events so far.
GUARD_EVENTS = "guard/events"

#: The run's record of guard decisions and faults, one JSON object per line.
EVENTS_FILENAME = "events.jsonl"
#: Where a resumed run moves the events written after the checkpoint it resumed from (a
#: timeline that no longer exists); not read by ``lr-monitor report``.
SUPERSEDED_EVENTS_FILENAME = "events.superseded.jsonl"

#: Part of every TensorBoard event file's name (``events.out.tfevents.<time>.<host>...``).
TENSORBOARD_FILE_MARK = "tfevents"

#: Scalars a LightningModule typically logs itself (the names of Lightning's examples; not
#: written by lr-monitor): ``lr-monitor report`` summarises them and ``plot`` draws the
#: losses when present.
TRAIN_LOSS = "train/loss"
TRAIN_ACC = "train/acc"
VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"
USER_METRICS = (TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC)

#: The training-loss tags ``report`` and ``plot`` look for, in this order, when no
#: ``--loss-tag`` is given: this project's examples, then what Lightning writes for
#: ``self.log("train_loss", ...)`` and ``self.log("loss", ...)`` (Lightning's own examples),
#: with ``on_step=True, on_epoch=True`` too (``_step`` is the per-step series).
TRAIN_LOSS_NAMES = (TRAIN_LOSS, "train_loss", "train/loss_step", "train_loss_step", "loss",
                    "loss_step", "train/loss_epoch", "train_loss_epoch", "loss_epoch")

#: The validation-loss tags looked for, in this order.
VAL_LOSS_NAMES = (VAL_LOSS, "val_loss", "val/loss_epoch", "val_loss_epoch", "valid/loss",
                  "valid_loss", "validation/loss", "validation_loss")

#: The most training-loss tags found by :func:`find_loss_tags` when none has a known name.
MAX_FOUND_LOSS_TAGS = 4

_LOSS_WORD = re.compile(r"(?:^|[^a-z])loss(?:$|[^a-z])", re.IGNORECASE)
_EVAL_HEAD = re.compile(r"^(?:val|valid|validation|test|eval)(?:$|[^a-z])", re.IGNORECASE)


def is_loss_like(tag: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether a tag names a loss: its last component holds the word ``loss``.

    Statistics tags (:func:`parse_stat_tag`) and the guard's own tags never are.

    Example:
        >>> [is_loss_like(t) for t in ("g_loss", "train/loss", "lossy", "optim/lr/Adam/pg0")]
        [True, True, False, False]
    """
    if tag.startswith("guard/") or parse_stat_tag(tag, prefix) is not None:
        return False
    return _LOSS_WORD.search(tag.rsplit("/", 1)[-1]) is not None


def _is_eval(tag: str) -> bool:
    return any(_EVAL_HEAD.match(part) for part in tag.split("/"))


def find_loss_tags(tags: Iterable[str], prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The training-loss tags of a run, for ``report`` and ``plot``.

    The first of :data:`TRAIN_LOSS_NAMES` present, alone. Failing that, every loss-like
    tag (:func:`is_loss_like`) that is not a validation or test one (no component starting
    with ``val``, ``valid``, ``validation``, ``test`` or ``eval``), sorted, at most
    :data:`MAX_FOUND_LOSS_TAGS`; of ``x_step`` and ``x_epoch`` only ``x_step``. A GAN's
    ``g_loss`` and ``d_loss`` are both found.

    Args:
        tags: The run's scalar tags.
        prefix: The monitor's tag prefix (its tags are never losses).

    Returns:
        The tags, possibly empty.

    Example:
        >>> find_loss_tags(["epoch", "train_loss", "loss", "val_loss"])
        ['train_loss']
        >>> find_loss_tags(["g_loss", "d_loss", "val_g_loss", "epoch"])
        ['d_loss', 'g_loss']
        >>> find_loss_tags(["recon_loss_step", "recon_loss_epoch"])
        ['recon_loss_step']
    """
    present = set(tags)
    for name in TRAIN_LOSS_NAMES:
        if name in present:
            return [name]
    found = sorted(t for t in present if is_loss_like(t, prefix) and not _is_eval(t))
    found = [t for t in found
             if not (t.endswith("_epoch") and f"{t[:-len('_epoch')]}_step" in present)]
    return found[:MAX_FOUND_LOSS_TAGS]


def find_val_loss_tag(tags: Iterable[str], prefix: str = DEFAULT_PREFIX) -> str | None:
    """The validation-loss tag of a run, or ``None``.

    The first of :data:`VAL_LOSS_NAMES` present; else the first loss-like tag (sorted)
    with a component starting with ``val``, ``valid`` or ``validation``.

    Args:
        tags: The run's scalar tags.
        prefix: The monitor's tag prefix.

    Returns:
        The tag, or ``None`` when there is none.

    Example:
        >>> find_val_loss_tag(["val_loss", "val/loss"]), find_val_loss_tag(["valid/nll_loss"])
        ('val/loss', 'valid/nll_loss')
    """
    present = set(tags)
    for name in VAL_LOSS_NAMES:
        if name in present:
            return name
    found = sorted(t for t in present if is_loss_like(t, prefix)
                   and any(re.match(r"(?i)val(?:id|idation)?(?:$|[^a-z])", part)
                           for part in t.split("/")))
    return found[0] if found else None

_STAT_PATTERN = "|".join(re.escape(s) for s in sorted(STATISTICS, key=len, reverse=True))


def stat_tag(prefix: str, stat: str, optimizer: str, row: str) -> str:
    """The scalar tag of one statistic of one row.

    Args:
        prefix: The tag prefix (e.g. :data:`DEFAULT_PREFIX`).
        stat: One of :data:`STATISTICS`.
        optimizer: The optimizer's name (:func:`optimizer_names`).
        row: A group name, :data:`GLOBAL` or a parameter name.

    Example:
        >>> stat_tag("optim", "update_ratio", "SGD", "global")
        'optim/update_ratio/SGD/global'
    """
    return f"{prefix}/{stat}/{optimizer}/{row}"


def stat_pattern(prefix: str, stat: str) -> str:
    """A regular expression matching every row of one statistic (TensorBoard's Custom Scalars).

    Example:
        >>> import re
        >>> pattern = stat_pattern("optim", "eff_lr/p50")
        >>> bool(re.match(pattern, "optim/eff_lr/p50/Adam/pg0"))
        True
        >>> bool(re.match(pattern, "optim/eff_lr/p50x/Adam/pg0"))
        False
    """
    return "^" + stat_tag(re.escape(prefix), re.escape(stat), "[^/]+", ".+") + "$"


def histogram_tag(prefix: str, kind: str, optimizer: str, group: str) -> str:
    """The tag of a TensorBoard histogram (:data:`LR_HISTOGRAM` or :data:`GRAD_HISTOGRAM`).

    Example:
        >>> histogram_tag("optim", LR_HISTOGRAM, "Adam", "pg0")
        'optim/log10_eff_lr/Adam/pg0'
    """
    return f"{prefix}/{kind}/{optimizer}/{group}"


def parse_stat_tag(tag: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str, str] | None:
    """Split a statistics tag into ``(stat, optimizer, row)``; the inverse of :func:`stat_tag`.

    Args:
        tag: A scalar tag such as ``"optim/eff_lr/p50/Adam/global"``.
        prefix: The tag prefix (``""`` for none).

    Returns:
        The parts, or ``None`` when ``tag`` is not a statistics tag.

    Example:
        >>> parse_stat_tag("optim/lr/SGD/encoder")
        ('lr', 'SGD', 'encoder')
        >>> parse_stat_tag("train/loss") is None
        True
    """
    head = f"{re.escape(prefix)}/" if prefix else ""
    match = re.fullmatch(rf"{head}({_STAT_PATTERN})/([^/]+)/(.+)", tag)
    return None if match is None else (match[1], match[2], match[3])


def is_tensorboard_file(name: str) -> bool:
    """Whether a file name is a TensorBoard event file's.

    Example:
        >>> is_tensorboard_file("events.out.tfevents.1700000000.host.1.0")
        True
    """
    return TENSORBOARD_FILE_MARK in name


def optimizer_names(optimizers: Iterable[Any]) -> list[str]:
    """Names like Lightning's ``LearningRateMonitor``: ``Adam``, ``Adam-1``, ``SGD``.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> optimizer_names([torch.optim.Adam([p]), torch.optim.SGD([p]), torch.optim.Adam([p])])
        ['Adam', 'SGD', 'Adam-1']
    """
    seen: dict[str, int] = {}
    out = []
    for opt in optimizers:
        base = type(opt).__name__
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(base if n == 0 else f"{base}-{n}")
    return out


def group_names(param_groups: Iterable[Mapping[str, Any]]) -> list[str]:
    """``group["name"]`` where set, else ``pg<i>``; a clash gets a ``-<i>`` suffix.

    A group named :data:`GLOBAL` is renamed too, so the all-groups row stays unique.

    Args:
        param_groups: An optimizer's ``param_groups``.

    Example:
        >>> group_names([{"name": "enc"}, {}, {"name": "enc"}, {"name": "global"}])
        ['enc', 'pg1', 'enc-2', 'global-3']
    """
    names: list[str] = []
    for i, g in enumerate(param_groups):
        name = str(g.get("name", f"pg{i}"))
        if name == GLOBAL or name in names:
            name = f"{name}-{i}"
        names.append(name)
    return names


def lr_key(optimizer: str, group: str) -> str:
    """The key of one group's learning rate in a guard event (``lr_before``/``lr_after``).

    Example:
        >>> lr_key("Adam", "pg0")
        'Adam/pg0'
    """
    return f"{optimizer}/{group}"
