"""Imports point one way: flows -> pipelines -> segpipe. The library knows nothing of Prefect or DVC."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"segpipe": {"prefect", "dvc", "dvclive", "pipelines", "flows"}, "pipelines": {"prefect", "flows"}}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer):
    files = sorted((REPO / layer).rglob("*.py"))
    assert files, f"no modules under {layer}/"
    bad = {str(f.relative_to(REPO)): sorted(imported_roots(f) & FORBIDDEN[layer]) for f in files}
    assert not {k: v for k, v in bad.items() if v}, f"{layer}/ must not import {sorted(FORBIDDEN[layer])}"


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import os\nfrom prefect import flow\n")
    assert "prefect" in imported_roots(bad)
