"""A serving instance: one vLLM engine (scheduler, KV cache, latency model) on the event loop.

The engine loop is vLLM's busy loop: when a step ends its tokens are emitted, finished
requests leave, and the next step is scheduled at once; with nothing to run the instance
idles until a request arrives, a pin is released or a KV load completes.
"""

from __future__ import annotations

from ..events import PRIO_STEP_END, PRIO_TRANSFER, EventLoop
from .kv_cache_manager import KVCacheManager
from .request import FINISHED, Request
from .scheduler import Scheduler


class Instance:
    def __init__(self, index: int, loop: EventLoop, engine, latency, sched_policy, retention,
                 residency=None, on_finished=None, itl_sink=None):
        self.index = index
        self.loop = loop
        self.engine = engine
        self.latency = latency
        self.retention = retention
        self.residency = residency
        self.kv = KVCacheManager(engine.num_gpu_blocks, engine.block_size, engine.enable_prefix_caching,
                                 engine.max_model_len)
        connector = None
        if residency is not None:
            from ..kv.residency import TierConnector
            connector = TierConnector(residency, engine.block_size)
        self.scheduler = Scheduler(self.kv, engine.max_num_seqs, engine.max_num_batched_tokens, sched_policy,
                                   engine.enable_chunked_prefill, engine.long_prefill_token_threshold,
                                   engine.max_model_len, connector)
        self.scheduler.on_admitted = self._on_admitted
        self.scheduler.on_load_started = self._on_load_started
        self.on_finished = on_finished  # callback(req, now) -> gap_s or None, called before retention
        self.itl = itl_sink if itl_sink is not None else ([], [])
        self.busy = False
        self.num_pinned_blocks = 0
        self.num_steps = 0
        self.busy_time = 0.0
        self.num_tokens_computed = 0
        self.gap_of = None  # callback(req) -> upcoming tool gap of the program, or None

    # -- inputs --------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        req.instance_id = self.index
        self.scheduler.add_request(req)
        self.wake()

    def wake(self) -> None:
        if not self.busy:
            self._start_step(self.loop.now)

    def release_pin(self, pin) -> None:
        blocks = pin[0]
        if pin[1] >= 0:
            self.loop.cancel(pin[1])
            pin[1] = -1
        self.num_pinned_blocks -= len(blocks)
        self.kv.pool.free_blocks(reversed(blocks))
        pin[0] = []

    def _on_admitted(self, req: Request) -> None:
        self.retention.on_admitted(self, req)

    def _on_load_started(self, req: Request) -> None:
        self.loop.schedule(req.load_done_time, PRIO_TRANSFER, self.wake)

    # -- the engine loop -----------------------------------------------------------------
    def _start_step(self, now: float) -> None:
        out = self.scheduler.schedule(now)
        if not out.scheduled:
            self.busy = False
            return
        self.busy = True
        if out.prefill_chunks:
            dur = self.latency.step_time(out.prefill_chunks, out.num_decodes, out.decode_ctx_sum, out.num_sampled)
        else:
            dur = self.latency.decode_step_time(out.num_decodes, out.decode_ctx_sum)
        self.loop.schedule(now + dur, PRIO_STEP_END, self._on_step_end, out, now, dur)

    def _on_step_end(self, out, start: float, dur: float) -> None:
        now = self.loop.now
        self.num_steps += 1
        self.busy_time += dur
        self.num_tokens_computed += out.num_scheduled_tokens
        itl_v, itl_w = self.itl
        same = 0
        finished = []
        max_len = self.engine.max_model_len
        for req, n in out.scheduled:
            req.program.attained_service_s += dur
            if req.num_computed_tokens < req.num_tokens:
                continue  # a prefill chunk that does not reach the end samples nothing
            req.num_output_tokens += 1
            last = req.last_token_time
            if req.first_token_time < 0:
                req.first_token_time = now
            elif last == start:
                same += 1
            else:
                itl_v.append(now - last)
                itl_w.append(1)
            req.last_token_time = now
            if req.num_output_tokens >= req.max_tokens or req.num_tokens >= max_len:
                finished.append(req)
        if same:
            itl_v.append(now - start)
            itl_w.append(same)
        for req in finished:
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

    # -- observation ---------------------------------------------------------------------
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
