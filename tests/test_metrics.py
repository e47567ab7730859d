"""summarize(): vLLM-bench statistics and agent keys from hand-made rows, checked against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.metrics import summarize


def _call(ttft, e2e, out, inp=100, cached=0, arrival=0.0, status="ok", preemptions=0):
    first = arrival + ttft
    finish = arrival + e2e
    tpot = (finish - first) / (out - 1) if out > 1 else 0.0
    return {"program_id": "p", "call_index": 0, "arrival_s": arrival, "first_token_s": first, "finish_s": finish,
            "input_tokens": inp, "cached_tokens": cached, "output_tokens": out, "ttft_s": ttft, "tpot_s": tpot,
            "e2e_s": e2e, "preemptions": preemptions, "status": status}


TTFT = [0.05, 0.2, 0.01, 0.4, 0.13, 0.07, 0.9, 0.3, 0.02, 0.11, 0.5]
OUTS = [10, 1, 5, 20, 1, 7, 3, 12, 2, 1, 30]
CALLS = [_call(t, t + 0.01 * o, o, arrival=0.1 * i) for i, (t, o) in enumerate(zip(TTFT, OUTS))]


def _np_stats(x):
    x = np.asarray(x, dtype=float) * 1000
    return {"mean": x.mean(), "median": np.median(x), "std": x.std(), "p90": np.percentile(x, 90),
            "p99": np.percentile(x, 99)}


@pytest.mark.parametrize("stat", ["mean", "median", "std", "p90", "p99"])
def test_ttft_statistics_match_numpy(stat):
    """mean/median/std/p90/p99 TTFT (ms) equal numpy's over the calls."""
    s = summarize(CALLS, [])
    assert s[f"{stat}_ttft_ms"] == pytest.approx(_np_stats(TTFT)[stat], rel=1e-12)


@pytest.mark.parametrize("stat", ["mean", "median", "p90", "p99"])
def test_e2e_statistics_match_numpy(stat):
    """E2E latency statistics (ms) equal numpy's."""
    s = summarize(CALLS, [])
    assert s[f"{stat}_e2el_ms"] == pytest.approx(_np_stats([c["e2e_s"] for c in CALLS])[stat], rel=1e-12)


def test_tpot_excludes_single_token_calls():
    """TPOT statistics are over calls with more than one output token only."""
    s = summarize(CALLS, [])
    multi = [c["tpot_s"] for c in CALLS if c["output_tokens"] > 1]
    assert s["mean_tpot_ms"] == pytest.approx(np.mean(multi) * 1000, rel=1e-12)
    assert s["p99_tpot_ms"] == pytest.approx(np.percentile(multi, 99) * 1000, rel=1e-12)


def test_tpot_is_decode_time_per_extra_token():
    """A call's TPOT is (e2e - ttft) / (output - 1)."""
    s = summarize([_call(0.1, 0.1 + 0.02 * 9, 10)], [])
    assert s["mean_tpot_ms"] == pytest.approx(20.0)


def test_failed_calls_are_excluded_from_latency_but_counted():
    """Failed calls count in 'failed', not in 'completed' or any latency statistic."""
    calls = CALLS + [_call(100.0, 200.0, 5, status="failed")]
    s = summarize(calls, [])
    assert s["completed"] == len(CALLS) and s["failed"] == 1
    assert s["mean_ttft_ms"] == pytest.approx(np.mean(TTFT) * 1000)


def test_throughputs_use_first_arrival_to_last_finish():
    """duration = last finish - first arrival; throughputs divide totals by it."""
    s = summarize(CALLS, [])
    duration = max(c["finish_s"] for c in CALLS) - min(c["arrival_s"] for c in CALLS)
    assert s["duration"] == pytest.approx(duration)
    assert s["request_throughput"] == pytest.approx(len(CALLS) / duration)
    assert s["output_throughput"] == pytest.approx(sum(OUTS) / duration)
    assert s["total_token_throughput"] == pytest.approx((sum(OUTS) + 100 * len(CALLS)) / duration)


def test_prefix_cache_hit_rate_and_preemptions():
    """hit rate = cached / input tokens; preemptions are summed over calls."""
    calls = [_call(0.1, 0.2, 2, inp=100, cached=48, preemptions=1), _call(0.1, 0.2, 2, inp=300, cached=0, preemptions=2)]
    s = summarize(calls, [])
    assert s["prefix_cache_hit_rate"] == pytest.approx(48 / 400)
    assert s["preemptions"] == 3


def test_jct_percentiles_match_numpy():
    """mean/p50/p90/p99 JCT (s) equal numpy's over completed programs."""
    jct = [3.0, 1.0, 8.0, 2.5, 4.0, 10.0, 0.5]
    progs = [{"program_id": f"p{i}", "jct_s": j, "status": "ok"} for i, j in enumerate(jct)]
    progs.append({"program_id": "bad", "jct_s": 99.0, "status": "failed"})
    s = summarize(CALLS, progs)
    assert s["mean_jct_s"] == pytest.approx(np.mean(jct))
    for p in (50, 90, 99):
        assert s[f"p{p}_jct_s"] == pytest.approx(np.percentile(jct, p))
    assert s["programs_completed"] == len(jct)


def test_empty_run_gives_zeros():
    """No calls: zero counts, zero statistics, no division error."""
    s = summarize([], [])
    assert s["completed"] == 0 and s["duration"] == 0.0 and s["mean_ttft_ms"] == 0.0 and s["request_throughput"] == 0.0


def test_summary_has_the_vllm_bench_keys():
    """summary has every key vllm bench serve writes for ttft/tpot/itl/e2el."""
    s = summarize(CALLS, [], [0.01], [1])
    for m in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p90", "p99"):
            assert f"{stat}_{m}_ms" in s
    for k in ("completed", "duration", "request_throughput", "output_throughput", "total_token_throughput"):
        assert k in s


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(st.floats(1e-4, 1.0, allow_nan=False), st.integers(1, 6)), min_size=1, max_size=30))
def test_weighted_itl_statistics_equal_the_expanded_sample(pairs):
    """ITL given as (value, weight) pairs has the statistics of the expanded sample."""
    values = [v for v, _ in pairs]
    weights = [w for _, w in pairs]
    expanded = np.repeat(values, weights)
    s = summarize(CALLS, [], values, weights)
    ref = _np_stats(expanded)
    for stat in ("mean", "median", "p90", "p99"):
        assert math.isclose(s[f"{stat}_itl_ms"], ref[stat], rel_tol=1e-9, abs_tol=1e-9), stat
    assert math.isclose(s["std_itl_ms"], ref["std"], rel_tol=1e-6, abs_tol=1e-6)


def test_weighted_itl_with_unit_weights_equals_plain_numpy():
    """Unit weights give numpy's plain percentiles."""
    v = [0.03, 0.01, 0.02, 0.5, 0.04]
    s = summarize(CALLS, [], v, [1] * len(v))
    assert s["p90_itl_ms"] == pytest.approx(np.percentile(v, 90) * 1000)
    assert s["median_itl_ms"] == pytest.approx(np.median(v) * 1000)
