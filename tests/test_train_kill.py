"""SIGKILL a training process mid-epoch, lose its machine's disk, run it again: it resumes from the checkpoint
mirrored to the real S3 store and ends with the same weights as an undisturbed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import split
from pipelines.train import CHECKPOINT_ENV
from segpipe.config import SplitParams
from segpipe.storage import ArtifactStore
from test_training_chain import CLASSES, make_tiny

REPO = Path(__file__).resolve().parents[1]


def _params(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "data": {"root": "unused", "classes": list(CLASSES)},
        "train": {"models": {"unet_r18": {"arch": "unet", "encoder": "resnet18"}}, "seeds": [0], "folds": [0],
                  "epochs": 5, "batch_size": 4, "input_size": 32, "lr": 0.003, "weight_decay": 0.0,
                  "warmup_epochs": 1, "num_workers": 0, "threads": 1, "ema": 0.9, "swa_start": 0.6},
    }))
    return path


def _cmd(params: Path, vdir: Path, sdir: Path, out_root: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.train", "--params", str(params), "--model", "unet_r18", "--seed", "0",
            "--fold", "0", "--validate", str(vdir), "--split", str(sdir), "--out-root", str(out_root)]


@pytest.mark.services
def test_killed_training_resumes_from_s3_with_the_same_result(tmp_path, s3_env):
    vdir = make_tiny(tmp_path)
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), vdir, tmp_path / "split")
    params = _params(tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    store = ArtifactStore(s3_env)

    ref_env = {**env, CHECKPOINT_ENV: f"ckpt-ref-{uuid.uuid4().hex[:8]}"}
    subprocess.run(_cmd(params, vdir, tmp_path / "split", tmp_path / "ref"), env=ref_env, check=True,
                   capture_output=True, cwd=tmp_path)

    prefix = f"ckpt-{uuid.uuid4().hex[:8]}"
    env[CHECKPOINT_ENV] = prefix
    proc = subprocess.Popen(_cmd(params, vdir, tmp_path / "split", tmp_path / "run"), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(k.endswith("last-e0002.pt") for k in store.list(f"{prefix}/")):
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint reached S3 in 300 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)          # mid-epoch 3: epochs 1-2 are done and mirrored
    proc.wait()
    assert not (tmp_path / "run" / "unet_r18-s0-f0").exists()    # nothing half-finished was published
    shutil.rmtree(tmp_path / "run")                                 # the machine is lost with its disk

    out = subprocess.run(_cmd(params, vdir, tmp_path / "split", tmp_path / "run"), env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "restored" in out.stderr and "from s3://" in out.stderr
    metrics = json.loads((tmp_path / "run" / "unet_r18-s0-f0" / "metrics.json").read_text())
    ref = json.loads((tmp_path / "ref" / "unet_r18-s0-f0" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] >= 2
    assert metrics["best_miou"] == pytest.approx(ref["best_miou"], abs=1e-6)
    a = torch.load(tmp_path / "ref" / "unet_r18-s0-f0" / "best.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "run" / "unet_r18-s0-f0" / "best.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=f"best.pt differs at {k}")
    assert store.list(f"{prefix}/") == []      # finished: the mirrored resume state is cleared
    assert (tmp_path / "run" / "unet_r18-s0-f0" / "dvclive" / "metrics.json").is_file()
