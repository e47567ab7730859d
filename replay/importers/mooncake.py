"""Mooncake FAST'25 traces → single-call canonical programs with block hash ids.

Source: kvcache-ai/Mooncake `FAST25-release/traces/{conversation,synthetic}_trace.jsonl`
(Apache-2.0). One request per line: `timestamp` (ms from trace start), `input_length`,
`output_length`, `hash_ids` (remapped prefix-block hashes, 512 tokens per block; equal
ids = reusable prefix KV). The trace does not link requests into sessions, and a later
request's prompt is not its predecessor's prompt plus output, so it is not append-only:
each request becomes a one-call program carrying `input_tokens` and `hash_ids`, and the
line carries `block_size: 512` (DESIGN.md, the canonical trace format).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import SourceTraceError, call, open_text, program

MOONCAKE_BLOCK_SIZE = 512  # tokens per hash id (FAST25-release/README.md)


def _int_field(path, lineno: int, rec: dict[str, Any], key: str) -> int:
    v = rec.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise SourceTraceError(path, lineno, key, f"expected int >= 0, got {v!r}")
    return v


def read_mooncake(path: str | os.PathLike, *, limit: int | None = None,
                  start_s: float = 0.0, end_s: float | None = None,
                  block_size: int = MOONCAKE_BLOCK_SIZE,
                  program_id_prefix: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield one single-call program per request of a Mooncake trace.

    Requests with `start_s <= timestamp/1000 < end_s` are kept, at most `limit`; arrival_s
    is `timestamp/1000 - start_s`. new_tokens = input_tokens = input_length (a one-call
    program has no earlier context). Each line's hash_ids must cover its input exactly
    (ceil(input_length / block_size) ids), else the file is rejected.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit == 0:
        return
    stem = Path(path).name.split(".")[0].removesuffix("_trace")
    prefix = program_id_prefix or f"mooncake-{stem}"
    emitted = 0
    last_ms = None
    with open_text(path) as f:
        for row_i, line in enumerate(f):
            lineno = row_i + 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceTraceError(path, lineno, "line", f"not JSON ({exc.msg})") from None
            ts_ms = _int_field(path, lineno, rec, "timestamp")
            if last_ms is not None and ts_ms < last_ms:
                raise SourceTraceError(path, lineno, "timestamp", "lines are not in time order")
            last_ms = ts_ms
            t = ts_ms / 1000.0
            if t < start_s:
                continue
            if end_s is not None and t >= end_s:
                break
            n_in = _int_field(path, lineno, rec, "input_length")
            n_out = _int_field(path, lineno, rec, "output_length")
            hash_ids = rec.get("hash_ids")
            if (not isinstance(hash_ids, list)
                    or not all(isinstance(h, int) and not isinstance(h, bool) for h in hash_ids)):
                raise SourceTraceError(path, lineno, "hash_ids", "expected a list of ints")
            if len(hash_ids) != math.ceil(n_in / block_size):
                raise SourceTraceError(
                    path, lineno, "hash_ids",
                    f"{len(hash_ids)} ids for {n_in} tokens at {block_size} tokens/block")
            c = call(n_in, n_out, input_tokens=n_in, hash_ids=hash_ids)
            yield program(f"{prefix}-{row_i:05d}", round(t - start_s, 3), [c],
                          block_size=block_size, meta={"row": row_i})
            emitted += 1
            if limit is not None and emitted >= limit:
                break
