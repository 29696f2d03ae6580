"""Smoke tests of the benchmark scripts: they run end to end and write well-formed results.

Both scripts run in their ``--smoke`` mode (a handful of tiny runs) as subprocesses, the
way the Makefile runs them. No wall-clock assertion: only that the outputs exist, parse
and hold what the docs say they hold.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *extra: str) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out),
           *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_overhead_smoke_writes_results(tmp_path: Path) -> None:
    _run("overhead.py", tmp_path)
    doc = json.loads((tmp_path / "overhead_smoke.json").read_text())
    assert doc["machine"]["nproc"] >= 1
    assert doc["machine"]["torch"]
    timing = doc["timing"]["digits_mlp"]["results"]
    assert set(timing) == {f"{c}@1" for c in doc["config"]["configs"]}
    assert timing["baseline@1"]["ratio_median"] == pytest.approx(1.0)
    for v in timing.values():
        assert v["ratio_median"] > 0
        assert v["step_ms_mean_median"] > 0
    sp = doc["stats_pass"]["digits_mlp"]
    assert sp["adam_step_ms"] > 0
    assert sp["monitor_group_over_adam"] > 0 and sp["monitor_tensor_over_adam"] > 0
    rss = doc["rss"]["digits_mlp"]
    assert rss["baseline"]["ratio"] == pytest.approx(1.0)
    assert all(v["maxrss_mb"] and v["maxrss_mb"] > 0 for v in rss.values())
    assert all(isinstance(t["met"], bool) for t in doc["targets"])
    md = (tmp_path / "overhead_smoke.md").read_text()
    assert "Step time ratio" in md and "| baseline |" in md


@pytest.mark.slow
def test_divergence_smoke_writes_results(tmp_path: Path) -> None:
    _run("divergence_suite.py", tmp_path)
    doc = json.loads((tmp_path / "divergence_smoke.json").read_text())
    cfg = doc["config"]
    assert cfg["errors"] == 0
    assert cfg["n_runs"] == len(doc["runs"]) == (
        len(cfg["tasks"]) * len(cfg["optimizers"]) * len(cfg["lr_mults"])
        * len(cfg["seeds"]) * len(cfg["policies"]))
    assert set(doc["tuned"]) == {f"{t}/{o}" for t in cfg["tasks"] for o in cfg["optimizers"]}
    for v in doc["tuned"].values():
        assert v["lr"] in cfg["sweep"]
    assert set(doc["summary"]) == set(cfg["policies"])
    for s in doc["summary"].values():
        assert 0 <= s["false_intervention_runs"] <= s["tuned_runs"]
        assert 0 <= s["detected"] <= s["failing_unguarded"] <= s["too_high_runs"]
    # no policy, no intervention
    assert all(r["n_interventions"] == 0 for r in doc["runs"] if r["policy"] == "none")
    with (tmp_path / "divergence_smoke.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == cfg["n_runs"]
    assert {"task", "optimizer", "lr", "lr_mult", "seed", "policy", "metric",
            "blowup_step", "first_intervention"} <= set(rows[0])
    md = (tmp_path / "divergence_smoke.md").read_text()
    assert "Detection and recovery per policy" in md
    assert all(f"| {p} |" in md for p in cfg["policies"])
