"""Picking the train matrix's runner from `fanout` (no cluster needed: what each choice builds and rejects)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_ray import RayTaskRunner
from pydantic import ValidationError

from flows.runners import matrix_runner, task_runner, with_overrides
from segpipe.config import FanoutParams, load_params

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_fanout_section_loads_and_defaults_to_local():
    fanout = load_params("fanout", FanoutParams, path=REPO / "params.yaml")
    assert fanout.runner == "local"
    assert isinstance(task_runner(fanout), ThreadPoolTaskRunner)
    with matrix_runner(fanout) as runner:       # local: the members run on the flow's own threads
        assert runner is None


def test_ray_runner_connects_to_the_named_cluster_or_the_local_one_never_a_private_one():
    base = FanoutParams(slots_per_gpu=1, cpu_slots=1, runner="ray")
    named = task_runner(base.model_copy(update={"ray_address": "10.0.0.5:6379"}))
    assert isinstance(named, RayTaskRunner) and named.address == "10.0.0.5:6379"
    here = task_runner(base)
    # address="auto" makes ray.init fail without a running cluster instead of starting a throwaway one
    assert here.address is None and here.init_kwargs["address"] == "auto"


def test_deployment_overrides_are_validated_like_the_file():
    base = FanoutParams(slots_per_gpu=2, cpu_slots=1)
    assert with_overrides(base, None) is base
    ray = with_overrides(base, {"runner": "ray", "gpus_per_task": 0.5})
    assert (ray.runner, ray.gpus_per_task, ray.slots_per_gpu) == ("ray", 0.5, 2)
    with pytest.raises(ValidationError, match="runnr"):
        with_overrides(base, {"runnr": "ray"})
    with pytest.raises(ValidationError, match="runner"):
        with_overrides(base, {"runner": "dask"})
    with pytest.raises(ValidationError, match="gpus_per_task"):
        with_overrides(base, {"gpus_per_task": -1})
