"""Engine steps, measured against simulated, where both runs have `steps.csv`.

A live run gets its steps from vLLM's iteration log (`replay.live.server_steps`), a simulated
one from the simulator's step log (`metrics.step_log`). Comparing them separates the step-time
model from everything around it: if the steps of each kind take as long in both runs, a
latency error comes from scheduling, the frontend or the client, not from the step model.

- decode-only steps are compared batch size by batch size (buckets 1, 2, 3-4, 5-8, 9-16, ...):
  the error of their mean period is weighted by the measured run's steps in each bucket, so a
  run that formed other batches does not look like a slower step;
- steps with prefill work are compared per prefill token: Σ period / Σ prefill tokens.

Measured periods exist only for steps that followed the previous one directly (the engine
went straight on); their stamps are the API server's, so single periods jitter, means do not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MIN_STEPS = 10  # fewer steps of a kind with a period: no comparison for it


def _bucket(batch: pd.Series) -> pd.Series:
    """1, 2, 3-4 -> 4, 5-8 -> 8, ...: the next power of two at or above the batch size."""
    b = np.maximum(batch.to_numpy(dtype=float), 1.0)
    return pd.Series(np.exp2(np.ceil(np.log2(b))).astype(int), index=batch.index)


def _kinds(steps: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    s = steps.copy()
    s["period_ms"] = pd.to_numeric(s["period_ms"], errors="coerce")
    prefill = s[s["num_prefill_reqs"] > 0]
    decode = s[(s["num_prefill_reqs"] == 0) & (s["num_decode_reqs"] > 0)]
    return prefill, decode


def summarize_steps(steps: pd.DataFrame) -> dict:
    prefill, decode = _kinds(steps)
    timed_p = prefill.dropna(subset=["period_ms"])
    timed_d = decode.dropna(subset=["period_ms"])
    return {
        "steps": int(len(steps)),
        "prefill_steps": int(len(prefill)),
        "decode_steps": int(len(decode)),
        "mean_prefill_tokens": float(prefill["num_prefill_tokens"].mean()) if len(prefill) else None,
        "mean_decode_batch": float(decode["num_decode_reqs"].mean()) if len(decode) else None,
        "prefill_ms_per_1k_tokens": (1000.0 * float(timed_p["period_ms"].sum()) / float(timed_p["num_prefill_tokens"].sum())
                                     if len(timed_p) >= MIN_STEPS and timed_p["num_prefill_tokens"].sum() > 0 else None),
        "mean_decode_period_ms": float(timed_d["period_ms"].mean()) if len(timed_d) >= MIN_STEPS else None,
    }


def _rel(m, s):
    return None if m is None or s is None or m == 0 else (s - m) / m


def decode_period_by_batch(meas: pd.DataFrame, sim: pd.DataFrame) -> tuple[list[dict], float | None]:
    """Per batch bucket: steps and mean decode period in both runs; and the error of the
    period weighted by the measured steps of the buckets both runs have."""
    _, dm = _kinds(meas)
    _, ds = _kinds(sim)
    dm = dm.dropna(subset=["period_ms"])
    ds = ds.dropna(subset=["period_ms"])
    gm = dm.groupby(_bucket(dm["num_decode_reqs"]))["period_ms"].agg(["size", "mean"])
    gs = ds.groupby(_bucket(ds["num_decode_reqs"]))["period_ms"].agg(["size", "mean"])
    rows, num, den = [], 0.0, 0.0
    for b in sorted(set(gm.index) | set(gs.index)):
        nm = int(gm["size"].get(b, 0))
        ns = int(gs["size"].get(b, 0))
        pm = float(gm["mean"][b]) if nm else None
        ps = float(gs["mean"][b]) if ns else None
        rows.append({"batch_up_to": int(b), "measured_steps": nm, "simulated_steps": ns,
                     "measured_period_ms": pm, "simulated_period_ms": ps, "error": _rel(pm, ps)})
        if nm >= MIN_STEPS and ns >= 1:
            num += nm * (ps - pm)
            den += nm * pm
    return rows, (num / den if den else None)


def compare_steps(meas: pd.DataFrame, sim: pd.DataFrame) -> dict:
    sm, ss = summarize_steps(meas), summarize_steps(sim)
    by_batch, decode_err = decode_period_by_batch(meas, sim)
    return {"measured": sm, "simulated": ss, "decode_by_batch": by_batch,
            "errors": {"steps": _rel(sm["steps"], ss["steps"]),
                       "prefill_per_token": _rel(sm["prefill_ms_per_1k_tokens"], ss["prefill_ms_per_1k_tokens"]),
                       "decode_period_same_batch": decode_err}}


def steps_finding(cmp: dict) -> str:
    """One line for reports: how the step-time model did on the steps that actually ran."""
    m, s, e = cmp["measured"], cmp["simulated"], cmp["errors"]
    parts = [f"{m['steps']} steps measured, {s['steps']} simulated"]
    if e["decode_period_same_batch"] is not None:
        parts.append(f"decode steps at the same batch size {100 * e['decode_period_same_batch']:+.1f}% "
                     f"(mean batch {m['mean_decode_batch']:.1f} vs {s['mean_decode_batch']:.1f})")
    if e["prefill_per_token"] is not None:
        parts.append(f"steps with prefill {m['prefill_ms_per_1k_tokens']:.1f} vs {s['prefill_ms_per_1k_tokens']:.1f} ms "
                     f"per 1k prefill tokens ({100 * e['prefill_per_token']:+.1f}%)")
    return "; ".join(parts)


def measured_step_scale(meas: pd.DataFrame | None, sim: pd.DataFrame, errors: dict | None = None) -> float | None:
    """One factor for how much longer the measured engine's steps took than the simulated
    ones (1.2: 20 % longer): decode-only steps at the same batch size and steps with prefill
    per token, weighted by the simulated time spent in each kind. A diagnostic: the
    simulation rerun at this step speed shows what error is left for everything but the
    step model (queueing, frontend, client) on this run's machine. `errors`: the "errors" of
    a `compare_steps` of the two runs already made (then `meas` is not needed)."""
    if errors is None:
        errors = compare_steps(meas, sim)["errors"]
    prefill, decode = _kinds(sim)
    parts = []
    for err, steps in ((errors["decode_period_same_batch"], decode), (errors["prefill_per_token"], prefill)):
        if err is not None and err > -1:
            parts.append((float(steps["period_ms"].sum()), 1.0 / (1.0 + err)))
    total = sum(w for w, _ in parts)
    return sum(w * r for w, r in parts) / total if total > 0 else None
