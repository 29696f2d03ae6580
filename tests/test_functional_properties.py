"""Property tests (hypothesis): the Adam step size (Kingma & Ba 2015 §2.1) and the combine
rules of the step statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lr_monitor.functional import last_update, optimizer_steps
from lr_monitor.functional.statistics import (
    FIELD_COMBINE,
    FIELDS,
    Combine,
    HostStepSums,
    step_sums,
)

betas = st.tuples(st.floats(0.0, 0.99), st.floats(0.9, 0.9999)).filter(
    lambda b: b[0] ** 2 < b[1])
grad_values = st.floats(-1e3, 1e3, allow_nan=False).filter(lambda g: g == 0 or abs(g) > 1e-6)


def _adam_steps(grads: list[list[float]], b1: float, b2: float, lr: float) -> list[torch.Tensor]:
    p = torch.nn.Parameter(torch.zeros(len(grads[0]), dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=lr, betas=(b1, b2), eps=1e-300)  # ε → 0
    out = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        before = p.detach().clone()
        opt.step()
        upd = last_update(opt)[p]
        assert torch.allclose(upd, p.detach() - before, rtol=1e-9, atol=1e-12)
        out.append(upd)
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4).flatmap(lambda n: st.lists(st.lists(grad_values, min_size=n,
                                                             max_size=n), min_size=1,
                                                    max_size=25)),
       betas, st.floats(1e-4, 1.0))
def test_adam_step_obeys_the_cauchy_schwarz_bound(grads: list[list[float]],
                                                  b: tuple[float, float], lr: float) -> None:
    """|Δ_t| ≤ lr·(1−β1)/bc1·√(bc2/(1−β2))·√(Σ_{k<t} (β1²/β2)^k) for every history."""
    b1, b2 = b
    r = b1 * b1 / b2
    for t, upd in enumerate(_adam_steps(grads, b1, b2, lr), start=1):
        geo = (1 - r**t) / (1 - r)
        bound = lr * (1 - b1) / (1 - b1**t) * math.sqrt((1 - b2**t) / (1 - b2) * geo)
        assert (upd.abs() <= bound * (1 + 1e-9)).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 60), st.integers(0, 60), st.floats(1e-3, 1e3), betas, st.floats(1e-4, 1.0))
def test_kingma_ba_bound_for_sparse_gradients(zeros_before: int, zeros_after: int,
                                              spike: float, b: tuple[float, float],
                                              lr: float) -> None:
    """One non-zero gradient in the history: |Δ| ≤ lr·(1−β1)/√(1−β2) when (1−β1) > √(1−β2),
    else |Δ| ≤ lr — the case §2.1 describes."""
    b1, b2 = b
    grads = [[0.0]] * zeros_before + [[spike]] + [[0.0]] * zeros_after
    kingma = (1 - b1) / math.sqrt(1 - b2)
    bound = lr * max(kingma, 1.0)
    for upd in _adam_steps(grads, b1, b2, lr)[zeros_before:]:
        assert abs(upd.item()) <= bound * (1 + 1e-9)


def test_constant_gradient_moves_by_exactly_lr() -> None:
    for upd in _adam_steps([[0.3, -2.0]] * 10, 0.9, 0.999, 1e-2):
        torch.testing.assert_close(upd.abs(), torch.full((2,), 1e-2, dtype=torch.float64))


def test_spike_after_zero_gradients_matches_the_notes() -> None:
    upd = _adam_steps([[0.0]] * 999 + [[1.0]], 0.9, 0.999, 1.0)[-1]
    assert abs(upd.item()) == pytest.approx(2.51, abs=0.01)


# ------------------------------------------------------------------ combine rules

#: A field's value for one tensor: sums are finite here, min/max may sit at ±inf (no tensor).
_CELL = {Combine.SUM: st.floats(-1e6, 1e6),
         Combine.MIN: st.floats(-1e6, 1e6) | st.just(math.inf),
         Combine.MAX: st.floats(-1e6, 1e6) | st.just(-math.inf)}


@st.composite
def field_rows(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(0, 6))
    cells = [[draw(_CELL[rule]) for rule in FIELD_COMBINE.values()] for _ in range(n)]
    return np.array(cells, dtype=np.float64).reshape(n, len(FIELDS))


def _host(values: np.ndarray) -> HostStepSums:
    return HostStepSums(values, np.abs(np.nan_to_num(values[:, :3], posinf=1.0, neginf=1.0)),
                        np.zeros(0))


@settings(max_examples=80, deadline=None)
@given(field_rows(), st.data())
def test_combining_in_parts_equals_combining_at_once(rows: np.ndarray, data: st.DataObject
                                                     ) -> None:
    """Groups → global in any split and order: what ranks and chunks rely on."""
    order = data.draw(st.permutations(range(len(rows))))
    cut = data.draw(st.integers(0, len(rows)))
    host = _host(rows)
    whole = host.combine()
    halves = HostStepSums(
        np.concatenate([host.combine(order[:cut]).values, host.combine(order[cut:]).values]),
        np.concatenate([host.combine(order[:cut]).hist, host.combine(order[cut:]).hist]),
        np.zeros(0))
    parts = halves.combine()
    for j, name in enumerate(FIELDS):
        a, b = whole.values[0, j], parts.values[0, j]
        if FIELD_COMBINE[name] is Combine.SUM:
            assert a == pytest.approx(b, rel=1e-9, abs=1e-6), name
        else:
            assert a == b, name  # min and max are exact in any order
    np.testing.assert_allclose(parts.hist, whole.hist, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(field_rows().filter(len))
def test_device_and_host_apply_the_same_rule(rows: np.ndarray) -> None:
    for rule in Combine:
        host = rule.reduce_array(rows)
        device = rule.reduce(torch.from_numpy(rows)).numpy()
        np.testing.assert_allclose(device, host, rtol=1e-12)
        same = rule.fold(torch.full((rows.shape[1],), rule.identity), torch.from_numpy(rows[0]))
        assert same.tolist() == rows[0].tolist()  # the identity changes nothing


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3000))
def test_any_chunk_size_gives_the_same_sums(chunk_numel: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 20)).square().mean().backward()
    opt.step()
    whole = step_sums(optimizer_steps(opt)).to_host()
    chunked = step_sums(optimizer_steps(opt), chunk_numel=chunk_numel).to_host()
    np.testing.assert_allclose(chunked.values, whole.values, rtol=1e-12)
    np.testing.assert_array_equal(chunked.hist, whole.hist)
