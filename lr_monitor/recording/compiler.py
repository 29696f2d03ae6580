"""Which kernels reduce Adam-form tensors: ``torch.compile``'d or eager, chosen once.

:func:`lr_monitor.functional.fused.moment_fields` and
:func:`~lr_monitor.functional.fused.moment_pack` compile (``torch.compile``, dynamic
shapes) into one fused loop each per dtype and device type: C++ on the CPU, Triton on a
GPU. A compile takes seconds to tens of seconds, once per process; after it no call
recompiles (one graph for every tensor length). :class:`MomentKernels` picks the kernels:

* ``"auto"`` (default) and ``"compiled"``: compile at the first recorded step of a dtype
  and device, in the training thread (that step waits for it), check the compiled kernels
  against the eager ones on a small input, and use them from then on. The environment
  variable ``LR_MONITOR_COMPILE=0`` makes ``"auto"`` eager.
* ``"eager"``: never compile.

The compile runs in the training thread on purpose: dynamo saves and restores
process-wide state around a compile (torch's and Python's random generators, the default
dtype, the deterministic-algorithms flag), so a compile on another thread rewinds the
random streams the training thread drew from meanwhile (measured: 645 of 1,000 draws of
``torch.rand`` changed). A monitor must not change the run it watches.

A compile that fails (no compiler, a backend error, results that disagree with the eager
kernels) leaves the eager kernels in place for the rest of the process, and the outcome is
logged once per dtype/device (logger ``lr_monitor``: ``info`` when it works, ``warning``
when it does not). Compiled kernels are shared by every recorder of the process.

Example:
    >>> kernels = MomentKernels("eager")
    >>> kernels.path(torch.float32, torch.device("cpu"))
    'eager'
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lr_monitor._validation import check_choice
from lr_monitor.functional.fused import (
    ROW_NUMEL,
    combine_rows,
    moment_fields,
    moment_fields_eager,
    moment_pack,
    moment_pack_eager,
    moment_rows,
)
from lr_monitor.recording.config import STATISTICS_PATHS

__all__ = ["COMPILE_ENV", "CompileState", "MomentKernels"]

#: ``LR_MONITOR_COMPILE=0`` makes ``"auto"`` eager (e.g. on machines without a compiler).
COMPILE_ENV = "LR_MONITOR_COMPILE"

log = logging.getLogger("lr_monitor")


@dataclass
class CompileState:
    """The compiled kernels of one (dtype, device type), shared by the process.

    Args:
        status: ``"ready"`` or ``"failed"``.
        fields: The compiled :func:`~lr_monitor.functional.fused.moment_fields`.
        rows: The compiled :func:`~lr_monitor.functional.fused.moment_rows`.
        pack: The compiled :func:`~lr_monitor.functional.fused.moment_pack`.
        seconds: Wall time of the compile (and its check).
        error: Why it failed.
    """

    status: str = "failed"
    fields: Any = None
    rows: Any = None
    pack: Any = None
    seconds: float = 0.0
    error: str | None = None


_STATES: dict[tuple[torch.dtype, str], CompileState] = {}
_LOCK = threading.Lock()

#: The histogram's binning, as :mod:`lr_monitor.functional.statistics` passes it.
_BINS = (-16.0, 50.0, 1100)


def _example(dtype: torch.dtype, device: torch.device, per_element: bool) -> list[Tensor]:
    """A small input with every case the kernels meet (ε-dominated, rounded away, decay)."""
    g = torch.Generator().manual_seed(0)
    n = 4099  # neither 0 nor 1 (specialized by dynamic shapes), and not a multiple of 8
    theta = torch.randn(n, generator=g, dtype=torch.float64) * 10
    theta[0] = 1e15  # its update is rounded away
    grad, m = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(
        n, generator=g, dtype=torch.float64) * 1e-3
    v = torch.rand(n, generator=g, dtype=torch.float64) ** 4 * 1e-6
    tensors = [x.to(device=device, dtype=dtype) for x in (theta, grad, m, v)]
    scalars = [torch.tensor(x, dtype=dtype, device=device)
               for x in (-1e-3 / 0.1, 0.3, 1e-8, 1e-3, 1e-4)]
    if per_element:  # a pack: step size, √bc2 and c per tensor, expanded; ε and k shared
        scalars = [x.expand(n).contiguous() if i in (0, 1, 3) else x
                   for i, x in enumerate(scalars)]
    return [*tensors, *scalars]


def _by_rows(fields: Any, rows: Any, theta: Tensor, grad: Tensor, m: Tensor, v: Tensor,
             *scalars: Tensor) -> Tensor:
    """The fields of a flat tensor: whole rows of ``ROW_NUMEL`` by ``rows``, the rest eager.

    The body keeps at least 2 rows (a size of 1 would be specialized by dynamic shapes: a
    recompile); a tensor of fewer elements goes to ``fields`` whole. Inputs at a storage
    offset (views into a flat buffer, DDP's bucket views) compile one more graph, once.
    """
    # Plain aliases, not views: dynamo guards on a view's base (a recompile per kind).
    theta, grad, m, v = (t.detach() for t in (theta, grad, m, v))
    n = theta.numel()
    body = n - n % ROW_NUMEL
    if body < 2 * ROW_NUMEL:
        return fields(theta, grad, m, v, *scalars)  # type: ignore[no-any-return]
    parts = [rows(*(t[:body].view(-1, ROW_NUMEL).detach() for t in (theta, grad, m, v)),
                  *scalars)]
    if body < n:  # eager: a slice at an offset would be one more graph (0/1 specialization)
        neg, sb, eps, c, decay = scalars
        parts.append(moment_fields_eager(theta[body:], grad[body:], m[body:], v[body:], neg,
                                         sb, eps, c, decay)[:, None])
    return combine_rows(torch.cat(parts, dim=1))


def _close(got: Tensor, want: Tensor) -> bool:
    return bool(torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-12,
                               equal_nan=True))


def _compile(key: tuple[torch.dtype, str], device: torch.device, state: CompileState) -> None:
    """Compile both kernels, run them once and check them against the eager ones."""
    t0 = time.perf_counter()
    try:
        fields = torch.compile(moment_fields, dynamic=True, fullgraph=True)
        rows = torch.compile(moment_rows, dynamic=True, fullgraph=True)
        pack = torch.compile(moment_pack, dynamic=True, fullgraph=True)
        theta, grad, m, v, neg, sb, eps, c, decay = _example(key[0], device, False)
        want = moment_fields_eager(theta, grad, m, v, neg, sb, eps, c, decay)
        for got in (fields(theta, grad, m, v, neg, sb, eps, c, decay),  # both graphs
                    _by_rows(fields, rows, theta, grad, m, v, neg, sb, eps, c, decay)):
            if not _close(got, want):
                raise RuntimeError("compiled statistics disagree with eager ones: "
                                   f"{got.tolist()} vs {want.tolist()}")
        theta, grad, m, v, neg, sb, eps, c, decay = _example(key[0], device, True)
        got_p = pack(theta, grad, m, v, neg, sb, eps, c, decay, *_BINS)
        want_p = moment_pack_eager(theta, grad, m, v, neg, sb, eps, c, decay, *_BINS)
        if not (_close(got_p[0], want_p[0]) and _close(got_p[2], want_p[2])
                and float((got_p[1] != want_p[1]).double().mean()) < 0.01):
            raise RuntimeError("compiled pack statistics disagree with eager ones")
        state.fields, state.rows, state.pack = fields, rows, pack
        state.status = "ready"
        log.info("lr_monitor: compiled statistics kernels for %s on %s ready after %.1f s",
                 key[0], key[1], time.perf_counter() - t0)
    except Exception as exc:  # any compiler or backend failure: stay eager
        state.status = "failed"
        text = str(exc).strip()
        state.error = (f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text
                       else type(exc).__name__)
        log.warning("lr_monitor: torch.compile of the statistics kernels for %s on %s "
                    "failed (%s); the eager kernels are used", key[0], key[1], state.error)
    finally:
        state.seconds = time.perf_counter() - t0


class MomentKernels:
    """The kernels of :func:`~lr_monitor.functional.statistics.step_sums` (``kernel``).

    A :class:`~lr_monitor.functional.fused.MomentKernel`: it runs the compiled kernels of
    the input's dtype and device (compiling them at the first call), or the eager ones
    when compiling is off or failed.

    Args:
        statistics: ``"auto"``, ``"compiled"`` or ``"eager"`` (module docstring).

    Raises:
        ValueError: for another value of ``statistics``.
    """

    def __init__(self, statistics: str = "auto") -> None:
        self.statistics = check_choice("statistics", statistics, STATISTICS_PATHS)
        self._compile = statistics == "compiled" or (
            statistics == "auto" and os.environ.get(COMPILE_ENV, "1").strip() != "0")

    def state(self, dtype: torch.dtype, device: torch.device) -> CompileState | None:
        """The compile state of ``(dtype, device type)``, compiled now if it is not yet.

        Args:
            dtype: A parameter dtype.
            device: A device.

        Returns:
            ``None`` when this instance does not compile.
        """
        if not self._compile:
            return None
        key = (dtype, device.type)
        with _LOCK:  # one compile per key, whichever thread records first
            state = _STATES.get(key)
            if state is None:
                state = CompileState()
                _compile(key, device, state)
                _STATES[key] = state
        return state

    def path(self, dtype: torch.dtype, device: torch.device) -> str:
        """``"compiled"``, ``"uncompiled"`` (compiled at the next call) or ``"eager"``.

        Never compiles.

        Args:
            dtype: A parameter dtype.
            device: A device.
        """
        if not self._compile:
            return "eager"
        state = _STATES.get((dtype, device.type))
        if state is None:
            return "uncompiled"
        return "compiled" if state.status == "ready" else "eager"

    def _ready(self, theta: Tensor) -> CompileState | None:
        state = self.state(theta.dtype, theta.device)
        return state if state is not None and state.status == "ready" else None

    @staticmethod
    def _failed(state: CompileState, exc: Exception) -> None:
        state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        log.warning("lr_monitor: the compiled statistics kernels failed (%s); the eager "
                    "kernels are used from now on", state.error)

    def __call__(self, theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
                 sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None) -> Tensor:
        """:func:`~lr_monitor.functional.fused.moment_fields` on the best ready kernel.

        Args:
            theta: See :func:`~lr_monitor.functional.fused.moment_fields`.
            grad: See :func:`~lr_monitor.functional.fused.moment_fields`.
            m: See :func:`~lr_monitor.functional.fused.moment_fields`.
            v: See :func:`~lr_monitor.functional.fused.moment_fields`.
            neg_step: See :func:`~lr_monitor.functional.fused.moment_fields`.
            sqrt_bc2: See :func:`~lr_monitor.functional.fused.moment_fields`.
            eps: See :func:`~lr_monitor.functional.fused.moment_fields`.
            eff_c: See :func:`~lr_monitor.functional.fused.moment_fields`.
            decay: See :func:`~lr_monitor.functional.fused.moment_fields`.

        Returns:
            The fields (the eager kernel's when there is no compiled one).
        """
        state = self._ready(theta)
        if state is not None:
            try:  # one graph: no decay is k = 0
                return _by_rows(state.fields, state.rows, theta, grad, m, v, neg_step,
                                sqrt_bc2, eps, eff_c, _zero_if_none(decay, theta))
            except Exception as exc:  # a guard the compile did not foresee: stay eager
                self._failed(state, exc)
        return moment_fields_eager(theta, grad, m, v, neg_step, sqrt_bc2, eps, eff_c, decay)

    def pack(self, theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, neg_step: Tensor,
             sqrt_bc2: Tensor, eps: Tensor, eff_c: Tensor, decay: Tensor | None,
             log10_min: float, bins_per_decade: float, nbins: int
             ) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`~lr_monitor.functional.fused.moment_pack` on the best ready kernel.

        Args:
            theta: See :func:`~lr_monitor.functional.fused.moment_pack`.
            grad: See :func:`~lr_monitor.functional.fused.moment_pack`.
            m: See :func:`~lr_monitor.functional.fused.moment_pack`.
            v: See :func:`~lr_monitor.functional.fused.moment_pack`.
            neg_step: See :func:`~lr_monitor.functional.fused.moment_pack`.
            sqrt_bc2: See :func:`~lr_monitor.functional.fused.moment_pack`.
            eps: See :func:`~lr_monitor.functional.fused.moment_pack`.
            eff_c: See :func:`~lr_monitor.functional.fused.moment_pack`.
            decay: See :func:`~lr_monitor.functional.fused.moment_pack`.
            log10_min: See :func:`~lr_monitor.functional.fused.eff_bins`.
            bins_per_decade: See :func:`~lr_monitor.functional.fused.eff_bins`.
            nbins: See :func:`~lr_monitor.functional.fused.eff_bins`.

        Returns:
            ``(fields, bins, update)``.
        """
        state = self._ready(theta)
        if state is not None:
            try:  # (plain aliases: see _by_rows)
                theta, grad, m, v = (t.detach() for t in (theta, grad, m, v))
                return state.pack(theta, grad, m, v, neg_step, sqrt_bc2, eps,  # type: ignore[no-any-return]
                                  eff_c, _zero_if_none(decay, theta), log10_min,
                                  bins_per_decade, nbins)
            except Exception as exc:
                self._failed(state, exc)
        return moment_pack_eager(theta, grad, m, v, neg_step, sqrt_bc2, eps, eff_c, decay,
                                 log10_min, bins_per_decade, nbins)

    def __getstate__(self) -> dict[str, Any]:
        return {"statistics": self.statistics}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["statistics"])  # type: ignore[misc]


def _zero_if_none(decay: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device) if decay is None else decay
