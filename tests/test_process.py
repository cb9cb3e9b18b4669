"""Process-wide settings the command makes before torch loads (cli.configure_process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A real LR-ASPP (random weights) segmenting 720p frames through the video pipeline, in a fresh
# process, counting page faults per frame after warm-up.
_PROBE = """
import json, os, resource, sys
if sys.argv[1] == "configured":
    from streamseg.cli import configure_process
    configure_process()
""" + 'import numpy as np, torch\nfrom streamseg.segmenter import Segmenter\nfrom streamseg.overlay import Painter\nfrom streamseg.types import Frame, VideoInfo\nfrom streamseg.video import VideoOutputs, VideoPipeline, VideoSettings\ntorch.manual_seed(0)\nseg = Segmenter("lraspp_mobilenet_v3_large", device="cpu", pretrained=False, threads=2)\nclass Frames:\n    def __init__(self, n):\n        self.info = VideoInfo(width=1280, height=720, fps=25.0, frame_count=n, live=False, name="synthetic")\n        self.n, self.i = n, 0\n        self.image = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)\n    def read(self):\n        if self.i >= self.n: return None\n        self.i += 1\n        return Frame(image=self.image.copy(), index=self.i - 1, timestamp_s=self.i / 25)\n    def grab(self): return None if self.read() is None else self.i - 1\n    def close(self): pass\nclass Sink:\n    width, height, frames_written = 1280, 720, 0\n    def write(self, image, timestamp_s=None): self.frames_written += 1\npainter = Painter(selected=seg.selected, palette=seg.palette, alpha=0.5)\nVideoPipeline(Frames(6), seg, VideoOutputs(writer=Sink()), VideoSettings(), painter=painter).run()\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\nVideoPipeline(Frames(12), seg, VideoOutputs(writer=Sink()), VideoSettings(), painter=painter).run()\nfaults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 12\nprint(json.dumps({"faults_per_frame": faults, "omp": os.environ.get("OMP_WAIT_POLICY")}))\n'


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_WAIT"))}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_frames_reuse_memory_instead_of_faulting_it_in_again():
    plain, configured = _probe("plain"), _probe("configured")
    # Measured: 9,000-16,000 page faults per 720p frame without, about 1,000 with (LR-ASPP).
    assert configured["faults_per_frame"] < plain["faults_per_frame"] / 3, (plain, configured)
    assert plain["omp"] is None and configured["omp"] == "PASSIVE"
