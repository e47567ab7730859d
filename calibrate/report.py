"""A calibrated profile described for people: the Markdown section docs/calibration.md keeps
per profile (what was fitted, on how many steps, how well, under what contention), printed by
`asim-calibrate show PROFILE.yaml --markdown`."""

from __future__ import annotations


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _spct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f} %".replace("-", "−")


def _part_cell(p: dict) -> str:
    return f"{_pct(p.get('cv_mape'))} / {_pct(p.get('cv_p90_ape'))} / {_spct(p.get('cv_total_error'))}"


def profile_markdown(profile: dict) -> list[str]:
    """The profile's section: a summary list, the per-part error table, the model."""
    lm = profile["latency_model"]
    fit = lm["fit"]
    parts = fit["parts"]
    prov = profile.get("provenance", {})
    ex = fit.get("excluded_steps", {})
    attr = fit.get("attribution", {})
    timing = prov.get("profiling_time_s", {})
    cont = prov.get("contention", {})
    left = [f"{ex.get('other attempts of a re-run experiment', 0)} steps of more contended attempts",
            f"{ex.get('contended', 0)} contended steps"
            + (" (filter off: most quietest attempts were still contended)" if ex.get("contention_filter_off") else ""),
            f"{ex.get('warmup', 0)} warm-up steps"]
    lines = [f"### `{profile['name']}.yaml`", "",
             f"- family `{fit['family']}` (features {', '.join(fit.get('features', []))}), {fit.get('folds', 5)}-fold CV "
             f"grouped by experiment, {fit['n_samples']} steps fitted; left out: {', '.join(left)}",
             f"- attribution: {attr.get('steps_attributed', '?')} steps attributed, {attr.get('mirror_mismatches', '?')} "
             f"mirror mismatches, {sum((attr.get('lines_discarded') or {}).values())} log lines discarded, "
             f"{attr.get('prefix_hits_checked', '?')} prefix-cache hits checked against the server's"]
    if timing:
        lines.append(f"- profiling: {timing.get('total_s', 0):.0f} s in all (server start {timing.get('server_startup_s', 0):.0f} s, "
                     f"grid {timing.get('grid_s', 0):.0f} s: {timing.get('experiments', '?')} experiments, "
                     f"{timing.get('experiment_runs', '?')} runs with re-runs); other programs used "
                     f"{cont.get('mean_other_cpu', 0):.2f} cores on average, {cont.get('runs_over', 0)} runs over "
                     f"{cont.get('max_other_cpu', 0.25)}")
    fe = parts.get("frontend") or {}
    if fe.get("n_samples"):
        split = (f" (way in {1e3 * fe['frontend_in_s']:.2f} ms, way out {1e3 * fe['frontend_out_s']:.2f} ms)"
                 if "frontend_in_s" in fe else "")
        cont = fe.get("contention") or {}
        busy = f"; other programs used {cont['other_cpu']:.2f} cores meanwhile" if "other_cpu" in cont else ""
        lines.append(f"- frontend: {1e3 * fe['frontend_s']:.2f} ms{split}, median of {fe['n_samples']} probe calls "
                     f"(p10–p90 {1e3 * fe.get('p10_s', 0):.2f}–{1e3 * fe.get('p90_s', 0):.2f} ms{busy})")
    lines += ["", "| part | CV MAPE / p90 APE / total error | n |", "|---|---|---|"]
    ex_part = parts.get("execute", {})
    if "cv_mape" in ex_part:
        lines.append(f"| execute (all steps) | {_part_cell(ex_part)} | {ex_part.get('n_samples', '')} |")
    for kind, e in ex_part.get("by_step_kind", {}).items():
        lines.append(f"| execute, {kind} steps | {_part_cell(e)} | {e.get('n', '')} |")
    h = parts.get("host", {})
    if "cv_mape" in h:
        extra = ""
        if "cv_mae_per_step_s" in h:
            extra = (f"; mean {1e3 * h['mean_host_per_step_s']:.2f} ms/step, CV mean abs error "
                     f"{1e3 * h['cv_mae_per_step_s']:.2f} ms/step = {100 * h['cv_mean_abs_error_vs_period']:.1f} % of the period")
        lines.append(f"| host (period − execute) | {_part_cell(h)}{extra} | {h.get('n_samples', '')} windows |")
    sp = parts.get("step_period", {})
    if "cv_mape" in sp:
        lines.append(f"| step period (whole model) | {_part_cell(sp)} | {sp.get('n_samples', '')} windows |")
    ops = parts.get("operators", {})
    for name, o in (ops.get("families") or {}).items() if ops.get("available") else ():
        if o.get("cv_mape") is None:
            continue  # a family this engine's profiler does not separate
        lines.append(f"| operator {name} ({100 * o['share_of_step']:.0f} % of a profiled step) | "
                     f"{_pct(o.get('cv_mape'))} / {_pct(o.get('cv_p90_ape'))} | {o.get('n_samples', '')} |")
    coef = ", ".join(f"{k} {v:.3g}" for k, v in lm["coefficients"].items())
    share = sp.get("host_share_of_period")
    lines += ["", (f"host share of the period: {100 * share:.1f} %; " if share is not None else "")
              + f"model: intercept {lm['intercept']:.6f} s, {coef}"]
    return lines
