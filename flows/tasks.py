"""Prefect tasks: thin wrappers around the stage functions, plus the process-isolated training task."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from prefect import get_run_logger, task

import pipelines.ablation
import pipelines.fetch
import pipelines.submit
from flows import nodeinputs, runners, warm
from pipelines.common import CHECKPOINT_ENV, RESULT_ENV
from segpipe.config import FanoutParams
from segpipe.storage import ArtifactStore, S3Config

LEASE_DIR = Path(".segpipe/leases")

# I/O tasks retry. The stages themselves run as content-keyed tasks (flows.caching.STAGE_TASKS), which say which
# retry (validate never: a data error is not transient)
fetch = task(pipelines.fetch.run, name="fetch", retries=2, retry_delay_seconds=[5, 30])
dvc_push = task(pipelines.fetch.push_data, name="dvc-push", retries=1, retry_delay_seconds=10)


def leaderboard_key(block: str = "leaderboard-key", env: str = "SEGPIPE_LEADERBOARD_KEY") -> str | None:
    """The key from a Prefect Secret block, else the worker's environment."""
    try:
        from prefect.blocks.system import Secret
        return Secret.load(block).get()
    except ValueError:     # no such block: the stack's worker environment carries the key
        return os.environ.get(env)


def check_leaderboard(params, ablation_params, deployment: str | None) -> None:
    """Start-up check of the leaderboard keys this run may use (read here, never logged): a missing or refused
    key fails the run before any work, not after hours of training."""
    if pipelines.submit.may_submit(params, deployment):
        pipelines.submit.preflight(params, leaderboard_key())
    ablation_key = leaderboard_key("leaderboard-ablation-key", pipelines.ablation.KEY_ENV)
    if ablation_params.submit and ablation_key:      # no ablation key: the rows are not submitted (by design)
        pipelines.submit.preflight(params, ablation_key, env=pipelines.ablation.KEY_ENV)


@task(name="ablation", retries=0)   # a retry would only re-read what the leaderboard already scored
def ablation(params, submit_params, data, infer_root: Path, out_dir: Path, submit: bool = True, run_name: str = ""):
    """One row per step with OOF and public mIoU; the ablation key is read here, never a task input."""
    key = leaderboard_key("leaderboard-ablation-key", pipelines.ablation.KEY_ENV) if submit else None
    return pipelines.ablation.run(params, submit_params, data, infer_root, out_dir, key=key, dry_run=not submit,
                                  run_name=run_name)


@task(name="submit", retries=0)   # the client retries safely itself; a second task try could double-submit
def submit(params, data, infer_dir: Path, out_dir: Path, hyperparameters: dict, oof_miou: float | None = None,
           deployment: str | None = None, run_name: str = "", round_: int | None = None, round_reason: str = ""):
    """Write, lint and (if submit.policy lets this deployment) send the submission.

    The key is read here, so it is never a task input in the UI.
    """
    result = pipelines.submit.run(params, data, infer_dir, out_dir, key=leaderboard_key(),
                                  hyperparameters=hyperparameters, oof_miou=oof_miou, deployment=deployment,
                                  run_name=run_name, round_=round_, round_reason=round_reason)
    get_run_logger().info(result.summary())
    return result


@task(name="upload", retries=3, retry_delay_seconds=[2, 10, 30])
def upload(local_dir: Path, key_prefix: str) -> list[str]:
    """Copy a stage's outputs to the artifact store under the run's prefix (checksummed, never overwriting)."""
    store = ArtifactStore(S3Config.from_env())
    keys = store.upload_dir(Path(local_dir), key_prefix)
    get_run_logger().info("uploaded %d files to %s", len(keys), store.url(key_prefix))
    return keys


def members_dir(run_dir: Path, round_: int) -> Path:
    """Where round `round_`'s members live: train/ for round 0, retrain/r<N>/ after N pseudo-label rounds."""
    return run_dir / "train" if round_ == 0 else run_dir / "retrain" / f"r{round_}"


def _train_run_name() -> str:
    """`train-unet-s0-f1`, and `retrain-r2-unet-s0-f1` in the second pseudo-label round."""
    from prefect.runtime import task_run
    p = task_run.parameters
    r = f"-r{p['round_']}" if p.get("round_") else ""
    return f"{p['stage']}{r}-{p['model']}-s{p['seed']}-f{p['fold']}"


class MemberOutOfMemory(RuntimeError):
    """The training process ran out of memory: the same batch size would again, so the task is not retried."""


def retry_unless_oom(task, task_run, state) -> bool:
    """Prefect retry condition of a training task: any failure but running out of memory is worth a retry."""
    try:
        state.result()
    except MemberOutOfMemory:
        return False
    except Exception:      # noqa: BLE001 - any other failure (a lost process, a store outage) is worth one retry
        return True
    return True


def run_member(module: str, args: list[str], env: dict[str, str], on_line, warm_start: bool) -> int:
    """`python -m module args` in its own process: forked from the warm server (torch already imported) or a
    fresh interpreter (fanout.warm_start false). Returns its exit code."""
    if warm_start:
        return warm.run_module(module, args, env, on_line)
    proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        on_line(line)
    return proc.wait()


@task(name="train", task_run_name=_train_run_name, retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_oom)
def train(stage: str, model: str, seed: int, fold: int, run_dir: Path, params_file: str, fanout: FanoutParams,
          round_: int = 0, inputs: nodeinputs.MemberInputs | None = None) -> Path:
    """One model x seed x fold in its own process, holding a device lease; a retry resumes from its checkpoint.
    `inputs` (on a Ray node): the run's inputs by content, staged into this node's own folder unless the node has
    the run folder itself; returns the member's folder, wherever it was written."""
    log = get_run_logger()
    data_root = None
    if inputs is not None:
        t0 = time.time()
        staged = nodeinputs.stage(inputs, run_dir, Path(params_file), ArtifactStore(S3Config.from_env()))
        run_dir, params_file, data_root = staged.run_dir, str(staged.params_file), staged.data_root
        log.info("inputs at %s (%s, %.1f s) <fanout.runner=ray>", run_dir, "the flow's folder, in place"
                 if data_root is None else f"staged, fetched {staged.fetched}", time.time() - t0)
    out_root = members_dir(run_dir, round_)
    module = f"pipelines.{stage}"
    args = ["--params", params_file, "--model", model, "--seed", str(seed), "--fold", str(fold),
            "--validate", str(run_dir / "validate"), "--split", str(run_dir / "split"), "--out-root", str(out_root)]
    if data_root is not None:
        args += ["--data-root", str(data_root)]
    if round_:
        # the previous round's audit says which training images to drop or relabel (audit.action)
        args += ["--pseudo", str(run_dir / "pseudo" / f"r{round_}"),
                 "--audit", str(run_dir / "audit" / f"r{round_ - 1}")]
    with runners.device_lease(fanout, LEASE_DIR) as held:    # a file lease here, or what Ray reserved
        log.info("%s %s-s%d-f%d on %s (slot %d)", stage, model, seed, fold,
                 "cpu" if held.gpu is None else f"cuda:{held.gpu}", held.slot)
        tail: deque[str] = deque(maxlen=30)

        def on_line(line: str) -> None:         # the stage's own log lines, streamed into the Prefect run log
            line = line.rstrip()
            if line:
                tail.append(line)
                log.info(line)

        # every epoch's checkpoint is mirrored to S3: a task whose machine is lost resumes on another one
        # and a member already trained on the same data, params and code is fetched, not trained again
        env = {**os.environ, **held.env, CHECKPOINT_ENV: "checkpoints", RESULT_ENV: "results"}
        code = run_member(module, args, env, on_line, fanout.warm_start)
        if code != 0:
            if any("TrainingOOM" in line for line in tail):
                raise MemberOutOfMemory(f"{stage} {model}-s{seed}-f{fold} ran out of memory (not retried):\n"
                                        + "\n".join(tail))
            raise RuntimeError(f"{stage} {model}-s{seed}-f{fold} exited with {code}:\n" + "\n".join(tail))
    return out_root / f"{model}-s{seed}-f{fold}"
