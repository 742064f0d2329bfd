"""Write and read the two-field FFCV .beton files fastcifar uses: `image` (raw RGB) and `label` (int).

Writing lays the file out in this process (layout.write): the bytes are those FFCV's own
DatasetWriter produces with one worker, so `ffcv.loader.Loader` reads them, but no worker
process is forked (FFCV's outlive a killed parent), and the same images always give the same
bytes. Reading skips FFCV's JIT pipeline entirely: with raw images every image is 3,072
contiguous bytes at the `data_ptr` its metadata records, so the whole split is copied out of a
memory map in a few large slices (used by the GPU-resident loader, `inspect` and the tests).
Both refuse damaged files first (integrity.check_beton).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from beton_data import layout as F
from beton_data.files import atomic_path, remove_stale_temporaries
from beton_data.integrity import check_beton

IMAGE_SHAPE = F.IMAGE_SHAPE
IMAGE_BYTES = F.IMAGE_BYTES


def write_beton(path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write images (uint8 [N,32,32,3] RGB) and labels (int [N]) to an FFCV .beton at `path`.

    Atomic: the file is written under a temporary name in the same folder, then renamed, so
    `path` either keeps its previous content or holds the complete new file.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"images must be uint8 [N,32,32,3], got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers [N={len(images)}], got {labels.dtype} {list(labels.shape)}")
    if len(images) == 0:
        raise ValueError("cannot write an empty .beton")
    if labels.min() < 0 or labels.max() > F.MAX_LABEL:
        raise ValueError(f"labels must be class indices 0..{F.MAX_LABEL}, got {labels.min()}..{labels.max()}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)   # left by a writer that was killed
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        F.write(f, images, labels.astype(np.int64))
    return path


def read_beton(path, verify: bool | None = False, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,32,32,3], labels int64 [N]) from a .beton written by write_beton
    (or FFCV's DatasetWriter with the same fields). UserError if it is missing, damaged or
    foreign; `verify` as in integrity.check_beton (True: also compare its SHA-256 with the
    manifest's). `limit`: only the first `limit` samples are read."""
    checked = check_beton(path, verify=verify)
    ptr, labels = checked.contents.data_ptr[:limit], checked.contents.labels[:limit]
    data = np.memmap(path, dtype=np.uint8, mode="r")
    # Samples written one after another sit back to back inside a page: copy each such run as one
    # block instead of 3,072-byte pieces.
    order = np.argsort(ptr, kind="stable")
    sorted_ptr = ptr[order]
    breaks = np.flatnonzero(np.diff(sorted_ptr) != IMAGE_BYTES) + 1
    images = np.empty((len(ptr), *IMAGE_SHAPE), dtype=np.uint8)
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(ptr)]):
        start = sorted_ptr[a]
        block = data[start:start + (b - a) * IMAGE_BYTES]
        images[order[a:b]] = block.reshape(b - a, *IMAGE_SHAPE)
    del data
    return images, labels
