"""What the stages that run in a process of their own return (validate, infer, the audit, pseudo-labels).

Defined here, with no heavy imports, because the result is pickled back to the flow's process: unpickling a class
imports its module, and `pipelines.infer` imports torch (4.6 s on a 2-core machine, spent on the critical path
after the first inference, when the flow unpickled its InferResult). The stage modules re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ValidateResult:
    out_dir: Path
    n_train: int
    n_test: int
    n_annotations: int
    metrics: dict
    class_weights: dict
    warnings: list[str]
    seconds: dict[str, float]       # validate (its parts as validate/<phase>), rasterise, eda
    class_stats: list[dict]         # per class: pixel share, annotations, images, size buckets, loss weight
    split_counts: dict[str, int]    # images per split file
    gx_summary: list[dict]          # per expectation: suite, code, rows checked, failures


@dataclass(frozen=True)
class InferResult:
    oof_miou: float
    member_oof_miou: dict[str, float]
    n_test: int
    weights: dict[str, float]
    out_dir: Path


@dataclass(frozen=True)
class AuditResult:
    rows: list[dict]            # every OOF image, worst first: file_name, miou, rank, pixel_accuracy, ...
    affected: list[str]         # the images the next round drops or relabels
    action: str
    out_dir: Path


@dataclass(frozen=True)
class PseudoResult:
    n_kept: int
    n_test: int
    out_dir: Path
