"""A flow run whose process dies is marked Crashed by the automation `segpipe stack up` creates, the failure webhook
fires (a local HTTP receiver), and library logs reach the Prefect run log. Real Prefect server, real SIGKILL.

Takes ~3 minutes (heartbeats are 30 s at the least, and three must be missed): `make test-ops`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from segpipe import stack
from tests.conftest import free_port_block
from tests.tiny import REPO

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.ops]

FLOW = textwrap.dedent('''
    import logging, time
    from prefect import flow
    import flows.monitoring     # as flows/full_pipeline.py does: the library's INFO lines reach the run log

    @flow(name="zombie-probe")
    def probe():
        logging.getLogger("segpipe.probe").info("library log line %s", "reaches the run log")
        logging.getLogger("pipelines.probe").info("pipelines log line too")
        time.sleep(900)        # killed long before this ends

    probe()
''')


class Receiver(BaseHTTPRequestHandler):
    posts: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Receiver.posts.append(json.loads(body or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def _wait(what: str, fn, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_killed_run_is_crashed_and_notified(tmp_path):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/alerts"
    base = free_port_block(11)
    ports = {"s3": base, "prefect": base + 9, "leaderboard": base + 10}
    home = tmp_path / "home"
    proc = None
    try:
        stack.up(home, ports, ["prefect"], cwd=REPO, alert_webhook=hook)
        api = f"http://127.0.0.1:{ports['prefect']}/api"
        names = {a["name"] for a in requests.post(f"{api}/automations/filter", json={}, timeout=10).json()}
        assert {"segpipe: crash flow runs that stopped sending heartbeats",
                "segpipe: notify on failed or crashed flow runs"} <= names
        # the webhook URL is one of the block's secrets: neither the automations nor the block show it
        assert hook not in json.dumps(requests.post(f"{api}/automations/filter", json={}, timeout=10).json())
        blocks = requests.post(f"{api}/block_documents/filter", json={}, timeout=10).json()
        assert any(b["name"] == "segpipe-alerts" for b in blocks) and hook not in json.dumps(blocks)

        # a flow run as the stack's worker would start it: the worker's flow-run environment
        (tmp_path / "probe.py").write_text(FLOW)
        env = {**os.environ, **stack.FLOW_RUN_ENV, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, str(tmp_path / "probe.py")], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        def running():
            runs = requests.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
            return next((r for r in runs if r["state_type"] == "RUNNING"), None)
        run = _wait("the probe flow run to be Running", running, 120)

        def heartbeat():
            ev = requests.post(f"{api}/events/filter", timeout=10, json={"filter": {
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "any_resource": {"id": [f"prefect.flow-run.{run['id']}"]}}}).json()
            return ev.get("events")
        _wait("a heartbeat", heartbeat, 60)

        # library loggers reach the run log (PREFECT_LOGGING_EXTRA_LOGGERS)
        def logs():
            rows = requests.post(f"{api}/logs/filter", timeout=10,
                                 json={"logs": {"flow_run_id": {"any_": [run["id"]]}}}).json()
            return {r["name"] for r in rows if "log line" in r["message"]}
        assert _wait("the library's log lines", logs, 30) >= {"segpipe.probe", "pipelines.probe"}

        os.killpg(proc.pid, signal.SIGKILL)       # the worker's machine is gone: no Crashed state is reported
        proc.wait()

        def crashed():
            r = requests.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()
            return r if r["state_type"] == "CRASHED" else None
        final = _wait("the automation to mark the run Crashed", crashed, 240, every=5)
        assert "no heartbeat" in final["state"]["message"]

        post = _wait("the failure webhook", lambda: [p for p in Receiver.posts if run["name"] in p.get("subject", "")],
                     60)
        assert "Crashed" in post[0]["subject"] and run["id"] in post[0]["body"]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stack.down(home)
        receiver.shutdown()
