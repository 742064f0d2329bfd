""".beton files: the layout against FFCV's own writer, and every reader refusing damaged or
foreign files (cut at every region, bytes flipped), with and without a manifest beside them;
the SHA-256 check and its cache; check_data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from beton_data import check_beton, check_data, read_beton, write_beton
from beton_data import layout as L
from beton_data import integrity
from beton_data.augment import AugConfig
from beton_data.errors import UserError
from beton_data.files import file_digest
from beton_data.manifest import FileRecord, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]
N = 1500                 # 3 pages of 682 images: cuts and flips can land in every region
AUG = AugConfig(flip=True, translate=2, cutout=0)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The digest cache of each test in its own folder, never the user's."""
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The bytes of a train and a test .beton, and their arrays."""
    root = tmp_path_factory.mktemp("pristine")
    out = {}
    for split, n, seed in (("train", N, 0), ("test", 300, 1)):
        images, labels = _data(n, seed)
        write_beton(root / f"{split}.beton", images, labels)
        out[split] = ((root / f"{split}.beton").read_bytes(), images, labels)
    return out


def make_folder(folder: Path, pristine, manifest: bool = True) -> Path:
    """A data folder as convert leaves it (or, manifest=False, bare .beton files)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, (data, _, labels) in pristine.items():
        (folder / f"{split}.beton").write_bytes(data)
        files[split] = FileRecord(f"{split}.beton", len(data), file_digest(folder / f"{split}.beton"))
    if manifest:
        write_manifest(folder, source="/x/cifar.tar.gz", source_kind="image-folder-archive", source_sha256="0" * 64,
                       lossy_source=False, classes=[str(i) for i in range(10)],
                       splits={s: {"count": len(v[2])} for s, v in pristine.items()}, files=files,
                       created_utc="2026-01-01T00:00:00+00:00")
    return folder


# ---- the layout is FFCV's --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ffcv_writer():
    import beton_data._ffcv  # noqa: F401
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    def write(path, images, labels, workers, chunksize=1000):
        class Samples:
            def __len__(self):
                return len(labels)

            def __getitem__(self, i):
                return images[i], int(labels[i])
        w = DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                          page_size=MIN_PAGE_SIZE, num_workers=workers)
        w.from_indexed_dataset(Samples(), chunksize=chunksize)
    return write


def test_dtypes_are_ffcvs():
    import beton_data._ffcv  # noqa: F401
    import ffcv.types as T
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE

    assert (L.HEADER, L.FIELD_DESC, L.ALLOC_ENTRY) == (T.HeaderType, T.FieldDescType, T.ALLOC_TABLE_TYPE)
    assert L.METADATA == T.get_metadata_type([RGBImageField(), IntField()])
    assert L.VERSION == T.CURRENT_VERSION and L.RAW_MODE == IMAGE_MODES["raw"]
    assert (L.MIN_PAGE_SIZE, L.MAX_PAGE_SIZE) == (MIN_PAGE_SIZE, MAX_PAGE_SIZE)
    assert T.TYPE_ID_HANDLER[L.TYPE_RGB_IMAGE] is RGBImageField and T.TYPE_ID_HANDLER[L.TYPE_INT] is IntField


def test_writer_bytes_equal_ffcv_datasetwriter(tmp_path, ffcv_writer, pristine):
    data, images, labels = pristine["train"]
    ffcv_writer(tmp_path / "ffcv.beton", images, labels, workers=1)
    assert (tmp_path / "ffcv.beton").read_bytes() == data
    write_beton(tmp_path / "again.beton", images, labels)
    assert (tmp_path / "again.beton").read_bytes() == data        # deterministic


def test_files_ffcv_wrote_with_several_workers_are_read(tmp_path, ffcv_writer):
    """Conversions made before fastcifar wrote its own files (FFCV, 2 worker processes,
    pages filled in whatever order the workers got to them) still pass and read back exactly."""
    images, labels = _data(N, 5)
    ffcv_writer(tmp_path / "x.beton", images, labels, workers=2, chunksize=100)
    got_images, got_labels = read_beton(tmp_path / "x.beton")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_write_beton_rejects_labels_that_are_not_class_indices(tmp_path):
    with pytest.raises(ValueError, match="class indices"):
        write_beton(tmp_path / "x.beton", np.zeros((2, 32, 32, 3), np.uint8), np.array([0, -1]))


# ---- damaged files: every reader refuses them ------------------------------------------------------

def _regions(size: int) -> dict:
    lay = L.Layout.plan(N)
    return {
        "header": 10,
        "field descriptors": L.HEADER.itemsize + 500,
        "metadata": lay.metadata_start + 100 * L.METADATA.itemsize + 5,
        "data": lay.data_start + lay.page_size + 12345,
        "allocation table": lay.alloc_table_ptr + 100,
        "0.1% of the file": size - size // 1000,
        "last byte": size - 1,
    }


def _readers(path: Path):
    """Every way the project reads a .beton: (name, callable)."""
    from beton_data.inspect import inspect
    from beton_data.loaders import make_loader
    return [
        ("read_beton", lambda: read_beton(path)),
        ("gpu loader", lambda: make_loader("gpu", path, 64, train=True, aug=AUG)),
        ("ffcv loader", lambda: make_loader("ffcv", path, 64, train=False)),
        ("inspect", lambda: inspect(path, aug=AUG, out=path.parent / "grid.png", say=lambda *a: None)),
        ("check_beton", lambda: check_beton(path)),
    ]


def _refused(fn, path: Path) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "fastcifar convert" in msg, msg
    return msg


@pytest.mark.parametrize("manifest", [True, False], ids=["with-manifest", "bare-file"])
def test_cut_files_are_refused_by_every_reader(tmp_path, pristine, manifest):
    data = pristine["train"][0]
    for region, at in _regions(len(data)).items():
        folder = make_folder(tmp_path / region.replace(" ", "-"), pristine, manifest=manifest)
        path = folder / "train.beton"
        path.write_bytes(data[:at])
        for name, read in _readers(path):
            msg = _refused(read, path)
            assert "truncated" in msg or "shorter" in msg, (region, name, msg)
        with pytest.raises(UserError, match="train.beton"):
            check_data(folder, say=lambda *a: None)


def test_cli_inspect_refuses_a_cut_file_before_printing_anything(tmp_path, pristine):
    folder = make_folder(tmp_path / "data", pristine)
    data = pristine["test"][0]
    (folder / "test.beton").write_bytes(data[:-3])
    for target in (folder / "test.beton", folder):
        r = subprocess.run([sys.executable, "-m", "fastcifar.cli", "inspect", str(target)], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr
        assert "test.beton" in r.stderr and "truncated" in r.stderr
        # what to do: the exact convert command, from the manifest
        assert f"fastcifar convert --source /x/cifar.tar.gz --out {folder}" in r.stderr
        assert r.stdout == ""          # refused before anything was said about the intact train.beton


def _flip(data: bytes, at: int, mask: int = 0xFF) -> bytes:
    b = bytearray(data)
    b[at] ^= mask
    return bytes(b)


def _structural_flips() -> dict:
    lay = L.Layout.plan(N)
    meta = lay.metadata_start + 7 * L.METADATA.itemsize       # sample 7's metadata
    table = lay.alloc_table_ptr + 9 * L.ALLOC_ENTRY.itemsize   # allocation entry 9
    return {
        "version": 0, "num_fields": 2, "page_size": 6, "num_samples": 8, "alloc_table_ptr": 17,
        "field type": L.HEADER.itemsize, "field name": L.HEADER.itemsize + 1,
        "image mode": meta, "image width": meta + 1, "image data_ptr": meta + 6, "label sign": meta + 16 + 7,
        "table sample_id": table, "table ptr": table + 9, "table size": table + 17,
    }


@pytest.mark.parametrize("manifest", [True, False], ids=["with-manifest", "bare-file"])
def test_flipped_structure_bytes_are_refused_without_hashing(tmp_path, pristine, manifest):
    data = pristine["train"][0]
    for what, at in _structural_flips().items():
        folder = make_folder(tmp_path / what.replace(" ", "-"), pristine, manifest=manifest)
        path = folder / "train.beton"
        path.write_bytes(_flip(data, at))
        for name, read in _readers(path):
            _refused(read, path)


def test_flipped_pixels_are_caught_by_the_checksum(tmp_path, pristine):
    lay = L.Layout.plan(N)
    folder = make_folder(tmp_path / "data", pristine)
    path = folder / "train.beton"
    path.write_bytes(_flip(pristine["train"][0], lay.data_start + 3 * lay.page_size // 2, 0x01))
    read_beton(path)                                   # the layout is intact: the cheap check passes
    for fn in (lambda: read_beton(path, verify=True), lambda: check_beton(path, verify=True),
               lambda: check_data(folder, say=lambda *a: None)):
        msg = _refused(fn, path)
        assert "SHA-256" in msg
    from beton_data.inspect import inspect
    assert "SHA-256" in _refused(lambda: inspect(folder, aug=AUG, verify=True, say=lambda *a: None), path)


def test_foreign_files_are_refused(tmp_path, ffcv_writer):
    import beton_data._ffcv  # noqa: F401
    from ffcv.fields import FloatField, IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    (tmp_path / "junk.beton").write_bytes(b"junk")
    (tmp_path / "zeros.beton").write_bytes(bytes(100_000))
    (tmp_path / "text.beton").write_text("id,label\n" * 1000)

    class Rows:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return float(i), i
    DatasetWriter(str(tmp_path / "fields.beton"), {"x": FloatField(), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Rows())

    class Jpegs:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return np.full((32, 32, 3), 100, np.uint8), i
    DatasetWriter(str(tmp_path / "jpeg.beton"), {"image": RGBImageField(write_mode="jpg"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Jpegs())

    expected = {"junk": "shorter than", "zeros": "not an FFCV .beton", "text": "not an FFCV .beton",
                "fields": "fields are x, label", "jpeg": "raw 32x32"}
    for name, words in expected.items():
        path = tmp_path / f"{name}.beton"
        for reader, read in _readers(path):
            assert words in _refused(read, path), (name, reader)


def test_size_and_labels_are_checked_against_the_manifest(tmp_path, pristine):
    folder = make_folder(tmp_path / "data", pristine)
    # a complete, valid .beton of other data put in the place of train.beton
    images, labels = _data(N - 1, 9)
    write_beton(folder / "train.beton", images, labels)
    assert "manifest.json records" in _refused(lambda: read_beton(folder / "train.beton"), folder / "train.beton")
    # bytes appended to a file
    (folder / "train.beton").write_bytes(pristine["train"][0] + b"\0" * 24)
    assert "unexpected bytes" in _refused(lambda: read_beton(folder / "train.beton"), folder / "train.beton")
    # a label beyond the manifest's classes
    make_folder(folder, pristine)
    data = dict(pristine)
    images, labels = data["test"][1], data["test"][2].copy()
    labels[4] = 10
    write_beton(folder / "test.beton", images, labels)
    m = read_manifest(folder)
    write_manifest(folder, source=m.source, source_kind=m.source_kind, source_sha256=m.source_sha256,
                   lossy_source=False, classes=m.classes, splits=m.splits,
                   files={**m.files, "test": FileRecord("test.beton", (folder / "test.beton").stat().st_size,
                                                        file_digest(folder / "test.beton"))},
                   created_utc=m.created_utc)
    assert "lists 10 classes" in _refused(lambda: read_beton(folder / "test.beton"), folder / "test.beton")


# ---- check_data and the digest cache -----------------------------------------------------------------

def _count_hashing(monkeypatch) -> list:
    calls = []
    real = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    return calls


def test_check_data_hashes_each_new_file_once(tmp_path, pristine, monkeypatch):
    folder = make_folder(tmp_path / "data", pristine)
    calls = _count_hashing(monkeypatch)
    said = []
    data = check_data(folder, say=said.append)
    assert sorted(calls) == ["test.beton", "train.beton"] and len(said) == 2 and "SHA-256" in said[0]
    assert data.paths == {"train": folder / "train.beton", "test": folder / "test.beton"}
    assert data.num_samples == {"train": N, "test": 300}
    assert data.manifest == read_manifest(folder) and data.identity == data.manifest.identity
    assert len(data.identity) == 64 and data.name == "cifar"

    calls.clear()
    check_data(folder)                                  # unchanged files: from the cache
    assert calls == []
    assert (tmp_path / "cache" / integrity.DIGEST_CACHE).is_file()
    check_data(folder, verify=True)                     # asked to: hashed afresh
    assert sorted(calls) == ["test.beton", "train.beton"]

    # a pixel changed: the file's stamp changes, so it is hashed again, and refused
    calls.clear()
    lay = L.Layout.plan(N)
    with open(folder / "train.beton", "r+b") as f:
        f.seek(lay.data_start + 1000)
        f.write(b"\x01")
    with pytest.raises(UserError, match="SHA-256"):
        check_data(folder)
    assert calls == ["train.beton"]


def test_digest_cache_lives_outside_a_read_only_data_folder(tmp_path, pristine, monkeypatch):
    folder = make_folder(tmp_path / "data", pristine)
    before = sorted(p.name for p in folder.iterdir())
    folder.chmod(0o555)
    try:
        check_data(folder, say=lambda *a: None)
        calls = _count_hashing(monkeypatch)
        check_data(folder)
        assert calls == []
    finally:
        folder.chmod(0o755)
    assert sorted(p.name for p in folder.iterdir()) == before
    # no usable cache at all (its folder cannot be created): every check hashes, none fails
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "file" / "cache"))
    check_data(folder, say=lambda *a: None)
    check_data(folder, say=lambda *a: None)
    assert len(calls) == 4


def test_check_data_without_manifest_and_missing_files(tmp_path, pristine):
    folder = make_folder(tmp_path / "bare", pristine, manifest=False)
    data = check_data(folder, say=lambda *a: None)
    assert data.manifest is None and data.name == "bare (no manifest)"
    digests = {s: file_digest(p) for s, p in data.paths.items()}
    from beton_data.manifest import identity_of
    assert data.identity == identity_of(digests)
    assert check_data(folder, verify=False).identity is None   # no hashing asked for, none recorded
    (folder / "test.beton").unlink()
    with pytest.raises(UserError, match=r"test.beton; run `fastcifar convert` first"):
        check_data(folder)
    with pytest.raises(UserError, match=r"nowhere/train.beton; run `fastcifar convert` first"):
        check_data(tmp_path / "nowhere")


def test_check_data_compares_counts_with_the_manifest(tmp_path, pristine):
    folder = make_folder(tmp_path / "data", pristine)
    m = json.loads((folder / "manifest.json").read_text())
    m["splits"]["test"]["count"] = 301
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="300 images, but manifest.json records 301"):
        check_data(folder, verify=False)
