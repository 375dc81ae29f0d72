"""Train / evaluate / predict loops with atomic, resumable checkpoints."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segpipe.datasets import ArrayDataset, normalize
from segpipe.metrics import MIoU

log = logging.getLogger(__name__)

TTA_VIEWS = ("identity", "hflip", "vflip", "hvflip")


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


@dataclass
class TrainResult:
    best_miou: float
    best_epoch: int
    per_class: dict[str, float | None]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0
    images_per_second: float = 0.0


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


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file, fsync, then rename: a crash leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def train_model(
    model: nn.Module,
    loss_fn: nn.Module,
    train_ds: ArrayDataset,
    val_images: np.ndarray,
    val_masks: np.ndarray,
    cfg: LoopConfig,
    class_names: list[str],
    ignore_index: int,
    ckpt_dir: Path,
    resolved_config: dict[str, Any],
    device: torch.device | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train with per-epoch validation (set-level mIoU); write last.pt every epoch and best.pt on improvement.

    A `last.pt` in `ckpt_dir` written for the same resolved config is resumed from, and since every
    epoch reseeds all RNGs from (seed, epoch), a resumed run ends with the same weights as an unbroken one.
    """
    device = device or pick_device()
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = loss_fn.to(device)
    steps_per_epoch = max(1, math.ceil(len(train_ds) / cfg.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch)
    )
    amp_dtype = autocast_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    start_epoch, best, best_epoch, history, per_class_best = 0, -1.0, -1, [], {}
    last = ckpt_dir / "last.pt"
    if last.exists():
        state = torch.load(last, map_location=device, weights_only=False)
        if state.get("config") == resolved_config:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, best, best_epoch = state["epoch"] + 1, state["best_miou"], state["best_epoch"]
            history, per_class_best = state["history"], state.get("per_class_best", {})
            log.info("resuming from %s at epoch %d (best mIoU %.4f)", last, start_epoch, best)
        else:
            log.warning("ignoring %s: written for a different config; training from scratch", last)

    seen, busy = 0, 0.0
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(cfg.seed * 100_003 + epoch)
        loader = DataLoader(
            train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_ds) > cfg.batch_size,
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
            persistent_workers=False,
        )
        model.train()
        t0, total_loss, n_img = time.perf_counter(), 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, mininterval=2, disable=None)
        for images, masks in bar:
            images = normalize(images.to(device, non_blocking=True), cfg.channels_last)
            masks = masks.to(device, non_blocking=True)
            try:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(images)
                    loss = loss_fn(logits, masks)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                scaler.step(opt)
                scaler.update()
            except torch.OutOfMemoryError as e:
                raise TrainingOOM(
                    f"out of device memory at batch size {cfg.batch_size}: lower train.batch_size "
                    f"(try {max(1, cfg.batch_size // 2)}) or train.input_size"
                ) from e
            sched.step()
            total_loss += float(loss.detach()) * len(images)
            n_img += len(images)
            bar.set_postfix(loss=f"{total_loss / n_img:.3f}", img_s=f"{n_img / (time.perf_counter() - t0):.1f}")
        train_time = time.perf_counter() - t0
        seen += n_img
        busy += train_time

        metric = evaluate(model, val_images, val_masks, len(class_names), ignore_index, cfg.batch_size, device,
                          cfg.channels_last, amp_dtype)
        score = metric.value
        row = {"epoch": epoch, "train_loss": total_loss / max(1, n_img), "val_miou": score,
               "img_per_s": n_img / train_time, "lr": sched.get_last_lr()[0]}
        history.append(row)
        improved = score > best
        if improved:
            best, best_epoch, per_class_best = score, epoch, metric.per_class(class_names)
            atomic_save({"model": model.state_dict(), "epoch": epoch, "miou": score, "config": resolved_config},
                        ckpt_dir / "best.pt")
        atomic_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "best_miou": best, "best_epoch": best_epoch,
            "history": history, "per_class_best": per_class_best, "rng": _rng_state(), "config": resolved_config,
        }, last)
        log.info("epoch %d/%d loss %.4f val mIoU %.4f%s (%.1f img/s)", epoch + 1, cfg.epochs, row["train_loss"],
                 score, " *" if improved else "", row["img_per_s"])
        if on_epoch:
            on_epoch(row)
    return TrainResult(best, best_epoch, per_class_best, history, start_epoch, seen / busy if busy else 0.0)


def _forward_probs(model: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(x).float().softmax(1)


def _apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """Flip views are their own inverse, so the same function maps inputs and un-maps probabilities."""
    if view == "identity":
        return x
    dims = {"hflip": [3], "vflip": [2], "hvflip": [2, 3]}[view]
    return x.flip(dims)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int,
    device: torch.device,
    tta: tuple[str, ...] = (),
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Softmax probabilities (N, C, H, W) float16 for uint8 images (N, H, W, 3), averaged over identity + `tta` views."""
    unknown = set(tta) - set(TTA_VIEWS)
    if unknown:
        raise KeyError(f"Wrong TTA view(s) {sorted(unknown)}, supported views: {list(TTA_VIEWS)}")
    views = ("identity",) + tuple(v for v in tta if v != "identity")
    model.eval()
    out: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size].transpose(0, 3, 1, 2)))
        x = normalize(batch.to(device), channels_last)
        # all views of a batch in one forward pass: n views cost ~n x one view, never more
        stacked = torch.cat([_apply_view(x, v) for v in views])
        probs = _forward_probs(model, stacked, amp_dtype).view(len(views), len(x), -1, *x.shape[2:])
        merged = torch.stack([_apply_view(probs[i], v) for i, v in enumerate(views)]).mean(0)
        out.append(merged.half().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float16)


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
