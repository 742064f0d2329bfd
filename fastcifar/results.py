"""Helpers every result writer shares: file names from device names, mean ± std, time stamps,
and writing a result file atomically.

    from fastcifar.results import device_slug, mean_std, format_pm, now_iso, write_result
"""
from __future__ import annotations

import datetime as _dt
import math
import re
from pathlib import Path
from typing import Optional

from beton_data.files import atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)


def device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; any CPU -> 'cpu'."""
    if device_name.startswith("CPU"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def format_pm(mean: float, std: Optional[float], scale: float = 1.0) -> str:
    """'94.12 ± 0.10' (scale=100 turns fractions into percent); just the mean when std is None."""
    return f"{scale * mean:.2f}" if std is None else f"{scale * mean:.2f} ± {scale * std:.2f}"


def now_iso() -> str:
    """The current UTC time, to the second: '2026-11-23T10:00:00+00:00'."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_result(path: str | Path, result: dict) -> Path:
    """A result file: JSON, written atomically, its folder created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, result)
