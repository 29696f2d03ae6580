"""The one-pass statistics of Adam/AdamW (lr_monitor.functional.fused): same numbers.

Three paths compute the statistics of an Adam step: the generic rule path (every
:class:`ParamStep` materialized), the eager one-pass kernel and the ``torch.compile``'d
kernel. Every test here compares them on real optimizers, several models (large
tensors, many small ones, mixed step counts) and dtypes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lr_monitor.recording.compiler as compiler
import lr_monitor.recording.recorder as recorder
from lr_monitor import StepSizeMonitor
from lr_monitor.functional.fused import (
    PACK_NUMEL,
    moment_fields,
    moment_fields_eager,
    moment_group,
    moment_pack_eager,
)
from lr_monitor.recording import StepRecorder
from lr_monitor.recording.compiler import MomentKernels
from tests.lightning_models import HostReads, Regressor, regression_loader, trainer

# -- models ----------------------------------------------------------------------------------


class Mixed(torch.nn.Module):
    """Large tensors (packed never), small ones (packed), and a bias used every other step."""

    def __init__(self, n_small: int = 40) -> None:
        super().__init__()
        self.big = torch.nn.Linear(96, PACK_NUMEL // 32)  # 12,288-element weight
        self.head = torch.nn.Linear(PACK_NUMEL // 32, 3)
        self.small = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(5) * 0.1)
                                            for _ in range(n_small))
        self.sometimes = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor, use_sometimes: bool) -> torch.Tensor:
        out = self.head(torch.tanh(self.big(x))) + torch.stack(list(self.small)).sum(0)[:3]
        return out + self.sometimes if use_sometimes else out


MODELS = {
    "mlp": lambda: torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(),
                                       torch.nn.Linear(300, 3)),
    "mixed": Mixed,
    "conv": lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 40, 3), torch.nn.Flatten(),
                                        torch.nn.LazyLinear(3)),
}

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1),
    "adam-l2-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2,
                                                   amsgrad=True),
    "adam-eps-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, eps=1e-3, foreach=True),
    "adamw-maximize": lambda ps: torch.optim.AdamW(ps, lr=1e-3, maximize=True),
}


def _batch(model_name: str, step: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    shape = (8, 3, 6, 6) if model_name == "conv" else (8, 64 if model_name == "mlp" else 96)
    return torch.randn(*shape, generator=g).to(dtype)


def _records(model_name: str, opt_name: str, dtype: torch.dtype, *, path: str,
             monkeypatch: pytest.MonkeyPatch, granularity: str = "group",
             steps: int = 4, cosine_samples: int = 64) -> list[dict[str, dict[str, float]]]:
    """The rows of every step of a short run, measured on ``path``."""
    torch.manual_seed(0)
    model = MODELS[model_name]().to(dtype)
    model(_batch(model_name, 0, dtype), True) if model_name == "mixed" else model(
        _batch(model_name, 0, dtype))
    opt = OPTIMIZERS[opt_name](model.parameters())
    names = {p: n for n, p in model.named_parameters()}
    with monkeypatch.context() as mp:
        if path == "generic":
            mp.setattr(recorder, "moment_group", lambda optimizer, group: None)
        rec = StepRecorder(opt, "Adam", should_record=lambda i: True, granularity=granularity,
                           param_names=names, statistics="eager" if path != "compiled"
                           else "compiled", cosine_samples=cosine_samples)
        out: list[dict[str, dict[str, float]]] = []
        rec.subscribe(lambda r: out.append(r.rows))
        rec.attach()
        for step in range(steps):
            x = _batch(model_name, step, dtype)
            y = model(x, step % 2 == 0) if model_name == "mixed" else model(x)
            opt.zero_grad()
            y.square().mean().backward()
            opt.step()
        rec.detach()
    return out


def _assert_same(a: list[dict[str, dict[str, float]]], b: list[dict[str, dict[str, float]]],
                 rtol: float) -> None:
    assert len(a) == len(b) and a
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for row in ra:
            assert ra[row].keys() == rb[row].keys(), row
            for k, va in ra[row].items():
                vb = rb[row][k]
                if math.isnan(va):
                    assert math.isnan(vb), (row, k)
                else:
                    assert vb == pytest.approx(va, rel=rtol, abs=1e-30), (row, k)


def _rtol(dtype: torch.dtype) -> float:
    # Sums of squares accumulated in another order: float32 rounding of ~1e-7 per term.
    return 2e-5 if dtype == torch.float32 else 1e-12


# -- the kernels -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 3000), slice_numel=st.integers(1, 700), decay=st.booleans(),
       per_element=st.booleans(), f64=st.booleans(), seed=st.integers(0, 2**16))
def test_eager_kernel_equals_the_expression(n: int, slice_numel: int, decay: bool,
                                            per_element: bool, f64: bool, seed: int) -> None:
    """Sliced in-place eager == the one-expression form, any slicing, 0-d or per-element."""
    dtype = torch.float64 if f64 else torch.float32
    g = torch.Generator().manual_seed(seed)
    theta, grad = torch.randn(n, generator=g) * 10, torch.randn(n, generator=g)
    m = torch.randn(n, generator=g) * 1e-3
    v = torch.rand(n, generator=g) ** 6 * 1e-6  # many below ε², some above
    theta[0], m[0], v[0] = 1e15, 1e-3, 1.0  # its update (~1e-5) is rounded away
    ts = [t.to(dtype) for t in (theta, grad, m, v)]

    def scalar(x: float) -> torch.Tensor:
        t = torch.tensor(x, dtype=dtype)
        return t.expand(n).clone() if per_element else t

    args = (*ts, scalar(-1e-2), scalar(0.7), scalar(1e-8), scalar(1e-3))
    k = scalar(1e-3) if decay else None
    want = moment_fields(*args, k)
    got = moment_fields_eager(*args, k, slice_numel=slice_numel)
    torch.testing.assert_close(got, want, rtol=1e-5 if not f64 else 1e-12, atol=0)
    assert got[6] >= (0 if decay else 1)  # the 1e15 parameter's update is rounded away


def test_moment_group_takes_only_what_it_reproduces() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)

    def stepped(opt: torch.optim.Optimizer) -> Any:
        opt.step()
        return moment_group(opt, opt.param_groups[0])

    assert stepped(torch.optim.Adam([p], lr=0.1)) is not None
    assert stepped(torch.optim.AdamW([p], lr=0.1)) is not None
    assert stepped(torch.optim.SGD([p], lr=0.1, momentum=0.9)) is None
    assert stepped(torch.optim.Adam([p], lr=torch.tensor(0.1))) is None
    assert stepped(torch.optim.Adam([p], lr=0.1, fused=True)) is None
    d = torch.optim.Adam([p], lr=0.1, differentiable=True)
    assert moment_group(d, {**d.param_groups[0]}) is None
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    b.grad = torch.ones(4, dtype=torch.bfloat16)
    assert stepped(torch.optim.Adam([b], lr=0.1)) is None
    c = torch.nn.Parameter(torch.ones(4, dtype=torch.complex64))
    c.grad = torch.ones(4, dtype=torch.complex64)
    assert stepped(torch.optim.Adam([c], lr=0.1)) is None

    class MyAdam(torch.optim.Adam):
        pass

    assert stepped(MyAdam([p], lr=0.1)) is None


# -- fused (eager kernel) against the generic path ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_one_pass_equals_the_generic_path(model_name: str, opt_name: str, dtype: torch.dtype,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    generic = _records(model_name, opt_name, dtype, path="generic", monkeypatch=monkeypatch)
    fused = _records(model_name, opt_name, dtype, path="eager", monkeypatch=monkeypatch)
    _assert_same(generic, fused, _rtol(dtype))
    assert "update_cosine" in fused[-1]["global"] and "eps_dominated_frac" in fused[-1]["pg0"]


@pytest.mark.parametrize("cosine_samples", [2, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_tensor_rows_equal_the_generic_path(dtype: torch.dtype, cosine_samples: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor rows of packed tensors (segment sums), of large ones and of sampled ones."""
    for opt_name in ("adamw", "adam-l2-amsgrad"):
        kw: dict[str, Any] = {"monkeypatch": monkeypatch, "granularity": "tensor",
                              "cosine_samples": cosine_samples}
        generic = _records("mixed", opt_name, dtype, path="generic", **kw)
        fused = _records("mixed", opt_name, dtype, path="eager", **kw)
        _assert_same(generic, fused, _rtol(dtype))
        assert "small.7" in fused[-1] and "sometimes" in fused[0]
        assert list(fused[-1]) == list(generic[-1])  # rows in parameter order


# -- compiled against eager ------------------------------------------------------------------


def _compiled_or_skip(dtype: torch.dtype) -> MomentKernels:
    kernels = MomentKernels("compiled")
    state = kernels.state(dtype, torch.device("cpu"))
    assert state is not None
    if state.status != "ready":
        # The fallback is the eager kernel: same numbers, and the reason is kept.
        assert state.error
        args = [torch.rand(50, dtype=dtype) for _ in range(4)]
        scal = [torch.tensor(x, dtype=dtype) for x in (-0.1, 0.5, 1e-8, 0.1)]
        torch.testing.assert_close(kernels(*args, *scal, None),
                                   moment_fields_eager(*args, *scal, None))
        pytest.skip(f"torch.compile does not build here: {state.error}")
    return kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("model_name", ["mlp", "mixed"])
def test_compiled_equals_eager(model_name: str, dtype: torch.dtype,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    _compiled_or_skip(dtype)
    for opt_name in ("adam", "adamw", "adam-l2-amsgrad"):
        eager = _records(model_name, opt_name, dtype, path="eager", monkeypatch=monkeypatch)
        compiled = _records(model_name, opt_name, dtype, path="compiled",
                            monkeypatch=monkeypatch)
        # The eager kernel sums squares in float32 (``_foreach_norm``, as the generic path
        # does), the compiled one in float64: up to ~1e-4 apart on 200k float32 elements.
        _assert_same(eager, compiled, 3e-4 if dtype == torch.float32 else 1e-12)


def test_compiled_kernel_never_recompiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """One graph per kernel for every length, views or not, with and without decay.

    (Inputs at a storage offset ≥ 2 — views into a flat buffer — compile one more graph
    once: dynamo specializes offsets 0/1; see ``lr_monitor.recording.compiler``.)
    """
    kernels = _compiled_or_skip(torch.float32)
    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(dynamo_config, "error_on_recompile", True)
    g = torch.Generator().manual_seed(0)
    cases = []
    for n in (2, 3, 17, 4096, 4097, 70_001, 300_000):
        cases.append([torch.rand(n, generator=g) for _ in range(4)])  # plain tensors
        base = torch.rand(n + 1, 4, generator=g)  # views of a matrix's columns, copied
        cases.append([base[:n, j].contiguous().view(-1) for j in range(4)])
        theta = torch.rand(n, generator=g)  # grad = theta (the norm known already)
        cases.append([theta, theta, torch.rand(n, generator=g), torch.rand(n, generator=g)])
    for ts in cases:
        n = ts[0].numel()
        for decay in (None, torch.tensor(1e-3)):
            scal = [torch.tensor(x) for x in (-1e-3, 0.9, 1e-8, 1e-3)]
            torch.testing.assert_close(kernels(*ts, *scal, decay),
                                       moment_fields_eager(*ts, *scal, decay),
                                       rtol=1e-4, atol=0)  # float32 vs float64 sums
            # a pack: step size, √bc2 and c expanded per element, ε and decay shared
            per = [x.expand(n).contiguous() if i != 2 else x for i, x in enumerate(scal)]
            bins = (-16.0, 50.0, 1100)
            got = kernels.pack(*ts, *per, decay, *bins)
            want = moment_pack_eager(*ts, *per, decay, *bins)
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=0)
            torch.testing.assert_close(got[2], want[2])
            assert (got[1] != want[1]).sum() <= n // 1000  # a bin edge may round either way
    assert kernels.path(torch.float32, torch.device("cpu")) == "compiled"


def test_auto_compiles_once_and_leaves_the_run_as_it_was(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """``auto`` compiles at the first record, logs it once, and changes nothing in the run.

    A compile saves and restores torch's random state: it must not rewind the draws of the
    run (dropout here), so the weights end bit-identical to an unmonitored run's.
    """
    monkeypatch.delenv(compiler.COMPILE_ENV, raising=False)
    monkeypatch.setattr(compiler, "_STATES", {})

    def run(statistics: str | None) -> tuple[list[torch.Tensor], list[str]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(MODELS["mixed"]().big, torch.nn.Dropout(0.5))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        paths: list[str] = []
        rec = None
        if statistics is not None:
            rec = StepRecorder(opt, "Adam", should_record=lambda i: i % 2 == 0,
                               statistics=statistics)
            rec.subscribe(lambda r: paths.append(
                rec.kernels.path(torch.float32, torch.device("cpu"))))  # type: ignore[union-attr]
            rec.attach()
        for i in range(6):
            opt.zero_grad()
            model(_batch("mixed", i, torch.float32)).square().mean().backward()
            opt.step()
            torch.rand(3)  # the run keeps drawing after the compile
        if rec is not None:
            rec.detach()
        return [p.detach().clone() for p in model.parameters()], paths

    with caplog.at_level(logging.INFO, logger="lr_monitor"):
        plain, _ = run(None)
        auto, paths = run("auto")
    for a, b in zip(plain, auto, strict=True):
        assert torch.equal(a, b)
    state = compiler._STATES[(torch.float32, "cpu")]
    assert paths == ["compiled" if state.status == "ready" else "eager"] * 3
    said = [r for r in caplog.records if "statistics kernels" in r.getMessage()]
    assert len(said) == 1


# -- in a Trainer ----------------------------------------------------------------------------


def test_trainer_compiled_run_logs_the_eager_numbers_with_one_host_read_per_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger

    from tests.test_monitor import read_scalars  # TensorBoard's own EventAccumulator

    _compiled_or_skip(torch.float32)
    logged = {}
    for path in ("eager", "compiled"):
        reads = HostReads(monkeypatch) if path == "compiled" else None
        logger = TensorBoardLogger(str(tmp_path), name=path)
        callbacks: list[Any] = [StepSizeMonitor(3, statistics=path)]
        if reads is not None:
            callbacks.insert(0, reads)
        torch.manual_seed(0)
        tr = trainer(tmp_path, logger=logger, max_steps=9, callbacks=callbacks)
        tr.fit(Regressor(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)),
               regression_loader())
        logged[path] = read_scalars(logger.log_dir)
        if reads is not None:
            assert reads.per_step(9) == {s: int(s % 3 == 0) for s in range(9)}
    tags = [t for t in logged["eager"] if t.startswith("optim/")]
    assert "optim/update_norm/AdamW/pg0" in tags
    for t in tags:
        for s, v in logged["eager"][t].items():
            assert logged["compiled"][t][s] == pytest.approx(v, rel=3e-4, nan_ok=True), t


def test_statistics_argument_is_checked() -> None:
    with pytest.raises(ValueError, match=r"^statistics='fast' is invalid"):
        StepSizeMonitor(statistics="fast")
    with pytest.raises(ValueError, match=r"^statistics=1 is invalid"):
        MomentKernels(1)  # type: ignore[arg-type]
