"""Architectures model_from_hf_config must parse as vLLM builds them: Llama 4 (interleaved MoE,
a shared expert, dense layers of intermediate_size_mlp, chunked local attention), DeepSeek's
multi-token-prediction layers, Qwen / DeepSeek rules for which layers are MoE, multimodal
configs (text_config with the top level's dtype and quantization, the vision tower's weights)
and transformers' defaults for keys a published config.json leaves out (Gemma 3)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from simulator.hardware import HardwareError, load_model, model_from_hf_config

# A small Llama 4 text config: 4 layers, hidden 64, 4 query / 2 KV heads of 16, experts of 32,
# dense MLPs of 128, 4 routed experts (top-1), vocabulary 100.
LLAMA4_TEXT = {"model_type": "llama4_text", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 32, "intermediate_size_mlp": 128,
               "num_local_experts": 4, "num_experts_per_tok": 1, "vocab_size": 100, "torch_dtype": "bfloat16",
               "attention_chunk_size": 8192, "tie_word_embeddings": False}


def _llama4(**text):
    return model_from_hf_config({"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                                 "text_config": {**LLAMA4_TEXT, **text}}, "l4")


# -- Llama 4 -----------------------------------------------------------------------------------


def test_llama4_interleaved_moe_has_dense_layers_and_a_shared_expert():
    """interleave_moe_layer_step 2: vLLM makes layers 1 and 3 MoE ((i + 1) % 2 == 0), layers 0
    and 2 a dense MLP of intermediate_size_mlp; each MoE layer has one shared expert of
    intermediate_size beside the routed ones.
    attention 4 x (64·64 + 2·64·32 + 64·64) = 49,152; routed 2 x 4 x 3·64·32 = 49,152;
    shared 2 x 3·64·32 = 12,288; dense 2 x 3·64·128 = 49,152; router 2 x 64·4 = 512;
    embeddings + lm_head 2 x 100·64 = 12,800."""
    m = _llama4(interleave_moe_layer_step=2)
    assert (m.moe_layers, m.num_dense_layers) == (2, 2)
    assert (m.intermediate_size, m.moe_intermediate_size, m.shared_expert_intermediate_size) == (128, 32, 32)
    assert m.param_groups() == {"attn": 49152, "mlp": 12288 + 49152, "experts": 49152, "rest": 512 + 12800,
                                "vision": 0}
    assert m.weight_bytes() == 2 * (49152 + 61440 + 49152 + 13312)


def test_llama4_moe_in_every_layer_keeps_the_expert_width():
    """Step 1 (Scout): 4 MoE layers, no dense MLP, so intermediate_size stays the expert's 32;
    the config's moe_layers list is ignored, as vLLM ignores it. Step 0: no MoE layer."""
    m = _llama4(interleave_moe_layer_step=1, moe_layers=[0])
    assert (m.moe_layers, m.num_dense_layers, m.intermediate_size) == (4, 0, 32)
    assert m.param_groups()["mlp"] == 4 * 3 * 64 * 32  # the shared experts only
    z = _llama4(interleave_moe_layer_step=0)
    assert (z.moe_layers, z.param_groups()["experts"], z.param_groups()["mlp"]) == (0, 0, 4 * 3 * 64 * 128)


def test_llama4_chunked_attention_layers():
    """Chunked local attention in the RoPE layers (no_rope_layers 1), global attention in the
    NoPE ones: a given list, or transformers' default of a NoPE layer every
    no_rope_layer_interval-th (4): 3 of 4 layers; none without attention_chunk_size."""
    assert (lambda m: (m.attention_chunk_size, m.num_chunked_layers))(_llama4(no_rope_layers=[1, 0, 0, 1])) == (8192, 2)
    assert _llama4().num_chunked_layers == 3
    assert _llama4(no_rope_layers=[], no_rope_layer_interval=2).num_chunked_layers == 2
    assert (lambda m: (m.attention_chunk_size, m.num_chunked_layers))(_llama4(attention_chunk_size=None)) == (0, 0)
    with pytest.raises(HardwareError, match="no_rope_layers"):
        _llama4(no_rope_layers=[1, 0])
    # the layers' KV cache is unchanged: every layer keeps K and V of all tokens (not modelled yet)
    assert _llama4().kv_bytes_per_token() == 2 * 4 * 2 * 16 * 2


def test_llama4_published_shapes():
    """Scout: 48 MoE layers of 16 experts + a shared one, 36 chunked layers; Maverick: 24 MoE
    layers (1, 3, ..., 47) of 128 experts + a shared one, 24 dense layers of 16384. Their text
    models, exactly (attention q, k, v, o; 3 matrices per MLP; router; untied embeddings):"""
    attn = 48 * (5120 * 40 * 128 * 2 + 2 * 5120 * 8 * 128)
    emb = 2 * 202048 * 5120
    scout = load_model("llama-4-scout-17b-16e")
    assert (scout.moe_layers, scout.num_chunked_layers, scout.attention_chunk_size) == (48, 36, 8192)
    g = scout.param_groups()
    assert (g["attn"], g["experts"], g["mlp"], g["rest"]) == (
        attn, 48 * 16 * 3 * 5120 * 8192, 48 * 3 * 5120 * 8192, emb + 48 * 5120 * 16)
    mav = load_model("llama-4-maverick-17b-128e")
    assert (mav.moe_layers, mav.num_dense_layers, mav.intermediate_size) == (24, 24, 16384)
    g = mav.param_groups()
    assert (g["attn"], g["experts"], g["mlp"], g["rest"]) == (
        attn, 24 * 128 * 3 * 5120 * 8192, 24 * 3 * 5120 * 8192 + 24 * 3 * 5120 * 16384, emb + 24 * 5120 * 128)


# -- which layers are MoE, MTP layers --------------------------------------------------------------

MOE = {"hidden_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4, "intermediate_size": 256,
       "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 100}


@pytest.mark.parametrize("extra,moe_layers", [
    ({}, 8),                                                         # Mixtral / gpt-oss: every layer
    ({"decoder_sparse_step": 1, "mlp_only_layers": []}, 8),          # Qwen3-MoE as published
    ({"decoder_sparse_step": 2, "mlp_only_layers": [0, 4]}, 4),      # (i+1) % 2 == 0, not 0/4: 1, 3, 5, 7
    ({"decoder_sparse_step": 1, "mlp_only_layers": [0, 4]}, 6),
    ({"first_k_dense_replace": 3}, 5),                               # DeepSeek-V3: i >= 3
    ({"first_k_dense_replace": 1, "moe_layer_freq": 2}, 3),          # i >= 1 and i % 2 == 0: 2, 4, 6
    ({"first_k_dense_replace": 1, "decoder_sparse_step": 2}, 7),     # GLM: vLLM reads first_k_dense_replace only
])
def test_moe_layers_as_vllm_builds_them(extra, moe_layers):
    """The MoE layers of each family's rule; the others hold a dense MLP of intermediate_size:
    experts 4 x 3·64·32 per MoE layer, 3·64·256 per dense layer."""
    m = model_from_hf_config({**MOE, **extra}, "m")
    assert (m.moe_layers, m.num_dense_layers) == (moe_layers, 8 - moe_layers)
    g = m.param_groups()
    assert (g["experts"], g["mlp"]) == (moe_layers * 4 * 3 * 64 * 32, (8 - moe_layers) * 3 * 64 * 256)


@pytest.mark.parametrize("key", ["num_nextn_predict_layers", "num_mtp_layers", "mtp_num_hidden_layers"])
def test_mtp_layers_are_parsed_but_not_loaded(key):
    """DeepSeek-V3 / GLM-4.5 (num_nextn_predict_layers), transformers 5 (num_mtp_layers),
    Qwen3-Next (mtp_num_hidden_layers): the MTP layers beyond num_hidden_layers are recorded,
    but vLLM's main model skips their weights, so the weights are those without them."""
    base = model_from_hf_config({**MOE, "first_k_dense_replace": 1}, "m")
    m = model_from_hf_config({**MOE, "first_k_dense_replace": 1, key: 1}, "m")
    assert (base.num_mtp_layers, m.num_mtp_layers) == (0, 1)
    assert m.weight_bytes() == base.weight_bytes() and m.num_layers == 8


def test_deepseek_v3_shape():
    """DeepSeek-V3: MLA caches 512 + 64 values per token in each of 61 layers; 3 dense layers of
    18432, 58 MoE layers of 256 experts + 1 shared of 2048; the MTP layer recorded, not loaded;
    FP8 block-wise weights."""
    m = load_model("deepseek-v3")
    assert m.kv_bytes_per_token() == 61 * (512 + 64) * 2
    assert (m.num_dense_layers, m.moe_layers, m.shared_expert_intermediate_size, m.num_mtp_layers) == (3, 58, 2048, 1)
    assert m.param_groups()["experts"] == 58 * 256 * 3 * 7168 * 2048
    assert m.quant_method == "fp8" and m.quant_weight_bits == 8 + 32 / (128 * 128)


# -- multimodal configs --------------------------------------------------------------------------


def test_vision_towers_of_published_models():
    """The vision tower and projector vLLM loads: encoder layers (q, k, v, o + MLP), patch
    embedding, learned positions, projector (see _vision_params)."""
    # Qwen2.5-VL: 32 blocks, gated SiLU MLP; Conv3d patches of 2 x 14 x 14 x 3; merger 5120 -> 5120 -> 3584
    assert load_model("qwen2.5-vl-7b").vision_params == (32 * (4 * 1280 ** 2 + 3 * 1280 * 3420) + 3 * 2 * 14 * 14 * 1280
                                                         + 5120 * 5120 + 5120 * 3584)
    # Pixtral: 24 layers, gated MLP, 2D RoPE; Mistral 3 patch merger 4·1024 -> 1024, projector 1024 -> 5120 -> 5120
    assert load_model("mistral-small-3.1-24b").vision_params == (24 * (4 * 1024 ** 2 + 3 * 1024 * 4096)
                                                                 + 3 * 14 * 14 * 1024
                                                                 + 4 * 1024 * 1024 + 1024 * 5120 + 5120 * 5120)
    # SigLIP: 27 layers, 2-matrix GELU MLP, (896/14)^2 learned positions; projection 1152 -> 3840
    assert load_model("gemma-3-12b").vision_params == (27 * (4 * 1152 ** 2 + 2 * 1152 * 4304) + 3 * 14 * 14 * 1152
                                                       + (896 // 14) ** 2 * 1152 + 1152 * 3840)
    # Llama 4: 34 layers, GELU MLP, (336/14)^2 positions; pixel-shuffle MLP 5632 -> 4096 -> 4096, projector -> 5120
    assert load_model("llama-4-scout-17b-16e").vision_params == (34 * (4 * 1408 ** 2 + 2 * 1408 * 5632)
                                                                 + 3 * 14 * 14 * 1408 + (336 // 14) ** 2 * 1408
                                                                 + 5632 * 4096 + 4096 * 4096 + 4096 * 5120)
    assert load_model("qwen2.5-7b").vision_params == 0


def test_vision_weights_count_in_the_model_dtype():
    """Vision weights add to weight_bytes at the model's dtype, quantized checkpoint or not."""
    m = load_model("qwen2.5-vl-7b")
    text = dataclasses.replace(m, vision_params=0)
    assert m.weight_bytes() == text.weight_bytes() + 2 * m.vision_params
    fp8 = model_from_hf_config({**_yaml_config("qwen2.5-vl-7b"),
                                "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}, "q")
    g = fp8.param_groups()
    assert fp8.weight_bytes() == math.ceil((g["attn"] + g["mlp"]) * 1 + (g["rest"] + g["vision"]) * 2)


def _yaml_config(name):
    import yaml

    from simkit import REPO
    return yaml.safe_load((REPO / "hardware" / "models" / f"{name}.yaml").read_text())["hf_config"]


def test_text_config_takes_the_top_levels_dtype_and_quantization():
    """A multimodal config keeps torch_dtype and quantization_config at its top level (Llama 4
    FP8 checkpoints, Mistral 3): the language model is read with them."""
    cfg = _yaml_config("mistral-small-3.1-24b")
    assert model_from_hf_config(cfg, "m").dtype_bytes == 2
    m = model_from_hf_config({**cfg, "torch_dtype": "float32",
                              "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}, "m")
    # (a float32 checkpoint is served in bfloat16 under vLLM's --dtype auto)
    assert m.checkpoint_dtype == "float32" and m.dtype_bytes == 2 and m.quant_method == "fp8" and m.quant_act_fp8
    # text_config's own value wins over the top level's
    own = {**cfg, "torch_dtype": "float32", "text_config": {**cfg["text_config"], "torch_dtype": "float16"}}
    assert model_from_hf_config(own, "m").dtype_bytes == 2


def test_gemma3_published_config_leaves_defaults_out():
    """google/gemma-3-12b-it's config.json gives its text_config without head_dim, vocab_size or
    tie_word_embeddings (and no model_type for older ones): transformers' Gemma3TextConfig
    defaults apply (256, 262208, tied), as they do in vLLM, not hidden / heads = 240 and an
    untied LM head."""
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "torch_dtype": "bfloat16",
           "text_config": {"hidden_size": 3840, "intermediate_size": 15360, "num_attention_heads": 16,
                           "num_hidden_layers": 48, "num_key_value_heads": 8, "sliding_window": 1024,
                           "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
           "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                             "model_type": "siglip_vision_model", "num_attention_heads": 16,
                             "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}
    m = model_from_hf_config(raw, "gemma-3-12b-it")
    full = load_model("gemma-3-12b")
    assert (m.head_dim, m.vocab_size, m.tie_word_embeddings, m.max_position_embeddings) == (256, 262208, True, 131072)
    assert (m.sliding_window, m.num_sliding_layers) == (1024, 40)  # every 6th of 48 layers global
    assert m.weight_bytes() == full.weight_bytes() and m.kv_bytes_per_token() == full.kv_bytes_per_token()
    # a text_config that says otherwise wins
    untied = {**raw, "text_config": {**raw["text_config"], "tie_word_embeddings": False}}
    assert not model_from_hf_config(untied, "g").tie_word_embeddings


# -- float32 checkpoints and older MLP / attention layouts -------------------------------------

# Published config.json fields (Hugging Face model pages): google/gemma-2-9b (float32),
# EleutherAI/pythia-2.8b (GPT-NeoX), tiiuae/falcon-7b (multi-query), bigcode/starcoder2-7b.
GEMMA2_9B = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
             "intermediate_size": 14336, "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8,
             "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192, "sliding_window": 4096,
             "torch_dtype": "float32"}
PYTHIA_2_8B = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 2560,
               "intermediate_size": 10240, "num_attention_heads": 32, "num_hidden_layers": 32, "vocab_size": 50304,
               "max_position_embeddings": 2048, "torch_dtype": "float16", "tie_word_embeddings": False}
FALCON_7B = {"architectures": ["FalconForCausalLM"], "model_type": "falcon", "hidden_size": 4544,
             "num_attention_heads": 71, "num_hidden_layers": 32, "multi_query": True, "new_decoder_architecture": False,
             "parallel_attn": True, "vocab_size": 65024, "torch_dtype": "bfloat16"}
STARCODER2_7B = {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", "hidden_size": 4608,
                 "intermediate_size": 18432, "num_attention_heads": 36, "num_hidden_layers": 32,
                 "num_key_value_heads": 4, "vocab_size": 49152, "max_position_embeddings": 16384,
                 "sliding_window": 4096, "torch_dtype": "bfloat16"}


def _params(m) -> int:
    return sum(m.param_groups().values())


def test_float32_checkpoints_are_served_in_bfloat16_unless_engine_dtype_says_otherwise():
    """vLLM's --dtype auto serves a float32 checkpoint in bfloat16 (vllm/config/model.py,
    _resolve_auto_dtype): Gemma 2 9B's 9.24 B parameters are 18.5 GB, not 37; engine.dtype
    (vLLM's --dtype) float32 restores four bytes for weights and KV."""
    from simulator.config import ConfigError, build_config
    from simulator.deployment import build_deployment
    from simulator.hardware import load_device

    m = model_from_hf_config(GEMMA2_9B, "gemma-2-9b")
    assert m.checkpoint_dtype == "float32" and m.dtype_bytes == 2
    assert _params(m) == pytest.approx(9.24e9, rel=0.01)
    dev = load_device("h100-sxm")[0]
    auto = build_deployment(m, dev, build_config({}))
    fp32 = build_deployment(m, dev, build_config({"engine": {"dtype": "float32"}}))
    assert fp32.model.dtype_bytes == 4 and fp32.model.kv_bytes_per_token() == 2 * auto.model.kv_bytes_per_token()
    assert fp32.engine.num_gpu_blocks < auto.engine.num_gpu_blocks
    assert fp32.latency.decode_step_time(8, 8 * 1000) > 1.5 * auto.latency.decode_step_time(8, 8 * 1000)
    with pytest.raises(ConfigError, match="engine.dtype"):
        build_config({"engine": {"dtype": "fp64"}})


def test_mlps_without_a_gate_and_multi_query_attention():
    """GPT-NeoX, Falcon and StarCoder 2 build up/down MLPs (two matrices, not three); Falcon-7B
    has one KV head (multi_query) and a 4 x hidden MLP; GPT-2-style configs tie the LM head.
    Parameter counts against the published ones (embeddings included): Pythia-2.8B 2.775 B,
    Falcon-7B 6.92 B, StarCoder2-7B 7.17 B."""
    neox = model_from_hf_config(PYTHIA_2_8B, "pythia")
    assert neox.mlp_matrices == 2 and neox.checkpoint_dtype == "" and neox.dtype_bytes == 2
    assert _params(neox) == pytest.approx(2.775e9, rel=0.01)
    falcon = model_from_hf_config(FALCON_7B, "falcon")
    assert (falcon.num_kv_heads, falcon.intermediate_size, falcon.mlp_matrices) == (1, 4 * 4544, 2)
    assert falcon.tie_word_embeddings and falcon.kv_bytes_per_token() == 2 * 64 * 2 * 32
    assert _params(falcon) == pytest.approx(6.92e9, rel=0.01)
    sc2 = model_from_hf_config(STARCODER2_7B, "sc2")
    assert sc2.mlp_matrices == 2 and _params(sc2) == pytest.approx(7.17e9, rel=0.02)
    llama = load_model("llama-3.1-8b")
    assert llama.mlp_matrices == 3 and llama.checkpoint_dtype == ""
    falcon40 = model_from_hf_config({**FALCON_7B, "new_decoder_architecture": True, "num_kv_heads": 8}, "f40")
    assert falcon40.num_kv_heads == 8


def test_ernie_moe_keys_and_unknown_expert_keys():
    """ERNIE 4.5 names its experts moe_num_experts / moe_k / moe_num_shared_experts and its MoE
    layers by moe_layer_start_index (ernie45_moe.py): baidu/ERNIE-4.5-21B-A3B-PT's published
    config gives 21.8 B parameters, 3.1 B active a token besides the embedding (its card: 21 B / 3 B). A config whose
    expert count sits under a key the loader does not read is refused, not read as dense."""
    ernie = {"architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "hidden_size": 2560,
             "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_attention_heads": 20,
             "num_key_value_heads": 4, "num_hidden_layers": 28, "moe_num_experts": 64, "moe_k": 6,
             "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_layer_interval": 1,
             "vocab_size": 103424, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    m = model_from_hf_config(ernie, "ernie")
    assert (m.num_experts, m.num_experts_per_tok, m.moe_layers, m.num_dense_layers) == (64, 6, 27, 1)
    assert m.shared_expert_intermediate_size == 2 * 1536
    g = m.param_groups()
    assert sum(g.values()) == pytest.approx(21.8e9, rel=0.02)
    active = sum(g.values()) - g["rest"] - g["experts"] * (1 - 6 / 64)  # (without the embedding)
    assert active == pytest.approx(3.0e9, rel=0.05)
    with pytest.raises(HardwareError, match="moe_experts_count"):
        model_from_hf_config({**PYTHIA_2_8B, "moe_experts_count": 8}, "unknown")
    # a dense config that names no experts, or says 0 of them, still loads
    assert not model_from_hf_config({**PYTHIA_2_8B, "num_experts": 0, "moe_num_experts": 0}, "p").is_moe


@pytest.mark.parametrize("cfg,what", [
    ({"model_type": "granitemoehybrid", "layer_types": ["mamba"] * 3 + ["attention"]}, "layer types mamba"),
    ({"model_type": "nemotron_h", "hybrid_override_pattern": "M-M*"}, "nemotron_h"),
    ({"model_type": "jamba", "attn_layer_period": 8, "attn_layer_offset": 4}, "jamba"),
    ({"model_type": "lfm2", "layer_types": ["conv", "full_attention", "conv", "conv"]}, "conv"),
])
def test_state_space_and_convolution_hybrids_are_refused_not_read_as_attention(cfg, what):
    """Mamba hybrids (Granite 4.0-H, Nemotron-H, Jamba) and LFM2's short convolutions are not
    modelled: a clear error naming what, where reading every layer as attention would give a
    KV cache several times too large."""
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4, "vocab_size": 100,
            "intermediate_size": 128, "torch_dtype": "bfloat16"}
    with pytest.raises(HardwareError, match=what):
        model_from_hf_config({**base, **cfg}, "hybrid")
