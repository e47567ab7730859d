"""Azure LLM inference trace 2023 → single-call canonical programs.

Source: Azure/AzurePublicDataset `data/AzureLLMInferenceTrace_{code,conv}.csv` (CC-BY-4.0;
the Splitwise paper, ISCA 2024). Columns: `TIMESTAMP` (invocation time,
`YYYY-MM-DD HH:MM:SS.fffffff`, 100 ns resolution), `ContextTokens`, `GeneratedTokens`.
The trace has no sessions and no prompt content, so each row is a program of one call
with new_tokens = ContextTokens and output_tokens = GeneratedTokens.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .base import SourceTraceError, call, open_text, program

_TICKS_PER_S = 10_000_000  # TIMESTAMP has 7 fractional digits: 100 ns ticks


def _ticks(value: str) -> int:
    """`2023-11-16 18:17:03.9799600` → integer 100 ns ticks since the epoch (exact)."""
    whole, _, frac = value.strip().partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    if frac and not frac.isdigit():
        raise ValueError(f"bad fractional seconds {frac!r}")
    return int(base.timestamp()) * _TICKS_PER_S + int((frac + "0000000")[:7])


def _service(path: str | os.PathLike) -> str:
    """`code` / `conv` from the file name (used in program ids)."""
    stem = Path(path).name.split(".")[0]
    return stem.rsplit("_", 1)[-1].lower() if "_" in stem else stem.lower()


def read_azure(path: str | os.PathLike, *, limit: int | None = None,
               start_s: float = 0.0, end_s: float | None = None,
               program_id_prefix: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield one single-call program per row of an Azure 2023 LLM trace CSV.

    Times are seconds after the file's first row. Rows with `start_s <= t < end_s` are
    kept (end_s None: to the end), at most `limit` of them, and their arrival_s is
    `t - start_s`, so a window starts at 0. `meta.row` is the 0-based data row in the file.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    prefix = program_id_prefix or f"azure-{_service(path)}"
    emitted = 0
    last_t = None
    t0 = None
    if limit == 0:
        return
    with open_text(path) as f:
        reader = csv.DictReader(f)
        for key in ("TIMESTAMP", "ContextTokens", "GeneratedTokens"):
            if key not in (reader.fieldnames or ()):
                raise SourceTraceError(path, 1, key, "missing column")
        for row_i, rec in enumerate(reader):
            lineno = row_i + 2
            try:
                ticks = _ticks(rec["TIMESTAMP"])
            except ValueError as exc:
                raise SourceTraceError(path, lineno, "TIMESTAMP", str(exc)) from None
            t0 = ticks if t0 is None else t0
            t = (ticks - t0) / _TICKS_PER_S
            if last_t is not None and t < last_t:
                raise SourceTraceError(path, lineno, "TIMESTAMP", "rows are not in time order")
            last_t = t
            if t < start_s:
                continue
            if end_s is not None and t >= end_s:
                break
            counts = []
            for key in ("ContextTokens", "GeneratedTokens"):
                raw = rec[key].strip()
                if not raw.isdigit():
                    raise SourceTraceError(path, lineno, key, f"expected int >= 0, got {raw!r}")
                counts.append(int(raw))
            yield program(f"{prefix}-{row_i:05d}", round(t - start_s, 6),
                          [call(counts[0], counts[1])], meta={"row": row_i})
            emitted += 1
            if limit is not None and emitted >= limit:
                break
