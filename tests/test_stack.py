"""`segpipe stack`: real SeaweedFS + Prefect server + worker on free ports under tmp_path."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from segpipe import cli, stack
from segpipe.storage import ArtifactStore, S3Config
from tests.conftest import free_port_block

pytestmark = pytest.mark.services

SERVICES = ["s3", "prefect", "worker"]   # the leaderboard server is tested with its own module


def _free_ports() -> dict[str, int]:
    """s3 + weed's 7 internal ports (consecutive) and their +10000 gRPC twins, and a Prefect port."""
    base = free_port_block(10)
    return {"s3": base, "prefect": base + 9}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A DVC project with the `storage` remote the lead puts in .dvc/config."""
    root = tmp_path_factory.mktemp("project")
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([dvc, "remote", "add", "-d", "storage", "s3://dvc/segpipe"], cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def running(tmp_path_factory, project):
    home = tmp_path_factory.mktemp("stack") / "home"
    ports = _free_ports()
    t0 = time.monotonic()
    try:
        st = stack.up(home, ports, SERVICES, cwd=project)
        yield {"home": home, "ports": ports, "status": st, "seconds": time.monotonic() - t0}
    finally:
        stack.down(home)


def test_up_starts_s3_prefect_worker(running):
    st = running["status"]
    assert {k: st[k]["state"] for k in SERVICES} == dict.fromkeys(SERVICES, "running")
    assert st["leaderboard"]["state"] == "stopped"
    env = stack.load_env(running["home"])
    assert env["SEGPIPE_S3_ENDPOINT"] == f"http://127.0.0.1:{running['ports']['s3']}"
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{running['ports']['prefect']}/api"
    assert env["SEGPIPE_S3_BUCKET"] == "segpipe" and len(env["SEGPIPE_LEADERBOARD_KEY"]) >= 20
    for bucket in ("segpipe", "dvc"):   # both buckets exist and the generated credentials work
        ArtifactStore(S3Config.from_env({**env, "SEGPIPE_S3_BUCKET": bucket}), retry_seconds=5).check()


def test_credentials_file_is_private(running):
    path = running["home"] / "credentials.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(running["home"].stat().st_mode) == 0o700
    secret = stack.load_env(running["home"])["AWS_SECRET_ACCESS_KEY"]
    for log in (running["home"] / "logs").glob("*.log"):
        assert secret not in log.read_text(errors="replace"), log


def test_second_up_is_a_noop(running):
    before = {k: v["pid"] for k, v in running["status"].items()}
    env_before = stack.load_env(running["home"])
    t0 = time.monotonic()
    st = stack.up(running["home"], running["ports"], SERVICES, cwd=running["home"])
    assert time.monotonic() - t0 < 15
    assert {k: v["pid"] for k, v in st.items()} == before
    assert stack.load_env(running["home"]) == env_before           # secrets are generated once


def test_no_hidden_labels_starts_without_leaderboard_and_says_so(running, tmp_path, monkeypatch, capsys, caplog):
    """Real data: data.hidden_labels is empty, so a plain `stack up` leaves the leaderboard out instead of failing."""
    (tmp_path / "params.yaml").write_text('data: {root: data/raw, classes: [Background, Paper], hidden_labels: ""}\n')
    monkeypatch.chdir(tmp_path)
    args = ["stack", "up", "--home", str(running["home"]), "--s3-port", str(running["ports"]["s3"]),
            "--prefect-port", str(running["ports"]["prefect"])]
    with caplog.at_level("INFO", logger="segpipe.stack"):
        assert cli.main(args) == 0
    assert "leaderboard: not started: data.hidden_labels is empty" in caplog.text
    assert "--labels DIR" in caplog.text
    assert "not started (data.hidden_labels is empty)" in capsys.readouterr().out   # and the status table
    st = stack.status(running["home"])
    assert {k: st[k]["state"] for k in SERVICES} == dict.fromkeys(SERVICES, "running")
    assert st["leaderboard"]["state"] == "not started (data.hidden_labels is empty)"
    # naming the leaderboard makes it required: the same params fail, saying what to pass
    with pytest.raises(stack.StackError, match="data.hidden_labels is empty.*--labels DIR"):
        stack.up(running["home"], running["ports"], ["leaderboard"], cwd=tmp_path)


def test_status_cli_lists_urls(running, capsys):
    assert cli.main(["stack", "status", "--home", str(running["home"])]) == 0
    out = capsys.readouterr().out
    s3, prefect = running["ports"]["s3"], running["ports"]["prefect"]
    assert f"http://127.0.0.1:{s3}" in out
    assert f"http://127.0.0.1:{prefect} " in out + " " and f"http://127.0.0.1:{prefect}/api" in out
    assert out.count("running") >= 4   # s3, prefect, prefect-api, worker


def test_worker_polls_the_segpipe_pool(running):
    import requests

    api = f"http://127.0.0.1:{running['ports']['prefect']}/api"
    pool = requests.get(f"{api}/work_pools/segpipe", timeout=10).json()
    assert pool["type"] == "process"
    workers = requests.post(f"{api}/work_pools/segpipe/workers/filter", json={}, timeout=10).json()
    assert any(w["name"].startswith("segpipe-") for w in workers)


def test_port_conflict_names_the_port(running, tmp_path, capsys):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(stack.StackError, match=f"port {port} \\(prefect"):
            stack.up(tmp_path / "other", {"prefect": port}, ["prefect"], cwd=tmp_path)
        rc = cli.main(["stack", "up", "--home", str(tmp_path / "other2"), "--only", "prefect",
                       "--prefect-port", str(port)])
        assert rc != 0 and f"port {port}" in capsys.readouterr().err
    assert stack.status(tmp_path / "other")["prefect"]["state"] == "stopped"


def test_dvc_remote_credentials_only_in_config_local(running, project):
    env = stack.load_env(running["home"])
    local = (project / ".dvc" / "config.local").read_text()
    shared = (project / ".dvc" / "config").read_text()
    assert env["AWS_SECRET_ACCESS_KEY"] in local and env["SEGPIPE_S3_ENDPOINT"] in local
    # written by the stack, not `dvc remote modify` (argv), and private like credentials.env
    assert stat.S_IMODE((project / ".dvc" / "config.local").stat().st_mode) == 0o600
    assert env["AWS_SECRET_ACCESS_KEY"] not in shared and env["AWS_ACCESS_KEY_ID"] not in shared
    # and `dvc push` really reaches the stack's S3
    dvc = str(Path(sys.executable).parent / "dvc")
    (project / "data.txt").write_text("hello dvc\n")
    subprocess.run([dvc, "add", "-q", "data.txt"], cwd=project, check=True)
    subprocess.run([dvc, "push", "-q"], cwd=project, check=True, timeout=120)
    store = ArtifactStore(S3Config.from_env({**env, "SEGPIPE_S3_BUCKET": "dvc"}), retry_seconds=5)
    assert store.list("segpipe/")


def test_store_rides_out_an_s3_restart(running):
    """A write issued while S3 is down waits (bounded backoff) and lands once `up` restarts it."""
    home, env = running["home"], stack.load_env(running["home"])
    store = ArtifactStore(S3Config.from_env(env), prefix="restart", retry_seconds=60)
    store.put_bytes(b"before", "a.txt")
    assert stack._stop(stack._load_state(home)["services"]["s3"])
    restarter = threading.Timer(2.0, stack.up, args=(home, running["ports"], ["s3"]), kwargs={"cwd": home})
    restarter.start()
    try:
        t0 = time.monotonic()
        store.put_bytes(b"after", "b.txt")
        assert time.monotonic() - t0 >= 1.5                      # it really waited for the restart
    finally:
        restarter.join()
    assert store.get_bytes("a.txt") == b"before" and store.get_bytes("b.txt") == b"after"   # data kept


def test_down_stops_only_its_own_processes(running):
    home = running["home"]
    pids = {k: v["pid"] for k, v in stack.status(home).items() if v["pid"]}
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        # a recorded service whose pid now belongs to someone else (pid reuse) must not be killed
        state = stack._load_state(home)
        state["services"]["leaderboard"] = {"pid": stranger.pid, "start_time": 1, "log": "-", "cmd": []}
        stack._save_state(home, state)
        stopped = stack.down(home)
        assert sorted(stopped) == sorted(SERVICES)
        for pid in pids.values():
            assert stack._start_time(pid) is None
        assert stranger.poll() is None                         # untouched
        assert stack._load_state(home)["services"] == {}
        assert (home / "s3" / "data").is_dir() and (home / "credentials.env").is_file()   # data kept
        assert all(v["state"] == "stopped" for v in stack.status(home).values())
    finally:
        stranger.kill()
        stranger.wait()
