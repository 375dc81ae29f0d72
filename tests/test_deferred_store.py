"""A stage's files go to S3 in a `store` task of their own, started when the stage ends, while the next stages
run; the run counts as done only once every one is stored, and a store that fails fails the run, naming the
stage (real Prefect, real SeaweedFS)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from segpipe.storage import ArtifactStore, S3Config, StorageError, sha256_file
from tests.tiny import REPO

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=180):
        yield


def _write(out: Path, n: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (out / f"part-{i}.json").write_text(json.dumps({"part": i, "of": str(out)}))
    (out / "sub").mkdir(exist_ok=True)
    (out / "sub" / "report.md").write_text("# report\n")
    return n


def _two_stages(tmp_path: Path, run: str, upstream: str, before_store=None) -> tuple[int, list[dict]]:
    """A flow of two stages (split, then ablation, reading split's files); returns (files stored, summary rows)."""
    from prefect import flow
    from flows.caching import StageRunner, store_stage
    from pipelines.contentkey import StageKeys

    @flow(name=f"two-stages-{run}")
    def two_stages():
        with StageRunner(StageKeys(REPO / "params.yaml", root=REPO), ArtifactStore(S3Config.from_env()), run,
                         tmp_path / run, f"runs/{run}") as stages:
            stages.store_task = store_stage.with_options(retries=0)
            if before_store:
                before_store()
            ks = stages.key("split", [upstream])
            stages("split", "split", ks, "split", lambda: _write(tmp_path / run / "split", 3))
            ka = stages.key("ablation", [ks])
            read = lambda: len(list((tmp_path / run / "split").glob("*.json")))       # noqa: E731
            assert stages("ablation", "ablation", ka, "ablation",
                          lambda: _write(tmp_path / run / "ablation", read())) == 3
            return stages.wait_stored(), stages.summary_rows()
    return two_stages()


def test_each_stage_is_stored_in_a_task_of_its_own(prefect_server, s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGPIPE_TIMING_FILE", str(tmp_path / "timings.jsonl"))
    run = f"deferred-{uuid.uuid4().hex[:8]}"
    stored, rows = _two_stages(tmp_path, run, uuid.uuid4().hex)
    assert stored == 8 and [r["cached"] for r in rows] == [False, False]
    store = ArtifactStore(s3_env)
    for stage in ("split", "ablation"):
        local = tmp_path / run / stage
        keys = store.list(f"runs/{run}/{stage}/")
        assert keys == sorted(f"runs/{run}/{stage}/{p.relative_to(local).as_posix()}"
                              for p in local.rglob("*") if p.is_file())
        assert all(store.sha256(k) == sha256_file(local / k.split(f"{stage}/", 1)[1]) for k in keys)
    # the stage task hashed its files and ended; the upload is its own interval, after the stage's work
    t = [json.loads(line) for line in (tmp_path / "timings.jsonl").read_text().splitlines()]
    by = {(r["kind"], r["label"]): r for r in t}
    for stage in ("split", "ablation"):
        assert by[("hash", stage)]["start"] >= by[("work", stage)]["end"]
        assert by[("upload", stage)]["start"] >= by[("hash", stage)]["end"]


def test_a_store_that_fails_fails_the_run_and_the_next_run_stores_it(prefect_server, s3_env, tmp_path, monkeypatch):
    run, upstream = f"unstored-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    # the stage results go through the runner's store; the store tasks read the environment, whose secret is now
    # wrong (the store refuses every upload, and the stage outputs stay on this disk)
    with pytest.raises(StorageError, match=r"2 finished stage\(s\) not stored in the artifact store: split "
                                           r"\(StorageError: S3 at .* refused the credentials.*retrying the flow "
                                           "run stores them"):
        _two_stages(tmp_path, run, upstream,
                    before_store=lambda: monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret"))
    store = ArtifactStore(s3_env)
    assert store.list(f"runs/{run}/") == []
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    # the same stages again (a retry): both reused, and their producer's files stored now, under its prefix
    stored, rows = _two_stages(tmp_path, f"{run}-retry", upstream)
    assert [r["cached"] for r in rows] == [True, True] and stored == 8
    assert len(store.list(f"runs/{run}/split/")) == 4 and len(store.list(f"runs/{run}/ablation/")) == 4
    assert store.list(f"runs/{run}-retry/") == []
