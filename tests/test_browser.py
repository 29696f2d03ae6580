"""TensorBoard, as a person opens it, shows the monitor's charts.

``lr-monitor demo --quick`` writes real Lightning runs with ``StepSizeMonitor`` and
``DivergenceGuard``; TensorBoard serves them on 127.0.0.1 and headless Chromium loads
the dashboards:

* ``#scalars`` and ``#custom_scalars`` (``--dump-dom``): the dashboards load. Their
  charts live in Polymer shadow DOM, which ``--dump-dom`` does not serialise, so the
  tag names are checked through TensorBoard's HTTP data API, fetched by the same
  Chromium: ``/data/plugin/scalars/tags`` must list the monitor's tags for both runs and
  ``/data/plugin/custom_scalars/layout`` must hold the monitor's layout.
* The Time Series dashboard (Angular, light DOM) filtered to ``eff_lr/p50``: the page
  must say how many charts match, and the groups must count the monitor's charts.
* Screenshots (saved under ``tmp_path``, path printed) of the Scalars dashboard filtered
  to ``eff_lr/p50`` and of Custom Scalars must show both runs' curves, found by
  TensorBoard's run colours.

Skipped, with the reason, when Chromium is not installed
(``apt-get install -y chromium``). Every wait is bounded and the TensorBoard process
group is always terminated.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lr_monitor.cli import main


def _find_chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


CHROMIUM = _find_chromium()
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                       "(/usr/bin/chromium or chromium on PATH): apt-get install -y chromium"),
]

RUNS = ("healthy-lr1e-3/version_0", "too-high-lr1/version_0")
#: Tags every run must have: the monitor's headline statistics, the guard's and the loss.
REQUIRED_TAGS = (
    "optim/eff_lr/p50/Adam/global",
    "optim/eff_lr/p05/Adam/global",
    "optim/eff_lr/p95/Adam/global",
    "optim/update_ratio/Adam/pg0",
    "optim/update_ratio/Adam/global",
    "optim/lr/Adam/pg0",
    "optim/grad_norm/Adam/global",
    "guard/lr_scale",
    "guard/events",
    "train/loss",
)
TB_START_TIMEOUT = 90.0
CHROMIUM_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode("utf-8"))


@pytest.fixture(scope="module")
def demo_logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "runs"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def tensorboard(demo_logdir: Path) -> Iterator[str]:
    """TensorBoard on 127.0.0.1, serving the demo's runs; yields its base URL."""
    port = _free_port()
    exe = Path(sys.executable).parent / "tensorboard"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorboard.main"]
    log = demo_logdir.parent / "tensorboard.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [*cmd, "--logdir", str(demo_logdir), "--host", "127.0.0.1", "--port", str(port),
             "--load_fast", "false", "--reload_interval", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, terminated as a whole below
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TB_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: "
                            f"{log.read_text(errors='replace')[-2000:]}")
            try:
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
                if all(run in tags for run in RUNS):
                    break  # the server answers and has loaded both runs
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not serve both runs within {TB_START_TIMEOUT} s: "
                            f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


def _chromium(tmp_path: Path, url: str, *extra: str) -> str:
    """Run headless Chromium on ``url`` with a fresh profile; returns its stdout."""
    assert CHROMIUM is not None
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=15000",
        *extra, url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def _json_from_dom(dom: str) -> Any:
    """The JSON document Chromium shows for a JSON URL (inside ``<pre>``)."""
    match = re.search(r"<pre[^>]*>(.*?)</pre>", dom, flags=re.S)
    assert match, f"no <pre> in the page: {dom[:500]}"
    return json.loads(html.unescape(match.group(1)))


def _visible_text(dom: str) -> str:
    text = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", html.unescape(text))


def test_scalars_dashboard_lists_the_monitor_tags(tensorboard: str, tmp_path: Path) -> None:
    dom = _chromium(tmp_path, f"{tensorboard}/#scalars", "--dump-dom")
    assert "<tf-scalar-dashboard" in dom  # the Scalars dashboard is the one shown

    tags = _json_from_dom(_chromium(tmp_path, f"{tensorboard}/data/plugin/scalars/tags",
                                    "--dump-dom"))
    assert set(RUNS) <= set(tags)
    for run in RUNS:
        missing = [t for t in REQUIRED_TAGS if t not in tags[run]]
        assert not missing, f"{run} lacks {missing}"


def test_custom_scalars_dashboard_has_the_monitor_layout(tensorboard: str,
                                                         tmp_path: Path) -> None:
    dom = _chromium(tmp_path, f"{tensorboard}/#custom_scalars", "--dump-dom")
    assert "<tf-custom-scalar-dashboard" in dom

    layout = _json_from_dom(_chromium(
        tmp_path, f"{tensorboard}/data/plugin/custom_scalars/layout", "--dump-dom"))
    charts = [chart for category in layout["category"] for chart in category["chart"]]
    titles = {chart["title"] for chart in charts}
    assert {"eff_lr/p50", "update_ratio", "lr"} <= titles, titles

    def covered(tag: str) -> bool:
        return any(re.search(pattern, tag)
                   for chart in charts for pattern in chart.get("multiline", {}).get("tag", []))

    for tag in ("optim/eff_lr/p50/Adam/global", "optim/update_ratio/Adam/pg0",
                "optim/lr/Adam/pg0"):
        assert covered(tag), f"no custom-scalars chart shows {tag}"


def test_time_series_lists_the_eff_lr_charts(tensorboard: str,
                                                        tmp_path: Path) -> None:
    tags = _get_json(f"{tensorboard}/data/plugin/scalars/tags")
    matching = {t for run in RUNS for t in tags[run] if re.search("eff_lr/p50", t)}
    optim = {t for run in RUNS for t in tags[run] if t.startswith("optim/")}
    assert len(matching) >= 2  # global and pg0

    url = f"{tensorboard}/?tagFilter=eff_lr%2Fp50#timeseries"
    text = _visible_text(_chromium(tmp_path, url, "--dump-dom"))
    match = re.search(r"Tags matching filter (\d+) cards?", text)
    assert match, f"the filtered Time Series view did not render: {text[:1000]}"
    assert int(match.group(1)) == len(matching)
    for run in RUNS:  # the run selector lists both runs
        assert run in text
    groups = {name: int(n) for name, n in re.findall(r"\b(optim|guard) (\d+) cards?", text)}
    assert groups.get("optim", 0) >= len(optim), groups  # scalars (+ histograms)
    assert groups.get("guard", 0) >= 2, groups



#: TensorBoard's colours of the first two runs (its fixed default palette).
RUN_COLORS = {"orange": (255, 112, 67), "blue": (0, 119, 187)}


def _run_colour_pixels(png: Path) -> dict[str, int]:
    """How many pixels right of the sidebar have each run colour (±12 per channel)."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)[120:, 360:]
    return {name: int((np.abs(rgb - np.array(c)).max(axis=-1) <= 12).sum())
            for name, c in RUN_COLORS.items()}


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("tb.png", "#scalars&tagFilter=eff_lr%2Fp50"), ("tb-custom-scalars.png", "#custom_scalars")],
)
def test_screenshot_shows_both_runs_curves(tensorboard: str, tmp_path: Path, name: str,
                                          fragment: str) -> None:
    shot = tmp_path / name
    _chromium(tmp_path, f"{tensorboard}/{fragment}", f"--screenshot={shot}",
              "--window-size=1400,1000")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 1000)
    print(f"TensorBoard screenshot: {shot}")
    # Both runs' curves are drawn: each run colour covers a line's worth of pixels.
    pixels = _run_colour_pixels(shot)
    assert all(n >= 300 for n in pixels.values()), pixels
