"""The validate stage inside Prefect: a data error fails once and stops the flow; the EDA shows up as artifacts.

Real Prefect (a temporary server through `prefect_test_harness`), real SeaweedFS, real DVC: no mocks.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

import pipelines.validate as stage
from flows.full_pipeline import full_pipeline, publish_validate
from segpipe.config import TRASH_CLASSES, DataParams, ValidateParams
from segpipe.storage import ArtifactStore
from segpipe.synth import generate
from segpipe.validation import ANN_SUITE, IMAGE_SUITE, POLY_SUITE, TRAIN_IMAGE_SUITE, DataValidationError
from tests.tiny import copy_project, shrink_params

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=180):
        yield


def _tiny_dataset(root):
    generate(root, root.parent / f"{root.name}-hidden", n_train=12, n_test=4, image_size=64, n_batches=2,
             val_fraction=0.25, seed=0, classes=TRASH_CLASSES)
    return root


def test_data_error_fails_validate_once_and_nothing_downstream_runs(prefect_server, s3_env, tmp_path, monkeypatch):
    project = copy_project(tmp_path / "project")
    shrink_params(project / "params.yaml")
    (project / ".dvc" / "config").write_text("")   # no DVC remote: fetch's `dvc push` only warns
    # fetch regenerates data/raw through `dvc repro generate`; the flow's params file points at a broken copy
    bad = _tiny_dataset(project / "data" / "bad")
    d = json.loads((bad / "train_all.json").read_text())
    d["annotations"][3]["image_id"] = 999
    (bad / "train_all.json").write_text(json.dumps(d))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["root"] = "data/bad"
    (project / "bad.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(project)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # as the worker has

    state = full_pipeline(params_file="bad.yaml", submit=False, run_name="bad-data", return_state=True)

    assert state.is_failed()
    with pytest.raises(DataValidationError, match=r"annotation 3 \(image 999\)"):
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    # validate ran exactly once (a retry would show run_count 2); no upload, split or train task was created
    # (the DVC push runs beside the stages from the start, whatever they do)
    assert {r.name.rsplit("-", 1)[0]: (r.state_type.value, r.run_count) for r in runs
            if not r.name.startswith("dvc-push")} == {"fetch": ("COMPLETED", 1), "validate": ("FAILED", 1)}
    assert not (project / "runs" / "bad-data" / "validate").exists()
    assert ArtifactStore(s3_env).list("runs/bad-data/") == []


def test_eda_is_published_as_artifacts_with_plots_inlined(prefect_server, tmp_path):
    data = _tiny_dataset(tmp_path / "data")
    v = stage.run(DataParams(root=str(data), classes=TRASH_CLASSES),
                  ValidateParams(max_empty_images=2, sample_grid=4), tmp_path / "validate")
    urls = [f"s3://segpipe/runs/r1/validate/eda/{p.name}" for p in sorted((v.out_dir / "eda").iterdir())]

    @flow
    def publish() -> None:
        publish_validate(v, urls)

    state = publish(return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    arts = {a.key: a for a in found}
    assert {k: a.type for k, a in arts.items()} == {"eda-report": "markdown", "eda-class-stats": "table",
                                                   "eda-splits": "table", "validation-summary": "table"}

    report = arts["eda-report"].data
    inlined = dict(re.findall(r"!\[([^\]]*)\]\(data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)\)", report))
    assert len(inlined) == 6 and not re.search(r"\]\((?!data:)[^)]*\.png\)", report)
    assert len(report) < 600_000        # the artifact travels whole in a server event: previews, not full files
    assert base64.b64decode(inlined["pixel share"]) == (v.out_dir / "eda" / "pixel_share.png").read_bytes()
    assert "`s3://segpipe/runs/r1/validate/eda/samples.png`" in report and "class_stats.csv`" not in report

    classes = json.loads(arts["eda-class-stats"].data)
    assert [r["class"] for r in classes] == list(TRASH_CLASSES)
    assert sum(r["annotations"] for r in classes) == v.metrics["n_annotations"] > 0
    splits = {r["split"]: r["images"] for r in json.loads(arts["eda-splits"].data)}
    assert splits == {"train_all": 12, "test": 4, "train": 9, "val": 3}
    gx = json.loads(arts["validation-summary"].data)
    assert {r["suite"] for r in gx} == {"images", "train_images", "annotations", "polygons"}
    assert all(r["success"] and r["failed"] == 0 for r in gx)
    assert next(r for r in gx if r["code"] == "image_missing")["rows"] == 16     # 12 train + 4 test images
    assert len(gx) == sum(map(len, (IMAGE_SUITE, TRAIN_IMAGE_SUITE, ANN_SUITE, POLY_SUITE)))


def test_fanout_progress_artifacts_change_while_members_run(prefect_server, tmp_path):
    """flows.progress.watch publishes, during the flow run, a progress artifact updated in place and a table artifact
    whose new versions follow the members' dvclive logs."""
    import time

    from prefect import task
    from prefect.client.schemas.filters import ArtifactFilterKey

    from flows import progress
    from pipelines.train import LiveCurves, live_dir

    gate = tmp_path / "gate"
    out = tmp_path / "run" / "train" / "m-s0-f0"

    def row(epoch: int, miou: float) -> dict:
        return {"epoch": epoch, "train_loss": 1.0, "val_miou": miou, "lr": 0.01, "per_class_iou": {}}

    @task
    def member() -> str:
        curves = LiveCurves(live_dir(out))
        curves(row(0, 0.25))
        while not gate.exists():
            time.sleep(0.05)
        curves(row(1, 0.5))
        out.mkdir(parents=True)
        return str(out)

    def artifacts(key: str) -> list:
        with get_client(sync_client=True) as client:
            return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    @flow
    def fanout() -> tuple:
        fut = member.submit()
        with progress.watch("train", [("m-s0-f0", out), ("m-s0-f1", tmp_path / "never")], [fut, None], epochs=2,
                            interval=0.2):
            deadline = time.monotonic() + 60
            while not any(a.data == 25.0 for a in artifacts("train-progress")):   # 1 of 2 epochs of 1 of 2 members
                assert time.monotonic() < deadline, [a.data for a in artifacts("train-progress")]
                time.sleep(0.2)
            first = artifacts("train-members-live")
            gate.touch()
            fut.wait()
        return first

    first = fanout()
    assert any("0.25" in str(a.data) and "running" in str(a.data) for a in first)
    prog = artifacts("train-progress")
    assert len(prog) == 1 and prog[0].data == 50.0          # updated in place: one done, one never started
    assert "1 done, 0 running, 1 left" in prog[0].description
    tables = artifacts("train-members-live")
    assert len(tables) > len(first) and any('"done"' in str(a.data) or "'done'" in str(a.data) for a in tables)
