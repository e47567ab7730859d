"""Validation matrices: for each case, measure (a live vLLM server, or a recorded real run),
simulate the same trace with the case's profile and the engine's own settings, compare.

A matrix YAML has a grid part and/or explicit cases:

    name: cpu-small
    engine_args: [--block-size, "128", --max-num-seqs, "8"]   # for every live case
    models:                                                      # live models
      tiny-llama: {dir: hardware/models/tiny-llama, profile: hardware/profiles/cpu-tiny-llama.yaml}
      tiny-qwen2-gqa: {dir: hardware/models/tiny-qwen2-gqa, profile: calibrate}  # profile it first
    traces: {coding: sample_traces/tiny_cpu.jsonl}
    loads: {light: 1.0, heavy: 0.3}          # arrival_s multiplied by this (smaller = more load)
    variants: {prefix-on: {engine_args: [--enable-prefix-caching]},
               prefix-off: {engine_args: [--no-enable-prefix-caching]}}
    repeats: 3                                # measure each live case 3 times (default 1)
    reference_steps: true                     # time reference batches around each live run (default)
    cases:                                    # explicit cases, e.g. recorded real runs
      - name: rtx4090-llama-3.1-8b
        recorded: {format: llmservingsim, dir: ../shared/reference/LLMServingSim/bench/examples/RTX4090/Llama-3.1-8B}
        hardware: rtx4090-llama-3.1-8b       # profile name or path
        model: llama-3.1-8b
        set: {engine.max_num_seqs: 256}       # optional simulator overrides
      - name: h100-bench                      # a `vllm bench serve --save-result --save-detailed` JSON
        recorded: {format: vllm-bench, dir: runs/h100-random.json, prefix_tokens: 0}
        hardware: h100-sxm
        model: llama-3.1-8b
        set: {engine.max_num_seqs: 256}       # the file records no engine settings

Grid cases are named `<model>-<trace>-<load>-<variant>`. A live case is simulated as the
client actually issued it (`as_issued`: measured send times, issue lags added to tool gaps),
which `<case>/trace.jsonl` holds. Layout of the output directory:
`<case>/trace.jsonl`, `<case>/measured/`, `<case>/simulated/`, `<case>/report/`, and
`summary.md` / `summary.json` across cases. With `repeats: N` a live case's further
measurements go to `<case>/measured-repeats/2..N/`; aggregates are compared with the median
of the N runs and the report gives their spread (a live run on a shared machine is noisy).
With `reference_steps` (on by default, live cases with a calibrated profile) designed batches
run on the same server before and after each measurement (validation/reference.py); their
factors go to `<case>/reference.json` and the summary adds the errors with the simulation at
the median factor: the machine's speed at the time, measured apart from the case. A grid
model with `profile: calibrate` is profiled on this machine before its first case (the full
`asim-calibrate run` grid with the matrix's and the model's engine arguments, not a
variant's; `<out>/profiles/`), and that profile serves all its cases: the matrix then needs
nothing measured elsewhere. Paths in
the matrix are relative to the repository root (or absolute). A failed case is reported and
the others still run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from calibrate import contention
from replay.trace import load_trace, write_trace
from simulator.config import build_config

REPO = Path(__file__).resolve().parents[1]

# vLLM engine flags -> simulator config keys (the subset that shapes scheduling and KV).
_INT_FLAGS = {
    "--max-num-seqs": "engine.max_num_seqs",
    "--max-num-batched-tokens": "engine.max_num_batched_tokens",
    "--block-size": "engine.block_size",
    "--max-model-len": "engine.max_model_len",
    "--num-gpu-blocks-override": "engine.num_gpu_blocks_override",
    "--long-prefill-token-threshold": "engine.long_prefill_token_threshold",
    "--tensor-parallel-size": "cluster.tensor_parallel_size",
    "-tp": "cluster.tensor_parallel_size",
}
_BOOL_FLAGS = {
    "--enable-prefix-caching": ("engine.enable_prefix_caching", True),
    "--no-enable-prefix-caching": ("engine.enable_prefix_caching", False),
    "--enable-chunked-prefill": ("engine.enable_chunked_prefill", True),
    "--no-enable-chunked-prefill": ("engine.enable_chunked_prefill", False),
}


class MatrixError(ValueError):
    """A matrix file a user wrote that cannot run."""


def engine_args_to_config(args: list[str]) -> dict[str, Any]:
    """Dotted simulator keys for the vLLM engine arguments that the simulator models."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = str(args[i])
        key, val = (a.split("=", 1) + [None])[:2] if a.startswith("--") and "=" in a else (a, None)
        if key in _BOOL_FLAGS:
            k, v = _BOOL_FLAGS[key]
            out[k] = v
        elif key in _INT_FLAGS:
            if val is None:
                i += 1
                if i >= len(args):
                    raise MatrixError(f"engine argument {key} needs a value")
                val = args[i]
            try:
                out[_INT_FLAGS[key]] = int(val)
            except ValueError:
                raise MatrixError(f"engine argument {key} needs an integer, got {val!r}") from None
        i += 1
    return out


def _path(p: str | None) -> Path | None:
    if p is None:
        return None
    q = Path(p)
    return q if q.is_absolute() else REPO / q


@dataclass
class Case:
    name: str
    kind: str                      # live | recorded
    model: str                     # model dir (live) or model name/config (recorded)
    hardware: str | None           # profile name/path; None -> calibrate
    trace: Path | None = None
    load: float = 1.0
    engine_args: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    recorded: dict[str, Any] = field(default_factory=dict)
    rank_group: str = ""           # cases of one group differ only by their variant
    variant: str = ""
    # `profile: calibrate` on a grid model: one full calibration of this model with these
    # engine arguments (the matrix's and the model's, not a variant's) for all its cases
    calibrate_args: list[str] | None = None
    calibrate_name: str = ""


def load_matrix(path: str | Path) -> tuple[str, list[Case], dict]:
    p = Path(path)
    try:
        m = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise MatrixError(f"matrix file not found: {p}") from None
    except yaml.YAMLError as e:
        raise MatrixError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(m, dict):
        raise MatrixError(f"{p}: expected a mapping")
    known = {"name", "engine_args", "models", "traces", "loads", "variants", "cases", "kv_cache_space_gib",
             "python", "settings", "repeats", "reference_steps"}
    bad = set(m) - known
    if bad:
        raise MatrixError(f"{p}: unknown keys {sorted(bad)} (known: {sorted(known)})")
    base_args = [str(a) for a in m.get("engine_args") or []]
    cases: list[Case] = []
    models = m.get("models") or {}
    traces = m.get("traces") or {}
    loads = m.get("loads") or {"default": 1.0}
    variants = m.get("variants") or {"default": {}}
    if models and not traces:
        raise MatrixError(f"{p}: 'models' needs 'traces'")
    for mname, mspec in models.items():
        if not isinstance(mspec, dict) or "dir" not in mspec:
            raise MatrixError(f"{p}: models.{mname} needs a 'dir'")
        # variants outermost after the model: consecutive cases share one server
        for vname, vspec in variants.items():
            vspec = vspec or {}
            for tname, tpath in traces.items():
                for lname, lval in loads.items():
                    model_args = base_args + [str(a) for a in mspec.get("engine_args") or []]
                    calib = mspec.get("profile") == "calibrate"
                    cases.append(Case(
                        name=f"{mname}-{tname}-{lname}-{vname}", kind="live", model=str(_path(mspec["dir"])),
                        hardware=None if calib else mspec.get("profile"), trace=_path(tpath), load=float(lval),
                        engine_args=model_args + [str(a) for a in vspec.get("engine_args") or []],
                        overrides=dict(vspec.get("set") or {}), rank_group=f"{mname}-{tname}-{lname}", variant=vname,
                        calibrate_args=model_args if calib else None, calibrate_name=f"cpu-{mname}" if calib else ""))
    case_keys = {"name", "recorded", "model", "hardware", "trace", "load", "engine_args", "set", "rank_group",
                 "variant"}
    for mname, mspec in models.items():
        bad = set(mspec) - {"dir", "profile", "engine_args"} if isinstance(mspec, dict) else set()
        if bad:
            raise MatrixError(f"{p}: models.{mname}: unknown keys {sorted(bad)} (known: dir, engine_args, profile)")
    for vname, vspec in variants.items():
        bad = set(vspec or {}) - {"engine_args", "set"}
        if bad:
            raise MatrixError(f"{p}: variants.{vname}: unknown keys {sorted(bad)} (known: engine_args, set)")
    for c in m.get("cases") or []:
        if not isinstance(c, dict) or "name" not in c:
            raise MatrixError(f"{p}: every case needs a name")
        bad = set(c) - case_keys
        if bad:
            raise MatrixError(f"{p}: case {c['name']}: unknown keys {sorted(bad)} (known: {sorted(case_keys)})")
        if "recorded" in c:
            rec = c["recorded"]
            if not isinstance(rec, dict) or "dir" not in rec:
                raise MatrixError(f"{p}: case {c['name']}: recorded needs format and dir")
            cases.append(Case(name=c["name"], kind="recorded", model=str(c.get("model", "")),
                              hardware=c.get("hardware"), recorded={**rec, "dir": str(_path(rec["dir"]))},
                              overrides=dict(c.get("set") or {}), load=float(c.get("load", 1.0)),
                              rank_group=c.get("rank_group", ""), variant=c.get("variant", "")))
        else:
            if "trace" not in c or "model" not in c:
                raise MatrixError(f"{p}: case {c['name']}: a live case needs model (dir) and trace")
            cases.append(Case(name=c["name"], kind="live", model=str(_path(c["model"])), hardware=c.get("hardware"),
                              trace=_path(c["trace"]), load=float(c.get("load", 1.0)),
                              engine_args=base_args + [str(a) for a in c.get("engine_args") or []],
                              overrides=dict(c.get("set") or {}), rank_group=c.get("rank_group", ""),
                              variant=c.get("variant", "")))
    names = [c.name for c in cases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise MatrixError(f"{p}: duplicate case names {sorted(dup)}")
    if not cases:
        raise MatrixError(f"{p}: no cases")
    repeats = m.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise MatrixError(f"{p}: repeats must be an integer >= 1, got {repeats!r}")
    reference = m.get("reference_steps", True)
    if not isinstance(reference, bool):
        raise MatrixError(f"{p}: reference_steps must be true or false, got {reference!r}")
    settings = {"kv_cache_space_gib": m.get("kv_cache_space_gib", 1), "python": m.get("python"),
                "repeats": repeats, "reference_steps": reference, **(m.get("settings") or {})}
    return str(m.get("name", p.stem)), cases, settings


def scale_arrivals(programs, factor: float):
    if factor == 1.0:
        return programs
    return [replace(p, arrival_s=p.arrival_s * factor) for p in programs]


def as_issued(programs, calls) -> list:
    """The programs as a live client actually issued them (`calls`: its calls.csv): each
    program's first call at its measured send time, and in a chain each later call's tool gap
    lengthened by the client's issue lag for it, so the simulated engine receives what the
    real one did (a 2-core client falls behind in bursts). DAG programs keep their gaps."""
    lag = {(str(r.program_id), int(r.call_index)): (float(r.arrival_s), float(r.issue_lag_s))
           for r in calls.itertuples(index=False)}
    out = []
    for prog in programs:
        first = lag.get((prog.program_id, 0))
        if first is None:
            out.append(prog)
            continue
        calls_ = list(prog.calls)
        if all(c.after is None for c in calls_):
            for k in range(1, len(calls_)):
                got = lag.get((prog.program_id, k))
                if got is not None and got[1] > 0:
                    calls_[k - 1] = replace(calls_[k - 1], tool_s=(calls_[k - 1].tool_s or 0.0) + got[1])
        out.append(replace(prog, arrival_s=first[0], calls=tuple(calls_)))
    return sorted(out, key=lambda p: p.arrival_s)  # a late send can pass a later program's (stable)


# -- comparing ----------------------------------------------------------------------------

HEADLINE = [("ttft_ms", "mean"), ("ttft_ms", "p90"), ("ttft_ms", "p99"), ("tpot_ms", "mean"), ("tpot_ms", "p90"),
            ("tpot_ms", "p99"), ("e2e_ms", "mean"), ("e2e_ms", "p90"), ("e2e_ms", "p99"), ("jct_s", "mean"),
            ("jct_s", "p90"), ("jct_s", "p99")]
_SUMMARY_KEYS = {"ttft_ms": "mean_ttft_ms", "tpot_ms": "mean_tpot_ms", "e2e_ms": "mean_e2el_ms", "jct_s": "mean_jct_s"}


# Engine flags that change step times: a profile taken with other values does not describe
# the engine being measured (e.g. --enforce-eager against a compiled profile: decode 10-25 %
# slower on this CPU).
_SPEED_FLAGS = {"--enforce-eager": "--enforce-eager", "--dtype": "--dtype", "--kv-cache-dtype": "--kv-cache-dtype",
                "--block-size": "--block-size", "--tensor-parallel-size": "--tensor-parallel-size",
                "-tp": "--tensor-parallel-size", "--quantization": "--quantization", "-q": "--quantization",
                "--compilation-config": "--compilation-config", "-O": "--compilation-config"}


def _speed_flags(args: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        a = str(args[i])
        key, val = (a.split("=", 1) + [None])[:2] if "=" in a else (a, None)
        if key in _SPEED_FLAGS:
            name = _SPEED_FLAGS[key]
            if name == "--enforce-eager":
                out[name] = "on"
            else:
                if val is None and i + 1 < len(args):
                    i += 1
                    val = str(args[i])
                out[name] = val
        i += 1
    return out


def profile_mismatch(profile_path: str | None, engine_args: list[str]) -> list[dict]:
    """Warnings where a live case runs the engine with speed-relevant flags other than the ones
    its calibrated profile was taken with (from the profile's provenance)."""
    from simulator.hardware import load_device

    if not profile_path:
        return []
    try:
        _, raw = load_device(profile_path)
    except Exception:  # the simulation reports a bad profile itself
        return []
    prov = (raw or {}).get("provenance") or {}
    if "engine_args" not in prov:
        return []
    prof, case = _speed_flags(list(prov["engine_args"])), _speed_flags(list(engine_args))
    diffs = [f"{k} {prof.get(k) or 'unset'} in the profile, {case.get(k) or 'unset'} here"
             for k in sorted(set(prof) | set(case)) if prof.get(k) != case.get(k)]
    if not diffs:
        return []
    return [{"code": "engine_mode_mismatch",
             "message": "the engine runs with other speed-relevant flags than its profile was taken with ("
                        + "; ".join(diffs) + "): step times will differ; re-calibrate with these flags"}]


# A live run during which other programs used more than this many cores (on average) was
# slowed by them: the limit calibration retries an experiment at (calibrate.runner).
MAX_OTHER_CPU = 0.25


def contention_warnings(others: list[float], limit: float = MAX_OTHER_CPU) -> list[dict]:
    """A warning when other programs took CPU while the live runs were measured (`others`:
    the cores they used, on average over each run, from /proc; calibrate.contention)."""
    hit = [x for x in others if x > limit]
    if not hit:
        return []
    return [{"code": "contended_measurement",
             "message": f"other programs used {max(hit):.2f} cores on average during {len(hit)} of {len(others)} "
                        f"measured runs (limit {limit}): the engine, its API server and the replay client "
                        "shared the machine with them, so measured latencies carry that slowdown, which no "
                        "model of the engine predicts"}]


def compare_dirs(measured: Path, simulated: Path, report: Path, repeats: list[Path] = (),
                 warnings: list[dict] = (), sensitivity: dict | None = None) -> dict:
    """Compare, write the case's report, and return its row for the matrix summary."""
    from .compare import compare_runs, load_run
    from .report import write_report

    meas, sim = load_run(measured), load_run(simulated)
    errors = compare_runs(meas, sim, [load_run(d) for d in repeats])
    errors["warnings"] = list(warnings) + errors["warnings"]
    if sensitivity is not None:
        errors["sensitivity"] = sensitivity
    write_report(report, errors, meas, sim)
    metrics = errors.get("metrics", {})
    row: dict[str, Any] = {"errors": {}, "noise": {}, "measured": {}, "simulated": {}}
    for metric, stat in HEADLINE:
        cell = metrics.get(metric, {}).get(stat) or {}
        row["errors"][f"{stat}_{metric}"] = cell.get("error")
        row["noise"][f"{stat}_{metric}"] = cell.get("noise")
    row["repeats"] = 1 + len(repeats)
    row["sensitivity"] = sensitivity
    for metric, key in _SUMMARY_KEYS.items():
        cell = metrics.get(metric, {}).get("mean") or {}
        row["measured"][key] = cell.get("measured")
        row["simulated"][key] = cell.get("simulated")
    row["calls"] = errors.get("calls", {}).get("paired")
    row["findings"] = [f.get("finding", "") for f in errors.get("findings", []) if not f.get("minor")][:3]
    if errors.get("steps"):
        row["findings"].append("engine steps: " + errors["steps"]["finding"])
        row["step_errors"] = errors["steps"]["errors"]
    row["warnings"] = [w.get("code", "") for w in errors.get("warnings", [])]
    return row


def mean_spread(row: dict) -> float | None:
    """The largest run-to-run spread of a case's four mean metrics (None: measured once)."""
    vals = [v for k, v in (row.get("noise") or {}).items() if k.startswith("mean_") and v is not None]
    return max(vals) if vals else None


MEANS = tuple(f"mean_{metric}" for metric in _SUMMARY_KEYS)  # the four means' keys in a case's errors


def noise_floor_lines(cases: list[dict]) -> list[str]:
    """How noisy the measurement itself is: the median run-to-run spread of each mean over the
    cases measured more than once, and how many of the mean errors (and whole cases) are no
    larger than their case's own spread (an error inside it cannot be told from noise)."""
    rep = [r for r in cases if any((r.get("noise") or {}).get(k) is not None for k in MEANS)]
    if not rep:
        return []
    med = []
    for k in MEANS:
        vals = [r["noise"][k] for r in rep if r["noise"].get(k) is not None]
        if vals:
            med.append(f"{k.split('_')[1].upper()} {100 * statistics.median(vals):.1f}%")
    within = n = whole = 0
    for r in rep:
        pairs = [(r["errors"].get(k), r["noise"].get(k)) for k in MEANS]
        pairs = [(abs(e), sp) for e, sp in pairs if e is not None and sp is not None]
        n += len(pairs)
        inside = sum(e <= sp for e, sp in pairs)
        within += inside
        whole += bool(pairs) and inside == len(pairs)
    return ["", f"The measurement's own noise: median run-to-run spread of the means {', '.join(med)}; "
            f"{within} of {n} mean errors are within their case's spread, and {whole} of {len(rep)} cases have "
            "all four within it."]


def mean_error_stats(pairs: list[tuple[str, dict]]) -> tuple[dict, int]:
    """For (case, errors) pairs whose errors hold the four MEANS: per mean key, (largest
    |error|, its case, median |error|) over the cases that have it; and how many cases have
    all four within 5 %."""
    stats = {}
    for k in MEANS:
        vals = [(abs(e[k]), c) for c, e in pairs if e.get(k) is not None]
        if vals:
            v, c = max(vals)
            stats[k] = (v, c, statistics.median(x for x, _ in vals))
    within = sum(1 for _, e in pairs if all(e.get(k) is not None and abs(e[k]) <= 0.05 for k in MEANS))
    return stats, within


def _mean_cells(errors: dict, sep: str = " | ") -> str:
    from .report import signed_pct
    return sep.join(signed_pct(errors.get(k)) for k in MEANS)


def live_speed_lines(cases: list[dict]) -> list[str]:
    """The step model on each case's own live steps (validation.live_steps): the machine's
    speed per run, how far any shape is off at that speed, and each run against the
    simulation rerun at it."""
    from .live_steps import MIN_STEPS, SHAPE_BINS, bin_labels
    sp = [r for r in cases if r.get("live_step_speed")]
    if not sp:
        return []
    lines = ["", "The step model on the live steps themselves (validation/live_steps.py: every live step with one "
                 "prefill matched to its call, its batch rebuilt from the run's calls and priced by the profile's "
                 "execute part; 'per run': logged / profile execute over those steps, the machine's speed in that "
                 "run against profiling time, over steps with a prefill and over decode-only steps; 'farthest "
                 "shape bin': at each run's speed, Σ logged / Σ modelled execute of the shape bin (new tokens, "
                 f"cached context, decodes beside a prefill, decode batch; >= {MIN_STEPS} steps) farthest from 1; "
                 "'at each run's speed': each run against the simulation rerun with its two factors, the median "
                 "over the case's runs, a diagnostic of what is left beside the machine's speed):", "",
             "| case | steps with a prefill | per run | decode-only steps | per run | spread (prefill) | "
             "farthest shape bin | at each run's speed: mean TTFT / TPOT / E2E / JCT |",
             "|---|---:|---|---:|---|---:|---|---|"]
    pooled: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for r in sp:
        s, at = r["live_step_speed"], r.get("at_live_step_speed")
        bins = [(col, b) for col, bs in s["by_shape"].items() for b in bs if b["steps"] >= MIN_STEPS]
        far = max(bins, key=lambda cb: abs(cb[1]["ratio"] - 1.0), default=None)
        for col, b in bins:
            pooled.setdefault((col, b["bin"]), []).append((b["steps"], b["measured_ms"], b["scaled_ms"]))
        dec = " / ".join("-" if x.get("decode_factor") is None else f"x{x['decode_factor']:.3f}" for x in s["runs"])
        lines.append(f"| {r['case']} | {s['steps']} | " + " / ".join(f"x{x['factor']:.3f}" for x in s["runs"])
                     + f" | {s.get('decode_steps', 0)} | {dec} | {100 * s['spread']:.1f}% | "
                     + ("-" if far is None else f"{far[0]} {far[1]['bin']}: x{far[1]['ratio']:.3f}")
                     + f" | {'-' if not at else _mean_cells(at['errors'], ' / ')} |")
    fs = [x["factor"] for r in sp for x in r["live_step_speed"]["runs"]]
    dfs = [x["decode_factor"] for r in sp for x in r["live_step_speed"]["runs"] if x.get("decode_factor") is not None]
    spreads = [r["live_step_speed"]["spread"] for r in sp if len(r["live_step_speed"]["runs"]) > 1]
    line = (f"- the machine's speed over the {len(fs)} runs: x{min(fs):.3f} to x{max(fs):.3f} of the profile on "
            "steps with a prefill" + (f", x{min(dfs):.3f} to x{max(dfs):.3f} on decode-only steps" if dfs else ""))
    if spreads:
        line += (f"; within one case's runs a median spread of {100 * statistics.median(spreads):.1f}% "
                 f"(largest {100 * max(spreads):.1f}%)")
    lines += ["", line]
    at = [(r["case"], r["at_live_step_speed"]["errors"]) for r in sp if r.get("at_live_step_speed")]
    if at:
        stats, within = mean_error_stats(at)
        lines.append("- each run against the simulation rerun at that run's own two step factors (median over a "
                     "case's runs; what is left beside the machine's speed): worst mean "
                     + ", ".join(f"{k.split('_')[1].upper()} {100 * v:.1f}% ({c})" for k, (v, c, _) in stats.items())
                     + "; median " + " / ".join(f"{100 * m:.1f}" for _, _, m in stats.values())
                     + f" %; cases with all four within 5%: {within} of {len(at)}")
    if pooled:
        order = [(col, label) for col in SHAPE_BINS for label in bin_labels(col)]
        parts = []
        for (col, label), vals in sorted(pooled.items(), key=lambda kv: order.index(kv[0])):
            parts.append(f"{col} {label}: x{sum(v[1] for v in vals) / sum(v[2] for v in vals):.3f} "
                         f"({sum(v[0] for v in vals)})")
        lines.append("- at each run's speed, the shape bins over all cases (Σ logged / Σ modelled, steps in "
                     "brackets): " + "; ".join(parts))
    return lines


def summary_markdown(result: dict) -> list[str]:
    from .report import signed_pct

    cols = [f"{stat} {metric.split('_')[0].upper()}" for metric, stat in HEADLINE]
    reps = result.get("repeats", 1)
    lines = [f"# Validation matrix `{result['matrix']}`", "",
             f"{len(result['cases'])} cases in {result['seconds']:.0f} s. Errors are (simulated - measured) / measured."
             + (f" Live cases were measured {reps} times: errors are against the median of the runs, and "
                "'spread' is the largest run-to-run spread ((max - min) / median) of the four means." if reps > 1
                else "") + " 'other CPU': the most cores other programs used, on average over a live run, while "
                "it was measured (above 0.25 the case warns: contended_measurement).", "",
             "| case | calls | " + " | ".join(cols) + " | spread | other CPU | TTFT per 1% step time | status |",
             "|---|---:|" + "---:|" * len(cols) + "---:|---:|---:|---|"]
    for r in result["cases"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['case']} | | " + " | ".join([""] * len(cols))
                         + f" | | | | failed: {r.get('error', '')[:80]} |")
            continue
        errs = [signed_pct(r["errors"].get(f"{stat}_{metric}")) for metric, stat in HEADLINE]
        spread = mean_spread(r)
        sens = (r.get("sensitivity") or {}).get("ttft_ms")
        other = r.get("other_cpu")
        lines.append(f"| {r['case']} | {r.get('calls', '')} | " + " | ".join(errs)
                     + f" | {'-' if spread is None else f'{100 * spread:.1f}%'}"
                     + f" | {f'{max(other):.2f}' if other else '-'}"
                     + f" | {'-' if sens is None else f'{sens:.1f}%'} | ok |")
    ok = [r for r in result["cases"] if r.get("status") == "ok"]
    if ok:
        lines += ["", "Worst |error| per metric across cases:", ""]
        for metric, stat in HEADLINE:
            vals = [(abs(r["errors"][f"{stat}_{metric}"]), r["case"]) for r in ok
                    if r["errors"].get(f"{stat}_{metric}") is not None]
            if vals:
                v, c = max(vals)
                lines.append(f"- {stat} {metric}: {100 * v:.1f}% ({c})")
    lines += noise_floor_lines(ok)
    ref = [(r["case"], r["at_reference_speed"]) for r in ok if (r.get("at_reference_speed") or {}).get("errors")]
    if ref:
        lines += ["", "At the machine's reference speed (validation/reference.py: designed batches run on the same "
                      "server just before and after each measurement, compared with the profile; the simulation "
                      "rerun with steps with prefill work scaled by the median prefill ratio, pure-decode steps "
                      "by the median decode ratio, and the frontend delay the reference's single prefills showed; "
                      "none of the case's own measurement goes into them):", "",
                  "| case | reference factors (min-max) | prefill / decode scale used | frontend (ms) | mean TTFT | "
                  "mean TPOT | mean E2E | mean JCT |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for case, a in ref:
            fs = [x["factor"] for x in a["references"] if x.get("factor")]
            e = a["errors"]
            fe = a.get("frontend_s")
            lines.append(f"| {case} | x{min(fs):.3f}-x{max(fs):.3f} | "
                         f"x{a['step_time_scale']:.3f} / x{a['decode_step_time_scale']:.3f} | "
                         f"{'-' if fe is None else f'{1000 * fe:.2f}'} | " + _mean_cells(e) + " |")
        lines += ["", "Worst |error| per mean at the reference speed:", ""]
        stats, within = mean_error_stats([(c, a["errors"]) for c, a in ref])
        lines += [f"- mean {k[len('mean_'):]}: {100 * v:.1f}% ({c})" for k, (v, c, _) in stats.items()]
        lines.append(f"- cases with all four means within 5%: {within} of {len(ref)}")
    at = [(r["case"], r["at_measured_step_speed"]) for r in ok if r.get("at_measured_step_speed")]
    if at:
        lines += ["", "At the step speed the engine showed in each measurement (the simulation rerun with every step "
                      "time scaled to the measured steps; a diagnostic of what is left beside the step model):", "",
                  "| case | measured / simulated step time | mean TTFT | mean TPOT | mean E2E | mean JCT |",
                  "|---|---:|---:|---:|---:|---:|"]
        for case, a in at:
            e = a["errors"]
            lines.append(f"| {case} | x{a['step_time_scale']:.3f} | " + _mean_cells(e) + " |")
    lines += live_speed_lines(ok)
    if result.get("ranking"):
        lines += ["", "Ranking: does the simulator order the variants as the real engine does?", "",
                  "| group | metric | measured order | simulated order | agree |", "|---|---|---|---|---|"]
        for rk in result["ranking"]:
            lines.append(f"| {rk['group']} | {rk['metric']} | {' < '.join(rk['measured_order'])} | "
                         f"{' < '.join(rk['simulated_order'])} | {'yes' if rk['agree'] else 'NO'} |")
    findings = [(r["case"], f) for r in ok for f in r.get("findings", [])]
    if findings:
        lines += ["", "Where the simulator is off (top findings per case):", ""]
        lines += [f"- {c}: {f}" for c, f in findings]
    return lines


# -- running ---------------------------------------------------------------------------------

class _ServerPool:
    """At most one live server (2-core machines): reused while consecutive cases share the
    model and engine arguments, its prefix cache reset between cases."""

    def __init__(self, settings: dict, log: Callable[[str], None]):
        self.settings = settings
        self.log = log
        self.server = None
        self.key = None
        self.profiles: dict[tuple, str] = {}  # (model, calibration engine args) -> profile made this run

    def get(self, model: str, engine_args: list[str]):
        from replay.vllm_server import VLLMServer

        key = (model, tuple(engine_args))
        if self.key == key and self.server is not None and self.server.running():
            self.reset_prefix_cache()
            return self.server
        self.stop()
        self.log(f"    starting vLLM: {Path(model).name} {' '.join(engine_args)}")
        srv = VLLMServer(model, engine_args=engine_args, served_model_name="model",
                         kv_cache_space_gib=self.settings.get("kv_cache_space_gib", 1),
                         python=self.settings.get("python"), env={"VLLM_SERVER_DEV_MODE": "1"})
        t0 = time.perf_counter()
        srv.start()
        self.log(f"    server up in {time.perf_counter() - t0:.0f} s at {srv.base_url}")
        self.server, self.key = srv, key
        return srv

    def reset_prefix_cache(self) -> None:
        import urllib.request
        req = urllib.request.Request(f"{self.server.base_url}/reset_prefix_cache", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server, self.key = None, None


def _calibrate(case: Case, case_dir: Path, pool: _ServerPool, log) -> str:
    """No profile given: a grid model with `profile: calibrate` is calibrated once, with the
    full grid, for all its cases (OUT/profiles/<name>.yaml, its data in OUT/profiles/data/);
    an explicit case without a profile gets a quick one of its own."""
    import subprocess
    if case.calibrate_args is not None:
        key = (case.model, tuple(case.calibrate_args))
        if key in pool.profiles:
            return pool.profiles[key]
        pool.stop()
        root = case_dir.parent / "profiles"
        prof = root / f"{case.calibrate_name}.yaml"
        cmd = [sys.executable, "-m", "calibrate.cli", "run", "--model", case.model, "--no-operators",
               "--kv-cache-space-gib", str(pool.settings.get("kv_cache_space_gib", 1)), "--out", str(prof),
               "--data-dir", str(root / "data" / case.calibrate_name)]
        if pool.settings.get("python"):
            cmd += ["--python", str(pool.settings["python"])]
        cmd += ["--", *case.calibrate_args]
        log(f"    calibrating {Path(case.model).name} (full grid, once for its cases): {' '.join(cmd)}")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"calibration failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        log(f"    calibrated in {time.perf_counter() - t0:.0f} s: {prof}")
        pool.profiles[key] = str(prof)
        return str(prof)
    pool.stop()
    prof = case_dir / "profile.yaml"
    cmd = [sys.executable, "-m", "calibrate.cli", "run", "--model", case.model, "--quick", "--out", str(prof),
           "--", *case.engine_args]
    log(f"    calibrating: {' '.join(cmd)}")
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"calibration failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return str(prof)


def _simulate(programs, hardware: str, model: str, overrides: dict, out: Path) -> dict:
    from replay.sim_backend import run_simulation
    cfg = build_config(None, overrides)
    return run_simulation(programs, hardware, model, cfg, out)


def _rerun_summary(programs, hardware: str, model: str, overrides: dict, **settings) -> dict:
    """summary.json of the case simulated again with `settings` (config keys) on top of its
    overrides, in memory: no files, no time series, no step log."""
    from replay.sim_backend import make_deployment
    from simulator.cluster import Simulation
    cfg = build_config(None, {**overrides, **settings, "metrics.sample_interval_s": 0, "metrics.step_log": False})
    return Simulation(programs, make_deployment(hardware, model, cfg), cfg).run().summary


def _mean_errors(summary: dict, measured: dict) -> dict[str, float | None]:
    """(simulated - measured) / measured of the four headline means."""
    out = {}
    for metric, key in _SUMMARY_KEYS.items():
        m = measured.get(key)
        out[f"mean_{metric}"] = (summary[key] - m) / m if m and summary.get(key) is not None else None
    return out


SENSITIVITY_STEP = 0.05  # step times scaled by 1 -/+ this for the sensitivity check


def step_time_sensitivity(programs, hardware: str, model: str, overrides: dict,
                          base: dict | None = None) -> dict[str, float | None]:
    """How much each mean metric moves per 1 % of error in every step time: the simulation
    again with step times x0.95 and x1.05, (M(+) - M(-)) / (2 * 5 % * M). Near saturation
    queueing amplifies a small step-time error (an elasticity of 5 means a 1 % step-time error
    is a 5 % TTFT error), which says how closely a case can test the rest of the model.
    `base`: the summary of the unscaled simulation when it has already run."""
    runs = {sign: _rerun_summary(programs, hardware, model, overrides,
                                 **{"latency.step_time_scale": 1 + sign * SENSITIVITY_STEP}) for sign in (-1, 1)}
    if base is None:
        base = _rerun_summary(programs, hardware, model, overrides)
    out = {}
    for metric, key in _SUMMARY_KEYS.items():
        m0, lo, hi = base.get(key), runs[-1].get(key), runs[1].get(key)
        out[metric] = ((hi - lo) / (2 * SENSITIVITY_STEP * m0)) if m0 and lo is not None and hi is not None else None
    return out


def _recorded_overrides(run, hardware: str, model: str) -> dict[str, Any]:
    """Simulator settings for a recorded run: its own engine settings, its parallelism."""
    from simulator.deployment import expert_parallel_blocks, vllm_defaults
    from simulator.hardware import load_device, load_model

    engine = dict(run.engine)
    if run.ep > 1 and "num_gpu_blocks_override" not in engine:
        device, _ = load_device(hardware)
        d = vllm_defaults(device)
        engine["num_gpu_blocks_override"] = expert_parallel_blocks(
            load_model(model), device, run.ep, engine.get("block_size") or d["block_size"],
            engine.get("gpu_memory_utilization", 0.9), engine.get("max_num_batched_tokens") or d["max_num_batched_tokens"],
            engine.get("max_num_seqs") or d["max_num_seqs"], engine.get("kv_cache_dtype", "auto"))
    if "num_gpu_blocks_override" in engine:
        engine.pop("gpu_memory_utilization", None)
    out = {f"engine.{k}": v for k, v in engine.items()}
    out["cluster.tensor_parallel_size"] = run.tp
    if run.dp > 1:
        # Data-parallel ranks behind vLLM's internal load balancer (lowest 4·waiting + running).
        out["cluster.instances"] = run.dp
        out["cluster.data_parallel"] = True  # one engine's ranks: lockstep for a MoE model (dp_lockstep auto)
        out["policy.router"] = "vllm-dp"
    return out


def _repeat_dir(case_dir: Path, i: int) -> Path:
    """Where the (i+1)-th measurement of a live case goes (the first is `measured/`)."""
    return case_dir / "measured-repeats" / str(i + 1)


def run_case(case: Case, case_dir: Path, pool: _ServerPool, log, repeats: int = 1) -> dict:
    from replay.vllm_server import BASE_ENGINE_ARGS

    case_dir.mkdir(parents=True, exist_ok=True)
    measured, simulated, report = case_dir / "measured", case_dir / "simulated", case_dir / "report"
    reference = None
    if case.kind == "recorded":
        from .importers import RECORDED_FORMATS
        fmt = case.recorded.get("format", "llmservingsim")
        if fmt not in RECORDED_FORMATS:
            raise MatrixError(f"case {case.name}: unknown recorded format '{fmt}' (known: {sorted(RECORDED_FORMATS)})")
        opts = {k: v for k, v in case.recorded.items() if k not in ("format", "dir")}  # the format's own options
        try:
            run = RECORDED_FORMATS[fmt](case.recorded["dir"], measured, **opts)
        except TypeError as e:
            raise MatrixError(f"case {case.name}: recorded format '{fmt}' does not take {sorted(opts)} ({e})") from None
        programs = run.programs
        model = case.model or run.model
        if not case.hardware:
            raise MatrixError(f"case {case.name}: a recorded case needs 'hardware' (a profile)")
        hardware = case.hardware
        overrides = _recorded_overrides(run, hardware, model)
    else:
        programs = planned = scale_arrivals(load_trace(case.trace), case.load)
        hardware = case.hardware or _calibrate(case, case_dir, pool, log)
        srv = pool.get(case.model, case.engine_args)
        from replay.live import run_live, write_server_steps
        reference = _ReferenceSteps(case, hardware, srv, pool, log) if pool.settings.get("reference_steps", True) \
            else None
        others: list[float] = []  # cores other programs used during each live replay
        for i in range(repeats):
            if i:
                pool.reset_prefix_cache()
            if reference is not None:
                reference.measure(f"{i + 1}-before")
            log(f"    live replay{f' {i + 1}/{repeats}' if repeats > 1 else ''} ...")
            run_dir = measured if i == 0 else _repeat_dir(case_dir, i)
            cpu0, t0 = contention.snapshot(srv.pid), time.perf_counter()
            run_live(programs, srv.base_url, "model", str(run_dir), quiet=True)
            others.append(round(contention.snapshot(srv.pid).others_since(cpu0)
                                / max(time.perf_counter() - t0, 1e-3), 3))
            write_server_steps(run_dir, srv.log_path)
            if reference is not None:
                reference.measure(f"{i + 1}-after")
        info = srv.engine_info()
        overrides = engine_args_to_config([*BASE_ENGINE_ARGS, *case.engine_args])
        if info.num_gpu_blocks:
            overrides["engine.num_gpu_blocks_override"] = int(info.num_gpu_blocks)
        if info.block_size:
            overrides["engine.block_size"] = int(info.block_size)
        overrides["metrics.step_log"] = True  # steps to compare with the server's
        import pandas as pd
        programs = as_issued(programs, pd.read_csv(measured / "calls.csv"))
        model = str(Path(case.model) / "config.json")
    write_trace(programs, case_dir / "trace.jsonl")
    overrides.update(case.overrides)
    log("    simulating ...")
    sim_summary = _simulate(programs, hardware, model, overrides, simulated)
    sensitivity = step_time_sensitivity(programs, hardware, model, overrides, base=sim_summary)
    extra, warns = [], []
    if case.kind == "live":
        extra = [_repeat_dir(case_dir, i) for i in range(1, repeats)]
        warns = profile_mismatch(hardware, case.engine_args) + contention_warnings(others)
        for w in warns:
            log(f"    warning: {w['message']}")
    row = compare_dirs(measured, simulated, report, extra, warns, sensitivity)
    if case.kind == "live":
        row["other_cpu"] = others
        row["at_measured_step_speed"] = _at_measured_step_speed(programs, hardware, model, overrides, simulated,
                                                                row)
        if reference is not None:
            row["at_reference_speed"] = reference.result(programs, hardware, model, overrides, row)
            (case_dir / "reference.json").write_text(json.dumps(row["at_reference_speed"], indent=2) + "\n")
        speed = _live_step_speed([measured, *extra], hardware)
        if speed is not None:
            from .live_steps import speed_finding
            row["live_step_speed"] = speed
            row["findings"].append(speed_finding(speed))
            row["at_live_step_speed"] = _at_live_step_speed(planned, [measured, *extra], hardware, model, overrides,
                                                            speed)
            (report / "live_steps.json").write_text(json.dumps(
                {**speed, "at_live_step_speed": row["at_live_step_speed"]}, indent=2) + "\n")
    return row


def _at_live_step_speed(programs, run_dirs: list[Path], hardware: str, model: str, overrides: dict,
                        speed: dict) -> dict | None:
    """Each live run against the simulation rerun at the speed that run's own steps showed
    (validation.live_steps: steps with a prefill and decode-only steps scaled by the run's two
    factors; the programs as that run's client issued them). Two numbers per run come from
    the measurement, the rest (batching, queueing, frontend, host) is the model's: what error
    is left once the machine's speed during the run is known. A diagnostic, not the case's
    result; the case's value is the median over its runs."""
    import pandas as pd
    by_name = {Path(d).name: Path(d) for d in run_dirs}
    runs = []
    for r in speed["runs"]:
        d = by_name.get(r["run"])
        if d is None or r.get("decode_factor") is None or not (d / "summary.json").is_file():
            continue
        measured = json.loads((d / "summary.json").read_text())
        summ = _rerun_summary(as_issued(programs, pd.read_csv(d / "calls.csv")), hardware, model, overrides,
                              **{"latency.step_time_scale": r["factor"],
                                 "latency.decode_step_time_scale": r["decode_factor"]})
        runs.append({"run": r["run"], "errors": _mean_errors(summ, measured)})
    if not runs:
        return None
    med = {}
    for k in runs[0]["errors"]:
        vals = [x["errors"][k] for x in runs if x["errors"].get(k) is not None]
        med[k] = statistics.median(vals) if vals else None
    return {"runs": runs, "errors": med}


def _live_step_speed(run_dirs: list[Path], hardware: str) -> dict | None:
    """validation.live_steps on a live case's runs; None without a calibrated linear profile."""
    from simulator.hardware import load_device

    from .live_steps import live_step_speed
    _, profile = load_device(hardware)
    return live_step_speed(run_dirs, profile or {})


class _ReferenceSteps:
    """The machine's speed next to each measurement of a live case (validation.reference):
    designed batches on the same server before and after each replay, compared with the
    profile's execute part. Skipped (with a note) for a profile that is not a calibrated
    linear one."""

    def __init__(self, case: Case, hardware: str, srv, pool: _ServerPool, log):
        from simulator.hardware import load_device
        self.srv, self.pool, self.log = srv, pool, log
        self.runs, self.note, self.failed = [], None, []
        _, self.profile = load_device(hardware)
        cfg = Path(case.model) / "config.json"
        self.vocab = json.loads(cfg.read_text()).get("vocab_size") if cfg.is_file() else None
        self.prefix_caching = "--no-enable-prefix-caching" not in case.engine_args
        lm = (self.profile or {}).get("latency_model") or {}
        if lm.get("kind") != "linear" or not self.vocab:
            self.note = "no calibrated linear profile or no config.json: reference steps skipped"

    def measure(self, tag: str) -> None:
        from .reference import run_reference
        if self.note:
            return
        try:
            r = run_reference(self.srv.base_url, self.srv.log_path, self.profile, self.vocab, tag,
                              prefix_caching=self.prefix_caching)
        except Exception as e:  # a diagnostic: its failure is logged and recorded, the case goes on
            self.log(f"    reference steps {tag} failed: {e.__class__.__name__}: {e}")
            self.failed.append({"tag": tag, "error": f"{e.__class__.__name__}: {e}"})
            return
        self.runs.append(r)
        self.log(f"    reference steps {tag}: machine at x{r.factor:.3f} of the profile's step time "
                 f"(prefill x{r.ratios.get('prefill', float('nan')):.3f}, decode x{r.ratios.get('decode', float('nan')):.3f})")
        self.pool.reset_prefix_cache()  # the replay starts from an empty cache as before

    def result(self, programs, hardware, model, overrides, row: dict) -> dict | None:
        """The four means' errors with the simulation at the case's reference factor."""
        from .reference import case_factor, case_frontend, case_scales
        scales = case_scales(self.runs)
        frontend = case_frontend(self.runs, self.profile)
        out = {"references": [r.to_dict() for r in self.runs], "factor": case_factor(self.runs),
               **({"note": self.note} if self.note else {}), **({"failed": self.failed} if self.failed else {})}
        if scales is None:
            return out
        out["step_time_scale"], out["decode_step_time_scale"] = scales
        out["frontend_s"] = frontend
        extra = {} if frontend is None else {"latency.frontend_s": max(frontend, 0.0)}
        summ = _rerun_summary(programs, hardware, model, overrides, **{
            "latency.step_time_scale": scales[0], "latency.decode_step_time_scale": scales[1], **extra})
        out["errors"] = _mean_errors(summ, row["measured"])
        return out


def _at_measured_step_speed(programs, hardware, model, overrides, simulated: Path, row: dict) -> dict | None:
    """The four means' errors when the simulation runs at the step speed the engine showed in
    this measurement (validation.steps.measured_step_scale): what is left once the machine's
    step times are taken as measured. A diagnostic, not the case's result."""
    from replay.results import load_steps

    from .steps import measured_step_scale

    errors = row.get("step_errors")  # the report's comparison of the two runs' steps
    ss = load_steps(simulated)
    if errors is None or ss is None or not len(ss):
        return None
    scale = measured_step_scale(None, ss, errors)
    if scale is None:
        return None
    summ = _rerun_summary(programs, hardware, model, overrides, **{"latency.step_time_scale": scale})
    return {"step_time_scale": scale, "errors": _mean_errors(summ, row["measured"])}


def _ranking(rows: list[dict], cases: list[Case]) -> list[dict]:
    """Where the real engine ran several variants of one setting, does the simulator order
    them the same way?"""
    by_group: dict[str, list[tuple[Case, dict]]] = {}
    for case, row in zip(cases, rows):
        if case.rank_group and row.get("status") == "ok":
            by_group.setdefault(case.rank_group, []).append((case, row))
    out = []
    for group, members in sorted(by_group.items()):
        if len(members) < 2:
            continue
        for metric in ("mean_jct_s", "mean_e2el_ms", "mean_ttft_ms"):
            meas = [(r["measured"].get(metric), c.variant) for c, r in members]
            sim = [(r["simulated"].get(metric), c.variant) for c, r in members]
            if any(v is None for v, _ in meas + sim):
                continue
            mo = [v for _, v in sorted(meas)]
            so = [v for _, v in sorted(sim)]
            out.append({"group": group, "metric": metric, "measured_order": mo, "simulated_order": so,
                        "agree": mo == so})
    return out


def run_matrix(path: str | Path, out_dir: str | Path, only: list[str] | None = None,
               log: Callable[[str], None] = print, repeats: int | None = None) -> dict:
    name, cases, settings = load_matrix(path)
    repeats = repeats or settings.get("repeats", 1)
    if only:
        unknown = set(only) - {c.name for c in cases}
        if unknown:
            raise MatrixError(f"no such cases: {sorted(unknown)}")
        cases = [c for c in cases if c.name in only]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool = _ServerPool(settings, log)
    rows = []
    t_start = time.perf_counter()
    try:
        for i, case in enumerate(cases, 1):
            log(f"[{i}/{len(cases)}] {case.name}")
            t0 = time.perf_counter()
            try:
                row = run_case(case, out / case.name, pool, log, repeats)
                row["status"] = "ok"
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # a failed case is reported; the rest still run
                (out / case.name).mkdir(parents=True, exist_ok=True)
                (out / case.name / "error.txt").write_text(traceback.format_exc())
                row = {"status": "failed", "error": f"{e.__class__.__name__}: {e}"}
                log(f"    FAILED: {row['error']}")
            row["case"] = case.name
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
    finally:
        pool.stop()
    result = {"matrix": name, "repeats": repeats, "cases": rows, "ranking": _ranking(rows, cases),
              "seconds": time.perf_counter() - t_start}
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "summary.md").write_text("\n".join(summary_markdown(result)) + "\n")
    return result
