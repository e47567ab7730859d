"""A deployment: model + device (or calibrated profile) + engine settings, resolved.

Resolves what vLLM would pick when the user leaves a knob unset (block size, token budget,
max_num_seqs, KV block count) and builds the latency model. A calibrated profile's
recorded engine facts (its real KV block count and limits) are the defaults when present.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .config import KV_CACHE_DTYPE_BYTES, MODEL_DTYPE_BYTES, ConfigError, SimConfig
from .hardware import HARDWARE_DIR, DeviceSpec, HardwareError, ModelArch, load_link, load_memory_tier
from .latency import LatencyModel, LinearStepModel, OperatorModel, RooflineModel, ScaledLatency
from .latency.roofline import AttentionTiles, DecodeSkew, Elementwise

GiB = 1 << 30

# vLLM v1 defaults for the OpenAI API server (vllm/engine/arg_utils.py, _set_default_args):
# GPUs with >= 70 GiB (except A100): 8192 batched tokens, 1024 seqs; smaller GPUs: 2048 / 256;
# the CPU backend: 2048 / 128 (per data-parallel rank). Block size: 16 on GPU, 128 on CPU.
def vllm_defaults(device: DeviceSpec) -> dict[str, int]:
    if device.kind == "cpu":
        return {"block_size": 128, "max_num_batched_tokens": 2048, "max_num_seqs": 128}
    big = device.memory_bytes >= 70 * GiB and "a100" not in device.name
    return {"block_size": 16, "max_num_batched_tokens": 8192 if big else 2048, "max_num_seqs": 1024 if big else 256}


# Memory vLLM keeps outside weights and KV on a GPU: CUDA graphs and the non-torch allocator
# (an assumption, about 1 GiB on the runs we have seen logged), plus the activation peak of a
# profile forward pass, estimated from its largest tensors (see estimate_num_gpu_blocks).
NON_TORCH_BYTES = 1 * GiB


@dataclass(frozen=True)
class ResolvedEngine:
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    num_gpu_blocks: int
    max_model_len: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    long_prefill_token_threshold: int
    num_gpu_blocks_source: str
    # hybrid (linear + full attention) models: blocks of the same pool each running sequence
    # holds for its linear-attention state (ModelArch.hybrid_kv_layout)
    state_blocks_per_seq: int = 0
    # models with full and sliding-window (or chunked local) attention layers (ModelArch.sliding_kv_groups): the
    # window, and the pool blocks a sequence's window takes per block of its table
    # (sliding-window groups : full-attention groups)
    sliding_window: int = 0
    window_groups: int = 0
    full_groups: int = 0
    attention_chunk_size: int = 0  # Llama 4's chunked local attention layers instead of sliding windows
    # The vLLM release mirrored where its scheduler and KV cache manager changed
    # (vllm_behaviours): whole-sequence admission, free order, a lone request's budget
    vllm_version: str = ""
    reserve_full_isl: bool = False
    free_uncached_first: bool = False
    lone_request_full_budget: bool = False
    async_scheduling: bool = False  # vLLM's AsyncScheduler (scheduler.py)

    @property
    def max_in_flight_tokens(self) -> int:
        """Tokens scheduled but not yet returned, at most (vLLM's VllmConfig.max_in_flight_tokens:
        a step's budget per batch in flight, two with async scheduling): sliding-window blocks
        are freed behind the tokens returned, so a sequence's window may hold this many more."""
        return self.max_num_batched_tokens * (2 if self.async_scheduling else 1)


# The vLLM release mirrored when neither the config nor a profile names one: the one the
# simulator is checked against step by step (scripts/diff_vllm_scheduler.py).
DEFAULT_VLLM_VERSION = "0.32.0"


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a vLLM version string ("0.32.0", "0.19.1+cu128")."""
    try:
        return tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        raise ConfigError(f"engine.vllm_version must look like 0.32.0, got {version!r}") from None


def vllm_after_0_19(version: str) -> bool:
    """Whether a vLLM release has the scheduler and KV-cache behaviours that changed after
    0.19 (vLLM 0.19.0 ran the public GPU measurements; 0.32.0 is installed here): a waiting
    request admitted only if its whole sequence fits (scheduler_reserve_full_isl, opt-in from
    PR #37307 of March 2026, on by default in 0.32), freed blocks without a cached identity
    reused first (PR #42656, May 2026), and the long-prefill threshold dropped for a lone
    request. The exact release between 0.19 and 0.32 where each changed is not pinned down."""
    return _release(version) > (0, 19)


def vllm_async_by_default(version: str) -> bool:
    """Whether a vLLM release turns async scheduling on when not told (GPU executors,
    no pipeline parallelism): the default flipped in late 2025 (vLLM PR #27614, the Q4 2025
    roadmap's "async scheduling on by default"); 0.19.0's recorded runs resolved it on.
    The first release with the new default is taken to be 0.13."""
    return _release(version) >= (0, 13)


_ZERO_HIDDEN = ("state_blocks_per_seq", "sliding_window", "window_groups", "full_groups",
                "attention_chunk_size")  # left out when 0


@dataclass
class Deployment:
    model: ModelArch
    device: DeviceSpec
    engine: ResolvedEngine
    latency: LatencyModel
    tp: int
    tiers: list = field(default_factory=list)  # [(MemoryTierSpec, capacity_blocks)]
    profile: dict[str, Any] = field(default_factory=dict)
    frontend_s: float = 0.0  # client-visible delay outside the engine (API server in + out)
    frontend_in_s: float | None = None  # its way-in share (before the engine sees the call); None: half
    dp_lockstep: bool = False  # the instances are data-parallel ranks stepping together (lockstep.py)

    @property
    def frontend_split(self) -> tuple[float, float]:
        """(way in, way out) of the frontend delay."""
        fin = self.frontend_s / 2.0 if self.frontend_in_s is None else min(self.frontend_in_s, self.frontend_s)
        return fin, self.frontend_s - fin

    def describe(self) -> dict[str, Any]:
        fin, fout = self.frontend_split
        d = {"model": self.model.name, "device": self.device.name, "tp": self.tp, "frontend_s": self.frontend_s,
             "frontend_in_s": fin, "frontend_out_s": fout, "dp_lockstep": self.dp_lockstep,
             "engine": {k: v for k, v in self.engine.__dict__.items() if v or k not in _ZERO_HIDDEN},
             "latency": self.latency.describe(),
             "tiers": [{"name": t.name, "capacity_blocks": c} for t, c in self.tiers]}
        m = self.model
        if m.quant_method:
            d["quantization"] = {"method": m.quant_method, "detail": m.quant_detail,
                                 "weight_bits": m.quant_weight_bits, "w8a8_fp8": m.quant_act_fp8}
        if m.kv_dtype_bytes:
            d["kv_cache_bytes_per_element"] = m.kv_dtype_bytes
        return d


def with_dtype(model: ModelArch, dtype: str) -> ModelArch:
    """The model served in engine.dtype ("auto": as loaded, a float32 checkpoint in bfloat16)."""
    nbytes = MODEL_DTYPE_BYTES.get(dtype)
    if nbytes is None:
        raise ConfigError(f"engine.dtype {dtype!r} is not one of {', '.join(MODEL_DTYPE_BYTES)}")
    return replace(model, dtype_bytes=nbytes) if nbytes else model


def with_kv_cache_dtype(model: ModelArch, kv_cache_dtype: str) -> ModelArch:
    """The model with engine.kv_cache_dtype's KV element size ("auto": unchanged)."""
    if kv_cache_dtype not in KV_CACHE_DTYPE_BYTES:
        raise ConfigError(f"engine.kv_cache_dtype {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPE_BYTES)}")
    nbytes = KV_CACHE_DTYPE_BYTES[kv_cache_dtype]
    return replace(model, kv_dtype_bytes=nbytes) if nbytes else model


def _unmodelled_quantization(err: HardwareError) -> ConfigError:
    return ConfigError(f"{err}: its weight size is unknown, so neither the KV capacity nor the roofline can be "
                       "estimated; pass engine.num_gpu_blocks_override (the KV block count vLLM logs) and a "
                       "calibrated profile (asim-calibrate) as --hardware")


def estimate_num_gpu_blocks(model: ModelArch, device: DeviceSpec, tp: int, block_size: int,
                            util: float, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """vLLM's KV capacity on one GPU: util·memory - weights - activation peak - non-torch."""
    try:
        weights = model.weight_bytes() / tp
    except HardwareError as err:
        raise _unmodelled_quantization(err) from None
    act = max_num_batched_tokens * (4 * model.hidden_size + 2 * model.intermediate_size // tp) * model.dtype_bytes
    act += max_num_seqs * model.vocab_size * 4  # fp32 logits of the sampler warm-up
    free = util * device.usable_memory_bytes - weights - act - NON_TORCH_BYTES
    per_block = block_size * model.kv_pool_bytes_per_token() / tp
    n = int(free // per_block)
    if n < 2:
        raise ConfigError(f"{model.name} does not fit on {device.name} with tp={tp} "
                          f"(weights {weights / GiB:.1f} GiB per GPU); raise tensor_parallel_size")
    return n


def expert_parallel_blocks(model: ModelArch, device: DeviceSpec, ep: int, block_size: int, util: float,
                           max_num_batched_tokens: int, max_num_seqs: int, kv_cache_dtype: str = "auto") -> int:
    """KV blocks of one data-parallel x expert-parallel rank: each rank holds 1/ep of the
    experts (vLLM shards experts across EP ranks; attention, embeddings and router are
    replicated on every rank), so more memory is left for KV than with all experts."""
    local = replace(with_kv_cache_dtype(model, kv_cache_dtype), num_experts=max(model.num_experts // ep, 1))
    return estimate_num_gpu_blocks(local, device, 1, block_size, util, max_num_batched_tokens, max_num_seqs)


def _attention_tiles(spec: dict, lat):
    """The profile's tile model of attention, unless the config overrides the attention efficiency."""
    return None if lat.attention_efficiency else _learned(spec, "attention_tiles", AttentionTiles)


def _learned(spec: dict, key: str, cls):
    """The profile's learned `key` section as `cls` (its from_dict), or None where it has none."""
    d = spec.get(key)
    if not d:
        return None
    try:
        return cls.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"profile {key}: {e}") from None


def _elementwise(spec: dict):
    """The profile's learned element-wise kernel cost, or None (not priced)."""
    return _learned(spec, "elementwise", Elementwise)


def _decode_skew(spec: dict):
    """The profile's learned decode skew (uneven decode contexts in a batch), or None."""
    return _learned(spec, "decode_skew", DecodeSkew)


def expert_parallel_size(model: ModelArch, cfg: SimConfig, profile: dict | None) -> int:
    """The expert-parallel degree the roofline prices: engine.enable_expert_parallel on a MoE
    model shards its experts over the data-parallel ranks (vLLM: EP size = DP x TP; TP 1 here).
    1 for dense models (vLLM ignores the flag there) and for an operator profile, which prices
    its own moe.expert_parallel."""
    if not (cfg.engine.enable_expert_parallel and model.is_moe):
        return 1
    if ((profile or {}).get("latency_model") or {}).get("kind") == "operators":
        return 1
    if cfg.cluster.tensor_parallel_size > 1:
        raise ConfigError("engine.enable_expert_parallel with cluster.tensor_parallel_size > 1 is not modelled "
                          "(expert parallelism over data-parallel ranks of one GPU each is)")
    return cfg.cluster.instances if cfg.cluster.data_parallel else 1


def build_latency(model: ModelArch, device: DeviceSpec, tp: int, cfg: SimConfig, profile: dict,
                  async_overlap: bool = False, ep: int = 1) -> LatencyModel:
    """`async_overlap` (the resolved engine's async_scheduling): the roofline's and the operator
    model's per-step host overhead overlaps the device's step, a step takes max(device, host).
    `ep`: the roofline's expert-parallel degree (expert_parallel_size)."""
    lat = cfg.latency
    spec = profile.get("latency_model") if profile else None
    if spec:
        kind = spec.get("kind")
        if kind == "linear":
            # No overlap here: the intercept is a fitted step period from synchronous vLLM-CPU
            # runs (host work included, as measured), not a host term to hide behind the device.
            m = LinearStepModel(spec["intercept"], spec.get("coefficients", {}), source=spec.get("fit", {}))
            if lat.host_overhead_s is not None:
                m.intercept = lat.host_overhead_s
            return m
        if kind == "roofline":
            eff = spec.get("efficiencies", {})
            return RooflineModel(model, device, tp,
                                 gemm_efficiency=lat.gemm_efficiency or eff.get("gemm"),
                                 attention_efficiency=lat.attention_efficiency or eff.get("attention"),
                                 memory_efficiency=lat.memory_efficiency or eff.get("memory"),
                                 host_overhead_s=lat.host_overhead_s if lat.host_overhead_s is not None else spec.get("host_overhead_s"),
                                 host_overhead_per_seq_s=lat.host_overhead_per_seq_s if lat.host_overhead_per_seq_s is not None else spec.get("host_overhead_per_seq_s"),
                                 attention_tiles=_attention_tiles(spec, lat), async_overlap=async_overlap,
                                 elementwise=_elementwise(spec), expert_parallel=ep, decode_skew=_decode_skew(spec))
        if kind == "operators":
            try:
                return OperatorModel.from_profile(
                    spec, model, tp, link=device.intra_node_link, profile=profile,
                    host_overhead_s=lat.host_overhead_s, host_overhead_per_seq_s=lat.host_overhead_per_seq_s,
                    max_tokens=max(cfg.engine.max_num_batched_tokens or 0, 8192),
                    max_seqs=max(cfg.engine.max_num_seqs or 0, 1024), async_overlap=async_overlap)
            except (ValueError, OSError) as e:
                raise ConfigError(f"profile {profile.get('name', '')}: {e}") from None
        raise ConfigError(f"profile latency_model kind '{kind}' is not supported (linear, roofline, operators)")
    # A device by name: the efficiencies, attention tile model, element-wise costs and decode
    # skew learned from the measured devices' operator times (hardware/roofline-learned.yaml: a measured
    # device's own fit, else the pooled one); the host overhead the default
    learned = learned_roofline(device.name)
    eff = learned.get("efficiencies", {})
    return RooflineModel(model, device, tp, gemm_efficiency=lat.gemm_efficiency or eff.get("gemm"),
                         attention_efficiency=lat.attention_efficiency or eff.get("attention"),
                         memory_efficiency=lat.memory_efficiency or eff.get("memory"),
                         host_overhead_s=lat.host_overhead_s, host_overhead_per_seq_s=lat.host_overhead_per_seq_s,
                         attention_tiles=_attention_tiles(learned, lat), async_overlap=async_overlap,
                         elementwise=_elementwise(learned), expert_parallel=ep, decode_skew=_decode_skew(learned))


_LEARNED_ROOFLINE: dict | None = None


def learned_roofline(device_name: str | None = None) -> dict:
    """The roofline parameters of hardware/roofline-learned.yaml (scripts/learn_roofline.py
    --write) that a run given a device by name prices its steps with: a measured device's own
    fit, else the pooled one; {} without the file (the roofline's assumed starting points)."""
    global _LEARNED_ROOFLINE
    if _LEARNED_ROOFLINE is None:
        import yaml
        path = HARDWARE_DIR / "roofline-learned.yaml"
        try:
            _LEARNED_ROOFLINE = (yaml.safe_load(path.read_text()) or {}).get("latency_model") or {}
        except FileNotFoundError:
            _LEARNED_ROOFLINE = {}
    own = (_LEARNED_ROOFLINE.get("devices") or {}).get(device_name)
    return own if own else _LEARNED_ROOFLINE


def build_deployment(model: ModelArch, device: DeviceSpec, cfg: SimConfig, profile: dict | None = None) -> Deployment:
    profile = profile or {}
    if cfg.cluster.intra_node_link:  # the machine's own GPU-to-GPU link, in place of the device file's
        try:
            device = replace(device, intra_node_link=load_link(cfg.cluster.intra_node_link))
        except HardwareError as err:
            raise ConfigError(f"cluster.intra_node_link: {err}") from None
    e = cfg.engine
    tp = cfg.cluster.tensor_parallel_size
    model = with_kv_cache_dtype(with_dtype(model, e.dtype), e.kv_cache_dtype)  # every byte count below follows them
    facts = profile.get("engine", {}) if profile else {}
    d = vllm_defaults(device)
    block_size = e.block_size or facts.get("block_size") or d["block_size"]
    state_blocks = 0
    if model.linear_layers:
        try:
            min_block, state_blocks = model.hybrid_kv_layout(tp)
        except HardwareError as err:
            raise ConfigError(str(err)) from None
        block_size = max(int(block_size), min_block)  # vLLM raises even a user's block size
    max_num_seqs = e.max_num_seqs or facts.get("max_num_seqs") or d["max_num_seqs"]
    mnbt = e.max_num_batched_tokens or facts.get("max_num_batched_tokens") or d["max_num_batched_tokens"]
    max_model_len = e.max_model_len or facts.get("max_model_len") or model.max_position_embeddings or 1 << 20
    # Full + sliding-window models: vLLM's block count is of one group's blocks, a block of a
    # sequence's table here holds one of each full-attention group (the estimate counts those)
    _, full_groups, window_groups = model.sliding_kv_groups()
    per_table_block = full_groups or 1
    ep = expert_parallel_size(model, cfg, profile)
    if e.num_gpu_blocks_override:
        nblocks, src = e.num_gpu_blocks_override // per_table_block, "engine.num_gpu_blocks_override"
    elif (facts.get("num_gpu_blocks") and facts.get("block_size", block_size) == block_size
          and KV_CACHE_DTYPE_BYTES.get(facts.get("kv_cache_dtype", "auto")) == KV_CACHE_DTYPE_BYTES[e.kv_cache_dtype]):
        nblocks, src = int(facts["num_gpu_blocks"]) // per_table_block, "profile (reported by the engine)"
    elif ep > 1:
        nblocks = expert_parallel_blocks(model, device, ep, block_size, e.gpu_memory_utilization, mnbt, max_num_seqs,
                                         e.kv_cache_dtype)
        src = (f"estimated from memory (gpu_memory_utilization={e.gpu_memory_utilization}; 1/{ep} of the experts "
               "per expert-parallel rank)")
    else:
        if device.kind == "cpu":
            raise ConfigError("a CPU device needs engine.num_gpu_blocks_override or a calibrated profile "
                              "(vLLM-CPU's KV pool is VLLM_CPU_KVCACHE_SPACE, not a memory fraction)")
        nblocks = estimate_num_gpu_blocks(model, device, tp, block_size, e.gpu_memory_utilization, mnbt, max_num_seqs)
        src = f"estimated from memory (gpu_memory_utilization={e.gpu_memory_utilization})"
    version = str(e.vllm_version or facts.get("vllm_version") or DEFAULT_VLLM_VERSION)
    newer = vllm_after_0_19(version)
    reserve = e.scheduler_reserve_full_isl if e.scheduler_reserve_full_isl is not None else newer
    lockstep = cfg.cluster.lockstep(model.is_moe)
    if e.async_scheduling is not None:
        async_sched = e.async_scheduling
    elif facts.get("async_scheduling") is not None:
        async_sched = bool(facts["async_scheduling"])
    else:
        async_sched = device.kind != "cpu" and vllm_async_by_default(version)
    if lockstep:
        async_sched = False  # lockstepped data-parallel ranks step synchronously (lockstep.py)
    if not e.enable_chunked_prefill and mnbt < max_model_len:
        mnbt = max(mnbt, max_model_len)  # vLLM raises the budget to max_model_len without chunking
    engine = ResolvedEngine(block_size=int(block_size), max_num_seqs=int(max_num_seqs),
                            max_num_batched_tokens=int(mnbt), num_gpu_blocks=int(nblocks),
                            max_model_len=int(max_model_len), enable_prefix_caching=e.enable_prefix_caching,
                            enable_chunked_prefill=e.enable_chunked_prefill,
                            long_prefill_token_threshold=e.long_prefill_token_threshold,
                            num_gpu_blocks_source=src, state_blocks_per_seq=state_blocks,
                            sliding_window=model.sliding_window if window_groups else 0,
                            window_groups=window_groups, full_groups=full_groups,
                            attention_chunk_size=model.attention_chunk_size if window_groups and not model.sliding_window else 0,
                            vllm_version=version, reserve_full_isl=bool(reserve), free_uncached_first=newer,
                            lone_request_full_budget=newer, async_scheduling=bool(async_sched))
    try:
        latency = build_latency(model, device, tp, cfg, profile, async_overlap=engine.async_scheduling, ep=ep)
    except HardwareError as err:
        raise _unmodelled_quantization(err) from None
    scale, dscale = cfg.latency.step_time_scale, cfg.latency.decode_step_time_scale
    if scale != 1.0 or (dscale is not None and dscale != 1.0):
        latency = ScaledLatency(latency, scale, dscale)
    tiers = []
    if cfg.policy.kv == "offload":
        per_block = block_size * model.kv_pool_bytes_per_token() / tp
        caps = cfg.policy.kv_offload_capacity_gb
        for i, name in enumerate(cfg.policy.kv_offload_tiers):
            spec = load_memory_tier(name)
            cap_bytes = caps[i] * GiB if i < len(caps) else spec.capacity_bytes
            tiers.append((spec, max(int(cap_bytes // (per_block * tp)), 0)))
    lm = profile.get("latency_model") or {}
    prof_fe = float(lm.get("frontend_s") or profile.get("frontend_s") or 0.0)
    prof_in = lm.get("frontend_in_s")
    fe = prof_fe if cfg.latency.frontend_s is None else cfg.latency.frontend_s
    fe_in = None
    if prof_in is not None and prof_fe > 0:
        fe_in = fe * min(max(float(prof_in) / prof_fe, 0.0), 1.0)  # the profile's split, of an overridden total too
    return Deployment(model=model, device=device, engine=engine, latency=latency, tp=tp, tiers=tiers,
                      profile=profile, frontend_s=fe, frontend_in_s=fe_in,
                      dp_lockstep=lockstep)
