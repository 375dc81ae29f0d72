"""The model zoo side by side: size, cost, speed, memory and a short-budget mIoU for every registry architecture.

    python scripts/bench_models.py                         # GPU: speed at 512 px; CPU: at 128 px, a short budget
    python scripts/bench_models.py --only unet_r34,segnet_vgg16 --out bench.md

Columns, per model (segpipe.models.ARCHITECTURES through build_from_spec, the heads as the row configures them):
  params      trainable parameters, millions;
  GFLOPs      per 1x3x512x512 eval forward, counted by torch.utils.flop_counter.FlopCounterMode on the meta
              device (convolutions and matrix products, 2 FLOPs per multiply-add; element-wise ops not counted);
  train img/s an optimiser step (AdamW, CE) on random tensors; GPU: bf16 autocast + channels_last as the engine
              runs; CPU: fp32 channels_last;
  infer img/s eval forward under torch.no_grad, same settings;
  peak GiB    GPU memory allocated during the training steps (GPU only);
  mIoU        pipelines.train.run end to end on the embedded synthetic dataset (generate -> validate -> split, fold 0
              validated) with params.yaml's train section shrunk to the budget in the header;
  train s     that run's wall time (decode, epochs, validation, OOF probabilities, checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segpipe.config import ModelSpec, TrainParams, load_params  # noqa: E402
from segpipe.engine import autocast_dtype, pick_device  # noqa: E402
from segpipe.models import build_from_spec  # noqa: E402

CLASSES = 11


@dataclass(frozen=True)
class Row:
    name: str
    spec: ModelSpec
    note: str = ""
    extra: dict = field(default_factory=dict)


def _spec(arch: str, encoder: str, **kw) -> ModelSpec:
    return ModelSpec(arch=arch, encoder=encoder, **kw)


ROWS = [
    Row("unet_r34", _spec("unet", "resnet34")),
    Row("unet_r34_aux", _spec("unet", "resnet34", aux_weight=0.4), "class-presence head, BCE weight 0.4"),
    Row("unetplusplus_r34", _spec("unetplusplus", "resnet34")),
    Row("fpn_r34", _spec("fpn", "resnet34")),
    Row("fpn_hrnet18s", _spec("fpn", "tu-hrnet_w18_small"), "timm encoder"),
    Row("pspnet_r34", _spec("pspnet", "resnet34")),
    Row("deeplabv3_r34", _spec("deeplabv3", "resnet34")),
    Row("deeplabv3plus_r34", _spec("deeplabv3plus", "resnet34")),
    Row("linknet_r34", _spec("linknet", "resnet34")),
    Row("manet_r34", _spec("manet", "resnet34")),
    Row("pan_r34", _spec("pan", "resnet34")),
    Row("upernet_r34", _spec("upernet", "resnet34")),
    Row("segformer_mitb0", _spec("segformer", "mit_b0")),
    Row("dpt_vits16", _spec("dpt", "tu-vit_small_patch16_224")),
    Row("unet3plus_r34", _spec("unet3plus", "resnet34", side_weight=1.0, aux_weight=1.0), "deep supervision + CGM"),
    Row("fcn_r50", _spec("fcn", "resnet50", side_weight=0.5), "aux FCN head, weight 0.5"),
    Row("segnet_vgg16", _spec("segnet", "vgg16_bn")),
    Row("deconvnet_vgg16", _spec("deconvnet", "vgg16_bn")),
]


def fit_to_size(spec: ModelSpec, size: int) -> tuple[ModelSpec, int, str]:
    """The spec and input size a short-budget run can use; the note says what changed."""
    if spec.arch == "pan" and size < 128:
        return spec, 128, "mIoU at 128 px (PAN needs >= 128)"
    if spec.arch == "deconvnet":
        k = spec.kwargs.get("fc_kernel", 7)
        if size < 32 * k:
            kernel = max(1, size // 32)
            return (spec.model_copy(update={"kwargs": {**spec.kwargs, "fc_kernel": kernel}}), size,
                    f"fc_kernel {kernel} at {size} px (paper's 7 needs >= 224 px)")
    return spec, size, ""


def build(spec: ModelSpec) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_from_spec(spec, CLASSES)


def gflops_512(spec: ModelSpec) -> float:
    """Forward FLOPs of one 512x512 image; on the meta device (no memory, no compute), real tensors as fallback."""
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = build(spec).eval()
                x = torch.zeros(1, 3, 512, 512)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x)
            return counter.get_total_flops() / 1e9
        except (NotImplementedError, RuntimeError) as e:
            print(f"  flop count on {device} failed ({type(e).__name__}: {str(e)[:80]}); retrying", flush=True)
    return float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed(spec: ModelSpec, size: int, batch: int, warmup: int, steps: int) -> dict:
    """Training and inference images/second (and peak GPU memory) on random tensors already on the device."""
    device = pick_device()
    torch.manual_seed(0)
    model = build(spec).to(device).to(memory_format=torch.channels_last)
    dtype = autocast_dtype(device, True)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (batch, size, size), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    from segpipe.losses import SegLoss
    loss_fn = SegLoss("ce", 255, side_weight=spec.side_weight, aux_weight=spec.aux_weight).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    train = steps * batch / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    model.eval()
    with torch.no_grad():
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(x)
    sync(device)
    infer = steps * batch / (time.perf_counter() - t0)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"train_img_s": train, "infer_img_s": infer, "peak_gib": peak}


def short_budget_miou(spec: ModelSpec, size: int, epochs: int, work: Path, dataset: tuple) -> dict:
    """pipelines.train.run on fold 0 with params.yaml's train section shrunk to this budget."""
    from pipelines import train
    vdir, sdir, data = dataset
    base = load_params("train", TrainParams, ROOT / "params.yaml")
    workers = min(8, os.cpu_count() or 1) if torch.cuda.is_available() else 0
    params = base.model_copy(update={"models": {"m": spec}, "seeds": (0,), "folds": (0,), "epochs": epochs,
                                     "input_size": size, "threads": torch.get_num_threads(), "num_workers": workers})
    out = work / "train" / spec.arch
    t0 = time.perf_counter()
    r = train.run(data, params, "m", 0, 0, vdir, sdir, out)
    return {"miou": r.best_miou, "train_s": time.perf_counter() - t0}


def fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated row names (default: all)")
    ap.add_argument("--size", type=int, default=512 if gpu else 128, help="speed-test input size")
    ap.add_argument("--batch", type=int, default=8 if gpu else 2)
    ap.add_argument("--warmup", type=int, default=3 if gpu else 1)
    ap.add_argument("--steps", type=int, default=10 if gpu else 2)
    ap.add_argument("--images", type=int, default=256 if gpu else 48, help="synthetic train images for the mIoU run")
    ap.add_argument("--train-size", type=int, default=256 if gpu else 64, help="input size of the mIoU run")
    ap.add_argument("--epochs", type=int, default=4 if gpu else 2)
    ap.add_argument("--no-miou", action="store_true", help="skip the end-to-end training runs")
    ap.add_argument("--out", type=Path, help="also write the markdown table here (and the raw numbers beside it)")
    ap.add_argument("--render", type=Path, help="print the table of an earlier run's .json and exit")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        print(render(saved["meta"], saved["results"]))
        return
    rows = ROWS if not args.only else [r for r in ROWS if r.name in args.only.split(",")]
    if not rows:
        raise SystemExit(f"no rows match --only {args.only}; rows: {[r.name for r in ROWS]}")

    machine = (torch.cuda.get_device_name() if gpu else
               f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (no GPU)")
    precision = "bf16 autocast + channels_last" if gpu else "fp32, channels_last"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = None
        if not args.no_miou:
            from scripts.bench_train import make_dataset
            t0 = time.perf_counter()
            dataset = make_dataset(work, args.images, max(128, args.train_size))
            print(f"dataset: {args.images} images generated, validated and split in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        for row in rows:
            t0 = time.perf_counter()
            res = {"name": row.name, "arch": row.spec.arch, "encoder": row.spec.encoder, "note": row.note}
            res["params_m"] = sum(p.numel() for p in build(row.spec).parameters() if p.requires_grad) / 1e6
            res["gflops"] = gflops_512(row.spec)
            spec, size, note = fit_to_size(row.spec, args.size)
            res.update(speed(spec, size, args.batch, args.warmup, args.steps))
            res["speed_note"] = note if note and size != args.size else ""
            if dataset is not None:
                spec, size, note = fit_to_size(row.spec, args.train_size)
                res.update(short_budget_miou(spec, size, args.epochs, work, dataset))
                res["miou_note"] = note
            results.append(res)
            print(f"{row.name}: {json.dumps({k: v for k, v in res.items() if isinstance(v, float)})} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    budget = (f"{args.images} synthetic images (fold 0 of 2 validated), {args.train_size} px, {args.epochs} epochs"
              if not args.no_miou else "skipped")
    meta = {"machine": machine, "torch": torch.__version__, "size": args.size, "batch": args.batch,
            "precision": precision, "budget": budget}
    table = render(meta, results)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def render(meta: dict, results: list[dict]) -> str:
    """The markdown table; speeds also as a ratio to the first row (unet_r34 by default) of the same run."""
    base = results[0]
    size = meta["size"]
    lines = [f"Machine: {meta['machine']}; torch {meta['torch']}. Speed at {size} px, batch {meta['batch']}, "
             f"{meta['precision']}; GFLOPs per 512x512 image; mIoU budget: {meta['budget']}.", "",
             f"| model | arch | encoder | params (M) | GFLOPs @512 | train img/s @{size} | vs {base['name']} | "
             f"infer img/s @{size} | vs {base['name']} | peak GPU GiB | mIoU | train s | notes |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        notes = "; ".join(n for n in (r["note"], r.get("speed_note", ""), r.get("miou_note", "")) if n)
        lines.append(f"| {r['name']} | {r['arch']} | {r['encoder']} | {r['params_m']:.1f} | {fmt(r['gflops'])} | "
                     f"{fmt(r['train_img_s'], 2)} | {r['train_img_s'] / base['train_img_s']:.2f}x | "
                     f"{fmt(r['infer_img_s'], 2)} | {r['infer_img_s'] / base['infer_img_s']:.2f}x | "
                     f"{fmt(r['peak_gib'], 2)} | {fmt(r.get('miou'), 4)} | {fmt(r.get('train_s'), 0)} | {notes} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
