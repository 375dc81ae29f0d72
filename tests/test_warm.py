"""flows.warm: members forked from a server that has torch imported run as `python -m` would run them."""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from flows import warm
from flows.caching import ISOLATED_STAGES
from tests.warm_member import answer, imported

REPO = Path(__file__).resolve().parents[1]


def member(*args: str, env: dict | None = None) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = warm.run_module("tests.warm_member", list(args), env if env is not None else dict(os.environ),
                           lines.append)
    return code, lines


def test_member_gets_its_argv_env_cwd_and_both_streams(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"PATH": os.environ["PATH"], "WARM_ONLY": "1"}           # exactly this env, not the caller's
    monkeypatch.setenv("WARM_CALLER", "x")
    code, lines = member("report", "a b", "c", env=env)
    assert code == 0, lines
    assert f"argv={['report', 'a b', 'c']}" in lines
    assert f"cwd={tmp_path}" in lines
    assert "env=['WARM_ONLY']" in lines
    assert "to stderr" in lines
    assert any(line.startswith("preloaded=") and line.endswith("name=__main__") for line in lines)


def test_members_come_warm_once_the_server_has_imported():
    """A request that comes early is served at once with what the server has imported so far; once it has
    imported everything, members start with torch already there."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        code, lines = member("report")
        assert code == 0
        if any(line.startswith("preloaded=True") for line in lines):
            return
        time.sleep(1)
    pytest.fail("the warm server never had torch imported")


def test_a_request_is_forked_once_the_server_has_imported_what_it_needs():
    """A member forked before its imports are made would import them itself, beside the server importing the same
    (the first training wave waited ~11 s for that on 2 cores)."""
    assert warm.call(partial(imported, "tabnanny"), lambda line: None) is False      # nothing in the chain uses it
    assert warm.call(partial(imported, "tabnanny"), lambda line: None, needs=("tabnanny",)) is True
    assert warm.call(partial(imported, "tabnanny"), lambda line: None) is True       # the server keeps it
    # a need that cannot be imported does not stop the request (the server prints why; a member using it fails)
    assert warm.call(partial(imported, "json"), lambda line: None, needs=("no_such_module_x",)) is True


@pytest.mark.parametrize("stage", ISOLATED_STAGES)
def test_an_isolated_stages_result_unpickles_without_its_imports(stage):
    """The result comes back pickled: unpickling imports its class's module, and pipelines.infer's imports torch
    (4.6 s of the flow's critical path after the first inference, on 2 cores)."""
    cls = typing.get_type_hints(importlib.import_module(f"pipelines.{stage}").run)["return"]
    blob = pickle.dumps(object.__new__(cls))
    probe = (f"import pickle, sys; sys.path.insert(0, {str(REPO)!r}); pickle.loads({blob!r}); "
             f"print([m for m in ('torch', 'great_expectations', 'pipelines.{stage}') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out


def test_exit_codes_are_those_of_a_process():
    assert member("exit", "3")[0] == 3
    code, lines = member("raise")
    assert code == 1 and any("ValueError: a member's own error" in line for line in lines), lines
    assert member("kill")[0] == -signal.SIGKILL
    assert warm.run_module("pipelines.train", ["--model", "m"], dict(os.environ), lambda line: None) == 2   # usage


def test_member_ends_like_an_interpreter():
    code, lines = member("finish")
    assert code == 0
    assert lines == ["thread done", "atexit ran"]


def test_a_member_with_a_thread_pool_still_open_ends():
    """Its idle workers stop when threading's exit hook says so: joining them first hung the member for good (a
    training member whose checkpoint-push pool was still referenced at its end, after an S3 outage)."""
    out: dict = {}
    waiter = threading.Thread(target=lambda: out.update(result=member("pool")), daemon=True)
    waiter.start()
    waiter.join(60)
    assert not waiter.is_alive(), "the member did not exit within 60 s of its work"
    assert out["result"] == (0, ["pool used"])


def test_a_process_left_behind_does_not_hold_the_caller():
    t0 = time.monotonic()
    code, lines = member("orphan")
    assert code == 0 and lines == ["member done"]
    assert time.monotonic() - t0 < 10, "the caller waited for the left-behind process's end of the pipe"


def test_concurrent_members_keep_their_own_output():
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda tag: member("tag", tag), ["a", "b", "c", "d"]))
    for tag, (code, lines) in zip("abcd", results):
        assert code == 0
        assert lines == [f"{tag} {i}" for i in range(200)]


def test_a_member_starts_in_well_under_a_second_once_warm():
    member("exit", "0")                                              # the server has imported by now
    t0 = time.monotonic()
    assert member("exit", "0")[0] == 0
    assert time.monotonic() - t0 < 1.5, "a warm member took as long as a fresh interpreter"


def test_server_ends_with_the_process_that_started_it():
    starter = ("import os, sys; sys.path.insert(0, %r); from flows import warm; warm.warm_up(); "
               "print(warm._server(dict(os.environ)).proc.pid, flush=True)" % str(REPO))
    out = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, check=True, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:                                                          # reap it if it is our zombie (it is not)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    pytest.fail(f"warm server {pid} outlived the process that started it")


def test_call_returns_the_value_and_streams_the_logs():
    lines: list[str] = []
    assert warm.call(partial(answer, 7), lines.append) == {"x": 7, "square": 49}
    assert any("INFO segpipe.warmtest: computing 7" in line for line in lines), lines
    pid_line = next(line for line in lines if line.startswith("pid="))
    assert int(pid_line.split()[0][4:]) != os.getpid() and pid_line.endswith("preloaded=True")


def test_call_raises_what_the_function_raised():
    with pytest.raises(ValueError, match="no answer for 3") as info:
        warm.call(partial(answer, 3, fail="value"), lambda line: None)
    assert any("raised in its warm process" in note for note in info.value.__notes__)
    with pytest.raises(warm.WarmCallError, match="Odd|1/2"):           # not picklable: named, not lost
        warm.call(partial(answer, 3, fail="odd"), lambda line: None)
    with pytest.raises(warm.WarmServerError, match="exit code -9"):    # killed: no result, said so
        warm.call(partial(answer, 3, fail="kill"), lambda line: None)


def test_a_member_with_another_pythonpath_gets_a_server_started_with_it(tmp_path):
    """PYTHONPATH (and its sitecustomize) acts when an interpreter starts: a member whose PYTHONPATH differs from
    the server's must see it, as `python -m` would."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.warm_site = 'ran'\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    code, lines = member("report", env=env)
    assert code == 0 and "site=ran" in lines, lines
    code, lines = member("report")                                   # the caller's own env: its own server
    assert code == 0 and "site=None" in lines, lines


def test_counting_gpus_for_the_leases_keeps_torch_out_of_the_flows_process():
    """The device leases need the GPU count, which takes torch: asked of a process forked from the warm server,
    once."""
    probe = ("import sys; sys.path.insert(0, %r); from flows import runners, warm; warm.warm_up(); "
             "n = runners.gpu_count(True); assert runners.gpu_count(True) == n; "
             "print(n, 'torch' in sys.modules, flush=True)" % str(REPO))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    from segpipe.gpu import visible_gpus
    assert out.stdout.split() == [str(visible_gpus()), "False"], out
