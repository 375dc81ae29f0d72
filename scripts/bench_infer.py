"""Inference speed: a bare `model(x)` loop vs segpipe's predict_probs with 1, 2 and 4 flip TTA views, same model
and batch, in one run.

    python scripts/bench_infer.py                      # GPU: Unet/ResNet34 at 512x512, batch 32, bf16 autocast
    python scripts/bench_infer.py --size 128 --batch 8 # the CPU default: what a 2-core machine does in a minute

Prints images/second (an image counts once however many views it gets) of
  (a) bare: `model(x)` on a batch already on the device, in the same precision and memory layout as (b);
  (b) predict_probs: uint8 host images -> device, normalise, every view of a batch in one forward pass, inverse
      views on the probabilities, mean, float16 back to the host;
and the ratios: (b) with 1 view against (a) (predict_probs' own overhead), and n views against n x one view
(1.00 = views cost exactly their forward passes; below 1 = batching the views pays).

The measurements run round-robin `--repeats` times and each keeps its fastest round: a job that shares the
machine slows some rounds, never speeds one up, so the fastest round is the closest to the code's own speed.
On a CPU the clock is this process's CPU time (`--clock cpu`, the default there): other jobs on a shared machine
stretch the wall clock but barely the CPU seconds this process spends, so the ratios stay meaningful; the
img/s are then images per CPU-second of all its threads together.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segpipe.engine import autocast_dtype, pick_device  # noqa: E402
from segpipe.models import build_model  # noqa: E402
from segpipe.tta import predict_probs  # noqa: E402

CLASSES = 11
VIEWS = {1: (), 2: ("hflip",), 4: ("hflip", "vflip", "hvflip")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, steps: int, device: torch.device, clock=time.perf_counter) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = clock()
    for _ in range(steps):
        fn()
    sync(device)
    return clock() - t0


def main(argv: list[str] | None = None) -> dict:
    device = pick_device()
    gpu = device.type == "cuda"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="unet")
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--size", type=int, default=512 if gpu else 128)
    p.add_argument("--batch", type=int, default=32 if gpu else 8)
    p.add_argument("--steps", type=int, default=20 if gpu else 4, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=5 if gpu else 1)
    p.add_argument("--repeats", type=int, default=3, help="round-robin rounds; each measurement keeps its fastest")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall" if gpu else "cpu",
                   help="wall: elapsed time (GPU default); cpu: this process's CPU time (CPU default)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--fp32", action="store_true", help="no bf16/fp16 autocast on CUDA")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model(a.arch, a.encoder, CLASSES).to(device).eval()
    channels_last = gpu                   # what params.yaml uses (train.channels_last); on CPU it does not pay
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = autocast_dtype(device, not a.fp32)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.batch, a.size, a.size, 3), dtype=np.uint8)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def bare() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(x)

    n_img = a.batch * a.steps
    runs = [("bare model(x)", 1, bare)] + [
        ("predict_probs", n, lambda tta=tta: predict_probs(model, images, a.batch, device, tta, channels_last, amp))
        for n, tta in VIEWS.items()]
    secs: list[list[float]] = [[] for _ in runs]
    for _ in range(a.repeats):
        for i, (_, _, fn) in enumerate(runs):
            secs[i].append(timed(fn, a.warmup, a.steps, device,
                                 time.process_time if a.clock == "cpu" else time.perf_counter))
    rows = [{"what": what, "views": n, "img_s": n_img / min(s), "spread": max(s) / min(s)}
            for (what, n, _), s in zip(runs, secs)]
    one = rows[1]["img_s"]
    for r in rows[1:]:
        r["vs_bare"] = r["img_s"] / rows[0]["img_s"] * r["views"]     # >1 impossible; 1 = no overhead
        r["vs_n_x_one_view"] = (one / r["views"]) / r["img_s"]         # time(n views) / (n x time(1 view))
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    result = {"device": name, "model": f"{a.arch}/{a.encoder}", "size": a.size, "batch": a.batch,
              "steps": a.steps, "repeats": a.repeats, "clock": a.clock, "precision": str(amp).replace("torch.", "") if amp else "fp32",
              "channels_last": channels_last, "rows": rows}
    print(f"\n{a.arch}/{a.encoder} {a.size}x{a.size}, batch {a.batch}, {result['precision']}, "
          f"channels_last={channels_last}, on {name}; {a.steps} timed batches, fastest of {a.repeats} rounds, "
          f"{'CPU' if a.clock == 'cpu' else 'wall'} seconds\n")
    print(f"{'':<16}{'views':>6}{'img/s':>10}{'forward passes/s':>18}{'x bare (per pass)':>19}"
          f"{'n views / (n x 1 view)':>24}{'slowest/fastest round':>23}")
    for r in rows:
        extra = f"{'':>19}{'':>24}" if "vs_bare" not in r else f"{r['vs_bare']:>19.2f}{r['vs_n_x_one_view']:>24.2f}"
        print(f"{r['what']:<16}{r['views']:>6}{r['img_s']:>10.1f}{r['img_s'] * r['views']:>18.1f}{extra}"
              f"{r['spread']:>23.2f}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
