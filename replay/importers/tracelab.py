"""TraceLab coding-agent traces → canonical programs (one program per agent session).

Source: uw-syfi/TraceLab (Apache-2.0 repo; the released dataset is CC-BY-4.0).

Two shapes are read:

* `read_round_trace`: `example_sessions/{sanitized,derived}/round_trace.jsonl` (and the
  released `syfi_coding_trace.jsonl.gz`, same rows): one row per LLM invocation of a
  Claude Code or Codex session, with provider token accounting
  (`input_tokens_total = prefix_tokens + newly_append_tokens`, where `prefix_tokens` is the
  provider-reported cached part), `output_tokens` (reasoning included), a
  `timing_events[]` timeline and the `tools[]` the round emitted. Schema: the README.md
  files beside the example.
* `read_session_csv`: the session-runner workloads under `replay/examples/*.csv`
  (`session_id|id, [arrival_time ms], round_idx, prefix_len, input_len, output_len,
  tool_wait_after_ms`; schema in TraceLab's replay/README.md).

How a round trace maps onto the canonical format:

* call k = round k; `output_tokens` = the provider's output count.
* prefix = the tokens the provider reported *cached on the session's first round*: before
  the session's first request the only thing that can be cached is what earlier sessions
  of the same harness sent too — its system prompt and tool schemas. Its id names the
  provider, model and length, so only sessions whose harness prefix has the same length
  share it (the sanitized data has no content to check more than that).
* new_tokens(k) = input(k) − [canonical context before call k], i.e. the observed
  `input(k) − input(k−1) − output(k−1)` while the session is append-only. Codex drops the
  previous turns' reasoning from the prompt when the user speaks again, so the difference
  can be negative: new_tokens is then clamped to 0 (the canonical prompt is longer than the
  observed one by the clamped amount) and the next call that is long enough absorbs it.
  Observed inputs and the excess per call are kept under `meta`.
* issue(k) = the last input event of round k (`user_message` / `tool_result`): the request
  cannot leave before its last tool result. end(k) = the last output event of round k
  (`reasoning`, `text`, `tool_call`, Codex `usage_report`). tool_s(k) = issue(k+1) − end(k)
  (clamped at 0; tools can start while the answer still streams). `tool` = the tool whose
  result came last (it closes the gap); "human" when round k called no tool, i.e. the gap
  is the user's think/typing time.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from .base import BlockHasher, SourceTraceError, call, open_text, program

INPUT_EVENTS = frozenset({"user_message", "tool_result"})
HUMAN_TOOL = "human"  # tool name for a gap closed by a user message, not a tool result


def _ts(value: str) -> float:
    """ISO-8601 UTC timestamp (`...Z`) → POSIX seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _iso(t: float) -> str:
    """POSIX seconds → `2026-06-01T05:40:20.151Z` (the source's own format)."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def _read_rows(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceTraceError(path, lineno, "line", f"not JSON ({exc.msg})") from None
            for key in ("session_id", "round_index", "input_tokens_total", "output_tokens",
                        "timing_events"):
                if key not in row:
                    raise SourceTraceError(path, lineno, key, "missing")
            for key in ("input_tokens_total", "output_tokens", "round_index"):
                v = row[key]
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise SourceTraceError(path, lineno, key, f"expected int >= 0, got {v!r}")
            rows.append((lineno, row))
    return rows


def _round_times(path, lineno: int, row: dict[str, Any]) -> tuple[float, float]:
    """(issue, end) of one round in POSIX seconds, from its timing events."""
    events = row["timing_events"]
    if not events:
        raise SourceTraceError(path, lineno, "timing_events", "empty")
    try:
        inputs = [_ts(e["timestamp"]) for e in events if e["event_type"] in INPUT_EVENTS]
        outputs = [_ts(e["timestamp"]) for e in events if e["event_type"] not in INPUT_EVENTS]
    except (KeyError, ValueError) as exc:
        raise SourceTraceError(path, lineno, "timing_events", f"bad event ({exc})") from None
    issue = max(inputs) if inputs else min(outputs)
    end = max(outputs) if outputs else issue
    return issue, max(end, issue)


def _gap_tool(row: dict[str, Any]) -> str:
    """Name of the tool whose result closed the gap after this round; "human" if none."""
    tools = [t for t in row.get("tools") or [] if t.get("tool_name")]
    if not tools:
        return HUMAN_TOOL
    done = [t for t in tools if t.get("result_at")]
    if done:
        return max(done, key=lambda t: _ts(t["result_at"]))["tool_name"]
    return max(tools, key=lambda t: t.get("tool_wall_latency_ms") or 0)["tool_name"]


def _round_meta(row: dict[str, Any], llm_s: float) -> dict[str, Any]:
    m: dict[str, Any] = {"round_index": row["round_index"],
                         "input_tokens_total": row["input_tokens_total"],
                         "cached_tokens": row.get("prefix_tokens"),
                         "llm_s": round(llm_s, 3)}
    for key in ("reasoning_output_tokens", "claude_uncached_input_tokens",
                "claude_cache_creation_input_tokens", "claude_cache_read_input_tokens"):
        if row.get(key) is not None:
            m[key] = row[key]
    tools = row.get("tools") or []
    if tools:
        m["tools"] = [{"name": t.get("tool_name"), "wall_ms": t.get("tool_wall_latency_ms"),
                       "internal_ms": t.get("tool_internal_latency_ms"),
                       "is_error": t.get("is_error")} for t in tools]
    return m


def _session_program(path, session_id: str, rows: list[tuple[int, dict[str, Any]]],
                     use_prefix: bool, id_prefix: str) -> tuple[float, dict[str, Any]]:
    """(observed start in POSIX s, program dict with arrival_s = 0) for one session."""
    rows = sorted(rows, key=lambda r: r[1]["round_index"])
    first = rows[0][1]
    provider = first.get("provider") or "unknown"
    model = first.get("model") or "unknown"
    times = [_round_times(path, lineno, row) for lineno, row in rows]

    prefix_tokens = int(first.get("prefix_tokens") or 0) if use_prefix else 0
    prefix_tokens = min(prefix_tokens, first["input_tokens_total"])
    prefix_id = (f"tracelab-{_slug(provider)}-{_slug(model)}-sys{prefix_tokens}"
                 if prefix_tokens > 0 else None)

    calls, rounds_meta, excess = [], [], []
    context = prefix_tokens  # canonical context before the next call's new tokens
    for k, (lineno, row) in enumerate(rows):
        observed = row["input_tokens_total"]
        new = observed - context
        if new < 0:
            excess.append({"call": k, "tokens": -new})
            new = 0
        tool = tool_s = None
        if k + 1 < len(rows):
            tool = _gap_tool(row)
            tool_s = round(max(0.0, times[k + 1][0] - times[k][1]), 3)
        calls.append(call(new, row["output_tokens"], tool, tool_s))
        context += new + row["output_tokens"]
        rounds_meta.append(_round_meta(row, times[k][1] - times[k][0]))

    start = times[0][0]
    meta: dict[str, Any] = {
        "source": "tracelab", "provider": provider, "model": model,
        "session_id": session_id, "project": first.get("project"),
        "start_utc": _iso(start),
        "rounds": rounds_meta,
    }
    if excess:
        # Not append-only here: the canonical prompt of these calls is longer than observed.
        meta["not_append_only"] = excess
    pid = f"{id_prefix}-{_slug(provider)}-{_slug(session_id.split(':')[-1])[:12]}"
    return start, program(pid, 0.0, calls, prefix_id=prefix_id,
                          prefix_tokens=prefix_tokens, meta=meta)


def read_round_trace(path: str | os.PathLike, *, session_spacing_s: float | None = None,
                     use_prefix: bool = True,
                     program_id_prefix: str = "tracelab") -> Iterator[dict[str, Any]]:
    """Yield one canonical program per session of a TraceLab `round_trace.jsonl[.gz]`.

    session_spacing_s: None keeps the observed session starts (seconds after the earliest
        one; the example sessions are ~72 days apart); a number places the sessions that
        far apart in order of their observed start (the start stays in `meta.start_utc`).
    use_prefix: split the first round's provider-cached tokens off as a shared prefix.
    """
    sessions: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for lineno, row in _read_rows(path):
        sessions.setdefault(str(row["session_id"]), []).append((lineno, row))
    built = [_session_program(path, sid, rows, use_prefix, program_id_prefix)
             for sid, rows in sessions.items()]
    built.sort(key=lambda sp: (sp[0], sp[1]["program_id"]))
    if not built:
        return
    t0 = built[0][0]
    for i, (start, prog) in enumerate(built):
        offset = start - t0 if session_spacing_s is None else i * session_spacing_s
        prog["arrival_s"] = round(offset, 3)
        yield prog


# --- session-runner CSV ------------------------------------------------------------------

_CSV_INT_FIELDS = ("round_idx", "prefix_len", "input_len", "output_len")


def _csv_rows(path) -> dict[str, list[tuple[int, dict[str, float]]]]:
    sessions: dict[str, list[tuple[int, dict[str, float]]]] = {}
    with open_text(path) as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        sid_key = "session_id" if "session_id" in fields else "id"
        for key in (sid_key, *_CSV_INT_FIELDS, "tool_wait_after_ms"):
            if key not in fields:
                raise SourceTraceError(path, 1, key, "missing column")
        for lineno, rec in enumerate(reader, start=2):
            row: dict[str, float] = {}
            for key in (*_CSV_INT_FIELDS, "tool_wait_after_ms", "arrival_time"):
                raw = (rec.get(key) or "").strip()
                if key == "arrival_time" and raw == "":
                    raw = "0"  # the runner defaults a missing arrival to 0
                try:
                    value = float(raw)
                except ValueError:
                    raise SourceTraceError(path, lineno, key, f"not a number: {raw!r}") from None
                if value < 0 or (key in _CSV_INT_FIELDS and value != int(value)):
                    raise SourceTraceError(path, lineno, key, f"expected int >= 0, got {raw!r}")
                row[key] = value
            sessions.setdefault(rec[sid_key], []).append((lineno, row))
    return sessions


def read_session_csv(path: str | os.PathLike, *, block_size: int = 16,
                     program_id_prefix: str = "tracelab-csv") -> Iterator[dict[str, Any]]:
    """Yield one canonical program per session of a TraceLab session-runner CSV.

    The runner builds round k's prompt as the first `prefix_len` tokens of the previous
    round's full context plus `input_len` fresh tokens, each session from its own corpus
    window (so nothing is shared across sessions; round 0's prefix_len is folded into the
    first call's new_tokens). A session whose prefix_len always equals the previous full
    context is append-only and imports as plain new/output tokens; any other session (a
    compaction) gets `input_tokens` + `hash_ids` on every call, at `block_size` tokens per
    block, computed exactly from that construction.
    """
    hasher = BlockHasher(block_size)
    built = []
    for order, (sid, rows) in enumerate(_csv_rows(path).items()):
        rows.sort(key=lambda r: r[1]["round_idx"])
        arrival = rows[0][1]["arrival_time"] / 1000.0  # ms in the runner's schema
        append_only = all(
            int(r["prefix_len"]) == int(p["prefix_len"] + p["input_len"] + p["output_len"])
            for (_, p), (_, r) in zip(rows, rows[1:]))
        calls = []
        context: list[tuple[Any, int]] = []  # (segment key, length) of the full context
        for k, (_, r) in enumerate(rows):
            prefix_len, new, out = int(r["prefix_len"]), int(r["input_len"]), int(r["output_len"])
            tool_s = round(r["tool_wait_after_ms"] / 1000.0, 3) if k + 1 < len(rows) else None
            kept = _truncate(context, prefix_len, (sid, k, "unknown"))
            prompt = kept + [((sid, k, "in"), new)]
            fresh = new + (prefix_len if k == 0 else 0)  # round 0 has nothing to keep
            if append_only:
                c = call(fresh, out, None, tool_s)
            else:
                c = call(fresh, out, None, tool_s, input_tokens=prefix_len + new,
                         hash_ids=hasher.hash_ids(prompt))
            calls.append(c)
            context = prompt + [((sid, k, "out"), out)]
        meta = {"source": "tracelab-session-csv", "session_id": sid}
        if rows[-1][1]["tool_wait_after_ms"]:
            meta["tool_wait_after_last_ms"] = rows[-1][1]["tool_wait_after_ms"]
        prog = program(f"{program_id_prefix}-{sid}", round(arrival, 3), calls,
                       block_size=None if append_only else block_size, meta=meta)
        built.append((arrival, order, prog))
    built.sort(key=lambda b: (b[0], b[1]))
    for _, _, prog in built:
        yield prog


def _truncate(context: list[tuple[Any, int]], n: int, filler: Any) -> list[tuple[Any, int]]:
    """The first n tokens of a segment list; padded with a fresh segment if it is shorter."""
    out, left = [], n
    for key, length in context:
        if left <= 0:
            break
        out.append((key, min(length, left)))
        left -= min(length, left)
    if left > 0:
        out.append((filler, left))
    return out
