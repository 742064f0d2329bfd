"""Checkpoints: written atomically, holding everything an exact resume needs.

A checkpoint is one ``torch.save`` dict. It is written to a temporary file in the run folder
and moved into place with ``os.replace``, so a crash or a signal mid-write leaves the previous
checkpoint intact, never a truncated one.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from beton_data.files import atomic_path
from fastcifar.errors import UserError

# What `--resume` reads: the model, the optimisation state (fastcifar/step.py), the run's state
# (fastcifar/train.py RunState) and its config. A checkpoint of another format still evaluates.
CHECKPOINT_FORMAT = 2


def save_checkpoint(path: str | Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=True) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; pass a run folder written by `fastcifar train` or a .pt file")
    try:
        # our checkpoints hold plain Python/NumPy objects (RNG states, config) besides tensors
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a foreign or damaged file
        raise UserError(f"cannot read checkpoint {path}: {e}") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
