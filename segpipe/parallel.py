"""Process pools that are safe wherever the library is called from."""

from __future__ import annotations

import threading
from multiprocessing import get_context
from multiprocessing.pool import Pool, ThreadPool
from typing import Callable, Sequence, TypeVar

from tqdm import tqdm

T, R = TypeVar("T"), TypeVar("R")


def worker_pool(workers: int) -> Pool:
    """A pool for per-file work. Forked processes when this process runs no other thread (a stage's own process:
    they start at once and run truly in parallel); threads otherwise (a Prefect flow run, a test session): a fork
    of a multi-threaded process can leave a child waiting forever on a lock another thread held at the fork.
    PIL, OpenCV and hashlib release the GIL, so threads still overlap most of the work."""
    if threading.active_count() == 1:
        return get_context("fork").Pool(workers)
    return ThreadPool(workers)


class _Bar(tqdm):
    monitor_interval = 0      # no monitor thread: worker_pool forks only from a process with no other thread


def bar(items, desc: str, total: int | None = None, unit: str = "it") -> tqdm:
    """A progress bar on a terminal only (tqdm's disable=None: none when stderr is not a TTY, so no log spam)."""
    return _Bar(items, desc=desc, total=total, unit=unit, disable=None, mininterval=2, leave=False)


def pool_map(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str, unit: str = "it",
             min_items: int = 32) -> list[R]:
    """fn over items in order: in a worker_pool when there are workers and enough items to pay for one, else here;
    with a progress bar on a terminal."""
    if workers > 1 and len(items) >= min_items:
        with worker_pool(workers) as pool:
            return list(bar(pool.imap(fn, items, chunksize=max(1, len(items) // (workers * 8))), desc,
                            len(items), unit))
    return [fn(x) for x in bar(items, desc, len(items), unit)]
