"""Import an LLMServingSim operator profile (casys-kaist/LLMServingSim, MIT) as an
`operators` latency profile.

Input: one profile variant folder, `profiler/perf/<HW>/<org>/<model>/<variant>/`:
`meta.yaml` (vLLM version, GPU, engine flags, sweep grids) and per tensor-parallel degree
`tp<N>/dense.csv` (layer, tokens, time_us), `per_sequence.csv` (layer, sequences, time_us),
`attention.csv` (prefill_chunk, kv_prefill, n_decode, kv_decode, time_us) and, for MoE
models, `moe.csv` (tokens, activated_experts, time_us). Its profiler runs vLLM with dummy
weights, `enforce_eager`, and `hf_overrides.num_hidden_layers = 1`, so every time is one
decoder layer; a TP degree N is profiled on one GPU at the per-rank shapes (heads, KV heads,
intermediate size and vocab divided by N: `engine_effective.hf_overrides` of the last degree
shows them), so the tables hold no communication. `moe.csv` counts `activated_experts` as
the number of distinct experts that receive at least one token (the profiler forces the
routing: `profiler/core/hooks/moe_hook.py`).

Which operators run per layer and per step comes from the architecture's `sequence:` in
`profiler/models/<architecture>.yaml` beside the profiles (defaults below otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from simulator.hardware import HARDWARE_DIR

from .common import (ImportError_, agentservesim_version, attention_cv, fit_curves, model_shape, moe_cv,
                     resolve_model, sum_loo, summarize_errors, utc_today)

REPO = "casys-kaist/LLMServingSim"
LICENCE = "MIT"
# Commits of the stored copies (../shared/reference/README.md): main at 5daddb2 holds the
# RTX 4090 and RTX PRO 6000 profiles; the H100 Qwen3.6 profile is PR #34's head.
COMMITS = {"default": "5daddb21a545658d5150b535712d0494584b5278",
           "H100/Qwen/Qwen3.6-35B-A3B": "e1b753b67f1f460e941a433a386aad1f1ffaa636"}
# LLMServingSim hardware names -> hardware/devices entries.
DEVICES = {"RTX4090": "rtx4090", "RTXPRO6000": "rtx-pro-6000", "H100": "h100-sxm", "A6000": None,
           "RTX3090": None}

# sequence: from profiler/models/{llama,qwen3,qwen3_moe,mixtral,phimoe}.yaml at 5daddb2 and
# qwen3_next.yaml at e1b753b, used when the architecture file is not beside the profile.
DEFAULT_SEQUENCES = {
    "llama": {"prologue": ["embedding"], "pre_attn": ["layernorm", "qkv_proj", "rotary_emb", "attention"],
              "post_attn": ["o_proj", "layernorm"], "mlp_dense": ["gate_up_proj", "act_fn", "down_proj"],
              "mlp_moe": [], "head": ["final_layernorm", "lm_head", "sampler"]},
    "qwen3": {"prologue": ["embedding"], "pre_attn": ["layernorm", "qkv_proj", "qk_norm", "rotary_emb", "attention"],
              "post_attn": ["o_proj", "layernorm"], "mlp_dense": ["gate_up_proj", "act_fn", "down_proj"],
              "mlp_moe": [], "head": ["final_layernorm", "lm_head", "sampler"]},
    "qwen3_moe": {"prologue": ["embedding"],
                  "pre_attn": ["layernorm", "qkv_proj", "qk_norm", "rotary_emb", "attention"],
                  "post_attn": ["o_proj", "layernorm"], "mlp_dense": [], "mlp_moe": ["moe"],
                  "head": ["final_layernorm", "lm_head", "sampler"]},
    "qwen3_next": {"prologue": ["embedding"],
                   "pre_attn": ["layernorm", "linear_attention", "qkv_proj", "qk_norm", "rotary_emb", "attention"],
                   "post_attn": ["o_proj", "layernorm"], "mlp_dense": [], "mlp_moe": ["moe"],
                   "head": ["final_layernorm", "lm_head", "sampler"]},
}
for _arch in ("mixtral", "phimoe"):
    DEFAULT_SEQUENCES[_arch] = {"prologue": ["embedding"], "pre_attn": ["layernorm", "qkv_proj", "rotary_emb", "attention"],
                                "post_attn": ["o_proj", "layernorm"], "mlp_dense": [], "mlp_moe": ["moe"],
                                "head": ["final_layernorm", "lm_head", "sampler"]}
PER_SEQUENCE_OPS = ("lm_head", "sampler")
NOT_DENSE = {"attention", "moe", *PER_SEQUENCE_OPS}

HOST_OVERHEAD_NOTE = (
    "0: no per-step host measurement exists in the stored sources (vidur's cpu_overhead profiles are not "
    "stored; LLMServingSim profiles kernels only). vLLM 0.19 runs with async scheduling on (the recorded "
    "runs' resolved config: scheduler_config.async_scheduling true), which overlaps step N+1's CPU work "
    "(schedule, input preparation) with step N's GPU work, so a GPU-bound step shows no host term. "
    "The tables are eager-mode kernel times (enforce_eager), which already carry per-kernel launch gaps.")


def read_meta(d: Path) -> dict:
    f = d / "meta.yaml"
    if not f.exists():
        raise ImportError_(f"{d}: not an LLMServingSim profile folder (no meta.yaml)")
    return yaml.safe_load(f.read_text()) or {}


# Hybrid models (qwen3_next: Qwen3-Next / Qwen3.5 / Qwen3.6): the sequence lists the ops of
# both kinds of layer. vLLM's Qwen3NextDecoderLayer runs either GatedDeltaNetAttention (one
# `linear_attention` op here, with its own projections) or Qwen3NextAttention (qkv_proj,
# q/k norm, rotary, attention, o_proj); norms and the MoE block run in every layer.
LINEAR_ATTENTION_OPS = ("linear_attention",)
ATTENTION_BLOCK_OPS = ("qkv_proj", "qk_norm", "rotary_emb", "o_proj")


def _models_dir_file(d: Path, arch: str) -> Path | None:
    """profiler/models/<arch>.yaml of the checkout the profile folder
    (profiler/perf/<HW>/<org>/<model>/<variant>) is in."""
    for up in d.resolve().parents:
        if up.name == "profiler":
            f = up / "models" / f"{arch}.yaml"
            return f if f.exists() else None
    return None


def split_hybrid(per_layer: dict[str, int]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(ops of every layer, ops of the attention layers, ops of the linear-attention layers)
    of a hybrid model's per-layer op counts; a model without linear attention keeps all in the
    first."""
    if not any(op in per_layer for op in LINEAR_ATTENTION_OPS):
        return per_layer, {}, {}
    every = {op: n for op, n in per_layer.items() if op not in LINEAR_ATTENTION_OPS + ATTENTION_BLOCK_OPS}
    attn = {op: n for op, n in per_layer.items() if op in ATTENTION_BLOCK_OPS}
    lin = {op: n for op, n in per_layer.items() if op in LINEAR_ATTENTION_OPS}
    return every, attn, lin


def op_counts(d: Path, arch: str) -> tuple[dict[str, int], dict[str, int]]:
    """(per-layer op counts, per-step op counts) of the non-attention, non-per-sequence ops."""
    seq = None
    f = _models_dir_file(d, arch)
    if f is not None:
        seq = (yaml.safe_load(f.read_text()) or {}).get("sequence")
    if seq is None:
        seq = DEFAULT_SEQUENCES.get(arch)
    if seq is None:
        raise ImportError_(f"unknown architecture {arch!r} and no profiler/models/{arch}.yaml beside the profile")
    per_layer: dict[str, int] = {}
    for part in ("pre_attn", "post_attn", "mlp_dense"):
        for op in seq.get(part) or []:
            if op not in NOT_DENSE:
                per_layer[op] = per_layer.get(op, 0) + 1
    per_step: dict[str, int] = {}
    for part in ("prologue", "head"):
        for op in seq.get(part) or []:
            if op not in NOT_DENSE:
                per_step[op] = per_step.get(op, 0) + 1
    return per_layer, per_step


def _commit_for(d: Path) -> str:
    s = str(d)
    for key, c in COMMITS.items():
        if key != "default" and key in s:
            return c
    return COMMITS["default"]


def _device_entry(hw: str, device: str | None) -> dict:
    name = device or DEVICES.get(hw)
    if not name:
        raise ImportError_(f"no hardware/devices entry for LLMServingSim hardware {hw!r}; pass device=")
    f = HARDWARE_DIR / "devices" / f"{name}.yaml"
    if not f.exists():
        raise ImportError_(f"device file not found: {f}")
    return yaml.safe_load(f.read_text())


def read_tp_tables(d: Path, tp: int) -> dict[str, pd.DataFrame]:
    td = d / f"tp{tp}"
    out = {}
    for name in ("dense", "per_sequence", "attention", "moe"):
        f = td / f"{name}.csv"
        if f.exists():
            out[name] = pd.read_csv(f)
    return out


def import_llmservingsim(profile_dir, *, model=None, name: str | None = None, device: str | None = None,
                         tp_degrees: list[int] | None = None, expert_parallel: int = 1,
                         host_overhead_s: float = 0.0, host_overhead_note: str = HOST_OVERHEAD_NOTE,
                         commit: str | None = None, intra_node_link: tuple[str, str] | None = None) -> dict[str, Any]:
    """An `operators` profile (a dict; `write_profile` writes it) from an LLMServingSim
    profile folder. `model`: a hardware/models name or config.json (default: looked up by
    the profile's HF id); `expert_parallel`: EP degree the MoE layer runs at (DP x EP
    deployments, see OperatorModel); `intra_node_link`: (interconnect name, why) when the
    GPUs of the profiled box talk over another path than the device file's default."""
    d = Path(profile_dir)
    meta = read_meta(d)
    hf_id = str(meta.get("model", ""))
    model_name, arch = resolve_model(model, hf_id)
    archname = str(meta.get("architecture", ""))
    per_layer, per_step = op_counts(d, archname)
    per_layer, per_attn, per_lin = split_hybrid(per_layer)
    if (per_lin != {}) != (arch.linear_layers > 0):
        raise ImportError_(f"{d}: the profile's {archname} layers and {model_name} disagree on linear attention "
                           f"(profile ops {sorted(per_lin) or 'none'}, model {arch.linear_layers} linear-attention "
                           "layers)")
    layer_ops = {**per_layer, **per_attn, **per_lin}
    avail = sorted(int(p.name[2:]) for p in d.glob("tp*") if p.is_dir() and p.name[2:].isdigit())
    degrees = [t for t in (tp_degrees or avail) if t in avail]
    if not degrees:
        raise ImportError_(f"{d}: no tp<N>/ folders (found {avail})")
    eff = meta.get("engine_effective") or {}
    rows: dict[str, list[dict]] = {"dense": [], "per_sequence": [], "attention": [], "moe": []}
    fit: dict[str, Any] = {"method": "leave-one-grid-point-out (see calibrate/importers/common.py)"}
    dropped = {}
    interp_all: dict[int, dict[str, str]] = {}
    for tp in degrees:
        t = read_tp_tables(d, tp)
        need = ["dense", "per_sequence", "attention"] + (["moe"] if arch.is_moe else [])
        lack = [k for k in need if k not in t]
        if lack:
            dropped[tp] = f"no {', '.join(lack)} table at tp{tp}"
            continue
        dense = t["dense"].groupby(["layer", "tokens"], as_index=False)["time_us"].median()
        dense_pts = {op: list(zip(g.tokens.astype(float), g.time_us.astype(float)))
                     for op, g in dense.groupby("layer")}
        missing = [op for op in list(layer_ops) + list(per_step) if op not in dense_pts]
        if missing:
            raise ImportError_(f"{d}/tp{tp}/dense.csv lacks {missing}")
        ps = t["per_sequence"].groupby(["layer", "sequences"], as_index=False)["time_us"].median()
        ps_pts = {op: list(zip(g.sequences.astype(float), g.time_us.astype(float))) for op, g in ps.groupby("layer")}
        interp, rep = fit_curves({**{op: dense_pts[op] for op in list(layer_ops) + list(per_step)}, **ps_pts})
        interp_all[tp] = interp
        f_tp: dict[str, Any] = {"operators": rep}
        f_tp["dense_layer_sum"] = summarize_errors(sum_loo(dense_pts, layer_ops, interp))
        f_tp["per_sequence_sum"] = summarize_errors(sum_loo(ps_pts, {op: 1 for op in ps_pts}, interp))
        att = t["attention"].groupby(["prefill_chunk", "kv_prefill", "n_decode", "kv_decode"], as_index=False)["time_us"].median()
        att_rows = [(int(a), int(b), int(c), int(e), float(v)) for a, b, c, e, v in att.itertuples(index=False)]
        f_tp.update(attention_cv(att_rows))
        for op in list(layer_ops) + list(per_step):
            for x, y in dense_pts[op]:
                rows["dense"].append({"tp": tp, "op": op, "tokens": int(x), "time_us": y})
        for op, pts in ps_pts.items():
            for x, y in pts:
                rows["per_sequence"].append({"tp": tp, "op": op, "sequences": int(x), "time_us": y})
        for a, b, c, e, v in att_rows:
            rows["attention"].append({"tp": tp, "prefill_chunk": a, "kv_prefill": b, "n_decode": c,
                                      "kv_decode": e, "time_us": v})
        if arch.is_moe:
            moe = t["moe"].groupby(["tokens", "activated_experts"], as_index=False)["time_us"].median()
            pts = {(int(a), int(b)): float(v) for a, b, v in moe.itertuples(index=False)}
            f_tp["moe"] = moe_cv(pts)
            for (a, b), v in sorted(pts.items()):
                rows["moe"].append({"tp": tp, "tokens": a, "activated_experts": b, "time_us": v})
        fit[f"tp{tp}"] = f_tp
    kept = [t for t in degrees if t not in dropped]
    if not kept:
        raise ImportError_(f"{d}: no tensor-parallel degree has every table ({dropped})")
    if dropped:
        fit["dropped_tp"] = dropped
    dev = _device_entry(str(meta.get("hardware", "")), device)
    if intra_node_link is not None:
        dev = {**dev, "intra_node_link": intra_node_link[0], "intra_node_link_note": intra_node_link[1]}
    stem = name or f"{dev['name']}-{model_name}"
    overrides = eff.get("hf_overrides") or {}
    spec: dict[str, Any] = {
        "kind": "operators",
        "units": "tables in microseconds for one decoder layer on one GPU at per-rank shapes; step times in seconds",
        "tp_degrees": kept,
        "model_shape": model_shape(arch),
        "profiled_num_hidden_layers": int(overrides.get("num_hidden_layers", arch.num_layers)),
        "operators": {"per_layer": per_layer, "per_step": per_step, "per_sequence": list(PER_SEQUENCE_OPS),
                      "interp_by_tp": {t: interp_all[t] for t in kept},
                      **({"per_attention_layer": per_attn, "per_linear_layer": per_lin,
                          "hybrid": (f"{arch.attention_layers} of {arch.num_layers} layers of {model_name} have full "
                                     "attention (attention table and per_attention_layer ops), the others Gated "
                                     "DeltaNet linear attention (per_linear_layer); the profile's layer_mix: "
                                     f"{meta.get('layer_mix')}")} if per_lin else {})},
        "allreduces_per_layer": 2,
        "collectives": {"all_reduce": {"source": (
            f"none measured for {dev['name']}: tensor-parallel and expert-parallel collectives use its "
            f"intra-node link ({dev.get('intra_node_link')}, hardware/interconnects/): NCCL's cost model "
            f"where the link file has an nccl section, else its spec")}},
        "host_overhead_s": float(host_overhead_s),
        "host_overhead_per_seq_s": 0.0,
        "host_overhead_source": host_overhead_note,
        "tables": rows,
        "fit": fit,
    }
    sk = meta.get("skew_fit") or {}
    if sk.get("enabled"):
        per = sk.get("per_tp") or {}
        alphas = {int(t): float(v["alpha_default"]) for t, v in per.items()
                  if int(t) in kept and isinstance(v, dict) and "alpha_default" in v}
        spec["skew"] = {"alpha": alphas, "source": "meta.yaml skew_fit.per_tp.<tp>.alpha_default (pooled WLS fit "
                        "of the profile's skew.csv: uneven decode lengths in one batch)",
                        "applies": ("t = t(mean kv) + alpha * (t(max kv) - t(mean kv)) when the simulator passes the "
                                    "decodes' longest context (decode_ctx_max); the per-bucket table (skew_fit.csv) "
                                    "also needs the shortest and is not used")}
    else:
        spec["skew"] = {"alpha": {}, "source": "no skew profile (meta.yaml skew_profile disabled): no correction"}
    if arch.is_moe:
        spec["moe"] = {"num_experts": arch.num_experts, "top_k": arch.num_experts_per_tok,
                       "expert_parallel": int(expert_parallel),
                       "activated_experts": "expected distinct experts E*(1-(1-k/E)^T), uniform routing"}
    prov = {
        "source_repo": REPO, "source_path": _source_path(d), "commit": commit or _commit_for(d), "licence": LICENCE,
        "engine": f"vLLM {meta.get('vllm_version')}", "vllm_version": meta.get("vllm_version"),
        "cuda_version": meta.get("cuda_version"), "gpu": meta.get("gpu"), "profiled_at": meta.get("profiled_at"),
        "profiler_version": meta.get("profiler_version"), "model": hf_id, "variant": meta.get("variant"),
        "engine_flags": {k: eff.get(k) for k in ("load_format", "enforce_eager", "enable_prefix_caching",
                                                   "block_size", "max_num_batched_tokens", "max_num_seqs")
                         if k in eff},
        "hf_overrides_last_tp": overrides,
        "imported_by": "calibrate.importers.llmservingsim.import_llmservingsim",
        "imported_at": utc_today(), "agentservesim_version": agentservesim_version(),
        "command": f"asim-calibrate import llmservingsim {_source_path(d)}",
    }
    return {
        "_header": (f"# Operator profile imported from {REPO} ({LICENCE}) {prov['source_path']} at {prov['commit'][:7]}:\n"
                    f"# {meta.get('gpu')}, {hf_id}, vLLM {meta.get('vllm_version')} (eager, dummy weights, 1 layer).\n"
                    f"# Written by calibrate/importers; tables in {stem}.tables/. Do not edit by hand.\n"),
        "name": stem,
        "kind": "imported-profile",
        "device": dev,
        "engine": {"block_size": int(eff.get("block_size", 16)), "vllm_version": meta.get("vllm_version")},
        "model": {"name": model_name, "hf_id": hf_id, **model_shape(arch), "num_layers": arch.num_layers},
        "latency_model": spec,
        "provenance": prov,
    }


def _source_path(d: Path) -> str:
    parts = d.resolve().parts
    if "profiler" in parts:
        i = len(parts) - 1 - parts[::-1].index("profiler")
        return "/".join(parts[i:])
    return str(d)
