"""Simulator speed benchmark: a large synthetic agent workload on a 4-instance cluster.

Prints calls simulated per wall second and simulated seconds per wall second. A script,
not a test: run `python benchmarks/bench_sim.py [--programs N] [--no-fast-forward]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulator.cluster import Simulation  # noqa: E402
from simulator.config import build_config  # noqa: E402
from simulator.deployment import build_deployment  # noqa: E402
from simulator.hardware import load_device, load_model  # noqa: E402
from simulator.workload import CallSpec, ProgramSpec  # noqa: E402


def workload(n_programs: int, mean_calls: int, rate: float, seed: int) -> list[ProgramSpec]:
    """SWE-agent-like programs: shared 2k system prompt, lognormal observations/outputs/gaps."""
    rng = np.random.default_rng(seed)
    t = 0.0
    out = []
    for p in range(n_programs):
        t += rng.exponential(1.0 / rate)
        n = int(np.clip(rng.poisson(mean_calls), 2, 4 * mean_calls))
        new = np.clip(rng.lognormal(5.5, 1.0, n), 10, 8000).astype(int)
        outp = np.clip(rng.lognormal(4.8, 0.7, n), 5, 1500).astype(int)
        gaps = np.clip(rng.lognormal(0.0, 1.0, n), 0.01, 60.0)
        calls = tuple(CallSpec(int(new[k]), int(outp[k]), "bash" if k < n - 1 else None,
                               float(gaps[k]) if k < n - 1 else None) for k in range(n))
        out.append(ProgramSpec(f"p{p:05d}", t, calls, prefix_id="sys", prefix_tokens=2048))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--programs", type=int, default=2000)
    ap.add_argument("--calls", type=int, default=20, help="mean calls per program")
    ap.add_argument("--rate", type=float, default=4.0, help="program arrivals per second")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--hardware", default="h100-sxm")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--router", default="session-affinity")
    ap.add_argument("--kv", default="lru")
    ap.add_argument("--no-fast-forward", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="run once under cProfile and print the top functions")
    ap.add_argument("--vllm-version", default=None,
                    help="engine.vllm_version (the scheduler behaviours mirrored; default: the simulator's)")
    ap.add_argument("--async-scheduling", choices=("default", "on", "off"), default="default",
                    help="engine.async_scheduling (default: as resolved for the device and vLLM version; "
                         "on for GPUs)")
    a = ap.parse_args()
    progs = workload(a.programs, a.calls, a.rate, seed=1)
    n_calls = sum(len(p.calls) for p in progs)
    cfg = build_config({"cluster": {"instances": a.instances},
                        "policy": {"router": a.router, "kv": a.kv},
                        "fast_forward": not a.no_fast_forward,
                        "engine": {**({"vllm_version": a.vllm_version} if a.vllm_version else {}),
                                   **({"async_scheduling": a.async_scheduling == "on"}
                                      if a.async_scheduling != "default" else {})}})
    device, _ = load_device(a.hardware)
    dep = build_deployment(load_model(a.model), device, cfg)
    print(f"workload: {len(progs)} programs, {n_calls} calls, {a.instances} x {a.hardware} / {a.model}, "
          f"router={a.router}, kv={a.kv}, fast_forward={not a.no_fast_forward}, "
          f"async_scheduling={dep.engine.async_scheduling}")
    if a.profile:
        import cProfile
        import pstats
        cProfile.runctx("Simulation(progs, dep, cfg).run()", globals(), locals(), "/tmp/bench.prof")
        pstats.Stats("/tmp/bench.prof").sort_stats("tottime").print_stats(20)
        return
    walls = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        sim = Simulation(progs, dep, cfg)
        res = sim.run()
        walls.append(time.perf_counter() - t0)
    w = min(walls)
    steps = sum(i["steps"] for i in res.instances)
    print(f"simulated {res.sim_time_s:.1f} s, {steps} engine steps, {res.events} events, "
          f"{res.summary['preemptions']} preemptions")
    bulk = sum(i.num_bulk_steps for i in sim.instances)
    print(f"fast-forward: {sum(i.num_runs for i in sim.instances)} decode runs, their {bulk} steps "
          f"({100.0 * bulk / max(steps, 1):.0f} % of all) ended in bulk")
    print(f"wall (best of {a.repeat}): {w:.2f} s   [{', '.join(f'{x:.2f}' for x in walls)}]")
    print(f"calls per wall second:            {n_calls / w:,.0f}")
    print(f"simulated seconds per wall second: {res.sim_time_s / w:,.0f}")


if __name__ == "__main__":
    main()
