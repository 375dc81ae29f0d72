"""The stack's SeaweedFS: its internal ports refuse callers without its JWT keys or gRPC certificate; S3 still works."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import stat
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import requests

from segpipe import stack
from tests.conftest import free_port_block

pytestmark = pytest.mark.services

KEY = "secured/object.bin"
BODY = b"segpipe weed security " * 8


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    """The stack's SeaweedFS alone, started by `stack.up` (one start for the module), with one object in S3."""
    home = tmp_path_factory.mktemp("stack") / "home"
    base = free_port_block(8)          # s3 + weed's 7 internal ports, and their +10000 gRPC twins
    try:
        stack.up(home, {"s3": base}, ["s3"], cwd=tmp_path_factory.mktemp("project"))
        env = stack.load_env(home)
        cfg = stack._s3_config(env)
        cfg.client().put_object(Bucket=cfg.bucket, Key=KEY, Body=BODY)
        yield {"home": home, "ports": stack.resolve_ports({"s3": base}), "cfg": cfg,
               "toml": home / "s3" / "security.toml"}
    finally:
        stack.down(home)


def _jwt(key: str) -> str:
    """An HS256 token as weed's S3 gateway signs its filer calls: just an expiry."""
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")   # noqa: E731
    msg = enc(b'{"alg":"HS256","typ":"JWT"}') + b"." + enc(json.dumps({"exp": int(time.time()) + 60}).encode())
    return (msg + b"." + enc(hmac.new(key.encode(), msg, hashlib.sha256).digest())).decode()


def _keys(weed) -> dict[str, str]:
    tree = tomllib.loads(weed["toml"].read_text())
    return {s: stack._dig(tree, s)["key"] for s in stack.WEED_JWT_SECTIONS}


def _filer_url(weed, key: str = KEY) -> str:
    return f"http://127.0.0.1:{weed['ports']['weed_filer']}/buckets/{weed['cfg'].bucket}/{key}"


def test_s3_round_trip_with_credentials(weed):
    cfg = weed["cfg"]
    assert cfg.client().get_object(Bucket=cfg.bucket, Key=KEY)["Body"].read() == BODY


def test_filer_read_without_jwt_is_refused(weed):
    r = requests.get(_filer_url(weed), timeout=10)
    assert r.status_code in (401, 403), (r.status_code, r.content[:200])
    assert BODY not in r.content
    # the same request signed with the filer's read key gets the object: the refusal is the missing token
    signed = requests.get(_filer_url(weed), headers={"Authorization": "Bearer " + _jwt(_keys(weed)[
        "jwt.filer_signing.read"])}, timeout=10)
    assert signed.status_code == 200 and signed.content == BODY


def test_filer_write_without_jwt_is_refused(weed):
    url = _filer_url(weed, "secured/planted.bin")
    r = requests.post(url, files={"file": ("planted.bin", b"planted")}, timeout=10)
    assert r.status_code in (401, 403), (r.status_code, r.content[:200])
    r = requests.put(url, data=b"planted", timeout=10)
    assert r.status_code in (401, 403), (r.status_code, r.content[:200])
    cfg = weed["cfg"]
    listed = cfg.client().list_objects_v2(Bucket=cfg.bucket, Prefix="secured/").get("Contents", [])
    assert [o["Key"] for o in listed] == [KEY]


def test_volume_write_without_jwt_is_refused(weed):
    assign = requests.get(f"http://127.0.0.1:{weed['ports']['weed_master']}/dir/assign", timeout=10).json()
    assert assign.get("fid"), assign
    r = requests.post(f"http://127.0.0.1:{weed['ports']['weed_volume']}/{assign['fid']}",
                      files={"file": ("x.bin", b"planted")}, timeout=10)
    assert r.status_code in (401, 403), (r.status_code, r.content[:200])


def test_grpc_without_the_certificate_is_refused(weed, tmp_path):
    """`weed filer.copy` writes through the filer's gRPC, which hands out volume write tokens: without mTLS it works."""
    planted = tmp_path / "planted.bin"
    planted.write_bytes(b"planted")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")} | {"HOME": str(tmp_path)}
    r = subprocess.run([stack._bin("weed"), "filer.copy", str(planted), _filer_url(weed, "secured/")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stdout + r.stderr
    cfg = weed["cfg"]
    listed = cfg.client().list_objects_v2(Bucket=cfg.bucket, Prefix="secured/").get("Contents", [])
    assert [o["Key"] for o in listed] == [KEY]


def test_admin_ui_without_the_password_is_refused(weed):
    """The admin UI downloads objects with weed's own keys; without its password it answers with a login."""
    url = f"http://127.0.0.1:{weed['ports']['weed_admin']}"
    download = f"{url}/api/files/download?path=/buckets/{weed['cfg'].bucket}/{KEY}"
    r = requests.get(download, timeout=10, allow_redirects=False)
    assert r.status_code in (401, 403) and BODY not in r.content, r.status_code
    session = requests.Session()   # with the password it is served: the refusal is the missing login
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', session.get(f"{url}/login", timeout=10).text).group(1)
    password = tomllib.loads(weed["toml"].read_text())["admin"]["password"]
    session.post(f"{url}/login", data={"csrf_token": csrf, "username": "segpipe", "password": password}, timeout=10)
    assert session.get(download, timeout=10).content == BODY


def test_security_files_private_and_keys_never_in_argv(weed):
    for path in [weed["toml"], *(weed["toml"].parent / "tls").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    keys = _keys(weed)
    assert len(set(keys.values())) == len(stack.WEED_JWT_SECTIONS) and all(len(k) >= 32 for k in keys.values())
    argvs = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argvs.append(cmdline.read_bytes())
        except OSError:          # the process ended while we looked
            continue
    assert any(b"weed\x00mini" in a for a in argvs)    # weed itself is among the processes read
    secrets = [*keys.values(), tomllib.loads(weed["toml"].read_text())["admin"]["password"]]
    leaked = [k for k in secrets if any(k.encode() in a for a in argvs)]
    assert not leaked


def test_keys_and_certificates_kept_across_ups(weed):
    tls = weed["toml"].parent / "tls"
    before = [weed["toml"].read_text(), *(f.read_bytes() for f in sorted(tls.iterdir()))]
    stack.write_weed_security(weed["toml"].parent)
    assert [weed["toml"].read_text(), *(f.read_bytes() for f in sorted(tls.iterdir()))] == before
