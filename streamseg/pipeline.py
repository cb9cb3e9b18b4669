"""The order of stages: read, segment, paint, write. The only module that knows it.

Still images run in the caller's thread; video runs in `video.py`'s threads. No printing here:
results are yielded to the CLI (or any caller) to report.
"""
from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from .overlay import Painter, draw_legend
from .sinks import JsonLines, check_dir, check_target, ensure_dir, write_png
from .sources import IMAGE_OUTPUT_KINDS, read_image
from .segmenter import Segmenter
from .types import Segmentation, SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageResult:
    """What happened to one still image: its segmentation and files, or the error that stopped it."""

    path: Path
    segmentation: Optional[Segmentation] = None
    outputs: tuple[Path, ...] = ()
    error: Optional[str] = None


def image_outputs(path: Path, out_dir: Path) -> tuple[Path, Path, Path]:
    """<stem>_overlay.png, <stem>_mask.png, <stem>_labels.png in out_dir."""
    overlay, mask, labels = (out_dir / f"{path.stem}{kind}.png" for kind in IMAGE_OUTPUT_KINDS)
    return overlay, mask, labels


def class_record(seg: Segmentation) -> dict:
    """{"car": {"pixels": 27694, "share": 0.0301}, ...} for the selected classes."""
    return {
        seg.categories[c]: {"pixels": seg.count(c), "share": round(seg.share(c), 6)} for c in seg.selected
    }


def check_image_targets(paths: Sequence[Path], out_dir: Path, *, overwrite: bool) -> None:
    """Fail before any work when an output would clobber an existing file or an input."""
    check_dir(out_dir)
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems and stems[p.stem] != p:
            raise SourceError(f"'{p}' and '{stems[p.stem]}' would write the same outputs; segment them into different -o directories")
        stems[p.stem] = p
        for target in image_outputs(p, out_dir):
            check_target(target, overwrite=overwrite, inputs=tuple(paths))


def run_images(
    paths: Sequence[Path],
    segmenter: Segmenter,
    *,
    out_dir: Path,
    alpha: float = 0.5,
    legend: bool = False,
    stats: Optional[JsonLines] = None,
    writing: Callable[[], AbstractContextManager] = nullcontext,
) -> Iterator[ImageResult]:
    """Segment each image with the one loaded model; write overlay, mask and labels PNGs.

    A bad image yields an ImageResult with `error` set and the run goes on with the next one.
    One image's three PNGs and its stats line are written inside `writing()`: the CLI holds
    Ctrl-C and SIGTERM back there (a few milliseconds), so an interrupted run leaves every image
    with all of its files and its stats line, or with none of them.
    """
    painter = Painter(selected=segmenter.selected, palette=segmenter.palette, alpha=alpha)
    for path in paths:
        try:
            image = read_image(path)
        except SourceError as exc:
            yield ImageResult(path=path, error=_too_large(path) or str(exc))
            continue
        try:
            seg = segmenter(image)
        except SourceError as exc:  # a shape the model cannot take (preprocess.MAX_SQUARES)
            yield ImageResult(path=path, error=f"image '{path}': {exc}")
            continue
        ensure_dir(out_dir)  # created on first use: a failed run leaves no empty directory
        overlay = painter.blend(image, seg.labels)
        if legend:
            overlay = draw_legend(overlay, seg.present, seg.categories, segmenter.palette)
        targets = image_outputs(path, out_dir)
        pictures = (overlay, painter.colour_mask(seg.labels), seg.labels)
        record = None
        if stats is not None:
            h, w = seg.labels.shape
            record = {"source": str(path), "width": w, "height": h, "classes": class_record(seg)}
        with writing():
            for target, picture in zip(targets, pictures):
                write_png(target, picture)
            if stats is not None:
                stats.write(record)
        yield ImageResult(path=path, segmentation=seg, outputs=targets)


# OpenCV refuses to decode images with more pixels than this (its default; the variable raises it).
_CV_MAX_PIXELS_ENV = "CV_IO_MAX_IMAGE_PIXELS"


def _too_large(path: Path) -> Optional[str]:
    """Why an image OpenCV would not decode is refused, where its header says it is too large:
    "could not be decoded ... corrupt" would send the user looking for damage that is not there.
    Reads the size from the header only (PIL opens lazily); None where it cannot, or it is not that."""
    try:
        limit = int(os.environ.get(_CV_MAX_PIXELS_ENV, "") or 1 << 30)
    except ValueError:
        limit = 1 << 30
    from PIL import Image

    # PIL refuses to even open such a file (its own decompression-bomb guard), though nothing is
    # decoded here; lift that guard for the header read alone.
    guard = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception:  # not an image PIL knows, unreadable, corrupt header: the first reason stands
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = guard
    if width * height <= limit:
        return None
    return (f"image '{path}' is too large: {width}x{height} is {width * height:,} pixels, more than the "
            f"{limit:,} OpenCV decodes (the {_CV_MAX_PIXELS_ENV} environment variable raises that limit)")
