#!/usr/bin/env python
"""Differential check of the simulator's scheduler against vLLM's real one, step by step.

Drives vLLM's own v1 `Scheduler` and KV cache manager (vllm/v1/core/sched/scheduler.py,
vllm/v1/core/kv_cache_manager.py: plain Python objects, no model, no worker, no server)
and the simulator's `Scheduler` over `KVCacheManager` (simulator/engine/) through the same
workload, one engine step at a time, and reports every difference.

    .venv-vllm/bin/python scripts/diff_vllm_scheduler.py --cases 40 --seed 0 [--hybrid]

Run it with the Python that has vLLM; it imports this repository from its own checkout.

Workloads (seeded): requests with prompt token ids built from named segments (a segment
name always yields the same tokens, so prompts that start with the same segment share a
prefix and hit the prefix cache; some prompts repeat an earlier one whole), fixed output
lengths (ignore_eos, max_tokens), arrival steps, small KV pools (preemption), small token
budgets (chunked prefill), max_num_seqs caps, sometimes a small max_model_len (length-capped
requests). `--hybrid`: tiny-gemma3's layout, two sliding-window KV groups and one
full-attention group (vLLM's grouping of its 4 sliding + 2 full layers), against the
simulator's KVCacheManager(window=, window_groups=2, full_groups=1).

Each step: requests arriving at the step are added to both; both schedule; the fake model
samples one token for every request whose computed tokens reached its token count (vLLM:
a ModelRunnerOutput into update_from_output; the simulator: what Instance._on_step_end
does), finished requests free their blocks. Compared every step:

- the scheduled requests and the tokens scheduled for each (vLLM: num_scheduled_tokens);
- the requests preempted (vLLM: preempted_req_ids);
- the prefix-cache hit of each request admitted (new or resumed): its computed tokens
  before its first chunk; and, at a request's first admission, vLLM's
  prefill_stats.num_local_cached_tokens against the simulator's num_cached_tokens;
- after the schedule and again after the step: the free block count (vLLM:
  block_pool.get_num_free_blocks(); simulator: pool.num_free; KV usage is 1 - free /
  (num_blocks - 1) on both) and each request's blocks (full-attention table;
  sliding-window blocks not behind the window, per group in vLLM);
- after the step: the requests finished, the running and waiting queues in order, each
  live request's num_computed_tokens.

Token ids and block identity: vLLM hashes the tokens (chained block hashes); the simulator
keys blocks. Each distinct token prefix ending on a full prompt block gets one key
(Request.hash_keys), so equal prefixes share keys; blocks holding sampled tokens take the
request's own keys (key_base + i), and the fake model samples token ids unique to the
request, so in vLLM too they match nothing but the request's own earlier blocks.

Nothing is tolerated: the simulator's documented sliding-window decode approximation
(a decode's window held at its largest extent) is gone since commit 4bf718a, and every
other difference is reported. Known differences (vLLM 0.32 is right in each), with the
vLLM-side knobs that switch D1-D3 off so the rest can still be compared:

- D1 admission: vLLM admits a waiting request only if its whole prompt fits in the free
  blocks (SchedulerConfig.scheduler_reserve_full_isl, default True: Scheduler.schedule ->
  KVCacheManager.allocate_slots(full_sequence_must_fit=True)); the simulator checks only
  the first chunk. Off: --no-reserve-full-isl (case field reserve_full_isl).
- D2 free order: vLLM's BlockPool.free_blocks puts freed blocks without a block hash at
  the head of the free queue (reused first) and only cached ones at the tail; the
  simulator appends all at the tail, so it evicts cached blocks sooner and hits less.
  Off: --free-order append (case field vllm_free_order).
- D3 lone request: vLLM's Scheduler.schedule applies long_prefill_token_threshold only
  when more than one request is running or waiting; the simulator always applies it.
  Off: --threshold-always (case field vllm_threshold_always).
- D4 sliding-window prefix caching: vLLM caches sliding-window blocks too; a hit needs
  them (HybridKVCacheCoordinator.find_longest_cache_hit, SlidingWindowManager) and shares
  them; the simulator's hit is the full-attention table's and takes fresh window blocks.
  Compare without it: --no-prefix-caching.
- D5 window shrink: the simulator's allocation check counts max(grow, 0) window blocks,
  not the net change; vLLM frees the blocks behind the window first
  (KVCacheManager.allocate_slots -> remove_skipped_blocks, then the free-block check), so
  it schedules a prefill chunk past the window where the simulator, with the pool full,
  preempts or refuses. --ample-pool avoids it.

`--async-scheduling`: vLLM's AsyncScheduler (vllm/v1/core/sched/async_scheduler.py) as
its engine core drives it with a batch queue of two (EngineCore.step_with_batch_queue): each
step schedules step t while step t-1 is still out, then takes step t-1's tokens back
(update_from_output), so the schedule of step t sees step t-1's tokens as placeholders; the
simulator's Scheduler(async_scheduling=True) and its update_from_output, in the same order.
Compared as above, with the blocks after the schedule taken before the update.

On the first difference of a case: the step, both sides' decisions and state, a one-line
description, and the case as JSON (rerun it with --case-json; --shrink first removes the
requests the difference does not need). Exit status 0 when every case agrees, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import types
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
warnings.filterwarnings("ignore")

from simulator.config import PolicyConfig  # noqa: E402
from simulator.engine.kv_cache_manager import KVCacheManager  # noqa: E402
from simulator.engine.request import FINISHED, Request as SimRequest  # noqa: E402
from simulator.engine.scheduler import Scheduler as SimScheduler  # noqa: E402
from simulator.policies.scheduling import SCHEDULERS  # noqa: E402

MODELS = REPO / "hardware" / "models"
WINDOW_GROUPS = 2  # tiny-gemma3: 4 sliding layers in groups of 2 (the full group's size)
MAX_STEPS = 20000
VOCAB = 30000
OUT_TOKEN_BASE = 1_000_000  # sampled token ids: OUT_TOKEN_BASE + rid * 10_000 + k, unique per request


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


@dataclass
class ReqSpec:
    rid: int
    segments: list  # [[name, length], ...]: the prompt's tokens, segment by segment
    max_tokens: int
    arrival: int  # step index at which the request is added (before that step's schedule)

    @property
    def prompt_len(self) -> int:
        return sum(n for _, n in self.segments)


@dataclass
class Case:
    name: str
    block_size: int
    num_blocks: int  # the pool, vLLM's null block included (both sides reserve block 0)
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int = 4096
    window: int = 0  # sliding window (tokens); 0: one full-attention group only
    chunked: bool = False  # `window` is Llama 4's attention chunk (chunked local attention), not a sliding window
    long_prefill_token_threshold: int = 0
    prefix_caching: bool = True  # enable_prefix_caching, both sides
    # vLLM-only knobs, each switching off one documented difference (module docstring):
    reserve_full_isl: bool = True  # scheduler_reserve_full_isl (a vLLM option; 0.32's default True)
    vllm_free_order: str = "vllm"  # "append": freed blocks all to the free queue's tail
    vllm_threshold_always: bool = False  # apply long_prefill_token_threshold with one request too
    async_scheduling: bool = False  # both sides: the async scheduler, steps overlapped by one
    requests: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "Case":
        d = json.loads(text)
        d["requests"] = [ReqSpec(**r) for r in d["requests"]]
        return Case(**d)


_SEG_CACHE: dict[str, list[int]] = {}


def segment_tokens(name: str, n: int) -> list[int]:
    """The first n tokens of segment `name` (always the same for the same name)."""
    toks = _SEG_CACHE.get(name)
    if toks is None or len(toks) < n:
        rnd = random.Random(f"segment:{name}")
        toks = [rnd.randrange(1, VOCAB) for _ in range(max(n, 64))]
        _SEG_CACHE[name] = toks
    return toks[:n]


def prompt_tokens(spec: ReqSpec) -> list[int]:
    out: list[int] = []
    for name, n in spec.segments:
        out.extend(segment_tokens(name, n))
    return out


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gen_case(rng: random.Random, name: str, hybrid: bool, long_prefill: bool = False,
             ample_pool: bool = False, chunked: bool = False, async_scheduling: bool = False) -> Case:
    bs = rng.choice([4, 8, 16])
    max_num_seqs = rng.choice([1, 2, 3, 4, 4, 6, 8, 16])
    budget = max(max_num_seqs, rng.choice([bs, 2 * bs, 3 * bs + 1, 24, 32, 48, 64, 100, 256]))
    window = 0
    if chunked:  # (vLLM's chunk is a multiple of the block size)
        window = bs * rng.choice([1, 2, 3, 4, 6])
    elif hybrid:
        window = rng.choice([bs + 1, 2 * bs, 2 * bs + 3, 3 * bs, 4 * bs - 1, 5 * bs])
    prefixes = [[f"{name}-p{k}", rng.randint(1, 6 * bs)] for k in range(rng.randint(1, 3))]
    reqs: list[ReqSpec] = []
    for rid in range(rng.randint(2, 10)):
        r = rng.random()
        if reqs and r < 0.15:
            segs = [list(s) for s in rng.choice(reqs).segments]  # the same prompt again
        elif r < 0.7:
            segs = [list(rng.choice(prefixes))]
            tail = rng.randint(0, 5 * bs)
            if tail:
                segs.append([f"{name}-u{rid}", tail])
        else:
            segs = [[f"{name}-u{rid}", rng.randint(1, 8 * bs)]]
        max_tokens = rng.choice([1, 2, rng.randint(1, 3 * bs), rng.randint(bs, 6 * bs)])
        arrival = 0 if rng.random() < 0.4 else rng.randint(0, 40)
        reqs.append(ReqSpec(rid, segs, max_tokens, arrival))
    max_model_len = 4096
    if rng.random() < 0.15:  # some requests reach max_model_len before max_tokens
        max_model_len = max(r.prompt_len for r in reqs) + rng.randint(1, 2 * bs)
    # A pool where the largest request fits alone, up to one where all fit at once (a
    # window holds up to the tokens in flight more: two steps' with async scheduling).
    in_flight = budget * (2 if async_scheduling else 1)
    needs = []
    for r in reqs:
        total = min(r.prompt_len + r.max_tokens, max_model_len)
        need = cdiv(total, bs)
        if window and chunked:
            need += WINDOW_GROUPS * min(cdiv(total, bs), cdiv(window + in_flight, bs))
        elif window:
            need += WINDOW_GROUPS * min(cdiv(total, bs), cdiv(window - 1 + in_flight, bs) + 1)
        needs.append(need)
    lo, hi = max(needs) + 1, sum(needs) + 1
    num_blocks = rng.choice([lo, lo + rng.randint(0, 3), rng.randint(lo, max(lo, hi)), hi + 10])
    if ample_pool:
        num_blocks = hi + 10  # every request fits at once: no allocation ever fails
    thr = 0
    if long_prefill and rng.random() < 0.5:
        thr = rng.choice([bs, 2 * bs, bs + 3])
    return Case(name=name, block_size=bs, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=budget, max_model_len=max_model_len, window=window, chunked=chunked,
                long_prefill_token_threshold=thr, async_scheduling=async_scheduling, requests=reqs)


# ---------------------------------------------------------------------------------------------
# vLLM side
# ---------------------------------------------------------------------------------------------


class _Vllm:
    """The vLLM modules, imported once (slow: ~6 s)."""

    def __init__(self):
        import torch
        from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
        from vllm.sampling_params import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import (ChunkedLocalAttentionSpec, FullAttentionSpec, KVCacheConfig,
                                                KVCacheGroupSpec, SlidingWindowSpec)
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request
        from vllm.v1.structured_output import StructuredOutputManager
        import vllm

        logging.getLogger("vllm").setLevel(logging.ERROR)
        self.version = vllm.__version__
        self.torch = torch
        self.SchedulerConfig = SchedulerConfig
        self.SamplingParams = SamplingParams
        self.Scheduler = Scheduler
        self.AsyncScheduler = AsyncScheduler
        self.FullAttentionSpec, self.SlidingWindowSpec = FullAttentionSpec, SlidingWindowSpec
        self.ChunkedLocalAttentionSpec = ChunkedLocalAttentionSpec
        self.KVCacheConfig, self.KVCacheGroupSpec = KVCacheConfig, KVCacheGroupSpec
        self.ModelRunnerOutput = ModelRunnerOutput
        self.Request = Request
        self.StructuredOutputManager = StructuredOutputManager
        init_none_hash(sha256)  # what EngineCore does with prefix caching on
        self._hashers: dict[int, object] = {}
        self._hash_fn = sha256
        self._get_hasher = get_request_block_hasher
        self._configs: dict[str, object] = {}
        self._ModelConfig, self._CacheConfig, self._VllmConfig = ModelConfig, CacheConfig, VllmConfig

    def hasher(self, block_size: int):
        h = self._hashers.get(block_size)
        if h is None:
            h = self._hashers[block_size] = self._get_hasher(block_size, self._hash_fn)
        return h

    def vllm_config(self, model: str):
        """One VllmConfig per model (building one costs ~0.2 s); its scheduler config and
        the per-case fields are replaced per case."""
        vc = self._configs.get(model)
        if vc is None:
            mc = self._ModelConfig(model=str(MODELS / model), skip_tokenizer_init=True, max_model_len=4096,
                                   dtype="bfloat16")
            cc = self._CacheConfig(block_size=16, enable_prefix_caching=True)
            sc = self.SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=4096,
                                      enable_chunked_prefill=True, is_encoder_decoder=False)
            vc = self._configs[model] = self._VllmConfig(model_config=mc, cache_config=cc, scheduler_config=sc)
        return vc


def _free_blocks_all_to_tail(pool, ordered_blocks) -> None:
    """vLLM's BlockPool.free_blocks without its 0.32 rule that puts freed blocks without a
    block hash at the head of the free queue: every block whose reference count drops to 0
    goes to the tail, in the order given, cached or not (the simulator's BlockPool).
    Installed on one case's pool by the case field vllm_free_order="append"."""
    blocks = []
    for block in ordered_blocks:
        block.ref_cnt -= 1
        if block.ref_cnt == 0 and not block.is_null:
            blocks.append(block)
    pool.free_block_queue.append_n(blocks)


def _counts_one_more_waiting(sched) -> tuple[int, int]:
    """Scheduler.get_request_counts plus one waiting request. schedule() reads these counts
    only to drop long_prefill_token_threshold when running + waiting <= 1 (and for DP prefill
    balancing, off here): installed by the case field vllm_threshold_always, it makes vLLM
    apply the threshold always, as the simulator does."""
    running, waiting = type(sched).get_request_counts(sched)
    return running, waiting + 1


class VllmSide:
    def __init__(self, v: _Vllm, case: Case):
        self.v = v
        self.case = case
        bs = case.block_size
        vc = v.vllm_config("tiny-gemma3" if case.window else "tiny-llama")
        vc.scheduler_config = v.SchedulerConfig(
            max_num_seqs=case.max_num_seqs, max_num_batched_tokens=case.max_num_batched_tokens,
            max_model_len=case.max_model_len, enable_chunked_prefill=True, is_encoder_decoder=False,
            long_prefill_token_threshold=case.long_prefill_token_threshold,
            scheduler_reserve_full_isl=case.reserve_full_isl, async_scheduling=case.async_scheduling)
        vc.model_config.max_model_len = case.max_model_len
        vc.cache_config.block_size = bs
        vc.cache_config.num_gpu_blocks = case.num_blocks
        vc.cache_config.enable_prefix_caching = case.prefix_caching
        bf16 = v.torch.bfloat16
        if case.window:
            # vLLM's grouping of tiny-gemma3 (layers s s f s s f): sliding (0,1), sliding
            # (3,4), full (2,5), in that order (_get_kv_cache_groups_uniform_page_size).
            if case.chunked:  # the same layout with Llama 4's chunked local attention
                sw = v.ChunkedLocalAttentionSpec(block_size=bs, num_kv_heads=2, head_size=64, dtype=bf16,
                                                 attention_chunk_size=case.window)
            else:
                sw = v.SlidingWindowSpec(block_size=bs, num_kv_heads=2, head_size=64, dtype=bf16,
                                         sliding_window=case.window)
            full = v.FullAttentionSpec(block_size=bs, num_kv_heads=2, head_size=64, dtype=bf16)
            groups = [v.KVCacheGroupSpec(["layers.0", "layers.1"], sw),
                      v.KVCacheGroupSpec(["layers.3", "layers.4"], sw),
                      v.KVCacheGroupSpec(["layers.2", "layers.5"], full)]
        else:
            full = v.FullAttentionSpec(block_size=bs, num_kv_heads=4, head_size=64, dtype=bf16)
            groups = [v.KVCacheGroupSpec([f"layers.{i}" for i in range(4)], full)]
        kvc = v.KVCacheConfig(num_blocks=case.num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)
        cls = v.AsyncScheduler if case.async_scheduling else v.Scheduler
        self.sched = cls(vllm_config=vc, kv_cache_config=kvc,
                                 structured_output_manager=v.StructuredOutputManager(vc),
                                 block_size=bs, log_stats=False)
        self.kvm = self.sched.kv_cache_manager
        self.pool = self.kvm.block_pool
        if case.vllm_free_order == "append":
            self.pool.free_blocks = types.MethodType(_free_blocks_all_to_tail, self.pool)
        if case.vllm_threshold_always:
            self.sched.get_request_counts = types.MethodType(_counts_one_more_waiting, self.sched)
        mgrs = self.kvm.coordinator.single_type_managers
        local = (v.SlidingWindowSpec, v.ChunkedLocalAttentionSpec)
        self.full_mgrs = [m for m in mgrs if isinstance(m.kv_cache_spec, v.FullAttentionSpec)
                          and not isinstance(m.kv_cache_spec, local)]
        self.sw_mgrs = [m for m in mgrs if isinstance(m.kv_cache_spec, local)]
        self.reqs: dict[int, object] = {}
        self.next_token: dict[int, int] = {}
        self.in_flight = None  # async: (scheduler output, ids that sample) of the step still out

    def add(self, spec: ReqSpec) -> None:
        v = self.v
        sp = v.SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True, temperature=0.0)
        req = v.Request(str(spec.rid), prompt_tokens(spec), sp, None, arrival_time=float(spec.arrival),
                        block_hasher=v.hasher(self.case.block_size))
        self.reqs[spec.rid] = req
        self.next_token[spec.rid] = 0
        self.sched.add_request(req)

    def has_unfinished(self) -> bool:
        return bool(self.sched.running) or bool(self.sched.waiting) or bool(self.sched.kv_holding_waiting)

    def step(self) -> dict:
        s = self.sched
        before = {r.request_id for r in s.running}
        so = s.schedule()
        d = {"scheduled": {int(k): n for k, n in so.num_scheduled_tokens.items()},
             "preempted": sorted(int(k) for k in (so.preempted_req_ids or ())),
             "free_after_schedule": self.pool.get_num_free_blocks(),
             "blocks_after_schedule": self.blocks()}
        admitted, first = {}, {}
        for k, n in so.num_scheduled_tokens.items():
            if k in before:
                continue
            req = self.reqs[int(k)]
            admitted[int(k)] = req.num_computed_tokens - n
            if req.num_preemptions == 0 and req.prefill_stats is not None:
                first[int(k)] = req.prefill_stats.num_local_cached_tokens
        d["admitted_hit"] = admitted
        d["first_cached"] = first
        # The fake model: one sampled token per request whose computed tokens reached its
        # token count (a prefill chunk short of the end samples nothing).
        ids = list(so.num_scheduled_tokens)
        if not self.case.async_scheduling:
            samples = {k for k in ids if s.requests[k].num_computed_tokens >= s.requests[k].num_tokens}
            d["finished"] = self._return(so, ids, samples)
            return d
        # Async: step t-1's tokens come back after step t is scheduled (whether a request
        # samples was fixed when its step was scheduled: its last prefill chunk, or a decode).
        samples = {k for k in ids if not s.requests[k].is_prefill_chunk}
        prev, self.in_flight = self.in_flight, (so, ids, samples)
        d["finished"] = self._return(*prev) if prev is not None else []
        return d

    def _return(self, so, ids, samples) -> list[int]:
        """update_from_output with one token for each request in `samples`; the finished."""
        sampled = []
        for k in ids:
            if k in samples:
                rid = int(k)
                sampled.append([OUT_TOKEN_BASE + rid * 10_000 + self.next_token[rid]])
                self.next_token[rid] += 1
            else:
                sampled.append([])
        mro = self.v.ModelRunnerOutput(req_ids=ids, req_id_to_index={k: i for i, k in enumerate(ids)},
                                       sampled_token_ids=sampled)
        self.sched.update_from_output(so, mro)
        return sorted(rid for rid in (int(k) for k in ids) if self.reqs[rid].is_finished())

    def blocks(self) -> dict:
        """Each request's blocks: (full-attention table, [sliding-window blocks not behind
        the window, per group])."""
        blocks = {}
        for m in self.full_mgrs + self.sw_mgrs:
            for rid in m.req_to_blocks:
                if rid not in blocks:
                    full = sum(len(f.req_to_blocks.get(rid, ())) for f in self.full_mgrs)
                    win = [sum(1 for b in w.req_to_blocks.get(rid, ()) if not b.is_null) for w in self.sw_mgrs]
                    blocks[rid] = (full, win)
        return {int(rid): v for rid, v in blocks.items() if v[0] or any(v[1])}

    def state(self) -> dict:
        s = self.sched
        live = [r for r in list(s.running) + list(s.waiting) + list(s.kv_holding_waiting)]
        blocks = self.blocks()
        return {"free": self.pool.get_num_free_blocks(),
                "usage": round(self.kvm.usage, 9),
                "running": [int(r.request_id) for r in s.running],
                "waiting": [int(r.request_id) for r in list(s.kv_holding_waiting) + list(s.waiting)],
                "computed": {int(r.request_id): r.num_computed_tokens for r in live},
                "blocks": blocks}


# ---------------------------------------------------------------------------------------------
# Simulator side
# ---------------------------------------------------------------------------------------------


class SimSide:
    def __init__(self, case: Case):
        self.case = case
        bs = case.block_size
        # the simulator's switches for the behaviours vLLM changed after 0.19, set as this
        # case runs vLLM (its defaults, or patched back with the D1-D3 knobs)
        newer_free = case.vllm_free_order == "vllm"
        in_flight = case.max_num_batched_tokens * (2 if case.async_scheduling else 1)  # (max_in_flight_tokens)
        if case.window:
            kv = KVCacheManager(case.num_blocks, bs, enable_caching=case.prefix_caching,
                                max_model_len=case.max_model_len, window=0 if case.chunked else case.window,
                                chunk=case.window if case.chunked else 0,
                                window_groups=WINDOW_GROUPS, full_groups=1,
                                max_in_flight=in_flight, free_uncached_first=newer_free)
        else:
            kv = KVCacheManager(case.num_blocks, bs, enable_caching=case.prefix_caching,
                                max_model_len=case.max_model_len, max_in_flight=in_flight,
                                free_uncached_first=newer_free)
        self.kv = kv
        policy = SCHEDULERS.get("fcfs")(PolicyConfig())
        self.sched = SimScheduler(kv, case.max_num_seqs, case.max_num_batched_tokens, policy,
                                  long_prefill_token_threshold=case.long_prefill_token_threshold,
                                  max_model_len=case.max_model_len, reserve_full_isl=case.reserve_full_isl,
                                  lone_request_full_budget=not case.vllm_threshold_always,
                                  async_scheduling=case.async_scheduling)
        self.in_flight = None  # async: the step still out
        self.reqs: dict[int, SimRequest] = {}
        self.keys: dict[tuple, int] = {}  # (parent key, block tokens) -> key: one per distinct prefix

    def _hash_keys(self, tokens: list[int]) -> list[int]:
        bs = self.case.block_size
        keys, parent = [], 0
        for i in range(len(tokens) // bs):
            k = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
            key = self.keys.get(k)
            if key is None:
                key = self.keys[k] = len(self.keys) + 1
            keys.append(key)
            parent = key
        return keys

    def add(self, spec: ReqSpec) -> None:
        tokens = prompt_tokens(spec)
        req = SimRequest(spec.rid, len(tokens), spec.max_tokens, float(spec.arrival),
                         key_base=(spec.rid + 1) << 32, hash_keys=self._hash_keys(tokens))
        self.reqs[spec.rid] = req
        self.sched.add_request(req)

    def has_unfinished(self) -> bool:
        return self.sched.has_unfinished()

    def step(self, now: float) -> dict:
        s = self.sched
        before = {r.request_id for r in s.running}
        out = s.schedule(now)
        d = {"scheduled": {r.request_id: n for r, n in out.scheduled},
             "preempted": sorted(r.request_id for r in out.preempted),
             "free_after_schedule": self.kv.pool.num_free,
             "blocks_after_schedule": self.blocks()}
        admitted, first = {}, {}
        for r, n in out.scheduled:
            if r.request_id in before:
                continue
            admitted[r.request_id] = r.num_computed_tokens - n
            if r.num_preemptions == 0:
                first[r.request_id] = r.num_cached_tokens
        d["admitted_hit"] = admitted
        d["first_cached"] = first
        if self.case.async_scheduling:
            # Instance._emit_async: step t-1's tokens (Scheduler.update_from_output)
            prev, self.in_flight = self.in_flight, out
            finished = s.update_from_output(prev) if prev is not None else []
        else:
            # Instance._on_step_end: the output token of each request that reached its end
            finished = []
            max_len = self.case.max_model_len
            for r, _n in out.scheduled:
                if r.num_computed_tokens < r.num_tokens:
                    continue
                r.num_output_tokens += 1
                if r.num_output_tokens >= r.max_tokens or r.num_tokens >= max_len:
                    finished.append(r)
        for r in finished:  # then the finished requests leave
            s.finish(r)
            r.status = FINISHED
            self.kv.free(r)
        d["finished"] = sorted(r.request_id for r in finished)
        return d

    def blocks(self) -> dict:
        """Each request's blocks: (table, window blocks of all groups)."""
        kv = self.kv
        out = {}
        for rid in set(kv.req_to_blocks) | (set(kv.req_to_window) if kv.local else set()):
            full = len(kv.req_to_blocks[rid]) if rid in kv.req_to_blocks else 0
            win = len(kv.req_to_window.get(rid, ())) if kv.local else 0
            if full or win:
                out[rid] = (full, win)
        return out

    def state(self) -> dict:
        s = self.sched
        live = list(s.running) + list(s.kv_holding) + list(s.waiting)
        kv = self.kv
        blocks = self.blocks()
        return {"free": kv.pool.num_free,
                "usage": round(kv.usage(), 9),
                "running": [r.request_id for r in s.running],
                "waiting": [r.request_id for r in list(s.kv_holding) + list(s.waiting)],
                "computed": {r.request_id: r.num_computed_tokens for r in live},
                "blocks": blocks}


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    case: Case
    steps: int = 0
    diff: str | None = None  # one line
    detail: str = ""  # both sides' decisions and state at the first difference
    step: int = -1
    kind: str = ""


def block_diffs(vblocks: dict, mblocks: dict, window: bool) -> list[str]:
    """Per-request block differences: vLLM's (full, [window per group]) against the
    simulator's (table, window blocks of all groups; one full-attention group here)."""
    bad = []
    for rid in sorted(set(vblocks) | set(mblocks)):
        vfull, vwin = vblocks.get(rid, (0, [0] * (WINDOW_GROUPS if window else 0)))
        mfull, mwin = mblocks.get(rid, (0, 0))
        if vfull != mfull:
            bad.append(f"req {rid}: full-attention blocks vLLM {vfull}, sim {mfull}")
        elif sum(vwin) != mwin:
            bad.append(f"req {rid}: sliding-window blocks vLLM {vwin} (per group), sim {mwin} (all groups)")
    return bad


def fmt_decisions(label: str, d: dict, st: dict) -> str:
    sched = " ".join(f"{k}:{n}" for k, n in sorted(d["scheduled"].items())) or "-"
    return (f"  {label:5s} scheduled {{{sched}}} preempted {d['preempted']} admitted(hit) "
            f"{dict(sorted(d['admitted_hit'].items()))} first-cached {dict(sorted(d['first_cached'].items()))} "
            f"finished {d['finished']}\n"
            f"        free after schedule {d['free_after_schedule']}, after step {st['free']} "
            f"(usage {st['usage']:.4f}); running {st['running']} waiting {st['waiting']}\n"
            f"        computed {dict(sorted(st['computed'].items()))}\n"
            f"        blocks (full, window) after schedule {dict(sorted(d['blocks_after_schedule'].items()))}, "
            f"after step {dict(sorted(st['blocks'].items()))}")


def compare_step(case: Case, vd: dict, md: dict, vs: dict, ms: dict) -> tuple[str | None, str]:
    """(description of the first difference or None, its kind)."""
    if vd["scheduled"] != md["scheduled"]:
        ks = sorted(set(vd["scheduled"]) | set(md["scheduled"]))
        diffs = [f"req {k}: vLLM {vd['scheduled'].get(k, 0)}, sim {md['scheduled'].get(k, 0)}"
                 for k in ks if vd["scheduled"].get(k) != md["scheduled"].get(k)]
        return "scheduled tokens differ: " + "; ".join(diffs), "scheduled"
    if vd["preempted"] != md["preempted"]:
        return f"preempted differ: vLLM {vd['preempted']}, sim {md['preempted']}", "preempted"
    if vd["admitted_hit"] != md["admitted_hit"]:
        return (f"prefix-cache hit of admitted requests differs: vLLM {vd['admitted_hit']}, "
                f"sim {md['admitted_hit']}"), "hit"
    if vd["first_cached"] != md["first_cached"]:
        return (f"cached tokens at first admission differ: vLLM prefill_stats {vd['first_cached']}, "
                f"sim num_cached_tokens {md['first_cached']}"), "hit"
    if vd["finished"] != md["finished"]:
        return f"finished differ: vLLM {vd['finished']}, sim {md['finished']}", "finished"
    if vs["running"] != ms["running"] or vs["waiting"] != ms["waiting"]:
        return (f"queues differ: vLLM running {vs['running']} waiting {vs['waiting']}, "
                f"sim running {ms['running']} waiting {ms['waiting']}"), "queues"
    if vs["computed"] != ms["computed"]:
        ks = sorted(set(vs["computed"]) | set(ms["computed"]))
        diffs = [f"req {k}: vLLM {vs['computed'].get(k)}, sim {ms['computed'].get(k)}"
                 for k in ks if vs["computed"].get(k) != ms["computed"].get(k)]
        return "num_computed_tokens differ: " + "; ".join(diffs), "computed"
    for when, (vb, vf), (mb, mf) in (
            ("after schedule", (vd["blocks_after_schedule"], vd["free_after_schedule"]),
             (md["blocks_after_schedule"], md["free_after_schedule"])),
            ("after the step", (vs["blocks"], vs["free"]), (ms["blocks"], ms["free"]))):
        bad = block_diffs(vb, mb, bool(case.window))
        if bad:
            return f"per-request blocks {when} differ: " + "; ".join(bad), "blocks"
        if vf != mf:
            return (f"free blocks {when} differ: vLLM {vf}, sim {mf}; per-request blocks agree, "
                    f"so blocks are shared"), "free"
    return None, ""


def run_case(v: _Vllm, case: Case, verbose: bool = False) -> Result:
    res = Result(case)
    vl, sim = VllmSide(v, case), SimSide(case)
    pending = sorted(case.requests, key=lambda r: (r.arrival, r.rid))
    t = 0
    idle = 0
    while t < MAX_STEPS:
        if not vl.has_unfinished() and not sim.has_unfinished():
            if not pending:
                break
            t = max(t, pending[0].arrival)  # nothing to run until the next arrival
        while pending and pending[0].arrival <= t:
            spec = pending.pop(0)
            vl.add(spec)
            sim.add(spec)
        vd = vl.step()
        md = sim.step(float(t))
        vs, ms = vl.state(), sim.state()
        res.steps += 1
        diff, kind = compare_step(case, vd, md, vs, ms)
        if verbose:
            sched = " ".join(f"{k}:{n}" for k, n in sorted(vd["scheduled"].items()))
            print(f"    step {t:4d}: {sched or '-'} preempted {vd['preempted']} free vLLM {vs['free']} "
                  f"sim {ms['free']}{'  <-- ' + diff if diff else ''}")
        if diff:
            res.diff, res.kind, res.step = diff, kind, t
            res.detail = fmt_decisions("vLLM", vd, vs) + "\n" + fmt_decisions("sim", md, ms)
            return res
        if not vd["scheduled"] and not md["scheduled"] and not pending:
            idle += 1
            if idle > 2:
                res.diff, res.kind, res.step = "both sides stuck: unfinished requests, nothing scheduled", "stuck", t
                return res
        else:
            idle = 0
        t += 1
    if vl.has_unfinished() or sim.has_unfinished():
        res.diff, res.kind, res.step = f"not finished after {MAX_STEPS} steps", "stuck", t
    return res


def shrink(v: _Vllm, case: Case, kind: str) -> Case:
    """Remove requests (then trim outputs) while a difference of the same kind remains."""
    changed = True
    while changed:
        changed = False
        for i in range(len(case.requests)):
            if len(case.requests) <= 1:
                break
            trial = replace(case, requests=case.requests[:i] + case.requests[i + 1:])
            r = run_case(v, trial)
            if r.diff and r.kind == kind:
                case, changed = trial, True
                break
    for i in range(len(case.requests)):
        while case.requests[i].max_tokens > 1:
            reqs = list(case.requests)
            reqs[i] = replace(reqs[i], max_tokens=max(1, reqs[i].max_tokens // 2))
            trial = replace(case, requests=reqs)
            r = run_case(v, trial)
            if r.diff and r.kind == kind:
                case = trial
            else:
                break
    return case


def describe(case: Case) -> str:
    layout = (f"hybrid, window {case.window} ({WINDOW_GROUPS} sliding-window groups + 1 full)" if case.window
              else "full attention")
    knobs = [f"long_prefill_token_threshold {case.long_prefill_token_threshold}"
             if case.long_prefill_token_threshold else "",
             "" if case.prefix_caching else "prefix caching off",
             "" if case.reserve_full_isl else "vLLM scheduler_reserve_full_isl=False",
             "" if case.vllm_free_order == "vllm" else "vLLM freeing every block to the queue tail",
             "vLLM applying the threshold always" if case.vllm_threshold_always else "",
             "async scheduling" if case.async_scheduling else ""]
    head = (f"block_size {case.block_size}, {case.num_blocks} blocks (null block included), max_num_seqs "
            f"{case.max_num_seqs}, max_num_batched_tokens {case.max_num_batched_tokens}, max_model_len "
            f"{case.max_model_len}, {layout}" + "".join(", " + k for k in knobs if k))
    lines = [head]
    for r in case.requests:
        segs = " + ".join(f"{n}x{name}" for name, n in r.segments)
        lines.append(f"    req {r.rid}: prompt {r.prompt_len} ({segs}), max_tokens {r.max_tokens}, "
                     f"arrives at step {r.arrival}")
    return "\n".join(lines)


def load_cases(arg: str) -> list[Case]:
    """--case-json: a file or inline JSON, one case object or a list of them."""
    text = Path(arg).read_text() if not arg.lstrip().startswith(("{", "[")) else arg
    d = json.loads(text)
    return [Case.from_json(json.dumps(c)) for c in (d if isinstance(d, list) else [d])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=None,
                    help="random cases to run (default 40, or 0 when --case-json is given)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the workload generator")
    ap.add_argument("--chunked", action="store_true",
                    help="with --hybrid: the local groups use Llama 4's chunked local attention "
                         "(attention_chunk_size = the case's window) instead of a sliding window")
    ap.add_argument("--hybrid", action="store_true",
                    help="sliding-window model: tiny-gemma3's 2 sliding-window groups + 1 full-attention group")
    ap.add_argument("--long-prefill", action="store_true",
                    help="set long_prefill_token_threshold in about half the cases")
    ap.add_argument("--ample-pool", action="store_true",
                    help="pools where every request fits at once (no preemption, no refused allocation)")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="both sides: async scheduling (vLLM's AsyncScheduler, a batch queue of two)")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="prefix caching off on both sides (enable_prefix_caching=False)")
    g = ap.add_argument_group("switching off a documented difference on the vLLM side (random cases only)")
    g.add_argument("--no-reserve-full-isl", action="store_true",
                   help="D1: vLLM with scheduler_reserve_full_isl=False (0.32's default is True)")
    g.add_argument("--free-order", choices=("vllm", "append"), default="vllm",
                   help="D2: append = every block vLLM frees goes to the free queue's tail, as in the simulator")
    g.add_argument("--threshold-always", action="store_true",
                   help="D3: vLLM applies long_prefill_token_threshold even to a lone request")
    ap.add_argument("--case-json", action="append", default=[],
                    help="also run these cases: a file or inline JSON (one case or a list), as a "
                         "difference report prints them; their vLLM knobs are their own")
    ap.add_argument("--shrink", action="store_true", help="shrink each differing case before reporting it")
    ap.add_argument("--json-out", help="write one result per case here (name, agree, steps, step, kind, diff)")
    ap.add_argument("--verbose", action="store_true", help="print every step")
    args = ap.parse_args(argv)

    v = _Vllm()
    rng = random.Random(args.seed)
    n_random = args.cases if args.cases is not None else (0 if args.case_json else 40)
    cases = [gen_case(rng, f"s{args.seed}{'h' if args.hybrid else ''}{'k' if args.chunked else ''}c{i}",
                      args.hybrid or args.chunked, args.long_prefill,
                      args.ample_pool, args.chunked, args.async_scheduling) for i in range(n_random)]
    cases = [replace(c, prefix_caching=not args.no_prefix_caching, reserve_full_isl=not args.no_reserve_full_isl,
                     async_scheduling=args.async_scheduling,
                     vllm_free_order=args.free_order, vllm_threshold_always=args.threshold_always) for c in cases]
    for arg in args.case_json:
        cases.extend(load_cases(arg))

    knobs = [", hybrid sliding window" if args.hybrid else ", hybrid chunked local attention" if args.chunked else "",
             ", long_prefill_token_threshold in some" if args.long_prefill else "",
             ", ample pools" if args.ample_pool else "",
             ", async scheduling" if args.async_scheduling else "",
             ", prefix caching off" if args.no_prefix_caching else "",
             "; vLLM: scheduler_reserve_full_isl=False (D1 off)" if args.no_reserve_full_isl else "",
             "; vLLM: freed blocks all to the tail (D2 off)" if args.free_order == "append" else "",
             "; vLLM: threshold applied always (D3 off)" if args.threshold_always else ""]
    print(f"vLLM {v.version} scheduler vs agentservesim scheduler: {n_random} random case(s), seed {args.seed}"
          + "".join(knobs) + (f"; {len(cases) - n_random} given case(s)" if len(cases) > n_random else ""))
    n_bad = total_steps = 0
    kinds: dict[str, int] = {}
    results = []
    for case in cases:
        res = run_case(v, case, args.verbose)
        total_steps += res.steps
        results.append({"name": case.name, "agree": res.diff is None, "steps": res.steps, "step": res.step,
                        "kind": res.kind, "diff": res.diff})
        if res.diff is None:
            print(f"  {case.name}: agree over {res.steps} steps ({len(case.requests)} requests)")
            continue
        n_bad += 1
        kinds[res.kind] = kinds.get(res.kind, 0) + 1
        if args.shrink:
            small = shrink(v, case, res.kind)
            if small is not case:
                res = run_case(v, small)
                case = small
        print(f"  {case.name}: DIFFER at step {res.step} ({res.kind}): {res.diff}")
        print("  case: " + describe(case))
        if res.detail:
            print(res.detail)
        print("  case JSON: " + case.to_json())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"summary: {len(cases) - n_bad}/{len(cases)} cases agree, {total_steps} steps compared"
          + (f"; differences by kind: {kinds}" if kinds else ""))
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
