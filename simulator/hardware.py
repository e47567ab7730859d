"""Hardware and model descriptions, loaded from the YAML files under `hardware/`.

A name (`h100-sxm`, `llama-3.1-8b`) resolves to `hardware/<kind>/<name>.yaml`; a path is
read as is. A model may also be a Hugging Face `config.json` (or a directory holding one).
This is the simulator's only I/O.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HARDWARE_DIR = Path(os.environ.get("AGENTSERVESIM_HARDWARE", Path(__file__).resolve().parents[1] / "hardware"))

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "bf16": 2, "fp16": 2, "float32": 4, "float": 4,
                "fp32": 4, "float8": 1, "fp8": 1, "int8": 1}


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
    # MoE models whose first layers keep a dense MLP (DeepSeek's first_k_dense_replace) and
    # shared experts beside the routed ones (n_shared_experts x moe_intermediate_size, or
    # shared_expert_intermediate_size)
    num_dense_layers: int = 0
    shared_expert_intermediate_size: int = 0
    # Sliding-window attention (Gemma 2/3, gpt-oss, Mistral-7B-v0.1): `num_sliding_layers` of
    # the attention layers attend to the last `sliding_window` tokens only (0: none).
    sliding_window: int = 0
    num_sliding_layers: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def attention_layers(self) -> int:
        """Layers with (full) attention and a KV cache."""
        return self.num_attention_layers or self.num_layers

    @property
    def full_attention_layers(self) -> int:
        """Attention layers that attend to the whole context."""
        return self.attention_layers - self.num_sliding_layers

    def sliding_kv_groups(self) -> tuple[int, int, int]:
        """(layers per group, full-attention groups, sliding-window groups) of vLLM's hybrid KV
        cache manager for a model with both kinds of attention layer, else (0, 0, 0).
        vLLM (kv_cache_utils `_get_kv_cache_groups_uniform_page_size`) splits each kind's
        layers into groups of the same size, the smaller kind's count (the larger's when it is
        under 1.5x the smaller), padding the last group of a kind; every group has its own
        block table over one shared pool whose block holds one page of each layer of a group.
        A sliding-window group frees the blocks that fall out of the window as a sequence
        grows (SlidingWindowManager.remove_skipped_blocks)."""
        nf, ns = self.full_attention_layers, self.num_sliding_layers
        if not (self.sliding_window and nf and ns):
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

    def kv_bytes_per_token(self) -> int:
        """K and V for every attention layer, all KV heads (MLA: the one latent per layer)."""
        if self.kv_lora_rank:
            return self.attention_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * self.dtype_bytes
        return 2 * self.attention_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

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
        attn_1tok = 2 * max(self.num_kv_heads // tp, 1) * self.head_dim * self.dtype_bytes
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
        """Dense MLP (gate, up, down) or, for MoE, one expert's."""
        inter = self.moe_intermediate_size if self.is_moe else self.intermediate_size
        return 3 * self.hidden_size * inter

    def weight_bytes(self) -> int:
        per_layer = self.mlp_params_per_layer() * (self.num_experts if self.is_moe else 1)
        if self.is_moe:
            per_layer += self.hidden_size * self.num_experts  # router
            per_layer += 3 * self.hidden_size * self.shared_expert_intermediate_size
        mixers = self.attn_params_per_layer() * self.attention_layers
        if self.linear_layers:
            mixers += self.linear_params_per_layer() * self.linear_layers
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        mlps = per_layer * (self.num_layers - self.num_dense_layers)
        if self.num_dense_layers:
            mlps += 3 * self.hidden_size * self.intermediate_size * self.num_dense_layers
        return (mlps + mixers + emb) * self.dtype_bytes


def model_from_hf_config(cfg: dict[str, Any], name: str = "", where: str = "config") -> ModelArch:
    def get(*keys, default=None):
        for k in keys:
            if k in cfg and cfg[k] is not None:
                return cfg[k]
        if default is not None:
            return default
        raise HardwareError(f"{where}: missing field '{keys[0]}'")

    # Multimodal / nested configs keep the language model under text_config.
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
    hidden = int(get("hidden_size", "d_model", "n_embd"))
    heads = int(get("num_attention_heads", "n_head"))
    kv_heads = int(get("num_key_value_heads", default=heads))
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
    num_experts = int(get("num_experts", "num_local_experts", "n_routed_experts", default=0) or 0)
    inter = int(get("intermediate_size", "ffn_dim", default=0) or 0)
    moe_inter = int(get("moe_intermediate_size", default=inter if num_experts else 0) or 0)
    archs = cfg.get("architectures") or [""]
    num_layers = int(get("num_hidden_layers", "n_layer", "num_layers"))
    attention_layers = 0
    types = cfg.get("layer_types")
    if isinstance(types, list) and "linear_attention" in types:
        if len(types) != num_layers:
            raise HardwareError(f"{where}: layer_types lists {len(types)} layers, num_hidden_layers is {num_layers}")
        attention_layers = sum(1 for t in types if t == "full_attention")
    elif cfg.get("full_attention_interval") and cfg.get("linear_num_value_heads"):
        attention_layers = num_layers // int(cfg["full_attention_interval"])
    window, sliding = _sliding_layers(cfg, num_layers, attention_layers, where)
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
        num_experts_per_tok=int(get("num_experts_per_tok", "moe_topk", default=0) or 0) if num_experts else 0,
        moe_intermediate_size=moe_inter,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
        architecture=str(archs[0]),
        num_attention_layers=attention_layers,
        **({k: int(cfg.get(k) or 0) for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                               "linear_value_head_dim", "linear_conv_kernel_dim")}
           if attention_layers else {}),
        state_dtype_bytes=_DTYPE_BYTES.get(str(cfg.get("mamba_ssm_dtype") or dtype).replace("torch.", ""),
                                           _DTYPE_BYTES[dtype]) if attention_layers else 0,
        **mla,
        num_dense_layers=int(cfg.get("first_k_dense_replace") or 0) if num_experts else 0,
        shared_expert_intermediate_size=(int(cfg.get("shared_expert_intermediate_size") or 0)
                                         or int(cfg.get("n_shared_experts") or 0) * moe_inter) if num_experts else 0,
        sliding_window=window,
        num_sliding_layers=sliding,
    )


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
    types = cfg.get("layer_types")
    mt = str(cfg.get("model_type") or "")
    if isinstance(types, list) and types:
        if len(types) != num_layers:
            raise HardwareError(f"{where}: layer_types lists {len(types)} layers, num_hidden_layers is {num_layers}")
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
