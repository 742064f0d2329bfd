"""Both loaders: augmentation semantics and statistics, determinism, order, length, sharding.

Two synthetic betons whose labels are the sample index (so every batch says which samples it
holds): one of random images, and one where every image encodes pixel coordinates
(R = 4x + 2, G = 4y + 2, B = 200), so flips, offsets, padding and cutout can be read back
from the output pixels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from beton_data import write_beton
from beton_data.augment import CIFAR_MEAN, CIFAR_STD, CUTOUT_FILL, AugConfig, augment_numpy, draws, normalize
from beton_data.loaders import epoch_order, make_loader
from fastcifar.errors import UserError

N = 600
KINDS = ["gpu", "ffcv"]
AUG = AugConfig(flip=True, translate=4, cutout=8)


@pytest.fixture(scope="module")
def random_beton(tmp_path_factory):
    path = tmp_path_factory.mktemp("loaders") / "random.beton"
    images = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    write_beton(path, images, np.arange(N))
    return path, images


@pytest.fixture(scope="module")
def coord_beton(tmp_path_factory):
    path = tmp_path_factory.mktemp("loaders") / "coords.beton"
    y, x = np.mgrid[0:32, 0:32]
    img = np.stack([4 * x + 2, 4 * y + 2, np.full_like(x, 200)], -1).astype(np.uint8)
    write_beton(path, np.repeat(img[None], N, 0), np.arange(N))
    return path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Undo the normalization: [B,3,32,32] float -> uint8 [B,32,32,3] (exact for float32)."""
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = (images.float() * std + mean).round()
    assert x.min() >= 0 and x.max() <= 255
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def cat(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


_cache = {}


def loader(kind, path, **kw):
    """Loaders are cached per configuration: each new FFCV Loader compiles its pipeline."""
    key = (kind, str(path), tuple(sorted((k, repr(v)) for k, v in kw.items())))
    if key not in _cache:
        _cache[key] = make_loader(kind, path, **kw)
    return _cache[key]


# ---- output format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_batch_format(kind, random_beton):
    path, _ = random_beton
    ld = loader(kind, path, batch_size=64, train=True, aug=AUG, seed=1)
    images, labels = next(iter(ld))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == (64,) and labels.dtype == torch.int64
    half = make_loader("gpu", path, batch_size=16, train=False, dtype=torch.float16)
    images, _ = next(iter(half))
    assert images.dtype == torch.float16 and images.is_contiguous(memory_format=torch.channels_last)


# ---- exact semantics: both loaders equal the reference, and each other --------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("aug", [AUG, AugConfig(flip=True, translate=3, cutout=5, pad_mode="zeros")],
                         ids=["reflect", "zeros"])
def test_loader_matches_reference_augmentation(kind, aug, random_beton):
    path, images = random_beton
    ld = loader(kind, path, batch_size=100, train=True, aug=aug, seed=7)
    for epoch in (0, 3):
        got, idx = cat(epoch_batches(ld, epoch))
        idx = idx.numpy()
        np.testing.assert_array_equal(idx, epoch_order(N, 7, epoch, shuffle=True, drop_last=True))
        ref = normalize(torch.from_numpy(augment_numpy(images[idx], idx, 7, epoch, aug)), torch.float32)
        assert torch.equal(got, ref)


def test_ffcv_and_gpu_loaders_give_identical_batches(random_beton):
    path, _ = random_beton
    g = loader("gpu", path, batch_size=100, train=True, aug=AUG, seed=7)
    f = loader("ffcv", path, batch_size=100, train=True, aug=AUG, seed=7)
    for (a, la), (b, lb) in zip(epoch_batches(g, 2), epoch_batches(f, 2)):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_ffcv_independent_of_worker_count(random_beton):
    path, _ = random_beton
    one = make_loader("ffcv", path, batch_size=100, train=True, aug=AUG, seed=7, num_workers=1)
    two = loader("ffcv", path, batch_size=100, train=True, aug=AUG, seed=7)
    for (a, la), (b, lb) in zip(epoch_batches(one, 1), epoch_batches(two, 1)):
        assert torch.equal(a, b) and torch.equal(la, lb)


# ---- semantics read back from coordinate images -------------------------------------------------------

def decode_coords(out: np.ndarray, p: int):
    """Recover flip, dy, dx and the cutout mask of each coordinate-coded output image."""
    hole = np.all(out == np.array(CUTOUT_FILL, np.uint8), -1)
    sx = (out[..., 0].astype(int) - 2) // 4
    sy = (out[..., 1].astype(int) - 2) // 4
    flip, dy, dx = [], [], []
    for b in range(len(out)):
        ok = ~hole[b]
        # Inside p..31-p no padding is involved: source = output + offset (x mirrored if flipped).
        ys, xs = np.nonzero(ok[p:32 - p, p:32 - p])
        ys, xs = ys + p, xs + p
        # Unflipped: sx - x is the constant dx. Flipped: sx = 31 - (x + dx).
        f = int(len(np.unique(sx[b, ys, xs] - xs)) != 1)
        flip.append(f)
        dy.append(int(np.unique(sy[b, ys, xs] - ys)[0]))
        ex = (31 - sx[b, ys, xs]) - xs if f else sx[b, ys, xs] - xs
        assert len(np.unique(ex)) == 1 and len(np.unique(sy[b, ys, xs] - ys)) == 1
        dx.append(int(ex[0]))
    return np.array(flip), np.array(dy), np.array(dx), hole


@pytest.mark.parametrize("kind", KINDS)
def test_augmentation_statistics(kind, coord_beton):
    p, c = 4, 8
    ld = loader(kind, coord_beton, batch_size=100, train=True, aug=AugConfig(flip=True, translate=p, cutout=c), seed=3)
    flips, dys, dxs, holes = [], [], [], []
    for epoch in (0, 1):
        images, idx = cat(epoch_batches(ld, epoch))
        f, dy, dx, hole = decode_coords(to_uint8(images), p)
        d = draws(3, epoch, idx.numpy(), AugConfig(flip=True, translate=p, cutout=c))
        # What the pixels show is exactly what the hash drew.
        np.testing.assert_array_equal(f, d["flip"])
        np.testing.assert_array_equal(dy, d["dy"])
        np.testing.assert_array_equal(dx, d["dx"])
        for b in range(len(idx)):
            y0, x0 = d["cy"][b] - c // 2, d["cx"][b] - c // 2
            want = np.zeros((32, 32), bool)
            want[max(y0, 0):y0 + c, max(x0, 0):x0 + c] = True
            np.testing.assert_array_equal(hole[b], want)
        flips.append(f), dys.append(dy), dxs.append(dx), holes.append(hole)
    flips, dys, dxs, holes = map(np.concatenate, (flips, dys, dxs, holes))
    n = len(flips)                                         # 1,200 samples
    assert abs(flips.mean() - 0.5) < 0.06                  # ~4 standard deviations
    for offsets in (dys, dxs):
        assert set(offsets) == set(range(-p, p + 1))       # exactly -p..p, all reached
        counts = np.bincount(offsets + p)
        assert counts.min() > 0.6 * n / (2 * p + 1) and counts.max() < 1.4 * n / (2 * p + 1)
    assert np.corrcoef(dys, dxs)[0, 1] ** 2 < 0.01
    sizes = holes.sum((1, 2))
    assert sizes.max() == c * c and sizes.min() >= (c // 2) ** 2   # clipped at borders, never gone
    # Centres uniform over the image: every pixel row is covered by some hole, none by all.
    row_cover = holes.any(2).mean(0)
    assert row_cover.min() > 0.1 and row_cover.max() < 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_alternating_flip_mirrors_each_image_every_other_epoch(kind, coord_beton):
    alt = AugConfig(flip=True, translate=0, cutout=0, alternate_flip=True)
    ld = loader(kind, coord_beton, batch_size=100, train=True, aug=alt, seed=3)
    seen = {}
    for epoch in range(4):
        images, idx = cat(epoch_batches(ld, epoch))
        f = decode_coords(to_uint8(images), 0)[0]
        np.testing.assert_array_equal(f, draws(3, epoch, idx.numpy(), alt)["flip"])   # pixels = draws
        seen[epoch] = dict(zip(idx.tolist(), f.tolist()))
    common = set.intersection(*(set(d) for d in seen.values()))
    assert len(common) > N // 2
    coin = np.array([seen[0][i] for i in sorted(common)])
    assert abs(coin.mean() - 0.5) < 0.1                          # epoch 0 is a fair coin ...
    for epoch in (1, 2, 3):                                        # ... inverted in odd epochs only
        later = np.array([seen[epoch][i] for i in sorted(common)])
        np.testing.assert_array_equal(later, coin ^ (epoch & 1))
    # independent coins do not alternate: a quarter of the images keep one view over two epochs
    ind = AugConfig(flip=True, translate=0, cutout=0)
    a, b = (draws(3, e, np.arange(N), ind)["flip"] for e in (0, 1))
    assert 0.15 < np.mean(a == b) < 0.85
    assert alt.describe() == "alternating flip"


@pytest.mark.parametrize("kind", KINDS)
def test_padding_modes(kind, coord_beton):
    p = 4
    for mode in ("zeros", "reflect"):
        ld = loader(kind, coord_beton, batch_size=200, train=True,
                    aug=AugConfig(flip=False, translate=p, cutout=0, pad_mode=mode), seed=5)
        images, idx = next(iter(ld))
        out = to_uint8(images)
        d = draws(5, ld.epoch - 1, idx.numpy(), AugConfig(flip=False, translate=p, cutout=0))
        for b in range(len(out)):
            rows = np.arange(32) + d["dy"][b]
            cols = np.arange(32) + d["dx"][b]
            if mode == "zeros":
                outside = (rows[:, None] < 0) | (rows[:, None] > 31) | (cols[None] < 0) | (cols[None] > 31)
                assert np.all(out[b][outside] == 0) and np.all(out[b][~outside] != 0)
            else:   # reflect without repeating the edge: -1 -> 1, 32 -> 30
                ry = np.where(rows < 0, -rows, np.where(rows > 31, 62 - rows, rows))
                rx = np.where(cols < 0, -cols, np.where(cols > 31, 62 - cols, cols))
                np.testing.assert_array_equal((out[b, :, :, 0].astype(int) - 2) // 4, np.broadcast_to(rx, (32, 32)))
                np.testing.assert_array_equal((out[b, :, :, 1].astype(int) - 2) // 4,
                                              np.broadcast_to(ry[:, None], (32, 32)))


# ---- determinism and order -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_epoch_identical_other_epoch_or_seed_differs(kind, random_beton):
    path, _ = random_beton
    a = loader(kind, path, batch_size=100, train=True, aug=AUG, seed=11)
    b = make_loader("gpu", path, batch_size=100, train=True, aug=AUG, seed=11)   # a fresh loader
    x0, l0 = cat(epoch_batches(a, 4))
    x1, l1 = cat(epoch_batches(b, 4))
    assert torch.equal(x0, x1) and torch.equal(l0, l1)
    x2, l2 = cat(epoch_batches(a, 5))
    assert not torch.equal(l0, l2)
    # Same samples, other epoch: other augmentation for (nearly) every sample.
    same = [torch.equal(x0[(l0 == i).nonzero()[0, 0]], x2[(l2 == i).nonzero()[0, 0]]) for i in l0[:200].tolist()
            if (l2 == i).any()]
    assert np.mean(same) < 0.1
    x3, l3 = cat(epoch_batches(make_loader("gpu", path, batch_size=100, train=True, aug=AUG, seed=12), 4))
    assert not torch.equal(l0, l3)


def test_iteration_advances_epoch(random_beton):
    path, _ = random_beton
    ld = make_loader("gpu", path, batch_size=100, train=True, aug=AUG, seed=11)
    first = cat(list(ld))[1]
    second = cat(list(ld))[1]
    assert ld.epoch == 2 and not torch.equal(first, second)
    ld.set_epoch(0)
    assert torch.equal(cat(list(ld))[1], first)


@pytest.mark.parametrize("kind", KINDS)
def test_test_split_unaugmented_in_order(kind, random_beton):
    path, images = random_beton
    ld = loader(kind, path, batch_size=128, train=False, aug=AUG, seed=3)   # aug must be ignored
    assert not ld.aug.active and not ld.drop_last and len(ld) == 5
    for epoch in (0, 1):
        got, idx = cat(epoch_batches(ld, epoch))
        np.testing.assert_array_equal(idx.numpy(), np.arange(N))
        np.testing.assert_array_equal(to_uint8(got), images)


@pytest.mark.parametrize("kind", KINDS)
def test_len_and_drop_last(kind, random_beton):
    path, _ = random_beton
    for drop_last, n_batches, last in ((True, 9, 64), (False, 10, N - 9 * 64)):
        ld = loader(kind, path, batch_size=64, train=True, aug=AUG, drop_last=drop_last)
        batches = epoch_batches(ld, 0)
        assert len(ld) == len(batches) == n_batches
        assert [len(b[1]) for b in batches] == [64] * 9 + ([last] if not drop_last else [])
        assert ld.num_samples == N


@pytest.mark.parametrize("kind", KINDS)
def test_rank_shards_disjoint_and_covering(kind, random_beton):
    path, _ = random_beton
    ws = 4   # 600 = 4 x 150
    seen = []
    for rank in range(ws):
        ld = make_loader(kind, path, batch_size=50, train=True, aug=AUG, seed=9, rank=rank, world_size=ws,
                         drop_last=False)
        assert ld.num_samples == N // ws
        seen.append(cat(epoch_batches(ld, 3))[1].numpy())
    allidx = np.concatenate(seen)
    assert len(allidx) == N and len(np.unique(allidx)) == N


def test_uneven_sharding():
    n, ws = 10, 3
    eval_shards = [epoch_order(n, 0, 1, True, r, ws, drop_last=False) for r in range(ws)]
    assert sorted(np.concatenate(eval_shards)) == list(range(n))
    train_shards = [epoch_order(n, 0, 1, True, r, ws, drop_last=True) for r in range(ws)]
    assert {len(s) for s in train_shards} == {3}   # equal per rank: lockstep for DDP
    assert len(np.unique(np.concatenate(train_shards))) == 9


def test_reference_draw_ranges():
    aug = AugConfig(flip=True, translate=2, cutout=4)
    d = draws(0, 0, np.arange(20000), aug)
    assert set(d["dy"]) == set(d["dx"]) == {-2, -1, 0, 1, 2}
    assert set(d["cy"]) == set(d["cx"]) == set(range(32)) and set(d["flip"]) == {0, 1}
    t = draws(0, 0, torch.arange(20000), aug)
    for k in d:
        np.testing.assert_array_equal(t[k].numpy(), d[k])   # numpy and torch hash agree


def test_bad_arguments(random_beton, tmp_path):
    path, _ = random_beton
    with pytest.raises(UserError, match="unknown loader kind"):
        make_loader("dali", path, batch_size=8, train=True)
    with pytest.raises(UserError, match="convert"):
        make_loader("gpu", tmp_path / "none.beton", batch_size=8, train=True)
    (tmp_path / "junk.beton").write_bytes(b"junk")
    for kind in KINDS:
        with pytest.raises(UserError, match="junk.beton"):
            make_loader(kind, tmp_path / "junk.beton", batch_size=8, train=True)
    with pytest.raises(ValueError):
        AugConfig(flip=True, translate=4, cutout=0, pad_mode="edge")
    with pytest.raises(ValueError):
        make_loader("gpu", path, batch_size=8, train=True, aug=AUG, rank=2, world_size=2)


def test_using_ffcv_keeps_torch_threads(tmp_path):
    """Importing ffcv sets torch's thread count to 1; reading a beton and building either
    loader must leave it as it was (in a fresh process, where ffcv is not imported yet)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import numpy as np, torch
        torch.set_num_threads(3)
        from beton_data import read_beton, write_beton
        from beton_data.loaders import make_loader
        p = {str(tmp_path / "t.beton")!r}
        write_beton(p, np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
        read_beton(p)
        for kind in ("gpu", "ffcv"):
            make_loader(kind, p, 2, train=False)
        print(torch.get_num_threads())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "3"
