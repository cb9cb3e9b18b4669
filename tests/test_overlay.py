"""overlay.py: colour masks, alpha blending and the legend are pure and exact."""
from __future__ import annotations

import cv2
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


def _entries(out: np.ndarray, class_ids) -> dict[int, tuple[int, int, int, int]]:
    """Each class's swatch as drawn, (top, left, bottom, right) inclusive, for those with one.
    The swatch must be a whole filled square of the class's own colour."""
    table = palette(CATS)
    found = {}
    for c in class_ids:
        where = np.argwhere((out == table[c]).all(axis=2))
        if len(where) == 0:
            continue
        (top, left), (bottom, right) = where.min(0), where.max(0)
        assert bottom - top == right - left and len(where) == (bottom - top + 1) ** 2, f"{CATS[c]}: swatch cut off"
        found[c] = (int(top), int(left), int(bottom), int(right))
    return found


def _white(out: np.ndarray) -> np.ndarray:
    """(H, W) bool: the legend's white text (grey-level pixels brighter than any dimmed background)."""
    pixels = out.astype(int)
    return (pixels.min(axis=2) > 100) & (pixels.max(axis=2) - pixels.min(axis=2) < 10)


def _text_extent(out: np.ndarray, top: int, bottom: int, left: int, right: int) -> tuple[int, int]:
    """First and last column of white text on the rows of the swatch top..bottom, columns left..right-1."""
    cols = np.nonzero(_white(out)[max(0, top - 4) : bottom + 5, left:right].any(axis=0))[0]
    assert len(cols), "no name beside the swatch"
    return left + int(cols[0]), left + int(cols[-1])


def _smallest_legible_width(name: str) -> int:
    return cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.3, 1)[0][0]


@pytest.mark.parametrize(
    "width, height, class_ids",
    [
        (160, 120, (2, 6, 7, 14, 19, 15, 11, 12)),  # a thumbnail with eight classes
        (320, 90, (2, 6, 7, 14, 19, 15, 11)),  # a strip: seven classes, room for five rows at most
        (90, 320, (2, 6, 7, 14, 19, 15, 11)),  # the same strip upright
        (640, 360, tuple(range(1, 21))),  # every VOC class on a small video frame
    ],
)
def test_legend_names_every_class_on_a_small_image(width, height, class_ids):
    """Every class gets a whole swatch in its colour and, beside it, a name that is not cut off at
    the image's edge and is at least as wide as the smallest legible text would draw it."""
    grey = np.full((height, width, 3), (90, 100, 110), np.uint8)  # no legend colour occurs in it by chance
    out = draw_legend(grey, class_ids, CATS, palette(CATS))
    swatches = _entries(out, class_ids)
    assert sorted(swatches) == sorted(class_ids), f"not listed: {[CATS[c] for c in class_ids if c not in swatches]}"
    for c, (top, left, bottom, right) in swatches.items():
        # The name runs from the swatch to the next column's swatches, or to the image's edge.
        stop = min((l for (t, l, b, r) in swatches.values() if l > right), default=width)
        first, last = _text_extent(out, top, bottom, right + 1, stop)
        assert last - first + 1 >= _smallest_legible_width(CATS[c]) - 2, f"{CATS[c]}: name too small or cut"
        assert last < width - 1, f"{CATS[c]}: name runs off the image"


def test_legend_that_cannot_hold_every_class_says_how_many_it_leaves_out():
    """20 classes on a 160x60 image: the first ones listed whole, then '+N more' for the rest."""
    grey = np.full((60, 160, 3), (90, 100, 110), np.uint8)
    class_ids = tuple(range(1, 21))
    out = draw_legend(grey, class_ids, CATS, palette(CATS))
    swatches = _entries(out, class_ids)
    shown = len(swatches)
    assert 1 <= shown < 20
    assert sorted(swatches) == list(class_ids[:shown])  # the first ones, in the order given
    # The text that is nobody's name is the last entry: "+N more", whole and legible.
    rest = _white(out)
    for top, left, bottom, right in swatches.values():
        stop = min((l for (t, l, b, r) in swatches.values() if l > right), default=160)
        rest[max(0, top - 4) : bottom + 5, right + 1 : stop] = False
    cols = np.nonzero(rest.any(axis=0))[0]
    assert len(cols), "no '+N more' entry"
    assert cols[-1] - cols[0] + 1 >= _smallest_legible_width(f"+{20 - shown} more") - 2
    assert cols[-1] < 159


@pytest.mark.parametrize("height, width", [(20, 30), (32, 32)])
def test_legend_too_small_for_one_legible_entry_is_left_out(height, width):
    """Documented: no room for one entry at the smallest legible size, no legend (rather than
    names cut in half)."""
    image = np.full((height, width, 3), 200, np.uint8)
    out = draw_legend(image, tuple(range(1, 21)), CATS, palette(CATS))
    assert out is not image and np.array_equal(out, image)


def test_video_legend_keeps_its_size_while_classes_come_and_go():
    """A video lays the legend out for every selected class: the car's entry is the same size
    and in the same place whether it is alone or among all eight."""
    grey = np.full((120, 160, 3), (90, 100, 110), np.uint8)
    selected = (7, 2, 6, 14, 19, 15, 11, 12)
    alone = _entries(draw_legend(grey, (7,), CATS, palette(CATS), layout_for=selected), (7,))
    crowded = _entries(draw_legend(grey, selected, CATS, palette(CATS), layout_for=selected), (7,))
    assert alone[7] == crowded[7]
    # Without it, a single class gets the larger text an image of this size allows.
    single = _entries(draw_legend(grey, (7,), CATS, palette(CATS)), (7,))
    assert single[7][2] - single[7][0] > alone[7][2] - alone[7][0]
