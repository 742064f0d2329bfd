"""Read CIFAR-10 from any of the layouts it ships in, into uint8 arrays, validating as we go.

Accepted sources:
- the official `cifar-10-python.tar.gz` (downloaded, MD5-checked and cached when none is given),
- its extracted `cifar-10-batches-py/` folder (pickled batches),
- an image-folder tree `train/<class>/*.png|jpg`, `test/<class>/*.png|jpg` (optionally under one
  top-level folder), as a folder or a .tar / .tar.gz.

Archives are streamed (never extracted to disk); images are decoded by a process pool. Every
problem raises UserError naming the file (and index) at fault.
"""
from __future__ import annotations

import ctypes
import hashlib
import io
import os
import pickle
import re
import signal
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from beton_data.errors import UserError
from beton_data.files import (atomic_path, cache_dir, check_writable, file_digest,
                              remove_stale_temporaries)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
LOSSY_EXTS = (".jpg", ".jpeg")


@dataclass
class Dataset:
    """Both splits in memory plus where they came from (for the manifest)."""
    splits: dict                      # split -> (images uint8 [N,32,32,3], labels int64 [N])
    source: str
    kind: str
    sha256: str
    lossy: bool = False
    classes: tuple = CLASSES


def _progress(*args, **kwargs):
    """A tqdm progress bar, imported when one is drawn: importing the data layer (for its
    constants or a manifest) needs nothing beyond numpy."""
    from tqdm import tqdm

    return tqdm(*args, **kwargs)


# ---- locating the source ------------------------------------------------------------------------

def download(url: str = CIFAR_URL, md5: str = CIFAR_MD5, cache: Path | None = None) -> Path:
    """The official archive from the cache, downloading it first if needed; MD5-checked."""
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / url.rsplit("/", 1)[-1]
    if not target.exists():
        check_writable(cache, "the download cache (FASTCIFAR_CACHE)")
        cache.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(cache, target.name)   # a download that was killed
        try:
            with atomic_path(target) as tmp, urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0) or None
                with _progress(total=total, unit="B", unit_scale=True, desc=f"download {target.name}") as bar:
                    for chunk in iter(lambda: r.read(1 << 20), b""):
                        f.write(chunk)
                        bar.update(len(chunk))
        except OSError as e:  # URLError, timeouts and HTTP errors are all OSErrors
            raise UserError(f"cannot download {url} ({getattr(e, 'reason', e)}); download it elsewhere and "
                            f"run `fastcifar convert --source path/to/{target.name}`") from None
    got = file_digest(target, "md5")
    if got != md5:
        raise UserError(f"{target}: MD5 {got} does not match the expected {md5}; "
                        f"delete the file and run convert again")
    return target


def load(source: str | None) -> Dataset:
    """Read a source (see module docstring); None means the official download."""
    if source is None:
        path = download()
        return _from_archive(path, source=CIFAR_URL)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; pass --source a CIFAR-10 archive or folder")
    if path.is_dir():
        return _from_folder(path)
    return _from_archive(path, source=str(path.resolve()))


# ---- reading entries ----------------------------------------------------------------------------

def _tar_entries(path: Path):
    """(name, bytes) of every regular file, streaming through the (possibly gzipped) tar."""
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                if member.isfile():
                    yield member.name, tf.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{path}: archive is truncated or corrupt ({e}); download or copy it again") from None


def _folder_entries(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            yield p.relative_to(root).as_posix(), p.read_bytes()


def _from_archive(path: Path, source: str) -> Dataset:
    with open(path, "rb") as f:
        magic = f.read(6)
    compressed = magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00"
    # A truncated .tar.gz still starts with the gzip magic; streaming it then reports the damage.
    if not (compressed or tarfile.is_tarfile(path)):
        raise UserError(f"{path}: not a .tar or .tar.gz archive; pass --source a CIFAR-10 archive, "
                        f"a cifar-10-batches-py/ folder or an image folder")
    digest = file_digest(path, "sha256")
    return _collect(_tar_entries(path), source, digest, str(path), archive=True)


def _from_folder(path: Path) -> Dataset:
    h = hashlib.sha256()

    def hashed(entries):
        # The folder's checksum covers every file's relative path and content, in sorted order.
        for name, data in entries:
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
            yield name, data

    ds = _collect(hashed(_folder_entries(path)), str(path.resolve()), None, str(path), archive=False)
    ds.sha256 = h.hexdigest()
    return ds


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _collect(entries, source: str, digest: str | None, where: str, archive: bool) -> Dataset:
    """Sort the entries of a folder or archive into pickled batches or split/class images."""
    batches: dict[str, bytes] = {}
    images: dict[str, list] = {s: [] for s in SPLITS}   # split -> [(label, sort key, name, bytes)]
    prefixes = set()
    for name, data in _progress(entries, desc=f"read {Path(where).name}", unit=" files", leave=False):
        parts = name.strip("/").split("/")
        base = parts[-1]
        if base.startswith("."):
            continue  # e.g. macOS ._ resource files
        if base in TRAIN_BATCHES or base in (TEST_BATCH, META):
            batches[base] = data
        elif base.lower().endswith(IMAGE_EXTS):
            if len(parts) < 3 or parts[-3] not in SPLITS:
                raise UserError(f"{where}: {name}: images must sit in train/<class>/ or test/<class>/")
            split, cls = parts[-3], parts[-2]
            if cls not in CLASSES:
                raise UserError(f"{where}: {name}: unknown class folder {cls!r}; expected one of "
                                f"{', '.join(CLASSES)}")
            prefixes.add("/".join(parts[:-3]))
            images[split].append((CLASSES.index(cls), _natural(base), name, data))
    n_images = sum(len(v) for v in images.values())
    if batches and n_images:
        raise UserError(f"{where}: holds both pickled CIFAR batches and image files; pass one of them")
    if batches:
        kind = "cifar-python-archive" if archive else "cifar-python-folder"
        return Dataset(_decode_batches(batches, where), source, kind, digest)
    if not n_images:
        raise UserError(f"{where}: found neither cifar-10-batches-py files nor train/<class>/*.png|jpg "
                        f"images; pass --source a CIFAR-10 archive or folder")
    if len(prefixes) > 1:
        raise UserError(f"{where}: image folders under several roots ({', '.join(sorted(prefixes))}); "
                        f"keep one train/ and one test/")
    kind = "image-folder-archive" if archive else "image-folder"
    lossy = any(e[2].lower().endswith(LOSSY_EXTS) for v in images.values() for e in v)
    return Dataset(_decode_images(images, where), source, kind, digest, lossy=lossy)


# ---- pickled batches ----------------------------------------------------------------------------

class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts without letting a pickle run anything but numpy's array
    reconstruction (pickles from an untrusted download can otherwise execute code)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # how Python 3 writes bytes into protocol-2 pickles

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        d = _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise UserError(f"{where}: cannot read the pickled batch ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a pickled dict, found {type(d).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _decode_batches(batches: dict, where: str) -> dict:
    missing = [b for b in (*TRAIN_BATCHES, TEST_BATCH) if b not in batches]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}; the cifar-10-batches-py set is incomplete")
    if META in batches:
        names = _unpickle(batches[META], f"{where}: {META}").get("label_names")
        names = tuple(n.decode() if isinstance(n, bytes) else n for n in (names or ()))
        if names and names != CLASSES:
            raise UserError(f"{where}: {META}: class names {list(names)} are not CIFAR-10's")
    splits = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
        ims, lbs = [], []
        for name in names:
            d = _unpickle(batches[name], f"{where}: {name}")
            data, labels = d.get("data"), d.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                    or data.shape[1] != 3072:
                shape = getattr(data, "shape", None)
                raise UserError(f"{where}: {name}: 'data' must be uint8 [N, 3072] (32x32 RGB), got "
                                f"{getattr(data, 'dtype', type(data).__name__)} {shape}")
            labels = np.asarray(labels if labels is not None else [], dtype=np.int64).reshape(-1)
            if len(labels) != len(data):
                raise UserError(f"{where}: {name}: {len(data)} images but {len(labels)} labels")
            bad = np.flatnonzero((labels < 0) | (labels >= len(CLASSES)))
            if len(bad):
                raise UserError(f"{where}: {name}: label {labels[bad[0]]} at index {bad[0]} is outside 0..9")
            # Batches store each image as 3 planes (R, G, B) of 32x32: CHW -> HWC.
            ims.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            lbs.append(labels)
        images = np.ascontiguousarray(np.concatenate(ims))
        if len(images) == 0:
            raise UserError(f"{where}: the {split} split is empty")
        splits[split] = (images, np.concatenate(lbs))
    return splits


# ---- image files --------------------------------------------------------------------------------

def decode_chunk(chunk):
    """Decode [(name, bytes)] to uint8 [k,32,32,3]; returns (array, None) or (None, error)."""
    from PIL import Image
    out = np.empty((len(chunk), 32, 32, 3), dtype=np.uint8)
    for i, (name, data) in enumerate(chunk):
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.size != (32, 32) or im.mode != "RGB":
                    return None, f"{name}: image is {im.size[0]}x{im.size[1]} {im.mode}, expected 32x32 RGB"
                out[i] = np.asarray(im)
        except Exception as e:  # PIL raises many types for broken files
            return None, f"{name}: cannot decode image ({type(e).__name__}: {e})"
    return out, None


DECODE_CHUNK = 1000       # images per task sent to a decoding process
POOL_MIN_IMAGES = 4000    # below this, forking a pool costs more than it saves


def _decode_images(images: dict, where: str) -> dict:
    splits = {}
    chunk_size = DECODE_CHUNK
    n_total = sum(len(v) for v in images.values())
    workers = min(len(os.sched_getaffinity(0)), 8)
    pool = None
    if n_total >= POOL_MIN_IMAGES:
        pool = get_context("fork").Pool(max(workers, 2), initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        with _progress(total=n_total, desc="decode images", unit=" img") as bar:
            for split in SPLITS:
                entries = sorted(images[split], key=lambda e: (e[0], e[1]))
                if not entries:
                    raise UserError(f"{where}: the {split} split is empty (no {split}/<class>/*.png|jpg)")
                pairs = [(e[2], e[3]) for e in entries]
                chunks = [pairs[i:i + chunk_size] for i in range(0, len(pairs), chunk_size)]
                results = pool.imap(decode_chunk, chunks) if pool else map(decode_chunk, chunks)
                arrays = []
                for arr, err in results:
                    if err:
                        raise UserError(f"{where}: {err}")
                    arrays.append(arr)
                    bar.update(len(arr))
                labels = np.array([e[0] for e in entries], dtype=np.int64)
                splits[split] = (np.concatenate(arrays), labels)
    finally:
        if pool:
            pool.terminate()
    return splits


def _die_with_parent(parent_pid: int) -> None:
    """Decoding-process initializer: ask the kernel to SIGKILL this process when its parent
    dies. Without it, a convert killed with SIGKILL leaves its pool's processes waiting for
    work forever (nothing closes the pipe they read). Linux only; elsewhere a no-op."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    PR_SET_PDEATHSIG = 1
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:   # the parent died before the request took effect
        os._exit(1)
