"""Pseudo-labels from ensemble probabilities: unsure pixels become ignore (or UNKNOWN), never background."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from segpipe.probstore import dequantise


@dataclass(frozen=True)
class PseudoSet:
    masks: np.ndarray                # (K, H, W) uint8; ignore_index (or UNKNOWN) where the ensemble is unsure
    kept: list[int]                  # indices into the input of the images kept
    confident_fraction: np.ndarray   # (N,) share of confident pixels per input image
    thresholds: np.ndarray           # (C,) the confidence each predicted class needed


def class_thresholds(classes: Sequence[str], default: float, overrides: Mapping[str, float]) -> np.ndarray:
    """(C,) thresholds: `default` for every class, `overrides` by class name (a rare class may need more)."""
    unknown = sorted(set(overrides) - set(classes))
    if unknown:
        raise KeyError(f"Wrong class(es) {unknown} in pseudo.class_thresholds, "
                       f"classes in data.classes: {list(classes)}")
    return np.array([overrides.get(c, default) for c in classes], np.float32)


def unknown_index(classes: Sequence[str]) -> int:
    for i, c in enumerate(classes):
        if c.casefold() == "unknown":
            return i
    raise ValueError(f"pseudo.unknown=true needs an UNKNOWN class in data.classes {list(classes)} "
                     "(data.unknown=class); set pseudo.unknown: false to mark unsure pixels ignore")


def make_pseudo_labels(probs: np.ndarray, threshold: float | np.ndarray, min_confident_fraction: float,
                       ignore_index: int, unsure_label: int | None = None, chunk: int = 32) -> PseudoSet:
    """probs (N, C, H, W) -> argmax masks; a pixel whose top probability is under its predicted class's threshold
    becomes `ignore_index`, or `unsure_label` (the UNKNOWN class: "not confident about any known class").

    Images whose confident share is below `min_confident_fraction` are dropped: a mostly-ignored image adds
    little signal and its few confident pixels are the easy ones. Works chunk by chunk on anything that slices
    into arrays: an array, or the stored file's rows (segpipe.probstore.Rows; uint8 is read as q / 255).
    """
    n, c = probs.shape[:2]
    thresholds = np.broadcast_to(np.asarray(threshold, np.float32), (c,)).copy()
    labels = np.empty((n, *probs.shape[2:]), np.uint8)
    fraction = np.empty(n, np.float64)
    for start in range(0, n, chunk):
        p = dequantise(probs[start:start + chunk])
        lab = p.argmax(1)
        unsure = p.max(1) < thresholds[lab]
        if unsure_label is not None:
            unsure |= lab == unsure_label            # UNKNOWN itself is never a confident known class
        lab = lab.astype(np.uint8)
        lab[unsure] = ignore_index if unsure_label is None else unsure_label
        labels[start:start + chunk] = lab
        fraction[start:start + chunk] = 1.0 - unsure.reshape(len(p), -1).mean(1)
    kept = [i for i, f in enumerate(fraction) if f >= min_confident_fraction]
    return PseudoSet(labels[kept], kept, fraction, thresholds)
