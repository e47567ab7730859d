"""Recorded vLLM runs from LLMServingSim's `bench/` folders (MIT licence; see
../shared/reference/README.md): `vllm/requests.jsonl` (per-request engine timestamps),
`vllm/meta.json` (engine arguments, KV block count when recorded, hardware) and
`vllm/timeseries.csv` (1 s engine ticks).

`requests.jsonl` times: `arrival_time` is Unix epoch seconds, `queued_ts`..`last_token_ts`
engine-monotonic seconds; intervals use the monotonic fields only. As LLMServingSim does
(its summary.txt reproduces from these formulas), TTFT = first_token_ts - queued_ts,
E2E = last_token_ts - queued_ts, TPOT = (last - first) / (output - 1). The engine's queue
time is the real arrival, so the trace we derive uses queued_ts (relative to the first) as
each request's arrival: the simulation sees the arrivals the engine saw.

Prompt sharing: the run's meta names the replayed workload file (`dataset_path`, relative to
the LLMServingSim repository; its `input_tok_ids` are the real prompts). When that file is
present, each request carries the block identities of its prompt (`hash_ids` at the run's
KV block size), so the simulated prefix cache sees the sharing the real one saw.

The recorded runs carry no per-token times (no ITL) and no per-request cached-token counts:
those summary keys are null, and comparisons skip them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import simulator
from replay.results import ResultsWriter
from simulator.metrics import summarize
from simulator.workload import CallSpec, ProgramSpec


class ImportError_(ValueError):
    """A recorded run that cannot be read (user error)."""


@dataclass
class RecordedRun:
    programs: list[ProgramSpec]
    engine: dict[str, Any]          # engine settings for the simulation (our config keys)
    model: str                      # HF model id
    tp: int
    dp: int = 1
    ep: int = 1                     # expert-parallel degree (= dp when expert parallel is on)
    meta: dict[str, Any] = field(default_factory=dict)


def _load_requests(path: Path) -> pd.DataFrame:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    df = pd.DataFrame(rows)
    need = {"request_id", "input_toks", "output_toks", "queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts"}
    missing = need - set(df.columns)
    if missing:
        raise ImportError_(f"{path}: missing fields {sorted(missing)}")
    return df.sort_values(["queued_ts", "request_id"], kind="stable").reset_index(drop=True)


def _workload(run_dir: Path, meta: dict) -> list[list[int]] | None:
    """The replayed workload's prompts (token ids), if the file is beside the run's repo."""
    rel = meta.get("dataset_path")
    if not rel:
        return None
    for root in [run_dir, *run_dir.parents]:
        if (root / rel).is_file():
            rows = [json.loads(x) for x in (root / rel).read_text().splitlines() if x.strip()]
            return [r.get("input_tok_ids") for r in rows]
    return None


def _programs(df: pd.DataFrame, prompts: list | None, block_size: int) -> list[ProgramSpec]:
    t0 = float(df["queued_ts"].min())
    ids: dict[tuple, int] = {}
    out = []
    for r in df.itertuples():
        n_in, n_out = int(r.input_toks), int(r.output_toks)
        call = CallSpec(n_in, n_out)
        idx = str(r.request_id).rsplit("-", 1)[-1]
        toks = prompts[int(idx)] if prompts is not None and idx.isdigit() and int(idx) < len(prompts) else None
        if toks is not None and len(toks) == n_in:
            hids = tuple(ids.setdefault(tuple(toks[i:i + block_size]), len(ids))
                         for i in range(0, n_in - block_size + 1, block_size))
            call = CallSpec(n_in, n_out, input_tokens=n_in, hash_ids=hids)
        out.append(ProgramSpec(str(r.request_id), float(r.queued_ts - t0), (call,),
                               block_size=block_size if call.hash_ids is not None else None,
                               meta={"source": "llmservingsim"}))
    return out


def read_llmservingsim_run(run_dir: str | Path) -> tuple[RecordedRun, pd.DataFrame, pd.DataFrame | None]:
    d = Path(run_dir)
    vd = d / "vllm" if (d / "vllm" / "requests.jsonl").exists() else d
    req_path, meta_path = vd / "requests.jsonl", vd / "meta.json"
    if not req_path.exists() or not meta_path.exists():
        raise ImportError_(f"{d}: not an LLMServingSim run (need vllm/requests.jsonl and vllm/meta.json)")
    meta = json.loads(meta_path.read_text())
    df = _load_requests(req_path)
    ek = meta.get("engine_kwargs", {})
    kv = meta.get("kv_cache") or {}
    programs = _programs(df, _workload(d, meta), int(kv.get("block_size") or 16))
    engine = {"max_num_seqs": ek.get("max_num_seqs"), "max_num_batched_tokens": ek.get("max_num_batched_tokens"),
              "max_model_len": ek.get("max_model_len")}
    if kv.get("num_gpu_blocks"):
        engine["num_gpu_blocks_override"] = int(kv["num_gpu_blocks"])
    if kv.get("block_size"):
        engine["block_size"] = int(kv["block_size"])
    if kv.get("enable_prefix_caching") is not None:
        engine["enable_prefix_caching"] = bool(kv["enable_prefix_caching"])
    if kv.get("gpu_memory_utilization"):
        engine["gpu_memory_utilization"] = float(kv["gpu_memory_utilization"])
    engine = {k: v for k, v in engine.items() if v is not None}
    ts = None
    if (vd / "timeseries.csv").exists():
        ts = pd.read_csv(vd / "timeseries.csv")
    dp = int(ek.get("data_parallel_size") or 1)
    run = RecordedRun(programs=programs, engine=engine, model=str(meta.get("model", "")),
                      tp=int(ek.get("tensor_parallel_size") or 1), dp=dp,
                      ep=dp if ek.get("enable_expert_parallel") else 1,
                      meta={"vllm_version": meta.get("vllm_version"), "hardware": meta.get("hardware"),
                            "dataset": meta.get("dataset_path"), "data_parallel_size": ek.get("data_parallel_size"),
                            "enable_expert_parallel": ek.get("enable_expert_parallel"),
                            "num_gpu_blocks_recorded": bool(kv.get("num_gpu_blocks")), "source_dir": str(d)})
    return run, df, ts


def import_llmservingsim_run(run_dir: str | Path, out_dir: str | Path) -> RecordedRun:
    """Write the measured run to `out_dir` in our results layout; return what a simulation needs."""
    run, df, ts = read_llmservingsim_run(run_dir)
    t0 = float(df["queued_ts"].min())
    calls = []
    for r in df.itertuples():
        out = int(r.output_toks)
        ttft = float(r.first_token_ts - r.queued_ts)
        e2e = float(r.last_token_ts - r.queued_ts)
        calls.append({
            "program_id": str(r.request_id), "call_index": 0, "instance": 0,
            "arrival_s": float(r.queued_ts - t0), "scheduled_s": float(r.scheduled_ts - t0),
            "first_token_s": float(r.first_token_ts - t0), "finish_s": float(r.last_token_ts - t0),
            "input_tokens": int(r.input_toks), "cached_tokens": "", "output_tokens": out,
            "ttft_s": ttft, "tpot_s": float(r.last_token_ts - r.first_token_ts) / (out - 1) if out > 1 else 0.0,
            "e2e_s": e2e, "preemptions": "", "loaded_tokens": "", "status": "ok", "error": ""})
    programs = [{"program_id": c["program_id"], "arrival_s": c["arrival_s"], "finish_s": c["finish_s"],
                 "jct_s": c["e2e_s"], "calls": 1, "tool_s_total": 0.0, "status": "ok"} for c in calls]
    numeric = [dict(c, cached_tokens=0, preemptions=0) for c in calls]
    s = summarize(numeric, programs)
    for k in list(s):
        if "_itl_" in k:
            s[k] = None
    s["prefix_cache_hit_rate"] = None
    s["preemptions"] = None
    s.update({"backend": "recorded", "source": "llmservingsim", "recorded": run.meta, "model": run.model,
              "engine": run.engine, "tensor_parallel_size": run.tp, "agentservesim_version": simulator.__version__})
    rows_ts = []
    if ts is not None:
        # KV usage logged as 0 at every sample while requests ran was not recorded (the older
        # RTX 4090 run): blank, not an empty cache
        kv_logged = not ((ts.kv_cache_pct == 0).all() and (ts.running > 0).any())
        for r in ts.itertuples():
            rows_ts.append({"t_s": float(r.t), "instance": 0, "running": r.running, "waiting": r.waiting,
                            "kv_usage": float(r.kv_cache_pct) / 100.0 if kv_logged else ""})
    with ResultsWriter(out_dir) as w:
        w.calls(calls)
        w.programs(programs)
        w.timeseries(rows_ts)
        w.summary(s)
    return run
