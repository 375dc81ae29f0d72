"""Faults around one training process: SIGKILL at random points, the S3 store gone mid-training and mid-upload,
a full disk during a checkpoint write, corrupt objects in the store, one member out of memory.

Real `python -m pipelines.train` processes against a real SeaweedFS this module can stop and restart."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from pipelines.train import CHECKPOINT_ENV, RESULT_ENV
from segpipe.storage import ArtifactStore
from tests.faults.conftest import train_cmd, train_params
from tests.faults.helpers import REPO, Row, assert_no_secrets, no_temp_leftovers, record, trainings, verify_prefix

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
    logs, redone, details = [], 0, []
    for k in range(kills):
        # each attempt spends its first ~10 s importing; later attempts have less left to do: kill early enough
        at = rng.uniform(0.1, 0.55) * ref_s
        proc = subprocess.Popen(train_cmd(params, tiny, tmp_path / "run"), env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(at)
        if proc.poll() is not None:
            logs.append(proc.stdout.read())
            details.append(f"kill {k + 1} at {at:.1f}s came after the run finished")
            break
        before = _mirrored_epochs(store, prefix)
        proc.send_signal(signal.SIGKILL)
        logs.append(proc.communicate()[0])
        after = _mirrored_epochs(store, prefix)
        if (tmp_path / "run" / MEMBER / "metrics.json").is_file():    # killed after its atomic publish: finished
            details.append(f"kill {k + 1} at {at:.1f}s came after the output was published")
            break
        assert not (tmp_path / "run" / MEMBER).exists(), "a killed run left a half-published output"
        shutil.rmtree(tmp_path / "run", ignore_errors=True)              # the machine is lost with its disk
        done = max(after, default=0)
        details.append(f"kill {k + 1} at {at:.1f}s, {done} epoch(s) mirrored")
        # the next attempt must restore exactly the newest mirrored epoch: nothing finished is lost
        redone += 1 if before == after else 0
    final = _run(train_cmd(params, tiny, tmp_path / "run"), env, tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    logs.append(final.stdout + final.stderr)
    metrics = json.loads((tmp_path / "run" / MEMBER / "metrics.json").read_text())
    mirrored = max((int(d.split(", ")[1].split()[0]) for d in details if "mirrored" in d), default=0)
    if details and "mirrored" in details[-1]:
        assert metrics["resumed_from_epoch"] == int(details[-1].split(", ")[1].split()[0]), details
    _same_weights(ref_best, tmp_path / "run" / MEMBER / "best.pt")
    assert store.list(f"{prefix}/") == []                             # resume state cleared once finished
    assert not no_temp_leftovers(tmp_path / "run")
    assert_no_secrets([weed_env["AWS_SECRET_ACCESS_KEY"], weed_env["AWS_ACCESS_KEY_ID"]], [tmp_path / "run"], logs)
    effective = sum("epoch(s) mirrored" in d for d in details)
    redo = (f"at most the epoch in flight and the one still being pushed, per kill (last resume from epoch "
            f"{metrics['resumed_from_epoch']}, {mirrored} max mirrored)")
    record(Row("1 SIGKILL training process at random points", "long" if kills > 1 else "short", effective,
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
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    published = (tmp_path / "run" / MEMBER / "metrics.json").is_file()
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    retry = _run(train_cmd(params, tiny, tmp_path / "run"), env, tmp_path)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert "restored" in retry.stderr
    m = json.loads((tmp_path / "run" / MEMBER / "metrics.json").read_text())
    assert m["resumed_from_epoch"] == 2 and m["best_epoch"] >= 0
    _same_weights(reference[0], tmp_path / "run" / MEMBER / "best.pt")
    record(Row("1b SIGKILL after the last epoch's checkpoint, disk lost", "short", 1,
               "completed; best.pt restored from the store, identical to the undisturbed run",
               "no epoch retrained (resumed at epoch 2 of 2); the OOF pass redone", "nothing",
               time.monotonic() - t0, ["killed before publishing" if not published else "killed after publishing"]))


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
    proc = subprocess.Popen(train_cmd(params, tiny, tmp_path / "out"), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not _mirrored_epochs(store, f"ckpt-{run}"):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint mirrored"
        time.sleep(0.2)
    down_at = time.monotonic()
    weed.outage(outage).join()
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-3000:]
    assert time.monotonic() - down_at >= outage
    assert "retry" in log and "SEGPIPE_S3_RETRY_SECONDS" in log        # it waited, saying which knob bounds it
    keys = verify_prefix(store, f"results-{run}")
    assert any(k.endswith("/DONE") for k in keys) and any(k.endswith("/best.pt") for k in keys)

    # (b) during an upload: a stage's outputs (several MB) stored while the store goes away mid-way
    from segpipe.storage import ArtifactStore as Store
    up_dir = tmp_path / "stage"
    for i in range(12):
        (up_dir / f"part{i:02d}").mkdir(parents=True, exist_ok=True)
        (up_dir / f"part{i:02d}" / "probs.npy").write_bytes(os.urandom(2 << 20))
    result: dict = {}

    def upload():
        try:
            result["keys"] = Store(weed.cfg, retry_seconds=outage + 60).upload_dir(up_dir, f"runs/{run}/infer")
        except Exception as e:          # noqa: BLE001 - reported below
            result["error"] = e
    import threading
    th = threading.Thread(target=upload)
    th.start()
    while len(store.list(f"runs/{run}/infer/")) < 3:
        time.sleep(0.05)
    weed.outage(outage).join()
    th.join(600)
    assert "error" not in result, result.get("error")
    keys = verify_prefix(store, f"runs/{run}/infer")
    assert len(keys) == 12 and len(result["keys"]) == 12
    for i in range(12):
        assert store.get_bytes(f"runs/{run}/infer/part{i:02d}/probs.npy") == \
            (up_dir / f"part{i:02d}" / "probs.npy").read_bytes()
    assert_no_secrets([weed_env["AWS_SECRET_ACCESS_KEY"]], [tmp_path / "out"], [log])
    record(Row("2 S3 stopped during training and during upload", "long" if outage > 10 else "short", 2,
               f"completed after a {outage}s outage each time; every object verified",
               f"none: {len(trainings(log))} training, the upload resumed file by file", "nothing",
               time.monotonic() - t0, [f"outage {outage}s (SIGKILL of weed, restarted on the same data dir)"]))


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
wait $pid; echo "rc=$?" >> '{tmp_path}/train.log'
rm -f '{resume}/filler'
mkdir -p '{keep}' && cp -a '{resume}/{MEMBER}/.' '{keep}/'
"""
    out = subprocess.run(["unshare", "-rm", "bash", "-c", script], env={**weed_env, CHECKPOINT_ENV: prefix},
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "train.log").read_text()
    assert out.returncode == 0, out.stderr + log[-3000:]
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
    record(Row("4 disk full during a checkpoint write", "short", 1,
               "failed with `No space left on device` naming the checkpoint; epoch-1 checkpoint intact",
               "the retry resumed from epoch 1: only the epoch in flight redone", "nothing", time.monotonic() - t0,
               ["a 400 MB tmpfs in a user+mount namespace (unshare -rm), filled with fallocate after epoch 1"]))
