"""Stage `audit`: the label-noise audit. Every training image's out-of-fold mIoU under the round's ensemble (from the
probabilities the infer stage kept), ranked worst first; the worst drawn as photo / ground truth / prediction; and
the list of images the next training round drops or relabels (`audit.action`, `audit.n`).

Relabelled masks follow `audit.teacher`. `fold` (the default): fold k's student trains on a label voted by the
members of fold k, which never saw fold k's images, so its OOF figure stays clean; those members did train on the
relabelled image itself, so they run here on the few listed images. `all`: one label per image from its
out-of-fold ensemble, whose other folds' members trained on fold k (the student's OOF mIoU is then optimistic).
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np

from pipelines.common import parser, run_main, write_json
from pipelines.train import AFFECTED
from pipelines.results import AuditResult
from segpipe.audit import MemberProbs, ensemble_oof, image_miou, pseudo_label, rank_images, worst_grid
from segpipe.config import AuditParams, DataParams, parse_section, read_params
from segpipe.datasets import Sample, decode_all, load_index, read_image, read_mask
from segpipe.engine import autocast_dtype, pick_device
from segpipe.ensemble import load_member, sha256_file
from segpipe.probstore import Rows
from segpipe.tta import predict_levels

SIZE = 256      # every OOF figure of the infer stage is measured at the submission resolution; so is this one


def fold_relabels(report: dict, members_dir: Path, flagged: list[Sample], fold_of: dict[str, int],
                  threshold: float, ignore: int) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, list[str]]]:
    """{image: {fold k: its confident label (SIZE x SIZE)}} for every fold k whose student trains on the image, voted
    by fold k's members (the checkpoints the infer stage used, verified by their sha256), plain prediction; and
    {fold k: the members that voted its labels} (the provenance affected.json keeps)."""
    device = pick_device()
    best = {n: d for n, d in report["member_details"].items() if d.get("epoch", "best") == "best"}
    labels: dict[str, dict[int, np.ndarray]] = {s.file_name: {} for s in flagged}
    voters: dict[str, list[str]] = {}
    for fold in sorted({d["fold"] for d in best.values()}):
        images = [s for s in flagged if fold_of[s.file_name] != fold]
        teachers = []
        for name, d in sorted(best.items()):
            if d["fold"] != fold or not images:
                continue
            ckpt = Path(members_dir) / name / "best.pt"
            if not ckpt.is_file() or sha256_file(ckpt) != d["checkpoint_sha256"]:
                raise FileNotFoundError(f"{ckpt} is missing or not the checkpoint the infer report used "
                                        f"({d['checkpoint_sha256'][:12]}): pass the members folder infer read")
            model, cfg = load_member(ckpt, device)
            x = decode_all([replace(s, mask=None) for s in images], cfg["input_size"])[0]
            probs = predict_levels(model, x, 8, device, [(("identity",), (1.0,))],
                                   channels_last=cfg.get("channels_last", False),
                                   amp_dtype=autocast_dtype(device, cfg.get("amp", False)))[0]
            teachers.append(MemberProbs(d["model"], [s.file_name for s in images], probs))
            voters.setdefault(str(fold), []).append(name)
        for name, probs in ensemble_oof(teachers, report["weights"], [s.file_name for s in images], SIZE):
            labels[name][fold] = pseudo_label(probs, threshold, ignore)
    return labels, voters


def write_mask(label: np.ndarray, like: np.ndarray, path: Path) -> None:
    """`label` (SIZE x SIZE) at the original mask's size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.resize(label, (like.shape[1], like.shape[0]), interpolation=cv2.INTER_NEAREST)):
        raise OSError(f"could not write relabelled mask {path}")


def run(data: DataParams, params: AuditParams, validate_dir: Path, infer_dir: Path, out_dir: Path,
        members_dir: Path | None = None) -> AuditResult:
    """Write out_dir/{ranking.csv, ranking.json, worst.png, report.md, affected.json, metrics.json} (+ masks/).
    `members_dir`: the members the infer stage read (relabel with audit.teacher=fold runs them)."""
    validate_dir, infer_dir, out_dir = Path(validate_dir), Path(infer_dir), Path(out_dir)
    report_path = infer_dir / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found: run the infer stage first")
    report = json.loads(report_path.read_text())
    train, _, classes = load_index(validate_dir / "index.json")
    by_name = {s.file_name: s for s in train}
    members, fold_of = [], {}
    for name, d in sorted(report["member_details"].items()):
        if d.get("epoch", "best") != "best":
            continue               # kept epochs vote through their best member's fold already
        mdir = infer_dir / "members" / name
        names = json.loads((mdir / "index.json").read_text())["oof_file_names"]
        members.append(MemberProbs(d["model"], names, Rows(mdir / "oof.npy")))     # read an image at a time
        fold_of.update(dict.fromkeys(names, d.get("fold", -1)))
    action = params.action if params.n > 0 else "none"
    fold_teachers = action == "relabel" and params.teacher == "fold"
    if fold_teachers and (members_dir is None or any(fold_of[n] < 0 for n in fold_of)):
        raise ValueError("audit.action=relabel with audit.teacher=fold relabels with each fold's own members: "
                         + ("pass the members folder the infer stage read (--members)" if members_dir is None else
                            "its members have no held-out fold; set audit.teacher: all"))
    oof_names = sorted({n for m in members for n in m.names})
    nc, ignore = len(classes), data.ignore_index

    scores: dict[str, tuple[float, float, float]] = {}
    for name, probs in ensemble_oof(members, report["weights"], oof_names, SIZE):
        truth = cv2.resize(read_mask(by_name[name].mask), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
        pred = probs.argmax(0).astype(np.uint8)
        valid = truth != ignore
        acc = float((pred[valid] == truth[valid]).mean()) if valid.any() else float("nan")
        sure = probs.max(0) >= params.relabel_threshold
        scores[name] = (image_miou(truth, pred, nc, ignore), acc, float(sure.mean()))
    ranked = rank_images(scores)
    rows = [asdict(r) for r in ranked]
    # the worst images' predictions and confident labels, computed again for those few only: kept for every
    # image they would grow with the training set (2 x 64 KiB per image)
    preds: dict[str, np.ndarray] = {}
    confident: dict[str, np.ndarray] = {}
    worst_names = [r.file_name for r in ranked[: max(params.show, params.n)]]
    for name, probs in ensemble_oof(members, report["weights"], worst_names, SIZE):
        preds[name] = probs.argmax(0).astype(np.uint8)
        confident[name] = pseudo_label(probs, params.relabel_threshold, ignore)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "ranking.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["file_name"])
        w.writeheader()
        w.writerows(rows)
    write_json(tmp / "ranking.json", rows)

    worst = ranked[: params.show]
    tiles = []
    for r in worst:
        image = cv2.resize(read_image(by_name[r.file_name].image, by_name[r.file_name].exif), (SIZE, SIZE),
                           interpolation=cv2.INTER_AREA)
        truth = cv2.resize(read_mask(by_name[r.file_name].mask), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
        tiles.append((image, truth, preds[r.file_name], f"#{r.rank} {r.file_name}  mIoU {r.miou:.3f}"))
    if tiles:
        worst_grid(tiles, tmp / "worst.png", f"lowest out-of-fold mIoU (ensemble of round {report.get('round')})")

    listed = ranked[: params.n if action != "none" else 0]
    per_fold, voters = fold_relabels(report, Path(members_dir), [by_name[r.file_name] for r in listed], fold_of,
                                     params.relabel_threshold, ignore) if fold_teachers else ({}, {})
    affected = []
    for r in listed:
        entry = {"file_name": r.file_name, "rank": r.rank, "miou": r.miou}
        if action == "relabel":
            # the confident prediction (unsure pixels ignore) at the original mask's size: per student fold, or
            # the image's out-of-fold ensemble's
            orig = read_mask(by_name[r.file_name].mask)
            stem = Path(r.file_name).with_suffix(".png")
            if fold_teachers:
                entry["masks"] = {}
                for fold, label in per_fold[r.file_name].items():
                    rel = Path("masks") / f"f{fold}" / stem
                    write_mask(label, orig, tmp / rel)
                    entry["masks"][str(fold)] = str(rel)
            else:
                write_mask(confident[r.file_name], orig, tmp / Path("masks") / stem)
                entry["mask"] = str(Path("masks") / stem)
        affected.append(entry)
    write_json(tmp / AFFECTED, {
        "action": action, "n": params.n, "round": report.get("round"), "images": affected,
        "teacher": params.teacher if action == "relabel" else None,
        # fold k's student -> the members whose vote relabelled its images (all: each image's OOF members)
        "teachers": voters if fold_teachers else None,
        "member_folds": {n: d.get("fold") for n, d in report["member_details"].items()},
        "relabel_threshold": params.relabel_threshold, "infer_report": str(report_path),
        "rule": "the worst n images by out-of-fold mIoU; training side of the next round only"})
    values = np.array([r.miou for r in ranked], float)
    write_json(tmp / "metrics.json", {
        "n_images": len(rows), "affected": len(affected),
        "median_image_miou": float(np.nanmedian(values)) if len(values) else None,
        "worst_image_miou": float(np.nanmin(values)) if len(values) else None,
        "images_below_0.25": int(np.sum(values < 0.25))})
    (tmp / "report.md").write_text(report_md(rows, affected, action, params, report.get("round"),
                                             has_grid=bool(tiles)))
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)
    print(f"audit: {len(rows)} training images ranked by out-of-fold mIoU (median {np.nanmedian(values):.3f}); "
          f"worst: " + ", ".join(f"{r.file_name} {r.miou:.3f}" for r in ranked[:5])
          + f"; next round: {action} {len(affected)} <audit.action={params.action}, audit.n={params.n}>", flush=True)
    return AuditResult(rows, [a["file_name"] for a in affected], action, out_dir)


def report_md(rows: list[dict], affected: list[dict], action: str, params: AuditParams, round_, has_grid: bool) -> str:
    worst = "\n".join(f"| {r['rank']} | {r['file_name']} | {r['miou']:.4f} | {r['pixel_accuracy']:.3f} | "
                      f"{r['confident_share']:.2f} |" for r in rows[: max(params.show, params.n)])
    what = ("no image is changed <audit.action=none>" if action == "none" else
            f"the worst {len(affected)} images are **{'dropped from' if action == 'drop' else 'relabelled with the ensemble pseudo-labels in'}** "
            f"the next round's training side <audit.action={action}, audit.n={params.n}"
            + (f", audit.teacher={params.teacher}" if action == "relabel" else "") + ">: "
            + ", ".join(a["file_name"] for a in affected))
    grid = "![worst images: photo, ground truth, OOF prediction](worst.png)\n\n" if has_grid else ""
    return (f"# Label-noise audit (round {round_})\n\nEvery training image's own mIoU under the out-of-fold ensemble "
            f"(one confusion matrix per image, classes absent from both left out), lowest first. A low score is "
            f"a hard image or a wrong label: look before you act.\n\nNext round: {what}.\n\n{grid}"
            f"| rank | image | OOF mIoU | pixel acc. | confident share |\n|---|---|---|---|---|\n{worst}\n")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--validate", type=Path, default=Path("artifacts/validate"))
    p.add_argument("--infer", type=Path, default=Path("artifacts/infer/r0"))
    p.add_argument("--out", type=Path, default=Path("artifacts/audit"))
    p.add_argument("--members", type=Path, default=Path("artifacts/train"), help="the members the infer stage read")
    a = p.parse_args()
    raw = read_params(a.params)
    run_main(lambda: run(parse_section(raw, "data", DataParams), parse_section(raw, "audit", AuditParams),
                         a.validate, a.infer, a.out, a.members))


if __name__ == "__main__":
    main()
