"""The synthetic generator: deterministic, competition layout, class imbalance, hidden labels = polygons."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import pipelines.generate
from segpipe.coco import class_map, load_coco, rasterize
from segpipe.config import TRASH_CLASSES, DataParams, GenerateParams, ParamsError, load_params, parse_section
from segpipe.synth import BASE_OBJECTS_PER_IMAGE, COMPETITION_FOLDERS, SHAPES, generate, shape_settings

KW = dict(n_train=40, n_test=10, image_size=64, n_batches=4, val_fraction=0.25, classes=TRASH_CLASSES)


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synth")
    generate(root / "data", root / "hidden", seed=0, **KW)
    return root / "data", root / "hidden"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = {**KW, "n_train": 60, "n_test": 10}   # >= 64 images: the multiprocessing path runs
    generate(tmp_path / "a" / "data", tmp_path / "a" / "hidden", seed=0, workers=1, **kw)
    generate(tmp_path / "b" / "data", tmp_path / "b" / "hidden", seed=0, workers=2, **kw)
    generate(tmp_path / "c" / "data", tmp_path / "c" / "hidden", seed=1, **kw)
    a = tree_hash(tmp_path / "a")
    assert len(a) == 70 + 4 + 3 and a == tree_hash(tmp_path / "b")   # per-image seeds: any worker count
    assert a["data/train_all.json"] != tree_hash(tmp_path / "c")["data/train_all.json"]


def test_objects_per_image_scales_annotations_and_default_is_the_unscaled_draw(synth, tmp_path):
    data, _ = synth
    # the default 4.6 rounds every draw back to itself: identical bytes to the exact base mean
    generate(tmp_path / "base" / "data", tmp_path / "base" / "hidden", seed=0, objects_per_image=BASE_OBJECTS_PER_IMAGE,
             **KW)
    assert tree_hash(tmp_path / "base" / "data") == tree_hash(data)
    generate(tmp_path / "dense" / "data", tmp_path / "dense" / "hidden", seed=0, objects_per_image=7.9, **KW)
    n = {k: len(json.loads((root / "train_all.json").read_text())["annotations"])
         for k, root in (("default", data), ("dense", tmp_path / "dense" / "data"))}
    assert 1.5 < n["dense"] / n["default"] < 1.95, n     # 7.9 / 4.58 = 1.72, minus objects too small to keep


def test_competition_layout(synth):
    data, hidden = synth
    assert sorted(p.name for p in data.iterdir() if p.is_file()) == ["test.json", "train.json", "train_all.json",
                                                                    "val.json"]
    train_all, train, val, test = (json.loads((data / f).read_text())
                                   for f in ("train_all.json", "train.json", "val.json", "test.json"))
    assert [c["name"] for c in train_all["categories"]] == list(TRASH_CLASSES[1:])
    assert [c["id"] for c in train_all["categories"]] == list(range(1, 11))
    assert len(train_all["images"]) == 40 and len(test["images"]) == 10 and test["annotations"] == []
    assert len(val["images"]) == 10 and len(train["images"]) == 30
    assert {i["id"] for i in train["images"]}.isdisjoint({i["id"] for i in val["images"]})
    assert train_all["images"][0]["file_name"] == "batch_01_vt/0001.jpg"
    assert {i["file_name"].split("/")[0] for i in train_all["images"]} == {f"batch_0{k}_vt" for k in (1, 2, 3, 4)}
    assert test["images"][0]["file_name"].startswith("batch_05_vt/")
    for im in train_all["images"] + test["images"]:
        img = cv2.imread(str(data / im["file_name"]))
        assert img.shape == (64, 64, 3)
    anns = train_all["annotations"]
    assert {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"} <= set(anns[0])
    kinds = {type(a["segmentation"]).__name__ for a in anns}
    assert kinds == {"list", "dict"}                      # polygons and some crowd RLE
    assert all(a["iscrowd"] == isinstance(a["segmentation"], dict) for a in anns)
    per_image = np.bincount([a["image_id"] for a in anns], minlength=40)
    assert per_image.max() <= 8 and per_image.min() >= 0


def test_class_imbalance(tmp_path):
    generate(tmp_path / "d", tmp_path / "h", seed=3, **{**KW, "n_train": 300, "n_test": 1})
    anns = json.loads((tmp_path / "d" / "train_all.json").read_text())["annotations"]
    counts = np.bincount([a["category_id"] for a in anns], minlength=11)
    assert counts[2] > 10 * counts[9] and counts[8] > 10 * counts[10]      # Paper/Plastic bag vs Battery/Clothing
    assert counts[2] > counts[3] and counts[8] > counts[5]
    areas = np.array([a["area"] for a in anns])
    assert areas.min() < 30 and areas.max() > 0.15 * 64 * 64               # tiny to large objects


def test_hidden_labels_match_rasterised_polygons(synth):
    data, hidden = synth
    labels = np.load(hidden / "labels.npy")
    index = json.loads((hidden / "index.json").read_text())
    test = json.loads((data / "test.json").read_text())
    assert labels.shape == (10, 256, 256) and labels.dtype == np.uint8
    assert index["file_names"] == [i["file_name"] for i in test["images"]]
    assert sum(index["public"]) == 5 and index["classes"] == list(TRASH_CLASSES)
    full = load_coco(hidden / "test_full.json")
    cmap = class_map(full.categories, TRASH_CLASSES)
    for k, im in enumerate(full.images):
        mask = rasterize(full, im["id"], cmap, "max")
        assert np.array_equal(cv2.resize(mask, (256, 256), interpolation=cv2.INTER_NEAREST), labels[k])
    assert (labels > 0).mean() > 0.02 and len(np.unique(labels)) > 3


def test_pixels_follow_labels(synth):
    """Objects are painted where their polygons are: object pixels differ from the background around them."""
    data, _ = synth
    coco = load_coco(data / "train_all.json")
    cmap = class_map(coco.categories, TRASH_CLASSES)
    diffs = []
    for im in coco.images[:20]:
        mask = rasterize(coco, im["id"], cmap)
        img = cv2.imread(str(data / im["file_name"])).astype(float)
        inner = cv2.erode((mask > 0).astype(np.uint8), np.ones((3, 3))) > 0
        ring = (cv2.dilate((mask > 0).astype(np.uint8), np.ones((7, 7))) > 0) & (mask == 0)
        if inner.sum() > 20 and ring.sum() > 20:
            diffs.append(np.abs(img[inner].mean(0) - img[ring].mean(0)).sum())
    assert np.median(diffs) > 15


# sha256 of the demo generator's JSON for KW and seed 0, taken before the competition shape existed: the demo's data
# (its annotations, split and hidden labels are drawn from the same per-photo streams as its pixels) is unchanged
DEMO_JSON_SHA256 = {
    "train_all.json": "1bb0780161cfdf7c77fb76a7abf9ba47cfc04c87ddfc5aefa517b5fb1edd5330",
    "train.json": "5d8fc3f85eb66bf3b8047c9d7b02dab96e8bbd823d0dc919d6fc73141c2fbe13",
    "val.json": "89348b6cd4628a182126c24f32e6dc17fc96a61077a717b67885e579b7c6bb95",
    "test.json": "1ea19a22e4a907f526036a0d5a62e7a4fc5fd0d4b72f195ebdf15c6d530cd090",
}


def test_generator_defaults_unchanged_and_demo_shape_is_the_default(synth):
    data, _ = synth
    assert {f: hashlib.sha256((data / f).read_bytes()).hexdigest() for f in DEMO_JSON_SHA256} == DEMO_JSON_SHA256
    demo = {"n_train": 192, "n_test": 48, "image_size": 256, "n_batches": 4, "val_fraction": 0.2,
            "objects_per_image": 4.6, "unknown_fraction": 0.0, "colours": "distinct", "class_balance": 1.0,
            "min_object": 0.04}
    assert pipelines.generate.settings(load_params("generate")) == demo      # params.yaml: shape demo
    assert pipelines.generate.settings(GenerateParams()) == demo            # an empty section: the same
    # a key given replaces the shape's value; the others stay
    assert pipelines.generate.settings(GenerateParams(n_train=24, image_size=64)) == {**demo, "n_train": 24,
                                                                                        "image_size": 64}


def test_competition_shape_numbers():
    c = shape_settings("competition")
    n_val = round(c["n_train"] * c["val_fraction"])
    assert (c["n_train"] - n_val, n_val, c["n_test"]) == (2618, 654, 819)    # the real split's sizes
    assert c["image_size"] == 512 and c["objects_per_image"] == 7.9 and 0 < c["unknown_fraction"] < 0.05
    assert c["folders"] == ("batch_01_vt", "batch_02_vt", "batch_03")
    with pytest.raises(ValueError, match="competition shape has the real data's 3 folders"):
        shape_settings("competition", n_batches=4)
    with pytest.raises(ParamsError, match="generate.shape"):
        parse_section({"generate": {"shape": "kaggle"}}, "generate", GenerateParams)


@pytest.fixture(scope="module")
def competition(tmp_path_factory) -> tuple[Path, Path]:
    """The competition shape at 1/25 of its photos (folders, photo size, density and UNKNOWN as they are)."""
    root = tmp_path_factory.mktemp("competition")
    data = DataParams(root=str(root / "data"), classes=TRASH_CLASSES, hidden_labels=str(root / "hidden"))
    pipelines.generate.run(GenerateParams(shape="competition", n_train=131, n_test=33), data)
    return root / "data", root / "hidden"


def test_competition_shape_layout(competition):
    data, hidden = competition
    train_all, train, val, test = (json.loads((data / f).read_text())
                                   for f in ("train_all.json", "train.json", "val.json", "test.json"))
    # the counts, in the real data's ratio: train 0.8 / val 0.2 of train_all, test ~ a quarter of train_all
    assert (len(train_all["images"]), len(train["images"]), len(val["images"]), len(test["images"])) == \
        (131, 105, 26, 33)
    assert abs(len(test["images"]) / len(train_all["images"]) - 819 / 3272) < 0.01
    # the three folders, each holding train and test photos, numbered together (no name twice)
    folders = {s: {im["file_name"].split("/")[0] for im in d["images"]} for s, d in (("train", train_all),
                                                                                    ("test", test))}
    assert folders["train"] == folders["test"] == set(COMPETITION_FOLDERS)
    names = [im["file_name"] for im in train_all["images"] + test["images"]]
    assert len(set(names)) == len(names) == len([p for p in data.rglob("*") if p.is_file()]) - 4
    # UNKNOWN: listed (id 0, the edition's) and used, in train and in the hidden test labels' COCO
    assert train_all["categories"][0] == {"id": 0, "name": "UNKNOWN", "supercategory": "UNKNOWN"}
    assert [c["name"] for c in train_all["categories"][1:]] == list(TRASH_CLASSES[1:])
    assert 0 < sum(a["category_id"] == 0 for a in train_all["annotations"]) < 0.05 * len(train_all["annotations"])
    assert any(a["category_id"] == 0 for a in json.loads((hidden / "test_full.json").read_text())["annotations"])
    # ~7.9 objects per photo
    assert 7.5 < len(train_all["annotations"]) / len(train_all["images"]) < 8.3
    # 512 x 512 JPEGs, as the JSON says
    for im in train_all["images"][::10] + test["images"][::10]:
        path = data / im["file_name"]
        assert path.read_bytes()[:3] == b"\xff\xd8\xff" and (im["width"], im["height"]) == (512, 512)
        assert cv2.imread(str(path)).shape == (512, 512, 3)


def test_competition_hidden_labels_take_unknown_as_background(competition):
    data, hidden = competition
    full = load_coco(hidden / "test_full.json")
    cmap = class_map(full.categories, TRASH_CLASSES)          # data.unknown's default: background
    assert cmap[0] == 0
    labels = np.load(hidden / "labels.npy")
    assert json.loads((hidden / "index.json").read_text())["file_names"] == \
        [im["file_name"] for im in json.loads((data / "test.json").read_text())["images"]]
    for k, im in enumerate(full.images[:8]):
        mask = cv2.resize(rasterize(full, im["id"], cmap, "max"), (256, 256), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(mask, labels[k])
