"""DivergenceGuard under DDP: one rank's fault leads to the same decision on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).with_name("ddp_guard_script.py")


def _ranks(tmp_path: Path, *mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the script on 2 processes; what each rank wrote."""
    offset = {(): 0, ("poison",): 1000, ("snapfail",): 2000}[mode]  # no port shared
    port = 29500 + offset + os.getpid() % 1000
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), *mode], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (json.loads((tmp_path / "rank0.json").read_text()),
            json.loads((tmp_path / "rank1.json").read_text()))


@pytest.mark.slow
def test_ranks_agree_when_only_one_rank_sees_the_fault(tmp_path: Path) -> None:
    r0, r1 = _ranks(tmp_path)
    # NaN on rank 1 at step 6 -> rollback + cut on both. A loss spike on rank 1 only at
    # step 25 is judged on the rank-averaged loss, so whatever is decided, both decide it.
    assert r0["events"] == r1["events"]
    assert r0["events"][0] == [6, "nonfinite", ["rollback", "cut_lr"]]
    assert r0["lr"] == r1["lr"] == pytest.approx(1e-4)
    assert r0["params"] == r1["params"]  # bit-identical replicas: no rank drifted
    assert r0["finite"] and r1["finite"]
    assert r0["global_step"] == r1["global_step"] == 40


@pytest.mark.slow
def test_a_state_poisoned_on_one_rank_is_rolled_back_on_both(tmp_path: Path) -> None:
    """Rank 1's Adam moment turns NaN just before the step-50 snapshot. The snapshot's
    finiteness is agreed across ranks, so both drop it and roll back to step 25 together;
    they end finite and bit-identical (each rank deciding alone would part them)."""
    r0, r1 = _ranks(tmp_path, "poison")
    assert r0["events"] == r1["events"]
    assert r0["events"][0][:2] == [50, "nonfinite"] and "rollback" in r0["events"][0][2]
    assert r0["params"] == r1["params"]
    assert r0["finite"] and r1["finite"]


@pytest.mark.slow
def test_a_snapshot_that_fails_on_one_rank_is_dropped_on_both(tmp_path: Path) -> None:
    """Rank 1 cannot copy the step-20 snapshot (its snapshot stage is then off): the ranks
    agree to hold neither that one nor any later one — no rank waits in an all-reduce the
    other never reaches — and the NaN at step 30 rolls both back to step 10."""
    r0, r1 = _ranks(tmp_path, "snapfail")
    assert r0["events"][0] == [30, "nonfinite", ["rollback", "cut_lr"]]
    assert r0["events"][:1] == r1["events"][:1]
    assert r0["snapshots"] == r1["snapshots"] == [0, 10]
    assert r0["params"] == r1["params"] and r0["finite"]
