"""segmenter.py: frame in, Segmentation out, with random-init torchvision models and the real ONNX model."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from streamseg import Segmenter
from streamseg.model import weights_for
from streamseg.preprocess import to_input
from streamseg.types import Frame, ModelLoadError, Segmentation, UsageError

CARS_EXPECTED = (1, 4, 5, 6)
NO_CARS = (2,)


def _frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def lraspp() -> Segmenter:
    """The cheapest torchvision model, randomly initialised (no download)."""
    torch.manual_seed(0)
    return Segmenter("lraspp_mobilenet_v3_large", device="cpu", classes="vehicles,person", pretrained=False)


@pytest.fixture(scope="module")
def onnx_seg(onnx_model) -> Segmenter:
    return Segmenter(str(onnx_model), device="cpu", classes="car")


@pytest.fixture(scope="module")
def highway(media_dir) -> dict[int, np.ndarray]:
    images = {i: cv2.imread(str(media_dir / f"highway_{i}.jpg")) for i in range(1, 7)}
    assert all(im is not None for im in images.values())
    return images


# --------------------------------------------------------------------------- torchvision, random init


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_random_init_segmenter_labels_at_frame_resolution(name, lraspp):
    if name == lraspp.model.name:
        seg = lraspp
    else:
        torch.manual_seed(0)
        seg = Segmenter(name, device="cpu", classes="vehicles,person", pretrained=False)
    assert seg.categories == tuple(weights_for(name).meta["categories"])
    assert seg.selected == (2, 6, 7, 14, 19, 15)
    assert seg.palette.shape == (256, 3)
    frame = _frame(61, 97)
    result = seg(frame)
    assert isinstance(result, Segmentation)
    assert result.labels.shape == frame.shape[:2]
    assert result.labels.dtype == np.uint8
    assert int(result.labels.max()) < 21
    assert result.categories == seg.categories
    assert set(result.shares) == {"bicycle", "bus", "car", "motorbike", "train", "person"}
    assert all(0.0 <= v <= 1.0 for v in result.shares.values())


def test_labels_are_the_argmax_of_logits_resized_to_the_frame(lraspp):
    frame = _frame(50, 60, seed=3)
    x = to_input([frame], lraspp.spec, channels_last=True)
    logits = lraspp.model.logits(x)
    assert logits.shape[-2:] == (65, 78)  # 1/8 of the 520x624 input
    expected = F.interpolate(logits, size=(50, 60), mode="bilinear", align_corners=False).argmax(1)[0].numpy()
    assert (lraspp(frame).labels == expected).mean() > 0.999  # equal but for float ties


def test_labels_match_the_classic_two_step_route(lraspp):
    """torchvision's forward (logits resized to the 520-pixel input), argmax, then a nearest resize
    to the frame: the classic script's answer. streamseg's one-step answer differs only along
    class borders."""
    frame = cv2.resize(_frame(50, 60, seed=3), (120, 100), interpolation=cv2.INTER_LINEAR)
    x = to_input([frame], lraspp.spec, channels_last=True)
    with torch.inference_mode():
        classic = lraspp.model.net.model(x)["out"].argmax(1)[0].to(torch.uint8).numpy()
    classic = cv2.resize(classic, (120, 100), interpolation=cv2.INTER_NEAREST_EXACT)
    assert (lraspp(frame).labels == classic).mean() > 0.97


def test_infer_then_result_is_segment_batch(lraspp):
    """The two halves a video pipeline runs in different threads give segment_batch's answer."""
    a, b = _frame(40, 40, seed=1), _frame(40, 40, seed=2)
    pending = lraspp.infer([a, b])
    assert len(pending) == 2
    first = pending.result()
    assert pending.result() is first  # made once
    for seg, want in zip(first, lraspp.segment_batch([a, b])):
        assert np.array_equal(seg.labels, want.labels)


def test_frames_and_batches(lraspp):
    assert lraspp.segment_batch([]) == []  # nothing to segment: nothing back, not an IndexError
    a, b = _frame(40, 40, seed=1), _frame(40, 40, seed=2)
    both = lraspp.segment_batch([a, b])
    assert [s.frame.index for s in both] == [0, 1]
    frame = Frame(image=b, index=17, timestamp_s=0.5)
    one = lraspp(frame)
    assert one.frame is frame and one.frame.index == 17
    assert np.array_equal(both[1].labels, one.labels)
    assert both[0].labels.shape == (40, 40)


def test_views_and_read_only_arrays_are_frames_too(lraspp):
    """`rgb[:, :, ::-1]` is how RGB becomes BGR, `frame[:, ::-1]` how it is mirrored: views with
    negative strides, which torch refuses. A decoder's read-only buffer drew torch's warning."""
    import warnings

    rgb = _frame(48, 64, seed=3)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    read_only = bgr.copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = [lraspp(view).labels for view in (rgb[:, :, ::-1], bgr, read_only)]
        mirrored = lraspp(bgr[:, ::-1]).labels
    assert np.array_equal(got[0], got[1]) and np.array_equal(got[2], got[1])
    assert np.array_equal(mirrored, lraspp(np.ascontiguousarray(bgr[:, ::-1])).labels)


@pytest.mark.parametrize(
    "bad, got", [(np.zeros((10, 10), np.uint8), r"got a \(10, 10\) uint8 array"),
                 (np.zeros((10, 10, 3), np.float32), r"got a \(10, 10, 3\) float32 array"),
                 (np.zeros((10, 10, 4), np.uint8), r"got a \(10, 10, 4\) uint8 array"),
                 (None, r"got None \(cv2\.imread gives None for a file it cannot read\)"),
                 ([[0, 0, 0]], "got list")]
)
def test_wrong_arrays_are_refused(bad, got, lraspp):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 BGR array, " + got):
        lraspp(bad)


def test_unknown_model_and_class():
    with pytest.raises(UsageError, match="unknown model 'nosuchnet'"):
        Segmenter("nosuchnet", device="cpu", pretrained=False)
    with pytest.raises(UsageError, match="unknown class 'spaceship'"):
        Segmenter("lraspp_mobilenet_v3_large", device="cpu", classes="spaceship", pretrained=False)


def test_segmentation_counts_and_shares():
    cats = ("__background__", "road", "car")
    labels = np.zeros((10, 10), np.uint8)
    labels[:2] = 2  # 20 car pixels
    labels[5, :5] = 1
    seg = Segmentation(frame=Frame(np.zeros((10, 10, 3), np.uint8), 0, 0.0), labels=labels, categories=cats, selected=(2, 1))
    assert seg.pixel_count == 100
    assert seg.count(2) == 20 and seg.count(1) == 5 and seg.count(0) == 75
    assert seg.share(2) == pytest.approx(0.2)
    assert seg.shares == {"car": pytest.approx(0.2), "road": pytest.approx(0.05)}
    assert list(seg.shares) == ["car", "road"]
    assert seg.present == (2, 1)
    empty = Segmentation(frame=seg.frame, labels=np.zeros((10, 10), np.uint8), categories=cats, selected=(2,))
    assert empty.present == () and empty.shares == {"car": 0.0}


# --------------------------------------------------------------------------- the real ONNX model


def test_onnx_segmenter_refuses_weights(onnx_model):
    with pytest.raises(UsageError, match="--weights"):
        Segmenter(str(onnx_model), device="cpu", weights="x.pth")


def test_onnx_bad_metadata_value_is_a_model_error(make_onnx, tmp_path):
    meta = {
        "streamseg.input_size": "big",
        "streamseg.mean": "0,0,0",
        "streamseg.std": "1,1,1",
        "streamseg.categories": "bg,fg",
    }
    path = make_onnx(tmp_path / "m.onnx", num_classes=2, metadata=meta)
    with pytest.raises(ModelLoadError, match="big"):
        Segmenter(str(path), device="cpu")


@pytest.mark.parametrize("index", range(1, 7))
def test_onnx_labels_equal_onnxruntime_called_directly(onnx_model, onnx_seg, highway, index):
    import onnxruntime as ort

    image = highway[index]
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    x = to_input([image], onnx_seg.spec).numpy()
    assert x.shape == (1, 3, 257, 257)
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert logits.shape == (1, 21, 257, 257)
    small = logits.argmax(1).astype(np.uint8)[0]
    result = onnx_seg(image)
    assert result.labels.shape == image.shape[:2] and result.labels.dtype == np.uint8
    # At the model's resolution, and at the frame's: the argmax of the logits resized bilinearly.
    assert np.array_equal(onnx_seg.model.predict(torch.from_numpy(x))[0].numpy(), small)
    size = image.shape[:2]
    full = F.interpolate(torch.from_numpy(logits), size=size, mode="bilinear", align_corners=False).argmax(1)[0].numpy()
    assert (result.labels == full).mean() > 0.9999
    # Against the blocky nearest-neighbour resize of the small map: only class borders move.
    blocky = cv2.resize(small, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)
    assert (result.labels == blocky).mean() > 0.99


@pytest.mark.parametrize("index", CARS_EXPECTED + NO_CARS)
def test_onnx_finds_the_cars(onnx_seg, highway, index):
    result = onnx_seg(highway[index])
    car = result.share(7)
    assert result.shares == {"car": car}
    if index in CARS_EXPECTED:
        assert car > 0.005, f"highway_{index}.jpg: car share {car:.4%}"
        assert result.present == (7,)
    else:
        assert car == 0.0, f"highway_{index}.jpg: car share {car:.4%}"
        assert result.present == ()


def test_onnx_independent_preprocessing_agrees(onnx_model, onnx_seg, highway):
    """PIL resize + hand normalisation (not streamseg's code) gives nearly the same labels."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    image = highway[5]
    rgb = Image.fromarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).resize((257, 257), Image.BILINEAR)
    x = ((np.asarray(rgb, np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    theirs = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)[0]
    ours = onnx_seg.model.predict(to_input([image], onnx_seg.spec))[0].numpy()
    assert (theirs == 7).sum() > 0
    assert (ours == theirs).mean() > 0.995


def test_onnx_batch_of_a_fixed_batch_model(onnx_seg, highway):
    both = onnx_seg.segment_batch([highway[1], highway[2]])
    assert np.array_equal(both[0].labels, onnx_seg(highway[1]).labels)
    assert np.array_equal(both[1].labels, onnx_seg(highway[2]).labels)


def test_onnx_odd_frame_size(onnx_seg, highway):
    image = np.ascontiguousarray(highway[5][101:462, 13:654])  # 641x361
    result = onnx_seg(image)
    assert result.labels.shape == (361, 641)


@pytest.mark.parametrize(
    "small, full", [((257, 257), (720, 1280)), ((520, 924), (720, 1280)), ((520, 693), (1080, 1440)), ((40, 53), (48, 64))]
)
def test_device_and_cpu_label_resizes_agree(small, full):
    """On CUDA the label map is resized with torch's nearest-exact, on the CPU with OpenCV's
    INTER_NEAREST_EXACT; both must pick the same source pixel (run here with torch on the CPU).

    Only enlargements: when the frame is smaller than the model input, OpenCV's fixed-point
    arithmetic picks a neighbouring pixel for a fraction of a percent of pixels."""
    import torch.nn.functional as F

    labels = np.random.default_rng(0).integers(0, 21, small, dtype=np.uint8)
    by_torch = F.interpolate(torch.from_numpy(labels)[None, None].float(), size=full, mode="nearest-exact")[0, 0]
    by_cv2 = cv2.resize(labels, (full[1], full[0]), interpolation=cv2.INTER_NEAREST_EXACT)
    assert np.array_equal(by_torch.to(torch.uint8).numpy(), by_cv2)
