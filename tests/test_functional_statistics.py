"""lr_monitor.functional.statistics against naive full-tensor computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lr_monitor.functional import last_update, optimizer_steps
from lr_monitor.functional.statistics import (
    BINS_PER_DECADE,
    FIELD_COMBINE,
    FIELDS,
    HIST_SAMPLES,
    Combine,
    HostStepSums,
    quantile_from_histogram,
    sample_index,
    step_sums,
    summarize,
)
from lr_monitor.recording.history import UpdateHistory


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


def test_summaries_use_exactly_the_statistic_names_of_tags() -> None:
    """A statistic the math emits is a tag readers know, and vice versa (lr: the recorder)."""
    from dataclasses import replace

    from lr_monitor.functional.statistics import rounded_away
    from lr_monitor.tags import STEP_STATISTICS

    model, opt = _setup("adam")
    history = UpdateHistory()
    for t in range(2):  # the second step has an update_cosine
        _train_step(model, opt, t)
        steps = [[replace(s, update_lost=rounded_away(s.param, s.update)) for s in group]
                 for group in optimizer_steps(opt)]  # as the recorder does: update_lost_frac
        host = step_sums(steps, history=history).to_host()
    names = set(summarize(host)[0])
    assert names == set(STEP_STATISTICS) - {"lr"}


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
    # one device-to-host copy; numpy() then only views that host tensor (np.asarray)
    assert calls in (["cpu"], ["cpu", "numpy"])


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


# ------------------------------------------------------------------ subsamples and weights


@given(n=st.integers(min_value=0, max_value=200_000), k=st.integers(min_value=1, max_value=5000))
@settings(max_examples=60, deadline=None)
def test_sample_index_is_fixed_distinct_and_one_per_stratum(n: int, k: int) -> None:
    idx = sample_index(n, k)
    if n <= k:
        assert idx is None
        return
    assert idx is not None and idx.numel() == k
    assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < n
    bounds = torch.div(torch.arange(k + 1) * n, k, rounding_mode="floor")
    assert bool((idx >= bounds[:-1]).all()) and bool((idx < bounds[1:]).all())  # i in stratum i
    assert torch.equal(sample_index(n, k), idx)


def _adam_eff_lr(param: torch.nn.Parameter, grad: torch.Tensor) -> tuple[torch.Tensor, dict]:
    opt = torch.optim.Adam([param], lr=1e-3)
    param.grad = grad
    opt.step()
    row = summarize(step_sums(optimizer_steps(opt)).to_host())[0]
    eff = optimizer_steps(opt)[0][0].eff_lr.double().reshape(-1)
    return eff, row


def _layouts() -> dict[str, tuple[torch.Size, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    # Conv2d(256, 256, 3): the gradient scale depends on the kernel tap (9 taps, 4 decades).
    tap = torch.logspace(-4, 0, 9).reshape(1, 1, 3, 3)
    conv = torch.randn(256, 256, 3, 3, generator=g) * tap
    # Embedding(30000, 64): each row's gradient scale follows its token's Zipf frequency.
    freq = torch.arange(1, 30001, dtype=torch.float32).reshape(-1, 1) ** -1.0
    emb = torch.randn(30000, 64, generator=g) * freq[torch.randperm(30000, generator=g)]
    # Attention in_proj (3·512, 512): q, k, v blocks with their own gradient scales.
    qkv = torch.randn(1536, 512, generator=g) * torch.tensor([1e-3, 1e-2, 1.0]).repeat_interleave(
        512).reshape(-1, 1)
    return {"conv": (conv.shape, conv), "embedding": (emb.shape, emb), "attention": (
        qkv.shape, qkv)}


@pytest.mark.parametrize("layout", ["conv", "embedding", "attention"])
def test_quantiles_are_within_one_bin_on_real_layouts(layout: str) -> None:
    """The fixed random subsample cannot alias with a tensor's layout (strides, blocks)."""
    shape, grad = _layouts()[layout]
    eff, row = _adam_eff_lr(torch.nn.Parameter(torch.zeros(shape)), grad)
    assert eff.numel() > HIST_SAMPLES  # the histogram is built from a subsample
    log_eff = np.log10(eff.numpy())
    for q, key in ((0.05, "p05"), (0.5, "p50"), (0.95, "p95")):
        exact = float(np.quantile(log_eff, q))
        assert abs(math.log10(row[f"eff_lr/{key}"]) - exact) <= 1 / BINS_PER_DECADE, key


def test_global_cosine_is_the_cosine_of_the_whole_update() -> None:
    """A large steady tensor and a small alternating one: the small one must not dominate."""
    big = torch.nn.Parameter(torch.zeros(120_000))
    small = torch.nn.Parameter(torch.zeros(4096))
    opt = torch.optim.SGD([big, small], lr=0.1)
    history = UpdateHistory(samples_per_tensor=4096)
    g = torch.Generator().manual_seed(1)
    gb, gs = torch.rand(120_000, generator=g) + 0.5, torch.rand(4096, generator=g) * 3
    prev = None
    for sign in (1.0, -1.0):
        big.grad, small.grad = gb.clone(), sign * gs
        opt.step()
        host = step_sums(optimizer_steps(opt), history=history).to_host()
        u = torch.cat([-0.1 * gb, -0.1 * sign * gs]).double()
        if prev is not None:
            exact = float(u @ prev / (u.norm() * prev.norm()))
        prev = u
    assert exact > 0.8  # the unweighted sample gave about 0 here
    assert summarize(host)[0]["update_cosine"] == pytest.approx(exact, abs=0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_statistics_are_computed_in_float32(dtype: torch.dtype) -> None:
    """bf16/fp16 tensors: norms, means and the eff-lr histogram match a float64 reference."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    x, y = torch.randn(128, 64).to(dtype), torch.randint(0, 10, (128,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
    steps = optimizer_steps(opt)[0]
    row = summarize(step_sums([steps]).to_host())[0]
    cat = lambda ts: torch.cat([t.double().reshape(-1) for t in ts])  # noqa: E731
    eff = cat([s.eff_lr for s in steps])
    assert row["grad_norm"] == pytest.approx(cat([s.grad for s in steps]).norm().item(), rel=1e-5)
    assert row["param_norm"] == pytest.approx(cat([s.param for s in steps]).norm().item(),
                                              rel=1e-5)
    v = cat([s.second_moment for s in steps])  # type: ignore[misc]
    assert row["exp_avg_sq_sqrt_mean"] == pytest.approx(v.sqrt().mean().item(), rel=1e-5)
    log_eff = np.log10(eff.numpy())
    for q, key in ((0.05, "p05"), (0.5, "p50"), (0.95, "p95")):
        exact = float(np.quantile(log_eff, q))
        assert abs(math.log10(row[f"eff_lr/{key}"]) - exact) <= 1 / BINS_PER_DECADE, key


# ------------------------------------------------------------------ combine rules


def test_every_field_declares_its_combine_rule() -> None:
    assert tuple(FIELD_COMBINE) == FIELDS
    assert {f for f, r in FIELD_COMBINE.items() if r is not Combine.SUM} == {"eff_min", "eff_max"}
    assert FIELD_COMBINE["eff_min"] is Combine.MIN and FIELD_COMBINE["eff_max"] is Combine.MAX


def test_host_combine_applies_each_fields_rule() -> None:
    rng = np.random.default_rng(0)
    values, hist = rng.normal(size=(5, len(FIELDS))), rng.integers(0, 9, size=(5, 7)).astype(float)
    host = HostStepSums(values, hist, np.array([0.5]))
    out = host.combine([0, 2, 3])
    for j, name in enumerate(FIELDS):
        col = values[[0, 2, 3], j]
        expected = {Combine.SUM: col.sum(), Combine.MIN: col.min(), Combine.MAX: col.max()}
        assert out.values[0, j] == pytest.approx(expected[FIELD_COMBINE[name]], rel=1e-15), name
    np.testing.assert_array_equal(out.hist[0], hist[[0, 2, 3]].sum(0))
    assert out.extra.tolist() == [0.5]
    empty = host.combine([])
    assert empty.values.shape == (1, len(FIELDS)) and empty.hist.shape == (1, 7)
    assert [empty.values[0, j] for j in range(len(FIELDS))] == [
        FIELD_COMBINE[name].identity for name in FIELDS]


def test_group_rows_combine_their_tensor_rows_by_the_same_rules() -> None:
    """The device accumulation (tensors -> group) and the host combine agree field by field."""
    model, opt = _setup("adam")
    history = UpdateHistory(samples_per_tensor=50)
    for seed in range(2):
        _train_step(model, opt, seed)
        host = step_sums(optimizer_steps(opt), history=history, tensor_rows=lambda p: True,
                         chunk_numel=500).to_host()
    n_groups = len(opt.param_groups)
    sizes = [len(g["params"]) for g in opt.param_groups]
    start = n_groups
    for gi, size in enumerate(sizes):
        rows = host.combine(range(start, start + size))
        np.testing.assert_allclose(rows.values[0], host.values[gi], rtol=1e-12)
        for name in ("eff_min", "eff_max"):
            assert rows.values[0, FIELDS.index(name)] == host.values[gi, FIELDS.index(name)]
        np.testing.assert_array_equal(rows.hist[0], host.hist[gi])
        start += size


def test_step_sums_takes_any_store_with_swap() -> None:
    """The statistics need only ``swap``: here a store that says the last update was -Δ."""

    class Mirror:
        def swap(self, param: torch.Tensor, update: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
            cur = update.detach().reshape(-1).float().clone()
            return -cur, cur

    model, opt = _setup("sgd")
    _train_step(model, opt, 0)
    rows = summarize(step_sums(optimizer_steps(opt), history=Mirror()).to_host())
    assert [r["update_cosine"] for r in rows] == pytest.approx([-1.0, -1.0], abs=1e-12)


def _shard_steps(rank: int | None) -> list[list[object]]:
    """Adam on two groups; ``rank`` 0/1 holds the low/high half of every tensor (FSDP-like).

    Adam is elementwise, so a shard's step is exactly that part of the whole step.
    """
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(3000, generator=g) * torch.logspace(-6, 0, 3000),
             torch.randn(800, generator=g) * torch.logspace(0, -6, 800)]
    if rank is not None:
        grads = [x.chunk(2)[rank].clone() for x in grads]
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    opt = torch.optim.Adam([{"params": [params[0]]}, {"params": [params[1]], "lr": 1e-2}],
                           eps=1e-5)
    for _ in range(2):
        for p, x in zip(params, grads, strict=True):
            p.grad = x.clone()
        opt.step()
    return optimizer_steps(opt)  # type: ignore[return-value]


def _sharded_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        sums = step_sums(_shard_steps(rank))  # type: ignore[arg-type]
        sums.all_reduce()
        host = sums.to_host()
        np.save(Path(out) / f"values{rank}.npy", host.values)
        np.save(Path(out) / f"hist{rank}.npy", host.hist)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_of_shards_equals_the_unsharded_sums(tmp_path: Path) -> None:
    """Two gloo ranks, each with half of every tensor: sums add up, min and max are exact."""
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
             join=True)
    whole = step_sums(_shard_steps(None)).to_host()  # type: ignore[arg-type]
    for rank in (0, 1):
        values = np.load(tmp_path / f"values{rank}.npy")
        np.testing.assert_allclose(values, whole.values, rtol=1e-5)  # float32 norms per shard
        for name in ("numel", "eps_dominated", "eps_numel", "second_numel"):  # counts: exact
            j = FIELDS.index(name)
            assert values[:, j].tolist() == whole.values[:, j].tolist()
        for name in ("eff_min", "eff_max"):  # the halves differ: a sum would be wrong here
            j = FIELDS.index(name)
            assert values[0, j] == whole.values[0, j] and values[1, j] == whole.values[1, j]
        np.testing.assert_array_equal(np.load(tmp_path / f"hist{rank}.npy"), whole.hist)
