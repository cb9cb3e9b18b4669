"""The still-image CLI end to end, in a subprocess: files written, console figures, every error case.

Real pixels go through the real pretrained ONNX model (../shared); error cases that need a model
use a tiny ONNX model built here, so they run without ../shared.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

PINK = (147, 20, 255)  # B, G, R
LINE = re.compile(r"^(?P<path>.+): (?P<w>\d+)x(?P<h>\d+)  (?P<classes>.+)$")
CLASS = re.compile(r"(?P<name>\S+) (?P<px>[\d,]+) px \((?P<pct>[\d.]+) %\)")
VOC = (
    "__background__,aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,diningtable,dog,horse,"
    "motorbike,person,pottedplant,sheep,sofa,train,tvmonitor"
)
OFFICIAL = "deeplabv3_resnet101_coco-586e9e4e.pth"


# --------------------------------------------------------------------------- helpers


def console(stdout: str) -> dict[str, dict]:
    """Per-image console lines -> {path: {"size": (w, h), "classes": {name: (pixels, percent)}}}."""
    found = {}
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            classes = {c["name"]: (int(c["px"].replace(",", "")), float(c["pct"])) for c in CLASS.finditer(m["classes"])}
            found[m["path"]] = {"size": (int(m["w"]), int(m["h"])), "classes": classes}
    return found


def assert_clean_error(proc, code: int, *, contains: tuple[str, ...] = ()) -> str:
    """Exit status `code`, one `streamseg: error:` line last on stderr, no traceback."""
    assert proc.returncode == code, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("streamseg: error: "), proc.stderr
    assert sum(line.startswith("streamseg: error:") for line in lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for text in contains:
        assert text in lines[-1], f"{text!r} not in {lines[-1]!r}"
    return lines[-1]


def files_under(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs if d.exists() for p in d.rglob("*") if p.is_file())


def write_image(path: Path, height: int = 48, width: int = 64, seed: int = 0) -> Path:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[:, : width // 2, 2] = 250  # a red left half: the tiny model calls it "car"
    assert cv2.imwrite(str(path), image)
    return path


@pytest.fixture
def tiny_onnx(make_onnx, tmp_path) -> Path:
    """A tiny VOC ONNX model: class 7 (car) wherever red is above 127.5."""
    meta = {
        "streamseg.input_size": "32",
        "streamseg.mean": "127.5,127.5,127.5",
        "streamseg.std": "127.5,127.5,127.5",
        "streamseg.categories": VOC,
    }
    return make_onnx(tmp_path / "tiny_voc.onnx", metadata=meta)


@pytest.fixture(scope="module")
def highway5_run(onnx_model, media_dir, tmp_path_factory, run_cli):
    """`streamseg highway_5.jpg --model <onnx> -o out/ --stats stats.jsonl`, run once for several checks."""
    work = tmp_path_factory.mktemp("highway5")
    proc = run_cli(media_dir / "highway_5.jpg", "--model", onnx_model, "-o", "out/", "--stats", "stats.jsonl", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work, proc


def read_outputs(out: Path, stem: str):
    overlay = cv2.imread(str(out / f"{stem}_overlay.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(out / f"{stem}_mask.png"), cv2.IMREAD_UNCHANGED)
    labels = cv2.imread(str(out / f"{stem}_labels.png"), cv2.IMREAD_UNCHANGED)
    assert overlay is not None and mask is not None and labels is not None
    return overlay, mask, labels


# --------------------------------------------------------------------------- the main job on real pixels


def test_highway5_writes_the_three_pngs(highway5_run, media_dir):
    work, proc = highway5_run
    out = work / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "highway_5_labels.png",
        "highway_5_mask.png",
        "highway_5_overlay.png",
    ]
    image = cv2.imread(str(media_dir / "highway_5.jpg"))
    overlay, mask, labels = read_outputs(out, "highway_5")
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint8  # single channel
    assert int(labels.max()) < 21
    car = labels == 7
    assert car.mean() > 0.005
    # The mask: the car in pink, everything else black.
    assert mask.shape == image.shape
    assert (mask[car] == PINK).all()
    assert (mask[~car] == 0).all()
    # The overlay: the car blended 50/50 with pink, the rest of the photo untouched.
    expected = np.round(0.5 * image[car].astype(np.float64) + 0.5 * np.array(PINK))
    assert np.abs(overlay[car].astype(np.int16) - expected).max() <= 1
    assert np.array_equal(overlay[~car], image[~car])
    # Output files are readable like any file the user creates (umask, not mkstemp's 0600).
    umask = os.umask(0o022)
    os.umask(umask)
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def test_highway5_console_and_stats(highway5_run, media_dir):
    work, proc = highway5_run
    labels = cv2.imread(str(work / "out" / "highway_5_labels.png"), cv2.IMREAD_UNCHANGED)
    cars = int((labels == 7).sum())
    lines = console(proc.stdout)
    assert list(lines) == [str(media_dir / "highway_5.jpg")]
    (info,) = lines.values()
    assert info["size"] == (1280, 720)
    assert info["classes"]["car"][0] == cars
    assert info["classes"]["car"][1] == pytest.approx(100 * cars / labels.size, abs=0.006)
    assert list(info["classes"]) == ["car"]
    records = [json.loads(line) for line in (work / "stats.jsonl").read_text().splitlines()]
    assert len(records) == 1
    rec = records[0]
    assert rec["source"] == str(media_dir / "highway_5.jpg")
    assert (rec["width"], rec["height"]) == (1280, 720)
    assert rec["classes"]["car"]["pixels"] == cars
    assert rec["classes"]["car"]["share"] == pytest.approx(cars / labels.size, abs=1e-6)
    assert not list(work.rglob("*.part"))


def test_legend_and_other_classes(highway5_run, onnx_model, media_dir, run_cli, tmp_path):
    work, _ = highway5_run
    proc = run_cli(media_dir / "highway_5.jpg", "-m", onnx_model, "-o", tmp_path, "--legend", "-c", "car,bus", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # -q prints only warnings and errors
    plain = cv2.imread(str(work / "out" / "highway_5_overlay.png"))
    legend, mask, labels = read_outputs(tmp_path, "highway_5")
    bus = labels == 6
    assert bus.any()  # this small model calls part of the scene a bus (see ../shared/models/README.md)
    assert (mask[bus] != 0).any(axis=1).all() and not (mask[bus] == PINK).all()
    changed = np.argwhere((legend != plain).any(axis=2) & ~bus)
    assert len(changed) > 0
    assert changed[:, 0].max() < 720 // 3 and changed[:, 1].max() < 1280 // 3


def test_several_images_a_directory_and_a_glob(onnx_model, media_dir, run_cli, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in (1, 2, 4):
        shutil.copy(media_dir / f"highway_{i}.jpg", photos)
    (photos / "notes.txt").write_text("not an image, and not picked up from a directory")

    # Several files at once, with stats.
    proc = run_cli(photos / "highway_1.jpg", photos / "highway_2.jpg", "-m", onnx_model, "-o", "a", "--stats", "a.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = console(proc.stdout)
    assert [Path(p).name for p in lines] == ["highway_1.jpg", "highway_2.jpg"]
    assert lines[str(photos / "highway_1.jpg")]["classes"]["car"][1] > 0.5
    assert lines[str(photos / "highway_2.jpg")]["classes"]["car"] == (0, 0.0)
    assert len(files_under(tmp_path / "a")) == 6
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [Path(r["source"]).name for r in records] == ["highway_1.jpg", "highway_2.jpg"]
    for rec in records:
        px, pct = lines[rec["source"]]["classes"]["car"]
        assert rec["classes"]["car"]["pixels"] == px
        assert 100 * rec["classes"]["car"]["share"] == pytest.approx(pct, abs=0.006)

    # A directory: every image in it, in name order.
    proc = run_cli(photos, "-m", onnx_model, "-o", "b", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [Path(p).name for p in console(proc.stdout)] == ["highway_1.jpg", "highway_2.jpg", "highway_4.jpg"]
    assert sorted(p.name for p in files_under(tmp_path / "b")) == sorted(
        f"highway_{i}_{kind}.png" for i in (1, 2, 4) for kind in ("overlay", "mask", "labels")
    )

    # A glob, expanded by streamseg (not by a shell); default output: the current directory.
    proc = run_cli("photos/highway_[14].jpg", "-m", onnx_model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(Path(p).name for p in console(proc.stdout)) == ["highway_1.jpg", "highway_4.jpg"]
    assert sorted(p.name for p in tmp_path.glob("highway_*.png")) == sorted(
        f"highway_{i}_{kind}.png" for i in (1, 4) for kind in ("overlay", "mask", "labels")
    )
    # The same labels whichever way the image was named.
    assert np.array_equal(
        cv2.imread(str(tmp_path / "highway_1_labels.png"), cv2.IMREAD_UNCHANGED),
        cv2.imread(str(tmp_path / "b" / "highway_1_labels.png"), cv2.IMREAD_UNCHANGED),
    )


def test_existing_outputs_need_overwrite_and_flags_beat_metadata(tiny_onnx, run_cli, tmp_path):
    image = write_image(tmp_path / "shot.png")
    assert run_cli(image, "-m", tiny_onnx, "-o", "out", cwd=tmp_path).returncode == 0
    _, _, labels = read_outputs(tmp_path / "out", "shot")
    assert (labels[:, :30] == 7).all()  # the red half, by the model's own metadata (mean 127.5)
    before = {p: p.read_bytes() for p in files_under(tmp_path / "out")}
    proc = run_cli(image, "-m", tiny_onnx, "-o", "out", cwd=tmp_path)
    assert_clean_error(proc, 1, contains=("exists", "--overwrite"))
    assert {p: p.read_bytes() for p in files_under(tmp_path / "out")} == before
    # --mean above every red value: no pixel is red enough for the tiny model's car any more.
    proc = run_cli(image, "-m", tiny_onnx, "-o", "out", "--mean", "255,127.5,127.5", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, mask, labels = read_outputs(tmp_path / "out", "shot")
    assert not (labels == 7).any() and not mask.any()
    assert not list(tmp_path.rglob("*.part"))


def test_onnx_flags_replace_missing_metadata(make_onnx, run_cli, tmp_path):
    bare = make_onnx(tmp_path / "bare.onnx", num_classes=3, target=2)
    image = write_image(tmp_path / "shot.png")
    proc = run_cli(
        image, "-m", bare, "-o", "out", "--input-size", "24", "--mean", "127.5,0,0", "--std", "127.5",
        "--categories", "background,sky,roof", "--classes", "roof", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (info,) = console(proc.stdout).values()
    assert list(info["classes"]) == ["roof"]
    _, _, labels = read_outputs(tmp_path / "out", "shot")
    assert info["classes"]["roof"][0] == int((labels == 2).sum()) > 0
    assert (labels[:, :30] == 2).all()  # the red half


# --------------------------------------------------------------------------- --weights


@pytest.fixture(scope="module")
def lraspp_weights(tmp_path_factory) -> Path:
    import torch

    from streamseg.model import TorchModel

    torch.manual_seed(0)
    net = TorchModel("lraspp_mobilenet_v3_large", device=torch.device("cpu"), pretrained=False).net.model
    path = tmp_path_factory.mktemp("weights") / "lraspp_random.pth"
    torch.save(net.state_dict(), path)
    return path


def test_weights_file_runs_a_torchvision_model(lraspp_weights, run_cli, tmp_path):
    image = write_image(tmp_path / "shot.png", 40, 52)
    proc = run_cli(image, "-m", "lraspp_mobilenet_v3_large", "--weights", lraspp_weights, "-o", "out", "-c", "all", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (info,) = console(proc.stdout).values()
    assert info["size"] == (52, 40)
    _, _, labels = read_outputs(tmp_path / "out", "shot")
    assert labels.shape == (40, 52) and int(labels.max()) < 21
    # With many classes selected, the console lists those present, with their pixel counts.
    from streamseg.model import weights_for

    cats = weights_for("lraspp_mobilenet_v3_large").meta["categories"]
    present = {cats[c]: int((labels == c).sum()) for c in np.unique(labels) if c != 0}
    assert {name: px for name, (px, _) in info["classes"].items()} == present


@pytest.mark.skipif(not hasattr(os, "fork"), reason="an address-space limit needs POSIX (RLIMIT_AS)")
def test_a_very_wide_image_runs_in_bounded_memory(lraspp_weights, tmp_path):
    """A 20000x40 strip. Resized as torchvision resizes (short side 520), the model's input would
    be 260000x520 and the forward pass would ask for tens of GB, ending in "internal error:
    RuntimeError ... can't allocate memory" or the OOM killer. It runs within 8 GB of address
    space, libraries and threads included, and labels every pixel of the strip."""
    import resource

    from conftest import ROOT

    image = write_image(tmp_path / "strip.png", height=40, width=20000)

    def limited() -> None:  # in the child only
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MALLOC_ARENA_MAX"] = "2"  # glibc reserves 64 MB of address space per thread's arena otherwise
    proc = subprocess.run([sys.executable, "-m", "streamseg", image, "-m", "lraspp_mobilenet_v3_large", "--weights",
                           lraspp_weights, "-o", "out", "-c", "all", "--device", "cpu", "--threads", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert proc.returncode == 0, proc.stderr
    (info,) = console(proc.stdout).values()
    assert info["size"] == (20000, 40)
    overlay, mask, labels = read_outputs(tmp_path / "out", "strip")
    assert labels.shape == (40, 20000) and overlay.shape == mask.shape == (40, 20000, 3)
    assert sum(px for px, _ in info["classes"].values()) == int((labels != 0).sum())


def test_an_image_too_thin_for_the_model_is_one_error_and_the_others_run(tiny_onnx, run_cli, tmp_path):
    """The tiny model's input is 32 pixels on its short side, 8 x 32 x 32 pixels at most: a 6000x1
    line still fits (6000x1), a 10000x1 one cannot keep its shape in it. That one is named in
    one line; the images around it are written."""
    thin = write_image(tmp_path / "thin.png", height=1, width=10000)
    line = write_image(tmp_path / "line.png", height=1, width=6000)
    shot = write_image(tmp_path / "shot.png")
    proc = run_cli(line, thin, shot, "-m", tiny_onnx, "-o", "out", "-c", "car", cwd=tmp_path)
    assert proc.returncode == 1
    (error,) = proc.stderr.splitlines()
    assert error == (f"streamseg: error: image '{thin}': a 10000x1 picture is too long and thin to segment: in the "
                     "model's input of at most 8,192 pixels it would be less than 1 pixel tall")
    assert not list((tmp_path / "out").glob("thin_*"))
    for stem, width in (("line", 6000), ("shot", 64)):
        _, _, labels = read_outputs(tmp_path / "out", stem)
        assert (labels[:, : width // 2] == 7).all()  # the red half is the tiny model's car


def _weights_error(run_cli, tmp_path, weights: Path, model: str = "lraspp_mobilenet_v3_large", code: int = 1) -> str:
    image = write_image(tmp_path / "shot.png")
    proc = run_cli(image, "-m", model, "--weights", weights, "-o", "out", cwd=tmp_path)
    message = assert_clean_error(proc, code)
    assert files_under(tmp_path / "out") == []
    assert not list(tmp_path.rglob("*.part"))
    return message


def test_weights_official_name_wrong_bytes(run_cli, tmp_path):
    fake = tmp_path / OFFICIAL
    fake.write_bytes(b"\x00" * 4096)
    message = _weights_error(run_cli, tmp_path, fake, model="deeplabv3_resnet101")
    assert "sha256" in message and "586e9e4e" in message and OFFICIAL in message


def test_weights_text_file(run_cli, tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("model = good\n")
    assert "cannot be loaded as a state dict" in _weights_error(run_cli, tmp_path, text)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_weights_pickle_that_runs_code_is_refused(run_cli, tmp_path):
    import torch

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"classifier.weight": _RunsCode(marker)}, evil)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_RunsCode(control)))  # plain pickle really would run it
    assert control.exists()
    message = _weights_error(run_cli, tmp_path, evil)
    assert "evil.pth" in message
    assert not marker.exists()


def test_weights_of_another_model(run_cli, tmp_path):
    import torch

    from streamseg.model import TorchModel

    other = TorchModel("deeplabv3_mobilenet_v3_large", device=torch.device("cpu"), pretrained=False).net.model
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    assert "does not fit model lraspp_mobilenet_v3_large" in _weights_error(run_cli, tmp_path, path)


def test_offline_download_error(run_cli, tmp_path):
    """No network (forced with a proxy nobody listens on): one clear line, no traceback, no junk in the cache."""
    torch_home = tmp_path / "torch_home"
    torch_home.mkdir()
    image = write_image(tmp_path / "shot.png")
    dead = "http://127.0.0.1:9"
    env = {"TORCH_HOME": str(torch_home), "NO_PROXY": "", "no_proxy": ""}
    env.update({k: dead for k in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")})
    start = time.monotonic()
    proc = run_cli(image, "-o", "out", cwd=tmp_path, env=env, timeout=180)
    assert time.monotonic() - start < 90
    message = assert_clean_error(proc, 1)
    cache = torch_home / "hub" / "checkpoints"
    for text in (OFFICIAL, f"https://download.pytorch.org/models/{OFFICIAL}", str(cache), "--weights"):
        assert text in message, f"{text!r} missing from {message!r}"
    assert files_under(torch_home) == []  # no half-downloaded file left in the cache
    assert files_under(tmp_path / "out") == []


def test_a_failed_run_keeps_the_earlier_stats_file(onnx_model, media_dir, run_cli, tmp_path):
    """A run that writes no stats line (every image fails) leaves an earlier stats file as it was,
    even with --overwrite, and creates no empty one that the next run would refuse to replace."""
    proc = run_cli(media_dir / "highway_1.jpg", media_dir / "highway_4.jpg", "-m", onnx_model, "-o", "out",
                   "--stats", "stats.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    earlier = (tmp_path / "stats.jsonl").read_text()
    assert len(earlier.splitlines()) == 2
    (tmp_path / "text.png").write_text("this is text, not a PNG\n")

    proc = run_cli("text.png", "-m", onnx_model, "-o", "out", "--stats", "stats.jsonl", "--overwrite", cwd=tmp_path)
    assert_clean_error(proc, 1, contains=("text.png", "could not be decoded"))
    assert (tmp_path / "stats.jsonl").read_text() == earlier

    proc = run_cli("text.png", "-m", onnx_model, "-o", "out", "--stats", "new.jsonl", cwd=tmp_path)
    assert_clean_error(proc, 1, contains=("text.png",))
    assert not (tmp_path / "new.jsonl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]

    # Nothing stands in the way of the next run, without --overwrite.
    proc = run_cli(media_dir / "highway_1.jpg", "-m", onnx_model, "-o", "out2", "--stats", "new.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "new.jsonl").read_text().splitlines()) == 1


def test_an_existing_directory_named_like_an_image_is_an_output_directory(tiny_onnx, run_cli, tmp_path):
    """`-o result.png` is refused (it would become a directory), but a directory of that name
    that the user already made is taken as the output directory it is."""
    good = write_image(tmp_path / "good.png")
    proc = run_cli(good, "-m", tiny_onnx, "-o", "result.png", cwd=tmp_path)
    assert_clean_error(proc, 2, contains=("-o", "directory", "result.png"))
    assert not (tmp_path / "result.png").exists()
    (tmp_path / "result.png").mkdir()
    proc = run_cli(good, "-m", tiny_onnx, "-o", "result.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "result.png").iterdir()) == ["good_labels.png", "good_mask.png", "good_overlay.png"]


# --------------------------------------------------------------------------- errors (issue point 9)


@pytest.fixture
def error_inputs(tmp_path, tiny_onnx) -> dict[str, Path]:
    """Everything the error cases need, in tmp_path."""
    (tmp_path / "notes.png").write_text("this is text, not a PNG\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "fake.onnx").write_bytes(b"PK\x03\x04 not an onnx protobuf")
    (tmp_path / "blocker").write_text("a file where the output directory should go")
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "readme.txt").write_text("x")
    return {"good": write_image(tmp_path / "good.png"), "onnx": tiny_onnx}


def _case_args(case: tuple, inputs: dict[str, Path]) -> list[str]:
    return [str(inputs.get(a[1:], a)) if a.startswith("@") else a for a in case]


# (arguments, exit status, text the message must name); "@good" and "@onnx" are filled in.
ERROR_CASES = [
    (("missing.jpg", "-m", "@onnx"), 1, "missing.jpg"),
    (("notes.png", "-m", "@onnx"), 1, "notes.png"),  # a text file named .png
    (("empty.jpg", "-m", "@onnx"), 1, "empty.jpg"),
    (("no_images", "-m", "@onnx"), 1, "no_images"),
    (("nothing_*.png", "-m", "@onnx"), 1, "nothing_*.png"),
    (("@good", "-m", "deeplabv5"), 2, "deeplabv5"),
    (("@good", "-m", "missing.onnx"), 1, "missing.onnx"),
    (("@good", "-m", "fake.onnx"), 1, "fake.onnx"),  # not an ONNX file
    (("@good", "-m", "@onnx", "--classes", "car,spaceship"), 2, "spaceship"),
    (("@good", "-m", "@onnx", "--classes", "99"), 2, "99"),
    (("@good", "-m", "@onnx", "--alpha", "1.5"), 2, "--alpha"),
    (("@good", "-m", "@onnx", "--alpha", "half"), 2, "half"),
    (("@good", "-m", "@onnx", "--device", "tpu"), 2, "tpu"),
    (("@good", "-m", "@onnx", "--bogus-flag"), 2, "--bogus-flag"),
    (("@good", "-m", "@onnx", "--input-size", "big"), 2, "big"),
    (("@good", "--mean", "1,2,3"), 2, "ONNX"),
    (("@good", "-m", "@onnx", "--weights", "@good"), 2, "--weights"),
    (("@good", "-m", "@onnx", "--stride", "0"), 2, "--stride"),
    (("@good", "-m", "@onnx", "--threads", "0"), 2, "--threads"),
    (("@good", "-m", "@onnx", "--crf", "60"), 2, "--crf"),
    (("@good", "-m", "@onnx", "--preset", "warp"), 2, "warp"),
    (("@good", "-m", "@onnx", "-o", "blocker"), 1, "blocker"),  # the output directory is a file
    (("@good", "-m", "@onnx", "-o", "blocker/sub"), 1, "blocker/sub"),  # ... or below a file
]
# The ones a user meets most, each also run for real in a subprocess (each costs a torch import).
SUBPROCESS_CASES = {"missing.jpg", "notes.png", "deeplabv5", "fake.onnx", "spaceship", "--alpha", "blocker"}


def _check_no_outputs(tmp_path: Path) -> None:
    left = [p for p in files_under(tmp_path) if p.name.endswith(("_overlay.png", "_mask.png", "_labels.png", ".part"))]
    assert left == [], f"left behind: {left}"
    assert (tmp_path / "blocker").read_text() == "a file where the output directory should go"


@pytest.fixture
def main_in_process(capsys):
    """streamseg.cli.main(argv) in this process: the same code as the console script, without
    paying a torch import per case. Restores the logging set-up main() installs."""
    import logging
    import subprocess

    from streamseg import cli

    logger = logging.getLogger("streamseg")
    saved = (logger.handlers[:], logger.level, logger.propagate)

    def call(args, *, cwd: Path):
        old = Path.cwd()
        os.chdir(cwd)
        try:
            code = cli.main(list(args))
        finally:
            os.chdir(old)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    yield call
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_every_error_case_in_process(error_inputs, main_in_process, tmp_path):
    for case, code, needle in ERROR_CASES:
        args = _case_args(case, error_inputs)
        if "-o" not in args:
            args += ["-o", "out"]
        proc = main_in_process(args, cwd=tmp_path)
        assert_clean_error(proc, code, contains=(needle,))
        _check_no_outputs(tmp_path)


@pytest.mark.parametrize("case, code, needle", [c for c in ERROR_CASES if c[2] in SUBPROCESS_CASES], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_error_case_in_a_subprocess(error_inputs, run_cli, tmp_path, case, code, needle):
    args = _case_args(case, error_inputs)
    if "-o" not in args:
        args += ["-o", "out"]
    proc = run_cli(*args, cwd=tmp_path)
    assert_clean_error(proc, code, contains=(needle,))
    _check_no_outputs(tmp_path)


def test_video_only_flags_on_an_image_hint_only_where_it_fits(error_inputs, main_in_process, tmp_path):
    """The pointer to <name>_labels.png answers --save-masks; after --show or --stride it was noise."""
    args = [str(error_inputs["good"]), "-m", str(error_inputs["onnx"]), "-o", "out"]
    line = assert_clean_error(main_in_process(args + ["--show"], cwd=tmp_path), 2,
                              contains=("--show applies to videos, cameras and streams, not to still images",))
    assert "label map" not in line, line
    assert_clean_error(main_in_process(args + ["--stride", "2", "--save-masks", "m"], cwd=tmp_path), 2,
                       contains=("--save-masks, --stride apply to", "each image's label map is <name>_labels.png"))
    _check_no_outputs(tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.skipif(os.name == "nt", reason="chmod 000 does not lock a file on Windows")
def test_unreadable_image(tiny_onnx, main_in_process, tmp_path):
    locked = write_image(tmp_path / "locked.png")
    locked.chmod(0)
    try:
        proc = main_in_process([str(locked), "-m", str(tiny_onnx), "-o", "out"], cwd=tmp_path)
    finally:
        locked.chmod(0o644)
    assert_clean_error(proc, 1, contains=("locked.png",))
    assert files_under(tmp_path / "out") == []


def test_absent_cuda_device(tiny_onnx, main_in_process, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [str(write_image(tmp_path / "a.png")), "-m", str(tiny_onnx), "--device", "cuda", "-o", "out"]
    assert_clean_error(main_in_process(args, cwd=tmp_path), 1, contains=("cuda",))


def test_missing_onnx_metadata_names_the_flags(make_onnx, main_in_process, tmp_path):
    bare = make_onnx(tmp_path / "bare.onnx")
    proc = main_in_process([str(write_image(tmp_path / "a.png")), "-m", str(bare), "-o", "out"], cwd=tmp_path)
    message = assert_clean_error(proc, 1)
    for key in ("input_size", "mean", "std", "categories"):
        assert f"streamseg.{key}" in message
    for flag in ("--input-size", "--mean", "--std", "--categories"):
        assert flag in message
    assert files_under(tmp_path / "out") == []


def test_one_bad_image_among_good_ones(tiny_onnx, run_cli, tmp_path):
    good = write_image(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_text("text")
    proc = run_cli(good, bad, "-m", tiny_onnx, "-o", "out", cwd=tmp_path)
    assert_clean_error(proc, 1, contains=("bad.png",))
    assert sorted(p.name for p in files_under(tmp_path / "out")) == ["good_labels.png", "good_mask.png", "good_overlay.png"]
    assert list(console(proc.stdout)) == [str(good)]


def test_debug_shows_the_traceback(run_cli, tmp_path):
    proc = run_cli(write_image(tmp_path / "a.png"), "-m", tmp_path / "missing.onnx", "-o", "out", "--debug", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("streamseg: error: ")


# --------------------------------------------------------------------------- fast paths


def _imported(stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_do_not_import_torch(run_cli, flag):
    proc = run_cli(flag, python_args=("-X", "importtime"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    modules = _imported(proc.stderr)
    assert "streamseg.cli" in modules  # the measurement works
    heavy = {m for m in modules if m.split(".")[0] in ("torch", "torchvision", "onnxruntime", "cv2")}
    assert not heavy, f"{flag} imports {sorted(heavy)[:5]}"
    if flag == "--version":
        from streamseg import __version__

        assert proc.stdout.strip() == f"streamseg {__version__}"
    else:
        for text in ("SOURCE", "--weights", "--classes", "--alpha", "deeplabv3_resnet101", "lraspp_mobilenet_v3_large"):
            assert text in proc.stdout
