"""vLLM v1's scheduler, one `schedule()` per engine step.

One rule for every phase: a request's `num_computed_tokens` catches up with `num_tokens`,
capped by the step's token budget. So chunked prefill, decode and a preempted request's
recompute are one code path.

1. Running requests first, in order. When `allocate_slots` fails, preempt the policy's
   victim (FCFS: the tail of `running`, the most recently admitted), free its blocks, reset
   it to recompute from scratch and put it back at the front of the waiting queue; retry.
   If the victim is the request itself, stop scheduling running requests.
2. Waiting requests only if this step preempted nothing, while budget and `max_num_seqs`
   allow: a new (or preempted) request first looks up its prefix-cache hit; the first one
   that cannot get blocks stops admission (no skipping ahead, no preemption for it).
3. Every scheduled request's `num_computed_tokens` advances by its scheduled tokens (as it
   is scheduled: nothing later in the step reads it).

Async scheduling (vLLM's AsyncScheduler, on by default on GPUs since late 2025): the engine
schedules step N+1 while step N runs, before N's tokens are back. A request scheduled to
sample holds an output placeholder until its token returns (`update_from_output`), and its
next decode is scheduled against it; the step that samples its last token is not followed
by another (the placeholder of a last token is not counted, so nothing is left to
schedule). A request preempted with a token in flight gets that token when the step
returns (it may be its last: the request then finishes from the waiting queue). Blocks are
cached up to the tokens known at schedule time, and up to the returned ones at the update.
"""

from __future__ import annotations

from .kv_cache_manager import KVCacheManager
from ..policies.scheduling import FCFSQueue
from .request import PREEMPTED, RUNNING, WAITING, WAITING_FOR_REMOTE_KVS, Request


class SchedulerOutput:
    """What one step runs: (request, num_new_tokens) pairs and the batch shape the latency
    model needs (prefill chunks with their context, decode count and context sum)."""

    __slots__ = ("scheduled", "preempted", "prefill_chunks", "num_decodes", "decode_ctx_sum",
                 "decode_ctx_max", "num_scheduled_tokens", "num_sampled", "samples", "partial")

    def __init__(self):
        self.scheduled: list[tuple[Request, int]] = []
        self.preempted: list[Request] = []
        self.prefill_chunks: list[tuple[int, int]] = []
        self.num_decodes = 0
        self.decode_ctx_sum = 0
        self.decode_ctx_max = 0
        self.num_scheduled_tokens = 0
        self.num_sampled = 0
        # Async scheduling: the (request, tokens) entries of `scheduled` that sample, and those
        # that do not (a prefill chunk short of the prompt's end), in scheduled order
        self.samples: list[tuple[Request, int]] | None = None
        self.partial: list[tuple[Request, int]] | None = None

    def __bool__(self):
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy, enable_chunked_prefill: bool = True, long_prefill_token_threshold: int = 0,
                 max_model_len: int = 1 << 40, connector=None, reserve_full_isl: bool = False,
                 lone_request_full_budget: bool = False, async_scheduling: bool = False):
        """`reserve_full_isl`: vLLM's scheduler_reserve_full_isl (on by default in vLLM 0.32):
        a waiting request is admitted only if its whole sequence fits the KV cache, not just
        the chunk it is scheduled for. `lone_request_full_budget` (vLLM 0.32): the long-prefill
        threshold does not apply when one request at most is running or waiting.
        `async_scheduling`: vLLM's AsyncScheduler (see the module docstring)."""
        self.async_scheduling = async_scheduling
        self.kv = kv
        kv.win_positions = bool(async_scheduling and kv.window and kv.full_groups == 1)
        self.reserve_full_isl = reserve_full_isl
        self.lone_request_full_budget = lone_request_full_budget
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.enable_chunked_prefill = enable_chunked_prefill
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self._thr = long_prefill_token_threshold  # this step's (schedule)
        self.max_model_len = max_model_len
        self.connector = connector  # KV tier loader (offload), or None
        self.running: list[Request] = []
        self.waiting = policy.make_queue()
        self.kv_holding = FCFSQueue()  # requests holding KV blocks while their tier load runs
        self.num_preemptions = 0
        self.on_admitted = None  # callback(req) after a request first gets its blocks
        self.on_load_started = None  # callback(req) when an async tier load begins (req.load_done_time set)

    # -- queue -----------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        req.status = WAITING
        self.waiting.add(req)

    def has_unfinished(self) -> bool:
        return bool(self.running) or bool(self.waiting) or bool(self.kv_holding)

    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.kv_holding)

    def finish(self, req: Request) -> None:
        if req.status == RUNNING:
            self.running.remove(req)
        else:  # async scheduling: preempted with its last token in flight
            self.waiting.remove(req)

    # -- schedule --------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        thr = self._thr = self.long_prefill_token_threshold
        if thr and self.lone_request_full_budget and len(self.running) + self.num_waiting() <= 1:
            self._thr = 0  # nobody to starve (vLLM 0.32's Scheduler.schedule)
        if self.async_scheduling:
            out.samples = []
            out.partial = []
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget, now)
        return out

    def _hold(self, out: SchedulerOutput, entry: tuple[Request, int]) -> None:
        """AsyncScheduler._update_after_schedule, for a request just scheduled (and advanced):
        its tokens are in flight; if its step reaches its token count it will sample, and it
        holds a placeholder for that token unless it is its last. (The decode loop does the
        same inline.)"""
        req, n = entry
        req.num_in_flight_tokens += n
        k = req.num_output_tokens + req.num_output_placeholders
        if req.num_computed_tokens >= req.num_prompt_tokens + k:
            out.samples.append(entry)
            k += 1  # the token this step samples
            if k < req.max_tokens and req.num_prompt_tokens + k < self.max_model_len:
                req.num_output_placeholders += 1
        else:
            out.partial.append(entry)

    def update_from_output(self, out: SchedulerOutput, start: float = 0.0, now: float = 0.0,
                           itl: tuple[list, list] | None = None) -> list[Request]:
        """Async scheduling: the step's tokens are back. Each sampling request gets its token
        (a preempted one too: vLLM delivers in-flight tokens), running ones cache the blocks
        the returned tokens fill. Returns the requests whose last token this was. With `itl`
        (the instance's sink of inter-token latencies), the step's timing too: it ran from
        `start` to `now`; each token's request records its first or last token time and the
        gap since its previous token (the tokens of requests whose previous one came at
        `start` as one weighted entry), in the same pass. (The synchronous engine's step end,
        Instance._on_step_end, times its tokens by the same rule, fused with its own token
        count: both are the hot path of their mode.)"""
        finished = []
        max_len = self.max_model_len
        kv = self.kv
        caching = kv.enable_caching
        num_cached = kv.num_cached_block
        bs = kv.block_size
        for req, n in out.partial:
            req.num_in_flight_tokens -= n
        timing = itl is not None
        if timing:
            itl_v, itl_w = itl
            same = 0
        for req, n in out.samples:
            req.num_in_flight_tokens -= n
            if timing:
                last = req.last_token_time
                if last == start:
                    same += 1
                elif req.first_token_time < 0:
                    req.first_token_time = now
                else:
                    itl_v.append(now - last)
                    itl_w.append(1)
                req.last_token_time = now
            o = req.num_output_tokens + 1
            req.num_output_tokens = o
            p = req.num_output_placeholders
            if p:
                p -= 1
                req.num_output_placeholders = p
            if caching and req.status == RUNNING:
                known = req.num_computed_tokens - p
                if known // bs > num_cached[req.request_id]:
                    kv.cache_blocks(req, known)
            if o >= req.max_tokens or req.num_prompt_tokens + o >= max_len:
                finished.append(req)
        if timing and same:
            itl_v.append(now - start)
            itl_w.append(same)
        return finished

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        n = req.num_tokens + req.num_output_placeholders - req.num_computed_tokens
        thr = self._thr
        if 0 < thr < n:
            n = thr
        if n > budget:
            n = budget
        # Never compute past max_model_len (the last position's KV is not needed).
        room = self.max_model_len - 1 - req.num_computed_tokens
        return n if n <= room else max(room, 0)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        running = self.running
        recount = False
        i = 0
        while i < len(running) and budget > 0:
            k = self._schedule_decodes(out, i, budget)
            i += k
            budget -= k
            if i >= len(running) or budget <= 0:
                break
            req = running[i]
            n = self._num_new_tokens(req, budget)
            if n == 0:
                i += 1
                continue
            while not self.kv.allocate_slots(req, n):
                victim = self.policy.pick_victim(running)
                if running.index(victim) < i:
                    i -= 1  # a request already scheduled this step leaves: vLLM steps its index back
                    recount = True
                budget += self._preempt(victim, out)
                if victim is req:
                    break
            if req.status == PREEMPTED:
                break  # the request itself was preempted
            entry = (req, n)
            out.scheduled.append(entry)
            self._advance(out, req, n)
            if self.async_scheduling:
                self._hold(out, entry)
            budget -= n
            i += 1
        if recount:
            self._recount(out)
        return budget

    def _schedule_decodes(self, out: SchedulerOutput, start: int, limit: int) -> int:
        """Schedule running[start:], at most `limit` of them, while they are decodes that get
        their slot (allocate_slots(req, 1) succeeds): the bulk of a step, kept to one tight
        loop. A slot inside the last block needs no block work at all. Returns how many were
        scheduled (advanced, as `_advance` does)."""
        kv = self.kv
        bs = kv.block_size
        # Sliding windows: also where a block falls behind the window, and after a prefill.
        # With async scheduling the window follows the tokens returned, and the block to cache
        # the tokens known: allocate_decode_slot leaves the positions of its next work in
        # req.win_next / req.cache_next (kv.win_positions: one full-attention group). Chunked
        # local attention, or windows with more groups under async scheduling: every decode.
        win_async = kv.win_positions
        last_slot = -1 if kv.chunk or (kv.window and self.async_scheduling and not win_async) else bs - 1
        fr = (kv.window - 1) % bs if kv.window and not self.async_scheduling else -1
        stale = kv.win_stale
        max_c = self.max_model_len - 1
        scheduled = out.scheduled
        append = scheduled.append
        n0 = len(scheduled)
        ctx = 0
        ctx_max = out.decode_ctx_max
        hold = out.samples is not None  # async scheduling: _hold, inline (a decode samples)
        if hold:
            sample = out.samples.append
            max_len = self.max_model_len
        # Async scheduling, full attention: the slot at a block's end caches that block only if
        # the token it holds has returned. With p tokens in flight the tokens returned end at
        # c + 1 - p (the decode condition), a block's end only when p is a multiple of bs; and
        # the last return cached up to c - p already. Such slots need no call.
        skip_end = hold and last_slot == bs - 1
        for req in self.running[start:start + limit]:
            c = req.num_computed_tokens
            p = req.num_output_placeholders
            o = req.num_output_tokens + p
            if not o or req.num_prompt_tokens + o != c + 1 or c >= max_c:
                break
            r = c % bs
            if ((not 0 < r < last_slot and not (skip_end and r and p % bs)) or r == fr
                    or (win_async and (c - req.num_in_flight_tokens >= req.win_next
                                       or req.num_prompt_tokens + req.num_output_tokens >= req.cache_next))
                    or (stale and req.request_id in stale)) and not kv.allocate_decode_slot(req):
                break  # no free block: the general path preempts
            entry = (req, 1)
            append(entry)
            c += 1
            req.num_computed_tokens = c
            ctx += c
            if c > ctx_max:
                ctx_max = c
            if hold:
                sample(entry)
                req.num_in_flight_tokens += 1
                # a placeholder for the token this step samples (the o + 1-th, at position
                # c + 1) unless it is the last
                if o + 1 < req.max_tokens and c + 1 < max_len:
                    req.num_output_placeholders += 1
        k = len(scheduled) - n0
        out.num_decodes += k
        out.decode_ctx_sum += ctx
        out.decode_ctx_max = ctx_max
        out.num_scheduled_tokens += k
        out.num_sampled += k
        return k

    def _preempt(self, victim: Request, out: SchedulerOutput) -> int:
        """Recompute preemption. Returns budget given back if the victim was already scheduled."""
        given_back = 0
        for j, (r, n) in enumerate(out.scheduled):
            if r is victim:  # only possible with priority victims
                entry = out.scheduled.pop(j)
                given_back = n
                if out.samples is not None:  # async: its tokens of this step are not in flight
                    victim.num_in_flight_tokens -= n
                    for held in (out.samples, out.partial):
                        if entry in held:
                            held.remove(entry)
                break
        self.running.remove(victim)
        self.kv.free(victim)
        victim.status = PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_output_placeholders = 0  # (a token in flight still arrives: update_from_output)
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(victim)
        out.preempted.append(victim)
        return given_back

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, now: float) -> None:
        running = self.running
        kv = self.kv
        holding = self.kv_holding
        reserve = self.reserve_full_isl
        skipped_holding = []
        while budget > 0:
            # Requests that hold KV blocks (their tier load was started) are drained first,
            # as vLLM 0.32 does: otherwise they can hold blocks behind a request that needs them.
            waiting = holding if holding else self.waiting
            if not waiting or len(running) >= self.max_num_seqs:
                break
            req = waiting.peek()
            if req.status == WAITING_FOR_REMOTE_KVS:
                if req.load_done_time > now:
                    skipped_holding.append(waiting.pop())
                    continue
                self._finish_loading(req)
            num_ext = 0
            if req.num_computed_tokens == 0:
                hit_blocks, num_hit = kv.lookup(req)
                if self.connector is not None:
                    num_ext, _ = self.connector.get_num_new_matched_tokens(req, num_hit, now)
            else:
                hit_blocks, num_hit = (), 0
            if num_ext:
                # vLLM: allocate for local hits + external tokens, then wait for the load.
                if not kv.allocate_slots(req, num_ext, num_hit, hit_blocks, delay_cache_blocks=True,
                                         full_tokens=req.num_tokens if reserve else 0):
                    break
                kv.record_lookup(req.num_tokens, num_hit + num_ext)
                req.num_computed_tokens = num_hit
                req.num_external_tokens = num_ext
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit + num_ext
                req.status = WAITING_FOR_REMOTE_KVS
                req.load_done_time = self.connector.begin_load(req, now)
                if req.scheduled_time < 0:
                    req.scheduled_time = now
                skipped_holding.append(waiting.pop())
                if self.on_admitted is not None:
                    self.on_admitted(req)
                if self.on_load_started is not None:
                    self.on_load_started(req)
                continue
            n = req.num_tokens - req.num_computed_tokens - num_hit
            thr = self._thr
            if 0 < thr < n:
                n = thr
            if not self.enable_chunked_prefill and n > budget:
                break
            if n > budget:
                n = budget
            if not kv.allocate_slots(req, n, num_hit, hit_blocks, full_tokens=req.num_tokens if reserve else 0):
                break
            if req.num_computed_tokens == 0:
                kv.record_lookup(req.num_tokens, num_hit)
            waiting.pop()
            running.append(req)
            req.num_computed_tokens += num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            if req.scheduled_time < 0:
                req.scheduled_time = now
            req.status = RUNNING
            entry = (req, n)
            out.scheduled.append(entry)
            self._advance(out, req, n)
            if self.async_scheduling:
                self._hold(out, entry)
            budget -= n
            if self.on_admitted is not None:
                self.on_admitted(req)
        for req in reversed(skipped_holding):
            holding.prepend(req)

    def _finish_loading(self, req: Request) -> None:
        """The async tier load finished: the loaded tokens count as computed (and cached)."""
        req.num_computed_tokens += req.num_external_tokens
        req.status = WAITING
        if self.kv.enable_caching:
            self.kv.cache_blocks(req, req.num_computed_tokens)

    def _advance(self, out: SchedulerOutput, req: Request, n: int) -> None:
        """Step 3 for a request just scheduled: add it to the step's batch shape, and advance
        its `num_computed_tokens` (at once: nothing later in the step reads it)."""
        c = req.num_computed_tokens
        if n == 1 and c >= req.num_prompt_tokens:
            out.num_decodes += 1
            out.decode_ctx_sum += c + 1
            if c >= out.decode_ctx_max:
                out.decode_ctx_max = c + 1
        else:
            out.prefill_chunks.append((n, c))
        c += n
        req.num_computed_tokens = c
        out.num_scheduled_tokens += n
        if c >= req.num_tokens:
            out.num_sampled += 1

    def _recount(self, out: SchedulerOutput) -> None:
        """The batch shape from scratch, after a request scheduled earlier in the step was
        preempted (priority victims) and taken out of it."""
        for req, n in out.scheduled:
            req.num_computed_tokens -= n
        out.prefill_chunks.clear()
        out.num_decodes = out.decode_ctx_sum = out.decode_ctx_max = 0
        out.num_scheduled_tokens = out.num_sampled = 0
        for req, n in out.scheduled:
            self._advance(out, req, n)
