"""streamseg: semantic segmentation of camera streams, dashcam videos and still images.

    >>> import streamseg
    >>> seg = streamseg.Segmenter("deeplabv3_resnet101", classes="car")   # doctest: +SKIP
    >>> overlay = streamseg.Painter(selected=seg.selected, palette=seg.palette).blend(frame, seg(frame).labels)  # doctest: +SKIP

Importing the package loads nothing heavy: torch comes in on first use of `Segmenter`.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Segmenter", "Segmentation", "Frame", "VideoInfo", "Painter", "draw_legend", "__version__"]


def __getattr__(name: str):
    # Lazy attributes keep `import streamseg` and `streamseg --version` free of torch and cv2.
    if name == "Segmenter":
        from .segmenter import Segmenter

        return Segmenter
    if name in ("Painter", "draw_legend"):
        from . import overlay

        return getattr(overlay, name)
    if name in ("Segmentation", "Frame", "VideoInfo"):
        from . import types

        return getattr(types, name)
    raise AttributeError(f"module 'streamseg' has no attribute {name!r}")
