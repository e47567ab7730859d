"""Regenerate every trace in sample_traces/ with the importers (deterministic).

    python sample_traces/make_samples.py                 # rewrite them in place
    python sample_traces/make_samples.py --out /tmp/x    # write elsewhere (to compare)

The public source files are read from ../shared/reference beside the repository (override
with --reference). Synthetic samples need no source. Each sample is described, with its
provenance, in sample_traces/README.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from dataclasses import replace  # noqa: E402

from replay.importers import (ChatParams, SweAgentParams, chat_programs,  # noqa: E402
                              read_azure, read_mooncake, read_round_trace, read_session_csv,
                              swe_agent_programs, tiny_cpu_programs, write_jsonl)
from replay.importers.synthetic import TINY_CPU, LogNormal  # noqa: E402

DEFAULT_REFERENCE = REPO.parent / "shared" / "reference"

# name -> (source file under the reference dir or None, builder(source path) -> programs)
SAMPLES: dict[str, tuple[str | None, Callable[[Path | None], Iterator[dict]]]] = {
    "swe_agent_small.jsonl": (
        None, lambda _: swe_agent_programs(SweAgentParams(n_programs=40, rate_per_s=1 / 3),
                                           seed=7)),
    "chat_multiturn.jsonl": (
        None, lambda _: chat_programs(ChatParams(n_programs=60, rate_per_s=0.5,
                                                 burst_shape=0.25), seed=11)),
    "tiny_cpu.jsonl": (None, lambda _: tiny_cpu_programs(seed=3)),
    # Validation traces for real vLLM-CPU runs of the tiny random-weight models: prompts and
    # outputs scaled down so a case runs in seconds, with enough calls for percentiles.
    "cpu_coding.jsonl": (
        None, lambda _: swe_agent_programs(replace(TINY_CPU, n_programs=14, arrival_window_s=6.0,
                                                   min_calls=3, max_calls=6), seed=21)),
    "cpu_chat.jsonl": (
        None, lambda _: chat_programs(ChatParams(
            n_programs=14, rate_per_s=2.0, burst_shape=0.25, prefix_id="cpu-chat-system-v1",
            prefix_tokens=128, min_turns=2, max_turns=5,
            first_user_tokens=LogNormal(200, 0.6, 50, 600), user_tokens=LogNormal(40, 0.6, 8, 200),
            output_tokens=LogNormal(20, 0.4, 8, 40), think_s=LogNormal(0.6, 0.5, 0.1, 2.0),
            program_id_prefix="cpuchat"), seed=22)),
    "cpu_single.jsonl": (
        None, lambda _: chat_programs(ChatParams(
            n_programs=60, rate_per_s=6.0, burst_shape=1.0, prefix_id="none", prefix_tokens=0,
            min_turns=1, max_turns=1, continue_p=0.0,
            first_user_tokens=LogNormal(400, 0.8, 32, 2000), output_tokens=LogNormal(24, 0.5, 4, 64),
            program_id_prefix="single"), seed=23)),
    "tracelab_sessions.jsonl": (
        "TraceLab/example_sessions/sanitized/round_trace.jsonl",
        lambda src: read_round_trace(src, session_spacing_s=5.0)),
    "tracelab_replay_multi_session.jsonl": (
        "TraceLab/replay/examples/multi_session_large.csv",
        lambda src: read_session_csv(src)),
    "single_call_azure_conv.jsonl": (
        "AzurePublicDataset/data/AzureLLMInferenceTrace_conv.csv",
        lambda src: read_azure(src, limit=300)),
    "mooncake_conversation_small.jsonl": (
        "Mooncake/FAST25-release/traces/conversation_trace.jsonl",
        lambda src: read_mooncake(src, limit=300)),
}


def build(name: str, reference: Path = DEFAULT_REFERENCE) -> Iterator[dict]:
    """The programs of one sample; FileNotFoundError if its public source is absent."""
    source, builder = SAMPLES[name]
    if source is None:
        return builder(None)
    path = reference / source
    if not path.is_file():
        raise FileNotFoundError(f"{name}: source {path} not found (pass --reference)")
    return builder(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                    help="the shared/reference directory (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="where to write the samples (default: sample_traces/)")
    ap.add_argument("names", nargs="*", help="samples to build (default: all)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for name in args.names or SAMPLES:
        if name not in SAMPLES:
            print(f"unknown sample {name!r}; known: {', '.join(SAMPLES)}", file=sys.stderr)
            return 2
        try:
            n_programs, n_calls = write_jsonl(build(name, args.reference), args.out / name)
        except FileNotFoundError as exc:
            print(f"skipped {exc}", file=sys.stderr)
            status = 1
            continue
        size_kb = (args.out / name).stat().st_size / 1024
        print(f"{name}: {n_programs} programs, {n_calls} calls, {size_kb:.1f} KB")
    return status


if __name__ == "__main__":
    sys.exit(main())
