"""Write and read the two-field FFCV .beton files fastcifar uses: `image` (raw RGB) and `label` (int).

Writing goes through FFCV's own DatasetWriter so the files are exactly what `ffcv.loader.Loader`
expects. Reading skips FFCV's JIT pipeline entirely: with write_mode='raw' every image is 3,072
contiguous bytes at the `data_ptr` its metadata records, so the whole split can be copied out of a
memory map in a few large slices (used by the GPU-resident loader, `inspect` and the tests).
"""
from __future__ import annotations

import contextlib
import os
from functools import partial
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (32, 32, 3)
IMAGE_BYTES = 32 * 32 * 3


class _ArrayDataset:
    """The indexable dataset FFCV's writer pulls (image, label) samples from."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


@contextlib.contextmanager
def _quiet_ffcv_writer(quiet: bool):
    # DatasetWriter always draws its own tqdm bar; there is no option to turn it off, so the
    # module's tqdm is swapped for a disabled one while we write.
    import beton_data._ffcv  # noqa: F401  (keeps torch's thread count)
    import ffcv.writer
    if not quiet:
        yield
        return
    original = ffcv.writer.tqdm
    ffcv.writer.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        ffcv.writer.tqdm = original


def write_beton(path, images: np.ndarray, labels: np.ndarray, progress: bool = False) -> Path:
    """Write images (uint8 [N,32,32,3] RGB) and labels (int [N]) to an FFCV .beton at `path`.

    Atomic: the file is written under a temporary name in the same folder, then renamed, so
    `path` either keeps its previous content or holds the complete new file.
    """
    import beton_data._ffcv  # noqa: F401  (keeps torch's thread count)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"images must be uint8 [N,32,32,3], got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers [N={len(images)}], got {labels.dtype} {list(labels.shape)}")
    if len(images) == 0:
        raise ValueError("cannot write an empty .beton")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    # 2 MiB pages (FFCV's minimum) keep tiny test files small; a 32x32 image never spans pages.
    # Few samples are not worth forking writer processes for.
    workers = 1 if len(images) < 4096 else min(8, os.cpu_count() or 1)
    try:
        writer = DatasetWriter(str(tmp), fields, page_size=MIN_PAGE_SIZE, num_workers=workers)
        with _quiet_ffcv_writer(not progress):
            writer.from_indexed_dataset(_ArrayDataset(np.ascontiguousarray(images), labels.astype(np.int64)),
                                        chunksize=1000)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_beton(path) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,32,32,3], labels int64 [N]) from a .beton written by write_beton."""
    import beton_data._ffcv  # noqa: F401  (keeps torch's thread count)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    from beton_data.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such .beton file; create it with `fastcifar convert`")
    try:
        reader = Reader(str(path))
    except Exception as e:  # FFCV raises assorted errors on foreign or truncated files
        raise UserError(f"{path}: not a readable FFCV .beton ({type(e).__name__}: {e})") from None
    handlers = reader.handlers
    if not (isinstance(handlers.get("image"), RGBImageField) and isinstance(handlers.get("label"), IntField)):
        raise UserError(f"{path}: expected fields image (RGBImageField) and label (IntField), "
                        f"found {reader.field_names}; re-create it with `fastcifar convert`")
    names = reader.field_names
    meta_image = reader.metadata[f"f{names.index('image')}"]
    labels = np.array(reader.metadata[f"f{names.index('label')}"], dtype=np.int64)

    if not (np.all(meta_image["mode"] == 1) and np.all(meta_image["width"] == 32)
            and np.all(meta_image["height"] == 32)):
        raise UserError(f"{path}: images must be raw 32x32 RGB; re-create it with `fastcifar convert`")

    data = np.memmap(path, dtype=np.uint8, mode="r")
    ptr = meta_image["data_ptr"].astype(np.int64)
    if len(ptr) and int(ptr.max()) + IMAGE_BYTES > len(data):
        raise UserError(f"{path}: file is truncated; re-create it with `fastcifar convert`")

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
