"""Each scheduling and KV-retention policy does what its name says, through whole simulations
with small hand-timed workloads (every step takes 10 ms)."""

from __future__ import annotations

import pytest

from simkit import call, make_deployment, program, rows_by_call, run_sim, slow_tier, tiny_model
from simulator.config import ConfigError
from simulator.policies.retention import RETENTION
from simulator.policies.routing import ROUTERS
from simulator.policies.scheduling import SCHEDULERS

STEP = 0.01


def test_policy_registries_list_the_documented_names():
    """The config's documented policy names are all registered."""
    assert set(SCHEDULERS.names()) >= {"fcfs", "program-fcfs", "plas"}
    assert set(RETENTION.names()) >= {"lru", "drop", "pin-ttl", "offload"}
    assert set(ROUTERS.names()) >= {"round-robin", "least-loaded", "session-affinity", "prefix-aware"}


def test_registering_a_name_twice_is_an_error():
    """A registry refuses a second class under an existing name."""
    with pytest.raises(ValueError):
        SCHEDULERS.register("fcfs")(type("Dup", (), {}))


def test_unknown_policy_name_is_a_config_error():
    """Looking up an unknown policy name raises ConfigError listing the known ones."""
    with pytest.raises(ConfigError, match="fcfs"):
        SCHEDULERS.get("nope")


# --- scheduling -----------------------------------------------------------------------------


def _order_workload():
    """max_num_seqs=1. A's call 0 runs 0..0.10, B runs 0.10..0.20; at 0.20 both C's only call
    (issued 0.002) and A's call 1 (issued 0.101) wait."""
    return [program("A", 0.0, [call(16, 10, tool_s=0.001), call(16, 2)]),
            program("B", 0.001, [call(16, 10)]),
            program("C", 0.002, [call(16, 2)])]


def test_fcfs_serves_calls_in_issue_order(ff):
    """fcfs: C's call (issued first) runs before A's second call."""
    res, _ = run_sim(_order_workload(), make_deployment(max_num_seqs=1), ff, scheduler="fcfs")
    rows = rows_by_call(res)
    assert rows[("C", 0)]["scheduled_s"] < rows[("A", 1)]["scheduled_s"]


def test_program_fcfs_lets_a_programs_later_call_jump_ahead(ff):
    """program-fcfs: A's second call keeps A's place and runs before C's first call."""
    res, _ = run_sim(_order_workload(), make_deployment(max_num_seqs=1), ff, scheduler="program-fcfs")
    rows = rows_by_call(res)
    assert rows[("A", 1)]["scheduled_s"] < rows[("C", 0)]["scheduled_s"]
    assert rows[("A", 1)]["scheduled_s"] == pytest.approx(0.20)


def _plas_workload():
    """max_num_seqs=1. A's call 0 runs 0..0.5 (66 tokens of service); X runs 0.5..0.7; at 0.7
    A's call 1 (issued 0.501) and B's first call (issued 0.6, no service yet) wait."""
    return [program("A", 0.0, [call(16, 50, tool_s=0.001), call(16, 2)]),
            program("X", 0.001, [call(16, 20)]),
            program("B", 0.6, [call(16, 2)])]


def test_plas_favours_the_program_with_less_attained_service(ff):
    """plas: B (no service) runs before A's call 1 although A's call was issued first."""
    res, _ = run_sim(_plas_workload(), make_deployment(max_num_seqs=1), ff, scheduler="plas")
    rows = rows_by_call(res)
    assert rows[("B", 0)]["scheduled_s"] < rows[("A", 1)]["scheduled_s"]


@pytest.mark.parametrize("sched", ["fcfs", "program-fcfs"])
def test_plas_workload_under_other_schedulers_runs_a_first(ff, sched):
    """Control: fcfs and program-fcfs run A's call 1 before B in the same workload."""
    res, _ = run_sim(_plas_workload(), make_deployment(max_num_seqs=1), ff, scheduler=sched)
    rows = rows_by_call(res)
    assert rows[("A", 1)]["scheduled_s"] < rows[("B", 0)]["scheduled_s"]


def test_plas_quantum_makes_close_services_equal(ff):
    """plas with a quantum larger than A's service treats A like B: issue order decides."""
    res, _ = run_sim(_plas_workload(), make_deployment(max_num_seqs=1), ff, scheduler="plas",
                     plas_quantum_tokens=1000)
    rows = rows_by_call(res)
    assert rows[("A", 1)]["scheduled_s"] < rows[("B", 0)]["scheduled_s"]


# --- KV retention ---------------------------------------------------------------------------


def _two_turns(prefix=None):
    return [program("A", 0.0, [call(40, 8, tool_s=0.5), call(10, 2)], prefix=prefix)]


def test_lru_keeps_blocks_hittable_across_a_tool_gap(ff):
    """lru: the next call hits all full blocks of the previous context."""
    rows = rows_by_call(run_sim(_two_turns(("sys", 64)), fast_forward=ff, kv="lru")[0])
    assert rows[("A", 1)]["cached_tokens"] == (64 + 40 + 8 - 1) // 16 * 16


def test_drop_gives_no_reuse_without_a_prefix(ff):
    """drop: the next call of a program without a shared prefix hits nothing."""
    rows = rows_by_call(run_sim(_two_turns(), fast_forward=ff, kv="drop")[0])
    assert rows[("A", 1)]["cached_tokens"] == 0


def test_drop_keeps_the_shared_prefix_cached(ff):
    """drop: the next call still hits the shared prefix's full blocks."""
    rows = rows_by_call(run_sim(_two_turns(("sys", 64)), fast_forward=ff, kv="drop")[0])
    assert rows[("A", 1)]["cached_tokens"] == 64


def test_drop_shared_prefix_forgets_the_prefix_too(ff):
    """drop with kv_drop_shared_prefix: nothing hits on the next call."""
    rows = rows_by_call(run_sim(_two_turns(("sys", 64)), fast_forward=ff, kv="drop", kv_drop_shared_prefix=True)[0])
    assert rows[("A", 1)]["cached_tokens"] == 0


def _pressure_workload(gap=1.0):
    """11 usable blocks of 16. A's call 0 ends at 0.16 holding 5 blocks (4 full, cached).
    B (arrives 0.5) needs 8 blocks: it fits only by evicting two of A's (its last ones)."""
    return [program("A", 0.0, [call(64, 16, tool_s=gap), call(16, 4)]),
            program("B", 0.5, [call(120, 8)])]


def _pressure_dep(**kw):
    return make_deployment(num_gpu_blocks=12, block_size=16, **kw)


def test_lru_loses_blocks_to_memory_pressure_during_the_gap(ff):
    """lru: B evicts A's last cached block, so A's call 1 hits only 3 blocks."""
    rows = rows_by_call(run_sim(_pressure_workload(), _pressure_dep(), ff, scheduler="program-fcfs", kv="lru")[0])
    assert rows[("A", 1)]["cached_tokens"] == 48
    assert rows[("B", 0)]["scheduled_s"] == pytest.approx(0.5)


def test_pin_ttl_keeps_blocks_through_the_gap_under_pressure(ff):
    """pin-ttl: A's blocks stay pinned through the gap; its call 1 hits all 4 full blocks."""
    res, _ = run_sim(_pressure_workload(), _pressure_dep(), ff, scheduler="program-fcfs", kv="pin-ttl", kv_ttl_s=5.0)
    rows = rows_by_call(res)
    assert rows[("A", 1)]["cached_tokens"] == 64


def test_pinned_blocks_are_not_free_for_others(ff):
    """pin-ttl: B cannot take A's pinned blocks and waits until A's next call has run."""
    res, _ = run_sim(_pressure_workload(), _pressure_dep(), ff, scheduler="program-fcfs", kv="pin-ttl", kv_ttl_s=5.0)
    rows = rows_by_call(res)
    assert rows[("B", 0)]["scheduled_s"] >= rows[("A", 1)]["arrival_s"]


def test_pin_ttl_releases_blocks_at_the_ttl(ff):
    """pin-ttl: a pin shorter than the gap ends at finish + ttl, exactly when B gets in."""
    progs = [program("A", 0.0, [call(64, 16, tool_s=2.0), call(16, 4)]), program("B", 0.3, [call(120, 8)])]
    rows = rows_by_call(run_sim(progs, _pressure_dep(), ff, kv="pin-ttl", kv_ttl_s=0.3)[0])
    assert rows[("B", 0)]["scheduled_s"] == pytest.approx(rows[("A", 0)]["finish_s"] + 0.3, abs=1e-9)
    assert rows[("A", 1)]["cached_tokens"] == 48


def test_pin_ttl_does_not_pin_gaps_longer_than_max_tool(ff):
    """pin-ttl with kv_pin_max_tool_s below the gap frees at once, like lru."""
    progs = [program("A", 0.0, [call(64, 16, tool_s=2.0), call(16, 4)]), program("B", 0.3, [call(120, 8)])]
    rows = rows_by_call(run_sim(progs, _pressure_dep(), ff, kv="pin-ttl", kv_ttl_s=5.0, kv_pin_max_tool_s=1.0)[0])
    assert rows[("B", 0)]["scheduled_s"] == pytest.approx(0.3)


def test_pin_ttl_shows_pinned_blocks_in_the_timeseries(ff):
    """During the gap the timeseries reports A's 5 pinned blocks; none after the program ends."""
    progs = [program("A", 0.0, [call(64, 16, tool_s=1.0), call(16, 4)])]
    res, _ = run_sim(progs, _pressure_dep(), ff, kv="pin-ttl", kv_ttl_s=5.0, sample_interval_s=0.1)
    by_t = {round(r["t_s"], 6): r["pinned_blocks"] for r in res.timeseries}
    assert by_t[0.5] == 5
    assert res.timeseries[-1]["pinned_blocks"] == 0


# --- offload --------------------------------------------------------------------------------

BYTES_PER_BLOCK = 16 * tiny_model().kv_bytes_per_token()


def _offload_run(ff, bw, **policy):
    tier = slow_tier(bandwidth_Bps=bw)
    res, _ = run_sim(_pressure_workload(), _pressure_dep(tiers=[tier]), ff, kv="offload", **policy)
    return rows_by_call(res), tier[0]


def test_offload_loads_evicted_blocks_back_from_the_tier(ff):
    """offload: the block B evicted comes back from host memory: 16 loaded, 64 cached in all."""
    rows, _ = _offload_run(ff, 4e6)
    assert rows[("A", 1)]["loaded_tokens"] == 16
    assert rows[("A", 1)]["cached_tokens"] == 64


def test_offload_first_token_waits_for_the_transfer(ff):
    """offload: A's call 1 TTFT is the one-block transfer plus one step (idle instance)."""
    rows, spec = _offload_run(ff, 4e6)
    ttft = rows[("A", 1)]["first_token_s"] - rows[("A", 1)]["arrival_s"]
    assert ttft == pytest.approx(spec.transfer_time(BYTES_PER_BLOCK) + STEP, abs=1e-9)


def test_offload_slower_link_delays_first_token_by_the_transfer_difference(ff):
    """Halving the tier link bandwidth adds exactly the extra transfer time to TTFT."""
    fast, fspec = _offload_run(ff, 4e6)
    slow, sspec = _offload_run(ff, 2e6)
    d_ttft = slow[("A", 1)]["ttft_s"] - fast[("A", 1)]["ttft_s"]
    d_xfer = sspec.transfer_time(BYTES_PER_BLOCK) - fspec.transfer_time(BYTES_PER_BLOCK)
    assert d_xfer > 0.01
    assert d_ttft == pytest.approx(d_xfer, abs=1e-9)


def test_lru_on_the_same_workload_loads_nothing(ff):
    """Control: lru has no tier; A's call 1 hits 48 tokens and its TTFT is one step."""
    rows = rows_by_call(run_sim(_pressure_workload(), _pressure_dep(), ff, kv="lru")[0])
    assert rows[("A", 1)]["loaded_tokens"] == 0
    assert rows[("A", 1)]["ttft_s"] == pytest.approx(STEP)


def test_offload_skips_gaps_shorter_than_min_tool(ff):
    """offload with kv_offload_min_tool_s above the gap keeps nothing in the tier."""
    rows, _ = _offload_run(ff, 4e6, kv_offload_min_tool_s=5.0)
    assert rows[("A", 1)]["loaded_tokens"] == 0
    assert rows[("A", 1)]["cached_tokens"] == 48


# --- lost progress (known bugs) -------------------------------------------------------------


def test_pin_released_at_program_end_wakes_the_instance(ff):
    """A pin freed because its program ended on another instance lets the blocked call run at once."""
    # one usable block per instance; round-robin: A0 -> inst 0 (pins its block), A1 -> inst 1,
    # B -> inst 0 (blocked by A's pin); A ends at 0.02 and its pin on inst 0 is released
    progs = [program("A", 0.0, [call(1, 1, tool_s=0.0), call(1, 1)]), program("B", 0.015, [call(1, 1)])]
    dep = make_deployment(num_gpu_blocks=2, block_size=16)
    res, _ = run_sim(progs, dep, ff, instances=2, router="round-robin", kv="pin-ttl", kv_ttl_s=10.0)
    rows = rows_by_call(res)
    assert rows[("B", 0)]["instance"] == 0
    assert rows[("B", 0)]["scheduled_s"] == pytest.approx(rows[("A", 1)]["finish_s"])


def test_offload_loaded_call_is_not_starved_behind_a_preempted_request(ff):
    """P's call 1 loads slowly from the tier while H grows and preempts itself; all calls still finish."""
    progs = [program("P", 0.0, [call(64, 1, tool_s=0.5), call(16, 2)]),
             program("B", 0.2, [call(160, 1)]),      # evicts P's blocks from HBM during the gap
             program("H", 0.3, [call(20, 140)])]     # grows until it preempts itself
    dep = _pressure_dep(tiers=[slow_tier(bandwidth_Bps=2e5)])
    res, _ = run_sim(progs, dep, ff, kv="offload")
    rows = rows_by_call(res)
    assert rows[("P", 1)]["loaded_tokens"] == 64
    assert len(rows) == 4
