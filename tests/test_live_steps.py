"""validation.live_steps on hand-made live runs: matching steps to calls, the rebuilt batch,
the per-run speed and the shape residuals (the real runs are the matrix's)."""

from __future__ import annotations

import pandas as pd
import pytest

from calibrate.profile import execute_model
from validation.live_steps import bin_labels, live_step_speed, matched_steps
from validation.matrix import live_speed_lines

# Execute part: 1 ms + 0.1 ms per prefill token + 1 µs per decode context position.
PROFILE = {"latency_model": {
    "kind": "linear", "intercept": 0.0015,
    "coefficients": {"prefill_tokens": 1e-4, "decode_ctx_sum": 1e-6},
    "fit": {"parts": {"execute": {"intercept_s": 0.001, "features": ["prefill_tokens", "decode_ctx_sum"]},
                      "host": {"coefficients_s": {"num_steps": 0.0005}}}}}}
CALL_COLS = ["program_id", "call_index", "arrival_s", "first_token_s", "finish_s", "input_tokens", "cached_tokens",
             "output_tokens", "status"]
STEP_COLS = ["t_s", "instance", "num_prefill_reqs", "num_prefill_tokens", "num_decode_reqs", "period_ms",
             "elapsed_ms"]


def _write(d, calls, steps):
    d.mkdir(parents=True)
    pd.DataFrame(calls, columns=CALL_COLS).to_csv(d / "calls.csv", index=False)
    pd.DataFrame(steps, columns=STEP_COLS).to_csv(d / "steps.csv", index=False)
    return d


def _lone_calls(d, n, slow):
    """n calls, each alone in the engine: a prefill of 100 + 50 k tokens over 128 k cached,
    logged at `slow` x the profile's execute time."""
    calls, steps = [], []
    for k in range(n):
        new, t = 100 + 50 * k, 1.0 + k
        ms = slow * (1.0 + 0.1 * new)
        steps.append((t, 0, 1, new, 0, None, ms))
        calls.append((f"p{k}", 0, t - 0.05, t + 0.001, t + 0.3, new + 128 * (k % 3), 128 * (k % 3), 5, "ok"))
    return _write(d, calls, steps)


def test_mixed_and_decode_batches_are_rebuilt_from_the_calls(tmp_path):
    # A decodes (300-token prompt, 10 out, first token at 0.03, done at 0.23) when B's 100 new
    # tokens over 128 cached run in the step logged at 0.13 s, 10 ms long; then both decode.
    calls = [("a", 0, 0.0, 0.03, 0.23, 300, 0, 10, "ok"), ("b", 0, 0.11, 0.1305, 0.4, 228, 128, 10, "ok")]
    steps = [(0.029, 0, 1, 300, 0, None, 30.0), (0.13, 0, 1, 100, 1, 12.0, 10.0), (0.14, 0, 0, 0, 2, 10.0, 4.0)]
    m = matched_steps(_write(tmp_path / "r", calls, steps), execute_model(PROFILE))
    assert list(m["kind"]) == ["prefill", "prefill", "decode"]
    assert list(m["new_tokens"]) == [300, 100, 0] and list(m["cached_tokens"]) == [0, 128, 0]
    assert list(m["decodes"]) == [0, 1, 2]
    assert m["profile_ms"].iloc[0] == pytest.approx(31.0)
    done = (0.12 - 0.03) / (0.23 - 0.03)  # the decode's share of output by the step's start
    assert m["profile_ms"].iloc[1] == pytest.approx(1.0 + 10.0 + 1e-3 * round(300 + 10 * done + 1))
    done_a, done_b = (0.136 - 0.03) / 0.2, (0.136 - 0.1305) / (0.4 - 0.1305)
    assert m["profile_ms"].iloc[2] == pytest.approx(1.0 + 1e-3 * round(300 + 10 * done_a + 1 + 228 + 10 * done_b + 1))


def test_ambiguous_or_unexplained_steps_are_left_out(tmp_path):
    calls = [("a", 0, 0.0, 0.0305, 0.2, 100, 0, 5, "ok"), ("b", 0, 0.0, 0.0310, 0.2, 100, 0, 5, "ok"),
             ("c", 0, 0.5, 0.6005, 0.7, 100, 0, 5, "ok")]
    steps = [(0.030, 0, 1, 100, 0, None, 11.0),  # two calls fit: which one is unknowable
             (0.600, 0, 1, 100, 2, None, 11.0)]  # two decodes logged, none running in the calls
    assert matched_steps(_write(tmp_path / "r", calls, steps), execute_model(PROFILE)).empty
    assert matched_steps(tmp_path / "nothing-here", execute_model(PROFILE)).empty


def test_run_factor_and_shape_residuals(tmp_path):
    runs = [_lone_calls(tmp_path / "fast", 12, 1.0), _lone_calls(tmp_path / "slow", 12, 1.25)]
    s = live_step_speed(runs, PROFILE)
    assert [r["factor"] for r in s["runs"]] == pytest.approx([1.0, 1.25])
    assert s["spread"] == pytest.approx(0.25) and s["steps"] == 24
    # the model is exact up to each run's speed: every shape bin's median is 1
    assert all(b["ratio"] == pytest.approx(1.0) for bins in s["by_shape"].values() for b in bins)
    assert all(r["decode_factor"] is None for r in s["runs"])  # no decode-only steps in these runs
    assert {b["bin"] for b in s["by_shape"]["cached_tokens"]} == {"0", "1-256"}
    lines = "\n".join(live_speed_lines([{"case": "c", "live_step_speed": s}]))
    assert "x1.000 to x1.250" in lines and "| c | 24 | x1.000 / x1.250 | 0 | - / - | 25.0% |" in lines


def test_a_shape_the_model_gets_wrong_shows_in_its_bin(tmp_path):
    d = _lone_calls(tmp_path / "r", 12, 1.0)
    st = pd.read_csv(d / "steps.csv")
    st.loc[st["num_prefill_tokens"] > 512, "elapsed_ms"] *= 1.5  # long prefills 50 % slower than modelled
    st.to_csv(d / "steps.csv", index=False)
    s = live_step_speed([d], PROFILE)
    bins = {b["bin"]: b["ratio"] for b in s["by_shape"]["new_tokens"]}
    assert bins["513-1024"] / bins["65-128"] == pytest.approx(1.5)


def test_too_few_steps_or_no_linear_profile_give_nothing(tmp_path):
    d = _lone_calls(tmp_path / "r", 5, 1.0)
    assert live_step_speed([d], PROFILE) is None
    assert live_step_speed([_lone_calls(tmp_path / "r2", 12, 1.0)], {"latency_model": {"kind": "roofline"}}) is None
    assert bin_labels("decodes") == ["0", "1", "2-3", "4+"]


def test_summary_of_the_runs_at_their_own_speed():
    speed = {"runs": [{"run": "measured", "steps": 12, "factor": 1.0, "decode_factor": 1.1}], "steps": 12,
             "decode_steps": 30, "spread": 0.0, "by_shape": {}}
    cases = [{"case": "a", "live_step_speed": speed,
              "at_live_step_speed": {"errors": {"mean_ttft_ms": -0.08, "mean_tpot_ms": 0.01, "mean_e2e_ms": 0.02,
                                                "mean_jct_s": 0.0}}},
             {"case": "b", "live_step_speed": speed,
              "at_live_step_speed": {"errors": {"mean_ttft_ms": 0.02, "mean_tpot_ms": -0.03, "mean_e2e_ms": 0.04,
                                                "mean_jct_s": 0.01}}}]
    text = "\n".join(live_speed_lines(cases))
    assert "worst mean TTFT 8.0% (a), TPOT 3.0% (b), E2E 4.0% (b), JCT 1.0% (b)" in text
    assert "median 5.0 / 2.0 / 3.0 / 0.5 %; cases with all four within 5%: 1 of 2" in text
    assert "| a | 12 | x1.000 | 30 | x1.100 | 0.0% | - | -8.0% / +1.0% / +2.0% / +0.0% |" in text
