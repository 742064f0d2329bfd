"""One interface, two loaders.

    loader = make_loader("gpu", "beton_data/cifar10/train.beton", batch_size=512, train=True,
                         aug=AugConfig.from_recipe(recipe), device="cuda", dtype=torch.float16, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # [B,3,32,32] channels_last, normalized; int64 labels
            ...

- "gpu":  the whole split lives in device memory as uint8 and is augmented in batches with torch
          ops (how the fastest CIFAR-10 trainers feed a GPU). Also runs on the CPU.
- "ffcv": FFCV's Loader with numba-compiled augmentation ops running on CPU threads.

Both draw the same epoch order and, per sample, the same augmentation (see augment.py), so for one
(seed, epoch, rank, world_size) they yield identical batches. Iterating a loader uses its current
epoch and then advances it by one; set_epoch(e) chooses the epoch of the next iteration.

Sharding: rank r of world_size w takes every w-th sample of the epoch's permutation. When
drop_last is on (training), the permutation is first cut to a multiple of w so that all ranks see
the same number of samples and batches; the few samples cut differ from epoch to epoch.
"""
from __future__ import annotations

import numpy as np
import torch

from beton_data.augment import CIFAR_MEAN, CIFAR_STD, AugConfig, M32  # noqa: F401  (re-exported)

KINDS = ("ffcv", "gpu")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> np.ndarray:
    """Sample indices (int64) that `rank` visits in `epoch`: a function of its arguments only."""
    if shuffle:
        seq = np.random.SeedSequence([int(seed) & M32, int(epoch) & M32, 0x0CDE])
        order = np.random.Generator(np.random.PCG64(seq)).permutation(n)
    else:
        order = np.arange(n)
    if drop_last and world_size > 1:
        order = order[:n // world_size * world_size]
    return order[rank::world_size].astype(np.int64)


class BaseLoader:
    """Bookkeeping shared by both loaders: arguments, epoch, order, length."""

    def __init__(self, path, num_total: int, batch_size: int, train: bool, aug: AugConfig | None,
                 device, dtype, seed: int, drop_last: bool | None, rank: int, world_size: int,
                 shuffle: bool | None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.path = str(path)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        if train and aug is None:
            # No default augmentation here: it belongs to the recipe (AugConfig.from_recipe).
            raise ValueError("a training loader needs aug= (AugConfig.from_recipe(recipe), or AugConfig.none())")
        # The test split is never augmented, whatever `aug` says.
        self.aug = aug if train else AugConfig.none()
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = int(seed)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.shuffle = self.train if shuffle is None else bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_total = int(num_total)
        self.epoch = 0
        self.num_samples = len(self.order(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.num_total, self.seed, epoch, self.shuffle, self.rank,
                           self.world_size, self.drop_last)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def _next_epoch(self) -> int:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch


def make_loader(kind: str, path, batch_size: int, train: bool, aug: AugConfig | None = None,
                device="cpu", dtype=torch.float32, seed: int = 0, drop_last: bool | None = None,
                rank: int = 0, world_size: int = 1, num_workers: int | None = None,
                shuffle: bool | None = None):
    """A loader over the .beton `path`; see the module docstring. `aug` (required when
    train=True) is ignored when train=False; drop_last and shuffle default to `train`;
    num_workers (CPU threads of the FFCV loader) defaults to the CPUs this process may use and is
    ignored by the GPU loader. A missing, damaged or foreign file is refused (UserError) before
    anything is read from it: integrity.check_beton, structure and size."""
    from beton_data.errors import UserError

    args = dict(path=path, batch_size=batch_size, train=train, aug=aug, device=device, dtype=dtype,
                seed=seed, drop_last=drop_last, rank=rank, world_size=world_size, shuffle=shuffle)
    if kind not in KINDS:
        raise UserError(f"unknown loader kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "gpu":
        from beton_data.gpu_loader import GPULoader
        return GPULoader(**args)
    from beton_data.ffcv_loader import FFCVLoader
    return FFCVLoader(num_workers=num_workers, **args)
