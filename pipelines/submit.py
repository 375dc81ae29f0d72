"""Stage `submit`: write and lint the submission CSV from the infer stage's masks, submit it, wait for the score."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from segpipe.config import DEFAULT_PARAMS, DataParams, SubmitParams, parse_section, read_params
from segpipe.leaderboard import LeaderboardClient, LeaderboardError
from segpipe.submission import lint_submission, write_submission

log = logging.getLogger("pipelines.submit")

KEY_ENV = "SEGPIPE_LEADERBOARD_KEY"


class SubmitFailed(RuntimeError):
    """The leaderboard scored the file as failed, or the inputs are missing."""


@dataclass(frozen=True)
class SubmitResult:
    csv: str
    sha256: str
    mode: str
    status: str                          # dry-run | pending | scored | failed
    description: str
    submission_id: int | None = None
    local_id: int | None = None
    public_score: float | None = None
    public_per_class: dict | None = None
    reused: bool = False                 # the ledger or the server already had this file
    error: str | None = None

    def summary(self) -> str:
        if self.mode == "dry-run":
            return f"submit: dry run, {self.csv} linted OK (sha256 {self.sha256[:12]}) <submit.mode=dry-run>"
        score = "n/a" if self.public_score is None else f"{self.public_score:.4f}"
        again = ", already submitted" if self.reused else ""
        return (f"submit: public mIoU {score} | submission {self.submission_id} (#{self.local_id}) {self.status}"
                f"{again} | {self.description!r}" + (f" | {self.error}" if self.error else ""))


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _ledger_key(params: SubmitParams, sha256: str) -> str:
    return f"{params.base_url.rstrip('/')}|{params.competition_id}|{sha256}"


def run(params: SubmitParams, data: DataParams, infer_dir: Path, out_dir: Path, *, key: str | None,
        hyperparameters: dict, force: bool = False) -> SubmitResult:
    """Write out_dir/submission.csv from infer_dir's (N, H, W) masks, lint it, and (mode: submit) submit it."""
    infer_dir, out_dir = Path(infer_dir), Path(out_dir)
    masks_path, index_path = infer_dir / "test_masks.npy", infer_dir / "test_index.json"
    for p in (masks_path, index_path):
        if not p.is_file():
            raise SubmitFailed(f"{p} not found; run the infer stage first (`dvc repro infer`)")
    names = json.loads(index_path.read_text())["file_names"]
    masks = np.load(masks_path, mmap_mode="r")
    csv = write_submission(out_dir / "submission.csv", names, masks)
    report = lint_submission(csv, names, len(data.classes))
    log.info("wrote %s: %d rows, %s bytes, sha256 %s", csv, report.n_rows, f"{report.size_bytes:,}", report.sha256)
    base = dict(csv=str(csv), sha256=report.sha256, mode=params.mode, description=params.description)
    if params.mode == "dry-run":
        result = SubmitResult(status="dry-run", **base)
        _write_json(out_dir / "result.json", asdict(result))
        return result
    if not key:
        raise SubmitFailed(f"{KEY_ENV} is not set; export your leaderboard key or use submit.mode=dry-run")

    client = LeaderboardClient(params.base_url, params.competition_id, key)
    ledger_path = Path(params.ledger)
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
    entry = None if force else ledger.get(_ledger_key(params, report.sha256))
    sub = None
    if entry:
        try:
            sub = client.submission(entry["submission_id"])
            log.info("ledger %s: this file is submission %s already; not resubmitting (pass --force to)",
                     ledger_path, sub.id)
        except LeaderboardError as e:       # e.g. the server's state was reset: the ledger entry is stale
            log.warning("ledger entry for submission %s is stale (%s); submitting again", entry["submission_id"], e)
    if sub is not None:
        reused = True
    else:
        sub = client.submit(csv, params.description, hyperparameters, force=force,
                            allow_last_slot=params.allow_last_slot)
        reused = sub.existing
        ledger[_ledger_key(params, report.sha256)] = {
            "submission_id": sub.id, "local_id": sub.local_id, "description": params.description,
            "submitted_at": sub.submitted_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_json(ledger_path, ledger)
    if sub.status == "pending":
        try:
            sub = client.wait_for_score(sub.id, timeout_s=params.wait_seconds, poll_s=params.poll_seconds)
        except TimeoutError as e:
            log.warning("%s <submit.wait_seconds=%s>", e, params.wait_seconds)
    result = SubmitResult(
        status=sub.status, submission_id=sub.id, local_id=sub.local_id, public_score=sub.public_score,
        public_per_class=sub.public_per_class, reused=reused, error=sub.error, **base)
    _write_json(out_dir / "result.json", asdict(result))
    if sub.status == "failed":
        raise SubmitFailed(f"leaderboard rejected submission {sub.id}: {sub.error}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    p.add_argument("--infer", type=Path, default=Path("artifacts/infer"))
    p.add_argument("--out", type=Path, default=Path("artifacts/submit"))
    p.add_argument("--force", action="store_true", help="submit even if this exact file was submitted before")
    p.add_argument("--dry-run", action="store_true", help="write and lint only, whatever submit.mode says "
                   "(dvc repro uses it: a slot is spent by the flow or by hand, never by a cache miss)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    raw = read_params(args.params)
    params = parse_section(raw, "submit", SubmitParams, str(args.params))
    if args.dry_run:
        params = params.model_copy(update={"mode": "dry-run"})
    data = parse_section(raw, "data", DataParams, str(args.params))
    key = os.environ.get(KEY_ENV)
    if params.mode == "submit" and not key:          # fail before minutes of CSV writing, not after
        raise SystemExit(f"{KEY_ENV} is not set: export your leaderboard key, or set submit.mode: dry-run")
    hyper = {name: raw.get(name, {}) for name in ("train", "retrain", "infer")}
    try:
        result = run(params, data, args.infer, args.out, key=key, hyperparameters=hyper, force=args.force)
    except (SubmitFailed, LeaderboardError) as e:
        raise SystemExit(f"submit failed: {e}") from None
    print(result.summary())


if __name__ == "__main__":
    main()
