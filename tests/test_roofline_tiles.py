"""The roofline's tile model of attention: FlashAttention blocks run in waves over the SMs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibrate.importers.roofline import (TILE_KEYS, fit_attention_tiles, leave_one_device_out,
                                          predict_attention_us)
from simulator.config import build_config
from simulator.deployment import build_deployment
from simulator.hardware import load_device, load_model
from simulator.latency.base import step_features
from simulator.latency.roofline import AttentionTiles, RooflineModel, decode_attention_s, prefill_attention_s

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

P = AttentionTiles(compute_efficiency=0.5, memory_efficiency=0.9, floor_s=10e-6, prefill_tile_s=5e-6,
                   decode_tile_s=3e-6, q_tile=64)


def test_prefill_chunks_filling_one_wave_cost_the_same():
    """32 heads on 188 SMs: chunks of 16..320 tokens (<= 5 tiles of 64, 160 blocks) are one wave."""
    c = 8192.0
    one = [prefill_attention_s(n, c, 32, 128, 188, 5e14, P) for n in (16, 64, 256)]
    assert one[0] == pytest.approx(one[1], rel=0.01) and one[1] == pytest.approx(one[2], rel=0.02)
    # 384 tokens: 6 tiles x 32 heads = 192 blocks > 188 SMs, a second wave.
    assert prefill_attention_s(384, c, 32, 128, 188, 5e14, P) == pytest.approx(2 * one[2], rel=0.05)


def test_prefill_wave_arithmetic():
    """One wave: a block's causal FLOPs at the SM's share of peak, plus the per-wave tile cost."""
    n, c, d, sms, peak = 100, 1000, 128, 10, 1e13
    waves = np.ceil(np.ceil(n / 64) * 8 / sms)          # 2 tiles x 8 heads = 16 blocks -> 2 waves
    block = 4.0 * d * 64 * (c + (n + 64) / 2)
    want = waves * (block / (0.5 * peak / sms) + 5e-6)
    assert waves == 2
    assert prefill_attention_s(n, c, 8, d, sms, peak, P) == pytest.approx(want, rel=1e-12)


def test_decode_is_kv_stream_plus_waves():
    """Decode: KV bytes at the efficient bandwidth, plus one tile cost per wave of (seq, KV head) blocks."""
    kv_bytes, bw = 1e9, 1e12
    t1 = decode_attention_s(16, kv_bytes, 8, 128, bw, P)     # 128 blocks: one wave
    t2 = decode_attention_s(17, kv_bytes, 8, 128, bw, P)     # 136 blocks: two
    assert t1 == pytest.approx(kv_bytes / (0.9 * bw) + 3e-6)
    assert t2 - t1 == pytest.approx(3e-6)


def test_attention_tiles_reject_bad_constants():
    """Efficiencies outside (0, 1.5] or negative costs are refused on construction."""
    with pytest.raises(ValueError):
        dataclasses.replace(P, compute_efficiency=0.0)
    with pytest.raises(ValueError):
        dataclasses.replace(P, decode_tile_s=-1e-6)


def _device(sms):
    dev, _ = load_device("h100-sxm")
    extra = {k: v for k, v in dev.extra.items() if k != "sm_count"}
    if sms:
        extra["sm_count"] = sms
    return dataclasses.replace(dev, extra=extra)


def test_roofline_prices_decode_attention_by_tiles_per_layer():
    """RooflineModel with tiles: decode attention = L x (stream + waves + floor); no SM count -> flat model."""
    m = load_model("llama-3.1-8b")
    dev = _device(132)
    lat = RooflineModel(m, dev, 1, host_overhead_s=0.0, attention_tiles=P)
    B, ctx = 64, 64 * 2001
    kv_bytes = ctx * m.kv_bytes_per_token() / m.num_layers
    want = m.num_layers * (kv_bytes / (0.9 * dev.memory_bandwidth_Bps) + np.ceil(B * 8 / 132) * 3e-6 + 10e-6)
    parts = lat.breakdown(step_features([], B, ctx, B))
    assert parts["attn_decode"] == pytest.approx(want, rel=1e-9)
    assert lat.decode_step_time(B, ctx, decode_ctx_max=4000, ep_tokens=B) == pytest.approx(parts["total"])
    flat = RooflineModel(m, _device(None), 1, host_overhead_s=0.0, attention_tiles=P)
    assert flat.tiles is None
    assert flat.breakdown(step_features([], B, ctx, B))["attn_decode"] != pytest.approx(want, rel=1e-3)


def test_roofline_mixed_step_charges_one_floor_per_layer():
    """A mixed step's attention is one launch per layer: the floor is counted once."""
    m = load_model("llama-3.1-8b")
    lat = RooflineModel(m, _device(132), 1, host_overhead_s=0.0, attention_tiles=P)
    pre = lat.breakdown(step_features([(512, 1024)], 0, 0, 1))["attn_prefill"]
    dec = lat.breakdown(step_features([], 8, 8 * 1000, 8))["attn_decode"]
    mixed = lat.breakdown(step_features([(512, 1024)], 8, 8 * 1000, 9))
    floor = m.num_layers * 10e-6
    assert mixed["attn_prefill"] + mixed["attn_decode"] == pytest.approx(pre + dec - floor, rel=1e-9)


def test_spec_profile_tiles_reach_the_model_unless_config_overrides():
    """A profile's attention_tiles build the tile model; a configured attention efficiency turns it off."""
    dev = _device(132)
    prof = {"latency_model": {"kind": "roofline", "efficiencies": {"gemm": 0.7, "attention": 0.3, "memory": 0.8},
                              "attention_tiles": {"compute_efficiency": 0.7, "memory_efficiency": 0.9, "floor_us": 10,
                                                  "prefill_tile_us": 5, "decode_tile_us": 3, "q_tile": 64}}}
    m = load_model("llama-3.1-8b")
    lat = build_deployment(m, dev, build_config({}), prof).latency
    t = lat.tiles
    assert (t.compute_efficiency, t.memory_efficiency, t.q_tile) == (0.7, 0.9, 64)
    assert (t.floor_s, t.prefill_tile_s, t.decode_tile_s) == pytest.approx((10e-6, 5e-6, 3e-6))
    lat2 = build_deployment(m, dev, build_config({"latency": {"attention_efficiency": 0.4}}), prof).latency
    assert lat2.tiles is None


def test_a_device_by_name_prices_with_the_learned_roofline():
    """--hardware DEVICE (no profile): the efficiencies, tile model and element-wise costs of
    hardware/roofline-learned.yaml (learned from the measured devices' operator times: a
    measured device's own fit, else the pooled one), not the roofline's assumed starting
    points; the config's efficiencies still override them, and the host overhead stays the
    default."""
    import yaml

    from simulator.hardware import HARDWARE_DIR
    from simulator.latency.roofline import DEFAULT_HOST_OVERHEAD_S
    pooled = yaml.safe_load((HARDWARE_DIR / "roofline-learned.yaml").read_text())["latency_model"]
    assert pooled["fit"]["devices"] and pooled["fit"]["in_sample"]["gemm"]["points"] > 1000
    # a measured device takes its own fit, any other the pooled one
    learned = pooled["devices"]["h100-sxm"]
    assert "attn_decode" in learned["fitted_on"] and learned["efficiencies"] != pooled["efficiencies"]
    h200 = build_deployment(load_model("llama-3.1-8b"), load_device("h200")[0], build_config({})).latency
    assert h200.gemm_eff == pooled["efficiencies"]["gemm"]
    dev, m = load_device("h100-sxm")[0], load_model("llama-3.1-8b")
    lat = build_deployment(m, dev, build_config({})).latency
    eff = learned["efficiencies"]
    assert (lat.gemm_eff, lat.attn_eff, lat.mem_eff) == (eff["gemm"], eff["attention"], eff["memory"])
    t = learned["attention_tiles"]
    assert lat.tiles is not None and lat.tiles.compute_efficiency == t["compute_efficiency"]
    assert lat.tiles.floor_s == pytest.approx(t["floor_us"] * 1e-6)
    assert lat.host_s == DEFAULT_HOST_OVERHEAD_S
    ew = learned["elementwise"]
    assert lat.elementwise.floor_s == pytest.approx(ew["floor_us"] * 1e-6)
    assert lat.elementwise.efficiency == ew["efficiency"]
    lat2 = build_deployment(m, dev, build_config({"latency": {"gemm_efficiency": 0.5, "attention_efficiency": 0.4}})).latency
    assert (lat2.gemm_eff, lat2.attn_eff, lat2.mem_eff, lat2.tiles) == (0.5, 0.4, eff["memory"], None)


def _synthetic_attention(specs, tiles):
    rows = []
    for dev in specs:
        for n, c in [(16, 4096), (256, 4096), (512, 8192), (1024, 0), (2048, 2048), (2048, 8192)]:
            rows.append({"device": dev, "family": "attn_prefill", "n": n, "c": c, "nd": 0, "heads": 32,
                         "kv_heads": 8, "head_dim": 128, "bytes": 4096.0 * (c + n), "us": 1.0})
        for B, kv in [(1, 16384), (16, 256), (64, 4096), (256, 16), (256, 2048), (128, 8192)]:
            rows.append({"device": dev, "family": "attn_decode", "n": 0, "c": 0, "nd": B, "heads": 32,
                         "kv_heads": 8, "head_dim": 128, "bytes": 4096.0 * B * (kv + 1), "us": 1.0})
    df = pd.DataFrame(rows)
    df["us"] = predict_attention_us(df, tiles, specs)
    for k in ("source", "op"):
        df[k] = "synthetic"
    df["x"], df["flops"], df["attn_flops"] = 1.0, 0.0, 1.0
    return df


def test_tile_fit_recovers_constants_and_predicts_held_out_devices():
    """Devices built from one set of tile constants: the fit recovers them, and each held-out
    device (its own SM count, peak and bandwidth) is predicted exactly."""
    specs = {"a": (1e15, 3e12, 132.0), "b": (5e14, 1.6e12, 188.0), "c": (1.6e14, 1e12, 128.0)}
    tiles = {"compute_efficiency": 0.7, "memory_efficiency": 0.9, "floor_us": 10.0, "prefill_tile_us": 6.0,
             "decode_tile_us": 3.0}
    df = _synthetic_attention(specs, tiles)
    got = fit_attention_tiles(df, specs)
    for k in TILE_KEYS:
        assert got[k] == pytest.approx(tiles[k], rel=2e-2, abs=0.2)
    for r in leave_one_device_out(df, specs):
        for fam in ("attn_prefill", "attn_decode"):
            assert r["errors"][fam]["time_weighted_ape_pct"] < 1.0


def test_elementwise_kernels_cost_a_floor_each_plus_their_bytes():
    """Llama-3.1-8B: 2 norms per layer + RoPE + activation per layer + final norm + embedding
    = 4·32 + 2 kernels; per token the norms' 4·hidden·2 bytes (65 of them), RoPE's 2·(q+kv)·2
    per layer, the activation's 3·intermediate·2 per layer and the embedding's 2·hidden·2."""
    from simulator.latency.roofline import Elementwise, elementwise_ops
    m = load_model("llama-3.1-8b")
    kernels, per_tok = elementwise_ops(m)
    h, q_kv, inter = 4096, (32 + 8) * 128, 14336
    assert kernels == 4 * 32 + 2
    assert per_tok == 65 * 4 * h * 2 + 32 * 2 * q_kv * 2 + 32 * 3 * inter * 2 + 2 * h * 2
    dev = load_device("h100-sxm")[0]
    ew = Elementwise(3e-6, 0.5)
    base = RooflineModel(m, dev, host_overhead_s=0.0)
    with_ew = RooflineModel(m, dev, host_overhead_s=0.0, elementwise=ew)
    for T in (1, 64, 1024):
        extra = kernels * 3e-6 + T * per_tok / (dev.memory_bandwidth_Bps * 0.5)
        assert with_ew.decode_step_time(T, T * 1000) - base.decode_step_time(T, T * 1000) == pytest.approx(extra)
        f = step_features([(T, 100)], 0, 0, 1)
        assert with_ew.breakdown(f)["elementwise"] == pytest.approx(extra)
        assert with_ew.time_of(f) - base.time_of(f) == pytest.approx(extra)
    with pytest.raises(ValueError):
        Elementwise(-1e-6, 0.5)


def test_fa2_devices_price_a_mixed_steps_decodes_as_query_tiles():
    """FlashAttention 2 (every NVIDIA GPU but Hopper, FA3, and SM100, FA4) packs a GQA group's
    query heads only in pure decode steps; in a step with prefill work each decode is a 1-token
    query tile per query head over its context, and the group's other heads re-read its KV from
    DRAM once one head's pass over all decodes outgrows L2. Checked on the mixed rows of the
    shipped RTX PRO 6000 / Llama-3.1-8B attention table, which no fit uses: a decode's share of
    a mixed step within 5 % (median) and 25 % (time-weighted) of the measurement; priced as
    packed decodes, > 30 % under (median)."""
    from simulator.hardware import HARDWARE_DIR
    from simulator.latency.roofline import flash_attention_version

    versions = {n: flash_attention_version(load_device(n)[0])
                for n in ("rtx-pro-6000", "rtx4090", "a100-80gb-sxm", "h100-sxm", "h200", "b200", "mi300x")}
    assert versions == {"rtx-pro-6000": 2, "rtx4090": 2, "a100-80gb-sxm": 2, "h100-sxm": 3, "h200": 3, "b200": 4,
                        "mi300x": None}
    m = load_model("llama-3.1-8b")
    cfg = build_config({"engine": {"async_scheduling": False}})
    fa2 = build_deployment(m, load_device("rtx-pro-6000")[0], cfg).latency
    assert fa2._mixed_decode_tiles and fa2.tiles is not None and fa2._l2 == 128 * 2 ** 20
    L, p, dev = m.num_layers, fa2.tiles, fa2.device
    sms, peak, bw = dev.extra["sm_count"], dev.peak_flops, dev.memory_bandwidth_Bps
    kv_pos = m.kv_bytes_per_token() / L  # one layer, all 8 KV heads
    # the model: 32 decodes over 1.5k tokens (one head's KV pass 24 MB, in L2): query tiles
    nd, ctx = 32, 32 * 1501
    mixed = fa2.breakdown(step_features([(256, 0)], nd, ctx, nd + 1))
    assert mixed["attn_decode"] == pytest.approx(L * prefill_attention_s(1, 1500.0, 32, 128, sms, peak, p, nd), rel=1e-12)
    # 128 decodes over 16k tokens: one head's pass is 1 GiB > 128 MiB L2, the re-reads miss
    big = fa2._fa2_mixed_decodes_s(128, 16384.0)
    kv = 128 * 16385 * kv_pos
    ws = kv / 8
    assert big == pytest.approx(kv * (1 + 3 * (1 - 2 ** 27 / ws)) / (p.memory_efficiency * bw), rel=1e-12)
    assert big > prefill_attention_s(1, 16384.0, 32, 128, sms, peak, p, 128)
    # pure decode steps keep the packed pricing; Hopper's mixed steps too
    packed = L * (decode_attention_s(nd, ctx * kv_pos, 8, sms, bw, p) + p.floor_s)
    assert fa2.breakdown(step_features([], nd, ctx, nd))["attn_decode"] == pytest.approx(packed, rel=1e-12)
    h100 = build_deployment(m, load_device("h100-sxm")[0], cfg).latency
    assert not h100._mixed_decode_tiles
    # the measurement: the decodes' share of mixed steps, (mixed - the same prefill alone) per layer
    table = pd.read_csv(HARDWARE_DIR / "profiles" / "rtx-pro-6000-llama-3.1-8b.tables" / "attention.csv")
    table = table[table.tp == 1]
    alone = {(r.prefill_chunk, r.kv_prefill): r.time_us for r in table[table.n_decode == 0].itertuples()}
    rows = table[(table.n_decode > 0) & (table.prefill_chunk > 0)]
    share = rows.time_us.to_numpy() - np.array([alone[(a, b)] for a, b in zip(rows.prefill_chunk, rows.kv_prefill)])
    keep = share > 30.0  # (smaller shares are within the measurement's jitter)
    share = share[keep]
    nds, kds = rows.n_decode.to_numpy()[keep], rows.kv_decode.to_numpy()[keep].astype(float)
    model_us = np.array([fa2._fa2_mixed_decodes_s(int(n), k) for n, k in zip(nds, kds)]) * 1e6
    packed_us = decode_attention_s(nds, nds * (kds + 1) * kv_pos, 8, sms, bw, p) * 1e6
    rel = model_us / share - 1
    tw = np.sum(np.abs(model_us - share)) / share.sum()
    print(f"{keep.sum()} mixed rows: model median {np.median(rel):+.3f}, time-weighted {tw:.3f}; "
          f"packed decodes median {np.median(packed_us / share - 1):+.3f}")
    assert keep.sum() > 1000
    assert abs(np.median(rel)) < 0.05 and tw < 0.25
    assert np.median(packed_us / share - 1) < -0.30


def test_decode_skew_prices_uneven_contexts_on_fa2_devices_only():
    """A batch of decodes with one long context: on FlashAttention 2 (where LLMServingSim's
    skew sweeps were measured) the decodes' attention moves alpha of the way from the even
    batch's time to every decode at the longest context, alpha of its regime (pure / mixed);
    the rest of the step is unchanged. Without the longest context, or with every context
    equal, nothing changes; FA3 (H100) is priced without it."""
    from simulator.latency.roofline import DecodeSkew

    m = load_model("llama-3.1-8b")
    skew = DecodeSkew(pure=0.1, mixed=0.25)
    fa2 = RooflineModel(m, load_device("rtx-pro-6000")[0], attention_tiles=P, decode_skew=skew)
    assert fa2.decode_skew == skew and fa2.describe()["decode_skew"] == {"pure": 0.1, "mixed": 0.25}
    nd, ctx, longest = 16, 16 * 1001, 8001
    even = fa2.decode_step_time(nd, ctx)
    assert fa2.decode_step_time(nd, ctx, ctx // nd) == even  # every context equal
    at_max = fa2.decode_step_time(nd, nd * longest)
    assert fa2.decode_step_time(nd, ctx, longest) == pytest.approx(even + 0.1 * (at_max - even), rel=1e-12)
    chunks = [(512, 0)]
    even_m = fa2.step_time(chunks, nd, ctx, nd + 1)
    at_max_m = fa2.step_time(chunks, nd, nd * longest, nd + 1)
    assert at_max_m > even_m
    assert fa2.step_time(chunks, nd, ctx, nd + 1, longest) == pytest.approx(even_m + 0.25 * (at_max_m - even_m),
                                                                          rel=1e-12)
    parts = fa2.breakdown(step_features(chunks, nd, ctx, nd + 1), None, longest)
    assert parts["linear"] == fa2.breakdown(step_features(chunks, nd, ctx, nd + 1))["linear"]
    assert fa2.decode_step_time(1, 9000, 9000) == fa2.decode_step_time(1, 9000)  # one decode: no skew
    h100 = RooflineModel(m, load_device("h100-sxm")[0], attention_tiles=P, decode_skew=skew)
    assert h100.decode_skew is None
    assert h100.decode_step_time(nd, ctx, longest) == h100.decode_step_time(nd, ctx)
    with pytest.raises(ValueError):
        DecodeSkew(pure=-0.1, mixed=0.0)


def test_decode_skew_fit_recovers_alpha_and_reaches_a_device_by_name():
    """The closed-form fit recovers the alphas that made the skewed times; the learned file's
    alphas reach a device given by name (a measured device its own, another FA2 device the
    pooled ones), and the step interface carries the longest context to the model."""
    import yaml

    from calibrate.importers.roofline import fit_decode_skew
    from simulator.hardware import HARDWARE_DIR

    rng = np.random.default_rng(0)
    rows = []
    for dev, alphas in (("a", {"pure": 0.03, "mixed": 0.06}), ("b", {"pure": 0.05, "mixed": 0.02})):
        for reg, a in alphas.items():
            t_mean = rng.uniform(50, 5000, 200)
            t_max = t_mean * rng.uniform(1.2, 4.0, 200)
            rows.append(pd.DataFrame({"device": dev, "table": dev, "regime": reg, "t_mean_us": t_mean,
                                      "t_max_us": t_max, "t_skew_us": t_mean + a * (t_max - t_mean)}))
    fit = fit_decode_skew(pd.concat(rows, ignore_index=True))
    assert fit["devices"]["a"]["alpha"] == pytest.approx({"pure": 0.03, "mixed": 0.06}, rel=1e-9)
    assert fit["devices"]["b"]["alpha"] == pytest.approx({"pure": 0.05, "mixed": 0.02}, rel=1e-9)
    assert fit["devices"]["a"]["errors"]["pure"]["median_abs_pct"] == pytest.approx(0.0, abs=1e-9)
    assert 0.03 < fit["alpha"]["pure"] < 0.05 and 0.02 < fit["alpha"]["mixed"] < 0.06

    learned = yaml.safe_load((HARDWARE_DIR / "roofline-learned.yaml").read_text())["latency_model"]
    own = learned["devices"]["rtx-pro-6000"]["decode_skew"]
    assert 0 < own["pure"] < 0.2 and 0 < own["mixed"] < 0.2
    m = load_model("llama-3.1-8b")
    lat = build_deployment(m, load_device("rtx-pro-6000")[0], build_config({})).latency
    assert (lat.decode_skew.pure, lat.decode_skew.mixed) == (own["pure"], own["mixed"])
    a100 = build_deployment(m, load_device("a100-80gb-sxm")[0], build_config({})).latency
    pooled = learned["devices"]["a100-80gb-sxm"]["decode_skew"]  # (no sweep measured it: the pooled alphas)
    assert pooled == learned["decode_skew"] and a100.decode_skew.pure == pooled["pure"]
    assert build_deployment(m, load_device("h100-sxm")[0], build_config({})).latency.decode_skew is None


@pytest.mark.skipif(not (REFERENCE / "LLMServingSim").is_dir(), reason="../shared/reference not present")
def test_shipped_decode_skew_is_the_fit_of_the_skew_sweeps():
    """The shipped alphas are what fit_decode_skew gives on LLMServingSim's skew sweeps (five RTX
    PRO 6000 tables and one RTX 4090), and on the sweeps they take the median error of the
    skewed batches' times (mean-context pricing: 2-5 % fast) to within 2 %."""
    import yaml

    from calibrate.importers.roofline import fit_decode_skew, skew_points
    from simulator.hardware import HARDWARE_DIR

    pts = skew_points(REFERENCE)
    assert set(pts.device) == {"rtx-pro-6000", "rtx4090"} and len(pts) > 70000
    fit = fit_decode_skew(pts)
    learned = yaml.safe_load((HARDWARE_DIR / "roofline-learned.yaml").read_text())["latency_model"]
    assert learned["decode_skew"] == pytest.approx(fit["alpha"], rel=1e-5)
    for dev in ("rtx-pro-6000", "rtx4090"):
        assert learned["devices"][dev]["decode_skew"] == pytest.approx(fit["devices"][dev]["alpha"], rel=1e-5)
    for reg in ("pure", "mixed"):
        e = fit["errors"][reg]
        assert e["bias_pct_mean_context"] < -1.5 and abs(e["bias_pct"]) < 2.0


def test_vidur_imported_fa2_profiles_carry_the_learned_decode_skew():
    """The A100 profile imported from Vidur (attention synthesized from the learned roofline)
    prices uneven decode contexts as the roofline does on that device: the pooled alphas,
    pure decodes and mixed steps apart; H100 (FA3) profiles have none; LLMServingSim's
    profiles keep their own single alpha."""
    import yaml

    from simulator.hardware import HARDWARE_DIR
    learned = yaml.safe_load((HARDWARE_DIR / "roofline-learned.yaml").read_text())["latency_model"]["decode_skew"]
    m = load_model("llama-3.1-8b")
    cfg = build_config({"engine": {"async_scheduling": False}})
    dev, prof = load_device("a100-80gb-sxm-llama-3.1-8b")
    lat = build_deployment(m, dev, cfg, prof).latency
    assert (lat.skew_alpha, lat.skew_alpha_mixed) == (learned["pure"], learned["mixed"])
    nd, ctx, longest = 32, 32 * 801, 6001
    even = lat.decode_step_time(nd, ctx)
    at_max = lat.decode_step_time(nd, nd * longest)
    assert lat.decode_step_time(nd, ctx, longest) == pytest.approx(even + learned["pure"] * (at_max - even), rel=1e-9)
    chunks = [(256, 0)]
    mixed_even = lat.step_time(chunks, nd, ctx, nd + 1)
    assert lat.step_time(chunks, nd, ctx, nd + 1, longest) > mixed_even
    dev_h, prof_h = load_device("h100-sxm-llama-2-7b")
    assert build_deployment(load_model("llama-2-7b"), dev_h, cfg, prof_h).latency.skew_alpha == 0.0
    dev_r, prof_r = load_device("rtx-pro-6000-llama-3.1-8b")
    r = build_deployment(m, dev_r, cfg, prof_r).latency
    assert r.skew_alpha > 0 and r.skew_alpha_mixed == r.skew_alpha
