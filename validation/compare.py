"""Compare a measured run with a simulated run of the same trace: how far off, per metric.

Both directories are in the results layout of ../shared/DESIGN.md ("Results"). Aggregates
(mean, p50, p90, p99 of TTFT, TPOT, E2E, JCT; ITL from summary.json; throughput; prefix-cache
hit rate; preemptions) are computed from each run's own successful calls, the way
`simulator.metrics.summarize` does. Per-call errors pair the two runs' calls on
(program_id, call_index), keeping calls that succeeded in both. Every error is signed
(simulated - measured) / measured: positive means the simulator is slower or higher.

`compare()` returns the content of errors.json: the tables, the ranked findings of
`validation.diagnose`, and the warnings of `validation.checks`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from replay.results import load_results, load_steps
from simulator.metrics import STEP_COLUMNS

SCHEMA = "agentservesim.validation.errors/1"
PAIR_KEYS = ("program_id", "call_index")
STATS = ("mean", "p50", "p90", "p99")
REQUIRED_CALL_COLUMNS = ("program_id", "call_index", "arrival_s", "first_token_s", "finish_s", "input_tokens",
                         "cached_tokens", "output_tokens", "ttft_s", "tpot_s", "e2e_s")
REQUIRED_PROGRAM_COLUMNS = ("program_id", "jct_s")
_NUMERIC_CALL_COLUMNS = ("arrival_s", "scheduled_s", "first_token_s", "finish_s", "input_tokens", "cached_tokens",
                         "output_tokens", "ttft_s", "tpot_s", "e2e_s", "preemptions", "issue_lag_s")


class ResultsInputError(ValueError):
    """A results directory a user passed is missing, incomplete or unreadable."""


@dataclass(frozen=True)
class Run:
    """One results directory, loaded and normalised (ids as strings, status filled in)."""

    path: str
    calls: pd.DataFrame
    programs: pd.DataFrame
    timeseries: pd.DataFrame
    summary: dict
    steps: pd.DataFrame | None = None  # steps.csv, when the run has one

    @property
    def ok_calls(self) -> pd.DataFrame:
        return self.calls[self.calls["status"] == "ok"]

    @property
    def ok_programs(self) -> pd.DataFrame:
        return self.programs[self.programs["status"] == "ok"]

    @property
    def backend(self) -> str:
        return str(self.summary.get("backend", "unknown"))


# -- loading -----------------------------------------------------------------------------

def load_run(d) -> Run:
    """Load a results directory; a user error (missing, incomplete, unreadable) is ResultsInputError."""
    p = Path(d)
    if not p.is_dir():
        raise ResultsInputError(f"{d}: no such directory")
    try:
        calls, programs, ts, summary = load_results(p)
    except FileNotFoundError as e:
        raise ResultsInputError(str(e)) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsInputError(f"{p}: unreadable results file ({e.__class__.__name__}: {e})") from None
    if not isinstance(summary, dict):
        raise ResultsInputError(f"{p}/summary.json: expected a JSON object")
    for name, df, cols in (("calls.csv", calls, REQUIRED_CALL_COLUMNS),
                           ("programs.csv", programs, REQUIRED_PROGRAM_COLUMNS)):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ResultsInputError(f"{p}/{name}: missing column(s) {', '.join(missing)}")
    try:
        steps = load_steps(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        steps = None  # optional; a broken one is left out
    if steps is not None and any(c not in steps.columns for c in STEP_COLUMNS):
        steps = None
    return Run(str(p), _normalise_calls(calls), _normalise_programs(programs), ts, summary, steps)


def _normalise_calls(calls: pd.DataFrame) -> pd.DataFrame:
    c = calls.copy()
    c["program_id"] = c["program_id"].astype(str)
    c["call_index"] = pd.to_numeric(c["call_index"], errors="coerce").fillna(-1).astype(int)
    for col in _NUMERIC_CALL_COLUMNS:
        if col in c.columns:
            c[col] = pd.to_numeric(c[col], errors="coerce")
    if "preemptions" not in c.columns:
        c["preemptions"] = 0
    c["preemptions"] = c["preemptions"].fillna(0)
    if "scheduled_s" not in c.columns:
        c["scheduled_s"] = np.nan
    c["status"] = c["status"].fillna("ok").astype(str) if "status" in c.columns else "ok"
    return c


def _normalise_programs(programs: pd.DataFrame) -> pd.DataFrame:
    p = programs.copy()
    p["program_id"] = p["program_id"].astype(str)
    p["jct_s"] = pd.to_numeric(p["jct_s"], errors="coerce")
    p["status"] = p["status"].fillna("ok").astype(str) if "status" in p.columns else "ok"
    return p


# -- small arithmetic ----------------------------------------------------------------------

def rel_error(measured, simulated) -> float | None:
    """(simulated - measured) / measured; None when either is missing or measured is 0."""
    if measured is None or simulated is None:
        return None
    m, s = float(measured), float(simulated)
    if not (math.isfinite(m) and math.isfinite(s)) or m == 0.0:
        return None
    return (s - m) / m


def stat_block(values) -> dict[str, float | None]:
    """mean, p50, p90, p99 (numpy's linear percentiles, as vllm bench); None for an empty sample."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {k: None for k in STATS}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
            "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99))}


def _num(x) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# -- aggregates --------------------------------------------------------------------------

LATENCY_METRICS = (  # key in errors.json, label, unit
    ("ttft_ms", "TTFT", "ms"), ("tpot_ms", "TPOT", "ms"), ("itl_ms", "ITL", "ms"),
    ("e2e_ms", "E2E", "ms"), ("jct_s", "program JCT", "s"))
SCALAR_METRICS = (
    ("request_throughput", "request throughput", "req/s"),
    ("output_throughput", "output-token throughput", "tok/s"),
    ("prefix_cache_hit_rate", "prefix-cache hit rate", "%"),
    ("preemptions", "preemptions", "count"))


def measured_preemptions(run: Run) -> int:
    """Preemptions of a run: per-call counts, or the engine's counter in timeseries.csv when larger
    (a live run cannot see preemptions per call; vLLM's /metrics counts them)."""
    n = int(run.calls["preemptions"].sum())
    ts = run.timeseries
    if len(ts) and "preemptions_total" in ts.columns and "instance" in ts.columns:
        per = ts.dropna(subset=["preemptions_total"]).groupby("instance")["preemptions_total"]
        if len(per):
            n = max(n, int((per.max() - per.min()).sum()))
    return n


def run_aggregates(run: Run) -> dict:
    """The aggregate numbers of one run, in the units of LATENCY_METRICS / SCALAR_METRICS."""
    ok = run.ok_calls
    multi = ok[ok["output_tokens"] > 1]
    out = {
        "ttft_ms": stat_block(ok["ttft_s"] * 1000.0),
        "tpot_ms": stat_block(multi["tpot_s"] * 1000.0),
        "itl_ms": {k: _num(run.summary.get(f"{'median' if k == 'p50' else k}_itl_ms")) for k in STATS},
        "e2e_ms": stat_block(ok["e2e_s"] * 1000.0),
        "jct_s": stat_block(run.ok_programs["jct_s"]),
    }
    if len(ok):
        duration = float(ok["finish_s"].max() - run.calls["arrival_s"].min())
        duration = max(duration, 1e-12)
        out["request_throughput"] = len(ok) / duration
        out["output_throughput"] = float(ok["output_tokens"].sum()) / duration
    else:
        out["request_throughput"] = out["output_throughput"] = None
    tin = float(ok["input_tokens"].sum())
    # (None where the run did not record its cached tokens: an importer's blank column)
    recorded = len(ok) and not ok["cached_tokens"].isna().all()
    out["prefix_cache_hit_rate"] = 100.0 * float(ok["cached_tokens"].sum()) / tin if tin and recorded else None
    out["preemptions"] = measured_preemptions(run)
    return out


def _row(m, s, kind: str = "relative") -> dict:
    if kind == "relative":
        err = rel_error(m, s)
    else:  # "points" (percentage points) or "difference" (a count)
        err = None if m is None or s is None else float(s) - float(m)
    return {"measured": m, "simulated": s, "error": err, "error_kind": kind}


def aggregate_errors(meas: dict, sim: dict) -> dict:
    """metric -> stat -> {measured, simulated, error, error_kind}."""
    table = {}
    for key, _, _ in LATENCY_METRICS:
        table[key] = {st: _row(meas[key][st], sim[key][st]) for st in STATS}
    table["request_throughput"] = {"value": _row(meas["request_throughput"], sim["request_throughput"])}
    table["output_throughput"] = {"value": _row(meas["output_throughput"], sim["output_throughput"])}
    table["prefix_cache_hit_rate"] = {"value": _row(meas["prefix_cache_hit_rate"], sim["prefix_cache_hit_rate"],
                                                    "points")}
    table["preemptions"] = {"count": _row(meas["preemptions"], sim["preemptions"], "difference")}
    return table


# -- pairing -------------------------------------------------------------------------------

def pair_calls(meas: Run, sim: Run) -> pd.DataFrame:
    """Calls that succeeded in both runs, joined on (program_id, call_index); columns *_m, *_s."""
    m = meas.ok_calls.drop_duplicates(list(PAIR_KEYS))
    s = sim.ok_calls.drop_duplicates(list(PAIR_KEYS))
    j = m.merge(s, on=list(PAIR_KEYS), suffixes=("_m", "_s"), how="inner")
    return j.sort_values(list(PAIR_KEYS), kind="stable").reset_index(drop=True)


def call_sets(meas: Run, sim: Run) -> dict[str, int]:
    """How the two runs' calls overlap (all statuses), and how many pair up ok in both."""
    km = set(zip(meas.calls["program_id"], meas.calls["call_index"]))
    ks = set(zip(sim.calls["program_id"], sim.calls["call_index"]))
    return {"measured": int(len(meas.calls)), "simulated": int(len(sim.calls)),
            "measured_ok": int(len(meas.ok_calls)), "simulated_ok": int(len(sim.ok_calls)),
            "in_both": len(km & ks), "only_measured": len(km - ks), "only_simulated": len(ks - km),
            "duplicates_measured": int(len(meas.calls) - len(km)),
            "duplicates_simulated": int(len(sim.calls) - len(ks))}


def paired_stats(measured, simulated) -> dict:
    """Per-call errors of one metric: |relative error| median and p90, mean signed error, correlation."""
    m = np.asarray(measured, dtype=float)
    s = np.asarray(simulated, dtype=float)
    keep = np.isfinite(m) & np.isfinite(s) & (m > 0)
    m, s = m[keep], s[keep]
    n = int(len(m))
    if not n:
        return {"n": 0, "median_abs_rel_error": None, "p90_abs_rel_error": None, "mean_signed_rel_error": None,
                "median_signed_diff_ms": None, "correlation": None}
    r = (s - m) / m
    corr = None
    if n >= 3 and np.std(m) > 0 and np.std(s) > 0:
        corr = float(np.corrcoef(m, s)[0, 1])
    return {"n": n, "median_abs_rel_error": float(np.median(np.abs(r))),
            "p90_abs_rel_error": float(np.percentile(np.abs(r), 90)),
            "mean_signed_rel_error": float(r.mean()),
            "median_signed_diff_ms": float(np.median(s - m) * 1000.0), "correlation": corr}


def paired_errors(pairs: pd.DataFrame, meas: Run, sim: Run) -> dict:
    multi = pairs[(pairs["output_tokens_m"] > 1) & (pairs["output_tokens_s"] > 1)]
    out = {
        "ttft": paired_stats(pairs["ttft_s_m"], pairs["ttft_s_s"]),
        "tpot": paired_stats(multi["tpot_s_m"], multi["tpot_s_s"]),
        "e2e": paired_stats(pairs["e2e_s_m"], pairs["e2e_s_s"]),
    }
    pm = meas.ok_programs.drop_duplicates("program_id")[["program_id", "jct_s"]]
    ps = sim.ok_programs.drop_duplicates("program_id")[["program_id", "jct_s"]]
    pj = pm.merge(ps, on="program_id", suffixes=("_m", "_s"))
    out["jct"] = paired_stats(pj["jct_s_m"], pj["jct_s_s"])
    return out


# -- timeseries ----------------------------------------------------------------------------

def timeseries_totals(ts: pd.DataFrame) -> pd.DataFrame:
    """running and waiting summed over instances, kv_usage averaged over them, per sample time.

    A measured run's columns come from vLLM /metrics scrapes and may be blank; a blank stays
    blank (NaN) instead of counting as 0.
    """
    cols = [c for c in ("running", "waiting", "kv_usage") if c in ts.columns]
    if not len(ts) or "t_s" not in ts.columns or not cols:
        return pd.DataFrame(columns=["t_s", "running", "waiting", "kv_usage"])
    df = ts[["t_s"] + cols].apply(pd.to_numeric, errors="coerce").dropna(subset=["t_s"])
    agg = {c: (lambda x: x.sum(min_count=1)) if c != "kv_usage" else "mean" for c in cols}
    out = df.groupby("t_s", sort=True).agg(agg).reset_index()
    for c in ("running", "waiting", "kv_usage"):
        if c not in out.columns:
            out[c] = np.nan
    return out[["t_s", "running", "waiting", "kv_usage"]]


def timeseries_means(meas: Run, sim: Run) -> dict:
    tm, tsim = timeseries_totals(meas.timeseries), timeseries_totals(sim.timeseries)
    out = {}
    for c in ("running", "waiting", "kv_usage"):
        m = _num(tm[c].mean()) if len(tm) else None
        s = _num(tsim[c].mean()) if len(tsim) else None
        out[c] = {"measured_mean": m, "simulated_mean": s, "samples_measured": int(tm[c].notna().sum()),
                  "samples_simulated": int(tsim[c].notna().sum())}
    return out


# -- the whole comparison ------------------------------------------------------------------

def _run_info(run: Run) -> dict:
    s = run.summary
    info = {"dir": run.path, "backend": run.backend, "trace": s.get("trace"),
            "version": s.get("agentservesim_version")}
    prof = s.get("profile")
    if isinstance(prof, dict):
        info["model"] = prof.get("model")
        if prof.get("hardware"):
            info["hardware"] = prof.get("hardware")
    return info


def median_aggregates(aggs: list[dict]) -> tuple[dict, dict]:
    """The median over repeated measurements of every aggregate, and each one's run-to-run
    spread, (max - min) / median (None where a value is missing or the median is 0)."""
    med: dict = {}
    spread: dict = {}

    def combine(values):
        v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
        if len(v) < len(values) or not v:
            return None, None
        m = float(np.median(v))
        return m, ((max(v) - min(v)) / abs(m) if m else None)

    for key, _, _ in LATENCY_METRICS:
        med[key], spread[key] = {}, {}
        for st in STATS:
            med[key][st], spread[key][st] = combine([a[key][st] for a in aggs])
    for key, _, _ in SCALAR_METRICS:
        med[key], spread[key] = combine([a[key] for a in aggs])
    return med, spread


def compare_runs(meas: Run, sim: Run, repeats: list[Run] | None = None) -> dict:
    """errors.json content for two loaded runs. With `repeats` (more measurements of the same
    trace), every aggregate is compared with the median over all measured runs and carries
    their spread as `noise`; per-call pairs and the diagnosis use `meas`."""
    from .checks import check_within_noise, run_checks
    from .diagnose import diagnose

    pairs = pair_calls(meas, sim)
    am, asim = run_aggregates(meas), run_aggregates(sim)
    noise = None
    if repeats:
        am, noise = median_aggregates([am] + [run_aggregates(r) for r in repeats])
    metrics = aggregate_errors(am, asim)
    if noise is not None:
        for key, _, _ in LATENCY_METRICS:
            for st in STATS:
                metrics[key][st]["noise"] = noise[key][st]
        for key, _, _ in SCALAR_METRICS:
            next(iter(metrics[key].values()))["noise"] = noise[key]
    diag = diagnose(pairs, meas, sim)
    steps = None
    if meas.steps is not None and sim.steps is not None and len(meas.steps) and len(sim.steps):
        from .steps import compare_steps, steps_finding
        steps = compare_steps(meas.steps, sim.steps)
        steps["finding"] = steps_finding(steps)
    warnings = run_checks(pairs, meas, sim)
    if noise is not None:
        warnings += check_within_noise(metrics, 1 + len(repeats))
    return _jsonable({
        "schema": SCHEMA,
        "measured": {**_run_info(meas), "repeats": 1 + len(repeats or [])},
        "simulated": _run_info(sim),
        "calls": {**call_sets(meas, sim), "paired": int(len(pairs))},
        "metrics": metrics,
        "paired": paired_errors(pairs, meas, sim),
        "timeseries": timeseries_means(meas, sim),
        "findings": diag["findings"],
        "not_assessed": diag["not_assessed"],
        "steps": steps,
        "warnings": warnings,
    })


def _jsonable(o):
    """numpy scalars to Python, NaN and infinities to None: errors.json is strict JSON."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o


def compare(measured_dir, simulated_dir, repeat_dirs=()) -> dict:
    """Compare two results directories (measured first, then more measurements of the same
    trace if any); the content of errors.json."""
    return compare_runs(load_run(measured_dir), load_run(simulated_dir), [load_run(d) for d in repeat_dirs])
