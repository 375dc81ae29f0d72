"""`dvc plots show` / `dvc metrics show` read what the validate stage writes, through the real dvc on a tiny copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from segpipe.config import TRASH_CLASSES
from tests.tiny import REPO, copy_project, shrink_params

DVC = str(Path(sys.executable).parent / "dvc")


def dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([DVC, *args], cwd=project, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_dvc_plots_and_metrics_show_the_eda(tmp_path):
    project = copy_project(tmp_path / "project")
    shrink_params(project / "params.yaml")
    dvc(project, "repro", "validate")

    plots = json.loads(dvc(project, "plots", "show", "--json"))["data"]
    declared = [next(iter(p)) if isinstance(p, dict) else p
                for p in yaml.safe_load((project / "dvc.yaml").read_text())["plots"]]
    assert set(declared) <= set(plots)
    # besides the declared plots, only the training stages' learning curves (their data exists once they have run)
    assert all(k.startswith("artifacts/curves/") for k in set(plots) - set(declared)), sorted(plots)
    for name, field in (("pixel_share", "pixel_share"), ("annotations_per_class", "annotations"),
                        ("images_per_class", "images_with"), ("class_weight", "class_weight")):
        spec = plots[name][0]["content"]
        rows = spec["data"]["values"]
        assert [r["class"] for r in rows] == list(TRASH_CLASSES), name
        assert spec["encoding"]["x"]["field"] == field and spec["encoding"]["x"]["scale"]["zero"] is True
    sizes = plots["object_sizes"][0]["content"]["data"]["values"]
    assert len(sizes) == 10 * 3 and {r["size"] for r in sizes} == {"small", "medium", "large"}
    annotations = {r["class"]: int(r["annotations"]) for r in plots["annotations_per_class"][0]["content"]["data"]
                   ["values"]}
    assert sum(int(r["annotations"]) for r in sizes) == sum(annotations.values()) > 0
    images = [p for p in declared if p.endswith(".png") and p.startswith("artifacts/validate/")]   # the EDA's
    assert len(images) == 6 and all(plots[p][0]["type"] == "image" and Path(plots[p][0]["url"]).is_file()
                                    for p in images)

    metrics = json.loads(dvc(project, "metrics", "show", "--json"))
    validate = next(iter(metrics.values()))["data"]["artifacts/validate/metrics.json"]["data"]
    assert validate["n_train_images"] == 24 and validate["gx_success"] == 1
    assert validate["annotations/Paper"] == annotations["Paper"]


def test_train_curves_plot_lists_every_member_of_the_matrix():
    """DVC reads no globs in a plot's sources: the one-plot-for-all-members curves list params.yaml's matrix, at the
    place the train stage declares its curves (a dvclive folder: its plots/metrics/val_miou.tsv)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    declared = next(iter(dvc_yaml["stages"]["train"]["plots"][0]))
    want = set()
    for m in params["models"]:
        for s in params["seeds"]:
            for f in params["folds"]:
                path = declared.replace("${item.model}", m).replace("${item.seed}", str(s)).replace(
                    "${item.fold}", str(f))
                want.add(path if path.endswith(".tsv") else f"{path}/val_miou.tsv")
    plots = [next(iter(p.values())) for p in dvc_yaml["plots"] if isinstance(p, dict) and "train_curves" in p]
    assert len(plots) == 1, "dvc.yaml has no top-level `train_curves` plot"
    listed = set(plots[0]["y"])
    assert listed == want, (f"dvc.yaml's train_curves plot lists {sorted(listed - want)}, which are not the train "
                            f"stage's curves of params.yaml's matrix, and misses {sorted(want - listed)}")
    assert set(plots[0]["y"].values()) == {"val_miou"} and plots[0]["x"] == "step"
