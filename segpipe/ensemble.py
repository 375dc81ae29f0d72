"""Ensembles: load member checkpoints, TTA-predict, and combine probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from segpipe.engine import autocast_dtype, pick_device, predict_probs
from segpipe.metrics import MIoU
from segpipe.models import build_from_spec


@dataclass(frozen=True)
class Member:
    name: str
    checkpoint: Path


def load_member(ckpt: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from the resolved config stored inside its checkpoint (its ModelSpec dump: architecture,
    encoder, heads, constructor kwargs; the weights come from the checkpoint, so no encoder weights are loaded)."""
    state = torch.load(ckpt, map_location=device, weights_only=False)
    cfg = state["config"]
    model = build_from_spec(cfg["model"], cfg["num_classes"], pretrained=False)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def resize_probs(probs: np.ndarray, size: int) -> np.ndarray:
    """Bilinear-resize probabilities (N, C, h, w) -> (N, C, size, size); members of any input size combine."""
    if probs.shape[-1] == size and probs.shape[-2] == size:
        return probs
    t = torch.from_numpy(probs.astype(np.float32))
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).half().numpy()


def predict_members(
    members: list[Member], images_at: Callable[[int], np.ndarray], tta: tuple[str, ...], batch_size: int,
    out_size: int, weights: list[float] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weighted soft vote: mean of members' TTA probabilities at `out_size`; returns (ensemble, per-member).

    `images_at(size)` returns the images (N, size, size, 3) uint8 at a member's input size (cache it:
    members trained at different sizes each get their own decode, members sharing one reuse it).
    """
    device = pick_device()
    weights = weights or [1.0] * len(members)
    total, per_member = None, {}
    for w, member in zip(weights, members):
        model, cfg = load_member(member.checkpoint, device)
        images = images_at(cfg["input_size"])
        probs = predict_probs(model, images, batch_size, device, tta, cfg.get("channels_last", False),
                              autocast_dtype(device, cfg.get("amp", False)))
        probs = resize_probs(probs, out_size)
        per_member[member.name] = probs
        contrib = probs.astype(np.float32) * w
        total = contrib if total is None else total + contrib
        del model
    if total is None:
        raise ValueError("no ensemble members: train at least one model (params.yaml train.models)")
    return (total / sum(weights)).astype(np.float16), per_member


def score(probs: np.ndarray, masks: np.ndarray, num_classes: int, ignore_index: int) -> MIoU:
    metric = MIoU(num_classes, ignore_index)
    metric.update(masks, probs.argmax(1))
    return metric
