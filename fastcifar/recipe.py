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


# How the learning rate follows the batch size when only the batch size is changed.
LR_SCALING = {"sgd": "linear", "adam": "sqrt", "adamw": "sqrt", "adadelta": "sqrt", "muon": "linear"}


@dataclass
class Recipe:
    tag: str = "fast"                    # "report" (as a report wrote it) or "fast" (tuned)
    epochs: int = 30
    batch_size: int = 512

    # optimizer: sgd | adam | adamw | adadelta | muon (conv filters orthogonalised, see optim.Muon)
    optimizer: str = "sgd"
    lr: float = 0.1                      # peak learning rate
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple = (0.9, 0.999)
    muon_lr: float = 0.1                 # muon only: fraction of its norm a conv filter bank turns
                                         # by per step at the peak (lr is for the other parameters)
    bias_lr_scale: float = 1.0           # lr multiplier for 1-D parameters (BatchNorm shifts and
                                         # scales, biases); their weight decay is divided by it

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
    lookahead_ramp: bool = False         # alpha from 1 down to lookahead_alpha as progress**3, BN
                                         # statistics averaged too, run ends on the slow weights
    amp_epsilon: float = 0.0             # adversarial model perturbation radius; 0 = off
    amp_inner_lr: float = 1.0
    amp_inner_iters: int = 1
    ema: float = 0.0                     # 0 = off; else EMA decay of the weights
    tta: str = "none"                    # none | flip | flip_translate
    tta_shift: int = 2                   # flip_translate: pixels its two shifted views move

    # augmentation (training split only)
    flip: bool = True
    alternate_flip: bool = False         # flip each image in every other epoch (beton_data/augment.py)
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

    def validate(self) -> "Recipe":
        """The one check of a recipe's values: UserError naming every bad field, else self."""
        from fastcifar.errors import UserError
        from fastcifar.evaluate import TTA_MODES, TTA_SHIFTS
        from fastcifar.optim import OPTIMIZERS, SCHEDULES

        problems = []
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.tta not in TTA_MODES:
            problems.append(f"tta must be one of {', '.join(TTA_MODES)}")
        if self.tta_shift not in TTA_SHIFTS:
            problems.append(f"tta_shift must be in {TTA_SHIFTS[0]}..{TTA_SHIFTS[-1]} (pixels)")
        if self.epochs < 1 or self.batch_size < 1:
            problems.append("epochs and batch_size must be positive")
        if not self.lr > 0:
            problems.append("lr must be positive")
        if not self.bias_lr_scale > 0:
            problems.append("bias_lr_scale must be positive")
        if not 0 < self.muon_lr < 1:
            problems.append("muon_lr must be in (0, 1)")
        if not 0 <= self.ema < 1 or not 0 <= self.label_smoothing < 1:
            problems.append("ema and label_smoothing must be in [0, 1)")
        if self.amp_epsilon < 0 or self.amp_inner_iters < 1:
            problems.append("amp_epsilon must be >= 0 and amp_inner_iters >= 1")
        if self.lookahead_k < 0 or not 0 < self.lookahead_alpha <= 1:
            problems.append("lookahead_k must be >= 0 and lookahead_alpha in (0, 1]")
        if self.lookahead_ramp and self.lookahead_k == 0:
            problems.append("lookahead_ramp needs lookahead_k > 0 (Lookahead is off)")
        if not 0 <= self.translate < 32 or not 0 <= self.cutout <= 32:
            problems.append("translate must be in 0..31 and cutout in 0..32 (pixels)")
        if problems:
            raise UserError("bad recipe: " + "; ".join(problems))
        return self

    def for_batch_size(self, batch_size: int) -> tuple["Recipe", str]:
        """This recipe at another batch size, its learning rate scaled by the rule that fits
        its optimizer (LR_SCALING), and a sentence saying what was done.

        SGD: linear (Goyal et al. 2017): k times the batch averages k times the gradients, so
        k times the step keeps the distance travelled per epoch. Adam, AdamW and Adadelta
        normalise each step by a running gradient scale, so the step does not shrink with a
        larger batch's smaller gradient noise; the square-root rule (Malladi et al. 2022)
        keeps their update noise matched instead. Without either, a recipe tuned at batch 512
        diverges at batch 100 (the step is 5x too large for the noisier gradients). Muon: its
        SGD part (lr) scales linearly; muon_lr, a per-step turn of normalised filters, is kept."""
        rule = LR_SCALING[self.optimizer]
        ratio = batch_size / self.batch_size
        lr = self.lr * (ratio if rule == "linear" else ratio ** 0.5)
        note = (f"batch size {batch_size} instead of the recipe's {self.batch_size}: learning rate "
                f"{self.lr:.4g} -> {lr:.4g} ({rule} scaling for {self.optimizer}; --lr sets it yourself)"
                + ("; muon_lr kept" if self.optimizer == "muon" else ""))
        return dataclasses.replace(self, batch_size=batch_size, lr=lr), note

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls().replace(**d)

    @staticmethod
    def read_file(path: str | Path) -> dict:
        """The overrides in a JSON config file (an object of field: value); ValueError if it
        cannot be read or holds something else."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read config {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must hold a JSON object of recipe fields")
        return data


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
