"""Device leasing: a task holds a GPU slot (or a CPU slot) through an OS file lock, freed when it ends or dies."""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class Lease:
    gpu: int | None          # None: CPU
    slot: int
    env: dict[str, str]      # what the task's process needs (CUDA_VISIBLE_DEVICES, thread split)


def visible_gpus() -> int:
    """GPUs this machine may use (honours an outer CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def total_slots(slots_per_gpu: int, cpu_slots: int, n_gpus: int | None = None) -> int:
    n_gpus = visible_gpus() if n_gpus is None else n_gpus
    return n_gpus * slots_per_gpu if n_gpus else cpu_slots


@contextmanager
def lease(lease_dir: Path, slots_per_gpu: int = 1, cpu_slots: int = 1, n_gpus: int | None = None,
          poll_s: float = 0.5, timeout_s: float | None = None) -> Iterator[Lease]:
    """Block until a slot is free; hold it with flock so a crashed holder releases it (the kernel drops the lock)."""
    n_gpus = visible_gpus() if n_gpus is None else n_gpus
    n = total_slots(slots_per_gpu, cpu_slots, n_gpus)
    lease_dir = Path(lease_dir)
    lease_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        for slot in range(n):
            fh = open(lease_dir / f"slot-{slot}.lock", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            gpu = slot // slots_per_gpu if n_gpus else None
            env = {"SEGPIPE_PARALLEL_TASKS": str(n if gpu is None else slots_per_gpu)}
            # a CPU task must not see the GPUs; a GPU task sees exactly its own
            env["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else str(gpu)
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            try:
                yield Lease(gpu, slot, env)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no free device slot in {lease_dir} after {timeout_s}s ({n} slots)")
        time.sleep(poll_s)
