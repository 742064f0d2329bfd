"""Preflight: everything a later GPU stage needs, checked in well under a minute, before any long
work starts. One line per check; exit status 1 naming what is missing.

    python bench/preflight.py --data beton_data/cifar10 --source .gpu/data/cifar10-jpeg-q75.tar.gz \
        --original-npz .gpu/data/cifar10-test-original-first1017.npz --out $OUT/preflight.json

Checks, in order:
  imports    torch, ffcv and its compiled helper (ffcv.libffcv loads _libffcv via ctypes), numba, cv2,
             matplotlib (Agg), typer, tqdm, pytest, scipy, airbench (pinned 0.1.8) and torchvision
  cuda       torch sees a CUDA device
  cc         a C compiler on PATH (Triton and inductor build small C helpers at run time)
  triton     one tiny Triton kernel compiled and run on the GPU, its result checked
  data       train.beton and test.beton in --data; converted from --source when missing
  npz        the original-image .npz given with --original-npz

Without a GPU (this is how the test suite runs it) the CUDA check is SKIPPED, the Triton kernel
runs under TRITON_INTERPRET=1 (its logic is checked, its compilation is not: that line says so),
and nothing else changes. ``--require-gpu`` makes a missing GPU a failure (gpu_suite.sh passes it
when nvidia-smi exists).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OK, MISSING, SKIPPED = "ok", "MISSING", "SKIPPED"
AIRBENCH = "0.1.8"
MODULES = [  # (what to import, what a later stage needs it for)
    ("torch", "everything"),
    ("ffcv", "the FFCV loader"),
    ("ffcv.libffcv", "the FFCV loader's compiled helper"),
    ("numba", "the FFCV loader's augmentation"),
    ("cv2", "ffcv"),
    ("matplotlib", "plots"),
    ("typer", "the fastcifar command"),
    ("tqdm", "progress bars"),
    ("pytest", "the GPU tests"),
    ("scipy", "the speedrun statistics"),
    ("airbench", "the speedrun baseline"),
    ("torchvision", "airbench"),
]


class Checks:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, status: str, detail: str) -> None:
        self.rows.append({"check": name, "status": status, "detail": detail})
        print(f"{status:<8} {name:<14} {detail}", flush=True)

    def missing(self) -> list[str]:
        return [r["check"] for r in self.rows if r["status"] == MISSING]


def check_imports(c: Checks) -> None:
    from importlib import metadata

    for module, needed_for in MODULES:
        try:
            m = importlib.import_module(module)
        except Exception as e:  # ImportError, or a broken package's own error
            c.add(module, MISSING, f"needed for {needed_for}: {type(e).__name__}: {e}")
            continue
        detail = f"{module} {getattr(m, '__version__', '')}".strip()
        if module == "ffcv":  # its __version__ is wrong in 1.0.2; the distribution's metadata is right
            detail = f"ffcv {metadata.version('ffcv')}"
        elif module == "ffcv.libffcv":
            detail = "the compiled helper loaded"
        elif module == "airbench":
            try:
                version = metadata.version("airbench")
            except metadata.PackageNotFoundError:
                version = None
            if version not in (None, AIRBENCH):
                c.add(module, MISSING, f"the baseline is pinned to airbench=={AIRBENCH}, found {version}")
                continue
            detail = f"airbench {version or '?'}"
        elif module == "matplotlib":
            m.use("Agg")
            detail = f"matplotlib {m.__version__}, Agg"
        elif module == "torch":
            detail = f"torch {m.__version__}, CUDA {m.version.cuda}"
        c.add(module, OK, detail)


def check_gpu(c: Checks, require_gpu: bool) -> bool:
    try:
        import torch
    except Exception:
        c.add("cuda", MISSING, "torch cannot be imported")
        return False
    if torch.cuda.is_available():
        c.add("cuda", OK, f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} device(s))")
        return True
    c.add("cuda", MISSING if require_gpu else SKIPPED, "torch sees no CUDA device" +
          ("" if require_gpu else ": no GPU here; the GPU-only checks below are skipped or run on the CPU"))
    return False


def check_compiler(c: Checks) -> None:
    found = [p for p in (shutil.which(n) for n in ("cc", "gcc", "clang")) if p]
    if found:
        c.add("cc", OK, found[0])
    else:
        c.add("cc", MISSING, "no cc, gcc or clang on PATH (Triton builds its launcher with one)")


def check_triton(c: Checks, gpu: bool) -> None:
    # must be decided before triton is imported: the interpreter is chosen at decoration time
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    t0 = time.perf_counter()
    try:
        import torch
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = i < n
            tl.store(x_ptr + i, tl.load(x_ptr + i, mask=mask) + 1.0, mask=mask)

        x = torch.arange(100, dtype=torch.float32, device="cuda" if gpu else "cpu")
        add_one[(2,)](x, 100, BLOCK=64)
        if gpu:
            torch.cuda.synchronize()
        if not torch.equal(x.cpu(), torch.arange(1, 101, dtype=torch.float32)):
            raise RuntimeError("wrong result")
    except Exception as e:
        c.add("triton", MISSING, f"a tiny kernel failed: {type(e).__name__}: {e}")
        return
    how = "compiled and ran on the GPU" if gpu else \
        "ran under TRITON_INTERPRET=1 (no GPU: its compilation is not checked)"
    c.add("triton", OK, f"triton {triton.__version__}: a tiny kernel {how} in {time.perf_counter() - t0:.1f} s")


def check_data(c: Checks, data: Path, source: Path | None, convert: bool) -> None:
    if all((data / f"{s}.beton").is_file() for s in ("train", "test")):
        c.add("data", OK, f"{data}/train.beton and test.beton present")
        return
    if not convert or source is None or not Path(source).exists():
        c.add("data", MISSING, f"no {data}/train.beton" + (f" and no source {source} to convert" if source else ""))
        return
    t0 = time.perf_counter()
    try:
        from beton_data.convert import convert as run

        run(source=str(source), out=data, force=False)
    except (Exception, SystemExit) as e:
        c.add("data", MISSING, f"converting {source} failed: {type(e).__name__}: {e}")
        return
    c.add("data", OK, f"converted {source} to {data} in {time.perf_counter() - t0:.1f} s")


def check_npz(c: Checks, npz: Path | None) -> None:
    if npz is None:
        return
    if Path(npz).is_file():
        c.add("npz", OK, str(npz))
    else:
        c.add("npz", MISSING, f"no {npz} (speedrun --original-npz)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("beton_data/cifar10"))
    ap.add_argument("--source", type=Path, default=None, help="CIFAR-10 source to convert when --data lacks the betons")
    ap.add_argument("--no-convert", action="store_true", help="only check for the data, never convert")
    ap.add_argument("--original-npz", type=Path, default=None)
    ap.add_argument("--require-gpu", action="store_true", help="a missing GPU is a failure, not a skip")
    ap.add_argument("--out", type=Path, default=None, help="the checks as JSON")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    c = Checks()
    check_imports(c)
    gpu = check_gpu(c, args.require_gpu)
    check_compiler(c)
    check_triton(c, gpu)
    check_data(c, args.data, args.source, not args.no_convert)
    check_npz(c, args.original_npz)
    elapsed = time.perf_counter() - t0
    missing = c.missing()
    skipped = [r["check"] for r in c.rows if r["status"] == SKIPPED]
    if args.out is not None:
        from beton_data.files import atomic_write_json
        from fastcifar.machine import machine_info

        try:
            info = machine_info("cuda" if gpu else "cpu")
        except Exception as e:  # a broken torch must not hide the check results
            info = {"error": f"{type(e).__name__}: {e}"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, {"kind": "preflight", "checks": c.rows, "missing": missing,
                                     "skipped": skipped, "elapsed_s": round(elapsed, 1), "machine": info})
    if missing:
        print(f"preflight: MISSING {', '.join(missing)} ({elapsed:.0f} s)")
        return 1
    print(f"preflight: all {len(c.rows) - len(skipped)} checks passed"
          + (f", {len(skipped)} skipped ({', '.join(skipped)}: no GPU)" if skipped else "") + f" ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
