"""Helpers every result writer shares: file names from device names, the statistics of a set
of runs, the comparison of a model's runs with a baseline's, time stamps, and writing a result
file atomically.

    from fastcifar.results import aggregate, compare, describe, format_pm, write_result

The statistics (SciPy, not hand-written):

- per set of runs, for accuracy and for time: mean, sample standard deviation and the 95%
  confidence interval of the mean (Student's t: mean ± t(0.975, n-1) · s / √n, cut to [0, 1]
  for accuracy and to >= 0 for time; it assumes the runs are independent and roughly normal).
  With one run there is a mean and nothing else: no std, no interval, no test.
- against a baseline, two one-sided Welch t-tests (unequal variances):

  time      H0: mean time of the model >= the baseline's;  H1: the model is faster.
  accuracy  H0: mean accuracy of the model <= the baseline's - margin;
            H1: the model is worse by less than the margin (non-inferiority).

  Why a margin: no test can show that two means are equal, and a test whose H0 is "the model
  is not worse" can only fail to reject it, which is no evidence that it is not worse (with few
  runs it almost always fails to reject). So the accuracy test takes "worse by the margin or
  more" as H0; a small p shows the model is at most a little worse, or better. The margin is
  ``ACCURACY_MARGIN`` (0.2 percentage points) unless told otherwise, and it is recorded with
  every p-value.
- a record: at least ``RECORD_MIN_RUNS`` (5) runs and p < ``ALPHA`` (0.05) on both tests. Both
  must reject, so the combined claim ("faster and not worse") also holds at the 5% level
  without a correction for two tests. Each test needs >= 2 runs on each side and some spread.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

from beton_data.files import atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)

CONFIDENCE = 0.95
ALPHA = 0.05
RECORD_MIN_RUNS = 5
ACCURACY_MARGIN = 0.002     # as a fraction: 0.2 percentage points


def device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; any CPU -> 'cpu'."""
    if device_name.startswith("CPU"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"


# -----------------------------------------------------------------------------
# one set of runs

def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def confidence_interval(values: Sequence[float], confidence: float = CONFIDENCE,
                        bounds: tuple[float, float] = (-math.inf, math.inf)) -> Optional[list[float]]:
    """[low, high] of the t-interval of the mean, cut to ``bounds`` (a mean accuracy cannot
    leave [0, 1], whatever a t-interval of two runs says); None below 2 values. Zero spread
    gives the degenerate interval [mean, mean]."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    mean, std = mean_std(values)
    if std == 0:
        return [mean, mean]
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=std / math.sqrt(n))
    return [max(float(low), bounds[0]), min(float(high), bounds[1])]


def describe(values: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict:
    """n, mean, std (None below 2 values) and ci95 ([low, high] within ``bounds``, None below
    2 values)."""
    values = [float(v) for v in values]
    mean, std = mean_std(values)
    return {"n": len(values), "mean": mean, "std": std, "ci95": confidence_interval(values, bounds=bounds)}


def aggregate(runs: list[dict]) -> dict:
    """The figures of a set of runs (dicts with accuracy, time_s and maybe original_accuracy);
    runs that carry an ``error`` are left out. Keys: accuracy_mean/_std/_ci95, time_mean_s/_std_s/
    _ci95_s, original_accuracy_mean/_std/_ci95 (when every run has it), runs_ok."""
    ok = [r for r in runs if "error" not in r]
    out: dict = {"runs_ok": len(ok)}
    if not ok:
        return out
    for key, prefix, suffix in (("accuracy", "accuracy", ""), ("time_s", "time", "_s"),
                                ("original_accuracy", "original_accuracy", "")):
        if key == "original_accuracy" and not all(key in r for r in ok):
            continue
        d = describe([r[key] for r in ok], bounds=(0.0, 1.0) if "accuracy" in key else (0.0, math.inf))
        out[f"{prefix}_mean{suffix}"], out[f"{prefix}_std{suffix}"] = d["mean"], d["std"]
        out[f"{prefix}_ci95{suffix}"] = d["ci95"]
    return out


# -----------------------------------------------------------------------------
# a model against a baseline

def welch_p(a: Sequence[float], b: Sequence[float], alternative: str, shift: float = 0.0) -> Optional[float]:
    """One-sided Welch t-test p-value of mean(a) + shift against mean(b); ``alternative`` is
    'less' or 'greater' (H1: mean(a) + shift < / > mean(b)). None when it is undefined: fewer
    than 2 values on a side, or no spread on either side."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    if mean_std(a)[1] == 0 and mean_std(b)[1] == 0:
        return None
    with warnings.catch_warnings():  # near-identical values: SciPy warns and still answers
        warnings.simplefilter("ignore", RuntimeWarning)
        p = stats.ttest_ind([x + shift for x in a], list(b), equal_var=False, alternative=alternative).pvalue
    return None if not math.isfinite(p) else float(p)


def compare(accuracies: Sequence[float], times: Optional[Sequence[float]],
            base_accuracies: Sequence[float], base_times: Sequence[float],
            margin: float = ACCURACY_MARGIN) -> dict:
    """The two one-sided tests of the module docstring and the record rule.

    ``times`` None: the times are not comparable with the baseline's (measured differently),
    so there is no time test and no record. Returns baseline_runs, accuracy_margin, p_accuracy,
    p_time, record (bool) and why (what keeps it from being a record, '' when it is one)."""
    p_acc = welch_p(accuracies, base_accuracies, "greater", shift=margin)
    p_time = welch_p(times, base_times, "less") if times is not None else None
    why = []
    if len(accuracies) < RECORD_MIN_RUNS:
        why.append(f"{len(accuracies)} < {RECORD_MIN_RUNS} runs")
    if times is None:
        why.append("time not measured as the baseline's")
    tests = [("accuracy", p_acc)] + ([("time", p_time)] if times is not None else [])
    for name, p in tests:
        if p is None:
            why.append(f"no {name} test (needs >= 2 runs on each side with some spread)")
        elif p >= ALPHA:
            why.append(f"{name} p = {p:.3g} >= {ALPHA}")
    return {"baseline_runs": len(base_accuracies), "accuracy_margin": margin,
            "p_accuracy": p_acc, "p_time": p_time, "record": not why, "why": "; ".join(why)}


# -----------------------------------------------------------------------------
# text and files

def format_pm(mean: float, std: Optional[float], scale: float = 1.0) -> str:
    """'94.12 ± 0.10' (scale=100 turns fractions into percent); just the mean when std is None."""
    return f"{scale * mean:.2f}" if std is None else f"{scale * mean:.2f} ± {scale * std:.2f}"


def format_ci(ci: Optional[Sequence[float]], scale: float = 1.0) -> str:
    """'[94.02, 94.22]'; '—' when there is no interval (fewer than 2 runs)."""
    return "—" if ci is None else f"[{scale * ci[0]:.2f}, {scale * ci[1]:.2f}]"


def format_p(p: Optional[float]) -> str:
    """'0.003', '<0.001' or '—' (no test)."""
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def now_iso() -> str:
    """The current UTC time, to the second: '2026-11-23T10:00:00+00:00'."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_result(path: str | Path, result: dict) -> Path:
    """A result file: JSON, written atomically, its folder created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, result)
