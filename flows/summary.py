"""Print the newest run's summary: what a person wants to read after `make demo`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    runs = sorted(Path("runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        print("no finished run under runs/: start one with `make demo`", file=sys.stderr)
        return 1
    s = json.loads(runs[-1].read_text())
    ui = os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api").removesuffix("/api")
    width = max(len(k) for k in s) + 2
    print("\n== segpipe run summary " + "=" * 40)
    for k, v in s.items():
        print(f"{k:<{width}}{v:.4f}" if isinstance(v, float) else f"{k:<{width}}{v}")
    print(f"{'prefect ui':<{width}}{ui}/runs")
    if s.get("public_miou") is not None:
        print(f"\nPUBLIC LEADERBOARD mIoU: {s['public_miou']:.4f}  (local OOF mIoU {s['oof_miou']:.4f})")
    elif s.get("submit_status") == "submitted" and s.get("submit_score"):
        print(f"\nSUBMITTED: {s['submit_score']}  (local OOF mIoU {s['oof_miou']:.4f})")
    elif s.get("submit_reason"):
        print(f"\nNOT SUBMITTED: {s['submit_reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
