"""preprocess.py against torchvision's own `weights.transforms()` on PIL images (issue point 5)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from streamseg.model import spec_from_weights, weights_for
from streamseg.preprocess import MAX_SQUARES, InputSpec, to_input
from streamseg.types import SourceError


@pytest.fixture(scope="module")
def weights():
    return weights_for("deeplabv3_resnet101")


def _reference(weights, bgr: np.ndarray) -> torch.Tensor:
    """What torchvision does: the weights' transforms on the same picture as a PIL RGB image."""
    pil = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return weights.transforms()(pil)


def _synthetic(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise and a sharp edge: exercises both the filter and the colour order."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1), (xx + yy) % 256], -1)
    image = image + rng.integers(-40, 40, image.shape)
    image[height // 3 : height // 2, width // 4 : width // 2] = (255, 0, 0)  # pure blue in BGR
    return np.clip(image, 0, 255).astype(np.uint8)


def _check_parity(weights, bgr: np.ndarray) -> None:
    spec = spec_from_weights(weights)
    ours = to_input([bgr], spec)
    ref = _reference(weights, bgr)
    assert ours.dtype == torch.float32
    assert ours.shape == (1, *ref.shape)
    diff = (ours[0] - ref).abs().mean().item()
    assert diff < 0.01, f"mean |difference| {diff:.4f} against weights.transforms()"


def test_spec_comes_from_the_weights(weights):
    spec = spec_from_weights(weights)
    t = weights.transforms()
    assert spec.size == 520 == t.resize_size[0]
    assert spec.mean == pytest.approx([m * 255 for m in t.mean])
    assert spec.std == pytest.approx([s * 255 for s in t.std])


def test_parity_on_a_real_photo(weights, media_dir):
    bgr = cv2.imread(str(media_dir / "highway_1.jpg"))
    assert bgr is not None
    _check_parity(weights, bgr)


@pytest.mark.parametrize("height, width", [(361, 641), (700, 333), (300, 300), (1000, 999)])
def test_parity_on_odd_sizes(weights, height, width):
    _check_parity(weights, _synthetic(height, width, seed=height))


def test_upscaling_a_small_frame_matches_too(weights):
    _check_parity(weights, _synthetic(97, 61, seed=1))


def test_colour_order_is_flipped_once(weights):
    """A pure blue BGR frame must come out as blue in channel 2 (RGB order), like the reference."""
    spec = spec_from_weights(weights)
    bgr = np.zeros((40, 60, 3), np.uint8)
    bgr[..., 0] = 255
    x = to_input([bgr], spec)[0]
    expected = [(v - m) / s for v, m, s in zip((0, 0, 255), spec.mean, spec.std)]
    for channel, value in enumerate(expected):
        assert x[channel].mean().item() == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize(
    "width, height",
    [(1280, 720), (720, 1280), (641, 361), (361, 641), (520, 520), (333, 700), (1000, 999), (61, 97),
     (5120, 1440), (8000, 1000), (1000, 8000)],  # up to 8:1 (32:9 video, panoramas): as torchvision
)
def test_target_size_rounds_like_torchvision(width, height):
    spec = InputSpec(size=520, mean=(0, 0, 0), std=(1, 1, 1))
    resized = TF.resize(torch.zeros(1, height, width, dtype=torch.uint8), [520], antialias=True)
    assert spec.target_size(width, height) == (resized.shape[2], resized.shape[1])


@pytest.mark.parametrize("width, height", [(3000, 70), (20000, 40), (40, 20000), (4200, 520), (20000, 1), (100000, 7)])
def test_a_very_long_image_gets_a_bounded_input_of_its_own_shape(width, height):
    """Beyond 8:1 the short side is not stretched to 520 (a 20000x40 strip would become
    260000x520, tens of GB in the forward pass): the input keeps the image's shape and holds no
    more pixels than an 8:1 image's, nor many fewer."""
    spec = InputSpec(size=520, mean=(0, 0, 0), std=(1, 1, 1))
    tw, th = spec.target_size(width, height)
    budget = MAX_SQUARES * 520 * 520  # 4160x520
    assert 0.9 * budget <= tw * th <= budget
    assert 1 <= min(tw, th) < 520 and (tw > th) == (width > height)
    short, long = sorted((tw, th))
    aspect = max(width, height) / min(width, height)
    assert short * aspect - 1 < long <= short * aspect  # the image's shape, to the pixel


def test_an_image_too_thin_for_any_input_is_a_clear_error():
    """With a small model size, a 3000x1 image would be under one pixel tall within the budget."""
    spec = InputSpec(size=16, mean=(0, 0, 0), std=(1, 1, 1))  # at most 8 x 16 x 16 = 2048 pixels
    assert spec.target_size(2048, 1) == (2048, 1)
    with pytest.raises(SourceError, match=r"3000x1 picture is too long and thin.* less than 1 pixel tall"):
        spec.target_size(3000, 1)
    with pytest.raises(SourceError, match=r"1x3000 picture .* less than 1 pixel wide"):
        spec.target_size(1, 3000)


def test_a_very_wide_frame_becomes_that_input():
    spec = InputSpec(size=520, mean=(0, 0, 0), std=(1, 1, 1))
    x = to_input([np.zeros((40, 20000, 3), np.uint8)], spec)
    assert tuple(x.shape) == (1, 3, *spec.target_size(20000, 40)[::-1]) == (1, 3, 65, 32500)


def test_target_size_fixed_and_none():
    assert InputSpec(size=(257, 193), mean=(0, 0, 0), std=(1, 1, 1)).target_size(1280, 720) == (257, 193)
    assert InputSpec(size=None, mean=(0, 0, 0), std=(1, 1, 1)).target_size(640, 480) == (640, 480)


def test_fixed_size_matches_pil_bilinear():
    """An ONNX model's fixed WxH input is PIL's antialiased bilinear resize, normalised by hand."""
    spec = InputSpec(size=(257, 257), mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5))
    bgr = _synthetic(361, 641, seed=3)
    rgb = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).resize((257, 257), Image.BILINEAR)
    ref = (np.asarray(rgb, np.float32) - 127.5) / 127.5
    ours = to_input([bgr], spec)[0].permute(1, 2, 0).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).mean() < 0.01


def test_no_resize_is_exact_normalisation():
    spec = InputSpec(size=None, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0))
    bgr = _synthetic(31, 17, seed=4)
    x = to_input([bgr], spec)[0].numpy()
    rgb = bgr[..., ::-1].astype(np.float32)
    ref = ((rgb - np.array([10.0, 20.0, 30.0])) / np.array([2.0, 4.0, 5.0])).transpose(2, 0, 1)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


def test_batch_equals_single_frames(weights):
    spec = spec_from_weights(weights)
    a, b = _synthetic(90, 120, seed=5), _synthetic(90, 120, seed=6)
    batch = to_input([a, b], spec)
    assert batch.shape[0] == 2
    torch.testing.assert_close(batch[0], to_input([a], spec)[0])
    torch.testing.assert_close(batch[1], to_input([b], spec)[0])


def test_input_is_not_modified_and_options(weights):
    spec = spec_from_weights(weights)
    bgr = _synthetic(48, 64, seed=7)
    before = bgr.copy()
    x = to_input([bgr], spec, dtype=torch.bfloat16, channels_last=True)
    assert np.array_equal(bgr, before)
    assert x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.float(), to_input([bgr], spec), atol=0.05, rtol=0.01)
