"""Stage `validate`: check the dataset (great-expectations + file checks), rasterise train masks, run the EDA.

Writes out_dir/index.json (the contract every later stage reads), masks/, gx_results.json, gx_summary.csv,
metrics.json and eda/ (report, plots, class_stats.csv / object_sizes.csv for `dvc plots`), all or nothing:
everything is built in a temp sibling and renamed into place only when it all succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipelines.results import ValidateResult
from segpipe.coco import DataError, mask_name, rasterize
from segpipe.config import DEFAULT_PARAMS, DataParams, ParamsError, ValidateParams, load_params
from segpipe.eda import run_eda
from segpipe.parallel import pool_map
from segpipe.validation import ValidationResult, gx_summary, validate_dataset


_JOB: dict = {}   # set before forking the rasterisation pool; workers inherit it


def _mask_job(k: int) -> tuple[np.ndarray, int, int]:
    """Rasterise (or copy) train image k's mask into the temp out dir; return class pixel counts, ignored, overlap."""
    res: ValidationResult = _JOB["result"]
    row, data, out = _JOB["train"][k], _JOB["data"], _JOB["out"]
    dst = out / row["mask"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    if res.layout == "coco":
        mask, overlap = rasterize(res.coco, row["image_id"], res.cmap, data.overlap, data.ignore_index,
                                  res.skip_annotations, with_overlap=True)
        # OpenCV 5's default PNG settings: 5x faster than level 1 here, and smaller. imwrite answers False, not
        # an exception, when it cannot write (full disk, unwritable folder): a mask must never go missing quietly
        if not cv2.imwrite(str(dst), mask):
            raise OSError(f"could not write the mask of {row['file_name']} to {dst} (disk full or not writable?)")
    else:
        src = res.root / row["mask_src"]
        mask, overlap = cv2.imread(str(src), cv2.IMREAD_UNCHANGED), 0
        shutil.copyfile(src, dst)
    counts = np.bincount(mask.ravel(), minlength=256)
    return counts[: len(data.classes)], int(counts[data.ignore_index]), overlap


def _index_rows(res: ValidationResult) -> list[dict]:
    return [{"file_name": r["file_name"], "image": r["image"],
             "mask": str(Path("masks") / mask_name(r["file_name"])), "batch": r["batch"],
             "image_id": r["image_id"], "width": int(r["width"]), "height": int(r["height"])} for r in res.train]


def run(data: DataParams, params: ValidateParams, out_dir: Path, workers: int | None = None) -> ValidateResult:
    """Validate data.root, write masks + index + GX results + EDA to out_dir atomically."""
    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    res = validate_dataset(data, params, workers)   # raises DataValidationError before anything is written
    seconds["validate"] = time.perf_counter() - t
    seconds.update({f"validate/{k}": v for k, v in res.seconds.items()})

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t = time.perf_counter()
        train = _index_rows(res)
        for row, src in zip(train, res.train):
            row["mask_src"] = src.get("mask_src")
        _JOB.update(result=res, train=train, data=data, out=tmp)
        # forked processes, or threads in a threaded process (segpipe.parallel.worker_pool)
        stats = pool_map(_mask_job, range(len(train)), workers or os.cpu_count() or 1, "rasterise masks", "mask")
        _JOB.clear()
        n_cls = len(data.classes)
        pixel_counts = np.stack([s[0] for s in stats]) if stats else np.zeros((0, n_cls), np.int64)
        ignored = np.array([s[1] for s in stats], np.int64)
        overlaps = np.array([s[2] for s in stats], np.int64)
        for row, counts in zip(train, pixel_counts):
            row.pop("mask_src")
            row["classes"] = [int(c) for c in np.flatnonzero(counts)]
        seconds["rasterise"] = time.perf_counter() - t

        t = time.perf_counter()
        split_counts = {"train_all": len(train), "test": len(res.test)}
        for name in ("train", "val"):
            if res.layout == "coco" and (res.root / f"{name}.json").exists():
                split_counts[name] = len(json.loads((res.root / f"{name}.json").read_text())["images"])
        eda = run_eda(tuple(data.classes), train, res.annotations, pixel_counts, ignored, overlaps, res.root, tmp,
                      tmp / "eda", split_counts=split_counts, sample_grid=params.sample_grid, warnings=res.warnings,
                      exif_orientation=data.exif_orientation)
        seconds["eda"] = time.perf_counter() - t

        index = {"data_root": data.root, "layout": res.layout, "classes": list(data.classes),
                 "ignore_index": data.ignore_index, "exif_orientation": data.exif_orientation, "train": train,
                 "test": [{"file_name": r["file_name"], "image": r["image"]} for r in res.test]}
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        (tmp / "gx_results.json").write_text(json.dumps(res.gx, indent=1, default=str))
        summary = gx_summary(res.gx)
        pd.DataFrame(summary).to_csv(tmp / "gx_summary.csv", index=False)
        metrics = {**res.metrics(), **eda.metrics}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ValidateResult(out_dir, len(train), len(res.test), int(len(res.annotations)), metrics,
                          eda.class_weights, res.warnings, seconds, eda.class_stats, eda.split_counts, summary)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--out", type=Path, default=Path("artifacts/validate"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        r = run(load_params("data", DataParams, args.params), load_params("validate", ValidateParams, args.params),
                args.out)
    except (DataError, ParamsError) as e:
        print(f"validate: FAILED, nothing written to {args.out}\n{e}", file=sys.stderr)
        sys.exit(1)
    for w in r.warnings[:20]:
        print(f"warning: {w}")
    print(f"validate: {r.n_train} train / {r.n_test} test images, {r.n_annotations} annotations -> {r.out_dir} "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in r.seconds.items() if '/' not in k)})")
    print("  pixel share: " + ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in r.metrics.items()
                                        if k.startswith("pixel_share/")))


if __name__ == "__main__":
    main()
