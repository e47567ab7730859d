"""The profile's step model on the steps a live run actually ran, batch by batch.

`validation.steps` compares a live run's steps with the simulation's in aggregate (per prefill
token, per decode batch size), so it mixes the step model with the batches each run happened
to form. Here the batch of each live step is rebuilt from the run's own calls and the
profile's execute part prices that exact batch:

- a step with exactly one prefill is matched to its call: the call whose first token the
  client received just after the step's log line, with as many uncached tokens as the step
  prefilled (its cached context is the server's `cached_tokens`);
- its decodes, and those of a decode-only step, are the calls past their first token and not
  yet finished at the line, each at its prompt plus the share of its output produced by then;
  a step whose logged decode count differs is left out.

Two figures come out:

- per run, the speed the machine showed: Σ logged execute / Σ profile execute over the
  matched steps with a prefill (`factor`; 1.10: 10 % slower than at profiling time) and over
  the decode-only ones (`decode_factor`);
- at each run's speed, the ratio by shape: Σ logged / Σ (profile execute × the run's factor)
  over the steps of each bin of new tokens, cached context, decodes beside a prefill, and
  decode batch size. A step model that is right up to the machine's speed has every bin near
  1; a bin far from 1 is a shape the model gets wrong.

Needs a calibrated linear profile (its fitted execute part) and results dirs with steps.csv
from the engine's iteration log (a live replay with `--launch` or a matrix case).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

# A call's first token reaches the client this long around the API server's log line of the
# step that produced it (the line is written after the step; the token follows it out).
MATCH_BEFORE_S = 0.002
MATCH_AFTER_S = 0.010
SHAPE_BINS = {
    "new_tokens": (0, 64, 128, 256, 512, 1024, math.inf),
    "cached_tokens": (-1, 0, 256, 512, 1024, math.inf),
    "decodes": (-1, 0, 1, 3, math.inf),
    "decode_batch": (0, 1, 3, 7, math.inf),
}
# shape name -> (step kind, column): the first three over steps with a prefill, the last over
# decode-only steps
SHAPE_COLUMNS = {"new_tokens": ("prefill", "new_tokens"), "cached_tokens": ("prefill", "cached_tokens"),
                 "decodes": ("prefill", "decodes"), "decode_batch": ("decode", "decodes")}
MIN_STEPS = 10  # fewer matched steps of a kind in a run: no factor for it


def matched_steps(run_dir: str | Path, model) -> pd.DataFrame:
    """One row per live step whose batch could be rebuilt: kind "prefill" (exactly one
    prefill, matched to its call, with any decodes beside it) or "decode" (decodes only); its
    shape, its logged execute time and `model`'s (a LatencyModel: the profile's execute part)
    for the rebuilt batch, both in ms. A decode is a call past its first token and not yet
    finished at the step's log line (client times; a token reaches the client after the line);
    a step whose logged decode count differs from that is left out. Empty when the run has no
    steps.csv."""
    from simulator.latency.base import step_features
    from simulator.latency.linear import IDLE_WAKE_AFTER_S

    run_dir = Path(run_dir)
    cols = ["kind", "new_tokens", "cached_tokens", "decodes", "measured_ms", "profile_ms"]
    if not (run_dir / "steps.csv").is_file() or not (run_dir / "calls.csv").is_file():
        return pd.DataFrame(columns=cols)
    st = pd.read_csv(run_dir / "steps.csv")
    calls = pd.read_csv(run_dir / "calls.csv")
    if "status" in calls:
        calls = calls[calls["status"] == "ok"]
    st = st.sort_values("t_s").reset_index(drop=True)
    end = st["t_s"].to_numpy()
    start = end - st["elapsed_ms"].to_numpy() / 1000.0
    idle_before = start - np.concatenate([[np.nan], end[:-1]])  # NaN first: an engine at rest
    first, finish = calls["first_token_s"].to_numpy(), calls["finish_s"].to_numpy()
    prompt, out = calls["input_tokens"].to_numpy(), calls["output_tokens"].to_numpy()
    cached = calls["cached_tokens"].to_numpy()
    uncached = prompt - cached
    span = np.where(finish > first, finish - first, 1.0)
    rows = []
    npre, ndec = st["num_prefill_reqs"].to_numpy(), st["num_decode_reqs"].to_numpy()
    for i in np.flatnonzero((npre == 1) | ((npre == 0) & (ndec > 0))):
        new = int(st["num_prefill_tokens"].iloc[i]) if npre[i] else 0
        running = (first < end[i]) & (finish > end[i])
        ctx = 0
        if new:
            hit = np.flatnonzero((first >= end[i] - MATCH_BEFORE_S) & (first <= end[i] + MATCH_AFTER_S)
                                 & (uncached == new))
            if len(hit) != 1:
                continue
            ctx = int(cached[hit[0]])
            running[hit[0]] = False
        nd = int(ndec[i])
        if int(running.sum()) != nd:  # the run's calls do not account for the step's decodes
            continue
        done = np.clip((start[i] - first[running]) / span[running], 0.0, 1.0)
        dctx = int(round(float((prompt[running] + out[running] * done + 1).sum())))
        idle = idle_before[i]
        f = replace(step_features([(new, ctx)] if new else [], nd, dctx, nd + (1 if new else 0)),
                    idle_start=int(bool(math.isnan(idle) or idle >= IDLE_WAKE_AFTER_S)))
        rows.append(("prefill" if new else "decode", new, ctx, nd, float(st["elapsed_ms"].iloc[i]),
                     1000.0 * model.time_of(f)))
    return pd.DataFrame(rows, columns=cols)


def _bin_label(lo, hi) -> str:
    """The integers in (lo, hi]: '0', '1', '2-3', '1025+'."""
    first = int(lo) + 1
    if math.isinf(hi):
        return f"{first}+"
    return str(first) if first == int(hi) else f"{first}-{int(hi)}"


def bin_labels(col: str) -> list[str]:
    """A shape column's bin labels in order."""
    e = SHAPE_BINS[col]
    return [_bin_label(lo, hi) for lo, hi in zip(e[:-1], e[1:])]


def live_step_speed(run_dirs: list[str | Path], profile: dict) -> dict | None:
    """Per run the machine's speed on its own rebuilt steps (`factor`: steps with a prefill;
    `decode_factor`: decode-only steps, None under MIN_STEPS), and the ratio by shape with
    each run's factors taken out (see the module text). None: no calibrated linear profile, or
    no run with MIN_STEPS matched prefill steps."""
    from calibrate.profile import execute_model

    try:
        model = execute_model(profile)
    except ValueError:
        return None
    runs, frames = [], []
    for d in run_dirs:
        m = matched_steps(d, model)
        pre, dec = m[m["kind"] == "prefill"], m[m["kind"] == "decode"]
        if len(pre) < MIN_STEPS:
            continue
        factor = float(pre["measured_ms"].sum() / pre["profile_ms"].sum())
        dfactor = float(dec["measured_ms"].sum() / dec["profile_ms"].sum()) if len(dec) >= MIN_STEPS else None
        runs.append({"run": Path(d).name, "steps": int(len(pre)), "factor": factor,
                     "decode_steps": int(len(dec)), "decode_factor": dfactor})
        frames.append(pre.assign(scaled_ms=pre["profile_ms"] * factor))
        if dfactor is not None:
            frames.append(dec.assign(scaled_ms=dec["profile_ms"] * dfactor))
    if not runs:
        return None
    allm = pd.concat(frames, ignore_index=True)
    by_shape = {}
    for name, (kind, col) in SHAPE_COLUMNS.items():
        part = allm[allm["kind"] == kind]
        if part.empty:
            continue
        g = part.groupby(pd.cut(part[col], list(SHAPE_BINS[name]), right=True), observed=True)
        sums = g[["measured_ms", "scaled_ms"]].sum()
        by_shape[name] = [{"bin": _bin_label(iv.left, iv.right), "steps": int(n),
                           "ratio": float(r.measured_ms / r.scaled_ms),
                           "measured_ms": float(r.measured_ms), "scaled_ms": float(r.scaled_ms)}
                          for (iv, r), n in zip(sums.iterrows(), g.size())]
    fs = [r["factor"] for r in runs]
    return {"runs": runs, "steps": int((allm["kind"] == "prefill").sum()),
            "decode_steps": int((allm["kind"] == "decode").sum()),
            "spread": max(fs) / min(fs) - 1.0, "by_shape": by_shape}


def speed_finding(s: dict) -> str:
    """One line for a case's findings."""
    runs = ", ".join(f"x{r['factor']:.3f}" for r in s["runs"])
    bins = [(col, b) for col, bs in s["by_shape"].items() for b in bs if b["steps"] >= MIN_STEPS]
    shape = ""
    if bins:
        col, b = max(bins, key=lambda cb: abs(cb[1]["ratio"] - 1.0))
        shape = (f"; at each run's speed, every shape bin is within {100 * abs(b['ratio'] - 1.0):.1f}% of the "
                 f"model (farthest: {col} {b['bin']}, x{b['ratio']:.3f})")
    dec = ", ".join("-" if r.get("decode_factor") is None else f"x{r['decode_factor']:.3f}" for r in s["runs"])
    return (f"live steps, batches rebuilt from the calls: logged / the profile's execute time per run {runs} on "
            f"{s['steps']} steps with a prefill, {dec} on {s['decode_steps']} decode-only steps{shape}")
