"""calibrate/: fitting, model choice by CV, the profile format, log attribution. No vLLM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from calibrate import cli
from calibrate.attribution import MirrorLimits, StepRow, attribute
from calibrate.experiments import (
    FULL_GRID,
    QUICK_GRID,
    DECODE,
    PREFILL,
    EngineLimits,
    Experiment,
    RequestSpec,
    design,
    prompt_tokens,
)
from calibrate.fit import (
    CVResult,
    Family,
    busy_windows,
    choose,
    feature_value,
    fit_steps,
    score,
)
from calibrate.operators import classify, steps_from_trace
from calibrate.profile import build_profile, dump_profile, facts_from_args, merge_engine_facts
from calibrate.records import read_steps, write_json, write_steps
from calibrate.runner import ExperimentRun, RequestResult
from replay.vllm_server import EngineInfo, parse_iteration_line
from simulator.config import build_config
from simulator.deployment import build_deployment
from simulator.hardware import load_device, load_model
from simulator.latency.base import step_features
from simulator.latency.linear import LinearStepModel

# A made-up step-time law (seconds), close in size to what a 2-core CPU shows for a tiny model.
TRUE_EXEC = {"intercept": 3e-3, "prefill_tokens": 6e-5, "prefill_attn": 4e-8, "num_decodes": 4e-4,
             "decode_ctx_sum": 2e-7}
TRUE_HOST = {"const": 1.2e-3, "num_seqs": 2e-4}


def _exec_time(f) -> float:
    t = TRUE_EXEC["intercept"]
    t += TRUE_EXEC["prefill_tokens"] * f.prefill_tokens + TRUE_EXEC["prefill_attn"] * f.prefill_attn
    t += TRUE_EXEC["num_decodes"] * f.num_decodes + TRUE_EXEC["decode_ctx_sum"] * f.decode_ctx_sum
    return t


def _row(exp, kind, it, t, elapsed_s, f, busy) -> StepRow:
    return StepRow(experiment=exp, kind=kind, iteration=it, t_s=t, elapsed_ms=elapsed_s * 1000.0,
                   num_context_reqs=f.num_prefills, num_context_tokens=f.prefill_tokens,
                   num_generation_reqs=f.num_decodes, num_generation_tokens=f.num_decodes, kv_usage=0.0,
                   arrivals=0, busy=busy, chunks="", prefill_tokens=f.prefill_tokens, prefill_attn=f.prefill_attn,
                   prefill_kv=f.prefill_kv, num_prefills=f.num_prefills, num_decodes=f.num_decodes,
                   decode_ctx_sum=f.decode_ctx_sum, num_sampled=f.num_sampled, num_seqs=f.num_seqs)


def synthetic_rows(noise: float = 0.03, seed: int = 1, exec_time=_exec_time, stamp_jitter_s: float = 0.0):
    """Steps of a prefill grid (isolated) and decode/mixed runs (back-to-back), with
    multiplicative noise on execute times and log stamps = Σ (execute + host) + jitter."""
    rng = np.random.default_rng(seed)
    rows, it, t = [], 0, 1000.0
    for n in (16, 64, 256, 700, 1024, 2048):
        for c in (0, 512, 1536, 2560):
            f = step_features([(n, c)], 0, 0, 1)
            it += 1
            t += 1.0
            rows.append(_row(f"prefill/n{n}-c{c}", "prefill", it, t, exec_time(f) * (1 + noise * rng.standard_normal()), f, False))
    for b in (1, 2, 4, 8):
        for L in (100, 800, 2000, 3000):
            exp, busy = f"decode/b{b}-l{L}", False
            true_t = t + 1.0
            for j in range(40):
                if j % 10 == 5 and b < 8:
                    chunks = [(min(300 + 20 * j, 2048 - b), 0)]
                else:
                    chunks = []
                f = step_features(chunks, b, b * (L + j + 1), b + len(chunks))
                e = exec_time(f) * (1 + noise * rng.standard_normal())
                true_t += e + TRUE_HOST["const"] + TRUE_HOST["num_seqs"] * f.num_seqs
                it += 1
                kind = "mixed" if chunks else "decode"
                stamp = true_t + stamp_jitter_s * rng.random()
                rows.append(_row(exp, kind, it, stamp, e, f, busy))
                busy = True
            t = true_t
    return rows


def test_fit_recovers_known_coefficients():
    """NNLS on relative error recovers the law behind noisy synthetic steps."""
    fit = fit_steps(synthetic_rows(noise=0.02), folds=5)
    coef = dict(zip(fit.execute.family.features, fit.execute_coef[1:]))
    assert fit.execute_coef[0] == pytest.approx(TRUE_EXEC["intercept"], rel=0.15)
    for name in ("prefill_tokens", "prefill_attn", "decode_ctx_sum"):
        assert coef.get(name, 0.0) == pytest.approx(TRUE_EXEC[name], rel=0.15), name
    # per decode, num_decodes, num_seqs and num_sampled are one cost (collinear in decode steps)
    per_decode = sum(coef.get(k, 0.0) for k in ("num_decodes", "num_seqs", "num_sampled"))
    assert per_decode == pytest.approx(TRUE_EXEC["num_decodes"], rel=0.15)
    assert fit.execute.mape < 0.04
    assert fit.execute.p90_ape < 0.08


def test_host_overhead_recovered_from_windows_despite_bursty_stamps():
    """Period - execute over windows gives the host constant and per-request term."""
    fit = fit_steps(synthetic_rows(noise=0.02, stamp_jitter_s=0.004), folds=5)
    host = dict(zip(fit.host.family.features, fit.host_coef[1:]))
    mean_seqs = 4  # the decode batches span 1..8
    per_step = host["num_steps"] + host.get("num_seqs", 0.0) * mean_seqs
    assert per_step == pytest.approx(TRUE_HOST["const"] + TRUE_HOST["num_seqs"] * mean_seqs, rel=0.15)
    assert fit.step_period["cv_mape"] < 0.05
    # the simulator's single model = execute + host
    assert fit.intercept == pytest.approx(fit.execute_coef[0] + host["num_steps"])


def test_model_family_is_chosen_by_cv_error():
    """When attention work matters, families without prefill_attn lose on CV error."""
    fit = fit_steps(synthetic_rows(noise=0.01), folds=5)
    by_name = {c.family.name: c for c in fit.candidates}
    assert by_name["nnls-rel/minimal"].mape > 2 * fit.execute.mape
    assert "prefill_attn" in fit.execute.family.features
    assert score(fit.execute) == pytest.approx(min(score(c) for c in fit.candidates if not c.negative), abs=1e-6)


def test_choose_skips_families_with_negative_coefficients():
    """A lower CV error does not win if it needs an unphysical negative cost."""
    neg = CVResult(Family("ols-rel/all", ("num_decodes",), "ols", True), 0.01, 0.02, np.zeros(1), True)
    pos = CVResult(Family("nnls-rel/core", ("num_decodes",), "nnls", True), 0.03, 0.05, np.zeros(1), False)
    assert choose([neg, pos]) is pos


def test_busy_windows_span_exactly_the_back_to_back_steps():
    """A window's period is the stamp difference from the step before it to its last step."""
    rows = synthetic_rows()
    wins = busy_windows([r for r in rows if r.experiment == "decode/b2-l100"], size=16)
    assert [len(w.rows) for w in wins] == [16, 16, 7]
    by_it = {r.iteration: r for r in rows}
    w = wins[1]
    assert w.period_s == pytest.approx(w.rows[-1].t_s - by_it[w.rows[0].iteration - 1].t_s)


def test_fit_needs_data():
    """Too few steps is a user error, not a crash."""
    with pytest.raises(ValueError, match="usable steps"):
        fit_steps(synthetic_rows()[:5])


# -- profile format ------------------------------------------------------------------------------


def _meta() -> dict:
    return {
        "engine": {"vllm_version": "0.32.0", "torch_version": "2.13.0+cpu", "block_size": 128,
                   "num_gpu_blocks": 777, "max_num_seqs": 8, "max_num_batched_tokens": 2048,
                   "max_model_len": 4096, "enable_prefix_caching": True, "enable_chunked_prefill": True,
                   "dtype": "bfloat16", "kv_cache_space_gib": 1.0},
        "device": {"name": "cpu-test-2c", "kind": "cpu", "description": "Test CPU, 2 logical cores", "cores": 2},
        "model": {"name": "tiny-llama", "config": "hardware/models/tiny-llama/config.json"},
        "provenance": {"command": "asim-calibrate run --model hardware/models/tiny-llama --out x.yaml",
                       "date": "2020-01-01T00:00:00+00:00", "host": "test"},
        "attribution": {"steps_attributed": 1},
    }


def test_profile_round_trips_and_drives_a_deployment(tmp_path):
    """The YAML loads through load_device and build_deployment with the engine's real limits."""
    fit = fit_steps(synthetic_rows(), folds=5)
    prof = build_profile("cpu-test", _meta(), fit, raw_data="hardware/profiles/data/cpu-test")
    path = tmp_path / "cpu-test.yaml"
    dump_profile(prof, path)
    assert yaml.safe_load(path.read_text()) == prof
    device, raw = load_device(path)
    assert device.kind == "cpu" and device.name == "cpu-test-2c"
    dep = build_deployment(load_model("tiny-llama"), device, build_config({}, {}), raw)
    assert dep.engine.num_gpu_blocks == 777
    assert dep.engine.max_num_seqs == 8 and dep.engine.max_num_batched_tokens == 2048
    assert dep.engine.block_size == 128 and dep.engine.max_model_len == 4096
    assert dep.engine.num_gpu_blocks_source.startswith("profile")
    f = step_features([(300, 256)], 3, 3 * 900, 4)
    expect = fit.intercept + sum(fit.coefficients.get(k, 0.0) * feature_value(f, k) for k in fit.coefficients)
    assert dep.latency.time_of(f) == pytest.approx(expect)
    fd = prof["latency_model"]["fit"]
    for key in ("family", "features", "cv_mape", "cv_p90_ape", "folds", "n_samples", "parts"):
        assert key in fd
    assert {"execute", "host", "step_period", "operators"} <= set(fd["parts"])
    assert np.isfinite(fd["parts"]["host"]["cv_mape"])


def test_records_csv_round_trip(tmp_path):
    rows = synthetic_rows()[:50]
    write_steps(tmp_path / "steps.csv", rows)
    assert read_steps(tmp_path / "steps.csv") == rows


def test_cli_fit_writes_a_profile_and_user_errors_are_one_line(tmp_path, capsys):
    """`fit DIR` makes the profile; a missing directory or `import` exits 2 with one line."""
    data = tmp_path / "run"
    data.mkdir()
    write_steps(data / "steps.csv", synthetic_rows())
    write_json(data / "engine.json", _meta())
    out = tmp_path / "p.yaml"
    assert cli.main(["fit", str(data), "--out", str(out)]) == 0
    prof = yaml.safe_load(out.read_text())
    assert prof["name"] == "p" and prof["latency_model"]["kind"] == "linear"
    assert prof["provenance"]["fit_command"].startswith("asim-calibrate fit")
    capsys.readouterr()
    assert cli.main(["fit", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asim-calibrate: error:") and "\n" not in err
    assert cli.main(["import"]) == 2
    assert cli.main(["run", "--model", str(tmp_path), "--out", str(out)]) == 2


def test_engine_facts_from_args_and_sources_agree():
    args = ["--dtype", "bfloat16", "--block-size=128", "--max-num-seqs", "8", "--no-enable-prefix-caching"]
    facts = facts_from_args(args)
    assert facts == {"dtype": "bfloat16", "block_size": 128, "max_num_seqs": 8, "enable_prefix_caching": False}
    merged = merge_engine_facts({"max_num_seqs": 16, "num_gpu_blocks": 10}, EngineInfo("0.32.0", 10, 128, 1280), facts)
    assert merged["max_num_seqs"] == 16 and merged["vllm_version"] == "0.32.0"
    with pytest.raises(ValueError, match="disagree"):
        merge_engine_facts({"num_gpu_blocks": 11}, EngineInfo("0.32.0", 10, 128, 1280), facts)


# -- experiments ---------------------------------------------------------------------------------

LIMITS = EngineLimits(block_size=128, max_model_len=4096, max_num_batched_tokens=2048, max_num_seqs=8,
                      vocab_size=32000)


@pytest.mark.parametrize("grid", [FULL_GRID, QUICK_GRID])
def test_design_respects_the_engine_limits(grid):
    """Every request fits max_model_len, batches fit max_num_seqs, cached prefixes are whole blocks."""
    exps = design(LIMITS, grid)
    names = [e.name for e in exps]
    assert len(names) == len(set(names))
    for e in exps:
        for phase in e.phases:
            assert len(phase) <= LIMITS.max_num_seqs
        for r in e.requests():
            assert r.prompt_len + r.max_tokens <= LIMITS.max_model_len
            assert r.prefix_len % LIMITS.block_size == 0
    kinds = {e.kind for e in exps}
    assert {"prefill", "decode", "mixed", "warmup"} <= kinds


def test_prompts_share_exactly_the_prefix():
    a = RequestSpec("a", 300, 1, prefix_id="p", prefix_len=256)
    b = RequestSpec("b", 400, 1, prefix_id="p", prefix_len=256)
    ta, tb = prompt_tokens(a, 32000, 0), prompt_tokens(b, 32000, 0)
    assert ta[:256] == tb[:256] and ta[256:300] != tb[256:300]
    assert len(ta) == 300 and min(ta) >= 3 and max(ta) < 32000
    assert prompt_tokens(a, 32000, 0) == ta


# -- attribution ---------------------------------------------------------------------------------

_LINE = ("(APIServer pid=1) INFO {t:.6f} [loggers.py:199] Engine 000: Iteration({it}): {cr} context requests, "
         "{ct} context tokens, {gr} generation requests, {gt} generation tokens, iteration elapsed time: "
         "{ms:.2f} ms, CPU KV cache usage: 0.3%")


def _log(rows):
    """Hand-made iteration-log lines, parsed by the same parser as a real log."""
    return [parse_iteration_line(_LINE.format(t=t, it=it, cr=cr, ct=ct, gr=gr, gt=gr, ms=ms))
            for it, (t, cr, ct, gr, ms) in enumerate(rows)]


MIRROR = MirrorLimits(num_gpu_blocks=200, block_size=128, max_num_seqs=8, max_num_batched_tokens=2048,
                      max_model_len=4096)


def _prefill_and_decode():
    warm = RequestSpec("p/warm", 513, 1, prefix_id="p", prefix_len=512)
    meas = RequestSpec("p/req", 812, 1, prefix_id="p", prefix_len=512)
    pre = Experiment("p", PREFILL, ((warm,), (meas,)))
    dec = Experiment("d", DECODE, (tuple(RequestSpec(f"d/{i}", 1000, 3) for i in range(3)),))
    runs = [ExperimentRun("p", PREFILL, {}, 10.0, 10.9, [RequestResult("p/warm", 513, 0, 1),
                                                         RequestResult("p/req", 812, 512, 1)]),
            ExperimentRun("d", DECODE, {}, 11.0, 12.0)]
    return [pre, dec], runs


def test_attribution_rebuilds_chunks_contexts_and_arrivals():
    """Prefix hit gives the chunk's context; staggered arrivals are inferred from the counts."""
    exps, runs = _prefill_and_decode()
    lines = _log([
        (9.0, 1, 50, 0, 5.0),        # before the first experiment (someone else's request)
        (10.10, 1, 513, 0, 30.0),    # warm request: 513 new tokens
        (10.50, 1, 300, 0, 20.0),    # measured: 300 new over 512 cached
        (11.05, 2, 2000, 0, 90.0),   # two decoders arrived together: 1000 + 1000
        (11.15, 1, 1000, 2, 50.0),   # the third one joins; the first two decode
        (11.17, 0, 0, 3, 7.0),       # all three decode; the first two finish (3 tokens)
        (11.19, 0, 0, 1, 5.0),       # the third one's last token
    ])
    res = attribute(lines, runs, {e.name: e.requests() for e in exps}, MIRROR)
    assert res.mismatches == []
    assert res.discarded == {"before the first experiment": 1}
    assert res.cached_checked == 2
    s = res.steps
    assert [r.chunks for r in s] == ["513@0", "300@512", "1000@0;1000@0", "1000@0", "", ""]
    assert [r.arrivals for r in s] == [1, 1, 2, 1, 0, 0]
    assert [r.busy for r in s] == [False, False, False, True, True, True]
    assert s[4].num_decodes == 3 and s[4].decode_ctx_sum == 2 * 1002 + 1001
    assert s[3].kind == "mixed" and s[3].decode_ctx_sum == 2 * 1001
    assert s[1].prefill_attn == pytest.approx(300 * (512 + 301 / 2))


def test_attribution_reports_a_mirror_mismatch_and_drops_the_rest():
    """A step the mirror cannot produce is a finding; that experiment's later lines are discarded."""
    exps, runs = _prefill_and_decode()
    lines = _log([
        (10.10, 1, 513, 0, 30.0),
        (10.50, 1, 812, 0, 20.0),    # the server did not hit the cached prefix: not what the mirror does
        (11.05, 3, 2048, 0, 90.0),   # chunked at the budget: 1000 + 1000 + 48
        (11.15, 1, 952, 2, 50.0),
        (11.17, 0, 0, 3, 7.0),
        (11.19, 0, 0, 1, 5.0),
    ])
    res = attribute(lines, runs, {e.name: e.requests() for e in exps}, MIRROR)
    assert len(res.mismatches) >= 1 and res.mismatches[0].experiment == "p"
    assert res.discarded["after a mirror mismatch"] == 1
    assert [r.experiment for r in res.steps] == ["p", "d", "d", "d", "d"]
    assert res.steps[1].chunks == "1000@0;1000@0;48@0"
    assert res.steps[2].chunks == "952@48"


# -- operators -----------------------------------------------------------------------------------


def test_operator_families_from_a_trace():
    """Outermost classified events inside each execute annotation, summed per family."""
    ann = "execute_300_context_1(sq300sk812sqsq90000sqsk243600)_generation_0(sq0sk0sqsq0sqsk0)"
    ev = lambda name, ts, dur, cat="cpu_op": {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1, "cat": cat}
    trace = {"traceEvents": [
        ev(ann, 0, 1000, "user_annotation"),
        ev("Torch-Compiled Region: 0/0", 10, 900),
        ev("## Call CompiledFxGraph None ##", 15, 800),  # its own time: inductor's fused kernels
        ev("aten::mm", 20, 300), ev("mkldnn_matmul_inner", 25, 200),  # nested: counted once
        ev("_C::cpu_attention_with_kv_cache", 400, 200),
        ev("cpp_fused_add_mul_0", 650, 100),
        ev("aten::mm", 1500, 100),  # after the annotation
    ]}
    (row,) = steps_from_trace(trace)
    assert row["gemm_ms"] == pytest.approx(0.3)
    assert row["attention_ms"] == pytest.approx(0.2)
    assert row["fused_elementwise_ms"] == pytest.approx(0.1 + (0.8 - 0.3 - 0.2 - 0.1))
    assert row["unattributed_ms"] == pytest.approx(0.2)
    assert row["prefill_tokens"] == 300 and row["prefill_kv"] == 812
    assert row["prefill_attn"] == pytest.approx(300 * (512 + 301 / 2))
    assert classify("aten::empty") is None and classify("aten::add") == "other_ops"


def test_step_rows_json_serialisable():
    rows = synthetic_rows()[:3]
    json.dumps([r.__dict__ for r in rows])


# -- contention ----------------------------------------------------------------------------------


def test_fit_uses_the_least_contended_attempt_and_drops_contended_steps():
    """Of an experiment and its re-runs the quietest attempt is fitted; what stays over the
    threshold is left out (and counted), unless that would be most of the data."""
    from dataclasses import replace

    from calibrate.fit import least_contended_attempts

    rows = synthetic_rows(noise=0.0)
    slow = [replace(r, experiment=r.experiment + "~retry1", elapsed_ms=r.elapsed_ms * 3, other_cpu=1.0)
            for r in rows if r.experiment == "decode/b8-l3000"]
    quiet_again = [replace(r, other_cpu=0.0) for r in rows]
    mixed = [replace(r, other_cpu=1.0) if r.experiment == "decode/b8-l3000" else r for r in quiet_again]
    assert "decode/b8-l3000~retry1" not in least_contended_attempts(mixed + slow)
    fit = fit_steps(mixed + slow)
    assert fit.excluded["other attempts of a re-run experiment"] == len(slow)
    assert fit.excluded["contended"] == sum(1 for r in mixed if r.other_cpu > 0.25)
    assert fit.execute.mape < 0.01  # the slow attempt did not get in
    busy = [replace(r, other_cpu=1.0) for r in rows]
    assert fit_steps(busy).excluded["contention_filter_off"] is True


def test_contention_snapshot_counts_other_programs():
    """Our own CPU time is ours; a child process's busy loop shows up as other programs'."""
    import os
    import resource
    import subprocess
    import sys
    import time

    from calibrate import contention

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc")
    a = contention.snapshot(None)
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    b = contention.snapshot(None)
    assert b.ours_s - a.ours_s >= 0.25
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    a = contention.snapshot(None)
    subprocess.run([sys.executable, "-c", "import time\nt=time.process_time()\nwhile time.process_time()-t<0.5: pass"])
    b = contention.snapshot(None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert child >= 0.45
    assert b.others_since(a) >= 0.8 * child


def test_operator_rows_are_labelled_by_time_and_contended_attempts_dropped():
    """Profiled steps take the experiment they ran in; a re-run's quieter attempt is fitted."""
    from calibrate.operators import _quietest, label_rows
    from calibrate.fit import least_contended_attempts

    runs = [ExperimentRun("a", DECODE, {}, 10.0, 11.0, other_cpu=0.9),
            ExperimentRun("a~retry1", DECODE, {}, 11.5, 12.0, other_cpu=0.0),
            ExperimentRun("b", PREFILL, {}, 12.5, 13.0, other_cpu=0.1)]
    rows = label_rows([{"t_s": t, "x": 1.0} for t in (10.5, 11.7, 12.7, 20.0)], runs)
    assert [r["experiment"] for r in rows] == ["a", "a~retry1", "b", ""]
    kept = _quietest(rows, 0.25, least_contended_attempts)
    assert [r["t_s"] for r in kept] == [11.7, 12.7]


def test_requests_sent_together_may_arrive_in_any_order():
    """Two different requests sent at once: the engine saw the second first; no mismatch."""
    a, b = RequestSpec("w/0", 64, 2), RequestSpec("w/1", 96, 2)
    exp = Experiment("w", "warmup", ((a, b),))
    run = ExperimentRun("w", "warmup", {}, 10.0, 11.0)
    lines = _log([(10.1, 1, 96, 0, 5.0), (10.2, 1, 64, 1, 5.0), (10.3, 0, 0, 1, 3.0)])
    res = attribute(lines, [run], {"w": exp.requests()}, MIRROR)
    assert res.mismatches == []
    assert [r.chunks for r in res.steps] == ["96@0", "64@0", ""]
    assert [r.arrivals for r in res.steps] == [1, 1, 0]


# -- the frontend probe ------------------------------------------------------------------------

def _probe_record(t_s: float, tokens: int, elapsed_ms: float, gen: int = 0):
    from replay.vllm_server import IterationRecord
    return IterationRecord(t_s=t_s, timestamp=f"{t_s:.6f}", engine=0, iteration=0, num_context_reqs=1 if tokens else 0,
                           num_context_tokens=tokens, num_generation_reqs=gen, num_generation_tokens=gen,
                           elapsed_ms=elapsed_ms, kv_usage=0.0, kv_device="CPU")


def test_probe_programs_are_single_calls_that_fit_one_step():
    from calibrate.frontend import PROBE_GAPS_S, PROBE_PROMPTS, PROBE_REPEATS, probe_programs
    progs = probe_programs(max_step_tokens=200)
    assert len(progs) == len(PROBE_PROMPTS) * len(PROBE_GAPS_S) * PROBE_REPEATS
    assert all(len(p.calls) == 1 and 1 <= p.calls[0].new_tokens <= 200 for p in progs)
    arrivals = [p.arrival_s for p in progs]
    assert arrivals == sorted(arrivals) and len(set(p.program_id for p in progs)) == len(progs)
    # the planned idle gaps of every size are there
    gaps = np.round(np.diff(arrivals), 3)
    assert set(np.round(np.asarray(PROBE_GAPS_S) + 0.25, 3)) == set(gaps)


def test_frontend_live_splits_the_way_in_from_the_way_out():
    """Three calls with a known way in (6 ms) and out (1 ms) around a known step model."""
    import pandas as pd
    from calibrate.frontend import estimate_frontend_live
    intercept, coef = 0.002, {"prefill_tokens": 1e-5}
    t0 = 1_000_000.0
    rows, records = [], [_probe_record(t0 + 0.5, 0, 2.0, gen=3)]  # a decode step: never matched
    for i, (arrive, n) in enumerate([(1.0, 100), (2.0, 400), (3.0, 1000)]):
        period = intercept + 1e-5 * n
        start = arrive + 0.006
        seen = start + period            # the API server logs the step when its output arrives
        first = seen + 0.001
        records.append(_probe_record(t0 + seen, n, 1000 * (period - 0.001)))
        rows.append({"program_id": f"p{i}", "call_index": 0, "arrival_s": arrive, "first_token_s": first,
                     "ttft_s": first - arrive, "input_tokens": n, "cached_tokens": 0, "status": "ok"})
    # a call whose step is not in the log is counted, not guessed
    rows.append({"program_id": "lost", "call_index": 0, "arrival_s": 4.0, "first_token_s": 4.05, "ttft_s": 0.05,
                 "input_tokens": 77, "cached_tokens": 0, "status": "ok"})
    fe = estimate_frontend_live(pd.DataFrame(rows), t0, records, intercept, coef)
    assert fe["n_samples"] == 3 and fe["unmatched"] == 1
    assert fe["frontend_s"] == pytest.approx(0.007, abs=1e-6)
    assert fe["frontend_in_s"] == pytest.approx(0.006, abs=1e-6)
    assert fe["frontend_out_s"] == pytest.approx(0.001, abs=1e-6)
    # with the host time per step, the logged execute times stand in for a wrong step model
    wrong = estimate_frontend_live(pd.DataFrame(rows), t0, records, intercept, {"prefill_tokens": 3e-5}, host_s=0.001)
    assert wrong["frontend_s"] == pytest.approx(0.007, abs=1e-6)
    assert wrong["frontend_in_s"] == pytest.approx(0.006, abs=1e-6)


def test_profile_frontend_split_reaches_the_simulated_client():
    """A profile's way in delays admission; the way out is added to every token the client sees."""
    from simkit import call, program, run_sim
    device, raw = load_device("hardware/profiles/cpu-tiny-llama.yaml")
    seen = {}
    for fin in (None, 0.009):
        prof = json.loads(json.dumps(raw))
        prof["latency_model"]["frontend_s"] = 0.010
        prof["latency_model"].pop("frontend_in_s", None)
        if fin is not None:
            prof["latency_model"]["frontend_in_s"] = fin
        dep = build_deployment(load_model("tiny-llama"), device, build_config({}, {}), prof)
        assert dep.frontend_split == pytest.approx((0.005, 0.005) if fin is None else (0.009, 0.001))
        res, _ = run_sim([program("p", 1.0, [call(300, 4)])], dep=dep)
        (row,) = res.calls
        assert row["arrival_s"] == 1.0
        assert row["scheduled_s"] == pytest.approx(1.0 + dep.frontend_split[0])
        seen[fin] = row
    # the engine-side timeline only shifts: client TTFT and E2E are the same, admission is later
    a, b = seen[None], seen[0.009]
    assert b["ttft_s"] == pytest.approx(a["ttft_s"]) and b["e2e_s"] == pytest.approx(a["e2e_s"])
    # an overridden total keeps the profile's split
    dep = build_deployment(load_model("tiny-llama"), device, build_config({}, {"latency.frontend_s": 0.02}),
                           {**prof, "latency_model": {**prof["latency_model"]}})
    assert dep.frontend_split == pytest.approx((0.018, 0.002))


def test_cli_show_describes_a_calibrated_profile(capsys, tmp_path):
    assert cli.main(["show", "hardware/profiles/cpu-tiny-llama.yaml", "--markdown"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("### `cpu-tiny-llama.yaml`")
    assert "| execute (all steps) |" in md and "| step period (whole model) |" in md and "model: intercept" in md
    assert "- / -" not in md  # operator families the engine does not separate are left out
    assert cli.main(["show", "hardware/profiles/cpu-tiny-llama.yaml"]) == 0
    assert "CV MAPE" in capsys.readouterr().out
    # an imported (per-operator) profile is not one asim-calibrate fitted: one line, exit 2
    assert cli.main(["show", "hardware/profiles/rtx4090-llama-3.1-8b.yaml"]) == 2
    assert "not a profile fitted" in capsys.readouterr().err
    assert cli.main(["show", str(tmp_path / "missing.yaml")]) == 2


def _concave_exec_time(f) -> float:
    """Dense layers whose per-token cost falls with the step's token count (weights streamed
    for few tokens, reused across many): a smooth concave law, not one of the knees."""
    m = f.prefill_tokens + f.num_decodes
    return _exec_time(f) + 4e-3 * (1.0 - np.exp(-m / 60.0))


def test_token_knees_fit_a_per_token_cost_that_falls_with_batch_size():
    """On a concave law CV prefers the knee family, and it predicts the small prefills that a
    straight line in tokens gets wrong."""
    rows = synthetic_rows(noise=0.01, exec_time=_concave_exec_time)
    fit = fit_steps(rows, folds=5)
    assert fit.execute.family.name.split("/")[1] in ("knees", "knees+idle")
    straight = min((c for c in fit.candidates if c.family.name.endswith("/all") and not c.negative),
                   key=lambda c: c.mape)
    assert fit.execute.mape < straight.mape
    lin = LinearStepModel(fit.execute_coef[0], dict(zip(fit.execute.family.features, fit.execute_coef[1:])))
    small = [step_features([(r.prefill_tokens, r.prefill_kv - r.prefill_tokens)], 0, 0, 1)
             for r in rows if r.kind == "prefill" and r.prefill_tokens <= 64]
    worst = max(abs(lin.time_of(f) / _concave_exec_time(f) - 1) for f in small)
    assert worst < 0.03


def test_fit_separates_the_wake_up_of_an_idle_engine_from_the_prefill_cost():
    """Each prefill shape runs twice: after a second without requests (paying a wake-up of
    1.5 ms) and 5 ms after the previous step (not paying it). The fit's idle_start (from the
    log stamps: idle >= IDLE_WAKE_AFTER_S) recovers the wake-up, CV prefers it, and the
    prefill law is not bent by it."""
    from simulator.latency.linear import IDLE_WAKE_AFTER_S

    wake = 1.5e-3
    rng = np.random.default_rng(3)
    rows = [r for r in synthetic_rows(noise=0.01) if r.kind != "prefill"]
    for r in rows:  # each decode run's first step follows a second without requests
        if not r.busy:
            r.elapsed_ms += wake * 1000.0
    it, t = rows[-1].iteration, rows[-1].t_s
    for rep in range(2):
        for n in (16, 64, 128, 256, 512, 700, 1024, 2048):
            for c in (0, 512, 1536):
                f = step_features([(n, c)], 0, 0, 1)
                for gap in (1.0, 0.005):
                    e = _exec_time(f) * (1 + 0.01 * rng.standard_normal()) + (wake if gap >= IDLE_WAKE_AFTER_S else 0)
                    it += 1
                    t += gap + e
                    rows.append(_row(f"prefill/n{n}-c{c}-{rep}-{gap}", "prefill", it, t, e, f, False))
    fit = fit_steps(rows, folds=5)
    assert fit.execute.family.name.endswith("+idle")
    coef = dict(zip(fit.execute.family.features, fit.execute_coef[1:]))
    assert coef["idle_start"] == pytest.approx(wake, rel=0.25)
    assert coef["prefill_tokens"] == pytest.approx(TRUE_EXEC["prefill_tokens"], rel=0.1)
    no_idle = min((c for c in fit.candidates if c.family.name == fit.execute.family.name.removesuffix("+idle")),
                  key=lambda c: c.mape)
    assert fit.execute.mape < no_idle.mape


def test_linear_decode_fast_path_matches_the_general_path_with_knees():
    coefs = {"num_decodes": 2e-4, "decode_ctx_sum": 1e-7, "num_seqs": 1e-4, "num_sampled": 3e-5,
             "tokens_upto_16": 1e-4, "tokens_upto_256": 5e-6, "prefill_tokens": 4e-5}
    lin = LinearStepModel(2e-3, coefs)
    for b in (1, 7, 16, 17, 100, 300):
        f = step_features([], b, b * 900, b)
        assert lin.decode_step_time(b, b * 900) == pytest.approx(lin.time_of(f), rel=1e-12)
    with pytest.raises(ValueError, match="unknown latency features"):
        LinearStepModel(0.0, {"tokens_upto_99": 1.0})
