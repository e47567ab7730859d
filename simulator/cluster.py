"""The cluster simulation: Program Orchestrator + Session-Aware Router + instances.

`simulate(programs, deployment, config)` is a pure function of its inputs: no global state,
no wall clock, randomness only from `config.seed`. Programs are pulled from the (arrival-
sorted) iterable one at a time as their arrival comes up, and results are kept as rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .config import SimConfig
from .deployment import Deployment
from .engine.instance import Instance
from .engine.lockstep import LockstepGroup
from .engine.request import Request
from .events import PRIO_RELEASE, PRIO_SAMPLE, EventLoop
from .kv.residency import KVResidency, TierStore
from .metrics import summarize
from .policies.retention import RETENTION
from .policies.routing import ROUTERS
from .policies.scheduling import SCHEDULERS
from .tools import ToolSimulator
from .workload import ProgramSpec

_PROGRAM_SHIFT = 32
_CALL_SHIFT = 24
_HASH_BASE = 1 << 62


class ProgramState:
    """What the orchestrator knows of a program in flight."""

    __slots__ = ("spec", "index", "key_base", "prefix_key_base", "input_tokens", "remaining_parents",
                 "children", "calls_done", "instance", "attained_tokens", "pins", "tool_s_total",
                 "failed")

    def __init__(self, spec: ProgramSpec, index: int, prefix_index: int):
        self.spec = spec
        self.index = index
        self.key_base = (index + 1) << _PROGRAM_SHIFT
        self.prefix_key_base = -((prefix_index + 1) << _PROGRAM_SHIFT) if prefix_index >= 0 else 0
        self.input_tokens = spec.all_input_tokens()
        n = len(spec.calls)
        self.remaining_parents = [len(spec.parents(k)) for k in range(n)]
        self.children: list[list[int]] = [[] for _ in range(n)]
        for k in range(n):
            for p in spec.parents(k):
                self.children[p].append(k)
        self.calls_done = 0
        self.instance: int | None = None
        self.attained_tokens = 0
        self.pins: dict[int, list] = {}
        self.tool_s_total = 0.0
        self.failed = False


@dataclass
class SimResult:
    calls: list[dict] = field(default_factory=list)
    programs: list[dict] = field(default_factory=list)
    timeseries: list[dict] = field(default_factory=list)
    itl_values: list[float] = field(default_factory=list)
    itl_weights: list[int] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    instances: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # with metrics.step_log: STEP_COLUMNS rows
    events: int = 0
    sim_time_s: float = 0.0


class Simulation:
    def __init__(self, programs: Iterable[ProgramSpec], deployment: Deployment, config: SimConfig):
        self.cfg = config
        self.dep = deployment
        self.loop = EventLoop()
        self.tools = ToolSimulator(config.tools, config.seed)
        self.sched_policy = SCHEDULERS.get(config.policy.scheduler)(config.policy)
        self.retention = RETENTION.get(config.policy.kv)(config.policy)
        self.router = ROUTERS.get(config.policy.router)(config.policy)
        self.result = SimResult()
        itl = (self.result.itl_values, self.result.itl_weights)
        self.instances: list[Instance] = []
        lockstep = deployment.dp_lockstep and config.cluster.instances > 1
        for i in range(config.cluster.instances):
            residency = None
            if self.retention.needs_tiers and deployment.tiers:
                per_block = deployment.engine.block_size * deployment.model.kv_pool_bytes_per_token() / deployment.tp
                residency = KVResidency([TierStore(s, c) for s, c in deployment.tiers], per_block)
            inst = Instance(i, self.loop, deployment.engine, deployment.latency, self.sched_policy,
                            self.retention, residency, on_finished=self._on_call_finished, itl_sink=itl,
                            fast_forward=config.fast_forward and not lockstep)
            inst.gap_of = self._gap_of
            if config.metrics.step_log:
                inst.step_log = []
            self.instances.append(inst)
        # vLLM's default CUDA-graph capture limit, min(2·max_num_seqs, 512) tokens
        # (vllm/config/vllm.py): data-parallel ranks are padded to the largest within it.
        pad = min(2 * deployment.engine.max_num_seqs, 512)
        self.lockstep = LockstepGroup(self.loop, self.instances, pad) if lockstep else None
        self._programs: Iterator[ProgramSpec] = iter(programs)
        self._prefix_ids: dict[str, int] = {}
        self._hash_intern: dict[tuple, int] = {}
        self._num_programs = 0
        self._live_programs = 0
        self._last_arrival = float("-inf")
        self._next_request_id = 0
        self._gaps: dict[int, float] = {}
        self._issue: dict[int, float] = {}
        # Frontend delay (API server, HTTP, streaming) of a live client: the way in delays the
        # call's arrival at the engines, the way out every token the client sees.
        self._fe_in, self._fe_out = deployment.frontend_split
        self._feeding = True

    # -- programs in -----------------------------------------------------------------------
    def _feed(self) -> None:
        spec = next(self._programs, None)
        if spec is None:
            self._feeding = False
            return
        if spec.arrival_s < self._last_arrival:
            raise ValueError(f"programs must come sorted by arrival_s: {spec.program_id} arrives at "
                             f"{spec.arrival_s} after one at {self._last_arrival}")
        self._last_arrival = spec.arrival_s
        self.loop.schedule(spec.arrival_s, PRIO_RELEASE, self._arrive, spec)

    def _arrive(self, spec: ProgramSpec) -> None:
        pidx = -1
        if spec.prefix_id is not None:
            pidx = self._prefix_ids.setdefault(spec.prefix_id, len(self._prefix_ids))
        prog = ProgramState(spec, self._num_programs, pidx)
        self._num_programs += 1
        self._live_programs += 1
        for k in range(len(spec.calls)):
            if prog.remaining_parents[k] == 0:
                self._release(prog, k)
        self._feed()

    # -- orchestration ---------------------------------------------------------------------
    def _release(self, prog: ProgramState, k: int) -> None:
        now = self.loop.now
        spec = prog.spec
        call = spec.calls[k]
        bs = self.dep.engine.block_size
        hash_keys = self._hash_keys(spec, k, bs) if call.hash_ids is not None else None
        key_base = prog.key_base + ((k << _CALL_SHIFT) if hash_keys is not None else 0)
        req = Request(self._next_request_id, prog.input_tokens[k], call.output_tokens, now, key_base,
                      prog.prefix_key_base, spec.prefix_tokens // bs if spec.prefix_id is not None else 0,
                      hash_keys, program=prog, call_index=k,
                      priority=self.sched_policy.priority(prog, now))
        self._next_request_id += 1
        if req.num_prompt_tokens + req.max_tokens > self.dep.engine.max_model_len:
            self._fail(req, f"prompt ({req.num_prompt_tokens}) + output ({req.max_tokens}) tokens exceed "
                            f"max_model_len {self.dep.engine.max_model_len}")
            return
        eng = self.dep.engine
        total = req.num_prompt_tokens + req.max_tokens
        # (its table, and the state and window blocks a hybrid or sliding-window model's sequence holds besides)
        need = -(-total // bs) + eng.state_blocks_per_seq + self.instances[0].kv.peak_window_blocks(
            total, eng.max_in_flight_tokens)
        if need > eng.num_gpu_blocks - 1:
            self._fail(req, f"prompt + output ({total} tokens) can never fit "
                            f"the KV cache ({eng.num_gpu_blocks - 1} usable blocks of {bs} tokens)")
            return
        self._issue[req.request_id] = now
        if self._fe_in > 0:
            self.loop.schedule(now + self._fe_in, PRIO_RELEASE, self._admit, req)
        else:
            self._admit(req)

    def _admit(self, req: Request) -> None:
        """The call reaches the engines (after the API server's share of the frontend delay)."""
        now = self.loop.now
        req.arrival_time = now
        prog = req.program
        if self.router.reads_cache:
            for inst in self.instances:
                inst.sync(now)
        i = self.router.choose(req, prog, self.instances, now)
        prog.instance = i
        self.instances[i].add_request(req)

    def _hash_keys(self, spec: ProgramSpec, k: int, bs: int) -> list[int]:
        """Engine-block identities from a trace's hash_ids (chained, interned)."""
        call = spec.calls[k]
        hids = call.hash_ids
        tb = spec.block_size or bs
        n_tokens = min(spec.input_tokens(k), len(hids) * tb)
        keys = []
        parent = -1
        intern = self._hash_intern
        for e in range(n_tokens // bs):
            lo, hi = e * bs, (e + 1) * bs - 1
            j0, j1 = lo // tb, hi // tb
            ident = (parent, tuple(hids[j0:j1 + 1]), lo - j0 * tb)
            key = intern.get(ident)
            if key is None:
                key = intern[ident] = _HASH_BASE + len(intern)
            keys.append(key)
            parent = key
        return keys

    def _gap_of(self, req: Request) -> float | None:
        prog = req.program
        k = req.call_index
        if not prog.children[k] or prog.failed:
            return None
        g = self.tools.gap(prog.index, prog.spec.calls[k], k)
        self._gaps[req.request_id] = g
        return g

    def _on_call_finished(self, req: Request, now: float) -> None:
        now += self._fe_out  # the client sees the last token after the frontend's way out
        self._record_call(req, "ok", "")
        prog = req.program
        prog.calls_done += 1
        prog.attained_tokens += req.num_prompt_tokens - max(req.num_cached_tokens, 0) + req.num_output_tokens
        gap = self._gaps.pop(req.request_id, None)
        if gap is not None:
            prog.tool_s_total += gap
        for c in prog.children[req.call_index]:
            prog.remaining_parents[c] -= 1
            if prog.remaining_parents[c] == 0:
                self.loop.schedule(now + (gap or 0.0), PRIO_RELEASE, self._release, prog, c)
        if prog.calls_done == len(prog.spec.calls):
            self._finish_program(prog, now, "ok")

    def _fail(self, req: Request, error: str) -> None:
        req.finish_time = self.loop.now
        self._record_call(req, "failed", error)
        prog = req.program
        prog.failed = True
        self._finish_program(prog, self.loop.now, "failed")

    def _finish_program(self, prog: ProgramState, now: float, status: str) -> None:
        pins = list(prog.pins.items())
        prog.pins.clear()
        for i, pin in pins:
            self.instances[i].release_pin(pin)
            self.instances[i].wake()  # a waiting call may have been blocked by those blocks
        spec = prog.spec
        self.result.programs.append({
            "program_id": spec.program_id, "arrival_s": spec.arrival_s, "finish_s": now,
            "jct_s": now - spec.arrival_s, "calls": prog.calls_done, "tool_s_total": prog.tool_s_total,
            "status": status})
        self._live_programs -= 1

    def _record_call(self, req: Request, status: str, error: str) -> None:
        """A call as its client saw it: issued at `arrival_s`, tokens the frontend's way out
        after the engine produced them."""
        ok = status == "ok"
        fe = self._fe_out if ok else 0.0
        issue = self._issue.pop(req.request_id, req.arrival_time)
        first = req.first_token_time + fe if ok else -1.0
        finish = req.finish_time + fe
        out = req.num_output_tokens
        tpot = (finish - first) / (out - 1) if ok and out > 1 else 0.0
        self.result.calls.append({
            "program_id": req.program.spec.program_id, "call_index": req.call_index,
            "instance": req.instance_id, "arrival_s": issue,
            "scheduled_s": req.scheduled_time if ok else -1.0, "first_token_s": first,
            "finish_s": finish, "input_tokens": req.num_prompt_tokens,
            "cached_tokens": max(req.num_cached_tokens, 0), "output_tokens": out,
            "ttft_s": first - issue if ok else 0.0, "tpot_s": tpot,
            "e2e_s": finish - issue, "preemptions": req.num_preemptions,
            "loaded_tokens": req.num_external_tokens, "status": status, "error": error})

    # -- observation -----------------------------------------------------------------------
    def _sample(self) -> None:
        now = self.loop.now
        rows = self.result.timeseries
        for inst in self.instances:
            inst.sync(now)
            kv = inst.kv
            rows.append({"t_s": now, "instance": inst.index, "running": inst.num_running(),
                         "waiting": inst.num_waiting(), "kv_usage": kv.usage(),
                         "preemptions_total": inst.scheduler.num_preemptions,
                         "prefix_cache_queries": kv.prefix_cache_queries,
                         "prefix_cache_hits": kv.prefix_cache_hits, "pinned_blocks": inst.num_pinned_blocks})
        # Sample on while anything else can still happen; with no other event pending the
        # run is over (or stuck, which run() reports).
        if (self._feeding or self._live_programs) and len(self.loop) > 0:
            self.loop.schedule(now + self.cfg.metrics.sample_interval_s, PRIO_SAMPLE, self._sample)

    # -- run -------------------------------------------------------------------------------
    def run(self, progress=None, progress_every_s: float = 30.0) -> SimResult:
        """Run to completion. `progress(sim_time_s, programs_done)` is called every
        `progress_every_s` of simulated time when given."""
        self._feed()
        if self.cfg.metrics.sample_interval_s > 0 and self._feeding:
            self.loop.schedule(0.0, PRIO_SAMPLE, self._sample)
        if progress is None:
            self.loop.run()
        else:
            t = 0.0
            while len(self.loop):
                t = max(t + progress_every_s, self.loop.peek_time())
                self.loop.run(until=t)
                progress(self.loop.now, len(self.result.programs))
        res = self.result
        stuck = sum(inst.num_running() + inst.scheduler.num_waiting() for inst in self.instances)
        if stuck or self._live_programs:
            raise RuntimeError(f"simulation ended with {stuck} requests unfinished and {self._live_programs} "
                               f"programs live: a request cannot fit the KV cache ({self.dep.engine.num_gpu_blocks} "
                               f"blocks of {self.dep.engine.block_size} tokens)")
        res.events = self.loop.events_processed
        res.sim_time_s = self.loop.now
        res.instances = [{"instance": inst.index, "steps": inst.num_steps, "busy_s": inst.busy_time,
                          "tokens_computed": inst.num_tokens_computed,
                          "preemptions": inst.scheduler.num_preemptions,
                          "prefix_cache_queries": inst.kv.prefix_cache_queries,
                          "prefix_cache_hits": inst.kv.prefix_cache_hits,
                          "evictions": inst.kv.pool.num_evictions} for inst in self.instances]
        if self.lockstep is not None:
            g = self.lockstep
            for row in res.instances:
                i = row["instance"]
                row.update({"lockstep_steps": g.num_steps, "lockstep_dummy_steps": g.dummy_steps[i],
                            "lockstep_wait_s": g.stretched_s[i]})
        if self.cfg.metrics.step_log:
            res.steps = sorted(({"t_s": end, "instance": inst.index, "num_prefill_reqs": npre,
                                 "num_prefill_tokens": ntok, "num_decode_reqs": ndec, "period_ms": 1000.0 * dur,
                                 "elapsed_ms": None}
                                for inst in self.instances for end, npre, ntok, ndec, dur in inst.step_log),
                               key=lambda r: (r["t_s"], r["instance"]))
        res.summary = summarize(res.calls, res.programs, res.itl_values, res.itl_weights)
        return res


def simulate(programs: Iterable[ProgramSpec], deployment: Deployment, config: SimConfig,
             progress=None) -> SimResult:
    """Run one simulation: (trace, configuration, deployment, seed) -> results."""
    return Simulation(programs, deployment, config).run(progress)
