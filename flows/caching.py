"""Stage tasks keyed on content: a stage whose key is unchanged is served from its stored result, not run again.

The key (pipelines.contentkey) hashes the stage's code, its params section and its upstream stages' keys, the
same things `dvc repro` compares. The Prefect task's cache key *is* that key (never a hash of pickled inputs),
and its result is persisted in the S3 store (`s3://<bucket>/prefect-results/<key>`), so any later run, on any
worker, finds it. The result is a manifest: the S3 prefix the stage's files go to, each file's sha256, and the
stage function's own return value. A hit materialises those files into this run's folder (verified against the
manifest; hard-linked from the producing run's folder when it is still on this disk, else downloaded), so the
downstream stages read them exactly as if the stage had just run.

The files are uploaded by a `store` task of their own, beside the stages that follow; the flow run ends only once
all are stored. A reused result whose files did not all reach S3 (its run ended while storing them) has the
missing ones stored again from this run's verified copy.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.filesystems import RemoteFileSystem
from prefect.task_runners import TaskRunner

from flows import warm
from flows.tasks import retry_unless_oom
from pipelines.common import record_timing, timed_call
from pipelines.contentkey import StageKeys
from segpipe.storage import (ArtifactStore, CorruptArtifactError, ManifestMismatchError, S3Config, StorageError,
                             digest_dir)

RESULTS_PREFIX = "prefect-results"


RESULTS_BLOCK = "segpipe-results"


def result_storage(cfg: S3Config) -> RemoteFileSystem:
    """Prefect result storage in the artifact bucket (s3fs), saved as the block `segpipe-results` (Prefect wants
    result storage persisted server-side). Only the endpoint and region are in the block: the credentials come
    from the worker's environment (AWS_ACCESS_KEY_ID/...), so none is ever stored in Prefect."""
    settings: dict = {"client_kwargs": {"region_name": cfg.region}}
    if cfg.endpoint_url:
        settings["client_kwargs"]["endpoint_url"] = cfg.endpoint_url
    block = RemoteFileSystem(basepath=f"s3://{cfg.bucket}/{RESULTS_PREFIX}", settings=settings)
    block.save(RESULTS_BLOCK, overwrite=True)
    return block


@dataclass(frozen=True)
class StageOutput:
    """What a stage task returns and Prefect stores under the stage's key."""

    label: str                  # train-fpn_mbv2-s0-f1, infer-r0, ...
    key: str                    # the content key
    run: str                    # the run that produced the files
    local: str                  # their folder in that run (relative to the project root)
    prefix: str                 # their S3 key prefix
    files: dict[str, str]       # relative path -> sha256
    result: Any                 # the stage function's own return value
    seconds: float              # the stage's own work, in the producing run


def _key_from_parameters(ctx, parameters: dict) -> str:
    return parameters["key"]


CONTENT_KEY = CacheKeyFnPolicy(cache_key_fn=_key_from_parameters)


def _stage_body(label: str, key: str, run: str, out_dir: Path, prefix: str, call: Callable[[], Any],
                own_process: bool = False, isolated: bool = False, defer_store: bool = False,
                module: str = "") -> StageOutput:
    log = get_run_logger()
    log.info("%s: key %s not in the store; running it", label, key)
    t0 = time.time()
    if isolated:    # in a process forked from the warm server: its imports are made, its memory goes with it
        result = warm.call(partial(timed_call, label, call), lambda line: line.strip() and log.info(line),
                           needs=(module,) if module else ())
    else:
        result = call()
    t1 = time.time()
    if not defer_store and isinstance(result, Path):   # a Ray member's own folder on its node, not out_dir
        out_dir = result
    # a stage in its own process records its work there (pipelines.common): here it is start-up + work
    record_timing("task" if own_process or isolated else "work", label, t0, t1)
    out_dir = Path(out_dir)
    if defer_store:       # the manifest now; the flow uploads the files (store_stage) while the next stages run
        files = digest_dir(out_dir)
        record_timing("hash", label, t1, time.time())
        log.info("%s: %d files hashed; the store task puts them under %s beside the next stages", label,
                 len(files), prefix)
    else:                 # on a Ray node: stored with the node's own credentials before the task ends
        store = ArtifactStore(S3Config.from_env())
        files = {}
        store.upload_dir(out_dir, prefix, digests=files)  # conditional writes: never over another run's keys
        record_timing("upload", label, t1, time.time())
        log.info("%s: %d files stored under %s", label, len(files), store.url(prefix))
    return StageOutput(label, key, run, str(out_dir), prefix, dict(sorted(files.items())), result, round(t1 - t0, 3))


@task(name="store", task_run_name="store-{label}", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=[5, 30])
def store_stage(label: str, local: str, prefix: str, files: dict[str, str]) -> int:
    """Upload a finished stage's files (its manifest: relative path -> sha256) to its S3 prefix; returns how many.
    Conditional writes: a retry, or a second run storing the same content, is a no-op; never over other content."""
    t0 = time.time()
    on_disk = {p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file()}
    if on_disk != files.keys():
        changed = sorted(on_disk ^ files.keys())[:5]
        raise StorageError(f"{label}: files of {local} came or went after the stage ended ({', '.join(changed)}); a "
                           "stage's folder must not change once it has finished: see what else writes there")
    store = ArtifactStore(S3Config.from_env())
    store.upload_dir(Path(local), prefix, digests=dict(files))
    record_timing("upload", label, t0, time.time())
    get_run_logger().info("%s: %d files stored under %s", label, len(files), store.url(prefix))
    return len(files)


def _make_task(name: str, retries: int = 0, delay: int = 5, retry_if=None):
    """One Prefect task per stage (the task name is the stage name); task runs are named by their label."""
    @task(name=name, task_run_name="{label}", cache_policy=CONTENT_KEY, persist_result=True, retries=retries,
          retry_delay_seconds=delay, retry_condition_fn=retry_if)
    def stage(label: str, key: str, run: str, out_dir: Path, prefix: str, call: Callable[[], Any],
              isolated: bool = False, defer_store: bool = False) -> StageOutput:
        return _stage_body(label, key, run, out_dir, prefix, call, own_process=name in ("train", "retrain"),
                           isolated=isolated, defer_store=defer_store, module=f"pipelines.{name}")
    return stage


# the stages that import torch or great-expectations run in a process of their own (forked from the warm server,
# fanout.warm_start), so the flow's process stays light and starts fast; the train matrix has its own processes
ISOLATED_STAGES = ("validate", "infer", "audit", "pseudo")

# a data error is not transient: validate never retries; training retries once (it resumes from its checkpoint),
# unless it ran out of memory (the same batch would again)
STAGE_TASKS = {"validate": _make_task("validate"), "split": _make_task("split"),
               "train": _make_task("train", retries=1, retry_if=retry_unless_oom),
               "retrain": _make_task("retrain", retries=1, retry_if=retry_unless_oom),
               "infer": _make_task("infer"), "audit": _make_task("audit"), "pseudo": _make_task("pseudo"),
               "ablation": _make_task("ablation")}


class StaleCacheError(StorageError):
    """A stored result's files are gone or damaged in the artifact store: the stage must run again."""


def _rebase(value: Any, old: Path, new: Path) -> Any:
    """The stage's return value with paths under the producing run's folder moved to this run's."""
    if isinstance(value, Path):
        try:
            return new / value.relative_to(old)
        except ValueError:
            return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _rebase(getattr(value, f.name), old, new) for f in dataclasses.fields(value)
                   if isinstance(getattr(value, f.name), Path)}
        return dataclasses.replace(value, **changes) if changes else value
    return value


def materialise(out: StageOutput, dst: Path, store: ArtifactStore, link: bool = True) -> None:
    """Make dst hold exactly the manifest's files (all or nothing): kept if already right, hard-linked from the
    producing run's folder when its copy checks out (`link`), else downloaded and verified."""
    try:
        store.fetch_folder(out.prefix, out.files, dst, link_from=out.local if link else None)
    except CorruptArtifactError as e:
        raise StaleCacheError(f"{out.label}: stored result damaged ({e})") from None
    except ManifestMismatchError as e:
        raise StaleCacheError(f"{out.label}: does not match the manifest ({e})") from None
    except StorageError as e:
        raise StaleCacheError(f"{out.label}: stored result incomplete ({e})") from None


@dataclass
class StageRun:
    """One stage of this flow run, as the run summary lists it."""

    label: str
    key: str
    cached: bool
    artifacts: str              # s3:// URI of the stage's files (the producing run's prefix on a hit)
    seconds: float


class StageRunner:
    """Runs the stages of one flow run through their content-keyed tasks and keeps the table for the summary.

    A stage run by the flow's own task runner is stored to S3 by a `store` task started when it finishes, while
    the stages after it run; `wait_stored()` (and leaving the `with` block) waits for every one of them."""

    def __init__(self, keys: StageKeys, store: ArtifactStore, run: str, run_dir: Path, prefix: str,
                 isolate: bool = False):
        self.keys, self.store, self.run, self.run_dir, self.prefix = keys, store, run, Path(run_dir), prefix
        self.isolate = isolate          # ISOLATED_STAGES in warm processes (fanout.warm_start)
        self.storage = result_storage(store.cfg)
        self.table: list[StageRun] = []
        self.outputs: dict[str, StageOutput] = {}
        self.folders: dict[str, StageOutput] = {}     # by folder under the run: what a Ray member's inputs name
        self.storing: list[tuple[str, Any]] = []      # (label, future of its store task), not yet waited for
        self.store_task = store_stage                 # with_options(...) to change its retries

    def __enter__(self) -> "StageRunner":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # stages that finished are stored even when a later one failed (a retry then reuses them)
        if exc_type is None:
            self.wait_stored()
        else:
            try:
                self.wait_stored()
            except StorageError as e:       # the flow's own error is the one to see; this one is logged
                get_run_logger().error("%s", e)

    def key(self, stage: str, upstream: list[str], item: dict | None = None, extra: dict | None = None) -> str:
        return self.keys.key(stage, upstream, item, extra)

    def submit(self, stage: str, label: str, key: str, rel: str, call: Callable[[], Any], refresh: bool = False,
               runner: TaskRunner | None = None):
        """Start the stage's task (a future); `rel` is its folder under the run (and its S3 prefix). `runner`: a
        task runner other than the flow's (the train matrix on a Ray cluster); its tasks store their own files."""
        t = STAGE_TASKS[stage].with_options(result_storage=self.storage, refresh_cache=refresh or None)
        args = {"label": label, "key": key, "run": self.run, "out_dir": self.run_dir / rel,
                "prefix": f"{self.prefix}/{rel}", "call": call, "isolated": self.isolate and stage in ISOLATED_STAGES,
                "defer_store": runner is None}
        return runner.submit(t, parameters=args) if runner is not None else t.submit(**args)

    def finish(self, stage: str, label: str, key: str, rel: str, call: Callable[[], Any], future,
               runner: TaskRunner | None = None) -> Any:
        """Wait for the task; on a cache hit bring its files into this run (or run it again if they are gone), and
        fetch from S3 the files a Ray member wrote in its node's own folder."""
        out: StageOutput = future.result()
        dst = self.run_dir / rel
        cached = out.run != self.run
        if cached:
            t0 = time.time()
            try:
                materialise(out, dst, self.store)
            except StaleCacheError as e:
                get_run_logger().warning("%s; running the stage again", e)
                out = self.submit(stage, label, key, rel, call, refresh=True, runner=runner).result()
                cached = False
            record_timing("materialise", label, t0, time.time())
        if not cached and Path(out.local) != dst:
            # written in a Ray node's own folder (no disk shared with this machine; a path of the same name here
            # is not that folder): fetched from S3, where the node stored it, and verified against the manifest
            t0 = time.time()
            materialise(out, dst, self.store, link=False)
            record_timing("materialise", label, t0, time.time())
        if not cached and runner is None:
            self._store(label, str(dst), out.prefix, out.files)
        elif cached:
            self._repair(out, dst)
        self.table.append(StageRun(label, key, cached, self.store.url(out.prefix), out.seconds))
        self.outputs[label] = out
        self.folders[rel] = out
        if cached:
            get_run_logger().info("%s: unchanged (key %s); reused the result of run %s from %s", label, key,
                                  out.run, self.store.url(out.prefix))
        return _rebase(out.result, Path(out.local), dst)

    def __call__(self, stage: str, label: str, key: str, rel: str, call: Callable[[], Any]) -> Any:
        return self.finish(stage, label, key, rel, call, self.submit(stage, label, key, rel, call))

    def _store(self, label: str, local: str, prefix: str, files: dict[str, str]) -> None:
        self.storing.append((label, self.store_task.submit(label, local, prefix, files)))

    def _repair(self, out: StageOutput, dst: Path) -> None:
        """A reused result whose producing run ended before all its files were stored (a crash while uploading):
        store the missing ones from this run's verified copy, under the producer's prefix."""
        present = set(self.store.list(f"{out.prefix}/"))
        missing = [rel for rel in out.files if f"{out.prefix}/{rel}" not in present]
        if missing:
            get_run_logger().warning("%s: %d of %d stored files missing under %s (its run ended while storing "
                                     "them); storing them again", out.label, len(missing), len(out.files),
                                     self.store.url(out.prefix))
            self._store(out.label, str(dst), out.prefix, out.files)

    def wait_stored(self) -> int:
        """Wait for every store task started so far; returns the files stored. Raises StorageError naming each
        stage whose files did not all reach S3 (their results stay on this disk; a retry stores them)."""
        storing, self.storing = self.storing, []
        stored, failed = 0, []
        for label, fut in storing:
            try:
                stored += fut.result()
            except Exception as e:
                failed.append(f"{label} ({type(e).__name__}: {e})")
        if failed:
            raise StorageError(f"{len(failed)} finished stage(s) not stored in the artifact store: {'; '.join(failed)}."
                               " Their results are kept on this disk; retrying the flow run stores them")
        return stored

    def urls(self, label: str, under: str = "") -> list[str]:
        """s3:// URIs of a finished stage's files (under a sub-folder), wherever the producing run put them."""
        out = self.outputs[label]
        return [self.store.url(f"{out.prefix}/{rel}") for rel in sorted(out.files) if rel.startswith(under)]

    def summary_rows(self) -> list[dict]:
        return [dataclasses.asdict(r) for r in self.table]
