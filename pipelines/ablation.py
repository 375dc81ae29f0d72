"""Stage `ablation`: does each step pay? One row per step (single model -> + flip TTA -> + multi-scale TTA -> fold
ensemble -> multi-model ensemble -> + each pseudo-label round), each with its OOF mIoU and its public leaderboard
mIoU, from the probabilities the infer stages stored (no model runs here).

Each row's test masks become a submission file; with `ablation.submit` and the ablation key (its own daily
limit on the local leaderboard: `segpipe stack up` creates it) every file is scored by the leaderboard itself.
`dvc repro` runs this stage with --dry-run (files written and linted, nothing sent), like the submit stage.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.common import parser, run_main, write_json
from segpipe.config import AblationParams, DataParams, SubmitParams, parse_section, read_params
from segpipe.leaderboard import SUBMITTED, LeaderboardClient, LeaderboardError, Submission
from segpipe.submission import lint_submission, write_submission

log = logging.getLogger("pipelines.ablation")

KEY_ENV = "SEGPIPE_LEADERBOARD_ABLATION_KEY"
COLUMNS = ("step", "name", "oof_miou", "oof_selected", "delta_oof", "public_miou", "delta_public", "pays", "status",
           "note")


@dataclass(frozen=True)
class AblationResult:
    rows: list[dict]
    out_dir: Path
    noise_band: float | None = None      # the single-model row's seed-to-seed spread (OOF mIoU); None: one seed

    def table(self) -> list[dict]:
        """The rows as the Prefect table artifact shows them."""
        def r4(v):
            return None if v is None else round(v, 4)
        return [{c: (r4(r.get(c)) if isinstance(r.get(c), float) else r.get(c)) for c in COLUMNS} for r in self.rows]


def collect_rows(infer_root: Path) -> list[dict]:
    """Rows of every round's infer output (infer_root/r0, r1, ...) in round order."""
    infer_root = Path(infer_root)
    rounds = sorted(int(d.name[1:]) for d in infer_root.iterdir()
                    if re.fullmatch(r"r\d+", d.name) and (d / "ablation.json").is_file()) if infer_root.is_dir() else []
    if not rounds:
        raise FileNotFoundError(f"no r<N>/ablation.json under {infer_root}: run the infer stage first")
    rows = []
    for r in rounds:
        for row in json.loads((infer_root / f"r{r}" / "ablation.json").read_text()):
            masks = row.get("masks")
            rows.append({**row, "round": r, "masks": str(infer_root / f"r{r}" / masks) if masks else None,
                         "test_index": str(infer_root / f"r{r}" / "test_index.json")})
    return rows


def verdict(d_oof: float | None, d_pub: float | None, band: float | None = None) -> str | None:
    """yes / no / mixed / same from the deltas that exist (OOF, public); `noise` when an OOF delta is within the
    seed-to-seed spread `band` of the single-model row: a gain is only called one beyond what a seed moves."""
    ds = [d for d in (d_oof, d_pub) if d is not None]
    if not ds:
        return None
    eps = 5e-5                       # below what the report's 4 decimals show
    if all(abs(d) <= eps for d in ds):
        return "same"
    if band is not None and d_oof is not None and abs(d_oof) <= band:
        return "noise"
    if all(d >= -eps for d in ds):
        return "yes"
    if all(d <= eps for d in ds):
        return "no"
    return "mixed"


def run(params: AblationParams, submit: SubmitParams, data: DataParams, infer_root: Path, out_dir: Path, *,
        key: str | None, dry_run: bool = False, run_name: str = "") -> AblationResult:
    """Write out_dir/submissions/<step>.csv, ablation.{json,md} and metrics.json; submit each file if allowed."""
    out_dir = Path(out_dir)
    rows = collect_rows(infer_root)
    if dry_run:
        why = "not submitted: dry run (dvc repro never spends leaderboard slots)"
    elif not params.submit:
        why = "not submitted <ablation.submit=false>"
    elif not key:
        why = f"not submitted: {KEY_ENV} is not set (`segpipe stack up` creates it)"
    else:
        why = ""
    client = LeaderboardClient(submit.base_url, submit.competition_id, key) if not why else None
    sent: dict[str, Submission] = {}     # sha256 -> this run's submission of that file
    prev: dict | None = None
    band = next((r["seed_spread"] for r in rows if r.get("seed_spread") is not None), None)
    for row in rows:
        row.update(public_miou=None, delta_oof=None, delta_public=None, pays=None, submission_id=None)
        if row["masks"] is None:
            row["status"] = "skipped"
            continue
        names = json.loads(Path(row["test_index"]).read_text())["file_names"]
        csv = write_submission(out_dir / "submissions" / f"{row['step']}.csv", names, np.load(row["masks"]))
        row["sha256"] = lint_submission(csv, names, len(data.classes)).sha256
        row["csv"] = str(csv)
        row["status"] = why or "pending"
        if client is not None:
            try:
                # the same file twice (e.g. one model: fold ensemble = multi-model ensemble) costs no slot
                description = f"{params.description}: {row['name']}" + (f" [{run_name}]" if run_name else "")
                sub = sent.get(row["sha256"]) or client.submit(
                    csv, description, {"training": {}, "inference": {"ablation_step": row["step"]}})
                if sub.status == "pending":
                    sub = client.wait_for_score(sub.id, timeout_s=submit.wait_seconds, poll_s=submit.poll_seconds)
                sent[row["sha256"]] = sub        # a server without listing dedupes nothing: never send a file twice
                status = sub.status
                if status == SUBMITTED:          # no score API: the public score is read on the leaderboard's page
                    status = f"submitted as #{sub.local_id}, score on the leaderboard's page"
                row.update(public_miou=sub.public_score, submission_id=sub.id, status=status)
            except (LeaderboardError, TimeoutError) as e:     # the report still shows every OOF figure
                log.warning("ablation row %s not scored: %s", row["step"], e)
                row["status"] = f"error: {e}"
        if prev is not None:
            if row["oof_miou"] is not None and prev["oof_miou"] is not None:
                row["delta_oof"] = row["oof_miou"] - prev["oof_miou"]
            if row["public_miou"] is not None and prev["public_miou"] is not None:
                row["delta_public"] = row["public_miou"] - prev["public_miou"]
            row["pays"] = verdict(row["delta_oof"], row["delta_public"], band)
        prev = row
    result = AblationResult(rows, out_dir, band)
    write_json(out_dir / "ablation.json", rows)
    write_json(out_dir / "metrics.json", {
        **{f"oof/{r['step']}": r["oof_miou"] for r in rows if r["oof_miou"] is not None},
        **{f"public/{r['step']}": r["public_miou"] for r in rows if r["public_miou"] is not None},
        **({"noise_band": band} if band is not None else {})})
    (out_dir / "ablation.md").write_text(ablation_md(result))
    for r in rows:
        print(f"ablation: {r['name']:<48} OOF {_f(r['oof_miou'])}  public {_f(r['public_miou'])}  "
              f"pays: {r['pays'] or '-'}  ({r['status']})", flush=True)
    return result


def _f(v: float | None, signed: bool = False) -> str:
    return "n/a" if v is None else (f"{v:+.4f}" if signed else f"{v:.4f}")


def ablation_md(result: AblationResult) -> str:
    lines = [f"| {r['name']} | {_f(r['oof_miou'])} | {_f(r.get('oof_selected'))} | {_f(r['delta_oof'], True)} | "
             f"{_f(r['public_miou'])} | {_f(r['delta_public'], True)} | {r['pays'] or '-'} | {r['note']} |"
             for r in result.rows]
    band = (f"Noise band: ±{result.noise_band:.4f} OOF mIoU, how much the single-model row moves between two seeds; "
            "a row pays only beyond it (`noise`: within it)." if result.noise_band is not None else
            "No noise band: one seed (`train.seeds` with two measures one); a gain may be a seed's luck.")
    return ("# Does each step pay?\n\nOOF: out-of-fold mIoU over the training images (one confusion matrix); where a "
            "choice was made on OOF (the ensemble's weights) it is the nested figure, each fold scored with weights "
            "searched on the others, and *OOF selected* is the figure that saw its own choice. Public: the "
            "leaderboard's score of that row's submission. Deltas are against the row above.\n\n" + band + "\n\n"
            "| step | OOF mIoU | OOF selected | Δ OOF | public mIoU | Δ public | pays? | note |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--infer", type=Path, default=Path("artifacts/infer"), help="the folder of r0, r1, ... infer outputs")
    p.add_argument("--out", type=Path, default=Path("artifacts/ablation"))
    p.add_argument("--dry-run", action="store_true", help="write and lint the files, submit nothing")
    a = p.parse_args()
    raw = read_params(a.params)
    run_main(lambda: run(parse_section(raw, "ablation", AblationParams), parse_section(raw, "submit", SubmitParams),
                         parse_section(raw, "data", DataParams), a.infer, a.out, key=os.environ.get(KEY_ENV),
                         dry_run=a.dry_run))


if __name__ == "__main__":
    main()
