"""A photo's EXIF orientation means the same in validation, rasterisation, the EDA, training and inference.

The photos are built here with Pillow: 96 x 64 pixels as stored, a bright block at the stored top left, and EXIF
orientation 6 (the camera was turned: shown rotated 90 degrees clockwise, 64 x 96, the block at the top right).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

import pipelines.validate
from segpipe.config import DataParams, ValidateParams
from segpipe.datasets import ArrayDataset, decode_all, load_index, read_image, read_mask
from segpipe.photos import PhotoOrientationError, orient, read_photo
from segpipe.validation import DataValidationError, validate_dataset

CLASSES = ("Background", "Thing")
STORED_W, STORED_H = 96, 64          # as stored; shown: 64 wide, 96 high
BLOCK = (slice(4, 20), slice(4, 28))   # rows, cols of the bright block, stored
# the block as shown: stored (r, c) -> shown (c, STORED_H - 1 - r): rows 4..27, cols 44..59
SHOWN_BLOCK = [44, 4, 60, 4, 60, 28, 44, 28]
PARAMS = ValidateParams(max_empty_images=10, sample_grid=2)


def photo(path: Path, seed: int, orientation: int | None = 6) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (STORED_H, STORED_W, 3), dtype=np.uint8)
    pixels[BLOCK] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())


def coco_dataset(root: Path, json_size: tuple[int, int] = (STORED_H, STORED_W)) -> None:
    """train: a turned photo (its block annotated as shown) and a plain one; test: another turned photo."""
    photo(root / "batch_01_vt/0001.jpg", 1)
    photo(root / "batch_01_vt/0002.jpg", 2, orientation=None)
    photo(root / "batch_01_vt/0003.jpg", 3)
    w, h = json_size
    cats = [{"id": 1, "name": "Thing", "supercategory": "Thing"}]
    images = [{"id": 1, "file_name": "batch_01_vt/0001.jpg", "width": w, "height": h},
              {"id": 2, "file_name": "batch_01_vt/0002.jpg", "width": STORED_W, "height": STORED_H}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [SHOWN_BLOCK], "area": 400.0,
             "bbox": [44.0, 4.0, 16.0, 24.0], "iscrowd": 0}]
    (root / "train_all.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    test = [{"id": 1, "file_name": "batch_01_vt/0003.jpg", "width": w, "height": h}]
    (root / "test.json").write_text(json.dumps({"images": test, "annotations": [], "categories": cats}))


def data(root: Path, **kw) -> DataParams:
    return DataParams(root=str(root), classes=CLASSES, **kw)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_one_decoder_agrees_with_pillow_and_opencv(tmp_path, orientation):
    path = tmp_path / "p.jpg"
    photo(path, 0, orientation)
    with Image.open(path) as im:
        pillow = np.asarray(ImageOps.exif_transpose(im.convert("RGB")))
        stored = np.asarray(im.convert("RGB"))
    opencv = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)   # OpenCV applies the tag itself
    assert np.array_equal(orient(stored, orientation), pillow)
    assert np.array_equal(read_photo(path), opencv)
    assert read_photo(path, "ignore").shape == (STORED_H, STORED_W, 3)
    if orientation == 1:
        assert np.array_equal(read_photo(path, "reject"), read_photo(path, "ignore"))
    else:
        with pytest.raises(PhotoOrientationError, match=f"p.jpg: EXIF orientation {orientation}"):
            read_photo(path, "reject")


def test_apply_validation_masks_training_and_inference_agree(tmp_path):
    root = tmp_path / "raw"
    coco_dataset(root)                       # the JSON gives the size as shown, 64 x 96
    res = pipelines.validate.run(data(root), PARAMS, tmp_path / "validate", workers=1)
    assert any("2 photo(s) carry an EXIF orientation" in w and "0001.jpg" in w for w in res.warnings)
    index = json.loads((tmp_path / "validate/index.json").read_text())
    assert index["exif_orientation"] == "apply"
    assert (index["train"][0]["width"], index["train"][0]["height"]) == (STORED_H, STORED_W)

    # the rasterised mask is in the frame as shown: 96 rows x 64 columns, the block at the top right
    train, test, _ = load_index(tmp_path / "validate/index.json")
    mask = read_mask(train[0].mask)
    assert mask.shape == (STORED_W, STORED_H)
    assert mask[10, 50] == 1 and mask[10, 10] == 0 and mask[50, 50] == 0

    # training: the decoded photo and its mask, one sample of the dataset the train stage builds
    assert read_image(train[0].image, train[0].exif).shape == (STORED_W, STORED_H, 3)
    images, masks = decode_all(train, 64, threads=1)
    img_t, mask_t = ArrayDataset(images, masks)[0]
    bright = img_t.numpy().mean(0) > 150
    thing = mask_t.numpy() == 1
    assert (bright & thing).sum() / (bright | thing).sum() > 0.8

    # inference decodes the test photos as the train stage does: the block at the top right
    (shown,) = decode_all(test, 64, threads=1)[0]
    assert shown[8, 50].mean() > 200 and shown[8, 10].mean() < 100 and shown[50, 50].mean() < 100

    # the EDA drew the photos under their masks (a stored-frame photo under a shown-frame mask would not fit)
    assert (tmp_path / "validate/eda/samples.png").is_file()


def test_json_with_only_the_stored_size_is_named_with_what_to_do(tmp_path):
    coco_dataset(tmp_path, json_size=(STORED_W, STORED_H))     # an exporter that ignored the tag
    with pytest.raises(DataValidationError) as e:
        validate_dataset(data(tmp_path), PARAMS, workers=1)
    assert {p.code for p in e.value.problems} == {"image_exif_stored_size"}
    assert sorted((p.split, p.record) for p in e.value.problems) == [
        ("test", "image 1 (batch_01_vt/0003.jpg)"), ("train", "image 1 (batch_01_vt/0001.jpg)")]
    text = str(e.value)
    assert "EXIF orientation 6 (rotated 90° clockwise)" in text and "shows as 64x96" in text
    assert "stored size 96x64" in text and "data.exif_orientation: ignore" in text

    # under ignore the same JSON is right: the pixels as stored, everywhere
    res = pipelines.validate.run(data(tmp_path, exif_orientation="ignore"), PARAMS, tmp_path / "v", workers=1)
    assert res.n_train == 2
    train, test, _ = load_index(tmp_path / "v/index.json")
    assert train[0].exif == "ignore" and read_mask(train[0].mask).shape == (STORED_H, STORED_W)
    assert read_image(train[0].image, train[0].exif).shape == (STORED_H, STORED_W, 3)
    (stored,) = decode_all(test, 64, threads=1)[0]
    assert stored[8, 10].mean() > 200 and stored[8, 50].mean() < 100      # the block where it is stored


def test_reject_names_each_turned_photo(tmp_path):
    coco_dataset(tmp_path)
    with pytest.raises(DataValidationError) as e:
        validate_dataset(data(tmp_path, exif_orientation="reject"), PARAMS, workers=1)
    rejected = e.value.problems        # each turned photo once, its size not checked besides
    assert {p.code for p in rejected} == {"exif_orientation_rejected"} and all(p.fatal for p in rejected)
    assert sorted(p.record for p in rejected) == ["image 1 (batch_01_vt/0001.jpg)", "image 1 (batch_01_vt/0003.jpg)"]
    assert "EXIF orientation 6" in str(e.value) and "data.exif_orientation=reject" in str(e.value)

    # ignore, with a JSON written for the photos as shown: the size mismatch says which rule would fit
    with pytest.raises(DataValidationError) as e:
        validate_dataset(data(tmp_path, exif_orientation="ignore"), PARAMS, workers=1)
    assert {p.code for p in e.value.problems} == {"image_size_mismatch"}
    assert "the JSON has the size as the camera showed it" in str(e.value) and "set it to apply" in str(e.value)


def mask_png_dataset(root: Path, mask_frame: str) -> None:
    photo(root / "images/rot.jpg", 1)
    photo(root / "images/plain.jpg", 2, orientation=None)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "masks").mkdir(parents=True)
    stored = np.zeros((STORED_H, STORED_W), np.uint8)
    stored[BLOCK] = 1
    rot = orient(stored, 6) if mask_frame == "shown" else stored
    cv2.imwrite(str(root / "masks/rot.png"), rot)
    cv2.imwrite(str(root / "masks/plain.png"), stored)


def test_mask_png_masks_match_the_photo_as_shown(tmp_path):
    mask_png_dataset(tmp_path / "shown", "shown")
    res = pipelines.validate.run(data(tmp_path / "shown", layout="mask_png"), PARAMS, tmp_path / "v", workers=1)
    assert res.n_train == 2
    train, _, _ = load_index(tmp_path / "v/index.json")
    rot = next(s for s in train if s.file_name == "rot.jpg")
    images, masks = decode_all([rot], 64, threads=1)
    img_t, mask_t = ArrayDataset(images, masks)[0]
    bright, thing = img_t.numpy().mean(0) > 150, mask_t.numpy() == 1
    assert thing[8, 50] and (bright & thing).sum() / (bright | thing).sum() > 0.8

    # a mask drawn on the stored pixels does not fit the photo as shown: named, with its orientation
    mask_png_dataset(tmp_path / "stored", "stored")
    with pytest.raises(DataValidationError) as e:
        validate_dataset(data(tmp_path / "stored", layout="mask_png"), PARAMS, workers=1)
    assert {p.code for p in e.value.problems} == {"mask_size_mismatch"}
    assert {p.record for p in e.value.problems} == {"image images/rot.jpg"}
    assert re.search(r"mask width 96(\.0)? != image width 64(\.0)? \(EXIF orientation 6 \(rotated 90° clockwise\): "
                     r"the size as shown; stored it is 96x64\)", str(e.value))
