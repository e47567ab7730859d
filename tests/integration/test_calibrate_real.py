"""`asim-calibrate run --quick` against a real vLLM-CPU server on the tiny random-weight model.

Runs the server with the Python that has vLLM ($ASIM_VLLM_PYTHON, else .venv-vllm; see
scripts/install_vllm_cpu.sh) and skips when none can `import vllm`. About 2.5 minutes here:
the server's start (with its compile), a grid of ~20 experiments and a short torch-profiler
phase. The bounds on the fit's error are loose on purpose: the machine is shared.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from calibrate import cli
from replay.vllm_server import TINY_ENGINE_ARGS
from simulator.config import build_config
from simulator.deployment import build_deployment
from simulator.hardware import load_device, load_model

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "hardware" / "models" / "tiny-llama"
KV_SPACE_GIB = 1



@pytest.fixture(scope="module")
def quick_profile(vllm_python, tmp_path_factory):
    d = tmp_path_factory.mktemp("calibrate")
    out = d / "cpu-tiny-llama-quick.yaml"
    rc = cli.main(["run", "--model", str(MODEL), "--python", vllm_python, "--quick",
                   "--kv-cache-space-gib", str(KV_SPACE_GIB), "--data-dir", str(d / "data"),
                   "--out", str(out), "--", *TINY_ENGINE_ARGS])
    assert rc == 0
    return yaml.safe_load(out.read_text()), d / "data", out


def test_engine_facts_are_what_the_engine_has(quick_profile):
    """Block size, block count, limits and versions come from the running engine."""
    prof, _, _ = quick_profile
    e = prof["engine"]
    cfg = load_model(MODEL / "config.json")
    assert e["block_size"] == 128
    assert e["num_gpu_blocks"] == KV_SPACE_GIB * 2**30 // (128 * cfg.kv_bytes_per_token())
    assert (e["max_num_seqs"], e["max_num_batched_tokens"], e["max_model_len"]) == (8, 2048, 4096)
    assert e["enable_prefix_caching"] is True and e["enable_chunked_prefill"] is True
    assert e["vllm_version"] and e["torch_version"]
    assert prof["device"]["kind"] == "cpu" and prof["device"]["description"]
    assert "asim-calibrate run" in prof["provenance"]["command"]
    assert "vllm.entrypoints.openai.api_server" in prof["provenance"]["server_command"]


def test_fit_error_is_finite_and_sane(quick_profile):
    """Every fitted part reports a finite cross-validated error under a loose bound."""
    prof, _, _ = quick_profile
    fit = prof["latency_model"]["fit"]
    assert fit["n_samples"] >= 100
    assert math.isfinite(fit["cv_mape"]) and fit["cv_mape"] < 0.6
    period = fit["parts"]["step_period"]
    assert math.isfinite(period["cv_mape"]) and period["cv_mape"] < 0.5
    assert fit["attribution"]["steps_attributed"] >= 150
    assert prof["latency_model"]["intercept"] > 0


def test_operator_breakdown_from_the_torch_profiler(quick_profile):
    """The worker's profiler gives GEMM and attention times per step."""
    prof, data, _ = quick_profile
    ops = prof["latency_model"]["fit"]["parts"]["operators"]
    assert ops["available"], ops
    assert ops["families"]["gemm"]["share_of_step"] > 0.05
    assert ops["families"]["attention"]["share_of_step"] > 0.05
    assert (data / "operators.csv").exists()


def test_profile_drives_the_simulator(quick_profile):
    """load_device + build_deployment take the engine's real block count and limits."""
    prof, _, path = quick_profile
    device, raw = load_device(path)
    dep = build_deployment(load_model(MODEL / "config.json"), device, build_config({}, {}), raw)
    assert dep.engine.num_gpu_blocks == prof["engine"]["num_gpu_blocks"]
    assert dep.engine.max_num_seqs == 8
    assert dep.latency.decode_step_time(4, 4 * 1000) > 0


def test_refit_from_the_raw_data(quick_profile, tmp_path):
    """`fit DIR` alone reproduces the profile's model from the saved records."""
    prof, data, _ = quick_profile
    out = tmp_path / "refit.yaml"
    assert cli.main(["fit", str(data), "--out", str(out)]) == 0
    again = yaml.safe_load(out.read_text())
    assert again["latency_model"]["coefficients"] == pytest.approx(prof["latency_model"]["coefficients"])


def test_frontend_probe_splits_the_way_in_from_the_way_out(quick_profile):
    """The live-client probe is matched call for call to its prefill steps in the engine's log,
    and the way out (API server to client) is the smaller share on a local server."""
    prof, data, _ = quick_profile
    lm = prof["latency_model"]
    fe = lm["fit"]["parts"]["frontend"]
    assert (data / "frontend" / "calls.csv").exists()
    assert fe["contention"]["attempts"] >= 1 and fe["contention"]["other_cpu"] >= 0
    assert not list(data.glob("frontend~r*"))  # other attempts are not left behind
    assert fe["n_samples"] >= 20 and fe["unmatched"] <= 3
    assert 0 < lm["frontend_s"] < 0.1
    assert 0 < lm["frontend_in_s"] <= lm["frontend_s"]
    assert fe["frontend_out_s"] < fe["frontend_in_s"]
