"""The profile's step model on the steps a live run actually ran, batch by batch.

`validation.steps` compares a live run's steps with the simulation's in aggregate (per prefill
token, per decode batch size), so it mixes the step model with the batches each run happened
to form. Here each live step that carried one prefill is matched to its call (the call whose
first token the client received just after the step, with as many uncached tokens as the step
prefilled), its batch is rebuilt from the run's own calls (the prefill's cached context from
the server's `cached_tokens`; each decode's context from its call's prompt and the share of
its output produced by then), and the profile's execute part prices that exact batch. Two
figures come out:

- per run, the speed the machine showed: Σ logged execute / Σ profile execute over the
  matched steps (1.10: the steps took 10 % longer than at profiling time);
- with each run's factor taken out, the median ratio by shape (new tokens, cached context,
  decodes in the batch). A step model that is right up to the machine's speed has every
  shape bin near 1; a bin far from 1 is a shape the model gets wrong.

Needs a calibrated linear profile (its fitted execute part) and results dirs with steps.csv
from the engine's iteration log (a live replay with `--launch` or a matrix case).
"""

from __future__ import annotations

import math
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
}
MIN_STEPS = 10  # fewer matched steps in a run: no factor for it


def matched_prefill_steps(run_dir: str | Path, model) -> pd.DataFrame:
    """One row per live step with exactly one prefill that could be matched to its call:
    its shape, its logged execute time and `model`'s (a LatencyModel: the profile's execute
    part) for the rebuilt batch, both in ms. Empty when the run has no steps.csv."""
    from simulator.latency.base import StepFeatures
    from simulator.latency.linear import IDLE_WAKE_AFTER_S

    run_dir = Path(run_dir)
    cols = ["new_tokens", "cached_tokens", "decodes", "measured_ms", "profile_ms"]
    if not (run_dir / "steps.csv").is_file() or not (run_dir / "calls.csv").is_file():
        return pd.DataFrame(columns=cols)
    st = pd.read_csv(run_dir / "steps.csv")
    calls = pd.read_csv(run_dir / "calls.csv")
    if "status" in calls:
        calls = calls[calls["status"] == "ok"]
    st = st.sort_values("t_s").reset_index(drop=True)
    start = st["t_s"] - st["elapsed_ms"] / 1000.0
    idle_before = start - st["t_s"].shift(1)  # NaN for the run's first step: an engine at rest
    first, finish = calls["first_token_s"].to_numpy(), calls["finish_s"].to_numpy()
    uncached = (calls["input_tokens"] - calls["cached_tokens"]).to_numpy()
    rows = []
    for i in np.flatnonzero((st["num_prefill_reqs"] == 1).to_numpy()):
        s = st.iloc[i]
        new = int(s["num_prefill_tokens"])
        hit = np.flatnonzero((first >= s["t_s"] - MATCH_BEFORE_S) & (first <= s["t_s"] + MATCH_AFTER_S)
                             & (uncached == new))
        if len(hit) != 1:
            continue
        ctx = int(calls["cached_tokens"].iloc[hit[0]])
        run = np.flatnonzero((first < start[i]) & (finish > s["t_s"]))
        nd = int(s["num_decode_reqs"])
        if len(run) != nd:  # the run's calls do not account for the step's decodes
            continue
        d = calls.iloc[run]
        span = (d["finish_s"] - d["first_token_s"]).to_numpy()
        done = np.clip((start[i] - d["first_token_s"].to_numpy()) / np.where(span > 0, span, 1.0), 0.0, 1.0)
        dctx = int(round(float((d["input_tokens"].to_numpy() + d["output_tokens"].to_numpy() * done + 1).sum())))
        idle = idle_before.iloc[i]
        f = StepFeatures(new, new * (ctx + (new + 1) / 2.0), ctx + new, 1, nd, dctx, 1 + nd,
                         int(bool(math.isnan(idle) or idle >= IDLE_WAKE_AFTER_S)))
        rows.append((new, ctx, nd, float(s["elapsed_ms"]), 1000.0 * model.time_of(f)))
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
    """Per run the machine's speed on its own matched prefill steps, and the ratio by shape
    with each run's factor taken out (see the module text). None: no calibrated linear
    profile, or no run with MIN_STEPS matched steps."""
    from calibrate.profile import execute_model

    try:
        model = execute_model(profile)
    except ValueError:
        return None
    runs, frames = [], []
    for d in run_dirs:
        m = matched_prefill_steps(d, model)
        if len(m) < MIN_STEPS:
            continue
        factor = float(m["measured_ms"].sum() / m["profile_ms"].sum())
        runs.append({"run": Path(d).name, "steps": int(len(m)), "factor": factor})
        frames.append(m.assign(residual=m["measured_ms"] / m["profile_ms"] / factor))
    if not runs:
        return None
    allm = pd.concat(frames, ignore_index=True)
    by_shape = {}
    for col, edges in SHAPE_BINS.items():
        cut = pd.cut(allm[col], list(edges), right=True)
        g = allm.groupby(cut, observed=True)["residual"].agg(["size", "median"])
        by_shape[col] = [{"bin": _bin_label(iv.left, iv.right), "steps": int(r["size"]), "median": float(r["median"])}
                         for iv, r in g.iterrows()]
    fs = [r["factor"] for r in runs]
    return {"runs": runs, "steps": int(len(allm)), "spread": max(fs) / min(fs) - 1.0, "by_shape": by_shape}


def speed_finding(s: dict) -> str:
    """One line for a case's findings."""
    runs = ", ".join(f"x{r['factor']:.3f}" for r in s["runs"])
    bins = [(col, b) for col, bs in s["by_shape"].items() for b in bs if b["steps"] >= MIN_STEPS]
    shape = ""
    if bins:
        col, b = max(bins, key=lambda cb: abs(cb[1]["median"] - 1.0))
        shape = (f"; with each run's speed taken out, every shape bin's median is within "
                 f"{100 * abs(b['median'] - 1.0):.1f}% of 1 (farthest: {col} {b['bin']}, x{b['median']:.3f})")
    return (f"live steps with one prefill ({s['steps']} matched to their calls, batches rebuilt): logged execute "
            f"/ the profile's execute per run {runs}{shape}")
