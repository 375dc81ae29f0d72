"""Shared stage plumbing: argument parsing, logging, atomic JSON, timing summaries."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from segpipe.config import DEFAULT_PARAMS


# where a member mirrors its checkpoints and stores its finished result in S3 (pipelines.train reads them; the
# flow sets them): here, so the flow names them without importing torch
CHECKPOINT_ENV = "SEGPIPE_CHECKPOINT_PREFIX"
RESULT_ENV = "SEGPIPE_RESULT_PREFIX"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    return p


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON via a temp file + rename so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)   # unique: threads of one worker too
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())        # a crash never leaves half a file (or a ledger) behind the rename
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    phases[name] = round(time.perf_counter() - t0, 2)


# set by the flow: every stage appends the interval of its own work (epoch seconds), so a benchmark can tell
# the stages' work from orchestration, DVC, S3 transfers and process start-up (scripts/bench_overhead.py)
TIMING_ENV = "SEGPIPE_TIMING_FILE"


def record_timing(kind: str, label: str, start: float, end: float) -> None:
    """Append one interval to $SEGPIPE_TIMING_FILE, if set: one short line per O_APPEND write, so tasks and
    processes writing at once never interleave within a line."""
    path = os.environ.get(TIMING_ENV)
    if not path:
        return
    line = json.dumps({"kind": kind, "label": label, "start": start, "end": end, "pid": os.getpid()}) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:      # a measurement aid: never the reason a stage fails
        logging.getLogger("pipelines").warning("timing not recorded in %s: %s", path, e)
        return
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@contextmanager
def timed_as(kind: str, label: str) -> Iterator[None]:
    """Record the block's interval as `kind`: a stage's own S3 transfers ("s3"), inside its work, so the overhead
    benchmark counts them as transfers, not work."""
    t0 = time.time()
    try:
        yield
    finally:
        record_timing(kind, label, t0, time.time())


def stage_call(target: str, *args: Any, **kwargs: Any) -> Any:
    """Call the stage function `module:function`, importing its module here: the flow names its stages this way,
    so its own process never imports torch or great-expectations (they run in the stage's process)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def timed_call(label: str, fn, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), its interval recorded as `label`'s own work (the overhead benchmark)."""
    t0 = time.time()
    out = fn(*args, **kwargs)
    record_timing("work", label, t0, time.time())
    return out


def run_main(fn, *args, **kwargs) -> None:
    """Call a stage; a known error exits non-zero with its message instead of a traceback wall."""
    setup_logging()
    try:                      # timed after the imports: interpreter and library start-up are not the stage's work
        timed_call(Path(sys.argv[0]).stem + " " + " ".join(sys.argv[1:7]), fn, *args, **kwargs)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        logging.getLogger("segpipe").error("%s: %s", type(e).__name__, e)
        sys.exit(1)
