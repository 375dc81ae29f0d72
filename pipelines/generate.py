"""Stage `generate`: write the embedded synthetic dataset to data.root and its test labels to data.hidden_labels."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from segpipe.config import DEFAULT_PARAMS, DataParams, GenerateParams, load_params
from segpipe.synth import SynthSummary, generate


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
        summary = generate(tmp_root, tmp_hidden, n_train=params.n_train, n_test=params.n_test,
                           image_size=params.image_size, n_batches=params.n_batches,
                           val_fraction=params.val_fraction, seed=params.seed, classes=data.classes,
                           objects_per_image=params.objects_per_image)
        _swap_in(tmp_root, root)
        _swap_in(tmp_hidden, hidden)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        shutil.rmtree(tmp_hidden, ignore_errors=True)
    return SynthSummary(root, hidden, summary.n_train, summary.n_val, summary.n_test, summary.n_annotations,
                        summary.annotations_per_class)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    args = parser.parse_args()
    t0 = time.perf_counter()
    s = run(load_params("generate", GenerateParams, args.params), load_params("data", DataParams, args.params))
    print(f"generate: {s.n_train} train ({s.n_val} val) + {s.n_test} test images, {s.n_annotations} annotations "
          f"-> {s.out_dir}, test labels -> {s.hidden_dir} in {time.perf_counter() - t0:.1f}s")
    print("  annotations per class: " + ", ".join(f"{k} {v}" for k, v in s.annotations_per_class.items()))


if __name__ == "__main__":
    main()
