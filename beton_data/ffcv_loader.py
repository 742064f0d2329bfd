"""FFCV loader with numba-compiled augmentation ops whose randomness is a hash, not RNG state.

FFCV's own transforms call np.random inside parallel numba loops, so what a sample gets depends on
which thread ran it. Here each op's per-image kernel derives its draws from
(seed, epoch, sample index) (augment.py), which FFCV hands to ops that set `with_indices`.

The epoch has to reach compiled code without recompiling the pipeline every epoch. Numba freezes
globals and closure values at compile time, so each op declares itself non-JIT (jit_mode=False):
FFCV then calls the op's small Python driver once per batch, which reads the current epoch and
calls the op's numba kernel (compiled once, cached on disk, parallel over the batch).
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Optional, Tuple

import numba
import numpy as np
import torch
import beton_data._ffcv  # noqa: F401,I001  (first: keeps torch's thread count)
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder

from beton_data import augment as A
from beton_data.augment import CUTOUT_FILL, AugConfig, normalize
from beton_data.integrity import check_beton
from beton_data.loaders import BaseLoader

_jit = numba.njit(cache=True, nogil=True)
_mix32 = _jit(A.mix32)


@_jit
def _uniform(key, index, n):
    bits = _mix32(_mix32((index + key) & A.M32) ^ key)
    return (bits * n) >> 32


def _kernel(fn):
    return numba.njit(cache=True, nogil=True, parallel=True)(fn)


# ---- per-image kernels (batch of uint8 [B,32,32,3]) -------------------------------------------

@_kernel
def flip_kernel(images, dst, indices, key, invert):
    for i in numba.prange(images.shape[0]):
        if (_uniform(key, np.int64(indices[i]), 2) ^ invert) == 1:
            dst[i] = images[i, :, ::-1]
        else:
            dst[i] = images[i]
    return dst


@_kernel
def translate_kernel(images, dst, indices, key_y, key_x, p, reflect):
    for i in numba.prange(images.shape[0]):
        dy = _uniform(key_y, np.int64(indices[i]), 2 * p + 1) - p
        dx = _uniform(key_x, np.int64(indices[i]), 2 * p + 1) - p
        for y in range(32):
            sy = y + dy
            if sy < 0 or sy > 31:
                if not reflect:
                    dst[i, y] = 0
                    continue
                sy = -sy if sy < 0 else 62 - sy
            for x in range(32):
                sx = x + dx
                if sx < 0 or sx > 31:
                    if not reflect:
                        dst[i, y, x] = 0
                        continue
                    sx = -sx if sx < 0 else 62 - sx
                dst[i, y, x] = images[i, sy, sx]
    return dst


@_kernel
def cutout_kernel(images, indices, key_y, key_x, c, fill):
    # In place: the hole only overwrites pixels.
    for i in numba.prange(images.shape[0]):
        y0 = _uniform(key_y, np.int64(indices[i]), 32) - c // 2
        x0 = _uniform(key_x, np.int64(indices[i]), 32) - c // 2
        for y in range(max(y0, 0), min(y0 + c, 32)):
            for x in range(max(x0, 0), min(x0 + c, 32)):
                images[i, y, x] = fill
    return images


# ---- FFCV operations ----------------------------------------------------------------------------

class HashedOp(Operation):
    """An augmentation whose draws come from (seed, epoch, sample index); see module docstring."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed, self.epoch = seed, 0

    def key(self, stream: int) -> int:
        return A.stream_key(self.seed, self.epoch, stream)

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return (replace(previous_state, jit_mode=False),
                AllocationQuery(previous_state.shape, previous_state.dtype))


class RandomFlip(HashedOp):
    """Mirror left-right with probability 1/2 (alternate: coin of epoch 0, inverted in odd epochs)."""

    def __init__(self, seed: int, alternate: bool = False):
        super().__init__(seed)
        self.alternate = bool(alternate)

    def generate_code(self) -> Callable:
        def flip(images, dst, indices):
            key, invert = A.flip_key(self.seed, self.epoch, self.alternate)
            return flip_kernel(images, dst, indices, key, invert)
        flip.with_indices = True
        return flip


class RandomTranslate(HashedOp):
    """Crop of the image padded by p ('reflect' or 'zeros') at offsets uniform in -p..p."""

    def __init__(self, seed: int, padding: int, pad_mode: str = "reflect"):
        super().__init__(seed)
        self.padding, self.reflect = int(padding), pad_mode == "reflect"

    def generate_code(self) -> Callable:
        def translate(images, dst, indices):
            return translate_kernel(images, dst, indices, self.key(A.STREAM_DY), self.key(A.STREAM_DX),
                                    self.padding, self.reflect)
        translate.with_indices = True
        return translate


class RandomCutout(HashedOp):
    """Fill a c x c square (centre uniform over the image, clipped at borders) with the mean colour."""

    def __init__(self, seed: int, size: int):
        super().__init__(seed)
        self.size = int(size)
        self.fill = np.array(CUTOUT_FILL, dtype=np.uint8)

    def generate_code(self) -> Callable:
        def cutout(images, dst, indices):
            return cutout_kernel(images, indices, self.key(A.STREAM_CY), self.key(A.STREAM_CX),
                                 self.size, self.fill)
        cutout.with_indices = True
        return cutout

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return replace(previous_state, jit_mode=False), None


def augmentation_ops(aug: AugConfig, seed: int) -> list[HashedOp]:
    """The pipeline's augmentation steps, in the order augment.py defines."""
    ops: list[HashedOp] = []
    if aug.flip:
        ops.append(RandomFlip(seed, aug.alternate_flip))
    if aug.translate:
        ops.append(RandomTranslate(seed, aug.translate, aug.pad_mode))
    if aug.cutout:
        ops.append(RandomCutout(seed, aug.cutout))
    return ops


class _GivenOrder(TraversalOrder):
    """Hands FFCV the order our BaseLoader computes (FFCV's own orders cannot shard disjointly
    without padding, and Loader(order=<custom class>) is rejected by its type check in 1.0.2)."""

    def __init__(self, loader: Loader, owner: BaseLoader):
        super().__init__(loader)
        self.owner = owner

    def sample_order(self, epoch: int):
        return self.owner.order(epoch).astype(np.uint64)


# ---- the loader ---------------------------------------------------------------------------------

class FFCVLoader(BaseLoader):
    def __init__(self, path, num_workers: int | None = None, **kw):
        # FFCV's Reader trusts the file: a truncated one dies later inside a loader thread.
        num_total = check_beton(path).num_samples
        super().__init__(path, num_total, **kw)
        self.num_workers = num_workers or len(os.sched_getaffinity(0))
        self.ops = augmentation_ops(self.aug, self.seed)

        image_pipeline = [SimpleRGBImageDecoder(), *self.ops, ToTensor()]
        label_pipeline = [IntDecoder(), ToTensor()]
        if self.device.type == "cuda":
            # Asynchronous copy of the uint8 batch; normalization then runs on the GPU.
            image_pipeline.append(ToDevice(self.device, non_blocking=True))
            label_pipeline.append(ToDevice(self.device, non_blocking=True))
        # On the CPU there is no ToDevice: it would only copy into another pinned buffer
        # (pinning fails without CUDA; FFCV silently falls back).

        torch_threads = torch.get_num_threads()
        self.ffcv = Loader(self.path, batch_size=self.batch_size, num_workers=self.num_workers,
                           order=OrderOption.SEQUENTIAL, drop_last=self.drop_last,
                           pipelines={"image": image_pipeline, "label": label_pipeline},
                           seed=self.seed, os_cache=True)
        # FFCV's Loader sets torch's thread count to num_workers as a side effect; undo it.
        torch.set_num_threads(torch_threads)
        self.ffcv.traversal_order = _GivenOrder(self.ffcv, self)
        self.ffcv.first_traversal_order = self.order(0)

    def __iter__(self):
        epoch = self._next_epoch()
        for op in self.ops:
            op.epoch = epoch
        self.ffcv.next_epoch = epoch
        torch_threads = torch.get_num_threads()
        batches = iter(self.ffcv)
        try:
            for b, (images, labels) in enumerate(batches):
                if b == 0:
                    # FFCV's epoch thread sets torch's (process-wide) thread count to num_workers
                    # when it starts; by the first batch it has, so the caller's count comes back.
                    torch.set_num_threads(torch_threads)
                # FFCV recycles its output buffers a few batches later: normalize() makes new
                # tensors, and the labels are copied so callers may keep batches.
                yield (normalize(images.to(self.device, non_blocking=True), self.dtype),
                       labels.view(-1).to(self.device, copy=True))
        finally:
            batches.close()
            torch.set_num_threads(torch_threads)
