"""asim-replay: replay an agent trace through the simulator (or, with --endpoint, a live
OpenAI-compatible server) and write the results layout."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from simulator.config import ConfigError, build_config, describe
from simulator.hardware import HardwareError

from .trace import TraceError, load_trace


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v != "" else None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asim-replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Config keys (--set section.key=value):\n  " + "\n  ".join(describe()))
    p.add_argument("trace", help="trace in the canonical JSONL format")
    p.add_argument("--hardware", help="device name (hardware/devices), calibrated profile name or YAML path")
    p.add_argument("--model", required=True, help="model name (hardware/models), HF config.json path or model dir; "
                                                  "with --endpoint, the served model name")
    p.add_argument("--config", help="YAML file with the same keys as --set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0, or the config's)")
    p.add_argument("--endpoint", help="URL of a live OpenAI-compatible server (live replay instead of simulation)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary on stdout")
    sweep = p.add_argument_group("design-space sweep (simulated replay)")
    sweep.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="simulate every combination of these values (repeat for a grid; KEY is a config key, "
                            "or hardware / model); each point's files go to OUT/KEY=V,.../ and a table to "
                            "OUT/sweep.csv")
    sweep.add_argument("--jobs", type=int, default=None,
                       help="sweep points run at once, each in its own process (default: the number of cores)")
    live = p.add_argument_group("live replay (with --endpoint or --launch)")
    live.add_argument("--time-scale", type=float, default=1.0, help="multiply arrivals and tool gaps by this")
    live.add_argument("--max-inflight", type=int, default=0, help="most calls in flight at once (0 = no cap)")
    live.add_argument("--launch", metavar="MODEL_DIR",
                      help="start a vLLM server for this model directory (served as --model), replay, stop it")
    live.add_argument("--engine-arg", dest="engine_args", action="append", default=None, metavar="ARG",
                      help="an argument for the launched server (repeat; e.g. --engine-arg=--max-num-seqs=8)")
    return p


def _progress_printer(total: int, quiet: bool):
    if quiet:
        return None
    start = time.perf_counter()
    state = {"last": start}

    def show(sim_t: float, done: int) -> None:
        now = time.perf_counter()
        if now - state["last"] < 0.5 and done < total:
            return
        state["last"] = now
        width = 30
        frac = done / total if total else 1.0
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        sys.stderr.write(f"\r[{bar}] {done}/{total} programs  sim {sim_t:9.1f}s  wall {now - start:6.1f}s")
        sys.stderr.flush()

    return show


def format_summary(s: dict, wall_s: float | None = None) -> list[str]:
    lines = [
        f"calls completed   {s['completed']} ({s.get('failed', 0)} failed), programs {s.get('programs_completed', 0)}",
        f"duration          {s['duration']:.2f} s   throughput {s['request_throughput']:.2f} req/s, "
        f"{s['output_throughput']:.1f} out tok/s",
        f"TTFT ms           mean {s['mean_ttft_ms']:.1f}  p50 {s['median_ttft_ms']:.1f}  p99 {s['p99_ttft_ms']:.1f}",
        f"TPOT ms           mean {s['mean_tpot_ms']:.2f}  p50 {s['median_tpot_ms']:.2f}  p99 {s['p99_tpot_ms']:.2f}",
        f"E2E ms            mean {s['mean_e2el_ms']:.1f}  p99 {s['p99_e2el_ms']:.1f}",
        f"JCT s             mean {s['mean_jct_s']:.2f}  p50 {s['p50_jct_s']:.2f}  p99 {s['p99_jct_s']:.2f}",
        f"prefix cache hit  {100 * s['prefix_cache_hit_rate']:.1f}%   preemptions {s['preemptions']}",
    ]
    if wall_s is not None:
        lines.append(f"wall time         {wall_s:.2f} s ({s['completed'] / max(wall_s, 1e-9):,.0f} calls/s)")
    return lines


def _main_sweep(args, mapping: dict, overrides: dict) -> int:
    from .sweep import expand, format_table, parse_sweeps, run_sweep
    axes = parse_sweeps(args.sweep)
    points = expand(axes, mapping, overrides, args.hardware, args.model)
    programs = load_trace(args.trace)
    t0 = time.perf_counter()
    rows = run_sweep(programs, points, args.out, trace_name=str(args.trace), jobs=args.jobs, quiet=args.quiet)
    wall = time.perf_counter() - t0
    failed = sum(1 for r in rows if r["error"])
    if not args.quiet:
        print("\n".join(format_table(rows, [k for k, _ in axes])))
        print(f"{len(points)} points in {wall:.2f} s ({failed} failed); results in {args.out}/<point>/, "
              f"table in {args.out}/sweep.csv")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.endpoint or args.launch:
            from .live import main_live
            return main_live(args)
        if args.sweep and (args.endpoint or args.launch):
            raise ConfigError("--sweep runs the simulator; it does not combine with --endpoint or --launch")
        if args.jobs is not None and args.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
        if not args.hardware and not args.sweep:  # a sweep may vary hardware (sweep.expand checks)
            raise ConfigError("--hardware is required for a simulated replay (or give --endpoint for a live one)")
        mapping = {}
        if args.config:
            try:
                mapping = yaml.safe_load(Path(args.config).read_text()) or {}
            except FileNotFoundError:
                raise ConfigError(f"config file not found: {args.config}") from None
            except yaml.YAMLError as e:
                raise ConfigError(f"{args.config}: not valid YAML: {e}") from None
            if not isinstance(mapping, dict):
                raise ConfigError(f"{args.config}: expected a mapping")
        overrides = _parse_set(args.set)
        if args.seed is not None:
            overrides["seed"] = args.seed
        if args.sweep:
            return _main_sweep(args, mapping, overrides)
        cfg = build_config(mapping, overrides)
        programs = load_trace(args.trace)
        from .sim_backend import run_simulation
        t0 = time.perf_counter()
        summary = run_simulation(programs, args.hardware, args.model, cfg, args.out, trace_name=str(args.trace),
                                 progress=_progress_printer(len(programs), args.quiet))
        wall = time.perf_counter() - t0
        if not args.quiet:
            sys.stderr.write("\n")
            print("\n".join(format_summary(summary, wall)))
            print(f"results in {args.out}/ (calls.csv, programs.csv, timeseries.csv, summary.json)")
        return 0
    except (TraceError, ConfigError, HardwareError, FileNotFoundError) as e:
        print(f"asim-replay: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asim-replay: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
