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
from pipelines.train import CHECKPOINT_ENV, RESULT_ENV
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


@pytest.mark.services
def test_finished_member_is_reused_by_content_and_a_corrupt_copy_retrains(tmp_path, s3_env):
    vdir = make_tiny(tmp_path)
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), vdir, tmp_path / "split")
    params = _params(tmp_path / "params.yaml")
    raw = yaml.safe_load(params.read_text())
    raw["train"].update(epochs=1, ema=0.0, swa_start=1.0)
    params.write_text(yaml.safe_dump(raw))
    prefix = f"results-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(REPO), RESULT_ENV: prefix}

    def train(out_root: str) -> str:
        out = subprocess.run(_cmd(params, vdir, tmp_path / "split", tmp_path / out_root), env=env, cwd=tmp_path,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    assert "unchanged inputs, params and code" not in train("first")
    store = ArtifactStore(s3_env)
    keys = store.list(f"{prefix}/")
    assert any(k.endswith("/DONE") for k in keys) and any(k.endswith("/best.pt") for k in keys)

    second = train("second")                      # same data, params and code: served from the store
    assert "unchanged inputs, params and code; reused s3://" in second
    a = (tmp_path / "first" / "unet_r18-s0-f0")
    b = (tmp_path / "second" / "unet_r18-s0-f0")
    assert sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert (a / "best.pt").read_bytes() == (b / "best.pt").read_bytes()

    best_key = next(k for k in keys if k.endswith("/best.pt"))   # flip bytes, keep the recorded checksum
    head = store._client.head_object(Bucket=s3_env.bucket, Key=best_key)
    data = bytearray(store._client.get_object(Bucket=s3_env.bucket, Key=best_key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    store._client.put_object(Bucket=s3_env.bucket, Key=best_key, Body=bytes(data), Metadata=head["Metadata"])
    third = train("third")
    assert "unchanged inputs, params and code" not in third      # detected by checksum, trained again
    assert (tmp_path / "third" / "unet_r18-s0-f0" / "best.pt").is_file()

    raw["train"]["lr"] = 0.001                    # a changed param: a different content key
    params.write_text(yaml.safe_dump(raw))
    assert "unchanged inputs, params and code" not in train("fourth")
