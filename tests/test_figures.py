"""The pictures people look at: confusion data and heatmap, photo grids, member disagreement; the infer stage writes
them, `dvc plots show` reads them, and the flow publishes them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segpipe.config import InferParams
from segpipe.ensemble import disagreement, entropy
from segpipe.figures import (DPI, LEGEND_INCHES, TILE_INCHES, TITLE_INCHES, Panel, class_labels, confusion_heatmap,
                             confusion_rows, iou_rows, largest_remainder, normalise_rows, panel_grid)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Background", "Paper", "Glass"]


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()            # a truncated or corrupt file raises here
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_confusion_rows_are_the_truth_normalised_fractions_at_the_stated_resolution():
    cm = np.array([[900, 100, 0], [1, 2, 0], [0, 0, 0]])        # Glass absent from the truth
    rows = confusion_rows(cm, CLASSES, resolution=100)
    count = Counter((r["actual"], r["predicted"]) for r in rows)
    bg, paper, glass = class_labels(CLASSES)
    assert sorted(class_labels(CLASSES)) == class_labels(CLASSES)     # ascending axis sort = class order
    assert count[(bg, bg)] == 90 and count[(bg, paper)] == 10 and count[(bg, glass)] == 0
    assert count[(paper, bg)] == 33 and count[(paper, paper)] == 67   # 1/3, 2/3: largest remainder
    assert all(sum(n for (a, _), n in count.items() if a == t) == 100 for t in (bg, paper))
    assert not any(r["actual"] == glass for r in rows)                 # no truth pixel: no rows, not a 0/0 row
    frac = normalise_rows(cm)
    assert np.allclose(frac[:2].sum(1), 1) and np.isnan(frac[2]).all()
    for (a, p), n in count.items():                                    # each cell within one step of its fraction
        assert abs(n / 100 - frac[class_labels(CLASSES).index(a), class_labels(CLASSES).index(p)]) <= 0.01


def test_largest_remainder_always_sums_to_the_total():
    rng = np.random.default_rng(0)
    for _ in range(50):
        f = rng.dirichlet(np.ones(11))
        out = largest_remainder(f, 100)
        assert out.sum() == 100 and (out >= 0).all() and np.abs(out - f * 100).max() < 1


def test_iou_rows_leave_absent_classes_empty():
    rows = iou_rows(np.array([[3, 1, 0], [1, 3, 0], [0, 0, 0]]), CLASSES)
    assert [r["iou"] for r in rows] == [pytest.approx(0.6), pytest.approx(0.6), None]
    assert rows[0]["truth_pixels"] == 4 and rows[1]["predicted_pixels"] == 4


def test_confusion_heatmap_is_a_png_of_the_stated_size(tmp_path):
    path = confusion_heatmap(np.array([[5, 1, 0], [0, 4, 2], [0, 0, 0]]), CLASSES, tmp_path / "cm.png", "t")
    side = 1.6 + 0.55 * len(CLASSES)
    assert png_size(path) == (round((side + 1.2) * DPI), round(side * DPI)) and path.stat().st_size > 5_000


def test_panel_grid_size_and_legend_colours(tmp_path):
    from segpipe.eda import colour
    photo = np.full((32, 32, 3), 128, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    rows = [[Panel(photo, "a", mask), Panel(photo, "b"), Panel(np.linspace(0, 1, 32 * 32).reshape(32, 32), "map")],
            [Panel(photo, "c", mask)]]                                  # a short row is left blank
    path = panel_grid(rows, CLASSES, tmp_path / "grid.png", "a title " * 20)
    w, h = png_size(path)
    assert (w, h) == (round(3 * TILE_INCHES * DPI), round((2 * TILE_INCHES + LEGEND_INCHES + TITLE_INCHES) * DPI))
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    # the legend shows every class in its palette colour, Glass too, though no mask holds it
    assert all((pixels == colour(i)).all(1).any() for i in (1, 2))


def test_disagreement_counts_member_pairs_and_entropy_is_scaled():
    counts = torch.tensor([[2, 0, 3], [1, 3, 0]]).view(1, 2, 1, 3)      # 3 members; per pixel the class counts
    d = disagreement(counts, np.array([3]))[0, 0]
    assert d.tolist() == pytest.approx([1 - 2 / 6, 0.0, 0.0])            # 2 vs 1: 2 of 6 ordered pairs agree
    two = torch.tensor([[[[1]], [[1]]]])                                 # two members, two classes: they differ
    assert disagreement(two, np.array([2])).item() == pytest.approx(1.0)
    assert disagreement(torch.tensor([[[[1]], [[0]]]]), np.array([1])).item() == 0.0   # one member: no pair
    p = torch.tensor([[[[0.5]], [[0.5]]], [[[1.0]], [[0.0]]]])
    assert entropy(p).flatten().tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


# ------------------------------------------------------------------------------------------------ the infer stage
def test_infer_stage_draws_its_pictures_and_dvc_plots_show_reads_them(tmp_path):
    from pipelines import infer
    from tests.test_inference import _fake_members
    from tests.test_training_chain import DATA, make_tiny
    vdir = make_tiny(tmp_path)
    _fake_members(tmp_path, vdir, {"unet_a": 32}, top_k=False, seeds=(0, 1))   # two members hold each OOF image
    out = tmp_path / "project" / "artifacts" / "infer" / "r0"
    infer.run(DATA, InferParams(tta=(), batch_size=8, ablation=False), vdir, tmp_path / "members", out)
    report = json.loads((out / "report.json").read_text())
    plots = out / "plots"
    assert set(report["figures"].values()) == {p.name for p in plots.iterdir()}
    for name in ("confusion.png", "test_predictions.png", "oof_disagreement.png"):
        w, h = png_size(plots / name)
        assert w > 200 and h > 200
    assert png_size(plots / "test_predictions.png")[0] == round(4 * TILE_INCHES * DPI)            # 4 test photos
    assert png_size(plots / "oof_disagreement.png")[1] == round(
        (infer.GRID_ROWS * TILE_INCHES + LEGEND_INCHES + TITLE_INCHES) * DPI)                     # 16 OOF: 8 drawn

    cm = np.array(report["ensemble_confusion"])
    assert cm.sum() == 16 * infer.OUT_SIZE ** 2                      # every OOF pixel at 256, none ignored here
    rows = json.loads((plots / "confusion.json").read_text())
    present = [c for c, n in zip(class_labels(DATA.classes), cm.sum(1)) if n]
    assert Counter(r["actual"] for r in rows) == {c: 100 for c in present}
    with open(plots / "per_class_iou.csv") as f:
        ious = list(csv.DictReader(f))
    assert [r["class"] for r in ious] == list(DATA.classes)
    per_class = report["ensemble_per_class_iou"]
    assert [float(r["iou"]) if r["iou"] else None for r in ious] == pytest.approx(
        [None if per_class[c] is None else round(per_class[c], 6) for c in DATA.classes])
    tables = json.loads((plots / "tables.json").read_text())
    assert all(sum(v for k, v in r.items() if k in DATA.classes) == pytest.approx(1, abs=1e-3)
               for r in tables["confusion"] if r["truth_pixels"])

    # the real dvc.yaml's plots of the infer stage, through the real dvc
    project = tmp_path / "project"
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    mine = [p for p in declared if "artifacts/infer/" in json.dumps(p)]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"plots": mine}, sort_keys=False))
    (project / ".dvc" / "plots").mkdir(parents=True)
    for t in (REPO / ".dvc" / "plots").glob("*.json"):
        (project / ".dvc" / "plots" / t.name).write_text(t.read_text())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "plots", "show", "--json"], cwd=project,
                          capture_output=True, text=True, env=env, timeout=120)
    shown = json.loads(proc.stdout)
    assert not [e for e in shown.get("errors", []) if "/r0/" in e["source"]], shown["errors"]   # r1 not run here
    spec = shown["data"]["ensemble_confusion"][0]["content"]
    assert len(spec["data"]["values"]) == 100 * len(present)
    assert spec["spec"]["encoding"]["y"]["field"] == "actual" and spec["spec"]["encoding"]["x"]["field"] == "predicted"
    bars = shown["data"]["ensemble_iou_r0"][0]["content"]["data"]["values"]
    assert [r["class"] for r in bars] == list(DATA.classes)
    for name in ("confusion", "test_predictions", "oof_disagreement"):
        image = shown["data"][f"artifacts/infer/r0/plots/{name}.png"][0]
        assert image["type"] == "image" and Path(image["url"]).is_file()


def test_flow_publishes_the_figures_as_tables_and_inlined_images(tmp_path, monkeypatch):
    import flows.full_pipeline as fp
    plots = tmp_path / "plots"
    plots.mkdir()
    confusion_heatmap(np.array([[5, 1], [0, 4]]), ["Background", "Paper"], plots / "confusion.png", "t")
    (plots / "tables.json").write_text(json.dumps({"confusion": [{"truth": "Background", "Background": 0.83}],
                                                   "per_class_iou": [{"class": "Background", "iou": 0.8}]}))
    (plots / "figures.md").write_text("# pictures\n\n![OOF confusion](confusion.png)\n")
    calls = []
    monkeypatch.setattr(fp, "create_table_artifact", lambda table, key, description: calls.append((key, table)))
    monkeypatch.setattr(fp, "create_markdown_artifact", lambda md, key, description: calls.append((key, md)))
    fp.publish_figures(plots, 1)
    keys = dict(calls)
    assert keys["ensemble-confusion-r1"][0]["Background"] == 0.83
    assert keys["ensemble-per-class-iou-r1"] == [{"class": "Background", "iou": 0.8}]
    assert "data:image/" in keys["ensemble-figures-r1"] and "](confusion.png)" not in keys["ensemble-figures-r1"]
    fp.publish_figures(tmp_path / "missing", 0)                       # an older stored result: nothing published
    assert len(calls) == 3
