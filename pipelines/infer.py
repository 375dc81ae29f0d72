"""Stage `infer`: every member's TTA probabilities on its out-of-fold images and on the test set (float16, kept so
ensembles can be recombined without the models), model weights searched on the OOF mIoU, the ensemble's test
masks, a report, and the ablation rows (single model -> +flip -> +multi-scale -> fold -> multi-model ensemble)."""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from pipelines.common import parser, run_main, write_json
from pipelines.results import InferResult
from segpipe.config import DataParams, InferParams, parse_section, read_params
from segpipe.datasets import Sample, decode_all, load_index, read_mask
from segpipe.engine import autocast_dtype, pick_device
from segpipe.ensemble import (GroupStore, Member, WeightSearch, confusion_of, find_members, load_member,
                              oof_miou_fn, score_probs, search_weights, sha256_file)
from segpipe.metrics import MIoU
from segpipe.tta import SlidingWindow, predict_levels

OUT_SIZE = 256   # the submission resolution (DESIGN.md); every OOF score is measured there too
CHUNK = 16


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


def argmax_u8(probs_fn, n: int) -> np.ndarray:
    """uint8 masks (n, 256, 256) from a chunked probability function."""
    return np.concatenate([probs_fn(slice(s, s + CHUNK)).argmax(1).numpy().astype(np.uint8)
                           for s in range(0, n, CHUNK)]) if n else np.zeros((0, OUT_SIZE, OUT_SIZE), np.uint8)


def _resized(probs: np.ndarray):
    """rows -> float32 probabilities (n, C, 256, 256) of those rows."""
    def fn(rows: slice) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(probs[rows])).float()
        if t.shape[-1] == OUT_SIZE and t.shape[-2] == OUT_SIZE:
            return t
        return torch.nn.functional.interpolate(t, size=(OUT_SIZE, OUT_SIZE), mode="bilinear", align_corners=False)
    return fn


def run(data: DataParams, params: InferParams, validate_dir: Path, members_root: Path, out_dir: Path,
        round_: int = 0) -> InferResult:
    """Write members/<member>/{oof,test}.npy (N, C, h, w) float16, test_probs.npy (N, C, 256, 256) float16,
    test_masks.npy, test_index.json, report.{json,md}, metrics.json and ablation.json (+ ablation/*.npy masks)."""
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
    masks = read_masks([by_name[n] for n in all_oof], OUT_SIZE)
    row_of = {n: i for i, n in enumerate(all_oof)}
    groups = sorted({m.group for m in members})
    # mmap: only the config is read here, not every member's weights
    configs = {m.name: torch.load(m.checkpoint, map_location="cpu", weights_only=False, mmap=True)["config"]
               for m in members}
    native = sw.image_size if sw.enabled else max(c["input_size"] for c in configs.values())

    # the single-model rows: per model, its first seed's best checkpoints (one per fold); the test row is one network
    single = {g: [m for m in members if m.group == g and m.epoch == "best"
                  and m.seed == min(x.seed for x in members if x.group == g)] for g in groups}
    row_member = {g: min(single[g], key=lambda m: m.fold).name for g in groups}
    level_metric = {g: [MIoU(nc, ignore) for _ in steps] for g in groups}
    row_test: dict[str, list[np.ndarray]] = {}

    @functools.lru_cache(maxsize=8)
    def images(names: tuple[str, ...] | None, size: int) -> np.ndarray:
        """An OOF fold's images (or the test set's, names=None), decoded once per size."""
        samples = test if names is None else [by_name[n] for n in names]
        return decode_all(samples, size, threads=os.cpu_count() or 1)[0]

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    oof_store = GroupStore(groups, all_oof, nc, native, tmp / ".work" / "oof", params.voting == "hard")
    test_store = GroupStore(groups, test_names, nc, native, tmp / ".work" / "test", params.voting == "hard")
    member_report: dict[str, dict] = {}
    t_predict = time.perf_counter()
    for m in members:
        t0 = time.perf_counter()
        model, cfg = load_member(m.checkpoint, device)
        size = cfg["input_size"]
        window = SlidingWindow(size, sw.overlap, sw.blend) if sw.enabled else None
        dsize = sw.image_size if sw.enabled else size
        kw = dict(channels_last=cfg.get("channels_last", False),
                  amp_dtype=autocast_dtype(device, cfg.get("amp", False)), window=window)
        spec = [(v, s) for _, v, s in steps]
        names = oof_names[m.name]
        stored = np.load(member_dir(m) / "oof.npz")["probs"] if m.epoch == "best" and not sw.enabled else None
        # the train stage already predicted these images with this checkpoint, no TTA: that is the plain step
        reuse = stored is not None and stored.shape == (len(names), len(classes), size, size)
        levels = predict_levels(model, images(tuple(names), dsize), params.batch_size, device, spec, **kw,
                                first=stored if reuse else None)
        mdir = tmp / "members" / m.name
        mdir.mkdir(parents=True)
        np.save(mdir / "oof.npy", levels[-1])
        member_masks = masks[[row_of[n] for n in names]]
        metric = score_probs(levels[-1], member_masks, nc, ignore)
        oof_store.add(m.group, names, levels[-1])
        if m in single[m.group]:
            for k, lv in enumerate(levels):
                level_metric[m.group][k].cm += score_probs(lv, member_masks, nc, ignore).cm
        del levels
        tl = predict_levels(model, images(None, dsize), params.batch_size, device, spec, **kw)
        np.save(mdir / "test.npy", tl[-1])
        test_store.add(m.group, test_names, tl[-1])
        if m.name == row_member[m.group]:
            row_test[m.group] = [argmax_u8(_resized(lv), len(test_names)) for lv in tl]
        del tl, model
        member_report[m.name] = {"oof_miou": metric.value, "model": m.group, "seed": m.seed, "fold": m.fold,
                                 "epoch": m.epoch, "checkpoint": str(m.checkpoint),
                                 "checkpoint_sha256": sha256_file(m.checkpoint), "input_size": size,
                                 "prob_size": dsize, "n_oof": len(names)}
        write_json(mdir / "index.json", {"oof_file_names": names, "test_order": "test_index.json",
                                         **member_report[m.name]})
        print(f"infer r{round_}: {m.name} OOF mIoU {metric.value:.4f} ({len(names)} OOF + {len(test_names)} test "
              f"images x {sum(len(v) * len(s) for _, v, s in steps)} views, {time.perf_counter() - t0:.1f} s)",
              flush=True)
    t_predict = time.perf_counter() - t_predict

    t_search = time.perf_counter()
    oof_store.check_complete(groups)
    score_fn = oof_miou_fn(oof_store, masks, nc, ignore)            # at 256, like every reported figure
    group_oof = {g: score_fn({g: 1.0}) for g in groups}
    equal = {g: 1.0 for g in groups}
    uniform = score_fn(equal) if len(groups) > 1 else group_oof[groups[0]]
    search_size = native
    if params.weight_search and len(groups) > 1:
        # the search scores many weightings: at the members' own resolution (a quarter of 256's pixels on the
        # demo; upsampling moves the argmax only along edges); the chosen one is then scored at 256
        search_masks = read_masks([by_name[n] for n in all_oof], native) if native != OUT_SIZE else masks
        search = search_weights(oof_miou_fn(oof_store, search_masks, nc, ignore), groups, params.weight_grid)
    else:
        search = WeightSearch(equal, uniform, uniform, [{"weights": equal, "oof_miou": uniform}])
        search_size = OUT_SIZE
    weights = search.weights
    ens = MIoU(nc, ignore)
    ens.cm += confusion_of(lambda r: oof_store.ensemble(weights, r, OUT_SIZE), masks, nc, ignore)
    t_search = time.perf_counter() - t_search

    chunks = [test_store.ensemble(weights, slice(s, s + CHUNK), OUT_SIZE) for s in range(0, len(test_names), CHUNK)]
    np.save(tmp / "test_probs.npy", np.concatenate([c.half().numpy() for c in chunks]))
    # masks from the float32 vote: float16 rounding would flip near-ties, and the fold-ensemble row's masks (same
    # weights, one model) must be the very same file
    np.save(tmp / "test_masks.npy", np.concatenate([c.argmax(1).numpy().astype(np.uint8) for c in chunks]))
    del chunks
    write_json(tmp / "test_index.json", {"file_names": test_names})

    single_rows = {g: {name: level_metric[g][k].value for k, (name, _, _) in enumerate(steps)} for g in groups}
    rows = ablation_rows(params, round_, steps, groups, members, single_rows, row_member, row_test, group_oof,
                         weights, ens, test_store, len(test_names), tmp)
    write_json(tmp / "ablation.json", rows)
    report = {
        "round": round_, "members": {k: v["oof_miou"] for k, v in member_report.items()},
        "member_details": member_report, "models": {g: {"oof_miou": group_oof[g], "weight": weights[g],
                                                        "n_members": sum(m.group == g for m in members),
                                                        "single_model_oof_miou": single_rows[g]} for g in groups},
        "weights": weights, "weight_search": params.weight_search, "weight_evaluations": search.evaluations,
        "uniform_oof_miou": uniform, "ensemble_oof_miou": ens.value, "weight_search_size": search_size,
        "ensemble_per_class_iou": ens.per_class(classes), "voting": params.voting, "tta": list(params.tta),
        "scales": list(params.scales), "sliding_window": sw.model_dump(), "members_kind": params.members,
        "n_members": len(members), "n_oof_images": len(all_oof), "n_test": len(test_names),
        "validated_index_sha256": sha256_file(validate_dir / "index.json"),
        "seconds": {"predict": round(t_predict, 1), "weight_search": round(t_search, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
    }
    oof_store.close()
    test_store.close()
    shutil.rmtree(tmp / ".work", ignore_errors=True)
    write_json(tmp / "report.json", report)
    write_json(tmp / "metrics.json", {"oof_miou": ens.value, "uniform_oof_miou": uniform,
                                      **{f"model/{g}": v for g, v in group_oof.items()},
                                      **{f"weight/{g}": v for g, v in weights.items()},
                                      **{f"member/{k}": v for k, v in report["members"].items()}})
    (tmp / "report.md").write_text(report_md(report, rows))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print(f"infer r{round_}: {len(members)} members, {len(groups)} models, TTA {list(params.tta)} x scales "
          f"{list(params.scales)}, {params.voting} vote, weights {weights}; ensemble OOF mIoU {ens.value:.4f} "
          f"(equal weights {uniform:.4f}) in {report['seconds']['total']:.0f} s", flush=True)
    return InferResult(ens.value, report["members"], len(test_names), weights, out_dir)


def ablation_rows(params: InferParams, round_: int, steps, groups: list[str], members: list[Member],
                  single_rows: dict[str, dict[str, float]], row_member: dict[str, str],
                  row_test: dict[str, list[np.ndarray]], group_oof: dict[str, float], weights: dict[str, float],
                  ens: MIoU, test_store: GroupStore, n_test: int, out: Path) -> list[dict]:
    """One row per step that the ablation report shows; each with its OOF mIoU and the test masks it would submit."""
    final = {"oof_miou": ens.value, "masks": "test_masks.npy"}
    if round_ > 0:
        return [{"step": f"pseudo_r{round_}", "name": f"+ pseudo-label round {round_}", **final,
                 "note": f"the round-{round_} members (train + pseudo-labels) ensembled as above"}]
    if not params.ablation:
        return [{"step": "model_ensemble", "name": "ensemble", **final, "note": "<infer.ablation=false>"}]
    # the single-model baseline is the best model without TTA: ensembles are measured against the best one
    primary = max(groups, key=lambda g: (single_rows[g]["plain"], g))
    seed = min(m.seed for m in members if m.group == primary)
    (out / "ablation").mkdir(exist_ok=True)
    level = {name: k for k, (name, _, _) in enumerate(steps)}
    rows = []

    def add(step: str, name: str, oof: float | None, masks: np.ndarray | str | None, note: str) -> None:
        row = {"step": step, "name": name, "oof_miou": oof, "note": note, "masks": None}
        if isinstance(masks, np.ndarray):
            np.save(out / "ablation" / f"{step}.npy", masks)
            row["masks"] = f"ablation/{step}.npy"
        elif masks is not None:
            row["masks"] = masks
        rows.append(row)

    one = (f"OOF: the {primary} s{seed} members of every fold, each on the images it never trained on; "
           f"test: one network ({row_member[primary]})")
    add("single", f"single model ({primary}, no TTA)", single_rows[primary]["plain"],
        row_test[primary][level["plain"]], one)
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
    fold_masks = argmax_u8(lambda r: test_store.ensemble({primary: 1.0}, r, OUT_SIZE), n_test)
    add("fold_ensemble", f"fold ensemble ({primary})", group_oof[primary], fold_masks, fold_note)
    wtxt = ", ".join(f"{g}: {w:g}" for g, w in weights.items())
    add("model_ensemble", f"multi-model ensemble ({len(groups)} models, {params.voting} vote)", ens.value,
        final["masks"], f"weights searched on OOF ({wtxt})" if params.weight_search and len(groups) > 1
        else f"equal weights ({wtxt})")
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
            f"{OUT_SIZE}x{OUT_SIZE}); the ensemble's OOF mIoU is therefore slightly optimistic.\n\n"
            f"| model | members | single, no TTA | + flip | + multi-scale | fold ensemble | weight |\n"
            f"|---|---|---|---|---|---|---|\n{models}\n\n"
            f"**Ensemble OOF mIoU {report['ensemble_oof_miou']:.4f}** (equal weights "
            f"{report['uniform_oof_miou']:.4f}).\n\n| step | OOF mIoU | note |\n|---|---|---|\n{steps}\n\n"
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
