"""The `dvc` command line, as every stage calls it: the project's pinned binary, and a bounded wait for the lock.

A second run (or a person's `dvc repro`) holding the repository lock is waited for, not failed on. DVC's own
`--wait-for-lock` waits without end, which an unattended nightly run cannot afford: a stuck holder would hang it
until someone looks. So each call tries for the lock the way dvc does and, while dvc answers that the lock is
taken, tries again with backoff for up to SEGPIPE_DVC_LOCK_WAIT_SECONDS (default 1800); then it fails naming the
knob. DVC takes its lock with `flock`, which the kernel drops when the holder dies: a killed run leaves nothing
to wait for.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_WAIT_ENV = "SEGPIPE_DVC_LOCK_WAIT_SECONDS"
DEFAULT_LOCK_WAIT = 1800.0
_LOCK_TAKEN = "Unable to acquire lock"          # dvc's message when another process holds .dvc/tmp/lock


def dvc_binary() -> str:
    """The `dvc` installed beside this interpreter (the project's pinned one), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    found = str(local) if local.exists() else shutil.which("dvc")
    if not found:
        raise FileNotFoundError(f"`dvc` not found next to {sys.executable} or on PATH: run `make setup`")
    return found


def lock_wait_seconds() -> float:
    raw = os.environ.get(LOCK_WAIT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_LOCK_WAIT
    except ValueError:
        raise ValueError(f"{LOCK_WAIT_ENV}={raw!r} is not a number of seconds") from None


def run_dvc(*args: str, cwd: Path | str | None = None, check: bool = True,
            wait: float | None = None) -> subprocess.CompletedProcess:
    """`dvc <args>` (output captured), waiting up to `wait` s (default: the env knob) while the lock is taken.
    `check`: raise RuntimeError with dvc's message on a non-zero exit. A lock still taken after the wait raises
    TimeoutError either way."""
    wait = lock_wait_seconds() if wait is None else wait
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    deadline, pause = time.monotonic() + wait, 0.5
    while True:
        proc = subprocess.run([dvc_binary(), *args], cwd=cwd, env=env, capture_output=True, text=True)
        if proc.returncode == 0 or _LOCK_TAKEN not in proc.stderr + proc.stdout:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"`dvc {' '.join(args)}`: the repository lock ({cwd or '.'}/.dvc/tmp/lock) was "
                               f"still held by another dvc process after {wait:.0f}s; find it with "
                               f"`fuser .dvc/tmp/lock`, or raise {LOCK_WAIT_ENV}")
        log.info("dvc %s: another dvc process holds the repository lock; waiting (up to %.0fs more, %s)",
                 args[0] if args else "", left, LOCK_WAIT_ENV)
        time.sleep(min(pause, left))
        pause = min(pause * 2, 15.0)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed: {proc.stderr.strip()[-2000:] or proc.stdout.strip()}")
    return proc
