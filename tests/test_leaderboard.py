"""Leaderboard server + client over real HTTP and a real SeaweedFS: scoring, limits, auth, idempotency, policies."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import REPO, free_port
from segpipe.config import DataParams, SubmitParams, TRASH_CLASSES
from segpipe.leaderboard import (
    LeaderboardAuthError, LeaderboardClient, LeaderboardError, SubmissionRefused, UploadRejected,
)
from segpipe.submission import sha256_file, write_submission

pytestmark = pytest.mark.services

CID = 7
LIMIT = 5
N = 4
# one user per test that counts slots; appended names keep the earlier users' ids (bob is user 2)
KEYS = {name: "k-" + secrets.token_hex(12)
        for name in ("alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank")}
ADMIN = "admin-" + secrets.token_hex(12)
ABLATION_KEY, ABLATION_LIMIT = "abl-" + secrets.token_hex(12), 50    # its own daily limit (SEGPIPE_LEADERBOARD_KEY_LIMITS)


def write_labels(root: Path, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """A hidden-labels dir as the data generator writes it: labels.npy (N, 256, 256) + index.json."""
    rng = np.random.default_rng(seed)
    names = [f"batch_03_vt/{i:04d}.jpg" for i in range(N)]
    labels = rng.integers(0, len(TRASH_CLASSES), (N, 256, 256), dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "labels.npy", labels)
    (root / "index.json").write_text(json.dumps(
        {"file_names": names, "public": [True, True, False, False], "classes": list(TRASH_CLASSES)}))
    return names, labels


class Server:
    def __init__(self, s3, labels: Path, state: Path, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SEGPIPE_S3_ENDPOINT": s3.endpoint_url, "AWS_ACCESS_KEY_ID": s3.access_key,
               "AWS_SECRET_ACCESS_KEY": s3.secret_key, "SEGPIPE_LEADERBOARD_KEYS": ",".join(KEYS.values()),
               "SEGPIPE_LEADERBOARD_ADMIN_KEY": ADMIN, "SEGPIPE_LEADERBOARD_DAILY_LIMIT": str(LIMIT),
               "SEGPIPE_LEADERBOARD_KEY_LIMITS": f"{ABLATION_KEY}:{ABLATION_LIMIT}"}
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "segpipe.leaderboard", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--labels", str(labels), "--state-dir", str(state), "--competition-id", str(CID), "--poll-s", "0.2",
             *extra],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"leaderboard did not start; see {log}:\n{Path(log).read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def board(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("lb")
    # the server starts before the dataset exists: labels are loaded lazily at scoring time
    server = Server(s3, root / "labels", root / "state", root / "server.log")
    names, labels = write_labels(root / "labels")
    state = {"server": server, "names": names, "labels": labels, "root": root}
    yield state
    state["server"].stop()      # the one running now: a restart test replaces it
    log = (root / "server.log").read_text()
    assert all(k not in log for k in (*KEYS.values(), ADMIN, ABLATION_KEY)), "a key leaked into the server log"


def client(board, who: str) -> LeaderboardClient:
    return LeaderboardClient(board["server"].url, CID, KEYS[who], timeout=10, retries=1, backoff_s=0.1)


def test_client_round_trip(board, tmp_path):
    names, labels, url = board["names"], board["labels"], board["server"].url
    c = client(board, "alice")
    assert KEYS["alice"] not in repr(c)

    perfect = write_submission(tmp_path / "perfect.csv", names, np.repeat(np.repeat(labels, 2, 1), 2, 2))
    s1 = c.submit(perfect, "perfect", {"training": {"lr": 0.1}, "inference": {}})
    assert (s1.local_id, s1.status) == (1, "pending")
    s1 = c.wait_for_score(s1.id, timeout_s=20, poll_s=0.2)
    assert s1.status == "scored" and s1.public_score == pytest.approx(1.0) and s1.private_score is None
    assert s1.hyperparameters == {"training": {"lr": 0.1}, "inference": {}}

    worse_masks = labels.copy()
    worse_masks[:, :128] = 0                                  # half of every image predicted as background
    worse = write_submission(tmp_path / "worse.csv", names, worse_masks)
    s2 = c.wait_for_score(c.submit(worse, "worse", {}).id, timeout_s=20, poll_s=0.2)
    assert s2.local_id == 2 and 0.2 < s2.public_score < 0.9

    # idempotent: the same file again gives the same submission, in the client and in the raw protocol
    again = c.submit(perfect, "perfect again", {})
    assert again.id == s1.id and again.existing
    raw = requests.get(f"{url}/api/v1/competition/{CID}/presigned_url/",
                       params={"description": "retry", "content_sha256": sha256_file(perfect)},
                       headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=10).json()
    assert raw["existing"] and raw["submission"]["id"] == s1.id
    assert c.limits().used_today == 2

    # auth: missing and wrong keys
    assert requests.get(f"{url}/api/v1/competition/{CID}/limits/", timeout=10).status_code == 401
    with pytest.raises(LeaderboardAuthError):
        LeaderboardClient(url, CID, "wrong-key", retries=0).limits()

    # a tampered presigned field: the store checks the policy's signature and conditions
    g = requests.get(f"{url}/api/v1/competition/{CID}/presigned_url/", params={"description": "tamper"},
                     headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=10).json()
    assert g["submission"]["local_id"] == 3
    fields = {**g["fields"], "key": g["fields"]["key"].replace("Users/00000001", "Users/00000002")}
    r = requests.post(g["url"], data=fields, files={"file": ("output.csv", perfect.read_bytes())}, timeout=10)
    assert r.status_code == 403, r.text

    # an oversized file: the presigned policy's content-length-range makes the store refuse it
    big = tmp_path / "big.csv"
    big.write_bytes(b"0 " * 600_000)
    with pytest.raises(UploadRejected, match="EntityTooLarge"):
        c.submit(big, "too big", {})
    lim = c.limits()
    assert (lim.used_today, lim.remaining) == (4, 1)

    # the client never burns the last slot unless told to
    bad = tmp_path / "bad.csv"
    bad.write_text(perfect.read_text().replace(names[2], "not-a-test-image.jpg"))
    with pytest.raises(SubmissionRefused, match="last of 5 daily slots"):
        c.submit(bad, "last", {})
    assert c.limits().remaining == 1
    s5 = c.wait_for_score(c.submit(bad, "last", {}, allow_last_slot=True).id, timeout_s=20, poll_s=0.2)
    assert s5.status == "failed" and "line 4 (image_id 'not-a-test-image.jpg')" in s5.error

    with pytest.raises(SubmissionRefused, match="daily limit used up"):
        c.submit(worse, "over", {}, force=True)
    r = requests.get(f"{url}/api/v1/competition/{CID}/presigned_url/", params={"description": "over"},
                     headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=10)
    assert r.status_code == 429 and r.json()["detail"]["daily_limit"] == LIMIT and r.json()["detail"]["resets_at"]
    assert [s.status for s in c.submissions()] == ["scored", "scored", "pending", "pending", "failed"]

    # the page lists the rows; private scores appear only after the admin reveals
    page = requests.get(f"{url}/", timeout=10).text
    assert "perfect" in page and "1.0000" in page and "private mIoU" not in page
    r = requests.post(f"{url}/api/v1/competition/{CID}/reveal", headers={"Authorization": f"Bearer {KEYS['alice']}"},
                      timeout=10)
    assert r.status_code == 401
    r = requests.post(f"{url}/api/v1/competition/{CID}/reveal", headers={"Authorization": f"Bearer {ADMIN}"},
                      timeout=10)
    assert r.ok
    assert c.submission(s1.id).private_score == pytest.approx(1.0)
    assert "private mIoU" in requests.get(f"{url}/competition/{CID}/leaderboard", timeout=10).text


def test_minimal_protocol_client_and_restart(board, s3, tmp_path):
    """A client written from DESIGN.md's protocol alone (requests only), then a restart keeps the state."""
    names, labels, url = board["names"], board["labels"], board["server"].url
    hdr = {"Authorization": f"Bearer {KEYS['bob']}"}
    csv = write_submission(tmp_path / "bob.csv", names, labels)
    r = requests.get(f"{url}/api/v1/competition/{CID}/presigned_url/", headers=hdr, timeout=10,
                     params={"description": "bob's try", "hyperparameters": '{"training":{},"inference":{}}'})
    r.raise_for_status()
    body = r.json()
    assert {"x-amz-algorithm", "x-amz-credential", "x-amz-date", "policy", "x-amz-signature"} <= set(body["fields"])
    assert body["submission"]["user"] == 2 and body["submission"]["local_id"] == 1
    assert body["fields"]["key"] == f"app/Competitions/{CID:06d}/Users/00000002/Submissions/0001/output.csv"
    with open(csv, "rb") as f:
        up = requests.post(body["url"], data=body["fields"], files={"file": ("output.csv", f)}, timeout=30)
    assert up.status_code in (200, 201, 204), up.text
    sid = body["submission"]["id"]
    deadline = time.monotonic() + 20
    while (s := requests.get(f"{url}/api/v1/competition/{CID}/submissions/{sid}/", headers=hdr,
                             timeout=10).json())["status"] == "pending":
        assert time.monotonic() < deadline, s
        time.sleep(0.2)
    assert s["status"] == "scored" and s["public_score"] == pytest.approx(1.0)
    assert "bob&#x27;s try" in requests.get(f"{url}/", timeout=10).text      # escaped in the HTML

    # restart on the same state dir: same users, same submissions, same ids
    board["server"].stop()
    board["server"] = Server(s3, board["root"] / "labels", board["root"] / "state", board["root"] / "server.log")
    url = board["server"].url
    after = requests.get(f"{url}/api/v1/competition/{CID}/submissions/", headers=hdr, timeout=10).json()
    assert [(x["id"], x["status"], x["public_score"]) for x in after] == [(sid, "scored", s["public_score"])]
    assert requests.get(f"{url}/api/v1/competition/{CID}/limits/", headers=hdr, timeout=10).json()["used_today"] == 1


def test_submit_stage_uses_ledger(board, tmp_path):
    """pipelines.submit: infer outputs -> CSV -> lint -> submit -> score; a rerun reuses the ledger entry."""
    from pipelines.submit import run

    names, labels = board["names"], board["labels"]
    infer = tmp_path / "infer"
    infer.mkdir()
    np.save(infer / "test_masks.npy", np.repeat(np.repeat(labels, 2, 1), 2, 2))    # 512x512 argmax masks
    (infer / "test_index.json").write_text(json.dumps({"file_names": names}))
    params = SubmitParams(description="nightly", base_url=board["server"].url, competition_id=CID,
                          wait_seconds=20, poll_seconds=0.2, ledger=str(tmp_path / "ledger.json"))
    data = DataParams(root="unused", classes=TRASH_CLASSES)
    hyper = {"train": {"epochs": 1}, "retrain": {}, "infer": {"tta": ["hflip"]}}
    first = run(params, data, infer, tmp_path / "out", key=KEYS["carol"], hyperparameters=hyper,
                oof_miou=0.8125, run_name="run-a")
    assert first.status == "scored" and first.public_score == pytest.approx(1.0) and not first.reused
    assert "public mIoU 1.0000 (OOF 0.8125)" in first.summary()
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["sha256"] == sha256_file(tmp_path / "out" / "submission.csv")
    assert saved["submission_id"] == first.submission_id
    second = run(params, data, infer, tmp_path / "out2", key=KEYS["carol"], hyperparameters=hyper,
                 oof_miou=0.8125, run_name="run-b")
    assert second.reused and second.submission_id == first.submission_id
    assert client(board, "carol").limits().used_today == 1
    assert client(board, "carol").submission(first.submission_id).hyperparameters == hyper

    # the CV-vs-leaderboard record: one row per submission (the reuse refreshed it, added none), beside the ledger
    history = json.loads((tmp_path / "submission_history.json").read_text())
    assert len(history) == 1
    row = history[0]
    assert (row["run"], row["submission_id"], row["local_id"], row["description"], row["oof_miou"]) == \
        ("run-a", first.submission_id, first.local_id, "nightly", 0.8125)
    assert row["public_score"] == pytest.approx(1.0) and row["status"] == "scored" and row["time"].endswith("Z")
    assert row["sha256"] == saved["sha256"] and row["deployment"] is None
    assert json.loads((tmp_path / "out2" / "history.json").read_text()) == history
    assert not list(tmp_path.glob(".submission_history.json.*[!k]"))     # no temp file left; only the lock
    assert all(KEYS["carol"] not in p.read_text() for p in tmp_path.rglob("*.json"))


def _infer_dir(root: Path, names: list[str], masks: np.ndarray) -> Path:
    root.mkdir(parents=True)
    np.save(root / "test_masks.npy", masks)
    (root / "test_index.json").write_text(json.dumps({"file_names": names}))
    return root


def test_if_better_policy_against_the_leaderboard(board, tmp_path):
    """nightly: if_better. A worse OOF writes and lints only (no slot); a better one submits; history keeps both."""
    from pipelines.submit import run

    names, labels = board["names"], board["labels"]
    params = SubmitParams(base_url=board["server"].url, competition_id=CID, policy={"nightly": "if_better"},
                          wait_seconds=20, poll_seconds=0.2, ledger=str(tmp_path / "ledger.json"))
    data = DataParams(root="unused", classes=TRASH_CLASSES)

    def nightly(name: str, masks: np.ndarray, oof: float):
        return run(params, data, _infer_dir(tmp_path / name, names, masks), tmp_path / name / "out",
                   key=KEYS["erin"], hyperparameters={}, oof_miou=oof, deployment="nightly", run_name=name)

    half = labels.copy()
    half[:, :128] = 0
    a = nightly("night-1", half, 0.5)
    assert a.status == "scored" and "no earlier submission to beat" in a.reason
    b = nightly("night-2", np.zeros_like(labels), 0.45)
    assert b.status == "dry-run" and b.submission_id is None
    assert f"does not beat the best submitted OOF mIoU 0.5000 (submission {a.submission_id}, run night-1)" in b.reason
    assert client(board, "erin").limits().used_today == 1                    # the worse run spent nothing
    c = nightly("night-3", labels, 0.7)
    assert c.status == "scored" and "0.7000 beats the best submitted OOF mIoU 0.5000" in c.reason
    assert client(board, "erin").limits().used_today == 2
    history = json.loads((tmp_path / "night-3" / "out" / "history.json").read_text())
    assert [(r["run"], r["deployment"], r["oof_miou"], r["submission_id"]) for r in history] == \
        [("night-1", "nightly", 0.5, a.submission_id), ("night-3", "nightly", 0.7, c.submission_id)]
    assert [r["public_score"] for r in history] == [pytest.approx(a.public_score), pytest.approx(1.0)]


# ------------------------------------------------------------------------- retries, idempotency, 4xx not retried
class FlakyProxy:
    """An HTTP proxy in front of the leaderboard that breaks on cue, to test the client's retries for real.

    `faults[path_part]` lists what the next requests whose path contains `path_part` get, one each:
    "drop" (forwarded, so the server acts on it, then the connection closes with no answer), "truncate"
    (forwarded, then half the body and a closed connection) or an HTTP status answered without forwarding.
    """

    def __init__(self, upstream: str):
        self.upstream, self.faults, self.seen = upstream, {}, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"               # keep-alive, as the client's session expects

            def do_GET(self):
                proxy.handle(self)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):   # the broken pipes are the point
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, part: str) -> int:
        return sum(part in p for p in self.seen)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        self.seen.append(path)
        fault = next((q.pop(0) for part, q in self.faults.items() if part in path and q), None)
        if isinstance(fault, int):
            return self._send(h, fault, b'{"detail": "injected by FlakyProxy"}')
        auth = {"Authorization": h.headers["Authorization"]} if h.headers.get("Authorization") else {}
        r = requests.get(self.upstream + h.path, headers=auth, timeout=30)
        if fault == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "truncate":
            self._send(h, r.status_code, r.content, cut=len(r.content) // 2)
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(h, r.status_code, r.content)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, cut: int | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))      # the whole length, even when only `cut` bytes follow
        h.end_headers()
        h.wfile.write(body[:cut])
        h.wfile.flush()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(board):
    p = FlakyProxy(board["server"].url)
    yield p
    p.close()


@pytest.mark.parametrize("fault", ["drop", "truncate", 500, 503])
def test_retry_after_a_network_error_makes_one_submission(board, proxy, tmp_path, fault):
    """The presign is recorded, then the answer is lost (or a 5xx comes back): the retry gets the same slot."""
    names, labels = board["names"], board["labels"]
    masks = labels.copy()
    masks[:, :, : 32 * (1 + ["drop", "truncate", 500, 503].index(fault))] = 0    # a different file per case
    csv = write_submission(tmp_path / "f.csv", names, masks)
    direct = client(board, "frank")
    used = direct.limits().used_today
    proxy.faults["presigned_url"] = [fault]
    c = LeaderboardClient(proxy.url, CID, KEYS["frank"], timeout=10, retries=2, backoff_s=0.05)
    sub = c.submit(csv, f"retried {fault}", {}, allow_last_slot=True)
    assert proxy.count("presigned_url") == 2                 # the faulty answer, then the retry
    assert direct.limits().used_today == used + 1            # one slot, not two
    mine = [s for s in direct.submissions() if s.content_sha256 == sha256_file(csv)]
    assert [s.id for s in mine] == [sub.id]
    # a lost answer leaves the server's record in place: the retry is told so, and uploads into that slot
    assert sub.existing is (fault in ("drop", "truncate"))
    assert direct.wait_for_score(sub.id, timeout_s=20, poll_s=0.2).status == "scored"


def test_4xx_is_final_and_5xx_retries_run_out(board, proxy):
    c = LeaderboardClient(proxy.url, CID, KEYS["frank"], timeout=10, retries=3, backoff_s=0.01)
    with pytest.raises(LeaderboardError, match="404 .*competition 999 not found"):
        LeaderboardClient(proxy.url, 999, KEYS["frank"], retries=3, backoff_s=0.01).limits()
    with pytest.raises(LeaderboardAuthError, match="401"):
        LeaderboardClient(proxy.url, CID, "wrong-key", retries=3, backoff_s=0.01).limits()
    proxy.faults["limits"] = [429]
    with pytest.raises(SubmissionRefused, match="429"):
        c.limits()
    assert proxy.count("limits") == 3                        # each 4xx answered once, never retried
    proxy.faults["limits"] = [502] * 4
    with pytest.raises(LeaderboardError, match="failed after 4 attempts: HTTP 502"):
        c.limits()
    assert proxy.count("limits") == 3 + 4
    proxy.faults["limits"] = ["truncate", "drop"]
    assert c.limits().daily_limit == LIMIT                   # two transport errors, then an answer
    assert proxy.count("limits") == 3 + 4 + 3


def test_a_slot_left_pending_is_uploaded_by_the_next_try(board, tmp_path):
    """A run died after the presign and before the upload: the same file later fills that slot, spending none."""
    names, labels = board["names"], board["labels"]
    csv = write_submission(tmp_path / "g.csv", names, labels)
    r = requests.get(f"{board['server'].url}/api/v1/competition/{CID}/presigned_url/", timeout=10,
                     params={"description": "died", "content_sha256": sha256_file(csv)},
                     headers={"Authorization": f"Bearer {KEYS['gina']}"})
    r.raise_for_status()
    reserved = r.json()["submission"]["id"]                  # ... and nothing was uploaded
    c = client(board, "gina")
    sub = c.submit(csv, "second try", {})
    assert sub.id == reserved and c.limits().used_today == 1
    assert c.wait_for_score(sub.id, timeout_s=20, poll_s=0.2).public_score == pytest.approx(1.0)


def test_ablation_rows_are_scored_with_the_ablation_keys_own_limit(board, tmp_path):
    """The ablation stage submits one file per row with its own key: the public scores come from the server, a
    file equal to an earlier row's costs no slot, and the team's own daily limit is untouched."""
    from pipelines import ablation
    from segpipe.config import AblationParams
    names, labels = board["names"], board["labels"]
    half = labels.copy()
    half[:, :, :128] = 0
    rows = {"r0": [("single", half), ("flip_tta", None), ("fold_ensemble", labels), ("model_ensemble", labels)],
            "r1": [("pseudo_r1", labels)]}
    oof = iter([0.1, 0.2, 0.3, 0.4])                                    # rising OOF mIoU, row after row
    for r, steps in rows.items():
        d = tmp_path / "infer" / r
        (d / "ablation").mkdir(parents=True)
        (d / "test_index.json").write_text(json.dumps({"file_names": names}))
        out = []
        for step, masks in steps:
            if masks is not None:
                np.save(d / "ablation" / f"{step}.npy", masks)
            out.append({"step": step, "name": step, "oof_miou": None if masks is None else next(oof),
                        "masks": None if masks is None else f"ablation/{step}.npy", "note": ""})
        (d / "ablation.json").write_text(json.dumps(out))
    params = SubmitParams(base_url=board["server"].url, competition_id=CID, wait_seconds=20, poll_seconds=0.2)
    data = DataParams(root="unused", classes=TRASH_CLASSES)
    res = ablation.run(AblationParams(), params, data, tmp_path / "infer", tmp_path / "ablation", key=ABLATION_KEY,
                       run_name="test")
    by = {r["step"]: r for r in res.rows}
    assert by["flip_tta"]["status"] == "skipped" and by["flip_tta"]["public_miou"] is None
    assert by["single"]["public_miou"] < 0.9 and by["fold_ensemble"]["public_miou"] == pytest.approx(1.0)
    assert by["fold_ensemble"]["delta_public"] > 0 and by["fold_ensemble"]["pays"] == "yes"
    assert by["model_ensemble"]["submission_id"] == by["fold_ensemble"]["submission_id"]    # same file, no slot
    assert by["pseudo_r1"]["pays"] == "yes"        # OOF up, public equal
    lim = LeaderboardClient(board["server"].url, CID, ABLATION_KEY).limits()
    assert (lim.daily_limit, lim.used_today) == (ABLATION_LIMIT, 2)
    assert client(board, "hank").limits().daily_limit == LIMIT
    metrics = json.loads((tmp_path / "ablation" / "metrics.json").read_text())
    assert metrics["public/fold_ensemble"] == pytest.approx(1.0) and "public/flip_tta" not in metrics
    # without the key nothing is sent and the report says why
    dry = ablation.run(AblationParams(), params, data, tmp_path / "infer", tmp_path / "dry", key=None)
    assert all(r["public_miou"] is None for r in dry.rows)
    assert "SEGPIPE_LEADERBOARD_ABLATION_KEY is not set" in dry.rows[0]["status"]


def test_key_limits_parse_and_never_echo_the_key():
    from segpipe.leaderboard import parse_key_limits
    assert parse_key_limits("a:3, b-c:100") == {"a": 3, "b-c": 100} and parse_key_limits("") == {}
    with pytest.raises(SystemExit) as e:
        parse_key_limits("secret-key-without-limit")
    assert "secret" not in str(e.value) and "entry 1" in str(e.value)


# ------------------------------------------------------------------------------------------ the Prefect flow side
def test_flow_submits_by_deployment_and_publishes_history(board, s3_env, tmp_path, monkeypatch):
    """The flow's submit step under a real (temporary) Prefect server: the deployment's name picks the policy,
    the history becomes a table artifact, and the key shows up in no log, artifact or parameter."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.logging.handlers import APILogWorker
    from prefect.testing.utilities import prefect_test_harness

    from flows.full_pipeline import submit_and_record
    from pipelines.submit import RoundChoice
    from segpipe.config import load_all

    names, labels = board["names"], board["labels"]
    p = load_all(REPO / "params.yaml")
    p["submit"] = p["submit"].model_copy(update={
        "base_url": board["server"].url, "competition_id": CID, "wait_seconds": 20, "poll_seconds": 0.2,
        "ledger": str(tmp_path / "ledger.json"), "description": "flow check"})
    assert p["submit"].policy["nightly"] == "if_better" and "staging" not in p["submit"].policy
    key = KEYS["hank"]
    monkeypatch.setenv("SEGPIPE_LEADERBOARD_KEY", key)     # how the stack's worker gets it

    @flow(name="submit-check")
    def submit_check(run: str) -> dict:
        sent = RoundChoice(0, tmp_path / run / "infer", 0.6, "the only round")
        return submit_and_record(p, tmp_path / run, sent, f"runs/{tmp_path.name}-{run}", run)

    with prefect_test_harness(server_startup_timeout=180):
        _infer_dir(tmp_path / "r1" / "infer", names, labels)
        monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "nightly")   # prefect.runtime's documented mock
        one = submit_check("r1")
        _infer_dir(tmp_path / "r2" / "infer", names, np.zeros_like(labels))
        monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "staging")
        two = submit_check("r2")
        APILogWorker.drain_all(timeout=10)
        with get_client(sync_client=True) as pc:
            arts = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["submission-history"])))
            every_artifact = pc.read_artifacts()
            logs = pc.read_logs()
            runs = pc.read_flow_runs()

    assert one["submit_status"] == "scored" and one["public_miou"] == pytest.approx(1.0)
    assert "<submit.policy.nightly=if_better>" in one["submit_reason"]
    assert two["submit_status"] == "dry-run" and two["submission"] is None
    assert "deployment 'staging' is not in submit.policy" in two["submit_reason"]
    assert client(board, "hank").limits().used_today == 1

    # published by both runs (the staging run shows the record it did not add to)
    assert len(arts) == 2
    table = json.loads(arts[0].data)
    assert [(r["run"], r["deployment"], r["oof_miou"], r["submission_id"], r["description"]) for r in table] == \
        [("r1", "nightly", 0.6, one["submission"], "flow check")]
    assert table[0]["public_score"] == pytest.approx(1.0)

    assert any("submit: public mIoU 1.0000 (OOF 0.6000)" in lg.message for lg in logs)
    assert any("not submitted: deployment 'staging'" in lg.message for lg in logs)
    text = json.dumps([a.model_dump(mode="json") for a in every_artifact]) + json.dumps(
        [lg.message for lg in logs]) + json.dumps([r.parameters for r in runs], default=str)
    assert key not in text, "the leaderboard key leaked into the Prefect API"


# ------------------------------------------------------------------------------------------------ the HTML page
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")


def browser_or_skip() -> tuple[str, str]:
    """Paths of chromium and chromedriver; skip naming the fix when absent, but fail under CI=true."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
        has_selenium = True
    except ImportError:
        has_selenium = False
    missing = [what for what, ok in (("chromium", chromium), ("chromedriver", driver),
                                     ("the selenium package", has_selenium)) if not ok]
    if missing:
        msg = (f"the leaderboard-page browser test needs {', '.join(missing)}: run `make system-deps` "
               "(apt-get install chromium chromium-driver) and `make setup` (selenium is in requirements-dev.lock)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " [CI=true: a missing browser fails the run]")
        pytest.skip(msg)
    return chromium, driver


def test_missing_browser_skips_but_fails_under_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs chromium, chromedriver.*make system-deps"):
        browser_or_skip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: a missing browser fails the run"):
        browser_or_skip()


def test_leaderboard_page_in_a_browser(board, tmp_path):
    """Headless Chromium opens the page the server renders and sees the submitted row: description and score."""
    chromium, chromedriver = browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    names, labels = board["names"], board["labels"]
    masks = labels.copy()
    masks[:, :, :96] = 0                               # part wrong: a score that is neither 0 nor 1
    csv = write_submission(tmp_path / "dave.csv", names, masks)
    desc = f"browser check {secrets.token_hex(3)}"
    c = client(board, "dave")
    sub = c.wait_for_score(c.submit(csv, desc, {}).id, timeout_s=20, poll_s=0.2)
    assert sub.status == "scored" and 0.05 < sub.public_score < 0.95
    score = f"{sub.public_score:.4f}"

    opts = Options()
    opts.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    # an explicit chromedriver: Selenium Manager has nothing to look up or download
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"{board['server'].url}/")
        assert driver.title == f"Leaderboard {CID:06d}"
        rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                for tr in driver.find_elements(By.CSS_SELECTOR, "table tr")]
        mine = [r for r in rows if desc in r]
        # dave's only submission is his best: one row in the ranking, one in "All submissions"
        assert len(mine) == 2, rows
        assert all(score in r and "user 00000004" in r for r in mine), mine
        cell = driver.find_element(By.XPATH, f"//td[text()='{desc}']")
        assert cell.is_displayed() and cell.size["width"] > 0
        driver.save_screenshot(str(tmp_path / "leaderboard.png"))
    finally:
        driver.quit()
    assert (tmp_path / "leaderboard.png").stat().st_size > 1000


# ------------------------------------------------------------------ a leaderboard with only the published protocol
PUBLISHED_BUCKET = "leaderboard-published"


@pytest.fixture(scope="module")
def published(s3, tmp_path_factory):
    """The local server in --published-only mode: presigned_url (no `key` in the fields) + the upload, nothing else."""
    root = tmp_path_factory.mktemp("lb-published")
    names, labels = write_labels(root / "labels")
    server = Server(s3, root / "labels", root / "state", root / "server.log", "--published-only",
                    "--bucket", PUBLISHED_BUCKET)
    yield {"server": server, "names": names, "labels": labels, "root": root, "s3": s3.client()}
    server.stop()
    log = (root / "server.log").read_text()
    assert all(k not in log for k in (*KEYS.values(), ADMIN, ABLATION_KEY)), "a key leaked into the server log"


def _objects(published, user: int) -> list[str]:
    """The object keys the store received for one user of the published-only server."""
    prefix = f"app/Competitions/{CID:06d}/Users/{user:08d}/"
    got = published["s3"].list_objects_v2(Bucket=PUBLISHED_BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in got.get("Contents", []))


def _published_params(published, tmp_path, **kw) -> SubmitParams:
    return SubmitParams(**{"description": "protocol only", "base_url": published["server"].url, "competition_id": CID,
                           "wait_seconds": 20, "poll_seconds": 0.2, "ledger": str(tmp_path / "ledger.json"), **kw})


def test_submit_stage_to_a_published_only_server(published, tmp_path):
    """The whole submit stage against a server with only presigned_url + upload: the right object key, the CSV's
    exact bytes in the store, `submitted, score on the leaderboard's page` in the result, the slot in the ledger."""
    from pipelines.submit import ledger_limits, run

    names, labels, url = published["names"], published["labels"], published["server"].url
    for extra in ("limits/", "submissions/", "submissions/1/"):            # the mode really has nothing else
        r = requests.get(f"{url}/api/v1/competition/{CID}/{extra}", timeout=10,
                         headers={"Authorization": f"Bearer {KEYS['alice']}"})
        assert r.status_code == 404, (extra, r.status_code)
    infer = _infer_dir(tmp_path / "infer", names, np.repeat(np.repeat(labels, 2, 1), 2, 2))
    params = _published_params(published, tmp_path)
    data = DataParams(root="unused", classes=TRASH_CLASSES)
    first = run(params, data, infer, tmp_path / "out", key=KEYS["alice"], hyperparameters={"train": {}},
                oof_miou=0.75, run_name="pub-a")
    csv = tmp_path / "out" / "submission.csv"
    key = f"app/Competitions/{CID:06d}/Users/00000001/Submissions/0001/output.csv"
    assert _objects(published, 1) == [key]
    body = published["s3"].get_object(Bucket=PUBLISHED_BUCKET, Key=key)["Body"].read()
    assert body == csv.read_bytes()
    assert (first.status, first.user, first.local_id, first.submission_id, first.public_score) == \
        ("submitted", 1, 1, None, None)
    assert "submitted, score on the leaderboard's page" in first.summary() and "OOF 0.7500" in first.summary()
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["status"] == "submitted" and "score on the leaderboard's page" in saved["score"]
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert ledger_limits(params, ledger).used_today == 1
    (entry,) = ledger.values()
    assert (entry["user"], entry["local_id"]) == (1, 1)
    history = json.loads((tmp_path / "submission_history.json").read_text())
    assert [(h["run"], h["status"], h["user"], h["local_id"]) for h in history] == [("pub-a", "submitted", 1, 1)]

    # the same file again: the ledger says it was sent; no slot, no second object, the history keeps one row
    again = run(params, data, infer, tmp_path / "out2", key=KEYS["alice"], hyperparameters={}, run_name="pub-b")
    assert again.reused and again.status == "submitted" and again.local_id == 1
    assert _objects(published, 1) == [key]
    assert ledger_limits(params, json.loads((tmp_path / "ledger.json").read_text())).used_today == 1
    assert len(json.loads((tmp_path / "submission_history.json").read_text())) == 1

    # the server scored the upload all the same: the score is on its page
    deadline = time.monotonic() + 20
    while "1.0000" not in (page := requests.get(f"{url}/", timeout=10).text):
        assert time.monotonic() < deadline, page[-2000:]
        time.sleep(0.2)
    assert "protocol only" in page


def test_ledger_daily_limit_when_the_server_offers_none(published, tmp_path):
    """No limits endpoint: submit.daily_limit counted in the ledger stops the run before it asks for a slot."""
    from pipelines.submit import ledger_limits, run
    from segpipe.leaderboard import SubmissionRefused

    names, labels = published["names"], published["labels"]
    data = DataParams(root="unused", classes=TRASH_CLASSES)

    def submit(name: str, cols: int, **kw):
        masks = labels.copy()
        masks[:, :, :cols] = 0                                             # a different file each time
        return run(_published_params(published, tmp_path, **kw), data, _infer_dir(tmp_path / name, names, masks),
                   tmp_path / name / "out", key=KEYS["carol"], hyperparameters={})

    assert submit("one", 16).status == "submitted"
    with pytest.raises(SubmissionRefused, match=r"daily limit used up \(1/1, counted by the ledger .*ledger.json "
                                                r"<submit.daily_limit=1>\); it resets at .*T00:00:00"):
        submit("two-a", 32, daily_limit=1)
    with pytest.raises(SubmissionRefused, match=r"only the last of 2 daily slots is left \(counted by the ledger"):
        submit("two-b", 32, daily_limit=2)
    assert _objects(published, 3) == [f"app/Competitions/{CID:06d}/Users/00000003/Submissions/0001/output.csv"]
    last = submit("two-c", 32, daily_limit=2, allow_last_slot=True)
    assert (last.status, last.local_id) == ("submitted", 2)              # no slot was taken by the refusals
    assert len(_objects(published, 3)) == 2
    params = _published_params(published, tmp_path, daily_limit=2)
    lim = ledger_limits(params, json.loads(Path(params.ledger).read_text()))
    assert (lim.used_today, lim.remaining) == (2, 0)


def _header_log(session: requests.Session) -> list[str]:
    """Record the Authorization header of every request the session sends (a real requests response hook)."""
    seen: list[str] = []
    session.hooks["response"].append(lambda r, *a, **k: seen.append(r.request.headers.get("Authorization")))
    return seen


@pytest.mark.parametrize("form", ["bare", "Bearer", "bearer"])
def test_key_given_bare_or_with_bearer_sends_one_prefix(board, published, tmp_path, form):
    """SEGPIPE_LEADERBOARD_KEY as `k` or as `Bearer k`: exactly one `Bearer ` goes out, and both servers accept it."""
    from segpipe.leaderboard import bearer

    raw = KEYS["gina"]
    key = raw if form == "bare" else f"{form} {raw}"
    assert bearer(key) == (f"Bearer {raw}" if form != "bearer" else f"bearer {raw}")
    session = requests.Session()
    seen = _header_log(session)
    full = LeaderboardClient(board["server"].url, CID, key, retries=0, session=session)
    assert full.limits().daily_limit == LIMIT                       # a doubled prefix would be an unknown key: 401
    # the published-only server: an upload of its own (gina is user 7 there), accepted with this header form
    csv = write_submission(tmp_path / "g.csv", published["names"], published["labels"])
    pub = LeaderboardClient(published["server"].url, CID, key, retries=0, session=session)
    sub = pub.submit(csv, f"key form {form}", {})
    assert sub.status == "submitted" and sub.user == 7
    sent = [h for h in seen if h is not None]
    assert len(sent) == 3 and all(h.count("earer ") == 1 and h.endswith(f"earer {raw}") for h in sent), \
        [h.replace(raw, "<key>") for h in sent]
    assert None in seen                                             # the S3 upload carries no Authorization


def test_preflight_spends_no_slot(board, published, tmp_path, caplog):
    """Start-up checks: against the published-only server they pass without asking for a slot (and say why the key
    was not checked); against the full server a wrong key still fails the run before any work."""
    import logging

    from pipelines.submit import preflight
    from segpipe.leaderboard import LeaderboardAuthError

    params = _published_params(published, tmp_path)
    with caplog.at_level(logging.INFO, logger="pipelines.submit"):
        preflight(params, KEYS["dave"])
        preflight(params, "not-a-key")                  # nothing on that server can check it without a slot
    assert "SEGPIPE_LEADERBOARD_KEY key not checked at start-up" in caplog.text and KEYS["dave"] not in caplog.text
    # no slot spent: dave's first presigned_url (user 4 there) is still local #1; its fields carry no `key`
    r = requests.get(f"{published['server'].url}/api/v1/competition/{CID}/presigned_url/", timeout=10,
                     params={"description": "after preflight", "hyperparameters": '{"training":{},"inference":{}}'},
                     headers={"Authorization": f"Bearer {KEYS['dave']}"})
    r.raise_for_status()
    body = r.json()
    assert body["submission"] == {"user": 4, "local_id": 1}
    assert set(body["fields"]) == {"x-amz-algorithm", "x-amz-credential", "x-amz-date", "policy", "x-amz-signature"}

    full = _published_params(published, tmp_path, base_url=board["server"].url)
    used = client(board, "dave").limits().used_today
    preflight(full, KEYS["dave"])
    assert client(board, "dave").limits().used_today == used
    with pytest.raises(LeaderboardAuthError, match="401"):
        preflight(full, "not-a-key")


def test_published_only_app_in_code(s3, tmp_path):
    """The same mode built in Python (ServerSettings(published_only=True)): only presigned_url and the pages."""
    from segpipe.leaderboard_server import ServerSettings, create_app

    settings = ServerSettings(labels_dir=tmp_path / "labels", state_dir=tmp_path / "state", s3=s3,
                              user_keys=("k",), competition_id=CID, published_only=True)
    paths = {r.path for r in create_app(settings).routes}
    assert "/api/v1/competition/{cid}/presigned_url/" in paths and "/healthz" in paths and "/" in paths
    assert not [p for p in paths if p.endswith(("/limits/", "/submissions/", "/submissions/{sid}/", "/reveal"))]
    full = {r.path for r in create_app(ServerSettings(labels_dir=tmp_path / "l", state_dir=tmp_path / "s", s3=s3,
                                                      user_keys=("k",))).routes}
    assert "/api/v1/competition/{cid}/limits/" in full
