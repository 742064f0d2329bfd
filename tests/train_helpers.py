"""Shared by tests/test_train*.py: a tiny learnable data set and a tiny zoo model on the CPU."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from beton_data import write_beton

ROOT = Path(__file__).resolve().parents[1]
MODEL = "speedrun_net"          # a real zoo model, shrunk by its builder options:
TINY = {"widths": [8, 16, 16, 16], "logit_scale": 1.0}   # ~13k parameters, milliseconds a step
CLI = [sys.executable, "-m", "fastcifar.cli"]

# one distinct colour per class: learnable in a few steps, even under flips and translations
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 128], [0, 0, 0]],
                   dtype=np.float32)


def make_data(folder: Path, n_train: int = 640, n_test: int = 200, seed: int = 0) -> Path:
    """train.beton / test.beton of noisy single-colour images, the colour giving the class."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = PALETTE[labels][:, None, None, :] + rng.normal(0, 40, (n, 32, 32, 3))
        write_beton(str(folder / f"{split}.beton"), np.clip(images, 0, 255).astype(np.uint8), labels)
    return folder


def small_config(data: Path, out: Path, **kw):
    """A TrainConfig for the tiny model: batch 64 -> 10 steps per epoch over 640 images."""
    from fastcifar.train import TrainConfig

    overrides = dict(epochs=3, batch_size=64, lr=0.05, ema=0.0, tta="none", label_smoothing=0.0)
    overrides.update(kw.pop("overrides", {}))
    return TrainConfig(model=MODEL, model_options=dict(TINY), data=str(data), out=str(out),
                       overrides=overrides, progress=False, **kw)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
