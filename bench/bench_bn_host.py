"""Host time per BatchNorm+ReLU layer per training step, for each BN backend, on the CPU.

    python bench/bench_bn_host.py                     # -> bench/results/bn_host_cpu.json
    python bench/bench_bn_host.py --before OLD.py     # + an older kernels/batchnorm.py, side by side
    python bench/bench_bn_host.py --quick --out /tmp/h.json      # a smoke run (figures mean little)

A layer's *host time* is what the Python/C++ side spends per training step to get that layer's
work onto the device: module call, autograd and custom-op dispatch, launch geometry, allocations,
the launches themselves. On a GPU this is the time the host needs per step no matter how fast
the kernels are; once it exceeds the kernels' device time the step is host-bound.

How it is measured, without a GPU:

* A chain of L BatchNorm+ReLU layers (NormAct, C channels, a tiny channels-last fp32 input
  [N, C, H, W], training mode) runs forward + backward (`y.backward(dy)` with a dense dy, as a
  convolution's backward would hand it); K such steps are timed as one block with
  time.perf_counter. Host time per layer per step = (T(L2) - T(L1)) / (K (L2 - L1)) for two
  depths L1 < L2, which cancels what does not grow with depth (the loss, the autograd engine's
  start, the compiled graph's entry).
* Triton launches are stubbed: the kernels are decorated under TRITON_INTERPRET=1 and
  `InterpretedFunction.run` (what `kernel[grid](...)` calls) is replaced by a function that only
  counts the call. So the figure is everything up to the launch, not the launch: Triton's own
  launcher cost (argument binding and specialization; a few to tens of microseconds per launch
  on a GPU host) comes on top, once per launch, which is why the launches per layer per step
  are counted and reported beside the time.
* Inductor's kernels are not stubbed: on the CPU inductor generates C++ kernels, which here
  run on inputs of a few hundred elements, so their time is the call overhead plus ~1 us of
  arithmetic. On a GPU those would be Triton launches from inductor's wrapper instead.
* Configurations, all in one process and timed in interleaved rounds (round r times every
  configuration once, so a change of machine load hits all of them alike):
      triton   / eager     NormAct on the triton backend, the model not compiled
      triton   / compiled  the same model under torch.compile (inductor): the BN ops are
                           whatever the kernels package exposes to the compiler on this machine
      eager    / eager     NormAct on the eager backend (F.batch_norm, ReLU; aten CPU kernels)
      inductor / compiled  NormAct on the eager backend under torch.compile: inductor's own
                           generated kernels for BN+ReLU, the host cost the triton path is
                           measured against
  With --before FILE (a copy of an older kernels/batchnorm.py, e.g.
  `git show COMMIT:kernels/batchnorm.py > /tmp/batchnorm_before.py`), the same two triton
  configurations run again on that file's module (its BatchNormReLU2d), tagged "@before", and
  every round gives a before/after ratio. The file must be self-contained (kernels and module
  in one file, as before kernels/bn_kernels.py existed) and register its ops under other names
  than the current ones, since both live in one process.

torch runs on one thread (the host side of a GPU step is one Python thread). The result names
the machine, the versions, the command line and the load average before and after the run.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

# The kernels must be decorated for the interpreter, i.e. before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastcifar.machine import machine_info  # noqa: E402
from fastcifar.models.norm import NormAct, set_bn_backend  # noqa: E402
from fastcifar.results import now_iso, write_result  # noqa: E402

LAUNCHES = [0]


def _stub_run(self, *args, grid, warmup, **kwargs):
    """Stands in for InterpretedFunction.run: counts the launch, runs nothing."""
    if not warmup:
        LAUNCHES[0] += 1


class Chain(nn.Module):
    """L BatchNorm+ReLU layers in a row (optionally each adding its input back before the ReLU)."""

    def __init__(self, layers: list[nn.Module], residual: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.residual = residual

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, x) if self.residual else layer(x)
        return x


def load_before(path: Path):
    """The module defined by an older kernels/batchnorm.py, imported under its own name (its
    custom ops must not share names with the current ones)."""
    spec = importlib.util.spec_from_file_location("bn_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bn_before"] = module       # torch.compile looks modules up by name
    spec.loader.exec_module(module)
    if not hasattr(module, "BatchNormReLU2d"):
        raise SystemExit(f"{path}: no BatchNormReLU2d in it; pass a kernels/batchnorm.py that has one")
    return module


def make_layers(kind: str, depth: int, channels: int, before):
    if kind == "before":
        return [before.BatchNormReLU2d(channels) for _ in range(depth)]
    layers = [NormAct(channels) for _ in range(depth)]
    set_bn_backend(nn.ModuleList(layers), kind)
    return layers


class Config:
    """One (BN implementation, compiled or not) at two depths."""

    def __init__(self, name: str, kind: str, compiled: bool, args, before):
        self.name, self.kind, self.compiled = name, kind, compiled
        shape = (args.batch, args.channels, args.size, args.size)
        self.x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        self.dy = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        self.steps = {}
        for depth in args.depths:
            torch.manual_seed(0)
            model = Chain(make_layers(kind, depth, args.channels, before), args.residual).train()
            fn = torch.compile(model) if compiled else model
            self.steps[depth] = self._step(fn)
        self.per_layer_us: list[float] = []
        self.launches: list[float] = []

    def _step(self, fn):
        x, dy = self.x, self.dy

        def step():
            fn(x).backward(dy)
        return step

    def warm_up(self, n: int):
        for step in self.steps.values():
            for _ in range(n):
                step()

    def measure(self, steps: int, depths):
        """One round: per-layer host time (us) and launches per layer per step."""
        t, n = {}, {}
        for depth in depths:
            step = self.steps[depth]
            gc.collect()
            LAUNCHES[0] = 0
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            t[depth] = (time.perf_counter() - t0) / steps
            n[depth] = LAUNCHES[0] / steps
        lo, hi = depths
        self.per_layer_us.append((t[hi] - t[lo]) / (hi - lo) * 1e6)
        self.launches.append((n[hi] - n[lo]) / (hi - lo))


def measure(args, lo: int, hi: int) -> list[Config]:
    """Build, warm up and time every configuration (launches already stubbed)."""
    before = load_before(args.before) if args.before else None

    specs = [("triton/eager", "triton", False), ("eager/eager", "eager", False)]
    if before:
        specs.insert(1, ("triton@before/eager", "before", False))
    if not args.no_compile:
        specs += [("triton/compiled", "triton", True), ("inductor/compiled", "eager", True)]
        if before:
            specs.insert(-1, ("triton@before/compiled", "before", True))
    configs = []
    for name, kind, compiled in specs:
        t0 = time.perf_counter()
        config = Config(name, kind, compiled, args, before)
        config.warm_up(3)
        configs.append(config)
        print(f"  {name}: built and warmed up in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    for r in range(args.rounds):
        for config in configs:
            config.measure(args.steps, (lo, hi))
        if (r + 1) % 10 == 0 or r + 1 == args.rounds:
            print(f"  round {r + 1}/{args.rounds}", file=sys.stderr)

    return configs


def quantiles(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2],
            "min": min(values), "max": max(values), "n": len(values)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bn_host_cpu.json",
                   help="result JSON (default bench/results/bn_host_cpu.json)")
    p.add_argument("--before", type=Path, default=None,
                   help="an older kernels/batchnorm.py to time beside the current code")
    p.add_argument("--depths", type=int, nargs=2, default=[2, 10], metavar=("L1", "L2"),
                   help="the two chain depths whose difference gives the per-layer time (default 2 10)")
    p.add_argument("--steps", type=int, default=20, help="training steps per timed block (default 20)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=4, help="H = W of the input (default 4)")
    p.add_argument("--residual", action="store_true",
                   help="BN + add + ReLU layers (the residual joins) instead of BN + ReLU")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    p.add_argument("--quick", action="store_true", help="3 rounds of 3 steps: checks the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 3
    lo, hi = args.depths
    if not 0 <= lo < hi:
        p.error("--depths L1 L2 needs 0 <= L1 < L2")
    load_start = os.getloadavg()

    threads, run = torch.get_num_threads(), InterpretedFunction.run
    torch.set_num_threads(1)
    InterpretedFunction.run = _stub_run
    try:
        configs = measure(args, lo, hi)
    finally:
        torch.set_num_threads(threads)
        InterpretedFunction.run = run

    rows = {}
    for c in configs:
        rows[c.name] = {"host_us_per_layer_step": quantiles(c.per_layer_us),
                        "launches_per_layer_step": statistics.median(c.launches)}
    ratios = {}
    for mode in ("eager", "compiled"):
        old = next((c for c in configs if c.name == f"triton@before/{mode}"), None)
        new = next((c for c in configs if c.name == f"triton/{mode}"), None)
        if old and new:
            ratios[f"before/after, {mode}"] = quantiles(
                [a / b for a, b in zip(old.per_layer_us, new.per_layer_us)])
        ref = next((c for c in configs if c.name == "inductor/compiled"), None)
        if new and ref:
            ratios[f"triton/{mode} over inductor/compiled"] = quantiles(
                [a / b for a, b in zip(new.per_layer_us, ref.per_layer_us)])

    result = {
        "benchmark": "host time per BatchNorm+ReLU layer per training step (forward + backward), "
                     "Triton launches stubbed",
        "host_time": "wall time of the host per layer per step, up to but excluding each Triton "
                     "launch: (T(L2) - T(L1)) / (L2 - L1) over chains of L BN layers",
        "stubbing": "kernels decorated under TRITON_INTERPRET=1; InterpretedFunction.run replaced "
                    "by a counter, so no Triton kernel runs; inductor's CPU (C++) kernels do run, "
                    "on tiny inputs",
        "settings": {"input": [args.batch, args.channels, args.size, args.size],
                     "memory_format": "channels_last", "dtype": "float32",
                     "layer": "BN + add + ReLU" if args.residual else "BN + ReLU",
                     "depths": [lo, hi], "steps_per_block": args.steps, "rounds": args.rounds,
                     "torch_threads": 1,
                     "before": str(args.before) if args.before else None},
        "configs": rows,
        "ratios": ratios,
        "load_average_at_start": load_start,
        "finished": now_iso(),
        "machine": machine_info("cpu"),
    }
    write_result(args.out, result)

    print(f"\nhost time per layer per step ({result['settings']['layer']}; median [p25, p75] over "
          f"{args.rounds} rounds; load {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}) -> {args.out}")
    for name, row in rows.items():
        q = row["host_us_per_layer_step"]
        print(f"  {name:24s} {q['median']:8.1f} us  [{q['p25']:.1f}, {q['p75']:.1f}]  "
              f"launches {row['launches_per_layer_step']:.1f}")
    for name, q in ratios.items():
        print(f"  {name:40s} x{q['median']:.2f}  [{q['p25']:.2f}, {q['p75']:.2f}]")
    return result


if __name__ == "__main__":
    main()
