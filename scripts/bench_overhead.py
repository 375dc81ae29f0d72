"""How much of a full-pipeline run is not the stages' own work, and how long a "nothing changed" night takes.

    python -m scripts.bench_overhead                      # demo size (params.yaml as it is)
    python -m scripts.bench_overhead --size competition   # generate.shape competition; 1 epoch, no pseudo round

In a throwaway copy of the project (under --out, default /tmp/segpipe-bench-overhead/<size>) it generates the
dataset with DVC first (a nightly run finds its data in place), starts its own stack on free ports, registers the
deployments and runs `prefect deployment run full-pipeline/demo --watch` twice, as a user would:

1. the first run does all the work. Every stage records the interval of its own work (the stage function; a
   training member inside its own process, after the interpreter and torch have started). The overhead is the
   share of the run's wall time (from the CLI's `deployment run` to the final state the server recorded) during
   which no stage was working: Prefect (scheduling, worker pick-up, task and result handling), DVC, S3 transfers,
   process start-up. A training member's S3 transfers count as transfers whenever its work waits for them (its
   result store, a checkpoint push the next epoch had to wait for), as work when they run beside it. The CLI
   returns ~3 s after the final state (Prefect's watcher waits for straggler logs): also reported, as
   `cli_wall_s` and `overhead_share_to_cli_exit`.
   The ratio is taken within the one run, so a machine shared with other jobs slows both sides alike.
2. the second run, with identical data, params and code, is the "nothing changed" night: its wall time (to the
   final state; to the CLI's exit beside it).

Prints a table and writes bench.json beside the project copy; the load (`uptime`) is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import requests
import yaml

from segpipe import stack

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIZES = {
    "demo": {},
    # the competition's size and shape (segpipe.synth.SHAPES: 3,272 + 819 photos of 512 px, 7.9 objects each, the
    # three shared folders, UNKNOWN); a reduced budget so it ends on a CPU: 1 epoch per member, no pseudo-label round
    "competition": {"generate": {"shape": "competition"}, "train": {"epochs": 1}, "pseudo": {"rounds": 0}},
}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{socket.gethostname()}: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def copy_project(dst: Path) -> Path:
    """Tracked and new (not ignored) files of this checkout, as its own git repository (DVC needs one)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file() and rel != "dvc.lock":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def free_ports() -> dict[str, int]:
    import random
    while True:
        base = random.randrange(20000, 45000)
        ok = True
        for port in [*range(base, base + 11), *range(base + 10000, base + 10009)]:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return {"s3": base, "prefect": base + 9, "leaderboard": base + 10}


# what a moment outside every stage's work was spent on, by what else was running then (first match wins): "s3"
# is a stage's own S3 transfer inside its work interval (a training member's checkpoint mirror and result store)
CAUSES = ("s3", "upload", "hash", "materialise", "start", "task")


def outside_by_cause(rows: list[dict], lo: float, hi: float) -> tuple[dict[str, float], list[dict]]:
    """Split the wall time in [lo, hi] that no stage's work covers by what else ran then: a stage's own S3
    transfer (its work is suspended meanwhile), an S3 upload, hashing, a materialisation, a stage process starting
    ("start": from the request to a warm server until the forked process runs; "task": the rest of a stage task's
    interval outside its work), else "orchestration" (Prefect, DVC, the flow's own code). Returns the seconds by
    cause and the ten longest idle stretches."""
    cuts = sorted({lo, hi, *(min(max(t, lo), hi) for r in rows for t in (r["start"], r["end"]))})
    causes: dict[str, float] = {}
    stretches: list[dict] = []
    for a, b in zip(cuts, cuts[1:]):
        mid = (a + b) / 2
        live = [r for r in rows if r["start"] <= mid < r["end"]]
        in_s3 = {r["pid"] for r in live if r["kind"] == "s3"}
        if any(r["kind"] == "work" and r["pid"] not in in_s3 for r in live):
            continue
        cause = next((c for c in CAUSES if any(r["kind"] == c for r in live)), "orchestration")
        causes[cause] = causes.get(cause, 0.0) + b - a
        labels = sorted({r["label"] for r in live if r["kind"] == cause})
        if stretches and abs(stretches[-1]["end"] - (a - lo)) < 1e-6 and stretches[-1]["cause"] == cause:
            stretches[-1]["end"] = round(b - lo, 2)
            stretches[-1]["labels"] = sorted(set(stretches[-1]["labels"]) | set(labels))
        else:
            stretches.append({"start": round(a - lo, 2), "end": round(b - lo, 2), "cause": cause, "labels": labels})
    longest = sorted(stretches, key=lambda g: g["start"] - g["end"])[:10]
    return {c: round(v, 1) for c, v in causes.items()}, longest


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def one_run(project: Path, env: dict, api: str) -> dict:
    before = set(p.name for p in (project / "runs").glob("*")) if (project / "runs").exists() else set()
    t0 = time.time()
    out = run([str(BIN / "prefect"), "deployment", "run", "full-pipeline/demo", "--watch"], project, env)
    cli_end = time.time()
    if "Completed" not in out:
        raise RuntimeError(f"the run did not complete:\n{out[-3000:]}")
    (rid,) = [p.name for p in (project / "runs").glob("*") if p.name not in before]
    summary = json.loads((project / "runs" / rid / "summary.json").read_text())
    rows = [json.loads(line) for line in (project / "runs" / rid / "timings.jsonl").read_text().splitlines()]
    fr = requests.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}, timeout=30).json()[0]
    # the run's final state, as the server recorded it (same clock): the CLI's --watch returns ~3 s later, the
    # straggler-log window Prefect's FlowRunSubscriber keeps open after a terminal event; a scheduled nightly
    # run has no CLI at all
    t1 = datetime.fromisoformat(fr["end_time"].replace("Z", "+00:00")).timestamp()
    causes, longest = outside_by_cause(rows, t0, t1)
    busy = t1 - t0 - sum(causes.values())
    by_kind: dict[str, float] = {}
    for r in rows:
        by_kind[r["kind"]] = round(by_kind.get(r["kind"], 0.0) + r["end"] - r["start"], 2)
    return {"run": rid, "flow_run_name": fr["name"], "wall_s": round(t1 - t0, 1),
            "cli_wall_s": round(cli_end - t0, 1), "overhead_share_to_cli_exit": round(1 - busy / (cli_end - t0), 4),
            "flow_run_s": round(fr.get("total_run_time") or 0.0, 1), "stage_work_s": round(busy, 1),
            "overhead_s": round(t1 - t0 - busy, 1), "overhead_share": round(1 - busy / (t1 - t0), 4),
            "summed_by_kind_s": by_kind, "outside_by_cause_s": causes, "longest_outside": longest,
            "stages_reused": summary["reused"], "stages": len(summary["stages"]),
            "oof_miou": summary["oof_miou"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--out", type=Path, default=Path("/tmp/segpipe-bench-overhead"))
    a = p.parse_args()
    # a `kill` (SIGTERM) must take the benchmark's stack down too, as ^C does: the next run reuses the folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = a.out / a.size
    shutil.rmtree(root, ignore_errors=True)
    project = copy_project(root / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in SIZES[a.size].items():
        if section == "generate" and "shape" in values:   # the shape's own numbers: none of the demo's keys stay
            params[section] = {"seed": params[section].get("seed", 0), **values}
        else:
            params[section].update(values)
    ports = free_ports()
    params["submit"]["base_url"] = f"http://127.0.0.1:{ports['leaderboard']}"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = {"size": a.size, "machine": machine(), "overrides": SIZES[a.size], "load_before": uptime()}
    print(f"{a.size}: {machine()}\n{result['load_before']}", flush=True)

    t = time.time()
    run([str(BIN / "dvc"), "repro", "generate"], project, env)      # the data a nightly run finds in place
    result["generate_s"] = round(time.time() - t, 1)
    home = root / "home"
    try:
        t = time.time()
        stack.up(home, ports, cwd=project, labels=project / "data/leaderboard")
        result["stack_up_s"] = round(time.time() - t, 1)
        env.update(stack.load_env(home), SEGPIPE_HOME=str(home))
        run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], project, env)
        # the copy's nightly schedule off: a 02:00 UTC run must not land inside the measurement
        run([str(BIN / "prefect"), "--no-prompt", "deployment", "schedule", "pause", "--all"], project, env)
        api = env["PREFECT_API_URL"]
        for name in ("first", "unchanged"):
            print(f"{name} run ...", flush=True)
            result[name] = one_run(project, env, api)
            result[name]["load_after"] = uptime()
            print(json.dumps(result[name], indent=1), flush=True)
    finally:
        stack.down(home)
    (root / "bench.json").write_text(json.dumps(result, indent=2))
    f, u = result["first"], result["unchanged"]
    print(f"\n| {a.size} | wall s (to the CLI's exit) | stage work s | outside the stages (to the CLI's exit) "
          "| stages reused | load after |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| first run | {f['wall_s']} ({f['cli_wall_s']}) | {f['stage_work_s']} | {f['overhead_s']} s = "
          f"{100 * f['overhead_share']:.1f} % ({100 * f['overhead_share_to_cli_exit']:.1f} %) "
          f"| {f['stages_reused']}/{f['stages']} | {f['load_after'].split('load average:')[1].strip()} |")
    print(f"| nothing changed | {u['wall_s']} ({u['cli_wall_s']}) | {u['stage_work_s']} | {u['overhead_s']} s | "
          f"{u['stages_reused']}/{u['stages']} | {u['load_after'].split('load average:')[1].strip()} |")
    print("\nfirst run, outside the stages' work, by what else ran: "
          + ", ".join(f"{c} {v} s" for c, v in sorted(f["outside_by_cause_s"].items(), key=lambda kv: -kv[1])))
    print(f"\n{result['machine']}; load before: {result['load_before']}; written {root / 'bench.json'}")


if __name__ == "__main__":
    main()
