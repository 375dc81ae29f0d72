"""Leaderboard server hardening, over real HTTP and a real SeaweedFS: the bytes scored are the bytes declared, a
reservation never uploaded is released, hostile query values get a 4xx, and one bad row never stalls the scorer."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from botocore.exceptions import ClientError

from segpipe.leaderboard import OBJECT_KEY
from segpipe.submission import sha256_file, write_submission
from test_leaderboard import CID, KEYS, Server, client, write_labels

pytestmark = pytest.mark.services

# buckets of their own: these tests plant objects, and test_leaderboard counts each user's local ids from 1
BUCKET = "leaderboard-hardening"
EXPIRY_BUCKET = "leaderboard-hardening-expiry"
EXPIRY_S = 3        # the short-expiry server's URL lifetime; the grace after it is as long again (at most a minute)


def user_id(who: str) -> int:
    """A fresh state dir registers the keys in KEYS order: alice is user 1."""
    return list(KEYS).index(who) + 1


def _start(s3, root: Path, bucket: str, *extra: str) -> dict:
    names, labels = write_labels(root / "labels")
    server = Server(s3, root / "labels", root / "state", root / "server.log", "--bucket", bucket, *extra)
    return {"server": server, "names": names, "labels": labels, "root": root, "s3": s3.client()}


def _stop(lb: dict) -> None:
    lb["server"].stop()
    log = (lb["root"] / "server.log").read_text()
    assert not [k for k in KEYS.values() if k in log], "a key leaked into the server log"


@pytest.fixture(scope="module")
def lb(s3, tmp_path_factory):
    lb = _start(s3, tmp_path_factory.mktemp("lb-hardening"), BUCKET)
    yield lb
    _stop(lb)


@pytest.fixture(scope="module")
def short(s3, tmp_path_factory):
    """A server whose presigned URLs live EXPIRY_S seconds, so a reservation expires within the test."""
    lb = _start(s3, tmp_path_factory.mktemp("lb-expiry"), EXPIRY_BUCKET, "--url-expiry-s", str(EXPIRY_S))
    yield lb
    _stop(lb)


def api(lb: dict, path: str, who: str = "alice", **params) -> requests.Response:
    return requests.get(f"{lb['server'].url}/api/v1/competition/{CID}/{path}", params=params, timeout=30,
                        headers={"Authorization": f"Bearer {KEYS[who]}"})


def upload(body: dict, path: Path) -> None:
    """The presigned POST, as the published protocol's client sends it."""
    with open(path, "rb") as f:
        r = requests.post(body["url"], data=body["fields"], files={"file": ("output.csv", f)}, timeout=30)
    assert r.status_code in (200, 201, 204), r.text


def half_wrong(labels: np.ndarray) -> np.ndarray:
    masks = labels.copy()
    masks[:, :128] = 0                       # half of every image predicted as background: a score well below 1
    return masks


# ------------------------------------------------------------------------------ 1. the bytes scored are the declared
def test_an_upload_other_than_the_declared_file_is_never_scored(lb, tmp_path):
    names, labels = lb["names"], lb["labels"]
    declared = write_submission(tmp_path / "declared.csv", names, labels)
    other = write_submission(tmp_path / "other.csv", names, half_wrong(labels))     # valid, just not declared
    r = api(lb, "presigned_url/", "bob", description="declared", content_sha256=sha256_file(declared))
    r.raise_for_status()
    upload(r.json(), other)
    c = client(lb, "bob")
    got = c.wait_for_score(r.json()["submission"]["id"], timeout_s=20, poll_s=0.2)
    assert (got.status, got.public_score) == ("failed", None)
    assert f"sha256 {sha256_file(other)} is not the content_sha256 {sha256_file(declared)}" in got.error
    (listed,) = [s for s in c.submissions() if s.id == got.id]           # what the client reads
    assert listed.status == "failed" and listed.released and "it was not scored" in listed.error

    # the slot other bytes spoiled does not block the declared file: the client sends it again, to a new row
    again = c.submit(declared, "declared again", {})
    assert again.id != got.id and not again.existing
    assert c.wait_for_score(again.id, timeout_s=20, poll_s=0.2).public_score == pytest.approx(1.0)


def test_an_object_already_at_a_key_is_never_scored_as_a_new_submission(lb, tmp_path):
    """A state dir started afresh over a bucket that still holds an earlier server's upload: the new reservation
    gets a key with no object, and the old file is not scored for it (no content_sha256, as the published call)."""
    from segpipe.leaderboard_server import HiddenLabels, score

    names, labels, user = lb["names"], lb["labels"], user_id("carol")
    stale = write_submission(tmp_path / "stale.csv", names, labels)                # would score 1.0
    lb["s3"].put_object(Bucket=BUCKET, Key=OBJECT_KEY.format(cid=CID, user=user, local_id=1), Body=stale.read_bytes())
    r = api(lb, "presigned_url/", "carol", description="after a state reset")
    r.raise_for_status()
    body = r.json()
    assert body["submission"]["user"] == user
    assert (body["submission"]["local_id"], body["fields"]["key"]) == (2, OBJECT_KEY.format(cid=CID, user=user,
                                                                                            local_id=2))
    c = client(lb, "carol")
    time.sleep(1.0)                                          # five scorer rounds (--poll-s 0.2) with nothing to score
    assert c.submission(body["submission"]["id"]).status == "pending"
    # however the rounds fell, a row once scored stays scored: had the stale file been taken, the score below is 1.0

    mine = half_wrong(labels)
    upload(body, write_submission(tmp_path / "mine.csv", names, mine))
    got = c.wait_for_score(body["submission"]["id"], timeout_s=20, poll_s=0.2)
    expected = score(names, mine, HiddenLabels.load(lb["root"] / "labels"))["public_score"]
    assert got.status == "scored" and got.public_score == pytest.approx(expected) and expected < 0.9


# ------------------------------------------------------------------------------ 2. an unused reservation is released
def test_a_reservation_never_uploaded_expires_and_frees_its_slot_and_its_file(short, tmp_path):
    """A nightly run died after asking for the URL: the slot comes back, and the next night's byte-identical file
    (same content_sha256, same nonce) is sent to a new row and scored, not answered with the dead one."""
    csv = write_submission(tmp_path / "nightly.csv", short["names"], short["labels"])
    r = api(short, "presigned_url/", "erin", description="died before the upload", content_sha256=sha256_file(csv))
    r.raise_for_status()
    first = r.json()["submission"]
    c = client(short, "erin")
    assert c.limits().used_today == 1

    deadline = time.monotonic() + 4 * EXPIRY_S + 20
    while (dead := c.submission(first["id"])).status == "pending":
        assert time.monotonic() < deadline, dead
        time.sleep(0.2)
    assert dead.status == "expired" and dead.released
    assert "no file was uploaded before the presigned URL expired" in dead.error and "released" in dead.error
    assert c.limits().used_today == 0                        # an expired reservation gives its daily slot back

    again = c.submit(csv, "the same file, next night", {})
    assert again.id != first["id"] and again.local_id != first["local_id"] and not again.existing
    assert c.wait_for_score(again.id, timeout_s=20, poll_s=0.2).public_score == pytest.approx(1.0)
    assert c.limits().used_today == 1
    assert [(s.id, s.status, s.released) for s in c.submissions()] == \
        [(first["id"], "expired", True), (again.id, "scored", False)]


# ------------------------------------------------------------------------------------------ 3. hostile query values
DEEP_OBJECT = '{"a":' * 40 + "1" + "}" * 40                  # parses, but past the nesting bound
HOSTILE = {
    # name: (path, params, status, a fragment of the answer)
    "hyperparameters 10,000 levels deep": ("presigned_url/", {"hyperparameters": "[" * 10_000 + "]" * 10_000}, 400,
                                           "nest deeper than 32 levels"),
    "hyperparameters past the parser's recursion": ("presigned_url/", {"hyperparameters": "[" * 1500 + "]" * 1500},
                                                    400, "nest deeper than 32 levels"),
    "hyperparameters 40 levels deep": ("presigned_url/", {"hyperparameters": DEEP_OBJECT}, 400, "nest deeper"),
    "hyperparameters not JSON": ("presigned_url/", {"hyperparameters": "lr=0.1"}, 400, "must be a JSON object"),
    "hyperparameters a list": ("presigned_url/", {"hyperparameters": "[1, 2]"}, 400, "must be a JSON object"),
    "hyperparameters NaN": ("presigned_url/", {"hyperparameters": '{"lr": NaN}'}, 400, "no NaN, Infinity"),
    "hyperparameters 1e999": ("presigned_url/", {"hyperparameters": '{"lr": 1e999}'}, 400, "no NaN, Infinity"),
    "hyperparameters lone surrogate": ("presigned_url/", {"hyperparameters": '{"a": "\\ud800"}'}, 400,
                                       "lone surrogate"),
    "hyperparameters 5,000-digit integer": ("presigned_url/", {"hyperparameters": '{"n": ' + "9" * 5000 + "}"},
                                            400, "must be a JSON object"),
    "hyperparameters 65,537 characters": ("presigned_url/", {"hyperparameters": " " * 65_537}, 422,
                                          "at most 65536 characters"),
    "description 2,001 characters": ("presigned_url/", {"description": "d" * 2001}, 422, "at most 2000 characters"),
    "description of megabytes": ("presigned_url/", {"description": "d" * (4 << 20)}, 422, "at most 2000 characters"),
    "content_sha256 not hex": ("presigned_url/", {"content_sha256": "z" * 64}, 422, "content_sha256"),
    "nonce too long": ("presigned_url/", {"nonce": "n" * 65}, 422, "at most 64 characters"),
    "submission id past 64 bits": (f"submissions/{2**64}/", {}, 422, "less than or equal to 9223372036854775807"),
    "submission id negative": ("submissions/-1/", {}, 422, "greater than or equal to 1"),
    "submission id 5,000 digits": (f"submissions/{'9' * 5000}/", {}, 422, "sid"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_query_values_get_a_4xx_and_spend_nothing(lb, case):
    path, params, status, fragment = HOSTILE[case]
    used = api(lb, "limits/").json()["used_today"]
    r = api(lb, path, **params)
    assert r.status_code == status, r.text[:300]
    if fragment:
        assert fragment in r.text, r.text[:300]
    assert len(r.content) < 2000                             # the rejected value is not echoed back
    assert api(lb, "limits/").json()["used_today"] == used  # no slot taken
    assert api(lb, "submissions/").status_code == 200       # and nothing stored that breaks the listing


@pytest.mark.parametrize("url", [f"/api/v1/competition/{2**64}/limits/", "/api/v1/competition/-7/submissions/",
                                 f"/competition/{2**70}/leaderboard"])
def test_competition_ids_out_of_range_get_a_422(lb, url):
    r = requests.get(lb["server"].url + url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=30)
    assert r.status_code == 422 and "cid" in r.text, r.text[:300]


# ------------------------------------------------------------------------------------ one bad row stalls nothing
def test_bad_files_fail_with_a_reason_and_the_good_one_after_them_is_scored(lb, tmp_path):
    names, labels = lb["names"], lb["labels"]
    corrupt = tmp_path / "corrupt.csv"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    short_file = write_submission(tmp_path / "short.csv", names[:-1], labels[:-1])     # one row missing
    good = write_submission(tmp_path / "good.csv", names, labels)
    c = client(lb, "dave")
    subs = [c.submit(p, p.stem, {}) for p in (corrupt, short_file, good)]         # uploaded back to back
    assert c.wait_for_score(subs[2].id, timeout_s=30, poll_s=0.2).public_score == pytest.approx(1.0)
    bad = [c.submission(s.id) for s in subs[:2]]
    assert [s.status for s in bad] == ["failed", "failed"]
    assert "header must be exactly" in bad[0].error and "1 test image(s) have no row" in bad[1].error


def test_a_scorer_exception_fails_its_row_and_the_rows_after_it_are_scored(s3, tmp_path, monkeypatch):
    """In process, to inject the faults: a scorer bug on one file fails that row alone; a store error on another
    leaves it pending (the next round retries it), and neither stops the good row after them."""
    from segpipe import leaderboard_server as srv

    names, labels = write_labels(tmp_path / "labels")
    board = srv.Leaderboard(srv.ServerSettings(labels_dir=tmp_path / "labels", state_dir=tmp_path / "state", s3=s3,
                                               user_keys=("k",), competition_id=CID, bucket="leaderboard-scorer"))
    board.ensure_bucket()
    files = {"store": write_submission(tmp_path / "store.csv", names, half_wrong(labels)),
             "bug": write_submission(tmp_path / "bug.csv", names, np.zeros_like(labels)),
             "good": write_submission(tmp_path / "good.csv", names, labels)}
    rows = {}
    for name, path in files.items():
        body = board.request_upload(CID, 1, name, "{}", sha256_file(path), "")
        upload(body, path)
        rows[name] = body["submission"]

    real_score, real_head = srv.score, board.s3.head_object

    def scorer_bug(names, masks, hidden):
        if not masks.any():
            raise FloatingPointError("injected scorer bug")
        return real_score(names, masks, hidden)

    def store_error(**kw):      # the real store answers every other key
        if kw["Key"].endswith(f"/{rows['store']['local_id']:04d}/output.csv"):
            raise ClientError({"Error": {"Code": "503", "Message": "injected SlowDown"}}, "HeadObject")
        return real_head(**kw)

    monkeypatch.setattr(srv, "score", scorer_bug)
    monkeypatch.setattr(board.s3, "head_object", store_error)
    assert board.score_pending() == 2
    got = {name: board.get_submission(CID, 1, r["id"]) for name, r in rows.items()}
    assert got["good"]["status"] == "scored" and got["good"]["public_score"] == pytest.approx(1.0)
    assert got["bug"]["status"] == "failed" and "FloatingPointError: injected scorer bug" in got["bug"]["error"]
    assert got["store"]["status"] == "pending" and "waiting: the submission store failed" in got["store"]["error"]

    monkeypatch.setattr(board.s3, "head_object", real_head)         # the store is back: the next round scores it
    assert board.score_pending() == 1
    assert board.get_submission(CID, 1, rows["store"]["id"])["status"] == "scored"


# ----------------------------------------------------------------------------------------------- an old state dir
OLD_SCHEMA = """
CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, key_sha256 TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL);
CREATE TABLE submissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    competition_id INTEGER NOT NULL, user_id INTEGER NOT NULL, local_id INTEGER NOT NULL,
    description TEXT NOT NULL, hyperparameters TEXT NOT NULL,
    content_sha256 TEXT, nonce TEXT NOT NULL DEFAULT '',
    object_key TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
    public_score REAL, private_score REAL, public_per_class TEXT, error TEXT,
    created_ts REAL NOT NULL, expires_ts REAL NOT NULL, scored_ts REAL,
    UNIQUE (competition_id, user_id, local_id));
CREATE UNIQUE INDEX submissions_idempotent
    ON submissions (competition_id, user_id, content_sha256, nonce) WHERE content_sha256 IS NOT NULL;
CREATE TABLE reveals (competition_id INTEGER PRIMARY KEY, revealed_ts REAL NOT NULL);
"""


def test_an_old_state_dir_frees_the_files_whose_upload_never_came(tmp_path):
    """The server before `expired` failed such rows and held their file for good: opening its state migrates them."""
    from segpipe.leaderboard_server import State

    path = tmp_path / "leaderboard.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(OLD_SCHEMA)
    insert = ("INSERT INTO submissions (competition_id, user_id, local_id, description, hyperparameters, "
              "content_sha256, object_key, status, error, created_ts, expires_ts) "
              "VALUES (?, 1, ?, '', '{}', ?, ?, ?, ?, 0, 0)")
    db.execute(insert, (CID, 1, "a" * 64, "k1", "failed", "no file was uploaded before the presigned URL expired"))
    db.execute(insert, (CID, 2, "b" * 64, "k2", "failed", "lint: empty"))
    db.close()

    state = State(path)
    with state.connect() as db:
        got = [tuple(r) for r in db.execute("SELECT status, released FROM submissions ORDER BY id")]
    assert got == [("expired", 1), ("failed", 0)]
    with state.connect(immediate=True) as db:    # the freed file may take a new row ...
        db.execute(insert, (CID, 3, "a" * 64, "k3", "pending", None))
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"), state.connect(immediate=True) as db:
        db.execute(insert, (CID, 4, "b" * 64, "k4", "pending", None))      # ... the linted one still holds its own
