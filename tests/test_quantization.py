"""Quantized checkpoints (HF quantization_config) and engine.kv_cache_dtype: the weight bytes
vLLM holds, the KV capacity it estimates, and the roofline's FP8 tensor-core speed."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from replay.cli import main
from simkit import GOOD_LINE, write_jsonl
from simulator.cluster import Simulation
from simulator.config import ConfigError, build_config
from simulator.deployment import build_deployment, estimate_num_gpu_blocks, with_kv_cache_dtype
from simulator.hardware import HardwareError, load_device, load_model, model_from_hf_config
from simulator.latency.base import StepFeatures
from simulator.latency.roofline import RooflineModel

GiB = 1 << 30


def _hf(name: str) -> dict:
    """The hf_config of a model file in hardware/models/."""
    import yaml
    from simulator.hardware import HARDWARE_DIR
    return yaml.safe_load((HARDWARE_DIR / "models" / f"{name}.yaml").read_text())["hf_config"]


# openai/gpt-oss-20b config.json (architecture fields and its quantization_config as published).
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880, "head_dim": 64,
    "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
    "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4, "vocab_size": 201088,
    "max_position_embeddings": 131072, "sliding_window": 128, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}

# Qwen/Qwen3-30B-A3B-FP8: block-wise FP8; its modules_to_not_convert names lm_head and, per
# layer, the router (mlp.gate) and the norms.
QWEN3_FP8_QC = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
                "modules_to_not_convert": ["lm_head"] + [f"model.layers.{i}.{k}" for i in range(48) for k in
                                                         ("input_layernorm", "mlp.gate", "post_attention_layernorm")]}

# compressed-tensors W8A8 FP8 (llm-compressor's FP8 scheme, as RedHatAI's *-FP8 checkpoints carry it).
CT_W8A8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
           "config_groups": {"group_0": {"targets": ["Linear"],
                                         "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                     "symmetric": True, "dynamic": False},
                                         "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                               "symmetric": True, "dynamic": True}}}}


def _ct_w4a16(group_size=128, symmetric=True) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                          "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                      "group_size": group_size, "symmetric": symmetric}}}}


def _with_qc(base: dict, qc: dict, name: str = "m"):
    return model_from_hf_config({**base, "quantization_config": qc}, name)


# ---------------------------------------------------------------------------------------------
# Parsing and weight bytes
# ---------------------------------------------------------------------------------------------


def test_gpt_oss_20b_mxfp4_weights_match_the_published_checkpoint():
    """gpt-oss-20b: experts at 4.25 bits, attention, router and embeddings in bf16; 20.91B
    parameters and a 12.8 GiB checkpoint (OpenAI's gpt-oss model card, arXiv:2508.10925, Table 1)."""
    m = model_from_hf_config(GPT_OSS_20B, "gpt-oss-20b")
    assert (m.quant_method, m.quant_weight_bits, m.quant_act_fp8) == ("mxfp4", 4.25, False)
    assert (m.quant_attn, m.quant_mlp, m.quant_experts) == (0.0, 0.0, 1.0)
    assert sum(m.param_groups().values()) / 1e9 == pytest.approx(20.91, rel=0.005)
    assert m.bytes_per_param("attn") == 2 and m.bytes_per_param("experts") == 4.25 / 8
    assert m.weight_bytes() / GiB == pytest.approx(12.8, rel=0.01)


def test_block_fp8_counts_one_byte_and_a_scale_per_block():
    """Qwen3-30B-A3B-FP8: attention and expert weights at 8 bits plus a float32 scale per
    128x128 block; router (in modules_to_not_convert), embeddings and lm_head in bf16."""
    m = _with_qc(_hf("qwen3-30b-a3b"), QWEN3_FP8_QC)
    bf16 = model_from_hf_config(_hf("qwen3-30b-a3b"), "bf16")
    assert m.quant_method == "fp8" and m.quant_act_fp8
    assert m.quant_weight_bits == 8 + 32 / (128 * 128)
    assert (m.quant_attn, m.quant_mlp, m.quant_experts) == (1.0, 1.0, 1.0)  # router and norms: not a part
    g = bf16.param_groups()
    expect = math.ceil((g["attn"] + g["experts"]) * m.quant_weight_bits / 8 + (g["mlp"] + g["rest"]) * 2)
    assert m.weight_bytes() == expect
    assert m.weight_bytes() / GiB == pytest.approx(29.03, abs=0.01)
    # the bf16 count it halves: vLLM logs "Model loading took 14.2474 GiB" per rank for
    # Qwen/Qwen3-30B-A3B at TP 4 (vllm-project/vllm issue #17469), 56.99 GiB in all
    assert bf16.weight_bytes() / GiB == pytest.approx(4 * 14.2474, rel=0.005)


def test_fp8_without_block_is_one_byte_per_weight_and_fbgemm_skips_listed_modules():
    """Per-tensor fp8 is 8 bits flat; fbgemm_fp8's modules_to_not_convert (attention of every
    layer and the first layer's MLP, as Meta's FP8 Llama 3.1 checkpoints list them) stay bf16."""
    base = _hf("llama-3.1-8b")
    assert _with_qc(base, {"quant_method": "fp8", "activation_scheme": "static"}).quant_weight_bits == 8.0
    skip = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(32) for p in "qkvo"]
    skip += ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "lm_head"]
    m = _with_qc(base, {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": skip})
    assert (m.quant_attn, m.quant_mlp) == (0.0, 31 / 32) and m.quant_act_fp8
    g = m.param_groups()
    assert m.weight_bytes() == math.ceil(g["mlp"] * (31 / 32 * 1 + 1 / 32 * 2) + (g["attn"] + g["rest"]) * 2)


@pytest.mark.parametrize("qc, bits", [
    # Qwen/Qwen2.5-7B-Instruct-AWQ: 4 bits, group 128, zero points: + a 16-bit scale and a 4-bit zero per 128
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
      "modules_to_not_convert": None}, 4 + 20 / 128),
    ({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": False}, 4 + 16 / 64),
    ({"quant_method": "awq_marlin", "bits": 4, "group_size": 128, "zero_point": True}, 4 + 20 / 128),
    # GPTQ stores qzeros even when symmetric
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, 4 + 20 / 128),
    ({"quant_method": "gptq_marlin", "bits": 8, "group_size": 32, "desc_act": True, "sym": True}, 8 + 24 / 32),
    ({"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False, "sym": True}, 4.0),  # per channel
    # bitsandbytes: 64-value blocks with a float32 absmax; double quantization (QLoRA section 3)
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, 4.5),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}, 4 + 8 / 64 + 32 / 16384),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, 8.0),
    (CT_W8A8, 8.0),
    (_ct_w4a16(128), 4 + 16 / 128),
    (_ct_w4a16(128, symmetric=False), 4 + 20 / 128),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}, 4.5),
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, 8.0),
])
def test_bits_per_quantized_weight(qc, bits):
    """Each method's stored bits per weight, scales and zero points included."""
    m = _with_qc(_hf("qwen2.5-7b"), qc)
    assert m.quant_weight_bits == pytest.approx(bits, abs=1e-12)
    assert m.quant_attn == m.quant_mlp == 1.0
    g = m.param_groups()
    assert m.weight_bytes() == math.ceil((g["attn"] + g["mlp"]) * bits / 8 + g["rest"] * 2)


def test_activation_schemes():
    """W8A8 FP8 (fp8, compressed-tensors float activations) runs FP8 GEMMs; W4A16 and int8 do not."""
    base = _hf("qwen2.5-7b")
    assert _with_qc(base, CT_W8A8).quant_act_fp8
    assert not _with_qc(base, _ct_w4a16()).quant_act_fp8
    int8 = json.loads(json.dumps(CT_W8A8).replace('"float"', '"int"'))
    assert not _with_qc(base, int8).quant_act_fp8
    assert not _with_qc(base, {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}).quant_act_fp8


def test_unquantized_config_has_no_quantization():
    """No quantization_config: weight bytes are parameters x dtype bytes, as before."""
    m = model_from_hf_config(_hf("llama-3.1-8b"), "x")
    assert m.quant_method == "" and m.weight_bytes() == sum(m.param_groups().values()) * 2


def test_malformed_known_method_fails_at_load():
    """A known method missing a field it needs is a HardwareError at load, naming it."""
    with pytest.raises(HardwareError, match="group_size"):
        _with_qc(_hf("qwen2.5-7b"), {"quant_method": "gptq", "bits": 4})


# ---------------------------------------------------------------------------------------------
# Unknown methods: the model loads; what needs the weight size says so
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qc", [
    {"quant_method": "hqq", "nbits": 4},
    {"quant_method": "compressed-tensors", "config_groups": {  # mixed precision
        "a": {"targets": ["re:.*self_attn.*"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}},
        "b": {"targets": ["re:.*mlp.*"], "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                       "group_size": 128}}}},
])
def test_unmodelled_quantization_loads_and_errors_where_needed(qc):
    """The model loads; the KV estimate and the roofline raise a ConfigError that names the
    method and the way out (engine.num_gpu_blocks_override and a calibrated profile)."""
    m = _with_qc(_hf("llama-3.1-8b"), qc, "llama-q")
    assert m.quant_method and m.quant_weight_bits == 0
    with pytest.raises(HardwareError, match="not modelled"):
        m.weight_bytes()
    device, _ = load_device("h100-sxm")
    with pytest.raises(ConfigError, match="num_gpu_blocks_override") as e:
        build_deployment(m, device, build_config())
    assert m.quant_method in str(e.value) and "fp8" in str(e.value)  # lists the modelled methods
    with pytest.raises(ConfigError, match="calibrated profile"):  # override alone: the roofline still needs it
        build_deployment(m, device, build_config(overrides={"engine.num_gpu_blocks_override": 1000}))
    device, profile = load_device("a100-80gb-sxm-llama-3.1-8b")  # measured operator times: no weight size needed
    dep = build_deployment(m, device, build_config(overrides={"engine.num_gpu_blocks_override": 1000}), profile)
    assert dep.engine.num_gpu_blocks == 1000


# ---------------------------------------------------------------------------------------------
# engine.kv_cache_dtype
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, match", [("fp9", "fp8_e5m2"), ("FP8", "must be one of"), (8, "must be one of"),
                                          ("nvfp4", "packed"), ("turboquant_k8v4", "packed")])
def test_kv_cache_dtype_validation(value, match):
    """A value vLLM does not take, or a packed format the simulator does not model, is a ConfigError."""
    with pytest.raises(ConfigError, match=match):
        build_config(overrides={"engine.kv_cache_dtype": value})


def test_kv_cache_dtype_sets_kv_bytes_everywhere_they_count():
    """fp8 halves KV bytes per token (MLA latent included); float16 on a bf16 model changes nothing."""
    for name in ("llama-3.1-8b", "qwen3.6-35b-a3b"):
        m = load_model(name)
        assert with_kv_cache_dtype(m, "fp8").kv_bytes_per_token() * 2 == m.kv_bytes_per_token()
        assert with_kv_cache_dtype(m, "float16").kv_bytes_per_token() == m.kv_bytes_per_token()
        assert with_kv_cache_dtype(m, "auto") is m
    mla = model_from_hf_config({**_hf("llama-3.1-8b"), "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                                "qk_nope_head_dim": 128, "v_head_dim": 128}, "mla")
    assert with_kv_cache_dtype(mla, "fp8").kv_bytes_per_token() == 32 * (512 + 64)


def test_fp8_kv_doubles_the_estimated_blocks_of_a_tiny_model():
    """With weights negligible the free memory is the same, so fp8 KV holds 2n or 2n+1 blocks."""
    device, _ = load_device("h100-sxm")
    m = load_model("tiny-llama")
    n = estimate_num_gpu_blocks(m, device, 1, 16, 0.9, 8192, 1024)
    n8 = estimate_num_gpu_blocks(with_kv_cache_dtype(m, "fp8"), device, 1, 16, 0.9, 8192, 1024)
    assert n8 in (2 * n, 2 * n + 1)
    d = build_deployment(m, device, build_config(overrides={"engine.kv_cache_dtype": "fp8"}))
    assert d.engine.num_gpu_blocks == n8 and d.model.kv_dtype_bytes == 1


def test_quantized_weights_leave_more_kv():
    """Qwen3-30B-A3B-FP8 on one H100: ~28 GiB less weight than bf16, so about 3x the blocks;
    fp8 KV on top doubles them."""
    device, _ = load_device("h100-sxm")
    bf16 = model_from_hf_config(_hf("qwen3-30b-a3b"), "bf16")
    fp8 = _with_qc(_hf("qwen3-30b-a3b"), QWEN3_FP8_QC)
    args = (device, 1, 16, 0.9, 8192, 1024)
    n_bf16, n_fp8 = estimate_num_gpu_blocks(bf16, *args), estimate_num_gpu_blocks(fp8, *args)
    per_block = 16 * bf16.kv_bytes_per_token()
    assert (n_fp8 - n_bf16) * per_block == pytest.approx(bf16.weight_bytes() - fp8.weight_bytes(), abs=per_block)
    assert estimate_num_gpu_blocks(with_kv_cache_dtype(fp8, "fp8"), *args) in (2 * n_fp8, 2 * n_fp8 + 1)


def test_a_profiles_block_count_holds_only_for_its_kv_cache_dtype():
    """A calibrated profile's recorded KV block count was measured with the model-dtype KV
    cache: with fp8 it no longer applies (a CPU device then needs the override)."""
    device, profile = load_device("cpu-tiny-llama")
    m = load_model("tiny-llama")
    dep = build_deployment(m, device, build_config(), profile)
    assert dep.engine.num_gpu_blocks == profile["engine"]["num_gpu_blocks"]
    with pytest.raises(ConfigError, match="num_gpu_blocks_override"):
        build_deployment(m, device, build_config(overrides={"engine.kv_cache_dtype": "fp8"}), profile)


def test_hybrid_block_grows_with_fp8_kv():
    """vLLM sizes the hybrid attention block from the attention page in kv_cache_dtype: half
    the bytes per token, so about twice the tokens per block to hold one state page."""
    m = load_model("qwen3.6-35b-a3b")
    block, states = m.hybrid_kv_layout(1)
    block8, states8 = with_kv_cache_dtype(m, "fp8").hybrid_kv_layout(1)
    assert states8 == states and block8 % 16 == 0
    assert 2 * block - 16 <= block8 <= 2 * block
    device, _ = load_device("h100-sxm")
    dep = build_deployment(m, device, build_config(overrides={"engine.kv_cache_dtype": "fp8",
                                                              "engine.num_gpu_blocks_override": 100}))
    assert dep.engine.block_size == block8


def test_offload_tiers_and_transfers_use_kv_cache_dtype():
    """Offload tier capacity in blocks doubles and each block's transfer halves with fp8 KV."""
    device, _ = load_device("h100-sxm")
    m = load_model("llama-3.1-8b")
    common = {"engine.num_gpu_blocks_override": 1000, "policy.kv": "offload"}
    deps = {kv: build_deployment(m, device, build_config(overrides={**common, "engine.kv_cache_dtype": kv}))
            for kv in ("auto", "fp8")}
    for (_, c16), (_, c8) in zip(deps["auto"].tiers, deps["fp8"].tiers):
        assert c8 in (2 * c16, 2 * c16 + 1)
    cfg = build_config(overrides={**common, "engine.kv_cache_dtype": "fp8"})
    sim = Simulation([], deps["fp8"], cfg)
    assert sim.instances[0].residency.bytes_per_block == 16 * m.kv_bytes_per_token() / 2


# ---------------------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------------------


def _prefill(tokens=8192):
    return StepFeatures(prefill_tokens=tokens, prefill_attn=tokens * tokens / 2, prefill_kv=tokens,
                        num_prefills=1, num_decodes=0, decode_ctx_sum=0, num_sampled=1)


def test_w8a8_gemms_run_at_the_fp8_peak_where_the_device_has_one():
    """A big prefill is FLOP-bound: W8A8 linear layers take bf16 time x peak_bf16 / peak_fp8 on
    H100; on A100 (no FP8 tensor cores) FP8 weights run weight-only at the bf16 peak."""
    bf16 = model_from_hf_config(_hf("llama-3.1-8b"), "bf16")
    fp8 = _with_qc(_hf("llama-3.1-8b"), CT_W8A8)
    h100, _ = load_device("h100-sxm")
    a100, _ = load_device("a100-80gb-sxm")
    lin = {(d.name, m.name): RooflineModel(m, d).breakdown(_prefill())["linear"]
           for d in (h100, a100) for m in (bf16, fp8)}
    assert lin[("h100-sxm", "m")] == pytest.approx(lin[("h100-sxm", "bf16")] * 989.4 / 1979.0, rel=1e-12)
    assert lin[("a100-80gb-sxm", "m")] == pytest.approx(lin[("a100-80gb-sxm", "bf16")], rel=1e-12)


def test_decode_reads_quantized_weights_at_their_stored_size():
    """One decode is weight-read bound: the linear layers' time scales with bytes per weight,
    and MXFP4 shrinks only the experts' reads (attention stays bf16)."""
    device, _ = load_device("h100-sxm")
    bf16 = model_from_hf_config(_hf("llama-3.1-8b"), "bf16")
    awq = _with_qc(_hf("llama-3.1-8b"), {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True})
    one = StepFeatures(0, 0.0, 0, 0, 1, 100, 1)
    r16, r4 = RooflineModel(bf16, device).breakdown(one), RooflineModel(awq, device).breakdown(one)
    assert r4["linear"] == pytest.approx(r16["linear"] * (4 + 20 / 128) / 16, rel=1e-12)
    assert r4["lm_head"] == r16["lm_head"]  # lm_head stays in the model dtype
    oss = model_from_hf_config(GPT_OSS_20B, "gpt-oss-20b")
    plain = dataclasses.replace(oss, quant_method="")
    q, p = RooflineModel(oss, device), RooflineModel(plain, device)
    assert q._lin_bytes_time == pytest.approx(p._lin_bytes_time, rel=1e-12)
    assert q._moe_expert_bytes_time == pytest.approx(p._moe_expert_bytes_time * 4.25 / 16, rel=1e-12)
    assert RooflineModel(oss, device).decode_step_time(1, 100) < RooflineModel(plain, device).decode_step_time(1, 100)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_replay_with_fp8_kv_cache(tmp_path):
    """asim-replay --set engine.kv_cache_dtype=fp8 estimates twice the KV blocks and records
    the setting; a bad value is one line and exit code 2."""
    trace = write_jsonl(tmp_path / "t.jsonl", [GOOD_LINE])
    blocks = {}
    for kv in ("auto", "fp8"):
        out = tmp_path / kv
        rc = main([str(trace), "--out", str(out), "--hardware", "h100-sxm", "--model", "tiny-llama", "--quiet",
                   "--set", f"engine.kv_cache_dtype={kv}"])
        assert rc == 0
        s = json.loads((out / "summary.json").read_text())
        blocks[kv] = s["deployment"]["engine"]["num_gpu_blocks"]
        assert s["config"]["engine"]["kv_cache_dtype"] == kv
        assert s["deployment"].get("kv_cache_bytes_per_element") == (1 if kv == "fp8" else None)
    assert blocks["fp8"] in (2 * blocks["auto"], 2 * blocks["auto"] + 1)
    assert main([str(trace), "--out", str(tmp_path / "bad"), "--hardware", "h100-sxm", "--model", "tiny-llama",
                 "--quiet", "--set", "engine.kv_cache_dtype=fp4"]) == 2


def test_replay_of_a_quantized_config_json(tmp_path):
    """A user's quantized config.json replays on the roofline and records its quantization."""
    trace = write_jsonl(tmp_path / "t.jsonl", [GOOD_LINE])
    cfg = tmp_path / "gpt-oss-20b" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(GPT_OSS_20B))
    assert main([str(trace), "--out", str(tmp_path / "o"), "--hardware", "h100-sxm", "--model", str(cfg.parent),
                 "--quiet"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["deployment"]["quantization"]["method"] == "mxfp4"
