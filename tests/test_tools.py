"""Tool gaps: call k+1 is issued exactly tool_s after call k's last token (trace, fixed,
sampled gaps; time_scale; DAG parents)."""

from __future__ import annotations

import pytest

from simkit import call, program, rows_by_call, run_sim
from simulator.config import ConfigError, ToolConfig
from simulator.tools import ToolSimulator

TOOL_S = [0.41, 0.09, 1.7]


def _chain(pid="a", arrival=0.0, tools=("bash", "edit", "bash")):
    calls = [call(50 + 10 * k, 5 + k, tool_s=TOOL_S[k], tool=tools[k]) for k in range(3)] + [call(20, 3)]
    return program(pid, arrival, calls)


def _gaps(res, pid="a", n=4):
    rows = rows_by_call(res)
    return [rows[(pid, k + 1)]["arrival_s"] - rows[(pid, k)]["finish_s"] for k in range(n - 1)]


def test_trace_gap_is_exact(ff):
    """mode=trace: arrival of call k+1 == finish of call k + tool_s (to 1e-9)."""
    res, _ = run_sim([_chain(), _chain("b", 0.05)], fast_forward=ff)
    for pid in ("a", "b"):
        assert _gaps(res, pid) == pytest.approx(TOOL_S, abs=1e-9)


def test_program_tool_total_is_the_sum_of_gaps(ff):
    """programs rows report tool_s_total == sum of the program's gaps."""
    res, _ = run_sim([_chain()], fast_forward=ff)
    assert res.programs[0]["tool_s_total"] == pytest.approx(sum(TOOL_S), abs=1e-9)


def test_time_scale_multiplies_trace_gaps(ff):
    """tools.time_scale=2.5 multiplies every trace gap."""
    res, _ = run_sim([_chain()], fast_forward=ff, tools=ToolConfig(time_scale=2.5))
    assert _gaps(res) == pytest.approx([2.5 * g for g in TOOL_S], abs=1e-9)


def test_fixed_mode_replaces_trace_gaps(ff):
    """mode=fixed: every gap is fixed_s, whatever the trace says."""
    res, _ = run_sim([_chain()], fast_forward=ff, tools=ToolConfig(mode="fixed", fixed_s=0.3))
    assert _gaps(res) == pytest.approx([0.3] * 3, abs=1e-9)


def test_fixed_mode_with_time_scale(ff):
    """mode=fixed with time_scale=0.5 gives fixed_s / 2."""
    res, _ = run_sim([_chain()], fast_forward=ff, tools=ToolConfig(mode="fixed", fixed_s=0.3, time_scale=0.5))
    assert _gaps(res) == pytest.approx([0.15] * 3, abs=1e-9)


def test_zero_time_scale_issues_next_call_at_once(ff):
    """time_scale=0: the next call is issued when the previous one ends."""
    res, _ = run_sim([_chain()], fast_forward=ff, tools=ToolConfig(time_scale=0.0))
    assert _gaps(res) == [0.0, 0.0, 0.0]


SAMPLE = {"default": {"dist": "exponential", "mean": 0.5}, "edit": {"dist": "constant", "value": 0.25}}


def _sampled(ff, seed):
    progs = [_chain(), _chain("b", 0.05)]
    res, _ = run_sim(progs, fast_forward=ff, seed=seed, tools=ToolConfig(mode="sample", distributions=SAMPLE))
    return _gaps(res, "a") + _gaps(res, "b")


def test_sampled_gaps_are_seeded(ff):
    """mode=sample: the same seed gives the same gaps."""
    assert _sampled(ff, 7) == _sampled(ff, 7)


def test_sampled_gaps_change_with_the_seed(ff):
    """mode=sample: a different seed gives different gaps for the sampled tools."""
    a, b = _sampled(ff, 7), _sampled(ff, 8)
    assert a[0] != pytest.approx(b[0]) and a[2] != pytest.approx(b[2])


def test_sampled_gaps_use_the_tools_own_distribution(ff):
    """mode=sample: a tool with its own (constant) distribution gets that value."""
    gaps = _sampled(ff, 7)
    assert gaps[1] == pytest.approx(0.25, abs=1e-9) and gaps[4] == pytest.approx(0.25, abs=1e-9)
    assert gaps[0] != pytest.approx(0.25)


def test_sampled_gap_does_not_depend_on_other_programs():
    """A program's sampled gaps depend on (seed, program index, call index) only."""
    ts = ToolSimulator(ToolConfig(mode="sample", distributions=SAMPLE), seed=3)
    c = call(1, 1, tool_s=0.1, tool="bash")
    first = ts.gap(2, c, 1)
    for i in range(5):
        ts.gap(i, c, 0)
    assert ts.gap(2, c, 1) == first


@pytest.mark.parametrize("dists", [{}, {"default": {"dist": "gamma", "k": 1}}, {"default": {"dist": "lognormal", "mu": 0}}])
def test_bad_sample_distributions_are_config_errors(dists):
    """mode=sample without distributions, an unknown dist, or a missing parameter is a ConfigError."""
    with pytest.raises(ConfigError):
        ToolSimulator(ToolConfig(mode="sample", distributions=dists), seed=0)


def _dag(tool_s=0.2):
    """Call 0, then calls 1 (long) and 2 (short) both after 0, then call 3 after [1, 2]."""
    return program("d", 0.0, [call(32, 4, tool_s=0.1),
                              call(8, 30, tool_s=tool_s, after=[0]),
                              call(8, 2, tool_s=tool_s, after=[0]),
                              call(8, 3, after=[1, 2])])


def test_dag_siblings_are_released_together(ff):
    """Both children of call 0 are issued tool_s after call 0 ends."""
    rows = rows_by_call(run_sim([_dag()], fast_forward=ff)[0])
    t = rows[("d", 0)]["finish_s"] + 0.1
    assert rows[("d", 1)]["arrival_s"] == pytest.approx(t, abs=1e-9)
    assert rows[("d", 2)]["arrival_s"] == pytest.approx(t, abs=1e-9)


def test_dag_call_waits_for_its_last_parent(ff):
    """A call after [1, 2] is issued tool_s after the later of its parents ends."""
    rows = rows_by_call(run_sim([_dag()], fast_forward=ff)[0])
    f1, f2 = rows[("d", 1)]["finish_s"], rows[("d", 2)]["finish_s"]
    assert f1 > f2 + 0.1  # the long sibling ends well after the short one
    assert rows[("d", 3)]["arrival_s"] == pytest.approx(max(f1, f2) + 0.2, abs=1e-9)


def test_dag_program_completes_every_call_once(ff):
    """A DAG program records each call once and finishes after its last call."""
    res, _ = run_sim([_dag()], fast_forward=ff)
    rows = rows_by_call(res)
    assert sorted(rows) == [("d", k) for k in range(4)]
    assert res.programs[0]["finish_s"] == rows[("d", 3)]["finish_s"]
