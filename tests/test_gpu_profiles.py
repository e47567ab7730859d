"""GPU operator profiles: the OperatorModel's tables, the Vidur / LLMServingSim importers,
the profile files, and the learned roofline."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from calibrate.importers import import_llmservingsim, write_profile
from calibrate.importers.roofline import fit_efficiencies, leave_one_device_out
from calibrate.importers.vidur import fit_collective_curves, import_vidur
from simulator.config import build_config
from simulator.deployment import build_deployment
from simulator.hardware import HARDWARE_DIR, load_device, load_model
from simulator.latency.operators import (AttentionTable, Curve, OperatorModel, choose_interp,
                                         expected_active_experts)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
LLMSS_4090 = REFERENCE / "LLMServingSim" / "profiler" / "perf" / "RTX4090" / "meta-llama" / "Llama-3.1-8B" / "bf16"
VIDUR = REFERENCE / "vidur"
needs_reference = pytest.mark.skipif(not LLMSS_4090.is_dir() or not VIDUR.is_dir(),
                                     reason="../shared/reference (LLMServingSim, vidur) not present")


# -- curves and grids ---------------------------------------------------------------------------


@pytest.mark.parametrize("interp", ["linear", "loglog"])
def test_curve_exact_at_grid_points(interp):
    """Piecewise interpolation returns the measured value at every grid point."""
    xs = [1, 2, 4, 16, 64, 256]
    ys = [3.0, 3.1, 3.5, 6.0, 20.0, 75.0]
    c = Curve(xs, ys, interp)
    assert [c(x) for x in xs] == pytest.approx(ys, rel=1e-12)


@pytest.mark.parametrize("interp", ["linear", "loglog", "affine"])
def test_curve_monotone_inside_and_beyond_grid(interp):
    """A monotone table gives a monotone curve, extrapolation past the grid included."""
    xs = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    ys = [10 + 0.05 * x + (0.0 if x < 64 else 0.001 * x * x / 64) for x in xs]
    c = Curve(xs, ys, interp)
    vals = [c(x) for x in range(1, 8193, 7)]
    assert all(b >= a - 1e-9 for a, b in zip(vals, vals[1:]))


def test_curve_extrapolates_linearly():
    """Past the grid the curve continues with the slope of its top quarter."""
    xs = list(range(0, 1001, 100))
    c = Curve(xs, [5.0 + 2.0 * x for x in xs], "linear")
    assert c(3000) == pytest.approx(5.0 + 2.0 * 3000)


def test_choose_interp_prefers_the_shape_of_the_data():
    """Cross-validation picks log-log for a power law and a line for a line."""
    xs = [2 ** i for i in range(12)]
    assert choose_interp(xs, [3.0 * x ** 0.5 for x in xs])[0] == "loglog"
    assert choose_interp(xs, [7.0 + 2.0 * x for x in xs])[0] in ("linear", "affine")


def _attention_rows():
    rows = []
    for pc in (0, 16, 64, 256):
        for kp in ((0,) if pc == 0 else (0, 128, 1024)):
            for nd in (0, 1, 8, 64):
                for kd in ((0,) if nd == 0 else (16, 256, 4096)):
                    if pc == 0 and nd == 0:
                        continue
                    p = 5.0 + 0.01 * pc * (kp + pc / 2) / 64 if pc else 0.0
                    d = 4.0 + 0.002 * nd * kd if nd else 0.0
                    rows.append((pc, kp, nd, kd, p + d * (3.0 if pc else 1.0)))
    return rows


def test_attention_table_exact_at_measured_points():
    """Prefill-only, decode-only and mixed rows come back exactly at their grid points."""
    rows = _attention_rows()
    at = AttentionTable(rows)
    for pc, kp, nd, kd, t in rows:
        pa, da = at.step([(pc, kp)] if pc else [], nd, kd)
        assert pa + da == pytest.approx(t, rel=1e-9)


def test_attention_several_chunks_cost_less_than_one_merged_chunk():
    """Chunks run in one varlen kernel: each extra chunk adds its cost above the kernel floor,
    and four 64-token chunks cost less than one 256-token chunk."""
    at = AttentionTable(_attention_rows())
    four, _ = at.step([(64, 0)] * 4, 0, 0)
    assert four == pytest.approx(4 * at.P(64, 0) - 3 * at.p0)
    assert four < at.P(256, 0)


# -- MoE ---------------------------------------------------------------------------------------


def test_expected_active_experts():
    """One token hits top_k experts; many tokens approach all of them."""
    assert expected_active_experts(128, 8, 1) == pytest.approx(8.0)
    assert expected_active_experts(128, 8, 10_000) == pytest.approx(128.0)
    vals = [expected_active_experts(128, 8, t) for t in range(1, 200)]
    assert all(b > a for a, b in zip(vals, vals[1:]))


# -- the imported profiles ----------------------------------------------------------------------


def _slice_llmservingsim(dst: Path) -> Path:
    """A small copy of the RTX 4090 profile: every table cut to a few grid values."""
    d = dst / "profiler" / "perf" / "RTX4090" / "meta-llama" / "Llama-3.1-8B" / "bf16"
    (d / "tp1").mkdir(parents=True)
    shutil.copy(LLMSS_4090 / "meta.yaml", d / "meta.yaml")
    dense = pd.read_csv(LLMSS_4090 / "tp1" / "dense.csv")
    dense[dense.tokens.isin([1, 2, 4, 8, 16, 64, 256, 1024, 2048])].to_csv(d / "tp1" / "dense.csv", index=False)
    ps = pd.read_csv(LLMSS_4090 / "tp1" / "per_sequence.csv")
    ps[ps.sequences.isin([1, 4, 16, 64, 256])].to_csv(d / "tp1" / "per_sequence.csv", index=False)
    att = pd.read_csv(LLMSS_4090 / "tp1" / "attention.csv")
    keep = (att.prefill_chunk.isin([0, 16, 256, 2048]) & att.kv_prefill.isin([0, 256, 4096])
            & att.n_decode.isin([0, 1, 16, 128]) & att.kv_decode.isin([0, 16, 1024, 16384]))
    att[keep].to_csv(d / "tp1" / "attention.csv", index=False)
    return d


@needs_reference
def test_llmservingsim_import_slice(tmp_path):
    """A slice imports with per-operator CV errors, provenance and every table."""
    prof = import_llmservingsim(_slice_llmservingsim(tmp_path), model="llama-3.1-8b", name="t-4090")
    lm = prof["latency_model"]
    assert lm["kind"] == "operators" and lm["tp_degrees"] == [1]
    assert lm["operators"]["per_layer"]["layernorm"] == 2
    fit = lm["fit"]["tp1"]
    for fam in ("dense_layer_sum", "per_sequence_sum", "attention_prefill", "attention_decode", "attention_mixed"):
        assert fit[fam]["points"] > 0 and fit[fam]["mape_pct"] >= 0
    assert set(fit["operators"]) >= {"qkv_proj", "gate_up_proj", "lm_head", "sampler"}
    prov = prof["provenance"]
    assert prov["source_repo"] == "casys-kaist/LLMServingSim" and prov["licence"] == "MIT"
    assert prov["commit"].startswith("5daddb2") and prov["vllm_version"] == "0.19.0" and prov["profiled_at"]
    assert {r["op"] for r in lm["tables"]["dense"]} >= {"qkv_proj", "embedding", "final_layernorm"}


@needs_reference
def test_profile_yaml_round_trip_and_model(tmp_path):
    """write_profile's YAML + CSV tables load back into the same per-step times."""
    prof = import_llmservingsim(_slice_llmservingsim(tmp_path / "src"), model="llama-3.1-8b", name="t-4090")
    model = load_model("llama-3.1-8b")
    mem = OperatorModel.from_profile(prof["latency_model"], model, 1)
    path = write_profile(prof, tmp_path / "out" / "t-4090.yaml")
    back = yaml.safe_load(path.read_text())
    assert back["latency_model"]["tables"] == "t-4090.tables"
    assert (tmp_path / "out" / "t-4090.tables" / "attention.csv").exists()
    assert back["provenance"] == prof["provenance"]
    disk = OperatorModel.from_profile(back["latency_model"], model, 1, base_dir=path.parent)
    for chunks, nd, ctx in (([], 1, 300), ([], 64, 64 * 900), ([(512, 0)], 16, 16 * 2000), ([(100, 50), (300, 0)], 0, 0)):
        assert disk.step_time(chunks, nd, ctx, nd + len(chunks)) == pytest.approx(
            mem.step_time(chunks, nd, ctx, nd + len(chunks)), rel=1e-4)


@needs_reference
def test_vidur_import_slice(tmp_path):
    """A Vidur slice imports: dense ops measured per TP degree, attention synthesized, CV recorded."""
    src = VIDUR / "data" / "profiling" / "compute" / "h100" / "meta-llama" / "Llama-2-7b-hf" / "mlp.csv"
    d = tmp_path / "data" / "profiling" / "compute" / "h100" / "meta-llama" / "Llama-2-7b-hf"
    d.mkdir(parents=True)
    df = pd.read_csv(src)
    df[df.num_tokens.isin([1, 2, 4, 8, 32, 128, 512, 2048]) & df.num_tensor_parallel_workers.isin([1, 2])].to_csv(
        d / "mlp.csv", index=False)
    eff = {"gemm": 0.7, "attention": 0.4, "memory": 0.7, "attention_fixed_us": 8.0}
    prof = import_vidur(tmp_path, "h100", "meta-llama/Llama-2-7b-hf", served_model="llama-2-7b", efficiencies=eff)
    lm = prof["latency_model"]
    assert lm["tp_degrees"] == [1, 2]
    assert lm["fit"]["tp1"]["dense_layer_sum"]["points"] > 0
    assert lm["operators"]["per_layer"]["add"] == 2
    assert prof["provenance"]["source_repo"] == "microsoft/vidur" and prof["provenance"]["licence"] == "MIT"
    m = OperatorModel.from_profile(lm, load_model("llama-2-7b"), 2, link=load_device("h100-sxm")[0].intra_node_link)
    assert m.decode_step_time(8, 8 * 500) > m.decode_step_time(1, 500) > 0


@needs_reference
def test_vidur_collective_curves_are_exact_and_monotone_in_gpus():
    """Fitted all-reduce curves pass through the median measurements; more GPUs cost more at 64 MiB."""
    coll = fit_collective_curves(VIDUR / "data" / "profiling" / "network" / "h100_dgx")
    curves = coll["all_reduce"]["curves"]
    assert set(curves) == {2, 4, 8}
    c = curves[8]
    curve = Curve(c["bytes"], c["time_us"], c["interp"])
    if c["interp"] != "affine":
        assert curve(c["bytes"][10]) == pytest.approx(c["time_us"][10])
    big = 64 * 2 ** 20
    t = {n: Curve(v["bytes"], v["time_us"], v["interp"])(big) for n, v in curves.items()}
    assert t[2] < t[8]
    assert {"intra_node", "inter_node"} <= set(coll["send_recv"]["curves"])


# -- the shipped profiles ------------------------------------------------------------------------

SHIPPED = [("rtx4090-llama-3.1-8b", "llama-3.1-8b", 1), ("rtx-pro-6000-qwen3-32b", "qwen3-32b", 2),
           ("rtx-pro-6000-qwen3-30b-a3b-dp2ep2", "qwen3-30b-a3b-instruct-2507", 1),
           ("h100-sxm-llama-2-7b", "llama-2-7b", 4), ("h200-roofline-learned", "llama-3.1-8b", 1),
           ("h100-sxm-qwen3.6-35b-a3b", "qwen3.6-35b-a3b", 1), ("h100-sxm-llama-3.1-70b", "llama-3.1-70b", 4)]


@pytest.mark.parametrize("name,model,tp", SHIPPED)
def test_shipped_profiles_build_a_deployment(name, model, tp):
    """Each shipped profile loads by name through build_deployment and prices steps sensibly."""
    if not (HARDWARE_DIR / "profiles" / f"{name}.yaml").exists():
        pytest.skip(f"{name} not built (python -m calibrate.importers.build_reference_profiles)")
    device, profile = load_device(name)
    dep = build_deployment(load_model(model), device, build_config({"cluster": {"tensor_parallel_size": tp}}), profile)
    lat = dep.latency
    assert 0 < lat.decode_step_time(1, 200) < lat.decode_step_time(64, 64 * 2000)
    assert lat.step_time([(2048, 0)], 0, 0, 1) > lat.step_time([(256, 0)], 0, 0, 1)
    parts = lat.breakdown(lat_features(4, 1000))
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


def test_hybrid_profile_prices_attention_in_attention_layers_and_delta_net_in_the_others():
    """Qwen3.6-35B-A3B on H100 (LLMServingSim's one-layer tables): a step's attention is the
    attention table times the model's 10 full-attention layers, the Gated DeltaNet op times
    its 30 linear-attention layers, the projections of the attention block times 10, norms
    and the MoE block times all 40; the deployment takes vLLM's hybrid KV layout."""
    name = "h100-sxm-qwen3.6-35b-a3b"
    if not (HARDWARE_DIR / "profiles" / f"{name}.yaml").exists():
        pytest.skip(f"{name} not built (python -m calibrate.importers.build_reference_profiles)")
    device, profile = load_device(name)
    ops = profile["latency_model"]["operators"]
    assert ops["per_linear_layer"] == {"linear_attention": 1}
    assert set(ops["per_attention_layer"]) == {"qkv_proj", "qk_norm", "rotary_emb", "o_proj"}
    model = load_model("qwen3.6-35b-a3b")
    dep = build_deployment(model, device, build_config({}), profile)
    assert (dep.engine.block_size, dep.engine.state_blocks_per_seq) == (1056, 3)
    lat = dep.latency
    parts = lat.breakdown_step([(512, 0)], 0, 0)
    us = 1e-6
    assert parts["linear_attention"] == pytest.approx(lat.dense_lin["linear_attention"](512) * 30 * us)
    assert parts["qkv_proj"] == pytest.approx(lat.dense_attn["qkv_proj"](512) * 10 * us)
    assert parts["layernorm"] == pytest.approx(lat.dense_layer["layernorm"](512) * 2 * 40 * us)
    pa, _ = lat.attn.step([(512, 0)], 0, 0.0)
    assert parts["attn_prefill"] == pytest.approx(pa * 10 * us)


def lat_features(B, kv):
    from simulator.latency.base import step_features
    return step_features([], B, B * (kv + 1), B)


@pytest.mark.skipif(not (HARDWARE_DIR / "profiles" / "rtx4090-llama-3.1-8b.yaml").exists(), reason="profile not built")
def test_operator_model_decode_is_exact_at_grid_and_monotone():
    """Pure-decode steps: increasing in context and batch; the table at its grid points."""
    device, profile = load_device("rtx4090-llama-3.1-8b")
    lat = build_deployment(load_model("llama-3.1-8b"), device, build_config({}), profile).latency
    times = [lat.decode_step_time(32, 32 * (kv + 1)) for kv in range(16, 40000, 997)]
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert lat.decode_step_time(64, 64 * 1025) < lat.decode_step_time(128, 128 * 1025)
    D = lat.attn.D
    kd = 1024.0
    parts = lat.breakdown_step([], 16, 16 * int(kd + 1))
    assert parts["attn_decode"] == pytest.approx(D(16, kd) * lat.L * 1e-6)
    assert parts["total"] == pytest.approx(lat.decode_step_time(16, 16 * int(kd + 1)))


# -- the learned roofline ------------------------------------------------------------------------


def test_leave_one_device_out_recovers_shared_efficiencies():
    """Devices built from one set of efficiencies: each held-out device is predicted exactly."""
    specs = {"a": (1e15, 2e12), "b": (5e14, 1e12), "c": (2e14, 5e11)}
    eff = {"gemm": 0.6, "attention": 0.3, "memory": 0.8}
    rows = []
    for dev, (peak, bw) in specs.items():
        for t in (1, 16, 256, 4096):
            f, b = 2.0 * t * 4096 * 4096, 4096 * 4096 * 2.0
            rows.append({"device": dev, "source": "synthetic", "family": "gemm", "op": "g", "x": t, "flops": f,
                         "attn_flops": 0.0, "bytes": b, "us": max(f / (peak * 0.6), b / (bw * 0.8)) * 1e6})
            af = 4.0 * 32 * 128 * t * t
            rows.append({"device": dev, "source": "synthetic", "family": "attn_prefill", "op": "attention", "x": t,
                         "flops": 0.0, "attn_flops": af, "bytes": 1e3, "us": max(af / (peak * 0.3), 1e3 / (bw * 0.8)) * 1e6 + 0})
    df = pd.DataFrame(rows)
    got = fit_efficiencies(df, specs)
    assert got["gemm"] == pytest.approx(eff["gemm"], rel=1e-3)
    assert got["memory"] == pytest.approx(eff["memory"], rel=1e-3)
    loo = leave_one_device_out(df, specs)
    assert len(loo) == 3
    for r in loo:
        assert r["errors"]["gemm"]["mape_pct"] < 0.5


@pytest.mark.skipif(not (HARDWARE_DIR / "profiles" / "h200-roofline-learned.yaml").exists(), reason="profile not built")
def test_spec_only_profile_records_leave_one_out():
    """The spec-only profiles carry the learned efficiencies and the leave-one-device-out errors."""
    d = yaml.safe_load((HARDWARE_DIR / "profiles" / "h200-roofline-learned.yaml").read_text())
    lm = d["latency_model"]
    assert lm["kind"] == "roofline" and 0 < lm["efficiencies"]["gemm"] <= 1
    assert len(lm["fit"]["leave_one_device_out"]) >= 3
    assert np.isfinite(lm["fit"]["in_sample"]["gemm"]["mape_pct"])


def test_builtin_architecture_sequences_equal_llmservingsim_files():
    """The importer's fallback sequences (a profile folder outside a profiler/ checkout) are
    those of LLMServingSim's architecture files, and a folder inside one finds its file."""
    import yaml

    from calibrate.importers.llmservingsim import DEFAULT_SEQUENCES, _models_dir_file
    models = REFERENCE / "LLMServingSim" / "profiler" / "models"
    if not models.is_dir():
        pytest.skip("../shared/reference/LLMServingSim not present")
    for arch, seq in DEFAULT_SEQUENCES.items():
        assert yaml.safe_load((models / f"{arch}.yaml").read_text())["sequence"] == seq, arch
    assert _models_dir_file(LLMSS_4090, "llama") == (models / "llama.yaml").resolve()
