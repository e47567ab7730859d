"""Reference steps: how fast the machine is right now, next to each live measurement.

A profile is taken once; a shared CPU machine's speed drifts by tens of % over minutes (other
tenants, frequency, cache pressure). So before and after each live replay of a case the
matrix runs a few designed batches on the same server (`REFERENCE_GRID`, the profiling grid's
experiments at a handful of sizes: single prefills over no and over a cached context, decode
batches of 1 and of max_num_seqs), attributes their steps exactly as `asim-calibrate` does,
and compares their logged execute times with what the profile's execute part predicts for
those same batches. The ratio is the machine's speed relative to profiling time:

    factor = sqrt(Σ measured / Σ predicted over prefill steps
                  · Σ measured / Σ predicted over decode steps)

(prefill and decode weigh equally) sums it up in one number; the simulation uses the two
ratios apart, since a shared machine does not slow both alike (other tenants' load hits the
compute-bound prefill and the memory-bound decode differently): over a case's reference runs
the median prefill ratio scales every step with prefill work and the median decode ratio
every pure-decode step (`latency.step_time_scale`, `latency.decode_step_time_scale`). The
single prefill requests also give the frontend delay as the machine shows it then (client
TTFT less the step's execute time and the profile's host time, as the profiling probe
measures it): on a loaded machine the API server and the client slow down too. They are sent
by the profiling client, not the live one, so the profile's frontend (`latency.frontend_s`,
split in the profile's proportion) is moved by their difference from what the profiling
client measured the same way at profiling time (`frontend.runner_client_s`: 3.72 / 3.78 ms
on the CPU profiles, against 3.96 / 3.95 ms for the live client's probe). The
reference batches are not the case's trace and share none of its prompts, so nothing of the
measurement being checked goes into these; the simulation rerun at them is the
simulator's prediction for the machine as it was at the time of the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from calibrate.attribution import MirrorLimits, attribute
from calibrate.experiments import PREFILL, WARMUP, EngineLimits, GridSpec, design, with_suffix
from calibrate.frontend import runner_frontend_samples
from calibrate.runner import Client, run_all

# Small enough to run in about a second on the tiny CPU models; sizes inside the full grid's.
REFERENCE_GRID = GridSpec(
    chunk_sizes=(128, 512),
    cached_contexts_blocks=(0, 8),
    decode_batch_sizes=(1, -1),
    decode_prompt_lens=(256,),
    decode_output_tokens=24,
    mixed_decoders=(),
    mixed_prefill_lens=(),
    mixed_cached_blocks=(),
    mixed_decoder_prompt=0,
    repeats=1,
)
KINDS = ("prefill", "decode")


class ReferenceStepsError(RuntimeError):
    """The reference batches could not be run or attributed."""


@dataclass
class ReferenceRun:
    """One run of the reference batches and the machine speed it showed."""

    tag: str
    t_start: float
    t_end: float
    ratios: dict[str, float] = field(default_factory=dict)  # kind -> Σ measured / Σ predicted
    steps: dict[str, int] = field(default_factory=dict)  # kind -> steps compared
    mismatches: int = 0
    frontend_s: float | None = None  # median client TTFT - (execute + host) of single prefills
    frontend_samples: int = 0

    @property
    def factor(self) -> float | None:
        r = [self.ratios[k] for k in KINDS if self.ratios.get(k)]
        return math.exp(sum(math.log(x) for x in r) / len(r)) if r else None

    def to_dict(self) -> dict:
        f = self.factor
        return {"tag": self.tag, "t_start": round(self.t_start, 3), "t_end": round(self.t_end, 3),
                "factor": None if f is None else round(f, 4),
                "ratios": {k: round(v, 4) for k, v in self.ratios.items()}, "steps": self.steps,
                "mismatches": self.mismatches,
                "frontend_ms": None if self.frontend_s is None else round(1000.0 * self.frontend_s, 3),
                "frontend_samples": self.frontend_samples}


def reference_experiments(limits: EngineLimits, tag: str):
    """The reference batches under a fresh name (so nothing of them is cached yet)."""
    return [with_suffix(e, f"~{tag}") for e in design(limits, REFERENCE_GRID) if e.kind != WARMUP]


def engine_limits(profile: dict, vocab_size: int) -> tuple[EngineLimits, MirrorLimits]:
    """The limits the reference batches are designed for, from the profile's engine facts."""
    e = profile.get("engine") or {}
    missing = [k for k in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens",
                           "max_model_len") if not e.get(k)]
    if missing:
        raise ReferenceStepsError(f"the profile's engine section lacks {missing}")
    limits = EngineLimits(e["block_size"], e["max_model_len"], e["max_num_batched_tokens"], e["max_num_seqs"],
                          vocab_size)
    mirror = MirrorLimits(e["num_gpu_blocks"], e["block_size"], e["max_num_seqs"], e["max_num_batched_tokens"],
                          e["max_model_len"], bool(e.get("enable_prefix_caching", True)),
                          bool(e.get("enable_chunked_prefill", True)))
    return limits, mirror


def run_reference(base_url: str, log_path, profile: dict, vocab_size: int, tag: str,
                  prefix_caching: bool = True, settle_s: float = 0.5) -> ReferenceRun:
    """Run the reference batches on a live server and compare their steps with the profile.
    `prefix_caching`: whether this server caches prefixes (the mirror must know)."""
    from replay.vllm_server import parse_iteration_log

    from calibrate.profile import execute_model, host_step_s

    limits, mirror = engine_limits(profile, vocab_size)
    if not prefix_caching:
        mirror = MirrorLimits(**{**mirror.__dict__, "enable_prefix_caching": False})
    exps = reference_experiments(limits, tag)
    client = Client(base_url, "model", vocab_size, seed=0)
    t0 = time.time()
    runs, ran = run_all(client, exps, retries=0)
    time.sleep(settle_s)  # the last iteration lines reach the log
    t1 = time.time()
    records = [r for r in parse_iteration_log(log_path) if r.t_s is not None and t0 <= r.t_s <= t1]
    attr = attribute(records, runs, {e.name: e.requests() for e in ran}, mirror)
    if not attr.steps:
        raise ReferenceStepsError(f"reference {tag}: no step could be attributed ({dict(attr.discarded)})")
    model = execute_model(profile)
    out = ReferenceRun(tag, t0, t1, mismatches=len(attr.mismatches))
    for kind in KINDS:
        rows = [r for r in attr.steps if r.kind == kind and r.elapsed_ms > 0]
        if rows:
            meas = sum(r.elapsed_ms for r in rows) / 1000.0
            pred = sum(model.time_of(_features(r)) for r in rows)
            out.ratios[kind] = meas / pred
            out.steps[kind] = len(rows)
    fe = runner_frontend_samples(runs, attr.steps, host_step_s(profile) or 0.0)
    if fe:
        out.frontend_s, out.frontend_samples = _median(fe), len(fe)
    return out


def _features(row):
    from calibrate.fit import feature_value
    from simulator.latency.base import StepFeatures
    from simulator.latency.linear import IDLE_FEATURE
    return StepFeatures(row.prefill_tokens, row.prefill_attn, row.prefill_kv, row.num_prefills, row.num_decodes,
                        row.decode_ctx_sum, row.num_sampled, int(feature_value(row, IDLE_FEATURE)))


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def case_factor(runs: list[ReferenceRun]) -> float | None:
    """The median of a case's reference factors (before and after each measurement)."""
    return _median([f for f in (r.factor for r in runs) if f is not None])


def case_scales(runs: list[ReferenceRun]) -> tuple[float, float] | None:
    """(steps with prefill work, pure-decode steps): the medians of a case's prefill and decode
    ratios, for `latency.step_time_scale` and `latency.decode_step_time_scale`. A kind no run
    measured takes the other's."""
    p = _median([r.ratios["prefill"] for r in runs if r.ratios.get("prefill")])
    d = _median([r.ratios["decode"] for r in runs if r.ratios.get("decode")])
    if p is None and d is None:
        return None
    return (p if p is not None else d), (d if d is not None else p)


def case_frontend(runs: list[ReferenceRun], profile: dict | None = None) -> float | None:
    """The frontend delay for `latency.frontend_s`: the median of a case's reference frontend
    delays. These are measured with the profiling client; the profile's frontend with the
    live client (its probe), which is what a live replay's TTFT holds. Where the profile also
    has the profiling client's measure (`runner_client_s`), the result is the profile's
    frontend moved by what the reference saw against that: like with like."""
    ref = _median([r.frontend_s for r in runs if r.frontend_s is not None])
    fe = ((((profile or {}).get("latency_model") or {}).get("fit") or {}).get("parts") or {}).get("frontend") or {}
    if ref is None or fe.get("runner_client_s") is None or fe.get("frontend_s") is None:
        return ref
    return float(fe["frontend_s"]) + ref - float(fe["runner_client_s"])
