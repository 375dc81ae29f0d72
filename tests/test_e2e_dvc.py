"""The whole chain through `dvc repro` on a tiny copy of the project: real stages, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.codedeps import closure, stage_modules
from tests.tiny import copy_project, shrink_params

pytestmark = pytest.mark.slow
DVC = str(Path(sys.executable).parent / "dvc")


def dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([DVC, *args], cwd=project, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_dvc_repro_runs_chain_then_nothing_then_only_dependants(tmp_path):
    project = copy_project(tmp_path / "project")
    shrink_params(project / "params.yaml")

    out = dvc(project, "repro")
    for stage in ("generate", "validate", "split", "train@fpn_mbv2-0-0", "train@fpn_mbv2-0-1", "infer@r0", "pseudo",
                  "retrain@fpn_mbv2-0-1", "infer@r1", "ablation", "submit"):
        assert f"Running stage '{stage}'" in out
    masks = np.load(project / "artifacts/infer/r1/test_masks.npy")
    assert masks.shape == (8, 256, 256)
    lines = (project / "artifacts/submit/submission.csv").read_text().splitlines()
    assert lines[0] == "image_id,PredictionString" and len(lines) == 9
    assert len(lines[1].split(",", 1)[1].split(" ")) == 256 * 256
    assert json.loads((project / "artifacts/submit/result.json").read_text())["status"] == "dry-run"
    assert "ensemble_oof_miou" in json.loads((project / "artifacts/infer/r1/report.json").read_text())
    assert np.load(project / "artifacts/infer/r0/members/fpn_mbv2-s0-f1/oof.npy").dtype == np.uint8   # probstore

    # the ablation rows are a DVC metric (OOF only: dvc repro never submits)
    metrics = json.loads(dvc(project, "metrics", "show", "--json"))
    ablation = next(iter(metrics.values()))["data"]["artifacts/ablation/metrics.json"]["data"]
    assert {"oof/single", "oof/fold_ensemble", "oof/model_ensemble", "oof/pseudo_r1"} <= set(ablation)
    assert not any(k.startswith("public/") for k in ablation)

    # learning curves of every member, through DVC's own plots machinery
    shown = json.loads(dvc(project, "plots", "show", "--json"))
    curves = {k.split("/plots/")[0] for k in shown["data"] if "artifacts/curves/" in k}   # one dvclive log each
    assert len(curves) == 4, sorted(shown["data"])
    assert {f"artifacts/curves/train/fpn_mbv2-s0-f0/plots/metrics/{m}.tsv" for m in ("train_loss", "val_miou", "lr")
            } <= set(shown["data"])

    # a second repro re-runs nothing
    again = dvc(project, "repro")
    assert "Running stage" not in again

    # a file no stage imports itself (models -> weights): exactly the stages whose import closure holds it are
    # stale (tests/test_codedeps.py: the flow's keys see the same change); restored, nothing is
    weights = project / "segpipe/weights.py"
    original = weights.read_text()
    weights.write_text(original + "\n# changed\n")
    stale = {name.split("@")[0] for name in json.loads(dvc(project, "status", "--json"))}
    assert stale == {s for s, (module, _) in stage_modules(project / "dvc.yaml").items()
                     if "segpipe/weights.py" in closure(module, project)} == {"train", "infer", "audit", "pseudo",
                                                                              "retrain"}
    weights.write_text(original)
    assert json.loads(dvc(project, "status", "--json")) == {}

    # one training param changed: train and everything downstream of it re-run, nothing upstream
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = params["train"]["lr"] / 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = dvc(project, "status", "--json")
    changed = set(json.loads(stale))
    assert {"train@fpn_mbv2-0-0", "train@fpn_mbv2-0-1", "retrain@fpn_mbv2-0-0", "retrain@fpn_mbv2-0-1"} <= changed
    assert not changed & {"generate", "validate", "split"}
    rerun = dvc(project, "repro")
    ran = {line.split("'")[1] for line in rerun.splitlines() if line.startswith("Running stage")}
    assert not ran & {"generate", "validate", "split"}
    assert {"train@fpn_mbv2-0-0", "train@fpn_mbv2-0-1"} <= ran
