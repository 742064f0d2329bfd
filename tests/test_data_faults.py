"""Faults around conversion, with real processes: two converts into one folder at once, SIGKILL
while a .beton is written or while images are decoded, output locations that cannot be written."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from beton_data import read_manifest, sources, write_beton
from beton_data.convert import convert
from beton_data.errors import UserError
from test_data_convert import assert_output, make_image_folder, make_two_sources, no_temporaries

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=_env(), **kw)


def _wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = 120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, f"process ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Lines:
    """The stdout of a process, read as it comes (without blocking on a silent process)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.text = proc, ""

    def wait_for(self, words: str, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while words not in self.text:
            assert time.time() < deadline, f"timed out waiting for {words!r}; got {self.text!r}"
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536).decode()
                assert chunk or words in self.text, f"output ended without {words!r}: {self.text!r}"
                self.text += chunk
        return self.text

    def finish(self, timeout: float = 300) -> str:
        rest, _ = self.proc.communicate(timeout=timeout)
        self.text += rest.decode()
        return self.text


# ---- two converts, one output --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    return make_two_sources(tmp_path_factory.mktemp("sources"), (40, 41))


def _stalled_convert(source: Path, out: Path, started: Path, go: Path) -> subprocess.Popen:
    """A convert that, once it holds the output's lock and has read its source, waits for `go`
    before writing anything."""
    return _python(f"""
        import os, time
        import beton_data.convert as conv
        real = conv.write_beton
        def stalled(path, *a, **k):
            open({str(started)!r}, "w").close()
            while not os.path.exists({str(go)!r}):
                time.sleep(0.02)
            return real(path, *a, **k)
        conv.write_beton = stalled
        conv.convert({str(source)!r}, conv.Path({str(out)!r}))
    """, stdout=subprocess.DEVNULL)


def _cli_convert(source: Path, out: Path) -> Lines:
    proc = subprocess.Popen([sys.executable, "-m", "fastcifar.cli", "convert", "--source", str(source),
                             "--out", str(out)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    return Lines(proc)


@pytest.mark.parametrize("same_source", [True, False], ids=["same-source", "other-source"])
def test_two_converts_into_one_folder(tmp_path, two_sources, same_source):
    (a, exp_a), (b, exp_b) = two_sources
    out, started, go = tmp_path / "data", tmp_path / "started", tmp_path / "go"
    first = _stalled_convert(a, out, started, go)
    second = None
    try:
        _wait_for(started.exists, "the first convert to start writing", first)
        second = _cli_convert(a if same_source else b, out)
        second.wait_for(f"waiting: process {first.pid} is converting into {out}")
        assert not out.exists()                         # the second one did not write meanwhile
        go.touch()
        assert first.wait(timeout=300) == 0
        text = second.finish()
        assert second.proc.returncode == 0, text
    finally:
        go.touch()
        for p in (first, second.proc if second else None):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    if same_source:
        assert "nothing to do" in text and "converted" not in text
        assert_output(out, exp_a)
    else:
        assert "converted" in text
        assert_output(out, exp_b)                       # the later one, whole: files match the manifest
    assert no_temporaries(tmp_path) == []


# ---- SIGKILL leaves no process behind -------------------------------------------------------------------

def _children_of(pid: int) -> set[int]:
    """All descendants of `pid` now (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"           # a zombie has ended; only its exit status is left


def _kill_and_check_children(proc: subprocess.Popen, expect_children: bool) -> None:
    children = _children_of(proc.pid)
    if expect_children:
        assert children, "expected worker processes to test with"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        deadline = time.time() + 10
        while any(_running(c) for c in children) and time.time() < deadline:
            time.sleep(0.05)
        survivors = [c for c in children if _running(c)]
        assert survivors == [], f"processes {survivors} outlived their killed parent {proc.pid}"
    finally:
        for c in children:            # whatever happens, leave nothing running
            if _running(c):
                os.kill(c, signal.SIGKILL)


def test_sigkill_while_writing_a_beton_leaves_no_process(tmp_path):
    target = tmp_path / "train.beton"
    proc = _python(f"""
        import numpy as np
        from beton_data import write_beton
        images = np.random.default_rng(0).integers(0, 256, (20000, 32, 32, 3), dtype=np.uint8)
        while True:
            write_beton({str(target)!r}, images, np.arange(20000) % 10)
    """)
    try:
        _wait_for(lambda: any(tmp_path.glob(".train.beton*")), "a .beton write to start", proc)
        time.sleep(0.5)
    finally:
        _kill_and_check_children(proc, expect_children=False)
    # the killed writer's temporary file is cleaned by the next write, and the target is whole
    write_beton(target, np.zeros((3, 32, 32, 3), np.uint8), np.arange(3))
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == ["train.beton"]


def test_sigkill_while_decoding_images_leaves_no_process(tmp_path):
    folder, _ = make_image_folder(tmp_path / "src", np.random.default_rng(42))
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = _python(f"""
        import os, time
        from beton_data import sources
        sources.POOL_MIN_IMAGES, sources.DECODE_CHUNK = 1, 2      # decode in the process pool
        def stuck(chunk):                                           # a decoding process, busy
            open(os.path.join({str(marks)!r}, str(os.getpid())), "w").close()
            time.sleep(600)
        sources.decode_chunk = stuck
        sources.load({str(folder)!r})
    """)
    try:
        _wait_for(lambda: len(list(marks.iterdir())) >= 2, "two decoding processes to start", proc)
    finally:
        _kill_and_check_children(proc, expect_children=True)


# ---- output that cannot be written ----------------------------------------------------------------------

def _never_read(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the source was read before the output location was checked")
    monkeypatch.setattr(sources, "load", fail)


def test_convert_into_a_path_under_a_file_fails_before_reading(tmp_path, two_sources, monkeypatch):
    (a, _), _ = two_sources
    (tmp_path / "file").write_text("x")
    _never_read(monkeypatch)
    with pytest.raises(UserError, match="is a file, not a folder"):
        convert(str(a), tmp_path / "file" / "out")


def test_convert_into_a_read_only_folder_fails_before_reading(tmp_path, two_sources, monkeypatch):
    (a, _), _ = two_sources
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user can write to a mode-555 folder (root)")
        _never_read(monkeypatch)
        with pytest.raises(UserError, match="not writable"):
            convert(str(a), ro / "out")
    finally:
        ro.chmod(0o755)


def test_cli_unwritable_locations_are_one_line_errors(tmp_path, two_sources):
    (a, _), _ = two_sources
    (tmp_path / "file").write_text("x")
    for args in (["convert", "--source", str(a), "--out", str(tmp_path / "file" / "out")],
                 ["inspect", str(write_beton(tmp_path / "x.beton", np.zeros((2, 32, 32, 3), np.uint8), [0, 1])),
                  "--out", str(tmp_path / "file" / "grid.png")]):
        r = subprocess.run([sys.executable, "-m", "fastcifar.cli", *args], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and r.stderr.startswith("error: "), r.stderr
        assert r.stderr.strip().count("\n") == 0 and "is a file, not a folder" in r.stderr
    assert not (tmp_path / "x_inspect.png").exists()


def test_convert_leaves_only_its_output_and_its_lock_file(tmp_path, two_sources):
    """The lock file is the only thing a convert leaves beside its output."""
    (a, exp_a), _ = two_sources
    m = convert(str(a), tmp_path / "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.lock", "cache", "data"]
    assert m == read_manifest(tmp_path / "data")
    assert_output(tmp_path / "data", exp_a)
