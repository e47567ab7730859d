"""The frontend delay a live client sees outside the engine's steps.

A client's TTFT on an idle engine is the request's way in (HTTP, the API server, the hand-off
to the engine core), the prefill step, and the first token's way out (detokenise-free
streaming here, the API server, HTTP). The profiling runs send prefill experiments one request
at a time, so for each of them: frontend = client TTFT - predicted step period of its one
prefill step. The median over the uncontended ones is the profile's `frontend_s`, which the
simulator adds to what a live client measures (simulator.cluster). Only profiling data is
used: nothing from a validation run.
"""

from __future__ import annotations

import numpy as np

from simulator.latency import LinearStepModel


def estimate_frontend(experiments: list[dict], intercept: float, coefficients: dict, max_tokens: int,
                      max_other_cpu: float | None = 0.25) -> dict:
    model = LinearStepModel(intercept, coefficients)
    samples = []
    for ex in experiments:
        if ex.get("kind") != "prefill" or len(ex.get("requests", ())) != 1:
            continue
        if max_other_cpu is not None and (ex.get("other_cpu") or 0.0) > max_other_cpu:
            continue
        r = ex["requests"][0]
        if r.get("error") or r.get("t_first") is None:
            continue
        cached = int(r.get("cached_tokens") or 0)
        n = int(r["prompt_tokens"]) - cached
        if n <= 0 or n > max_tokens:
            continue  # a chunked prefill spans several steps
        ttft = float(r["t_first"]) - float(r["t_send"])
        samples.append(ttft - model.step_time([(n, cached)], 0, 0, 1))
    if not samples:
        return {"frontend_s": 0.0, "n_samples": 0, "why": "no uncontended single-request prefill experiments"}
    a = np.asarray(samples)
    return {"frontend_s": float(np.median(a)), "n_samples": int(a.size), "p10_s": float(np.percentile(a, 10)),
            "p90_s": float(np.percentile(a, 90)),
            "what": "median of client TTFT - predicted prefill step period, single-request prefill experiments"}
