"""Live replay: drive a real OpenAI-compatible server (vLLM) with an agent trace.

Same orchestration as the simulator: a program's first call at `arrival_s`, call k+1 issued
`tool_s` after call k's last token (or after its last DAG parent), prompts built append-only
as token ids, with the shared prefix identical across the programs naming it and the token
ids the server really generated fed back into the next prompt, so prefix reuse is what a
real agent gets. Every call streams (`ignore_eos`, `max_tokens` = the trace's output tokens);
arrival, first token, every token chunk, finish, prompt and cached prompt tokens are
recorded, and the server's /metrics are scraped into timeseries.csv. Results are written as
they come, in the same layout as a simulated run.

The client is one asyncio loop: sleeping programs cost nothing, and each streamed chunk
is parsed as it arrives. `issue_lag_s` in calls.csv is how late the client issued a call
against its plan (its own overhead).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import zlib
from pathlib import Path

import numpy as np

import simulator
from simulator.metrics import CALL_COLUMNS, summarize

from .results import ResultsWriter
from .trace import load_trace

LIVE_CALL_COLUMNS = CALL_COLUMNS + ("issue_lag_s",)

# Prometheus names of vLLM v1's metrics (vllm/v1/metrics/loggers.py); older names second.
METRICS = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "preemptions_total": ("vllm:num_preemptions_total", "vllm:num_preemptions"),
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits"),
}


class LiveError(RuntimeError):
    """A problem with the server that a user can fix (not up, wrong model name)."""


def _seed(*parts) -> int:
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode())


class TokenSource:
    """Deterministic token ids for the parts of prompts the trace only counts."""

    def __init__(self, seed: int, low: int, high: int):
        self.seed, self.low, self.high = seed, low, high
        self._prefix: dict[str, list[int]] = {}

    def ids(self, n: int, *key) -> list[int]:
        if n <= 0:
            return []
        rng = np.random.default_rng(_seed(self.seed, *key))
        return rng.integers(self.low, self.high, size=n).tolist()

    def prefix(self, prefix_id: str, n: int) -> list[int]:
        ids = self._prefix.get(prefix_id)
        if ids is None or len(ids) < n:
            ids = self._prefix[prefix_id] = self.ids(n, "prefix", prefix_id)
        return ids[:n]


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum each wanted metric over its label sets (one engine or several)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        name = line[:name_end]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except ValueError:
            continue
        found[name] = found.get(name, 0.0) + value
    out = {}
    for col, names in METRICS.items():
        for n in names:
            if n in found:
                out[col] = found[n]
                break
    return out


class LiveReplay:
    def __init__(self, programs, endpoint: str, model: str, out_dir: str, time_scale: float = 1.0,
                 max_inflight: int = 0, seed: int = 0, token_range=(1000, 30000), request_timeout_s: float = 600.0,
                 scrape_interval_s: float = 1.0, trace_name: str = "", quiet: bool = False):
        base = endpoint.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        self.base = base
        self.programs = programs
        self.model = model
        self.out_dir = out_dir
        self.time_scale = time_scale
        self.max_inflight = max_inflight
        self.tokens = TokenSource(seed, *token_range)
        self.timeout = request_timeout_s
        self.scrape_interval = scrape_interval_s
        self.trace_name = trace_name
        self.quiet = quiet
        self.calls: list[dict] = []
        self.program_rows: list[dict] = []
        self.itl: list[float] = []
        self.t0 = 0.0
        self.t0_epoch = 0.0  # wall-clock (epoch) time of t0, to line up with server logs
        self.writer: ResultsWriter | None = None
        self.interrupted = False

    # -- the server --------------------------------------------------------------------
    async def check_server(self, session) -> dict:
        import aiohttp
        try:
            async with session.get(f"{self.base}/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status != 200:
                    raise LiveError(f"{self.base}/v1/models answered HTTP {r.status}")
                data = await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise LiveError(f"no OpenAI-compatible server at {self.base} ({e.__class__.__name__}: {e})") from None
        names = [m.get("id") for m in data.get("data", [])]
        if self.model not in names:
            raise LiveError(f"server at {self.base} serves {names}, not '{self.model}' (pass --model one of those)")
        info = next(m for m in data["data"] if m.get("id") == self.model)
        try:
            async with session.get(f"{self.base}/version", timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status == 200:
                    info["server_version"] = (await r.json()).get("version")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        return info

    async def scrape(self, session) -> None:
        import aiohttp
        while True:
            t = time.monotonic() - self.t0
            try:
                async with session.get(f"{self.base}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    text = await r.text()
                row = {"t_s": t, "instance": 0, **parse_prometheus(text)}
                self.writer.timeseries([row], flush=True)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            await asyncio.sleep(self.scrape_interval)

    # -- one call ----------------------------------------------------------------------
    async def call(self, session, prog, k: int, prompt: list[int], planned: float) -> tuple[dict, list[int]]:
        import aiohttp
        c = prog.calls[k]
        body = {"model": self.model, "prompt": prompt, "max_tokens": c.output_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
                "temperature": 0.0}
        row = {"program_id": prog.program_id, "call_index": k, "instance": 0, "scheduled_s": -1.0,
               "input_tokens": len(prompt), "cached_tokens": 0, "output_tokens": 0, "preemptions": 0,
               "loaded_tokens": 0, "status": "ok", "error": ""}
        out_ids: list[int] = []
        sent = time.monotonic()
        row["arrival_s"] = sent - self.t0
        row["issue_lag_s"] = max(sent - self.t0 - planned, 0.0)
        first = last = None
        gaps = []
        try:
            async with session.post(f"{self.base}/v1/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                if r.status != 200:
                    raise LiveError(f"HTTP {r.status}: {(await r.text())[:300]}")
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    now = time.monotonic()
                    msg = json.loads(data)
                    if msg.get("error"):
                        raise LiveError(str(msg["error"])[:300])
                    for ch in msg.get("choices") or ():
                        ids = ch.get("token_ids") or []
                        if ids:
                            out_ids.extend(ids)
                            if first is None:
                                first = now
                            else:
                                gaps.append(now - last)
                            last = now
                    usage = msg.get("usage")
                    if usage:
                        row["input_tokens"] = usage.get("prompt_tokens", len(prompt))
                        details = usage.get("prompt_tokens_details") or {}
                        row["cached_tokens"] = details.get("cached_tokens") or 0
                    metrics = msg.get("metrics")
                    if metrics and metrics.get("queue_time_ms") is not None:
                        row["scheduled_s"] = row["arrival_s"] + metrics["queue_time_ms"] / 1000.0
        except (aiohttp.ClientError, asyncio.TimeoutError, LiveError, json.JSONDecodeError, OSError) as e:
            row.update(status="failed", error=f"{e.__class__.__name__}: {e}"[:500])
        end = time.monotonic()
        n = len(out_ids)
        row["output_tokens"] = n
        row["finish_s"] = (last if last is not None else end) - self.t0
        row["first_token_s"] = first - self.t0 if first is not None else -1.0
        row["ttft_s"] = first - sent if first is not None else 0.0
        row["e2e_s"] = row["finish_s"] - row["arrival_s"]
        row["tpot_s"] = (last - first) / (n - 1) if n > 1 else 0.0
        if row["status"] == "ok" and n != c.output_tokens:
            row.update(status="failed", error=f"server generated {n} tokens, expected {c.output_tokens}")
        if row["status"] == "ok":
            self.itl.extend(gaps)
        return row, out_ids

    # -- one program -------------------------------------------------------------------
    def _prompt(self, prog, pidx: int, k: int, outputs: dict[int, list[int]]) -> list[int]:
        c = prog.calls[k]
        if c.hash_ids is not None:
            bs = prog.block_size
            ids: list[int] = []
            for h in c.hash_ids:
                ids.extend(self.tokens.ids(bs, "hash", h))
            if len(ids) < c.input_tokens:
                ids.extend(self.tokens.ids(c.input_tokens - len(ids), "pad", pidx, k))
            return ids[:c.input_tokens]
        ctx = self.tokens.prefix(prog.prefix_id, prog.prefix_tokens) if prog.prefix_id else []
        for j in range(k):
            cj = prog.calls[j]
            ctx = ctx + self.tokens.ids(cj.new_tokens, "new", pidx, j)
            # an output not produced yet (a DAG branch that is not an ancestor): stand-in ids
            ctx = ctx + outputs.get(j, self.tokens.ids(cj.output_tokens, "out", pidx, j))
        ctx = ctx + self.tokens.ids(c.new_tokens, "new", pidx, k)
        if c.input_tokens is not None:
            ctx = ctx[:c.input_tokens] if len(ctx) >= c.input_tokens else ctx + self.tokens.ids(
                c.input_tokens - len(ctx), "pad", pidx, k)
        return ctx

    async def program(self, session, prog, pidx: int, sem) -> None:
        scale = self.time_scale
        await self._sleep_until(prog.arrival_s * scale)
        n = len(prog.calls)
        outputs: dict[int, list[int]] = {}
        done = [asyncio.Event() for _ in range(n)]
        end_time = [0.0] * n
        gaps = [0.0] * n
        failed = False
        tool_total = 0.0

        async def run_call(k: int):
            nonlocal failed, tool_total
            parents = prog.parents(k)
            for p in parents:
                await done[p].wait()
            if failed:
                done[k].set()
                return
            if parents:
                last = max(parents, key=lambda p: end_time[p])
                planned = end_time[last] + gaps[last]
                await self._sleep_until(planned)
            else:
                planned = prog.arrival_s * scale
            prompt = self._prompt(prog, pidx, k, outputs)
            if sem is not None:
                async with sem:
                    row, ids = await self.call(session, prog, k, prompt, planned)
            else:
                row, ids = await self.call(session, prog, k, prompt, planned)
            outputs[k] = ids
            end_time[k] = row["finish_s"]
            gaps[k] = (prog.calls[k].tool_s or 0.0) * scale if k < n - 1 else 0.0
            if row["status"] != "ok":
                failed = True
            elif any(k in prog.parents(c) for c in range(k + 1, n)):
                tool_total += gaps[k]
            self.calls.append(row)
            self.writer.calls([row], flush=True)
            done[k].set()

        await asyncio.gather(*(run_call(k) for k in range(n)))
        finish = max(r["finish_s"] for r in self.calls if r["program_id"] == prog.program_id)
        prow = {"program_id": prog.program_id, "arrival_s": prog.arrival_s * scale, "finish_s": finish,
                "jct_s": finish - prog.arrival_s * scale, "calls": sum(1 for k in range(n) if k in outputs),
                "tool_s_total": tool_total, "status": "failed" if failed else "ok"}
        self.program_rows.append(prow)
        self.writer.programs([prow], flush=True)

    async def _sleep_until(self, t_rel: float) -> None:
        delay = self.t0 + t_rel - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    # -- the run -----------------------------------------------------------------------
    async def run(self) -> dict:
        import aiohttp
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as session:
            info = await self.check_server(session)
            self.writer = ResultsWriter(self.out_dir, call_columns=LIVE_CALL_COLUMNS)
            sem = asyncio.Semaphore(self.max_inflight) if self.max_inflight > 0 else None
            cpu0 = time.process_time()
            self.t0 = time.monotonic()
            self.t0_epoch = time.time() - (time.monotonic() - self.t0)
            scraper = asyncio.create_task(self.scrape(session))
            tasks = [asyncio.create_task(self.program(session, p, i, sem)) for i, p in enumerate(self.programs)]
            progress = asyncio.create_task(self._progress(len(tasks)))
            try:
                await asyncio.gather(*tasks)
            except asyncio.CancelledError:
                self.interrupted = True
            finally:
                for t in tasks + [scraper, progress]:
                    t.cancel()
                await asyncio.gather(*tasks, scraper, progress, return_exceptions=True)
            wall = time.monotonic() - self.t0
            cpu = time.process_time() - cpu0
        return self._finish(info, wall, cpu)

    async def _progress(self, total: int) -> None:
        if self.quiet:
            return
        while True:
            await asyncio.sleep(1.0)
            sys.stderr.write(f"\r{len(self.program_rows)}/{total} programs, {len(self.calls)} calls "
                             f"({sum(r['status'] != 'ok' for r in self.calls)} failed), "
                             f"{time.monotonic() - self.t0:6.1f}s")
            sys.stderr.flush()

    def _finish(self, info: dict, wall: float, cpu: float) -> dict:
        s = summarize(self.calls, self.program_rows, self.itl)
        lags = np.array([r["issue_lag_s"] for r in self.calls]) if self.calls else np.zeros(1)
        s.update({
            "backend": "live",
            "trace": self.trace_name,
            "endpoint": self.base,
            "profile": {"model": self.model, "server": info},
            "config": {"time_scale": self.time_scale, "max_inflight": self.max_inflight},
            "client": {"t0_epoch_s": self.t0_epoch, "wall_s": wall, "cpu_s": cpu, "cpu_ms_per_call": 1000 * cpu / max(len(self.calls), 1),
                       "mean_issue_lag_ms": float(lags.mean() * 1000), "p99_issue_lag_ms": float(np.percentile(lags, 99) * 1000)},
            "interrupted": self.interrupted,
            "agentservesim_version": simulator.__version__,
        })
        self.writer.summary(s)
        self.writer.close()
        return s


def run_live(programs, endpoint: str, model: str, out_dir: str, **kw) -> dict:
    replay = LiveReplay(programs, endpoint, model, out_dir, **kw)
    loop = asyncio.new_event_loop()
    main_task = loop.create_task(replay.run())

    def _cancel():
        replay.interrupted = True
        main_task.cancel()
    try:
        loop.add_signal_handler(signal.SIGINT, _cancel)
    except (NotImplementedError, RuntimeError):
        pass
    try:
        return loop.run_until_complete(main_task)
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        loop.close()


def main_live(args) -> int:
    """asim-replay --endpoint ...: the CLI entry of a live replay."""
    from .cli import format_summary
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("asim-replay: error: live replay needs aiohttp (pip install aiohttp)", file=sys.stderr)
        return 2
    programs = load_trace(args.trace)
    launch = None
    endpoint = args.endpoint
    if getattr(args, "launch", None):
        from .vllm_server import VLLMServer
        from .vllm_server import TINY_ENGINE_ARGS
        launch = VLLMServer(args.launch, served_model_name=args.model,
                            engine_args=args.engine_args if args.engine_args is not None else TINY_ENGINE_ARGS)
        launch.start()
        endpoint = launch.base_url
    try:
        s = run_live(programs, endpoint, args.model, args.out, time_scale=args.time_scale,
                     max_inflight=args.max_inflight, seed=args.seed or 0, trace_name=str(args.trace),
                     quiet=args.quiet)
        if launch is not None:
            write_server_steps(args.out, launch.log_path)  # our server's log: its steps too
    except LiveError as e:
        print(f"asim-replay: error: {e}", file=sys.stderr)
        return 2
    finally:
        if launch is not None:
            launch.stop()
    if not args.quiet:
        sys.stderr.write("\n")
        print("\n".join(format_summary(s, None)))
        c = s["client"]
        print(f"client            {c['cpu_ms_per_call']:.2f} ms CPU per call, issue lag mean "
              f"{c['mean_issue_lag_ms']:.2f} ms, p99 {c['p99_issue_lag_ms']:.2f} ms")
        print(f"results in {args.out}/")
    return 130 if s.get("interrupted") else 0


BACK_TO_BACK_SLACK_MS = 10.0  # a step that began within this of the previous one's end followed it directly


def server_steps(records, t0_epoch_s: float, wall_s: float) -> list[dict]:
    """steps.csv rows for a live run from the engine's iteration records (`--enable-logging-
    iteration-details` with epoch stamps): the steps between the run's start and end, times
    relative to its t0. A step's period is the gap between consecutive stamps where the step
    began within BACK_TO_BACK_SLACK_MS of the previous one's end (the engine went straight on);
    the stamps are the API server's, so single periods jitter but their sums do not."""
    rows, prev = [], None
    for r in records:
        if r.t_s is None or r.is_dummy:
            continue
        t = r.t_s - t0_epoch_s
        if t < 0 or t > wall_s + 1.0:
            continue
        period = None
        if prev is not None:
            gap = 1000.0 * (r.t_s - prev)
            if gap - r.elapsed_ms <= BACK_TO_BACK_SLACK_MS:
                period = gap
        rows.append({"t_s": t, "instance": r.engine, "num_prefill_reqs": r.num_context_reqs,
                     "num_prefill_tokens": r.num_context_tokens, "num_decode_reqs": r.num_generation_reqs,
                     "period_ms": period, "elapsed_ms": r.elapsed_ms})
        prev = r.t_s
    return rows


def write_server_steps(out_dir, log_path) -> int:
    """Add steps.csv to a live run's results from the server log it ran against; the number of
    steps (0 when the log has no epoch-stamped iteration lines)."""
    from .results import write_steps
    from .vllm_server import parse_iteration_log

    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    client = summary.get("client") or {}
    if client.get("t0_epoch_s") is None:
        return 0
    rows = server_steps(parse_iteration_log(log_path), float(client["t0_epoch_s"]), float(client.get("wall_s", 0.0)))
    if rows:
        write_steps(out_dir, rows)
    return len(rows)
