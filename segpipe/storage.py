"""S3-compatible artifact store: the only module that talks to S3."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import ProtocolError


class StorageError(RuntimeError):
    """The artifact store is unreachable, refuses the credentials, or holds a corrupt object."""


@dataclass(frozen=True)
class S3Config:
    """Where the store is and how to sign requests; any S3-compatible endpoint works."""

    endpoint_url: str | None      # None = AWS S3
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"

    def __repr__(self) -> str:    # never print the secret
        return f"S3Config(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r}, access_key=***)"

    @classmethod
    def from_env(cls, env: os._Environ | dict | None = None) -> "S3Config":
        """Read SEGPIPE_S3_ENDPOINT, SEGPIPE_S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY."""
        env = os.environ if env is None else env
        missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(k)]
        if missing:
            raise StorageError(
                f"S3 credentials missing: {', '.join(missing)} not set. Run `segpipe stack up` and "
                "`source .segpipe/credentials.env`, or export the credentials of your S3 endpoint."
            )
        return cls(
            endpoint_url=env.get("SEGPIPE_S3_ENDPOINT") or None,
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            bucket=env.get("SEGPIPE_S3_BUCKET", "segpipe"),
            region=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        )

    def client(self):
        """A boto3 S3 client (SigV4, path-style addressing for local endpoints, bounded retries)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )


# ----------------------------------------------------------------------------------------------
# ArtifactStore: content-checked, conditional, retrying access to one bucket (+ key prefix).
# ----------------------------------------------------------------------------------------------

log = logging.getLogger(__name__)

T = TypeVar("T")

SHA256_META = "sha256"                   # object metadata key (sent as x-amz-meta-sha256)
DEFAULT_RETRY_SECONDS = 90.0             # long enough to ride out a `segpipe stack down && up`
MULTIPART_THRESHOLD = 64 * 1024 * 1024   # files above this go through boto3's managed multipart transfer
UPLOAD_WORKERS = 8                       # parallel puts of one folder (botocore pools 10 connections)
_CHUNK = 1024 * 1024

STALE_UPLOAD_SECONDS = 24 * 3600       # a multipart upload this old belongs to a dead process: abort it
# objects in these formats are pickles (torch.save): loading one runs code, so one without a recorded sha256 is
# never downloaded (.bin is left out: it names raw bytes as often as pickles)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"}
_MISSING_BUCKET_CODES = {"NoSuchBucket"}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed"}
# a store out of space or quota: retrying does not help, and it is not "unreachable". Ceph RGW answers
# QuotaExceeded with a 403 (so these are checked before the credential codes), MinIO XMinioStorageFull (507; 500 in
# old releases) and XMinioAdminBucketQuotaExceeded (400); EntityTooLarge is a quota on one object's size.
# SeaweedFS (4.48, checked) answers a full volume set or a bucket over its quota with a plain 500 InternalError;
# only its log says why ("no free volumes left", "read only ... bucket over quota"): see _call's last message.
_FULL_CODES = {"QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "InsufficientStorage",
               "StorageFull", "EntityTooLarge"}
_INSUFFICIENT_STORAGE = 507


class CorruptArtifactError(StorageError):
    """An object's content does not match the sha256 recorded when it was written."""


class ManifestMismatchError(StorageError):
    """A downloaded object is not the content its manifest (the flow's record of what it stored) names."""


class ArtifactExistsError(StorageError):
    """A conditional write found the key already holding different content."""


class StorageFullError(StorageError):
    """The store refused a write for lack of space or quota: freeing space helps, retrying does not."""


class UnverifiedArtifactError(StorageError):
    """A pickle (checkpoint) object carries no recorded sha256: its content cannot be verified, so it is not read."""


class UnsafeKeyError(StorageError):
    """A key names a path outside the folder it is being downloaded into."""


class _BrokenBody(IOError):
    """The body of a GET ended before its Content-Length: the connection broke mid-download (retried)."""


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path)


HASH_WORKERS = 4      # hashlib releases the GIL on large updates: files of a folder hash in parallel


def digest_dir(local_dir: Path | str, workers: int = HASH_WORKERS) -> dict[str, str]:
    """sha256 of every file under `local_dir`, by path relative to it (posix), sorted by path."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{local_dir} is not a directory")
    paths = sorted(p for p in local_dir.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max(1, min(workers, len(paths)))) as pool:
        digests = list(pool.map(sha256_file, paths))
    return {p.relative_to(local_dir).as_posix(): d for p, d in zip(paths, digests)}


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _client_error(e: BaseException) -> ClientError | None:
    """The ClientError itself, or the one s3transfer wrapped (S3UploadFailedError keeps it as its context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ClientError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _is_full(e: ClientError) -> bool:
    return _code(e) in _FULL_CODES or _status(e) == _INSUFFICIENT_STORAGE


# a connection that broke while the body streamed: botocore raises ResponseStreamingError (urllib3's
# ProtocolError: reset, or IncompleteRead on an early EOF) or IncompleteReadError (fewer bytes than Content-Length)
_BROKEN_BODY = (ResponseStreamingError, IncompleteReadError, ProtocolError, ConnectionError, _BrokenBody)


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
        return True
    if isinstance(e, _BROKEN_BODY):
        return True
    if isinstance(e, ClientError):
        if _is_full(e) or _status(e) == 501:     # 501 Not Implemented: this store lacks the operation for good
            return False
        return _status(e) >= 500 or _code(e) in _TRANSIENT_CODES
    # s3transfer wraps the underlying error; look through the chain
    cause = e.__cause__ or e.__context__
    return cause is not None and cause is not e and _is_transient(cause)


def _atomic_write(local: Path, write: Callable[[object], None]) -> None:
    """Write through a temp file in the target folder, then os.replace: readers never see half a file."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".part", dir=local.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_pickle(key: str) -> bool:
    return key.lower().endswith(PICKLE_SUFFIXES)


def holds(folder: Path, files: dict[str, str]) -> bool:
    """`folder` has every file of the manifest `files` (relative path -> sha256) with that content."""
    return folder.is_dir() and all((folder / rel).is_file() and sha256_file(folder / rel) == sha
                                   for rel, sha in files.items())


def local_path(local_dir: Path, rel: str, key: str) -> Path:
    """Where the object `key` (`rel` below the downloaded prefix) goes under `local_dir`; an UnsafeKeyError for a
    key that would land outside it (`..` components, an absolute or drive path: S3 keys are free text, and AWS
    S3 stores `runs/r1/../../x` as it is)."""
    parts = rel.replace("\\", "/").split("/")
    if (not rel.strip("/") or ".." in parts or PurePosixPath(rel).is_absolute()
            or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive):
        raise UnsafeKeyError(
            f"refusing to download key {key!r}: its path below the prefix, {rel!r}, is empty, absolute or has `..` "
            f"components, and would be written outside {local_dir}. Delete or rename that object in the store")
    target = local_dir / rel
    # an existing symlink inside local_dir could still point out of it
    if not target.resolve().is_relative_to(local_dir.resolve()):
        raise UnsafeKeyError(f"refusing to download key {key!r}: {target} resolves to {target.resolve()}, outside "
                             f"{local_dir} (a symlink there?); remove the link or download elsewhere")
    return target


class ArtifactStore:
    """Checksummed artifacts under `s3://<bucket>/<prefix>/`; writes never clobber another run's keys.

    Every object carries the sha256 of its content in metadata; reads verify it, and a pickle (checkpoint)
    without one is refused. Transient failures (connection refused, timeouts, 5xx, a download that breaks
    mid-body) are retried with exponential backoff for up to `retry_seconds` in total, so a store restarted
    mid-run costs a pause, not the run. A full store fails at once with StorageFullError.
    """

    def __init__(
        self,
        cfg: S3Config,
        prefix: str = "",
        *,
        retry_seconds: float | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
    ) -> None:
        self.cfg = cfg
        self.prefix = prefix.strip("/")
        if retry_seconds is None:
            retry_seconds = float(os.environ.get("SEGPIPE_S3_RETRY_SECONDS", DEFAULT_RETRY_SECONDS))
        self.retry_seconds = retry_seconds
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=max(multipart_threshold // 4, 5 * 1024 * 1024))
        # own clients without botocore's retries: _call owns the (bounded, total-time) retry policy
        self._client = self._make_client()
        self._conditional_client = self._make_client()
        # s3transfer does not pass IfNoneMatch through; add it to the final CompleteMultipartUpload
        self._conditional_client.meta.events.register(
            "before-parameter-build.s3.CompleteMultipartUpload", _add_if_none_match
        )
        # multipart uploads this store started, by full key: a failed or interrupted put aborts its own (s3transfer
        # aborts on failure too, but not when that abort fails or the process is interrupted)
        self._open_uploads: dict[str, set[str]] = {}
        self._uploads_lock = threading.Lock()
        for client in (self._client, self._conditional_client):
            client.meta.events.register("after-call.s3.CreateMultipartUpload", self._upload_started)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url('')!r}, endpoint={self.cfg.endpoint_url!r})"

    def _make_client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.cfg.endpoint_url,
            aws_access_key_id=self.cfg.access_key,
            aws_secret_access_key=self.cfg.secret_key,
            region_name=self.cfg.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )

    # ---- keys ---------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def url(self, key: str) -> str:
        """An s3:// URI for display (logs, reports); not a download link."""
        return f"s3://{self.cfg.bucket}/{self._key(key)}"

    # ---- error policy -------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one S3 operation, retrying transient failures; map the rest to actionable StorageErrors."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as e:  # s3transfer and urllib3 wrap the transient ones; see _is_transient
                if isinstance(e, StorageError):
                    raise
                ce = _client_error(e)
                if ce is not None:
                    self._raise_permanent(what, ce, e)
                if not _is_transient(e):
                    if ce is not None:
                        raise StorageError(f"S3 {what} at {self._endpoint()} failed: {_code(ce)}: {e}") from e
                    raise
                err: BaseException = e
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._gave_up(what, attempt, err) from err
            sleep = min(delay * (0.5 + random.random()), remaining, 10.0)
            log.warning("S3 %s failed (%s); retry %d in %.1fs <SEGPIPE_S3_RETRY_SECONDS=%.0f>",
                        what, type(err).__name__, attempt, sleep, self.retry_seconds)
            time.sleep(sleep)
            delay *= 2

    def _raise_permanent(self, what: str, e: ClientError, outer: BaseException) -> None:
        """Raise the StorageError for an answer that retrying cannot change (full, credentials, no bucket)."""
        code = _code(e)
        if _is_full(e):     # before the credential check: Ceph's QuotaExceeded is a 403
            message = e.response.get("Error", {}).get("Message") or ""
            raise StorageFullError(
                f"storage full: S3 at {self._endpoint()} refused {what} in bucket {self.cfg.bucket!r} "
                f"({code or 'HTTP'} {_status(e)}: {message}). Free space in the store (delete old runs' "
                "artifacts) or raise its quota"
                + (" or its maximum object size" if code == "EntityTooLarge" else "")
                + ", then run the task again; the files are still on this disk"
            ) from outer
        if code in _CREDENTIAL_CODES or _status(e) == 403:
            raise StorageError(
                f"S3 at {self._endpoint()} refused the credentials ({code}) during {what}: check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (for the local stack: "
                "`source .segpipe/credentials.env`) and that this identity may use bucket "
                f"{self.cfg.bucket!r}"
            ) from None
        if code in _MISSING_BUCKET_CODES:
            raise StorageError(
                f"bucket {self.cfg.bucket!r} does not exist at {self._endpoint()}: run "
                "`segpipe stack up` (it creates it), create it, or set SEGPIPE_S3_BUCKET"
            ) from None

    def _gave_up(self, what: str, attempts: int, err: BaseException) -> StorageError:
        """The error once the retry budget is spent, saying which of the transient failures it was."""
        spent = f"after {attempts} attempts in {self.retry_seconds:.0f}s <SEGPIPE_S3_RETRY_SECONDS>"
        if isinstance(err, _BrokenBody):
            return StorageError(
                f"the download of {what} broke off mid-body {spent} (last: {err}); no partial file is "
                f"kept. Something between here and S3 at {self._endpoint()} cuts connections (network, "
                "proxy, a store restarting): fix that, or raise SEGPIPE_S3_RETRY_SECONDS")
        ce = _client_error(err)
        if ce is not None:      # the store answered, every time, with an error of its own
            return StorageError(
                f"S3 at {self._endpoint()} is up but answered {_code(ce)} (HTTP {_status(ce)}) to {what} {spent}. "
                "A SeaweedFS store answers a write this way when it is full or the bucket is over its quota (its "
                "log says `no free volumes left` or `read only ... bucket over quota`): free space or raise the "
                "quota (`weed shell`: s3.bucket.quota), else see the store's log")
        return StorageError(
            f"cannot reach S3 at {self._endpoint()} for {what} {spent} ({type(err).__name__}: {err}): is the "
            "store running? Run `segpipe stack up`, or check SEGPIPE_S3_ENDPOINT")

    def _endpoint(self) -> str:
        return self.cfg.endpoint_url or "AWS S3"

    def check(self) -> None:
        """A cheap round trip at start-up: fails fast with what to do if the store is unusable."""
        self._call("check", lambda: self._client.list_objects_v2(Bucket=self.cfg.bucket, MaxKeys=1))

    # ---- reads --------------------------------------------------------------------------------

    def _head(self, key: str) -> dict | None:
        def head():
            try:
                return self._client.head_object(Bucket=self.cfg.bucket, Key=self._key(key))
            except ClientError as e:
                if _code(e) in {"404", "NoSuchKey", "NotFound"}:
                    return None
                raise
        return self._call(f"head {key}", head)

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def sha256(self, key: str) -> str | None:
        """The recorded sha256 of `key`; None if the object has none (not written by ArtifactStore)."""
        head = self._head(key)
        if head is None:
            raise StorageError(f"{self.url(key)} does not exist")
        return head.get("Metadata", {}).get(SHA256_META)

    def _read_into(self, key: str, sink) -> str:
        """Stream `key` into `sink`, verifying the recorded sha256; returns it. A pickle without one is refused
        before a byte reaches `sink`; a body cut short is read again (within the retry budget)."""
        url = self.url(key)

        def get():
            try:
                resp = self._client.get_object(Bucket=self.cfg.bucket, Key=self._key(key))
            except ClientError as e:
                if _code(e) in {"404", "NoSuchKey"}:
                    raise StorageError(f"{url} does not exist") from None
                raise
            expected = resp.get("Metadata", {}).get(SHA256_META)
            if expected is None and _is_pickle(key):
                resp["Body"].close()
                raise UnverifiedArtifactError(
                    f"refusing {url}: it has no recorded sha256 (x-amz-meta-{SHA256_META}), so its content cannot "
                    "be verified, and it is a pickle, which runs code when loaded. It was not written by segpipe's "
                    "ArtifactStore: delete it, or put a copy you trust through ArtifactStore.put_file (which "
                    "records the checksum)")
            sink.seek(0)
            sink.truncate()
            h, n, size = hashlib.sha256(), 0, resp.get("ContentLength")
            try:
                for block in resp["Body"].iter_chunks(_CHUNK):
                    h.update(block)
                    sink.write(block)
                    n += len(block)
            except (*_BROKEN_BODY, ReadTimeoutError) as e:
                raise _BrokenBody(f"{url}: the connection broke after {n} of {size} bytes "
                                  f"({type(e).__name__}: {e})") from e
            if size is not None and n != size:     # botocore checks this too; a short file must never pass
                raise _BrokenBody(f"{url}: the body ended after {n} of {size} bytes")
            return expected, h.hexdigest()

        expected, actual = self._call(f"get {key}", get)
        if expected is not None and expected != actual:
            # callers delete an object reported corrupt (a checkpoint mirror, a cached result): read it once more
            # so that one bad transfer never costs stored work
            log.warning("%s: content sha256 %s... != recorded %s...; reading it again", url, actual[:12],
                        expected[:12])
            expected, actual = self._call(f"get {key}", get)
        if expected is None:
            log.warning("%s has no recorded sha256 (not written by ArtifactStore); content not verified", url)
        elif expected != actual:
            raise CorruptArtifactError(
                f"{url} is corrupt: content sha256 {actual[:12]}... != recorded {expected[:12]}... (read twice); "
                "re-run the stage that wrote it"
            )
        return actual

    def get_bytes(self, key: str) -> bytes:
        buf = io.BytesIO()
        self._read_into(key, buf)
        return buf.getvalue()

    def get_file(self, key: str, local: Path | str) -> Path:
        """Download `key` to `local` (atomically; nothing is left there if the check fails)."""
        local = Path(local)
        _atomic_write(local, lambda f: self._read_into(key, f))
        return local

    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the store prefix) under `prefix`, sorted."""
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")

        def list_all():
            keys = []
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.cfg.bucket,
                                                                              Prefix=full):
                keys += [o["Key"] for o in page.get("Contents", [])]
            return keys
        return sorted(self._rel(k) for k in self._call(f"list {prefix}", list_all))

    def get_verified(self, key: str, dst: Path, sha: str) -> None:
        """Download `key` to `dst` (atomically; the store checks its recorded sha256) and check it is `sha`, the
        digest a manifest names: ManifestMismatchError otherwise, and nothing left at `dst`."""
        self.get_file(key, dst)
        if sha256_file(dst) != sha:
            Path(dst).unlink(missing_ok=True)
            raise ManifestMismatchError(f"{self.url(key)} is not the content the flow stored (sha256 {sha[:12]}...); "
                                        "re-run the flow so the stage stores it again")

    def fetch_folder(self, prefix: str, files: dict[str, str], dst: Path | str,
                     link_from: Path | str | None = None) -> int:
        """Make `dst` hold exactly `files` (relative path -> sha256) as stored under `prefix/`, all or nothing: kept
        when it already does; each file hard-linked from `link_from` when the copy there checks out, else downloaded
        and verified (get_verified). Returns how many files were downloaded."""
        dst = Path(dst)
        if holds(dst, files):
            return 0
        tmp = dst.with_name(f".{dst.name}.fetch-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        fetched = 0
        try:
            for rel, sha in files.items():
                key = f"{prefix}/{rel}"
                target = local_path(tmp, rel, key)
                source = Path(link_from) / rel if link_from is not None else None
                if source is not None and source.is_file() and sha256_file(source) == sha:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.link(source, target)
                    continue
                self.get_verified(key, target, sha)
                fetched += 1
            shutil.rmtree(dst, ignore_errors=True)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return fetched

    def download_dir(self, key_prefix: str, local_dir: Path | str) -> list[Path]:
        """Mirror every key under `key_prefix/` into `local_dir` (verified); returns the local paths."""
        local_dir = Path(local_dir)
        base = key_prefix.strip("/")
        keys = self.list(f"{base}/" if base else "")
        if not keys:
            raise StorageError(f"nothing under {self.url(base)}/ to download")
        # every key is checked before the first download: a bad one leaves nothing half-mirrored
        targets = [(key, local_path(local_dir, key[len(base):].lstrip("/"), key)) for key in keys]
        return [self.get_file(key, target) for key, target in targets]

    # ---- writes -------------------------------------------------------------------------------

    def _resolve_conflict(self, key: str, digest: str) -> str:
        existing = self.sha256(key)
        if existing == digest:
            log.info("%s already holds this content (sha256 %s...); nothing to do", self.url(key), digest[:12])
            return self.url(key)
        raise ArtifactExistsError(
            f"{self.url(key)} already exists with different content (sha256 {str(existing)[:12]}... vs "
            f"{digest[:12]}...); artifacts are write-once: use a new key (run id) or overwrite=True"
        )

    def put_bytes(self, data: bytes, key: str, *, overwrite: bool = False) -> str:
        """Store `data` under `key`; returns its s3:// URI. Same content already there = success."""
        digest = hashlib.sha256(data).hexdigest()
        extra = {} if overwrite else {"IfNoneMatch": "*"}

        def put():
            try:
                self._client.put_object(Bucket=self.cfg.bucket, Key=self._key(key), Body=data,
                                        Metadata={SHA256_META: digest}, **extra)
                return True
            except ClientError as e:
                if _code(e) in {"PreconditionFailed", "412"} or _status(e) == 412:
                    return False
                raise
        if self._call(f"put {key}", put):
            return self.url(key)
        return self._resolve_conflict(key, digest)

    def put_file(self, local: Path | str, key: str, *, overwrite: bool = False, digest: str | None = None) -> str:
        """Upload `local` to `key` (multipart above the threshold); returns its s3:// URI.

        By default a conditional write: an existing key with the same sha256 is a successful no-op
        (a retried task), one with different content raises ArtifactExistsError.
        """
        local = Path(local)
        if not local.is_file():
            raise FileNotFoundError(f"{local} is not a file")
        digest = digest or sha256_file(local)    # the caller's, if it has just hashed the file
        size = local.stat().st_size
        if size < self.transfer.multipart_threshold:
            extra = {} if overwrite else {"IfNoneMatch": "*"}

            def put():
                try:
                    with open(local, "rb") as f:
                        self._client.put_object(Bucket=self.cfg.bucket, Key=self._key(key), Body=f,
                                                Metadata={SHA256_META: digest}, **extra)
                    return True
                except ClientError as e:
                    if _code(e) in {"PreconditionFailed", "412"} or _status(e) == 412:
                        return False
                    raise
            if self._call(f"put {key}", put):
                return self.url(key)
            return self._resolve_conflict(key, digest)

        # large file: boto3 managed transfer (parallel multipart); conditional on the final complete
        if not overwrite and self.exists(key):
            return self._resolve_conflict(key, digest)
        client = self._client if overwrite else self._conditional_client

        def upload():
            try:
                client.upload_file(str(local), self.cfg.bucket, self._key(key),
                                   ExtraArgs={"Metadata": {SHA256_META: digest}}, Config=self.transfer)
                self._forget_uploads(self._key(key))
                return True
            except BaseException as e:      # Ctrl-C and SystemExit too: their parts would stay in the store
                self._abort_own_uploads(self._key(key))
                cause = e.__cause__ or e.__context__
                if isinstance(cause, ClientError) and (_code(cause) == "PreconditionFailed" or _status(cause) == 412):
                    return False
                if "PreconditionFailed" in str(e):
                    return False
                raise
        if self._call(f"multipart put {key}", upload):
            return self.url(key)
        return self._resolve_conflict(key, digest)

    # ---- multipart uploads left behind ---------------------------------------------------------

    def _upload_started(self, http_response=None, parsed=None, **kwargs) -> None:
        if http_response is not None and http_response.status_code < 300 and parsed and parsed.get("UploadId"):
            with self._uploads_lock:
                self._open_uploads.setdefault(parsed["Key"], set()).add(parsed["UploadId"])

    def _forget_uploads(self, full_key: str) -> set[str]:
        with self._uploads_lock:
            return self._open_uploads.pop(full_key, set())

    def _abort_own_uploads(self, full_key: str) -> None:
        """Abort the multipart uploads this store started for `full_key` (one try each: this runs while an error
        or an interrupt is on its way out, and abort_stale_uploads catches what is left)."""
        for upload_id in self._forget_uploads(full_key):
            try:
                self._client.abort_multipart_upload(Bucket=self.cfg.bucket, Key=full_key, UploadId=upload_id)
                log.info("aborted multipart upload %s of %s", upload_id[:16], full_key)
            except ClientError as e:
                if _code(e) in {"NoSuchUpload", "404"}:     # s3transfer's own cleanup got there first
                    continue
                log.warning("could not abort multipart upload %s of s3://%s/%s (%s); abort_stale_uploads() "
                            "removes it once older than %.0fh", upload_id, self.cfg.bucket, full_key, e,
                            STALE_UPLOAD_SECONDS / 3600)
            except Exception as e:
                log.warning("could not abort multipart upload %s of s3://%s/%s (%s: %s); abort_stale_uploads() "
                            "removes it once older than %.0fh", upload_id, self.cfg.bucket, full_key,
                            type(e).__name__, e, STALE_UPLOAD_SECONDS / 3600)

    def abort_stale_uploads(self, older_than: float = STALE_UPLOAD_SECONDS) -> list[str]:
        """Abort the incomplete multipart uploads under this store's prefix begun more than `older_than` seconds
        ago; returns their keys. A killed process leaves its parts in the store, taking space that `list` never
        shows. The age guards uploads still running elsewhere (measured on the store's clock as it reports it)."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than)

        def list_uploads() -> list[dict]:
            uploads = []
            for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.cfg.bucket,
                                                                                     Prefix=prefix):
                uploads += page.get("Uploads", [])
            return uploads

        stale = [u for u in self._call(f"list multipart uploads under {prefix or '/'}", list_uploads)
                 if u["Initiated"] <= cutoff]

        def abort(u: dict) -> None:
            try:
                self._client.abort_multipart_upload(Bucket=self.cfg.bucket, Key=u["Key"], UploadId=u["UploadId"])
            except ClientError as e:
                if _code(e) not in {"NoSuchUpload", "404"}:     # finished or aborted meanwhile: nothing to do
                    raise
        for u in stale:
            self._call(f"abort multipart upload of {u['Key']}", lambda u=u: abort(u))
            log.info("aborted stale multipart upload of s3://%s/%s begun %s", self.cfg.bucket, u["Key"],
                     u["Initiated"])
        return sorted(self._rel(u["Key"]) for u in stale)

    def delete(self, key: str) -> None:
        """Remove `key` (no error if it is already gone): only for superseded state such as old checkpoints."""
        self._call(f"delete {key}", lambda: self._client.delete_object(Bucket=self.cfg.bucket, Key=self._key(key)))

    def upload_dir(self, local_dir: Path | str, key_prefix: str, *, overwrite: bool = False,
                   workers: int = UPLOAD_WORKERS, digests: dict[str, str] | None = None) -> list[str]:
        """Upload every file under `local_dir` to `key_prefix/<relative path>`, `workers` at a time (a stage's
        folder is mostly small files: one at a time, the round trips dominate); returns the keys, sorted.
        `digests`, if given, maps relative paths to sha256: an entry already there is taken as the file's digest
        (the caller has just hashed it), a missing one is computed and filled in.
        Any file failing fails the call, after the others have finished."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"{local_dir} is not a directory")
        base = key_prefix.strip("/")
        jobs = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            jobs.append((path, rel, f"{base}/{rel}" if base else rel))

        known = dict(digests or {})

        def put(path: Path, rel: str, key: str) -> None:
            digest = known.get(rel) or sha256_file(path)
            self.put_file(path, key, overwrite=overwrite, digest=digest)
            if digests is not None:
                digests[rel] = digest

        with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as pool:     # boto3 clients are thread-safe
            futures = [pool.submit(put, *job) for job in jobs]
            for fut in futures:
                fut.result()
        return [key for _, _, key in jobs]


def _add_if_none_match(params, **kwargs) -> None:
    params.setdefault("IfNoneMatch", "*")


def ensure_bucket(cfg: S3Config, bucket: str, *, retry_seconds: float = 60.0) -> None:
    """Create `bucket` if it is missing, and abort the multipart uploads older than a day left in it (used by
    `segpipe stack up`; retries while the store starts)."""
    store = ArtifactStore(S3Config(cfg.endpoint_url, cfg.access_key, cfg.secret_key, bucket, cfg.region),
                          retry_seconds=retry_seconds)

    def create():
        try:
            store._client.create_bucket(Bucket=bucket)
        except ClientError as e:
            if _code(e) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise
    store._call(f"create bucket {bucket}", create)
    # the stack's start is the one moment every deployment passes: clear what killed runs left behind
    try:
        if gone := store.abort_stale_uploads():
            log.info("aborted %d stale multipart upload(s) in bucket %s", len(gone), bucket)
    except StorageError as e:       # a store without ListMultipartUploads still starts
        log.warning("could not clean stale multipart uploads in bucket %s: %s", bucket, e)
