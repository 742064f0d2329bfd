"""summary.json: what a finished (or stopped) `fastcifar train` run reports, defined once.

`train()` returns a `RunSummary` as a dict and writes it to RUN_DIR/summary.json; `speedrun` and
`leaderboard` read it back with `read_summary`. Accuracies are fractions (0.9401), times seconds.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from beton_data import data_name

# How a run ended (summary["status"]). Only "completed" and "target_reached" are results.
STATUSES = ("completed", "target_reached", "interrupted", "max_steps")
FINISHED = ("completed", "target_reached")


@dataclass
class RunSummary:
    # what was trained
    model: str
    model_options: dict
    params: int                       # trainable parameters
    recipe: dict                      # every recipe field, as trained
    recipe_tag: str                   # "report" or "fast": where the recipe started from
    seed: int
    # on what, and how
    data: str                         # absolute path of the data folder
    data_name: str                    # short name of the data (its source; "(lossy)" for JPEG)
    data_sha256: Optional[str]        # identity of the data (from its manifest); None without one
    device: str                       # the GPU's name, or "CPU (...)"
    world_size: int
    precision: str
    compile: bool
    compile_mode: Optional[str]
    bn_backend: str
    loader: str
    versions: dict
    command: str
    # the run
    run_id: str
    run_dir: str
    status: str                       # one of STATUSES
    finished: str                     # UTC time stamp
    epochs_completed: int
    steps: int
    evaluated: str                    # "ema" (the averaged weights) or "raw"
    final_acc: Optional[float]
    final_test_loss: Optional[float]
    best_acc: Optional[float]
    best_epoch: Optional[int]
    per_class_acc: Optional[dict]
    target: Optional[float]
    target_reached: bool
    time_to_target: Optional[dict]    # epoch, step, train_s (training only), wall_s
    times: dict                       # see fastcifar/timing.py: train_s, compile_warmup_s, ...
    train_time_s: float               # = times["train_s"], the figure a leaderboard ranks by
    signal: Optional[int] = None      # the signal that stopped the run, if one did
    # under a CUDA-graph compile mode (reduce-overhead): graphs of this session that ran without
    # CUDA graphs, and the reasons torch.compile gave (step.CudaGraphSkips); None otherwise
    cudagraphs: Optional[dict] = None
    extra: dict = field(default_factory=dict)   # keys this version does not know (newer files)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        return d

    @property
    def is_result(self) -> bool:
        return self.status in FINISHED and self.final_acc is not None


_FIELDS = {f.name: f for f in dataclasses.fields(RunSummary)}


def from_dict(d: dict) -> RunSummary:
    """A summary from its JSON object; keys missing in older files get None (or their default)."""
    known = {k: d.get(k) for k in _FIELDS if k != "extra"}
    for name, f in _FIELDS.items():
        if known.get(name) is None and f.default is not dataclasses.MISSING:
            known[name] = f.default
    if known.get("data_name") is None and known.get("data"):   # files from before data_name
        known["data_name"] = data_name(known["data"])
    return RunSummary(**known, extra={k: v for k, v in d.items() if k not in _FIELDS})


def read_summary(path: str | Path) -> RunSummary:
    """RUN_DIR/summary.json (or the file itself); ValueError if it is not a summary."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    d = json.loads(path.read_text())
    if not isinstance(d, dict) or "model" not in d or "status" not in d:
        raise ValueError(f"{path} is not a `fastcifar train` summary")
    return from_dict(d)
