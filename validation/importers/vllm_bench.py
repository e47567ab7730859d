"""Recorded `vllm bench serve` runs: the JSON that `vllm bench serve --save-result
--save-detailed` writes (vllm/benchmarks/serve.py), the most common record of a real vLLM run.

Per request it holds `start_times` (the client's perf_counter when the request was sent),
`input_lens`, `output_lens`, `ttfts`, `latencies` (seconds), `itls` (each request's
inter-token gaps, seconds) and `errors` (empty for a success); beside them the run's own
summary (`mean_ttft_ms`, ...), `model_id`, `request_rate`, `max_concurrency`. Without
`--save-detailed` the per-request lists are absent and the run cannot be replayed: the
importer says so.

The measured side is written in our results layout with vLLM bench's own arithmetic: TTFT and
E2E as recorded, TPOT = (latency - TTFT) / (output - 1) for outputs of more than one token, ITL
every recorded gap; so the imported summary reproduces the run's (a test checks it on a real
run). The trace for the simulator is one single-call program per request, issued when the
request was sent. The JSON does not say what the prompts shared: a run made with a common
prefix (`--random-prefix-len N`, a shared system prompt) is imported with `prefix_tokens=N`,
which gives every program an N-token prefix of one id. Engine settings (max_num_seqs, KV
blocks, ...) are not in the file either: give them to the simulation as config keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import simulator
from replay.results import ResultsWriter
from simulator.metrics import summarize
from simulator.workload import CallSpec, ProgramSpec

from .llmservingsim import ImportError_, RecordedRun

PER_REQUEST = ("start_times", "input_lens", "output_lens", "ttfts", "latencies")
# The run's own summary keys kept beside ours (to check the import against)
SUMMARY_KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput", "mean_ttft_ms",
                "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
                "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms")
META_KEYS = ("date", "backend", "endpoint_type", "label", "model_id", "tokenizer_id", "num_prompts", "request_rate",
             "burstiness", "max_concurrency")


def _result_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        if len(found) == 1:
            return found[0]
        raise ImportError_(f"{path}: expected one vllm bench serve result (*.json), found {len(found)}")
    raise ImportError_(f"{path}: not found")


def read_vllm_bench(path: str | Path) -> dict[str, Any]:
    """The result JSON, checked to carry every per-request list, all of one length."""
    f = _result_file(Path(path))
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ImportError_(f"{f}: not a JSON file ({e})") from None
    if not isinstance(d, dict):
        raise ImportError_(f"{f}: not a vllm bench serve result (a JSON object expected)")
    missing = [k for k in PER_REQUEST if not isinstance(d.get(k), list)]
    if missing:
        raise ImportError_(f"{f}: no per-request {', '.join(missing)}: save the run with vllm bench serve "
                           "--save-result --save-detailed")
    n = len(d["start_times"])
    for k in (*PER_REQUEST, "itls", "errors"):
        if k in d and isinstance(d[k], list) and len(d[k]) != n:
            raise ImportError_(f"{f}: {k} has {len(d[k])} entries, start_times {n}")
    if not n:
        raise ImportError_(f"{f}: no requests")
    d["_file"] = str(f)
    return d


def _programs(d: dict, order: list[int], t0: float, prefix_tokens: int) -> list[ProgramSpec]:
    out = []
    for i in order:
        n_in, n_out = int(d["input_lens"][i]), int(d["output_lens"][i])
        if prefix_tokens >= n_in:
            raise ImportError_(f"request {i}: prefix_tokens {prefix_tokens} is not below its {n_in} prompt tokens")
        out.append(ProgramSpec(f"req-{i:06d}", float(d["start_times"][i]) - t0, (CallSpec(n_in - prefix_tokens,
                                                                                          max(n_out, 1)),),
                               prefix_id="vllm-bench-prefix" if prefix_tokens else None, prefix_tokens=prefix_tokens,
                               meta={"source": "vllm-bench"}))
    return out


def import_vllm_bench_run(path: str | Path, out_dir: str | Path, prefix_tokens: int = 0) -> RecordedRun:
    """Write the measured run to `out_dir` in our results layout; return what a simulation
    needs (the programs; the model id; no engine settings: the file has none)."""
    d = read_vllm_bench(path)
    if not isinstance(prefix_tokens, int) or isinstance(prefix_tokens, bool) or prefix_tokens < 0:
        raise ImportError_(f"prefix_tokens must be an integer >= 0, got {prefix_tokens!r}")
    n = len(d["start_times"])
    order = sorted(range(n), key=lambda i: (float(d["start_times"][i]), i))
    t0 = float(d["start_times"][order[0]])
    errors = d.get("errors") or [""] * n
    itls = d.get("itls") or [None] * n
    calls, programs, gaps = [], [], []
    for i in order:
        arrival = float(d["start_times"][i]) - t0
        out, ttft, lat = int(d["output_lens"][i]), float(d["ttfts"][i] or 0.0), float(d["latencies"][i] or 0.0)
        ok = not errors[i]
        row = {"program_id": f"req-{i:06d}", "call_index": 0, "instance": 0, "arrival_s": arrival, "scheduled_s": "",
               "first_token_s": arrival + ttft if ok else "", "finish_s": arrival + lat if ok else "",
               "input_tokens": int(d["input_lens"][i]), "cached_tokens": "", "output_tokens": out if ok else 0,
               "ttft_s": ttft if ok else "", "tpot_s": (lat - ttft) / (out - 1) if ok and out > 1 else 0.0,
               "e2e_s": lat if ok else "", "preemptions": "", "loaded_tokens": "", "status": "ok" if ok else "failed",
               "error": str(errors[i] or "")[:200]}
        calls.append(row)
        programs.append({"program_id": row["program_id"], "arrival_s": arrival, "finish_s": row["finish_s"],
                         "jct_s": row["e2e_s"], "calls": 1, "tool_s_total": 0.0, "status": row["status"]})
        if ok and itls[i]:
            gaps += [float(x) for x in itls[i]]
    numeric = [dict(c, cached_tokens=0, preemptions=0) for c in calls]
    s = summarize(numeric, programs, itl_values=gaps if gaps else None)
    s["prefix_cache_hit_rate"] = None
    s["preemptions"] = None
    meta = {k: d.get(k) for k in META_KEYS if k in d}
    meta.update({"source_file": d["_file"], "prefix_tokens": prefix_tokens})
    s.update({"backend": "recorded", "source": "vllm-bench", "recorded": meta, "model": d.get("model_id"),
              "vllm_bench_summary": {k: d.get(k) for k in SUMMARY_KEYS if k in d},
              "agentservesim_version": simulator.__version__})
    with ResultsWriter(out_dir) as w:
        w.calls(calls)
        w.programs(programs)
        w.timeseries([])
        w.summary(s)
    return RecordedRun(programs=_programs(d, order, t0, prefix_tokens), engine={}, model=str(d.get("model_id") or ""),
                       tp=1, meta=meta)
