"""Simulation configuration: frozen dataclasses, one per section, validated on construction.

Every field carries its help text (`field(metadata={"help": ...})`); `describe()` prints them,
so the documentation of every engine knob and policy parameter lives in this one place.
Keys use vLLM's names where vLLM has one. `None` means "the engine's default for this device"
and is resolved by `resolve_engine`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration a user wrote that cannot run (unknown key, bad value)."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v not in (float("inf"), float("-inf"))


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# Bytes per weight / activation element of vLLM's --dtype values (0: "auto", the checkpoint's).
MODEL_DTYPE_BYTES = {"auto": 0, "bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}

# Bytes per KV-cache element of vLLM's --kv-cache-dtype values (vllm/config/cache.py CacheDType;
# 0: "auto", the model dtype). vLLM's packed formats (fp8_ds_mla, nvfp4, turboquant_*, the
# per-token-head ones) carry scales inside the page and are not modelled.
KV_CACHE_DTYPE_BYTES = {"auto": 0, "float16": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1}
_PACKED_KV_DTYPES = ("fp8_ds_mla", "nvfp4_ds_mla", "nvfp4", "nvfp4_4over6", "ultraquant_4bit", "int4_per_token_head",
                     "int8_per_token_head", "fp8_per_token_head", "turboquant_")


@dataclass(frozen=True)
class EngineConfig:
    block_size: int | None = _f(None, "KV block size in tokens (vLLM: 16 on GPU, 128 on the CPU backend).")
    max_num_seqs: int | None = _f(None, "Most requests running at once (vLLM default for the device when unset).")
    max_num_batched_tokens: int | None = _f(None, "Token budget of one scheduler step (vLLM default for the device when unset).")
    num_gpu_blocks_override: int | None = _f(None, "KV capacity in blocks, ideally what the real engine reported; overrides the memory estimate.")
    gpu_memory_utilization: float = _f(0.9, "Fraction of device memory vLLM may use (weights + activations + KV).")
    enable_prefix_caching: bool = _f(True, "Automatic prefix caching (vLLM v1 default: on).")
    enable_chunked_prefill: bool = _f(True, "Chunked prefill (vLLM v1: always on for the default scheduler).")
    max_model_len: int | None = _f(None, "Longest sequence (prompt + output); the model's max_position_embeddings when unset.")
    long_prefill_token_threshold: int = _f(0, "Cap on one request's prefill chunk per step (0 = no cap), as vLLM.")
    vllm_version: str | None = _f(None, "The vLLM release to mirror where its scheduler and KV cache manager changed "
                                        "(after 0.19: whole-sequence admission, freed uncached blocks reused first, "
                                        "no long-prefill cap for a lone request). Unset: the profile's recorded "
                                        "engine version, else 0.32.0.")
    scheduler_reserve_full_isl: bool | None = _f(None, "vLLM's flag: admit a waiting request only if its whole "
                                                       "sequence fits the KV cache, not just its first chunk. "
                                                       "Unset: on for vLLM releases after 0.19, off for 0.19 and "
                                                       "earlier.")
    async_scheduling: bool | None = _f(None, "vLLM's --async-scheduling: step N+1 is scheduled while step N runs, "
                                             "so a request that arrives during a step joins the step after the "
                                             "next. Unset: on for GPUs from vLLM 0.13 (its default there), off on "
                                             "the CPU backend (vLLM-CPU turns it off), off for lockstepped "
                                             "data-parallel ranks (not modelled); a profile's recorded value wins.")
    enable_expert_parallel: bool = _f(False, "vLLM's --enable-expert-parallel: a MoE model's experts are sharded "
                                             "over the data-parallel ranks (cluster.data_parallel, one rank per "
                                             "instance), each holding num_experts / ranks and running the tokens of "
                                             "all ranks, all-gathered and reduce-scattered over the intra-node link. "
                                             "Priced by the roofline (a device by name) with tensor_parallel_size 1; "
                                             "an operator profile prices its own moe.expert_parallel. No effect on "
                                             "dense models, as in vLLM.")
    dtype: str = _f("auto", "Weights and activations type, as vLLM's --dtype: auto (the checkpoint's; a float32 "
                            "checkpoint is served in bfloat16, as vLLM does), bfloat16, float16, half, float32, "
                            "float. Sets the weight, activation and (kv_cache_dtype auto) KV bytes.")
    kv_cache_dtype: str = _f("auto", "KV cache element type, as vLLM's --kv-cache-dtype: auto (the model dtype), "
                                     "float16, bfloat16, fp8, fp8_e4m3, fp8_e5m2, fp8_inc. Sets the KV bytes per "
                                     "token of the capacity estimate, the offload tiers and the roofline.")

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks_override", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ConfigError(f"engine.{name} must be a positive integer, got {v!r}")
        if not _is_number(self.gpu_memory_utilization) or not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"engine.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "enable_expert_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"engine.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.long_prefill_token_threshold, int) or self.long_prefill_token_threshold < 0:
            raise ConfigError("engine.long_prefill_token_threshold must be >= 0")
        if self.vllm_version is not None and not re.fullmatch(r"\d+\.\d+(\.\d+)?([.+-].*)?", str(self.vllm_version)):
            raise ConfigError(f"engine.vllm_version must look like 0.32.0, got {self.vllm_version!r}")
        if self.scheduler_reserve_full_isl is not None and not isinstance(self.scheduler_reserve_full_isl, bool):
            raise ConfigError(f"engine.scheduler_reserve_full_isl must be true or false, got "
                              f"{self.scheduler_reserve_full_isl!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ConfigError(f"engine.async_scheduling must be true or false, got {self.async_scheduling!r}")
        if self.dtype not in MODEL_DTYPE_BYTES:
            raise ConfigError(f"engine.dtype must be one of {', '.join(MODEL_DTYPE_BYTES)}, got {self.dtype!r}")
        kvd = self.kv_cache_dtype
        if not isinstance(kvd, str) or kvd not in KV_CACHE_DTYPE_BYTES:
            packed = isinstance(kvd, str) and kvd.startswith(_PACKED_KV_DTYPES)
            raise ConfigError(f"engine.kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPE_BYTES)}, got {kvd!r}"
                              + (" (vLLM's packed KV formats, with scales in the page, are not modelled)" if packed else ""))


@dataclass(frozen=True)
class ClusterConfig:
    instances: int = _f(1, "Number of serving instances (each a vLLM engine) behind the router.")
    tensor_parallel_size: int = _f(1, "GPUs per instance (tensor parallel); adds all-reduce over the intra-node link.")
    data_parallel: bool = _f(False, "The instances are the data-parallel ranks of one vLLM engine (vLLM "
                                    "--data-parallel-size = instances, its internal load balancer as the router), "
                                    "not separate servers.")
    intra_node_link: str | None = _f(None, "The link between an instance's GPUs (and data-parallel ranks), by name "
                                           "(hardware/interconnects/) or path, in place of the device's: e.g. "
                                           "pcie5-x16-no-p2p for PCIe cards without peer-to-peer access, whose "
                                           "collectives NCCL stages through host memory. Prices tensor- and "
                                           "expert-parallel collectives.")
    dp_lockstep: str = _f("auto", "auto | on | off. Lockstep: all instances start each step together and the step "
                                  "lasts as long as the slowest instance's; an idle instance runs dummy steps while "
                                  "any has work. vLLM does this for the data-parallel ranks of a mixture-of-experts "
                                  "model (the expert-parallel collectives of every MoE layer join the ranks). auto: "
                                  "on when data_parallel is true, instances > 1 and the model is MoE.")

    def __post_init__(self):
        for name in ("instances", "tensor_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"cluster.{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.data_parallel, bool):
            raise ConfigError(f"cluster.data_parallel must be true or false, got {self.data_parallel!r}")
        if self.intra_node_link is not None and (not isinstance(self.intra_node_link, str) or not self.intra_node_link):
            raise ConfigError(f"cluster.intra_node_link must be a link name or path, got {self.intra_node_link!r}")
        if self.dp_lockstep not in ("auto", "on", "off"):
            raise ConfigError(f"cluster.dp_lockstep must be auto, on or off, got {self.dp_lockstep!r}")

    def lockstep(self, is_moe: bool) -> bool:
        """Whether the instances step in lockstep (the resolved dp_lockstep)."""
        if self.instances < 2 or self.dp_lockstep == "off":
            return False
        return self.dp_lockstep == "on" or (self.data_parallel and is_moe)


@dataclass(frozen=True)
class PolicyConfig:
    scheduler: str = _f("fcfs", "Scheduling policy: fcfs (vLLM), program-fcfs (Continuum), plas (Autellix).")
    kv: str = _f("lru", "KV retention policy: lru (vLLM), drop, pin-ttl (Continuum), offload.")
    router: str = _f("round-robin", "Router: round-robin, least-loaded, vllm-dp, session-affinity, prefix-aware.")
    kv_ttl_s: float = _f(2.0, "pin-ttl: seconds a program's blocks stay pinned after a call that is followed by a tool gap.")
    kv_pin_max_tool_s: float | None = _f(None, "pin-ttl: pin only when the trace's tool_s is at most this (None: always pin).")
    kv_drop_shared_prefix: bool = _f(False, "drop: also forget blocks of the shared prefix (default keeps them cached, LRU).")
    kv_offload_tiers: tuple = _f(("host-dram", "cxl-expander"), "offload: memory tiers (hardware/memory_tiers names), fastest first.")
    kv_offload_capacity_gb: tuple = _f((), "offload: capacity per tier in GiB, overriding the tier files (same order).")
    kv_offload_min_tool_s: float = _f(0.0, "offload: offload only when the tool gap is at least this long (s).")
    plas_quantum_tokens: int = _f(0, "plas: attained service (tokens) is rounded down to multiples of this (0 = exact): Autellix-style priority levels.")
    router_cache_threshold: float = _f(0.5, "prefix-aware: route to the best-matching instance when its match ratio exceeds this (sgl-router cache_threshold).")
    router_balance_abs_threshold: int = _f(32, "prefix-aware: load imbalance (max - min outstanding) above which it routes least-loaded (sgl-router).")
    router_balance_rel_threshold: float = _f(1.0001, "prefix-aware: and max > rel * min outstanding (sgl-router balance_rel_threshold).")

    def __post_init__(self):
        for name in ("scheduler", "kv", "router"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"policy.{name} must be a policy name, got {getattr(self, name)!r}")
        for name in ("kv_ttl_s", "kv_offload_min_tool_s", "router_cache_threshold", "router_balance_rel_threshold"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise ConfigError(f"policy.{name} must be a number >= 0, got {v!r}")
        if self.kv_pin_max_tool_s is not None and (not _is_number(self.kv_pin_max_tool_s) or self.kv_pin_max_tool_s < 0):
            raise ConfigError(f"policy.kv_pin_max_tool_s must be a number >= 0 or null, got {self.kv_pin_max_tool_s!r}")
        for name in ("router_balance_abs_threshold", "plas_quantum_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"policy.{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.kv_drop_shared_prefix, bool):
            raise ConfigError("policy.kv_drop_shared_prefix must be true or false")
        object.__setattr__(self, "kv_offload_tiers", tuple(self.kv_offload_tiers))
        object.__setattr__(self, "kv_offload_capacity_gb", tuple(float(x) for x in self.kv_offload_capacity_gb))


@dataclass(frozen=True)
class ToolConfig:
    mode: str = _f("trace", "Where tool gaps come from: trace (the trace's tool_s), fixed (fixed_s), sample (per-tool distributions).")
    fixed_s: float = _f(1.0, "mode=fixed: every gap lasts this long (s).")
    distributions: dict = _f({}, "mode=sample: {tool name or 'default': {dist: lognormal|exponential|constant, ...params}}.")
    time_scale: float = _f(1.0, "Multiply every tool gap by this.")

    def __post_init__(self):
        if self.mode not in ("trace", "fixed", "sample"):
            raise ConfigError(f"tools.mode must be trace, fixed or sample, got {self.mode!r}")
        for name in ("fixed_s", "time_scale"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise ConfigError(f"tools.{name} must be a number >= 0, got {v!r}")
        if not isinstance(self.distributions, dict):
            raise ConfigError("tools.distributions must be a mapping")


@dataclass(frozen=True)
class LatencyConfig:
    host_overhead_s: float | None = _f(None, "Per-step host (scheduler + launch) overhead; from the profile when unset.")
    host_overhead_per_seq_s: float | None = _f(None, "Extra host overhead per scheduled request per step.")
    gemm_efficiency: float | None = _f(None, "Roofline: fraction of peak FLOP/s the dense layers reach.")
    attention_efficiency: float | None = _f(None, "Roofline: fraction of peak FLOP/s attention reaches.")
    memory_efficiency: float | None = _f(None, "Roofline: fraction of peak memory bandwidth reached.")
    frontend_s: float | None = _f(None, "Delay outside the engine that a live client sees per call (API server in + "
                                        "out, HTTP, streaming); from the profile when unset, else 0 (engine-side times). "
                                        "Split into the way in (delays admission) and the way out as the profile "
                                        "measured it (latency_model.frontend_in_s), else evenly.")

    step_time_scale: float = _f(1.0, "Multiply every engine step time by this (a what-if for a faster or slower "
                                     "device; the validation's sensitivity check).")
    decode_step_time_scale: float | None = _f(None, "Multiply pure-decode step times by this instead of "
                                                    "step_time_scale (steps with prefill work keep "
                                                    "step_time_scale); unset: step_time_scale for every step. "
                                                    "Validation's reference steps measure the two apart.")

    def __post_init__(self):
        if not _is_number(self.step_time_scale) or self.step_time_scale <= 0:
            raise ConfigError(f"latency.step_time_scale must be a number > 0, got {self.step_time_scale!r}")
        d = self.decode_step_time_scale
        if d is not None and (not _is_number(d) or d <= 0):
            raise ConfigError(f"latency.decode_step_time_scale must be a number > 0, got {d!r}")
        for name in ("host_overhead_s", "host_overhead_per_seq_s", "frontend_s"):
            v = getattr(self, name)
            if v is not None and (not _is_number(v) or v < 0):
                raise ConfigError(f"latency.{name} must be a number >= 0, got {v!r}")
        for name in ("gemm_efficiency", "attention_efficiency", "memory_efficiency"):
            v = getattr(self, name)
            if v is not None and (not _is_number(v) or not 0 < v <= 1):
                raise ConfigError(f"latency.{name} must be in (0, 1], got {v!r}")


@dataclass(frozen=True)
class MetricsConfig:
    sample_interval_s: float = _f(1.0, "Period of timeseries.csv samples (s); 0 disables sampling.")
    step_log: bool = _f(False, "Write steps.csv: one row per engine step (its end, batch and period), to compare "
                               "with a live run's steps (asim-validate).")

    def __post_init__(self):
        if not _is_number(self.sample_interval_s) or self.sample_interval_s < 0:
            raise ConfigError(f"metrics.sample_interval_s must be a number >= 0, got {self.sample_interval_s!r}")
        if not isinstance(self.step_log, bool):
            raise ConfigError(f"metrics.step_log must be true or false, got {self.step_log!r}")


@dataclass(frozen=True)
class SimConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    seed: int = 0
    fast_forward: bool = True  # advance runs of pure-decode steps together (exact)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in fields(SimConfig)}
_SECTION_CLS = {"engine": EngineConfig, "cluster": ClusterConfig, "policy": PolicyConfig,
                "tools": ToolConfig, "latency": LatencyConfig, "metrics": MetricsConfig}


def _coerce(section: str, key: str, cls, value):
    ftypes = {f.name: f for f in fields(cls)}
    if key not in ftypes:
        raise ConfigError(f"unknown key '{section}.{key}' (known: {', '.join(sorted(ftypes))})")
    default = ftypes[key].default
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"{section}.{key} must be true or false, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, tuple) and isinstance(value, (list, str)):
        value = tuple(value) if isinstance(value, list) else tuple(v for v in value.split(",") if v)
    return value


def build_config(mapping: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> SimConfig:
    """A SimConfig from a nested mapping (a YAML file) and dotted overrides (`--set`)."""
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for src in (mapping or {}), _undot(overrides or {}):
        for k, v in src.items():
            if k in _SECTION_CLS:
                if not isinstance(v, dict):
                    raise ConfigError(f"'{k}' must be a mapping")
                nested.setdefault(k, {}).update(v)
            elif k in ("seed", "fast_forward"):
                top[k] = v
            else:
                raise ConfigError(f"unknown config section '{k}' (known: {', '.join(sorted(_SECTIONS))})")
    kwargs: dict[str, Any] = {}
    for section, values in nested.items():
        cls = _SECTION_CLS[section]
        coerced = {k: _coerce(section, k, cls, v) for k, v in values.items()}
        try:
            kwargs[section] = cls(**coerced)
        except TypeError as e:
            raise ConfigError(f"{section}: {e}") from None
    if "seed" in top:
        if not isinstance(top["seed"], int) or isinstance(top["seed"], bool):
            raise ConfigError(f"seed must be an integer, got {top['seed']!r}")
        kwargs["seed"] = top["seed"]
    if "fast_forward" in top:
        if not isinstance(top["fast_forward"], bool):
            raise ConfigError(f"fast_forward must be true or false, got {top['fast_forward']!r}")
        kwargs["fast_forward"] = top["fast_forward"]
    return SimConfig(**kwargs)


def _undot(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        if len(parts) == 1:
            out[key] = value
        elif len(parts) == 2:
            out.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ConfigError(f"bad key '{key}': use section.key (e.g. engine.max_num_seqs)")
    return out


def describe() -> list[str]:
    """One line per configurable key: `section.key (default): help`."""
    lines = []
    for section, cls in _SECTION_CLS.items():
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{section}.{f.name} ({default!r}): {f.metadata.get('help', '')}")
    return lines
