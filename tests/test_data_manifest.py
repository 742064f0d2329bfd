"""manifest.json: one reader with one kind of error handling, and the answers other modules need
(class names, a display name, an identity of the data); AugConfig built from a recipe."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from beton_data.augment import AugConfig
from beton_data.errors import UserError
from beton_data.manifest import (FileRecord, class_names, data_identity, data_name, identity_of, read_manifest,
                                 write_manifest)
from beton_data.sources import CLASSES


def _write(folder, obj):
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return folder


FILES = {"train": FileRecord("train.beton", 100, "a" * 64), "test": FileRecord("test.beton", 50, "b" * 64)}


def test_write_and_read_back(tmp_path):
    m = write_manifest(tmp_path, source="/d/cifar10-jpeg-q75.tar.gz", source_kind="image-folder-archive",
                       source_sha256="c" * 64, lossy_source=True, classes=CLASSES,
                       splits={"train": {"count": 3}}, files=FILES, created_utc="2026-01-01T00:00:00+00:00")
    assert m == read_manifest(tmp_path) and m.format_version == 2 and m.classes == CLASSES
    assert m.files == FILES and m.record("test.beton") == FILES["test"] and m.record("x.beton") is None
    assert m.display_name == "cifar10-jpeg-q75 (lossy)" == data_name(tmp_path)
    assert m.identity == identity_of({"train": "a" * 64, "test": "b" * 64}) == data_identity(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]          # written atomically


def test_no_manifest_is_not_an_error(tmp_path):
    assert read_manifest(tmp_path) is None
    assert data_name(tmp_path) == f"{tmp_path.name} (no manifest)"
    assert data_identity(tmp_path) is None
    assert class_names(tmp_path, 10) == list(CLASSES) and class_names(None, 3) == ["0", "1", "2"]


@pytest.mark.parametrize("content, problem", [
    ("{", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ({"classes": "cat"}, "'classes' is not a list"),
    ({"lossy_source": "yes"}, "'lossy_source' is str"),
    ({"format_version": True}, "'format_version' is bool"),
    ({"files": {"train": {"name": "train.beton"}}}, "file record {'name': 'train.beton'} lacks"),
    ({"files": ["train.beton"]}, "'files' is list"),
])
def test_damaged_manifest_is_one_clear_error_everywhere(tmp_path, content, problem):
    folder = _write(tmp_path / "data", content)
    for fn in (read_manifest, data_name, data_identity, lambda f: class_names(f, 10)):
        with pytest.raises(UserError) as e:
            fn(folder)
        msg = str(e.value)
        assert msg.startswith(f"{folder / 'manifest.json'}: damaged manifest ({problem}") and "\n" not in msg
        assert f"fastcifar convert --out {folder}" in msg


def test_partial_and_older_manifests_read(tmp_path):
    # hand-written (only what a display name needs)
    m = read_manifest(_write(tmp_path / "a", {"source": "https://x/cifar-10-python.tar.gz", "lossy_source": False}))
    assert m.display_name == "cifar-10-python" and m.classes is None and m.files == {} and m.identity is None
    # format 1: file names without sizes or checksums
    m = read_manifest(_write(tmp_path / "b", {"format_version": 1, "files": {"train": "train.beton"},
                                              "classes": ["a", "b"]}))
    assert m.files == {"train": FileRecord("train.beton")} and m.identity is None
    assert class_names(tmp_path / "b", 2) == ["a", "b"] and class_names(tmp_path / "b", 10) == list(CLASSES)


def test_identity_depends_on_every_digest_and_split():
    a = identity_of({"train": "1" * 64, "test": "2" * 64})
    assert a == identity_of({"test": "2" * 64, "train": "1" * 64})
    assert a != identity_of({"train": "2" * 64, "test": "1" * 64})
    assert a != identity_of({"train": "1" * 64, "test": "3" * 64})
    assert identity_of({"train": "1" * 64, "test": None}) is None and identity_of({}) is None


# ---- AugConfig carries no defaults of its own --------------------------------------------------------

def test_augconfig_comes_from_the_recipe():
    with pytest.raises(TypeError):
        AugConfig()                        # nothing to drift from the recipes' values
    recipe = SimpleNamespace(flip=False, translate=3, cutout=8)        # anything with the attributes
    assert AugConfig.from_recipe(recipe) == AugConfig(flip=False, translate=3, cutout=8, pad_mode="reflect")
    assert AugConfig.from_recipe(SimpleNamespace(flip=True, translate=1, cutout=0, pad_mode="zeros")).pad_mode == "zeros"
    assert AugConfig.none().describe() == "none"
    assert AugConfig(flip=True, translate=2, cutout=4).describe() == "flip, translate 2 (reflect padding), cutout 4"


def test_training_loader_needs_an_augmentation(tmp_path):
    import numpy as np

    from beton_data import write_beton
    from beton_data.loaders import make_loader

    path = write_beton(tmp_path / "x.beton", np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
    with pytest.raises(ValueError, match="aug="):
        make_loader("gpu", path, 2, train=True)
    assert make_loader("gpu", path, 2, train=False).aug == AugConfig.none()


def test_inspect_shows_the_augmentation_the_chosen_recipe_trains_with(tmp_path):
    import numpy as np
    from typer.testing import CliRunner

    from beton_data import write_beton
    from fastcifar.cli import app
    from fastcifar.models import get_recipe

    path = write_beton(tmp_path / "x.beton", np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
    for args, model, tag in (([], "resnet_2111", "fast"), (["--recipe", "report"], "resnet_2111", "report"),
                             (["--model", "resnet_343w66"], "resnet_343w66", "fast")):
        r = CliRunner().invoke(app, ["inspect", str(path), "--samples", "1", *args])
        assert r.exit_code == 0, r.output
        expected = AugConfig.from_recipe(get_recipe(model, tag)).describe()
        assert f"{model}'s {tag} recipe: {expected})" in r.output
    # the fast recipes translate by 2, not the 4 an AugConfig default used to say
    assert "translate 2 " in CliRunner().invoke(app, ["inspect", str(path), "--samples", "1"]).output
