"""What the profile importers share: writing a profile (YAML + CSV tables), finding the
served model's architecture, and the cross-validation of the operator tables.

Cross-validation of a table is leave-one-grid-point-out: every interior grid point is
predicted from the table without it, with the interpolation the simulator uses, and the
relative error is kept. For a 1-D operator the interpolation (piecewise linear, log-log or a
straight line) is chosen by that error; for grids (attention, MoE) the point is predicted
from its two neighbours along each axis in turn (linear per axis, as `OperatorModel` blends).
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import simulator
from simulator.hardware import HARDWARE_DIR, HardwareError, ModelArch, load_model
from simulator.latency.operators import Curve, choose_interp, loo_errors

TABLE_COLUMNS = {
    "dense": ("tp", "op", "tokens", "time_us"),
    "per_sequence": ("tp", "op", "sequences", "time_us"),
    "attention": ("tp", "prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us"),
    "moe": ("tp", "tokens", "activated_experts", "time_us"),
}


class ImportError_(ValueError):
    """A profile directory that cannot be read (user error)."""


# -- writing ----------------------------------------------------------------------------------


def write_profile(profile: dict, path: str | os.PathLike) -> Path:
    """Write `profile` to `path` (YAML). Its in-memory tables (`latency_model.tables`, a
    mapping of row lists) go to CSV files in `<stem>.tables/` beside it, which the YAML then
    names by relative path. Returns the YAML path."""
    path = Path(path)
    prof = dict(profile)
    lm = dict(prof.get("latency_model") or {})
    tables = lm.get("tables")
    if isinstance(tables, dict):
        tdir_name = f"{path.stem}.tables"
        tdir = path.parent / tdir_name
        tdir.mkdir(parents=True, exist_ok=True)
        for name, rows in tables.items():
            if not rows:
                continue
            cols = TABLE_COLUMNS[name]
            with open(tdir / f"{name}.csv", "w", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(cols)
                for r in rows:
                    w.writerow([_fmt(r[c]) for c in cols])
        lm["tables"] = tdir_name
        prof["latency_model"] = lm
    header = prof.pop("_header", "")
    text = yaml.safe_dump(_plain(prof), sort_keys=False, default_flow_style=None, width=110)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + text)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _plain(x):
    """numpy scalars and tuples to plain YAML types; floats to 6 significant digits."""
    if isinstance(x, dict):
        return {(int(k) if isinstance(k, np.integer) else k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return float(f"{f:.6g}") if math.isfinite(f) else None
    return x


def utc_today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


def agentservesim_version() -> str:
    return simulator.__version__


# -- models -----------------------------------------------------------------------------------


def _norm_id(s: str) -> str:
    s = s.lower().split("/")[-1]
    for suffix in ("-instruct", "-hf"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
    return s.replace("meta-llama-3-", "llama-3.1-")


def find_model(hf_id: str) -> tuple[str, ModelArch]:
    """The `hardware/models` entry for a Hugging Face id (exact `hf_id`, else the same name
    without an -Instruct/-hf suffix; Meta-Llama-3-8B maps to llama-3.1-8b, same shapes)."""
    cands = []
    for f in sorted((HARDWARE_DIR / "models").glob("*.yaml")):
        d = yaml.safe_load(f.read_text()) or {}
        cands.append((f.stem, str(d.get("hf_id", ""))))
    for stem, hid in cands:
        if hid.lower() == hf_id.lower():
            return stem, load_model(stem)
    want = _norm_id(hf_id)
    for stem, hid in cands:
        if _norm_id(hid) == want or stem == want:
            return stem, load_model(stem)
    raise ImportError_(f"no hardware/models entry for {hf_id!r}; pass model= (a name or a config.json)")


def resolve_model(model: str | ModelArch | None, hf_id: str) -> tuple[str, ModelArch]:
    if isinstance(model, ModelArch):
        return model.name, model
    if model:
        try:
            return str(model), load_model(model)
        except HardwareError as e:
            raise ImportError_(str(e)) from None
    return find_model(hf_id)


def model_shape(m: ModelArch) -> dict[str, int]:
    d = {"hidden_size": m.hidden_size, "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
         "head_dim": m.head_dim, "intermediate_size": m.intermediate_size}
    if m.is_moe:
        d.update(num_experts=m.num_experts, moe_intermediate_size=m.moe_intermediate_size)
    return d


# -- cross-validation -------------------------------------------------------------------------


def summarize_errors(errs: list[float]) -> dict[str, Any]:
    if not errs:
        return {"points": 0}
    a = np.abs(np.asarray(errs, dtype=float)) * 100
    return {"points": int(a.size), "mape_pct": float(np.mean(a)), "p90_pct": float(np.percentile(a, 90)),
            "max_pct": float(np.max(a))}


def fit_curves(tables: dict[str, list[tuple[float, float]]]) -> tuple[dict[str, str], dict[str, dict]]:
    """Choose each 1-D operator's interpolation by leave-one-out error: (choice, report)."""
    choice, report = {}, {}
    for op, pts in sorted(tables.items()):
        pts = sorted(pts)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        best, scores = choose_interp(xs, ys)
        choice[op] = best
        report[op] = {"interp": best, "cv_mape_pct": {k: round(v * 100, 3) for k, v in scores.items()},
                      **{k: v for k, v in summarize_errors(loo_errors(xs, ys, best)).items() if k != "mape_pct"}}
    return choice, report


def sum_loo(tables: dict[str, list[tuple[float, float]]], counts: dict[str, int], interp: dict[str, str]) -> list[float]:
    """Leave-one-out relative errors of a weighted sum of operators (ops on one shared grid):
    at each interior grid point every op is predicted without that point."""
    grids = {op: dict(pts) for op, pts in tables.items() if op in counts}
    if not grids:
        return []
    xs = sorted(set.intersection(*[set(g) for g in grids.values()]))
    errs = []
    for i in range(1, len(xs) - 1):
        x = xs[i]
        pred = meas = 0.0
        for op, g in grids.items():
            gx = sorted(g)
            keep = [v for v in gx if v != x]
            c = Curve(keep, [g[v] for v in keep], interp.get(op, "linear"))
            pred += counts[op] * c(x)
            meas += counts[op] * g[x]
        if meas > 0:
            errs.append((pred - meas) / meas)
    return errs


def grid_loo(points: dict[tuple, float], value_of=None) -> list[float]:
    """Leave-one-out along each axis of a grid {(x0, x1, ...): y}: a point whose neighbours
    on both sides along an axis are measured is predicted by linear blending between them.
    `value_of(key, y)` maps a stored value to the quantity compared (e.g. add the prefill
    part back to a mixed-step increment)."""
    value_of = value_of or (lambda key, y: y)
    ndim = len(next(iter(points)))
    axes = [sorted({k[d] for k in points}) for d in range(ndim)]
    errs = []
    for key, y in points.items():
        truth = value_of(key, y)
        if truth <= 0:
            continue
        for d in range(ndim):
            ax = axes[d]
            i = ax.index(key[d])
            if i == 0 or i == len(ax) - 1:
                continue
            lo = key[:d] + (ax[i - 1],) + key[d + 1:]
            hi = key[:d] + (ax[i + 1],) + key[d + 1:]
            if lo not in points or hi not in points:
                continue
            t = (key[d] - ax[i - 1]) / (ax[i + 1] - ax[i - 1])
            pred = points[lo] + t * (points[hi] - points[lo])
            errs.append((value_of(key, pred) - truth) / truth)
    return errs


def attention_cv(rows: list[tuple[int, int, int, int, float]]) -> dict[str, dict]:
    """CV of the three attention grids (prefill alone, decode alone, mixed)."""
    P = {(pc, kp): t for pc, kp, nd, kd, t in rows if nd == 0 and pc > 0}
    D = {(nd, kd): t for pc, kp, nd, kd, t in rows if pc == 0 and nd > 0}
    X = {(pc, kp, nd, kd): t - P[(pc, kp)] for pc, kp, nd, kd, t in rows if pc > 0 and nd > 0 and (pc, kp) in P}
    out = {"attention_prefill": summarize_errors(grid_loo(P)),
           "attention_decode": summarize_errors(grid_loo(D))}
    if X:
        out["attention_mixed"] = summarize_errors(grid_loo(X, lambda k, y: y + P[(k[0], k[1])]))
    for v in out.values():
        v["method"] = "linear per axis, leave-one-grid-point-out along each axis"
    return out


def moe_cv(points: dict[tuple[int, int], float]) -> dict:
    r = summarize_errors(grid_loo(points))
    r["method"] = "linear per axis (tokens, activated experts), leave-one-grid-point-out"
    return r
