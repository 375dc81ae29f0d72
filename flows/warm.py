"""Warm stage processes: the stages with heavy imports run in processes of their own, forked from a server that has
already imported great-expectations, torch, segmentation-models-pytorch, albumentations and the library, instead
of a fresh interpreter (or the flow's own process) spending ~8 s importing them, per member and per wave, on the
critical path.

The flow starts the server (`warm_up`) before its first stage; it imports in its own process while the flow
fetches the data. A request names the modules it needs (a member its module, a call its stage's): one that comes
before they are imported waits while the server imports them, then is forked warm. Forking it cold instead had
the member import torch itself, beside the server importing the same: on 2 cores the first training wave started
~11 s late.

- `run_module`: a training member, as `python -m pipelines.train <args>` would run it: its own environment (the
  device lease's CUDA_VISIBLE_DEVICES), working directory, argv and exit code (negative: killed by that signal),
  its stdout and stderr lines handed to the caller as they come, and an interpreter's end (threads joined, atexit
  handlers run; the module teardown, ~2 s of freeing what the kernel frees anyway, is skipped).
- `call`: a pickled function (validate, infer, the audit, pseudo-labels); its result or exception comes back. The
  flow's process never imports torch, and a stage's memory (its CUDA context too) goes when it ends.

Nothing calls CUDA before the fork (the imports make no CUDA call; PYTORCH_NVML_BASED_CUDA_CHECK keeps an
availability check off the driver), so each process initialises CUDA itself, on the devices it was given.

Protocol: the caller connects to the server's Unix socket (in a 0700 temporary folder) and passes the write end of
a pipe (SCM_RIGHTS) and the request (JSON). The server forks a watcher, which forks the member, waits for it and
answers its exit code. The server ends when the process that started it ends (EOF on its stdin).
"""

from __future__ import annotations

import atexit
import base64
import importlib
import json
import os
import pickle
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

# in the order the flow needs them: validate (great-expectations, pandas, cv2), then the train members (torch, smp,
# timm, albumentations), then inference, the audit and pseudo-labels. One server: two importing side by side (one
# for great-expectations, one for torch) measured slower on a 2-core machine, where the imports, validation and
# the flow's start share the cores (demo: 22.9 s before validate worked, against 16.9 s with one)
PRELOAD = ("great_expectations", "pipelines.validate", "pipelines.train", "pipelines.infer", "pipelines.audit",
           "pipelines.pseudo")
_LEN = struct.Struct("!Q")
_CODE = struct.Struct("!i")
_EARLY_ANSWER: socket.socket | None = None     # in a call's process: where it answers its own exit code


class WarmServerError(RuntimeError):
    """The warm server went away before the member's exit code came back."""


class WarmCallError(RuntimeError):
    """A warm call's result or exception could not be pickled back; the message and traceback say which."""


# environment variables read when an interpreter or a native library starts (PYTHONPATH and its sitecustomize,
# OpenMP and MKL thread settings), not later: a member whose env differs in any of them gets a server started with
# that env, so it runs as `python -m` would with it
STARTUP_ENV = ("PYTHON", "LD_", "OMP_", "MKL_", "KMP_", "OPENBLAS_")


def startup_env(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(STARTUP_ENV)))


class _Server:
    """A server this process started, for one start-up environment: its process and socket address."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def ensure(self) -> str:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            return self.address

    def _start(self) -> None:
        # bound and listening before the server exists: callers queue on the socket while it imports
        address = str(Path(tempfile.mkdtemp(prefix="segpipe-warm-")) / "socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(64)
        env = {**self.env, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
        boot = (f"import sys; sys.path[:0] = {json.dumps(sys.path)}; from flows.warm import serve; "
                f"serve({listener.fileno()}, {list(PRELOAD)!r})")
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE, env=env,
                                         pass_fds=[listener.fileno()])
        finally:
            listener.close()
        self.address = address


_SERVERS: dict[tuple[tuple[str, str], ...], _Server] = {}
_SERVERS_LOCK = threading.Lock()


def _server(env: dict[str, str]) -> _Server:
    """The server for env's start-up variables (started on first use)."""
    key = startup_env(env)
    with _SERVERS_LOCK:
        if key not in _SERVERS:
            _SERVERS[key] = _Server(env)
        return _SERVERS[key]


def warm_up() -> None:
    """Start the server for this process's environment (if none runs); it imports in the background. Returns at
    once."""
    _server(dict(os.environ)).ensure()


def run_module(module: str, argv: list[str], env: dict[str, str], on_line: Callable[[str], None]) -> int:
    """`python -m <module> <argv>` with exactly `env`, in a process forked from the warm server (started here if
    need be, and forked only once `module` is imported there); every line it prints goes to `on_line` as it
    comes. Returns its exit code, like subprocess."""
    return _request({"module": module, "argv": list(argv), "env": dict(env), "cwd": os.getcwd(),
                     "needs": [module]}, on_line, f"`{module} {' '.join(argv[:6])}`")


def call(fn: Callable[[], Any], on_line: Callable[[str], None], env: dict[str, str] | None = None,
         needs: tuple[str, ...] = ()) -> Any:
    """fn() in a process forked from the warm server (a stage with heavy imports: they are already made, and its
    memory, CUDA context included, goes when it ends); its printed and logged lines go to `on_line`. Returns
    what fn returned, or raises what it raised. `fn` and its result are pickled (a functools.partial of a
    module-level function is). `needs`: modules fn uses, imported in the server before the fork."""
    with tempfile.TemporaryDirectory(prefix="segpipe-warm-call-") as tmp:
        result = Path(tmp) / "result.pickle"
        request = {"call": base64.b64encode(pickle.dumps(fn)).decode(), "result": str(result),
                   "env": dict(os.environ if env is None else env), "cwd": os.getcwd(), "needs": list(needs)}
        name = getattr(getattr(fn, "func", fn), "__qualname__", repr(fn))
        code = _request(request, on_line, name)
        if not result.is_file():
            raise WarmServerError(f"{name} ended (exit code {code}) before returning a result")
        outcome = pickle.loads(result.read_bytes())
    if outcome[0] == "ok":
        return outcome[1]
    _, exc, tb = outcome
    exc.add_note(f"raised in its warm process:\n{tb}")
    raise exc


def _request(request: dict, on_line: Callable[[str], None], what: str) -> int:
    """Send the request with the pipe's write end; hand on the member's lines until the watcher answers its exit
    code, then what is left in the pipe. Not until the pipe's EOF: a process the member left behind (a data
    loader's worker checks for its parent every 5 s) may hold it open after the member is gone."""
    payload = json.dumps({**request, "label": what, "sent": time.time()}).encode()
    out_r, out_w = os.pipe()
    lines = _Lines(on_line)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            try:
                conn.connect(_server(request["env"]).ensure())
                socket.send_fds(conn, [_LEN.pack(len(payload))], [out_w])
                conn.sendall(payload)
            finally:
                os.close(out_w)         # the member holds the only write end now
            pipe_open = True
            while True:
                ready, _, _ = select.select([out_r, conn] if pipe_open else [conn], [], [])
                if out_r in ready:
                    chunk = os.read(out_r, 1 << 16)
                    pipe_open = bool(chunk)
                    lines.feed(chunk)
                if conn in ready:
                    answer = _recv_exactly(conn, _CODE.size)
                    break
        os.set_blocking(out_r, False)
        while pipe_open:                # the member has ended: what it wrote last is in the pipe already
            try:
                chunk = os.read(out_r, 1 << 16)
            except BlockingIOError:
                break
            pipe_open = bool(chunk)
            lines.feed(chunk)
        lines.feed(b"", final=True)
    finally:
        os.close(out_r)
    if len(answer) < _CODE.size:
        raise WarmServerError(f"the warm server ended before {what} reported its exit code")
    return _CODE.unpack(answer)[0]


class _Lines:
    """Bytes from the pipe to whole lines for on_line (undecodable bytes replaced)."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line, self.buf = on_line, b""

    def feed(self, chunk: bytes, final: bool = False) -> None:
        self.buf += chunk
        *done, self.buf = self.buf.split(b"\n")
        if final and self.buf:
            done, self.buf = [*done, self.buf], b""
        for line in done:
            self.on_line(line.decode(errors="replace"))


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def serve(listener_fd: int, preload: list[str]) -> None:
    """The server: fork a watcher per connection until the starting process ends, importing `preload` one module
    at a time in between. A request is read here, and the modules it needs are imported before its fork."""
    listener = socket.socket(fileno=listener_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)       # watchers are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # ^C in the flow's terminal: the flow decides
    pending = list(preload)
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 0 if pending else None)
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1024):
            return                                      # the starting process is gone
        if listener in ready:
            conn, _ = listener.accept()
            try:
                request, out = _read_request(conn)
            except (OSError, ValueError):               # a caller that went away mid-request: nothing to run
                conn.close()
                continue
            for name in request.get("needs", ()):
                _import(name)
            if os.fork() == 0:
                listener.close()
                _watch(conn, request, out)              # never returns
            conn.close()
            os.close(out)
        elif pending:
            _import(pending.pop(0))


def _import(name: str) -> None:
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
    except Exception:           # noqa: BLE001 - the member imports it again and fails with the cause
        traceback.print_exc()


def _read_request(conn: socket.socket) -> tuple[dict, int]:
    """The request (JSON) and the write end of the caller's pipe (SCM_RIGHTS)."""
    head, fds, _, _ = socket.recv_fds(conn, _LEN.size, 1)
    if len(fds) != 1 or len(head) != _LEN.size:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request without its pipe")
    try:
        return json.loads(_recv_exactly(conn, _LEN.unpack(head)[0])), fds[0]
    except ValueError:
        os.close(fds[0])
        raise


def _watch(conn: socket.socket, request: dict, out: int) -> None:
    """The watcher: fork the member, answer its exit code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)       # the member's own subprocesses must be waitable
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        # a call answers its exit code itself once its result is written: the caller goes on while the kernel
        # tears the process down (seconds, after inference); a training member's answer waits for its end, so
        # its device lease outlives its CUDA context
        global _EARLY_ANSWER
        if "call" in request:
            _EARLY_ANSWER = conn
        else:
            conn.close()
        _become_member(out, request)                    # exits the process
    os.close(out)
    _, status = os.waitpid(pid, 0)
    try:
        conn.sendall(_CODE.pack(os.waitstatus_to_exitcode(status)))
    except OSError:
        pass                                            # the caller had its answer from the call and is gone
    finally:
        os._exit(0)


def _become_member(out: int, request: dict) -> None:
    """In the member: `python -m module argv`, or a pickled call, with the request's env and cwd, its output
    into the caller's pipe."""
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", buffering=1, errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    # from the request to the member running (the overhead benchmark's "start"; a no-op unless the flow timed it)
    from pipelines.common import record_timing
    record_timing("start", request["label"], request["sent"], time.time())
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.cuda, "_is_in_bad_fork", lambda: False)():
        print("CUDA was initialised in the warm server before this fork, so this process cannot use it: an import "
              "made a CUDA call. Set fanout.warm_start: false in params.yaml (fresh processes) and report it",
              file=sys.stderr)
        _finish(1)
    if "call" in request:
        _finish(_run_call(request))
    sys.argv = [request["module"], *request["argv"]]
    sys.modules.pop(request["module"], None)   # preloaded: run its body afresh as __main__, as `python -m` does
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:               # noqa: BLE001 - what the interpreter would print, then exit 1
        traceback.print_exc()
        code = 1
    _finish(code)


def _run_call(request: dict) -> int:
    """Unpickle the function, call it, pickle what it returned or raised into the result file."""
    from pipelines.common import setup_logging
    setup_logging()                     # the library's log lines, as a stage's own process prints them
    try:
        fn = pickle.loads(base64.b64decode(request["call"]))
        outcome = ("ok", fn())
    except BaseException as e:          # noqa: BLE001 - raised again in the caller, with this traceback
        outcome = ("error", e, traceback.format_exc())
    try:
        blob = pickle.dumps(outcome)
        pickle.loads(blob)              # an exception whose __init__ takes other arguments pickles, then fails here
    except Exception as e:              # noqa: BLE001 - an unpicklable result or exception
        if outcome[0] == "error":       # the exception as text, with its traceback
            error = WarmCallError(f"{type(outcome[1]).__name__}: {outcome[1]}")
            blob = pickle.dumps(("error", error, outcome[2]))
        else:
            error = WarmCallError(f"the result could not be pickled back: {type(e).__name__}: {e}")
            blob = pickle.dumps(("error", error, traceback.format_exc()))
    tmp = request["result"] + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, request["result"])
    return 0


def _exit_code(value) -> int:
    """SystemExit's argument as the interpreter turns it into an exit status."""
    if value is None or isinstance(value, int):
        return value or 0
    print(value, file=sys.stderr)
    return 1


def _finish(code: int) -> None:
    """End the member as an interpreter ends, less the module teardown (~2 s of freeing what the kernel frees
    anyway): wait for its threads, run its atexit handlers, flush, exit. A call answers its exit code first, once
    its result is written and its lines flushed: the caller goes on while the process winds down (what it prints
    after that is not read)."""
    _flush()
    if _EARLY_ANSWER is not None:
        try:
            _EARLY_ANSWER.sendall(_CODE.pack(code))
        except OSError:
            pass
    # as the interpreter ends: threading's exit hooks first (a ThreadPoolExecutor's idle workers stop only when its
    # hook tells them to: joined before it, a member with a pool still open never exited), then its threads
    threading._shutdown()
    atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
