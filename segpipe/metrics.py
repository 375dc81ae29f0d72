"""The competition's mIoU: one confusion matrix over the whole evaluation set."""

from __future__ import annotations

import numpy as np


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Accumulate a (C, C) matrix, rows = truth, cols = prediction; `ignore_index` pixels are left out."""
    target = np.asarray(target).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = num_classes * target[keep] + pred[keep]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU = diag / (row + col - diag); NaN for a class absent from both truth and prediction."""
    cm = cm.astype(np.float64)
    diag = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1) - diag
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, diag / np.where(denom > 0, denom, 1), np.nan)


def miou(cm: np.ndarray) -> float:
    """Mean IoU over classes present in truth or prediction (NaN classes ignored)."""
    ious = iou_per_class(cm)
    return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")


class MIoU:
    """Streaming accumulator: add batches, read the set-level mIoU (never a mean of per-batch mIoUs)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, target: np.ndarray, pred: np.ndarray) -> None:
        self.cm += confusion_matrix(target, pred, self.num_classes, self.ignore_index)

    @property
    def value(self) -> float:
        return miou(self.cm)

    def per_class(self, names: list[str] | tuple[str, ...]) -> dict[str, float | None]:
        return {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou_per_class(self.cm))}
