"""What a training run reports while it runs: a progress bar and one line per epoch on the
terminal, metrics.jsonl (the record every other output is made from), and, when asked,
TensorBoard scalars beside it in the run folder (`tensorboard --logdir runs` shows every run).

Only the main process of a multi-GPU run writes anything; the others get a silent log.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from fastcifar.errors import UserError
from fastcifar.results import atomic_write_text


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def check_tensorboard(asked: Optional[bool]) -> bool:
    """--tensorboard: None (default) = on when the package is installed."""
    if asked is None:
        return tensorboard_available()
    if asked and not tensorboard_available():
        raise UserError("--tensorboard needs the tensorboard package: `pip install tensorboard` "
                        "(or pass --no-tensorboard)")
    return bool(asked)


class RunLog:
    def __init__(self, run_dir: Path, main: bool, progress: bool, tensorboard: bool,
                 total_steps: int, done_steps: int, desc: str, history: list[dict]):
        self.main, self.run_dir = main, run_dir
        self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True,
                        disable=not (progress and main), desc=desc)
        self.tb = None
        if main:
            # a resumed run drops any line logged after its checkpoint was written
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: events a killed session logged after its last checkpoint are
                # dropped from view; the steps are trained again from there
                self.tb = SummaryWriter(log_dir=str(run_dir), purge_step=done_steps or None)

    def say(self, text: str) -> None:
        if not self.main:
            return
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text)

    def steps(self, first_step: int, n: int, losses: list[float], lrs: list[float], images_per_s: float,
              postfix: dict) -> None:
        """A window of ``n`` steps just ended (at a host sync): progress bar, and per-step scalars
        (``losses`` and ``lrs`` are given only when TensorBoard is on)."""
        if not self.main:
            return
        self.bar.update(n)
        if not self.bar.disable:
            self.bar.set_postfix(**postfix)
        if self.tb is not None:
            for i, (loss, lr) in enumerate(zip(losses, lrs)):
                self.tb.add_scalar("train/loss", loss, first_step + i + 1)
                self.tb.add_scalar("train/lr", lr, first_step + i + 1)
            self.tb.add_scalar("train/images_per_s", images_per_s, first_step + n)

    def epoch(self, record: dict, class_names: list[str], per_class: Optional[list[float]], line: str) -> None:
        """An epoch's record: appended to metrics.jsonl, sent to TensorBoard, printed."""
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
                if record.get(key) is not None:
                    split, what = key.split("_")
                    self.tb.add_scalar(f"{split}/{what}_epoch" if split == "train" else f"{split}/{what}",
                                       record[key], step)
            for name, acc in zip(class_names, per_class or []):
                self.tb.add_scalar(f"test_per_class/{name}", acc, step)
            for key in ("epoch_time_s", "eval_time_s", "images_per_s"):
                if record.get(key) is not None:
                    self.tb.add_scalar(f"time/{key}", record[key], step)
            self.tb.flush()
        self.say(line)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
