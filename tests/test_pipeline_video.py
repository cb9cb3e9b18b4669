"""VideoPipeline in-process: order for files, stride carrying the last mask, and failure in any
stage ending the run promptly with that error and no thread left behind.

Sources are real (VideoSource on videos written here with PyAV), the writer is the real
VideoWriter and the segmenter is a real Segmenter on a tiny ONNX model; where a stage has to
fail, a thin wrapper around the real component raises on a chosen frame.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Optional

import av
import numpy as np
import pytest

from conftest import random_onnx as tiny_onnx
from streamseg.labels import palette
from streamseg.overlay import Painter
from streamseg.segmenter import Segmenter
from streamseg.sinks import JsonLines, MaskDir
from streamseg.sources import VideoSource
from streamseg.types import Frame, Segmentation, SinkError, VideoInfo
from streamseg.video import VideoOutputs, VideoPipeline, VideoSettings
from streamseg.videowriter import VideoWriter

VOC = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
CAR = 7
PINK_BGR = np.array([147, 20, 255], np.float32)
W, H = 64, 48


# --------------------------------------------------------------------------- helpers


def level(i: int) -> int:
    """Grey level of synthetic frame i: 20..230 in steps of 6, so neighbours are easy to tell apart."""
    return 20 + (i * 6) % 210


def make_video(path: Path, n: int) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv444p"
        stream.options = {"preset": "ultrafast", "qp": "0"}  # lossless: grey levels survive exactly
        for i in range(n):
            image = np.full((H, W, 3), level(i), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    pytest.importorskip("onnx", reason="building the tiny test model needs the onnx package")
    return Segmenter(str(tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx")), device="cpu", classes="car")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", n=40)


def painter(seg: Segmenter, alpha: float = 0.5) -> Painter:
    return Painter(selected=seg.selected, palette=seg.palette, alpha=alpha)


def streamseg_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("streamseg") and t.is_alive()]


class Boom(RuntimeError):
    """The error a failing stage raises in these tests."""


class FailingSegmenter:
    """The real segmenter, except that the first batch holding a frame from `fail_at` on raises Boom
    (a live run may skip frame `fail_at` itself)."""

    def __init__(self, inner: Segmenter, fail_at: int) -> None:
        self.inner, self.fail_at = inner, fail_at
        self.categories = inner.categories

    def segment_batch(self, frames):
        late = [f.index for f in frames if f.index >= self.fail_at]
        if late:
            raise Boom(f"model failed on frame {late[0]}")
        return self.inner.segment_batch(frames)


class FailingWriter:
    """The real VideoWriter, except that writing frame `fail_at` raises SinkError (a full disk)."""

    def __init__(self, inner: VideoWriter, fail_at: int) -> None:
        self.inner, self.fail_at = inner, fail_at
        self.width, self.height = inner.width, inner.height

    @property
    def frames_written(self) -> int:
        return self.inner.frames_written

    def write(self, image: np.ndarray, timestamp_s: float | None = None) -> None:
        if self.inner.frames_written == self.fail_at:
            raise SinkError("cannot write out.mp4: No space left on device")
        self.inner.write(image, timestamp_s)


class StripeLabeller:
    """Labels every pixel 'car' when the frame index is a multiple of 6, background otherwise: which
    mask a written frame carries can then be read off its colour."""

    categories = VOC
    selected = (CAR,)

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def segment_batch(self, frames):
        self.calls.append([f.index for f in frames])
        return [
            Segmentation(frame=f, labels=np.full(f.image.shape[:2], CAR if f.index % 6 == 0 else 0, np.uint8),
                         categories=VOC, selected=(CAR,))
            for f in frames
        ]


class SyntheticCamera:
    """A live source with VideoPipeline's interface: (H, W, 3) frames at `fps`, monotonic timestamps."""

    def __init__(self, *, fps: float = 100.0, fail_at: Optional[int] = None) -> None:
        self.info = VideoInfo(width=W, height=H, fps=fps, frame_count=None, live=True, name="synthetic camera")
        self.period, self.fail_at = 1.0 / fps, fail_at
        self._next = 0
        self.closed = False

    def read(self) -> Optional[Frame]:
        if self.closed:
            return None
        time.sleep(self.period)
        if self._next == self.fail_at:
            raise OSError("camera unplugged")
        index, self._next = self._next, self._next + 1
        return Frame(image=np.full((H, W, 3), level(index), np.uint8), index=index, timestamp_s=time.monotonic())

    def grab(self) -> Optional[int]:
        frame = self.read()
        return None if frame is None else frame.index

    def close(self) -> None:
        self.closed = True


def run_expecting(pipeline: VideoPipeline, error: type[BaseException], match: str) -> float:
    """Run, expect `error`, and return how long the run took to give up."""
    started = time.monotonic()
    with pytest.raises(error, match=match):
        pipeline.run()
    return time.monotonic() - started


# --------------------------------------------------------------------------- order and stride


def test_files_every_frame_in_order(clip: Path, segmenter: Segmenter, tmp_path: Path) -> None:
    seen: list[int] = []
    with VideoSource(str(clip)) as source, \
            VideoWriter(tmp_path / "out.mp4", width=W, height=H, fps=source.info.fps) as writer, \
            JsonLines(tmp_path / "stats.jsonl", overwrite=False) as stats:
        masks = MaskDir(tmp_path / "masks", overwrite=False)
        report = VideoPipeline(source, segmenter, VideoOutputs(writer=writer, stats=stats, masks=masks),
                               VideoSettings(stride=2, batch=3), painter=painter(segmenter, alpha=0.0),
                               on_frame=seen.append).run()
    assert (report.ended, report.frames_read, report.frames_written, report.frames_dropped) == ("end", 40, 40, 0)
    assert report.frames_segmented == 20
    assert seen == list(range(40))  # strictly increasing, none missing
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(0, 40, 2))
    assert [r["timestamp_s"] for r in records] == [pytest.approx(i / 25) for i in range(0, 40, 2)]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [f"{i:06d}.png" for i in range(0, 40, 2)]
    frames = decode(tmp_path / "out.mp4")
    # With alpha 0 the output is the source, so its frames show the order they came in (levels
    # 6 apart; the YUV round trip moves them by up to 3).
    levels = [float(f.mean()) for f in frames]
    assert len(levels) == 40 and all(abs(v - level(i)) <= 4 for i, v in enumerate(levels)), levels
    assert streamseg_threads() == []


def test_stats_only_run_still_counts_every_frame(clip: Path, segmenter: Segmenter, tmp_path: Path) -> None:
    """No writer and no window: frames between segmented ones are skipped with grab(), yet the
    indices stay those of the source."""
    seen: list[int] = []
    with VideoSource(str(clip)) as source, JsonLines(tmp_path / "stats.jsonl", overwrite=False) as stats:
        report = VideoPipeline(source, segmenter, VideoOutputs(stats=stats), VideoSettings(stride=3),
                               painter=painter(segmenter), on_frame=seen.append).run()
    assert (report.frames_read, report.frames_segmented, report.frames_written) == (40, 14, 0)
    assert seen == list(range(40))
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [(r["index"], r["timestamp_s"]) for r in records] == [(i, pytest.approx(i / 25)) for i in range(0, 40, 3)]
    assert streamseg_threads() == []


def test_stride_frames_carry_the_last_mask(clip: Path, tmp_path: Path) -> None:
    labeller = StripeLabeller()
    with VideoSource(str(clip)) as source, \
            VideoWriter(tmp_path / "out.mp4", width=W, height=H, fps=source.info.fps) as writer:
        report = VideoPipeline(source, labeller, VideoOutputs(writer=writer), VideoSettings(stride=3),
                               painter=Painter(selected=(CAR,), palette=palette(VOC), alpha=0.5)).run()
    assert report.frames_written == 40 and report.frames_segmented == 14
    assert [i for call in labeller.calls for i in call] == list(range(0, 40, 3))
    frames = decode(tmp_path / "out.mp4")
    assert len(frames) == 40
    for i, frame in enumerate(frames):
        # The mask in force is that of the last segmented frame (i // 3 * 3); it says car when that
        # index is a multiple of 6, i.e. for frames 0-2, 6-8, 12-14, ...
        car = (i // 3 * 3) % 6 == 0
        pixel = frame[H // 2, W // 2].astype(np.float32)
        expected = 0.5 * level(i) + 0.5 * PINK_BGR if car else np.full(3, level(i), np.float32)
        assert np.abs(pixel - expected).max() < 8, (i, car, pixel, expected)


# --------------------------------------------------------------------------- failures end the run


@pytest.mark.parametrize("batch", [1, 4])
def test_segmenter_error_ends_file_run(clip: Path, segmenter: Segmenter, tmp_path: Path, batch: int) -> None:
    with VideoSource(str(clip)) as source, \
            VideoWriter(tmp_path / "out.mp4", width=W, height=H, fps=source.info.fps) as writer:
        pipeline = VideoPipeline(source, FailingSegmenter(segmenter, fail_at=5), VideoOutputs(writer=writer),
                                 VideoSettings(batch=batch), painter=painter(segmenter))
        took = run_expecting(pipeline, Boom, "frame 5")
        assert writer.frames_written <= 5  # nothing after the failing frame
    assert took < 3
    assert streamseg_threads() == []
    # The frames before the failure were kept: the writer's context manager finished the file.
    assert len(decode(tmp_path / "out.mp4")) == writer.frames_written


def test_writer_error_ends_file_run(clip: Path, segmenter: Segmenter, tmp_path: Path) -> None:
    with VideoSource(str(clip)) as source, \
            VideoWriter(tmp_path / "out.mp4", width=W, height=H, fps=source.info.fps) as real:
        writer = FailingWriter(real, fail_at=5)
        pipeline = VideoPipeline(source, segmenter, VideoOutputs(writer=writer), painter=painter(segmenter))
        took = run_expecting(pipeline, SinkError, "No space left")
        assert real.frames_written == 5
    assert took < 3
    assert streamseg_threads() == []


def test_source_error_ends_live_run(segmenter: Segmenter) -> None:
    camera = SyntheticCamera(fail_at=20)
    took = run_expecting(VideoPipeline(camera, segmenter, VideoOutputs(), painter=painter(segmenter)), OSError, "unplugged")
    assert took < 3 and camera.closed
    assert streamseg_threads() == []


def test_segmenter_error_ends_live_run(segmenter: Segmenter) -> None:
    camera = SyntheticCamera()  # endless: only the failure can end this run
    pipeline = VideoPipeline(camera, FailingSegmenter(segmenter, fail_at=5), VideoOutputs(),
                             painter=painter(segmenter))
    took = run_expecting(pipeline, Boom, "model failed")
    assert took < 3 and camera.closed
    assert streamseg_threads() == []


@pytest.mark.parametrize("error", [Boom("output stage failed"), KeyboardInterrupt()], ids=["error", "Ctrl-C"])
def test_output_stage_error_stops_the_threads(clip: Path, segmenter: Segmenter, error: BaseException) -> None:
    def on_frame(index: int) -> None:
        if index == 3:
            raise error

    with VideoSource(str(clip)) as source:
        pipeline = VideoPipeline(source, segmenter, VideoOutputs(), painter=painter(segmenter), on_frame=on_frame)
        took = run_expecting(pipeline, type(error), None)
    assert took < 3
    assert streamseg_threads() == []


def test_stop_event_ends_file_run_cleanly(segmenter: Segmenter, tmp_path: Path) -> None:
    clip = make_video(tmp_path / "long.mp4", n=300)
    stop = threading.Event()

    def on_frame(index: int) -> None:
        if index == 10:
            stop.set()  # what the CLI's SIGINT handler does

    with VideoSource(str(clip), stop=stop) as source, \
            VideoWriter(tmp_path / "out.mp4", width=W, height=H, fps=source.info.fps) as writer:
        report = VideoPipeline(source, segmenter, VideoOutputs(writer=writer), painter=painter(segmenter),
                               stop=stop, on_frame=on_frame).run()
    assert report.ended == "stopped" and 11 <= report.frames_written < 300
    frames = decode(tmp_path / "out.mp4")
    assert len(frames) == report.frames_written
    assert streamseg_threads() == []


class SlowWriter:
    """The real VideoWriter, except that frame `at` takes 0.5 s to encode (a slow encoder), and
    that this is when Ctrl-C comes: the stop event is set (the CLI's first-signal handler) and
    SIGALRM is armed to interrupt the caller twice, 0.1 and 0.25 s later, while the frame is
    still being written. `inside` says whether a write is under way."""

    def __init__(self, inner: VideoWriter, stop: threading.Event, at: int) -> None:
        self.inner, self.stop, self.at = inner, stop, at
        self.width, self.height = inner.width, inner.height
        self.inside = False

    @property
    def frames_written(self) -> int:
        return self.inner.frames_written

    def write(self, image: np.ndarray, timestamp_s: Optional[float] = None) -> None:
        self.inside = True
        try:
            if self.inner.frames_written == self.at:
                self.stop.set()
                signal.setitimer(signal.ITIMER_REAL, 0.1, 0.15)
                time.sleep(0.5)
            self.inner.write(image, timestamp_s)
        finally:
            self.inside = False


def test_ctrl_c_while_stopping_waits_for_the_writing_stage(segmenter: Segmenter, tmp_path: Path) -> None:
    """Ctrl-C twice: the first sets the stop event (the CLI's handler), the next ones raise in the
    caller's thread while the stages stop. run() raises only once no stage is inside the writer:
    the caller finishes the video next, and finishing it under a frame still being encoded
    crashed FFmpeg (a segfault, or the video lost). A Thread.join() that a signal interrupts
    marks a running thread as ended, so the wait must not rely on it."""
    clip = make_video(tmp_path / "long.mp4", n=300)
    stop = threading.Event()
    raised: list[float] = []

    def interrupt(_signum, _frame) -> None:
        if len(raised) < 2:
            raised.append(time.monotonic())
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with VideoSource(str(clip), stop=stop) as source, \
                VideoWriter(tmp_path / "out.mp4", width=W, height=H, fps=source.info.fps) as real:
            writer = SlowWriter(real, stop, at=10)
            pipeline = VideoPipeline(source, segmenter, VideoOutputs(writer=writer), painter=painter(segmenter),
                                     stop=stop)
            with pytest.raises(KeyboardInterrupt):
                pipeline.run()
            inside, written = writer.inside, real.frames_written
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not inside, "run() returned while the output stage was still writing a frame"
    assert len(raised) == 2  # the second came while the stages stopped, and waited its turn
    assert real.frames_written == written
    assert streamseg_threads() == []
    assert len(decode(tmp_path / "out.mp4")) == written
