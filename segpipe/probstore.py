"""Stored class probabilities: how a member's out-of-fold and test probabilities (and the ensemble's test ones)
are kept, so that what a member stores per image is bounded whatever its input size.

The rule: probabilities (N, C, h, w) are kept at `stored_size(h) = min(h, STORE_SIZE)` per side, STORE_SIZE =
256 being the submission resolution, where every OOF score is measured anyway (a member trained below 256 px
keeps its own size, so small runs do not grow), resized bilinearly (align_corners=False: what the scorer did to
them anyway) and quantised to uint8, q = round(p * 255), read back as q / 255 (error <= 1/510 per value).

    bytes per image per member = C x S x S x 1,   S = min(input size, 256)

e.g. 11 classes at any input >= 256 px: 11 x 256 x 256 = 720,896 B (704 KiB), where float16 at 512 px was
11 x 512 x 512 x 2 = 5.8 MB. Arrays are written and read rows (images) at a time, never whole:
`npy_writer`/`npz_writer` append chunks behind a header that already holds the final shape, and `Rows` reads any
rows with plain file reads, so a process holds the rows it asked for and nothing else (a memory map of the whole
file would count every page it touched in the process's resident memory).
"""

from __future__ import annotations

import os
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

STORE_SIZE = 256          # the submission resolution (DESIGN.md): every OOF figure is measured there
SCALE = 255               # uint8 levels: q = round(p * SCALE)


def stored_size(size: int) -> int:
    """The side probabilities of `size` x `size` inputs are kept at."""
    return min(int(size), STORE_SIZE)


def bytes_per_image(num_classes: int, size: int) -> int:
    """Bytes one image's stored probabilities take (the array's data, without the file's header)."""
    s = stored_size(size)
    return num_classes * s * s


def to_stored(probs: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    """Probabilities (n, C, h, w) -> (n, C, S, S) uint8 at S = stored_size(size)."""
    t = probs.float() if isinstance(probs, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(probs)).float()
    s = stored_size(size)
    if t.shape[-2:] != (s, s):
        t = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False)
    return (t * SCALE).round_().clamp_(0, SCALE).to(torch.uint8).numpy()


def dequantise(q: np.ndarray) -> np.ndarray:
    """Stored probabilities -> float32; uint8 is scaled back by 1/255, float arrays (older files) pass as they are."""
    q = np.asarray(q)
    return q.astype(np.float32) / SCALE if q.dtype == np.uint8 else q.astype(np.float32, copy=False)


class RowWriter:
    """Appends rows to an array of known shape, in .npy format, on a binary stream."""

    def __init__(self, f: IO[bytes], shape: Sequence[int], dtype=np.uint8):
        self.f, self.shape, self.dtype, self.n = f, tuple(int(s) for s in shape), np.dtype(dtype), 0
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(f, header)

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.n + len(rows) > self.shape[0]:
            raise ValueError(f"rows {rows.shape} do not fit the array {self.shape} at row {self.n}")
        self.f.write(rows.data)
        self.n += len(rows)

    def done(self) -> None:
        if self.n != self.shape[0]:
            raise ValueError(f"{self.n} rows written of the {self.shape[0]} the header announced")


@contextmanager
def npy_writer(path: Path, shape: Sequence[int], dtype=np.uint8) -> Iterator[RowWriter]:
    """Write a .npy of `shape` row chunk by row chunk; the file appears (renamed into place) only once complete."""
    path = Path(path)
    part = path.with_name(f".{path.name}.part")
    try:
        with open(part, "wb") as f:
            w = RowWriter(f, shape, dtype)
            yield w
            w.done()
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


@contextmanager
def npz_writer(path: Path, key: str, shape: Sequence[int], dtype=np.uint8, **arrays: np.ndarray
               ) -> Iterator[RowWriter]:
    """An .npz in np.savez's layout (uncompressed, one <name>.npy per array): the small `arrays` whole, then `key`
    written row chunk by row chunk. np.load(path)[key] reads it as before; `Rows(path, key)` reads rows of it."""
    path = Path(path)
    part = path.with_name(f".{path.name}.part")
    try:
        with zipfile.ZipFile(part, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, a in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                w = RowWriter(f, shape, dtype)
                yield w
                w.done()
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")     # a zip entry's local file header (APPNOTE 4.3.7)


def _npz_entry_offset(path: Path, key: str) -> int:
    """Where `key`.npy's bytes start inside an uncompressed .npz."""
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            raise KeyError(f"{path} has no array {key!r} (arrays: {[n[:-4] for n in zf.namelist()]})") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path}: {key!r} is compressed (np.savez_compressed); rows can only be read from an "
                             "uncompressed .npz: write it with np.savez or segpipe.probstore.npz_writer")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    return info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]


class Rows:
    """Rows of a stored array (N, ...) in a .npy, or in an uncompressed .npz under `key`, read on demand.

    `rows[i]`, `rows[a:b]`, `rows[indices]` and `rows.read(indices)` return arrays holding only those rows
    (consecutive indices are one read); `shape`, `dtype` and `len()` come from the header.
    """

    def __init__(self, path: Path, key: str | None = None):
        self.path = Path(path)
        start = _npz_entry_offset(self.path, key) if key is not None else 0
        with open(self.path, "rb") as f:
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or dtype.hasobject:
            raise ValueError(f"{self.path}: rows can only be read from a C-ordered array of plain numbers")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _run(self, f: IO[bytes], start: int, out: np.ndarray) -> None:
        f.seek(self.offset + start * self.row_bytes)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if f.readinto(view) != len(view):
            raise EOFError(f"{self.path} is shorter than its header says ({self.shape}): a partial or damaged file")

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, np.int64).reshape(-1)
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        if len(idx) == 0:
            return out
        if idx.min() < 0 or idx.max() >= self.shape[0]:
            raise IndexError(f"rows {idx.min()}..{idx.max()} out of range for {self.path} ({self.shape[0]} rows)")
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        with open(self.path, "rb") as f:
            for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(idx)]):
                self._run(f, int(idx[lo]), out[lo:hi])
        return out

    def __getitem__(self, item: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(item, slice):
            return self.read(np.arange(len(self))[item])
        if np.ndim(item):
            return self.read(item)
        i = int(item)
        return self.read([i + len(self) if i < 0 else i])[0]
