"""How a file run shares the CPU cores between the model and the other stages (video._Balance).

The decision is tested with a scripted clock and a segmenter that records what it is told, so
each branch is reached on any machine; the thread priorities are tested on a real pipeline run
(real source, tiny ONNX model, real writer) by asking the kernel for each thread's nice value.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_onnx as tiny_onnx
from media import encode_video
from streamseg.overlay import Painter
from streamseg.segmenter import Segmenter
from streamseg.sources import VideoSource, decode_threads_for
from streamseg.video import _GIVE_WAY_NICE, VideoOutputs, VideoPipeline, VideoSettings, _Balance
from streamseg.videowriter import VideoWriter

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")


def nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class Recorder:
    """Stands in for the segmenter in the decision tests: it only has to take `set_threads`."""

    def __init__(self, threads: int, auto: bool = True):
        self.threads = threads
        self.auto_threads = auto
        self.calls: list[int] = []

    def set_threads(self, n: int) -> None:
        self.calls.append(n)
        self.threads = n


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def busy(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def drive(balance: _Balance, clock: Clock, *, forward_s, period_s: float, n: int, rest_s: float = 0.002) -> None:
    """n frames: the other stages each use `rest_s` of CPU, then the model's forward ends after
    `period_s` of (scripted) wall time. `forward_s`: seconds per forward, or {threads: seconds}
    for a model whose speed depends on the threads the balance gives it. Runs in a worker
    thread: step() may lower its priority."""
    seg = balance.segmenter

    def frames() -> None:
        for _ in range(n):
            balance.step("capture")
            busy(rest_s)
            balance.step("output")
            busy(rest_s)
            clock.t += period_s
            balance.forward(forward_s[seg.threads] if isinstance(forward_s, dict) else forward_s, 1)

    t = threading.Thread(target=frames)
    t.start()
    t.join()


def test_a_light_model_gives_a_core_to_the_rest_of_the_work():
    seg, clock = Recorder(threads=2), Clock()
    balance = _Balance(seg, 1, own_output=True, cores=2, clock=clock)
    # A 2 ms forward (3 ms on one thread) against 8 ms of other CPU work per frame (each stage's
    # step-to-step CPU, 4 ms, as both run in one thread here): every core, 2 + 8 / 2 = 6 ms per
    # frame; one core fewer, max(3, (3 + 8) / 2) = 5.5 ms.
    drive(balance, clock, forward_s={2: 0.002, 1: 0.003}, period_s=0.020, n=4 + 30 + 2 + 30)
    assert seg.calls == [1] and seg.threads == 1
    assert balance.outcome == "1 of 2 cores"
    assert balance._give_way.is_set()


def test_one_core_fewer_is_tried_and_given_back_where_the_model_needs_it_more():
    # LR-ASPP at --stride 4 on a 2-core EPYC: the rest is large enough to try one core fewer,
    # but the model slows more on one core than the rest gains (every core: 12 + 8 / 2 = 16 ms
    # per frame; one fewer: max(20, (20 + 8) / 2) = 20 ms).
    seg, clock = Recorder(threads=2), Clock()
    balance = _Balance(seg, 1, own_output=True, cores=2, clock=clock)
    drive(balance, clock, forward_s={2: 0.012, 1: 0.020}, period_s=0.020, n=4 + 30 + 2 + 30)
    assert seg.calls == [1, 2] and seg.threads == 2
    assert balance.decided and balance.outcome == "all cores"
    assert balance._give_way.is_set()


def test_nothing_is_decided_before_the_timed_window_is_full():
    seg, clock = Recorder(threads=2), Clock()
    balance = _Balance(seg, 1, own_output=True, cores=2, clock=clock)
    drive(balance, clock, forward_s=0.002, period_s=0.020, n=4 + 8)  # 8 frames, but only 0.16 s
    assert seg.calls == [] and not balance.decided and not balance._give_way.is_set()


def test_a_model_that_outweighs_the_rest_keeps_every_core():
    seg, clock = Recorder(threads=2), Clock()
    balance = _Balance(seg, 1, own_output=True, cores=2, clock=clock)
    # A 120 ms forward against a few ms of other work per frame: no second window.
    drive(balance, clock, forward_s=0.120, period_s=0.130, n=4 + 12)
    drive(balance, clock, forward_s=0.120, period_s=0.130, n=20)
    assert seg.calls == []
    assert balance.decided and balance.outcome == "all cores"
    assert balance._give_way.is_set(), "the other stages give way to a model that outweighs them"


def test_stride_counts_the_model_per_frame_of_the_video():
    # The same 120 ms forward once every 40 frames is 3 ms per frame (3.75 on one thread): no
    # longer the larger cost (every core: 3 + 8 / 2 = 7 ms per frame; one fewer: 5.9 ms).
    seg, clock = Recorder(threads=2), Clock()
    balance = _Balance(seg, 40, own_output=True, cores=2, clock=clock)
    drive(balance, clock, forward_s={2: 0.120, 1: 0.150}, period_s=0.130, n=4 + 12 + 2 + 12)
    assert seg.calls == [1] and balance.outcome == "1 of 2 cores"


def test_threads_the_user_chose_are_left_alone():
    seg, clock = Recorder(threads=2, auto=False), Clock()
    balance = _Balance(seg, 1, own_output=True, cores=2, clock=clock)
    drive(balance, clock, forward_s=0.002, period_s=0.020, n=60)
    assert seg.calls == []
    assert not balance._give_way.is_set(), "every core, as the user asked: the kernel shares them"


@linux_only
def test_stages_give_way_from_the_start_when_the_model_has_fewer_threads_than_cores():
    seg = Recorder(threads=1, auto=False)
    balance = _Balance(seg, 1, own_output=False, cores=2, clock=Clock())
    seen: dict[str, int] = {}

    def capture() -> None:
        before = nice_of_this_thread()
        balance.step("capture")
        seen["capture"] = nice_of_this_thread() - before

    def output_in_callers_thread() -> None:
        before = nice_of_this_thread()
        balance.step("output")  # own_output=False: the caller's thread keeps its priority
        seen["output"] = nice_of_this_thread() - before

    for fn in (capture, output_in_callers_thread):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert seen["output"] == 0
    assert seen["capture"] == min(_GIVE_WAY_NICE, 19 - (nice_of_this_thread()))
    assert seg.calls == []


# --------------------------------------------------------------------------- a real run


W, H = 96, 64


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (H, W, 3), np.uint8) for _ in range(24)]
    return encode_video(tmp_path_factory.mktemp("clip") / "clip.mp4", images, width=W, height=H,
                        options={"preset": "ultrafast"})


class PrioritySegmenter(Segmenter):
    """The real segmenter, noting the nice value of the thread its forward passes run in."""

    model_thread_nice: list[int]

    def infer(self, frames, *, prepared=None):
        self.model_thread_nice.append(nice_of_this_thread())
        return super().infer(frames, prepared=prepared)


@linux_only
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 or more cores")
def test_a_run_with_one_model_thread_puts_capture_and_output_behind_the_model(tmp_path: Path, clip: Path):
    pytest.importorskip("onnx", reason="building the tiny test model needs the onnx package")
    seg = PrioritySegmenter(str(tiny_onnx(tmp_path / "tiny.onnx")), device="cpu", classes="car", threads=1)
    seg.model_thread_nice = []
    base = nice_of_this_thread()
    output_nice: list[int] = []
    capture_nice: list[int] = []

    class NotingSource(VideoSource):
        def read(self):
            capture_nice.append(nice_of_this_thread())
            return super().read()

    out = tmp_path / "out.mp4"
    with NotingSource(str(clip), decode_threads=decode_threads_for("cpu")) as source, \
            VideoWriter(out, width=W, height=H, fps=25) as writer:
        painter = Painter(selected=seg.selected, palette=seg.palette, alpha=0.5)
        report = VideoPipeline(source, seg, VideoOutputs(writer=writer), VideoSettings(), painter=painter,
                               on_frame=lambda _i: output_nice.append(nice_of_this_thread())).run()
    assert report.frames_written == 24 and out.stat().st_size > 0
    behind = min(19, base + _GIVE_WAY_NICE)
    assert set(capture_nice) == {behind}
    assert set(output_nice) == {behind}
    assert set(seg.model_thread_nice) == {base}, "the model's thread keeps its priority"
    assert nice_of_this_thread() == base, "the caller's thread keeps its priority"


@linux_only
def test_with_every_core_for_the_model_nothing_changes_priority(tmp_path: Path, clip: Path):
    pytest.importorskip("onnx", reason="building the tiny test model needs the onnx package")
    seg = Segmenter(str(tiny_onnx(tmp_path / "tiny.onnx")), device="cpu", classes="car", threads=os.cpu_count())
    base = nice_of_this_thread()
    output_nice: list[int] = []
    with VideoSource(str(clip)) as source, VideoWriter(tmp_path / "out.mp4", width=W, height=H, fps=25) as writer:
        painter = Painter(selected=seg.selected, palette=seg.palette, alpha=0.5)
        VideoPipeline(source, seg, VideoOutputs(writer=writer), VideoSettings(), painter=painter,
                      on_frame=lambda _i: output_nice.append(nice_of_this_thread())).run()
    assert set(output_nice) == {base}


# --------------------------------------------------------------------------- the parts


def test_decode_threads_change_nothing_in_the_frames(clip: Path):
    def frames(**kwargs) -> list[np.ndarray]:
        with VideoSource(str(clip), **kwargs) as source:
            out = []
            while (frame := source.read()) is not None:
                out.append(frame.image)
            return out

    default, single = frames(), frames(decode_threads=1)
    assert len(default) == len(single) == 24
    assert all(np.array_equal(a, b) for a, b in zip(default, single))
    assert decode_threads_for("cpu") == 1 and decode_threads_for("cuda") is None
    with pytest.raises(ValueError, match="decode_threads"):
        VideoSource(str(clip), decode_threads=0)


def test_onnx_model_answers_the_same_with_another_thread_count(tmp_path: Path):
    pytest.importorskip("onnx", reason="building the tiny test model needs the onnx package")
    seg = Segmenter(str(tiny_onnx(tmp_path / "tiny.onnx")), device="cpu", classes="car", threads=2)
    image = np.random.default_rng(1).integers(0, 255, (H, W, 3), np.uint8)
    before = seg.labels([image])[0]
    seg.set_threads(1)
    assert seg.threads == 1 and seg.model.threads == 1
    assert np.array_equal(seg.labels([image])[0], before)
    with pytest.raises(ValueError):
        seg.set_threads(0)


def test_torch_model_threads_follow_set_threads():
    before = torch.get_num_threads()
    try:
        seg = Segmenter("lraspp_mobilenet_v3_large", device="cpu", pretrained=False, threads=2)
        assert seg.auto_threads is False
        seg.set_threads(1)
        assert torch.get_num_threads() == 1 and seg.threads == 1
    finally:
        torch.set_num_threads(before)
