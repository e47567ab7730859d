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
tables (the public `req_to_blocks`) are BlockTables: the arrays they were built from plus the
blocks decodes appended one at a time, read like lists, freed as one array. The scheduler
takes a lookup's hits as an array (`lookup`); `get_computed_blocks` gives them as a list.
A waiting request refused blocks is looked up again every step: the manager keeps its last
lookup and answers from it, after two checks (its hit blocks still hold their keys, its
first miss is still a miss) that make the answer the one a fresh lookup would give.
"""

from __future__ import annotations

import numpy as np

from .block_pool import BlockPool
from .block_table import BlockTable
from .request import Request

_SMALL = 8  # below this many blocks, plain Python beats numpy's per-call overhead
_NONE = np.zeros(0, np.intp)  # no blocks (shared: never written)


_WINDOW_KEY_SHIFT = 56


def _window_key(key: int, group: int) -> int:
    """The identity of a sliding-window group's block at the position whose full-attention
    block has `key` (vLLM keys blocks by hash and group id): the key moved by (group + 1)·2^56.
    Full-attention keys are a program's (below 2^52 for up to 2^20 programs: cluster.py), a
    shared prefix's (negative, above -2^52) or an interned hash chain's (2^62 + n), so each
    group's window keys are a range of their own, and a run of consecutive positions keeps
    consecutive keys (the key index stores runs of keys in shared pages: hashed keys took a
    page each)."""
    if group >= 63:
        raise ValueError("more than 63 sliding-window KV cache groups")
    return key + ((group + 1) << _WINDOW_KEY_SHIFT)


class KVCacheManager:
    __slots__ = ("block_size", "pool", "enable_caching", "req_to_blocks", "num_cached_block",
                 "max_model_len", "prefix_cache_queries", "prefix_cache_hits", "_lookup", "state_blocks",
                 "req_to_state", "window", "window_groups", "full_groups", "req_to_window", "win_stale", "chunk",
                 "local", "admission_cap", "win_cache", "_win_hits", "win_positions")

    def __init__(self, num_gpu_blocks: int, block_size: int, enable_caching: bool = True,
                 max_model_len: int = 1 << 40, state_blocks: int = 0, window: int = 0,
                 window_groups: int = 0, full_groups: int = 1, chunk: int = 0, max_in_flight: int = 1 << 30,
                 free_uncached_first: bool = False):
        """`state_blocks`: blocks a hybrid model's sequence holds for its linear-attention state
        (vLLM's Mamba groups, one block each), taken with its first blocks and freed with them;
        never cached.

        `window`, `window_groups`, `full_groups`: a model with full and sliding-window attention
        layers (ModelArch.sliding_kv_groups). A sequence's table holds the full-attention
        groups' blocks; besides them it holds, per sliding-window group, the blocks from the
        first one not wholly behind the window of its computed tokens to its last slot (vLLM's
        SlidingWindowManager frees the blocks behind before each allocation), in this pool
        ceil(window_groups x blocks / full_groups) blocks, freed with the sequence. With one
        full-attention group the window blocks are vLLM's, position by position: cached when
        full, shared, and needed by a prefix hit (_lookup_with_windows); with more, counted
        (never cached: a hit's window blocks are taken fresh). `chunk` instead of
        `window`: Llama 4's chunked local attention, whose groups hold the blocks from the start
        of the current chunk of `chunk` tokens (vLLM's ChunkedLocalAttentionManager).
        `max_in_flight`: tokens scheduled but not yet settled (one step's budget), for vLLM's
        per-request window admission cap. `free_uncached_first`: BlockPool's free order."""
        self.state_blocks = state_blocks
        self.req_to_state: dict[int, np.ndarray] = {}
        self.window = window if window_groups else 0
        self.chunk = chunk if window_groups and not self.window else 0
        self.local = bool(self.window or self.chunk)  # windows (sliding or chunked) are held
        self.window_groups = window_groups
        self.full_groups = max(full_groups, 1)
        self.req_to_window: dict[int, list[int]] = {}
        # requests whose window was last sized other than by a decode (the scheduler's decode
        # loop calls allocate_decode_slot for them, and wherever a decode's window changes)
        self.win_stale: set[int] = set()
        self.block_size = block_size
        self.pool = BlockPool(num_gpu_blocks, enable_caching, free_uncached_first)
        self.enable_caching = enable_caching
        self.req_to_blocks: dict[int, BlockTable] = {}
        self.num_cached_block: dict[int, int] = {}
        self.max_model_len = max_model_len
        self.admission_cap = self._cap(max_in_flight) if self.local else 0
        # Sliding-window blocks are cached, shared and hit as vLLM's SlidingWindowManager does
        # them (one full-attention group): a window block gets the identity of its position in
        # its group when that block is full, and a prefix hit needs the window's blocks
        # (lookup). (_win_hits: the last lookup's window blocks, for the allocation after it.)
        if self.local and window_groups >= 63:
            raise ValueError("more than 63 sliding-window KV cache groups")  # (their keys' range: _window_key)
        self.win_cache = bool(self.local and enable_caching and self.full_groups == 1)
        # Set by an async scheduler (sliding windows, one full-attention group): each decode
        # slot leaves in req.win_next / req.cache_next where its next call has work to do
        self.win_positions = False
        self._win_hits: tuple | None = None
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # The last lookup: (request, its block count, its hits as an array, the key of the
        # first miss or None), to answer a refused waiting request's next lookup cheaply.
        self._lookup: tuple | None = None

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        hits, num_tokens = self.lookup(req)
        return hits.tolist(), num_tokens

    def lookup(self, req: Request) -> tuple[np.ndarray, int]:
        """get_computed_blocks with the hits as an array (the caller must not write to it)."""
        if not self.enable_caching:
            return _NONE, 0
        max_blocks = (req.num_tokens - 1) // self.block_size
        if max_blocks <= 0:
            return _NONE, 0
        if self.win_cache:
            return self._lookup_with_windows(req, max_blocks)
        memo = self._lookup
        if memo is not None and memo[0] is req and memo[1] == max_blocks:
            # The same request looked up again (it was refused blocks)
            _, _, arr, miss_key = memo
            if self._hit_stands(req, arr, miss_key):
                return arr, len(arr) * self.block_size
        arr, miss_key = self._full_hit(req, max_blocks)
        self._lookup = (req, max_blocks, arr, miss_key)
        return arr, len(arr) * self.block_size

    def _full_hit(self, req: Request, max_blocks: int) -> tuple[np.ndarray, int | None]:
        """The cached blocks of the request's first `max_blocks` keys up to the first miss, and
        the key that missed (None if none did)."""
        runs = req.key_runs(0, max_blocks)
        if runs is not None:
            return self.pool.match_runs(runs)
        keys = req.block_keys(0, max_blocks)
        arr = self.pool.match_prefix(keys)
        return arr, (keys.item(len(arr)) if len(arr) < max_blocks else None)

    def _hit_stands(self, req: Request, arr: np.ndarray, miss_key: int | None) -> bool:
        """Would a fresh _full_hit give `arr` and `miss_key` again? Yes while the hit blocks
        still hold their keys and the first miss is still a miss."""
        pool = self.pool
        return (not len(arr) or pool.hold_keys(arr, req.block_keys(0, len(arr)))) and (
            miss_key is None or pool.get_cached_block(miss_key) is None)

    def _lookup_with_windows(self, req: Request, max_blocks: int) -> tuple[np.ndarray, int]:
        """vLLM's hybrid hit (HybridKVCacheCoordinator.find_longest_cache_hit, one full and one
        kind of sliding-window or chunked group): the full-attention hit h, left to right; then, within
        it, right to left, the first run of cdiv(window - 1, block_size) blocks whose window
        blocks are cached in every group (SlidingWindowManager.find_longest_cache_hit); the
        hit ends with that run (or is the run that reaches block 0), and the table's hit is
        cut to it. The window blocks of the run are kept for the allocation."""
        pool = self.pool
        memo = self._lookup
        if memo is not None and memo[0] is req and memo[1] == max_blocks and len(memo) == 7:
            # The same request looked up again (refused blocks): a hit whose last run had all
            # its window blocks cached stands while the full-attention hit does (as in
            # lookup) and those window blocks still hold their keys.
            _, _, arr, miss_key, wblocks, wkeys, whits = memo
            if self._hit_stands(req, arr, miss_key) and pool.hold_keys(wblocks, wkeys):
                self._win_hits = (req, whits)
                return arr, len(arr) * self.block_size
        arr, miss_key = self._full_hit(req, max_blocks)
        h = len(arr)
        wg = self.window_groups
        get = pool.get_cached_block
        if self.chunk:
            # ChunkedLocalAttentionManager: the blocks of the chunk the hit ends in, left to
            # right from the chunk's start, up to the first miss (earlier chunks need none)
            end = start = h * self.block_size // self.chunk * self.chunk // self.block_size
            hit = []
            for i in range(start, h):
                key = req.block_key(i)
                blocks = [get(_window_key(key, g)) for g in range(wg)]
                if None in blocks:
                    break
                hit += blocks
                end = i + 1
            if end < h:
                arr = arr[:end]
            self._win_hits = (req, hit)
            return arr, end * self.block_size
        need = -(-(self.window - 1) // self.block_size)
        lo = h - need if h > need else 0
        if h - lo >= _SMALL:
            # The common case first: the last `need` positions of the hit (or all of them) have
            # their window blocks cached in every group, and the hit stands as it is
            index, mk = pool._index, pool._main_key
            cols, kcols = [], []
            for g in range(wg):
                keys, wruns = self._window_keys(req, lo, h, g)
                b = index.get_many(keys) if wruns is None else index.get_runs(wruns)
                if np.count_nonzero(mk[b] == keys) < h - lo:
                    break
                cols.append(b)
                kcols.append(keys)
            else:
                wblocks = np.stack(cols, axis=1).ravel()
                whits = wblocks.tolist()
                self._lookup = (req, max_blocks, arr, miss_key, wblocks, np.stack(kcols, axis=1).ravel(), whits)
                self._win_hits = (req, whits)
                return arr, h * self.block_size
        run: list[list[int]] = []  # window blocks of the run, right to left
        end = 0
        for i in range(h - 1, -1, -1):
            key = req.block_key(i)
            blocks = [get(_window_key(key, g)) for g in range(wg)]
            if None in blocks:
                run = []
                continue
            run.append(blocks)
            if len(run) >= need:
                end = i + len(run)
                break
        else:
            end = len(run)  # the run reaching block 0 (or none)
        if end < h:
            arr = arr[:end]
        self._win_hits = (req, [b for blocks in reversed(run) for b in blocks])
        return arr, end * self.block_size

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
                       new_computed_blocks=(), delay_cache_blocks: bool = False, full_tokens: int = 0) -> bool:
        """`new_computed_blocks`: the lookup's hits (an array from `lookup`, or a list).
        `full_tokens` (an admission under vLLM's scheduler_reserve_full_isl): allocate only if
        the whole sequence of that many tokens would fit (fits_whole)."""
        if len(new_computed_blocks):
            if new_computed_blocks.__class__ is not np.ndarray:
                new_computed_blocks = np.array(new_computed_blocks, dtype=np.intp)
            return self._allocate_with_hits(req, num_new_tokens, num_new_computed_tokens, new_computed_blocks,
                                            delay_cache_blocks, full_tokens)
        # A running request's next tokens (decode, prefill chunk) or an admission without hits.
        bs = self.block_size
        pool = self.pool
        rid = req.request_id
        num_computed = req.num_computed_tokens + num_new_computed_tokens
        if full_tokens and not self.fits_whole(req, full_tokens, num_computed, 0, 0):
            return False
        total = num_computed + num_new_tokens
        need = total if total < self.max_model_len else self.max_model_len
        blocks = self.req_to_blocks.get(rid)
        have = len(blocks) if blocks is not None else 0
        num_to_allocate = -(-need // bs) - have
        grow = 0
        if self.local:
            grow = self._move_window(rid, have, num_computed - req.num_in_flight_tokens, need)
            self.win_stale.add(rid)
        if blocks is None:
            if num_to_allocate + self.state_blocks + grow > pool.num_free:
                return False
            blocks = self.req_to_blocks[rid] = BlockTable()
            self.num_cached_block[rid] = 0
            if self.state_blocks:
                self.req_to_state[rid] = pool.take_new_blocks(self.state_blocks)
        elif num_to_allocate + grow > pool.num_free:
            return False
        if grow > 0:  # (vLLM allocates the sliding-window groups' blocks first)
            self._grow_window(rid, grow)
        new = None
        if num_to_allocate == 1:  # a decode entering a new block
            blocks.append(pool.get_new_block())
        elif num_to_allocate > 1:
            new = pool.take_new_blocks(num_to_allocate)
            blocks.extend_array(new)
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
        if self.local:
            if room < 0:
                return self.allocate_slots(req, 1)
            # (the window of the tokens processed: with async scheduling, less those in flight)
            grow = self._move_window(rid, len(blocks), c - req.num_in_flight_tokens, c + 1)
            if (room == 0) + grow > self.pool.num_free:
                return False
            self.win_stale.discard(rid)
            if grow > 0:
                self._grow_window(rid, grow)
            if room == 0:
                blocks.append(self.pool.get_new_block())
            if self.win_positions:
                # When the next call can do something (the async decode loop calls only then,
                # or at a block's end): the window's first held position moves when
                # c - in_flight - window + 1 reaches the next block
                win = self.req_to_window.get(rid)
                held = len(win) // self.window_groups if win else 0
                req.win_next = (len(blocks) - held + 1) * bs + self.window - 1
        elif room <= 0:
            if room < 0:  # more than one block short
                return self.allocate_slots(req, 1)
            pool = self.pool  # the slot opens a new block
            if not pool.num_free:
                return False
            blocks.append(pool.get_new_block())
        if self.enable_caching:
            # up to the tokens known (c + 1 without async scheduling; with it, fewer by the
            # tokens still in flight: vLLM caches "finalized" tokens only)
            num_full = (req.num_prompt_tokens + req.num_output_tokens) // bs
            num_cached = self.num_cached_block
            start = num_cached[rid]
            if num_full == start + 1:  # the token fills a block: cache it
                num_cached[rid] = num_full
                key = req.block_key(start)
                if self.win_cache:
                    self.cache_window_block(rid, start, key, len(blocks))
                self.pool.cache_block(blocks[start], key)
            elif num_full > start:
                self._cache_full_blocks(req, blocks, num_full)
            if self.win_positions:  # ... and the next block to cache fills when the known tokens reach its end
                req.cache_next = (num_cached[rid] + 1) * bs
        elif self.win_positions:
            req.cache_next = 1 << 62
        return True

    def _allocate_with_hits(self, req: Request, num_new_tokens: int, num_new_computed_tokens: int,
                            arr: np.ndarray, delay_cache_blocks: bool, full_tokens: int = 0) -> bool:
        """allocate_slots for a request admitted with cache hits `arr` (they come first in its table)."""
        bs = self.block_size
        pool = self.pool
        rid = req.request_id
        num_computed = req.num_computed_tokens + num_new_computed_tokens
        need = min(num_computed + num_new_tokens, self.max_model_len)
        blocks = self.req_to_blocks.get(rid)
        have = len(blocks) if blocks is not None else 0
        num_hits = len(arr)
        num_to_allocate = -(-need // bs) - have - num_hits
        ref = pool.ref_cnt[arr]
        # hit blocks sitting in the free queue are not free for this allocation
        evictable = num_hits - int(np.count_nonzero(ref))
        whits = ()
        if self.win_cache:
            memo = self._win_hits
            if memo is not None and memo[0] is req and blocks is None:
                whits = memo[1]  # the hit's window blocks (lookup), shared like its table blocks
                if len(whits) < _SMALL:
                    rc = pool.ref_cnt
                    evictable += sum(1 for b in whits if not rc.item(b))
                else:
                    evictable += len(whits) - int(np.count_nonzero(pool.ref_cnt[whits]))
        if full_tokens and not self.fits_whole(req, full_tokens, num_computed, num_hits, evictable):
            return False
        state = self.state_blocks if blocks is None else 0
        grow = 0
        if self.local:
            if whits:  # a new request: its window will be the hit's [h - k, h), then grow
                wg = self.window_groups
                grow = wg * (-(-need // bs) - max(have + num_hits, self._skipped(num_computed) // bs))
            else:
                grow = self._move_window(rid, have, num_computed - req.num_in_flight_tokens, need)
            self.win_stale.add(rid)
        if num_to_allocate + state + grow > pool.num_free - evictable:
            return False
        if whits:
            pool.touch(whits)
            self.req_to_window[rid] = list(whits)  # (a copy: the lookup's list stays its own)
        if blocks is None:
            blocks = self.req_to_blocks[rid] = BlockTable()
            self.num_cached_block[rid] = 0
        pool.touch(arr, ref)
        if state:
            self.req_to_state[rid] = pool.take_new_blocks(state)
        blocks.extend_array(arr)
        if grow > 0:  # (vLLM allocates the sliding-window groups' blocks first)
            self._grow_window(rid, grow)
        new = None
        if num_to_allocate > 0:
            new = pool.take_new_blocks(num_to_allocate)
            blocks.extend_array(new)
        if self.enable_caching and not delay_cache_blocks:
            num_full = min(num_computed + num_new_tokens, req.num_tokens) // bs
            self._cache_full_blocks(req, blocks, num_full, have, have + num_hits, new)
        return True

    def fits_whole(self, req: Request, full_tokens: int, num_computed: int, num_hits: int, evictable: int) -> bool:
        """vLLM's admission gate under scheduler_reserve_full_isl (KVCacheManager.allocate_slots
        with full_sequence_must_fit): the blocks the whole sequence of `full_tokens` would take
        beyond those it has or hits (hits in the free queue counted as taken), its state
        blocks, and its windows' blocks up to vLLM's per-request admission cap, fit the free
        blocks."""
        bs = self.block_size
        full = full_tokens if full_tokens < self.max_model_len else self.max_model_len
        blocks = self.req_to_blocks.get(req.request_id)
        have = len(blocks) if blocks is not None else 0
        need = max(-(-full // bs) - have - num_hits, 0) + evictable
        if blocks is None:
            need += self.state_blocks
        if self.local:
            required = min(-(-full // bs), self.admission_cap)
            per_group = max(required - max(self._skipped(num_computed) // bs, have + num_hits), 0)
            need += -(-self.window_groups * per_group // self.full_groups)
        return need <= self.pool.num_free

    # -- sliding-window blocks -------------------------------------------------------------
    def _move_window(self, rid: int, have: int, num_computed: int, need: int) -> int:
        """Move a sequence's windows to their new span before an allocation: free (now) the
        blocks wholly behind the window of its computed tokens, as vLLM's remove_skipped_blocks
        does whether or not the allocation then succeeds, and return how many blocks the
        positions new to the window take (`have`: table blocks before the allocation, where
        the windows end; `need`: tokens with slots after it)."""
        win = self.req_to_window.get(rid)
        n = len(win) if win else 0
        if self.full_groups != 1:  # (windows counted in pooled blocks: their net change)
            grow = self._window_target(num_computed, need) - n
            if grow < 0:
                self._shrink_window(rid, -grow)
                return 0
            return grow
        bs, wg = self.block_size, self.window_groups
        start = have - n // wg  # first position held
        new_start = self._skipped(num_computed) // bs
        gone = min(new_start, have) - start
        if gone > 0:
            self._shrink_window(rid, gone * wg)
        grow = -(-need // bs) - max(have, new_start)
        return wg * grow if grow > 0 else 0

    def _window_target(self, num_computed: int, need: int) -> int:
        """Pool blocks of a sequence's windows once its slots reach `need` tokens: per group the
        blocks up to `need` less those wholly behind the window of the `num_computed` tokens
        (vLLM's get_num_skipped_tokens: computed - window + 1)."""
        held = -(-need // self.block_size) - self._skipped(num_computed) // self.block_size
        return -(-self.window_groups * held // self.full_groups)

    def _skipped(self, num_computed: int) -> int:
        """Tokens behind a window (vLLM's get_num_skipped_tokens): computed - window + 1, or
        chunked: the tokens before the current chunk."""
        if self.window:
            return max(num_computed - self.window + 1, 0)
        return num_computed // self.chunk * self.chunk if self.chunk else 0

    def _grow_window(self, rid: int, n: int) -> None:
        """Take n window blocks: vLLM fills each group's new slots in turn (group-major); the
        window holds them by position, a position's groups together (one full-attention group)."""
        win = self.req_to_window.setdefault(rid, [])
        wg = self.window_groups
        if n == 1 or n == wg and n < _SMALL:
            # one position (its groups' blocks in group order): popped one at a time, the same
            # blocks in the same order as take_new_blocks, with scalar reads
            get = self.pool.get_new_block
            for _ in range(n):
                win.append(get())
            return
        new = self.pool.take_new_blocks(n)
        if wg > 1 and self.full_groups == 1 and n % wg == 0:
            new = new.reshape(wg, n // wg).T.ravel()
        win.extend(new.tolist())

    def cache_window_block(self, rid: int, i: int, key: int, table_len: int) -> None:
        """Block i of the sequence is full: its window blocks (if not behind the window) get the
        identity of position i in their group (vLLM caches every group's block)."""
        win = self.req_to_window.get(rid)
        if not win:
            return
        wg = self.window_groups
        k = i - (table_len - len(win) // wg)
        if k >= 0:
            # _window_key(key, g) for each group, inline (the group count is checked at construction)
            self.pool.cache_list(win[k * wg:(k + 1) * wg],
                                 range(key + (1 << _WINDOW_KEY_SHIFT), key + ((wg + 1) << _WINDOW_KEY_SHIFT),
                                       1 << _WINDOW_KEY_SHIFT))

    def _window_keys(self, req: Request, lo: int, hi: int, g: int):
        """(keys, runs) of group g's window blocks at positions lo..hi-1 (runs None for
        hash-keyed requests): _window_key of the positions' keys."""
        shift = (g + 1) << _WINDOW_KEY_SHIFT
        runs = req.key_runs(lo, hi)
        if runs is not None:
            runs = [(k + shift, step, m) for k, step, m in runs]
        return req.block_keys(lo, hi) + shift, runs

    def _cache_window_run(self, req: Request, win: list[int], lo: int, hi: int, table_len: int) -> None:
        """cache_window_block for positions lo..hi-1 (all still held by the window), a group
        at a time as whole runs. The keys are distinct, so the order of the pairs within
        the call does not matter (a key's first cached block is the one a lookup returns)."""
        wg = self.window_groups
        k0 = lo - (table_len - len(win) // wg)
        held = np.array(win[k0 * wg:(k0 + hi - lo) * wg], dtype=np.intp).reshape(hi - lo, wg)
        for g in range(wg):
            keys, runs = self._window_keys(req, lo, hi, g)
            self.pool.cache_many(held[:, g], keys, runs)

    def _shrink_window(self, rid: int, n: int) -> None:
        """Free the window's n oldest blocks (they fell behind the window): group by group,
        each from its latest position back, as vLLM's remove_skipped_blocks frees them."""
        win = self.req_to_window[rid]
        if n == 1:
            self.pool.free_block(win.pop(0))
            return
        gone = win[:n]
        del win[:n]
        wg = self.window_groups
        if self.full_groups == 1 and n % wg == 0 and n > wg:  # (one position: already in group order)
            gone = [b for g in range(wg) for b in gone[g::wg][::-1]]
        self.pool.free_blocks(gone)

    def window_settled(self, req: Request) -> bool:
        """The decode `req` was just scheduled for is past the window's first free, so its next
        decodes change its window periodically (one block per group taken when its table
        takes one, one freed when a block falls behind the window): what the fast-forward of
        decode runs plans (with one full-attention group)."""
        return req.num_computed_tokens > self.window + self.block_size
    def peak_window_blocks(self, num_tokens: int, max_chunk: int) -> int:
        """Most window blocks a sequence of `num_tokens` holds at once, in prefill chunks of at
        most `max_chunk` tokens (0 for a model without sliding-window groups)."""
        if not self.local:
            return 0
        held = min(-(-num_tokens // self.block_size), self._cap(max_chunk))
        return -(-self.window_groups * held // self.full_groups)

    def _cap(self, in_flight: int) -> int:
        """vLLM's per-request admission cap of a window group, in blocks
        (max_admission_blocks_per_request): the window less one, or the chunk, and the tokens
        in flight (one step's budget), at most max_model_len."""
        bs = self.block_size
        if self.window:
            return -(-min(self.window - 1 + in_flight, self.max_model_len) // bs) + 1
        return -(-min(self.chunk + in_flight, self.max_model_len) // bs)

    def cache_blocks(self, req: Request, num_tokens: int) -> None:
        rid = req.request_id
        self._cache_full_blocks(req, self.req_to_blocks[rid], num_tokens // self.block_size)

    def _cache_full_blocks(self, req: Request, blocks: BlockTable, num_full: int, have: int = 0,
                           new_lo: int = 0, new: np.ndarray | None = None) -> None:
        """Give blocks num_cached_block .. num_full-1 their identity (vLLM's cache_blocks).
        Blocks have..new_lo-1 are this allocation's cache hits (cached already: skipped);
        `new`, if given, holds blocks new_lo.. as an array."""
        rid = req.request_id
        start = self.num_cached_block[rid]
        if num_full <= start:
            return
        self.num_cached_block[rid] = num_full
        if self.win_cache:
            win = self.req_to_window.get(rid)
            if win:
                # only the blocks whose window blocks are still held (the last len(win) / wg
                # positions of the table): the others fell behind the window, nothing to cache
                n = len(blocks)
                wlo = max(start, n - len(win) // self.window_groups)
                if num_full - wlo < _SMALL:
                    key = req.block_key
                    for i in range(wlo, num_full):
                        self.cache_window_block(rid, i, key(i), n)
                else:
                    self._cache_window_run(req, win, wlo, num_full, n)
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
            arr = blocks.array()[lo:num_full]
        self.pool.cache_many(arr, req.block_keys(lo, num_full), req.key_runs(lo, num_full), fresh)

    def free(self, req: Request) -> np.ndarray:
        """Release the request's blocks (tail first). Returns its block table as an array."""
        rid = req.request_id
        blocks = self.req_to_blocks.pop(rid, None)
        self.num_cached_block.pop(rid, None)
        if self.state_blocks:
            self._free_state(rid)
        if self.local:
            self._free_window(rid)
        if blocks is None or not len(blocks):
            return _NONE
        table = blocks.array()
        self.pool.free_blocks(table[::-1])
        return table

    def _free_window(self, rid: int) -> None:
        self.win_stale.discard(rid)
        win = self.req_to_window.pop(rid, None)
        if win:
            wg = self.window_groups
            if wg > 1 and self.full_groups == 1:  # group by group, each tail first, as vLLM frees them
                win = [b for g in range(wg) for b in win[g::wg][::-1]]
            else:
                win = win[::-1]
            self.pool.free_blocks(win)

    def _free_state(self, rid: int) -> None:
        state = self.req_to_state.pop(rid, None)
        if state is not None:
            self.pool.free_blocks(state)

    def take_blocks(self, req: Request) -> np.ndarray:
        """Detach the request's blocks without freeing them (a policy now owns the refs), as
        an array."""
        self.num_cached_block.pop(req.request_id, None)
        if self.state_blocks:
            self._free_state(req.request_id)  # the state ends with the call
        if self.local:
            self._free_window(req.request_id)  # so does the window (a policy keeps the table)
        blocks = self.req_to_blocks.pop(req.request_id, None)
        return _NONE if blocks is None else blocks.array()

    def num_blocks_of(self, req: Request) -> int:
        blocks = self.req_to_blocks.get(req.request_id)
        return len(blocks) if blocks else 0

    def usage(self) -> float:
        return self.pool.usage()
