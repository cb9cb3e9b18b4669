"""Outputs are never half-written, and SIGINT/SIGTERM at any moment end a run cleanly.

The real CLI in a subprocess, real signals. What tests/test_video_cli.py and tests/test_live.py
already check (SIGINT/SIGTERM mid-video finalise the video; a signal during a stream's back-off
ends at once) is not repeated; this file covers the other moments: while the model loads (ONNX,
and a torchvision model from a --weights file), mid-video with masks and stats, right after the
last frame while the video is finished, in the middle of a batch of images, and at a spread of
moments across a whole run. After every one: either no output or a complete, playable one; masks
are whole PNGs; stats files hold whole JSON lines; no temporary file is left.

The same holds for the faults at the end of the file: a full disk (a small tmpfs, where mounting
is allowed) or a file-size limit (`ulimit -f`) while writing, and a stream that stops delivering.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import pytest

from conftest import ROOT, _make_onnx
from media import decoded_frames, encode_video

VOC = (
    "__background__,aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,diningtable,dog,horse,"
    "motorbike,person,pottedplant,sheep,sofa,train,tvmonitor"
)
pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and file-size limits")

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
WORD = {signal.SIGINT: "streamseg: interrupted", signal.SIGTERM: "streamseg: terminated"}


# --------------------------------------------------------------------------- helpers


def make_video(path: Path, *, n: int, width: int = 160, height: int = 120) -> Path:
    """H.264, 25 fps; frame i is flat grey at level 16 + 4 * (i % 55), with a red left half."""
    def images():
        for i in range(n):
            image = np.full((height, width, 3), 16 + 4 * (i % 55), np.uint8)
            image[:, : width // 2, 2] = 250
            yield image

    return encode_video(path, images(), width=width, height=height, options={"preset": "ultrafast"})


class Child:
    """`python -m streamseg ARGS` in the background; stderr (tqdm's \\r lines included) collected
    by a thread so the test can wait for a moment in the run."""

    def __init__(self, *args: object, cwd: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "streamseg", *map(str, args)], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._err = bytearray()
        self._out = bytearray()
        self._readers = [threading.Thread(target=self._read, args=(pipe, buf), daemon=True)
                         for pipe, buf in ((self.proc.stderr, self._err), (self.proc.stdout, self._out))]
        for reader in self._readers:
            reader.start()
        self.stdout = ""

    @staticmethod
    def _read(pipe, buf: bytearray) -> None:
        while chunk := os.read(pipe.fileno(), 65536):
            buf.extend(chunk)

    @property
    def stderr(self) -> str:
        return self._err.decode("utf-8", "replace")

    def wait_for(self, what: str, condition: Callable[[str], bool], timeout: float = 60) -> bool:
        """True once condition(stderr) holds; False if the child ended first."""
        deadline = time.monotonic() + timeout
        while not condition(self.stderr):
            if self.proc.poll() is not None:
                return condition(self.stderr)
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.stderr}"
            time.sleep(0.01)
        return True

    def progress(self, total: int) -> int:
        done = [int(n) for n in re.findall(rf"(\d+)/{total}\b", self.stderr)]
        return max(done, default=0)

    def wait_until_main(self, timeout: float = 30) -> float:
        """Wait until streamseg's main() has installed its signal handlers; the monotonic time then.

        Read from /proc: the process catches SIGTERM once main() runs (Python's start-up does not).
        Elsewhere, half a second is taken for it."""
        status = Path(f"/proc/{self.proc.pid}/status")
        if not status.exists():
            time.sleep(0.5)
            return time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                caught = re.search(r"^SigCgt:\s*([0-9a-fA-F]+)", status.read_text(), re.M)
            except OSError:  # ended meanwhile
                break
            if caught and int(caught.group(1), 16) >> (signal.SIGTERM - 1) & 1:
                break
            time.sleep(0.002)
        return time.monotonic()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 60) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for reader in self._readers:
                reader.join(5)
            self.proc.stdout.close()
            self.proc.stderr.close()
        self.stdout = self._out.decode("utf-8", "replace")
        return self.proc.returncode


def leftovers(directory: Path) -> list[str]:
    """Temporary files anywhere below `directory`."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if ".part" in p.name or p.name.startswith(".streamseg"))


def assert_outputs_whole(cwd: Path, stdout: str, *, video: str = "out.mp4", masks: str = "masks",
                         stats: str = "stats.jsonl", size: tuple[int, int] = (120, 160)) -> Optional[int]:
    """The invariant after any interruption; returns the frames in the video (None: no video)."""
    assert leftovers(cwd) == [], leftovers(cwd)
    frames = None
    if (cwd / video).exists():
        frames = decoded_frames(cwd / video)  # plays to the end: the index was written
        assert frames > 0
        m = re.search(rf"^wrote {re.escape(video)}: (\d+) frames", stdout, re.M)
        if m:
            assert int(m.group(1)) == frames
    if (cwd / masks).is_dir():
        for png in (cwd / masks).iterdir():
            assert re.fullmatch(r"\d{6}\.png", png.name), png.name
            labels = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
            assert labels is not None and labels.shape == size and labels.dtype == np.uint8, png.name
    if (cwd / stats).exists():
        text = (cwd / stats).read_text()
        assert text == "" or text.endswith("\n")
        for line in text.splitlines():
            json.loads(line)  # whole lines only
    return frames


def assert_clean_stop(child: Child, code: int, sig: int) -> None:
    """Exit status 128 + signal, no traceback, no error; a signal that cut the run short (rather
    than letting the frames so far be finished) says so on the last line."""
    assert code == EXIT[sig], f"exit {code}:\n{child.stderr}"
    assert "Traceback" not in child.stderr, child.stderr
    assert "streamseg: error" not in child.stderr, child.stderr
    if "wrote " not in child.stdout and " segmented" not in child.stdout:
        assert child.stderr.strip().splitlines()[-1] == WORD[sig], child.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = {"streamseg.input_size": "32", "streamseg.mean": "127.5,127.5,127.5",
            "streamseg.std": "127.5,127.5,127.5", "streamseg.categories": VOC}
    return _make_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx", metadata=meta)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {"long": make_video(d / "long.mp4", n=400), "short": make_video(d / "short.mp4", n=40)}


@pytest.fixture(scope="module")
def lraspp_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised lraspp_mobilenet_v3_large state dict, as a user's --weights file."""
    torch = pytest.importorskip("torch")
    from streamseg.model import TorchModel

    net = TorchModel("lraspp_mobilenet_v3_large", device=torch.device("cpu"), pretrained=False).net.model
    path = tmp_path_factory.mktemp("weights") / "lraspp_random.pth"
    torch.save(net.state_dict(), path)
    return path


# --------------------------------------------------------------------------- outputs are never half-written


def test_existing_outputs_and_inputs_are_kept(tiny: Path, videos: dict[str, Path], run_cli, tmp_path: Path) -> None:
    """Existing stats and masks are only replaced with --overwrite; an input never, even with it."""
    (tmp_path / "stats.jsonl").write_text("precious\n")
    refused = run_cli(videos["short"], "-m", tiny, "-o", "out.mp4", "--stats", "stats.jsonl", cwd=tmp_path)
    assert refused.returncode == 1 and "stats.jsonl" in refused.stderr and "--overwrite" in refused.stderr
    assert (tmp_path / "stats.jsonl").read_text() == "precious\n"
    (tmp_path / "stats.jsonl").unlink()

    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "000000.png").write_bytes(b"precious")
    refused = run_cli(videos["short"], "-m", tiny, "--save-masks", "masks", cwd=tmp_path)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 1 and "masks" in last and "--overwrite" in last, refused.stderr
    assert (tmp_path / "masks" / "000000.png").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["000000.png", "masks"]

    replaced = run_cli(videos["short"], "-m", tiny, "--save-masks", "masks", "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert len(list((tmp_path / "masks").iterdir())) == 40
    assert cv2.imread(str(tmp_path / "masks" / "000000.png"), cv2.IMREAD_UNCHANGED).shape == (120, 160)

    # a.png's overlay would be named like the second input: refused, --overwrite or not. (Named
    # on the command line: from a folder, a_overlay.png beside a.png counts as a.png's output.)
    img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    shots = tmp_path / "shots"
    shots.mkdir()
    for name in ("a.png", "a_overlay.png"):
        cv2.imwrite(str(shots / name), img)
    before = {p.name: p.read_bytes() for p in shots.iterdir()}
    clash = run_cli(shots / "a.png", shots / "a_overlay.png", "-m", tiny, "-o", shots, "--overwrite", cwd=tmp_path)
    assert clash.returncode == 1 and "is the input" in clash.stderr.strip().splitlines()[-1], clash.stderr
    assert {p.name: p.read_bytes() for p in shots.iterdir()} == before
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- signals at chosen moments


def _load_args(kind: str, tiny: Path, videos: dict[str, Path], weights: Optional[Path]) -> list:
    if kind == "onnx":
        return [videos["short"], "-m", tiny, "-o", "out.mp4", "--stats", "stats.jsonl", "--debug"]
    return [videos["short"], "-m", "lraspp_mobilenet_v3_large", "--weights", weights, "--device", "cpu",
            "-o", "out.mp4", "--stats", "stats.jsonl", "--debug"]


LOADED = " fps, "  # in the source's line, printed once the model is loaded and the source open
_windows: dict[str, float] = {}


def _load_window(kind: str, args: list, tmp_path: Path) -> float:
    """Seconds from the 'loading model' line to the source's line, measured once per kind:
    importing torch, onnxruntime or torchvision, building the session or the network, loading
    the weights. The signals are sent at fractions of it, whatever the machine's speed."""
    if kind not in _windows:
        cwd = tmp_path / f"measure_{kind}"
        cwd.mkdir()
        child = Child(*args, cwd=cwd)
        assert child.wait_for("the model load", lambda err: "loading model" in err)
        began = time.monotonic()
        child.wait_for("the source", lambda err: LOADED in err)
        _windows[kind] = time.monotonic() - began
        child.signal(signal.SIGINT)  # measured: no need to segment the whole clip
        assert child.finish() in (0, 130, -signal.SIGINT), child.stderr
    return _windows[kind]


@pytest.mark.parametrize("kind, sig, fraction", [
    ("onnx", signal.SIGTERM, 0.0),
    ("onnx", signal.SIGINT, 0.3),
    ("onnx", signal.SIGTERM, 0.6),
    ("onnx", signal.SIGINT, 0.9),
    ("torchvision", signal.SIGTERM, 0.4),
    ("torchvision", signal.SIGINT, 0.8),
], ids=["onnx-SIGTERM-at-once", "onnx-SIGINT-30%", "onnx-SIGTERM-60%", "onnx-SIGINT-90%",
        "weights-SIGTERM-40%", "weights-SIGINT-80%"])
def test_signal_while_the_model_loads(kind, sig, fraction, tiny, videos, lraspp_weights, tmp_path: Path) -> None:
    """From the 'loading model' line until the source opens, the model's libraries are imported
    (torch, onnxruntime, torchvision) and the ONNX session or the network is built from its
    --weights file. A signal anywhere in there ends the run with its own status and writes
    nothing (it may wait for an import to finish: interrupting torch's import crashes it)."""
    args = _load_args(kind, tiny, videos, lraspp_weights if kind == "torchvision" else None)
    window = _load_window(kind, args, tmp_path)
    cwd = tmp_path / "run"
    cwd.mkdir()
    child = Child(*args, cwd=cwd)
    assert child.wait_for("the model load", lambda err: "loading model" in err)
    time.sleep(fraction * window)
    child.signal(sig)
    code = child.finish()
    if LOADED in child.stderr:  # this run loaded faster than the measured one: the signal came later
        assert code in (EXIT[sig], 0, -sig), child.stderr
        assert "Traceback" not in child.stderr
    else:
        assert_clean_stop(child, code, sig)
        assert list(cwd.iterdir()) == [], "written before the model was even loaded"
    assert_outputs_whole(cwd, child.stdout)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_video_keeps_whole_masks_and_stats(sig, tiny, videos, tmp_path: Path) -> None:
    child = Child(videos["long"], "-m", tiny, "-o", "out.mp4", "--stride", "2", "--save-masks", "masks",
                  "--stats", "stats.jsonl", cwd=tmp_path)
    assert child.wait_for("frames going through", lambda _err: child.progress(400) >= 20)
    child.signal(sig)
    code = child.finish()
    assert_clean_stop(child, code, sig)
    frames = assert_outputs_whole(tmp_path, child.stdout)
    assert frames is not None and 20 <= frames < 400
    masks = sorted(int(p.stem) for p in (tmp_path / "masks").iterdir())
    stats = [json.loads(line)["index"] for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    # Every segmented frame that reached the video has its mask and its stats line.
    assert masks == stats and set(range(0, frames, 2)) <= set(masks) and all(i % 2 == 0 for i in masks)


def test_signal_mid_video_replaces_the_earlier_masks(tiny, videos, tmp_path: Path) -> None:
    """--overwrite over an earlier run's masks, stopped mid-video: the run winds down, keeps its
    partial video, and the masks directory then holds this run's masks only."""
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    earlier = np.zeros((120, 160), np.uint8)
    for i in range(400):  # a denser run over the whole video
        cv2.imwrite(str(masks_dir / f"{i:06d}.png"), earlier)
    child = Child(videos["long"], "-m", tiny, "-o", "out.mp4", "--stride", "2", "--save-masks", "masks",
                  "--stats", "stats.jsonl", "--overwrite", cwd=tmp_path)
    assert child.wait_for("frames going through", lambda _err: child.progress(400) >= 20)
    child.signal(signal.SIGINT)
    code = child.finish()
    assert_clean_stop(child, code, signal.SIGINT)
    frames = assert_outputs_whole(tmp_path, child.stdout)
    assert frames is not None and 20 <= frames < 400
    masks = sorted(int(p.stem) for p in masks_dir.glob("*.png"))
    stats = [json.loads(line)["index"] for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert masks == stats and all(i % 2 == 0 for i in masks)


def test_signal_before_frames_flow_keeps_the_earlier_masks(tiny, videos, tmp_path: Path) -> None:
    """A run stopped before it wrote a mask leaves an earlier run's masks as they were."""
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    for i in range(5):
        cv2.imwrite(str(masks_dir / f"{i:06d}.png"), np.full((120, 160), i, np.uint8))
    before = {p.name: p.read_bytes() for p in masks_dir.iterdir()}
    child = Child(videos["short"], "-m", tiny, "-o", "out.mp4", "--save-masks", "masks", "--overwrite", cwd=tmp_path)
    child.wait_until_main()
    child.signal(signal.SIGINT)
    code = child.finish()
    assert_clean_stop(child, code, signal.SIGINT)
    assert {p.name: p.read_bytes() for p in masks_dir.iterdir()} == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("signals", [1, 2], ids=["one-SIGINT", "two-SIGINTs"])
def test_signal_right_after_the_last_frame(signals, tiny, videos, tmp_path: Path) -> None:
    """The last frame is through (the bar shows 40/40) and the video is being finished: one signal
    lets it finish, and so does a second: signals wait until the video is whole."""
    child = Child(videos["short"], "-m", tiny, "-o", "out.mp4", "--stats", "stats.jsonl", cwd=tmp_path)
    child.wait_for("the last frame", lambda _err: child.progress(40) >= 40)
    for _ in range(signals):
        child.signal(signal.SIGINT)
    code = child.finish()
    assert code in (0, 130, -signal.SIGINT), child.stderr  # see test_signal_at_a_spread_of_moments
    assert "Traceback" not in child.stderr
    frames = assert_outputs_whole(tmp_path, child.stdout)
    assert frames == 40  # the first signal came after every frame was written
    assert len((tmp_path / "stats.jsonl").read_text().splitlines()) == 40


def test_signals_while_the_video_is_finished_wait_for_it(tiny, videos, tmp_path: Path, monkeypatch, capsys) -> None:
    """Two Ctrl-C just as the video is being finished (encoder flushed, index written, file
    moved into place): the first asks the run to stop, the second would stop it at once. Both
    wait until the video is whole; cut short inside FFmpeg's trailer, the file could not be
    finished and the whole run was lost."""
    from streamseg import cli, videowriter

    real_close = videowriter.VideoWriter.close

    def close(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        real_close(self)

    monkeypatch.setattr(videowriter.VideoWriter, "close", close)
    code = cli.main([str(videos["short"]), "-m", str(tiny), "-o", str(tmp_path / "out.mp4"), "-q"])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert leftovers(tmp_path) == []
    assert decoded_frames(tmp_path / "out.mp4") == 40


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_in_a_batch_of_images(sig, tiny, tmp_path: Path) -> None:
    shots = tmp_path / "shots"
    shots.mkdir()
    rng = np.random.default_rng(0)
    for i in range(80):
        cv2.imwrite(str(shots / f"shot_{i:03d}.png"), rng.integers(0, 256, (180, 320, 3), dtype=np.uint8))
    child = Child(shots, "-m", tiny, "-o", "out", "--stats", "out/stats.jsonl", cwd=tmp_path)
    assert child.wait_for("images going through", lambda _err: len(list((tmp_path / "out").glob("*_labels.png"))) >= 3)
    child.signal(sig)
    code = child.finish()
    assert_clean_stop(child, code, sig)
    assert leftovers(tmp_path) == []
    written = sorted((tmp_path / "out").glob("*.png"))
    assert 9 <= len(written) < 240
    for png in written:
        assert cv2.imread(str(png), cv2.IMREAD_UNCHANGED) is not None, png.name
    lines = (tmp_path / "out" / "stats.jsonl").read_text().splitlines()
    done = {json.loads(line)["source"] for line in lines}
    assert {str(shots / (p.name.rsplit("_", 1)[0] + ".png")) for p in written if p.name.endswith("_labels.png")} <= done


@pytest.mark.parametrize("earlier", [False, True], ids=["no earlier stats", "earlier stats, --overwrite"])
def test_signal_before_the_first_image_publishes_no_stats(earlier, tiny, tmp_path: Path) -> None:
    """Ctrl-C once the model is loaded but before any image is written: no empty stats file
    appears, and one from an earlier run stays as it was, --overwrite or not."""
    shots = tmp_path / "shots"
    shots.mkdir()
    # Large enough that reading, segmenting and painting it take a while before its files are written.
    big = np.tile(np.linspace(0, 255, 6000, dtype=np.uint8)[None, :, None], (4000, 1, 3))
    assert cv2.imwrite(str(shots / "a_big.png"), big)
    cv2.imwrite(str(shots / "b_small.png"), big[:60, :80])
    before = '{"source": "from an earlier run"}\n'
    if earlier:
        (tmp_path / "stats.jsonl").write_text(before)
    child = Child(shots, "-m", tiny, "-o", "out", "--stats", "stats.jsonl", *(["--overwrite"] if earlier else []),
                  cwd=tmp_path)
    # The stats file's temporary appears once the model is loaded, just before the first image is read.
    assert child.wait_for("the model to load", lambda _err: any(tmp_path.glob(".stats.jsonl.*.part")))
    child.signal(signal.SIGINT)
    code = child.finish()
    assert_clean_stop(child, code, signal.SIGINT)
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    if earlier:
        assert (tmp_path / "stats.jsonl").read_text() == before
    else:
        assert not (tmp_path / "stats.jsonl").exists()


def test_signal_while_an_image_is_written_lets_it_finish(tiny, tmp_path: Path, monkeypatch, capsys) -> None:
    """A signal that lands between one image's PNGs (or before its stats line) is held until
    that image has all three files and its line: the run stops after it, never half-way."""
    from streamseg import cli, pipeline

    shots = tmp_path / "shots"
    shots.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        cv2.imwrite(str(shots / f"shot_{i}.png"), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    written: list[str] = []
    real_write_png = pipeline.write_png

    def write_png(path: Path, image: np.ndarray) -> None:
        written.append(path.name)
        if len(written) == 5:  # image 1's mask: its overlay is on disk, its labels are not
            os.kill(os.getpid(), signal.SIGTERM)
        real_write_png(path, image)

    monkeypatch.setattr(pipeline, "write_png", write_png)
    code = cli.main([str(shots), "-m", str(tiny), "-o", str(tmp_path / "out"), "--stats", str(tmp_path / "stats.jsonl")])
    assert code == 128 + signal.SIGTERM
    assert "terminated" in capsys.readouterr().err
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == sorted(f"shot_{i}_{kind}.png" for i in (0, 1) for kind in ("overlay", "mask", "labels"))
    lines = (tmp_path / "stats.jsonl").read_text().splitlines()
    assert [Path(json.loads(line)["source"]).name for line in lines] == ["shot_0.png", "shot_1.png"]


def test_a_deferred_block_inside_another_holds_the_signal_to_the_outer_end() -> None:
    from streamseg import cli

    interrupts = cli._Interrupts()
    reached = []
    with interrupts.installed(program=False):
        with pytest.raises(KeyboardInterrupt):
            with interrupts.deferred():
                with interrupts.deferred():
                    os.kill(os.getpid(), signal.SIGINT)
                    reached.append("inner end")
                reached.append("outer end")  # the inner block's end raised nothing
        assert reached == ["inner end", "outer end"]
        assert interrupts.raised == signal.SIGINT


# --------------------------------------------------------------------------- any moment


def test_signal_at_a_spread_of_moments(tiny, videos, tmp_path: Path) -> None:
    """One run timed, then signals sent at moments spread over that time, from the moment main()
    takes over the signals: argument checks, library imports, model load, frames, finishing.
    Whatever the moment, the invariant holds. (Before main() runs, in the first fifth of a second
    while Python starts and imports numpy, Python's own defaults apply; nothing is open then.)"""
    (tmp_path / "timing").mkdir()
    timing = Child(videos["short"], "-m", tiny, "-o", "out.mp4", "--save-masks", "masks", "--stats", "stats.jsonl",
                   cwd=tmp_path / "timing")
    started = timing.wait_until_main()
    assert timing.finish() == 0, timing.stderr
    span = time.monotonic() - started
    for k in range(6):
        moment = span * k / 6
        cwd = tmp_path / f"run{k}"
        cwd.mkdir()
        sig = (signal.SIGINT, signal.SIGTERM)[k % 2]
        child = Child(videos["short"], "-m", tiny, "-o", "out.mp4", "--save-masks", "masks", "--stats",
                      "stats.jsonl", cwd=cwd)
        time.sleep(max(0.0, child.wait_until_main() + moment - time.monotonic()))
        child.signal(sig)
        code = child.finish()
        # 0 or killed by the signal: it came after the run was over (while the interpreter shut
        # down, Python's own handlers are gone). Then the outputs are complete.
        finished = code in (0, -sig)
        assert finished or code == EXIT[sig], f"signal at {moment:.2f} s: exit {code}\n{child.stderr}"
        assert "Traceback" not in child.stderr, f"signal at {moment:.2f} s:\n{child.stderr}"
        frames = assert_outputs_whole(cwd, child.stdout)
        if finished:
            assert frames == 40 and len(list((cwd / "masks").iterdir())) == 40


# --------------------------------------------------------------------------- faults mid-run


def noisy_video(path: Path, *, n: int, width: int = 320, height: int = 240) -> Path:
    """Frames of random noise: H.264 cannot shrink them much, so a file fills a disk quickly."""
    rng = np.random.default_rng(3)
    images = (rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n))
    return encode_video(path, images, width=width, height=height, options={"preset": "ultrafast"})


def last_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("streamseg: error: "), stderr
    assert sum(line.startswith("streamseg: error:") for line in lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[-1]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return noisy_video(tmp_path_factory.mktemp("noisy") / "noisy.mp4", n=120)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="a file-size limit needs POSIX (RLIMIT_FSIZE)")
def test_file_size_limit_gives_one_error_and_a_playable_partial_video(tiny, noisy, run_cli, tmp_path: Path) -> None:
    """`ulimit -f` makes writes fail with EFBIG as a full disk fails with ENOSPC, without root.
    The writer stops while the file can still be finished: a clear error and the frames so far."""
    import resource

    limit = 1_500_000

    def limited() -> None:  # in the child only
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "streamseg", noisy, "-m", tiny, "-o", "out.mp4",
                           "--stats", "stats.jsonl", "--save-masks", "masks"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, preexec_fn=limited)
    assert proc.returncode == 1, proc.stderr
    message = last_error(proc.stderr)
    assert "out.mp4" in message and "ulimit -f" in message, message
    frames = assert_outputs_whole(tmp_path, proc.stdout, size=(240, 320))
    assert frames is not None and 0 < frames < 120, "the frames before the limit were not kept"
    assert (tmp_path / "out.mp4").stat().st_size <= limit
    assert f"stopped after {frames} frames" in message


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """mount(size) -> a fresh tmpfs of that size under tmp_path, unmounted afterwards; skips where
    mounting is not allowed (not root, or in a container without the right)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.name != "posix" or os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_full_disk_under_the_video(tiny, noisy, run_cli, small_tmpfs) -> None:
    disk = small_tmpfs("2m")
    proc = run_cli(noisy, "-m", tiny, "-o", disk / "out.mp4", "--stats", disk / "stats.jsonl", cwd=disk)
    assert proc.returncode == 1, proc.stderr
    message = last_error(proc.stderr)
    assert "out.mp4" in message and "disk is full" in message, message
    frames = assert_outputs_whole(disk, proc.stdout, size=(240, 320))
    assert frames is not None and 0 < frames < 120
    assert len((disk / "stats.jsonl").read_text().splitlines()) >= frames


def test_full_disk_under_masks_and_stats_keeps_the_video(tiny, noisy, run_cli, small_tmpfs, tmp_path: Path) -> None:
    """The masks and stats fill their own small disk; the video on another is finished and plays,
    and what reached the full disk is whole: complete PNGs, complete JSON lines."""
    disk = small_tmpfs("192k")
    proc = run_cli(noisy, "-m", tiny, "-o", "out.mp4", "--save-masks", disk / "masks", "--stats", disk / "stats.jsonl",
                   cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    message = last_error(proc.stderr)
    assert str(disk) in message and "No space left on device" in message, message
    frames = assert_outputs_whole(tmp_path, proc.stdout, size=(240, 320))
    assert frames is not None and 0 < frames < 120
    assert_outputs_whole(disk, "", size=(240, 320))
    masks = len(list((disk / "masks").iterdir()))
    assert masks > 0


class SilentAfter:
    """A loopback MJPEG "camera" that streams `frames` frames on its first connection and then
    goes silent, connection open; every later connection is accepted and never answered."""

    def __init__(self, frames: int = 25) -> None:
        import socket

        ok, buf = cv2.imencode(".jpg", np.full((120, 160, 3), 90, np.uint8))
        assert ok
        data = buf.tobytes()
        self.part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data) + data + b"\r\n"
        self.frames = frames
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(conn)
            if len(self.connections) == 1:
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
                    for _ in range(self.frames):
                        conn.sendall(self.part)
                        time.sleep(0.04)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        for conn in self.connections:
            conn.close()


def test_stream_that_stops_delivering_reconnects_then_gives_up(tiny, tmp_path: Path) -> None:
    """Reads time out after 10 s, the reconnect policy takes over (1 s back-off, one attempt, whose
    open also times out after 10 s), the run ends with one clear error, and the recording of the
    frames before the silence is finished and plays."""
    camera = SilentAfter(frames=25)
    try:
        started = time.monotonic()
        child = Child(f"http://127.0.0.1:{camera.port}/video.mjpg", "-m", tiny, "-o", "rec.mp4", "--stats",
                      "stats.jsonl", "--reconnect", "1", cwd=tmp_path)
        code = child.finish(timeout=90)
        elapsed = time.monotonic() - started
    finally:
        camera.close()
    assert code == 1, child.stderr
    assert elapsed < 10 + 1 + 10 + 20, f"took {elapsed:.0f} s"  # read timeout, back-off, open timeout, start-up
    assert "dropped (read failed or timed out); reconnecting in 1 s (attempt 1/1)" in child.stderr, child.stderr
    message = last_error(child.stderr)
    assert "gave up" in message and f"127.0.0.1:{camera.port}" in message, message
    frames = assert_outputs_whole(tmp_path, child.stdout, video="rec.mp4")
    assert frames is not None and frames > 0
    assert f"wrote rec.mp4: {frames} frames" in child.stderr
    assert len((tmp_path / "stats.jsonl").read_text().splitlines()) > 0
    assert len(camera.connections) == 2


def test_ctrl_c_while_the_cli_itself_loads() -> None:
    """A real SIGINT just as `streamseg.cli` starts to load (the first tenth of a second after the
    command starts, before streamseg's own handlers exist): status 130 and one line, not
    Python's traceback."""
    script = textwrap.dedent("""
        import os, signal, sys

        class AtCliImport:
            def find_spec(self, name, path=None, target=None):
                if name == "streamseg.cli":
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, AtCliImport())
        from streamseg._entry import main
        sys.argv = ["streamseg", "--help"]
        raise SystemExit(main())
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "streamseg: interrupted\n"
    assert done.stdout == ""
