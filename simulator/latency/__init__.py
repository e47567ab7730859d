"""Latency models: how long one engine step takes, and how long a KV transfer takes.

Every model answers `step_time(prefill_chunks, num_decodes, decode_ctx_sum, num_sampled)`
where `prefill_chunks` is a list of (new tokens, tokens already in context) and decodes are
summarised by their count and summed context. `breakdown` returns the same time split per
operator family, so an error can be traced to an operator.
"""

from .base import LatencyModel, ScaledLatency, StepFeatures, step_features  # noqa: F401
from .roofline import RooflineModel  # noqa: F401
from .linear import LinearStepModel  # noqa: F401
from .operators import OperatorModel  # noqa: F401
