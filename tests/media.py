"""Test videos written with PyAV: one encoding loop for every synthetic clip the tests make."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import av
import numpy as np


def encode_video(path: Path, images: Iterable[np.ndarray], *, width: int, height: int,
                 rate: Union[int, Fraction] = 25, codec: str = "libx264", pix_fmt: str = "yuv420p",
                 options: Optional[Mapping[str, str]] = None, container_format: Optional[str] = None,
                 container_options: Optional[Mapping[str, str]] = None) -> Path:
    """Encode (height, width, 3) uint8 BGR `images` as `codec` into `path`; returns `path`."""
    with av.open(str(path), "w", format=container_format, options=dict(container_options or {})) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if options:
            stream.options = dict(options)
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded_frames(path: Path) -> int:
    """How many frames PyAV decodes from `path`."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))
