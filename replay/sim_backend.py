"""The simulator backend of asim-replay: trace + hardware + config -> results layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import simulator
from simulator.cluster import Simulation
from simulator.config import SimConfig
from simulator.deployment import build_deployment
from simulator.hardware import load_device, load_model

from .results import ResultsWriter


def make_deployment(hardware: str, model: str, config: SimConfig):
    device, raw = load_device(hardware)
    profile = raw if ("latency_model" in raw or "engine" in raw) else {}
    arch = load_model(model)
    return build_deployment(arch, device, config, profile)


def run_simulation(programs, hardware: str, model: str, config: SimConfig, out_dir: str | os.PathLike,
                   trace_name: str = "", progress=None) -> dict[str, Any]:
    """Simulate and write calls.csv, programs.csv, timeseries.csv and summary.json."""
    dep = make_deployment(hardware, model, config)
    sim = Simulation(programs, dep, config)
    res = sim.run(progress=progress)
    summary = dict(res.summary)
    summary.update({
        "backend": "simulator",
        "trace": trace_name,
        "profile": {"hardware": str(hardware), "model": str(model)},
        "deployment": dep.describe(),
        "config": config.to_dict(),
        "instances": res.instances,
        "sim_events": res.events,
        "agentservesim_version": simulator.__version__,
    })
    with ResultsWriter(out_dir) as w:
        w.calls(sorted(res.calls, key=lambda c: (c["arrival_s"], c["program_id"], c["call_index"])))
        w.programs(sorted(res.programs, key=lambda p: (p["arrival_s"], p["program_id"])))
        w.timeseries(res.timeseries)
        if config.metrics.step_log:
            w.steps(res.steps)
        w.summary(summary)
    return summary
