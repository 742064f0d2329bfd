"""The on-disk layout of fastcifar's .beton files, in both directions: writing one, and checking
that a file on disk has exactly that layout before anything reads it.

A .beton is FFCV's format (version 2, as ffcv/writer.py and ffcv/reader.py define it). For
fastcifar's two fields, `image` (RGBImageField, raw 32x32 RGB) and `label` (IntField), it is:

    header              24 bytes: version, num_fields, page_size, num_samples, alloc_table_ptr
    field descriptors   num_fields x 1,041 bytes: type id, name, (unused) arguments
    metadata            num_samples x 24 bytes: image mode/width/height/data_ptr, then the label
    zeros               up to the next multiple of page_size
    pages               whole pages of page_size bytes; each holds as many 3,072-byte images as
                        fit, back to back, then zeros (an image never spans two pages)
    allocation table    num_samples x 24 bytes: (sample id, data_ptr, size) per image

Everything after the header is determined by the header, so the exact file size is known from
its first 24 bytes: a file cut anywhere is caught by comparing sizes, before any page is read.

The dtypes are spelled out here rather than imported from ffcv (importing ffcv takes seconds and
pulls in numba, OpenCV and torch); tests/test_data_integrity.py checks them against ffcv.types
and checks that `write` produces the same bytes as FFCV's own DatasetWriter.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

VERSION = 2                       # ffcv.types.CURRENT_VERSION
IMAGE_SHAPE = (32, 32, 3)
IMAGE_BYTES = 32 * 32 * 3
PAGE_SIZE = 1 << 21               # ffcv.writer.MIN_PAGE_SIZE: small test files stay small
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 1 << 21, 1 << 32
RAW_MODE = 1                      # ffcv.fields.rgb_image.IMAGE_MODES['raw']
TYPE_INT, TYPE_RGB_IMAGE = 1, 2   # ffcv.types.TYPE_ID_HANDLER: IntField, RGBImageField
FIELDS = (("image", TYPE_RGB_IMAGE), ("label", TYPE_INT))   # fastcifar's fields, in file order

HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                   ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                      align=True)
ALLOC_ENTRY = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
LABEL_META = np.dtype("<i8")
METADATA = np.dtype([("f0", IMAGE_META), ("f1", LABEL_META)], align=True)   # one per sample

MAX_LABEL = (1 << 31) - 1         # labels index a class table; anything larger is damage


class LayoutError(Exception):
    """The file is not a .beton of the layout above; the message says what is wrong."""


@dataclass(frozen=True)
class Layout:
    """Where everything is in one .beton, from its header."""
    num_samples: int
    page_size: int
    metadata_start: int
    data_start: int
    alloc_table_ptr: int

    @property
    def file_size(self) -> int:
        return self.alloc_table_ptr + self.num_samples * ALLOC_ENTRY.itemsize

    @property
    def per_page(self) -> int:
        return self.page_size // IMAGE_BYTES

    @classmethod
    def plan(cls, num_samples: int, page_size: int = PAGE_SIZE) -> "Layout":
        """The layout `write` gives num_samples images."""
        metadata_start = HEADER.itemsize + len(FIELDS) * FIELD_DESC.itemsize
        data_start = _align(metadata_start + num_samples * METADATA.itemsize, page_size)
        pages = -(-num_samples // (page_size // IMAGE_BYTES))
        return cls(num_samples, page_size, metadata_start, data_start, data_start + pages * page_size)


def _align(ptr: int, page_size: int) -> int:
    return -(-ptr // page_size) * page_size


# ---- writing ------------------------------------------------------------------------------------

def write(f: BinaryIO, images: np.ndarray, labels: np.ndarray, page_size: int = PAGE_SIZE) -> None:
    """Write uint8 [N,32,32,3] images and int labels as a .beton into the open file `f`.

    One process, sequential, deterministic: image i sits in page i // per_page at slot
    i % per_page, exactly where FFCV's DatasetWriter with one worker puts it. (With several
    workers FFCV's placement depends on their timing, so the same images would give different
    bytes and checksums from run to run; and its worker processes outlive a killed parent.)"""
    n = len(labels)
    lay = Layout.plan(n, page_size)
    index = np.arange(n, dtype=np.uint64)
    ptr = lay.data_start + (index // lay.per_page) * page_size + (index % lay.per_page) * IMAGE_BYTES

    header = np.zeros((), HEADER)
    header["version"], header["num_fields"], header["page_size"] = VERSION, len(FIELDS), page_size
    header["num_samples"], header["alloc_table_ptr"] = n, lay.alloc_table_ptr
    descriptors = np.zeros(len(FIELDS), FIELD_DESC)
    for d, (name, type_id) in zip(descriptors, FIELDS):
        d["type_id"] = type_id
        d["name"][:len(name)] = np.frombuffer(name.encode("ascii"), np.uint8)
    meta = np.zeros(n, METADATA)
    meta["f0"]["mode"], meta["f0"]["width"], meta["f0"]["height"] = RAW_MODE, 32, 32
    meta["f0"]["data_ptr"] = ptr
    meta["f1"] = labels
    table = np.zeros(n, ALLOC_ENTRY)
    table["sample_id"], table["ptr"], table["size"] = index, ptr, IMAGE_BYTES

    f.write(header.tobytes())
    f.write(descriptors.tobytes())
    f.write(meta.tobytes())
    f.write(bytes(lay.data_start - lay.metadata_start - meta.nbytes))
    flat = np.ascontiguousarray(images).reshape(n, IMAGE_BYTES)
    for a in range(0, n, lay.per_page):
        block = flat[a:a + lay.per_page]
        f.write(block.tobytes())
        f.write(bytes(page_size - block.nbytes))
    f.write(table.tobytes())


# ---- checking -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Contents:
    """A checked file's layout, labels (int64 [N]) and image offsets (int64 [N])."""
    layout: Layout
    labels: np.ndarray
    data_ptr: np.ndarray


def read_layout(path: str | Path) -> Contents:
    """Check that `path` is a complete .beton of the layout above, reading its header, field
    descriptors, metadata and allocation table (about 50 bytes per image, never the pixels);
    LayoutError says what is wrong. Passes for files written by `write` and for files FFCV's
    DatasetWriter wrote with these two fields and any number of workers."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        lay = _check_header(f, size)
        meta = _read(f, lay.metadata_start, lay.num_samples, METADATA, "metadata")
        table = _read(f, lay.alloc_table_ptr, lay.num_samples, ALLOC_ENTRY, "allocation table")
    image, labels = meta["f0"], meta["f1"].astype(np.int64)
    if np.any(image["mode"] != RAW_MODE) or np.any(image["width"] != 32) or np.any(image["height"] != 32):
        raise LayoutError("its images are not all raw 32x32 RGB")
    ptr = image["data_ptr"].astype(np.int64)
    in_page = (ptr - lay.data_start) % lay.page_size
    if (np.any(ptr < lay.data_start) or np.any(ptr + IMAGE_BYTES > lay.alloc_table_ptr)
            or np.any(in_page + IMAGE_BYTES > lay.page_size)):
        raise LayoutError("an image offset in its metadata points outside its pages")
    # The allocation table (what FFCV's own loader follows) must describe the same images.
    ids = table["sample_id"]
    order = np.argsort(ids, kind="stable")
    if (not np.array_equal(ids[order], np.arange(lay.num_samples, dtype=ids.dtype))
            or not np.array_equal(table["ptr"][order].astype(np.int64), ptr)
            or np.any(table["size"] != IMAGE_BYTES)):
        raise LayoutError("its allocation table does not match its metadata")
    bad = np.flatnonzero((labels < 0) | (labels > MAX_LABEL))
    if len(bad):
        raise LayoutError(f"label {labels[bad[0]]} of sample {bad[0]} is not a class index")
    return Contents(lay, labels, ptr)


def _check_header(f: BinaryIO, size: int) -> Layout:
    if size < HEADER.itemsize:
        raise LayoutError(f"{size} bytes, shorter than a .beton header ({HEADER.itemsize} bytes)")
    h = np.frombuffer(f.read(HEADER.itemsize), HEADER)[0]
    if int(h["version"]) != VERSION:
        raise LayoutError(f"not an FFCV .beton (format version {int(h['version'])}, expected {VERSION})")
    if not 1 <= int(h["num_fields"]) <= 64:
        raise LayoutError(f"its header is damaged ({int(h['num_fields'])} fields)")
    fields = _read(f, HEADER.itemsize, int(h["num_fields"]), FIELD_DESC, "field descriptors")
    found = [(bytes(d["name"]).split(b"\0")[0].decode("ascii", "replace"), int(d["type_id"])) for d in fields]
    if tuple(found) != FIELDS:
        names = ", ".join(n for n, _ in found) or "none"
        raise LayoutError(f"its fields are {names}, not image (RGB) and label (int) as `fastcifar convert` writes")
    page_size, n = int(h["page_size"]), int(h["num_samples"])
    if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size < MAX_PAGE_SIZE:
        raise LayoutError(f"its header's page size {page_size} is not one FFCV writes")
    if n < 1:
        raise LayoutError("it holds no samples")
    metadata_start = HEADER.itemsize + len(fields) * FIELD_DESC.itemsize
    data_start = _align(metadata_start + n * METADATA.itemsize, page_size)
    lay = Layout(n, page_size, metadata_start, data_start, int(h["alloc_table_ptr"]))
    if lay.alloc_table_ptr < data_start or (lay.alloc_table_ptr - data_start) % page_size:
        raise LayoutError("its header's allocation-table offset is not at the end of a page")
    if size != lay.file_size:
        if size < lay.file_size:
            raise LayoutError(f"truncated: {size:,} bytes where its header says {lay.file_size:,}")
        raise LayoutError(f"{size - lay.file_size:,} unexpected bytes after its end ({lay.file_size:,} bytes)")
    return lay


def _read(f: BinaryIO, offset: int, count: int, dtype: np.dtype, what: str) -> np.ndarray:
    f.seek(offset)
    data = f.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise LayoutError(f"truncated in its {what}")
    return np.frombuffer(data, dtype)
