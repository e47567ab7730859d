"""Metrics of a run, and the summary keys `vllm bench serve` writes plus agent keys.

The same functions summarise a simulated run and a measured one (replay's live backend),
so the two are comparable key by key.
"""

from __future__ import annotations

import math

import numpy as np

CALL_COLUMNS = ("program_id", "call_index", "instance", "arrival_s", "scheduled_s", "first_token_s",
                "finish_s", "input_tokens", "cached_tokens", "output_tokens", "ttft_s", "tpot_s", "e2e_s",
                "preemptions", "loaded_tokens", "status", "error")
PROGRAM_COLUMNS = ("program_id", "arrival_s", "finish_s", "jct_s", "calls", "tool_s_total", "status")
TIMESERIES_COLUMNS = ("t_s", "instance", "running", "waiting", "kv_usage", "preemptions_total",
                      "prefix_cache_queries", "prefix_cache_hits", "pinned_blocks")
# steps.csv (optional, one row per engine step): t_s is the step's end. period_ms is the step's
# start-to-next-start time (simulated; measured where the engine went straight on), elapsed_ms
# the engine's execute time (measured runs: vLLM's iteration log).
STEP_COLUMNS = ("t_s", "instance", "num_prefill_reqs", "num_prefill_tokens", "num_decode_reqs", "period_ms",
                "elapsed_ms")

PERCENTILES = (50, 90, 99)


def _stats(prefix: str, values, weights=None, scale: float = 1000.0, unit: str = "ms") -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    out = {}
    if weights is not None and len(v):
        w = np.asarray(weights, dtype=float)
        order = np.argsort(v, kind="stable")
        v, w = v[order], w[order]
        total = w.sum()
        # exactly rounded sums: the same entries give the same figures in any order (a
        # fast-forwarded instance records a run's gaps at once, interleaved otherwise with
        # the other instances' than stepping would)
        mean = math.fsum((v * w).tolist()) / total
        var = math.fsum((w * (v - mean) ** 2).tolist()) / total
        cw = np.cumsum(w)

        def pct(p):  # numpy "linear" percentile on the expanded sample
            pos = p / 100.0 * (total - 1)
            lo = math.floor(pos)
            hi = min(lo + 1, int(total) - 1)
            vlo = v[np.searchsorted(cw, lo + 1)]
            vhi = v[np.searchsorted(cw, hi + 1)]
            return float(vlo + (vhi - vlo) * (pos - lo))

        vals = {"mean": mean, "median": pct(50), "std": math.sqrt(var), "p90": pct(90), "p99": pct(99)}
    elif len(v):
        vals = {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
                "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99))}
    else:
        vals = {k: 0.0 for k in ("mean", "median", "std", "p90", "p99")}
    for k, x in vals.items():
        out[f"{k}_{prefix}_{unit}"] = x * scale
    return out


def summarize(calls: list[dict], programs: list[dict], itl_values=None, itl_weights=None) -> dict:
    """vLLM-bench keys (latencies in ms) plus agent keys, from call and program rows.

    TTFT, TPOT and E2E are per call; TPOT = (e2e - ttft) / (output - 1) over calls with more
    than one output token (as vllm bench); ITL is every gap between consecutive tokens.
    """
    ok = [c for c in calls if c.get("status", "ok") == "ok"]
    n = len(ok)
    if n:
        t0 = min(c["arrival_s"] for c in calls)
        t1 = max(c["finish_s"] for c in ok)
        duration = max(t1 - t0, 1e-12)
    else:
        duration = 0.0
    tin = sum(int(c["input_tokens"]) for c in ok)
    tout = sum(int(c["output_tokens"]) for c in ok)
    s = {
        "completed": n,
        "failed": len(calls) - n,
        "duration": duration,
        "total_input_tokens": tin,
        "total_output_tokens": tout,
        "request_throughput": n / duration if duration else 0.0,
        "output_throughput": tout / duration if duration else 0.0,
        "total_token_throughput": (tin + tout) / duration if duration else 0.0,
    }
    s.update(_stats("ttft", [c["ttft_s"] for c in ok]))
    s.update(_stats("tpot", [c["tpot_s"] for c in ok if int(c["output_tokens"]) > 1]))
    if itl_values is None:
        s.update(_stats("itl", []))
    else:
        s.update(_stats("itl", itl_values, itl_weights))
    s.update(_stats("e2el", [c["e2e_s"] for c in ok]))
    jct = np.asarray([p["jct_s"] for p in programs if p.get("status", "ok") == "ok"], dtype=float)
    if len(jct):
        s["mean_jct_s"] = float(jct.mean())
        for p in PERCENTILES:
            s[f"p{p}_jct_s"] = float(np.percentile(jct, p))
    else:
        s.update({"mean_jct_s": 0.0, **{f"p{p}_jct_s": 0.0 for p in PERCENTILES}})
    s["programs_completed"] = int(len(jct))
    s["prefix_cache_hit_rate"] = (sum(int(c["cached_tokens"]) for c in ok) / tin) if tin else 0.0
    s["preemptions"] = int(sum(int(c.get("preemptions") or 0) for c in calls))
    return s
