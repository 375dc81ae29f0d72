"""A training member's state in the S3 store, keyed on its content: the checkpoint mirror (resume on another
machine) and the result cache (a member trained on the same data, params and code is fetched, not trained again).

Kept apart from `pipelines.train`, which imports torch: the flow claims a member's stored result (`claim_deferred`)
in its own process, which must stay light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from pipelines.common import CHECKPOINT_ENV, RESULT_ENV
from segpipe.storage import (ArtifactExistsError, ArtifactStore, CorruptArtifactError, S3Config, StorageError,
                             sha256_file)

log = logging.getLogger(__name__)


def content_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class _ContentKeyed:
    """State in the S3 store under `<root>/<task>/<content digest>/`, the root named by the environment variable
    `ENV` (set by the flow's train task; unset = off): any run with the same inputs finds it."""

    ENV = ""

    def __init__(self, store: ArtifactStore, prefix: str):
        self.store, self.prefix = store, prefix.strip("/")

    @classmethod
    def from_env(cls, key: str, config: dict):
        root = os.environ.get(cls.ENV)
        if not root:
            return None
        return cls(ArtifactStore(S3Config.from_env()), f"{root}/{key}/{content_digest(config)}")


class CheckpointMirror(_ContentKeyed):
    """Mirror the checkpoint dir to the S3 store after every epoch, so a task that lost its machine resumes elsewhere.

    Keys are content-addressed (`<prefix>/<task>/<config hash>/last-eNNNN.pt`): any later run with the same
    data, params and code state finds them, whichever run wrote them. Only the newest epoch is kept. The kept
    weights (best.pt, top-k files) go beside it under `state/` whenever they change: last.pt alone resumes the
    loop, but a resumed run whose later epochs do not improve has no other copy of its best weights.
    """

    ENV = CHECKPOINT_ENV

    def __init__(self, store: ArtifactStore, prefix: str):
        super().__init__(store, prefix)
        self._pushed: dict[str, str] = {}          # state file name -> sha256 last mirrored

    def _keys(self) -> list[str]:
        return [k for k in self.store.list(f"{self.prefix}/") if k.rsplit("/", 1)[-1].startswith("last-e")]

    def restore(self, local: Path) -> int | None:
        """Fetch the newest mirrored last.pt (and the kept weights) into `local`'s dir when there is no local
        last.pt; its epoch, or None."""
        if local.exists():
            return None
        for key in reversed(self._keys()):
            try:
                self.store.get_file(key, local)
                for skey in self.store.list(f"{self.prefix}/state/"):
                    name = skey.rsplit("/", 1)[-1]
                    self.store.get_file(skey, local.parent / name)
                    self._pushed[name] = sha256_file(local.parent / name)
            except CorruptArtifactError as e:       # checksum mismatch: never resume from damaged state
                log.warning("%s; discarding it", e)
                local.unlink(missing_ok=True)
                self.store.delete(key)
                continue
            epoch = int(key.rsplit("-e", 1)[1].split(".")[0])
            log.info("restored %s (epoch %d) from %s", local, epoch, self.store.url(key))
            return epoch
        return None

    def push(self, local: Path, epoch: int) -> None:
        for f in sorted(local.parent.glob("*.pt")):    # the kept weights first: last.pt is what a resume trusts
            if f.name == local.name:
                continue
            digest = sha256_file(f)
            if self._pushed.get(f.name) != digest:
                self.store.put_file(f, f"{self.prefix}/state/{f.name}", overwrite=True)
                self._pushed[f.name] = digest
        for skey in self.store.list(f"{self.prefix}/state/"):    # top-k files the loop has since dropped
            if not (local.parent / skey.rsplit("/", 1)[-1]).exists():
                self.store.delete(skey)
                self._pushed.pop(skey.rsplit("/", 1)[-1], None)
        key = f"{self.prefix}/last-e{epoch + 1:04d}.pt"
        self.store.put_file(local, key, overwrite=True)
        for old in self._keys():
            if old != key:
                self.store.delete(old)

    def clear(self) -> None:
        for key in self._keys() + self.store.list(f"{self.prefix}/state/"):
            self.store.delete(key)


class ResultCache(_ContentKeyed):
    """Finished members stored under `<prefix>/<task>/<content digest>/`: data hashes, every train param and the
    code version. A task whose digest is there is served from the store instead of training again.

    `DONE`, written last with a conditional write, says where the files are: a copy under the prefix (its name;
    empty: directly under it), or, for a member trained inside a flow run, the run's own stored folder of that
    member (a key prefix, with a `/`): the flow uploads the member's folder once, for the run, and claims it here."""

    ENV = RESULT_ENV

    def fetch(self, out_dir: Path) -> bool:
        """Download a complete stored result into out_dir (atomically); False if there is none or it is damaged."""
        keys = self.store.list(f"{self.prefix}/")
        if f"{self.prefix}/DONE" not in keys:        # written last: a result without it is partial
            return False
        where = self.store.get_bytes(f"{self.prefix}/DONE").decode().strip()
        source = where if "/" in where else f"{self.prefix}/{where}" if where else self.prefix
        tmp = out_dir.with_name(f".{out_dir.name}.fetch")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.store.download_dir(source, tmp)
        except CorruptArtifactError as e:
            log.warning("%s; training again", e)
            for k in keys:
                self.store.delete(k)
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        except StorageError as e:                   # DONE names files that are gone: drop the marker, train again
            log.warning("%s; training again", e)
            self.store.delete(f"{self.prefix}/DONE")
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        (tmp / "DONE").unlink(missing_ok=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return True

    def store_result(self, out_dir: Path) -> None:
        """Upload under a copy of its own, then claim DONE with a conditional write: two runs that trained the
        same member at once never mix their files; the first to finish is the stored result."""
        copy = uuid.uuid4().hex[:12]
        self.store.upload_dir(out_dir, f"{self.prefix}/{copy}")
        if not self.claim(copy):
            for k in self.store.list(f"{self.prefix}/{copy}/"):
                self.store.delete(k)

    def claim(self, where: str) -> bool:
        """Write DONE naming `where` (a copy's name, or a key prefix holding the files); False if another run
        claimed this digest first (its files stay the stored result)."""
        try:
            self.store.put_bytes(where.encode(), f"{self.prefix}/DONE")
            return True
        except ArtifactExistsError:
            log.info("%s: another run stored this result first; keeping its copy", self.store.url(self.prefix))
            return False


def claim_file(out_dir: Path) -> Path:
    """Beside a member's folder (never in it: the folder is the stage's manifest): what the flow is to claim."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.result-claim"


def defer_claim(out_dir: Path, cache: ResultCache, mirror: CheckpointMirror | None) -> None:
    """Leave storing a finished member to the flow (RESULT_DEFER_ENV): it uploads out_dir for its run beside the
    next stages, then claims that folder as the stored result and clears the checkpoint mirror (`claim_deferred`).
    The member's process ends without a second upload; until the claim, the mirror still holds the finished state,
    so a member lost in between resumes at its last epoch instead of training again."""
    todo = {"result": cache.prefix, "checkpoints": mirror.prefix if mirror is not None else None}
    _write_atomic(claim_file(out_dir), json.dumps(todo))


def claim_deferred(store: ArtifactStore, out_dir: Path, stored_prefix: str) -> bool:
    """After out_dir's files are stored under `stored_prefix`: claim them as the member's stored result and clear
    its checkpoint mirror, if its process left that to the caller. True if this copy is now the stored result."""
    pending = claim_file(out_dir)
    if not pending.is_file():
        return False
    todo = json.loads(pending.read_text())
    claimed = ResultCache(store, todo["result"]).claim(stored_prefix.strip("/"))
    if todo.get("checkpoints"):
        CheckpointMirror(store, todo["checkpoints"]).clear()
    pending.unlink(missing_ok=True)
    return claimed


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
