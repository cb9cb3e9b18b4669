"""Colouring and blending on the model's device, for the CUDA fast path.

The same arithmetic as `overlay.Painter.blend` (cv2.addWeighted, rounded to nearest), written
with torch ops so that frames uploaded once for the model are painted where they already are
and come back in the same download as their label map.
"""
from __future__ import annotations

import numpy as np
import torch


def device_tables(lut: np.ndarray, mask_lut: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Painter's (256, 3) uint8 BGR colour table and (256,) uint8 0/255 mask table, on `device`."""
    return (
        torch.from_numpy(np.ascontiguousarray(lut)).to(device),
        torch.from_numpy(np.ascontiguousarray(mask_lut)).to(device) > 0,
    )


def blend_tensor(
    frames: torch.Tensor, labels: torch.Tensor, lut: torch.Tensor, selected: torch.Tensor, alpha: float
) -> torch.Tensor:
    """(N, H, W, 3) uint8 BGR frames + (N, H, W) uint8 labels -> (N, H, W, 3) uint8 BGR overlays.

    Pixels of a selected class become (1 - alpha) * frame + alpha * colour; the rest keep the
    frame. One table lookup and one blend over the batch, no loop over classes.
    """
    idx = labels.long()
    colour = lut[idx]  # (N, H, W, 3)
    mask = selected[idx].unsqueeze(-1)  # (N, H, W, 1)
    blended = (frames.float() * (1.0 - alpha) + colour.float() * alpha).round_().clamp_(0, 255).to(torch.uint8)
    return torch.where(mask, blended, frames)
