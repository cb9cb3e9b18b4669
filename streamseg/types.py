"""Data passed between stages, and the error hierarchy.

Nothing here imports cv2 or torch: these types are what every other module agrees on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One picture from a source.

    image: (H, W, 3) uint8, BGR as OpenCV delivers it; read-only downstream.
    index: 0-based position in the source, skipped frames counted.
    timestamp_s: media time for files; for live sources the capture time on the monotonic clock
        (stats and recordings count from the stream's first frame).
    """

    image: np.ndarray
    index: int
    timestamp_s: float

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])


@dataclass(frozen=True, slots=True)
class Segmentation:
    """The model's answer for one frame.

    labels: (H, W) uint8 class id per pixel, at the frame's own resolution.
    categories: class names from the weights' metadata, background first.
    selected: the class ids the user asked for, in the order they asked.
    """

    frame: Frame
    labels: np.ndarray
    categories: tuple[str, ...]
    selected: tuple[int, ...]
    _histogram: Optional[np.ndarray] = field(default=None, init=False, repr=False, compare=False)

    @property
    def _counts(self) -> np.ndarray:
        # Counted on first use, in one pass over the label map: a video run without --stats or
        # --legend never asks (3 ms per 720p frame saved).
        if self._histogram is None:
            object.__setattr__(self, "_histogram", np.bincount(self.labels.ravel(), minlength=256))
        return self._histogram

    @property
    def pixel_count(self) -> int:
        return int(self.labels.size)

    def count(self, class_id: int) -> int:
        """Pixels labelled `class_id`."""
        return int(self._counts[class_id])

    def share(self, class_id: int) -> float:
        """Fraction (0..1) of the frame labelled `class_id`."""
        return self.count(class_id) / max(1, self.pixel_count)

    @property
    def shares(self) -> dict[str, float]:
        """Selected class name -> fraction of the frame (0..1)."""
        return {self.categories[c]: self.share(c) for c in self.selected}

    @property
    def present(self) -> tuple[int, ...]:
        """Selected class ids that cover at least one pixel."""
        return tuple(c for c in self.selected if self._counts[c] > 0)


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """What a video source reports about itself.

    fps is a float (29.97 stays 29.97); frame_count is None when unknown (cameras, streams).
    """

    width: int
    height: int
    fps: float
    frame_count: Optional[int]
    live: bool
    name: str


class StreamsegError(Exception):
    """An error the user can act on; the CLI prints it as one line."""

    exit_code = 1


class UsageError(StreamsegError):
    """A bad command line: exit status 2."""

    exit_code = 2


class SourceError(StreamsegError):
    """An input that cannot be opened or read."""


class SinkError(StreamsegError):
    """An output that cannot be written."""


class ModelLoadError(StreamsegError):
    """A model or weights file that cannot be loaded."""


class DeviceError(StreamsegError):
    """A device that was asked for and is not there."""
