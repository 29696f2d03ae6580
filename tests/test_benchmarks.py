"""Smoke tests of the benchmark scripts: they run end to end and write well-formed results.

The scripts run in their ``--smoke`` mode (a handful of tiny runs) as subprocesses, the
way the Makefile runs them; the divergence suite also in ``--mode smoke_gpt`` (the
character LM path: parameter groups, warm-up + cosine, random windows). No wall-clock
assertion: only that the outputs exist, parse and hold what the docs say they hold. The
suite's pure helpers (policy parsing, schedule, parameter groups) are tested in-process.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import divergence_suite  # noqa: E402


def _run(script: str, out: Path, *extra: str) -> None:
    mode = list(extra) if "--mode" in extra else ["--smoke", *extra]
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *mode, "--out", str(out)]
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


@pytest.mark.slow
def test_divergence_ddp_runs_both_ranks_and_they_agree(tmp_path: Path) -> None:
    """Two DDP runs (2 gloo processes each) at ×1000: the unguarded one blows up, the
    guarded one acts, and both ranks of each took the same decisions and ended with the
    same weights."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "divergence_ddp.py"), "--tasks",
           "digits_mlp", "--optimizers", "sgd", "--mults", "1000", "--seeds", "1",
           "--steps", "40", "--out", str(tmp_path), "--stem", "ddp"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          check=False, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "ddp.json").read_text())
    assert doc["config"]["errors"] == 0
    assert doc["ranks_agree"] == {"runs": 2, "agree": 2}
    runs = {r["policy"]: r for r in doc["runs"]}
    assert runs["none"]["blowup_step"] is not None and runs["none"]["n_interventions"] == 0
    assert runs["guard"]["n_interventions"] >= 1
    assert "Ranks agree" in (tmp_path / "ddp.md").read_text()


@pytest.mark.slow
def test_divergence_smoke_gpt_writes_delay_and_recovery_tables(tmp_path: Path) -> None:
    _run("divergence_suite.py", tmp_path, "--mode", "smoke_gpt")
    doc = json.loads((tmp_path / "divergence_smoke_gpt.json").read_text())
    cfg = doc["config"]
    assert cfg["errors"] == 0
    assert cfg["tasks"] == ["char_gpt_tiny"]
    assert cfg["n_runs"] == len(doc["runs"]) == len(cfg["lr_mults"]) * len(cfg["policies"])
    assert all(r["steps_run"] == cfg["steps"] for r in doc["runs"] if r["policy"] == "none")
    # the ×1000 run blows up unguarded: the tables have a row for every guard policy
    guards = [p for p in cfg["policies"] if p != "none"]
    assert set(doc["delays"]) == set(doc["recovery"]) == set(guards)
    for p in guards:
        d = doc["delays"][p]["char_gpt_tiny"]
        assert d["count"] <= d["blown_up"] == 1
        rec = doc["recovery"][p]["x1000"]
        assert rec["failing_unguarded"] == 1
        assert rec["detected"] == (rec["interventions_1"] + rec["interventions_2"]
                                   + rec["interventions_3plus"])
        assert rec["recovered"] - rec["recovered_undetected"] == (
            rec["recovered_1"] + rec["recovered_2"] + rec["recovered_3plus"])
    md = (tmp_path / "divergence_smoke_gpt.md").read_text()
    assert "## Delay: unguarded blow-up → first action, per task" in md
    assert "## Recovery of the runs that fail unguarded" in md
    assert "| guard | char_gpt_tiny |" in md and "| guard | x1000 |" in md


@pytest.mark.slow
def test_report_scale_smoke_measures_every_case(tmp_path: Path) -> None:
    _run("report_scale.py", tmp_path, "--data", str(tmp_path / "data"), "--label", "smoke")
    doc = json.loads((tmp_path / "report_scale_smoke.json").read_text())
    results = doc["labels"]["smoke"]["results"]
    assert set(results) == {f"{case}/{command}" for case in doc["cases"]
                            for command in ("report", "plot")}
    for key, r in results.items():
        assert r["rc"] == 0 and r["killed"] is None, (key, r)
        assert r["peak_rss_mib"] > 0 and r["lr_monitor"].startswith(str(ROOT))
        assert (r["pngs"] > 0) == key.endswith("/plot")
    # 30 runs: 5 pages of 6 columns; every page within the bound of 6 columns
    assert results["runs3000/plot"]["pngs"] == 5
    assert results["runs3000/plot"]["largest_png"][0] <= (1.2 + 5.4 * 6) * 110 + 1
    md = (tmp_path / "report_scale_smoke.md").read_text()
    assert "| runs3000 | plot |" in md and "smoke: time, peak RSS" in md


def test_policy_values_parse_numbers_bools_strings_and_tuples() -> None:
    kw = divergence_suite.parse_guard_kwargs(
        "explosion_factor=4,lr_factor=0.03,min_lr=1e-6,reads=deferred,jsonl=false,"
        "log_events=True,events_dir=none,overshoot_rules=step_quality|stability_ratio")
    assert kw == {"explosion_factor": 4, "lr_factor": 0.03, "min_lr": 1e-6,
                  "reads": "deferred", "jsonl": False, "log_events": True,
                  "events_dir": None, "overshoot_rules": ("step_quality", "stability_ratio")}
    assert isinstance(kw["explosion_factor"], int)
    assert divergence_suite.parse_value("|") == ()
    with pytest.raises(ValueError, match="name=value"):
        divergence_suite.parse_guard_kwargs("explosion_factor")
    with pytest.raises(ValueError, match="twice"):
        divergence_suite.parse_guard_kwargs("cooldown=1,cooldown=2")


def test_warmup_cosine_rises_then_falls_to_a_tenth() -> None:
    total = 200
    mult = [common.warmup_cosine(t, total) for t in range(total + 1)]
    assert mult[0] == pytest.approx(1 / 20) and mult[19] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(mult[:20]))
    assert all(a >= b for a, b in itertools.pairwise(mult[19:]))
    assert mult[total] == pytest.approx(0.1)


def test_decay_groups_split_matrices_from_the_rest_and_every_optimizer_takes_them() -> None:
    model = common.CharGPT(vocab=20, d_model=16, n_heads=2, n_layers=1, context=8)
    decay, rest = common.decay_groups(model)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    ids = [id(p) for p in model.parameters()]
    assert sorted(ids) == sorted(id(p) for p in decay["params"] + rest["params"])
    assert all(p.dim() == 2 for p in decay["params"])
    assert id(model.tok.weight) in {id(p) for p in rest["params"]}  # tied head: no decay
    assert all(p.dim() == 1 for p in rest["params"] if p is not model.tok.weight
               and p is not model.pos.weight)
    for name in divergence_suite.OPTIMIZERS:
        groups = common.decay_groups(model)
        groups[0]["not_an_argument"] = 1
        opt = divergence_suite.make_optimizer(name, groups, 1e-3)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        assert "not_an_argument" not in opt.param_groups[0]


def test_char_windows_are_fixed_by_the_seed() -> None:
    x = torch.arange(1000)
    a = [b[0] for b in common.CharWindows(x, x + 1, 4, seed=3, context=8)]
    b = [b[0] for b in common.CharWindows(x, x + 1, 4, seed=3, context=8)]
    assert len(a) == common.CHAR_BATCHES_PER_EPOCH
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert torch.equal(a[0][:, 1:] - a[0][:, :-1], torch.ones(4, 7, dtype=torch.long))
