"""Seeded synthetic workloads in the canonical format: SWE-agent-like coding programs and
multi-turn chat conversations.

Everything is drawn from one `numpy.random.Generator(PCG64(seed))` in a fixed order, so a
(params, seed) pair always gives the same programs, byte for byte once written.

Where the shapes come from (measured by us on the public samples in ../shared/reference;
"assumed" marks a number the data could not give):

* TraceLab example sessions (uw-syfi/TraceLab 0b8a262, example_sessions/sanitized,
  imported with `tracelab.read_round_trace`; 2 sessions, 19 rounds, Claude Code + Codex):
  - new tokens of calls after the first (tool observations): median 148, log-sd 1.66
    (14 non-zero values, 12..2537);
  - output tokens: median 273, log-sd 1.16 (19 values, 49..2475, Claude thinking included);
  - local shell tools (exec_command, Bash) wall time: median 91 ms over 11 calls,
    57 ms..1.18 s; file write 130 ms (one other write took 21.5 s, which we read as a
    permission prompt); web search 12.7..19.3 s;
  - user think time before a new user message: 6.3, 18.4, 19.9 s.
* Azure LLM inference trace 2023, conversation service (Azure/AzurePublicDataset
  b469a11, 19,366 requests): ContextTokens geometric mean 760, log-sd 0.99;
  GeneratedTokens geometric mean 151, log-sd 0.86, range 7..1000.

Nineteen rounds from two sessions fix medians roughly and spreads hardly at all; treat the
defaults as plausible shapes, not a fit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import call, program


def _check_common(n_programs, rate_per_s, window_s, prefix_tokens) -> None:
    if n_programs < 0:
        raise ValueError(f"n_programs must be >= 0, got {n_programs}")
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    if window_s is not None and not window_s > 0:
        raise ValueError(f"arrival_window_s must be > 0, got {window_s}")
    if prefix_tokens < 0:
        raise ValueError(f"prefix_tokens must be >= 0, got {prefix_tokens}")


@dataclass(frozen=True)
class LogNormal:
    """A log-normal law given by its median and log-space sd, clipped to [lo, hi]."""

    median: float
    sigma: float
    lo: float = 0.0
    hi: float = math.inf

    def __post_init__(self):
        if not self.median > 0:
            raise ValueError(f"median must be > 0, got {self.median}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if not self.lo <= self.median <= self.hi:
            raise ValueError(f"need lo <= median <= hi, got {self.lo}, {self.median}, {self.hi}")

    def sample(self, rng: np.random.Generator) -> float:
        x = self.median * math.exp(self.sigma * float(rng.standard_normal()))
        return min(max(x, self.lo), self.hi)

    def sample_int(self, rng: np.random.Generator) -> int:
        return int(min(max(round(self.sample(rng)), math.ceil(self.lo)), math.floor(self.hi)))


@dataclass(frozen=True)
class ToolSpec:
    """One agent tool: how often it is picked, how long it runs, how much it returns."""

    name: str
    weight: float  # relative frequency among the tools of a workload
    duration_s: LogNormal  # tool_s: execution + harness time until the next call is issued
    observation_tokens: LogNormal  # new_tokens of the call after it (the tool's output)

    def __post_init__(self):
        if not self.weight > 0:
            raise ValueError(f"tool {self.name!r}: weight must be > 0")


# SWE-agent's action vocabulary. Durations: bash/edit from the TraceLab medians above;
# view like edit (assumed); search is a local grep/find, not TraceLab's web search
# (assumed 0.3 s); test runs a test suite, the one long local action (assumed 8 s median).
# Observation sizes are assumed per tool, chosen so that their mix has a median near
# TraceLab's 148 tokens while file views and test logs run long; log-sd 1.0 (TraceLab: 1.66
# over all tools together).
SWE_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec("view", 0.30, LogNormal(0.10, 0.5, 0.01, 10.0), LogNormal(300, 1.0, 8, 8000)),
    ToolSpec("edit", 0.20, LogNormal(0.13, 0.5, 0.01, 10.0), LogNormal(80, 1.0, 8, 8000)),
    ToolSpec("bash", 0.20, LogNormal(0.09, 1.0, 0.01, 60.0), LogNormal(120, 1.0, 8, 8000)),
    ToolSpec("search", 0.15, LogNormal(0.30, 0.8, 0.01, 60.0), LogNormal(150, 1.0, 8, 8000)),
    ToolSpec("test", 0.15, LogNormal(8.0, 0.9, 0.5, 600.0), LogNormal(400, 1.0, 8, 8000)),
)


@dataclass(frozen=True)
class SweAgentParams:
    """A SWE-agent-like coding workload: a shared system prompt, then a chain of LLM calls
    each followed by one tool."""

    n_programs: int = 40
    rate_per_s: float = 1 / 3  # Poisson program arrivals (programs per second)
    arrival_window_s: float | None = None  # if set: n arrivals spread as a Poisson process
    #   conditioned on all n falling in [0, window) (sorted uniforms); rate_per_s unused
    prefix_id: str = "swe-agent-system-v1"
    prefix_tokens: int = 2400  # system prompt + tool docs + demonstration (assumed)
    min_calls: int = 5
    max_calls: int = 30  # calls per program: uniform integer in [min_calls, max_calls]
    task_tokens: LogNormal = LogNormal(700, 0.6, 100, 6000)  # issue text (assumed)
    # Output per call: TraceLab median 273 (with Claude's long file writes and thinking);
    # SWE-agent turns are a thought plus one command, so a lower median (assumed).
    output_tokens: LogNormal = LogNormal(180, 0.6, 16, 2048)
    tools: tuple[ToolSpec, ...] = SWE_TOOLS
    program_id_prefix: str = "swe"

    def __post_init__(self):
        _check_common(self.n_programs, self.rate_per_s, self.arrival_window_s,
                      self.prefix_tokens)
        if not 1 <= self.min_calls <= self.max_calls:
            raise ValueError(f"need 1 <= min_calls <= max_calls, got "
                             f"{self.min_calls}, {self.max_calls}")
        if not self.tools:
            raise ValueError("tools must not be empty")


@dataclass(frozen=True)
class ChatParams:
    """A multi-turn chat workload: conversations that arrive in bursts, with human think
    time between a reply and the next user turn."""

    n_programs: int = 60
    rate_per_s: float = 0.5  # mean conversation arrival rate
    burst_shape: float = 0.25  # Gamma shape of inter-arrival gaps: CV = 1/sqrt(shape);
    #   1.0 is Poisson, < 1 is bursty (assumed 0.25, CV 2)
    prefix_id: str = "chat-system-v1"
    prefix_tokens: int = 300  # a short shared system prompt (assumed); 0 = none
    min_turns: int = 2
    max_turns: int = 12
    continue_p: float = 0.75  # after each turn past min_turns the user goes on with this
    #   probability (geometric turn count, mean ~ min_turns + 3; assumed)
    first_user_tokens: LogNormal = LogNormal(760, 0.99, 2, 14050)  # Azure conv ContextTokens
    user_tokens: LogNormal = LogNormal(60, 0.9, 2, 4000)  # follow-up questions (assumed)
    output_tokens: LogNormal = LogNormal(151, 0.86, 7, 1000)  # Azure conv GeneratedTokens
    think_s: LogNormal = LogNormal(18.0, 0.8, 2.0, 300.0)  # TraceLab user gaps; sd assumed
    program_id_prefix: str = "chat"

    def __post_init__(self):
        _check_common(self.n_programs, self.rate_per_s, None, self.prefix_tokens)
        if not self.burst_shape > 0:
            raise ValueError(f"burst_shape must be > 0, got {self.burst_shape}")
        if not 1 <= self.min_turns <= self.max_turns:
            raise ValueError(f"need 1 <= min_turns <= max_turns, got "
                             f"{self.min_turns}, {self.max_turns}")
        if not 0 <= self.continue_p < 1:
            raise ValueError(f"continue_p must be in [0, 1), got {self.continue_p}")


# A tiny coding-agent trace for real vLLM-CPU runs with a tiny model: short prompts
# (< 2,000 tokens in total per program), short outputs, sub-second tools, all arrivals
# within 2 s. Shapes are the SWE ones squeezed into those ranges.
_TINY_OBS = LogNormal(120, 0.6, 50, 300)
TINY_CPU = SweAgentParams(
    n_programs=5,
    arrival_window_s=2.0,
    prefix_id="tiny-agent-system-v1",
    prefix_tokens=256,
    min_calls=3,
    max_calls=4,
    task_tokens=LogNormal(150, 0.5, 50, 300),
    output_tokens=LogNormal(16, 0.4, 8, 32),
    tools=(
        ToolSpec("view", 0.3, LogNormal(0.08, 0.5, 0.05, 0.5), _TINY_OBS),
        ToolSpec("edit", 0.2, LogNormal(0.10, 0.5, 0.05, 0.5), _TINY_OBS),
        ToolSpec("bash", 0.3, LogNormal(0.09, 0.8, 0.05, 0.5), _TINY_OBS),
        ToolSpec("test", 0.2, LogNormal(0.35, 0.4, 0.05, 0.5), _TINY_OBS),
    ),
    program_id_prefix="tiny",
)


def _poisson_arrivals(rng: np.random.Generator, n: int, rate: float,
                      window_s: float | None) -> list[float]:
    """n arrival times of a Poisson process; the first program opens the trace at 0."""
    if n == 0:
        return []
    if window_s is not None:
        # Given n events of a Poisson process in [0, T), their times are n sorted uniforms.
        return sorted(round(float(t), 3) for t in rng.uniform(0.0, window_s, size=n))
    gaps = rng.exponential(1.0 / rate, size=n - 1)
    return [0.0] + [round(float(t), 3) for t in np.cumsum(gaps)]


def _gamma_arrivals(rng: np.random.Generator, n: int, rate: float, shape: float) -> list[float]:
    """n arrivals of a Gamma renewal process with mean gap 1/rate and CV 1/sqrt(shape)."""
    if n == 0:
        return []
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n - 1)
    return [0.0] + [round(float(t), 3) for t in np.cumsum(gaps)]


def _pick_tool(rng: np.random.Generator, tools: tuple[ToolSpec, ...],
               weights: np.ndarray) -> ToolSpec:
    return tools[int(rng.choice(len(tools), p=weights))]


def swe_agent_programs(params: SweAgentParams = SweAgentParams(),
                       seed: int = 0) -> Iterator[dict[str, Any]]:
    """Yield SWE-agent-like programs, in arrival order, deterministic under `seed`.

    Call 0's new tokens are the task; call k+1's new tokens are the output of the tool run
    after call k; the last call (the submission) runs no tool.
    """
    rng = np.random.default_rng(seed)
    weights = np.array([t.weight for t in params.tools], dtype=float)
    weights /= weights.sum()
    arrivals = _poisson_arrivals(rng, params.n_programs, params.rate_per_s,
                                 params.arrival_window_s)
    width = max(4, len(str(params.n_programs - 1)))
    for i, arrival in enumerate(arrivals):
        n_calls = int(rng.integers(params.min_calls, params.max_calls + 1))
        calls = []
        new = params.task_tokens.sample_int(rng)
        for k in range(n_calls):
            out = params.output_tokens.sample_int(rng)
            if k + 1 < n_calls:
                tool = _pick_tool(rng, params.tools, weights)
                calls.append(call(new, out, tool.name, round(tool.duration_s.sample(rng), 3)))
                new = tool.observation_tokens.sample_int(rng)
            else:
                calls.append(call(new, out))
        yield program(f"{params.program_id_prefix}-{i:0{width}d}", arrival, calls,
                      prefix_id=params.prefix_id if params.prefix_tokens else None,
                      prefix_tokens=params.prefix_tokens,
                      meta={"generator": "swe_agent", "seed": seed})


def chat_programs(params: ChatParams = ChatParams(), seed: int = 0) -> Iterator[dict[str, Any]]:
    """Yield multi-turn chat conversations, in arrival order, deterministic under `seed`.

    Each call is one user turn and the model's reply; the gap after it (tool "human") is
    the user's think time before the next turn.
    """
    rng = np.random.default_rng(seed)
    arrivals = _gamma_arrivals(rng, params.n_programs, params.rate_per_s, params.burst_shape)
    width = max(4, len(str(params.n_programs - 1)))
    for i, arrival in enumerate(arrivals):
        n_turns = params.min_turns
        while n_turns < params.max_turns and rng.random() < params.continue_p:
            n_turns += 1
        calls = []
        for k in range(n_turns):
            law = params.first_user_tokens if k == 0 else params.user_tokens
            new = law.sample_int(rng)
            out = params.output_tokens.sample_int(rng)
            if k + 1 < n_turns:
                calls.append(call(new, out, "human", round(params.think_s.sample(rng), 3)))
            else:
                calls.append(call(new, out))
        yield program(f"{params.program_id_prefix}-{i:0{width}d}", arrival, calls,
                      prefix_id=params.prefix_id if params.prefix_tokens else None,
                      prefix_tokens=params.prefix_tokens,
                      meta={"generator": "chat", "seed": seed})


def tiny_cpu_programs(seed: int = 0) -> Iterator[dict[str, Any]]:
    """The TINY_CPU preset (see above)."""
    return swe_agent_programs(TINY_CPU, seed)
