"""Hardware and model descriptions, loaded from the YAML files under `hardware/`.

A name (`h100-sxm`, `llama-3.1-8b`) resolves to `hardware/<kind>/<name>.yaml`; a path is
read as is. A model may also be a Hugging Face `config.json` (or a directory holding one).
This is the simulator's only I/O.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HARDWARE_DIR = Path(os.environ.get("AGENTSERVESIM_HARDWARE", Path(__file__).resolve().parents[1] / "hardware"))

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "bf16": 2, "fp16": 2, "float32": 4, "float": 4,
                "fp32": 4, "float8": 1, "fp8": 1, "int8": 1}
# vLLM's --dtype auto (the default) runs a checkpoint whose config says float32 in the
# platform's first supported half type (vllm/config/model.py, _resolve_auto_dtype: bfloat16 on
# NVIDIA compute capability >= 8.0 and on x86 CPUs, float16 on older GPUs): two bytes either way.
_AUTO_DOWNCAST = {"float32", "float", "fp32"}

# Model types whose dense MLP has no gate projection (up and down only), as vLLM's model code
# builds them (gpt2.py c_fc/c_proj, gpt_neox.py, falcon.py dense_h_to_4h, starcoder2.py, phi.py
# fc1/fc2, opt.py, bloom.py, mpt.py, gptj.py, gpt_bigcode.py, persimmon.py, nemotron.py's
# squared-ReLU up/down, codegen; some of these are gone from recent vLLM releases).
NON_GATED_MLP_TYPES = frozenset({"gpt2", "gpt_bigcode", "gpt_neox", "gptj", "gpt_neo", "codegen", "falcon", "opt",
                                 "bloom", "mpt", "phi", "starcoder2", "persimmon", "nemotron"})


class HardwareError(ValueError):
    """A hardware or model description that cannot be found or is malformed (user error)."""


def _resolve(kind: str, name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        if not p.exists():
            raise HardwareError(f"{kind} file not found: {p}")
        return p
    candidate = HARDWARE_DIR / kind / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(f.stem for f in (HARDWARE_DIR / kind).glob("*.yaml")) if (HARDWARE_DIR / kind).is_dir() else []
    raise HardwareError(f"unknown {kind[:-1] if kind.endswith('s') else kind} '{name_or_path}'"
                        f" (known: {', '.join(known) or 'none'}; or pass a path)")


def _resolve_msg(name) -> str:
    known = []
    for kind in ("devices", "profiles"):
        if (HARDWARE_DIR / kind).is_dir():
            known += sorted(f.stem for f in (HARDWARE_DIR / kind).glob("*.yaml"))
    return f"unknown hardware '{name}' (known: {', '.join(known) or 'none'}; or pass a path to a device or profile YAML)"


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise HardwareError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise HardwareError(f"{path}: expected a mapping at top level")
    return data


def _req(data: dict, key: str, path: Path, typ=float):
    if key not in data or data[key] is None:
        raise HardwareError(f"{path}: missing field '{key}'")
    try:
        return typ(data[key])
    except (TypeError, ValueError):
        raise HardwareError(f"{path}: field '{key}' must be {typ.__name__}, got {data[key]!r}") from None


@dataclass(frozen=True)
class LinkSpec:
    """A link between two memories or devices: time(bytes) = latency_s + bytes / bandwidth_Bps."""

    name: str
    kind: str
    bandwidth_Bps: float
    latency_s: float
    allreduce_efficiency: float = 0.8
    source: str = ""
    # How NCCL collectives perform over this link, when the file describes it (`nccl:`):
    # the ring's per-direction bus bandwidth and the hardware class of NCCL's cost model.
    nccl: "NcclLinkSpec | None" = None
    # vLLM's own all-reduce over this link for small messages, where measured
    # (`vllm_custom_all_reduce:` {source, max_bytes, curves: {gpus: {bytes, time_us}}}): used
    # up to max_bytes (vLLM's switch to NCCL; past the last measured size the curve's last
    # slope), NCCL (above) beyond it.
    custom_all_reduce: dict | None = field(default=None, compare=False, hash=False)

    def transfer_time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps if nbytes > 0 else 0.0


@dataclass(frozen=True)
class NcclLinkSpec:
    """What NCCL's cost model needs of a link (see simulator/latency/collectives.py):
    `bus_bandwidth_Bps`, the per-direction bandwidth a ring step reaches on it, and `hw`,
    the class of NCCL's latency constants (pci | nvlink)."""

    bus_bandwidth_Bps: float
    hw: str = "pci"
    p2p: bool = True
    source: str = ""


@dataclass(frozen=True)
class MemoryTierSpec:
    name: str
    kind: str  # dram | cxl
    capacity_bytes: float
    bandwidth_Bps: float
    latency_s: float
    link: LinkSpec
    source: str = ""

    def transfer_time(self, nbytes: float) -> float:
        """Time to move `nbytes` between HBM and this tier: the slower of link and memory."""
        if nbytes <= 0:
            return 0.0
        bw = min(self.link.bandwidth_Bps, self.bandwidth_Bps)
        return self.link.latency_s + self.latency_s + nbytes / bw


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    kind: str  # gpu | cpu
    peak_flops: float  # dense bf16 FLOP/s
    memory_bytes: float
    memory_bandwidth_Bps: float
    host_link: LinkSpec | None
    intra_node_link: LinkSpec | None
    description: str = ""
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def usable_memory_bytes(self) -> float:
        """The memory CUDA reports as the device's total (`cuda_total_memory_bytes`, where a
        measurement is on file): vLLM's gpu_memory_utilization is a fraction of that, which is
        a little less than the datasheet's capacity. The datasheet figure otherwise."""
        return float(self.extra.get("cuda_total_memory_bytes") or self.memory_bytes)

    @property
    def peak_fp8_flops(self) -> float:
        """Dense FP8 tensor-core FLOP/s (`peak_fp8_flops` in the device file); 0 where the
        device has no FP8 tensor cores (A100, A40): FP8 weights then run weight-only at bf16 speed."""
        return float(self.extra.get("peak_fp8_flops") or 0.0)


@dataclass(frozen=True)
class ModelArch:
    """Decoder-only transformer shape, from a Hugging Face config."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    max_position_embeddings: int = 0
    architecture: str = ""
    # Hybrid models (Qwen3-Next / Qwen3.5 / Qwen3.6: Gated DeltaNet linear attention in most
    # layers, full attention every few): how many layers have full attention (0: all) and the
    # linear-attention shape (`linear_*` keys of the HF config).
    num_attention_layers: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    state_dtype_bytes: int = 0  # the delta-rule state's dtype (config mamba_ssm_dtype; default the model's)
    # Multi-head latent attention (DeepSeek-V2/V3): the KV cache holds one compressed latent of
    # kv_lora_rank + qk_rope_head_dim values per token and layer (0: ordinary attention).
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    q_lora_rank: int = 0
    v_head_dim: int = 0
    # MoE models with layers that keep a dense MLP of intermediate_size (DeepSeek's
    # first_k_dense_replace, Llama 4's interleave_moe_layer_step, Qwen's mlp_only_layers: see
    # _moe_layer_count) and shared experts beside the routed ones (n_shared_experts x
    # moe_intermediate_size, shared_expert_intermediate_size, Llama 4's one of intermediate_size)
    num_dense_layers: int = 0
    shared_expert_intermediate_size: int = 0
    # Sliding-window attention (Gemma 2/3, gpt-oss, Mistral-7B-v0.1): `num_sliding_layers` of
    # the attention layers attend to the last `sliding_window` tokens only (0: none).
    sliding_window: int = 0
    num_sliding_layers: int = 0
    # Quantized checkpoints (the HF config's quantization_config, read by parse_quantization):
    # the method ("" = unquantized), the stored bits of one quantized weight with its share of
    # scales and zero points, the fraction of layers whose attention (or linear-attention)
    # projections, dense MLP / shared experts and routed experts are quantized, and whether
    # the GEMMs take FP8 activations (W8A8: FP8 tensor cores). Embeddings, lm_head, router and
    # norms stay in the model dtype. A method with quant_weight_bits 0 is not modelled.
    quant_method: str = ""
    quant_detail: str = ""
    quant_weight_bits: float = 0.0
    quant_attn: float = 0.0
    quant_mlp: float = 0.0
    quant_experts: float = 0.0
    quant_act_fp8: bool = False
    # KV cache element size set by engine.kv_cache_dtype (0: the model dtype, vLLM's "auto")
    kv_dtype_bytes: int = 0
    # Multi-token-prediction layers the checkpoint carries beyond num_hidden_layers (DeepSeek-V3,
    # GLM-4.5 num_nextn_predict_layers; transformers 5 num_mtp_layers; Qwen3-Next
    # mtp_num_hidden_layers). vLLM's main model does not load them (only an MTP draft model
    # does): not in weight_bytes().
    num_mtp_layers: int = 0
    # The vision tower and projector vLLM loads with a multimodal checkpoint (vision_config),
    # estimated by _vision_params; in the model dtype, beside the language model's weights.
    vision_params: int = 0
    # Chunked local attention (Llama 4: attention_chunk_size with RoPE, every layer but the
    # NoPE ones of no_rope_layers): `num_chunked_layers` of the attention layers attend only to
    # the tokens of their own chunk of `attention_chunk_size` positions (vLLM's
    # ChunkedLocalAttention; KV groups as for sliding windows: sliding_kv_groups).
    attention_chunk_size: int = 0
    num_chunked_layers: int = 0
    # Weight matrices of a dense MLP: 3 for a gated one (gate, up, down: Llama, Qwen, Gemma,
    # Mistral, ...), 2 for the older up/down MLPs (GPT-2, GPT-NeoX, Falcon, StarCoder 2, Phi-2,
    # OPT, BLOOM, MPT, Nemotron's squared ReLU: NON_GATED_MLP_TYPES).
    mlp_matrices: int = 3
    # The checkpoint's own dtype (config torch_dtype) where it differs from what vLLM serves it
    # in (dtype_bytes): a float32 config runs in bfloat16 under --dtype auto.
    checkpoint_dtype: str = ""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def moe_layers(self) -> int:
        """Layers whose MLP is the MoE block; the other num_dense_layers have a dense MLP of
        intermediate_size (DeepSeek's first_k_dense_replace, Llama 4's interleave_moe_layer_step,
        Qwen's mlp_only_layers / decoder_sparse_step)."""
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    @property
    def attention_layers(self) -> int:
        """Layers with (full) attention and a KV cache."""
        return self.num_attention_layers or self.num_layers

    @property
    def local_layers(self) -> int:
        """Attention layers that attend to a local span only: sliding-window layers, or Llama 4's
        chunked local attention layers."""
        if self.sliding_window:
            return self.num_sliding_layers
        return self.num_chunked_layers if self.attention_chunk_size else 0

    @property
    def local_span(self) -> int:
        """The sliding window, or the attention chunk, of the local layers (0: none)."""
        return self.sliding_window or (self.attention_chunk_size if self.num_chunked_layers else 0)

    @property
    def full_attention_layers(self) -> int:
        """Attention layers that attend to the whole context."""
        return self.attention_layers - self.local_layers

    def sliding_kv_groups(self) -> tuple[int, int, int]:
        """(layers per group, full-attention groups, sliding-window groups) of vLLM's hybrid KV
        cache manager for a model with both kinds of attention layer, else (0, 0, 0).
        vLLM (kv_cache_utils `_get_kv_cache_groups_uniform_page_size`) splits each kind's
        layers into groups of the same size, the smaller kind's count (the larger's when it is
        under 1.5x the smaller), padding the last group of a kind; every group has its own
        block table over one shared pool whose block holds one page of each layer of a group.
        A sliding-window group frees the blocks that fall out of the window as a sequence
        grows (SlidingWindowManager.remove_skipped_blocks); Llama 4's chunked local attention
        layers are grouped the same way and free the blocks before the current chunk
        (ChunkedLocalAttentionManager)."""
        nf, ns = self.full_attention_layers, self.local_layers
        if not (nf and ns):
            return 0, 0, 0
        size = min(nf, ns)
        if max(nf, ns) < 1.5 * size:
            size = max(nf, ns)
        return size, -(-nf // size), -(-ns // size)

    def kv_pool_bytes_per_token(self) -> int:
        """KV bytes one token of a sequence's block table takes in the pool: all attention
        layers (kv_bytes_per_token), but for a model with both full and sliding-window layers,
        whose table of full-attention blocks covers the full groups' layers (padding
        included) and whose window blocks are counted apart (sliding_kv_groups)."""
        size, full_groups, _ = self.sliding_kv_groups()
        if not size:
            return self.kv_bytes_per_token()
        return self.kv_bytes_per_token() // self.attention_layers * size * full_groups

    @property
    def linear_layers(self) -> int:
        """Linear-attention layers (a fixed-size recurrent state per sequence, no KV cache)."""
        return self.num_layers - self.attention_layers

    @property
    def kv_elem_bytes(self) -> int:
        """Bytes of one KV-cache element: engine.kv_cache_dtype's, else the model dtype's."""
        return self.kv_dtype_bytes or self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """K and V for every attention layer, all KV heads (MLA: the one latent per layer)."""
        if self.kv_lora_rank:
            return self.attention_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * self.kv_elem_bytes
        return 2 * self.attention_layers * self.num_kv_heads * self.head_dim * self.kv_elem_bytes

    def _linear_dims(self) -> tuple[int, int]:
        """(key width, value width) of a Gated DeltaNet layer: heads x head dim of each."""
        return (self.linear_num_key_heads * self.linear_key_head_dim,
                self.linear_num_value_heads * self.linear_value_head_dim)

    def linear_params_per_layer(self) -> int:
        """A Gated DeltaNet layer (vLLM's qwen3_next.py): in_proj_qkvz (q, k, v, z), in_proj_ba
        (a, b per value head), the causal conv over q, k, v, and out_proj."""
        kd, vd = self._linear_dims()
        qkvz = self.hidden_size * (2 * kd + 2 * vd)
        ba = self.hidden_size * 2 * self.linear_num_value_heads
        conv = (2 * kd + vd) * self.linear_conv_kernel_dim
        return qkvz + ba + conv + vd * self.hidden_size

    def hybrid_kv_layout(self, tp: int = 1, kernel_block: int = 16, ssm_dtype_bytes: int | None = None) -> tuple[int, int]:
        """(minimum attention block size in tokens, state blocks per sequence) of vLLM's
        hybrid KV allocator for this model, or (0, 0) for a model without linear attention.
        vLLM (platforms' `_align_hybrid_block_size`, `kv_cache_utils` uniform page size) keeps
        one block pool for both kinds of layer: the attention block grows until one layer's
        attention page (block_size x 2 x KV heads x head dim x dtype) holds one layer's
        linear-attention state (conv window + delta-rule state), rounded up to the kernel's
        block multiple (16 for FlashAttention); layers are grouped by the smaller count, so with
        La attention and Ll linear layers (La <= Ll) a sequence holds ceil(Ll / La) state blocks
        besides its attention blocks."""
        if not self.linear_layers:
            return 0, 0
        if self.attention_layers > self.linear_layers:
            raise HardwareError(f"{self.name}: more attention ({self.attention_layers}) than linear-attention "
                                f"({self.linear_layers}) layers is not modelled")
        attn_1tok = 2 * max(self.num_kv_heads // tp, 1) * self.head_dim * self.kv_elem_bytes  # kv_cache_dtype's
        kd, vd = self._linear_dims()
        ssm_b = self.state_dtype_bytes if ssm_dtype_bytes is None else ssm_dtype_bytes
        page = ((2 * kd + vd) // tp * max(self.linear_conv_kernel_dim - 1, 0) * self.dtype_bytes
                + self.linear_num_value_heads // tp * self.linear_key_head_dim * self.linear_value_head_dim * ssm_b)
        block = kernel_block * -(-page // (kernel_block * attn_1tok))
        return block, -(-self.linear_layers // self.attention_layers)

    def linear_state_bytes_per_seq(self) -> int:
        """Recurrent state one sequence holds in all linear-attention layers: the conv window
        (kernel - 1 steps of q, k, v) in the model dtype and the delta-rule state
        (value heads x key dim x value dim) in `state_dtype_bytes`."""
        kd, vd = self._linear_dims()
        conv = (2 * kd + vd) * max(self.linear_conv_kernel_dim - 1, 0) * self.dtype_bytes
        ssm = self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim * self.state_dtype_bytes
        return self.linear_layers * (conv + ssm)

    def attn_params_per_layer(self) -> int:
        if self.kv_lora_rank:  # MLA: q (through q_lora_rank), kv_a, kv_b, o
            h, n = self.hidden_size, self.num_heads
            qk = self.head_dim  # nope + rope
            q = h * self.q_lora_rank + self.q_lora_rank * n * qk if self.q_lora_rank else h * n * qk
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_b = self.kv_lora_rank * n * (qk - self.qk_rope_head_dim + self.v_head_dim)
            return q + kv_a + kv_b + n * self.v_head_dim * h
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        return q + kv + o

    def mlp_params_per_layer(self) -> int:
        """Dense MLP (gate, up, down; or up, down where it has no gate) or, for MoE, one expert's."""
        inter = self.moe_intermediate_size if self.is_moe else self.intermediate_size
        return self.mlp_matrices * self.hidden_size * inter

    def param_groups(self) -> dict[str, int]:
        """Parameters by what quantization may treat apart: attention / linear-attention
        projections, dense MLPs and shared experts, routed experts, the rest (embeddings,
        lm_head, router), which stays in the model dtype, and the vision tower (model dtype)."""
        moe_layers = self.moe_layers
        mixers = self.attn_params_per_layer() * self.attention_layers
        if self.linear_layers:
            mixers += self.linear_params_per_layer() * self.linear_layers
        if self.is_moe:
            mlp = 3 * self.hidden_size * (self.shared_expert_intermediate_size * moe_layers
                                          + self.intermediate_size * self.num_dense_layers)
        else:
            mlp = self.mlp_params_per_layer() * self.num_layers
        experts = self.mlp_params_per_layer() * self.num_experts * moe_layers
        rest = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        rest += self.hidden_size * self.num_experts * moe_layers  # router
        return {"attn": mixers, "mlp": mlp, "experts": experts, "rest": rest, "vision": self.vision_params}

    def check_quantization(self) -> None:
        """Raise HardwareError when the checkpoint's quantization is not modelled (its weight
        size is unknown)."""
        if self.quant_method and not self.quant_weight_bits:
            raise HardwareError(f"{self.name}: quantization method '{self.quant_method}'"
                                f"{f' ({self.quant_detail})' if self.quant_detail else ''} is not modelled "
                                f"(modelled: {', '.join(QUANT_METHODS)})")

    def bytes_per_param(self, part: str) -> float:
        """Mean stored bytes of one parameter of a group of param_groups()."""
        f = getattr(self, f"quant_{part}", 0.0) if self.quant_method and part != "rest" else 0.0
        if f:
            self.check_quantization()
        return f * self.quant_weight_bits / 8 + (1.0 - f) * self.dtype_bytes

    def fp8_gemm_fraction(self, part: str) -> float:
        """Share of a group's GEMM FLOPs with FP8 weights and activations (W8A8)."""
        return getattr(self, f"quant_{part}", 0.0) if self.quant_act_fp8 and part != "rest" else 0.0

    def weight_bytes(self) -> int:
        """Bytes of the weights as vLLM holds them: quantized groups at their stored size."""
        groups = self.param_groups()
        if not self.quant_method:
            return sum(groups.values()) * self.dtype_bytes
        return math.ceil(sum(n * self.bytes_per_param(part) for part, n in groups.items()))


# Quantization methods of HF `quantization_config` whose weight size is modelled (vLLM's names).
QUANT_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors", "awq", "awq_marlin", "gptq", "gptq_marlin",
                 "mxfp4", "bitsandbytes", "modelopt")
_PARTS = ("attn", "mlp", "experts")


def _part_of_module(name: str) -> tuple[str, ...]:
    """The parameter groups a module name (or `re:` pattern) in an ignore list names; () for
    modules that stay in the model dtype anyway (embeddings, lm_head, router, norms)."""
    s = name.lower()
    if any(k in s for k in ("lm_head", "embed", "norm", "router", "expert_gate", "visual", "vision", "audio",
                            "mm_projector", "multi_modal")) or re.search(r"(^|\.)gate\$?$", s):
        return ()  # stays unquantized anyway, or not part of the language model
    if "shared_expert" in s:
        return ("mlp",)
    if "experts" in s:
        return ("experts",)
    if any(k in s for k in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv", "kv_a_proj",
                            "kv_b_proj", "q_a_proj", "q_b_proj")):
        return ("attn",)
    if re.search(r"mlp(\.\*|\$)?$", s):
        return ("mlp", "experts")  # the whole MLP block (MoE included)
    if any(k in s for k in ("mlp", "gate_proj", "up_proj", "down_proj", "feed_forward", "ffn")):
        return ("mlp",)
    return ()


def _quantized_fractions(ignore: Any, num_layers: int, parts=_PARTS) -> dict[str, float]:
    """quant_<part>: the fraction of layers whose `part` is quantized, given the modules a
    config leaves unquantized (modules_to_not_convert, ignore, ...). A name with a layer
    index excludes that layer's part (the whole part, though it may name one projection of
    it); a name without one, or a pattern, excludes the part in every layer."""
    out = {f"quant_{p}": (1.0 if p in parts else 0.0) for p in _PARTS}
    if not isinstance(ignore, (list, tuple)) or num_layers <= 0:
        return out
    skipped: dict[str, set] = {p: set() for p in _PARTS}
    for entry in ignore:
        s = str(entry).replace("\\", "")
        m = re.search(r"layers\.(\d+)(\.|$)", s)
        layers = {int(m.group(1))} if m else set(range(num_layers))
        for p in _part_of_module(s):
            skipped[p] |= layers & set(range(num_layers))
    for p in parts:
        out[f"quant_{p}"] = 1.0 - len(skipped[p]) / num_layers
    return out


def _group_bits(bits: float, group_size: Any, scale_bits: int, zero_point: bool) -> float:
    """Stored bits per weight of group-wise quantization: the weight, plus one scale (and, for
    asymmetric schemes, one packed zero point of `bits`) per group of `group_size` weights
    along the input. group_size <= 0 (per output channel) adds a negligible share: 0 here."""
    g = int(group_size or 0)
    return float(bits) + ((scale_bits + (bits if zero_point else 0)) / g if g > 0 else 0.0)


def _compressed_tensors(qc: dict, where: str) -> tuple[float, bool, str]:
    """(bits, fp8 activations, detail) of a compressed-tensors config: every config group
    must have the same weight scheme (mixed-precision checkpoints are not modelled: bits 0).
    vLLM's schemes (compressed_tensors/schemes/): W{4,8}A16 keep a params-dtype (16-bit) scale
    per group and, when asymmetric, a packed zero point per group; NVFP4/MXFP4 an 8-bit scale
    per group; block-wise FP8 a float32 scale per block; channel/tensor scales are negligible."""
    schemes = set()
    for g in (qc.get("config_groups") or {}).values():
        w = (g or {}).get("weights") or {}
        a = (g or {}).get("input_activations") or {}
        if not w.get("num_bits"):
            continue
        nb, typ, strategy = int(w["num_bits"]), str(w.get("type", "int")), str(w.get("strategy", "tensor"))
        if strategy in ("group", "tensor_group"):
            scale_bits = 8 if (typ == "float" and nb == 4) else 16
            bits = _group_bits(nb, w.get("group_size"), scale_bits, w.get("symmetric") is False)
        elif strategy == "block" and w.get("block_structure"):
            bn, bk = (int(x) for x in w["block_structure"])
            bits = nb + 32 / (bn * bk)
        else:
            bits = float(nb)
        act8 = str(a.get("type", "")) == "float" and int(a.get("num_bits") or 0) == 8
        detail = f"W{nb}A{int(a.get('num_bits') or 16)} {typ} {strategy}"
        schemes.add((bits, act8, detail))
    if len(schemes) != 1:
        return 0.0, False, ("no weight scheme in config_groups" if not schemes
                            else "config_groups with different weight schemes")
    return schemes.pop()


def parse_quantization(qc: Any, num_layers: int, where: str = "config") -> dict[str, Any]:
    """ModelArch's quant_* fields from a HF `quantization_config` ({} for none). Figures follow
    how vLLM stores each method's weights (vllm/model_executor/layers/quantization/):
    fp8, fbgemm_fp8: 1 byte per weight; block-wise fp8 (DeepSeek, Qwen FP8: weight_block_size)
        adds a float32 scale per block (8 + 32/(128·128) bits); per-tensor and per-channel
        scales are negligible. Activations are quantized to FP8 per token (W8A8).
    awq, awq_marlin: bits + a 16-bit scale and a packed `bits` zero point per group of
        group_size input weights (4-bit, group 128: 4.156 bits).
    gptq, gptq_marlin: the same: GPTQ checkpoints store qzeros even when symmetric.
    compressed-tensors: see _compressed_tensors.
    mxfp4 (gpt-oss): MoE expert weights only, 4 bits + an 8-bit shared scale per 32 (4.25
        bits); vLLM's Mxfp4Config leaves every other linear layer unquantized.
    bitsandbytes: 4-bit: blocks of 64 with a float32 absmax (4.5 bits), or with double
        quantization an 8-bit absmax and a float32 per 256 blocks (4.127 bits) (QLoRA,
        arXiv:2305.14314, section 3); 8-bit (LLM.int8): 8 bits.
    modelopt: quant_algo FP8 (W8A8, 8 bits) or NVFP4 (4 bits + an FP8 scale per 16: 4.5).
    The ignore lists (modules_to_not_convert, ignore, ignored_layers, exclude_modules,
    llm_int8_skip_modules) leave parts unquantized (_quantized_fractions). An unknown method
    loads (quant_weight_bits 0) and raises where the weight size is needed."""
    if not qc:
        return {}
    if not isinstance(qc, dict):
        raise HardwareError(f"{where}: quantization_config must be a mapping")
    method = str(qc.get("quant_method") or "").lower()
    if not method and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        method = "bitsandbytes"  # transformers' BitsAndBytesConfig without quant_method
    method = {"compressed_tensors": "compressed-tensors"}.get(method, method)
    ignore = [n for k in ("modules_to_not_convert", "ignore", "ignored_layers", "exclude_modules",
                          "llm_int8_skip_modules") if isinstance(qc.get(k), (list, tuple)) for n in qc[k]]
    parts, act8, detail = _PARTS, False, ""

    def need(*keys):
        for k in keys:
            if qc.get(k) is not None:
                return qc[k]
        raise HardwareError(f"{where}: quantization_config ({method}) is missing '{keys[0]}'")
    try:
        if method in ("fp8", "fbgemm_fp8"):
            block = qc.get("weight_block_size")
            bits = 8 + 32 / (int(block[0]) * int(block[1])) if block else 8.0
            act8, detail = True, f"fp8 {'block ' + 'x'.join(map(str, block)) if block else 'per-tensor/channel'}, W8A8"
        elif method in ("awq", "awq_marlin"):
            b, g = int(need("w_bit", "bits")), need("q_group_size", "group_size")
            bits = _group_bits(b, g, 16, bool(qc.get("zero_point", True)))
            detail = f"W{b}A16 group {g}"
        elif method in ("gptq", "gptq_marlin"):
            b, g = int(need("bits")), need("group_size")
            bits, detail = _group_bits(b, g, 16, True), f"W{b}A16 group {g}"
        elif method == "compressed-tensors":
            bits, act8, detail = _compressed_tensors(qc, where)
        elif method == "mxfp4":
            bits, parts, detail = 4 + 8 / 32, ("experts",), "MoE experts MXFP4"
        elif method == "bitsandbytes":
            if qc.get("load_in_8bit"):
                bits, detail = 8.0, "LLM.int8"
            else:
                dq = bool(qc.get("bnb_4bit_use_double_quant"))
                bits = 4 + (8 / 64 + 32 / (64 * 256) if dq else 32 / 64)
                detail = f"4-bit {qc.get('bnb_4bit_quant_type', 'fp4')}{' double-quant' if dq else ''}"
        elif method == "modelopt":
            mo = {**qc, **(qc.get("quantization") or {})}  # hf_quant_config.json nests it
            algo = str(mo.get("quant_algo") or "").upper()
            if algo == "FP8":
                bits, act8, detail = 8.0, True, "FP8 W8A8"
            elif algo == "NVFP4":
                bits, detail = _group_bits(4, mo.get("group_size") or 16, 8, False), "NVFP4"
            else:
                bits, detail = 0.0, f"quant_algo {algo or '?'}"
        else:
            bits = 0.0
    except (TypeError, ValueError, IndexError) as e:
        raise HardwareError(f"{where}: malformed quantization_config ({method}): {e}") from None
    return {"quant_method": method or "?", "quant_detail": detail, "quant_weight_bits": float(bits),
            **_quantized_fractions(ignore, num_layers, parts), "quant_act_fp8": act8}


# Top-level keys of a multimodal config that hold for its language model too (text_config
# leaves them out): the checkpoint's dtype and quantization.
_INHERITED_KEYS = ("torch_dtype", "dtype", "quantization_config", "compression_config")

# transformers' defaults for keys a published config.json of these text models leaves out (a
# config.json holds only what differs from its config class; vLLM reads the class's values):
# Gemma 3's text_config gives neither vocab_size nor head_dim (google/gemma-3-*-it), Gemma ties
# its embeddings (vLLM's Gemma 2 always does), Llama 4's text config class sets MoE in every
# layer, a NoPE layer every 4th and 8,192-token attention chunks.
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {"tie_word_embeddings": True},
    "gemma2": {"tie_word_embeddings": True},
    "gemma3_text": {"vocab_size": 262208, "head_dim": 256, "max_position_embeddings": 131072,
                    "sliding_window": 4096, "tie_word_embeddings": True},
    "llama4_text": {"head_dim": 128, "interleave_moe_layer_step": 1, "no_rope_layer_interval": 4,
                    "attention_chunk_size": 8192, "intermediate_size_mlp": 16384},
    # (configs of these types rarely say it: their transformers classes tie the LM head to
    # the embedding by default)
    **{t: {"tie_word_embeddings": True} for t in ("gpt2", "gpt_bigcode", "gpt_neo", "falcon", "opt", "bloom",
                                                  "starcoder2")},
}
# The text model type of a multimodal model type, for a text_config without model_type.
_TEXT_MODEL_TYPE = {"gemma3": "gemma3_text", "llama4": "llama4_text", "mistral3": "mistral"}


def _language_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: text_config for multimodal / nested configs (with the
    top level's dtype, quantization and architectures), then transformers' defaults of its
    model type for the keys it leaves out."""
    if "text_config" in cfg and "num_hidden_layers" not in cfg and isinstance(cfg["text_config"], dict):
        text = dict(cfg["text_config"])
        for k in _INHERITED_KEYS:
            if text.get(k) is None and cfg.get(k) is not None:
                text[k] = cfg[k]
        if not text.get("model_type") and cfg.get("model_type"):
            text["model_type"] = _TEXT_MODEL_TYPE.get(str(cfg["model_type"]), str(cfg["model_type"]))
        text["architectures"] = cfg.get("architectures")
        cfg = text
    defaults = _TEXT_DEFAULTS.get(str(cfg.get("model_type") or ""))
    return {**defaults, **cfg} if defaults else cfg


def _is_llama4(cfg: dict[str, Any]) -> bool:
    return str(cfg.get("model_type") or "").startswith("llama4") or "interleave_moe_layer_step" in cfg


def _moe_layer_count(cfg: dict[str, Any], num_layers: int) -> int:
    """Decoder layers whose MLP is the MoE block, as vLLM builds the model:
    DeepSeek-V2/V3, GLM-4.5 (first_k_dense_replace): layer i >= k with i % moe_layer_freq == 0;
    Llama 4: (i + 1) % interleave_moe_layer_step == 0 (vLLM ignores the config's moe_layers);
    Qwen2/3-MoE, Qwen3-Next: i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0;
    ERNIE 4.5 (ernie45_moe.py): moe_layer_start_index <= i <= moe_layer_end_index and
    (i + 1) % moe_layer_interval == 0; every layer otherwise (Mixtral, gpt-oss, Phi-3.5-MoE)."""
    def step(key):
        v = cfg.get(key)
        return 1 if v is None else int(v)
    if cfg.get("first_k_dense_replace") is not None:
        k, freq = int(cfg["first_k_dense_replace"]), max(step("moe_layer_freq"), 1)
        return sum(1 for i in range(num_layers) if i >= k and i % freq == 0)
    if _is_llama4(cfg):
        st = step("interleave_moe_layer_step")
        return sum(1 for i in range(num_layers) if st > 0 and (i + 1) % st == 0)
    if "moe_layer_start_index" in cfg or "moe_layer_interval" in cfg or "moe_layer_end_index" in cfg:
        lo, iv = int(cfg.get("moe_layer_start_index") or 0), max(step("moe_layer_interval"), 1)
        hi = int(cfg["moe_layer_end_index"]) if cfg.get("moe_layer_end_index") is not None else num_layers - 1
        return sum(1 for i in range(num_layers) if lo <= i <= hi and (i + 1) % iv == 0)
    if "decoder_sparse_step" in cfg or "mlp_only_layers" in cfg:
        st, dense = max(step("decoder_sparse_step"), 1), set(cfg.get("mlp_only_layers") or [])
        return sum(1 for i in range(num_layers) if i not in dense and (i + 1) % st == 0)
    return num_layers


def _chunked_layers(cfg: dict[str, Any], num_layers: int, where: str) -> tuple[int, int]:
    """(attention_chunk_size, layers with chunked local attention) of Llama 4: vLLM's
    Llama4Attention uses ChunkedLocalAttention in the layers with RoPE, those where
    no_rope_layers[i] is 1 (transformers fills an empty list with 1 except every
    no_rope_layer_interval-th layer, the NoPE global layers)."""
    chunk = cfg.get("attention_chunk_size")
    if not _is_llama4(cfg) or not chunk:
        return 0, 0
    rope = _per_layer(cfg, "no_rope_layers", num_layers, where)
    if rope:
        n = sum(1 for r in rope if r)
    else:
        interval = int(cfg.get("no_rope_layer_interval") or 4)
        n = sum(1 for i in range(num_layers) if (i + 1) % interval)
    return (int(chunk), n) if n else (0, 0)


def _vision_params(outer: dict[str, Any], text_hidden: int) -> int:
    """Parameters of the vision tower and projector vLLM loads with a multimodal checkpoint,
    from its vision_config: the encoder's linear layers (q, k, v, o and a 2-matrix MLP, or a
    gated 3-matrix one for Pixtral, Qwen2.5-VL and SiLU towers), the patch embedding, a learned
    position embedding (ViTs without 2D RoPE), and the projector into the language model:
    Qwen2/2.5/3-VL's patch merger (hidden·m² -> hidden·m² -> out_hidden_size, one per deepstack
    layer besides), Mistral 3's patch merger and 2-layer projector, Llama 4's pixel-shuffle MLP
    and projector, else one hidden -> text hidden matrix (Gemma 3). Biases and norms (under
    0.1%) are left out. 0 without a vision_config."""
    v = outer.get("vision_config")
    if not isinstance(v, dict) or not v:
        return 0
    vt = str(v.get("model_type") or "")
    mt = str(outer.get("model_type") or "")
    h = int(v.get("embed_dim") or v.get("hidden_size") or 0)  # Qwen2-VL: embed_dim; hidden_size is its output
    layers = int(v.get("num_hidden_layers") or v.get("depth") or v.get("num_layers") or 0)
    if h <= 0 or layers <= 0:
        return 0
    inter = int(v.get("intermediate_size") or 0) or int(float(v.get("mlp_ratio") or 4) * h)
    act = str(v.get("hidden_act") or "").lower()
    qwen = any(t in vt or t in mt for t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_omni"))
    gated = vt in ("pixtral", "qwen2_5_vl") or act in ("silu", "swish", "swiglu")
    n = layers * (4 * h * h + (3 if gated else 2) * h * inter)
    patch = int(v.get("patch_size") or 14)
    channels = int(v.get("num_channels") or v.get("in_chans") or v.get("in_channels") or 3)
    n += channels * int(v.get("temporal_patch_size") or 1) * patch * patch * h
    if v.get("num_position_embeddings"):
        n += int(v["num_position_embeddings"]) * h
    elif v.get("image_size") and not qwen and vt != "pixtral":
        n += (int(v["image_size"]) // patch) ** 2 * h
    T = text_hidden
    if qwen:
        m = int(v.get("spatial_merge_size") or 2)
        d = h * m * m
        out = int(v.get("out_hidden_size") or (v.get("hidden_size") if v.get("embed_dim") else 0) or T)
        n += (1 + len(v.get("deepstack_visual_indexes") or [])) * (d * d + d * out)
    elif vt == "pixtral" or mt == "mistral3":
        m = int(outer.get("spatial_merge_size") or v.get("spatial_merge_size") or 2)
        n += h * m * m * h + h * T + T * T
    elif vt.startswith("llama4") or mt == "llama4":
        p_in = int(v.get("projector_input_dim") or 4096)
        p_out = int(v.get("projector_output_dim") or 4096)
        n += inter * p_in + p_in * p_out + int(v.get("vision_output_dim") or p_out) * T
    else:
        n += h * T
    return n


def model_from_hf_config(cfg: dict[str, Any], name: str = "", where: str = "config") -> ModelArch:
    def get(*keys, default=None):
        for k in keys:
            if k in cfg and cfg[k] is not None:
                return cfg[k]
        if default is not None:
            return default
        raise HardwareError(f"{where}: missing field '{keys[0]}'")

    outer = cfg
    # Multimodal / nested configs keep the language model under text_config.
    cfg = _language_config(cfg)
    hidden = int(get("hidden_size", "d_model", "n_embd"))
    heads = int(get("num_attention_heads", "n_head"))
    mt = str(cfg.get("model_type") or "")
    if cfg.get("multi_query") and not cfg.get("new_decoder_architecture"):
        kv_heads = 1  # Falcon-7B, GPT-BigCode (StarCoder 1): one KV head
    else:
        kv_heads = int(get("num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(get("head_dim", default=hidden // heads))
    mla = {}
    if cfg.get("kv_lora_rank"):
        rope = int(get("qk_rope_head_dim"))
        head_dim = int(get("qk_nope_head_dim")) + rope  # the query/key head (its FLOPs)
        mla = {"kv_lora_rank": int(cfg["kv_lora_rank"]), "qk_rope_head_dim": rope,
               "q_lora_rank": int(cfg.get("q_lora_rank") or 0), "v_head_dim": int(get("v_head_dim"))}
    dtype = str(get("torch_dtype", "dtype", default="bfloat16")).replace("torch.", "")
    if dtype not in _DTYPE_BYTES:
        raise HardwareError(f"{where}: unsupported dtype {dtype!r}")
    checkpoint_dtype = ""
    if dtype in _AUTO_DOWNCAST:
        checkpoint_dtype, dtype = dtype, "bfloat16"  # what vLLM's --dtype auto serves it in (engine.dtype overrides)
    num_experts = int(get("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", default=0) or 0)
    if cfg.get("use_moe") is False:
        num_experts = 0
    if not num_experts:  # an MoE whose expert count sits under another key would be read as dense
        unread = sorted(k for k, v in cfg.items() if "expert" in k and not isinstance(v, bool)
                        and isinstance(v, (int, list)) and v and k != "num_experts_per_tok")
        if unread:
            raise HardwareError(f"{where}: MoE keys {', '.join(unread)} are not understood (the expert count is "
                                "read from num_experts, num_local_experts or n_routed_experts)")
    gated = mt not in NON_GATED_MLP_TYPES
    inter = int(get("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", default=0) or 0)
    if not inter and not gated:
        inter = 4 * hidden  # GPT-2's n_inner, Falcon's ffn_hidden_size, BLOOM: 4 x hidden unless given
    moe_inter = int(get("moe_intermediate_size", default=inter if num_experts else 0) or 0)
    archs = cfg.get("architectures") or [""]
    num_layers = int(get("num_hidden_layers", "n_layer", "num_layers"))
    attention_layers = 0
    types = cfg.get("layer_types")
    _refuse_unmodelled_layers(cfg, types, where)
    if isinstance(types, list) and "linear_attention" in types:
        types = _per_layer(cfg, "layer_types", num_layers, where)
        attention_layers = sum(1 for t in types if t == "full_attention")
    elif cfg.get("full_attention_interval") and cfg.get("linear_num_value_heads"):
        attention_layers = num_layers // int(cfg["full_attention_interval"])
    window, sliding = _sliding_layers(cfg, num_layers, attention_layers, where)
    dense_layers = num_layers - _moe_layer_count(cfg, num_layers) if num_experts else 0
    shared = 0
    if num_experts:
        shared = int(cfg.get("shared_expert_intermediate_size") or 0) or int(
            cfg.get("n_shared_experts") or cfg.get("moe_num_shared_experts") or 0) * moe_inter
    if num_experts and _is_llama4(cfg):
        # Llama 4 (vLLM llama4.py): one shared expert of intermediate_size beside the routed
        # ones; the dense layers' MLP is intermediate_size_mlp wide.
        shared = moe_inter
        if dense_layers:
            inter = int(get("intermediate_size_mlp", default=inter))
    chunk, chunked = _chunked_layers(cfg, num_layers, where)
    return ModelArch(
        name=name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "model"),
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=int(get("vocab_size")),
        dtype_bytes=_DTYPE_BYTES[dtype],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts=num_experts,
        num_experts_per_tok=int(get("num_experts_per_tok", "moe_topk", "moe_k", default=0) or 0) if num_experts else 0,
        moe_intermediate_size=moe_inter,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 0),
        architecture=str(archs[0]),
        num_attention_layers=attention_layers,
        **({k: int(cfg.get(k) or 0) for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                               "linear_value_head_dim", "linear_conv_kernel_dim")}
           if attention_layers else {}),
        state_dtype_bytes=_DTYPE_BYTES.get(str(cfg.get("mamba_ssm_dtype") or dtype).replace("torch.", ""),
                                           _DTYPE_BYTES[dtype]) if attention_layers else 0,
        **mla,
        num_dense_layers=dense_layers,
        shared_expert_intermediate_size=shared,
        sliding_window=window,
        num_sliding_layers=sliding,
        **parse_quantization(cfg.get("quantization_config") or cfg.get("compression_config"), num_layers, where),
        num_mtp_layers=int(cfg.get("num_nextn_predict_layers") or cfg.get("num_mtp_layers")
                           or cfg.get("mtp_num_hidden_layers") or 0),
        vision_params=_vision_params(outer, hidden),
        attention_chunk_size=chunk,
        num_chunked_layers=chunked,
        mlp_matrices=3 if gated else 2,
        checkpoint_dtype=checkpoint_dtype,
    )


# Layer kinds of a config's layer_types that the model prices: full attention, sliding-window
# attention, Gated DeltaNet linear attention (Qwen3-Next / 3.5 / 3.6).
_MODELLED_LAYER_TYPES = frozenset({"full_attention", "attention", "sliding_attention", "linear_attention"})
# Model types built of state-space (Mamba), short-convolution or other recurrent layers beside
# (or instead of) attention, which are not modelled (vLLM's mamba / hybrid model code).
_UNMODELLED_MODEL_TYPES = frozenset({"mamba", "mamba2", "falcon_mamba", "falcon_h1", "jamba", "bamba", "zamba",
                                     "zamba2", "nemotron_h", "granitemoehybrid", "lfm2", "lfm2_moe", "plamo2",
                                     "minimax", "minimax_text_01", "rwkv", "rwkv7", "recurrent_gemma"})


def _refuse_unmodelled_layers(cfg: dict[str, Any], types, where: str) -> None:
    """A clear error for a model whose layers are not all attention of a modelled kind (Mamba
    hybrids such as Granite 4.0-H, Nemotron-H, Jamba, Falcon-H1; LFM2's convolutions): read as
    attention in every layer, its KV cache and FLOPs would be several times off."""
    mt = str(cfg.get("model_type") or "")
    other = sorted({str(t) for t in types} - _MODELLED_LAYER_TYPES) if isinstance(types, list) else []
    pattern = str(cfg.get("hybrid_override_pattern") or "")
    if mt in _UNMODELLED_MODEL_TYPES or other or "M" in pattern or cfg.get("attn_layer_period"):
        what = (f"layer types {', '.join(other)}" if other else
                f"model type {mt}" if mt in _UNMODELLED_MODEL_TYPES else "Mamba layers")
        raise HardwareError(f"{where}: {what} not modelled (attention layers only: full, sliding-window, "
                            "Gated DeltaNet linear attention); a state-space or convolution layer read as "
                            "attention would misprice its KV cache and compute")


def _per_layer(cfg: dict[str, Any], key: str, num_layers: int, where: str) -> list | None:
    """A per-layer list of the config (layer_types, no_rope_layers), checked to have one entry
    per layer; None when the config has none."""
    v = cfg.get(key)
    if not isinstance(v, list) or not v:
        return None
    if len(v) != num_layers:
        raise HardwareError(f"{where}: {key} lists {len(v)} layers, num_hidden_layers is {num_layers}")
    return v


def _sliding_layers(cfg: dict[str, Any], num_layers: int, attention_layers: int, where: str) -> tuple[int, int]:
    """(window, number of sliding-window layers) as vLLM builds the model: a layer slides when
    `layer_types` says "sliding_attention"; without layer_types, Gemma 2 and gpt-oss slide in
    every other layer (the even ones), Gemma 3 and Cohere 2 in all but every
    `sliding_window_pattern`-th, and other models with a `sliding_window` in every layer
    (vLLM's model-level window). Transformers drops the window of Qwen2-style configs whose
    `use_sliding_window` is false, and vLLM ignores a window of 0."""
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False or not window or attention_layers:
        return 0, 0  # (hybrid linear-attention models: full attention only)
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise HardwareError(f"{where}: sliding_window must be a positive integer, got {window!r}")
    types = _per_layer(cfg, "layer_types", num_layers, where)
    mt = str(cfg.get("model_type") or "")
    if types:
        n = sum(1 for t in types if t == "sliding_attention")
    elif mt in ("gemma2", "gpt_oss"):
        n = (num_layers + 1) // 2
    elif mt in ("gemma3", "gemma3_text", "cohere2"):
        pattern = int(cfg.get("sliding_window_pattern") or (6 if mt.startswith("gemma3") else 4))
        n = sum(1 for i in range(num_layers) if (i + 1) % pattern)
    else:
        n = num_layers
    return (window, n) if n else (0, 0)


def load_model(name_or_path: str | os.PathLike) -> ModelArch:
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
        if not p.exists():
            raise HardwareError(f"no config.json in model directory {name_or_path}")
    if p.suffix == ".json":
        if not p.exists():
            raise HardwareError(f"model config not found: {p}")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise HardwareError(f"{p}: not valid JSON: {e}") from None
        name = p.parent.name if p.name == "config.json" else p.stem
        return model_from_hf_config(cfg, name=name, where=str(p))
    path = _resolve("models", name_or_path)
    data = _load_yaml(path)
    cfg = data.get("hf_config")
    if not isinstance(cfg, dict):
        raise HardwareError(f"{path}: missing mapping 'hf_config'")
    return model_from_hf_config(cfg, name=str(data.get("name", path.stem)), where=str(path))


def _nccl_spec(d: Any, path: Path) -> NcclLinkSpec | None:
    if not d:
        return None
    if not isinstance(d, dict):
        raise HardwareError(f"{path}: 'nccl' must be a mapping")
    hw = str(d.get("hw", "pci"))
    if hw not in ("pci", "nvlink"):
        raise HardwareError(f"{path}: nccl.hw must be pci or nvlink, got {hw!r}")
    return NcclLinkSpec(bus_bandwidth_Bps=_req(d, "bus_bandwidth_Bps", path), hw=hw,
                        p2p=bool(d.get("p2p", True)), source=str(d.get("source", "")))


def _custom_ar_spec(d: Any, path: Path) -> dict | None:
    if not d:
        return None
    curves = d.get("curves") if isinstance(d, dict) else None
    if not isinstance(curves, dict) or not curves:
        raise HardwareError(f"{path}: vllm_custom_all_reduce needs curves: {{gpus: {{bytes, time_us}}}}")
    out = {}
    for n, c in curves.items():
        xs, ys = (c or {}).get("bytes"), (c or {}).get("time_us")
        if not xs or not ys or len(xs) != len(ys) or min(xs) <= 0 or min(ys) <= 0:
            raise HardwareError(f"{path}: vllm_custom_all_reduce.curves.{n} needs positive bytes and time_us "
                                "of the same length")
        out[int(n)] = {"bytes": [float(x) for x in xs], "time_us": [float(y) for y in ys]}
    top = max(max(c["bytes"]) for c in out.values())
    mx = float(d.get("max_bytes") or top)
    if mx < top:
        raise HardwareError(f"{path}: vllm_custom_all_reduce.max_bytes is below its largest measured size")
    return {"curves": out, "max_bytes": mx, "source": str(d.get("source", ""))}


def load_link(name_or_path: str | os.PathLike) -> LinkSpec:
    path = _resolve("interconnects", name_or_path)
    d = _load_yaml(path)
    return LinkSpec(
        name=str(d.get("name", path.stem)),
        kind=str(d.get("kind", "")),
        bandwidth_Bps=_req(d, "bandwidth_Bps", path),
        latency_s=float(d.get("latency_s") or 0.0),
        allreduce_efficiency=float(d.get("allreduce_algo_bw_efficiency") or 0.8),
        source=str(d.get("source", "")),
        nccl=_nccl_spec(d.get("nccl"), path),
        custom_all_reduce=_custom_ar_spec(d.get("vllm_custom_all_reduce"), path),
    )


def load_memory_tier(name_or_path: str | os.PathLike) -> MemoryTierSpec:
    path = _resolve("memory_tiers", name_or_path)
    d = _load_yaml(path)
    return MemoryTierSpec(
        name=str(d.get("name", path.stem)),
        kind=str(d.get("kind", "")),
        capacity_bytes=_req(d, "capacity_bytes", path),
        bandwidth_Bps=_req(d, "bandwidth_Bps", path),
        latency_s=float(d.get("latency_s") or 0.0),
        link=load_link(_req(d, "link", path, str)),
        source=str(d.get("source", "")),
    )


def device_from_dict(d: dict[str, Any], path: Path) -> DeviceSpec:
    host = d.get("host_link")
    intra = d.get("intra_node_link")
    kind = str(d.get("kind", "gpu"))

    def spec(key):  # a CPU profile may leave datasheet figures out (its latency is fitted)
        if kind == "cpu" and d.get(key) is None:
            return 0.0
        return _req(d, key, path)
    return DeviceSpec(
        name=str(d.get("name", path.stem)),
        kind=kind,
        peak_flops=spec("peak_bf16_flops"),
        memory_bytes=spec("memory_bytes"),
        memory_bandwidth_Bps=spec("memory_bandwidth_Bps"),
        host_link=load_link(host) if host else None,
        intra_node_link=load_link(intra) if intra else None,
        description=str(d.get("description", "")),
        source=str(d.get("source", "")),
        extra={k: v for k, v in d.items() if k not in {
            "name", "kind", "peak_bf16_flops", "memory_bytes", "memory_bandwidth_Bps",
            "host_link", "intra_node_link", "description", "source"}},
    )


def load_device(name_or_path: str | os.PathLike) -> tuple[DeviceSpec, dict[str, Any]]:
    """A device spec, and the raw file (a calibrated profile carries more than the spec:
    its `engine` facts and its fitted `latency_model`)."""
    try:
        path = _resolve("devices", name_or_path)
    except HardwareError:
        try:
            path = _resolve("profiles", name_or_path)
        except HardwareError:
            raise HardwareError(_resolve_msg(name_or_path)) from None
    d = _load_yaml(path)
    d["_dir"] = str(path.resolve().parent)  # a profile's tables are found relative to it
    if "device" in d and isinstance(d["device"], dict):  # a calibrated profile embeds its device
        return device_from_dict(d["device"], path), d
    return device_from_dict(d, path), d
