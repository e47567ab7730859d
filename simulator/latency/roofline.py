"""Roofline latency model from a device spec and a model architecture.

Each operator family takes max(FLOPs / (peak · efficiency), bytes / (bandwidth · efficiency)),
summed over layers; tensor parallelism divides work by `tp` and adds the collectives an
operator profile prices (two all-reduces per layer and one per step, the logits all-gather),
timed as operators.Collective times them over the intra-node link. A per-step host overhead
(scheduling, launch, sampling on the CPU) is added on top. With `async_overlap` (vLLM's async
scheduling, `engine.async_scheduling`) the host work of the next step runs on the CPU while the
device runs this one, so a step lasts max(device time, host time) instead of their sum; the
breakdown then reports only the exposed host time, max(0, host - device). A step scheduled at
its own launch (an idle engine's first) has no step to hide its host work behind: the instance
prices it with the overlap off (base.without_overlap).

A quantized checkpoint (ModelArch.quant_*) reads its linear weights at their stored size
(scales and zero points included); the GEMMs of a W8A8 FP8 model run at the device's
`peak_fp8_flops` where it has one, weight-only quantization at the bf16 peak. Embeddings,
lm_head and attention itself stay in the model dtype; the KV cache in engine.kv_cache_dtype's.

The efficiencies are inputs: defaults below are conservative starting points, not measured
facts. A run given a device by name takes the values learned from the measured GPUs'
operator times instead (hardware/roofline-learned.yaml, deployment.learned_roofline);
calibrated profiles (and `calibrate import`) replace them with fitted values.

Attention, when the device spec names its SM count and the profile carries `AttentionTiles`,
is priced as FlashAttention runs it rather than as one flat efficiency: the kernel launches
one thread block (CTA) per (query tile, head) for a prefill and per (sequence, KV head) for a
decode, one block per SM at a time, so the blocks run in ceil(CTAs / SMs) waves. A prefill
wave lasts one block's work, 4·d·Br·(keys it sees) FLOPs at the SM's share of peak
(compute-bound); a decode is the KV stream at the memory bandwidth (memory-bound). Each
wave adds a fixed tile cost (loading Q and the page table, the softmax epilogue, writing O:
latency, not throughput) and the kernel a fixed floor (launch, KV-cache write, metadata).
Chunks of up to Br·SMs/heads tokens thus cost the same, as the measured tables show.

The decodes of a step that also has prefill work run differently under FlashAttention 2
(vLLM's kernel on every NVIDIA GPU but Hopper, which runs FA3, and SM100 Blackwell, FA4: see
`flash_attention_version`). FA2 packs a GQA group's query heads into one block only when
every query of the batch is one token (a pure decode step); in a mixed batch each decode gets
a query tile per query head and walks its whole context at the tile's cost, like a 1-token
prefill chunk, so it is priced as one. FA2's grid runs heads outermost (blocks
(query tile, sequence, head), the tile fastest), so the other heads of a GQA group re-read a
sequence's KV only after one head's pass over every decode's KV: those re-reads come from L2
while that pass fits in it (`l2_cache_bytes` of the device spec), from DRAM for the share that
does not (1 - L2 / working set); the step's decodes take the longer of the tiles' time and that
traffic's. Out of sample (the mixed rows of LLMServingSim's attention tables, which no fit
uses), a decode's share of a mixed step is then a median -4 to +1 % off the measurement on the
RTX 4090 and RTX PRO 6000 tables (time-weighted 15-18 %), against 46-71 % under priced as a
pure decode; the H100 (FA3) table's mixed steps cost what its pure decodes do (0.85-0.9x).

A batch's decodes are priced from the sum of their contexts, as if each had the mean one. On
FA2 the blocks of a long sequence run unsplit beside the short ones' (FA2 splits a sequence's
KV only when the batch has too few blocks to fill the SMs), so a batch with one long context
ends later than the same tokens spread evenly. `DecodeSkew` adds alpha · (t(every decode at
the longest context) - t(mean)) to the decodes' attention of a step that carries its longest
decode (`decode_ctx_max`): LLMServingSim's correction, with alpha fitted apart for pure and
mixed steps on its skew sweeps (13,000 skewed batches a table, measured on FA2 devices only:
calibrate/importers/roofline.py, fit_decode_skew). Devices that run FA3 or FA4 are priced
without it (no skew measurement of those kernels exists here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..hardware import DeviceSpec, LinkSpec, ModelArch
from .base import LatencyModel, StepFeatures, local_pairs, step_features
from .operators import collective_from_spec, padded_vocab

# Starting-point efficiencies (assumed, to be replaced by fitted ones; see module doc).
DEFAULT_GEMM_EFF = 0.7
DEFAULT_ATTN_EFF = 0.5
DEFAULT_MEM_EFF = 0.8
DEFAULT_HOST_OVERHEAD_S = 1.5e-3
DEFAULT_HOST_OVERHEAD_PER_SEQ_S = 0.0


# Query rows per attention block. FlashAttention-2 picks 64 x 64 tiles for causal head_dim 128
# on sm86/sm89 and 128 x 64 on sm80 (flash_fwd_launch_template.h, run_mha_fwd_hdim128); FA3 on
# Hopper uses 128-row tiles. The measured tables step in waves of 64-token tiles on both the
# RTX 4090 (sm89) and the RTX PRO 6000 (sm120: 32 heads, chunk <= 256 one wave, 512 two, 1024
# three = ceil(16·32/188)); 128 fits them worse overall (docs/gpu-profiles.md), so 64 is used for every device. Over
# many waves the FLOPs are the same either way; the quantization and wave count differ.
FLASH_Q_TILE = 64


@dataclass(frozen=True)
class AttentionTiles:
    """Learned constants of the tile model of attention (see the module doc)."""

    compute_efficiency: float   # fraction of an SM's share of peak FLOP/s a prefill block reaches
    memory_efficiency: float    # fraction of the memory bandwidth the decode KV stream reaches
    floor_s: float              # per kernel: launch, KV-cache write, scheduler metadata
    prefill_tile_s: float       # per wave of prefill blocks
    decode_tile_s: float        # per wave of decode blocks
    q_tile: int = FLASH_Q_TILE

    def __post_init__(self):
        if not (0 < self.compute_efficiency <= 1.5 and 0 < self.memory_efficiency <= 1.5):
            raise ValueError(f"attention efficiencies out of range: {self}")
        if min(self.floor_s, self.prefill_tile_s, self.decode_tile_s) < 0 or self.q_tile < 1:
            raise ValueError(f"attention tile costs must be >= 0: {self}")

    @classmethod
    def from_dict(cls, d: dict) -> "AttentionTiles":
        return cls(float(d["compute_efficiency"]), float(d["memory_efficiency"]), float(d["floor_us"]) * 1e-6,
                   float(d["prefill_tile_us"]) * 1e-6, float(d["decode_tile_us"]) * 1e-6,
                   int(d.get("q_tile", FLASH_Q_TILE)))


@dataclass(frozen=True)
class Elementwise:
    """Learned cost of the element-wise kernels (RMSNorm with its fused residual add, RoPE,
    the gated activation, the embedding gather): each kernel at least `floor_s` (small
    batches are launch- and latency-bound), its bytes read and written at `efficiency` of the
    memory bandwidth (up to 5: a layer's activations sit in L2, whose bandwidth exceeds the
    datasheet's DRAM figure)."""

    floor_s: float
    efficiency: float

    def __post_init__(self):
        if self.floor_s < 0 or not 0 < self.efficiency <= 5.0:
            raise ValueError(f"element-wise costs out of range: {self}")

    @classmethod
    def from_dict(cls, d: dict) -> "Elementwise":
        return cls(float(d["floor_us"]) * 1e-6, float(d["efficiency"]))


@dataclass(frozen=True)
class DecodeSkew:
    """Learned slowdown of a batch of decodes with uneven contexts (see the module doc): the
    share `alpha` of the way from the mean-context batch's attention time to the time with
    every decode at the longest context, in pure-decode and in mixed steps."""

    pure: float
    mixed: float

    def __post_init__(self):
        if not (0 <= self.pure <= 1 and 0 <= self.mixed <= 1):
            raise ValueError(f"decode skew alphas must be in [0, 1]: {self}")

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeSkew":
        return cls(float(d["pure"]), float(d["mixed"]))


def elementwise_ops(model: ModelArch, tp: int = 1) -> tuple[int, float]:
    """(kernels per step, bytes per token) of a step's element-wise operators on one rank,
    with the byte counts the learned fit used (calibrate.importers.roofline.dense_rows): two
    RMSNorms per layer (4·hidden·2 bytes a token each: input and residual in, both out), RoPE
    on q and k in the attention layers (2·(q + kv) widths), the gated activation of the dense
    MLP layers (3·intermediate: gate and up in, product out; 2· without a gate; MoE experts fuse theirs), the
    final norm and the embedding gather (2·hidden)."""
    m = model
    b = m.dtype_bytes
    h = m.hidden_size
    La = m.attention_layers
    dense_mlp = m.num_layers - (m.moe_layers if m.is_moe else 0)
    qkv = (m.num_heads + m.num_kv_heads) * m.head_dim / tp
    kernels = 2 * m.num_layers + La + dense_mlp + 2
    per_tok = (2 * m.num_layers + 1) * 4 * h * b + La * 2 * qkv * b + dense_mlp * m.mlp_matrices * m.intermediate_size / tp * b \
        + 2 * h * b
    return kernels, per_tok


def prefill_attention_s(n, c, heads, head_dim, sms, peak, p: AttentionTiles, num_seqs=1):
    """One layer's prefill attention of `num_seqs` chunks of n new tokens over c cached ones
    (seconds, without the kernel floor); numpy arrays or floats."""
    if isinstance(n, np.ndarray) or isinstance(c, np.ndarray):
        ceil, least = np.ceil, np.minimum
    else:  # one step's shape (the simulator's hot path): the same values, without numpy scalars
        ceil, least = math.ceil, min
    ctas = ceil(n / p.q_tile) * heads * num_seqs
    waves = ceil(ctas / sms)
    # A block's causal work: Br queries over the cached keys and, on average, half the chunk.
    block_flops = 4.0 * head_dim * p.q_tile * (c + (n + least(n, p.q_tile)) / 2)
    return waves * (block_flops / (p.compute_efficiency * peak / sms) + p.prefill_tile_s)


def decode_attention_s(num_decodes, kv_bytes, kv_heads, sms, bandwidth, p: AttentionTiles):
    """One layer's decode attention over `kv_bytes` of KV (seconds, without the floor): one
    block per (sequence, KV head), the query heads of a group packed into it."""
    ceil = np.ceil if isinstance(num_decodes, np.ndarray) else math.ceil
    waves = ceil(num_decodes * kv_heads / sms)
    return kv_bytes / (p.memory_efficiency * bandwidth) + waves * p.decode_tile_s


def flash_attention_version(device: DeviceSpec | dict) -> int | None:
    """The FlashAttention version vLLM runs on an NVIDIA device (a spec, or a device file's
    mapping), from its compute capability (vllm/v1/attention/backends/fa_utils.py,
    get_flash_attn_version: 3 on 9.x, 4 on 10.x, else 2); None where the spec does not say
    (or not NVIDIA)."""
    d = device if isinstance(device, dict) else device.extra
    cc = d.get("compute_capability")
    if cc is None or str(d.get("vendor", "nvidia")).lower() != "nvidia":
        return None
    major = int(str(cc).split(".")[0])
    return 3 if major == 9 else 4 if major == 10 else 2


def fa2_mixed_decodes_s(num_decodes, c, heads, kv_heads, head_dim, kv_bytes_per_pos, l2_bytes, sms, peak,
                        bandwidth, p: AttentionTiles) -> float:
    """One layer's attention of `num_decodes` decodes over c cached tokens each inside a mixed
    FlashAttention-2 step (seconds, without the kernel floor): query tiles per query head, or
    the DRAM traffic of their KV (`kv_bytes_per_pos`: all local KV heads, one layer) and of the
    GQA group's re-reads that miss L2, whichever is longer (see the module doc)."""
    t = prefill_attention_s(1, c, heads, head_dim, sms, peak, p, num_decodes)
    kv = num_decodes * (c + 1.0) * kv_bytes_per_pos
    ws = kv / kv_heads  # one head's pass over every decode's KV
    miss = 1.0 - l2_bytes / ws if ws > l2_bytes else 0.0
    mem = kv * (1.0 + (heads / kv_heads - 1.0) * miss) / (p.memory_efficiency * bandwidth)
    return mem if mem > t else t


class RooflineModel(LatencyModel):
    kind = "roofline"

    def __init__(self, model: ModelArch, device: DeviceSpec, tp: int = 1, link: LinkSpec | None = None,
                 gemm_efficiency: float | None = None, attention_efficiency: float | None = None,
                 memory_efficiency: float | None = None, host_overhead_s: float | None = None,
                 host_overhead_per_seq_s: float | None = None, attention_tiles: AttentionTiles | None = None,
                 async_overlap: bool = False, elementwise: Elementwise | None = None, expert_parallel: int = 1,
                 decode_skew: DecodeSkew | None = None):
        """`async_overlap`: the per-step host work overlaps the device's step (async scheduling),
        a step takes max(device, host) rather than device + host (see the module doc).
        `elementwise`: the learned cost of the element-wise kernels (None: not priced).
        `expert_parallel` (ep > 1, MoE models, tp 1): this GPU holds num_experts / ep of the
        experts and runs the tokens of all ep data-parallel ranks through them (`ep_tokens` of a
        step; ep x its own when not given), all-gathered before the experts and reduce-scattered
        after them over the intra-node link, as vLLM's naive all-to-all does.
        `decode_skew`: the learned slowdown of uneven decode contexts (used with the tile model
        on FlashAttention-2 devices, where it was measured; see the module doc)."""
        self.model = model
        self.async_overlap = bool(async_overlap)
        self.device = device
        self.tp = tp
        self.link = link or device.intra_node_link
        if tp > 1 and self.link is None:
            raise ValueError(f"tensor_parallel_size={tp} needs an intra-node link for device {device.name}")
        self.gemm_eff = gemm_efficiency or DEFAULT_GEMM_EFF
        self.attn_eff = attention_efficiency or DEFAULT_ATTN_EFF
        self.mem_eff = memory_efficiency or DEFAULT_MEM_EFF
        self.host_s = DEFAULT_HOST_OVERHEAD_S if host_overhead_s is None else host_overhead_s
        self.host_seq_s = DEFAULT_HOST_OVERHEAD_PER_SEQ_S if host_overhead_per_seq_s is None else host_overhead_per_seq_s
        m = model
        L = m.num_layers
        dt = m.dtype_bytes
        peak = device.peak_flops
        bw = device.memory_bandwidth_Bps * self.mem_eff
        # Dense linear layers: 2 FLOPs per parameter per token; weights read once per step.
        La = m.attention_layers  # = L but for hybrid models (linear attention in the other layers)
        mixers = m.attn_params_per_layer() * La + (m.linear_params_per_layer() * (L - La) if La != L else 0)
        mlps = m.param_groups()["mlp"]  # dense MLPs (MoE models: their dense layers and shared experts)
        dense_all = mixers + mlps  # integers: exact
        if not m.quant_method:
            self._lin_flop_per_tok = 2.0 * dense_all / tp / (peak * self.gemm_eff)
            self._lin_bytes_time = dense_all * dt / tp / bw
        else:  # quantized weights are read at their stored size; W8A8 GEMMs run at the FP8 peak
            m.check_quantization()
            self._lin_flop_per_tok = sum(2.0 * n / tp * self._gemm_s_per_flop(part) for n, part in
                                         ((mixers, "attn"), (mlps, "mlp")))
            self._lin_bytes_time = (mixers * m.bytes_per_param("attn") + mlps * m.bytes_per_param("mlp")) / tp / bw
        # Gated DeltaNet layers (hybrid models): the delta-rule update and read-out, ~4 FLOPs
        # per (value head, key dim, value dim) per token; a decode reads and writes its state.
        self._delta_flop_per_tok = self._state_time_per_seq = 0.0
        if La != L:
            nv, dk, dv = m.linear_num_value_heads, m.linear_key_head_dim, m.linear_value_head_dim
            self._delta_flop_per_tok = 4.0 * nv * dk * dv * (L - La) / tp / (peak * self.attn_eff)
            self._state_time_per_seq = 2.0 * m.linear_state_bytes_per_seq() / tp / bw
        # MoE experts: top-k experts per token; the distinct experts touched are read.
        self._moe = m.is_moe
        self.ep = int(expert_parallel) if m.is_moe else 1
        if self.ep > 1 and tp > 1:
            raise ValueError("expert parallelism with tensor parallelism is not modelled")
        if self.ep > 1 and self.link is None:
            raise ValueError(f"expert parallelism over {self.ep} GPUs needs an intra-node link for device {device.name}")
        if m.is_moe:
            e_params = m.mlp_params_per_layer()
            Lm = m.moe_layers  # (the others have a dense MLP: in mlps)
            if not m.quant_method:
                self._moe_flop_per_tok = 2.0 * e_params * m.num_experts_per_tok * Lm / tp / (peak * self.gemm_eff)
                self._moe_expert_bytes_time = e_params * Lm * dt / tp / bw
            else:
                self._moe_flop_per_tok = 2.0 * e_params * m.num_experts_per_tok * Lm / tp * self._gemm_s_per_flop("experts")
                self._moe_expert_bytes_time = e_params * Lm * m.bytes_per_param("experts") / tp / bw
            if self.ep > 1:  # the EP collectives of each MoE layer (operators.collective_from_spec)
                self._ep_gather = collective_from_spec("all_gather", self.ep, None, self.link)
                self._ep_scatter = collective_from_spec("reduce_scatter", self.ep, None, self.link)
                self._ep_bytes_per_tok = m.hidden_size * dt
                self._ep_logit_bytes_per_tok = m.num_experts * 4  # fp32 router logits travel with the states
        # Attention: QK^T and PV, 4·head_dim·heads FLOPs per (query, key) pair per layer, in
        # the Lf full-attention layers; the Lw local layers (sliding window, or Llama 4's
        # chunked attention) see at most W keys (a decode's read is taken as min(ctx, W) for
        # both: an upper bound for chunks, whose decodes see ctx mod W keys).
        Lw = m.local_layers
        Lf = La - Lw
        self._attn_flop_per_pair = 4.0 * m.num_heads * m.head_dim * Lf / tp / (peak * self.attn_eff)
        self._kv_bytes_time_per_pos = (m.kv_bytes_per_token() if not Lw else m.kv_bytes_per_token() // La * Lf) / tp / bw
        self._Lf, self._Lw, self._W = Lf, Lw, (m.local_span if Lw else 0)
        self._chunked = bool(Lw and not m.sliding_window)
        if Lw:
            self._attn_flop_per_pair_w = 4.0 * m.num_heads * m.head_dim * Lw / tp / (peak * self.attn_eff)
            self._kv_bytes_time_per_pos_w = m.kv_bytes_per_token() // La * Lw / tp / bw
        # Element-wise kernels: a floor each, their bytes at the learned efficiency.
        self.elementwise = elementwise
        self._ew_fixed = self._ew_per_tok = 0.0
        if elementwise is not None:
            kernels, per_tok = elementwise_ops(m, tp)
            self._ew_fixed = kernels * elementwise.floor_s
            self._ew_per_tok = per_tok / (device.memory_bandwidth_Bps * elementwise.efficiency)
        # Tile model of attention: needs the SM count from the device spec.
        sms = device.extra.get("sm_count")
        self.tiles = attention_tiles if (attention_tiles is not None and sms) else None
        if self.tiles is not None:
            self._sms = float(sms)
            self._heads = max(m.num_heads // tp, 1)
            self._kv_heads = max(m.num_kv_heads // tp, 1)
            self._kv_bytes_per_pos = m.kv_bytes_per_token() / La / tp
        # FA2: a mixed step's decodes run as query tiles per query head, re-reading the KV of
        # their GQA group past L2 (see the module doc)
        fa2 = self.tiles is not None and flash_attention_version(device) == 2
        self._mixed_decode_tiles = fa2
        self.decode_skew = decode_skew if fa2 and decode_skew is not None and (decode_skew.pure or decode_skew.mixed) \
            else None
        self._l2 = float(device.extra.get("l2_cache_bytes") or 0.0)
        # LM head for each sampled token; its weights read once.
        self._lm_flop_per_tok = 2.0 * m.hidden_size * m.vocab_size / tp / (peak * self.gemm_eff)
        self._lm_bytes_time = m.hidden_size * m.vocab_size * dt / tp / bw
        # Tensor parallelism: the collectives an operator profile prices, the same way
        # (operators.collective_from_spec: the link file's fitted curve where it has one, else
        # NCCL's cost model where it describes NCCL over the link, else the link's ring
        # formula): two all-reduces of (tokens · hidden) activations per layer (after o_proj and
        # down_proj) plus one per step (the vocab-parallel embedding), and the all-gather of
        # each sampled sequence's logits shard.
        self.allreduce = self.logits_gather = None
        if tp > 1:
            self.allreduce = collective_from_spec("all_reduce", tp, None, self.link)
            self.logits_gather = collective_from_spec("all_gather", tp, None, self.link)
            self._n_allreduce = 2 * L + 1
            self._ar_bytes_per_tok = m.hidden_size * dt
            self._logit_bytes_per_seq = padded_vocab(m.vocab_size, tp) * dt

    def _moe_s(self, T: int, ep_tokens: int | None) -> tuple[float, float]:
        """(experts, expert-parallel communication) of a step with T tokens on this GPU. With
        expert parallelism the local experts see the N tokens of all ranks: N·k/ep token-expert
        pairs, and the distinct local experts they touch are read."""
        m = self.model
        E, k, ep = m.num_experts, m.num_experts_per_tok, self.ep
        if ep == 1:
            return max(T * self._moe_flop_per_tok, E * (1.0 - (1.0 - k / E) ** T) * self._moe_expert_bytes_time), 0.0
        N = ep_tokens if ep_tokens else T * ep
        active = max(E * (1.0 - (1.0 - k / E) ** N) / ep, k / ep)
        t = max(N / ep * self._moe_flop_per_tok, active * self._moe_expert_bytes_time)
        states = N * self._ep_bytes_per_tok
        comm = (self._ep_gather.time_s(states + N * self._ep_logit_bytes_per_tok)
                + self._ep_scatter.time_s(states)) * m.moe_layers
        return t, comm

    def _collectives_s(self, tokens: int, sampled: int) -> float:
        """Tensor-parallel communication of a step: the all-reduces of its tokens'
        activations and the all-gather of its sampled sequences' logits."""
        t = self._n_allreduce * self.allreduce.time_s(tokens * self._ar_bytes_per_tok)
        return t + self.logits_gather.time_s(sampled * self._logit_bytes_per_seq) if sampled else t

    def _gemm_s_per_flop(self, part: str) -> float:
        """Seconds per FLOP of the GEMMs over one parameter group of a quantized model: its
        W8A8 share at the device's FP8 peak where it has one (else weight-only, at the bf16
        peak, as vLLM's Marlin kernels run FP8 on Ampere), the rest at the bf16 peak."""
        peak, peak8 = self.device.peak_flops, self.device.peak_fp8_flops
        f8 = self.model.fp8_gemm_fraction(part) if peak8 else 0.0
        return (f8 / peak8 if f8 else 0.0) / self.gemm_eff + (1.0 - f8) / (peak * self.gemm_eff)

    def step_time(self, prefill_chunks, num_decodes: int, decode_ctx_sum: int, num_sampled: int,
                  decode_ctx_max: int | None = None, ep_tokens: int | None = None) -> float:
        f = step_features(prefill_chunks, num_decodes, decode_ctx_sum, num_sampled)
        return self.breakdown(f, ep_tokens, decode_ctx_max)["total"]

    def breakdown(self, f: StepFeatures, ep_tokens: int | None = None,
                  decode_ctx_max: int | None = None) -> dict[str, float]:
        """The step's time by part. `decode_ctx_max` (the longest decode's context + 1, as
        `decode_ctx_sum` counts them; optional): with it the decode skew applies."""
        T = f.prefill_tokens + f.num_decodes
        if T == 0:
            return {"host": self.host_s, "total": self.host_s}
        lin = max(T * self._lin_flop_per_tok, self._lin_bytes_time)
        ew = self._ew_fixed + T * self._ew_per_tok if self.elementwise is not None else 0.0
        moe = ep_comm = 0.0
        if self._moe:
            moe, ep_comm = self._moe_s(T, ep_tokens)
        if self.tiles is not None:
            attn_p, attn_d = self._attention_tiles(f.num_prefills, f.prefill_tokens, f.prefill_kv,
                                                   f.num_decodes, f.decode_ctx_sum, decode_ctx_max)
        else:
            attn_p = 0.0
            if f.num_prefills:
                attn_p = max(f.prefill_attn * self._attn_flop_per_pair, f.prefill_kv * self._kv_bytes_time_per_pos)
            attn_d = 0.0
            if f.num_decodes:
                attn_d = max(f.decode_ctx_sum * self._attn_flop_per_pair, f.decode_ctx_sum * self._kv_bytes_time_per_pos)
            if self._W:
                W = self._W
                if f.num_prefills:
                    n = f.prefill_tokens / f.num_prefills
                    c = max(f.prefill_kv / f.num_prefills - n, 0.0)
                    pairs = f.num_prefills * local_pairs(n, c, W, self._chunked)
                    kv = f.num_prefills * (min(c, W - 1.0) + n)
                    attn_p += max(pairs * self._attn_flop_per_pair_w, kv * self._kv_bytes_time_per_pos_w)
                if f.num_decodes:
                    ctx = min(f.decode_ctx_sum, f.num_decodes * W)
                    attn_d += ctx * max(self._attn_flop_per_pair_w, self._kv_bytes_time_per_pos_w)
        if self._delta_flop_per_tok:
            attn_p += f.prefill_tokens * self._delta_flop_per_tok
            attn_d += max(f.num_decodes * self._delta_flop_per_tok, f.num_decodes * self._state_time_per_seq)
        lm = max(f.num_sampled * self._lm_flop_per_tok, self._lm_bytes_time) if f.num_sampled else 0.0
        ar = gather = 0.0
        if self.tp > 1:
            ar = self._n_allreduce * self.allreduce.time_s(T * self._ar_bytes_per_tok)
            if f.num_sampled:
                gather = self.logits_gather.time_s(f.num_sampled * self._logit_bytes_per_seq)
        host = self.host_s + self.host_seq_s * f.num_seqs
        parts = {"linear": lin, "moe": moe, "attn_prefill": attn_p, "attn_decode": attn_d,
                 "lm_head": lm, "allreduce": ar, "host": host}
        if self.tp > 1:
            parts["logits_all_gather"] = gather
        if self.ep > 1:
            parts["ep_comm"] = ep_comm
        if self.elementwise is not None:
            parts["elementwise"] = ew
        if self.async_overlap:  # the host work hides behind the device's step: only its excess shows
            device = lin + moe + ep_comm + attn_p + attn_d + lm + ar + gather + ew
            parts["host"] = host - device if host > device else 0.0
            parts["total"] = host if host > device else device
            return parts
        parts["total"] = sum(parts.values())
        return parts

    def _attention_tiles(self, num_prefills, prefill_tokens, prefill_kv, num_decodes, decode_ctx_sum,
                         decode_ctx_max=None):
        """(prefill, decode) attention over all layers by the tile model. The step carries
        sums only, so its prefills are priced as `num_prefills` chunks of the mean shape, and
        its decodes as decodes of the mean context, plus the decode skew where the step
        carries its longest one. One kernel floor per layer: vLLM v1 runs a mixed batch's
        attention as one launch."""
        p, L = self.tiles, self._Lf
        Lw, W = self._Lw, self._W
        attn_p = attn_d = 0.0
        if num_prefills:
            n = prefill_tokens / num_prefills
            c = max(prefill_kv / num_prefills - n, 0.0)
            one = float(prefill_attention_s(n, c, self._heads, self.model.head_dim, self._sms,
                                            self.device.peak_flops, p, num_prefills))
            attn_p = L * one
            if Lw:  # the windowed share of the causal work
                attn_p += Lw * one * local_pairs(n, c, W, self._chunked) / (n * (c + (n + 1) * 0.5))
        if num_decodes:
            mixed = num_prefills > 0
            attn_d = self._decodes_s(mixed, num_decodes, decode_ctx_sum)
            sk = self.decode_skew
            if sk is not None and decode_ctx_max and num_decodes > 1 and decode_ctx_max * num_decodes > decode_ctx_sum:
                alpha = sk.mixed if mixed else sk.pure
                attn_d += alpha * (self._decodes_s(mixed, num_decodes, decode_ctx_max * num_decodes) - attn_d)
        floor = (L + Lw) * p.floor_s
        if attn_p:
            attn_p += floor
        else:
            attn_d += floor
        return attn_p, attn_d

    def _decodes_s(self, mixed: bool, num_decodes: int, decode_ctx_sum: float) -> float:
        """The attention of a step's decodes over all layers (without the kernel floor): in a
        mixed FA2 step as 1-token chunks over the mean context, else as packed decodes."""
        p, L = self.tiles, self._Lf
        Lw, W = self._Lw, self._W
        if mixed and self._mixed_decode_tiles:
            c = decode_ctx_sum / num_decodes - 1.0
            t = L * self._fa2_mixed_decodes_s(num_decodes, c)
            if Lw:
                t += Lw * self._fa2_mixed_decodes_s(num_decodes, min(c, W - 1.0))
            return t
        bw = self.device.memory_bandwidth_Bps
        t = L * float(decode_attention_s(num_decodes, decode_ctx_sum * self._kv_bytes_per_pos, self._kv_heads,
                                         self._sms, bw, p))
        if Lw:
            t += Lw * float(decode_attention_s(num_decodes, min(decode_ctx_sum, num_decodes * W) * self._kv_bytes_per_pos,
                                               self._kv_heads, self._sms, bw, p))
        return t

    def _fa2_mixed_decodes_s(self, num_decodes: int, c: float) -> float:
        """One layer's attention of `num_decodes` decodes over c cached tokens each in a mixed
        FA2 step: query tiles per query head, or the DRAM traffic of their KV and of the GQA
        group's re-reads that miss L2, whichever is longer (see the module doc)."""
        return fa2_mixed_decodes_s(num_decodes, c, self._heads, self._kv_heads, self.model.head_dim,
                                   self._kv_bytes_per_pos, self._l2, self._sms, self.device.peak_flops,
                                   self.device.memory_bandwidth_Bps, self.tiles)

    def time_of(self, f: StepFeatures) -> float:
        return self.breakdown(f)["total"]

    def decode_step_time(self, num_decodes: int, decode_ctx_sum: int, decode_ctx_max: int | None = None,
                         ep_tokens: int | None = None) -> float:
        T = num_decodes
        t = max(T * self._lin_flop_per_tok, self._lin_bytes_time)
        if self.elementwise is not None:
            t += self._ew_fixed + T * self._ew_per_tok
        if self._moe:
            moe, ep_comm = self._moe_s(T, ep_tokens)
            t += moe + ep_comm
        if self.tiles is not None:
            t += self._attention_tiles(0, 0, 0, num_decodes, decode_ctx_sum, decode_ctx_max)[1] if num_decodes else 0.0
        else:
            t += decode_ctx_sum * max(self._attn_flop_per_pair, self._kv_bytes_time_per_pos)
            if self._W:
                t += min(decode_ctx_sum, num_decodes * self._W) * max(self._attn_flop_per_pair_w,
                                                                      self._kv_bytes_time_per_pos_w)
        if self._delta_flop_per_tok:
            t += max(T * self._delta_flop_per_tok, T * self._state_time_per_seq)
        t += max(T * self._lm_flop_per_tok, self._lm_bytes_time)
        if self.tp > 1:
            t += self._collectives_s(T, T)
        if self.async_overlap:
            host = self.host_s + self.host_seq_s * T
            return host if host > t else t
        return t + self.host_s + self.host_seq_s * T

    def describe(self) -> dict:
        return {"kind": self.kind, "device": self.device.name, "model": self.model.name, "tp": self.tp,
                "gemm_efficiency": self.gemm_eff, "attention_efficiency": self.attn_eff,
                "memory_efficiency": self.mem_eff, "host_overhead_s": self.host_s,
                "host_overhead_per_seq_s": self.host_seq_s,
                # (only when on: a synchronous run's summary reads as it did before the option)
                **({"async_overlap": True} if self.async_overlap else {}),
                **({"elementwise": {"floor_us": self.elementwise.floor_s * 1e6,
                                    "efficiency": self.elementwise.efficiency}} if self.elementwise else {}),
                **({"expert_parallel": self.ep} if self.ep > 1 else {}),
                **({"all_reduce": self.allreduce.describe()} if self.allreduce is not None else {}),
                **({"mixed_step_decodes": "query tiles (FlashAttention 2)"} if self._mixed_decode_tiles else {}),
                **({"decode_skew": {"pure": self.decode_skew.pure, "mixed": self.decode_skew.mixed}}
                   if self.decode_skew is not None else {}),
                "attention_tiles": None if self.tiles is None else {
                    "compute_efficiency": self.tiles.compute_efficiency, "memory_efficiency": self.tiles.memory_efficiency,
                    "floor_us": self.tiles.floor_s * 1e6, "prefill_tile_us": self.tiles.prefill_tile_s * 1e6,
                    "decode_tile_us": self.tiles.decode_tile_s * 1e6, "q_tile": self.tiles.q_tile}}
