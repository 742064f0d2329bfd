"""A training recipe: every hyperparameter a run needs, as plain data.

The model zoo attaches each report's own recipe (tagged ``report``) to its model; the speed
work adds a tuned ``fast`` one. ``fastcifar train`` starts from one of them and applies
overrides from a config file and the command line, nanoGPT-style: a recipe is a flat
dataclass, an override is ``field=value``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class Recipe:
    tag: str = "fast"                    # "report" (as a report wrote it) or "fast" (tuned)
    epochs: int = 30
    batch_size: int = 512

    # optimizer: sgd | adam | adamw | adadelta
    optimizer: str = "sgd"
    lr: float = 0.1                      # peak learning rate
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple = (0.9, 0.999)

    # schedule: onecycle | cosine | multistep | plateau | linear | constant
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0           # linear warm-up before the schedule proper
    milestones: tuple = ()               # multistep: epochs where lr *= gamma
    gamma: float = 0.1                   # multistep / plateau factor
    patience: int = 5                    # plateau
    pct_start: float = 0.25              # onecycle: share of steps spent rising
    final_lr_frac: float = 0.0           # lr at the end, as a fraction of the peak

    # regularisation and tricks
    label_smoothing: float = 0.0
    grad_clip_norm: Optional[float] = None
    grad_clip_value: Optional[float] = None
    lookahead_k: int = 0                 # 0 = off; else Lookahead(k, alpha)
    lookahead_alpha: float = 0.5
    amp_epsilon: float = 0.0             # adversarial model perturbation radius; 0 = off
    amp_inner_lr: float = 1.0
    amp_inner_iters: int = 1
    ema: float = 0.0                     # 0 = off; else EMA decay of the weights
    tta: str = "none"                    # none | flip | flip_translate

    # augmentation (training split only)
    flip: bool = True
    translate: int = 4                   # random crop with this much padding, pixels
    cutout: int = 0                      # square side in pixels; 0 = off

    # where each value comes from: field -> the sentence of the report it was read from
    sources: dict = field(default_factory=dict)
    notes: str = ""

    def replace(self, **overrides: Any) -> "Recipe":
        """A copy with fields overridden; values given as strings are parsed to the field's type."""
        names = {f.name: f for f in dataclasses.fields(self)}
        clean = {}
        for key, value in overrides.items():
            key = key.replace("-", "_")
            if key not in names:
                raise ValueError(f"unknown recipe field {key!r}; known: {', '.join(sorted(names))}")
            clean[key] = _coerce(getattr(self, key), value)
        return dataclasses.replace(self, **clean)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls().replace(**d)

    @classmethod
    def from_file(cls, path: str | Path, base: "Recipe | None" = None) -> "Recipe":
        """Overrides from a JSON file (an object of field: value) applied to ``base``."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read config {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must hold a JSON object of recipe fields")
        return (base or cls()).replace(**data)


def _coerce(current: Any, value: Any) -> Any:
    """Parse ``value`` (possibly a command-line string) to the type of ``current``."""
    if not isinstance(value, str) or isinstance(current, str):
        if isinstance(current, tuple) and isinstance(value, list):
            return tuple(value)
        return value
    text = value.strip()
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if isinstance(current, tuple):
        return tuple(float(v) if "." in v or "e" in v else int(v)
                     for v in text.replace(",", " ").split())
    if text.lower() in ("none", "null", ""):
        return None
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float) or current is None:
        return float(text)
    return json.loads(text)
