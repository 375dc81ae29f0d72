"""Process pools that are safe wherever the library is called from."""

from __future__ import annotations

import threading
from multiprocessing import get_context
from multiprocessing.pool import Pool, ThreadPool


def worker_pool(workers: int) -> Pool:
    """A pool for per-file work. Forked processes when this process runs no other thread (a stage's own process:
    they start at once and run truly in parallel); threads otherwise (a Prefect flow run, a test session): a fork
    of a multi-threaded process can leave a child waiting forever on a lock another thread held at the fork.
    PIL, OpenCV and hashlib release the GIL, so threads still overlap most of the work."""
    if threading.active_count() == 1:
        return get_context("fork").Pool(workers)
    return ThreadPool(workers)
