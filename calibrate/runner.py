"""Drive a running OpenAI-compatible vLLM server through the designed experiments.

Each request is a streamed `/v1/completions` call with token-id prompts, `ignore_eos`,
`temperature=0` and `max_tokens`, as the live replay sends them, so the engine does the same
work per step. One thread per in-flight request (standard library only). The runner records
when each experiment started and ended (epoch seconds, the clock of the server's log
stamps) and what the server said about each request (prompt, cached and output tokens);
the step times themselves come from the server's iteration log.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field

from . import contention
from .experiments import Experiment, RequestSpec, prompt_tokens, with_suffix


class RunError(RuntimeError):
    """A request failed (server down, HTTP error): the profiling run cannot go on."""


@dataclass
class RequestResult:
    name: str
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    completion_tokens: int = 0
    t_send: float = 0.0
    t_first: float | None = None
    t_done: float = 0.0
    error: str | None = None


@dataclass
class ExperimentRun:
    name: str
    kind: str
    params: dict
    t_start: float
    t_end: float
    requests: list[RequestResult] = field(default_factory=list)
    other_cpu: float = 0.0  # cores other programs used meanwhile (see contention)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentRun":
        reqs = [RequestResult(**r) for r in d.get("requests", [])]
        return cls(d["name"], d["kind"], dict(d.get("params", {})), float(d["t_start"]), float(d["t_end"]), reqs,
                   float(d.get("other_cpu", 0.0)))


class Client:
    """Streams completions from one server; safe to use from several threads."""

    def __init__(self, base_url: str, model: str, vocab_size: int, seed: int = 0, timeout_s: float = 600.0):
        u = urllib.parse.urlparse(base_url)
        self.host, self.port = u.hostname, u.port or 80
        self.model = model
        self.vocab_size = vocab_size
        self.seed = seed
        self.timeout_s = timeout_s

    def complete(self, spec: RequestSpec, result: RequestResult, first_token: threading.Event | None = None) -> None:
        body = json.dumps({
            "model": self.model, "prompt": prompt_tokens(spec, self.vocab_size, self.seed),
            "max_tokens": spec.max_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True},
        })
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            result.t_send = time.time()
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RunError(f"{spec.name}: HTTP {resp.status}: {resp.read(500).decode(errors='replace')}")
            usage = None
            for raw in resp:
                if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                    continue
                if result.t_first is None:
                    result.t_first = time.time()
                    if first_token is not None:
                        first_token.set()
                if b'"usage":{' in raw or b'"usage": {' in raw:
                    chunk = json.loads(raw[6:])
                    usage = chunk.get("usage") or usage
            result.t_done = time.time()
            if usage:
                result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                result.completion_tokens = int(usage.get("completion_tokens") or 0)
                details = usage.get("prompt_tokens_details") or {}
                if details.get("cached_tokens") is not None:
                    result.cached_tokens = int(details["cached_tokens"])
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
            raise RunError(f"{spec.name}: {type(e).__name__}: {e}") from None
        finally:
            conn.close()


def run_experiment(client: Client, exp: Experiment, settle_s: float = 0.05,
                   pgid: int | None = None) -> ExperimentRun:
    """Run the phases of one experiment; return when every request has finished and the
    engine has had `settle_s` of idle time (so no step of it is logged after the next starts).
    `pgid`: the engine's process group, to tell its CPU time from other programs'."""
    cpu0 = contention.snapshot(pgid)
    run = ExperimentRun(exp.name, exp.kind, dict(exp.params), time.time(), 0.0)
    for phase in exp.phases:
        run.requests += _run_phase(client, phase)
    busy_end = time.time()
    run.other_cpu = round(contention.snapshot(pgid).others_since(cpu0) / max(busy_end - run.t_start, 1e-3), 3)
    time.sleep(settle_s)
    run.t_end = time.time()
    bad = [r for r in run.requests if r.error]
    if bad:
        raise RunError(bad[0].error)
    return run


def _run_phase(client: Client, phase: tuple[RequestSpec, ...]) -> list[RequestResult]:
    results = [RequestResult(r.name) for r in phase]
    early = [i for i, r in enumerate(phase) if not r.after_first_tokens]
    late = [i for i, r in enumerate(phase) if r.after_first_tokens]
    firsts = {i: threading.Event() for i in early}

    def work(i: int) -> None:
        spec = phase[i]
        try:
            if spec.after_first_tokens:
                for j in early:
                    firsts[j].wait(client.timeout_s)
            if spec.delay_s:
                time.sleep(spec.delay_s)
            client.complete(spec, results[i], firsts.get(i))
        except RunError as e:
            results[i].error = str(e)
        finally:
            if i in firsts:
                firsts[i].set()  # never leave a late request waiting on a failed one

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in early + late]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_all(client: Client, experiments: list[Experiment], progress=None, pgid: int | None = None,
            max_other_cpu: float = 0.25, retries: int = 2) -> tuple[list[ExperimentRun], list[Experiment]]:
    """Run the experiments in order; one run while other programs used more than
    `max_other_cpu` cores is repeated (fresh prompts) up to `retries` times. Every attempt is
    returned, with the experiments as run (retries renamed `~retryN`)."""
    runs, ran = [], []
    for k, exp in enumerate(experiments):
        for attempt in range(retries + 1):
            e = exp if attempt == 0 else with_suffix(exp, f"~retry{attempt}", retry=attempt)
            run = run_experiment(client, e, pgid=pgid)
            runs.append(run)
            ran.append(e)
            if run.other_cpu <= max_other_cpu:
                break
        if progress is not None:
            progress(k + 1, len(experiments), exp.name)
    return runs, ran
