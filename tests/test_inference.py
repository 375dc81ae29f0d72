"""TTA inverses, multi-scale, sliding windows, voting, OOF weight search, pseudo-label thresholds and provenance."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from pipelines import pseudo as pseudo_stage
from segpipe.config import DataParams, InferParams, PseudoParams, SlidingWindowParams
from segpipe.ensemble import (Member, StoredEnsemble, StoredMember, WeightSearch, find_members, nested_search,
                              oof_miou_fn, resize_probs, search_weights, weighted_vote, one_hot_votes)
from segpipe.metrics import miou, confusion_matrix
from segpipe.models import build_model
from segpipe.probstore import dequantise, to_stored
from segpipe.pseudo import class_thresholds, make_pseudo_labels, unknown_index
from segpipe.tta import (TTA_VIEWS, SlidingWindow, apply_view, blend_weights, invert_view, predict_levels,
                         predict_probs, scaled_size, sliding_window_probs, views_probs, window_starts)

CPU = torch.device("cpu")


class Pointwise(nn.Module):
    """A 1x1 convolution: every pixel's output depends on that pixel only, so it commutes with every flip,
    rotation and crop by construction (and with resizing, on a constant image)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return self.conv(x)


class Where(nn.Module):
    """Logits that say where a pixel sits in the input: class 0 grows to the right, class 1 downwards.
    Not equivariant at all: a view whose inverse is not applied to its probabilities shows up at once."""

    def forward(self, x):
        n, _, h, w = x.shape
        col = torch.linspace(-2, 2, w).view(1, 1, 1, w).expand(n, 1, h, w)
        row = torch.linspace(-2, 2, h).view(1, 1, h, 1).expand(n, 1, h, w)
        return torch.cat([col, row, torch.zeros_like(col)], 1) + 0 * x[:, :1]


@pytest.mark.parametrize("view", TTA_VIEWS)
def test_view_then_inverse_recovers_the_input(view):
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)       # non-square: rotations swap H, W
    y = apply_view(x, view)
    assert y.shape == ((2, 3, 6, 4) if view.startswith("rot") else x.shape)
    assert torch.equal(invert_view(y, view), x)
    if view != "identity":
        assert y.shape != x.shape or not torch.equal(y, x)          # it really moves pixels


@pytest.mark.parametrize("view", [v for v in TTA_VIEWS if v != "identity"])
def test_each_view_is_inverted_on_the_probabilities(view):
    x = torch.randn(2, 3, 32, 32)
    # equivariant model: every view, once inverted, predicts exactly what identity predicts
    model = Pointwise()
    plain = views_probs(model, x, ("identity",))
    torch.testing.assert_close(views_probs(model, x, ("identity", view)), plain)
    # a position-dependent model: the merged prediction is the mean of identity and the inverted view's prediction
    where = Where()
    expected = (where(x).softmax(1) + invert_view(where(apply_view(x, view)).softmax(1), view)) / 2
    torch.testing.assert_close(views_probs(where, x, ("identity", view)), expected)
    assert not torch.allclose(views_probs(where, x, ("identity", view)), plain, atol=1e-3)


def test_unknown_view_names_the_valid_ones():
    with pytest.raises(KeyError, match="supported views"):
        views_probs(Pointwise(), torch.zeros(1, 3, 32, 32), ("identity", "diagonal"))


def test_multi_scale_shapes_and_sizes():
    assert scaled_size(128, 128, 0.75) == (96, 96) and scaled_size(512, 512, 1.5) == (768, 768)
    assert scaled_size(100, 60, 1.0) == (96, 64) and scaled_size(40, 40, 0.5) == (32, 32)   # multiples of 32
    x = torch.randn(2, 3, 64, 96)
    unet = build_model("unet", "resnet18", 4).eval()
    with torch.no_grad():
        p = views_probs(unet, x, ("identity", "hflip", "rot90"), (0.75, 1.0, 1.25, 1.5))
    assert p.shape == (2, 4, 64, 96)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 64, 96))
    # on a constant image a pointwise model is scale-invariant: resized back, every scale agrees with scale 1
    flat = torch.full((1, 3, 64, 64), 0.3)
    torch.testing.assert_close(views_probs(Pointwise(), flat, ("identity",), (0.75, 1.0, 1.5)),
                               views_probs(Pointwise(), flat, ("identity",)))


def test_tta_levels_are_running_means_of_one_set_of_passes():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    model = build_model("fpn", "resnet18", 3).eval()
    steps = [(("identity",), (1.0,)), (("hflip", "vflip"), (1.0,)), (("identity", "hflip", "vflip"), (0.75, 1.5))]
    levels = predict_levels(model, images, 2, CPU, steps)
    plain = predict_probs(model, images, 2, CPU)
    flips = predict_probs(model, images, 2, CPU, ("hflip", "vflip"))
    full = predict_probs(model, images, 2, CPU, ("hflip", "vflip"), scales=(1.0, 0.75, 1.5))
    for got, want in zip(levels, (plain, flips, full)):
        assert got.dtype == np.float16 and got.shape == (3, 3, 64, 64)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)
    assert np.abs(levels[0].astype(np.float32) - levels[2].astype(np.float32)).max() > 1e-3   # TTA changed something
    # the plain step handed in (the train stage's stored OOF) instead of run: the same levels
    given = predict_levels(model, images, 2, CPU, steps, first=plain)
    for got, want in zip(given, levels):
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)
    poisoned = predict_levels(model, images, 2, CPU, steps, first=np.zeros_like(plain))
    assert np.abs(poisoned[1].astype(np.float32) - levels[1].astype(np.float32)).max() > 0.05   # really used


def test_sliding_window_equals_plain_inference_when_the_window_covers_the_image():
    x = torch.randn(2, 3, 64, 64)
    model = build_model("unet", "resnet18", 3).eval()
    with torch.no_grad():
        plain = views_probs(model, x, ("identity", "hflip"))
        for size in (64, 96):
            got = sliding_window_probs(lambda t: views_probs(model, t, ("identity", "hflip")), x, SlidingWindow(size))
            assert torch.equal(got, plain)


def test_sliding_window_places_windows_and_blends_seams():
    assert window_starts(96, 64, 0.5) == [0, 32] and window_starts(100, 64, 0.5) == [0, 32, 36]
    assert window_starts(64, 64, 0.5) == [0]
    x = torch.randn(1, 3, 96, 160)
    # a pointwise model has no context: stitched windows must give back exactly the whole-image prediction
    pw = Pointwise()
    with torch.no_grad():
        stitched = sliding_window_probs(lambda t: views_probs(pw, t, ("identity",)), x, SlidingWindow(64, 0.5))
        torch.testing.assert_close(stitched, views_probs(pw, x, ("identity",)))

    # a position-dependent model disagrees with itself across windows: where windows overlap, the result is the
    # weight-blended mean of the windows covering the pixel (checked against a hand computation)
    where = Where()
    win = SlidingWindow(64, 0.5, "gaussian")
    with torch.no_grad():
        out = sliding_window_probs(lambda t: where(t).softmax(1), x, win)
    wmap = blend_weights(64, 64, win)
    y, col = 10, 40                                   # covered by the windows at x0 = 0 and x0 = 32 (y0 = 0 only)
    ys = [0] if y < 32 else [0, 32]
    num, den = torch.zeros(3), 0.0
    for y0 in ys:
        for x0 in window_starts(160, 64, 0.5):
            if x0 <= col < x0 + 64 and y0 <= y < y0 + 64:
                p = where(x[:, :, y0:y0 + 64, x0:x0 + 64]).softmax(1)[0, :, y - y0, col - x0]
                num += wmap[y - y0, col - x0] * p
                den += float(wmap[y - y0, col - x0])
    torch.testing.assert_close(out[0, :, y, col], num / den)
    # Gaussian blending: no jump at a window's edge; averaging windows flatly leaves a step there
    flat = sliding_window_probs(lambda t: where(t).softmax(1), x, SlidingWindow(64, 0.5, "uniform"))
    def worst_step(p):
        return float((p[0, 0, :, 1:] - p[0, 0, :, :-1]).abs().max())
    assert worst_step(out) < 0.5 * worst_step(flat)
    assert float(wmap[32, 32] / wmap[0, 0]) > 100      # centres outweigh edges


def test_predict_probs_with_a_window_over_a_larger_image():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (2, 96, 96, 3), dtype=np.uint8)
    model = build_model("unet", "resnet18", 3).eval()
    win = predict_probs(model, images, 2, CPU, ("hflip",), window=SlidingWindow(64, 0.5))
    assert win.shape == (2, 3, 96, 96) and win.dtype == np.float16
    np.testing.assert_allclose(win.astype(np.float32).sum(1), 1.0, atol=3e-3)
    covered = predict_probs(model, images, 2, CPU, ("hflip",), window=SlidingWindow(96))
    np.testing.assert_array_equal(covered, predict_probs(model, images, 2, CPU, ("hflip",)))


def test_config_rejects_bad_tta_settings():
    with pytest.raises(ValueError, match="include 1.0"):
        InferParams(batch_size=2, scales=(0.75, 1.25))
    with pytest.raises(ValueError, match="image_size must be > 0"):
        SlidingWindowParams(enabled=True)
    with pytest.raises(ValueError):
        InferParams(batch_size=2, tta=("diagonal",))


# ------------------------------------------------------------------------------------------------ ensembles
def _stored(path: Path, probs: np.ndarray) -> Path:
    """A member's probabilities as the infer stage stores them (segpipe.probstore)."""
    np.save(path, to_stored(probs, probs.shape[-1]))
    return path


def test_resize_ensemble_members_of_different_sizes_combine(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.random((2, 3, 32, 32)).astype(np.float16)
    large = rng.random((2, 3, 64, 64)).astype(np.float16)
    assert resize_probs(small, 64).shape == (2, 3, 64, 64) and resize_probs(large, 64) is large
    ens = StoredEnsemble([StoredMember("a", ["x", "y"], _stored(tmp_path / "s.npy", small)),
                          StoredMember("a", ["y", "x"], _stored(tmp_path / "l.npy", large[::-1]))], ["x", "y"], 3, 64)
    soft, _ = ens.means(slice(0, 2))["a"]
    want = (resize_probs(small, 64).astype(np.float32) + large.astype(np.float32)) / 2
    np.testing.assert_allclose(soft.numpy(), want, atol=4e-3)          # uint8 storage: 1/510 per member


def test_hard_voting_is_a_weighted_majority_and_soft_voting_a_weighted_mean():
    def member(p):                      # one pixel, three classes
        return torch.tensor(p, dtype=torch.float32).view(1, 3, 1, 1)
    a, b, c = member([0.1, 0.45, 0.45 - 1e-3]), member([0.2, 0.41, 0.39]), member([0.0, 0.01, 0.99])
    soft = weighted_vote([a, b, c], [1, 1, 1])
    assert soft.argmax(1).item() == 2                               # c's confidence wins the mean
    hard = weighted_vote([a, b, c], [1, 1, 1], [one_hot_votes(m) for m in (a, b, c)])
    assert hard.argmax(1).item() == 1                               # two votes to one
    torch.testing.assert_close(hard.sum(1), torch.ones(1, 1, 1))
    weighted = weighted_vote([a, b, c], [1, 1, 3], [one_hot_votes(m) for m in (a, b, c)])
    assert weighted.argmax(1).item() == 2                           # c's weight outvotes the other two
    tie = weighted_vote([a, c], [1, 1], [one_hot_votes(m) for m in (a, c)])
    assert tie.argmax(1).item() == 2                                # 1 vote each: the soft vote decides
    with pytest.raises(ValueError, match="all zero"):
        weighted_vote([a], [0.0])


def _constructed_oof(tmp_path: Path, hard: bool = False, chunk: int = 16):
    """Two models on 6 OOF images (two folds): `good` is right with modest confidence, `loud` is wrong with high
    confidence on most pixels. The equal-weight soft vote follows `loud`; the OOF search must turn it down."""
    rng = np.random.default_rng(0)
    names = [f"img{i}" for i in range(6)]
    masks = rng.integers(0, 3, (6, 16, 16)).astype(np.uint8)
    onehot = np.eye(3, dtype=np.float32)[masks].transpose(0, 3, 1, 2)
    good = (0.5 * onehot + 0.5 / 3).astype(np.float16)
    wrong = np.roll(onehot, 1, axis=1)
    keep = rng.random((6, 1, 16, 16)) < 0.2
    loud = np.where(keep, onehot, 0.9 * wrong + 0.05).astype(np.float16)
    members = []
    for f, fold in enumerate((slice(0, 3), slice(3, 6))):      # one member per model and fold, as stored
        for group, probs in (("good", good), ("loud", loud)):
            path = _stored(tmp_path / f"{group}-f{f}-{hard}.npy", probs[fold])
            members.append(StoredMember(group, names[fold], path))
    return StoredEnsemble(members, names, 3, 16, hard=hard, chunk=chunk), masks


@pytest.mark.parametrize("hard", [False, True])
def test_weight_search_beats_equal_weights_on_constructed_oof(tmp_path, hard):
    store, masks = _constructed_oof(tmp_path, hard)
    store.check_complete(["good", "loud"])
    fn = oof_miou_fn(store, masks, 255)
    found = search_weights(fn, ["good", "loud"], (0.0, 0.25, 0.5, 0.75, 1.0))
    assert found.uniform_miou == pytest.approx(fn([{"good": 1.0, "loud": 1.0}])[0])
    assert found.miou > found.uniform_miou + 0.2
    assert found.weights["loud"] < found.weights["good"]
    assert found.miou == pytest.approx(fn([found.weights])[0]) == pytest.approx(fn([{"good": 1.0, "loud": 0.0}])[0])
    assert found.evaluations[0]["weights"] == {"good": 1.0, "loud": 1.0}
    # the mIoU is the competition's: one confusion matrix over every image
    p = store.ensemble(found.weights, slice(0, 6)).argmax(1).numpy()
    assert found.miou == pytest.approx(miou(confusion_matrix(masks, p, 3)))


@pytest.mark.parametrize("hard", [False, True])
def test_streamed_ensemble_equals_the_whole_set_in_memory(tmp_path, hard):
    """Read a chunk at a time (here 1 and 4 images of 6, folds interleaved) or all at once, the votes and the
    confusion matrices are the same: the reference holds every member's whole array in memory."""
    store, masks = _constructed_oof(tmp_path, hard, chunk=1)
    weights = {"good": 0.75, "loud": 0.25}
    full = {g: np.zeros((6, 3, 16, 16), np.float32) for g in ("good", "loud")}
    votes = {g: np.zeros((6, 3, 16, 16), np.float32) for g in ("good", "loud")}
    for m, _, _ in store.members:
        rows = [store.names.index(n) for n in m.names]
        p = dequantise(np.load(m.path))
        full[m.group][rows] += p
        votes[m.group][rows] += one_hot_votes(torch.from_numpy(p)).numpy()
    want = weighted_vote([torch.from_numpy(full[g]) for g in weights], list(weights.values()),
                         [torch.from_numpy(votes[g]) for g in weights] if hard else None)
    torch.testing.assert_close(store.ensemble(weights, slice(0, 6)), want)
    cms = [s.confusions([weights, {"good": 1.0}], masks, 255) for s in (store, _constructed_oof(tmp_path, hard, 4)[0])]
    assert all(np.array_equal(a, b) for a, b in zip(*cms))
    assert np.array_equal(cms[0][0], confusion_matrix(masks, want.argmax(1).numpy(), 3))


def test_nested_search_scores_each_fold_with_weights_found_without_it(tmp_path):
    """The honest figure of the weight search: fold k is scored with the weights searched on the other folds only,
    and the fold-split confusions add up to the whole set's."""
    store, masks = _constructed_oof(tmp_path)
    fold_of_row = np.array([0, 0, 0, 1, 1, 1])
    w = {"good": 0.75, "loud": 0.25}
    split_cm = store.fold_confusions([w], masks, 255, fold_of_row, 2)[0]
    assert np.array_equal(split_cm.sum(0), store.confusions([w], masks, 255)[0])
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    found = nested_search(lambda ws: store.fold_confusions(ws, masks, 255, fold_of_row, 2), ["good", "loud"], grid, 2)
    total = np.zeros((3, 3), np.int64)
    for k, rows in enumerate((slice(0, 3), slice(3, 6))):
        other = slice(3, 6) if k == 0 else slice(0, 3)
        only_other = StoredEnsemble([m for m, _, _ in store.members if m.names == store.names[other]],
                                    store.names[other], 3, 16)
        by_hand = search_weights(oof_miou_fn(only_other, masks[other], 255), ["good", "loud"], grid).weights
        assert found.weights[k] == by_hand
        p = store.ensemble(by_hand, rows).argmax(1).numpy()
        total += confusion_matrix(masks[rows], p, 3)
    assert found.miou == pytest.approx(miou(total)) and np.array_equal(found.cm, total)


def test_batched_weight_search_moves_as_the_one_by_one_search():
    """search_weights asks for a group's grid values together; it must choose, and list, exactly what trying
    them one at a time (the search as it was written first) does, on a bumpy score with ties and plateaus."""
    def score(w: dict[str, float]) -> float:
        t = sum(w.values())
        a, b, c = (w[g] / t for g in "abc")
        return round(np.sin(7 * a) * np.cos(5 * b) + 0.3 * c - (a - 0.4) ** 2, 2)

    def one_by_one(groups, grid, max_sweeps=3):
        w, cache, trace = {g: 1.0 for g in groups}, {}, []

        def evaluate(cand):
            total = sum(cand.values())
            key = tuple(round(cand[g] / total, 6) for g in groups)
            if key not in cache:
                cache[key] = score(cand)
                trace.append({"weights": dict(cand), "oof_miou": cache[key]})
            return cache[key]
        best = uniform = evaluate(w)
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

    calls = []

    def many(ws):
        calls.append(len(ws))
        return [score(w) for w in ws]
    grid = (0.0, 0.25, 0.5, 0.75, 1.0, 2.0)
    assert search_weights(many, list("abc"), grid) == one_by_one(list("abc"), grid)
    assert max(calls) > 1                                # really batched


def test_weight_search_fails_loudly_when_a_model_misses_images(tmp_path):
    store = StoredEnsemble([StoredMember("a", ["x", "y"], _stored(tmp_path / "a.npy", np.full((2, 2, 8, 8), 0.5))),
                            StoredMember("b", ["x"], _stored(tmp_path / "b.npy", np.full((1, 2, 8, 8), 0.5)))],
                           ["x", "y"], 2, 8)
    with pytest.raises(ValueError, match="model 'b' has no prediction for 1 image"):
        store.check_complete(["a", "b"])


def test_find_members_adds_kept_epochs_but_not_the_best_twice(tmp_path):
    d = tmp_path / "unet_r18-s1-f0"
    (d / "top_k").mkdir(parents=True)
    for f in ("best.pt", "top_k/top-e003.pt", "top_k/top-e005.pt"):
        (d / f).write_bytes(b"x")
    (d / "metrics.json").write_text(json.dumps({"best_epoch": 4}))       # epoch 5, zero-based
    best_only = find_members(tmp_path)
    assert best_only == [Member("unet_r18-s1-f0", d / "best.pt", "unet_r18", 1, 0)]
    every = find_members(tmp_path, top_k=True)
    assert [m.name for m in every] == ["unet_r18-s1-f0", "unet_r18-s1-f0@e003"]
    assert every[1].group == "unet_r18" and every[1].epoch == "e003" and every[1].fold == 0
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        find_members(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ pseudo-labels
def test_per_class_thresholds_ignore_unsure_pixels_and_drop_thin_images():
    classes = ["Background", "Paper", "Battery"]
    t = class_thresholds(classes, 0.6, {"Battery": 0.9})
    assert t.tolist() == pytest.approx([0.6, 0.6, 0.9])
    with pytest.raises(KeyError, match="classes in data.classes"):
        class_thresholds(classes, 0.6, {"Batery": 0.9})
    probs = np.zeros((2, 3, 2, 2), np.float32)
    probs[0, :, 0, 0] = [0.1, 0.2, 0.7]      # Battery at 0.7: under its 0.9 -> ignore
    probs[0, :, 0, 1] = [0.05, 0.05, 0.95]   # Battery at 0.95: kept
    probs[0, :, 1, 0] = [0.1, 0.7, 0.2]      # Paper at 0.7: over the default 0.6 -> kept
    probs[0, :, 1, 1] = [0.5, 0.3, 0.2]      # Background at 0.5 -> ignore, never background
    probs[1] = 1 / 3                         # nothing confident: the image is dropped
    ps = make_pseudo_labels(probs.astype(np.float16), t, 0.5, 255)
    assert ps.kept == [0] and ps.masks.tolist() == [[[255, 2], [1, 255]]]
    assert ps.confident_fraction.tolist() == pytest.approx([0.5, 0.0])
    # the UNKNOWN rule: not confident about any known class -> UNKNOWN
    with_unknown = classes + ["UNKNOWN"]
    u = unknown_index(with_unknown)
    probs4 = np.concatenate([probs, np.zeros((2, 1, 2, 2), np.float32)], 1)
    ps = make_pseudo_labels(probs4, np.append(t, 0.6), 0.0, 255, unsure_label=u)
    assert ps.masks[0].tolist() == [[3, 2], [1, 3]] and (ps.masks[1] == 3).all()
    with pytest.raises(ValueError, match="needs an UNKNOWN class"):
        unknown_index(classes)


def test_pseudo_stage_writes_labels_and_provenance_from_stored_probabilities(tmp_path):
    classes = ("Background", "A", "B")
    vdir, infer_dir = tmp_path / "validate", tmp_path / "infer" / "r0"
    vdir.mkdir()
    infer_dir.mkdir(parents=True)
    names = ["batch_01_vt/0001.jpg", "batch_01_vt/0002.jpg"]
    (vdir / "index.json").write_text(json.dumps({"data_root": str(tmp_path / "data"), "classes": list(classes),
                                                 "train": [], "test": [{"file_name": n, "image": n} for n in names]}))
    probs = np.full((2, 3, 8, 8), 1 / 3, np.float16)
    probs[0, :, :4] = np.array([0.05, 0.9, 0.05], np.float16)[:, None, None]    # top half confidently A
    np.save(infer_dir / "test_probs.npy", probs)
    (infer_dir / "test_index.json").write_text(json.dumps({"file_names": names}))
    report = {"round": 0, "weights": {"unet": 0.75, "fpn": 1.0}, "voting": "soft", "tta": ["hflip"],
              "scales": [1.0, 0.75], "ensemble_oof_miou": 0.5,
              "member_details": {"unet-s0-f0": {"model": "unet", "seed": 0, "fold": 0, "epoch": "best",
                                                "checkpoint_sha256": "ab" * 32, "oof_miou": 0.4}}}
    (infer_dir / "report.json").write_text(json.dumps(report))
    res = pseudo_stage.run(DataParams(root=str(tmp_path / "data"), classes=classes),
                           PseudoParams(threshold=0.6, class_thresholds={"A": 0.8}, min_confident_fraction=0.25,
                                        teacher="all"),
                           vdir, infer_dir, tmp_path / "pseudo" / "r1", round_=1)
    assert (res.n_kept, res.n_test) == (1, 2)
    out = tmp_path / "pseudo" / "r1"
    index = json.loads((out / "index.json").read_text())
    assert [s["file_name"] for s in index["samples"]] == [names[0]]
    mask = cv2.imread(str(out / index["samples"][0]["mask"]), cv2.IMREAD_UNCHANGED)
    assert (mask[:4] == 1).all() and (mask[4:] == 255).all()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["round"] == 1 and prov["ensemble"]["weights"] == {"unet": 0.75, "fpn": 1.0}
    assert prov["ensemble"]["members"]["unet-s0-f0"]["checkpoint_sha256"] == "ab" * 32
    assert prov["ensemble"]["tta"] == ["hflip"] and prov["ensemble"]["scales"] == [1.0, 0.75]
    assert len(prov["data"]["validated_index_sha256"]) == 64 and prov["data"]["data_version"]
    assert prov["params"]["class_thresholds"] == {"A": 0.8} and prov["thresholds"] == pytest.approx(
        {"Background": 0.6, "A": 0.8, "B": 0.6})
    assert json.loads((out / "metrics.json").read_text())["pixels/A"] == 32


# ------------------------------------------------------------------------------------------------ the infer stage
def _fake_members(root: Path, vdir: Path, sizes: dict[str, int], top_k: bool = True, seeds=(0,)) -> None:
    """Untrained members as the train stage lays them out: best.pt with its resolved config, oof.npz names,
    metrics.json, and (top_k) one kept epoch (top_k/top-e001.pt) beside best.pt (epoch 2)."""
    from pipelines.split import run as split_run
    from segpipe.config import SplitParams
    split_run(SplitParams(n_folds=2, seed=0, group_by="batch"), vdir, root / "split")
    folds = json.loads((root / "split" / "folds.json").read_text())["folds"]
    for model, size in sizes.items():
        arch = model.split("_")[0]
        for seed, fold in itertools.product(seeds, (0, 1)):
            d = root / "members" / f"{model}-s{seed}-f{fold}"
            (d / "top_k").mkdir(parents=True)
            for i, name in enumerate(("best.pt", "top_k/top-e001.pt")[:2 if top_k else 1]):
                torch.manual_seed(seed * 100 + fold * 10 + i)
                net = build_model(arch, "resnet18", 3)
                cfg = {"model": {"arch": arch, "encoder": "resnet18"}, "num_classes": 3, "input_size": size,
                       "amp": True, "channels_last": False}
                torch.save({"model": net.state_dict(), "config": cfg}, d / name)
            names = [n for n, f in folds.items() if f == fold]
            np.savez(d / "oof.npz", probs=np.zeros((len(names), 3, 2, 2), np.float16), file_names=np.array(names))
            (d / "metrics.json").write_text(json.dumps({"best_epoch": 1}))


def test_infer_stage_hard_votes_members_of_two_sizes_with_kept_epochs(tmp_path):
    from pipelines import infer
    from tests.test_training_chain import DATA, make_tiny
    vdir = make_tiny(tmp_path)
    _fake_members(tmp_path, vdir, {"unet_a": 32, "fpn_b": 64})
    params = InferParams(tta=("rot90",), batch_size=8, members="top_k", voting="hard")
    res = infer.run(DATA, params, vdir, tmp_path / "members", tmp_path / "infer" / "r0", round_=0)
    out = tmp_path / "infer" / "r0"
    report = json.loads((out / "report.json").read_text())
    assert report["n_members"] == 8 and "unet_a-s0-f0@e001" in report["members"]     # kept epochs joined
    assert np.load(out / "members" / "unet_a-s0-f0" / "oof.npy").shape[-1] == 32       # each member at its size
    assert np.load(out / "members" / "fpn_b-s0-f1@e001" / "test.npy").shape == (4, 3, 64, 64)
    probs = np.load(out / "test_probs.npy")
    assert probs.shape == (4, 3, 256, 256) and probs.dtype == np.uint8 and np.abs(dequantise(probs).sum(1) - 1).max() < 1e-2
    assert report["voting"] == "hard" and set(res.weights) == {"unet_a", "fpn_b"}
    tried = report["weight_evaluations"]                                             # searched at the members' 64 px
    assert tried[0]["weights"] == {"unet_a": 1.0, "fpn_b": 1.0} and len(tried) > 1 and report["weight_search_size"] == 64
    chosen = next(e["oof_miou"] for e in tried if e["weights"] == res.weights)
    assert chosen == max(e["oof_miou"] for e in tried) >= tried[0]["oof_miou"]      # never worse than equal weights
    assert report["n_oof_images"] == 16
    # the honest figure beside the selected one: each fold scored with weights searched on the other fold
    assert sorted(report["nested_weights"]) == ["0", "1"] and report["oof_miou"] == report["nested_oof_miou"]
    assert res.oof_miou == report["nested_oof_miou"]
    assert json.loads((out / "metrics.json").read_text())["selected_oof_miou"] == report["ensemble_oof_miou"]
    rows = json.loads((out / "ablation.json").read_text())
    assert rows[-1]["oof_miou"] == report["nested_oof_miou"] and rows[-1]["oof_selected"] == report["ensemble_oof_miou"]
    assert [r["step"] for r in rows] == ["single", "flip_tta", "multiscale_tta", "fold_ensemble", "model_ensemble"]
    assert rows[2]["masks"] is None and "infer.scales" in rows[2]["note"]              # one scale: skipped, said why


def test_infer_stage_measures_the_single_row_on_every_seed(tmp_path):
    """Two seeds of a model: the single-model row carries both seeds' OOF figures and their spread (the ablation's
    noise band)."""
    from pipelines import infer
    from tests.test_training_chain import DATA, make_tiny
    vdir = make_tiny(tmp_path)
    _fake_members(tmp_path, vdir, {"unet_a": 32}, top_k=False, seeds=(0, 1))
    infer.run(DATA, InferParams(tta=(), batch_size=8), vdir, tmp_path / "members", tmp_path / "infer" / "r0")
    out = tmp_path / "infer" / "r0"
    single = json.loads((out / "ablation.json").read_text())[0]
    by_seed = json.loads((out / "report.json").read_text())["models"]["unet_a"]["seed_oof_miou"]
    assert sorted(single["seed_oof_miou"]) == ["0", "1"] and sorted(by_seed) == ["0", "1"]
    assert single["oof_miou"] == single["seed_oof_miou"]["0"]                    # the row itself is the first seed
    assert single["seed_spread"] == pytest.approx(abs(by_seed["0"] - by_seed["1"])) and single["seed_spread"] > 0


def test_infer_stage_sliding_window_over_larger_images(tmp_path):
    from pipelines import infer
    from tests.test_training_chain import DATA, make_tiny
    vdir = make_tiny(tmp_path)
    _fake_members(tmp_path, vdir, {"unet_a": 32}, top_k=False)
    params = InferParams(tta=(), batch_size=8, ablation=False,
                         sliding_window=SlidingWindowParams(enabled=True, image_size=64, overlap=0.25))
    infer.run(DATA, params, vdir, tmp_path / "members", tmp_path / "infer" / "r0", round_=0)
    out = tmp_path / "infer" / "r0"
    assert np.load(out / "members" / "unet_a-s0-f0" / "test.npy").shape == (4, 3, 64, 64)   # windows of 32 on 64
    report = json.loads((out / "report.json").read_text())
    assert report["sliding_window"]["enabled"] and report["member_details"]["unet_a-s0-f0"]["prob_size"] == 64
    assert [r["step"] for r in json.loads((out / "ablation.json").read_text())] == ["model_ensemble"]
