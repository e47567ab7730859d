"""Tool Simulator: the gap between a call's last token and the issue of the next call.

Modes (config `tools.mode`): `trace` uses the trace's `tool_s`; `fixed` uses one value;
`sample` draws from a distribution per tool name (`default` for the rest), seeded by
(seed, program index, call index) so a gap does not depend on event order.
Every gap is multiplied by `tools.time_scale`.
"""

from __future__ import annotations

import numpy as np

from .config import ConfigError, ToolConfig

_DISTS = {
    "constant": ("value",),
    "exponential": ("mean",),
    "lognormal": ("mu", "sigma"),          # of the underlying normal, seconds
    "uniform": ("low", "high"),
}


def _check(name: str, spec: dict) -> None:
    dist = spec.get("dist")
    if dist not in _DISTS:
        raise ConfigError(f"tools.distributions.{name}: dist must be one of {sorted(_DISTS)}")
    missing = [p for p in _DISTS[dist] if p not in spec]
    if missing:
        raise ConfigError(f"tools.distributions.{name}: {dist} needs {', '.join(missing)}")


class ToolSimulator:
    def __init__(self, cfg: ToolConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        if cfg.mode == "sample":
            if not cfg.distributions:
                raise ConfigError("tools.mode=sample needs tools.distributions")
            for name, spec in cfg.distributions.items():
                _check(name, spec)

    def gap(self, program_index: int, call, call_index: int) -> float:
        cfg = self.cfg
        if cfg.mode == "trace":
            g = call.tool_s or 0.0
        elif cfg.mode == "fixed":
            g = cfg.fixed_s
        else:
            spec = cfg.distributions.get(call.tool or "default") or cfg.distributions.get("default")
            if spec is None:
                g = call.tool_s or 0.0
            else:
                rng = np.random.default_rng([self.seed, program_index, call_index])
                g = self._draw(rng, spec)
        return g * cfg.time_scale

    @staticmethod
    def _draw(rng, spec) -> float:
        d = spec["dist"]
        if d == "constant":
            return float(spec["value"])
        if d == "exponential":
            return float(rng.exponential(spec["mean"]))
        if d == "lognormal":
            return float(rng.lognormal(spec["mu"], spec["sigma"]))
        return float(rng.uniform(spec["low"], spec["high"]))
