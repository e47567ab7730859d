"""Router choices across a cluster of instances (every step takes 10 ms)."""

from __future__ import annotations

from collections import defaultdict

from simkit import call, program, rows_by_call, run_sim


def _instances_of(res) -> dict[str, list[int]]:
    out = defaultdict(list)
    for r in sorted(res.calls, key=lambda r: (r["program_id"], r["call_index"])):
        out[r["program_id"]].append(r["instance"])
    return dict(out)


def test_round_robin_cycles_over_instances(ff):
    """round-robin sends successive calls to instances 0, 1, 2, 0, 1, 2."""
    progs = [program(f"p{i}", 0.1 * i, [call(16, 2)]) for i in range(6)]
    res, _ = run_sim(progs, fast_forward=ff, instances=3, router="round-robin")
    rows = rows_by_call(res)
    assert [rows[(f"p{i}", 0)]["instance"] for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_round_robin_is_per_call_not_per_program(ff):
    """round-robin moves a lone program's successive calls across instances."""
    progs = [program("a", 0.0, [call(16, 2, tool_s=0.1), call(4, 2, tool_s=0.1), call(4, 2)])]
    res, _ = run_sim(progs, fast_forward=ff, instances=2, router="round-robin")
    assert _instances_of(res)["a"] == [0, 1, 0]


def _least_loaded_workload():
    """p0 runs long on instance 0; p1 (short) goes to 1 and ends; p2 arrives while p0 runs."""
    return [program("p0", 0.0, [call(16, 100)]), program("p1", 0.001, [call(16, 1)]),
            program("p2", 0.1, [call(16, 2)])]


def test_least_loaded_picks_the_instance_with_fewer_outstanding_requests(ff):
    """least-loaded sends p2 to the idle instance 1, not to busy instance 0."""
    res, _ = run_sim(_least_loaded_workload(), fast_forward=ff, instances=2, router="least-loaded")
    assert _instances_of(res) == {"p0": [0], "p1": [1], "p2": [1]}


def test_least_loaded_workload_under_round_robin_differs(ff):
    """Control: round-robin sends p2 to busy instance 0 in the same workload."""
    res, _ = run_sim(_least_loaded_workload(), fast_forward=ff, instances=2, router="round-robin")
    assert _instances_of(res)["p2"] == [0]


def _affinity_workload():
    """Two 3-call programs and a long single call that loads instance 0 in between."""
    return [program("a", 0.0, [call(16, 4, tool_s=0.05), call(8, 4, tool_s=0.05), call(8, 4)]),
            program("b", 0.001, [call(16, 4, tool_s=0.05), call(8, 4, tool_s=0.05), call(8, 4)]),
            program("hog", 0.002, [call(16, 200)])]


def test_session_affinity_keeps_a_program_on_one_instance(ff):
    """session-affinity: every call of a program runs where its first call ran."""
    res, _ = run_sim(_affinity_workload(), fast_forward=ff, instances=2, router="session-affinity")
    inst = _instances_of(res)
    assert inst["a"] == [0, 0, 0] and inst["b"] == [1, 1, 1]


def test_session_affinity_workload_moves_programs_under_least_loaded(ff):
    """Control: least-loaded moves a's later calls away from the instance the hog loads."""
    res, _ = run_sim(_affinity_workload(), fast_forward=ff, instances=2, router="least-loaded")
    assert _instances_of(res)["a"] == [0, 1, 1]


def _prefix_workload():
    """x1 (prefix sys) lands on 0; y1 (prefix other) arrives while x1 runs and lands on the
    emptier instance 1; z (no prefix) comes alone; later x2 and y2 come back for their prefixes."""
    return [program("x1", 0.0, [call(16, 20)], prefix=("sys", 256)),
            program("y1", 0.001, [call(16, 20)], prefix=("other", 256)),
            program("z", 2.0, [call(16, 4)]),
            program("x2", 5.0, [call(16, 4)], prefix=("sys", 256)),
            program("y2", 6.0, [call(16, 4)], prefix=("other", 256))]


def test_prefix_aware_routes_to_the_instance_holding_the_prefix(ff):
    """prefix-aware: a call goes where its shared prefix is cached."""
    res, _ = run_sim(_prefix_workload(), fast_forward=ff, instances=2, router="prefix-aware")
    inst = _instances_of(res)
    assert inst["x1"] == inst["x2"] and inst["y1"] == inst["y2"]
    assert inst["x1"] != inst["y1"]
    rows = rows_by_call(res)
    assert rows[("x2", 0)]["cached_tokens"] == 256 and rows[("y2", 0)]["cached_tokens"] == 256


def test_prefix_workload_under_round_robin_loses_the_prefix(ff):
    """Control: round-robin sends x2 to the instance without its prefix (no hit)."""
    res, _ = run_sim(_prefix_workload(), fast_forward=ff, instances=2, router="round-robin")
    rows = rows_by_call(res)
    assert rows[("x2", 0)]["cached_tokens"] == 0


def _imbalance_workload():
    """x1 caches prefix sys on 0 and ends; x2 (long) runs there; x3 comes while x2 runs."""
    return [program("x1", 0.0, [call(16, 2)], prefix=("sys", 256)),
            program("x2", 5.0, [call(16, 100)], prefix=("sys", 256)),
            program("x3", 5.1, [call(16, 4)], prefix=("sys", 256))]


def test_prefix_aware_follows_the_prefix_when_balanced(ff):
    """prefix-aware with the default thresholds sends x3 to the busy instance holding sys."""
    res, _ = run_sim(_imbalance_workload(), fast_forward=ff, instances=2, router="prefix-aware")
    assert _instances_of(res)["x3"] == [0]


def test_prefix_aware_falls_back_to_least_loaded_when_imbalanced(ff):
    """prefix-aware with a zero imbalance threshold routes x3 least-loaded (instance 1)."""
    res, _ = run_sim(_imbalance_workload(), fast_forward=ff, instances=2, router="prefix-aware",
                     router_balance_abs_threshold=0, router_balance_rel_threshold=1.0)
    assert _instances_of(res) == {"x1": [0], "x2": [0], "x3": [1]}


def test_prefix_aware_ignores_small_matches(ff):
    """prefix-aware with cache threshold 0.99 ignores the prefix and takes the emptier instance."""
    res, _ = run_sim(_imbalance_workload(), fast_forward=ff, instances=2, router="prefix-aware",
                     router_cache_threshold=0.99)
    assert _instances_of(res)["x3"] == [1]


def test_vllm_dp_router_weighs_waiting_four_times_running():
    """vllm-dp (vLLM's DP load balancer) picks the lowest 4·waiting + running: a rank with one
    waiting request scores above one with three running."""
    from simulator.config import PolicyConfig
    from simulator.policies.routing import ROUTERS

    class Sched:
        def __init__(self, running, waiting):
            self.running, self._waiting = [None] * running, waiting

        def num_waiting(self):
            return self._waiting

    class Inst:
        def __init__(self, running, waiting):
            self.scheduler = Sched(running, waiting)

    r = ROUTERS.get("vllm-dp")(PolicyConfig())
    assert r.choose(None, None, [Inst(0, 1), Inst(3, 0)], 0.0) == 1   # 4 vs 3
    assert r.choose(None, None, [Inst(2, 1), Inst(5, 0)], 0.0) == 1   # 6 vs 5 (least-loaded would pick 0)
    assert r.choose(None, None, [Inst(1, 0), Inst(1, 0)], 0.0) == 0   # ties to the lower index
