"""EDA numbers against a hand count on a two-image dataset; every output file exists."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pipelines.validate as stage
from segpipe.config import TRASH_CLASSES, DataParams, ValidateParams
from segpipe.eda import INLINE_BYTES, embed_images, median_frequency_weights, preview_jpeg, size_bucket


def rect(x0, y0, x1, y1) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture(scope="module")
def eda_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eda")
    data = root / "data"
    (data / "batch_01_vt").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in (1, 2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"batch_01_vt/{k:04d}.png")
    coco = {
        "images": [{"id": 0, "file_name": "batch_01_vt/0001.png", "width": 64, "height": 64},
                   {"id": 1, "file_name": "batch_01_vt/0002.png", "width": 64, "height": 64}],
        "annotations": [  # image 0: Paper 10x10 under Plastic bag 20x20 (25 px overlap); image 1: Paper 10x20
            {"id": 1, "image_id": 0, "category_id": 2, "segmentation": rect(10, 10, 20, 20), "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 0, "category_id": 8, "segmentation": rect(15, 15, 35, 35), "area": 400, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "segmentation": rect(0, 0, 10, 20), "area": 200, "iscrowd": 0},
        ],
        "categories": [{"id": i, "name": n} for i, n in enumerate(TRASH_CLASSES) if i],
    }
    (data / "train_all.json").write_text(json.dumps(coco))
    stage.run(DataParams(root=str(data), classes=TRASH_CLASSES), ValidateParams(max_empty_images=0, sample_grid=2),
              root / "out")
    return root / "out"


def test_outputs_exist(eda_out):
    for name in ("report.md", "eda_metrics.json", "pixel_share.png", "cooccurrence.png", "object_sizes.png",
                 "samples.png", "largest_overlaps.png", "tiniest_objects.png", "class_stats.csv", "object_sizes.csv"):
        assert (eda_out / "eda" / name).stat().st_size > 0, name
    report = (eda_out / "eda" / "report.md").read_text()
    assert "| Paper | 2 | 2 |" in report and "![samples](samples.png)" in report and "test.json not found" in report


def test_numbers_match_hand_count(eda_out):
    m = json.loads((eda_out / "eda" / "eda_metrics.json").read_text())
    total = 2 * 64 * 64
    assert m["n_images"] == 2 and m["n_annotations"] == 3 and m["split/test"] == 0
    assert m["annotations/Paper"] == 2 and m["annotations/Plastic bag"] == 1 and m["annotations/Battery"] == 0
    assert m["pixel_share/Paper"] == pytest.approx(275 / total, abs=1e-6)          # 75 visible + 200 (max rule)
    assert m["pixel_share/Plastic bag"] == pytest.approx(400 / total, abs=1e-6)
    assert m["pixel_share/Background"] == pytest.approx((total - 675) / total, abs=1e-6)
    assert m["images_with/Paper"] == 2 and m["images_with/Plastic bag"] == 1 and m["images_with/Background"] == 2
    assert m["overlap_pixel_share"] == pytest.approx(25 / total)
    assert m["annotations_per_image/mean"] == 1.5 and m["annotations_per_image/max"] == 2
    assert (m["size_medium/Paper"], m["size_large/Paper"], m["size_large/Plastic bag"]) == (1, 1, 1)
    w = m["class_weights"]
    assert w["Plastic bag"] == 1.0 and w["Paper"] == pytest.approx((400 / 4096) / (275 / total), abs=1e-3)
    assert w["Battery"] == 10.0 and w["Background"] == pytest.approx((400 / 4096) / ((total - 675) / total), 1e-3)
    index = json.loads((eda_out / "index.json").read_text())
    assert [t["classes"] for t in index["train"]] == [[0, 2, 8], [0, 2]]
    metrics = json.loads((eda_out / "metrics.json").read_text())
    assert metrics["pixel_share/Paper"] == m["pixel_share/Paper"] and metrics["gx_success"] == 1


def test_cooccurrence_and_helpers(eda_out):
    report = (eda_out / "eda" / "report.md").read_text()
    cooc = report.split("## Class co-occurrence")[1].split("![")[0]
    row = next(line for line in cooc.splitlines() if line.startswith("| Paper |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1 + 2] == "2" and cells[1 + 8] == "1" and cells[1 + 9] == "0"   # Paper with Paper / bag / Battery
    assert list(size_bucket(np.array([10.0, 100, 5000]), np.array([4096.0] * 3))) == ["small", "medium", "large"]
    w = median_frequency_weights(np.array([[90, 10, 0], [100, 0, 0]]))
    assert w[2] == 10.0 and w[0] < w[1]


def test_plot_tables_match_hand_count(eda_out):
    """class_stats.csv / object_sizes.csv: what `dvc plots` draws (dvc.yaml `plots:`)."""
    stats = pd.read_csv(eda_out / "eda" / "class_stats.csv", index_col="class")
    assert list(stats.index) == list(TRASH_CLASSES) and list(stats["class_index"]) == list(range(11))
    paper, bag = stats.loc["Paper"], stats.loc["Plastic bag"]
    assert (paper["annotations"], paper["images_with"], paper["medium"], paper["large"]) == (2, 2, 1, 1)
    assert paper["pixel_share"] == pytest.approx(275 / (2 * 64 * 64), rel=1e-5)
    assert (bag["annotations"], bag["images_with"], stats.loc["Battery", "annotations"]) == (1, 1, 0)
    sizes = pd.read_csv(eda_out / "eda" / "object_sizes.csv")
    assert list(sizes.columns) == ["class", "size", "annotations"] and len(sizes) == 10 * 3   # no Background
    assert sizes.set_index(["class", "size"]).loc[("Paper", "large"), "annotations"] == 1
    assert sizes["annotations"].sum() == 3
    report = (eda_out / "eda" / "report.md").read_text()
    assert "| Paper | 2 | 2 | 2 |" in report       # counts print as integers (class index, annotations, images)


def test_embed_images_inlines_local_plots_only(eda_out):
    eda = eda_out / "eda"
    text = (eda / "report.md").read_text() + "\n![remote](https://example.com/x.png)\n![gone](missing.png)\n"
    out = embed_images(text, eda)
    found = re.findall(r"!\[([^\]]*)\]\(data:(image/png|image/jpeg);base64,([A-Za-z0-9+/=]+)\)", out)
    uris = {alt: (mime, base64.b64decode(b)) for alt, mime, b in found}
    assert set(uris) == {"pixel share", "co-occurrence", "object sizes", "samples", "largest overlaps",
                         "tiniest objects"}
    for alt, (mime, data) in uris.items():
        name = re.search(rf"!\[{re.escape(alt)}\]\(([^)]+)\)", text).group(1)
        original = (eda / name).read_bytes()
        if len(original) <= INLINE_BYTES:      # small plots as they are, larger ones as a JPEG preview that fits
            assert (mime, data) == ("image/png", original), alt
        else:
            assert mime == "image/jpeg" and len(data) <= INLINE_BYTES and data[:2] == b"\xff\xd8", alt
    assert "](https://example.com/x.png)" in out and "](missing.png)" in out and "](samples.png)" not in out
    assert embed_images(text, eda, max_bytes=10) == text


def test_a_large_image_is_inlined_as_a_jpeg_preview_within_the_budget(tmp_path):
    rng = np.random.default_rng(0)
    big = tmp_path / "grid.png"          # noise: ~3 MB as PNG, the worst case for any encoder
    Image.fromarray(rng.integers(0, 255, (1200, 800, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 2_000_000
    out = embed_images("![grid](grid.png)", tmp_path, max_bytes=10_000_000, inline_bytes=60_000)
    data = base64.b64decode(re.fullmatch(r"!\[grid\]\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)", out).group(1))
    assert len(data) <= 60_000
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.width < 800 and abs(im.height / im.width - 1.5) < 0.02   # shape kept
    assert len(preview_jpeg(big, 10**9)) > 60_000                     # fits: the full size, not scaled
