"""Label-noise audit: every training image's own out-of-fold mIoU, from the ensemble's stored OOF probabilities.

An image whose label disagrees with what the ensemble learned from every *other* image (it never trained on this
one: out-of-fold) is either hard or wrongly labelled; ranked lowest first, the worst are the ones to look at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from segpipe.eda import overlay  # noqa: E402
from segpipe.metrics import confusion_matrix, miou  # noqa: E402
from segpipe.probstore import dequantise  # noqa: E402


@dataclass(frozen=True)
class MemberProbs:
    """One member's OOF probabilities for `names`, in `group`: probs (n, C, h, w), indexed one image at a time (the
    stored file's rows, segpipe.probstore.Rows: uint8 read as q / 255; or any array)."""

    group: str
    names: list[str]
    probs: np.ndarray


def ensemble_oof(members: Sequence[MemberProbs], weights: dict[str, float], names: Sequence[str],
                 size: int) -> Iterator[tuple[str, np.ndarray]]:
    """Per image, the soft-vote ensemble of its out-of-fold members: (C, size, size) float32, summing to 1.

    A group's (model's) members holding the image are averaged, then groups are weighted as the infer stage
    chose (sum_g w_g * mean_m p_m / sum_g w_g over the groups that hold it). One image at a time: the whole
    OOF set at 256x256 would not fit in memory for a real dataset.
    """
    where: dict[str, list[tuple[MemberProbs, int]]] = {}
    for m in members:
        for row, n in enumerate(m.names):
            where.setdefault(n, []).append((m, row))
    for name in names:
        if name not in where:
            raise KeyError(f"image {name} has no out-of-fold prediction: is every fold trained (train.folds)?")
        per_group: dict[str, list[torch.Tensor]] = {}
        for m, row in where[name]:
            t = torch.from_numpy(dequantise(m.probs[row]))[None]
            if t.shape[-1] != size or t.shape[-2] != size:
                t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
            per_group.setdefault(m.group, []).append(t[0])
        total = sum(weights.get(g, 1.0) for g in per_group)
        if total <= 0:      # every group holding it weighted 0: fall back to equal weights rather than divide by 0
            w = {g: 1.0 for g in per_group}
            total = float(len(per_group))
        else:
            w = {g: weights.get(g, 1.0) for g in per_group}
        vote = sum(w[g] * torch.stack(ts).mean(0) for g, ts in per_group.items()) / total
        yield name, vote.numpy()


def image_miou(truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> float:
    """One image's mIoU: its own confusion matrix, classes absent from both truth and prediction left out.

    An image labelled and predicted all background scores 1.0; NaN only when every pixel is ignore.
    """
    return miou(confusion_matrix(truth, pred, num_classes, ignore_index))


@dataclass(frozen=True)
class AuditRow:
    file_name: str
    miou: float
    rank: int                    # 1 = lowest mIoU (most suspicious)
    pixel_accuracy: float
    confident_share: float       # share of pixels whose ensemble confidence clears the relabel threshold


def rank_images(scores: dict[str, tuple[float, float, float]]) -> list[AuditRow]:
    """file_name -> (miou, pixel accuracy, confident share) -> rows sorted worst first (NaN last, then by name)."""
    def key(item):
        name, (m, _, _) = item
        return (np.isnan(m), m if not np.isnan(m) else 0.0, name)
    ordered = sorted(scores.items(), key=key)
    return [AuditRow(n, float(m), i + 1, float(a), float(c)) for i, (n, (m, a, c)) in enumerate(ordered)]


def pseudo_label(probs: np.ndarray, threshold: float, ignore_index: int) -> np.ndarray:
    """(C, H, W) probabilities -> (H, W) uint8 argmax, `ignore_index` where the top probability is under threshold."""
    lab = probs.argmax(0).astype(np.uint8)
    lab[probs.max(0) < threshold] = ignore_index
    return lab


def recall_at_k(ranked: Sequence[str], planted: set[str], k: int | None = None) -> float:
    """Share of the planted images among the first k ranked (k defaults to how many were planted)."""
    k = len(planted) if k is None else k
    return len(set(ranked[:k]) & planted) / max(1, len(planted))


def worst_grid(tiles: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], path: Path, title: str) -> None:
    """One row per image: photo | ground truth | OOF prediction (class colours over the photo); PNG at `path`."""
    rows = max(1, len(tiles))
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (image, truth, pred, label) in enumerate(tiles):
        for c, (img, head) in enumerate(((image, label), (overlay(image, truth, 0.6), "ground truth"),
                                         (overlay(image, pred, 0.6), "OOF prediction"))):
            axes[r, c].imshow(img)
            axes[r, c].set_title(head, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
