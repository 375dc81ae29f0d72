"""`fetch` without the generator: the dataset comes from its `.dvc` file (`dvc add` / `dvc import-url`)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import fetch
from segpipe.config import DataParams

DVC = str(Path(sys.executable).parent / "dvc")
DATA = DataParams(root="data/raw", classes=("Background", "Paper"))


def dvc(cwd: Path, *args: str) -> None:
    subprocess.run([DVC, *args], cwd=cwd, check=True, capture_output=True, env={"DVC_NO_ANALYTICS": "1",
                                                                                 "PATH": "/usr/bin:/bin"})


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A DVC project whose remote cannot be reached, with data/raw brought in by `dvc add <folder> -o data/raw`."""
    outside = tmp_path / "dataset"
    (outside / "images").mkdir(parents=True)
    (outside / "images" / "a.png").write_bytes(b"not really a png")
    (outside / "classes.txt").write_text("Background\nPaper\n")
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    dvc(root, "init", "--no-scm", "-q")
    dvc(root, "remote", "add", "-d", "storage", "s3://dvc/none")
    dvc(root, "remote", "modify", "storage", "endpointurl", "http://127.0.0.1:9")   # nothing listens there
    dvc(root, "add", "-q", str(outside), "-o", "data/raw")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"validate": {"cmd": "true", "deps": ["data/raw"]}}}))
    monkeypatch.chdir(root)
    return root


def test_the_dvc_file_gives_the_version_and_an_unreachable_remote_only_warns(project, caplog):
    """DVC 3's `pull` asks the remote even when its cache holds everything: offline, the workspace is enough."""
    assert fetch.producing_stage("data/raw") is None and fetch.tracking_file("data/raw") == Path("data/raw.dvc")
    md5 = yaml.safe_load((project / "data/raw.dvc").read_text())["outs"][0]["md5"]
    with caplog.at_level(logging.WARNING, logger="pipelines.fetch"):
        assert fetch.run(DATA, push=False) == md5.removesuffix(".dir")[:12]
    assert "the workspace already holds this version" in caplog.text


def test_a_changed_workspace_with_no_remote_fails_naming_the_dvc_file(project):
    (project / "data/raw/images/b.png").write_bytes(b"new")
    with pytest.raises(RuntimeError, match=r"`dvc pull data/raw.dvc` failed and data/raw is missing or differs"):
        fetch.run(DATA, push=False)


def test_data_not_under_dvc_says_how_to_bring_it_in(tmp_path, monkeypatch, caplog):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not under DVC.*dvc add <dataset> -o data/raw.*dvc import-url"):
        fetch.run(DATA, push=False)           # missing and nothing to pull it from
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/a.png").write_bytes(b"x")
    version = fetch.run(DATA, push=False)     # placed by hand: runs, warning that no other machine can pull it
    assert len(version) == 12
    assert "not under DVC" in caplog.text and "dvc add <dataset> -o data/raw" in caplog.text


def test_the_generator_stage_is_reproduced_not_pulled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("dvc.yaml").write_text(yaml.safe_dump({"stages": {"generate": {"cmd": "x", "outs": ["data/raw",
                                                                                                "data/leaderboard"]}}}))
    assert fetch.producing_stage("data/raw") == "generate" and fetch.producing_stage("data/raw/train_all.json") \
        == "generate"
    assert fetch.producing_stage("data/other") is None


def test_a_dvc_call_waits_for_the_lock_another_process_holds_within_a_bound(project, monkeypatch):
    """A second dvc process holding the repository lock is waited for, not failed on; past the bound
    (SEGPIPE_DVC_LOCK_WAIT_SECONDS) the call fails naming the lock and the knob instead of hanging a nightly run."""
    import threading
    import time

    import zc.lockfile

    from pipelines.dvccli import LOCK_WAIT_ENV

    lock = zc.lockfile.LockFile(str(project / ".dvc" / "tmp" / "lock"))     # what a running dvc holds
    held = 6.0                                                             # past dvc's own ~3 s of tries
    threading.Timer(held, lock.close).start()
    t0 = time.monotonic()
    res = fetch._dvc("status", "--json", check=False)
    waited = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert waited >= held * 0.9
    # the same call while the lock is held, without the wait, fails: the wait is what made the difference
    lock = zc.lockfile.LockFile(str(project / ".dvc" / "tmp" / "lock"))
    try:
        plain = subprocess.run([DVC, "status", "--json"], capture_output=True, text=True)
        assert plain.returncode != 0 and "Unable to acquire lock" in plain.stderr + plain.stdout
        # a holder that never lets go: the bounded wait gives up, naming the lock and the knob
        monkeypatch.setenv(LOCK_WAIT_ENV, "4")
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"\.dvc/tmp/lock.*{LOCK_WAIT_ENV}"):
            fetch._dvc("status", "--json")
        assert 4 <= time.monotonic() - t0 < 60
    finally:
        lock.close()
