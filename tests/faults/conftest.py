"""Fixtures of the fault suite: its own SeaweedFS (so it can be stopped), tiny training inputs, a Prefect server."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, free_port_block  # noqa: F401  (free_port: test_leaderboard imports it from `conftest`)
from tests.faults.helpers import REPO, Weed, finish_report, note_outcome, start_report

sys.path.insert(0, str(REPO / "tests"))           # test_training_chain.make_tiny, as the other tests import it


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.services)


# ---- the report: one run per report, naming its commit; a scenario that failed or did not run says so
_REPORTING: list[bool] = []


def pytest_collection_finish(session):
    selected = [i.nodeid for i in session.items if "tests/faults/" in i.nodeid]
    if selected:
        _REPORTING.append(True)
        start_report(shlex.join(["pytest", *session.config.invocation_params.args]), selected)


def pytest_runtest_logreport(report):
    if not _REPORTING or "tests/faults/" not in report.nodeid:
        return
    if report.failed:
        text = report.longreprtext.splitlines()
        first = next((ln[1:].strip() for ln in text if ln.startswith("E ")), text[-1] if text else "")
        note_outcome(report.nodeid, f"FAILED in {report.when}: {first[:200]}")
    elif report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        note_outcome(report.nodeid, f"skipped: {str(reason)[:200]}")
    elif report.when == "call":
        note_outcome(report.nodeid, "passed")


def pytest_sessionfinish(session):
    if _REPORTING:
        finish_report()


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    """A SeaweedFS this module owns: the tests stop and restart it."""
    w = Weed(tmp_path_factory.mktemp("weed"), free_port_block(8))
    w.start()
    yield w
    w.stop()


@pytest.fixture
def weed_env(weed, monkeypatch) -> dict[str, str]:
    """`weed` exported as the pipelines read it, with PYTHONPATH so subprocesses import this checkout's code."""
    env = {**weed.env(), "PYTHONPATH": str(REPO), "SEGPIPE_S3_RETRY_SECONDS": "120"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {**os.environ}


def train_params(path: Path, **train) -> Path:
    """One tiny model (Unet/ResNet18 at 32 px), one seed, folds 0 and 1: seconds per epoch on one CPU thread."""
    from test_training_chain import CLASSES
    t = {"models": {"unet_r18": {"arch": "unet", "encoder": "resnet18"}}, "seeds": [0], "folds": [0, 1],
         "epochs": 3, "batch_size": 4, "input_size": 32, "lr": 0.003, "weight_decay": 0.0, "warmup_epochs": 0,
         "num_workers": 0, "threads": 1}
    t.update(train)
    path.write_text(yaml.safe_dump({"data": {"root": "unused", "classes": list(CLASSES)}, "train": t}))
    return path


def train_cmd(params: Path, root: Path, out_root: Path, fold: int = 0, model: str = "unet_r18") -> list[str]:
    return [sys.executable, "-m", "pipelines.train", "--params", str(params), "--model", model, "--seed", "0",
            "--fold", str(fold), "--validate", str(root / "validate"), "--split", str(root / "split"),
            "--out-root", str(out_root)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """make_tiny's validated index + a 2-fold split (read-only inputs, shared by a module's tests)."""
    from pipelines import split
    from segpipe.config import SplitParams
    from test_training_chain import make_tiny
    root = tmp_path_factory.mktemp("tiny")
    make_tiny(root)
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), root / "validate", root / "split")
    return root


@pytest.fixture(scope="module")
def board(weed, tmp_path_factory):
    from test_leaderboard import Server, write_labels
    root = tmp_path_factory.mktemp("lb")
    names, labels = write_labels(root / "labels")
    server = Server(weed.cfg, root / "labels", root / "state", root / "server.log")
    yield {"server": server, "names": names, "labels": labels, "root": root}
    server.stop()
