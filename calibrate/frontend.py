"""The frontend delay a live client sees outside the engine's steps.

A client's TTFT on an idle engine is the request's way in (HTTP, the API server, the hand-off
to the engine core), the prefill step, and the first token's way out (detokenise-free
streaming here, the API server, HTTP): frontend = client TTFT - predicted step period of its
one prefill step. The simulator adds the way in before a call reaches the engine (so it
delays admission and queueing) and the way out to every token the client sees.

The profiling run ends with a probe (`probe_programs`): single calls, one at a time with idle
gaps, sent by the same asyncio streaming client that live replays use (`replay.live`), since
the client's own cost is part of what it measures. Each probe call is matched to its prefill
step in the engine's iteration log, whose lines carry the epoch time the API server saw the
step's output: the way out is the client's first-token time minus that, the way in is the
rest. Profiling directories without the probe fall back to the grid's single-request prefill
experiments (sent by the profiling client) and an even split. Only profiling data is used:
nothing from a validation run.
"""

from __future__ import annotations

import numpy as np

from simulator.latency import LinearStepModel
from simulator.latency.linear import IDLE_WAKE_AFTER_S
from simulator.workload import CallSpec, ProgramSpec

from .experiments import PREFILL

FRONTEND_DIR = "frontend"          # the probe's results (replay layout) inside a profiling dir
PROBE_PROMPTS = (64, 256, 1024)    # uncached prompt tokens, each prefilled in one step
PROBE_GAPS_S = (0.05, 0.3, 1.0)    # idle time planned before each call
PROBE_REPEATS = 3
PROBE_CALL_S = 0.25                # time planned for one probe call to finish
LOG_SLACK_S = 0.005                # a step's log line may be written just after the client saw the token


def probe_programs(max_step_tokens: int) -> list[ProgramSpec]:
    """Single two-token calls one after another, with idle gaps, prompts that fit one step."""
    programs = []
    t = 0.2
    for rep in range(PROBE_REPEATS):
        for gap in PROBE_GAPS_S:
            for n in PROBE_PROMPTS:
                n = max(1, min(n, max_step_tokens))
                programs.append(ProgramSpec(f"frontend-{len(programs):03d}", round(t, 3),
                                            (CallSpec(new_tokens=n, output_tokens=2),)))
                t += PROBE_CALL_S + gap
    return programs


def run_probe(base_url: str, model: str, out_dir, max_step_tokens: int, seed: int = 0, pgid: int | None = None,
              max_other_cpu: float | None = None, retries: int = 0, log=None) -> float:
    """Send the probe with the live-replay client; results (calls.csv, summary.json) in out_dir.
    As the grid's experiments, a probe during which other programs used more than
    `max_other_cpu` cores is sent again (`retries` times at most) and the least contended one
    kept; its contention goes to out_dir/contention.json. Returns the cores others used."""
    import json
    import shutil
    import time
    from pathlib import Path

    from replay.live import run_live

    from . import contention

    out = Path(out_dir)
    tried = []
    for i in range(retries + 1):
        d = out if i == 0 else out.with_name(f"{out.name}~r{i}")
        shutil.rmtree(d, ignore_errors=True)
        before, t0 = contention.snapshot(pgid), time.monotonic()
        run_live(probe_programs(max_step_tokens), base_url, model, str(d), quiet=True, seed=seed + i)
        other = contention.snapshot(pgid).others_since(before) / max(time.monotonic() - t0, 1e-9)
        tried.append((other, i, d))
        if max_other_cpu is None or other <= max_other_cpu:
            break
        if log is not None and i < retries:
            log(f"frontend probe: other programs used {other:.2f} cores; again")
    other, best, d = min(tried)
    if d != out:
        shutil.rmtree(out)
        d.rename(out)
    for _, _, rest in tried:
        if rest != out and rest.exists():
            shutil.rmtree(rest)
    (out / "contention.json").write_text(json.dumps({"other_cpu": round(other, 3), "attempts": len(tried),
                                                     "kept_attempt": best + 1}) + "\n")
    return other


def estimate_frontend_live(calls, t0_epoch_s: float, records, intercept: float, coefficients: dict,
                           host_s: float | None = None) -> dict:
    """Frontend delay, split into the way in and the way out, from the probe's calls (a
    DataFrame in the replay layout) and the engine's iteration records of the same run.

    With `host_s` (the profile's host time of a one-request step) the engine's share of a
    call's TTFT is the logged execute time plus host_s, so an error of the step model at
    some prompt length does not leak into the frontend; without it, the predicted period."""
    model = LinearStepModel(intercept, coefficients)
    prefills = [r for r in records if r.t_s is not None and r.num_context_reqs == 1
                and r.num_generation_reqs == 0]
    totals, outs, samples = [], [], []
    unmatched = 0
    ok = calls[(calls["status"] == "ok") & (calls["first_token_s"] >= 0)].sort_values("arrival_s")
    for c in ok.itertuples(index=False):
        send = t0_epoch_s + float(c.arrival_s)
        first = t0_epoch_s + float(c.first_token_s)
        cached = int(c.cached_tokens)
        n = int(c.input_tokens) - cached
        match = [r for r in prefills if r.num_context_tokens == n and send < r.t_s <= first + LOG_SLACK_S]
        if len(match) != 1 or n <= 0:
            unmatched += 1
            continue
        step = match[0]
        begun = step.t_s - step.elapsed_ms / 1000.0
        before = [r.t_s for r in records if r.t_s is not None and r.t_s < begun]
        period = model.step_time([(n, cached)], 0, 0, 1)
        if not before or begun - max(before) >= IDLE_WAKE_AFTER_S:
            period += model.idle_start_s  # the probe's calls wake an idle engine
        engine = period if host_s is None else step.elapsed_ms / 1000.0 + host_s
        total = float(c.ttft_s) - engine
        out = max(first - step.t_s, 0.0)
        totals.append(total)
        outs.append(out)
        samples.append({"program_id": c.program_id, "uncached_tokens": n, "ttft_s": float(c.ttft_s),
                        "predicted_period_s": period, "elapsed_s": step.elapsed_ms / 1000.0, "out_s": out,
                        "idle_before_s": begun - max(before) if before else None})
    if not totals:
        return {"frontend_s": 0.0, "n_samples": 0, "unmatched": unmatched,
                "why": "no probe call matched a logged prefill step"}
    total = float(np.median(totals))
    out = min(float(np.median(outs)), max(total, 0.0))
    a = np.asarray(totals)
    return {"frontend_s": total, "frontend_in_s": total - out, "frontend_out_s": out,
            "n_samples": len(totals), "unmatched": unmatched,
            "p10_s": float(np.percentile(a, 10)), "p90_s": float(np.percentile(a, 90)),
            "what": "live-client probe: median of client TTFT - the prefill step ("
                    + ("predicted period" if host_s is None else "logged execute time + host time per step")
                    + "); the way out is the client's first token minus the API server's log time of the step",
            "samples": samples}


def runner_frontend_samples(runs, rows, host_s: float) -> list[float]:
    """The frontend delay of each single prefill request of profiling-grid experiments (the
    profiling client, `calibrate.runner`): its client TTFT less its one prefill step (logged
    execute time + the profile's host time), as the probe measures it with the live client.
    `runs`: ExperimentRuns; `rows`: their attributed StepRows. Requests whose step is not the
    only prefill step logged between their send and first token are left out. Validation's
    reference batches take the same measure next to each live run; compared with this at
    profiling time (the profile's `frontend.runner_client_s`), it says how the machine's
    frontend moved, for the same client."""
    out = []
    for run in runs:
        if run.kind != PREFILL:
            continue
        steps = [r for r in rows if r.experiment == run.name and r.kind == PREFILL and r.num_prefills == 1]
        for req in run.requests:
            if req.t_first is None or req.error:
                continue
            m = [r for r in steps if req.t_send < r.t_s <= req.t_first + LOG_SLACK_S]
            if len(m) == 1:
                out.append((req.t_first - req.t_send) - (m[0].elapsed_ms / 1000.0 + host_s))
    return out


def estimate_frontend(experiments: list[dict], intercept: float, coefficients: dict, max_tokens: int,
                      max_other_cpu: float | None = 0.25) -> dict:
    model = LinearStepModel(intercept, coefficients)
    samples = []
    for ex in experiments:
        if ex.get("kind") != "prefill" or len(ex.get("requests", ())) != 1:
            continue
        if max_other_cpu is not None and (ex.get("other_cpu") or 0.0) > max_other_cpu:
            continue
        r = ex["requests"][0]
        if r.get("error") or r.get("t_first") is None:
            continue
        cached = int(r.get("cached_tokens") or 0)
        n = int(r["prompt_tokens"]) - cached
        if n <= 0 or n > max_tokens:
            continue  # a chunked prefill spans several steps
        ttft = float(r["t_first"]) - float(r["t_send"])
        samples.append(ttft - model.step_time([(n, cached)], 0, 0, 1))
    if not samples:
        return {"frontend_s": 0.0, "n_samples": 0, "why": "no uncontended single-request prefill experiments"}
    a = np.asarray(samples)
    return {"frontend_s": float(np.median(a)), "n_samples": int(a.size), "p10_s": float(np.percentile(a, 10)),
            "p90_s": float(np.percentile(a, 90)),
            "what": "median of client TTFT - predicted prefill step period, single-request prefill experiments"}
