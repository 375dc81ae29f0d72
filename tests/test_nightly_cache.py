"""Nightly retraining redoes only what changed: stage keys mirror dvc.yaml, results persist in the S3 store, and a
second run serves every unchanged stage from there (real Prefect, real SeaweedFS, real DVC, real training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.contentkey import ContentKeyError, StageKeys, file_md5
from segpipe.storage import ArtifactStore, sha256_file
from tests.tiny import REPO, copy_project, shrink_params


def test_code_hash_is_dvcs_own(tmp_path):
    from dvc_data.hashfile.hash import file_md5 as dvc_md5
    for rel in ("pipelines/train.py", "segpipe/engine.py", "params.yaml"):
        assert file_md5(REPO / rel) == dvc_md5(str(REPO / rel))


def _keys(tmp_path: Path, **changes) -> dict[str, str]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    k = StageKeys(tmp_path / "params.yaml", root=REPO)
    v = k.key("validate", ["d" * 12])
    s = k.key("split", [v])
    t = k.key("train", [v, s], {"model": "fpn_mbv2", "seed": 0, "fold": 0, "round": 0})
    i = k.key("infer", [v, t], {"round": 0})
    p = k.key("pseudo", [v, i], {"round": 1})
    return {"validate": v, "split": s, "train": t, "infer": i, "pseudo": p, "ablation": k.key("ablation", [i])}


def test_a_param_changes_exactly_the_stages_dvc_would_rerun(tmp_path):
    base = _keys(tmp_path)
    assert len(set(base.values())) == len(base)
    changed = {name: {s for s in base if _keys(tmp_path, **{name: value})[s] != base[s]}
               for name, value in (("infer__tta", []), ("train__lr", 0.01), ("split__seed", 7),
                                   ("fanout__cpu_slots", 1), ("ablation__description", "x"))}
    assert changed["infer__tta"] == {"infer", "pseudo", "ablation"}
    assert changed["train__lr"] == {"train", "infer", "pseudo", "ablation"}
    assert changed["split__seed"] == {"split", "train", "infer", "pseudo", "ablation"}
    assert changed["fanout__cpu_slots"] == set()            # how tasks are scheduled never changes a result
    assert changed["ablation__description"] == {"ablation"}


def test_unknown_stage_and_missing_param_fail_loudly(tmp_path):
    k = StageKeys(REPO / "params.yaml", root=REPO)
    with pytest.raises(ContentKeyError, match="Wrong stage `trian`"):
        k.key("trian")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["infer"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ContentKeyError, match="param `infer`"):
        StageKeys(tmp_path / "params.yaml", root=REPO).key("infer")


@pytest.mark.slow
@pytest.mark.services
def test_second_night_reuses_every_unchanged_stage(tmp_path, s3_env, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    project = copy_project(tmp_path / "project")
    shrink_params(project / "params.yaml", pseudo={"rounds": 0}, ablation={"submit": False})
    monkeypatch.chdir(project)
    monkeypatch.setenv("PYTHONPATH", str(project))
    monkeypatch.setenv("SEGPIPE_TIMING_FILE", "")      # the flow sets it; restored after the test
    from flows.full_pipeline import full_pipeline

    store = ArtifactStore(s3_env)
    with prefect_test_harness(server_startup_timeout=180):
        first = full_pipeline(params_file="params.yaml", submit=False)
        assert first["reused"] == 0
        labels = [r["label"] for r in first["stages"]]
        assert labels == ["validate", "split", "train-fpn_mbv2-s0-f0", "train-fpn_mbv2-s0-f1", "infer-r0", "audit-r0",
                          "ablation"]
        # the results Prefect persisted are in the S3 store, under the content keys
        stored = store.list("prefect-results/")
        assert all(f"prefect-results/{r['key']}" in stored for r in first["stages"])
        # every stage's files reached S3 (stored beside the stages after it) before the run returned
        run_dir = Path("runs") / first["run"]
        for r in first["stages"]:
            prefix = r["artifacts"].split(f"s3://{s3_env.bucket}/", 1)[1]
            local = run_dir / prefix.split(f"runs/{first['run']}/", 1)[1]
            want = {f"{prefix}/{p.relative_to(local).as_posix()}" for p in local.rglob("*") if p.is_file()}
            assert want and set(store.list(f"{prefix}/")) == want, r["label"]
        assert first["stored_files"] == sum(len(store.list(f"runs/{first['run']}/{d}/"))
                                            for d in ("validate", "split", "train", "infer", "audit", "ablation"))
        # a night that ended while storing: one stored file lost; the next night reusing the stage stores it again
        lost = f"runs/{first['run']}/split/folds.json"
        store.delete(lost)

        second = full_pipeline(params_file="params.yaml", submit=False)
        assert second["run"] != first["run"]
        assert second["reused"] == len(labels), second["stages"]
        assert store.sha256(lost) == sha256_file(run_dir / "split/folds.json")
        assert [r["key"] for r in second["stages"]] == [r["key"] for r in first["stages"]]
        # the reused outputs are in this run's folder, byte for byte, for the stages downstream
        for rel in ("validate/index.json", "split/folds.json", "train/fpn_mbv2-s0-f1/best.pt",
                    "infer/r0/test_probs.npy", "audit/r0/ranking.json", "ablation/ablation.json"):
            a, b = Path("runs") / first["run"] / rel, Path("runs") / second["run"] / rel
            assert b.is_file() and sha256_file(a) == sha256_file(b), rel
        # no stage's own work ran the second night: the timing log holds materialisations and the lost file's
        # upload (its stage's folder, stored again)
        rows = [json.loads(line) for line in (Path("runs") / second["run"] / "timings.jsonl").open()]
        assert {r["kind"] for r in rows} == {"materialise", "upload"}, rows
        assert [r["label"] for r in rows if r["kind"] == "upload"] == ["split"]
        assert second["oof_miou"] == first["oof_miou"]

        # one changed infer param: only infer and what reads it run again
        p = yaml.safe_load(Path("params.yaml").read_text())
        p["infer"]["tta"] = []
        Path("params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        third = full_pipeline(params_file="params.yaml", submit=False)
        ran = {r["label"] for r in third["stages"] if not r["cached"]}
        assert ran == {"infer-r0", "audit-r0", "ablation"}, third["stages"]
        assert (Path("runs") / third["run"] / "train/fpn_mbv2-s0-f0/best.pt").is_file()


@pytest.mark.services
def test_two_runs_storing_one_member_never_mix_their_files(tmp_path, s3_env):
    """A nightly and a manual run that trained the same member at once: the stored result is one run's copy whole."""
    from pipelines.train import ResultCache

    prefix = f"results-race-{tmp_path.name}/m-s0-f0/abc"
    outs = []
    for run in ("nightly", "manual"):
        out = tmp_path / run / "m-s0-f0"
        out.mkdir(parents=True)
        (out / "best.pt").write_text(f"weights of {run}")
        (out / "metrics.json").write_text(f'{{"run": "{run}"}}')
        outs.append(out)
    store = ArtifactStore(s3_env)
    first, second = ResultCache(store, prefix), ResultCache(store, prefix)
    first.store_result(outs[0])
    second.store_result(outs[1])                    # finished later: keeps the first copy, removes its own
    copies = {k.split("/")[-2] for k in store.list(f"{prefix}/") if not k.endswith("/DONE")}
    assert len(copies) == 1
    fetched = tmp_path / "fetched" / "m-s0-f0"
    assert ResultCache(store, prefix).fetch(fetched)
    assert (fetched / "best.pt").read_text() == "weights of nightly"
    assert json.loads((fetched / "metrics.json").read_text())["run"] == "nightly"
    assert sorted(p.name for p in fetched.iterdir()) == ["best.pt", "metrics.json"]
