"""Loader throughput: images/s over full epochs, after one warm-up epoch, median of several.

Compares, with the same augmentation (flip + translate 4 + cutout, see beton_data/augment.py):
- the GPU-resident loader (data in device memory, batched torch augmentation),
- the FFCV loader (numba ops on CPU threads) for each worker count,
- a plain torch DataLoader over the read_beton arrays, augmenting one sample at a time.

    python3 bench/bench_loaders.py --device cuda --beton beton_data/cifar10/train.beton
    python3 bench/bench_loaders.py --device cpu --synthetic 10000 --epochs 3

Writes bench/results/loaders_<device kind>.json (e.g. loaders_cpu.json, loaders_cuda-h100.json),
atomically, after every loader configuration: a time limit keeps the configurations finished
before it. A configuration that fails gets its error in its row and the others still run.
On a CUDA machine the GPU loader's goal is >= 1,000,000 images/s.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beton_data import read_beton, write_beton  # noqa: E402
from beton_data.augment import AugConfig, augment_numpy, normalize  # noqa: E402
from beton_data.loaders import epoch_order, make_loader  # noqa: E402
from beton_data.files import atomic_write_json  # noqa: E402
from fastcifar.machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class ArrayDataset(torch.utils.data.Dataset):
    """The baseline: per-sample augmentation in __getitem__, as a torchvision pipeline does it
    (same semantics and draws as the fast loaders, via the numpy reference)."""

    def __init__(self, images, labels, aug, seed):
        self.images, self.labels, self.aug, self.seed, self.epoch = images, labels, aug, seed, 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = augment_numpy(self.images[i:i + 1], np.array([i]), self.seed, self.epoch, self.aug)[0]
        return torch.from_numpy(img), int(self.labels[i])


class TorchBaseline:
    def __init__(self, path, batch_size, aug, device, dtype, num_workers, seed=0):
        images, labels = read_beton(path)
        self.ds = ArrayDataset(images, labels, aug, seed)
        self.batch_size, self.device, self.dtype, self.seed = batch_size, torch.device(device), dtype, seed
        self.num_workers, self.epoch = num_workers, 0

    def __iter__(self):
        self.ds.epoch = self.epoch
        order = epoch_order(len(self.ds), self.seed, self.epoch, shuffle=True)
        self.epoch += 1
        dl = torch.utils.data.DataLoader(self.ds, batch_size=self.batch_size, sampler=order.tolist(),
                                         num_workers=self.num_workers, drop_last=True,
                                         pin_memory=self.device.type == "cuda")
        for images, labels in dl:
            images = images.to(self.device, non_blocking=True)
            yield normalize(images, self.dtype), labels.to(self.device, non_blocking=True)


def time_epochs(loader, epochs: int, device) -> dict:
    def one_epoch():
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        n = 0
        for images, labels in loader:
            n += len(labels)
        sync()
        return n, time.perf_counter() - t

    n, warm = one_epoch()   # compiles (FFCV), fills caches, starts workers
    runs = [one_epoch() for _ in range(epochs)]
    rates = [n / t for n, t in runs]
    return {"images_per_epoch": n, "warmup_s": round(warm, 3), "epoch_s": [round(t, 4) for _, t in runs],
            "images_per_s_median": round(statistics.median(rates)), "images_per_s_all": [round(r) for r in rates]}


def device_kind(device) -> str:
    if torch.device(device).type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"(h100|h200|a100|l4|l40s?|v100|t4|a10g?|rtx \w+)", name)
    return "cuda-" + (m.group(1).replace(" ", "") if m else "gpu")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--beton", type=Path, help="a train .beton (default: a synthetic one, see --synthetic)")
    ap.add_argument("--synthetic", type=int, default=10000, help="images in the synthetic beton")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up epoch")
    ap.add_argument("--workers", type=int, nargs="+", help="FFCV worker counts (default: 1 and all CPUs)")
    ap.add_argument("--baseline-workers", type=int, default=None, help="torch DataLoader workers (default: CPUs)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--skip", nargs="*", default=[], choices=["gpu", "ffcv", "torch"])
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new loader configuration after this many seconds; the rest are recorded as skipped")
    ap.add_argument("--out", type=Path, help="JSON path (default: bench/results/loaders_<device kind>.json)")
    args = ap.parse_args(argv)

    cpus = len(os.sched_getaffinity(0))
    workers = args.workers or sorted({1, cpus})
    bw = cpus if args.baseline_workers is None else args.baseline_workers
    dtype = getattr(torch, args.dtype)
    aug = AugConfig(flip=True, translate=4, cutout=8)
    out = args.out or RESULTS / f"loaders_{device_kind(args.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    report = {
        "benchmark": "loader throughput, images/s over full epochs (drop_last), median after 1 warm-up epoch",
        "data": str(args.beton) if args.beton else f"synthetic random beton, {args.synthetic} images",
        "batch_size": args.batch_size, "dtype": args.dtype, "augmentation": aug.as_dict(),
        "timed_epochs": args.epochs, "machine": machine_info(args.device), "results": results,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.beton
        if path is None:
            rng = np.random.default_rng(0)
            path = Path(tmp) / "synthetic.beton"
            write_beton(path, rng.integers(0, 256, (args.synthetic, 32, 32, 3), dtype=np.uint8),
                        rng.integers(0, 10, args.synthetic))
        common = dict(batch_size=args.batch_size, train=True, aug=aug, device=args.device, dtype=dtype)
        configs = []   # (name, how to build the loader): one unit each
        if "gpu" not in args.skip:
            configs.append(("gpu_resident", lambda: make_loader("gpu", path, **common)))
        if "ffcv" not in args.skip:
            configs += [(f"ffcv_workers_{w}", lambda w=w: make_loader("ffcv", path, num_workers=w, **common))
                        for w in workers]
        if "torch" not in args.skip:
            configs.append((f"torch_dataloader_workers_{bw}",
                            lambda: TorchBaseline(path, args.batch_size, aug, args.device, dtype, bw)))
        for name, build in configs:
            if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
                results[name] = {"error": "skipped: --budget-s spent"}
            else:
                try:   # one loader that fails costs its own row, not the others
                    results[name] = time_epochs(build(), args.epochs, args.device)
                    print(name, results[name]["images_per_s_median"], "images/s", flush=True)
                except Exception as e:
                    results[name] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"{name} FAILED: {results[name]['error']}", flush=True)
            atomic_write_json(out, report)   # after every configuration: a time limit keeps the finished ones
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
