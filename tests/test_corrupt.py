"""Damaged video files: a frame the decoder cannot decode is skipped with a warning and counted,
the frames after it keep their true index, and the output video keeps the source's length by
repeating the previous overlay.

The damage is real: videos are written with PyAV, then the bytes of chosen video packets (found
through ``packet.pos``) are zeroed in the file. What OpenCV's FFmpeg backend does with that:

- MJPEG (every frame independent): ``read()`` fails once per damaged frame and the next read goes
  on; the media time (CAP_PROP_POS_MSEC) of the next frame shows the hole.
- H.264, damaged key frame: one failed read, then the decoder silently drops frames that depended
  on it; only the media time shows how many.
- H.264 with B-frames: the failure is reported a few frames before the hole shows, and around a
  lost key frame frames can even come out of order.
"""
from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Optional

import av
import numpy as np
import pytest

from streamseg.overlay import Painter
from streamseg.segmenter import Segmenter
from streamseg.sinks import JsonLines
from streamseg.sources import VideoSource
from streamseg.types import Frame
from streamseg.video import VideoOutputs, VideoPipeline, VideoSettings

LOGGER = "streamseg.sources"
W, H = 64, 48
FPS = 25
VOC = ("background,aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,diningtable,dog,horse,"
       "motorbike,person,pottedplant,sheep,sofa,train,tvmonitor")


# --------------------------------------------------------------------------- helpers


def level(i: int) -> int:
    """Grey level of frame i: 20..230 in steps of 6, so neighbours are easy to tell apart."""
    return 20 + (i * 6) % 210


def write_video(path: Path, *, n: int, codec: str = "mjpeg", width: int = W, height: int = H,
                options: Optional[dict[str, str]] = None, motion: bool = False) -> Path:
    """Frame i is a flat grey of level(i). mjpeg -> every frame a JPEG of its own; libx264 -> lossless
    unless `options` set another qp (x264 uses no B-frames when lossless).

    motion: a white block also moves across the bottom half, which makes x264 use B-frames.
    """
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(FPS))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj444p" if codec == "mjpeg" else "yuv444p"
        if codec == "libx264":
            stream.options = {"qp": "0", **(options or {})}
        for i in range(n):
            image = np.full((height, width, 3), level(i), np.uint8)
            if motion:
                x = (i * 3) % (width - 8)
                image[height // 2 + 4:height // 2 + 12, x:x + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def damage(path: Path, packets: Iterable[int]) -> Path:
    """Zero the bytes of the given video packets (by position in the file's packet order), in place."""
    wanted = set(packets)
    spans = []
    with av.open(str(path)) as container:
        for i, packet in enumerate(p for p in container.demux(video=0) if p.size):
            if i in wanted:
                spans.append((packet.pos, packet.size))
    assert len(spans) == len(wanted), "a packet to damage is not in the file"
    data = bytearray(path.read_bytes())
    for pos, size in spans:
        data[pos:pos + size] = bytes(size)
    path.write_bytes(bytes(data))
    return path


def grey(frame: Frame) -> float:
    """Mean level of the top half (the moving block of motion=True stays out of it)."""
    return float(frame.image[: frame.image.shape[0] // 2].mean())


def read_all(path: Path) -> tuple[list[Frame], int]:
    with VideoSource(str(path)) as source:
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
        return frames, source.frames_skipped


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- VideoSource


def test_mjpeg_damaged_frames_are_skipped_with_true_indices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = damage(write_video(tmp_path / "clip.avi", n=40), [10, 20, 21])
    caplog.set_level(logging.WARNING, logger=LOGGER)
    frames, skipped = read_all(path)

    assert [f.index for f in frames] == [i for i in range(40) if i not in (10, 20, 21)]
    for f in frames:  # each frame is the picture at its index, and its time matches
        assert abs(grey(f) - level(f.index)) < 3, f.index
        assert f.timestamp_s == pytest.approx(f.index / FPS)
    assert skipped == 3
    assert warnings_from(caplog) == [  # one per run of lost frames; no truncation warning
        f"frame 10 of {path} is corrupt or missing; skipped",
        f"frames 20-21 of {path} are corrupt or missing; skipped",
    ]


def test_grab_reports_true_indices_past_damage(tmp_path: Path) -> None:
    path = damage(write_video(tmp_path / "clip.avi", n=20), [7])
    with VideoSource(str(path)) as source:
        indices = []
        while (index := source.grab()) is not None:
            indices.append(index)
        assert source.frames_skipped == 1
    assert indices == [i for i in range(20) if i != 7]


def test_h264_lost_key_frame_skips_its_dependants(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Key frames every 5 frames, no B-frames: losing key frame 20 makes the decoder drop some of
    # 21..24 without any failed read; only the media time tells how many.
    path = write_video(tmp_path / "clip.mp4", n=40, codec="libx264",
                       options={"preset": "ultrafast", "x264-params": "keyint=5:min-keyint=5:scenecut=0"})
    damage(path, [20])
    caplog.set_level(logging.WARNING, logger=LOGGER)
    frames, skipped = read_all(path)

    indices = [f.index for f in frames]
    assert indices[:20] == list(range(20)) and 20 not in indices
    assert all(b > a for a, b in zip(indices, indices[1:])) and indices[-1] == 39
    assert len(frames) + skipped == 40  # every position is either a frame or counted as lost
    for f in frames:
        if f.index < 20 or f.index >= 25:  # from the next key frame on the pictures are exact again
            assert abs(grey(f) - level(f.index)) < 2, f.index
    messages = warnings_from(caplog)
    assert len(messages) == 1 and (f"frame 20 of {path}" in messages[0] or f"frames 20-" in messages[0])


def test_h264_b_frames_stay_in_order_after_damage(tmp_path: Path) -> None:
    # B-frames and a lost key frame: the failure comes early and frames may come out of order;
    # what is handed out still rises and accounts for every position.
    path = write_video(tmp_path / "clip.mp4", n=60, codec="libx264", motion=True, options={
        "preset": "medium", "qp": "20", "x264-params": "keyint=12:min-keyint=12:scenecut=0:bframes=3:b-adapt=0"})
    with av.open(str(path)) as container:
        pts = [p.pts for p in container.demux(video=0) if p.size]
    assert pts != sorted(pts), "no B-frames: the test would not show reordering"
    damage(path, [24])
    frames, skipped = read_all(path)
    indices = [f.index for f in frames]
    assert all(b > a for a, b in zip(indices, indices[1:])) and indices[-1] == 59
    assert len(frames) + skipped == 60 and skipped >= 1
    for f in frames:
        if f.index < 20 or f.index >= 36:  # well before the damage, and from the next key frame on
            assert abs(grey(f) - level(f.index)) < 3, f.index


def test_damaged_last_frames_still_end_with_one_truncation_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Nothing decodes after the damage: the reads past it give up and the early end is reported.
    path = damage(write_video(tmp_path / "clip.avi", n=20), [18, 19])
    caplog.set_level(logging.WARNING, logger=LOGGER)
    frames, skipped = read_all(path)
    assert [f.index for f in frames] == list(range(18)) and skipped == 0
    messages = warnings_from(caplog)
    assert len(messages) == 1 and "ended after 18 of 20 frames" in messages[0]


def test_stride_stays_aligned_after_damage(tmp_path: Path, make_onnx) -> None:
    # Stats only: frames between segmented ones are grabbed, not decoded. After a hole the
    # capture must still pick the frames whose index is a multiple of the stride.
    path = damage(write_video(tmp_path / "clip.avi", n=24), [10])
    model = make_onnx(tmp_path / "tiny.onnx", metadata={
        "streamseg.input_size": f"{W}x{H}", "streamseg.mean": "127.5,127.5,127.5",
        "streamseg.std": "127.5,127.5,127.5", "streamseg.categories": VOC,
    })
    segmenter = Segmenter(str(model), device="cpu", classes="car")
    painter = Painter(selected=segmenter.selected, palette=segmenter.palette, alpha=0.5)
    with VideoSource(str(path)) as source, JsonLines(tmp_path / "stats.jsonl", overwrite=False) as stats:
        report = VideoPipeline(source, segmenter, VideoOutputs(stats=stats), VideoSettings(stride=2),
                               painter=painter).run()
    lines = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [s["index"] for s in lines] == [i for i in range(0, 24, 2) if i != 10]
    assert report.frames_skipped == 1 and report.frames_read == 23


# --------------------------------------------------------------------------- the CLI, end to end


def test_cli_output_keeps_length_past_corrupt_frames(tmp_path: Path, onnx_model: Path, run_cli) -> None:
    n = 48
    src = damage(write_video(tmp_path / "clip.avi", n=n, width=160, height=120), [12, 30])
    result = run_cli(src, "-o", "out.mp4", "--model", onnx_model, "--stats", "stats.jsonl", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("streamseg: warning:")]
    assert warnings == [  # one per corrupt frame, nothing else (no truncation warning)
        f"streamseg: warning: frame 12 of {src} is corrupt or missing; skipped",
        f"streamseg: warning: frame 30 of {src} is corrupt or missing; skipped",
    ]
    assert "2 corrupt frames skipped" in result.stdout

    with av.open(str(tmp_path / "out.mp4")) as container:
        stream = container.streams.video[0]
        rate, duration = stream.average_rate, float(stream.duration * stream.time_base)
        out = [f.to_ndarray(format="bgr24").astype(np.float32) for f in container.decode(video=0)]
    assert len(out) == n and rate == FPS and duration == pytest.approx(n / FPS, abs=1e-3)

    def diff(a: int, b: int) -> float:
        return float(np.abs(out[a] - out[b]).mean())

    for lost in (12, 30):
        assert diff(lost, lost - 1) < 1.0, f"frame {lost} does not repeat its predecessor"
        # ...and the frame after the hole is back at its own position (its own grey level).
        assert diff(lost + 1, lost) > 4.0
        assert abs(float(out[lost + 1].mean()) - level(lost + 1)) < 4
    # Stats and masks describe decoded frames only.
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [s["index"] for s in stats] == [i for i in range(n) if i not in (12, 30)]
