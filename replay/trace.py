"""The canonical trace format (JSONL, one program per line): load, validate, write.

Every field is checked; the first bad line raises `TraceError` naming the file, line number
and field, and nothing is half-loaded. Programs come back sorted by `arrival_s` (stable).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from simulator.workload import CallSpec, ProgramSpec

PROGRAM_KEYS = {"program_id", "arrival_s", "prefix", "calls", "meta", "block_size"}
PREFIX_KEYS = {"id", "tokens"}
CALL_KEYS = {"new_tokens", "output_tokens", "tool", "tool_s", "input_tokens", "hash_ids", "after", "meta"}


class TraceError(ValueError):
    """A trace that does not follow the canonical format (a user error: one clear line)."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Line:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, msg: str):
        raise TraceError(f"{self.where}: {field}: {msg}")

    def int_field(self, obj: dict, key: str, field: str, minimum: int = 0, required: bool = True):
        if key not in obj:
            if required:
                self.fail(field, "missing")
            return None
        v = obj[key]
        if not _is_int(v):
            self.fail(field, f"must be an integer, got {v!r}")
        if v < minimum:
            self.fail(field, f"must be >= {minimum}, got {v}")
        return v


def parse_program(obj: Any, where: str) -> ProgramSpec:
    ln = _Line(where)
    if not isinstance(obj, dict):
        ln.fail("line", "must be a JSON object")
    unknown = sorted(set(obj) - PROGRAM_KEYS)
    if unknown:
        ln.fail(unknown[0], f"unknown field (allowed: {', '.join(sorted(PROGRAM_KEYS))}; put anything else under meta)")
    pid = obj.get("program_id")
    if not isinstance(pid, str) or not pid:
        ln.fail("program_id", f"must be a non-empty string, got {pid!r}")
    if "arrival_s" not in obj:
        ln.fail("arrival_s", "missing")
    arrival = obj["arrival_s"]
    if not _is_num(arrival) or arrival < 0:
        ln.fail("arrival_s", f"must be a finite number >= 0, got {arrival!r}")
    prefix_id, prefix_tokens = None, 0
    if "prefix" in obj and obj["prefix"] is not None:
        pre = obj["prefix"]
        if not isinstance(pre, dict):
            ln.fail("prefix", "must be an object {id, tokens}")
        bad = sorted(set(pre) - PREFIX_KEYS)
        if bad:
            ln.fail(f"prefix.{bad[0]}", "unknown field (allowed: id, tokens)")
        if not isinstance(pre.get("id"), str) or not pre.get("id"):
            ln.fail("prefix.id", f"must be a non-empty string, got {pre.get('id')!r}")
        prefix_id = pre["id"]
        prefix_tokens = ln.int_field(pre, "tokens", "prefix.tokens")
    block_size = ln.int_field(obj, "block_size", "block_size", minimum=1, required=False)
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        ln.fail("meta", "must be an object")
    calls_raw = obj.get("calls")
    if not isinstance(calls_raw, list) or not calls_raw:
        ln.fail("calls", "missing or empty: a program needs at least one call")
    calls = []
    ctx = prefix_tokens
    for k, c in enumerate(calls_raw):
        f = f"calls[{k}]"
        if not isinstance(c, dict):
            ln.fail(f, "must be an object")
        bad = sorted(set(c) - CALL_KEYS)
        if bad:
            ln.fail(f"{f}.{bad[0]}", f"unknown field (allowed: {', '.join(sorted(CALL_KEYS))})")
        new = ln.int_field(c, "new_tokens", f"{f}.new_tokens", required="input_tokens" not in c)
        out = ln.int_field(c, "output_tokens", f"{f}.output_tokens", minimum=1)
        tool = c.get("tool")
        if tool is not None and not isinstance(tool, str):
            ln.fail(f"{f}.tool", f"must be a string, got {tool!r}")
        tool_s = c.get("tool_s")
        if tool_s is not None and (not _is_num(tool_s) or tool_s < 0):
            ln.fail(f"{f}.tool_s", f"must be a finite number >= 0, got {tool_s!r}")
        inp = ln.int_field(c, "input_tokens", f"{f}.input_tokens", minimum=1, required=False)
        hids = c.get("hash_ids")
        if hids is not None:
            if not isinstance(hids, list) or not all(_is_int(h) for h in hids):
                ln.fail(f"{f}.hash_ids", "must be a list of integers")
            if inp is None:
                ln.fail(f"{f}.input_tokens", "required with hash_ids")
            if block_size is None:
                ln.fail("block_size", "required on a line whose calls carry hash_ids")
            hids = tuple(hids)
        after = c.get("after")
        if after is not None:
            if not isinstance(after, list) or not all(_is_int(a) for a in after):
                ln.fail(f"{f}.after", "must be a list of call indices")
            for a in after:
                if a < 0 or a >= k:
                    ln.fail(f"{f}.after", f"refers to call {a}, but only calls 0..{k - 1} come before it")
            if len(set(after)) != len(after):
                ln.fail(f"{f}.after", "lists a call twice")
            after = tuple(after)
        new = new if new is not None else 0
        if inp is None and ctx + new < 1:
            ln.fail(f"{f}.new_tokens", "the call's prompt would be empty (prefix + context + new_tokens = 0)")
        ctx += new + out
        calls.append(CallSpec(new_tokens=new, output_tokens=out, tool=tool,
                              tool_s=float(tool_s) if tool_s is not None else None,
                              input_tokens=inp, hash_ids=hids, after=after))
    return ProgramSpec(program_id=pid, arrival_s=float(arrival), calls=tuple(calls), prefix_id=prefix_id,
                       prefix_tokens=prefix_tokens, block_size=block_size, meta=meta)


def load_trace(path: str | os.PathLike) -> list[ProgramSpec]:
    """Load and validate a whole trace; raises TraceError on the first bad line."""
    p = Path(path)
    if not p.exists():
        raise TraceError(f"{p}: no such trace file")
    programs: list[ProgramSpec] = []
    seen: dict[str, int] = {}
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: line: not valid JSON ({e.msg} at column {e.colno})") from None
            prog = parse_program(obj, where)
            if prog.program_id in seen:
                raise TraceError(f"{where}: program_id: duplicate '{prog.program_id}' (first on line {seen[prog.program_id]})")
            seen[prog.program_id] = lineno
            programs.append(prog)
    if not programs:
        raise TraceError(f"{p}: the trace has no programs")
    programs.sort(key=lambda s: s.arrival_s)
    return programs


def program_to_dict(spec: ProgramSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"program_id": spec.program_id, "arrival_s": spec.arrival_s}
    if spec.prefix_id is not None:
        d["prefix"] = {"id": spec.prefix_id, "tokens": spec.prefix_tokens}
    if spec.block_size is not None:
        d["block_size"] = spec.block_size
    calls = []
    for c in spec.calls:
        cd: dict[str, Any] = {"new_tokens": c.new_tokens, "output_tokens": c.output_tokens}
        if c.tool is not None:
            cd["tool"] = c.tool
        if c.tool_s is not None:
            cd["tool_s"] = c.tool_s
        if c.input_tokens is not None:
            cd["input_tokens"] = c.input_tokens
        if c.hash_ids is not None:
            cd["hash_ids"] = list(c.hash_ids)
        if c.after is not None:
            cd["after"] = list(c.after)
        calls.append(cd)
    d["calls"] = calls
    if spec.meta:
        d["meta"] = spec.meta
    return d


def write_trace(programs: Iterable[ProgramSpec], path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for spec in programs:
            f.write(json.dumps(program_to_dict(spec), separators=(",", ":")) + "\n")
