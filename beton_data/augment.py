"""Training augmentation shared by both loaders: what it does, and where its randomness comes from.

Semantics (identical in the FFCV loader's numba ops and the GPU loader's torch ops), applied to a
32x32 uint8 image in this order:

1. flip       with probability 1/2, mirror left-right: F[y, x] = I[y, 31 - x].
              With `alternate_flip` the coin is tossed once, in epoch 0, and every later epoch
              inverts it (flipped in epoch e iff coin XOR (e mod 2)): each image is then seen
              mirrored in exactly every other epoch. Over any two consecutive epochs the network
              sees both views of every image, where independent coins would repeat one view in
              a quarter of the images -- worth having when a run lasts only ~10 epochs.
2. translate  draw dy, dx independently and uniformly from the integers -p..p (p = `translate`);
              out[y, x] = P[y + p + dy, x + p + dx] where P is F padded by p on every side
              ("reflect": mirror without repeating the edge, like torch's reflect padding;
              "zeros": black). Equivalently: a 32x32 crop of the padded image at offset
              (p + dy, p + dx). p must be below 32.
3. cutout     draw a centre cy, cx independently and uniformly from 0..31; the square of side
              c = `cutout`, rows cy - c//2 .. cy - c//2 + c - 1 (columns likewise), clipped to the
              image, is filled with the mean colour (CUTOUT_FILL). Because that is the dataset
              mean, the hole is ~0 after normalization, as in DeVries & Taylor's cutout, which
              zeroes the normalized tensor. Near a border the hole is smaller than c x c.

Randomness: every draw is a hash of (seed, epoch, sample index, which draw), not a random-number
generator's state. A sample's augmentation therefore does not depend on thread scheduling, batch
size, worker count, rank, or which loader produced it: the FFCV loader and the GPU loader give the
same pixels for the same (seed, epoch). The hash works on 32-bit values held in int64 with
multipliers below 2**31, so no product overflows and the same function runs on Python ints,
numpy arrays, numba scalars and torch tensors (CPU or CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

# Per-channel mean and standard deviation over all pixels of the original CIFAR-10 training
# images, in 0..255 pixel units (= 0.4914, 0.4822, 0.4465 and 0.2470, 0.2435, 0.2616 in 0..1).
CIFAR_MEAN = (125.307, 122.950, 113.865)
CIFAR_STD = (62.993, 62.089, 66.705)
CUTOUT_FILL = tuple(int(round(m)) for m in CIFAR_MEAN)  # (125, 123, 114)

PAD_MODES = ("reflect", "zeros")
M32 = 0xFFFFFFFF

# One stream per kind of draw, so that e.g. the flip coin and the x offset are independent.
STREAM_FLIP, STREAM_DY, STREAM_DX, STREAM_CY, STREAM_CX = 1, 2, 3, 4, 5


@dataclass
class AugConfig:
    """Training augmentation. flip, translate and cutout have no defaults here: what a run
    trains with is its recipe's, so build one with `from_recipe` (or `none()`)."""
    flip: bool
    translate: int           # p: offsets uniform in -p..p
    cutout: int              # c: side of the filled square; 0 = off
    pad_mode: str = "reflect"  # or "zeros"
    alternate_flip: bool = False  # flip coin tossed once, then inverted every epoch (see above)

    def __post_init__(self):
        if not 0 <= int(self.translate) < 32:
            raise ValueError(f"translate must be in 0..31, got {self.translate}")
        if not 0 <= int(self.cutout) <= 32:
            raise ValueError(f"cutout must be in 0..32, got {self.cutout}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
        self.translate, self.cutout, self.flip = int(self.translate), int(self.cutout), bool(self.flip)
        self.alternate_flip = bool(self.alternate_flip)

    @classmethod
    def none(cls) -> "AugConfig":
        return cls(flip=False, translate=0, cutout=0)

    @classmethod
    def from_recipe(cls, recipe) -> "AugConfig":
        """The augmentation of any object with `flip`, `translate` and `cutout` attributes (a
        fastcifar Recipe; `pad_mode` and `alternate_flip` too if it has them)."""
        return cls(flip=recipe.flip, translate=recipe.translate, cutout=recipe.cutout,
                   pad_mode=getattr(recipe, "pad_mode", "reflect"),
                   alternate_flip=getattr(recipe, "alternate_flip", False))

    def describe(self) -> str:
        """e.g. 'flip, translate 2 (reflect padding), cutout 8' or 'none'."""
        parts = ([("alternating " if self.alternate_flip else "") + "flip"] if self.flip else []) + \
                ([f"translate {self.translate} ({self.pad_mode} padding)"] if self.translate else []) + \
                ([f"cutout {self.cutout}"] if self.cutout else [])
        return ", ".join(parts) or "none"

    @property
    def active(self) -> bool:
        return self.flip or self.translate > 0 or self.cutout > 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def mix32(x):
    """A 32-bit integer hash (xorshift-multiply rounds); x holds values in 0..2**32-1."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & M32
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & M32
    return x ^ (x >> 15)


def stream_key(seed: int, epoch: int, stream: int) -> int:
    """The per-(seed, epoch, draw kind) key; combined with a sample index by sample_bits."""
    h = mix32(int(seed) & M32)
    h = mix32(h ^ (int(epoch) & M32))
    return mix32(h ^ stream)


def sample_bits(key, index):
    """32 random bits for one sample (index: int, numpy int64 array or torch int64 tensor)."""
    return mix32(mix32((index + key) & M32) ^ key)


def flip_key(seed: int, epoch: int, alternate: bool) -> tuple[int, int]:
    """(key, invert) of the flip coin: flipped iff uniform_int(sample_bits(key, i), 2) ^ invert.
    Independent coins use this epoch's key; alternating ones epoch 0's, inverted in odd epochs."""
    if alternate:
        return stream_key(seed, 0, STREAM_FLIP), int(epoch) & 1
    return stream_key(seed, epoch, STREAM_FLIP), 0


def uniform_int(bits, n: int):
    """Map 32 random bits to an integer uniform in 0..n-1 (multiply-shift; n < 2**31)."""
    return (bits * n) >> 32


def draws(seed: int, epoch: int, index, aug: AugConfig) -> dict:
    """All random draws for the samples `index` (reference implementation; works on numpy and
    torch). Returns flip (0/1), dy, dx (in -p..p) and cy, cx (in 0..31)."""
    p = aug.translate
    out = {}
    key, invert = flip_key(seed, epoch, aug.alternate_flip)
    out["flip"] = uniform_int(sample_bits(key, index), 2) ^ invert
    out["dy"] = uniform_int(sample_bits(stream_key(seed, epoch, STREAM_DY), index), 2 * p + 1) - p
    out["dx"] = uniform_int(sample_bits(stream_key(seed, epoch, STREAM_DX), index), 2 * p + 1) - p
    out["cy"] = uniform_int(sample_bits(stream_key(seed, epoch, STREAM_CY), index), 32)
    out["cx"] = uniform_int(sample_bits(stream_key(seed, epoch, STREAM_CX), index), 32)
    return out


def augment_numpy(images: np.ndarray, indices: np.ndarray, seed: int, epoch: int, aug: AugConfig) -> np.ndarray:
    """Slow, obvious reference: the augmentation of uint8 [B,32,32,3] images, one at a time.
    The tests compare both loaders against it; `inspect` uses it to draw augmented samples."""
    d = draws(seed, epoch, np.asarray(indices, dtype=np.int64), aug)
    p, c = aug.translate, aug.cutout
    out = np.empty_like(images)
    for b, img in enumerate(images):
        if aug.flip and d["flip"][b]:
            img = img[:, ::-1]
        if p:
            mode = "reflect" if aug.pad_mode == "reflect" else "constant"
            padded = np.pad(img, ((p, p), (p, p), (0, 0)), mode=mode)
            y0, x0 = p + d["dy"][b], p + d["dx"][b]
            img = padded[y0:y0 + 32, x0:x0 + 32]
        img = img.copy()
        if c:
            y0, x0 = d["cy"][b] - c // 2, d["cx"][b] - c // 2
            img[max(y0, 0):max(y0 + c, 0), max(x0, 0):max(x0 + c, 0)] = CUTOUT_FILL
        out[b] = img
    return out


def normalize(images_nhwc_u8, dtype):
    """uint8 [B,32,32,3] torch tensor -> normalized [B,3,32,32] `dtype`, channels_last.

    The arithmetic runs on the contiguous NHWC tensor (fast elementwise kernels), in float32,
    cast once at the end; the NHWC result permuted to NCHW *is* the channels_last layout, so the
    layout costs no copy. One shared function, so that both loaders give bit-identical batches."""
    mean, inv_std = _norm_constants(images_nhwc_u8.device)
    x = images_nhwc_u8.float().sub_(mean).mul_(inv_std)
    return x.to(dtype).permute(0, 3, 1, 2)


_NORM_CACHE: dict = {}


def _norm_constants(device):
    # Made once per device: building them per batch would cost a host-to-device copy each time.
    import torch
    key = str(device)
    if key not in _NORM_CACHE:
        mean = torch.tensor(CIFAR_MEAN, dtype=torch.float32)
        inv_std = 1.0 / torch.tensor(CIFAR_STD, dtype=torch.float32)
        _NORM_CACHE[key] = (mean.to(device), inv_std.to(device))
    return _NORM_CACHE[key]
