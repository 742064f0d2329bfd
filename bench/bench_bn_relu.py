"""Benchmark the fused BatchNorm(+add)+activation kernels against cuDNN and torch.compile.

    python bench/bench_bn_relu.py            # CUDA GPU; writes bench/results/bn_relu_<gpu>.json
    python bench/bench_bn_relu.py --dry-run  # CPU: same code paths, tiny shapes, interpreter

What it measures (training mode, fp16, channels-last, batch 512 unless told otherwise):

1. Every distinct BatchNorm shape of the model zoo: (C, H, W, residual?, activation) collected
   with forward hooks on each model's NormAct / BatchNorm2d modules at batch 1 on the CPU,
   weighted by how many layers of the zoo have it (`--act gelu` times GELU wherever the zoo
   has ReLU). For each, forward+backward time (median of triton.testing.do_bench) of
     fused     kernels.bn_relu
     eager     F.batch_norm (cuDNN) then the activation, or then add then the activation
     compiled  torch.compile of that eager function
   Each call takes its inputs from the next of several buffer sets, together larger than twice
   the L2 cache, so a timed call never finds its inputs in L2 (do_bench also flushes L2).
   On a GPU each is also timed by its kernels alone (`*_kernel_ms`, torch.profiler: the
   device time of the kernels a call launches, summed, and per kernel in `*_kernels_us`).
   The two differ when the host cannot launch as fast as the device runs: the first H100
   run measured 3-4 ms between events for the fused kernels at every shape, the cost of
   launching through torch's wrapper op (since removed), not of the kernels. Bandwidth
   figures use kernel time where there is one.
2. Achieved bandwidth = minimum bytes / time (event time and kernel time), against the
   device's copy bandwidth (a 1 GiB device-to-device copy, bytes read + written). Minimum bytes, E = N*C*H*W*2 (one fp16
   activation tensor); a per-channel reduction must finish before any output can be written,
   so the input is read once per pass:
     forward   read x (statistics), read x (+ residual), write y          3E (4E)
     backward  read dy, x (sums); read dy, x, write dx                    5E
               activation with residual: + read y (ReLU's mask) or the
               residual (GELU's z), + write dres                          7E
               (residual without activation: dres is dy itself, 5E)
   The same byte count is used for every implementation, so GB/s compares times.
   Shapes run largest share of the zoo's bytes first; after --shape-time-limit seconds the
   rest are listed as skipped (each shape costs a torch.compile), so one run fits 10 minutes.
3. A full training step of resnet_2111 (forward, backward, SGD; batch 512, fp16 autocast,
   channels-last, torch.compile of the model) with the BN backend `triton` vs `compiled`.

Output: JSON (device, versions, copy bandwidth, per-shape table, summary ratios, train step),
rewritten atomically after every shape and every train step, so a run cut short keeps what it
measured ("complete" turns true at the end); then a short table on stdout. An implementation
that fails on a shape (or a backend's train step) gets its error in that row, and the run goes
on.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HAVE_CUDA = torch.cuda.is_available()
if not HAVE_CUDA and "--dry-run" in sys.argv:
    # The interpreter must be chosen before triton is imported (kernels are decorated then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fastcifar.machine import command_line, device_name, device_us, machine_info, versions  # noqa: E402
from fastcifar.results import device_slug, now_iso, write_result  # noqa: E402
from kernels import bn_relu  # noqa: E402

# Used only when the model zoo cannot be imported: (C, H, W, residual, relu?) -> number of
# layers, as zoo_shapes() found them over all eight zoo models when this file was written
# (zoo_shapes turns the flag into the activation's name).
FALLBACK_SHAPES = {
    (16, 32, 32, False, True): 2, (32, 32, 32, False, True): 9, (32, 32, 32, True, True): 6,
    (64, 16, 16, False, False): 1, (64, 16, 16, False, True): 6, (64, 16, 16, True, True): 6,
    (64, 32, 32, False, False): 8, (64, 32, 32, False, True): 17, (64, 32, 32, True, True): 9,
    (66, 32, 32, False, True): 4, (66, 32, 32, True, True): 3, (128, 8, 8, False, False): 1,
    (128, 8, 8, False, True): 4, (128, 8, 8, True, True): 4, (128, 16, 16, False, False): 10,
    (128, 16, 16, False, True): 16, (128, 16, 16, True, True): 10,
    (128, 32, 32, False, True): 6, (132, 16, 16, False, False): 1,
    (132, 16, 16, False, True): 4, (132, 16, 16, True, True): 4, (256, 4, 4, False, False): 1,
    (256, 4, 4, False, True): 4, (256, 4, 4, True, True): 4, (256, 8, 8, False, False): 10,
    (256, 8, 8, False, True): 14, (256, 8, 8, True, True): 8, (256, 16, 16, False, True): 5,
    (256, 32, 32, False, False): 1, (256, 32, 32, False, True): 1, (256, 32, 32, True, True): 3,
    (264, 8, 8, False, False): 1, (264, 8, 8, False, True): 3, (264, 8, 8, True, True): 3,
    (512, 4, 4, False, False): 1, (512, 4, 4, False, True): 1, (512, 4, 4, True, True): 1,
    (512, 8, 8, False, True): 5, (512, 16, 16, False, False): 1, (512, 16, 16, False, True): 1,
    (512, 16, 16, True, True): 3, (1024, 8, 8, False, False): 1, (1024, 8, 8, True, True): 3,
}


# ------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------

def zoo_shapes(only: list[str] | None = None) -> tuple[dict, str]:
    """{(C, H, W, residual, act): layer count over the zoo (or the models in `only`)}, act
    "relu", "gelu" or None, and where it came from."""
    try:
        from fastcifar.models import create_model, model_names
    except Exception as e:  # the zoo is optional for this benchmark
        print(f"model zoo not importable ({e}); using the built-in shape list", file=sys.stderr)
        return ({(C, H, W, r, "relu" if relu else None): n
                 for (C, H, W, r, relu), n in FALLBACK_SHAPES.items()}, "fallback list")
    names = only or model_names()
    counts = collections.Counter()

    def hook(module, args, kwargs):
        x = args[0]
        residual = kwargs.get("residual", args[1] if len(args) > 1 else None)
        act = getattr(module, "act", None)     # a bare BatchNorm2d has no activation
        C, H, W = x.shape[1:]
        counts[(C, H, W, residual is not None, act)] += 1

    for name in names:
        model = create_model(name).eval()
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
                   for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        for h in handles:
            h.remove()
    return dict(counts), "fastcifar.models (" + ", ".join(names) + ")"


def min_bytes(numel: int, itemsize: int, residual: bool, act: str | None) -> dict:
    """Minimum bytes forward and backward must move (see the module docstring)."""
    E = numel * itemsize
    fwd = (4 if residual else 3) * E
    bwd = (7 if residual and act else 5) * E
    return {"fwd": fwd, "bwd": bwd, "total": fwd + bwd}


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------

def bench_ms(fn, quick: bool, rep_ms: int = 100) -> float:
    """Median milliseconds per call: triton's do_bench on a GPU, a plain timer on the CPU."""
    if HAVE_CUDA:
        rep = max(10, rep_ms // 4) if quick else rep_ms
        return triton.testing.do_bench(fn, warmup=max(10, rep // 4), rep=rep,
                                       return_mode="median")
    fn()                                                    # warm-up / compile
    times = []
    for _ in range(2 if quick else 5):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kernel_time(fn, calls: int) -> tuple[float | None, dict]:
    """Device time per call summed over the kernels `fn` launches (torch.profiler), and each
    kernel's microseconds per call: the kernels' own cost, without the gaps the host leaves
    between launches, which CUDA events around a call include (a call whose launches cost
    more host time than its kernels take is timed by its host code). (None, {}) on the CPU."""
    if not HAVE_CUDA:
        return None, {}
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_call = {}
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = device_us(evt)
        if us > 0:
            per_call[evt.key] = per_call.get(evt.key, 0.0) + us / calls
    return sum(per_call.values()) / 1e3, per_call


def copy_bandwidth_gbps(device, quick: bool) -> float:
    """Device-to-device copy of 1 GiB (64 MiB on CPU): (bytes read + written) / time."""
    n = (1 << 30 if HAVE_CUDA else 1 << 26) // 2
    a = torch.empty(n, dtype=torch.float16, device=device).normal_()
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), quick)
    return 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e9


def matmul_tflops(device, quick: bool) -> float:
    """Dense fp16 matrix product of 8192^3 (512^3 fp32 on CPU), random data: the arithmetic
    ceiling that training throughput (bench_train.py's achieved TFLOP/s) is measured against."""
    n, dtype = (8192, torch.float16) if HAVE_CUDA else (512, torch.float32)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    ms = bench_ms(lambda: torch.mm(a, b, out=c), quick)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def l2_bytes(device) -> int:
    if HAVE_CUDA:
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return 1 << 20


def eager_bn_act(x, w, b, rm, rv, residual, act):
    y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)   # cuDNN on a GPU
    if residual is not None:
        y = y + residual
    if act == "relu":
        return F.relu(y)
    return F.gelu(y) if act == "gelu" else y


def fused_bn_act(x, w, b, rm, rv, residual, act):
    return bn_relu(x, w, b, rm, rv, True, 0.1, 1e-5, residual=residual, act=act)


def time_shape(impls: dict, N, C, H, W, residual, act, device, dtype, quick) -> dict:
    """Per implementation on one shape: {"ms": forward+backward milliseconds between CUDA
    events (host gaps included), "kernel_ms": the same calls' kernel time (profiler; None on
    the CPU), "kernels": microseconds per call of each kernel}, or the error it raised (as
    "ExceptionType: message")."""
    numel = N * C * H * W
    per_set = numel * dtype.itemsize * (3 + (2 if residual else 0))   # x, dy, y (+ r, dr)
    n_sets = max(2, min(16, triton.cdiv(2 * l2_bytes(device), per_set)))

    def make():
        x = torch.randn(N, C, H, W, device=device, dtype=dtype) * 2 + 1
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        r = (torch.randn_like(x).requires_grad_() if residual else None)
        dy = torch.randn_like(x)
        return x, r, dy

    sets = [make() for _ in range(n_sets)]
    w = torch.rand(C, device=device).add_(0.5).requires_grad_()
    b = torch.randn(C, device=device).requires_grad_()
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    out = {}
    for name, fn in impls.items():
        i = [0]

        def step(fn=fn):
            x, r, dy = sets[i[0] % n_sets]
            i[0] += 1
            y = fn(x, w, b, rm, rv, r, act)
            inputs = [x, w, b] + ([r] if residual else [])
            torch.autograd.grad(y, inputs, dy)

        try:
            ms = bench_ms(step, quick)
            k_ms, per_kernel = kernel_time(step, 5 if quick else 20)
            out[name] = {"ms": ms, "kernel_ms": k_ms, "kernels": per_kernel}
        except Exception as e:  # one implementation failing must not cost the others
            out[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    return out


def train_step_ms(backend: str, batch: int, device, quick: bool) -> dict:
    """One training step of resnet_2111 (compiled model, fp16 autocast, channels-last)."""
    from fastcifar.models import create_model, set_bn_backend
    torch.manual_seed(0)
    model = create_model("resnet_2111").to(device).to(memory_format=torch.channels_last)
    set_bn_backend(model, backend)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    cmodel = torch.compile(model)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    amp_dtype = torch.float16 if HAVE_CUDA else torch.bfloat16

    def step():
        with torch.autocast(device.type, dtype=amp_dtype):
            loss = F.cross_entropy(cmodel(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    step()                                  # compile
    compile_s = time.perf_counter() - t
    ms = bench_ms(step, quick, rep_ms=3000)     # ~100 steps of ~30 ms
    return {"ms_per_step": ms, "images_per_s": batch / (ms * 1e-3), "compile_s": compile_s}


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------

def summarize(rows: list, impls, copy_gbps: float, n_shapes: int, n_layers: int) -> dict:
    """Zoo-weighted totals over the shapes every implementation timed."""
    ok = [r for r in rows if all(f"{k}_ms" in r for k in impls)]
    if not ok:
        return {"covers": f"0 of {n_shapes} shapes"}

    def weighted(key):
        return sum(r["count"] * r[key] for r in ok)

    fused_gbps = weighted("min_bytes") / (weighted("fused_ms") * 1e-3) / 1e9
    kernel = {}
    if all(f"{k}_kernel_ms" in r for r in ok for k in impls):
        k_gbps = weighted("min_bytes") / (weighted("fused_kernel_ms") * 1e-3) / 1e9
        kernel = {
            "zoo_weighted_kernel_ms": {k: weighted(f"{k}_kernel_ms") for k in impls},
            "kernel_speedup_vs_eager": weighted("eager_kernel_ms") / weighted("fused_kernel_ms"),
            "kernel_speedup_vs_compiled": (weighted("compiled_kernel_ms")
                                           / weighted("fused_kernel_ms")),
            "fused_kernel_GBps_weighted": k_gbps,
            "fused_kernel_frac_of_copy_bw": k_gbps / copy_gbps,
        }
    return {
        "covers": f"{len(ok)} of {n_shapes} shapes, {sum(r['count'] for r in ok)} of "
                  f"{n_layers} layers",
        "zoo_weighted_ms": {k: weighted(f"{k}_ms") for k in impls},
        "speedup_vs_eager": weighted("eager_ms") / weighted("fused_ms"),
        "speedup_vs_compiled": weighted("compiled_ms") / weighted("fused_ms"),
        "fused_GBps_weighted": fused_gbps,
        "fused_frac_of_copy_bw": fused_gbps / copy_gbps,
        "floor_ms_at_copy_bw": weighted("min_bytes") / (copy_gbps * 1e9) * 1e3,
        **kernel,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default bench/results/bn_relu_<gpu-name>.json; "
                        "a temporary file with --dry-run)")
    p.add_argument("--batch", type=int, default=512, help="batch size (default 512)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the CPU under the Triton interpreter: checks the code "
                        "paths, measures nothing meaningful")
    p.add_argument("--models", default=None,
                   help="comma-separated zoo models whose shapes to time (default: all)")
    p.add_argument("--shape-time-limit", type=float, default=330.0,
                   help="seconds after which no further shape is started (shapes run in order "
                        "of their share of the zoo's bytes, so the skipped ones matter least; "
                        "each needs its own torch.compile). Default 330, leaving a 10-minute "
                        "run time for the training steps")
    p.add_argument("--act", choices=("relu", "gelu"), default="relu",
                   help="activation in every shape where the zoo has one (default relu, as "
                        "the zoo; gelu times speedrun_net's act=gelu option)")
    p.add_argument("--skip-train-step", action="store_true", help="only the per-shape table")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = p.parse_args(argv)
    if not HAVE_CUDA and not args.dry_run:
        p.error("no CUDA device: run on a GPU, or pass --dry-run to check the code paths on CPU")

    device = torch.device("cuda" if HAVE_CUDA else "cpu")
    dtype = torch.float16
    batch, quick = args.batch, args.quick or args.dry_run
    torch._dynamo.config.cache_size_limit = 256            # one compile per shape
    shapes, source = zoo_shapes(args.models.split(",") if args.models else None)
    if args.act != "relu":
        merged = collections.Counter()
        for (C, H, W, r, a), n in shapes.items():
            merged[(C, H, W, r, args.act if a else None)] += n
        shapes = dict(merged)
    if args.dry_run:   # tiny versions of a few zoo shapes: channel counts kept, H=W<=2, batch 2
        batch = 2
        picked = sorted(shapes, key=lambda s: -shapes[s])[:3]
        picked += [s for s in shapes if s[3] and s[4]][:1] + [s for s in shapes if not s[4]][:1]
        shapes = {(C, min(H, 2), min(W, 2), r, a): shapes[(C, H, W, r, a)]
                  for C, H, W, r, a in dict.fromkeys(picked)}
    name = device_name(device)
    out_path = args.out or (Path(tempfile.gettempdir()) / "bn_relu_dry-run.json" if args.dry_run
                            else ROOT / "bench" / "results" / f"bn_relu_{device_slug(name)}.json")

    copy_gbps = copy_bandwidth_gbps(device, quick)
    mm_tflops = matmul_tflops(device, quick)
    impls = {"fused": fused_bn_act, "eager": eager_bn_act,
             "compiled": torch.compile(eager_bn_act, dynamic=False)}
    rows, skipped, train = [], [], {}
    n_layers = sum(shapes.values())
    result = {
        "device": name, "dry_run": args.dry_run, "dtype": str(dtype).removeprefix("torch."),
        "memory_format": "channels_last", "batch": batch,
        "versions": versions(), "command": command_line(), "started": now_iso(),
        "machine": machine_info(device),
        "complete": False, "shape_source": source, "copy_GBps": copy_gbps,
        "matmul_TFLOPs": mm_tflops, "matmul": "8192^3 fp16 (512^3 fp32 on CPU), random data",
        "act": args.act,
        "bytes_model": "fwd 3E (+E residual); bwd 5E (7E with residual and activation); "
                       "E = N*C*H*W*itemsize",
        "shapes": rows, "shapes_skipped_for_time": skipped,
        "summary": summarize(rows, impls, copy_gbps, len(shapes), n_layers),
        "train_step_resnet_2111": train,
    }
    write_result(out_path, result)
    t0 = time.perf_counter()
    # biggest share of the zoo's traffic first: layer count x activation size
    order = sorted(shapes.items(), key=lambda kv: -kv[1] * kv[0][0] * kv[0][1] * kv[0][2])
    for (C, H, W, residual, act), count in order:
        if rows and time.perf_counter() - t0 > args.shape_time_limit:
            skipped.append({"C": C, "H": H, "W": W, "residual": residual, "act": act,
                            "count": count})
            continue
        numel = batch * C * H * W
        nbytes = min_bytes(numel, dtype.itemsize, residual, act)
        row = {"N": batch, "C": C, "H": H, "W": W, "residual": residual, "act": act,
               "count": count, "min_bytes": nbytes["total"],
               "min_bytes_fwd": nbytes["fwd"], "min_bytes_bwd": nbytes["bwd"]}
        try:
            ms = time_shape(impls, batch, C, H, W, residual, act, device, dtype, quick)
        except Exception as e:   # e.g. out of memory making the inputs
            ms = {k: f"{type(e).__name__}: {e}" for k in impls}
            traceback.print_exc()
        for k, v in ms.items():
            if isinstance(v, str):
                row[f"{k}_error"] = v
                continue
            row[f"{k}_ms"] = v["ms"]
            row[f"{k}_GBps"] = nbytes["total"] / (v["ms"] * 1e-3) / 1e9
            if v["kernel_ms"]:
                row[f"{k}_kernel_ms"] = v["kernel_ms"]
                row[f"{k}_kernel_GBps"] = nbytes["total"] / (v["kernel_ms"] * 1e-3) / 1e9
                row[f"{k}_kernels_us"] = {name[:120]: us for name, us in
                                          sorted(v["kernels"].items(), key=lambda kv: -kv[1])}
        if "fused_ms" in row:
            row["fused_frac_of_copy_bw"] = row["fused_GBps"] / copy_gbps
        if "fused_kernel_ms" in row:
            row["fused_kernel_frac_of_copy_bw"] = row["fused_kernel_GBps"] / copy_gbps
        rows.append(row)
        result["summary"] = summarize(rows, impls, copy_gbps, len(shapes), n_layers)
        write_result(out_path, result)
        print(f"  C={C:4d} {H:2d}x{W:<2d} res={int(residual)} act={act or 'none'} x{count:<3d} "
              + "  ".join(f"{k} {v['ms']:8.3f} ms" + (f" (kernels {v['kernel_ms']:.3f})"
                                                       if v["kernel_ms"] else "")
                          if not isinstance(v, str) else f"{k} FAILED"
                          for k, v in ms.items()), file=sys.stderr)

    if not args.skip_train_step:
        step_batch = 2 if args.dry_run else batch
        train["batch"] = step_batch
        for backend in ("triton", "compiled"):
            try:    # a failure here must not cost what was measured before
                train[backend] = train_step_ms(backend, step_batch, device, quick)
            except Exception as e:
                train[backend] = {"error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            write_result(out_path, result)
        if all("ms_per_step" in train[k] for k in ("triton", "compiled")):
            train["speedup_triton_vs_compiled"] = (train["compiled"]["ms_per_step"]
                                                   / train["triton"]["ms_per_step"])
    result["complete"] = True
    result["finished"] = now_iso()
    write_result(out_path, result)
    summary = result["summary"]

    print(f"\n{name}  ({'DRY RUN: interpreter timings, meaningless' if args.dry_run else dtype})"
          f"  copy bandwidth {copy_gbps:.0f} GB/s  matmul {mm_tflops:.1f} TFLOP/s  -> {out_path}")
    print("(ms: between CUDA events, host gaps included; k: kernel time alone, profiler)")
    print(f"{'C':>5} {'HxW':>5} {'res':>3} {'act':>4} {'n':>3} {'fused ms':>9} {'eager':>8} "
          f"{'compiled':>8} {'fused k':>8} {'eager k':>8} {'comp k':>8} {'k GB/s':>7} {'%copy':>6}")
    def cell(r, key, width, fmt):    # "-": not measured (kernel time on the CPU)
        if key in r:
            return format(r[key], fmt).rjust(width)
        return ("failed" if f"{key.split('_')[0]}_error" in r else "-").rjust(width)

    for r in rows:
        print(f"{r['C']:5d} {r['H']:>2}x{r['W']:<2} {int(r['residual']):3d} {r['act'] or 'none':>4} "
              f"{r['count']:3d} {cell(r, 'fused_ms', 9, '.3f')} {cell(r, 'eager_ms', 8, '.3f')} "
              f"{cell(r, 'compiled_ms', 8, '.3f')} {cell(r, 'fused_kernel_ms', 8, '.3f')} "
              f"{cell(r, 'eager_kernel_ms', 8, '.3f')} {cell(r, 'compiled_kernel_ms', 8, '.3f')} "
              f"{cell(r, 'fused_kernel_GBps', 7, '.0f')} "
              f"{cell(r, 'fused_kernel_frac_of_copy_bw', 5, '.0%')}")
    if skipped:
        print(f"({len(skipped)} shapes not timed: --shape-time-limit reached)")
    if "zoo_weighted_ms" in summary:
        print(f"zoo-weighted fwd+bwd: fused {summary['zoo_weighted_ms']['fused']:.2f} ms, "
              f"eager {summary['zoo_weighted_ms']['eager']:.2f} ms "
              f"(x{summary['speedup_vs_eager']:.2f}), compiled "
              f"{summary['zoo_weighted_ms']['compiled']:.2f} ms "
              f"(x{summary['speedup_vs_compiled']:.2f}); "
              f"floor at copy bandwidth {summary['floor_ms_at_copy_bw']:.2f} ms "
              f"({summary['covers']})")
    if "zoo_weighted_kernel_ms" in summary:
        k = summary["zoo_weighted_kernel_ms"]
        print(f"zoo-weighted kernel time: fused {k['fused']:.2f} ms, eager {k['eager']:.2f} ms "
              f"(x{summary['kernel_speedup_vs_eager']:.2f}), compiled {k['compiled']:.2f} ms "
              f"(x{summary['kernel_speedup_vs_compiled']:.2f}); fused at "
              f"{summary['fused_kernel_frac_of_copy_bw']:.0%} of copy bandwidth")
    if "speedup_triton_vs_compiled" in train:
        print(f"resnet_2111 train step (batch {train['batch']}): triton "
              f"{train['triton']['ms_per_step']:.2f} ms, compiled "
              f"{train['compiled']['ms_per_step']:.2f} ms "
              f"(x{train['speedup_triton_vs_compiled']:.2f})")
    return result


if __name__ == "__main__":
    main()
