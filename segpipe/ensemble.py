"""Ensembles: members (folds x seeds x kept epochs x models), soft or hard voting, weights searched on OOF mIoU.

Weights are per model (the `train.models` key, a member's *group*): a model's members (its folds, seeds and kept
epochs) are averaged first, then the models are weighted. On the out-of-fold set an image is predicted only by
the members of its fold, so each group's value for an image is the mean over the members that hold it; on the
test set every member holds every image. Both voting kinds decompose that way:

    soft:  sum_g w_g * mean_{m in g} p_m                     / sum_g w_g
    hard:  sum_g w_g * mean_{m in g} onehot(argmax p_m)      / sum_g w_g   (ties broken by the soft vote)
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segpipe.metrics import MIoU, confusion_matrix, miou
from segpipe.models import build_from_spec

MEMBER_DIR = re.compile(r"^(?P<model>.+)-s(?P<seed>\d+)-f(?P<fold>\d+)$")   # pipelines.train.task_key
TIE_BREAK = 1e-4     # share of the soft vote added to hard votes: decides ties, never outvotes a member


@dataclass(frozen=True)
class Member:
    name: str
    checkpoint: Path
    model: str = ""                 # the weight group: the train.models key
    seed: int = 0
    fold: int = -1
    epoch: str = "best"             # best: best.pt; eNNN: a kept top-k epoch

    @property
    def group(self) -> str:
        return self.model or self.name


def find_members(root: Path, top_k: bool = False) -> list[Member]:
    """Every `<model>-s<seed>-f<fold>/best.pt` under root; with `top_k`, also each one's kept epochs
    (`top_k/top-eNNN.pt`) except the epoch best.pt already holds."""
    root = Path(root)
    members = []
    dirs = sorted(p for p in root.iterdir() if (p / "best.pt").is_file()) if root.is_dir() else []
    for d in dirs:
        m = MEMBER_DIR.match(d.name)
        model, seed, fold = (m["model"], int(m["seed"]), int(m["fold"])) if m else (d.name, 0, -1)
        members.append(Member(d.name, d / "best.pt", model, seed, fold))
        if not top_k:
            continue
        metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
        for ckpt in sorted((d / "top_k").glob("top-e*.pt")):
            epoch = int(ckpt.stem.rsplit("-e", 1)[1])
            if epoch - 1 == metrics.get("best_epoch"):     # the same weights as best.pt: counting them twice
                continue                                   # would double that epoch's vote
            members.append(Member(f"{d.name}@e{epoch:03d}", ckpt, model, seed, fold, f"e{epoch:03d}"))
    if not members:
        raise FileNotFoundError(f"no trained members (*/best.pt) under {root}: run the train stage first")
    return members


def load_member(ckpt: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from the resolved config stored inside its checkpoint (its ModelSpec dump: architecture,
    encoder, heads, constructor kwargs; the weights come from the checkpoint, so no encoder weights are loaded)."""
    state = torch.load(ckpt, map_location=device, weights_only=False)
    cfg = state["config"]
    model = build_from_spec(cfg["model"], cfg["num_classes"], pretrained=False)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resize_probs(probs: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    """Bilinear-resize probabilities (N, C, h, w) -> (N, C, size, size); members of any input size combine."""
    if probs.shape[-1] == size and probs.shape[-2] == size:
        return probs if isinstance(probs, np.ndarray) else probs.half().numpy()
    return _resize_t(_as_tensor(probs), size).half().numpy()


def _as_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    # float16 arithmetic in numpy is slow: convert through torch
    return a.float() if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a)).float()


def _resize_t(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.shape[-1] == size and t.shape[-2] == size:
        return t
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)


def one_hot_votes(probs: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) probabilities -> (N, C, H, W) float one-hot of the argmax: one member's hard vote."""
    return F.one_hot(probs.argmax(1), probs.shape[1]).permute(0, 3, 1, 2).float()


def weighted_vote(soft: Sequence[torch.Tensor], weights: Sequence[float],
                  votes: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-group arrays (N, C, H, W) -> the ensemble (N, C, H, W): the weighted mean of `soft`, or with `votes`
    (per-group vote shares) the weighted vote shares, ties broken by the soft vote. Rows still sum to 1."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"ensemble weights {list(weights)} are all zero: at least one model needs a weight > 0")
    s = sum(w * _as_tensor(a) for w, a in zip(weights, soft) if w) / total
    if votes is None:
        return s
    v = sum(w * _as_tensor(a) for w, a in zip(weights, votes) if w) / total
    return (v + TIE_BREAK * s) / (1 + TIE_BREAK)


class GroupStore:
    """Per group, the running sum of its members' probabilities (and hard votes) on each image, at one size.

    Arrays are memory-mapped files under `work_dir`, so a competition-sized OOF set (3,300 images x 11 classes)
    never has to fit in memory; `mean(group, rows)` reads only the rows asked for.
    """

    def __init__(self, groups: Sequence[str], names: Sequence[str], num_classes: int, size: int, work_dir: Path,
                 hard: bool = False):
        self.groups, self.names, self.size, self.hard = list(groups), list(names), size, hard
        self.row = {n: i for i, n in enumerate(self.names)}
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        shape = (len(self.names), num_classes, size, size)
        self.soft = {g: self._array(f"{i}.soft.npy", shape) for i, g in enumerate(self.groups)}
        self.votes = {g: self._array(f"{i}.votes.npy", shape) for i, g in enumerate(self.groups)} if hard else {}
        self.count = {g: np.zeros(len(self.names), np.int64) for g in self.groups}

    def _array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.lib.format.open_memmap(self.work_dir / name, mode="w+", dtype=np.float32, shape=shape)  # zeros

    def add(self, group: str, names: Sequence[str], probs: np.ndarray, chunk: int = 32) -> None:
        """Add one member's probabilities (n, C, h, w) for `names` (any size; resized to the store's)."""
        rows = np.array([self.row[n] for n in names])
        for start in range(0, len(rows), chunk):
            r = rows[start:start + chunk]
            p = _resize_t(_as_tensor(probs[start:start + chunk]), self.size)
            self.soft[group][r] += p.numpy()
            if self.hard:
                self.votes[group][r] += one_hot_votes(p).numpy()
            self.count[group][r] += 1

    def check_complete(self, groups: Sequence[str]) -> None:
        for g in groups:
            missing = [self.names[i] for i in np.flatnonzero(self.count[g] == 0)]
            if missing:
                raise ValueError(f"model {g!r} has no prediction for {len(missing)} image(s) (e.g. {missing[0]}): "
                                 "every model must be trained on the same folds (train.folds)")

    def mean(self, group: str, rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = torch.from_numpy(self.count[group][rows].astype(np.float32)).clamp_min(1).view(-1, 1, 1, 1)
        soft = torch.from_numpy(np.asarray(self.soft[group][rows])) / n
        return soft, (torch.from_numpy(np.asarray(self.votes[group][rows])) / n if self.hard else None)

    def ensemble(self, weights: dict[str, float], rows: slice, out_size: int | None = None) -> torch.Tensor:
        """The weighted vote (n, C, out_size, out_size) float32 for the images in `rows`."""
        used = [g for g in self.groups if weights.get(g, 0) > 0]
        parts = [self.mean(g, rows) for g in used]
        p = weighted_vote([s for s, _ in parts], [weights[g] for g in used],
                          [v for _, v in parts] if self.hard else None)
        return _resize_t(p, out_size) if out_size else p

    def close(self) -> None:
        self.soft, self.votes = {}, {}
        shutil.rmtree(self.work_dir, ignore_errors=True)


def confusion_of(probs_fn: Callable[[slice], torch.Tensor], masks: np.ndarray, num_classes: int, ignore_index: int,
                 chunk: int = 16) -> np.ndarray:
    """One confusion matrix over the whole set: argmax of `probs_fn(rows)` against masks (N, H, W) chunk by chunk."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for start in range(0, len(masks), chunk):
        rows = slice(start, start + chunk)
        cm += confusion_matrix(masks[rows], probs_fn(rows).argmax(1).numpy(), num_classes, ignore_index)
    return cm


def score_probs(probs: np.ndarray, masks: np.ndarray, num_classes: int, ignore_index: int) -> MIoU:
    """mIoU of probabilities (N, C, h, w) against masks (N, S, S), the probabilities resized to S first."""
    metric = MIoU(num_classes, ignore_index)
    metric.cm += confusion_of(lambda r: _resize_t(_as_tensor(probs[r]), masks.shape[-1]), masks, num_classes,
                              ignore_index)
    return metric


def score(probs: np.ndarray, masks: np.ndarray, num_classes: int, ignore_index: int) -> MIoU:
    metric = MIoU(num_classes, ignore_index)
    metric.update(masks, probs.argmax(1))
    return metric


@dataclass
class WeightSearch:
    weights: dict[str, float]
    miou: float
    uniform_miou: float
    evaluations: list[dict]          # every weighting tried, with its OOF mIoU, in order


def search_weights(score_fn: Callable[[dict[str, float]], float], groups: Sequence[str],
                   grid: Sequence[float], max_sweeps: int = 3) -> WeightSearch:
    """Coordinate ascent over per-group weights on the OOF mIoU, from equal weights.

    Each sweep tries every grid value for one group at a time, keeping the others, and moves only on a strict
    improvement, so the result is never worse on OOF than equal weights. Only OOF scores are ever looked at.
    """
    w = {g: 1.0 for g in groups}
    cache: dict[tuple, float] = {}
    trace: list[dict] = []

    def evaluate(cand: dict[str, float]) -> float:
        total = sum(cand.values())
        key = tuple(round(cand[g] / total, 6) for g in groups)      # (1, .5) and (2, 1) are one weighting
        if key not in cache:
            cache[key] = score_fn(cand)
            trace.append({"weights": dict(cand), "oof_miou": cache[key]})
        return cache[key]

    best = uniform = evaluate(w)
    if len(groups) < 2:
        return WeightSearch(w, best, uniform, trace)
    for _ in range(max_sweeps):
        moved = False
        for g in groups:
            for v in grid:
                cand = {**w, g: float(v)}
                if v == w[g] or sum(cand.values()) <= 0:
                    continue
                s = evaluate(cand)
                if s > best + 1e-9:
                    best, w, moved = s, cand, True
        if not moved:
            break
    return WeightSearch(w, best, uniform, trace)


def oof_miou_fn(store: GroupStore, masks: np.ndarray, num_classes: int, ignore_index: int
                ) -> Callable[[dict[str, float]], float]:
    """weights -> the OOF mIoU of that weighting (one confusion matrix over every OOF image)."""
    def fn(weights: dict[str, float]) -> float:
        return miou(confusion_of(lambda r: store.ensemble(weights, r, masks.shape[-1]), masks, num_classes,
                                 ignore_index))
    return fn
