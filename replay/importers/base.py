"""Shared pieces of the importers: the error a bad source file raises, opening plain or
gzipped files, writing canonical JSONL, and block ids for contexts that are not
append-only.

The canonical program dict is the JSON of ../shared/DESIGN.md ("The canonical trace
format"); importers build it with `call()` and `program()` so key order (and therefore
the bytes `write_jsonl` writes) is always the same.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO


class SourceTraceError(ValueError):
    """A public trace file that does not have the shape its importer expects.

    The message is one line a user can act on: `path:line: field: what is wrong`.
    """

    def __init__(self, path: str | os.PathLike, line: int | None, field: str, message: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {field}: {message}")
        self.path = str(path)
        self.line = line
        self.field = field


def open_text(path: str | os.PathLike) -> TextIO:
    """Open a UTF-8 text file, transparently gunzipping `*.gz` (the TraceLab release is)."""
    p = Path(path)
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", newline="")
    return open(p, encoding="utf-8", newline="")


def call(new_tokens: int, output_tokens: int, tool: str | None = None,
         tool_s: float | None = None, *, input_tokens: int | None = None,
         hash_ids: list[int] | None = None) -> dict[str, Any]:
    """One canonical call dict; optional keys are left out when None."""
    c: dict[str, Any] = {"new_tokens": int(new_tokens), "output_tokens": int(output_tokens)}
    if tool is not None:
        c["tool"] = str(tool)
    if tool_s is not None:
        c["tool_s"] = float(tool_s)
    if input_tokens is not None:
        c["input_tokens"] = int(input_tokens)
    if hash_ids is not None:
        c["hash_ids"] = [int(h) for h in hash_ids]
    return c


def program(program_id: str, arrival_s: float, calls: list[dict[str, Any]], *,
            prefix_id: str | None = None, prefix_tokens: int = 0,
            block_size: int | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """One canonical program dict (one JSONL line) with a fixed key order."""
    p: dict[str, Any] = {"program_id": str(program_id), "arrival_s": float(arrival_s)}
    if prefix_id is not None:
        p["prefix"] = {"id": str(prefix_id), "tokens": int(prefix_tokens)}
    if block_size is not None:
        p["block_size"] = int(block_size)
    p["calls"] = calls
    if meta:
        p["meta"] = meta
    return p


def write_jsonl(programs: Iterable[dict[str, Any]], path: str | os.PathLike) -> tuple[int, int]:
    """Write programs one per line to `path`; return (programs, calls) written.

    Compact separators and the importers' fixed key order make the output byte-identical
    for identical input. The file is written beside its target and renamed into place, so
    a failure half-way leaves no half-written trace behind.
    """
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    n_programs = n_calls = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for p in programs:
                # allow_nan=False: NaN/inf are not JSON, and never valid token counts or times.
                f.write(json.dumps(p, separators=(",", ":"), ensure_ascii=False,
                                   allow_nan=False))
                f.write("\n")
                n_programs += 1
                n_calls += len(p["calls"])
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n_programs, n_calls


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Plain JSON lines (no validation; `replay.trace` is the canonical loader)."""
    with open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


class BlockHasher:
    """Block ids for contexts built from token *segments* (a system prompt, one user turn,
    one model output), for traces whose context is not append-only.

    A context is a list of `(segment_key, length)`; two contexts share a block id exactly
    when the block covers the same pieces of the same segments and every earlier block is
    shared too (chained, like vLLM's and Mooncake's prefix hashes). A partial last block
    gets an id of its own, so it never matches the full block it later grows into. Ids are
    small ints handed out in first-seen order, so they are deterministic for a given input.
    """

    def __init__(self, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self._ids: dict[tuple, int] = {}

    def _id(self, key: tuple) -> int:
        return self._ids.setdefault(key, len(self._ids))

    def hash_ids(self, segments: Iterable[tuple[Any, int]]) -> list[int]:
        bs = self.block_size
        ids: list[int] = []
        parent: int | None = None
        pieces: list[tuple[Any, int, int]] = []
        fill = 0
        for key, length in segments:
            off = 0
            while off < length:
                take = min(length - off, bs - fill)
                pieces.append((key, off, off + take))
                off += take
                fill += take
                if fill == bs:
                    parent = self._id((parent, tuple(pieces)))
                    ids.append(parent)
                    pieces, fill = [], 0
        if pieces:
            ids.append(self._id((parent, tuple(pieces))))  # shorter than any full block
        return ids
