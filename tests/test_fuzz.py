"""Fuzzing with hypothesis: the program either works or exits with one clean error line.

(a) Combinations of the main flags, valid and invalid values mixed, run in this process through
    `streamseg.cli.main(argv)` on a real small image and video with a tiny ONNX model.
(b) Random byte strings, and real PNG, JPEG and MP4 bytes with random damage, written as .png, .jpg
    and .mp4 files and fed to the CLI. A decoder may crash or hang on such bytes, which must not
    take pytest down with it: the runs happen in one child process that imports streamseg once and
    calls main() per case, each case timed, the whole child under a time limit.

Either way: exit status 0, 1 or 2; on failure the last stderr line is `streamseg: error: …` and it
is the only one; never a traceback; no temporary file left; the inputs untouched.

Two settings profiles: `streamseg-fuzz` keeps the whole file under a minute on two cores;
STREAMSEG_FUZZ=thorough selects `streamseg-fuzz-thorough`, ten times as many examples.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Optional

import av
import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import ROOT, _make_onnx
from media import encode_video

# No deadline: an example may load a model or start a process. The profile's max_examples is a
# multiplier of each test's own count: 1 by default, 10 with STREAMSEG_FUZZ=thorough.
settings.register_profile("streamseg-fuzz", max_examples=1, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("streamseg-fuzz-thorough", parent=settings.get_profile("streamseg-fuzz"), max_examples=10)
PROFILE = settings.get_profile("streamseg-fuzz-thorough" if os.environ.get("STREAMSEG_FUZZ") == "thorough"
                               else "streamseg-fuzz")


def fuzz_settings(examples: int) -> settings:
    return settings(PROFILE, max_examples=examples * PROFILE.max_examples)


VOC = (
    "__background__,aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,diningtable,dog,horse,"
    "motorbike,person,pottedplant,sheep,sofa,train,tvmonitor"
)
RUN_BOUND_S = 30  # no single run, however damaged its input, may take longer


# --------------------------------------------------------------------------- inputs


def _clip(path: Path, *, n: int = 6, width: int = 96, height: int = 64) -> Path:
    rng = np.random.default_rng(2)
    images = (rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n))
    return encode_video(path, images, width=width, height=height, options={"preset": "ultrafast", "g": "3"},
                        container_format="mp4", container_options={"movflags": "+faststart"})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz_inputs")
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    image[:, :32, 2] = 250
    assert cv2.imwrite(str(d / "photo.png"), image)
    assert cv2.imwrite(str(d / "photo.jpg"), image)
    (d / "shots").mkdir()
    assert cv2.imwrite(str(d / "shots" / "a.png"), image)
    _clip(d / "clip.mp4")
    (d / "blocker").write_text("a file where a directory should go\n")
    (d / "notes.pth").write_text("not weights\n")
    (d / "fake.onnx").write_bytes(b"not onnx")
    meta = {"streamseg.input_size": "32", "streamseg.mean": "127.5,127.5,127.5",
            "streamseg.std": "127.5,127.5,127.5", "streamseg.categories": VOC}
    _make_onnx(d / "tiny.onnx", metadata=meta)
    return d


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def _temp_files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if ".part" in p.name or p.name.startswith(".streamseg"))


def _check_outcome(code: int, out: str, err: str) -> None:
    assert code in (0, 1, 2), f"exit {code}\n{err}"
    assert "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if line.startswith("streamseg: error:")]
    if code == 2:
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    if code == 1:
        # Images: one error line per bad image, the run goes on. Otherwise one, and it is the last line.
        assert errors and err.strip().splitlines()[-1].startswith("streamseg: error: "), err
    if code == 0:
        assert errors == [], err


# --------------------------------------------------------------------------- (a) flag combinations

# "@x" is the file x in the inputs directory, "%source" the SOURCE drawn (an output that would
# overwrite the input); the rest is used as it stands.
# Each flag: (values that are fine, values that are not); a bad one is drawn one time in ten, so
# that about a third of the runs are entirely valid and do the whole job.
SOURCES = (["@photo.png", "@photo.jpg", "@shots", "@clip.mp4"],
           ["@missing.png", "@missing.mp4", "@nothing_*.png", "ftp://127.0.0.1/a.mp4", "javascript:x", ""])
FLAGS = {
    "-o": ([None, "out", "out/", "deep/er/"], ["x.avi", "@blocker", "@blocker/sub", "out.mp4"]),
    "-m": (["@tiny.onnx"], ["@fake.onnx", "@missing.onnx", "deeplabv5", "lraspp_mobilenet_v3_large"]),
    "--classes": ([None, "car", "car,person", "vehicles", "all", "7", "0,7"], ["spaceship", "", "99", "car,,"]),
    "--alpha": ([None, "0", "0.25", "1"], ["1.5", "-0.1", "nan", "half"]),
    "--stride": ([None, "1", "2"], ["0", "-3", "x"]),
    "--batch": ([None, "1", "3"], ["0", "-1"]),
    "--device": ([None, "cpu", "auto"], ["tpu", "cuda:7"]),
    "--input-size": ([None, "32", "40x30"], ["0", "big"]),
    "--mean": ([None, "127.5", "1,2,3"], ["a,b", "1,2"]),
    "--stats": ([None, "s.jsonl", "out/s.jsonl"], ["@blocker/s.jsonl", "%source", "out"]),
    "--save-masks": ([None, "masks"], ["@blocker", "s.jsonl"]),
    "--reconnect": ([None, "0", "3"], ["-1"]),
}
SWITCHES = ["--legend", "--overwrite", "-q", "--no-show"]


def _pick(draw, good_bad):
    good, bad = good_bad
    return draw(st.sampled_from(bad if draw(st.integers(0, 9)) == 0 else good))


@st.composite
def argvs(draw) -> list[str]:
    source = _pick(draw, SOURCES)
    argv = [source]
    for flag, values in FLAGS.items():
        value = _pick(draw, values)
        if value == "%source":
            value = source
        if value is not None:
            argv += [flag, value]
    if "lraspp_mobilenet_v3_large" in argv:
        argv += ["--weights", "@notes.pth"]  # never a download
    argv += draw(st.lists(st.sampled_from(SWITCHES), unique=True, max_size=3))
    if draw(st.integers(0, 19)) == 0:
        argv.append("--bogus-flag")
    if draw(st.booleans()):  # the SOURCE after the options
        argv = argv[1:] + argv[:1]
    return argv


@contextlib.contextmanager
def _in_dir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@fuzz_settings(300)
@given(argv=argvs())
def test_flag_combinations_in_process(inputs: Path, argv: list[str]) -> None:
    from streamseg import cli

    argv = [str(inputs / a[1:]) if a.startswith("@") else a for a in argv]
    logger = logging.getLogger("streamseg")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    before = _snapshot(inputs)
    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as work, _in_dir(Path(work)):
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(argv)
        finally:
            logger.handlers[:], logger.level, logger.propagate = saved
        left = _temp_files(Path(work))
    event(f"exit {code}")
    _check_outcome(code, out.getvalue(), err.getvalue())
    assert left == [], left
    assert _snapshot(inputs) == before


# --------------------------------------------------------------------------- (b) damaged files

# One child process runs many cases: it imports streamseg once, then calls main() per case in the
# case's own directory, with stdout and stderr captured, and prints one JSON line per case.
_HARNESS = textwrap.dedent("""
    import contextlib, io, json, logging, os, sys, time
    from streamseg import cli
    cases = json.load(sys.stdin)
    logger = logging.getLogger("streamseg")
    for case in cases:
        os.chdir(case["cwd"])
        out, err = io.StringIO(), io.StringIO()
        started = time.monotonic()
        print(json.dumps({"start": case["name"]}), flush=True)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(case["argv"])
        except BaseException as exc:  # escaped main(): a bug; report it, do not die
            code = "escaped " + repr(exc)
        logger.handlers[:] = []
        print(json.dumps({"name": case["name"], "code": code, "out": out.getvalue(), "err": err.getvalue(),
                          "seconds": time.monotonic() - started}), flush=True)
""")


def _run_cases(cases: list[dict], *, timeout: float) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-c", _HARNESS], input=json.dumps(cases), capture_output=True,
                              text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        started = [json.loads(line)["start"] for line in (exc.stdout or b"").decode().splitlines() if '"start"' in line]
        pytest.fail(f"hung past {timeout} s on {started[-1:] or 'start-up'}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = [r for r in lines if "code" in r]
    if proc.returncode != 0:
        started = [r["start"] for r in lines if "start" in r]
        pytest.fail(f"the child died (exit {proc.returncode}) on {started[-1:]}:\n{proc.stderr[-3000:]}")
    assert len(results) == len(cases)
    return results


def _damage(data: bytes, edits: list[tuple[int, int, int]], cut: Optional[float]) -> bytes:
    """Overwrite, insert or delete bytes at relative positions; then maybe cut the tail."""
    buf = bytearray(data)
    for where, kind, value in edits:
        if not buf:
            break
        i = where % len(buf)
        if kind == 0:
            buf[i] = value
        elif kind == 1:
            buf[i:i] = bytes([value]) * (1 + value % 7)
        else:
            del buf[i : i + 1 + value % 64]
    if cut is not None:
        buf = buf[: int(len(buf) * cut)]
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 2), st.integers(0, 255)), max_size=12)
cuts = st.none() | st.floats(0.0, 1.0)


@st.composite
def damaged_files(draw, kinds: tuple[str, ...]):
    """(suffix, random bytes, None) or (suffix, None, damage to a real file of that kind)."""
    suffix = draw(st.sampled_from(kinds))
    if draw(st.integers(0, 3)) == 0:
        return suffix, draw(st.binary(max_size=2048)), None
    return suffix, None, (draw(edits), draw(cuts))


ORIGINALS = {"png": "photo.png", "jpg": "photo.jpg", "mp4": "clip.mp4"}


def _materialise(inputs: Path, spec, path: Path) -> Path:
    suffix, data, damage = spec
    if data is None:
        data = _damage((inputs / ORIGINALS[suffix]).read_bytes(), *damage)
    path = path.with_suffix("." + suffix)
    path.write_bytes(data)
    return path


@fuzz_settings(5)
@given(files=st.lists(damaged_files(("png", "jpg")), min_size=25, max_size=25))
def test_damaged_images(inputs: Path, files: list[tuple[str, bytes]]) -> None:
    """25 damaged images in one run: each one works or gets its own error line; the run goes on."""
    with tempfile.TemporaryDirectory(prefix="fuzz-img-") as work:
        work = Path(work)
        (work / "in").mkdir()
        paths = [_materialise(inputs, spec, work / "in" / f"f{i:02d}") for i, spec in enumerate(files)]
        before = _snapshot(work / "in")
        case = {"name": "images", "cwd": str(work),
                "argv": [*map(str, paths), "-m", str(inputs / "tiny.onnx"), "-o", "out", "--stats", "s.jsonl"]}
        (result,) = _run_cases([case], timeout=120)
        assert result["seconds"] < RUN_BOUND_S * 2
        _check_outcome(result["code"], result["out"], result["err"])
        errors = [line for line in result["err"].splitlines() if line.startswith("streamseg: error:")]
        done = [p for p in paths if f"{p}: " in result["out"]]
        assert len(done) + len(errors) == len(paths), result["err"]
        for p in paths:
            outputs = [work / "out" / f"{p.stem}_{kind}.png" for kind in ("overlay", "mask", "labels")]
            assert all(o.is_file() for o in outputs) == (p in done)
        assert _temp_files(work) == []
        assert _snapshot(work / "in") == before
        if (work / "s.jsonl").exists():
            assert len((work / "s.jsonl").read_text().splitlines()) == len(done)


@fuzz_settings(4)
@given(files=st.lists(damaged_files(("mp4",)), min_size=6, max_size=6))
def test_damaged_videos(inputs: Path, files: list[tuple[str, bytes]]) -> None:
    """Damaged MP4s, one run each: a playable output of what could be read, or a clean error."""
    with tempfile.TemporaryDirectory(prefix="fuzz-mp4-") as work:
        work = Path(work)
        cases = []
        for i, spec in enumerate(files):
            cwd = work / f"case{i}"
            cwd.mkdir()
            src = _materialise(inputs, spec, cwd / "input")
            cases.append({"name": f"case{i}", "cwd": str(cwd), "argv": [str(src), "-m", str(inputs / "tiny.onnx"),
                                                                        "-o", "out.mp4", "--stats", "s.jsonl", "-q"]})
        for case, result in zip(cases, _run_cases(cases, timeout=180)):
            cwd = Path(case["cwd"])
            assert result["seconds"] < RUN_BOUND_S, f"{case['name']} took {result['seconds']:.1f} s"
            _check_outcome(result["code"], result["out"], result["err"])
            assert _temp_files(cwd) == []
            if (cwd / "out.mp4").exists():
                with av.open(str(cwd / "out.mp4")) as container:
                    assert sum(1 for _ in container.decode(video=0)) > 0
            else:
                assert result["code"] != 0 or "no frames" in result["err"], result["err"]
