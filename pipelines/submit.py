"""Stage `submit`: write and lint the submission CSV, decide whether this run may submit, submit, wait for the score.

Every submission is also recorded in the CV-vs-leaderboard history (`submission_history.json` beside the ledger):
run, time, file sha256, submission id, description, OOF mIoU and public score. The `if_better` policy reads it.

A leaderboard that speaks only the published protocol (no limits, listing or score API) is enough: the daily
budget is then counted in the ledger (submit.daily_limit), and the run records the file as `submitted`, its score
on the leaderboard's page, instead of waiting for one.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from pipelines.common import write_json
from segpipe.config import DEFAULT_PARAMS, DataParams, SubmitParams, parse_section, read_params
from segpipe.leaderboard import (
    SUBMITTED, LeaderboardClient, LeaderboardError, LeaderboardUnreachable, Limits, Submission, check_key_host,
)
from segpipe.submission import lint_submission, write_submission

if TYPE_CHECKING:
    from segpipe.compare import CvLb

log = logging.getLogger("pipelines.submit")

KEY_ENV = "SEGPIPE_LEADERBOARD_KEY"
HISTORY_NAME = "submission_history.json"


class SubmitFailed(RuntimeError):
    """The leaderboard scored the file as failed, or the inputs are missing."""


@dataclass(frozen=True)
class SubmitResult:
    csv: str
    sha256: str
    mode: str
    status: str                          # dry-run | pending | scored | failed | submitted (no score API)
    description: str
    submission_id: int | None = None
    local_id: int | None = None
    public_score: float | None = None
    public_per_class: dict | None = None
    reused: bool = False                 # the ledger or the server already had this file
    error: str | None = None
    oof_miou: float | None = None        # this run's cross-validated mIoU, beside the public score
    reason: str = ""                     # why this run did or did not submit (policy, mode)
    user: int | None = None              # the leaderboard's user number (with local_id: the object key)
    score: str = ""                      # where the score is: "" when public_score has it
    round: int | None = None             # the pseudo-label round whose ensemble this file is (choose_round)
    round_reason: str = ""               # why that round

    def summary(self) -> str:
        return self._summary() + (f"\n  sent round {self.round}: {self.round_reason}" if self.round_reason else "")

    def _summary(self) -> str:
        if self.status == "dry-run":
            return (f"submit: dry run, not submitted: {self.reason} | {self.csv} linted OK "
                    f"(sha256 {self.sha256[:12]})")
        if self.status == SUBMITTED:
            oof = "n/a" if self.oof_miou is None else f"{self.oof_miou:.4f}"
            again = ", already submitted" if self.reused else ""
            return (f"submit: {self.score} (OOF {oof}) | submission #{self.local_id} of user {self.user}{again} "
                    f"| {self.description!r}")
        score = "n/a" if self.public_score is None else f"{self.public_score:.4f}"
        oof = "n/a" if self.oof_miou is None else f"{self.oof_miou:.4f}"
        again = ", already submitted" if self.reused else ""
        return (f"submit: public mIoU {score} (OOF {oof}) | submission {self.submission_id} (#{self.local_id}) "
                f"{self.status}{again} | {self.description!r}" + (f" | {self.error}" if self.error else ""))


@dataclass(frozen=True)
class Decision:
    submit: bool
    reason: str


def _update_json(path: Path, default, change: Callable):
    """Read-modify-write `path` under an exclusive lock, so two runs finishing together both keep their entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        obj = json.loads(path.read_text()) if path.is_file() else default
        obj = change(obj)
        write_json(path, obj)
    return obj


def _ledger_key(params: SubmitParams, sha256: str) -> str:
    return f"{params.base_url.rstrip('/')}|{params.competition_id}|{sha256}"


def _board(params: SubmitParams) -> str:
    """Which leaderboard a history record belongs to: OOF scores compare only within one competition."""
    return f"{params.base_url.rstrip('/')}|{params.competition_id}"


def history_path(params: SubmitParams) -> Path:
    return Path(params.ledger).parent / HISTORY_NAME


def read_history(params: SubmitParams) -> list[dict]:
    """This leaderboard's records from the history file, oldest first; [] when there is none yet."""
    path = history_path(params)
    records = json.loads(path.read_text()) if path.is_file() else []
    return [r for r in records if r.get("leaderboard") == _board(params)]


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def decide(params: SubmitParams, deployment: str | None, oof_miou: float | None, history: list[dict]) -> Decision:
    """Whether this run may spend a leaderboard slot, and a sentence saying why (with the knob that decided)."""
    if params.mode == "dry-run":
        return Decision(False, "write and lint only <submit.mode=dry-run>")
    if deployment:
        if deployment not in params.policy:
            return Decision(False, f"deployment {deployment!r} is not in submit.policy {sorted(params.policy)}; "
                                   "its runs write and lint only")
        policy, who, knob = params.policy[deployment], f"deployment {deployment!r}", f"submit.policy.{deployment}"
    else:
        policy, who, knob = params.manual_policy, "a run outside any deployment", "submit.manual_policy"
    knob = f"<{knob}={policy}>"
    if policy == "never":
        return Decision(False, f"{who} never submits {knob}")
    if policy == "always":
        return Decision(True, f"{who} always submits {knob}")
    oof_miou = _finite(oof_miou)
    if oof_miou is None:
        return Decision(False, f"{who} submits only a better OOF mIoU, and this run has none to compare "
                               f"(no infer metrics) {knob}")
    earlier = [r for r in history if _finite(r.get("oof_miou")) is not None and r.get("status") != "failed"]
    if not earlier:
        return Decision(True, f"OOF mIoU {oof_miou:.4f}: no earlier submission to beat {knob}")
    best = max(earlier, key=lambda r: r["oof_miou"])
    than = (f"the best submitted OOF mIoU {best['oof_miou']:.4f} (submission {best.get('submission_id')}, "
            f"run {best.get('run')})")
    if oof_miou > best["oof_miou"]:
        return Decision(True, f"OOF mIoU {oof_miou:.4f} beats {than} {knob}")
    return Decision(False, f"OOF mIoU {oof_miou:.4f} does not beat {than} {knob}")


def may_submit(params: SubmitParams, deployment: str | None) -> bool:
    """Whether any outcome of this run could spend a slot (if_better counts: its OOF is not known yet)."""
    if params.mode == "dry-run":
        return False
    policy = params.policy.get(deployment, "never") if deployment else params.manual_policy
    return policy != "never"


def preflight(params: SubmitParams, key: str | dict | None, *, env: str = KEY_ENV) -> None:
    """At start-up, before any work: the key is set, submit.base_url is the host it was issued for
    (LeaderboardClient checks; KeyHostMismatch names both) and, where the leaderboard can say so, it accepts the key.

    Never spends a slot: it asks the limits endpoint (a 401 raises). A leaderboard with only the published
    protocol has no call that checks a key without taking a slot, so there the key is first used by the submit
    stage (logged). An unreachable leaderboard only warns: the run takes hours, and the submit stage retries then.
    """
    if not key:
        raise SubmitFailed(f"{env} is not set and this run may submit (submit.policy / submit.manual_policy): "
                           "export the leaderboard key, put it in a Prefect Secret block (with its host, "
                           "{\"key\": KEY, \"host\": HOST}, for a leaderboard other than the local one), or set "
                           "submit.mode: dry-run")
    client = LeaderboardClient(params.base_url, params.competition_id, key, retries=1, backoff_s=2.0)
    try:
        offered = client.offers_extras()
    except LeaderboardUnreachable as e:
        log.warning("leaderboard not reachable at start-up (%s); going on, the submit stage retries <submit.base_url>",
                    e)
        return
    if not offered:
        log.info("%s key not checked at start-up: %s answers only the published protocol, where checking a key "
                 "would spend a slot; the submit stage uses it <submit.base_url=%s>", env, params.base_url,
                 params.base_url)


def _utc(text: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def ledger_limits(params: SubmitParams, ledger: dict, now: datetime | None = None) -> Limits:
    """Today's (UTC) budget counted in the ledger: slots this machine spent on this leaderboard since midnight."""
    now = now or datetime.now(timezone.utc)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    board = _board(params) + "|"
    used = 0
    for k, e in ledger.items():
        if k.startswith(board):
            times = e.get("slots", [e.get("submitted_at")])     # entries older than `slots` spent one, then
            used += sum(1 for t in times if (u := _utc(t)) is not None and start <= u < start + timedelta(days=1))
    return Limits(params.daily_limit, used, max(params.daily_limit - used, 0),
                  (start + timedelta(days=1)).isoformat(timespec="seconds"),
                  source=f"the ledger {params.ledger} <submit.daily_limit={params.daily_limit}>")


def record(params: SubmitParams, sub: Submission, *, run: str, sha256: str, oof_miou: float | None,
           deployment: str | None) -> list[dict]:
    """Add this submission to the history (or refresh its status and score); return this leaderboard's records."""
    entry = {
        "leaderboard": _board(params), "run": run, "deployment": deployment,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sha256": sha256,
        "submission_id": sub.id, "local_id": sub.local_id, "user": sub.user,
        "description": sub.description or params.description,
        "oof_miou": _finite(oof_miou), "public_score": sub.public_score, "status": sub.status,
    }

    def same(r: dict) -> bool:
        if r.get("leaderboard") != entry["leaderboard"]:
            return False
        if sub.id is not None:
            return r.get("submission_id") == sub.id
        # the published protocol gives no id: the user and their local number name the submission
        return r.get("submission_id") is None and (r.get("user"), r.get("local_id")) == (sub.user, sub.local_id)

    def change(records: list[dict]) -> list[dict]:
        for r in records:
            if same(r):
                # the same submission seen again (ledger or server reuse): keep who made it, refresh the score
                r.update(public_score=sub.public_score, status=sub.status)
                if r.get("oof_miou") is None:
                    r["oof_miou"] = entry["oof_miou"]
                return records
        return [*records, entry]

    records = _update_json(history_path(params), [], change)
    return [r for r in records if r.get("leaderboard") == entry["leaderboard"]]


def run(params: SubmitParams, data: DataParams, infer_dir: Path, out_dir: Path, *, key: str | dict | None,
        hyperparameters: dict, force: bool = False, oof_miou: float | None = None, deployment: str | None = None,
        run_name: str = "", round_: int | None = None, round_reason: str = "") -> SubmitResult:
    """Write out_dir/submission.csv from infer_dir's (N, H, W) masks, lint it, and submit it if the policy allows.

    `deployment` is the Prefect deployment this run belongs to (None: a run by hand) and `oof_miou` its
    cross-validated score; `decide` turns them and submit.policy into submit-or-not. out_dir also gets
    result.json and history.json (this leaderboard's CV-vs-public records, for the flow's table artifact).
    """
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
    run_name = run_name or time.strftime("manual-%Y%m%d-%H%M%S", time.gmtime())
    history = read_history(params)
    decision = decide(params, deployment, oof_miou, history)
    log.info("%s: %s", "submitting" if decision.submit else "not submitting", decision.reason)
    base = dict(csv=str(csv), sha256=report.sha256, mode=params.mode, description=params.description,
                oof_miou=_finite(oof_miou), reason=decision.reason, round=round_, round_reason=round_reason)
    if round_reason:
        log.info("sending round %s: %s", round_, round_reason)
    if not decision.submit:
        result = SubmitResult(status="dry-run", **base)
        write_json(out_dir / "result.json", asdict(result))
        write_json(out_dir / "history.json", history)
        write_cv_lb(history, params.cv_lb_margin, out_dir)
        return result
    if not key:
        raise SubmitFailed(f"{KEY_ENV} is not set; export your leaderboard key or use submit.mode=dry-run")

    client = LeaderboardClient(params.base_url, params.competition_id, key)
    ledger_path = Path(params.ledger)
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
    lkey = _ledger_key(params, report.sha256)
    entry = None if force else ledger.get(lkey)
    sub = None
    if entry and entry.get("submission_id") is not None and client.offers_extras():
        try:
            sub = client.submission(entry["submission_id"])
            log.info("ledger %s: this file is submission %s already; not resubmitting (pass --force to)",
                     ledger_path, sub.id)
        except LeaderboardError as e:       # e.g. the server's state was reset: the ledger entry is stale
            log.warning("ledger entry for submission %s is stale (%s); submitting again", entry["submission_id"], e)
    elif entry:                             # no score API to ask: the ledger's word is all there is
        sub = Submission(id=entry.get("submission_id"), local_id=entry["local_id"], user=entry.get("user"),
                         status=SUBMITTED, description=entry.get("description", ""),
                         submitted_at=entry.get("submitted_at"), content_sha256=report.sha256)
        log.info("ledger %s: this file was submitted already as #%s (user %s); not resubmitting (pass --force to)",
                 ledger_path, sub.local_id, sub.user)
    if sub is not None:
        reused = True
    else:
        sub = client.submit(csv, params.description, hyperparameters, force=force,
                            allow_last_slot=params.allow_last_slot, fallback_limits=ledger_limits(params, ledger))
        reused = sub.existing
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        new = {"submission_id": sub.id, "local_id": sub.local_id, "user": sub.user, "description": params.description,
               "submitted_at": sub.submitted_at or now}

        def add(d: dict) -> dict:
            # every slot this machine spent on this file, for submit.daily_limit's count (a --force resubmission
            # replaces the entry, and must not hide the slot the earlier one took)
            old = d.get(lkey, {})
            slots = old.get("slots", [old["submitted_at"]] if old.get("submitted_at") else [])
            return {**d, lkey: {**new, "slots": slots if reused else [*slots, now]}}
        _update_json(ledger_path, {}, add)
    if sub.status == "pending":
        try:
            sub = client.wait_for_score(sub.id, timeout_s=params.wait_seconds, poll_s=params.poll_seconds)
        except TimeoutError as e:
            log.warning("%s <submit.wait_seconds=%s>", e, params.wait_seconds)
    score = ""
    if sub.status == SUBMITTED:
        score = (f"submitted, score on the leaderboard's page ({params.base_url} offers no score API, so this run "
                 f"does not wait for one)")
        log.info("%s; object key %s", score, client.object_key(sub))
    history = record(params, sub, run=run_name, sha256=report.sha256, oof_miou=oof_miou, deployment=deployment)
    result = SubmitResult(
        status=sub.status, submission_id=sub.id, local_id=sub.local_id, public_score=sub.public_score,
        public_per_class=sub.public_per_class, reused=reused, error=sub.error, user=sub.user, score=score, **base)
    write_json(out_dir / "result.json", asdict(result))
    write_json(out_dir / "history.json", history)
    write_cv_lb(history, params.cv_lb_margin, out_dir)
    if sub.status == "failed":
        raise SubmitFailed(f"leaderboard rejected submission {sub.id}: {sub.error}")
    return result


def write_cv_lb(history: list[dict], margin: float, out_dir: Path) -> CvLb:
    """Every scored submission's OOF beside its public mIoU, oldest first: cv_lb.csv (`dvc plots`), cv_lb.png,
    cv_lb.md; a warning in the log (and the .md) for each pair further apart than the margin."""
    # matplotlib and pandas: imported here, not at the flow's start (the flow process imports this module)
    from segpipe.compare import cv_lb_markdown, cv_lb_plot, cv_vs_lb
    cv = cv_vs_lb(history, margin)
    columns = ("n", "time", "run", "submission_id", "oof_miou", "public_miou", "gap", "diverged")
    (out_dir / "cv_lb.csv").write_text(",".join(columns) + "\n" + "".join(
        ",".join(str(r[c]) for c in columns) + "\n" for r in cv.rows))
    cv_lb_plot(cv, margin, out_dir / "cv_lb.png")
    (out_dir / "cv_lb.md").write_text(cv_lb_markdown(cv, margin))
    for w in cv.warnings:
        log.warning(w)
    return cv


def infer_oof_miou(infer_dir: Path) -> float | None:
    """The ensemble's honest (nested) OOF mIoU from the infer stage's metrics.json; None when it wrote none."""
    path = Path(infer_dir) / "metrics.json"
    return json.loads(path.read_text()).get("oof_miou") if path.is_file() else None


@dataclass(frozen=True)
class RoundChoice:
    round: int | None
    infer_dir: Path
    oof_miou: float | None
    reason: str


def choose_round(infer: Path) -> RoundChoice:
    """What to send: of the rounds under `infer` (r0, r1, ...: an infer output each), the one whose ensemble has the
    best honest OOF mIoU, the earlier on a tie (a pseudo-label round must gain to be sent). A single round's folder
    (holding test_masks.npy) is sent as given."""
    infer = Path(infer)
    if (infer / "test_masks.npy").is_file():
        m = re.fullmatch(r"r(\d+)", infer.name)
        return RoundChoice(int(m[1]) if m else None, infer, _finite(infer_oof_miou(infer)),
                           f"the infer output given ({infer})")
    rounds = {int(d.name[1:]): d for d in sorted(infer.iterdir()) if re.fullmatch(r"r\d+", d.name)
              and (d / "test_masks.npy").is_file()} if infer.is_dir() else {}
    if not rounds:
        raise SubmitFailed(f"no r<N>/test_masks.npy under {infer}: run the infer stage first (`dvc repro infer`)")
    figures = {r: _finite(infer_oof_miou(d)) for r, d in sorted(rounds.items())}
    scored = {r: v for r, v in figures.items() if v is not None}
    last = max(rounds)
    if not scored:
        return RoundChoice(last, rounds[last], None, f"no round has an OOF figure: the last one, r{last}")
    best = max(scored, key=lambda r: (scored[r], -r))
    table = ", ".join(f"r{r} {v:.4f}" for r, v in scored.items())
    why = f"r{best} has the best nested OOF mIoU of the rounds ({table})"
    if best != last:
        why += f"; the pseudo-label round{'s' if last - best > 1 else ''} after it did not gain"
    return RoundChoice(best, rounds[best], scored[best], why)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    p.add_argument("--infer", type=Path, default=Path("artifacts/infer"), help="the infer outputs (r0, r1, ...): "
                   "the round with the best nested OOF mIoU is sent; or one round's folder, sent as given")
    p.add_argument("--out", type=Path, default=Path("artifacts/submit"))
    p.add_argument("--run-name", default="", help="the run this file came from, for the history "
                   "(default: manual-<UTC time>)")
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
    try:
        choice = choose_round(args.infer)
    except SubmitFailed as e:
        raise SystemExit(f"submit failed: {e}") from None
    print(f"submit: round {choice.round}: {choice.reason}")
    oof = choice.oof_miou
    decision = decide(params, None, oof, read_history(params))   # a run by hand belongs to no deployment
    if decision.submit and not key:                  # fail before minutes of CSV writing, not after
        raise SystemExit(f"{KEY_ENV} is not set: export your leaderboard key, or set submit.mode: dry-run")
    if decision.submit:                              # the same check the client makes, before the CSV too
        try:
            check_key_host(params.base_url, key)
        except LeaderboardError as e:
            raise SystemExit(f"submit failed: {e}") from None
    hyper = {name: raw.get(name, {}) for name in ("train", "retrain", "infer")}
    try:
        result = run(params, data, choice.infer_dir, args.out, key=key, hyperparameters=hyper, force=args.force,
                     oof_miou=oof, run_name=args.run_name, round_=choice.round, round_reason=choice.reason)
    except (SubmitFailed, LeaderboardError) as e:
        raise SystemExit(f"submit failed: {e}") from None
    print(result.summary())


if __name__ == "__main__":
    main()
