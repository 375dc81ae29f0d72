"""Fault-injection helpers: a SeaweedFS we can stop and start, a faulty HTTP proxy, checksum walks, secret scans,
training counts and the report table. Real processes and real services only; nothing here mocks S3 or Prefect."""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from segpipe.storage import ArtifactStore, S3Config, ensure_bucket

REPO = Path(__file__).resolve().parents[2]
# `make test-faults` sets it: the run writes docs/fault-report.{md,json}; any other run (make test's short forms)
# writes its report under the temp folder, so a partial run never rewrites the committed one
REPORT_ENV = "SEGPIPE_FAULT_REPORT"


# ---------------------------------------------------------------------------------------------- S3 we can stop
class Weed:
    """`weed mini` on fixed free ports with a persistent data dir: stop() and start() keep every object."""

    def __init__(self, root: Path, base_port: int):
        from segpipe.stack import WEED_FLAGS, WEED_INTERNAL
        self.root, self.proc = root, None
        self.s3_port = base_port
        self.ports = {n: base_port + 1 + i for i, n in enumerate(WEED_INTERNAL)}
        self.cfg = S3Config(f"http://127.0.0.1:{base_port}", "AK" + secrets.token_hex(8), secrets.token_hex(20),
                            "segpipe")
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "s3.json").write_text(json.dumps({"identities": [{"name": "segpipe", "credentials": [
            {"accessKey": self.cfg.access_key, "secretKey": self.cfg.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        from segpipe.stack import _bin, write_weed_security
        write_weed_security(root)         # the stack's JWT keys and gRPC mTLS, read from weed's cwd
        self.cmd = [_bin("weed"), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    f"-s3.port={base_port}", f"-s3.config={root / 's3.json'}",
                    *(f"{WEED_FLAGS[n]}={p}" for n, p in self.ports.items())]

    def env(self) -> dict[str, str]:
        return {"SEGPIPE_S3_ENDPOINT": self.cfg.endpoint_url, "SEGPIPE_S3_BUCKET": self.cfg.bucket,
                "AWS_ACCESS_KEY_ID": self.cfg.access_key, "AWS_SECRET_ACCESS_KEY": self.cfg.secret_key}

    def start(self) -> None:
        log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.root)
        log.close()
        ensure_bucket(self.cfg, self.cfg.bucket, retry_seconds=90)

    def stop(self) -> None:
        """SIGKILL the whole weed process group: the store vanishes mid-request, as a crashed host would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            assert self.proc.returncode == -signal.SIGKILL, f"weed ended with {self.proc.returncode}, not SIGKILL"
        deadline = time.monotonic() + 30        # the ports must be free again before a restart
        while time.monotonic() < deadline and _listening(self.s3_port):
            time.sleep(0.2)

    def down(self) -> bool:
        """The store refuses connections now (what a client mid-request sees during the outage)."""
        return (self.proc is None or self.proc.poll() is not None) and not _listening(self.s3_port)

    def outage(self, seconds: float, during=None) -> threading.Thread:
        """Stop now, start again after `seconds`, in the background. `during()`, if given, runs while the store is
        down (before the restart is scheduled): it gathers the evidence that work was in flight at that moment."""
        self.stop()
        t0 = time.monotonic()

        def later():
            time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
            self.start()
        t = threading.Thread(target=later, daemon=True)
        try:
            assert self.down(), f"SeaweedFS still answers on port {self.s3_port} after its SIGKILL"
            if during is not None:
                during()
        finally:
            t.start()                           # back up even when the evidence check fails: later tests need it
        return t


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------------------------------- checksum walk
def verify_prefix(store: ArtifactStore, prefix: str) -> list[str]:
    """Read every object under `prefix/` back through ArtifactStore (which checks its recorded sha256); each must
    carry one (no object written around the store). Returns the keys; raises on any corrupt or unchecked one."""
    keys = store.list(prefix.rstrip("/") + "/")
    for key in keys:
        if store.sha256(key) is None:
            raise AssertionError(f"{store.url(key)} has no recorded sha256: written around ArtifactStore")
        store.get_bytes(key)                       # raises CorruptArtifactError on a mismatch
    return keys


def no_temp_leftovers(root: Path) -> list[Path]:
    """Half-written local files (atomic writers' temp names) left under `root`."""
    return [p for p in Path(root).rglob("*") if p.is_file() and re.search(r"\.(tmp\d*|part)$|\.tmp\d+$", p.name)]


def assert_no_secrets(values: list[str], paths: list[Path], texts: list[str] = ()) -> int:
    """No credential in any file under `paths` (recursively) nor in `texts`; returns the number of files read."""
    values = [v for v in values if v and len(v) >= 8]
    n = 0
    for root in paths:
        files = [root] if Path(root).is_file() else [p for p in Path(root).rglob("*") if p.is_file()]
        for f in files:
            if f.name in ("credentials.env", "s3.json") or f.suffix == ".db":
                continue                            # where the secrets are meant to live
            data = f.read_bytes()
            n += 1
            for v in values:
                assert v.encode() not in data, f"a credential leaked into {f}"
    for t in texts:
        for v in values:
            assert v not in t, "a credential leaked into a captured log"
    return n


@dataclass
class StoredScan:
    """What a scan of stored data read: `scanned` items (objects, or Prefect records), and what it left out."""
    where: str
    scanned: int = 0
    n_bytes: int = 0
    skipped: list[str] = field(default_factory=list)     # "bucket/key (N bytes > max_bytes)": say so in the report

    def summary(self) -> str:
        left = f"; skipped {len(self.skipped)}: {', '.join(self.skipped[:5])}" if self.skipped else ""
        return f"{self.where}: {self.scanned} items, {self.n_bytes:,} bytes scanned for credentials{left}"


def _needles(values: list[str]) -> list[bytes]:
    return [v.encode() for v in dict.fromkeys(values) if v and len(v) >= 8]


def scan_s3_for_secrets(cfg: S3Config, values: list[str], *, buckets: list[str] | None = None,
                        max_bytes: int | None = None, chunk: int = 1 << 20) -> StoredScan:
    """No credential in any stored S3 object (body or user metadata), in every bucket (or `buckets`).

    Bodies are streamed in `chunk`s with an overlap of the longest value, so a large checkpoint is read whole
    without holding it in memory. `max_bytes` (None: no limit) skips larger objects, listed in `skipped`: a scan
    that skipped something must say so. AssertionError names the bucket and key, never the value."""
    needles = _needles(values)
    client = cfg.client()
    names = buckets if buckets is not None else [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    scan = StoredScan(f"S3 {cfg.endpoint_url} ({', '.join(names)})")
    overlap = max((len(n) for n in needles), default=1) - 1
    for bucket in names:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                key, size = obj["Key"], obj["Size"]
                if max_bytes is not None and size > max_bytes:
                    scan.skipped.append(f"{bucket}/{key} ({size:,} bytes > {max_bytes:,})")
                    continue
                got = client.get_object(Bucket=bucket, Key=key)
                meta = json.dumps(got.get("Metadata", {})).encode()
                tail = b""
                for part in [meta, *got["Body"].iter_chunks(chunk)]:
                    window = tail + part
                    for n in needles:
                        assert n not in window, f"a credential leaked into s3://{bucket}/{key}"
                    tail = window[-overlap:] if overlap else b""
                    scan.n_bytes += len(part)
                tail = b""
                scan.scanned += 1
    return scan


def scan_prefect_for_secrets(api_url: str, values: list[str], page: int = 200) -> StoredScan:
    """No credential in what the Prefect API shows: logs, artifacts, flow and task runs (names, parameters,
    state messages), deployments (parameters, job variables), blocks as the API lists them (secret fields
    masked: a credential in a plain field is a leak), variables, automations and work pools.

    Read through the client (`get_client`), as the UI reads them. AssertionError names the record, never the value."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    needles = [n.decode() for n in _needles(values)]
    scan = StoredScan(f"Prefect API {api_url}")

    def check(what: str, record) -> None:
        text = json.dumps(record.model_dump(mode="json") if hasattr(record, "model_dump") else record, default=str)
        for n in needles:
            assert n not in text, f"a credential leaked into Prefect {what} {getattr(record, 'id', '')}".rstrip()
        scan.scanned += 1
        scan.n_bytes += len(text)

    def paged(read) -> list:
        out, offset = [], 0
        while True:
            got = read(limit=page, offset=offset)
            out += got
            if len(got) < page:
                return out
            offset += page

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        sources = {
            "log": paged(lambda **kw: client.read_logs(**kw)),
            "artifact": paged(lambda **kw: client.read_artifacts(**kw)),
            "flow run": paged(lambda **kw: client.read_flow_runs(**kw)),
            "task run": paged(lambda **kw: client.read_task_runs(**kw)),
            "deployment": paged(lambda **kw: client.read_deployments(**kw)),
            "block document": paged(lambda **kw: client.read_block_documents(include_secrets=False, **kw)),
            "variable": client.read_variables(),
            "automation": client.read_automations(),
            "work pool": client.read_work_pools(),
        }
        for what, records in sources.items():
            for r in records:
                check(what, r)
    return scan


def assert_nothing_stored_leaks(values: list[str], *, s3: S3Config | None = None, prefect_api: str | None = None,
                                max_bytes: int | None = None) -> list[StoredScan]:
    """The stored side of the secret scan: every S3 object and everything the Prefect API shows (see the two
    scans); the summaries say what was read and skipped, for the fault report's details."""
    scans = []
    if s3 is not None:
        scans.append(scan_s3_for_secrets(s3, values, max_bytes=max_bytes))
    if prefect_api is not None:
        scans.append(scan_prefect_for_secrets(prefect_api, values))
    return scans


TRAINED = re.compile(r"train (\S+): \d+ train / \d+ val images")
REUSED = re.compile(r"train (\S+): unchanged inputs, params and code; reused")


EPOCH = re.compile(r"epoch (\d+)/\d+ loss")


def epochs_run(text: str) -> list[int]:
    """The epochs (1-based) a training process really ran, in order, from the engine's per-epoch log lines."""
    return [int(e) for e in EPOCH.findall(text)]


def assert_sigkilled(proc: subprocess.Popen, what: str = "the process") -> None:
    """The kill landed: `proc` was alive just before and ended by signal 9 (not a clean exit, not another error)."""
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, f"{what} ended with {proc.returncode}, not SIGKILL: the fault missed"


def trainings(text: str) -> list[str]:
    """Members that really trained (not served from the result cache), from the train stage's own log lines."""
    return TRAINED.findall(text)


# ---------------------------------------------------------------------------------------------- faulty proxy
class FaultProxy:
    """A reverse HTTP proxy in front of a real server. `mode`: "pass", "down" (connection refused), "slow:<s>"
    (answers after s seconds), or an int status answered without forwarding, for the next `n` requests whose path
    contains `part`. Counts what reached it."""

    def __init__(self, upstream: str):
        self.upstream, self.rules, self.seen = upstream.rstrip("/"), [], []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                proxy.handle(self, "GET")

            def do_POST(self):
                proxy.handle(self, "POST")

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address):
                pass

        self._server_cls, self._handler = Server, Handler
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.up()

    def up(self) -> None:
        if self.server is None:
            self.server = self._server_cls(("127.0.0.1", self.port), self._handler)
            threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        """Unreachable: nothing listens on the port (connection refused)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def fault(self, part: str, mode, n: int = 1) -> None:
        self.rules.append([part, mode, n])

    def count(self, part: str) -> int:
        return sum(part in p for _, p in self.seen)

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?")[0]
        self.seen.append((method, path))
        rule = next((r for r in self.rules if r[0] in path and r[2] > 0), None)
        mode = None
        if rule is not None:
            rule[2] -= 1
            mode = rule[1]
            if isinstance(mode, int):
                return self._send(h, mode, b'{"detail": "injected by FaultProxy"}')
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method == "POST" else None
        headers = {k: v for k, v in h.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            r = requests.request(method, self.upstream + h.path, headers=headers, data=body, timeout=60)
        except requests.RequestException:
            return self._send(h, 502, b'{"detail": "upstream unreachable"}')
        if isinstance(mode, str) and mode.startswith("slow:"):
            time.sleep(float(mode.split(":")[1]))     # the server has acted; its answer arrives late
        self._send(h, r.status_code, r.content)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            h.wfile.flush()
        except OSError:
            pass                                    # the client gave up (timeout): that is the point

    def close(self) -> None:
        self.down()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class Row:
    scenario: str
    form: str                     # short | long
    trials: int
    outcome: str
    redone: str
    lost: str = "nothing"
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)


def report_paths() -> tuple[Path, Path]:
    """(json, md) of this run's report: docs/ under `make test-faults` (REPORT_ENV set), else the temp folder."""
    if os.environ.get(REPORT_ENV):
        folder = REPO / "docs"
    else:
        folder = Path(tempfile.gettempdir()) / f"segpipe-fault-report-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    return folder / "fault-report.json", folder / "fault-report.md"


def _commit() -> str:
    """HEAD's short hash, and whether the tree differs from it (the report files themselves aside)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    changed = [ln for ln in git("status", "--porcelain").splitlines() if "docs/fault-report." not in ln]
    return head + (f" plus {len(changed)} uncommitted change(s)" if changed else "")


def _update(change) -> None:
    """Read this run's report, apply `change(report)`, write it back (json, then the markdown made from it)."""
    json_path, md_path = report_paths()
    with open(Path(tempfile.gettempdir()) / "segpipe-fault-report.lock", "w") as lock:   # two pytest runs at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(json_path.read_text()) if json_path.is_file() else {}
        change(report)
        json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        md_path.write_text(markdown(report))


def start_report(command: str, selected: list[str]) -> None:
    """A new run: the report starts empty, naming the commit and the command; rows come only from this run."""
    def reset(report: dict) -> None:
        report.clear()
        report.update(run={"commit": _commit(), "command": command,
                           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "finished": None},
                      tests={node: "selected, not run" for node in selected}, rows={})
    _update(reset)


def note_outcome(node: str, outcome: str) -> None:
    """A scenario test's result in this run: passed, failed (with the first line of its error) or skipped."""
    _update(lambda report: report.setdefault("tests", {}).__setitem__(node, outcome))


def finish_report() -> None:
    def finish(report: dict) -> None:
        report.setdefault("run", {})["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    _update(finish)


def record(row: Row) -> None:
    """Add one scenario's measured outcome to this run's report."""
    def add(report: dict) -> None:
        report.setdefault("rows", {})[f"{row.scenario}|{row.form}"] = {
            **row.__dict__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    _update(add)


def markdown(report: dict) -> str:
    run, rows, tests = report.get("run", {}), report.get("rows", {}), report.get("tests", {})
    passed = sum(v == "passed" for v in tests.values())
    not_passed = {k: v for k, v in tests.items() if v != "passed"}
    lines = ["# Fault-injection report", "",
             f"One run of the fault suite (`tests/faults/`) at commit **{run.get('commit', '?')}**, "
             f"`{run.get('command', '?')}`, started {run.get('started', '?')}, "
             f"{'finished ' + run['finished'] if run.get('finished') else 'NOT FINISHED (interrupted)'}: "
             f"{passed} of {len(tests)} scenario tests passed. Every row below was measured in this run (nothing is "
             "carried over from an earlier one); every row's artifacts were read back with their sha256 checked, "
             "and every log and artifact scanned for the credentials. `make test-faults` writes this file; "
             "`make test` runs the short forms and writes its report under the temp folder.", ""]
    if not_passed:
        lines += ["## Not passed in this run", "", "| test | outcome |", "| --- | --- |",
                  *(f"| `{k}` | {v.replace('|', '/')} |" for k, v in sorted(not_passed.items())), ""]
    lines += ["| scenario | form | trials | outcome | work redone | lost | s | when |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(rows, key=lambda k: (int(re.match(r"\d+", k).group()) if re.match(r"\d+", k) else 99, k)):
        r = rows[key]
        lines.append(f"| {r['scenario']} | {r['form']} | {r['trials']} | {r['outcome']} | {r['redone']} | "
                     f"{r['lost']} | {r['seconds']:.0f} | {r['when']} |")
    notes = [f"- **{r['scenario']}** ({r['form']}): " + "; ".join(r["details"]) for r in
             (rows[k] for k in sorted(rows)) if r.get("details")]
    if notes:
        lines += ["", "## Details", "", *notes]
    return "\n".join(lines) + "\n"
