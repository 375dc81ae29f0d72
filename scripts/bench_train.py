"""Training speed: a plain PyTorch loop vs a tuned one vs segpipe's training task, same model and batch.

    python scripts/bench_train.py                       # GPU: Unet/ResNet34 at 512, batch 16
    python scripts/bench_train.py --size 256 --batch 4  # what fits a 2-core CPU in minutes

Prints images/second of
  (a) a bare loop written the plain way: fp32, NCHW;
  (b) a bare loop with bf16 autocast (CUDA only) + channels_last (+ torch.compile with --compile);
  (c) segpipe's train stage end to end (pipelines.train.run): JPEGs decoded from disk, albumentations,
      steps, per-epoch validation with the set-level mIoU, OOF probabilities, checkpoints;
  the data loader alone (decoded cache + augmentation + collation), and with --share N the aggregate rate of
  N copies of (b) running at once on the same device. Ratios are against (a) and (b) from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segpipe.config import (TRASH_CLASSES, DataParams, GenerateParams, ModelSpec, SplitParams,  # noqa: E402
                            TrainParams, ValidateParams)
from segpipe.datasets import ArrayDataset, build_augment, normalize  # noqa: E402
from segpipe.engine import LoopConfig, _epoch_loader, autocast_dtype, pick_device  # noqa: E402
from segpipe.losses import SegLoss  # noqa: E402
from segpipe.models import build_model  # noqa: E402

CLASSES = 11


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(arch: str, encoder: str, size: int, batch: int, steps: int, warmup: int, tuned: bool,
              compile_: bool) -> dict:
    """Random tensors already on the device: the model's own speed, no data pipeline."""
    device = pick_device()
    torch.manual_seed(0)
    model = build_model(arch, encoder, CLASSES).to(device)
    if tuned:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if (tuned and compile_) else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device)
    if tuned:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (batch, size, size), device=device)
    dtype = autocast_dtype(device, tuned)
    loss_fn = torch.nn.CrossEntropyLoss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"img_s": steps * batch / secs, "peak_gib": peak}


def make_dataset(work: Path, n: int, size: int) -> tuple[Path, Path, DataParams]:
    """The embedded synthetic dataset as JPEGs on disk, validated and split like the real chain."""
    from pipelines import generate, split, validate
    data = DataParams(root=str(work / "raw"), classes=TRASH_CLASSES, hidden_labels=str(work / "hidden"))
    generate.run(GenerateParams(n_train=n, n_test=4, image_size=size, n_batches=4, val_fraction=0.2, seed=0), data)
    validate.run(data, ValidateParams(max_empty_images=n, sample_grid=0), work / "validate")
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), work / "validate", work / "split")
    return work / "validate", work / "split", data


def project_task(arch: str, encoder: str, size: int, batch: int, epochs: int, work: Path, vdir: Path, sdir: Path,
                 data: DataParams, threads: int) -> dict:
    from pipelines import train
    params = TrainParams(models={"m": ModelSpec(arch=arch, encoder=encoder)}, seeds=(0,), folds=(0,), epochs=epochs,
                         batch_size=batch, input_size=size, lr=1e-3, weight_decay=1e-4, warmup_epochs=0,
                         num_workers=min(8, os.cpu_count() or 1) if torch.cuda.is_available() else 0,
                         threads=threads)
    t0 = time.perf_counter()
    train.run(data, params, "m", 0, 0, vdir, sdir, work / "train" / "m-s0-f0")
    wall = time.perf_counter() - t0
    m = json.loads((work / "train" / "m-s0-f0" / "metrics.json").read_text())
    cfg = json.loads(json.dumps(torch.load(work / "train" / "m-s0-f0" / "best.pt", weights_only=False)["config"]))
    n_train = cfg["n_train"]
    return {"img_s": n_train * epochs / wall, "steady_img_s": m["img_per_s"], "wall_s": wall, "n_train": n_train,
            "params": params}


def loader_alone(vdir: Path, sdir: Path, params: TrainParams, size: int, batch: int) -> dict:
    from segpipe.datasets import decode_all, load_index
    train_all, _, _ = load_index(vdir / "index.json")
    imgs, masks = decode_all(train_all, size)
    ds = ArrayDataset(imgs, masks, build_augment(params.augment))
    cfg = LoopConfig(1, batch, 1e-3, 0, 0, False, True, params.num_workers, 0)
    device = pick_device()
    n, t0 = 0, time.perf_counter()
    for _ in range(3):
        for x, y in _epoch_loader(ds, cfg, 0, device):
            x = normalize(x.to(device, non_blocking=True), True)
            y = y.to(device, non_blocking=True)
            n += len(x)
    sync(device)
    return {"img_s": n / (time.perf_counter() - t0)}


def shared(args: argparse.Namespace, n: int) -> dict:
    """N processes of (b) at once on the same device; the aggregate rate is the sum of theirs."""
    cmd = [sys.executable, __file__, "--only-b", "--arch", args.arch, "--encoder", args.encoder, "--size",
           str(args.size), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["img_s"] for p in procs]
    return {"img_s": sum(rates), "per_task": rates}


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="unet")
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--size", type=int, default=512 if gpu else 256)
    ap.add_argument("--batch", type=int, default=16 if gpu else 4)
    ap.add_argument("--steps", type=int, default=50 if gpu else 6)
    ap.add_argument("--warmup", type=int, default=10 if gpu else 2)
    ap.add_argument("--images", type=int, default=512 if gpu else 48, help="synthetic train images for (c)")
    ap.add_argument("--epochs", type=int, default=3 if gpu else 1)
    ap.add_argument("--compile", action="store_true", help="add torch.compile to (b)")
    ap.add_argument("--share", type=int, default=2, help="tasks sharing the device for the aggregate rate (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--only-b", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only_b:
        print(json.dumps(bare_loop(args.arch, args.encoder, args.size, args.batch, args.steps, args.warmup, True,
                                   False)))
        return

    device = pick_device()
    name = torch.cuda.get_device_name() if gpu else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"{args.arch}/{args.encoder} at {args.size}px, batch {args.batch}, on {name}; torch {torch.__version__}",
          flush=True)
    res: dict[str, dict] = {}
    res["a"] = bare_loop(args.arch, args.encoder, args.size, args.batch, args.steps, args.warmup, False, False)
    print(f"(a) plain loop: {res['a']['img_s']:.2f} img/s", flush=True)
    res["b"] = bare_loop(args.arch, args.encoder, args.size, args.batch, args.steps, args.warmup, True, args.compile)
    print(f"(b) tuned loop: {res['b']['img_s']:.2f} img/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        vdir, sdir, data = make_dataset(work, args.images, args.size)
        print(f"dataset: {args.images} JPEGs generated, validated and split in {time.perf_counter() - t0:.1f} s",
              flush=True)
        res["c"] = project_task(args.arch, args.encoder, args.size, args.batch, args.epochs, work, vdir, sdir, data,
                                torch.get_num_threads())
        print(f"(c) segpipe task: {res['c']['img_s']:.2f} img/s end to end", flush=True)
        res["loader"] = loader_alone(vdir, sdir, res["c"].pop("params"), args.size, args.batch)
    if args.share > 1:
        res["shared"] = shared(args, args.share)

    a, b = res["a"]["img_s"], res["b"]["img_s"]
    rows = [("(a) plain loop, fp32 NCHW", res["a"]["img_s"], res["a"]["peak_gib"]),
            (f"(b) {'bf16 + ' if gpu else ''}channels_last{' + compile' if args.compile else ''}",
             res["b"]["img_s"], res["b"]["peak_gib"]),
            ("(c) segpipe train task, end to end", res["c"]["img_s"], None),
            ("    (c) steady-state training epochs", res["c"]["steady_img_s"], None),
            ("data loader alone", res["loader"]["img_s"], None)]
    if "shared" in res:
        rows.append((f"{args.share} x (b) sharing the device, aggregate", res["shared"]["img_s"], None))
    print(f"\n| what | img/s | vs (a) | vs (b) | peak GiB |\n|---|---:|---:|---:|---:|")
    for label, rate, peak in rows:
        print(f"| {label} | {rate:.2f} | {rate / a:.2f}x | {rate / b:.2f}x | {'' if peak is None else f'{peak:.1f}'} |")
    print(f"\n(c) trained {res['c']['n_train']} images x {args.epochs} epoch(s) in {res['c']['wall_s']:.1f} s "
          f"including JPEG decoding, validation, OOF prediction and checkpoints")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
