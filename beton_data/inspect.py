"""`fastcifar inspect`: what is in a .beton (or a converted folder), and what training sees.

Prints counts per class and per-channel pixel mean/std for each split, and writes a PNG: for
each class, `samples` images as stored (left) and the same images with the default training
augmentation (right, epoch 0, seed 0 — the exact pixels both loaders would produce).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from beton_data.augment import AugConfig, augment_numpy
from beton_data.beton import read_beton
from beton_data.sources import CLASSES
from beton_data.errors import UserError

SCALE = 3      # each 32x32 image is drawn 96x96
GAP = 24       # between the two panels


def inspect(path, out=None, samples: int = 8) -> Path:
    path = Path(path)
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    if path.is_dir():
        betons = [path / f"{s}.beton" for s in ("train", "test") if (path / f"{s}.beton").is_file()]
        if not betons:
            raise UserError(f"{path}: holds no train.beton/test.beton; run `fastcifar convert --out {path}` first")
        default_out = path / "inspect.png"
        manifest_path = path / "manifest.json"
    elif path.is_file():
        betons = [path]
        default_out = path.with_name(f"{path.stem}_inspect.png")
        manifest_path = path.with_name("manifest.json")
    else:
        raise UserError(f"{path}: no such .beton file or folder; run `fastcifar convert` first")
    classes = list(CLASSES)
    if manifest_path.is_file():
        try:
            classes = json.loads(manifest_path.read_text()).get("classes", classes)
        except ValueError:
            pass

    grid_source = None
    for beton in betons:
        images, labels = read_beton(beton)
        print(f"{beton}: {len(labels):,} images")
        counts = np.bincount(labels, minlength=len(classes))
        for i, n in enumerate(counts):
            name = classes[i] if i < len(classes) else str(i)
            print(f"  {i:2d} {name:<12s} {n:>7,}")
        pixels = images.reshape(-1, 3).astype(np.float64)
        mean, std = pixels.mean(0), pixels.std(0)
        print(f"  pixel mean (R,G,B, 0..255): {mean[0]:.3f} {mean[1]:.3f} {mean[2]:.3f}")
        print(f"  pixel std  (R,G,B, 0..255): {std[0]:.3f} {std[1]:.3f} {std[2]:.3f}")
        if grid_source is None:
            grid_source = (images, labels)

    out = Path(out) if out is not None else default_out
    _write_grid(out, *grid_source, classes=classes, samples=samples)
    print(f"sample grid (left: stored, right: training augmentation {AugConfig().as_dict()}): {out}")
    return out


def _write_grid(out: Path, images, labels, classes, samples: int) -> None:
    from PIL import Image, ImageDraw

    aug = AugConfig()
    present = [c for c in range(len(classes)) if np.any(labels == c)]
    cell = 32 * SCALE
    label_w = 110
    width = label_w + 2 * samples * cell + GAP
    height = len(present) * cell
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for row, c in enumerate(present):
        idx = np.flatnonzero(labels == c)[:samples]
        plain = images[idx]
        augmented = augment_numpy(plain, idx, seed=0, epoch=0, aug=aug)
        draw.text((6, row * cell + cell // 2 - 6), classes[c] if c < len(classes) else str(c), fill="black")
        for k in range(len(idx)):
            for panel, batch in enumerate((plain, augmented)):
                tile = Image.fromarray(batch[k]).resize((cell, cell), Image.NEAREST)
                x = label_w + panel * (samples * cell + GAP) + k * cell
                canvas.paste(tile, (x, row * cell))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
