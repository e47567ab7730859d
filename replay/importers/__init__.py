"""Importers: public traces and synthetic generators → canonical programs.

Every function yields program dicts in the canonical trace format of ../shared/DESIGN.md
("The canonical trace format"): `program_id`, `arrival_s`, optional `prefix {id, tokens}`,
`calls [{new_tokens, output_tokens, tool, tool_s, ...}]`, optional `block_size` and `meta`,
in arrival order. `write_jsonl` writes them; `replay.trace` loads and validates them.

IMPORTERS map a source name to `fn(path, **options)` (a public trace file → programs);
GENERATORS map a name to `fn(params, seed)` (seeded synthetic workloads).
"""

from .azure import read_azure
from .base import BlockHasher, SourceTraceError, read_jsonl, write_jsonl
from .mooncake import read_mooncake
from .synthetic import (TINY_CPU, ChatParams, LogNormal, SweAgentParams, ToolSpec,
                        chat_programs, swe_agent_programs, tiny_cpu_programs)
from .tracelab import read_round_trace, read_session_csv

IMPORTERS = {
    "tracelab": read_round_trace,  # TraceLab round_trace.jsonl[.gz] (Claude Code / Codex)
    "tracelab_csv": read_session_csv,  # TraceLab session-runner workload CSV
    "azure": read_azure,  # AzureLLMInferenceTrace_{code,conv}.csv (2023)
    "mooncake": read_mooncake,  # Mooncake FAST'25 *_trace.jsonl
}

GENERATORS = {
    "swe_agent": swe_agent_programs,
    "chat": chat_programs,
}

__all__ = [
    "IMPORTERS", "GENERATORS", "write_jsonl", "read_jsonl", "SourceTraceError", "BlockHasher",
    "read_round_trace", "read_session_csv", "read_azure", "read_mooncake",
    "swe_agent_programs", "chat_programs", "tiny_cpu_programs",
    "SweAgentParams", "ChatParams", "LogNormal", "ToolSpec", "TINY_CPU",
]
