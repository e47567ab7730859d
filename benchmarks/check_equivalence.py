"""Bit-for-bit equivalence check of simulator outputs against a reference (recorded, or another checkout).

A speed change to the engine (block pool, KV cache manager, fast-forward) must not change a
single result. This script replays every sample trace and a synthetic bench workload under
a set of configurations that exercise the block layer (retention policies, schedulers,
every router and scheduler, a per-operator latency profile, a frontend delay, block sizes 1
and 128, prefix caching and chunked prefill off, a small KV so that preemption and eviction
happen, fast-forward off) and compares calls.csv, programs.csv, timeseries.csv and
summary.json byte for byte (summary's `sim_events` excepted: event counts may change; and a
config key only one side has, a knob added at its default, since both sides run the same
`--set` lists).

    python benchmarks/check_equivalence.py record /tmp/eqref     # before the change
    python benchmarks/check_equivalence.py compare /tmp/eqref    # after: PASS/FAIL per case
    python benchmarks/check_equivalence.py against /tmp/ref-checkout /tmp/eqwork

`against` runs every case in another checkout (e.g. `git worktree add /tmp/ref-checkout
HEAD`, the code before the change) and in this one, side by side, and compares them: use it
when other files change while you work, so that a stored reference would go stale.
Exit code 1 if any case fails. `--jobs N` runs cases in parallel; `--only SUBSTR` filters;
`--set KEY=VALUE` adds a --set to every case on both sides (e.g. engine.async_scheduling=false
to compare the synchronous engine), `--new-set` to the new side only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FILES = ("calls.csv", "programs.csv", "timeseries.csv", "summary.json")
SMALL_KV = "engine.num_gpu_blocks_override=3000"

# name -> --set overrides
CONFIGS: dict[str, list[str]] = {
    "lru": [],
    "drop": ["policy.kv=drop"],
    "pin-ttl": ["policy.kv=pin-ttl"],
    "offload": ["policy.kv=offload"],
    "plas": ["policy.scheduler=plas"],
    "prefix3": ["cluster.instances=3", "policy.router=prefix-aware"],
    "nofast": ["fast_forward=false"],
    "small-lru": [SMALL_KV],
    "small-drop": [SMALL_KV, "policy.kv=drop"],
    "small-drop-prefix": [SMALL_KV, "policy.kv=drop", "policy.kv_drop_shared_prefix=true"],
    "small-pin-ttl": [SMALL_KV, "policy.kv=pin-ttl"],
    "small-offload": [SMALL_KV, "policy.kv=offload"],
    "small-plas": [SMALL_KV, "policy.scheduler=plas"],
    "small-prefix3": [SMALL_KV, "cluster.instances=3", "policy.router=prefix-aware"],
    "small-nofast": [SMALL_KV, "fast_forward=false"],
    "small-chunk": [SMALL_KV, "engine.long_prefill_token_threshold=256", "engine.max_num_batched_tokens=1024"],
    "program-fcfs": ["policy.scheduler=program-fcfs"],
    "small-program-fcfs": [SMALL_KV, "policy.scheduler=program-fcfs"],
    "rr4": ["cluster.instances=4", "policy.router=round-robin"],
    "small-least3": [SMALL_KV, "cluster.instances=3", "policy.router=least-loaded"],
    "affinity4": ["cluster.instances=4", "policy.router=session-affinity"],
    "small-affinity3-pin-ttl": [SMALL_KV, "cluster.instances=3", "policy.router=session-affinity", "policy.kv=pin-ttl"],
    "small-frontend": [SMALL_KV, "latency.frontend_s=0.004"],
    "bs1": ["engine.block_size=1", "engine.num_gpu_blocks_override=60000"],
    "bs128-seqs8": ["engine.block_size=128", "engine.max_num_seqs=8", "engine.num_gpu_blocks_override=400"],
    "small-nocache": [SMALL_KV, "engine.enable_prefix_caching=false"],
    "small-nochunk": [SMALL_KV, "engine.enable_chunked_prefill=false"],
    "ops": [],
    "small-ops-plas": [SMALL_KV, "policy.scheduler=plas"],
    # sliding-window models (vLLM's KV cache groups; gpt-oss also MoE)
    "gptoss": ["cluster.instances=2"],
    "small-gemma-pin-ttl": ["engine.num_gpu_blocks_override=4000", "policy.kv=pin-ttl"],
    "small-gemma-sync": ["engine.num_gpu_blocks_override=4000", "engine.async_scheduling=false"],
}
# Cases run on other hardware than h100-sxm / llama-3.1-8b: name -> (--hardware, --model).
# h100-sxm-llama-2-7b is a per-operator profile (OperatorModel); the rest use the roofline.
HARDWARE: dict[str, tuple[str, str]] = {
    "ops": ("h100-sxm-llama-2-7b", "llama-2-7b"),
    "small-ops-plas": ("h100-sxm-llama-2-7b", "llama-2-7b"),
    "gptoss": ("h100-sxm", "gpt-oss-20b"),
    "small-gemma-pin-ttl": ("h100-sxm", "gemma-3-12b"),
    "small-gemma-sync": ("h100-sxm", "gemma-3-12b"),
}
DEFAULT_HARDWARE = ("h100-sxm", "llama-3.1-8b")


def traces(workdir: Path) -> list[Path]:
    out = sorted((REPO / "sample_traces").glob("*.jsonl"))
    synth = workdir / "bench_300.jsonl"
    if not synth.exists():
        from benchmarks.bench_sim import workload
        from replay.trace import write_trace
        write_trace(workload(300, 20, 4.0, seed=1), synth)
    return out + [synth]


def run_case(trace: Path, name: str, out: Path, repo: Path = REPO, extra: tuple[str, ...] = ()) -> str:
    # A path relative to the repository: summary.json records it, and a reference recorded
    # from another checkout must read the same.
    path = trace.relative_to(REPO) if trace.is_relative_to(REPO) else trace
    hardware, model = HARDWARE.get(name, DEFAULT_HARDWARE)
    cmd = [sys.executable, "-m", "replay.cli", str(path), "--hardware", hardware, "--model", model,
           "--out", str(out), "--quiet"]
    for s in (*CONFIGS[name], *extra):
        cmd += ["--set", s]
    p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if p.returncode != 0:
        return f"exit {p.returncode}: {(p.stderr or p.stdout).strip().splitlines()[-1:]}"
    return ""


def _summary(path: Path) -> dict:
    s = json.loads(path.read_text())
    s.pop("sim_events", None)
    return s


def _drop_one_sided_config_keys(a: dict, b: dict) -> None:
    """Forget the config keys of a section that only one summary has (a knob added at its
    default), and likewise the resolved engine's (deployment.engine)."""
    ca, cb = a.get("config") or {}, b.get("config") or {}
    pairs = [(ca[sec], cb[sec]) for sec in set(ca) & set(cb)]
    pairs.append(((a.get("deployment") or {}).get("engine"), (b.get("deployment") or {}).get("engine")))
    for x, y in pairs:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in set(x) ^ set(y):
                x.pop(k, None)
                y.pop(k, None)


def compare_dirs(ref: Path, new: Path) -> list[str]:
    bad = []
    for f in FILES:
        a, b = ref / f, new / f
        if not a.exists() and not b.exists():
            continue
        if not a.exists() or not b.exists():
            bad.append(f"{f} missing")
        elif f == "summary.json":
            sa, sb = _summary(a), _summary(b)
            _drop_one_sided_config_keys(sa, sb)
            if sa != sb:
                bad.append(f)
        elif a.read_bytes() != b.read_bytes():
            bad.append(f)
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("record", "compare", "against"))
    ap.add_argument("refdir", type=Path, help="reference outputs (record, compare) or the other checkout (against)")
    ap.add_argument("workdir", type=Path, nargs="?", help="against: where both sides' outputs go")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--set", dest="both_set", action="append", default=[], metavar="KEY=VALUE",
                    help="a --set for every case on both sides (record, compare's new side, against)")
    ap.add_argument("--new-set", action="append", default=[], metavar="KEY=VALUE",
                    help="against/compare: a --set for the new side only (e.g. a knob that selects the "
                         "old behaviour: engine.vllm_version=0.19.0)")
    a = ap.parse_args()
    if a.mode == "against":
        other = a.refdir.resolve()
        if not (other / "simulator").is_dir():
            ap.error(f"{other} is not a checkout of this repository")
        work = a.workdir or Path(tempfile.mkdtemp(prefix="eqcheck-"))
        work.mkdir(parents=True, exist_ok=True)
        a.refdir = work / "ref"
    else:
        other = None
        work = Path(tempfile.mkdtemp(prefix="eqcheck-"))
    a.refdir.mkdir(parents=True, exist_ok=True)
    cases = [(t, name) for t in traces(work if other else a.refdir) for name in CONFIGS
             if a.only in f"{t.stem}/{name}"]
    scratch = work / "new" if other else work

    def one(case) -> tuple[str, str]:
        trace, name = case
        label = f"{trace.stem}/{name}"
        ref = a.refdir / trace.stem / name
        if a.mode == "record":
            err = run_case(trace, name, ref, extra=tuple(a.both_set))
            return label, ("RECORDED" if not err else f"ERROR {err}")
        if other is not None:
            err = run_case(trace, name, ref, other, extra=tuple(a.both_set))
            if err:
                return label, f"FAIL reference run: {err}"
        elif not ref.exists():
            return label, "FAIL (no reference)"
        new = scratch / trace.stem / name
        err = run_case(trace, name, new, extra=(*a.both_set, *a.new_set))
        if err:
            return label, f"FAIL {err}"
        bad = compare_dirs(ref, new)
        return label, "PASS" if not bad else f"FAIL ({', '.join(bad)} differ)"

    failed = 0
    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        for label, verdict in ex.map(one, cases):
            print(f"{verdict.split()[0]:8s} {label}  {verdict if verdict not in ('PASS', 'RECORDED') else ''}",
                  flush=True)
            failed += verdict.startswith(("FAIL", "ERROR"))
    print(f"{len(cases) - failed}/{len(cases)} cases {'recorded' if a.mode == 'record' else 'identical'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
