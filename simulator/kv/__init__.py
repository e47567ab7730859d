"""KV Residency Model: where a program's KV blocks live across HBM, host DRAM and CXL."""

from .residency import KVResidency, TierStore  # noqa: F401
