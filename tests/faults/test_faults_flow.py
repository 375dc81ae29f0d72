"""Faults seen by the flow itself, under a real Prefect server: bad credentials (scenario 8), one member out of
memory (scenario 9), bad inputs (scenario 10). Each asserts what did *not* run, from the server's task runs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from segpipe.storage import ArtifactStore, S3Config
from tests.faults.helpers import REPO, Row, TRAINED, assert_no_secrets, assert_nothing_stored_leaks, record, verify_prefix
from tests.tiny import copy_project, shrink_params


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=180):
        yield


def _stored_scan(values: list[str], weed_env: dict[str, str]) -> list[str]:
    """The stored side of the secret scan: every object in this module's SeaweedFS and everything the test Prefect
    server shows; the summaries go into the row's details."""
    from prefect.settings import PREFECT_API_URL
    scans = assert_nothing_stored_leaks(values, s3=S3Config.from_env(weed_env), prefect_api=PREFECT_API_URL.value())
    return [sc.summary() for sc in scans]


def _task_runs(state) -> dict[str, tuple[str, int]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {r.name: (r.state_type.value, r.run_count) for r in runs}


def _logs(state) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read():
        async with get_client() as c:
            return await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[state.state_details.flow_run_id])))
    return [log.message for log in asyncio.run(read())]


@pytest.fixture(scope="module")
def project(tmp_path_factory, board):
    from test_leaderboard import CID
    root = copy_project(tmp_path_factory.mktemp("p") / "project")
    shrink_params(root / "params.yaml", submit={"base_url": board["server"].url, "competition_id": CID,
                                                 "ledger": ".segpipe/submissions.json"})
    (root / ".dvc" / "config").write_text("")           # no DVC remote: fetch's `dvc push` only warns
    return root


def test_08_bad_or_missing_credentials_fail_at_start_up_before_any_work(prefect_server, project, weed_env,
                                                                         monkeypatch):
    """Scenario 8: a wrong or missing S3 secret, a wrong or missing leaderboard key: the flow fails at once with a
    message naming what to set, before a single task runs; no secret shows in the error or the run's logs."""
    from flows.full_pipeline import full_pipeline
    from test_leaderboard import KEYS
    t0 = time.monotonic()
    monkeypatch.chdir(project)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    good_secret = weed_env["AWS_SECRET_ACCESS_KEY"]
    wrong = "wrong-" + uuid.uuid4().hex
    cases = {
        "S3 secret wrong": ({"AWS_SECRET_ACCESS_KEY": wrong, "SEGPIPE_LEADERBOARD_KEY": KEYS["erin"]},
                            r"refused the credentials .*AWS_SECRET_ACCESS_KEY"),
        "S3 credentials missing": ({"AWS_ACCESS_KEY_ID": None, "SEGPIPE_LEADERBOARD_KEY": KEYS["erin"]},
                                   r"S3 credentials missing: AWS_ACCESS_KEY_ID not set"),
        "leaderboard key wrong": ({"SEGPIPE_LEADERBOARD_KEY": wrong}, r"401 .*check SEGPIPE_LEADERBOARD_KEY"),
        "leaderboard key missing": ({"SEGPIPE_LEADERBOARD_KEY": None}, r"SEGPIPE_LEADERBOARD_KEY is not set"),
    }
    outcomes = []
    for name, (env, message) in cases.items():
        with monkeypatch.context() as m:
            for k, v in env.items():
                if v is None:
                    m.delenv(k, raising=False)
                else:
                    m.setenv(k, v)
            rid = f"creds-{uuid.uuid4().hex[:6]}"
            t = time.monotonic()
            state = full_pipeline(params_file="params.yaml", submit=True, run_name=rid, return_state=True)
            took = time.monotonic() - t
        assert state.is_failed(), name
        with pytest.raises(Exception, match=message) as e:
            state.result()
        assert _task_runs(state) == {}, f"{name}: tasks ran before the credentials were checked"
        assert not (project / "runs" / rid).exists()
        assert ArtifactStore(S3Config.from_env(weed_env)).list(f"runs/{rid}/") == []
        assert_no_secrets([good_secret, wrong, KEYS["erin"]], [], [str(e.value), *_logs(state)])
        outcomes.append(f"{name}: failed in {took:.1f}s, 0 tasks ({type(e.value).__name__})")
    outcomes += _stored_scan([good_secret, weed_env["AWS_ACCESS_KEY_ID"], wrong, KEYS["erin"]], weed_env)
    record(Row("8 bad / missing credentials (S3, leaderboard)", "short", len(cases),
               "failed at start-up with a message naming the variable to set; no task ran", "none (no work started)",
               "nothing", time.monotonic() - t0, outcomes))


def test_09_one_member_out_of_memory_fails_with_advice_and_the_others_finish(prefect_server, tiny, tmp_path,
                                                                              weed_env, monkeypatch):
    """Scenario 9: every training process runs under the same address-space cap (RLIMIT_AS, set by a test-only
    sitecustomize on PYTHONPATH); the member with a 10x decoder runs out of memory in its training step and fails
    at once with the advice (no retry: it would fail the same way); the small one finishes and is stored."""
    from prefect import flow
    from flows.caching import StageRunner
    from flows.full_pipeline import fan_out
    from pipelines.contentkey import StageKeys
    from segpipe.config import FanoutParams
    from test_training_chain import CLASSES
    t0 = time.monotonic()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"root": "unused", "classes": list(CLASSES)},
        "train": {"models": {"small": {"arch": "unet", "encoder": "resnet18"},
                             "huge": {"arch": "unet", "encoder": "resnet18",
                                      "kwargs": {"decoder_channels": [2048, 1024, 512, 256, 128]}}},
                  "seeds": [0], "folds": [0], "epochs": 1, "batch_size": 4, "input_size": 32, "lr": 0.003,
                  "weight_decay": 0.0, "warmup_epochs": 0, "num_workers": 0, "threads": 1}}))
    shutil.copytree(tiny / "validate", tmp_path / "validate")
    shutil.copytree(tiny / "split", tmp_path / "split")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", f"{REPO / 'tests' / 'faults' / 'memcap'}{os.pathsep}{REPO}")
    monkeypatch.setenv("SEGPIPE_FAULT_MEMCAP_GIB", "5.0")
    prefix = f"runs/oom-{uuid.uuid4().hex[:8]}"

    @flow
    def two_members():
        stages = StageRunner(StageKeys(REPO / "params.yaml", root=REPO), ArtifactStore(S3Config.from_env()),
                             prefix.rsplit("/", 1)[1], tmp_path, prefix)
        # fresh interpreters (warm_start false): a member forked from the warm server starts with the server's
        # address space (great-expectations and torch imported, a few GiB of it virtual), which RLIMIT_AS counts,
        # so the cap would no longer tell the two members apart
        outs, _ = fan_out(stages, "train", [("huge", 0, 0), ("small", 0, 0)], tmp_path, "params.yaml",
                          FanoutParams(slots_per_gpu=1, cpu_slots=2, warm_start=False), [prefix])  # this test's keys
        return outs

    state = two_members(return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match=r"1 of 2 members failed \(huge-s0-f0\)"):
        state.result()
    logs = _logs(state)
    assert any("TrainingOOM: out of device memory at batch size 4: lower train.batch_size (try 2" in m for m in logs)
    runs = _task_runs(state)
    assert runs["train-huge-s0-f0"] == ("FAILED", 1), runs          # not retried: it would only fail again
    assert runs["train-small-s0-f0"] == ("COMPLETED", 1), runs
    assert (tmp_path / "train" / "small-s0-f0" / "best.pt").is_file()
    assert not (tmp_path / "train" / "huge-s0-f0").exists()
    keys = verify_prefix(ArtifactStore(S3Config.from_env()), prefix)
    assert any("small-s0-f0/best.pt" in k for k in keys) and not any("huge" in k for k in keys)
    trained = [TRAINED.match(m).group(1) for m in logs if TRAINED.match(m)]
    assert sorted(trained) == ["huge-s0-f0", "small-s0-f0"]          # each trained once
    assert_no_secrets([weed_env["AWS_SECRET_ACCESS_KEY"]], [tmp_path / "train"], logs)
    scans = _stored_scan([weed_env["AWS_SECRET_ACCESS_KEY"], weed_env["AWS_ACCESS_KEY_ID"]], weed_env)
    record(Row("9 one training task out of memory", "short", 1,
               "that member failed at once with TrainingOOM advice (lower train.batch_size, try 2 with "
               "train.grad_accum 2); the other finished and was stored; the flow failed naming the member",
               f"none: trainings {sorted(trained)}, each member once; the OOM task ran "
               f"{runs['train-huge-s0-f0'][1]} time(s) (not retried)", "nothing", time.monotonic() - t0,
               ["RLIMIT_AS 5 GiB on every training process; the OOM member has a 10x decoder (~6.2 GiB peak)"]
               + scans))


def _break(root: Path, kind: str) -> None:
    d = json.loads((root / "train_all.json").read_text())
    if kind == "annotation of a missing image":
        d["annotations"][3]["image_id"] = 999
        (root / "train_all.json").write_text(json.dumps(d))
    elif kind == "truncated photo":
        photo = root / d["images"][2]["file_name"]
        photo.write_bytes(photo.read_bytes()[: photo.stat().st_size // 3])
    elif kind == "test photo leaked into train":
        t = json.loads((root / "test.json").read_text())
        shutil.copy(root / d["images"][0]["file_name"], root / t["images"][0]["file_name"])
    else:
        raise KeyError(kind)


def test_10_bad_inputs_reach_no_stage_past_validation(prefect_server, project, weed_env, monkeypatch):
    """Scenario 10: each kind of bad input fails validate once (never retried); no split, train, upload, infer or
    submit task is created, nothing is written under the run's prefix in S3, no validate output is left half."""
    from flows.full_pipeline import full_pipeline
    from segpipe.config import TRASH_CLASSES
    from segpipe.synth import generate
    from segpipe.validation import DataValidationError
    t0 = time.monotonic()
    monkeypatch.chdir(project)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    kinds = ["annotation of a missing image", "truncated photo", "test photo leaked into train"]
    outcomes = []
    store = ArtifactStore(S3Config.from_env(weed_env))
    for i, kind in enumerate(kinds):
        bad = project / "data" / f"bad{i}"
        generate(bad, project / "data" / f"bad{i}-hidden", n_train=12, n_test=4, image_size=64, n_batches=2,
                 val_fraction=0.25, seed=0, classes=TRASH_CLASSES)
        _break(bad, kind)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["data"]["root"] = f"data/bad{i}"
        (project / f"bad{i}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        rid = f"bad-{i}-{uuid.uuid4().hex[:6]}"
        state = full_pipeline(params_file=f"bad{i}.yaml", submit=False, run_name=rid, return_state=True)
        assert state.is_failed(), kind
        with pytest.raises(DataValidationError) as e:
            state.result()
        runs = _task_runs(state)
        assert {n.rsplit("-", 1)[0]: v for n, v in runs.items() if not n.startswith("dvc-push")} == {
            "fetch": ("COMPLETED", 1), "validate": ("FAILED", 1)}, (kind, runs)     # (the DVC push runs beside)
        assert not (project / "runs" / rid / "validate").exists()
        # nothing past validate (the run's timing log, a measurement aid, holds validate's process start)
        assert not [p for p in (project / "runs" / rid).rglob("*") if p.is_file() and p.name != "timings.jsonl"]
        assert store.list(f"runs/{rid}/") == []
        outcomes.append(f"{kind}: {' '.join(str(e.value).split())[:160]}")
    outcomes += _stored_scan([weed_env["AWS_SECRET_ACCESS_KEY"], weed_env["AWS_ACCESS_KEY_ID"]], weed_env)
    record(Row("10 bad inputs", "short", len(kinds), "validate failed once per bad input, with a message naming the "
               "record; no task past validate ran, nothing written under the run's prefix", "none", "nothing",
               time.monotonic() - t0, outcomes))
