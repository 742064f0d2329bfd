"""Training: the loop behind `fastcifar train`.

Read top-down: `TrainConfig` (what a run is) -> `train()` -> `_setup()` (the run's pieces)
-> `_loop()` over epochs, each `_train_epoch()` then `_end_of_epoch()` -> `_finish()`. The step
itself is in step.py, time accounting in timing.py, what the run prints and logs in runlog.py,
the summary's schema in summary.py.

Design points, each for a reason:
- The host never waits for the GPU inside an epoch except every `SYNC_EVERY` steps (progress
  bar, NaN check, stop requests, per-step log values, all in one transfer): a sync per step
  costs throughput. The step itself never syncs (see step.py).
- Compilation happens once per process: the train graph at the first step, the eval graph at
  the first evaluation (the last, partial test batch is padded to the full batch size, so it is
  not a new shape), and a second run in the same process (speedrun) reuses both.
- The learning rate is a function of the optimizer step, and every piece of state lives in the
  checkpoint (model, optimizer, grad scaler, EMA, Lookahead, plateau state, RNG states, position
  in the epoch, time accounts): `--resume` continues exactly, and on the CPU a resumed run ends
  bit-identical to an uninterrupted one.
- One process at a time writes a run folder (a lock, released even if the process is killed).
- Signals: SIGINT/SIGTERM finish the current step (several processes: the steps up to the next
  sync, where all ranks agree to stop at the same step), write a checkpoint holding the
  position, write summary.json (status "interrupted") and return; the CLI then exits with
  128 + signal number. A second Ctrl-C stops at once, keeping the last checkpoint.
- A non-finite loss stops the run with a UserError; checkpoints are only written from finite
  weights, so the last good one stays in place.
"""
from __future__ import annotations

import dataclasses
import random
import signal
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from beton_data import DataFiles, check_data
from beton_data.files import FileLock, check_writable, remove_stale_temporaries
from fastcifar import dist
from fastcifar.config import TrainConfig, resolve
from fastcifar.checkpoint import CHECKPOINT_FORMAT, rng_state, save_checkpoint, set_rng_state
from fastcifar.errors import UserError
from fastcifar.evaluate import evaluate
from fastcifar.machine import command_line, device_name, sync, versions
from fastcifar.recipe import Recipe
from fastcifar.results import atomic_write_json, now_iso
from fastcifar.runlog import RunLog, check_tensorboard
from fastcifar.step import PRECISIONS, CudaGraphSkips, TrainStep, training_net, watch_cudagraphs
from fastcifar.summary import RunSummary
from fastcifar.timing import WARMUP_STEPS, Clock

SYNC_EVERY = 20      # steps between host syncs (progress bar, NaN check, stop requests)


class Outcome(str, Enum):
    """How a run (or one session of it) ended; the summary's "status"."""
    COMPLETED = "completed"
    TARGET_REACHED = "target_reached"
    INTERRUPTED = "interrupted"
    MAX_STEPS = "max_steps"


@dataclass
class RunState:
    """Where the run is. All of it goes into the checkpoint."""
    epoch: int = 0                    # epochs completed
    batch: int = 0                    # batches done in the current epoch
    step: int = 0                     # optimizer steps in all
    epoch_sums: tuple = (0.0, 0.0, 0)  # the current epoch so far: loss sum, correct, seen
    epoch_time_s: float = 0.0
    history: list = field(default_factory=list)   # one record per epoch (metrics.jsonl)
    best_acc: Optional[float] = None
    best_epoch: Optional[int] = None
    target_reached: Optional[dict] = None
    times: dict = field(default_factory=dict)     # Clock.state() when the checkpoint was written
    sessions: int = 0                 # processes that have worked on this run


@dataclass
class Run:
    """One session's pieces of a run, made by `_setup`."""
    cfg: TrainConfig
    recipe: Recipe
    info: dist.DistInfo
    device: torch.device
    run_dir: Path
    model: torch.nn.Module            # the weights being trained
    net: object                       # what trains them: the model compiled, in DDP
    eval_net: object                  # what is evaluated: the (compiled) EMA average, or the model
    step: TrainStep
    train_loader: object
    test_loader: object
    steps_per_epoch: int
    classes: list
    state: RunState
    clock: Clock
    log: RunLog
    lock: Optional[FileLock]
    target: Optional[float]
    n_params: int
    notes: list
    data: DataFiles
    model_options_full: dict          # every builder option, as this run's network was built
    cudagraphs: Optional[CudaGraphSkips]  # under a CUDA-graph compile mode: graphs run without them
    last_eval: Optional[dict] = None


# -----------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Train (or resume) one run; returns the summary (also written to summary.json)."""
    clock = Clock()
    cfg, recipe, ckpt, notes = resolve(cfg)
    device = torch.device(cfg.device)
    info = dist.init(device.type)
    if device.type == "cuda":
        # under torchrun each process takes its local rank's GPU; alone, the one asked for
        index = info.local_rank if info.enabled or device.index is None else device.index
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)  # the Triton kernels launch on the current device
    run = None
    try:
        with _StopOnSignal() as stop:
            # refuses missing, damaged or foreign data before any work; hashes each new file once
            data = check_data(cfg.data, verify=None if info.is_main else False,
                              say=print if info.is_main else None)
            run = _setup(cfg, recipe, ckpt, data, info, device, clock, notes)
            return _finish(run, _loop(run, stop), stop)
    except _NonFinite:
        s = run.state
        ck = run.run_dir / "last.pt"
        kept = f"the last good checkpoint {ck} is kept" if ck.exists() else "no checkpoint was written"
        raise UserError(f"training diverged: the loss became non-finite in epoch {s.epoch + 1} "
                        f"(step {s.step}); {kept}; lower --lr or clip gradients "
                        f"(--set grad_clip_norm=1)") from None
    except torch.OutOfMemoryError:
        b = recipe.batch_size
        raise UserError(f"CUDA out of memory at batch size {b}; try a smaller --batch-size, "
                        f"e.g. --batch-size {max(b // 2, 1)}") from None
    except KeyboardInterrupt as e:   # a second Ctrl-C: stopped at once
        e.run_dir = run.run_dir if run else None
        raise
    finally:
        if run is not None:
            run.log.close()
            if run.lock:
                run.lock.release()
        dist.cleanup(info)


def _setup(cfg, recipe, ckpt, data, info, device, clock, notes) -> Run:
    """Everything a session needs: data, model, optimisation state (from the checkpoint when
    resuming), the run folder (locked) with its config.json, and the log."""
    classes = _data_classes(data, cfg.model_options)
    run_dir = _run_dir(cfg, info)
    lock = _claim(run_dir, info) if cfg.resume else None   # before anything else: is it ours?
    try:
        return _build(cfg, recipe, ckpt, data, info, device, clock, notes, classes, run_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(cfg, recipe, ckpt, data, info, device, clock, notes, classes, run_dir, lock) -> Run:
    main = info.is_main
    if recipe.batch_size % info.world_size:
        raise UserError(f"batch size {recipe.batch_size} does not split over {info.world_size} processes")
    # seeds first: model initialisation must not depend on anything else
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # the network as first built: every builder option, defaults included, so that a resumed
    # run or an evaluated checkpoint rebuilds it even after a default has changed (checkpoints
    # from before this was recorded fall back to the options given and today's defaults)
    from fastcifar.models import full_model_options
    full_options = (ckpt or {}).get("model_options_full") or full_model_options(cfg.model, **cfg.model_options)
    # before the first compile, so that every graph run without CUDA graphs is counted
    cudagraphs = watch_cudagraphs(cfg.compile, cfg.compile_mode)
    model, net = _model(cfg, recipe, full_options, len(classes), info, device)
    train_loader, test_loader = _loaders(cfg, recipe, data, info, device)
    if ckpt is None:   # resumed: the checkpoint holds the initialised weights
        _init_from_data(model, data, train_loader, device, clock)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UserError(f"batch size {recipe.batch_size} is larger than the training set "
                        f"({train_loader.num_samples * info.world_size} images); pass a smaller --batch-size")

    step = TrainStep(net, model, recipe, cfg.precision, device.type, steps_per_epoch,
                     recipe.epochs * steps_per_epoch)
    n_params = sum(p.numel() for p in step.params)
    # what is evaluated: with EMA on the averaged weights are the result; never through DDP
    evaluated = step.averaged if step.averaged is not None else model
    eval_net = torch.compile(evaluated, mode=cfg.compile_mode) if cfg.compile else evaluated
    state = RunState()
    if ckpt:
        model.load_state_dict(ckpt["model"])
        step.load_state_dict(ckpt)
        state = RunState(**ckpt["state"])
        clock.carry(state.times)
    if lock is None:
        lock = _claim(run_dir, info)
    if main:
        atomic_write_json(run_dir / "config.json", {
            "config": dataclasses.asdict(cfg), "model_options_full": full_options,
            "recipe": recipe.to_dict(), "notes": notes,
            "world_size": info.world_size, "steps_per_epoch": steps_per_epoch,
            "params": n_params, "classes": classes})
    log = RunLog(run_dir, main, cfg.progress, check_tensorboard(cfg.tensorboard) and main,
                 recipe.epochs * steps_per_epoch, state.step, cfg.model, state.history)
    for note in notes:
        log.say(f"note: {note}")
    if state.sessions:
        log.say(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step}")
    if device.type == "cpu" and state.epoch < recipe.epochs:
        log.say(f"note: no GPU, so training runs on the CPU ({recipe.epochs} epochs of {steps_per_epoch} "
                f"steps): a zoo model's full recipe on CIFAR-10 takes hours here (--epochs 1 checks the set-up)")
    state.sessions += 1
    if ckpt:
        set_rng_state(ckpt["rng"])  # last: set-up above may have drawn random numbers
    target = None if cfg.target is None else (cfg.target / 100 if cfg.target > 1 else cfg.target)
    clock.setup_done()  # imports, data into memory, model
    return Run(cfg=cfg, recipe=recipe, info=info, device=device, run_dir=run_dir, model=model, net=net,
               eval_net=eval_net, step=step, train_loader=train_loader, test_loader=test_loader,
               steps_per_epoch=steps_per_epoch, classes=classes, state=state, clock=clock, log=log,
               lock=lock, target=target, n_params=n_params, notes=notes, data=data,
               model_options_full=full_options, cudagraphs=cudagraphs)


def _model(cfg: TrainConfig, recipe, options: dict, num_classes: int, info: dist.DistInfo,
           device: torch.device):
    """The model (channels-last on the device) and what trains it: with its loss, compiled, in
    DDP."""
    from fastcifar.models import create_model

    model = create_model(cfg.model, bn_backend=cfg.bn_backend, num_classes=num_classes, **options)
    model = model.to(device, memory_format=torch.channels_last)
    net = training_net(model, recipe.label_smoothing, cfg.compile, cfg.compile_mode)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(net, device_ids=[info.local_rank] if device.type == "cuda" else None)
    return model, net


INIT_IMAGES = 5000   # training images a model's data-dependent initialisation sees


def _init_from_data(model, data: DataFiles, train_loader, device: torch.device, clock: Clock) -> None:
    """Models with an `init_from_data(images)` method (e.g. speedrun_net's whitening stem) get
    the first INIT_IMAGES training images, normalised and not augmented, before the first step
    (and before the EMA copy is made). Every rank reads the same images, so DDP ranks agree.
    The time counts as training time (Clock.data_init)."""
    init = getattr(model, "init_from_data", None)
    if init is None:
        return
    from beton_data import read_beton
    from beton_data.augment import normalize

    sync(device)
    t0 = time.perf_counter()
    pixels = getattr(train_loader, "pixels", None)     # the GPU loader holds the split on the device
    if pixels is not None:
        images = pixels.view(-1, 32, 32, 3)[:INIT_IMAGES]
    else:
        images = torch.from_numpy(read_beton(data.paths["train"], limit=INIT_IMAGES)[0]).to(device)
    init(normalize(images, torch.float32))
    sync(device)
    clock.data_init(time.perf_counter() - t0)


def _loaders(cfg: TrainConfig, recipe: Recipe, data: DataFiles, info: dist.DistInfo, device: torch.device):
    """This rank's training batches, augmented exactly as the recipe says, and its test batches
    (never augmented; at least 500 a batch, as evaluation needs no small batches)."""
    from beton_data import AugConfig, make_loader

    per_rank = recipe.batch_size // info.world_size
    common = dict(device=device, dtype=PRECISIONS[cfg.precision] if device.type == "cuda" else torch.float32,
                  seed=cfg.seed, rank=info.rank, world_size=info.world_size, num_workers=cfg.num_workers)
    train_loader = make_loader(cfg.loader, str(data.paths["train"]), per_rank, train=True,
                               aug=AugConfig.from_recipe(recipe), **common)
    test_loader = make_loader(cfg.loader, str(data.paths["test"]), max(per_rank, 500), train=False,
                              aug=None, **common)
    return train_loader, test_loader


def _loop(run: Run, stop: "_StopOnSignal") -> Outcome:
    """Epochs until the recipe's last, a target, a step limit or a signal."""
    s = run.state
    while s.epoch < run.recipe.epochs:
        run.train_loader.set_epoch(s.epoch)
        outcome = _train_epoch(run, stop)
        if s.batch < run.steps_per_epoch:   # stopped mid-epoch (_finish saves the position)
            return outcome
        _end_of_epoch(run, outcome)
        if s.target_reached is not None:
            run.log.say(f"reached {100 * run.target:.2f}% test accuracy after epoch {s.epoch}")
            return Outcome.TARGET_REACHED
        if outcome is not Outcome.COMPLETED:
            return outcome
    return Outcome.COMPLETED


def _train_epoch(run: Run, stop: "_StopOnSignal") -> Outcome:
    """Train over (the rest of) one epoch. Leaves state.batch = batches done in this epoch and
    adds this stretch's sums (all-reduced over ranks) to state.epoch_sums."""
    s, info, device, clock = run.state, run.info, run.device, run.clock
    skip = s.batch
    sums = torch.zeros(3, dtype=torch.float64, device=device)     # loss sum, correct, seen
    window = torch.zeros(2, dtype=torch.float64, device=device)   # non-finite losses, steps
    one = torch.ones((), dtype=torch.float64, device=device)
    logged = run.log.tb is not None        # per-step values are wanted only by TensorBoard
    losses: list = []                      # this window's losses, for the per-step log
    outcome, done, window_steps = Outcome.COMPLETED, 0, 0
    sync(device)
    t0 = t_window = time.perf_counter()
    for i, (images, labels) in enumerate(run.train_loader):
        if i < skip:
            continue  # resuming mid-epoch: the loader replays the same order; skip what was done
        loss, logits = run.step(images, labels, s.step)
        n = labels.shape[0]
        sums += torch.stack([loss.double() * n, (logits.argmax(1) == labels).sum().double(), one * n])
        window += torch.stack([(~torch.isfinite(loss)).double(), one])
        if logged:
            losses.append(loss.clone())   # a copy: under CUDA graphs the next step overwrites loss
        s.step, s.batch, done, window_steps = s.step + 1, i + 1, done + 1, window_steps + 1
        if clock.warming_up() and clock.now.steps + done == WARMUP_STEPS:
            sync(device)
            clock.warmup_done(time.perf_counter() - t0)
        max_hit = run.cfg.max_steps is not None and s.step >= run.cfg.max_steps
        # one process answers a signal after the current step; several agree on it at a sync
        signalled = stop.signum is not None and not info.enabled
        if s.batch % SYNC_EVERY == 0 or s.batch == run.steps_per_epoch or max_hit or signalled:
            # the one host sync of the window: NaN check, whether any rank was signalled,
            # progress and the per-step losses, in one transfer
            flags = dist.all_reduce(torch.cat([window, one.view(1) * float(stop.signum is not None)]), info)
            parts = [flags, sums] + ([torch.stack(losses).double()] if losses else [])
            host = torch.cat(parts).tolist()
            bad, steps_in_window, stop_requested = host[:3]
            loss_sum, correct, seen = host[3:6]
            if _diverged(run, bad, steps_in_window):
                raise _NonFinite()
            window.zero_()
            now, first = time.perf_counter(), s.step - window_steps
            run.log.steps(first, window_steps, host[6:], [run.step.schedule(k) for k in range(first, s.step)] if logged else [],
                          info.world_size * window_steps * n / max(now - t_window, 1e-9),
                          dict(epoch=s.epoch + 1, loss=f"{loss_sum / max(seen, 1):.3f}",
                               acc=f"{100 * correct / max(seen, 1):.1f}%",
                               img_s=f"{info.world_size * seen / max(now - t0, 1e-9):.0f}"))
            losses, t_window, window_steps = [], now, 0
            if stop_requested:
                outcome = Outcome.INTERRUPTED
                break
            if max_hit:
                outcome = Outcome.MAX_STEPS
                break
    sync(device)
    elapsed = time.perf_counter() - t0
    clock.steps(elapsed, done)
    s.epoch_time_s += elapsed
    sums = dist.all_reduce(sums, info).tolist()
    s.epoch_sums = tuple(a + b for a, b in zip(s.epoch_sums, sums))
    return outcome


def _end_of_epoch(run: Run, outcome: Outcome) -> None:
    """The epoch is complete: its record, an evaluation when due, the log, a checkpoint."""
    s, cfg, recipe = run.state, run.cfg, run.recipe
    dist.average_buffers(run.model, run.info)
    if run.step.averaged is not None:
        dist.average_buffers(run.step.averaged, run.info)
    loss_sum, correct, seen = s.epoch_sums
    record = dict(epoch=s.epoch + 1, step=s.step, lr=run.step.schedule(s.step - 1),
                  train_loss=loss_sum / seen, train_acc=correct / seen, test_loss=None,
                  test_acc=None, images_per_s=seen / max(s.epoch_time_s, 1e-9),
                  epoch_time_s=s.epoch_time_s, eval_time_s=None)
    s.epoch, s.batch, s.epoch_sums, s.epoch_time_s = s.epoch + 1, 0, (0.0, 0.0, 0), 0.0
    due = s.epoch % cfg.eval_every == 0 or s.epoch == recipe.epochs or outcome is not Outcome.COMPLETED
    per_class = None
    if due or run.target is not None:
        result = _evaluate(run)
        per_class = result["per_class_acc"]
        record.update(test_loss=result["loss"], test_acc=result["acc"], eval_time_s=result["seconds"])
        run.step.schedule.observe(result["loss"])
        if s.best_acc is None or result["acc"] > s.best_acc:
            s.best_acc, s.best_epoch = result["acc"], s.epoch
        if run.target is not None and s.target_reached is None and result["acc"] >= run.target:
            s.target_reached = dict(epoch=s.epoch, step=s.step, train_s=run.clock.train_s(),
                                    wall_s=run.clock.state()["wall_s"])
    record["elapsed_s"] = run.clock.state()["wall_s"]
    s.history.append(record)
    run.log.epoch(record, run.classes, per_class,
                  _epoch_line(record, recipe.epochs, averaged=run.step.averaged is not None))
    if run.cudagraphs is not None:   # the graphs compiled this epoch that run without CUDA graphs
        for reason in run.cudagraphs.new_reasons():
            run.log.say(f"note: torch.compile runs a graph without CUDA graphs, so launch by launch: {reason}")
    if cfg.epoch_checkpoints:
        _save(run)


def _finish(run: Run, outcome: Outcome, stop: "_StopOnSignal") -> dict:
    """Final evaluation if none is current, the summary, the last checkpoint, the plots."""
    s = run.state
    if run.last_eval is None and s.history:  # e.g. stopped right after a resume
        _evaluate(run)
    if run.info.is_main:
        _save(run)   # carries the final times
    summary = _summary(run, outcome)
    if run.info.is_main:
        atomic_write_json(run.run_dir / "summary.json", summary)
        if run.cfg.plots:
            _plots(run)
        resume = f"continue with `fastcifar train --resume {run.run_dir}`"
        if outcome is Outcome.INTERRUPTED:
            run.log.say(f"interrupted by {signal.Signals(stop.signum).name}: checkpoint written to "
                        f"{run.run_dir / 'last.pt'}; {resume}")
        elif outcome is Outcome.MAX_STEPS:
            run.log.say(f"stopped after {s.step} steps (--max-steps {run.cfg.max_steps}): checkpoint "
                        f"written to {run.run_dir / 'last.pt'}; {resume}")
    dist.barrier(run.info)
    summary["signal"] = stop.signum
    return summary


# -----------------------------------------------------------------------------
# the pieces

def _evaluate(run: Run) -> dict:
    sync(run.device)
    t0 = time.perf_counter()
    result = evaluate(run.eval_net, run.test_loader, len(run.classes), run.recipe.tta, run.step.autocast, run.info,
                      tta_shift=run.recipe.tta_shift)
    sync(run.device)
    result["seconds"] = time.perf_counter() - t0
    run.clock.evaluation(result["seconds"])
    run.last_eval = result
    return result


def _diverged(run: Run, bad: float, steps: float) -> bool:
    if bad == 0:
        return False
    if not run.step.scaler.is_enabled():
        return True
    # fp16: the GradScaler skips steps whose gradients overflowed, so an occasional
    # non-finite loss is harmless; it is fatal when every step failed or the weights broke
    return bad >= steps or not _finite(run.model)


def _save(run: Run) -> None:
    """last.pt from the current state (main process), refusing non-finite weights."""
    if not run.info.is_main:
        return
    t0 = time.perf_counter()
    if not _finite(run.model):
        raise _NonFinite()
    run.state.times = run.clock.state()
    cfg = run.cfg
    save_checkpoint(run.run_dir / "last.pt", dict(
        format=CHECKPOINT_FORMAT, model_name=cfg.model, model_options=cfg.model_options,
        model_options_full=run.model_options_full, num_classes=len(run.classes),
        model=run.model.state_dict(), **run.step.state_dict(), rng=rng_state(),
        state=dataclasses.asdict(run.state), config=dataclasses.asdict(cfg), recipe=run.recipe.to_dict()))
    run.clock.checkpoint(time.perf_counter() - t0)


def _summary(run: Run, outcome: Outcome) -> dict:
    s, cfg, ev = run.state, run.cfg, run.last_eval
    times = run.clock.totals()
    return RunSummary(
        model=cfg.model, model_options=cfg.model_options, params=run.n_params, recipe=run.recipe.to_dict(),
        recipe_tag=cfg.recipe_tag, seed=cfg.seed, data=cfg.data, data_name=run.data.name,
        data_sha256=run.data.identity,
        device=device_name(run.device), world_size=run.info.world_size, precision=cfg.precision,
        compile=cfg.compile, compile_mode=cfg.compile_mode, bn_backend=cfg.bn_backend, loader=cfg.loader,
        versions=versions(), command=command_line(), run_id=run.run_dir.name, run_dir=str(run.run_dir),
        status=outcome.value, finished=now_iso(), epochs_completed=s.epoch, steps=s.step,
        evaluated="ema" if run.step.averaged is not None else "raw",
        final_acc=ev["acc"] if ev else None, final_test_loss=ev["loss"] if ev else None,
        best_acc=s.best_acc, best_epoch=s.best_epoch,
        per_class_acc=dict(zip(run.classes, ev["per_class_acc"])) if ev else None,
        target=run.target, target_reached=s.target_reached is not None, time_to_target=s.target_reached,
        times=times, train_time_s=times["train_s"],
        cudagraphs=run.cudagraphs.report() if run.cudagraphs is not None else None).to_dict()


def _plots(run: Run) -> None:
    if not run.state.history:
        return
    from fastcifar.plots import plot_confusion, plot_curves, plot_or_skip

    # a missing or broken matplotlib costs the pictures, never the run
    plot_or_skip(plot_curves, run.state.history, run.run_dir / "curves.png", say=run.log.say)
    if run.last_eval is not None:
        plot_or_skip(plot_confusion, run.last_eval["confusion"], run.classes, run.run_dir / "confusion.png",
                     title=f"{run.cfg.model}: test accuracy {100 * run.last_eval['acc']:.2f}%", say=run.log.say)


def _epoch_line(r: dict, epochs: int, averaged: bool) -> str:
    line = (f"epoch {r['epoch']:3d}/{epochs}  lr {r['lr']:.4g}  train loss {r['train_loss']:.4f} "
            f"acc {100 * r['train_acc']:.2f}%  {r['images_per_s']:.0f} img/s")
    if r["test_acc"] is not None:
        line += (f"  | test{' (EMA weights)' if averaged else ''} loss {r['test_loss']:.4f} "
                 f"acc {100 * r['test_acc']:.2f}%")
    return line


# -----------------------------------------------------------------------------
# the run folder and the data

def _data_classes(data: DataFiles, model_options: dict) -> list[str]:
    """The class names of the data: the one owner of the number of classes (the model, the
    loss, the evaluation and the confusion matrix all take it from here)."""
    names = list(data.classes)
    asked = model_options.pop("num_classes", None)
    if asked is not None and int(asked) != len(names):
        raise UserError(f"the data in {data.folder} has {len(names)} classes; the model's number of "
                        f"classes comes from the data (drop --model-opt num_classes={asked})")
    return names


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
    check_writable(run, "run folder")
    return Path(dist.broadcast_object(str(run), info))


def _claim(run_dir: Path, info: dist.DistInfo) -> Optional[FileLock]:
    """Make the run folder and take its lock (main process): one writer at a time. Temporary
    files a killed process left behind are removed once it is ours."""
    if not info.is_main:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / ".lock", f"training in {run_dir}", wait=False).acquire()
    remove_stale_temporaries(run_dir)
    return lock


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
