"""Faults around the services: corrupt objects in the store, racing writers, a flaky leaderboard, bad credentials,
one member out of memory, bad inputs. Real SeaweedFS, a real leaderboard server, a real Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import yaml
from botocore.exceptions import ClientError

from pipelines.train import CHECKPOINT_ENV, RESULT_ENV
from segpipe.storage import ArtifactExistsError, ArtifactStore, S3Config, StorageError
from tests.faults.conftest import train_cmd, train_params
from tests.faults.helpers import (REPO, FaultProxy, Row, _listening, assert_no_secrets, assert_nothing_stored_leaks,
                                  assert_sigkilled, epochs_run, record, trainings, verify_prefix)


def _run(cmd, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def _flip(store: ArtifactStore, key: str) -> None:
    """Flip bytes in the middle of an object, keeping its recorded sha256 (bit rot, a bad disk, a torn copy)."""
    c, b = store._client, store.cfg.bucket
    head = c.head_object(Bucket=b, Key=key)
    data = bytearray(c.get_object(Bucket=b, Key=key)["Body"].read())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    c.put_object(Bucket=b, Key=key, Body=bytes(data), Metadata=head["Metadata"])


# ---------------------------------------------------------------------------------------------- 5 corrupt objects
def test_05_corrupt_probability_file_in_s3_reruns_only_the_affected_task(tiny, tmp_path, weed, weed_env):
    """Scenario 5: two stored members; one's OOF probabilities get flipped bytes. The rerun detects it by checksum,
    retrains that member only and reuses the other."""
    t0 = time.monotonic()
    params = train_params(tmp_path / "params.yaml", epochs=1)
    run = uuid.uuid4().hex[:8]
    env = {**weed_env, RESULT_ENV: f"results-{run}"}
    store = ArtifactStore(weed.cfg)
    logs = []
    for fold in (0, 1):
        out = _run(train_cmd(params, tiny, tmp_path / "first", fold), env, tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        logs.append(out.stdout + out.stderr)
    assert sorted(trainings("".join(logs))) == ["unet_r18-s0-f0", "unet_r18-s0-f1"]
    victim = next(k for k in store.list(f"results-{run}/") if "unet_r18-s0-f1/" in k and k.endswith("oof.npz"))
    _flip(store, victim)
    with pytest.raises(StorageError, match="corrupt"):          # the stored bytes no longer match their sha256
        store.get_bytes(victim)
    with pytest.raises(StorageError, match="corrupt"):
        verify_prefix(store, f"results-{run}")                  # the walk sees it too
    second = []
    for fold in (0, 1):
        out = _run(train_cmd(params, tiny, tmp_path / "second", fold), env, tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        second.append(out.stdout + out.stderr)
    text = "".join(second)
    assert "is corrupt" in text and "training again" in text
    retrained = trainings(text)
    assert retrained == ["unet_r18-s0-f1"]                      # only the affected member trained again
    assert "unet_r18-s0-f0: unchanged inputs, params and code; reused" in text
    verify_prefix(store, f"results-{run}")                      # the retrained member replaced the damaged copy
    for fold in (0, 1):
        a = np.load(tmp_path / "first" / f"unet_r18-s0-f{fold}" / "oof.npz")["probs"]
        b = np.load(tmp_path / "second" / f"unet_r18-s0-f{fold}" / "oof.npz")["probs"]
        np.testing.assert_array_equal(a, b)                     # CPU: the rerun is bit-identical

    assert_no_secrets([weed_env["AWS_SECRET_ACCESS_KEY"]], [tmp_path], [text])
    scans = assert_nothing_stored_leaks([weed_env["AWS_SECRET_ACCESS_KEY"], weed_env["AWS_ACCESS_KEY_ID"]],
                                        s3=weed.cfg)
    record(Row("5 corrupt probability file in S3 (result cache)", "short", 1,
               "detected by sha256 on read; the affected member retrained, the other reused",
               f"{len(retrained)} of 2 members ({', '.join(retrained)}, the corrupt one)", "nothing",
               time.monotonic() - t0,
               [f"flipped 16 bytes of {victim.split('/', 1)[1]}"] + [sc.summary() for sc in scans]))


@pytest.mark.long
def test_05_corrupt_mirrored_checkpoint_is_discarded_never_resumed(tiny, tmp_path, weed, weed_env):
    """Scenario 5b: a flipped mirrored checkpoint is discarded with a warning; the task trains from the start."""
    t0 = time.monotonic()
    run = uuid.uuid4().hex[:8]
    store = ArtifactStore(weed.cfg)
    params2 = train_params(tmp_path / "params2.yaml", epochs=2)
    prefix = f"ckpt-{run}"
    proc = subprocess.Popen(train_cmd(params2, tiny, tmp_path / "third"), env={**weed_env, CHECKPOINT_ENV: prefix},
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not [k for k in store.list(f"{prefix}/") if "/last-e" in k]:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its kill"
    proc.kill()
    assert_sigkilled(proc, "the training process")
    ckpt = sorted(k for k in store.list(f"{prefix}/") if "/last-e" in k)[-1]
    _flip(store, ckpt)
    with pytest.raises(StorageError, match="corrupt"):          # the fault is in place before the rerun
        store.get_bytes(ckpt)
    import shutil
    shutil.rmtree(tmp_path / "third")
    out = _run(train_cmd(params2, tiny, tmp_path / "third"), {**weed_env, CHECKPOINT_ENV: prefix}, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "is corrupt" in out.stderr and "discarding it" in out.stderr
    assert json.loads((tmp_path / "third" / "unet_r18-s0-f0" / "metrics.json").read_text())["resumed_from_epoch"] == 0
    ran = epochs_run(out.stdout + out.stderr)
    assert ran == [1, 2], ran                                   # all epochs, from the start
    lost = int(ckpt.rsplit("-e", 1)[1].split(".")[0])
    assert_no_secrets([weed_env["AWS_SECRET_ACCESS_KEY"]], [tmp_path], [out.stderr])
    record(Row("5b corrupt mirrored checkpoint in S3", "long", 1,
               "detected by sha256 on restore, discarded, never resumed from; the task trained from epoch 0 and "
               "finished", f"{lost} epoch(s) the corrupt checkpoint held (the rerun trained epochs {ran})", "nothing",
               time.monotonic() - t0, [f"flipped 16 bytes of {ckpt.split('/', 1)[1]} after a SIGKILL (exit -9)"]))


# ---------------------------------------------------------------------------------------------- 6 racing writers
def test_06_seaweedfs_honours_if_none_match_and_racing_writers_never_overwrite(weed):
    """Scenario 6 (short): the store itself refuses a second create (412), for single PUTs and multipart; eight
    writers racing for one key: exactly one wins, the others are told, the stored bytes are the winner's."""
    t0 = time.monotonic()
    cfg = weed.cfg
    raw = boto3.client("s3", endpoint_url=cfg.endpoint_url, aws_access_key_id=cfg.access_key,
                       aws_secret_access_key=cfg.secret_key, region_name="us-east-1")
    key = f"race/{uuid.uuid4().hex}"
    raw.put_object(Bucket=cfg.bucket, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        raw.put_object(Bucket=cfg.bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert raw.get_object(Bucket=cfg.bucket, Key=key)["Body"].read() == b"first"
    mp = raw.create_multipart_upload(Bucket=cfg.bucket, Key=key)
    part = raw.upload_part(Bucket=cfg.bucket, Key=key, UploadId=mp["UploadId"], PartNumber=1, Body=b"x" * 1024)
    with pytest.raises(ClientError) as e:
        raw.complete_multipart_upload(Bucket=cfg.bucket, Key=key, UploadId=mp["UploadId"], IfNoneMatch="*",
                                      MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert raw.get_object(Bucket=cfg.bucket, Key=key)["Body"].read() == b"first"

    trials, writers = 5, 8
    for t in range(trials):
        key = f"race/{uuid.uuid4().hex}/best.pt"
        barrier, outcome = threading.Barrier(writers), {}

        def write(i):
            store = ArtifactStore(cfg)
            barrier.wait()
            try:
                store.put_bytes(f"writer {i} ".encode() * 1000, key)
                outcome[i] = "won"
            except ArtifactExistsError:
                outcome[i] = "refused"
        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        winners = [i for i, o in outcome.items() if o == "won"]
        assert len(winners) == 1 and len(outcome) == writers, outcome
        assert ArtifactStore(cfg).get_bytes(key) == f"writer {winners[0]} ".encode() * 1000
    record(Row("6 racing writers on one key (conditional writes)", "short", trials,
               f"SeaweedFS answers 412 to If-None-Match (PUT and multipart complete); of {writers} racing writers "
               "exactly one won each time, the rest got ArtifactExistsError", "none", "nothing",
               time.monotonic() - t0))


# ---------------------------------------------------------------------------------------------- 7 flaky leaderboard
def test_07_leaderboard_unreachable_slow_or_500_is_retried_without_a_duplicate_and_4xx_is_not(board, tmp_path):
    """Scenario 7: the submit stage through a proxy that refuses connections for a while, answers late (after the
    server acted), or answers 500; each file ends as exactly one submission. A 401 and a 429 are not retried."""
    from pipelines.submit import run as submit
    from segpipe.config import DataParams, SubmitParams, TRASH_CLASSES
    from segpipe.leaderboard import LeaderboardAuthError, LeaderboardClient, SubmissionRefused
    from test_leaderboard import CID, KEYS
    t0 = time.monotonic()
    names, labels = board["names"], board["labels"]
    proxy = FaultProxy(board["server"].url)
    data = DataParams(root="unused", classes=TRASH_CLASSES)
    direct = {who: LeaderboardClient(board["server"].url, CID, KEYS[who]) for who in KEYS}
    cases = {"down": "alice", "slow": "bob", "500": "carol"}
    results, details = {}, []
    for i, (fault, who) in enumerate(cases.items()):
        infer = tmp_path / fault / "infer"
        infer.mkdir(parents=True)
        masks = labels.copy()
        masks[:, : 16 * (i + 1)] = 0                       # a different file per case
        np.save(infer / "test_masks.npy", masks)
        (infer / "test_index.json").write_text(json.dumps({"file_names": names}))
        params = SubmitParams(description=f"fault {fault}", base_url=proxy.url, competition_id=CID, wait_seconds=30,
                              poll_seconds=0.2, ledger=str(tmp_path / fault / "ledger.json"), allow_last_slot=True)
        seen_before = proxy.count("presigned_url")
        if fault == "down":
            proxy.down()
            assert not _listening(proxy.port), "the proxy still accepts connections while 'down'"
            threading.Timer(4.0, proxy.up).start()        # back after 4 s; the client's backoff is 1, 2, 4, 8 s
        elif fault == "slow":
            proxy.fault("presigned_url", "slow:3")         # the server acts, the answer comes 3 s late (after
            import pipelines.submit as stage               # the client's timeout): the retry must not double it
            orig = stage.LeaderboardClient

            class ShortTimeout(orig):
                def __init__(self, *a, **kw):
                    super().__init__(*a, **{**kw, "timeout": 1.5})
            stage.LeaderboardClient = ShortTimeout
        else:
            proxy.fault("presigned_url", 500, 2)
        first_seen = len(proxy.seen)
        t_submit = time.monotonic()
        try:
            res = submit(params, data, infer, tmp_path / fault / "out", key=KEYS[who], hyperparameters={},
                         run_name=f"fault-{fault}")
        finally:
            if fault == "slow":
                stage.LeaderboardClient = orig
        took = time.monotonic() - t_submit
        asked = proxy.count("presigned_url") - seen_before
        # the fault was met: the client waited out the refusal, or the injected answers were all served
        if fault == "down":          # refused until the proxy came back 4 s in (backoff 1 + 2 s), then answered
            assert took >= 3.0 and len(proxy.seen) > first_seen, f"{took:.1f}s: it never met the refused connection"
        else:
            assert all(r[2] == 0 for r in proxy.rules), f"{fault}: injected answers left unused: {proxy.rules}"
            if fault == "slow":      # the late answer outlived the client's 1.5 s timeout
                assert took >= 1.5 and asked >= 1, (took, asked)
            else:                    # two 500s, then the answer
                assert asked >= 3, f"{fault}: {asked} presigned_url requests"
        proxy.rules.clear()
        details.append(f"{fault}: {took:.1f}s, {asked} presigned_url request(s) through the proxy")
        results[fault] = res
        assert res.status == "scored", res
        subs = direct[who].submissions()
        assert len(subs) == 1, f"{fault}: {len(subs)} submissions for one file"
        assert direct[who].limits().used_today == 1
        # run again (a retried task): the ledger answers, no new slot
        again = submit(params, data, infer, tmp_path / fault / "out2", key=KEYS[who], hyperparameters={})
        assert again.reused and again.submission_id == res.submission_id
        assert direct[who].limits().used_today == 1

    before = proxy.count("limits")
    with pytest.raises(LeaderboardAuthError, match="401"):
        LeaderboardClient(proxy.url, CID, "not-a-key", retries=3, backoff_s=0.01).limits()
    proxy.fault("limits", 429)
    with pytest.raises(SubmissionRefused, match="429"):
        LeaderboardClient(proxy.url, CID, KEYS["dave"], retries=3, backoff_s=0.01).limits()
    assert proxy.count("limits") == before + 2              # each 4xx asked once, never retried
    proxy.close()
    server_log = (board["root"] / "server.log").read_text()
    assert_no_secrets(list(KEYS.values()), [tmp_path], [server_log])
    record(Row("7 leaderboard unreachable / slow / 500 during submission", "short", 3,
               "each file scored as exactly one submission (one slot); a rerun reused it; 401 and 429 asked once",
               "none", "nothing", time.monotonic() - t0,
               ["unreachable 4 s (connection refused)", "answer 3 s late after the server acted (client timeout "
                "1.5 s)", "two 500s"] + details))


