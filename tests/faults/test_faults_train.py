"""Faults around one training process: SIGKILL at random points, the S3 store gone mid-training and mid-upload,
a full disk during a checkpoint write, corrupt objects in the store, one member out of memory.

Real `python -m pipelines.train` processes against a real SeaweedFS this module can stop and restart."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from pipelines.train import CHECKPOINT_ENV, RESULT_ENV
from segpipe.storage import ArtifactStore
from tests.faults.conftest import train_cmd, train_params
from tests.faults.helpers import (REPO, Row, assert_no_secrets, assert_nothing_stored_leaks, assert_sigkilled,
                                  epochs_run, no_temp_leftovers, record, trainings, verify_prefix)

SEED = int(os.environ.get("SEGPIPE_FAULT_SEED") or time.time()) % 100000
MEMBER = "unet_r18-s0-f0"


@pytest.fixture(scope="module")
def reference(tiny, weed, tmp_path_factory) -> tuple[Path, float]:
    """The undisturbed run (2 epochs, its own checkpoint prefix): its best.pt and how long it took."""
    out = tmp_path_factory.mktemp("reference")
    params = train_params(out / "params.yaml", epochs=2)
    env = {**os.environ, **weed.env(), "PYTHONPATH": str(REPO), CHECKPOINT_ENV: f"ref-{uuid.uuid4().hex[:8]}"}
    t0 = time.monotonic()
    ref = _run(train_cmd(params, tiny, out / "ref"), env, out)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return out / "ref" / MEMBER / "best.pt", time.monotonic() - t0


def _run(cmd, env, cwd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900, **kw)


def _same_weights(a: Path, b: Path) -> None:
    wa = torch.load(a, weights_only=False)["model"]
    wb = torch.load(b, weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=f"{k} differs between {a} and {b}")


RESUMED = re.compile(r"resuming from \S+ at epoch (\d+)")


def _resumed_at(text: str) -> int:
    """The 1-based epoch a training process started at: after the restored checkpoint, else 1."""
    m = RESUMED.search(text)
    return int(m.group(1)) if m else 1


def _mirrored_epochs(store: ArtifactStore, prefix: str) -> list[int]:
    return sorted(int(k.rsplit("-e", 1)[1].split(".")[0]) for k in store.list(f"{prefix}/") if "/last-e" in k)


@pytest.mark.long
@pytest.mark.parametrize("kills", [pytest.param(4, id="long")])
def test_01_training_sigkilled_at_random_points_ends_with_the_undisturbed_weights(tiny, tmp_path, weed_env, reference,
                                                                                 kills):
    """Scenario 1 (one process): SIGKILL at random moments, the machine's disk lost each time; the retries resume
    from the mirrored checkpoint and end with exactly the undisturbed run's weights."""
    t0 = time.monotonic()
    rng = random.Random(SEED)
    params = train_params(tmp_path / "params.yaml", epochs=2)
    from segpipe.storage import S3Config
    store = ArtifactStore(S3Config.from_env(weed_env))
    ref_best, ref_s = reference

    prefix = f"ckpt-{uuid.uuid4().hex[:8]}"
    env = {**weed_env, CHECKPOINT_ENV: prefix}
    logs, details, per_kill, scale, attempt = [], [], [], 1.0, 0
    mirrored_prev = 0                                          # what the next attempt must resume after
    while len(per_kill) < kills:
        attempt += 1
        assert attempt <= 3 * kills, f"only {len(per_kill)} of {kills} kills landed mid-training: {details}"
        # each attempt spends its first ~10 s importing; later attempts have less left to do: kill early enough
        at = rng.uniform(0.1, 0.55) * ref_s * scale
        log_path = tmp_path / f"attempt{attempt}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(train_cmd(params, tiny, tmp_path / "run"), env=env, cwd=tmp_path,
                                    stdout=log_file, stderr=subprocess.STDOUT, text=True)
        time.sleep(at)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
            assert_sigkilled(proc, f"attempt {attempt}")
        text = log_path.read_text()
        logs.append(text)
        assert not finished or proc.returncode == 0, text[-3000:]  # a run that ended on its own must have succeeded
        ran = epochs_run(text)
        if ran:                                                # resumed exactly after the newest mirrored epoch
            assert ran[0] == mirrored_prev + 1 == _resumed_at(text), (attempt, mirrored_prev, ran)
        if finished or (tmp_path / "run" / MEMBER / "metrics.json").is_file():
            # not a trial: the run was done (or published) before its kill; start over and kill earlier
            details.append(f"attempt {attempt}: finished before its kill at {at:.1f}s, not counted; next kill earlier")
            scale *= 0.5
            for k in store.list(f"{prefix}/"):
                store.delete(k)
            mirrored_prev = 0
            shutil.rmtree(tmp_path / "run", ignore_errors=True)
            continue
        assert not (tmp_path / "run" / MEMBER).exists(), "a killed run left a half-published output"
        shutil.rmtree(tmp_path / "run", ignore_errors=True)    # the machine is lost with its disk
        mirrored = max(_mirrored_epochs(store, prefix), default=0)
        lost = [e for e in ran if e > mirrored]                 # finished epochs the store did not get: redone
        assert len(lost) <= 1, f"kill {len(per_kill) + 1}: epochs {lost} finished but not mirrored"
        per_kill.append(len(lost))
        details.append(f"kill {len(per_kill)} at {at:.1f}s (exit -9): epochs run {ran}, {mirrored} mirrored, "
                       f"{len(lost)} finished epoch(s) to redo besides the one in flight")
        mirrored_prev = mirrored
    final = _run(train_cmd(params, tiny, tmp_path / "run"), env, tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    text = final.stdout + final.stderr
    logs.append(text)
    metrics = json.loads((tmp_path / "run" / MEMBER / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == mirrored_prev, (metrics, details)
    assert epochs_run(text) == list(range(mirrored_prev + 1, 3)), epochs_run(text)
    _same_weights(ref_best, tmp_path / "run" / MEMBER / "best.pt")
    assert store.list(f"{prefix}/") == []                             # resume state cleared once finished
    assert not no_temp_leftovers(tmp_path / "run")
    assert_no_secrets([weed_env["AWS_SECRET_ACCESS_KEY"], weed_env["AWS_ACCESS_KEY_ID"]], [tmp_path / "run"], logs)
    redo = (f"{sum(per_kill)} finished epoch(s) redone over {kills} kills (per kill {per_kill}, at most 1: the one "
            f"still being pushed) besides each epoch in flight; last resume from epoch {metrics['resumed_from_epoch']}")
    record(Row("1 SIGKILL training process at random points", "long" if kills > 1 else "short", len(per_kill),
               "completed; best.pt identical to the undisturbed run", redo, "nothing",
               time.monotonic() - t0, [f"seed {SEED}"] + details))


def test_01_killed_after_the_last_epoch_with_the_disk_lost_still_has_its_best_weights(tiny, tmp_path, weed_env,
                                                                                      reference):
    """Scenario 1, the worst moment: SIGKILL right after the last epoch's checkpoint is mirrored (the OOF pass),
    the disk lost. last.pt alone says 'all epochs done'; the best weights must come back from the store too."""
    t0 = time.monotonic()
    params = train_params(tmp_path / "params.yaml", epochs=2)
    from segpipe.storage import S3Config
    store = ArtifactStore(S3Config.from_env(weed_env))
    prefix = f"ckpt-{uuid.uuid4().hex[:8]}"
    env = {**weed_env, CHECKPOINT_ENV: prefix}
    proc = subprocess.Popen(train_cmd(params, tiny, tmp_path / "run"), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while 2 not in _mirrored_epochs(store, prefix):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the last checkpoint"
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before its kill: not a trial of this fault"
    proc.send_signal(signal.SIGKILL)
    assert_sigkilled(proc, "the training process")
    # the last push runs beside the OOF pass, so the kill may land before or after the local publish; either way the
    # disk is lost with it. It is a trial only if the process had not finished: its resume state is still stored
    assert 2 in _mirrored_epochs(store, prefix), "the run cleared its resume state before the kill: it had finished"
    published = (tmp_path / "run" / MEMBER / "metrics.json").is_file()
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    retry = _run(train_cmd(params, tiny, tmp_path / "run"), env, tmp_path)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert "restored" in retry.stderr
    m = json.loads((tmp_path / "run" / MEMBER / "metrics.json").read_text())
    assert m["resumed_from_epoch"] == 2 and m["best_epoch"] >= 0
    retrained = epochs_run(retry.stdout + retry.stderr)
    assert retrained == [], f"epochs {retrained} trained again after the last checkpoint was mirrored"
    _same_weights(reference[0], tmp_path / "run" / MEMBER / "best.pt")
    record(Row("1b SIGKILL after the last epoch's checkpoint, disk lost", "short", 1,
               "completed; best.pt restored from the store, identical to the undisturbed run",
               f"{len(retrained)} epochs retrained (resumed at epoch {m['resumed_from_epoch']} of 2); the OOF pass "
               "redone", "nothing", time.monotonic() - t0,
               [f"SIGKILL (exit -9) after epoch 2 was mirrored, {'after' if published else 'before'} the local "
                "publish, before the resume state was cleared"]))


@pytest.mark.parametrize("outage", [pytest.param(8, id="short"), pytest.param(60, marks=pytest.mark.long, id="long")])
def test_02_s3_stopped_during_training_and_upload(tiny, tmp_path, weed, weed_env, outage):
    """Scenario 2: the store is killed for `outage` s while a training task mirrors its checkpoints and while a
    finished member is stored; both wait with backoff, finish, and every stored object reads back verified."""
    t0 = time.monotonic()
    params = train_params(tmp_path / "params.yaml", epochs=2)
    run = uuid.uuid4().hex[:8]
    env = {**weed_env, CHECKPOINT_ENV: f"ckpt-{run}", RESULT_ENV: f"results-{run}"}
    store = ArtifactStore(weed.cfg)

    # (a) during training: stop the store as soon as the first checkpoint is mirrored
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(train_cmd(params, tiny, tmp_path / "out"), env=env, cwd=tmp_path, stdout=log_file,
                                stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not _mirrored_epochs(store, f"ckpt-{run}"):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint mirrored"
        time.sleep(0.2)
    seen: dict = {}

    def training_in_flight():
        # the store refuses connections (Weed.outage checked) while the process is alive and not yet finished
        seen["alive"], seen["log"] = proc.poll() is None, log_path.read_text()
    down_at = time.monotonic()
    weed.outage(outage, during=training_in_flight).join()
    assert seen["alive"] and "best val mIoU" not in seen["log"], "the training was over before the store went down"
    proc.wait(900)
    log = log_path.read_text()
    assert proc.returncode == 0, log[-3000:]
    assert time.monotonic() - down_at >= outage
    retries = [ln for ln in log.splitlines() if "retry" in ln and "SEGPIPE_S3_RETRY_SECONDS" in ln]
    assert retries, log[-3000:]                          # it hit the outage and waited, naming the knob that bounds it
    assert trainings(log) == [MEMBER] and epochs_run(log) == [1, 2], log[-3000:]     # nothing retrained
    keys = verify_prefix(store, f"results-{run}")
    assert any(k.endswith("/DONE") for k in keys) and any(k.endswith("/best.pt") for k in keys)

    # (b) during an upload: a stage's outputs (several MB) stored while the store goes away mid-way
    up_dir = tmp_path / "stage"
    for i in range(12):
        (up_dir / f"part{i:02d}").mkdir(parents=True, exist_ok=True)
        (up_dir / f"part{i:02d}" / "probs.npy").write_bytes(os.urandom(2 << 20))
    result: dict = {}
    # 12 x 2 MB over loopback can finish before a SIGKILL lands; the parts after the third wait at a gate that
    # opens once the store is down, so the outage falls inside the upload on any machine (the retries are real)
    gate = threading.Event()

    class GatedStore(ArtifactStore):
        def put_file(self, path, key, **kw):
            if Path(path).parent.name >= "part03":
                gate.wait(300)
            return super().put_file(path, key, **kw)

    def upload():
        try:
            result["keys"] = GatedStore(weed.cfg, retry_seconds=outage + 60).upload_dir(up_dir, f"runs/{run}/infer")
        except Exception as e:          # noqa: BLE001 - reported below
            result["error"] = e
    th = threading.Thread(target=upload)
    th.start()
    while len(stored_before := store.list(f"runs/{run}/infer/")) < 3:
        time.sleep(0.05)

    def upload_in_flight():
        seen["uploading"] = th.is_alive() and "keys" not in result and "error" not in result
        gate.set()                      # the held parts now meet the dead store
    try:
        weed.outage(outage, during=upload_in_flight).join()
    finally:
        gate.set()
    assert seen["uploading"] and len(stored_before) < 12, "the upload was over before the store went down"
    th.join(600)
    assert "error" not in result, result.get("error")
    keys = verify_prefix(store, f"runs/{run}/infer")
    assert len(keys) == 12 and len(result["keys"]) == 12
    for i in range(12):
        assert store.get_bytes(f"runs/{run}/infer/part{i:02d}/probs.npy") == \
            (up_dir / f"part{i:02d}" / "probs.npy").read_bytes()
    assert_no_secrets([weed_env["AWS_SECRET_ACCESS_KEY"]], [tmp_path / "out"], [log])
    scans = assert_nothing_stored_leaks([weed_env["AWS_SECRET_ACCESS_KEY"], weed_env["AWS_ACCESS_KEY_ID"]],
                                        s3=weed.cfg)
    record(Row("2 S3 stopped during training and during upload", "long" if outage > 10 else "short", 2,
               f"completed after a {outage}s outage each time; every object verified",
               f"none: {len(trainings(log))} training, epochs {epochs_run(log)} each once; the upload had "
               f"{len(stored_before)} of 12 files stored at the outage and finished the rest", "nothing",
               time.monotonic() - t0,
               [f"outage {outage}s (SIGKILL of weed, port refused, restarted on the same data dir)",
                f"{len(retries)} retry log line(s) during training"] + [sc.summary() for sc in scans]))


def test_04_disk_full_during_a_checkpoint_write(tiny, tmp_path, weed_env):
    """Scenario 4: the training's checkpoint dir is a real 400 MB tmpfs (user + mount namespace, no root); it is
    filled up after epoch 1's checkpoint. The error says the disk is full and what to do; epoch 1's checkpoint is
    intact (locally and in S3) and a retry with space resumes from it."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged user+mount namespaces here: cannot make a small filesystem without root")
    t0 = time.monotonic()
    params = train_params(tmp_path / "params.yaml", epochs=2)
    prefix = f"ckpt-{uuid.uuid4().hex[:8]}"
    resume = tmp_path / "out" / ".resume"             # where the train stage keeps its checkpoints
    resume.mkdir(parents=True)
    keep = tmp_path / "kept"
    cmd = " ".join(f"'{c}'" for c in train_cmd(params, tiny, tmp_path / "out"))
    script = f"""
set -u
mount -t tmpfs -o size=400m tmpfs '{resume}'
{cmd} > '{tmp_path}/train.log' 2>&1 &
pid=$!
while [ ! -f '{resume}/{MEMBER}/last.pt' ]; do kill -0 $pid 2>/dev/null || break; sleep 0.05; done
# full: whatever is left now is taken by one file, so the next checkpoint write hits ENOSPC
fallocate -l $(( $(stat -f -c '%a*%S' '{resume}') - 4096 )) '{resume}/filler' 2>/dev/null \
  || dd if=/dev/zero of='{resume}/filler' bs=64k 2>/dev/null
echo "alive=$(kill -0 $pid 2>/dev/null && echo 1 || echo 0) free=$(( $(stat -f -c '%a*%S' '{resume}') ))" \
  > '{tmp_path}/fill.txt'
wait $pid; echo "rc=$?" >> '{tmp_path}/train.log'
rm -f '{resume}/filler'
mkdir -p '{keep}' && cp -a '{resume}/{MEMBER}/.' '{keep}/'
"""
    out = subprocess.run(["unshare", "-rm", "bash", "-c", script], env={**weed_env, CHECKPOINT_ENV: prefix},
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "train.log").read_text()
    assert out.returncode == 0, out.stderr + log[-3000:]
    fill = dict(kv.split("=") for kv in (tmp_path / "fill.txt").read_text().split())
    assert fill["alive"] == "1" and int(fill["free"]) < 1 << 20, fill    # full while the training was running
    assert "rc=1" in log, log[-3000:]                       # failed, not killed by a signal, not "finished"
    assert "No space left" in log and "disk" in log.lower(), log[-2000:]
    assert "Traceback" not in log, log[-3000:]               # one clear message, not a traceback wall
    state = torch.load(keep / "last.pt", weights_only=False)     # the previous checkpoint is intact
    assert state["epoch"] == 0
    assert not no_temp_leftovers(keep), list(keep.iterdir())
    assert not (tmp_path / "out" / MEMBER).exists()
    from segpipe.storage import S3Config
    store = ArtifactStore(S3Config.from_env(weed_env))
    assert verify_prefix(store, prefix)                      # the mirrored copy too
    shutil.copytree(keep, resume / MEMBER)                 # the same disk, with space again
    retry = _run(train_cmd(params, tiny, tmp_path / "out"), {**weed_env, CHECKPOINT_ENV: prefix}, tmp_path)
    assert retry.returncode == 0, retry.stderr[-3000:]
    m = json.loads((tmp_path / "out" / MEMBER / "metrics.json").read_text())
    assert m["resumed_from_epoch"] == 1
    redone = epochs_run(retry.stdout + retry.stderr)
    assert redone == [2], redone                             # only the epoch whose checkpoint hit ENOSPC
    record(Row("4 disk full during a checkpoint write", "short", 1,
               "failed with `No space left on device` naming the checkpoint; epoch-1 checkpoint intact",
               f"the retry resumed from epoch {m['resumed_from_epoch']} and trained epoch(s) {redone}: only the "
               "epoch in flight redone", "nothing", time.monotonic() - t0,
               ["a 400 MB tmpfs in a user+mount namespace (unshare -rm), filled with fallocate after epoch 1 "
                f"({int(fill['free']):,} bytes free while training)"]))
