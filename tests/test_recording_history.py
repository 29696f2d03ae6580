"""lr_monitor.recording.history: the state behind update_cosine."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lr_monitor.functional.statistics import SupportsSwap, sample_index
from lr_monitor.recording.history import UpdateHistory


def test_history_is_a_swap_store() -> None:
    store: SupportsSwap = UpdateHistory()
    assert callable(store.swap)


def test_swap_returns_the_previous_sample_on_the_same_coordinates() -> None:
    h = UpdateHistory(samples_per_tensor=64)
    p = torch.nn.Parameter(torch.zeros(1000))
    first, second = torch.randn(1000), torch.randn(1000)
    assert h.swap(p, first)[0] is None
    prev, cur = h.swap(p, second)
    idx = sample_index(1000, 64)
    assert idx is not None
    assert torch.equal(prev, first[idx]) and torch.equal(cur, second[idx])


def test_samples_are_copies_in_float32_or_better() -> None:
    h = UpdateHistory()
    p = torch.nn.Parameter(torch.zeros(4))
    u = torch.ones(4, dtype=torch.bfloat16)
    _, cur = h.swap(p, u)
    u.zero_()
    assert cur.dtype == torch.float32 and cur.tolist() == [1.0] * 4
    assert h.swap(p, torch.ones(4, dtype=torch.float64))[1].dtype == torch.float64


def test_a_resized_parameter_has_no_previous_sample() -> None:
    h = UpdateHistory()
    p = torch.nn.Parameter(torch.zeros(4))
    h.swap(p, torch.ones(4))
    assert h.swap(p, torch.ones(6))[0] is None


def test_checkpoint_restore_and_clear() -> None:
    h = UpdateHistory()
    p = torch.nn.Parameter(torch.zeros(3))
    h.swap(p, torch.ones(3))
    saved = h.checkpoint()
    h.swap(p, torch.full((3,), 2.0))
    h.restore(saved)
    assert h.swap(p, torch.zeros(3))[0].tolist() == [1.0, 1.0, 1.0]  # type: ignore[union-attr]
    h.clear()
    assert h.nbytes() == 0 and h.swap(p, torch.zeros(3))[0] is None


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "8"])
def test_samples_per_tensor_is_checked(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^samples_per_tensor=.* is invalid: must be an int >= 1"):
        UpdateHistory(bad)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(plan=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True),
                     min_size=1, max_size=8),
       single=st.lists(st.booleans(), min_size=8, max_size=8))
def test_swap_whole_is_one_swap_per_tensor(plan: list[list[int]], single: list[bool]) -> None:
    """Packs of changing membership and order, mixed with single swaps: same samples."""
    params = [torch.zeros(n + 1) for n in range(6)]
    packed, one_by_one = UpdateHistory(8), UpdateHistory(8)
    for step, members in enumerate(plan):
        ups = [torch.full((params[i].numel(),), float(10 * step + i)) for i in members]
        want = [one_by_one.swap(params[i], u) for i, u in zip(members, ups, strict=True)]
        if single[step]:  # this step swaps them one by one in both stores
            got = [packed.swap(params[i], u) for i, u in zip(members, ups, strict=True)]
            for (gp, gc), (wp, wc) in zip(got, want, strict=True):
                assert torch.equal(gc, wc)
                assert (gp is None) == (wp is None) and (gp is None or torch.equal(gp, wp))
            continue
        prev, cur = packed.swap_whole([params[i] for i in members], torch.cat(ups),
                                      [u.numel() for u in ups])
        assert torch.equal(cur, torch.cat([c for _, c in want]))
        assert torch.equal(prev, torch.cat([torch.zeros_like(c) if p is None else p
                                            for p, c in want]))
    assert packed.nbytes() <= one_by_one.nbytes()


def test_swap_whole_checkpoint_and_limits() -> None:
    a, b = torch.zeros(2), torch.zeros(3)
    h = UpdateHistory(3)
    h.swap_whole([a, b], torch.arange(5.0), [2, 3])
    saved = h.checkpoint()
    h.swap_whole([a, b], torch.ones(5), [2, 3])
    h.restore(saved)
    assert h.swap_whole([a, b], torch.ones(5), [2, 3])[0].tolist() == [0, 1, 2, 3, 4]
    h.clear()
    assert h.nbytes() == 0
    with pytest.raises(ValueError, match="at most 3 whole"):
        h.swap_whole([torch.zeros(4)], torch.zeros(4), [4])
