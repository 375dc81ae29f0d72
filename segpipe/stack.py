"""The local services: SeaweedFS S3, the Prefect server + a worker, the leaderboard emulator.

`up` is idempotent and binds everything to 127.0.0.1. Each service runs as a detached process
(own session, log file under `<home>/logs/`); its pid and start time go into `<home>/state.json`
so `down` stops exactly the processes `up` started, never a stranger that reused a pid or a port.
Credentials are generated once and kept in `<home>/credentials.env` (mode 0600); the worker and
the leaderboard get them through their environment, SeaweedFS through 0600 files (its S3 identities; security.toml's
JWT keys and gRPC certificates, which lock its internal ports to all but weed itself), DVC through
.dvc/config.local (0600), the alert webhook's installer through its environment: secrets never
pass through a command line (`ps` shows argv to every local user), Prefect parameters,
params.yaml, logs or git.
"""

from __future__ import annotations

import configparser
import importlib.util
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import requests

from segpipe.storage import S3Config, ensure_bucket

log = logging.getLogger(__name__)

SERVICES = ("s3", "prefect", "worker", "leaderboard")      # start order; `down` stops in reverse
HOST = "127.0.0.1"
DEFAULT_PORTS = {"s3": 8333, "prefect": 4200, "leaderboard": 8765}
PORT_ENV = {"s3": "SEGPIPE_S3_PORT", "prefect": "SEGPIPE_PREFECT_PORT",
            "leaderboard": "SEGPIPE_LEADERBOARD_PORT", "weed_base": "SEGPIPE_WEED_BASE_PORT"}
# weed mini's internal services; bound to 127.0.0.1 they collide unless each gets its own port.
# They take weed_base, weed_base+1, ... (default s3+1); weed adds 10000 for each gRPC port.
WEED_INTERNAL = ("master", "volume", "filer", "admin", "iceberg", "lance", "webdav")
WEED_FLAGS = {"master": "-master.port", "volume": "-volume.port", "filer": "-filer.port",
              "admin": "-admin.port", "iceberg": "-s3.port.iceberg", "lance": "-s3.port.lance",
              "webdav": "-webdav.port"}
# weed mini sizes its store from the free disk at start (11 volumes of 1 GiB on a disk with 12 GiB free) and then
# answers InternalError to every put once those fill; volumes are not preallocated, so name a ceiling far above any
# disk and let the disk itself be the limit
WEED_STORE_FLAGS = ("-master.volumeSizeLimitMB=1024", "-volume.max=1000")
# security.toml's JWT keys: with them the volume server takes only master-signed writes and reads, and the filer's
# HTTP API only requests the S3 gateway signed, so the internal ports no longer bypass the S3 credentials. weed reads
# ./security.toml from its working directory first (then ~/.seaweedfs/, /etc/seaweedfs/), so the stack starts it in
# the folder holding the file: its command line stays the one docker-compose.yml shares (the global -config_dir
# flag would change it), and the keys stay out of the environment (WEED_JWT_* variables would work too, but would
# have to live in credentials.env, which users source into every shell).
WEED_JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
# JWTs guard only the HTTP ports; the gRPC ones (each HTTP port + 10000) hand out write tokens to any caller
# (`weed filer.copy` writes a file through them), so they take mutual TLS: one certificate for every component,
# from a CA whose key is dropped after signing, so no other certificate can ever be issued for them
WEED_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client")
WEED_CERT_DAYS = 3650                 # renewed on the `up` that finds fewer than 30 days left
BUCKETS = ("segpipe", "dvc")          # artifacts; the DVC remote (s3://dvc/segpipe)
WORK_POOL = "segpipe"
WORKER_LIMIT = 4                      # concurrent flow runs: a nightly run plus a manual one, with room
DVC_REMOTE = "storage"
DVC_REMOTE_URL = "s3://dvc/segpipe"
# the ablation key's daily limit on the local leaderboard: ~6 rows a run, so a dozen runs a day still fit
ABLATION_DAILY_LIMIT = 100
START_TIMEOUT = {"s3": 60.0, "prefect": 150.0, "worker": 90.0, "leaderboard": 60.0}
# every flow run the worker starts: a heartbeat every 30 s (Prefect's minimum; its default is 180 s), which the
# zombie-run automation watches, and the library's loggers in the Prefect run log
FLOW_RUN_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "PREFECT_LOGGING_EXTRA_LOGGERS": "segpipe,pipelines"}
# the worker asks for scheduled runs every 2 s (Prefect's default, 10 s, is on every run's critical path)
WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "2"}
ALERT_WEBHOOK_ENV = "SEGPIPE_ALERT_WEBHOOK"   # where failed/crashed runs are posted (none: no notification)
# the host a bare leaderboard key was issued for (segpipe.leaderboard.KEY_HOST_ENV); the stack's keys have none
LEADERBOARD_HOST_ENV = "SEGPIPE_LEADERBOARD_HOST"


class StackError(RuntimeError):
    """A service cannot start or stop; the message names the service, the port and what to do."""


# ---- home, ports, state ------------------------------------------------------------------------

def stack_home(home: Path | str | None = None) -> Path:
    """`home`, else $SEGPIPE_HOME, else ./.segpipe (git-ignored)."""
    return Path(home or os.environ.get("SEGPIPE_HOME") or ".segpipe").resolve()


def resolve_ports(ports: dict[str, int] | None = None, env: dict | None = None) -> dict[str, int]:
    """Public ports (s3, prefect, leaderboard) and weed's internal ones: defaults < env < `ports`."""
    env = os.environ if env is None else env
    ports = {k: int(v) for k, v in (ports or {}).items() if v is not None}
    out = {k: int(ports.get(k) or env.get(PORT_ENV[k]) or v) for k, v in DEFAULT_PORTS.items()}
    base = int(ports.get("weed_base") or env.get(PORT_ENV["weed_base"]) or out["s3"] + 1)
    for i, name in enumerate(WEED_INTERNAL):
        out[f"weed_{name}"] = int(ports.get(f"weed_{name}") or base + i)
    unknown = set(ports) - set(out) - {"weed_base"}
    if unknown:
        raise StackError(f"unknown port names {sorted(unknown)}; valid: {sorted(out)} and weed_base")
    for name in ("s3", *(f"weed_{n}" for n in WEED_INTERNAL)):
        if out[name] + 10000 > 65535:   # weed binds gRPC at port+10000
            raise StackError(f"port {out[name]} ({name}) too high: SeaweedFS also binds port+10000 for gRPC")
    return out


def _state_path(home: Path) -> Path:
    return home / "state.json"


def _load_state(home: Path) -> dict:
    p = _state_path(home)
    return json.loads(p.read_text()) if p.is_file() else {"services": {}, "ports": {}}


def _atomic_text(path: Path, text: str, mode: int = 0o644, tmp_dir: Path | None = None) -> None:
    """Write `path` whole or not at all; the temp file (in `tmp_dir`, default beside `path`) is 0600 from birth."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.")   # mkstemp: 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_state(home: Path, state: dict) -> None:
    _atomic_text(_state_path(home), json.dumps(state, indent=2, sort_keys=True))


# ---- credentials ---------------------------------------------------------------------------------

def load_env(home: Path | str | None = None) -> dict[str, str]:
    """Parse `<home>/credentials.env` (`export KEY=VALUE` lines) into a dict; {} if absent."""
    path = stack_home(home) / "credentials.env"
    if not path.is_file():
        return {}
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        env[key.strip()] = value.strip().strip("'\"")
    return env


def _write_credentials(home: Path, ports: dict[str, int]) -> dict[str, str]:
    """Keep the generated secrets, refresh the URLs (ports may change between `up`s)."""
    old = load_env(home)
    env = {
        "AWS_ACCESS_KEY_ID": old.get("AWS_ACCESS_KEY_ID") or "SEGPIPE" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": old.get("AWS_SECRET_ACCESS_KEY") or secrets.token_hex(24),
        "SEGPIPE_S3_ENDPOINT": f"http://{HOST}:{ports['s3']}",
        "SEGPIPE_S3_BUCKET": "segpipe",
        "SEGPIPE_LEADERBOARD_KEY": old.get("SEGPIPE_LEADERBOARD_KEY") or secrets.token_urlsafe(24),
        # the ablation report's own key: one submission per row, on its own daily limit (ABLATION_DAILY_LIMIT)
        "SEGPIPE_LEADERBOARD_ABLATION_KEY": old.get("SEGPIPE_LEADERBOARD_ABLATION_KEY") or secrets.token_urlsafe(24),
        "PREFECT_API_URL": f"http://{HOST}:{ports['prefect']}/api",
    }
    text = "# written by `segpipe stack up`: secrets, never commit; load with `source` this file\n"
    text += "".join(f"export {k}={v}\n" for k, v in env.items())
    _atomic_text(home / "credentials.env", text, mode=0o600)
    return env


def _dig(tree: dict, dotted: str) -> dict:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree if isinstance(tree, dict) else {}


def _weed_tls(folder: Path) -> dict[str, Path]:
    """A CA certificate and one client+server certificate for all of weed's gRPC, kept until 30 days before expiry."""
    from datetime import datetime, timedelta, timezone     # cryptography comes with prefect; only `up` needs it
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(mode=0o700, exist_ok=True)
    files = {"ca": folder / "ca.crt", "cert": folder / "weed.crt", "key": folder / "weed.key"}
    now = datetime.now(timezone.utc)
    if all(f.is_file() for f in files.values()):
        cert = x509.load_pem_x509_certificate(files["cert"].read_bytes())
        if cert.not_valid_after_utc - now > timedelta(days=30):
            return files

    def build(subject: str, issuer: str, public_key, days: int) -> x509.CertificateBuilder:
        name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])   # noqa: E731
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days)))

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (build("segpipe-weed-ca", "segpipe-weed-ca", ca_key.public_key(), WEED_CERT_DAYS + 1)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (build("segpipe-weed", "segpipe-weed-ca", key.public_key(), WEED_CERT_DAYS)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    _atomic_text(files["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()).decode(), mode=0o600)
    _atomic_text(files["cert"], cert.public_bytes(pem).decode(), mode=0o600)
    _atomic_text(files["ca"], ca.public_bytes(pem).decode(), mode=0o600)
    return files


def write_weed_security(folder: Path) -> Path:
    """`<folder>/security.toml` (0600 from birth): weed's JWT keys and admin UI password, generated once and kept
    across `up`s, and its gRPC mTLS certificates (`<folder>/tls/`)."""
    path = folder / "security.toml"
    try:
        old = tomllib.loads(path.read_text()) if path.is_file() else {}
    except tomllib.TOMLDecodeError as e:
        raise StackError(f"{path} is not valid TOML ({e}); delete it and run `segpipe stack up` again "
                         "(fresh keys are harmless: weed's tokens live 10 seconds)") from None
    text = "# written by `segpipe stack up`: SeaweedFS JWT keys, secrets, never commit\n"
    for section in WEED_JWT_SECTIONS:
        key = _dig(old, section).get("key") or secrets.token_hex(32)
        text += f'\n[{section}]\nkey = "{key}"\n'
    text += "\n[access]\nui = false\n"   # the volume server's status page: no UI on an internal port
    # the admin UI (weed_admin port) browses and downloads every object through weed's own keys: a password, kept
    password = _dig(old, "admin").get("password") or secrets.token_urlsafe(24)
    text += f'\n[admin]\nuser = "segpipe"\npassword = "{password}"\n'
    tls = _weed_tls(folder / "tls")
    q = {k: json.dumps(str(v)) for k, v in tls.items()}   # a JSON string is a TOML basic string: the path quoted
    text += f'\n[grpc]\nca = {q["ca"]}\n'
    text += "".join(f'\n[grpc.{c}]\ncert = {q["cert"]}\nkey = {q["key"]}\n' for c in WEED_GRPC_COMPONENTS)
    _atomic_text(path, text, mode=0o600)
    return path


def _s3_config(env: dict[str, str], bucket: str = "segpipe") -> S3Config:
    return S3Config(env["SEGPIPE_S3_ENDPOINT"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], bucket)


# ---- processes -----------------------------------------------------------------------------------

def _start_time(pid: int) -> int | None:
    """Kernel start time of `pid` (identifies the process across pid reuse); None if gone/zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)           # reap it if it is our own dead child
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(rec: dict | None) -> bool:
    return bool(rec) and _start_time(rec["pid"]) == rec["start_time"]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _spawn(home: Path, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> dict:
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    logfile = logs / f"{name}.log"
    with open(logfile, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} segpipe stack up: {cmd[0]} {' '.join(cmd[1:3])} ...\n"
                  .encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, start_new_session=True)   # own group: `down` kills it whole
    start = _start_time(proc.pid)
    return {"pid": proc.pid, "start_time": start, "log": str(logfile), "cmd": cmd[:2]}


def _log_tail(rec: dict, lines: int = 15) -> str:
    try:
        return "\n".join(Path(rec["log"]).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(name: str, rec: dict, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(rec):
            raise StackError(f"{name} exited during start-up; last lines of {rec['log']}:\n{_log_tail(rec)}")
        if ready():
            return
        time.sleep(0.3)
    raise StackError(f"{name} did not become ready in {timeout:.0f}s; see {rec['log']}:\n{_log_tail(rec)}")


def _stop(rec: dict, timeout: float = 15.0) -> bool:
    """SIGTERM the process group `up` created, SIGKILL after `timeout`; only if it is still ours."""
    if not _alive(rec):
        return False
    pid = rec["pid"]
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)       # start_new_session made pid the group id
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _start_time(pid) is None:
                return True
            time.sleep(0.2)
    return _start_time(pid) is None


def _bin(name: str) -> str:
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    which = shutil.which(name)
    if not which:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH: install the project (`make setup`)")
    return which


def _ensure_free(service: str, ports: dict[str, int]) -> None:
    for label, port in ports.items():
        if _port_open(port):
            flag = {"s3": "--s3-port", "prefect": "--prefect-port", "leaderboard": "--leaderboard-port"}.get(
                label, "--weed-base-port")
            raise StackError(
                f"port {port} ({service}: {label}) is already in use by a process `segpipe stack up` did not "
                f"start; stop it, or choose another port ({flag} or {PORT_ENV.get(label, PORT_ENV['weed_base'])})"
            )


# ---- the services --------------------------------------------------------------------------------

def prefect_env(prefect_home: Path, api_url: str) -> dict[str, str]:
    """What the Prefect server, the worker and `prefect` commands need: one home, one SQLite file, no analytics."""
    return {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def _prefect_env(home: Path, ports: dict[str, int]) -> dict[str, str]:
    prefect_home = home / "prefect"
    prefect_home.mkdir(exist_ok=True)
    return prefect_env(prefect_home, f"http://{HOST}:{ports['prefect']}/api")


# The services' command lines, shared with docker-compose.yml (tests/test_compose.py holds them equal).

def weed_command(weed: str, data_dir: Path | str, ports: dict[str, int], *, ip: str = HOST, bind: str = HOST,
                 s3_config: Path | str | None = None) -> list[str]:
    """`weed mini` with every internal port explicit (bound to one address they collide otherwise)."""
    return [weed, "mini", f"-dir={data_dir}", f"-ip={ip}", f"-ip.bind={bind}", f"-s3.port={ports['s3']}",
            *([f"-s3.config={s3_config}"] if s3_config else []), *WEED_STORE_FLAGS,
            *(f"{WEED_FLAGS[n]}={ports[f'weed_{n}']}" for n in WEED_INTERNAL)]


def prefect_server_command(prefect: str, host: str, port: int) -> list[str]:
    return [prefect, "server", "start", "--host", host, "--port", str(port), "--analytics-off"]


def worker_command(prefect: str, name: str) -> list[str]:
    return [prefect, "worker", "start", "--pool", WORK_POOL, "--type", "process", "--limit", str(WORKER_LIMIT),
            "--name", name]


def leaderboard_command(python: str, host: str, port: int, labels: Path | str, state_dir: Path | str) -> list[str]:
    return [python, "-m", "segpipe.leaderboard", "serve", "--host", host, "--port", str(port),
            "--labels", str(labels), "--state-dir", str(state_dir)]


def leaderboard_env(env: dict[str, str]) -> dict[str, str]:
    """The team's key, and the ablation key on its own daily limit."""
    return {"SEGPIPE_LEADERBOARD_KEYS": env["SEGPIPE_LEADERBOARD_KEY"],
            "SEGPIPE_LEADERBOARD_KEY_LIMITS": f"{env['SEGPIPE_LEADERBOARD_ABLATION_KEY']}:{ABLATION_DAILY_LIMIT}"}


def _start_s3(home: Path, ports: dict[str, int], env: dict[str, str], cwd: Path) -> dict:
    weed_ports = {"s3": ports["s3"], **{n: ports[f"weed_{n}"] for n in WEED_INTERNAL}}
    _ensure_free("s3", weed_ports)
    _ensure_free("s3", {f"{k} gRPC": p + 10000 for k, p in weed_ports.items()})
    root = home / "s3"
    (root / "data").mkdir(parents=True, exist_ok=True)
    identity = {"identities": [{"name": "segpipe",
                                "credentials": [{"accessKey": env["AWS_ACCESS_KEY_ID"],
                                                 "secretKey": env["AWS_SECRET_ACCESS_KEY"]}],
                                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    _atomic_text(root / "s3.json", json.dumps(identity), mode=0o600)
    write_weed_security(root)
    cmd = weed_command(_bin("weed"), root / "data", ports, s3_config=root / "s3.json")
    # cwd: weed reads ./security.toml; a WEED_* variable (WEED_JWT_SIGNING_KEY, ...) would override what it says
    wenv = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}
    rec = _spawn(home, "s3", cmd, wenv, root)
    _wait("s3", rec, lambda: _port_open(ports["s3"]), START_TIMEOUT["s3"])
    return rec


def _after_s3(env: dict[str, str]) -> None:
    for bucket in BUCKETS:   # the port answers before the filer is ready: ensure_bucket retries
        ensure_bucket(_s3_config(env), bucket, retry_seconds=START_TIMEOUT["s3"])


def _prefect_healthy(port: int) -> bool:
    try:
        return requests.get(f"http://{HOST}:{port}/api/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _start_prefect(home: Path, ports: dict[str, int], env: dict[str, str], cwd: Path) -> dict:
    _ensure_free("prefect", {"prefect": ports["prefect"]})
    penv = {**os.environ, **_prefect_env(home, ports)}
    cmd = prefect_server_command(_bin("prefect"), HOST, ports["prefect"])
    rec = _spawn(home, "prefect", cmd, penv, cwd)
    _wait("prefect", rec, lambda: _prefect_healthy(ports["prefect"]), START_TIMEOUT["prefect"])
    return rec


def _ensure_work_pool(home: Path, ports: dict[str, int], cwd: Path) -> None:
    api = f"http://{HOST}:{ports['prefect']}/api"
    if requests.get(f"{api}/work_pools/{WORK_POOL}", timeout=10).status_code == 200:
        return
    # the CLI fills in the process worker's base job template, which a bare API call would not
    res = subprocess.run([_bin("prefect"), "work-pool", "create", WORK_POOL, "--type", "process"],
                         env={**os.environ, **_prefect_env(home, ports)}, cwd=cwd, capture_output=True,
                         text=True, timeout=120)
    if res.returncode != 0 and "already exists" not in res.stdout + res.stderr:
        raise StackError(f"creating work pool {WORK_POOL!r} failed:\n{res.stdout}{res.stderr}")


def _worker_online(ports: dict[str, int], name: str) -> bool:
    try:
        r = requests.post(f"http://{HOST}:{ports['prefect']}/api/work_pools/{WORK_POOL}/workers/filter",
                          json={}, timeout=5)
        return r.ok and any(w.get("name") == name for w in r.json())
    except requests.RequestException:
        return False


def _start_worker(home: Path, ports: dict[str, int], env: dict[str, str], cwd: Path) -> dict:
    if not _prefect_healthy(ports["prefect"]):
        raise StackError(f"the worker needs the Prefect server on port {ports['prefect']}: "
                         "`segpipe stack up --only prefect,worker`")
    _ensure_work_pool(home, ports, cwd)
    name = f"segpipe-{socket.gethostname()}-{ports['prefect']}"
    # flow runs inherit this environment: that is how they get the S3 credentials, not via parameters
    wenv = {**os.environ, **env, **_prefect_env(home, ports), **FLOW_RUN_ENV, **WORKER_ENV, "SEGPIPE_HOME": str(home)}
    # flow runs shell out to `dvc` and `python -m pipelines.*`: the project's own tools come first on PATH,
    # whether or not the shell that ran `stack up` had the virtualenv activated
    wenv["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), wenv.get("PATH", "")])
    # the worker's SEGPIPE_LEADERBOARD_KEY is the emulator's key made above: a host recorded in the shell that ran
    # `up` is for some other key, and must not let this one go there (a key with no host goes to loopback only)
    wenv.pop(LEADERBOARD_HOST_ENV, None)
    cmd = worker_command(_bin("prefect"), name)
    rec = _spawn(home, "worker", cmd, wenv, cwd)
    _wait("worker", rec, lambda: _worker_online(ports, name), START_TIMEOUT["worker"])
    return rec


def _install_automations(home: Path, ports: dict[str, int], cwd: Path, webhook: str | None) -> None:
    """The project's Prefect automations (crash runs whose heartbeats stopped; post failures to the webhook).

    Run as the project's own `python -m flows.monitoring install`, as the work pool is made with the `prefect`
    CLI: this module stays free of Prefect imports. Idempotent: it replaces automations of the same name."""
    cmd = [sys.executable, "-m", "flows.monitoring", "install",
           "--heartbeat-seconds", FLOW_RUN_ENV["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]]
    # the flows package of the checkout this module belongs to, whatever the stack's working directory
    checkout = str(Path(__file__).resolve().parents[1])
    penv = {**os.environ, **_prefect_env(home, ports),
            "PYTHONPATH": os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)}
    penv.pop(ALERT_WEBHOOK_ENV, None)
    if webhook:
        penv[ALERT_WEBHOOK_ENV] = webhook      # through the environment: a URL may carry a token, argv is public
    res = subprocess.run(cmd, env=penv, cwd=cwd, capture_output=True, text=True, timeout=180)
    if res.returncode != 0:
        raise StackError(f"creating the Prefect automations failed (`python -m flows.monitoring install`):\n"
                         f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
    log.info("automations: %s", "; ".join(res.stdout.split("\n")).strip("; "))


def no_leaderboard_reason(cwd: Path | str) -> str | None:
    """Why a default `up` leaves the leaderboard out: data.hidden_labels is empty (real data: the competition's
    leaderboard holds the test labels, there is none to run here); None when there are labels to serve."""
    from segpipe.config import ParamsError, load_params
    try:
        hidden = load_params("data", path=Path(cwd) / "params.yaml").hidden_labels
    except ParamsError:
        return None          # _leaderboard_labels says what is wrong with the file
    return None if hidden else "data.hidden_labels is empty"


def _leaderboard_labels(cwd: Path, labels: Path | str | None) -> Path:
    if labels is None:
        from segpipe.config import ParamsError, load_params
        try:
            labels = load_params("data", path=cwd / "params.yaml").hidden_labels
        except ParamsError as e:
            raise StackError(f"leaderboard: cannot read data.hidden_labels ({e}); pass --labels DIR") from None
        if not labels:
            raise StackError("leaderboard: data.hidden_labels is empty in params.yaml; pass --labels DIR "
                             "or leave the leaderboard out (--only s3,prefect,worker)")
    return (cwd / labels).resolve()


def _start_leaderboard(home: Path, ports: dict[str, int], env: dict[str, str], cwd: Path,
                       labels: Path | str | None = None) -> dict:
    _ensure_free("leaderboard", {"leaderboard": ports["leaderboard"]})
    if importlib.util.find_spec("segpipe.leaderboard") is None:
        raise StackError("segpipe.leaderboard is not installed; leave it out with --only s3,prefect,worker")
    labels_dir = _leaderboard_labels(cwd, labels)
    if not labels_dir.is_dir():
        log.warning("leaderboard labels %s do not exist yet (the server loads them lazily) <data.hidden_labels>",
                    labels_dir)
    state_dir = home / "leaderboard"
    state_dir.mkdir(exist_ok=True)
    lenv = {**os.environ, **env, **leaderboard_env(env)}
    lenv.pop("PREFECT_API_URL", None)
    cmd = leaderboard_command(sys.executable, HOST, ports["leaderboard"], labels_dir, state_dir)
    rec = _spawn(home, "leaderboard", cmd, lenv, cwd)
    _wait("leaderboard", rec, lambda: _port_open(ports["leaderboard"]), START_TIMEOUT["leaderboard"])
    return rec


def _dvc_remote_section(cfg: configparser.ConfigParser, remote: str) -> str | None:
    """The section of `remote` as DVC writes it (`['remote "x"']`) or as a person may (`[remote "x"]`)."""
    for section in cfg.sections():
        m = re.fullmatch(r"""\s*'?\s*remote\s*"(.*)"\s*'?\s*""", section)
        if m and m.group(1) == remote:
            return section
    return None


def _read_dvc_config(path: Path) -> configparser.ConfigParser:
    # DVC's own files (configobj) indent their keys; configparser reads that, and keeps values as raw text
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    if path.is_file():
        cfg.read_string(path.read_text())
    return cfg


def _dvc_value(name: str, value: str) -> str:
    """`value` as DVC's parser (configobj) reads it back unchanged: unquoted, `#` starts a comment and `,` makes a
    list, so such a value is quoted. The error names the setting, never the value."""
    if value and not re.search(r"""[#,"'\s]""", value):
        return value
    for quote in ('"', "'"):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise StackError(f"{name} holds both quote characters, which a DVC config file cannot: use credentials "
                     "without them")


def _configure_dvc(cwd: Path, env: dict[str, str]) -> bool:
    """Point the DVC remote at the stack's S3; secrets go to .dvc/config.local (git-ignored, mode 0600) only.

    Written here, not with `dvc remote modify --local ... secret_access_key SECRET`: that puts the secret in
    dvc's argv, which `ps` shows every local user while dvc runs. The file is made 0600 from the start (a
    mkstemp file renamed over the old one), so not even an old 0644 config.local ever holds the secret."""
    dvc_dir = cwd / ".dvc"
    if not dvc_dir.is_dir():
        return False
    local_path = dvc_dir / "config.local"
    try:
        shared = _read_dvc_config(dvc_dir / "config")
        local = _read_dvc_config(local_path)
    except configparser.Error as e:
        raise StackError(f"cannot read the DVC config in {dvc_dir} ({e.__class__.__name__}); fix the file, or "
                         f"remove {local_path} and run `segpipe stack up` again") from None
    section = _dvc_remote_section(local, DVC_REMOTE)
    if section is None:
        section = f"'remote \"{DVC_REMOTE}\"'"          # DVC's own spelling of a named section
        local.add_section(section)
    values = {"endpointurl": env["SEGPIPE_S3_ENDPOINT"], "access_key_id": env["AWS_ACCESS_KEY_ID"],
              "secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}
    shared_section = _dvc_remote_section(shared, DVC_REMOTE)
    if not local.has_option(section, "url") and not (shared_section and shared.has_option(shared_section, "url")):
        values["url"] = DVC_REMOTE_URL                 # `dvc remote add --local`: the project names no remote yet
    for option, value in values.items():
        local.set(section, option, _dvc_value(option, value))
    buf = io.StringIO()
    local.write(buf)
    # the temp file goes to .dvc/tmp, which DVC's own .gitignore covers: one left by a kill is never committed
    (dvc_dir / "tmp").mkdir(exist_ok=True)
    _atomic_text(local_path, buf.getvalue(), mode=0o600, tmp_dir=dvc_dir / "tmp")
    return True


def write_credentials(home: Path | str | None = None, ports: dict[str, int] | None = None) -> Path:
    """`<home>/credentials.env` without starting anything (docker compose's env file): secrets kept, URLs refreshed."""
    home = stack_home(home)
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    _write_credentials(home, resolve_ports(ports))
    return home / "credentials.env"


def configure_dvc_from_env(cwd: Path | str | None = None, env: dict | None = None) -> bool:
    """Point the DVC remote at $SEGPIPE_S3_ENDPOINT with the environment's credentials (a container's worker)."""
    env = os.environ if env is None else env
    missing = [k for k in ("SEGPIPE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(k)]
    if missing:
        raise StackError(f"cannot configure the DVC remote: {', '.join(missing)} not set (docker compose passes "
                         "them from .segpipe/credentials.env)")
    return _configure_dvc(Path(cwd or Path.cwd()).resolve(), env)


# ---- the API --------------------------------------------------------------------------------------

def _running(name: str, rec: dict | None, ports: dict[str, int]) -> bool:
    if not _alive(rec):
        return False
    port = {"s3": "s3", "prefect": "prefect", "leaderboard": "leaderboard"}.get(name)
    return port is None or _port_open(ports[port])


def up(home: Path | str | None = None, ports: dict[str, int] | None = None,
       services: list[str] | tuple[str, ...] | None = None, *, labels: Path | str | None = None,
       cwd: Path | str | None = None, alert_webhook: str | None = None) -> dict[str, dict]:
    """Start the missing services (all by default), leave running ones alone; returns `status`.

    By default the leaderboard starts only when there are hidden test labels to serve (`labels`, else
    data.hidden_labels): with real data there are none, and the stack starts without it, saying so. Naming the
    leaderboard in `services` makes it required.

    With the Prefect server up, (re)creates the automations: runs that stop sending heartbeats are marked Crashed,
    and failed or crashed runs are posted to `alert_webhook` (default $SEGPIPE_ALERT_WEBHOOK) if there is one."""
    required = services is not None
    services = list(services or SERVICES)
    unknown = sorted(set(services) - set(SERVICES))
    if unknown:
        raise StackError(f"unknown services {unknown}; valid: {', '.join(SERVICES)}")
    home = stack_home(home)
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    cwd = Path(cwd or Path.cwd()).resolve()
    state = _load_state(home)
    ports = resolve_ports(ports)
    # a running service keeps the ports it was started with
    for name, rec in state["services"].items():
        if _alive(rec):
            ports.update({k: v for k, v in rec.get("ports", {}).items()})
    env = _write_credentials(home, ports)
    skipped = state.setdefault("skipped", {})
    skipped.pop("leaderboard", None)
    why = None if required or labels is not None else no_leaderboard_reason(cwd)
    if why and "leaderboard" in services and not _alive(state["services"].get("leaderboard")):
        services.remove("leaderboard")
        skipped["leaderboard"] = why
        log.info("leaderboard: not started: %s in %s, so there is no local leaderboard to serve (real data: "
                 "submissions go to submit.base_url). To run one, pass --labels DIR <data.hidden_labels>",
                 why, cwd / "params.yaml")
    starters = {"s3": _start_s3, "prefect": _start_prefect, "worker": _start_worker,
                "leaderboard": lambda *a: _start_leaderboard(*a, labels=labels)}
    for name in SERVICES:
        if name not in services:
            continue
        rec = state["services"].get(name)
        if _alive(rec):
            log.info("%s already running (pid %d)", name, rec["pid"])
            if not _running(name, rec, ports):   # alive but still starting (an interrupted `up`)
                ready = {"s3": lambda: _port_open(ports["s3"]),
                         "prefect": lambda: _prefect_healthy(ports["prefect"]),
                         "leaderboard": lambda: _port_open(ports["leaderboard"])}[name]
                _wait(name, rec, ready, START_TIMEOUT[name])
        else:
            log.info("starting %s", name)
            rec = starters[name](home, ports, env, cwd)
            rec["ports"] = _service_ports(name, ports)
            state["services"][name] = rec
            _save_state(home, state)       # recorded at once: a failure later still lets `down` stop it
        if name == "s3":
            _after_s3(env)
            _configure_dvc(cwd, env)
        if name == "prefect":
            _install_automations(home, ports, cwd, alert_webhook or os.environ.get(ALERT_WEBHOOK_ENV))
    state["ports"] = ports
    _save_state(home, state)
    return status(home)


def _service_ports(name: str, ports: dict[str, int]) -> dict[str, int]:
    if name == "s3":
        return {k: v for k, v in ports.items() if k == "s3" or k.startswith("weed_")}
    if name in ("prefect", "worker"):
        return {"prefect": ports["prefect"]}
    return {"leaderboard": ports["leaderboard"]}


def down(home: Path | str | None = None) -> list[str]:
    """Stop the processes `up` started (still the same process, by pid + start time); keep all data."""
    home = stack_home(home)
    state = _load_state(home)
    stopped = []
    for name in reversed(SERVICES):
        rec = state["services"].get(name)
        if rec is None:
            continue
        if _stop(rec):
            stopped.append(name)
        del state["services"][name]
        if home.is_dir():
            _save_state(home, state)
    if state.pop("skipped", None) and home.is_dir():
        _save_state(home, state)
    return stopped


def status(home: Path | str | None = None) -> dict[str, dict]:
    """Per service: state (running / starting / stopped / port busy), url, pid."""
    home = stack_home(home)
    state = _load_state(home)
    ports = resolve_ports()
    ports.update(state.get("ports", {}))
    out = {}
    for name in SERVICES:
        rec = state["services"].get(name)
        p = {**ports, **(rec or {}).get("ports", {})}
        url = {"s3": f"http://{HOST}:{p['s3']}",
               "prefect": f"http://{HOST}:{p['prefect']}",
               "worker": f"pool {WORK_POOL} @ http://{HOST}:{p['prefect']}/api",
               "leaderboard": f"http://{HOST}:{p['leaderboard']}/"}[name]
        if _alive(rec):
            st = "running" if _running(name, rec, p) else "starting"
            pid = rec["pid"]
        else:
            port = {"s3": "s3", "prefect": "prefect", "leaderboard": "leaderboard"}.get(name)
            skipped = state.get("skipped", {}).get(name)
            st = ("port busy (not ours)" if port and _port_open(p[port])
                  else f"not started ({skipped})" if skipped else "stopped")
            pid = None
        out[name] = {"state": st, "url": url, "pid": pid}
        if name == "prefect":
            out[name]["api_url"] = f"{url}/api"
        if rec:
            out[name]["log"] = rec.get("log")
    return out


def format_status(st: dict[str, dict]) -> str:
    rows = [("SERVICE", "STATE", "URL", "PID")]
    for name, s in st.items():
        rows.append((name, s["state"], s["url"], str(s["pid"] or "-")))
        if "api_url" in s:
            rows.append(("prefect-api", s["state"], s["api_url"], str(s["pid"] or "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
