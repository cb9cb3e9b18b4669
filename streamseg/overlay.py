"""Colouring, alpha blending and the legend. Pure functions: they return new arrays.

Per frame the work is one palette lookup and one blend over the whole image: no Python loop
over pixels or classes.
"""
from __future__ import annotations

from typing import Optional, Sequence

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


def draw_legend(
    image: np.ndarray, class_ids: Sequence[int], categories: Sequence[str], palette: np.ndarray
) -> np.ndarray:
    """A copy of the (H, W, 3) uint8 BGR image with a swatch and name per class, top left."""
    out = image.copy()
    if not class_ids:
        return out
    h = out.shape[0]
    scale = max(0.4, min(1.2, h / 900))
    line = int(28 * scale) + 6
    thick = max(1, int(round(scale * 1.5)))
    widths = [cv2.getTextSize(categories[c], cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] for c in class_ids]
    box_w = line + max(widths) + 16
    box_h = line * len(class_ids) + 8
    # A dimmed panel keeps the names readable on any background.
    roi = out[4 : 4 + box_h, 4 : 4 + box_w]
    roi[:] = (roi * 0.35).astype(np.uint8)
    for row, c in enumerate(class_ids):
        y = 8 + row * line
        colour = tuple(int(v) for v in palette[c])
        cv2.rectangle(out, (10, y + 2), (10 + line - 8, y + line - 6), colour, thickness=-1)
        cv2.putText(
            out,
            categories[c],
            (10 + line, y + line - 10),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            thick,
            cv2.LINE_AA,
        )
    return out
