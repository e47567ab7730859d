"""Check (never tune): simulate the five recorded real vLLM GPU runs with the imported
operator profiles and print mean / p99 TTFT, TPOT and E2E errors beside LLMServingSim's own
errors (its validation/summary.txt for each run).

    python scripts/check_gpu_runs.py [--reference DIR] [--breakdown]

Each run is replayed as recorded: arrivals at the engine's queue times, the run's engine
limits, its KV block count when the run recorded it, else the simulator's memory estimate.
Nothing here feeds back into a profile: the end-to-end numbers are for checking only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from simulator.cluster import Simulation  # noqa: E402
from simulator.config import build_config  # noqa: E402
from simulator.deployment import build_deployment, expert_parallel_blocks, vllm_defaults  # noqa: E402
from simulator.hardware import load_device, load_model  # noqa: E402
from validation.importers.llmservingsim import read_llmservingsim_run  # noqa: E402

REFERENCE = REPO.parent / "shared" / "reference"

# (label, run folder under LLMServingSim/bench, profile, model, its summary file)
RUNS = [
    ("rtx4090 llama-3.1-8b", "examples/RTX4090/Llama-3.1-8B", "rtx4090-llama-3.1-8b", "llama-3.1-8b",
     "validation/summary.txt"),
    ("rtx4090 llama-3.1-8b (old run)", "results/rtx4090-llama8b-tp1", "rtx4090-llama-3.1-8b", "llama-3.1-8b",
     "validation/rtx4090_summary.txt"),
    ("rtxpro6000 llama-3.1-8b", "examples/RTXPRO6000/Llama-3.1-8B", "rtx-pro-6000-llama-3.1-8b", "llama-3.1-8b",
     "validation/summary.txt"),
    ("rtxpro6000 qwen3-32b tp2", "examples/RTXPRO6000/Qwen3-32B", "rtx-pro-6000-qwen3-32b", "qwen3-32b",
     "validation/summary.txt"),
    ("rtxpro6000 qwen3-30b-a3b dp2ep2", "examples/RTXPRO6000/Qwen3-30B-A3B-Instruct-2507",
     "rtx-pro-6000-qwen3-30b-a3b-dp2ep2", "qwen3-30b-a3b-instruct-2507", "validation/summary.txt"),
]
METRICS = ("ttft", "tpot", "e2el")


def measured_stats(df) -> dict[str, float]:
    """Mean and p99 (ms) with LLMServingSim's formulas (they reproduce its summary.txt)."""
    ttft = (df.first_token_ts - df.queued_ts) * 1e3
    e2e = (df.last_token_ts - df.queued_ts) * 1e3
    out = df.output_toks.astype(float)
    tpot = ((df.last_token_ts - df.first_token_ts) / (out - 1).where(out > 1)) * 1e3
    s = {}
    for k, v in (("ttft", ttft), ("tpot", tpot.dropna()), ("e2el", e2e)):
        s[f"mean_{k}"] = float(np.mean(v))
        s[f"p99_{k}"] = float(np.percentile(v, 99))
    return s


def simulated_stats(calls: list[dict]) -> dict[str, float]:
    ttft = np.array([c["ttft_s"] for c in calls]) * 1e3
    e2e = np.array([c["e2e_s"] for c in calls]) * 1e3
    tpot = np.array([c["tpot_s"] for c in calls if c["output_tokens"] > 1]) * 1e3
    s = {}
    for k, v in (("ttft", ttft), ("tpot", tpot), ("e2el", e2e)):
        s[f"mean_{k}"] = float(np.mean(v))
        s[f"p99_{k}"] = float(np.percentile(v, 99))
    return s


def llmservingsim_diffs(path: Path) -> dict[str, float]:
    """Its Diff% column for Mean and P99 of TTFT, TPOT, Latency."""
    names = {"TTFT": "ttft", "TPOT": "tpot", "Latency": "e2el"}
    out = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0] in names and parts[1] in ("Mean", "P99"):
            out[f"{parts[1].lower()}_{names[parts[0]]}"] = float(parts[-1].rstrip("%"))
    return out


def run_case(ref: Path, case, prompt_blocks: bool = True,
             fast_forward: bool = False, by_name: bool = False) -> dict:
    label, sub, profile_name, model_name, summary = case
    run_dir = ref / "LLMServingSim" / "bench" / sub
    run, df, _ = read_llmservingsim_run(run_dir)
    device, profile = load_device(profile_name)
    link = None
    if by_name:  # the device as a user names it (its spec file, the learned roofline), not the run's
        # operator profile; with the recorded machine's GPU-to-GPU link (the profile's), as
        # cluster.intra_node_link
        link = device.intra_node_link.name if device.intra_node_link else None
        device = load_device(device.name)[0]
        profile = None
    model = load_model(model_name)
    engine = dict(run.engine)
    dp = int(run.meta.get("data_parallel_size") or 1)
    ep = dp if run.meta.get("enable_expert_parallel") else 1
    if by_name and ep > 1:  # (the operator profile says it in its moe section)
        engine["enable_expert_parallel"] = True
    note = "recorded" if "num_gpu_blocks_override" in engine else "estimated"
    if ep > 1 and "num_gpu_blocks_override" not in engine:
        d = vllm_defaults(device)
        engine["num_gpu_blocks_override"] = expert_parallel_blocks(
            model, device, ep, engine.get("block_size") or d["block_size"], engine.get("gpu_memory_utilization", 0.9),
            engine.get("max_num_batched_tokens") or d["max_num_batched_tokens"],
            engine.get("max_num_seqs") or d["max_num_seqs"], engine.get("kv_cache_dtype", "auto"))
    engine.pop("gpu_memory_utilization", None) if "num_gpu_blocks_override" in engine else None
    cfg = build_config({"engine": engine,
                        "cluster": {"instances": dp, "tensor_parallel_size": run.tp, "data_parallel": dp > 1,
                                    "intra_node_link": link},
                        # vLLM's internal DP load balancer: the rank with the lowest 4·waiting + running
                        "policy": {"router": "vllm-dp"},
                        "metrics": {"sample_interval_s": 0.0},
                        # one step at a time: the check should not depend on the (exact) decode-run shortcut
                        "fast_forward": fast_forward})
    dep = build_deployment(model, device, cfg, profile)
    # the importer gives each request its prompt's block identities when the workload file is there
    programs = run.programs if prompt_blocks else [
        dataclasses.replace(p, calls=(dataclasses.replace(p.calls[0], input_tokens=None, hash_ids=None),),
                            block_size=None) for p in run.programs]
    sim = Simulation(programs, dep, cfg)
    res = sim.run()
    return {"label": label, "measured": measured_stats(df), "sim": simulated_stats(res.calls),
            "llmservingsim": llmservingsim_diffs(run_dir / summary), "blocks": dep.engine.num_gpu_blocks,
            "blocks_from": note, "dep": dep, "res": res}


def pct(a: float, b: float) -> float:
    return (a - b) / b * 100.0


def table(rows: list[dict]) -> list[str]:
    cols = [f"{s}_{m}" for m in METRICS for s in ("mean", "p99")]
    head = f"{'run':34s} {'KV blocks':>15s} " + " ".join(f"{c:>17s}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for c in cols:
            ours = pct(r["sim"][c], r["measured"][c])
            theirs = r["llmservingsim"].get(c)
            cells.append(f"{ours:+7.1f}% ({theirs:+6.1f}%)" if theirs is not None else f"{ours:+7.1f}% (   n/a)")
        lines.append(f"{r['label']:34s} {r['blocks']:>7d} {r['blocks_from']:>7s} " + " ".join(f"{x:>17s}" for x in cells))
    lines.append("cells: ours vs the measured vLLM run (LLMServingSim's own Diff% from its summary; the old "
                 "RTX 4090 run's summary predates its later fixes)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--only", default=None, help="substring of a run label")
    ap.add_argument("--fast-forward", action="store_true", help="advance pure-decode runs together (exact, faster)")
    ap.add_argument("--by-name", action="store_true",
                    help="price steps as for a device given by name (the learned roofline) instead of the operator profile")
    ap.add_argument("--no-prompt-blocks", action="store_true",
                    help="replay lengths only (no prompt sharing between requests)")
    a = ap.parse_args(argv)
    if not (a.reference / "LLMServingSim").is_dir():
        print(f"reference data not found under {a.reference}", file=sys.stderr)
        return 2
    rows = []
    for case in RUNS:
        if a.only and a.only not in case[0]:
            continue
        r = run_case(a.reference, case, prompt_blocks=not a.no_prompt_blocks,
                     fast_forward=a.fast_forward, by_name=a.by_name)
        rows.append(r)
        m, s = r["measured"], r["sim"]
        print(f"{r['label']}: measured mean TTFT/TPOT/E2E {m['mean_ttft']:.0f}/{m['mean_tpot']:.1f}/{m['mean_e2el']:.0f} ms, "
              f"simulated {s['mean_ttft']:.0f}/{s['mean_tpot']:.1f}/{s['mean_e2el']:.0f} ms", flush=True)
    print()
    for line in table(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
