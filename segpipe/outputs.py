"""What a segmentation model returns: a logits tensor in eval mode; in training, `SegOutput` when it has extra heads.

predict_probs / evaluate call `model(x)` in eval mode and get logits (N, C, H, W), as from any smp model. In
training a model with deep-supervision side outputs or an image-level class-presence head returns a
`SegOutput` instead, and `segpipe.losses.SegLoss` adds those heads' losses to the main one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

# a logit this low takes a class's softmax probability to 0 in fp32, fp16 and bf16 alike
SUPPRESSED_LOGIT = -1e4


class SegOutput(NamedTuple):
    """Training-mode output (a NamedTuple, so torch.compile and AveragedModel pass it through).

    logits: (N, C, H, W) the main prediction; side: deep-supervision logits (N, C, h, w) at any scale (the loss
    upsamples them); presence: (N, C) image-level "is class c in this image" logits, or None.
    """

    logits: torch.Tensor
    side: tuple[torch.Tensor, ...] = ()
    presence: torch.Tensor | None = None


def suppress_absent(logits: torch.Tensor, presence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Logits (N, C, H, W) with every class c >= 1 whose presence probability (N, C) is below `threshold` ruled out.

    Class 0 (background) is never suppressed, so every pixel keeps at least one class.
    """
    absent = presence.float().sigmoid() < threshold
    absent[:, 0] = False
    return logits.masked_fill(absent[:, :, None, None], SUPPRESSED_LOGIT)


def finish(model: nn.Module, logits: torch.Tensor, side: tuple[torch.Tensor, ...] = (),
           presence: torch.Tensor | None = None) -> torch.Tensor | SegOutput:
    """The one place a model's extra heads are turned into what the caller expects (see the module docstring)."""
    if model.training:
        return SegOutput(logits, tuple(side), presence) if side or presence is not None else logits
    threshold = getattr(model, "presence_threshold", 0.0)
    if presence is not None and threshold > 0:
        logits = suppress_absent(logits, presence, threshold)
    return logits


def main_logits(output: torch.Tensor | SegOutput) -> torch.Tensor:
    """The main logits of either kind of output (for code that only needs the prediction)."""
    return output.logits if isinstance(output, SegOutput) else output
