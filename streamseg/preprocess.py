"""The one path from (H, W, 3) uint8 BGR frames to the model's input tensor.

Every mode (images, video files, cameras, streams) and every backend (torch, ONNX) goes through
`to_input`. For torchvision weights it reproduces `weights.transforms()` on a PIL image: shorter
side resized to 520 with antialiased bilinear filtering, then ImageNet mean/std. torch's uint8
antialiased bilinear kernel is built to match PIL's, so the two agree to about 1e-5. One
departure: an image longer than 8:1 is not made 520 pixels on its short side, which would give a
20000x40 strip a 260000x520 input and a forward pass of tens of GB (see `MAX_SQUARES`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .types import SourceError

#: With an int `InputSpec.size`, the model's input holds at most this many size x size squares of
#: pixels. Images up to 8:1 (panoramas, 32:9 video) are resized exactly as torchvision does;
#: a longer one gets the largest input of its own shape within that many pixels, its short side
#: then under `size`: the forward pass needs no more memory than for an 8:1 image (DeepLabV3-
#: ResNet101 at 4160x520 in fp32: about 1 GB of activations), where the plain rule would take
#: tens of GB for a 20000x40 strip (260000x520).
MAX_SQUARES = 8


@dataclass(frozen=True, slots=True)
class InputSpec:
    """How a model wants its input.

    size: (width, height) for a fixed-size model, or an int for "resize the shorter side to N,
    keep the aspect ratio" (torchvision's segmentation transforms; beyond 8:1 the short side is
    less than N, see `MAX_SQUARES`), or None for "as it comes".
    mean, std: per channel, RGB order, 0-255 scale.
    """

    size: Union[tuple[int, int], int, None]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the model sees for a frame of width x height.

        Raises SourceError for a picture so long and thin that its shape leaves under one pixel
        on its short side within the input's pixel budget (with size 520, over 2,163,200:1).

        >>> InputSpec(size=520, mean=(0, 0, 0), std=(1, 1, 1)).target_size(20000, 40)
        (32500, 65)
        """
        if self.size is None:
            return width, height
        if isinstance(self.size, tuple):
            return self.size
        # Same rounding as torchvision's F.resize with an int size: the long side is truncated.
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        budget = MAX_SQUARES * self.size * self.size
        if new_short * new_long > budget:
            # Longer than 8:1: the largest input of the image's shape within the budget, in
            # integers so that it never goes over by a rounding.
            new_short = math.isqrt(budget * short // long)
            if new_short < 1:
                side = "tall" if width > height else "wide"
                raise SourceError(f"a {width}x{height} picture is too long and thin to segment: in the model's input of at "
                                  f"most {budget:,} pixels it would be less than 1 pixel {side}")
            new_long = new_short * long // short
        return (new_short, new_long) if width <= height else (new_long, new_short)


def to_input(
    frames: Sequence[np.ndarray],
    spec: InputSpec,
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """Stack (H, W, 3) uint8 BGR frames of one size into a normalised (N, 3, h, w) RGB tensor.

    The uint8 frames travel to the device once (pinned, non-blocking on CUDA); colour order is
    flipped, resized and normalised there.

    >>> spec = InputSpec(size=520, mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4))
    >>> to_input([np.zeros((720, 1280, 3), np.uint8)], spec).shape
    torch.Size([1, 3, 520, 924])
    """
    device = device or torch.device("cpu")
    if device.type == "cpu":
        return _to_input_cpu(frames, spec, dtype=dtype, channels_last=channels_last)
    return tensor_to_input(upload(frames, device), spec, dtype=dtype, channels_last=channels_last)


def _plain(frame: np.ndarray) -> np.ndarray:
    """`frame` as torch.from_numpy takes it: C-contiguous and writable. A flipped or
    channel-reversed view (`rgb[:, :, ::-1]`, the usual RGB -> BGR) has negative strides, which
    torch refuses, and a read-only array draws a warning; those are copied, others used as they are."""
    if frame.flags.c_contiguous and frame.flags.writeable:
        return frame
    return np.array(frame, order="C", copy=True)


def upload(frames: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 BGR frames of one size -> one (N, H, W, 3) uint8 BGR tensor on `device`:
    the frames' only trip to the device (pinned memory, non-blocking copy on CUDA)."""
    batch = np.stack(frames) if len(frames) > 1 else _plain(frames[0])[None]
    x = torch.from_numpy(batch)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def tensor_to_input(
    frames: torch.Tensor, spec: InputSpec, *, dtype: torch.dtype = torch.float32, channels_last: bool = False
) -> torch.Tensor:
    """(N, H, W, 3) uint8 BGR tensor, on any device -> normalised (N, 3, h, w) RGB model input
    on that device: resize and normalisation run where the frames already are."""
    device = frames.device
    height, width = frames.shape[1:3]
    # (N, H, W, 3) BGR -> (N, 3, H, W) RGB: the only BGR->RGB conversion on the device path.
    x = frames.permute(0, 3, 1, 2).flip(1)
    tw, th = spec.target_size(width, height)
    if (tw, th) != (width, height):
        x = F.interpolate(x.float(), size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(spec.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(spec.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x.float() - mean) * inv_std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous()
    return x.to(dtype) if dtype != torch.float32 else x


@functools.lru_cache(maxsize=8)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(256, 3) float32: row v is (v - mean) / std per RGB channel, computed with the same float32
    operations as the tensor path, so a lookup gives bit-identical values."""
    m = torch.tensor(mean, dtype=torch.float32)
    inv_std = 1.0 / torch.tensor(std, dtype=torch.float32)
    return ((torch.arange(256, dtype=torch.float32)[:, None] - m) * inv_std).numpy()


def _to_input_cpu(frames: Sequence[np.ndarray], spec: InputSpec, *, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """to_input on the CPU, in the fewest passes over the pixels.

    The uint8 BGR frames are resized as they are (per channel, so colour order does not matter
    to the filter), then one table lookup per value turns uint8 into normalised float32 and the
    channel order is flipped on the way (the only BGR->RGB conversion in streamseg). Flipping
    and normalising a full float tensor with torch costs several times more on a 2-core CPU.
    """
    height, width = frames[0].shape[:2]
    tw, th = spec.target_size(width, height)
    table = _normalise_table(tuple(spec.mean), tuple(spec.std))
    if (tw, th) != (width, height):
        batch = np.stack(frames) if len(frames) > 1 else _plain(frames[0])[None]
        # uint8 antialiased bilinear on the (N, 3, H, W) view of the (N, H, W, 3) frames: torch's
        # kernel for this layout is fast and equal to PIL's filter. Result: (N, 3, th, tw) BGR planes.
        small = F.interpolate(
            torch.from_numpy(batch).permute(0, 3, 1, 2), size=(th, tw), mode="bilinear", antialias=True, align_corners=False
        )
        planes = [tuple(small[i, c].contiguous().numpy() for c in range(3)) for i in range(len(frames))]
    else:
        planes = [tuple(cv2.split(np.ascontiguousarray(f))) for f in frames]  # (B, G, R)
    if channels_last:
        # (N, th, tw, 3) RGB float32 in memory is exactly a channels-last (N, 3, th, tw) tensor.
        out = np.empty((len(frames), th, tw, 3), np.float32)
        table3 = np.ascontiguousarray(table.reshape(256, 1, 3))
        for i, (b, g, r) in enumerate(planes):
            cv2.LUT(cv2.merge((r, g, b)), table3, dst=out[i])
        x = torch.from_numpy(out).permute(0, 3, 1, 2)
    else:
        out = np.empty((len(frames), 3, th, tw), np.float32)
        columns = [np.ascontiguousarray(table[:, c]) for c in range(3)]
        for i, bgr in enumerate(planes):
            for c in range(3):
                cv2.LUT(bgr[2 - c], columns[c], dst=out[i, c])
        x = torch.from_numpy(out)
    return x.to(dtype) if dtype != torch.float32 else x
