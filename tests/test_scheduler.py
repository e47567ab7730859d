"""vLLM v1 scheduler behaviour, with a Scheduler and KVCacheManager built directly and a fake
model output applied at each step end (as vLLM's own scheduler tests do)."""

from __future__ import annotations

import pytest

from simkit import ConstLatency, FakeProgram, make_req, make_scheduler, scheduled_ids, step
from simulator.config import PolicyConfig
from simulator.deployment import ResolvedEngine
from simulator.engine.instance import Instance
from simulator.engine.request import FINISHED, PREEMPTED, RUNNING, WAITING, Request
from simulator.events import EventLoop
from simulator.policies.retention import RETENTION
from simulator.policies.scheduling import SCHEDULERS


def test_token_budget_caps_a_step():
    """A step schedules at most max_num_batched_tokens tokens; the last prefill is chunked."""
    s = make_scheduler(max_num_batched_tokens=64)
    reqs = [make_req(i, 30) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    out = s.schedule(0.0)
    assert [n for _, n in out.scheduled] == [30, 30, 4]
    assert out.num_scheduled_tokens == 64


def test_chunked_prefill_splits_a_long_prompt():
    """A 100-token prompt with a 32-token budget runs as 32+32+32+4 and samples only at the end."""
    s = make_scheduler(max_num_batched_tokens=32)
    r = make_req(0, 100, max_tokens=3)
    s.add_request(r)
    chunks, outputs = [], []
    for _ in range(4):
        out = step(s)
        chunks.append(out.scheduled[0][1])
        outputs.append(r.num_output_tokens)
    assert chunks == [32, 32, 32, 4]
    assert outputs == [0, 0, 0, 1]


def test_long_prefill_token_threshold_caps_one_chunk():
    """long_prefill_token_threshold caps a request's prefill chunk below the budget."""
    s = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=16)
    r = make_req(0, 40)
    s.add_request(r)
    assert [step(s).scheduled[0][1] for _ in range(3)] == [16, 16, 8]


def test_running_prefill_chunk_is_served_before_waiting():
    """An unfinished prefill of a running request takes the budget before a waiting request."""
    s = make_scheduler(max_num_batched_tokens=32)
    a = make_req(0, 100)
    s.add_request(a)
    step(s)
    b = make_req(1, 8)
    s.add_request(b)
    out = step(s)
    assert scheduled_ids(out) == [0]
    assert b.status == WAITING and len(s.waiting) == 1


def test_running_decodes_come_first_and_waiting_gets_leftover_budget():
    """Decodes of running requests are scheduled first; a waiting prefill gets what is left."""
    s = make_scheduler(max_num_batched_tokens=10)
    a, b = make_req(0, 4, max_tokens=5), make_req(1, 4, max_tokens=5)
    s.add_request(a)
    s.add_request(b)
    step(s)
    c = make_req(2, 50)
    s.add_request(c)
    out = step(s)
    assert out.scheduled[:2] == [(a, 1), (b, 1)]
    assert out.scheduled[2] == (c, 8)


def test_max_num_seqs_caps_admission():
    """No more than max_num_seqs requests run at once; the rest wait in order."""
    s = make_scheduler(max_num_seqs=2)
    reqs = [make_req(i, 4) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    out = step(s)
    assert scheduled_ids(out) == [0, 1]
    assert [r.request_id for r in s.waiting] == [2]


def test_finished_request_frees_a_seat():
    """When a running request finishes, the next waiting one is admitted at the next step."""
    s = make_scheduler(max_num_seqs=1)
    a, b = make_req(0, 4, max_tokens=1), make_req(1, 4, max_tokens=1)
    s.add_request(a)
    s.add_request(b)
    step(s)
    assert a.status == FINISHED
    assert scheduled_ids(step(s)) == [1]


def _three_running_with_full_pool():
    """bs=4, 6 usable blocks: r0 (8 tokens) r1 (6) r2 (6) admitted in that order, pool full."""
    s = make_scheduler(num_blocks=7, block_size=4)
    reqs = [make_req(0, 8, max_tokens=10), make_req(1, 6, max_tokens=10), make_req(2, 6, max_tokens=10)]
    for r in reqs:
        s.add_request(r)
    out = step(s)
    assert scheduled_ids(out) == [0, 1, 2]
    assert s.kv.pool.num_free == 0
    return s, reqs


def test_preempts_most_recently_admitted():
    """When r0's decode needs a block and none is free, the tail of running (r2) is preempted."""
    s, (r0, r1, r2) = _three_running_with_full_pool()
    out = step(s)
    assert out.preempted == [r2]
    assert scheduled_ids(out) == [0, 1]
    assert [r.request_id for r in s.running] == [0, 1]


def test_preempted_request_recomputes_from_scratch():
    """Recompute preemption: num_computed_tokens back to 0, status PREEMPTED, counted once."""
    s, (_, _, r2) = _three_running_with_full_pool()
    step(s)
    assert r2.num_computed_tokens == 0
    assert r2.status == PREEMPTED
    assert r2.num_preemptions == 1
    assert s.num_preemptions == 1
    assert s.kv.num_blocks_of(r2) == 0


def test_preempted_request_goes_to_front_of_waiting():
    """The victim is prepended to waiting, ahead of requests that were already waiting."""
    s, (_, _, r2) = _three_running_with_full_pool()
    late = make_req(9, 1)
    s.add_request(late)
    step(s)
    assert [r.request_id for r in s.waiting] == [2, 9]


def test_step_that_preempts_admits_nothing():
    """A step that preempted admits no waiting request, even one that would fit."""
    s, _ = _three_running_with_full_pool()
    late = make_req(9, 1)
    s.add_request(late)
    out = step(s)
    assert s.kv.pool.num_free >= 1  # `late` (one block) would have fit
    assert 9 not in scheduled_ids(out)
    assert late.status == WAITING


def test_request_that_is_its_own_victim_stops_running_loop():
    """A lone running request that cannot grow preempts itself and nothing is scheduled."""
    s = make_scheduler(num_blocks=3, block_size=4)  # 2 usable blocks
    big = make_req(0, 8, max_tokens=5)
    s.add_request(big)
    step(s)
    out = step(s)
    assert out.preempted == [big] and out.scheduled == []
    assert big.num_computed_tokens == 0


def test_first_waiting_request_that_cannot_fit_stops_admission():
    """Admission stops at the first waiting request without blocks: no skipping ahead."""
    s = make_scheduler(num_blocks=5, block_size=4)  # 4 usable blocks
    holder = make_req(0, 8, max_tokens=50)
    s.add_request(holder)
    step(s)  # holder owns 2 blocks (3 after its next decode)
    big, small = make_req(1, 12), make_req(2, 2)
    s.add_request(big)
    s.add_request(small)
    out = step(s)
    assert scheduled_ids(out) == [0]
    assert [r.request_id for r in s.waiting] == [1, 2]
    assert s.kv.pool.num_free >= 1  # `small` would have fit


def test_decode_is_one_token_per_step():
    """After its prefill, a request is scheduled exactly one token per step and emits one token."""
    s = make_scheduler()
    r = make_req(0, 10, max_tokens=6)
    s.add_request(r)
    step(s)
    for k in range(2, 7):
        out = step(s)
        assert out.scheduled == [(r, 1)]
        assert r.num_output_tokens == k


def test_last_generated_token_kv_is_never_computed():
    """At finish, num_computed_tokens == prompt + output - 1."""
    s = make_scheduler(max_num_batched_tokens=16)
    r = make_req(0, 37, max_tokens=9)
    s.add_request(r)
    while r.status != FINISHED:
        step(s)
    assert r.num_output_tokens == 9
    assert r.num_computed_tokens == 37 + 9 - 1


def test_blocks_cover_exactly_the_computed_tokens():
    """A running request holds ceil(num_computed_tokens / block_size) blocks after each step."""
    s = make_scheduler(block_size=4, max_num_batched_tokens=7)
    r = make_req(0, 17, max_tokens=8)
    s.add_request(r)
    for _ in range(8):
        step(s)
        assert s.kv.num_blocks_of(r) == -(-r.num_computed_tokens // 4)


def test_preempted_request_is_readmitted_later():
    """A preempted request is readmitted once blocks free up, still counted as preempted once."""
    s, (r0, r1, r2) = _three_running_with_full_pool()
    step(s)  # preempts r2
    for _ in range(20):
        step(s)
        if r2.status == RUNNING:
            break
    assert r2.status == RUNNING
    assert r2.num_preemptions == 1


# --- priority scheduling (program-fcfs / plas share vLLM's priority queue) ------------------


def test_priority_victim_is_lowest_priority_not_the_tail():
    """Under a priority policy the victim is the largest priority value, even when it is not
    the tail of running; an already-scheduled victim is unscheduled and not advanced."""
    s = make_scheduler(num_blocks=5, block_size=4, policy="program-fcfs")  # 4 usable
    lo = make_req(0, 5, max_tokens=10, priority=5.0)
    s.add_request(lo)
    step(s)  # lo runs alone: 2 blocks
    hi = make_req(1, 8, max_tokens=10, priority=1.0)
    s.add_request(hi)
    step(s)  # hi admitted behind lo: pool full
    assert [r.request_id for r in s.running] == [0, 1] and s.kv.pool.num_free == 0
    out = s.schedule(0.0)  # hi's decode needs a third block
    assert out.preempted == [lo]
    assert out.scheduled == [(hi, 1)]
    assert out.num_scheduled_tokens == 1
    assert lo.num_computed_tokens == 0


def test_fcfs_victim_is_the_tail_in_the_same_situation():
    """The same batch under fcfs preempts the tail of running (the request that needs the block)."""
    s = make_scheduler(num_blocks=5, block_size=4, policy="fcfs")
    lo = make_req(0, 5, max_tokens=10)
    s.add_request(lo)
    step(s)
    hi = make_req(1, 8, max_tokens=10)
    s.add_request(hi)
    step(s)
    out = s.schedule(0.0)
    assert out.preempted == [hi]
    assert out.scheduled == [(lo, 1)]


def test_priority_waiting_queue_orders_by_priority_then_arrival():
    """program-fcfs admits the lowest priority value first, ties broken by arrival."""
    s = make_scheduler(max_num_seqs=1, policy="program-fcfs")
    a = make_req(0, 4, arrival=0.0, priority=2.0)
    b = make_req(1, 4, arrival=1.0, priority=1.0)
    c = make_req(2, 4, arrival=0.5, priority=1.0)
    for r in (a, b, c):
        s.add_request(r)
    assert scheduled_ids(s.schedule(0.0)) == [2]


def test_priority_preemption_does_not_skip_the_next_running_request():
    """After preempting an earlier-scheduled victim, every later running request is still scheduled."""
    s = make_scheduler(num_blocks=6, block_size=4, policy="program-fcfs")  # 5 usable
    lo = make_req(0, 5, max_tokens=10, priority=5.0)
    s.add_request(lo)
    step(s)  # lo alone: 2 blocks
    h1 = make_req(1, 8, max_tokens=10, priority=1.0)
    h2 = make_req(2, 4, max_tokens=10, priority=1.0)
    s.add_request(h1)
    s.add_request(h2)
    step(s)  # running [lo, h1, h2], pool full
    assert [r.request_id for r in s.running] == [0, 1, 2] and s.kv.pool.num_free == 0
    out = s.schedule(0.0)  # h1 needs a block: lo (already scheduled) is the victim
    assert out.preempted == [lo]
    assert scheduled_ids(out) == [1, 2]
    # The batch shape counts h1's and h2's decodes only (contexts 8 + 1 and 4 + 1).
    assert (out.num_decodes, out.decode_ctx_sum, out.decode_ctx_max) == (2, 9 + 5, 9)
    assert (out.num_scheduled_tokens, out.num_sampled, out.prefill_chunks) == (2, 2, [])
    assert (lo.num_computed_tokens, h1.num_computed_tokens, h2.num_computed_tokens) == (0, 9, 5)


# --- the real Instance on an event loop ----------------------------------------------------


def _instance(num_blocks=64, block_size=4, max_num_seqs=8, mnbt=16, step_s=0.01, latency=None):
    loop = EventLoop()
    eng = ResolvedEngine(block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=mnbt,
                         num_gpu_blocks=num_blocks, max_model_len=1 << 20, enable_prefix_caching=True,
                         enable_chunked_prefill=True, long_prefill_token_threshold=0, num_gpu_blocks_source="test")
    params = PolicyConfig()
    inst = Instance(0, loop, eng, latency or ConstLatency(step_s), SCHEDULERS.get("fcfs")(params),
                    RETENTION.get("lru")(params))
    return loop, inst


def _instance_req(rid, prompt, out):
    return Request(rid, prompt, out, 0.0, key_base=(rid + 1) << 32, program=FakeProgram())


def test_instance_emits_one_token_per_decode_step():
    """On an event loop: first token after the prefill steps, then one token per step."""
    loop, inst = _instance(mnbt=16)
    r = _instance_req(0, 40, 5)
    inst.add_request(r)
    loop.run()
    assert r.status == FINISHED
    assert r.first_token_time == pytest.approx(0.03)   # 16 + 16 + 8
    assert r.finish_time == pytest.approx(0.03 + 4 * 0.01)
    assert r.num_computed_tokens == 40 + 5 - 1


class _WakeLatency(ConstLatency):
    idle_start_s = 0.005


def test_only_a_step_that_wakes_an_engine_idle_long_enough_pays_the_wake_up():
    """idle_start_s lengthens the first step after the engine had no request for at least
    IDLE_WAKE_AFTER_S (and a fresh engine's first step), nothing else: not a step of a request
    that joins a running engine, not one after a shorter idle."""
    from simulator.events import PRIO_TIMER
    from simulator.latency.linear import IDLE_WAKE_AFTER_S

    loop, inst = _instance(mnbt=64, latency=_WakeLatency(0.01))
    a, b, c, d = (_instance_req(i, 8, 2) for i in range(4))
    inst.add_request(a)                                          # fresh engine: woken
    loop.schedule(0.012, PRIO_TIMER, inst.add_request, b)        # joins while a runs
    loop.run()
    assert a.first_token_time == pytest.approx(0.015)            # 0.005 wake + 0.01 prefill
    assert a.finish_time == pytest.approx(0.025)
    # b: prefilled beside a's decode, then one decode step; no wake-up for either
    assert b.first_token_time == pytest.approx(0.025) and b.finish_time == pytest.approx(0.035)
    idle_from = loop.now
    short = idle_from + 0.5 * IDLE_WAKE_AFTER_S
    loop.schedule(short, PRIO_TIMER, inst.add_request, c)
    loop.run()
    assert c.first_token_time == pytest.approx(short + 0.01)     # idle too short: no wake-up
    late = loop.now + 2 * IDLE_WAKE_AFTER_S
    loop.schedule(late, PRIO_TIMER, inst.add_request, d)
    loop.run()
    assert d.first_token_time == pytest.approx(late + 0.015)


def test_instance_frees_every_block_after_the_last_request():
    """After every request finished, the pool holds all blocks but the null block as free."""
    loop, inst = _instance(num_blocks=12, mnbt=16)
    reqs = [_instance_req(i, 10 + 3 * i, 4 + i) for i in range(5)]
    for r in reqs:
        inst.add_request(r)
    loop.run()
    assert all(r.status == FINISHED for r in reqs)
    pool = inst.kv.pool
    assert pool.num_free == 11
    assert pool.ref_cnt[0] == 1 and not any(pool.ref_cnt[1:])


def _prio_instance_req(rid, prompt, out, priority):
    r = _instance_req(rid, prompt, out)
    r.priority = priority
    return r


def test_step_emptied_by_self_preemption_is_followed_by_another_step():
    """A running request left unscheduled by a self-preempting earlier request still finishes."""
    loop = EventLoop()
    eng = ResolvedEngine(block_size=4, max_num_seqs=8, max_num_batched_tokens=64, num_gpu_blocks=3,
                         max_model_len=1 << 20, enable_prefix_caching=True, enable_chunked_prefill=True,
                         long_prefill_token_threshold=0, num_gpu_blocks_source="test")  # 2 usable blocks
    params = PolicyConfig()
    inst = Instance(0, loop, eng, ConstLatency(0.01), SCHEDULERS.get("program-fcfs")(params),
                    RETENTION.get("lru")(params))
    low = _prio_instance_req(0, 3, 4, priority=5.0)   # admitted first, lowest priority
    high = _prio_instance_req(1, 3, 3, priority=0.0)
    loop.schedule(0.0, 2, inst.add_request, low)
    loop.schedule(0.005, 2, inst.add_request, high)
    loop.run()
    # at 0.02 `low` needs a second block, none is free, and it is its own victim
    assert low.num_preemptions >= 1
    assert high.status == FINISHED and low.status == FINISHED
