"""The KV block pool: reference counts, the prefix-cache map, and the free-block queue.

Behaviour is vLLM v1's BlockPool: allocation pops the free queue's head and evicts the
popped block's cached identity; freed blocks are appended at the tail and stay hit-able
until they are popped; a cache hit revives a free block wherever it sits in the queue.
Block 0 is vLLM's null block: reserved, never allocated.

The state is held in numpy arrays so that a call's hundreds of per-block operations (hits,
frees, allocations) cost a few array operations instead of hundreds of Python steps:

- Free queue. vLLM's is an intrusive doubly-linked list, so that a revived block leaves it
  in O(1). Here it is a FIFO of segments, one per free call holding its blocks in the order
  given, with lazy removal: a queue entry is (block, stamp), and it is live iff
  `_stamp[block] == stamp`. A block gets a fresh stamp when it is freed and stamp -1 when it
  leaves the queue (revived by a hit, or popped). Stamps are never reused, so a dead entry
  never comes back to life; the head only skips dead entries, and the live entries, in
  order, are exactly vLLM's list. Segments are compacted when dead entries pile up.
- Prefix cache. `cached` answers "which block does a lookup of this key return?". Several
  blocks may carry one key (two requests computed the same block; vLLM keeps them all under
  one hash): the first is the one returned, the others wait in `_dups` and take over,
  oldest first, when it is evicted. `_main_key[b]` is b's key iff b is the block a lookup
  returns; the key -> block map (key_index.KeyIndex) holds candidates checked against it,
  so evicting a run of blocks is two array writes.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .key_index import PAGE_BITS, PAGE_MASK, KeyIndex

NO_KEY = int(np.iinfo(np.int64).min)  # "no identity" in the key arrays; never a real key
_SMALL = 8  # below this many blocks, plain Python beats numpy's per-call overhead
_COMPACT_SLACK = 4096  # compact the queue when dead entries exceed live ones by this
_count = np.count_nonzero


def all_true(a: np.ndarray) -> bool:
    """a.all() for a small bool array: count_nonzero skips the Python layer around the
    ufunc reduction that ndarray.all() goes through (~0.3 us against ~0.9 us)."""
    return _count(a) == len(a)


def any_true(a: np.ndarray) -> bool:
    """a.any(), as all_true."""
    return _count(a) > 0


class BlockKeys:
    """Read-only view of each block's cached identity: `keys[b]` is an int, or None."""

    __slots__ = ("_a",)

    def __init__(self, a: np.ndarray):
        self._a = a

    def __getitem__(self, b: int) -> int | None:
        k = self._a.item(b)
        return None if k == NO_KEY else k

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self):
        return (None if k == NO_KEY else k for k in self._a.tolist())


class CachedKeys:
    """Read-only mapping view of the prefix cache: key -> the block a lookup returns."""

    __slots__ = ("_pool",)

    def __init__(self, pool: "BlockPool"):
        self._pool = pool

    def get(self, key: int, default=None):
        b = self._pool.get_cached_block(key)
        return default if b is None else b

    def __contains__(self, key: int) -> bool:
        return self._pool.get_cached_block(key) is not None

    def __getitem__(self, key: int) -> int:
        b = self._pool.get_cached_block(key)
        if b is None:
            raise KeyError(key)
        return b

    def __len__(self) -> int:
        return int(np.count_nonzero(self._pool._main_key != NO_KEY))

    def __iter__(self):
        mk = self._pool._main_key
        return iter(mk[mk != NO_KEY].tolist())


class BlockPool:
    __slots__ = ("num_gpu_blocks", "enable_caching", "ref_cnt", "block_key", "cached", "_key", "_main_key",
                 "_has_dup", "_index", "_dups", "_stamp", "_segs", "_pos", "_qlen", "_next_stamp", "num_free",
                 "num_evictions", "on_evict", "uncached_first")

    def __init__(self, num_gpu_blocks: int, enable_caching: bool = True, uncached_first: bool = False):
        """`uncached_first`: freed blocks without a cached identity (no block hash, or every
        block with prefix caching off) go to the head of the free queue, to be reused first,
        and cached ones to its tail (vLLM's BlockPool.free_blocks from after 0.19: LIFO reuse
        of blocks no lookup can hit); otherwise all go to the tail (vLLM 0.19 and earlier)."""
        self.uncached_first = uncached_first
        if num_gpu_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is vLLM's null block), got {num_gpu_blocks}")
        n = num_gpu_blocks
        self.num_gpu_blocks = n
        self.enable_caching = enable_caching
        self.ref_cnt = np.zeros(n, np.int64)
        self.ref_cnt[0] = 1
        self._key = np.full(n, NO_KEY, np.int64)  # every cached block's key
        # The key a lookup returns this block for; one spare NO_KEY entry at [-1], read by the
        # key index's empty entries (-1).
        self._main_key = np.full(n + 1, NO_KEY, np.int64)
        self._has_dup = np.zeros(n, bool)  # b is in _dups, or is the block of a key that has dups
        self._index = KeyIndex(self._main_key)
        self._dups: dict[int, list[int]] = {}
        self.block_key = BlockKeys(self._key)
        self.cached = CachedKeys(self)
        self._stamp = np.full(n, -1, np.int64)
        self._segs: deque[tuple[np.ndarray, np.ndarray]] = deque()  # (blocks, their stamps)
        self._pos = 0          # first unexamined entry of _segs[0]
        self._qlen = 0         # entries, live or dead, from the head to the tail
        self._next_stamp = 0
        self._push(np.arange(1, n, dtype=np.intp))
        self.num_free = n - 1
        self.num_evictions = 0
        self.on_evict = None  # optional callback(key) when a key leaves the cache

    # -- free queue -------------------------------------------------------------------------
    def _stamped(self, blocks: np.ndarray) -> np.ndarray:
        """Fresh stamps for blocks joining the queue (an entry is live while its block's stamp
        is the entry's)."""
        k = len(blocks)
        s = self._next_stamp
        self._next_stamp = s + k
        stamps = np.arange(s, s + k)
        self._stamp[blocks] = stamps
        self._qlen += k
        return stamps

    def _push(self, blocks: np.ndarray) -> None:
        """Append blocks (now unreferenced) at the tail, in order."""
        self._segs.append((blocks, self._stamped(blocks)))

    def _push_front(self, blocks: np.ndarray) -> None:
        """Put blocks (now unreferenced) at the head, blocks[0] first."""
        segs = self._segs
        if segs and self._pos:  # the head segment's consumed entries go, so the new one leads
            b0, s0 = segs[0]
            segs[0] = (b0[self._pos:], s0[self._pos:])
            self._pos = 0
        segs.appendleft((blocks, self._stamped(blocks)))

    def _live(self) -> np.ndarray:
        """Live queue entries, head first."""
        parts = []
        pos = self._pos
        stamp = self._stamp
        for blocks, stamps in self._segs:
            w = blocks[pos:]
            parts.append(w[stamp[w] == stamps[pos:]])
            pos = 0
        return np.concatenate(parts) if parts else np.zeros(0, np.intp)

    def _compact(self) -> None:
        live = self._live()
        self._segs.clear()
        self._pos = self._qlen = 0
        if len(live):
            self._push(live)

    def free_queue(self) -> list[int]:
        """Block ids in eviction order (head first). For tests and checks."""
        return self._live().tolist()

    def _pop(self, k: int) -> np.ndarray:
        """Take the first k live entries off the queue (the caller checked num_free >= k)."""
        segs, stamp = self._segs, self._stamp
        blocks, stamps = segs[0]
        pos = self._pos
        end = pos + k
        if end < len(blocks):
            w = blocks[pos:end]
            if all_true(stamp[w] == stamps[pos:end]):  # the common case: k live entries in a row
                self._qlen -= k
                self._pos = end
                return w
        parts = []
        win = 2 * k + 16  # most entries near the head are live; widen over dead runs
        while k:
            blocks, stamps = segs[0]
            pos, n = self._pos, len(blocks)
            end = min(n, pos + win)
            w = blocks[pos:end]
            live = (stamp[w] == stamps[pos:end]).nonzero()[0]
            if len(live) >= k:
                parts.append(w[live[:k]])
                end = pos + live.item(k - 1) + 1
                k = 0
            else:
                if len(live):
                    parts.append(w[live])
                    k -= len(live)
                win *= 4
            self._qlen -= end - pos
            if end == n:
                segs.popleft()
                self._pos = 0
            else:
                self._pos = end
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _pop_one(self) -> int:
        blocks, stamps = self._segs[0]
        pos = self._pos + 1
        b = blocks.item(pos - 1)
        if self._stamp.item(b) != stamps.item(pos - 1):
            return self._pop(1).item(0)
        self._qlen -= 1
        if pos == len(blocks):
            self._segs.popleft()
            pos = 0
        self._pos = pos
        return b

    # -- allocation -------------------------------------------------------------------------
    def get_new_blocks(self, num_blocks: int) -> list[int]:
        if num_blocks == 1:
            return [self.get_new_block()]
        if num_blocks > self.num_free:
            raise RuntimeError(f"asked for {num_blocks} blocks with {self.num_free} free")
        if num_blocks <= 0:
            return []
        return self.take_new_blocks(num_blocks).tolist()

    def get_new_block(self) -> int:
        """get_new_blocks(1)[0], kept scalar (a decode crossing a block boundary)."""
        if not self.num_free:
            raise RuntimeError("asked for 1 block with 0 free")
        b = self._pop_one()
        self._stamp[b] = -1
        self.ref_cnt[b] = 1
        self.num_free -= 1
        key = self._key.item(b)
        if key != NO_KEY:
            self.num_evictions += 1
            if self._main_key.item(b) == key and not self._dups and self.on_evict is None:
                # _forget's common case, inline: the block alone carries the key
                self._key[b] = NO_KEY
                self._main_key[b] = NO_KEY
            else:
                self._forget(b, key)
        return b

    def take_new_blocks(self, num_blocks: int) -> np.ndarray:
        """get_new_blocks as an array (1 <= num_blocks <= num_free)."""
        out = self._pop(num_blocks)
        self._stamp[out] = -1
        self.ref_cnt[out] = 1
        self.num_free -= num_blocks
        keys = self._key[out]
        cached = keys != NO_KEY
        n = int(np.count_nonzero(cached))
        if n:
            # vLLM evicts each popped block's identity as it pops it; popping does not look
            # at identities, so evicting the run afterwards, in order, is the same.
            self.num_evictions += n
            if n == num_blocks:
                self._forget_many(out, keys)
            else:
                self._forget_many(out[cached], keys[cached])
        return out

    def touch(self, blocks, ref: np.ndarray | None = None) -> None:
        """Take a reference on cache-hit blocks, reviving them from the free queue. A block
        appears at most once. `ref`: their ref_cnt, if the caller has read it already."""
        if not hasattr(blocks, "__len__"):
            blocks = list(blocks)
        if ref is None and len(blocks) < _SMALL:
            rc = self.ref_cnt
            for b in blocks:
                r = rc.item(b)
                if r == 0:
                    self._stamp[b] = -1
                    self.num_free -= 1
                rc[b] = r + 1
            return
        arr = np.asarray(blocks, dtype=np.intp)
        r = self.ref_cnt[arr] if ref is None else ref
        revived = len(arr) - int(np.count_nonzero(r))
        if revived:
            self._stamp[arr] = -1  # kills the revived blocks' queue entries (the others had none)
            self.num_free -= revived
        self.ref_cnt[arr] = r + 1

    def free_blocks(self, ordered_blocks) -> None:
        """Drop a reference on each block; blocks reaching zero join the queue tail in the
        given order (callers pass a request's blocks tail-first, as vLLM does). A block
        appears at most once."""
        if isinstance(ordered_blocks, np.ndarray):
            arr = ordered_blocks
        elif isinstance(ordered_blocks, list) and len(ordered_blocks) < _SMALL:
            self._free_few(ordered_blocks)
            return
        else:
            arr = np.fromiter(ordered_blocks, np.intp)
        if not len(arr):
            return
        r = self.ref_cnt[arr]  # a copy (fancy indexing)
        r -= 1
        if any_true(r < 0):
            raise RuntimeError(f"block {arr[r.argmin()]} freed more often than allocated")
        self.ref_cnt[arr] = r
        zero = arr[r == 0]
        if len(zero):
            self.num_free += len(zero)
            if self.uncached_first:
                cached = self._key[zero] != NO_KEY
                n = int(np.count_nonzero(cached))
                if n < len(zero):
                    self._push_front(zero if not n else zero[~cached])
                if n:
                    self._push(zero if n == len(zero) else zero[cached])
            else:
                self._push(zero)
            if self._qlen > 2 * self.num_free + _COMPACT_SLACK:
                self._compact()

    def _free_few(self, blocks: list[int]) -> None:
        """free_blocks for a short list (a sliding window's blocks falling behind it), with
        scalar reads: the same checks, counts and queue order."""
        rc = self.ref_cnt
        zero = []
        for b in blocks:
            r = rc.item(b) - 1
            if r < 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            rc[b] = r
            if not r:
                zero.append(b)
        if not zero:
            return
        self.num_free += len(zero)
        if self.uncached_first:
            keys = self._key
            front = [b for b in zero if keys.item(b) == NO_KEY]
            if front:
                self._push_front(np.array(front, np.intp))
            if len(front) < len(zero):
                self._push(np.array(zero if not front else [b for b in zero if keys.item(b) != NO_KEY], np.intp))
        else:
            self._push(np.array(zero, np.intp))
        if self._qlen > 2 * self.num_free + _COMPACT_SLACK:
            self._compact()

    def free_block(self, b: int) -> None:
        """free_blocks([b]), kept scalar (a sliding window's block falling behind it)."""
        r = self.ref_cnt.item(b) - 1
        if r < 0:
            raise RuntimeError(f"block {b} freed more often than allocated")
        self.ref_cnt[b] = r
        if not r:
            self.num_free += 1
            one = np.array((b,), np.intp)
            if self.uncached_first and self._key.item(b) == NO_KEY:
                self._push_front(one)
            else:
                self._push(one)
            if self._qlen > 2 * self.num_free + _COMPACT_SLACK:
                self._compact()

    # -- prefix cache -----------------------------------------------------------------------
    def get_cached_block(self, key: int) -> int | None:
        b = self._index.get(key)
        return b if b >= 0 and self._main_key.item(b) == key else None

    def match_prefix(self, keys: np.ndarray, runs=None) -> np.ndarray:
        """The blocks a lookup returns for keys[0], keys[1], ... up to the first miss.
        `runs`: the same keys as arithmetic runs (Request.key_runs), when they are."""
        b = self._index.get_many(keys) if runs is None else self._index.get_runs(runs)
        ok = self._main_key[b] == keys
        return b if all_true(ok) else b[:ok.argmin()]

    def hold_keys(self, blocks: np.ndarray, keys: np.ndarray) -> bool:
        """Is each block still the one a lookup of its key returns?"""
        return all_true(self._main_key[blocks] == keys)

    def match_runs(self, runs) -> tuple[np.ndarray, int | None]:
        """match_prefix for keys given as arithmetic runs only; also returns the first key
        that missed (None if none did)."""
        return self._index.match_runs(runs)

    def cache_block(self, b: int, key: int) -> None:
        if not self.enable_caching or self._key.item(b) != NO_KEY:
            return
        self._key[b] = key
        main = self._index.put_if_absent(key, b)
        if main >= 0:
            # Two requests computed the same block: vLLM keeps both under one hash.
            self._dups.setdefault(key, []).append(b)
            self._has_dup[b] = self._has_dup[main] = True
        else:
            self._main_key[b] = key

    def cache_list(self, blocks, keys) -> None:
        """cache_block(b, key) for each pair of two short sequences, in order: the loop of
        cache_block and KeyIndex.put_if_absent, inline (a sliding-window position's blocks,
        one per window group)."""
        if not self.enable_caching:
            return
        karr, mk = self._key, self._main_key
        index = self._index
        page_row, rows = index.page_row, index.rows
        for b, key in zip(blocks, keys):
            if karr.item(b) != NO_KEY:
                continue
            karr[b] = key
            r = page_row.get(key >> PAGE_BITS)
            if r is None:
                index.put_if_absent(key, b)  # (a new page)
                rows = index.rows
                mk[b] = key
                continue
            slot = key & PAGE_MASK
            e = rows.item(r, slot)
            if e >= 0 and mk.item(e) == key:
                self._dups.setdefault(key, []).append(b)
                self._has_dup[b] = self._has_dup[e] = True
            else:
                rows[r, slot] = b
                mk[b] = key

    def cache_many(self, blocks: np.ndarray, keys: np.ndarray, runs=None, fresh: bool = False) -> None:
        """cache_block(b, key) for each pair, in order. `runs`: the keys as arithmetic runs.
        `fresh`: the blocks are known to have no identity (just allocated)."""
        if not self.enable_caching or not len(blocks):
            return
        if not fresh:
            todo = self._key[blocks] == NO_KEY
            if not all_true(todo):
                blocks, keys, runs = blocks[todo], keys[todo], None
        if len(blocks) >= _SMALL:
            index, mk = self._index, self._main_key
            cur = index.get_many(keys) if runs is None else index.get_runs(runs)
            if not any_true(mk[cur] == keys):
                if runs is not None:
                    index.set_runs(runs, blocks)  # keys of runs are distinct
                    ok = True
                else:
                    ok = index.set_many(keys, blocks)
                if ok:
                    self._key[blocks] = keys
                    mk[blocks] = keys
                    return
            # Some key is cached already, or repeats: one by one. (Entries set_many left
            # point at blocks that do not have that main key: stale, harmless.)
        for b, k in zip(blocks.tolist(), keys.tolist()):
            self.cache_block(b, k)

    def _forget(self, b: int, key: int) -> None:
        """b loses its identity `key` (vLLM: evicted from the cached-block map)."""
        self._key[b] = NO_KEY
        mk = self._main_key
        if mk.item(b) == key:
            mk[b] = NO_KEY
            dups = self._dups.get(key)
            if dups:
                nb = dups.pop(0)
                mk[nb] = key
                self._index.set(key, nb)
                self._has_dup[b] = False
                if not dups:
                    del self._dups[key]
                    self._has_dup[nb] = False
            elif self.on_evict is not None:
                self.on_evict(key)
        else:
            dups = self._dups[key]
            dups.remove(b)
            self._has_dup[b] = False
            if not dups:
                del self._dups[key]
                self._has_dup[self.get_cached_block(key)] = False

    def _forget_many(self, blocks: np.ndarray, keys: np.ndarray) -> None:
        """_forget each (block, key), in order."""
        if self.on_evict is None and (not self._dups or not any_true(self._has_dup[blocks])):
            # No key here has a second block: dropping the identities is all there is to do
            # (their key index entries go stale by themselves).
            self._key[blocks] = NO_KEY
            self._main_key[blocks] = NO_KEY
            return
        for b, k in zip(blocks.tolist(), keys.tolist()):
            self._forget(b, k)

    def uncache(self, b: int) -> None:
        """Forget a block's identity now (it stays allocated or free as it is)."""
        key = self._key.item(b)
        if key != NO_KEY:
            self._forget(b, key)

    def uncache_free(self, blocks, keep_negative_keys: bool = False) -> None:
        """uncache(b), in order, for each of `blocks` that is free and cached (and whose key
        is >= 0, if `keep_negative_keys`)."""
        arr = np.asarray(blocks, dtype=np.intp)
        if not len(arr):
            return
        keys = self._key[arr]
        sel = (self.ref_cnt[arr] == 0) & (keys != NO_KEY)
        if keep_negative_keys:
            sel &= keys >= 0
        if any_true(sel):
            self._forget_many(arr[sel], keys[sel])

    def keys_of(self, blocks) -> list[int]:
        """The keys of those of `blocks` that are cached, in order."""
        arr = np.asarray(blocks, dtype=np.intp)
        if not len(arr):
            return []
        keys = self._key[arr]
        return keys[keys != NO_KEY].tolist()

    def usage(self) -> float:
        """vLLM's KV usage: 1 - free / (num_gpu_blocks - 1), the null block not counted
        (vllm/v1/core/block_pool.py, get_usage)."""
        return 1.0 - self.num_free / (self.num_gpu_blocks - 1)
