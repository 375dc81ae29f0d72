"""The long form: the whole stack as `make demo` runs it (`segpipe stack up`, `prefect deploy`, deployment runs
through the worker), with the worker SIGKILLed at random points, S3 stopped for 60 s mid-training and mid-upload,
the Prefect server restarted mid-run, and two runs at once. Every run's final submission must equal the
undisturbed run's, byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from segpipe import stack
from segpipe.storage import ArtifactStore, S3Config
from tests.conftest import free_port_block
from tests.faults.helpers import TRAINED, Row, assert_no_secrets, assert_nothing_stored_leaks, record, verify_prefix
from tests.tiny import copy_project, shrink_params

pytestmark = [pytest.mark.long, pytest.mark.slow]
BIN = Path(sys.executable).parent
SEED = int(os.environ.get("SEGPIPE_FAULT_SEED") or time.time()) % 100000
MEMBERS = 2                      # fpn_mbv2 x seed 0 x folds 0, 1 (pseudo.rounds 0: no retrain round)


class Stack:
    def __init__(self, root: Path):
        self.project = copy_project(root / "project")
        base = free_port_block(11)
        self.ports = {"s3": base, "prefect": base + 9, "leaderboard": base + 10}
        shrink_params(self.project / "params.yaml", pseudo={"rounds": 0},
                      submit={"base_url": f"http://127.0.0.1:{self.ports['leaderboard']}"})
        self.home = root / "home"
        os.environ["PYTHONPATH"] = str(self.project)     # the worker's flow runs import this copy's code
        stack.up(self.home, self.ports, cwd=self.project, labels=self.project / "data/leaderboard")
        self.env = {**os.environ, **stack.load_env(self.home), "PATH": f"{BIN}:{os.environ['PATH']}",
                    "SEGPIPE_HOME": str(self.home)}
        out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=self.project,
                             env=self.env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        # no nightly run of its own at 02:00 UTC beside the scenario's runs
        out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deployment", "schedule", "pause", "--all"],
                             cwd=self.project, env=self.env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        self.api = self.env["PREFECT_API_URL"]
        self.store = ArtifactStore(S3Config.from_env(self.env))

    # ---- runs
    def start(self) -> str:
        dep = requests.get(f"{self.api}/deployments/name/full-pipeline/demo", timeout=30).json()
        r = requests.post(f"{self.api}/deployments/{dep['id']}/create_flow_run", json={}, timeout=30)
        r.raise_for_status()
        return r.json()["id"]

    def state(self, fid: str) -> str:
        for _ in range(60):
            try:
                return requests.get(f"{self.api}/flow_runs/{fid}", timeout=10).json()["state_type"]
            except (requests.RequestException, KeyError, ValueError):
                time.sleep(2)                         # the server may be restarting
        raise AssertionError("the Prefect API did not answer for 2 minutes")

    def wait(self, fid: str, timeout: float = 1500) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state(fid)
            if st in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return st
            time.sleep(2)
        raise AssertionError(f"flow run {fid} still {st} after {timeout}s")

    def logs(self, fid: str) -> list[str]:
        out, offset = [], 0
        while True:
            page = requests.post(f"{self.api}/logs/filter", timeout=30, json={
                "logs": {"flow_run_id": {"any_": [fid]}}, "limit": 200, "offset": offset, "sort": "TIMESTAMP_ASC"}
            ).json()
            out += [p["message"] for p in page]
            if len(page) < 200:
                return out
            offset += 200

    def trained(self, fid: str) -> list[str]:
        return [TRAINED.match(m).group(1) for m in self.logs(fid) if TRAINED.match(m)]

    def task_names(self, fid: str) -> list[str]:
        runs = requests.post(f"{self.api}/task_runs/filter", timeout=30,
                             json={"flow_runs": {"id": {"any_": [fid]}}}).json()
        return [r["name"] for r in runs]

    def summary(self, fid: str) -> dict:
        name = requests.get(f"{self.api}/flow_runs/{fid}", timeout=10).json()
        for p in (self.project / "runs").glob("*/summary.json"):
            s = json.loads(p.read_text())
            if s["run"].endswith(fid[:8]):
                return s
        raise AssertionError(f"no summary.json for flow run {fid} ({name.get('name')})")

    def submission_sha(self, fid: str) -> str:
        s = self.summary(fid)
        return hashlib.sha256((self.project / "runs" / s["run"] / "submit" / "submission.csv").read_bytes()).hexdigest()

    # ---- faults
    def service(self, name: str) -> dict:
        return json.loads((self.home / "state.json").read_text())["services"][name]

    def kill_worker(self) -> int:
        """SIGKILL the worker's process group (the worker, its flow-run process, their training processes) and any
        process of this project the group left behind: the machine is gone; its disk stays."""
        rec = self.service("worker")
        assert stack._alive(rec), "the worker was not running before its kill"
        services = {self.service(n)["pid"] for n in ("s3", "prefect", "leaderboard")}
        os.killpg(rec["pid"], signal.SIGKILL)
        _gone(rec, "worker")
        killed = 1
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if os.getpgid(int(proc.name)) in services:
                        continue                      # the other services live on
                    if os.readlink(proc / "cwd") == str(self.project) and b"python" in (proc / "cmdline").read_bytes():
                        os.kill(int(proc.name), signal.SIGKILL)
                        killed += 1
                except OSError:
                    pass
        time.sleep(1)
        return killed

    def restart(self, name: str, after: float = 0.0, during=None):
        """SIGKILL the service's process group (a crash, not a clean stop), confirm it is gone and its port refuses
        connections, call `during()` (evidence of the work in flight while it is down), start it after `after` s."""
        rec = self.service(name)
        assert stack._alive(rec), f"{name} was not running before its kill"
        os.killpg(rec["pid"], signal.SIGKILL)
        try:
            _gone(rec, name)
            if name in self.ports:
                # the main thread shows as a zombie while a thread blocked in disk I/O still exits, holding the
                # sockets (weed under an upload's fsyncs): the port closes a moment after, not with the pid
                _port_closed(self.ports[name], name)
            evidence = during() if during is not None else None
            time.sleep(after)
        finally:
            self.start_service(name)          # back up even when a check fails: the module's later tests need it
        return evidence

    def start_service(self, name: str) -> None:
        stack.up(self.home, self.ports, services=[name], cwd=self.project, labels=self.project / "data/leaderboard")

    def stored_members(self) -> set[str]:
        """Members whose finished result is stored (results/<member>/.../DONE)."""
        return {k.split("/")[1] for k in self.store.list("results/") if k.endswith("/DONE")}

    def clear_caches(self) -> None:
        """Forget stored stage results (prefect-results/), finished members (results/) and resume state
        (checkpoints/): the next run does everything."""
        for prefix in ("prefect-results/", "results/", "checkpoints/"):
            for k in self.store.list(prefix):
                self.store.delete(k)

    def verify_all(self) -> int:
        return sum(len(verify_prefix(self.store, p)) for p in ("runs", "results", "checkpoints"))

    def no_secrets(self, texts: list[str]) -> list[str]:
        """No credential in the local logs and run dirs, `texts`, any stored S3 object, or anything the Prefect
        API shows (logs, artifacts, blocks, ...); returns what was scanned, for the row's details."""
        secrets = [self.env[k] for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "SEGPIPE_LEADERBOARD_KEY",
                                         "SEGPIPE_LEADERBOARD_ABLATION_KEY")]
        n = assert_no_secrets(secrets, [self.home / "logs", self.project / "runs"], texts)
        scans = assert_nothing_stored_leaks(secrets, s3=S3Config.from_env(self.env), prefect_api=self.api)
        return [f"{n} local files", *(sc.summary() for sc in scans)]

    def worker_log_lines(self) -> list[str]:
        return "".join(p.read_text(errors="ignore") for p in sorted((self.home / "logs").glob("*"))).splitlines()


def _gone(rec: dict, name: str, timeout: float = 10.0) -> None:
    """The SIGKILL landed: the process that was alive is gone."""
    deadline = time.monotonic() + timeout
    while stack._alive(rec):
        assert time.monotonic() < deadline, f"{name} survived its SIGKILL"
        time.sleep(0.1)


def _port_closed(port: int, name: str, timeout: float = 15.0) -> None:
    """The killed service's port refuses connections within `timeout` s."""
    deadline = time.monotonic() + timeout
    while stack._port_open(port):
        assert time.monotonic() < deadline, f"{name} still answers on port {port} {timeout:.0f}s after its SIGKILL"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    old = os.environ.get("PYTHONPATH")
    s = Stack(tmp_path_factory.mktemp("stack"))
    try:
        fid = s.start()
        t0 = time.monotonic()
        assert s.wait(fid) == "COMPLETED", s.logs(fid)[-30:]
        s.reference = {"fid": fid, "sha": s.submission_sha(fid), "trained": s.trained(fid),
                       "seconds": time.monotonic() - t0}
        assert len(s.reference["trained"]) == MEMBERS
        yield s
    finally:
        stack.down(s.home) if "s" in locals() else None
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def test_01_worker_sigkilled_at_random_points_then_the_rerun_submits_the_same_file(full):
    """Scenario 1 (long): the worker's whole process tree SIGKILLed at a random point of 3 runs (twice while members
    train, once anywhere in the run); each time the worker comes back and a new run of the deployment starts; the
    last completes with the reference's file, having retrained only members that were in flight."""
    t0 = time.monotonic()
    rng = random.Random(SEED)
    full.clear_caches()
    ref_s = full.reference["seconds"]
    details, fids, in_flight, late = [], [], [], 0
    scale = 1.0                                      # halved after a run that finished before its kill
    phases = ("training", "anywhere", "training")
    while len(in_flight) < len(phases):
        phase = phases[len(in_flight)]
        fid = full.start()
        fids.append(fid)
        _wait_for(lambda: full.state(fid) == "RUNNING", what="the run to start")
        if phase == "training":                      # a member in flight: its work is the interrupted unit
            _wait_for(lambda: full.trained(fid) or full.state(fid) != "RUNNING", what="a training")
            at = rng.uniform(0.0, 0.3) * ref_s * scale
        else:
            at = rng.uniform(0.1, 0.9) * ref_s * scale
        time.sleep(at)
        stored = full.stored_members()
        if full.state(fid) != "RUNNING":
            # not a trial: the run ended before its kill. Its stored results would make every later run a cache
            # hit, so start the sequence over from empty caches and kill earlier
            late += 1
            assert late <= 4, f"{late} runs ended before their kill; {details}"
            details.append(f"run {len(fids)}: {full.wait(fid)} before its kill ({phase}, +{at:.0f}s): not a "
                           f"trial; sequence restarted with kills {scale / 2:g}x as late")
            scale /= 2
            full.clear_caches()
            fids, in_flight = [], []
            continue
        n = full.kill_worker()
        assert full.state(fid) == "RUNNING", "the run left RUNNING before the kill landed"
        started = full.trained(fid)
        in_flight.append(set(started) - stored)
        details.append(f"kill {len(in_flight)} ({phase}, +{at:.0f}s): {n} processes SIGKILLed; trainings started "
                       f"in that run: {', '.join(started) or 'none'}; members stored before the kill: {len(stored)}")
        full.start_service("worker")
    fid = full.start()
    assert full.wait(fid) == "COMPLETED", full.logs(fid)[-30:]
    assert full.submission_sha(fid) == full.reference["sha"]             # the same final submission
    counts = Counter(m for f in fids + [fid] for m in full.trained(f))
    assert set(counts) == set(full.reference["trained"]), counts
    # a member is trained again only once per kill that caught it in flight (started, not yet stored)
    for m, c in counts.items():
        assert c - 1 <= sum(m in fl for fl in in_flight), (m, c, in_flight)
    redone = sum(counts.values()) - MEMBERS
    assert full.verify_all() > 0
    scans = full.no_secrets([m for f in fids + [fid] for m in full.logs(f)])
    last = full.summary(fid)                                              # which stages it ran and reused
    record(Row("1 SIGKILL of the worker (process tree) at random points", "long", len(in_flight),
               "the next run completed; its submission.csv is byte-identical to the undisturbed run's",
               f"{redone} member training(s) beyond the {MEMBERS} needed, each of a member in flight at a kill "
               f"({dict(counts)}); the final run reused {last['reused']} of its {len(last['stages'])} keyed stages",
               "nothing", time.monotonic() - t0, [f"seed {SEED}"] + details + scans))


def _wait_for(pred, timeout: float = 900, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_02_s3_stopped_60s_mid_training_and_mid_upload_the_run_completes(full):
    """Scenario 2 (long): the store is stopped for 60 s once a checkpoint is mirrored, and again once the infer
    stage's upload has begun; the run rides both out (backoff, SEGPIPE_S3_RETRY_SECONDS=90) and completes."""
    t0 = time.monotonic()
    full.clear_caches()
    worker_lines = len(full.worker_log_lines())
    fid = full.start()
    _wait_for(lambda: full.store.list("checkpoints/"), what="a mirrored checkpoint")
    stored = full.stored_members()
    assert len(stored) < MEMBERS, "every member was stored before the outage: not a trial"
    full.restart("s3", after=60, during=lambda: _assert_running(full, fid, "training"))
    rid_part = fid[:8]

    def infer_upload_started():
        return any(rid_part in k and "/infer/" in k for k in full.store.list("runs/"))
    _wait_for(infer_upload_started, what="the infer upload")
    full.restart("s3", after=60, during=lambda: _assert_running(full, fid, "the infer upload"))
    st = full.wait(fid)
    logs = full.logs(fid)
    assert st == "COMPLETED", logs[-30:]
    assert full.submission_sha(fid) == full.reference["sha"]
    # the retry line comes from the flow run (Prefect logs) or from its training subprocesses (the worker's log,
    # only lines written during this test): one criterion over both places the same event is logged
    retries = [m for m in logs + full.worker_log_lines()[worker_lines:]
               if "retry" in m and "SEGPIPE_S3_RETRY_SECONDS" in m]
    assert retries, logs[-30:]
    trained = full.trained(fid)
    assert sorted(trained) == sorted(full.reference["trained"]), trained       # each member trained once
    n = full.verify_all()
    scans = full.no_secrets(logs)
    record(Row("2 S3 stopped 60 s during training and during upload (full stack)", "long", 2,
               "the run completed; submission.csv byte-identical to the undisturbed run's", "none "
               f"({len(trained)} trainings for {MEMBERS} members)", "nothing", time.monotonic() - t0,
               [f"{n} objects verified after the run", f"{len(retries)} retry log line(s)",
                f"{len(stored)} of {MEMBERS} members stored when the first outage began"] + scans))


def _assert_running(full: Stack, fid: str, what: str) -> None:
    """While a service is down: the flow run's worker is alive and the run not over (its summary not written)."""
    assert stack._alive(full.service("worker")), f"the worker died during the outage ({what})"
    assert not any(s.parent.name.endswith(fid[:8]) for s in (full.project / "runs").glob("*/summary.json")), \
        f"the run had finished before the outage ({what})"


def test_03_prefect_server_restarted_mid_run(full):
    """Scenario 3: the Prefect server is stopped while the train tasks run and started again 10 s later."""
    t0 = time.monotonic()
    full.clear_caches()
    fid = full.start()
    _wait_for(lambda: full.store.list("checkpoints/") or any("train-" in n for n in full.task_names(fid)),
              what="training")
    stored = full.stored_members()
    assert len(stored) < MEMBERS, "every member was stored before the restart: not a trial"
    full.restart("prefect", after=10, during=lambda: _assert_running(full, fid, "training"))
    # the same run must ride out the restart: no second run to fall back on
    st = full.wait(fid)
    assert st == "COMPLETED", full.logs(fid)[-30:]
    assert full.submission_sha(fid) == full.reference["sha"]
    trained = full.trained(fid)
    assert sorted(trained) == sorted(full.reference["trained"]), trained       # each member trained once
    full.verify_all()
    details = [f"SIGKILL of the server with {len(stored)} of {MEMBERS} members stored, restarted 10 s later"]
    details += full.no_secrets(full.logs(fid))
    record(Row("3 Prefect server restarted mid-run", "long", 1,
               "the same run completed; submission byte-identical to the undisturbed run's",
               f"{len(trained) - MEMBERS} member training(s) beyond the {MEMBERS} needed", "nothing",
               time.monotonic() - t0, details))


def test_06_two_full_runs_at_once(full):
    """Scenario 6 (long): two runs of the deployment started together on the same stack; both complete with the
    same file, their prefixes are disjoint and verify, shared content-keyed results are written once."""
    t0 = time.monotonic()
    full.clear_caches()
    a, b = full.start(), full.start()
    sa, sb = full.wait(a), full.wait(b)
    assert (sa, sb) == ("COMPLETED", "COMPLETED"), (full.logs(a)[-20:], full.logs(b)[-20:])
    assert full.submission_sha(a) == full.submission_sha(b) == full.reference["sha"]
    sum_a, sum_b = full.summary(a), full.summary(b)
    ra, rb = sum_a["artifacts"], sum_b["artifacts"]
    ka, kb = verify_prefix(full.store, ra), verify_prefix(full.store, rb)
    assert ka and kb and not set(ka) & set(kb)                            # neither run wrote under the other's
    # the same stages in both; a stage one run served from the other's stored result points at that run's files,
    # which must be whole: every stage's files, wherever they live, read back with their checksums
    assert [r["label"] for r in sum_a["stages"]] == [r["label"] for r in sum_b["stages"]]
    bucket_url = full.store.url("")
    for row in sum_a["stages"] + sum_b["stages"]:
        assert verify_prefix(full.store, row["artifacts"][len(bucket_url):]), row
    shared = sum(r["cached"] for r in sum_a["stages"] + sum_b["stages"])
    results = verify_prefix(full.store, "results")
    assert sum(k.endswith("/DONE") for k in results) == MEMBERS
    logs = full.logs(a) + full.logs(b)
    overwritten = [m for m in logs if "already exists with different content" in m]
    scans = full.no_secrets(logs)
    record(Row("6 two full runs at the same time on one stack", "long", 1,
               "both completed with byte-identical submissions; disjoint run prefixes, every key verified; each "
               f"member's cached result written once ({len(overwritten)} conflicting writes); {shared} of "
               f"{len(sum_a['stages']) * 2} stage results served from the other run's store, all verified",
               f"{len(full.trained(a)) + len(full.trained(b)) - MEMBERS} training(s) beyond {MEMBERS} (a member "
               "waiting for a device slot finds the other run's stored result)", "nothing", time.monotonic() - t0, scans))
