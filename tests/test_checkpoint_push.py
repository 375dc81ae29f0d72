"""pipelines.train.BackgroundPush: the checkpoint mirror uploads beside the next epoch, from a snapshot."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pipelines.train import BackgroundPush


class SlowMirror:
    """Records what each push read, after a delay that stands for the upload."""

    def __init__(self, delay: float, fail_at: int | None = None):
        self.delay, self.fail_at = delay, fail_at
        self.pushed: list[tuple[int, dict[str, bytes]]] = []
        self.busy = threading.Lock()

    def push(self, local: Path, epoch: int) -> None:
        assert self.busy.acquire(blocking=False), "two pushes in flight at once"
        try:
            time.sleep(self.delay)
            if epoch == self.fail_at:
                raise OSError("the store refused the upload")
            self.pushed.append((epoch, {f.name: f.read_bytes() for f in sorted(local.parent.glob("*.pt"))}))
        finally:
            self.busy.release()


def save(path: Path, data: bytes) -> None:
    """As the training loop saves: a temp file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_the_loop_goes_on_while_its_checkpoint_uploads_from_a_snapshot(tmp_path):
    mirror = SlowMirror(delay=0.5)
    push = BackgroundPush(mirror, "m-s0-f0")
    save(tmp_path / "last.pt", b"epoch1")
    save(tmp_path / "best.pt", b"best1")
    t0 = time.monotonic()
    push(tmp_path / "last.pt", 0)
    assert time.monotonic() - t0 < 0.25                      # the upload did not hold the loop
    save(tmp_path / "last.pt", b"epoch2")                    # the next epoch replaces the files mid-upload
    (tmp_path / "best.pt").unlink()
    push(tmp_path / "last.pt", 1)                            # waits for the first push, then starts its own
    push.wait()
    assert mirror.pushed == [(0, {"best.pt": b"best1", "last.pt": b"epoch1"}), (1, {"last.pt": b"epoch2"})]


def test_a_failed_push_fails_the_member_at_the_next_checkpoint(tmp_path):
    push = BackgroundPush(SlowMirror(delay=0.1, fail_at=0), "m-s0-f0")
    save(tmp_path / "last.pt", b"epoch1")
    push(tmp_path / "last.pt", 0)
    with pytest.raises(OSError, match="refused"):
        push(tmp_path / "last.pt", 1)
