"""Which batch ran in each logged engine step: our scheduler mirror, replayed against the log.

The iteration log gives per step only counts (context requests and tokens, generation
requests and tokens) and the execute time; the latency model needs each prefill chunk's
size and cached context and the decodes' summed context. We rebuild them by running our own
vLLM v1 scheduler mirror (`simulator.engine.Scheduler` + `KVCacheManager`, with the
engine's real block count, block size and limits) on the same requests, one `schedule()`
per logged step. The one thing the client cannot know is when a request reached the engine,
so arrivals are inferred: before each step, the fewest of the submitted-but-not-yet-seen
requests whose arrival makes the mirror's step match the logged counts (requests sent
together may reach the engine in any order, so orders are tried too; requests of the same
shape are interchangeable). Every other difference is a mismatch between the mirror and the real engine: it is
recorded (a finding about the mirror), the rest of that experiment is not attributed, and
the mirror is reset at the next experiment, when the real engine is idle again.

A log line belongs to the last experiment that started before it was stamped (experiments
run one after another with the engine idle in between). Lines before the first experiment,
dummy lines and lines after a mismatch are discarded and counted.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

from simulator.config import PolicyConfig
from simulator.engine.kv_cache_manager import KVCacheManager
from simulator.engine.request import FINISHED, Request
from simulator.engine.scheduler import Scheduler, SchedulerOutput
from simulator.latency.base import step_features
from simulator.policies.scheduling import SCHEDULERS

from .experiments import WARMUP, RequestSpec
from .runner import ExperimentRun


@dataclass(frozen=True)
class MirrorLimits:
    num_gpu_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True


@dataclass(frozen=True)
class LoggedStep:
    """The fields of one iteration-details line that attribution uses (a view of
    `replay.vllm_server.IterationRecord`, so hand-made excerpts are easy to write)."""

    iteration: int
    t_s: float
    elapsed_ms: float
    num_context_reqs: int
    num_context_tokens: int
    num_generation_reqs: int
    num_generation_tokens: int
    kv_usage: float = 0.0
    is_dummy: bool = False

    @classmethod
    def of(cls, rec) -> "LoggedStep":
        return cls(rec.iteration, rec.t_s, rec.elapsed_ms, rec.num_context_reqs, rec.num_context_tokens,
                   rec.num_generation_reqs, rec.num_generation_tokens, rec.kv_usage, rec.is_dummy)


@dataclass
class StepRow:
    """One attributed step: what the log says and the batch the mirror says ran."""

    experiment: str
    kind: str
    iteration: int
    t_s: float
    elapsed_ms: float
    num_context_reqs: int
    num_context_tokens: int
    num_generation_reqs: int
    num_generation_tokens: int
    kv_usage: float
    arrivals: int  # requests inferred to have reached the engine just before this step
    busy: bool  # the engine went straight from the previous logged step to this one
    chunks: str  # prefill chunks "n@ctx;n@ctx"
    prefill_tokens: int
    prefill_attn: float
    prefill_kv: int
    num_prefills: int
    num_decodes: int
    decode_ctx_sum: int
    num_sampled: int
    num_seqs: int
    other_cpu: float = 0.0  # cores other programs used during the experiment
    # not busy: how long the engine sat without a request before this step (its start, stamp -
    # elapsed, less the previous logged step's stamp); None when busy or when that step is
    # unknown (the first logged step). Profiling data written before this field had none
    # (`fill_idle_gaps` adds it from the rows).
    idle_s: float | None = None


@dataclass
class Mismatch:
    experiment: str
    iteration: int | None
    what: str


@dataclass
class Attribution:
    steps: list[StepRow] = field(default_factory=list)
    discarded: Counter = field(default_factory=Counter)  # reason -> number of log lines
    mismatches: list[Mismatch] = field(default_factory=list)
    cached_checked: int = 0  # requests whose prefix-cache hit was compared with the server's

    def summary(self) -> dict:
        return {
            "steps_attributed": len(self.steps),
            "lines_discarded": dict(sorted(self.discarded.items())),
            "mirror_mismatches": len(self.mismatches),
            "mismatch_examples": [m.__dict__ for m in self.mismatches[:10]],
            "prefix_hits_checked": self.cached_checked,
        }


class _Mismatch(Exception):
    pass


class MirrorEngine:
    """The simulator's scheduler and KV cache, fed by hand: requests are submitted, then one
    step is taken per logged line, with the arrivals that make it match."""

    def __init__(self, limits: MirrorLimits):
        self.limits = limits
        kv = KVCacheManager(limits.num_gpu_blocks, limits.block_size, limits.enable_prefix_caching,
                            limits.max_model_len)
        policy = SCHEDULERS.get("fcfs")(PolicyConfig())
        self.sched = Scheduler(kv, limits.max_num_seqs, limits.max_num_batched_tokens, policy,
                               limits.enable_chunked_prefill, 0, limits.max_model_len)
        self.pending: list[Request] = []
        self._next_id = 0
        self._prefix_ids: dict[str, int] = {}
        self.seen: dict[int, Request] = {}  # the mirror's current object of each scheduled request

    def request_for(self, spec: RequestSpec) -> Request:
        """A mirror request whose block identities follow the spec's token ids: the shared
        prefix's full blocks are keyed by the prefix, all other blocks are unique."""
        self._next_id += 1
        rid = self._next_id
        bs = self.limits.block_size
        pkey, pblocks = 0, 0
        if spec.prefix_id is not None and spec.prefix_len:
            pidx = self._prefix_ids.setdefault(spec.prefix_id, len(self._prefix_ids) + 1)
            pkey, pblocks = -(pidx << 32), spec.prefix_len // bs
        return Request(rid, spec.prompt_len, spec.max_tokens, 0.0, key_base=rid << 32,
                       prefix_key_base=pkey, prefix_full_blocks=pblocks)

    def submit(self, reqs: list[Request]) -> None:
        self.pending.extend(reqs)

    def idle(self) -> bool:
        return not self.pending and not self.sched.has_unfinished()

    def step(self, line: LoggedStep) -> tuple[SchedulerOutput, int]:
        """Schedule one step that matches the line's counts; (output, inferred arrivals).
        Raises _Mismatch when no number of arrivals makes it match."""
        if not self.pending:
            out = self.sched.schedule(0.0)
            if not _matches(out, line):
                raise _Mismatch(f"mirror scheduled {_counts(out)}, log has {_line_counts(line)}")
            self._apply_output(out)
            return out, 0
        tried = []
        for order in self._arrival_orders():
            sched, new = copy.deepcopy((self.sched, [self.pending[i] for i in order]))
            for r in new:
                sched.add_request(r)
            out = sched.schedule(0.0)
            tried.append(_counts(out))
            if _matches(out, line):
                self.sched = sched
                taken = set(order)
                self.pending = [r for i, r in enumerate(self.pending) if i not in taken]
                self._apply_output(out)
                return out, len(order)
        self.pending = []
        raise _Mismatch(f"no arrivals fit: mirror would schedule {sorted(set(tried))}, log has {_line_counts(line)}")

    def _arrival_orders(self, limit: int = 400):
        """Which pending requests reached the engine before this step, and in what order:
        fewest first; requests sent together may arrive in any order, so every ordered
        choice is tried, except that requests of the same shape are interchangeable (only
        one representative order of them is tried). At most `limit` tries."""
        sig = [(r.num_prompt_tokens, r.max_tokens, r.prefix_key_base, r.prefix_full_blocks) for r in self.pending]
        groups: dict = {}
        for i, g in enumerate(sig):
            groups.setdefault(g, []).append(i)  # same shape: taken in submission order
        keys = sorted(groups, key=lambda g: groups[g][0])
        count = 0
        for k in range(len(sig) + 1):
            for order in _orders(keys, groups, {g: 0 for g in keys}, k):
                yield order
                count += 1
                if count >= limit:
                    return

    def _apply_output(self, out: SchedulerOutput) -> None:
        """As the engine does when a step ends: requests whose computed tokens reached their
        token count sample one token; finished ones leave and free their blocks."""
        sched = self.sched
        for req, _n in out.scheduled:
            self.seen[req.request_id] = req
            if req.num_computed_tokens < req.num_tokens:
                continue
            req.num_output_tokens += 1
            if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.limits.max_model_len:
                sched.finish(req)
                req.status = FINISHED
                sched.kv.free(req)

    def reset_requests(self) -> int:
        """Drop whatever is still queued or running (after a mismatch); how many were."""
        sched = self.sched
        n = len(self.pending) + len(sched.running) + len(sched.waiting)
        for req in list(sched.running):
            sched.finish(req)
            sched.kv.free(req)
        while sched.waiting:
            req = sched.waiting.pop()
            sched.kv.free(req)
        self.pending = []
        return n


def _orders(keys, groups, used, k):
    """Ordered choices of k requests, as distinct sequences of shapes (submission order first)."""
    if k == 0:
        yield ()
        return
    for g in keys:
        if used[g] < len(groups[g]):
            i = groups[g][used[g]]
            used[g] += 1
            for rest in _orders(keys, groups, used, k - 1):
                yield (i,) + rest
            used[g] -= 1


def _counts(out: SchedulerOutput) -> tuple[int, int, int, int]:
    return (len(out.prefill_chunks), sum(n for n, _ in out.prefill_chunks), out.num_decodes, out.num_decodes)


def _line_counts(line: LoggedStep) -> tuple[int, int, int, int]:
    return (line.num_context_reqs, line.num_context_tokens, line.num_generation_reqs, line.num_generation_tokens)


def _matches(out: SchedulerOutput, line: LoggedStep) -> bool:
    return _counts(out) == _line_counts(line)


def assign_lines(lines: list[LoggedStep], runs: list[ExperimentRun]) -> tuple[list[list[LoggedStep]], int]:
    """Lines per experiment (the last one started before the line's stamp), and how many
    lines came before the first experiment."""
    per = [[] for _ in runs]
    before = 0
    starts = [r.t_start for r in runs]
    j = -1
    for line in sorted(lines, key=lambda x: (x.t_s, x.iteration)):
        while j + 1 < len(starts) and starts[j + 1] <= line.t_s:
            j += 1
        if j < 0:
            before += 1
        else:
            per[j].append(line)
    return per, before


def attribute(lines, runs: list[ExperimentRun], specs: dict[str, list[RequestSpec]],
              limits: MirrorLimits) -> Attribution:
    """Attribute logged steps to the experiments' batches (see the module doc).

    `lines`: IterationRecords or LoggedSteps in log order; `specs`: each experiment's
    requests in submission order.
    """
    res = Attribution()
    steps = []
    for rec in lines:
        line = rec if isinstance(rec, LoggedStep) else LoggedStep.of(rec)
        if line.is_dummy:
            res.discarded["dummy step"] += 1
        elif line.t_s is None:
            res.discarded["no epoch time stamp"] += 1
        else:
            steps.append(line)
    per, before = assign_lines(steps, runs)
    if before:
        res.discarded["before the first experiment"] += before
    mirror = MirrorEngine(limits)
    for run, run_lines in zip(runs, per):
        run_lines.sort(key=lambda x: x.iteration)  # the engine's step order
        _attribute_run(mirror, run, run_lines, specs[run.name], res)
    fill_idle_gaps(res.steps, {line.iteration: line.t_s for line in steps})
    return res


def fill_idle_gaps(rows: list[StepRow], stamps: dict[int, float] | None = None) -> None:
    """Give the rows that are not busy and have no idle_s yet their idle gap: the step's start
    (stamp - elapsed) less the previous logged step's stamp. `stamps`: iteration -> stamp of
    every logged step; by default the rows' own (profiling data written before idle_s was
    recorded, where every logged step is attributed)."""
    if stamps is None:
        stamps = {r.iteration: r.t_s for r in rows}
    for r in rows:
        if r.idle_s is None and not r.busy and r.iteration - 1 in stamps:
            r.idle_s = max(r.t_s - r.elapsed_ms / 1000.0 - stamps[r.iteration - 1], 0.0)


def _attribute_run(mirror: MirrorEngine, run: ExperimentRun, lines: list[LoggedStep],
                   specs: list[RequestSpec], res: Attribution) -> None:
    reqs = [mirror.request_for(s) for s in specs]
    mirror.submit(reqs)
    prev_busy = False
    prev_iteration = None
    for i, line in enumerate(lines):
        try:
            out, k = mirror.step(line)
        except _Mismatch as e:
            res.mismatches.append(Mismatch(run.name, line.iteration, str(e)))
            res.discarded["after a mirror mismatch"] += len(lines) - i
            mirror.reset_requests()
            return
        consecutive = prev_iteration is not None and line.iteration == prev_iteration + 1
        res.steps.append(_row(run, line, out, k, prev_busy and consecutive))
        prev_iteration = line.iteration
        prev_busy = mirror.sched.has_unfinished()
    if not mirror.idle():
        n = mirror.reset_requests()
        res.mismatches.append(Mismatch(run.name, None, f"the log ended the experiment with {n} request(s) "
                                       "still queued or running in the mirror"))
        return
    by_name = {r.name: r for r in run.requests}
    for spec, req in zip(specs, reqs):
        got = by_name.get(spec.name)
        if got is None or got.cached_tokens is None:
            continue
        res.cached_checked += 1
        mine = mirror.seen.get(req.request_id, req).num_cached_tokens
        if got.cached_tokens != mine:
            res.mismatches.append(Mismatch(run.name, None, f"{spec.name}: server cached {got.cached_tokens} "
                                           f"prompt tokens, mirror {mine}"))


def _row(run: ExperimentRun, line: LoggedStep, out: SchedulerOutput, k: int, busy: bool) -> StepRow:
    f = step_features(out.prefill_chunks, out.num_decodes, out.decode_ctx_sum, out.num_sampled)
    kind = run.kind if run.kind == WARMUP else _step_kind(f)
    return StepRow(
        experiment=run.name, kind=kind, iteration=line.iteration, t_s=line.t_s, elapsed_ms=line.elapsed_ms,
        num_context_reqs=line.num_context_reqs, num_context_tokens=line.num_context_tokens,
        num_generation_reqs=line.num_generation_reqs, num_generation_tokens=line.num_generation_tokens,
        kv_usage=line.kv_usage, arrivals=k, busy=busy,
        chunks=";".join(f"{n}@{c}" for n, c in out.prefill_chunks),
        prefill_tokens=f.prefill_tokens, prefill_attn=f.prefill_attn, prefill_kv=f.prefill_kv,
        num_prefills=f.num_prefills, num_decodes=f.num_decodes, decode_ctx_sum=f.decode_ctx_sum,
        num_sampled=f.num_sampled, num_seqs=f.num_seqs, other_cpu=run.other_cpu,
    )


def _step_kind(f) -> str:
    if f.num_prefills and f.num_decodes:
        return "mixed"
    return "prefill" if f.num_prefills else "decode"
