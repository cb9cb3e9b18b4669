"""Logits at the model's resolution -> a label map at the frame's resolution.

Every model of the table predicts at 1/8 of its input (a 65x116 grid for a 720p frame) and the
ONNX model at 257x257. torchvision's own forward then resizes the logits bilinearly to the
*input* size (520x924), and a naive pipeline takes the argmax there and resizes the label map a
second time, by nearest neighbour, to the frame (720x1280): two steps, blocky edges, and on the
CPU about 40 ms per 720p frame (24 ms for the resize of 21 channels, 17 ms for the argmax).

streamseg does one step: the argmax of the logits resized bilinearly (align_corners=False, as
torch's `F.interpolate`) straight to the frame's size. On the CPU it gets that result without
resizing every channel of every pixel, by a property of the argmax: where the four low-resolution
neighbours of a pixel agree on a class, every convex combination of their logits (which is what
bilinear interpolation is) has that same class as its argmax. Only pixels in cells whose four
corners disagree need the full interpolation. On real video that is 0.1-0.3 % of the cells; the
rest is one nearest-neighbour resize of the small label map. The result equals
`F.interpolate(logits, size, mode="bilinear").argmax(1)` except where two classes tie to the last
bit (see tests/test_postprocess.py).

On CUDA the direct form is cheap and runs on the device.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

#: Boundary pixels evaluated per step: bounds the temporaries to a few MB.
_CHUNK = 1 << 16


class _Axis(NamedTuple):
    """Bilinear sampling along one axis, as torch computes it for align_corners=False."""

    lo: np.ndarray  # (out,) lower source index
    hi: np.ndarray  # (out,) upper source index (clamped at the edge)
    frac: np.ndarray  # (out,) float32 weight of `hi`
    nearest: np.ndarray  # (out,) one of lo/hi: the nearer source pixel
    start: np.ndarray  # (in,) first output index whose `lo` is this source index
    stop: np.ndarray  # (in,) one past the last


@lru_cache(maxsize=32)
def _axis(n_in: int, n_out: int) -> _Axis:
    dst = np.arange(n_out, dtype=np.float64)
    src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    nearest = np.where(frac >= 0.5, hi, lo)
    sources = np.arange(n_in)
    start = np.searchsorted(lo, sources, side="left")
    stop = np.searchsorted(lo, sources, side="right")
    return _Axis(lo, hi, frac, nearest, start, stop)


def labels_at(logits: torch.Tensor, size: tuple[int, int]) -> list[np.ndarray]:
    """(N, C, h, w) logits on any device -> N (H, W) uint8 label maps; size is (H, W).

    Each map is the argmax of the logits resized bilinearly to (H, W).
    """
    height, width = size
    if logits.device.type != "cpu":
        return list(labels_tensor(logits, size).cpu().numpy())
    planes = logits.detach().float().contiguous().numpy()  # (N, C, h, w): small, one copy at most
    return [_labels_cpu(p, height, width) for p in planes]


def labels_tensor(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, H, W) uint8 on the logits' device, by direct resize and argmax."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(1).to(torch.uint8)


def _labels_cpu(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) float32 logits -> (H, W) uint8, exact except for ties (see module docstring)."""
    _, h, w = planes.shape
    small = _argmax_planes(planes)
    if (h, w) == (height, width):
        return small
    ys, xs = _axis(h, height), _axis(w, width)
    out = small.take(ys.nearest, axis=0).take(xs.nearest, axis=1)
    # A cell spans corners (i, j) .. (i + 1, j + 1), clamped at the last row and column.
    padded = np.pad(small, ((0, 1), (0, 1)), mode="edge")
    corner = padded[:-1, :-1]
    mixed = (corner != padded[1:, :-1]) | (corner != padded[:-1, 1:]) | (corner != padded[1:, 1:])
    cell_y, cell_x = np.nonzero(mixed)
    if cell_y.size == 0:
        return out
    rows, cols = _cell_pixels(ys.start[cell_y], ys.stop[cell_y], xs.start[cell_x], xs.stop[cell_x])
    if rows.size < h * w // 4:
        # Few border pixels (real video): gather from the planes as they are.
        for begin in range(0, rows.size, _CHUNK):
            r, c = rows[begin : begin + _CHUNK], cols[begin : begin + _CHUNK]
            out[r, c] = _argmax_planes(_mix(planes, ys, xs, r, c, channels_first=True))
        return out
    # Many (noise, or an untrained model): one pass to (h, w, C) makes each gather one read.
    per_pixel = np.ascontiguousarray(planes.transpose(1, 2, 0))
    for begin in range(0, rows.size, _CHUNK):
        r, c = rows[begin : begin + _CHUNK], cols[begin : begin + _CHUNK]
        out[r, c] = _mix(per_pixel, ys, xs, r, c, channels_first=False).argmax(1)
    return out


def _mix(values: np.ndarray, ys: _Axis, xs: _Axis, r: np.ndarray, c: np.ndarray, *, channels_first: bool) -> np.ndarray:
    """Bilinear mix of the logits at output pixels (r, c): from (C, h, w) planes -> (C, n), or
    from (h, w, C) per-pixel rows -> (n, C)."""
    y0, y1, fy = ys.lo[r], ys.hi[r], ys.frac[r]
    x0, x1, fx = xs.lo[c], xs.hi[c], xs.frac[c]
    if channels_first:
        at = lambda y, x: values[:, y, x]  # noqa: E731
    else:
        at = lambda y, x: values[y, x]  # noqa: E731
        fy, fx = fy[:, None], fx[:, None]
    top = at(y0, x0)  # fancy indexing copies, so the updates below are private
    top += (at(y0, x1) - top) * fx
    bottom = at(y1, x0)
    bottom += (at(y1, x1) - bottom) * fx
    top += (bottom - top) * fy
    return top


def _argmax_planes(planes: np.ndarray) -> np.ndarray:
    """argmax over the first axis as uint8, first maximum winning as in np.argmax.

    A running maximum over the C planes reads each value once in memory order: 0.6 ms for
    21x257x257, where np.argmax(axis=0) takes 2.4 ms and torch's NCHW argmax 13 ms.
    """
    best = planes[0].copy()
    index = np.zeros(best.shape, np.uint8)
    for c in range(1, planes.shape[0]):
        higher = planes[c] > best
        np.maximum(best, planes[c], out=best)
        index[higher] = c
    return index


def _cell_pixels(row0: np.ndarray, row1: np.ndarray, col0: np.ndarray, col1: np.ndarray):
    """Row and column indices of every output pixel inside the given cells' rectangles."""
    heights, widths = row1 - row0, col1 - col0
    areas = heights * widths
    keep = areas > 0
    row0, col0, widths, areas = row0[keep], col0[keep], widths[keep], areas[keep]
    total = int(areas.sum())
    cell = np.repeat(np.arange(areas.size), areas)
    offset = np.arange(total) - np.repeat(np.cumsum(areas) - areas, areas)
    width = widths[cell]
    return row0[cell] + offset // width, col0[cell] + offset % width
