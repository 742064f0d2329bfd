"""fastcifar.results: confidence intervals, the one-sided Welch tests against a baseline and the
record rule, checked against hand-derived small cases and against SciPy called directly here."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fastcifar.results import (ACCURACY_MARGIN, RECORD_MIN_RUNS, aggregate, compare, confidence_interval, describe,
                               format_ci, format_p, welch_p)


def test_confidence_interval_hand_checked():
    # [1, 2, 3]: mean 2, s = 1; Student's t with 2 degrees of freedom has the closed-form
    # quantile t = sqrt(2 q^2 / (1 - q^2)) at two-sided level q = 0.95: 4.3026527...
    t = math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2))
    half = t * 1 / math.sqrt(3)
    assert confidence_interval([1.0, 2.0, 3.0]) == pytest.approx([2 - half, 2 + half], rel=1e-12)
    assert describe([1.0, 2.0, 3.0]) == {"n": 3, "mean": 2.0, "std": 1.0, "ci95": pytest.approx([2 - half, 2 + half])}


def test_confidence_interval_matches_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 17):
        x = rng.normal(0.94, 0.002, n)
        se = x.std(ddof=1) / math.sqrt(n)
        q = stats.t.ppf(0.975, n - 1)
        assert confidence_interval(list(x)) == pytest.approx([x.mean() - q * se, x.mean() + q * se], rel=1e-12)


def test_small_samples_and_bounds():
    # one run: a mean, no spread, no interval
    assert describe([0.93]) == {"n": 1, "mean": 0.93, "std": None, "ci95": None}
    assert format_ci(None) == "—"
    # no spread: the degenerate interval
    assert confidence_interval([5.0, 5.0, 5.0]) == [5.0, 5.0]
    # an accuracy interval stays inside [0, 1]
    low, high = confidence_interval([0.99, 1.0], bounds=(0.0, 1.0))
    assert high == 1.0 and low < 0.99


def test_welch_hand_checked():
    # [1,2,3] against [4,5,6]: t = -3 / sqrt(1/3 + 1/3) = -3.674..., Welch df = 4; the one-sided p
    # from the closed-form CDF of Student's t with 4 degrees of freedom
    t = -3 / math.sqrt(2 / 3)
    x = t / math.sqrt(1 + t * t / 4)
    p_less = 0.5 + 3 / 8 * x * (1 - t * t / (12 * (1 + t * t / 4)))
    assert p_less == pytest.approx(0.0106558, abs=1e-6)
    assert welch_p([1, 2, 3], [4, 5, 6], "less") == pytest.approx(p_less, rel=1e-9)
    assert welch_p([1, 2, 3], [4, 5, 6], "greater") == pytest.approx(1 - p_less, rel=1e-9)
    # the shift moves the first sample: [4,5,6] + 0 against [4,5,6] is t = 0, p = 1/2
    assert welch_p([1, 2, 3], [4, 5, 6], "greater", shift=3) == pytest.approx(0.5)


def test_welch_undefined_cases():
    assert welch_p([0.9], [0.8, 0.85], "greater") is None           # one run on a side
    assert welch_p([0.9, 0.9], [0.8, 0.8], "greater") is None       # no spread on either side
    assert welch_p([0.9, 0.9], [0.8, 0.81], "greater") is not None  # spread on one side is enough


def test_compare_matches_scipy():
    rng = np.random.default_rng(1)
    acc, base_acc = rng.normal(0.941, 0.0015, 6), rng.normal(0.940, 0.0014, 7)
    t, base_t = rng.normal(3.0, 0.05, 6), rng.normal(3.4, 0.05, 7)
    c = compare(list(acc), list(t), list(base_acc), list(base_t))
    # accuracy: H0 mean(model) <= mean(baseline) - margin, i.e. H1 mean(model) + margin > mean(baseline)
    want_acc = stats.ttest_ind(acc + ACCURACY_MARGIN, base_acc, equal_var=False, alternative="greater").pvalue
    want_t = stats.ttest_ind(t, base_t, equal_var=False, alternative="less").pvalue
    assert c["p_accuracy"] == pytest.approx(want_acc, rel=1e-12)
    assert c["p_time"] == pytest.approx(want_t, rel=1e-12)
    assert c["accuracy_margin"] == ACCURACY_MARGIN and c["baseline_runs"] == 7
    assert c["record"] is bool(want_acc < 0.05 and want_t < 0.05)
    # a wider margin makes non-inferiority easier to show, never harder
    assert compare(list(acc), list(t), list(base_acc), list(base_t), margin=0.01)["p_accuracy"] < c["p_accuracy"]


def test_record_rule():
    base_acc, base_t = [0.940, 0.941, 0.939, 0.940, 0.942], [3.0, 3.1, 3.05, 2.95, 3.0]
    acc, t = [0.945, 0.946, 0.944, 0.945, 0.947], [2.0, 2.1, 2.05, 1.95, 2.0]
    c = compare(acc, t, base_acc, base_t)
    assert c["p_accuracy"] < 0.05 and c["p_time"] < 0.05 and c["record"] and c["why"] == ""
    # the same figures from fewer runs than a record needs
    few = compare(acc[:RECORD_MIN_RUNS - 1], t[:RECORD_MIN_RUNS - 1], base_acc, base_t)
    assert not few["record"] and "4 < 5 runs" in few["why"]
    # faster but clearly less accurate: the accuracy test does not reject
    worse = compare([a - 0.01 for a in acc], t, base_acc, base_t)
    assert worse["p_accuracy"] > 0.5 and not worse["record"] and "accuracy p" in worse["why"]
    # times measured differently (train rows): no time test, never a record
    no_time = compare(acc, None, base_acc, base_t)
    assert no_time["p_time"] is None and not no_time["record"] and "time not measured" in no_time["why"]


def test_aggregate_leaves_failed_runs_out():
    runs = [{"accuracy": 0.9, "time_s": 2.0}, {"seed": 1, "error": "RuntimeError: boom"},
            {"accuracy": 0.92, "time_s": 2.2}]
    a = aggregate(runs)
    assert a["runs_ok"] == 2 and a["accuracy_mean"] == pytest.approx(0.91)
    assert a["accuracy_ci95"] == pytest.approx(confidence_interval([0.9, 0.92], bounds=(0.0, 1.0)))
    assert a["time_std_s"] == pytest.approx(np.std([2.0, 2.2], ddof=1))
    assert "original_accuracy_mean" not in a
    assert aggregate([{"error": "x"}]) == {"runs_ok": 0}


def test_format_p():
    assert format_p(None) == "—" and format_p(0.0004) == "<0.001" and format_p(0.0123) == "0.012"
