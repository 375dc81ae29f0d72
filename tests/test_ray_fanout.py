"""The train fan-out on a real Ray cluster (head + one worker node, CPU only, through prefect-ray) under a real
Prefect server and SeaweedFS: the members train on the cluster's nodes and come out the same as with the local
runner; a cluster that can never place a member fails at once, naming the key.

The nodes share no folder with the flow: each starts in a folder of its own, and every Python process of a node
is refused any access to the flow's project folder (tests/nodeguard), so the members fetch their inputs from S3 by
content and the flow fetches the finished members from S3."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import split
from segpipe.config import FanoutParams, SplitParams
from segpipe.storage import ArtifactStore, S3Config, digest_dir
from raycluster import alive_nodes, start_cluster
from test_training_chain import CLASSES, make_tiny

REPO = Path(__file__).resolve().parents[1]
MEMBERS = [("tiny", 0, 0), ("tiny", 0, 1)]


def _project(root: Path) -> Path:
    """The flow's project folder: params.yaml, and the validate/ + split/ outputs (2 folds) its runs copy in as
    their stages; the photos under src/data (the index's data_root, an absolute path on the flow's machine)."""
    src = root / "src"
    src.mkdir(parents=True)
    vdir = make_tiny(src)
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), vdir, src / "split")
    (root / "params.yaml").write_text(yaml.safe_dump({
        "data": {"root": "unused", "classes": list(CLASSES)},
        "train": {"models": {"tiny": {"arch": "fpn", "encoder": "resnet18"}}, "seeds": [0], "folds": [0, 1],
                  "epochs": 1, "batch_size": 4, "input_size": 32, "lr": 0.003, "weight_decay": 0.0,
                  "warmup_epochs": 0, "num_workers": 0, "threads": 1},
    }))
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

    root = _project(tmp_path / "flow")
    node_dirs = [tmp_path / "node0", tmp_path / "node1"]      # each node's own working folder
    for d in node_dirs:
        d.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    # the ray run and its nodes use a bucket of their own: the members the cluster trains (and their result cache)
    # land there, so nothing is served from the local run's cache
    ray_bucket = f"ray-{uuid.uuid4().hex[:8]}"
    s3_env.client().create_bucket(Bucket=ray_bucket)
    ray_s3 = S3Config(s3_env.endpoint_url, s3_env.access_key, s3_env.secret_key, ray_bucket)
    # the nodes see S3 and the image (the checkout), never the flow's folder: its run folders, photos and params
    node_env = {**os.environ, "SEGPIPE_S3_BUCKET": ray_bucket, "PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'nodeguard'}",
                "SEGPIPE_TEST_HIDDEN": str(root)}
    peek = subprocess.run([sys.executable, "-c", f"open({str(root / 'params.yaml')!r})"], env=node_env,
                          capture_output=True, text=True)
    assert peek.returncode != 0 and "not on this Ray node" in peek.stderr, peek.stderr[-500:]
    local = FanoutParams(slots_per_gpu=1, cpu_slots=2)
    # the cluster starts while the Prefect server does: both take tens of seconds, mostly waiting
    starting = ThreadPoolExecutor(1).submit(start_cluster, node_dirs, node_env, cpus_per_node=1)
    cluster = None
    try:
        def run(name: str, fanout: FanoutParams, s3: S3Config, members=MEMBERS):
            # each run its own content keys (upstream = its folder): nothing is served from the other's result;
            # validate and split are the run's stages (stored to S3), as in the full pipeline
            run_dir = root / name
            monkeypatch.setenv("SEGPIPE_S3_BUCKET", s3.bucket)      # the flow's store tasks: the run's bucket
            with StageRunner(StageKeys(REPO / "params.yaml", root=REPO), ArtifactStore(s3), name, run_dir,
                             f"runs/{name}") as stages:     # leaving it: every member stored
                kv, ks = (stages.key(s, [str(run_dir)]) for s in ("validate", "split"))
                for stage, key in (("validate", kv), ("split", ks)):
                    stages(stage, stage, key, stage, partial(shutil.copytree, root / "src" / stage, run_dir / stage))
                outs, _ = fan_out(stages, "train", members, run_dir, "params.yaml", fanout, [kv, ks])
            return outs, {rel: stages.folders[rel] for rel in (f"train/{p.name}" for p in outs)}

        @flow
        def both(on_ray: FanoutParams):
            return run("local", local, s3_env), run("ray", on_ray, ray_s3)

        @flow
        def asks_for_a_gpu(on_ray: FanoutParams):
            return run("never", on_ray.model_copy(update={"gpus_per_task": 1}), ray_s3, MEMBERS[:1])

        with prefect_test_harness(server_startup_timeout=180):
            cluster = starting.result()
            nodes = alive_nodes(cluster.address)
            on_ray = FanoutParams(slots_per_gpu=1, cpu_slots=2, runner="ray", ray_address=cluster.address,
                                  gpus_per_task=0, cpus_per_task=1)
            (local_out, _), (ray_out, ray_stored) = both(on_ray)
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
    # each member trained in its node's own folder, on inputs fetched from S3 into it: the flow's run folder
    # was there at the same path, but no node could read it
    made_on = {p.name: Path(ray_stored[f"train/{p.name}"].local) for p in ray_out}
    assert {d.relative_to(tmp_path).parts[0] for d in made_on.values()} == {"node0", "node1"}, made_on
    for member, made in made_on.items():
        staged = made.parents[1]                 # the run as the node staged it
        assert staged in {d / ".segpipe" / "node" / "runs" / "ray" for d in node_dirs}, made
        index = json.loads((staged / "validate" / "index.json").read_text())
        assert index["data_root"] == str(root / "src" / "data")        # as stored; the photos came beside it
        assert all((staged / "photos" / r["image"]).is_file() for r in index["train"])
        assert (staged / "params.yaml").read_text() == (root / "params.yaml").read_text()
    # the flow has every finished member in its own run folder, fetched from S3 and verified against the manifest
    for p in ray_out:
        assert p.parent == root / "ray" / "train"
        assert digest_dir(p) == ray_stored[f"train/{p.name}"].files == digest_dir(made_on[p.name]), p.name
    # uploaded by the cluster with the nodes' credentials, into the ray run's bucket, beside the photos
    ray_store = ArtifactStore(ray_s3)
    assert all(ray_store.exists(f"runs/ray/train/{p.name}/best.pt") for p in ray_out)
    assert len(ray_store.list("photos/sha256/")) == len(index["train"])
    assert not ArtifactStore(s3_env).exists("runs/ray/train/tiny-s0-f0/best.pt")
    assert ArtifactStore(s3_env).exists("runs/local/train/tiny-s0-f0/best.pt")
