"""What a training run is: `TrainConfig`, declared once.

Each field that `fastcifar train` offers as an option carries its flags and help here (cli.py
builds the command's options from them), and says whether it may be given again with
--resume. The recipe's fields (epochs, lr, ...) are not here: they come from the model's recipe,
a config file and overrides (see recipe.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from beton_data import DEFAULT_DATA_DIR


def option(default, *flags: str, help: str, metavar: Optional[str] = None, resumable: bool = False):
    """A TrainConfig field that `fastcifar train` offers as an option (cli.py builds the
    options from these). ``resumable``: may be given again with --resume."""
    return field(default=default, metadata={"flags": flags, "help": help, "metavar": metavar,
                                            "resumable": resumable})


@dataclass
class TrainConfig:
    """One training run. None means "not given": the automatic choice (or, with --resume, the
    run's own setting)."""
    model: Optional[str] = option(None, "--model", "-m", metavar="NAME", help="Zoo model to train (see `fastcifar models`). Not needed with --resume.")
    recipe_tag: Optional[str] = option(None, "--recipe", metavar="report|fast", help="Start from the model's `report` recipe (as its report wrote it) or the tuned `fast` one (default).")
    config_file: Optional[str] = option(None, "--config", metavar="FILE", help="JSON object of recipe fields, applied on top of --recipe.")
    data: Optional[str] = option(None, "--data", metavar="DIR", resumable=True, help=f"Folder with train.beton and test.beton (default: {DEFAULT_DATA_DIR}).")
    out: Optional[str] = option(None, "--out", "-o", metavar="DIR", help="Run folder (default: runs/<model>-<timestamp>).")
    device: str = option("auto", "--device", metavar="DEVICE", resumable=True, help="auto (cuda if available), cuda, cuda:N or cpu.")
    compile: Optional[bool] = option(None, "--compile/--no-compile", help="torch.compile the model (default: on for GPU, off for CPU).")
    compile_mode: Optional[str] = option(None, "--compile-mode", metavar="MODE", help="torch.compile mode: default, reduce-overhead, max-autotune, ...")
    precision: Optional[str] = option(None, "--precision", metavar="fp16|bf16|fp32", help="fp16 (autocast + GradScaler) | bf16 | fp32 (default on GPU: fp16; bf16 for optimizers without a fused implementation; fp32 on CPU).")
    bn_backend: Optional[str] = option(None, "--bn-backend", metavar="eager|compiled|triton", help="BatchNorm+ReLU: eager | compiled | triton (default: compiled when compiling on GPU, else eager).")
    loader: Optional[str] = option(None, "--loader", metavar="gpu|ffcv", help="gpu (data in device memory, torch augmentation; default) or ffcv (CPU worker threads).")
    num_workers: Optional[int] = option(None, "--workers", metavar="N", resumable=True, help="FFCV loader threads (default: all CPUs).")
    seed: Optional[int] = option(None, "--seed", metavar="N", help="Seed of initialisation, data order and augmentation (default 0).")
    eval_every: Optional[int] = option(None, "--eval-every", metavar="N", resumable=True, help="Evaluate every N epochs (default 1; the last epoch always is).")
    target: Optional[float] = option(None, "--target", metavar="ACC", resumable=True, help="Stop as soon as test accuracy reaches ACC (0.94 or 94) and record the time to it.")
    resume: Optional[str] = option(None, "--resume", metavar="RUN_DIR", help="Continue the run in this folder exactly where it stopped (with its own settings).")
    max_steps: Optional[int] = option(None, "--max-steps", metavar="N", resumable=True, help="Stop after this many optimizer steps in all (checkpoint kept; resumable).")
    progress: bool = option(True, "--progress/--no-progress", resumable=True, help="Live progress bar (off: one line per epoch only).")
    tensorboard: Optional[bool] = option(None, "--tensorboard/--no-tensorboard", resumable=True, help="TensorBoard scalars in the run folder (default: on when the tensorboard package is installed).")
    # set by the command line's --set/--epochs/... and --model-opt, or by callers
    overrides: dict = field(default_factory=dict)        # recipe field -> value (strings are parsed)
    model_options: dict = field(default_factory=dict)    # extra create_model() keyword arguments
    # a timed run (speedrun) writes nothing it does not need: no per-epoch checkpoints, no plots
    epoch_checkpoints: bool = True                       # off: last.pt only at the end
    plots: bool = True                                   # curves.png and confusion.png at the end
