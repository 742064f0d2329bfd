"""airbench94 on the CPU: a first look at the baseline's accuracy on our data before a GPU is
available. Not a timing, and not a replacement for `fastcifar calibrate` (GPU, >= 5 runs).

    python bench/airbench_on_cpu.py --data beton_data/cifar10 --original-npz FILE --out FILE

airbench 0.1.8 is used unmodified, through fastcifar's own adapter (fastcifar.baseline), as the
speedrun and the calibration use it. It is written for CUDA only, so this script redirects its
CUDA calls to the CPU before it runs: `.cuda()` is a no-op, `torch.load` maps to the CPU, CUDA
events read the host clock, and fp16 (`.half()`) is kept in fp32, because fp16 convolutions on a
CPU are far slower and the accuracy is what is wanted here. One run takes about 35 minutes on 2
cores. Needs airbench==0.1.8 and torchvision (the GPU bundle `.gpu/site` has both).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _HostEvent:
    """A stand-in for torch.cuda.Event on the host clock (airbench times its epochs with them)."""

    def __init__(self, **kw):
        self.t = None

    def record(self, *a):
        self.t = time.perf_counter()

    def elapsed_time(self, other) -> float:
        return 1000 * (other.t - self.t)


def redirect_cuda_to_cpu() -> None:
    import torch

    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.half = lambda self: self
    torch.Tensor.half = lambda self: self.float()
    load = torch.load
    torch.load = lambda *a, **k: load(*a, **{**k, "map_location": "cpu"})
    torch.cuda.Event = _HostEvent
    torch.cuda.synchronize = lambda *a, **k: None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "beton_data" / "cifar10")
    p.add_argument("--original-npz", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import fastcifar.baseline as baseline
    from fastcifar.errors import UserError
    from fastcifar.machine import machine_info
    from fastcifar.results import now_iso, write_result

    try:
        baseline.import_airbench()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    redirect_cuda_to_cpu()
    baseline.require_cuda = lambda device: None
    baseline.sync = lambda device: None
    started = now_iso()
    with baseline.AirbenchBaseline(args.data, "cpu", args.original_npz) as base:
        run = base.run(seed=args.seed)
    result = {"kind": "airbench_on_cpu", "name": baseline.NAME, "package": f"airbench=={baseline.VERSION}",
              "what": "one airbench94 run on the CPU, CUDA calls redirected and fp16 kept in fp32: accuracy "
                      "only (time_s is CPU wall time, not comparable with anything on a GPU)",
              "published_accuracy": baseline.PUBLISHED_ACC, "data": str(args.data), "run": run,
              "gap_to_published": baseline.PUBLISHED_ACC - run["accuracy"],
              "started": started, "finished": now_iso(), "machine": machine_info("cpu")}
    write_result(args.out, result)
    print(f"airbench94 on the CPU: {100 * run['accuracy']:.2f}% "
          f"({100 * result['gap_to_published']:.2f} points under the published {100 * baseline.PUBLISHED_ACC:.2f}%)"
          + (f", {100 * run['original_accuracy']:.2f}% on the original images" if "original_accuracy" in run else "")
          + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
