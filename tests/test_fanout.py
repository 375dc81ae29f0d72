"""The training fan-out under a real Prefect server: one member failing does not cut the others short, and
the flow then fails naming it (real subprocesses, real SeaweedFS)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipelines import split
from segpipe.config import FanoutParams, SplitParams
from segpipe.storage import ArtifactStore
from test_training_chain import CLASSES, make_tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.services
def test_a_failing_member_leaves_the_others_finished(tmp_path, s3_env, monkeypatch):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.caching import StageRunner
    from flows.full_pipeline import fan_out
    from pipelines.contentkey import StageKeys

    run_dir = tmp_path
    vdir = make_tiny(tmp_path)
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), vdir, tmp_path / "split")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"root": "unused", "classes": list(CLASSES)},
        "train": {"models": {"tiny": {"arch": "fpn", "encoder": "resnet18"}}, "seeds": [0], "folds": [0],
                  "epochs": 1, "batch_size": 4, "input_size": 32, "lr": 0.003, "weight_decay": 0.0,
                  "warmup_epochs": 0, "num_workers": 0, "threads": 1},
    }))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    prefix = f"runs/fanout-{os.getpid()}"
    monkeypatch.setenv("SEGPIPE_TIMING_FILE", "")

    @flow
    def two_members():
        # fold 7 does not exist in a 2-fold split: that member fails in its own process
        stages = StageRunner(StageKeys(REPO / "params.yaml", root=REPO), ArtifactStore(s3_env), "fanout", run_dir,
                             prefix)
        return fan_out(stages, "train", [("tiny", 0, 7), ("tiny", 0, 0)], run_dir, "params.yaml",
                       FanoutParams(slots_per_gpu=1, cpu_slots=2), [str(tmp_path)])

    with prefect_test_harness(server_startup_timeout=180):
        with pytest.raises(RuntimeError, match=r"1 of 2 members failed \(tiny-s0-f7\)"):
            two_members()
    assert (run_dir / "train" / "tiny-s0-f0" / "best.pt").is_file()           # the other one finished
    assert ArtifactStore(s3_env).exists(f"{prefix}/train/tiny-s0-f0/best.pt")  # and was stored
    assert not (run_dir / "train" / "tiny-s0-f7").exists()
