"""Where a run's time goes, summed over every session (process) of the run.

A run may take several sessions: interrupted, killed, resumed. Each session adds

    setup_s        imports, reading the data into memory, building the model
    init_s         a model's data-dependent initialisation (e.g. speedrun_net's whitening
                   stem, computed from training images): part of training, as a baseline
                   that does the same inside its timer counts it
    steps_s        every training step (GPU-synchronised at both ends of each timed stretch)
    compile_s      an estimate of the part of steps_s that was compilation and warm-up:
                   the first WARMUP_STEPS steps of a process include torch.compile, cuDNN
                   autotuning and the data pipeline's JIT, so
                       compile_s = time(first WARMUP_STEPS steps) - WARMUP_STEPS * steady,
                   steady being the mean time of every later step of the same session
    eval_s         every evaluation; eval_compile_s estimates the first one's extra time
                   (its compilation) against the median of the later ones
    checkpoint_s   writing last.pt
    wall_s         the session's whole life

and the run's figures are sums over sessions:

    train_s = init_s + steps_s - compile_s   pure training, the figure speeds are quoted in
    wall_s  = setup_s + init_s + steps_s + eval_s + checkpoint_s + other_s

The totals go into every checkpoint (`state()`), so a session that is killed loses only the
time since its last checkpoint -- exactly the work the next session redoes from that
checkpoint, so the totals of a resumed run add up to an uninterrupted run's (plus one more
set-up and compilation, which are reported apart). Nothing here synchronises the GPU: the
caller brackets what it times.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

WARMUP_STEPS = 5     # first steps of a process, timed apart: they include compilation

PARTS = ("setup_s", "init_s", "steps_s", "compile_s", "eval_s", "eval_compile_s", "checkpoint_s", "wall_s")


@dataclass
class _Session:
    steps_s: float = 0.0
    steps: int = 0
    warmup_s: Optional[float] = None       # time of the first WARMUP_STEPS steps, once known
    evals: list = field(default_factory=list)
    setup_s: float = 0.0
    init_s: float = 0.0
    checkpoint_s: float = 0.0


class Clock:
    """The run's time accounts: the totals of earlier sessions plus this one's."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.before = dict.fromkeys(PARTS, 0.0)
        self.now = _Session()

    def carry(self, previous: dict) -> None:
        """Continue from the totals of earlier sessions (a checkpoint's `state()`)."""
        self.before = {k: float(previous.get(k, 0.0)) for k in PARTS}

    # --- recording (called by the training loop) ------------------------------------------

    def data_init(self, seconds: float) -> None:
        """The model's data-dependent initialisation took ``seconds`` (during set-up)."""
        self.now.init_s += seconds

    def setup_done(self) -> None:
        self.now.setup_s = time.perf_counter() - self.t0 - self.now.init_s

    def steps(self, seconds: float, n: int) -> None:
        """A synchronised stretch of ``n`` training steps took ``seconds``."""
        self.now.steps_s += seconds
        self.now.steps += n

    def warming_up(self) -> bool:
        return self.now.warmup_s is None

    def warmup_done(self, seconds_in_current_stretch: float) -> None:
        """The session's WARMUP_STEPS-th step just finished (synchronised); the current,
        not yet recorded stretch has run for ``seconds_in_current_stretch``."""
        self.now.warmup_s = self.now.steps_s + seconds_in_current_stretch

    def evaluation(self, seconds: float) -> None:
        self.now.evals.append(seconds)

    def checkpoint(self, seconds: float) -> None:
        self.now.checkpoint_s += seconds

    # --- reading ------------------------------------------------------------------------

    def _session(self) -> dict:
        s = self.now
        compile_s = 0.0
        if s.warmup_s is not None and s.steps > WARMUP_STEPS:
            steady = (s.steps_s - s.warmup_s) / (s.steps - WARMUP_STEPS)
            compile_s = max(s.warmup_s - WARMUP_STEPS * steady, 0.0)
        evals = s.evals
        eval_compile = max(evals[0] - float(np.median(evals[1:])), 0.0) if len(evals) >= 2 else 0.0
        return {"setup_s": s.setup_s, "init_s": s.init_s, "steps_s": s.steps_s, "compile_s": compile_s,
                "eval_s": float(sum(evals)), "eval_compile_s": eval_compile,
                "checkpoint_s": s.checkpoint_s, "wall_s": time.perf_counter() - self.t0}

    def state(self) -> dict:
        """Raw totals over all sessions so far (what a checkpoint carries)."""
        now = self._session()
        return {k: self.before[k] + now[k] for k in PARTS}

    def train_s(self) -> float:
        """Pure training time so far, over all sessions."""
        return self.totals()["train_s"]

    def totals(self) -> dict:
        """The figures a summary reports (see the module docstring)."""
        t = self.state()
        return {"wall_s": t["wall_s"],
                "train_s": t["init_s"] + t["steps_s"] - t["compile_s"],
                "compile_warmup_s": t["compile_s"],
                "train_incl_warmup_s": t["init_s"] + t["steps_s"],
                "init_s": t["init_s"],
                "eval_s": t["eval_s"],
                "eval_warmup_s": t["eval_compile_s"],
                "checkpoint_s": t["checkpoint_s"],
                "setup_s": t["setup_s"],
                "other_s": (t["wall_s"] - t["init_s"] - t["steps_s"] - t["eval_s"] - t["checkpoint_s"]
                            - t["setup_s"])}
