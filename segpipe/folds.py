"""Multilabel-stratified, optionally grouped K-fold split, deterministic from a seed."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def stratified_group_kfold(
    classes_per_item: list[tuple[int, ...]], groups: list[str], n_folds: int, num_classes: int, seed: int = 0
) -> list[int]:
    """Assign each item a fold so per-fold class presence matches the whole set; a group never straddles folds.

    Greedy: groups are placed rarest-class-first into the fold whose class counts fall furthest
    behind their target share, which is what iterative stratification does for single items.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise ValueError(
            f"only {n_groups} groups for {n_folds} folds: lower split.n_folds or set split.group_by: none"
        )
    rng = np.random.default_rng(seed)
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    names = sorted(members)
    rng.shuffle(names)                                     # seed decides ties
    counts = {g: np.zeros(num_classes) for g in names}
    for g in names:
        for i in members[g]:
            counts[g][list(classes_per_item[i])] += 1
    total = sum(counts.values())
    rarity = np.where(total > 0, 1.0 / np.maximum(total, 1), 0)
    names.sort(key=lambda g: (-(counts[g] * rarity).max(), -len(members[g])))
    target = total / n_folds
    target_size = len(groups) / n_folds
    fold_counts = np.zeros((n_folds, num_classes))
    fold_sizes = np.zeros(n_folds)
    assignment = [0] * len(groups)
    for g in names:
        # deficit of each fold on this group's classes, plus a size term so folds stay balanced
        present = counts[g] > 0
        deficit = ((target - fold_counts) * present / np.maximum(target, 1)).sum(1)
        deficit += (target_size - fold_sizes) / max(target_size, 1)
        f = int(np.argmax(deficit))
        fold_counts[f] += counts[g]
        fold_sizes[f] += len(members[g])
        for i in members[g]:
            assignment[i] = f
    return assignment


def fold_class_shares(assignment: list[int], classes_per_item: list[tuple[int, ...]], n_folds: int, num_classes: int) -> np.ndarray:
    """(n_folds, num_classes): share of each fold's images that contain each class."""
    shares = np.zeros((n_folds, num_classes))
    sizes = np.zeros(n_folds)
    for f, cls in zip(assignment, classes_per_item):
        sizes[f] += 1
        shares[f, list(cls)] += 1
    return shares / np.maximum(sizes[:, None], 1)
