"""ArtifactStore against the real local SeaweedFS (`s3` fixture): checksums, write-once keys, errors."""

from __future__ import annotations

import hashlib
import secrets
import time

import pytest

from conftest import free_port
from segpipe.storage import (
    ArtifactExistsError,
    ArtifactStore,
    CorruptArtifactError,
    S3Config,
    StorageError,
)

pytestmark = pytest.mark.services


@pytest.fixture
def store(s3) -> ArtifactStore:
    # a fresh prefix per test: keys are write-once, tests must not see each other's objects
    return ArtifactStore(s3, prefix=f"test/{secrets.token_hex(4)}", retry_seconds=5)


def test_round_trip_records_and_verifies_sha256(store, s3, tmp_path):
    data = secrets.token_bytes(10_000)
    src = tmp_path / "ckpt.pt"
    src.write_bytes(data)
    uri = store.put_file(src, "train/ckpt.pt")
    assert uri == f"s3://{s3.bucket}/{store.prefix}/train/ckpt.pt"
    head = s3.client().head_object(Bucket=s3.bucket, Key=f"{store.prefix}/train/ckpt.pt")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("train/ckpt.pt") == data
    out = store.get_file("train/ckpt.pt", tmp_path / "dl" / "ckpt.pt")
    assert out.read_bytes() == data
    assert not list((tmp_path / "dl").glob("*.part"))       # temp files replaced, not left behind
    assert store.exists("train/ckpt.pt") and not store.exists("train/nope.pt")
    assert store.list("train") == ["train/ckpt.pt"]


def test_conditional_write_refuses_different_content_accepts_identical_retry(store):
    store.put_bytes(b"run-1", "report.json")
    assert store.put_bytes(b"run-1", "report.json").endswith("report.json")   # idempotent retry
    with pytest.raises(ArtifactExistsError, match="report.json"):
        store.put_bytes(b"run-2", "report.json")
    assert store.get_bytes("report.json") == b"run-1"
    store.put_bytes(b"run-2", "report.json", overwrite=True)
    assert store.get_bytes("report.json") == b"run-2"


def test_multipart_upload_keeps_sha256_and_is_conditional(s3, tmp_path):
    store = ArtifactStore(s3, prefix=f"test/{secrets.token_hex(4)}", retry_seconds=5,
                          multipart_threshold=5 * 1024 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(secrets.token_bytes(11 * 1024 * 1024))
    store.put_file(big, "big.bin")
    head = s3.client().head_object(Bucket=s3.bucket, Key=f"{store.prefix}/big.bin")
    assert "-" in head["ETag"]                                 # really multipart
    assert head["Metadata"]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    store.put_file(big, "big.bin")                             # same content: no-op
    other = tmp_path / "other.bin"
    other.write_bytes(secrets.token_bytes(6 * 1024 * 1024))
    with pytest.raises(ArtifactExistsError):
        store.put_file(other, "big.bin")
    assert store.get_file("big.bin", tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_corrupt_object_detected_on_read(store, s3, tmp_path):
    s3.client().put_object(Bucket=s3.bucket, Key=f"{store.prefix}/probs.npy", Body=b"tampered",
                           Metadata={"sha256": hashlib.sha256(b"original").hexdigest()})
    with pytest.raises(CorruptArtifactError, match="probs.npy"):
        store.get_bytes("probs.npy")
    target = tmp_path / "probs.npy"
    with pytest.raises(CorruptArtifactError):
        store.get_file("probs.npy", target)
    assert not target.exists() and not list(tmp_path.iterdir())   # nothing half-written


def test_upload_dir_download_dir(store, tmp_path):
    src = tmp_path / "src"
    (src / "fold0").mkdir(parents=True)
    (src / "fold0" / "model.pt").write_bytes(b"m0")
    (src / "metrics.json").write_text('{"miou": 0.5}')
    keys = store.upload_dir(src, "runs/r1")
    assert keys == ["runs/r1/fold0/model.pt", "runs/r1/metrics.json"]
    assert store.upload_dir(src, "runs/r1") == keys             # a retried task succeeds
    dst = tmp_path / "dst"
    store.download_dir("runs/r1", dst)
    assert (dst / "fold0" / "model.pt").read_bytes() == b"m0"
    assert (dst / "metrics.json").read_text() == '{"miou": 0.5}'


def test_wrong_credentials_say_what_to_check(s3):
    bad = S3Config(s3.endpoint_url, s3.access_key, "wrong" + s3.secret_key[5:], s3.bucket)
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        ArtifactStore(bad, retry_seconds=2).check()
    unknown = S3Config(s3.endpoint_url, "AKNOBODY", s3.secret_key, s3.bucket)
    with pytest.raises(StorageError, match="refused the credentials"):
        ArtifactStore(unknown, retry_seconds=2).check()


def test_missing_bucket_says_what_to_do(s3):
    cfg = S3Config(s3.endpoint_url, s3.access_key, s3.secret_key, "no-such-bucket")
    with pytest.raises(StorageError, match="segpipe stack up"):
        ArtifactStore(cfg, retry_seconds=2).check()


def test_unreachable_endpoint_retries_then_says_what_to_do(s3):
    cfg = S3Config(f"http://127.0.0.1:{free_port()}", s3.access_key, s3.secret_key, s3.bucket)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="segpipe stack up") as e:
        ArtifactStore(cfg, retry_seconds=1.5).check()
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 10, elapsed                         # it retried, within the budget
    assert "attempts" in str(e.value)


def test_secret_never_in_repr_or_errors(s3):
    store = ArtifactStore(s3, retry_seconds=1)
    assert s3.secret_key not in repr(store)
    bad = S3Config(f"http://127.0.0.1:{free_port()}", s3.access_key, s3.secret_key, s3.bucket)
    with pytest.raises(StorageError) as e:
        ArtifactStore(bad, retry_seconds=0.5).check()
    assert s3.secret_key not in str(e.value)
