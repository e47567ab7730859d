"""Per-operator latency model from measured operator tables (Vidur / LLMServingSim style).

A step's time is the sum of operator families, each looked up in a table measured on one
GPU for one decoder layer at the per-rank shapes of a tensor-parallel degree:

- dense ops (qkv/o/gate_up/down projections, activation, norms, rotary) by token count,
  times `num_layers` of the served model; `embedding` and the final norm once per step;
- attention, one kernel per layer, by batch shape: prefill chunks by (chunk, tokens already
  in context), decodes by (count, KV per request), and mixed steps by the 4-axis table
  (one chunk + uniform decodes) that LLMServingSim profiles. In a mixed step the decodes run
  in the varlen prefill kernel (no GQA packing, no split-KV), several times slower than
  alone, so decodes are looked up as the increment over the prefill in that table;
- per-sequence ops (lm_head, sampler) by the number of scheduled requests (vLLM v1 computes
  logits for the last position of every scheduled request, a partial prefill's included,
  and discards the partial ones' samples);
- MoE by tokens and expected distinct experts hit, E·(1-(1-k/E)^T) (uniform routing), per
  expert-parallel rank: E/ep local experts over the tokens of all `ep` data-parallel ranks;
- tensor-parallel all-reduce (two per layer: after o_proj and down_proj, tokens·hidden·dtype
  bytes each) and expert-parallel all-gather / reduce-scatter from a collective size->time
  curve fitted on measured collectives, or from the interconnect's spec when none is measured;
- a per-step host overhead, an explicit term whose source the profile states. With
  `async_overlap` (vLLM's async scheduling) it overlaps the device's step: a step takes
  max(device, host) instead of their sum (the imported GPU profiles carry no host overhead,
  so for them the two agree).

Hybrid models (Qwen3-Next / Qwen3.5 / Qwen3.6: Gated DeltaNet linear attention in most
layers, full attention every few; `ModelArch.attention_layers`): attention and the ops of the
attention block (`operators.per_attention_layer`: qkv/o projections, q/k norm, rotary) count
in the attention layers only, the linear-attention op (`operators.per_linear_layer`, timed by
tokens as the profile measures it) in the others, norms and the MLP/MoE in every layer.

Tables are plain CSV files next to the profile YAML; 1-D tables interpolate piecewise
linearly in (tokens, time) or in log-log as cross-validation chose per operator, and
extrapolate linearly beyond the grid. Grids over attention axes blend linearly per axis.
Everything a step needs is precomputed on integer grids (tokens, sequences, decode count),
so a pure-decode step is a few list lookups and float operations.
"""

from __future__ import annotations

import csv
import math
import os
from bisect import bisect_right
from pathlib import Path

import numpy as np

from ..hardware import HARDWARE_DIR, _load_yaml
from .base import LatencyModel, StepFeatures, local_pairs
from .collectives import nccl_ring_time_s

US = 1e-6
_INTERPS = ("linear", "loglog", "affine")


# ---------------------------------------------------------------------------------------------
# 1-D curves
# ---------------------------------------------------------------------------------------------


def tail_slope(xs: list[float], ys: list[float]) -> float:
    """Slope for extrapolating past the last grid point: least squares over the top quarter
    of the grid (at least two points), floored at 0 so a noisy tail never turns time down."""
    n = len(xs)
    if n < 2:
        return 0.0
    k = max(2, n // 4)
    sx, sy = xs[-k:], ys[-k:]
    mx, my = sum(sx) / k, sum(sy) / k
    var = sum((x - mx) ** 2 for x in sx)
    if var <= 0:
        return 0.0
    return max(0.0, sum((x - mx) * (y - my) for x, y in zip(sx, sy)) / var)


class Curve:
    """y(x) from a measured grid: piecewise linear ("linear"), piecewise linear in log-log
    ("loglog") or a least-squares line ("affine"). Below the grid: the first value; above
    it: linear extrapolation with `tail_slope`. Exact at grid points for the first two."""

    __slots__ = ("xs", "ys", "interp", "_lx", "_ly", "_slope", "_a", "_b")

    def __init__(self, xs, ys, interp: str = "linear"):
        if interp not in _INTERPS:
            raise ValueError(f"unknown interpolation {interp!r} (known: {', '.join(_INTERPS)})")
        pts = sorted(zip((float(x) for x in xs), (float(y) for y in ys)))
        if not pts:
            raise ValueError("empty curve")
        self.xs = [p[0] for p in pts]
        self.ys = [p[1] for p in pts]
        if interp == "loglog" and (self.xs[0] <= 0 or min(self.ys) <= 0):
            interp = "linear"
        self.interp = interp
        self._slope = tail_slope(self.xs, self.ys)
        if interp == "loglog":
            self._lx = [math.log(x) for x in self.xs]
            self._ly = [math.log(y) for y in self.ys]
        if interp == "affine":
            n = len(self.xs)
            mx, my = sum(self.xs) / n, sum(self.ys) / n
            var = sum((x - mx) ** 2 for x in self.xs)
            self._b = sum((x - mx) * (y - my) for x, y in zip(self.xs, self.ys)) / var if var > 0 else 0.0
            self._a = my - self._b * mx

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if self.interp == "affine":
            return max(self._a + self._b * x, 0.0)
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1] + self._slope * (x - xs[-1])
        i = bisect_right(xs, x)
        x0, x1 = xs[i - 1], xs[i]
        if self.interp == "loglog":
            lx = math.log(x)
            t = (lx - self._lx[i - 1]) / (self._lx[i] - self._lx[i - 1])
            return math.exp(self._ly[i - 1] + t * (self._ly[i] - self._ly[i - 1]))
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


def loo_errors(xs, ys, interp: str) -> list[float]:
    """Leave-one-out relative errors of `interp` on a 1-D grid: each interior point
    predicted from the curve built without it."""
    xs, ys = list(xs), list(ys)
    errs = []
    for i in range(1, len(xs) - 1):
        c = Curve(xs[:i] + xs[i + 1:], ys[:i] + ys[i + 1:], interp)
        if ys[i] > 0:
            errs.append(abs(c(xs[i]) - ys[i]) / ys[i])
    return errs


def choose_interp(xs, ys, candidates=_INTERPS) -> tuple[str, dict[str, float]]:
    """The candidate with the lowest leave-one-out mean relative error, and every score."""
    scores = {}
    for m in candidates:
        e = loo_errors(xs, ys, m)
        scores[m] = sum(e) / len(e) if e else 0.0
    best = min(candidates, key=lambda m: (scores[m], candidates.index(m)))
    return best, scores


# ---------------------------------------------------------------------------------------------
# Grids over attention axes (linear blend per axis)
# ---------------------------------------------------------------------------------------------


def _bracket(axis: list[float], x: float) -> tuple[int, int, float]:
    """(lo, hi, t): clamp below the axis, blend inside, extrapolate linearly above."""
    n = len(axis)
    if n == 1 or x <= axis[0]:
        return 0, 0, 0.0
    i = bisect_right(axis, x)
    if i >= n:
        lo, hi = n - 2, n - 1
    else:
        lo, hi = i - 1, i
    return lo, hi, (x - axis[lo]) / (axis[hi] - axis[lo])


class Grid:
    """A dense N-d table on sorted axes, multilinear; missing cells filled beforehand."""

    __slots__ = ("axes", "values", "ndim")

    def __init__(self, axes: list[list[float]], values):
        self.axes = [list(map(float, a)) for a in axes]
        self.values = values  # nested lists, values[i0][i1]...
        self.ndim = len(axes)

    def __call__(self, *x: float) -> float:
        br = [_bracket(a, v) for a, v in zip(self.axes, x)]
        return self._blend(self.values, br, 0)

    def _blend(self, node, br, d):
        lo, hi, t = br[d]
        if d == self.ndim - 1:
            a = node[lo]
            return a if lo == hi else a + t * (node[hi] - a)
        a = self._blend(node[lo], br, d + 1)
        if lo == hi:
            return a
        return a + t * (self._blend(node[hi], br, d + 1) - a)


def build_grid(points: dict[tuple, float], axes: list[list[float]]) -> Grid:
    """A Grid from {(x0, x1, ...): value}. Holes (cells with no measurement) are filled
    along each axis in turn, last axis first, by linear interpolation between the measured
    neighbours (the nearest one at an end)."""
    arr = np.full([len(a) for a in axes], np.nan)
    index = [{float(v): i for i, v in enumerate(a)} for a in axes]
    for key, v in points.items():
        arr[tuple(index[d][float(k)] for d, k in enumerate(key))] = float(v)
    for d in reversed(range(len(axes))):
        ax = np.asarray(axes[d], dtype=float)
        arr = np.apply_along_axis(_fill_line, d, arr, ax)
    return Grid(axes, arr.tolist())


def _fill_line(line: np.ndarray, ax: np.ndarray) -> np.ndarray:
    known = ~np.isnan(line)
    if known.all() or not known.any():
        return line
    out = line.copy()
    out[~known] = np.interp(ax[~known], ax[known], line[known])
    return out


# ---------------------------------------------------------------------------------------------
# Attention (one layer)
# ---------------------------------------------------------------------------------------------


class AttentionTable:
    """Attention time of one layer from LLMServingSim's 4-axis table
    (prefill_chunk, kv_prefill, n_decode, kv_decode) -> µs, split into three grids:
    P(chunk, context) prefill alone, D(n, kv) decodes alone, and X(chunk, context, n, kv) =
    mixed - P, the decodes' cost inside a mixed step."""

    def __init__(self, rows: list[tuple[int, int, int, int, float]]):
        p, d, x = {}, {}, {}
        for pc, kp, nd, kd, t in rows:
            if nd == 0 and pc > 0:
                p[(pc, kp)] = t
            elif pc == 0 and nd > 0:
                d[(nd, kd)] = t
        for pc, kp, nd, kd, t in rows:
            if pc > 0 and nd > 0 and (pc, kp) in p:
                x[(pc, kp, nd, kd)] = t - p[(pc, kp)]
        if not p or not d:
            raise ValueError("attention table needs prefill-only and decode-only rows")
        ax = lambda pts, i: sorted({float(k[i]) for k in pts})  # noqa: E731
        self.P = build_grid(p, [ax(p, 0), ax(p, 1)])
        self.D = build_grid(d, [ax(d, 0), ax(d, 1)])
        self.X = build_grid(x, [ax(x, 0), ax(x, 1), ax(x, 2), ax(x, 3)]) if x else None
        # The kernel's fixed cost: the cheapest prefill measured. A step with several chunks
        # runs them in one varlen kernel, so each chunk beyond the first adds P - P0.
        self.p0 = min(p.values())
        self._pc_max = self.P.axes[0][-1]

    def prefill(self, chunks) -> tuple[float, int, int]:
        """(time of the chunks alone, the dominant chunk's n, its context)."""
        P = self.P
        nmax = self._pc_max
        best = -1.0
        tot = 0.0
        bn = bc = 0
        for n, c in chunks:
            if n <= nmax:
                t = P(n, c)
            else:  # past the measured chunks: scale the largest by the causal work n·(c + (n+1)/2)
                t = P(nmax, c) * (n * (c + (n + 1) * 0.5)) / (nmax * (c + (nmax + 1) * 0.5))
            tot += t - self.p0
            if t > best:
                best, bn, bc = t, n, c
        return tot + self.p0, bn, bc

    def step_window(self, chunks, nd: int, kd: float, kd_max: float | None, alpha: float,
                    window: int, chunked: bool = False) -> tuple[float, float]:
        """`step` for a local-attention layer (sliding window, or `chunked` local attention of
        `window` positions): a decode reads at most `window` keys (its history clipped to
        window - 1); a prefill chunk costs the kernel's fixed part plus the rest scaled by
        the local share of its causal work (local_pairs)."""
        w1 = window - 1.0
        kdw = kd if kd < w1 else w1
        kmw = None if kd_max is None else (kd_max if kd_max < w1 else w1)
        if not chunks:
            return self.step(chunks, nd, kdw, kmw, alpha)
        P, p0 = self.P, self.p0
        tot = 0.0
        best, bn, bc = -1.0, 0, 0
        nmax = self._pc_max
        for n, c in chunks:
            full = n * (c + (n + 1) * 0.5)
            if n <= nmax:
                t = P(n, c)
            else:
                t = P(nmax, c) * full / (nmax * (c + (nmax + 1) * 0.5))
            t = p0 + (t - p0) * local_pairs(n, c, window, chunked) / full
            tot += t - p0
            if t > best:
                best, bn, bc = t, n, c
        pt = tot + p0
        if not nd:
            return pt, 0.0
        bc = bc if bc < w1 else w1
        f = self.D if self.X is None else (lambda b, k: max(self.X(bn, bc, b, k), 0.0))
        skew = alpha and nd > 1 and kmw is not None and kmw > kdw
        t = f(nd, kdw)
        return pt, t + alpha * (f(nd, kmw) - t) if skew else t

    def step(self, chunks, nd: int, kd: float, kd_max: float | None = None, alpha: float = 0.0) -> tuple[float, float]:
        """(prefill part, decode part) of one layer's attention, µs. With the decodes'
        longest history `kd_max` and the profile's skew coefficient `alpha`, the decode part
        is t(mean) + alpha·(t(max) - t(mean)) (LLMServingSim's skew correction: uneven
        lengths in one batch run slower than a uniform batch of the same total)."""
        skew = alpha and nd > 1 and kd_max is not None and kd_max > kd
        if not chunks:
            if not nd:
                return 0.0, 0.0
            t = self.D(nd, kd)
            return 0.0, t + alpha * (self.D(nd, kd_max) - t) if skew else t
        pt, n, c = self.prefill(chunks)
        if not nd:
            return pt, 0.0
        f = self.D if self.X is None else (lambda b, k: max(self.X(n, c, b, k), 0.0))
        t = f(nd, kd)
        return pt, t + alpha * (f(nd, kd_max) - t) if skew else t


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------


class Collective:
    """time(bytes) of one collective among `n` GPUs: a measured curve (µs vs bytes); else,
    when the link file describes how NCCL runs over it (`nccl:`), NCCL's own cost model
    (collectives.py); else the link spec's ring formula (latency per hop + algorithm bytes /
    (bandwidth · efficiency)). `nbytes` is the reduced buffer for all-reduce and the whole
    gathered (scattered) buffer for all-gather (reduce-scatter)."""

    def __init__(self, kind: str, n: int, curve: Curve | None = None, link=None, source: str = ""):
        self.kind, self.n, self.curve, self.link, self.source = kind, n, curve, link, source
        # vLLM's own all-reduce kernel over the link (measured), which vLLM runs instead of
        # NCCL for messages up to small_max (collective_from_spec sets both)
        self.small: Curve | None = None
        self.small_max = 0.0
        if curve is None and link is None:
            raise ValueError(f"{kind} among {n} GPUs needs a measured curve or a link spec")

    def time_s(self, nbytes: float) -> float:
        if nbytes <= 0 or self.n <= 1:
            return 0.0
        if nbytes <= self.small_max:
            return self.small(nbytes) * US
        if self.curve is not None:
            return self.curve(nbytes) * US
        n, lk = self.n, self.link
        if lk.nccl is not None:
            return nccl_ring_time_s(self.kind, n, nbytes, lk.nccl.bus_bandwidth_Bps, lk.nccl.hw)[0]
        bw = lk.bandwidth_Bps * lk.allreduce_efficiency
        if self.kind == "all_reduce":  # ring: reduce-scatter + all-gather, 2(n-1) hops
            return 2 * (n - 1) * lk.latency_s + 2.0 * (n - 1) / n * nbytes / bw
        # all_gather / reduce_scatter of a `nbytes` total buffer: n-1 hops
        return (n - 1) * lk.latency_s + (n - 1) / n * nbytes / bw

    def describe(self) -> dict:
        if self.curve is not None:
            how = "measured curve"
        elif self.link.nccl is not None:
            how = f"NCCL cost model over {self.link.name} (bus bandwidth {self.link.nccl.bus_bandwidth_Bps:.3g} B/s)"
        else:
            how = f"link spec {self.link.name}"
        if self.small is not None:
            how = f"vLLM's custom all-reduce over {self.link.name} up to {self.small_max:.0f} B (measured), then " + how
        return {"kind": self.kind, "gpus": self.n, "from": how,
                **({"source": self.source} if self.source else {}),
                **({"custom_all_reduce_source": self.link.custom_all_reduce["source"]} if self.small is not None else {})}


def _interconnect_collectives(name: str) -> dict:
    """The `collectives:` section of a hardware/interconnects file (fitted curves), or {}."""
    f = HARDWARE_DIR / "interconnects" / f"{name}.yaml"
    return (_load_yaml(f).get("collectives") or {}) if f.exists() else {}


def collective_from_spec(kind: str, n: int, spec: dict | None, link) -> Collective:
    """A Collective for `n` GPUs: the profile's measured curve ({curves: {n: {bytes,
    time_us}}}, or `interconnect: <name>` naming a fitted hardware/interconnects file), else
    the fitted curve of the device's link file when it has one, else the link's spec. An
    all-reduce over a link with a measured `vllm_custom_all_reduce` curve for `n` GPUs takes
    it for the messages it covers: vLLM runs its own kernel there, not NCCL."""
    c = _collective_from_spec(kind, n, spec, link)
    ca = getattr(link, "custom_all_reduce", None) if kind == "all_reduce" else None
    pts = (ca or {}).get("curves", {}).get(n)
    if pts:
        c.small = Curve(pts["bytes"], pts["time_us"], "loglog")
        c.small_max = ca["max_bytes"]
        if c.link is None:
            c.link = link
    return c


def _collective_from_spec(kind: str, n: int, spec: dict | None, link) -> Collective:
    spec = dict(spec or {})
    if "interconnect" in spec and "curves" not in spec:
        spec.update(_interconnect_collectives(str(spec["interconnect"])).get(kind) or {})
        spec.setdefault("source", f"hardware/interconnects/{spec['interconnect']}.yaml")
    if "curves" not in spec and link is not None:
        fitted = _interconnect_collectives(link.name).get(kind) or {}
        if fitted:
            spec.update(fitted, source=f"hardware/interconnects/{link.name}.yaml")
    per_n = spec.get("curves") or {}
    c = per_n.get(n) or per_n.get(str(n))
    if c:
        return Collective(kind, n, Curve(c["bytes"], c["time_us"], c.get("interp", "loglog")),
                          source=str(spec.get("source", "")))
    if link is None:
        raise ValueError(f"no measured {kind} curve for {n} GPUs and no intra-node link to fall back on")
    if link.nccl is not None:
        return Collective(kind, n, link=link, source=f"NCCL cost model (NVIDIA/nccl src/graph/tuning.cc), bus "
                                                     f"bandwidth of {link.name}: {link.nccl.source}")
    return Collective(kind, n, link=link, source=f"spec of {link.name}: {link.source}")


# ---------------------------------------------------------------------------------------------
# Table files
# ---------------------------------------------------------------------------------------------


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def resolve_tables_dir(spec: dict, profile: dict | None, base_dir: str | os.PathLike | None) -> Path:
    """The folder of a profile's CSV tables: absolute, or relative to the profile YAML
    (`base_dir`, or the profile's `_dir` when a loader recorded it), else to hardware/profiles."""
    rel = Path(spec["tables"])
    if rel.is_absolute():
        return rel
    cands = []
    if base_dir is not None:
        cands.append(Path(base_dir) / rel)
    if profile and profile.get("_dir"):
        cands.append(Path(profile["_dir"]) / rel)
    cands.append(HARDWARE_DIR / "profiles" / rel)
    for c in cands:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"operator tables '{rel}' not found (looked in: {', '.join(map(str, cands))})")


def load_tables(source, tp: int) -> dict:
    """The tables of one tensor-parallel degree: dense {op: [(tokens, us)]}, per_sequence
    {op: [(seqs, us)]}, attention [(pc, kp, nd, kd, us)], moe {(tokens, experts): us}.
    `source` is the folder of CSV files or the same rows in memory ({name: [row dicts]})."""
    def rows(name):
        if isinstance(source, dict):
            return [r for r in source.get(name, []) if int(r["tp"]) == tp]
        f = Path(source) / f"{name}.csv"
        return [r for r in read_csv_rows(f) if int(r["tp"]) == tp] if f.exists() else []

    out = {"dense": {}, "per_sequence": {}, "attention": [], "moe": {}}
    for r in rows("dense"):
        out["dense"].setdefault(r["op"], []).append((float(r["tokens"]), float(r["time_us"])))
    for r in rows("per_sequence"):
        out["per_sequence"].setdefault(r["op"], []).append((float(r["sequences"]), float(r["time_us"])))
    for r in rows("attention"):
        out["attention"].append((int(r["prefill_chunk"]), int(r["kv_prefill"]), int(r["n_decode"]),
                                 int(r["kv_decode"]), float(r["time_us"])))
    for r in rows("moe"):
        out["moe"][(int(r["tokens"]), int(r["activated_experts"]))] = float(r["time_us"])
    return out


# ---------------------------------------------------------------------------------------------
# MoE
# ---------------------------------------------------------------------------------------------


def expected_active_experts(num_experts: int, top_k: int, tokens: float) -> float:
    """Distinct experts hit by `tokens` tokens routing top-k of E uniformly at random."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


class MoETable:
    """MoE block time (router + fused experts) by (tokens, distinct activated experts),
    LLMServingSim's moe.csv (experts forced by routing). Per token row, linear in the
    activated experts within the measured range (a row cannot exceed top_k·tokens experts);
    rows blend linearly in tokens, extrapolating linearly above the largest."""

    def __init__(self, points: dict[tuple[int, int], float]):
        rows: dict[int, list[tuple[int, float]]] = {}
        for (t, e), v in points.items():
            rows.setdefault(t, []).append((e, v))
        self.tokens = sorted(rows)
        self.rows = [Curve([e for e, _ in sorted(rows[t])], [v for _, v in sorted(rows[t])]) for t in self.tokens]

    def _row(self, i: int, experts: float) -> float:
        c = self.rows[i]
        return c(min(max(experts, c.xs[0]), c.xs[-1]))

    def __call__(self, tokens: float, experts: float) -> float:
        lo, hi, t = _bracket([float(x) for x in self.tokens], tokens)
        a = self._row(lo, experts)
        return a if lo == hi else a + t * (self._row(hi, experts) - a)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class OperatorModel(LatencyModel):
    """Per-operator latency model; build with `from_profile` (see the module doc)."""

    kind = "operators"

    def __init__(self, *, num_layers: int, hidden_size: int, dtype_bytes: int, dense_layer: dict[str, Curve],
                 dense_layer_count: dict[str, int], dense_step: dict[str, Curve], per_sequence: dict[str, Curve],
                 attention: AttentionTable, tp: int = 1, allreduce: Collective | None = None,
                 allreduces_per_layer: int = 2, allreduces_per_step: int = 1, logits_gather: Collective | None = None,
                 vocab_size: int = 0, moe: MoETable | None = None, num_experts: int = 0,
                 top_k: int = 0, ep: int = 1, ep_gather: Collective | None = None, ep_scatter: Collective | None = None,
                 host_overhead_s: float = 0.0, host_overhead_per_seq_s: float = 0.0, skew_alpha: float = 0.0,
                 skew_alpha_mixed: float | None = None, max_tokens: int = 8192, max_seqs: int = 1024, source: dict | None = None,
                 attention_layers: int | None = None, dense_attention_layer: dict[str, Curve] | None = None,
                 dense_attention_count: dict[str, float] | None = None,
                 dense_linear_layer: dict[str, Curve] | None = None,
                 dense_linear_count: dict[str, float] | None = None,
                 sliding_layers: int = 0, sliding_window: int = 0, chunked: bool = False,
                 moe_layers: int | None = None, async_overlap: bool = False):
        self.L = int(num_layers)
        # the host work of a step runs while the device runs the previous one (async scheduling)
        self.async_overlap = bool(async_overlap)
        # MoE models: the layers whose MLP is the MoE block (DeepSeek's first dense layers,
        # Llama 4's interleaved ones have none; a profile prices no dense MLP for them)
        self.Lm = int(moe_layers) if moe_layers is not None else self.L
        # Hybrid models: attention (and the ops of the attention block) in La layers, the
        # linear-attention ops in the other L - La; other models: La = L and no such ops.
        self.La = int(attention_layers) if attention_layers is not None else self.L
        # Sliding-window models: Lw of the La attention kernels see the last W tokens only
        # (AttentionTable.step_window), the other Lf the whole context.
        self.Lw = int(sliding_layers) if sliding_window else 0
        self.W = int(sliding_window) if self.Lw else 0
        self.Lf = self.La - self.Lw
        self.chunked = bool(chunked and self.Lw)
        self.dense_attn, self.dense_lin = dense_attention_layer or {}, dense_linear_layer or {}
        self.hidden = int(hidden_size)
        self.dtype_bytes = int(dtype_bytes)
        self.dense_layer, self.dense_count, self.dense_step = dense_layer, dense_layer_count, dense_step
        # (curves, count per layer, layers they run in) of the per-layer dense ops
        self._dense_groups = [(dense_layer, dense_layer_count, self.L)]
        if self.dense_attn or self.dense_lin:
            self._dense_groups += [(self.dense_attn, dense_attention_count or {}, self.La),
                                   (self.dense_lin, dense_linear_count or {}, self.L - self.La)]
        self.per_sequence = per_sequence
        self.attn = attention
        self.tp = tp
        self.allreduce = allreduce if tp > 1 else None
        self.ar_per_layer = allreduces_per_layer
        self.ar_per_step = allreduces_per_step
        self.logits_gather = logits_gather if tp > 1 else None
        self.vocab = int(vocab_size)
        self.moe, self.E, self.k, self.ep = moe, num_experts, top_k, ep
        self.ep_gather, self.ep_scatter = ep_gather, ep_scatter
        self.host_s = float(host_overhead_s)
        self.host_seq_s = float(host_overhead_per_seq_s)
        self.skew_alpha = float(skew_alpha)
        # (the decodes of steps with prefill work: their own alpha where the profile has one)
        self.skew_alpha_mixed = self.skew_alpha if skew_alpha_mixed is None else float(skew_alpha_mixed)
        self.source = source or {}
        self._ep_cache: dict[tuple[int, int], float] = {}
        self._precompute(int(max_tokens), int(max_seqs))

    # -- per-family times for T tokens / S sequences (seconds, whole model) ------------------
    def _dense_s(self, T: float) -> tuple[float, float]:
        layers = sum(sum(c(T) * counts.get(op, 1) for op, c in curves.items()) * n * US
                     for curves, counts, n in self._dense_groups)
        once = sum(c(T) for c in self.dense_step.values())
        return layers, once * US

    def _moe_s(self, T: float, N: float | None = None) -> tuple[float, float]:
        """(experts compute, expert-parallel communication) for T local tokens when the `ep`
        ranks bring N tokens in all (default: each as many as this one, N = ep·T, as when
        vLLM pads every data-parallel rank to the largest)."""
        if self.moe is None or T <= 0:
            return 0.0, 0.0
        ep = self.ep
        if ep == 1 or N is None:
            N = T * ep
        # The experts local to this rank (E/ep) see the tokens of all ranks (all-gather):
        # N·k/ep token-expert pairs, which the one-GPU table (all E experts) prices at N/ep tokens.
        active = expected_active_experts(self.E, self.k, N) / ep
        t = self.moe(N / ep, max(active, float(self.k) / ep)) * self.Lm * US
        comm = 0.0
        if ep > 1 and self.ep_gather is not None:
            total = N * self.hidden * self.dtype_bytes
            logits = N * self.E * 4  # fp32 router logits travel with the hidden states
            comm = (self.ep_gather.time_s(total + logits) + self.ep_scatter.time_s(total)) * self.Lm
        return t, comm

    def _tok_ep_s(self, T: int, N: int) -> float:
        """Token-dependent time of a step with T local tokens when the expert-parallel ranks
        bring N tokens in all."""
        if self.moe is None or self.ep == 1 or N == T * self.ep:
            return self._tok_s(T)
        key = (T, N)
        v = self._ep_cache.get(key)
        if v is None:
            layer, once = self._dense_s(T)
            moe, comm = self._moe_s(T, N)
            v = self._ep_cache[key] = layer + once + moe + comm + self._allreduce_s(T)
        return v

    def _allreduce_s(self, T: float) -> float:
        """Tensor-parallel all-reduces of T·hidden activations: `ar_per_layer` per layer
        (after o_proj and down_proj) and `ar_per_step` per step (vLLM's VocabParallelEmbedding
        all-reduces the embedded tokens)."""
        if self.allreduce is None or T <= 0:
            return 0.0
        n = self.ar_per_layer * self.L + self.ar_per_step
        return n * self.allreduce.time_s(T * self.hidden * self.dtype_bytes)

    def _per_seq_s(self, S: float) -> float:
        if S <= 0:
            return 0.0
        t = sum(c(S) for c in self.per_sequence.values()) * US
        if self.logits_gather is not None:
            # vLLM's LogitsProcessor all-gathers each rank's vocab shard of the logits (model
            # dtype) before sampling (use_all_gather() is true on CUDA).
            t += self.logits_gather.time_s(S * self.vocab * self.dtype_bytes)
        return t

    def _token_parts(self, T: float) -> dict[str, float]:
        layer, once = self._dense_s(T)
        moe, ep_comm = self._moe_s(T)
        return {"dense": layer, "dense_once": once, "moe": moe, "ep_comm": ep_comm, "allreduce": self._allreduce_s(T)}

    def _precompute(self, max_tokens: int, max_seqs: int) -> None:
        self._tok = [0.0] + [sum(self._token_parts(T).values()) for T in range(1, max_tokens + 1)]
        self._seq = [0.0] + [self._per_seq_s(S) for S in range(1, max_seqs + 1)]
        D = self.attn.D
        self._kd_axis = D.axes[1]
        nds = D.axes[0]
        self._drows = [None]
        for B in range(1, max_seqs + 1):
            lo, hi, t = _bracket(nds, B)
            r0, r1 = D.values[lo], D.values[hi]
            row = [(a + t * (b - a)) * self.Lf * US for a, b in zip(r0, r1)]
            self._drows.append(row)
        ks = self._kd_axis
        self._dslope = [0.0] + [(r[-1] - r[-2]) / (ks[-1] - ks[-2]) if len(ks) > 1 else 0.0 for r in self._drows[1:]]

    def _tok_s(self, T: int) -> float:
        tok = self._tok
        return tok[T] if T < len(tok) else sum(self._token_parts(T).values())

    def _seq_s(self, S: int) -> float:
        seq = self._seq
        return seq[S] if S < len(seq) else self._per_seq_s(S)

    # -- the LatencyModel interface ------------------------------------------------------------
    def _window_attn_s(self, chunks, nd: int, kd: float, kmax: float | None) -> tuple[float, float]:
        """(prefill, decode) attention of the sliding-window layers, s (0 without them)."""
        if not self.Lw:
            return 0.0, 0.0
        alpha = self.skew_alpha_mixed if chunks else self.skew_alpha
        pa, da = self.attn.step_window(chunks, nd, kd, kmax, alpha, self.W, self.chunked)
        return pa * self.Lw * US, da * self.Lw * US

    def _decode_attn_s(self, B: int, kd: float) -> float:
        """Decode-only attention of B requests with `kd` history each, all full-attention
        layers (s)."""
        if B >= len(self._drows):
            return self.attn.D(B, kd) * self.Lf * US
        row = self._drows[B]
        ks = self._kd_axis
        i = bisect_right(ks, kd)
        if i == 0:
            return row[0]
        if i < len(ks):
            x0 = ks[i - 1]
            return row[i - 1] + (row[i] - row[i - 1]) * (kd - x0) / (ks[i] - x0)
        return row[-1] + self._dslope[B] * (kd - ks[-1])

    def decode_step_time(self, num_decodes: int, decode_ctx_sum: int, decode_ctx_max: int | None = None,
                         ep_tokens: int | None = None) -> float:
        B = num_decodes
        if B <= 0:
            return self.host_s
        kd = decode_ctx_sum / B - 1.0  # history per decode (its KV read covers history + 1)
        a = self._decode_attn_s(B, kd)
        if decode_ctx_max is not None and self.skew_alpha and B > 1 and decode_ctx_max - 1 > kd:
            a += self.skew_alpha * (self._decode_attn_s(B, decode_ctx_max - 1.0) - a)
        if self.Lw:
            a += self._window_attn_s((), B, kd, None if decode_ctx_max is None else decode_ctx_max - 1.0)[1]
        tok = self._tok_s(B) if ep_tokens is None else self._tok_ep_s(B, ep_tokens)
        if self.async_overlap:
            dev = tok + self._seq_s(B) + a
            host = self.host_s + self.host_seq_s * B
            return host if host > dev else dev
        return tok + self._seq_s(B) + a + self.host_s + self.host_seq_s * B

    def step_time(self, prefill_chunks, num_decodes: int, decode_ctx_sum: int, num_sampled: int,
                  decode_ctx_max: int | None = None, ep_tokens: int | None = None) -> float:
        """`decode_ctx_max` (optional): the longest decode's context + 1, as `decode_ctx_sum`
        counts them; with it the profile's skew correction applies. `ep_tokens` (optional):
        the tokens of all expert-parallel ranks in this step (see `_moe_s`)."""
        if not prefill_chunks:
            return self.decode_step_time(num_decodes, decode_ctx_sum, decode_ctx_max, ep_tokens)
        T = num_decodes
        for n, _c in prefill_chunks:
            T += n
        S = len(prefill_chunks) + num_decodes
        kd = decode_ctx_sum / num_decodes - 1.0 if num_decodes else 0.0
        kmax = decode_ctx_max - 1.0 if decode_ctx_max is not None else None
        pa, da = self.attn.step(prefill_chunks, num_decodes, kd, kmax, self.skew_alpha_mixed)
        tok = self._tok_s(T) if ep_tokens is None else self._tok_ep_s(T, ep_tokens)
        if self.async_overlap:
            dev = tok + self._seq_s(S) + (pa + da) * self.Lf * US
            if self.Lw:
                dev += sum(self._window_attn_s(prefill_chunks, num_decodes, kd, kmax))
            host = self.host_s + self.host_seq_s * S
            return host if host > dev else dev
        t = (tok + self._seq_s(S) + (pa + da) * self.Lf * US
             + self.host_s + self.host_seq_s * S)
        if self.Lw:
            t += sum(self._window_attn_s(prefill_chunks, num_decodes, kd, kmax))
        return t

    def breakdown_step(self, prefill_chunks, num_decodes: int, decode_ctx_sum: int,
                       decode_ctx_max: int | None = None, ep_tokens: int | None = None) -> dict[str, float]:
        """Per-operator times (s) of one step, exact for the given chunks."""
        T = num_decodes + sum(n for n, _ in prefill_chunks)
        S = len(prefill_chunks) + num_decodes
        kd = decode_ctx_sum / num_decodes - 1.0 if num_decodes else 0.0
        parts: dict[str, float] = {}
        if T:
            for curves, counts, n in self._dense_groups:
                for op, c in curves.items():
                    parts[op] = c(T) * counts.get(op, 1) * n * US
            for op, c in self.dense_step.items():
                parts[op] = c(T) * US
            tp = self._token_parts(T)
            if ep_tokens is not None:
                tp["moe"], tp["ep_comm"] = self._moe_s(T, ep_tokens)
            for k in ("moe", "ep_comm", "allreduce"):
                if tp[k]:
                    parts[k] = tp[k]
            kmax = decode_ctx_max - 1.0 if decode_ctx_max is not None else None
            pa, da = self.attn.step(list(prefill_chunks), num_decodes, kd, kmax,
                                    self.skew_alpha_mixed if prefill_chunks else self.skew_alpha)
            parts["attn_prefill"] = pa * self.Lf * US
            parts["attn_decode"] = da * self.Lf * US
            if self.Lw:
                pw, dw = self._window_attn_s(list(prefill_chunks), num_decodes, kd, kmax)
                parts["attn_prefill"] += pw
                parts["attn_decode"] += dw
            for op, c in self.per_sequence.items():
                parts[op] = c(S) * US
            if self.logits_gather is not None:
                parts["logits_all_gather"] = self.logits_gather.time_s(S * self.vocab * self.dtype_bytes)
        host = self.host_s + self.host_seq_s * S
        if self.async_overlap:  # only the host time the device's step does not hide shows
            dev = sum(parts.values())
            parts["host"] = host - dev if host > dev else 0.0
            parts["total"] = host if host > dev else dev
            return parts
        parts["host"] = host
        parts["total"] = sum(parts.values())
        return parts

    def time_of(self, f: StepFeatures) -> float:
        return self.step_time(_chunks_of(f), f.num_decodes, f.decode_ctx_sum, f.num_sampled)

    def breakdown(self, f: StepFeatures) -> dict[str, float]:
        """Per-operator times (s). StepFeatures keep only sums of the prefill chunks, so the
        chunks are taken as equal (exact for zero or one chunk; `breakdown_step` is exact)."""
        return self.breakdown_step(_chunks_of(f), f.num_decodes, f.decode_ctx_sum)

    def describe(self) -> dict:
        d = {"kind": self.kind, "tp": self.tp, "num_layers": self.L, "host_overhead_s": self.host_s,
             "host_overhead_per_seq_s": self.host_seq_s, "skew_alpha": self.skew_alpha,
             **({"skew_alpha_mixed": self.skew_alpha_mixed} if self.skew_alpha_mixed != self.skew_alpha else {}),
             **({"async_overlap": True} if self.async_overlap else {}),  # (only when on, as the roofline's)
             "dense_ops": {op: c.interp for op, c in {**self.dense_layer, **self.dense_attn, **self.dense_lin,
                                                      **self.dense_step}.items()}}
        if self.La != self.L:
            d["attention_layers"] = self.La
        if self.Lw:
            d["chunked_attention" if self.chunked else "sliding_window"] = {"layers": self.Lw, "window": self.W}
        if self.allreduce is not None:
            d["allreduce"] = {**self.allreduce.describe(), "per_layer": self.ar_per_layer, "per_step": self.ar_per_step}
        if self.logits_gather is not None:
            d["logits_all_gather"] = self.logits_gather.describe()
        if self.moe is not None:
            d["moe"] = {"num_experts": self.E, "top_k": self.k, "expert_parallel": self.ep}
            if self.ep_gather is not None:
                d["moe"]["dispatch"] = self.ep_gather.describe()
                d["moe"]["combine"] = self.ep_scatter.describe()
        if self.source:
            d["source"] = self.source
        return d

    # -- construction from a profile ---------------------------------------------------------
    @classmethod
    def from_profile(cls, spec: dict, model, tp: int = 1, link=None, profile: dict | None = None,
                     base_dir: str | os.PathLike | None = None, host_overhead_s: float | None = None,
                     host_overhead_per_seq_s: float | None = None, max_tokens: int = 8192,
                     max_seqs: int = 1024, async_overlap: bool = False) -> "OperatorModel":
        """Build from a profile's `latency_model:` mapping (kind operators) for the served
        `model` (a ModelArch) at tensor-parallel degree `tp`; `link` is the device's
        intra-node link, used where no collective curve was measured; `async_overlap`: the host
        overhead overlaps the device's step (see the module doc)."""
        check_model(spec, model)
        degrees = [int(x) for x in spec.get("tp_degrees", [1])]
        if tp not in degrees:
            raise ValueError(f"profile has operator tables for tensor_parallel_size {degrees}, not {tp}")
        if isinstance(spec.get("tables"), dict):
            source = spec["tables"]  # in memory, as an importer returns them
        else:
            source = resolve_tables_dir(spec, profile, base_dir)
        tables = load_tables(source, tp)
        ops = spec.get("operators", {})
        by_tp = ops.get("interp_by_tp") or {}
        interp = by_tp.get(tp) or by_tp.get(str(tp)) or ops.get("interp", {})
        counts = {k: int(v) for k, v in ops.get("per_layer", {}).items()}
        # hybrid models: ops of the attention block in the model's attention layers only, the
        # linear-attention ops in the others
        attn_counts = {k: float(v) for k, v in (ops.get("per_attention_layer") or {}).items()}
        lin_counts = {k: float(v) for k, v in (ops.get("per_linear_layer") or {}).items()}
        if (attn_counts or lin_counts) and not model.linear_layers:
            raise ValueError(f"the profile is of a hybrid (linear + full attention) model; {model.name} has no "
                             "linear-attention layers")
        if model.linear_layers and not lin_counts:
            raise ValueError(f"{model.name} has {model.linear_layers} linear-attention layers; the profile has no "
                             "linear-attention operator")
        per_step = set(ops.get("per_step", {}))
        dense_layer, dense_step, dense_attn, dense_lin = {}, {}, {}, {}
        for op, pts in tables["dense"].items():
            c = Curve([p[0] for p in pts], [p[1] for p in pts], interp.get(op, "linear"))
            if op in per_step:
                dense_step[op] = c
            elif op in counts:
                dense_layer[op] = c
            elif op in attn_counts:
                dense_attn[op] = c
            elif op in lin_counts:
                dense_lin[op] = c
        found = {**dense_layer, **dense_step, **dense_attn, **dense_lin}
        missing = [op for op in [*counts, *per_step, *attn_counts, *lin_counts] if op not in found]
        if missing:
            raise ValueError(f"operator tables lack {missing} for tp={tp}")
        per_seq = {op: Curve([p[0] for p in pts], [p[1] for p in pts], interp.get(op, "linear"))
                   for op, pts in tables["per_sequence"].items()}
        attention = AttentionTable(tables["attention"])
        coll = spec.get("collectives", {}) or {}
        allreduce = collective_from_spec("all_reduce", tp, coll.get("all_reduce"), link) if tp > 1 else None
        tp_gather = collective_from_spec("all_gather", tp, coll.get("all_gather"), link) if tp > 1 else None
        moe = None
        E = k = 0
        ep = 1
        gather = scatter = None
        if model.is_moe:
            if not tables["moe"]:
                raise ValueError(f"{model.name} is a mixture-of-experts model but the profile has no MoE table")
            moe = MoETable(tables["moe"])
            E, k = model.num_experts, model.num_experts_per_tok
            ep = int((spec.get("moe") or {}).get("expert_parallel", 1))
            if ep > 1:
                gather = collective_from_spec("all_gather", ep, coll.get("all_gather"), link)
                scatter = collective_from_spec("reduce_scatter", ep, coll.get("reduce_scatter"), link)
        skew = spec.get("skew") or {}
        alphas = skew.get("alpha") or {}
        alpha = float(alphas.get(tp, alphas.get(str(tp), 0.0)) or 0.0)
        mixed = skew.get("alpha_mixed") or {}  # (optional: steps with prefill work; else alpha)
        alpha_mixed = mixed.get(tp, mixed.get(str(tp))) if mixed else None
        host = spec.get("host_overhead_s", 0.0) if host_overhead_s is None else host_overhead_s
        host_seq = spec.get("host_overhead_per_seq_s", 0.0) if host_overhead_per_seq_s is None else host_overhead_per_seq_s
        return cls(num_layers=model.num_layers, hidden_size=model.hidden_size, dtype_bytes=model.dtype_bytes,
                   dense_layer=dense_layer, dense_layer_count=counts, dense_step=dense_step, per_sequence=per_seq,
                   attention=attention, tp=tp, allreduce=allreduce,
                   allreduces_per_layer=int(spec.get("allreduces_per_layer", 2)),
                   allreduces_per_step=int(spec.get("allreduces_per_step", 1)), logits_gather=tp_gather,
                   vocab_size=padded_vocab(model.vocab_size, tp), moe=moe, num_experts=E,
                   top_k=k, ep=ep, ep_gather=gather, ep_scatter=scatter, host_overhead_s=float(host or 0.0),
                   host_overhead_per_seq_s=float(host_seq or 0.0), skew_alpha=alpha,
                   skew_alpha_mixed=None if alpha_mixed is None else float(alpha_mixed), max_tokens=max_tokens,
                   max_seqs=max_seqs,
                   source={k2: spec[k2] for k2 in ("provenance_note",) if k2 in spec},
                   attention_layers=model.attention_layers, dense_attention_layer=dense_attn,
                   dense_attention_count=attn_counts, dense_linear_layer=dense_lin, dense_linear_count=lin_counts,
                   sliding_layers=model.local_layers, sliding_window=model.local_span,
                   chunked=bool(model.local_layers and not model.sliding_window),
                   moe_layers=model.moe_layers if model.is_moe else None, async_overlap=async_overlap)


def padded_vocab(vocab: int, tp: int, pad: int = 64) -> int:
    """The vocabulary vLLM shards (VocabParallelEmbedding pads it to a multiple of 64 first)."""
    return -(-int(vocab) // pad) * pad if tp > 1 else int(vocab)


_SHAPE_KEYS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "num_experts",
               "moe_intermediate_size")


def check_model(spec: dict, model) -> None:
    """The served model must have the shapes the tables were measured for (layers may differ)."""
    want = spec.get("model_shape") or {}
    bad = [f"{k}: profile {want[k]}, model {getattr(model, k)}" for k in _SHAPE_KEYS
           if k in want and int(want[k]) != int(getattr(model, k))]
    if bad:
        raise ValueError(f"operator profile was measured for another model shape ({'; '.join(bad)})")


def _chunks_of(f: StepFeatures) -> list[tuple[int, int]]:
    if not f.num_prefills:
        return []
    k = f.num_prefills
    n = f.prefill_tokens / k
    c = max(f.prefill_kv / k - n, 0.0)
    return [(n, c)] * k
