"""COCO I/O, class mapping and rasterisation; the mask-PNG layout reader.

Every segmentation goes through `check_segmentation` before pycocotools sees it, in validation and in
rasterisation alike: pycocotools is C code that trusts its input (a coordinate of 1e10 overflows its int
arithmetic and segfaults; RLE runs that do not add up to H x W are read past the mask), so what it is handed must
already be known to be safe.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
Overlap = Literal["max", "last", "first"]
Unknown = Literal["background", "class", "ignore"]

COORD_TOLERANCE = 1.0   # px: exporters write edge vertices at exactly width/height, sometimes a rounding beyond
# The largest image a COCO record may claim: PIL refuses to decode more pixels than this (DecompressionBombError),
# so no larger size can ever match its photo; it also keeps pycocotools' int/uint arithmetic (5 x coordinate,
# row x height + column) far from overflow.
MAX_IMAGE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# pycocotools walks a polygon's boundary in 1/5-px steps and allocates 16 bytes a step (four int arrays). An
# annotation's polygons may together be at most this many times the image's perimeter 2(H + W) long, so
# rasterising one annotation allocates at most 16 x 5 x 32 x 2(H + W) B = 5 KiB x (H + W) (5 MiB at 512 px)
# besides the H x W mask it decodes, whatever its coordinates say. Real outlines are a small fraction of that.
MAX_BOUNDARY_LAPS = 32
STEPS_PER_PX = 5        # pycocotools' polygon upsampling factor


class DataError(ValueError):
    """Base of every dataset problem: the message names the file and the record."""


class CocoFormatError(DataError):
    """A COCO file is unreadable, not JSON, or misses a top-level key."""


class UnknownCategoryError(DataError):
    """A COCO category name has no entry in the configured class list."""


class LayoutError(DataError):
    """A mask-PNG dataset folder does not follow root/images, root/masks, root/classes.txt."""


class SegmentationError(DataError):
    """A segmentation that is unsafe or wrong to rasterise; `.code` is its validation problem code."""

    def __init__(self, message: str, code: str = "invalid_segmentation"):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return type(self), (str(self), self.code)


def is_int(value) -> bool:
    """A JSON integer (or a numpy one, from callers in code), not bool: True == 1 would pass as an id or a size."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float as JSON numbers parse (numpy ones from code too); not bool, not a numeric string."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def mask_name(file_name: str) -> str:
    """The label mask of an image, relative to the masks folder: its file name with the suffix .png, normalised
    (`a/./b.jpg` -> `a/b.png`), so two records with one mask name would overwrite each other's mask."""
    p = PurePosixPath(file_name)
    return str(p.with_suffix(".png")) if p.name not in ("", ".", "..") else ""


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
        # only integer ids are indexed: a record with any other id is a validation problem of its own, and a list
        # or dict id is unhashable (it crashed this lookup before)
        for im in self.images:
            if isinstance(im, dict) and is_int(im.get("id")):
                self.image_by_id.setdefault(im["id"], im)
        grouped: dict[int, list[dict]] = defaultdict(list)
        for ann in self.annotations:
            if isinstance(ann, dict) and is_int(ann.get("image_id")):
                grouped[ann["image_id"]].append(ann)
        self.anns_by_image = dict(grouped)
        for cat in self.categories:
            if isinstance(cat, dict) and is_int(cat.get("id")):
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


@dataclass
class SegmentationCheck:
    """What `check_segmentation` found: validation's per-polygon facts and every reason not to rasterise."""

    kind: str                                              # polygon | rle | invalid
    polygons: list[dict] = field(default_factory=list)     # per polygon: n_points, odd, has_nan, min/max, problems
    steps: int = 0                                         # pycocotools' boundary walk over all polygons
    max_steps: int = 0                                     # its limit for this image (MAX_BOUNDARY_LAPS)
    problems: list[tuple[str, str]] = field(default_factory=list)   # (code, what is wrong); empty: safe

    @property
    def ok(self) -> bool:
        return not self.problems


def image_size_problem(height, width) -> str:
    """Why (height, width) cannot be an image's size (not positive integers, more than MAX_IMAGE_PIXELS), or ""."""
    if not (is_int(height) and is_int(width)):
        return f"height {as_json(height)} / width {as_json(width)} are not both integers"
    if height < 1 or width < 1:
        return f"size {width}x{height} is not positive"
    if height * width > MAX_IMAGE_PIXELS:
        return f"size {width}x{height} is more than {MAX_IMAGE_PIXELS} pixels, larger than any photo PIL decodes"
    return ""


def check_segmentation(segmentation, height, width) -> SegmentationCheck:
    """Check a COCO segmentation for an image of (height, width) without handing anything to pycocotools.

    Polygons: a non-empty list of flat [x1, y1, x2, y2, ...] lists of >= 3 finite numbers (bool and numeric strings
    are not numbers), inside the image up to COORD_TOLERANCE, outline within MAX_BOUNDARY_LAPS (the memory bound).
    RLE: `size` equal to [height, width], `counts` a list of non-negative integer runs or a well-formed compressed
    string, the runs adding up to height x width exactly. Facts are gathered even where the size is unusable
    (validation reports that on the image), but such a check is never ok.
    """
    size_problem = image_size_problem(height, width)
    if isinstance(segmentation, list) and segmentation and all(isinstance(p, list) for p in segmentation):
        check = _check_polygons(segmentation, height, width, not size_problem)
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        check = _check_rle(segmentation, height, width, not size_problem)
    else:
        check = SegmentationCheck("invalid", problems=[(
            "invalid_segmentation", f"segmentation {as_json(segmentation, 60)} is neither a list of polygons "
            "[[x1, y1, x2, y2, ...], ...] nor an RLE {size, counts}")])
    if size_problem:
        check.problems.append(("image_invalid_size", f"its image's {size_problem}"))
    return check


def as_json(value, limit: int = 40) -> str:
    """A value as the JSON file spells it (NaN, Infinity, null, true, "64"), cut to `limit` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coordinates(poly: list) -> tuple[np.ndarray | None, object]:
    """Float array of a polygon's coordinates, or (None, the first value that is not a finite number)."""
    # set(map(type)) first: per coordinate, is_number's isinstance calls were 40% of the check's time
    if set(map(type, poly)) <= {int, float} or all(is_number(v) for v in poly):
        try:
            xy = np.array(poly, float)
        except OverflowError:      # an integer beyond the float range
            xy = None
        if xy is not None and np.isfinite(xy).all():
            return xy, None
    for v in poly:
        if not is_number(v):
            return None, v
        try:
            if not math.isfinite(float(v)):
                return None, v
        except OverflowError:
            return None, v
    return None, None   # unreachable: some value failed above


def _check_polygons(segmentation: list, height, width, size_ok: bool) -> SegmentationCheck:
    check = SegmentationCheck("polygon")
    all_inside = True      # finite and inside: only then is the outline's length a problem of its own
    for k, poly in enumerate(segmentation):
        xy, bad = _coordinates(poly)
        n_points, odd = len(poly) // 2, len(poly) % 2 == 1
        found: dict[str, str] = {}
        facts = {"n_points": n_points, "odd": odd, "has_nan": xy is None, "min_x": math.nan, "min_y": math.nan,
                 "max_x": math.nan, "max_y": math.nan, "problems": found}
        if n_points < 3:
            found["polygon_too_few_points"] = f"polygon {k} has {n_points} point(s), needs >= 3"
        if odd:
            found["polygon_odd_coordinates"] = f"polygon {k} has an odd number of coordinates ({len(poly)})"
        if xy is None:
            all_inside = False
            found["polygon_nan"] = (f"polygon {k} has NaN, infinite or non-numeric coordinates (e.g. {as_json(bad)}"
                                    ")")
        elif n_points:
            pts = xy[: 2 * n_points].reshape(-1, 2)
            (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
            facts.update(min_x=float(x0), min_y=float(y0), max_x=float(x1), max_y=float(y1))
            # pycocotools' walk: per edge max(|dx|, |dy|) in 1/5 px, plus a step or two per vertex
            edges = np.abs(np.diff(pts, axis=0, append=pts[:1])).max(axis=1)
            check.steps += int(np.ceil(STEPS_PER_PX * edges.sum())) + 2 * n_points
            tol = COORD_TOLERANCE
            outside = ([f"x = {x0:g} < 0"] if x0 < -tol else []) + ([f"y = {y0:g} < 0"] if y0 < -tol else []) + (
                [f"x = {x1:g} beyond the image width {width}"] if size_ok and x1 > width + tol else []) + (
                [f"y = {y1:g} beyond the image height {height}"] if size_ok and y1 > height + tol else [])
            if outside:
                all_inside = False
                found["polygon_outside_image"] = (f"polygon {k} has {', '.join(outside)} (more than {tol:g} px "
                                                  "outside the image)")
        check.problems += list(found.items())
        check.polygons.append(facts)
    if size_ok:
        check.max_steps = STEPS_PER_PX * MAX_BOUNDARY_LAPS * 2 * (height + width)
        if all_inside and check.steps > check.max_steps:
            check.problems.append(("polygon_too_long", f"its polygons' outline ({check.steps} steps of 1/5 px, "
                                   f"{sum(f['n_points'] for f in check.polygons)} vertices) is longer than "
                                   f"{MAX_BOUNDARY_LAPS} times the image's perimeter ({check.max_steps} steps)"))
    return check


def _check_rle(rle: dict, height, width, size_ok: bool) -> SegmentationCheck:
    check = SegmentationCheck("rle")
    size, counts = rle["size"], rle["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
        check.problems.append(("rle_invalid", f"RLE size {as_json(size)} is not [height, width] integers"))
        return check
    if size_ok and size != [height, width]:
        check.problems.append(("rle_size_mismatch", f"RLE size {size} differs from the image's [height, width] "
                               f"[{height}, {width}]"))
    if image_size_problem(*size):
        check.problems.append(("rle_invalid", f"RLE size {size}: {image_size_problem(*size)}"))
        return check
    n_pixels = size[0] * size[1]
    if isinstance(counts, list):
        if not all(is_int(v) for v in counts):
            bad = next(v for v in counts if not is_int(v))
            check.problems.append(("rle_invalid", f"RLE counts hold {as_json(bad)}, not an integer run length"))
            return check
        runs = counts
    elif isinstance(counts, (str, bytes)):
        runs = _compressed_runs(counts, n_pixels)
        if isinstance(runs, str):
            check.problems.append(("rle_invalid", f"RLE counts string is malformed: {runs}"))
            return check
    else:
        check.problems.append(("rle_invalid", f"RLE counts {as_json(counts)} is neither a list of run lengths nor a "
                               "compressed RLE string"))
        return check
    # more runs than pixels + 1 cannot be a mask of this size: checked first, so the sum below stays cheap
    if len(runs) > n_pixels + 1:
        check.problems.append(("rle_invalid", f"RLE has {len(runs)} runs, more than its {n_pixels} pixels"))
    elif any(v < 0 for v in runs):
        check.problems.append(("rle_invalid", "RLE counts hold a negative run length"))
    elif sum(runs) != n_pixels:
        check.problems.append(("rle_invalid", f"RLE runs add up to {sum(runs)} pixels, not its size "
                               f"{size[0]} x {size[1]} = {n_pixels}"))
    return check


def _compressed_runs(counts: str | bytes, n_pixels: int) -> list[int] | str:
    """Decode COCO's compressed RLE string as pycocotools' rleFrString does (6-bit groups offset by '0', runs after
    the second stored as deltas), or say why it is malformed: pycocotools reads past the end of a truncated one."""
    text = counts.decode("latin-1") if isinstance(counts, bytes) else counts
    if len(text) > 7 * (n_pixels + 1):       # 7 characters hold any 32-bit run
        return f"{len(text)} characters, more than a {n_pixels}-pixel mask needs"
    runs: list[int] = []
    p = 0
    while p < len(text):
        x = k = 0
        more = True
        while more:
            if p >= len(text):
                return "it ends in the middle of a run"
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                return f"character {text[p]!r} at {p} is outside '0'..'o'"
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if k > 7:
                return f"run {len(runs)} is longer than 7 characters"
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def segmentation_rle(segmentation, height: int, width: int, check: SegmentationCheck | None = None) -> dict:
    """COCO polygon list / uncompressed RLE / compressed RLE -> one compressed RLE (polygons merged).

    Raises SegmentationError (naming the problem) for anything `check_segmentation` refuses; `check` is that
    function's answer for this very segmentation and size, where the caller already has it.
    """
    check = check or check_segmentation(segmentation, height, width)
    if not check.ok:
        raise SegmentationError("; ".join(m for _, m in check.problems), check.problems[0][0])
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects([[float(v) for v in p] for p in segmentation], height, width)
        return mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    if isinstance(segmentation["counts"], list):
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

    Memory: four H x W arrays plus one decoded H x W mask at a time; H x W is at most MAX_IMAGE_PIXELS (after
    validation, the photo's own size) and every segmentation passes `check_segmentation` first, which bounds what
    pycocotools allocates. A record it refuses raises DataError naming the annotation.
    """
    im = coco.image_by_id[image_id]
    h, w = im.get("height"), im.get("width")
    if image_size_problem(h, w):
        raise DataError(f"{coco.path}: image {image_id} ({im.get('file_name')}): {image_size_problem(h, w)}; "
                        "write the photo's real width and height into the JSON")
    label = np.zeros((h, w), np.uint8)
    covered = np.zeros((h, w), bool)
    ignored = np.zeros((h, w), bool)
    count = np.zeros((h, w), np.uint8) if with_overlap else None
    for ann in coco.anns_by_image.get(image_id, []):
        if ann.get("id") in skip_annotations:
            continue
        value = cmap.get(ann.get("category_id"), -1) if is_int(ann.get("category_id")) else -1
        if value < 0:
            raise DataError(f"{coco.path}: annotation {as_json(ann.get('id'))} (image {image_id}): category_id "
                            f"{as_json(ann.get('category_id'))} is not a category mapped to data.classes")
        if value == 0:
            continue
        try:
            rle = segmentation_rle(ann.get("segmentation"), h, w)
        except SegmentationError as e:
            raise SegmentationError(f"{coco.path}: annotation {as_json(ann.get('id'))} (image {image_id}): {e}; fix "
                                    "or delete the annotation (python -m pipelines.validate names every such "
                                    "record)", e.code) from None
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
