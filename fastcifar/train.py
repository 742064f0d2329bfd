"""Training: the loop behind `fastcifar train`.

Read top-down: `TrainConfig` (what a run is), `train()` (set-up, resume, the epoch loop, the
summary), `_train_epoch()` (one pass over the data), then small helpers.

Design points, each for a reason:
- The learning rate is a function of the optimizer step (set before every step), and every
  piece of state lives in the checkpoint (optimizer, grad scaler, EMA, Lookahead slow weights,
  plateau state, RNG states, position in the epoch): `--resume` continues exactly; on the CPU a
  resumed run ends bit-identical to an uninterrupted one.
- The GPU is never waited on inside the loop except every `SYNC_EVERY` steps (progress bar,
  NaN check, stop requests) and at epoch ends: a host sync per step costs throughput.
- Timing is honest: epochs, evaluations and the first `WARMUP_STEPS` steps are bracketed by
  torch.cuda.synchronize(). Compilation and data-pipeline JIT happen in those first steps, so
      compile_warmup_s = time(first WARMUP_STEPS steps) - WARMUP_STEPS * steady time per step,
  the steady time per step being measured over all later steps of the same process. train_s
  (pure training) is all training-step time minus that estimate. Evaluation (its first pass,
  which compiles the eval graph, estimated the same way against the later ones), checkpoint
  writing and set-up (imports, data loading, model building) are timed apart, and
  wall_s = setup_s + train_s + compile_warmup_s + eval_s + checkpoint_s + other_s
  (eval_s includes eval_warmup_s, the first evaluation's extra time).
  time_to_target.train_s counts training steps only (no evaluation, no compilation), the
  speedrun convention; time_to_target.wall_s counts everything since the process started.
- Signals: SIGINT/SIGTERM finish the current step (with several processes: the steps up to the
  next sync, where all ranks agree to stop at the same step), write a checkpoint holding the
  position within the epoch, write summary.json (status "interrupted") and return; the CLI then exits
  with 128 + signal number (130 for SIGINT, 143 for SIGTERM).
- A non-finite loss stops the run with a UserError; checkpoints are only written from finite
  weights, so the last good one stays in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastcifar import dist
from fastcifar.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastcifar.errors import UserError
from fastcifar.evaluate import TTA_MODES, class_names, evaluate
from fastcifar.machine import command_line, device_name, resolve_device, sync, versions
from fastcifar.optim import (EMA, Lookahead, LRSchedule, ModelPerturbation, build_optimizer,
                             clip_gradients, set_lr)
from fastcifar.recipe import Recipe
from fastcifar.results import atomic_write_json, atomic_write_text

DEFAULT_DATA = "beton_data/cifar10"
WARMUP_STEPS = 5     # first steps of a process, timed apart: they include compilation
SYNC_EVERY = 20      # steps between host syncs (progress bar, NaN check, stop requests)
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class TrainConfig:
    model: Optional[str] = None          # a zoo name (see `fastcifar models`)
    recipe_tag: str = "fast"             # start from the "report" or the "fast" recipe
    overrides: dict = field(default_factory=dict)   # recipe field -> value (strings are parsed)
    config_file: Optional[str] = None    # JSON object of recipe fields, applied before overrides
    model_options: dict = field(default_factory=dict)  # extra create_model() keyword arguments
    data: Optional[str] = None           # folder with train.beton/test.beton (default beton_data/cifar10)
    out: Optional[str] = None            # run folder (default runs/<model>-<timestamp>)
    device: str = "auto"                 # auto = cuda when available
    compile: Optional[bool] = None       # torch.compile; None = on on GPU, off on CPU
    compile_mode: Optional[str] = None   # None/"default", "reduce-overhead", "max-autotune", ...
    channels_last: bool = True
    precision: Optional[str] = None      # fp16 (autocast + GradScaler) | bf16 | fp32; None = fp16 on GPU, fp32 on CPU
    bn_backend: Optional[str] = None     # eager | compiled | triton; None = compiled when compiling on GPU
    loader: str = "gpu"                  # ffcv | gpu
    num_workers: Optional[int] = None
    seed: int = 0
    eval_every: int = 1                  # epochs between evaluations (the last epoch always evaluates)
    target: Optional[float] = None       # stop once test accuracy reaches this (0.94 or 94)
    resume: Optional[str] = None         # run folder to continue
    progress: bool = True
    max_steps: Optional[int] = None      # stop (with a checkpoint) after this many steps in total
    num_classes: int = 10


# -----------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Train (or resume) one run; returns the summary (also written to summary.json)."""
    wall0 = time.perf_counter()
    cfg, ckpt = _resolve_config(cfg)
    device = torch.device(cfg.device)
    info = dist.init(device.type)
    if device.type == "cuda":
        # under torchrun each process takes its local rank's GPU; alone, the one asked for
        index = info.local_rank if info.enabled or device.index is None else device.index
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)  # the Triton kernels launch on the current device
    ctx = {}  # what an error message may need from inside
    try:
        with _StopOnSignal() as stop:
            return _train(cfg, ckpt, info, device, stop, wall0, ctx)
    except torch.OutOfMemoryError:
        batch = ctx.get("batch_size")
        raise UserError(f"CUDA out of memory at batch size {batch}; try a smaller --batch-size, "
                        f"e.g. --batch-size {max(batch // 2, 1) if batch else 256}") from None
    finally:
        dist.cleanup(info)


def _train(cfg: TrainConfig, ckpt: dict | None, info: dist.DistInfo, device: torch.device,
           stop: "_StopOnSignal", wall0: float, ctx: dict) -> dict:
    from beton_data import AugConfig, make_loader
    from fastcifar.models import create_model

    main = info.is_main
    recipe = Recipe.from_dict(ckpt["recipe"]) if ckpt else _resolve_recipe(cfg)
    ctx["batch_size"] = recipe.batch_size
    data_dir = Path(cfg.data)
    for split in ("train", "test"):
        if not (data_dir / f"{split}.beton").is_file():
            raise UserError(f"no {data_dir / f'{split}.beton'}; run `fastcifar convert` first "
                            f"(or pass --data DIR with train.beton and test.beton)")
    run_dir = _run_dir(cfg, info)
    if recipe.batch_size % info.world_size:
        raise UserError(f"batch size {recipe.batch_size} does not split over {info.world_size} processes")

    # seeds first: model initialisation must not depend on anything else
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # --- model -------------------------------------------------------------------------------
    raw = create_model(cfg.model, bn_backend=cfg.bn_backend, **cfg.model_options)
    raw = raw.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    n_params = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    net = torch.compile(raw, mode=cfg.compile_mode) if cfg.compile else raw
    eval_net = net
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(net, device_ids=[info.local_rank] if device.type == "cuda" else None)
    params = [p for p in raw.parameters() if p.requires_grad]

    # --- data --------------------------------------------------------------------------------
    in_dtype = PRECISIONS[cfg.precision] if device.type == "cuda" else torch.float32
    per_rank_batch = recipe.batch_size // info.world_size
    aug = AugConfig(flip=recipe.flip, translate=recipe.translate, cutout=recipe.cutout)
    common = dict(device=device, dtype=in_dtype, seed=cfg.seed, rank=info.rank,
                  world_size=info.world_size, num_workers=cfg.num_workers)
    train_loader = make_loader(cfg.loader, str(data_dir / "train.beton"), per_rank_batch,
                               train=True, aug=aug, **common)
    test_loader = make_loader(cfg.loader, str(data_dir / "test.beton"), max(per_rank_batch, 500),
                              train=False, aug=None, **common)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UserError(f"batch size {recipe.batch_size} is larger than the training set "
                        f"({train_loader.num_samples * info.world_size} images); pass a smaller --batch-size")
    total_steps = recipe.epochs * steps_per_epoch

    # --- optimisation ------------------------------------------------------------------------
    optimizer = build_optimizer(params, recipe)
    schedule = LRSchedule(recipe, steps_per_epoch, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    lookahead = Lookahead(params, recipe.lookahead_k, recipe.lookahead_alpha) if recipe.lookahead_k > 0 else None
    perturb = (ModelPerturbation(params, list(raw.buffers()), recipe.amp_epsilon, recipe.amp_inner_lr,
                                 recipe.amp_inner_iters) if recipe.amp_epsilon > 0 else None)
    ema = EMA(raw, recipe.ema) if recipe.ema > 0 else None
    eval_model = ema.model if ema else eval_net  # with EMA on, the averaged weights are the result
    autocast = (contextlib.nullcontext if cfg.precision == "fp32" else
                lambda: torch.autocast(device.type, dtype=PRECISIONS[cfg.precision]))

    # --- run state (all of it goes into the checkpoint) --------------------------------------
    state = dict(epoch=0, batch=0, step=0, epoch_time_s=0.0, history=[], best_acc=None, best_epoch=None,
                 partial=None, times=dict(train_total_s=0.0, warmup_s=0.0, eval_s=0.0, eval_warmup_s=0.0,
                                          checkpoint_s=0.0, setup_s=0.0, wall_s=0.0),
                 target_reached=None, sessions=0)
    if ckpt:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        schedule.load_state_dict(ckpt["schedule"])
        if lookahead:
            lookahead.load_state_dict(ckpt["lookahead"])
        if ema:
            ema.load_state_dict(ckpt["ema"])
        state.update(ckpt["state"])
    session_times = dict(train_s=0.0, steps=0, warmup_s=None, warmup_partial_s=0.0, warmup_steps=0, evals=[])
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # a resumed run drops any line logged after its checkpoint was written
        _write_lines(run_dir / "metrics.jsonl", state["history"])
        atomic_write_json(run_dir / "config.json", {"config": dataclasses.asdict(cfg), "recipe": recipe.to_dict(),
                                              "world_size": info.world_size, "steps_per_epoch": steps_per_epoch,
                                              "params": n_params})
    if ckpt:
        set_rng_state(ckpt["rng"])  # last: set-up above may have drawn random numbers

    def checkpoint():
        """Write last.pt from the current state (rank 0), refusing non-finite weights."""
        if not main:
            return
        t0 = time.perf_counter()
        if not _finite(raw):
            raise _NonFinite()
        save_checkpoint(run_dir / "last.pt", dict(
            format=1, model_name=cfg.model, model_options=cfg.model_options, num_classes=cfg.num_classes,
            model=raw.state_dict(), ema=ema.state_dict() if ema else None,
            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), schedule=schedule.state_dict(),
            lookahead=lookahead.state_dict() if lookahead else None, rng=rng_state(),
            state=state, config=dataclasses.asdict(cfg), recipe=recipe.to_dict()))
        state["times"]["checkpoint_s"] += time.perf_counter() - t0

    # --- the epoch loop ----------------------------------------------------------------------
    target = None if cfg.target is None else (cfg.target / 100 if cfg.target > 1 else cfg.target)
    names = class_names(data_dir, cfg.num_classes)
    bar = tqdm(total=total_steps, initial=state["step"], unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and main), desc=cfg.model)
    say = bar.write if (cfg.progress and main) else (print if main else (lambda *a, **k: None))
    status, last_eval = "completed", None
    if state["sessions"]:
        say(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    if device.type == "cpu" and state["epoch"] < recipe.epochs:
        say(f"note: no GPU, so training runs on the CPU ({recipe.epochs} epochs of {steps_per_epoch} "
            f"steps) at a few hundred images/s at best: a full recipe on CIFAR-10 takes hours "
            f"(--epochs 1 checks the set-up)")
    state["sessions"] += 1
    step_fn = _make_step(net, raw, recipe, optimizer, scaler, schedule, lookahead, perturb, ema, params, autocast)
    state["times"]["setup_s"] += time.perf_counter() - wall0  # imports, data into memory, model

    def diverged(bad: float, steps: float) -> bool:
        if bad == 0:
            return False
        if not scaler.is_enabled():
            return True
        # fp16: the GradScaler skips steps whose gradients overflowed, so an occasional
        # non-finite loss is harmless; it is fatal when every step failed or the weights broke
        return bad >= steps or not _finite(raw)

    try:
        while state["epoch"] < recipe.epochs:
            train_loader.set_epoch(state["epoch"])
            outcome = _train_epoch(state, train_loader, step_fn, session_times, stop, info, bar, cfg,
                                   device, steps_per_epoch, diverged)
            if state["batch"] < steps_per_epoch:  # stopped mid-epoch: save the position, stop
                status = "interrupted" if outcome == "signal" else "max_steps"
                checkpoint()
                break

            # the epoch is complete: metrics, evaluation, checkpoint
            dist.average_buffers(raw, info)
            if ema is not None:
                dist.average_buffers(ema.model, info)
            loss_sum, correct, seen = state["partial"]
            record = dict(epoch=state["epoch"] + 1, step=state["step"], lr=schedule(state["step"] - 1),
                          train_loss=loss_sum / seen, train_acc=correct / seen, test_loss=None,
                          test_acc=None, images_per_s=seen / max(state["epoch_time_s"], 1e-9),
                          epoch_time_s=state["epoch_time_s"], eval_time_s=None)
            state.update(epoch=state["epoch"] + 1, batch=0, partial=None, epoch_time_s=0.0)
            last_epoch = state["epoch"] == recipe.epochs or outcome != "done"
            if state["epoch"] % cfg.eval_every == 0 or last_epoch or target is not None:
                sync(device)
                t0 = time.perf_counter()
                last_eval = evaluate(eval_model, test_loader, cfg.num_classes, recipe.tta, autocast, info)
                sync(device)
                dt = time.perf_counter() - t0
                session_times["evals"].append(dt)
                record.update(test_loss=last_eval["loss"], test_acc=last_eval["acc"], eval_time_s=dt)
                schedule.observe(last_eval["loss"])
                if state["best_acc"] is None or last_eval["acc"] > state["best_acc"]:
                    state["best_acc"], state["best_epoch"] = last_eval["acc"], state["epoch"]
                if target is not None and state["target_reached"] is None and last_eval["acc"] >= target:
                    state["target_reached"] = dict(
                        epoch=state["epoch"], step=state["step"],
                        train_total_s=state["times"]["train_total_s"] + session_times["train_s"],
                        wall_s=state["times"]["wall_s"] + time.perf_counter() - wall0)
            record["elapsed_s"] = state["times"]["wall_s"] + time.perf_counter() - wall0
            state["history"].append(record)
            if main:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            say(_epoch_line(record, recipe.epochs))
            checkpoint()
            if state["target_reached"] is not None:
                status = "target_reached"
                say(f"reached {100 * target:.2f}% test accuracy after epoch {state['epoch']}")
                break
            if outcome != "done":
                status = "interrupted" if outcome == "signal" else "max_steps"
                break
    except _NonFinite:
        ck = run_dir / "last.pt"
        kept = f"the last good checkpoint {ck} is kept" if ck.exists() else "no checkpoint was written"
        raise UserError(f"training diverged: the loss became non-finite in epoch {state['epoch'] + 1} "
                        f"(step {state['step']}); {kept}; lower --lr or clip gradients "
                        f"(--set grad_clip_norm=1)") from None
    finally:
        bar.close()

    # --- summary -----------------------------------------------------------------------------
    times = _close_times(state, session_times, wall0)
    if last_eval is None and state["history"]:  # e.g. stopped right after a resume
        last_eval = evaluate(eval_model, test_loader, cfg.num_classes, recipe.tta, autocast, info)
    summary = _summary(cfg, recipe, info, device, n_params, state, times, status, target, last_eval, names, run_dir)
    if main:
        checkpoint()  # carries the final times
        atomic_write_json(run_dir / "summary.json", summary)
        if state["history"]:
            from fastcifar.plots import plot_confusion, plot_curves
            plot_curves(state["history"], run_dir / "curves.png")
            if last_eval is not None:
                plot_confusion(last_eval["confusion"], names, run_dir / "confusion.png",
                               title=f"{cfg.model}: test accuracy {100 * last_eval['acc']:.2f}%")
        if status == "interrupted":
            say(f"interrupted by {signal.Signals(stop.signum).name}: checkpoint written to {run_dir / 'last.pt'}; "
                f"continue with `fastcifar train --resume {run_dir}`")
    dist.barrier(info)
    summary["signal"] = stop.signum
    return summary


def _make_step(net, raw, recipe, optimizer, scaler, schedule, lookahead, perturb, ema, params, autocast):
    """One optimizer step on a batch; returns (loss, logits) from the unperturbed weights."""
    def forward_backward(images, labels):
        with autocast():
            logits = net(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=recipe.label_smoothing)
        scaler.scale(loss).backward()
        return loss, logits

    clip = recipe.grad_clip_norm is not None or recipe.grad_clip_value is not None

    def step(images, labels, step_index):
        set_lr(optimizer, schedule(step_index))
        optimizer.zero_grad(set_to_none=True)
        loss, logits = forward_backward(images, labels)
        if perturb is not None:  # gradient at the adversarially perturbed weights (see optim.py)
            def regrad():
                optimizer.zero_grad(set_to_none=True)
                forward_backward(images, labels)
            perturb.perturb(regrad)
            regrad()
            perturb.restore()
        if clip:
            scaler.unscale_(optimizer)
            clip_gradients(params, recipe)
        scaler.step(optimizer)
        scaler.update()
        if lookahead is not None:
            lookahead.step()
        if ema is not None:
            ema.update(raw)
        return loss.detach(), logits.detach()
    return step


def _train_epoch(state, loader, step_fn, times, stop, info, bar, cfg, device, steps_per_epoch, diverged) -> str:
    """Train over (the rest of) one epoch. Returns "done", "signal" or "max_steps". Leaves
    state["batch"] = batches done in this epoch, and the epoch's sums (all-reduced over ranks)
    in state["partial"] = (loss sum, correct, seen) as Python numbers."""
    skip = state["batch"]
    prev = state["partial"] if (state["partial"] and info.is_main) else (0.0, 0.0, 0)
    sums = torch.zeros(3, dtype=torch.float64, device=device)     # loss sum, correct, seen
    window = torch.zeros(2, dtype=torch.float64, device=device)   # non-finite losses, steps
    one = torch.ones((), dtype=torch.float64, device=device)
    outcome = "done"
    sync(device)
    t0 = time.perf_counter()
    warming = times["warmup_s"] is None  # the first WARMUP_STEPS steps may span epochs
    for i, (images, labels) in enumerate(loader):
        if i < skip:
            continue  # resuming mid-epoch: the loader replays the same order; skip what was done
        loss, logits = step_fn(images, labels, state["step"])
        n = labels.shape[0]
        sums += torch.stack([loss.double() * n, (logits.argmax(1) == labels).sum().double(), one * n])
        window += torch.stack([(~torch.isfinite(loss)).double(), one])
        state["step"] += 1
        state["batch"] = i + 1
        times["steps"] += 1
        bar.update(1)
        if warming and times["steps"] == WARMUP_STEPS:
            sync(device)
            times["warmup_s"] = times["warmup_partial_s"] + time.perf_counter() - t0
            times["warmup_steps"], warming = WARMUP_STEPS, False
        max_hit = cfg.max_steps is not None and state["step"] >= cfg.max_steps
        # one process answers a signal after the current step; several agree on it at a sync
        signalled = stop.signum is not None and not info.enabled
        if state["batch"] % SYNC_EVERY == 0 or state["batch"] == steps_per_epoch or max_hit or signalled:
            # the one host sync: NaN check, progress bar, and whether any rank was signalled
            flags = torch.cat([window, one.view(1) * float(stop.signum is not None)])
            dist.all_reduce(flags, info)
            bad, steps_in_window, stop_requested = flags.tolist()
            if diverged(bad, steps_in_window):
                raise _NonFinite()
            window.zero_()
            if info.is_main and not bar.disable:
                s = sums.tolist()
                bar.set_postfix(epoch=state["epoch"] + 1, loss=f"{s[0] / max(s[2], 1):.3f}",
                                acc=f"{100 * s[1] / max(s[2], 1):.1f}%",
                                img_s=f"{info.world_size * s[2] / max(time.perf_counter() - t0, 1e-9):.0f}")
            if stop_requested:
                outcome = "signal"
                break
            if max_hit:
                outcome = "max_steps"
                break
    sync(device)
    elapsed = time.perf_counter() - t0
    times["train_s"] += elapsed
    if warming:
        times["warmup_partial_s"] += elapsed
    state["epoch_time_s"] += elapsed
    dist.all_reduce(sums, info)
    loss_sum, correct, seen = sums.tolist()
    state["partial"] = (prev[0] + loss_sum, prev[1] + correct, prev[2] + int(seen))
    return outcome


# -----------------------------------------------------------------------------
# configuration

def _resolve_config(cfg: TrainConfig) -> tuple[TrainConfig, dict | None]:
    """Fill in the automatic choices. A resumed run takes its configuration from its checkpoint;
    only device, data folder, workers, progress, max_steps and target may be given anew."""
    ckpt = None
    if cfg.resume:
        run = Path(cfg.resume)
        if not (run / "last.pt").is_file():
            raise UserError(f"nothing to resume in {run}: no last.pt (pass a run folder written by `fastcifar train`)")
        ckpt = load_checkpoint(run / "last.pt")
        saved = TrainConfig(**ckpt["config"])
        cfg = dataclasses.replace(
            saved, resume=str(run), out=str(run),
            device=cfg.device if cfg.device != "auto" else saved.device,
            data=cfg.data or saved.data, progress=cfg.progress, max_steps=cfg.max_steps,
            num_workers=cfg.num_workers if cfg.num_workers is not None else saved.num_workers,
            target=cfg.target if cfg.target is not None else saved.target)
    if not cfg.model:
        raise UserError("--model is required (see `fastcifar models` for the names)")
    device = resolve_device(cfg.device)  # "cpu", "cuda" or "cuda:N"
    gpu = device.startswith("cuda")
    compile_ = gpu if cfg.compile is None else cfg.compile
    precision = cfg.precision or ("fp16" if gpu else "fp32")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    bn_backend = cfg.bn_backend or ("compiled" if compile_ and gpu else "eager")
    if bn_backend not in ("eager", "compiled", "triton"):
        raise UserError(f"unknown BN backend {bn_backend!r}; choose eager, compiled or triton")
    if cfg.loader not in ("ffcv", "gpu"):
        raise UserError(f"unknown loader {cfg.loader!r}; choose ffcv or gpu")
    if cfg.eval_every < 1:
        raise UserError("--eval-every must be at least 1")
    if cfg.target is not None and not 0 < cfg.target <= 100:
        raise UserError("--target is an accuracy: 0.94 or 94 (percent)")
    cfg = dataclasses.replace(cfg, device=device, compile=compile_, precision=precision,
                              bn_backend=bn_backend, data=cfg.data or DEFAULT_DATA,
                              compile_mode=cfg.compile_mode if compile_ else None)
    return cfg, ckpt


def _resolve_recipe(cfg: TrainConfig) -> Recipe:
    """The model's recipe (report or fast), then the config file, then the overrides."""
    from fastcifar.models import get_recipe

    if cfg.recipe_tag not in ("report", "fast"):
        raise UserError(f"unknown recipe {cfg.recipe_tag!r}; choose report or fast")
    recipe = get_recipe(cfg.model, cfg.recipe_tag)
    if cfg.config_file:
        if not Path(cfg.config_file).is_file():
            raise UserError(f"no config file {cfg.config_file}")
        try:
            recipe = Recipe.from_file(cfg.config_file, base=recipe)
        except ValueError as e:
            raise UserError(f"{cfg.config_file}: {e}") from None
    try:
        recipe = recipe.replace(**cfg.overrides)
    except (ValueError, TypeError) as e:
        raise UserError(f"bad override: {e}") from None
    _check_recipe(recipe)
    return recipe


def _check_recipe(r: Recipe) -> None:
    from fastcifar.optim import OPTIMIZERS, SCHEDULES

    problems = []
    if r.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
    if r.schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {', '.join(SCHEDULES)}")
    if r.tta not in TTA_MODES:
        problems.append(f"tta must be one of {', '.join(TTA_MODES)}")
    if r.epochs < 1 or r.batch_size < 1:
        problems.append("epochs and batch_size must be positive")
    if not r.lr > 0:
        problems.append("lr must be positive")
    if not 0 <= r.ema < 1 or not 0 <= r.label_smoothing < 1:
        problems.append("ema and label_smoothing must be in [0, 1)")
    if r.amp_epsilon < 0 or r.amp_inner_iters < 1:
        problems.append("amp_epsilon must be >= 0 and amp_inner_iters >= 1")
    if r.lookahead_k < 0 or not 0 < r.lookahead_alpha <= 1:
        problems.append("lookahead_k must be >= 0 and lookahead_alpha in (0, 1]")
    if problems:
        raise UserError("bad recipe: " + "; ".join(problems))


def _run_dir(cfg: TrainConfig, info: dist.DistInfo) -> Path:
    """The run folder, the same on every rank (rank 0 picks the time-stamped default). It is
    created only once the run is set up, so a bad argument leaves no folder behind."""
    if cfg.resume:
        return Path(cfg.resume)
    if cfg.out:
        run = Path(cfg.out)
        if (run / "last.pt").exists():
            raise UserError(f"{run} already holds a run; continue it with --resume {run} or pick another --out")
    else:
        run = Path("runs") / f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        if info.is_main:
            base, n = run, 1
            while run.exists():
                run, n = Path(f"{base}-{n}"), n + 1
    return Path(dist.broadcast_object(str(run), info))


# -----------------------------------------------------------------------------
# summary and timing

def _close_times(state: dict, s: dict, wall0: float) -> dict:
    """Fold this process's timings into the run's and split out the warm-up estimates."""
    t = state["times"]
    compile_s = None
    if s["warmup_s"] is not None and s["steps"] > s["warmup_steps"]:
        steady = (s["train_s"] - s["warmup_s"]) / (s["steps"] - s["warmup_steps"])
        compile_s = max(s["warmup_s"] - s["warmup_steps"] * steady, 0.0)
    evals = s["evals"]
    eval_warm = max(evals[0] - float(np.median(evals[1:])), 0.0) if len(evals) >= 2 else 0.0
    t["train_total_s"] += s["train_s"]
    t["warmup_s"] += compile_s or 0.0
    t["eval_s"] += sum(evals)
    t["eval_warmup_s"] += eval_warm
    t["wall_s"] += time.perf_counter() - wall0
    s.update(train_s=0.0, steps=0, warmup_s=None, warmup_partial_s=0.0, evals=[])  # folded in: never count twice
    return {"wall_s": t["wall_s"],
            "train_s": t["train_total_s"] - t["warmup_s"],
            "compile_warmup_s": t["warmup_s"],
            "train_incl_warmup_s": t["train_total_s"],
            "eval_s": t["eval_s"],
            "eval_warmup_s": t["eval_warmup_s"],
            "checkpoint_s": t["checkpoint_s"],
            "setup_s": t["setup_s"],
            "other_s": t["wall_s"] - t["train_total_s"] - t["eval_s"] - t["checkpoint_s"] - t["setup_s"]}


def _summary(cfg, recipe, info, device, n_params, state, times, status, target, last_eval, names, run_dir) -> dict:
    reached = state["target_reached"]
    time_to_target = None
    if reached is not None:
        time_to_target = dict(epoch=reached["epoch"], step=reached["step"], wall_s=reached["wall_s"],
                              train_s=reached["train_total_s"] - state["times"]["warmup_s"])
    return {
        "model": cfg.model, "model_options": cfg.model_options, "params": n_params,
        "run_id": run_dir.name, "data": str(cfg.data), "command": command_line(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "final_accuracy_pct": 100 * last_eval["acc"] if last_eval else None,
        "train_time_s": times["train_s"], "wall_time_s": times["wall_s"],
        "recipe": recipe.to_dict(), "recipe_tag": cfg.recipe_tag, "status": status,
        "run_dir": str(run_dir), "device": device_name(device), "world_size": info.world_size,
        "precision": cfg.precision, "compile": cfg.compile, "compile_mode": cfg.compile_mode,
        "bn_backend": cfg.bn_backend, "loader": cfg.loader, "channels_last": cfg.channels_last,
        "versions": versions(), "seed": cfg.seed,
        "epochs_completed": state["epoch"], "steps": state["step"],
        "final_acc": last_eval["acc"] if last_eval else None,
        "final_test_loss": last_eval["loss"] if last_eval else None,
        "best_acc": state["best_acc"], "best_epoch": state["best_epoch"],
        "target": target, "target_reached": reached is not None, "time_to_target": time_to_target,
        "times": times,
        "per_class_acc": dict(zip(names, last_eval["per_class_acc"])) if last_eval else None,
    }


def _epoch_line(r: dict, epochs: int) -> str:
    line = (f"epoch {r['epoch']:3d}/{epochs}  lr {r['lr']:.4g}  train loss {r['train_loss']:.4f} "
            f"acc {100 * r['train_acc']:.2f}%  {r['images_per_s']:.0f} img/s")
    if r["test_acc"] is not None:
        line += f"  | test loss {r['test_loss']:.4f} acc {100 * r['test_acc']:.2f}%"
    return line


# -----------------------------------------------------------------------------
# small helpers

class _NonFinite(Exception):
    pass


class _StopOnSignal:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so a step is never cut in half."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means: stop now
        self.signum = signum

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


def _finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def _write_lines(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
