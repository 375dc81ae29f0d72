"""Local leaderboard server: the AI Stages presigned-POST protocol over the local S3 store, scored on hidden labels.

Start it with `python -m segpipe.leaderboard serve ...` (see `segpipe.leaderboard.main`). The client lives in
`segpipe.leaderboard` and never imports this module, so it needs no FastAPI.

`--published-only` (ServerSettings.published_only) makes it speak only the published protocol, as a public
leaderboard may: presigned_url answers `url`, the five policy fields (no `key`) and `submission` {user,
local_id}; the limits, listing, score and reveal endpoints answer 404. It still stores, scores and shows each
upload on its page, and still refuses a slot past the daily limit (429).

A reservation (one presigned_url answer) is one row. What the scorer trusts and refuses:
- it scores only the bytes declared: an upload whose sha256 differs from the request's `content_sha256` fails
  with the reason, unscored; a new row's `local_id` is one past the highest in the state *and* in the bucket, so
  its object key never holds an object left by an earlier server or state dir;
- a row whose upload never arrives is `expired` once its URL has (plus a grace): it stops counting toward the
  daily limit, and the same file (same `content_sha256` and `nonce`) may ask again, getting a new row. Expired
  and mismatched rows are `released`: they no longer hold their file's idempotency key;
- query values are bounded (ids within SQLite's 64 bits, descriptions, hyperparameters' length and nesting):
  a hostile value gets a 4xx, and one row that cannot be scored fails alone while the others are scored.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import json
import logging
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated

import numpy as np
from botocore.exceptions import BotoCoreError, ClientError
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from segpipe.leaderboard import OBJECT_KEY
from segpipe.metrics import confusion_matrix, iou_per_class
from segpipe.storage import S3Config
from segpipe.submission import SubmissionError, read_submission, sha256_file, size_bounds

log = logging.getLogger("segpipe.leaderboard")

DEFAULT_MAX_UPLOAD = 256 << 20    # used only while the hidden labels do not exist yet (no N to derive a bound)
MAX_ID = 2**63 - 1                # SQLite INTEGER is signed 64-bit: a larger id cannot even be looked up
MAX_DESCRIPTION = 2000            # characters; a leaderboard row's label, not a document
MAX_HYPERPARAMETERS = 65536       # characters of JSON; real configs are a few hundred
MAX_HYPERPARAMETERS_DEPTH = 32    # nesting levels; far past any config, and well inside every recursive encoder
# uvicorn's h11 answers a request head over 16 KiB with a bare 400 and a reset connection (the client may never
# read the answer), before the limits above can name what is too long. Reading heads up to 8 MiB lets a query of
# megabytes get the 422 that names its limit; only past this does the bare 400 remain.
MAX_REQUEST_HEAD = 8 << 20
EXPIRY_GRACE_S = 60.0             # an upload that passed the policy check just before expiry may still be landing
STORE_ERRORS = (BotoCoreError, ClientError)    # the S3 store down or refusing: worth retrying, not the row's fault


class LabelsUnavailable(RuntimeError):
    """The hidden-labels directory is missing or incomplete (the dataset may not be generated yet)."""


@dataclass
class ServerSettings:
    """Everything the server needs; built from flags + environment by `segpipe.leaderboard.main`."""

    labels_dir: Path
    state_dir: Path
    s3: S3Config
    user_keys: tuple[str, ...]                # SEGPIPE_LEADERBOARD_KEYS; never logged
    admin_key: str | None = None              # SEGPIPE_LEADERBOARD_ADMIN_KEY; reveal needs it
    competition_id: int = 1
    bucket: str = "leaderboard"               # submissions live apart from the pipeline's artifacts
    daily_limit: int = 10
    # further keys, each with its own daily limit (SEGPIPE_LEADERBOARD_KEY_LIMITS): e.g. a key for the ablation
    # report's one-submission-per-row, so measuring the steps never eats the team's own daily slots
    key_limits: dict[str, int] = field(default_factory=dict)
    max_upload_bytes: int | None = None       # None: derived from the test set size (a valid file's max)
    url_expiry_s: int = 900
    poll_s: float = 1.0
    # only the published calls, as a public leaderboard: no limits/listing/scores/reveal API, no `key` in the
    # presigned fields (the client builds it), no idempotency by content hash; a test of the client against it
    # shows the client needs nothing else
    published_only: bool = False

    def __repr__(self) -> str:                # keys stay out of logs and tracebacks
        return (f"ServerSettings(labels_dir={str(self.labels_dir)!r}, state_dir={str(self.state_dir)!r}, "
                f"s3={self.s3!r}, users={len(self.user_keys)}, admin={'set' if self.admin_key else 'unset'}, "
                f"competition_id={self.competition_id}, bucket={self.bucket!r}, daily_limit={self.daily_limit}, "
                f"own-limit keys={len(self.key_limits)}, published_only={self.published_only})")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def json_depth(text: str, stop: int) -> int:
    """Deepest nesting of `[`/`{` in a JSON text (string contents skipped), counted without parsing; stops past `stop`.

    Counted before json.loads: a text of 10,000 `[` would otherwise raise RecursionError inside the parser.
    """
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > stop:
                break
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_hyperparameters(text: str) -> str:
    """The JSON object the client sent, as the text to store; HTTPException(400) saying what is wrong otherwise."""
    if not text:
        return "{}"
    if json_depth(text, MAX_HYPERPARAMETERS_DEPTH) > MAX_HYPERPARAMETERS_DEPTH:
        raise HTTPException(400, f"hyperparameters nest deeper than {MAX_HYPERPARAMETERS_DEPTH} levels; send the "
                                 "configuration, e.g. {\"training\":{...},\"inference\":{...}}")
    try:
        hp = json.loads(text)
    except ValueError as e:       # JSONDecodeError, and an integer past Python's 4,300-digit conversion limit
        raise HTTPException(400, f"hyperparameters must be a JSON object: {e}") from None
    if not isinstance(hp, dict):
        raise HTTPException(400, "hyperparameters must be a JSON object, e.g. {\"training\":{},\"inference\":{}}")
    try:
        # answers are strict JSON in UTF-8: a NaN, an Infinity (1e999) or a lone surrogate (\ud800) stored here would
        # turn every later listing of this user's submissions into a 500
        stored = json.dumps(hp, ensure_ascii=False, allow_nan=False)
        stored.encode("utf-8")
    except ValueError as e:
        raise HTTPException(400, f"hyperparameters must be standard JSON (no NaN, Infinity or lone surrogate "
                                 f"escapes): {e}") from None
    return stored


# --------------------------------------------------------------------------------------------- hidden labels
@dataclass
class HiddenLabels:
    """labels (N, 256, 256) uint8 in test order, with each image's file name and public/private half."""

    file_names: list[str]
    public: np.ndarray            # (N,) bool
    classes: list[str]
    labels: np.ndarray            # (N, 256, 256) uint8
    stamp: tuple = field(default=())

    @classmethod
    def load(cls, root: Path) -> "HiddenLabels":
        lab, idx = root / "labels.npy", root / "index.json"
        if not (lab.is_file() and idx.is_file()):
            raise LabelsUnavailable(f"hidden labels not found: need {lab} and {idx} (generate the dataset first)")
        index = json.loads(idx.read_text())
        labels = np.load(lab, mmap_mode="r")
        names, public, classes = index["file_names"], np.asarray(index["public"], dtype=bool), index["classes"]
        if labels.ndim != 3 or labels.shape[1:] != (256, 256) or len(labels) != len(names):
            raise LabelsUnavailable(
                f"{root}: labels {labels.shape} must be (N, 256, 256) with N = {len(names)} file names")
        if len(public) != len(names):
            raise LabelsUnavailable(f"{root}: {len(names)} file names but {len(public)} public flags")
        stamp = (lab.stat().st_mtime_ns, idx.stat().st_mtime_ns)
        return cls(list(names), public, list(classes), labels, stamp)


def score(names: list[str], masks: np.ndarray, hidden: HiddenLabels) -> dict:
    """mIoU of the public and private halves: one confusion matrix per half over all its images."""
    order = {n: i for i, n in enumerate(hidden.file_names)}
    pred = np.empty((len(hidden.file_names), 256, 256), dtype=np.uint8)
    pred[[order[n] for n in names]] = masks
    nc = len(hidden.classes)
    out: dict = {}
    for half, sel in (("public", hidden.public), ("private", ~hidden.public)):
        if not sel.any():
            out[f"{half}_score"], out[f"{half}_per_class"] = None, None
            continue
        cm = confusion_matrix(np.asarray(hidden.labels[sel]), pred[sel], nc)
        ious = iou_per_class(cm)
        out[f"{half}_score"] = float(np.nanmean(ious)) if np.isfinite(ious).any() else None
        out[f"{half}_per_class"] = {c: (None if np.isnan(v) else float(v)) for c, v in zip(hidden.classes, ious)}
    return out


# --------------------------------------------------------------------------------------------- state
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key_sha256 TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS submissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    competition_id INTEGER NOT NULL, user_id INTEGER NOT NULL, local_id INTEGER NOT NULL,
    description TEXT NOT NULL, hyperparameters TEXT NOT NULL,
    content_sha256 TEXT, nonce TEXT NOT NULL DEFAULT '',
    object_key TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
    public_score REAL, private_score REAL, public_per_class TEXT, error TEXT,
    created_ts REAL NOT NULL, expires_ts REAL NOT NULL, scored_ts REAL,
    released INTEGER NOT NULL DEFAULT 0,
    UNIQUE (competition_id, user_id, local_id));
CREATE TABLE IF NOT EXISTS reveals (competition_id INTEGER PRIMARY KEY, revealed_ts REAL NOT NULL);
"""
# status: pending -> scored | failed | expired. `released` rows (expired, or another file uploaded than declared)
# no longer hold their (content_sha256, nonce): the same file asking again gets a new row, never the dead one.
# A row's local_id is never reused (rows are never deleted), so no two reservations share an object key.
HELD_INDEX = """
CREATE UNIQUE INDEX IF NOT EXISTS submissions_held ON submissions (competition_id, user_id, content_sha256, nonce)
    WHERE content_sha256 IS NOT NULL AND released = 0;
"""
NO_UPLOAD = "no file was uploaded before the presigned URL expired"    # the old servers' wording, migrated below


class State:
    """SQLite under --state-dir: users (by key hash), submissions, reveals. Survives restarts."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:   # WAL: the scorer thread writes while request threads read
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            self._migrate(db)
        finally:
            db.close()

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a state dir written by an older server to this schema; a no-op on a current one."""
        db.execute("BEGIN IMMEDIATE")
        try:
            if "released" not in {r[1] for r in db.execute("PRAGMA table_info(submissions)")}:
                db.execute("ALTER TABLE submissions ADD COLUMN released INTEGER NOT NULL DEFAULT 0")
            # the old index held a file's key for good, even on a row whose upload never came
            db.execute("DROP INDEX IF EXISTS submissions_idempotent")
            db.execute(HELD_INDEX)
            # such rows were `failed`; as `expired` they free their daily slot and their file can be sent again
            db.execute("UPDATE submissions SET status = 'expired', released = 1 WHERE status = 'failed' AND error = ?",
                       (NO_UPLOAD,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def connect(self, immediate: bool = False):
        # a connection per operation: request threads and the scorer thread never share one
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def register_keys(self, keys: tuple[str, ...]) -> dict[str, int]:
        """key sha256 -> user id; a key keeps its id across restarts and reorderings of the key list."""
        out = {}
        with self.connect(immediate=True) as db:
            for k in keys:
                h = key_hash(k)
                row = db.execute("SELECT id FROM users WHERE key_sha256 = ?", (h,)).fetchone()
                if row is None:
                    cur = db.execute("INSERT INTO users (key_sha256, created_at) VALUES (?, ?)",
                                     (h, utc_now().isoformat(timespec="seconds")))
                    out[h] = cur.lastrowid
                else:
                    out[h] = row["id"]
        return out


# --------------------------------------------------------------------------------------------- app
class Leaderboard:
    """Request handling and scoring over one State, one S3 bucket and one hidden-labels directory."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.state = State(settings.state_dir / "leaderboard.sqlite")
        self.users = self.state.register_keys(tuple(settings.user_keys) + tuple(settings.key_limits))
        self.user_limits = {self.users[key_hash(k)]: limit for k, limit in settings.key_limits.items()}
        self.s3 = settings.s3.client()
        self._labels: HiddenLabels | None = None
        self._labels_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiting: dict[int, str] = {}     # row id -> why it is still pending (logged once, not every round)

    # ---- labels, loaded lazily: the dataset may be generated after the server starts
    def labels(self) -> HiddenLabels:
        with self._labels_lock:
            root = self.settings.labels_dir
            try:
                stamp = ((root / "labels.npy").stat().st_mtime_ns, (root / "index.json").stat().st_mtime_ns)
            except OSError:
                stamp = None
            if self._labels is None or stamp != self._labels.stamp:
                self._labels = HiddenLabels.load(root)
            return self._labels

    def max_upload_bytes(self) -> int:
        if self.settings.max_upload_bytes:
            return self.settings.max_upload_bytes
        try:
            hidden = self.labels()
        except LabelsUnavailable:
            return DEFAULT_MAX_UPLOAD
        return size_bounds(hidden.file_names, len(hidden.classes))[1]

    # ---- S3
    def ensure_bucket(self) -> None:
        try:
            self.s3.head_bucket(Bucket=self.settings.bucket)
        except ClientError:
            self.s3.create_bucket(Bucket=self.settings.bucket)

    def presigned_post(self, key: str) -> dict:
        return self.s3.generate_presigned_post(
            Bucket=self.settings.bucket, Key=key,
            Conditions=[["content-length-range", 1, self.max_upload_bytes()]],
            ExpiresIn=self.settings.url_expiry_s,
        )

    # ---- auth and limits
    def user_for(self, authorization: str | None) -> int:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing `Authorization: Bearer <key>` header",
                                headers={"WWW-Authenticate": "Bearer"})
        user = self.users.get(key_hash(token.strip()))
        if user is None:
            raise HTTPException(401, "unknown key", headers={"WWW-Authenticate": "Bearer"})
        return user

    def check_competition(self, cid: int) -> None:
        if cid != self.settings.competition_id:
            raise HTTPException(404, f"competition {cid} not found; this server hosts {self.settings.competition_id}")

    @staticmethod
    def day_window(now: datetime) -> tuple[float, datetime]:
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.timestamp(), start + timedelta(days=1)

    def limits(self, db, cid: int, user: int) -> dict:
        now = utc_now()
        start, reset = self.day_window(now)
        # an expired reservation never got a file: it gives its slot back
        used = db.execute(
            "SELECT COUNT(*) FROM submissions WHERE competition_id = ? AND user_id = ? AND created_ts >= ? "
            "AND status != 'expired'", (cid, user, start)).fetchone()[0]
        limit = self.user_limits.get(user, self.settings.daily_limit)
        return {"daily_limit": limit, "used_today": used, "remaining": max(limit - used, 0),
                "resets_at": reset.isoformat(timespec="seconds")}

    def revealed(self, db, cid: int) -> bool:
        return db.execute("SELECT 1 FROM reveals WHERE competition_id = ?", (cid,)).fetchone() is not None

    def as_json(self, row: sqlite3.Row, revealed: bool) -> dict:
        return {
            "id": row["id"], "local_id": row["local_id"], "user": row["user_id"],
            "description": row["description"], "hyperparameters": json.loads(row["hyperparameters"]),
            "status": row["status"], "public_score": row["public_score"],
            "private_score": row["private_score"] if revealed else None,
            "public_per_class": json.loads(row["public_per_class"]) if row["public_per_class"] else None,
            "submitted_at": iso(row["created_ts"]), "scored_at": iso(row["scored_ts"]), "error": row["error"],
            "content_sha256": row["content_sha256"],
            "released": bool(row["released"]),  # no longer holds its file: the same file may be submitted again
        }

    def highest_local_id_in_bucket(self, cid: int, user: int) -> int:
        """The highest local id that already has an object in the bucket (0: none), from one listing.

        The published key is fixed by (competition, user, local id); a state dir that starts afresh over a bucket
        still holding an earlier server's objects would otherwise hand out keys whose stale files the scorer takes
        for new uploads. A new row's local id is one past both this and the state's highest.
        """
        prefix = OBJECT_KEY.split("{local_id")[0].format(cid=cid, user=user)
        highest = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.settings.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                part = obj["Key"][len(prefix):].split("/", 1)[0]
                if part.isascii() and part.isdigit() and len(part) < 18:   # 18+ digits: not ours, and past MAX_ID
                    highest = max(highest, int(part))
        return highest

    # ---- handlers
    def request_upload(self, cid: int, user: int, description: str, hyperparameters: str,
                       content_sha256: str | None, nonce: str) -> dict:
        """Reserve a slot (a row and its presigned POST); the same file and nonce again get the slot it holds."""
        hp = parse_hyperparameters(hyperparameters)
        if content_sha256 is not None:             # its form is checked by the route's Query pattern
            content_sha256 = content_sha256.lower()
        # listed before the write lock is taken: a store that is slow or down holds up no other writer
        in_bucket = self.highest_local_id_in_bucket(cid, user)
        now = time.time()
        with self.state.connect(immediate=True) as db:     # one writer: the limit check and the insert agree
            revealed = self.revealed(db, cid)
            if content_sha256 is not None:
                # a released row (expired, or other bytes uploaded) no longer holds the file: it asks anew below
                row = db.execute(
                    "SELECT * FROM submissions WHERE competition_id = ? AND user_id = ? AND content_sha256 = ? "
                    "AND nonce = ? AND released = 0", (cid, user, content_sha256, nonce)).fetchone()
                if row is not None:                  # a retry: same slot, never a new one
                    body = {"submission": self.as_json(row, revealed), "existing": True, "url": None, "fields": {}}
                    if row["status"] == "pending":   # fresh signature for the same key, so a late retry still uploads
                        db.execute("UPDATE submissions SET expires_ts = ? WHERE id = ?",
                                   (now + self.settings.url_expiry_s, row["id"]))
                        body.update(self.presigned_post(row["object_key"]))
                    return body
            lim = self.limits(db, cid, user)
            if lim["remaining"] <= 0:
                raise HTTPException(
                    429, {"error": "daily submission limit reached", **lim,
                          "message": f"{lim['used_today']} of {lim['daily_limit']} submissions used today; "
                                     f"the limit resets at {lim['resets_at']} (UTC midnight)"},
                    headers={"Retry-After": str(int(datetime.fromisoformat(lim["resets_at"]).timestamp() - now) + 1)})
            local_id = 1 + max(in_bucket, db.execute(
                "SELECT COALESCE(MAX(local_id), 0) FROM submissions WHERE competition_id = ? AND user_id = ?",
                (cid, user)).fetchone()[0])
            key = OBJECT_KEY.format(cid=cid, user=user, local_id=local_id)
            cur = db.execute(
                "INSERT INTO submissions (competition_id, user_id, local_id, description, hyperparameters, "
                "content_sha256, nonce, object_key, created_ts, expires_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, user, local_id, description, hp, content_sha256, nonce, key, now,
                 now + self.settings.url_expiry_s))
            row = db.execute("SELECT * FROM submissions WHERE id = ?", (cur.lastrowid,)).fetchone()
            post = self.presigned_post(key)
        log.info("submission %s: user %s local_id %s pending upload", row["id"], user, local_id)
        return {**post, "submission": self.as_json(row, revealed), "existing": False}

    def list_submissions(self, cid: int, user: int) -> list[dict]:
        with self.state.connect() as db:
            revealed = self.revealed(db, cid)
            rows = db.execute("SELECT * FROM submissions WHERE competition_id = ? AND user_id = ? ORDER BY id",
                              (cid, user)).fetchall()
            return [self.as_json(r, revealed) for r in rows]

    def get_submission(self, cid: int, user: int, sid: int) -> dict:
        with self.state.connect() as db:
            row = db.execute("SELECT * FROM submissions WHERE competition_id = ? AND user_id = ? AND id = ?",
                             (cid, user, sid)).fetchone()
            if row is None:
                raise HTTPException(404, f"submission {sid} not found for this key in competition {cid}")
            return self.as_json(row, self.revealed(db, cid))

    def reveal(self, cid: int, authorization: str | None) -> dict:
        admin = self.settings.admin_key
        _, _, token = (authorization or "").partition(" ")
        if not admin:
            raise HTTPException(403, "no admin key configured (set SEGPIPE_LEADERBOARD_ADMIN_KEY)")
        if not hmac.compare_digest(key_hash(token.strip()), key_hash(admin)):
            raise HTTPException(401, "admin key required", headers={"WWW-Authenticate": "Bearer"})
        with self.state.connect(immediate=True) as db:
            db.execute("INSERT OR IGNORE INTO reveals (competition_id, revealed_ts) VALUES (?, ?)", (cid, time.time()))
        return {"competition_id": cid, "revealed": True}

    # ---- scoring
    @property
    def expiry_grace_s(self) -> float:
        """How long past its URL's expiry a row waits for its object: as long again as the URL lived, at most a
        minute (a short-lived test URL need not wait the minute a large upload begun at the last second may take)."""
        return min(EXPIRY_GRACE_S, self.settings.url_expiry_s)

    def score_pending(self) -> int:
        """Score every pending row whose object has arrived; expire those never uploaded in time. Returns how many
        rows left `pending` (scored, failed or expired).

        A row that cannot be scored fails alone (or, when the store or the hidden labels are the trouble, stays
        pending for the next round): it never stops the rows after it.
        """
        with self.state.connect() as db:
            pending = db.execute("SELECT id, object_key, expires_ts, content_sha256 FROM submissions "
                                 "WHERE status = 'pending' ORDER BY id").fetchall()
        if not pending:
            return 0
        hidden: HiddenLabels | None = None
        unavailable = ""
        try:
            hidden = self.labels()
        except LabelsUnavailable as e:
            unavailable = str(e)
        except Exception as e:                   # e.g. index.json half-written by the generator: not the rows' fault
            unavailable = f"hidden labels unreadable: {type(e).__name__}: {e}"
        done = 0
        for row in pending:
            sid = row["id"]
            try:
                done += self._score_row(row, hidden, unavailable)
            except STORE_ERRORS as e:            # the next round retries; the row says why it waits
                self._wait(sid, f"the submission store failed: {type(e).__name__}: {e}")
            except Exception as e:
                log.exception("submission %s could not be scored", sid)
                self._finish(sid, "failed", error=f"the scorer failed on this file ({type(e).__name__}: {e}); "
                                                  "it was not scored")
                done += 1
        return done

    def _score_row(self, row: sqlite3.Row, hidden: HiddenLabels | None, unavailable: str) -> int:
        sid, key = row["id"], row["object_key"]
        try:
            self.s3.head_object(Bucket=self.settings.bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
            if time.time() > row["expires_ts"] + self.expiry_grace_s:
                return self._expire(sid, row["expires_ts"])
            return 0
        if hidden is None:                       # stays pending: it is scored once the dataset exists
            self._wait(sid, unavailable)
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "output.csv"
            self.s3.download_file(self.settings.bucket, key, str(path))
            declared = row["content_sha256"]
            if declared is not None and (got := sha256_file(path)) != declared:
                # another file than the one this slot was asked for: never scored; the declared file may ask again
                self._finish(sid, "failed", released=True, error=(
                    f"the uploaded file's sha256 {got} is not the content_sha256 {declared} given when the upload "
                    "was requested; it was not scored. Request the upload again to send that file"))
                return 1
            try:
                names, masks = read_submission(path, expected_file_names=hidden.file_names,
                                               num_classes=len(hidden.classes))
            except SubmissionError as e:
                self._finish(sid, "failed", error=f"lint: {e}".replace(str(path), "output.csv"))
                return 1
        s = score(names, masks, hidden)
        self._finish(sid, "scored", public=s["public_score"], private=s["private_score"],
                     per_class=json.dumps(s["public_per_class"]))
        log.info("submission %s scored: public mIoU %s", sid, s["public_score"])
        return 1

    def _expire(self, sid: int, expires_ts: float) -> int:
        """Release a slot whose upload never came; a retry that refreshed its URL meanwhile keeps it pending."""
        with self.state.connect(immediate=True) as db:
            n = db.execute(
                "UPDATE submissions SET status = 'expired', released = 1, error = ?, scored_ts = ? "
                "WHERE id = ? AND status = 'pending' AND expires_ts <= ?",
                (f"{NO_UPLOAD} ({iso(expires_ts)}); the slot was released: it does not count toward the daily "
                 "limit, and the same file may be submitted again", time.time(), sid,
                 time.time() - self.expiry_grace_s)).rowcount
        self._waiting.pop(sid, None)
        if n:
            log.info("submission %s expired: no upload before %s", sid, iso(expires_ts))
        return n

    def _wait(self, sid: int, why: str) -> None:
        """Leave a row pending, with the reason in its `error` for the listing; log each new reason once."""
        if self._waiting.get(sid) == why:
            return
        self._waiting[sid] = why
        log.warning("submission %s waits: %s", sid, why)
        with self.state.connect(immediate=True) as db:
            db.execute("UPDATE submissions SET error = ? WHERE id = ? AND status = 'pending'", (f"waiting: {why}", sid))

    def _finish(self, sid: int, status: str, *, public=None, private=None, per_class=None, error=None,
                released: bool = False) -> None:
        self._waiting.pop(sid, None)
        with self.state.connect(immediate=True) as db:
            db.execute(
                "UPDATE submissions SET status = ?, public_score = ?, private_score = ?, public_per_class = ?, "
                "error = ?, scored_ts = ?, released = ? WHERE id = ? AND status = 'pending'",
                (status, public, private, per_class, error, time.time(), int(released), sid))

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.score_pending()
            except Exception:                    # keep serving; the next round retries
                log.exception("scoring round failed")

    def start(self) -> None:
        self.ensure_bucket()
        self._thread = threading.Thread(target=self._loop, name="leaderboard-scorer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    # ---- HTML
    def page(self, cid: int) -> str:
        with self.state.connect() as db:
            revealed = self.revealed(db, cid)
            rows = [self.as_json(r, revealed) for r in db.execute(
                "SELECT * FROM submissions WHERE competition_id = ? ORDER BY id DESC", (cid,)).fetchall()]
        rank_by = "private_score" if revealed else "public_score"
        best: dict[int, dict] = {}
        for r in rows:
            if r["status"] == "scored" and r[rank_by] is not None:
                if r["user"] not in best or r[rank_by] > best[r["user"]][rank_by]:
                    best[r["user"]] = r
        ranked = sorted(best.values(), key=lambda r: -r[rank_by])

        def fmt(v):
            return "" if v is None else f"{v:.4f}"

        def tr(cells):
            return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"

        priv_head = "<th>private mIoU</th>" if revealed else ""
        head = "<tr><th>#</th><th>user</th><th>submission</th><th>description</th><th>public mIoU</th>" \
               f"{priv_head}<th>submitted (UTC)</th></tr>"
        rank_rows = "".join(tr([i + 1, f"user {r['user']:08d}", r["local_id"], r["description"], fmt(r["public_score"]),
                                *([fmt(r["private_score"])] if revealed else []), r["submitted_at"]])
                            for i, r in enumerate(ranked))
        all_head = "<tr><th>user</th><th>submission</th><th>description</th><th>status</th><th>public mIoU</th>" \
                   f"{priv_head}<th>submitted (UTC)</th></tr>"
        all_rows = "".join(tr([f"user {r['user']:08d}", r["local_id"], r["description"], r["status"],
                               fmt(r["public_score"]), *([fmt(r["private_score"])] if revealed else []),
                               r["submitted_at"]]) for r in rows)
        state = "private scores revealed" if revealed else "public half only; private scores hidden until reveal"
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>Leaderboard {cid:06d}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:2em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>
<h1>Competition {cid:06d} leaderboard</h1><p>mIoU, {state}. Best submission per user.</p>
<table>{head}{rank_rows}</table><h2>All submissions</h2><table>{all_head}{all_rows}</table></body></html>"""


# Query and path values, bounded where FastAPI checks them: a value out of bounds is a 422 naming the parameter
# and the bound, before any handler runs (an id past 64 bits would otherwise overflow SQLite: a 500).
Id = Annotated[int, PathParam(ge=1, le=MAX_ID, description="a positive id within SQLite's signed 64 bits")]
Description = Annotated[str, Query(max_length=MAX_DESCRIPTION)]
Hyperparameters = Annotated[str, Query(max_length=MAX_HYPERPARAMETERS, description="a JSON object")]
Sha256 = Annotated[str | None, Query(pattern=r"^[0-9a-fA-F]{64}$", description="the file's sha256: 64 hex digits")]
Nonce = Annotated[str, Query(max_length=64)]


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without its `input` echo: the rejected value may be megabytes of query string."""
    return JSONResponse({"detail": [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]},
                        status_code=422)


async def store_failed(request: Request, exc: Exception) -> JSONResponse:
    """503, not 500: the S3 store is down or refusing, and the client's retries of a 5xx may well succeed."""
    log.warning("%s %s: the submission store failed: %s: %s", request.method, request.url.path,
                type(exc).__name__, exc)
    return JSONResponse({"detail": f"the submission store failed ({type(exc).__name__}); try again shortly"},
                        status_code=503, headers={"Retry-After": "5"})


def create_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the background scorer."""
    board = Leaderboard(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        board.start()
        yield
        board.stop()

    app = FastAPI(title="segpipe leaderboard", lifespan=lifespan)
    app.state.board = board
    app.add_exception_handler(RequestValidationError, invalid_request)
    for exc in STORE_ERRORS:
        app.add_exception_handler(exc, store_failed)

    def user(authorization: str | None = Header(default=None)) -> int:
        return board.user_for(authorization)

    if settings.published_only:
        @app.get("/api/v1/competition/{cid}/presigned_url/")
        def presigned_url_published(cid: Id, description: Description = "", hyperparameters: Hyperparameters = "{}",
                                    uid: int = Depends(user)) -> dict:
            board.check_competition(cid)
            body = board.request_upload(cid, uid, description, hyperparameters, None, "")
            fields = {k: v for k, v in body["fields"].items() if k != "key"}   # the client builds the key
            sub = body["submission"]
            return {"url": body["url"], "fields": fields,
                    "submission": {"user": sub["user"], "local_id": sub["local_id"]}}

        _pages(app, board, settings)
        return app

    @app.get("/api/v1/competition/{cid}/presigned_url/")
    def presigned_url(cid: Id, description: Description = "", hyperparameters: Hyperparameters = "{}",
                      content_sha256: Sha256 = None, nonce: Nonce = "", uid: int = Depends(user)) -> dict:
        board.check_competition(cid)
        return board.request_upload(cid, uid, description, hyperparameters, content_sha256, nonce)

    @app.get("/api/v1/competition/{cid}/submissions/")
    def submissions(cid: Id, uid: int = Depends(user)) -> list[dict]:
        board.check_competition(cid)
        return board.list_submissions(cid, uid)

    @app.get("/api/v1/competition/{cid}/submissions/{sid}/")
    def submission(cid: Id, sid: Id, uid: int = Depends(user)) -> dict:
        board.check_competition(cid)
        return board.get_submission(cid, uid, sid)

    @app.get("/api/v1/competition/{cid}/limits/")
    def limits(cid: Id, uid: int = Depends(user)) -> dict:
        board.check_competition(cid)
        with board.state.connect() as db:
            return board.limits(db, cid, uid)

    @app.post("/api/v1/competition/{cid}/reveal")
    def reveal(cid: Id, authorization: str | None = Header(default=None)) -> dict:
        board.check_competition(cid)
        return board.reveal(cid, authorization)

    _pages(app, board, settings)
    return app


def _pages(app: FastAPI, board: Leaderboard, settings: ServerSettings) -> None:
    """The health check and the HTML leaderboard: served in both modes (the page is where scores are read)."""

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return board.page(settings.competition_id)

    @app.get("/competition/{cid}/leaderboard", response_class=HTMLResponse)
    def leaderboard_page(cid: Id) -> str:
        board.check_competition(cid)
        return board.page(cid)


def serve(settings: ServerSettings, host: str, port: int, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("leaderboard on http://%s:%s %r", host, port, settings)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level,
                h11_max_incomplete_event_size=MAX_REQUEST_HEAD)


__all__ = ["ServerSettings", "HiddenLabels", "LabelsUnavailable", "Leaderboard", "create_app", "score", "serve",
           "OBJECT_KEY"]
