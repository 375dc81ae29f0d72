"""Shared stage plumbing: argument parsing, logging, atomic JSON, timing summaries."""

from __future__ import annotations

import argparse
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


def run_main(fn, *args, **kwargs) -> None:
    """Call a stage; a known error exits non-zero with its message instead of a traceback wall."""
    setup_logging()
    try:
        fn(*args, **kwargs)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        logging.getLogger("segpipe").error("%s: %s", type(e).__name__, e)
        sys.exit(1)
