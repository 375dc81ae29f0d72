"""docker-compose.yml, checked statically (no Docker engine runs on the dev or CI machine): it is valid against the
compose-spec schema (check-jsonschema's vendored copy), and every service runs what `segpipe stack up` runs, on the
same ports, with the same environment, credentials only from the git-ignored env file the stack writes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from segpipe import stack
from segpipe.config import load_params

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
HOME = Path("/home/segpipe/.segpipe")          # SEGPIPE_HOME in the image
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SEGPIPE_LEADERBOARD_KEY", "SEGPIPE_LEADERBOARD_ABLATION_KEY")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return stack.resolve_ports({}, env={})       # the defaults, as `segpipe stack up` with no flags uses them


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")
    assert exe, "check-jsonschema missing: `make setup` installs it from requirements.lock"
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True)


def _interpolated(value: str) -> str:
    """`${VAR:?message}` -> `${VAR}`: the variable, whatever the error text says."""
    return re.sub(r"\$\{(\w+)(:?[?\-][^}]*)?\}", r"${\1}", value)


def test_compose_file_is_valid_against_the_compose_spec(tmp_path):
    out = _check_jsonschema(COMPOSE)
    assert out.returncode == 0, out.stdout + out.stderr
    # the schema is strict: a misspelt key (here the GPU reservation's) is caught
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("capabilities: [gpu]", "capability: [gpu]"))
    out = _check_jsonschema(bad)
    assert out.returncode != 0 and "capability" in out.stdout + out.stderr


def test_every_service_is_the_stacks_service(compose):
    assert set(compose["services"]) == set(stack.SERVICES)
    for name, svc in compose["services"].items():
        assert svc["build"]["context"] == ".", name            # the Dockerfile's image
        assert (Path(sys.executable).parent / svc["command"][0]).exists(), f"{name}: {svc['command'][0]} not in venv"


def test_s3_runs_weed_mini_with_the_stacks_flags(compose, ports):
    cmd = compose["services"]["s3"]["command"]
    # inside the container it binds every interface; its internal services still talk over loopback
    assert cmd[:-1] == stack.weed_command("weed", HOME / "s3", ports, ip="127.0.0.1", bind="0.0.0.0")
    assert cmd[-1] == f"-bucket={','.join(stack.BUCKETS)}"      # the buckets `up` makes (ensure_bucket)


def test_prefect_server_and_worker_match_the_stack(compose, ports):
    server, worker = compose["services"]["prefect"], compose["services"]["worker"]
    api = f"http://prefect:{ports['prefect']}/api"
    expected = stack.prefect_env(HOME / "prefect", api)
    expected["PREFECT_UI_API_URL"] = f"http://{stack.HOST}:{ports['prefect']}/api"   # the browser is on the host
    assert server["command"] == stack.prefect_server_command("prefect", "0.0.0.0", ports["prefect"])
    assert server["environment"] == expected
    assert worker["command"] == stack.worker_command("prefect", worker["command"][-1])
    assert {k: worker["environment"][k] for k in expected} == expected
    assert worker["environment"]["SEGPIPE_S3_ENDPOINT"] == f"http://s3:{ports['s3']}"
    assert worker["environment"]["SEGPIPE_HOME"] == str(HOME)
    assert {"s3", "prefect"} <= set(worker["depends_on"])


def test_worker_reserves_the_gpus(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices


def test_leaderboard_matches_the_stack(compose, ports):
    lb = compose["services"]["leaderboard"]
    labels = next(v.split(":")[1] for v in lb["volumes"] if v.startswith("./"))
    assert lb["command"] == stack.leaderboard_command("python", "0.0.0.0", ports["leaderboard"], labels,
                                                      HOME / "leaderboard")
    # the labels mounted are the ones params.yaml names, the keys the ones the stack gives it
    hidden = load_params("data", path=REPO / "params.yaml").hidden_labels
    assert next(v.split(":")[0] for v in lb["volumes"] if v.startswith("./")) == f"./{hidden}"
    env = {k: _interpolated(v) for k, v in lb["environment"].items() if k.startswith("SEGPIPE_LEADERBOARD")}
    assert env == stack.leaderboard_env({k: f"${{{k}}}" for k in SECRETS})


def test_public_ports_are_the_stacks_on_loopback_only(compose, ports):
    for name in ("s3", "prefect", "leaderboard"):
        assert compose["services"][name]["ports"] == [f"{stack.HOST}:{ports[name]}:{ports[name]}"], name
    assert "ports" not in compose["services"]["worker"]


def test_credentials_come_only_from_the_stacks_git_ignored_env_file(compose, ports, tmp_path):
    written = stack._write_credentials(tmp_path, ports)           # what `segpipe stack up` writes
    env_file = Path(".segpipe") / "credentials.env"
    assert stack.stack_home(None).name == env_file.parent.name and (tmp_path / env_file.name).is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", str(env_file)], cwd=REPO)
    assert ignored.returncode == 0, f"{env_file} is not git-ignored"
    for name, svc in compose["services"].items():
        assert [e["path"] for e in svc["env_file"]] == [str(env_file)], name
        literal = {k for k, v in svc.get("environment", {}).items() if "${" not in str(v)}
        assert not literal & set(SECRETS), f"{name} sets a secret in the compose file: {literal & set(SECRETS)}"
        # whatever the stack's credentials file says is there, except addresses the compose network replaces
        for key in set(written) - set(svc.get("environment", {})):
            assert key in SECRETS or key in ("SEGPIPE_S3_ENDPOINT", "PREFECT_API_URL", "SEGPIPE_S3_BUCKET"), key
    for secret in (written[k] for k in SECRETS):
        assert secret not in COMPOSE.read_text()


def test_volumes_are_mounted_where_the_image_made_them_for_its_user(compose):
    dockerfile = (REPO / "Dockerfile").read_text()
    made = set(re.findall(r"(/home/segpipe/\S+)", dockerfile.split("install -d", 1)[1].split("\n#", 1)[0]))
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if not source.startswith("./"):                       # a named volume takes its mount point's owner
                assert target in made, f"{name}: {target} is not created for uid 10001 in the Dockerfile"
