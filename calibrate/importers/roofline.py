"""Roofline efficiencies learned from measured operator times, for spec-only devices.

`RooflineModel` (simulator/latency/roofline.py) prices every operator family as
max(FLOPs / (peak · e), bytes / (bandwidth · e_mem)) with three efficiencies: GEMM, attention
and memory. Here they are fitted to the operator tables of the measured devices (RTX 4090,
RTX PRO 6000 and H100 from LLMServingSim; A100, H100 and A40 from Vidur), each operator
reduced to its FLOPs and bytes at its shape:

- gemm: qkv/o/gate_up/down projections and lm_head: 2·T·K·N FLOPs; (K·N + T·K + T·N)·dtype bytes;
- attention prefill (one chunk n over c cached tokens): 4·heads·d·n·(c + (n+1)/2) FLOPs;
  KV (c + n) + Q/O bytes; decode (B requests, kv each): 4·heads·d·B·(kv+1) FLOPs, KV bytes;
- elementwise (activation, norms, rotary, residual add, embedding): bytes only;
- moe (LLMServingSim's moe.csv): 2·T·k·3·h·I FLOPs; activated experts' weights, bytes.

The fit minimises the squared log error of predicted vs measured time over points of at
least `MIN_US` (smaller ones are kernel-launch bound, which no roofline describes); each
(device, family) group weighs the same and, inside a group, a point weighs by its measured
time, so the operators that make up most of a step decide the efficiencies. Leave-one-device-out: for each measured device the
efficiencies are fitted on the others and its operator times predicted from its spec alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import minimize

from simulator.hardware import HARDWARE_DIR, load_model
from simulator.latency.roofline import FLASH_Q_TILE, AttentionTiles, decode_attention_s, prefill_attention_s

MIN_US = 20.0
FAMILIES = ("gemm", "attn_prefill", "attn_decode", "elementwise", "moe")
# Element-wise kernels (norms, activation, rotary) are fitted apart (fit_elementwise: a floor
# per kernel and bytes at their own efficiency), so their rough byte counts and launch-bound
# times do not pull the efficiencies of the weight-streaming operators.
ELEMENTWISE_MAX_EFF = 5.0  # of the datasheet DRAM bandwidth: an L2-resident activation (RooflineModel's bound)
FIT_FAMILIES = ("gemm", "attn_prefill", "attn_decode", "moe")
DEFAULT_EFF = {"gemm": 0.7, "attention": 0.5, "memory": 0.8}  # simulator/latency/roofline.py defaults


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    gated: bool = True
    q_mult: int = 1  # query projection width multiplier (Qwen3-Next's output gate doubles it)
    experts: int = 0
    top_k: int = 0
    moe_inter: int = 0

    def per_rank(self, tp: int) -> "Shape":
        return Shape(self.hidden, self.heads // tp, max(self.kv_heads // tp, 1), self.head_dim, self.inter // tp,
                     self.vocab // tp, self.gated, self.q_mult, self.experts, self.top_k, self.moe_inter)


def _rows_gemm(dev, src, op, T, K, N, us, b=2):
    return {"device": dev, "source": src, "family": "gemm", "op": op, "x": T,
            "flops": 2.0 * T * K * N, "attn_flops": 0.0, "bytes": (K * N + T * K + T * N) * b, "us": us,
            "k": K, "n_out": N}


def _row(dev, src, fam, op, x, flops, attn_flops, nbytes, us):
    return {"device": dev, "source": src, "family": fam, "op": op, "x": x, "flops": flops,
            "attn_flops": attn_flops, "bytes": nbytes, "us": us}


def dense_rows(dev: str, src: str, s: Shape, op: str, T: float, us: float) -> list[dict]:
    h, d, b = s.hidden, s.head_dim, 2
    q, kv = s.heads * d * s.q_mult, s.kv_heads * d
    gemms = {"qkv_proj": (h, q + 2 * kv), "o_proj": (s.heads * d, h),
             "gate_up_proj": (h, (2 if s.gated else 1) * s.inter), "down_proj": (s.inter, h)}
    if op in gemms:
        k, n = gemms[op]
        return [_rows_gemm(dev, src, op, T, k, n, us)]
    ew = {"act_fn": 3 * T * s.inter * b, "layernorm": 4 * T * h * b, "input_layernorm": 4 * T * h * b,
          "post_attention_layernorm": 4 * T * h * b, "final_layernorm": 4 * T * h * b,
          "rotary_emb": 2 * T * (s.heads * d + kv) * b, "add": 3 * T * h * b, "embedding": 2 * T * h * b,
          "qk_norm": 2 * T * (s.heads * d + kv) * b}
    if op in ew:
        return [_row(dev, src, "elementwise", op, T, 0.0, 0.0, ew[op], us)]
    return []


def attention_rows(dev: str, src: str, s: Shape, pc: int, kp: int, nd: int, kd: int, us: float) -> list[dict]:
    h, kvh, d, b = s.heads, s.kv_heads, s.head_dim, 2
    shape = {"heads": h, "kv_heads": kvh, "head_dim": d, "n": pc, "c": kp, "nd": nd}
    if nd == 0 and pc > 0:
        f = 4.0 * h * d * pc * (kp + (pc + 1) / 2)
        by = 2 * kvh * d * b * (kp + pc) + 2 * pc * h * d * b
        return [{**_row(dev, src, "attn_prefill", "attention", pc, 0.0, f, by, us), **shape}]
    if pc == 0 and nd > 0:
        f = 4.0 * h * d * nd * (kd + 1)
        by = 2 * kvh * d * b * nd * (kd + 1)
        return [{**_row(dev, src, "attn_decode", "attention", nd, 0.0, f, by, us), **shape}]
    return []


# -- measured points --------------------------------------------------------------------------

LLMSS = [  # (device, folder, model yaml or None, explicit shape, tp degrees)
    ("rtx4090", "RTX4090/meta-llama/Llama-3.1-8B/bf16", "llama-3.1-8b", None, (1,)),
    ("rtx-pro-6000", "RTXPRO6000/meta-llama/Llama-3.1-8B/bf16", "llama-3.1-8b", None, (1, 2)),
    ("rtx-pro-6000", "RTXPRO6000/Qwen/Qwen3-32B/bf16", "qwen3-32b", None, (1, 2)),
    ("rtx-pro-6000", "RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16", "qwen3-30b-a3b-instruct-2507", None, (1,)),
    # Qwen3.6-35B-A3B (hybrid): its full-attention layer's projections and attention only.
    ("h100-sxm", "H100/Qwen/Qwen3.6-35B-A3B/bf16", None,
     Shape(2048, 16, 2, 256, 0, 248320, q_mult=2), (1,)),
]
VIDUR_DEVICES = {"a100": "a100-80gb-sxm", "h100": "h100-sxm", "a40": "a40"}


def _shape_of(model_name: str) -> Shape:
    m = load_model(model_name)
    return Shape(m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size, m.vocab_size,
                 experts=m.num_experts, top_k=m.num_experts_per_tok, moe_inter=m.moe_intermediate_size)


def llmservingsim_points(ref: Path) -> list[dict]:
    rows = []
    for dev, sub, model, shape, tps in LLMSS:
        d = ref / "LLMServingSim" / "profiler" / "perf" / sub
        if not d.is_dir():
            continue
        base = shape or _shape_of(model)
        src = f"LLMServingSim {sub}"
        for tp in tps:
            s = base.per_rank(tp)
            td = d / f"tp{tp}"
            if (td / "dense.csv").exists():
                dense = pd.read_csv(td / "dense.csv")
                for r in dense.itertuples(index=False):
                    if shape is not None and r.layer not in ("qkv_proj", "o_proj"):
                        continue
                    rows += dense_rows(dev, src, s, r.layer, float(r.tokens), float(r.time_us))
            if (td / "per_sequence.csv").exists() and shape is None:
                ps = pd.read_csv(td / "per_sequence.csv")
                for r in ps[ps.layer == "lm_head"].itertuples(index=False):
                    rows.append(_rows_gemm(dev, src, "lm_head", float(r.sequences), s.hidden, s.vocab, float(r.time_us)))
            if (td / "attention.csv").exists():
                att = pd.read_csv(td / "attention.csv")
                att = att[(att.n_decode == 0) | (att.prefill_chunk == 0)]
                for r in att.itertuples(index=False):
                    rows += attention_rows(dev, src, s, int(r.prefill_chunk), int(r.kv_prefill), int(r.n_decode),
                                           int(r.kv_decode), float(r.time_us))
            if (td / "moe.csv").exists() and base.experts:
                moe = pd.read_csv(td / "moe.csv")
                for r in moe.itertuples(index=False):
                    f = 2.0 * r.tokens * base.top_k * 3 * base.hidden * base.moe_inter
                    by = r.activated_experts * 3 * base.hidden * base.moe_inter * 2
                    rows.append(_row(dev, src, "moe", "moe", float(r.tokens), f, 0.0, by, float(r.time_us)))
    return rows


VIDUR_OPS = {"attn_pre_proj": "qkv_proj", "attn_post_proj": "o_proj", "mlp_up_proj": "gate_up_proj",
             "mlp_down_proj": "down_proj", "mlp_act": "act_fn", "input_layernorm": "input_layernorm",
             "post_attention_layernorm": "post_attention_layernorm", "attn_rope": "rotary_emb", "add": "add",
             "emb": "embedding"}
VIDUR_TOKENS = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192}


def vidur_points(ref: Path) -> list[dict]:
    rows = []
    root = ref / "vidur" / "data" / "profiling" / "compute"
    for vdev, dev in VIDUR_DEVICES.items():
        for f in sorted((root / vdev).glob("*/*/mlp.csv")):
            df = pd.read_csv(f)
            r0 = df.iloc[0]
            base = Shape(int(r0.n_embd), int(r0.n_head), int(r0.n_kv_head), int(r0.n_embd) // int(r0.n_head),
                         int(r0.n_expanded_embd), int(r0.vocab_size), gated=bool(r0.use_gated_mlp))
            src = f"vidur {vdev}/{f.parent.parent.name}/{f.parent.name}"
            df = df[df.num_tokens.isin(VIDUR_TOKENS)]
            for tp, g in df.groupby("num_tensor_parallel_workers"):
                s = base.per_rank(int(tp))
                for vop, op in VIDUR_OPS.items():
                    col = f"time_stats.{vop}.median"
                    if col not in g:
                        continue
                    med = g.groupby("num_tokens")[col].median()
                    for T, ms in med.items():
                        if np.isfinite(ms):
                            rows += dense_rows(dev, src, s, op, float(T), float(ms) * 1e3)
    return rows


def measured_points(ref: Path) -> pd.DataFrame:
    return pd.DataFrame(llmservingsim_points(ref) + vidur_points(ref))


# -- the model and its fit --------------------------------------------------------------------


def device_specs(names) -> dict[str, tuple[float, float, float]]:
    """(peak bf16 FLOP/s, memory bandwidth, SM count or NaN) per device, from the datasheets."""
    out = {}
    for n in names:
        d = yaml.safe_load((HARDWARE_DIR / "devices" / f"{n}.yaml").read_text())
        out[n] = (float(d["peak_bf16_flops"]), float(d["memory_bandwidth_Bps"]), float(d.get("sm_count") or "nan"))
    return out


# -- the tile model of attention (simulator/latency/roofline.py) -------------------------------

TILE_KEYS = ("compute_efficiency", "memory_efficiency", "floor_us", "prefill_tile_us", "decode_tile_us")
TILE_BOUNDS = [(0.05, 1.2), (0.1, 1.2), (0.0, 40.0), (0.0, 40.0), (0.0, 40.0)]


def _has_sms(specs: dict, dev: str) -> bool:
    return len(specs[dev]) > 2 and bool(np.isfinite(specs[dev][2]))


def predict_attention_us(df: pd.DataFrame, tiles: dict, specs: dict) -> np.ndarray:
    """Attention times (us) of `df`'s attention rows by the tile model, from each device's spec."""
    p = AttentionTiles.from_dict(tiles)
    peak, bw, sms = (df.device.map(lambda d, i=i: specs[d][i]).to_numpy() for i in range(3))
    n, c, nd, h, kvh, d = (df[k].to_numpy(dtype=float) for k in ("n", "c", "nd", "heads", "kv_heads", "head_dim"))
    pre = prefill_attention_s(n, c, h, d, sms, peak, p)
    dec = decode_attention_s(nd, df.bytes.to_numpy(), kvh, sms, bw, p)
    return (np.where(df.family.to_numpy() == "attn_prefill", pre, dec) + p.floor_s) * 1e6


def fit_attention_tiles(df: pd.DataFrame, specs: dict) -> dict[str, float] | None:
    """The tile model's five constants, minimising the same weighted squared log error as
    `fit_efficiencies` over the attention points of devices with an SM count."""
    d = df[(df.us >= MIN_US) & df.family.isin(ATTN_FAMILIES)]
    d = d[d.device.map(lambda x: _has_sms(specs, x))]
    if d.empty:
        return None
    w = _weights(d)
    logm = np.log(d.us.to_numpy())

    def loss(x):
        return float(np.sum(w * (np.log(predict_attention_us(d, dict(zip(TILE_KEYS, x)), specs)) - logm) ** 2))

    best = None
    for x0 in ([0.5, 0.8, 8.0, 5.0, 3.0], [0.8, 0.95, 12.0, 10.0, 5.0]):
        r = minimize(loss, x0=x0, bounds=TILE_BOUNDS, method="L-BFGS-B")
        best = r if best is None or r.fun < best.fun else best
    return {k: float(v) for k, v in zip(TILE_KEYS, best.x)}


def predict_us(df: pd.DataFrame, eff: dict[str, float], specs: dict) -> np.ndarray:
    peak = df.device.map(lambda d: specs[d][0]).to_numpy()
    bw = df.device.map(lambda d: specs[d][1]).to_numpy()
    comp = df.flops.to_numpy() / (peak * eff["gemm"]) + df.attn_flops.to_numpy() / (peak * eff["attention"])
    mem = df.bytes.to_numpy() / (bw * eff["memory"])
    return np.maximum(comp, mem) * 1e6


def _weights(df: pd.DataFrame) -> np.ndarray:
    """Each (device, family) group weighs the same; inside a group a point weighs by its
    time, so the operators that make up most of a step decide the fit."""
    tot = df.groupby(["device", "family"]).us.transform("sum").to_numpy()
    return df.us.to_numpy() / tot


ATTN_FAMILIES = ("attn_prefill", "attn_decode")


def fit_efficiencies(df: pd.DataFrame, specs: dict) -> dict[str, float]:
    """(gemm, attention, memory) minimising the group-weighted squared log error: GEMM and
    memory on the weight-streaming operators (GEMMs, MoE) first, then the flat attention
    efficiency with those fixed. Attention's KV stream does not pull the memory efficiency:
    the flat model misprices it (no kernel floor, no waves), and the tile model has its own."""
    d = df[(df.us >= MIN_US) & df.family.isin(FIT_FAMILIES)]
    dense, attn = d[~d.family.isin(ATTN_FAMILIES)], d[d.family.isin(ATTN_FAMILIES)]

    def loss_of(part, eff_of):
        w, logm = _weights(part), np.log(part.us.to_numpy())
        return lambda x: float(np.sum(w * (np.log(predict_us(part, eff_of(x), specs)) - logm) ** 2))

    res = minimize(loss_of(dense, lambda x: {"gemm": x[0], "attention": 0.5, "memory": x[1]}),
                   x0=[0.6, 0.8], bounds=[(0.02, 1.0)] * 2, method="L-BFGS-B")
    eff = {"gemm": float(res.x[0]), "attention": 0.5, "memory": float(res.x[1])}
    if len(attn):
        r = minimize(loss_of(attn, lambda x: {**eff, "attention": x[0]}), x0=[0.4], bounds=[(0.02, 1.0)],
                     method="L-BFGS-B")
        eff["attention"] = float(r.x[0])
    return eff


def predict_elementwise_us(df: pd.DataFrame, ew: dict, specs: dict) -> np.ndarray:
    """RooflineModel's element-wise kernels: a floor each, bytes at the learned efficiency."""
    bw = df.device.map(lambda d: specs[d][1]).to_numpy()
    return ew["floor_us"] + df.bytes.to_numpy() / (bw * ew["efficiency"]) * 1e6


def fit_elementwise(df: pd.DataFrame, specs: dict) -> dict[str, float] | None:
    """(floor_us, efficiency) of the element-wise kernels, minimising the squared log error
    over all their measured points (small ones too: the floor is what decode steps see), each
    device weighing the same and its points alike. Only LLMServingSim's points when there are
    any: they time vLLM's fused kernels inside a layer's forward, whose activations sit in L2
    (they run faster than their bytes over DRAM allow), while Vidur times isolated unfused ops
    (a separate residual add) on cold data, which is not what the simulated engine runs."""
    d = df[df.family == "elementwise"]
    own = d[d.source.str.startswith("LLMServingSim")]
    if len(own):
        d = own  # vLLM's own fused kernels inside a layer's forward (Vidur times isolated ops)
    if not len(d):
        return None
    w = 1.0 / d.groupby("device").us.transform("count").to_numpy()
    logm = np.log(d.us.to_numpy())

    def loss(x):
        return float(np.sum(w * (np.log(predict_elementwise_us(d, {"floor_us": x[0], "efficiency": x[1]}, specs))
                                 - logm) ** 2))

    r = minimize(loss, x0=[2.0, 0.6], bounds=[(0.0, 50.0), (0.02, ELEMENTWISE_MAX_EFF)], method="L-BFGS-B")
    return {"floor_us": float(r.x[0]), "efficiency": float(r.x[1])}


def family_errors(df: pd.DataFrame, eff: dict, specs: dict, tiles: dict | None = None,
                  elementwise: dict | None = None) -> dict[str, dict]:
    """Per-family errors; attention by the tile model when `tiles` is given (and the device
    has an SM count), else by the flat efficiencies; element-wise kernels by `elementwise`
    when given, else as bytes at the memory efficiency."""
    d = df[df.us >= MIN_US]
    pred = predict_us(d, eff, specs)
    if elementwise is not None:
        m = (d.family == "elementwise").to_numpy()
        if m.any():
            pred[m] = predict_elementwise_us(d[m], elementwise, specs)
    if tiles is not None:
        m = (d.family.isin(ATTN_FAMILIES) & d.device.map(lambda x: _has_sms(specs, x))).to_numpy()
        if m.any():
            pred[m] = predict_attention_us(d[m], tiles, specs)
    rel = (pred - d.us.to_numpy()) / d.us.to_numpy()
    out = {}
    for fam in FAMILIES:
        m = (d.family == fam).to_numpy()
        if m.any():
            a = np.abs(rel[m]) * 100
            t = d.us.to_numpy()[m]
            out[fam] = {"points": int(m.sum()), "mape_pct": float(a.mean()), "median_abs_pct": float(np.median(a)),
                        "time_weighted_ape_pct": float(np.sum(a * t) / np.sum(t)),
                        "bias_pct": float(np.median(rel[m]) * 100)}
    return out


def attention_fixed_us(df: pd.DataFrame) -> float:
    """The attention kernel's floor: per device the cheapest measured attention, median over devices."""
    a = df[df.family.isin(("attn_prefill", "attn_decode"))]
    return float(a.groupby("device").us.min().median()) if len(a) else 0.0


def leave_one_device_out(df: pd.DataFrame, specs: dict) -> list[dict]:
    rows = []
    for dev in sorted(df.device.unique()):
        train, test = df[df.device != dev], df[df.device == dev]
        eff = fit_efficiencies(train, specs)
        tiles = fit_attention_tiles(train, specs)
        errs = family_errors(test, eff, specs, tiles, fit_elementwise(train, specs))
        flat = family_errors(test, eff, specs)
        base = family_errors(test, DEFAULT_EFF, specs)
        rows.append({"device": dev, "efficiencies": eff, "attention_tiles": tiles, "errors": errs,
                     "flat_errors": flat, "default_errors": base})
    return rows


def loo_table(rows: list[dict]) -> list[str]:
    head = f"{'held-out device':16s} {'learned (gemm/attn/mem)':>24s} " + " ".join(f"{f:>29s}" for f in FAMILIES)
    lines = [head, "-" * len(head)]
    for r in rows:
        e = r["efficiencies"]
        cells = []
        for f in FAMILIES:
            x, b = r["errors"].get(f), r["flat_errors"].get(f)
            cells.append(f"{x['time_weighted_ape_pct']:5.1f}/{x['mape_pct']:5.1f}% ({x['bias_pct']:+4.0f}%) "
                         f"[{b['time_weighted_ape_pct']:3.0f}%]" if x else "n/a")
        lines.append(f"{r['device']:16s} {e['gemm']:>8.2f}/{e['attention']:.2f}/{e['memory']:.2f}      " +
                     " ".join(f"{c:>29s}" for c in cells))
    lines.append(f"cells: time-weighted / plain mean absolute % error of the held-out device's operator times "
                 f"(points >= {MIN_US:.0f} us) predicted from its spec with efficiencies learned on the other devices, "
                 "(median signed error); attention by the tile model learned on the other devices. "
                 "[time-weighted error of the flat roofline, attention as one efficiency, learned the same way]")
    lines += ["", "attention tile model learned without the held-out device: prefill compute efficiency, "
                  "decode memory efficiency, floor / prefill wave / decode wave (us)"]
    for r in rows:
        t = r.get("attention_tiles")
        if t:
            lines.append(f"  {r['device']:16s} {t['compute_efficiency']:.3f}  {t['memory_efficiency']:.3f}  "
                         f"{t['floor_us']:5.1f} / {t['prefill_tile_us']:5.1f} / {t['decode_tile_us']:5.1f}")
    return lines


# -- decode skew --------------------------------------------------------------------------------

SKEW_REGIMES = ("pure", "mixed")


def skew_points(ref: Path) -> pd.DataFrame:
    """LLMServingSim's decode-skew sweeps (skew.csv of each measured table): one layer's attention
    of a batch whose decodes have uneven contexts (t_skew_us), of the same tokens spread evenly
    (t_mean_us) and of every decode at the longest context (t_max_us), in pure-decode and mixed
    steps. Rows of (device, table, regime, t_mean, t_max, t_skew)."""
    frames = []
    for dev, sub, _model, shape, tps in LLMSS:
        if shape is not None:
            continue
        for tp in tps:
            f = ref / "LLMServingSim" / "profiler" / "perf" / sub / f"tp{tp}" / "skew.csv"
            if f.exists():
                d = pd.read_csv(f, usecols=["regime", "t_mean_us", "t_max_us", "t_skew_us"])
                frames.append(d.assign(device=dev, table=f"{sub} tp{tp}"))
    if not frames:
        return pd.DataFrame(columns=["device", "table", "regime", "t_mean_us", "t_max_us", "t_skew_us"])
    d = pd.concat(frames, ignore_index=True)
    return d[(d.t_skew_us > 0) & (d.t_max_us >= d.t_mean_us) & d.regime.isin(SKEW_REGIMES)]


def _skew_alpha(d: pd.DataFrame, w: np.ndarray | None = None) -> float:
    """The alpha of t_skew = t_mean + alpha·(t_max - t_mean) that minimises the squared relative
    error (closed form), clipped to [0, 1]."""
    ds = (d.t_skew_us - d.t_mean_us).to_numpy()
    dm = (d.t_max_us - d.t_mean_us).to_numpy()
    ww = 1.0 / d.t_skew_us.to_numpy() ** 2 * (1.0 if w is None else w)
    den = float(np.sum(ww * dm * dm))
    return float(min(max(np.sum(ww * ds * dm) / den, 0.0), 1.0)) if den > 0 else 0.0


def skew_errors(d: pd.DataFrame, alpha: float) -> dict[str, float]:
    """Errors of the skewed batches' times priced with `alpha` (and with none: the mean context)."""
    t = d.t_skew_us.to_numpy()
    out = {"points": int(len(d))}
    for key, a in (("", alpha), ("_mean_context", 0.0)):
        rel = (d.t_mean_us.to_numpy() + a * (d.t_max_us - d.t_mean_us).to_numpy()) / t - 1.0
        out[f"median_abs_pct{key}"] = float(np.median(np.abs(rel)) * 100)
        out[f"time_weighted_ape_pct{key}"] = float(np.sum(np.abs(rel) * t) / np.sum(t) * 100)
        out[f"bias_pct{key}"] = float(np.median(rel) * 100)
    return out


def fit_decode_skew(d: pd.DataFrame) -> dict | None:
    """Alpha per regime (pure, mixed): each measured device's own, fitted on its tables, and the
    pooled one (each device weighing the same), with their errors; each device's rows priced
    with the other devices' alphas too (leave one device out)."""
    if d.empty:
        return None

    def fit(rows: pd.DataFrame) -> dict[str, float]:
        out = {}
        for reg in SKEW_REGIMES:
            r = rows[rows.regime == reg]
            w = 1.0 / r.groupby("device").device.transform("size").to_numpy()  # devices weigh the same
            out[reg] = _skew_alpha(r, w) if len(r) else 0.0
        return out

    pooled = fit(d)
    devices = {}
    for dev in sorted(d.device.unique()):
        own, rows = fit(d[d.device == dev]), d[d.device == dev]
        others = fit(d[d.device != dev]) if d.device.nunique() > 1 else None
        devices[dev] = {"alpha": own, "tables": sorted(rows.table.unique()),
                        "errors": {reg: skew_errors(rows[rows.regime == reg], own[reg]) for reg in SKEW_REGIMES},
                        "others_alpha": others,
                        "errors_with_others_alpha": None if others is None else
                        {reg: skew_errors(rows[rows.regime == reg], others[reg]) for reg in SKEW_REGIMES}}
    return {"alpha": pooled, "devices": devices,
            "errors": {reg: skew_errors(d[d.regime == reg], pooled[reg]) for reg in SKEW_REGIMES}}


# -- the spec-only profiles -------------------------------------------------------------------

SPEC_ONLY = ("h200", "b200", "mi300x", "l40s")
HOST_NOTE = ("0: no per-step host measurement exists for these devices; the learned efficiencies come "
             "from kernel times only (see hardware/profiles/*.tables of the measured devices)")


def learn(ref: Path) -> dict:
    """Everything the spec-only profiles record: the efficiencies fitted on all measured
    devices, their in-sample errors, the leave-one-device-out table, and the attention floor."""
    df = measured_points(ref)
    specs = device_specs(df.device.unique())
    eff = fit_efficiencies(df, specs)
    tiles = fit_attention_tiles(df, specs)
    ew = fit_elementwise(df, specs)
    loo = leave_one_device_out(df, specs)
    skew = fit_decode_skew(skew_points(ref))
    per_device = {}
    for dev in sorted(df.device.unique()):
        # A measured device's own parameters (what a spec sheet does not say: the offset of
        # its kernels from the datasheet peaks); the tiles and element-wise costs from its own
        # points where it has them, else the pooled ones.
        d = df[df.device == dev]
        de = fit_efficiencies(d, specs)
        dt = fit_attention_tiles(d, specs) if d.family.isin(ATTN_FAMILIES).any() else None
        # (element-wise costs: the pooled fit, on vLLM's in-engine kernels, for every device)
        # (decode skew: a device's own where its skew sweeps were measured, else the pooled one)
        own_skew = (skew or {}).get("devices", {}).get(dev)
        per_device[dev] = {"efficiencies": de, "attention_tiles": dt or tiles, "elementwise": ew,
                           "decode_skew": own_skew["alpha"] if own_skew else (skew or {}).get("alpha"),
                           "own": sorted(set(d.family.unique())),
                           "errors": family_errors(d, de, specs, dt or tiles, ew),
                           "errors_pooled": family_errors(d, eff, specs, tiles, ew)}
    ew_by_source = None  # the element-wise fit's error per source, all its points (small ones too)
    if ew is not None:
        ew_by_source = {}
        for name, part in (("LLMServingSim (fitted on)", df.source.str.startswith("LLMServingSim")),
                           ("vidur (not fitted on)", df.source.str.startswith("vidur"))):
            d = df[(df.family == "elementwise") & part]
            if len(d):
                rel = predict_elementwise_us(d, ew, specs) / d.us.to_numpy() - 1
                ew_by_source[name] = {"points": int(len(d)), "median_abs_pct": float(np.median(np.abs(rel)) * 100),
                                  "bias_pct": float(np.median(rel) * 100)}
    return {"efficiencies": eff, "attention_tiles": tiles, "elementwise": ew, "elementwise_by_source": ew_by_source,
            "decode_skew": skew,
            "per_device": per_device,
            "attention_fixed_us": attention_fixed_us(df),
            "in_sample": family_errors(df, eff, specs, tiles, ew), "in_sample_flat": family_errors(df, eff, specs),
            "leave_one_device_out": loo, "devices": sorted(df.device.unique()),
            "sources": sorted(df.source.unique()), "points": int((df.us >= MIN_US).sum())}


def learned_defaults(learned: dict) -> dict:
    """hardware/roofline-learned.yaml: the learned efficiencies and attention tile model that a
    run given a device name (no profile) uses in place of RooflineModel's assumed starting
    points; the per-step host overhead stays the simulator's default (nothing measured it)."""
    from .common import agentservesim_version, utc_today
    prof = spec_only_profile(None, learned)
    lm = prof["latency_model"]
    for k in ("host_overhead_s", "host_overhead_per_seq_s", "host_overhead_source", "learned"):
        lm.pop(k, None)
    # The measured devices by name: their own fit (the pooled one is for the others)
    lm["devices"] = {dev: {"efficiencies": r["efficiencies"],
                           "attention_tiles": {**r["attention_tiles"], "q_tile": FLASH_Q_TILE} if r["attention_tiles"] else None,
                           "elementwise": r["elementwise"], "decode_skew": r["decode_skew"], "fitted_on": r["own"],
                           "errors": r["errors"], "errors_with_pooled_parameters": r["errors_pooled"]}
                     for dev, r in learned["per_device"].items()}
    return {
        "_header": ("# The roofline's parameters for a device given by name (asim-replay --hardware DEVICE):\n"
                    "# efficiencies, attention tile model and element-wise costs learned from the measured\n"
                    "# devices' operator times (scripts/learn_roofline.py --write): a measured device (devices:)\n"
                    "# takes its own fit, any other the pooled one. `--set latency.gemm_efficiency=...` etc.\n"
                    "# override them; a profile replaces them.\n"),
        "name": "roofline-learned",
        "kind": "learned-roofline",
        "latency_model": lm,
        "provenance": {**prof["provenance"], "written_at": utc_today(), "agentservesim_version": agentservesim_version()},
    }


def _skew_summary(skew: dict | None) -> dict | None:
    """The decode-skew fit as the profiles record it: method, pooled errors, each device's own
    alphas and errors, and its errors with the other devices' alphas."""
    if not skew:
        return None
    return {"method": ("t_skew = t_mean + alpha (t_max - t_mean), squared relative error, closed form, per regime; "
                       "pooled over devices weighted equally"),
            "source": "LLMServingSim profiler/perf/<device>/<model>/bf16/tp<N>/skew.csv (MIT)",
            "errors": skew["errors"],
            "devices": {dev: {"alpha": r["alpha"], "tables": r["tables"], "errors": r["errors"],
                              "errors_with_other_devices_alpha": r["errors_with_others_alpha"]}
                        for dev, r in skew["devices"].items()}}


def spec_only_profile(device: str | None, learned: dict) -> dict:
    from .common import agentservesim_version, utc_today
    dev = yaml.safe_load((HARDWARE_DIR / "devices" / f"{device}.yaml").read_text()) if device else None
    eff = learned["efficiencies"]
    loo = {r["device"]: {"efficiencies": r["efficiencies"], "attention_tiles": r["attention_tiles"],
                         "errors": r["errors"], "flat_attention_errors": {
                             f: r["flat_errors"][f] for f in ATTN_FAMILIES if f in r["flat_errors"]}}
           for r in learned["leave_one_device_out"]}
    tiles = {**learned["attention_tiles"], "q_tile": FLASH_Q_TILE} if learned["attention_tiles"] else None
    return {
        "_header": ("# Spec-only profile: RooflineModel with efficiencies learned from the measured devices'\n"
                    "# operator times (scripts/learn_roofline.py). Not measured on this device.\n"),
        "name": f"{device}-roofline-learned",
        "kind": "spec-profile",
        "device": dev,
        "latency_model": {
            "kind": "roofline",
            "efficiencies": {"gemm": eff["gemm"], "attention": eff["attention"], "memory": eff["memory"]},
            # Attention by the tile model (simulator/latency/roofline.py) when the device has an
            # SM count; `efficiencies.attention` (the flat roofline) otherwise.
            "attention_tiles": tiles,
            # Element-wise kernels (norms, RoPE, activation, embedding): a floor each and their
            # bytes at a learned fraction of the bandwidth
            "elementwise": learned.get("elementwise"),
            # Uneven decode contexts in a batch: alpha of the way from the mean context's attention
            # time to the longest's, pure and mixed steps (LLMServingSim's skew sweeps; applied on
            # FlashAttention-2 devices, where they were measured)
            "decode_skew": (learned.get("decode_skew") or {}).get("alpha"),
            "host_overhead_s": 0.0,
            "host_overhead_per_seq_s": 0.0,
            "host_overhead_source": HOST_NOTE,
            "learned": {**eff, "attention_fixed_us": learned["attention_fixed_us"], "attention_tiles": tiles,
                        "decode_skew": (learned.get("decode_skew") or {}).get("alpha")},
            "fit": {"method": ("squared log error over operator times >= %g us of the measured devices, each "
                               "(device, family) group weighted equally and points by time; elementwise ops "
                               "fitted apart (a floor per kernel and bytes at an efficiency, over all LLMServingSim's "
                               "points, small ones too, each device weighing the same; elementwise_by_source); "
                               "attention_tiles fitted the same way on the "
                               "attention points alone") % MIN_US,
                    "elementwise_by_source": learned.get("elementwise_by_source"),
                    "decode_skew": _skew_summary(learned.get("decode_skew")),
                    "devices": learned["devices"], "points": learned["points"], "in_sample": learned["in_sample"],
                    "in_sample_flat_attention": {f: learned["in_sample_flat"][f] for f in ATTN_FAMILIES
                                                 if f in learned["in_sample_flat"]},
                    "leave_one_device_out": loo},
        },
        "provenance": {"measured_from": learned["sources"],
                       "licences": {"casys-kaist/LLMServingSim": "MIT", "microsoft/vidur": "MIT"},
                       "command": "python scripts/learn_roofline.py --write", "written_at": utc_today(),
                       "agentservesim_version": agentservesim_version()},
    }
