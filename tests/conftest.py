"""Shared fixtures: where the shared test data lives, and a helper that runs the CLI for real.

The shared data (pretrained ONNX model, real photos) sits in the repository root's sibling
`shared/`; tests that need it skip with a reason when it is absent.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ONNX_MODEL_NAME = "deeplabv3_mobilenetv2_voc_257.onnx"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The repository root's sibling `shared/` (test data that is not ours to copy in)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared test data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def onnx_model(shared_dir: Path) -> Path:
    """The real pretrained VOC model with streamseg metadata (257x257, 21 classes)."""
    path = shared_dir / "models" / ONNX_MODEL_NAME
    if not path.is_file():
        pytest.skip(f"pretrained ONNX model not found at {path}")
    return path


@pytest.fixture(scope="session")
def media_dir(shared_dir: Path) -> Path:
    """Real photos highway_1.jpg ... highway_6.jpg."""
    path = shared_dir / "media"
    if not (path / "highway_1.jpg").is_file():
        pytest.skip(f"shared media not found at {path}")
    return path


def _run_cli(
    *args: object,
    cwd: Optional[Path] = None,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 120,
    python_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run `python -m streamseg ARGS...` in a subprocess and return what it did (never raises on exit status)."""
    full_env = dict(os.environ)
    # The child must import this checkout's package, wherever the test runs from.
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    full_env.setdefault("PYTHONIOENCODING", "utf-8")
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, *python_args, "-m", "streamseg", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """`run_cli(*args, cwd=None, env=None, timeout=120)` -> CompletedProcess of `python -m streamseg`."""
    return _run_cli


def _make_onnx(
    path: Path,
    *,
    num_classes: int = 21,
    target: Optional[int] = None,
    size: Optional[tuple[int, int]] = None,
    batch: object = "N",
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write a tiny ONNX segmentation model: one 1x1 Conv from 3 channels to `num_classes` logits.

    Every logit is 0 except class `target` (default 7, or 1 for small models), whose logit is the
    normalised red channel: a pixel is labelled `target` exactly when its red value is above the
    mean. `size` (width, height) makes the input shape static; None leaves H and W symbolic.
    `batch` is the batch dimension (1 for a fixed batch, a name for a dynamic one).
    """
    import numpy as np

    onnx = pytest.importorskip("onnx", reason="the onnx package builds the test models")
    from onnx import TensorProto, helper, numpy_helper

    if target is None:
        target = 7 if num_classes > 7 else 1
    weight = np.zeros((num_classes, 3, 1, 1), np.float32)
    weight[target, 0, 0, 0] = 1.0
    bias = np.zeros(num_classes, np.float32)
    h, w = ("H", "W") if size is None else (size[1], size[0])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "weight", "bias"], ["logits"])],
        "tiny_segmenter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, num_classes, h, w])],
        initializer=[numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime the project accepts
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def make_onnx() -> Callable[..., Path]:
    """`make_onnx(path, num_classes=21, target=None, size=None, batch="N", metadata=None)` -> path
    of a tiny ONNX segmentation model (see `_make_onnx`)."""
    return _make_onnx


VOC_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def random_onnx(path: Path, *, width: int = 64, height: int = 48) -> Path:
    """A real ONNX segmentation model, as small as one can be: a 1x1 convolution from RGB to the 21
    VOC classes, with streamseg's preprocessing metadata. Built with the onnx helper API."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).normal(size=(21, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W", "B"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 21, height, width])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.zeros(21, np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    meta = {"streamseg.input_size": f"{width}x{height}", "streamseg.mean": "127.5,127.5,127.5",
            "streamseg.std": "64,64,64", "streamseg.categories": ",".join(VOC_NAMES)}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


@pytest.fixture
def mjpeg_server():
    """Factory for loopback MJPEG cameras (tests/mjpeg.py); all are stopped after the test."""
    from mjpeg import MjpegServer

    servers: list = []

    def make(**kwargs):
        servers.append(MjpegServer(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()
