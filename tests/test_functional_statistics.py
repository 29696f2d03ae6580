"""lr_monitor.functional.statistics against naive full-tensor computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lr_monitor.functional import last_update, optimizer_steps
from lr_monitor.functional.statistics import (
    FIELDS,
    UpdateHistory,
    quantile_from_histogram,
    step_sums,
    summarize,
)


def _setup(opt_name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 4))
    p = list(model.parameters())
    groups = [{"params": p[:2], "lr": 1e-2}, {"params": p[2:], "lr": 3e-3}]
    opt = {
        "adam": lambda: torch.optim.Adam(groups, eps=1e-3),
        "sgd": lambda: torch.optim.SGD(groups, momentum=0.9),
        "rmsprop": lambda: torch.optim.RMSprop(groups, centered=True),
    }[opt_name]()
    return model, opt


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 20, generator=g), torch.randn(32, 4, generator=g)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()


@pytest.mark.parametrize("opt_name", ["adam", "sgd", "rmsprop"])
def test_summaries_match_naive_computation(opt_name: str) -> None:
    model, opt = _setup(opt_name)
    history = UpdateHistory()
    prev_updates: dict[torch.Tensor, torch.Tensor] = {}
    for step in range(4):
        _train_step(model, opt, step)
        steps = optimizer_steps(opt)
        rows = summarize(step_sums(steps, history=history).to_host())
        updates = last_update(opt)
        for gi, (group, row) in enumerate(zip(opt.param_groups, rows, strict=True)):
            ps = group["params"]
            cat = lambda ts: torch.cat([t.reshape(-1) for t in ts]).double()  # noqa: E731
            g, p, u = cat([q.grad for q in ps]), cat(ps), cat([updates[q] for q in ps])
            assert row["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-6)
            assert row["param_norm"] == pytest.approx(p.norm().item(), rel=1e-6)
            assert row["update_norm"] == pytest.approx(u.norm().item(), rel=1e-6)
            assert row["update_ratio"] == pytest.approx(u.norm().item() / p.norm().item(),
                                                        rel=1e-6)
            eff = cat([s.eff_lr.expand_as(s.param) for s in steps[gi]])
            assert row["eff_lr/min"] == pytest.approx(eff.min().item(), rel=1e-6)
            assert row["eff_lr/max"] == pytest.approx(eff.max().item(), rel=1e-6)
            for q, key in ((0.05, "p05"), (0.5, "p50"), (0.95, "p95")):
                exact = torch.quantile(eff, q).item()
                assert row[f"eff_lr/{key}"] == pytest.approx(exact, rel=0.05), key
            assert row["nonfinite"] == 0
            if opt_name == "adam":
                m = cat([opt.state[q]["exp_avg"] for q in ps])
                v = cat([opt.state[q]["exp_avg_sq"] for q in ps])
                assert row["exp_avg_norm"] == pytest.approx(m.norm().item(), rel=1e-6)
                assert row["exp_avg_sq_sqrt_mean"] == pytest.approx(v.sqrt().mean().item(),
                                                                    rel=1e-6)
                bc2 = 1 - 0.999 ** (step + 1)
                frac = ((v / bc2).sqrt() < 1e-3).double().mean().item()
                assert row["eps_dominated_frac"] == pytest.approx(frac, abs=1e-12)
            if step == 0:
                assert "update_cosine" not in row
            else:
                pu = cat([prev_updates[q] for q in ps])
                cos = (u @ pu / (u.norm() * pu.norm())).item()
                assert row["update_cosine"] == pytest.approx(cos, rel=1e-6, abs=1e-9)
        prev_updates = {k: v.clone() for k, v in updates.items()}


def test_global_row_combines_groups() -> None:
    model, opt = _setup("adam")
    _train_step(model, opt, 0)
    host = step_sums(optimizer_steps(opt)).to_host()
    rows = summarize(host)
    glob = summarize(host.combine())[0]
    assert glob["update_norm"] == pytest.approx(
        math.sqrt(sum(r["update_norm"] ** 2 for r in rows)), rel=1e-9)
    assert glob["eff_lr/max"] == max(r["eff_lr/max"] for r in rows)
    assert glob["eff_lr/min"] == min(r["eff_lr/min"] for r in rows)


def test_tensor_rows_follow_group_rows() -> None:
    model, opt = _setup("adam")
    _train_step(model, opt, 0)
    weights = {p for n, p in model.named_parameters() if n.endswith("weight")}
    host = step_sums(optimizer_steps(opt), tensor_rows=lambda p: p in weights).to_host()
    rows = summarize(host)
    assert len(rows) == 2 + 2
    w0 = model[0].weight
    assert rows[2]["param_norm"] == pytest.approx(w0.norm().item(), rel=1e-6)


def test_nonfinite_elements_are_counted_exactly() -> None:
    p = torch.nn.Parameter(torch.ones(10))
    opt = torch.optim.Adam([p], lr=0.1)
    grad = torch.ones(10)
    grad[[2, 5]] = float("nan")
    grad[7] = float("inf")
    p.grad = grad
    opt.step()
    row = summarize(step_sums(optimizer_steps(opt)).to_host())[0]
    # 3 bad gradient elements -> 3 bad parameters after the step
    assert row["nonfinite"] == 6
    assert math.isnan(row["grad_norm"])


def test_one_host_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _setup("adam")
    _train_step(model, opt, 0)
    calls: list[str] = []
    for name in ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *a: object, _o=orig, _n=name, **k: object) -> object:
            calls.append(_n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    sums = step_sums(optimizer_steps(opt), history=UpdateHistory())
    assert calls == []
    sums.to_host()
    assert calls == ["tolist"]


def test_quantiles_of_a_known_distribution() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-6, -2, size=200_000)
    from lr_monitor.functional.statistics import BINS_PER_DECADE, LOG10_MAX, LOG10_MIN
    nb = int((LOG10_MAX - LOG10_MIN) * BINS_PER_DECADE)
    h, _ = np.histogram(x, bins=nb, range=(LOG10_MIN, LOG10_MAX))
    for q in (0.05, 0.5, 0.95):
        assert math.log10(quantile_from_histogram(h, q)) == pytest.approx(-6 + 4 * q, abs=0.02)
    assert math.isnan(quantile_from_histogram(np.zeros(nb), 0.5))


def test_update_history_bounds_memory() -> None:
    h = UpdateHistory(samples_per_tensor=100)
    big = torch.nn.Parameter(torch.zeros(10_000))
    prev, cur = h.swap(big, torch.randn(10_000))
    assert prev is None and cur.numel() == 100
    assert h.nbytes() == 400
    with pytest.raises(ValueError, match="samples_per_tensor"):
        UpdateHistory(0)


def test_fields_are_unique() -> None:
    assert len(set(FIELDS)) == len(FIELDS)


def test_chunked_reduction_equals_one_pass() -> None:
    """Chunks of one element and one big chunk give the same sums (streaming is exact)."""
    from lr_monitor.functional.rules import iter_group_steps

    model, opt = _setup("adam")
    _train_step(model, opt, 0)
    whole = step_sums([iter_group_steps(opt, g) for g in opt.param_groups]).to_host()
    tiny = step_sums([iter_group_steps(opt, g) for g in opt.param_groups],
                     chunk_numel=1).to_host()
    np.testing.assert_allclose(tiny.values, whole.values, rtol=1e-12)
    np.testing.assert_array_equal(tiny.hist, whole.hist)


def test_steps_are_consumed_lazily() -> None:
    """With generators, at most one chunk of updates is alive at a time."""
    import gc
    import weakref

    from lr_monitor.functional.rules import iter_group_steps

    model, opt = _setup("adam")
    _train_step(model, opt, 0)
    alive: list[weakref.ref[torch.Tensor]] = []
    peak = [0]

    def watched(group: dict[str, object]):  # type: ignore[no-untyped-def]
        for s in iter_group_steps(opt, group):
            gc.collect()
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            alive.append(weakref.ref(s.update))
            yield s

    step_sums([watched(g) for g in opt.param_groups], chunk_numel=1)
    assert peak[0] <= 2  # the previous chunk's update may still be referenced by the loop
