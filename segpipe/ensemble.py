"""Ensembles: members (folds x seeds x kept epochs x models), soft or hard voting, weights searched on OOF mIoU.

Weights are per model (the `train.models` key, a member's *group*): a model's members (its folds, seeds and kept
epochs) are averaged first, then the models are weighted. On the out-of-fold set an image is predicted only by
the members of its fold, so each group's value for an image is the mean over the members that hold it; on the
test set every member holds every image. Both voting kinds decompose that way:

    soft:  sum_g w_g * mean_{m in g} p_m                     / sum_g w_g
    hard:  sum_g w_g * mean_{m in g} onehot(argmax p_m)      / sum_g w_g   (ties broken by the soft vote)

The members' probabilities are read from the files they are stored in (segpipe.probstore: uint8 at
min(input size, 256)), a chunk of images at a time, and resized to the largest member's stored size before
voting; nothing holds the whole set (see StoredEnsemble).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segpipe.metrics import MIoU, confusion_matrix, miou
from segpipe.models import build_from_spec
from segpipe.probstore import Rows, dequantise

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
    # best.pt and top-k files hold tensors and plain data only, so weights_only=True loads them, and unpickles
    # nothing else (engine.load_checkpoint also allows last.pt's numpy RNG state; importing it here would add
    # engine and its imports to the code deps of every stage that reads members)
    try:
        state = torch.load(ckpt, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load member checkpoint {ckpt}: it holds more than tensors and plain data, so "
                         "segpipe's train stage did not write it; retrain that member (torch.serialization."
                         "get_unsafe_globals_in_checkpoint lists what it holds)") from e
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


@dataclass(frozen=True)
class StoredMember:
    """One member's stored probabilities: rows of `path` (a .npy, or `key` inside an .npz) are `names`' images."""

    group: str                      # the weight group: the train.models key
    names: list[str]
    path: Path
    key: str | None = None


class StoredEnsemble:
    """The groups' (models') votes on a set of images, read chunk by chunk from the members' stored files.

    Nothing is accumulated over the whole set: `means(rows)` reads only those rows of every member that holds them
    (segpipe.probstore.Rows: plain reads), resizes them to `size` and averages them per group, so memory is
    bounded by chunk x groups x C x size^2 whatever the number of images or members. `confusions` scores any
    number of weightings in one pass over the files, which is what makes the weight search affordable.
    """

    def __init__(self, members: Sequence[StoredMember], names: Sequence[str], num_classes: int, size: int,
                 hard: bool = False, chunk: int = 16):
        self.names, self.size, self.hard, self.chunk, self.num_classes = list(names), size, hard, chunk, num_classes
        row = {n: i for i, n in enumerate(self.names)}
        self.groups = sorted({m.group for m in members})
        self.members: list[tuple[StoredMember, Rows, np.ndarray]] = []
        self.count = {g: np.zeros(len(self.names), np.int64) for g in self.groups}
        for m in members:
            rows = Rows(m.path, m.key)
            if len(rows) != len(m.names) or rows.shape[1] != num_classes:
                raise ValueError(f"{m.path} holds {rows.shape} probabilities, expected ({len(m.names)}, "
                                 f"{num_classes}, ...): written by another run? Run the stage that wrote it again")
            local = np.full(len(self.names), -1, np.int64)      # global row -> the member's row (-1: not held)
            held = [(row[n], i) for i, n in enumerate(m.names) if n in row]
            if held:
                g_rows, m_rows = map(np.array, zip(*held))
                local[g_rows] = m_rows
            self.members.append((m, rows, local))
            self.count[m.group] += local >= 0

    def __len__(self) -> int:
        return len(self.names)

    def check_complete(self, groups: Sequence[str]) -> None:
        for g in groups:
            missing = [self.names[i] for i in np.flatnonzero(self.count.get(g, np.zeros(len(self), np.int64)) == 0)]
            if missing:
                raise ValueError(f"model {g!r} has no prediction for {len(missing)} image(s) (e.g. {missing[0]}): "
                                 "every model must be trained on the same folds (train.folds)")

    def means(self, rows: slice, groups: Sequence[str] | None = None
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per group, its members' mean probabilities (n, C, size, size) float32 on the images in `rows` (and
        their mean one-hot votes with `hard`)."""
        idx = np.arange(len(self.names))[rows]
        shape = (len(idx), self.num_classes, self.size, self.size)
        wanted = self.groups if groups is None else list(groups)
        soft = {g: torch.zeros(shape) for g in wanted}
        votes = {g: torch.zeros(shape) for g in wanted} if self.hard else {}
        for m, stored, local in self.members:
            if m.group not in soft:
                continue
            sel = local[idx]
            have = np.flatnonzero(sel >= 0)
            if not len(have):
                continue
            p = _resize_t(torch.from_numpy(dequantise(stored.read(sel[have]))), self.size)
            at = torch.from_numpy(have)
            soft[m.group].index_add_(0, at, p)
            if self.hard:
                votes[m.group].index_add_(0, at, one_hot_votes(p))
        out = {}
        for g in wanted:
            n = torch.from_numpy(self.count[g][idx].astype(np.float32)).clamp_min(1).view(-1, 1, 1, 1)
            out[g] = (soft[g] / n, votes[g] / n if self.hard else None)
        return out

    def vote(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]], weights: dict[str, float],
             out_size: int | None = None) -> torch.Tensor:
        """The weighted vote (n, C, out_size, out_size) float32 of `means()`' output."""
        used = [g for g in self.groups if weights.get(g, 0) > 0]
        p = weighted_vote([parts[g][0] for g in used], [weights[g] for g in used],
                          [parts[g][1] for g in used] if self.hard else None)
        return _resize_t(p, out_size) if out_size else p

    def ensemble(self, weights: dict[str, float], rows: slice, out_size: int | None = None) -> torch.Tensor:
        """The weighted vote (n, C, out_size, out_size) float32 for the images in `rows`."""
        used = [g for g in self.groups if weights.get(g, 0) > 0]
        return self.vote(self.means(rows, used), weights, out_size)

    def vote_counts(self, rows: slice | np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Per image in `rows` and class, how many members' argmax is that class, (n, C, size, size) int32, and how
        many members hold each image (n,): what `disagreement` reads."""
        idx = np.arange(len(self.names))[rows]
        counts = torch.zeros((len(idx), self.num_classes, self.size, self.size), dtype=torch.int32)
        held = np.zeros(len(idx), np.int64)
        for _, stored, local in self.members:
            sel = local[idx]
            have = np.flatnonzero(sel >= 0)
            if not len(have):
                continue
            p = _resize_t(torch.from_numpy(dequantise(stored.read(sel[have]))), self.size)
            counts.index_add_(0, torch.from_numpy(have), one_hot_votes(p).to(torch.int32))
            held[have] += 1
        return counts, held

    def chunks(self) -> Iterator[slice]:
        return (slice(s, s + self.chunk) for s in range(0, len(self.names), self.chunk))

    def confusions(self, weightings: Sequence[dict[str, float]], masks: np.ndarray, ignore_index: int
                   ) -> list[np.ndarray]:
        """One confusion matrix over the whole set per weighting: the argmax of its vote, resized to the masks'
        size (N, S, S), against the masks; every chunk of the files is read once for all of them."""
        return [cm[0] for cm in self.fold_confusions(weightings, masks, ignore_index)]

    def fold_confusions(self, weightings: Sequence[dict[str, float]], masks: np.ndarray, ignore_index: int,
                        fold_of_row: np.ndarray | None = None, n_folds: int = 1) -> list[np.ndarray]:
        """`confusions` split by fold: per weighting an (n_folds, C, C) array, row i counted in fold
        fold_of_row[i] (None: every row in fold 0); one pass over the files for all of them."""
        c = self.num_classes
        cms = [np.zeros((n_folds, c, c), np.int64) for _ in weightings]
        used = [g for g in self.groups if any(w.get(g, 0) > 0 for w in weightings)]
        for rows in self.chunks():
            parts = self.means(rows, used)
            truth = masks[rows]
            folds = None if fold_of_row is None else fold_of_row[rows]
            for cm, w in zip(cms, weightings):
                pred = self.vote(parts, w, masks.shape[-1]).argmax(1).numpy()
                if folds is None:
                    cm[0] += confusion_matrix(truth, pred, c, ignore_index)
                    continue
                for f in np.unique(folds):
                    at = folds == f
                    cm[f] += confusion_matrix(truth[at], pred[at], c, ignore_index)
        return cms


def disagreement(counts: torch.Tensor, held: np.ndarray) -> torch.Tensor:
    """Per pixel, the share of member pairs whose argmaxes differ, (n, H, W) in [0, 1], from vote counts (n, C, H, W)
    over `held` (n,) members: 1 - sum_c k_c (k_c - 1) / (K (K - 1)). An image held by fewer than two members has no
    pair: 0."""
    k = torch.from_numpy(np.asarray(held, np.float64)).float().view(-1, 1, 1)
    c = counts.float()
    agree = (c * (c - 1)).sum(1) / (k * (k - 1)).clamp_min(1)
    return torch.where(k >= 2, 1 - agree, torch.zeros_like(agree)).clamp_(0, 1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per pixel entropy of probabilities (n, C, H, W) -> (n, H, W), in units of log(C) (0: certain, 1: uniform)."""
    p = probs.clamp_min(1e-12)
    return -(p * p.log()).sum(1) / float(np.log(max(probs.shape[1], 2)))


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


def weighting_key(w: dict[str, float], groups: Sequence[str]) -> tuple:
    """A weighting normalised to sum 1: (1, .5) and (2, 1) are one weighting, scored once."""
    total = sum(w.values())
    return tuple(round(w[g] / total, 6) for g in groups)


def search_weights(score_many: Callable[[list[dict[str, float]]], list[float]], groups: Sequence[str],
                   grid: Sequence[float], max_sweeps: int = 3) -> WeightSearch:
    """Coordinate ascent over per-group weights on the OOF mIoU, from equal weights.

    Each sweep tries every grid value for one group at a time, keeping the others, and moves only on a strict
    improvement, so the result is never worse on OOF than equal weights. Only OOF scores are ever looked at.
    `score_many` scores a list of weightings at once: one group's grid values do not depend on each other's
    scores, so they are asked for together (one pass over the stored probabilities) and then taken in grid order,
    which moves exactly as trying them one by one would.
    """
    w = {g: 1.0 for g in groups}
    cache: dict[tuple, float] = {}
    trace: list[dict] = []

    def evaluate(cands: list[dict[str, float]]) -> list[float]:
        keys = [weighting_key(c, groups) for c in cands]
        new: dict[tuple, dict[str, float]] = {}
        for k, c in zip(keys, cands):
            if k not in cache:
                new.setdefault(k, c)
        for (k, c), s in zip(new.items(), score_many(list(new.values())) if new else []):
            cache[k] = s
            trace.append({"weights": dict(c), "oof_miou": s})
        return [cache[k] for k in keys]

    best = uniform = evaluate([w])[0]
    if len(groups) < 2:
        return WeightSearch(w, best, uniform, trace)
    for _ in range(max_sweeps):
        moved = False
        for g in groups:
            cands = [c for v in grid if v != w[g] and sum((c := {**w, g: float(v)}).values()) > 0]
            for cand, s in zip(cands, evaluate(cands)):
                if s > best + 1e-9:
                    best, w, moved = s, cand, True
        if not moved:
            break
    return WeightSearch(w, best, uniform, trace)


def oof_miou_fn(ens: StoredEnsemble, masks: np.ndarray, ignore_index: int
                ) -> Callable[[list[dict[str, float]]], list[float]]:
    """weightings -> the OOF mIoU of each (one confusion matrix over every OOF image), all from one pass."""
    def fn(weightings: list[dict[str, float]]) -> list[float]:
        return [miou(cm) for cm in ens.confusions(weightings, masks, ignore_index)]
    return fn


@dataclass
class NestedSearch:
    """The weight search's honest figure: for each fold k, weights searched on the other folds' OOF images only and
    scored on fold k's; one confusion matrix over every fold. The selected figure saw its own choice; this one
    did not."""
    miou: float
    weights: list[dict[str, float]]      # per held-out fold, the weights chosen without it
    cm: np.ndarray


def nested_search(fold_cms: Callable[[list[dict[str, float]]], list[np.ndarray]], groups: Sequence[str],
                  grid: Sequence[float], n_folds: int) -> NestedSearch:
    """Run search_weights once per held-out fold on the other folds' summed confusions. `fold_cms(weightings)`
    gives each weighting's (n_folds, C, C) confusions (StoredEnsemble.fold_confusions); every weighting is
    scored once for all the searches, which mostly try the same ones."""
    cache: dict[tuple, np.ndarray] = {}

    def cms(weightings: list[dict[str, float]]) -> list[np.ndarray]:
        keys = [weighting_key(w, groups) for w in weightings]
        new = {k: w for k, w in zip(keys, weightings) if k not in cache}
        for k, cm in zip(new, fold_cms(list(new.values())) if new else []):
            cache[k] = cm
        return [cache[k] for k in keys]

    chosen, total = [], None
    for k in range(n_folds):
        def score_without_k(weightings: list[dict[str, float]], k=k) -> list[float]:
            return [miou(cm.sum(0) - cm[k]) for cm in cms(weightings)]
        w = search_weights(score_without_k, groups, grid).weights
        chosen.append(w)
        held = cms([w])[0][k]
        total = held.copy() if total is None else total + held
    return NestedSearch(miou(total), chosen, total)
