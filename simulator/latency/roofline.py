"""Roofline latency model from a device spec and a model architecture.

Each operator family takes max(FLOPs / (peak · efficiency), bytes / (bandwidth · efficiency)),
summed over layers; tensor parallelism divides work by `tp` and adds two all-reduces per
layer over the intra-node link (ring: 2·(tp-1)/tp of the bytes). A per-step host overhead
(scheduling, launch, sampling on the CPU) is added on top.

The efficiencies are inputs: defaults below are conservative starting points, not measured
facts; calibrated profiles (and `calibrate import`) replace them with fitted values.
"""

from __future__ import annotations

from ..hardware import DeviceSpec, LinkSpec, ModelArch
from .base import LatencyModel, StepFeatures

# Starting-point efficiencies (assumed, to be replaced by fitted ones; see module doc).
DEFAULT_GEMM_EFF = 0.7
DEFAULT_ATTN_EFF = 0.5
DEFAULT_MEM_EFF = 0.8
DEFAULT_HOST_OVERHEAD_S = 1.5e-3
DEFAULT_HOST_OVERHEAD_PER_SEQ_S = 0.0


class RooflineModel(LatencyModel):
    kind = "roofline"

    def __init__(self, model: ModelArch, device: DeviceSpec, tp: int = 1, link: LinkSpec | None = None,
                 gemm_efficiency: float | None = None, attention_efficiency: float | None = None,
                 memory_efficiency: float | None = None, host_overhead_s: float | None = None,
                 host_overhead_per_seq_s: float | None = None):
        self.model = model
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
        dense_params = m.attn_params_per_layer() + (0 if m.is_moe else m.mlp_params_per_layer())
        self._lin_flop_per_tok = 2.0 * dense_params * L / tp / (peak * self.gemm_eff)
        self._lin_bytes_time = dense_params * L * dt / tp / bw
        # MoE experts: top-k experts per token; the distinct experts touched are read.
        self._moe = m.is_moe
        if m.is_moe:
            e_params = m.mlp_params_per_layer()
            self._moe_flop_per_tok = 2.0 * e_params * m.num_experts_per_tok * L / tp / (peak * self.gemm_eff)
            self._moe_expert_bytes_time = e_params * L * dt / tp / bw
        # Attention: QK^T and PV, 4·head_dim·heads FLOPs per (query, key) pair per layer.
        self._attn_flop_per_pair = 4.0 * m.num_heads * m.head_dim * L / tp / (peak * self.attn_eff)
        self._kv_bytes_time_per_pos = m.kv_bytes_per_token() / tp / bw
        # LM head for each sampled token; its weights read once.
        self._lm_flop_per_tok = 2.0 * m.hidden_size * m.vocab_size / tp / (peak * self.gemm_eff)
        self._lm_bytes_time = m.hidden_size * m.vocab_size * dt / tp / bw
        # All-reduce: two per layer of (tokens · hidden · dtype) bytes.
        if tp > 1:
            lk = self.link
            eff_bw = lk.bandwidth_Bps * lk.allreduce_efficiency
            self._ar_time_per_tok = 2 * L * (2.0 * (tp - 1) / tp) * m.hidden_size * dt / eff_bw
            self._ar_fixed = 2 * L * lk.latency_s * 2 * (tp - 1)
        else:
            self._ar_time_per_tok = 0.0
            self._ar_fixed = 0.0

    def breakdown(self, f: StepFeatures) -> dict[str, float]:
        T = f.prefill_tokens + f.num_decodes
        if T == 0:
            return {"host": self.host_s, "total": self.host_s}
        lin = max(T * self._lin_flop_per_tok, self._lin_bytes_time)
        moe = 0.0
        if self._moe:
            m = self.model
            E, k = m.num_experts, m.num_experts_per_tok
            active = E * (1.0 - (1.0 - k / E) ** T)
            moe = max(T * self._moe_flop_per_tok, active * self._moe_expert_bytes_time)
        attn_p = 0.0
        if f.num_prefills:
            attn_p = max(f.prefill_attn * self._attn_flop_per_pair, f.prefill_kv * self._kv_bytes_time_per_pos)
        attn_d = 0.0
        if f.num_decodes:
            attn_d = max(f.decode_ctx_sum * self._attn_flop_per_pair, f.decode_ctx_sum * self._kv_bytes_time_per_pos)
        lm = max(f.num_sampled * self._lm_flop_per_tok, self._lm_bytes_time) if f.num_sampled else 0.0
        ar = (T * self._ar_time_per_tok + self._ar_fixed) if self.tp > 1 else 0.0
        host = self.host_s + self.host_seq_s * f.num_seqs
        parts = {"linear": lin, "moe": moe, "attn_prefill": attn_p, "attn_decode": attn_d,
                 "lm_head": lm, "allreduce": ar, "host": host}
        parts["total"] = sum(parts.values())
        return parts

    def time_of(self, f: StepFeatures) -> float:
        return self.breakdown(f)["total"]

    def decode_step_time(self, num_decodes: int, decode_ctx_sum: int, decode_ctx_max: int | None = None,
                         ep_tokens: int | None = None) -> float:
        T = num_decodes
        t = max(T * self._lin_flop_per_tok, self._lin_bytes_time)
        if self._moe:
            m = self.model
            E, k = m.num_experts, m.num_experts_per_tok
            t += max(T * self._moe_flop_per_tok, E * (1.0 - (1.0 - k / E) ** T) * self._moe_expert_bytes_time)
        t += decode_ctx_sum * max(self._attn_flop_per_pair, self._kv_bytes_time_per_pos)
        t += max(T * self._lm_flop_per_tok, self._lm_bytes_time)
        if self.tp > 1:
            t += T * self._ar_time_per_tok + self._ar_fixed
        return t + self.host_s + self.host_seq_s * T

    def describe(self) -> dict:
        return {"kind": self.kind, "device": self.device.name, "model": self.model.name, "tp": self.tp,
                "gemm_efficiency": self.gemm_eff, "attention_efficiency": self.attn_eff,
                "memory_efficiency": self.mem_eff, "host_overhead_s": self.host_s,
                "host_overhead_per_seq_s": self.host_seq_s}
