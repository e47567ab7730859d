"""The KV block pool: reference counts, the prefix-cache map, and the free-block queue.

As in vLLM v1, the free queue is an intrusive doubly-linked list over block ids (prev/next
arrays, two sentinels), so reviving a cached free block is O(1) and nothing is allocated
per step. Allocation pops from the head and evicts the popped block's cached identity;
freed blocks are appended at the tail and stay hit-able until they are popped.
Block 0 is vLLM's null block: reserved, never allocated.
"""

from __future__ import annotations


class BlockPool:
    __slots__ = ("num_gpu_blocks", "enable_caching", "ref_cnt", "block_key", "_prev", "_next",
                 "_head", "_tail", "num_free", "cached", "_dups", "num_evictions", "on_evict")

    def __init__(self, num_gpu_blocks: int, enable_caching: bool = True):
        if num_gpu_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is vLLM's null block), got {num_gpu_blocks}")
        n = num_gpu_blocks
        self.num_gpu_blocks = n
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * n
        self.block_key: list[int | None] = [None] * n
        self._head = n
        self._tail = n + 1
        # prev/next over ids 0..n-1 plus sentinels n (head) and n+1 (tail); queue starts 1..n-1
        nxt = [-1] * (n + 2)
        prv = [-1] * (n + 2)
        order = [self._head] + list(range(1, n)) + [self._tail]
        for a, b in zip(order, order[1:]):
            nxt[a] = b
            prv[b] = a
        self._next, self._prev = nxt, prv
        self.ref_cnt[0] = 1
        self.num_free = n - 1
        self.cached: dict[int, int] = {}
        self._dups: dict[int, list[int]] = {}
        self.num_evictions = 0
        self.on_evict = None  # optional callback(key) when a cached block loses its identity

    # -- free queue -------------------------------------------------------------------------
    def _unlink(self, b: int) -> None:
        p, nx = self._prev[b], self._next[b]
        self._next[p] = nx
        self._prev[nx] = p
        self._prev[b] = self._next[b] = -1
        self.num_free -= 1

    def _append(self, b: int) -> None:
        t = self._tail
        p = self._prev[t]
        self._next[p] = b
        self._prev[b] = p
        self._next[b] = t
        self._prev[t] = b
        self.num_free += 1

    def free_queue(self) -> list[int]:
        """Block ids in eviction order (head first). For tests and checks."""
        out, b = [], self._next[self._head]
        while b != self._tail:
            out.append(b)
            b = self._next[b]
        return out

    # -- allocation -------------------------------------------------------------------------
    def get_new_blocks(self, num_blocks: int) -> list[int]:
        if num_blocks > self.num_free:
            raise RuntimeError(f"asked for {num_blocks} blocks with {self.num_free} free")
        out = []
        nxt, ref, keys = self._next, self.ref_cnt, self.block_key
        for _ in range(num_blocks):
            b = nxt[self._head]
            self._unlink(b)
            if keys[b] is not None:
                self._evict(b)
            ref[b] = 1
            out.append(b)
        return out

    def touch(self, blocks) -> None:
        """Take a reference on cache-hit blocks, reviving them from the free queue."""
        ref = self.ref_cnt
        for b in blocks:
            if ref[b] == 0:
                self._unlink(b)
            ref[b] += 1

    def free_blocks(self, ordered_blocks) -> None:
        """Drop a reference on each block; blocks reaching zero join the queue tail in the
        given order (callers pass a request's blocks tail-first, as vLLM does)."""
        ref = self.ref_cnt
        for b in ordered_blocks:
            ref[b] -= 1
            if ref[b] == 0:
                self._append(b)
            elif ref[b] < 0:
                raise RuntimeError(f"block {b} freed more often than allocated")

    # -- prefix cache -----------------------------------------------------------------------
    def get_cached_block(self, key: int) -> int | None:
        return self.cached.get(key)

    def cache_block(self, b: int, key: int) -> None:
        if not self.enable_caching or self.block_key[b] is not None:
            return
        self.block_key[b] = key
        if key in self.cached:
            # Two requests computed the same block: vLLM keeps both under one hash.
            self._dups.setdefault(key, []).append(b)
        else:
            self.cached[key] = b

    def _evict(self, b: int) -> None:
        key = self.block_key[b]
        self.block_key[b] = None
        self.num_evictions += 1
        if self.cached.get(key) == b:
            dups = self._dups.get(key)
            if dups:
                self.cached[key] = dups.pop(0)
                if not dups:
                    del self._dups[key]
            else:
                del self.cached[key]
                if self.on_evict is not None:
                    self.on_evict(key)
        else:
            dups = self._dups[key]
            dups.remove(b)
            if not dups:
                del self._dups[key]

    def uncache(self, b: int) -> None:
        """Forget a block's identity now (it stays allocated or free as it is)."""
        if self.block_key[b] is not None:
            self._evict(b)
            self.num_evictions -= 1  # a forced forget is not an eviction by allocation

    def usage(self) -> float:
        """vLLM's KV usage: 1 - free / total."""
        return 1.0 - self.num_free / self.num_gpu_blocks
