"""validation.compare / diagnose / checks / report on hand-made results directories: known
errors come out exactly, calls pair on (program_id, call_index), warnings appear when (and
only when) the comparison is not meaningful, and a planted error is found in the right part."""

from __future__ import annotations

import csv
import json
import random

import pytest

from simulator.metrics import CALL_COLUMNS, PROGRAM_COLUMNS, TIMESERIES_COLUMNS, summarize
from validation.cli import main as validate_main
from validation.compare import compare, load_run, ResultsInputError
from validation.diagnose import interval_load, theil_sen
from validation.report import write_report


# -- builders -----------------------------------------------------------------------------------

def build_calls(n_programs=10, calls_per=4, *, a=0.02, d=2e-5, tpot=0.01, ttft_offset=0.0, ttft_scale=1.0,
                tpot_scale=1.0, tool_s=0.5, spacing=30.0, extra_cached=0, queue_s=0.0):
    """Append-only chains; TTFT = (a + d * uncached) * ttft_scale + ttft_offset, programs far apart."""
    calls, programs = [], []
    for p in range(n_programs):
        pid = f"p{p:03d}"
        t = start = p * spacing
        for k in range(calls_per):
            inp = 1000 + 500 * k + 37 * p
            cached = 512 * k + (extra_cached if k else 0)
            ttft = queue_s + (a + d * (inp - cached)) * ttft_scale + ttft_offset
            out = 20 + 5 * k
            tp = tpot * tpot_scale
            e2e = ttft + tp * (out - 1)
            calls.append({"program_id": pid, "call_index": k, "instance": 0, "arrival_s": t, "scheduled_s": t + queue_s,
                          "first_token_s": t + ttft, "finish_s": t + e2e, "input_tokens": inp, "cached_tokens": cached,
                          "output_tokens": out, "ttft_s": ttft, "tpot_s": tp, "e2e_s": e2e, "preemptions": 0,
                          "loaded_tokens": 0, "status": "ok", "error": ""})
            end = t + e2e
            t = end + tool_s
        programs.append({"program_id": pid, "arrival_s": start, "finish_s": end, "jct_s": end - start,
                         "calls": calls_per, "tool_s_total": tool_s * (calls_per - 1), "status": "ok"})
    return calls, programs


def write_run(path, calls, programs, *, backend="simulator", itl_ms=None, extra_columns=(), **summary_extra):
    path.mkdir(parents=True, exist_ok=True)
    for name, rows, cols in (("calls", calls, CALL_COLUMNS + tuple(extra_columns)),
                             ("programs", programs, PROGRAM_COLUMNS)):
        with open(path / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    with open(path / "timeseries.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(TIMESERIES_COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows([{"t_s": float(t), "instance": 0, "running": 1, "waiting": 0, "kv_usage": 0.1} for t in range(5)])
    s = summarize(calls, programs)
    if itl_ms is not None:
        s.update({f"{k}_itl_ms": v for k, v in itl_ms.items()})
    s.update({"backend": backend, "trace": "hand.jsonl", "config": {"engine": {"max_num_seqs": 8}}})
    s.update(summary_extra)
    (path / "summary.json").write_text(json.dumps(s))
    return path


def pair_of_runs(tmp_path, meas_kw=None, sim_kw=None, **common):
    m = write_run(tmp_path / "meas", *build_calls(**{**common, **(meas_kw or {})}))
    s = write_run(tmp_path / "sim", *build_calls(**{**common, **(sim_kw or {})}))
    return m, s


def codes(errors):
    return [w["code"] for w in errors["warnings"]]


# -- the arithmetic --------------------------------------------------------------------------------

def test_aggregate_errors_are_exact(tmp_path):
    """TTFT x1.25 and TPOT x0.5 in every call give +25% and -50% at every statistic; ITL from summary."""
    mc, mp = build_calls()
    sc, sp = build_calls(ttft_scale=1.25, tpot_scale=0.5)
    for c in sc[:3]:
        c["preemptions"] = 1
    write_run(tmp_path / "m", mc, mp, itl_ms={"mean": 10.0, "median": 8.0, "p90": 20.0, "p99": 40.0})
    write_run(tmp_path / "s", sc, sp, itl_ms={"mean": 12.0, "median": 8.0, "p90": 15.0, "p99": 50.0})
    e = compare(tmp_path / "m", tmp_path / "s")
    for st in ("mean", "p50", "p90", "p99"):
        assert e["metrics"]["ttft_ms"][st]["error"] == pytest.approx(0.25, abs=1e-12)
        assert e["metrics"]["tpot_ms"][st]["error"] == pytest.approx(-0.5, abs=1e-12)
    assert [e["metrics"]["itl_ms"][st]["error"] for st in ("mean", "p50", "p90", "p99")] == \
        pytest.approx([0.2, 0.0, -0.25, 0.25])
    assert e["metrics"]["ttft_ms"]["mean"]["measured"] == pytest.approx(
        1000 * sum(c["ttft_s"] for c in mc) / len(mc))
    assert e["metrics"]["preemptions"]["count"]["error"] == 3
    assert e["metrics"]["prefix_cache_hit_rate"]["value"]["error"] == pytest.approx(0.0)
    dur_m = max(c["finish_s"] for c in mc) - min(c["arrival_s"] for c in mc)
    assert e["metrics"]["request_throughput"]["value"]["measured"] == pytest.approx(len(mc) / dur_m)


def test_cache_hit_rate_error_is_in_points(tmp_path):
    """The hit-rate error is simulated minus measured, in percentage points."""
    m, s = pair_of_runs(tmp_path, sim_kw={"extra_cached": 64})
    e = compare(m, s)
    mc, _ = build_calls()
    sc, _ = build_calls(extra_cached=64)
    tin = sum(c["input_tokens"] for c in mc)
    want = 100 * (sum(c["cached_tokens"] for c in sc) - sum(c["cached_tokens"] for c in mc)) / tin
    row = e["metrics"]["prefix_cache_hit_rate"]["value"]
    assert row["error_kind"] == "points" and row["error"] == pytest.approx(want)


def test_calls_pair_on_program_and_index_not_row_order(tmp_path):
    """Shuffled rows still pair; a failed measured call and a sim-only call are left out."""
    mc, mp = build_calls()
    sc, sp = build_calls(ttft_scale=1.25)
    mc[5].update(status="failed", error="HTTP 500")
    sc.append(dict(sc[-1], program_id="extra", call_index=0))
    random.Random(1).shuffle(sc)
    write_run(tmp_path / "m", mc, mp)
    write_run(tmp_path / "s", sc, sp)
    e = compare(tmp_path / "m", tmp_path / "s")
    assert e["calls"]["paired"] == len(mc) - 1
    assert e["calls"]["only_simulated"] == 1
    p = e["paired"]["ttft"]
    assert p["n"] == len(mc) - 1
    assert p["median_abs_rel_error"] == pytest.approx(0.25)
    assert p["mean_signed_rel_error"] == pytest.approx(0.25)
    assert p["correlation"] == pytest.approx(1.0)
    assert "failed_calls" in codes(e)


# -- warnings --------------------------------------------------------------------------------------

def test_no_warning_for_a_clean_comparison(tmp_path):
    """Two runs of the same trace with enough calls and the same config: no warning at all."""
    m, s = pair_of_runs(tmp_path, n_programs=10, calls_per=4, sim_kw={"ttft_scale": 1.1})
    assert codes(compare(m, s)) == []


def test_warns_for_too_few_calls(tmp_path):
    m, s = pair_of_runs(tmp_path, n_programs=3, calls_per=4)
    assert codes(compare(m, s)) == ["too_few_calls"]


def test_warns_when_traces_differ(tmp_path):
    """Different prompt lengths on paired calls, or a program missing on one side."""
    mc, mp = build_calls()
    sc, sp = build_calls()
    sc[7]["input_tokens"] += 10
    write_run(tmp_path / "m", mc, mp)
    write_run(tmp_path / "s", sc, sp)
    e = compare(tmp_path / "m", tmp_path / "s")
    assert codes(e) == ["traces_differ"] and "prompt lengths differ on 1 of 40" in e["warnings"][0]["message"]
    write_run(tmp_path / "s2", [c for c in sc if c["program_id"] != "p009"] + [], sp[:-1])
    write_run(tmp_path / "m2", [c for c in mc if c["program_id"] != "p000"], mp[1:])
    e = compare(tmp_path / "m2", tmp_path / "s2")
    assert "traces_differ" in codes(e)
    assert any("4 calls only measured, 4 only simulated" in w["message"] for w in e["warnings"])


def test_warns_about_noise_client_lag_interruption_and_config(tmp_path):
    """A jittery measured TPOT, a late client, an interrupted run and a different config all warn."""
    mc, mp = build_calls()
    for i, c in enumerate(mc):
        c["tpot_s"] *= 1.3 if i % 2 else 0.7
        c["issue_lag_s"] = 0.05 if i % 10 == 0 else 0.0
    write_run(tmp_path / "m", mc, mp, backend="live", extra_columns=("issue_lag_s",), interrupted=True,
              config={"time_scale": 1.0, "max_inflight": 4})
    write_run(tmp_path / "s", *build_calls())
    got = codes(compare(tmp_path / "m", tmp_path / "s"))
    assert {"noisy_measurement", "client_lag", "interrupted", "configs_differ"} <= set(got)


def test_warns_when_simulated_configs_differ(tmp_path):
    mc, mp = build_calls()
    write_run(tmp_path / "m", mc, mp, config={"engine": {"max_num_seqs": 8}})
    write_run(tmp_path / "s", mc, mp, config={"engine": {"max_num_seqs": 64}})
    e = compare(tmp_path / "m", tmp_path / "s")
    assert codes(e) == ["configs_differ"] and "engine.max_num_seqs 8 vs 64" in e["warnings"][0]["message"]


# -- diagnosis -------------------------------------------------------------------------------------

def _finding(e, part):
    return next(f for f in e["findings"] if f["part"] == part)


def test_diagnosis_finds_a_planted_constant_ttft_offset(tmp_path):
    """Measured TTFT = simulated + 50 ms on every call: host overhead, -50 ms, ranked first."""
    m, s = pair_of_runs(tmp_path, meas_kw={"ttft_offset": 0.05})
    e = compare(m, s)
    top = e["findings"][0]
    assert top["part"] == "host overhead"
    assert top["impact_ms"] == pytest.approx(50.0, abs=1e-6)
    assert top["evidence"]["offset_ms"] == pytest.approx(-50.0, abs=1e-6)
    assert top["direction"] == "simulator faster"
    assert _finding(e, "step time (prefill)")["impact_ms"] == pytest.approx(0.0, abs=1e-6)
    assert _finding(e, "orchestration/client")["impact_ms"] == pytest.approx(0.0, abs=1e-6)


def test_diagnosis_separates_prefill_cost_from_overhead(tmp_path):
    """A per-token TTFT error is step time (prefill), with the measured and simulated costs."""
    m, s = pair_of_runs(tmp_path, sim_kw={"d": 4e-5})
    e = compare(m, s)
    f = e["findings"][0]
    assert f["part"] == "step time (prefill)"
    assert f["evidence"]["measured_ms_per_1k_tokens"] == pytest.approx(20.0)
    assert f["evidence"]["simulated_ms_per_1k_tokens"] == pytest.approx(40.0)
    assert _finding(e, "host overhead")["impact_ms"] == pytest.approx(0.0, abs=1e-6)


def test_diagnosis_names_decode_and_cache(tmp_path):
    """Slower simulated decode ranks step time (decode) first; different hits show in cache hits."""
    m, s = pair_of_runs(tmp_path, sim_kw={"tpot_scale": 1.5, "extra_cached": 128})
    e = compare(m, s)
    assert e["findings"][0]["part"] == "step time (decode)"
    assert e["findings"][0]["evidence"]["unloaded_tpot_rel_error"] == pytest.approx(0.5)
    cache = _finding(e, "cache hits")["evidence"]
    assert cache["calls_sim_more"] == 30 and cache["calls_equal_cached"] == 10


def test_diagnosis_attributes_queueing(tmp_path):
    """Calls that waited in the measured run (scheduled_s) put their TTFT error on queueing."""
    mc, mp = build_calls()
    for c in mc[::4]:
        c["scheduled_s"] += 0.5
        for col in ("first_token_s", "finish_s"):
            c[col] += 0.5
        c["ttft_s"] += 0.5
        c["e2e_s"] += 0.5
    write_run(tmp_path / "m", mc, mp)
    write_run(tmp_path / "s", *build_calls())
    e = compare(tmp_path / "m", tmp_path / "s")
    q = e["findings"][0]
    assert q["part"] == "queueing"
    assert q["evidence"]["queued_in_measured"] == 10
    assert q["impact_ms"] == pytest.approx(500.0 * 10 / 40, rel=1e-6)


def test_interval_load_and_theil_sen():
    assert list(interval_load([0.0, 1.0], [2.0, 3.0])) == pytest.approx([1.5, 1.5])
    assert list(interval_load([0.0, 0.0, 5.0], [1.0, 1.0, 6.0])) == pytest.approx([2.0, 2.0, 1.0])
    slope, icpt = theil_sen([1, 2, 3, 4, 100], [3, 5, 7, 9, 0])
    assert (slope, icpt) == pytest.approx((2.0, 1.0))
    assert theil_sen([1, 1, 2], [1, 2, 3]) is None


# -- reports and the CLI --------------------------------------------------------------------------

def test_report_files_are_written_and_self_contained(tmp_path):
    m, s = pair_of_runs(tmp_path, n_programs=3, meas_kw={"ttft_offset": 0.05})
    paths = write_report(tmp_path / "rep", compare(m, s), load_run(m), load_run(s))
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    errors = json.loads(paths["errors"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert errors["calls"]["paired"] == 12
    md = paths["markdown"].read_text()
    assert "too_few_calls" in md and "host overhead" in md and "| TTFT (ms) | p99 |" in md
    html = paths["html"].read_text()
    assert html.count("src='data:image/png;base64,") == 3
    assert "src='http" not in html and 'src="http' not in html
    assert "too_few_calls" in html


def test_cli_compare_writes_report_and_prints_findings(tmp_path, capsys):
    m, s = pair_of_runs(tmp_path, meas_kw={"ttft_offset": 0.05})
    rc = validate_main(["compare", str(m), str(s), "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "1. host overhead" in out and "TTFT (ms)" in out
    assert (tmp_path / "rep" / "report.html").exists()


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        rc = validate_main(["compare", str(bad), str(bad), "--out", str(tmp_path / "rep")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and err.startswith("asim-validate: error:")
    with pytest.raises(ResultsInputError):
        load_run(tmp_path / "empty")


def test_warns_when_cache_hits_betray_another_block_size(tmp_path):
    """Measured hits in multiples of 512 tokens cannot come from the simulated 48-token blocks."""
    mc, mp = build_calls()
    write_run(tmp_path / "m", mc, mp, backend="live", config={"time_scale": 1.0, "max_inflight": 0})
    write_run(tmp_path / "s", mc, mp, deployment={"engine": {"block_size": 48}})
    e = compare(tmp_path / "m", tmp_path / "s")
    assert codes(e) == ["configs_differ"] and "block size 48" in e["warnings"][0]["message"]
    write_run(tmp_path / "s16", mc, mp, deployment={"engine": {"block_size": 16}})
    assert codes(compare(tmp_path / "m", tmp_path / "s16")) == []


def test_repeated_measurements_compare_with_their_median_and_report_spread(tmp_path):
    """Three measurements with TTFT x0.9, x1.0, x1.3: the simulator (x1.0) is compared with the
    median (x1.0: error 0) and the spread is (1.3 - 0.9) / 1.0 = 40%; per-call pairs use the first."""
    runs = [write_run(tmp_path / f"m{i}", *build_calls(ttft_scale=k), backend="live") for i, k in enumerate((0.9, 1.0, 1.3))]
    sim = write_run(tmp_path / "sim", *build_calls())
    e = compare(runs[0], sim, runs[1:])
    assert e["measured"]["repeats"] == 3
    for st in ("mean", "p50", "p90", "p99"):
        row = e["metrics"]["ttft_ms"][st]
        assert row["error"] == pytest.approx(0.0, abs=1e-12)
        assert row["noise"] == pytest.approx(0.4, abs=1e-12)
        assert e["metrics"]["tpot_ms"][st]["noise"] == pytest.approx(0.0, abs=1e-12)
    assert e["paired"]["ttft"]["mean_signed_rel_error"] == pytest.approx(1 / 0.9 - 1, rel=1e-9)
    assert "noisy_measurement" in codes(e) and "within_noise" in codes(e)
    # one measurement: no spread, no noise warnings from repeats
    single = compare(runs[1], sim)
    assert single["metrics"]["ttft_ms"]["mean"].get("noise") is None and "within_noise" not in codes(single)
    # the CLI takes the repeats too, and the report shows the spread column
    out = tmp_path / "rep"
    assert validate_main(["compare", str(runs[0]), str(sim), "--repeat", str(runs[1]), "--repeat", str(runs[2]),
                          "--out", str(out), "--quiet"]) == 0
    md = (out / "report.md").read_text()
    assert "measured 3 times" in md and "| 40.0% |" in md


def test_matrix_summary_shows_the_largest_mean_spread():
    from validation.matrix import HEADLINE, summary_markdown
    errs = {f"{st}_{m}": 0.01 for m, st in HEADLINE}
    noise = {f"{st}_{m}": 0.5 if st != "mean" else 0.0 for m, st in HEADLINE}
    noise["mean_tpot_ms"] = 0.07
    result = {"matrix": "t", "repeats": 3, "seconds": 1.0, "ranking": [],
              "cases": [{"case": "c1", "status": "ok", "calls": 10, "errors": errs, "noise": noise,
                         "sensitivity": {"ttft_ms": 6.25}, "other_cpu": [0.04, 0.61, 0.1]},
                        {"case": "c2", "status": "ok", "calls": 10, "errors": errs, "noise": {}}]}
    lines = summary_markdown(result)
    row1 = next(line for line in lines if line.startswith("| c1 "))
    row2 = next(line for line in lines if line.startswith("| c2 "))
    assert row1.endswith("| 7.0% | 0.61 | 6.2% | ok |") and row2.endswith("| - | - | - | ok |")
    assert any("measured 3 times" in line for line in lines)
    # c1's mean errors (1 %) against its spreads (0, 7, 0, 0 %): one of four within; c2 has none
    floor = next(line for line in lines if line.startswith("The measurement's own noise"))
    assert "TPOT 7.0%" in floor and "TTFT 0.0%" in floor
    assert "1 of 4 mean errors are within" in floor and "0 of 1 cases" in floor


def test_contended_live_runs_are_warned():
    """Other programs' CPU during a live measurement above the calibration's retry limit
    (0.25 cores) gives one contended_measurement warning naming the worst run."""
    from validation.matrix import contention_warnings
    assert contention_warnings([]) == [] and contention_warnings([0.0, 0.25, 0.1]) == []
    (w,) = contention_warnings([0.1, 0.9, 0.3])
    assert w["code"] == "contended_measurement"
    assert "0.90 cores" in w["message"] and "during 2 of 3 measured runs" in w["message"]


def test_profile_engine_flag_mismatch_is_warned(tmp_path):
    import yaml as _yaml
    from validation.matrix import profile_mismatch
    prof = _yaml.safe_load(open("hardware/profiles/cpu-tiny-llama.yaml"))
    prof["provenance"]["engine_args"] = ["--dtype", "bfloat16", "--block-size", "128"]
    path = tmp_path / "p.yaml"
    path.write_text(_yaml.safe_dump(prof))
    assert profile_mismatch(str(path), ["--dtype=bfloat16", "--block-size", "128", "--max-num-seqs", "4"]) == []
    (w,) = profile_mismatch(str(path), ["--dtype", "bfloat16", "--block-size", "128", "--enforce-eager"])
    assert w["code"] == "engine_mode_mismatch" and "--enforce-eager unset in the profile, on here" in w["message"]
    (w,) = profile_mismatch(str(path), ["--dtype", "float32", "--block-size", "128"])
    assert "--dtype bfloat16 in the profile, float32 here" in w["message"]
    assert profile_mismatch(None, ["--enforce-eager"]) == []


# -- engine steps --------------------------------------------------------------------------------

def _steps(decodes, prefills):
    """decodes: [(batch, period_ms, count)], prefills: [(tokens, period_ms, count)] back to back."""
    rows, t = [], 0.0
    for batch, period, n in decodes:
        for _ in range(n):
            t += period / 1000
            rows.append({"t_s": t, "instance": 0, "num_prefill_reqs": 0, "num_prefill_tokens": 0,
                         "num_decode_reqs": batch, "period_ms": period, "elapsed_ms": period - 1})
    for tokens, period, n in prefills:
        for _ in range(n):
            t += period / 1000
            rows.append({"t_s": t, "instance": 0, "num_prefill_reqs": 1, "num_prefill_tokens": tokens,
                         "num_decode_reqs": 0, "period_ms": period, "elapsed_ms": period - 1})
    return rows


def test_step_comparison_weights_decode_periods_by_the_measured_batches():
    import pandas as pd
    from validation.steps import compare_steps, steps_finding
    meas = pd.DataFrame(_steps([(4, 5.0, 30), (8, 6.0, 10)], [(500, 50.0, 12)]))
    # every step 10% slower; but the simulator formed more batch-8 steps: the unweighted mean
    # period would say +17%, the same-batch comparison says +10%
    sim = pd.DataFrame(_steps([(4, 5.5, 10), (8, 6.6, 30)], [(500, 45.0, 12)]))
    c = compare_steps(meas, sim)
    assert c["errors"]["decode_period_same_batch"] == pytest.approx(0.10)
    assert c["errors"]["prefill_per_token"] == pytest.approx(-0.10)
    assert c["measured"]["prefill_ms_per_1k_tokens"] == pytest.approx(100.0)
    assert c["errors"]["steps"] == pytest.approx(0.0)
    assert [r["batch_up_to"] for r in c["decode_by_batch"]] == [4, 8]
    assert "+10.0%" in steps_finding(c) and "-10.0%" in steps_finding(c)


def test_live_steps_come_from_the_iteration_log_of_the_run_window():
    from replay.live import server_steps
    from replay.vllm_server import IterationRecord

    def rec(t, ctx, gen, ms, dummy=False):
        return IterationRecord(t_s=t, timestamp=str(t), engine=0, iteration=0, num_context_reqs=1 if ctx else 0,
                               num_context_tokens=ctx, num_generation_reqs=gen, num_generation_tokens=gen,
                               elapsed_ms=ms, kv_usage=0.0, kv_device="CPU", is_dummy=dummy)
    t0 = 1000.0
    recs = [rec(999.0, 10, 0, 5.0),                   # before the run: left out
            rec(1000.10, 300, 0, 30.0),               # after idle: no period
            rec(1000.1055, 0, 1, 4.0),                # straight on: period 5.5 ms
            rec(1000.108, 0, 1, 4.0, dummy=True),     # a DP dummy step: left out
            rec(1000.110, 0, 1, 4.0),                 # period 4.5 ms
            rec(1000.150, 0, 1, 4.0),                 # began 36 ms after the last one ended: no period
            rec(1000.5, 0, 1, 4.0),                   # after a gap: no period
            rec(1010.0, 0, 1, 4.0)]                   # after the run: left out
    rows = server_steps(recs, t0, wall_s=2.0)
    assert [round(r["t_s"], 4) for r in rows] == [0.1, 0.1055, 0.11, 0.15, 0.5]
    assert [r["period_ms"] if r["period_ms"] is None else round(r["period_ms"], 3) for r in rows] == \
        [None, 5.5, 4.5, None, None]
    assert rows[0]["num_prefill_tokens"] == 300 and rows[1]["num_decode_reqs"] == 1


def test_compare_reports_engine_steps_when_both_runs_have_them(tmp_path):
    from replay.results import write_steps
    m, s = pair_of_runs(tmp_path)
    write_steps(m, _steps([(2, 4.0, 20)], [(800, 60.0, 15)]))
    e = compare(m, s)
    assert e["steps"] is None  # only one side has steps
    write_steps(s, _steps([(2, 4.4, 20)], [(800, 60.0, 15)]))
    e = compare(m, s)
    assert e["steps"]["errors"]["decode_period_same_batch"] == pytest.approx(0.10)
    out = tmp_path / "rep"
    write_report(out, e, load_run(m), load_run(s))
    assert "## Engine steps" in (out / "report.md").read_text()
    assert "Engine steps" in (out / "report.html").read_text()


def test_step_time_sensitivity_is_about_one_for_an_unloaded_trace_and_more_near_saturation():
    """Calls far apart: every latency scales with the step time (elasticity 1). Near saturation
    waiting adds up: TTFT moves several times as much as the step time."""
    from replay.trace import load_trace
    from validation.matrix import scale_arrivals, step_time_sensitivity
    progs = load_trace("sample_traces/cpu_single.jsonl")
    over = {"engine.block_size": 128, "engine.max_num_seqs": 8, "engine.max_num_batched_tokens": 2048,
            "engine.num_gpu_blocks_override": 2048, "latency.frontend_s": 0.0}
    spread = [p.__class__(**{**{f: getattr(p, f) for f in p.__dataclass_fields__}, "arrival_s": 100.0 * i})
              for i, p in enumerate(progs)]
    idle = step_time_sensitivity(spread, "hardware/profiles/cpu-tiny-llama.yaml", "tiny-llama", over)
    for k in ("ttft_ms", "tpot_ms", "e2e_ms", "jct_s"):
        assert idle[k] == pytest.approx(1.0, abs=1e-6)
    # arrivals compressed to near saturation (the cpu-small 'heavy' load): queueing amplifies
    busy = step_time_sensitivity(scale_arrivals(progs, 0.25), "hardware/profiles/cpu-tiny-llama.yaml", "tiny-llama",
                                 over)
    assert busy["ttft_ms"] > 2.0 and busy["ttft_ms"] > 2 * busy["tpot_ms"]


def test_as_issued_replays_the_live_clients_send_times():
    """The first call moves to its measured send time; in a chain a later call's issue lag is
    added to the gap before it; DAG programs keep their gaps."""
    import pandas as pd
    from simkit import call, program
    from validation.matrix import as_issued
    chain = program("c", 1.0, [call(10, 2, tool_s=0.5), call(10, 2, tool_s=0.25), call(10, 2)])
    dag = program("d", 2.0, [call(10, 2, tool_s=0.5), call(10, 2, after=[0]), call(10, 2, after=[0])])
    untouched = program("u", 3.0, [call(10, 2)])
    calls = pd.DataFrame([
        {"program_id": "c", "call_index": 0, "arrival_s": 1.004, "issue_lag_s": 0.004},
        {"program_id": "c", "call_index": 1, "arrival_s": 2.0, "issue_lag_s": 0.010},
        {"program_id": "c", "call_index": 2, "arrival_s": 3.0, "issue_lag_s": 0.0},
        {"program_id": "d", "call_index": 0, "arrival_s": 2.02, "issue_lag_s": 0.02},
        {"program_id": "d", "call_index": 1, "arrival_s": 3.0, "issue_lag_s": 0.03}])
    late = program("l", 1.001, [call(10, 2)])  # planned after "c", sent before it
    calls = pd.concat([calls, pd.DataFrame([{"program_id": "l", "call_index": 0, "arrival_s": 1.002,
                                             "issue_lag_s": 0.001}])])
    out = as_issued([chain, late, dag, untouched], calls)
    assert [p.program_id for p in out] == ["l", "c", "d", "u"]  # the simulator takes them by arrival
    _, c, d, u = out
    assert c.arrival_s == 1.004 and [x.tool_s for x in c.calls] == [pytest.approx(0.51), 0.25, None]
    assert d.arrival_s == 2.02 and [x.tool_s for x in d.calls] == [0.5, None, None]
    assert u is untouched


def test_measured_step_scale_weights_kinds_by_simulated_time():
    import pandas as pd
    from validation.steps import measured_step_scale
    # measured decode steps 10 % slower at the same batch, prefill 25 % slower per token
    meas = pd.DataFrame(_steps([(4, 5.5, 40)], [(500, 62.5, 10)]))
    sim = pd.DataFrame(_steps([(4, 5.0, 40)], [(500, 50.0, 10)]))
    # simulated time: decode 200 ms, prefill 500 ms -> (200 * 1.1 + 500 * 1.25) / 700
    assert measured_step_scale(meas, sim) == pytest.approx((200 * 1.1 + 500 * 1.25) / 700)
    from validation.matrix import summary_markdown
    row = {"case": "c", "status": "ok", "calls": 1, "errors": {}, "noise": {},
           "at_measured_step_speed": {"step_time_scale": 1.2, "errors": {"mean_ttft_ms": -0.01, "mean_tpot_ms": 0.02,
                                                                          "mean_e2e_ms": None, "mean_jct_s": 0.0}}}
    lines = summary_markdown({"matrix": "t", "seconds": 1, "cases": [row], "ranking": []})
    assert "| c | x1.200 | -1.0% | +2.0% | - | +0.0% |" in lines


def test_a_run_without_cached_token_counts_gets_no_cache_finding(tmp_path):
    """An imported run whose calls.csv leaves cached_tokens blank: no prefix-cache hit rate
    for it and no 'cache hits' finding (it used to report 0 % hits and '+nan tokens' as the
    largest finding); the reason is listed as not assessed."""
    m = write_run(tmp_path / "meas", *build_calls(), backend="vllm")
    rows = list(csv.DictReader(open(m / "calls.csv")))
    for r in rows:
        r["cached_tokens"] = ""
    with open(m / "calls.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    s = write_run(tmp_path / "sim", *build_calls())
    e = compare(m, s)
    hit = e["metrics"]["prefix_cache_hit_rate"]["value"]
    assert hit["measured"] is None and hit["error"] is None and hit["simulated"] > 0
    assert all(f["part"] != "cache hits" for f in e["findings"])
    assert any(w.startswith("cache hits: a run does not record") for w in e["not_assessed"])


def _llmss_run(path, kv_pcts):
    """A two-request LLMServingSim run directory (requests.jsonl, meta.json, timeseries.csv)."""
    path.mkdir(parents=True)
    reqs = [{"request_id": f"r-{i}", "input_toks": 100, "output_toks": 5, "queued_ts": 10.0 + i,
             "scheduled_ts": 10.0 + i, "first_token_ts": 10.1 + i, "last_token_ts": 10.3 + i} for i in range(2)]
    (path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    (path / "meta.json").write_text(json.dumps({"model": "m", "engine_kwargs": {"max_num_seqs": 8}}))
    rows = "".join(f"{t + 1}.0,1,0,{p}\n" for t, p in enumerate(kv_pcts))
    (path / "timeseries.csv").write_text("t,running,waiting,kv_cache_pct\n" + rows)
    return path


def test_llmservingsim_kv_usage_logged_as_all_zero_is_not_recorded(tmp_path):
    """A recorded run whose KV usage is 0 at every sample while requests run (the older RTX
    4090 run) imports its KV usage blank; a run that logged it keeps it."""
    from validation.importers.llmservingsim import import_llmservingsim_run

    import_llmservingsim_run(_llmss_run(tmp_path / "zero", [0.0, 0.0]), tmp_path / "zero_out")
    import_llmservingsim_run(_llmss_run(tmp_path / "logged", [0.0, 12.5]), tmp_path / "logged_out")
    zero = list(csv.DictReader(open(tmp_path / "zero_out" / "timeseries.csv")))
    logged = list(csv.DictReader(open(tmp_path / "logged_out" / "timeseries.csv")))
    assert [r["kv_usage"] for r in zero] == ["", ""]
    assert [float(r["kv_usage"]) for r in logged] == [0.0, 0.125]
