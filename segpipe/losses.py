"""Segmentation losses by name, combined as a weighted sum: `{ce: 1.0, dice: 1.0}` in params.yaml; plus the losses of
a model's extra heads (deep-supervision side outputs, class presence) when it returns a `SegOutput` in training."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from segpipe.config import LOSS_NAMES as LOSSES
from segpipe.outputs import SegOutput


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, eps: float = 1.0) -> torch.Tensor:
    """Soft multi-class Dice over the batch; logits (N, C, H, W), target (N, H, W); ignored pixels excluded."""
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.float().softmax(1) * valid
    onehot = F.one_hot(target.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2) * valid
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0        # classes absent from the batch would only add noise
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice[present].mean() if present.any() else logits.sum() * 0


def parse_loss(spec: str | dict[str, float]) -> dict[str, float]:
    """`ce+dice` (equal weights) or `{ce: 1.0, lovasz: 0.5}` -> {name: weight}; unknown names are an error."""
    weights = {name.strip(): 1.0 for name in spec.split("+")} if isinstance(spec, str) else dict(spec)
    unknown = sorted(set(weights) - set(LOSSES))
    if unknown or not weights:
        raise KeyError(f"Wrong loss {unknown or spec!r}, supported losses: {list(LOSSES)} (or a '+'-joined string)")
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"loss weights must be >= 0 with at least one > 0, got {weights}")
    return {k: float(w) for k, w in weights.items() if w > 0}


def presence_targets(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(N, H, W) labels -> (N, C) float: 1 where class c has at least one (non-ignored) pixel in the image."""
    valid = target != ignore_index
    onehot = F.one_hot(target.clamp(0, num_classes - 1), num_classes) & valid.unsqueeze(-1)
    return onehot.flatten(1, 2).any(1).float()


class SegLoss(nn.Module):
    """Weighted sum of cross-entropy (class weights, label smoothing), Dice, Focal and Lovasz-softmax.

    Every term skips `ignore_index` pixels, so pseudo-label pixels under the confidence threshold teach nothing.
    Given a `SegOutput` (a model with extra heads, in training) it adds `side_weight` x the same loss on every
    deep-supervision output (upsampled to the mask) and `aux_weight` x BCE of the class-presence logits against
    "class has a pixel in this image" (ModelSpec's side_weight / aux_weight; pipelines.train passes them).
    """

    def __init__(self, kind: str | dict[str, float], ignore_index: int, class_weights: torch.Tensor | None = None,
                 label_smoothing: float = 0.0, focal_gamma: float = 2.0, side_weight: float = 0.0,
                 aux_weight: float = 0.0):
        super().__init__()
        self.weights = parse_loss(kind)
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.side_weight, self.aux_weight = side_weight, aux_weight
        self.register_buffer("class_weights", class_weights)
        # smp's multiclass Focal and Lovasz both honour ignore_index; Lovasz is the mIoU surrogate itself
        self.focal = smp.losses.FocalLoss("multiclass", gamma=focal_gamma, ignore_index=ignore_index)
        self.lovasz = smp.losses.LovaszLoss("multiclass", ignore_index=ignore_index)

    def pixel_terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each configured term (unweighted) of logits (N, C, H, W) against target (N, H, W)."""
        logits = logits.float()      # losses in fp32 even under autocast: softmax over 11 classes underflows in fp16
        out: dict[str, torch.Tensor] = {}
        if "ce" in self.weights:
            out["ce"] = F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=self.ignore_index,
                                        label_smoothing=self.label_smoothing)
        if "dice" in self.weights:
            out["dice"] = dice_loss(logits, target, self.ignore_index)
        if "focal" in self.weights:
            out["focal"] = self.focal(logits, target)
        if "lovasz" in self.weights:
            out["lovasz"] = self.lovasz(logits, target)
        return out

    def _weighted(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[k] * v for k, v in self.pixel_terms(logits, target).items())

    def terms(self, output: torch.Tensor | SegOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms; with a SegOutput also `side` (the weighted loss summed over side outputs) and
        `presence` (BCE), each present only when the model returned that head."""
        if not isinstance(output, SegOutput):
            return self.pixel_terms(output, target)
        out = self.pixel_terms(output.logits, target)
        if output.side:
            if not self.side_weight:
                raise ValueError(f"the model returned {len(output.side)} deep-supervision output(s) but the loss has "
                                 "side_weight=0: build SegLoss with the ModelSpec's side_weight")
            size = target.shape[-2:]
            # side outputs at coarser scales are upsampled to the mask, as in U-Net 3+'s full-scale supervision
            out["side"] = sum(self._weighted(s if s.shape[-2:] == size else
                                             F.interpolate(s.float(), size=size, mode="bilinear", align_corners=False),
                                             target) for s in output.side)
        if output.presence is not None:
            if not self.aux_weight:
                raise ValueError("the model returned class-presence logits but the loss has aux_weight=0: build "
                                 "SegLoss with the ModelSpec's aux_weight")
            present = presence_targets(target, output.presence.shape[1], self.ignore_index)
            out["presence"] = F.binary_cross_entropy_with_logits(output.presence.float(), present)
        return out

    def forward(self, output: torch.Tensor | SegOutput, target: torch.Tensor) -> torch.Tensor:
        terms = self.terms(output, target)
        total = sum(self.weights[k] * terms[k] for k in self.weights)
        if "side" in terms:
            total = total + self.side_weight * terms["side"]
        if "presence" in terms:
            total = total + self.aux_weight * terms["presence"]
        return total
