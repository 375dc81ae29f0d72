"""COCO reader and rasteriser on the real COCO fixture and on hand-made records; the mask-PNG layout reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.coco import (
    CocoFile, CocoFormatError, LayoutError, UnknownCategoryError, class_map, decode_segmentation, load_coco,
    rasterize, read_mask_png_layout,
)

from tests.conftest import COCO_SAMPLE as REAL
REAL_JSON = REAL / "annotations" / "instances_val2017_subset.json"


@pytest.fixture(scope="module")
def real() -> CocoFile:
    if not REAL_JSON.exists():
        pytest.skip(f"{REAL_JSON} not present")
    return load_coco(REAL_JSON)


def real_classes(coco: CocoFile) -> tuple[str, ...]:
    return ("Background", *[c["name"] for c in sorted(coco.categories, key=lambda c: c["id"])])


def test_real_fixture_loads(real):
    assert len(real.images) == 10 and len(real.annotations) == 77 and len(real.categories) == 80
    assert len({(i["width"], i["height"]) for i in real.images}) > 1           # not all one size
    assert max(c["id"] for c in real.categories) == 90                          # non-contiguous ids
    assert sum(1 for a in real.annotations if isinstance(a["segmentation"], dict)) == 1
    assert all(a["image_id"] in real.image_by_id for a in real.annotations)


def test_real_fixture_rasterises_to_annotation_areas(real):
    classes = real_classes(real)
    cmap = class_map(real.categories, classes)
    assert cmap[90] == 80 and cmap[1] == 1                                      # by name, not by id
    seen = set()
    for im in real.images:
        mask = rasterize(real, im["id"], cmap, "max")
        assert mask.shape == (im["height"], im["width"]) and mask.dtype == np.uint8
        for ann in real.anns_by_image.get(im["id"], []):
            px = int(decode_segmentation(ann["segmentation"], im["height"], im["width"]).sum())
            # COCO's stored area is the polygon area; rasterised pixels differ only at the boundary
            assert abs(px - ann["area"]) <= 0.1 * ann["area"] + 60, ann["id"]
            seen.add(cmap[ann["category_id"]])
        assert set(np.unique(mask)) - {0} <= {cmap[a["category_id"]] for a in real.anns_by_image.get(im["id"], [])}
    assert len(seen) == 18
    crowd = next(a for a in real.annotations if isinstance(a["segmentation"], dict))
    im = real.image_by_id[crowd["image_id"]]
    px = int(decode_segmentation(crowd["segmentation"], im["height"], im["width"]).sum())
    assert px == sum(crowd["segmentation"]["counts"][1::2])      # runs of 1s; COCO's stored area says 743, not 710


def _toy() -> CocoFile:
    images = [{"id": 7, "file_name": "a.jpg", "width": 40, "height": 30}]
    square = lambda x0, y0, x1, y1: [[x0, y0, x1, y0, x1, y1, x0, y1]]  # noqa: E731
    anns = [
        {"id": 1, "image_id": 7, "category_id": 20, "segmentation": square(0, 0, 20, 20)},   # Glass (5)
        {"id": 2, "image_id": 7, "category_id": 10, "segmentation": square(10, 10, 30, 30)},  # Paper (2)
        {"id": 3, "image_id": 7, "category_id": 99, "segmentation": square(25, 0, 40, 10) + square(0, 25, 5, 30)},
    ]
    cats = [{"id": 20, "name": "Glass"}, {"id": 10, "name": "paper"}, {"id": 99, "name": "UNKNOWN"}]
    return CocoFile(Path("toy.json"), images, anns, cats)


@pytest.mark.parametrize("overlap, centre", [("max", 5), ("last", 2), ("first", 5)])
def test_overlap_rules(overlap, centre):
    coco = _toy()
    cmap = class_map(coco.categories, ("Background", "x", "Paper", "y", "z", "Glass"), "ignore", 255)
    assert cmap == {20: 5, 10: 2, 99: 255}                                     # case-insensitive names
    mask = rasterize(coco, 7, cmap, overlap, 255)
    assert mask[15, 15] == centre and mask[5, 5] == 5 and mask[25, 25] == 2
    assert mask[5, 30] == 255 and mask[27, 2] == 255                           # multi-polygon UNKNOWN -> ignore
    assert (mask == 255).sum() == 15 * 10 + 5 * 5


def test_unknown_rules_and_errors():
    coco = _toy()
    classes = ("Background", "x", "Paper", "y", "z", "Glass")
    assert class_map(coco.categories, classes, "background")[99] == 0
    assert class_map(coco.categories, classes + ("Unknown",), "class")[99] == 6
    with pytest.raises(UnknownCategoryError, match="UNKNOWN"):
        class_map(coco.categories, classes, "class")
    with pytest.raises(UnknownCategoryError, match=r"`Glass` is not in data.classes; valid names: \['x', 'Paper'"):
        class_map(coco.categories, ("Background", "x", "Paper"))


@pytest.mark.parametrize("text, match", [
    ("{not json", r"bad\.json: not valid JSON \(line 1"),
    ('{"images": [], "categories": []}', r"missing top-level key\(s\) \['annotations'\]"),
    ("[1, 2]", "top level must be an object"),
    ('{"images": {}, "annotations": [], "categories": []}', "`images` must be a list"),
])
def test_load_coco_errors(tmp_path, text, match):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(CocoFormatError, match=match):
        load_coco(tmp_path / "bad.json")


def test_mask_png_layout(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "test" / "images").mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("background\ncat\n")
    for stem in ("b", "a"):
        Image.new("RGB", (8, 6)).save(tmp_path / "images" / f"{stem}.jpg")
        Image.new("L", (8, 6)).save(tmp_path / "masks" / f"{stem}.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "test" / "images" / "t.png")
    ds = read_mask_png_layout(tmp_path)
    assert ds.classes == ("background", "cat")
    assert ds.train == [("images/a.jpg", "masks/a.png"), ("images/b.jpg", "masks/b.png")]
    assert ds.test == ["test/images/t.png"]
    Image.new("L", (8, 6)).save(tmp_path / "masks" / "orphan.png")
    with pytest.raises(LayoutError, match=r"1 mask\(s\) without an image \['orphan'\]"):
        read_mask_png_layout(tmp_path)
