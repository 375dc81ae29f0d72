"""COCO I/O, class mapping and rasterisation; the mask-PNG layout reader."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pycocotools import mask as mask_utils

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
Overlap = Literal["max", "last", "first"]
Unknown = Literal["background", "class", "ignore"]


class DataError(ValueError):
    """Base of every dataset problem: the message names the file and the record."""


class CocoFormatError(DataError):
    """A COCO file is unreadable, not JSON, or misses a top-level key."""


class UnknownCategoryError(DataError):
    """A COCO category name has no entry in the configured class list."""


class LayoutError(DataError):
    """A mask-PNG dataset folder does not follow root/images, root/masks, root/classes.txt."""


@dataclass
class CocoFile:
    """One parsed COCO file with id lookups (duplicates are kept in the lists for validation to report)."""

    path: Path
    images: list[dict]
    annotations: list[dict]
    categories: list[dict]
    image_by_id: dict[int, dict] = field(default_factory=dict)
    anns_by_image: dict[int, list[dict]] = field(default_factory=dict)
    category_by_id: dict[int, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for im in self.images:
            if isinstance(im, dict) and "id" in im:
                self.image_by_id.setdefault(im["id"], im)
        grouped: dict[int, list[dict]] = defaultdict(list)
        for ann in self.annotations:
            if isinstance(ann, dict) and "image_id" in ann:
                grouped[ann["image_id"]].append(ann)
        self.anns_by_image = dict(grouped)
        for cat in self.categories:
            if isinstance(cat, dict) and "id" in cat:
                self.category_by_id.setdefault(cat["id"], cat)


def load_coco(path: Path) -> CocoFile:
    """Parse a COCO file; raise CocoFormatError naming the file for bad JSON or missing keys."""
    path = Path(path)
    if not path.is_file():
        raise CocoFormatError(f"{path}: file not found; check data.root and the dataset layout (data.layout)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CocoFormatError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); re-export or repair the file"
        ) from None
    except UnicodeDecodeError as e:
        raise CocoFormatError(f"{path}: not UTF-8 text ({e}); re-export the file as UTF-8 JSON") from None
    if not isinstance(raw, dict):
        raise CocoFormatError(f"{path}: top level must be an object with images/annotations/categories, "
                              f"got {type(raw).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in raw]
    if missing:
        raise CocoFormatError(f"{path}: missing top-level key(s) {missing}; a COCO file needs images, "
                              "annotations and categories (test files use `annotations: []`)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw[key], list):
            raise CocoFormatError(f"{path}: `{key}` must be a list, got {type(raw[key]).__name__}")
    return CocoFile(path, raw["images"], raw["annotations"], raw["categories"])


def class_map(
    categories: list[dict], classes: tuple[str, ...] | list[str], unknown: Unknown = "background",
    ignore_index: int = 255,
) -> dict[int, int]:
    """Map COCO category id -> pixel value by NAME (index in `classes`); UNKNOWN follows `unknown`."""
    exact = {name: i for i, name in enumerate(classes)}
    folded = {name.casefold(): i for i, name in enumerate(classes)}
    out: dict[int, int] = {}
    for cat in categories:
        name = str(cat.get("name", ""))
        if name.casefold() == "unknown":
            if unknown == "background":
                out[cat["id"]] = 0
            elif unknown == "ignore":
                out[cat["id"]] = ignore_index
            elif name.casefold() in folded:
                out[cat["id"]] = folded[name.casefold()]
            else:
                raise UnknownCategoryError(
                    f"category {cat.get('id')} `{name}`: data.unknown=class but `UNKNOWN` is not in data.classes "
                    f"{list(classes)}; add it to data.classes or set data.unknown to background|ignore"
                )
            continue
        idx = exact.get(name, folded.get(name.casefold()))
        if idx is None:
            raise UnknownCategoryError(
                f"category {cat.get('id')} `{name}` is not in data.classes; valid names: {list(classes)[1:]} "
                "(index 0 is the background); add it to data.classes or rename the category"
            )
        out[cat["id"]] = idx
    return out


def segmentation_rle(segmentation, height: int, width: int) -> dict:
    """COCO polygon list / uncompressed RLE / compressed RLE -> one compressed RLE (polygons merged)."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in segmentation], height, width)
        return mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    rle = dict(segmentation)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return rle


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """COCO polygon list / uncompressed RLE / compressed RLE -> (H, W) uint8 0/1 mask."""
    return mask_utils.decode(segmentation_rle(segmentation, height, width))


def segmentation_area(segmentation, height: int, width: int) -> int:
    """Pixel area after rasterisation (what the label PNG will hold)."""
    return int(mask_utils.area(segmentation_rle(segmentation, height, width)))


def rasterize(
    coco: CocoFile, image_id: int, cmap: dict[int, int], overlap: Overlap = "max", ignore_index: int = 255,
    skip_annotations: set[int] | frozenset[int] = frozenset(), with_overlap: bool = False,
):
    """Label mask (H, W) uint8 of one image; with_overlap=True also returns the count of multiply-covered pixels.

    Overlaps between classes follow `overlap`: max class index (the baseline's np.maximum), last or first in
    annotation order. Ignore-valued annotations (UNKNOWN -> ignore) only mark pixels no class covers, so an
    UNKNOWN box never erases a real object; background-valued ones draw nothing.
    """
    im = coco.image_by_id[image_id]
    h, w = int(im["height"]), int(im["width"])
    label = np.zeros((h, w), np.uint8)
    covered = np.zeros((h, w), bool)
    ignored = np.zeros((h, w), bool)
    count = np.zeros((h, w), np.uint8) if with_overlap else None
    for ann in coco.anns_by_image.get(image_id, []):
        if ann.get("id") in skip_annotations:
            continue
        value = cmap[ann["category_id"]]
        if value == 0:
            continue
        rle = segmentation_rle(ann["segmentation"], h, w)
        x, y, bw, bh = (int(v) for v in mask_utils.toBbox(rle))
        if bw == 0 or bh == 0:
            continue
        # work inside the object's box: most objects cover a small part of the photo, and whole-frame array
        # operations per annotation were 80% of the stage's time at the competition's size
        box = (slice(y, y + bh), slice(x, x + bw))
        m = mask_utils.decode(rle)[box].view(bool)
        if count is not None:
            count[box] += m
        if value == ignore_index:
            ignored[box] |= m
            continue
        lab = label[box]   # a view: writing into it writes into label
        if overlap == "max":
            np.maximum(lab, m * np.uint8(value), out=lab)
        elif overlap == "last":
            lab[m] = value
        else:  # first
            lab[m & ~covered[box]] = value
        covered[box] |= m
    label[ignored & (label == 0)] = ignore_index
    if with_overlap:
        return label, int((count > 1).sum())
    return label


@dataclass
class MaskPngDataset:
    """The mask-PNG layout: root/images/*, root/masks/<stem>.png, root/classes.txt, optional root/test/images/."""

    root: Path
    classes: tuple[str, ...]
    train: list[tuple[str, str]]   # (image path, mask path) relative to root, sorted by file name
    test: list[str]                # test image paths relative to root, sorted


def _images_in(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in found:
                raise LayoutError(f"{folder}: two images share the stem `{p.stem}` ({found[p.stem].name}, {p.name}); "
                                  "masks are matched by stem, rename one")
            found[p.stem] = p
    return found


def read_mask_png_layout(root: Path) -> MaskPngDataset:
    """Pair root/images/<stem>.* with root/masks/<stem>.png; raise LayoutError naming unpaired files."""
    root = Path(root)
    classes_file, images_dir, masks_dir = root / "classes.txt", root / "images", root / "masks"
    for p in (classes_file, images_dir, masks_dir):
        if not p.exists():
            raise LayoutError(f"{p}: missing; the mask-PNG layout needs root/images/, root/masks/ and "
                              "root/classes.txt (one class per line, line 1 = background)")
    classes = tuple(line.strip() for line in classes_file.read_text().splitlines() if line.strip())
    if len(classes) < 2:
        raise LayoutError(f"{classes_file}: needs at least 2 classes (background first), got {list(classes)}")
    images = _images_in(images_dir)
    masks = {p.stem: p for p in sorted(masks_dir.glob("*.png"))}
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        raise LayoutError(
            f"{root}: {len(no_mask)} image(s) without a mask {no_mask[:10]} and {len(no_image)} mask(s) without "
            f"an image {no_image[:10]}; every images/<stem>.* needs masks/<stem>.png"
        )
    train = [(str(images[s].relative_to(root)), str(masks[s].relative_to(root))) for s in sorted(images)]
    test_dir = root / "test" / "images"
    test = [str(p.relative_to(root)) for p in _images_in(test_dir).values()] if test_dir.is_dir() else []
    return MaskPngDataset(root, classes, train, test)
