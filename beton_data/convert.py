"""`fastcifar convert`: CIFAR-10 from any supported source -> train.beton, test.beton, manifest.json.

All three files are written into a temporary folder beside OUT, which then replaces OUT in one
atomic step (an exchange of the two folders), so a convert killed at any moment leaves either
the previous complete output or none. Temporary folders left by killed runs are removed first.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from beton_data import sources
from beton_data.beton import write_beton
from beton_data.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def convert(source: str | None, out: Path, force: bool = False) -> dict:
    """Convert `source` (see sources.py; None = official download) into the folder `out` and
    return the manifest. A no-op when `out` already holds a conversion of the same source,
    unless force."""
    out = Path(out)
    t0 = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; pass --out a folder")
    _remove_stale_temporaries(out)

    if not force:
        previous = _complete_manifest(out)
        if previous is not None and _same_source(previous, source):
            print(f"{out} already holds this source ({previous['source']}); nothing to do "
                  f"(--force converts again)")
            return previous

    ds = sources.load(source)
    if not force:
        previous = _complete_manifest(out)
        if previous is not None and previous.get("source_sha256") == ds.sha256:
            print(f"{out} already holds this source (sha256 {ds.sha256[:12]}…); nothing to do "
                  f"(--force converts again)")
            return previous

    manifest = {
        "format_version": FORMAT_VERSION,
        "source": ds.source,
        "source_kind": ds.kind,
        "source_sha256": ds.sha256,
        "lossy_source": ds.lossy,
        "classes": list(ds.classes),
        "splits": {},
        "files": {split: f"{split}.beton" for split in sources.SPLITS},
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for split, (images, labels) in ds.splits.items():
        counts = np.bincount(labels, minlength=len(ds.classes))
        manifest["splits"][split] = {
            "count": int(len(labels)),
            "per_class": {c: int(n) for c, n in zip(ds.classes, counts)},
        }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        for split, (images, labels) in ds.splits.items():
            print(f"writing {split}.beton ({len(labels):,} images)")
            write_beton(tmp / f"{split}.beton", images, labels, progress=True)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    split_text = ", ".join(f"{s} {v['count']:,}" for s, v in manifest["splits"].items())
    print(f"converted {ds.source} -> {out}/ ({split_text} images) in {time.perf_counter() - t0:.1f} s")
    if ds.lossy:
        print("note: the source is JPEG (lossy); accuracy on it is not comparable with the original CIFAR-10")
    return manifest


def _same_source(manifest: dict, source: str | None) -> bool:
    """Cheap check before decoding anything: the default download again, or an archive whose
    checksum matches. Folders are compared by content hash after reading (see convert)."""
    if source is None:
        return manifest.get("source") == sources.CIFAR_URL
    path = Path(source).expanduser()
    return path.is_file() and sources.file_digest(path, "sha256") == manifest.get("source_sha256")


def _complete_manifest(out: Path) -> dict | None:
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if m.get("format_version") != FORMAT_VERSION:
        return None
    if not all((out / f).is_file() for f in m.get("files", {}).values()):
        return None
    return m


def _remove_stale_temporaries(out: Path) -> None:
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            if pid != os.getpid():
                continue  # another convert is running right now
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True)


def _replace_folder(new: Path, out: Path) -> None:
    """Make `new` be `out`. With an existing `out` the two are exchanged atomically
    (renameat2 RENAME_EXCHANGE, Linux); the old output then sits at `new` and is deleted."""
    if not out.exists():
        os.rename(new, out)
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; pass --out a folder")
    if _exchange(new, out):
        shutil.rmtree(new)
        return
    # No atomic exchange on this system: between these two renames OUT is briefly absent.
    old = out.parent / f".{out.name}.tmp-{os.getpid()}-old"
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0
