"""VideoWriter against the real encoder and real files: sources are made with PyAV, outputs are read back."""
from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from media import BURST_S, frame_times_s, make_sound_source, sound_onset_s
from streamseg.types import SinkError
from streamseg.videowriter import FORCE_MP4V_ENV, VideoWriter, exact_rate

PINK = (147, 20, 255)  # B, G, R
NTSC = Fraction(30000, 1001)


def make_source(path: Path, *, frames: int, rate: Fraction, width: int, height: int,
                audio: str | None = "aac", container: str = "mp4") -> Path:
    """A test video: a moving grey ramp, and optionally a 440 Hz mono sine exactly as long as the video."""
    out = av.open(str(path), "w", format=container)
    video = out.add_stream("libx264", rate=rate)
    video.width, video.height, video.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
    sound = None
    if audio is not None:
        sound = out.add_stream(audio, rate=48000 if audio == "aac" else 8000)
        sound.layout = "mono"
    for i in range(frames):
        image = np.full((video.height, video.width, 3), (i * 5) % 256, np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="bgr24")
        frame.pts, frame.time_base = i, 1 / rate
        for packet in video.encode(frame):
            out.mux(packet)
    for packet in video.encode(None):
        out.mux(packet)
    if sound is not None:
        sample_rate = sound.codec_context.sample_rate
        total = round(frames / rate * sample_rate)
        signal = 0.3 * np.sin(2 * np.pi * 440 * np.arange(total) / sample_rate)
        step = sound.codec_context.frame_size or 1024
        fmt = "fltp" if audio == "aac" else "s16"
        for start in range(0, total, step):
            chunk = signal[start:start + step]
            samples = chunk.astype(np.float32) if fmt == "fltp" else (chunk * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(samples[None, :], format=fmt, layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
            for packet in sound.encode(frame):
                out.mux(packet)
        for packet in sound.encode(None):
            out.mux(packet)
    out.close()
    return path


def source_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def probe(path: Path) -> dict:
    """What a player sees: codecs, frame count, rates and durations (seconds) of the first streams."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        info = {
            "codec": v.codec_context.name,
            "pix_fmt": v.codec_context.format.name,
            "size": (v.codec_context.width, v.codec_context.height),
            "rate": v.average_rate,
            "video_s": float(v.duration * v.time_base),
            "audio": None,
        }
        if c.streams.audio:
            a = c.streams.audio[0]
            info["audio"] = a.codec_context.name
            info["audio_s"] = float(a.duration * a.time_base)
            info["audio_start_s"] = float((a.start_time or 0) * a.time_base)
        frames = list(c.decode(v))
        info["frames"] = len(frames)
        info["first"] = frames[0].to_ndarray(format="bgr24") if frames else None
    return info


def top_level_boxes(path: Path) -> list[str]:
    """The order of an MP4's top-level boxes (atoms), read from the bytes."""
    names, data, pos = [], path.read_bytes(), 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        names.append(kind.decode("latin-1"))
        pos += size
    return names


def listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sources")
    return {
        "ntsc_odd_aac": make_source(d / "ntsc_odd_aac.mp4", frames=48, rate=NTSC, width=641, height=361),
        "pal_aac": make_source(d / "pal_aac.mp4", frames=40, rate=Fraction(25), width=320, height=240),
        "pal_silent": make_source(d / "pal_silent.mp4", frames=30, rate=Fraction(25), width=320, height=240,
                                  audio=None),
        # MPEG-TS starts its clock above zero, and its audio (AAC priming) before its video.
        "ts_aac": make_source(d / "ts_aac.ts", frames=50, rate=Fraction(25), width=320, height=240,
                              container="mpegts"),
    }


def source_info(path: Path) -> tuple[Fraction, int, int, float, str | None, float | None]:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0] if c.streams.audio else None
        return (v.average_rate, len(source_frames(path)), v.codec_context.width, float(v.duration * v.time_base),
                a.codec_context.name if a else None, float(a.duration * a.time_base) if a else None)


@pytest.mark.parametrize("name, size", [("ntsc_odd_aac", (641, 361)), ("pal_aac", (320, 240)),
                                        ("pal_silent", (320, 240)), ("ts_aac", (320, 240))])
def test_round_trip_keeps_timing_audio_and_faststart(sources, tmp_path, name, size):
    src = sources[name]
    rate, count, _, video_s, audio_codec, audio_s = source_info(src)
    width, height = size
    out = tmp_path / "out.mp4"
    with VideoWriter(out, width=width, height=height, fps=float(rate), audio_from=src) as writer:
        assert writer.codec == "h264"
        for image in source_frames(src):
            image = np.ascontiguousarray(image[:height, :width])  # the test source was made at even size
            image[:20, :20] = PINK
            writer.write(image)
    assert writer.frames_written == count

    got = probe(out)
    assert got["codec"] == "h264" and got["pix_fmt"] == "yuv420p"
    assert got["frames"] == count
    assert got["rate"] == rate
    assert abs(got["video_s"] - video_s) <= 1 / rate
    assert got["size"] == (width + width % 2, height + height % 2)  # odd sizes padded to even
    assert np.abs(got["first"][5, 5].astype(int) - PINK).max() <= 6  # colours survive the YUV round trip
    if audio_codec is None:
        assert got["audio"] is None
    else:
        assert got["audio"] == audio_codec
        assert abs(got["audio_s"] - audio_s) <= 0.05
        assert abs(got["audio_start_s"]) <= 0.001  # in sync: sound starts with the first frame
    boxes = top_level_boxes(out)
    assert boxes.index("moov") < boxes.index("mdat"), boxes
    assert listing(tmp_path) == {"out.mp4"}


def test_early_stop_cuts_audio_at_the_video_end(sources, tmp_path):
    src = sources["ntsc_odd_aac"]
    out = tmp_path / "short.mp4"
    with VideoWriter(out, width=641, height=361, fps=30000 / 1001, audio_from=src) as writer:
        for image in source_frames(src)[:20]:
            writer.write(np.ascontiguousarray(image[:361, :641]))
    got = probe(out)
    assert got["frames"] == 20
    assert abs(got["video_s"] - 20 / NTSC) < 1e-3
    assert abs(got["audio_s"] - got["video_s"]) <= 0.015  # half an AAC packet at 48 kHz is 10.7 ms


def write_all(src: Path, out: Path) -> None:
    with VideoWriter(out, width=64, height=48, fps=25, audio_from=src) as writer:
        for image in source_frames(src):
            writer.write(image)


@pytest.mark.parametrize("audio, container, layout", [
    ("pcm_s16le", "matroska", "stereo"),  # made the MP4 muxer fail at the very end: the run was lost
    ("pcm_s16le", "mov", "mono"),
    ("ac3", "mp4", "stereo"),
    ("pcm_mulaw", "mov", "mono"),
    ("flac", "matroska", "5.1"),
])
def test_audio_browsers_cannot_play_becomes_aac_in_sync(tmp_path, caplog, audio, container, layout):
    src = make_sound_source(tmp_path / f"src.{container}", audio=audio, container=container, layout=layout)
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO, logger="streamseg.videowriter"):
        write_all(src, out)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(said) == 1 and "to AAC" in said[0] and audio in said[0], said
    got = probe(out)
    assert got["audio"] == "aac" and got["frames"] == 25 and got["video_s"] == pytest.approx(1.0, abs=1e-3)
    assert got["audio_s"] == pytest.approx(1.0, abs=0.025)  # as long as the source's sound
    assert sound_onset_s(out) == pytest.approx(sound_onset_s(src), abs=0.005)  # and in sync with the picture
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.layout.name == layout
    assert listing(tmp_path) == {src.name, "out.mp4"}


@pytest.mark.parametrize("audio, name, container", [("libmp3lame", "mp3", "mp4"), ("libopus", "opus", "matroska")])
def test_audio_browsers_play_is_copied_untouched(tmp_path, caplog, audio, name, container):
    src = make_sound_source(tmp_path / f"src.{container}", audio=audio, container=container)
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO, logger="streamseg.videowriter"):
        write_all(src, out)
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []

    def payloads(path: Path) -> list[bytes]:
        with av.open(str(path)) as c:
            assert c.streams.audio[0].codec_context.codec.canonical_name == name
            return [bytes(p) for p in c.demux(audio=0) if p.size]

    assert payloads(out) == payloads(src)
    assert sound_onset_s(out) == pytest.approx(sound_onset_s(src), abs=0.005)


def test_a_second_audio_track_is_named_as_left_out(tmp_path, caplog):
    src = make_sound_source(tmp_path / "src.mkv", audio="aac", container="matroska", tracks=2)
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO, logger="streamseg.videowriter"):
        write_all(src, out)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert said == [f"{src} has 2 audio tracks; the video keeps the first"]
    with av.open(str(out)) as c:
        assert len(c.streams.audio) == 1 and c.streams.audio[0].codec_context.name == "aac"
    assert sound_onset_s(out) == pytest.approx(sound_onset_s(src), abs=0.005)


def test_audio_that_does_not_decode_warns_once_and_writes_video_only(tmp_path, caplog):
    src = make_sound_source(tmp_path / "src.mp4", audio="ac3", container="mp4")
    with av.open(str(src)) as c:
        spans = [(p.pos, p.size) for p in c.demux(audio=0) if p.size]
    data = bytearray(src.read_bytes())
    for pos, size in spans:  # every audio packet zeroed: nothing left for the decoder
        data[pos:pos + size] = bytes(size)
    src.write_bytes(bytes(data))
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.WARNING, logger="streamseg.videowriter"):
        write_all(src, out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'ac3'" in warnings[0] and "video only" in warnings[0], warnings
    got = probe(out)
    assert got["audio"] is None and got["frames"] == 25 and got["codec"] == "h264"


def test_frames_keep_their_timestamps_and_a_constant_rate_stays_exact(tmp_path):
    image = np.zeros((48, 64, 3), np.uint8)
    # 29.97 fps with timestamps rounded to milliseconds, as Matroska and WebM store them.
    ntsc = tmp_path / "ntsc.mp4"
    with VideoWriter(ntsc, width=64, height=48, fps=30000 / 1001) as writer:
        for i in range(30):
            writer.write(image, round(i * 1001 / 30) / 1000)
    got = probe(ntsc)
    assert got["frames"] == 30 and got["rate"] == NTSC
    assert got["video_s"] == pytest.approx(30 * 1001 / 30000, abs=1e-6)
    assert frame_times_s(ntsc) == pytest.approx([i * 1001 / 30000 for i in range(30)], abs=1e-6)
    # A variable rate: each frame where its timestamp says, frames without one 1/fps after the last.
    vfr = tmp_path / "vfr.mp4"
    times = [0.0, 0.04, 0.08, 0.5, None, 0.9, 0.9031, 1.5]
    with VideoWriter(vfr, width=64, height=48, fps=10) as writer:
        for t in times:
            writer.write(image, t)
    expected = [0.0, 0.04, 0.08, 0.5, 0.6, 0.9, 0.9031, 1.5]
    assert frame_times_s(vfr) == pytest.approx(expected, abs=0.0005)


def test_exact_rate():
    assert exact_rate(30000 / 1001) == NTSC
    assert exact_rate(24000 / 1001) == Fraction(24000, 1001)
    assert exact_rate(25.0) == 25
    with pytest.raises(ValueError, match="nan"):
        exact_rate(float("nan"))


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"keep me")
    with pytest.raises(SinkError, match=r"exists; pass --overwrite"):
        VideoWriter(out, width=32, height=32, fps=25)
    assert out.read_bytes() == b"keep me"
    assert listing(tmp_path) == {"out.mp4"}
    with VideoWriter(out, width=32, height=32, fps=25, overwrite=True) as writer:
        writer.write(np.zeros((32, 32, 3), np.uint8))
    assert probe(out)["frames"] == 1
    assert listing(tmp_path) == {"out.mp4"}


def test_unwritable_destinations_fail_at_construction(tmp_path):
    with pytest.raises(SinkError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "out.mp4", width=32, height=32, fps=25)
    (tmp_path / "a_file").write_bytes(b"")
    with pytest.raises(SinkError, match="does not exist"):
        VideoWriter(tmp_path / "a_file" / "out.mp4", width=32, height=32, fps=25)
    with pytest.raises(SinkError, match="is a directory"):
        VideoWriter(tmp_path, width=32, height=32, fps=25)
    assert listing(tmp_path) == {"a_file"}


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_directory_fails_at_construction(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(SinkError, match="cannot write"):
            VideoWriter(locked / "out.mp4", width=32, height=32, fps=25)
        assert listing(locked) == set()
    finally:
        locked.chmod(0o700)


def test_abort_close_and_empty_runs_leave_no_files(tmp_path):
    writer = VideoWriter(tmp_path / "aborted.mp4", width=32, height=32, fps=25)
    writer.write(np.zeros((32, 32, 3), np.uint8))
    assert len(listing(tmp_path)) == 1  # the hidden temporary file
    writer.abort()
    writer.abort()
    writer.close()  # no-op after abort
    assert listing(tmp_path) == set()

    with VideoWriter(tmp_path / "empty.mp4", width=32, height=32, fps=25):
        pass  # no frames: nothing worth a file
    assert listing(tmp_path) == set()

    writer = VideoWriter(tmp_path / "twice.mp4", width=32, height=32, fps=25)
    writer.write(np.zeros((32, 32, 3), np.uint8))
    writer.close()
    writer.close()
    writer.abort()  # no-op after close: the file stays
    assert listing(tmp_path) == {"twice.mp4"}
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(np.zeros((32, 32, 3), np.uint8))


def test_wrong_frame_is_a_value_error_naming_it(tmp_path):
    with VideoWriter(tmp_path / "out.mp4", width=32, height=24, fps=25) as writer:
        with pytest.raises(ValueError, match=r"\(24, 32, 3\) uint8.*\(32, 24, 3\)"):
            writer.write(np.zeros((32, 24, 3), np.uint8))
        with pytest.raises(ValueError, match="float32"):
            writer.write(np.zeros((24, 32, 3), np.float32))
        writer.write(np.zeros((24, 32, 3), np.uint8))
    assert probe(tmp_path / "out.mp4")["frames"] == 1


def test_mp4v_fallback_writes_a_playable_file(sources, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(FORCE_MP4V_ENV, "1")
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.WARNING, logger="streamseg.videowriter"):
        with VideoWriter(out, width=641, height=361, fps=25, audio_from=sources["pal_aac"]) as writer:
            assert writer.codec == "mp4v"
            for i in range(12):
                writer.write(np.full((361, 641, 3), i * 10, np.uint8))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "browsers" in warnings[0]
    got = probe(out)
    assert got["codec"] == "mpeg4" and got["frames"] == 12 and got["rate"] == 25 and got["audio"] is None
    assert listing(tmp_path) == {"out.mp4"}


def test_missing_pyav_falls_back_to_mp4v(tmp_path):
    # A child process where `import av` fails, as on an install without PyAV.
    script = textwrap.dedent(f"""
        import logging, sys
        sys.modules["av"] = None  # makes `import av` raise ImportError
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        import numpy as np
        from streamseg.videowriter import VideoWriter
        with VideoWriter({str(tmp_path / 'out.mp4')!r}, width=64, height=48, fps=25) as writer:
            for _ in range(7):
                writer.write(np.zeros((48, 64, 3), np.uint8))
        print(writer.codec)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "mp4v"
    assert done.stderr.count("WARNING") == 1 and "PyAV is not installed" in done.stderr
    got = probe(tmp_path / "out.mp4")
    assert got["codec"] == "mpeg4" and got["frames"] == 7


def test_keyboard_interrupt_keeps_a_finalised_partial_file(sources, tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out, width=320, height=240, fps=25, audio_from=sources["pal_aac"]) as writer:
            for i in range(40):
                if i == 17:
                    raise KeyboardInterrupt
                writer.write(np.full((240, 320, 3), i, np.uint8))
    got = probe(out)
    assert got["frames"] == 17 and abs(got["video_s"] - 17 / 25) < 1e-3
    assert abs(got["audio_s"] - got["video_s"]) <= 0.015
    assert listing(tmp_path) == {"out.mp4"}


def test_other_exceptions_also_keep_the_work(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(ZeroDivisionError):
        with VideoWriter(out, width=32, height=32, fps=25) as writer:
            for _ in range(5):
                writer.write(np.zeros((32, 32, 3), np.uint8))
            1 / 0
    assert probe(out)["frames"] == 5


def test_full_disk_is_a_sink_error_and_keeps_the_frames_so_far(tmp_path):
    # A file-size limit (RLIMIT_FSIZE) fails writes with EFBIG as a full disk fails with ENOSPC,
    # without needing root to mount a tiny file system. A child process keeps the limit away from pytest.
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        from streamseg.types import SinkError
        from streamseg.videowriter import VideoWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # report EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
        rng = np.random.default_rng(0)
        try:
            with VideoWriter({str(tmp_path / 'out.mp4')!r}, width=320, height=240, fps=25) as writer:
                for _ in range(500):
                    writer.write(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))  # incompressible
        except SinkError as error:
            print(writer.frames_written)
            print(error)
            sys.exit(0)
        sys.exit("no SinkError")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr + done.stdout
    frames, message = done.stdout.splitlines()[:2]
    assert "out.mp4" in message and ".part" not in message, message
    assert int(frames) > 0
    assert listing(tmp_path) == {"out.mp4"}  # finished with the frames so far; no temporary file
    assert probe(tmp_path / "out.mp4")["frames"] == int(frames)


def test_colours_and_their_tags_survive_for_every_reader(tmp_path):
    """Flat patches of the overlay pink and primaries come back within a few levels whether the
    reader follows the stream's colour tags (PyAV) or assumes BT.601 (OpenCV)."""
    import cv2

    colours = [PINK, (0, 0, 255), (0, 255, 0), (255, 0, 0), (128, 128, 128), (20, 200, 230)]
    image = np.zeros((64, 16 * len(colours), 3), np.uint8)
    for i, colour in enumerate(colours):
        image[:, 16 * i : 16 * (i + 1)] = colour
    out = tmp_path / "patches.mp4"
    with VideoWriter(out, width=image.shape[1], height=64, fps=25, preset="ultrafast") as writer:
        for _ in range(3):
            writer.write(image)
    with av.open(str(out)) as container:
        ctx = container.streams.video[0].codec_context
        assert (ctx.colorspace, ctx.color_range) == (5, 1)  # BT.601 matrix, limited range
        via_pyav = next(container.decode(video=0)).to_ndarray(format="bgr24")
    ok, via_cv2 = cv2.VideoCapture(str(out)).read()
    assert ok
    for decoded in (via_pyav, via_cv2):
        for i, colour in enumerate(colours):
            assert np.abs(decoded[32, 16 * i + 8].astype(int) - colour).max() <= 4, (i, decoded[32, 16 * i + 8])


def test_faster_preset_is_bigger_and_auto_picks_by_model_device(sources, tmp_path):
    from streamseg.videowriter import auto_preset

    assert auto_preset("cpu") == "ultrafast"
    assert auto_preset("cuda") == "veryfast"
    src = sources["pal_silent"]
    sizes = {}
    for preset in ("ultrafast", "veryfast"):
        out = tmp_path / f"{preset}.mp4"
        with VideoWriter(out, width=320, height=240, fps=25, preset=preset) as writer:
            for image in source_frames(src):
                noisy = image.copy()
                noisy[::4, ::3] = 255 - noisy[::4, ::3]  # detail for the encoder to spend bits on
                writer.write(noisy)
        assert probe(out)["frames"] == len(source_frames(src))
        sizes[preset] = out.stat().st_size
    assert sizes["ultrafast"] > sizes["veryfast"]
    with pytest.raises(ValueError, match="preset"):
        VideoWriter(tmp_path / "x.mp4", width=32, height=32, fps=25, preset="warp")
