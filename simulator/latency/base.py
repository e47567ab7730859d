"""The latency model interface and the step features shared by every model."""

from __future__ import annotations

import copy
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepFeatures:
    """Batch shape of one step, reduced to what latency depends on."""

    prefill_tokens: int      # new tokens of prefill chunks
    prefill_attn: float      # causal attention work of the chunks: Σ n·(ctx + (n+1)/2)
    prefill_kv: int          # KV positions the chunks read: Σ (ctx + n)
    num_prefills: int
    num_decodes: int
    decode_ctx_sum: int      # KV positions decodes read: Σ (ctx + 1)
    num_sampled: int         # requests that produce a token this step
    idle_start: int = 0      # 1: the step wakes an engine that had no request for IDLE_WAKE_AFTER_S

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.num_decodes

    @property
    def num_seqs(self) -> int:
        return self.num_prefills + self.num_decodes


def step_features(prefill_chunks, num_decodes: int, decode_ctx_sum: int, num_sampled: int) -> StepFeatures:
    pt = pk = 0
    pa = 0.0
    for n, c in prefill_chunks:
        pt += n
        pk += c + n
        pa += n * (c + (n + 1) * 0.5)
    return StepFeatures(pt, pa, pk, len(prefill_chunks), num_decodes, decode_ctx_sum, num_sampled)


class LatencyModel:
    """Base class. Subclasses implement `time_of(features)` and `breakdown(features)`.

    `idle_start_s`: what a step costs on top when it wakes an engine that had no request at
    all for at least `linear.IDLE_WAKE_AFTER_S` (vLLM's engine core blocks on its input queue
    then, and the first step after it runs slower: calibrate's `idle_start` feature). The
    instance adds it to such a step; `step_time` and `decode_step_time` price a step of an
    engine already running."""

    kind = "base"
    idle_start_s = 0.0

    def step_time(self, prefill_chunks, num_decodes: int, decode_ctx_sum: int, num_sampled: int,
                  decode_ctx_max: int | None = None, ep_tokens: int | None = None) -> float:
        """`decode_ctx_max`: the longest decode's context + 1 (for models of the slowdown of
        decode attention over uneven lengths); `ep_tokens`: the tokens of all expert-parallel
        ranks in this step (None: each rank as many as this one). Models that do not use
        them ignore them."""
        return self.time_of(step_features(prefill_chunks, num_decodes, decode_ctx_sum, num_sampled))

    def decode_step_time(self, num_decodes: int, decode_ctx_sum: int, decode_ctx_max: int | None = None,
                         ep_tokens: int | None = None) -> float:
        """A pure-decode step (every request samples). Hot path of decode runs."""
        return self.time_of(StepFeatures(0, 0.0, 0, 0, num_decodes, decode_ctx_sum, num_decodes))

    def time_of(self, f: StepFeatures) -> float:
        raise NotImplementedError

    def breakdown(self, f: StepFeatures) -> dict[str, float]:
        return {"total": self.time_of(f)}

    def describe(self) -> dict:
        return {"kind": self.kind}


class ScaledLatency(LatencyModel):
    """Another model's step times times a constant: a what-if (a device `scale` times as fast
    or slow) and validation's sensitivity check (how much a metric moves per % of step time).
    With `decode_scale`, pure-decode steps take that factor instead and steps with prefill
    work keep `scale` (validation's reference steps measure the machine's speed for the two
    apart). `ep_tokens` passes through (see LatencyModel.step_time)."""

    kind = "scaled"

    def __init__(self, inner: LatencyModel, scale: float, decode_scale: float | None = None):
        self.inner = inner
        self.scale = float(scale)
        self.decode_scale = self.scale if decode_scale is None else float(decode_scale)
        self.idle_start_s = self.scale * inner.idle_start_s  # such a step has prefill work

    def step_time(self, prefill_chunks, num_decodes: int, decode_ctx_sum: int, num_sampled: int,
                  decode_ctx_max: int | None = None, ep_tokens: int | None = None) -> float:
        s = self.scale if prefill_chunks else self.decode_scale
        return s * self.inner.step_time(prefill_chunks, num_decodes, decode_ctx_sum, num_sampled,
                                        decode_ctx_max, ep_tokens)

    def decode_step_time(self, num_decodes: int, decode_ctx_sum: int, decode_ctx_max: int | None = None,
                         ep_tokens: int | None = None) -> float:
        return self.decode_scale * self.inner.decode_step_time(num_decodes, decode_ctx_sum, decode_ctx_max,
                                                               ep_tokens)

    def time_of(self, f: StepFeatures) -> float:
        return (self.scale if f.num_prefills else self.decode_scale) * self.inner.time_of(f)

    def breakdown(self, f: StepFeatures) -> dict[str, float]:
        s = self.scale if f.num_prefills else self.decode_scale
        return {k: s * v for k, v in self.inner.breakdown(f).items()}

    def describe(self) -> dict:
        d = {**self.inner.describe(), "step_time_scale": self.scale}
        if self.decode_scale != self.scale:
            d["decode_step_time_scale"] = self.decode_scale
        return d


def without_overlap(model: LatencyModel) -> LatencyModel:
    """The same model with its host work not hidden behind the device's step: what a step
    costs under async scheduling when nothing ran while it was scheduled (the engine was idle,
    or had nothing to schedule ahead), device + host as in the synchronous engine. Models
    without an `async_overlap` option are returned as they are."""
    if isinstance(model, ScaledLatency):
        inner = without_overlap(model.inner)
        if inner is model.inner:
            return model
        twin = copy.copy(model)
        twin.inner = inner
        return twin
    if getattr(model, "async_overlap", False):
        twin = copy.copy(model)
        twin.async_overlap = False
        return twin
    return model


def window_pairs(n: float, c: float, window: int) -> float:
    """Causal attention work of a chunk of n new tokens over c cached ones in a sliding-window
    layer: query i (0-based from the chunk start) sees min(c + i + 1, window) keys. The
    full-attention work is n·(c + (n+1)/2), the same sum without the window."""
    a, b = c + 1.0, c + n  # keys seen by the first and the last query without the window
    if b <= window:
        return n * (a + b) * 0.5
    if a >= window:
        return n * float(window)
    return (a + window) * (window - a + 1.0) * 0.5 + (b - window) * float(window)


def chunk_pairs(n: float, c: float, chunk: int) -> float:
    """The same for a chunked local attention layer (Llama 4): query at position p sees the
    keys of its own chunk of `chunk` positions, (p mod chunk) + 1 of them."""
    def upto(x: float) -> float:  # keys seen by the queries at positions 0 .. x-1
        q, r = divmod(x, chunk)
        return q * chunk * (chunk + 1) * 0.5 + r * (r + 1) * 0.5
    return upto(c + n) - upto(c)


def local_pairs(n: float, c: float, span: int, chunked: bool) -> float:
    """Causal work of a chunk in a local-attention layer: chunked (chunk_pairs) or sliding-window
    (window_pairs)."""
    return chunk_pairs(n, c, span) if chunked else window_pairs(n, c, span)

