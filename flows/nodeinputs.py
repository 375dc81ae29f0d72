"""A train member's inputs by content, so a Ray node needs no disk shared with the flow: only S3 and the image.

The flow (`fan_out` under fanout.runner=ray) describes what a member reads (`prepare`): the run's stage folders it
needs (validate, split; in a pseudo-label round also pseudo/rN and audit/rN-1) as the StageRunner stored them (S3
prefix + each file's sha256), the photos the validated index (and the pseudo index) point at, and the params file's
text (a profile's copy lives in the flow's run folder). The photos are no stage's output (they stay under
data.root), so the flow stores each once under its sha256 (`photos/sha256/<digest>`); one already there is not sent
again. On the node, `stage` brings them into a folder of its own, verified by checksum, fetching only what the node
lacks; a node that holds the run folder at the flow's path with the same content uses it in place (no copy).

Plain functions (no Prefect): the flow's tasks call them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from segpipe.storage import HASH_WORKERS, ArtifactStore, holds, local_path, sha256_file

PHOTOS_PREFIX = "photos/sha256"
WORK_ENV = "SEGPIPE_NODE_DIR"         # a node's own working folder; default .segpipe/node under its cwd
DEFAULT_WORK = Path(".segpipe/node")

log = logging.getLogger("flows.nodeinputs")


@dataclass(frozen=True)
class StoredFolder:
    """A finished stage's files in S3: its prefix and each file's sha256 (by path relative to the folder)."""

    prefix: str
    files: dict[str, str]


@dataclass(frozen=True)
class MemberInputs:
    """What a member reads, by content: enough for a node with nothing of the run on its disk."""

    run: str
    folders: dict[str, StoredFolder]    # folder under the run (validate, split, pseudo/r1, ...) -> its stored files
    photos: dict[str, str]              # photo path as the indexes name it (under data_root) -> sha256
    params: str                         # the params file's text


@dataclass(frozen=True)
class Staged:
    """Where a member finds its inputs on this node."""

    run_dir: Path                       # holds the run's folders (validate/, split/, ...) and gets the member's
    params_file: Path
    data_root: Path | None              # the photos' folder; None: where the index says (used in place)
    fetched: dict[str, int] = field(default_factory=dict)   # files downloaded: {"folders": n, "photos": n}


def photo_key(digest: str) -> str:
    return f"{PHOTOS_PREFIX}/{digest}"


def needed_photos(run_dir: Path, folders: list[str]) -> dict[str, Path]:
    """The photos a member may read: the validated index's training images in the split (folds.json), and the
    pseudo index's test images when a pseudo/rN folder is among `folders`; photo name -> local path."""
    index = json.loads((run_dir / "validate" / "index.json").read_text())
    root = Path(index["data_root"])
    in_split = json.loads((run_dir / "split" / "folds.json").read_text())["folds"]
    names = {r["image"] for r in index["train"] if r["file_name"] in in_split}
    for rel in folders:
        if rel.startswith("pseudo/"):
            pseudo = json.loads((run_dir / rel / "index.json").read_text())
            groups = pseudo["folds"].values() if "folds" in pseudo else [pseudo["samples"]]
            names |= {r["image"] for records in groups for r in records}
    return {name: root / name for name in sorted(names)}


def store_photos(store: ArtifactStore, photos: dict[str, Path],
                 workers: int = HASH_WORKERS) -> tuple[dict[str, str], int]:
    """Hash the photos and store the ones S3 lacks under their sha256 (conditional writes: content never
    overwritten). Returns (photo name -> sha256, how many were uploaded)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = dict(zip(photos, pool.map(sha256_file, photos.values())))
    present = {k.rsplit("/", 1)[-1] for k in store.list(f"{PHOTOS_PREFIX}/")}
    missing = {d: photos[name] for name, d in digests.items() if d not in present}   # a photo twice: once
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(lambda item: store.put_file(item[1], photo_key(item[0]), digest=item[0]), missing.items()))
    return digests, len(missing)


def prepare(store: ArtifactStore, run: str, run_dir: Path, folders: dict[str, StoredFolder],
            params_file: Path) -> MemberInputs:
    """The flow's side: store the photos the members need (those S3 lacks) and describe every input by content.
    The folders must already be stored (StageRunner.wait_stored)."""
    t0 = time.time()
    photos, sent = store_photos(store, needed_photos(Path(run_dir), list(folders)))
    log.info("%d photos for the members, %d stored now under %s (%.1f s)", len(photos), sent,
             store.url(PHOTOS_PREFIX), time.time() - t0)
    return MemberInputs(run, dict(folders), photos, Path(params_file).read_text())


def work_dir() -> Path:
    """This node's own working folder ($SEGPIPE_NODE_DIR, else .segpipe/node under the node's working directory)."""
    return Path(os.environ.get(WORK_ENV) or DEFAULT_WORK).absolute()


def _in_place(inputs: MemberInputs, run_dir: Path, params_file: Path) -> bool:
    """The flow's own run folder, photos and params file are here at the same paths, with the same content."""
    try:
        if not (run_dir / "validate" / "index.json").is_file() or Path(params_file).read_text() != inputs.params:
            return False
        if not all(holds(run_dir / rel, f.files) for rel, f in inputs.folders.items()):
            return False
        root = Path(json.loads((run_dir / "validate" / "index.json").read_text())["data_root"])
        return holds(root, inputs.photos)
    except OSError:         # unreadable here (another machine's path, no permission): not usable in place
        return False


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One member at a time stages a run on this node: the second finds the first one's verified copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _link_photos(store: ArtifactStore, photos: dict[str, str], blobs: Path, root: Path) -> int:
    """root/<name> for every photo, a hard link to this node's blob of its sha256 (fetched only when the node
    lacks it; a blob is written only whole and verified, so its name is its content). Returns blobs fetched."""
    fetched = 0
    for name, sha in photos.items():
        blob = blobs / sha
        if not blob.is_file():
            store.get_verified(photo_key(sha), blob, sha)
            fetched += 1
        dst = local_path(root, name, photo_key(sha))
        if dst.is_file() and os.path.samefile(dst, blob):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.link-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.link(blob, tmp)
        os.replace(tmp, dst)
    return fetched


def stage(inputs: MemberInputs, run_dir: Path, params_file: Path, store: ArtifactStore,
          work: Path | None = None) -> Staged:
    """The node's side: where a member finds its inputs. The flow's run folder itself when this node has it at
    the same path and every file checks out (a shared disk: nothing copied); else `<work>/runs/<run>/`, holding
    the stage folders and the params file as stored, and photos/ linked to this node's content-addressed copies,
    fetched from S3 (verified) only where missing or different."""
    run_dir = Path(run_dir)
    if _in_place(inputs, run_dir, Path(params_file)):
        return Staged(run_dir, Path(params_file), None)
    work = Path(work) if work is not None else work_dir()
    local = work / "runs" / inputs.run
    with _locked(work / "runs" / f".{inputs.run}.lock"):
        folders = sum(store.fetch_folder(f.prefix, f.files, local / rel) for rel, f in inputs.folders.items())
        photos = _link_photos(store, inputs.photos, work / "blobs", local / "photos")
        params = local / "params.yaml"
        if not params.is_file() or params.read_text() != inputs.params:
            tmp = params.with_name(f".params.yaml.{os.getpid()}")
            tmp.write_text(inputs.params)
            os.replace(tmp, params)
    return Staged(local, params, local / "photos", {"folders": folders, "photos": photos})
