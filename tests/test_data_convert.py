"""Conversion to .beton: every source layout, byte-exact round trips, every bad input, atomicity."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beton_data import read_beton, write_beton
from beton_data import sources
from beton_data.augment import AugConfig
from beton_data.convert import convert
from beton_data.files import file_digest
from beton_data.sources import CLASSES
from fastcifar.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PER_BATCH = 6        # images per pickled batch: 30 train, 6 test
PER_CLASS = {"train": 2, "test": 1}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Downloads and the digest cache of each test in its own folder, never the user's."""
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))


# ---- synthetic sources ----------------------------------------------------------------------------

def _images(rng, n):
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def make_batches_folder(root: Path, rng, bad_label=False) -> tuple[Path, dict]:
    """cifar-10-batches-py/ as the official archive lays it out (Python-2 style bytes keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = {"train": ([], []), "test": ([], [])}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        ims = _images(rng, PER_BATCH)
        labels = [int(x) for x in rng.integers(0, 10, PER_BATCH)]
        if bad_label and name == "data_batch_2":
            labels[3] = 10
        data = ims.transpose(0, 3, 1, 2).reshape(PER_BATCH, 3072)   # planar R, G, B rows
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * PER_BATCH}, f, protocol=2)
        split = "test" if name == "test_batch" else "train"
        expected[split][0].append(ims)
        expected[split][1].append(labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, f, protocol=2)
    return folder, {s: (np.concatenate(i), np.concatenate(l)) for s, (i, l) in expected.items()}


def make_image_folder(root: Path, rng, ext="png", top="cifar10-png", classes=CLASSES) -> tuple[Path, dict]:
    """top/train/<class>/<k>.png, top/test/<class>/<k>.png; expected arrays in class, file order."""
    expected = {}
    for split, per_class in PER_CLASS.items():
        ims, labels = [], []
        for label, cls in enumerate(classes):
            d = root / top / split / cls
            d.mkdir(parents=True)
            for k in range(per_class):
                im = _images(rng, 1)[0]
                Image.fromarray(im).save(d / f"{k * 5}.{ext}")
                ims.append(im)
                labels.append(label)
        expected[split] = (np.stack(ims), np.array(labels))
    return root / top, expected


def tar_gz(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return dest


def assert_output(out: Path, expected: dict):
    for split, (ims, labels) in expected.items():
        got_ims, got_labels = read_beton(out / f"{split}.beton")
        np.testing.assert_array_equal(got_ims, ims)
        np.testing.assert_array_equal(got_labels, labels)
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["classes"] == list(CLASSES)
    for split, (ims, labels) in expected.items():
        assert m["splits"][split]["count"] == len(labels)
        assert sum(m["splits"][split]["per_class"].values()) == len(labels)
        assert m["splits"][split]["per_class"]["airplane"] == int(np.sum(labels == 0))
    assert len(m["source_sha256"]) == 64
    for split in expected:
        record = m["files"][split]
        path = out / record["name"]
        assert record["size"] == path.stat().st_size and record["sha256"] == file_digest(path)
    return m


def no_temporaries(parent: Path):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


# ---- formats and round trips ------------------------------------------------------------------------

def test_write_read_beton_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    ims, labels = _images(rng, 37), rng.integers(0, 10, 37)
    write_beton(tmp_path / "x.beton", ims, labels)
    got_ims, got_labels = read_beton(tmp_path / "x.beton")
    np.testing.assert_array_equal(got_ims, ims)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_labels.dtype == np.int64
    assert no_temporaries(tmp_path) == []
    first_ims, first_labels = read_beton(tmp_path / "x.beton", limit=5)     # only the first samples
    np.testing.assert_array_equal(first_ims, ims[:5])
    np.testing.assert_array_equal(first_labels, labels[:5])


def test_write_beton_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_beton(tmp_path / "x.beton", np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, int))
    with pytest.raises(ValueError, match="32,32,3"):
        write_beton(tmp_path / "x.beton", np.zeros((2, 28, 28, 3), np.uint8), np.zeros(2, int))
    with pytest.raises(ValueError, match="labels"):
        write_beton(tmp_path / "x.beton", np.zeros((2, 32, 32, 3), np.uint8), np.zeros(3, int))
    assert list(tmp_path.iterdir()) == []


def test_read_beton_rejects_truncated_file(tmp_path):
    write_beton(tmp_path / "x.beton", np.zeros((5, 32, 32, 3), np.uint8), np.arange(5))
    data = (tmp_path / "x.beton").read_bytes()
    (tmp_path / "cut.beton").write_bytes(data[:len(data) // 3])
    with pytest.raises(UserError, match="cut.beton"):
        read_beton(tmp_path / "cut.beton")


def test_cifar_python_archive_and_folder_exact(tmp_path):
    rng = np.random.default_rng(1)
    folder, expected = make_batches_folder(tmp_path / "src", rng)
    archive = tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")

    convert(str(archive), tmp_path / "a")
    m = assert_output(tmp_path / "a", expected)
    assert m["source_kind"] == "cifar-python-archive" and m["lossy_source"] is False
    assert m["source_sha256"] == file_digest(archive, "sha256")

    convert(str(folder), tmp_path / "b")
    m = assert_output(tmp_path / "b", expected)
    assert m["source_kind"] == "cifar-python-folder"


def test_image_folder_png_folder_and_targz_exact(tmp_path):
    rng = np.random.default_rng(2)
    folder, expected = make_image_folder(tmp_path / "src", rng)
    convert(str(folder), tmp_path / "a")
    assert assert_output(tmp_path / "a", expected)["source_kind"] == "image-folder"

    archive = tar_gz(folder, tmp_path / "png.tar.gz")
    convert(str(archive), tmp_path / "b")
    m = assert_output(tmp_path / "b", expected)
    assert m["source_kind"] == "image-folder-archive" and m["lossy_source"] is False


def test_image_folder_natural_file_order_and_plain_tar(tmp_path):
    d = tmp_path / "src"
    rng = np.random.default_rng(3)
    per_file = {}
    for split in ("train", "test"):
        for k in (10, 2, 1):   # natural order 1, 2, 10 (not 1, 10, 2)
            im = _images(rng, 1)[0]
            (d / split / "cat").mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(d / split / "cat" / f"{k}.png")
            per_file[(split, k)] = im
    with tarfile.open(tmp_path / "x.tar", "w") as tf:   # no top-level folder, not compressed
        for split in ("train", "test"):
            tf.add(d / split, arcname=split)
    m = convert(str(tmp_path / "x.tar"), tmp_path / "out")
    ims, labels = read_beton(tmp_path / "out" / "train.beton")
    np.testing.assert_array_equal(ims, np.stack([per_file[("train", k)] for k in (1, 2, 10)]))
    assert list(labels) == [3, 3, 3]
    assert m.splits["train"]["per_class"]["cat"] == 3 and m.splits["train"]["per_class"]["dog"] == 0


def test_jpeg_folder_is_marked_lossy(tmp_path):
    folder, expected = make_image_folder(tmp_path / "src", np.random.default_rng(4), ext="jpg")
    m = convert(str(folder), tmp_path / "out")
    assert m.lossy_source is True
    ims, labels = read_beton(tmp_path / "out" / "train.beton")
    np.testing.assert_array_equal(labels, expected["train"][1])
    assert ims.shape == expected["train"][0].shape


def test_parallel_decoding_matches_and_reports_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DECODE_CHUNK", 3)
    monkeypatch.setattr(sources, "POOL_MIN_IMAGES", 1)   # decode in worker processes
    folder, expected = make_image_folder(tmp_path / "src", np.random.default_rng(13))
    convert(str(folder), tmp_path / "out")
    assert_output(tmp_path / "out", expected)
    Image.fromarray(np.zeros((31, 32, 3), np.uint8)).save(folder / "test" / "truck" / "0.png")
    assert "test/truck/0.png" in _convert_error(folder, tmp_path / "out2")


# ---- the default download path -------------------------------------------------------------------

def test_download_md5_mismatch_and_cache(tmp_path):
    fake = tmp_path / "served" / "cifar-10-python.tar.gz"
    fake.parent.mkdir()
    fake.write_bytes(b"not the real archive")
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"cifar-10-python.tar.gz: MD5 .* does not match"):
        sources.download(url=fake.as_uri(), md5=sources.CIFAR_MD5, cache=cache)
    # The file was fetched into the cache; a matching MD5 accepts it without fetching again.
    cached = cache / "cifar-10-python.tar.gz"
    assert cached.read_bytes() == b"not the real archive"
    fake.unlink()
    md5 = file_digest(cached, "md5")
    assert sources.download(url=fake.as_uri(), md5=md5, cache=cache) == cached
    assert [p.name for p in cache.iterdir()] == ["cifar-10-python.tar.gz"]   # no partial files


def test_download_without_network_says_how_to_pass_source(tmp_path):
    with pytest.raises(UserError, match="--source"):
        sources.download(url="http://127.0.0.1:9/cifar-10-python.tar.gz", cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_default_source_goes_through_md5_check(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cifar-10-python.tar.gz").write_bytes(b"corrupt")
    with pytest.raises(UserError, match="MD5"):
        convert(None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- bad inputs ---------------------------------------------------------------------------------------

def _convert_error(source, out) -> str:
    with pytest.raises(UserError) as e:
        convert(str(source), out)
    assert "\n" not in str(e.value)
    assert not Path(out).exists() and no_temporaries(Path(out).parent) == []
    return str(e.value)


def test_truncated_archive(tmp_path):
    folder, _ = make_batches_folder(tmp_path / "src", np.random.default_rng(5))
    archive = tar_gz(folder, tmp_path / "c.tar.gz")
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[:len(data) // 2])
    msg = _convert_error(cut, tmp_path / "out")
    assert "cut.tar.gz" in msg and "truncated" in msg


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tar.gz").write_text("hello")
    assert "not a .tar" in _convert_error(tmp_path / "x.tar.gz", tmp_path / "out")


def test_label_out_of_range_names_batch_and_index(tmp_path):
    folder, _ = make_batches_folder(tmp_path / "src", np.random.default_rng(6), bad_label=True)
    msg = _convert_error(folder, tmp_path / "out")
    assert "data_batch_2" in msg and "index 3" in msg and "label 10" in msg


def test_pickled_images_of_wrong_size(tmp_path):
    folder, _ = make_batches_folder(tmp_path / "src", np.random.default_rng(15))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0, 1], b"data": np.zeros((2, 3000), np.uint8)}, f, protocol=2)
    msg = _convert_error(folder, tmp_path / "out")
    assert "test_batch" in msg and "3000" in msg


def test_missing_batch(tmp_path):
    folder, _ = make_batches_folder(tmp_path / "src", np.random.default_rng(7))
    (folder / "data_batch_4").unlink()
    assert "data_batch_4" in _convert_error(folder, tmp_path / "out")


def test_wrong_image_size_names_file(tmp_path):
    folder, _ = make_image_folder(tmp_path / "src", np.random.default_rng(8))
    Image.fromarray(np.zeros((32, 33, 3), np.uint8)).save(folder / "train" / "dog" / "5.png")
    msg = _convert_error(folder, tmp_path / "out")
    assert "train/dog/5.png" in msg and "33x32" in msg


def test_grayscale_image_rejected(tmp_path):
    folder, _ = make_image_folder(tmp_path / "src", np.random.default_rng(9))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "test" / "cat" / "0.png")
    assert "test/cat/0.png" in _convert_error(folder, tmp_path / "out")


def test_unknown_class_folder(tmp_path):
    folder, _ = make_image_folder(tmp_path / "src", np.random.default_rng(10))
    (folder / "train" / "unicorn").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "train" / "unicorn" / "0.png")
    msg = _convert_error(folder, tmp_path / "out")
    assert "unicorn" in msg and "train/unicorn/0.png" in msg


def test_empty_split(tmp_path):
    folder, _ = make_image_folder(tmp_path / "src", np.random.default_rng(11))
    import shutil
    shutil.rmtree(folder / "test")
    assert "test split is empty" in _convert_error(folder, tmp_path / "out")


def test_out_is_a_file(tmp_path):
    folder, _ = make_image_folder(tmp_path / "src", np.random.default_rng(14))
    (tmp_path / "out").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        convert(str(folder), tmp_path / "out")


def test_undecodable_image(tmp_path):
    folder, _ = make_image_folder(tmp_path / "src", np.random.default_rng(12))
    (folder / "train" / "ship" / "0.png").write_bytes(b"\x89PNG broken")
    assert "train/ship/0.png" in _convert_error(folder, tmp_path / "out")


# ---- atomicity, no-op reruns, --force --------------------------------------------------------------

def make_two_sources(root: Path, seeds: tuple[int, int]):
    """Two different image-folder archives in ``root``: ((path, expected), (path, expected))."""
    out = []
    for name, seed in zip("ab", seeds):
        folder, expected = make_image_folder(root / name, np.random.default_rng(seed))
        out.append((tar_gz(folder, root / f"{name}.tar.gz"), expected))
    return tuple(out)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    return make_two_sources(tmp_path_factory.mktemp("sources"), (20, 21))


def test_rerun_is_noop_and_force_converts_again(tmp_path, two_sources, capsys):
    (src, expected), _ = two_sources
    out = tmp_path / "out"
    m1 = convert(str(src), out)
    stamp = (out / "train.beton").stat().st_mtime_ns
    capsys.readouterr()
    m2 = convert(str(src), out)
    assert "nothing to do" in capsys.readouterr().out
    assert m2 == m1 and (out / "train.beton").stat().st_mtime_ns == stamp
    time.sleep(0.01)
    convert(str(src), out, force=True)
    assert (out / "train.beton").stat().st_mtime_ns != stamp
    assert_output(out, expected)


def test_rerun_on_folder_is_noop(tmp_path, capsys):
    folder, _ = make_image_folder(tmp_path / "src", np.random.default_rng(22))
    convert(str(folder), tmp_path / "out")
    capsys.readouterr()
    convert(str(folder), tmp_path / "out")
    assert "nothing to do" in capsys.readouterr().out
    # A changed folder is a different source.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "train" / "cat" / "99.png")
    convert(str(folder), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["count"] == 21


def test_failure_midway_keeps_previous_output(tmp_path, two_sources, monkeypatch):
    (a, exp_a), (b, _) = two_sources
    out = tmp_path / "out"
    convert(str(a), out)
    import beton_data.convert as conv
    real = conv.write_beton
    calls = []

    def failing(path, *args, **kw):
        calls.append(path)
        if len(calls) == 2:   # after train.beton is complete, while test.beton is being written
            raise RuntimeError("injected failure")
        return real(path, *args, **kw)

    monkeypatch.setattr(conv, "write_beton", failing)
    with pytest.raises(RuntimeError, match="injected"):
        convert(str(b), out)
    assert no_temporaries(tmp_path) == []
    assert_output(out, exp_a)


def test_killed_convert_leaves_previous_output_and_stale_temp_is_cleaned(tmp_path, two_sources):
    (a, exp_a), (b, exp_b) = two_sources
    out = tmp_path / "out"
    convert(str(a), out)
    marker = tmp_path / "half-written"
    # A convert that stalls (then gets SIGKILLed) right after writing train.beton.
    script = textwrap.dedent(f"""
        import sys, time
        import beton_data.convert as conv
        real = conv.write_beton
        def stalling(path, *a, **k):
            r = real(path, *a, **k)
            open({str(marker)!r}, "w").close()
            time.sleep(600)
        conv.write_beton = stalling
        conv.convert({str(b)!r}, conv.Path({str(out)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "convert subprocess did not get going"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert no_temporaries(tmp_path), "expected the killed run's temporary folder"
    assert_output(out, exp_a)                  # untouched previous output
    convert(str(b), out)                       # the next run cleans up and converts
    assert no_temporaries(tmp_path) == []
    assert_output(out, exp_b)


def test_damaged_or_older_output_is_converted_again(tmp_path, two_sources, capsys):
    (src, expected), _ = two_sources
    out = tmp_path / "out"
    convert(str(src), out)
    data = bytearray((out / "test.beton").read_bytes())
    data[-5000] ^= 1                                    # a flipped bit: only the checksum sees it
    (out / "test.beton").write_bytes(bytes(data))
    capsys.readouterr()
    convert(str(src), out)                              # no --force needed
    text = capsys.readouterr().out
    assert "test.beton: its contents do not match the SHA-256" in text and "converting again" in text
    assert "nothing to do" not in text
    assert_output(out, expected)
    # a manifest of the previous format (no sizes or checksums): converted again
    m = json.loads((out / "manifest.json").read_text())
    m.update(format_version=1, files={s: r["name"] for s, r in m["files"].items()})
    (out / "manifest.json").write_text(json.dumps(m))
    convert(str(src), out)
    assert "converted" in capsys.readouterr().out
    assert_output(out, expected)
    # a manifest that is not JSON: said, and converted again
    (out / "manifest.json").write_text("{")
    convert(str(src), out)
    assert "damaged manifest" in capsys.readouterr().out
    assert_output(out, expected)


def test_data_identity_is_the_datas_not_the_sources(tmp_path):
    from beton_data import read_manifest
    folder, _ = make_image_folder(tmp_path / "src", np.random.default_rng(23))
    convert(str(folder), tmp_path / "a")
    convert(str(tar_gz(folder, tmp_path / "src.tar.gz")), tmp_path / "b")
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert a.source_sha256 != b.source_sha256 and a.identity == b.identity and len(a.identity) == 64
    other, _ = make_image_folder(tmp_path / "other", np.random.default_rng(24))
    assert convert(str(other), tmp_path / "c").identity != a.identity


# ---- the CLI ------------------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastcifar.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    r = _cli("convert", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "missing" in r.stderr
    r = _cli("inspect", str(tmp_path / "nothing.beton"))
    assert r.returncode != 0 and r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0


def test_cli_convert_then_inspect(tmp_path, two_sources):
    (a, exp_a), _ = two_sources
    out = tmp_path / "data"
    r = _cli("convert", "--source", str(a), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert_output(out, exp_a)
    r = _cli("inspect", str(out), "--samples", "3", "--out", str(tmp_path / "grid.png"))
    assert r.returncode == 0, r.stderr
    assert "airplane" in r.stdout and "pixel mean" in r.stdout and "grid.png" in r.stdout
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size[0] > 6 * 96 and im.size[1] == 10 * 96


def test_inspect_prints_exact_counts_and_stats(tmp_path, capsys):
    from beton_data.inspect import inspect
    rng = np.random.default_rng(30)
    ims, labels = _images(rng, 40), np.repeat(np.arange(4), 10)
    write_beton(tmp_path / "x.beton", ims, labels)
    png = inspect(tmp_path / "x.beton", aug=AugConfig(flip=True, translate=4, cutout=0), samples=2)
    text = capsys.readouterr().out
    assert png == tmp_path / "x_inspect.png" and png.is_file()
    mean = ims.reshape(-1, 3).mean(0)
    assert f"{mean[0]:.3f}" in text
    assert "   3 cat               10" in text and "   4 deer               0" in text
