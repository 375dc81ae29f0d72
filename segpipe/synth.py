"""The embedded synthetic trash dataset: the competition layout, deterministic for a seed.

Each class has its own shape family and colour/texture distribution (with overlapping hues between some
classes), objects of widely varied size overlap on a cluttered background, and class frequencies follow the
real trash data. Objects are painted in ascending class order, so the pixels on top are the ones the `max`
overlap rule labels; labels are rasterised from the very polygons written to the JSON.

Two shapes (`generate.shape`, SHAPES below): `demo`, small photos in train folders and a test folder of its own for
the CPU demo, and `competition`, the real data's: 512 px photos, train and test photos sharing the three batch
folders, the real split sizes and object density, and an `UNKNOWN` category on a few annotations.

The demo is made to be learnt from scratch on 2 CPU cores in minutes, so that its ablation measures steps of a
model that has learnt something: each class has a hue band of its own (`colours: distinct`), classes are drawn
equally often (`class_balance: 1`) and no object is smaller than 4% of the side (`min_object`). The competition
shape keeps the real data's difficulty: shared hues, the real class frequencies, objects down to a few pixels.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from segpipe.coco import CocoFile, rasterize
from segpipe.parallel import worker_pool

# Annotation counts per class in the real competition's train_all.json (General trash .. Clothing):
# Paper and Plastic bag dominate, Battery and Clothing are rare.
CLASS_FREQ = np.array([3966, 6352, 897, 936, 982, 2943, 1263, 5178, 159, 177], float)
CLASS_FREQ /= CLASS_FREQ.sum()

# Per class: shape family, base HSV hue range (OpenCV 0..180), saturation range, value range, size factor.
# Hues overlap on purpose (Paper/Styrofoam/Paper pack light; Glass/Plastic green; Metal/Battery grey).
STYLE = {
    1: ("blob", (0, 180), (20, 120), (60, 200), 1.0),        # General trash: anything, irregular
    2: ("quad", (10, 30), (0, 50), (170, 250), 1.0),         # Paper: light flat sheets
    3: ("box", (0, 180), (90, 220), (120, 230), 0.8),        # Paper pack: saturated printed boxes
    4: ("can", (90, 120), (0, 40), (110, 220), 0.6),         # Metal: grey cans with a sheen
    5: ("bottle", (35, 80), (60, 200), (40, 160), 0.8),      # Glass: green/brown bottles, darker
    6: ("bottle", (35, 130), (60, 230), (120, 240), 0.9),    # Plastic: bottles, overlaps Glass hue
    7: ("round_rect", (15, 35), (0, 30), (200, 255), 0.9),   # Styrofoam: white blocks, overlaps Paper
    8: ("bag", (0, 180), (40, 230), (80, 240), 1.3),         # Plastic bag: big smooth blobs, any colour
    9: ("battery", (0, 30), (120, 240), (60, 200), 0.25),    # Battery: small cylinders with a band
    10: ("cloth", (100, 170), (60, 200), (50, 200), 1.5),    # Clothing: large, striped fabric
}
# colours: distinct: class c's hue band in a partition of the hue circle (OpenCV 0..180) into 10, saturated and
# bright, so that colour alone names the class: the demo's classes are learnt from scratch in a few epochs
DISTINCT_HUE_WIDTH = 18
DISTINCT_SAT, DISTINCT_VAL = (170, 240), (150, 240)
SPLIT_CODE = {"train": 1, "test": 2}
# Objects per photo: a hump over 1..8 (mean 385/84 ~ 4.58). `objects_per_image` rescales each draw after it is made,
# so the random stream never depends on it; at the default 4.6 every count rounds back to itself (the demo data of
# earlier versions, byte for byte); 7.9 gives the competition's ~26k annotations on 3.3k photos.
OBJECT_COUNTS = np.arange(1, 9)
OBJECT_COUNT_P = np.array([6, 10, 12, 13, 13, 12, 10, 8]) / 84.0
BASE_OBJECTS_PER_IMAGE = float(OBJECT_COUNTS @ OBJECT_COUNT_P)

# The competition's folders: train and test photos live in the same ones (a folder is no train/test boundary).
COMPETITION_FOLDERS = ("batch_01_vt", "batch_02_vt", "batch_03")
# The edition of the data that carries UNKNOWN lists it first, with id 0 (the classes keep ids 1..10): code that
# takes category id 0 for the background meets it here.
UNKNOWN_CATEGORY = {"id": 0, "name": "UNKNOWN", "supercategory": "UNKNOWN"}
# generate.shape -> the generator's numbers; a key set in params.yaml's `generate` section overrides its value.
SHAPES: dict[str, dict[str, float]] = {
    # the CPU demo: the whole chain in minutes on 2 cores, on classes a model learns from scratch in a few epochs
    "demo": {"n_train": 192, "n_test": 48, "image_size": 256, "n_batches": 4, "val_fraction": 0.2,
             "objects_per_image": 4.6, "unknown_fraction": 0.0,
             "colours": "distinct", "class_balance": 1.0, "min_object": 0.04},
    # the real data: train_all 3,272 (train 2,618 / val 654) + 819 test photos of 512 px in the three shared folders,
    # ~26k annotations (7.9 per photo); the share of UNKNOWN annotations is an assumption (a few per hundred)
    "competition": {"n_train": 3272, "n_test": 819, "image_size": 512, "n_batches": len(COMPETITION_FOLDERS),
                    "val_fraction": 0.2, "objects_per_image": 7.9, "unknown_fraction": 0.01,
                    "colours": "overlapping", "class_balance": 0.0, "min_object": 0.0},
}
COLOURS = ("overlapping", "distinct")


@dataclass(frozen=True)
class SynthSummary:
    out_dir: Path
    hidden_dir: Path
    n_train: int
    n_val: int
    n_test: int
    n_annotations: int
    annotations_per_class: dict[str, int]    # train_all; UNKNOWN too when the shape has it
    folders: tuple[str, ...] = ()            # the image folders, in order (train and test share them or not)
    image_size: int = 0


def shape_settings(shape: str, **given) -> dict:
    """The generator's keyword arguments for `shape`, with the values in `given` (None = the shape's) replacing its."""
    if shape not in SHAPES:
        raise ValueError(f"Wrong generate.shape `{shape}`, supported shapes: {sorted(SHAPES)}")
    kw = {**SHAPES[shape], **{k: v for k, v in given.items() if v is not None}}
    unknown = sorted(set(kw) - set(SHAPES[shape]))
    if unknown:
        raise ValueError(f"generate: unknown keys {unknown}; valid: {sorted(SHAPES[shape])}")
    if shape == "competition":
        if kw["n_batches"] != len(COMPETITION_FOLDERS):
            raise ValueError(f"generate.n_batches={kw['n_batches']}: the competition shape has the real data's "
                             f"{len(COMPETITION_FOLDERS)} folders {list(COMPETITION_FOLDERS)}; leave n_batches out")
        kw["folders"] = COMPETITION_FOLDERS
    if kw["colours"] not in COLOURS:
        raise ValueError(f"Wrong generate.colours `{kw['colours']}`, supported: {list(COLOURS)}")
    kw["n_train"], kw["n_test"], kw["image_size"], kw["n_batches"] = (
        int(kw["n_train"]), int(kw["n_test"]), int(kw["image_size"]), int(kw["n_batches"]))
    return kw


def _shape(kind: str, rng: np.random.Generator, cx: float, cy: float, r: float) -> list[np.ndarray]:
    """Polygons (list of (K, 2) float) for one object of radius ~r centred on (cx, cy)."""
    ang = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])

    def place(pts: np.ndarray) -> np.ndarray:
        return pts @ rot.T * r + (cx, cy)

    if kind in ("blob", "bag", "cloth"):
        k = {"blob": 11, "bag": 18, "cloth": 24}[kind]
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        jitter = {"blob": 0.45, "bag": 0.15, "cloth": 0.3}[kind]
        rad = 1 + rng.uniform(-jitter, jitter, k)
        if kind == "bag":  # smooth: low-frequency radius
            rad = 1 + 0.25 * np.sin(2 * t + rng.uniform(0, 6)) + 0.1 * np.sin(3 * t + rng.uniform(0, 6))
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad * rng.uniform(0.5, 1.0)], 1)
        polys = [place(pts)]
        if kind == "cloth" and rng.random() < 0.3:  # a sleeve lying apart: a multi-polygon annotation
            t2 = np.linspace(0, 2 * np.pi, 8, endpoint=False)
            sleeve = np.stack([np.cos(t2) * 0.3 + 1.4, np.sin(t2) * 0.15], 1)
            polys.append(place(sleeve))
        return polys
    if kind == "quad":
        a = rng.uniform(0.5, 1.0)
        pts = np.array([[-1, -a], [1, -a], [1, a], [-1, a]], float) + rng.normal(0, 0.08, (4, 2))
    elif kind == "box":
        a = rng.uniform(0.4, 0.8)
        pts = np.array([[-a, -1], [a, -1], [a + 0.25, -0.8], [a + 0.25, 1.1], [-a + 0.25, 1.1], [-a, 1]], float)
    elif kind == "can":
        t = np.linspace(0, np.pi, 8)
        top = np.stack([np.cos(t) * 0.5, -1 - np.sin(t) * 0.15], 1)
        bot = np.stack([-np.cos(t) * 0.5, 1 + np.sin(t) * 0.15], 1)
        pts = np.concatenate([top[::-1], bot[::-1]])
    elif kind == "bottle":
        n = rng.uniform(0.12, 0.2)
        b = rng.uniform(0.3, 0.45)
        pts = np.array([[-n, -1], [n, -1], [n, -0.6], [b, -0.3], [b, 1], [-b, 1], [-b, -0.3], [-n, -0.6]])
    elif kind == "round_rect":
        a = rng.uniform(0.5, 0.9)
        t = np.linspace(0, np.pi / 2, 4)
        corners = []
        for (sx, sy), off in zip([(1, 1), (-1, 1), (-1, -1), (1, -1)], range(4)):
            tt = t + off * np.pi / 2
            corners.append(np.stack([np.cos(tt) * 0.2 + sx * 0.8, np.sin(tt) * 0.2 + sy * (a - 0.2)], 1))
        pts = np.concatenate(corners)
    else:  # battery
        pts = np.array([[-0.3, -1], [0.3, -1], [0.3, 1], [-0.3, 1]], float)
    return [place(pts)]


def _background(rng: np.random.Generator, size: int, tint: np.ndarray) -> np.ndarray:
    """Cluttered textured background (H, W, 3) uint8: low-frequency noise, clutter strokes, grain."""
    low = rng.uniform(0, 1, (6, 6, 3)).astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC) * 70 + tint
    for _ in range(rng.integers(6, 14)):  # unlabelled clutter: lines and patches in background-like colours
        c = (tint + rng.uniform(-50, 50, 3)).tolist()
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        if rng.random() < 0.5:
            cv2.line(img, tuple(map(int, p1)), tuple(map(int, p2)), c, int(rng.integers(1, max(2, size // 40))))
        else:
            cv2.circle(img, tuple(map(int, p1)), int(rng.integers(2, max(3, size // 12))), c, -1)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return img


def _texture(rng: np.random.Generator, cls: int, h: int, w: int, colours: str) -> np.ndarray:
    """Object colour/texture (h, w, 3) float32 BGR for one object's bounding box."""
    _, hue, sat, val, _ = STYLE[cls]
    if colours == "distinct":   # same number of draws as the overlapping colours: the random stream is unchanged
        lo = (cls - 1) * DISTINCT_HUE_WIDTH
        hue, sat, val = (lo, lo + DISTINCT_HUE_WIDTH - 10), DISTINCT_SAT, DISTINCT_VAL
    hsv = np.array([[[rng.uniform(*hue), rng.uniform(*sat), rng.uniform(*val)]]], np.float32)
    base = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)[0, 0]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tex = np.broadcast_to(base, (h, w, 3)).copy()
    if cls == 4:    # metal sheen: a bright band across the can
        tex += (50 * np.exp(-((xx / max(w, 1) - rng.uniform(0.2, 0.8)) ** 2) / 0.02))[..., None]
    elif cls == 10:  # fabric stripes
        period = rng.uniform(3, 9)
        tex *= (0.75 + 0.25 * np.sign(np.sin((xx + yy * rng.uniform(-1, 1)) / period)))[..., None]
    elif cls == 9:   # battery: dark body, coloured band at one end
        body = rng.uniform(20, 60)
        if colours == "distinct":   # the class colour on the whole body (a dark band at one end): it stays nameable
            tex[: max(1, h // 3)] *= 0.5
        else:
            tex[:] = body
            tex[: max(1, h // 3)] = base
    elif cls == 3:   # printed box: blocks of a second colour
        tex[(xx // max(2, w // 4) + yy // max(2, h // 4)) % 2 == 0] *= rng.uniform(0.5, 0.9)
    elif cls in (5, 6):  # bottles: shading across
        tex *= (0.7 + 0.5 * np.sin(np.pi * xx / max(w, 1)))[..., None]
    tex += rng.normal(0, 10, tex.shape).astype(np.float32)
    return tex


@dataclass(frozen=True)
class Look:
    """How objects are drawn: the settings that make a shape easy or hard to learn (SHAPES)."""

    objects_per_image: float = 4.6
    colours: str = "overlapping"      # overlapping: STYLE's hue ranges; distinct: a hue band per class
    class_balance: float = 0.0        # 0: the real class frequencies (CLASS_FREQ); 1: every class equally often
    min_object: float = 0.0           # smallest object radius, as a fraction of the side (else 2.5 px)

    def class_p(self) -> np.ndarray:
        return (1 - self.class_balance) * CLASS_FREQ + self.class_balance / len(CLASS_FREQ)


def _render(args: tuple[int, int, int, int, Look]) -> tuple[bytes, list[dict]]:
    """One image: JPEG bytes and its annotations (category_id, segmentation polygons, iscrowd flag)."""
    seed, split_code, index, size, look = args
    objects_per_image, class_p = look.objects_per_image, look.class_p()
    rng = np.random.default_rng([seed, split_code, index])
    tint = rng.uniform(60, 170, 3).astype(np.float32)
    img = _background(rng, size, tint)
    n_obj = int(rng.choice(OBJECT_COUNTS, p=OBJECT_COUNT_P))
    # rescale after the draw: the random stream (and so the default data) does not depend on the knob
    n_obj = max(1, round(n_obj * objects_per_image / BASE_OBJECTS_PER_IMAGE))
    objs = []
    for _ in range(n_obj):
        cls = int(rng.choice(np.arange(1, 11), p=class_p))   # one draw whatever p: the stream stays aligned
        # log-uniform radius from tiny (~1.5% of the side) to half the image
        r = size * math.exp(rng.uniform(math.log(0.015), math.log(0.25))) * STYLE[cls][4]
        r = float(np.clip(r, max(2.5, look.min_object * size), size * 0.5))
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        polys = []
        for p in _shape(STYLE[cls][0], rng, cx, cy, r):
            p = np.clip(np.round(p), 0, size - 1)
            if len(np.unique(p, axis=0)) >= 3:
                polys.append(p.astype(np.int32))
        if polys:
            objs.append((cls, polys))
    objs.sort(key=lambda o: o[0])  # paint in class order: what shows on top is what `max` labels
    anns = []
    for cls, polys in objs:
        x0 = int(min(p[:, 0].min() for p in polys))
        y0 = int(min(p[:, 1].min() for p in polys))
        x1 = int(max(p[:, 0].max() for p in polys)) + 1
        y1 = int(max(p[:, 1].max() for p in polys)) + 1
        m = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(m, [p - (x0, y0) for p in polys], 1)
        if not m.any():
            continue
        tex = _texture(rng, cls, y1 - y0, x1 - x0, look.colours)
        sel = m.astype(bool)
        img[y0:y1, x0:x1][sel] = tex[sel]
        anns.append({"category_id": cls, "segmentation": [p.reshape(-1).astype(float).tolist() for p in polys],
                     "iscrowd": int(rng.random() < 0.05)})
    img = cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (3, 3), 0.6)
    ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return jpg.tobytes(), anns


def _finish_annotation(ann: dict, ann_id: int, image_id: int, size: int) -> dict:
    """Area and bbox from pycocotools; the ~5% crowd annotations are stored as compressed RLE."""
    rles = mask_utils.frPyObjects(ann["segmentation"], size, size)
    rle = mask_utils.merge(rles)
    seg = ann["segmentation"]
    if ann["iscrowd"]:
        seg = {"size": [size, size], "counts": rle["counts"].decode("ascii")}
    return {"id": ann_id, "image_id": image_id, "category_id": ann["category_id"], "segmentation": seg,
            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": ann["iscrowd"]}


def _file_names(n: int, first_batch: int, per_batch: int) -> list[str]:
    return [f"batch_{first_batch + i // per_batch:02d}_vt/{i % per_batch + 1:04d}.jpg" for i in range(n)]


def _shared_file_names(n_train: int, n_test: int, folders: Sequence[str], seed: int) -> dict[str, list[str]]:
    """Train and test photos spread over the same folders and numbered together in each, as in the real data.

    Each folder holds its share of the test photos (largest remainder), at positions drawn from the seed.
    """
    total = n_train + n_test
    sizes = np.array([total * (j + 1) // len(folders) - total * j // len(folders) for j in range(len(folders))])
    quota = sizes * n_test / max(total, 1)
    n_test_in = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - n_test_in), kind="stable")[: n_test - int(n_test_in.sum())]:
        n_test_in[j] += 1
    rng = np.random.default_rng([seed, 5])
    names: dict[str, list[str]] = {"train": [], "test": []}
    for folder, size, t in zip(folders, sizes, n_test_in):
        is_test = np.zeros(size, bool)
        is_test[rng.permutation(size)[:t]] = True
        for k in range(size):
            names["test" if is_test[k] else "train"].append(f"{folder}/{k + 1:04d}.jpg")
    return names


def _mark_unknown(raw: list[list[dict]], fraction: float, rng: np.random.Generator) -> None:
    """Relabel round(fraction x annotations) of them (at least one) UNKNOWN: objects whose class no one named."""
    flat = [a for anns in raw for a in anns]
    if fraction <= 0 or not flat:
        return
    for k in rng.permutation(len(flat))[: max(1, round(fraction * len(flat)))]:
        flat[k]["category_id"] = UNKNOWN_CATEGORY["id"]


def generate(
    out_dir: Path, hidden_dir: Path, *, n_train: int, n_test: int, image_size: int, n_batches: int,
    val_fraction: float, seed: int, classes: tuple[str, ...] | list[str], objects_per_image: float = 4.6,
    unknown_fraction: float = 0.0, folders: Sequence[str] | None = None, workers: int | None = None,
    colours: str = "overlapping", class_balance: float = 0.0, min_object: float = 0.0,
) -> SynthSummary:
    """Write train_all/train/val/test.json + batch folders to out_dir and the test labels to hidden_dir.

    objects_per_image: mean objects drawn per photo (a few fall below 3 distinct pixels and are dropped).
    folders: None = train photos in n_batches folders batch_01_vt.. and test photos in the next one (the demo);
    else these folders, each holding train and test photos (the competition's).
    unknown_fraction: > 0 adds the UNKNOWN category and relabels that share of each split's annotations (at least
    one) with it; the hidden test labels take their pixels as background, the class the leaderboard scores them as.
    colours, class_balance, min_object: how learnable the objects are (Look); the defaults are the real data's.
    """
    if len(classes) != 11:
        raise ValueError(f"the synthetic dataset has 10 trash classes + background; got {len(classes)} classes")
    out_dir, hidden_dir = Path(out_dir), Path(hidden_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hidden_dir.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": name, "supercategory": name} for i, name in enumerate(classes) if i > 0]
    if not 0 <= unknown_fraction < 1:
        raise ValueError(f"generate.unknown_fraction must be in [0, 1), got {unknown_fraction}")
    if unknown_fraction > 0:
        categories = [dict(UNKNOWN_CATEGORY)] + categories
    if folders:
        names = _shared_file_names(n_train, n_test, folders, seed)
        folder_list = tuple(folders)
    else:
        per_batch = math.ceil(n_train / n_batches)
        names = {"train": _file_names(n_train, 1, per_batch), "test": _file_names(n_test, n_batches + 1, per_batch)}
        folder_list = tuple(dict.fromkeys(n.split("/")[0] for n in names["train"] + names["test"]))
    if objects_per_image <= 0:
        raise ValueError(f"generate.objects_per_image must be > 0, got {objects_per_image}")
    if not 0 <= class_balance <= 1:
        raise ValueError(f"generate.class_balance must be in [0, 1], got {class_balance}")
    if not 0 <= min_object < 0.5:
        raise ValueError(f"generate.min_object must be in [0, 0.5), a fraction of the side; got {min_object}")
    look = Look(objects_per_image, colours, class_balance, min_object)
    jobs = [(seed, SPLIT_CODE[s], i, image_size, look) for s in ("train", "test")
            for i in range(len(names[s]))]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) >= 64:  # per-image seeds: identical output for any worker count
        with worker_pool(workers) as pool:   # forked processes, or threads in a threaded process
            rendered = pool.map(_render, jobs, chunksize=16)
    else:
        rendered = [_render(j) for j in jobs]
    coco: dict[str, dict] = {}
    k = 0
    for split in ("train", "test"):
        part = rendered[k:k + len(names[split])]
        k += len(names[split])
        # drawn here, after the photos: the rendering's random stream never depends on it
        _mark_unknown([raw for _, raw in part], unknown_fraction, np.random.default_rng([seed, SPLIT_CODE[split], 11]))
        images, anns = [], []
        for i, (name, (jpg, raw)) in enumerate(zip(names[split], part)):
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / name).write_bytes(jpg)
            images.append({"id": i, "file_name": name, "width": image_size, "height": image_size})
            for a in raw:
                anns.append(_finish_annotation(a, len(anns), i, image_size))
        coco[split] = {"images": images, "annotations": anns, "categories": categories}

    train_all = coco["train"]
    rng = np.random.default_rng([seed, 99])
    val_ids = set(rng.permutation(n_train)[: max(1, round(n_train * val_fraction))].tolist())

    def subset(keep) -> dict:
        return {"images": [im for im in train_all["images"] if keep(im["id"])],
                "annotations": [a for a in train_all["annotations"] if keep(a["image_id"])],
                "categories": categories}

    _write_json(out_dir / "train_all.json", train_all)
    _write_json(out_dir / "train.json", subset(lambda i: i not in val_ids))
    _write_json(out_dir / "val.json", subset(lambda i: i in val_ids))
    _write_json(out_dir / "test.json", {**coco["test"], "annotations": []})

    # Leaderboard-only: test labels at submission resolution (256, nearest) and the public/private split.
    test_coco = CocoFile(hidden_dir / "test_full.json", coco["test"]["images"], coco["test"]["annotations"],
                         categories)
    cmap = {c["id"]: 0 if c["name"] == UNKNOWN_CATEGORY["name"] else c["id"] for c in categories}
    labels = np.stack([
        cv2.resize(rasterize(test_coco, im["id"], cmap, "max"), (256, 256), interpolation=cv2.INTER_NEAREST)
        for im in coco["test"]["images"]
    ]) if n_test else np.zeros((0, 256, 256), np.uint8)
    np.save(hidden_dir / "labels.npy", labels.astype(np.uint8))
    public = np.zeros(n_test, bool)
    public[np.random.default_rng([seed, 7]).permutation(n_test)[: n_test // 2]] = True
    _write_json(hidden_dir / "index.json", {"file_names": names["test"], "public": public.tolist(),
                                            "classes": list(classes)})
    _write_json(hidden_dir / "test_full.json", coco["test"])  # the labelled test COCO, for audits only

    name_of = {c["id"]: c["name"] for c in categories}
    per_class = {c["name"]: 0 for c in categories}
    for a in train_all["annotations"]:
        per_class[name_of[a["category_id"]]] += 1
    return SynthSummary(out_dir, hidden_dir, n_train, len(val_ids), n_test, len(train_all["annotations"]),
                        per_class, folder_list, image_size)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")))
