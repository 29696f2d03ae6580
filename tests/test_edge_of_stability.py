"""Smoke test of ``benchmarks/edge_of_stability.py``: it runs end to end, writes its files.

The script runs in its ``--smoke`` mode (a few steps per run, too few to reach a
plateau) as a subprocess, as ``tests/test_benchmarks.py`` runs the other benchmarks. No
assertion on a trajectory's outcome or on time: only that the outputs exist, parse and
hold what ``docs/edge_of_stability.md`` says they hold, and that the plateau rule (a pure
function) does what its docstring says.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "edge_of_stability.py"

pytestmark = pytest.mark.integration  # trains models (in a subprocess)


def _plateau_rule() -> ModuleType:
    """The script as a module, for its pure ``plateau`` function (imports Lightning)."""
    spec = importlib.util.spec_from_file_location("edge_of_stability_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path  # the script puts benchmarks/ first, for its `common`
    return module


@pytest.mark.slow
def test_smoke_writes_results_and_plots(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path),
                           "--img", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for png in ("edge_of_stability_smoke.png", "overshoot_signals_smoke.png"):
        data = (tmp_path / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    doc = json.loads((tmp_path / "edge_of_stability_smoke.json").read_text())
    cfg = doc["config"]
    assert cfg["mode"] == "smoke" and cfg["dtype"] == "float32"
    runs = doc["full_batch"]["runs"]
    assert set(runs) == {label for label, _, _ in cfg["full_batch"]}
    for label, opt, lr in cfg["full_batch"]:
        (run,) = runs[label]
        steps = list(range(0, cfg["fb_steps"], cfg["fb_every"]))
        assert run["steps"] == steps  # SharpnessMonitor after steps 0, k, 2k, ...
        expected = (2.0 if opt == "sgd" else 38.0) / lr
        assert run["threshold"] == pytest.approx(expected, rel=1e-6)
        for value, ratio in zip(run["value"], run["ratio"], strict=True):
            assert ratio == pytest.approx(value / expected, rel=1e-5)
        assert len(run["loss_every_10"]) == math.ceil(cfg["fb_steps"] / 10)
        assert isinstance(run["guard"], dict)  # the log-only guard's detections
        assert run["cos_steps"] == steps[1:]  # the consecutive statistics are recorded
        assert all(-1 <= c <= 1 for cs in run["cosines"].values() for c in cs)
    summary = doc["pairs"]["summary"]
    assert set(summary) == {p[i][0] for p in cfg["pairs"] for i in (1, 2)}
    for runs_of_label in doc["pairs"]["runs"].values():
        assert all(len(cs) == 1 for cs in runs_of_label[0]["cosines"].values())  # step 25
    for s in summary.values():
        assert s["steps"] == cfg["mb_steps"]  # ρ measured at every step
        assert 0 <= s["rho_negative"] <= 1 and 0 <= s["overshoot_frac"] <= 1
        assert -1 <= s["consecutive_update_cosine"] <= 1
        assert -1 <= s["grad_update_cosine"] <= 1
    md = (tmp_path / "edge_of_stability_smoke.md").read_text()
    assert "## 1. Full batch: the plateaus" in md and "## 2. Mini-batch" in md
    assert all(f"| {label} |" in md for label, _, _ in cfg["full_batch"])


@pytest.mark.slow  # imports the script, hence Lightning
def test_plateau_rule_skips_the_start_above_and_takes_the_last_half() -> None:
    plateau = _plateau_rule().plateau
    # Adam-like: above 1 at first (v̂ from one gradient), then below, then up to ~1.
    steps = list(range(0, 200, 10))
    ratios = [50.0, 0.1, 0.3, 0.5, 0.7, 0.95, 1.1, 0.9, 1.0, 1.0,
              1.02, 0.98, 1.0, 1.04, 0.96, 1.0, 1.0, 1.02, 0.98, 1.0]
    p = plateau(steps, ratios)
    assert p["t_star"] == 50  # the first ≥ 0.9 after a value < 0.9, not step 0
    assert p["n"] == 8 and p["start"] == 120 and p["end"] == 190  # last half of 15
    assert p["mean"] == pytest.approx(sum(ratios[12:]) / 8)
    assert p["deviation"] == pytest.approx(abs(p["mean"] - 1))
    assert p["within"] == 1.0
    assert plateau(steps, [0.5] * 20) == {"t_star": None}
    assert plateau(steps, [2.0] * 20) == {"t_star": None}
