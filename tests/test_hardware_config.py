"""Hardware YAMLs load with plausible numbers; build_config validates keys and values;
deployments resolve vLLM's defaults."""

from __future__ import annotations

import dataclasses

import pytest

from simkit import REPO
from simulator.config import ConfigError, SimConfig, build_config, describe
from simulator.deployment import build_deployment, vllm_defaults
from simulator.hardware import HardwareError, load_device, load_link, load_memory_tier, load_model

HW = REPO / "hardware"
GiB = 1 << 30


def _stems(kind):
    return sorted(p.stem for p in (HW / kind).glob("*.yaml"))


def _plausible_gpu(dev):
    assert 1e13 <= dev.peak_flops <= 1e16
    assert 8 * GiB <= dev.memory_bytes <= 512 * GiB
    assert 1e11 <= dev.memory_bandwidth_Bps <= 2e13
    assert dev.host_link is not None


@pytest.mark.parametrize("name", _stems("devices"))
def test_every_device_loads_with_plausible_specs(name):
    """Each device file loads: 10 TFLOP/s..10 PFLOP/s, 8..512 GiB, 0.1..20 TB/s, a host link."""
    dev, _ = load_device(name)
    assert dev.kind == "gpu"
    _plausible_gpu(dev)
    assert dev.source


@pytest.mark.parametrize("name", _stems("profiles"))
def test_every_profile_loads(name):
    """Each calibrated profile loads its device and carries a latency model or engine facts."""
    dev, raw = load_device(name)
    assert "latency_model" in raw or "engine" in raw
    assert dev.memory_bytes > 0
    if dev.kind == "gpu":
        _plausible_gpu(dev)


@pytest.mark.parametrize("name", _stems("interconnects"))
def test_every_interconnect_loads(name):
    """Each link loads with 1 GB/s..2 TB/s per direction and a latency under 1 ms."""
    link = load_link(name)
    assert 1e9 <= link.bandwidth_Bps <= 2e12
    assert 0 <= link.latency_s < 1e-3
    assert 0 < link.allreduce_efficiency <= 1
    assert link.transfer_time(0) == 0.0
    assert link.transfer_time(1e9) == pytest.approx(link.latency_s + 1e9 / link.bandwidth_Bps)


@pytest.mark.parametrize("name", _stems("memory_tiers"))
def test_every_memory_tier_loads(name):
    """Each memory tier loads with a capacity, a bandwidth and a link."""
    tier = load_memory_tier(name)
    assert tier.capacity_bytes >= GiB and tier.bandwidth_Bps >= 1e9
    assert tier.link.bandwidth_Bps > 0
    bw = min(tier.bandwidth_Bps, tier.link.bandwidth_Bps)
    assert tier.transfer_time(1e9) == pytest.approx(tier.link.latency_s + tier.latency_s + 1e9 / bw)


# Published parameter counts (model cards), in billions.
PARAMS_B = {"llama-2-7b": 6.74, "llama-3.1-8b": 8.03, "llama-3.1-70b": 70.6, "mistral-7b": 7.24,
            "qwen2.5-7b": 7.61, "qwen2.5-32b": 32.8, "qwen3-32b": 32.8, "qwen3-30b-a3b": 30.5,
            "qwen3-30b-a3b-instruct-2507": 30.5, "qwen3.6-35b-a3b": 35.0,
            # gpt-oss model card: 20.9B total; Gemma 3 27B: 27.4B with its 0.4B vision encoder
            "gpt-oss-20b": 20.9, "gemma-3-27b": 27.0,
            # Llama 4 model cards: Scout 17B active / 109B total, Maverick 17B active / 400B total
            # (both with the vision encoder vLLM loads)
            "llama-4-scout-17b-16e": 109.0, "llama-4-maverick-17b-128e": 400.0,
            # DeepSeek-V3 model card: 671B of main-model weights (685B with the 14B MTP module,
            # which vLLM's main model does not load); stored FP8, compared unquantized
            "deepseek-v3": 671.0,
            # Mistral AI's Mixtral announcement: 46.7B total parameters
            "mixtral-8x7b": 46.7,
            # Phi-3 technical report (arXiv:2404.14219), phi-3.5-MoE: 42B total, 6.6B active
            "phi-3.5-moe": 42.0,
            # gpt-oss model card (arXiv:2508.10925, Table 1): gpt-oss-120b 116.83B total; MXFP4 experts
            "gpt-oss-120b": 116.83,
            # GLM-4.5 model card: GLM-4.5-Air 106B total, 12B active
            "glm-4.5-air": 106.0,
            # Qwen3-235B-A22B model card: 235B total, 22B activated
            "qwen3-235b-a22b": 235.0,
            # Qwen2.5-VL-7B-Instruct: 8.29B parameters on its Hugging Face page (safetensors), the
            # 7.6B language model of Qwen2.5-7B and the 0.67B vision encoder + merger
            "qwen2.5-vl-7b": 8.29,
            # Mistral Small 3.1 model card: 24 billion parameters (vision encoder included)
            "mistral-small-3.1-24b": 24.0,
            # Gemma 3 technical report (arXiv:2503.19786), Table 1, 12B: 417M vision encoder +
            # 1,012M embedding + 10,759M non-embedding parameters
            "gemma-3-12b": 12.19,
            # Phi-4: 14.7B parameters on its Hugging Face page (the technical report's "14B")
            "phi-4": 14.7,
            # Llama 3.2 model card: 1B (1.23B) and 3B (3.21B), embeddings tied
            "llama-3.2-1b": 1.23, "llama-3.2-3b": 3.21,
            # Qwen3-0.6B model card: 0.6B parameters (0.44B non-embedding), embeddings tied
            "qwen3-0.6b": 0.6}


@pytest.mark.parametrize("name", _stems("models"))
def test_every_model_loads(name):
    """Each model file loads into a consistent architecture."""
    m = load_model(name)
    assert m.num_layers > 0 and m.hidden_size > 0 and m.vocab_size > 0
    assert m.num_heads % m.num_kv_heads == 0
    assert m.dtype_bytes in (1, 2, 4)
    assert m.max_position_embeddings > 0


@pytest.mark.parametrize("name", sorted(PARAMS_B))
def test_model_parameter_counts_are_plausible(name):
    """Weight bytes / dtype bytes of the unquantized model is within 3% of the published
    parameter count (gpt-oss-20b's experts are stored as MXFP4: tests/test_quantization.py)."""
    import dataclasses
    m = dataclasses.replace(load_model(name), quant_method="", quant_weight_bits=0.0)
    assert m.weight_bytes() / m.dtype_bytes / 1e9 == pytest.approx(PARAMS_B[name], rel=0.03)


def test_every_published_model_file_has_a_reference_count():
    """Every non-test model under hardware/models is covered by PARAMS_B."""
    assert set(_stems("models")) - {"tiny-llama", "tiny-qwen2-gqa", "tiny-gemma3"} == set(PARAMS_B)


def test_hybrid_model_kv_is_in_its_attention_layers_and_state_takes_blocks():
    """qwen3.6-35b-a3b: 10 of 40 layers have full attention (KV 2 x 10 x 2 x 256 x 2 B per
    token); the 30 Gated DeltaNet layers hold a state per sequence (conv window of
    (2 x 16 x 128 + 32 x 128) channels x 3 steps in bf16 + 32 x 128 x 128 float32 per layer),
    so vLLM raises the attention block to 16 x ceil(page / (16 x 2048 B)) = 1056 tokens and a
    sequence holds 30 / 10 = 3 state blocks; llama has no such layers."""
    m = load_model("qwen3.6-35b-a3b")
    assert (m.attention_layers, m.linear_layers) == (10, 30)
    assert m.kv_bytes_per_token() == 2 * 10 * 2 * 256 * 2
    per_layer = (2 * 16 * 128 + 32 * 128) * 3 * 2 + 32 * 128 * 128 * 4
    assert m.linear_state_bytes_per_seq() == 30 * per_layer
    assert m.hybrid_kv_layout() == (16 * -(-per_layer // (16 * 2 * 2 * 256 * 2)), 3) == (1056, 3)
    llama = load_model("llama-3.1-8b")
    assert llama.attention_layers == llama.num_layers and llama.hybrid_kv_layout() == (0, 0)


def test_llama_3_1_8b_weights_and_kv_size():
    """llama-3.1-8b: ~16.06 GB of bf16 weights, 128 KiB of KV per token."""
    m = load_model("llama-3.1-8b")
    assert m.weight_bytes() == pytest.approx(16.06e9, rel=0.03)
    assert m.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2


def test_moe_model_counts_all_experts():
    """qwen3-30b-a3b is MoE: 128 experts, 8 per token, all experts in the weights."""
    m = load_model("qwen3-30b-a3b")
    assert m.is_moe and m.num_experts == 128 and m.num_experts_per_tok == 8


@pytest.mark.parametrize("d", [p for p in sorted(HW.glob("models/*/config.json"))], ids=lambda p: p.parent.name)
def test_hf_config_directories_load_like_their_yaml(d):
    """A model directory's config.json gives the same architecture as its YAML twin."""
    a = load_model(d.parent)
    b = load_model(d.parent.name)
    assert (a.num_layers, a.hidden_size, a.num_kv_heads, a.head_dim, a.vocab_size) == \
        (b.num_layers, b.hidden_size, b.num_kv_heads, b.head_dim, b.vocab_size)


def test_unknown_hardware_names_are_hardware_errors():
    """Unknown device, model, link and tier names raise HardwareError naming the known ones."""
    with pytest.raises(HardwareError, match="h100-sxm"):
        load_device("tpu-v9")
    with pytest.raises(HardwareError):
        load_model("gpt-17")
    with pytest.raises(HardwareError):
        load_link("warp-drive")
    with pytest.raises(HardwareError):
        load_memory_tier("tape")


def test_malformed_device_file_is_a_hardware_error(tmp_path):
    """A device YAML missing a required field is a HardwareError naming the field."""
    p = tmp_path / "dev.yaml"
    p.write_text("name: x\nkind: gpu\nmemory_bytes: 1.0e+10\nmemory_bandwidth_Bps: 1.0e+12\n")
    with pytest.raises(HardwareError, match="peak_bf16_flops"):
        load_device(p)


# --- deployment defaults ---------------------------------------------------------------------


def test_vllm_defaults_by_device_size():
    """vLLM's defaults: 8192/1024 on >=70 GiB GPUs (not A100), 2048/256 below, block 16."""
    assert vllm_defaults(load_device("h100-sxm")[0]) == {"block_size": 16, "max_num_batched_tokens": 8192,
                                                         "max_num_seqs": 1024}
    assert vllm_defaults(load_device("a100-80gb-sxm")[0])["max_num_batched_tokens"] == 2048
    assert vllm_defaults(load_device("l40s")[0])["max_num_seqs"] == 256


def test_deployment_estimates_a_plausible_block_count():
    """llama-3.1-8b on one H100 at 0.9 utilisation: about 50-60 GiB of KV blocks of 16 tokens."""
    dep = build_deployment(load_model("llama-3.1-8b"), load_device("h100-sxm")[0], SimConfig())
    kv_gib = dep.engine.num_gpu_blocks * 16 * 128 * 1024 / GiB
    assert 45 <= kv_gib <= 62
    assert dep.engine.max_model_len == 131072


def test_num_gpu_blocks_override_wins():
    """engine.num_gpu_blocks_override sets the KV capacity exactly."""
    cfg = build_config(overrides={"engine.num_gpu_blocks_override": 123})
    dep = build_deployment(load_model("llama-3.1-8b"), load_device("h100-sxm")[0], cfg)
    assert dep.engine.num_gpu_blocks == 123


def test_model_too_big_for_device_is_a_config_error():
    """A 70B model in bf16 on one 48 GiB GPU does not fit: ConfigError."""
    with pytest.raises(ConfigError):
        build_deployment(load_model("llama-3.1-70b"), load_device("l40s")[0], SimConfig())


# --- build_config -----------------------------------------------------------------------------


def test_build_config_reads_sections_and_dotted_overrides():
    """A nested mapping and dotted overrides combine; overrides win."""
    cfg = build_config({"engine": {"max_num_seqs": 4}, "policy": {"kv": "drop"}},
                       {"engine.max_num_seqs": 8, "policy.kv_ttl_s": 3, "seed": 5, "fast_forward": False})
    assert cfg.engine.max_num_seqs == 8 and cfg.policy.kv == "drop"
    assert cfg.policy.kv_ttl_s == 3.0 and isinstance(cfg.policy.kv_ttl_s, float)
    assert cfg.seed == 5 and cfg.fast_forward is False


def test_build_config_splits_tuple_strings():
    """A comma-separated string sets a tuple field."""
    assert build_config(overrides={"policy.kv_offload_tiers": "host-dram"}).policy.kv_offload_tiers == ("host-dram",)


@pytest.mark.parametrize("mapping,overrides", [
    ({"engine": {"bogus": 1}}, None),
    ({"bogus": {"x": 1}}, None),
    (None, {"engine.bogus": 1}),
    (None, {"a.b.c": 1}),
    ({"engine": 3}, None),
])
def test_build_config_rejects_unknown_keys(mapping, overrides):
    """Unknown sections, unknown keys, over-dotted keys and non-mapping sections are ConfigErrors."""
    with pytest.raises(ConfigError):
        build_config(mapping, overrides)


def test_unknown_key_error_lists_the_known_keys():
    """The error for an unknown key names it and the known keys of its section."""
    with pytest.raises(ConfigError, match=r"engine\.bogus.*max_num_seqs"):
        build_config(overrides={"engine.bogus": 1})



BAD_VALUES = [
    ("engine.max_num_seqs", 0), ("engine.max_num_seqs", -1), ("engine.max_num_seqs", 1.5),
    ("engine.max_num_seqs", True), ("engine.max_num_seqs", "8"), ("engine.block_size", 0),
    ("engine.gpu_memory_utilization", 0.0), ("engine.gpu_memory_utilization", 1.5),
    ("engine.enable_prefix_caching", "yes"), ("engine.long_prefill_token_threshold", -1),
    ("cluster.instances", 0), ("cluster.tensor_parallel_size", 0),
    ("policy.kv_ttl_s", -1.0), ("tools.mode", "sometimes"), ("tools.fixed_s", -1.0),
    ("tools.time_scale", -0.5), ("metrics.sample_interval_s", -1.0),
    ("seed", "1"), ("seed", True),
    ("cluster.instances", 1.5), ("latency.host_overhead_s", -0.001), ("latency.host_overhead_s", "fast"),
    ("policy.router_cache_threshold", "high"), ("fast_forward", "false"),
]


@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_build_config_rejects_bad_values(key, value):
    """A value of the wrong type or out of range is a ConfigError, not a later traceback."""
    with pytest.raises(ConfigError):
        build_config(overrides={key: value})


def test_describe_documents_every_key():
    """describe() gives one help line per configurable key, each with help text."""
    lines = describe()
    assert any(line.startswith("engine.max_num_seqs ") for line in lines)
    assert all(line.split(": ", 1)[1] for line in lines)


def test_config_is_frozen():
    """A SimConfig cannot be modified after construction."""
    cfg = SimConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]



def test_roofline_prices_a_hybrid_model_attention_in_its_attention_layers():
    """The spec-only roofline of a hybrid model: attention over its 10 attention layers (a
    quarter of the same model with attention everywhere), plus the Gated DeltaNet update of
    its 30 linear layers (~4 FLOPs per value head x key dim x value dim per token)."""
    import dataclasses

    from simulator.hardware import load_device
    from simulator.latency.base import step_features
    from simulator.latency.roofline import RooflineModel

    m = load_model("qwen3.6-35b-a3b")
    everywhere = dataclasses.replace(m, num_attention_layers=0)
    dev = load_device("h100-sxm")[0]
    f = step_features([(2048, 0)], 0, 0, 1)
    hyb, full = RooflineModel(m, dev), RooflineModel(everywhere, dev)
    delta = 2048 * 4.0 * 32 * 128 * 128 * 30 / (dev.peak_flops * hyb.attn_eff)
    assert hyb.breakdown(f)["attn_prefill"] == pytest.approx(full.breakdown(f)["attn_prefill"] * 10 / 40 + delta)
    assert hyb.decode_step_time(8, 8 * 1001) == pytest.approx(hyb.time_of(step_features([], 8, 8 * 1001, 8)))


def test_mla_model_caches_one_latent_per_token_and_layer():
    """DeepSeek-V2-Lite (its Hugging Face config): multi-head latent attention caches
    kv_lora_rank + qk_rope_head_dim = 576 values per token and layer, not K and V per head;
    its first layer keeps a dense MLP and 2 shared experts sit beside the 64 routed ones, for
    the published 15.7B parameters."""
    from simulator.hardware import model_from_hf_config

    cfg = {"architectures": ["DeepseekV2ForCausalLM"], "hidden_size": 2048, "num_attention_heads": 16,
           "num_key_value_heads": 16, "num_hidden_layers": 27, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
           "first_k_dense_replace": 1, "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
           "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 102400, "torch_dtype": "bfloat16",
           "max_position_embeddings": 163840}
    m = model_from_hf_config(cfg, "deepseek-v2-lite")
    assert m.kv_bytes_per_token() == 27 * (512 + 64) * 2
    assert m.weight_bytes() / 2 / 1e9 == pytest.approx(15.7, rel=0.03)
    assert (m.num_dense_layers, m.shared_expert_intermediate_size) == (1, 2 * 1408)
