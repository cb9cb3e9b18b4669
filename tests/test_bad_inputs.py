"""The bad-input table: every way a user can hand streamseg something wrong, one real CLI run each.

Each row is a subprocess run of `python -m streamseg` with its expected exit status (2 for a bad
command line, 1 for everything else) and the text its one-line `streamseg: error: …` (the last
line on stderr) must name. No row may print a traceback or leave an output or temporary file
behind unless it says so. The inputs live in one shared directory that must come out of every run
unchanged; each run gets its own empty working directory, where `-o out…` lands.

A tiny ONNX model built here stands in for a real one, so the table runs without ../shared.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import av
import cv2
import numpy as np
import pytest

from conftest import _make_onnx
from media import decoded_frames, encode_video

VOC = (
    "__background__,aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,diningtable,dog,horse,"
    "motorbike,person,pottedplant,sheep,sofa,train,tvmonitor"
)
HALF_FRAMES = 50  # frames in the MP4 that is then cut in half


# --------------------------------------------------------------------------- the inputs


def _faststart_mp4(path: Path, *, n: int, width: int = 160, height: int = 120) -> Path:
    """An H.264 MP4 with its index (moov) in front, so that a copy cut anywhere after the index
    still opens and plays up to the cut, as a dashcam file cut short by a power loss does."""
    rng = np.random.default_rng(1)

    def images():
        for _ in range(n):
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)  # no two frames alike
            image[:, : width // 2, 2] = 250
            yield image

    return encode_video(path, images(), width=width, height=height, options={"preset": "ultrafast", "g": "10"},
                        container_format="mp4", container_options={"movflags": "+faststart"})


def _huge_png(path: Path, *, width: int, height: int) -> Path:
    """A valid PNG of width x height black pixels (1-bit grey), written a row at a time: a few
    hundred KB on disk and never the whole picture in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


class _RunsCode:
    """Unpickling this creates `marker`: the kind of payload weights_only loading must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("bad_inputs")
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert cv2.imwrite(str(d / "good.png"), image)
    big = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    png = cv2.imencode(".png", big)[1].tobytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "zero.png").write_bytes(b"")
    (d / "notes.png").write_text("this is text, not a PNG\n")
    _huge_png(d / "huge.png", width=40000, height=40000)  # more pixels than OpenCV decodes (2**30)
    (d / "notes.mp4").write_text("this is text, not an MP4\n")
    (d / "empty_dir").mkdir()
    (d / "blocker").write_text("a file where an output directory should go\n")
    (d / "notes.pth").write_text("model = good\n")
    (d / "fake.onnx").write_bytes(b"PK\x03\x04 not an onnx protobuf")
    torch.save({"classifier.weight": _RunsCode(d / "code_ran")}, d / "evil.pth")
    _faststart_mp4(d / "clip.mp4", n=8)
    whole = _faststart_mp4(d / "whole.mp4", n=HALF_FRAMES).read_bytes()
    assert 0 <= whole.find(b"moov") < whole.find(b"mdat") < len(whole) // 2  # the cut falls in the frames
    (d / "half.mp4").write_bytes(whole[: len(whole) // 2])
    (d / "head.mp4").write_bytes(whole[:2000])  # the index, then the first bytes of one frame
    (d / "zero.mp4").write_bytes(b"")
    with av.open(str(d / "sound.mp4"), "w") as container:  # an MP4 with nothing but a tone
        sound = container.add_stream("aac", rate=48000)
        sound.layout = "mono"
        for start in range(0, 48000, 1024):
            frame = av.AudioFrame.from_ndarray(np.full((1, 1024), 0.1, np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, start
            for packet in sound.encode(frame):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)
    (d / "whole.mp4").unlink()
    meta = {
        "streamseg.input_size": "32",
        "streamseg.mean": "127.5,127.5,127.5",
        "streamseg.std": "127.5,127.5,127.5",
        "streamseg.categories": VOC,
    }
    _make_onnx(d / "tiny.onnx", metadata=meta)
    return d


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Optional[Path], str]]:
    """An existing directory nobody may write to, root included: a read-only tmpfs mount, or an
    immutable directory (chattr +i); a plain chmod for other users. (None, why) where none works."""
    d = tmp_path_factory.mktemp("read_only")
    undo: list[list[str]] = []
    why = ""
    if os.name != "posix":
        why = "needs POSIX permissions"
    elif os.geteuid() != 0:
        d.chmod(0o555)
        undo.append(["chmod", "755", str(d)])
    elif shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True
    ).returncode == 0:
        undo.append(["umount", str(d)])
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0:
        undo.append(["chattr", "-i", str(d)])
    else:
        why = "running as root without mount rights or chattr: no directory is read-only to root"
    try:
        if not why:
            probe = d / "probe"
            try:
                probe.touch()
            except OSError:
                pass
            else:
                probe.unlink()
                why = f"could not make {d} read-only for this user"
        yield (None if why else d), why
    finally:
        for cmd in undo:
            subprocess.run(cmd, capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    """One CLI run. `{in}`, `{model}`, `{ro}` and `{port}` in args are filled in."""

    id: str
    args: tuple[str, ...]
    code: int
    names: tuple[str, ...]  # what the last stderr line must contain (a warning line for code 0)
    keeps: tuple[str, ...] = ()  # files the run leaves in its working directory
    within_s: Optional[float] = None  # wall-clock bound for the whole run
    needs_read_only: bool = False
    alone: bool = False  # the error line is all there is on stderr: no FFmpeg or OpenCV log lines


IMG = ("{in}/good.png", "-m", "{model}", "-o", "out")

# Give-up bound for an unserved stream with --reconnect 2 (README, "Faults"): back-off 1 + 2 s and
# three attempts of at most 10 s each; plus start-up (interpreter, torch, model).
RECONNECT_2_BOUND_S = (1 + 2) + 3 * 10 + 20

ROWS = [
    Row("missing image", ("{in}/missing.jpg", "-m", "{model}", "-o", "out"), 1, ("missing.jpg", "does not exist")),
    Row("missing video", ("{in}/missing.mp4", "-m", "{model}", "-o", "out.mp4"), 1, ("missing.mp4", "does not exist")),
    Row("empty directory", ("{in}/empty_dir", "-m", "{model}", "-o", "out"), 1, ("empty_dir", "no image files")),
    Row("zero-byte file", ("{in}/zero.png", "-m", "{model}", "-o", "out"), 1, ("zero.png", "0 bytes")),
    Row("text named .png", ("{in}/notes.png", "-m", "{model}", "-o", "out"), 1, ("notes.png", "could not be decoded")),
    # A run that writes no stats line publishes no (empty) stats file.
    Row("text named .png, with --stats", ("{in}/notes.png", "-m", "{model}", "-o", "out", "--stats", "stats.jsonl"), 1,
        ("notes.png", "could not be decoded")),
    # A valid image, only too large to decode: it says so, rather than "truncated/corrupt".
    Row("PNG of 40000x40000 pixels", ("{in}/huge.png", "-m", "{model}", "-o", "out"), 1,
        ("huge.png", "too large", "40000x40000", "1,600,000,000 pixels", "1,073,741,824", "CV_IO_MAX_IMAGE_PIXELS")),
    Row("truncated PNG", ("{in}/truncated.png", "-m", "{model}", "-o", "out"), 1, ("truncated.png",)),
    Row("text named .mp4", ("{in}/notes.mp4", "-m", "{model}", "-o", "out.mp4"), 1, ("notes.mp4", "cannot open"),
        alone=True),
    Row("zero-byte video", ("{in}/zero.mp4", "-m", "{model}", "-o", "out.mp4"), 1, ("zero.mp4", "empty (0 bytes)"),
        alone=True),
    Row("audio-only MP4", ("{in}/sound.mp4", "-m", "{model}", "-o", "out.mp4"), 1,
        ("sound.mp4", "has no video stream (only audio)"), alone=True),
    Row("MP4 cut inside its first frame", ("{in}/head.mp4", "-m", "{model}", "-o", "out.mp4"), 1,
        ("head.mp4", "has no readable frames"), alone=True),
    # The video is looked at before the model loads: its error comes first, at once.
    Row("text named .mp4, model not ONNX", ("{in}/notes.mp4", "-m", "{in}/fake.onnx", "-o", "out.mp4"), 1,
        ("notes.mp4", "cannot open"), alone=True),
    # Documented: the frames before the cut are processed and written, one warning, exit 0.
    Row("MP4 cut in half", ("{in}/half.mp4", "-m", "{model}", "-o", "out.mp4", "--stats", "stats.jsonl"), 0,
        ("half.mp4", f"of {HALF_FRAMES} frames"), keeps=("out.mp4", "stats.jsonl")),
    Row("camera that does not exist", ("9", "-m", "{model}", "-o", "rec.mp4"), 1, ("camera 9",)),
    Row("file:// URL", ("file:///etc/passwd", "-m", "{model}", "-o", "out"), 2, ("'file:'", "file:///etc/passwd")),
    Row("ftp:// URL", ("ftp://127.0.0.1/clip.mp4", "-m", "{model}", "-o", "out.mp4"), 2, ("'ftp:'",)),
    Row("javascript: URL", ("javascript:alert(1)", "-m", "{model}", "-o", "out.mp4"), 2, ("'javascript:'",)),
    Row("unserved RTSP URL", ("rtsp://127.0.0.1:{port}/live", "-m", "{model}", "-o", "rec.mp4", "--reconnect", "2"), 1,
        ("gave up", "rtsp://127.0.0.1:{port}/live", "2 reconnect attempts"), within_s=RECONNECT_2_BOUND_S),
    Row("http:// URL with no host", ("http://", "-m", "{model}", "-o", "rec.mp4"), 2, ("'http://'", "no host"),
        within_s=10, alone=True),
    Row("rtsp:// URL with no host", ("rtsp:///live", "-m", "{model}", "-o", "rec.mp4"), 2, ("no host",),
        within_s=10, alone=True),
    Row("unknown model", ("{in}/good.png", "-m", "deeplabv5", "-o", "out"), 2, ("deeplabv5",)),
    Row("unknown class", IMG + ("--classes", "car,spaceship"), 2, ("spaceship",)),
    # A typo is named, not hidden behind what it left out or beside (options are validated after).
    Row("misspelt option beside a bad value", IMG + ("--alpha", "1.5", "--legnd"), 2,
        ("unrecognized arguments: --legnd",)),
    Row("export with a misspelt -o", ("export", "-m", "lraspp_mobilenet_v3_large", "--ouput", "x.onnx"), 2,
        ("unrecognized arguments: --ouput x.onnx",)),
    Row("class given as a superscript digit", IMG + ("--classes", "car,\u00b3"), 2, ("unknown class", "\u00b3")),
    # Said rather than ignored: masks asked for on a still image would go nowhere without a word.
    Row("video options on a still image", IMG + ("--save-masks", "masks", "--stride", "5"), 2,
        ("--save-masks, --stride", "not to still images")),
    Row("--crf 0 (lossless, not for browsers)", ("{in}/clip.mp4", "-m", "{model}", "-o", "out.mp4", "--crf", "0"), 2,
        ("--crf", "between 1 and 51", "browsers")),
    Row("--alpha 1.5", IMG + ("--alpha", "1.5"), 2, ("--alpha", "1.5")),
    Row("--stride 0", ("{in}/clip.mp4", "-m", "{model}", "-o", "out.mp4", "--stride", "0"), 2, ("--stride", "0")),
    Row("--batch -1", ("{in}/clip.mp4", "-m", "{model}", "-o", "out.mp4", "--batch", "-1"), 2, ("--batch", "-1")),
    Row("output is the input", ("{in}/clip.mp4", "-m", "{model}", "-o", "{in}/clip.mp4", "--overwrite"), 1,
        ("clip.mp4", "is the input")),
    Row("stats file is the input", IMG + ("--stats", "{in}/good.png", "--overwrite"), 1, ("good.png", "is the input")),
    # For images -o names a directory: `-o result.png` would quietly become one.
    Row("image -o named like an image file", IMG[:-1] + ("result.png",), 2, ("-o", "directory", "result.png")),
    Row("image -o named like a JPEG, upper case", IMG[:-1] + ("shot.JPG",), 2, ("-o", "directory", "shot.JPG")),
    Row("image output directory is a file", ("{in}/good.png", "-m", "{model}", "-o", "{in}/blocker"), 1,
        ("blocker", "is a file")),
    Row("video output directory is a file", ("{in}/clip.mp4", "-m", "{model}", "-o", "{in}/blocker/out.mp4"), 1,
        ("blocker", "is a file")),
    Row("masks directory is a file", ("{in}/clip.mp4", "-m", "{model}", "--save-masks", "{in}/blocker"), 1,
        ("blocker", "is a file")),
    Row("image output directory read-only", ("{in}/good.png", "-m", "{model}", "-o", "{ro}"), 1, ("{ro}",),
        needs_read_only=True),
    Row("video output directory read-only", ("{in}/clip.mp4", "-m", "{model}", "-o", "{ro}/out.mp4"), 1, ("{ro}",),
        needs_read_only=True),
    Row("stats directory read-only", ("{in}/clip.mp4", "-m", "{model}", "-o", "out.mp4", "--stats", "{ro}/s.jsonl"), 1,
        ("{ro}",), needs_read_only=True),
    Row("--weights not a weights file", ("{in}/good.png", "-m", "lraspp_mobilenet_v3_large", "--weights", "{in}/notes.pth",
                                         "-o", "out"), 1, ("notes.pth", "not a PyTorch weights file")),
    Row("--weights pickle that runs code", ("{in}/good.png", "-m", "lraspp_mobilenet_v3_large", "--weights",
                                            "{in}/evil.pth", "-o", "out"), 1, ("evil.pth", "weights_only")),
    Row("ONNX file that is not ONNX", ("{in}/good.png", "-m", "{in}/fake.onnx", "-o", "out"), 1,
        ("fake.onnx", "not a usable ONNX model")),
    # Options that an ONNX file makes meaningless say so, rather than being ignored.
    Row("--precision with an ONNX model", IMG + ("--precision", "fp16"), 2, ("--precision", "not to ONNX files")),
    Row("--compile with an ONNX model", IMG + ("--compile",), 2, ("--compile", "not to ONNX files")),
    Row("--weights with an ONNX model", IMG + ("--weights", "{in}/notes.pth"), 2, ("--weights", "not to ONNX files")),
]


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, inputs: Path, read_only_dir, run_cli, tmp_path: Path) -> None:
    ro, why = read_only_dir
    if row.needs_read_only and ro is None:
        pytest.skip(why)
    fill = {"{in}": str(inputs), "{model}": str(inputs / "tiny.onnx"), "{ro}": str(ro), "{port}": str(_free_port())}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    before = _snapshot(inputs)
    started = time.monotonic()
    proc = run_cli(*map(filled, row.args), cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - started
    lines = proc.stderr.strip().splitlines()

    assert proc.returncode == row.code, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in lines if line.startswith("streamseg: error:")]
    if row.code == 0:
        assert errors == [], proc.stderr
        shown = "\n".join(line for line in lines if line.startswith("streamseg: warning:"))
    else:
        assert lines and lines[-1].startswith("streamseg: error: "), proc.stderr
        assert len(errors) == 1, proc.stderr
        if row.alone:
            assert lines == errors, proc.stderr
        shown = lines[-1]
    for text in map(filled, row.names):
        assert text in shown, f"{text!r} not in {shown!r}"
    if row.within_s is not None:
        assert elapsed < row.within_s, f"took {elapsed:.1f} s"

    # Nothing left behind but what the row keeps; the inputs untouched; no code ran.
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(row.keeps), left
    assert _snapshot(inputs) == before
    assert not (inputs / "code_ran").exists(), "unpickling the weights file ran its code"
    if ro is not None:
        assert list(ro.iterdir()) == []

    if row.id == "MP4 cut in half":
        written = decoded_frames(tmp_path / "out.mp4")
        assert 0 < written < HALF_FRAMES
        assert f"wrote out.mp4: {written} frames" in proc.stdout
        assert len((tmp_path / "stats.jsonl").read_text().splitlines()) == written
    if row.id == "unserved RTSP URL":
        assert "(attempt 1/2)" in proc.stderr and "(attempt 2/2)" in proc.stderr, proc.stderr


def test_remote_playlist_cannot_open_local_files(inputs: Path, run_cli, tmp_path: Path) -> None:
    """An http:// source is an allowed scheme, but what it serves cannot point streamseg at local
    files: FFmpeg's protocol whitelist for remote inputs refuses an HLS playlist's file:// segment."""
    import http.server
    import threading

    secret = tmp_path / "secret.ts"
    with av.open(str(secret), "w", format="mpegts") as container:
        stream = container.add_stream("mpeg2video", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 200, np.uint8), format="bgr24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:0.4,\nfile://{secret}\n#EXT-X-ENDLIST\n".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.apple.mpegurl")
            self.send_header("Content-Length", str(len(playlist)))
            self.end_headers()
            self.wfile.write(playlist)

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/live.m3u8"
        proc = run_cli(url, "-m", inputs / "tiny.onnx", "-o", "rec.mp4", "--reconnect", "0", cwd=tmp_path, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("streamseg: error: cannot open stream"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.ts"]


@pytest.mark.parametrize("path, status, kind, says", [
    ("/nope.mjpg", 404, "text/html", "HTTP 404"),
    ("/admin/video.mjpg", 401, "text/html", "HTTP 401"),
    ("/index.html", 200, "text/html", "sends text/html, not a video stream"),
], ids=["404", "401", "web page"])
def test_http_answer_that_will_not_change_is_not_retried(inputs: Path, run_cli, tmp_path: Path, path, status, kind,
                                                         says) -> None:
    """A server that answers, with a status or a page that asking again will not change: one
    error line saying what it answered, at once, instead of minutes of reconnecting under
    'unreachable, refused, or no answer'."""
    import http.server
    import threading

    body = b"<html><body>not here</body></html>"

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        proc = run_cli(f"http://127.0.0.1:{server.server_address[1]}{path}", "-m", inputs / "tiny.onnx",
                       "-o", "rec.mp4", cwd=tmp_path, timeout=120)
        took = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamseg: error: cannot open stream") and says in lines[0], proc.stderr
    assert "reconnecting" not in proc.stderr
    assert took < 20, f"gave up after {took:.0f} s"
    assert list(tmp_path.iterdir()) == []


def test_code_in_the_weights_cache_does_not_run(inputs: Path, run_cli, tmp_path: Path) -> None:
    """A pickle planted in torchvision's cache under the official file name (which torchvision's
    own loader would unpickle) is refused like any --weights file; its code does not run."""
    import torch

    from streamseg.model import weights_for

    official = weights_for("lraspp_mobilenet_v3_large").url.rsplit("/", 1)[-1]
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    torch.save({"classifier.weight": _RunsCode(marker)}, cache / official)
    proc = run_cli(inputs / "good.png", "-m", "lraspp_mobilenet_v3_large", "-o", "out", cwd=tmp_path,
                   env={"TORCH_HOME": str(tmp_path / "torch_home")}, timeout=120)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("streamseg: error: cached weights") and official in last and "weights_only" in last, last
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "unpickling the cached weights ran their code"
    assert not (tmp_path / "out").exists()
