"""Importers of recorded real runs into agentservesim's results layout (measured side),
with the trace and engine settings needed to simulate the same run."""

from .llmservingsim import import_llmservingsim_run  # noqa: F401

RECORDED_FORMATS = {"llmservingsim": import_llmservingsim_run}
