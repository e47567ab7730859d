"""Sliding-window attention (gpt-oss, Gemma 2/3, Mistral-7B-v0.1): which layers slide, vLLM's
KV cache groups and capacity, the window blocks a sequence holds, and the attention cost."""

from __future__ import annotations

import dataclasses

import pytest

from simkit import make_req
from simulator.config import build_config
from simulator.deployment import build_deployment, estimate_num_gpu_blocks
from simulator.engine.kv_cache_manager import KVCacheManager
from simulator.hardware import load_device, load_model, model_from_hf_config
from simulator.latency import RooflineModel
from simulator.latency.base import window_pairs
from simulator.latency.operators import OperatorModel

BASE = {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4, "num_hidden_layers": 12,
        "intermediate_size": 4096, "vocab_size": 32000, "torch_dtype": "bfloat16"}


def _model(**kw):
    return model_from_hf_config({**BASE, **kw}, name="m")


# -- which layers slide -------------------------------------------------------------------------


def test_layer_types_name_the_sliding_layers():
    """gpt-oss-20b's config lists 12 sliding (128 tokens) and 12 full-attention layers."""
    m = load_model("gpt-oss-20b")
    assert (m.sliding_window, m.num_sliding_layers, m.full_attention_layers) == (128, 12, 12)


def test_gemma3_slides_in_all_but_every_sixth_layer():
    """gemma-3-27b: 62 layers, global attention where (i + 1) % 6 == 0 (10 of them), as
    transformers' Gemma3TextConfig builds layer_types from sliding_window_pattern."""
    m = load_model("gemma-3-27b")
    assert (m.sliding_window, m.num_sliding_layers, m.full_attention_layers) == (1024, 52, 10)


@pytest.mark.parametrize("cfg,expect", [
    ({"model_type": "gemma2", "sliding_window": 4096}, (4096, 6)),            # every other layer
    ({"model_type": "gpt_oss", "sliding_window": 128}, (128, 6)),
    ({"model_type": "cohere2", "sliding_window": 4096, "sliding_window_pattern": 4}, (4096, 9)),
    ({"model_type": "mistral", "sliding_window": 4096}, (4096, 12)),          # model-level window: all layers
    ({"model_type": "qwen2", "sliding_window": 131072, "use_sliding_window": False}, (0, 0)),
    ({"model_type": "mistral", "sliding_window": None}, (0, 0)),
    ({"model_type": "phi3", "sliding_window": 0}, (0, 0)),                     # vLLM: 0 means none
    ({"model_type": "llama", "sliding_window": 64, "layer_types": ["full_attention"] * 12}, (0, 0)),
])
def test_sliding_layers_without_or_with_layer_types(cfg, expect):
    m = _model(**cfg)
    assert (m.sliding_window, m.num_sliding_layers) == expect


def test_bad_sliding_window_is_a_clear_error():
    from simulator.hardware import HardwareError
    with pytest.raises(HardwareError, match="sliding_window"):
        _model(model_type="mistral", sliding_window="big")
    with pytest.raises(HardwareError, match="layer_types"):
        _model(sliding_window=64, layer_types=["sliding_attention"] * 5)


# -- vLLM's KV cache groups and the capacity ------------------------------------------------------


@pytest.mark.parametrize("full,sliding,groups", [
    (12, 12, (12, 1, 1)),   # gpt-oss-20b
    (10, 52, (10, 1, 6)),   # gemma-3-27b: 52 sliding layers in 6 groups of 10 (8 padding layers)
    (13, 12, (13, 1, 1)),   # under 1.5x apart: the larger count is the group size
    (20, 10, (10, 2, 1)),
    (0, 12, (0, 0, 0)),     # all layers slide: one group, no separate window blocks
])
def test_kv_cache_groups_as_vllm_forms_them(full, sliding, groups):
    types = ["full_attention"] * full + ["sliding_attention"] * sliding
    m = _model(num_hidden_layers=full + sliding, sliding_window=64, layer_types=types)
    assert m.sliding_kv_groups() == groups


def test_a_table_block_holds_the_full_attention_groups_only():
    """gpt-oss-20b: a block of a sequence's table is one page of the 12 full-attention layers
    (half the KV of all 24), so the memory estimate finds about twice the blocks."""
    m = load_model("gpt-oss-20b")
    assert m.kv_pool_bytes_per_token() * 2 == m.kv_bytes_per_token() == 2 * 24 * 8 * 64 * 2
    flat = dataclasses.replace(m, sliding_window=0, num_sliding_layers=0)
    dev = load_device("h100-sxm")[0]
    n_sw = estimate_num_gpu_blocks(m, dev, 1, 16, 0.9, 8192, 1024)
    n_flat = estimate_num_gpu_blocks(flat, dev, 1, 16, 0.9, 8192, 1024)
    assert abs(n_sw - 2 * n_flat) <= 1


def test_engine_gets_window_groups_and_a_reported_block_count_is_per_group():
    """A block count vLLM reports (or an override) counts one group's blocks; with two
    full-attention groups a table block is two of them."""
    types = ["full_attention"] * 20 + ["sliding_attention"] * 10
    m = _model(num_hidden_layers=30, sliding_window=64, layer_types=types)
    dev = load_device("h100-sxm")[0]
    dep = build_deployment(m, dev, build_config(overrides={"engine.num_gpu_blocks_override": 1001}))
    e = dep.engine
    assert (e.num_gpu_blocks, e.sliding_window, e.window_groups, e.full_groups) == (500, 64, 1, 2)
    plain = build_deployment(_model(), dev, build_config(overrides={"engine.num_gpu_blocks_override": 1001}))
    assert (plain.engine.num_gpu_blocks, plain.engine.window_groups) == (1001, 0)


# -- the window blocks a sequence holds ----------------------------------------------------------


def test_window_blocks_follow_vllm_sliding_window_manager():
    """Block size 4, window 8, two sliding-window groups per full-attention group: a prefill
    chunk holds the window's blocks from the first one not wholly behind the window of the
    computed tokens (vLLM's get_num_skipped_tokens = computed - window + 1) to its last slot,
    in prefill chunks and decodes alike. Nothing is lost."""
    kv = KVCacheManager(40, 4, window=8, window_groups=2, full_groups=1)
    usable = 39
    a = make_req(0, 20, max_tokens=8)
    assert kv.allocate_slots(a, 20)                       # 5 table blocks, 2 x 5 window blocks
    assert (kv.num_blocks_of(a), len(kv.req_to_window[0]), kv.pool.num_free) == (5, 10, usable - 15)
    a.num_computed_tokens, a.num_output_tokens = 20, 1
    assert kv.allocate_decode_slot(a)                     # 2 x (6 - 13 // 4) = 6 window blocks, 1 new table block
    assert (kv.num_blocks_of(a), len(kv.req_to_window[0]), kv.pool.num_free) == (6, 6, usable - 12)
    a.num_computed_tokens, a.num_output_tokens = 23, 4
    assert kv.allocate_decode_slot(a)                     # slot 23: 6 - 16 // 4 = 2 per group (a block fell behind)
    assert (kv.num_blocks_of(a), len(kv.req_to_window[0]), kv.pool.num_free) == (6, 4, usable - 10)
    a.num_computed_tokens, a.num_output_tokens = 24, 5
    assert kv.allocate_decode_slot(a)                     # slot 24 opens a block: 7 - 17 // 4 = 3 per group
    assert (kv.num_blocks_of(a), len(kv.req_to_window[0]), kv.pool.num_free) == (7, 6, usable - 13)

    b = make_req(1, 20, max_tokens=4)                    # chunked: 8, 8, 4 tokens
    assert kv.allocate_slots(b, 8)
    assert len(kv.req_to_window[1]) == 2 * 2
    b.num_computed_tokens = 8
    assert kv.allocate_slots(b, 8)                        # skipped 8 - 8 + 1 = 1 token: no block behind
    assert len(kv.req_to_window[1]) == 2 * 4
    b.num_computed_tokens = 16
    assert kv.allocate_slots(b, 4)                        # skipped 9 tokens: 2 blocks behind, 5 - 2 = 3 held
    assert (kv.num_blocks_of(b), len(kv.req_to_window[1])) == (5, 2 * 3)
    assert kv.pool.num_free == usable - 13 - 11

    c = make_req(2, 60)                                   # 15 + 30 blocks: more than are free
    free = kv.pool.num_free
    assert not kv.allocate_slots(c, 60)
    assert kv.pool.num_free == free and 2 not in kv.req_to_window
    kv.free(a)
    kv.take_blocks(b)                                     # a retention policy keeps the table; the window goes
    assert 1 not in kv.req_to_window
    assert kv.pool.num_free == usable - 5


def test_a_prefix_hit_shares_the_cached_window_blocks():
    """Window blocks are cached by position when full, like the table's; a later request's hit
    needs the window's last cdiv(W - 1, bs) blocks cached (vLLM's SlidingWindowManager
    .find_longest_cache_hit) and takes those, revived from the free queue, and fresh blocks
    for what it computes; without them its hit ends where they do."""
    kv = KVCacheManager(60, 4, window=8, window_groups=1, full_groups=1)
    keys = list(range(100, 105))
    a = make_req(0, 20, keys=keys)
    assert kv.allocate_slots(a, 20)
    a_window = list(kv.req_to_window[0])
    a.num_computed_tokens = 20
    kv.free(a)
    b = make_req(1, 22, keys=keys)
    hits, n = kv.lookup(b)
    assert n == 20
    free = kv.pool.num_free
    assert kv.allocate_slots(b, 2, 20, hits)              # computed 20: 13 behind the window, 3 blocks skipped
    assert (kv.num_blocks_of(b), len(kv.req_to_window[1])) == (6, 6 - 3)
    assert kv.req_to_window[1][:2] == a_window[3:5]       # positions 3 and 4: a's cached window blocks
    assert kv.pool.num_free == free - (5 + 1) - (2 + 1)   # table: 5 hits revived + 1 new; window: 2 + 1
    # Without position 4's window block the hit ends with the run of positions 2-3 (16 tokens):
    kv.free(b)
    key4 = kv.pool.block_key[a_window[4]]
    kv.pool.touch([a_window[4]])
    kv.pool._forget(a_window[4], key4)                    # (evicted: its identity is gone)
    d = make_req(3, 22, keys=keys)
    assert kv.lookup(d)[1] == 16


# -- attention cost ------------------------------------------------------------------------------


@pytest.mark.parametrize("W", [1, 3, 8, 50])
def test_window_pairs_is_the_windowed_causal_sum(W):
    for n in (1, 2, 7, 30):
        for c in (0, 1, 5, 40):
            brute = sum(min(c + i + 1, W) for i in range(n))
            assert window_pairs(n, c, W) == pytest.approx(brute)
    assert window_pairs(10, 5, 10**9) == pytest.approx(10 * (5 + 11 / 2))


def _with_window(m, W):
    return dataclasses.replace(m, sliding_window=W, num_sliding_layers=m.num_layers // 2)


def test_roofline_decode_attention_reads_at_most_the_window():
    """Half the layers slide: decode attention is the full layers' share over every context
    plus the sliding layers' over min(context, W) each; a window wider than every context
    changes nothing."""
    llama = load_model("llama-3.1-8b")
    dev = load_device("h100-sxm")[0]
    plain = RooflineModel(llama, dev)
    B, ctx = 8, 8 * 3000
    assert RooflineModel(_with_window(llama, 10**6), dev).decode_step_time(B, ctx) == pytest.approx(
        plain.decode_step_time(B, ctx), rel=1e-12)
    W = 512
    from simulator.latency.base import StepFeatures
    f = StepFeatures(0, 0.0, 0, 0, B, ctx, B)
    full = plain.breakdown(f)["attn_decode"]
    got = RooflineModel(_with_window(llama, W), dev).breakdown(f)["attn_decode"]
    assert got == pytest.approx(full * (16 + 16 * B * W / ctx) / 32, rel=1e-9)
    prefill = StepFeatures(4096, 4096 * (0 + 4097 / 2), 4096, 1, 0, 0, 1)
    p_full = plain.breakdown(prefill)["attn_prefill"]
    p_sw = RooflineModel(_with_window(llama, W), dev).breakdown(prefill)["attn_prefill"]
    share = window_pairs(4096, 0, W) / (4096 * 4097 / 2)   # 0.234 of the causal pairs in a window
    assert p_sw == pytest.approx(p_full * (1 + share) / 2, rel=1e-9)


def test_operator_model_prices_sliding_layers_at_the_window():
    """With an imported operator profile: a window wider than every context prices as the
    plain model; a narrow one reads the decode table at history W - 1 in the sliding layers."""
    dev, prof = load_device("h100-sxm-llama-3.1-70b")
    m = load_model("llama-3.1-70b")
    lm = prof["latency_model"]
    plain = OperatorModel.from_profile(lm, m, 4, link=dev.intra_node_link, profile=prof)
    wide = OperatorModel.from_profile(lm, _with_window(m, 10**6), 4, link=dev.intra_node_link, profile=prof)
    W = 256
    narrow = OperatorModel.from_profile(lm, _with_window(m, W), 4, link=dev.intra_node_link, profile=prof)
    B, ctx = 16, 16 * 4001
    chunks = [(512, 3000)]
    for a, b in ((plain, wide),):
        assert b.decode_step_time(B, ctx) == pytest.approx(a.decode_step_time(B, ctx), rel=1e-12)
        assert b.step_time(chunks, B, ctx, B + 1) == pytest.approx(a.step_time(chunks, B, ctx, B + 1), rel=1e-12)
    D = plain.attn.D
    bd = narrow.breakdown_step([], B, ctx)
    assert bd["attn_decode"] == pytest.approx((40 * D(B, 4000.0) + 40 * D(B, W - 1.0)) * 1e-6, rel=1e-9)
    assert narrow.step_time(chunks, B, ctx, B + 1) < plain.step_time(chunks, B, ctx, B + 1)


# -- end to end ----------------------------------------------------------------------------------


def test_replay_of_gpt_oss_holds_less_kv_than_all_full_attention():
    """The same coding trace on gpt-oss-20b with and without its sliding windows, capacity from
    the memory estimate on an H100 (a table block of 12 layers' pages, or of all 24): the
    windowed run uses about half the KV cache (its windows hold at most 9 blocks of 16 tokens
    per sequence besides a table of half the bytes)."""
    from pathlib import Path

    from replay.trace import load_trace
    from simulator.cluster import Simulation
    progs = load_trace(Path(__file__).parent.parent / "sample_traces" / "swe_agent_small.jsonl")
    dev = load_device("h100-sxm")[0]
    m = load_model("gpt-oss-20b")
    cfg = build_config(overrides={"metrics.sample_interval_s": 0.5})
    means, blocks = [], []
    for model in (m, dataclasses.replace(m, sliding_window=0, num_sliding_layers=0)):
        dep = build_deployment(model, dev, cfg)
        res = Simulation(progs, dep, cfg).run()
        assert all(r["status"] == "ok" for r in res.calls)
        usage = [s["kv_usage"] for s in res.timeseries]
        means.append(sum(usage) / len(usage))
        blocks.append(dep.engine.num_gpu_blocks)
    assert abs(blocks[0] - 2 * blocks[1]) <= 1
    assert 0.4 < means[0] / means[1] < 0.6


# -- Llama 4's chunked local attention ---------------------------------------------------------


def test_llama4_chunked_layers_form_kv_groups_like_sliding_windows():
    """Llama-4-Scout: 36 of 48 layers attend within 8,192-token chunks (every 4th is a NoPE
    global layer): one full-attention group of 12 layers and three chunked groups."""
    m = load_model("llama-4-scout-17b-16e")
    assert (m.local_layers, m.local_span, m.full_attention_layers) == (36, 8192, 12)
    assert m.sliding_kv_groups() == (12, 1, 3)
    dep = build_deployment(m, load_device("h100-sxm")[0], build_config(
        overrides={"engine.num_gpu_blocks_override": 5000, "cluster.tensor_parallel_size": 4}))
    e = dep.engine
    assert (e.attention_chunk_size, e.sliding_window, e.window_groups, e.full_groups) == (8192, 0, 3, 1)


def test_chunk_blocks_start_at_the_current_chunk():
    """Chunk 8, block size 4 (vLLM's get_num_skipped_tokens = computed // 8 x 8): a 20-token
    prefill holds its 5 blocks; its first decode (20 computed) holds blocks from token 16 on."""
    kv = KVCacheManager(40, 4, window_groups=1, full_groups=1, chunk=8)
    a = make_req(0, 20, max_tokens=8)
    assert kv.allocate_slots(a, 20)
    assert len(kv.req_to_window[0]) == 5
    a.num_computed_tokens, a.num_output_tokens = 20, 1
    assert kv.allocate_decode_slot(a)
    assert (kv.num_blocks_of(a), len(kv.req_to_window[0])) == (6, 6 - 4)
    a.num_computed_tokens, a.num_output_tokens = 24, 5
    assert kv.allocate_decode_slot(a)                     # 24 computed: the chunk from 24 on
    assert (kv.num_blocks_of(a), len(kv.req_to_window[0])) == (7, 7 - 6)
    kv.free(a)
    assert kv.pool.num_free == 39


@pytest.mark.parametrize("C", [1, 4, 8, 64])
def test_chunk_pairs_is_the_chunked_causal_sum(C):
    from simulator.latency.base import chunk_pairs
    for n in (1, 3, 9, 40):
        for c in (0, 2, 8, 61):
            assert chunk_pairs(n, c, C) == pytest.approx(sum((c + i) % C + 1 for i in range(n)))


def test_roofline_prices_experts_in_moe_layers_and_dense_mlps_elsewhere():
    """DeepSeek-V3: experts in 58 of 61 layers, the first 3 dense (and a shared expert per MoE
    layer) in the dense GEMMs; Llama-4-Maverick: MoE in every other layer."""
    dev = load_device("h100-sxm")[0]
    for name, moe_layers in (("deepseek-v3", 58), ("llama-4-maverick-17b-128e", 24)):
        m = load_model(name)
        assert m.moe_layers == moe_layers
        r = RooflineModel(m, dev, tp=8)
        e_bytes = m.mlp_params_per_layer() * moe_layers * m.bytes_per_param("experts") / 8  # (V3: fp8)
        assert r._moe_expert_bytes_time * dev.memory_bandwidth_Bps * r.mem_eff == pytest.approx(e_bytes)
        g = m.param_groups()
        assert r._lin_bytes_time * dev.memory_bandwidth_Bps * r.mem_eff == pytest.approx(
            (g["attn"] * m.bytes_per_param("attn") + g["mlp"] * m.bytes_per_param("mlp")) / 8)
        assert g["mlp"] > 0


@pytest.mark.parametrize("model_name, window, blocks", [("gemma-3-12b", 0, 8000), ("gpt-oss-20b", 0, 2500),
                                                        ("gpt-oss-20b", 100, 2000), ("gemma-3-12b", 1000, 8000)])
def test_async_decodes_skip_window_calls_only_when_they_would_do_nothing(monkeypatch, model_name, window, blocks):
    """Under async scheduling the decode loop calls allocate_decode_slot for a windowed request
    only at a block's end or where the positions it left (req.win_next, req.cache_next) say a
    window block falls behind or a block fills. Forcing a call at every decode (the positions
    reset to 0 after each call) must change nothing, with evictions and preemptions on (a
    small KV cache), and must make many more calls. (Windows that are not a multiple of the
    block size move at other positions than a block's end.)"""
    from pathlib import Path

    from replay.trace import load_trace
    from simulator.cluster import Simulation

    progs = load_trace(Path(__file__).parent.parent / "sample_traces" / "swe_agent_small.jsonl")
    dev = load_device("h100-sxm")[0]
    cfg = build_config(overrides={"metrics.sample_interval_s": 0.25, "engine.num_gpu_blocks_override": blocks,
                                  "engine.async_scheduling": True})
    model = load_model(model_name)
    if window:
        model = dataclasses.replace(model, sliding_window=window)
    dep = build_deployment(model, dev, cfg)
    assert dep.engine.async_scheduling and dep.engine.sliding_window == (window or model.sliding_window)

    n_calls = [0]
    real = KVCacheManager.allocate_decode_slot

    def counted(self, req):
        n_calls[0] += 1
        return real(self, req)

    def forced(self, req):
        ok = counted(self, req)
        req.win_next = req.cache_next = 0
        return ok

    results, counts = [], []
    for fn in (counted, forced):
        n_calls[0] = 0
        monkeypatch.setattr(KVCacheManager, "allocate_decode_slot", fn)
        res = Simulation(progs, dep, cfg).run()
        results.append((res.calls, res.timeseries, res.summary))
        counts.append(n_calls[0])
    assert results[0] == results[1]
    # (the KV cache ran full: blocks were evicted, and in some configurations calls preempted)
    assert max(row["kv_usage"] for row in results[0][1]) > 0.9
    assert counts[1] > 3 * counts[0]
