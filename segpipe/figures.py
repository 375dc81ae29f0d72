"""Pictures of a prediction set, for people: the truth-normalised confusion matrix (a heatmap, and rows DVC's
`confusion_normalized` template draws), per-class IoU rows, and grids of photos with class masks over them.

Pure numpy + matplotlib (Agg): the stage decides what to draw and writes the files; nothing here reads a dataset.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from segpipe.eda import colour, overlay  # noqa: E402  (one palette: EDA samples and predictions agree)
from segpipe.metrics import iou_per_class  # noqa: E402

# Rows per truth class in the DVC confusion data. DVC's confusion templates count rows of (actual, predicted); one row
# per pixel would be millions, so each truth class gets RESOLUTION rows split over the predicted classes in proportion
# to the truth-normalised fraction (largest remainder: each class's rows sum to exactly RESOLUTION). The plot then
# shows each fraction to 1/RESOLUTION: a cell under half of that shows 0 (the PNG heatmap has the exact values).
CONFUSION_RESOLUTION = 100
DPI = 80
TILE_INCHES = 2.0          # one grid panel: 160 px at DPI
LEGEND_INCHES = 0.6        # the strip under a grid holding the class legend
TITLE_INCHES = 0.5         # the strip above a grid holding its title (two lines at most)


def class_labels(classes: Sequence[str]) -> list[str]:
    """`00 Background`, `01 General trash`, ...: the templates sort their axes ascending, so the zero-padded index
    in front keeps the class order (and a name shared by two indices stays two labels)."""
    width = len(str(max(len(classes) - 1, 0)))
    return [f"{i:0{max(2, width)}d} {name}" for i, name in enumerate(classes)]


def normalise_rows(cm: np.ndarray) -> np.ndarray:
    """Confusion (C, C), rows = truth -> each row divided by its truth pixels (rows sum to 1); NaN for a class absent
    from the truth (no pixel to divide by)."""
    cm = np.asarray(cm, np.float64)
    total = cm.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, cm / np.where(total > 0, total, 1), np.nan)


def largest_remainder(fractions: np.ndarray, total: int) -> np.ndarray:
    """Non-negative integers proportional to `fractions` (summing to 1) that sum to exactly `total`."""
    raw = np.asarray(fractions, np.float64) * total
    out = np.floor(raw).astype(np.int64)
    short = total - int(out.sum())
    if short > 0:
        out[np.argsort(-(raw - out), kind="stable")[:short]] += 1
    return out


def confusion_rows(cm: np.ndarray, classes: Sequence[str], resolution: int = CONFUSION_RESOLUTION) -> list[dict]:
    """Rows {actual, predicted} for DVC's `confusion_normalized` template (y: actual, x: predicted): per truth class
    `resolution` rows, split over the predictions in proportion to its truth-normalised fraction (see
    CONFUSION_RESOLUTION). A class absent from the truth has no rows."""
    labels = class_labels(classes)
    rows = []
    for t, frac in enumerate(normalise_rows(cm)):
        if not np.isfinite(frac).all():
            continue
        for p, n in enumerate(largest_remainder(frac, resolution)):
            rows += [{"actual": labels[t], "predicted": labels[p]}] * int(n)
    return rows


def iou_rows(cm: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """Per class: its IoU (None where absent from both truth and prediction), its truth and predicted pixels."""
    cm = np.asarray(cm)
    ious = iou_per_class(cm)
    return [{"class": name, "iou": None if not np.isfinite(v) else round(float(v), 6),
             "truth_pixels": int(cm[i].sum()), "predicted_pixels": int(cm[:, i].sum())}
            for i, (name, v) in enumerate(zip(classes, ious))]


def confusion_heatmap(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """The truth-normalised confusion as an annotated heatmap PNG at `path` (rows: truth, columns: prediction)."""
    frac = normalise_rows(cm)
    c = len(classes)
    side = 1.6 + 0.55 * c
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(np.nan_to_num(frac, nan=0.0), cmap="Blues", vmin=0.0, vmax=1.0)
    truth_px = np.asarray(cm).sum(1)
    ax.set_xticks(range(c), list(classes), rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(c), [f"{n} ({p:,} px)" if p else f"{n} (absent)" for n, p in zip(classes, truth_px)],
                  fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth (each row sums to 1)")
    for t in range(c):
        for p in range(c):
            v = frac[t, p]
            if np.isfinite(v):
                ax.text(p, t, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


@dataclass(frozen=True)
class Panel:
    """One grid cell: a photo (H, W, 3) uint8 with an optional class mask (H, W) over it, or a map (H, W) in [0, 1]."""

    image: np.ndarray
    title: str = ""
    mask: np.ndarray | None = None
    alpha: float = 0.55


def panel_grid(rows: Sequence[Sequence[Panel]], classes: Sequence[str], path: Path, title: str) -> Path:
    """Panels in rows (each row as long as the longest; short rows left blank) with a legend of the class colours
    under them; a PNG of (cols x TILE_INCHES) x (rows x TILE_INCHES + LEGEND_INCHES + TITLE_INCHES) inches at DPI.
    A map panel is drawn dark (0) to bright (1)."""
    n_rows = max(1, len(rows))
    n_cols = max([1, *(len(r) for r in rows)])
    height = n_rows * TILE_INCHES + LEGEND_INCHES + TITLE_INCHES
    fig = plt.figure(figsize=(n_cols * TILE_INCHES, height))
    axes = fig.subplots(n_rows, n_cols, squeeze=False,
                        gridspec_kw=dict(left=0.01, right=0.99, top=1 - TITLE_INCHES / height,
                                         bottom=LEGEND_INCHES / height, wspace=0.05, hspace=0.2))
    shown: set[int] = set()
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            ax = axes[r, c]
            if panel.image.ndim == 2:
                ax.imshow(panel.image, cmap="magma", vmin=0.0, vmax=1.0)
            elif panel.mask is not None:
                ax.imshow(overlay(panel.image, panel.mask, panel.alpha))
                shown.update(int(v) for v in np.unique(panel.mask))
            else:
                ax.imshow(panel.image)
            ax.set_title(panel.title, fontsize=6)
    handles = [Patch(facecolor=colour(i) / 255.0, edgecolor="grey", label=name) for i, name in enumerate(classes)]
    if any(v >= len(classes) for v in shown):
        handles.append(Patch(facecolor="white", edgecolor="grey", label="ignored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), max(2, n_cols * 2)), fontsize=6,
               frameon=False)
    # wrapped to the grid's width (about 12 characters an inch at this size): a long title is never cut off
    fig.suptitle("\n".join(textwrap.wrap(title, int(n_cols * TILE_INCHES * 12))[:2]), fontsize=8,
                 y=1 - 0.05 / height, va="top")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
