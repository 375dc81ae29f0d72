"""The whole chain as a user runs it: `segpipe stack up`, `prefect deploy`, `prefect deployment run --watch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from segpipe import stack
from segpipe.storage import ArtifactStore, S3Config
from tests.conftest import free_port_block
from tests.tiny import copy_project, shrink_params

pytestmark = [pytest.mark.slow, pytest.mark.services]
BIN = Path(sys.executable).parent


def free_stack_ports() -> dict[str, int]:
    """s3 + weed's internal block (and their +10000 gRPC twins), Prefect, leaderboard."""
    base = free_port_block(11)
    return {"s3": base, "prefect": base + 9, "leaderboard": base + 10}


def nightly_scheduled(api: str, wait_s: float = 120) -> list[dict]:
    """The nightly deployment's flow runs in state Scheduled, waiting up to wait_s for the scheduler's loop."""
    dep = requests.get(f"{api}/deployments/name/full-pipeline/nightly", timeout=30).json()
    deadline = time.monotonic() + wait_s
    while True:
        runs = requests.post(f"{api}/flow_runs/filter", timeout=30, json={"flow_runs": {
            "deployment_id": {"any_": [dep["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
        if runs or time.monotonic() > deadline:
            return runs
        time.sleep(3)


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def watch_while(proc: subprocess.Popen, api: str, runs: Path, every: float = 1.0, timeout: float = 900) -> dict:
    """Until `proc` ends (killed past `timeout` s): each second, the `train-progress` artifact's value (when it
    changed) and each member's latest dvclive step (runs/*/train/.live/<member>/metrics.json, when it changed)."""
    looks: dict = {"progress": [], "live": {}}
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            break
        try:
            arts = requests.post(f"{api}/artifacts/filter", timeout=10,
                                 json={"artifacts": {"key": {"any_": ["train-progress"]}}}).json()
        except requests.RequestException:
            arts = []
        for a in arts:
            if not looks["progress"] or looks["progress"][-1][1] != a["data"]:
                looks["progress"].append((round(time.monotonic(), 1), a["data"]))
        for metrics in runs.glob("*/train/.live/*/metrics.json"):
            try:
                step = json.loads(metrics.read_text())["step"]
            except (OSError, ValueError, KeyError):
                continue                       # caught mid-write: the next look reads it whole
            steps = looks["live"].setdefault(metrics.parent.name, [])
            if not steps or steps[-1] != step:
                steps.append(step)
        time.sleep(every)
    return looks


def test_deployment_run_completes_and_submits(tmp_path, monkeypatch):
    # like `make demo`: the shell that starts the stack has no virtualenv on PATH; the worker must cope
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN))
    project = copy_project(tmp_path / "project")
    ports = free_stack_ports()
    shrink_params(project / "params.yaml", train={"epochs": 2},     # two epochs: a member's curve can move
                  submit={"base_url": f"http://127.0.0.1:{ports['leaderboard']}"})
    home = tmp_path / "home"
    try:
        status = stack.up(home, ports, cwd=project, labels=project / "data/leaderboard")
        assert all(status[s]["state"] == "running" for s in ("s3", "prefect", "worker", "leaderboard"))
        env = {**os.environ, **stack.load_env(home), "PATH": f"{BIN}:{os.environ['PATH']}", "SEGPIPE_HOME": str(home)}
        run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], project, env)
        ls = run([str(BIN / "prefect"), "deployment", "ls"], project, env).stdout
        assert "full-pipeline/demo" in ls and "full-pipeline/nightly" in ls
        # the server's scheduler puts the nightly's next runs on the calendar (it could not under SQLAlchemy 2.1)
        assert nightly_scheduled(env["PREFECT_API_URL"]), "the nightly deployment has no scheduled run"
        # ... and off again: a test running at 02:00 UTC must not get a nightly run beside its own
        run([str(BIN / "prefect"), "--no-prompt", "deployment", "schedule", "pause", "--all"], project, env)
        assert not nightly_scheduled(env["PREFECT_API_URL"], wait_s=0)

        # while the run goes, look (as a person would) at the fan-out's progress artifact in the UI's API and at
        # a member's live dvclive folder: both must change between looks while the matrix trains
        with open(tmp_path / "watch.log", "w") as log:      # a file, not a pipe: nothing blocks on a full buffer
            proc = subprocess.Popen([str(BIN / "prefect"), "deployment", "run", "full-pipeline/demo", "--watch"],
                                    cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
            looks = watch_while(proc, env["PREFECT_API_URL"], project / "runs")
        out = (tmp_path / "watch.log").read_text()
        assert proc.wait(900) == 0 and "Completed" in out, out[-4000:]
        progress_seen = [v for _, v in looks["progress"]]
        assert len(set(progress_seen)) >= 2 and progress_seen[-1] == 100.0, looks["progress"]
        moved = [m for m, steps in looks["live"].items() if len(set(steps)) >= 2]
        assert moved, looks["live"]                   # some member's curve seen at epoch 1, then at epoch 2

        summaries = list((project / "runs").glob("*/summary.json"))
        assert len(summaries) == 1
        summary = json.loads(summaries[0].read_text())
        assert 0.0 <= summary["public_miou"] <= 1.0 and 0.0 <= summary["oof_miou"] <= 1.0

        # every stage's outputs can be listed from S3 alone, under the run's prefix
        store = ArtifactStore(S3Config.from_env(env))
        keys = store.list(summary["artifacts"] + "/")
        for part in ("validate/index.json", "split/folds.json", "train/fpn_mbv2-s0-f0/best.pt",
                     "train/fpn_mbv2-s0-f1/oof.npz", "infer/r0/members/fpn_mbv2-s0-f0/oof.npy",
                     "infer/r0/members/fpn_mbv2-s0-f1/test.npy", "pseudo/r1/provenance.json",
                     "retrain/r1/fpn_mbv2-s0-f1/best.pt", "infer/r1/report.json", "audit/r0/ranking.json",
                     "audit/r0/affected.json", "audit/r1/worst.png", "ablation/ablation.json",
                     "submit/submission.csv", "submit/result.json"):
            assert f"{summary['artifacts']}/{part}" in keys, f"{part} missing from S3"

        # the ablation table: every row with a file was scored by the leaderboard under the ablation key
        table = requests.post(f"{env['PREFECT_API_URL']}/artifacts/filter", timeout=30,
                              json={"artifacts": {"key": {"any_": ["ablation"]}}}).json()
        rows = json.loads(table[0]["data"]) if isinstance(table[0]["data"], str) else table[0]["data"]
        assert [r["step"] for r in rows] == ["single", "flip_tta", "multiscale_tta", "fold_ensemble",
                                             "model_ensemble", "pseudo_r1"]
        assert all(0.0 <= r["public_miou"] <= 1.0 and r["oof_miou"] is not None for r in rows)
        assert rows[-1]["public_miou"] == pytest.approx(summary["public_miou"], abs=1e-4)   # the same masks

        # the infer stage's pictures: in the store with the run, and in the UI
        for part in ("confusion.png", "confusion.json", "per_class_iou.csv", "test_predictions.png",
                     "oof_disagreement.png"):
            assert f"{summary['artifacts']}/infer/r0/plots/{part}" in keys, f"infer plots/{part} missing from S3"
        assert store.get_bytes(f"{summary['artifacts']}/infer/r0/plots/test_predictions.png")[:8] == b"\x89PNG\r\n\x1a\n"
        pics = requests.post(f"{env['PREFECT_API_URL']}/artifacts/filter", timeout=30, json={"artifacts": {
            "key": {"any_": ["ensemble-confusion-r0", "ensemble-per-class-iou-r0", "ensemble-figures-r0"]}}}).json()
        assert {a["key"]: a["type"] for a in pics} == {"ensemble-confusion-r0": "table",
                                                      "ensemble-per-class-iou-r0": "table",
                                                      "ensemble-figures-r0": "markdown"}
        assert next(a["data"] for a in pics if a["key"] == "ensemble-figures-r0").count("](data:image/") == 3

        # the validate stage's EDA is in the Prefect UI: the report with its plots inlined, and its tables
        arts = requests.post(f"{env['PREFECT_API_URL']}/artifacts/filter", timeout=30, json={"artifacts": {
            "key": {"any_": ["eda-report", "eda-class-stats", "eda-splits", "validation-summary"]}}}).json()
        audits = requests.post(f"{env['PREFECT_API_URL']}/artifacts/filter", timeout=30, json={"artifacts": {
            "key": {"any_": ["label-noise-audit-r0", "label-noise-audit-r1", "cv-vs-leaderboard"]}}}).json()
        assert {a["key"] for a in audits} == {"label-noise-audit-r0", "label-noise-audit-r1", "cv-vs-leaderboard"}
        # the worst images' grid is drawn into the audit artifact itself
        assert all("](data:image/jpeg;base64," in a["data"] for a in audits if a["key"].startswith("label-noise"))
        assert all(len(a["data"]) < 200_000 for a in audits)    # previews: an artifact travels whole in an event
        assert {a["key"]: a["type"] for a in arts} == {"eda-report": "markdown", "eda-class-stats": "table",
                                                      "eda-splits": "table", "validation-summary": "table"}
        report = next(a["data"] for a in arts if a["key"] == "eda-report")
        assert report.count("](data:image/") == 6 and f"{summary['artifacts']}/validate/eda/" in report

        # the leaderboard holds the submission with the same public score
        lb = requests.get(f"http://127.0.0.1:{ports['leaderboard']}/api/v1/competition/1/submissions/",
                          headers={"Authorization": f"Bearer {env['SEGPIPE_LEADERBOARD_KEY']}"}, timeout=10).json()
        scores = [s["public_score"] for s in (lb if isinstance(lb, list) else lb["submissions"])]
        assert summary["public_miou"] in scores

        # no credential leaked into the run's logs or artifacts
        secret = env["AWS_SECRET_ACCESS_KEY"]
        for path in list((home / "logs").glob("*.log")) + list((project / "runs").rglob("*.json")):
            assert secret not in path.read_text(errors="ignore"), f"secret leaked into {path}"
    finally:
        stack.down(home)
