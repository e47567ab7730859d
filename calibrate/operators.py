"""Per-operator step times from the engine's own torch profiler, and their fits.

vLLM's worker wraps every `execute_model` in a torch-profiler annotation when profiling is on;
with `detailed_trace_annotation` its name carries the step's batch shape:
`execute_T_context_C(sqQ skK sqsqA sqskB)_generation_G(sq.. sk.. ..)` (query tokens, KV
positions, Σ q², Σ q·k per phase), so a profiled step's features come straight from the trace.
The CPU operator events nested in each annotation are summed per operator family (GEMMs,
attention, KV-cache writes, norms, activations, rotary embedding, inductor-fused elementwise
kernels, sampling/logits, other ops); each family is fitted like the execute part, so the
fit is per operator as Vidur and LLMServingSim do, and an error can be traced to one.

The profiler slows the steps it records, so these times are used for the breakdown (each
family's share and fitted cost), not for the step model the simulator runs.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .experiments import DECODE, MIXED, PREFILL, EngineLimits, Experiment, RequestSpec

# (family, regex on the operator name), first match wins; order matters (specific first).
FAMILIES: tuple[tuple[str, re.Pattern], ...] = tuple((f, re.compile(p, re.I)) for f, p in (
    ("kv_cache_write", r"reshape_and_cache|cache_write|concat_and_cache|kv_cache_update|write_to_kv"),
    ("attention", r"attention|attn|paged|sdpa|flash|mha_|_varlen"),
    ("rotary", r"rotary|rope"),
    ("norm", r"rms_norm|layer_norm|rmsnorm|layernorm"),
    ("activation", r"silu|gelu|act_and_mul|swiglu"),
    ("gemm", r"aten::(mm|addmm|bmm|matmul|linear|baddbmm)$|mkldnn|onednn|dnnl|_linear|gemm|brgemm|_mm\b"),
    ("sampling", r"sampl|topk|top_k|argmax|multinomial|softmax|log_softmax|gather|logits"),
    ("embedding", r"embedding|index_select"),
    ("fused_elementwise", r"cpp_fused|triton_|fused_"),
))
OTHER_OPS = "other_ops"
FAMILY_NAMES = tuple(f for f, _ in FAMILIES) + (OTHER_OPS,)

_ANN_RE = re.compile(
    r"^execute_(?P<total>\d+)_context_(?P<cr>\d+)\(sq(?P<csq>\d+)sk(?P<csk>\d+)sqsq(?P<csqsq>\d+)"
    r"sqsk(?P<csqsk>\d+)\)_generation_(?P<gr>\d+)\(sq(?P<gsq>\d+)sk(?P<gsk>\d+)")
_COMPILED_GRAPH = re.compile(r"^## Call CompiledFxGraph")
# Events that only group others: their children are classified instead.
_TRANSPARENT = re.compile(r"^(Torch-Compiled Region|CompiledFunction|## |##|Call CompiledFxGraph|"
                          r"TorchDynamo|cudaGraph|<built-in|<forward op>|Optimized|"
                          r"aten::(empty|to|_to_copy|copy_|view|reshape|slice|select|as_strided|"
                          r"contiguous|clone|detach|resize_|fill_|zero_|zeros))")


def profiler_args(trace_dir: Path) -> list[str]:
    """`vllm serve` arguments that arm (but do not start) the worker's torch profiler."""
    cfg = {"profiler": "torch", "torch_profiler_dir": str(trace_dir), "torch_profiler_with_stack": False,
           "torch_profiler_record_shapes": False, "ignore_frontend": True, "detailed_trace_annotation": True,
           "torch_profiler_use_gzip": True}
    return ["--profiler-config", json.dumps(cfg, separators=(",", ":"))]


def operator_experiments(limits: EngineLimits) -> list[Experiment]:
    """A small grid for the profiled phase: prefill chunks over cached contexts, decode
    batches over contexts, one mixed batch."""
    bs, out = limits.block_size, []
    for n in (32, 256, 1024, limits.max_num_batched_tokens):
        for cb in (0, 8, 16):
            c = cb * bs
            if c + n + 1 > limits.max_model_len or n > limits.max_num_batched_tokens:
                continue
            name = f"op-prefill/n{n}-c{c}"
            meas = RequestSpec(f"{name}/req", c + n, 1, prefix_id=name if c else None, prefix_len=c)
            phases = ((meas,),) if not c else ((RequestSpec(f"{name}/warm", c + 1, 1, name, c),), (meas,))
            out.append(Experiment(name, PREFILL, phases, {"new_tokens": n, "cached": c}))
    for b in sorted({1, max(1, limits.max_num_seqs // 2), limits.max_num_seqs}):
        for L in (100, 1000, 2500):
            if L + 8 > limits.max_model_len:
                continue
            name = f"op-decode/b{b}-l{L}"
            out.append(Experiment(name, DECODE, (tuple(RequestSpec(f"{name}/{i}", L, 8) for i in range(b)),),
                                  {"batch": b, "prompt": L}))
    b = max(1, limits.max_num_seqs // 2)
    name = f"op-mixed/b{b}"
    dec = tuple(RequestSpec(f"{name}/d{i}", 200, 24) for i in range(b))
    late = RequestSpec(f"{name}/prefill", min(1500, limits.max_model_len - 2), 1, after_first_tokens=True, delay_s=0.02)
    out.append(Experiment(name, MIXED, (dec + (late,),), {"batch": b}))
    return out


def profile_operators(server, client, limits: EngineLimits, trace_dir: Path, log=print,
                      max_other_cpu: float = 0.25, retries: int = 2):
    """Run the operator grid under the torch profiler; (rows, note, runs). On any failure
    the rows are empty and the note says why (the timing profile does not depend on it)."""
    from .runner import RunError, run_all
    trace_dir.mkdir(parents=True, exist_ok=True)
    before = set(glob.glob(str(trace_dir / "**" / "*.json*"), recursive=True))
    try:
        _post(server.base_url + "/start_profile")
    except (urllib.error.URLError, OSError) as e:
        return [], f"the engine's /start_profile failed ({e}); operator times not recorded", []
    exps = operator_experiments(limits)
    log(f"operator phase: {len(exps)} experiments under the torch profiler")
    try:
        runs, _ = run_all(client, exps, pgid=server.pid, max_other_cpu=max_other_cpu, retries=retries)
    except RunError as e:
        runs = []
        note = f"an operator-phase request failed ({e})"
    else:
        note = None
    t0 = time.time()
    try:
        _post(server.base_url + "/stop_profile", timeout_s=600)
    except (urllib.error.URLError, OSError) as e:
        return [], f"the engine's /stop_profile failed ({e})", runs
    files = []
    while time.time() - t0 < 300:
        files = sorted(set(glob.glob(str(trace_dir / "**" / "*.json*"), recursive=True)) - before)
        if files and _complete(files):
            break
        time.sleep(1.0)
    if not files:
        return [], "the torch profiler wrote no trace", runs
    rows = []
    for f in files:
        rows += steps_from_trace(load_trace(f))
    log(f"operator phase: {len(rows)} profiled steps from {len(files)} trace file(s) "
        f"in {time.time() - t0:.0f} s after stop")
    if not rows:
        return [], note or "the trace held no step annotations", runs
    return label_rows(rows, runs), note, runs


def _post(url: str, timeout_s: float = 60.0) -> None:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        r.read()


def _complete(files: list[str]) -> bool:
    for f in files:
        try:
            load_trace(f)
        except (OSError, ValueError, EOFError):
            return False
    return True


def load_trace(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def classify(name: str) -> str | None:
    """The operator family of an event name; None for grouping events (see _TRANSPARENT)."""
    if _TRANSPARENT.match(name):
        return None
    for fam, rx in FAMILIES:
        if rx.search(name):
            return fam
    return OTHER_OPS


def steps_from_trace(trace: dict) -> list[dict]:
    """One row per `execute_...` annotation: its features, its duration and the time of each
    operator family inside it (outermost classified events only, so nothing counts twice)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    anns = [e for e in events if _ANN_RE.match(str(e.get("name", "")))]
    ops = [e for e in events if e.get("cat") in ("cpu_op", "kernel", "cpu_instant_event") or
           str(e.get("cat", "")).startswith("cpu_op")]
    by_thread: dict = {}
    for e in ops:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
    base_s = float(trace.get("baseTimeNanoseconds", 0)) / 1e9  # Kineto: ts is µs after this epoch
    rows = []
    for a in sorted(anns, key=lambda e: float(e["ts"])):
        if _ANN_RE.match(a["name"])["total"] == "0":
            continue  # a step that scheduled nothing
        evs = by_thread.get((a.get("pid"), a.get("tid")), [])
        row = _row(a, evs)
        row["t_s"] = base_s + float(a["ts"]) / 1e6 if base_s else 0.0
        rows.append(row)
    return rows


def label_rows(rows: list[dict], runs) -> list[dict]:
    """Give each profiled step the experiment (attempt) it ran in, by time, and that
    attempt's contention; steps outside every experiment get no label."""
    out = []
    for r in rows:
        run = next((x for x in runs if x.t_start <= r["t_s"] <= x.t_end), None)
        out.append({**r, "experiment": run.name if run else "", "other_cpu": run.other_cpu if run else 0.0})
    return out


def _row(ann: dict, evs: list[dict]) -> dict:
    m = _ANN_RE.match(ann["name"])
    t0, t1 = float(ann["ts"]), float(ann["ts"]) + float(ann["dur"])
    fam_us = dict.fromkeys(FAMILY_NAMES, 0.0)
    covered_until = -1.0
    counted: list[tuple[float, float]] = []
    graphs: list[tuple[float, float]] = []
    lo = _first_at(evs, t0)
    for e in evs[lo:]:
        ts = float(e["ts"])
        if ts >= t1:
            break
        end = ts + float(e["dur"])
        if end > t1 + 1e-3:
            continue  # not inside the annotation
        name = str(e.get("name", ""))
        if _COMPILED_GRAPH.match(name):
            graphs.append((ts, end))
        if ts < covered_until:
            continue  # inside an already counted operator
        fam = classify(name)
        if fam is None:
            continue
        fam_us[fam] += float(e["dur"])
        counted.append((ts, end))
        covered_until = end
    # Inductor's generated kernels (norms, activations, rotary, residual adds, fused together)
    # emit no profiler events: they are the compiled graph's time outside the ops it calls.
    for g0, g1 in graphs:
        inside = sum(b - a for a, b in counted if a >= g0 and b <= g1 + 1e-3)
        fam_us["fused_elementwise"] += max(g1 - g0 - inside, 0.0)
    csq, csk, csqsq, csqsk = (int(m[k]) for k in ("csq", "csk", "csqsq", "csqsk"))
    cr, gr = int(m["cr"]), int(m["gr"])
    row = {
        "annotation_ms": float(ann["dur"]) / 1000.0,
        "prefill_tokens": csq,
        # Σ n·(c + (n+1)/2) = Σ n·(c+n) - Σ n²/2 + Σ n/2
        "prefill_attn": csqsk - csqsq / 2 + csq / 2,
        "prefill_kv": csk,
        "num_prefills": cr,
        "num_decodes": gr,
        "decode_ctx_sum": int(m["gsk"]),
        "num_sampled": gr + cr,  # a chunk that does not end its prompt samples nothing: an upper bound
        "num_seqs": cr + gr,
    }
    for fam in FAMILY_NAMES:
        row[f"{fam}_ms"] = fam_us[fam] / 1000.0
    row["unattributed_ms"] = max(row["annotation_ms"] - sum(fam_us.values()) / 1000.0, 0.0)
    return row


def _first_at(evs: list[dict], t: float) -> int:
    lo, hi = 0, len(evs)
    while lo < hi:
        mid = (lo + hi) // 2
        if float(evs[mid]["ts"]) < t:
            lo = mid + 1
        else:
            hi = mid
    return lo


# -- fitting -----------------------------------------------------------------------------------


def _quietest(rows: list[dict], max_other_cpu: float | None, attempts_of) -> list[dict]:
    """The rows of each experiment's least contended attempt, without those still over the
    threshold (unless that is most of them). Rows without labels are all kept."""
    if not rows or "experiment" not in rows[0]:
        return rows
    from types import SimpleNamespace
    labelled = [SimpleNamespace(experiment=r["experiment"], other_cpu=float(r.get("other_cpu") or 0.0))
                for r in rows if r["experiment"]]
    keep = attempts_of(labelled)
    rows = [r for r in rows if r["experiment"] in keep]
    if max_other_cpu is not None:
        quiet = [r for r in rows if float(r.get("other_cpu") or 0.0) <= max_other_cpu]
        if len(quiet) >= len(rows) / 2:
            rows = quiet
    return rows


def fit_operators(rows: list[dict], folds: int = 5, seed: int = 0, max_other_cpu: float | None = 0.25) -> dict:
    """Per family: its share of the profiled step time and a CV-chosen linear fit."""
    from types import SimpleNamespace

    from .fit import (choose, cross_validate, execute_families, feature_matrix, group_folds,
                      least_contended_attempts, solve)

    n_all = len(rows)
    rows = _quietest(rows, max_other_cpu, least_contended_attempts)
    if len(rows) < 10:
        return {"available": False, "why": f"only {len(rows)} usable profiled steps"}
    num = set(rows[0]) - {"experiment"}
    recs = [SimpleNamespace(**{k: float(r[k]) for k in num}) for r in rows]
    total = np.array([r.annotation_ms for r in recs])
    if rows[0].get("experiment"):
        groups = [str(r["experiment"]) or f"t{i}" for i, r in enumerate(rows)]
    else:  # unlabelled rows: group steps of one batch shape together
        groups = [f"{int(r.num_prefills)}-{int(r.prefill_tokens) // 64}-{int(r.num_decodes)}" for r in recs]
    try:
        fold_idx = group_folds(groups, folds, seed)
    except ValueError:
        fold_idx = None
    out = {"available": True, "source": "torch profiler inside the engine worker (vLLM --profiler-config), "
           "execute_model only; times are inflated by the profiler", "n_samples": len(recs),
           "n_profiled_steps": n_all,
           "mean_step_ms": round(float(total.mean()), 4), "families": {}}
    for fam in FAMILY_NAMES + ("unattributed",):
        y = np.array([getattr(r, f"{fam}_ms") for r in recs]) / 1000.0
        share = float(y.sum() / (total.sum() / 1000.0))
        entry = {"share_of_step": round(share, 4)}
        if share >= 0.01 and fold_idx is not None and (y > 0).sum() >= 10:
            pos = y > 0
            yy = np.where(pos, y, np.nan)
            idx = np.flatnonzero(pos)
            sub_groups = [groups[i] for i in idx]
            try:
                sub_folds = group_folds(sub_groups, folds, seed)
            except ValueError:
                sub_folds = None
            if sub_folds is not None:
                cands = []
                for famly in execute_families(idle=False):
                    if famly.solver == "ols":
                        continue
                    X = feature_matrix([recs[i] for i in idx], famly.features)
                    cands.append(cross_validate(famly, X, yy[idx], sub_folds))
                best = choose(cands)
                X = feature_matrix([recs[i] for i in idx], best.family.features)
                coef = solve(best.family, X, yy[idx])
                entry.update({"family": best.family.name, "cv_mape": round(best.mape, 4),
                              "cv_p90_ape": round(best.p90_ape, 4), "n_samples": int(len(idx)),
                              "intercept": float(coef[0]),
                              "coefficients": {f: float(c) for f, c in zip(best.family.features, coef[1:]) if c}})
        out["families"][fam] = entry
    return out
