"""Colouring, alpha blending and the legend. Pure functions: they return new arrays.

Per frame the work is one palette lookup and one blend over the whole image: no Python loop
over pixels or classes.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import cv2
import numpy as np


class Painter:
    """Colours the selected classes of a label map and blends them over a frame.

    >>> from streamseg.labels import palette
    >>> p = Painter(selected=(7,), palette=palette(VOC), alpha=0.5)   # doctest: +SKIP
    >>> overlay = p.blend(frame_bgr, labels)                          # doctest: +SKIP
    """

    def __init__(self, *, selected: Sequence[int], palette: np.ndarray, alpha: float = 0.5):
        self.selected = tuple(selected)
        self.alpha = float(alpha)
        self.palette = palette
        # Lookup tables built once: colour per class (black when not selected) and a 0/255 mask.
        self.lut = np.zeros((256, 3), np.uint8)
        self.lut[list(self.selected)] = palette[list(self.selected)]
        self.mask_lut = np.zeros(256, np.uint8)
        self.mask_lut[list(self.selected)] = 255

    def colour_mask(self, labels: np.ndarray) -> np.ndarray:
        """(H, W) uint8 labels -> (H, W, 3) uint8 BGR: selected classes in colour on black."""
        return np.take(self.lut, labels, axis=0)  # faster than self.lut[labels], same result

    def selected_mask(self, labels: np.ndarray) -> np.ndarray:
        """(H, W) uint8 labels -> (H, W) uint8, 255 where a selected class is."""
        return cv2.LUT(labels, self.mask_lut)

    def blend(self, image: np.ndarray, labels: np.ndarray, *, out: Optional[np.ndarray] = None) -> np.ndarray:
        """(H, W, 3) uint8 BGR frame + (H, W) uint8 labels -> (H, W, 3) uint8 BGR overlay.

        Selected pixels become (1 - alpha) * frame + alpha * colour; the rest keep the frame.
        """
        mask = self.selected_mask(labels)
        if out is None:
            out = image.copy()
        elif out is not image:
            np.copyto(out, image)
        # Colour and blend only the box around the selected pixels: the same result, and on a
        # road scene a small fraction of the frame's work.
        x, y, w, h = cv2.boundingRect(mask)
        if w == 0 or h == 0:
            return out
        box = (slice(y, y + h), slice(x, x + w))
        colour = np.take(self.lut, labels[box], axis=0)
        blended = cv2.addWeighted(image[box], 1.0 - self.alpha, colour, self.alpha, 0.0)
        cv2.copyTo(blended, mask[box], out[box])
        return out


#: Hershey text below this scale (about 8 px tall) is no longer legible.
_MIN_SCALE = 0.3
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MARGIN = 4  # from the image's top-left corner to the panel
_PAD = 4  # inside the panel, around the entries


class _Layout(NamedTuple):
    scale: float
    thick: int
    line: int  # row height
    swatch: int  # side of a colour square
    gap: int  # between a swatch and its name
    col_w: int  # every column's width: swatch, gap and the widest name
    col_gap: int
    rows: int  # entries per column
    slots: int  # entries that fit: rows x columns


def draw_legend(
    image: np.ndarray,
    class_ids: Sequence[int],
    categories: Sequence[str],
    palette: np.ndarray,
    *,
    layout_for: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """A copy of the (H, W, 3) uint8 BGR image with a swatch and name per class, top left.

    The text is as large as the image's height suggests (scale h / 900, from 0.4 to 1.2); when
    the entries do not fit one column, they take several, and then smaller text, down to the
    smallest legible size (about 8 px). Where even that cannot hold them all, the last entry
    that fits says "+N more" instead; an image too small for one legible entry (under about
    26 px tall, or too narrow for the longest name) is returned without a legend.

    layout_for: the class ids the layout makes room for (default `class_ids`). A video passes
    every selected class, so that text size, rows and columns stay put from frame to frame
    while classes come and go.

    >>> out = draw_legend(frame_bgr, (7, 15), VOC, palette(VOC))   # doctest: +SKIP
    """
    out = image.copy()
    if not class_ids:
        return out
    planned = tuple(dict.fromkeys((*(layout_for or ()), *class_ids)))
    h, w = out.shape[:2]
    layout = _layout(h, w, tuple(categories[c] for c in planned))
    if layout is None:
        return out
    entries: list[tuple[str, Optional[tuple[int, ...]]]] = [
        (categories[c], tuple(int(v) for v in palette[c])) for c in class_ids
    ]
    if len(entries) > layout.slots:
        kept = layout.slots - 1
        entries = entries[:kept] + [(f"+{len(entries) - kept} more", None)]
    cols = -(-len(entries) // layout.rows)
    box_w = 2 * _PAD + cols * layout.col_w + (cols - 1) * layout.col_gap
    box_h = 2 * _PAD + min(layout.rows, len(entries)) * layout.line
    # A dimmed panel keeps the names readable on any background.
    roi = out[_MARGIN : _MARGIN + box_h, _MARGIN : _MARGIN + box_w]
    roi[:] = (roi * 0.35).astype(np.uint8)
    cap = cv2.getTextSize("A", _FONT, layout.scale, layout.thick)[0][1]
    s = layout.swatch
    for i, (name, colour) in enumerate(entries):
        x = _MARGIN + _PAD + (i // layout.rows) * (layout.col_w + layout.col_gap)
        y = _MARGIN + _PAD + (i % layout.rows) * layout.line
        text_x = x
        if colour is not None:
            top = y + (layout.line - s) // 2
            cv2.rectangle(out, (x, top), (x + s - 1, top + s - 1), colour, thickness=-1)
            text_x = x + s + layout.gap
        # Capitals centred on the swatch.
        baseline = y + (layout.line + cap) // 2
        cv2.putText(out, name, (text_x, baseline), _FONT, layout.scale, (255, 255, 255), layout.thick, cv2.LINE_AA)
    return out


@functools.lru_cache(maxsize=64)
def _layout(height: int, width: int, names: tuple[str, ...]) -> Optional[_Layout]:
    """The largest text, then the fewest columns, that hold all `names` in a height x width
    image; failing that, as many entries as fit at the smallest text, the last of them to say
    "+N more"; None when not one fits. Cached: a video asks the same question every frame."""
    preferred = max(0.4, min(1.2, height / 900))
    steps = max(1, round((preferred - _MIN_SCALE) / 0.05))
    room_w, room_h = width - _MARGIN - 2 * _PAD, height - _MARGIN - 2 * _PAD

    def fit(scale: float, texts: Sequence[str]) -> _Layout:
        thick = max(1, int(round(scale * 1.5)))
        line = int(28 * scale) + 6
        swatch = max(6, line - 8)
        gap = max(4, int(line * 0.3))
        col_w = swatch + gap + max(cv2.getTextSize(t, _FONT, scale, thick)[0][0] for t in texts)
        rows = max(0, room_h // line)
        cols = max(0, (room_w + 2 * gap) // (col_w + 2 * gap))
        return _Layout(scale, thick, line, swatch, gap, col_w, 2 * gap, rows, rows * cols)

    for step in range(steps + 1):
        layout = fit(preferred - step * (preferred - _MIN_SCALE) / steps, names)
        if layout.slots >= len(names):
            cols = -(-len(names) // layout.rows)  # the fewest columns,
            rows = -(-len(names) // cols)  # and no row left empty in the first
            return layout._replace(rows=rows, slots=rows * cols)
    layout = fit(_MIN_SCALE, (*names, f"+{len(names)} more"))
    return layout if layout.slots >= 1 else None
