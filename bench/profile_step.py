"""Where a training step's device time goes: per (model, BN backend), the kernels of a few
profiled steps grouped by what they do, the launches per step, and how much of the step the
GPU sits idle (host-bound time).

    python bench/profile_step.py --models resnet_2111 --backends compiled triton --out profile.json
    python bench/profile_step.py --dry-run          # CPU smoke run: tiny batch, CPU ops only

This is the tool for the question bench_bn_relu.py and bench_train.py can only pose: when the
Triton backend is slower than `compiled` end to end, is it launch count, host overhead, small
maps that fill few SMs, or extra passes? For each configuration it records:

* ``step_ms``: device time per step from CUDA events around ``--steps`` steps (no profiler);
* ``kernels_per_step`` and ``kernel_ms_per_step``: from ``--profile-steps`` steps under
  torch.profiler; ``device_idle_share`` = 1 - kernel time / step time, the share of the step in
  which no kernel runs (launch gaps, host work the GPU waits for);
* ``by_category``: kernel time and launches per step for convolutions, the fused BN kernels,
  inductor's generated kernels, the optimizer, memory copies and the rest;
* ``top_kernels``: the ``--top`` kernels by device time, with calls per step.

The input is a fixed synthetic batch already on the device (the loader is bench_train.py's
subject); the step is train.py's (fastcifar.step.TrainStep). With ``--trace-dir`` the profiled
steps are also written as a Chrome trace (``.json.gz``, for chrome://tracing or Perfetto).
The file is rewritten after every configuration; a failing one gets its error in its row.
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fastcifar.config import COMPILE_MODES  # noqa: E402
from fastcifar.machine import device_us, machine_info, sync  # noqa: E402
from fastcifar.step import cudagraph_note  # noqa: E402

# Kernel names -> what they do (first match wins). The fused BN kernels are kernels/bn_kernels.py's.
CATEGORIES = (
    ("bn_triton", ("fwd_stats_kernel", "fwd_finalize_kernel", "fwd_apply_kernel", "bwd_reduce_kernel",
                   "bwd_finalize_kernel", "bwd_dx_kernel")),
    ("inductor", ("triton_",)),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "xmma", "cutlass", "wgrad", "dgrad", "fprop", "gemm",
                     "sm80_", "sm90_")),
    ("batchnorm_aten", ("batch_norm", "batchnorm", "bn_fw", "bn_bw")),
    ("optimizer", ("multi_tensor", "fused_sgd", "fused_adam", "_fused_", "foreach", "lerp")),
    ("memory", ("memcpy", "memset", "copy")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def summarize_events(averages, n_steps: int, gpu: bool, top: int) -> dict:
    """Per-step kernel count and time, by category and by kernel, from profiler averages."""
    rows = []
    for evt in averages:
        if gpu:
            if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = device_us(evt)
        else:   # the CPU smoke run: aten ops' own time stands in for kernels
            if not evt.key.startswith("aten::"):
                continue
            us = float(evt.self_cpu_time_total)
        if us > 0:
            rows.append({"name": evt.key, "calls": evt.count, "us": us})
    by_cat: dict[str, dict] = {}
    for r in rows:
        c = by_cat.setdefault(category(r["name"]), {"ms_per_step": 0.0, "launches_per_step": 0.0})
        c["ms_per_step"] += r["us"] / 1000 / n_steps
        c["launches_per_step"] += r["calls"] / n_steps
    total_ms = sum(c["ms_per_step"] for c in by_cat.values())
    for c in by_cat.values():
        c["share"] = c["ms_per_step"] / total_ms if total_ms else 0.0
    rows.sort(key=lambda r: -r["us"])
    return {
        "kernels_per_step": sum(r["calls"] for r in rows) / n_steps,
        "kernel_ms_per_step": total_ms,
        "by_category": dict(sorted(by_cat.items(), key=lambda kv: -kv[1]["ms_per_step"])),
        "top_kernels": [{"name": r["name"][:160], "category": category(r["name"]),
                         "calls_per_step": r["calls"] / n_steps, "ms_per_step": r["us"] / 1000 / n_steps,
                         "share": r["us"] / 1000 / n_steps / total_ms if total_ms else 0.0}
                        for r in rows[:top]],
    }


def profile_one(model_name: str, backend: str, device: torch.device, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from fastcifar.step import benchmark_step, watch_cudagraphs

    gpu = device.type == "cuda"
    cudagraphs = watch_cudagraphs(not args.no_compile, args.compile_mode)
    step, _, batch = benchmark_step(model_name, backend, device, args.batch_size, compile=not args.no_compile,
                                    model_options=args.model_opt,
                                    compile_mode=args.compile_mode)
    images = torch.randn(batch, 3, 32, 32, device=device, dtype=torch.float16 if gpu else torch.float32)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    counter = iter(range(10**9))

    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(images, labels, next(counter))
    sync(device)
    warmup_s = time.perf_counter() - t0

    if gpu:   # device time per step, without the profiler's own overhead
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            step(images, labels, next(counter))
        end.record()
        sync(device)
        step_ms = start.elapsed_time(end) / args.steps
    else:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(images, labels, next(counter))
        step_ms = 1000 * (time.perf_counter() - t0) / args.steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step(images, labels, next(counter))
        sync(device)
    host_ms = 1000 * (time.perf_counter() - t0) / args.profile_steps
    row = {"model": model_name, "bn_backend": backend, "batch_size": batch, "compiled": not args.no_compile,
           "compile_mode": args.compile_mode,
           "warmup_s": warmup_s, "step_ms": step_ms, "images_per_s": batch / step_ms * 1000,
           "profiled_host_ms_per_step": host_ms,
           **summarize_events(prof.key_averages(), args.profile_steps, gpu, args.top)}
    row["device_idle_share"] = max(0.0, 1 - row["kernel_ms_per_step"] / step_ms) if gpu else None
    if args.model_opt:
        row["model_options"] = args.model_opt
    if cudagraphs is not None:   # graphs replayed launch by launch despite the mode, and why
        row["cudagraphs"] = cudagraphs.report()
    if args.trace_dir:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            prof.export_chrome_trace(tmp.name)
            mode = f"_{args.compile_mode}" if args.compile_mode else ""
            trace = args.trace_dir / f"trace_{model_name}_{backend}{mode}.json.gz"
            with open(tmp.name, "rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
        row["trace"] = str(trace)
    return row


def format_row(r: dict) -> str:
    head = f"{r['model']:>16s} {r['bn_backend']:>8s}"
    if "error" in r:
        return f"{head}  FAILED: {r['error']}"
    cats = "  ".join(f"{k} {v['ms_per_step']:.2f} ms/{v['launches_per_step']:.0f}"
                     for k, v in list(r["by_category"].items())[:5])
    idle = "" if r["device_idle_share"] is None else f"  idle {100 * r['device_idle_share']:4.1f}%"
    return (f"{head}  step {r['step_ms']:8.2f} ms  {r['kernels_per_step']:6.0f} launches"
            f"  kernels {r['kernel_ms_per_step']:8.2f} ms{idle}  | {cats}{cudagraph_note(r.get('cudagraphs'))}")


def main(argv=None) -> dict:
    from beton_data.files import atomic_write_json
    from fastcifar.models import model_names
    from fastcifar.step import add_model_opt_argument

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet_2111"])
    p.add_argument("--backends", nargs="+", default=["compiled", "triton"], choices=["eager", "compiled", "triton"])
    p.add_argument("--batch-size", type=int, default=None, help="default: each model's fast recipe")
    p.add_argument("--warmup", type=int, default=10, help="steps before timing (compilation included)")
    p.add_argument("--steps", type=int, default=30, help="steps timed with CUDA events")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15, help="kernels listed per configuration")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode, e.g. reduce-overhead (CUDA graphs); default: torch's default")
    add_model_opt_argument(p)
    p.add_argument("--trace-dir", type=Path, default=None, help="also write Chrome traces here")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="CPU smoke run: batch 4, 1+1+1 steps, no compile")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.no_compile, args.batch_size = "cpu", True, args.batch_size or 4
        args.warmup, args.steps, args.profile_steps = 1, 1, 1
        args.backends = [b for b in args.backends if b != "triton"] or ["eager"]
    unknown = sorted(set(args.models) - set(model_names()))
    if unknown:
        sys.exit(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(model_names())}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device: run on a GPU, or pass --dry-run to check the code paths on the CPU")
    out = args.out or ROOT / "bench" / "results" / "profile_step.json"
    result = {"kind": "profile_step", "dry_run": args.dry_run, "machine": machine_info(device),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "categories": {c: list(keys) for c, keys in CATEGORIES}, "rows": []}
    for model_name in args.models:
        for backend in args.backends:
            try:
                row = profile_one(model_name, backend, device, args)
            except Exception as e:  # recorded, not fatal
                traceback.print_exc()
                row = {"model": model_name, "bn_backend": backend, "error": f"{type(e).__name__}: {e}"}
            finally:
                torch._dynamo.reset()
            print(format_row(row), flush=True)
            result["rows"].append(row)
            atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
