"""The Kubernetes work pool's base job template (deploy/k8s/base-job-template.json), checked statically: it keeps
everything prefect-kubernetes's default template has (its default as of 0.8.0 is vendored in tests/data), its
variables are a valid JSON schema whose defaults validate, every placeholder is a declared variable, and the job it
renders (through Prefect's own templating) asks for a GPU, runs the segpipe image as its non-root user in the image's
project folder, and carries no secrets. The k8s deployments file points at that pool and that folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from prefect.utilities.templating import apply_values, find_placeholders

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "deploy" / "k8s" / "base-job-template.json"
DEFAULT = REPO / "tests" / "data" / "prefect-kubernetes-0.8.0-base-job-template.json"
SECRET_WORDS = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|_KEY$", re.I)


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


def defaults(template: dict) -> dict:
    """The variables that have defaults (as the worker collects them; the others are left out of the job)."""
    return {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}


def render(template: dict, **values) -> dict:
    """The job configuration as the worker gets it for a flow run: defaults, overridden by job variables."""
    return apply_values(template["job_configuration"], {**defaults(template), **values})


def container(job: dict) -> dict:
    return job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def test_keeps_everything_of_prefect_kubernetes_default(template):
    default = json.loads(DEFAULT.read_text())
    assert set(template) == set(default) == {"job_configuration", "variables"}
    assert set(default["job_configuration"]) == set(template["job_configuration"])
    ours, theirs = template["variables"]["properties"], default["variables"]["properties"]
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    for name, schema in theirs.items():   # same types: only defaults and descriptions differ
        assert {k: v for k, v in ours[name].items() if k not in ("default", "description")} == \
               {k: v for k, v in schema.items() if k not in ("default", "description")}, name
    # the worker fills `command` and `env` into the first container named prefect-job
    c, d = container(template["job_configuration"]), container(default["job_configuration"])
    assert (c["name"], c["args"], c["env"], c["image"]) == (d["name"], d["args"], d["env"], d["image"])


def test_variables_are_a_valid_schema_and_the_defaults_fit_it(template):
    schema = template["variables"]
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(defaults(template), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**defaults(template), "gpu_count": -1}, schema)


def test_every_placeholder_is_a_declared_variable(template):
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    declared = set(template["variables"]["properties"])
    assert used <= declared, used - declared
    assert {"gpu_count", "credentials_secret", "image"} <= used


def test_the_job_asks_for_a_gpu_and_runs_the_image_as_its_user(template):
    job = render(template)
    c = container(job)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container(render(template, gpu_count=2))["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["image"] == "segpipe:dev"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"WORKDIR {c['workingDir']}" in dockerfile
    uid = job["job_manifest"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert re.search(rf"^USER {uid}:", dockerfile, re.M), "the pod's user is not the image's"
    tolerations = job["job_manifest"]["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_no_secrets_in_the_template(template):
    job = render(template)
    env = job["env"]
    assert not [k for k in env if SECRET_WORDS.search(k)], env
    assert container(job)["envFrom"] == [{"secretRef": {"name": "segpipe-credentials"}}]
    text = TEMPLATE.read_text()
    assert not re.search(r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|LEADERBOARD_KEY)\"\s*:", text)


def test_k8s_deployments_use_the_pool_and_the_images_folder(template):
    spec = yaml.safe_load((REPO / "deploy" / "k8s" / "prefect.yaml").read_text())
    workdir = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert workdir == container(render(template))["workingDir"]
    for dep in spec["deployments"]:
        assert dep["work_pool"]["name"] == "segpipe-k8s"
        path, func = dep["entrypoint"].split(":")
        assert f"def {func}(" in (REPO / path).read_text()
        unknown = set(dep["work_pool"].get("job_variables", {})) - set(template["variables"]["properties"])
        assert not unknown, unknown
