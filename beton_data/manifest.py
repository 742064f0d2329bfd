"""manifest.json, the record `fastcifar convert` leaves beside the .beton files it writes.

This module is its only reader and writer. A folder may have no manifest (betons written by
`write_beton`, or copied by hand): `read_manifest` then returns None and every helper here has
an answer for that case. A manifest that exists but cannot be understood is damage, reported
as a UserError naming the file. Older or hand-written manifests may lack fields; those read
as None.

    {"format_version": 2, "source": ".../cifar10-jpeg-q75.tar.gz", "source_kind": "image-folder-archive",
     "source_sha256": "...", "lossy_source": true, "classes": ["airplane", ...],
     "splits": {"train": {"count": 50000, "per_class": {"airplane": 5000, ...}}, ...},
     "files": {"train": {"name": "train.beton", "size": 158486400, "sha256": "..."}, ...},
     "created_utc": "..."}
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from beton_data.errors import UserError
from beton_data.files import atomic_write_json
from beton_data.sources import CLASSES

NAME = "manifest.json"
FORMAT_VERSION = 2       # 2: "files" records each file's size and SHA-256 (1: its name only)


@dataclass(frozen=True)
class FileRecord:
    """One data file as convert wrote it: its name in the folder, size and SHA-256 (None in a
    manifest older than format 2)."""
    name: str
    size: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    path: Path
    format_version: int | None = None
    source: str | None = None              # the archive or folder converted, or the download URL
    source_kind: str | None = None
    source_sha256: str | None = None
    lossy_source: bool = False             # JPEG images: not pixel-identical to CIFAR-10
    classes: tuple | None = None           # class names, by label
    splits: dict = field(default_factory=dict)     # split -> {"count": N, "per_class": {...}}
    files: dict = field(default_factory=dict)      # split -> FileRecord
    created_utc: str | None = None

    @property
    def folder(self) -> Path:
        return self.path.parent

    def record(self, file_name: str) -> FileRecord | None:
        """The record of the file called `file_name` in this folder, if the manifest has one."""
        return next((r for r in self.files.values() if r.name == file_name), None)

    @property
    def display_name(self) -> str:
        """A short name of the data: the source's file name without archive extensions,
        marked '(lossy)' for a JPEG copy, e.g. 'cifar10-jpeg-q75 (lossy)'."""
        source = (self.source or "?").rstrip("/")
        name = re.sub(r"(\.tar\.gz|\.tgz|\.tar|\.zip)$", "", source.rsplit("/", 1)[-1])
        return f"{name} (lossy)" if self.lossy_source else name

    @property
    def identity(self) -> str | None:
        """A SHA-256 over the data files' SHA-256s (with their split names): equal for equal
        data, whatever it was converted from, where and when. None without checksums."""
        return identity_of({split: r.sha256 for split, r in self.files.items()})


def identity_of(digests: dict) -> str | None:
    """The data identity of {split: file SHA-256}; None when any digest is unknown."""
    if not digests or any(not d for d in digests.values()):
        return None
    text = "".join(f"{split} {digests[split]}\n" for split in sorted(digests))
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / NAME


def read_manifest(folder: str | Path) -> Manifest | None:
    """The manifest of data folder `folder`; None when it has none. UserError when it has
    one that is unreadable or malformed."""
    path = manifest_path(folder)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise _damaged(path, f"cannot read it: {e}") from None
    try:
        d = json.loads(text)
    except ValueError as e:
        raise _damaged(path, f"not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise _damaged(path, "not a JSON object")
    try:
        return Manifest(
            path=path,
            format_version=_get(d, "format_version", int),
            source=_get(d, "source", str),
            source_kind=_get(d, "source_kind", str),
            source_sha256=_get(d, "source_sha256", str),
            lossy_source=bool(_get(d, "lossy_source", bool)),
            classes=_classes(d.get("classes")),
            splits=_get(d, "splits", dict) or {},
            files={str(s): _file_record(r) for s, r in (_get(d, "files", dict) or {}).items()},
            created_utc=_get(d, "created_utc", str),
        )
    except ValueError as e:
        raise _damaged(path, str(e)) from None


def _damaged(path: Path, problem: str) -> UserError:
    return UserError(f"{path}: damaged manifest ({problem}); convert the data again with "
                     f"`fastcifar convert --out {path.parent}` (and the --source it came from)")


def _get(d: dict, key: str, kind: type):
    value = d.get(key)
    if value is not None and not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        raise ValueError(f"{key!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _classes(value) -> tuple | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ValueError("'classes' is not a list of names")
    return tuple(value)


def _file_record(r) -> FileRecord:
    if isinstance(r, str):                      # format 1: the file name alone
        return FileRecord(r)
    if (not isinstance(r, dict) or not isinstance(r.get("name"), str)
            or not isinstance(r.get("size"), int) or not isinstance(r.get("sha256"), str)):
        raise ValueError(f"file record {r!r} lacks name, size or sha256")
    return FileRecord(r["name"], r["size"], r["sha256"])


def write_manifest(folder: str | Path, *, source: str, source_kind: str, source_sha256: str | None,
                   lossy_source: bool, classes, splits: dict, files: dict, created_utc: str) -> Manifest:
    """Write `folder`/manifest.json (atomically) in the current format; returns it as read back."""
    d = {
        "format_version": FORMAT_VERSION,
        "source": source, "source_kind": source_kind, "source_sha256": source_sha256,
        "lossy_source": bool(lossy_source), "classes": list(classes), "splits": splits,
        "files": {split: r.to_dict() for split, r in files.items()},
        "created_utc": created_utc,
    }
    atomic_write_json(manifest_path(folder), d)
    return read_manifest(folder)


# ---- answers for any data folder, with or without a manifest ------------------------------------

def class_names(folder: str | Path | None, num_classes: int) -> list[str]:
    """Names of labels 0..num_classes-1: the manifest's when it lists that many, else
    CIFAR-10's for 10 classes, else the label numbers."""
    m = read_manifest(folder) if folder is not None else None
    if m is not None and m.classes is not None and len(m.classes) == num_classes:
        return list(m.classes)
    if num_classes == len(CLASSES):
        return list(CLASSES)
    return [str(i) for i in range(num_classes)]


def data_name(folder: str | Path) -> str:
    """Manifest.display_name, or '<folder name> (no manifest)'."""
    m = read_manifest(folder)
    return m.display_name if m is not None else f"{Path(folder).name} (no manifest)"


def data_identity(folder: str | Path) -> str | None:
    """Manifest.identity; None without a manifest or checksums (`check_data` computes one
    for any folder)."""
    m = read_manifest(folder)
    return m.identity if m is not None else None
