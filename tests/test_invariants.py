"""Property tests over random small workloads: every call completes exactly once, and no KV
block is ever lost or double-owned (checked at every engine step and at the end)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simkit import ConstLatency, call, make_deployment, program, run_sim, sim_config
from simulator.cluster import Simulation
from simulator.engine.request import PREEMPTED, RUNNING, WAITING_FOR_REMOTE_KVS
from simulator.latency import LinearStepModel

BS = 16


def check_blocks(inst) -> None:
    """Every usable block is free (ref 0, in the queue once) or held: its ref count equals
    the number of request block tables and pins that hold it."""
    kv = inst.kv
    pool = kv.pool
    n = pool.num_gpu_blocks
    queue = pool.free_queue()
    assert len(queue) == pool.num_free == len(set(queue)), "free queue length or duplicates"
    assert 0 not in queue and pool.ref_cnt[0] == 1, "null block allocated"
    assert all(pool.ref_cnt[b] == 0 for b in queue), "a free block has references"
    held = Counter(b for blocks in kv.req_to_blocks.values() for b in blocks)
    held.update(int(b) for state in kv.req_to_state.values() for b in state)  # hybrid models' state blocks
    held.update(b for win in kv.req_to_window.values() for b in win)  # sliding-window blocks
    assert set(kv.req_to_window) <= set(kv.req_to_blocks), "window blocks of a request without a block table"
    assert set(kv.req_to_state) <= set(kv.req_to_blocks), "state blocks of a request without a block table"
    assert all(len(st) == kv.state_blocks for st in kv.req_to_state.values())
    assert 0 not in held
    in_use = sum(1 for b in range(1, n) if pool.ref_cnt[b] > 0)
    assert in_use + pool.num_free == n - 1, "a block is neither free nor referenced"
    for b, c in held.items():
        assert pool.ref_cnt[b] >= c, f"block {b} held {c} times with ref_cnt {pool.ref_cnt[b]}"
    assert sum(pool.ref_cnt[1:]) == sum(held.values()) + inst.num_pinned_blocks, "refs != holders + pins"
    sched = inst.scheduler
    for r in sched.running:
        assert r.status == RUNNING
        assert kv.num_blocks_of(r) == -(-r.num_computed_tokens // kv.block_size), "blocks != computed tokens"
    for r in sched.waiting:
        if r.status == PREEMPTED:
            assert kv.num_blocks_of(r) == 0 and r.num_computed_tokens == 0
    holders = {r.request_id for r in sched.running}
    holders |= {r.request_id for r in sched.waiting if r.status == WAITING_FOR_REMOTE_KVS or r.num_computed_tokens}
    assert set(kv.req_to_blocks) <= holders, "blocks held by a request that is neither running nor loading"


def check_all_free(inst) -> None:
    pool = inst.kv.pool
    assert pool.num_free == pool.num_gpu_blocks - 1
    assert pool.ref_cnt[0] == 1 and not any(pool.ref_cnt[1:])
    assert sorted(pool.free_queue()) == list(range(1, pool.num_gpu_blocks))
    assert not inst.kv.req_to_blocks and not inst.kv.req_to_state and inst.num_pinned_blocks == 0
    assert not inst.kv.req_to_window


def instrument(sim: Simulation) -> list[int]:
    """Check the block invariants before and after every schedule() of every instance."""
    calls = [0]
    for inst in sim.instances:
        orig = inst.scheduler.schedule

        def checked(now, _orig=orig, _inst=inst):
            check_blocks(_inst)
            out = _orig(now)
            check_blocks(_inst)
            calls[0] += 1
            return out

        inst.scheduler.schedule = checked
    return calls


@st.composite
def workloads(draw):
    prefixes = {"sys-a": draw(st.integers(0, 70)), "sys-b": draw(st.integers(1, 40))}
    n = draw(st.integers(1, 7))
    t = 0.0
    progs = []
    for i in range(n):
        t += draw(st.sampled_from([0.0, 0.001, 0.02, 0.1, 0.4]))
        k = draw(st.integers(1, 4))
        calls = []
        for j in range(k):
            after = None
            if j >= 2 and draw(st.booleans()):
                after = [j - 2]  # a DAG branch beside call j-1
            calls.append(call(draw(st.integers(1, 60)), draw(st.integers(1, 24)),
                              tool_s=draw(st.sampled_from([0.0, 0.005, 0.05, 0.3])) if j < k - 1 else None,
                              after=after))
        pid = draw(st.sampled_from([None, "sys-a", "sys-b"]))
        progs.append(program(f"p{i}", round(t, 6), calls, prefix=(pid, prefixes[pid]) if pid else None))
    need = max(-(-(p.input_tokens(k) + p.calls[k].output_tokens) // BS) for p in progs for k in range(len(p.calls)))
    blocks = need + 1 + draw(st.integers(0, 6))
    policy = {"scheduler": draw(st.sampled_from(["fcfs", "program-fcfs", "plas"])),
              "kv": draw(st.sampled_from(["lru", "drop", "pin-ttl"])),
              "router": draw(st.sampled_from(["round-robin", "least-loaded", "session-affinity", "prefix-aware"])),
              "kv_ttl_s": draw(st.sampled_from([0.01, 0.2, 2.0]))}
    instances = draw(st.integers(1, 3))
    mnbt = draw(st.sampled_from([16, 48, 2048]))
    return progs, blocks, policy, instances, mnbt


LATENCY = LinearStepModel(2e-3, {"prefill_tokens": 2e-5, "decode_ctx_sum": 1e-6, "num_seqs": 1e-4})


def _window_peak(progs, mnbt, window) -> int:
    """Most window blocks the largest call holds (KVCacheManager.peak_window_blocks)."""
    W, wg, fg, chunked = window
    total = max(p.input_tokens(k) + p.calls[k].output_tokens for p in progs for k in range(len(p.calls)))
    held = min(-(-total // BS), -(-((W if chunked else W - 1) + mnbt) // BS) + 1)
    return -(-wg * held // fg)


def _simulate(progs, blocks, policy, instances, mnbt, fast_forward, instrumented=True, state_blocks=0,
              window=None, async_scheduling=False, latency=LATENCY):
    in_flight = mnbt * (2 if async_scheduling else 1)  # (ResolvedEngine.max_in_flight_tokens)
    extra = state_blocks + (_window_peak(progs, in_flight, window) if window else 0)
    dep = make_deployment(num_gpu_blocks=blocks + extra, block_size=BS, max_num_batched_tokens=mnbt,
                          max_num_seqs=8, latency=latency, async_scheduling=async_scheduling)
    if state_blocks or window:
        import dataclasses
        win = {}
        if window:
            W, wg, fg, chunked = window
            win = {"sliding_window": 0 if chunked else W, "attention_chunk_size": W if chunked else 0,
                   "window_groups": wg, "full_groups": fg}
        dep = dataclasses.replace(dep, engine=dataclasses.replace(dep.engine, state_blocks_per_seq=state_blocks, **win))
    sim = Simulation(progs, dep, sim_config(fast_forward, instances=instances, **policy))
    steps = instrument(sim) if instrumented else None
    return _run_or_reject(sim), sim, steps


def _run_or_reject(sim):
    """Run; any failure (a stuck run included) fails the test."""
    return sim.run()


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.booleans())
def test_random_workloads_complete_every_call_once_without_losing_blocks(w, fast_forward):
    """Random programs on a tiny KV: each call completes once, blocks are conserved."""
    progs, blocks, policy, instances, mnbt = w
    res, sim, steps = _simulate(progs, blocks, policy, instances, mnbt, fast_forward)
    keys = Counter((r["program_id"], r["call_index"]) for r in res.calls)
    assert keys == Counter((p.program_id, k) for p in progs for k in range(len(p.calls)))
    assert all(r["status"] == "ok" for r in res.calls)
    assert sorted(p["program_id"] for p in res.programs) == sorted(p.program_id for p in progs)
    for r in res.calls:
        assert r["arrival_s"] <= r["scheduled_s"] <= r["first_token_s"] <= r["finish_s"]
        assert r["cached_tokens"] % BS == 0 and r["cached_tokens"] <= r["input_tokens"] - 1
    spec = {p.program_id: p for p in progs}
    for r in res.calls:
        p = spec[r["program_id"]]
        assert r["input_tokens"] == p.input_tokens(r["call_index"])
        assert r["output_tokens"] == p.calls[r["call_index"]].output_tokens
    for inst in sim.instances:
        check_all_free(inst)
    assert steps[0] > 0


def _check_complete_and_whole(progs, res, sim, steps) -> None:
    """Every call completed once, ok; every instance's pool ends whole; steps were checked."""
    keys = Counter((r["program_id"], r["call_index"]) for r in res.calls)
    assert keys == Counter((p.program_id, k) for p in progs for k in range(len(p.calls)))
    assert all(r["status"] == "ok" for r in res.calls)
    for inst in sim.instances:
        check_all_free(inst)
    assert steps[0] > 0


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.sampled_from([1, 3]), st.booleans())
def test_random_workloads_with_hybrid_state_blocks_conserve_every_block(w, state_blocks, fast_forward):
    """The same, for a hybrid model whose sequences each hold `state_blocks` more blocks of
    the pool (linear-attention state): taken at admission, returned at finish, preemption or
    a retention policy's take; every call completes once and the pool ends whole."""
    progs, blocks, policy, instances, mnbt = w
    res, sim, steps = _simulate(progs, blocks, policy, instances, mnbt, fast_forward, state_blocks=state_blocks)
    _check_complete_and_whole(progs, res, sim, steps)


# (W, window groups, full groups, chunked local attention instead of a sliding window)
WINDOWS = st.sampled_from([(16, 1, 1, False), (24, 2, 1, False), (40, 1, 2, False), (100, 6, 1, False),
                           (32, 1, 1, True), (48, 3, 1, True)])


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), WINDOWS, st.booleans())
def test_random_workloads_with_sliding_windows_conserve_every_block(w, window, fast_forward):
    """The same, for a model with sliding-window layers: each sequence also holds the blocks of
    its windows, which grow with a prefill, shrink behind the window and are returned at
    finish, preemption or a retention policy's take; every call completes once, the pool ends
    whole, and the same run with fast-forward on and off gives the same results."""
    progs, blocks, policy, instances, mnbt = w
    res, sim, steps = _simulate(progs, blocks, policy, instances, mnbt, fast_forward, window=window)
    _check_complete_and_whole(progs, res, sim, steps)
    other = _simulate(progs, blocks, policy, instances, mnbt, not fast_forward, instrumented=False, window=window)[0]
    assert other.calls == res.calls and other.summary == res.summary


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.one_of(st.none(), WINDOWS))
def test_random_workloads_with_async_scheduling_complete_every_call_once(w, window):
    """Async scheduling (a step scheduled while the last one runs, output placeholders,
    tokens delivered to requests preempted with one in flight, windows freed behind the
    returned tokens): every call completes once with all its output tokens, blocks are
    conserved at every schedule and the pool ends whole; no call is faster than its own
    steps allow (first token after its prefill step at the earliest)."""
    progs, blocks, policy, instances, mnbt = w
    res, sim, steps = _simulate(progs, blocks, policy, instances, mnbt, True, window=window, async_scheduling=True)
    _check_complete_and_whole(progs, res, sim, steps)
    spec = {p.program_id: p for p in progs}
    for r in res.calls:
        assert r["output_tokens"] == spec[r["program_id"]].calls[r["call_index"]].output_tokens
        assert r["arrival_s"] <= r["scheduled_s"] < r["first_token_s"] <= r["finish_s"]
    for inst in sim.instances:
        for req in [*inst.scheduler.running, *inst.scheduler.waiting]:
            raise AssertionError(f"request left behind: {req}")


def _itl_sample(res) -> list[float]:
    """The expanded inter-token-latency sample (order of recording is not a result)."""
    return sorted(v for v, w in zip(res.itl_values, res.itl_weights) for _ in range(w))


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_fast_forward_changes_no_result(w):
    """fast_forward on and off give identical call rows, program rows, ITL sample and summary."""
    progs, blocks, policy, instances, mnbt = w
    on = _simulate(progs, blocks, policy, instances, mnbt, True, instrumented=False)[0]
    off = _simulate(progs, blocks, policy, instances, mnbt, False, instrumented=False)[0]
    assert on.calls == off.calls
    assert on.programs == off.programs
    assert _itl_sample(on) == _itl_sample(off)
    assert on.summary == off.summary


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.sampled_from(["linear", "const"]), st.sampled_from([0.0, 0.25, 1.0]))
def test_fast_forward_changes_no_result_with_async_scheduling(w, latency, sample_s):
    """The same under async scheduling, where a decode run is planned one step ahead (each
    step scheduled at its predecessor's start). With every step 10 ms long ("const") and
    arrivals, tool gaps and pin expiries on the same 10 ms grid, outside events land exactly
    on a step's start: an arrival there joins the step scheduled at that instant, a later
    event (a pin's expiry) the one after. The sampled timeseries (block state read mid-run)
    is compared too."""
    progs, blocks, policy, instances, mnbt = w
    lat = LATENCY if latency == "linear" else ConstLatency(0.01)
    if latency == "const":
        progs = [dataclasses.replace(p, arrival_s=round(p.arrival_s, 2)) for p in progs]
    runs = []
    for ff in (True, False):
        dep_kw = dict(instrumented=False, async_scheduling=True, latency=lat)
        res, sim, _ = _simulate(progs, blocks, {**policy, "sample_interval_s": sample_s} if sample_s else policy,
                                instances, mnbt, ff, **dep_kw)
        runs.append(res)
    on, off = runs
    assert on.calls == off.calls
    assert on.programs == off.programs
    assert _itl_sample(on) == _itl_sample(off)
    assert on.summary == off.summary
    assert on.timeseries == off.timeseries


def test_tiny_kv_workload_does_preempt():
    """The invariant workloads can preempt: a known tight case records preemptions."""
    progs = [program(f"p{i}", 0.0, [call(60, 24)]) for i in range(4)]
    res, sim, _ = _simulate(progs, 8, {"scheduler": "fcfs", "kv": "lru", "router": "round-robin"}, 1, 16, False)
    assert sum(r["preemptions"] for r in res.calls) > 0
    check_all_free(sim.instances[0])


# --- a run that cannot finish must say so -----------------------------------------------------


class _Hang(Exception):
    pass


def _leaky_sim(sample_interval_s):
    """Two programs on one instance whose retention never frees a finished call's blocks:
    the second program can never be admitted."""
    from simulator.policies.retention import RetentionPolicy

    class Leak(RetentionPolicy):
        def on_call_finished(self, inst, req, gap_s, now):
            inst.kv.take_blocks(req)

    progs = [program("a", 0.0, [call(40, 2)]), program("b", 0.1, [call(40, 2)])]
    dep = make_deployment(num_gpu_blocks=5, block_size=16)
    sim = Simulation(progs, dep, sim_config(False, sample_interval_s=sample_interval_s))
    for inst in sim.instances:
        inst.retention = Leak(sim.cfg.policy)
    return sim


def _guard(sim_t, _done):
    if sim_t > 1000.0:
        raise _Hang(f"still running at t={sim_t}")


def test_stuck_run_raises_without_sampling():
    """A run with a call that can never be admitted ends with a RuntimeError."""
    with pytest.raises(RuntimeError, match="unfinished"):
        _leaky_sim(0.0).run(progress=_guard, progress_every_s=10.0)


def test_stuck_run_raises_with_sampling():
    """The same stuck run with timeseries sampling on still ends with a RuntimeError."""
    with pytest.raises(RuntimeError, match="unfinished"):
        _leaky_sim(0.5).run(progress=_guard, progress_every_s=10.0)


# --- fast-forward with a KV tier --------------------------------------------------------------


def _offload_ff_workload():
    c = call
    return [program("p0", 0, [c(1, 1, tool_s=0.0), c(1, 15, tool_s=0.0), c(1, 1)]),
            program("p1", 0, [c(1, 1, tool_s=0.0), c(8, 24)]),
            program("p2", 0, [c(1, 16, tool_s=0.0), c(1, 1, tool_s=0.0), c(1, 1)]),
            program("p3", 0, [c(1, 1)]), program("p4", 0, [c(1, 1)]),
            program("p5", 0, [c(1, 1, tool_s=0.0), c(1, 1, tool_s=0.0), c(3, 11, tool_s=0.0), c(15, 1)])]


def _offload_rows(fast_forward):
    from simkit import slow_tier
    dep = make_deployment(num_gpu_blocks=7, block_size=BS, max_num_batched_tokens=48, max_num_seqs=8,
                          latency=LATENCY, tiers=[slow_tier(bandwidth_Bps=5e6, capacity_blocks=20)])
    res, _ = run_sim(_offload_ff_workload(), dep, fast_forward, kv="offload")
    return sorted(res.calls, key=lambda r: (r["program_id"], r["call_index"]))


def test_fast_forward_is_exact_with_offload():
    """fast_forward on and off give identical call rows with the offload policy."""
    assert _offload_rows(True) == _offload_rows(False)


def test_offload_ff_workload_loads_from_the_tier():
    """The workload above really loads a block back from the tier (the case fast-forward misses)."""
    rows = {(r["program_id"], r["call_index"]): r for r in _offload_rows(False)}
    assert rows[("p5", 3)]["loaded_tokens"] == 16


def _run_logged(progs, fast_forward):
    dep = make_deployment(num_gpu_blocks=400, block_size=BS, max_num_seqs=8, latency=LATENCY)
    cfg = sim_config(fast_forward)
    cfg = type(cfg)(**{**cfg.__dict__, "metrics": type(cfg.metrics)(sample_interval_s=0.0, step_log=True)})
    return Simulation(progs, dep, cfg).run()


@pytest.mark.parametrize("k", [1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 60])
def test_arrival_exactly_at_a_decode_step_end_matches_stepping(k):
    """A decode run is planned a few steps at a time; a call arriving exactly when one of its
    steps ends (a chunk boundary included) is served as stepping one at a time serves it."""
    long = [program("a", 0.0, [call(40, 120)]), program("b", 0.0, [call(24, 100)])]
    ends = [s["t_s"] for s in _run_logged(long, False).steps]
    t = ends[k]
    progs = long + [program("c", t, [call(30, 5, tool_s=0.0), call(8, 20)])]
    on, off = _run_logged(progs, True), _run_logged(progs, False)
    assert on.calls == off.calls
    assert on.steps == off.steps
    assert any(r["arrival_s"] == t for r in on.calls)
