"""A serving instance: one vLLM engine (scheduler, KV cache, latency model) on the event loop.

The engine loop is vLLM's busy loop: when a step ends its tokens are emitted, finished
requests leave, and the next step is scheduled at once; with nothing to run the instance
idles until a request arrives, a pin is released or a KV load completes.

Fast-forward (exact). When a step is a pure decode of every running request and nothing can
join the batch (the waiting queue is empty, capped, or its head is already refused blocks —
and free blocks only shrink while decodes run), the following steps are known in advance:
the same requests, one token each, contexts growing by one. Such a run of M steps is
planned ahead (a few steps at first, more as the run reaches them: most runs are cut by an
arrival long before their end): its step times, and the few block events it contains (a request allocates
a block when its slot crosses a block boundary, and caches a block when it fills one), in
the exact order the scheduler would do them. M stops before the first step that would
finish a request's output (that step runs normally), before free blocks run out (that
step would preempt), and is cut short at the step in progress when anything from outside
reaches the instance (a request arrives, a pin is released, a KV load completes). Readers
in the middle of a run (samples, routers) first apply the block events of the steps begun
so far. The results are those of stepping one at a time, bit for bit: the same float
additions in the same order. Sliding-window models (one full-attention group) plan their
window blocks too: past the window's first free, each request frees a block per window
group when one falls behind the window and takes one with each table block; since decodes
then free blocks, a non-empty waiting queue ends a run's stability.

Under async scheduling a run is planned one step ahead, as the engine schedules: when step
1 is scheduled (at the launch of step 0) and both are pure decodes of every running request
in the steady state (two tokens in flight each, blocks and cache at their frontier), step
j + 1 is scheduled at the start of step j, the returns in between only count tokens, and a
schedule's block events are those of allocate_decode_slot (a new block and the one filled
cached, when a slot opens a block). The run ends at the start of its last planned step,
which the engine then launches and goes on from one step at a time; planning stops before
the first step that samples a request's last token. An outside event cuts it to the step in
progress, and the step after it if that was already scheduled: an event at a step's start
with a priority below the schedule's (an arrival) joins the step scheduled then, as it would.
Sliding-window and chunked-local models are not fast-forwarded under async scheduling.
"""

from __future__ import annotations

from bisect import bisect_right

from ..events import PRIO_SCHEDULE, PRIO_STEP_END, PRIO_TRANSFER, EventLoop
from ..latency.base import without_overlap
from ..latency.linear import IDLE_WAKE_AFTER_S
from .kv_cache_manager import KVCacheManager
from .request import FINISHED, WAITING_FOR_REMOTE_KVS, Request
from .scheduler import Scheduler, SchedulerOutput

_MAX_RUN = 1 << 15
_FIRST_CHUNK = 16  # steps planned when a run starts; each extension doubles the run


class _DecodeRun:
    """A planned run of pure-decode steps 0..M-1 (step 0 already scheduled by the scheduler).

    Steps are planned in chunks, as the run reaches them: most runs are cut short by an
    arrival, and the steps after the cut would be priced for nothing. `open` says more steps
    may follow the M planned so far; planning a chunk is deterministic, so a run planned in
    chunks is the run planned at once."""

    __slots__ = ("running", "base", "starts", "durs", "by_mod", "applied", "M", "out0", "ctx0", "handle",
                 "open", "R", "allocs_mod", "free", "need", "B", "max0", "frees_mod", "freed")

    def __init__(self, running, base, now: float, d0: float, out0, allocs_mod, free: int, R: int,
                 frees_mod=None):
        self.running = running
        self.base = base          # num_computed_tokens of each request before step 0
        self.starts = [now, now + d0]  # start time of steps 0..M (starts[M] = end of the run)
        self.durs = [d0]
        # Block events of step j are by_mod[j % block_size]: 2 * (running index) + kind
        # (0 allocate, 1 cache), in running order (a request's slot crosses a block boundary,
        # or fills a block, every block_size steps). Built when first needed.
        self.by_mod: list[list[int]] | None = None
        self.applied = 0          # block events applied through this step
        self.M = 1
        self.out0 = out0
        self.ctx0 = out0.decode_ctx_sum
        self.max0 = out0.decode_ctx_max or None
        self.B = len(running)
        self.handle = -1
        self.open = True          # steps after M may still be planned
        self.R = R                # no step from R on (the first request's last token)
        self.allocs_mod = allocs_mod  # blocks allocated by step j: allocs_mod[j % block_size]
        self.free = free          # free blocks before step 1
        self.need = 0             # blocks allocated by steps 1..M-1
        # sliding-window models: window blocks freed by step j: frees_mod[j % block_size]
        self.frees_mod = frees_mod
        self.freed = 0            # blocks freed by steps 1..M-1


class _AsyncRun(_DecodeRun):
    """A planned run of pure-decode steps 0..M-1 under async scheduling. Step 0 was running
    and step 1 just scheduled when it was planned; step j + 1 is scheduled at the start of
    step j (tick j), so the run's last step, M - 1, is the one scheduled when the run ends
    at the start of step M - 1 (the end of M - 2), and the engine then goes on one step at
    a time. `base`: each request's num_computed_tokens after step 1's schedule; `allocs_mod`:
    blocks the schedule of step j takes; `applied`: the tick through which block events are
    applied; `by_mod[j % bs]`: the requests with block events at tick j."""

    __slots__ = ("out1",)

    def __init__(self, running, base, t0: float, d0: float, d1: float, out0, out1, allocs_mod,
                 free: int, R: int):
        super().__init__(running, base, t0, d0, out0, allocs_mod, free, R)
        self.out1 = out1
        self.starts.append(self.starts[1] + d1)
        self.durs.append(d1)
        self.M = 2


class Instance:
    def __init__(self, index: int, loop: EventLoop, engine, latency, sched_policy, retention,
                 residency=None, on_finished=None, itl_sink=None, fast_forward: bool = True):
        self.index = index
        self.loop = loop
        self.engine = engine
        self.latency = latency
        self.retention = retention
        self.residency = residency
        self.kv = KVCacheManager(engine.num_gpu_blocks, engine.block_size, engine.enable_prefix_caching,
                                 engine.max_model_len, engine.state_blocks_per_seq, engine.sliding_window,
                                 engine.window_groups, engine.full_groups, engine.attention_chunk_size,
                                 engine.max_in_flight_tokens, engine.free_uncached_first)
        connector = None
        if residency is not None:
            from ..kv.residency import TierConnector
            connector = TierConnector(residency, engine.block_size)
        self.scheduler = Scheduler(self.kv, engine.max_num_seqs, engine.max_num_batched_tokens, sched_policy,
                                   engine.enable_chunked_prefill, engine.long_prefill_token_threshold,
                                   engine.max_model_len, connector, engine.reserve_full_isl,
                                   engine.lone_request_full_budget, engine.async_scheduling)
        self.scheduler.on_admitted = self._on_admitted
        self.scheduler.on_load_started = self._on_load_started
        self.on_finished = on_finished  # callback(req, now) after a call's last token
        self.gap_of = None  # callback(req) -> upcoming tool gap of the program, or None
        self.itl = itl_sink if itl_sink is not None else ([], [])
        self.fast_forward = fast_forward
        self.busy = False
        # When the engine last ran out of requests (vLLM's engine core then blocks on its input
        # queue); None while it has some. A step after IDLE_WAKE_AFTER_S of that pays the latency
        # model's idle_start_s.
        self.idle_since: float | None = float("-inf")
        self.waking = False  # the step just scheduled wakes the engine (lockstep groups ignore it)
        self._wake_s = latency.idle_start_s
        self.num_pinned_blocks = 0
        self.num_steps = 0
        self.num_bulk_steps = 0  # steps whose end a fast-forwarded run handled in bulk (of num_steps)
        self.num_runs = 0  # fast-forwarded runs
        self.busy_time = 0.0
        self.num_tokens_computed = 0
        self._prio = PRIO_STEP_END + index
        self._run: _DecodeRun | None = None
        self.group = None  # a LockstepGroup when this instance is a lockstepped data-parallel rank
        self.step_log: list | None = None  # (end, prefill reqs, prefill tokens, decodes, period) per step
        # Async scheduling: the step scheduled while the running one runs (vLLM's batch queue
        # of two), launched when that one ends
        self.async_scheduling = engine.async_scheduling
        self._pending: SchedulerOutput | None = None
        self._pending_handle = -1  # the event that schedules it, until it runs
        self._inflight: tuple | None = None  # the step running: (out, start, dur, end handle)
        self.set_latency(latency)

    def set_latency(self, latency) -> None:
        """Price this instance's steps with another latency model (a wrapper, a what-if). Under
        async scheduling a step scheduled at its own launch (nothing ran while it was
        scheduled) hid no host work: it is priced without the overlap, device + host."""
        self.latency = latency
        self._fresh_latency = without_overlap(latency) if self.async_scheduling else latency

    # -- inputs --------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        req.instance_id = self.index
        self._cut_run(self.loop.now)
        self.scheduler.add_request(req)
        self.wake()

    def wake(self) -> None:
        if self._run is not None:
            self._cut_run(self.loop.now)
        elif self.group is not None:
            self.group.wake(self.loop.now)
        elif not self.busy:
            self._start_step(self.loop.now)

    def release_pin(self, pin) -> None:
        self.sync(self.loop.now)
        blocks = pin[0]
        if pin[1] >= 0:
            self.loop.cancel(pin[1])
            pin[1] = -1
        self.num_pinned_blocks -= len(blocks)
        self.kv.pool.free_blocks(blocks[::-1])
        pin[0] = []

    def _on_admitted(self, req: Request) -> None:
        self.retention.on_admitted(self, req)

    def _on_load_started(self, req: Request) -> None:
        self.loop.schedule(req.load_done_time, PRIO_TRANSFER, self.wake)

    # -- the engine loop -----------------------------------------------------------------
    def schedule_step(self, now: float) -> SchedulerOutput | None:
        """Schedule the next step: its output, or None (and the instance idle) when nothing
        can run."""
        out = self.scheduler.schedule(now)
        while not out.scheduled and out.preempted:
            # A step emptied by preemption runs nothing; vLLM's engine loop schedules again.
            out = self.scheduler.schedule(now)
        if not out.scheduled:
            self.busy = False
            if self.idle_since is None and not self.scheduler.has_unfinished():
                self.idle_since = now
            return None
        self.busy = True
        since = self.idle_since
        self.waking = since is not None and now - since >= IDLE_WAKE_AFTER_S
        self.idle_since = None
        return out

    def price_step(self, out: SchedulerOutput, ep_tokens: int | None = None, fresh: bool = False) -> float:
        """The step's duration on this instance (`ep_tokens`: see LatencyModel.step_time;
        `fresh`: under async scheduling, a step scheduled at its launch, whose host work
        nothing hid)."""
        lat = self._fresh_latency if fresh else self.latency
        if out.prefill_chunks:
            return lat.step_time(out.prefill_chunks, out.num_decodes, out.decode_ctx_sum,
                                 out.num_sampled, out.decode_ctx_max or None, ep_tokens)
        return lat.decode_step_time(out.num_decodes, out.decode_ctx_sum, out.decode_ctx_max or None, ep_tokens)

    def run_step(self, out: SchedulerOutput, start: float, dur: float) -> int:
        """The planned step ends `dur` after `start` (a lockstep group may stretch it); the
        handle of its end."""
        return self.loop.schedule(start + dur, self._prio, self._on_step_end, out, start, dur)

    def _start_step(self, now: float) -> None:
        if self.group is not None:
            self.group.step_done(now)
            return
        if self.async_scheduling:
            self._start_async(now)
            return
        out = self.schedule_step(now)
        if out is None:
            return
        dur = self.price_step(out)
        if self.waking:
            dur += self._wake_s
        if (not out.prefill_chunks and self.fast_forward and not out.preempted
                and self._plan_run(out, now, dur)):
            return
        self.run_step(out, now, dur)

    def _start_async(self, now: float) -> None:
        """Async scheduling (vLLM's step_with_batch_queue): launch the step scheduled while
        the last one ran (or, with none, schedule one now: its host work is then not hidden
        behind a running step, and it is priced device + host), then schedule the next one at
        once, against this one's placeholders (after the calls arriving at the same instant):
        requests that arrive while it runs wait for the schedule at its end, and join the step
        after the next."""
        fresh = self._pending_handle >= 0
        if fresh:  # (a step of no duration ended before its successor was scheduled)
            self.loop.cancel(self._pending_handle)
            self._schedule_pending(False)
        out = self._pending
        self._pending = None
        if out is None:
            out = self.schedule_step(now)
            if out is None:
                return
            fresh = True
        dur = self.price_step(out, fresh=fresh)
        if self.waking:
            dur += self._wake_s
            self.waking = False
        self._inflight = (out, now, dur, self.run_step(out, now, dur))
        # the next step is scheduled at once, after the calls that arrive at this instant
        self._pending_handle = self.loop.schedule(now, PRIO_SCHEDULE + self.index, self._schedule_pending)

    def _schedule_pending(self, plan: bool = True) -> None:
        self._pending_handle = -1
        now = self.loop.now
        nxt = self.scheduler.schedule(now)
        if nxt.scheduled:
            self._pending = nxt
            if plan and self.fast_forward and not nxt.prefill_chunks and not nxt.preempted:
                self._plan_async_run(nxt, now)

    def _on_step_end(self, out: SchedulerOutput, start: float, dur: float) -> None:
        now = self.loop.now
        if self.step_log is not None:
            chunks = out.prefill_chunks
            self.step_log.append((now, len(chunks), sum(n for n, _ in chunks), out.num_decodes, dur))
        self.num_steps += 1
        self.busy_time += dur
        self.num_tokens_computed += out.num_scheduled_tokens
        if out.samples is not None:
            self._emit_async(out, start, now)
            return
        itl_v, itl_w = self.itl
        same = 0
        finished = []
        max_len = self.engine.max_model_len
        for req, _n in out.scheduled:
            num_out = req.num_output_tokens
            num_prompt = req.num_prompt_tokens
            if req.num_computed_tokens < num_prompt + num_out:
                continue  # a prefill chunk that does not reach the end samples nothing
            num_out += 1
            req.num_output_tokens = num_out
            last = req.last_token_time
            if last == start:
                same += 1
            elif req.first_token_time < 0:
                req.first_token_time = now
            else:
                itl_v.append(now - last)
                itl_w.append(1)
            req.last_token_time = now
            if num_out >= req.max_tokens or num_prompt + num_out >= max_len:
                finished.append(req)
        if same:
            itl_v.append(now - start)
            itl_w.append(same)
        for req in finished:
            self._finish(req, now)
        self._start_step(now)

    def _emit_async(self, out: SchedulerOutput, start: float, now: float) -> None:
        """The step's tokens, under async scheduling: every request it scheduled to sample
        (preempted since or not) gets its token, timed in the scheduler's update (one pass:
        the token count, the blocks it fills and its timing); then the finished leave, then
        the next step."""
        for req in self.scheduler.update_from_output(out, start, now, self.itl):
            self._finish(req, now)
        self._start_step(now)

    def _finish(self, req: Request, now: float) -> None:
        self.scheduler.finish(req)
        req.status = FINISHED
        req.finish_time = now
        gap = self.gap_of(req) if self.gap_of is not None else None
        self.retention.on_call_finished(self, req, gap, now)
        if self.on_finished is not None:
            self.on_finished(req, now)

    # -- fast-forward of pure-decode runs ------------------------------------------------
    def _batch_is_stable(self, out: SchedulerOutput) -> bool:
        """Would the next steps schedule exactly this batch again (bar block shortage)?"""
        sched = self.scheduler
        running = sched.running
        if len(out.scheduled) != len(running):
            return False  # budget left some running request out
        if sched.kv_holding:
            return False  # a tier load in flight can make a waiting request admissible
        waiting = sched.waiting
        if not waiting or len(running) >= sched.max_num_seqs or sched.max_num_batched_tokens - len(running) <= 0:
            return True
        if sched.connector is not None or self.kv.window:
            # With KV tiers a refused request can become admissible as decodes evict its
            # cached blocks (the tier then supplies them and fewer blocks are needed); with
            # sliding windows decodes free blocks that fall behind the window.
            return False
        head = waiting.peek()
        if head.status == WAITING_FOR_REMOTE_KVS:
            return False
        # The head was refused blocks; decodes only consume blocks, so it stays refused unless
        # a running call of its own program caches blocks it would hit (DAG siblings).
        prog = head.program
        for r in running:
            if r.program is prog:
                return False
        return True

    def _plan_run(self, out: SchedulerOutput, now: float, d0: float) -> bool:
        if not self._batch_is_stable(out):
            return False
        running = list(self.scheduler.running)
        kv = self.kv
        if kv.chunk or kv.window and (kv.full_groups != 1 or not all(kv.window_settled(r) for r in running)):
            return False  # a window not yet periodic (or chunks, freed a chunk at a time): not planned
        max_len = self.engine.max_model_len
        R = _MAX_RUN  # steps until the first request finishes
        for r in running:
            num_out = r.num_output_tokens
            left = r.max_tokens - num_out
            if left < R:
                R = left
            left = max_len - r.num_prompt_tokens - num_out
            if left < R:
                R = left
        if R < 2:
            return False
        bs = kv.block_size
        base = [r.num_computed_tokens - 1 for r in running]
        allocs_mod = [0] * bs  # step j allocates a block for each request with c + j = 0 (mod bs)
        frees_mod = None
        if kv.window:
            # ... and one per sliding-window group with it, and frees one per group when
            # c + j - window + 1 = 0 (mod bs) (a block falls behind the window)
            wg, W = kv.window_groups, kv.window
            frees_mod = [0] * bs
            for c in base:
                allocs_mod[-c % bs] += 1 + wg
                frees_mod[(W - 1 - c) % bs] += wg
        else:
            for c in base:
                allocs_mod[-c % bs] += 1
        run = _DecodeRun(running, base, now, d0, out, allocs_mod, kv.pool.num_free, R, frees_mod)
        self._plan_more(run, _FIRST_CHUNK)
        if run.M < 2:
            return False
        run.handle = self.loop.schedule(run.starts[run.M], self._prio, self._end_run)
        self._run = run
        return True

    def _plan_more(self, run: _DecodeRun, n: int) -> None:
        """Plan up to n more steps of an open run. Planning stops for good before the first
        step that would finish a request's output (run.R; under async scheduling, sample its
        last token, whose placeholder is not counted), need more blocks than are free (that
        step would preempt): both run normally; or take no time (under async scheduling its
        end would come before the next schedule). Step j's batch is step 0's, contexts j
        longer; under async scheduling its blocks are taken by its schedule, at step j - 1's
        start."""
        j = run.M
        stop = min(run.R, j + n)
        bs = self.kv.block_size
        allocs_mod = run.allocs_mod
        frees_mod = run.frees_mod
        free = run.free
        need = run.need
        B, ctx0, max0 = run.B, run.ctx0, run.max0
        step_time = self.latency.decode_step_time
        starts, durs = run.starts, run.durs
        t = starts[j]
        freed = run.freed
        while j < stop:
            a = allocs_mod[j % bs]
            if need + a > free + freed:
                run.open = False
                break
            need += a
            if frees_mod is not None:
                # (a step's window frees count for later steps only: a request later in the
                # running order may free after an earlier one allocates, so a run may stop
                # one step early, never late)
                freed += frees_mod[j % bs]
            d = step_time(B, ctx0 + j * B, max0 + j if max0 else None)
            if d <= 0.0:
                run.open = False
                break
            durs.append(d)
            t = t + d
            starts.append(t)
            j += 1
        run.freed = freed
        if j >= run.R:
            run.open = False
        run.need = need
        if run.by_mod is not None and run.M <= bs:
            run.by_mod = None  # built for fewer steps: events of later steps were left out
        run.M = j

    def _apply_run_events(self, run: _DecodeRun, upto: int) -> None:
        """Apply the block events of steps applied+1..upto (allocations, then caching, per request)."""
        if upto <= run.applied:
            return
        kv = self.kv
        pool = kv.pool
        bs = kv.block_size
        req_to_blocks = kv.req_to_blocks
        num_cached_block = kv.num_cached_block
        running = run.running
        base = run.base
        by_mod = run.by_mod or self._run_events(run)
        wg = kv.window_groups
        win_cache = kv.win_cache
        for j in range(run.applied + 1, upto + 1):
            for e in by_mod[j % bs]:
                i = e >> 2
                kind = e & 3
                req = running[i]
                if kind == 0:
                    req_to_blocks[req.request_id].append(pool.get_new_block())
                elif kind == 1:
                    idx = (base[i] + j + 1) // bs - 1
                    table = req_to_blocks[req.request_id]
                    key = req.block_key(idx)
                    if win_cache:
                        kv.cache_window_block(req.request_id, idx, key, len(table))
                    pool.cache_block(table[idx], key)  # a no-op if cached already
                    num_cached_block[req.request_id] = idx + 1
                elif kind == 2:
                    kv._shrink_window(req.request_id, wg)
                else:
                    kv._grow_window(req.request_id, wg)
        run.applied = upto

    def _run_events(self, run: _DecodeRun) -> list[list[int]]:
        """The run's block events by step residue (built when the first step applies any)."""
        kv = self.kv
        bs = kv.block_size
        caching = kv.enable_caching
        W = kv.window
        M = run.M  # no step from M on runs (a cut only shortens a run)
        by_mod = [[] for _ in range(bs)]
        for i, c in enumerate(run.base):
            # Step j allocates a block for request i when c + j is a multiple of bs, and
            # caches one when c + j + 1 is; the first such step is the residue, or bs.
            # Sliding windows: it first frees a window block per group when c + j - W + 1
            # is a multiple of bs, and takes one per group before its table's block. (Events
            # are 4 x running index + kind, in the order allocate_decode_slot does them.)
            e = 4 * i
            m = -c % bs
            if W:
                f = (W - 1 - c) % bs
                if (f or bs) < M:
                    by_mod[f].append(e + 2)
            if (m or bs) < M:
                if W:
                    by_mod[m].append(e + 3)  # (the window groups' blocks are allocated first)
                by_mod[m].append(e)
            if caching:
                m = (m - 1) % bs
                if (m or bs) < M:
                    by_mod[m].append(e + 1)
        run.by_mod = by_mod
        return by_mod

    def _step_at(self, run: _DecodeRun, now: float) -> int:
        """Index of the step in progress at `now` (the last one begun at or before now)."""
        while run.open and run.starts[run.M] <= now:
            self._extend(run)
        s = bisect_right(run.starts, now, 0, run.M) - 1
        return s if s > 0 else 0

    def _extend(self, run: _DecodeRun, pending: bool = True) -> None:
        """Plan the next chunk of an open run and move its end event (`pending`: the old
        end event is still to come, else it is the one running)."""
        M = run.M
        self._plan_more(run, M)
        if run.M > M:
            if pending:
                self.loop.cancel(run.handle)
            run.handle = self.loop.schedule(run.starts[run.M], self._prio, self._end_run)

    def sync(self, now: float) -> None:
        """Bring block state up to `now` inside a decode run (for readers)."""
        run = self._run
        if run is not None:
            if run.__class__ is _AsyncRun:
                self._apply_async_events(run, self._async_at(run, now)[1])
            else:
                self._apply_run_events(run, self._step_at(run, now))

    def _cut_run(self, now: float) -> None:
        """Something from outside arrives: the run ends with the step in progress."""
        run = self._run
        if run is None:
            return
        if run.__class__ is _AsyncRun:
            self._cut_async_run(run, now)
            return
        s = self._step_at(run, now)
        run.open = False
        self._apply_run_events(run, s)
        if s + 1 < run.M:
            self.loop.cancel(run.handle)
            run.M = s + 1
            run.handle = self.loop.schedule(run.starts[s + 1], self._prio, self._end_run)

    def _end_run(self) -> None:
        run = self._run
        if run.open:
            self._extend(run, pending=False)
            if run.open or self.loop.now < run.starts[run.M]:
                return  # planned further: the run goes on
        self._run = None
        M = run.M
        self._apply_run_events(run, M - 1)
        if M == 1:
            self._on_step_end(run.out0, run.starts[0], run.durs[0])
            return
        now = self.loop.now  # == starts[M]
        starts, durs = run.starts, run.durs
        running = run.running
        B = len(running)
        itl_v, itl_w = self.itl
        # The outputs of all M steps at once, in the order stepping one at a time appends them.
        t0, e0 = starts[0], starts[1]
        base = run.base
        max_len = self.engine.max_model_len
        same = 0
        finished = []
        for i, r in enumerate(running):
            last = r.last_token_time
            if last == t0:
                same += 1
            else:
                itl_v.append(e0 - last)
                itl_w.append(1)
            num_out = r.num_output_tokens + M
            r.num_output_tokens = num_out
            r.num_computed_tokens = base[i] + M
            r.last_token_time = now
            if num_out >= r.max_tokens or r.num_prompt_tokens + num_out >= max_len:
                finished.append(r)
        if same:
            itl_v.append(e0 - t0)
            itl_w.append(same)
        busy = self.busy_time
        for j in range(1, M):
            itl_v.append(starts[j + 1] - starts[j])
            itl_w.append(B)
        if self.step_log is not None:
            self.step_log.extend((starts[j + 1], 0, 0, B, durs[j]) for j in range(M))
        for j in range(M):
            busy += durs[j]
        self.busy_time = busy
        self.num_steps += M
        self.num_bulk_steps += M
        self.num_runs += 1
        self.num_tokens_computed += B * M
        for req in finished:
            self._finish(req, now)
        self._start_step(now)

    # -- fast-forward of pure-decode runs under async scheduling -------------------------
    def _plan_async_run(self, out1: SchedulerOutput, now: float) -> None:
        """Step 0 (launched at `now`) and step 1 (just scheduled) are pure decodes of every
        running request: if the batch is stable and every request is in the steady state of
        async decoding (two tokens in flight, blocks and cache at their frontier), plan the
        following steps as a run. A run needs a third step to save anything."""
        inflight = self._inflight
        if inflight is None or inflight[1] != now or inflight[2] <= 0.0:
            return
        out0 = inflight[0]
        kv = self.kv
        if out0.prefill_chunks or out0.preempted or kv.local or self.group is not None:
            return
        running = self.scheduler.running
        B = len(running)
        if out0.num_decodes != B or len(out0.scheduled) != B or not self._batch_is_stable(out1):
            return
        bs = kv.block_size
        caching = kv.enable_caching
        num_cached = kv.num_cached_block
        tables = kv.req_to_blocks
        max_len = self.engine.max_model_len
        base = []
        R = _MAX_RUN
        for (r0, _), req in zip(out0.scheduled, running):
            c = req.num_computed_tokens
            o = req.num_output_tokens
            P = req.num_prompt_tokens
            if (r0 is not req or req.num_output_placeholders != 2 or req.num_in_flight_tokens != 2
                    or c != P + o + 1 or len(tables[req.request_id]) != -(-c // bs)
                    or (caching and num_cached[req.request_id] != (c - 1) // bs)):
                return
            # step j samples token o + j + 1; steps are planned up to the first last token
            left = req.max_tokens - o - 1
            if left < R:
                R = left
            left = max_len - P - o - 1
            if left < R:
                R = left
            base.append(c)
        if R < 3:
            return
        allocs_mod = [0] * bs  # the schedule of step j allocates for each request with c + j - 2 = 0 (mod bs)
        for c in base:
            allocs_mod[(2 - c) % bs] += 1
        t0, d0 = inflight[1], inflight[2]
        d1 = self.price_step(out1)
        if d1 <= 0.0:
            return
        run = _AsyncRun(list(running), base, t0, d0, d1, out0, out1, allocs_mod, kv.pool.num_free, R)
        self._plan_more(run, _FIRST_CHUNK)
        if run.M < 3:
            return
        self.loop.cancel(inflight[3])  # step 0's end is the run's now
        self._pending = None
        self._inflight = None
        run.handle = self.loop.schedule(run.starts[run.M - 1], self._prio, self._end_async_run)
        self._run = run

    def _async_at(self, run: _AsyncRun, now: float) -> tuple[int, int]:
        """(s, T) for an outside event at `now`: step s is running, and the schedules of
        steps 2..T+1 (ticks 1..T) have happened: a step's successor is scheduled at its
        start, after the events of lower priority at that instant (arrivals: they join it)."""
        while run.open and run.starts[run.M - 1] <= now:
            self._extend_async(run)
        s = bisect_right(run.starts, now, 0, run.M) - 1
        if s < 0:
            s = 0
        if run.starts[s] == now and self.loop.prio < PRIO_SCHEDULE + self.index:
            return s, s - 1
        return s, s

    def _extend_async(self, run: _AsyncRun, pending: bool = True) -> None:
        M = run.M
        self._plan_more(run, M)
        if run.M > M:
            if pending:
                self.loop.cancel(run.handle)
            run.handle = self.loop.schedule(run.starts[run.M - 1], self._prio, self._end_async_run)

    def _apply_async_events(self, run: _AsyncRun, upto: int) -> None:
        """The block events of ticks applied+1..upto: at tick j (the schedule of step j + 1)
        each request whose slot opens a block (c + j - 1 = 0 mod bs) takes a new block and
        caches the one it filled, in running order, as allocate_decode_slot does. (The
        returns in between cache nothing: the schedules got there first.)"""
        if upto <= run.applied:
            return
        kv = self.kv
        pool = kv.pool
        bs = kv.block_size
        caching = kv.enable_caching
        tables = kv.req_to_blocks
        num_cached = kv.num_cached_block
        running, base = run.running, run.base
        by_mod = run.by_mod
        if by_mod is None:
            by_mod = run.by_mod = [[] for _ in range(bs)]
            for i, c in enumerate(base):
                by_mod[(1 - c) % bs].append(i)
        for j in range(run.applied + 1, upto + 1):
            for i in by_mod[j % bs]:
                req = running[i]
                rid = req.request_id
                table = tables[rid]
                table.append(pool.get_new_block())
                if caching:
                    idx = (base[i] + j - 1) // bs - 1
                    num_cached[rid] = idx + 1
                    pool.cache_block(table[idx], req.block_key(idx))
        run.applied = upto

    def _decode_out(self, run: _AsyncRun, j: int) -> SchedulerOutput:
        """The scheduler's output for step j of the run."""
        if j == 0:
            return run.out0
        if j == 1:
            return run.out1
        out = SchedulerOutput()
        B = run.B
        out.scheduled = out.samples = [(r, 1) for r in run.running]
        out.partial = []
        out.num_decodes = out.num_scheduled_tokens = out.num_sampled = B
        out.decode_ctx_sum = run.ctx0 + j * B
        out.decode_ctx_max = run.max0 + j if run.max0 else 0
        return out

    def _materialise(self, run: _AsyncRun, s: int, T: int) -> SchedulerOutput:
        """The state of stepping one at a time, with steps 0..s-1 returned, step s running
        and steps up to T + 1 scheduled: tokens, timing, counters and block events. Sets the
        scheduled step after s (T == s) as pending; returns step s's output."""
        self._run = None
        self._apply_async_events(run, T)
        starts, durs = run.starts, run.durs
        running, base = run.running, run.base
        B = run.B
        if s >= 1:
            # step 0 returns as it would have (its update is that of stepping one at a time)
            self.scheduler.update_from_output(run.out0, starts[0], starts[1], self.itl)
            itl_v, itl_w = self.itl
            for j in range(1, s):  # every request's previous token came at the step's start
                itl_v.append(starts[j + 1] - starts[j])
                itl_w.append(B)
            last = starts[s]
            for i, req in enumerate(running):
                req.num_output_tokens = base[i] - req.num_prompt_tokens - 1 + s
                req.last_token_time = last
        k = T + 2 - s  # tokens in flight: steps s..T+1
        for i, req in enumerate(running):
            req.num_computed_tokens = base[i] + T
            req.num_output_placeholders = k
            req.num_in_flight_tokens = k
        if self.step_log is not None:
            self.step_log.extend((starts[j + 1], 0, 0, B, durs[j]) for j in range(s))
        busy = self.busy_time
        for j in range(s):
            busy += durs[j]
        self.busy_time = busy
        self.num_steps += s
        self.num_bulk_steps += s
        self.num_runs += 1
        self.num_tokens_computed += B * s
        if T == s:
            self._pending = self._decode_out(run, s + 1)
        return self._decode_out(run, s)

    def _cut_async_run(self, run: _AsyncRun, now: float) -> None:
        """Something from outside arrives: the steps scheduled so far stand, and the engine
        goes on one step at a time from the state it would be in."""
        s, T = self._async_at(run, now)
        self.loop.cancel(run.handle)
        out = self._materialise(run, s, T)
        start, dur = run.starts[s], run.durs[s]
        self._inflight = (out, start, dur, self.run_step(out, start, dur))
        if T < s:  # (at step s's start, before its successor was scheduled)
            self._pending_handle = self.loop.schedule(now, PRIO_SCHEDULE + self.index, self._schedule_pending)

    def _end_async_run(self) -> None:
        run = self._run
        if run.open:
            self._extend_async(run, pending=False)
            if self.loop.now < run.starts[run.M - 1]:
                return  # planned further: the run goes on
        s = run.M - 2  # step s ends now; s + 1 (the last planned) is scheduled
        out = self._materialise(run, s, s)
        self._on_step_end(out, run.starts[s], run.durs[s])

    # -- observation ---------------------------------------------------------------------
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return self.scheduler.num_waiting()
