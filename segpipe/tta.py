"""Test-time augmentation: dihedral views with exact inverses, multi-scale, sliding windows with blended seams.

Every function here maps images to class probabilities in the images' own frame: a view's inverse is applied to
the probabilities (not to the input) and a scaled prediction is resized back, so views and scales average
pixel for pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segpipe.datasets import normalize

# view -> (forward, inverse) on the last two dims of (N, C, H, W); flips are their own inverse
_VIEW_FNS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "identity": (lambda x: x, lambda y: y),
    "hflip": (lambda x: x.flip(3), lambda y: y.flip(3)),
    "vflip": (lambda x: x.flip(2), lambda y: y.flip(2)),
    "hvflip": (lambda x: x.flip((2, 3)), lambda y: y.flip((2, 3))),      # = a 180 degree rotation
    "rot90": (lambda x: torch.rot90(x, 1, (2, 3)), lambda y: torch.rot90(y, -1, (2, 3))),
    "rot270": (lambda x: torch.rot90(x, -1, (2, 3)), lambda y: torch.rot90(y, 1, (2, 3))),
}
TTA_VIEWS = tuple(_VIEW_FNS)
FLIP_VIEWS = ("hflip", "vflip", "hvflip")
SIZE_MULTIPLE = 32     # smp encoders downsample 5 times: an input side must divide by 2**5


def check_views(views: tuple[str, ...] | list[str]) -> None:
    unknown = sorted(set(views) - set(TTA_VIEWS))
    if unknown:
        raise KeyError(f"Wrong TTA view(s) {unknown}, supported views: {list(TTA_VIEWS)}")


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """The view of a batch (N, C, H, W); rot90/rot270 of a non-square batch is (N, C, W, H)."""
    check_views([view])
    return _VIEW_FNS[view][0](x)


def invert_view(y: torch.Tensor, view: str) -> torch.Tensor:
    """Map a prediction made on `apply_view(x, view)` back to x's frame: invert_view(apply_view(x, v), v) == x."""
    check_views([view])
    return _VIEW_FNS[view][1](y)


def scaled_size(h: int, w: int, scale: float, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(h, w) times `scale`, rounded to the nearest multiple the encoder accepts (never below one multiple)."""
    def side(n: int) -> int:
        return max(multiple, round(n * scale / multiple) * multiple)
    return side(h), side(w)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    # antialias only when shrinking: it is what keeps a downscaled photo from aliasing thin objects away
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def forward_probs(model: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Softmax over classes in float32 (N, C, H, W); the forward pass under autocast when `amp_dtype` is set."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{type(model).__name__} returned {type(logits).__name__} in eval mode; a model must return "
                        "logits (N, C, H, W) there and keep its extra heads for training (segpipe.outputs)")
    return logits.float().softmax(1)


def views_probs(model: nn.Module, x: torch.Tensor, views: tuple[str, ...], scales: tuple[float, ...] = (1.0,),
                amp_dtype: torch.dtype | None = None, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Mean probabilities (N, C, H, W) float32 over every view x scale of a normalised batch x (N, 3, H, W).

    All views of one scale go through the model as one batch (n views cost about n x one view, never more);
    views whose shapes differ (rot90 of a non-square input) form their own batch.
    """
    check_views(views)
    if not views or not scales:
        raise ValueError("views_probs needs at least one view and one scale")
    h, w = x.shape[-2:]
    total = None
    for scale in scales:
        xs = _resize(x, scaled_size(h, w, scale, multiple)) if scale != 1.0 else x
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for v in views:
            shape = tuple(xs.shape[-2:]) if v in ("identity",) + FLIP_VIEWS else tuple(xs.shape[-2:][::-1])
            by_shape.setdefault(shape, []).append(v)
        for group in by_shape.values():
            stacked = torch.cat([apply_view(xs, v) for v in group]) if len(group) > 1 else apply_view(xs, group[0])
            probs = forward_probs(model, stacked, amp_dtype)
            for i, v in enumerate(group):
                p = _resize(invert_view(probs[i * len(x):(i + 1) * len(x)], v), (h, w))
                total = p if total is None else total + p
    return total / (len(views) * len(scales))


@dataclass(frozen=True)
class SlidingWindow:
    """Predict an image larger than the training crop window by window; overlaps blend (Gaussian or flat)."""

    size: int                       # window side in pixels (the members' training crop)
    overlap: float = 0.5            # share of a window its neighbour covers again
    blend: str = "gaussian"         # gaussian: a window's centre outweighs its edges (no seams); uniform: plain mean
    sigma: float = 0.125            # Gaussian sigma as a share of the window side (nnU-Net's choice)

    def __post_init__(self) -> None:
        if self.blend not in ("gaussian", "uniform"):
            raise KeyError(f"Wrong blend `{self.blend}`, supported blends: ['gaussian', 'uniform']")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"sliding window overlap must be in [0, 1), got {self.overlap}")


def window_starts(length: int, size: int, overlap: float) -> list[int]:
    """Window offsets along one side: stride size x (1 - overlap), the last window flush with the far edge."""
    if length <= size:
        return [0]
    stride = max(1, int(size * (1 - overlap)))
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def blend_weights(h: int, w: int, window: SlidingWindow) -> torch.Tensor:
    """(h, w) weights, largest at the centre; strictly positive so an image corner covered once still counts."""
    if window.blend == "uniform":
        return torch.ones(h, w)

    def gauss(n: int) -> torch.Tensor:
        d = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-d ** 2 / (2 * (window.sigma * n) ** 2))
    return torch.outer(gauss(h), gauss(w))


def sliding_window_probs(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                         window: SlidingWindow) -> torch.Tensor:
    """Probabilities (N, C, H, W) from `predict` run on every window of x (N, 3, H, W), blended by weight.

    When the window covers the image this is exactly `predict(x)`. Each window position is one batch of the
    N images' crops, so a batch's size stays what the caller chose.
    """
    h, w = x.shape[-2:]
    if h <= window.size and w <= window.size:
        return predict(x)
    wh, ww = min(window.size, h), min(window.size, w)
    weight = blend_weights(wh, ww, window).to(x.device)
    total, norm = None, torch.zeros(h, w, device=x.device)
    for y0 in window_starts(h, wh, window.overlap):
        for x0 in window_starts(w, ww, window.overlap):
            p = predict(x[:, :, y0:y0 + wh, x0:x0 + ww]) * weight
            if total is None:
                total = torch.zeros(len(x), p.shape[1], h, w, device=x.device)
            total[:, :, y0:y0 + wh, x0:x0 + ww] += p
            norm[y0:y0 + wh, x0:x0 + ww] += weight
    return total / norm


def _batches(images: np.ndarray, batch_size: int, device: torch.device, channels_last: bool):
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size].transpose(0, 3, 1, 2)))
        yield normalize(batch.to(device), channels_last)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int,
    device: torch.device,
    tta: tuple[str, ...] = (),
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
    scales: tuple[float, ...] = (1.0,),
    window: SlidingWindow | None = None,
) -> np.ndarray:
    """Softmax probabilities (N, C, H, W) float16 for uint8 images (N, H, W, 3): the mean over identity + `tta`
    views at every scale in `scales`, window by window when `window` is given and smaller than the images."""
    check_views(tta)
    views = ("identity",) + tuple(v for v in tta if v != "identity")
    levels = predict_levels(model, images, batch_size, device, [(views, tuple(scales))], channels_last, amp_dtype,
                            window)
    return levels[0] if len(images) else np.zeros((0,), np.float16)


@torch.no_grad()
def predict_levels(
    model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device,
    steps: list[tuple[tuple[str, ...], tuple[float, ...]]], channels_last: bool = False,
    amp_dtype: torch.dtype | None = None, window: SlidingWindow | None = None, first: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Cumulative TTA levels from one set of forward passes: level k is the mean over the views x scales of
    steps[0..k], so `[(identity,), (1,)], [(hflip,), (1,)], [(identity, hflip), (0.75,)]` gives plain, +flip and
    +multi-scale probabilities (N, C, H, W) float16 for the price of the last one alone.

    The steps must be disjoint view x scale sets (each is forwarded once, then the running sum is read off).
    `first`, when given, holds steps[0]'s probabilities (N, C, H, W) already (the train stage's OOF
    predictions of the same checkpoint): they are used instead of running that step again.
    """
    model.eval()
    n_views = [len(v) * len(s) for v, s in steps]
    out: list[list[np.ndarray]] = [[] for _ in steps]
    for start, x in zip(range(0, len(images), batch_size), _batches(images, batch_size, device, channels_last)):
        running, seen = None, 0
        for k, (views, scales) in enumerate(steps):
            def step(t: torch.Tensor, views=views, scales=scales) -> torch.Tensor:
                return views_probs(model, t, views, scales, amp_dtype)
            if k == 0 and first is not None:
                p = torch.from_numpy(np.asarray(first[start:start + len(x)])).float().to(x.device)
            else:
                p = sliding_window_probs(step, x, window) if window is not None else step(x)
            running = p * n_views[k] if running is None else running + p * n_views[k]
            seen += n_views[k]
            out[k].append((running / seen).half().cpu().numpy())
    return [np.concatenate(o) if o else np.zeros((0,), np.float16) for o in out]

