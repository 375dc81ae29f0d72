"""Leaderboard client (AI Stages presigned-POST protocol, plain `requests`) and the `serve` entry point.

Submitting needs only the two published calls (GET presigned_url, then the presigned S3 POST). The local
server's extra endpoints (limits, listing, scores) are used when the server answers them, never required: the
first call to one that answers 404 marks them as not offered for the rest of this client's life.

The server lives in `segpipe.leaderboard_server`; it is imported only by `main(["serve", ...])`, so the client
runs without FastAPI.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from segpipe.submission import sha256_file

log = logging.getLogger("segpipe.leaderboard")

# where the published protocol puts a submission; the public client builds it from the answer's `submission`
OBJECT_KEY = "app/Competitions/{cid:06d}/Users/{user:08d}/Submissions/{local_id:04d}/output.csv"
# the answer's `submission.status` for a file uploaded to a server with no score API: read the score on its page
SUBMITTED = "submitted"
# the host a key given as a bare string was issued for; a key with none recorded goes only to a loopback address
KEY_HOST_ENV = "SEGPIPE_LEADERBOARD_HOST"


class LeaderboardError(RuntimeError):
    """The leaderboard answered with an error, or could not be reached after the retries."""


class LeaderboardUnreachable(LeaderboardError):
    """Connection errors or 5xx answers outlasted the retries: the server may be back later."""


class LeaderboardAuthError(LeaderboardError):
    """401: the key is missing or unknown (check SEGPIPE_LEADERBOARD_KEY)."""


class KeyHostMismatch(LeaderboardError):
    """The key was issued for another host than the one submit.base_url points to: nothing was sent."""


class SubmissionRefused(LeaderboardError):
    """No submission was made: the daily limit is used up, or only the last slot is left."""


class UploadRejected(LeaderboardError):
    """The S3 store refused the presigned POST (policy, size, signature or expiry)."""


@dataclass(frozen=True)
class Limits:
    daily_limit: int
    used_today: int
    remaining: int
    resets_at: str | None = None
    source: str = "the leaderboard"              # who counted: the server, or the local ledger (named in errors)


@dataclass(frozen=True)
class Submission:
    id: int | None                               # None: the server gives none (the published protocol)
    local_id: int
    user: int
    status: str                                  # pending | scored | failed | expired | submitted (no score API)
    description: str = ""
    hyperparameters: dict = field(default_factory=dict)
    public_score: float | None = None
    private_score: float | None = None           # None until the organiser reveals
    public_per_class: dict | None = None
    submitted_at: str | None = None
    scored_at: str | None = None
    error: str | None = None
    content_sha256: str | None = None
    released: bool = False                       # gave its file back (never uploaded, or other bytes): send it again
    existing: bool = False                       # the server returned an earlier submission of the same file

    @classmethod
    def from_json(cls, d: dict, existing: bool = False) -> "Submission":
        # the published answer carries only `user` and `local_id`: no id, no status
        d = {"id": None, "status": "pending", **d}
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "existing"}
        return cls(**known, existing=existing)


def bearer(key: str) -> str:
    """The Authorization header value: a bare token gets `Bearer `; a key given as `Bearer ...` is sent as given."""
    key = key.strip()
    return key if key[:7].lower() == "bearer " else f"Bearer {key}"


def _s3_error(resp: requests.Response) -> str:
    code = re.search(r"<Code>(.*?)</Code>", resp.text or "")
    msg = re.search(r"<Message>(.*?)</Message>", resp.text or "")
    return f"{resp.status_code} {code.group(1) if code else ''} {msg.group(1) if msg else resp.text[:200]}".strip()


def _hostname(url_or_host: str) -> str:
    """`https://lb.example:443/x`, `lb.example:443` or `lb.example` -> `lb.example` (lower case)."""
    text = url_or_host.strip()
    return (urlsplit(text if "://" in text else f"//{text}").hostname or "").lower()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_key_host(base_url: str, key: str | Mapping[str, str], key_host: str | None = None) -> str:
    """The bare key to send to `base_url`, once its host is the one the key was issued for; else KeyHostMismatch.

    A key's host is recorded with it: a Prefect Secret block's JSON value `{"key": ..., "host": ...}`, or, for a
    bare key, `key_host` (default $SEGPIPE_LEADERBOARD_HOST). The check is on the host name, not the port: the
    local emulator and the tests' servers move between ports, a key's issuer does not move between hosts. A key
    with no recorded host (the ones `segpipe stack up` makes for its emulator) goes to a loopback address only,
    so it never leaves the machine. Messages name hosts, never the key.
    """
    if isinstance(key, Mapping):
        missing = [k for k in ("key", "host") if not key.get(k)]
        if missing:
            raise LeaderboardAuthError(
                f"the leaderboard key's secret value has no {' and no '.join(map(repr, missing))}: store it as "
                "{\"key\": KEY, \"host\": HOST} (a Prefect Secret block's JSON value)")
        key, key_host, source = key["key"], key["host"], "the host stored with the key"
    else:
        key_host = key_host or os.environ.get(KEY_HOST_ENV) or None
        source = KEY_HOST_ENV
    target = _hostname(base_url)
    if not target:
        raise LeaderboardError(f"submit.base_url {base_url!r} has no host: give a URL like https://lb.example")
    if key_host is None:
        if _loopback(target):
            return key
        raise KeyHostMismatch(
            f"not sending the leaderboard key to {target} (submit.base_url): no host is recorded for it, and a key "
            f"without one goes only to the local emulator (127.0.0.1). If the key was issued for {target}, record "
            f"that: export {KEY_HOST_ENV}={target} beside the key, or keep key and host together in its Prefect "
            f"Secret block: Secret(value={{\"key\": KEY, \"host\": \"{target}\"}}).save(BLOCK, overwrite=True) with "
            "BLOCK leaderboard-key (leaderboard-ablation-key for the ablation key)")
    issued = _hostname(key_host)
    if issued != target:
        raise KeyHostMismatch(
            f"not sending the leaderboard key to {target}: it was issued for {issued or repr(key_host)} ({source}), "
            f"and submit.base_url ({base_url}) points elsewhere. Point submit.base_url at {issued}, or use the key "
            f"issued for {target}")
    return key


# A dropped connection can surface while the body is read (ChunkedEncodingError: the server answered, then the
# connection broke mid-response), not only while connecting; both are worth a retry, as the calls are idempotent.
TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class LeaderboardClient:
    """Talks to an AI Stages style leaderboard; retries transport errors and 5xx, never 4xx."""

    def __init__(self, base_url: str, competition_id: int, key: str | Mapping[str, str], *, timeout: float = 30.0,
                 retries: int = 4, backoff_s: float = 1.0, session: requests.Session | None = None,
                 key_host: str | None = None):
        if not key:
            raise LeaderboardAuthError("no leaderboard key: set SEGPIPE_LEADERBOARD_KEY")
        self.base_url = base_url.rstrip("/")
        self.competition_id = competition_id
        # every caller (submit, ablation, the start-up check) builds a client: the one place a key meets a host
        self._key = check_key_host(self.base_url, key, key_host)
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.session = session or requests.Session()
        self._extras: bool | None = None         # limits/listing/scores offered? None: not asked yet

    def __repr__(self) -> str:
        return f"LeaderboardClient(base_url={self.base_url!r}, competition_id={self.competition_id}, key=***)"

    @property
    def _api(self) -> str:
        return f"{self.base_url}/api/v1/competition/{self.competition_id}"

    def _request(self, method: str, url: str, *, auth: bool = True, **kw) -> requests.Response:
        """One call with retries on connection errors and 5xx (exponential backoff); 4xx are final."""
        headers = kw.pop("headers", {})
        if auth:
            headers["Authorization"] = bearer(self._key)
        for attempt in range(self.retries + 1):
            try:
                if "files" in kw:                # a retried upload must resend the file from its start
                    for _, spec in kw["files"].items():
                        spec[1].seek(0)
                resp = self.session.request(method, url, headers=headers, timeout=self.timeout, **kw)
            except TRANSIENT as e:
                err: str = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code < 500:
                    return resp
                err = f"HTTP {resp.status_code}"
            if attempt == self.retries:
                raise LeaderboardUnreachable(f"{method} {url.split('?')[0]} failed after {attempt + 1} attempts: "
                                             f"{err}")
            delay = self.backoff_s * 2 ** attempt
            log.warning("%s %s: %s; retry %d/%d in %.1fs", method, url.split("?")[0], err, attempt + 1,
                        self.retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _json(self, resp: requests.Response) -> Any:
        if resp.status_code == 401:
            raise LeaderboardAuthError(
                f"401 from {self.base_url}: {self._detail(resp)} (check SEGPIPE_LEADERBOARD_KEY)")
        if resp.status_code == 429:
            raise SubmissionRefused(f"429 from the leaderboard: {self._detail(resp)}")
        if resp.status_code >= 400:
            raise LeaderboardError(f"{resp.status_code} from {resp.url.split('?')[0]}: {self._detail(resp)}")
        try:
            return resp.json()
        except ValueError:
            raise LeaderboardError(f"{resp.status_code} from {resp.url.split('?')[0]} is not JSON (is "
                                   f"submit.base_url the leaderboard?): {resp.text[:200]!r}") from None

    @staticmethod
    def _detail(resp: requests.Response) -> str:
        try:
            d = resp.json().get("detail", resp.text)
        except ValueError:
            return resp.text[:300]
        return d.get("message", json.dumps(d)) if isinstance(d, dict) else str(d)

    def limits(self) -> Limits:
        d = self._json(self._request("GET", f"{self._api}/limits/"))
        return Limits(d["daily_limit"], d["used_today"], d["remaining"], d.get("resets_at"))

    def submissions(self) -> list[Submission]:
        return [Submission.from_json(d) for d in self._json(self._request("GET", f"{self._api}/submissions/"))]

    def submission(self, submission_id: int) -> Submission:
        return Submission.from_json(self._json(self._request("GET", f"{self._api}/submissions/{submission_id}/")))

    # ---- the extra endpoints, when the server has them
    def _extra(self, path: str) -> Any | None:
        """GET an extra endpoint's JSON, or None when the server does not offer them (remembered per client).

        The first answer decides: a 404 (or 405/501, or a page that is not JSON) means "only the published
        protocol here"; after a JSON answer the extras count as offered and a 404 is a real error again.
        """
        if self._extras is False:
            return None
        resp = self._request("GET", f"{self._api}/{path}")
        if self._extras is None:
            json_answer = "json" in resp.headers.get("content-type", "")
            if resp.status_code in (404, 405, 501) or (resp.status_code < 400 and not json_answer):
                self._extras = False
                log.info("%s answers %s to %s: it offers only the published protocol (presigned_url + upload); "
                         "no limits, listing or score API", self.base_url, resp.status_code, path)
                return None
        body = self._json(resp)
        self._extras = True
        return body

    def offers_extras(self) -> bool:
        """Whether the server answers the limits/listing/score endpoints (asks `limits/` once, spends nothing)."""
        if self._extras is None:
            self._extra("limits/")
        return bool(self._extras)

    def server_limits(self) -> Limits | None:
        """The server's daily limits, or None when it offers no limits endpoint."""
        d = self._extra("limits/")
        return None if d is None else Limits(d["daily_limit"], d["used_today"], d["remaining"], d.get("resets_at"))

    def object_key(self, sub: Submission) -> str:
        return OBJECT_KEY.format(cid=self.competition_id, user=sub.user, local_id=sub.local_id)

    def submit(self, csv_path: Path | str, description: str, hyperparameters: dict, *, force: bool = False,
               allow_last_slot: bool = False, fallback_limits: Limits | None = None) -> Submission:
        """Upload a submission file; the same file twice returns the first submission unless `force`.

        Needs only the published calls. With the server's listing, a file it already has costs no slot; with its
        limits endpoint, the limit is checked before asking for a slot. A server without them: `fallback_limits`
        (the caller's own count, e.g. the submit ledger) is checked instead, and the returned submission has
        status `submitted` (no score API to poll; the score is on the leaderboard's page).
        """
        csv_path = Path(csv_path)
        digest = sha256_file(csv_path)
        reserved = None
        listed = None if force else self._extra("submissions/")
        if listed is not None:                   # the same file again costs no slot, even the last one
            same = [s for s in map(Submission.from_json, listed) if s.content_sha256 == digest and not s.released]
            done = [s for s in same if s.status != "pending"]
            if done:
                log.info("leaderboard already has this file as submission %s (%s)", done[0].id, done[0].status)
                return dataclasses.replace(done[0], existing=True)
            # pending: its slot was taken, but an earlier attempt may have died before the upload finished;
            # asking again for the same (sha256, nonce) returns that slot with a fresh URL, and re-uploading
            # the same bytes to the same key is harmless, so upload rather than wait for a file that never comes
            reserved = same[0] if same else None
        if reserved is None:                     # a new slot: check the limit before asking for one
            lim = self.server_limits() or fallback_limits
            if lim is None:
                log.info("no daily limit to check before asking for a slot: %s has no limits endpoint and no "
                         "local count was given", self.base_url)
            elif lim.remaining <= 0:
                raise SubmissionRefused(
                    f"daily limit used up ({lim.used_today}/{lim.daily_limit}, counted by {lim.source}); it resets "
                    f"at {lim.resets_at}")
            elif lim.remaining == 1 and not allow_last_slot:
                raise SubmissionRefused(
                    f"only the last of {lim.daily_limit} daily slots is left (counted by {lim.source}); pass "
                    "allow_last_slot=True (submit.allow_last_slot in params.yaml) to spend it")
        else:
            log.info("submission %s holds this file's slot but is still pending; uploading the file (again)",
                     reserved.id)
        params = {"description": description,
                  "hyperparameters": json.dumps(hyperparameters, separators=(",", ":"), default=str)}
        if self._extras:                         # the local server's idempotency; the published call has neither
            # forcing a resubmission needs a new idempotency key, still fixed across this call's retries
            params.update(content_sha256=digest, nonce=uuid.uuid4().hex if force else "")
        body = self._json(self._request("GET", f"{self._api}/presigned_url/", params=params))
        if not isinstance(body, dict) or not isinstance(body.get("submission"), dict):
            raise LeaderboardError(f"presigned_url answer from {self.base_url} has no `submission` object "
                                   f"(keys: {sorted(body) if isinstance(body, dict) else type(body).__name__})")
        sub = Submission.from_json(body["submission"], existing=bool(body.get("existing")))
        if sub.status != "pending" or not body.get("url"):
            log.info("leaderboard already has this file as submission %s (%s)", sub.id, sub.status)
            return sub
        # the public server leaves `key` out of the fields: the client builds it from the submission
        fields = {"key": self.object_key(sub), **body.get("fields", {})}
        with open(csv_path, "rb") as fh:
            files = {"file": ("output.csv", fh, "text/csv")}
            resp = self._request("POST", body["url"], auth=False, data=fields, files=files)
        if resp.status_code not in (200, 201, 204):
            raise UploadRejected(f"the store refused submission {sub.id or ''} (local #{sub.local_id}, key "
                                 f"{fields['key']}): {_s3_error(resp)}")
        log.info("uploaded submission %s (local #%s, key %s, sha256 %s)", sub.id, sub.local_id, fields["key"],
                 digest[:12])
        if not self._extras:                     # nothing to poll: the score shows on the leaderboard's page
            sub = dataclasses.replace(sub, status=SUBMITTED, content_sha256=digest)
        return sub

    def wait_for_score(self, submission_id: int, timeout_s: float = 120.0, poll_s: float = 1.0) -> Submission:
        """Poll until the submission leaves `pending`; TimeoutError names the last status."""
        deadline = time.monotonic() + timeout_s
        while True:
            sub = self.submission(submission_id)
            if sub.status != "pending":
                return sub
            if time.monotonic() + poll_s > deadline:
                raise TimeoutError(f"submission {submission_id} still pending after {timeout_s:.0f}s"
                                   + (f" ({sub.error})" if sub.error else ""))
            time.sleep(poll_s)


# --------------------------------------------------------------------------------------------- CLI
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m segpipe.leaderboard", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the local leaderboard server (keys and S3 credentials from the env)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--labels", type=Path, required=True, help="hidden labels dir (labels.npy + index.json)")
    s.add_argument("--state-dir", type=Path, required=True, help="where the SQLite state lives")
    s.add_argument("--competition-id", type=int, default=1)
    s.add_argument("--bucket", default=os.environ.get("SEGPIPE_LEADERBOARD_BUCKET", "leaderboard"))
    s.add_argument("--daily-limit", type=int, default=int(os.environ.get("SEGPIPE_LEADERBOARD_DAILY_LIMIT", 10)))
    s.add_argument("--max-upload-bytes", type=int, default=None,
                   help="default: the largest valid file for the test set")
    s.add_argument("--url-expiry-s", type=int, default=900)
    s.add_argument("--poll-s", type=float, default=1.0, help="how often the scorer looks for uploads")
    s.add_argument("--log-level", default="info")
    s.add_argument("--published-only", action="store_true",
                   help="speak only the published protocol (presigned_url without `key` in the fields, then the "
                        "upload); limits, listing, scores and reveal answer 404, as on a public leaderboard")
    return p.parse_args(argv)


def parse_key_limits(text: str) -> dict[str, int]:
    """`key:limit,key:limit` (SEGPIPE_LEADERBOARD_KEY_LIMITS) -> {key: daily limit}; the error never shows a key."""
    out = {}
    for i, item in enumerate(t.strip() for t in text.split(",") if t.strip()):
        key, sep, limit = item.rpartition(":")
        if not sep or not key or not limit.isdigit():
            raise SystemExit(f"SEGPIPE_LEADERBOARD_KEY_LIMITS entry {i + 1} is not `key:limit` (limit a whole number)")
        out[key] = int(limit)
    return out


def main(argv: list[str] | None = None) -> None:
    """`serve`: run the server. Keys: SEGPIPE_LEADERBOARD_KEYS (comma-separated), SEGPIPE_LEADERBOARD_ADMIN_KEY."""
    args = _parse(argv)
    from segpipe.leaderboard_server import ServerSettings, serve   # fastapi only on the server side
    from segpipe.storage import S3Config

    keys = tuple(k.strip() for k in os.environ.get("SEGPIPE_LEADERBOARD_KEYS", "").split(",") if k.strip())
    if not keys:
        raise SystemExit("SEGPIPE_LEADERBOARD_KEYS is empty: set it to the comma-separated user keys")
    key_limits = parse_key_limits(os.environ.get("SEGPIPE_LEADERBOARD_KEY_LIMITS", ""))
    settings = ServerSettings(
        labels_dir=args.labels, state_dir=args.state_dir, s3=S3Config.from_env(), user_keys=keys,
        admin_key=os.environ.get("SEGPIPE_LEADERBOARD_ADMIN_KEY") or None, competition_id=args.competition_id,
        bucket=args.bucket, daily_limit=args.daily_limit, key_limits=key_limits, max_upload_bytes=args.max_upload_bytes,
        url_expiry_s=args.url_expiry_s, poll_s=args.poll_s, published_only=args.published_only,
    )
    serve(settings, args.host, args.port, args.log_level)


if __name__ == "__main__":
    main()
