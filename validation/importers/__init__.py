"""Importers of recorded real runs into agentservesim's results layout (measured side),
with the trace and engine settings needed to simulate the same run."""

from .llmservingsim import import_llmservingsim_run  # noqa: F401
from .vllm_bench import import_vllm_bench_run  # noqa: F401

# format name -> importer(source, measured_out_dir, **the format's options) -> RecordedRun
RECORDED_FORMATS = {"llmservingsim": import_llmservingsim_run, "vllm-bench": import_vllm_bench_run}
