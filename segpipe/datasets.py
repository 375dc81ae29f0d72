"""Sample index, decoded-image cache and torch datasets with albumentations transforms."""

from __future__ import annotations

import inspect
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segpipe.photos import read_photo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Sample:
    file_name: str
    image: Path
    mask: Path | None = None     # None for test images
    batch: str = ""
    classes: tuple[int, ...] = ()
    exif: str = "apply"          # data.exif_orientation, as the validate stage recorded it (segpipe.photos)


def load_index(index_path: Path, data_root: Path | None = None) -> tuple[list[Sample], list[Sample], list[str]]:
    """Read the validate stage's index.json into (train samples, test samples, class names); the photos under
    `data_root` when given (a copy of data.root elsewhere, as a Ray node stages it), else the index's."""
    index_path = Path(index_path)
    idx = json.loads(index_path.read_text())
    root = Path(data_root or idx["data_root"])
    exif = idx.get("exif_orientation", "apply")
    train = [
        Sample(r["file_name"], root / r["image"], index_path.parent / r["mask"], r.get("batch", ""),
               tuple(r.get("classes", ())), exif)
        for r in idx["train"]
    ]
    test = [Sample(r["file_name"], root / r["image"], exif=exif) for r in idx["test"]]
    return train, test, list(idx["classes"])


def load_pseudo_index(index_path: Path, fold: int | None = None, data_root: Path | None = None) -> list[Sample]:
    """Pseudo-labelled test samples written by the pseudo stage (masks carry ignore where unsure): with per-fold
    teachers (pseudo.teacher=fold) the set made for `fold`'s student, by the members that never saw its images.
    The photos under `data_root` when given, else the index's."""
    index_path = Path(index_path)
    idx = json.loads(index_path.read_text())
    root = Path(data_root or idx["data_root"])
    exif = idx.get("exif_orientation", "apply")
    if "folds" in idx:
        if str(fold) not in idx["folds"]:
            raise KeyError(f"{index_path} holds pseudo-labels for folds {sorted(idx['folds'])} (pseudo.teacher=fold), "
                           f"none for fold {fold}: the previous round's infer had no member of fold {fold}; train it, "
                           "or set pseudo.teacher: all")
        records = idx["folds"][str(fold)]
    else:
        records = idx["samples"]
    return [Sample(r["file_name"], root / r["image"], index_path.parent / r["mask"], "pseudo", exif=exif)
            for r in records]


def read_image(path: Path, exif: str = "apply") -> np.ndarray:
    """Decode a photo as RGB uint8 (H, W, 3) under data.exif_orientation (segpipe.photos.read_photo: the one
    decoder of photos, so training and inference see them as validation sized them)."""
    return read_photo(path, exif)


def read_mask(path: Path) -> np.ndarray:
    """A label mask as stored (never re-oriented: it is drawn in the frame its photo is shown in)."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise FileNotFoundError(f"cannot read mask {path}: missing or corrupt (re-run the validate stage)")
    return mask


def decode_all(samples: list[Sample], size: int, threads: int = 4) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode and resize every sample once: images (N, size, size, 3) uint8, masks (N, size, size) uint8.

    Decoding JPEGs every epoch is what starves the GPU; the demo's and a competition's train set
    (3,300 x 512^2 x 3 = 2.6 GB) fit in memory, so each image is decoded exactly once per task.
    """
    images = np.empty((len(samples), size, size, 3), np.uint8)
    has_masks = all(s.mask is not None for s in samples)
    masks = np.empty((len(samples), size, size), np.uint8) if has_masks else None

    def load(i: int) -> None:
        img = read_image(samples[i].image, samples[i].exif)
        images[i] = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        if masks is not None:
            masks[i] = cv2.resize(read_mask(samples[i].mask), (size, size), interpolation=cv2.INTER_NEAREST)

    with ThreadPoolExecutor(max(1, threads)) as pool:   # cv2 releases the GIL while decoding
        list(pool.map(load, range(len(samples))))
    return images, masks


def build_augment(spec: list[dict[str, dict]] | tuple) -> A.Compose:
    """albumentations pipeline from params: `[{HorizontalFlip: {p: 0.5}}, {Affine: {scale: [0.75, 1.25]}}]`.

    Masks always resample with nearest interpolation: a linear blend of class ids 3 and 5 is 4, a wrong class.
    """
    ops: list[A.BasicTransform] = []
    for i, item in enumerate(spec):
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(f"train.augment[{i}] must be one `Name: {{kwargs}}` mapping, got {item!r}")
        (name, kwargs), = item.items()
        cls = getattr(A, name, None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            raise KeyError(f"Wrong augmentation `{name}` in train.augment[{i}]: not an albumentations transform "
                           "(e.g. HorizontalFlip, VerticalFlip, RandomRotate90, Affine, RandomResizedCrop, ColorJitter)")
        kwargs = dict(kwargs or {})
        if "mask_interpolation" in inspect.signature(cls.__init__).parameters:
            if kwargs.get("mask_interpolation", cv2.INTER_NEAREST) != cv2.INTER_NEAREST:
                raise ValueError(f"train.augment[{i}] {name}: mask_interpolation must stay nearest (0)")
            kwargs["mask_interpolation"] = cv2.INTER_NEAREST
        try:
            ops.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise ValueError(f"train.augment[{i}] {name}{kwargs}: {e}") from None
    return A.Compose(ops)


class ArrayDataset(Dataset):
    """Items are uint8 CHW image tensors and int64 masks; normalisation happens on the device."""

    def __init__(self, images: np.ndarray, masks: np.ndarray | None, transform: A.Compose | None = None):
        self.images, self.masks, self.transform = images, masks, transform

    def __len__(self) -> int:
        return len(self.images)

    def reseed(self, seed: int) -> None:
        """Seed the augmentations: albumentations draws from its own generators, not numpy's or torch's."""
        if self.transform is not None:
            # one generator shared by every transform (Compose.set_random_seed would give each the same stream)
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __getitem__(self, i: int):
        img = self.images[i]
        mask = self.masks[i] if self.masks is not None else None
        if self.transform is not None:
            out = self.transform(image=img, mask=mask) if mask is not None else self.transform(image=img)
            img, mask = out["image"], out.get("mask", mask)
        img_t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        if mask is None:
            return img_t
        return img_t, torch.from_numpy(np.ascontiguousarray(mask)).long()


def normalize(batch_u8: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, 3, H, W) on any device -> float normalised with ImageNet statistics."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch_u8.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=batch_u8.device).view(1, 3, 1, 1) * 255
    x = (batch_u8.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
