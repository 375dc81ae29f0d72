"""Local leaderboard server: the AI Stages presigned-POST protocol over the local S3 store, scored on hidden labels.

Start it with `python -m segpipe.leaderboard serve ...` (see `segpipe.leaderboard.main`). The client lives in
`segpipe.leaderboard` and never imports this module, so it needs no FastAPI.

`--published-only` (ServerSettings.published_only) makes it speak only the published protocol, as a public
leaderboard may: presigned_url answers `url`, the five policy fields (no `key`) and `submission` {user,
local_id}; the limits, listing, score and reveal endpoints answer 404. It still stores, scores and shows each
upload on its page, and still refuses a slot past the daily limit (429).
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

import numpy as np
from botocore.exceptions import ClientError
from fastapi import Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import HTMLResponse

from segpipe.leaderboard import OBJECT_KEY
from segpipe.metrics import confusion_matrix, iou_per_class
from segpipe.storage import S3Config
from segpipe.submission import SubmissionError, read_submission, size_bounds

log = logging.getLogger("segpipe.leaderboard")

DEFAULT_MAX_UPLOAD = 256 << 20    # used only while the hidden labels do not exist yet (no N to derive a bound)


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
    UNIQUE (competition_id, user_id, local_id));
CREATE UNIQUE INDEX IF NOT EXISTS submissions_idempotent
    ON submissions (competition_id, user_id, content_sha256, nonce) WHERE content_sha256 IS NOT NULL;
CREATE TABLE IF NOT EXISTS reveals (competition_id INTEGER PRIMARY KEY, revealed_ts REAL NOT NULL);
"""


class State:
    """SQLite under --state-dir: users (by key hash), submissions, reveals. Survives restarts."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:   # WAL: the scorer thread writes while request threads read
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        finally:
            db.close()

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
        used = db.execute(
            "SELECT COUNT(*) FROM submissions WHERE competition_id = ? AND user_id = ? AND created_ts >= ?",
            (cid, user, start)).fetchone()[0]
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
        }

    # ---- handlers
    def request_upload(self, cid: int, user: int, description: str, hyperparameters: str,
                       content_sha256: str | None, nonce: str) -> dict:
        try:
            hp = json.loads(hyperparameters) if hyperparameters else {}
        except json.JSONDecodeError as e:
            raise HTTPException(400, f"hyperparameters must be a JSON object: {e}") from None
        if not isinstance(hp, dict):
            raise HTTPException(400, "hyperparameters must be a JSON object, e.g. {\"training\":{},\"inference\":{}}")
        if content_sha256 is not None:
            content_sha256 = content_sha256.lower()
            if len(content_sha256) != 64 or any(c not in "0123456789abcdef" for c in content_sha256):
                raise HTTPException(400, "content_sha256 must be 64 hex digits (sha256 of the file)")
        now = time.time()
        with self.state.connect(immediate=True) as db:     # one writer: the limit check and the insert agree
            revealed = self.revealed(db, cid)
            if content_sha256 is not None:
                row = db.execute(
                    "SELECT * FROM submissions WHERE competition_id = ? AND user_id = ? AND content_sha256 = ? "
                    "AND nonce = ?", (cid, user, content_sha256, nonce)).fetchone()
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
            local_id = db.execute(
                "SELECT COALESCE(MAX(local_id), 0) + 1 FROM submissions WHERE competition_id = ? AND user_id = ?",
                (cid, user)).fetchone()[0]
            key = OBJECT_KEY.format(cid=cid, user=user, local_id=local_id)
            cur = db.execute(
                "INSERT INTO submissions (competition_id, user_id, local_id, description, hyperparameters, "
                "content_sha256, nonce, object_key, created_ts, expires_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, user, local_id, description, json.dumps(hp), content_sha256, nonce, key, now,
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
    def score_pending(self) -> int:
        """Score every pending submission whose object has arrived; fail those never uploaded in time."""
        with self.state.connect() as db:
            pending = db.execute("SELECT id, object_key, expires_ts FROM submissions WHERE status = 'pending'"
                                 ).fetchall()
        done = 0
        for row in pending:
            try:
                self.s3.head_object(Bucket=self.settings.bucket, Key=row["object_key"])
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
                if time.time() > row["expires_ts"] + 60:   # grace for an upload started just before expiry
                    self._finish(row["id"], "failed", error="no file was uploaded before the presigned URL expired")
                continue
            self._score_one(row["id"], row["object_key"])
            done += 1
        return done

    def _score_one(self, sid: int, key: str) -> None:
        try:
            hidden = self.labels()
        except LabelsUnavailable as e:           # stays pending: it is scored once the dataset exists
            with self.state.connect(immediate=True) as db:
                db.execute("UPDATE submissions SET error = ? WHERE id = ?", (f"waiting: {e}", sid))
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "output.csv"
            self.s3.download_file(self.settings.bucket, key, str(path))
            try:
                names, masks = read_submission(path, expected_file_names=hidden.file_names,
                                               num_classes=len(hidden.classes))
            except SubmissionError as e:
                self._finish(sid, "failed", error=f"lint: {e}".replace(str(path), "output.csv"))
                return
        s = score(names, masks, hidden)
        self._finish(sid, "scored", public=s["public_score"], private=s["private_score"],
                     per_class=json.dumps(s["public_per_class"]))
        log.info("submission %s scored: public mIoU %s", sid, s["public_score"])

    def _finish(self, sid: int, status: str, *, public=None, private=None, per_class=None, error=None) -> None:
        with self.state.connect(immediate=True) as db:
            db.execute(
                "UPDATE submissions SET status = ?, public_score = ?, private_score = ?, public_per_class = ?, "
                "error = ?, scored_ts = ? WHERE id = ? AND status = 'pending'",
                (status, public, private, per_class, error, time.time(), sid))

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

    def user(authorization: str | None = Header(default=None)) -> int:
        return board.user_for(authorization)

    if settings.published_only:
        @app.get("/api/v1/competition/{cid}/presigned_url/")
        def presigned_url_published(cid: int, description: str = Query("", max_length=2000),
                                    hyperparameters: str = Query("{}", max_length=65536),
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
    def presigned_url(cid: int, description: str = Query("", max_length=2000),
                      hyperparameters: str = Query("{}", max_length=65536),
                      content_sha256: str | None = Query(None), nonce: str = Query("", max_length=64),
                      uid: int = Depends(user)) -> dict:
        board.check_competition(cid)
        return board.request_upload(cid, uid, description, hyperparameters, content_sha256, nonce)

    @app.get("/api/v1/competition/{cid}/submissions/")
    def submissions(cid: int, uid: int = Depends(user)) -> list[dict]:
        board.check_competition(cid)
        return board.list_submissions(cid, uid)

    @app.get("/api/v1/competition/{cid}/submissions/{sid}/")
    def submission(cid: int, sid: int, uid: int = Depends(user)) -> dict:
        board.check_competition(cid)
        return board.get_submission(cid, uid, sid)

    @app.get("/api/v1/competition/{cid}/limits/")
    def limits(cid: int, uid: int = Depends(user)) -> dict:
        board.check_competition(cid)
        with board.state.connect() as db:
            return board.limits(db, cid, uid)

    @app.post("/api/v1/competition/{cid}/reveal")
    def reveal(cid: int, authorization: str | None = Header(default=None)) -> dict:
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
    def leaderboard_page(cid: int) -> str:
        board.check_competition(cid)
        return board.page(cid)


def serve(settings: ServerSettings, host: str, port: int, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("leaderboard on http://%s:%s %r", host, port, settings)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


__all__ = ["ServerSettings", "HiddenLabels", "LabelsUnavailable", "Leaderboard", "create_app", "score", "serve",
           "OBJECT_KEY"]
