"""Experiment profiles (`quick` to explore, `full` to confirm) and the class-balanced image subset a light one uses.

A profile is a named set of key overrides in `params.yaml`:

```yaml
profile: full                # the active one: `dvc exp run -S profile=quick`, or the flow's `profile` parameter
profiles:
  quick: {split: {subset: 64}, train: {folds: [0], epochs: 3}}
  full: {}
```

A profile replaces whole keys of a section (`train.folds`, `train.models`), never merges inside them: a quick
profile that names one model means one model, not that model added to the others.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np

PROFILE_KEY = "profile"
PROFILES_KEY = "profiles"


class ProfileError(ValueError):
    """The active profile is not defined, or a profile overrides something that does not exist."""


def apply_profile(raw: dict, profile: str | None = None, source: str = "params.yaml") -> dict:
    """The params with the active profile's overrides applied (a copy; `raw` is untouched).

    `profile` (if given) wins over `raw["profile"]`. A params file without `profiles` is returned as it is.
    """
    profiles = raw.get(PROFILES_KEY)
    name = profile or raw.get(PROFILE_KEY)
    if profiles is None:
        if profile:
            raise ProfileError(f"{source}: profile `{profile}` asked for, but there is no `profiles:` section")
        return raw
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) or v is None for v in profiles.values()):
        raise ProfileError(f"{source}: `profiles` must map a profile name to {{section: {{key: value}}}}")
    if name not in profiles:
        raise ProfileError(f"{source}: Wrong profile `{name}`, profiles defined in `profiles`: {sorted(profiles)}")
    out = copy.deepcopy(raw)
    out[PROFILE_KEY] = name
    for section, keys in (profiles[name] or {}).items():
        if section in (PROFILE_KEY, PROFILES_KEY) or not isinstance(out.get(section), dict):
            raise ProfileError(f"{source}: profiles.{name}.{section}: no such section to override")
        if not isinstance(keys, dict):
            raise ProfileError(f"{source}: profiles.{name}.{section} must be a mapping of keys to values")
        out[section].update(copy.deepcopy(keys))
    return out


def check_dvc_matrix(raw: dict, source: str = "params.yaml") -> None:
    """DVC expands its train matrix from `train.models/seeds/folds` as written, before any profile applies: every
    profile may only narrow them (names, seeds, folds the base lists), or DVC would never run its members."""
    base = raw.get("train", {})
    for name, keys in (raw.get(PROFILES_KEY) or {}).items():
        train = (keys or {}).get("train", {})
        for key in ("models", "seeds", "folds"):
            extra = sorted(set(train.get(key, ())) - set(base.get(key, ())), key=str)
            if extra:
                raise ProfileError(f"{source}: profiles.{name}.train.{key} has {extra}, not in train.{key} "
                                   f"{sorted(base.get(key, ()), key=str)}: dvc.yaml's train matrix is expanded "
                                   "from train.* as written, so a profile can only pick among those")


def balanced_subset(present: Sequence[Sequence[int]], n: int, seed: int = 0) -> list[int]:
    """Indices of `n` images chosen greedily by rare-class coverage.

    present[i]: the class ids in image i (background, id 0, is ignored). Each pick takes the image whose classes
    are least covered so far, rare classes counting most: gain(i) = sum over its classes c of
    1 / (n_c * (1 + picked_c)), n_c = images with c in the whole set, picked_c = picked images with c.
    Ties go to a seeded shuffle, so the subset is deterministic for a seed. n >= len(present): every image.
    """
    total = len(present)
    if n <= 0 or n >= total:
        return list(range(total))
    n_cls = 1 + max((max(p) for p in present if len(p)), default=0)
    has = np.zeros((total, n_cls), bool)
    for i, p in enumerate(present):
        has[i, [c for c in p if c != 0]] = True
    rarity = 1.0 / np.maximum(has.sum(0), 1)
    order = np.random.default_rng(seed).permutation(total)    # tie-break: seeded, not file order
    picked = np.zeros(n_cls)
    free = np.ones(total, bool)
    chosen: list[int] = []
    for _ in range(n):
        gain = (has[order] * (rarity / (1.0 + picked))).sum(1)
        gain[~free[order]] = -1.0
        best = int(order[int(np.argmax(gain))])                # argmax takes the first: the shuffled order
        chosen.append(best)
        free[best] = False
        picked += has[best]
    return sorted(chosen)


def class_coverage(present: Sequence[Sequence[int]], indices: Sequence[int], n_classes: int) -> list[int]:
    """Images containing each class among `indices` (per class id 0..n_classes-1)."""
    counts = [0] * n_classes
    for i in indices:
        for c in set(present[i]):
            if 0 <= c < n_classes:
                counts[c] += 1
    return counts
