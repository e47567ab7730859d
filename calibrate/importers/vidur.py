"""Import Vidur's profiles (microsoft/vidur, MIT) as `operators` profiles and fitted
interconnect curves.

Input: a Vidur checkout (or the copy in ../shared/reference/vidur):
`data/profiling/compute/<device>/<org>/<model>/mlp.csv` — per-layer non-attention operator
times (ms; min/max/mean/median/std) by `num_tokens` and `num_tensor_parallel_workers`
(emb, input_layernorm, attn_pre_proj, attn_rope, attn_post_proj, post_attention_layernorm,
mlp_up_proj, mlp_act, mlp_down_proj, add), measured per tensor-parallel degree at the
per-rank shapes on Vidur's own profiling harness (sarathi-serve model code, not vLLM);
`data/profiling/network/<topology>/{all_reduce,send_recv}.csv` — collective time (ms) by
`size` (bytes), `num_workers` and `devices_per_node`.

What the stored Vidur data lacks, and what stands in for it (the profile says so):
- attention (`attention.csv` is >= 4 MiB upstream and was not stored): a table on
  LLMServingSim's grid synthesized from the device spec with the roofline efficiencies
  learned from the measured devices (the `learned:` block of
  hardware/profiles/*-roofline-learned.yaml, scripts/learn_roofline.py);
- lm_head and sampler: synthesized the same way (GEMM at the device's own fitted GEMM
  efficiency, from its dense operators here);
- the final norm: taken equal to Vidur's input_layernorm (the same RMSNorm kernel).
The median of the per-row medians is used where Vidur repeats a grid point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from simulator.hardware import HARDWARE_DIR, ModelArch
from simulator.latency.roofline import (AttentionTiles, decode_attention_s, fa2_mixed_decodes_s,
                                         flash_attention_version, prefill_attention_s)

from .common import (ImportError_, agentservesim_version, choose_interp, fit_curves, loo_errors, model_shape,
                     resolve_model, sum_loo, summarize_errors, utc_today)

REPO = "microsoft/vidur"
LICENCE = "MIT"
COMMIT = "7d47513363ec447a741ac5e47241580b47724fbf"  # ../shared/reference/README.md (profiling data)

# Vidur operator -> our operator name; count per layer (None: once per step).
OPS = {"attn_pre_proj": ("qkv_proj", 1), "attn_post_proj": ("o_proj", 1), "mlp_up_proj": ("gate_up_proj", 1),
       "mlp_act": ("act_fn", 1), "mlp_down_proj": ("down_proj", 1), "input_layernorm": ("input_layernorm", 1),
       "post_attention_layernorm": ("post_attention_layernorm", 1), "attn_rope": ("rotary_emb", 1),
       # Vidur's model adds the residual after attention and after the MLP (vLLM fuses it into the norm).
       "add": ("add", 2), "emb": ("embedding", None)}
DEVICES = {"a100": "a100-80gb-sxm", "h100": "h100-sxm", "a40": "a40"}
# Vidur network topology folder per device (our device files describe HGX/DGX boards).
TOPOLOGY = {"a100-80gb-sxm": "a100_dgx", "h100-sxm": "h100_dgx", "a40": "a40_pairwise_nvlink"}
INTERCONNECTS = {  # fitted file -> (topology folder, base link file it refines)
    "nvlink3-dgx-a100-fitted": ("a100_dgx", "nvlink3"),
    "nvlink3-pairwise-a100-fitted": ("a100_pairwise_nvlink", "nvlink3"),
    "nvlink4-dgx-h100-fitted": ("h100_dgx", "nvlink4"),
    "nvlink4-pairwise-h100-fitted": ("h100_pairwise_nvlink", "nvlink4"),
    "nvlink3-pairwise-a40-fitted": ("a40_pairwise_nvlink", None),
}
DEVICE_INTERCONNECT = {"a100-80gb-sxm": "nvlink3-dgx-a100-fitted", "h100-sxm": "nvlink4-dgx-h100-fitted"}

# The attention / per-sequence grid synthesized for the missing tables (LLMServingSim's grid).
CHUNKS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
KVS = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
NDEC = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
SEQS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


# -- collectives ------------------------------------------------------------------------------


def _curve_points(df: pd.DataFrame, col: str) -> tuple[list[float], list[float]]:
    g = df.groupby("size")[col].median().sort_index()
    return [float(x) for x in g.index], [float(v) * 1e3 for v in g.values]  # ms -> µs


def fit_collective_curves(topology_dir: Path) -> dict[str, Any]:
    """{all_reduce: {curves: {n: {bytes, time_us, interp}}, fit: {n: cv}}, send_recv: ...}:
    one curve per GPU count (intra-node: devices_per_node == num_workers) for all-reduce,
    and intra-/inter-node curves for send/recv; interpolation chosen by leave-one-out."""
    out: dict[str, Any] = {}
    f = topology_dir / "all_reduce.csv"
    if f.exists():
        df = pd.read_csv(f)
        curves, fit = {}, {}
        for n in sorted(df.num_workers.unique()):
            sub = df[(df.num_workers == n) & (df.devices_per_node == n)]
            if len(sub) < 4:
                continue
            xs, ys = _curve_points(sub, "time_stats.all_reduce.median")
            best, scores = choose_interp(xs, ys)
            curves[int(n)] = {"bytes": xs, "time_us": ys, "interp": best}
            fit[int(n)] = {**summarize_errors(loo_errors(xs, ys, best)),
                           "cv_mape_pct": {k: round(v * 100, 3) for k, v in scores.items()}}
        out["all_reduce"] = {"curves": curves, "fit": fit}
    f = topology_dir / "send_recv.csv"
    if f.exists():
        df = pd.read_csv(f)
        curves, fit = {}, {}
        for dpn, label in ((2, "intra_node"), (1, "inter_node")):
            sub = df[df.devices_per_node == dpn]
            if len(sub) < 4:
                continue
            xs, ys = _curve_points(sub, "time_stats.send_recv.median")
            best, scores = choose_interp(xs, ys)
            curves[label] = {"bytes": xs, "time_us": ys, "interp": best}
            fit[label] = {**summarize_errors(loo_errors(xs, ys, best)),
                          "cv_mape_pct": {k: round(v * 100, 3) for k, v in scores.items()}}
        out["send_recv"] = {"curves": curves, "fit": fit}
    return out


def vidur_interconnect(vidur_dir, name: str) -> dict[str, Any]:
    """A hardware/interconnects entry: the base link's spec plus the fitted curves."""
    topo, base = INTERCONNECTS[name]
    coll = fit_collective_curves(Path(vidur_dir) / "data" / "profiling" / "network" / topo)
    if not coll:
        raise ImportError_(f"no collectives under {topo}")
    d: dict[str, Any] = {}
    if base:
        d = yaml.safe_load((HARDWARE_DIR / "interconnects" / f"{base}.yaml").read_text())
    d = {**d, "name": name, "kind": d.get("kind", "nvlink")}
    if "bandwidth_Bps" not in d:  # A40 NVLink bridge: 112.5 GB/s bidirectional per pair (A40 datasheet)
        d.update(bandwidth_Bps=56.25e9, latency_s=_small_latency(coll), allreduce_algo_bw_efficiency=0.8)
    d["source"] = (f"{d.get('source', '')} ; collective curves fitted on {REPO} (MIT) "
                   f"data/profiling/network/{topo} at {COMMIT[:7]}").strip(" ;")
    d["collectives"] = {k: {"curves": v["curves"], "fit": v["fit"],
                            "method": "median time per message size; interpolation chosen by leave-one-out"}
                        for k, v in coll.items()}
    d["provenance"] = {"source_repo": REPO, "source_path": f"data/profiling/network/{topo}", "commit": COMMIT,
                       "licence": LICENCE, "imported_by": "calibrate.importers.vidur.vidur_interconnect",
                       "imported_at": utc_today()}
    return d


def _small_latency(coll: dict) -> float:
    c = (coll.get("send_recv") or {}).get("curves", {}).get("intra_node")
    return float(c["time_us"][0]) * 1e-6 if c else 1e-5


def write_interconnect(d: dict, path) -> Path:
    from .common import _plain
    path = Path(path)
    header = (f"# Fitted collective curves from {REPO} ({LICENCE}) network profiles; written by "
              f"calibrate/importers/vidur.py. Link fields as in the base interconnect file.\n")
    if d.get("vllm_custom_all_reduce"):
        header += ("# vllm_custom_all_reduce: copied from the base interconnect file, whose comment says what was "
                   "measured and where.\n")
    path.write_text(header + yaml.safe_dump(_plain(d), sort_keys=False, default_flow_style=None, width=110))
    return path


# -- compute ----------------------------------------------------------------------------------


def read_mlp(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise ImportError_(f"{path}: not found")
    return pd.read_csv(path)


def _dense_points(df: pd.DataFrame, tp: int) -> dict[str, list[tuple[float, float]]]:
    sub = df[df.num_tensor_parallel_workers == tp]
    pts = {}
    for vop, (op, _count) in OPS.items():
        col = f"time_stats.{vop}.median"
        if col not in sub:
            continue
        g = sub.groupby("num_tokens")[col].median().sort_index()
        pts[op] = [(float(t), float(v) * 1e3) for t, v in g.items() if np.isfinite(v)]
    if "input_layernorm" in pts:
        pts["final_layernorm"] = list(pts["input_layernorm"])
    return pts


def device_gemm_efficiency(dense_pts: dict, arch: ModelArch, tp: int, peak: float) -> float:
    """The device's own GEMM efficiency: median achieved FLOP/s over the compute-bound
    points (>= 1024 tokens) of its projection GEMMs, as a fraction of the spec peak."""
    shapes = gemm_shapes(arch, tp)
    effs = []
    for op, (k, n) in shapes.items():
        for t, us in dense_pts.get(op, []):
            if t >= 1024 and us > 0:
                effs.append(2.0 * t * k * n / (us * 1e-6) / peak)
    return float(np.median(effs)) if effs else 0.7


def gemm_shapes(arch: ModelArch, tp: int) -> dict[str, tuple[int, int]]:
    """(K, N) of each projection GEMM per rank."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_heads * d // tp, max(arch.num_kv_heads // tp, 1) * d
    inter = (arch.moe_intermediate_size if arch.is_moe else arch.intermediate_size) // tp
    return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * inter), "down_proj": (inter, h)}


def synth_attention(arch: ModelArch, tp: int, device: dict, eff: dict) -> list[dict]:
    """One-layer attention times (µs) on the grid from the learned roofline, for prefill alone,
    decode alone and, on FlashAttention-2 devices, mixed steps (their decodes as query tiles;
    elsewhere a mixed step is prefill + decode, as the H100's FA3 table measures). With the learned tile model (`eff["attention_tiles"]`) and the
    device's SM count: FlashAttention's blocks in waves over the SMs plus the kernel floor
    (simulator/latency/roofline.py); else max(FLOPs / (peak·e_a), KV bytes / (bw·e_m)) + the
    fixed kernel cost."""
    peak, bw = float(device["peak_bf16_flops"]), float(device["memory_bandwidth_Bps"])
    ea, em, c0 = float(eff["attention"]), float(eff["memory"]), float(eff.get("attention_fixed_us", 0.0))
    heads, kvh = arch.num_heads // tp, max(arch.num_kv_heads // tp, 1)
    d, b = arch.head_dim, arch.dtype_bytes
    kv_tok = 2 * kvh * d * b
    sms = device.get("sm_count")
    tiles = AttentionTiles.from_dict(eff["attention_tiles"]) if eff.get("attention_tiles") and sms else None

    def prefill(n, c):
        if tiles is not None:
            return float(prefill_attention_s(n, c, heads, d, float(sms), peak, tiles) + tiles.floor_s) * 1e6
        f = 4.0 * heads * d * n * (c + (n + 1) / 2)
        by = kv_tok * (c + n) + 2 * n * heads * d * b
        return max(f / (peak * ea), by / (bw * em)) * 1e6 + c0

    def decode(nd, kd):
        if tiles is not None:
            return float(decode_attention_s(nd, kv_tok * nd * (kd + 1), kvh, float(sms), bw, tiles) + tiles.floor_s) * 1e6
        f = 4.0 * heads * d * nd * (kd + 1)
        by = kv_tok * nd * (kd + 1)
        return max(f / (peak * ea), by / (bw * em)) * 1e6 + c0

    rows = []
    for pc in CHUNKS:
        for kp in KVS:
            rows.append({"tp": tp, "prefill_chunk": pc, "kv_prefill": kp, "n_decode": 0, "kv_decode": 0,
                         "time_us": prefill(pc, kp)})
    for nd in NDEC:
        for kd in KVS[1:]:
            rows.append({"tp": tp, "prefill_chunk": 0, "kv_prefill": 0, "n_decode": nd, "kv_decode": kd,
                         "time_us": decode(nd, kd)})
    if tiles is not None and flash_attention_version(device) == 2:
        # FlashAttention 2 runs a mixed step's decodes as query tiles per query head, their GQA
        # re-reads past L2 from DRAM (RooflineModel's pricing): mixed rows, the decodes' share
        # the same at every chunk, at the grid's corner chunks and contexts
        l2 = float(device.get("l2_cache_bytes") or 0.0)
        for nd in NDEC:
            for kd in KVS[1:]:
                x = fa2_mixed_decodes_s(nd, float(kd), heads, kvh, d, kv_tok, l2, float(sms), peak, bw, tiles) * 1e6
                for pc in (CHUNKS[0], CHUNKS[-1]):
                    for kp in (KVS[0], KVS[-1]):
                        rows.append({"tp": tp, "prefill_chunk": pc, "kv_prefill": kp, "n_decode": nd,
                                     "kv_decode": kd, "time_us": prefill(pc, kp) + x})
    return rows


def synth_per_sequence(arch: ModelArch, tp: int, device: dict, eff: dict, gemm_eff: float) -> list[dict]:
    peak, bw = float(device["peak_bf16_flops"]), float(device["memory_bandwidth_Bps"])
    em, c0 = float(eff["memory"]), float(eff.get("attention_fixed_us", 0.0))
    h, v, b = arch.hidden_size, arch.vocab_size // tp, arch.dtype_bytes
    rows = []
    for s in SEQS:
        lm = max(2.0 * s * h * v / (peak * gemm_eff), (h * v + s * (h + v)) * b / (bw * em)) * 1e6 + c0
        # greedy sampling: argmax over fp32 logits (read once)
        smp = s * v * 4 / (bw * em) * 1e6 + c0
        rows.append({"tp": tp, "op": "lm_head", "sequences": s, "time_us": lm})
        rows.append({"tp": tp, "op": "sampler", "sequences": s, "time_us": smp})
    return rows


def learned_efficiencies(path: Path | None = None) -> dict:
    """The efficiencies scripts/learn_roofline.py learned (every *-roofline-learned profile
    carries the same `learned:` block)."""
    cands = [path] if path else sorted((HARDWARE_DIR / "profiles").glob("*-roofline-learned.yaml"))
    for f in cands:
        if f and f.exists():
            return dict(yaml.safe_load(f.read_text())["latency_model"]["learned"])
    raise ImportError_("no *-roofline-learned profile in hardware/profiles: run scripts/learn_roofline.py --write "
                       "first (or pass efficiencies=)")


def import_vidur(vidur_dir, device: str = "h100", model: str = "meta-llama/Llama-2-7b-hf", *, served_model=None,
                 name: str | None = None, efficiencies: dict | None = None, tp_degrees=None) -> dict[str, Any]:
    """An `operators` profile from Vidur's compute profile of `model` on `device` (Vidur's
    names: a100, h100, a40). Attention and per-sequence tables are synthesized (see the
    module doc) from `efficiencies` (default: hardware/profiles/roofline-learned.yaml)."""
    root = Path(vidur_dir)
    df = read_mlp(root / "data" / "profiling" / "compute" / device / model / "mlp.csv")
    model_name, arch = resolve_model(served_model, model)
    vshape = df.iloc[0]
    if int(vshape.n_embd) != arch.hidden_size or int(vshape.n_head) != arch.num_heads or \
            int(vshape.n_kv_head) != arch.num_kv_heads or int(vshape.n_expanded_embd) != arch.intermediate_size:
        raise ImportError_(f"{model}: Vidur's shapes differ from {model_name}'s")
    dev_name = DEVICES.get(device, device)
    f = HARDWARE_DIR / "devices" / f"{dev_name}.yaml"
    if not f.exists():
        raise ImportError_(f"device file not found: {f}")
    dev = yaml.safe_load(f.read_text())
    ic = DEVICE_INTERCONNECT.get(dev_name)
    if ic and (HARDWARE_DIR / "interconnects" / f"{ic}.yaml").exists():
        dev["intra_node_link"] = ic
    eff = efficiencies or learned_efficiencies()
    degrees = sorted(int(t) for t in df.num_tensor_parallel_workers.unique())
    degrees = [t for t in degrees if tp_degrees is None or t in tp_degrees]
    per_layer = {op: c for op, c in OPS.values() if c}
    per_step = {"embedding": 1, "final_layernorm": 1}
    rows: dict[str, list[dict]] = {"dense": [], "per_sequence": [], "attention": [], "moe": []}
    fit: dict[str, Any] = {"method": "leave-one-grid-point-out (see calibrate/importers/common.py)"}
    interp_by_tp = {}
    for tp in degrees:
        pts = _dense_points(df, tp)
        ops = {op: pts[op] for op in list(per_layer) + list(per_step) if op in pts}
        interp, rep = fit_curves(ops)
        interp_by_tp[tp] = interp
        g_eff = device_gemm_efficiency(pts, arch, tp, float(dev["peak_bf16_flops"]))
        fit[f"tp{tp}"] = {"operators": rep, "dense_layer_sum": summarize_errors(sum_loo(ops, per_layer, interp)),
                          "device_gemm_efficiency": g_eff,
                          "attention": ("synthesized (roofline: learned tile model of attention, this device's SM count): no CV"
                                        if eff.get("attention_tiles") and dev.get("sm_count") else
                                        "synthesized (roofline, learned efficiencies): no CV"),
                          "per_sequence": "synthesized (roofline, this device's GEMM efficiency): no CV"}
        for op, p in ops.items():
            for x, y in p:
                rows["dense"].append({"tp": tp, "op": op, "tokens": int(x), "time_us": y})
        rows["attention"] += synth_attention(arch, tp, dev, eff)
        rows["per_sequence"] += synth_per_sequence(arch, tp, dev, eff, g_eff)
    stem = name or f"{dev_name}-{model_name}"
    spec: dict[str, Any] = {
        "kind": "operators",
        "units": "tables in microseconds for one decoder layer on one GPU at per-rank shapes; step times in seconds",
        "tp_degrees": degrees,
        "model_shape": model_shape(arch),
        "profiled_num_hidden_layers": 1,
        "operators": {"per_layer": per_layer, "per_step": per_step, "per_sequence": ["lm_head", "sampler"],
                      "interp_by_tp": interp_by_tp},
        "allreduces_per_layer": 2,
        "collectives": {"all_reduce": ({"interconnect": ic, "source": f"hardware/interconnects/{ic}.yaml"} if ic else
                                       {"source": "none measured: the intra-node link's spec"})},
        "host_overhead_s": 0.0,
        "host_overhead_per_seq_s": 0.0,
        "host_overhead_source": ("0: Vidur's cpu_overhead profiles are not in the stored data; nothing else "
                                 "measures it for this device."),
        "synthesized": {"attention": {"from": "roofline", "efficiencies": eff,
                                      "source": "hardware/profiles/*-roofline-learned.yaml (scripts/learn_roofline.py)"},
                        "per_sequence": {"from": "roofline", "gemm_efficiency": "this device's, fitted on its dense GEMMs"},
                        "final_layernorm": "Vidur's input_layernorm (same kernel)"},
        "tables": rows,
        "fit": fit,
    }
    skew = eff.get("decode_skew")
    if skew and flash_attention_version(dev) == 2:
        # uneven decode contexts on FlashAttention 2, as the roofline prices them (the learned
        # alphas of LLMServingSim's skew sweeps: pure-decode and mixed steps)
        spec["skew"] = {"alpha": {tp: float(skew["pure"]) for tp in degrees},
                        "alpha_mixed": {tp: float(skew["mixed"]) for tp in degrees},
                        "source": "decode_skew of hardware/profiles/*-roofline-learned.yaml (fit_decode_skew on "
                                  "LLMServingSim's skew.csv, FlashAttention-2 devices)"}
    prov = {"source_repo": REPO, "source_path": f"data/profiling/compute/{device}/{model}/mlp.csv", "commit": COMMIT,
            "licence": LICENCE, "engine": "Vidur profiling harness (sarathi-serve model code on PyTorch; not vLLM)",
            "vllm_version": None, "profiled_at": "not recorded in the data", "model": model,
            "imported_by": "calibrate.importers.vidur.import_vidur", "imported_at": utc_today(),
            "agentservesim_version": agentservesim_version(),
            "command": f"asim-calibrate import vidur <vidur> --device {device} --model {model}"}
    return {
        "_header": (f"# Operator profile imported from {REPO} ({LICENCE}) {prov['source_path']} at {COMMIT[:7]}.\n"
                    f"# Dense operators measured; attention and lm_head/sampler synthesized from the learned roofline.\n"
                    f"# Written by calibrate/importers; tables in {stem}.tables/. Do not edit by hand.\n"),
        "name": stem, "kind": "imported-profile", "device": dev,
        "engine": {"block_size": 16},
        "model": {"name": model_name, "hf_id": model, **model_shape(arch), "num_layers": arch.num_layers},
        "latency_model": spec, "provenance": prov,
    }


# (profile name, vidur device, vidur model, our model)
VIDUR_PROFILES = [
    ("h100-sxm-llama-2-7b", "h100", "meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    ("a100-80gb-sxm-llama-2-7b", "a100", "meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    ("a100-80gb-sxm-llama-3.1-8b", "a100", "meta-llama/Meta-Llama-3-8B", "llama-3.1-8b"),
    ("a100-80gb-sxm-llama-3.1-70b", "a100", "meta-llama/Meta-Llama-3-70B", "llama-3.1-70b"),
    ("a40-llama-2-7b", "a40", "meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    # Vidur has no Llama-3 70B on H100; Llama-2-70B's decoder layers have the same shapes
    # (hidden 8192, 64 heads, 8 KV heads, head 128, intermediate 28672), which check_model
    # verifies. The vocabularies differ (32,000 vs 128,256): the embedding is a gather whose
    # time hardly depends on it, and lm_head/sampler are synthesized for the served model.
    ("h100-sxm-llama-3.1-70b", "h100", "meta-llama/Llama-2-70b-hf", "llama-3.1-70b"),
]


def build_vidur(ref: Path, out: Path, links_out: Path | None = None) -> None:
    """Vidur's fitted links into `links_out` (default: hardware/interconnects/) and its compute
    profiles into `out`."""
    from .common import write_profile
    root = ref / "vidur"
    links_out = Path(links_out) if links_out is not None else HARDWARE_DIR / "interconnects"
    links_out.mkdir(parents=True, exist_ok=True)
    for name in INTERCONNECTS:
        p = write_interconnect(vidur_interconnect(root, name), links_out / f"{name}.yaml")
        print(f"wrote {p}")
    for name, device, model, ours in VIDUR_PROFILES:
        prof = import_vidur(root, device, model, served_model=ours, name=name)
        print(f"wrote {write_profile(prof, out / f'{name}.yaml')}")
