"""What a member stores, and what the infer stage holds in memory, at a given input size (segpipe.probstore).

    python -m scripts.bench_storage --data /tmp/segpipe-competition/data --input-size 512 --train-images 64
    python -m scripts.bench_storage --data DIR --input-size 64 --fractions 1.0 0.5 --out /tmp/bench-tiny

Runs the real stages, each as a process of its own (`python -m pipelines.<stage> --params <file>`, the file being
params.yaml with the overrides below): validate -> split -> train every model x seed x fold for one epoch ->
infer. It does so on the whole dataset and on a fraction of it (`--fractions`: the same share of the train and of
the test photos, a copy of the COCO files pointing at the same photo folders), and reports:

- every stored file of every member (train's oof.npz, infer's members/<m>/{oof,test}.npy, and the run's
  test_probs.npy / test_masks.npy) with its bytes per image against C x S x S (S = min(input size, 256));
- infer's peak resident memory: the kernel's high-water mark for that process (VmHWM, read by the process
  itself at exit; it counts every page it touched, the libraries' included), beside a psutil sample every 0.1 s,
  and the same figure for a process that only imports pipelines.infer (the baseline: torch and its libraries);
- the wall time of every stage;
- the linear check: stored bytes and infer's memory above the baseline, per image, at each fraction. Storage and
  memory grow with images (OOF + test), and a second infer over half the members (with --seeds 0 1) shows that
  they do not grow with members x images.

What is cut, and why that is honest: storage and infer's memory depend on the number of OOF and test images (the
competition's, all of them) and on the input size, not on how well the members learned. So each member trains one
epoch on `--train-images` of its training side only: the rest are listed in a drop list that the train stage
reads through its own `--audit` input (the label-noise audit's `drop` action, training side only). Every member
still validates on, and predicts, its whole fold; infer predicts every OOF and test image.

Writes <out>/bench_storage.json and <out>/bench_storage.md. Prints an estimate of the time it will take, from a
few timed training and inference steps of the model on this machine, before it starts (--estimate-only stops
there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from segpipe.probstore import STORE_SIZE, Rows, bytes_per_image, stored_size

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train_all.json", "train.json", "val.json", "test.json")
TINY = {"arch": "unet", "encoder": "resnet18", "encoder_weights": None,
        "kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a dataset in the COCO layout (train_all.json, "
                   "test.json, photo folders); when it holds none, the `generate` stage's competition shape is written there")
    p.add_argument("--out", type=Path, default=Path("/tmp/segpipe-bench-storage"))
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--input-size", type=int, default=512)
    p.add_argument("--folds", type=int, default=5, help="split.n_folds (every fold is trained: all OOF images)")
    p.add_argument("--model", default="tiny", help="a train.models key of --params, or `tiny` (a 3-level U-Net "
                   "on resnet18: storage does not depend on the model; infer's memory does, a little)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="two seeds add the members x images check")
    p.add_argument("--train-images", type=int, default=64, help="images each member trains on (of its training "
                   "side; the rest are dropped through train's --audit input); 0 = all")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tta", choices=("params", "none"), default="params", help="infer.tta/scales of --params, or "
                   "none: plain inference (about 3x less infer time with params.yaml's; infer then holds one TTA "
                   "level per chunk instead of three)")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--estimate-only", action="store_true")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data
def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:          # another file system (EXDEV) or one without hard links
        shutil.copy2(src, dst)


def subset_data(src: Path, dst: Path, fraction: float, seed: int = 0) -> dict[str, int]:
    """A copy of the COCO files keeping `fraction` of train_all's and of test's photos (the same photos in every
    file that lists them); the photos are hard links to the source's (a copy where src is on another file system).

    Not a symlink to each folder: validation refuses a file reached through a link that leaves data.root
    (segpipe.validation.path_problem), and a hard link is the file itself, inside the root, at no copying cost.
    """
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name not in SPLITS:
            if entry.is_dir():
                shutil.copytree(entry.resolve(), dst / entry.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry.resolve(), dst / entry.name)
    counts = {}
    keep: set[str] = set()
    rng = np.random.default_rng(seed)
    for name in ("train_all.json", "test.json"):
        coco = json.loads((src / name).read_text())
        files = sorted(im["file_name"] for im in coco["images"])
        n = max(1, round(fraction * len(files)))
        keep |= {files[i] for i in sorted(rng.permutation(len(files))[:n])}
    for name in SPLITS:
        if not (src / name).is_file():
            continue
        coco = json.loads((src / name).read_text())
        coco["images"] = [im for im in coco["images"] if im["file_name"] in keep]
        ids = {im["id"] for im in coco["images"]}
        coco["annotations"] = [a for a in coco.get("annotations", []) if a["image_id"] in ids]
        (dst / name).write_text(json.dumps(coco))
        counts[name] = len(coco["images"])
    return counts


def drop_list(validate_dir: Path, keep: int, seed: int, out: Path) -> int:
    """affected.json in the audit stage's format: every training photo but `keep` of them dropped (training side
    only; validation and OOF keep every photo). Returns how many are kept."""
    rows = json.loads((validate_dir / "index.json").read_text())["train"]
    names = sorted(r["file_name"] for r in rows)
    kept = set(names) if keep <= 0 else {names[i] for i in np.random.default_rng(seed).permutation(len(names))[:keep]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "affected.json").write_text(json.dumps({
        "action": "drop", "n": len(names) - len(kept), "round": 0,
        "images": [{"file_name": n, "rank": 0, "miou": None} for n in names if n not in kept],
        "rule": f"scripts.bench_storage: each member trains on <= {keep} photos; storage does not depend on it"}))
    return len(kept)


def write_params(args: argparse.Namespace, data_root: Path, n_train: int, path: Path) -> dict:
    p = yaml.safe_load(args.params.read_text())
    p["profile"], p["profiles"] = "bench", {"bench": {}}     # every value as written here
    p["data"].update(root=str(data_root), hidden_labels="", layout="coco")
    p["validate"].update(max_empty_images=n_train, sample_grid=0)
    p["split"].update(n_folds=args.folds, subset=0)
    models = p["train"]["models"]
    if args.model != "tiny" and args.model not in models:
        raise KeyError(f"Wrong model `{args.model}`, train.models in {args.params}: {sorted(models)} (or `tiny`)")
    spec = TINY if args.model == "tiny" else models[args.model]
    p["train"].update(models={args.model: spec}, seeds=list(args.seeds), folds=list(range(args.folds)), epochs=1,
                      input_size=args.input_size, batch_size=args.batch_size, num_workers=0, threads=0,
                      keep_top_k=1, swa_start=1.0, ema=0.0)
    p["infer"].update(batch_size=args.batch_size, members="best")
    if args.tta == "none":
        p["infer"].update(tta=[], scales=[1.0])
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return p


# ------------------------------------------------------------------------------------------------ processes
# A stage runs as `python -c WRAPPER <hwm file> <module> <args>`: runpy runs the module as `python -m` would, and at
# exit the process writes its own VmHWM (/proc/self/status: the kernel's high-water mark of its resident memory,
# counted from its exec). ru_maxrss from wait4 is no use here: Linux carries the parent's resident set at fork over
# into the child's maxrss, and this script's own process holds torch and a calibrated model.
WRAPPER = """
import atexit, runpy, sys
out, module, run_name = sys.argv[1], sys.argv[2], sys.argv[3]
sys.argv = [module] + sys.argv[4:]
def hwm():
    with open('/proc/self/status') as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    with open(out, 'w') as f:
        f.write(str(kib * 1024))
atexit.register(hwm)
runpy.run_module(module, run_name=run_name, alter_sys=True)
"""


def run_stage(name: str, module: str, argv: list[str], log: Path, sample: bool = False, run: bool = True) -> dict:
    """Run `python -m module argv` to its end (`run=False`: only import it); its wall time and peak resident memory
    (VmHWM at exit), and with `sample` the highest RSS a psutil sampler saw every 0.1 s (a cross-check)."""
    hwm = log.with_name(f".hwm-{os.getpid()}")
    hwm.unlink(missing_ok=True)
    t = time.perf_counter()
    with open(log, "ab") as f:
        f.write(f"\n$ python -m {module} {' '.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(hwm), module, "__main__" if run else "imported",
                                 *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        sampled = [0]
        stop = threading.Event()

        def sampler() -> None:
            import psutil
            try:
                ps = psutil.Process(proc.pid)
                while not stop.is_set():
                    sampled[0] = max(sampled[0], ps.memory_info().rss)
                    stop.wait(0.1)
            except psutil.Error:        # the process ended between two samples
                pass
        thread = threading.Thread(target=sampler, daemon=True)
        if sample:
            thread.start()
        proc.wait()
        stop.set()
        if sample:
            thread.join()
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); its output is in {log}")
    out = {"seconds": round(seconds, 1), "peak_rss_bytes": int(hwm.read_text())}
    hwm.unlink()
    if sample:
        out["sampled_peak_rss_bytes"] = sampled[0]
    print(f"  {name}: {seconds:.1f} s, peak RSS {out['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ estimate
def calibrate(args: argparse.Namespace, params: dict) -> dict[str, float]:
    """Seconds per image of one training step and of one forward pass of the model at the input size, here."""
    import torch

    from segpipe.config import ModelSpec
    from segpipe.models import build_from_spec
    torch.set_num_threads(os.cpu_count() or 1)
    spec = ModelSpec(**next(iter(params["train"]["models"].values())))
    net = build_from_spec(spec, len(params["data"]["classes"]))
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    y = torch.randint(0, len(params["data"]["classes"]), (args.batch_size, args.input_size, args.input_size))
    opt = torch.optim.AdamW(net.parameters())

    def step() -> None:
        opt.zero_grad()
        out = net(x)
        torch.nn.functional.cross_entropy(out if isinstance(out, torch.Tensor) else out[0], y).backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            net(x)
    timed = {}
    for name, fn, mode in (("train", step, net.train), ("forward", forward, net.eval)):
        mode()
        fn()                                    # warm-up
        t = time.perf_counter()
        for _ in range(2):
            fn()
        timed[name] = (time.perf_counter() - t) / (2 * args.batch_size)
    return timed


def estimate(args: argparse.Namespace, params: dict, n_train: int, n_test: int, per_image: dict[str, float],
             start_s: float) -> dict:
    """Seconds per stage and fraction: the calibrated per-image costs, plus `start_s` (an interpreter importing
    the stages' libraries, measured) per stage process."""
    members = len(args.seeds) * args.folds
    views = (1 + len(params["infer"]["tta"])) * sum(s * s for s in params["infer"]["scales"])
    total, parts = 0.0, {}
    for f in args.fractions:
        tr, te = f * n_train, f * n_test
        fold = tr / args.folds
        train_side = (tr - fold) if args.train_images <= 0 else min(args.train_images, tr) * (1 - 1 / args.folds)
        # per member: one epoch, validation of the fold at the epoch's end, the OOF pass; infer: the TTA views
        # beyond the plain one on the fold (the plain one is train's), every view on the test set
        train_s = members * (start_s + train_side * per_image["train"] + 2 * fold * per_image["forward"])
        infer_s = start_s + members * ((fold * (views - 1) + te * views) * per_image["forward"])
        validate_s = 2 * start_s + 60 * (tr + te) / 4100   # README: ~49 s for validation + EDA at 4,100 photos
        parts[f] = {"validate + split": validate_s, "train": train_s, "infer": infer_s}
        total += validate_s + train_s + infer_s
    if len(args.seeds) > 1:
        total += parts[max(args.fractions)]["infer"] / 2
    return {"total_s": total, "by_fraction": parts}


# ------------------------------------------------------------------------------------------------ measures
def stored_files(run_dir: Path, members: list[str], num_classes: int, size: int) -> dict:
    out = {}
    formula = bytes_per_image(num_classes, size)
    for m in members:
        files = {"train/oof.npz": (run_dir / "train" / m / "oof.npz", "probs"),
                 "infer/oof.npy": (run_dir / "infer" / "members" / m / "oof.npy", None),
                 "infer/test.npy": (run_dir / "infer" / "members" / m / "test.npy", None)}
        rows = {}
        for label, (path, key) in files.items():
            r = Rows(path, key)
            rows[label] = {"bytes": path.stat().st_size, "rows": len(r), "shape": list(r.shape), "dtype": str(r.dtype),
                           "data_bytes_per_image": r.row_bytes, "formula_bytes_per_image": formula,
                           "matches_formula": r.row_bytes == formula}
        out[m] = {"files": rows, "total_bytes": sum(v["bytes"] for v in rows.values()),
                  "upload_bytes": rows["infer/oof.npy"]["bytes"] + rows["infer/test.npy"]["bytes"]
                  + rows["train/oof.npz"]["bytes"]}
    shared = {}
    for name in ("test_probs.npy", "test_masks.npy"):
        r = Rows(run_dir / "infer" / name)
        shared[name] = {"bytes": (run_dir / "infer" / name).stat().st_size, "rows": len(r), "dtype": str(r.dtype),
                        "data_bytes_per_image": r.row_bytes}
    return {"members": out, "run": shared}


def run_fraction(args: argparse.Namespace, fraction: float, log: Path) -> dict:
    run_dir = args.out / f"f{fraction:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    counts = subset_data(args.data, run_dir / "data", fraction)
    params_file = run_dir / "params.yaml"
    params = write_params(args, run_dir / "data", counts["train_all.json"], params_file)
    model = next(iter(params["train"]["models"]))
    p = ["--params", str(params_file)]
    print(f"fraction {fraction:g}: {counts['train_all.json']} train + {counts['test.json']} test photos", flush=True)
    stages = {"validate": run_stage("validate", "pipelines.validate", [*p, "--out", str(run_dir / "validate")], log)}
    stages["split"] = run_stage("split", "pipelines.split", [*p, "--validate", str(run_dir / "validate"),
                                                             "--out", str(run_dir / "split")], log)
    kept = drop_list(run_dir / "validate", args.train_images, 0, run_dir / "cut")
    members = []
    for seed in args.seeds:
        for fold in range(args.folds):
            name = f"{model}-s{seed}-f{fold}"
            stages[f"train {name}"] = run_stage(f"train {name}", "pipelines.train", [
                *p, "--model", model, "--seed", str(seed), "--fold", str(fold),
                "--validate", str(run_dir / "validate"), "--split", str(run_dir / "split"),
                "--out-root", str(run_dir / "train"), "--audit", str(run_dir / "cut")], log)
            members.append(name)
    stages["infer"] = run_stage("infer", "pipelines.infer", [*p, "--validate", str(run_dir / "validate"),
                                                             "--members", str(run_dir / "train"),
                                                             "--out", str(run_dir / "infer"), "--round", "0"],
                                log, sample=True)
    report = json.loads((run_dir / "infer" / "report.json").read_text())
    result = {"fraction": fraction, "photos": counts, "n_oof": report["n_oof_images"], "n_test": report["n_test"],
              "members": members, "train_images_kept": kept, "stages": stages,
              "infer_seconds": report["seconds"],
              "storage": stored_files(run_dir, members, len(params["data"]["classes"]), args.input_size)}
    if len(args.seeds) > 1:
        # the same images, half the members (the first seed's): infer's memory must not follow the members
        half = run_dir / "members-half"
        half.mkdir()
        for m in members:
            if m.startswith(f"{model}-s{args.seeds[0]}-"):
                (half / m).symlink_to(run_dir / "train" / m)
        result["infer_half_members"] = run_stage("infer (half the members)", "pipelines.infer", [
            *p, "--validate", str(run_dir / "validate"), "--members", str(half),
            "--out", str(run_dir / "infer-half"), "--round", "0"], log, sample=True)
        result["infer_half_members"]["members"] = len(list(half.iterdir()))
    return result


def markdown(res: dict) -> str:
    mib = 2 ** 20
    lines = [f"# Storage and infer memory at {res['input_size']} px input", "",
             f"{res['date']}, {res['machine']}, commit {res['commit']}:", "", f"    {res['command']}", "",
             f"Stored size S = min({res['input_size']}, {STORE_SIZE}) = {res['stored_size']}; formula "
             f"C x S x S = {res['classes']} x {res['stored_size']} x {res['stored_size']} = "
             f"{res['formula_bytes_per_image']:,} B per image per member; model `{res['model']}`, "
             f"{res['members_per_run']} members, infer TTA {res['tta']['tta']} x scales {res['tta']['scales']}. "
             f"Peak RSS: the infer process's own high-water mark (VmHWM at its exit); the baseline is a process "
             f"that only imports pipelines.infer ({res['baseline']['peak_rss_bytes'] / mib:.0f} MiB).", "",
             "| photos (train + test) | OOF + test images | stored per member (train oof.npz + infer oof.npy + test.npy) "
             "| data bytes / image, every file | = formula | infer peak RSS | above baseline | infer s | "
             "train s (all members) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        mem = r["storage"]["members"]
        per_member = np.mean([m["total_bytes"] for m in mem.values()])
        per_image = {f["data_bytes_per_image"] for m in mem.values() for f in m["files"].values()}
        ok = all(f["matches_formula"] for m in mem.values() for f in m["files"].values())
        peak = r["stages"]["infer"]["peak_rss_bytes"]
        train_s = sum(v["seconds"] for k, v in r["stages"].items() if k.startswith("train"))
        lines.append(f"| {r['photos']['train_all.json']} + {r['photos']['test.json']} | {r['n_oof'] + r['n_test']} | "
                     f"{per_member / mib:.1f} MiB | {', '.join(f'{b:,}' for b in sorted(per_image))} | "
                     f"{'yes' if ok else 'NO'} | {peak / mib:.0f} MiB | "
                     f"{(peak - res['baseline']['peak_rss_bytes']) / mib:.0f} MiB | "
                     f"{r['stages']['infer']['seconds']} | {train_s:.0f} |")
    lines += ["", "Linear check, each run against the largest:", ""]
    lines += [f"- fraction {c['fraction']:g}: images x{c['images_ratio']:.3f} -> stored bytes x{c['bytes_ratio']:.3f}, "
              f"infer memory above the baseline x{c['memory_ratio']:.3f}; between the two runs infer held "
              f"{c['memory_slope_bytes_per_image'] / 1024:.0f} KiB more per image (OOF or test) and the members "
              f"stored {c['stored_bytes_per_image_all_members'] / 1024:.0f} KiB more per image, all members together"
              for c in res["linear"]]
    for r in res["runs"]:
        if "infer_half_members" in r:
            h, full = r["infer_half_members"], r["stages"]["infer"]
            lines.append(f"- fraction {r['fraction']:g}: infer over {h['members']} of {len(r['members'])} members "
                         f"(the same images): peak RSS {h['peak_rss_bytes'] / mib:.0f} MiB against "
                         f"{full['peak_rss_bytes'] / mib:.0f} MiB with all of them")
    return "\n".join(lines) + "\n"


def generate_competition(root: Path, params: Path) -> None:
    """No dataset at --data: the generate stage's competition shape is written there (its test labels beside it)."""
    import pipelines.generate
    from segpipe.config import DataParams, GenerateParams, load_params
    print(f"bench_storage: no train_all.json under {root}: generating the competition-shaped set there "
          "(generate.shape: competition, about a minute)", flush=True)
    seed = load_params("generate", GenerateParams, params).seed
    data = load_params("data", DataParams, params).model_copy(update={
        "root": str(root), "hidden_labels": str(root.parent / "leaderboard")})
    pipelines.generate.run(GenerateParams(shape="competition", seed=seed), data)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.fractions = sorted(set(args.fractions), reverse=True)
    if not (args.data / "train_all.json").is_file():
        generate_competition(args.data, args.params)
    n_train = len(json.loads((args.data / "train_all.json").read_text())["images"])
    n_test = len(json.loads((args.data / "test.json").read_text())["images"])
    probe = write_params(args, args.data, n_train, args.out / "probe-params.yaml")
    log = args.out / "stages.log"
    log.unlink(missing_ok=True)
    # the baseline for memory, and the start-up every stage process pays (for the estimate)
    baseline = run_stage("baseline (infer's imports only)", "pipelines.infer", [], log, sample=True, run=False)
    per_image = calibrate(args, probe)
    est = estimate(args, probe, n_train, n_test, per_image, baseline["seconds"])
    print(f"bench_storage: {n_train} train + {n_test} test photos at fractions {args.fractions}, "
          f"{len(args.seeds) * args.folds} members of `{args.model}` at {args.input_size} px, one epoch on "
          f"{args.train_images or 'all'} training photos each; measured here {per_image['train']:.3f} s/img per "
          f"training step, {per_image['forward']:.3f} s/img per forward pass", flush=True)
    for f, parts in est["by_fraction"].items():
        print(f"  fraction {f:g}: ~" + ", ".join(f"{k} {v / 60:.0f} min" for k, v in parts.items()), flush=True)
    print(f"  estimated total: ~{est['total_s'] / 3600:.1f} h, on these cores as loaded now (decoding and writing "
          "not counted)", flush=True)
    if args.estimate_only:
        return 0
    t0 = time.perf_counter()
    runs = [run_fraction(args, f, log) for f in args.fractions]
    big = runs[0]

    def images(r: dict) -> int:
        return r["n_oof"] + r["n_test"]

    def stored(r: dict) -> int:
        return sum(m["total_bytes"] for m in r["storage"]["members"].values())

    def memory(r: dict) -> int:
        return r["stages"]["infer"]["peak_rss_bytes"] - baseline["peak_rss_bytes"]
    # two points: infer's memory = fixed part + slope x images; storage = bytes per image x images
    linear = [{"fraction": r["fraction"], "images_ratio": images(r) / images(big), "bytes_ratio": stored(r) / stored(big),
               "memory_ratio": memory(r) / memory(big),
               "memory_slope_bytes_per_image": (memory(big) - memory(r)) / max(1, images(big) - images(r)),
               "stored_bytes_per_image_all_members": (stored(big) - stored(r)) / max(1, images(big) - images(r))}
              for r in runs[1:]]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit + ("+dirty" if dirty else ""),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
           "command": "python -m scripts.bench_storage " + " ".join(argv if argv is not None else sys.argv[1:]),
           "input_size": args.input_size, "stored_size": stored_size(args.input_size),
           "classes": len(probe["data"]["classes"]),
           "formula_bytes_per_image": bytes_per_image(len(probe["data"]["classes"]), args.input_size),
           "model": args.model, "members_per_run": len(args.seeds) * args.folds,
           "tta": {"tta": probe["infer"]["tta"], "scales": probe["infer"]["scales"]},
           "estimate_s": round(est["total_s"]), "seconds": round(time.perf_counter() - t0),
           "calibration_s_per_image": per_image, "baseline": baseline, "runs": runs, "linear": linear}
    (args.out / "bench_storage.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "bench_storage.md").write_text(markdown(res))
    print(markdown(res))
    print(f"bench_storage: {res['seconds']} s (estimated {res['estimate_s']} s); {args.out / 'bench_storage.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
