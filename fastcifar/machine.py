"""What a figure was measured on: package versions, the device's name, the machine.

Every training summary, speedrun result and benchmark stores these beside its numbers, so that a
time can be traced to the hardware and software that produced it.

    from fastcifar.machine import device_name, machine_info, versions
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
from importlib import metadata
from typing import Optional

import torch

# Versions come from the installed distributions' metadata, not from ``module.__version__``: it
# needs no import, and some modules' attribute is wrong (ffcv 1.0.2 reports "0.0.3rc1").
PACKAGES = ("torch", "triton", "ffcv", "numba", "numpy", "pillow", "airbench")


def package_version(name: str) -> Optional[str]:
    """The installed version of distribution ``name``, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Python, fastcifar, the packages in ``PACKAGES`` and torch's CUDA and cuDNN; None for what
    is missing."""
    import fastcifar

    out = {"python": platform.python_version(), "fastcifar": fastcifar.__version__}
    out.update({pkg: package_version(pkg) for pkg in PACKAGES})
    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return out


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7763 64-Core Processor"); platform's guess off Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(spec: str = "auto") -> str:
    """"auto" (cuda when torch sees a GPU, else cpu), "cpu", "cuda" or "cuda:N", checked
    against what torch sees; returns the canonical string."""
    from fastcifar.errors import UserError

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec} asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def device_name(device) -> str:
    """The GPU's name for a CUDA device; "CPU (<model>, <n> cores, <t> threads)" otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def command_line() -> str:
    """The command that is running, as a user would type it (``fastcifar ...`` for the CLI)."""
    argv = list(sys.argv)
    if argv and (argv[0].endswith("fastcifar") or argv[0].endswith("cli.py")):
        argv[0] = "fastcifar"
    return shlex.join(argv)


def sync(device) -> None:
    """Wait for the GPU to finish its queued work (nothing to wait for on the CPU): the bracket
    around every host-clock timing of device work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_us(evt) -> float:
    """Device microseconds of a torch.profiler event (average or function event): the field
    is `device_time_total`, `cuda_time_total` in older torch."""
    for attr in ("device_time_total", "cuda_time_total"):
        v = getattr(evt, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def machine_info(device=None) -> dict:
    """Platform, CPUs, GPUs and ``versions()``; ``device`` (if given) is named as ``device_name``
    names it. The load average tells whether other work shared the CPUs during a measurement."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info = {
        "platform": platform.platform(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "cpus_usable": _usable_cpus(),
        "load_average_1_5_15": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if gpus else None, "gpu_count": gpus,
    }
    if device is not None:
        info["device"] = str(device)
        info["device_name"] = device_name(device)
    info["versions"] = versions()
    info["command"] = command_line()
    # bench/gpu_suite.sh says whether compile caches were carried in from an earlier call: a
    # compile time measured with a warm cache is not a cold-start figure
    if os.environ.get("FASTCIFAR_COMPILE_CACHE"):
        info["compile_cache"] = os.environ["FASTCIFAR_COMPILE_CACHE"]
    return info
