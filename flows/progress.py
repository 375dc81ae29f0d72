"""The train fan-out's progress in the Prefect UI while the matrix runs: a progress artifact (`<stage>-progress`,
updated in place) and a table artifact (`<stage>-members-live`, a new version whenever it changes) with every
member's state, epoch and latest val mIoU. A thread polls the members' dvclive logs (pipelines.train.live_dir) and
their task futures every POLL_SECONDS; the reading and summarising are plain functions (`look`, `summarise`)."""

from __future__ import annotations

import contextvars
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from pipelines.train import live_dir

POLL_SECONDS = 15.0       # seconds between looks: an epoch takes longer, and each look costs a few API calls


@dataclass(frozen=True)
class MemberLook:
    member: str
    state: str | None         # "done" / "failed" once its task is final, else None (still running or waiting)
    live: dict | None         # its dvclive metrics.json (latest epoch's values), None before its first epoch


@dataclass(frozen=True)
class Progress:
    percent: float            # 0-100: finished members plus the running ones' share of their epochs
    description: str          # "3 done, 2 running, 5 left (1 failed)"
    rows: list[dict]          # one per member, for the table artifact


def read_live(path: Path) -> dict | None:
    """A member's dvclive summary (`<live dir>/metrics.json`); None before its first epoch, or when caught mid-write
    (dvclive rewrites it in place: the next look reads it whole)."""
    try:
        return json.loads((Path(path) / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def final_state(future: Any) -> str | None:
    """"done" / "failed" for a task future that has finished (a cache hit is done at once), else None."""
    try:
        state = future.state
    except Exception:           # noqa: BLE001 - the API briefly unreachable: this look counts it as unfinished
        return None
    if state.is_completed():
        return "done"
    if state.is_final():
        return "failed"
    return None


def look(member: str, out_dir: Path, future: Any) -> MemberLook:
    return MemberLook(member, final_state(future), read_live(live_dir(Path(out_dir))))


def summarise(looks: list[MemberLook], epochs: int | None) -> Progress:
    """Members done / running / left, and each member's latest epoch and val mIoU. A member is running from its
    first logged epoch until its task is final; with `epochs` known, a running member counts for the share of its
    epochs it has logged."""
    done = sum(lk.state == "done" for lk in looks)
    failed = sum(lk.state == "failed" for lk in looks)
    running = [lk for lk in looks if lk.state is None and lk.live is not None]
    left = len(looks) - done - failed - len(running)
    partial = sum(min(1.0, (lk.live.get("step", 0) + 1) / epochs) for lk in running) if epochs else 0.0
    percent = 100.0 * (done + failed + partial) / len(looks) if looks else 100.0
    description = f"{done} done, {len(running)} running, {left} left" + (f" ({failed} failed)" if failed else "")
    rows = []
    for lk in looks:
        state = lk.state or ("running" if lk.live is not None else "waiting")
        step = None if lk.live is None else lk.live.get("step", 0) + 1
        miou = None if lk.live is None or lk.live.get("val_miou") is None else round(float(lk.live["val_miou"]), 4)
        rows.append({"member": lk.member, "state": state,
                     "epoch": None if step is None else (f"{step}/{epochs}" if epochs else str(step)),
                     "val_miou": miou})
    return Progress(round(min(100.0, percent), 1), description, rows)


class _Publisher:
    """Creates the artifacts on the first look and updates them when a look differs from the last one."""

    def __init__(self, stage: str, title: str):
        self.stage, self.title = stage, title
        self.progress_id = None
        self.last: Progress | None = None

    def __call__(self, progress: Progress) -> None:
        if progress == self.last:
            return
        if self.progress_id is None:
            self.progress_id = create_progress_artifact(progress.percent, key=f"{self.stage}-progress",
                                                        description=f"{self.title}: {progress.description}")
        else:
            update_progress_artifact(self.progress_id, progress.percent,
                                     description=f"{self.title}: {progress.description}")
        if self.last is None or progress.rows != self.last.rows:
            create_table_artifact(progress.rows, key=f"{self.stage}-members-live",
                                  description=f"{self.title} while it runs: {progress.description}")
        self.last = progress


@contextmanager
def watch(stage: str, members: list[tuple[str, Path]], futures: list[Any], epochs: int | None,
          interval: float | None = None) -> Iterator[None]:
    """Publish the fan-out's progress while the block runs (members: (name, out_dir), in the futures' order), and
    once more at its end. A failure to publish is logged, never raised: the UI view must not fail the matrix."""
    log = get_run_logger()
    publish = _Publisher(stage, f"{stage}: {len(members)} members")
    stop = threading.Event()
    warned = []

    def once() -> None:
        try:
            publish(summarise([look(m, d, f) for (m, d), f in zip(members, futures)], epochs))
        except Exception as e:  # noqa: BLE001 - an API hiccup; the next look tries again
            if not warned:
                log.warning("%s progress artifact not updated: %s", stage, e)
                warned.append(e)

    def loop() -> None:
        while not stop.wait(POLL_SECONDS if interval is None else interval):
            once()

    once()
    # the thread runs in a copy of this context: the artifacts belong to this flow run
    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,), name=f"{stage}-progress",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        once()
