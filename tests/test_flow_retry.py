"""`prefect flow-run retry` (the real Prefect 3.8.8 CLI) continues a failed run from the stages that finished:
the leaderboard is down, the run fails at submit; once it is back, the retried run reuses every stage and submits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from segpipe import stack
from tests.conftest import free_port_block
from tests.tiny import copy_project, shrink_params

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.ops]
BIN = Path(sys.executable).parent


def test_retry_continues_from_the_finished_stages(tmp_path):
    project = copy_project(tmp_path / "project")
    base = free_port_block(11)
    ports = {"s3": base, "prefect": base + 9, "leaderboard": base + 10}
    shrink_params(project / "params.yaml", pseudo={"rounds": 0}, ablation={"submit": False},
                  submit={"base_url": f"http://127.0.0.1:{ports['leaderboard']}"})
    home = tmp_path / "home"
    try:
        stack.up(home, ports, ["s3", "prefect"], cwd=project)          # the leaderboard is down
        env = {**os.environ, **stack.load_env(home), "PATH": f"{BIN}:{os.environ['PATH']}",
               "PYTHONPATH": str(project), "SEGPIPE_HOME": str(home)}
        first = subprocess.run([sys.executable, "-c", "from flows.full_pipeline import full_pipeline; "
                                "full_pipeline(submit=True)"], cwd=project, env=env, capture_output=True, text=True,
                               timeout=900)
        assert first.returncode != 0, "the run should fail at submit while the leaderboard is down"
        api = env["PREFECT_API_URL"]
        (run,) = requests.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        assert run["state_type"] == "FAILED"
        assert not list((project / "runs").glob("*/summary.json"))

        stack.up(home, ports, ["leaderboard"], cwd=project, labels=project / "data/leaderboard")
        retry = subprocess.run([str(BIN / "prefect"), "flow-run", "retry", run["id"],
                                "--entrypoint", "flows/full_pipeline.py:full_pipeline"],
                               cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
        assert requests.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()["state_type"] == "COMPLETED"
        (summary_path,) = (project / "runs").glob("*/summary.json")
        summary = json.loads(summary_path.read_text())
        # nothing ran twice: validate, split, two members, infer, its label-noise audit and the ablation all reused
        assert [r["label"] for r in summary["stages"]] == ["validate", "split", "train-fpn_mbv2-s0-f0",
                                                           "train-fpn_mbv2-s0-f1", "infer-r0", "audit-r0", "ablation"]
        assert summary["reused"] == len(summary["stages"]), summary["stages"]
        assert summary["submit_status"] and 0.0 <= summary["public_miou"] <= 1.0
    finally:
        stack.down(home)
