"""The `full-pipeline` flow: validate -> split -> train[matrix] -> infer -> (pseudo -> retrain[matrix] -> infer) x
pseudo.rounds -> ablation -> submit."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner

import pipelines.split
from flows import nodeinputs, progress, runnames, runners, tasks, warm
from flows.caching import StageRunner
from flows.monitoring import flow_run_name, public_score, publish_run_links, rename_flow_run
from pipelines.common import TIMING_ENV, record_timing, stage_call, write_json
from pipelines.contentkey import StageKeys
from pipelines.submit import RoundChoice, choose_round
from segpipe.config import load_all
from segpipe.inline import embed_images
from segpipe.profiles import apply_profile
from segpipe.storage import ArtifactStore, S3Config, StorageError

if TYPE_CHECKING:
    from pipelines.results import ValidateResult


def run_id() -> str:
    rid = flow_run.get_id()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{str(rid)[:8]}" if rid else stamp


@flow(name="full-pipeline", flow_run_name=flow_run_name, task_runner=ThreadPoolTaskRunner(max_workers=8),
      log_prints=True)
def full_pipeline(params_file: str = "params.yaml", submit: bool = True, run_name: str = "",
                  fanout: dict | None = None, profile: str = "") -> dict:
    """The whole chain on the DVC-versioned data; every stage's outputs go to S3 under runs/<run>/.

    Every stage is keyed on content (flows.caching): one whose code, params and upstream keys are unchanged is
    served from the stored result of whichever run produced it. `fanout` overrides keys of params.yaml's fanout
    section for this run (a deployment's `{"runner": "ray"}`); where members train never changes a key.
    `profile` (e.g. quick) picks an entry of params.yaml's `profiles` for this run; empty: the file's own.
    """
    log = get_run_logger()
    rid = runnames.check_run_name(run_name) if run_name else run_id()
    # absolute: a Ray worker's working directory is not the flow's (a node that has this path may use it in place)
    run_dir = (Path("runs") / rid).absolute()
    prefix = f"runs/{rid}"
    store = ArtifactStore(S3Config.from_env())
    store.check()                                  # bad credentials fail here, before any work
    # a name given by hand: one safe path component, and this flow run's alone (a retry of it keeps it)
    runnames.claim(store, rid, str(flow_run.get_id() or rid))
    # a profile: the run's own copy of the params (the members' processes and the stage keys read the same file)
    params_file = str(with_profile(Path(params_file), profile, run_dir))
    p = load_all(Path(params_file))
    p["fanout"] = runners.with_overrides(p["fanout"], fanout)
    if p["fanout"].warm_start:
        warm.warm_up()          # torch, great-expectations: imported in the warm server while the flow starts
    if submit:                                     # and a missing or refused leaderboard key
        tasks.check_leaderboard(p["submit"], p["ablation"], deployment.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ[TIMING_ENV] = str((run_dir / "timings.jsonl").resolve())   # stage work intervals (the benchmark)

    version = tasks.fetch(p["data"], push=False)
    pushed = tasks.dvc_push.submit()            # the DVC remote, completed while the stages run
    keys = StageKeys(params_file)
    rename_flow_run(version, keys.params_hash())
    log.info("run %s on data version %s, params %s; artifacts under %s", rid, version, keys.params_hash(), prefix)
    with StageRunner(keys, store, rid, run_dir, prefix, isolate=p["fanout"].warm_start) as stages:
        # a DataValidationError fails the flow here: validate never retries, nothing below it runs
        kv = stages.key("validate", [version])
        validated = stages("validate", "validate", kv, "validate", partial(
            stage_call, "pipelines.validate:run", p["data"], p["validate"], run_dir / "validate"))
        publish_validate(validated, stages.urls("validate", "eda/"))
        ks = stages.key("split", [kv])
        stages("split", "split", ks, "split", partial(pipelines.split.run, p["split"], run_dir / "validate",
                                                      run_dir / "split"))
        publish_markdown(run_dir / "split" / "report.md", "fold-split")

        matrix = [(m, s, f) for m in p["train"].models for s in p["train"].seeds for f in p["train"].folds]
        trained, member_keys = fan_out(stages, "train", matrix, run_dir, params_file, p["fanout"], [kv, ks],
                                       epochs=p["train"].epochs)
        publish_members(trained, "train-metrics")
        result, ki, kaudit = infer_round(stages, p, run_dir, 0, [kv, *member_keys])
        infer_keys = [ki]

        # pseudo -> retrain -> infer, pseudo.rounds times: each round labels the test set with the last ensemble
        for r in range(1, p["pseudo"].rounds + 1):
            kp = stages.key("pseudo", [kv, ki], {"round": r})
            stages("pseudo", f"pseudo-r{r}", kp, f"pseudo/r{r}",
                   partial(stage_call, "pipelines.pseudo:run", p["data"], p["pseudo"], run_dir / "validate",
                           run_dir / "infer" / f"r{r - 1}", run_dir / "pseudo" / f"r{r}", r))
            # the previous round's audit decides which training images this round drops or relabels
            retrained, member_keys = fan_out(stages, "retrain", matrix, run_dir, params_file, p["fanout"],
                                             [kv, ks, kp, kaudit], r, epochs=p["retrain"].epochs)
            publish_members(retrained, f"retrain-r{r}-metrics")
            result, ki, kaudit = infer_round(stages, p, run_dir, r, [kv, *member_keys])
            infer_keys.append(ki)

        # the ablation submits its rows' files (idempotent by sha256): a hit reuses the rows the leaderboard scored
        ka = stages.key("ablation", infer_keys, extra={"submit": submit, "leaderboard": [
            p["submit"].base_url, p["submit"].competition_id]})
        ablation = stages("ablation", "ablation", ka, "ablation",
                          partial(tasks.ablation.fn, p["ablation"], p["submit"], p["data"], run_dir / "infer",
                                  run_dir / "ablation", submit=submit, run_name=rid))
        create_table_artifact(ablation.table(), key="ablation", description="does each step pay? OOF and public "
                              "mIoU per step, deltas against the row above")
        publish_markdown(run_dir / "ablation" / "ablation.md", "ablation-report")

        # what is sent is the round with the best honest OOF figure, not always the last
        sent = choose_round(run_dir / "infer")
        summary = {"run": rid, "data_version": version, "params_hash": keys.params_hash(),
                   "oof_miou": sent.oof_miou, "sent_round": sent.round, "round_reason": sent.reason,
                   "artifacts": prefix}
        if submit:
            summary.update(submit_and_record(p, run_dir, sent, prefix, rid))
        # every stage's files in S3 (stored while the later stages ran) before the run counts as done
        stored = stages.wait_stored()
    summary["dvc_pushed"] = pushed.result()
    summary["stored_files"] = stored
    summary["stages"] = stages.summary_rows()
    summary["reused"] = sum(r["cached"] for r in summary["stages"])
    write_json(run_dir / "summary.json", summary)
    store.put_file(run_dir / "summary.json", f"{prefix}/summary.json")   # where every stage's files are, from S3
    create_table_artifact([{k: str(v) for k, v in summary.items() if k != "stages"}], key="run-summary",
                          description=f"full-pipeline run {rid}")
    publish_run_links(summary, store)
    log.info("run %s done: sent round %s (%s), OOF mIoU %.4f, public mIoU %s; %d of %d stages reused", rid,
             summary["sent_round"], summary["round_reason"], summary["oof_miou"], public_score(summary),
             summary["reused"], len(summary["stages"]))
    return summary


def infer_round(stages: StageRunner, p: dict, run_dir: Path, round_: int, upstream: list[str]):
    """Ensemble + TTA over round `round_`'s members; its probabilities, report and ablation rows go to S3; then the
    label-noise audit of that ensemble (the next round drops or relabels what it lists). Returns the infer result
    and the infer and audit keys."""
    out = run_dir / "infer" / f"r{round_}"
    key = stages.key("infer", upstream, {"round": round_})
    result = stages("infer", f"infer-r{round_}", key, f"infer/r{round_}",
                    partial(stage_call, "pipelines.infer:run", p["data"], p["infer"], run_dir / "validate",
                            tasks.members_dir(run_dir, round_), out, round_))
    publish_markdown(out / "report.md", f"ensemble-report-r{round_}")
    publish_figures(out / "plots", round_)
    ka = stages.key("audit", [upstream[0], key], {"round": round_})
    audit = stages("audit", f"audit-r{round_}", ka, f"audit/r{round_}",
                   partial(stage_call, "pipelines.audit:run", p["data"], p["audit"], run_dir / "validate", out,
                           run_dir / "audit" / f"r{round_}", tasks.members_dir(run_dir, round_)))
    create_markdown_artifact(embed_images((audit.out_dir / "report.md").read_text(), audit.out_dir),
                             key=f"label-noise-audit-r{round_}",
                             description="training images ranked by their own out-of-fold mIoU, worst first")
    return result, key, ka


def with_profile(params_file: Path, profile: str, run_dir: Path) -> Path:
    """params_file itself, or (a profile asked for) a copy under the run with `profile` set: the train tasks'
    processes read the same file, and the run keeps the params it ran with."""
    if not profile:
        return params_file
    raw = yaml.safe_load(params_file.read_text())
    apply_profile(raw, profile, str(params_file))     # an unknown profile fails here, naming the defined ones
    out = run_dir / "params.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({**raw, "profile": profile}, sort_keys=False))
    return out


def fan_out(stages: StageRunner, stage: str, matrix: list[tuple[str, int, int]], run_dir: Path, params_file: str,
            fanout, upstream: list[str], round_: int = 0, epochs: int | None = None) -> tuple[list[Path], list[str]]:
    """Launch every (model, seed, fold) at once, on this machine's threads or a Ray cluster (`fanout.runner`);
    the device leases (or Ray's scheduler) decide how many really run together.

    Each member is its own content-keyed task (uploaded as soon as it finishes, while the others still train);
    returns the members' folders and keys. On Ray the members get their inputs from S3 by content (the nodes need
    no disk of this machine's: flows.nodeinputs), and each finished member is fetched from S3 into run_dir. While
    they run, the `<stage>-progress` artifacts show how far the matrix has got (`epochs`: each member's, for the
    progress bar's share of a running member)."""
    run_dir, params_file = Path(run_dir).absolute(), str(Path(params_file).absolute())
    root = tasks.members_dir(Path(""), round_).as_posix()
    outs, failed, jobs = [], [], []
    with runners.matrix_runner(fanout) as runner:      # None: the flow's own threads
        runners.check_cluster(fanout)
        # on Ray the members get their inputs by content (S3), for nodes that share no disk with this machine
        inputs = member_inputs(stages, run_dir, params_file, round_) if runner is not None else None
        for m, s, f in matrix:
            member = f"{m}-s{s}-f{f}"
            label = f"{stage}{f'-r{round_}' if round_ else ''}-{member}"
            key = stages.key(stage, upstream, {"model": m, "seed": s, "fold": f, "round": round_})
            call = partial(tasks.train.fn, stage, m, s, f, run_dir, params_file, fanout, round_, inputs)
            jobs.append((member, label, key, f"{root}/{member}", call))
        with runners.member_options(fanout):
            futures = [stages.submit(stage, label, key, rel, call, runner=runner) for _, label, key, rel, call in jobs]
        with progress.watch(f"{stage}-r{round_}" if round_ else stage,
                            [(member, run_dir / rel) for member, _, _, rel, _ in jobs], futures, epochs):
            for (member, label, key, rel, call), fut in zip(jobs, futures):
                try:   # one member failing (say, out of memory) must not cut the others short
                    outs.append(stages.finish(stage, label, key, rel, call, fut, runner=runner))
                except Exception as e:
                    get_run_logger().error("%s failed: %s", label, e)
                    failed.append(member)
    if failed:
        try:                        # the members that finished are in S3 before the flow fails
            stages.wait_stored()
        except StorageError as e:   # the members' failure is the error to see; this one is logged beside it
            get_run_logger().error("%s", e)
        raise RuntimeError(f"{stage}: {len(failed)} of {len(matrix)} members failed ({', '.join(failed)}); the others "
                           "finished and are stored. See each failed task's log for the cause; a retry of this "
                           "flow run reuses the finished members")
    return outs, [j[2] for j in jobs]


def member_inputs(stages: StageRunner, run_dir: Path, params_file: str, round_: int) -> nodeinputs.MemberInputs:
    """What each member of round `round_` reads, by content: the run's validate and split folders (and the round's
    pseudo labels and the previous round's audit) as stored, the photos (stored now where S3 lacks them) and the
    params. Waits for the run's pending store tasks: a node can only fetch what is in S3."""
    stages.wait_stored()
    rels = ["validate", "split"] + ([f"pseudo/r{round_}", f"audit/r{round_ - 1}"] if round_ else [])
    missing = [rel for rel in rels if rel not in stages.folders]
    if missing:
        raise KeyError(f"fan_out on Ray needs the run's {missing} as stages of this StageRunner (the members fetch "
                       f"them from S3); ran: {sorted(stages.folders)}")
    folders = {rel: nodeinputs.StoredFolder(stages.folders[rel].prefix, stages.folders[rel].files) for rel in rels}
    return nodeinputs.prepare(stages.store, stages.run, run_dir, folders, Path(params_file))


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


def publish_figures(plots: Path, round_: int) -> None:
    """The infer stage's pictures: its OOF confusion (normalised by truth) and per-class IoU as tables, its heatmap
    and photo grids inlined in a markdown artifact (JPEG previews within segpipe.inline's budget, as the EDA's)."""
    if not (plots / "tables.json").is_file():     # a stored result from before the stage drew them
        return
    tables = json.loads((plots / "tables.json").read_text())
    create_table_artifact(tables["confusion"], key=f"ensemble-confusion-r{round_}",
                          description="ensemble OOF confusion: one row per truth class, the share of its pixels "
                                      "predicted as each class (rows sum to 1)")
    create_table_artifact(tables["per_class_iou"], key=f"ensemble-per-class-iou-r{round_}",
                          description="ensemble OOF IoU per class (None: absent from truth and prediction)")
    create_markdown_artifact(embed_images((plots / "figures.md").read_text(), plots),
                             key=f"ensemble-figures-r{round_}",
                             description="OOF confusion heatmap, test predictions, OOF images the members disagree on")


def publish_markdown(path: Path, key: str) -> None:
    if path.is_file():
        create_markdown_artifact(path.read_text(), key=key)


def submit_and_record(p: dict, run_dir: Path, sent: RoundChoice, prefix: str, rid: str) -> dict:
    """Submit round `sent` (if submit.policy lets this deployment), upload the stage's outputs, publish the
    CV-vs-LB history."""
    # the deployment's name decides the policy; None for a direct flow call (submit.manual_policy)
    t0 = time.time()
    sub = tasks.submit(p["submit"], p["data"], sent.infer_dir, run_dir / "submit",
                       hyperparameters={k: p[k].model_dump(mode="json")
                                        for k in ("train", "retrain", "infer", "pseudo")},
                       oof_miou=sent.oof_miou, deployment=deployment.name, run_name=rid, round_=sent.round,
                       round_reason=sent.reason)
    record_timing("work", "submit", t0, time.time())
    tasks.upload(run_dir / "submit", f"{prefix}/submit")     # never cached: the policy and the leaderboard decide
    publish_history(run_dir / "submit" / "history.json")
    cv_lb = run_dir / "submit" / "cv_lb.md"     # OOF vs public over time; warns beyond submit.cv_lb_margin
    if cv_lb.is_file():
        create_markdown_artifact(embed_images(cv_lb.read_text(), cv_lb.parent), key="cv-vs-leaderboard",
                                 description="every submission's OOF mIoU beside its public mIoU, oldest first")
    return {"public_miou": sub.public_score, "submission": sub.submission_id, "submit_status": sub.status,
            "submit_reason": sub.reason, "submit_score": sub.score}


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
