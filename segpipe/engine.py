"""Train / evaluate / predict loops with atomic, resumable checkpoints."""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import pickle
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from segpipe.datasets import normalize
from segpipe.metrics import MIoU
from segpipe.tta import TTA_VIEWS, predict_probs  # noqa: F401  (re-exported: engine.predict_probs)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class LoopConfig:
    """What the loop needs, independent of where the params came from."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: int
    amp: bool
    channels_last: bool
    num_workers: int
    seed: int
    optimizer: str = "adamw"          # adamw | sgd
    momentum: float = 0.9
    schedule: str = "cosine"          # cosine | poly, after a linear warmup
    poly_power: float = 0.9
    grad_accum: int = 1
    grad_clip: float = 5.0            # 0 = off
    ema: float = 0.0                  # EMA decay per optimiser step; 0 = off
    swa_start: float = 1.0            # fraction of epochs after which SWA averages; 1 = off
    keep_top_k: int = 1
    compile: bool = False


@dataclass
class TrainResult:
    best_miou: float
    best_epoch: int                   # -1 when the SWA average won
    per_class: dict[str, float | None]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0
    images_per_second: float = 0.0
    best_source: str = "epoch"        # epoch | ema | swa: which weights best.pt holds
    swa_miou: float | None = None
    top_k: list[dict[str, Any]] = field(default_factory=list)   # [{epoch, miou, file}] best first


class TrainingOOM(RuntimeError):
    """Out of device memory in a training step; the message names the batch size to lower."""


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 otherwise; None (fp32) on CPU or with amp off."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, file too large); the previous one is intact."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds a type no segpipe checkpoint has: it is refused, not unpickled."""


# numpy's RNG state (last.pt's rng.numpy, a uint32 array) is the one non-tensor type our checkpoints hold. With it
# allowed, every load can use weights_only=True, whose unpickler builds only tensors, plain containers and these:
# a checkpoint fetched from the store or another machine cannot run code when loaded. The second name is the one
# pickles written under numpy 1.x refer to.
torch.serialization.add_safe_globals([
    np._core.multiarray._reconstruct, (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray, np.dtype, type(np.dtype(np.uint32)),
])


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """torch.load with weights_only=True (tensors, plain containers, numpy's RNG state)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message is mostly advice (including "allowlist it"); keep only what names the refused type
        msg = str(e).split("WeightsUnpickler error:")[-1].split(" Please use")[0]
        paras = [p.strip() for p in msg.split("\n\n") if p.strip() and not p.startswith("Check the doc")]
        why = paras[-1].rstrip(".") if paras else repr(e)
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {path}: {why}. segpipe checkpoints hold only tensors, plain data and "
            "numpy's RNG state, so this file was not written by segpipe's train stage (or by a newer version that "
            "saves more): retrain it, or load it with torch.load(weights_only=False) only if you trust its source"
        ) from None


class _Recording(io.RawIOBase):
    """A file that keeps the OSError of a failed write: torch.save reports a full disk only as
    `enforce fail ... unexpected pos`, which says nothing of the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        view, done = memoryview(b).cast("B"), 0
        while done < len(view):        # a nearly full disk takes part of a write; the next part raises ENOSPC
            try:
                done += self.f.write(view[done:])
            except OSError as e:
                self.error = e
                raise
        return done


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file, fsync, then rename: a crash leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    rec = None
    try:
        with open(tmp, "wb", buffering=0) as f:
            rec = _Recording(f)
            torch.save(obj, rec)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)   # a full disk leaves no half file behind, and the previous one intact
        cause = e if isinstance(e, OSError) else getattr(rec, "error", None)
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            free = shutil.disk_usage(path.parent).free
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {os.strerror(cause.errno)} ({free / 2**20:.1f} MiB free on that "
                f"disk). The previous {path.name} is intact: free space there (or move the workspace), then run "
                "the task again; it resumes from the last checkpoint") from cause
        raise


def lr_factor(schedule: str, total_steps: int, warmup_steps: int, power: float = 0.9) -> Callable[[int], float]:
    """Linear warmup, then cosine or polynomial decay to 0 over the remaining steps."""
    if schedule not in ("cosine", "poly"):
        raise KeyError(f"Wrong schedule `{schedule}`, supported schedules: ['cosine', 'poly']")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else (1 - progress) ** power
    return factor


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    return lr_factor("cosine", total_steps, warmup_steps)


def make_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    raise KeyError(f"Wrong optimizer `{cfg.optimizer}`, supported optimizers: ['adamw', 'sgd']")


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _reseed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id, base_seed drawn from the loader's generator
    info = torch.utils.data.get_worker_info()
    if hasattr(info.dataset, "reseed"):
        info.dataset.reseed(torch.initial_seed() % 2**32)


def _epoch_loader(ds: Dataset, cfg: LoopConfig, epoch: int, device: torch.device, shuffle: bool = True) -> DataLoader:
    # reseeding from (seed, epoch) makes epoch e's batches and augmentations the same in a resumed run
    seed = cfg.seed * 100_003 + epoch
    seed_everything(seed)
    if hasattr(ds, "reseed"):
        ds.reseed(seed)
    return DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=shuffle, drop_last=shuffle and len(ds) > cfg.batch_size,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", worker_init_fn=_reseed_worker,
        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
    )


@torch.no_grad()
def update_bn(model: nn.Module, loader: DataLoader, device: torch.device, channels_last: bool) -> None:
    """Recompute BatchNorm running statistics for averaged weights (SWA): a cumulative mean over one pass."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for images, _ in loader:
        model(normalize(images.to(device, non_blocking=True), channels_last))
    for m, mom in momenta.items():
        m.momentum = mom
    model.train(was_training)


def _is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError when host memory runs out."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


def _unwrap(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AveragedModel's state dict -> the plain model's (drop `module.` and the n_averaged counter)."""
    return {k.removeprefix("module."): v for k, v in sd.items() if k != "n_averaged"}


def train_model(
    model: nn.Module,
    loss_fn: nn.Module,
    train_ds: Dataset,
    val_images: np.ndarray,
    val_masks: np.ndarray,
    cfg: LoopConfig,
    class_names: list[str],
    ignore_index: int,
    ckpt_dir: Path,
    resolved_config: dict[str, Any],
    device: torch.device | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train with per-epoch validation (set-level mIoU); write last.pt every epoch, best.pt on improvement.

    A `last.pt` in `ckpt_dir` written for the same resolved config is resumed from, and since every
    epoch reseeds all RNGs from (seed, epoch), a resumed run ends with the same weights as an unbroken one.
    With EMA on, the EMA weights are the ones validated and kept; with SWA on, the average of the last
    epochs (BatchNorm statistics recomputed) replaces best.pt when it validates better.
    """
    device = device or pick_device()
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cfg.compile else model    # state dicts always come from the uncompiled model
    loss_fn = loss_fn.to(device)
    micro_batches = len(train_ds) // cfg.batch_size if len(train_ds) > cfg.batch_size else 1
    steps_per_epoch = max(1, math.ceil(micro_batches / cfg.grad_accum))
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(
        cfg.schedule, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, cfg.poly_power))
    amp_dtype = autocast_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    swa_from = math.ceil(cfg.swa_start * cfg.epochs) if cfg.swa_start < 1 else None
    swa = AveragedModel(model) if swa_from is not None else None

    start_epoch, best, best_epoch, history, per_class_best, top = 0, -1.0, -1, [], {}, []
    last = ckpt_dir / "last.pt"
    if last.exists():
        state = load_checkpoint(last, device)
        if state.get("config") == resolved_config:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            if swa is not None:
                swa.load_state_dict(state["swa"])
            start_epoch, best, best_epoch = state["epoch"] + 1, state["best_miou"], state["best_epoch"]
            history, per_class_best, top = state["history"], state.get("per_class_best", {}), state.get("top", [])
            log.info("resuming from %s at epoch %d (best mIoU %.4f)", last, start_epoch + 1, best)
        else:
            log.warning("ignoring %s: written for a different config; training from scratch", last)

    seen, busy = 0, 0.0
    epochs_bar = tqdm(range(start_epoch, cfg.epochs), desc=desc, initial=start_epoch, total=cfg.epochs,
                      unit="epoch", disable=None)
    for epoch in epochs_bar:
        loader = _epoch_loader(train_ds, cfg, epoch, device)
        net.train()
        t0, total_loss, n_img = time.perf_counter(), 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, mininterval=2, disable=None)
        opt.zero_grad(set_to_none=True)
        n_micro = len(loader)
        for i, (images, masks) in enumerate(bar):
            images = normalize(images.to(device, non_blocking=True), cfg.channels_last)
            masks = masks.to(device, non_blocking=True)
            try:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    # logits, or a SegOutput (side outputs, class presence) that the loss takes apart
                    loss = loss_fn(net(images), masks)
                scaler.scale(loss / cfg.grad_accum).backward()
                if (i + 1) % cfg.grad_accum == 0 or i + 1 == n_micro:
                    if cfg.grad_clip:
                        scaler.unscale_(opt)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                    if ema is not None:
                        ema.update_parameters(model)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_oom(e):
                    raise
                raise TrainingOOM(
                    f"out of device memory at batch size {cfg.batch_size}: lower train.batch_size "
                    f"(try {max(1, cfg.batch_size // 2)}, with train.grad_accum: {cfg.grad_accum * 2} to keep "
                    f"the effective batch) or train.input_size"
                ) from e
            total_loss += float(loss.detach()) * len(images)
            n_img += len(images)
            bar.set_postfix(loss=f"{total_loss / n_img:.3f}", img_s=f"{n_img / (time.perf_counter() - t0):.1f}")
        train_time = time.perf_counter() - t0
        seen += n_img
        busy += train_time
        if swa is not None and epoch >= swa_from:
            swa.update_parameters(model)

        kept = ema.module if ema is not None else model      # the weights validated, kept and shipped
        metric = evaluate(kept, val_images, val_masks, len(class_names), ignore_index, cfg.batch_size, device,
                          cfg.channels_last, amp_dtype)
        score = metric.value
        per_class = metric.per_class(class_names)
        row = {"epoch": epoch, "train_loss": total_loss / max(1, n_img), "val_miou": score,
               "img_per_s": n_img / train_time, "lr": sched.get_last_lr()[0], "per_class_iou": per_class}
        history.append(row)
        improved = score > best
        weights = None
        if improved:
            best, best_epoch, per_class_best = score, epoch, per_class
            weights = {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()}
            atomic_save({"model": weights, "epoch": epoch, "miou": score, "source": "ema" if ema else "epoch",
                         "config": resolved_config}, ckpt_dir / "best.pt")
        if cfg.keep_top_k > 1:
            top = _keep_top_k(top, cfg.keep_top_k, epoch, score, kept, weights, ckpt_dir, resolved_config)
        atomic_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema else None,
            "swa": swa.state_dict() if swa else None, "epoch": epoch, "best_miou": best, "best_epoch": best_epoch,
            "history": history, "per_class_best": per_class_best, "top": top, "rng": _rng_state(),
            "config": resolved_config,
        }, last)
        if on_checkpoint:
            on_checkpoint(last, epoch)
        log.info("epoch %d/%d loss %.4f val mIoU %.4f%s (%.1f img/s)", epoch + 1, cfg.epochs, row["train_loss"],
                 score, " *" if improved else "", row["img_per_s"])
        epochs_bar.set_postfix(loss=f"{row['train_loss']:.3f}", mIoU=f"{score:.4f}", best=f"{best:.4f}",
                               img_s=f"{row['img_per_s']:.1f}")
        if on_epoch:
            on_epoch(row)

    result = TrainResult(best, best_epoch, per_class_best, history, start_epoch, seen / busy if busy else 0.0,
                         "ema" if ema is not None else "epoch", None, top)
    if swa is not None and int(swa.n_averaged) > 0:
        _finish_swa(swa, result, train_ds, val_images, val_masks, cfg, class_names, ignore_index, ckpt_dir,
                    resolved_config, device, amp_dtype)
    return result


def _keep_top_k(top: list[dict], k: int, epoch: int, score: float, kept: nn.Module, weights: dict | None,
                ckpt_dir: Path, resolved_config: dict) -> list[dict]:
    """Keep the k best epochs' weights on disk (epoch ensemble); evicted files are deleted."""
    if len(top) >= k and score <= top[-1]["miou"]:
        return top
    name = f"top-e{epoch + 1:03d}.pt"
    weights = weights or {n: v.detach().cpu().clone() for n, v in kept.state_dict().items()}
    atomic_save({"model": weights, "epoch": epoch, "miou": score, "config": resolved_config}, ckpt_dir / name)
    top = sorted(top + [{"epoch": epoch, "miou": score, "file": name}], key=lambda t: -t["miou"])
    for gone in top[k:]:
        (ckpt_dir / gone["file"]).unlink(missing_ok=True)
    return top[:k]


def _finish_swa(swa: AveragedModel, result: TrainResult, train_ds: Dataset, val_images: np.ndarray,
                val_masks: np.ndarray, cfg: LoopConfig, class_names: list[str], ignore_index: int, ckpt_dir: Path,
                resolved_config: dict, device: torch.device, amp_dtype: torch.dtype | None) -> None:
    """BatchNorm statistics for the averaged weights, then validate; the average replaces best.pt if better."""
    update_bn(swa.module, _epoch_loader(train_ds, cfg, cfg.epochs, device, shuffle=False), device, cfg.channels_last)
    metric = evaluate(swa.module, val_images, val_masks, len(class_names), ignore_index, cfg.batch_size, device,
                      cfg.channels_last, amp_dtype)
    result.swa_miou = metric.value
    weights = {k: v.detach().cpu().clone() for k, v in swa.module.state_dict().items()}
    atomic_save({"model": weights, "epoch": -1, "miou": metric.value, "source": "swa", "config": resolved_config},
                ckpt_dir / "swa.pt")
    log.info("SWA over %d epochs: val mIoU %.4f (best single epoch %.4f)", int(swa.n_averaged), metric.value,
             result.best_miou)
    if metric.value > result.best_miou:
        os.replace(ckpt_dir / "swa.pt", ckpt_dir / "best.pt")
        result.best_miou, result.best_epoch, result.best_source = metric.value, -1, "swa"
        result.per_class = metric.per_class(class_names)


@torch.no_grad()
def evaluate(
    model: nn.Module, images: np.ndarray, masks: np.ndarray, num_classes: int, ignore_index: int,
    batch_size: int, device: torch.device, channels_last: bool = False, amp_dtype: torch.dtype | None = None,
) -> MIoU:
    """One confusion matrix over the whole set (the competition's mIoU)."""
    metric = MIoU(num_classes, ignore_index)
    for start in range(0, len(images), batch_size):
        probs = predict_probs(model, images[start:start + batch_size], batch_size, device, (), channels_last, amp_dtype)
        metric.update(masks[start:start + batch_size], probs.argmax(1))
    return metric
