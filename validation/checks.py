"""Warnings a comparison raises about itself (pyperf-style): when its numbers do not mean
what they seem to, say so next to them.

Every warning is computed from the two runs; each is {"code", "message"} with the numbers
that triggered it in the message. No warning means the check ran and found nothing.
"""

from __future__ import annotations

from pathlib import PurePath

import numpy as np
import pandas as pd

from .compare import Run

MIN_PAIRED_CALLS = 30        # fewer paired calls: percentiles (p99 above all) are noise
NOISY_CV = 0.10              # pyperf's threshold: spread >= 10% of the mean is unstable
CLIENT_LAG_FRACTION = 0.10   # client issue lag p99 >= 10% of median TTFT: the client fell behind
IGNORED_CONFIG_KEYS = ("metrics.",)  # sampling settings do not change the served calls


def _w(code: str, message: str) -> dict:
    return {"code": code, "message": message}


def check_paired_count(pairs: pd.DataFrame) -> list[dict]:
    n = len(pairs)
    if n < MIN_PAIRED_CALLS:
        return [_w("too_few_calls", f"only {n} calls succeeded in both runs (< {MIN_PAIRED_CALLS}): "
                                    "percentiles and per-call statistics are not reliable")]
    return []


def _explained_missing(run: Run) -> set:
    """Programs whose missing calls a failure explains (a live program stops at its first failure)."""
    bad = set(run.calls.loc[run.calls["status"] != "ok", "program_id"])
    bad |= set(run.programs.loc[run.programs["status"] != "ok", "program_id"])
    return bad


def check_same_trace(pairs: pd.DataFrame, meas: Run, sim: Run) -> list[dict]:
    out = []
    tm, ts = meas.summary.get("trace"), sim.summary.get("trace")
    if tm and ts and PurePath(str(tm)).name != PurePath(str(ts)).name:
        out.append(_w("traces_differ", f"the runs name different traces: measured {tm}, simulated {ts}"))
    km = set(zip(meas.calls["program_id"], meas.calls["call_index"]))
    ks = set(zip(sim.calls["program_id"], sim.calls["call_index"]))
    only_m, only_s = km - ks, ks - km
    if meas.summary.get("interrupted"):
        only_s = set()  # an interrupted run is reported by itself
    if sim.summary.get("interrupted"):
        only_m = set()
    only_m = {k for k in only_m if k[0] not in _explained_missing(sim)}
    only_s = {k for k in only_s if k[0] not in _explained_missing(meas)}
    if only_m or only_s:
        ex = sorted(only_m | only_s)[:3]
        out.append(_w("traces_differ", f"the call sets differ: {len(only_m)} calls only measured, {len(only_s)} only "
                                       f"simulated (e.g. {', '.join(f'{p}#{k}' for p, k in ex)})"))
    for col, what in (("input_tokens", "prompt lengths"), ("output_tokens", "output lengths")):
        diff = pairs[f"{col}_m"] != pairs[f"{col}_s"]
        if diff.any():
            d = (pairs[f"{col}_s"] - pairs[f"{col}_m"])[diff]
            out.append(_w("traces_differ", f"{what} differ on {int(diff.sum())} of {len(pairs)} paired calls "
                                           f"(sim - meas: median {d.median():+.0f}, max |{d.abs().max():.0f}| tokens)"))
    return out


def _weighted_cv(values: pd.Series, groups: pd.Series, min_group: int = 5) -> tuple[float | None, int]:
    """Mean coefficient of variation within groups of >= min_group calls, weighted by group size."""
    cvs, ws = [], []
    for _, v in values.groupby(groups):
        v = v.dropna()
        if len(v) >= min_group and v.mean() > 0:
            cvs.append(float(v.std(ddof=1) / v.mean()))
            ws.append(len(v))
    if not ws:
        return None, 0
    return float(np.average(cvs, weights=ws)), int(sum(ws))


def check_noise(pairs: pd.DataFrame, meas: Run) -> list[dict]:
    from .diagnose import BURST_FRACTION, _load_by_call, burst_calls

    out = []
    is_multi = (pairs["output_tokens_m"] > 1) & (pairs["output_tokens_s"] > 1)
    multi = pairs[is_multi]
    if len(multi):
        med = float(multi["tpot_s_m"].median())
        burst = burst_calls(pairs)[is_multi]
        if burst.any():
            out.append(_w("noisy_measurement",
                          f"{int(burst.sum())} measured calls have TPOT under {100 * BURST_FRACTION:.0f}% "
                          "of the median "
                          f"({1000 * med:.2f} ms): their tokens reached the client in one burst, so TPOT and ITL "
                          "there measure the stream's buffering, not decode steps"))
        keys = pd.MultiIndex.from_arrays([multi["program_id"], multi["call_index"]])
        batch = pd.Series(_load_by_call(meas).reindex(keys).to_numpy(), index=multi.index).round()
        cv_m, n_m = _weighted_cv(multi["tpot_s_m"][~burst], batch[~burst])
        cv_s, _ = _weighted_cv(multi["tpot_s_s"][~burst], batch[~burst])
        if cv_m is not None and cv_m >= NOISY_CV and cv_m > 2 * (cv_s or 0.0):
            out.append(_w("noisy_measurement",
                          f"measured TPOT varies by {100 * cv_m:.0f}% (coefficient of variation) across {n_m} calls "
                          f"at the same batch size, the simulator's by {100 * (cv_s or 0):.0f}%: the measured "
                          "machine was noisy (other load, frequency scaling) and per-call TPOT errors are "
                          "partly noise"))
    if "issue_lag_s" in meas.calls.columns and len(pairs):
        lag = meas.calls["issue_lag_s"].dropna()
        ttft = float(pairs["ttft_s_m"].median())
        if len(lag) and ttft > 0:
            p99 = float(np.percentile(lag, 99))
            if p99 >= max(CLIENT_LAG_FRACTION * ttft, 1e-3):
                out.append(_w("client_lag",
                              f"the measuring client issued calls late: issue lag p99 {1000 * p99:.1f} ms is "
                              f"{100 * p99 / ttft:.0f}% of the median measured TTFT ({1000 * ttft:.1f} ms): "
                              "the client could not keep up, so arrivals (and load) differ from the plan"))
    return out


def check_failures(meas: Run, sim: Run) -> list[dict]:
    out = []
    for name, run in (("measured", meas), ("simulated", sim)):
        bad = run.calls[run.calls["status"] != "ok"]
        if len(bad):
            errs = bad["error"].dropna() if "error" in bad.columns else pd.Series(dtype=object)
            first = str(errs.iloc[0])[:120] if len(errs) else ""
            out.append(_w("failed_calls", f"{len(bad)} of {len(run.calls)} {name} calls failed; they are left out of "
                                          "every statistic" + (f" (first: {first})" if first else "")))
        if run.summary.get("interrupted"):
            out.append(_w("interrupted", f"the {name} run was interrupted: it covers only part of the trace "
                                         f"({len(run.calls)} calls, {len(run.programs)} programs finished)"))
    return out


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def _block_gcd(cached: pd.Series) -> tuple[int | None, int]:
    c = cached.dropna().astype(int)
    c = c[c > 0]
    return (int(np.gcd.reduce(c.to_numpy())) if len(c) else None), int(len(c))


def _simulated_config_diffs(sm: dict, ss: dict) -> list[dict]:
    """Two simulated runs: every config, resolved-engine and profile key that differs."""
    fm, fs = _flatten(sm.get("config") or {}), _flatten(ss.get("config") or {})
    fm.update(_flatten((sm.get("deployment") or {}).get("engine") or {}, "engine(resolved)."))
    fs.update(_flatten((ss.get("deployment") or {}).get("engine") or {}, "engine(resolved)."))
    fm.update(_flatten(sm.get("profile") or {}, "profile."))
    fs.update(_flatten(ss.get("profile") or {}, "profile."))
    diff = [k for k in sorted(set(fm) | set(fs)) if not k.startswith(IGNORED_CONFIG_KEYS) and fm.get(k) != fs.get(k)]
    if not diff:
        return []
    shown = "; ".join(f"{k} {fm.get(k)!r} vs {fs.get(k)!r}" for k in diff[:6])
    return [_w("configs_differ", f"{len(diff)} configuration key(s) differ (measured vs simulated): {shown}"
                                 + (" ..." if len(diff) > 6 else ""))]


def _live_config_diffs(sm: dict, ss: dict) -> list[dict]:
    """A live run against a simulated one: what the live summary knows (client settings, server)."""
    out = []
    cfg, scfg = sm.get("config") or {}, ss.get("config") or {}
    eng = (ss.get("deployment") or {}).get("engine") or {}
    ts_live = cfg.get("time_scale", 1.0)
    ts_sim = (scfg.get("tools") or {}).get("time_scale", 1.0)
    if ts_live not in (None, 1.0, 1):
        out.append(_w("configs_differ", f"the measured run scaled arrivals and tool gaps by {ts_live}; the "
                                        f"simulator scales only tool gaps (tools.time_scale={ts_sim})"))
    elif ts_sim not in (None, 1.0, 1):
        out.append(_w("configs_differ", f"the simulator scaled tool gaps by {ts_sim}, the measured run did not"))
    if cfg.get("max_inflight"):
        out.append(_w("configs_differ", f"the measuring client capped calls in flight at {cfg['max_inflight']}; "
                                        "the simulator has no such cap"))
    server = (sm.get("profile") or {}).get("server") or {}
    if server.get("max_model_len") and eng.get("max_model_len") and server["max_model_len"] != eng["max_model_len"]:
        out.append(_w("configs_differ", f"max_model_len: measured server {server['max_model_len']}, "
                                        f"simulated {eng['max_model_len']}"))
    names = {str(x) for x in ((sm.get("profile") or {}).get("model"), server.get("root")) if x}
    names |= {PurePath(n).name for n in names}
    sim_model = (ss.get("profile") or {}).get("model")
    if sim_model and names and str(sim_model) not in names and PurePath(str(sim_model)).name not in names:
        out.append(_w("configs_differ", f"models may differ: measured server serves {sorted(names)}, the "
                                        f"simulator modelled {sim_model}"))
    return out


def _block_size_diffs(meas: Run, sim: Run) -> list[dict]:
    """Prefix-cache hits come in whole blocks: their common divisor betrays the block size."""
    bs = ((sim.summary.get("deployment") or {}).get("engine") or {}).get("block_size")
    g_m, n_m = _block_gcd(meas.ok_calls["cached_tokens"])
    g_s, n_s = _block_gcd(sim.ok_calls["cached_tokens"])
    if bs and g_m and n_m >= 3 and g_m % int(bs):
        return [_w("configs_differ", f"measured prefix-cache hits are multiples of {g_m} tokens, not of the "
                                     f"simulated block size {bs}: the block sizes differ")]
    if g_m and g_s and n_m >= 10 and n_s >= 10 and g_s < g_m and g_m % g_s == 0:
        return [_w("configs_differ", f"measured prefix-cache hits are all multiples of {g_m} tokens, simulated "
                                     f"ones of {g_s}: the block sizes probably differ")]
    return []


def check_configs(meas: Run, sim: Run) -> list[dict]:
    """Configuration differences that are known from both summaries."""
    if meas.backend == sim.backend == "simulator":
        return _simulated_config_diffs(meas.summary, sim.summary)
    out = []
    if meas.backend == "live" and sim.backend == "simulator":
        out += _live_config_diffs(meas.summary, sim.summary)
    return out + _block_size_diffs(meas, sim)


def run_checks(pairs: pd.DataFrame, meas: Run, sim: Run) -> list[dict]:
    """All warnings about a comparison, most basic first."""
    return (check_paired_count(pairs) + check_same_trace(pairs, meas, sim) + check_failures(meas, sim)
            + check_noise(pairs, meas) + check_configs(meas, sim))


def check_within_noise(metrics: dict, runs: int) -> list[dict]:
    """With repeated measurements: which headline errors the measurement's own run-to-run
    spread could explain, and which measurements were unstable (pyperf's 10%)."""
    from .compare import LATENCY_METRICS
    unstable, within = [], []
    for key, label, _ in LATENCY_METRICS:
        row = metrics[key]["mean"]
        noise, err = row.get("noise"), row.get("error")
        if noise is None:
            continue
        if noise >= NOISY_CV:
            unstable.append(f"mean {label} {100 * noise:.0f}%")
        if err is not None and abs(err) <= noise:
            within.append(f"mean {label}")
    out = []
    if unstable:
        out.append(_w("noisy_measurement",
                      f"{runs} measured runs of the same trace differ by " + ", ".join(unstable)
                      + " ((max - min) / median): errors below that spread are not meaningful"))
    if within:
        out.append(_w("within_noise", "errors of " + ", ".join(within) + " are within the measured runs' own "
                                      "spread"))
    return out
