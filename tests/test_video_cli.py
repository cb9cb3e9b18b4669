"""The video mode end to end, through the real CLI in a subprocess.

Videos are made in the tests with PyAV (libx264, optionally with an AAC track); the runs use the
real ONNX model from ../shared/models, the real encoder and real signals. The checks are what a
user would look at: frame count, rate, duration, codec, audio, masks, stats, file names, exit codes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from media import frame_times_s, make_sound_source, make_vfr_video, sound_onset_s

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ONNX_MODEL = SHARED / "models" / "deeplabv3_mobilenetv2_voc_257.onnx"
HIGHWAY = SHARED / "media" / "highway_2cars_720p.mp4"
NTSC = Fraction(30000, 1001)
CAR = 7  # PASCAL VOC id of "car"
PINK_BGR = np.array([147, 20, 255], np.float32)  # labels.CAR_PINK_RGB, as frames store it

needs_model = pytest.mark.skipif(not ONNX_MODEL.is_file(), reason=f"needs the shared ONNX model {ONNX_MODEL}")
needs_highway = pytest.mark.skipif(not HIGHWAY.is_file(), reason=f"needs the shared video {HIGHWAY}")


# --------------------------------------------------------------------------- helpers


def make_video(path: Path, *, n: int = 36, width: int = 641, height: int = 361, rate: Fraction = NTSC,
               audio: bool = False, grey: bool = False) -> Path:
    """An H.264 MP4 written with PyAV. Frame i is a colour ramp (or, with grey=True, a flat grey of
    level grey_level(i)); with audio=True it also carries a 440 Hz AAC track as long as the video."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=rate)
        # yuv444p: 4:2:0 cannot hold odd sizes such as 641x361.
        video.width, video.height, video.pix_fmt = width, height, "yuv444p"
        video.options = {"preset": "ultrafast"}
        sound = None
        if audio:
            sound = container.add_stream("aac", rate=48000)
            sound.layout = "mono"
        yy, xx = np.mgrid[0:height, 0:width]
        ramp = np.zeros((height, width, 3), np.uint8)
        ramp[..., 0] = xx * 255 // width
        ramp[..., 2] = yy * 255 // height
        for i in range(n):
            if grey:
                image = np.full((height, width, 3), grey_level(i), np.uint8)
            else:
                image = ramp.copy()
                image[..., 1] = (i * 7) % 256
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            total = int(round(48000 * n / rate))
            pcm = (0.3 * np.sin(2 * np.pi * 440 * np.arange(total) / 48000)).astype(np.float32)
            for start in range(0, total, 1024):
                chunk = pcm[start:start + 1024]
                frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 48000, start
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path


def grey_level(i: int) -> int:
    """Flat frame i of a grey video: 16..235, stepping 4 per frame, so neighbours differ clearly."""
    return 16 + (i * 4) % 220


def probe(path: Path) -> dict:
    """What a player sees: video codec, size, rate, frame count, duration; audio codec and length."""
    with av.open(str(path)) as container:
        v = container.streams.video[0]
        info = {
            "codec": v.codec_context.name,
            "size": (v.codec_context.width, v.codec_context.height),
            "rate": v.average_rate,
            "duration_s": float(v.duration * v.time_base) if v.duration else None,
            "audio": None,
        }
        if container.streams.audio:
            a = container.streams.audio[0]
            info["audio"] = {"codec": a.codec_context.name, "rate": a.codec_context.sample_rate}
    with av.open(str(path)) as container:
        info["frames"] = sum(1 for _ in container.decode(video=0))
    if info["audio"] is not None:
        with av.open(str(path)) as container:
            a = container.streams.audio[0]
            packets = [p for p in container.demux(a) if p.size]
            info["audio"]["packets"] = len(packets)
            info["audio"]["duration_s"] = float(sum(p.duration for p in packets) * a.time_base)
    return info


def decode(path: Path) -> list[np.ndarray]:
    """Every frame of a video as (H, W, 3) uint8 BGR."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "streamseg", *map(str, args)]


def child_env() -> dict[str, str]:
    """The child imports this checkout's package, wherever the test runs from."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_cli(*args: str | Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)


def wrote_count(stdout: str, name: str) -> int:
    """N from the CLI's final line `wrote NAME: N frames at F fps (...)`."""
    m = re.search(rf"^wrote (.*{re.escape(name)}): (\d+) frames at [\d.]+ fps \(", stdout, re.M)
    assert m, f"no 'wrote ...{name}: N frames' line in stdout:\n{stdout}"
    return int(m.group(2))


def temp_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".part" in p.name)


def read_stats(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """641x361 at 29.97 fps, 36 frames (about 1.2 s): one with an AAC track, one without."""
    d = tmp_path_factory.mktemp("clips")
    return {
        "audio": make_video(d / "with_audio.mp4", audio=True),
        "silent": make_video(d / "silent.mp4", audio=False),
        "short": make_video(d / "short.mp4", n=6, width=160, height=120),
    }


# --------------------------------------------------------------------------- synthetic videos


@needs_model
def test_output_keeps_timing_codec_and_audio(clips: dict[str, Path], tmp_path: Path) -> None:
    src = clips["audio"]
    before = probe(src)
    assert before["frames"] == 36 and before["rate"] == NTSC and before["audio"]  # the fixture is what we think

    result = run_cli(src, "-o", "out.mp4", "--model", ONNX_MODEL, "--stats", "stats.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert wrote_count(result.stdout, "out.mp4") == 36
    assert "wrote " not in result.stderr  # the summary is said once, on stdout

    out = probe(tmp_path / "out.mp4")
    assert out["codec"] == "h264"
    assert out["frames"] == before["frames"] == 36
    assert out["rate"] == NTSC  # 30000/1001 exactly, not 29 or 30
    assert abs(out["duration_s"] - before["duration_s"]) < 1 / 29.97
    # H.264 4:2:0 pads an odd size by at most one pixel per side.
    assert out["size"][0] - 641 in (0, 1) and out["size"][1] - 361 in (0, 1)
    assert out["audio"] is not None, "the source's audio track was dropped"
    assert out["audio"]["codec"] == "aac" and out["audio"]["rate"] == 48000
    assert out["audio"]["packets"] == before["audio"]["packets"]
    assert abs(out["audio"]["duration_s"] - before["audio"]["duration_s"]) < 1e-3

    # The file is faststart: the index (moov) comes before the media data (mdat).
    head = (tmp_path / "out.mp4").read_bytes()
    assert 0 <= head.find(b"moov") < head.find(b"mdat")

    stats = read_stats(tmp_path / "stats.jsonl")
    assert [s["index"] for s in stats] == list(range(36))
    for s in stats:
        assert s["timestamp_s"] == pytest.approx(s["index"] * 1001 / 30000, abs=1e-5)
        assert set(s["classes"]) == {"car"} and 0 <= s["classes"]["car"]["share"] <= 1
    assert temp_leftovers(tmp_path) == []


@needs_model
def test_stride_keeps_every_frame_and_segments_every_third(clips: dict[str, Path], tmp_path: Path) -> None:
    src = clips["silent"]
    result = run_cli(src, "-o", "out.mp4", "--model", ONNX_MODEL, "--stride", "3", "--save-masks", "masks",
                     "--stats", "stats.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert wrote_count(result.stdout, "out.mp4") == 36
    assert "12 segmented" in result.stdout

    out = probe(tmp_path / "out.mp4")
    assert out["frames"] == 36 and out["rate"] == NTSC
    assert abs(out["duration_s"] - 36 * 1001 / 30000) < 1 / 29.97  # does not play three times too fast
    assert out["audio"] is None  # the source had none; nothing invented
    masks = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert masks == [f"{i:06d}.png" for i in range(0, 36, 3)]
    labels = cv2.imread(str(tmp_path / "masks" / "000003.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (361, 641) and labels.dtype == np.uint8
    assert [s["index"] for s in read_stats(tmp_path / "stats.jsonl")] == list(range(0, 36, 3))


@needs_model
def test_default_output_name_and_overwrite(clips: dict[str, Path], tmp_path: Path) -> None:
    src = clips["short"]  # lives in another directory: the default output goes to the cwd
    first = run_cli(src, "--model", ONNX_MODEL, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    default = tmp_path / "short_overlay.mp4"
    assert default.is_file() and probe(default)["frames"] == 6
    assert not (src.parent / "short_overlay.mp4").exists()

    # An existing output is refused without --overwrite, and left alone.
    default.write_bytes(b"precious")
    refused = run_cli(src, "--model", ONNX_MODEL, cwd=tmp_path, timeout=60)
    assert refused.returncode == 1
    assert "exists" in refused.stderr and "--overwrite" in refused.stderr
    assert default.read_bytes() == b"precious"

    replaced = run_cli(src, "--model", ONNX_MODEL, "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert probe(default)["frames"] == 6
    assert temp_leftovers(tmp_path) == []


@needs_model
def test_output_directory_gets_default_name(clips: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    result = run_cli(clips["short"], "-o", "results", "--model", ONNX_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    target = tmp_path / "results" / "short_overlay.mp4"
    assert wrote_count(result.stdout, "short_overlay.mp4") == 6
    assert probe(target)["frames"] == 6
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["short_overlay.mp4"]


def test_help_says_a_video_output_may_be_a_directory(tmp_path: Path) -> None:
    """What --help says about -o agrees with the README and the behaviour above."""
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    entry = " ".join(result.stdout.split("-o PATH, --output PATH", 1)[1].split("\n  -", 1)[0].split())
    assert "images: output directory" in entry
    assert "video/camera/stream: output .mp4, or a directory to write <stem>_overlay.mp4 in" in entry


@needs_model
def test_pcm_audio_in_mkv_comes_out_as_aac(tmp_path: Path) -> None:
    # PCM copied into MP4 made the muxer fail at the very end: every frame segmented, then exit 1
    # and no output. Browsers do not play PCM (nor AC-3) in MP4 anyway.
    src = make_sound_source(tmp_path / "pcm.mkv", audio="pcm_s16le", container="matroska")
    result = run_cli(src, "-o", "out.mp4", "--model", ONNX_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert wrote_count(result.stdout, "out.mp4") == 25
    assert [line for line in result.stderr.splitlines() if "AAC" in line] == [
        f"re-encoding the pcm_s16le audio of {src} to AAC (48000 Hz, stereo): browsers do not play pcm_s16le in MP4"]
    assert "warning" not in result.stderr and "error" not in result.stderr
    out = probe(tmp_path / "out.mp4")
    assert out["frames"] == 25 and out["audio"] is not None and out["audio"]["codec"] == "aac"
    assert out["audio"]["duration_s"] == pytest.approx(1.0, abs=0.025)
    assert sound_onset_s(tmp_path / "out.mp4") == pytest.approx(sound_onset_s(src), abs=0.005)
    assert temp_leftovers(tmp_path) == []


#: 3 s at 25 fps, then 3 s at 5 fps: a variable frame rate, 90 frames, 15.4 fps on average.
VFR_TIMES = [i / 25 for i in range(75)] + [3 + i / 5 for i in range(15)]


@needs_model
@pytest.mark.parametrize("stride", ["1", "3"])
def test_variable_frame_rate_keeps_every_frame_at_its_time(tmp_path: Path, stride: str) -> None:
    # Written at the average rate, frame 75 (3.000 s in the source) came out at 4.867 s while the
    # audio was copied as it is: picture and sound drifted up to 1.9 s apart.
    src = make_vfr_video(tmp_path / "vfr.mp4", VFR_TIMES)
    result = run_cli(src, "-o", "out.mp4", "--model", ONNX_MODEL, "--stride", stride, "--stats", "stats.jsonl",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert wrote_count(result.stdout, "out.mp4") == 90
    shown = frame_times_s(tmp_path / "out.mp4")
    assert len(shown) == 90
    assert max(abs(a - b) for a, b in zip(shown, VFR_TIMES)) < 0.001
    assert shown[75] == pytest.approx(3.0, abs=0.001)
    before, after = probe(src), probe(tmp_path / "out.mp4")
    assert after["audio"]["packets"] == before["audio"]["packets"]  # the sound, copied as it is, fits again
    assert after["audio"]["duration_s"] == pytest.approx(before["audio"]["duration_s"], abs=1e-3)
    stats = read_stats(tmp_path / "stats.jsonl")
    assert [s["index"] for s in stats] == list(range(0, 90, int(stride)))
    assert [s["timestamp_s"] for s in stats] == pytest.approx(VFR_TIMES[::int(stride)], abs=1e-6)


def test_output_equal_to_input_is_refused(tmp_path: Path) -> None:
    src = make_video(tmp_path / "clip.mp4", n=4, width=64, height=48)
    before = src.read_bytes()
    for target in ("clip.mp4", str(src), "./clip.mp4"):
        result = run_cli(src, "-o", target, "--model", ONNX_MODEL, "--overwrite", cwd=tmp_path, timeout=60)
        assert result.returncode == 1, (target, result.stderr)
        assert "input" in result.stderr, result.stderr
        assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


# --------------------------------------------------------------------------- the real video and model


@needs_model
@needs_highway
def test_highway_cars_are_pink(tmp_path: Path) -> None:
    result = run_cli(HIGHWAY, "-o", "out.mp4", "--model", ONNX_MODEL, "--save-masks", "masks", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert wrote_count(result.stdout, "out.mp4") == 38

    out = probe(tmp_path / "out.mp4")
    assert (out["codec"], out["frames"], out["rate"], out["size"]) == ("h264", 38, 25, (1280, 720))
    assert abs(out["duration_s"] - 38 / 25) < 1 / 25

    masks = sorted((tmp_path / "masks").iterdir())
    assert [p.name for p in masks] == [f"{i:06d}.png" for i in range(38)]
    labels = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in masks]
    assert all(lab.shape == (720, 1280) and lab.dtype == np.uint8 for lab in labels)
    car_pixels = [int((lab == CAR).sum()) for lab in labels]
    with_cars = sum(1 for c in car_pixels if c > 0)
    assert with_cars >= 2 * 38 // 3, f"cars found in only {with_cars} of 38 frames: {car_pixels}"

    # Where a mask says car, the output is the frame blended half-way to pink; elsewhere it is the frame.
    source, output = decode(HIGHWAY), decode(tmp_path / "out.mp4")
    kernel = np.ones((7, 7), np.uint8)  # keep away from edges, where compression smears colours
    for i in sorted(range(38), key=lambda k: car_pixels[k])[-3:] + [int(np.argmin(car_pixels))]:
        car = (labels[i] == CAR).astype(np.uint8)
        inside = cv2.erode(car, kernel).astype(bool)
        outside = ~cv2.dilate(car, kernel).astype(bool)
        src, got = source[i].astype(np.float32), output[i].astype(np.float32)
        if inside.any():
            expected = 0.5 * src[inside] + 0.5 * PINK_BGR
            assert np.abs(got[inside] - expected).mean() < 10, f"frame {i}: car pixels are not pink"
            # Pinker than the source: red up, green down.
            assert (got[inside][:, 2] - got[inside][:, 1]).mean() > (src[inside][:, 2] - src[inside][:, 1]).mean() + 60
        assert np.abs(got[outside] - src[outside]).mean() < 8, f"frame {i}: non-car pixels changed"


@needs_model
@needs_highway
def test_overwrite_replaces_the_earlier_masks_as_a_whole(clips: dict[str, Path], tmp_path: Path) -> None:
    """After --overwrite, the masks directory holds exactly this run's masks: none of an earlier,
    longer or denser run is left to pass for a frame that was segmented. Other files stay."""
    result = run_cli(HIGHWAY, "-o", "c.mp4", "--model", ONNX_MODEL, "--save-masks", "m", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "m").glob("*.png"))) == 38
    mine = {"notes.txt": "the user's own", "12345.png": "five digits: not a streamseg mask",
            "0000001.png": "seven digits: not a streamseg mask either"}
    for name, text in mine.items():
        (tmp_path / "m" / name).write_text(text)

    result = run_cli(HIGHWAY, "-o", "c.mp4", "--model", ONNX_MODEL, "--save-masks", "m", "--stride", "3",
                     "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "13 segmented" in result.stdout
    masks = sorted(p.name for p in (tmp_path / "m").iterdir() if p.name not in mine)
    assert masks == [f"{i:06d}.png" for i in range(0, 38, 3)]
    assert {name: (tmp_path / "m" / name).read_text() for name in mine} == mine

    # A shorter video after a longer one.
    result = run_cli(clips["short"], "-o", "c.mp4", "--model", ONNX_MODEL, "--save-masks", "m", "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    masks = sorted(p.name for p in (tmp_path / "m").iterdir() if p.name not in mine)
    assert masks == [f"{i:06d}.png" for i in range(6)]
    assert cv2.imread(str(tmp_path / "m" / "000005.png"), cv2.IMREAD_UNCHANGED).shape == (120, 160)
    assert temp_leftovers(tmp_path / "m") == []


@needs_model
def test_overwrite_removes_earlier_masks_of_a_million_frames_and_more(tmp_path: Path) -> None:
    """Masks of frame 1,000,000 on are named 1000000.png, 12345678.png, ...: after --overwrite none
    of an earlier run that long is left, and files streamseg never writes there stay."""
    src = make_video(tmp_path / "short.mp4", n=6, width=160, height=120)
    masks_dir = tmp_path / "m"
    masks_dir.mkdir()
    earlier = ["000003.png", "000042.png", "999999.png", "1000000.png", "1234567.png", "12345678.png", "1" + "0" * 12 + ".png"]
    for name in earlier:
        assert cv2.imwrite(str(masks_dir / name), np.full((120, 160), 9, np.uint8))
    mine = {"0000001.png": "a leading zero and seven digits: {:06d} never writes that",
            "01000000.png": "nor that", "1000000.png.bak": "a backup", "1000000.PNG": "upper case",
            "x1000000.png": "a prefix", "1000000a.png": "a suffix", "123.png": "three digits"}
    for name, text in mine.items():
        (masks_dir / name).write_text(text)
    (masks_dir / "2000000.png").mkdir()  # a directory is never a mask

    refused = run_cli(src, "-o", "c.mp4", "--model", ONNX_MODEL, "--save-masks", "m", cwd=tmp_path)
    assert refused.returncode == 1 and "already holds masks" in refused.stderr

    result = run_cli(src, "-o", "c.mp4", "--model", ONNX_MODEL, "--save-masks", "m", "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours = sorted(p.name for p in masks_dir.iterdir() if p.name not in mine and p.name != "2000000.png")
    assert ours == [f"{i:06d}.png" for i in range(6)]
    assert {name: (masks_dir / name).read_text() for name in mine} == mine
    assert (masks_dir / "2000000.png").is_dir()


@needs_model
def test_shipped_sample_shows_both_cars(tmp_path: Path) -> None:
    """The README's third command on the shipped sample, with the real ONNX model: every frame
    has both drawn cars partly coloured (the drawing must look like cars to a model trained on
    photographs, or a first run shows nothing), and little else: the small model calls a few
    hundred pixels of a rear window aeroplane in some frames."""
    sample = ROOT / "sample_media" / "road.mp4"
    result = run_cli(sample, "-o", "road_overlay.mp4", "--model", ONNX_MODEL, "--save-masks", "masks", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = probe(tmp_path / "road_overlay.mp4")
    assert (out["codec"], out["frames"], out["size"]) == ("h264", 48, (640, 360))
    assert out["audio"] is not None

    labels = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((tmp_path / "masks").iterdir())]
    assert len(labels) == 48
    white = [int((lab[:, :280] == CAR).sum()) for lab in labels]  # the white car, left lane
    red = [int((lab[:, 280:] == CAR).sum()) for lab in labels]  # the red car ahead
    assert min(white) >= 500, f"the white car is missed in some frames: {white}"
    assert min(red) >= 8000, f"the red car is missed in some frames: {red}"
    other = [float(((lab != 0) & (lab != CAR)).mean()) for lab in labels]
    assert max(other) < 0.01, f"classes other than car cover up to {max(other):.1%} of a frame"


# --------------------------------------------------------------------------- signals


@needs_model
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_finalises_partial_output(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    src = make_video(tmp_path / "long.mp4", n=600, width=160, height=120, rate=Fraction(25), grey=True)
    proc = subprocess.Popen(cli(src, "-o", "out.mp4", "--model", ONNX_MODEL), cwd=tmp_path, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        # Wait until the progress bar shows frames going through, as a user would before Ctrl-C.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = [int(n) for n in re.findall(r"(\d+)/600", "".join(err))]
            if done and max(done) >= 10:
                break
            assert proc.poll() is None, "".join(err)
            time.sleep(0.05)
        else:
            pytest.fail("no progress within 60 s:\n" + "".join(err))
        proc.send_signal(sig)
        proc.wait(timeout=30)
        stdout = proc.stdout.read()  # one line; stderr belongs to the reader thread
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    stderr = "".join(err)
    assert proc.returncode == code, stderr
    written = wrote_count(stdout, "out.mp4")
    assert 10 <= written < 600
    frames = decode(tmp_path / "out.mp4")
    assert len(frames) == written
    # Every frame written so far, in order: frame i still has the grey level of source frame i.
    levels = [int(round(float(f[60, 80].mean()))) for f in frames]
    assert all(abs(level - grey_level(i)) <= 4 for i, level in enumerate(levels)), levels
    assert probe(tmp_path / "out.mp4")["rate"] == 25
    assert temp_leftovers(tmp_path) == []
    assert "Traceback" not in stderr


def test_a_warning_from_another_thread_gets_its_own_line_under_the_progress_bar(capsys):
    """The capture thread reports a corrupt frame while the output stage draws the progress bar
    on the same stderr: the warning must not land in the middle of the bar's line."""
    import logging
    import threading

    from tqdm import tqdm

    from streamseg import cli

    logger = logging.getLogger("streamseg")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    cli._setup_logging(quiet=False, debug=False)
    try:
        with tqdm(total=10, unit="frame", file=sys.stderr) as bar:
            bar.update(3)
            reporter = threading.Thread(target=lambda: logging.getLogger("streamseg.sources").warning("frame 12 is corrupt"))
            reporter.start()
            reporter.join()
            bar.update(3)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "streamseg: warning: frame 12 is corrupt" in lines, lines
