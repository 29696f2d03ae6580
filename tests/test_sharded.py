"""DDP, FSDP2 and tensor parallelism on 2 CPU processes against one unsharded process.

``tests/sharded_script.py`` trains the same model from the same initial weights on the same
global batches under each strategy; the oracle is :func:`~tests.sharded_script.fit` in
this process. The monitor's statistics (every row, every tensor) and the guard's loss and
gradient norm must be the unsharded run's: under FSDP2 the squared norms of the shards
are *summed* (each rank holds a different piece), under DDP the replicated gradient is
counted once, under tensor parallelism the replicated ``LayerNorm`` and row-wise bias once
and the column/row shards summed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.sharded_script import fit, plain_loop

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SCRIPT = Path(__file__).with_name("sharded_script.py")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-process runs (once for the module): ``<mode><rank>.json``."""
    out = tmp_path_factory.mktemp("sharded")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29800 + os.getpid() % 1000),
               PYTHONWARNINGS="ignore", PL_DISABLE_FORK="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _read(out: Path, mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return tuple(json.loads((out / f"{mode}{r}.json").read_text())  # type: ignore[return-value]
                 for r in (0, 1))


def _close(a: float, b: float, key: str) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    # quantiles come from histograms: a value moving across a bin edge by rounding moves
    # them by a fraction of a bin
    rel = 1e-3 if key.startswith("eff_lr/p") else 1e-4
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)


def _assert_same_records(got: list[Any], want: list[Any]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    for (index, rows), (_, expected) in zip(got, want, strict=True):
        assert rows.keys() == expected.keys(), index
        for row, values in expected.items():
            assert rows[row].keys() == values.keys(), (index, row)
            bad = {k: (rows[row][k], v) for k, v in values.items()
                   if not _close(rows[row][k], v, k)}
            assert not bad, (index, row, bad)


def _assert_same_guard(got: list[Any], want: list[Any]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, values), (_, expected) in zip(got, want, strict=True):
        assert values.keys() == expected.keys(), step
        assert all(_close(values[k], v, k) for k, v in expected.items()), (step, values, expected)


@pytest.mark.parametrize(("mode", "options"), [
    ("ddp", {}),
    ("fsdp2", {"deferred": True}),
    ("tp", {"nan": False}),
])
def test_statistics_and_guard_signals_equal_an_unsharded_run(
        sharded: Path, tmp_path: Path, mode: str, options: dict[str, bool]) -> None:
    r0, r1 = _read(sharded, mode)
    oracle = fit(None, tmp_path, **options)
    assert r0["faults"] == r1["faults"] == oracle["faults"] == []
    # Both ranks judged the same values and decided the same (a NaN on rank 1 only, for
    # DDP and FSDP2: a rollback and a cut on both, as in the oracle).
    assert r0["guard"] == r1["guard"]
    assert r0["events"] == r1["events"] == oracle["events"]
    if options.get("nan", True):
        assert oracle["events"][0][1:] == ["nonfinite", ["rollback", "cut_lr"]]
    _assert_same_guard(r0["guard"], oracle["guard"])
    for rank in (r0, r1):  # every rank records (the guard listens) the same values
        _assert_same_records(rank["records"], oracle["records"])
    assert r0["global_step"] == oracle["global_step"]
    for name, values in oracle["params"].items():
        assert r0["params"][name] == pytest.approx(values, abs=1e-6), name


def test_attach_in_a_plain_fully_shard_loop_sums_the_shards(sharded: Path) -> None:
    want = plain_loop(sharded=False)
    for rank in (0, 1):
        got = json.loads((sharded / f"attach{rank}.json").read_text())
        _assert_same_records(got, want)
