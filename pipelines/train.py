"""Stage `train`: one model x seed x fold; writes best checkpoint, out-of-fold probabilities, metrics."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.common import parser, run_main, write_json
from segpipe.config import DataParams, RetrainParams, TrainParams, parse_section, read_params
from segpipe.datasets import ArrayDataset, decode_all, load_index, load_pseudo_index, train_transform
from segpipe.engine import LoopConfig, pick_device, predict_probs, train_model, autocast_dtype
from segpipe.models import SegLoss, build_model


@dataclass(frozen=True)
class TrainResult:
    key: str
    best_miou: float
    out_dir: Path


def task_key(model: str, seed: int, fold: int) -> str:
    """The matrix key: also the artifact folder name and the Prefect task-run name."""
    return f"{model}-s{seed}-f{fold}"


def cpu_threads(params: TrainParams) -> int:
    """Split the CPU between the tasks that run at once (the flow sets SEGPIPE_PARALLEL_TASKS)."""
    if params.threads:
        return params.threads
    parallel = max(1, int(os.environ.get("SEGPIPE_PARALLEL_TASKS", "1")))
    return max(1, (os.cpu_count() or 1) // parallel)


def run(
    data: DataParams, params: TrainParams, model: str, seed: int, fold: int, validate_dir: Path, split_dir: Path,
    out_dir: Path, *, epochs: int | None = None, pseudo_dir: Path | None = None, resume_dir: Path | None = None,
) -> TrainResult:
    """Train `model` on every fold but `fold` (+ pseudo-labelled test images if given); validate on `fold`."""
    if model not in params.models:
        raise KeyError(f"Wrong model `{model}`, models in params.yaml train.models: {sorted(params.models)}")
    torch.set_num_threads(cpu_threads(params))
    spec = params.models[model]
    key = task_key(model, seed, fold)
    out_dir = Path(out_dir)
    train_all, _, classes = load_index(Path(validate_dir) / "index.json")
    folds = json.loads((Path(split_dir) / "folds.json").read_text())["folds"]
    if fold not in set(folds.values()):
        raise ValueError(f"fold {fold} not in the split (folds: {sorted(set(folds.values()))}); check train.folds")
    train_s = [s for s in train_all if folds[s.file_name] != fold]
    val_s = [s for s in train_all if folds[s.file_name] == fold]
    if pseudo_dir is not None:
        # pseudo-labelled test images only ever join the training side, so validation stays honest
        train_s += load_pseudo_index(Path(pseudo_dir) / "index.json")

    size = params.input_size
    threads = cpu_threads(params)
    tr_img, tr_mask = decode_all(train_s, size, threads)
    va_img, va_mask = decode_all(val_s, size, threads)
    cfg = LoopConfig(epochs or params.epochs, params.batch_size, params.lr, params.weight_decay,
                     params.warmup_epochs, params.amp, params.channels_last, params.num_workers, seed)
    resolved = {"model": spec.model_dump(), "name": model, "seed": seed, "fold": fold, "num_classes": len(classes),
                "classes": classes, "input_size": size, "amp": params.amp, "channels_last": params.channels_last,
                "loop": cfg.__dict__, "loss": params.loss, "n_train": len(train_s), "n_val": len(val_s),
                "pseudo": pseudo_dir is not None}
    weights = None
    if params.class_weights == "eda":
        by_name = json.loads((Path(validate_dir) / "eda" / "eda_metrics.json").read_text())["class_weights"]
        weights = torch.tensor([by_name[c] for c in classes], dtype=torch.float32)
    resolved["class_weights"] = None if weights is None else weights.tolist()
    torch.manual_seed(seed)
    net = build_model(spec.arch, spec.encoder, len(classes), spec.encoder_weights)
    ds = ArrayDataset(tr_img, tr_mask, train_transform(params.hflip, params.vflip, params.color_jitter))
    resume_dir = Path(resume_dir) if resume_dir else out_dir.parent / ".resume" / out_dir.name
    print(f"train {key}: {len(train_s)} train / {len(val_s)} val images at {size}px, "
          f"{cfg.epochs} epochs on {pick_device()} ({threads} threads)")
    result = train_model(net, SegLoss(params.loss, data.ignore_index, weights), ds, va_img, va_mask, cfg, classes,
                         data.ignore_index, resume_dir, resolved)

    # out-of-fold probabilities of the best epoch, kept as float16 for ensembling and weight search
    best = torch.load(resume_dir / "best.pt", map_location="cpu", weights_only=False)
    net.load_state_dict(best["model"])
    device = pick_device()
    oof = predict_probs(net.to(device), va_img, params.batch_size, device, (), params.channels_last,
                        autocast_dtype(device, params.amp))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(resume_dir / "best.pt", tmp / "best.pt")
    np.savez(tmp / "oof.npz", probs=oof, file_names=np.array([s.file_name for s in val_s]))
    write_json(tmp / "metrics.json", {"key": key, "best_miou": result.best_miou, "best_epoch": result.best_epoch,
                                      "per_class_iou": result.per_class, "img_per_s": result.images_per_second,
                                      "resumed_from_epoch": result.resumed_from})
    write_json(tmp / "history.json", result.history)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    shutil.rmtree(resume_dir, ignore_errors=True)   # finished: the resume state is no longer needed
    print(f"train {key}: best val mIoU {result.best_miou:.4f} at epoch {result.best_epoch + 1} -> {out_dir}")
    return TrainResult(key, result.best_miou, out_dir)


def main(round_: int = 0) -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--validate", type=Path, default=Path("artifacts/validate"))
    p.add_argument("--split", type=Path, default=Path("artifacts/split"))
    p.add_argument("--pseudo", type=Path, default=Path("artifacts/pseudo") if round_ else None)
    p.add_argument("--out-root", type=Path, default=Path("artifacts/retrain" if round_ else "artifacts/train"))
    a = p.parse_args()
    raw = read_params(a.params)
    data, params = parse_section(raw, "data", DataParams), parse_section(raw, "train", TrainParams)
    epochs = parse_section(raw, "retrain", RetrainParams).epochs if round_ else None
    run_main(lambda: run(data, params, a.model, a.seed, a.fold, a.validate, a.split,
                         a.out_root / task_key(a.model, a.seed, a.fold), epochs=epochs, pseudo_dir=a.pseudo))


if __name__ == "__main__":
    main()
