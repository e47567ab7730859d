"""Fit the simulator's step-time model to attributed steps, choosing the model by CV error.

The simulator advances an engine step by its *period*: from one step's start to the next's
(schedule, execute, sample, output processing). The log times two parts of it differently,
so they are fitted as two parts:

- execute: the logged `elapsed_ms` of each step (execute + sample), linear in the step
  features of `simulator.latency.base.StepFeatures`. Candidate families (least squares,
  non-negative least squares, a Huber-loss fit; absolute or relative error; several
  feature subsets) are compared by K-fold cross-validation grouped by experiment (steps of
  one experiment never sit on both sides of a split); the family with the lowest CV mean
  absolute percentage error (MAPE) plus the largest CV aggregate bias over step kinds
  (|Σ predicted / Σ measured - 1| for prefill, decode and mixed steps: the simulator adds
  steps up) wins, among those with no negative coefficient (a negative
  cost per token is unphysical and extrapolates badly).
- host: period - execute, the per-step host overhead. Single steps' periods are too noisy
  (log lines are stamped when the API server gets round to them, often in bursts), so it is
  fitted on windows of consecutive back-to-back steps: over a window, the sum of periods is
  the difference of the end stamps, exactly. Model: a constant per step plus a term per
  scheduled request (and per sampled token, if CV prefers it).

The result is one `LinearStepModel` (intercept = execute intercept + host constant; the
host's per-request term is added to `num_seqs`), plus each part's CV error, and the error of
the whole step period on held-out windows. numpy and scipy only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares, nnls

from simulator.latency.linear import BASE_FEATURES, IDLE_FEATURE, IDLE_WAKE_AFTER_S, KNEE_FEATURES, KNEES

from .attribution import fill_idle_gaps

CORE = ("prefill_tokens", "prefill_attn", "num_decodes", "decode_ctx_sum", "num_seqs")
MINIMAL = ("prefill_tokens", "num_decodes", "decode_ctx_sum")
HOST_FEATURES = ("num_steps", "num_seqs", "num_sampled")


class FitError(ValueError):
    """Not enough (or unusable) data to fit (user error: profile more)."""


@dataclass(frozen=True)
class Family:
    """A model family: which features, which solver, which error it minimises."""

    name: str
    features: tuple[str, ...]
    solver: str  # "nnls" | "ols" | "huber"
    relative: bool  # minimise relative (True) or absolute error


def execute_families(idle: bool = True) -> list[Family]:
    """Candidate models. `knees` adds min(tokens, K) terms (simulator.latency.linear): a
    per-token cost that may fall as the step's token count grows; `+idle` adds idle_start, the
    extra cost of a step that wakes an engine with no request (cross-validation decides; not
    with `idle=False`, for steps that do not say whether the engine was idle before them)."""
    fams = []
    knees = BASE_FEATURES + KNEE_FEATURES
    subsets = (("core", CORE), ("all", BASE_FEATURES), ("knees", knees))
    if idle:
        subsets += (("all+idle", BASE_FEATURES + (IDLE_FEATURE,)), ("knees+idle", knees + (IDLE_FEATURE,)))
    for subset_name, feats in (("minimal", MINIMAL),) + subsets:
        fams.append(Family(f"nnls-rel/{subset_name}", feats, "nnls", True))
    for subset_name, feats in subsets:
        fams.append(Family(f"nnls-abs/{subset_name}", feats, "nnls", False))
        fams.append(Family(f"huber-abs/{subset_name}", feats, "huber", False))
        fams.append(Family(f"ols-rel/{subset_name}", feats, "ols", True))
        fams.append(Family(f"huber-rel/{subset_name}", feats, "huber", True))
    return fams


def host_families() -> list[Family]:
    return [
        Family("nnls-abs/const", ("num_steps",), "nnls", False),
        Family("nnls-abs/const+seqs", ("num_steps", "num_seqs"), "nnls", False),
        Family("nnls-abs/const+seqs+sampled", HOST_FEATURES, "nnls", False),
    ]


# -- solving -----------------------------------------------------------------------------------


def solve(fam: Family, X: np.ndarray, y: np.ndarray, intercept: bool = True) -> np.ndarray:
    """Weights [intercept, w_1..w_k] (intercept 0 when not fitted) minimising the family's loss."""
    A = np.hstack([np.ones((len(y), 1)), X]) if intercept else X
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    A = A / scale
    b = y.astype(float)
    if fam.relative:
        w = 1.0 / np.maximum(np.abs(y), 1e-12)
        A, b = A * w[:, None], b * w
    if fam.solver == "ols":
        coef = np.linalg.lstsq(A, b, rcond=None)[0]
    elif fam.solver == "nnls":
        coef = nnls(A, b, maxiter=50 * A.shape[1])[0]
    elif fam.solver == "huber":
        x0 = nnls(A, b, maxiter=50 * A.shape[1])[0]
        # f_scale: residuals beyond 5 % (relative) or 5 % of the median (absolute) count linearly.
        f_scale = 0.05 if fam.relative else 0.05 * float(np.median(np.abs(b))) or 1.0
        coef = least_squares(lambda c: A @ c - b, x0, bounds=(0.0, np.inf), loss="huber",
                             f_scale=f_scale).x
    else:
        raise ValueError(f"unknown solver {fam.solver!r}")
    # A term that adds under a millionth of the largest target anywhere in the data is solver
    # residue (Huber's iterations leave 1e-20-sized weights), not a cost: drop it.
    coef[np.abs(coef) < 1e-6 * float(np.abs(y).max())] = 0.0
    coef = coef / scale
    return coef if intercept else np.concatenate([[0.0], coef])


def predict(coef: np.ndarray, X: np.ndarray) -> np.ndarray:
    return coef[0] + X @ coef[1:]


# -- cross-validation --------------------------------------------------------------------------


def group_folds(groups: list[str], k: int, seed: int = 0) -> list[np.ndarray]:
    """Test-index arrays of k folds; every group lies in exactly one fold. Deterministic:
    groups are ordered by name, shuffled with `seed`, dealt round-robin."""
    names = sorted(set(groups))
    if len(names) < 2:
        raise FitError(f"cross-validation needs at least 2 experiments, got {len(names)}")
    k = min(k, len(names))
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of = {names[j]: i % k for i, j in enumerate(order)}
    g = np.array([fold_of[x] for x in groups])
    return [np.flatnonzero(g == i) for i in range(k)]


def errors(pred: np.ndarray, y: np.ndarray) -> dict:
    ape = np.abs(pred - y) / np.maximum(np.abs(y), 1e-12)
    return {"mape": float(ape.mean()), "p90_ape": float(np.quantile(ape, 0.9)), "n": int(len(y)),
            "total_err": float(pred.sum() / y.sum() - 1.0) if y.sum() else float("nan")}


@dataclass
class CVResult:
    family: Family
    mape: float
    p90_ape: float
    pred: np.ndarray  # out-of-fold predictions
    negative: bool  # the fit on all data has a negative coefficient
    total_err: float = float("nan")  # Σ out-of-fold predictions / Σ measured - 1 (bias)
    worst_bias: float = float("nan")  # the largest per-kind total error (= total_err without kinds)

    def to_dict(self) -> dict:
        return {"family": self.family.name, "score": _r(score(self)), "cv_mape": _r(self.mape), "cv_p90_ape": _r(self.p90_ape),
                "cv_total_error": _r(self.total_err), "cv_worst_kind_total_error": _r(self.worst_bias),
                "negative_coefficients": self.negative}


def cross_validate(fam: Family, X: np.ndarray, y: np.ndarray, folds: list[np.ndarray],
                   intercept: bool = True, kinds: np.ndarray | None = None) -> CVResult:
    """Out-of-fold errors of a family. With `kinds` (a label per sample) the bias is the
    worst of the per-kind total errors, so no kind of step may be off in sum."""
    pred = np.empty_like(y, dtype=float)
    for test in folds:
        train = np.setdiff1d(np.arange(len(y)), test)
        pred[test] = predict(solve(fam, X[train], y[train], intercept), X[test])
    e = errors(pred, y)
    bias = e["total_err"]
    if kinds is not None:
        for k in np.unique(kinds):
            m = kinds == k
            ek = errors(pred[m], y[m])["total_err"]
            if abs(ek) > abs(bias):
                bias = ek
    full = solve(fam, X, y, intercept)
    return CVResult(fam, e["mape"], e["p90_ape"], pred, bool((full < -1e-15).any()), e["total_err"], bias)


def score(r: CVResult) -> float:
    """Per-step error plus aggregate bias: the simulator sums steps, so a family that is
    right step by step but low on the whole (a relative loss leans low), or low on decode
    steps and high on prefills, must not win."""
    b = r.worst_bias if math.isfinite(r.worst_bias) else r.total_err
    return r.mape + (abs(b) if math.isfinite(b) else 0.0)


def choose(results: list[CVResult]) -> CVResult:
    """Lowest score (CV MAPE + |CV total error|) among families with no negative
    coefficient; ties go to lower p90, then fewer features."""
    ok = [r for r in results if not r.negative] or results
    return min(ok, key=lambda r: (round(score(r), 6), r.p90_ape, len(r.family.features)))


# -- the two parts -----------------------------------------------------------------------------


_KNEE_OF = dict(zip(KNEE_FEATURES, KNEES))


def feature_value(row, name: str) -> float:
    """A step feature of a record (attribute), a token knee computed from it, or idle_start:
    1 when the engine had had no request for IDLE_WAKE_AFTER_S before the step (a step
    whose previous one is unknown counts as such)."""
    if name == IDLE_FEATURE:
        return 0.0 if row.busy or (row.idle_s is not None and row.idle_s < IDLE_WAKE_AFTER_S) else 1.0
    k = _KNEE_OF.get(name)
    if k is not None:
        return float(min(row.prefill_tokens + row.num_decodes, k))
    return float(getattr(row, name))


def feature_matrix(rows, features: tuple[str, ...]) -> np.ndarray:
    return np.array([[feature_value(r, f) for f in features] for r in rows], dtype=float).reshape(len(rows), len(features))


@dataclass
class Window:
    """Consecutive back-to-back steps: the sum of their periods is known exactly."""

    experiment: str
    rows: list
    period_s: float  # t(last) - t(step before first)

    @property
    def execute_s(self) -> float:
        return sum(r.elapsed_ms for r in self.rows) / 1000.0

    def host_features(self) -> list[float]:
        return [len(self.rows), sum(r.num_seqs for r in self.rows), sum(r.num_sampled for r in self.rows)]


def busy_windows(rows, size: int = 16, min_size: int = 6) -> list[Window]:
    """Windows of up to `size` consecutive busy steps (each following the previous step
    straight away, per the mirror), per experiment; shorter tails of >= min_size are kept."""
    by_exp: dict[str, list] = {}
    for r in rows:
        by_exp.setdefault(r.experiment, []).append(r)
    out = []
    for exp in sorted(by_exp):
        rs = sorted(by_exp[exp], key=lambda r: r.iteration)
        run: list = []
        prev = None
        for r in rs:
            if r.busy and prev is not None and r.iteration == prev.iteration + 1:
                if not run:
                    start = prev
                run.append(r)
                if len(run) == size:
                    out.append(Window(exp, run, run[-1].t_s - start.t_s))
                    run, start = [], r
            else:
                if len(run) >= min_size:
                    out.append(Window(exp, run, run[-1].t_s - start.t_s))
                run = []
            prev = r
        if len(run) >= min_size:
            out.append(Window(exp, run, run[-1].t_s - start.t_s))
    return out


@dataclass
class StepFit:
    """The fitted step model and everything the profile reports about it."""

    intercept: float
    coefficients: dict[str, float]
    execute: CVResult
    execute_coef: np.ndarray
    host: CVResult | None
    host_coef: np.ndarray | None
    candidates: list[CVResult]
    host_candidates: list[CVResult]
    folds: int
    n_steps: int
    n_windows: int
    step_period: dict | None
    by_kind: dict = field(default_factory=dict)
    excluded: dict = field(default_factory=dict)
    host_abs: dict = field(default_factory=dict)  # host errors in seconds and against the period

    def describe(self) -> dict:
        parts = {
            "execute": {"what": "logged elapsed_ms per step (execute + sample)",
                        "family": self.execute.family.name, "features": list(self.execute.family.features),
                        "cv_mape": _r(self.execute.mape), "cv_p90_ape": _r(self.execute.p90_ape),
                        "cv_total_error": _r(self.execute.total_err), "n_samples": self.n_steps, "intercept_s": _r(self.execute_coef[0], 9),
                        "by_step_kind": self.by_kind},
        }
        if self.host is not None:
            parts["host"] = {"what": "period - execute per step, fitted on windows of back-to-back steps",
                             "family": self.host.family.name, "features": list(self.host.family.features),
                             "cv_mape": _r(self.host.mape), "cv_p90_ape": _r(self.host.p90_ape),
                             "cv_total_error": _r(self.host.total_err), **self.host_abs,
                             "n_samples": self.n_windows,
                             "coefficients_s": {f: _r(c, 9) for f, c in
                                                zip(self.host.family.features, self.host_coef[1:])}}
        else:
            parts["host"] = {"what": "not fitted: no windows of back-to-back steps", "n_samples": 0}
        if self.step_period is not None:
            parts["step_period"] = self.step_period
        return {
            "family": self.execute.family.name,
            "features": list(self.execute.family.features),
            "cv_mape": _r(self.execute.mape),
            "cv_p90_ape": _r(self.execute.p90_ape),
            "folds": self.folds,
            "n_samples": self.n_steps,
            "parts": parts,
            "candidates": [c.to_dict() for c in self.candidates],
            "host_candidates": [c.to_dict() for c in self.host_candidates],
            "excluded_steps": self.excluded,
        }


def fit_steps(rows, folds: int = 5, seed: int = 0, window: int = 16, max_other_cpu: float | None = 0.25) -> StepFit:
    """Fit execute and host parts to attributed steps. Left out: warm-up steps, and steps of
    experiments during which other programs used more than `max_other_cpu` cores (None: keep)."""
    fill_idle_gaps(rows)
    attempts = least_contended_attempts(rows)
    retried = [r for r in rows if r.experiment not in attempts]
    rows = [r for r in rows if r.experiment in attempts]
    contended = [r for r in rows if max_other_cpu is not None and r.other_cpu > max_other_cpu]
    kept_all = len(contended) > len(rows) / 2
    if kept_all:
        contended = []  # a machine busy all along: fitting on half the grid would be worse
    bad = {id(r) for r in contended}
    used = [r for r in rows if r.kind != "warmup" and r.elapsed_ms > 0 and id(r) not in bad]
    excluded = {"warmup": sum(1 for r in rows if r.kind == "warmup"),
                "non-positive elapsed": sum(1 for r in rows if r.kind != "warmup" and r.elapsed_ms <= 0),
                "other attempts of a re-run experiment": len(retried),
                "contended": len(contended), "max_other_cpu": max_other_cpu,
                "contention_filter_off": kept_all}
    if len(used) < 10:
        raise FitError(f"only {len(used)} usable steps; profile more (the full grid gives hundreds)")
    y = np.array([r.elapsed_ms for r in used]) / 1000.0
    groups = [r.experiment for r in used]
    fold_idx = group_folds(groups, folds, seed)
    cands = []
    kinds = np.array([r.kind for r in used])
    for fam in execute_families():
        X = feature_matrix(used, fam.features)
        cands.append(cross_validate(fam, X, y, fold_idx, kinds=kinds))
    best = choose(cands)
    Xb = feature_matrix(used, best.family.features)
    ecoef = solve(best.family, Xb, y)
    by_kind = {}
    for kind in ("prefill", "decode", "mixed"):
        m = np.array([r.kind == kind for r in used])
        if m.any():
            e = errors(best.pred[m], y[m])
            by_kind[kind] = {"cv_mape": _r(e["mape"]), "cv_p90_ape": _r(e["p90_ape"]),
                             "cv_total_error": _r(e["total_err"]), "n": e["n"]}

    wins = busy_windows(used, size=window)
    host = hcoef = None
    hcands: list[CVResult] = []
    step_period = None
    if len({w.experiment for w in wins}) >= 2:
        H = np.array([w.host_features() for w in wins])
        hy = np.array([w.period_s - w.execute_s for w in wins])
        wfolds = group_folds([w.experiment for w in wins], folds, seed)
        for fam in host_families():
            cols = [HOST_FEATURES.index(f) for f in fam.features]
            hcands.append(cross_validate(fam, H[:, cols], hy, wfolds, intercept=False))
        host = choose(hcands)
        cols = [HOST_FEATURES.index(f) for f in host.family.features]
        hcoef = solve(host.family, H[:, cols], hy, intercept=False)
        step_period = _step_period_cv(used, y, best.family, wins, host.family, folds, seed)
        steps = H[:, 0]
        periods = np.array([w.period_s for w in wins])
        host_abs = {"cv_mae_per_step_s": _r(float(np.mean(np.abs(host.pred - hy) / steps)), 4),
                    "cv_mean_abs_error_vs_period": _r(float(np.mean(np.abs(host.pred - hy) / periods))),
                    "mean_host_per_step_s": _r(float(np.sum(hy) / np.sum(steps)), 4)}
    else:
        host_abs = {}

    intercept, coefs = _combine(best.family, ecoef, host.family if host else None, hcoef)
    return StepFit(intercept, coefs, best, ecoef, host, hcoef, cands, hcands, len(fold_idx), len(used),
                   len(wins), step_period, by_kind, excluded, host_abs)


def least_contended_attempts(rows) -> set[str]:
    """The experiment names to fit: of an experiment and its re-runs (`NAME~retryK`), the
    attempt during which other programs used the least CPU (the first one on ties)."""
    other: dict[str, float] = {}
    for r in rows:
        other.setdefault(r.experiment, r.other_cpu)
    best: dict[str, str] = {}
    for name, oc in other.items():
        base = RETRY_SUFFIX.sub("", name)
        if base not in best or oc < other[best[base]]:
            best[base] = name
    return set(best.values())


RETRY_SUFFIX = re.compile(r"~retry\d+$")


def _combine(efam: Family, ecoef: np.ndarray, hfam: Family | None, hcoef: np.ndarray | None):
    coefs = {f: float(c) for f, c in zip(efam.features, ecoef[1:])}
    intercept = float(ecoef[0])
    if hfam is not None:
        for f, c in zip(hfam.features, hcoef[1:]):
            if f == "num_steps":
                intercept += float(c)
            else:
                coefs[f] = coefs.get(f, 0.0) + float(c)
    return intercept, {f: c for f, c in coefs.items() if c != 0.0}


def _step_period_cv(used, y, efam: Family, wins: list[Window], hfam: Family, folds: int, seed: int) -> dict:
    """Held-out error of the whole model on windows: both parts refitted without the test
    experiments, then Σ predicted periods vs the measured span of each test window."""
    exps = sorted({r.experiment for r in used})
    fold_idx = group_folds(exps, folds, seed)
    fold_of = {}
    for i, test in enumerate(fold_idx):
        for j in test:
            fold_of[exps[j]] = i
    Xe = feature_matrix(used, efam.features)
    cols = [HOST_FEATURES.index(f) for f in hfam.features]
    H = np.array([w.host_features() for w in wins])[:, cols]
    hy = np.array([w.period_s - w.execute_s for w in wins])
    span = np.array([w.period_s for w in wins])
    pred = np.empty(len(wins))
    row_fold = np.array([fold_of[r.experiment] for r in used])
    win_fold = np.array([fold_of[w.experiment] for w in wins])
    for i in range(len(fold_idx)):
        tr = row_fold != i
        ec = solve(efam, Xe[tr], y[tr])
        wtr = win_fold != i
        hc = solve(hfam, H[wtr], hy[wtr], intercept=False) if wtr.any() else np.zeros(len(cols) + 1)
        for j in np.flatnonzero(win_fold == i):
            Xw = feature_matrix(wins[j].rows, efam.features)
            pred[j] = predict(ec, Xw).sum() + H[j] @ hc[1:]
    e = errors(pred, span)
    host_share = float(np.sum(hy) / np.sum(span))
    return {"what": "sum of step periods over held-out windows of back-to-back steps (what the simulator advances)",
            "cv_mape": _r(e["mape"]), "cv_p90_ape": _r(e["p90_ape"]), "cv_total_error": _r(e["total_err"]),
            "n_samples": e["n"], "host_share_of_period": _r(host_share)}


def _r(x: float, digits: int = 4) -> float:
    x = float(x)
    if not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")
