"""Refuse damaged or foreign data before anything reads it.

Every reader of a .beton (`read_beton`, both loaders, and through them `inspect`, `eval`,
training and the baseline export) first calls `check_beton`, which costs about 50 bytes read per
image and never touches the pixels:

- structure: the file has exactly the layout its header describes (layout.read_layout): a file
  cut anywhere, a header, metadata or allocation table that does not add up, a file of other
  fields or no .beton at all, is refused;
- size: where a manifest lies beside it, the size convert recorded;
- checksum, when asked: the SHA-256 convert recorded. Hashing CIFAR-10's 180 MB takes about a
  second, so training asks for it once per new file (`check_data`, verify=None): digests are
  cached under `files.cache_dir()` by path, size, mtime and ctime, which works when the data
  folder is read-only. `fastcifar inspect --verify` always hashes afresh.

Every refusal is one UserError line naming the file, what is wrong and what to do.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from beton_data.errors import UserError
from beton_data.files import atomic_write_json, cache_dir, file_digest
from beton_data.layout import Contents, LayoutError, read_layout
from beton_data.manifest import FileRecord, Manifest, class_names, identity_of, read_manifest
from beton_data.sources import CIFAR_URL

DEFAULT_DATA_DIR = Path("beton_data/cifar10")     # where `fastcifar convert` writes by default
SPLITS = ("train", "test")
DIGEST_CACHE = "beton_sha256.json"
DIGEST_CACHE_ENTRIES = 256


class DamagedData(UserError):
    """A .beton that fails its check: `path`, what is wrong (`problem`), and the message."""

    def __init__(self, path: Path, problem: str, remedy: str):
        super().__init__(f"{path}: {problem}; {remedy}")
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class CheckedBeton:
    path: Path
    contents: Contents            # layout, labels and image offsets
    manifest: Manifest | None     # the manifest beside the file, if any
    record: FileRecord | None     # that manifest's record of this file, if any
    sha256: str | None            # the file's SHA-256 when this check computed or looked it up

    @property
    def num_samples(self) -> int:
        return self.contents.layout.num_samples


def check_beton(path: str | Path, verify: bool | None = False, say=None) -> CheckedBeton:
    """Check one .beton (see the module docstring); UserError if it is missing or damaged.

    verify: False = structure and size only; None = also the SHA-256, looked up in the digest
    cache or computed once; True = also the SHA-256, computed now. A file with no manifest
    record has no SHA-256 to compare with: its digest is still returned (for `check_data`'s
    identity). `say`, if given, is told before a file is hashed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such .beton file; create it with `fastcifar convert`")
    manifest = read_manifest(path.parent)
    record = manifest.record(path.name) if manifest is not None else None
    remedy = _remedy(manifest if record is not None else None)
    try:
        contents = read_layout(path)
    except LayoutError as e:
        raise DamagedData(path, str(e), remedy) from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    if record is not None and record.size is not None and contents.layout.file_size != record.size:
        raise DamagedData(path, f"{contents.layout.file_size:,} bytes, but {manifest.path.name} records "
                                f"{record.size:,}", remedy)
    classes = manifest.classes if record is not None else None
    if classes and int(contents.labels.max()) >= len(classes):
        raise DamagedData(path, f"label {int(contents.labels.max())}, but {manifest.path.name} lists "
                                f"{len(classes)} classes", remedy)
    sha = None
    if verify is not False:
        sha = file_sha256(path, refresh=verify is True, say=say)
        if record is not None and record.sha256 is not None and sha != record.sha256:
            raise DamagedData(path, f"its contents do not match the SHA-256 {manifest.path.name} records "
                                    f"(damaged or changed since conversion)", remedy)
    return CheckedBeton(path, contents, manifest, record, sha)


def _remedy(manifest: Manifest | None) -> str:
    if manifest is None:
        return "re-create it with `fastcifar convert`, or pass a .beton that convert wrote"
    source = "" if manifest.source in (None, CIFAR_URL) else f" --source {manifest.source}"
    return f"convert it again with `fastcifar convert{source} --out {manifest.folder}`"


# ---- a whole data folder ------------------------------------------------------------------------

@dataclass(frozen=True)
class DataFiles:
    """A checked data folder: what training, evaluation and results need to know about it."""
    folder: Path
    paths: dict                   # split -> Path of its .beton
    num_samples: dict             # split -> images
    manifest: Manifest | None
    identity: str | None          # SHA-256 over the files' SHA-256s (manifest.identity_of)
    classes: tuple                # class names by label: the manifest's, else one per label seen

    @property
    def name(self) -> str:
        """A short display name (manifest.Manifest.display_name, or the folder's name)."""
        return self.manifest.display_name if self.manifest is not None else f"{self.folder.name} (no manifest)"


def check_data(folder: str | Path | None = None, verify: bool | None = None,
               splits: tuple = SPLITS, say=print) -> DataFiles:
    """Check the data folder `folder` (default DEFAULT_DATA_DIR) before training or evaluating
    on it: each split's .beton must exist and pass `check_beton` with `verify` (default None:
    SHA-256 once per new file, cached). UserError otherwise, telling how to make the data."""
    folder = Path(folder) if folder is not None else DEFAULT_DATA_DIR
    for split in splits:
        path = folder / f"{split}.beton"
        if not path.is_file():
            raise UserError(f"no {path}; run `fastcifar convert` first "
                            f"(or pass --data DIR with train.beton and test.beton)")
    checked = {split: check_beton(folder / f"{split}.beton", verify=verify, say=say) for split in splits}
    manifest = read_manifest(folder)
    if manifest is not None:
        for split, c in checked.items():
            info = manifest.splits.get(split)
            count = info.get("count") if isinstance(info, dict) else None
            if c.record is not None and count is not None and count != c.num_samples:
                raise DamagedData(c.path, f"{c.num_samples:,} images, but {manifest.path.name} records "
                                          f"{count:,}", _remedy(manifest))
    digests = {split: c.sha256 or (c.record.sha256 if c.record else None) for split, c in checked.items()}
    if manifest is not None and manifest.classes:
        classes = tuple(manifest.classes)
    else:   # no list of names: as many classes as the highest label says, named by class_names
        n = max(int(c.contents.labels.max()) + 1 for c in checked.values() if c.num_samples)
        classes = tuple(class_names(None, n))
    return DataFiles(folder=folder, paths={s: c.path for s, c in checked.items()},
                     num_samples={s: c.num_samples for s, c in checked.items()},
                     manifest=manifest, identity=identity_of(digests), classes=classes)


# ---- the digest cache ---------------------------------------------------------------------------

def _stamp(st: os.stat_result) -> list:
    # ctime as well as mtime: a rewrite that restores the old mtime (cp -p, touch -d) still
    # changes ctime, which nothing short of the clock can set back.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _cache_file() -> Path:
    return cache_dir() / DIGEST_CACHE


def _load_cache() -> dict:
    try:
        d = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}                 # none yet, or unreadable: it only saves time, so start afresh
    return d if isinstance(d, dict) else {}


def file_sha256(path: str | Path, refresh: bool = False, say=None) -> str:
    """SHA-256 of `path`, from the digest cache when the file is unchanged since it was
    hashed (same size, mtime and ctime), else computed and remembered. refresh: always compute."""
    path = Path(path)
    key = os.path.realpath(path)
    stamp = _stamp(os.stat(path))
    entry = _load_cache().get(key)
    if not refresh and isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("sha256"):
        return entry["sha256"]
    if say is not None:
        say(f"computing the SHA-256 of {path} ({stamp[0] / 1e6:.0f} MB)")
    sha = file_digest(path)
    remember_sha256(path, sha, stamp)
    return sha


def remember_sha256(path: str | Path, sha256: str, stamp: list | None = None) -> None:
    """Put a digest into the cache (convert does, for the files it has just written and
    hashed). Never fails: without a writable cache every check hashes afresh."""
    key = os.path.realpath(path)
    cache = _load_cache()
    cache.pop(key, None)          # re-inserted last: the newest entry
    cache[key] = {"stamp": stamp or _stamp(os.stat(path)), "sha256": sha256}
    # forget files that are gone, then the oldest entries beyond the limit (dicts keep order)
    cache = {k: v for k, v in cache.items() if os.path.exists(k)}
    cache = dict(list(cache.items())[-DIGEST_CACHE_ENTRIES:])
    with contextlib.suppress(OSError):
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_cache_file(), cache)
