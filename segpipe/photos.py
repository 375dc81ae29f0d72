"""Photos as the camera took them: one rule for the JPEG EXIF orientation tag, everywhere a photo is sized or decoded.

`data.exif_orientation` (the validate stage records it in index.json, and every later stage decodes by it):

- `apply` (default): a photo is what the camera showed, its EXIF orientation applied to the stored pixels, as
  OpenCV's `imread` and most annotation tools do. COCO `width`/`height` are checked against that oriented size.
- `ignore`: the pixels as stored, everywhere (for annotations drawn on the stored pixels).
- `reject`: a photo with any orientation other than 1 fails validation, named.

Only this module reads the tag (Pillow, from the file's header) and applies it (numpy, as Pillow's
`ImageOps.exif_transpose` does); OpenCV decodes with its own orientation handling turned off. OpenCV and Pillow read
the tag from different places (Pillow also from XMP), so letting each apply its own would let validation, the EDA,
training and inference disagree on one photo. Label masks (PNG) are never re-oriented: a mask is a pixel grid in the
frame of its photo as the rule shows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

ExifRule = Literal["apply", "ignore", "reject"]
EXIF_RULES: tuple[str, ...] = ("apply", "ignore", "reject")
ORIENTATION_TAG = 0x0112
SWAPS_AXES = frozenset({5, 6, 7, 8})     # orientations whose shown photo is the stored one turned on its side
ORIENTATION_NAMES = {
    1: "as stored", 2: "mirrored left-right", 3: "rotated 180°", 4: "mirrored top-bottom",
    5: "transposed", 6: "rotated 90° clockwise", 7: "transversed", 8: "rotated 90° counter-clockwise",
}


class PhotoOrientationError(ValueError):
    """A photo carries an EXIF orientation that data.exif_orientation=reject does not accept."""


def orientation_of(im: Image.Image) -> int:
    """EXIF orientation 1..8 of an opened Pillow image; 1 (as stored) when absent or invalid."""
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:   # a corrupt EXIF block: the photo's pixels are what is left
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_orientation(path: Path | str) -> int:
    """EXIF orientation of a photo file, from its header only (Pillow opens lazily: no pixels are decoded)."""
    with Image.open(path) as im:
        return orientation_of(im)


def describe(orientation: int) -> str:
    return f"EXIF orientation {orientation} ({ORIENTATION_NAMES.get(orientation, '?')})"


def shown_size(width: int, height: int, orientation: int, rule: str = "apply") -> tuple[int, int]:
    """(width, height) of a photo stored at width x height as `rule` shows it."""
    if rule == "apply" and orientation in SWAPS_AXES:
        return height, width
    return width, height


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W[, C]) pixels as stored -> as shown: EXIF orientation applied, as Pillow's ImageOps.exif_transpose does."""
    if orientation == 2:
        out = pixels[:, ::-1]
    elif orientation == 3:
        out = pixels[::-1, ::-1]
    elif orientation == 4:
        out = pixels[::-1]
    elif orientation == 5:
        out = pixels.swapaxes(0, 1)
    elif orientation == 6:
        out = pixels.swapaxes(0, 1)[:, ::-1]
    elif orientation == 7:
        out = pixels.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        out = pixels.swapaxes(0, 1)[::-1]
    else:
        return pixels
    return np.ascontiguousarray(out)


def check_rule(rule: str) -> None:
    if rule not in EXIF_RULES:
        raise ValueError(f"Wrong data.exif_orientation `{rule}`, supported rules: {list(EXIF_RULES)}")


def read_photo(path: Path | str, rule: str = "apply") -> np.ndarray:
    """Decode a photo as RGB uint8 (H, W, 3) under `rule`; a file that cannot be decoded is an error, not a skip."""
    check_rule(rule)
    orientation = read_orientation(path) if rule != "ignore" and Path(path).is_file() else 1
    if orientation != 1 and rule == "reject":
        raise PhotoOrientationError(f"{path}: {describe(orientation)} and data.exif_orientation=reject; re-export the "
                                    "photo with the rotation applied to its pixels, or set data.exif_orientation")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}: missing or corrupt (run the validate stage)")
    return orient(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), orientation)
