"""benchmarks/compare_runs.py: the window SE accounts for the correlation of consecutive steps."""

import importlib.util
import math
import statistics
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).parents[1] / "benchmarks" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_runs)


def test_lag1_autocorrelation_closed_forms():
    # [0, 0, 1, 1]: deviations ∓1/2, Σ d_t d_{t+1} = 1/4 − 1/4 + 1/4, Σ d² = 1
    assert compare_runs.lag1_autocorrelation([0, 0, 1, 1]) == pytest.approx(0.25)
    # alternating: Σ d_t d_{t+1} = −3/4 of Σ d² = 1
    assert compare_runs.lag1_autocorrelation([0, 1, 0, 1]) == pytest.approx(-0.75)
    assert compare_runs.lag1_autocorrelation([2, 2, 2]) == 0.0 and compare_runs.lag1_autocorrelation([1, 2]) == 0.0


def test_window_se_is_inflated_by_the_ar1_factor_and_never_shrunk():
    rows = [{"step": i + 1, "reward/score": v} for i, v in enumerate([0, 0, 1, 1, 5, 0, 1, 0, 1])]
    trending = compare_runs.window_stats(rows, "reward/score", 1, 4)
    iid = statistics.stdev([0, 0, 1, 1]) / 2
    assert trending["se_iid"] == pytest.approx(iid) and trending["rho"] == pytest.approx(0.25)
    assert trending["se"] == pytest.approx(iid * math.sqrt(1.25 / 0.75)) and trending["mean"] == 0.5
    alternating = compare_runs.window_stats(rows, "reward/score", 6, 9)  # ρ < 0 is taken as 0
    assert alternating["rho"] == 0.0 and alternating["se"] == alternating["se_iid"]
    assert compare_runs.window_stats(rows, "kl", 1, 9) is None
