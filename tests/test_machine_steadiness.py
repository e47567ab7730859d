"""benchmarks/machine_steadiness.py's arithmetic on hand-made samples (the timing itself is a
script's job, not a test's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "machine_steadiness.py"
_spec = importlib.util.spec_from_file_location("machine_steadiness", _PATH)
steadiness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(steadiness)


def test_window_drift_is_max_over_min_of_window_medians():
    # 0-30 s: compute 5 ms, memory 2 ms; 30-60 s: compute 5.5 ms (one outlier), memory 3 ms.
    t = np.arange(60.0)
    comp = np.where(t < 30, 5e-3, 5.5e-3)
    comp[40] = 50e-3  # a single spike moves a window's median not at all
    mem = np.where(t < 30, 2e-3, 3e-3)
    s = steadiness.summarize(np.column_stack([t, comp, mem]), window=30.0)
    assert s["compute"]["window_medians_ms"] == pytest.approx([5.0, 5.5])
    assert s["compute"]["window_drift"] == pytest.approx(0.10)
    assert s["memory"]["window_drift"] == pytest.approx(0.50)
    assert s["memory"]["median_ms"] == pytest.approx(2.5)


def test_windows_with_under_three_samples_are_left_out():
    t = np.array([0.0, 1.0, 2.0, 31.0, 32.0])  # the second window has 2 samples
    x = np.array([1e-3, 1e-3, 1e-3, 9e-3, 9e-3])
    s = steadiness.summarize(np.column_stack([t, x, x]), window=30.0)
    assert s["compute"]["window_medians_ms"] == pytest.approx([1.0])
    assert s["compute"]["window_drift"] is None


def test_refuses_a_run_shorter_than_two_windows(capsys):
    with pytest.raises(SystemExit) as e:
        steadiness.main(["--seconds", "40", "--window", "30"])
    assert e.value.code == 2
    assert "two --window lengths" in capsys.readouterr().err
