"""Label maps at the frame's size from low-resolution logits: the CPU shortcut against the
direct computation (torch's bilinear resize of every channel, then argmax)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamseg.postprocess import labels_at, labels_tensor


def _direct(logits: torch.Tensor, size) -> np.ndarray:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1).to(torch.uint8).numpy()


def _assert_equal_but_ties(got: list, logits: torch.Tensor, size) -> None:
    """Equal to the direct computation, except at pixels where the two best classes' resized
    logits lie within float rounding of each other (the two computations add in other orders)."""
    resized = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    want = resized.argmax(1).to(torch.uint8).numpy()
    top2 = resized.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).numpy()
    for g, w, m in zip(got, want, margin):
        assert g.shape == tuple(size) and g.dtype == np.uint8
        differ = g != w
        assert differ.mean() < 1e-4
        assert (m[differ] < 1e-4).all(), f"labels differ where the margin is {m[differ].max()}"


def _smooth_logits(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Logits with regions, as a trained model gives, rather than per-pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, c, max(2, h // 6), max(2, w // 6), generator=g) * 4
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)


@pytest.mark.parametrize(
    "low, size",
    [
        ((65, 116), (720, 1280)),  # LR-ASPP on a 720p frame
        ((257, 257), (720, 1280)),  # the ONNX model, stretched unevenly
        ((9, 13), (37, 50)),  # odd factors
        ((40, 40), (30, 70)),  # down in one axis, up in the other
        ((33, 21), (33, 21)),  # same size
        ((1, 1), (5, 7)),  # one cell
        ((2, 3), (1, 1)),
    ],
)
def test_equals_resize_then_argmax(low, size):
    logits = _smooth_logits(2, 21, *low, seed=sum(low))
    got = labels_at(logits, size)
    assert len(got) == 2
    _assert_equal_but_ties(got, logits, size)


def test_noise_logits_every_cell_mixed():
    """The worst case for the shortcut: every cell's corners disagree."""
    logits = torch.randn(1, 21, 30, 40, generator=torch.Generator().manual_seed(5))
    _assert_equal_but_ties(labels_at(logits, (97, 131)), logits, (97, 131))


def test_uniform_logits_and_first_maximum_wins():
    logits = torch.zeros(1, 5, 4, 4)
    assert np.array_equal(labels_at(logits, (9, 9))[0], np.zeros((9, 9), np.uint8))
    logits[:, 3] = 1.0
    logits[:, 4] = 1.0  # a tie between 3 and 4: the first wins, as in argmax
    assert np.array_equal(labels_at(logits, (9, 9))[0], np.full((9, 9), 3, np.uint8))


def test_channels_last_and_half_precision_inputs():
    logits = _smooth_logits(1, 21, 20, 30, seed=9)
    want = _direct(logits, (61, 89))[0]
    cl = logits.contiguous(memory_format=torch.channels_last)
    _assert_equal_but_ties(labels_at(cl, (61, 89)), logits, (61, 89))
    bf16 = labels_at(logits.to(torch.bfloat16), (61, 89))[0]
    assert (bf16 == want).mean() > 0.98


def test_labels_tensor_stays_on_the_logits_device():
    logits = _smooth_logits(3, 21, 10, 12, seed=2)
    out = labels_tensor(logits, (25, 31))
    assert out.dtype == torch.uint8 and out.shape == (3, 25, 31)
    assert np.array_equal(out.numpy(), _direct(logits, (25, 31)))
