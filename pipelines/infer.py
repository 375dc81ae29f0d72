"""Stage `infer`: every member's TTA probabilities on its out-of-fold images and on the test set (kept so ensembles
can be recombined without the models: uint8 at min(input size, 256), segpipe.probstore), model weights searched
on the OOF mIoU, the ensemble's test masks, a report, and the ablation rows (single model -> +flip ->
+multi-scale -> fold -> multi-model ensemble).

Everything runs a chunk of images at a time: images and label masks are decoded once per size into scratch files
and read back per chunk, each member's probabilities are written as they are predicted, and the ensemble, its weight
search and its test vote read the members' files back chunk by chunk. What the process holds is a few chunks (and
the model), plus a few bytes per image of names and counts: it does not grow with members x images, nor with the
images' pixels.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch

from pipelines.common import parser, run_main, write_json
from pipelines.results import InferResult
from segpipe.config import DataParams, InferParams, parse_section, read_params
from segpipe.datasets import Sample, decode_all, load_index, read_image, read_mask
from segpipe.engine import autocast_dtype, load_checkpoint, pick_device
from segpipe.ensemble import (Member, StoredEnsemble, StoredMember, WeightSearch, disagreement, entropy, find_members,
                              load_member, nested_search, oof_miou_fn, search_weights, sha256_file)
from segpipe.figures import Panel, confusion_heatmap, confusion_rows, iou_rows, normalise_rows, panel_grid
from segpipe.metrics import MIoU, confusion_matrix, miou
from segpipe.parallel import bar
from segpipe.probstore import Rows, dequantise, npy_writer, stored_size, to_stored
from segpipe.tta import SlidingWindow, predict_levels

OUT_SIZE = 256   # the submission resolution (DESIGN.md); every OOF score is measured there too
CHUNK = 16       # images per chunk for the ensemble's reads and the masks' writes
DECODE_CHUNK = 64   # images decoded per thread-pool round (50 MB at 512 px)
GRID_IMAGES = 16    # test photos in the prediction grid: a glance, bounded whatever the test set's size
GRID_ROWS = 8       # OOF images in the disagreement grid (three panels each)
TILE = 128          # px per photo in a grid: photos and masks are downscaled before drawing


def tta_steps(params: InferParams) -> list[tuple[str, tuple[str, ...], tuple[float, ...]]]:
    """The configured TTA as disjoint, cumulative steps: plain, + views (flips/rotations), + the other scales.

    Predicting the steps in turn and reading the running mean after each gives the plain, +flip and full TTA
    probabilities from the forward passes of the full TTA alone: the ablation rows cost no extra inference.
    """
    views = tuple(dict.fromkeys(params.tta))
    other_scales = tuple(s for s in params.scales if s != 1.0)
    steps = [("plain", ("identity",), (1.0,))]
    if views:
        steps.append(("flip", views, (1.0,)))
    if other_scales:
        steps.append(("multiscale", ("identity",) + views, other_scales))
    return steps


def member_dir(m: Member) -> Path:
    return m.checkpoint.parent if m.epoch == "best" else m.checkpoint.parent.parent


def read_masks(samples: list[Sample], size: int) -> np.ndarray:
    return np.stack([cv2.resize(read_mask(s.mask), (size, size), interpolation=cv2.INTER_NEAREST) for s in samples])


def mask_file(samples: list[Sample], size: int, path: Path) -> Rows:
    """The label masks (N, size, size) uint8 in a scratch .npy, read back a chunk at a time."""
    with npy_writer(path, (len(samples), size, size)) as w:
        for start in range(0, len(samples), DECODE_CHUNK):
            w.write(read_masks(samples[start:start + DECODE_CHUNK], size).reshape(-1, size, size))
    return Rows(path)


def at_out_size(stored: np.ndarray) -> torch.Tensor:
    """Stored probabilities (n, C, S, S) -> float32 (n, C, 256, 256): what every OOF figure is measured on."""
    t = torch.from_numpy(dequantise(stored))
    if t.shape[-1] == OUT_SIZE and t.shape[-2] == OUT_SIZE:
        return t
    return torch.nn.functional.interpolate(t, size=(OUT_SIZE, OUT_SIZE), mode="bilinear", align_corners=False)


class DecodedImages:
    """Each image set decoded once per size into a scratch .npy under `work_dir` and read back chunk by chunk: the
    members of a fold share its decoding (as an in-memory cache did), without a whole set ever in memory."""

    def __init__(self, work_dir: Path):
        self.work_dir, self.files = Path(work_dir), {}
        self.work_dir.mkdir(parents=True, exist_ok=True)

    def get(self, kind: str, samples: list[Sample], size: int, chunk: int) -> Rows:
        if (kind, size) not in self.files:
            path = self.work_dir / f"{kind}-{size}.npy"
            photos = [replace(s, mask=None) for s in samples]       # the masks are not needed here
            with npy_writer(path, (len(photos), size, size, 3)) as w:
                for start in range(0, len(photos), chunk):
                    w.write(decode_all(photos[start:start + chunk], size, threads=os.cpu_count() or 1)[0])
            self.files[(kind, size)] = Rows(path)
        return self.files[(kind, size)]


def stored_levels(model: torch.nn.Module, images: Rows, rows: np.ndarray, batch_size: int, device: torch.device,
                  spec: list[tuple[tuple[str, ...], tuple[float, ...]]], size: int, first: Rows | None = None,
                  **kw) -> Iterator[tuple[slice, list[np.ndarray]]]:
    """Per chunk of `rows` (one batch of images): the slice and the cumulative TTA levels as they are stored,
    (n, C, S, S) uint8 at S = stored_size(size).

    `first`, when given, holds the plain level already as stored (the train stage's OOF predictions of the same
    checkpoint): only the other steps run, and each level is the running mean with it (resizing is linear, so
    mixing at S is mixing at full size, up to the quantisation of the plain level).
    """
    n_views = [len(v) * len(s) for v, s in spec]
    for start in bar(range(0, len(rows), batch_size), f"predict {len(rows)} images", unit="batch"):
        sl = slice(start, start + batch_size)
        x = images.read(rows[sl])
        if first is None:
            levels = [to_stored(lv, size) for lv in predict_levels(model, x, batch_size, device, spec, **kw)]
        else:
            plain = first.read(np.arange(len(rows))[sl])
            rest = predict_levels(model, x, batch_size, device, spec[1:], **kw) if len(spec) > 1 else []
            p0 = torch.from_numpy(dequantise(plain))
            levels = [plain]
            for k, lv in enumerate(rest, 1):
                done = sum(n_views[1:k + 1])
                t = torch.from_numpy(np.ascontiguousarray(lv)).float()
                if t.shape[-1] != p0.shape[-1]:
                    t = torch.nn.functional.interpolate(t, size=p0.shape[-2:], mode="bilinear", align_corners=False)
                levels.append(to_stored((p0 * n_views[0] + t * done) / (n_views[0] + done), size))
        yield sl, levels


def run(data: DataParams, params: InferParams, validate_dir: Path, members_root: Path, out_dir: Path,
        round_: int = 0) -> InferResult:
    """Write members/<member>/{oof,test}.npy (N, C, S, S) uint8 (S = min(prob size, 256), segpipe.probstore),
    test_probs.npy (N, C, 256, 256) uint8, test_masks.npy, test_index.json, report.{json,md}, metrics.json and
    ablation.json (+ ablation/*.npy masks)."""
    t_start = time.perf_counter()
    validate_dir, out_dir = Path(validate_dir), Path(out_dir)
    members = find_members(members_root, top_k=params.members == "top_k")
    train, test, _ = load_index(validate_dir / "index.json")
    classes, nc, ignore = list(data.classes), len(data.classes), data.ignore_index
    by_name = {s.file_name: s for s in train}
    test_names = [s.file_name for s in test]
    steps = tta_steps(params)
    sw = params.sliding_window
    device = pick_device()

    oof_names = {m.name: [str(n) for n in np.load(member_dir(m) / "oof.npz")["file_names"]] for m in members}
    all_oof = sorted(set().union(*oof_names.values()))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ".scratch").mkdir(parents=True)
    masks = mask_file([by_name[n] for n in all_oof], OUT_SIZE, tmp / ".scratch" / f"masks-{OUT_SIZE}.npy")
    row_of = {n: i for i, n in enumerate(all_oof)}
    groups = sorted({m.group for m in members})
    # mmap: only the config is read here, not every member's weights
    configs = {m.name: load_checkpoint(m.checkpoint, mmap=True)["config"] for m in members}
    native = sw.image_size if sw.enabled else max(c["input_size"] for c in configs.values())
    ens_size = stored_size(native)      # members of smaller sizes are resized up to it before voting

    # the single-model rows: per model, its first seed's best checkpoints (one per fold); the test row is one network
    single = {g: [m for m in members if m.group == g and m.epoch == "best"
                  and m.seed == min(x.seed for x in members if x.group == g)] for g in groups}
    row_member = {g: min(single[g], key=lambda m: m.fold).name for g in groups}
    level_metric = {g: [MIoU(nc, ignore) for _ in steps] for g in groups}
    row_test: dict[str, list[Path]] = {}      # per model: its single-network test masks per TTA level (files)
    seed_plain: dict[tuple[str, int], MIoU] = {}   # (model, later seed): its best members' OOF mIoU, no TTA

    decoded = DecodedImages(tmp / ".work")
    oof_files: list[StoredMember] = []
    test_files: list[StoredMember] = []
    member_report: dict[str, dict] = {}
    t_predict = time.perf_counter()
    for m in members:
        t0 = time.perf_counter()
        model, cfg = load_member(m.checkpoint, device)
        size = cfg["input_size"]
        window = SlidingWindow(size, sw.overlap, sw.blend) if sw.enabled else None
        dsize = sw.image_size if sw.enabled else size
        s = stored_size(dsize)
        kw = dict(channels_last=cfg.get("channels_last", False),
                  amp_dtype=autocast_dtype(device, cfg.get("amp", False)), window=window)
        spec = [(v, sc) for _, v, sc in steps]
        names = oof_names[m.name]
        stored = Rows(member_dir(m) / "oof.npz", "probs") if m.epoch == "best" and not sw.enabled else None
        # the train stage already predicted these images with this checkpoint, no TTA, and stored them as below:
        # that is the plain step (an older float file, or one of another size, is predicted again)
        reuse = stored is not None and stored.shape == (len(names), nc, s, s) and stored.dtype == np.uint8
        mdir = tmp / "members" / m.name
        mdir.mkdir(parents=True)
        metric = MIoU(nc, ignore)
        member_rows = np.array([row_of[n] for n in names], np.int64)
        images = decoded.get("oof", [by_name[n] for n in all_oof], dsize, DECODE_CHUNK)
        with npy_writer(mdir / "oof.npy", (len(names), nc, s, s)) as out:
            for sl, levels in stored_levels(model, images, member_rows, params.batch_size, device, spec, dsize,
                                            stored if reuse else None, **kw):
                out.write(levels[-1])
                truth = masks.read(member_rows[sl])
                metric.cm += confusion_matrix(truth, at_out_size(levels[-1]).argmax(1).numpy(), nc, ignore)
                if m in single[m.group]:
                    for k, lv in enumerate(levels):
                        level_metric[m.group][k].cm += confusion_matrix(truth, at_out_size(lv).argmax(1).numpy(),
                                                                        nc, ignore)
                elif m.epoch == "best":     # the other seeds' plain single-model figure: the noise band
                    seed_plain.setdefault((m.group, m.seed), MIoU(nc, ignore)).cm += confusion_matrix(
                        truth, at_out_size(levels[0]).argmax(1).numpy(), nc, ignore)
        oof_files.append(StoredMember(m.group, names, mdir / "oof.npy"))
        keep_rows = m.name == row_member[m.group]
        images = decoded.get("test", test, dsize, DECODE_CHUNK)
        with ExitStack() as files:
            out = files.enter_context(npy_writer(mdir / "test.npy", (len(test_names), nc, s, s)))
            if keep_rows:       # the ablation's single-network rows: this member's test masks at every TTA level
                row_test[m.group] = [tmp / ".scratch" / f"{m.group}-{name}.npy" for name, _, _ in steps]
                level_out = [files.enter_context(npy_writer(f, (len(test_names), OUT_SIZE, OUT_SIZE)))
                             for f in row_test[m.group]]
            for _, levels in stored_levels(model, images, np.arange(len(test_names)), params.batch_size, device,
                                           spec, dsize, **kw):
                out.write(levels[-1])
                if keep_rows:
                    for lv, w in zip(levels, level_out):
                        w.write(at_out_size(lv).argmax(1).numpy().astype(np.uint8))
        test_files.append(StoredMember(m.group, test_names, mdir / "test.npy"))
        del model
        member_report[m.name] = {"oof_miou": metric.value, "model": m.group, "seed": m.seed, "fold": m.fold,
                                 "epoch": m.epoch, "checkpoint": str(m.checkpoint),
                                 "checkpoint_sha256": sha256_file(m.checkpoint), "input_size": size,
                                 "prob_size": dsize, "stored_size": s, "stored_dtype": "uint8", "n_oof": len(names),
                                 "pseudo_teacher": cfg.get("pseudo_teacher")}
        write_json(mdir / "index.json", {"oof_file_names": names, "test_order": "test_index.json",
                                         **member_report[m.name]})
        print(f"infer r{round_}: {m.name} OOF mIoU {metric.value:.4f} ({len(names)} OOF + {len(test_names)} test "
              f"images x {sum(len(v) * len(sc) for _, v, sc in steps)} views, {time.perf_counter() - t0:.1f} s)",
              flush=True)
    shutil.rmtree(tmp / ".work", ignore_errors=True)          # the decoded images: scratch
    t_predict = time.perf_counter() - t_predict

    t_search = time.perf_counter()
    hard = params.voting == "hard"
    oof_ens = StoredEnsemble(oof_files, all_oof, nc, ens_size, hard, CHUNK)
    oof_ens.check_complete(groups)
    score_fn = oof_miou_fn(oof_ens, masks, ignore)                  # at 256, like every reported figure
    equal = {g: 1.0 for g in groups}
    # every model alone and the equal weighting: one pass over the files
    first_scores = score_fn([{g: 1.0} for g in groups] + ([equal] if len(groups) > 1 else []))
    group_oof = dict(zip(groups, first_scores))
    uniform = first_scores[-1]
    search_size = ens_size
    if params.weight_search and len(groups) > 1:
        # the search scores many weightings: at the members' stored resolution (a quarter of 256's pixels on the
        # demo; upsampling moves the argmax only along edges); the chosen one is then scored at 256
        search_masks = (mask_file([by_name[n] for n in all_oof], ens_size, tmp / ".scratch" / f"masks-{ens_size}.npy")
                        if ens_size != OUT_SIZE else masks)
        search = search_weights(oof_miou_fn(oof_ens, search_masks, ignore), groups, params.weight_grid)
    else:
        search = WeightSearch(equal, uniform, uniform, [{"weights": equal, "oof_miou": uniform}])
        search_size = OUT_SIZE
    weights = search.weights
    ens = MIoU(nc, ignore)
    cm, oof_scores = score_oof(oof_ens, weights, masks, ignore)
    ens.cm += cm
    # the honest figure: the search above saw the images it is scored on; nested, each fold is scored with weights
    # searched on the other folds only (with no search there is no choice to leak, and the two are equal)
    nested = ens.value
    nested_weights: dict[str, dict[str, float]] = {}
    folds = sorted({m.fold for m in members})
    if params.weight_search and len(groups) > 1 and len(folds) > 1:
        fold_of = {n: folds.index(m.fold) for m in members for n in oof_names[m.name]}
        fold_of_row = np.array([fold_of[n] for n in all_oof], np.int64)
        found = nested_search(lambda ws: oof_ens.fold_confusions(ws, search_masks, ignore, fold_of_row, len(folds)),
                              groups, params.weight_grid, len(folds))
        at_out = oof_ens.fold_confusions(found.weights, masks, ignore, fold_of_row, len(folds))   # scored at 256
        nested = miou(sum(cm[k] for k, cm in enumerate(at_out)))
        nested_weights = {str(f): w for f, w in zip(folds, found.weights)}
    t_search = time.perf_counter() - t_search

    test_ens = StoredEnsemble(test_files, test_names, nc, ens_size, hard, CHUNK)
    shape = (len(test_names), nc, OUT_SIZE, OUT_SIZE)
    with npy_writer(tmp / "test_probs.npy", shape) as probs_out, \
            npy_writer(tmp / "test_masks.npy", (len(test_names), OUT_SIZE, OUT_SIZE)) as masks_out:
        for rows in test_ens.chunks():
            c = test_ens.ensemble(weights, rows, OUT_SIZE)
            probs_out.write(to_stored(c, OUT_SIZE))
            # masks from the float32 vote: rounding would flip near-ties, and the fold-ensemble row's masks (same
            # weights, one model) must be the very same file
            masks_out.write(c.argmax(1).numpy().astype(np.uint8))
    write_json(tmp / "test_index.json", {"file_names": test_names})
    figures = write_figures(tmp / "plots", classes, round_, ens.cm, oof_ens, weights, oof_scores, masks,
                            [by_name[n] for n in all_oof], test, Rows(tmp / "test_masks.npy"))

    single_rows = {g: {name: level_metric[g][k].value for k, (name, _, _) in enumerate(steps)} for g in groups}
    # per model, the plain single-model figure of each seed: the first seed's is the single row's own
    seed_rows = {g: {single[g][0].seed: single_rows[g]["plain"],
                     **{s: v.value for (grp, s), v in sorted(seed_plain.items()) if grp == g}} for g in groups}
    teacher = sorted({str(d["pseudo_teacher"]) for d in member_report.values() if d.get("pseudo_teacher")})
    rows = ablation_rows(params, round_, steps, groups, members, single_rows, row_member, row_test, group_oof,
                         weights, ens, nested, test_ens, len(test_names), tmp, "/".join(teacher) or None,
                         seed_rows)
    write_json(tmp / "ablation.json", rows)
    report = {
        "round": round_, "members": {k: v["oof_miou"] for k, v in member_report.items()},
        "member_details": member_report, "models": {g: {"oof_miou": group_oof[g], "weight": weights[g],
                                                        "n_members": sum(m.group == g for m in members),
                                                        "single_model_oof_miou": single_rows[g],
                                                        "seed_oof_miou": seed_rows[g]} for g in groups},
        "weights": weights, "weight_search": params.weight_search, "weight_evaluations": search.evaluations,
        "uniform_oof_miou": uniform, "ensemble_oof_miou": ens.value, "weight_search_size": search_size,
        # the figure to decide on (ablation, if_better, the round sent): it never saw its own weights' choice
        "oof_miou": nested, "nested_oof_miou": nested, "nested_weights": nested_weights,
        "ensemble_per_class_iou": ens.per_class(classes), "ensemble_confusion": ens.cm.tolist(),
        "figures": figures, "voting": params.voting, "tta": list(params.tta),
        "scales": list(params.scales), "sliding_window": sw.model_dump(), "members_kind": params.members,
        "n_members": len(members), "n_oof_images": len(all_oof), "n_test": len(test_names),
        "validated_index_sha256": sha256_file(validate_dir / "index.json"),
        "seconds": {"predict": round(t_predict, 1), "weight_search": round(t_search, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
    }
    shutil.rmtree(tmp / ".scratch", ignore_errors=True)
    write_json(tmp / "report.json", report)
    write_json(tmp / "metrics.json", {"oof_miou": nested, "selected_oof_miou": ens.value, "uniform_oof_miou": uniform,
                                      **{f"model/{g}": v for g, v in group_oof.items()},
                                      **{f"weight/{g}": v for g, v in weights.items()},
                                      **{f"member/{k}": v for k, v in report["members"].items()}})
    (tmp / "report.md").write_text(report_md(report, rows))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print(f"infer r{round_}: {len(members)} members, {len(groups)} models, TTA {list(params.tta)} x scales "
          f"{list(params.scales)}, {params.voting} vote, weights {weights}; ensemble OOF mIoU {nested:.4f} nested "
          f"({ens.value:.4f} with the weights chosen on it) "
          f"(equal weights {uniform:.4f}) in {report['seconds']['total']:.0f} s", flush=True)
    return InferResult(nested, report["members"], len(test_names), weights, out_dir)


def score_oof(ens: StoredEnsemble, weights: dict[str, float], masks: Rows, ignore: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """The chosen weighting's OOF confusion (C, C) at the masks' size (what `ens.confusions` gives) and, per image,
    (N, 3): the members' disagreement (share of member pairs whose argmax differs, mean over pixels), the
    ensemble's entropy (in units of log C, mean over pixels) and how many members hold it, at the members' stored
    size. One pass: the vote counts re-read each chunk while the page cache still holds it."""
    c = ens.num_classes
    cm = np.zeros((c, c), np.int64)
    scores = np.zeros((len(ens), 3))
    used = [g for g in ens.groups if weights.get(g, 0) > 0]
    for rows in ens.chunks():
        parts = ens.means(rows, used)
        p = ens.vote(parts, weights)
        at_masks = p if p.shape[-1] == masks.shape[-1] else torch.nn.functional.interpolate(
            p, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        cm += confusion_matrix(masks[rows], at_masks.argmax(1).numpy(), c, ignore)
        counts, held = ens.vote_counts(rows)
        scores[rows] = np.stack([disagreement(counts, held).mean((1, 2)).numpy(), entropy(p).mean((1, 2)).numpy(),
                                 held], 1)
    return cm, scores


def _tile(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA)


def _tile_mask(mask: np.ndarray) -> np.ndarray:
    return cv2.resize(mask, (TILE, TILE), interpolation=cv2.INTER_NEAREST)


def write_figures(out: Path, classes: list[str], round_: int, cm: np.ndarray, oof: StoredEnsemble,
                  weights: dict[str, float], scores: np.ndarray, truth: Rows, oof_samples: list[Sample],
                  test: list[Sample], test_masks: Rows) -> dict[str, str]:
    """The pictures people look at, in `out` (the stage's plots/; the whole stage folder is renamed into place, so
    a reader never sees half of them): the OOF confusion normalised by truth (confusion.json for DVC's
    confusion_normalized template, confusion.png), per-class IoU (per_class_iou.csv), test photos with the
    ensemble's masks (test_predictions.png), the OOF images its members disagree on most (oof_disagreement.png),
    the tables the Prefect flow publishes (tables.json) and figures.md linking the images.
    Returns {figure: file name under `out`}."""
    out.mkdir(parents=True, exist_ok=True)
    nc = len(classes)
    write_json(out / "confusion.json", confusion_rows(cm, classes))
    confusion_heatmap(cm, classes, out / "confusion.png",
                      f"Ensemble OOF confusion, round {round_}\n(rows: truth, each normalised to 1)")
    ious = iou_rows(cm, classes)
    with open(out / "per_class_iou.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ious[0]))
        w.writeheader()
        w.writerows({**r, "iou": "" if r["iou"] is None else r["iou"]} for r in ious)
    frac = normalise_rows(cm)
    table = [{"truth": name, "truth_pixels": int(cm[t].sum()),
              **{p: (None if not np.isfinite(frac[t, j]) else round(float(frac[t, j]), 4))
                 for j, p in enumerate(classes)}} for t, name in enumerate(classes)]
    write_json(out / "tables.json", {"confusion": table, "per_class_iou": ious})

    # test photos: evenly spaced over test.json's order, the ensemble's submitted masks over them
    pick = np.unique(np.linspace(0, len(test) - 1, min(GRID_IMAGES, len(test))).round().astype(np.int64))
    preds = test_masks.read(pick) if len(pick) else []
    panels = [Panel(_tile(read_image(test[i].image, test[i].exif)), test[i].file_name, _tile_mask(m))
              for i, m in zip(pick, preds)]
    panel_grid([panels[k:k + 4] for k in range(0, len(panels), 4)], classes, out / "test_predictions.png",
               f"Test photos with the ensemble's prediction (round {round_}; {len(panels)} of {len(test)})")

    # OOF images where the members disagree most; ties (e.g. every image held by one member) by ensemble entropy
    order = np.lexsort((-scores[:, 1], -scores[:, 0]))[:GRID_ROWS]
    idx = np.sort(order)
    pred = oof.ensemble(weights, idx, OUT_SIZE).argmax(1).numpy().astype(np.uint8)
    counts, held = oof.vote_counts(idx)
    dis = disagreement(counts, held).numpy()
    at = {int(i): k for k, i in enumerate(idx)}
    rows = []
    for i in order:
        k, s = at[int(i)], oof_samples[int(i)]
        photo = _tile(read_image(s.image, s.exif))
        rows.append([Panel(photo, f"{s.file_name}: truth", _tile_mask(truth.read([int(i)])[0])),
                     Panel(photo, f"ensemble (disagree {scores[i, 0]:.2f})", _tile_mask(pred[k])),
                     Panel(cv2.resize(dis[k], (TILE, TILE), interpolation=cv2.INTER_NEAREST),
                           f"disagreement (bright), {int(held[k])} members")])
    how = ("share of member pairs whose argmax differs" if scores[:, 2].max(initial=0) >= 2 else
           "one member per image: no pairs to disagree, ranked by the ensemble's entropy")
    panel_grid(rows, classes, out / "oof_disagreement.png",
               f"OOF images the members disagree on most (round {round_}; {how})")
    files = {"confusion": "confusion.png", "test_predictions": "test_predictions.png",
             "oof_disagreement": "oof_disagreement.png", "confusion_data": "confusion.json",
             "per_class_iou": "per_class_iou.csv", "tables": "tables.json", "markdown": "figures.md"}
    iou_line = ", ".join(f"{r['class']} {r['iou']:.3f}" if r["iou"] is not None else f"{r['class']} n/a" for r in ious)
    (out / "figures.md").write_text(
        f"# Ensemble pictures (round {round_})\n\n"
        f"Out-of-fold confusion of the chosen ensemble ({nc} classes; each row divided by its truth pixels, so the "
        f"diagonal is per-class recall). Per-class IoU: {iou_line}.\n\n![OOF confusion](confusion.png)\n\n"
        f"## Test photos with the ensemble's prediction\n\n![test predictions](test_predictions.png)\n\n"
        f"## OOF images the members disagree on most\n\n![OOF disagreement](oof_disagreement.png)\n")
    return files


def ablation_rows(params: InferParams, round_: int, steps, groups: list[str], members: list[Member],
                  single_rows: dict[str, dict[str, float]], row_member: dict[str, str],
                  row_test: dict[str, list[Path]], group_oof: dict[str, float], weights: dict[str, float],
                  ens: MIoU, nested: float, test_store: StoredEnsemble, n_test: int, out: Path,
                  teacher: str | None = None, seed_rows: dict[str, dict[int, float]] | None = None) -> list[dict]:
    """One row per step that the ablation report shows; each with its OOF mIoU and the test masks it would submit.
    A row whose figure was chosen on OOF (the weighted ensemble) shows the nested figure, the selected one beside."""
    final = {"oof_miou": nested, "oof_selected": ens.value, "masks": "test_masks.npy"}
    if round_ > 0:
        return [{"step": f"pseudo_r{round_}", "name": f"+ pseudo-label round {round_}", **final,
                 "pseudo_teacher": teacher,
                 "note": f"the round-{round_} members (train + pseudo-labels) ensembled as above; pseudo-labels by "
                         f"<pseudo.teacher={teacher}> teachers"
                         + (" (all folds: fold k's student saw labels made from fold k, its OOF is optimistic)"
                            if teacher == "all" else "")}]
    if not params.ablation:
        return [{"step": "model_ensemble", "name": "ensemble", **final, "note": "<infer.ablation=false>"}]
    # the single-model baseline is the best model without TTA: ensembles are measured against the best one
    primary = max(groups, key=lambda g: (single_rows[g]["plain"], g))
    seed = min(m.seed for m in members if m.group == primary)
    (out / "ablation").mkdir(exist_ok=True)
    level = {name: k for k, (name, _, _) in enumerate(steps)}
    rows = []

    def add(step: str, name: str, oof: float | None, masks: np.ndarray | Path | str | None, note: str) -> None:
        row = {"step": step, "name": name, "oof_miou": oof, "note": note, "masks": None}
        if isinstance(masks, np.ndarray):
            np.save(out / "ablation" / f"{step}.npy", masks)
            row["masks"] = f"ablation/{step}.npy"
        elif isinstance(masks, Path):                 # written while predicting (infer's scratch)
            os.replace(masks, out / "ablation" / f"{step}.npy")
            row["masks"] = f"ablation/{step}.npy"
        elif masks is not None:
            row["masks"] = masks
        rows.append(row)

    one = (f"OOF: the {primary} s{seed} members of every fold, each on the images it never trained on; "
           f"test: one network ({row_member[primary]})")
    seeds = (seed_rows or {}).get(primary, {})
    spread = max(seeds.values()) - min(seeds.values()) if len(seeds) > 1 else None
    one += (f"; noise band: the same row on seeds {', '.join(f's{k} {v:.4f}' for k, v in seeds.items())} differs "
            f"by {spread:.4f}" if spread is not None else
            "; no noise band: one seed (train.seeds with two gives one)")
    add("single", f"single model ({primary}, no TTA)", single_rows[primary]["plain"],
        row_test[primary][level["plain"]], one)
    rows[-1].update(seed_spread=spread, seed_oof_miou={str(k): v for k, v in seeds.items()})
    if "flip" in level:
        add("flip_tta", f"+ flip TTA ({', '.join(params.tta)})", single_rows[primary]["flip"],
            row_test[primary][level["flip"]], "same networks, views averaged after inverting them")
    else:
        add("flip_tta", "+ flip TTA", None, None, "skipped: no views besides identity <infer.tta=[]>")
    if "multiscale" in level:
        add("multiscale_tta", f"+ multi-scale TTA (scales {list(params.scales)})", single_rows[primary]["multiscale"],
            row_test[primary][level["multiscale"]], "same networks, every view at every scale")
    else:
        add("multiscale_tta", "+ multi-scale TTA", None, None, "skipped: one scale <infer.scales=[1.0]>")
    n_primary = sum(m.group == primary for m in members)
    n_folds = len({m.fold for m in members if m.group == primary})
    fold_note = (f"{n_primary} members ({n_folds} folds x seeds x kept epochs), full TTA; "
                 + ("OOF cannot show fold averaging: each train image has one out-of-fold member per seed/epoch, "
                    "so the OOF mIoU equals the row above; the test score shows the gain"
                    if n_primary == n_folds else "OOF averages the seeds/epochs of each fold"))
    fold_masks = out / ".scratch" / "fold_ensemble.npy"
    with npy_writer(fold_masks, (n_test, OUT_SIZE, OUT_SIZE)) as w:
        for chunk in test_store.chunks():
            w.write(test_store.ensemble({primary: 1.0}, chunk, OUT_SIZE).argmax(1).numpy().astype(np.uint8))
    add("fold_ensemble", f"fold ensemble ({primary})", group_oof[primary], fold_masks, fold_note)
    wtxt = ", ".join(f"{g}: {w:g}" for g, w in weights.items())
    name = (f"multi-model ensemble ({len(groups)} models, {params.voting} vote)" if len(groups) > 1
            else f"ensemble sent ({primary} only: the fold ensemble, {params.voting} vote)")
    add("model_ensemble", name, nested,
        final["masks"], f"weights searched on OOF ({wtxt}); OOF mIoU nested: each fold scored with weights "
        f"searched on the others ({ens.value:.4f} with the weights chosen on all)"
        if params.weight_search and len(groups) > 1 else f"equal weights ({wtxt})")
    rows[-1]["oof_selected"] = ens.value
    return rows


def report_md(report: dict, rows: list[dict]) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.4f}"
    models = "\n".join(
        f"| {g} | {d['n_members']} | "
        + " | ".join(f(d["single_model_oof_miou"].get(k)) for k in ("plain", "flip", "multiscale"))
        + f" | {f(d['oof_miou'])} | {d['weight']:g} |" for g, d in report["models"].items())
    members = "\n".join(f"| {k} | {f(v)} |" for k, v in report["members"].items())
    steps = "\n".join(f"| {r['name']} | {f(r['oof_miou'])} | {r['note']} |" for r in rows)
    return (f"# Ensemble report (round {report['round']})\n\n"
            f"TTA: identity + {report['tta']} at scales {report['scales']}; sliding window: "
            f"{report['sliding_window']['enabled']}; {report['voting']} vote over {report['n_members']} members "
            f"({report['members_kind']}); OOF images: {report['n_oof_images']}, test images: {report['n_test']}.\n\n"
            f"Weights were chosen on the OOF predictions only ({len(report['weight_evaluations'])} weightings "
            f"tried at {report['weight_search_size']}x{report['weight_search_size']}; every figure here is at "
            f"{OUT_SIZE}x{OUT_SIZE}): scored on the same images, the selected ensemble's OOF mIoU is optimistic. "
            f"The nested figure scores each fold with weights searched on the other folds only.\n\n"
            f"| model | members | single, no TTA | + flip | + multi-scale | fold ensemble | weight |\n"
            f"|---|---|---|---|---|---|---|\n{models}\n\n"
            f"**Ensemble OOF mIoU {report['nested_oof_miou']:.4f} nested** (selected "
            f"{report['ensemble_oof_miou']:.4f}, equal weights {report['uniform_oof_miou']:.4f}).\n\n| step | OOF mIoU | note |\n|---|---|---|\n{steps}\n\n"
            f"| member | OOF mIoU (full TTA) |\n|---|---|\n{members}\n")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--validate", type=Path, default=Path("artifacts/validate"))
    p.add_argument("--members", type=Path, default=Path("artifacts/retrain/r1"))
    p.add_argument("--out", type=Path, default=Path("artifacts/infer/r1"))
    p.add_argument("--round", type=int, default=1, help="pseudo-label round the members come from (0: train)")
    a = p.parse_args()
    raw = read_params(a.params)
    run_main(lambda: run(parse_section(raw, "data", DataParams), parse_section(raw, "infer", InferParams),
                         a.validate, a.members, a.out, a.round))


if __name__ == "__main__":
    main()
