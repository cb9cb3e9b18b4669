"""The short version of scripts/soak.py: a live stream at its full rate for about 25 seconds.

The script serves an MJPEG stream at 25 fps from a child process and runs it through
VideoSource -> VideoPipeline -> VideoWriter + JsonLines, sampling its own resident memory,
threads and open file descriptors. After the warm-up (model, encoder and thread pools set up)
nothing may grow: memory by less than 30 MB, threads and descriptors not at all (one transient
thread or descriptor at a sample is allowed), and after the run every thread and file is gone.
The long run's figures are in BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECONDS, WARMUP, FPS = 25, 8, 25


@pytest.mark.slow
def test_short_soak_is_flat(tmp_path: Path) -> None:
    pytest.importorskip("psutil", reason="the soak measures itself with psutil")
    shared_model = ROOT.parent / "shared" / "models" / "deeplabv3_mobilenetv2_voc_257.onnx"
    if not shared_model.is_file():
        pytest.importorskip("onnx", reason="without ../shared the soak builds a tiny model with onnx")
    out = tmp_path / "soak.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", str(SECONDS), "--warmup", str(WARMUP),
         "--interval", "3", "--fps", str(FPS), "--size", "320x180", "--json", str(out)],
        capture_output=True, text=True, timeout=SECONDS + 90, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(out.read_text())
    report = proc.stdout

    frames = summary["frames"]
    assert frames["ended"] == "stopped"
    # The source's full rate reached the pipeline (a loaded machine may lose a little).
    assert frames["read"] >= 0.8 * FPS * SECONDS, report
    assert frames["segmented"] >= SECONDS and frames["written"] >= 0.8 * FPS * SECONDS, report

    rss = summary["rss_mb"]
    assert rss["growth_after_warmup"] < 30 and rss["max_growth_after_warmup"] < 30, report

    base = next(s for s in summary["samples"] if s.get("baseline"))
    after = [s for s in summary["samples"] if s["t_s"] > base["t_s"]]
    assert len(after) >= 4, report
    assert max(s["threads"] for s in after) <= base["threads"] + 1, report
    assert after[-1]["threads"] <= base["threads"] + 1, report
    assert max(s["fds"] for s in after) <= base["fds"] + 1, report
    # After the run: the pipeline's threads joined, the capture, recording and stats closed (a
    # thread pool that a library starts on first use and keeps, torch's, may stay: one thread).
    assert summary["threads"]["after_run"] <= summary["threads"]["start"] + 1, report
    assert summary["fds"]["after_run"] <= summary["fds"]["start"], report
