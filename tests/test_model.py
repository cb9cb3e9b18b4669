"""model.py: the model table with random weights, weights-file loading, devices, ONNX metadata.

torchvision's pretrained weights cannot be downloaded here, so torchvision models are built with
random initialisation and fed tiny inputs (torchvision's own model tests do the same).
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamseg import config
from streamseg.model import MODELS, OnnxModel, TorchModel, load_state_dict, resolve_device, weights_for
from streamseg.preprocess import InputSpec, to_input
from streamseg.types import DeviceError, ModelLoadError, UsageError

CPU = torch.device("cpu")
VOC_METADATA_KEYS = ("streamseg.input_size", "streamseg.mean", "streamseg.std", "streamseg.categories")


def _frame(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def lraspp_state(tmp_path_factory) -> Path:
    """A random-init state dict of the cheapest model, saved as an ordinary .pth file."""
    torch.manual_seed(0)
    net = TorchModel("lraspp_mobilenet_v3_large", device=CPU, pretrained=False).net.model
    path = tmp_path_factory.mktemp("weights") / "lraspp_random.pth"
    torch.save(net.state_dict(), path)
    return path


# --------------------------------------------------------------------------- the table


def test_config_duplicates_the_model_table():
    assert config.MODEL_NAMES == tuple(MODELS)
    assert config.DEFAULT_MODEL == "deeplabv3_resnet101" == next(iter(MODELS))


def test_table_is_what_the_issue_lists():
    assert set(MODELS) == {
        "deeplabv3_resnet101",
        "deeplabv3_resnet50",
        "deeplabv3_mobilenet_v3_large",
        "lraspp_mobilenet_v3_large",
        "fcn_resnet50",
        "fcn_resnet101",
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_random_init_predicts_uint8_labels(name):
    torch.manual_seed(0)
    model = TorchModel(name, device=CPU, pretrained=False)
    weights = weights_for(name)
    assert model.categories == tuple(weights.meta["categories"])
    assert len(model.categories) == 21
    assert model.spec.size == 520
    assert model.precision == "fp32" and model.dtype == torch.float32
    # The official checkpoints' auxiliary head is dropped for inference.
    assert getattr(model.net.model, "aux_classifier", None) is None
    # A tiny input keeps the ResNet-101 models cheap; the spec's mean/std are the weights' own.
    small = InputSpec(size=40, mean=model.spec.mean, std=model.spec.std)
    frames = [_frame(48, 64, seed=1), _frame(48, 64, seed=2)]
    x = to_input(frames, small, channels_last=model.channels_last)
    assert x.shape == (2, 3, 40, 53)
    logits = model.logits(x)
    # Logits at the model's output stride (1/8, or 1/16 for the MobileNet DeepLabV3), before
    # torchvision's resize to the input size: resized as torchvision resizes them, they are
    # torchvision's own output.
    stride = 16 if name == "deeplabv3_mobilenet_v3_large" else 8
    assert logits.shape == (2, 21, -(-40 // stride), -(-53 // stride))
    with torch.inference_mode():
        full = model.net.model(x)["out"]
    resized = F.interpolate(logits, size=(40, 53), mode="bilinear", align_corners=False)
    assert torch.allclose(resized, full, atol=1e-4)
    labels = model.predict(x)
    assert labels.shape == logits.shape[:1] + logits.shape[2:]
    assert labels.dtype == torch.uint8
    assert int(labels.max()) < 21
    assert torch.equal(labels, logits.argmax(1).to(torch.uint8))


def test_unknown_model_name_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown model 'deeplabv4'.*deeplabv3_resnet101"):
        TorchModel("deeplabv4", device=CPU, pretrained=False)


def test_bf16_on_cpu():
    model = TorchModel("lraspp_mobilenet_v3_large", device=CPU, precision="bf16", pretrained=False)
    small = InputSpec(size=32, mean=model.spec.mean, std=model.spec.std)
    labels = model.predict(to_input([_frame()], small, dtype=model.dtype, channels_last=True))
    assert labels.dtype == torch.uint8 and labels.shape == (1, 4, 6)


# --------------------------------------------------------------------------- --compile


@pytest.mark.slow
def test_compiled_model_gives_the_eager_logits():
    """--compile runs torch.compile's graph (on the CPU: C++ built by inductor), with the same
    weights and nearly the same numbers as the eager model."""
    torch.manual_seed(0)
    eager = TorchModel("lraspp_mobilenet_v3_large", device=CPU, pretrained=False)
    torch.manual_seed(0)
    compiled = TorchModel("lraspp_mobilenet_v3_large", device=CPU, pretrained=False, compile=True)
    small = InputSpec(size=64, mean=eager.spec.mean, std=eager.spec.std)
    x = to_input([_frame()], small, channels_last=True)
    want, got = eager.logits(x), compiled.logits(x)
    assert compiled.compiled and not eager.compiled  # not the fallback
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_compile_where_it_cannot_compile_runs_uncompiled(lraspp_state, run_cli, tmp_path):
    """No working C++ compiler (inductor's CPU backend needs one): one warning, and the run
    writes what it would have written without --compile."""
    import cv2

    image = tmp_path / "shot.png"
    cv2.imwrite(str(image), _frame(48, 64))
    env = {"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    args = (image, "-m", "lraspp_mobilenet_v3_large", "--weights", lraspp_state, "-c", "all")
    proc = run_cli(*args, "--compile", "-o", "compiled", cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    warnings_ = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(warnings_) == 1 and "--compile: torch.compile failed" in warnings_[0], proc.stderr
    assert "Traceback" not in proc.stderr
    plain = run_cli(*args, "-o", "plain", cwd=tmp_path, timeout=300)
    assert plain.returncode == 0, plain.stderr
    for name in ("shot_labels.png", "shot_mask.png", "shot_overlay.png"):
        assert (tmp_path / "compiled" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


# --------------------------------------------------------------------------- devices


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_absent_cuda_is_a_clear_error(name):
    with pytest.raises(DeviceError, match=f"'{name}'.*not available"):
        resolve_device(name)


@pytest.mark.skipif(
    bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()), reason="this machine has MPS"
)
def test_absent_mps_is_a_clear_error():
    with pytest.raises(DeviceError, match="mps"):
        resolve_device("mps")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_missing_cuda_index_is_a_clear_error():
    with pytest.raises(DeviceError, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


# --------------------------------------------------------------------------- weights files


def test_weights_file_loads_into_the_model(lraspp_state):
    model = TorchModel("lraspp_mobilenet_v3_large", device=CPU, weights_file=str(lraspp_state))
    saved = torch.load(lraspp_state, weights_only=True)
    loaded = model.net.model.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_training_checkpoint_wrapping_is_accepted(lraspp_state, tmp_path):
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"model": torch.load(lraspp_state, weights_only=True), "epoch": 3}, wrapped)
    assert set(load_state_dict(str(wrapped))) == set(torch.load(lraspp_state, weights_only=True))


def test_weights_with_aux_head_load_and_drop_it(tmp_path):
    torch.manual_seed(0)
    import torchvision.models.segmentation as seg

    net = seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    path = tmp_path / "with_aux.pth"
    torch.save(net.state_dict(), path)
    model = TorchModel("deeplabv3_mobilenet_v3_large", device=CPU, weights_file=str(path))
    assert model.net.model.aux_classifier is None
    assert torch.equal(model.net.model.classifier[4].weight, net.classifier[4].weight)


def test_official_name_with_other_bytes_fails_the_sha256_check(tmp_path):
    fake = tmp_path / "deeplabv3_resnet101_coco-586e9e4e.pth"
    torch.save({"w": torch.zeros(3)}, fake)
    with pytest.raises(ModelLoadError, match="sha256") as info:
        load_state_dict(str(fake), official=weights_for("deeplabv3_resnet101"))
    assert "586e9e4e" in str(info.value)


def test_hashed_name_that_matches_is_accepted(lraspp_state, tmp_path):
    digest = hashlib.sha256(lraspp_state.read_bytes()).hexdigest()
    named = tmp_path / f"lraspp_mobilenet_v3_large_coco-{digest[:8]}.pth"
    named.write_bytes(lraspp_state.read_bytes())
    assert set(load_state_dict(str(named), official=weights_for("lraspp_mobilenet_v3_large")))


def test_text_file_is_a_clean_error(tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(ModelLoadError, match="cannot be loaded as a state dict"):
        load_state_dict(str(text))


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_state_dict(str(tmp_path / "nope.pth"))


class _RunsCode:
    """Unpickling this with plain pickle would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"weight": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    # The test can fail: plain pickle really would run the code.
    pickle.loads(pickle.dumps(_RunsCode(tmp_path / "control")))
    assert (tmp_path / "control").exists()
    with pytest.raises(ModelLoadError, match="cannot be loaded as a state dict"):
        load_state_dict(str(path))
    assert not marker.exists()


def test_non_tensor_values_are_refused(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"w": torch.zeros(2), "note": "hello"}, path)
    with pytest.raises(ModelLoadError, match="state dict of tensors"):
        load_state_dict(str(path))


def test_state_dict_of_another_model_does_not_fit(tmp_path):
    torch.manual_seed(0)
    other = TorchModel("deeplabv3_mobilenet_v3_large", device=CPU, pretrained=False).net.model
    path = tmp_path / "deeplab_mobilenet.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ModelLoadError, match="does not fit model lraspp_mobilenet_v3_large") as info:
        TorchModel("lraspp_mobilenet_v3_large", device=CPU, weights_file=str(path))
    # One line that says what differs, not torch's header alone ("... for LRASPP:").
    message = str(info.value)
    assert "\n" not in message and not message.endswith(":"), message
    assert "10 missing tensors (classifier.cbr.0.weight, ...); " in message, message
    assert "unexpected tensors (classifier.0.convs.0.0.weight, ...)" in message, message


def test_state_dict_with_other_shapes_names_the_first(lraspp_state, tmp_path):
    state = torch.load(lraspp_state, weights_only=True)
    state["classifier.low_classifier.bias"] = torch.zeros(3)
    path = tmp_path / "other_shapes.pth"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"does not fit model lraspp_mobilenet_v3_large: size mismatch for "
                                             r"classifier\.low_classifier\.bias: .*torch\.Size\(\[3\]\)"):
        TorchModel("lraspp_mobilenet_v3_large", device=CPU, weights_file=str(path))


def test_broken_cached_download_names_the_file(tmp_path, monkeypatch):
    """A damaged file in torchvision's cache: the error says which file to delete."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = weights_for("lraspp_mobilenet_v3_large")
    cached = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated download")
    with pytest.raises(ModelLoadError) as info:
        TorchModel("lraspp_mobilenet_v3_large", device=CPU)
    message = str(info.value)
    assert str(cached) in message and "delete it" in message and "--weights" in message


# --------------------------------------------------------------------------- ONNX


def _voc_metadata(**changes: str) -> dict[str, str]:
    cats = weights_for("deeplabv3_resnet101").meta["categories"]
    meta = {
        "streamseg.input_size": "64x48",
        "streamseg.mean": "127.5,127.5,127.5",
        "streamseg.std": "127.5",
        "streamseg.categories": ",".join(cats),
    }
    meta.update(changes)
    return meta


def test_onnx_metadata_gives_the_spec(make_onnx, tmp_path):
    path = make_onnx(tmp_path / "m.onnx", metadata=_voc_metadata())
    model = OnnxModel(str(path), device=CPU)
    assert model.spec == InputSpec(size=(64, 48), mean=(127.5,) * 3, std=(127.5,) * 3)
    assert model.categories == tuple(weights_for("deeplabv3_resnet101").meta["categories"])
    assert model.precision == "fp32" and model.device == CPU


def test_onnx_shorter_side_metadata(make_onnx, tmp_path):
    path = make_onnx(tmp_path / "m.onnx", metadata=_voc_metadata(**{"streamseg.input_size": "32"}))
    model = OnnxModel(str(path), device=CPU)
    assert model.spec.size == 32
    x = to_input([_frame(96, 128)], model.spec)
    assert model.predict(x).shape == (1, 32, 42)


def test_onnx_predict_follows_the_preprocessing(make_onnx, tmp_path):
    """Class 7 exactly where red is above the mean: mean and colour order reach the model."""
    path = make_onnx(tmp_path / "m.onnx", metadata=_voc_metadata(**{"streamseg.mean": "100,0,0"}))
    model = OnnxModel(str(path), device=CPU)
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:, :32, 2] = 200  # red (BGR channel 2) on the left half
    frame[:, 32:, 0] = 200  # blue on the right half
    labels = model.predict(to_input([frame], model.spec))[0].numpy()
    assert labels.dtype == np.uint8
    assert (labels[:, :30] == 7).all()
    assert (labels[:, 34:] == 0).all()


@pytest.mark.parametrize("batch", [1, "N"])
def test_onnx_batches(make_onnx, tmp_path, batch):
    path = make_onnx(tmp_path / "m.onnx", batch=batch, size=(64, 48), metadata=_voc_metadata())
    model = OnnxModel(str(path), device=CPU)
    frames = [_frame(seed=1), _frame(seed=2), _frame(seed=3)]
    together = model.predict(to_input(frames, model.spec))
    assert together.shape == (3, 48, 64)
    for i, f in enumerate(frames):
        assert torch.equal(together[i], model.predict(to_input([f], model.spec))[0])


def test_onnx_without_metadata_names_everything_missing(make_onnx, tmp_path):
    path = make_onnx(tmp_path / "bare.onnx")
    with pytest.raises(ModelLoadError) as info:
        OnnxModel(str(path), device=CPU)
    message = str(info.value)
    for key, flag in zip(VOC_METADATA_KEYS, ("--input-size", "--mean", "--std", "--categories")):
        assert key in message and flag in message


def test_onnx_static_shape_stands_in_for_input_size(make_onnx, tmp_path):
    path = make_onnx(tmp_path / "static.onnx", size=(64, 48))
    with pytest.raises(ModelLoadError) as info:
        OnnxModel(str(path), device=CPU)
    message = str(info.value)
    assert "streamseg.input_size" not in message
    assert "streamseg.mean" in message and "streamseg.categories" in message


def test_onnx_partly_missing_metadata(make_onnx, tmp_path):
    meta = _voc_metadata()
    del meta["streamseg.std"]
    path = make_onnx(tmp_path / "nostd.onnx", metadata=meta)
    with pytest.raises(ModelLoadError, match=r"lacks preprocessing metadata: streamseg\.std \(--std\); "):
        OnnxModel(str(path), device=CPU)


def test_onnx_flags_override_metadata(make_onnx, tmp_path):
    path = make_onnx(tmp_path / "m.onnx", num_classes=3, metadata=_voc_metadata(**{"streamseg.categories": "x,y,z"}))
    model = OnnxModel(
        str(path), device=CPU, input_size=(40, 30), mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0),
        categories=["background", "road", "sky"],
    )
    assert model.spec == InputSpec(size=(40, 30), mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0))
    assert model.categories == ("background", "road", "sky")


def test_onnx_flags_replace_missing_metadata(make_onnx, tmp_path):
    path = make_onnx(tmp_path / "bare.onnx", num_classes=2)
    model = OnnxModel(str(path), device=CPU, input_size=24, mean=(0, 0, 0), std=(1, 1, 1), categories=["bg", "fg"])
    assert model.spec.size == 24 and model.categories == ("bg", "fg")


def test_onnx_category_count_must_match_the_output(make_onnx, tmp_path):
    path = make_onnx(tmp_path / "m.onnx", num_classes=21, metadata=_voc_metadata())
    with pytest.raises(ModelLoadError, match="21"):
        OnnxModel(str(path), device=CPU, categories=["background", "car"])


def test_onnx_input_size_must_fit_a_static_input(make_onnx, tmp_path):
    path = make_onnx(tmp_path / "static.onnx", size=(64, 48), metadata=_voc_metadata())
    with pytest.raises(ModelLoadError, match="64x48"):
        OnnxModel(str(path), device=CPU, input_size=(100, 100))


def test_onnx_bad_metadata_value(make_onnx, tmp_path):
    path = make_onnx(tmp_path / "m.onnx", metadata=_voc_metadata(**{"streamseg.mean": "grey"}))
    with pytest.raises((ModelLoadError, ValueError), match="grey"):
        OnnxModel(str(path), device=CPU)


def test_not_an_onnx_file(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a usable ONNX model"):
        OnnxModel(str(fake), device=CPU)


def test_missing_onnx_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxModel(str(tmp_path / "missing.onnx"), device=CPU)


def test_real_onnx_model_metadata(onnx_model):
    model = OnnxModel(str(onnx_model), device=CPU)
    assert model.spec == InputSpec(size=(257, 257), mean=(127.5,) * 3, std=(127.5,) * 3)
    assert model.categories == tuple(weights_for("deeplabv3_resnet101").meta["categories"])
    assert model.categories[7] == "car"
    assert model.fixed_batch
