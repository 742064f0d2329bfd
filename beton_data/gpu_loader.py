"""GPU-resident loader: the split is read once into device memory and augmented there in batches.

Per batch the work is one gather (which pixels go where: flip, translate and padding all become
source-index arithmetic), one select for the cutout square and the normalization, all with torch
ops on the device. The per-sample random draws of a whole epoch are hashed in one go when the
epoch starts, so a batch costs a fixed handful of kernel launches.
"""
from __future__ import annotations

import torch

from beton_data.augment import CUTOUT_FILL, draws, normalize
from beton_data.beton import read_beton
from beton_data.loaders import BaseLoader


def _source_index(t: torch.Tensor, pad_mode: str):
    """Map coordinates t (any range within -31..62) to source coordinates 0..31 and validity."""
    if pad_mode == "reflect":
        t = torch.where(t < 0, -t, t)
        t = torch.where(t > 31, 62 - t, t)
        return t, None
    valid = (t >= 0) & (t <= 31)
    return t.clamp(0, 31), valid


class GPULoader(BaseLoader):
    def __init__(self, path, **kw):
        images, labels = read_beton(path)
        super().__init__(path, len(labels), **kw)
        # [N*1024, 3]: one row per pixel, so a batch is a single row gather.
        self.pixels = torch.from_numpy(images).to(self.device).view(-1, 3)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.fill = torch.tensor(CUTOUT_FILL, dtype=torch.uint8, device=self.device)
        self.coords = torch.arange(32, device=self.device)

    def __iter__(self):
        epoch = self._next_epoch()
        order = torch.from_numpy(self.order(epoch)).to(self.device)
        aug = self.aug
        d = draws(self.seed, epoch, order, aug) if aug.active else None
        n = len(self) * self.batch_size if self.drop_last else len(order)
        for start in range(0, n, self.batch_size):
            sl = slice(start, min(start + self.batch_size, n))
            idx = order[sl]
            batch = self._augment(idx, {k: v[sl] for k, v in d.items()}) if d else self._plain(idx)
            yield normalize(batch, self.dtype), self.labels[idx]

    def _plain(self, idx):
        return self.pixels.view(-1, 32, 32, 3)[idx]

    def _augment(self, idx, d):
        aug, c, ar = self.aug, self.aug.cutout, self.coords
        # out[y, x] = padded(flipped image)[y + p + dy, x + p + dx]; see augment.py.
        ys, valid_y = _source_index(ar[None, :] + d["dy"][:, None], aug.pad_mode)   # [B,32]
        xs, valid_x = _source_index(ar[None, :] + d["dx"][:, None], aug.pad_mode)   # [B,32]
        if aug.flip:
            xs = torch.where(d["flip"][:, None].bool(), 31 - xs, xs)
        src = idx[:, None, None] * 1024 + ys[:, :, None] * 32 + xs[:, None, :]      # [B,32,32]
        out = self.pixels[src]                                                     # [B,32,32,3]
        if valid_y is not None:
            out = out * (valid_y[:, :, None] & valid_x[:, None, :]).unsqueeze(-1).to(torch.uint8)
        if c:
            y0 = (d["cy"] - c // 2)[:, None]
            x0 = (d["cx"] - c // 2)[:, None]
            in_y = (ar[None, :] >= y0) & (ar[None, :] < y0 + c)
            in_x = (ar[None, :] >= x0) & (ar[None, :] < x0 + c)
            out = torch.where((in_y[:, :, None] & in_x[:, None, :]).unsqueeze(-1), self.fill, out)
        return out
