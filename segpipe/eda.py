"""Exploratory data analysis of a validated dataset: tables, plots, a markdown report, flat metrics, class weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from segpipe.inline import INLINE_BYTES, embed_images, preview_jpeg  # noqa: E402,F401 (re-exported)
from segpipe.photos import read_photo  # noqa: E402

# COCO's small/medium/large area thresholds (32^2, 96^2 px) are for ~640x480 photos; scaled by image area.
COCO_REF_AREA = 640 * 480
WEIGHT_CLIP = (0.1, 10.0)   # median-frequency weights of very rare classes explode; clip keeps the loss stable
PALETTE = np.array([
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
    [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128],
], np.uint8)


SIZE_BUCKETS = ("small", "medium", "large")


@dataclass
class EdaResult:
    metrics: dict[str, float]        # flat numbers (also written to eda_metrics.json)
    class_weights: dict[str, float]  # class name -> loss weight (median-frequency balancing, clipped)
    report: Path
    class_stats: list[dict]          # one row per class, as in class_stats.csv
    split_counts: dict[str, int]     # images per split file


def colour(i: int) -> np.ndarray:
    return PALETTE[i % len(PALETTE)] if i < 255 else np.array([255, 255, 255], np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 image with the (H, W) label mask blended in class colours (background untouched)."""
    lut = np.stack([colour(i) for i in range(256)])
    out = image.astype(np.float32)
    sel = mask > 0
    out[sel] = (1 - alpha) * out[sel] + alpha * lut[mask[sel]]
    return out.astype(np.uint8)


def median_frequency_weights(pixel_counts: np.ndarray) -> np.ndarray:
    """Weights (C,) from per-image class pixel counts (N, C): w_c = median(f) / f_c, f_c over images with c."""
    present = pixel_counts > 0
    image_pixels = pixel_counts.sum(1, keepdims=True)
    totals = (present * image_pixels).sum(0).astype(float)
    freq = np.divide(pixel_counts.sum(0), totals, out=np.zeros(pixel_counts.shape[1]), where=totals > 0)
    med = np.median(freq[freq > 0]) if (freq > 0).any() else 1.0
    w = np.divide(med, freq, out=np.full_like(freq, WEIGHT_CLIP[1]), where=freq > 0)
    return np.clip(w, *WEIGHT_CLIP)


def size_bucket(area: np.ndarray, image_area: np.ndarray) -> np.ndarray:
    scale = image_area / COCO_REF_AREA
    return np.where(area < 32 ** 2 * scale, "small", np.where(area < 96 ** 2 * scale, "medium", "large"))


def _md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join([df.index.name or ""] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for idx, *row in df.itertuples():   # per-column types: counts stay integers (iterrows makes them floats)
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join([str(idx)] + cells) + " |")
    return "\n".join(lines)


def _grid(tiles: list[tuple[np.ndarray, str]], path: Path, title: str) -> None:
    n = max(1, len(tiles))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, label) in zip(axes.flat, tiles):
        ax.imshow(img)
        ax.set_title(label, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_eda(
    classes: tuple[str, ...], train: list[dict], annotations: pd.DataFrame, pixel_counts: np.ndarray,
    ignore_counts: np.ndarray, overlap_pixels: np.ndarray, image_root: Path, mask_root: Path, out_dir: Path, *,
    split_counts: dict[str, int], sample_grid: int = 12, warnings: list[str] = (), exif_orientation: str = "apply",
) -> EdaResult:
    """Write eda/ plots, report.md and eda_metrics.json.

    train: index rows (file_name, image, mask); pixel_counts (N, C) class pixels per train image after
    rasterisation; ignore_counts / overlap_pixels (N,) ignore-valued and multiply-covered pixels per image.
    exif_orientation: data.exif_orientation, how the photos under the masks are decoded (segpipe.photos).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    n_cls = len(classes)
    names = list(classes)
    present = pixel_counts > 0
    total_px = pixel_counts.sum() + ignore_counts.sum()
    share = pixel_counts.sum(0) / max(total_px, 1)
    cooc = present.T.astype(int) @ present.astype(int)       # (C, C) images containing both classes
    weights = median_frequency_weights(pixel_counts)

    anns = annotations[annotations["class_index"].astype(int).between(1, n_cls - 1)].copy()
    for col in ("raster_area", "area", "image_area", "bx", "by", "bw", "bh"):
        anns[col] = anns[col].astype(float)
    anns["bucket"] = size_bucket(anns["raster_area"].fillna(anns["area"]).to_numpy(float),
                                 anns["image_area"].to_numpy(float)) if len(anns) else []
    per_class = pd.DataFrame(index=pd.Index(names, name="class"))
    per_class["annotations"] = [int((anns["class_index"] == i).sum()) for i in range(n_cls)]
    per_class["images_with"] = present.sum(0).astype(int)
    per_class["pixel_share"] = share
    for b in SIZE_BUCKETS:
        per_class[b] = [int(((anns["class_index"] == i) & (anns["bucket"] == b)).sum()) for i in range(n_cls)]
    per_class["class_weight"] = weights
    per_class.insert(0, "class_index", range(n_cls))
    # plot data for `dvc plots` (dvc.yaml `plots:`): one row per class, and object sizes in long form
    per_class.to_csv(out_dir / "class_stats.csv", float_format="%.6g")
    sizes = per_class[list(SIZE_BUCKETS)].iloc[1:].rename_axis("class").reset_index()
    sizes.melt(id_vars="class", var_name="size", value_name="annotations").to_csv(out_dir / "object_sizes.csv",
                                                                                  index=False)
    anns_per_image = np.array([0] * len(train)) if not len(anns) else \
        pd.Series([r["image_id"] for r in train]).astype(str).map(anns.groupby("image_id").size()).fillna(0)\
        .astype(int).to_numpy()

    # plots
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, share, color=[colour(i) / 255 for i in range(n_cls)], edgecolor="k")
    ax.set_yscale("log")
    ax.set_ylabel("share of train pixels (log)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out_dir / "pixel_share.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(cooc, cmap="viridis")
    ax.set_xticks(range(n_cls), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n_cls), names, fontsize=7)
    for i in range(n_cls):
        for j in range(n_cls):
            ax.text(j, i, str(cooc[i, j]), ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im)
    ax.set_title("images containing both classes")
    fig.tight_layout()
    fig.savefig(out_dir / "cooccurrence.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for i in range(1, n_cls):
        a = anns.loc[anns["class_index"] == i, "raster_area"].dropna()
        if len(a):
            ax.hist(np.log10(np.maximum(a, 1)), bins=30, histtype="step", label=names[i], color=colour(i) / 255)
    ax.set_xlabel("log10(object area, px)")
    ax.set_ylabel("annotations")
    if len(anns):
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "object_sizes.png", dpi=80)
    plt.close(fig)

    def tile(k: int, box=None) -> np.ndarray:
        img = read_photo(image_root / train[k]["image"], exif_orientation)
        mask = np.asarray(Image.open(mask_root / train[k]["mask"]))
        out = overlay(img, mask)
        if box is not None:  # outline the object in white
            x, y, w, h = (int(round(v)) for v in box)
            x1, y1 = min(x + max(w, 1) + 2, out.shape[1] - 1), min(y + max(h, 1) + 2, out.shape[0] - 1)
            x, y = max(x - 2, 0), max(y - 2, 0)
            out = out.copy()
            out[y, x:x1 + 1] = out[y1, x:x1 + 1] = 255
            out[y:y1 + 1, x] = out[y:y1 + 1, x1] = 255
        return out

    sample = np.linspace(0, len(train) - 1, min(sample_grid, len(train))).astype(int) if len(train) else []
    _grid([(tile(k), train[k]["file_name"]) for k in sample], out_dir / "samples.png", "samples (masks overlaid)")
    worst = np.argsort(-overlap_pixels, kind="stable")[:8]
    worst = [k for k in worst if overlap_pixels[k] > 0]
    _grid([(tile(k), f"{train[k]['file_name']}: {overlap_pixels[k]} px overlap") for k in worst],
          out_dir / "largest_overlaps.png", "largest overlaps between annotations")
    pos = {str(r["image_id"]): k for k, r in enumerate(train)}
    tiny = anns[anns["image_id"].isin(pos)].nsmallest(8, "raster_area")
    _grid([(tile(pos[r["image_id"]], (r["bx"], r["by"], r["bw"], r["bh"])),
            f"{train[pos[r['image_id']]]['file_name']}: {names[r['class_index']]} {r['raster_area']:.0f} px")
           for _, r in tiny.iterrows()], out_dir / "tiniest_objects.png", "tiniest objects (white box)")

    metrics: dict[str, float] = {
        "n_images": len(train), "n_annotations": int(len(anns)),
        **{f"split/{k}": int(v) for k, v in split_counts.items()},
        "annotations_per_image/mean": float(anns_per_image.mean()) if len(train) else 0.0,
        "annotations_per_image/max": int(anns_per_image.max()) if len(train) else 0,
        "empty_images": int((present[:, 1:].sum(1) == 0).sum()) if len(train) else 0,
        "ignore_share": float(ignore_counts.sum() / max(total_px, 1)),
        "overlap_pixel_share": float(overlap_pixels.sum() / max(total_px, 1)),
    }
    for i, name in enumerate(names):
        metrics[f"pixel_share/{name}"] = round(float(share[i]), 6)
        metrics[f"images_with/{name}"] = int(present[:, i].sum())
        metrics[f"class_weight/{name}"] = round(float(weights[i]), 4)
        if i:
            metrics[f"annotations/{name}"] = int(per_class.loc[name, "annotations"])
            for b in SIZE_BUCKETS:
                metrics[f"size_{b}/{name}"] = int(per_class.loc[name, b])
    class_weights = {name: round(float(weights[i]), 4) for i, name in enumerate(names)}
    (out_dir / "eda_metrics.json").write_text(json.dumps({**metrics, "class_weights": class_weights}, indent=1))

    hist = pd.Series(anns_per_image).value_counts().sort_index()
    hist_df = pd.DataFrame({"images": hist.to_numpy()}, index=pd.Index(hist.index, name="annotations"))
    cooc_df = pd.DataFrame(cooc, index=pd.Index(names, name="class"), columns=names)
    split_df = pd.DataFrame({"images": list(split_counts.values())}, index=pd.Index(list(split_counts), name="split"))
    report = out_dir / "report.md"
    report.write_text("\n\n".join([
        "# EDA report",
        "## Images per split\n\n" + _md_table(split_df),
        "## Per class\n\nPixel share is after rasterisation (overlaps resolved by data.overlap). Size buckets are "
        "COCO's 32^2 / 96^2 px thresholds scaled to the image area. Class weight: median-frequency balancing, "
        f"clipped to {WEIGHT_CLIP}.\n\n" + _md_table(per_class),
        "![pixel share](pixel_share.png)",
        "## Annotations per image\n\n" + _md_table(hist_df),
        "## Class co-occurrence (images containing both)\n\n" + _md_table(cooc_df),
        "![co-occurrence](cooccurrence.png)",
        "## Object sizes\n\n![object sizes](object_sizes.png)",
        "## Samples\n\n![samples](samples.png)",
        "## Worst cases\n\n![largest overlaps](largest_overlaps.png)\n\n![tiniest objects](tiniest_objects.png)",
        "## Warnings\n\n" + ("\n".join(f"- {w}" for w in warnings) or "none"),
    ]) + "\n")
    rows = [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}
            for r in per_class.reset_index().to_dict("records")]
    return EdaResult(metrics, class_weights, report, rows, {k: int(v) for k, v in split_counts.items()})
