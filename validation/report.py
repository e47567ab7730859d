"""Reports of a comparison: errors.json, report.md and a self-contained report.html.

Formatters return strings or lists of lines and print nothing; `write_report` writes the
files and the CLI prints. The warnings come first in every report, so nobody reads an error
table without the reasons not to trust it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from .compare import LATENCY_METRICS, SCALAR_METRICS, STATS, Run, pair_calls

PAIRED_LABELS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"), ("jct", "program JCT"))


# -- numbers -------------------------------------------------------------------------------------

def fmt_value(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,d}"
    x = float(x)
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_error(row: dict) -> str:
    e = row.get("error")
    if e is None:
        return "-"
    kind = row.get("error_kind", "relative")
    if kind == "relative":
        return f"{100 * e:+.1f}%"
    if kind == "points":
        return f"{e:+.1f} pts"
    return f"{e:+.0f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def signed_pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


# -- tables as rows -------------------------------------------------------------------------------

def aggregate_rows(errors: dict, stats=STATS) -> list[tuple[str, ...]]:
    """(metric, stat, measured, simulated, error, measured spread) for every aggregate, formatted.
    The spread is the repeated measurements' (max - min) / median; "-" with one measurement."""
    rows = []
    for key, label, unit in LATENCY_METRICS:
        for st in stats:
            r = errors["metrics"][key][st]
            rows.append((f"{label} ({unit})", st, fmt_value(r["measured"]), fmt_value(r["simulated"]), fmt_error(r),
                         _pct(r.get("noise"))))
    for key, label, unit in SCALAR_METRICS:
        st, r = next(iter(errors["metrics"][key].items()))
        rows.append((f"{label} ({unit})", st, fmt_value(r["measured"]), fmt_value(r["simulated"]), fmt_error(r),
                     _pct(r.get("noise"))))
    return rows


def paired_rows(errors: dict) -> list[tuple[str, ...]]:
    rows = []
    for key, label in PAIRED_LABELS:
        p = errors["paired"].get(key)
        if not p:
            continue
        corr = "-" if p["correlation"] is None else f"{p['correlation']:.2f}"
        rows.append((label, str(p["n"]), _pct(p["median_abs_rel_error"]), _pct(p["p90_abs_rel_error"]),
                     signed_pct(p["mean_signed_rel_error"]), fmt_value(p["median_signed_diff_ms"]), corr))
    return rows


def sensitivity_line(sens: dict) -> str:
    parts = [f"{label} {v:.1f}%" for key, label in (("ttft_ms", "mean TTFT"), ("tpot_ms", "mean TPOT"),
                                                     ("e2e_ms", "mean E2E"), ("jct_s", "mean JCT"))
             if (v := sens.get(key)) is not None]
    return ("Sensitivity: a 1% error in every step time moves " + ", ".join(parts)
            + " (the simulation rerun with step times x0.95 and x1.05; near saturation queueing amplifies "
              "step-time errors).")


STEPS_HEADER = ("decode batch up to", "measured steps", "simulated steps", "measured period (ms)",
                "simulated period (ms)", "error")


def steps_rows(steps: dict) -> list[tuple[str, ...]]:
    """Decode-only steps per batch bucket (steps.csv of both runs; validation.steps)."""
    return [(str(r["batch_up_to"]), str(r["measured_steps"]), str(r["simulated_steps"]),
             fmt_value(r["measured_period_ms"]), fmt_value(r["simulated_period_ms"]), signed_pct(r["error"]))
            for r in steps["decode_by_batch"]]


PAIRED_HEADER = ("metric", "calls", "median |rel err|", "p90 |rel err|", "mean signed rel err",
                 "median diff (ms)", "correlation")
AGG_HEADER = ("metric", "stat", "measured", "simulated", "error (sim-meas)", "measured spread")


def _finding_head(f: dict) -> str:
    share = f"{100 * f['share_of_e2e']:.1f}% of mean measured E2E" if f.get("share_of_e2e") is not None else ""
    bits = [f"{fmt_value(f['impact_ms'])} ms per call", share, f.get("direction") or ""]
    return f"{f['part']}" + (" (minor)" if f.get("minor") else "") + " — " + ", ".join(b for b in bits if b)


# -- plain text (the CLI) ---------------------------------------------------------------------------

def _text_table(header, rows) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def fmt(r):
        return "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return [fmt(header)] + [fmt(r) for r in rows]


def summary_lines(errors: dict) -> list[str]:
    """A short table: mean and p99 of the latencies, the throughputs, cache and preemptions."""
    c = errors["calls"]
    lines = [f"paired calls      {c['paired']} (measured {c['measured']}, simulated {c['simulated']})"]
    lines += _text_table(AGG_HEADER, aggregate_rows(errors, stats=("mean", "p99")))
    return lines


def findings_lines(errors: dict, top: int | None = None) -> list[str]:
    fs = errors["findings"]
    major = [f for f in fs if not f.get("minor")]
    shown = (major or fs)[:top] if top else fs
    if not shown:
        return ["no findings: " + "; ".join(errors.get("not_assessed") or ["nothing to compare"])]
    lines = []
    if top and not major:
        lines.append("no part is off by more than 2% of the mean measured E2E; largest:")
    for f in shown:
        lines.append(f"{f['rank']}. {_finding_head(f)}")
        lines.append(f"   {f['finding']}")
    return lines


def warnings_lines(errors: dict) -> list[str]:
    return [f"WARNING [{w['code']}] {w['message']}" for w in errors["warnings"]]


# -- markdown -----------------------------------------------------------------------------------------

def _md_table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |" for r in rows]
    return out


def _run_line(info: dict) -> str:
    extra = ", ".join(f"{k} {info[k]}" for k in ("backend", "trace", "model", "hardware") if info.get(k))
    return f"`{info['dir']}` ({extra})"


def _repeats_line(errors: dict) -> list[str]:
    n = errors["measured"].get("repeats", 1)
    if n <= 1:
        return []
    return [f"- measured {n} times: aggregates are compared with the median of the {n} runs, and their spread "
            "((max - min) / median) is shown beside each; per-call pairs use the first run"]


def markdown(errors: dict) -> str:
    c = errors["calls"]
    lines = ["# Validation: measured vs simulated", "",
             f"- measured: {_run_line(errors['measured'])}",
             f"- simulated: {_run_line(errors['simulated'])}",
             f"- calls: {c['paired']} paired (ok in both) of {c['measured']} measured and {c['simulated']} simulated",
             "- errors are (simulated - measured) / measured unless marked: positive = simulator slower or higher",
             *_repeats_line(errors),
             "", "## Warnings", ""]
    lines += [f"- **{w['code']}**: {w['message']}" for w in errors["warnings"]] or ["- none: every check passed"]
    lines += ["", "## Where the simulator is off", "",
              "Ranked by the mean seconds per call each part of the model accounts for (see docs/validation.md).", ""]
    for f in errors["findings"]:
        lines.append(f"{f['rank']}. **{_finding_head(f)}**: {f['finding']}")
    if not errors["findings"]:
        lines.append("No findings.")
    if errors.get("not_assessed"):
        lines += ["", "Not assessed: " + "; ".join(errors["not_assessed"]) + "."]
    if errors.get("sensitivity"):
        lines += ["", sensitivity_line(errors["sensitivity"])]
    if errors.get("steps"):
        lines += ["", "## Engine steps", "", errors["steps"]["finding"] + ".", ""]
        lines += _md_table(STEPS_HEADER, steps_rows(errors["steps"]))
    lines += ["", "## Aggregates", ""] + _md_table(AGG_HEADER, aggregate_rows(errors))
    lines += ["", "## Per call (paired on program_id, call_index)", ""] + _md_table(PAIRED_HEADER, paired_rows(errors))
    ts = errors.get("timeseries") or {}
    if ts:
        lines += ["", "## Engine state (time means)", ""]
        lines += _md_table(("series", "measured", "simulated"),
                           [(k, fmt_value(v["measured_mean"]), fmt_value(v["simulated_mean"])) for k, v in ts.items()])
    return "\n".join(lines) + "\n"


# -- html -----------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
.warn{background:#fff4e5;border-left:4px solid #e69500;padding:6px 10px;margin:4px 0}
.minor{color:#777}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}"""


def _html_table(header, rows) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_report(errors: dict, images: list[tuple[str, str]]) -> str:
    """One HTML file with the tables, findings, warnings and inline PNG figures."""
    e = html.escape
    c = errors["calls"]
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>agentservesim validation</title>",
             f"<style>{_CSS}</style></head><body><h1>Validation: measured vs simulated</h1><ul>",
             f"<li>measured: {e(_run_line(errors['measured']))}</li>",
             f"<li>simulated: {e(_run_line(errors['simulated']))}</li>",
             f"<li>calls: {c['paired']} paired of {c['measured']} measured and {c['simulated']} simulated</li>",
             "<li>errors are (simulated &minus; measured) / measured unless marked</li></ul><h2>Warnings</h2>"]
    parts += [f"<div class='warn'><b>{e(w['code'])}</b>: {e(w['message'])}</div>" for w in errors["warnings"]] \
        or ["<p>None: every check passed.</p>"]
    parts.append("<h2>Where the simulator is off</h2><ol>")
    for f in errors["findings"]:
        cls = " class='minor'" if f.get("minor") else ""
        parts.append(f"<li{cls}><b>{e(_finding_head(f))}</b>: {e(f['finding'])}</li>")
    parts.append("</ol>")
    if errors.get("not_assessed"):
        parts.append(f"<p>Not assessed: {e('; '.join(errors['not_assessed']))}.</p>")
    if errors.get("sensitivity"):
        parts.append(f"<p>{e(sensitivity_line(errors['sensitivity']))}</p>")
    if errors.get("steps"):
        parts += ["<h2>Engine steps</h2>", f"<p>{e(errors['steps']['finding'])}.</p>",
                  _html_table(STEPS_HEADER, steps_rows(errors["steps"]))]
    parts += ["<h2>Aggregates</h2>", _html_table(AGG_HEADER, aggregate_rows(errors)),
              "<h2>Per call (paired)</h2>", _html_table(PAIRED_HEADER, paired_rows(errors))]
    for title, b64 in images:
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# -- files ------------------------------------------------------------------------------------------------

def write_report(out_dir, errors: dict, meas: Run, sim: Run) -> dict[str, Path]:
    """Write errors.json, report.md and report.html into out_dir; their paths."""
    from .plots import report_images

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"errors": out / "errors.json", "markdown": out / "report.md", "html": out / "report.html"}
    paths["errors"].write_text(json.dumps(errors, indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(errors))
    paths["html"].write_text(html_report(errors, report_images(meas, sim, pair_calls(meas, sim))))
    return paths
