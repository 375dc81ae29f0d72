"""The training switches of params.yaml, each on a tiny CPU problem: losses, augmentations, optimisers and
schedules, gradient accumulation, EMA, SWA, the top-k epoch ensemble, and exact resume with all of them on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.config import ParamsError, TrainParams, parse_section
from segpipe.datasets import ArrayDataset, build_augment
from segpipe.engine import LoopConfig, lr_factor, train_model
from segpipe.losses import SegLoss, parse_loss
from segpipe.models import build_model


def toy(n: int = 8, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    return imgs, (imgs[..., 0] > 128).astype(np.uint8)


@pytest.mark.parametrize("spec", ["ce", "dice", "focal", "lovasz", "ce+dice", {"ce": 1.0, "lovasz": 0.5}])
def test_every_loss_is_finite_differentiable_and_skips_ignored_pixels(spec):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :2] = 255
    loss_fn = SegLoss(spec, 255, label_smoothing=0.1)
    loss = loss_fn(logits, target)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert logits.grad[:, :, :2].abs().max() == 0      # ignored pixels teach nothing
    other = logits.detach().clone()
    other[:, :, :2] = torch.randn(2, 3, 2, 8) * 10
    assert SegLoss(spec, 255, label_smoothing=0.1)(other, target).item() == pytest.approx(loss.item(), rel=1e-5)


def test_loss_weights_sum_and_bad_names():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    terms = SegLoss({"ce": 1.0, "dice": 1.0}, 255).terms(logits, target)
    assert SegLoss({"ce": 2.0, "dice": 0.5}, 255)(logits, target).item() == pytest.approx(
        2 * terms["ce"].item() + 0.5 * terms["dice"].item(), rel=1e-5)
    assert parse_loss("ce+lovasz") == {"ce": 1.0, "lovasz": 1.0}
    with pytest.raises(KeyError, match="supported losses"):
        parse_loss("ce+tversky")
    raw = {"train": {**_train_raw(), "loss": {"ce": 1, "banana": 1}}}
    with pytest.raises(ParamsError, match="supported losses"):
        parse_section(raw, "train", TrainParams)


def _train_raw() -> dict:
    return {"models": {"m": {"arch": "unet", "encoder": "resnet18"}}, "seeds": [0], "folds": [0], "epochs": 1,
            "batch_size": 2, "input_size": 32, "lr": 0.01, "weight_decay": 0, "warmup_epochs": 0, "num_workers": 0}


def test_augment_from_params_keeps_masks_nearest():
    aug = build_augment([{"HorizontalFlip": {"p": 1.0}},
                         {"Affine": {"scale": [0.6, 1.4], "rotate": [-30, 30], "fill_mask": 255, "p": 1.0}},
                         {"RandomResizedCrop": {"size": [32, 32], "scale": [0.3, 1.0]}},
                         {"ColorJitter": {"p": 1.0}}])
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    mask = np.zeros((48, 48), np.uint8)
    mask[10:30, 5:20], mask[30:45, 25:45] = 3, 7
    for _ in range(20):
        out = aug(image=img, mask=mask)
        assert out["image"].shape == (32, 32, 3)
        assert set(np.unique(out["mask"])) <= {0, 3, 7, 255}    # no blended class ids
    with pytest.raises(KeyError, match="Wrong augmentation `Flipp`"):
        build_augment([{"Flipp": {}}])
    with pytest.raises(ValueError, match="mask_interpolation must stay nearest"):
        build_augment([{"Affine": {"mask_interpolation": 1}}])
    with pytest.raises(ValueError, match=r"train.augment\[0\]"):
        build_augment([{"HorizontalFlip": {"p": 0.5}, "VerticalFlip": {}}])


def test_schedules():
    cos, poly = lr_factor("cosine", 100, 10), lr_factor("poly", 100, 10, 0.9)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and poly(9) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5, abs=0.02) and poly(55) == pytest.approx(0.5 ** 0.9, abs=0.02)
    assert cos(100) == pytest.approx(0.0) and poly(100) == pytest.approx(0.0)
    with pytest.raises(KeyError, match="supported schedules"):
        lr_factor("step", 10, 0)


FEATURES = dict(optimizer="sgd", momentum=0.9, schedule="poly", grad_accum=2, grad_clip=1.0, ema=0.9,
                swa_start=0.5, keep_top_k=2)


def _train(ckpt: Path, epochs: int = 4, on_epoch=None, **features):
    imgs, masks = toy()
    torch.manual_seed(0)
    net = build_model("unet", "resnet18", 2)
    cfg = LoopConfig(epochs=epochs, batch_size=2, lr=0.05, weight_decay=1e-4, warmup_epochs=1, amp=False,
                     channels_last=False, num_workers=0, seed=0, **features)
    aug = build_augment([{"HorizontalFlip": {"p": 0.5}}])
    res = train_model(net, SegLoss("ce+dice", 255), ArrayDataset(imgs, masks, aug), imgs, masks, cfg,
                      ["bg", "fg"], 255, ckpt, {"features": sorted(features)}, on_epoch=on_epoch)
    return res


def test_ema_swa_top_k_and_accumulation_together(tmp_path):
    res = _train(tmp_path / "a", **FEATURES)
    assert res.best_source in ("ema", "swa") and res.swa_miou is not None
    assert len(res.top_k) == 2 and res.top_k[0]["miou"] >= res.top_k[1]["miou"]
    kept = sorted(p.name for p in (tmp_path / "a").glob("top-e*.pt"))
    assert kept == sorted(t["file"] for t in res.top_k)          # evicted epochs are deleted
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=False)
    assert best["miou"] == pytest.approx(res.best_miou)
    # 8 images, batch 2, accumulation 2: 2 optimiser steps per epoch, so the poly schedule ends at 0
    assert res.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)
    if res.best_source == "swa":
        assert res.best_miou == pytest.approx(res.swa_miou) and best["source"] == "swa"


def test_resume_is_exact_with_ema_and_swa(tmp_path):
    """Interrupted after epoch 2 (inside the SWA window) and resumed: same result as an unbroken run."""
    full = _train(tmp_path / "full", **FEATURES)

    class Stop(Exception):
        pass

    def stop_at_2(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        _train(tmp_path / "part", on_epoch=stop_at_2, **FEATURES)
    resumed = _train(tmp_path / "part", **FEATURES)
    assert resumed.resumed_from == 2
    assert resumed.best_miou == pytest.approx(full.best_miou, abs=1e-6)
    assert resumed.swa_miou == pytest.approx(full.swa_miou, abs=1e-6)
    a = torch.load(tmp_path / "full" / "best.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "best.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=f"best.pt differs at {k}")


class _Exhausts(torch.nn.Module):
    """Fails its forward the way a device out of memory does (torch raises OutOfMemoryError)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_batch_size_to_lower(tmp_path):
    imgs, masks = toy()
    cfg = LoopConfig(epochs=1, batch_size=8, lr=0.01, weight_decay=0, warmup_epochs=0, amp=False,
                     channels_last=False, num_workers=0, seed=0)
    from segpipe.engine import TrainingOOM
    with pytest.raises(TrainingOOM, match=r"batch size 8: lower train.batch_size \(try 4, with train.grad_accum: 2"):
        train_model(_Exhausts(), SegLoss("ce", 255), ArrayDataset(imgs, masks), imgs, masks, cfg, ["bg", "fg"], 255,
                    tmp_path, {})
    assert not (tmp_path / "last.pt").exists()      # nothing half-written
