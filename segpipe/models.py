"""Model factory (plain-dict registry over segmentation-models-pytorch) and losses."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

# lower-case name -> smp class; every entry takes encoder_name / encoder_weights / in_channels / classes
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "fpn": smp.FPN,
    "pspnet": smp.PSPNet,
    "deeplabv3": smp.DeepLabV3,
    "deeplabv3plus": smp.DeepLabV3Plus,
    "linknet": smp.Linknet,
    "manet": smp.MAnet,
    "pan": smp.PAN,
    "upernet": smp.UPerNet,
    "segformer": smp.Segformer,
}


def build_model(arch: str, encoder: str, num_classes: int, encoder_weights: str | None = None) -> nn.Module:
    """Build an smp model by registry name; `encoder_weights='imagenet'` needs the weights cached locally."""
    key = arch.lower()
    if key not in ARCHITECTURES:
        raise KeyError(f"Wrong architecture `{arch}`, supported architectures: {sorted(ARCHITECTURES)}")
    if encoder not in smp.encoders.get_encoder_names() and not encoder.startswith("tu-"):
        raise KeyError(f"Wrong encoder name `{encoder}`, supported encoders: {smp.encoders.get_encoder_names()}")
    return ARCHITECTURES[key](encoder_name=encoder, encoder_weights=encoder_weights, in_channels=3, classes=num_classes)


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


class SegLoss(nn.Module):
    """Cross-entropy (optionally class-weighted) plus Dice; `kind` is `ce` or `ce+dice`."""

    def __init__(self, kind: str, ignore_index: int, class_weights: torch.Tensor | None = None):
        super().__init__()
        if kind not in ("ce", "ce+dice"):
            raise KeyError(f"Wrong loss `{kind}`, supported losses: ['ce', 'ce+dice']")
        self.kind, self.ignore_index = kind, ignore_index
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), target, weight=self.class_weights, ignore_index=self.ignore_index)
        if self.kind == "ce+dice":
            loss = loss + dice_loss(logits, target, self.ignore_index)
        return loss
