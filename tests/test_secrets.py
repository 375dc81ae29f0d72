"""Nothing secret on a command line, the alert webhook kept as a Prefect secret, a leaderboard key sent only to the
host it was issued for, and the fault suite's scan of stored data.

One real `segpipe stack up` (SeaweedFS, Prefect server + worker, leaderboard, automations, the DVC remote) runs
under a sampler that reads every process's argv from /proc every 5 ms, as any local user running `ps` could."""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

from pipelines import submit as submit_stage
from segpipe import cli, stack
from segpipe.config import SubmitParams
from segpipe.leaderboard import KEY_HOST_ENV, KeyHostMismatch, LeaderboardClient, LeaderboardError, check_key_host
from segpipe.storage import S3Config
from tests.conftest import free_port_block
from tests.faults.helpers import scan_prefect_for_secrets, scan_s3_for_secrets

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
# what credentials.env holds that nobody else may read (the access key id too: old code put it on argv with the rest)
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SEGPIPE_LEADERBOARD_KEY",
               "SEGPIPE_LEADERBOARD_ABLATION_KEY")


# ------------------------------------------------------------------------------------------------ helpers
class ArgvWatcher:
    """Every distinct argv seen in /proc/*/cmdline, swept in a background thread with `every` s between sweeps
    (a sweep of ~150 processes takes a few ms; sweeping without a pause would take a whole core)."""

    def __init__(self, every: float = 0.005):
        self.every, self.seen, self.sweeps = every, set(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                            argv = f.read()
                    except OSError:          # the process ended between the listing and the read
                        continue
                    if argv:
                        self.seen.add(argv)
            self.sweeps += 1
            self._stop.wait(self.every)

    def __enter__(self) -> "ArgvWatcher":
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.monotonic() - self.t0

    def commands(self) -> list[str]:
        return [a.replace(b"\0", b" ").decode(errors="replace") for a in self.seen]


class Receiver:
    """A local HTTP server that records every request (method, path, headers, body) and answers `status`."""

    def __init__(self, status: int = 200):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                       "body": body})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _dvc_project(root: Path, *, remote: bool = True) -> Path:
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=root, check=True)
    if remote:   # the `storage` remote the lead puts in .dvc/config
        subprocess.run([DVC, "remote", "add", "-d", "storage", "s3://dvc/segpipe"], cwd=root, check=True)
    return root


def _dvc_config(root: Path, name: str) -> str:
    """A value as DVC itself reads it (the key name goes on argv; the value comes back on stdout)."""
    return subprocess.run([DVC, "config", name], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------------------------------------ the watched stack
@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """`segpipe stack up` of all four services, with an alert webhook whose URL carries a token, under ArgvWatcher."""
    root = tmp_path_factory.mktemp("secrets")
    (root / "project").mkdir()
    project = _dvc_project(root / "project")
    home = root / "home"
    base = free_port_block(11)
    ports = {"s3": base, "prefect": base + 9, "leaderboard": base + 10}
    receiver = Receiver()
    token = secrets.token_urlsafe(16)
    hook = f"{receiver.url}/alerts/{token}"
    canary = f"segpipe-argv-canary-{secrets.token_hex(4)}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(stack.ALERT_WEBHOOK_ENV, hook)        # how a person passes it: never --alert-webhook URL
            mp.setenv(KEY_HOST_ENV, "leaderboard.example")  # a host recorded for some other key, in the shell
            with ArgvWatcher() as argv:
                # a process that lives ~50 ms (a bare interpreter), shorter than `dvc remote modify` ever did:
                # the sampler must see it, or it could miss a secret too
                subprocess.run([sys.executable, "-c", "pass", canary], check=True)
                t0 = time.monotonic()
                st = stack.up(home, ports, cwd=project, labels=root / "labels")
                seconds = time.monotonic() - t0
        yield {"home": home, "ports": ports, "project": project, "status": st, "env": stack.load_env(home),
               "hook": hook, "token": token, "receiver": receiver, "argv": argv, "canary": canary,
               "seconds": seconds, "api": f"http://127.0.0.1:{ports['prefect']}/api"}
    finally:
        stack.down(home)
        receiver.close()


@pytest.mark.services
def test_no_secret_on_any_command_line_during_stack_up(watched):
    argv, env = watched["argv"], watched["env"]
    cmds = argv.commands()
    print(f"\nstack up {watched['seconds']:.0f}s; {argv.sweeps} sweeps of /proc in {argv.seconds:.0f}s "
          f"({argv.seconds / max(argv.sweeps, 1) * 1000:.1f} ms apart), {len(cmds)} distinct command lines")
    # the sampler is fast enough to matter: it saw the 50 ms canary and every command the stack ran
    assert any(watched["canary"] in c for c in cmds), "the argv sampler missed a 50 ms process"
    for part in ("weed mini", "prefect server start", "prefect worker start", "segpipe.leaderboard serve",
                 "flows.monitoring install", "work-pool create"):
        assert any(part in c for c in cmds), f"the sampler never saw `{part}`: did the stack run it?"
    assert {k: v["state"] for k, v in watched["status"].items()} == dict.fromkeys(stack.SERVICES, "running")
    values = {k: env[k] for k in SECRET_KEYS} | {"the alert webhook URL": watched["hook"],
                                                  "the webhook's token": watched["token"]}
    for name, value in values.items():
        assert len(value) >= 8
        leaked = [c.split(" ")[:3] for c in cmds if value in c]
        assert not leaked, f"{name} was on the command line of {leaked}"


@pytest.mark.services
def test_worker_environment_has_no_host_for_the_stacks_key(watched):
    """The shell's SEGPIPE_LEADERBOARD_HOST is for another key: the worker's key (the emulator's) goes to loopback."""
    pid = watched["status"]["worker"]["pid"]
    environ = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
    assert environ[b"SEGPIPE_LEADERBOARD_KEY"].decode() == watched["env"]["SEGPIPE_LEADERBOARD_KEY"]
    assert KEY_HOST_ENV.encode() not in environ


@pytest.mark.services
def test_dvc_credentials_are_in_a_private_config_local_dvc_reads(watched):
    project, env = watched["project"], watched["env"]
    local = project / ".dvc" / "config.local"
    assert stat.S_IMODE(local.stat().st_mode) == 0o600
    assert env["AWS_SECRET_ACCESS_KEY"] not in (project / ".dvc" / "config").read_text()
    assert _dvc_config(project, "remote.storage.secret_access_key") == env["AWS_SECRET_ACCESS_KEY"]
    assert _dvc_config(project, "remote.storage.access_key_id") == env["AWS_ACCESS_KEY_ID"]
    assert _dvc_config(project, "remote.storage.endpointurl") == env["SEGPIPE_S3_ENDPOINT"]
    assert _dvc_config(project, "remote.storage.url") == "s3://dvc/segpipe"


@pytest.mark.services
def test_alert_webhook_is_a_prefect_secret_and_still_posts(watched, tmp_path):
    api, hook, token = watched["api"], watched["hook"], watched["token"]
    # what the UI and a plain API read show: the block (secrets masked) and the automations
    blocks = requests.post(f"{api}/block_documents/filter", json={}, timeout=10).json()
    alert = [b for b in blocks if b["name"] == "segpipe-alerts"]
    assert alert, "no segpipe-alerts block: the webhook was not installed"
    shown = json.dumps(blocks) + json.dumps(requests.post(f"{api}/automations/filter", json={}, timeout=10).json())
    assert token not in shown and hook not in shown
    assert alert[0]["data"]["url"] == "{{ webhook_url }}"
    # and the server still fills the URL in: a failed run is posted to the token's path
    flow = textwrap.dedent('''
        from prefect import flow

        @flow(name="secret-webhook-probe")
        def probe():
            raise RuntimeError("probe fails on purpose")

        probe(return_state=True)
    ''')
    (tmp_path / "probe.py").write_text(flow)
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(tmp_path / "probe.py")], env=env, cwd=tmp_path, check=True, timeout=180,
                   capture_output=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        posts = [r for r in watched["receiver"].requests if r["method"] == "POST"]
        if posts:
            break
        time.sleep(1)
    assert posts, "the failed run was not posted to the webhook within 90 s"
    assert posts[0]["path"] == f"/alerts/{token}"
    assert b"Failed" in posts[0]["body"]


@pytest.mark.services
def test_stored_data_scans_find_a_planted_credential_and_pass_on_the_stack(watched):
    """The fault suite's scan of stored data (tests/faults/helpers.py): S3 objects and the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import LogCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env, api = watched["env"], watched["api"]
    real = [env[k] for k in SECRET_KEYS] + [watched["hook"], watched["token"]]
    cfg = S3Config.from_env(env)
    clean_s3 = scan_s3_for_secrets(cfg, real)
    clean_prefect = scan_prefect_for_secrets(api, real)
    print("\n" + clean_s3.summary() + "\n" + clean_prefect.summary())
    assert clean_prefect.scanned > 0           # at least the automations, the block, the probe's run and logs

    planted = "planted-" + secrets.token_hex(12)
    client = cfg.client()
    # across a chunk boundary: the scan's overlap must join the two halves
    body = b"x" * 60 + planted.encode() + b"y" * 200
    client.put_object(Bucket="segpipe", Key="scan-check/leak.bin", Body=body)
    client.put_object(Bucket="dvc", Key="scan-check/big.bin", Body=b"z" * 4096)
    try:
        with pytest.raises(AssertionError, match="s3://segpipe/scan-check/leak.bin"):
            scan_s3_for_secrets(cfg, [planted], chunk=64)
        skipped = scan_s3_for_secrets(cfg, [planted], buckets=["dvc"], max_bytes=1024)
        assert any("dvc/scan-check/big.bin" in s for s in skipped.skipped) and "skipped 1" in skipped.summary()
    finally:
        client.delete_object(Bucket="segpipe", Key="scan-check/leak.bin")
        client.delete_object(Bucket="dvc", Key="scan-check/big.bin")

    from datetime import datetime, timezone
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as pc:
        pc.create_logs([LogCreate(name="segpipe.scan-check", level=20, message=f"oops {planted}",
                                  timestamp=datetime.now(timezone.utc))])
    with pytest.raises(AssertionError, match="Prefect log"):
        scan_prefect_for_secrets(api, [planted])


# ------------------------------------------------------------------------------------------------ no stack needed
def test_configure_dvc_replaces_a_world_readable_config_local(tmp_path):
    """`dvc remote modify --local` kept an old 0644 file's mode (and had the secret on argv); the file is now a new
    0600 one, other settings kept, read back by DVC."""
    project = _dvc_project(tmp_path)
    local = project / ".dvc" / "config.local"
    local.write_text("[core]\n    autostage = true\n['remote \"other\"']\n    url = /tmp/elsewhere\n")
    local.chmod(0o644)
    before = local.stat().st_ino
    env = {"SEGPIPE_S3_ENDPOINT": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "AKTEST" + secrets.token_hex(4),
           "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}
    assert stack.configure_dvc_from_env(project, env)
    assert stat.S_IMODE(local.stat().st_mode) == 0o600 and local.stat().st_ino != before
    assert _dvc_config(project, "remote.storage.secret_access_key") == env["AWS_SECRET_ACCESS_KEY"]
    assert _dvc_config(project, "remote.storage.endpointurl") == "http://127.0.0.1:9"
    assert _dvc_config(project, "remote.other.url") == "/tmp/elsewhere"
    assert _dvc_config(project, "core.autostage") == "true"
    storage = local.read_text().split('remote "storage"')[1]
    assert not re.search(r"^\s*url\s*=", storage, re.M)          # the project's own url is not shadowed
    # the temp file lives in .dvc/tmp (git-ignored by DVC) and is gone
    assert not [p for p in (project / ".dvc").iterdir() if p.name.startswith(".config.local")]
    # again: idempotent, one section, new values
    env["AWS_SECRET_ACCESS_KEY"] = secrets.token_hex(20)
    stack.configure_dvc_from_env(project, env)
    assert local.read_text().count('remote "storage"') == 1
    assert _dvc_config(project, "remote.storage.secret_access_key") == env["AWS_SECRET_ACCESS_KEY"]


def test_configure_dvc_adds_the_remote_a_project_lacks(tmp_path):
    """And a secret with what DVC's parser reads specially (`#` a comment, `,` a list) comes back unchanged."""
    project = _dvc_project(tmp_path, remote=False)
    secret = 'se#cret,with "a quote" ' + secrets.token_hex(8)
    stack.configure_dvc_from_env(project, {"SEGPIPE_S3_ENDPOINT": "http://127.0.0.1:9",
                                           "AWS_ACCESS_KEY_ID": "AKTESTKEY1", "AWS_SECRET_ACCESS_KEY": secret})
    assert _dvc_config(project, "remote.storage.url") == stack.DVC_REMOTE_URL
    assert _dvc_config(project, "remote.storage.secret_access_key") == secret
    assert stat.S_IMODE((project / ".dvc" / "config.local").stat().st_mode) == 0o600


def test_webhook_is_refused_on_the_command_line(capsys, tmp_path):
    url = "http://127.0.0.1:9/hook/not-a-real-token"
    assert cli.main(["stack", "up", "--home", str(tmp_path / "home"), "--alert-webhook", url]) == 2
    err = capsys.readouterr().err
    assert stack.ALERT_WEBHOOK_ENV in err and "ps" in err and url not in err
    assert not (tmp_path / "home").exists()                   # refused before anything started
    res = subprocess.run([sys.executable, "-m", "flows.monitoring", "install", "--webhook", url], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert res.returncode == 2 and "SEGPIPE_ALERT_WEBHOOK" in res.stderr and url not in res.stderr
    bad = subprocess.run([sys.executable, "-m", "flows.monitoring", "install"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO),
                                                      "PREFECT_API_URL": "http://127.0.0.1:9/api",
                                                      "SEGPIPE_ALERT_WEBHOOK": "ftp-secret-token-value"})
    assert bad.returncode == 2 and "not an http(s) URL" in bad.stderr and "ftp-secret-token-value" not in bad.stderr


@pytest.mark.parametrize("base_url, key, host, ok", [
    ("http://127.0.0.1:8765", "k" * 12, None, True),                 # the stack's key, the local emulator
    ("http://127.0.0.1:40123/", "k" * 12, None, True),               # any port: the check is on the host
    ("http://localhost:8765", "k" * 12, None, True),
    ("https://leaderboard.example", "k" * 12, None, False),          # no recorded host: loopback only
    ("https://leaderboard.example/x", "k" * 12, "leaderboard.example", True),
    ("https://Leaderboard.Example:8443", "k" * 12, "https://leaderboard.example", True),
    ("https://evil.example", "k" * 12, "leaderboard.example", False),
    ("http://127.0.0.1:8765", "k" * 12, "leaderboard.example", False),   # a real key never goes to a local server
    ("https://leaderboard.example", {"key": "k" * 12, "host": "leaderboard.example"}, None, True),
    ("https://evil.example", {"key": "k" * 12, "host": "leaderboard.example"}, "evil.example", False),
])
def test_key_host_check(monkeypatch, base_url, key, host, ok):
    monkeypatch.delenv(KEY_HOST_ENV, raising=False)
    if ok:
        assert check_key_host(base_url, key, host) == "k" * 12
    else:
        with pytest.raises(KeyHostMismatch) as e:
            check_key_host(base_url, key, host)
        assert "k" * 12 not in str(e.value)


def test_key_is_never_sent_to_another_host(monkeypatch):
    receiver = Receiver(status=404)
    key = secrets.token_urlsafe(24)
    try:
        monkeypatch.setenv(KEY_HOST_ENV, "leaderboard.example")
        with pytest.raises(KeyHostMismatch, match="to 127.0.0.1: it was issued for leaderboard.example") as e:
            LeaderboardClient(receiver.url, 1, key).limits()
        assert key not in str(e.value) and KEY_HOST_ENV in str(e.value)
        params = SubmitParams(base_url=receiver.url, competition_id=1)
        # the flow's start-up check, with a key kept with its host in a Prefect Secret block's JSON value
        with pytest.raises(KeyHostMismatch, match="issued for leaderboard.example \\(the host stored with the key\\)"):
            submit_stage.preflight(params, {"key": key, "host": "leaderboard.example"})
        monkeypatch.delenv(KEY_HOST_ENV)
        with pytest.raises(KeyHostMismatch, match="no host is recorded"):
            LeaderboardClient("https://leaderboard.example", 1, key)
        assert receiver.requests == []                  # nothing reached a host the key was not issued for
        # the control: the host it was issued for (any port) does get it
        monkeypatch.setenv(KEY_HOST_ENV, "127.0.0.1")
        with pytest.raises(LeaderboardError):
            LeaderboardClient(receiver.url, 1, key, retries=0).limits()
        assert receiver.requests[0]["headers"]["Authorization"] == f"Bearer {key}"
    finally:
        receiver.close()


def test_submit_main_fails_before_writing_the_csv(tmp_path, monkeypatch):
    """A params file whose submit.base_url is another host than the key's: `python -m pipelines.submit` stops at
    once, naming both hosts, with no CSV written and nothing sent."""
    import numpy as np

    receiver = Receiver()
    try:
        infer = tmp_path / "infer"
        infer.mkdir()
        np.save(infer / "test_masks.npy", np.zeros((1, 8, 8), np.uint8))
        (infer / "test_index.json").write_text(json.dumps({"file_names": ["a.jpg"]}))
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({
            "data": {"root": "data/raw", "classes": ["Background", "Paper"]},
            "submit": {"base_url": receiver.url, "competition_id": 1, "ledger": str(tmp_path / "ledger.json")}}))
        monkeypatch.setenv("SEGPIPE_LEADERBOARD_KEY", secrets.token_urlsafe(24))
        monkeypatch.setenv(KEY_HOST_ENV, "leaderboard.example")
        with pytest.raises(SystemExit) as e:
            submit_stage.main(["--params", str(tmp_path / "params.yaml"), "--infer", str(infer),
                               "--out", str(tmp_path / "out")])
        assert "127.0.0.1" in str(e.value) and "leaderboard.example" in str(e.value)
        assert not (tmp_path / "out" / "submission.csv").exists() and receiver.requests == []
    finally:
        receiver.close()
