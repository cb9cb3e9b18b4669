"""Tests for streamseg.sources with real components: PyAV-written videos, real image files,
and a real MJPEG-over-HTTP server on 127.0.0.1. Nothing from cv2 is mocked."""
from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from media import encode_video, make_vfr_video
from streamseg.sources import (
    IMAGE_SUFFIXES,
    SUPPORTED_SCHEMES,
    VideoSource,
    expand_image_sources,
    read_image,
    source_kind,
)
from streamseg.types import Frame, SourceError, UsageError

LOGGER = "streamseg.sources"
STEP = 8  # frame i of a synthetic video is filled with grey level i * STEP


# --------------------------------------------------------------------------- helpers


def write_video(path: Path, *, n: int = 30, width: int = 641, height: int = 361,
                rate: Fraction = Fraction(30000, 1001), codec: str = "libx264", pix_fmt: str = "yuv444p") -> Path:
    """A video whose frame i is a flat grey of level i * STEP (mod 256), written with PyAV."""
    images = (np.full((height, width, 3), (i * STEP) % 256, np.uint8) for i in range(n))
    return encode_video(path, images, width=width, height=height, rate=rate, codec=codec, pix_fmt=pix_fmt)


def grey_index(frame: Frame) -> int:
    """Which synthetic frame this is, from its grey level (lossy codecs move it by a few levels)."""
    return int(round(float(frame.image[frame.image.shape[0] // 2, frame.image.shape[1] // 2].mean()) / STEP))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- source_kind


@pytest.mark.parametrize(
    "spec, kind",
    [
        ("0", "camera"),
        ("1", "camera"),
        ("12", "camera"),
        ("rtsp://127.0.0.1:8554/live", "stream"),
        ("rtsps://cam.local/live", "stream"),
        ("http://127.0.0.1/video.mjpg", "stream"),
        ("HTTPS://user:pw@cam.local/video", "stream"),
        ("clip.mp4", "video"),
        ("dir/clip.MKV", "video"),
        ("photo.JPG", "images"),
        ("shots/*.png", "images"),
        ("shot?.jpg", "images"),
        ("shot[0-9].bmp", "images"),
        ("scan.tiff", "images"),
        (r"C:\clips\a.mp4", "video"),
        ("C:/photos/a.webp", "images"),
        ("-1", "video"),
    ],
)
def test_source_kind(spec: str, kind: str) -> None:
    assert source_kind(spec) == kind


def test_source_kind_on_disk(tmp_path: Path) -> None:
    assert source_kind(str(tmp_path)) == "images"
    bracketed = tmp_path / "clip [hd].mp4"  # glob characters, but an existing video file
    bracketed.write_bytes(b"x")
    assert source_kind(str(bracketed)) == "video"
    colon = tmp_path / "take:2.mp4"  # looks like a scheme, but it is a file that exists
    colon.write_bytes(b"x")
    assert source_kind(str(colon)) == "video"


@pytest.mark.parametrize("spec", ["file:///tmp/a.mp4", "ftp://host/a.mp4", "javascript:alert(1)",
                                  "data:video/mp4;base64,AAAA", "udp://127.0.0.1:1234"])
def test_source_kind_rejects_other_schemes(spec: str) -> None:
    with pytest.raises(UsageError) as info:
        source_kind(spec)
    message = str(info.value)
    assert spec.split(":")[0] in message
    for scheme in SUPPORTED_SCHEMES:
        assert f"{scheme}://" in message


def test_source_kind_rejects_empty_and_hides_passwords() -> None:
    with pytest.raises(UsageError):
        source_kind("")
    with pytest.raises(UsageError) as info:
        source_kind("ftp://alice:secret@host/a.mp4")
    assert "secret" not in str(info.value)


# --------------------------------------------------------------------------- read_image


def encoded(image: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def colour_image() -> np.ndarray:
    image = np.zeros((40, 60, 3), np.uint8)
    image[:20] = (0, 0, 255)  # red top half, BGR
    image[20:] = (255, 128, 0)
    return image


def test_read_image_png_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "c.png"
    path.write_bytes(encoded(colour_image(), ".png"))
    image = read_image(path)
    assert image.shape == (40, 60, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, colour_image())


def test_read_image_gray_alpha_16bit(tmp_path: Path) -> None:
    gray = np.tile(np.arange(60, dtype=np.uint8) * 4, (40, 1))
    (tmp_path / "g.png").write_bytes(encoded(gray, ".png"))
    image = read_image(tmp_path / "g.png")
    assert image.shape == (40, 60, 3)
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], gray)

    bgra = np.dstack([colour_image(), np.full((40, 60), 10, np.uint8)])
    (tmp_path / "a.png").write_bytes(encoded(bgra, ".png"))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), colour_image())  # alpha dropped, not blended

    gray16 = np.zeros((40, 60), np.uint16)
    gray16[:, 20:40], gray16[:, 40:] = 257 * 100, 65535
    (tmp_path / "g16.png").write_bytes(encoded(gray16, ".png"))
    image = read_image(tmp_path / "g16.png")
    assert image.dtype == np.uint8 and image.shape == (40, 60, 3)
    assert tuple(image[0, [0, 30, 50], 0]) == (0, 100, 255)

    colour16 = colour_image().astype(np.uint16) * 257
    (tmp_path / "c16.png").write_bytes(encoded(colour16, ".png"))
    np.testing.assert_array_equal(read_image(tmp_path / "c16.png"), colour_image())


def test_read_image_applies_exif_orientation(tmp_path: Path) -> None:
    jpeg = encoded(colour_image(), ".jpg")
    # A minimal EXIF block: one IFD entry, Orientation (0x0112) = 6, "rotate 90 degrees clockwise".
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + b"\0\0\0\0"
    app1 = b"Exif\x00\x00" + tiff
    path = tmp_path / "phone.jpg"
    path.write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:])
    image = read_image(path)
    assert image.shape == (60, 40, 3)
    assert image[0, -1, 2] > 200 and image[0, 0, 0] > 200  # the red top half now stands on the right


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("empty.png", b"", "empty"),
        ("text.png", b"this is not an image\n", "decoded"),
        ("half.png", None, "truncated"),
        ("half.jpg", None, "truncated"),
    ],
)
def test_read_image_bad_files(tmp_path: Path, name: str, content: bytes | None, why: str) -> None:
    path = tmp_path / name
    if content is None:
        data = encoded(colour_image(), path.suffix)
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(SourceError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and why in message and "\n" not in message


def test_read_image_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist") as info:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)
    with pytest.raises(SourceError, match="directory"):
        read_image(tmp_path)


# --------------------------------------------------------------------------- expand_image_sources


def test_expand_image_sources(tmp_path: Path) -> None:
    shots = tmp_path / "shots"
    (shots / "sub").mkdir(parents=True)
    png = encoded(colour_image(), ".png")
    for name in ["b.png", "a.JPG", "c.webp", "notes.txt", "clip.mp4", ".hidden.png", "sub/deep.png"]:
        (shots / name).write_bytes(png)
    extra = tmp_path / "extra.png"
    extra.write_bytes(png)

    assert expand_image_sources([str(shots)]) == [shots / "a.JPG", shots / "b.png", shots / "c.webp"]
    assert expand_image_sources([str(shots / "*.png")]) == [shots / "b.png"]
    assert expand_image_sources([str(shots / "**" / "*.png")]) == [shots / "b.png", shots / "sub" / "deep.png"]
    # Files as given, duplicates dropped (first occurrence wins), order kept.
    got = expand_image_sources([str(extra), str(shots), str(shots / "b.png"), str(extra)])
    assert got == [extra, shots / "a.JPG", shots / "b.png", shots / "c.webp"]


def test_expand_image_sources_leaves_out_a_runs_outputs_beside_their_image(tmp_path: Path) -> None:
    """`streamseg shots/` with the default `-o .` run inside shots/ writes a_overlay.png and co.
    there; the next run on shots/ segmented them as photos (a_overlay_overlay.png, ...), and with
    --overwrite stopped: "output 'a_overlay.png' is the input file"."""
    png = encoded(colour_image(), ".png")
    shots = tmp_path / "shots"
    shots.mkdir()
    for name in ("a.jpg", "a_overlay.png", "a_mask.png", "a_labels.png", "a_overlay_overlay.png",
                 "b_mask.png", "c.png", "c_labels.png"):
        (shots / name).write_bytes(png)
    # b_mask.png has no b.* beside it: a photo of its own; named as a file, an output is kept too.
    assert expand_image_sources([str(shots)]) == [shots / "a.jpg", shots / "b_mask.png", shots / "c.png"]
    assert expand_image_sources([str(shots / "*")]) == [shots / "a.jpg", shots / "b_mask.png", shots / "c.png"]
    assert expand_image_sources([str(shots / "a_mask.png")]) == [shots / "a_mask.png"]


def test_expand_image_sources_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no image files") as info:
        expand_image_sources([str(empty)])
    assert str(empty) in str(info.value)
    with pytest.raises(SourceError, match="matched no image files"):
        expand_image_sources([str(tmp_path / "*.png")])
    # A folder or glob of videos (as Ultralytics takes them) says where a video goes instead.
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "a.mp4").write_bytes(b"\0")
    (clips / "b.mp4").write_bytes(b"\0")
    (clips / "0_notes.txt").write_text("not a video: never the example")
    for spec in (clips, clips / "*.mp4"):
        with pytest.raises(SourceError, match="no image files") as info:
            expand_image_sources([str(spec)])
        assert str(info.value).endswith(f"; a video is one SOURCE of its own, one at a time, e.g. '{clips / 'a.mp4'}'")
    with pytest.raises(SourceError, match="does not exist") as info:
        expand_image_sources([str(tmp_path / "missing.png")])
    assert "missing.png" in str(info.value)
    with pytest.raises(SourceError) as info:  # a folder of other files gets no video hint
        expand_image_sources([str(empty)])
    assert "video" not in str(info.value)


def test_a_folder_of_images_and_videos_says_the_videos_are_left_out(tmp_path: Path, caplog) -> None:
    shots = tmp_path / "trip"
    shots.mkdir()
    cv2.imwrite(str(shots / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    (shots / "drive.mp4").write_bytes(b"\0")
    (shots / "notes.txt").write_text("neither")
    with caplog.at_level(logging.WARNING, logger="streamseg.sources"):
        assert expand_image_sources([str(shots)]) == [shots / "a.jpg"]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == [f"directory '{shots}': 1 video left out (drive.mp4); a video is one SOURCE of its own, "
                    f"e.g. '{shots / 'drive.mp4'}'"]
    caplog.clear()
    (shots / "drive.mp4").unlink()
    with caplog.at_level(logging.WARNING, logger="streamseg.sources"):
        expand_image_sources([str(shots)])
    assert not caplog.records, "nothing to say about a folder of images"


def test_image_suffixes() -> None:
    assert IMAGE_SUFFIXES == {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


# --------------------------------------------------------------------------- video files


@pytest.fixture(scope="module")
def video_2997(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "ntsc.mp4")


def test_video_file_info_and_frames(video_2997: Path) -> None:
    with VideoSource(str(video_2997)) as source:
        info = source.info
        assert abs(info.fps - 30000 / 1001) < 1e-3
        assert (info.width, info.height, info.frame_count, info.live) == (641, 361, 30, False)
        assert info.name == str(video_2997) and source.kind == "video"
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
        assert source.read() is None and source.grab() is None  # the end stays the end
    assert [f.index for f in frames] == list(range(30))
    assert [grey_index(f) for f in frames] == list(range(30))
    assert all(f.image.shape == (361, 641, 3) and f.image.dtype == np.uint8 for f in frames)
    assert frames[29].timestamp_s == pytest.approx(29 / info.fps)


def test_frames_carry_their_media_time_at_a_variable_rate(tmp_path: Path) -> None:
    times = [i / 25 for i in range(10)] + [0.4 + i / 5 for i in range(5)]
    src = make_vfr_video(tmp_path / "vfr.mp4", times, audio=False)
    with VideoSource(str(src)) as source:
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
    assert [f.index for f in frames] == list(range(15))
    assert [f.timestamp_s for f in frames] == pytest.approx(times, abs=1e-6)


def test_video_grab_skips_and_keeps_counting(video_2997: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with VideoSource(str(video_2997)) as source:
        assert source.grab() == 0
        first = source.read()
        assert first is not None and first.index == 1 and grey_index(first) == 1
        seen = []
        while True:  # read one, skip two, like --stride 3
            frame = source.read()
            if frame is None:
                break
            seen.append((frame.index, grey_index(frame)))
            if source.grab() is None or source.grab() is None:
                break
        assert seen == [(i, i) for i in range(2, 30, 3)]
        assert source.read() is None
    assert warnings_from(caplog) == []  # a complete file reads to its end without complaint


def test_video_close_is_idempotent(video_2997: Path) -> None:
    source = VideoSource(str(video_2997))
    source.close()
    source.close()
    assert source.read() is None and source.grab() is None
    with VideoSource(str(video_2997)) as source:
        pass
    source.close()


def test_truncated_video_warns_and_ends(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    whole = write_video(tmp_path / "whole.avi", n=30, width=64, height=48, codec="mjpeg", pix_fmt="yuvj444p")
    cut = tmp_path / "cut.avi"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with VideoSource(str(cut)) as source:
        assert source.info.frame_count == 30  # the index still promises 30
        indices = []
        while (frame := source.read()) is not None:
            indices.append(frame.index)
    assert 0 < len(indices) < 30 and indices == list(range(len(indices)))
    messages = warnings_from(caplog)
    assert len(messages) == 1
    assert f"{len(indices)} of 30 frames" in messages[0] and "cut.avi" in messages[0]


def mkv_with_longer_sound(path: Path, n: int) -> Path:
    """n frames at 25 fps in Matroska, which keeps no frame count, with sound 30 ms longer than the
    picture: OpenCV estimates the count from the file's duration, round((n / 25 + 0.03) * 25) = n + 1."""
    with av.open(str(path), "w", format="matroska") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = out.add_stream("aac", rate=48000)
        sound.layout = "mono"
        for i in range(n):
            for packet in video.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 5 * i, np.uint8), "bgr24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        total = round((n / 25 + 0.03) * 48000)
        for start in range(0, total, 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, min(1024, total - start)), np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 48000, start
            for packet in sound.encode(frame):
                out.mux(packet)
        for packet in sound.encode(None):
            out.mux(packet)
    return path


def avi_with_dropped_frame(path: Path, n: int) -> Path:
    """n frames in an AVI whose second frame slot is empty (the encoder dropped it): the index
    counts n + 1 entries, the picture holds n frames that reach the end of the stream."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("mjpeg", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuvj420p"
        for i, pts in enumerate([0, *range(2, n + 1)]):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 5 * i, np.uint8), format="bgr24")
            frame.pts, frame.time_base = pts, Fraction(1, 25)
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
    return path


@pytest.mark.parametrize("make", [mkv_with_longer_sound, avi_with_dropped_frame], ids=["mkv-estimate", "avi-empty-entry"])
def test_healthy_file_one_frame_short_of_its_count_is_not_called_truncated(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, make) -> None:
    # Both once warned "ended after 38 of 39 frames (truncated or corrupt file?)".
    path = make(tmp_path / ("clip.mkv" if make is mkv_with_longer_sound else "clip.avi"), 38)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with VideoSource(str(path)) as source:
        assert source.info.frame_count == 39  # what the container (or OpenCV's estimate) says
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
    assert len(frames) == 38
    assert warnings_from(caplog) == []


def test_absurd_fps_falls_back_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_video(tmp_path / "fast.mp4", n=5, width=64, height=48, rate=Fraction(5000), codec="mpeg4",
                       pix_fmt="yuv420p")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with VideoSource(str(path)) as source:
        assert source.info.fps == 30.0
        assert [source.read().index for _ in range(5)] == list(range(5))
    messages = warnings_from(caplog)
    assert len(messages) == 1 and "fast.mp4" in messages[0] and "5000" in messages[0]


def test_video_open_failures(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist") as info:
        VideoSource(str(tmp_path / "missing.mp4"))
    assert "missing.mp4" in str(info.value)
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is a text file, not a video\n")
    with pytest.raises(SourceError) as info:
        VideoSource(str(fake))
    assert str(info.value) == f"cannot open video '{fake}': not a video file, or too damaged to read"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match=r"is empty \(0 bytes\)"):
        VideoSource(str(empty))
    with pytest.raises(UsageError):
        VideoSource(str(tmp_path))  # a directory is an image source
    with pytest.raises(ValueError):
        VideoSource(str(fake), reconnect=-1)


@pytest.mark.skipif(os.path.exists("/dev/video7"), reason="this machine has a /dev/video7")
def test_missing_camera_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(SourceError, match="camera 7"):
        VideoSource("7")
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- live streams


def read_n(source: VideoSource, n: int, deadline_s: float = 15.0) -> list[Frame]:
    frames: list[Frame] = []
    end = time.monotonic() + deadline_s
    while len(frames) < n:
        assert time.monotonic() < end, f"only {len(frames)} of {n} frames before the deadline"
        frame = source.read()
        assert frame is not None
        frames.append(frame)
    return frames


def test_mjpeg_http_stream_reconnects(mjpeg_server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = mjpeg_server()
    with VideoSource(server.url, reconnect=10, backoff_cap_s=1.0, timeout_s=3.0) as source:
        info = source.info
        assert (info.width, info.height, info.live, info.frame_count) == (160, 120, True, None)
        assert info.name == server.url and source.kind == "stream" and info.fps > 0
        before = read_n(source, 5)

        server.stop()
        restart = threading.Timer(3.0, server.start)  # same port: server.port was fixed by the first start
        restart.start()
        try:
            started = time.monotonic()
            after = read_n(source, 5, deadline_s=20)
            assert time.monotonic() - started < 20
        finally:
            restart.cancel()
    indices = [f.index for f in before + after]
    assert indices == sorted(set(indices)) and indices[:5] == [0, 1, 2, 3, 4]
    assert all(f.image.shape == (120, 160, 3) for f in before + after)
    assert server.connections >= 2
    drops = [m for m in warnings_from(caplog) if "reconnecting in" in m]
    assert drops and "dropped" in drops[0] and "attempt 1/10" in drops[0]
    assert all("in 1 s" in m for m in drops)  # back-off capped at backoff_cap_s
    assert any("reconnected" in r.getMessage() for r in caplog.records if r.name == LOGGER)


def test_stalled_stream_times_out_and_reconnects(mjpeg_server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = mjpeg_server(stall_first=12)  # the first connection goes silent after 12 frames
    with VideoSource(server.url, backoff_cap_s=0.2, timeout_s=1.0) as source:
        started = time.monotonic()
        frames = read_n(source, 20, deadline_s=10)
        assert time.monotonic() - started < 10
    assert [f.index for f in frames] == list(range(20))
    assert server.connections == 2
    assert len([m for m in warnings_from(caplog) if "dropped" in m]) == 1


def test_stream_drop_without_reconnect_raises(mjpeg_server) -> None:
    server = mjpeg_server()
    with VideoSource(server.url, reconnect=0, timeout_s=2.0) as source:
        read_n(source, 2)
        server.stop()
        with pytest.raises(SourceError, match="dropped"):
            while source.read() is not None:
                pass
        assert source.read() is None  # after the error there is nothing left to read


def test_unserved_rtsp_gives_up_in_bounded_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    url = f"rtsp://127.0.0.1:{free_port()}/x"
    started = time.monotonic()
    with pytest.raises(SourceError, match="gave up on stream") as info:
        VideoSource(url, reconnect=2, timeout_s=2.0)
    assert time.monotonic() - started < 30
    assert url in str(info.value) and "2 reconnect attempts" in str(info.value)
    assert [m.split("reconnecting in ")[1] for m in warnings_from(caplog)] == ["1 s (attempt 1/2)", "2 s (attempt 2/2)"]


def test_silent_server_cannot_hang_open() -> None:
    with socket.socket() as listener:  # accepts connections, never says a word
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/video"
        started = time.monotonic()
        with pytest.raises(SourceError, match="no answer within 1 s"):
            VideoSource(url, reconnect=0, timeout_s=1.0)
        assert time.monotonic() - started < 5


def test_stop_event_interrupts_backoff() -> None:
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(SourceError, match="stopped"):
        VideoSource(f"rtsp://127.0.0.1:{free_port()}/x", reconnect=10, backoff_cap_s=30, stop=stop)
    assert time.monotonic() - started < 1.5  # not the 1 + 2 + 4 ... s of the back-off


def test_stop_event_ends_live_reading(mjpeg_server) -> None:
    server = mjpeg_server()
    stop = threading.Event()
    with VideoSource(server.url, stop=stop, timeout_s=2.0) as source:
        read_n(source, 2)
        stop.set()
        assert source.read() is None and source.grab() is None


def test_credentials_stay_out_of_names(mjpeg_server) -> None:
    server = mjpeg_server()
    url = server.url.replace("http://", "http://viewer:hunter2@")
    with VideoSource(url, timeout_s=2.0) as source:
        assert "hunter2" not in source.info.name and "viewer:***@" in source.info.name
        assert source.read() is not None
