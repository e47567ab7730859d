"""Design-space sweeps: one trace simulated at every point of a grid of settings, on a
local process pool.

`asim-replay TRACE --hardware H --model M --sweep policy.kv=lru,pin-ttl --sweep
cluster.instances=2,4 --out DIR` runs the cross product (here 4 points). Each point is a
plain simulated replay with those `--set` values on top of the common config: its four
files go to `DIR/<point>/`, byte for byte what `asim-replay ... --set KEY=VALUE ... --out
DIR/<point>` writes. `DIR/sweep.csv` has one row per point (the swept values and the main
summary keys). `hardware` and `model` may be swept like config keys. A simulation is a pure
function of its inputs, so points run in parallel processes (`--jobs`, default: the number
of cores) and the order they finish in changes nothing.

Every point's configuration and deployment (device, model, engine settings, policies) is built
before anything runs: a bad value stops the sweep with one line naming the point, and
nothing is written. A point that fails while running is
reported in sweep.csv (its `error` column) and the other points still run.
"""

from __future__ import annotations

import csv
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import yaml

from simulator.cluster import Simulation
from simulator.config import ConfigError, SimConfig, build_config
from simulator.hardware import HardwareError

from .sim_backend import make_deployment, run_simulation

# Summary keys copied into sweep.csv, after the swept values.
SUMMARY_COLUMNS = ("completed", "failed", "duration", "request_throughput", "output_throughput",
                   "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_e2el_ms", "p99_e2el_ms",
                   "mean_jct_s", "p99_jct_s", "prefix_cache_hit_rate", "preemptions")
SPECIAL_KEYS = ("hardware", "model")  # CLI arguments that a sweep may vary like config keys


@dataclass(frozen=True)
class SweepPoint:
    name: str                        # the point's folder under --out
    values: tuple[tuple[str, object], ...]  # (key, value) per swept key, in --sweep order
    hardware: str
    model: str
    config: SimConfig


def split_values(text: str) -> list[str]:
    """'a,b,[c,d]' -> ['a', 'b', '[c,d]']: commas inside brackets or braces do not split."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [v.strip() for v in out]


def parse_sweeps(items: list[str]) -> list[tuple[str, list[str]]]:
    """--sweep KEY=V1,V2,... items -> [(key, [raw values])], keys in the order given."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--sweep expects KEY=V1,V2,..., got {item!r}")
        key, vals = (s.strip() for s in item.split("=", 1))
        if not key:
            raise ConfigError(f"--sweep {item!r}: no key")
        if any(key == k for k, _ in axes):
            raise ConfigError(f"--sweep {key} is given twice: put all its values in one --sweep")
        values = split_values(vals)
        if any(v == "" for v in values):
            raise ConfigError(f"--sweep {item!r}: an empty value")
        if len(set(values)) != len(values):
            raise ConfigError(f"--sweep {item!r}: a value repeats")
        axes.append((key, values))
    return axes


def _folder_name(values: tuple[tuple[str, str], ...]) -> str:
    name = ",".join(f"{k}={v}" for k, v in values)
    for bad in ("/", "\\", " ", "\0"):
        name = name.replace(bad, "_")
    return name


def expand(axes: list[tuple[str, list[str]]], mapping: dict, overrides: dict, hardware: str | None,
           model: str) -> list[SweepPoint]:
    """Every point of the grid, its config built (and so checked) now."""
    points = []
    names = set()
    for combo in itertools.product(*(vals for _, vals in axes)):
        raw = tuple((k, v) for (k, _), v in zip(axes, combo))
        sets = dict(overrides)
        hw, mdl = hardware, model
        parsed = []
        for k, v in raw:
            if k == "hardware":
                hw = v
                parsed.append((k, v))
            elif k == "model":
                mdl = v
                parsed.append((k, v))
            else:
                val = yaml.safe_load(v)
                sets[k] = val
                parsed.append((k, val))
        name = _folder_name(raw)
        if name in names:
            raise ConfigError(f"--sweep: two points would share the folder {name!r}")
        names.add(name)
        if not hw:
            raise ConfigError("--hardware (or --sweep hardware=...) is required for a simulated sweep")
        try:
            cfg = build_config(mapping, sets)
            # device, model, engine settings and policy names checked before any run
            Simulation([], make_deployment(hw, mdl, cfg), cfg)
        except (ConfigError, HardwareError) as e:
            raise type(e)(f"sweep point {name}: {e}") from None
        points.append(SweepPoint(name, tuple(parsed), hw, mdl, cfg))
    return points


def _run_point(programs, point: SweepPoint, out_dir: str, trace_name: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    summary = run_simulation(programs, point.hardware, point.model, point.config, out_dir, trace_name=trace_name)
    return summary, time.perf_counter() - t0


def run_sweep(programs, points: list[SweepPoint], out: str | os.PathLike, trace_name: str = "",
              jobs: int | None = None, quiet: bool = False) -> list[dict]:
    """Run every point (in `jobs` processes; 1 = in this process) and write sweep.csv.
    Returns the sweep.csv rows, in point order."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(points)))
    results: dict[int, tuple[dict | None, float, str]] = {}

    def report(i: int) -> None:
        if quiet:
            return
        summary, wall, err = results[i]
        status = f"error: {err}" if err else f"{summary['completed']} calls, {wall:.2f} s"
        sys.stderr.write(f"[{len(results)}/{len(points)}] {points[i].name}: {status}\n")

    if jobs == 1:
        for i, p in enumerate(points):
            results[i] = _outcome(lambda p=p: _run_point(programs, p, str(out / p.name), trace_name))
            report(i)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futs = {pool.submit(_run_point, programs, p, str(out / p.name), trace_name): i
                    for i, p in enumerate(points)}
            for fut in as_completed(futs):
                results[futs[fut]] = _outcome(fut.result)
                report(futs[fut])
    rows = []
    for i, p in enumerate(points):
        summary, wall, err = results[i]
        row = {"point": p.name, **{k: _cell(v) for k, v in p.values}}
        for k in SUMMARY_COLUMNS:
            row[k] = summary.get(k, "") if summary else ""
        row["wall_s"] = round(wall, 3) if summary else ""
        row["error"] = err
        rows.append(row)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def _outcome(run) -> tuple[dict | None, float, str]:
    """(summary, wall, "") of a point that ran, or (None, 0, error line) of one that failed:
    one point's failure is reported and the others still run."""
    try:
        summary, wall = run()
        return summary, wall, ""
    except Exception as e:  # noqa: BLE001
        return None, 0.0, _one_line(e)


def _cell(v) -> str:
    return v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def format_table(rows: list[dict], keys: list[str]) -> list[str]:
    """A short text table of the sweep for stdout."""
    head = [*keys, "TTFT mean ms", "TPOT mean ms", "E2E mean ms", "JCT mean s", "req/s", "hit %", "preempt"]
    body = []
    for r in rows:
        if r["error"]:
            body.append([str(r[k]) for k in keys] + [r["error"]])
            continue
        body.append([str(r[k]) for k in keys] + [
            f"{r['mean_ttft_ms']:.1f}", f"{r['mean_tpot_ms']:.2f}", f"{r['mean_e2el_ms']:.1f}",
            f"{r['mean_jct_s']:.2f}", f"{r['request_throughput']:.2f}",
            f"{100 * r['prefix_cache_hit_rate']:.1f}", str(r["preemptions"])])
    widths = [max([len(h)] + [len(b[i]) for b in body if len(b) == len(head)]) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [fmt(head)]
    for b in body:
        lines.append(fmt(b) if len(b) == len(head) else "  ".join(b))
    return lines
