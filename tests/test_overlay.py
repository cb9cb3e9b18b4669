"""overlay.py: colour masks, alpha blending and the legend are pure and exact."""
from __future__ import annotations

import numpy as np
import pytest

from streamseg.labels import palette
from streamseg.overlay import Painter, draw_legend

CATS = (
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PINK = np.array((147, 20, 255))


@pytest.fixture
def scene() -> tuple[np.ndarray, np.ndarray]:
    """A noisy (H, W, 3) uint8 BGR frame and a label map with car, person, bus and background."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    labels = np.zeros((120, 160), np.uint8)
    labels[10:60, 20:90] = 7  # car
    labels[70:110, 100:150] = 15  # person
    labels[0:5, :] = 6  # bus
    return frame, labels


def _expected(frame, labels, selected, alpha):
    table = palette(CATS)
    out = frame.astype(np.float64)
    sel = np.isin(labels, selected)
    colour = table[labels].astype(np.float64)
    out[sel] = (1 - alpha) * out[sel] + alpha * colour[sel]
    return np.round(out), sel


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.85])
@pytest.mark.parametrize("selected", [(7,), (7, 15)])
def test_blend_formula(scene, alpha, selected):
    frame, labels = scene
    before = frame.copy()
    painter = Painter(selected=selected, palette=palette(CATS), alpha=alpha)
    out = painter.blend(frame, labels)
    expected, sel = _expected(frame, labels, selected, alpha)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert out is not frame
    assert np.abs(out.astype(np.int16) - expected).max() <= 1
    assert np.array_equal(out[~sel], frame[~sel])  # everything else untouched, bus included
    assert np.array_equal(frame, before)  # the input is not modified


def test_alpha_zero_and_one(scene):
    frame, labels = scene
    zero = Painter(selected=(7,), palette=palette(CATS), alpha=0.0).blend(frame, labels)
    assert np.array_equal(zero, frame)
    one = Painter(selected=(7,), palette=palette(CATS), alpha=1.0).blend(frame, labels)
    assert (one[labels == 7] == PINK).all()
    assert np.array_equal(one[labels != 7], frame[labels != 7])


def test_blend_into_out(scene):
    frame, labels = scene
    painter = Painter(selected=(7, 15), palette=palette(CATS), alpha=0.5)
    expected = painter.blend(frame, labels)
    target = np.zeros_like(frame)
    assert painter.blend(frame, labels, out=target) is target
    assert np.array_equal(target, expected)
    in_place = frame.copy()
    assert painter.blend(in_place, labels, out=in_place) is in_place
    assert np.array_equal(in_place, expected)


def test_colour_mask_and_selected_mask(scene):
    frame, labels = scene
    painter = Painter(selected=(7, 15), palette=palette(CATS), alpha=0.5)
    mask = painter.colour_mask(labels)
    assert mask.shape == frame.shape and mask.dtype == np.uint8
    assert (mask[labels == 7] == PINK).all()
    assert (mask[labels == 15] == palette(CATS)[15]).all()
    assert (mask[~np.isin(labels, (7, 15))] == 0).all()
    binary = painter.selected_mask(labels)
    assert binary.shape == labels.shape and binary.dtype == np.uint8
    assert np.array_equal(binary, np.where(np.isin(labels, (7, 15)), 255, 0))


def test_nothing_selected_present(scene):
    frame, _ = scene
    labels = np.zeros(frame.shape[:2], np.uint8)
    out = Painter(selected=(7,), palette=palette(CATS), alpha=0.5).blend(frame, labels)
    assert np.array_equal(out, frame)


def test_legend_returns_a_new_array_and_draws_top_left(scene):
    frame, _ = scene
    big = np.repeat(np.repeat(frame, 6, 0), 6, 1)  # 720x960, a realistic size
    before = big.copy()
    out = draw_legend(big, (7, 15), CATS, palette(CATS))
    assert out is not big and out.shape == big.shape and out.dtype == np.uint8
    assert np.array_equal(big, before)
    changed = np.argwhere((out != big).any(axis=2))
    assert len(changed) > 0
    h, w = big.shape[:2]
    assert changed[:, 0].max() < h // 3 and changed[:, 1].max() < w // 3
    # The car's swatch is there in its colour.
    assert ((out == PINK).all(axis=2)).sum() > 50


def test_legend_grows_with_the_classes(scene):
    frame, _ = scene
    big = np.repeat(np.repeat(frame, 6, 0), 6, 1)
    rows_one = np.argwhere((draw_legend(big, (7,), CATS, palette(CATS)) != big).any(2))[:, 0].max()
    rows_three = np.argwhere((draw_legend(big, (7, 15, 6), CATS, palette(CATS)) != big).any(2))[:, 0].max()
    assert rows_three > rows_one


def test_legend_with_no_classes_is_an_unchanged_copy(scene):
    frame, _ = scene
    out = draw_legend(frame, (), CATS, palette(CATS))
    assert out is not frame and np.array_equal(out, frame)


def test_legend_on_a_tiny_image_does_not_fail():
    tiny = np.full((20, 30, 3), 200, np.uint8)
    out = draw_legend(tiny, (7, 15, 6), CATS, palette(CATS))
    assert out.shape == tiny.shape
