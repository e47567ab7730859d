"""What a profile records, and the profile YAML itself.

Engine facts come from the engine, not from our guesses: vLLM's `/server_info` (served when
the server runs with VLLM_SERVER_DEV_MODE=1) dumps its whole resolved config — block size,
KV block count, max_num_seqs, max_num_batched_tokens, max_model_len, chunked prefill,
prefix caching, async scheduling — and the torch version; the log and `/metrics` are the
fallback (block count, block size, version). The device is described from the machine the
server runs on (/proc/cpuinfo, or nvidia-smi on a GPU host).

`build_profile` turns engine facts + a `StepFit` into the YAML that `simulator.hardware.
load_device` and `simulator.deployment.build_deployment` read: `device:` (embedded),
`engine:` (its real limits, used as the simulator's defaults) and `latency_model:` (kind
linear, with the fit's cross-validated errors), plus `model:` and `provenance:`.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import yaml

import simulator

from .fit import StepFit

REPO_ROOT = Path(__file__).resolve().parents[1]

_ENGINE_KEYS = ("vllm_version", "torch_version", "block_size", "num_gpu_blocks", "max_num_seqs",
                "max_num_batched_tokens", "max_model_len", "enable_prefix_caching", "enable_chunked_prefill",
                "long_prefill_token_threshold", "async_scheduling", "dtype", "kv_cache_space_gib",
                "tensor_parallel_size", "kv_cache_tokens")


def engine_facts_from_server_info(info: dict) -> dict[str, Any]:
    """The engine facts in a `/server_info?config_format=json` answer (missing keys omitted)."""
    cfg = info.get("vllm_config") or {}
    if not isinstance(cfg, dict):
        return {}
    model = cfg.get("model_config") or {}
    cache = cfg.get("cache_config") or {}
    sched = cfg.get("scheduler_config") or {}
    par = cfg.get("parallel_config") or {}
    env = info.get("system_env") or {}
    facts = {
        "block_size": cache.get("block_size"),
        "num_gpu_blocks": cache.get("num_gpu_blocks"),
        "enable_prefix_caching": cache.get("enable_prefix_caching"),
        "max_num_seqs": sched.get("max_num_seqs"),
        "max_num_batched_tokens": sched.get("max_num_batched_tokens"),
        "enable_chunked_prefill": sched.get("enable_chunked_prefill"),
        "long_prefill_token_threshold": sched.get("long_prefill_token_threshold"),
        "async_scheduling": sched.get("async_scheduling"),
        "max_model_len": model.get("max_model_len"),
        "dtype": _dtype_name(model.get("dtype")),
        "tensor_parallel_size": par.get("tensor_parallel_size"),
        "torch_version": env.get("torch_version"),
    }
    space = cache.get("cpu_kvcache_space_bytes")
    if space:
        facts["kv_cache_space_gib"] = float(space) / 2**30
    return {k: v for k, v in facts.items() if v is not None}


def _dtype_name(d) -> str | None:
    if d is None:
        return None
    return str(d).replace("torch.", "")


def merge_engine_facts(server_info: dict, log_info, args_facts: dict) -> dict[str, Any]:
    """Engine facts: /server_info first, then the log/metrics (EngineInfo), then what the
    command line says. Where two sources give a value they must agree."""
    facts = dict(args_facts)
    if log_info is not None:
        for key in ("vllm_version", "num_gpu_blocks", "block_size", "kv_cache_tokens"):
            v = getattr(log_info, key, None)
            if v is not None:
                facts[key] = v
    for k, v in server_info.items():
        old = facts.get(k)
        if old is not None and k in ("num_gpu_blocks", "block_size") and old != v:
            raise ValueError(f"engine facts disagree on {k}: server_info {v}, log {old}")
        facts[k] = v
    return {k: facts[k] for k in _ENGINE_KEYS if facts.get(k) is not None}


def facts_from_args(engine_args: list[str]) -> dict[str, Any]:
    """Facts stated on the `vllm serve` command line (the fallback when the engine cannot
    be asked): `--max-num-seqs 8` and `--max-num-seqs=8` alike."""
    names = {"--block-size": "block_size", "--max-num-seqs": "max_num_seqs",
             "--max-num-batched-tokens": "max_num_batched_tokens", "--max-model-len": "max_model_len",
             "--dtype": "dtype", "--long-prefill-token-threshold": "long_prefill_token_threshold"}
    out: dict[str, Any] = {}
    i = 0
    while i < len(engine_args):
        a = engine_args[i]
        key, val = (a.split("=", 1) + [None])[:2] if a.startswith("--") and "=" in a else (a, None)
        if key in names:
            if val is None and i + 1 < len(engine_args):
                val = engine_args[i + 1]
                i += 1
            out[names[key]] = int(val) if names[key] != "dtype" and val and val.isdigit() else val
        elif key in ("--enable-prefix-caching", "--no-enable-prefix-caching"):
            out["enable_prefix_caching"] = key == "--enable-prefix-caching"
        elif key in ("--enable-chunked-prefill", "--no-enable-chunked-prefill"):
            out["enable_chunked_prefill"] = key == "--enable-chunked-prefill"
        i += 1
    return out


# -- the device -------------------------------------------------------------------------------


def describe_cpu_device(omp_cores: list[int] | None = None) -> dict[str, Any]:
    """This machine's CPU as a profile `device:` (no datasheet figures: the latency is fitted)."""
    model_name = _cpuinfo_field("model name") or _cpuinfo_field("Model name") or "unknown CPU"
    cores = os.cpu_count() or 1
    mem = _meminfo_bytes("MemTotal")
    slug = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")
    dev: dict[str, Any] = {"name": f"cpu-{slug}-{cores}c", "kind": "cpu",
                           "description": f"{model_name}, {cores} logical cores",
                           "cores": cores}
    if mem:
        dev["memory_bytes"] = mem
    if omp_cores:
        dev["engine_compute_cores"] = omp_cores
    dev["source"] = "/proc/cpuinfo and /proc/meminfo of the profiling host"
    return dev


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _meminfo_bytes(name: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe_gpu_device() -> dict[str, Any] | None:
    """The first GPU as nvidia-smi reports it, or None when there is no nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    name, mem_mib = [x.strip() for x in out.stdout.strip().splitlines()[0].split(",")[:2]]
    return {"description": name, "driver_memory_bytes": int(float(mem_mib)) * 2**20}


# vLLM's OMP binding line on CPU: "local_rank=0, core ids=[0]".
_OMP_CORES_RE = re.compile(r"core ids=\[(?P<ids>[\d, ]*)\]")


def omp_cores_from_log(text: str) -> list[int] | None:
    m = _OMP_CORES_RE.search(text)
    if not m or not m["ids"].strip():
        return None
    return [int(x) for x in m["ids"].split(",") if x.strip()]


# -- the profile ------------------------------------------------------------------------------


def repo_relative(path: str | os.PathLike) -> str:
    p = Path(os.path.abspath(path))
    try:
        return str(p.relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


def build_profile(name: str, meta: dict, fit: StepFit, raw_data: str, operators: dict | None = None) -> dict:
    """The profile mapping (see the module doc). `meta` is the profiling run's engine.json."""
    engine = {k: v for k, v in meta["engine"].items() if k in _ENGINE_KEYS}
    fit_desc = fit.describe()
    if operators is not None:
        fit_desc["parts"]["operators"] = operators
    else:
        fit_desc["parts"]["operators"] = {"available": False,
                                          "why": meta.get("operators_note", "not profiled in this run")}
    fit_desc["attribution"] = meta.get("attribution", {})
    prov = dict(meta.get("provenance", {}))
    prov["fit_command"] = meta.get("fit_command", prov.get("fit_command"))
    prov["raw_data"] = raw_data
    prov["profiling_time_s"] = meta.get("timing")
    prov["contention"] = meta.get("contention")
    prov["agentservesim_version"] = simulator.__version__
    prov = {k: v for k, v in prov.items() if v is not None}
    return {
        "name": name,
        "kind": "calibrated-profile",
        "device": meta["device"],
        "engine": engine,
        "model": meta.get("model", {}),
        "latency_model": {
            "kind": "linear",
            "units": "seconds",
            "intercept": float(fit.intercept),
            "coefficients": {k: float(v) for k, v in fit.coefficients.items()},
            "fit": fit_desc,
        },
        "provenance": prov,
    }


def dump_profile(profile: dict, path: str | os.PathLike, header: str = "") -> None:
    text = yaml.safe_dump(profile, sort_keys=False, default_flow_style=False, width=110)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(header + text)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def host_name() -> str:
    return socket.gethostname()


def host_step_s(profile: dict) -> float | None:
    """The fitted host time of a one-request step that samples a token (what the step period
    adds to the logged execute time), or None when the profile has no host part."""
    lm = profile.get("latency_model") or {}
    host = ((((lm.get("fit") or {}).get("parts") or {}).get("host") or {}).get("coefficients_s"))
    if not host:
        return None
    return float(host.get("num_steps", 0.0) + host.get("num_seqs", 0.0) + host.get("num_sampled", 0.0))


def execute_model(profile: dict):
    """The execute part alone (what a step's logged `elapsed_ms` times) of a calibrated
    profile: the step model less the fitted host overhead (`StepFit._combine` in reverse)."""
    from simulator.latency.linear import LinearStepModel

    lm = profile.get("latency_model") or {}
    parts = ((lm.get("fit") or {}).get("parts") or {})
    if lm.get("kind") != "linear" or "intercept_s" not in (parts.get("execute") or {}):
        raise ValueError("not a calibrated linear profile with a fitted execute part")
    coefs = dict(lm.get("coefficients") or {})
    for name, c in ((parts.get("host") or {}).get("coefficients_s") or {}).items():
        if name != "num_steps":
            coefs[name] = coefs.get(name, 0.0) - c
    # A feature the execute fit does not use is left with the host's rounding residue only.
    used = set(parts["execute"].get("features") or coefs)
    return LinearStepModel(parts["execute"]["intercept_s"], {k: v for k, v in coefs.items() if k in used and v > 0.0})
