"""Stage `split`: multilabel-stratified, grouped K folds over the validated training images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.common import parser, run_main, write_json
from segpipe.config import SplitParams, load_params
from segpipe.folds import fold_class_shares, stratified_group_kfold


@dataclass(frozen=True)
class SplitResult:
    folds: dict[str, int]
    sizes: list[int]


def run(params: SplitParams, validate_dir: Path, out_dir: Path) -> SplitResult:
    """Write out_dir/folds.json (file_name -> fold) and a per-fold class-share report."""
    index = json.loads((Path(validate_dir) / "index.json").read_text())
    train, classes = index["train"], index["classes"]
    groups = [r["batch"] if params.group_by == "batch" else r["file_name"] for r in train]
    present = [tuple(r["classes"]) for r in train]
    assignment = stratified_group_kfold(present, groups, params.n_folds, len(classes), params.seed)
    shares = fold_class_shares(assignment, present, params.n_folds, len(classes))
    sizes = [assignment.count(f) for f in range(params.n_folds)]
    folds = {r["file_name"]: f for r, f in zip(train, assignment)}
    out_dir = Path(out_dir)
    write_json(out_dir / "folds.json", {"n_folds": params.n_folds, "seed": params.seed,
                                        "group_by": params.group_by, "folds": folds})
    lines = ["| fold | images | " + " | ".join(classes) + " |", "|---" * (len(classes) + 2) + "|"]
    for f in range(params.n_folds):
        lines.append(f"| {f} | {sizes[f]} | " + " | ".join(f"{s:.0%}" for s in shares[f]) + " |")
    (out_dir / "report.md").write_text("# Fold split\n\nShare of each fold's images containing each class.\n\n"
                                       + "\n".join(lines) + "\n")
    write_json(out_dir / "metrics.json", {"fold_sizes": sizes,
                                          "max_class_share_gap": float((shares.max(0) - shares.min(0)).max())})
    print(f"split: {len(folds)} images into {params.n_folds} folds of {sizes} (group_by={params.group_by})")
    return SplitResult(folds, sizes)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--validate", type=Path, default=Path("artifacts/validate"))
    p.add_argument("--out", type=Path, default=Path("artifacts/split"))
    a = p.parse_args()
    run_main(lambda: run(load_params("split", SplitParams, a.params), a.validate, a.out))


if __name__ == "__main__":
    main()
