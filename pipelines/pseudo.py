"""Stage `pseudo`: ensemble + TTA on the test images -> confident pseudo-labels for the retrain round."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import cv2

from pipelines.common import parser, run_main, write_json
from pipelines.infer import ensemble_test, find_members
from segpipe.config import DataParams, InferParams, PseudoParams, parse_section, read_params
from segpipe.pseudo import make_pseudo_labels


@dataclass(frozen=True)
class PseudoResult:
    n_kept: int
    n_test: int


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(data: DataParams, params: PseudoParams, infer: InferParams, validate_dir: Path, members_root: Path,
        out_dir: Path) -> PseudoResult:
    """Write out_dir/masks/*.png (ignore where unsure), index.json for training and provenance.json."""
    members = find_members(members_root)
    probs, names = ensemble_test(members, validate_dir, infer)
    pseudo = make_pseudo_labels(probs.astype("float32"), params.threshold, params.min_confident_fraction,
                                data.ignore_index)
    index = json.loads((Path(validate_dir) / "index.json").read_text())
    image_of = {r["file_name"]: r["image"] for r in index["test"]}
    out_dir = Path(out_dir)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    samples = []
    for mask, i in zip(pseudo.masks, pseudo.kept):
        rel = Path("masks") / (Path(names[i]).with_suffix(".png"))
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out_dir / rel), mask):
            raise OSError(f"could not write pseudo mask {out_dir / rel}")
        samples.append({"file_name": names[i], "image": image_of[names[i]], "mask": str(rel)})
    write_json(out_dir / "index.json", {"data_root": index["data_root"], "samples": samples})
    write_json(out_dir / "provenance.json", {
        # which ensemble and which data produced these labels, so a pseudo set can always be traced back
        "members": {m.name: _digest(m.checkpoint) for m in members},
        "tta": list(infer.tta),
        "validated_index_sha256": _digest(Path(validate_dir) / "index.json"),
        "threshold": params.threshold, "min_confident_fraction": params.min_confident_fraction,
    })
    write_json(out_dir / "metrics.json", {"kept": len(samples), "test_images": len(names),
                                          "mean_confident_fraction": float(pseudo.confident_fraction.mean())})
    print(f"pseudo: kept {len(samples)}/{len(names)} test images "
          f"(mean confident share {pseudo.confident_fraction.mean():.0%}, threshold {params.threshold})")
    return PseudoResult(len(samples), len(names))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--validate", type=Path, default=Path("artifacts/validate"))
    p.add_argument("--members", type=Path, default=Path("artifacts/train"))
    p.add_argument("--out", type=Path, default=Path("artifacts/pseudo"))
    a = p.parse_args()
    raw = read_params(a.params)
    run_main(lambda: run(parse_section(raw, "data", DataParams), parse_section(raw, "pseudo", PseudoParams),
                         parse_section(raw, "infer", InferParams), a.validate, a.members, a.out))


if __name__ == "__main__":
    main()
