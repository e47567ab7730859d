"""Per-request block tables over the pool, with vLLM v1's prefix-cache rules.

- `get_computed_blocks`: longest run of cached full blocks from the start; the lookup
  stops at the first miss and never covers the last prompt token (it must be computed to
  produce logits), so at most `(num_tokens - 1) // block_size` blocks hit.
- `allocate_slots`: enough blocks for `num_computed + num_new_tokens`, counting cache-hit
  blocks that sit in the free queue as not free; fails (None) rather than evicting anything
  a running request holds. Full blocks get their identity (are cached) at allocation time.
- `free`: a request's blocks go back tail-first, so its last blocks are evicted first.
"""

from __future__ import annotations

from .block_pool import BlockPool
from .request import Request


class KVCacheManager:
    __slots__ = ("block_size", "pool", "enable_caching", "req_to_blocks", "num_cached_block",
                 "max_model_len", "prefix_cache_queries", "prefix_cache_hits")

    def __init__(self, num_gpu_blocks: int, block_size: int, enable_caching: bool = True,
                 max_model_len: int = 1 << 40):
        self.block_size = block_size
        self.pool = BlockPool(num_gpu_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.req_to_blocks: dict[int, list[int]] = {}
        self.num_cached_block: dict[int, int] = {}
        self.max_model_len = max_model_len
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        if not self.enable_caching:
            return [], 0
        max_blocks = (req.num_tokens - 1) // self.block_size
        cached = self.pool.cached
        hits = []
        key = req.block_key
        for i in range(max_blocks):
            b = cached.get(key(i))
            if b is None:
                break
            hits.append(b)
        return hits, len(hits) * self.block_size

    def record_lookup(self, num_tokens: int, num_hit: int) -> None:
        """Prefix-cache stats, counted when a looked-up request is admitted. (vLLM's counters
        also count lookups of a request that is then refused blocks and retried next step.)"""
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit

    def peek_hit_blocks(self, keys_fn, num_tokens: int) -> int:
        """How many leading full blocks would hit, without touching stats (for routers)."""
        if not self.enable_caching:
            return 0
        cached = self.pool.cached
        n = 0
        for i in range((num_tokens - 1) // self.block_size):
            if keys_fn(i) not in cached:
                break
            n += 1
        return n

    def allocate_slots(self, req: Request, num_new_tokens: int, num_new_computed_tokens: int = 0,
                       new_computed_blocks: list[int] | tuple = (), delay_cache_blocks: bool = False) -> bool:
        bs = self.block_size
        pool = self.pool
        num_computed = req.num_computed_tokens + num_new_computed_tokens
        need = min(num_computed + num_new_tokens, self.max_model_len)
        num_required = -(-need // bs)
        blocks = self.req_to_blocks.get(req.request_id)
        have = len(blocks) if blocks is not None else 0
        num_to_allocate = num_required - have - len(new_computed_blocks)
        if new_computed_blocks:
            ref = pool.ref_cnt
            evictable = sum(1 for b in new_computed_blocks if ref[b] == 0)
        else:
            evictable = 0
        if num_to_allocate > pool.num_free - evictable:
            return False
        if blocks is None:
            blocks = self.req_to_blocks[req.request_id] = []
            self.num_cached_block[req.request_id] = 0
        if new_computed_blocks:
            pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
        if num_to_allocate > 0:
            blocks.extend(pool.get_new_blocks(num_to_allocate))
        if self.enable_caching and not delay_cache_blocks:
            self.cache_blocks(req, min(num_computed + num_new_tokens, req.num_tokens))
        return True

    def cache_blocks(self, req: Request, num_tokens: int) -> None:
        num_full = num_tokens // self.block_size
        rid = req.request_id
        start = self.num_cached_block[rid]
        if num_full <= start:
            return
        blocks = self.req_to_blocks[rid]
        pool = self.pool
        key = req.block_key
        keys = pool.block_key
        for i in range(start, num_full):
            b = blocks[i]
            if keys[b] is None:
                pool.cache_block(b, key(i))
        self.num_cached_block[rid] = num_full

    def free(self, req: Request) -> list[int]:
        """Release the request's blocks (tail first). Returns its block list."""
        blocks = self.req_to_blocks.pop(req.request_id, None)
        self.num_cached_block.pop(req.request_id, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks))
        return blocks or []

    def take_blocks(self, req: Request) -> list[int]:
        """Detach the request's blocks without freeing them (a policy now owns the refs)."""
        self.num_cached_block.pop(req.request_id, None)
        return self.req_to_blocks.pop(req.request_id, None) or []

    def num_blocks_of(self, req: Request) -> int:
        blocks = self.req_to_blocks.get(req.request_id)
        return len(blocks) if blocks else 0

    def usage(self) -> float:
        return self.pool.usage()
