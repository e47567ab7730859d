"""The designed profiling grid: batches whose composition is known before they run.

Three kinds of experiment, each a list of phases; the requests of a phase are sent together
and the next phase starts when all of them have finished, so the engine is idle between
phases and between experiments:

- prefill: one request with `max_tokens=1` whose first C tokens (a multiple of the block
  size) were cached by a previous "warm" request of those C tokens: a step with one chunk of
  P - C new tokens over C cached ones, split by `max_num_batched_tokens` when larger.
  Grid: chunk sizes x cached contexts.
- decode: B concurrent requests with a prompt of L tokens and T output tokens: after their
  prefill, pure-decode steps of B requests with contexts L + j. Grid: B x L.
- mixed: B decoders, then (once they stream) one long prefill, over a cached prefix or not:
  steps with B decodes plus a prefill chunk of the leftover token budget.

Prompts are token ids drawn from a seeded generator (no tokenizer); identical prefixes give
prefix-cache hits, everything else is unique. Nothing here talks to a server.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

PREFILL, DECODE, MIXED, WARMUP = "prefill", "decode", "mixed", "warmup"

# Token ids 0..2 are bos/eos/unk in the Llama-style configs we use; keep prompts clear of them.
_FIRST_ID = 3


@dataclass(frozen=True)
class EngineLimits:
    """The engine settings the grid must respect (from the running engine, not guessed)."""

    block_size: int
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int
    vocab_size: int


@dataclass(frozen=True)
class RequestSpec:
    """One completion request. Its prompt is `prefix_len` tokens of the shared prefix
    `prefix_id` (when given) followed by tokens unique to `name`."""

    name: str
    prompt_len: int
    max_tokens: int
    prefix_id: str | None = None
    prefix_len: int = 0
    after_first_tokens: bool = False  # send once the phase's other requests stream
    delay_s: float = 0.0  # extra wait before sending (after the above, if set)

    def __post_init__(self):
        if not 0 <= self.prefix_len < self.prompt_len:
            raise ValueError(f"{self.name}: prefix_len must be in [0, prompt_len)")
        if self.max_tokens < 1:
            raise ValueError(f"{self.name}: max_tokens must be >= 1")


@dataclass(frozen=True)
class Experiment:
    name: str
    kind: str
    phases: tuple[tuple[RequestSpec, ...], ...]
    params: dict = field(default_factory=dict, compare=False, hash=False)

    def requests(self) -> list[RequestSpec]:
        return [r for phase in self.phases for r in phase]


def prompt_tokens(spec: RequestSpec, vocab_size: int, seed: int) -> list[int]:
    """The token ids of a request's prompt: deterministic in (spec, seed)."""
    out: list[int] = []
    if spec.prefix_id is not None and spec.prefix_len:
        out += _ids(f"prefix:{spec.prefix_id}", spec.prefix_len, vocab_size, seed)
    out += _ids(f"own:{spec.name}", spec.prompt_len - len(out), vocab_size, seed)
    return out


def _ids(label: str, n: int, vocab_size: int, seed: int) -> list[int]:
    rng = random.Random(zlib.crc32(label.encode()) ^ (seed * 0x9E3779B1))
    return [rng.randrange(_FIRST_ID, vocab_size) for _ in range(n)]


# -- the grid ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridSpec:
    """Sizes to sweep; values that the engine's limits rule out are dropped."""

    chunk_sizes: tuple[int, ...]
    cached_contexts_blocks: tuple[int, ...]  # in blocks
    decode_batch_sizes: tuple[int, ...]  # 0 < B <= max_num_seqs; -1 means max_num_seqs
    decode_prompt_lens: tuple[int, ...]
    decode_output_tokens: int
    mixed_decoders: tuple[int, ...]
    mixed_prefill_lens: tuple[int, ...]
    mixed_cached_blocks: tuple[int, ...]
    mixed_decoder_prompt: int
    repeats: int


FULL_GRID = GridSpec(
    chunk_sizes=(8, 32, 100, 128, 256, 384, 512, 768, 1024, 1536, 2048),
    cached_contexts_blocks=(0, 2, 4, 8, 12, 16, 24),
    decode_batch_sizes=(1, 2, 3, 4, 6, -1),
    decode_prompt_lens=(16, 200, 500, 1000, 1800, 2600, 3400),
    decode_output_tokens=40,
    mixed_decoders=(1, 3, -2),
    mixed_prefill_lens=(300, 1000, 2500),
    mixed_cached_blocks=(0, 8),
    mixed_decoder_prompt=300,
    repeats=2,
)

QUICK_GRID = GridSpec(
    chunk_sizes=(32, 256, 1024, 2048),
    cached_contexts_blocks=(0, 8, 16),
    decode_batch_sizes=(1, 4, -1),
    decode_prompt_lens=(64, 1000, 2500),
    decode_output_tokens=16,
    mixed_decoders=(2,),
    mixed_prefill_lens=(1500,),
    mixed_cached_blocks=(0,),
    mixed_decoder_prompt=200,
    repeats=1,
)


def _batch(b: int, limits: EngineLimits) -> int:
    """-1 is max_num_seqs, -2 one less (room for a prefill beside the decoders)."""
    return limits.max_num_seqs + 1 + b if b < 0 else b


def design(limits: EngineLimits, grid: GridSpec = FULL_GRID) -> list[Experiment]:
    """The experiments of one profiling run, in the order they run (interleaved kinds, so a
    slow drift of the machine does not line up with one kind)."""
    prefill = _prefill_experiments(limits, grid)
    decode = _decode_experiments(limits, grid)
    mixed = _mixed_experiments(limits, grid)
    out = [_warmup(limits)]
    for rep in range(grid.repeats):
        lists = [[_rename(e, rep) for e in xs] for xs in (prefill, decode, mixed)]
        longest = max(len(x) for x in lists)
        for i in range(longest):
            for xs in lists:
                if i < len(xs):
                    out.append(xs[i])
    return out


def _rename(e: Experiment, rep: int) -> Experiment:
    if rep == 0:
        return e
    return with_suffix(e, f"~r{rep}", repeat=rep)


def with_suffix(e: Experiment, sfx: str, **params) -> Experiment:
    """The same experiment under new names (fresh prompts: nothing of it is cached)."""
    phases = tuple(tuple(_rename_req(r, sfx) for r in ph) for ph in e.phases)
    return Experiment(e.name + sfx, e.kind, phases, {**e.params, **params})


def _rename_req(r: RequestSpec, sfx: str) -> RequestSpec:
    pid = r.prefix_id + sfx if r.prefix_id is not None else None
    return RequestSpec(r.name + sfx, r.prompt_len, r.max_tokens, pid, r.prefix_len, r.after_first_tokens, r.delay_s)


def _warmup(limits: EngineLimits) -> Experiment:
    """First requests after start pay one-time costs; they are run but not fitted."""
    reqs = tuple(RequestSpec(f"warmup/{i}", 64 + 32 * i, 8) for i in range(2))
    return Experiment("warmup", WARMUP, (reqs,), {})


def _prefill_experiments(limits: EngineLimits, grid: GridSpec) -> list[Experiment]:
    bs = limits.block_size
    out = []
    for cb in grid.cached_contexts_blocks:
        c = cb * bs
        for n in grid.chunk_sizes:
            if c + n + 1 > limits.max_model_len:  # prompt + 1 output token must fit
                continue
            name = f"prefill/n{n}-c{c}"
            measured = RequestSpec(f"{name}/req", c + n, 1, prefix_id=name if c else None, prefix_len=c)
            phases = ((measured,),)
            if c:
                warm = RequestSpec(f"{name}/warm", c + 1, 1, prefix_id=name, prefix_len=c)
                phases = ((warm,), (measured,))
            out.append(Experiment(name, PREFILL, phases, {"new_tokens": n, "cached": c}))
    return out


def _decode_experiments(limits: EngineLimits, grid: GridSpec) -> list[Experiment]:
    out = []
    T = grid.decode_output_tokens
    for b0 in grid.decode_batch_sizes:
        b = _batch(b0, limits)
        if not 0 < b <= limits.max_num_seqs:
            continue
        for L in grid.decode_prompt_lens:
            if L + T > limits.max_model_len:
                continue
            name = f"decode/b{b}-l{L}"
            reqs = tuple(RequestSpec(f"{name}/{i}", L, T) for i in range(b))
            out.append(Experiment(name, DECODE, (reqs,), {"batch": b, "prompt": L, "output": T}))
    return out


def _mixed_experiments(limits: EngineLimits, grid: GridSpec) -> list[Experiment]:
    bs = limits.block_size
    out = []
    Ld = grid.mixed_decoder_prompt
    for b0 in grid.mixed_decoders:
        b = _batch(b0, limits)
        if not 0 < b < limits.max_num_seqs:
            continue
        for P in grid.mixed_prefill_lens:
            for cb in grid.mixed_cached_blocks:
                c = cb * bs
                if c >= P or P + 1 > limits.max_model_len:
                    continue
                # Decoders last long enough to overlap every chunk of the prefill.
                chunks = -(-(P - c) // max(limits.max_num_batched_tokens - b, 1))
                T = min(16 + 4 * chunks, limits.max_model_len - Ld)
                name = f"mixed/b{b}-p{P}-c{c}"
                decoders = tuple(RequestSpec(f"{name}/d{i}", Ld, T) for i in range(b))
                late = RequestSpec(f"{name}/prefill", P, 1, prefix_id=name if c else None, prefix_len=c,
                                   after_first_tokens=True, delay_s=0.02)
                phases = (decoders + (late,),)
                if c:
                    phases = ((RequestSpec(f"{name}/warm", c + 1, 1, prefix_id=name, prefix_len=c),),) + phases
                out.append(Experiment(name, MIXED, phases, {"batch": b, "prompt": P, "cached": c, "output": T}))
    return out
