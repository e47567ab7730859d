"""Where the simulator is off: attribute per-call errors to the parts of the model.

Every paired call's error (simulated - measured, seconds) is split with evidence from the two
runs' own data:

- TTFT of calls that were not queued in either run ("idle" calls) is fitted per run as
  `ttft = a + d * uncached_tokens` (Theil-Sen, robust to a few outliers). Then for every call
  `dTTFT = (a_s - a_m)                  host overhead: a per-request constant
          + (d_s - d_m) * uncached_s    step time (prefill): cost per uncached token
          + d_m * (uncached_s - uncached_m)   cache hits: the same call hit a different amount
          + residual`                   queueing, on calls that waited in either run
- decode time (e2e - ttft) differences are step time (decode); TPOT is compared on calls that
  ran alone (mean batch < 1.5) and on loaded ones, and fitted as `tpot = e + f * batch`.
- calls preempted in either run: their whole E2E difference is put on preemption.
- the gap between a program's consecutive calls (arrival_k - finish_{k-1}) differs only by
  how the client/orchestrator issued them (tool gaps, client issue lag): orchestration/client.

Each finding's impact is the mean, over paired calls, of |seconds attributed| to its part, so
parts rank in one unit; the same seconds as a share of the mean measured E2E are shown too.
A part the data cannot assess (no idle calls, too few calls) goes to `not_assessed`, with why.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .compare import Run, measured_preemptions, timeseries_totals

MIN_FIT_CALLS = 5          # fewest idle calls to fit TTFT vs uncached tokens
UNLOADED_BATCH = 1.5       # mean decode batch below which a call ran (almost) alone
QUEUE_FLOOR_S = 1e-3       # a queue time under this (or under 10% of TTFT) is no queueing
MINOR_SHARE = 0.02         # a part under 2% of mean measured E2E is marked minor
BURST_FRACTION = 0.10      # measured TPOT under 10% of the median: the stream arrived in one burst


def burst_calls(pairs: pd.DataFrame) -> pd.Series:
    """Paired calls whose measured tokens reached the client in one burst (TPOT near 0): their
    first-token time is late and their TPOT meaningless; only their E2E is a measurement."""
    multi = (pairs["output_tokens_m"] > 1) & (pairs["output_tokens_s"] > 1)
    med = pairs.loc[multi, "tpot_s_m"].median() if multi.any() else 0.0
    return multi & (pairs["tpot_s_m"] < BURST_FRACTION * med)


# -- helpers ---------------------------------------------------------------------------------

def theil_sen(x, y, max_points: int = 300):
    """(slope, intercept) of the median pairwise slope; None when x has < 3 distinct values.

    A deterministic subsample (evenly spaced in x order) bounds the cost at max_points**2 / 2.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < 3:
        return None
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    if len(xs) > max_points:
        idx = np.unique(np.linspace(0, len(xs) - 1, max_points).round().astype(int))
        xs, ys = xs[idx], ys[idx]
    i, j = np.triu_indices(len(xs), k=1)
    dx = xs[j] - xs[i]
    ok = dx > 0
    if not ok.any():
        return None
    slope = float(np.median((ys[j] - ys[i])[ok] / dx[ok]))
    intercept = float(np.median(y - slope * x))
    return slope, intercept


def interval_load(start, end) -> np.ndarray:
    """Mean number of intervals [start, end) open during each interval, itself included."""
    start = np.asarray(start, dtype=float)
    end = np.asarray(end, dtype=float)
    n = len(start)
    if not n:
        return np.zeros(0)
    times = np.concatenate([start, end])
    delta = np.concatenate([np.ones(n), -np.ones(n)])
    order = np.lexsort((delta, times))  # at equal times, ends (-1) before starts
    t, c = times[order], np.cumsum(delta[order])
    area = np.concatenate([[0.0], np.cumsum(np.diff(t) * c[:-1])])
    last = np.concatenate([t[1:] != t[:-1], [True]])  # last event at each distinct time
    tu, au = t[last], area[last]
    dur = end - start
    with np.errstate(invalid="ignore", divide="ignore"):
        load = (np.interp(end, tu, au) - np.interp(start, tu, au)) / dur
    return np.where(dur > 0, load, 1.0)


def _load_by_call(run: Run) -> pd.Series:
    """Mean decode batch (calls between first token and finish) of each ok call of a run."""
    ok = run.ok_calls
    ok = ok[np.isfinite(ok["first_token_s"]) & (ok["first_token_s"] >= 0) & np.isfinite(ok["finish_s"])]
    load = interval_load(ok["first_token_s"].to_numpy(), ok["finish_s"].to_numpy())
    idx = pd.MultiIndex.from_arrays([ok["program_id"], ok["call_index"]])
    return pd.Series(load, index=idx).groupby(level=[0, 1]).first()


def _queue_time(pairs: pd.DataFrame, side: str) -> pd.Series:
    sched = pairs[f"scheduled_s_{side}"]
    q = sched - pairs[f"arrival_s_{side}"]
    return q.where(sched >= 0)  # a live run without the server's queue_time: -1 -> unknown


def _waiting_around(pairs: pd.DataFrame, run: Run) -> pd.Series:
    """True where the measured engine reported waiting requests at the scrapes on both sides of
    a call's arrival: a proxy for queueing when the server does not report queue times."""
    tot = timeseries_totals(run.timeseries).dropna(subset=["waiting"])
    if len(tot) < 2:
        return pd.Series(False, index=pairs.index)
    t, w = tot["t_s"].to_numpy(), tot["waiting"].to_numpy()
    arr = pairs["arrival_s_m"].to_numpy()
    before = np.clip(np.searchsorted(t, arr, side="right") - 1, 0, len(t) - 1)
    after = np.clip(before + 1, 0, len(t) - 1)
    return pd.Series((w[before] > 0) & (w[after] > 0), index=pairs.index)


def _features(pairs: pd.DataFrame, meas: Run, sim: Run) -> pd.DataFrame:
    """Per paired call: uncached tokens, queue times, batch, preemption flag, differences."""
    f = pd.DataFrame(index=pairs.index)
    for side in ("m", "s"):
        f[f"u_{side}"] = (pairs[f"input_tokens_{side}"] - pairs[f"cached_tokens_{side}"]).clip(lower=0)
        f[f"ttft_{side}"] = pairs[f"ttft_s_{side}"]
        f[f"decode_{side}"] = pairs[f"e2e_s_{side}"] - pairs[f"ttft_s_{side}"]
        f[f"q_{side}"] = _queue_time(pairs, side)
    keys = pd.MultiIndex.from_arrays([pairs["program_id"], pairs["call_index"]])
    f["batch_m"] = _load_by_call(meas).reindex(keys).to_numpy()
    f["batch_s"] = _load_by_call(sim).reindex(keys).to_numpy()
    qm_known = f["q_m"].notna()
    # queued: waited longer than two decode steps (the run's median TPOT), more than the wait
    # for the step in flight to end; idle (for the TTFT fits): no wait to speak of in either run
    f["queued_s"] = f["q_s"] > max(QUEUE_FLOOR_S, 2 * _median_tpot(sim))
    queued_m = f["q_m"] > max(QUEUE_FLOOR_S, 2 * _median_tpot(meas))
    f["queued_m"] = queued_m.where(qm_known, _waiting_around(pairs, meas)).astype(bool)
    f["queued"] = f["queued_s"].fillna(False).astype(bool) | f["queued_m"]
    no_wait_s = f["q_s"].fillna(0) <= np.maximum(QUEUE_FLOOR_S, 0.1 * f["ttft_s"])
    no_wait_m = f["q_m"].fillna(0) <= np.maximum(QUEUE_FLOOR_S, 0.1 * f["ttft_m"])
    f["idle"] = no_wait_s & no_wait_m & ~f["queued"]
    f["preempted"] = (pairs["preemptions_m"] > 0) | (pairs["preemptions_s"] > 0)
    f["d_ttft"] = f["ttft_s"] - f["ttft_m"]
    f["d_decode"] = f["decode_s"] - f["decode_m"]
    f["d_e2e"] = pairs["e2e_s_s"] - pairs["e2e_s_m"]
    f["d_cached"] = pairs["cached_tokens_s"] - pairs["cached_tokens_m"]
    multi = (pairs["output_tokens_m"] > 1) & (pairs["output_tokens_s"] > 1)
    f["tpot_m"] = pairs["tpot_s_m"].where(multi)
    f["tpot_s"] = pairs["tpot_s_s"].where(multi)
    f["d_gap"] = _gap_differences(pairs)
    f["burst"] = burst_calls(pairs)
    f["idle"] &= ~f["burst"]
    return f


def _gap_differences(pairs: pd.DataFrame) -> pd.Series:
    """sim - meas of (arrival_k - finish_{k-1}) within a program; the start offset for call 0.

    Calls whose gap is negative in either run (a DAG branch issued before k-1 ended) get NaN.
    """
    p = pairs[["program_id", "call_index", "arrival_s_m", "finish_s_m", "arrival_s_s", "finish_s_s"]]
    prev = p.copy()
    prev["call_index"] = prev["call_index"] + 1
    prev = prev.rename(columns={"finish_s_m": "pf_m", "finish_s_s": "pf_s"})
    prev = prev[["program_id", "call_index", "pf_m", "pf_s"]]
    j = p.merge(prev, on=["program_id", "call_index"], how="left")
    j.index = pairs.index
    gap_m = j["arrival_s_m"] - j["pf_m"]
    gap_s = j["arrival_s_s"] - j["pf_s"]
    d = (gap_s - gap_m).where((gap_m >= -1e-3) & (gap_s >= -1e-3))
    first = pairs["call_index"] == pairs.groupby("program_id")["call_index"].transform("min")
    return d.where(~first, pairs["arrival_s_s"] - pairs["arrival_s_m"])


def _median_tpot(run: Run) -> float:
    ok = run.ok_calls
    t = ok.loc[ok["output_tokens"] > 1, "tpot_s"].dropna()
    return float(t.median()) if len(t) else 0.0


def _ms(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x) * 1000.0


def _med(s) -> float | None:
    s = pd.Series(s, dtype=float).dropna()
    return float(s.median()) if len(s) else None


def _slower(x) -> str | None:
    if x is None or not np.isfinite(x) or abs(x) < 1e-9:
        return None
    return "simulator slower" if x > 0 else "simulator faster"


# -- the parts ---------------------------------------------------------------------------------

def _ttft_model(f: pd.DataFrame) -> dict:
    """Fits of TTFT vs uncached tokens on idle calls, per run; host, prefill and cache terms per call."""
    idle = f[f["idle"] & ~f["preempted"]]
    fit_m = theil_sen(idle["u_m"], idle["ttft_m"]) if len(idle) >= MIN_FIT_CALLS else None
    fit_s = theil_sen(idle["u_s"], idle["ttft_s"]) if len(idle) >= MIN_FIT_CALLS else None
    if (fit_m and fit_m[0] < 0) or (fit_s and fit_s[0] < 0):
        fit_m = fit_s = None  # TTFT falling with more tokens: noise dominates, no per-token term
    model = {"n_idle": int(len(idle)), "fit_m": fit_m, "fit_s": fit_s}
    zero = pd.Series(0.0, index=f.index)
    if fit_m and fit_s:
        (d_m, a_m), (d_s, a_s) = fit_m, fit_s
        model.update(host=a_s - a_m, prefill=(d_s - d_m) * f["u_s"], cache=d_m * (f["u_s"] - f["u_m"]),
                     price_per_token=d_m)
    elif len(idle):
        model.update(host=float((idle["ttft_s"] - idle["ttft_m"]).median()), prefill=None, cache=None,
                     price_per_token=None)
    else:
        model.update(host=None, prefill=None, cache=None, price_per_token=None)
    host = model["host"] or 0.0
    prefill = model["prefill"] if model["prefill"] is not None else zero
    cache = model["cache"] if model["cache"] is not None else zero
    model["residual"] = f["d_ttft"] - host - prefill - cache
    return model


def _finding(part: str, impact_s: float, mean_e2e_m: float, text: str, evidence: dict, direction=None) -> dict:
    return {"part": part, "impact_ms": float(impact_s) * 1000.0,
            "share_of_e2e": float(impact_s / mean_e2e_m) if mean_e2e_m > 0 else None,
            "direction": direction, "finding": text, "evidence": evidence}


def _host(f, model, n, e2e_m):
    if model["host"] is None:
        return None, "host overhead: no idle call (every call queued in one run or the other)"
    h = model["host"]
    idle = f[f["idle"] & ~f["preempted"]]
    ev = {"idle_calls": model["n_idle"], "offset_ms": _ms(h),
          "median_idle_ttft_diff_ms": _ms(_med(idle["d_ttft"]))}
    if model["fit_m"]:
        ev.update(measured_intercept_ms=_ms(model["fit_m"][1]), simulated_intercept_ms=_ms(model["fit_s"][1]))
        how = (f"TTFT at zero uncached tokens is {_ms(model['fit_s'][1]):.1f} ms simulated vs "
               f"{_ms(model['fit_m'][1]):.1f} ms measured")
    else:
        how = "median paired TTFT difference (too few distinct prompt sizes to separate prefill)"
    ttft_m = float(idle["ttft_m"].median()) if len(idle) else 0.0
    if abs(h) < max(1e-4, 0.02 * ttft_m):
        verdict = "per-request host/frontend overhead matches"
    else:
        verdict = f"per-request host/frontend overhead is {'over' if h > 0 else 'under'}-estimated"
    text = f"constant TTFT offset {_ms(h):+.1f} ms (sim - meas) on {model['n_idle']} idle calls: {how}; {verdict}"
    return _finding("host overhead", abs(h), e2e_m, text, ev, _slower(h)), None


def _prefill(f, model, n, e2e_m):
    if model["prefill"] is None:
        why = ("fewer than %d idle calls" % MIN_FIT_CALLS if model["n_idle"] < MIN_FIT_CALLS
               else "idle calls do not span enough prompt sizes (or measured TTFT does not grow with them)")
        return None, f"step time (prefill): {why}"
    d_m, d_s = model["fit_m"][0], model["fit_s"][0]
    rel = (d_s - d_m) / d_m if d_m > 0 else None
    idle = f["idle"] & ~f["preempted"]
    resid = model["residual"][idle].abs()
    ev = {"idle_calls": model["n_idle"], "measured_ms_per_1k_tokens": d_m * 1e6,
          "simulated_ms_per_1k_tokens": d_s * 1e6, "rel_error": rel,
          "median_abs_unexplained_idle_ttft_ms": _ms(_med(resid))}
    text = (f"prefill cost {d_s * 1e6:.2f} ms per 1k uncached tokens simulated vs {d_m * 1e6:.2f} ms measured"
            + (f" ({100 * rel:+.0f}%)" if rel is not None else "") + f", fitted on {model['n_idle']} idle calls")
    return _finding("step time (prefill)", float(model["prefill"].abs().mean()), e2e_m, text, ev,
                    _slower(d_s - d_m)), None


def _cache(f, model, n, e2e_m, hit_rate_points):
    dc = f["d_cached"]
    if dc.isna().all():
        return None, "cache hits: a run does not record its cached tokens per call"
    mism = dc != 0
    ev = {"calls_equal_cached": int((~mism).sum()), "calls_sim_more": int((dc > 0).sum()),
          "calls_sim_fewer": int((dc < 0).sum()), "mean_cached_diff_tokens": float(dc.mean()),
          "hit_rate_diff_points": hit_rate_points}
    if model["cache"] is not None:
        impact = float(model["cache"].abs().mean())
        ev["priced_at_ms_per_1k_tokens"] = model["price_per_token"] * 1e6
        how = f"priced at the measured {model['price_per_token'] * 1e6:.2f} ms per 1k prefill tokens"
    else:
        matched = f.loc[~mism, "d_ttft"]
        base = float(matched.median()) if len(matched) else 0.0
        impact = float(((f["d_ttft"] - base).abs() * mism).mean())
        how = "TTFT difference of mismatched calls beyond that of matched ones"
    ev["ttft_impact_ms"] = impact * 1000.0
    share = 100.0 * (~mism).mean()
    text = (f"{share:.0f}% of calls hit the prefix cache for the same number of tokens; the simulator "
            f"caches {dc.mean():+.0f} tokens per call on average"
            + (f" (hit rate {hit_rate_points:+.1f} points)" if hit_rate_points is not None else "")
            + f"; {how}")
    return _finding("cache hits", impact, e2e_m, text, ev, _slower(-dc.mean()) if dc.mean() else None), None


def _queueing(f, model, n, e2e_m, meas: Run, tsmeans: dict):
    q = f["queued"]
    if not q.any():
        return None, "queueing: no call waited in either run"
    resid = model["residual"]
    impact = float((resid.abs() * q).sum() / n)
    total_abs = float(f["d_ttft"].abs().sum())
    ev = {"queued_calls": int(q.sum()), "queued_in_sim": int(f["queued_s"].fillna(False).sum()),
          "queued_in_measured": int(f["queued_m"].sum()),
          "measured_queue_source": "scheduled_s" if f["q_m"].notna().any() else "timeseries waiting (proxy)",
          "median_ttft_diff_queued_ms": _ms(_med(f.loc[q, "d_ttft"])),
          "median_ttft_diff_idle_ms": _ms(_med(f.loc[~q, "d_ttft"])),
          "share_of_abs_ttft_error": float(f.loc[q, "d_ttft"].abs().sum() / total_abs) if total_abs else None,
          "sim_queue_p90_ms": _ms(f.loc[f["queued_s"].fillna(False), "q_s"].quantile(0.9))
          if f["queued_s"].fillna(False).any() else None,
          "mean_waiting_measured": tsmeans["waiting"]["measured_mean"],
          "mean_waiting_simulated": tsmeans["waiting"]["simulated_mean"]}
    med_r = _med(resid[q])
    text = (f"{int(q.sum())} of {n} calls waited (sim {ev['queued_in_sim']}, measured {ev['queued_in_measured']}); "
            f"they carry {100 * (ev['share_of_abs_ttft_error'] or 0):.0f}% of the |TTFT error|, median TTFT "
            f"difference {ev['median_ttft_diff_queued_ms']:+.1f} ms vs {ev['median_ttft_diff_idle_ms'] or 0:+.1f} ms "
            f"on the others")
    if ev["mean_waiting_measured"] is not None and ev["mean_waiting_simulated"] is not None:
        text += (f"; mean waiting requests {ev['mean_waiting_simulated']:.2f} sim vs "
                 f"{ev['mean_waiting_measured']:.2f} measured")
    return _finding("queueing", impact, e2e_m, text, ev, _slower(med_r) if med_r else None), None


def _decode(f, n, e2e_m):
    ok = f[~f["preempted"] & ~f["burst"] & f["tpot_m"].notna() & (f["tpot_m"] > 0)]
    if not len(ok):
        return None, "step time (decode): no paired call with more than one output token"
    impact = float(f.loc[~f["preempted"], "d_decode"].abs().sum() / n)
    rel = (ok["tpot_s"] - ok["tpot_m"]) / ok["tpot_m"]
    alone = ok["batch_m"] < UNLOADED_BATCH
    loaded_cut = max(UNLOADED_BATCH, float(ok["batch_m"].quantile(0.5)))
    loaded = ok["batch_m"] >= loaded_cut
    ev = {"calls": int(len(ok)), "unloaded_calls": int(alone.sum()),
          "unloaded_tpot_rel_error": _med(rel[alone]), "loaded_calls": int(loaded.sum()),
          "loaded_min_batch": loaded_cut, "loaded_tpot_rel_error": _med(rel[loaded]),
          "median_decode_diff_ms": _ms(_med(f.loc[~f["preempted"], "d_decode"]))}
    fm = theil_sen(ok["batch_m"], ok["tpot_m"]) if len(ok) >= 2 * MIN_FIT_CALLS else None
    fs = theil_sen(ok["batch_s"], ok["tpot_s"]) if len(ok) >= 2 * MIN_FIT_CALLS else None
    if fm and fs and min(fm[0], fs[0]) < 0:
        fm = fs = None  # TPOT falling with batch: noise, no per-sequence cost to report
    if fm and fs:
        ev.update(measured_tpot_at_batch1_ms=_ms(fm[1] + fm[0]), simulated_tpot_at_batch1_ms=_ms(fs[1] + fs[0]),
                  measured_ms_per_extra_seq=_ms(fm[0]), simulated_ms_per_extra_seq=_ms(fs[0]))
    parts = []
    if ev["unloaded_tpot_rel_error"] is not None:
        parts.append(f"TPOT {100 * ev['unloaded_tpot_rel_error']:+.0f}% on {ev['unloaded_calls']} calls that ran alone")
    if ev["loaded_tpot_rel_error"] is not None and loaded.sum() and loaded_cut > UNLOADED_BATCH:
        parts.append(f"{100 * ev['loaded_tpot_rel_error']:+.0f}% on {ev['loaded_calls']} calls "
                     f"at batch >= {loaded_cut:.1f}")
    if not parts:
        parts.append(f"TPOT {100 * _med(rel):+.0f}% median over {len(ok)} calls")
    u, l = ev["unloaded_tpot_rel_error"], ev["loaded_tpot_rel_error"]
    if u is not None and l is not None and loaded_cut > UNLOADED_BATCH and abs(l - u) >= 0.10:
        why = "the error changes with batch size: the batch-dependent cost (KV reads, attention, per-sequence overhead)"
    elif u is not None and abs(u) >= 0.10:
        why = "off already at batch 1: the base decode step (weight reads, per-step overhead)"
    else:
        why = "decode step time is close"
    if fm and fs:
        why += (f"; fitted per extra sequence {ev['simulated_ms_per_extra_seq']:.3f} ms sim vs "
                f"{ev['measured_ms_per_extra_seq']:.3f} ms measured")
    text = "decode: " + ", ".join(parts) + f"; {why}"
    med = _med(rel)
    return _finding("step time (decode)", impact, e2e_m, text, ev, _slower(med) if med else None), None


def _preemption(f, n, e2e_m, meas: Run, sim: Run, tsmeans: dict):
    pm, ps = measured_preemptions(meas), measured_preemptions(sim)
    flagged = f["preempted"]
    if not pm and not ps:
        return None, "preemption: no preemption in either run"
    # a preempted request is recomputed: its decode stalls (its TTFT, if preempted before the
    # first token, stays in the TTFT terms), so the decode difference of those calls goes here
    impact = float((f["d_decode"].abs() * flagged).sum() / n)
    ev = {"measured": pm, "simulated": ps, "paired_calls_preempted": int(flagged.sum()),
          "median_decode_diff_preempted_ms": _ms(_med(f.loc[flagged, "d_decode"])),
          "median_decode_diff_others_ms": _ms(_med(f.loc[~flagged, "d_decode"])),
          "mean_kv_usage_measured": tsmeans["kv_usage"]["measured_mean"],
          "mean_kv_usage_simulated": tsmeans["kv_usage"]["simulated_mean"]}
    text = f"preemptions: {ps} simulated vs {pm} measured"
    if flagged.any():
        text += (f"; decode of the {int(flagged.sum())} preempted calls differs by median "
                 f"{ev['median_decode_diff_preempted_ms']:+.1f} ms vs "
                 f"{ev['median_decode_diff_others_ms'] or 0:+.1f} ms "
                 "on the others")
    else:
        text += " (the measured run counts them only in aggregate: per-call effect unknown)"
    ku_m, ku_s = ev["mean_kv_usage_measured"], ev["mean_kv_usage_simulated"]
    if ku_m is not None and ku_s is not None:
        text += f"; mean KV usage {100 * ku_s:.0f}% simulated vs {100 * ku_m:.0f}% measured"
        if max(ku_m, ku_s) > 0 and abs(ku_s - ku_m) >= 0.2 * max(ku_m, ku_s):
            text += " (check the KV capacity: num_gpu_blocks)"
    return _finding("preemption", impact, e2e_m, text, ev, _slower(ps - pm)), None


def _orchestration(f, pairs, n, e2e_m):
    g = f["d_gap"]
    if not g.notna().any():
        return None, "orchestration/client: no consecutive calls to compare"
    impact = float(g.abs().sum() / n)
    ev = {"calls": int(g.notna().sum()), "median_gap_diff_ms": _ms(_med(g)),
          "p90_abs_gap_diff_ms": _ms(float(g.abs().quantile(0.9)))}
    text = f"the gap before each call (tool time + client) differs by median {ev['median_gap_diff_ms']:+.1f} ms"
    if "issue_lag_s" in pairs.columns and pairs["issue_lag_s"].notna().any():
        lag = pairs["issue_lag_s"].fillna(0.0)
        ev.update(issue_lag_mean_ms=_ms(float(lag.mean())), issue_lag_p99_ms=_ms(float(lag.quantile(0.99))))
        late = -g[g.notna()]
        if late.sum() > 0:
            ev["share_explained_by_issue_lag"] = float(lag[g.notna()].sum() / late.sum())
        text += (f"; measured client issue lag mean {ev['issue_lag_mean_ms']:.1f} ms, "
                 f"p99 {ev['issue_lag_p99_ms']:.1f} ms"
                 + (f" ({100 * ev['share_explained_by_issue_lag']:.0f}% of the extra measured gap)"
                    if "share_explained_by_issue_lag" in ev else ""))
    drift = _drift(f, pairs)
    if drift:
        ev.update(drift)
        text += (f"; by a program's last call, arrival differs by median {drift['last_call_arrival_diff_s']:+.3f} s "
                 f"({drift['from_latency_s']:+.3f} s from earlier calls' latency, "
                 f"{drift['from_gaps_s']:+.3f} s from gaps)")
    return _finding("orchestration/client", impact, e2e_m, text, ev, _slower(ev["median_gap_diff_ms"] or 0)), None


def _drift(f, pairs) -> dict | None:
    """At each program's last paired call: arrival difference, and how much of it is earlier
    calls' E2E error vs gap differences (for chains, they add up)."""
    df = pd.DataFrame({"program_id": pairs["program_id"], "k": pairs["call_index"],
                       "d_arr": pairs["arrival_s_s"] - pairs["arrival_s_m"], "d_e2e": f["d_e2e"], "d_gap": f["d_gap"]})
    df = df.sort_values(["program_id", "k"], kind="stable")
    multi = df.groupby("program_id")["k"].transform("size") > 1
    df = df[multi]
    if not len(df):
        return None
    g = df.groupby("program_id", sort=False)
    last = g.tail(1).set_index("program_id")
    e2e_before = (g["d_e2e"].sum() - last["d_e2e"])
    gaps = g["d_gap"].sum(min_count=1)
    return {"programs": int(len(last)), "last_call_arrival_diff_s": float(last["d_arr"].median()),
            "from_latency_s": float(e2e_before.median()), "from_gaps_s": float(gaps.median())}


# -- all of it ---------------------------------------------------------------------------------

def diagnose(pairs: pd.DataFrame, meas: Run, sim: Run) -> dict:
    """{"findings": ranked list (largest impact first), "not_assessed": [reasons]}."""
    from .compare import timeseries_means

    n = len(pairs)
    if n == 0:
        return {"findings": [], "not_assessed": ["everything: no call succeeded in both runs"]}
    f = _features(pairs, meas, sim)
    model = _ttft_model(f)
    e2e_m = float(pairs["e2e_s_m"].mean())
    tin_m, tin_s = pairs["input_tokens_m"].sum(), pairs["input_tokens_s"].sum()
    recorded = not (pairs["cached_tokens_m"].isna().all() or pairs["cached_tokens_s"].isna().all())
    hit_pts = (100.0 * (pairs["cached_tokens_s"].sum() / tin_s - pairs["cached_tokens_m"].sum() / tin_m)
               if tin_m and tin_s and recorded else None)
    tsm = timeseries_means(meas, sim)
    results = [
        _host(f, model, n, e2e_m),
        _prefill(f, model, n, e2e_m),
        _cache(f, model, n, e2e_m, hit_pts),
        _queueing(f, model, n, e2e_m, meas, tsm),
        _decode(f, n, e2e_m),
        _preemption(f, n, e2e_m, meas, sim, tsm),
        _orchestration(f, pairs, n, e2e_m),
    ]
    findings = [r for r, _ in results if r is not None]
    findings.sort(key=lambda x: -x["impact_ms"])
    for rank, x in enumerate(findings, 1):
        x["rank"] = rank
        x["minor"] = bool(x["share_of_e2e"] is not None and x["share_of_e2e"] < MINOR_SHARE)
    return {"findings": findings, "not_assessed": [why for _, why in results if why is not None]}
