"""Class names, `--classes` parsing and the colour palette.

Category names always come from the model (torchvision weights' metadata or the ONNX file's
`streamseg.categories`); this module only knows which colour each well-known name gets.
"""
from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np

from .types import UsageError

#: The baseline script's car colour, kept so results look the same.
CAR_PINK_RGB = (255, 20, 147)

#: Fixed, distinct colours (RGB) for the PASCAL VOC classes.
NAMED_COLOURS_RGB: dict[str, tuple[int, int, int]] = {
    "aeroplane": (70, 240, 240),
    "bicycle": (60, 180, 75),
    "bird": (255, 225, 25),
    "boat": (0, 128, 128),
    "bottle": (170, 110, 40),
    "bus": (245, 130, 48),
    "car": CAR_PINK_RGB,
    "cat": (145, 30, 180),
    "chair": (128, 128, 128),
    "cow": (128, 128, 0),
    "diningtable": (210, 245, 60),
    "dog": (170, 255, 195),
    "horse": (128, 0, 0),
    "motorbike": (230, 25, 75),
    "person": (67, 99, 216),
    "pottedplant": (0, 100, 0),
    "sheep": (255, 250, 200),
    "sofa": (220, 190, 255),
    "train": (0, 0, 128),
    "tvmonitor": (255, 140, 100),
}

#: Named groups for `--classes`; "all" means every class but the background.
GROUPS: dict[str, tuple[str, ...]] = {
    "vehicles": ("bicycle", "bus", "car", "motorbike", "train"),
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace(" ", "").replace("_", "").replace("-", "")


def parse_classes(spec: str, categories: Sequence[str]) -> tuple[int, ...]:
    """Turn "car,person", "7", "vehicles" or "all" into class ids of `categories`.

    >>> parse_classes("car,15", VOC)   # doctest: +SKIP
    (7, 15)

    Raises UsageError naming the unknown entry and listing the valid names.
    """
    lookup = {_normalise(n): i for i, n in enumerate(categories)}
    ids: list[int] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        key = _normalise(item)
        if key == "all":
            found = list(range(1, len(categories)))
        elif key in GROUPS:
            found = [lookup[_normalise(n)] for n in GROUPS[key] if _normalise(n) in lookup]
        elif item.isascii() and item.isdigit():  # '7'; not '³' or '٧', which int() reads differently or not at all
            if not 0 <= int(item) < len(categories):
                raise UsageError(
                    f"class id {item} is out of range: this model has ids 0-{len(categories) - 1}"
                )
            found = [int(item)]
        elif key in lookup:
            found = [lookup[key]]
        else:
            valid = ", ".join(list(categories[1:]) + sorted(GROUPS) + ["all"])
            raise UsageError(f"unknown class '{item}'; valid names: {valid}")
        ids.extend(i for i in found if i not in ids)
    if not ids:
        raise UsageError(f"--classes '{spec}' selects no class")
    return tuple(ids)


def palette(categories: Sequence[str]) -> np.ndarray:
    """(256, 3) uint8 BGR colour per class id; unnamed classes get evenly spread hues."""
    table = np.zeros((256, 3), np.uint8)
    for i, name in enumerate(categories[:256]):
        rgb = NAMED_COLOURS_RGB.get(_normalise(name))
        if rgb is None:
            # Golden-ratio hue steps keep neighbouring ids far apart in colour.
            h = (i * 0.618033988749895) % 1.0
            rgb = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(h, 0.75, 1.0))
        table[i] = rgb[::-1]  # stored BGR, as frames are
    return table
