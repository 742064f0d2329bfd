"""`fastcifar inspect`: what is in a .beton (or a converted folder), and what training sees.

Prints counts per class and per-channel pixel mean/std for each split, and writes a PNG: for
each class, `samples` images as stored (left) and the same images with a given training
augmentation (right, epoch 0, seed 0 — the exact pixels both loaders would produce). Every file
is checked first (integrity.check_beton); with verify=True also against the SHA-256 its
manifest records, hashed afresh.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from beton_data.augment import AugConfig, augment_numpy
from beton_data.beton import read_beton
from beton_data.errors import UserError
from beton_data.files import atomic_path, check_writable
from beton_data.integrity import SPLITS, check_beton
from beton_data.manifest import class_names

SCALE = 3      # each 32x32 image is drawn 96x96
GAP = 24       # between the two panels


def inspect(path, aug: AugConfig, aug_label: str = "", out=None, samples: int = 8,
            verify: bool = False, say=print) -> Path:
    """Print what `path` (a .beton or a converted folder) holds and write the sample grid with
    augmentation `aug` (described in the output as `aug_label`, e.g. "resnet_2111's fast
    recipe"); returns the PNG's path."""
    path = Path(path)
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    if path.is_dir():
        betons = [path / f"{s}.beton" for s in SPLITS if (path / f"{s}.beton").is_file()]
        if not betons:
            raise UserError(f"{path}: holds no train.beton/test.beton; run `fastcifar convert --out {path}` first")
        default_out = path / "inspect.png"
    elif path.is_file():
        betons = [path]
        default_out = path.with_name(f"{path.stem}_inspect.png")
    else:
        raise UserError(f"{path}: no such .beton file or folder; run `fastcifar convert` first")
    out = Path(out) if out is not None else default_out
    check_writable(out.parent, "the sample grid (--out)")

    # every file first: a damaged one is refused before anything is printed about the others
    checks = [check_beton(beton, verify=bool(verify), say=say) for beton in betons]
    grid_source = None
    for beton, checked in zip(betons, checks):
        images, labels = read_beton(beton)
        say(f"{beton}: {len(labels):,} images")
        if verify:
            if checked.record is not None and checked.record.sha256:
                say(f"  SHA-256 matches {checked.manifest.path}")
            else:
                say(f"  SHA-256 {checked.sha256} (no manifest records one: structure and size checked only)")
        classes = class_names(beton.parent, max(int(labels.max()) + 1, 10))
        counts = np.bincount(labels, minlength=len(classes))
        for i, n in enumerate(counts):
            say(f"  {i:2d} {classes[i]:<12s} {n:>7,}")
        pixels = images.reshape(-1, 3).astype(np.float64)
        mean, std = pixels.mean(0), pixels.std(0)
        say(f"  pixel mean (R,G,B, 0..255): {mean[0]:.3f} {mean[1]:.3f} {mean[2]:.3f}")
        say(f"  pixel std  (R,G,B, 0..255): {std[0]:.3f} {std[1]:.3f} {std[2]:.3f}")
        if grid_source is None:
            grid_source = (images, labels, classes)

    _write_grid(out, *grid_source, aug=aug, samples=samples)
    label = f"{aug_label}: " if aug_label else ""
    say(f"sample grid (left: stored, right: training augmentation, {label}{aug.describe()}): {out}")
    return out


def _write_grid(out: Path, images, labels, classes, aug: AugConfig, samples: int) -> None:
    from PIL import Image, ImageDraw

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
        draw.text((6, row * cell + cell // 2 - 6), classes[c], fill="black")
        for k in range(len(idx)):
            for panel, batch in enumerate((plain, augmented)):
                tile = Image.fromarray(batch[k]).resize((cell, cell), Image.NEAREST)
                x = label_w + panel * (samples * cell + GAP) + k * cell
                canvas.paste(tile, (x, row * cell))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
