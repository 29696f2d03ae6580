"""The recording options, declared and validated once: :class:`RecorderConfig`.

:class:`~lr_monitor.recording.StepRecorder`, :func:`~lr_monitor.recording.attach` and
:class:`~lr_monitor.StepSizeMonitor` take the same keyword arguments (``prefix``,
``granularity``, ``include``, ``exclude``, ``update_cosine``, ``cosine_samples``,
``consecutive``, ``consecutive_tensors``, ``log_global``, ``statistics``); each builds one frozen
:class:`RecorderConfig` from them and keeps it. A bad value fails at once with the
project's message, naming the argument the user typed.

Example:
    >>> config = RecorderConfig(granularity="tensor", exclude="bias$")
    >>> config.tensor_row("net.0.weight"), config.tensor_row("net.0.bias")
    (True, False)
    >>> RecorderConfig(cosine_samples=0)
    Traceback (most recent call last):
    ...
    ValueError: cosine_samples=0 is invalid: must be an int >= 1
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from lr_monitor._validation import check_bool, check_choice, check_int, check_regex, invalid
from lr_monitor.recording.record import StepRecord
from lr_monitor.tags import DEFAULT_PREFIX, GLOBAL

__all__ = ["GRANULARITIES", "STATISTICS_PATHS", "RecorderConfig"]

#: The values of ``granularity``: rows per param group, or also per parameter tensor.
GRANULARITIES = ("group", "tensor")

#: The values of ``statistics`` (:mod:`lr_monitor.recording.compiler`).
STATISTICS_PATHS = ("auto", "compiled", "eager")


@dataclass(frozen=True)
class RecorderConfig:
    """What a recorder measures and which rows become tags.

    Args:
        prefix: First component of every tag (:func:`lr_monitor.tags.stat_tag`); a
            non-empty string not starting with ``/``.
        granularity: ``"group"``: one row per param group plus
            :data:`~lr_monitor.tags.GLOBAL`. ``"tensor"``: also one row per parameter
            tensor (filtered by ``include`` and ``exclude``); can be thousands of series
            on a large model.
        include: Regex on parameter names; with ``granularity="tensor"`` only matching
            names get a row.
        exclude: Regex on parameter names that get no tensor row.
        update_cosine: Keep a subsample of the last recorded update of each tensor (at most
            ``cosine_samples`` values) to compute ``update_cosine``.
        cosine_samples: Subsample size per tensor for ``update_cosine`` and the
            consecutive-step statistics (>= 1).
        consecutive: Measure, at every step, the cosines between consecutive updates and
            between the gradient and the previous update on a fixed subsample, and record
            their means since the previous record as the ``global`` row's
            :data:`~lr_monitor.tags.CONSECUTIVE_STATISTICS`
            (:mod:`lr_monitor.recording.consecutive`). No host transfer on unrecorded
            steps, but about ten small device operations on every step: off by default
            (measured on CPU: ~1 % of a 60–100 ms step, ~7 % of a 4 ms one).
        consecutive_tensors: Parameter tensors the consecutive statistics gather per step
            (>= 1); an optimizer with more gets a fixed size-proportional sample of them,
            weighted to stay unbiased (``select_tensors``).
        log_global: Whether the ``global`` row (all groups of an optimizer) becomes tags.
            It is always computed, so listeners of the record can read it.
        statistics: How the statistics of Adam and AdamW groups are computed:
            ``"auto"`` or ``"compiled"`` (``torch.compile``'d kernels, compiled at the
            first recorded step, which waits for it; eager wherever compiling fails, and
            for ``"auto"`` when ``LR_MONITOR_COMPILE=0``) or ``"eager"``
            (:mod:`lr_monitor.recording.compiler`). Other optimizers always take the
            generic path. The statistics are the same on every path (float tolerance).

    Raises:
        ValueError: for a value outside the allowed ones; the message names the argument.
    """

    prefix: str = DEFAULT_PREFIX
    granularity: str = "group"
    include: str | None = None
    exclude: str | None = None
    update_cosine: bool = True
    cosine_samples: int = 4096
    consecutive: bool = False
    consecutive_tensors: int = 64
    log_global: bool = True
    statistics: str = "auto"
    _include: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _exclude: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not self.prefix or self.prefix.startswith("/"):
            raise invalid("prefix", self.prefix, "a non-empty string not starting with '/'")
        check_choice("granularity", self.granularity, GRANULARITIES)
        object.__setattr__(self, "_include", check_regex("include", self.include))
        object.__setattr__(self, "_exclude", check_regex("exclude", self.exclude))
        check_bool("update_cosine", self.update_cosine)
        check_int("cosine_samples", self.cosine_samples, 1)
        check_bool("consecutive", self.consecutive)
        check_int("consecutive_tensors", self.consecutive_tensors, 1)
        check_bool("log_global", self.log_global)
        check_choice("statistics", self.statistics, STATISTICS_PATHS)

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments, e.g. to build a recorder with the same ones.

        Example:
            >>> RecorderConfig(**RecorderConfig(prefix="opt").as_kwargs()).prefix
            'opt'
        """
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def tensor_row(self, name: str | None) -> bool:
        """Whether the parameter called ``name`` gets a row of its own.

        Args:
            name: The parameter's name (``None``: unnamed, never a row).

        Example:
            >>> RecorderConfig(granularity="tensor", include="weight").tensor_row("fc.bias")
            False
        """
        if self.granularity != "tensor" or name is None:
            return False
        if self._include is not None and not self._include.search(name):
            return False
        return not (self._exclude is not None and self._exclude.search(name))

    def metrics(self, record: StepRecord) -> dict[str, float]:
        """The tags of ``record`` this configuration logs, as ``{tag: value}``.

        Every row, except :data:`~lr_monitor.tags.GLOBAL` when ``log_global`` is off.

        Example:
            >>> r = StepRecord("SGD", 0, {"pg0": {"lr": 0.1}, "global": {"lr": 0.1}})
            >>> RecorderConfig(log_global=False).metrics(r)
            {'optim/lr/SGD/pg0': 0.1}
        """
        rows = None if self.log_global else [r for r in record.rows if r != GLOBAL]
        return record.metrics(self.prefix, rows=rows)
