"""Reference steps (validation/reference.py) and the execute part of a calibrated profile:
the arithmetic, on a hand-made profile; the live run is in tests/integration."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from calibrate.experiments import DECODE, PREFILL, EngineLimits
from calibrate.profile import execute_model
from simulator.latency.base import step_features
from validation.reference import (ReferenceStepsError, ReferenceRun, case_factor, engine_limits,
                                  reference_experiments)

PROFILE = {
    "engine": {"block_size": 128, "num_gpu_blocks": 2048, "max_num_seqs": 8, "max_num_batched_tokens": 2048,
               "max_model_len": 4096, "enable_prefix_caching": True},
    "latency_model": {
        "kind": "linear", "intercept": 3.0e-3,
        "coefficients": {"prefill_tokens": 4e-5, "num_seqs": 2.5e-4, "decode_ctx_sum": 5e-7},
        "fit": {"parts": {
            "execute": {"intercept_s": 2.4e-3, "features": ["prefill_tokens", "num_seqs", "decode_ctx_sum"]},
            "host": {"coefficients_s": {"num_steps": 6e-4, "num_seqs": 1.5e-4}},
        }},
    },
}


def test_execute_model_is_the_step_model_less_the_host_part():
    m = execute_model(PROFILE)
    assert m.intercept == pytest.approx(2.4e-3)
    assert m.coefficients == pytest.approx({"prefill_tokens": 4e-5, "num_seqs": 1e-4, "decode_ctx_sum": 5e-7})
    f = step_features([(300, 0)], 2, 1000, 3)
    assert m.time_of(f) == pytest.approx(2.4e-3 + 4e-5 * 300 + 1e-4 * 3 + 5e-7 * 1000)


def test_execute_model_drops_host_rounding_residue_and_rejects_other_models():
    p = yaml.safe_load(yaml.safe_dump(PROFILE))
    p["latency_model"]["fit"]["parts"]["execute"]["features"] = ["prefill_tokens", "decode_ctx_sum"]
    p["latency_model"]["coefficients"]["num_seqs"] = 1.5e-4 + 1e-13  # all host, rounded
    assert "num_seqs" not in execute_model(p).coefficients
    with pytest.raises(ValueError, match="calibrated linear"):
        execute_model({"latency_model": {"kind": "operators"}})


def test_reference_batches_are_fresh_and_inside_the_engine_limits():
    limits, mirror = engine_limits(PROFILE, vocab_size=32000)
    assert mirror.num_gpu_blocks == 2048 and mirror.enable_prefix_caching
    a, b = reference_experiments(limits, "1-before"), reference_experiments(limits, "1-after")
    assert {e.kind for e in a} == {PREFILL, DECODE}
    names_a = {r.name for e in a for r in e.requests()}
    assert names_a.isdisjoint({r.name for e in b for r in e.requests()})  # nothing cached across runs
    for e in a:
        for r in e.requests():
            assert r.prompt_len + r.max_tokens <= limits.max_model_len
        if e.kind == DECODE:
            assert len(e.requests()) in (1, limits.max_num_seqs)
    with pytest.raises(ReferenceStepsError, match="num_gpu_blocks"):
        engine_limits({"engine": {"block_size": 16}}, 100)
    assert isinstance(limits, EngineLimits)


def test_factor_weighs_prefill_and_decode_equally_and_case_takes_the_median():
    r = ReferenceRun("x", 0.0, 1.0, ratios={"prefill": 1.21, "decode": 1.0})
    assert r.factor == pytest.approx(1.1)
    assert ReferenceRun("y", 0, 1, ratios={"decode": 0.9}).factor == pytest.approx(0.9)
    assert ReferenceRun("z", 0, 1).factor is None
    runs = [ReferenceRun(str(i), 0, 1, ratios={"decode": f}) for i, f in enumerate((1.3, 0.9, 1.0, 1.1))]
    assert case_factor(runs) == pytest.approx(1.05)
    assert case_factor(runs[:3]) == pytest.approx(1.0)
    assert case_factor([ReferenceRun("z", 0, 1)]) is None
    d = runs[0].to_dict()
    assert d["factor"] == 1.3 and math.isfinite(d["t_end"])


def test_matrix_reference_steps_setting(tmp_path):
    from validation.matrix import MatrixError, load_matrix
    base = {"name": "m", "models": {"tiny": {"dir": "hardware/models/tiny-llama"}},
            "traces": {"t": "sample_traces/tiny_cpu.jsonl"}}
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(base))
    assert load_matrix(p)[2]["reference_steps"] is True
    p.write_text(yaml.safe_dump({**base, "reference_steps": False}))
    assert load_matrix(p)[2]["reference_steps"] is False
    p.write_text(yaml.safe_dump({**base, "reference_steps": "yes"}))
    with pytest.raises(MatrixError, match="reference_steps must be true or false"):
        load_matrix(p)


@pytest.mark.parametrize("edit, where", [
    (lambda m: m["cases"][0].update(overrides={"latency.host_overhead_s": 0}), "case rec: unknown keys ['overrides']"),
    (lambda m: m["models"]["tiny"].update(profil="calibrate"), "models.tiny: unknown keys ['profil']"),
    (lambda m: m.update(variants={"v": {"sets": {}}}), "variants.v: unknown keys ['sets']"),
])
def test_matrix_rejects_unknown_keys_of_cases_models_and_variants(tmp_path, edit, where):
    """A misspelt key is an error, not silently ignored (a case's simulator overrides are `set`)."""
    from validation.matrix import MatrixError, load_matrix
    m = {"name": "m", "models": {"tiny": {"dir": "hardware/models/tiny-llama"}},
         "traces": {"t": "sample_traces/tiny_cpu.jsonl"},
         "cases": [{"name": "rec", "recorded": {"format": "llmservingsim", "dir": "x"}, "hardware": "rtx4090",
                    "set": {"latency.host_overhead_s": 0}}]}
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(m))
    assert any(c.overrides == {"latency.host_overhead_s": 0} for c in load_matrix(p)[1])
    edit(m)
    p.write_text(yaml.safe_dump(m))
    with pytest.raises(MatrixError, match=re.escape(where)):
        load_matrix(p)


def test_matrix_model_with_profile_calibrate_is_profiled_once_for_all_its_cases(tmp_path):
    """`profile: calibrate`: every case of the model has no profile and the same calibration
    arguments (the matrix's and the model's, not the variant's), so one calibration serves
    all; the pool hands its profile to the later cases without calibrating again."""
    from validation.matrix import _calibrate, _ServerPool, load_matrix
    m = {"name": "m", "engine_args": ["--max-num-seqs", "8"],
         "models": {"tiny": {"dir": "hardware/models/tiny-llama", "profile": "calibrate",
                             "engine_args": ["--block-size", "128"]}},
         "traces": {"t": "sample_traces/tiny_cpu.jsonl"}, "loads": {"a": 1.0, "b": 0.5},
         "variants": {"on": {"engine_args": ["--enable-prefix-caching"]},
                      "off": {"engine_args": ["--no-enable-prefix-caching"]}}}
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(m))
    _, cases, _ = load_matrix(p)
    assert len(cases) == 4 and all(c.hardware is None for c in cases)
    assert {tuple(c.calibrate_args) for c in cases} == {("--max-num-seqs", "8", "--block-size", "128")}
    assert {c.engine_args[-1] for c in cases} == {"--enable-prefix-caching", "--no-enable-prefix-caching"}
    pool = _ServerPool({"kv_cache_space_gib": 1}, log=lambda s: None)
    pool.profiles[(cases[0].model, tuple(cases[0].calibrate_args))] = "made-earlier.yaml"
    assert all(_calibrate(c, tmp_path / c.name, pool, lambda s: None) == "made-earlier.yaml" for c in cases)


def test_case_scales_are_the_medians_of_each_kind():
    from validation.reference import case_scales
    runs = [ReferenceRun("a", 0, 1, ratios={"prefill": 1.3, "decode": 0.9}),
            ReferenceRun("b", 0, 1, ratios={"prefill": 1.1, "decode": 1.0}),
            ReferenceRun("c", 0, 1, ratios={"prefill": 1.2})]
    assert case_scales(runs) == pytest.approx((1.2, 0.95))
    assert case_scales([ReferenceRun("d", 0, 1, ratios={"decode": 0.8})]) == pytest.approx((0.8, 0.8))
    assert case_scales([]) is None


def test_decode_scale_applies_to_pure_decode_steps_only():
    from simulator.config import ConfigError, build_config
    from simulator.latency.base import ScaledLatency
    from simulator.latency.linear import LinearStepModel
    inner = LinearStepModel(2e-3, {"prefill_tokens": 4e-5, "num_decodes": 3e-4, "decode_ctx_sum": 1e-7})
    lat = ScaledLatency(inner, 1.5, 0.8)
    assert lat.decode_step_time(4, 4000) == pytest.approx(0.8 * inner.decode_step_time(4, 4000))
    assert lat.step_time([], 4, 4000, 4) == pytest.approx(0.8 * inner.step_time([], 4, 4000, 4))
    assert lat.step_time([(100, 0)], 4, 4000, 5) == pytest.approx(1.5 * inner.step_time([(100, 0)], 4, 4000, 5))
    f = step_features([(100, 0)], 0, 0, 1)
    assert lat.time_of(f) == pytest.approx(1.5 * inner.time_of(f))
    assert lat.breakdown(f)["total"] == pytest.approx(lat.time_of(f))
    assert lat.describe()["decode_step_time_scale"] == 0.8
    assert ScaledLatency(inner, 1.2).decode_step_time(2, 100) == pytest.approx(1.2 * inner.decode_step_time(2, 100))
    with pytest.raises(ConfigError, match="decode_step_time_scale"):
        build_config(None, {"latency.decode_step_time_scale": 0})


def test_decode_scale_reaches_the_simulation():
    """A run with only the decode scale changed: TPOT moves by it, TTFT of an idle call barely."""
    from replay.trace import load_trace
    from replay.sim_backend import make_deployment
    from simulator.cluster import Simulation
    from simulator.config import build_config
    progs = load_trace("sample_traces/cpu_single.jsonl")[:1]  # one call: its decode runs alone
    prof, model = "hardware/profiles/cpu-tiny-llama.yaml", "hardware/models/tiny-llama/config.json"
    out = {}
    for d in (None, 2.0):
        cfg = build_config(None, {"latency.decode_step_time_scale": d, "metrics.sample_interval_s": 0})
        out[d] = Simulation(progs, make_deployment(prof, model, cfg), cfg).run().summary
    assert out[2.0]["mean_tpot_ms"] == pytest.approx(2.0 * out[None]["mean_tpot_ms"], rel=0.05)
    assert out[2.0]["mean_ttft_ms"] == pytest.approx(out[None]["mean_ttft_ms"], rel=0.05)


def test_a_failed_reference_run_is_recorded_and_the_case_goes_on(tmp_path):
    """No server behind the URL: the reference run fails, is logged and recorded; the case's
    result then has no scales and no re-simulated errors (nothing is made up)."""
    from types import SimpleNamespace

    from replay.vllm_server import find_free_port
    from validation.matrix import Case, _ReferenceSteps
    case = Case(name="c", kind="live", model="hardware/models/tiny-llama", hardware=None)
    srv = SimpleNamespace(base_url=f"http://127.0.0.1:{find_free_port()}", log_path=tmp_path / "none.log")
    logged = []
    ref = _ReferenceSteps(case, "hardware/profiles/cpu-tiny-llama.yaml", srv, pool=None, log=logged.append)
    ref.measure("1-before")
    assert ref.runs == [] and ref.failed and ref.failed[0]["tag"] == "1-before"
    assert any("reference steps 1-before failed" in m for m in logged)
    out = ref.result(programs=[], hardware=None, model=None, overrides={}, row={})
    assert out["factor"] is None and "errors" not in out and out["failed"] == ref.failed


def test_frontend_is_client_ttft_less_the_matched_prefill_step():
    from types import SimpleNamespace as NS

    from calibrate.runner import ExperimentRun, RequestResult
    from calibrate.profile import host_step_s
    from calibrate.frontend import runner_frontend_samples
    from validation.reference import case_frontend
    assert host_step_s(PROFILE) == pytest.approx(6e-4 + 1.5e-4)
    run = ExperimentRun("prefill/n128-c0~t", PREFILL, {}, 100.0, 101.0, requests=[
        RequestResult("a", t_send=100.000, t_first=100.030),   # its step: logged at 100.025
        RequestResult("b", t_send=100.100, t_first=100.120),   # two steps in its window: left out
        RequestResult("c", t_send=100.200, t_first=None)])     # no first token: left out
    rows = [NS(experiment=run.name, kind=PREFILL, num_prefills=1, t_s=t, elapsed_ms=ms)
            for t, ms in ((100.025, 20.0), (100.105, 5.0), (100.112, 5.0))]
    decode_run = ExperimentRun("decode/b1-l256~t", DECODE, {}, 0, 1, requests=[RequestResult("d", t_send=0, t_first=1)])
    got = runner_frontend_samples([run, decode_run], rows, host_s=1e-3)
    assert got == pytest.approx([0.030 - 0.020 - 0.001])
    runs = [ReferenceRun(str(i), 0, 1, frontend_s=f) for i, f in enumerate((0.004, 0.006, 0.005))]
    assert case_frontend(runs + [ReferenceRun("x", 0, 1)]) == pytest.approx(0.005)
    # like with like: the profile's (live-client) frontend moved by what the reference's
    # (profiling-client) frontend moved since profiling
    prof = {"latency_model": {"fit": {"parts": {"frontend": {"frontend_s": 0.0040, "runner_client_s": 0.0037}}}}}
    assert case_frontend(runs, prof) == pytest.approx(0.0040 + 0.005 - 0.0037)
    assert case_frontend(runs, {"latency_model": {}}) == pytest.approx(0.005)  # older profiles
    assert case_frontend([ReferenceRun("x", 0, 1)], prof) is None
