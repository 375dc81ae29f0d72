"""Stage `pseudo`: confident pseudo-labels for the test images from the previous round's ensemble probabilities.

The probabilities are the infer stage's stored `test_probs.npy`: no model runs again here. Provenance (which
members, checkpoints and weights, which data, which params) is written beside the labels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np

from pipelines.common import parser, run_main, write_json
from pipelines.fetch import data_version
from pipelines.results import PseudoResult
from segpipe.config import DataParams, PseudoParams, parse_section, read_params
from segpipe.ensemble import sha256_file
from segpipe.probstore import Rows
from segpipe.pseudo import class_thresholds, make_pseudo_labels, unknown_index


def run(data: DataParams, params: PseudoParams, validate_dir: Path, infer_dir: Path, out_dir: Path,
        round_: int = 1) -> PseudoResult:
    """Write out_dir/masks/*.png (ignore where unsure), index.json for training, provenance.json and metrics.json."""
    validate_dir, infer_dir, out_dir = Path(validate_dir), Path(infer_dir), Path(out_dir)
    for need in ("test_probs.npy", "test_index.json", "report.json"):
        if not (infer_dir / need).is_file():
            raise FileNotFoundError(f"{infer_dir / need} not found: run the infer stage of round {round_ - 1} first")
    probs = Rows(infer_dir / "test_probs.npy")         # read a chunk of images at a time
    names = json.loads((infer_dir / "test_index.json").read_text())["file_names"]
    report = json.loads((infer_dir / "report.json").read_text())
    classes = list(data.classes)
    thresholds = class_thresholds(classes, params.threshold, params.class_thresholds)
    unsure_label = unknown_index(classes) if params.unknown else None
    pseudo = make_pseudo_labels(probs, thresholds, params.min_confident_fraction, data.ignore_index, unsure_label)
    index = json.loads((validate_dir / "index.json").read_text())
    shutil.rmtree(out_dir, ignore_errors=True)          # no mask of an earlier run may survive into this set
    image_of = {r["file_name"]: r["image"] for r in index["test"]}
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    samples = []
    for mask, i in zip(pseudo.masks, pseudo.kept):
        rel = Path("masks") / Path(names[i]).with_suffix(".png")
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out_dir / rel), mask):
            raise OSError(f"could not write pseudo mask {out_dir / rel}")
        samples.append({"file_name": names[i], "image": image_of[names[i]], "mask": str(rel)})
    write_json(out_dir / "index.json", {"data_root": index["data_root"], "samples": samples,
                                        "exif_orientation": index.get("exif_orientation", "apply")})
    write_json(out_dir / "provenance.json", {
        # everything that produced these labels, so a pseudo set can always be traced back and reproduced
        "round": round_,
        "ensemble": {"infer_dir": str(infer_dir), "round": report.get("round"),
                     "report_sha256": sha256_file(infer_dir / "report.json"),
                     "test_probs_sha256": sha256_file(infer_dir / "test_probs.npy"),
                     "members": {k: {f: v.get(f) for f in ("model", "seed", "fold", "epoch", "checkpoint_sha256")}
                                 for k, v in report.get("member_details", {}).items()},
                     "weights": report.get("weights"), "voting": report.get("voting"), "tta": report.get("tta"),
                     "scales": report.get("scales"), "sliding_window": report.get("sliding_window"),
                     "ensemble_oof_miou": report.get("ensemble_oof_miou")},
        "data": {"validated_index_sha256": sha256_file(validate_dir / "index.json"),
                 "data_version": data_version(data.root), "root": data.root},
        "params": params.model_dump(mode="json"),
        "thresholds": dict(zip(classes, pseudo.thresholds.tolist())),
        "unsure_label": data.ignore_index if unsure_label is None else unsure_label,
    })
    kept_pixels = np.bincount(pseudo.masks.reshape(-1), minlength=256)
    write_json(out_dir / "metrics.json", {
        "kept": len(samples), "test_images": len(names),
        "mean_confident_fraction": float(pseudo.confident_fraction.mean()) if len(names) else 0.0,
        **{f"pixels/{c}": int(kept_pixels[i]) for i, c in enumerate(classes)}})
    print(f"pseudo r{round_}: kept {len(samples)}/{len(names)} test images (mean confident share "
          f"{pseudo.confident_fraction.mean():.0%}, threshold {params.threshold}, per class {params.class_thresholds})",
          flush=True)
    return PseudoResult(len(samples), len(names), out_dir)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--validate", type=Path, default=Path("artifacts/validate"))
    p.add_argument("--infer", type=Path, default=Path("artifacts/infer/r0"), help="the previous round's infer output")
    p.add_argument("--out", type=Path, default=Path("artifacts/pseudo/r1"))
    p.add_argument("--round", type=int, default=1)
    a = p.parse_args()
    raw = read_params(a.params)
    run_main(lambda: run(parse_section(raw, "data", DataParams), parse_section(raw, "pseudo", PseudoParams),
                         a.validate, a.infer, a.out, a.round))


if __name__ == "__main__":
    main()
