"""DVC experiments on a tiny copy of the project: `dvc exp run -S profile=quick`, a queue run with --run-all,
`dvc exp show` with the stages' metrics, and the quick-vs-full gain report built from what DVC recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import copy_project, shrink_params

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
METRIC = "artifacts/infer/r0/metrics.json"


def sh(project: Path, *cmd: str, quiet: bool = False) -> str:
    """Run a command in the project; its stdout (+ stderr unless quiet, e.g. for JSON)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.run(list(cmd), cwd=project, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout if quiet else proc.stdout + proc.stderr


def experiments(project: Path) -> dict[str, dict]:
    """name -> {params, metrics} of every experiment, from `dvc exp show --json`."""
    out = {}
    for commit in json.loads(sh(project, str(BIN / "dvc"), "exp", "show", "--json", quiet=True)):
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                out[rev["name"]] = {"params": rev["data"]["params"]["params.yaml"]["data"],
                                    "metrics": {k: v.get("data") for k, v in rev["data"]["metrics"].items()}}
    return out


def test_profiles_as_dvc_experiments_queue_show_and_gain_report(tmp_path):
    project = copy_project(tmp_path / "project")
    params = shrink_params(project / "params.yaml")
    # the quick profile, shrunk like the rest: half the images (class-balanced), one fold
    params["profiles"]["quick"] = {"split": {"subset": 12}, "train": {"folds": [0]}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny project")
    dvc = str(BIN / "dvc")

    # one experiment in the workspace, the profile set on the command line
    out = sh(project, dvc, "exp", "run", "-n", "quick-base", "-S", "profile=quick", "audit")
    assert "Running stage 'train@fpn_mbv2-0-1'" in out and "skipped, not in profile 'quick'" in out
    subset = json.loads((project / "artifacts/split/subset.json").read_text())
    assert subset["n_images"] == 12 and subset["of"] == 24 and len(set(subset["file_names"])) == 12
    # greedy by rare-class coverage: every class present in the whole set is in the subset
    assert all(subset["images_with_class"][c] > 0 for c, n in subset["images_with_class_all"].items() if n > 0)
    assert json.loads((project / "artifacts/train/fpn_mbv2-s0-f1/skipped.json").read_text())["profile"] == "quick"
    assert not (project / "artifacts/train/fpn_mbv2-s0-f1/best.pt").exists()
    oof_rows = json.loads((project / "artifacts/infer/r0/members/fpn_mbv2-s0-f0/index.json").read_text())
    assert set(oof_rows["oof_file_names"]) <= set(subset["file_names"])

    # a queue: the same setting in both profiles plus the full baseline, run one after another
    for name, sets in (("quick-notta", ["profile=quick", "infer.tta=[]"]), ("full-base", ["profile=full"]),
                       ("full-notta", ["profile=full", "infer.tta=[]"])):
        sh(project, dvc, "exp", "run", "--queue", "-n", name, *[a for s in sets for a in ("-S", s)], "audit")
    queued = sh(project, dvc, "queue", "status")
    assert queued.count("Queued") == 3, queued
    sh(project, dvc, "exp", "run", "--run-all")

    exps = experiments(project)
    assert {"quick-base", "quick-notta", "full-base", "full-notta"} <= set(exps), sorted(exps)
    for name, e in exps.items():
        assert e["params"]["profile"] == name.split("-")[0]
        assert 0.0 <= e["metrics"][METRIC]["oof_miou"] <= 1.0           # metrics declared: DVC shows them
        assert e["metrics"]["artifacts/audit/metrics.json"]["n_images"] > 0
    # quick validated on one fold of the subset, full on every image
    assert exps["quick-base"]["metrics"]["artifacts/audit/metrics.json"]["n_images"] < 12
    assert exps["full-base"]["metrics"]["artifacts/audit/metrics.json"]["n_images"] == 24
    table = sh(project, dvc, "exp", "show", "--no-pager", "--md")
    assert "oof_miou" in table and "full-notta" in table

    # the gain report reads the same record and pairs the setting across profiles
    sh(project, sys.executable, "-m", "pipelines.compare")
    gains = json.loads((project / "artifacts/compare/gains.json").read_text())
    assert [r["setting"] for r in gains["rows"]] == ["infer.tta=[]"]
    row = gains["rows"][0]
    score = {n: e["metrics"][METRIC]["oof_miou"] for n, e in exps.items()}
    assert row["light_gain"] == pytest.approx(score["quick-notta"] - score["quick-base"])
    assert row["heavy_gain"] == pytest.approx(score["full-notta"] - score["full-base"])
    metrics = json.loads(sh(project, dvc, "metrics", "show", "--json", quiet=True))
    shown = next(iter(metrics.values()))["data"]["artifacts/compare/metrics.json"]["data"]
    assert shown["settings_compared"] == 1 and shown["sign_agreement"] in (0.0, 1.0)
    assert "infer.tta=[]" in (project / "artifacts/compare/report.md").read_text()
