"""The workload the simulator consumes: agent programs, each a chain (or DAG) of LLM calls
separated by tool gaps. These are the in-memory form of the canonical trace format
(../shared/DESIGN.md); parsing and validation of the JSONL lives in `replay.trace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class CallSpec:
    """One LLM call of a program.

    new_tokens: tokens appended to the context before this call (tool output, user turn).
    output_tokens: tokens the model generates (max_tokens with ignore_eos).
    tool / tool_s: the tool run after this call and the gap until the next call is issued;
        None for the last call (no gap).
    input_tokens / hash_ids: for traces that are not append-only; hash_ids are block ids of
        the program's `block_size` (equal ids = identical token blocks).
    after: DAG parents (call indices); None means "the previous call".
    """

    new_tokens: int
    output_tokens: int
    tool: str | None = None
    tool_s: float | None = None
    input_tokens: int | None = None
    hash_ids: tuple[int, ...] | None = None
    after: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    program_id: str
    arrival_s: float
    calls: tuple[CallSpec, ...]
    prefix_id: str | None = None
    prefix_tokens: int = 0
    block_size: int | None = None  # size of the blocks `hash_ids` refer to
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def input_tokens(self, k: int) -> int:
        """Prompt length of call k: explicit, or prefix + Σ_{j<k}(new_j + out_j) + new_k."""
        call = self.calls[k]
        if call.input_tokens is not None:
            return call.input_tokens
        total = self.prefix_tokens + call.new_tokens
        for j in range(k):
            c = self.calls[j]
            total += c.new_tokens + c.output_tokens
        return total

    def all_input_tokens(self) -> list[int]:
        out = []
        ctx = self.prefix_tokens
        for c in self.calls:
            if c.input_tokens is not None:
                out.append(c.input_tokens)
            else:
                out.append(ctx + c.new_tokens)
            ctx += c.new_tokens + c.output_tokens
        return out

    def parents(self, k: int) -> tuple[int, ...]:
        call = self.calls[k]
        if call.after is not None:
            return call.after
        return (k - 1,) if k > 0 else ()
