"""A real local Ray cluster for the tests: a head node and one extra worker node, each its own `ray start --block`
process group, CPU only, every port chosen free; stopped by killing exactly those groups (never `ray stop`, which
would stop every Ray on the machine).

`--node-ip-address=127.0.0.1` is passed, but Ray 2.60 replaces a loopback node address with the machine's own for a
multi-node cluster (`resolve_ip_for_localhost`) and its GCS and raylets listen beyond loopback; the only switch that
keeps Ray on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) refuses a second node. So the cluster lives on random
ports for the test's couple of minutes only."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")


def _free_ports(n: int, avoid: set[int] = frozenset()) -> list[int]:
    """n distinct free ports, none in `avoid` (the worker port ranges: Ray refuses a port two components share)."""
    socks, ports = [], []
    while len(ports) < n:         # hold them all open at once so no two are the same
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        if s.getsockname()[1] not in avoid:
            ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _free_range(width: int) -> int:
    """First port of `width` consecutive free ports (the node's worker ports)."""
    import random
    while True:
        base = random.randrange(46000, 60000)
        try:
            socks = []
            for p in range(base, base + width):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


@dataclass
class RayCluster:
    address: str                       # GCS address host:port, what `fanout.ray_address` takes
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def stop(self, timeout: float = 5.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs:
                try:
                    os.killpg(proc.pid, sig)       # the group `start_new_session` made: that node's processes
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            for proc in self.procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(p.poll() is not None for p in self.procs):
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cluster(cwd: Path | list[Path], env: dict[str, str], cpus_per_node: int = 1,
                  timeout: float = 120.0) -> RayCluster:
    """Head + one worker node; nodes start in `cwd` (one folder each when a list: nodes of their own machines)
    with `env` (how a real cluster's nodes get the project and their S3 credentials). Returns once both nodes are
    alive."""
    cwds = list(cwd) if isinstance(cwd, (list, tuple)) else [cwd, cwd]
    ray = str(Path(sys.executable).parent / "ray")
    worker_bases = [_free_range(40)]                          # each node's worker ports, chosen first
    while len(worker_bases) < 2:
        base = _free_range(40)
        if abs(base - worker_bases[0]) >= 40:
            worker_bases.append(base)
    reserved = {p for b in worker_bases for p in range(b, b + 40)}
    gcs, client = _free_ports(2, reserved)
    reserved |= {gcs, client}
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))    # short: Ray's unix sockets live under it
    cluster = RayCluster(f"127.0.0.1:{gcs}", temp_dir)
    common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--num-gpus=0",
              "--object-store-memory=100000000", "--disable-usage-stats", "--log-style=record"]
    nodes = [["--head", f"--port={gcs}", f"--ray-client-server-port={client}", "--include-dashboard=false",
              f"--temp-dir={temp_dir}"],
             [f"--address={cluster.address}"]]
    try:
        for i, role in enumerate(nodes):
            ports = _free_ports(len(PORT_FLAGS), reserved)
            reserved |= set(ports)
            base = worker_bases[i]
            cmd = [ray, "start", *role, *common, *(f"{f}={p}" for f, p in zip(PORT_FLAGS, ports)),
                   f"--min-worker-port={base}", f"--max-worker-port={base + 39}"]
            log = open(temp_dir / f"node{i}.log", "wb")
            cluster.procs.append(subprocess.Popen(cmd, cwd=cwds[i], env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True))
            _wait_port(cluster, ports[0], timeout)          # this node's raylet is up
        _wait_nodes(cluster, len(nodes), timeout)         # and both registered with the head
    except BaseException:
        cluster.stop()
        raise
    return cluster


def alive_nodes(address: str) -> list[str]:
    """Node ids of the cluster's live nodes, asked of the cluster itself (a short-lived driver process)."""
    code = ("import ray, json; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_alive(cluster: RayCluster) -> None:
    for i, proc in enumerate(cluster.procs):
        if proc.poll() is not None:
            raise RuntimeError(f"ray node {i} exited with {proc.returncode}:\n"
                               + (cluster.temp_dir / f"node{i}.log").read_text(errors="replace")[-3000:])


def _host_ip() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _wait_port(cluster: RayCluster, port: int, timeout: float) -> None:
    """Cheap: a socket, not a driver process (importing ray takes seconds on a busy machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(cluster)
        for host in ("127.0.0.1", _host_ip()):      # Ray may bind the machine's address only (see above)
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((host, port)) == 0:
                    return
        time.sleep(0.3)
    raise TimeoutError(f"ray node not listening on port {port} after {timeout}s")


def _wait_nodes(cluster: RayCluster, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        _check_alive(cluster)
        try:
            if len(alive_nodes(cluster.address)) >= n:
                return
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            last = str(e)
        time.sleep(1)
    raise TimeoutError(f"{n} ray nodes not alive after {timeout}s: {last}")
