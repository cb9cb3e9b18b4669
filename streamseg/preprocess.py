"""The one path from (H, W, 3) uint8 BGR frames to the model's input tensor.

Every mode (images, video files, cameras, streams) and every backend (torch, ONNX) goes through
`to_input`. For torchvision weights it reproduces `weights.transforms()` on a PIL image: shorter
side resized to 520 with antialiased bilinear filtering, then ImageNet mean/std. torch's uint8
antialiased bilinear kernel is built to match PIL's, so the two agree to about 1e-5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class InputSpec:
    """How a model wants its input.

    size: (width, height) for a fixed-size model, or an int for "resize the shorter side to N,
    keep the aspect ratio" (torchvision's segmentation transforms), or None for "as it comes".
    mean, std: per channel, RGB order, 0-255 scale.
    """

    size: Union[tuple[int, int], int, None]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the model sees for a frame of width x height."""
        if self.size is None:
            return width, height
        if isinstance(self.size, tuple):
            return self.size
        # Same rounding as torchvision's F.resize with an int size: the long side is truncated.
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (self.size, new_long) if width <= height else (new_long, self.size)


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
    height, width = frames[0].shape[:2]
    batch = np.stack(frames) if len(frames) > 1 else frames[0][None]
    x = torch.from_numpy(batch)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        x = x.to(device)
    # (N, H, W, 3) BGR -> (N, 3, H, W) RGB: the only BGR->RGB conversion in streamseg.
    x = x.permute(0, 3, 1, 2).flip(1)
    tw, th = spec.target_size(width, height)
    if (tw, th) != (width, height):
        if device.type == "cpu":
            # uint8 antialiased bilinear: fast on the CPU and equal to PIL's filter.
            x = F.interpolate(x.contiguous(), size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
        else:
            x = F.interpolate(x.float(), size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(spec.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(spec.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x.float() - mean) * inv_std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous()
    return x.to(dtype) if dtype != torch.float32 else x
