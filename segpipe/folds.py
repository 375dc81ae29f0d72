"""Multilabel-stratified K-fold split on per-image class presence, grouped by batch folder when that is possible.

`plan_folds` is what the split stage calls: it stratifies per image, or keeps each batch folder in one fold when
`group_by` asks for it (`batch`) or allows it (`auto`: only when there are at least n_folds folders and the grouped
folds stay balanced). The competition's data has three batch folders shared by train and test, so grouping by
folder cannot make 5 folds; a mask-PNG dataset has one folder. Both must still split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

GroupBy = Literal["auto", "batch", "none"]
# `auto` keeps a grouped split only if every fold holds n_images/n_folds images within this fraction ...
AUTO_SIZE_TOLERANCE = 0.2
# ... and at least this fraction of its share of each class's images (at least one image of every class that has
# n_folds images or more): a fold whose validation set lacks a class cannot score it, nor can its model learn it
AUTO_CLASS_FLOOR = 0.5


class SplitError(ValueError):
    """The folds cannot be made as configured; the message names the split.* key to change."""


@dataclass(frozen=True)
class FoldPlan:
    assignment: list[int]    # fold of each item, in input order
    grouped_by: str          # "batch" (a folder never straddles folds) or "image"
    reason: str              # why, for the log and folds.json


def _assign(counts: np.ndarray, sizes: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Iterative stratification (Sechidis et al., 2011) over units that may hold several images.

    counts: (G, C) images of each unit containing each class; sizes: (G,) images per unit. The class with the
    fewest images still unplaced goes first: each unit holding it joins the fold that still wants most of that
    class, ties broken by the fold that wants most images, then by the seed. Single images (G = N) get each
    class's image count per fold within about one image of its share; units go largest first.
    """
    n_units, n_classes = counts.shape
    want = np.tile(counts.sum(0) / n_folds, (n_folds, 1))      # (F, C) images each fold still wants per class
    want_size = np.full(n_folds, sizes.sum() / n_folds)
    left = counts.sum(0).astype(float)                         # (C,) images per class not yet placed
    rank = rng.permutation(n_units)                            # the seed decides ties between units ...
    fold_tie = rng.permutation(n_folds)                        # ... and between folds
    class_tie = rng.permutation(n_classes)
    fold = np.full(n_units, -1)
    while (fold < 0).any():
        live = np.flatnonzero(left > 0)
        unplaced = fold < 0
        if len(live):
            label = min(live, key=lambda c: (left[c], class_tie[c]))
            todo = np.flatnonzero(unplaced & (counts[:, label] > 0))
        else:                                                  # units with no class at all: fill by size
            label, todo = None, np.flatnonzero(unplaced)
        for g in sorted(todo, key=lambda g: (-sizes[g], rank[g])):
            need = want[:, label] if label is not None else want_size
            f = max(range(n_folds), key=lambda f: (need[f], want_size[f], fold_tie[f]))
            fold[g] = f
            want[f] -= counts[g]
            want_size[f] -= sizes[g]
            left -= counts[g]
    return fold


def _units(classes_per_item: list[tuple[int, ...]], groups: list[str], num_classes: int):
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    counts = np.zeros((len(names), num_classes))
    sizes = np.zeros(len(names))
    for cls, g in zip(classes_per_item, groups):
        counts[index[g], list(cls)] += 1
        sizes[index[g]] += 1
    return names, index, counts, sizes


def stratified_group_kfold(
    classes_per_item: list[tuple[int, ...]], groups: list[str], n_folds: int, num_classes: int, seed: int = 0
) -> list[int]:
    """Assign each item a fold so each class's image count per fold is close to its share; a group never
    straddles folds. Pass one group per item (e.g. its file name) for a plain multilabel-stratified K-fold."""
    if n_folds < 2:
        raise SplitError(f"n_folds must be >= 2, got {n_folds} (split.n_folds)")
    names, index, counts, sizes = _units(classes_per_item, groups, num_classes)
    if len(names) < n_folds:
        raise SplitError(
            f"only {len(names)} groups for {n_folds} folds: lower split.n_folds, or set split.group_by: auto "
            "(groups only when there are enough) or none (per image)")
    fold = _assign(counts, sizes, n_folds, np.random.default_rng(seed))
    return [int(fold[index[g]]) for g in groups]


def fold_class_counts(assignment: list[int], classes_per_item: list[tuple[int, ...]], n_folds: int,
                      num_classes: int) -> np.ndarray:
    """(n_folds, num_classes): images of each fold containing each class."""
    counts = np.zeros((n_folds, num_classes), dtype=int)
    for f, cls in zip(assignment, classes_per_item):
        counts[f, list(cls)] += 1
    return counts


def fold_class_shares(assignment: list[int], classes_per_item: list[tuple[int, ...]], n_folds: int, num_classes: int) -> np.ndarray:
    """(n_folds, num_classes): share of each fold's images that contain each class."""
    sizes = np.bincount(assignment, minlength=n_folds)
    return fold_class_counts(assignment, classes_per_item, n_folds, num_classes) / np.maximum(sizes[:, None], 1)


def imbalance(assignment: list[int], classes_per_item: list[tuple[int, ...]], n_folds: int,
              num_classes: int) -> str | None:
    """Why a split is too unbalanced for `auto` to keep it grouped (AUTO_SIZE_TOLERANCE, AUTO_CLASS_FLOOR);
    None when it is balanced."""
    sizes = np.bincount(assignment, minlength=n_folds)
    share = len(assignment) / n_folds
    if np.abs(sizes - share).max() > AUTO_SIZE_TOLERANCE * share:
        return f"fold sizes {sizes.tolist()} differ from {share:.0f} by more than {AUTO_SIZE_TOLERANCE:.0%}"
    counts = fold_class_counts(assignment, classes_per_item, n_folds, num_classes)
    total = counts.sum(0)
    floor = np.where(total >= n_folds, np.maximum(1, np.floor(AUTO_CLASS_FLOOR * total / n_folds)), 0)
    short = np.flatnonzero((counts < floor).any(0))
    if len(short):
        c = int(short[0])
        return (f"class {c} has {counts[:, c].tolist()} images per fold (of {int(total[c])}); each fold needs "
                f">= {int(floor[c])}")
    return None


def plan_folds(classes_per_item: list[tuple[int, ...]], batches: list[str], n_folds: int, num_classes: int,
               seed: int = 0, group_by: GroupBy = "auto") -> FoldPlan:
    """Folds for the training images: per image, or keeping each batch folder in one fold.

    `batch` groups or fails (naming what to set); `none` never groups; `auto` groups only when there are at least
    n_folds folders and the grouped folds stay balanced (`imbalance`), else splits per image and says why.
    """
    n = len(classes_per_item)
    if n < n_folds:
        raise SplitError(f"{n} training images cannot make {n_folds} folds: lower split.n_folds")
    folders = sorted(set(batches))
    if group_by == "batch":
        return FoldPlan(stratified_group_kfold(classes_per_item, batches, n_folds, num_classes, seed), "batch",
                        f"{len(folders)} batch folders, each kept in one fold")
    per_image = stratified_group_kfold(classes_per_item, [str(i) for i in range(n)], n_folds, num_classes, seed)
    if group_by == "none":
        return FoldPlan(per_image, "image", "per image as configured")
    if len(folders) < n_folds:
        return FoldPlan(per_image, "image", f"per image: {len(folders)} batch folder(s) for {n_folds} folds")
    grouped = stratified_group_kfold(classes_per_item, batches, n_folds, num_classes, seed)
    why = imbalance(grouped, classes_per_item, n_folds, num_classes)
    if why:
        return FoldPlan(per_image, "image", f"per image: grouped by {len(folders)} batch folders, {why}")
    return FoldPlan(grouped, "batch", f"{len(folders)} batch folders, each kept in one fold (balanced)")
