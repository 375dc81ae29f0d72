"""Build a throwaway copy of the project with the real params.yaml shrunk to seconds-sized work."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def copy_project(dst: Path) -> Path:
    """Copy every tracked (and new, not ignored) file into `dst` and make it its own git repo, as a clone would be."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("dvc.lock",)):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def shrink_params(path: Path, **overrides: dict) -> dict:
    """The real params.yaml, shrunk: 24 tiny images, one model, two folds, one epoch at 32 px."""
    p = yaml.safe_load(path.read_text())
    p["generate"].update(n_train=24, n_test=8, image_size=64, n_batches=4)
    p["validate"].update(max_empty_images=24, sample_grid=4)
    p["split"].update(n_folds=2)
    p["train"].update(models={"fpn_mbv2": p["train"]["models"]["fpn_mbv2"]}, seeds=[0], folds=[0, 1], epochs=1,
                      batch_size=4, input_size=32, threads=1)
    p["retrain"].update(epochs=1)
    p["pseudo"].update(threshold=0.3, min_confident_fraction=0.0)
    p["infer"].update(batch_size=8)
    p["submit"].update(wait_seconds=60, poll_seconds=0.5)
    for section, values in overrides.items():
        p[section].update(values)
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return p
