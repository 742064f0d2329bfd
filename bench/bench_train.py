"""Training throughput of every zoo model, for each BatchNorm backend and each loader.

    python bench/bench_train.py --data beton_data/cifar10 --out bench/results/bench_train_h100.json
    python bench/bench_train.py --dry-run --out /tmp/bench_train.json      # tiny CPU smoke run

For each (model, BN backend) it builds and compiles the model once, as `fastcifar train` does
(channels-last, fp16 autocast with a GradScaler on the GPU, torch.compile unless --no-compile),
with the model's `fast` recipe batch size, augmentation, optimizer and label smoothing; then for
each loader it measures:

- images/s: `--steps` training steps timed as one block, synchronised only at both ends (the
  GPU is free to run ahead of the host, as in real training);
- data-wait share: then `--wait-steps` steps, each split as
      wait = time blocked in next(loader)   (cuda-synchronised before and after)
      step = forward + backward + optimizer step (cuda-synchronised after)
  share = sum(wait) / sum(wait + step). The synchronisation removes overlap, so this is the
  fraction of a step the data pipeline would cost if nothing hid it;
- peak GPU memory (torch.cuda.max_memory_allocated) over that loader's steps;
- compile/warm-up: wall time of its first `--warmup-steps` steps (for the first loader of a
  (model, backend) this includes compilation and autotuning).

The step is `fastcifar train`'s own (fastcifar.step.TrainStep): forward, label-smoothed
cross-entropy, backward through the GradScaler, the fused optimizer, and the recipe's extras
(EMA, Lookahead, model perturbation) where the fast recipe has them, so the figures are those
of real training. A configuration that fails (e.g. a missing Triton kernel) gets its error
recorded in its row and the benchmark carries on.

Results: one JSON file (device name, versions, command, settings, one row per configuration),
rewritten after every (model, backend) so that a run cut short keeps what it measured;
--budget-s stops starting new ones.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from beton_data import DEFAULT_DATA_DIR  # noqa: E402
from fastcifar.config import COMPILE_MODES  # noqa: E402
from fastcifar.step import cudagraph_note  # noqa: E402

BACKENDS = ("eager", "compiled", "triton")
LOADERS = ("ffcv", "gpu")


def main(argv=None) -> dict:
    from fastcifar.step import add_model_opt_argument

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="folder with train.beton (default: beton_data/cifar10; with --dry-run, 64 synthetic images)")
    p.add_argument("--models", nargs="*", default=None, help="zoo models (default: all)")
    p.add_argument("--backends", nargs="*", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--loaders", nargs="*", default=list(LOADERS), choices=LOADERS)
    p.add_argument("--batch-size", type=int, default=None, help="default: each model's fast recipe")
    p.add_argument("--warmup-steps", type=int, default=15)
    p.add_argument("--steps", type=int, default=60, help="steps timed for throughput")
    p.add_argument("--wait-steps", type=int, default=30, help="steps timed one by one for the data-wait share")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="run the model eagerly (no torch.compile)")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode, e.g. reduce-overhead (CUDA graphs); default: torch's default")
    add_model_opt_argument(p)
    p.add_argument("--out", default=None, help="result JSON (default: bench/results/bench_train_<device>.json)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new (model, backend) after this many seconds; the rest are recorded as skipped")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny CPU smoke run: synthetic data, speedrun_net, eager backend, batch 8, 2+2+2 steps")
    args = p.parse_args(argv)

    import fastcifar.models as zoo
    from fastcifar.results import atomic_write_text, device_slug
    from fastcifar.machine import device_name, machine_info, versions

    with contextlib.ExitStack() as stack:
        if args.dry_run:
            args.device, args.no_compile = "cpu", True
            args.models = args.models or ["speedrun_net"]
            args.backends = ["eager"] if args.backends == list(BACKENDS) else args.backends
            args.batch_size = args.batch_size or 8
            args.warmup_steps, args.steps, args.wait_steps = 2, 2, 2
            if args.data is None:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-train-")))
                args.data = str(synthetic_data(tmp, n=64))
        args.data = args.data or str(DEFAULT_DATA_DIR)
        train_beton = Path(args.data) / "train.beton"
        if not train_beton.is_file():
            sys.exit(f"error: no {train_beton}; run `fastcifar convert` first or pass --data DIR")
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("error: --device cuda asked for, but torch sees no CUDA device")
        models = args.models or zoo.model_names()
        unknown = sorted(set(models) - set(zoo.model_names()))
        if unknown:
            sys.exit(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(zoo.model_names())}")

        # One compiled model per (model, backend), shared by the loaders (the graph does not
        # depend on the loader); the dynamo cache is cleared between them so each compiles
        # with static shapes and none hits the recompile limit.
        t_start = time.perf_counter()
        result = {
            "kind": "bench_train", "device": device_name(device), "versions": versions(),
            "machine": machine_info(device),
            "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench_train.py", *argv]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": [],
        }
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"bench_train_{device_slug(result['device'])}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        for model in models:
            for backend in args.backends:
                over = args.budget_s is not None and time.perf_counter() - t_start > args.budget_s
                if over:
                    rows = [{"model": model, "bn_backend": backend, "loader": kind,
                             "error": "skipped: --budget-s spent"} for kind in args.loaders]
                else:
                    # what is running is on record: a process killed inside a configuration
                    # (compilation can take minutes) leaves a file that names it
                    result["running"] = {"model": model, "bn_backend": backend,
                                         "started_s": round(time.perf_counter() - t_start, 1)}
                    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
                    rows = bench_model_backend(model, backend, args.loaders, train_beton, device, args)
                    del result["running"]
                for row in rows:
                    print(format_row(row), flush=True)
                result["rows"] += rows
                # written after every configuration: a run cut short still leaves its figures
                atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def bench_model_backend(model_name: str, backend: str, loaders: list[str], train_beton: Path,
                        device: torch.device, args) -> list[dict]:
    """One row per loader for this (model, BN backend); a failure becomes a row's "error"."""
    from fastcifar.models import TRAIN_FLOPS_PER_FORWARD, forward_flops
    from fastcifar.step import benchmark_step, watch_cudagraphs

    options = args.model_opt
    rows = [dict({"model": model_name, "bn_backend": backend, "loader": kind},
                 **({"model_options": options} if options else {}),
                 **({"compile_mode": args.compile_mode} if args.compile_mode else {}))
            for kind in loaders]
    gpu = device.type == "cuda"
    cudagraphs = watch_cudagraphs(not args.no_compile, args.compile_mode)
    try:
        train_step, recipe, batch = benchmark_step(model_name, backend, device, args.batch_size,
                                                   compile=not args.no_compile, model_options=options,
                                                   compile_mode=args.compile_mode)
        count = iter(range(10**12))

        def step(images, labels):
            train_step(images, labels, next(count))

        for row in rows:
            try:
                row.update(_measure(step, row["loader"], recipe, batch, train_beton, device, args),
                           params=sum(p.numel() for p in train_step.params), compiled=not args.no_compile)
                # arithmetic throughput: images/s x ~3 forward passes' FLOPs per image
                row["train_gflop_per_image"] = TRAIN_FLOPS_PER_FORWARD * forward_flops(model_name, **options) / 1e9
                row["achieved_tflops"] = row["images_per_s"] * row["train_gflop_per_image"] / 1e3
                if cudagraphs is not None:   # a graph run without CUDA graphs is a different benchmark
                    row["cudagraphs"] = cudagraphs.report()
            except Exception as e:  # recorded, not fatal: the other configurations still run
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
    except Exception as e:  # the model itself could not be built or compiled
        for row in rows:
            row.setdefault("error", f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        torch._dynamo.reset()
        if gpu:
            torch.cuda.empty_cache()
    return rows


def _measure(step, loader_kind, recipe, batch, train_beton, device, args) -> dict:
    """Warm-up, throughput and data-wait phases of one loader with an already built step."""
    from beton_data import AugConfig, make_loader
    from fastcifar.machine import sync

    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    loader = make_loader(loader_kind, str(train_beton), batch, train=True, aug=AugConfig.from_recipe(recipe),
                         device=device, dtype=torch.float16 if gpu else torch.float32, seed=0)
    if len(loader) == 0:
        raise ValueError(f"{train_beton} holds fewer images than one batch of {batch}")
    batches = endless(loader)

    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup_steps):
        step(*next(batches))
    sync(device)
    warmup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(*next(batches))
    sync(device)
    elapsed = time.perf_counter() - t0

    wait, total = [], []
    for _ in range(args.wait_steps):
        sync(device)
        t0 = time.perf_counter()
        images, labels = next(batches)
        sync(device)
        t1 = time.perf_counter()
        step(images, labels)
        sync(device)
        t2 = time.perf_counter()
        wait.append(t1 - t0)
        total.append(t2 - t0)
    return {
        "batch_size": batch,
        "images_per_s": args.steps * batch / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "data_wait_share": sum(wait) / sum(total),
        "data_wait_ms": 1000 * float(np.mean(wait)),
        "synced_step_ms": 1000 * float(np.mean(total)),
        "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20 if gpu else None,
        # the first loader of a (model, backend) includes compilation here
        "compile_warmup_s": warmup_s,
    }


def endless(loader):
    """Batches forever, epoch after epoch (epoch starts are part of the measured waits)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def synthetic_data(folder: Path, n: int) -> Path:
    """A random train.beton of n images, for --dry-run without data."""
    from beton_data import write_beton

    rng = np.random.default_rng(0)
    write_beton(folder / "train.beton", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                rng.integers(0, 10, n))
    return folder


def format_row(r: dict) -> str:
    head = f"{r['model']:>16s} {r['bn_backend']:>8s} {r['loader']:>4s}"
    if "error" in r:
        return f"{head}  FAILED: {r['error']}"
    mem = f"{r['peak_mem_mib']:8.0f} MiB" if r["peak_mem_mib"] is not None else "       - MiB"
    return (f"{head}  {r['images_per_s']:10.0f} img/s  {r['achieved_tflops']:7.2f} TFLOP/s  step {r['step_ms']:7.2f} ms  "
            f"data wait {100 * r['data_wait_share']:5.1f}%  {mem}  warm-up {r['compile_warmup_s']:6.1f} s"
            f"{cudagraph_note(r.get('cudagraphs'))}")


if __name__ == "__main__":
    main()
