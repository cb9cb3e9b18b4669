"""`streamseg export`: a randomly initialised model of the table goes to ONNX and runs through the
ONNX path with the same labels as torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="streamseg export needs the 'onnx' package")

from streamseg import cli  # noqa: E402
from streamseg.config import ExportOptions  # noqa: E402
from streamseg.export import export_onnx  # noqa: E402
from streamseg.model import TorchModel, spec_from_weights, weights_for  # noqa: E402
from streamseg.postprocess import labels_at  # noqa: E402
from streamseg.preprocess import to_input  # noqa: E402
from streamseg.segmenter import Segmenter  # noqa: E402
from streamseg.types import ModelLoadError, SinkError  # noqa: E402

NAME = "lraspp_mobilenet_v3_large"
W, H = 96, 64  # small: the test is about the path, not the model's quality


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A random-init state dict saved as a local --weights file (no download here)."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).eval()
    path = tmp_path_factory.mktemp("weights") / "lraspp_random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def exported(weights_file: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "lraspp.onnx"
    path = export_onnx(ExportOptions(model=NAME, output=str(out), weights=str(weights_file), input_size=f"{W}x{H}"))
    assert path == out
    return out


def _frame(seed: int = 1) -> np.ndarray:
    """(H, W, 3) uint8 BGR: smooth shapes, so the model sees structure rather than pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([(xx * 2 + yy) % 256, (yy * 3) % 256, (xx * yy) % 256], axis=-1).astype(np.uint8)
    noise = rng.integers(0, 40, size=img.shape, dtype=np.uint8)
    return np.ascontiguousarray(img // 2 + noise)


def test_metadata_comes_from_the_weights(exported: Path):
    model = onnx.load(str(exported))
    meta = {p.key: p.value for p in model.metadata_props}
    weights = weights_for(NAME)
    spec = spec_from_weights(weights)
    assert meta["streamseg.input_size"] == f"{W}x{H}"
    assert tuple(float(v) for v in meta["streamseg.mean"].split(",")) == pytest.approx(spec.mean, abs=1e-3)
    assert tuple(float(v) for v in meta["streamseg.std"].split(",")) == pytest.approx(spec.std, abs=1e-3)
    assert meta["streamseg.categories"].split(",") == list(weights.meta["categories"])
    assert NAME in meta["streamseg.source"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, H, W]


def test_onnx_labels_agree_with_torch(exported: Path, weights_file: Path):
    seg = Segmenter(str(exported), device="cpu", classes="all")
    assert seg.spec.size == (W, H)
    torch_model = TorchModel(NAME, device=torch.device("cpu"), weights_file=str(weights_file))
    frames = [_frame(1), _frame(2)]
    onnx_labels = seg.labels(frames)
    # The same preprocessed input for both: the ONNX file's fixed size. The exported graph stops
    # at the same 1/8-resolution logits as the torch model.
    x = to_input(frames, seg.spec, channels_last=True)
    torch_logits = torch_model.logits(x)
    onnx_logits = seg.model.logits(x)
    assert onnx_logits.shape == torch_logits.shape == (2, 21, H // 8, W // 8)
    assert torch.allclose(onnx_logits, torch_logits, atol=1e-3)
    torch_labels = labels_at(torch_logits, (H, W))
    for a, b in zip(onnx_labels, torch_labels):
        assert a.shape == b.shape == (H, W)
        assert (a == b).mean() > 0.99


def test_cli_runs_an_image_through_the_exported_model(exported: Path, tmp_path: Path):
    import cv2

    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), cv2.resize(_frame(3), (2 * W, 2 * H)))
    code = cli.main([str(image), "--model", str(exported), "-o", str(tmp_path / "out"), "-q"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["frame_labels.png", "frame_mask.png", "frame_overlay.png"]


def test_existing_output_needs_overwrite(exported: Path, weights_file: Path):
    before = exported.read_bytes()
    opts = ExportOptions(model=NAME, output=str(exported), weights=str(weights_file), input_size=f"{W}x{H}")
    with pytest.raises(SinkError, match="--overwrite"):
        export_onnx(opts)
    assert exported.read_bytes() == before
    assert not [p for p in exported.parent.iterdir() if p.name.endswith(".part")]


def test_overwrite_replaces_atomically(weights_file: Path, tmp_path: Path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    export_onnx(ExportOptions(model=NAME, output=str(out), weights=str(weights_file), input_size="64x64", overwrite=True))
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["streamseg.input_size"] == "64x64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_weights_that_do_not_fit_name_the_file(weights_file: Path, tmp_path: Path):
    opts = ExportOptions(model="fcn_resnet50", output=str(tmp_path / "x.onnx"), weights=str(weights_file), input_size="64x64")
    with pytest.raises(ModelLoadError, match="lraspp_random.pth"):
        export_onnx(opts)
    assert not list(tmp_path.iterdir())


def test_cli_export_subcommand(weights_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli.onnx"
    code = cli.main(["export", "-m", NAME, "--weights", str(weights_file), "-o", str(out), "--input-size", "64x48"])
    assert code == 0
    assert out.is_file()
    said = capsys.readouterr()
    assert said.out == f"wrote {out} ({NAME}, ONNX opset 17)\n" and said.err == "", "one line for one file"
    code = cli.main(["export", "-m", NAME, "--weights", str(weights_file), "-o", str(out), "--input-size", "64x48"])
    assert code == 1
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("opset", ["3", "999", "21"])
def test_an_opset_torch_cannot_export_is_a_usage_error_before_any_work(opset: str, weights_file: Path, tmp_path: Path, capfd):
    """Refused in one line before the model is built and traced (which took seconds and then
    printed the traced graph, hundreds of lines); the range is what the installed torch exports."""
    from streamseg.export import supported_opsets

    out = tmp_path / "x.onnx"
    code = cli.main(["export", "-m", NAME, "--weights", str(weights_file), "-o", str(out), "--opset", opset])
    captured = capfd.readouterr()
    assert code == 2
    opsets = supported_opsets()
    assert captured.err.splitlines() == [
        f"streamseg: error: --opset {opset} is not supported: torch {torch.__version__} exports "
        f"opsets {opsets.start} to {opsets.stop - 1}"
    ]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_fails_says_one_line_and_no_graph_dump(weights_file: Path, tmp_path: Path, capfd):
    """Opset 7 is one torch exports, but not these models' bilinear resize: the exporter fails,
    and its C++ side prints the whole graph to stderr. The user sees one line; --debug shows all."""
    args = ["export", "-m", NAME, "--weights", str(weights_file), "-o", str(tmp_path / "x.onnx"), "--input-size",
            "64x48", "--opset", "7"]
    code = cli.main(args)
    captured = capfd.readouterr()
    assert code == 1
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamseg: error: cannot export lraspp_mobilenet_v3_large"), captured.err
    assert "opset 7" in lines[0]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []

    code = cli.main(args + ["--debug"])
    captured = capfd.readouterr()
    assert code == 1
    assert "graph" in captured.err and "Traceback" in captured.err
    assert captured.err.splitlines()[-1] == lines[0]


def test_cli_export_quiet_prints_nothing(weights_file: Path, tmp_path: Path, capsys):
    """`-q` is a general option in the README's table; export takes it too."""
    out = tmp_path / "quiet.onnx"
    code = cli.main(["export", "-m", NAME, "--weights", str(weights_file), "-o", str(out), "--input-size", "64x48", "-q"])
    assert code == 0
    assert capsys.readouterr() == ("", "")
    assert out.is_file()
