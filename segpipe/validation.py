"""Dataset validation: records flattened into pandas tables, checked by great-expectations suites, plus file checks.

Every problem is a `Problem` naming the file, the record and what to do. Structural problems (and anything wrong
in the test split, whose rows a submission needs) always fail; per-record problems are tolerated up to
`validate.max_bad_records`, and the tolerated records are excluded downstream (never silently: they are warnings).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pycocotools import mask as mask_utils

from segpipe.coco import (
    CocoFile, DataError, LayoutError, UnknownCategoryError, class_map, load_coco, read_mask_png_layout,
)
from segpipe.parallel import worker_pool
from segpipe.photos import ORIENTATION_NAMES, SWAPS_AXES, check_rule, describe, orientation_of

COORD_TOLERANCE = 1.0   # px: exporters write edge vertices at exactly width/height, sometimes a rounding beyond
FATAL = {
    "empty_dataset", "duplicate_image_id", "duplicate_file_name", "duplicate_annotation_id",
    "unknown_category_name", "leakage_train_test", "too_many_empty_images", "split_inconsistent",
    "exif_orientation_rejected",
}


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

    def __str__(self) -> str:
        return f"[{self.code}] {self.file}: {self.record}: {self.message}"

    @property
    def fatal(self) -> bool:
        return self.code in FATAL or self.split == "test"


@dataclass
class ValidationResult:
    layout: str
    root: Path
    classes: tuple[str, ...]
    train: list[dict]                 # {image_id, file_name, image (rel. to root), width, height, batch[, mask]}
    test: list[dict]                  # {image_id, file_name, image} in test order
    coco: CocoFile | None             # train_all (COCO layout) for rasterisation
    cmap: dict[int, int]
    skip_annotations: set             # tolerated bad annotation ids: excluded when rasterising
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
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(paths) >= 32:
        with worker_pool(workers) as pool:
            rows = pool.map(inspect_file, paths, chunksize=max(1, len(paths) // (workers * 8)))
    else:
        rows = [inspect_file(p) for p in paths]
    return pd.DataFrame(rows, columns=["path", "file_exists", "readable", "error", "real_w", "real_h", "orientation",
                                       "mode", "hash", "values"])


# ----------------------------------------------------------------------------- flatten records into tables

def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def flatten_images(coco: CocoFile, split: str) -> pd.DataFrame:
    """One row per image record."""
    rows = []
    for pos, im in enumerate(coco.images):
        im = im if isinstance(im, dict) else {}
        missing = [k for k in ("id", "file_name", "width", "height") if k not in im]
        rows.append({"split": split, "json": coco.path.name, "pos": pos, "image_id": im.get("id", f"#{pos}"),
                     "file_name": str(im.get("file_name", f"<record {pos}>")), "width": _num(im.get("width")),
                     "height": _num(im.get("height")), "missing_keys": ",".join(missing)})
    df = pd.DataFrame(rows, columns=["split", "json", "pos", "image_id", "file_name", "width", "height",
                                     "missing_keys"])
    df["image_id"] = df["image_id"].astype(str)
    return df


def flatten_annotations(coco: CocoFile, cmap: dict[int, int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per annotation and one per polygon, with the derived columns the suites check."""
    ann_rows, poly_rows = [], []
    for pos, ann in enumerate(coco.annotations):
        ann = ann if isinstance(ann, dict) else {}
        missing = [k for k in ("id", "image_id", "category_id", "segmentation") if k not in ann]
        im = coco.image_by_id.get(ann.get("image_id"))
        w, h = (_num(im.get("width")), _num(im.get("height"))) if im else (math.nan, math.nan)
        seg = ann.get("segmentation")
        kind, raster_area, rle_size_ok, bbox = "invalid", math.nan, True, [math.nan] * 4
        if isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
            kind = "polygon"
            valid = True
            for k, poly in enumerate(seg):
                xy = np.array([_num(v) for v in poly], float)
                n_pts = len(xy) // 2
                odd = len(xy) % 2 == 1
                has_nan = bool(np.isnan(xy).any())
                xs, ys = xy[0:2 * n_pts:2], xy[1:2 * n_pts:2]
                finite = n_pts > 0 and not has_nan
                poly_rows.append({
                    "json": coco.path.name, "ann_id": str(ann.get("id", f"#{pos}")), "image_id": str(ann.get("image_id")), "poly": k,
                    "n_points": n_pts, "odd": odd, "has_nan": has_nan,
                    "min_x": xs.min() if finite else math.nan, "min_y": ys.min() if finite else math.nan,
                    "max_x": xs.max() if finite else math.nan, "max_y": ys.max() if finite else math.nan,
                    "lim_x": w + COORD_TOLERANCE, "lim_y": h + COORD_TOLERANCE,
                })
                valid &= n_pts >= 3 and not odd and not has_nan
            if valid and im and not math.isnan(w * h):
                rles = mask_utils.frPyObjects([list(map(float, p)) for p in seg], int(h), int(w))
                merged = mask_utils.merge(rles)
                raster_area, bbox = float(mask_utils.area(merged)), mask_utils.toBbox(merged).tolist()
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            kind = "rle"
            rle_size_ok = bool(im) and list(seg["size"]) == [int(h), int(w)]
            if rle_size_ok:
                try:
                    rle = mask_utils.frPyObjects(seg, int(h), int(w)) if isinstance(seg["counts"], list) else \
                        {"size": seg["size"], "counts": seg["counts"].encode("ascii")
                         if isinstance(seg["counts"], str) else seg["counts"]}
                    raster_area, bbox = float(mask_utils.area(rle)), mask_utils.toBbox(rle).tolist()
                except Exception:
                    kind = "invalid"
        area = _num(ann.get("area"))
        ann_rows.append({
            "json": coco.path.name, "pos": pos, "ann_id": str(ann.get("id", f"#{pos}")),
            "image_id": str(ann.get("image_id")), "category_id": ann.get("category_id"),
            "class_index": cmap.get(ann.get("category_id"), -1) if _hashable(ann.get("category_id")) else -1,
            "image_exists": im is not None, "missing_keys": ",".join(missing), "kind": kind,
            "iscrowd": ann.get("iscrowd", 0), "rle_size_ok": rle_size_ok, "raster_area": raster_area,
            "area": raster_area if math.isnan(area) else area, "image_area": w * h, "width": w, "height": h,
            "bx": bbox[0], "by": bbox[1], "bw": bbox[2], "bh": bbox[3],
        })
    ann_df = pd.DataFrame(ann_rows, columns=[
        "json", "pos", "ann_id", "image_id", "category_id", "class_index", "image_exists", "missing_keys", "kind",
        "iscrowd", "rle_size_ok", "raster_area", "area", "image_area", "width", "height", "bx", "by", "bw", "bh"])
    ann_df["category_known"] = ann_df["class_index"] >= 0
    poly_df = pd.DataFrame(poly_rows, columns=["json", "ann_id", "image_id", "poly", "n_points", "odd", "has_nan", "min_x",
                                               "min_y", "max_x", "max_y", "lim_x", "lim_y"])
    return ann_df, poly_df


def _hashable(v) -> bool:
    try:
        hash(v)
        return True
    except TypeError:
        return False


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
    ("duplicate_annotation_id", "ExpectColumnValuesToBeUnique", {"column": "ann_id"},
     "annotation id {ann_id} is used more than once", "give every annotation a unique id"),
    ("annotation_missing_image", "ExpectColumnValuesToBeInSet", {"column": "image_exists", "value_set": [True]},
     "points to image id {image_id}, which is not in `images`", "fix image_id or delete the annotation"),
    ("unknown_category_id", "ExpectColumnValuesToBeInSet", {"column": "category_known", "value_set": [True]},
     "category_id {category_id} is not a category mapped to data.classes",
     "fix category_id or add the category (and its class)"),
    ("invalid_segmentation", "ExpectColumnValuesToBeInSet", {"column": "kind", "value_set": ["polygon", "rle"]},
     "segmentation is neither a list of polygons nor an RLE {{size, counts}}", "re-export the annotation"),
    ("rle_size_mismatch", "ExpectColumnValuesToBeInSet", {"column": "rle_size_ok", "value_set": [True]},
     "RLE size differs from the image's [height, width] [{height}, {width}]", "re-encode the RLE at image size"),
    ("zero_area", "ExpectColumnValuesToBeBetween", {"column": "raster_area", "min_value": 1},
     "rasterises to {raster_area} pixels", "delete the degenerate annotation or fix its polygon"),
    ("area_exceeds_image", "ExpectColumnPairValuesAToBeGreaterThanB",
     {"column_A": "image_area", "column_B": "area", "or_equal": True, "ignore_row_if": "either_value_is_missing"},
     "area {area} is larger than the image ({image_area} px)", "fix the area or the polygon (wrong scale?)"),
]
POLY_SUITE = [
    ("polygon_too_few_points", "ExpectColumnValuesToBeBetween", {"column": "n_points", "min_value": 3},
     "polygon {poly} has {n_points} point(s), needs >= 3", "fix or delete the polygon"),
    ("polygon_odd_coordinates", "ExpectColumnValuesToBeInSet", {"column": "odd", "value_set": [False]},
     "polygon {poly} has an odd number of coordinates", "polygons are flat [x1, y1, x2, y2, ...] lists"),
    ("polygon_nan", "ExpectColumnValuesToBeInSet", {"column": "has_nan", "value_set": [False]},
     "polygon {poly} has NaN/non-numeric coordinates", "fix the exporter; coordinates must be numbers"),
    ("polygon_outside_image", "ExpectColumnValuesToBeBetween", {"column": "min_x", "min_value": -COORD_TOLERANCE},
     "polygon {poly} has x = {min_x} < 0", "clip the polygon to the image or fix its scale"),
    ("polygon_outside_image", "ExpectColumnValuesToBeBetween", {"column": "min_y", "min_value": -COORD_TOLERANCE},
     "polygon {poly} has y = {min_y} < 0", "clip the polygon to the image or fix its scale"),
    ("polygon_outside_image", "ExpectColumnPairValuesAToBeGreaterThanB",
     {"column_A": "lim_x", "column_B": "max_x", "or_equal": True, "ignore_row_if": "either_value_is_missing"},
     "polygon {poly} has x = {max_x} beyond the image width", "clip the polygon to the image or fix its scale"),
    ("polygon_outside_image", "ExpectColumnPairValuesAToBeGreaterThanB",
     {"column_A": "lim_y", "column_B": "max_y", "or_equal": True, "ignore_row_if": "either_value_is_missing"},
     "polygon {poly} has y = {max_y} beyond the image height", "clip the polygon to the image or fix its scale"),
]
MASK_SUITE = [
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
    if kind == "image":
        record = f"image {row['image_id']} ({row['file_name']})"
        file = row.get("path") or row.get("json")
        return Problem(code, str(file), record, message, split, image_id=row["image_id"])
    if kind == "mask":
        return Problem(code, str(row["mask_path"]), f"image {row['file_name']}", message, split,
                       image_id=row["image_id"])
    record = f"annotation {row['ann_id']} (image {row['image_id']})"
    return Problem(code, str(row.get("json", "train_all.json")), record, message, split,
                   image_id=row["image_id"], ann_id=row["ann_id"])


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


def _check_images(images: pd.DataFrame, root: Path, params, warnings: list[str], workers,
                  seconds: dict[str, float], exif: str = "apply") -> tuple[pd.DataFrame, list, dict]:
    """File checks + image suites; returns the joined table, problems and GX results."""
    check_rule(exif)
    with _timed(seconds, "files"):
        files = inspect_files([str(root / f) for f in images["file_name"]], workers)
    images = pd.concat([images.reset_index(drop=True), files.reset_index(drop=True)], axis=1)
    images["decodable"] = images["readable"] | ~images["file_exists"]   # missing files are reported once
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
    problems: list[Problem] = []
    try:
        cmap = class_map(train_all.categories, classes, unknown, ignore_index)
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
    for name in ("train.json", "val.json"):  # the given split files must be subsets of train_all
        if (root / name).exists():
            sub = load_coco(root / name)
            for im in sub.images:
                ref = train_all.image_by_id.get(im.get("id"))
                if ref is None or ref.get("file_name") != im.get("file_name"):
                    problems.append(Problem("split_inconsistent", str(sub.path), f"image {im.get('id')} "
                                            f"({im.get('file_name')})", "not in train_all.json with the same id and "
                                            "file_name; regenerate the split files from train_all.json"))
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
    bad_images = {p.image_id for p in tolerated if p.ann_id is None}
    skip = {a for a in (p.ann_id for p in tolerated) if a is not None}
    ann_id_of = {str(a.get("id")): a.get("id") for a in train_all.annotations if isinstance(a, dict)}
    train_rows = [
        {"image_id": im["id"], "file_name": im["file_name"], "image": im["file_name"], "width": im["width"],
         "height": im["height"], "batch": _batch(im["file_name"])}
        for im in train_all.images if str(im["id"]) not in bad_images
    ]
    test_rows = [{"image_id": im["id"], "file_name": im["file_name"], "image": im["file_name"]}
                 for im in (test.images if test else [])]
    return ValidationResult("coco", root, tuple(classes), train_rows, test_rows, train_all, cmap,
                            {ann_id_of.get(a, a) for a in skip}, images, anns, polys, gx_results, warnings,
                            tolerated, seconds)


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
    images = pd.DataFrame(
        [{"split": "train", "json": "images/", "pos": i, "image_id": str(i), "file_name": img, "width": math.nan,
          "height": math.nan, "missing_keys": "", "mask_path": str(root / m)} for i, (img, m) in enumerate(ds.train)]
        + [{"split": "test", "json": "test/images/", "pos": i, "image_id": str(i), "file_name": img,
            "width": math.nan, "height": math.nan, "missing_keys": "", "mask_path": ""}
           for i, img in enumerate(ds.test)],
        columns=["split", "json", "pos", "image_id", "file_name", "width", "height", "missing_keys", "mask_path"])
    seconds: dict[str, float] = {}
    images, img_problems, gx_results = _check_images(images, root, params, warnings, workers, seconds,
                                                     exif_orientation)
    problems += img_problems
    train = images[images["split"] == "train"].reset_index(drop=True)
    with _timed(seconds, "files"):
        masks = inspect_files(train["mask_path"].tolist(), workers)
    allowed = set(range(len(classes))) | {ignore_index}
    train["mask_decodable"] = masks["readable"].values
    train["mask_error"] = masks["error"].values
    train["mask_mode"] = masks["mode"].values
    train["mask_w"], train["mask_h"] = masks["real_w"].values, masks["real_h"].values
    train["bad_values"] = [",".join(v for v in s.split(",") if v and int(v) not in allowed) for s in masks["values"]]
    train["values"] = masks["values"].values
    with _timed(seconds, "gx"):
        res, fails = run_suite("masks", train, MASK_SUITE)
    gx_results["masks"] = res
    problems += [_problem(c, r, m, "mask") for c, r, m in fails]
    empty = train[train["values"].isin(["0", ""]) & train["mask_decodable"]]
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
