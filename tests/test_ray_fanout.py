"""The train fan-out on a real Ray cluster (head + one worker node, CPU only, through prefect-ray) under a real
Prefect server and SeaweedFS: the members train on the cluster's nodes and come out the same as with the local
runner; a cluster that can never place a member fails at once, naming the key."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import split
from segpipe.config import FanoutParams, SplitParams
from segpipe.storage import ArtifactStore, S3Config
from raycluster import alive_nodes, start_cluster
from test_training_chain import CLASSES, make_tiny

REPO = Path(__file__).resolve().parents[1]
MEMBERS = [("tiny", 0, 0), ("tiny", 0, 1)]


def _project(root: Path) -> Path:
    """A project folder as a worker has it: params.yaml, and a run's validate/ + split/ outputs (2 folds)."""
    src = root / "src"
    src.mkdir()
    vdir = make_tiny(src)
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), vdir, src / "split")
    (root / "params.yaml").write_text(yaml.safe_dump({
        "data": {"root": "unused", "classes": list(CLASSES)},
        "train": {"models": {"tiny": {"arch": "fpn", "encoder": "resnet18"}}, "seeds": [0], "folds": [0, 1],
                  "epochs": 1, "batch_size": 4, "input_size": 32, "lr": 0.003, "weight_decay": 0.0,
                  "warmup_epochs": 0, "num_workers": 0, "threads": 1},
    }))
    for run in ("local", "ray"):
        shutil.copytree(vdir, root / run / "validate")
        shutil.copytree(src / "split", root / run / "split")
    return root


def _weights(member: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(member / "best.pt", map_location="cpu", weights_only=False)
    state = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else ckpt
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _ray_nodes_from_prefect_logs() -> dict[str, str]:
    """Task-run name -> the Ray node its train task logged, read back from the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    with get_client(sync_client=True) as client:
        runs = {r.id: r.name for r in client.read_task_runs() if r.name.startswith("train-")}
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=list(runs))))
    out = {}
    for log in logs:
        m = re.search(r"on ray node (\w+)", log.message)
        if m:
            out[runs[log.task_run_id]] = m.group(1)
    return out


@pytest.mark.services
def test_fan_out_on_a_ray_cluster_matches_the_local_runner(tmp_path, s3_env, monkeypatch):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.caching import StageRunner
    from flows.full_pipeline import fan_out
    from pipelines.contentkey import StageKeys
    from flows.runners import RayClusterError

    root = _project(tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    # the Ray nodes keep their own credentials and bucket, as a real cluster's nodes would: the members the
    # cluster trains (and their result cache) land there, so nothing is served from the local run's cache
    ray_bucket = f"ray-{uuid.uuid4().hex[:8]}"
    s3_env.client().create_bucket(Bucket=ray_bucket)
    node_env = {**os.environ, "SEGPIPE_S3_BUCKET": ray_bucket, "PYTHONPATH": str(REPO)}
    local = FanoutParams(slots_per_gpu=1, cpu_slots=2)
    # the cluster starts while the Prefect server does: both take tens of seconds, mostly waiting
    starting = ThreadPoolExecutor(1).submit(start_cluster, root, node_env, cpus_per_node=1)
    cluster = None
    try:
        def run(name: str, fanout: FanoutParams, members=MEMBERS):
            # each run its own content keys (upstream = its folder): nothing is served from the other's result
            with StageRunner(StageKeys(REPO / "params.yaml", root=REPO), ArtifactStore(s3_env), name,
                             root / name, f"runs/{name}") as stages:     # leaving it: every member stored
                outs, _ = fan_out(stages, "train", members, root / name, "params.yaml", fanout, [str(root / name)])
            return outs

        @flow
        def both(on_ray: FanoutParams):
            return run("local", local), run("ray", on_ray)

        @flow
        def asks_for_a_gpu(on_ray: FanoutParams):
            return run("never", on_ray.model_copy(update={"gpus_per_task": 1}), MEMBERS[:1])

        with prefect_test_harness(server_startup_timeout=180):
            cluster = starting.result()
            nodes = alive_nodes(cluster.address)
            on_ray = FanoutParams(slots_per_gpu=1, cpu_slots=2, runner="ray", ray_address=cluster.address,
                                  gpus_per_task=0, cpus_per_task=1)
            local_out, ray_out = both(on_ray)
            where = _ray_nodes_from_prefect_logs()
            with pytest.raises(RayClusterError, match=r"fanout\.gpus_per_task"):
                asks_for_a_gpu(on_ray)
    finally:
        if cluster is None and starting.exception() is None:    # the harness failed while the cluster started
            cluster = starting.result()
        if cluster is not None:
            cluster.stop()

    # every member ran as a Ray task on a node of this cluster, and the two spread over both 1-CPU nodes
    assert sorted(where) == ["train-tiny-s0-f0", "train-tiny-s0-f1"], where
    assert set(where.values()) == set(nodes) and len(nodes) == 2, (where, nodes)
    # the same members as the local runner's: same scores, same weights
    assert [p.name for p in ray_out] == [p.name for p in local_out] == ["tiny-s0-f0", "tiny-s0-f1"]
    for a, b in zip(local_out, ray_out):
        ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
        assert (mb["best_miou"], mb["per_class_iou"]) == (ma["best_miou"], ma["per_class_iou"]), a.name
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), a.name
    # uploaded by the cluster with the nodes' credentials, into the nodes' bucket
    ray_store = ArtifactStore(S3Config(s3_env.endpoint_url, s3_env.access_key, s3_env.secret_key, ray_bucket))
    assert all(ray_store.exists(f"runs/ray/train/{p.name}/best.pt") for p in ray_out)
    assert not ArtifactStore(s3_env).exists("runs/ray/train/tiny-s0-f0/best.pt")
    assert ArtifactStore(s3_env).exists("runs/local/train/tiny-s0-f0/best.pt")
