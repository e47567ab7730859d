"""Small builders shared by the simulator tests: requests, schedulers, deployments, runs.
(A plain module rather than conftest.py, so that `from simkit import ...` is unambiguous
beside other conftest.py files.)

Nothing here reaches into the simulator's internals beyond what a test needs to build its
inputs; assertions live in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from simulator.cluster import Simulation
from simulator.config import ClusterConfig, MetricsConfig, PolicyConfig, SimConfig, ToolConfig
from simulator.deployment import Deployment, ResolvedEngine
from simulator.engine.kv_cache_manager import KVCacheManager
from simulator.engine.request import FINISHED, Request
from simulator.engine.scheduler import Scheduler
from simulator.hardware import LinkSpec, MemoryTierSpec, load_device, load_model
from simulator.latency import LatencyModel
from simulator.policies.scheduling import SCHEDULERS
from simulator.workload import CallSpec, ProgramSpec

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Scheduler-level builders (no event loop)
# ---------------------------------------------------------------------------------------------


class FakeProgram:
    """The little of a program that an instance touches (its pins)."""

    def __init__(self):
        self.pins: dict = {}
        self.instance = None


def make_req(rid: int, prompt: int, max_tokens: int = 4, arrival: float = 0.0, keys=None,
             priority: float = 0.0) -> Request:
    """A request whose blocks are unique to it unless `keys` (hash keys) are given."""
    return Request(rid, prompt, max_tokens, arrival, key_base=(rid + 1) << 32, hash_keys=keys,
                   program=FakeProgram(), priority=priority)


def make_scheduler(num_blocks: int = 1000, block_size: int = 4, max_num_seqs: int = 64,
                   max_num_batched_tokens: int = 64, policy: str = "fcfs", **kw) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size)
    pol = SCHEDULERS.get(policy)(PolicyConfig())
    return Scheduler(kv, max_num_seqs, max_num_batched_tokens, pol, **kw)


def apply_model_output(sched: Scheduler, out) -> list[Request]:
    """What an instance does when a step ends: each request whose computed tokens reached
    its token count samples one token; finished requests leave and free their blocks."""
    finished = []
    for req, _n in out.scheduled:
        if req.num_computed_tokens < req.num_tokens:
            continue
        req.num_output_tokens += 1
        if req.num_output_tokens >= req.max_tokens:
            finished.append(req)
    for req in finished:
        sched.finish(req)
        req.status = FINISHED
        sched.kv.free(req)
    return finished


def step(sched: Scheduler, now: float = 0.0):
    """One engine step: schedule, then the fake model output."""
    out = sched.schedule(now)
    apply_model_output(sched, out)
    return out


def scheduled_ids(out) -> list[int]:
    return [r.request_id for r, _ in out.scheduled]


# ---------------------------------------------------------------------------------------------
# Simulation-level builders
# ---------------------------------------------------------------------------------------------


class ConstLatency(LatencyModel):
    """Every step takes `step_s`, whatever the batch."""

    kind = "const"

    def __init__(self, step_s: float = 0.01):
        self.step_s = step_s

    def time_of(self, f) -> float:
        return self.step_s


_MODEL = None
_DEVICE = None


def tiny_model():
    global _MODEL
    if _MODEL is None:
        _MODEL = load_model("tiny-llama")
    return _MODEL


def h100():
    global _DEVICE
    if _DEVICE is None:
        _DEVICE = load_device("h100-sxm")[0]
    return _DEVICE


def make_deployment(num_gpu_blocks: int = 4096, block_size: int = 16, max_num_seqs: int = 256,
                    max_num_batched_tokens: int = 2048, max_model_len: int = 1 << 20, step_s: float = 0.01,
                    latency=None, tiers=(), enable_prefix_caching: bool = True,
                    long_prefill_token_threshold: int = 0, async_scheduling: bool = False) -> Deployment:
    engine = ResolvedEngine(block_size=block_size, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens, num_gpu_blocks=num_gpu_blocks,
                            max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                            enable_chunked_prefill=True, long_prefill_token_threshold=long_prefill_token_threshold,
                            num_gpu_blocks_source="test", async_scheduling=async_scheduling)
    return Deployment(model=tiny_model(), device=h100(), engine=engine,
                      latency=latency if latency is not None else ConstLatency(step_s), tp=1, tiers=list(tiers))


def slow_tier(bandwidth_Bps: float = 4e6, latency_s: float = 0.0, capacity_blocks: int = 10_000,
              name: str = "host-dram"):
    """A host tier whose link is slow enough that a block's transfer is visible."""
    link = LinkSpec(name="test-link", kind="pcie", bandwidth_Bps=bandwidth_Bps, latency_s=latency_s)
    spec = MemoryTierSpec(name=name, kind="dram", capacity_bytes=1e15, bandwidth_Bps=1e15, latency_s=0.0, link=link)
    return (spec, capacity_blocks)


def call(new: int, out: int, tool_s: float | None = None, tool: str | None = None, after=None,
         input_tokens=None, hash_ids=None) -> CallSpec:
    return CallSpec(new_tokens=new, output_tokens=out, tool=tool, tool_s=tool_s,
                    input_tokens=input_tokens, hash_ids=tuple(hash_ids) if hash_ids is not None else None,
                    after=tuple(after) if after is not None else None)


def program(pid: str, arrival: float, calls, prefix: tuple[str, int] | None = None,
            block_size: int | None = None) -> ProgramSpec:
    return ProgramSpec(program_id=pid, arrival_s=arrival, calls=tuple(calls),
                       prefix_id=prefix[0] if prefix else None, prefix_tokens=prefix[1] if prefix else 0,
                       block_size=block_size)


def sim_config(fast_forward: bool = True, seed: int = 0, tools: ToolConfig | None = None,
               sample_interval_s: float = 0.0, instances: int = 1, **policy) -> SimConfig:
    return SimConfig(policy=PolicyConfig(**policy), tools=tools or ToolConfig(),
                     metrics=MetricsConfig(sample_interval_s=sample_interval_s),
                     cluster=ClusterConfig(instances=instances), seed=seed, fast_forward=fast_forward)


def run_sim(programs, dep=None, fast_forward: bool = True, **cfg_kw):
    """Run a simulation; returns (result, Simulation)."""
    dep = dep if dep is not None else make_deployment()
    sim = Simulation(sorted(programs, key=lambda p: p.arrival_s), dep, sim_config(fast_forward, **cfg_kw))
    res = sim.run()
    return res, sim


def rows_by_call(res) -> dict[tuple[str, int], dict]:
    out = {}
    for r in res.calls:
        key = (r["program_id"], r["call_index"])
        assert key not in out, f"call {key} recorded twice"
        out[key] = r
    return out


# ---------------------------------------------------------------------------------------------
# Trace files
# ---------------------------------------------------------------------------------------------


def write_jsonl(path: Path, objs) -> Path:
    lines = [o if isinstance(o, str) else json.dumps(o) for o in objs]
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_LINE = {"program_id": "ok-0", "arrival_s": 0.0,
             "calls": [{"new_tokens": 10, "output_tokens": 2, "tool_s": 0.1}, {"new_tokens": 5, "output_tokens": 2}]}


__all__ = ["FakeProgram", "make_req", "make_scheduler", "apply_model_output", "step", "scheduled_ids",
           "ConstLatency", "make_deployment", "slow_tier", "call", "program", "sim_config", "run_sim",
           "rows_by_call", "write_jsonl", "GOOD_LINE", "REPO", "tiny_model", "h100"]
