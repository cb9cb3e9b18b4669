"""Live sources: a real MJPEG-over-HTTP server on 127.0.0.1 written here, the real CLI in a
subprocess (reconnect after the server goes away, SIGINT), and the live pipeline in-process
(latest-frame policy, memory over 10,000 frames, threads that end with the run).

Only loopback addresses are used.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import av
import numpy as np
import psutil
import pytest

from conftest import random_onnx as tiny_onnx
from streamseg.overlay import Painter
from streamseg.segmenter import Segmenter
from streamseg.sinks import JsonLines
from streamseg.sources import VideoSource
from streamseg.types import Frame, VideoInfo
from streamseg.video import VideoOutputs, VideoPipeline, VideoSettings
from streamseg.videowriter import VideoWriter

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ONNX_MODEL = SHARED / "models" / "deeplabv3_mobilenetv2_voc_257.onnx"
VOC = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

needs_model = pytest.mark.skipif(not ONNX_MODEL.is_file(), reason=f"needs the shared ONNX model {ONNX_MODEL}")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    pytest.importorskip("onnx", reason="building the tiny test model needs the onnx package")
    path = tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx")
    return Segmenter(str(path), device="cpu", classes="car")


def start_cli(*args: str | Path, cwd: Path) -> subprocess.Popen:
    """`python -m streamseg ARGS` in the background, importing this checkout's package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "streamseg", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def streamseg_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("streamseg")]


def painter_for(segmenter: Segmenter) -> Painter:
    return Painter(selected=segmenter.selected, palette=segmenter.palette, alpha=0.5)


# --------------------------------------------------------------------------- the CLI on a live stream


@needs_model
def test_cli_records_stream_across_a_restart_and_stops_on_sigint(mjpeg_server, tmp_path: Path) -> None:
    server = mjpeg_server(levels=(60, 190))  # grey 60 before the restart, 190 after
    proc = start_cli(server.url, "-o", "rec.mp4", "--no-show", "--model", ONNX_MODEL, "--stats", "live.jsonl",
                     cwd=tmp_path)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()

    def wait_for(what: str, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert proc.poll() is None, f"the CLI ended early while waiting for {what}:\n" + "".join(err)
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "".join(err)
            time.sleep(0.05)

    try:
        wait_for("the first frames", lambda: server.sent[0] >= 30)
        server.stop()  # the camera goes away for a few seconds
        time.sleep(2.5)
        server.start()  # and comes back on the same port
        wait_for("frames after the restart", lambda: server.sent[1] >= 40, timeout=45)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        stdout = proc.stdout.read()  # one line; stderr belongs to the reader thread
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    stderr = "".join(err)

    assert proc.returncode == 130, stderr
    assert re.search(r"streamseg: warning: stream .* dropped .*reconnecting in \d+ s \(attempt 1/10\)", stderr), stderr
    assert "Traceback" not in stderr
    m = re.search(r"^wrote rec\.mp4: (\d+) frames over [\d.]+ s \(h264\)", stdout, re.M)
    assert m, stdout
    with av.open(str(tmp_path / "rec.mp4")) as container:
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert len(frames) == int(m.group(1)) > 0
    # The recording carries on after the reconnect: frames from both server runs, in that order.
    levels = [int(round(float(f[60, 80].mean()))) for f in frames]
    first = [i for i, v in enumerate(levels) if abs(v - 60) <= 6]
    second = [i for i, v in enumerate(levels) if abs(v - 190) <= 6]
    assert first and second and max(first) < min(second), levels
    assert len(first) + len(second) == len(levels), levels
    stats = [json.loads(line) for line in (tmp_path / "live.jsonl").read_text().splitlines()]
    indices = [s["index"] for s in stats]
    assert len(indices) >= 2 and indices == sorted(set(indices))
    assert not [p.name for p in tmp_path.iterdir() if ".part" in p.name]


@needs_model
def test_cli_recording_of_a_live_stream_plays_in_real_time(mjpeg_server, tmp_path: Path) -> None:
    """A 10 fps MJPEG camera, for which OpenCV claims 25 fps (it does for any MJPEG stream):
    each frame is recorded at its capture time, so the recording lasts as long as the camera
    ran, instead of playing 2.5 times too fast. Stats times count from the stream's first frame."""
    from media import frame_times_s

    server = mjpeg_server(fps=10)
    proc = start_cli(server.url, "-o", "rec.mp4", "--no-show", "--model", ONNX_MODEL, "--stats", "live.jsonl",
                     cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while server.sent[0] < 40 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.sent[0] >= 40, proc.stderr.read() if proc.poll() is not None else "the stream did not flow"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, proc.stderr.read()
    times = frame_times_s(tmp_path / "rec.mp4")
    assert len(times) >= 20 and times[0] == 0
    gaps = np.diff(times)
    assert 0.08 < float(np.median(gaps)) < 0.12, gaps
    assert times[-1] == pytest.approx(0.1 * (len(times) - 1), rel=0.15)
    stats = [json.loads(line)["timestamp_s"] for line in (tmp_path / "live.jsonl").read_text().splitlines()]
    assert len(stats) >= 10 and 0 <= stats[0] < 1 and stats == sorted(stats)
    assert stats[-1] < times[-1] + 1


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_while_waiting_for_a_stream_ends_at_once(tiny_segmenter: Segmenter, tmp_path: Path,
                                                       sig: signal.Signals, code: int) -> None:
    """Nobody serves the URL yet: the CLI retries with back-off; a signal then ends it at once,
    with its exit status and no output file (nothing was recorded)."""
    model = tiny_onnx(tmp_path / "tiny.onnx")
    url = f"http://127.0.0.1:{free_port()}/video.mjpg"
    proc = start_cli(url, "-o", "rec.mp4", "--no-show", "--model", model, cwd=tmp_path)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("reconnecting in" in line for line in err):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)
            time.sleep(0.05)
        proc.send_signal(sig)
        started = time.monotonic()
        proc.wait(timeout=15)
        assert time.monotonic() - started < 3, "the signal did not cut the back-off short"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    assert proc.returncode == code, "".join(err)
    assert "Traceback" not in "".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


# --------------------------------------------------------------------------- the live pipeline in-process


class SyntheticCamera:
    """A live source with the interface VideoPipeline uses (info, read, grab, close): `n` frames of
    (48, 64, 3) uint8 BGR at `fps`, stamped with the monotonic clock like a real camera's."""

    def __init__(self, *, n: int, fps: float) -> None:
        self.info = VideoInfo(width=64, height=48, fps=fps, frame_count=None, live=True, name="synthetic camera")
        self.n, self.period = n, 1.0 / fps
        self.stamps: dict[int, float] = {}
        self._next = 0
        self._due = time.monotonic()
        self.closed = threading.Event()

    def read(self) -> Optional[Frame]:
        if self._next >= self.n or self.closed.is_set():
            return None
        self._due += self.period
        delay = self._due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        index, self._next = self._next, self._next + 1
        image = np.full((48, 64, 3), index % 256, np.uint8)
        self.stamps[index] = now = time.monotonic()
        return Frame(image=image, index=index, timestamp_s=now)

    def grab(self) -> Optional[int]:
        frame = self.read()
        return None if frame is None else frame.index

    def close(self) -> None:
        self.closed.set()


class SlowSegmenter:
    """The real (tiny) segmenter behind a 0.2 s delay, like a big model on a small machine.
    Records how old each frame is when the model takes it."""

    def __init__(self, inner: Segmenter, delay_s: float = 0.2) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.categories = inner.categories
        self.input_ages: list[tuple[int, float]] = []  # (frame index, seconds since capture)

    def segment_batch(self, frames):
        self.input_ages.extend((f.index, time.monotonic() - f.timestamp_s) for f in frames)
        time.sleep(self.delay_s)
        return self.inner.segment_batch(frames)


class Display:
    """A window stand-in with a 100 Hz refresh: show() takes 10 ms, no key is ever pressed."""

    def __init__(self) -> None:
        self.shown = 0

    def show(self, image: np.ndarray, *, fps: Optional[float] = None) -> Optional[str]:
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8
        self.shown += 1
        time.sleep(0.01)
        return None

    def wait_key(self, delay_ms: int) -> Optional[str]:
        time.sleep(delay_ms / 1000)
        return None


def test_live_preview_shows_recent_frames_without_backlog(tiny_segmenter: Segmenter) -> None:
    camera = SyntheticCamera(n=600, fps=200)  # 3 s of frames, faster than the display and the model
    model = SlowSegmenter(tiny_segmenter)
    display = Display()
    ages: list[tuple[int, float]] = []

    def on_frame(index: int) -> None:
        ages.append((index, time.monotonic() - camera.stamps[index]))

    started = time.monotonic()
    report = VideoPipeline(camera, model, VideoOutputs(window=display), VideoSettings(),
                           painter=painter_for(tiny_segmenter), on_frame=on_frame).run()
    elapsed = time.monotonic() - started

    assert report.ended == "end" and report.frames_read == 600
    assert elapsed < 6, "the run did not keep pace with the source"
    assert report.frames_dropped > 0  # the display cannot show 200 fps: older frames were replaced
    shown = [i for i, _ in ages]
    # Every source frame shown once, plus at most one redraw per mask (shown as soon as it is ready).
    assert len(shown) <= display.shown <= len(shown) + report.frames_segmented and shown == sorted(set(shown))
    assert len(shown) + report.frames_dropped == shown[-1] - shown[0] + 1
    # No backlog: what is on screen is never much older than one display refresh, and does not
    # drift older over time (a queue would make it grow to seconds).
    worst = max(age for _, age in ages)
    assert worst < 0.25, f"a frame was shown {worst:.3f} s after capture"
    third = len(ages) // 3
    early = np.mean([a for _, a in ages[:third]])
    late = np.mean([a for _, a in ages[-third:]])
    assert late < early + 0.05
    # The model always takes the newest frame, not the next one in a queue.
    assert 5 <= report.frames_segmented <= 20
    # (Once the source has ended, its last frame waits for the model to finish the one before.)
    live_ages = [age for index, age in model.input_ages if index < camera.n - 1]
    assert max(live_ages) < 0.15, " ".join(f"{a:.3f}" for a in live_ages)
    assert streamseg_threads() == []


class TimedSegmenter(SlowSegmenter):
    """SlowSegmenter that also notes when each mask was ready."""

    def __init__(self, inner: Segmenter, delay_s: float) -> None:
        super().__init__(inner, delay_s)
        self.ready: list[float] = []

    def segment_batch(self, frames):
        out = super().segment_batch(frames)
        self.ready.append(time.monotonic())
        return out


class Recorder:
    width, height = 64, 48

    def __init__(self) -> None:
        self.frames_written = 0

    def write(self, image: np.ndarray, timestamp_s: float | None = None) -> None:
        self.frames_written += 1


def test_a_new_mask_is_on_screen_at_once_not_with_the_next_frame(tiny_segmenter: Segmenter) -> None:
    """A slow camera (5 fps) and a slow model: each finished mask is drawn on the frame on screen
    straight away, instead of up to one frame interval (200 ms) later; the recording still gets
    exactly one image per source frame."""
    camera = SyntheticCamera(n=15, fps=5)
    model = TimedSegmenter(tiny_segmenter, delay_s=0.13)
    display, recorder = Display(), Recorder()
    shows: list[float] = []
    report = VideoPipeline(camera, model, VideoOutputs(window=display, writer=recorder), VideoSettings(),
                           painter=painter_for(tiny_segmenter), on_show=lambda index: shows.append(time.monotonic())).run()
    assert report.ended == "end" and report.frames_read == 15
    assert recorder.frames_written == 15  # redraws go to the window only
    assert display.shown == len(shows) > 15
    delays = []
    for ready in model.ready[:-1]:  # the last mask may come after the source ended
        delays.append(min(t for t in shows if t >= ready) - ready)
    assert max(delays) < 0.08, " ".join(f"{d:.3f}" for d in delays)


def test_long_live_stream_memory_and_threads(mjpeg_server, tiny_segmenter: Segmenter, tmp_path: Path) -> None:
    """10,000 frames of 64x48 served as fast as the client reads them: resident memory stays flat and
    every streamseg thread ends with the run."""
    server = mjpeg_server(size=(64, 48), fps=None, levels=(128,))
    process = psutil.Process()
    rss: dict[str, int] = {}
    stop = threading.Event()

    def on_frame(index: int) -> None:
        if index >= 1_000 and "at 1000" not in rss:
            rss["at 1000"] = process.memory_info().rss
        if index >= 10_000:
            rss["at 10000"] = process.memory_info().rss
            stop.set()  # a stream has no end: the user stops it

    started = time.monotonic()
    with VideoSource(server.url, timeout_s=5.0, stop=stop) as source, \
            VideoWriter(tmp_path / "long.mp4", width=64, height=48, fps=source.info.fps) as writer, \
            JsonLines(tmp_path / "long.jsonl", overwrite=False) as stats:
        assert source.info.live
        report = VideoPipeline(source, tiny_segmenter, VideoOutputs(writer=writer, stats=stats), VideoSettings(),
                               painter=painter_for(tiny_segmenter), stop=stop, on_frame=on_frame).run()
    elapsed = time.monotonic() - started

    assert elapsed < 60
    assert report.ended == "stopped" and report.frames_read >= 10_000
    assert report.frames_segmented >= 50 and report.frames_written >= 50
    assert set(rss) == {"at 1000", "at 10000"}
    growth_mb = (rss["at 10000"] - rss["at 1000"]) / 2**20
    assert growth_mb < 50, f"resident memory grew {growth_mb:.1f} MB between frame 1,000 and 10,000"
    assert streamseg_threads() == []
    with av.open(str(tmp_path / "long.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == report.frames_written
    assert len((tmp_path / "long.jsonl").read_text().splitlines()) == report.frames_segmented
