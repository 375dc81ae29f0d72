"""Each stage's code deps are its import closure: dvc.yaml lists exactly those files, the Prefect flow's keys read
the same list, and a change in a file a stage only imports through others re-runs that stage and its dependants
(DVC's side of the same change: tests/test_e2e_dvc.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.codedeps import closure, mismatches, rewrite, stage_modules
from pipelines.contentkey import StageKeys
from tests.tiny import REPO, copy_project


def test_dvc_yaml_lists_every_stage_import_closure():
    assert mismatches(REPO / "dvc.yaml", REPO) == []
    # the defaults every stage reads, and the helpers no list named before, are in every stage's key
    for name, (module, _) in stage_modules(REPO / "dvc.yaml").items():
        assert {"segpipe/config.py", "segpipe/__init__.py", "pipelines/__init__.py"} <= set(closure(module)), name
    assert "segpipe/weights.py" in closure("pipelines.infer")          # models -> weights: imported by no stage itself
    assert "segpipe/submission.py" in closure("pipelines.ablation")


def test_closure_follows_every_import_form(tmp_path):
    pkg = tmp_path / "segpipe"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines/__init__.py").write_text("")
    (tmp_path / "pipelines/stage.py").write_text(
        "import numpy\nfrom segpipe import a\n\ndef later():\n    from segpipe.sub.c import f\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom .sub import d\n")
    (pkg / "b.py").write_text("import torch\n")
    (pkg / "sub/__init__.py").write_text("")
    (pkg / "sub/c.py").write_text("from ..b import x\n")
    (pkg / "sub/d.py").write_text("")
    (pkg / "unused.py").write_text("")
    assert closure("pipelines.stage", tmp_path) == (
        "pipelines/__init__.py", "pipelines/stage.py", "segpipe/__init__.py", "segpipe/a.py", "segpipe/b.py",
        "segpipe/sub/__init__.py", "segpipe/sub/c.py", "segpipe/sub/d.py")


def test_a_missing_or_stale_entry_fails_naming_stage_and_file(tmp_path):
    project = copy_project(tmp_path / "project")
    text = (project / "dvc.yaml").read_text()
    (project / "dvc.yaml").write_text(text.replace("      - segpipe/weights.py\n", "", 1)
                                      .replace("      - segpipe/folds.py\n", "      - segpipe/folds.py\n"
                                               "      - segpipe/eda.py\n", 1))
    problems = mismatches(project / "dvc.yaml", project)
    assert any("stage `train`" in p and "segpipe/weights.py" in p and "add them" in p for p in problems), problems
    assert any("stage `split`" in p and "segpipe/eda.py" in p and "remove them" in p for p in problems), problems
    (project / "dvc.yaml").write_text(rewrite(project / "dvc.yaml", project))          # --write repairs it
    assert mismatches(project / "dvc.yaml", project) == []
    assert yaml.safe_load((project / "dvc.yaml").read_text()) == yaml.safe_load(text)


def _flow_keys(project: Path) -> dict[str, str]:
    """The Prefect flow's keys for one member's chain, each stage keyed on its upstream keys as the flow does."""
    k = StageKeys(project / "params.yaml", root=project)
    v = k.key("validate", ["d" * 12])
    s = k.key("split", [v])
    t = k.key("train", [v, s], {"model": "fpn_mbv2", "seed": 0, "fold": 0, "round": 0})
    i = k.key("infer", [v, t], {"round": 0})
    a = k.key("audit", [v, i], {"round": 0})
    p = k.key("pseudo", [v, i], {"round": 1})
    r = k.key("retrain", [v, s, p, a], {"model": "fpn_mbv2", "seed": 0, "fold": 0, "round": 1})
    return {"validate": v, "split": s, "train": t, "infer": i, "audit": a, "pseudo": p, "retrain": r,
            "ablation": k.key("ablation", [i])}


@pytest.mark.parametrize("rel, first", [("segpipe/weights.py", "train"), ("segpipe/inline.py", "validate"),
                                        ("segpipe/leaderboard_server.py", "ablation")])
def test_a_transitive_import_changes_that_stage_and_its_dependants_only(tmp_path, rel, first):
    project = copy_project(tmp_path / "project")
    before = _flow_keys(project)
    with (project / rel).open("a") as f:
        f.write("\n# changed\n")
    after = _flow_keys(project)
    changed = {s for s in before if before[s] != after[s]}
    downstream = {"validate": set(before), "train": set(before) - {"validate", "split"}, "ablation": {"ablation"}}
    assert changed == downstream[first], (rel, changed)
    modules = stage_modules(project / "dvc.yaml")
    assert {s for s in before if rel in closure(modules[s][0], project)} <= changed
