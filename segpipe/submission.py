"""Competition submission CSV: writer, strict linter and reader (format in DESIGN.md "Submission format")."""

from __future__ import annotations

import hashlib
import os
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

HEADER = "image_id,PredictionString"
SIZE = 256                     # the competition scores 256x256 masks
PIXELS = SIZE * SIZE           # 65,536 class ids per row
MAX_CLASSES = 256              # masks are uint8 on the wire and in the hidden labels


class SubmissionError(ValueError):
    """Masks or file names cannot be written as a submission."""


class SubmissionLintError(SubmissionError):
    """A submission file breaks the format; the message names the line, the image_id and the problem."""

    def __init__(self, message: str, *, line: int | None = None, image_id: str | None = None):
        where = ""
        if line is not None:
            where = f"line {line}" + (f" (image_id {image_id!r})" if image_id is not None else "") + ": "
        super().__init__(where + message)
        self.line, self.image_id = line, image_id


@dataclass(frozen=True)
class LintReport:
    """What the linter saw in a valid file."""

    path: str
    n_rows: int
    num_classes: int
    size_bytes: int
    sha256: str
    in_order: bool                            # rows follow the expected (test.json) order
    class_pixels: dict[int, int] = field(default_factory=dict)   # class id -> predicted pixel count


def resize_nearest(masks: np.ndarray, size: int = SIZE) -> np.ndarray:
    """(N, H, W) -> (N, size, size) nearest: source index floor(i * H / size), as cv2.INTER_NEAREST."""
    n, h, w = masks.shape
    if (h, w) == (size, size):
        return masks
    rows = (np.arange(size) * h) // size
    cols = (np.arange(size) * w) // size
    return masks[:, rows[:, None], cols[None, :]]


def csv_name_problem(name: str) -> str:
    """Why `name` cannot be a submission image_id (the CSV's unquoted first column), or "".

    The one rule for both validation (which names a test image whose file name breaks it, before any work) and the
    writer. Rows are split on commas and line breaks with no quoting, and the file is UTF-8: a non-UTF-8 file name
    (Python holds its bytes as lone surrogates) cannot be written at all.
    """
    if not isinstance(name, str) or not name:
        return "it is empty"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8 (the file system holds bytes that UTF-8 text cannot carry)"
    for ch, what in ((",", "a comma"), ('"', "a double quote")):
        if ch in name:
            return f"it holds {what}"
    # Cc: control characters (newline, carriage return, tab, NUL, ...); Zl/Zp: the Unicode line and paragraph
    # separators, which text readers (str.splitlines among them) treat as line breaks too
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        return f"it holds the control character {bad!r}"
    if name != name.strip():
        return "it has leading or trailing spaces"
    return ""


def _check_ids(file_names: Sequence[str]) -> list[str]:
    names = [str(n) for n in file_names]
    for i, n in enumerate(names):
        why = csv_name_problem(n)
        if why:
            raise SubmissionError(
                f"file name #{i} {n!r} cannot be a CSV image_id: {why}; it must be non-empty UTF-8, without commas, "
                "quotes, control characters (newlines) or surrounding spaces"
            )
    dupes = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if dupes:
        raise SubmissionError(f"duplicate file names in the test index: {dupes[:10]}")
    return names


def _token_table(max_value: int) -> np.ndarray:
    """(max_value + 1, width + 1) uint8: each id's ASCII digits and a trailing space, zero-padded."""
    width = len(str(max_value))
    table = np.zeros((max_value + 1, width + 1), dtype=np.uint8)
    for v in range(max_value + 1):
        token = f"{v} ".encode()
        table[v, : len(token)] = np.frombuffer(token, dtype=np.uint8)
    return table


def write_submission(path: Path | str, file_names: Sequence[str], masks: np.ndarray) -> Path:
    """Write masks (N, H, W) of class ids as the submission CSV at `path`, rows in `file_names` order.

    Each mask is resized to 256x256 (nearest) and flattened row-major. The file appears atomically
    (temp file + os.replace), so a reader never sees half a submission.
    """
    path = Path(path)
    names = _check_ids(file_names)
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise SubmissionError(f"masks must be (N, H, W) argmax class ids, got shape {masks.shape}")
    if len(names) != len(masks):
        raise SubmissionError(f"{len(names)} file names but {len(masks)} masks; they must pair up in test order")
    if not np.issubdtype(masks.dtype, np.integer):
        raise SubmissionError(f"masks must hold integer class ids (argmax), got dtype {masks.dtype}")
    if masks.size and (int(masks.min()) < 0 or int(masks.max()) >= MAX_CLASSES):
        raise SubmissionError(f"class ids must be in [0, {MAX_CLASSES}), got [{masks.min()}, {masks.max()}]")
    table = _token_table(int(masks.max()) if masks.size else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(HEADER.encode() + b"\n")
            for name, mask in zip(names, masks):
                small = resize_nearest(mask[None])[0]
                # one table lookup per image, then drop the zero padding: no per-pixel Python
                row = np.take(table, small.reshape(-1), axis=0).reshape(-1)
                if table.shape[1] > 2:             # multi-digit ids: drop the padding of the shorter ones
                    row = row[row != 0]
                row[-1] = ord("\n")            # the last separator becomes the line end
                f.write(name.encode() + b",")
                f.write(row.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def size_bounds(file_names: Sequence[str], num_classes: int) -> tuple[int, int]:
    """(min, max) bytes of a valid file: one-digit ids and LF at least; widest ids and CRLF at most."""
    width = len(str(max(num_classes - 1, 0)))
    ids = sum(len(str(n).encode()) + 1 for n in file_names)          # image_id + comma
    lo = len(HEADER) + 1 + ids + len(file_names) * (2 * PIXELS)
    hi = len(HEADER) + 2 + ids + len(file_names) * ((width + 1) * PIXELS + 1)
    return lo, hi


_DIGIT = np.zeros(256, dtype=bool)
_DIGIT[ord("0"): ord("9") + 1] = True
_SPACE = ord(" ")


def _parse_row(pred: bytes, line: int, image_id: str, num_classes: int) -> np.ndarray:
    """Class ids (65536,) of one PredictionString; strict: digits separated by single spaces."""
    if not pred.strip():
        raise SubmissionLintError("empty PredictionString", line=line, image_id=image_id)
    raw = np.frombuffer(pred, dtype=np.uint8)
    space = raw == _SPACE
    bad = ~(_DIGIT[raw] | space)
    if bad.any() or space[0] or space[-1] or (space[1:] & space[:-1]).any():
        tokens = pred.decode(errors="replace").split(" ")
        for k, t in enumerate(tokens):
            if not t.isdigit() or not t.isascii():
                what = "an empty token (double, leading or trailing space)" if t == "" else f"token {t[:20]!r}"
                raise SubmissionLintError(
                    f"{what} at position {k}: ids must be non-negative integers separated by single spaces "
                    "(no NaN, signs, decimals, tabs or commas)", line=line, image_id=image_id)
        raise SubmissionLintError("malformed PredictionString", line=line, image_id=image_id)
    n = int(space.sum()) + 1
    if n != PIXELS:
        raise SubmissionLintError(
            f"{n} class ids, expected exactly {PIXELS} (a 256x256 mask flattened row-major)",
            line=line, image_id=image_id)
    # validated above: only digits and single spaces, so the fast text parser cannot stop early
    values = np.fromstring(pred, dtype=np.int64, sep=" ")
    if len(values) != PIXELS:
        raise SubmissionLintError(f"parsed {len(values)} ids, expected {PIXELS}", line=line, image_id=image_id)
    too_big = np.flatnonzero(values >= num_classes)
    if too_big.size:
        k = int(too_big[0])
        raise SubmissionLintError(
            f"class id {values[k]} at position {k} (row {k // SIZE}, col {k % SIZE}) is outside "
            f"[0, {num_classes}); {too_big.size} ids out of range in this row", line=line, image_id=image_id)
    return values.astype(np.uint8)


def _scan(path: Path, expected: Sequence[str] | None, num_classes: int, keep: bool):
    path = Path(path)
    if not path.is_file():
        raise SubmissionLintError(f"{path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise SubmissionLintError(f"{path} is empty; it needs the header {HEADER!r} and one row per test image")
    if expected is not None:
        expected = [str(n) for n in expected]
        lo, hi = size_bounds(expected, num_classes)
        # only an oversized file fails before parsing (never read gigabytes); a short one fails on its bad row
        if size > hi:
            raise SubmissionLintError(
                f"{path} is {size:,} bytes; a valid file for {len(expected)} images and {num_classes} classes "
                f"is between {lo:,} and {hi:,} bytes")
    want = set(expected) if expected is not None else None
    digest = hashlib.sha256()
    names: list[str] = []
    seen: dict[str, int] = {}
    masks: list[np.ndarray] = []
    counts = np.zeros(MAX_CLASSES, dtype=np.int64)
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            digest.update(line)
            line = line.rstrip(b"\n").rstrip(b"\r")
            if line_no == 1:
                if line != HEADER.encode():
                    raise SubmissionLintError(
                        f"header must be exactly {HEADER!r}, got {line[:80].decode(errors='replace')!r}", line=1)
                continue
            if not line.strip():
                raise SubmissionLintError("empty line; every row must be `image_id,PredictionString`", line=line_no)
            image_id_b, comma, pred = line.partition(b",")
            image_id = image_id_b.decode(errors="replace")
            if not comma:
                raise SubmissionLintError("no comma: a row must be `image_id,PredictionString`",
                                          line=line_no, image_id=image_id[:80])
            if image_id in seen:
                raise SubmissionLintError(f"duplicate image_id (first on line {seen[image_id]})",
                                          line=line_no, image_id=image_id)
            if want is not None and image_id not in want:
                raise SubmissionLintError("image_id is not in the test set", line=line_no, image_id=image_id)
            values = _parse_row(pred, line_no, image_id, num_classes)
            counts += np.bincount(values, minlength=MAX_CLASSES)
            seen[image_id] = line_no
            names.append(image_id)
            if keep:
                masks.append(values.reshape(SIZE, SIZE))
    if want is not None:
        missing = [n for n in expected if n not in seen]
        if missing:
            raise SubmissionLintError(
                f"{len(missing)} test image(s) have no row: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
    report = LintReport(
        path=str(path), n_rows=len(names), num_classes=num_classes, size_bytes=size, sha256=digest.hexdigest(),
        in_order=expected is None or names == list(expected),
        class_pixels={int(c): int(counts[c]) for c in np.flatnonzero(counts)},
    )
    stacked = np.stack(masks) if masks else np.zeros((0, SIZE, SIZE), dtype=np.uint8)
    return report, names, stacked


def lint_submission(path: Path | str, expected_file_names: Sequence[str], num_classes: int) -> LintReport:
    """Check a submission against the test set; raise SubmissionLintError naming the first bad row."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")
    return _scan(Path(path), expected_file_names, num_classes, keep=False)[0]


def read_submission(
    path: Path | str, *, expected_file_names: Sequence[str] | None = None, num_classes: int = MAX_CLASSES
) -> tuple[list[str], np.ndarray]:
    """Parse a submission into (file_names, masks (N, 256, 256) uint8) in file order, linting as it reads."""
    _, names, masks = _scan(Path(path), expected_file_names, num_classes, keep=True)
    return names, masks


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (the submission's identity for idempotent submits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
