"""Live training curves: a member's dvclive log grows epoch by epoch while it trains, `dvc plots show` reads it, a
resumed run replays its checkpoint's epochs once; the flow's progress summary reads those logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.progress import MemberLook, read_live, summarise
from pipelines import split
from pipelines.train import LiveCurves, live_dir
from segpipe.config import SplitParams
from test_training_chain import CLASSES, make_tiny

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")


def _row(epoch: int, miou: float) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "val_miou": miou, "lr": 0.01, "img_per_s": 1.0,
            "per_class_iou": {"Background": 0.9, "A": miou, "B": None}}


def _steps(live: Path, name: str) -> list[int]:
    lines = (live / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
    return [int(line.split("\t")[0]) for line in lines[1:]]


def test_live_curves_replay_the_resumed_epochs_once(tmp_path, monkeypatch):
    live = tmp_path / "live"
    curves = LiveCurves(live)
    for e in range(3):                            # a run killed after epoch 3 was logged...
        curves(_row(e, 0.1 * e))
    monkeypatch.setenv("DVCLIVE_RESUME", "true")  # ...and an environment that asks dvclive to continue the folder
    curves = LiveCurves(live, [_row(0, 0.0), _row(1, 0.1)])    # the checkpoint it resumes from has 2 epochs
    curves(_row(2, 0.25))
    assert _steps(live, "val_miou") == [0, 1, 2] == _steps(live, "iou/A")
    assert not (live / "plots" / "metrics" / "iou" / "B.tsv").exists()     # None: not a number to plot
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == 2 and summary["val_miou"] == 0.25 and summary["iou"]["Background"] == 0.9
    assert not (tmp_path / "dvc.yaml").exists() and not (live / "dvc.yaml").exists()


def test_progress_summary_counts_members_and_shows_latest_miou():
    looks = [MemberLook("m-s0-f0", "done", {"step": 4, "val_miou": 0.61}),
             MemberLook("m-s0-f1", None, {"step": 1, "val_miou": 0.42345}),
             MemberLook("m-s0-f2", None, None),
             MemberLook("m-s0-f3", "failed", None)]
    p = summarise(looks, epochs=5)
    assert p.description == "1 done, 1 running, 1 left (1 failed)"
    assert p.percent == pytest.approx(100 * (2 + 2 / 5) / 4, abs=0.1)
    assert [(r["member"], r["state"], r["epoch"], r["val_miou"]) for r in p.rows] == [
        ("m-s0-f0", "done", "5/5", 0.61), ("m-s0-f1", "running", "2/5", 0.4234), ("m-s0-f2", "waiting", None, None),
        ("m-s0-f3", "failed", None, None)]
    assert summarise(looks[2:3], epochs=None).percent == 0.0
    assert summarise([MemberLook("a", "done", None)], epochs=None).description == "1 done, 0 running, 0 left"


def test_read_live_tolerates_missing_and_half_written_summaries(tmp_path):
    assert read_live(tmp_path / "absent") is None
    (tmp_path / "metrics.json").write_text('{"step": 3, "val_')     # caught while dvclive rewrites it
    assert read_live(tmp_path) is None
    (tmp_path / "metrics.json").write_text('{"step": 3, "val_miou": 0.5}')
    assert read_live(tmp_path) == {"step": 3, "val_miou": 0.5}


def test_member_curves_grow_while_it_trains_and_dvc_plots_reads_them(tmp_path):
    vdir = make_tiny(tmp_path)
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), vdir, tmp_path / "split")
    params = tmp_path / "params.yaml"
    epochs = 8
    params.write_text(yaml.safe_dump({
        "data": {"root": "unused", "classes": list(CLASSES)},
        "train": {"models": {"unet_r18": {"arch": "unet", "encoder": "resnet18"}}, "seeds": [0], "folds": [0],
                  "epochs": epochs, "batch_size": 4, "input_size": 32, "lr": 0.003, "weight_decay": 0.0,
                  "warmup_epochs": 1, "num_workers": 0, "threads": 1},
    }))
    out_dir = tmp_path / "run" / "unet_r18-s0-f0"
    live = live_dir(out_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.train", "--params", str(params), "--model", "unet_r18", "--seed", "0",
         "--fold", "0", "--validate", str(vdir), "--split", str(tmp_path / "split"), "--out-root",
         str(tmp_path / "run")], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    looks, deadline = [], time.monotonic() + 240
    try:
        while len(looks) < 2:          # two different looks at the live log, both before the member is published
            assert proc.poll() is None, f"training ended before two looks at its live log:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, "the live log did not grow in 240 s"
            summary = read_live(live)
            if summary is not None and not out_dir.exists() and (not looks or summary["step"] != looks[-1]["step"]):
                looks.append({**summary, "val_miou_rows": len(_steps(live, "val_miou"))})
            time.sleep(0.02)
    finally:
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert looks[0]["step"] < looks[1]["step"] and looks[0]["val_miou_rows"] < looks[1]["val_miou_rows"]

    # after the run: every epoch once, in the live folder and in the published member
    assert _steps(live, "val_miou") == list(range(epochs))
    assert (out_dir / "dvclive" / "metrics.json").read_text() == (live / "metrics.json").read_text()
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    shown = json.loads(subprocess.run([DVC, "plots", "show", "--json", str(live.relative_to(tmp_path) / "plots")],
                                      cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout)
    names = {Path(k).relative_to(live.relative_to(tmp_path) / "plots" / "metrics").as_posix() for k in shown["data"]}
    assert {"train_loss.tsv", "val_miou.tsv", "lr.tsv", "iou/Background.tsv"} <= names, sorted(names)
    values = shown["data"][str(live.relative_to(tmp_path) / "plots" / "metrics" / "val_miou.tsv")][0]["content"]
    assert [int(r["step"]) for r in values["data"]["values"]] == list(range(epochs))
