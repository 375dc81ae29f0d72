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
from segpipe.ensemble import StoredEnsemble, StoredMember, sha256_file
from segpipe.probstore import Rows, to_stored
from segpipe.pseudo import class_thresholds, make_pseudo_labels, unknown_index


class _Voted:
    """The weighted vote of some members' stored test probabilities, sliced like a stored file (uint8 rows at
    `size`, quantised as test_probs.npy is), for make_pseudo_labels to read a chunk at a time."""

    def __init__(self, ens: StoredEnsemble, weights: dict[str, float], size: int):
        self.ens, self.weights, self.size = ens, weights, size
        self.shape = (len(ens), ens.num_classes, size, size)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return to_stored(self.ens.ensemble(self.weights, rows, self.size), self.size)


def teachers(infer_dir: Path, report: dict, names: list[str], num_classes: int, teacher: str
             ) -> dict[str, tuple[list[str], object]]:
    """{label set: (its teacher members, their probabilities)}: with `fold`, one set per fold k, voted by the members
    of fold k only (trained on every fold but k: fold k's student never learns fold k's labels through them);
    with `all`, one set from the whole ensemble's test_probs.npy (every member saw every fold but its own)."""
    details = report.get("member_details", {})
    if teacher == "all":
        return {"all": (sorted(details), Rows(infer_dir / "test_probs.npy"))}
    no_fold = sorted(m for m, d in details.items() if d.get("fold", -1) < 0)
    if no_fold or not details:
        raise ValueError(f"pseudo.teacher=fold needs members trained with a held-out fold; {infer_dir / 'report.json'} "
                         f"lists {no_fold or 'no members'} without one: set pseudo.teacher: all")
    weights, hard = report["weights"], report.get("voting") == "hard"
    out_size = Rows(infer_dir / "test_probs.npy").shape[-1]       # the all-folds set's resolution, the same masks
    out: dict[str, tuple[list[str], object]] = {}
    for fold in sorted({d["fold"] for d in details.values()}):
        members = sorted(m for m, d in details.items() if d["fold"] == fold)
        stored = [StoredMember(details[m]["model"], names, infer_dir / "members" / m / "test.npy") for m in members]
        size = max(Rows(s.path).shape[-1] for s in stored)
        ens = StoredEnsemble(stored, names, num_classes, size, hard)
        ens.check_complete([g for g, w in weights.items() if w > 0])
        out[f"f{fold}"] = (members, _Voted(ens, weights, out_size))
    return out


def run(data: DataParams, params: PseudoParams, validate_dir: Path, infer_dir: Path, out_dir: Path,
        round_: int = 1) -> PseudoResult:
    """Write out_dir/masks/<set>/*.png (ignore where unsure; one set per fold with pseudo.teacher=fold), index.json
    for training (each fold's student reads its own set), provenance.json and metrics.json."""
    validate_dir, infer_dir, out_dir = Path(validate_dir), Path(infer_dir), Path(out_dir)
    for need in ("test_probs.npy", "test_index.json", "report.json"):
        if not (infer_dir / need).is_file():
            raise FileNotFoundError(f"{infer_dir / need} not found: run the infer stage of round {round_ - 1} first")
    names = json.loads((infer_dir / "test_index.json").read_text())["file_names"]
    report = json.loads((infer_dir / "report.json").read_text())
    classes = list(data.classes)
    thresholds = class_thresholds(classes, params.threshold, params.class_thresholds)
    unsure_label = unknown_index(classes) if params.unknown else None
    index = json.loads((validate_dir / "index.json").read_text())
    image_of = {r["file_name"]: r["image"] for r in index["test"]}
    sets = teachers(infer_dir, report, names, len(classes), params.teacher)
    shutil.rmtree(out_dir, ignore_errors=True)          # no mask of an earlier run may survive into this set
    samples: dict[str, list[dict]] = {}
    confident_share: dict[str, float] = {}      # per label set, the mean share of confident pixels
    kept_pixels = np.zeros(256, np.int64)
    for label_set, (_, probs) in sets.items():
        pseudo = make_pseudo_labels(probs, thresholds, params.min_confident_fraction, data.ignore_index,
                                    unsure_label)
        confident_share[label_set] = float(pseudo.confident_fraction.mean()) if names else 0.0
        samples[label_set] = []
        for mask, i in zip(pseudo.masks, pseudo.kept):
            rel = Path("masks") / label_set / Path(names[i]).with_suffix(".png")
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(out_dir / rel), mask):
                raise OSError(f"could not write pseudo mask {out_dir / rel}")
            samples[label_set].append({"file_name": names[i], "image": image_of[names[i]], "mask": str(rel)})
        kept_pixels += np.bincount(pseudo.masks.reshape(-1), minlength=256)
    body = {"samples": samples["all"]} if params.teacher == "all" else \
        {"folds": {k[1:]: v for k, v in samples.items()}}
    write_json(out_dir / "index.json", {"data_root": index["data_root"], "teacher": params.teacher, **body,
                                        "exif_orientation": index.get("exif_orientation", "apply")})
    write_json(out_dir / "provenance.json", {
        # everything that produced these labels, so a pseudo set can always be traced back and reproduced
        "round": round_, "teacher": params.teacher,
        "teachers": {k: members for k, (members, _) in sets.items()},   # label set -> the members that voted it
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
        "thresholds": dict(zip(classes, thresholds.tolist())),
        "unsure_label": data.ignore_index if unsure_label is None else unsure_label,
    })
    n_kept = {k: len(v) for k, v in samples.items()}
    confident = float(np.mean(list(confident_share.values())))
    write_json(out_dir / "metrics.json", {
        "kept": min(n_kept.values()), "test_images": len(names), "mean_confident_fraction": confident,
        **({f"kept/{k}": v for k, v in n_kept.items()} if params.teacher == "fold" else {}),
        **{f"pixels/{c}": int(kept_pixels[i]) for i, c in enumerate(classes)}})
    kept = ", ".join(f"{k} {v}/{len(names)}" for k, v in n_kept.items())
    print(f"pseudo r{round_}: kept {kept} test images <pseudo.teacher={params.teacher}> (mean confident share "
          f"{confident:.0%}, threshold {params.threshold}, per class {params.class_thresholds})", flush=True)
    return PseudoResult(min(n_kept.values()), len(names), out_dir)


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
