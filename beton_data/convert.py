"""`fastcifar convert`: CIFAR-10 from any supported source -> train.beton, test.beton, manifest.json.

- Writability of OUT is checked before the source is read, so a read-only location fails in
  a second, not after decoding 60,000 images.
- One convert per OUT at a time: a lock file beside OUT (`files.FileLock`, released by the
  kernel however its holder ends). A second convert into the same OUT waits, says so, and
  then finds the first one's complete output: a no-op if the source is the same.
- All three files are written into a temporary folder beside OUT, which then replaces OUT in
  one atomic step (an exchange of the two folders), so a convert killed at any moment leaves
  either the previous complete output or none. Temporary folders left by killed runs are
  removed by the next run.
- Nothing is forked for writing (beton.py), and the decoding processes die with their parent
  (sources.py), so a killed convert leaves no process behind.
- Re-running on the same source is a no-op only while the previous output is intact (its
  structure, sizes and SHA-256s as the manifest records them); damaged output is converted
  again.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import os
import shutil
import time
from pathlib import Path

import numpy as np

from beton_data import sources
from beton_data.beton import write_beton
from beton_data.errors import UserError
from beton_data.files import FileLock, check_writable, file_digest
from beton_data.integrity import DamagedData, check_beton, remember_sha256
from beton_data.manifest import FORMAT_VERSION, FileRecord, Manifest, read_manifest, write_manifest


def convert(source: str | None, out: Path, force: bool = False, say=print) -> Manifest:
    """Convert `source` (see sources.py; None = official download) into the folder `out` and
    return its manifest. A no-op when `out` already holds an intact conversion of the same
    source, unless force."""
    out = Path(out)
    t0 = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; pass --out a folder")
    check_writable(out.parent, "--out")
    if out.is_dir():
        check_writable(out, "--out")      # its old contents are deleted once replaced
    with FileLock(out.parent / f".{out.name}.lock", f"converting into {out}", wait=True, say=say):
        _remove_temporaries(out)
        if not force:
            previous = _intact_output(out, say)
            if previous is not None and _same_source(previous, source):
                say(f"{out} already holds this source ({previous.source}); nothing to do "
                    f"(--force converts again)")
                return previous

        ds = sources.load(source)
        if not force:
            previous = _intact_output(out, say=None)
            if previous is not None and previous.source_sha256 == ds.sha256:
                say(f"{out} already holds this source (sha256 {ds.sha256[:12]}…); nothing to do "
                    f"(--force converts again)")
                return previous
        manifest = _write(ds, out, say)

    split_text = ", ".join(f"{s} {v['count']:,}" for s, v in manifest.splits.items())
    say(f"converted {ds.source} -> {out}/ ({split_text} images) in {time.perf_counter() - t0:.1f} s")
    if ds.lossy:
        say("note: the source is JPEG (lossy); accuracy on it is not comparable with the original CIFAR-10")
    return manifest


def _write(ds: sources.Dataset, out: Path, say) -> Manifest:
    """Both splits and the manifest into a temporary folder, which then becomes `out`."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    files, splits = {}, {}
    try:
        tmp.mkdir()
        for split, (images, labels) in ds.splits.items():
            say(f"writing {split}.beton ({len(labels):,} images)")
            path = write_beton(tmp / f"{split}.beton", images, labels)
            files[split] = FileRecord(path.name, path.stat().st_size, file_digest(path))
            counts = np.bincount(labels, minlength=len(ds.classes))
            splits[split] = {"count": int(len(labels)),
                             "per_class": {c: int(n) for c, n in zip(ds.classes, counts)}}
        write_manifest(tmp, source=ds.source, source_kind=ds.kind, source_sha256=ds.sha256,
                       lossy_source=ds.lossy, classes=ds.classes, splits=splits, files=files,
                       created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        _replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    # The digests were just computed from these very files: readers need not hash them again.
    for record in files.values():
        remember_sha256(out / record.name, record.sha256)
    return read_manifest(out)


def _same_source(manifest: Manifest, source: str | None) -> bool:
    """Cheap check before decoding anything: the default download again, or an archive whose
    checksum matches. Folders are compared by content hash after reading (see convert)."""
    if source is None:
        return manifest.source == sources.CIFAR_URL
    path = Path(source).expanduser()
    return path.is_file() and file_digest(path) == manifest.source_sha256


def _intact_output(out: Path, say) -> Manifest | None:
    """The manifest of a complete, undamaged conversion in `out` (format, files, sizes and
    SHA-256s checked; digests cached), else None. `say` is told why damaged output is redone."""
    try:
        m = read_manifest(out)
    except UserError as e:
        if say:
            say(f"note: {e}".split("; ")[0] + "; converting again")
        return None
    if m is None or m.format_version != FORMAT_VERSION or set(m.files) != set(sources.SPLITS):
        return None
    for record in m.files.values():
        try:
            check_beton(out / record.name, verify=None)
        except DamagedData as e:
            if say:
                say(f"note: {e.path}: {e.problem}; converting again")
            return None
        except UserError:
            return None
    return m


def _remove_temporaries(out: Path) -> None:
    """Temporary folders of earlier converts into `out`. Called under the lock, so none of them
    belongs to a convert still running: they were left by killed ones."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
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
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        return libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0
    return False
