"""Dataset validation: records flattened into pandas tables, checked by great-expectations suites, plus file checks.

Every problem is a `Problem` naming the file, the record and what to do. Structural problems (and anything wrong
in the test split, whose rows a submission needs) always fail; per-record problems are tolerated up to
`validate.max_bad_records`, and the tolerated records are excluded downstream (never silently: they are warnings).

Hostile input is a problem, never a crash: records of the wrong type (a width of "64", an id of 3.0 or true, a
list where an object belongs) are named rather than coerced; segmentations pass `segpipe.coco.check_segmentation`,
the check rasterisation also makes, before pycocotools sees them; a file name must stay inside data.root, give
each record its own mask, and (in the test split) fit the submission CSV. No file is opened before its name passed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd
from PIL import Image
from pycocotools import mask as mask_utils

from segpipe.coco import (
    CocoFile, DataError, LayoutError, UnknownCategoryError, as_json, check_segmentation, class_map, is_int,
    load_coco, mask_name, read_mask_png_layout, segmentation_rle,
)
from segpipe.parallel import bar, pool_map
from segpipe.photos import ORIENTATION_NAMES, SWAPS_AXES, check_rule, describe, orientation_of
from segpipe.submission import csv_name_problem

FATAL = {
    "empty_dataset", "duplicate_image_id", "duplicate_file_name", "duplicate_annotation_id",
    "unknown_category_name", "leakage_train_test", "too_many_empty_images", "split_inconsistent",
    "exif_orientation_rejected",
    # a bad category silently unlabels every annotation of its class: never a record to drop
    "category_invalid", "duplicate_category_id",
}
# what check_segmentation reports on the image rather than the annotation (the image's row names it)
IMAGE_LEVEL = {"image_invalid_size"}


class DataValidationError(DataError):
    """The dataset failed validation; `.problems` lists every problem, `.gx` the GX results so far."""

    def __init__(self, message: str, problems: list["Problem"], gx: dict | None = None):
        super().__init__(message)
        self.problems = problems
        self.gx = gx or {}

    def __reduce__(self):       # pickled whole (a stage in its own process raises it in the flow's)
        return type(self), (str(self), self.problems, self.gx)

    @property
    def codes(self) -> set[str]:
        return {p.code for p in self.problems}


@dataclass(frozen=True)
class Problem:
    code: str      # machine-readable kind, e.g. polygon_too_few_points
    file: str      # the JSON / image / mask file
    record: str    # "image 3 (batch_01_vt/0004.jpg)", "annotation 17 (image 3)"
    message: str   # what is wrong and what to do
    split: str = "train"
    image_id: object = None
    ann_id: object = None
    pos: int | None = None   # the record's index in its JSON list (or folder listing): how it is excluded downstream

    def __str__(self) -> str:
        return f"[{self.code}] {self.file}: {self.record}: {self.message}"

    @property
    def fatal(self) -> bool:
        # a record that cannot be located (no pos) cannot be left out downstream, so it can never be tolerated
        return self.code in FATAL or self.split == "test" or self.pos is None


@dataclass
class ValidationResult:
    layout: str
    root: Path
    classes: tuple[str, ...]
    train: list[dict]                 # {image_id, file_name, image (rel. to root), width, height, batch[, mask]}
    test: list[dict]                  # {image_id, file_name, image} in test order
    coco: CocoFile | None             # train_all (COCO layout) for rasterisation, tolerated bad records left out
    cmap: dict[int, int]
    skip_annotations: set             # tolerated bad annotation ids (integer ones), also left out of `coco`
    images: pd.DataFrame              # one row per image (both splits)
    annotations: pd.DataFrame         # one row per annotation (train)
    polygons: pd.DataFrame            # one row per polygon (train)
    gx: dict                          # JSON-serialisable GX results, per suite
    warnings: list[str] = field(default_factory=list)
    tolerated: list[Problem] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)   # wall time per phase: json, files, flatten, gx

    def metrics(self) -> dict[str, float]:
        """Flat numbers for metrics.json."""
        return {
            "n_train_images": len(self.train), "n_test_images": len(self.test),
            "n_annotations": int(len(self.annotations)), "n_polygons": int(len(self.polygons)),
            "n_warnings": len(self.warnings), "n_tolerated_bad_records": len(self.tolerated),
            "gx_expectations": sum(len(r.get("results", [])) for r in self.gx.get("suites", {}).values()),
            "gx_success": int(bool(self.gx.get("success"))),
        }


# ----------------------------------------------------------------------------- file checks (multiprocessing)

def inspect_file(path: str) -> dict:
    """Decode one image or mask once: readability, stored size, EXIF orientation (from the header already read),
    mode, pixel hash, label values (masks)."""
    out = {"path": path, "file_exists": os.path.isfile(path), "readable": False, "error": "",
           "real_w": np.nan, "real_h": np.nan, "orientation": 1, "mode": "", "hash": "", "values": ""}
    if not out["file_exists"]:
        out["error"] = "file not found"
        return out
    try:
        with Image.open(path) as im:
            im.load()  # raises on truncated data (PIL's LOAD_TRUNCATED_IMAGES is False)
            arr = np.asarray(im)
            out.update(readable=True, real_w=im.width, real_h=im.height, mode=im.mode, orientation=orientation_of(im))
    except Exception as e:  # PIL raises many types for corrupt files; the message is what the user needs
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    # sha256 of the pixels: hardware-accelerated (SHA-NI / ARMv8) where blake2b is not, 2.7x faster on 512 px photos
    digest = hashlib.sha256(np.ascontiguousarray(arr))
    digest.update(str(arr.shape).encode())
    out["hash"] = digest.hexdigest()[:32]
    if arr.ndim == 2 and path.lower().endswith(".png"):
        out["values"] = ",".join(map(str, np.unique(arr).tolist()))
    return out


def inspect_files(paths: list[str], workers: int | None = None) -> pd.DataFrame:
    """Inspect files in a process pool of os.cpu_count() workers (in-process for a handful of files)."""
    rows = pool_map(inspect_file, list(paths), workers or os.cpu_count() or 1, "inspect files", "file")
    return pd.DataFrame(rows, columns=["path", "file_exists", "readable", "error", "real_w", "real_h", "orientation",
                                       "mode", "hash", "values"])


# ----------------------------------------------------------------------------- flatten records into tables

def _num(v) -> float:
    """A number for the tables (NaN where there is none); the type itself is checked by `_type_errors`."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan
    except OverflowError:     # an integer beyond the float range
        return math.inf if v > 0 else -math.inf


_JSON_TYPE = {str: "a string", float: "a float", bool: "a boolean", type(None): "null", list: "a list",
              dict: "an object"}


def _type_errors(record, int_keys: tuple[str, ...], str_keys: tuple[str, ...] = (), what: str = "record") -> str:
    """'width="64" is a string, id=3.0 is a float' for every present key of the wrong JSON type, or "".

    Ids and sizes must be JSON integers: coercing "64" or 64.0 would hide an exporter bug, and an id of 3.0 or "3"
    matches 3 in some lookups (Python's dicts) but not in others (the tables, the split files).
    """
    if not isinstance(record, dict):
        return f"the {what} is {_JSON_TYPE.get(type(record), type(record).__name__)}, not an object"
    errors = [f"{k}={as_json(record[k])} is {_JSON_TYPE.get(type(record[k]), type(record[k]).__name__)}"
              for k in int_keys if k in record and not is_int(record[k])]
    errors += [f"{k}={as_json(record[k])} is {_JSON_TYPE.get(type(record[k]), type(record[k]).__name__)}"
               if not isinstance(record[k], str) else f"{k} is empty"
               for k in str_keys if k in record and (not isinstance(record[k], str) or not record[k])]
    return ", ".join(errors)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:   # lone surrogates: how Python holds a file name's non-UTF-8 bytes
        return False


def _show(name: str) -> str:
    """A file name as a message can print it: repr() where it holds control characters or non-UTF-8 bytes."""
    return name if _utf8(name) and name.isprintable() else repr(name)


def _text(value: str) -> str:
    """`value` as valid UTF-8 text for the tables (pandas hashes strings as UTF-8 and fails on the lone surrogates
    of a non-UTF-8 name): unchanged where it is valid, its bytes escaped where not."""
    if _utf8(value):
        return value
    try:       # the file system's own bytes (os.fsdecode's surrogateescape), else the surrogates' code points
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def flatten_images(coco: CocoFile, split: str) -> pd.DataFrame:
    """One row per image record; name_ok says whether file_name is a string that can be looked at on disk."""
    rows = []
    for pos, im in enumerate(coco.images):
        type_errors = _type_errors(im, ("id", "width", "height"), ("file_name",), "image record")
        is_obj = isinstance(im, dict)
        im = im if is_obj else {}
        missing = [k for k in ("id", "file_name", "width", "height") if k not in im] if is_obj else []
        name = im.get("file_name")
        name_ok = isinstance(name, str) and bool(name)
        image_id = _text(str(im.get("id", f"#{pos}")))
        rows.append({"split": split, "json": coco.path.name, "pos": pos, "image_id": image_id,
                     "file_name": name if name_ok else f"<record {pos}>", "name_ok": name_ok,
                     "width": _num(im.get("width")), "height": _num(im.get("height")),
                     "missing_keys": ",".join(missing), "type_errors": type_errors,
                     # the submission CSV carries each test image's file_name as its image_id (a non-UTF-8 name
                     # is file_name_unsafe in every split)
                     "csv_problem": csv_name_problem(name) if split == "test" and name_ok and _utf8(name) else ""})
    df = pd.DataFrame(rows, columns=["split", "json", "pos", "image_id", "file_name", "name_ok", "width", "height",
                                     "missing_keys", "type_errors", "csv_problem"])
    df["image_id"] = df["image_id"].astype(object)   # text even where the table is empty
    return df


def flatten_annotations(coco: CocoFile, cmap: dict[int, int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per annotation and one per polygon, with the derived columns the suites check.

    Geometry comes from `check_segmentation`, the same check rasterisation makes: its problems become the
    columns the suites report, and only a segmentation it passed is handed to pycocotools (for the area).
    """
    ann_rows, poly_rows = [], []
    for pos, ann in enumerate(bar(coco.annotations, f"check {coco.path.name}", unit="ann")):
        type_errors = _type_errors(ann, ("id", "image_id", "category_id"), (), "annotation record")
        is_obj = isinstance(ann, dict)
        ann = ann if is_obj else {}
        missing = [k for k in ("id", "image_id", "category_id", "segmentation") if k not in ann] if is_obj else []
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        im = coco.image_by_id.get(image_id) if is_int(image_id) else None
        height, width = (im.get("height"), im.get("width")) if im else (None, None)
        w, h = _num(width), _num(height)
        seg = ann.get("segmentation")
        check = check_segmentation(seg, height, width)
        found = dict(check.problems)
        raster_area, bbox = math.nan, [math.nan] * 4
        ann_id = _text(str(ann.get("id", f"#{pos}")))
        for k, facts in enumerate(check.polygons):
            poly_rows.append({
                "json": coco.path.name, "pos": pos, "ann_id": ann_id, "image_id": _text(str(image_id)), "poly": k,
                **{c: facts[c] for c in ("n_points", "odd", "has_nan", "min_x", "min_y", "max_x", "max_y")},
                **{c: facts["problems"].get(c, "") for c in POLYGON_CODES},
            })
        if check.ok:   # implies a known image of a usable size
            rle = segmentation_rle(seg, height, width, check)
            raster_area, bbox = float(mask_utils.area(rle)), mask_utils.toBbox(rle).tolist()
        area = _num(ann.get("area"))
        class_index = cmap.get(category_id, -1) if is_int(category_id) else -1
        ann_rows.append({
            "json": coco.path.name, "pos": pos, "ann_id": ann_id, "image_id": _text(str(image_id)),
            "category_id": category_id, "class_index": class_index,
            # an ill-typed image_id / category_id is reported as such, not as a dangling reference as well
            "image_exists": im is not None or not is_int(image_id),
            "category_known": class_index >= 0 or not is_int(category_id),
            "missing_keys": ",".join(missing), "type_errors": type_errors,
            "kind": check.kind if "segmentation" in ann else "missing",
            "iscrowd": ann.get("iscrowd", 0), "rle_size_ok": "rle_size_mismatch" not in found,
            **{c: found.get(c, "") for c in ANNOTATION_CODES},
            # every reason not to rasterise, for the check that each was reported (validate_coco)
            "geometry": "; ".join(m for c, m in check.problems if c not in IMAGE_LEVEL),
            "raster_area": raster_area,
            "area": raster_area if math.isnan(area) else area, "image_area": w * h, "width": w, "height": h,
            "bx": bbox[0], "by": bbox[1], "bw": bbox[2], "bh": bbox[3],
        })
    ann_df = pd.DataFrame(ann_rows, columns=[
        "json", "pos", "ann_id", "image_id", "category_id", "class_index", "image_exists", "category_known",
        "missing_keys", "type_errors", "kind", "iscrowd", "rle_size_ok", *ANNOTATION_CODES, "geometry",
        "raster_area", "area", "image_area", "width", "height", "bx", "by", "bw", "bh"])
    poly_df = pd.DataFrame(poly_rows, columns=["json", "pos", "ann_id", "image_id", "poly", "n_points", "odd",
                                               "has_nan", "min_x", "min_y", "max_x", "max_y", *POLYGON_CODES])
    return ann_df, poly_df


# check_segmentation's codes, each a column of its table holding the problem's message (or "")
POLYGON_CODES = ("polygon_too_few_points", "polygon_odd_coordinates", "polygon_nan", "polygon_outside_image")
ANNOTATION_CODES = ("rle_size_mismatch", "rle_invalid", "polygon_too_long")


# ----------------------------------------------------------------------------- great-expectations suites

_GX_CONTEXT = None


def _gx():
    """One ephemeral GX context per process (creating one costs about a second)."""
    global _GX_CONTEXT
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx  # slow import: only when validating
    if _GX_CONTEXT is None:
        _GX_CONTEXT = gx.get_context(mode="ephemeral")
        try:
            from great_expectations.data_context.types.base import ProgressBarsConfig
            _GX_CONTEXT.variables.progress_bars = ProgressBarsConfig(globally=False)
        except Exception:  # cosmetic only: progress bars on stderr
            pass
    return gx, _GX_CONTEXT


# (code, expectation class name, kwargs, message template with row fields, what to do)
IMAGE_SUITE = [
    ("image_missing_keys", "ExpectColumnValuesToBeInSet", {"column": "missing_keys", "value_set": [""]},
     "image record lacks {missing_keys}", "every image needs id, file_name, width, height"),
    ("image_bad_type", "ExpectColumnValuesToBeInSet", {"column": "type_errors", "value_set": [""]},
     "{type_errors}", "id, width and height are JSON integers (64, not \"64\", 64.0 or true) and file_name a "
     "non-empty string; fix the exporter"),
    ("file_name_unsafe", "ExpectColumnValuesToBeInSet", {"column": "path_problem", "value_set": [""]},
     "file_name {path_problem}", "file names are paths relative to data.root, to files inside it; move the file "
     "into the dataset (and `dvc add` it) or fix the name"),
    ("mask_name_collision", "ExpectColumnValuesToBeInSet", {"column": "mask_clash", "value_set": [""]},
     "its mask would be {mask_name}, the same as that of {mask_clash}, and one would overwrite the other",
     "masks are named <file_name without its suffix>.png (pseudo-labels of test images too); rename one image"),
    ("test_file_name_not_csv_safe", "ExpectColumnValuesToBeInSet", {"column": "csv_problem", "value_set": [""]},
     "the submission CSV cannot carry this file name as its image_id: {csv_problem}",
     "rename the test image (and its record): no commas, quotes, control characters or non-UTF-8 bytes"),
    ("duplicate_image_id", "ExpectCompoundColumnsToBeUnique", {"column_list": ["split", "image_id"]},
     "image id {image_id} is used by more than one image", "give every image a unique id"),
    ("duplicate_file_name", "ExpectCompoundColumnsToBeUnique", {"column_list": ["split", "file_name"]},
     "file_name {file_name} is listed more than once", "list each image file once"),
    ("image_invalid_size", "ExpectColumnValuesToBeBetween", {"column": "width", "min_value": 1},
     "width {width} is not a positive number", "write the real width/height into the JSON"),
    ("image_invalid_size", "ExpectColumnValuesToBeBetween", {"column": "height", "min_value": 1},
     "height {height} is not a positive number", "write the real width/height into the JSON"),
    ("image_missing", "ExpectColumnValuesToBeInSet", {"column": "file_exists", "value_set": [True]},
     "image file {path} not found", "add the file or remove the record (and its annotations)"),
    ("image_unreadable", "ExpectColumnValuesToBeInSet", {"column": "decodable", "value_set": [True]},
     "image {path} cannot be decoded ({error})", "re-export the image; truncated/corrupt files must be replaced"),
    # real_w/real_h: the size as data.exif_orientation shows the photo (segpipe.photos); check_w/check_h are the
    # same, left empty where the next expectation reports the photo instead
    ("image_exif_stored_size", "ExpectColumnValuesToBeInSet", {"column": "json_has_stored_size", "value_set": [False]},
     "{orientation_desc}: the photo shows as {shown_size}, but the JSON has its stored size {stored_size}",
     "data.exif_orientation=apply takes photos as the camera showed them: if the annotations were drawn on the "
     "stored pixels set data.exif_orientation: ignore, else write the shown size into the JSON (or re-export the "
     "photo with the rotation applied to its pixels)"),
    ("image_size_mismatch", "ExpectColumnPairValuesToBeEqual",
     {"column_A": "width", "column_B": "check_w", "ignore_row_if": "either_value_is_missing"},
     "JSON width {width} != real width {real_w}{size_note}", "fix width/height in the JSON or re-export the image"),
    ("image_size_mismatch", "ExpectColumnPairValuesToBeEqual",
     {"column_A": "height", "column_B": "check_h", "ignore_row_if": "either_value_is_missing"},
     "JSON height {height} != real height {real_h}{size_note}", "fix width/height in the JSON or re-export the image"),
]
TRAIN_IMAGE_SUITE = [
    ("duplicate_image_content", "ExpectColumnValuesToBeUnique", {"column": "hash_or_none"},
     "pixels identical to another train image", "remove the duplicate (it would straddle folds)"),
]
ANN_SUITE = [
    ("annotation_missing_keys", "ExpectColumnValuesToBeInSet", {"column": "missing_keys", "value_set": [""]},
     "annotation lacks {missing_keys}", "every annotation needs id, image_id, category_id, segmentation"),
    ("annotation_bad_type", "ExpectColumnValuesToBeInSet", {"column": "type_errors", "value_set": [""]},
     "{type_errors}", "id, image_id and category_id are JSON integers (7, not \"7\", 7.0 or true); fix the "
     "exporter"),
    ("duplicate_annotation_id", "ExpectColumnValuesToBeUnique", {"column": "ann_id"},
     "annotation id {ann_id} is used more than once", "give every annotation a unique id"),
    ("annotation_missing_image", "ExpectColumnValuesToBeInSet", {"column": "image_exists", "value_set": [True]},
     "points to image id {image_id}, which is not in `images`", "fix image_id or delete the annotation"),
    ("unknown_category_id", "ExpectColumnValuesToBeInSet", {"column": "category_known", "value_set": [True]},
     "category_id {category_id} is not a category mapped to data.classes",
     "fix category_id or add the category (and its class)"),
    # "missing": annotation_missing_keys names it
    ("invalid_segmentation", "ExpectColumnValuesToBeInSet",
     {"column": "kind", "value_set": ["polygon", "rle", "missing"]},
     "segmentation is neither a list of polygons nor an RLE {{size, counts}}", "re-export the annotation"),
    ("rle_size_mismatch", "ExpectColumnValuesToBeInSet", {"column": "rle_size_ok", "value_set": [True]},
     "{rle_size_mismatch}", "re-encode the RLE at image size"),
    ("rle_invalid", "ExpectColumnValuesToBeInSet", {"column": "rle_invalid", "value_set": [""]},
     "{rle_invalid}", "re-encode the mask as COCO RLE (pycocotools.mask.encode) at the image's size"),
    ("polygon_too_long", "ExpectColumnValuesToBeInSet", {"column": "polygon_too_long", "value_set": [""]},
     "{polygon_too_long}", "simplify the outline (fewer vertices) or split the annotation; "
     "segpipe.coco.MAX_BOUNDARY_LAPS bounds what rasterising one annotation may allocate"),
    ("zero_area", "ExpectColumnValuesToBeBetween", {"column": "raster_area", "min_value": 1},
     "rasterises to {raster_area} pixels", "delete the degenerate annotation or fix its polygon"),
    ("area_exceeds_image", "ExpectColumnPairValuesAToBeGreaterThanB",
     {"column_A": "image_area", "column_B": "area", "or_equal": True, "ignore_row_if": "either_value_is_missing"},
     "area {area} is larger than the image ({image_area} px)", "fix the area or the polygon (wrong scale?)"),
]
# the messages come from segpipe.coco.check_segmentation (the rules rasterisation applies too); the facts beside
# them (n_points, min_x, ...) stay in the table for the GX results and the EDA
POLY_SUITE = [
    ("polygon_too_few_points", "ExpectColumnValuesToBeInSet", {"column": "polygon_too_few_points", "value_set": [""]},
     "{polygon_too_few_points}", "fix or delete the polygon"),
    ("polygon_odd_coordinates", "ExpectColumnValuesToBeInSet",
     {"column": "polygon_odd_coordinates", "value_set": [""]},
     "{polygon_odd_coordinates}", "polygons are flat [x1, y1, x2, y2, ...] lists"),
    ("polygon_nan", "ExpectColumnValuesToBeInSet", {"column": "polygon_nan", "value_set": [""]},
     "{polygon_nan}", "fix the exporter; coordinates must be finite JSON numbers"),
    ("polygon_outside_image", "ExpectColumnValuesToBeInSet", {"column": "polygon_outside_image", "value_set": [""]},
     "{polygon_outside_image}", "clip the polygon to the image or fix its scale"),
]
MASK_SUITE = [
    ("file_name_unsafe", "ExpectColumnValuesToBeInSet", {"column": "mask_path_problem", "value_set": [""]},
     "mask {mask_path_problem}", "the mask must be a file inside data.root; replace the link with the file"),
    ("mask_unreadable", "ExpectColumnValuesToBeInSet", {"column": "mask_decodable", "value_set": [True]},
     "mask {mask_path} cannot be decoded ({mask_error})", "re-export the mask as a single-channel PNG"),
    ("mask_not_single_channel", "ExpectColumnValuesToBeInSet", {"column": "mask_mode", "value_set": ["L", "P", ""]},
     "mask {mask_path} has mode {mask_mode}", "masks are 8-bit single-channel PNGs (pixel = class id)"),
    ("mask_size_mismatch", "ExpectColumnPairValuesToBeEqual",
     {"column_A": "real_w", "column_B": "mask_w", "ignore_row_if": "either_value_is_missing"},
     "mask width {mask_w} != image width {real_w}{size_note}",
     "masks must have their image's size, as data.exif_orientation shows the image"),
    ("mask_size_mismatch", "ExpectColumnPairValuesToBeEqual",
     {"column_A": "real_h", "column_B": "mask_h", "ignore_row_if": "either_value_is_missing"},
     "mask height {mask_h} != image height {real_h}{size_note}",
     "masks must have their image's size, as data.exif_orientation shows the image"),
    ("mask_bad_values", "ExpectColumnValuesToBeInSet", {"column": "bad_values", "value_set": [""]},
     "mask {mask_path} has values {bad_values} outside 0..n_classes-1 and ignore_index",
     "fix the mask or add the classes to classes.txt"),
]


def run_suite(name: str, df: pd.DataFrame, suite_spec: list) -> tuple[dict, list[tuple[str, pd.Series, str]]]:
    """Run one GX suite over a dataframe; return its JSON result and (code, failing row, message) triples."""
    gx, ctx = _gx()
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    asset = ctx.data_sources.add_pandas(f"segpipe-{tag}").add_dataframe_asset(name=name)
    batch_def = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=tag))
    specs = {}
    for i, (code, cls_name, kwargs, template, hint) in enumerate(suite_spec):
        exp = getattr(gx.expectations, cls_name)(**kwargs, meta={"code": code, "n": i})
        suite.add_expectation(exp)
        specs[i] = (code, template, hint)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=tag, data=batch_def, suite=suite))
    frame = df.reset_index(drop=True)
    res = vd.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
    failures = []
    for r in res.results:
        if r.success:
            continue
        code, template, hint = specs[r.expectation_config.meta["n"]]
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise RuntimeError(f"GX expectation {code} crashed: {r.exception_info.get('exception_message')}")
        for idx in r.result.get("unexpected_index_list") or []:
            row = frame.loc[idx if not isinstance(idx, dict) else idx.get("index", idx)]
            failures.append((code, row, f"{template.format(**row.to_dict())}; {hint}"))
    return json.loads(json.dumps(res.to_json_dict(), default=str)), failures


def gx_summary(gx: dict) -> list[dict]:
    """One row per expectation run (suite, problem code, expectation, columns, rows checked, failures)."""
    rows = []
    for suite, res in gx.get("suites", {}).items():
        for r in res.get("results", []):
            cfg = r.get("expectation_config", {})
            kw = cfg.get("kwargs", {})
            cols = kw.get("column") or "+".join(kw.get("column_list") or [c for c in (kw.get("column_A"),
                                                                                     kw.get("column_B")) if c])
            out = r.get("result", {})
            rows.append({"suite": suite, "code": cfg.get("meta", {}).get("code", ""),
                         "expectation": cfg.get("type", ""), "columns": cols,
                         "rows": out.get("element_count"), "failed": out.get("unexpected_count", 0) or 0,
                         "success": bool(r.get("success"))})
    return rows


# ----------------------------------------------------------------------------- whole-dataset validation

@contextmanager
def _timed(seconds: dict[str, float], phase: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t


def _problem(code: str, row: pd.Series, message: str, kind: str) -> Problem:
    split = row.get("split", "train")
    pos = row.get("pos")
    pos = int(pos) if pos is not None and not pd.isna(pos) else None
    if kind == "image":
        record = f"image {row['image_id']} ({_show(row['file_name'])})"
        file = row.get("path") or row.get("json")
        return Problem(code, _show(str(file)), record, message, split, image_id=row["image_id"], pos=pos)
    if kind == "mask":
        return Problem(code, _show(str(row["mask_path"])), f"image {_show(row['file_name'])}", message, split,
                       image_id=row["image_id"], pos=pos)
    record = f"annotation {row['ann_id']} (image {row['image_id']})"
    return Problem(code, str(row.get("json", "train_all.json")), record, message, split,
                   image_id=row["image_id"], ann_id=row["ann_id"], pos=pos)


def _finish(problems: list[Problem], params, root: Path, gx_results: dict) -> list[Problem]:
    """Raise DataValidationError if anything fatal or more bad records than allowed; else return the tolerated."""
    gx_results["success"] = not problems
    fatal = [p for p in problems if p.fatal]
    record = [p for p in problems if not p.fatal]
    if fatal or len(record) > params.max_bad_records:
        counts = Counter(p.code for p in problems)
        ordered = fatal + record
        lines = "\n".join(f"  - {p}" for p in ordered[:20])
        more = f"\n  ... and {len(ordered) - 20} more" if len(ordered) > 20 else ""
        raise DataValidationError(
            f"dataset {root} failed validation: {len(problems)} problem(s) "
            f"({len(fatal)} fatal, {len(record)} bad record(s) vs validate.max_bad_records={params.max_bad_records})"
            f"; by kind: {dict(counts)}\n{lines}{more}", ordered, gx_results)
    return record


def _wh(w: float, h: float) -> str:
    return "" if math.isnan(w) or math.isnan(h) else f"{w:.0f}x{h:.0f}"


def _orient_sizes(images: pd.DataFrame, rule: str) -> pd.DataFrame:
    """Size columns under data.exif_orientation: stored_w/h as in the file, real_w/h as the rule shows the photo,
    check_w/h for the JSON comparison, and the notes that name the orientation when a size does not match."""
    o = images["orientation"].fillna(1).astype(int)
    images["orientation"] = o
    images["stored_w"], images["stored_h"] = images["real_w"], images["real_h"]
    swap = o.isin(SWAPS_AXES) & (rule == "apply")
    images["real_w"] = np.where(swap, images["stored_h"], images["stored_w"])
    images["real_h"] = np.where(swap, images["stored_w"], images["stored_h"])
    images["orientation_desc"] = [describe(v) for v in o]
    images["shown_size"] = [_wh(w, h) for w, h in zip(images["real_w"], images["real_h"])]
    images["stored_size"] = [_wh(w, h) for w, h in zip(images["stored_w"], images["stored_h"])]
    json_size = [_wh(w, h) for w, h in zip(images["width"], images["height"])]
    # the JSON was written for the pixels as stored: its own problem, which says what to do
    images["json_has_stored_size"] = (swap & (images["shown_size"] != images["stored_size"])
                                      & (pd.Series(json_size, index=images.index) == images["stored_size"]))
    # ... and a photo reject refuses is reported as that alone
    skip = images["json_has_stored_size"] | ((o != 1) & (rule == "reject"))
    images["check_w"] = images["real_w"].where(~skip)
    images["check_h"] = images["real_h"].where(~skip)
    camera = [_wh(h, w) if v in SWAPS_AXES else _wh(w, h)    # as the camera showed it, whatever the rule
              for v, w, h in zip(o, images["stored_w"], images["stored_h"])]
    notes = []
    for v, camera_size, stored, js in zip(o, camera, images["stored_size"], json_size):
        if v != 1 and rule == "apply":
            notes.append(f" ({describe(v)}: the size as shown; stored it is {stored})")
        elif v in SWAPS_AXES and rule == "ignore" and js == camera_size != stored:
            notes.append(f" ({describe(v)}: the JSON has the size as the camera showed it, data.exif_orientation="
                         "ignore takes the pixels as stored; set it to apply if the annotations were drawn on the "
                         "photo as shown)")
        else:
            notes.append("")
    images["size_note"] = notes
    return images


def path_problem(root: Path, rel: str) -> str:
    """Why the dataset file `rel` must not be read as part of data.root, or "".

    Absolute paths and `..` leave the root by name; a symbolic link (of the file or a folder on its way) leaves it
    on disk. Either way the file is no part of the versioned dataset (DVC hashes what is inside the root), and a
    crafted record could point a stage at any file on the machine. The one exception is a link into DVC's
    content-addressed cache (`<2 hex>/<30 hex>`: `cache.type: symlink`), which is how DVC itself checks data out.
    """
    if not _utf8(rel):
        return (f"{_show(rel)} is not valid UTF-8: index.json, the masks named after it, the artifact store's "
                "object keys and the submission CSV are all UTF-8")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or rel.startswith("\\"):
        return f"{_show(rel)} is an absolute path"
    if ".." in PurePosixPath(rel).parts or ".." in PureWindowsPath(rel).parts:
        return f"{_show(rel)} has a `..` component"
    try:
        real = (root / rel).resolve()
        inside = real.is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError) as e:   # a link loop, a NUL byte
        return f"{_show(rel)} cannot be resolved ({type(e).__name__}: {e})"
    if inside or _DVC_CACHE_OBJECT.fullmatch("/".join(real.parts[-2:])):
        return ""
    return f"{_show(rel)} resolves to {_show(str(real))} through a symbolic link, outside data.root {root}"


_DVC_CACHE_OBJECT = re.compile(r"[0-9a-f]{2}/[0-9a-f]{30}")


def _inspect_where(paths: pd.Series, look: pd.Series, workers) -> pd.DataFrame:
    """inspect_files for the rows where `look`; the others get a row that no file check fails on."""
    found = inspect_files(paths[look].tolist(), workers).set_axis(paths.index[look])
    skipped = pd.DataFrame({"path": "", "file_exists": True, "readable": False, "error": "", "real_w": math.nan,
                            "real_h": math.nan, "orientation": 1, "mode": "", "hash": "", "values": ""},
                           index=paths.index[~look])
    files = found if not len(skipped) else skipped if not len(found) else pd.concat([found, skipped])
    return files.loc[paths.index].astype({"file_exists": bool, "readable": bool})


def _mask_clashes(images: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Per row its mask's name (segpipe.coco.mask_name) and, for the second and later rows of one split that
    share a mask name, the first such record: `a.jpg` and `a.png` in one folder would write one mask twice."""
    names, clashes, first = [], [], {}
    for split, fname, ok, image_id in zip(images["split"], images["file_name"], images["name_ok"],
                                          images["image_id"]):
        name = mask_name(fname) if ok else ""
        names.append(name)
        key = (split, name)
        clashes.append(f"image {first[key]}" if name and key in first else "")
        if name and key not in first:
            first[key] = f"{image_id} ({_show(fname)})"
    return names, clashes


def _check_images(images: pd.DataFrame, root: Path, params, warnings: list[str], workers,
                  seconds: dict[str, float], exif: str = "apply") -> tuple[pd.DataFrame, list, dict]:
    """File checks + image suites; returns the joined table, problems and GX results."""
    check_rule(exif)
    images = images.reset_index(drop=True)
    images["path_problem"] = [path_problem(root, f) if ok else "" for f, ok in zip(images["file_name"],
                                                                                  images["name_ok"])]
    # a file is opened only when its name passed: never one outside data.root
    look = images["name_ok"] & (images["path_problem"] == "")
    with _timed(seconds, "files"):
        files = _inspect_where(images["file_name"].map(lambda f: str(root / f)), look, workers)
    images["file_name"] = images["file_name"].map(_text)
    images = pd.concat([images, files], axis=1)
    # missing files are reported once (image_missing), files not looked at never (their name is the problem)
    images["decodable"] = images["readable"] | ~images["file_exists"] | ~look
    images["mask_name"], images["mask_clash"] = _mask_clashes(images)
    images = _orient_sizes(images, exif)
    problems, gx_results = [], {}
    with _timed(seconds, "gx"):
        res, fails = run_suite("images", images, IMAGE_SUITE)
    gx_results["images"] = res
    problems += [_problem(c, r, m, "image") for c, r, m in fails]
    train = images[images["split"] == "train"].copy()
    train["hash_or_none"] = train["hash"].where(train["hash"] != "", None)
    with _timed(seconds, "gx"):
        res, fails = run_suite("train_images", train, TRAIN_IMAGE_SUITE)
    gx_results["train_images"] = res
    seen: set[str] = set()
    for c, r, m in fails:  # keep the first copy of each duplicate group; the later ones are the bad records
        if r["hash"] in seen:
            problems.append(_problem(c, r, m, "image"))
        seen.add(r["hash"])
    test_hashes = set(images.loc[(images["split"] == "test") & (images["hash"] != ""), "hash"])
    leak = train[train["hash"].isin(test_hashes)]
    for _, r in leak.iterrows():
        other = images[(images["split"] == "test") & (images["hash"] == r["hash"])]["file_name"].iloc[0]
        problems.append(_problem("leakage_train_test", r, f"pixels identical to test image {other}; remove it from "
                                 "train (or test): it inflates validation and leaks labels", "image"))
    turned = images[images["readable"] & (images["orientation"] != 1)]
    if exif == "reject":
        for _, r in turned.iterrows():
            problems.append(_problem("exif_orientation_rejected", r, f"{r['orientation_desc']}: data.exif_orientation"
                                     "=reject accepts only photos stored as shown; re-export it with the rotation "
                                     "applied to its pixels (its annotations in that frame), or set "
                                     "data.exif_orientation: apply (as the camera showed it) or ignore (as stored)",
                                     "image"))
    elif len(turned):
        how = ("used as the camera showed them (data.exif_orientation=apply)" if exif == "apply" else
               "used as stored, their orientation not applied (data.exif_orientation=ignore)")
        warnings.append(f"{len(turned)} photo(s) carry an EXIF orientation and are {how}, e.g. "
                        + ", ".join(f"{f} ({ORIENTATION_NAMES[v]})" for f, v in
                                    zip(turned["file_name"].head(5), turned["orientation"].head(5))))
    odd_mode = images[images["readable"] & ~images["mode"].isin(["RGB"])]
    for _, r in odd_mode.iterrows():
        if params.grayscale == "fail":
            problems.append(_problem("grayscale_image", r, f"mode {r['mode']} is not RGB; convert it to RGB, or set "
                                     "validate.grayscale=convert", "image"))
        else:
            warnings.append(f"{r['path']}: mode {r['mode']} is converted to RGB on load <validate.grayscale=convert>")
    return images, problems, gx_results


def validate_coco(root: Path, classes, params, *, unknown="background", ignore_index=255,
                  workers: int | None = None, exif_orientation: str = "apply") -> ValidationResult:
    """Validate the competition layout (train_all.json [+ train/val.json] + test.json + images)."""
    root = Path(root)
    seconds: dict[str, float] = {}
    with _timed(seconds, "json"):
        train_all = load_coco(root / "train_all.json")
        test = load_coco(root / "test.json") if (root / "test.json").exists() else None
    warnings: list[str] = [] if test else [f"{root / 'test.json'} not found: no test split"]
    categories, problems = _check_categories(train_all)
    try:
        cmap = class_map(categories, classes, unknown, ignore_index)
    except UnknownCategoryError as e:
        problems.append(Problem("unknown_category_name", str(train_all.path), "categories", str(e)))
        cmap = {}
    if not train_all.images:
        problems.append(Problem("empty_dataset", str(train_all.path), "images",
                                "no images: the dataset is empty; check data.root points at the real data"))
    images = pd.concat([flatten_images(train_all, "train")] + ([flatten_images(test, "test")] if test else []),
                       ignore_index=True)
    images, img_problems, gx_results = _check_images(images, root, params, warnings, workers, seconds,
                                                     exif_orientation)
    problems += img_problems
    with _timed(seconds, "flatten"):
        anns, polys = flatten_annotations(train_all, cmap)
    with _timed(seconds, "gx"):
        res, fails = run_suite("annotations", anns, ANN_SUITE)
    gx_results["annotations"] = res
    problems += [_problem(c, r, m, "ann") for c, r, m in fails]
    with _timed(seconds, "gx"):
        res, fails = run_suite("polygons", polys, POLY_SUITE)
    gx_results["polygons"] = res
    problems += [_problem(c, r, m, "ann") for c, r, m in fails]
    problems += _unreported_geometry(anns, problems)
    for name in ("train.json", "val.json"):  # the given split files must be subsets of train_all
        if (root / name).exists():
            sub = load_coco(root / name)
            # compared as the JSON spells them: an ill-typed id that is the same in both files is train_all's
            # problem (image_bad_type), not an inconsistency
            listed = {(as_json(im.get("id"), 10**6), as_json(im.get("file_name"), 10**6))
                      for im in train_all.images if isinstance(im, dict)}
            for pos, im in enumerate(sub.images):
                im = im if isinstance(im, dict) else {}
                if (as_json(im.get("id"), 10**6), as_json(im.get("file_name"), 10**6)) not in listed:
                    problems.append(Problem("split_inconsistent", str(sub.path), f"image {as_json(im.get('id'))} "
                                            f"({_show(str(im.get('file_name', f'record {pos}')))})",
                                            "not in train_all.json with the same id and file_name; regenerate the "
                                            "split files from train_all.json"))
    n_anns = anns[anns["image_exists"].astype(bool)].groupby("image_id").size()
    images["n_annotations"] = images["image_id"].map(n_anns).fillna(0).astype(int)
    images.loc[images["split"] == "test", "n_annotations"] = 0
    empty = images[(images["split"] == "train") & (images["n_annotations"] == 0)]
    if len(empty) > params.max_empty_images:
        problems.append(Problem("too_many_empty_images", str(train_all.path), f"{len(empty)} images",
                                f"{len(empty)} train images have no annotation (> validate.max_empty_images="
                                f"{params.max_empty_images}), e.g. {empty['file_name'].head(5).tolist()}; "
                                "check the export, or raise the limit if empty photos are expected"))
    elif len(empty):
        warnings.append(f"{len(empty)} train image(s) without annotations (<= validate.max_empty_images="
                        f"{params.max_empty_images})")
    gx_results = {"suites": gx_results}
    tolerated = _finish(problems, params, root, gx_results)
    warnings += [f"tolerated bad record <validate.max_bad_records={params.max_bad_records}>: {p}" for p in tolerated]
    # tolerated records leave by position: their ids may be of any type, or duplicated as text ("3" and 3);
    # every record left is one no check complained about, so it is well-typed from here on
    bad_images = {p.pos for p in tolerated if p.ann_id is None}
    bad_anns = {p.pos for p in tolerated if p.ann_id is not None}
    kept_images = [im for k, im in enumerate(train_all.images) if k not in bad_images]
    kept_anns = [a for k, a in enumerate(train_all.annotations) if k not in bad_anns]
    skip = {a["id"] for k, a in enumerate(train_all.annotations)
            if k in bad_anns and isinstance(a, dict) and is_int(a.get("id"))}
    train_rows = [
        {"image_id": im["id"], "file_name": im["file_name"], "image": im["file_name"], "width": im["width"],
         "height": im["height"], "batch": _batch(im["file_name"])}
        for im in kept_images
    ]
    test_rows = [{"image_id": im["id"], "file_name": im["file_name"], "image": im["file_name"]}
                 for im in (test.images if test else [])]
    coco = CocoFile(train_all.path, kept_images, kept_anns, categories)
    return ValidationResult("coco", root, tuple(classes), train_rows, test_rows, coco, cmap, skip, images, anns,
                            polys, gx_results, warnings, tolerated, seconds)


def _check_categories(coco: CocoFile) -> tuple[list[dict], list[Problem]]:
    """The well-formed categories (integer id, name string, unique id) and a fatal problem for each other one:
    class_map maps by name and the annotations point by id, so a broken category would unlabel its class."""
    good, problems, seen = [], [], {}
    for pos, cat in enumerate(coco.categories):
        errors = _type_errors(cat, ("id",), ("name",), "category record")
        missing = [k for k in ("id", "name") if k not in cat] if isinstance(cat, dict) else []
        cid = as_json(cat.get("id")) if isinstance(cat, dict) else "?"
        record = f"category {cid} (#{pos} in categories)"
        if errors or missing:
            why = ", ".join([errors] * bool(errors) + [f"lacks {','.join(missing)}"] * bool(missing))
            problems.append(Problem("category_invalid", str(coco.path), record, f"{why}; every category needs an "
                                    "integer id and a name string (a name in data.classes)", pos=pos))
            continue
        if cat["id"] in seen:
            problems.append(Problem("duplicate_category_id", str(coco.path), record, f"id {cat['id']} is also "
                                    f"category `{seen[cat['id']]}`'s; give every category a unique id", pos=pos))
            continue
        seen[cat["id"]] = cat["name"]
        good.append(cat)
    return good, problems


def _unreported_geometry(anns: pd.DataFrame, problems: list[Problem]) -> list[Problem]:
    """A problem for each annotation check_segmentation refused that no suite reported: rasterisation would refuse
    it too, so it must never pass validation (a guard against a check added without its expectation)."""
    reported = {p.pos for p in problems if p.ann_id is not None}
    return [Problem("invalid_segmentation", str(r["json"]), f"annotation {r['ann_id']} (image {r['image_id']})",
                    f"{r['geometry']}; fix or delete the annotation", "train", r["image_id"], r["ann_id"],
                    int(r["pos"]))
            for _, r in anns[anns["geometry"] != ""].iterrows() if int(r["pos"]) not in reported]


def validate_mask_png(root: Path, classes, params, *, ignore_index=255, workers: int | None = None,
                      exif_orientation: str = "apply") -> ValidationResult:
    """Validate the mask-PNG layout: images, same-stem masks, classes.txt, optional test/images."""
    root = Path(root)
    ds = read_mask_png_layout(root)
    if tuple(ds.classes) != tuple(classes):
        raise LayoutError(f"{root / 'classes.txt'} lists {list(ds.classes)} but data.classes is {list(classes)}; "
                          "make them the same (index = pixel value)")
    warnings: list[str] = []
    problems: list[Problem] = []
    if not ds.train:
        problems.append(Problem("empty_dataset", str(root / "images"), "images", "no images: the dataset is empty"))
    # file names come from the folder listing: well-typed, but links may leave the root and test names must
    # still fit the submission CSV (its image_id is the bare file name here)
    images = pd.DataFrame(
        [{"split": "train", "json": "images/", "pos": i, "image_id": str(i), "file_name": img, "name_ok": True,
          "width": math.nan, "height": math.nan, "missing_keys": "", "type_errors": "", "csv_problem": "",
          "mask_path": str(root / m), "mask_path_problem": path_problem(root, m)}
         for i, (img, m) in enumerate(ds.train)]
        + [{"split": "test", "json": "test/images/", "pos": i, "image_id": str(i), "file_name": img, "name_ok": True,
            "width": math.nan, "height": math.nan, "missing_keys": "", "type_errors": "",
            "csv_problem": csv_name_problem(Path(img).name) if _utf8(img) else "", "mask_path": "",
            "mask_path_problem": ""}
           for i, img in enumerate(ds.test)],
        columns=["split", "json", "pos", "image_id", "file_name", "name_ok", "width", "height", "missing_keys",
                 "type_errors", "csv_problem", "mask_path", "mask_path_problem"])
    seconds: dict[str, float] = {}
    images, img_problems, gx_results = _check_images(images, root, params, warnings, workers, seconds,
                                                     exif_orientation)
    problems += img_problems
    train = images[images["split"] == "train"].reset_index(drop=True)
    look = train["mask_path_problem"] == ""
    with _timed(seconds, "files"):
        masks = _inspect_where(train["mask_path"], look, workers)
    allowed = set(range(len(classes))) | {ignore_index}
    train["mask_decodable"] = (masks["readable"] | ~look).values
    train["mask_error"] = masks["error"].values
    train["mask_mode"] = masks["mode"].values
    train["mask_w"], train["mask_h"] = masks["real_w"].values, masks["real_h"].values
    train["bad_values"] = [",".join(v for v in s.split(",") if v and int(v) not in allowed) for s in masks["values"]]
    train["values"] = masks["values"].values
    with _timed(seconds, "gx"):
        res, fails = run_suite("masks", train, MASK_SUITE)
    gx_results["masks"] = res
    problems += [_problem(c, r, m, "mask") for c, r, m in fails]
    empty = train[train["values"].isin(["0", ""]) & masks["readable"].values]
    if len(empty) > params.max_empty_images:
        problems.append(Problem("too_many_empty_images", str(root / "masks"), f"{len(empty)} images",
                                f"{len(empty)} masks are all background (> validate.max_empty_images="
                                f"{params.max_empty_images}), e.g. {empty['file_name'].head(5).tolist()}"))
    gx_results = {"suites": gx_results}
    tolerated = _finish(problems, params, root, gx_results)
    warnings += [f"tolerated bad record <validate.max_bad_records={params.max_bad_records}>: {p}" for p in tolerated]
    bad = {p.image_id for p in tolerated}
    train_rows = [{"image_id": r["image_id"], "file_name": Path(r["file_name"]).name, "image": r["file_name"],
                   "width": int(r["real_w"]), "height": int(r["real_h"]), "batch": "images",
                   "mask_src": str(Path(r["mask_path"]).relative_to(root))}
                  for _, r in train.iterrows() if r["image_id"] not in bad]
    test_rows = [{"image_id": i, "file_name": Path(f).name, "image": f} for i, f in enumerate(ds.test)]
    empty_anns, empty_polys = flatten_annotations(CocoFile(root, [], [], []), {})
    return ValidationResult("mask_png", root, tuple(classes), train_rows, test_rows, None, {}, set(), images,
                            empty_anns, empty_polys, gx_results, warnings, tolerated, seconds)


def validate_dataset(data, params, workers: int | None = None) -> ValidationResult:
    """Validate `data` (DataParams) by its layout with `params` (ValidateParams)."""
    if data.layout == "mask_png":
        return validate_mask_png(Path(data.root), data.classes, params, ignore_index=data.ignore_index,
                                 workers=workers, exif_orientation=data.exif_orientation)
    return validate_coco(Path(data.root), data.classes, params, unknown=data.unknown,
                         ignore_index=data.ignore_index, workers=workers, exif_orientation=data.exif_orientation)


def _batch(file_name: str) -> str:
    parts = Path(file_name).parts
    return parts[0] if len(parts) > 1 else ""
