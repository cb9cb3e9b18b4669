"""labels.py: `--classes` parsing (names, ids, groups) and the palette, on torchvision's own VOC names."""
from __future__ import annotations

import numpy as np
import pytest

from streamseg.labels import CAR_PINK_RGB, GROUPS, palette, parse_classes
from streamseg.types import UsageError


@pytest.fixture(scope="module")
def voc() -> tuple[str, ...]:
    """Category names as the default weights' metadata gives them (not typed in by hand)."""
    from streamseg.model import weights_for

    return tuple(weights_for("deeplabv3_resnet101").meta["categories"])


def test_voc_metadata_is_what_the_issue_assumes(voc):
    assert len(voc) == 21
    assert voc[0] == "__background__"
    assert voc[7] == "car"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("car", (7,)),
        ("7", (7,)),
        ("car,person", (7, 15)),
        ("person,car", (15, 7)),  # the user's order is kept
        (" Car , PERSON ", (7, 15)),
        ("car,7,car", (7,)),  # duplicates collapse
        ("15,car", (15, 7)),
        ("diningtable", (11,)),
        ("dining_table", (11,)),
        ("pottedplant,tv-monitor", (16, 20)),
        ("car,,", (7,)),
    ],
)
def test_names_and_ids(voc, spec, expected):
    assert parse_classes(spec, voc) == expected


def test_vehicles_group(voc):
    ids = parse_classes("vehicles", voc)
    assert sorted(voc[i] for i in ids) == ["bicycle", "bus", "car", "motorbike", "train"]
    assert set(GROUPS["vehicles"]) == {"bicycle", "bus", "car", "motorbike", "train"}


def test_group_combined_with_names_has_no_duplicates(voc):
    ids = parse_classes("car,vehicles,person", voc)
    assert ids[0] == 7
    assert len(ids) == len(set(ids)) == 6
    assert 15 in ids


def test_all_is_every_class_but_background(voc):
    assert parse_classes("all", voc) == tuple(range(1, 21))
    assert parse_classes("ALL", voc) == tuple(range(1, 21))


def test_unknown_name_lists_the_valid_names(voc):
    with pytest.raises(UsageError) as info:
        parse_classes("car,carr", voc)
    message = str(info.value)
    assert "'carr'" in message
    for name in ("aeroplane", "car", "tvmonitor", "vehicles", "all"):
        assert name in message
    assert "__background__" not in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("spec", ["21", "99"])
def test_id_out_of_range(voc, spec):
    with pytest.raises(UsageError, match=rf"{spec}.*0-20"):
        parse_classes(spec, voc)


@pytest.mark.parametrize("spec", ["", " , ", ","])
def test_empty_selection_is_an_error(voc, spec):
    with pytest.raises(UsageError, match="selects no class"):
        parse_classes(spec, voc)


def test_group_on_a_model_without_those_classes():
    cats = ("background", "road", "sky")
    with pytest.raises(UsageError, match="selects no class"):
        parse_classes("vehicles", cats)
    assert parse_classes("all", cats) == (1, 2)
    assert parse_classes("sky", cats) == (2,)


def test_palette_car_keeps_the_baseline_pink_in_bgr(voc):
    table = palette(voc)
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert tuple(int(v) for v in table[7]) == (147, 20, 255)
    assert tuple(CAR_PINK_RGB[::-1]) == (147, 20, 255)


def test_palette_voc_colours_are_distinct_and_visible(voc):
    table = palette(voc)
    colours = {tuple(int(v) for v in table[i]) for i in range(1, 21)}
    assert len(colours) == 20
    assert (0, 0, 0) not in colours  # black is the mask's "nothing here"


def test_every_voc_name_has_a_fixed_colour(voc):
    """A category name the table does not know would silently fall back to a computed hue."""
    from streamseg.labels import NAMED_COLOURS_RGB

    assert set(voc[1:]) <= set(NAMED_COLOURS_RGB)


def test_palette_is_fixed_by_name_not_by_id(voc):
    """The same name keeps its colour in a model whose ids differ (an ONNX model's own order)."""
    reordered = ("background", "person", "car")
    table = palette(reordered)
    base = palette(voc)
    assert (table[2] == base[7]).all()
    assert (table[1] == base[15]).all()


def test_palette_unknown_names_get_distinct_colours():
    cats = ["background"] + [f"thing{i}" for i in range(40)]
    table = palette(cats)
    colours = {tuple(int(v) for v in table[i]) for i in range(1, len(cats))}
    assert len(colours) == 40
    assert (0, 0, 0) not in colours
    assert (palette(cats) == table).all()  # fixed: the same every time
