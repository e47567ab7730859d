"""Per-request block tables over the pool, with vLLM v1's prefix-cache rules.

- `get_computed_blocks`: longest run of cached full blocks from the start; the lookup
  stops at the first miss and never covers the last prompt token (it must be computed to
  produce logits), so at most `(num_tokens - 1) // block_size` blocks hit.
- `allocate_slots`: enough blocks for `num_computed + num_new_tokens`, counting cache-hit
  blocks that sit in the free queue as not free; fails (None) rather than evicting anything
  a running request holds. Full blocks get their identity (are cached) at allocation time.
- `free`: a request's blocks go back tail-first, so its last blocks are evicted first.

Speed: a request's keys are built as an array (Request.block_keys) and looked up, cached
and released as whole runs (BlockPool.match_prefix / cache_many / free_blocks), with the
same results, block for block and in the same order, as vLLM's per-block loops. Block
tables stay Python lists (the public `req_to_blocks`); next to each, the manager keeps the
arrays it was built from, so freeing a table does not convert it back element by element
(tables are append-only until freed: the fast-forward appends decode blocks to the list).
A waiting request refused blocks is looked up again every step: the manager keeps its last
lookup and answers from it, after two checks (its hit blocks still hold their keys, its
first miss is still a miss) that make the answer the one a fresh lookup would give.
"""

from __future__ import annotations

import numpy as np

from .block_pool import BlockPool
from .request import Request

_SMALL = 8  # below this many blocks, plain Python beats numpy's per-call overhead


class KVCacheManager:
    __slots__ = ("block_size", "pool", "enable_caching", "req_to_blocks", "num_cached_block",
                 "max_model_len", "prefix_cache_queries", "prefix_cache_hits", "_last_hits", "_lookup", "_arrays")

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
        self._last_hits: tuple[list[int], np.ndarray | None] = ([], None)  # the last lookup, as an array
        # The last lookup: (request, its block count, hits, as an array, the key of the first
        # miss or None), to answer a refused waiting request's next lookup cheaply.
        self._lookup: tuple | None = None
        # request id -> [arrays whose concatenation is the start of its block table, its length]
        self._arrays: dict[int, list] = {}

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        if not self.enable_caching:
            return [], 0
        max_blocks = (req.num_tokens - 1) // self.block_size
        if max_blocks <= 0:
            return [], 0
        pool = self.pool
        memo = self._lookup
        if memo is not None and memo[0] is req and memo[1] == max_blocks:
            # The same request looked up again (it was refused blocks): the answer stands
            # while its hit blocks still hold their keys and its first miss is still a miss.
            _, _, hits, arr, miss_key = memo
            if (not hits or pool.hold_keys(arr, req.block_keys(0, len(hits)))) and (
                    miss_key is None or pool.get_cached_block(miss_key) is None):
                self._last_hits = (hits, arr)
                return hits, len(hits) * self.block_size
        runs = req.key_runs(0, max_blocks)
        if runs is not None:
            arr, miss_key = pool.match_runs(runs)
        else:
            keys = req.block_keys(0, max_blocks)
            arr = pool.match_prefix(keys)
            miss_key = keys.item(len(arr)) if len(arr) < max_blocks else None
        hits = arr.tolist()
        self._last_hits = (hits, arr)
        self._lookup = (req, max_blocks, hits, arr, miss_key)
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
        n = (num_tokens - 1) // self.block_size
        if n <= 0:
            return 0
        req = getattr(keys_fn, "__self__", None)
        if isinstance(req, Request) and getattr(keys_fn, "__func__", None) is Request.block_key:
            return len(self.pool.match_prefix(req.block_keys(0, n), req.key_runs(0, n)))
        cached = self.pool.cached
        for i in range(n):
            if keys_fn(i) not in cached:
                return i
        return n

    def allocate_slots(self, req: Request, num_new_tokens: int, num_new_computed_tokens: int = 0,
                       new_computed_blocks: list[int] | tuple = (), delay_cache_blocks: bool = False) -> bool:
        if new_computed_blocks:
            return self._allocate_with_hits(req, num_new_tokens, num_new_computed_tokens, new_computed_blocks,
                                            delay_cache_blocks)
        # A running request's next tokens (decode, prefill chunk) or an admission without hits.
        bs = self.block_size
        pool = self.pool
        rid = req.request_id
        total = req.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        need = total if total < self.max_model_len else self.max_model_len
        blocks = self.req_to_blocks.get(rid)
        have = len(blocks) if blocks is not None else 0
        num_to_allocate = -(-need // bs) - have
        if num_to_allocate > pool.num_free:
            return False
        if blocks is None:
            blocks = self.req_to_blocks[rid] = []
            self.num_cached_block[rid] = 0
        new = None
        if num_to_allocate == 1:  # a decode entering a new block: the list alone
            blocks.append(pool.get_new_block())
        elif num_to_allocate > 1:
            mirror = self._mirror(rid, blocks)
            new = pool.take_new_blocks(num_to_allocate)
            blocks.extend(new.tolist())
            mirror[0].append(new)
            mirror[1] = len(blocks)
        if self.enable_caching and not delay_cache_blocks:
            num_tokens = req.num_prompt_tokens + req.num_output_tokens
            num_full = (total if total < num_tokens else num_tokens) // bs
            if num_full > self.num_cached_block[rid]:
                self._cache_full_blocks(req, blocks, num_full, have, have, new)
        return True

    def allocate_decode_slot(self, req: Request) -> bool:
        """allocate_slots(req, 1) for a running decode (one token short of its token count,
        below max_model_len): at most one new block and one block to cache, without the
        general bookkeeping. The scheduler's hot loop calls it at block boundaries."""
        rid = req.request_id
        blocks = self.req_to_blocks.get(rid)
        c = req.num_computed_tokens
        bs = self.block_size
        if blocks is None:
            return self.allocate_slots(req, 1)
        room = len(blocks) * bs - c  # free slots in the table
        if room <= 0:
            if room < 0:  # more than one block short
                return self.allocate_slots(req, 1)
            pool = self.pool  # the slot opens a new block
            if not pool.num_free:
                return False
            blocks.append(pool.get_new_block())
        if self.enable_caching:
            num_full = (c + 1) // bs
            num_cached = self.num_cached_block
            start = num_cached[rid]
            if num_full == start + 1:  # the token fills a block: cache it
                num_cached[rid] = num_full
                self.pool.cache_block(blocks[start], req.block_key(start))
            elif num_full > start:
                self._cache_full_blocks(req, blocks, num_full)
        return True

    def _allocate_with_hits(self, req: Request, num_new_tokens: int, num_new_computed_tokens: int,
                            hit_blocks: list[int], delay_cache_blocks: bool) -> bool:
        """allocate_slots for a request admitted with cache hits (they come first in its table)."""
        bs = self.block_size
        pool = self.pool
        rid = req.request_id
        num_computed = req.num_computed_tokens + num_new_computed_tokens
        need = min(num_computed + num_new_tokens, self.max_model_len)
        blocks = self.req_to_blocks.get(rid)
        have = len(blocks) if blocks is not None else 0
        num_hits = len(hit_blocks)
        num_to_allocate = -(-need // bs) - have - num_hits
        hits, arr = self._last_hits
        if hits is not hit_blocks or len(arr) != num_hits:  # not the list the last lookup returned
            arr = np.array(hit_blocks, dtype=np.intp)
        ref = pool.ref_cnt[arr]
        # hit blocks sitting in the free queue are not free for this allocation
        evictable = num_hits - int(np.count_nonzero(ref))
        if num_to_allocate > pool.num_free - evictable:
            return False
        if blocks is None:
            blocks = self.req_to_blocks[rid] = []
            self.num_cached_block[rid] = 0
        mirror = self._mirror(rid, blocks)
        pool.touch(arr, ref)
        blocks.extend(hit_blocks)
        mirror[0].append(arr)
        new = None
        if num_to_allocate > 0:
            new = pool.take_new_blocks(num_to_allocate)
            blocks.extend(new.tolist())
            mirror[0].append(new)
        mirror[1] = len(blocks)
        if self.enable_caching and not delay_cache_blocks:
            num_full = min(num_computed + num_new_tokens, req.num_tokens) // bs
            self._cache_full_blocks(req, blocks, num_full, have, have + num_hits, new)
        return True

    def cache_blocks(self, req: Request, num_tokens: int) -> None:
        rid = req.request_id
        self._cache_full_blocks(req, self.req_to_blocks[rid], num_tokens // self.block_size)

    def _cache_full_blocks(self, req: Request, blocks: list[int], num_full: int, have: int = 0,
                           new_lo: int = 0, new: np.ndarray | None = None) -> None:
        """Give blocks num_cached_block .. num_full-1 their identity (vLLM's cache_blocks).
        Blocks have..new_lo-1 are this allocation's cache hits (cached already: skipped);
        `new`, if given, holds blocks new_lo.. as an array."""
        rid = req.request_id
        start = self.num_cached_block[rid]
        if num_full <= start:
            return
        self.num_cached_block[rid] = num_full
        lo = new_lo if have <= start < new_lo else start
        if num_full - lo < _SMALL:
            pool = self.pool
            key = req.block_key
            for i in range(lo, num_full):
                pool.cache_block(blocks[i], key(i))  # a no-op for blocks cached already
            return
        fresh = new is not None and lo >= new_lo  # all blocks from this allocation: no identity yet
        if fresh:
            arr = new[lo - new_lo:num_full - new_lo]
        else:
            arr = np.array(blocks[lo:num_full], dtype=np.intp)
        self.pool.cache_many(arr, req.block_keys(lo, num_full), req.key_runs(lo, num_full), fresh)

    def _mirror(self, rid: int, blocks: list[int]) -> list:
        """The request's table arrays, brought up to the list's length."""
        m = self._arrays.get(rid)
        if m is None:
            m = self._arrays[rid] = [[], 0]
        if m[1] < len(blocks):  # blocks appended one at a time (decodes)
            m[0].append(np.array(blocks[m[1]:], dtype=np.intp))
            m[1] = len(blocks)
        return m

    def free(self, req: Request) -> list[int]:
        """Release the request's blocks (tail first). Returns its block list."""
        rid = req.request_id
        blocks = self.req_to_blocks.pop(rid, None)
        self.num_cached_block.pop(rid, None)
        if blocks:
            parts = self._mirror(rid, blocks)[0]
            table = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self.pool.free_blocks(table[::-1])
        self._arrays.pop(rid, None)
        return blocks or []

    def take_blocks(self, req: Request) -> list[int]:
        """Detach the request's blocks without freeing them (a policy now owns the refs)."""
        self.num_cached_block.pop(req.request_id, None)
        self._arrays.pop(req.request_id, None)
        return self.req_to_blocks.pop(req.request_id, None) or []

    def num_blocks_of(self, req: Request) -> int:
        blocks = self.req_to_blocks.get(req.request_id)
        return len(blocks) if blocks else 0

    def usage(self) -> float:
        return self.pool.usage()
