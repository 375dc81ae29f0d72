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
from pathlib import Path

import pytest
import requests

from segpipe import stack
from segpipe.storage import ArtifactStore, S3Config
from tests.conftest import free_port_block
from tests.faults.helpers import TRAINED, Row, assert_no_secrets, record, verify_prefix
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
        services = {self.service(n)["pid"] for n in ("s3", "prefect", "leaderboard")}
        os.killpg(rec["pid"], signal.SIGKILL)
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

    def restart(self, name: str, after: float = 0.0) -> None:
        stack._stop(self.service(name), timeout=10)
        time.sleep(after)
        stack.up(self.home, self.ports, services=[name], cwd=self.project, labels=self.project / "data/leaderboard")

    def clear_caches(self) -> None:
        """Forget stored stage results (prefect-results/), finished members (results/) and resume state
        (checkpoints/): the next run does everything."""
        for prefix in ("prefect-results/", "results/", "checkpoints/"):
            for k in self.store.list(prefix):
                self.store.delete(k)

    def verify_all(self) -> int:
        return sum(len(verify_prefix(self.store, p)) for p in ("runs", "results", "checkpoints"))

    def no_secrets(self, texts: list[str]) -> int:
        secrets = [self.env[k] for k in ("AWS_SECRET_ACCESS_KEY", "SEGPIPE_LEADERBOARD_KEY",
                                         "SEGPIPE_LEADERBOARD_ABLATION_KEY")]
        return assert_no_secrets(secrets, [self.home / "logs", self.project / "runs"], texts)


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
    details, fids, kills = [], [], 0
    for phase in ("training", "anywhere", "training", "anywhere"):
        if kills == 3:
            break
        fid = full.start()
        fids.append(fid)
        _wait_for(lambda: full.state(fid) == "RUNNING", what="the run to start")
        if phase == "training":                      # a member in flight: its work is the interrupted unit
            _wait_for(lambda: full.trained(fid) or full.state(fid) != "RUNNING", what="a training")
            at = rng.uniform(0.0, 0.3) * ref_s
        else:
            at = rng.uniform(0.1, 0.9) * ref_s
        time.sleep(at)
        if full.state(fid) == "COMPLETED":
            details.append(f"run {len(fids)}: completed before its kill ({phase}, +{at:.0f}s)")
            continue
        n = full.kill_worker()
        kills += 1
        started = full.trained(fid)
        details.append(f"kill {kills} ({phase}, +{at:.0f}s): {n} processes; trainings started in that run: "
                       f"{', '.join(started) or 'none'}; members stored so far: "
                       f"{sum(k.endswith('/DONE') for k in full.store.list('results/'))}")
        full.restart("worker")
    fid = full.start()
    assert full.wait(fid) == "COMPLETED", full.logs(fid)[-30:]
    assert full.submission_sha(fid) == full.reference["sha"]             # the same final submission
    all_trained = [m for f in fids + [fid] for m in full.trained(f)]
    redone = len(all_trained) - MEMBERS
    assert redone <= MEMBERS * kills, all_trained                         # at most the members in flight
    assert full.verify_all() > 0
    full.no_secrets([m for f in fids + [fid] for m in full.logs(f)])
    last = full.summary(fid)                                              # which stages it ran and reused
    record(Row("1 SIGKILL of the worker (process tree) at random points", "long", kills,
               "the next run completed; its submission.csv is byte-identical to the undisturbed run's",
               f"{redone} member training(s) beyond the {MEMBERS} needed (only members in flight at a kill); the "
               f"final run reused {last['reused']} of its {len(last['stages'])} keyed stages", "nothing",
               time.monotonic() - t0, [f"seed {SEED}"] + details))


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
    fid = full.start()
    _wait_for(lambda: full.store.list("checkpoints/"), what="a mirrored checkpoint")
    full.restart("s3", after=60)
    rid_part = fid[:8]

    def infer_upload_started():
        return any(rid_part in k and "/infer/" in k for k in full.store.list("runs/"))
    _wait_for(infer_upload_started, what="the infer upload")
    full.restart("s3", after=60)
    st = full.wait(fid)
    logs = full.logs(fid)
    assert st == "COMPLETED", logs[-30:]
    assert full.submission_sha(fid) == full.reference["sha"]
    assert any("retry" in m and "SEGPIPE_S3_RETRY_SECONDS" in m for m in logs) or \
        "SEGPIPE_S3_RETRY_SECONDS" in "".join(p.read_text(errors="ignore") for p in (full.home / "logs").glob("*"))
    trained = full.trained(fid)
    assert len(trained) == MEMBERS, trained
    n = full.verify_all()
    full.no_secrets(logs)
    record(Row("2 S3 stopped 60 s during training and during upload (full stack)", "long", 2,
               "the run completed; submission.csv byte-identical to the undisturbed run's", "none "
               f"({len(trained)} trainings for {MEMBERS} members)", "nothing", time.monotonic() - t0,
               [f"{n} objects verified after the run"]))


def test_03_prefect_server_restarted_mid_run(full):
    """Scenario 3: the Prefect server is stopped while the train tasks run and started again 10 s later."""
    t0 = time.monotonic()
    full.clear_caches()
    fid = full.start()
    _wait_for(lambda: full.store.list("checkpoints/") or any("train-" in n for n in full.task_names(fid)),
              what="training")
    full.restart("prefect", after=10)
    st = full.wait(fid)
    details = [f"first run ended {st}"]
    runs, trained = [fid], full.trained(fid)
    if st != "COMPLETED":                       # the orchestrator lost the run: a new run must finish the work
        if not stack._alive(full.service("worker")):
            full.restart("worker")
        fid2 = full.start()
        runs.append(fid2)
        assert full.wait(fid2) == "COMPLETED", full.logs(fid2)[-30:]
        trained += full.trained(fid2)
        details.append("a new run of the deployment completed")
        fid = fid2
    assert full.submission_sha(fid) == full.reference["sha"]
    full.verify_all()
    full.no_secrets([m for f in runs for m in full.logs(f)])
    record(Row("3 Prefect server restarted mid-run", "long", 1,
               "; ".join(details) + "; submission byte-identical to the undisturbed run's",
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
    full.no_secrets(logs)
    record(Row("6 two full runs at the same time on one stack", "long", 1,
               "both completed with byte-identical submissions; disjoint run prefixes, every key verified; each "
               f"member's cached result written once ({len(overwritten)} conflicting writes); {shared} of "
               f"{len(sum_a['stages']) * 2} stage results served from the other run's store, all verified",
               f"{len(full.trained(a)) + len(full.trained(b)) - MEMBERS} training(s) beyond {MEMBERS} (a member "
               "waiting for a device slot finds the other run's stored result)", "nothing", time.monotonic() - t0))
