"""Pseudo-labels from ensemble probabilities: unsure pixels become ignore, not background."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PseudoSet:
    masks: np.ndarray          # (K, H, W) uint8, ignore_index where the ensemble is unsure
    kept: list[int]            # indices into the input of the images kept
    confident_fraction: np.ndarray   # (N,) share of confident pixels per input image


def make_pseudo_labels(probs: np.ndarray, threshold: float, min_confident_fraction: float, ignore_index: int) -> PseudoSet:
    """probs (N, C, H, W) -> argmax masks with pixels under `threshold` set to `ignore_index`.

    Images whose confident share is below `min_confident_fraction` are dropped: a mostly-ignored
    image adds little signal and its few confident pixels are the easy ones.
    """
    conf = probs.max(1)
    labels = probs.argmax(1).astype(np.uint8)
    unsure = conf < threshold
    labels[unsure] = ignore_index
    fraction = 1.0 - unsure.reshape(len(probs), -1).mean(1)
    kept = [i for i, f in enumerate(fraction) if f >= min_confident_fraction]
    return PseudoSet(labels[kept], kept, fraction)
