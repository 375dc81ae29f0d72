"""Stage `train`: one model x seed x fold; writes best checkpoint, out-of-fold probabilities, metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from dvclive import Live

from pipelines.codedeps import ROOT, closure
from pipelines.common import CHECKPOINT_ENV, RESULT_ENV, parser, run_main, timed_as, write_json
from segpipe.config import DataParams, RetrainParams, TrainParams, parse_section, read_params
from segpipe.datasets import ArrayDataset, build_augment, decode_all, load_index, load_pseudo_index
from segpipe.engine import LoopConfig, load_checkpoint, pick_device, predict_probs, train_model, autocast_dtype
from segpipe.losses import SegLoss
from segpipe.models import build_from_spec
from segpipe.probstore import npz_writer, stored_size, to_stored
from segpipe.storage import (ArtifactExistsError, ArtifactStore, CorruptArtifactError, S3Config, StorageError,
                             UnverifiedArtifactError, sha256_file)


log = logging.getLogger("pipelines.train")

# CHECKPOINT_ENV set (e.g. to `checkpoints`) by the flow's train task: every epoch's last.pt is mirrored to the S3
# store; RESULT_ENV (e.g. `results`): finished members are stored under a content key and reused
# the code that decides trained weights: its import closure (the files dvc.yaml lists for the stage), part of the
# content key, so a change in any of them retrains
def code_version() -> str:
    h = hashlib.sha256()
    for rel in closure("pipelines.train"):
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def content_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainResult:
    key: str
    best_miou: float
    out_dir: Path


def task_key(model: str, seed: int, fold: int) -> str:
    """The matrix key: also the artifact folder name and the Prefect task-run name."""
    return f"{model}-s{seed}-f{fold}"


def cpu_threads(params: TrainParams) -> int:
    """Split the CPU between the tasks that run at once (the flow sets SEGPIPE_PARALLEL_TASKS)."""
    if params.threads:
        return params.threads
    parallel = max(1, int(os.environ.get("SEGPIPE_PARALLEL_TASKS", "1")))
    return max(1, (os.cpu_count() or 1) // parallel)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def samples_digest(samples: list) -> str:
    """sha256 over every image and mask file a task reads, in order: a corrected label or photo changes it."""
    h = hashlib.sha256()
    for s in samples:
        for path in (s.image, s.mask):
            if path is not None:
                h.update(s.file_name.encode() + b"\0" + Path(path).read_bytes())
    return h.hexdigest()


def resolved_config(params: TrainParams, model: str, seed: int, fold: int, classes: list[str], inputs: dict,
                    cfg: LoopConfig, class_weights: list[float] | None, n_train: int, n_val: int) -> dict:
    """Everything that decides the trained weights; saved in every checkpoint, and the resume/content key."""
    train = params.model_dump(mode="json", exclude={"models", "seeds", "folds", "threads", "epochs"})
    return {"name": model, "model": params.models[model].model_dump(mode="json"), "seed": seed, "fold": fold,
            "classes": classes, "num_classes": len(classes), "input_size": params.input_size,
            "amp": params.amp, "channels_last": params.channels_last, "train": train, "loop": asdict(cfg), "class_weights": class_weights,
            "inputs": inputs, "code": code_version(), "n_train": n_train, "n_val": n_val, "pseudo": "pseudo" in inputs,
            "pseudo_teacher": inputs.get("pseudo_teacher")}


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
            except UnverifiedArtifactError as e:    # no checksum: never unpickled; left for its owner to judge
                log.warning("%s; not resuming from it", e)
                local.unlink(missing_ok=True)
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
    code version. A task whose digest is there is served from the store instead of training again."""

    ENV = RESULT_ENV

    def fetch(self, out_dir: Path) -> bool:
        """Download a complete stored result into out_dir (atomically); False if there is none or it is damaged."""
        keys = self.store.list(f"{self.prefix}/")
        if f"{self.prefix}/DONE" not in keys:        # written last: a result without it is partial
            return False
        # DONE names the copy that was stored first (empty: an older result, files directly under the prefix)
        copy = self.store.get_bytes(f"{self.prefix}/DONE").decode().strip()
        tmp = out_dir.with_name(f".{out_dir.name}.fetch")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.store.download_dir(f"{self.prefix}/{copy}" if copy else self.prefix, tmp)
        except CorruptArtifactError as e:
            log.warning("%s; training again", e)
            for k in keys:
                self.store.delete(k)
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        except StorageError as e:                   # DONE names a copy that is gone: drop the marker, train again
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
        try:
            self.store.put_bytes(copy.encode(), f"{self.prefix}/DONE")
        except ArtifactExistsError:
            log.info("%s: another run stored this result first; keeping its copy", self.store.url(self.prefix))
            for k in self.store.list(f"{self.prefix}/{copy}/"):
                self.store.delete(k)


class BackgroundPush:
    """The mirror's push, in a thread of its own while the next epoch trains (a synchronous push stalled the loop,
    and on a GPU machine the GPU, for the seconds of every upload). Each epoch's checkpoint folder is snapshotted by
    hard links first (the loop replaces its files by rename, so the snapshot never changes under the upload); at
    most one push is in flight, so a newer checkpoint waits for the one before it. A failed push fails the member
    at the next checkpoint or at `wait()`, as a synchronous one did; the resume state in S3 trails by at most the
    epoch being pushed."""

    def __init__(self, mirror: CheckpointMirror, key: str):
        self.mirror, self.key = mirror, key
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"push-{key}")
        self.pending: Future | None = None

    def __call__(self, last: Path, epoch: int) -> None:
        self.wait("s3")                   # the loop waits here only when uploads are slower than epochs
        snap = last.parent / ".push"
        shutil.rmtree(snap, ignore_errors=True)
        snap.mkdir()
        for f in last.parent.glob("*.pt"):
            os.link(f, snap / f.name)
        self.pending = self.pool.submit(self._push, snap / last.name, epoch)

    def _push(self, local: Path, epoch: int) -> None:
        with timed_as("upload", self.key):      # beside the loop's work: not time the work waits
            self.mirror.push(local, epoch)

    def wait(self, kind: str = "s3") -> None:
        """Until the push in flight (if any) is done; raises its error."""
        pending, self.pending = self.pending, None
        if pending is not None:
            with timed_as(kind, self.key):
                pending.result()


def live_dir(out_dir: Path) -> Path:
    """Where a member's learning curves grow while it trains (its out_dir appears only once it is done, by rename);
    the flow's progress artifact reads them here."""
    return out_dir.parent / ".live" / out_dir.name


class _FilesOnlyLive(Live):
    """dvclive's Live, files only. Its DVC/git hook-up reads git HEAD (and raises in a repository with no commit,
    as a fresh clone of a template has), runs `dvc init` in a git checkout that has no .dvc, git-adds the log
    under `dvc exp run`, and posts to DVC Studio when a token is set; a member run by `dvc repro` or a Prefect task
    wants none of that, only the files `dvc plots show` reads."""

    def _init_dvc(self) -> None:
        self._dvc_file = "dvc.yaml"                 # never written: dvcyaml=None

    def _init_studio(self) -> None:
        self._studio_events_to_skip.update({"start", "data", "done"})


class LiveCurves:
    """The member's learning curves through dvclive (`<dir>/plots/metrics/*.tsv` + `<dir>/metrics.json`), one step
    per epoch, written as each epoch ends: `dvc plots show <dir>/plots/metrics` draws them while the member trains.

    The log always starts afresh and replays the epochs the run resumes with (the checkpoint's history), so after a
    kill, a restore from the S3 mirror (which may trail the local log by an epoch) or DVC deleting its outputs
    before a repro, step N is epoch N exactly once; dvclive's `resume=True` would continue whatever steps the folder
    holds. No experiment is saved and no dvc.yaml written: the stage's dvc.yaml declares the plots.
    """

    def __init__(self, path: Path, history: list[dict] = ()):
        shutil.rmtree(path, ignore_errors=True)     # also makes DVCLIVE_RESUME=true in the environment harmless
        self.live = _FilesOnlyLive(str(path), save_dvc_exp=False, dvcyaml=None, report=None)
        (path / "plots" / "metrics").mkdir(parents=True, exist_ok=True)   # the declared plots output, even if empty
        for row in history:
            self(row)

    def __call__(self, row: dict) -> None:
        """Log one epoch (an engine history row); the engine's `on_epoch` hook."""
        self.live.step = row["epoch"]
        for name in ("train_loss", "val_miou", "lr"):
            self.live.log_metric(name, float(row[name]))
        for c, v in row.get("per_class_iou", {}).items():
            if v is not None:                       # None: the class is in neither the fold's labels nor predictions
                self.live.log_metric(f"iou/{c}", float(v))
        self.live.make_summary()


def resumed_history(last: Path, config: dict) -> list[dict]:
    """The epochs a run resumes with: last.pt's history when it was written for this config (the engine's rule),
    else none."""
    if not last.exists():
        return []
    state = load_checkpoint(last, mmap=True)
    return state["history"] if state.get("config") == config else []


AFFECTED = "affected.json"   # the audit stage's list of dropped / relabelled training images


def apply_audit(samples: list, audit_dir: Path, fold: int | None = None) -> list:
    """Training samples after the audit's action: `drop` removes the listed images, `relabel` swaps their masks
    for the audit's confident labels (audit_dir/<mask>; with audit.teacher=fold the ones voted for `fold`'s student
    by fold `fold`'s members); `none` changes nothing."""
    affected = json.loads((audit_dir / AFFECTED).read_text())
    by_name = {r["file_name"]: r for r in affected["images"]}

    def relabelled(entry: dict) -> Path:
        if "masks" not in entry:
            return audit_dir / entry["mask"]
        if str(fold) not in entry["masks"]:
            raise KeyError(f"{audit_dir / AFFECTED}: no relabelled mask of {entry['file_name']} for fold {fold}'s "
                           f"student (folds {sorted(entry['masks'])}): run the audit stage again")
        return audit_dir / entry["masks"][str(fold)]

    if affected["action"] == "drop":
        kept = [s for s in samples if s.file_name not in by_name]
    elif affected["action"] == "relabel":
        kept = [replace(s, mask=relabelled(by_name[s.file_name])) if s.file_name in by_name else s for s in samples]
    else:
        return samples
    hit = sum(s.file_name in by_name for s in samples)
    print(f"audit: {affected['action']} {hit} of this member's {len(samples)} training images "
          f"<audit.action={affected['action']}, audit.n={len(by_name)}"
          + (f", audit.teacher={affected.get('teacher') or 'all'}" if affected["action"] == "relabel" else "")
          + ">", flush=True)
    return kept


def run(
    data: DataParams, params: TrainParams, model: str, seed: int, fold: int, validate_dir: Path, split_dir: Path,
    out_dir: Path, *, epochs: int | None = None, pseudo_dir: Path | None = None, resume_dir: Path | None = None,
    live: Path | None = None, audit_dir: Path | None = None, data_root: Path | None = None,
) -> TrainResult:
    """Train `model` on every fold but `fold` (+ pseudo-labelled test images if given); validate on `fold`.

    The learning curves grow in `live` (default `live_dir(out_dir)`) epoch by epoch, and are copied into
    out_dir/dvclive when the member is published. `data_root`: the photos' folder, if not the indexes' data_root
    (a Ray node's staged copy); the content key reads the photos' bytes, never their paths."""
    if model not in params.models:
        raise KeyError(f"Wrong model `{model}`, models in params.yaml train.models: {sorted(params.models)}")
    torch.set_num_threads(cpu_threads(params))
    spec = params.models[model]
    key = task_key(model, seed, fold)
    out_dir = Path(out_dir)
    live = Path(live) if live else live_dir(out_dir)
    validate_dir, split_dir = Path(validate_dir), Path(split_dir)
    train_all, _, classes = load_index(validate_dir / "index.json", data_root)
    folds = json.loads((split_dir / "folds.json").read_text())["folds"]
    if fold not in set(folds.values()):
        raise ValueError(f"fold {fold} not in the split (folds: {sorted(set(folds.values()))}); check train.folds")
    # images outside folds.json (not in a quick profile's subset: split.subset) take no part
    train_s = [s for s in train_all if s.file_name in folds and folds[s.file_name] != fold]
    val_s = [s for s in train_all if folds.get(s.file_name) == fold]
    if audit_dir is not None:
        # the label-noise audit's worst images, dropped or relabelled: on the training side only, so every round's
        # OOF mIoU is measured on the same images and labels
        train_s = apply_audit(train_s, Path(audit_dir), fold)
    if pseudo_dir is not None:
        # pseudo-labelled test images only ever join the training side, so validation stays honest
        train_s += load_pseudo_index(Path(pseudo_dir) / "index.json", fold, data_root)
    inputs = {"train": samples_digest(train_s), "val": samples_digest(val_s)}
    if pseudo_dir is not None:
        inputs["pseudo"] = _sha256(Path(pseudo_dir) / "index.json")
        inputs["pseudo_teacher"] = json.loads((Path(pseudo_dir) / "index.json").read_text()).get("teacher", "all")
    if audit_dir is not None:
        inputs["audit"] = _sha256(Path(audit_dir) / AFFECTED)

    size = params.input_size
    threads = cpu_threads(params)
    augment = build_augment(params.augment)       # a bad augmentation spec fails before any decoding
    cfg = LoopConfig(epochs or params.epochs, params.batch_size, params.lr, params.weight_decay,
                     params.warmup_epochs, params.amp, params.channels_last, params.num_workers, seed,
                     optimizer=params.optimizer, momentum=params.momentum, schedule=params.schedule,
                     poly_power=params.poly_power, grad_accum=params.grad_accum, grad_clip=params.grad_clip,
                     ema=params.ema, swa_start=params.swa_start, keep_top_k=params.keep_top_k,
                     compile=params.compile)
    weights = None
    if params.class_weights == "eda":
        by_name = json.loads((validate_dir / "eda" / "eda_metrics.json").read_text())["class_weights"]
        weights = torch.tensor([by_name[c] for c in classes], dtype=torch.float32)
    resolved = resolved_config(params, model, seed, fold, classes, inputs, cfg,
                               None if weights is None else weights.tolist(), len(train_s), len(val_s))
    cache = ResultCache.from_env(key, resolved)
    with timed_as("s3", key):
        fetched = cache is not None and cache.fetch(out_dir)
    if fetched:
        m = json.loads((out_dir / "metrics.json").read_text())
        print(f"train {key}: unchanged inputs, params and code; reused {cache.store.url(cache.prefix)} "
              f"(best val mIoU {m['best_miou']:.4f})", flush=True)
        LiveCurves(live, json.loads((out_dir / "history.json").read_text()))
        return TrainResult(key, m["best_miou"], out_dir)
    tr_img, tr_mask = decode_all(train_s, size, threads)
    va_img, va_mask = decode_all(val_s, size, threads)
    torch.manual_seed(seed)
    net = build_from_spec(spec, len(classes))
    loss = SegLoss(params.loss, data.ignore_index, weights, params.label_smoothing, params.focal_gamma,
                   side_weight=spec.side_weight, aux_weight=spec.aux_weight)
    resume_dir = Path(resume_dir) if resume_dir else out_dir.parent / ".resume" / out_dir.name
    resume_dir.mkdir(parents=True, exist_ok=True)
    mirror = CheckpointMirror.from_env(key, resolved)
    if mirror is not None:
        with timed_as("s3", key):
            mirror.restore(resume_dir / "last.pt")
    print(f"train {key}: {len(train_s)} train / {len(val_s)} val images at {size}px, "
          f"{cfg.epochs} epochs on {pick_device()} ({threads} threads)", flush=True)
    push = BackgroundPush(mirror, key) if mirror else None
    curves = LiveCurves(live, resumed_history(resume_dir / "last.pt", resolved))
    result = train_model(net, loss, ArrayDataset(tr_img, tr_mask, augment), va_img, va_mask, cfg, classes,
                         data.ignore_index, resume_dir, resolved, on_epoch=curves, on_checkpoint=push, desc=key)

    best = load_checkpoint(resume_dir / "best.pt")
    net.load_state_dict(best["model"])
    device = pick_device()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # out-of-fold probabilities of the kept weights for ensembling and weight search, as segpipe.probstore keeps
    # them (uint8 at min(size, 256)), written a batch at a time: the fold's probabilities are never all in memory
    s, bs = stored_size(size), params.batch_size
    with npz_writer(tmp / "oof.npz", "probs", (len(val_s), len(classes), s, s),
                    file_names=np.array([v.file_name for v in val_s])) as oof:
        for start in range(0, len(va_img), bs):
            oof.write(to_stored(predict_probs(net.to(device), va_img[start:start + bs], bs, device, (),
                                              params.channels_last, autocast_dtype(device, params.amp)), size))
    shutil.copy2(resume_dir / "best.pt", tmp / "best.pt")
    for t in result.top_k:
        (tmp / "top_k").mkdir(exist_ok=True)
        shutil.copy2(resume_dir / t["file"], tmp / "top_k" / t["file"])
    write_json(tmp / "metrics.json", {
        "key": key, "best_miou": result.best_miou, "best_epoch": result.best_epoch, "best_source": result.best_source,
        "swa_miou": result.swa_miou, "top_k": result.top_k, "per_class_iou": result.per_class,
        "img_per_s": result.images_per_second, "resumed_from_epoch": result.resumed_from})
    write_json(tmp / "history.json", result.history)
    shutil.copytree(live, tmp / "dvclive")     # the curves travel with the member (S3, the result cache)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    if push is not None:
        push.wait()             # the last epoch's push, which ran beside the OOF pass, before its state goes
    shutil.rmtree(resume_dir, ignore_errors=True)   # finished: the resume state is no longer needed
    with timed_as("s3", key):
        if cache is not None:
            cache.store_result(out_dir)
        if mirror is not None:
            mirror.clear()
    where = "SWA average" if result.best_source == "swa" else f"epoch {result.best_epoch + 1}"
    print(f"train {key}: best val mIoU {result.best_miou:.4f} ({where}) -> {out_dir}", flush=True)
    return TrainResult(key, result.best_miou, out_dir)


def main(round_: int = 0) -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--validate", type=Path, default=Path("artifacts/validate"))
    p.add_argument("--split", type=Path, default=Path("artifacts/split"))
    p.add_argument("--pseudo", type=Path, default=Path(f"artifacts/pseudo/r{round_}") if round_ else None)
    p.add_argument("--out-root", type=Path, default=Path(f"artifacts/retrain/r{round_}" if round_ else "artifacts/train"))
    p.add_argument("--live", type=Path, help="the dvclive folder the learning curves grow in (dvc.yaml's plots); "
                   "default: <out-root>/.live/<member>")
    p.add_argument("--audit", type=Path, help="the label-noise audit's output: its affected.json says which "
                   "training images to drop or relabel (audit.action)")
    p.add_argument("--data-root", type=Path, help="the photos' folder, if not the validated index's data_root "
                   "(a Ray node's staged copy)")
    a = p.parse_args()
    raw = read_params(a.params)
    data, params = parse_section(raw, "data", DataParams), parse_section(raw, "train", TrainParams)
    epochs = parse_section(raw, "retrain", RetrainParams).epochs if round_ else None
    out_dir = a.out_root / task_key(a.model, a.seed, a.fold)
    if _left_out_by_profile(a.params, params, a.model, a.seed, a.fold):
        skip(out_dir, a.live, raw.get("profile"))
        return
    run_main(lambda: run(data, params, a.model, a.seed, a.fold, a.validate, a.split, out_dir, epochs=epochs,
                         pseudo_dir=a.pseudo, live=a.live, audit_dir=a.audit,
                         data_root=a.data_root))


def _left_out_by_profile(params_file: Path, params: TrainParams, model: str, seed: int, fold: int) -> bool:
    """In train.* as written (dvc.yaml's matrix) but not in the active profile's: a member to skip. A member in
    neither (say a fold the split lacks) is not skipped: it runs, and fails naming the cause."""
    base = (yaml.safe_load(Path(params_file).read_text()) or {}).get("train", {})
    in_base = model in base.get("models", {}) and seed in base.get("seeds", ()) and fold in base.get("folds", ())
    return in_base and not (model in params.models and seed in params.seeds and fold in params.folds)


def skip(out_dir: Path, live: Path | None, profile: str | None) -> None:
    """A member of dvc.yaml's matrix (expanded from train.* as written) that the active profile leaves out: an
    empty, marked output so DVC has its outs; infer finds no best.pt there and ignores it."""
    shutil.rmtree(out_dir, ignore_errors=True)
    write_json(out_dir / "skipped.json", {"member": out_dir.name, "profile": profile,
                                          "reason": "not in the active profile's train.models/seeds/folds"})
    LiveCurves(live or live_dir(out_dir))      # an empty log: DVC has the stage's plots output
    print(f"train {out_dir.name}: skipped, not in profile {profile!r} <profile={profile}>", flush=True)


if __name__ == "__main__":
    main()
