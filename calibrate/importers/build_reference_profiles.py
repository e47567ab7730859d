"""Rebuild the imported GPU profiles in hardware/profiles/ from ../shared/reference/.

    python -m calibrate.importers.build_reference_profiles [--reference DIR] [--out DIR] [--links-out DIR]

LLMServingSim operator profiles -> <device>-<model>.yaml (+ .tables/); Vidur's network
profiles -> hardware/interconnects/*-fitted.yaml; Vidur's compute profiles ->
<device>-<model>.yaml with attention and per-sequence ops from the learned roofline
(scripts/learn_roofline.py writes hardware/profiles/roofline-learned.yaml first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulator.hardware import HARDWARE_DIR

from .common import write_profile
from .llmservingsim import import_llmservingsim

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"

# (profile name, folder under LLMServingSim/profiler/perf, model, expert-parallel degree)
LLMSERVINGSIM = [
    ("rtx4090-llama-3.1-8b", "RTX4090/meta-llama/Llama-3.1-8B/bf16", "llama-3.1-8b", 1),
    ("rtx-pro-6000-llama-3.1-8b", "RTXPRO6000/meta-llama/Llama-3.1-8B/bf16", "llama-3.1-8b", 1),
    ("rtx-pro-6000-qwen3-32b", "RTXPRO6000/Qwen/Qwen3-32B/bf16", "qwen3-32b", 1),
    ("rtx-pro-6000-qwen3-30b-a3b", "RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16", "qwen3-30b-a3b-instruct-2507", 1),
    # The recorded vLLM run of this model used data parallel 2 x expert parallel 2.
    ("rtx-pro-6000-qwen3-30b-a3b-dp2ep2", "RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16",
     "qwen3-30b-a3b-instruct-2507", 2),
    # Hybrid linear/full attention MoE (LLMServingSim PR #34); only tp1 has every table.
    ("h100-sxm-qwen3.6-35b-a3b", "H100/Qwen/Qwen3.6-35B-A3B/bf16", "qwen3.6-35b-a3b", 1),
]


# GPU-to-GPU path of the box the profiles and the recorded runs come from, where it differs
# from the device file's default link.
BOX_LINKS = {
    "RTXPRO6000": ("pcie5-x16-no-p2p", (
        "GPU-to-GPU over PCIe through host memory (no P2P): the recorded runs do not say whether P2P was "
        "available; without it vLLM disables its custom all-reduce and NCCL stages every collective through "
        "host memory. An RTX PRO 6000 box with P2P would use pcie5-x16 and vLLM's custom all-reduce at TP 2.")),
}


def build_llmservingsim(ref: Path, out: Path) -> list[Path]:
    written = []
    tables_of: dict[str, str] = {}  # profile folder -> tables written for it (shared by EP variants)
    for name, sub, model, ep in LLMSERVINGSIM:
        d = ref / "LLMServingSim" / "profiler" / "perf" / sub
        if not d.is_dir():
            print(f"skip {name}: {d} not found", file=sys.stderr)
            continue
        prof = import_llmservingsim(d, model=model, name=name, expert_parallel=ep,
                                    intra_node_link=BOX_LINKS.get(sub.split("/", 1)[0]))
        if sub in tables_of:
            prof["latency_model"]["tables"] = tables_of[sub]
        else:
            tables_of[sub] = f"{name}.tables"
        written.append(write_profile(prof, out / f"{name}.yaml"))
        print(f"wrote {written[-1]}")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--out", type=Path, default=HARDWARE_DIR / "profiles")
    ap.add_argument("--links-out", type=Path, default=None,
                    help="where Vidur's fitted interconnect files go (default: hardware/interconnects/)")
    ap.add_argument("--only", choices=("llmservingsim", "vidur"), default=None)
    a = ap.parse_args(argv)
    if not a.reference.is_dir():
        print(f"reference data not found: {a.reference}", file=sys.stderr)
        return 2
    if a.only in (None, "llmservingsim"):
        build_llmservingsim(a.reference, a.out)
    if a.only in (None, "vidur"):
        from .vidur import build_vidur
        build_vidur(a.reference, a.out, a.links_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
