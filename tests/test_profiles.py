"""Profiles, the class-balanced subset, the gain report's arithmetic and the CV-vs-leaderboard warning: fast units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines import compare, split
from pipelines.submit import write_cv_lb
from segpipe.compare import cv_vs_lb, gain_report, setting_label, setting_of, spearman
from segpipe.config import ParamsError, SplitParams, load_all, read_params
from segpipe.profiles import ProfileError, apply_profile, balanced_subset, check_dvc_matrix, class_coverage

REPO = Path(__file__).resolve().parents[1]


def _members(train: dict) -> int:
    """How many networks a train section's matrix trains."""
    return len(train["models"]) * len(train["seeds"]) * len(train["folds"])


def test_the_real_params_resolve_in_every_profile():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    check_dvc_matrix(raw)                                   # every profile only narrows the DVC train matrix
    full = load_all(REPO / "params.yaml")
    for name in raw["profiles"]:
        resolved = read_params(REPO / "params.yaml", profile=name)
        assert resolved["profile"] == name
    quick = read_params(REPO / "params.yaml", profile="quick")
    assert quick["split"]["subset"] > 0 and len(quick["train"]["folds"]) == 1
    assert _members(quick["train"]) < _members(full["train"].model_dump())
    assert quick["train"]["lr"] == full["train"].lr             # keys the profile does not name are untouched


def test_profile_replaces_whole_keys_and_rejects_unknown_names(tmp_path):
    raw = {"profile": "quick", "train": {"models": {"a": 1, "b": 2}, "epochs": 9},
           "profiles": {"quick": {"train": {"models": {"b": 2}}}, "full": {}}}
    out = apply_profile(raw)
    assert out["train"] == {"models": {"b": 2}, "epochs": 9}     # replaced, not merged into {a, b}
    assert raw["train"]["models"] == {"a": 1, "b": 2}           # the input is untouched
    assert apply_profile(raw, "full")["train"]["models"] == {"a": 1, "b": 2}
    with pytest.raises(ProfileError, match=r"Wrong profile `huge`.*\['full', 'quick'\]"):
        apply_profile(raw, "huge")
    with pytest.raises(ProfileError, match="no such section"):
        apply_profile({**raw, "profiles": {"quick": {"nope": {"x": 1}}}})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**raw, "profile": "huge"}))
    with pytest.raises(ParamsError, match="Wrong profile"):
        read_params(path)
    with pytest.raises(ProfileError, match=r"profiles.quick.train.models has \['c'\]"):
        check_dvc_matrix({"train": {"models": {"a": 1}}, "profiles": {"quick": {"train": {"models": {"c": 1}}}}})


def test_balanced_subset_covers_rare_classes_before_common_ones():
    rng = np.random.default_rng(0)
    # 200 images of common classes 1-3; the rare classes 4 and 5 appear in 3 and 2 images only
    present = [tuple(sorted(set(rng.integers(1, 4, 2).tolist()))) for _ in range(200)]
    for i in (17, 88, 150):
        present[i] += (4,)
    for i in (42, 199):
        present[i] += (5,)
    pick = balanced_subset(present, 20, seed=0)
    assert len(pick) == len(set(pick)) == 20
    assert {17, 88, 150, 42, 199} <= set(pick)                 # every rare image, in only 20 of 200
    cov = class_coverage(present, pick, 6)
    assert min(cov[1:4]) >= 5                                   # the common classes still all represented
    assert pick == balanced_subset(present, 20, seed=0)         # deterministic for a seed
    assert balanced_subset(present, 0) == list(range(200))


def test_split_subset_is_recorded(tmp_path):
    from tests.test_training_chain import make_tiny
    vdir = make_tiny(tmp_path, n_train=16)
    res = split.run(SplitParams(n_folds=2, seed=0, group_by="batch", subset=8), vdir, tmp_path / "split")
    rec = json.loads((tmp_path / "split" / "subset.json").read_text())
    assert len(res.folds) == 8 and sorted(res.folds) == sorted(rec["file_names"])
    assert rec["rule"].startswith("greedy") and rec["of"] == 16


def test_gain_report_pairs_settings_across_profiles():
    ref = {"profile": "full", "train": {"loss": "ce+dice", "lr": 0.002}, "infer": {"tta": ["hflip"]}}
    assert setting_of({**ref, "profile": "quick"}, ref) == {}
    s = setting_of({**ref, "train": {"loss": "ce", "lr": 0.002}}, ref)
    assert setting_label(s) == 'train.loss="ce"'
    recs = [{"profile": p, "setting": s, "score": v} for p, s, v in [
        ("quick", "(baseline)", 0.30), ("quick", "a", 0.35), ("quick", "b", 0.28), ("quick", "c", 0.31),
        ("full", "(baseline)", 0.50), ("full", "a", 0.56), ("full", "b", 0.47), ("full", "c", 0.49),
        ("quick", "only-quick", 0.9)]]
    rep = gain_report(recs, "quick", "full")
    gains = {r.setting: (round(r.light_gain, 6), round(r.heavy_gain, 6), r.agree) for r in rep.rows}
    assert gains == {"a": (0.05, 0.06, True), "b": (-0.02, -0.03, True), "c": (0.01, -0.01, False)}
    assert rep.sign_agreement == pytest.approx(2 / 3) and rep.only_one_profile == ["only-quick"]
    assert rep.spearman == pytest.approx(1.0)                  # same order: a > c > b in both
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0) and spearman([1], [1]) is None


def test_compare_reads_dvc_exp_show_json(tmp_path):
    def rev(name, params, oof):
        return {"rev": name * 4, "name": name, "data": {"params": {"params.yaml": {"data": params}},
                "metrics": {"artifacts/infer/r0/metrics.json": {"data": {"oof_miou": oof}}}}}
    base = {"profile": "full", "infer": {"tta": ["hflip"]}}
    show = [{"rev": "workspace", "data": {}},
            {"rev": "c0ffee", "name": "main", "data": {"params": {"params.yaml": {"data": base}}, "metrics": {}},
             "experiments": [{"revs": [rev("qb", {**base, "profile": "quick"}, 0.2)]},
                             {"revs": [rev("qt", {"profile": "quick", "infer": {"tta": []}}, 0.25)]},
                             {"revs": [rev("fb", base, 0.4)]},
                             {"revs": [rev("ft", {"profile": "full", "infer": {"tta": []}}, 0.38)]}]}]
    res = compare.run(load_all(REPO / "params.yaml")["compare"], show, tmp_path)
    assert [(r.setting, round(r.light_gain, 6), round(r.heavy_gain, 6)) for r in res.report.rows] == \
        [("infer.tta=[]", 0.05, -0.02)]
    assert json.loads((tmp_path / "metrics.json").read_text())["sign_agreement"] == 0.0
    assert "**no**" in (tmp_path / "report.md").read_text()


def test_cv_vs_leaderboard_warns_beyond_the_margin(tmp_path, caplog):
    history = [{"run": "r1", "submission_id": 1, "oof_miou": 0.50, "public_score": 0.52, "time": "t1"},
               {"run": "r2", "submission_id": 2, "oof_miou": 0.55, "public_score": None, "time": "t2"},
               {"run": "r3", "submission_id": 3, "oof_miou": 0.60, "public_score": 0.48, "time": "t3"}]
    cv = cv_vs_lb(history, 0.05)
    assert [r["submission_id"] for r in cv.rows] == [1, 3]       # unscored submissions have no pair
    assert [r["diverged"] for r in cv.rows] == [False, True] and len(cv.warnings) == 1
    with caplog.at_level("WARNING"):
        write_cv_lb(history, 0.05, tmp_path)
    assert "submission 3" in caplog.text and "cv_lb_margin=0.05" in caplog.text
    lines = (tmp_path / "cv_lb.csv").read_text().splitlines()
    assert lines[0].startswith("n,") and len(lines) == 3
    assert (tmp_path / "cv_lb.png").stat().st_size > 5000
    assert "Warning" in (tmp_path / "cv_lb.md").read_text()


def test_a_flow_runs_a_profile_from_its_own_params_copy(tmp_path):
    """`full_pipeline(profile="quick")`: the run's params.yaml is the file with `profile: quick`, which the members'
    processes and the stage keys read; an unknown profile fails before any work, naming the ones there are."""
    from flows.full_pipeline import with_profile
    from pipelines.contentkey import StageKeys

    src = REPO / "params.yaml"
    assert with_profile(src, "", tmp_path / "run") == src            # no profile asked: the file itself
    copy = with_profile(src, "quick", tmp_path / "run")
    assert copy == tmp_path / "run" / "params.yaml"
    assert yaml.safe_load(copy.read_text())["profile"] == "quick"
    quick = load_all(copy)
    assert len(quick["train"].folds) == 1 and quick["split"].subset > 0
    # every stage's key moves with the profile (profile and profiles are in each stage's params)
    full_keys, quick_keys = StageKeys(src, root=REPO), StageKeys(copy, root=REPO)
    assert full_keys.key("split", ["v"]) != quick_keys.key("split", ["v"])
    with pytest.raises(ValueError, match="Wrong profile `fast`.*quick"):
        with_profile(src, "fast", tmp_path / "other")
