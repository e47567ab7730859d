"""Figures of a comparison, as base64 PNG strings for a self-contained report.html.

Matplotlib's object API with the Agg canvas (no pyplot): no global figure state, no display.
Measured is drawn in one colour and simulated in another throughout.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd

from .compare import Run, timeseries_totals

MEASURED = ("measured", "#1f77b4")
SIMULATED = ("simulated", "#d62728")


def _figure(rows: int, cols: int, width: float = 11.0, height_per_row: float = 3.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height_per_row * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def to_png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _log_axis(ax, axis: str) -> None:
    """Log scale with plain numbers on the major ticks and no labels on the minor ones."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())


def _spread_log(ax, *arrays, axis: str = "x") -> None:
    """Log scale when the positive values span more than 20x (latencies often do)."""
    v = np.concatenate([np.asarray(a, dtype=float) for a in arrays]) if arrays else np.zeros(0)
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) > 1 and v.max() / v.min() > 20:
        _log_axis(ax, axis)


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="grey")


def cdf_figure(meas: Run, sim: Run):
    """CDF overlays of TTFT, TPOT, E2E (per call) and JCT (per program)."""
    def series(run: Run):
        ok = run.ok_calls
        multi = ok[ok["output_tokens"] > 1]
        return {"TTFT (ms)": ok["ttft_s"] * 1000, "TPOT (ms)": multi["tpot_s"] * 1000,
                "E2E (ms)": ok["e2e_s"] * 1000, "program JCT (s)": run.ok_programs["jct_s"]}

    sm, ss = series(meas), series(sim)
    fig, axes = _figure(2, 2, height_per_row=3.2)
    for ax, name in zip(axes.flat, sm):
        drawn = []
        for (label, colour), data in ((MEASURED, sm[name]), (SIMULATED, ss[name])):
            v = np.sort(pd.to_numeric(data, errors="coerce").dropna().to_numpy())
            if len(v):
                ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", color=colour, label=f"{label} (n={len(v)})")
                drawn.append(v)
        if drawn:
            _spread_log(ax, *drawn)
            ax.legend(loc="lower right", fontsize=8)
        else:
            _empty(ax, "values")
        ax.set_xlabel(name)
        ax.set_ylabel("fraction")
        ax.grid(alpha=0.3)
    fig.suptitle("CDF: measured vs simulated")
    return fig


def timeseries_figure(meas: Run, sim: Run):
    """running and waiting requests (summed over instances) and KV usage (mean) over time."""
    tm, tsim = timeseries_totals(meas.timeseries), timeseries_totals(sim.timeseries)
    fig, axes = _figure(3, 1, height_per_row=2.4)
    for ax, col, label in zip(axes[:, 0], ("running", "waiting", "kv_usage"),
                              ("running requests", "waiting requests", "KV usage (fraction)")):
        drawn = False
        for (name, colour), df in ((MEASURED, tm), (SIMULATED, tsim)):
            d = df.dropna(subset=[col])
            if len(d):
                ax.plot(d["t_s"], d[col], color=colour, label=name, drawstyle="steps-post", linewidth=1.2)
                drawn = True
        if drawn:
            ax.legend(loc="upper right", fontsize=8)
        else:
            _empty(ax, "samples")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("time since run start (s)")
    fig.suptitle("Engine state over time")
    return fig


def scatter_figure(pairs: pd.DataFrame):
    """Per-call measured vs simulated TTFT and E2E, with the y = x line."""
    fig, axes = _figure(1, 2, height_per_row=4.2)
    for ax, col, name in zip(axes[0], ("ttft_s", "e2e_s"), ("TTFT (ms)", "E2E (ms)")):
        if not len(pairs):
            _empty(ax, "paired calls")
            continue
        x = pairs[f"{col}_m"].to_numpy(dtype=float) * 1000
        y = pairs[f"{col}_s"].to_numpy(dtype=float) * 1000
        ax.scatter(x, y, s=12, alpha=0.6, color=SIMULATED[1], edgecolors="none")
        both = np.concatenate([x, y])
        both = both[np.isfinite(both)]
        lo, hi = (both.min(), both.max()) if len(both) else (0.0, 1.0)
        if lo > 0 and hi / lo > 20:
            _log_axis(ax, "x")
            _log_axis(ax, "y")
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="y = x")
        ax.set_xlabel(f"measured {name}")
        ax.set_ylabel(f"simulated {name}")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Per call ({len(pairs)} paired calls)")
    return fig


def report_images(meas: Run, sim: Run, pairs: pd.DataFrame) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each figure of the report."""
    return [("Distributions", to_png_base64(cdf_figure(meas, sim))),
            ("Engine state over time", to_png_base64(timeseries_figure(meas, sim))),
            ("Per-call comparison", to_png_base64(scatter_figure(pairs)))]
