"""The `full-pipeline` flow: validate -> split -> train[matrix] -> infer -> (pseudo -> retrain[matrix] -> infer) x
pseudo.rounds -> ablation -> submit."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import wait
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows import tasks
from pipelines.validate import ValidateResult
from segpipe.config import load_all
from segpipe.eda import embed_images
from segpipe.storage import ArtifactStore, S3Config


def run_id() -> str:
    rid = flow_run.get_id()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{str(rid)[:8]}" if rid else stamp


@flow(name="full-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def full_pipeline(params_file: str = "params.yaml", submit: bool = True, run_name: str = "") -> dict:
    """The whole chain on the DVC-versioned data; every stage's outputs go to S3 under runs/<run>/."""
    log = get_run_logger()
    p = load_all(Path(params_file))
    rid = run_name or run_id()
    run_dir = Path("runs") / rid
    prefix = f"runs/{rid}"
    store = ArtifactStore(S3Config.from_env())
    store.check()                                  # bad credentials fail here, before any work
    if submit:                                     # and a missing or refused leaderboard key
        tasks.check_leaderboard(p["submit"], p["ablation"], deployment.name)

    version = tasks.fetch(p["data"])
    log.info("run %s on data version %s; artifacts under %s", rid, version, prefix)

    # a DataValidationError fails the flow here: validate never retries, nothing below it runs
    validated = tasks.validate(p["data"], p["validate"], run_dir / "validate")
    keys = tasks.upload(run_dir / "validate", f"{prefix}/validate")
    publish_validate(validated, [store.url(k) for k in keys if k.startswith(f"{prefix}/validate/eda/")])
    tasks.split(p["split"], run_dir / "validate", run_dir / "split")
    tasks.upload(run_dir / "split", f"{prefix}/split")
    publish_markdown(run_dir / "split" / "report.md", "fold-split")

    matrix = [(m, s, f) for m in p["train"].models for s in p["train"].seeds for f in p["train"].folds]
    trained = fan_out("train", matrix, run_dir, params_file, p["fanout"], prefix)
    publish_members(trained, "train-metrics")
    result = infer_round(p, run_dir, prefix, 0)

    # pseudo -> retrain -> infer, pseudo.rounds times: each round labels the test set with the previous ensemble
    for r in range(1, p["pseudo"].rounds + 1):
        tasks.pseudo(p["data"], p["pseudo"], run_dir / "validate", run_dir / "infer" / f"r{r - 1}",
                     run_dir / "pseudo" / f"r{r}", r)
        tasks.upload(run_dir / "pseudo" / f"r{r}", f"{prefix}/pseudo/r{r}")
        retrained = fan_out("retrain", matrix, run_dir, params_file, p["fanout"], prefix, r)
        publish_members(retrained, f"retrain-r{r}-metrics")
        result = infer_round(p, run_dir, prefix, r)

    ablation = tasks.ablation(p["ablation"], p["submit"], p["data"], run_dir / "infer", run_dir / "ablation",
                              submit=submit, run_name=rid)
    tasks.upload(run_dir / "ablation", f"{prefix}/ablation")
    create_table_artifact(ablation.table(), key="ablation",
                          description="does each step pay? OOF and public mIoU per step, deltas against the row above")
    publish_markdown(run_dir / "ablation" / "ablation.md", "ablation-report")

    summary = {"run": rid, "data_version": version, "oof_miou": result.oof_miou, "artifacts": prefix}
    if submit:
        summary.update(submit_and_record(p, run_dir, result.out_dir, prefix, rid, result.oof_miou))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    create_table_artifact([{k: str(v) for k, v in summary.items()}], key="run-summary",
                          description=f"full-pipeline run {rid}")
    log.info("run %s done: OOF mIoU %.4f, public mIoU %s", rid, result.oof_miou, summary.get("public_miou"))
    return summary


def infer_round(p: dict, run_dir: Path, prefix: str, round_: int):
    """Ensemble + TTA over round `round_`'s members; its probabilities, report and ablation rows go to S3."""
    out = run_dir / "infer" / f"r{round_}"
    result = tasks.infer(p["data"], p["infer"], run_dir / "validate", tasks.members_dir(run_dir, round_), out, round_)
    tasks.upload(out, f"{prefix}/infer/r{round_}")
    publish_markdown(out / "report.md", f"ensemble-report-r{round_}")
    return result


def fan_out(stage: str, matrix: list[tuple[str, int, int]], run_dir: Path, params_file: str, fanout, prefix: str,
            round_: int = 0) -> list[Path]:
    """Launch every (model, seed, fold) at once; the device leases decide how many really run together."""
    futures = [tasks.train.submit(stage, m, s, f, run_dir, params_file, fanout, round_) for m, s, f in matrix]
    # each member uploads as soon as it finishes, while the others still train
    key_root = tasks.members_dir(Path(prefix), round_)
    uploads = [tasks.upload.submit(fut, f"{key_root}/{m}-s{s}-f{f}") for fut, (m, s, f) in zip(futures, matrix)]
    wait(uploads)      # one member failing (say, out of memory) must not cut the others short
    failed = [f"{m}-s{s}-f{f}" for u, (m, s, f) in zip(uploads, matrix) if not u.state.is_completed()]
    if failed:
        raise RuntimeError(f"{stage}: {len(failed)} of {len(matrix)} members failed ({', '.join(failed)}); the others "
                           "finished and are stored. See each failed task's log for the cause; a retry of this "
                           "flow run reuses the finished members")
    return [fut.result() for fut in futures]


def publish_validate(v: ValidateResult, eda_urls: list[str]) -> None:
    """The EDA report with its plots inlined (the UI cannot follow relative links), and the class, split and
    great-expectations tables."""
    report = v.out_dir / "eda" / "report.md"
    plots = "\n".join(f"- `{u}`" for u in eda_urls if u.endswith(".png"))
    create_markdown_artifact(embed_images(report.read_text(), report.parent)
                             + f"\n## Plot files in the artifact store\n\n{plots}\n", key="eda-report",
                             description="EDA of the validated training data")
    create_table_artifact(v.class_stats, key="eda-class-stats",
                          description="per class: pixel share, annotations, images, object sizes, loss weight")
    create_table_artifact([{"split": k, "images": n} for k, n in v.split_counts.items()], key="eda-splits",
                          description="images per split file")
    create_table_artifact(v.gx_summary, key="validation-summary",
                          description=f"great-expectations: {sum(r['success'] for r in v.gx_summary)} of "
                                      f"{len(v.gx_summary)} expectations passed")


def publish_markdown(path: Path, key: str) -> None:
    if path.is_file():
        create_markdown_artifact(path.read_text(), key=key)


def submit_and_record(p: dict, run_dir: Path, infer_dir: Path, prefix: str, rid: str, oof_miou: float) -> dict:
    """Submit (if submit.policy lets this deployment), upload the stage's outputs, publish the CV-vs-LB history."""
    # the deployment's name decides the policy; None for a direct flow call (submit.manual_policy)
    sub = tasks.submit(p["submit"], p["data"], infer_dir, run_dir / "submit",
                       hyperparameters={k: p[k].model_dump(mode="json")
                                        for k in ("train", "retrain", "infer", "pseudo")},
                       oof_miou=oof_miou, deployment=deployment.name, run_name=rid)
    tasks.upload(run_dir / "submit", f"{prefix}/submit")
    publish_history(run_dir / "submit" / "history.json")
    return {"public_miou": sub.public_score, "submission": sub.submission_id, "submit_status": sub.status,
            "submit_reason": sub.reason}


HISTORY_COLUMNS = ("run", "time", "deployment", "submission_id", "description", "oof_miou", "public_score",
                   "status", "sha256")


def publish_history(path: Path) -> None:
    """The CV-vs-leaderboard history (submit stage's history.json) as a table artifact, newest first."""
    records = json.loads(path.read_text()) if path.is_file() else []
    if not records:
        return
    rows = [{c: r.get(c) for c in HISTORY_COLUMNS} for r in reversed(records)]
    create_table_artifact(rows, key="submission-history",
                          description="OOF (cross-validated) mIoU vs public leaderboard mIoU, one row per submission")


def publish_members(outs: list[Path], key: str) -> None:
    rows = []
    for out in outs:
        m = json.loads((out / "metrics.json").read_text())
        rows.append({"member": m["key"], "best_val_miou": round(m["best_miou"], 4),
                     "kept": m.get("best_source", "epoch") if m["best_epoch"] < 0 else f"epoch {m['best_epoch'] + 1}",
                     "swa_miou": None if m.get("swa_miou") is None else round(m["swa_miou"], 4),
                     **{c: (None if v is None else round(v, 3)) for c, v in m["per_class_iou"].items()}})
    create_table_artifact(rows, key=key, description="per-fold validation mIoU and per-class IoU")


if __name__ == "__main__":
    full_pipeline()
