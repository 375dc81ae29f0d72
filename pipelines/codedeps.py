"""The code a stage runs: the repository's Python files its module imports, directly or through others.

dvc.yaml lists each stage's import closure as its code deps, and the Prefect flow's content keys
(pipelines.contentkey) read the same lists, so both drivers re-run a stage when any file it executes changes,
`segpipe/config.py`'s defaults included. The closure is found statically (every `import` in a file, function
bodies too), so an import only taken on some path still counts. `python -m pipelines.codedeps` prints each
stage's closure and exits 1 naming every dvc.yaml entry that is missing or no longer imported (`--write`
rewrites the lists); tests/test_codedeps.py runs the same check.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "segpipe")       # the stages' own code; flows/ and ops never run inside a stage


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file that defines `module` in the checkout, or None when it is not one of PACKAGES' modules."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Module names that `module`'s source imports, relative imports resolved; `from a import b` gives a and a.b."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


@cache
def closure(module: str, root: Path = ROOT) -> tuple[str, ...]:
    """Repository-relative paths of every file `python -m <module>` executes from PACKAGES, sorted."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):       # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            path = module_file(".".join(parts[:i]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(_imported(ast.parse(path.read_text(), str(path)), ".".join(parts[:i]),
                                  path.name == "__init__.py"))
    if not seen:
        raise ValueError(f"{module} is not a module of {', '.join(PACKAGES)} under {root}")
    return tuple(sorted(p.relative_to(root).as_posix() for p in seen))


STAGE_MODULE = re.compile(r"python -m ((?:pipelines)\.[\w.]+)")


def stage_modules(dvc_yaml: Path) -> dict[str, tuple[str, list[str]]]:
    """dvc.yaml's stages as {name: (module its cmd runs, its deps as written)}; foreach/matrix counted once."""
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    out: dict[str, tuple[str, list[str]]] = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        match = STAGE_MODULE.search(str(body.get("cmd", "")))
        if match is None:
            raise ValueError(f"dvc.yaml stage `{name}`: its cmd runs no `python -m pipelines.<stage>`; "
                             "its code deps cannot be derived")
        out[name] = (match.group(1), [str(d) for d in body.get("deps", [])])
    return out


def mismatches(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> list[str]:
    """One line per stage whose code deps in dvc.yaml differ from its module's import closure."""
    problems = []
    for name, (module, deps) in stage_modules(dvc_yaml).items():
        want = set(closure(module, root))
        listed = {d for d in deps if d.endswith(".py") and d.split("/")[0] in PACKAGES}
        if missing := sorted(want - listed):
            problems.append(f"dvc.yaml stage `{name}` ({module}) imports {missing} but does not list them in deps: "
                            "a change there would re-run nothing; add them")
        if extra := sorted(listed - want):
            problems.append(f"dvc.yaml stage `{name}` ({module}) lists {extra}, which it no longer imports: "
                            "remove them from deps")
    return problems


def rewrite(dvc_yaml: Path, root: Path = ROOT) -> str:
    """dvc.yaml's text with each stage's deps written as its data deps, then its import closure (comments and
    every other line kept)."""
    stages = stage_modules(dvc_yaml)
    lines, out, stage = dvc_yaml.read_text().split("\n"), [], None
    i = 0
    while i < len(lines):
        if (m := re.match(r"^  ([\w-]+):", lines[i])) and m.group(1) in stages:
            stage = m.group(1)
        if stage and (d := re.match(r"^(\s+)deps:", lines[i])):
            indent, j = d.group(1), i + 1
            while not re.match(rf"^{indent}[\w-]+:", lines[j]):       # the deps' lines end at the next key
                j += 1
            module, deps = stages[stage]
            out.append(f"{indent}deps:")
            out += [f"{indent}  - {dep}" for dep in deps if not (dep.endswith(".py") and dep.split("/")[0] in PACKAGES)]
            out.append(f"{indent}  # code: the import closure of {module} (`python -m pipelines.codedeps --write`)")
            out += [f"{indent}  - {dep}" for dep in closure(module, root)]
            i, stage = j, None
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml")
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps to the closures")
    args = parser.parse_args()
    root = args.dvc_yaml.resolve().parent
    if args.write:
        tmp = args.dvc_yaml.with_name(f".{args.dvc_yaml.name}.tmp")
        tmp.write_text(rewrite(args.dvc_yaml, root))
        tmp.replace(args.dvc_yaml)
    for name, (module, _) in stage_modules(args.dvc_yaml).items():
        print(f"{name}: [{', '.join(closure(module, root))}]")
    problems = mismatches(args.dvc_yaml, root)
    for line in problems:
        print(f"ERROR: {line}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
