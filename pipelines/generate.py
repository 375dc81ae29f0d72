"""Stage `generate`: write the embedded synthetic dataset to data.root and its test labels to data.hidden_labels."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import time
from pathlib import Path

from pipelines.common import setup_logging
from segpipe.config import DEFAULT_PARAMS, DataParams, GenerateParams, load_params
from segpipe.synth import SHAPES, SynthSummary, generate, shape_settings

log = logging.getLogger(__name__)


def settings(params: GenerateParams) -> dict:
    """The generator's keyword arguments: params.shape's numbers, with the keys params.yaml gives replacing them."""
    given = {k: v for k, v in params.model_dump().items() if k not in ("shape", "seed") and v is not None}
    if params.shape != "demo" and given:   # never silent: a shape's numbers replaced by keys left in the section
        log.warning("generate.shape=%s: %s given replace the shape's %s", params.shape, given,
                    {k: SHAPES[params.shape][k] for k in given})
    return shape_settings(params.shape, **given)


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by the finished `tmp` (a rename on the same filesystem; the old copy is removed after)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def run(params: GenerateParams, data: DataParams) -> SynthSummary:
    """Generate the dataset in temp siblings, then rename them into place: a crash never leaves half a dataset."""
    if not data.hidden_labels:
        raise ValueError("data.hidden_labels is empty: the synthetic test labels need a folder for the leaderboard")
    root, hidden = Path(data.root), Path(data.hidden_labels)
    tmp_root, tmp_hidden = root.with_name(f".{root.name}.tmp"), hidden.with_name(f".{hidden.name}.tmp")
    for p in (tmp_root, tmp_hidden):
        shutil.rmtree(p, ignore_errors=True)
        p.parent.mkdir(parents=True, exist_ok=True)
    try:
        summary = generate(tmp_root, tmp_hidden, seed=params.seed, classes=data.classes, **settings(params))
        _swap_in(tmp_root, root)
        _swap_in(tmp_hidden, hidden)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        shutil.rmtree(tmp_hidden, ignore_errors=True)
    return dataclasses.replace(summary, out_dir=root, hidden_dir=hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    args = parser.parse_args()
    setup_logging()
    t0 = time.perf_counter()
    params = load_params("generate", GenerateParams, args.params)
    s = run(params, load_params("data", DataParams, args.params))
    print(f"generate ({params.shape}): {s.n_train} train_all ({s.n_train - s.n_val} train / {s.n_val} val) + "
          f"{s.n_test} test photos of {s.image_size} px in {', '.join(s.folders)}, {s.n_annotations} annotations "
          f"({s.n_annotations / max(s.n_train, 1):.2f} per photo) -> {s.out_dir}, test labels -> {s.hidden_dir} "
          f"in {time.perf_counter() - t0:.1f}s")
    print("  annotations per class: " + ", ".join(f"{k} {v}" for k, v in s.annotations_per_class.items()))


if __name__ == "__main__":
    main()
