"""ArtifactStore under real faults: a TCP proxy in front of the real local SeaweedFS cuts a download mid-body,
answers as a full store does, or fails a multipart upload's abort; plus stale uploads, keys that would escape the
download folder, and checkpoints that must not be unpickled unverified.

The faults are real bytes on a real socket (not a patched botocore stream): urllib3 and botocore then raise
exactly what they raise on a broken network or a full store, so a change in either library that the store's
error policy does not cover shows up here.
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch

from segpipe.storage import (
    ArtifactStore,
    S3Config,
    StorageError,
    StorageFullError,
    UnsafeKeyError,
    UnverifiedArtifactError,
    local_path,
)

pytestmark = pytest.mark.services

MiB = 1024 * 1024


# ---- the proxy -----------------------------------------------------------------------------------------------


@dataclass
class Rule:
    method: str
    target: str                      # a substring of the request target (path and query)
    times: int                       # how many matching requests it still applies to
    cut_after: int | None = None     # cut the response after this many body bytes ...
    how: str = "reset"               # ... with a TCP reset, or a clean early EOF ("eof")
    status: int | None = None        # or answer this status with an S3 error body, without asking the store
    code: str = ""
    message: str = ""
    body: bytes | None = None        # (or with this body instead)
    rewrite: Callable[[bytes], bytes] | None = None     # or pass the store's answer through this


class FaultProxy:
    """One connection per request (it asks the store for `Connection: close`); each request is forwarded as it
    is unless a rule matches it."""

    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def add(self, **rule) -> None:
        with self.lock:
            self.rules.append(Rule(**rule))

    def count(self, method: str, target: str) -> int:
        with self.lock:
            return sum(m == method and target in t for m, t in self.seen)

    def close(self) -> None:
        self.server.close()

    def _rule(self, method: str, target: str) -> Rule | None:
        with self.lock:
            self.seen.append((method, target))
            for r in self.rules:
                if r.times > 0 and r.method == method and r.target in target:
                    r.times -= 1
                    return r
        return None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            head, rest = _read_head(client)
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            rule = self._rule(method, target)
            if rule is not None and rule.status is not None:
                if headers.get("expect", "").lower() != "100-continue":     # read the body the client sends
                    _drain(client, int(headers.get("content-length", 0)) - len(rest))
                client.sendall(_answer(rule.status, rule.body) if rule.body is not None else
                               _s3_error(rule.status, rule.code, rule.message))
                return
            upstream = socket.create_connection(self.upstream)
            kept = [ln for ln in lines[1:] if ln and not ln.lower().startswith("connection:")]
            upstream.sendall("\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1") + rest)
            threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
            if rule is None:
                _pipe(upstream, client)
            elif rule.rewrite is not None:
                answer = _read_all(upstream)
                rhead, body = answer.split(b"\r\n\r\n", 1)
                body = rule.rewrite(body)
                rlines = [ln for ln in rhead.split(b"\r\n") if not ln.lower().startswith(b"content-length:")]
                client.sendall(b"\r\n".join([*rlines, b"Content-Length: %d" % len(body), b"", b""]) + body)
            else:
                rhead, body = _read_head(upstream)
                client.sendall(rhead + body[:rule.cut_after])
                sent = min(len(body), rule.cut_after)
                while sent < rule.cut_after:
                    chunk = upstream.recv(min(65536, rule.cut_after - sent))
                    if not chunk:
                        break
                    client.sendall(chunk)
                    sent += len(chunk)
                if rule.how == "reset":     # RST instead of FIN: the reader sees ECONNRESET
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.shutdown(socket.SHUT_RD)     # wakes the other thread's recv, so the close really closes
                else:
                    client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            client.close()
            if upstream is not None:
                upstream.close()


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    """(the header block with its blank line, bytes read past it); (None, b"") if the peer closed first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head + b"\r\n\r\n", rest


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _drain(sock: socket.socket, n: int) -> None:
    while n > 0 and (chunk := sock.recv(min(n, 65536))):
        n -= len(chunk)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass


def _s3_error(status: int, code: str, message: str) -> bytes:
    return _answer(status, (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                            f"<Message>{message}</Message><RequestId>fault</RequestId></Error>").encode())


def _answer(status: int, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status} Fault\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture
def proxy(s3):
    p = FaultProxy(s3.endpoint_url)
    yield p
    p.close()


@pytest.fixture
def prefix() -> str:
    return f"test/{secrets.token_hex(4)}"


def through(proxy: FaultProxy, s3: S3Config, prefix: str, **kw) -> ArtifactStore:
    """The store as a client sees it through the proxy."""
    return ArtifactStore(S3Config(proxy.endpoint, s3.access_key, s3.secret_key, s3.bucket), prefix, **kw)


def open_uploads(s3: S3Config, prefix: str) -> list[str]:
    return [u["Key"] for u in s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix=f"{prefix}/")
            .get("Uploads", [])]


# ---- 1. a download that breaks mid-body ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["reset", "eof"])
def test_a_download_cut_mid_body_is_read_again_and_verified(s3, proxy, prefix, tmp_path, how):
    data = secrets.token_bytes(3 * MiB)
    ArtifactStore(s3, prefix).put_bytes(data, "train/last.pt")
    proxy.add(method="GET", target="train/last.pt", times=1, cut_after=MiB, how=how)
    store = through(proxy, s3, prefix, retry_seconds=20)
    out = store.get_file("train/last.pt", tmp_path / "dl" / "last.pt")
    assert out.read_bytes() == data
    assert proxy.count("GET", "train/last.pt") == 2                # it was cut, and read again
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["last.pt"]


def test_a_download_that_keeps_breaking_fails_naming_the_key_and_writes_nothing(s3, proxy, prefix, tmp_path):
    # no recorded sha256 (written by another tool): only the length check stands between it and a short file
    s3.client().put_object(Bucket=s3.bucket, Key=f"{prefix}/probs.npy", Body=secrets.token_bytes(2 * MiB))
    proxy.add(method="GET", target="probs.npy", times=1000, cut_after=MiB // 2, how="eof")
    store = through(proxy, s3, prefix, retry_seconds=1.5)
    with pytest.raises(StorageError, match=r"download of get probs\.npy broke off mid-body .* after 524288 of "
                                           r"2097152 bytes"):
        store.get_file("probs.npy", tmp_path / "dl" / "probs.npy")
    assert proxy.count("GET", "probs.npy") >= 2
    assert not (tmp_path / "dl").exists() or not list((tmp_path / "dl").iterdir())
    with pytest.raises(StorageError, match="probs.npy"):
        store.get_bytes("probs.npy")


# ---- 2. a full store -----------------------------------------------------------------------------------------

# what stores answer when out of space or quota (MinIO measured by others, Ceph RGW and CSC Allas documented)
FULL = [
    (507, "XMinioStorageFull", "Storage backend has reached its minimum free drive threshold. Please delete a few "
                               "objects to proceed."),
    (400, "XMinioAdminBucketQuotaExceeded", "Bucket quota exceeded"),
    (403, "QuotaExceeded", ""),
    (400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed object size."),
    (507, "InsufficientStorage", ""),
]


@pytest.mark.parametrize("status,code,message", FULL, ids=[c for _, c, _ in FULL])
def test_a_full_store_is_reported_full_at_once(s3, proxy, prefix, status, code, message):
    proxy.add(method="PUT", target="metrics.json", times=1000, status=status, code=code, message=message)
    store = through(proxy, s3, prefix, retry_seconds=30)
    t0 = time.monotonic()
    with pytest.raises(StorageFullError, match=rf"storage full: .* refused put runs/r1/metrics\.json .*{code}"
                                               r".*Free space in the store .* raise its quota"):
        store.put_bytes(b"{}", "runs/r1/metrics.json")
    assert time.monotonic() - t0 < 5 and proxy.count("PUT", "metrics.json") == 1     # not retried as transient


def test_a_full_store_fails_a_multipart_upload_and_leaves_no_parts(s3, proxy, prefix, tmp_path):
    big = tmp_path / "best.pt"
    big.write_bytes(secrets.token_bytes(11 * MiB))
    proxy.add(method="PUT", target="partNumber=2", times=1000, status=507, code="XMinioStorageFull",
              message="Storage backend has reached its minimum free drive threshold.")
    store = through(proxy, s3, prefix, retry_seconds=30, multipart_threshold=5 * MiB)
    t0 = time.monotonic()
    with pytest.raises(StorageFullError, match=r"storage full: .* multipart put train/best\.pt .*XMinioStorageFull"):
        store.put_file(big, "train/best.pt")
    assert time.monotonic() - t0 < 10                              # not retried as transient
    assert open_uploads(s3, prefix) == []


def test_a_store_that_answers_500_to_every_write_is_not_called_unreachable(s3, proxy, prefix):
    # SeaweedFS 4.48's answer to a write into a bucket over its quota (or with no free volumes), as recorded
    proxy.add(method="PUT", target="metrics.json", times=1000, status=500, code="InternalError",
              message="We encountered an internal error, please try again.")
    store = through(proxy, s3, prefix, retry_seconds=1.5)
    with pytest.raises(StorageError, match=r"is up but answered InternalError \(HTTP 500\) to put metrics\.json "
                                           r".*full .*over its quota") as e:
        store.put_bytes(b"{}", "metrics.json")
    assert "is the store running" not in str(e.value)
    assert proxy.count("PUT", "metrics.json") >= 2                 # a 500 may pass: it was retried first


# ---- 3. multipart uploads left behind ------------------------------------------------------------------------


def test_a_failed_multipart_put_aborts_its_upload_when_s3transfers_own_abort_fails(s3, proxy, prefix, tmp_path):
    big = tmp_path / "last.pt"
    big.write_bytes(secrets.token_bytes(11 * MiB))
    proxy.add(method="PUT", target="partNumber=2", times=1000, status=400, code="InvalidArgument", message="no")
    # botocore tries each call twice (retries={"max_attempts": 1} is one retry): both of s3transfer's are refused
    proxy.add(method="DELETE", target="uploadId=", times=2, status=503, code="SlowDown", message="later")
    store = through(proxy, s3, prefix, retry_seconds=5, multipart_threshold=5 * MiB)
    with pytest.raises(StorageError, match="last.pt"):
        store.put_file(big, "train/last.pt")
    assert proxy.count("DELETE", "uploadId=") == 3                 # s3transfer's abort (refused), then ours
    assert open_uploads(s3, prefix) == []


def test_stale_multipart_uploads_under_the_prefix_are_aborted(s3, prefix):
    client = s3.client()
    other = f"test/{secrets.token_hex(4)}"
    ids = {}
    for key in (f"{prefix}/train/big.bin", f"{other}/keep.bin"):
        ids[key] = client.create_multipart_upload(Bucket=s3.bucket, Key=key)["UploadId"]
        client.upload_part(Bucket=s3.bucket, Key=key, UploadId=ids[key], PartNumber=1, Body=b"p" * (5 * MiB))
    store = ArtifactStore(s3, prefix, retry_seconds=5)
    try:
        assert store.abort_stale_uploads(older_than=3600) == []   # a young upload may still be running
        assert open_uploads(s3, prefix) == [f"{prefix}/train/big.bin"]
        assert store.abort_stale_uploads(older_than=0) == ["train/big.bin"]
        assert open_uploads(s3, prefix) == []
        assert open_uploads(s3, other) == [f"{other}/keep.bin"]    # another prefix's upload is not this store's
    finally:
        client.abort_multipart_upload(Bucket=s3.bucket, Key=f"{other}/keep.bin", UploadId=ids[f"{other}/keep.bin"])


# ---- 4. keys that would land outside the download folder -----------------------------------------------------

BAD_RELS = ["../../etc/x", "a/../../x", "..", "a/..", "/etc/x", "..\\..\\x", "C:/x", "C:x", "", "/"]


@pytest.mark.parametrize("rel", BAD_RELS)
def test_a_key_that_would_escape_the_folder_is_refused(tmp_path, rel):
    with pytest.raises(UnsafeKeyError, match="runs/r1/key"):
        local_path(tmp_path, rel, "runs/r1/key")


@pytest.mark.parametrize("rel", ["fold0/model.pt", "a..b/c", ".hidden", "a/./b", "x..", "a//b"])
def test_an_ordinary_key_maps_below_the_folder(tmp_path, rel):
    assert local_path(tmp_path, rel, "k").resolve().is_relative_to(tmp_path.resolve())


def test_a_symlink_in_the_folder_does_not_lead_out_of_it(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UnsafeKeyError, match="symlink"):
        local_path(tmp_path / "dst", "link/x", "runs/r1/link/x")


def test_download_dir_refuses_a_listed_key_with_dot_dot_before_writing_anything(s3, proxy, prefix, tmp_path):
    # SeaweedFS refuses to store such a key (InvalidRequest) but AWS S3 stores it as it is: the proxy lists one,
    # and serves it as AWS would
    store = ArtifactStore(s3, prefix)
    store.put_bytes(b"m0", "runs/r1/fold0/model.pt")
    evil = f"{prefix}/runs/r1/../../../escaped.txt"
    proxy.add(method="GET", target="list-type=2", times=1,
              rewrite=lambda body: body.replace(b"</ListBucketResult>",
                                                f"<Contents><Key>{evil}</Key><Size>1</Size></Contents>"
                                                f"</ListBucketResult>".encode()))
    proxy.add(method="GET", target="escaped.txt", times=1, status=200, body=b"x")
    with pytest.raises(UnsafeKeyError, match=r"runs/r1/\.\./\.\./\.\./escaped\.txt"):
        through(proxy, s3, prefix, retry_seconds=5).download_dir("runs/r1", tmp_path / "a" / "b" / "dst")
    assert not list(tmp_path.rglob("*.txt")) and not (tmp_path / "a" / "b" / "dst").exists()


# ---- 5. checkpoints are verified before they are unpickled ---------------------------------------------------


def test_a_pickle_without_a_recorded_checksum_is_never_downloaded(s3, prefix, tmp_path):
    s3.client().put_object(Bucket=s3.bucket, Key=f"{prefix}/train/last.pt", Body=b"not verified")
    store = ArtifactStore(s3, prefix, retry_seconds=5)
    with pytest.raises(UnverifiedArtifactError, match=r"refusing s3://.*/train/last\.pt: it has no recorded sha256"):
        store.get_file("train/last.pt", tmp_path / "last.pt")
    assert not list(tmp_path.iterdir())
    with pytest.raises(UnverifiedArtifactError):
        store.download_dir("train", tmp_path / "dst")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_the_checkpoint_mirror_skips_an_unverified_checkpoint(s3, prefix, tmp_path, caplog):
    from pipelines.train import CheckpointMirror
    store = ArtifactStore(s3, prefix, retry_seconds=5)
    store.put_bytes(b"epoch-1 state", "ckpt/last-e0001.pt")
    s3.client().put_object(Bucket=s3.bucket, Key=f"{prefix}/ckpt/last-e0002.pt", Body=b"planted")
    with caplog.at_level(logging.WARNING):
        assert CheckpointMirror(store, "ckpt").restore(tmp_path / "last.pt") == 1
    assert (tmp_path / "last.pt").read_bytes() == b"epoch-1 state"
    assert "last-e0002.pt: it has no recorded sha256" in caplog.text
    assert store.exists("ckpt/last-e0002.pt")                      # refused, not deleted: its owner decides


def test_checkpoints_load_with_weights_only_and_a_planted_one_runs_nothing(tmp_path):
    from segpipe.datasets import ArrayDataset
    from segpipe.engine import LoopConfig, UnsafeCheckpointError, load_checkpoint, train_model
    from segpipe.ensemble import load_member
    from segpipe.losses import SegLoss

    # a real last.pt and best.pt from the training loop: optimizer, scheduler, EMA, SWA and RNG state included
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    masks = rng.integers(0, 2, (4, 16, 16), dtype=np.uint8)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 1))
    cfg = LoopConfig(epochs=2, batch_size=2, lr=1e-2, weight_decay=0, warmup_epochs=0, amp=False,
                     channels_last=False, num_workers=0, seed=0, ema=0.9, swa_start=0.5)
    train_model(net, SegLoss("ce", 255), ArrayDataset(imgs, masks), imgs, masks, cfg, ["bg", "fg"], 255,
                tmp_path, {"name": "tiny"}, device=torch.device("cpu"))
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1 and last["rng"]["numpy"][0] == "MT19937" and last["optimizer"]["state"]
    assert load_checkpoint(tmp_path / "best.pt", mmap=True)["config"] == {"name": "tiny"}

    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (Path.touch, (marker,))
    torch.save({"model": {}, "config": Planted()}, tmp_path / "planted.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load checkpoint .*planted\.pt: .*GLOBAL"):
        load_checkpoint(tmp_path / "planted.pt")
    with pytest.raises(ValueError, match=r"refusing to load member checkpoint .*planted\.pt"):
        load_member(tmp_path / "planted.pt", torch.device("cpu"))
    assert not marker.exists()
