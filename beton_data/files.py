"""Files that are written whole or not at all, and locks between processes.

Every file fastcifar writes (.beton files, manifests, checkpoints, summaries, plots, result
files) goes through `atomic_path`: the writer fills a uniquely named temporary file in the
target's folder, which is then renamed over the target. A reader, or a crash at any moment,
sees the previous complete file or the new complete file, never a mixture; two processes
writing the same target never share a temporary name.

`FileLock` keeps two processes from writing the same output folder at once. It is an
advisory `flock`, so the kernel releases it when its process ends, however it ends (SIGKILL
included): a lock can never be left behind by a crash.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

from beton_data.errors import UserError

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``
    (``os.replace``), on any exception it is deleted. The temporary name starts with '.',
    ends with '.tmp' and holds the process id, so readers can skip it and a cleaner can tell
    whose it is. ``fsync``: flush the file to disk before the rename (checkpoints)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # what an ordinary new file gets (mkstemp's is owner-only)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode(), fsync=fsync)


def atomic_write_json(path: str | Path, obj) -> Path:
    """``obj`` as indented JSON (values JSON cannot hold are written as their str())."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def remove_stale_temporaries(folder: str | Path, name: str = "*") -> list[Path]:
    """Delete temporary files `atomic_path` left in ``folder`` (for targets matching ``name``)
    when the process that made them is gone, e.g. after a SIGKILL mid-write."""
    removed = []
    for p in Path(folder).glob(f".{name}.*{TMP_SUFFIX}"):
        pid = _pid_of(p.name)
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def _pid_of(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """fastcifar's own cache (downloads, checksums): $FASTCIFAR_CACHE, else ~/.cache/fastcifar.
    Kept apart from the data, which may sit in a read-only folder."""
    return Path(os.environ.get("FASTCIFAR_CACHE") or Path.home() / ".cache" / "fastcifar")


def check_writable(folder: str | Path, what: str) -> None:
    """UserError unless ``folder`` (or, if it does not exist yet, its nearest existing
    parent) can be written: checked before any long work starts."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {folder}: {probe} is not writable; choose another location")


class FileLock:
    """An exclusive lock on ``path`` (created if missing) held until `release` or process end.

        with FileLock(out.parent / f".{out.name}.lock", f"converting into {out}", wait=True):
            ...

    wait=True blocks (printing once who holds it); wait=False raises UserError at once.
    The holder's pid and purpose are written into the file for that message."""

    def __init__(self, path: str | Path, purpose: str, wait: bool = False, say=print):
        self.path, self.purpose, self.wait, self.say = Path(path), purpose, wait, say
        self.fd: int | None = None

    def acquire(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = self._holder()
                if not self.wait:
                    raise UserError(f"{self.path.parent} is in use: {holder}; wait for it to finish") from None
                self.say(f"waiting: {holder}")
                t0 = time.monotonic()
                fcntl.flock(fd, fcntl.LOCK_EX)
                self.say(f"  ... it finished after {time.monotonic() - t0:.0f} s; going on")
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {self.purpose}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _holder(self) -> str:
        try:
            pid, _, purpose = self.path.read_text().strip().partition(" ")
            return f"process {pid} is {purpose}" if pid else "another process holds its lock"
        except OSError:
            return "another process holds its lock"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
