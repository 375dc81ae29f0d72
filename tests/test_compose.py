"""docker-compose.yml, checked statically (no Docker engine runs on the dev or CI machine): it is valid against the
compose-spec schema (check-jsonschema's vendored copy), and every service runs what `segpipe stack up` runs, on the
same ports, with the same environment, credentials only from the git-ignored env file the stack writes."""

from __future__ import annotations

import os
import re
import shlex
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
PROJECT = "/home/segpipe/project"              # the image's WORKDIR
SEGPIPE = [sys.executable, "-m", "segpipe.cli"]    # the `segpipe` command, from this checkout
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SEGPIPE_LEADERBOARD_KEY", "SEGPIPE_LEADERBOARD_ABLATION_KEY")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return stack.resolve_ports({}, env={})       # the defaults, as `segpipe stack up` with no flags uses them


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")
    assert exe, "check-jsonschema missing: `make setup` installs it from requirements-dev.lock"
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True)


def _instructions() -> list[tuple[str, str]]:
    from test_dockerfile import instructions
    return instructions(REPO / "Dockerfile")


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


def commands(svc: dict) -> list[list[str]]:
    """The command lines a service runs: its command, or each step of an `sh -c "a && exec b"`."""
    cmd = svc["command"]
    if cmd[:2] == ["sh", "-c"]:
        return [shlex.split(step.removeprefix("exec ")) for step in cmd[2].split(" && ")]
    return [cmd]


def test_every_service_is_the_stacks_service(compose):
    assert set(compose["services"]) == set(stack.SERVICES)
    for name, svc in compose["services"].items():
        assert svc["build"]["context"] == ".", name            # the Dockerfile's image
        for argv in commands(svc):
            assert (Path(sys.executable).parent / argv[0]).exists(), f"{name}: {argv[0]} is not in the venv"


def test_s3_runs_weed_mini_with_the_stacks_flags_and_security(compose, ports):
    svc = compose["services"]["s3"]
    security, cmd = commands(svc)
    # inside the container it binds every interface; its internal services still talk over loopback
    assert cmd[:-1] == stack.weed_command("weed", HOME / "s3", ports, ip="127.0.0.1", bind="0.0.0.0")
    assert cmd[-1] == f"-bucket={','.join(stack.BUCKETS)}"      # the buckets `up` makes (ensure_bucket)
    # and, as `up`, a security.toml first, where weed looks for one ($HOME/.seaweedfs: no ./security.toml there)
    assert security[:3] == ["segpipe", "stack", "weed-security"]
    folder = Path(security[security.index("--dir") + 1])
    assert folder == Path(svc["environment"]["HOME"]) / ".seaweedfs"


def test_weed_security_command_writes_the_stacks_security_toml(tmp_path):
    import tomllib
    folder = tmp_path / "home" / ".seaweedfs"
    out = subprocess.run([*SEGPIPE, "stack", "weed-security", "--dir", str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path = folder / "security.toml"
    assert path.stat().st_mode & 0o777 == 0o600 and folder.stat().st_mode & 0o777 == 0o700
    conf = tomllib.loads(path.read_text())
    assert len(conf["jwt"]["signing"]["key"]) == 64 and conf["jwt"]["filer_signing"]["key"]
    assert conf["grpc"]["ca"] and Path(conf["grpc"]["ca"]).is_file() and conf["admin"]["password"]
    assert conf["jwt"]["signing"]["key"] not in out.stdout + out.stderr            # the path is printed, no key


def test_prefect_server_and_worker_match_the_stack(compose, ports):
    server, worker = compose["services"]["prefect"], compose["services"]["worker"]
    api = f"http://prefect:{ports['prefect']}/api"
    expected = stack.prefect_env(HOME / "prefect", api)
    expected["PREFECT_UI_API_URL"] = f"http://{stack.HOST}:{ports['prefect']}/api"   # the browser is on the host
    assert server["command"] == stack.prefect_server_command("prefect", "0.0.0.0", ports["prefect"])
    assert server["environment"] == expected
    configure, start = commands(worker)
    assert configure == ["segpipe", "stack", "dvc-remote"]      # what `up` does for the host (_configure_dvc)
    assert start == stack.worker_command("prefect", start[-1])
    assert {k: worker["environment"][k] for k in expected} == expected
    flow_env = {**stack.FLOW_RUN_ENV, **stack.WORKER_ENV}       # heartbeats, library logs, pick-up interval
    assert {k: worker["environment"].get(k) for k in flow_env} == flow_env
    assert worker["environment"]["SEGPIPE_S3_ENDPOINT"] == f"http://s3:{ports['s3']}"
    assert worker["environment"]["SEGPIPE_HOME"] == str(HOME)
    assert {"s3", "prefect"} <= set(worker["depends_on"])


def test_worker_reserves_the_gpus(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices


def test_leaderboard_matches_the_stack(compose, ports):
    lb = compose["services"]["leaderboard"]
    # the labels are params.yaml's data.hidden_labels in the project folder, on the volume the worker's DVC fills
    hidden = load_params("data", path=REPO / "params.yaml").hidden_labels
    assert lb["command"] == stack.leaderboard_command("python", "0.0.0.0", ports["leaderboard"],
                                                      f"{PROJECT}/{hidden}", HOME / "leaderboard")
    data = [v for v in compose["services"]["worker"]["volumes"] if v.split(":")[1] == f"{PROJECT}/data"]
    assert data and f"{data[0]}:ro" in lb["volumes"] and hidden.startswith("data/")
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
            assert source in compose["volumes"], f"{name}: {source} is not a named volume"
            assert target in made, f"{name}: {target} is not created for uid 10001 in the Dockerfile"
    assert f"WORKDIR {PROJECT}" in dockerfile


def test_the_workers_dvc_runs_without_git_and_points_at_the_compose_s3(tmp_path):
    """The image has no .git: its DVC config says no_scm (the Dockerfile's line, run here), and the worker's
    `segpipe stack dvc-remote` then sets the remote from the environment, as the compose worker does."""
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("config.local", "cache", "tmp"))
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    line = next(rest for op, rest in _instructions() if op == "RUN" and "no_scm" in rest)
    subprocess.run(["sh", "-c", line], cwd=tmp_path, check=True)
    env = {**os.environ, "SEGPIPE_S3_ENDPOINT": "http://s3:8333", "AWS_ACCESS_KEY_ID": "AKEXAMPLE",
           "AWS_SECRET_ACCESS_KEY": "not-a-real-secret", "PYTHONPATH": str(REPO)}
    out = subprocess.run([*SEGPIPE, "stack", "dvc-remote"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    dvc = str(Path(sys.executable).parent / "dvc")
    remote = subprocess.run([dvc, "config", "remote.storage.endpointurl"], cwd=tmp_path, capture_output=True, text=True)
    assert remote.stdout.strip() == "http://s3:8333", remote.stdout + remote.stderr
    assert "not-a-real-secret" not in (tmp_path / ".dvc" / "config").read_text()    # secrets: config.local only
    env.pop("SEGPIPE_S3_ENDPOINT")
    out = subprocess.run([*SEGPIPE, "stack", "dvc-remote"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "SEGPIPE_S3_ENDPOINT" in out.stderr


def test_stack_credentials_writes_the_env_file_compose_reads(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([*SEGPIPE, "stack", "credentials", "--home", str(tmp_path)], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "credentials.env"
    assert path.stat().st_mode & 0o777 == 0o600
    first = stack.load_env(tmp_path)
    assert set(SECRETS) <= set(first) and all(first[k] for k in SECRETS)
    subprocess.run([*SEGPIPE, "stack", "credentials", "--home", str(tmp_path)], env=env, check=True, capture_output=True)
    assert stack.load_env(tmp_path) == first            # the secrets are kept, not regenerated
