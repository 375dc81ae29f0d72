"""Stage `infer`: ensemble + TTA over the trained members; test masks for submission and an OOF report."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipelines.common import parser, run_main, write_json
from segpipe.config import DataParams, InferParams, parse_section, read_params
from segpipe.datasets import decode_all, load_index, read_mask
from segpipe.ensemble import Member, predict_members, resize_probs, score

OUT_SIZE = 256   # the submission resolution (DESIGN.md); OOF scores are measured there too


@dataclass(frozen=True)
class InferResult:
    oof_miou: float
    member_oof_miou: dict[str, float]
    n_test: int


def find_members(members_root: Path) -> list[Member]:
    members = [Member(d.name, d / "best.pt") for d in sorted(Path(members_root).iterdir()) if (d / "best.pt").is_file()]
    if not members:
        raise FileNotFoundError(f"no trained members (*/best.pt) under {members_root}: run the train stage first")
    return members


def ensemble_test(members: list[Member], validate_dir: Path, params: InferParams) -> tuple[np.ndarray, list[str]]:
    """Ensemble TTA probabilities (N, C, 256, 256) float16 for the test images, in test.json order."""
    _, test, _ = load_index(Path(validate_dir) / "index.json")
    images_at = functools.lru_cache(maxsize=None)(lambda size: decode_all(test, size)[0])
    probs, _ = predict_members(members, images_at, tuple(params.tta), params.batch_size, OUT_SIZE)
    return probs, [s.file_name for s in test]


def oof_report(members: list[Member], validate_dir: Path, num_classes: int, ignore_index: int, class_names: list[str]) -> dict:
    """OOF mIoU of every member and of their equal-weight soft vote, on one confusion matrix each."""
    train, _, _ = load_index(Path(validate_dir) / "index.json")
    mask_of = {s.file_name: s.mask for s in train}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    report = {"members": {}}
    for m in members:
        oof = np.load(m.checkpoint.parent / "oof.npz")
        names, probs = list(oof["file_names"]), resize_probs(oof["probs"], OUT_SIZE)
        masks = np.stack([cv2.resize(read_mask(mask_of[n]), (OUT_SIZE, OUT_SIZE), interpolation=cv2.INTER_NEAREST)
                          for n in names])
        report["members"][m.name] = score(probs, masks, num_classes, ignore_index).value
        for n, p in zip(names, probs):
            sums[n] = sums.get(n, 0) + p.astype(np.float32)
            counts[n] = counts.get(n, 0) + 1
    names = sorted(sums)
    masks = np.stack([cv2.resize(read_mask(mask_of[n]), (OUT_SIZE, OUT_SIZE), interpolation=cv2.INTER_NEAREST)
                      for n in names])
    ens = score(np.stack([sums[n] / counts[n] for n in names]), masks, num_classes, ignore_index)
    report["ensemble_oof_miou"] = ens.value
    report["ensemble_per_class_iou"] = ens.per_class(class_names)
    report["n_oof_images"] = len(names)
    return report


def run(data: DataParams, params: InferParams, validate_dir: Path, members_root: Path, out_dir: Path) -> InferResult:
    """Write test_masks.npy (N, 256, 256) uint8, test_index.json, test_probs.npy and report.{json,md}."""
    members = find_members(members_root)
    probs, names = ensemble_test(members, validate_dir, params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "test_probs.npy", probs)
    np.save(out_dir / "test_masks.npy", probs.argmax(1).astype(np.uint8))
    write_json(out_dir / "test_index.json", {"file_names": names})
    report = oof_report(members, validate_dir, len(data.classes), data.ignore_index, list(data.classes))
    report.update({"tta": list(params.tta), "n_members": len(members), "n_test": len(names)})
    write_json(out_dir / "report.json", report)
    write_json(out_dir / "metrics.json", {"oof_miou": report["ensemble_oof_miou"],
                                          **{f"member/{k}": v for k, v in report["members"].items()}})
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in report["members"].items())
    (out_dir / "report.md").write_text(
        f"# Ensemble report\n\nTTA views: identity + {list(params.tta)}; members: {len(members)}; soft vote, equal weights.\n\n"
        f"| member | OOF mIoU |\n|---|---|\n{rows}\n| **ensemble** | **{report['ensemble_oof_miou']:.4f}** |\n")
    print(f"infer: {len(members)} members, TTA {list(params.tta)}, {len(names)} test images; "
          f"ensemble OOF mIoU {report['ensemble_oof_miou']:.4f}")
    return InferResult(report["ensemble_oof_miou"], report["members"], len(names))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--validate", type=Path, default=Path("artifacts/validate"))
    p.add_argument("--members", type=Path, default=Path("artifacts/retrain"))
    p.add_argument("--out", type=Path, default=Path("artifacts/infer"))
    a = p.parse_args()
    raw = read_params(a.params)
    run_main(lambda: run(parse_section(raw, "data", DataParams), parse_section(raw, "infer", InferParams),
                         a.validate, a.members, a.out))


if __name__ == "__main__":
    main()
