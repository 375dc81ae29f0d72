"""Validation: every kind of corrupt input fails with its specific problem naming the record; unusual-but-valid
inputs pass; the validate stage writes all or nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segpipe.coco import CocoFormatError, DataError, LayoutError, load_coco, rasterize
from segpipe.config import TRASH_CLASSES, DataParams, ValidateParams
from segpipe.synth import generate
from segpipe.validation import DataValidationError, validate_coco, validate_dataset
import pipelines.validate as stage

REPO = Path(__file__).resolve().parents[1]
PARAMS = ValidateParams(max_empty_images=2, max_bad_records=0, sample_grid=4)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    generate(root / "data", root / "hidden", n_train=12, n_test=4, image_size=64, n_batches=2, val_fraction=0.25,
             seed=0, classes=TRASH_CLASSES)
    return root / "data"


@pytest.fixture
def data(clean, tmp_path) -> Path:
    shutil.copytree(clean, tmp_path / "data")
    return tmp_path / "data"


def edit(root: Path, fn, name: str = "train_all.json") -> None:
    d = json.loads((root / name).read_text())
    fn(d)
    (root / name).write_text(json.dumps(d))


def first_poly_ann(d: dict) -> dict:
    return next(a for a in d["annotations"] if isinstance(a["segmentation"], list))


def set_seg(seg):
    return lambda d: first_poly_ann(d).update(segmentation=seg)


def truncate(root: Path) -> None:
    p = root / "batch_01_vt/0002.jpg"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def to_mode(root: Path, mode: str) -> str:
    """Re-save image 2 in `mode` (RGBA as PNG: JPEG has no alpha) and point the JSON at it."""
    src = root / "batch_01_vt/0003.jpg"
    name = "batch_01_vt/0003.jpg" if mode == "L" else "batch_01_vt/0003.png"
    Image.open(src).convert(mode).save(root / name)
    for split in ("train_all.json", "train.json", "val.json"):   # the split files list image 2 by file_name too
        edit(root, lambda d: [im.update(file_name=name) for im in d["images"] if im["id"] == 2], split)
    return name


# (id, mutation(root), exception, problem code or None, substring naming the record)
CASES = [
    ("unparsable_json", lambda r: (r / "train_all.json").write_text('{"images": ['), CocoFormatError, None,
     "train_all.json: not valid JSON"),
    ("missing_key", lambda r: edit(r, lambda d: d.pop("categories")), CocoFormatError, None, "['categories']"),
    ("empty_dataset", lambda r: edit(r, lambda d: d.update(images=[], annotations=[])), DataValidationError,
     "empty_dataset", "no images"),
    ("duplicate_image_id", lambda r: edit(r, lambda d: d["images"][1].update(id=0)), DataValidationError,
     "duplicate_image_id", "image 0 (batch_01_vt/0002.jpg)"),
    ("duplicate_file_name", lambda r: edit(r, lambda d: d["images"][2].update(file_name="batch_01_vt/0001.jpg")),
     DataValidationError, "duplicate_file_name", "image 2 (batch_01_vt/0001.jpg)"),
    ("annotation_missing_image", lambda r: edit(r, lambda d: d["annotations"][3].update(image_id=999)),
     DataValidationError, "annotation_missing_image", "annotation 3 (image 999)"),
    ("unknown_category_id", lambda r: edit(r, lambda d: d["annotations"][4].update(category_id=42)),
     DataValidationError, "unknown_category_id", "annotation 4"),
    ("unknown_category_name", lambda r: edit(r, lambda d: d["categories"][0].update(name="Banana")),
     DataValidationError, "unknown_category_name", "valid names: ['General trash'"),
    ("polygon_too_few_points", lambda r: edit(r, set_seg([[1, 1, 30, 30]])), DataValidationError,
     "polygon_too_few_points", "polygon 0 has 2 point(s)"),
    ("polygon_odd_coordinates", lambda r: edit(r, set_seg([[1, 1, 30, 1, 30, 30, 7]])), DataValidationError,
     "polygon_odd_coordinates", "odd number of coordinates"),
    ("polygon_nan", lambda r: edit(r, set_seg([[1, 1, float("nan"), 1, 30, 30]])), DataValidationError,
     "polygon_nan", "NaN"),
    ("polygon_outside_image", lambda r: edit(r, set_seg([[1, 1, 500, 1, 30, 30]])), DataValidationError,
     "polygon_outside_image", "beyond the image width"),
    ("zero_area", lambda r: edit(r, set_seg([[1, 1, 10, 10, 20, 20]])), DataValidationError, "zero_area",
     "rasterises to 0.0 pixels"),
    ("huge_annotation", lambda r: edit(r, lambda d: first_poly_ann(d).update(area=1e9)), DataValidationError,
     "area_exceeds_image", "larger than the image"),
    ("rle_size_mismatch", lambda r: edit(r, lambda d: first_poly_ann(d).update(
        segmentation={"size": [10, 10], "counts": [0, 100]})), DataValidationError, "rle_size_mismatch",
     "RLE size"),
    ("image_missing", lambda r: (r / "batch_01_vt/0004.jpg").unlink(), DataValidationError, "image_missing",
     "image 3 (batch_01_vt/0004.jpg)"),
    ("image_truncated", truncate, DataValidationError, "image_unreadable", "batch_01_vt/0002.jpg"),
    ("image_size_mismatch", lambda r: edit(r, lambda d: d["images"][5].update(width=128)), DataValidationError,
     "image_size_mismatch", "JSON width 128.0 != real width 64"),
    ("leakage_train_test", lambda r: shutil.copyfile(r / "batch_01_vt/0001.jpg", r / "batch_03_vt/0001.jpg"),
     DataValidationError, "leakage_train_test", "identical to test image batch_03_vt/0001.jpg"),
    ("duplicate_in_train", lambda r: shutil.copyfile(r / "batch_01_vt/0001.jpg", r / "batch_02_vt/0001.jpg"),
     DataValidationError, "duplicate_image_content", "batch_02_vt/0001.jpg"),
    ("too_many_empty_images", lambda r: edit(r, lambda d: d.update(annotations=[])), DataValidationError,
     "too_many_empty_images", "12 train images have no annotation"),
    ("split_inconsistent", lambda r: edit(r, lambda d: d["images"][0].update(file_name="x.jpg"), "val.json"),
     DataValidationError, "split_inconsistent", "val.json"),
    ("broken_test_image", lambda r: (r / "batch_03_vt/0002.jpg").write_bytes(b"not a jpeg"), DataValidationError,
     "image_unreadable", "batch_03_vt/0002.jpg"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_corrupt_input_fails_specifically(data, tmp_path, case):
    _, mutate, exc, code, where = case
    mutate(data)
    out = tmp_path / "out"
    with pytest.raises(exc) as info:   # the stage itself: validation runs first, nothing is written on failure
        stage.run(DataParams(root=str(data), classes=TRASH_CLASSES), PARAMS, out)
    assert where in str(info.value), str(info.value)
    if code:
        assert code in info.value.codes and f"[{code}]" in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(SystemExit) as ex:   # main() turns it into exit status 1 (the subprocess test below runs it)
        stage.main(["--params", str(_params_file(data, tmp_path)), "--out", str(out)])
    assert ex.value.code == 1 and not out.exists()


def _params_file(data: Path, tmp_path: Path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["root"] = str(data)
    raw["validate"] = PARAMS.model_dump()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "params.yaml"


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_or_rgba_convert_warns_or_fails(data, mode):
    name = to_mode(data, mode)
    res = validate_coco(data, TRASH_CLASSES, PARAMS)
    assert any(f"{name}: mode {mode} is converted" in w for w in res.warnings) and res.gx["success"]
    with pytest.raises(DataValidationError, match=rf"\[grayscale_image\].*image 2 \({name}\).*mode {mode}"):
        validate_coco(data, TRASH_CLASSES, PARAMS.model_copy(update={"grayscale": "fail"}))


def test_bad_records_within_limit_are_skipped_and_named(data):
    edit(data, set_seg([[1, 1, 30, 30]]))
    bad_id = first_poly_ann(json.loads((data / "train_all.json").read_text()))["id"]
    res = validate_coco(data, TRASH_CLASSES, PARAMS.model_copy(update={"max_bad_records": 1}))
    assert res.skip_annotations == {bad_id}
    assert any(f"annotation {bad_id}" in w and "max_bad_records=1" in w for w in res.warnings)


def test_many_problems_are_counted_and_listed(data):
    edit(data, lambda d: [a.update(category_id=77) for a in d["annotations"]])
    with pytest.raises(DataValidationError) as info:
        validate_coco(data, TRASH_CLASSES, PARAMS)
    n = len(json.loads((data / "train_all.json").read_text())["annotations"])
    assert f"'unknown_category_id': {n}" in str(info.value) and f"... and {n - 20} more" in str(info.value)


def test_cli_exits_nonzero_and_writes_nothing(data, tmp_path):
    edit(data, lambda d: d["annotations"][3].update(image_id=999))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipelines.validate", "--params", str(_params_file(data, tmp_path)),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "annotation 3 (image 999)" in proc.stderr and "nothing written" in proc.stderr
    assert not out.exists()


RLE_BOX = (slice(40, 50), slice(3, 13))   # rows, cols of the uncompressed-RLE Battery added to image 1


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major mask, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def _unusual(root: Path) -> None:
    """Multi-polygon, non-square image, unused UNKNOWN category, an uncompressed RLE, category ids that are neither
    contiguous nor the class indices, categories listed out of order (compressed-RLE crowds come from the generator)."""
    p = root / "batch_01_vt/0001.jpg"
    Image.open(p).resize((80, 48)).save(p, quality=90)
    box = np.zeros((64, 64), np.uint8)
    box[RLE_BOX] = 1

    def fix(d):
        d["images"][0].update(width=80, height=48)
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] != 0]
        d["annotations"].append({"id": 10_000, "image_id": 0, "category_id": 10, "iscrowd": 0, "area": 150.0,
                                 "bbox": [0, 0, 80, 48], "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10],
                                                                          [70, 38, 80, 38, 80, 43, 70, 43]]})
        d["annotations"].append({"id": 10_001, "image_id": 1, "category_id": 9, "iscrowd": 1, "area": 100.0,
                                 "bbox": [3, 40, 10, 10], "segmentation": _uncompressed_rle(box)})
        d["categories"].append({"id": 11, "name": "UNKNOWN", "supercategory": "UNKNOWN"})
        new_id = {c["id"]: 1000 - 37 * c["id"] for c in d["categories"]}   # 963, 926, ...: classes map by name
        for c in d["categories"]:
            c["id"] = new_id[c["id"]]
        d["categories"].reverse()
        for a in d["annotations"]:
            a["category_id"] = new_id[a["category_id"]]
    edit(root, fix)


def test_unusual_but_valid_inputs_pass_and_stage_writes_contract(clean, data, tmp_path):
    _unusual(data)
    res = validate_coco(data, TRASH_CLASSES, PARAMS)
    assert (res.annotations["kind"] == "rle").any() and res.gx["success"]
    out = tmp_path / "validate"
    r = stage.run(DataParams(root=str(data), classes=TRASH_CLASSES), PARAMS, out)
    index = json.loads((out / "index.json").read_text())
    assert index["data_root"] == str(data) and index["classes"] == list(TRASH_CLASSES)
    assert len(index["train"]) == 12 and len(index["test"]) == 4 and r.n_train == 12
    first = index["train"][0]
    assert first["file_name"] == "batch_01_vt/0001.jpg" and first["mask"] == "masks/batch_01_vt/0001.png"
    assert first["batch"] == "batch_01_vt" and first["classes"] == [0, 10]
    mask = np.asarray(Image.open(out / first["mask"]))
    assert mask.shape == (48, 80) and (mask == 10).sum() == 150
    # the other masks are exactly the clean data's, rasterised with its contiguous ids (= class indices)
    ref = load_coco(clean / "train_all.json")
    identity = {c["id"]: c["id"] for c in ref.categories}
    for row in index["train"][1:]:
        expected = rasterize(ref, row["image_id"], identity, "max")
        if row["image_id"] == 1:   # plus the RLE Battery under the `max` overlap rule
            expected[RLE_BOX] = np.maximum(expected[RLE_BOX], 9)
        assert np.array_equal(np.asarray(Image.open(out / row["mask"])), expected), row["file_name"]
    assert index["test"][0] == {"file_name": "batch_03_vt/0001.jpg", "image": "batch_03_vt/0001.jpg"}
    gx = json.loads((out / "gx_results.json").read_text())
    assert set(gx["suites"]) == {"images", "train_images", "annotations", "polygons"} and gx["success"]
    assert json.loads((out / "metrics.json").read_text())["n_train_images"] == 12


def test_real_coco_fixture_validates(tmp_path):
    from tests.conftest import COCO_SAMPLE as real
    d = json.loads((real / "annotations" / "instances_val2017_subset.json").read_text())
    for im in d["images"]:
        im["file_name"] = f"images/{im['file_name']}"
    # copied, not linked: validation refuses files reached through a link out of data.root (file_name_unsafe)
    shutil.copytree(real / "images", tmp_path / "images")
    (tmp_path / "train_all.json").write_text(json.dumps(d))
    classes = ("Background", *[c["name"] for c in sorted(d["categories"], key=lambda c: c["id"])])
    res = validate_coco(tmp_path, classes, PARAMS)
    assert len(res.train) == 10 and len(res.annotations) == 77 and res.test == []


def _mask_png(root: Path, clean_out: Path | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(TRASH_CLASSES) + "\n")
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / "images" / f"{k}.png")
        m = np.zeros((32, 40), np.uint8)
        m[5:15, 5:20] = k + 1
        Image.fromarray(m).save(root / "masks" / f"{k}.png")
    return root


def test_mask_png_layout_valid_and_corrupt(tmp_path):
    root = _mask_png(tmp_path / "mp")
    data = DataParams(layout="mask_png", root=str(root), classes=TRASH_CLASSES)
    r = stage.run(data, PARAMS, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [t["classes"] for t in index["train"]] == [[0, 1], [0, 2], [0, 3], [0, 4]] and r.n_test == 0
    assert index["train"][0]["image"] == "images/0.png" and index["train"][0]["mask"] == "masks/0.png"
    Image.fromarray(np.full((32, 40), 57, np.uint8)).save(root / "masks" / "2.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "3.png")
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(root / "masks" / "0.png")   # a colour-coded mask
    with pytest.raises(DataValidationError) as info:
        validate_dataset(data, PARAMS)
    assert info.value.codes == {"mask_bad_values", "mask_size_mismatch", "mask_not_single_channel"}
    assert "masks/2.png has values 57" in str(info.value) and "masks/0.png has mode RGB" in str(info.value)
    (root / "masks" / "1.png").unlink()
    with pytest.raises(LayoutError, match=r"image\(s\) without a mask \['1'\]"):
        validate_dataset(data, PARAMS)
    assert issubclass(LayoutError, DataError)


def test_a_mask_that_cannot_be_written_fails_the_stage_naming_it(data, tmp_path, monkeypatch):
    """cv2.imwrite answers False instead of raising (full disk, unwritable folder): the stage must fail, naming the
    image, and publish nothing, never an index pointing at a missing mask."""
    monkeypatch.setattr(stage.cv2, "imwrite", lambda *a, **k: False)
    out = tmp_path / "validate"
    with pytest.raises(OSError, match=r"could not write the mask of batch_0\d_vt/\d{4}\.jpg"):
        stage.run(DataParams(root=str(data), classes=TRASH_CLASSES), PARAMS, out, workers=1)
    assert not out.exists()
