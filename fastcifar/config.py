"""What a training run is: `TrainConfig`, declared once, and `resolve()`, which fills in its
automatic choices and checks it before any work starts.

Each field that `fastcifar train` offers as an option carries its flags and help here (cli.py
builds the command's options from them), and says whether it may be given again with
--resume. The recipe's fields (epochs, lr, ...) are not here: they come from the model's recipe,
a config file and overrides (`resolve_recipe`, recipe.py). Importing this module is light (no
torch), so that the command line starts fast; `resolve` imports what it needs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from beton_data import DEFAULT_DATA_DIR
from fastcifar.errors import UserError
from fastcifar.recipe import Recipe

BN_BACKENDS = ("eager", "compiled", "triton")
LOADERS = ("gpu", "ffcv")
# torch.compile's modes; reduce-overhead and max-autotune replay the step's kernels as CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_mode(mode: Optional[str]) -> None:
    """A UserError unless ``mode`` is None (torch's default) or one of COMPILE_MODES."""
    if mode is not None and mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")


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
    compile_mode: Optional[str] = option(None, "--compile-mode", metavar="MODE", help="torch.compile mode: default, reduce-overhead (CUDA graphs: no launch gaps; a graph it cannot capture runs without them, and the log and summary.json say why), max-autotune, max-autotune-no-cudagraphs.")
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


def resolve(cfg: TrainConfig) -> tuple[TrainConfig, Recipe, Optional[dict], list[str]]:
    """Fill in the automatic choices and check everything that can be checked before any work:
    the config, its recipe (with notes on what was adjusted) and, with --resume, the checkpoint."""
    from fastcifar.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
    from fastcifar.machine import resolve_device
    from fastcifar.optim import FUSED
    from fastcifar.runlog import check_tensorboard
    from fastcifar.step import PRECISIONS

    ckpt, notes = None, []
    if cfg.resume:
        run = Path(cfg.resume)
        if not (run / "last.pt").is_file():
            raise UserError(f"nothing to resume in {run}: no last.pt (pass a run folder written by `fastcifar train`)")
        ckpt = load_checkpoint(run / "last.pt")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{run / 'last.pt'} was written by an older fastcifar (checkpoint format "
                            f"{ckpt.get('format')}, this one resumes {CHECKPOINT_FORMAT}); `fastcifar eval {run}` "
                            f"still scores it, but training must start anew")
        cfg = _resumed(cfg, ckpt, run)
    if not cfg.model:
        raise UserError("--model is required (see `fastcifar models` for the names)")
    device = resolve_device(cfg.device)  # "cpu", "cuda" or "cuda:N"
    gpu = device.startswith("cuda")
    recipe_tag = cfg.recipe_tag or "fast"
    if ckpt:
        recipe = Recipe.from_dict(ckpt["recipe"])
    else:
        recipe, notes = resolve_recipe(cfg.model, recipe_tag, cfg.config_file, cfg.overrides)
    compile_ = gpu if cfg.compile is None else cfg.compile
    precision = cfg.precision
    if precision is None:
        precision = "fp32"
        if gpu and recipe.optimizer in FUSED:
            precision = "fp16"
        elif gpu:
            precision = "bf16"
            notes.append(f"precision bf16: {recipe.optimizer} has no fused implementation, so under "
                         f"fp16 its GradScaler would wait for the GPU at every step (--precision fp16 "
                         f"to choose it anyway)")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    bn_backend = cfg.bn_backend or ("compiled" if compile_ and gpu else "eager")
    if bn_backend not in BN_BACKENDS:
        raise UserError(f"unknown BN backend {bn_backend!r}; choose one of {', '.join(BN_BACKENDS)}")
    check_compile_mode(cfg.compile_mode)
    if compile_ and not gpu and cfg.compile_mode in CUDAGRAPH_MODES:
        notes.append(f"compile mode {cfg.compile_mode}: CUDA graphs need a GPU, so on the CPU "
                     f"the compiled step runs without them")
    loader = cfg.loader or "gpu"
    if loader not in LOADERS:
        raise UserError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    eval_every = 1 if cfg.eval_every is None else cfg.eval_every
    if eval_every < 1:
        raise UserError("--eval-every must be at least 1")
    if cfg.target is not None and not 0 < cfg.target <= 100:
        raise UserError("--target is an accuracy: 0.94 or 94 (percent)")
    check_tensorboard(cfg.tensorboard)
    data = Path(cfg.data or DEFAULT_DATA_DIR)
    cfg = dataclasses.replace(cfg, device=device, compile=compile_, precision=precision, bn_backend=bn_backend,
                              loader=loader, eval_every=eval_every, recipe_tag=recipe_tag,
                              seed=0 if cfg.seed is None else cfg.seed, data=str(data.resolve()),
                              compile_mode=cfg.compile_mode if compile_ else None)
    return cfg, recipe, ckpt, notes


def _resumed(cfg: TrainConfig, ckpt: dict, run: Path) -> TrainConfig:
    """The run's saved config, with the options that may change on a resume taken from ``cfg``;
    a UserError naming every other option that was given and differs from the run's."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in fields})
    fresh = TrainConfig()
    given = {k for k in fields if getattr(cfg, k) != getattr(fresh, k)} - {"resume"}
    conflicts = []
    for name in sorted(given):
        if fields[name].metadata.get("resumable") or name in ("epoch_checkpoints", "plots"):
            continue
        if name == "overrides":
            conflicts += [f"recipe field {k}" for k, v in cfg.overrides.items()
                          if str(v) != str(ckpt["recipe"].get(k.replace("-", "_")))]
        elif getattr(cfg, name) != getattr(saved, name):
            flag = fields[name].metadata.get("flags", (f"{name}",))[0].split("/")[0]
            conflicts.append("--model-opt" if name == "model_options" else flag)
    if conflicts:
        allowed = ", ".join(f.metadata["flags"][0].split("/")[0] for f in fields.values() if f.metadata.get("resumable"))
        raise UserError(f"--resume continues {run} with the settings it started with; these cannot change: "
                        f"{', '.join(conflicts)} (allowed with --resume: {allowed})")
    keep = {k: getattr(cfg, k) for k in given if fields[k].metadata.get("resumable")}
    # a step limit and the progress bar belong to one session, never to the run
    keep.update(max_steps=cfg.max_steps, progress=cfg.progress)
    return dataclasses.replace(saved, resume=str(run), out=str(run), **keep)


def resolve_recipe(model: str, tag: str, config_file: Optional[str], overrides: dict) -> tuple[Recipe, list[str]]:
    """The model's recipe (report or fast), then the config file, then the overrides; with the
    learning rate scaled when only the batch size changed (see Recipe.for_batch_size)."""
    from fastcifar.models import get_recipe

    if tag not in ("report", "fast"):
        raise UserError(f"unknown recipe {tag!r}; choose report or fast")
    base = recipe = get_recipe(model, tag)
    from_file: dict = {}
    if config_file:
        if not Path(config_file).is_file():
            raise UserError(f"no config file {config_file}")
        try:
            from_file = Recipe.read_file(config_file)
            recipe = recipe.replace(**from_file)
        except (ValueError, TypeError) as e:
            raise UserError(f"{config_file}: {e}") from None
    try:
        recipe = recipe.replace(**overrides)
    except (ValueError, TypeError) as e:
        raise UserError(f"bad override: {e}") from None
    recipe.validate()
    notes = []
    lr_given = "lr" in from_file or any(k.replace("-", "_") == "lr" for k in overrides)
    if recipe.batch_size != base.batch_size and not lr_given:
        scaled, note = dataclasses.replace(recipe, batch_size=base.batch_size, lr=base.lr).for_batch_size(recipe.batch_size)
        recipe = dataclasses.replace(recipe, lr=scaled.lr)
        notes.append(note)
    return recipe, notes
