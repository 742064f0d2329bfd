"""GPU-resident loader: the split is read once into device memory and augmented there in batches.

Per batch the work is one gather (which pixels go where: flip, translate and padding all become
source-index arithmetic), one select for the cutout square and the normalization, all with torch
ops on the device. The random draws and that index arithmetic are done for the whole epoch in
one go when it starts, so a batch costs about ten kernel launches whatever the augmentation.
Memory: the split as uint8 (150 MB for CIFAR-10's train set) plus ~30 MB of per-epoch indices.
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
        plan = self._plan(order, epoch) if self.aug.active else None
        n = len(self) * self.batch_size if self.drop_last else len(order)
        for start in range(0, n, self.batch_size):
            sl = slice(start, min(start + self.batch_size, n))
            idx = order[sl]
            if plan is None:
                batch = self.pixels.view(-1, 32, 32, 3)[idx]
            else:
                batch = self._augment({k: (v[sl] if v is not None else None) for k, v in plan.items()})
            yield normalize(batch, self.dtype), self.labels[idx]

    def _plan(self, order, epoch) -> dict:
        """Per-sample index arithmetic for the whole epoch at once (so that a batch is only a
        gather and two selects): for each output row y and column x, which pixel row / column
        of the stored image it reads, whether that is padding ('zeros' mode), and whether it
        lies in the cutout hole. out[y, x] = padded(flipped image)[y + p + dy, x + p + dx]."""
        aug, c, ar = self.aug, self.aug.cutout, self.coords
        d = draws(self.seed, epoch, order, aug)
        ys, valid_y = _source_index(ar[None, :] + d["dy"][:, None], aug.pad_mode)   # [n,32]
        xs, valid_x = _source_index(ar[None, :] + d["dx"][:, None], aug.pad_mode)   # [n,32]
        if aug.flip:
            xs = torch.where(d["flip"][:, None].bool(), 31 - xs, xs)
        plan = {"row": order[:, None] * 1024 + ys * 32, "col": xs,
                "valid_y": valid_y, "valid_x": valid_x, "hole_y": None, "hole_x": None}
        if c:
            y0 = (d["cy"] - c // 2)[:, None]
            x0 = (d["cx"] - c // 2)[:, None]
            plan["hole_y"] = (ar[None, :] >= y0) & (ar[None, :] < y0 + c)
            plan["hole_x"] = (ar[None, :] >= x0) & (ar[None, :] < x0 + c)
        return plan

    def _augment(self, p):
        out = self.pixels[p["row"][:, :, None] + p["col"][:, None, :]]             # [B,32,32,3]
        if p["valid_y"] is not None:
            valid = p["valid_y"][:, :, None, None] & p["valid_x"][:, None, :, None]
            out = out * valid
        if p["hole_y"] is not None:
            out = torch.where(p["hole_y"][:, :, None, None] & p["hole_x"][:, None, :, None], self.fill, out)
        return out
