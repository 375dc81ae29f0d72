"""The default split (split.group_by: auto): class-presence stratified, grouped by folder only when that works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines import split
from segpipe.config import SplitParams
from segpipe.folds import SplitError, fold_class_counts, plan_folds

CLASSES = ["Background", "Paper", "Plastic", "Metal", "Glass", "Battery", "Clothing"]
# images per class in the tiny sets below: two common classes, four rare ones (2 to 7 images)
RARE = {3: 7, 4: 5, 5: 3, 6: 2}
TOLERANCE = 1   # each class's image count per fold is within this many images of its share n_class / n_folds


def tiny_records(n: int, folders: list[str], seed: int = 0, rare_folder: str | None = None) -> list[dict]:
    """n images, classes present as in a trash photo (background always, Paper/Plastic often, the rest rare);
    `rare_folder`: every rare-class image sits in that folder."""
    rng = np.random.default_rng(seed)
    present = [{0} | {c for c, p in ((1, 0.6), (2, 0.4)) if rng.random() < p} for _ in range(n)]
    pool = [i for i in range(n) if rare_folder is None or folders[i % len(folders)] == rare_folder]
    for c, k in RARE.items():
        for i in rng.choice(pool, size=k, replace=False):
            present[i].add(c)
    return [{"file_name": f"{folders[i % len(folders)]}/{i:04d}.jpg", "batch": folders[i % len(folders)],
             "classes": sorted(present[i])} for i in range(n)]


def run_split(tmp_path: Path, records: list[dict], capsys, **params) -> tuple[dict, str]:
    vdir = tmp_path / "validate"
    vdir.mkdir(exist_ok=True)
    (vdir / "index.json").write_text(json.dumps({"classes": CLASSES, "train": records}))
    split.run(SplitParams(**params), vdir, tmp_path / "split")     # default group_by: what params.yaml ships
    return json.loads((tmp_path / "split" / "folds.json").read_text()), capsys.readouterr().out


def per_fold_counts(folds: dict, records: list[dict], n_folds: int) -> np.ndarray:
    assignment = [folds["folds"][r["file_name"]] for r in records]
    return fold_class_counts(assignment, [tuple(r["classes"]) for r in records], n_folds, len(CLASSES))


def assert_balanced(counts: np.ndarray) -> None:
    share = counts.sum(0) / counts.shape[0]
    gap = np.abs(counts - share)
    assert gap.max() <= TOLERANCE, f"per-fold class counts {counts.T.tolist()} (share {share.tolist()})"


def test_default_is_auto():
    assert SplitParams(n_folds=2).group_by == "auto"


@pytest.mark.parametrize("n_folds", [2, 3])
def test_single_folder_splits_per_image_with_rare_classes_balanced(tmp_path, capsys, n_folds):
    records = tiny_records(30, ["images"])      # the mask-PNG layout: every image in one folder
    folds, out = run_split(tmp_path, records, capsys, n_folds=n_folds)
    counts = per_fold_counts(folds, records, n_folds)
    assert_balanced(counts)
    enough = [c for c, k in RARE.items() if k >= n_folds]
    assert (counts[:, enough] >= 1).all()        # a rare class with n_folds images is in every fold
    assert folds["grouped_by"] == "image"
    assert "grouped by image: per image: 1 batch folder(s)" in out and "<split.group_by=auto>" in out


def test_three_folders_five_folds_like_the_competition(tmp_path, capsys):
    records = tiny_records(60, ["batch_01_vt", "batch_02_vt", "batch_03"], seed=1)
    folds, out = run_split(tmp_path, records, capsys, n_folds=5)
    counts = per_fold_counts(folds, records, 5)
    assert_balanced(counts)
    assert folds["grouped_by"] == "image" and "3 batch folder(s) for 5 folds" in out
    assert sorted(np.bincount(list(folds["folds"].values()))) == [12] * 5


def test_three_folders_grouping_that_would_hide_a_rare_class_is_not_used(tmp_path, capsys):
    # 3 folders for 3 folds would do, but every rare-class image is in batch_02: grouped, two folds would have none
    records = tiny_records(36, ["batch_01_vt", "batch_02_vt", "batch_03"], seed=2, rare_folder="batch_02_vt")
    grouped = plan_folds([tuple(r["classes"]) for r in records], [r["batch"] for r in records], 3, len(CLASSES),
                         group_by="batch")
    assert (fold_class_counts(grouped.assignment, [tuple(r["classes"]) for r in records], 3,
                              len(CLASSES))[:, 3] == 0).sum() == 2
    folds, out = run_split(tmp_path, records, capsys, n_folds=3)
    assert folds["grouped_by"] == "image" and "per image: grouped by 3 batch folders, class" in out
    assert_balanced(per_fold_counts(folds, records, 3))


def test_enough_balanced_folders_keep_each_folder_in_one_fold(tmp_path, capsys):
    folders = ["batch_01_vt", "batch_02_vt", "batch_03_vt", "batch_04_vt"]
    records = tiny_records(48, folders, seed=3)
    folds, out = run_split(tmp_path, records, capsys, n_folds=2)
    assert folds["grouped_by"] == "batch" and "grouped by batch" in out and "<split.group_by=auto>" in out
    for folder in folders:
        assert len({f for name, f in folds["folds"].items() if name.startswith(folder)}) == 1, folder
    assert sorted(np.bincount(list(folds["folds"].values()))) == [24, 24]


def test_explicit_batch_with_too_few_folders_fails_naming_the_keys(tmp_path, capsys):
    records = tiny_records(20, ["images"])
    with pytest.raises(SplitError, match=r"only 1 groups for 2 folds: lower split.n_folds.*split.group_by: auto"):
        run_split(tmp_path, records, capsys, n_folds=2, group_by="batch")


def test_fewer_images_than_folds_names_n_folds():
    with pytest.raises(SplitError, match="3 training images cannot make 5 folds: lower split.n_folds"):
        plan_folds([(0,), (0, 1), (0,)], ["a", "a", "a"], 5, 2)


def test_same_seed_same_folds_other_seed_other_folds():
    records = tiny_records(40, ["images"], seed=4)
    present = [tuple(r["classes"]) for r in records]
    batches = [r["batch"] for r in records]
    a = plan_folds(present, batches, 4, len(CLASSES), seed=0).assignment
    assert a == plan_folds(present, batches, 4, len(CLASSES), seed=0).assignment
    assert a != plan_folds(present, batches, 4, len(CLASSES), seed=1).assignment
