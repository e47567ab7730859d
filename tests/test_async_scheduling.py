"""Async scheduling (vLLM's AsyncScheduler with the engine core's batch queue of two): what
the instance does differently from the synchronous engine, pinned on small exact cases.
The scheduling decisions themselves are checked against vLLM's own AsyncScheduler by
scripts/diff_vllm_scheduler.py --async-scheduling (tests/integration)."""

from __future__ import annotations

import dataclasses

import pytest

from simkit import call, make_deployment, make_req, make_scheduler, program, rows_by_call, run_sim
from simulator.config import ConfigError, EngineConfig, SimConfig
from simulator.deployment import build_deployment
from simulator.engine.request import PREEMPTED
from simulator.hardware import load_device, load_model

STEP = 0.01


def _run(progs, async_scheduling, **dep_kw):
    dep = make_deployment(step_s=STEP, async_scheduling=async_scheduling, **dep_kw)
    return run_sim(progs, dep, fast_forward=False)


def test_a_call_arriving_during_a_step_joins_the_step_after_next():
    """A decodes from t=0 in 10 ms steps; B arrives at 0.105, inside the step [0.10, 0.11).
    Synchronous: B's prefill is the next step, [0.11, 0.12). Async: that step was scheduled
    at 0.10, before B arrived; B's prefill is [0.12, 0.13): one step more of TTFT."""
    progs = [program("a", 0.0, [call(32, 60)]), program("b", 0.105, [call(32, 3)])]
    ttft = {}
    for mode in (False, True):
        res, _ = _run(progs, mode)
        row = rows_by_call(res)[("b", 0)]
        ttft[mode] = row["first_token_s"] - row["arrival_s"]
    assert ttft[False] == pytest.approx(0.015)
    assert ttft[True] == pytest.approx(0.025)


def test_a_lone_call_runs_no_extra_step():
    """The step that samples a call's last token is not followed by another for it (vLLM
    skips it): the same steps, times and tokens as the synchronous engine."""
    progs = [program("a", 0.0, [call(40, 7)])]
    res_sync, sim_sync = _run(progs, False)
    res_async, sim_async = _run(progs, True)
    assert sim_async.instances[0].num_steps == sim_sync.instances[0].num_steps == 7
    assert res_async.calls == res_sync.calls


def test_a_call_waiting_for_a_seat_loses_nothing_when_the_engine_has_nothing_else():
    """max_num_seqs 1: B waits for A. Async: the step after A's last was scheduled while A
    still held the seat and came out empty (nothing else to run); an empty pending step
    launches nothing, so B is scheduled when A's last token returns, as in the synchronous
    engine, and its first token comes at the same time."""
    progs = [program("a", 0.0, [call(16, 4)]), program("b", 0.001, [call(16, 2)])]
    rows = {m: rows_by_call(_run(progs, m, max_num_seqs=1)[0]) for m in (False, True)}
    assert rows[False][("b", 0)]["first_token_s"] == pytest.approx(0.05)
    assert rows[True][("b", 0)]["first_token_s"] == pytest.approx(0.05)


def test_a_busy_engine_admits_a_waiting_call_one_step_later_than_synchronous():
    """max_num_seqs 2, A and C decoding, B waiting: when A finishes, the synchronous engine
    admits B in the next step; the async engine had scheduled that step (C alone) while A
    still held its seat, so B comes a step later."""
    progs = [program("a", 0.0, [call(16, 3)]), program("c", 0.0, [call(16, 20)]),
             program("b", 0.001, [call(16, 2)])]
    rows = {m: rows_by_call(_run(progs, m, max_num_seqs=2)[0]) for m in (False, True)}
    assert rows[True][("b", 0)]["first_token_s"] - rows[False][("b", 0)]["first_token_s"] == pytest.approx(STEP)
    assert rows[True][("c", 0)]["finish_s"] == pytest.approx(rows[False][("c", 0)]["finish_s"])


@pytest.mark.parametrize("b_max_tokens", [6, 1])
def test_a_request_preempted_with_a_token_in_flight_gets_it(b_max_tokens):
    """Scheduler level, 5 usable blocks of 4 tokens: A (12 prompt tokens, 3 blocks) and B (7,
    2 blocks) prefill in step 0 and fill the pool. Step 1 is scheduled while step 0 is out:
    A's decode needs a block, so B (the newest) is preempted with its first token in flight.
    When step 0 returns, B still gets that token (vLLM delivers in-flight output) and keeps it
    for its recompute; if it was B's last token (max_tokens 1), B finishes from the waiting
    queue."""
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64, async_scheduling=True)
    a, b = make_req(0, 12, max_tokens=30), make_req(1, 7, max_tokens=b_max_tokens)
    sched.add_request(a)
    sched.add_request(b)
    s0 = sched.schedule(0.0)
    assert [r.request_id for r, _ in s0.samples] == [0, 1]
    assert b.num_output_placeholders == (1 if b_max_tokens > 1 else 0)  # a last token holds none
    s1 = sched.schedule(0.0)
    assert [r.request_id for r in s1.preempted] == [1] and b.status == PREEMPTED
    assert [r.request_id for r, _ in s1.scheduled] == [0]
    assert b.num_output_placeholders == 0 and b.num_computed_tokens == 0
    finished = sched.update_from_output(s0)
    assert (a.num_output_tokens, b.num_output_tokens) == (1, 1)
    assert a.num_output_placeholders == 1  # its step-1 token, still out
    if b_max_tokens == 1:
        assert finished == [b]
        sched.finish(b)
        assert b not in list(sched.waiting)
    else:
        assert finished == [] and list(sched.waiting) == [b]
        assert b.num_tokens == 8  # its recompute covers the token it got


def test_async_scheduling_resolution():
    """On for GPUs from vLLM 0.13 (the default flipped in late 2025), off before; off on the
    CPU backend; the config wins, then a profile's recorded value."""
    model = load_model("llama-3.1-8b")
    gpu, _ = load_device("h100-sxm")
    cpu, _ = load_device("cpu-host") if _has("cpu-host") else (None, None)

    def resolved(device, engine=None, profile=None):
        cfg = SimConfig(engine=EngineConfig(**(engine or {})))
        return build_deployment(model, device, cfg, profile).engine.async_scheduling

    assert resolved(gpu) is True
    assert resolved(gpu, {"vllm_version": "0.19.0"}) is True
    assert resolved(gpu, {"vllm_version": "0.11.0"}) is False
    assert resolved(gpu, {"async_scheduling": False}) is False
    assert resolved(gpu, profile={"engine": {"async_scheduling": False}}) is False
    assert resolved(gpu, {"async_scheduling": True}, profile={"engine": {"async_scheduling": False}}) is True
    if cpu is not None:
        assert resolved(cpu, {"num_gpu_blocks_override": 100}) is False
    with pytest.raises(ConfigError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")
    dep = build_deployment(model, gpu, SimConfig())
    assert dep.engine.max_in_flight_tokens == 2 * dep.engine.max_num_batched_tokens
    sync = dataclasses.replace(dep.engine, async_scheduling=False)
    assert sync.max_in_flight_tokens == sync.max_num_batched_tokens


def _has(name: str) -> bool:
    try:
        load_device(name)
        return True
    except Exception:
        return False
