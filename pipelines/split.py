"""Stage `split`: multilabel-stratified K folds over the validated training images, grouped by batch folder when
there are enough folders (split.group_by)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.common import parser, run_main, write_json
from segpipe.config import SplitParams, load_params
from segpipe.folds import fold_class_counts, fold_class_shares, plan_folds
from segpipe.profiles import balanced_subset, check_dvc_matrix, class_coverage


@dataclass(frozen=True)
class SplitResult:
    folds: dict[str, int]
    sizes: list[int]


def run(params: SplitParams, validate_dir: Path, out_dir: Path) -> SplitResult:
    """Write out_dir/folds.json (file_name -> fold) and a per-fold class-share report.

    With `split.subset` > 0 (a quick profile) only that many images, picked by rare-class coverage, get a fold;
    the rest are in no fold, so no stage trains or validates on them. subset.json records which and why.
    """
    index = json.loads((Path(validate_dir) / "index.json").read_text())
    train, classes = index["train"], index["classes"]
    out_dir = Path(out_dir)
    everything = [tuple(r["classes"]) for r in train]
    keep = balanced_subset(everything, params.subset, params.seed)
    subset = {"subset": params.subset, "n_images": len(keep), "of": len(train), "rule": "greedy rare-class coverage",
              "seed": params.seed, "file_names": [train[i]["file_name"] for i in keep],
              "images_with_class": dict(zip(classes, class_coverage(everything, keep, len(classes)))),
              "images_with_class_all": dict(zip(classes, class_coverage(everything, range(len(train)),
                                                                        len(classes))))}
    write_json(out_dir / "subset.json", subset)
    train = [train[i] for i in keep]
    present = [tuple(r["classes"]) for r in train]
    plan = plan_folds(present, [r["batch"] for r in train], params.n_folds, len(classes), params.seed,
                      params.group_by)
    assignment = plan.assignment
    shares = fold_class_shares(assignment, present, params.n_folds, len(classes))
    counts = fold_class_counts(assignment, present, params.n_folds, len(classes))
    sizes = [assignment.count(f) for f in range(params.n_folds)]
    folds = {r["file_name"]: f for r, f in zip(train, assignment)}
    write_json(out_dir / "folds.json", {"n_folds": params.n_folds, "seed": params.seed, "group_by": params.group_by,
                                        "grouped_by": plan.grouped_by, "reason": plan.reason, "folds": folds})
    lines = ["| fold | images | " + " | ".join(classes) + " |", "|---" * (len(classes) + 2) + "|"]
    for f in range(params.n_folds):
        lines.append(f"| {f} | {sizes[f]} | " + " | ".join(f"{n} ({s:.0%})" for n, s in zip(counts[f], shares[f]))
                     + " |")
    (out_dir / "report.md").write_text(
        f"# Fold split\n\nGrouped by {plan.grouped_by}: {plan.reason} (split.group_by={params.group_by}).\n\n"
        "Images of each fold containing each class (share of the fold's images).\n\n" + "\n".join(lines) + "\n")
    write_json(out_dir / "metrics.json", {"fold_sizes": sizes, "n_images": len(folds),
                                          "max_class_share_gap": float((shares.max(0) - shares.min(0)).max()),
                                          "max_class_count_gap": int((counts.max(0) - counts.min(0)).max())})
    if params.subset:
        print(f"split: class-balanced subset of {len(keep)}/{subset['of']} images <split.subset={params.subset}>; "
              f"images per class {subset['images_with_class']}")
    print(f"split: {len(folds)} images into {params.n_folds} folds of {sizes}, grouped by {plan.grouped_by}: "
          f"{plan.reason} <split.group_by={params.group_by}>")
    return SplitResult(folds, sizes)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--validate", type=Path, default=Path("artifacts/validate"))
    p.add_argument("--out", type=Path, default=Path("artifacts/split"))
    a = p.parse_args()
    run_main(lambda: (check_dvc_matrix(yaml.safe_load(a.params.read_text()), str(a.params)),
                      run(load_params("split", SplitParams, a.params), a.validate, a.out)))


if __name__ == "__main__":
    main()
