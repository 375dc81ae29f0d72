"""Where the train matrix runs, picked at run time from `fanout` in params.yaml (or the flow's `fanout` parameter):
`local` threads on this machine holding file leases on its devices, or `ray`: each member a Ray task (prefect-ray's
RayTaskRunner) asking Ray for `gpus_per_task` GPUs and `cpus_per_task` CPUs, so Ray's scheduler places it.

The task code is the same either way; only the runner and the device lease differ.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows import warm
from segpipe.config import FanoutParams
from segpipe.gpu import Lease, lease, visible_gpus

RUNNERS = ("local", "ray")
LOCAL_THREADS = 8      # futures only: the device leases decide how many members really train at once


class RayClusterError(RuntimeError):
    """The Ray cluster cannot run the members as asked; the message names the fanout key to change."""


def with_overrides(fanout: FanoutParams, overrides: dict | None) -> FanoutParams:
    """params.yaml's fanout with a run's or deployment's overrides, validated like the file (unknown keys fail)."""
    return FanoutParams.model_validate({**fanout.model_dump(), **overrides}) if overrides else fanout


def task_runner(fanout: FanoutParams) -> TaskRunner:
    """The task runner for the train matrix: threads here, or a connection to the Ray cluster."""
    if fanout.runner == "local":
        return ThreadPoolTaskRunner(max_workers=LOCAL_THREADS)
    if fanout.runner == "ray":
        from prefect_ray import RayTaskRunner
        # no runtime_env: the nodes run the same image (or checkout) with their own credentials, and get the
        # members' inputs from S3 (flows.nodeinputs). ray_address "" is the cluster already running on this machine: address="auto" fails if
        # there is none, where a bare ray.init() would quietly start a private one-node cluster
        return RayTaskRunner(address=fanout.ray_address or None,
                             init_kwargs={"namespace": "segpipe", "log_to_driver": False,
                                          **({} if fanout.ray_address else {"address": "auto"})})
    raise KeyError(f"Wrong fanout.runner `{fanout.runner}`, supported runners: {list(RUNNERS)}")


@contextmanager
def matrix_runner(fanout: FanoutParams) -> Iterator[TaskRunner | None]:
    """None under `local` (the flow's own threads run the members, the device leases decide how many train at
    once), or a started connection to the Ray cluster under `ray`, closed once the matrix is done."""
    if fanout.runner == "local":
        yield None
        return
    with task_runner(fanout) as runner:
        yield runner


def member_options(fanout: FanoutParams):
    """What each member asks of the scheduler: Ray resources under `ray`, nothing (the leases decide) under local."""
    if fanout.runner != "ray":
        return nullcontext()
    from prefect_ray.context import remote_options
    return remote_options(num_gpus=fanout.gpus_per_task, num_cpus=fanout.cpus_per_task)


def check_cluster(fanout: FanoutParams) -> dict:
    """Fail now, not hang forever, when no node of the cluster could ever give one member what it asks for."""
    if fanout.runner != "ray":
        return {}
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n["Resources"].get("GPU", 0) >= fanout.gpus_per_task
            and n["Resources"].get("CPU", 0) >= fanout.cpus_per_task]
    if not fits:
        have = [{k: n["Resources"].get(k, 0) for k in ("CPU", "GPU")} for n in nodes]
        raise RayClusterError(
            f"no Ray node has {fanout.gpus_per_task} GPU and {fanout.cpus_per_task} CPU for one member (nodes: {have}); "
            "lower <fanout.gpus_per_task> (0 on a CPU-only cluster) or <fanout.cpus_per_task>, or add GPU nodes")
    return {"nodes": len(nodes), "GPU": sum(n["Resources"].get("GPU", 0) for n in nodes),
            "CPU": sum(n["Resources"].get("CPU", 0) for n in nodes)}


@contextmanager
def device_lease(fanout: FanoutParams, lease_dir: Path) -> Iterator[Lease]:
    """The devices a member may use: a file lease on this machine's slots, or the ones Ray assigned this task."""
    if fanout.runner != "ray":
        with lease(lease_dir, fanout.slots_per_gpu, fanout.cpu_slots, gpu_count(fanout.warm_start)) as held:
            yield held
        return
    yield ray_lease(fanout)


_GPUS: dict[bool, int] = {}
_GPUS_LOCK = threading.Lock()


def gpu_count(warm_start: bool) -> int:
    """The GPUs this machine may use, found once per process. Counting them takes torch: with warm_start it is
    asked of a process forked from the warm server (imported there already; the flow's own process never imports
    torch, ~6 s on a 2-core machine, which held up the first training wave), else of torch here."""
    with _GPUS_LOCK:
        if warm_start not in _GPUS:
            quiet = logging.getLogger("segpipe").debug
            _GPUS[warm_start] = warm.call(visible_gpus, quiet, needs=("torch",)) if warm_start else visible_gpus()
        return _GPUS[warm_start]


def ray_lease(fanout: FanoutParams) -> Lease:
    """Ray already reserved this task's GPUs (and set CUDA_VISIBLE_DEVICES to them); pass them on unchanged."""
    import ray
    from prefect import get_run_logger
    ctx = ray.get_runtime_context()
    gpus = ctx.get_accelerator_ids().get("GPU", [])
    cpus = max(1, int(fanout.cpus_per_task))
    env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus),
           # pipelines.train gives itself cpu_count // SEGPIPE_PARALLEL_TASKS threads: cpus_per_task of them here
           "SEGPIPE_PARALLEL_TASKS": str(max(1, (os.cpu_count() or 1) // cpus))}
    get_run_logger().info("on ray node %s, GPUs %s <fanout.runner=ray>", ctx.get_node_id(), gpus or "none")
    # the index is for the log line only (Ray may name GPUs by UUID); the process sees just its own
    return Lease((int(gpus[0]) if gpus[0].isdigit() else 0) if gpus else None, 0, env)
