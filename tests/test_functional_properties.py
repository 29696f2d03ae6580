"""Property tests (hypothesis) of the Adam step size, Kingma & Ba 2015 §2.1."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lr_monitor.functional import last_update

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
