"""An LLM call inside an instance, with vLLM v1's request bookkeeping names."""

from __future__ import annotations

import numpy as np

WAITING = 0
RUNNING = 1
PREEMPTED = 2
WAITING_FOR_REMOTE_KVS = 3  # loading offloaded KV from a host/CXL tier
FINISHED = 4

STATUS_NAMES = {WAITING: "waiting", RUNNING: "running", PREEMPTED: "preempted",
                WAITING_FOR_REMOTE_KVS: "waiting_for_remote_kvs", FINISHED: "finished"}


class Request:
    """One call being served. Token bookkeeping follows vLLM: `num_tokens` is prompt plus
    generated; each step's work is `num_tokens - num_computed_tokens` capped by the budget;
    the KV of the last generated token is never computed."""

    __slots__ = (
        "request_id", "program", "call_index", "num_prompt_tokens", "max_tokens",
        "num_output_tokens", "num_computed_tokens", "status", "arrival_time", "priority",
        "num_preemptions", "num_cached_tokens", "num_external_tokens", "external_tier_tokens",
        "scheduled_time", "first_token_time", "last_token_time", "finish_time",
        "key_base", "prefix_key_base", "prefix_full_blocks", "hash_keys", "instance_id",
        "load_done_time", "num_output_placeholders", "num_in_flight_tokens", "win_next", "cache_next",
    )

    def __init__(self, request_id: int, num_prompt_tokens: int, max_tokens: int, arrival_time: float,
                 key_base: int, prefix_key_base: int = 0, prefix_full_blocks: int = 0,
                 hash_keys: list[int] | None = None, program=None, call_index: int = 0,
                 priority: float = 0.0):
        if num_prompt_tokens < 1:
            raise ValueError("a request needs at least one prompt token")
        if hash_keys is not None and len(set(hash_keys)) != len(hash_keys):
            # Chained block hashes never repeat within a sequence; the block layer relies on
            # it (a block table never holds one block twice).
            raise ValueError("a request's hash keys must be distinct (chained block hashes)")
        self.request_id = request_id
        self.program = program
        self.call_index = call_index
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.num_output_tokens = 0
        self.num_computed_tokens = 0
        self.status = WAITING
        self.arrival_time = arrival_time
        self.priority = priority
        self.num_preemptions = 0
        self.num_cached_tokens = -1
        self.num_external_tokens = 0
        self.external_tier_tokens: dict[str, int] = {}
        self.scheduled_time = -1.0
        self.first_token_time = -1.0
        self.last_token_time = -1.0
        self.finish_time = -1.0
        self.key_base = key_base
        self.prefix_key_base = prefix_key_base
        self.prefix_full_blocks = prefix_full_blocks
        self.hash_keys = hash_keys
        self.instance_id = -1
        self.load_done_time = -1.0
        # Async scheduling (vLLM's AsyncScheduler): tokens of steps scheduled but not yet
        # returned, the last one (max_tokens or max_model_len reached) not counted (the
        # scheduler then sees nothing left to schedule, as vLLM's skip of that step does)
        self.num_output_placeholders = 0
        self.num_in_flight_tokens = 0  # tokens of its steps not yet returned (async scheduling)
        # Sliding-window models under async scheduling (KVCacheManager.allocate_decode_slot sets
        # them, 0 asks for a call): the computed-less-in-flight tokens at which the window next
        # drops a block, and the known tokens at which the next block is full and cached
        self.win_next = 0
        self.cache_next = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    def block_key(self, i: int) -> int:
        """Identity of the i-th full block of this request's token sequence.

        Shared-prefix blocks are keyed by the prefix, the program's own blocks by the
        program and position (the context is append-only, so position fixes content), and
        hash_ids traces by their interned chain. Equal keys <=> equal chained block hashes.
        """
        hk = self.hash_keys
        if hk is not None:
            return hk[i] if i < len(hk) else self.key_base + i
        if i < self.prefix_full_blocks:
            return self.prefix_key_base - i
        return self.key_base + i

    def block_keys(self, lo: int, hi: int) -> np.ndarray:
        """block_key(i) for lo <= i < hi, as an int64 array."""
        hk = self.hash_keys
        if hk is not None:
            n = len(hk)
            if hi <= n:
                return np.array(hk[lo:hi], dtype=np.int64)
            own = self.key_base + np.arange(max(lo, n), hi, dtype=np.int64)
            return np.concatenate((np.array(hk[lo:n], dtype=np.int64), own)) if lo < n else own
        p = self.prefix_full_blocks
        if lo >= p:
            return self.key_base + np.arange(lo, hi, dtype=np.int64)
        if hi <= p:
            return self.prefix_key_base - np.arange(lo, hi, dtype=np.int64)
        return np.concatenate((self.prefix_key_base - np.arange(lo, p, dtype=np.int64),
                               self.key_base + np.arange(p, hi, dtype=np.int64)))

    def key_runs(self, lo: int, hi: int) -> list[tuple[int, int, int]] | None:
        """block_key(i) for lo <= i < hi as arithmetic runs (first key, step, count), or None
        for hash-keyed requests."""
        if self.hash_keys is not None:
            return None
        p = self.prefix_full_blocks
        runs = []
        if lo < p:
            runs.append((self.prefix_key_base - lo, -1, min(hi, p) - lo))
        s = max(lo, p)
        if hi > s:
            runs.append((self.key_base + s, 1, hi - s))
        return runs

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, prompt={self.num_prompt_tokens}, out={self.num_output_tokens}/"
                f"{self.max_tokens}, computed={self.num_computed_tokens}, {STATUS_NAMES[self.status]})")
