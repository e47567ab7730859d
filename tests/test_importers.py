"""Importers and synthetic generators produce well-formed canonical programs
(../shared/DESIGN.md, "The canonical trace format") that agree with their sources."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from replay.importers import (GENERATORS, IMPORTERS, TINY_CPU, BlockHasher, ChatParams,
                              SourceTraceError, SweAgentParams, chat_programs, read_azure,
                              read_mooncake, read_round_trace, read_session_csv,
                              swe_agent_programs, tiny_cpu_programs, write_jsonl)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
SAMPLES = REPO / "sample_traces"

TRACELAB_ROUNDS = "TraceLab/example_sessions/sanitized/round_trace.jsonl"
TRACELAB_CSV_LARGE = "TraceLab/replay/examples/multi_session_large.csv"
TRACELAB_CSV_COMPACT = "TraceLab/replay/examples/session_workload_example.csv"
AZURE_CONV = "AzurePublicDataset/data/AzureLLMInferenceTrace_conv.csv"
MOONCAKE_CONV = "Mooncake/FAST25-release/traces/conversation_trace.jsonl"

PROGRAM_KEYS = {"program_id", "arrival_s", "prefix", "calls", "meta", "block_size"}
CALL_KEYS = {"new_tokens", "output_tokens", "tool", "tool_s", "input_tokens", "hash_ids", "after"}


def reference(rel: str) -> Path:
    path = REFERENCE / rel
    if not path.is_file():
        pytest.skip(f"public reference file {path} absent (expected ../shared/reference "
                    f"beside the repository)")
    return path


# --- canonical-shape checks --------------------------------------------------------------

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def check_program(p: dict) -> None:
    assert set(p) <= PROGRAM_KEYS, set(p) - PROGRAM_KEYS
    assert isinstance(p["program_id"], str) and p["program_id"]
    assert is_num(p["arrival_s"]) and p["arrival_s"] >= 0
    if "prefix" in p:
        assert set(p["prefix"]) == {"id", "tokens"}
        assert isinstance(p["prefix"]["id"], str) and p["prefix"]["id"]
        assert is_int(p["prefix"]["tokens"]) and p["prefix"]["tokens"] >= 0
    assert isinstance(p["calls"], list) and p["calls"]
    has_hashes = any("hash_ids" in c for c in p["calls"])
    if has_hashes:
        assert is_int(p.get("block_size")) and p["block_size"] > 0
    for k, c in enumerate(p["calls"]):
        assert set(c) <= CALL_KEYS, set(c) - CALL_KEYS
        assert is_int(c["new_tokens"]) and c["new_tokens"] >= 0, (p["program_id"], k)
        # vLLM needs max_tokens >= 1, and replay.trace rejects 0.
        assert is_int(c["output_tokens"]) and c["output_tokens"] >= 1, (p["program_id"], k)
        if "tool" in c:
            assert isinstance(c["tool"], str) and c["tool"]
        if "tool_s" in c:
            assert is_num(c["tool_s"]) and c["tool_s"] >= 0
        if k == len(p["calls"]) - 1:
            assert "tool_s" not in c and "tool" not in c, "the last call has no gap"
        if "input_tokens" in c:
            assert is_int(c["input_tokens"]) and c["input_tokens"] >= 0
        if "hash_ids" in c:
            assert all(is_int(h) for h in c["hash_ids"])
            assert len(c["hash_ids"]) == math.ceil(c["input_tokens"] / p["block_size"])
    assert json.loads(json.dumps(p, allow_nan=False)) == p  # plain JSON types only


def check_trace(programs: list[dict]) -> None:
    assert programs
    for p in programs:
        check_program(p)
    ids = [p["program_id"] for p in programs]
    assert len(set(ids)) == len(ids), "program ids repeat"
    arrivals = [p["arrival_s"] for p in programs]
    assert arrivals == sorted(arrivals), "programs are not in arrival order"
    prefix_sizes = defaultdict(set)
    for p in programs:
        if "prefix" in p:
            prefix_sizes[p["prefix"]["id"]].add(p["prefix"]["tokens"])
    assert all(len(s) == 1 for s in prefix_sizes.values()), "one prefix id, two sizes"


def prompt_lengths(p: dict) -> list[int]:
    """input_tokens(k) = prefix + Σ_{j<k}(new_j + out_j) + new_k, or the explicit value."""
    ctx = p.get("prefix", {}).get("tokens", 0)
    out = []
    for c in p["calls"]:
        out.append(c.get("input_tokens", ctx + c["new_tokens"]))
        ctx += c["new_tokens"] + c["output_tokens"]
    return out


def test_check_program_rejects_a_bad_program():
    """The shape check itself fails on a negative count and on a gap after the last call."""
    good = {"program_id": "x", "arrival_s": 0.0, "calls": [{"new_tokens": 1, "output_tokens": 1}]}
    check_program(good)
    with pytest.raises(AssertionError):
        check_program({**good, "calls": [{"new_tokens": -1, "output_tokens": 1}]})
    with pytest.raises(AssertionError):
        check_program({**good, "calls": [{"new_tokens": 1, "output_tokens": 1, "tool_s": 1.0}]})
    with pytest.raises(AssertionError):
        check_program({**good, "calls": [{"new_tokens": 1.5, "output_tokens": 1}]})


# --- TraceLab round traces --------------------------------------------------------------

def tracelab_source_rows(path: Path) -> dict[str, list[dict]]:
    sessions = defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        sessions[row["session_id"]].append(row)
    return {s: sorted(r, key=lambda x: x["round_index"]) for s, r in sessions.items()}


def test_tracelab_programs_match_source_token_accounting():
    """Each session is one program whose call prompts equal the observed input totals,
    except where the source is not append-only and meta records the excess."""
    path = reference(TRACELAB_ROUNDS)
    programs = list(read_round_trace(path, session_spacing_s=5.0))
    check_trace(programs)
    source = tracelab_source_rows(path)
    assert len(programs) == len(source) == 2
    assert sum(len(p["calls"]) for p in programs) == 19
    for p in programs:
        rows = source[p["meta"]["session_id"]]
        assert len(p["calls"]) == len(rows)
        excess = {e["call"]: e["tokens"] for e in p["meta"].get("not_append_only", [])}
        for k, (c, row, n_in) in enumerate(zip(p["calls"], rows, prompt_lengths(p))):
            assert c["output_tokens"] == row["output_tokens"]
            assert n_in == row["input_tokens_total"] + excess.get(k, 0)
        # The shared prefix is what the provider had cached before the session's first call.
        assert p["prefix"]["tokens"] == rows[0]["prefix_tokens"]


def test_tracelab_known_values():
    """Pinned by hand from the sanitized example: the Claude session's first gap, prefix and
    the Codex session's reasoning drop (10436 - 10472 - 294 = -330 at round 5)."""
    programs = {p["meta"]["provider"]: p
                for p in read_round_trace(reference(TRACELAB_ROUNDS), session_spacing_s=5.0)}
    claude, codex = programs["claude"], programs["codex"]
    # tool_call WebSearch at 05:40:31.647 (end of round 0), its result at 05:40:50.938
    assert claude["calls"][0]["tool"] == "WebSearch"
    assert claude["calls"][0]["tool_s"] == pytest.approx(19.291)
    assert claude["prefix"] == {"id": "tracelab-claude-claude-opus-4-8-sys27217",
                                "tokens": 27217}
    assert claude["calls"][0]["new_tokens"] == 32272 - 27217
    assert claude["calls"][1]["new_tokens"] == 35740 - 32272 - 931
    assert claude["calls"][4]["tool"] == "human"  # round 4 ends the turn; the user writes
    assert claude["calls"][4]["tool_s"] == pytest.approx(19.913)
    assert codex["calls"][5]["new_tokens"] == 0
    assert codex["meta"]["not_append_only"][0] == {"call": 5, "tokens": 330}
    assert "not_append_only" not in claude["meta"]
    assert [p["arrival_s"] for p in (codex, claude)] == [0.0, 5.0]  # codex started first


def test_tracelab_observed_arrivals():
    """Without spacing, arrivals are the observed session starts after the earliest."""
    programs = list(read_round_trace(reference(TRACELAB_ROUNDS)))
    starts = [datetime.fromisoformat(p["meta"]["start_utc"].replace("Z", "+00:00"))
              for p in programs]
    assert programs[0]["arrival_s"] == 0.0
    assert programs[1]["arrival_s"] == pytest.approx((starts[1] - starts[0]).total_seconds(),
                                                     abs=1e-3)
    assert programs[1]["arrival_s"] > 60 * 86400  # the two examples are ~72 days apart


def test_tracelab_without_prefix_keeps_prompt_lengths():
    """use_prefix=False moves the prefix into call 0 and changes no prompt length."""
    path = reference(TRACELAB_ROUNDS)
    with_prefix = list(read_round_trace(path, session_spacing_s=0.0))
    without = list(read_round_trace(path, session_spacing_s=0.0, use_prefix=False))
    for a, b in zip(with_prefix, without):
        assert "prefix" not in b
        assert prompt_lengths(a) == prompt_lengths(b)


def test_tracelab_bad_row_names_line_and_field(tmp_path):
    """A row missing a field is reported with its line number and the field."""
    src = reference(TRACELAB_ROUNDS).read_text().splitlines()
    row = json.loads(src[1])
    del row["output_tokens"]
    bad = tmp_path / "rounds.jsonl"
    bad.write_text("\n".join([src[0], json.dumps(row)]) + "\n")
    with pytest.raises(SourceTraceError, match=r"rounds\.jsonl:2: output_tokens"):
        list(read_round_trace(bad))


# --- TraceLab session-runner CSV --------------------------------------------------------

def read_csv_sessions(path: Path) -> dict[str, list[dict]]:
    sessions = defaultdict(list)
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            sessions[rec["session_id"]].append({k: float(v) for k, v in rec.items()})
    return sessions


def test_tracelab_csv_append_only_sessions():
    """The large runner example is append-only: plain new/output tokens whose prompts equal
    prefix_len + input_len, tool gaps in seconds, arrivals in seconds."""
    path = reference(TRACELAB_CSV_LARGE)
    programs = list(read_session_csv(path))
    check_trace(programs)
    source = read_csv_sessions(path)
    assert len(programs) == len(source) == 48
    assert sum(len(p["calls"]) for p in programs) == 303
    for p in programs:
        rows = source[p["meta"]["session_id"]]
        assert "block_size" not in p
        assert p["arrival_s"] == pytest.approx(rows[0]["arrival_time"] / 1000)
        assert prompt_lengths(p) == [int(r["prefix_len"] + r["input_len"]) for r in rows]
        for c, r in zip(p["calls"][:-1], rows):
            assert c["tool_s"] == pytest.approx(r["tool_wait_after_ms"] / 1000)


def test_tracelab_csv_compaction_gets_hash_ids():
    """A session whose prefix shrinks (round 10 keeps round 3's 48,060 tokens) carries
    input_tokens and hash_ids that share exactly the kept full blocks."""
    programs = list(read_session_csv(reference(TRACELAB_CSV_COMPACT), block_size=16))
    check_trace(programs)
    (p,) = programs
    assert p["block_size"] == 16
    h3, h10 = p["calls"][3]["hash_ids"], p["calls"][10]["hash_ids"]
    assert p["calls"][10]["input_tokens"] == 48060 + 9844
    kept_full = 48060 // 16
    assert h10[:kept_full] == h3[:kept_full]
    assert h10[kept_full] != h3[kept_full]  # partly round 10's new input
    assert not set(h10[kept_full:]) & set(h3[kept_full:])


def test_block_hasher_shares_only_identical_prefix_blocks():
    """Blocks match when they cover the same pieces after a matching chain; a partial last
    block never matches the full block it grows into."""
    h = BlockHasher(4)
    a = h.hash_ids([("sys", 6), ("u1", 5)])  # 11 tokens: 2 full + 1 partial
    b = h.hash_ids([("sys", 6), ("u1", 5), ("o1", 3)])  # 14 tokens: 3 full + 1 partial
    c = h.hash_ids([("sys", 6), ("u2", 5)])
    assert len(a) == 3 and len(b) == 4
    assert a[:2] == b[:2] and a[2] != b[2]
    assert c[0] == a[0] and c[1] != a[1]  # block 1 mixes sys with a different user turn
    assert BlockHasher(4).hash_ids([("sys", 6), ("u1", 5)]) == a  # deterministic


# --- Azure ------------------------------------------------------------------------------

def azure_rows(path: Path, n: int) -> list[tuple[datetime, int, int]]:
    out = []
    with open(path, newline="") as f:
        for i, rec in enumerate(csv.DictReader(f)):
            if i >= n:
                break
            ts = rec["TIMESTAMP"][:26]  # datetime parses 6 fractional digits
            out.append((datetime.fromisoformat(ts), int(rec["ContextTokens"]),
                        int(rec["GeneratedTokens"])))
    return out


def test_azure_rows_become_single_call_programs():
    """First rows: one call each, tokens copied, arrival relative to the first row."""
    path = reference(AZURE_CONV)
    programs = list(read_azure(path, limit=50))
    check_trace(programs)
    rows = azure_rows(path, 50)
    assert len(programs) == 50
    for p, (ts, ctx, gen) in zip(programs, rows):
        assert p["calls"] == [{"new_tokens": ctx, "output_tokens": gen}]
        assert p["arrival_s"] == pytest.approx((ts - rows[0][0]).total_seconds(), abs=2e-6)
    assert programs[0]["arrival_s"] == 0.0


def test_azure_time_window():
    """A window keeps rows with start <= t < end and starts its arrivals at 0."""
    path = reference(AZURE_CONV)
    everything = list(read_azure(path, limit=2000))
    window = list(read_azure(path, start_s=30.0, end_s=60.0))
    check_trace(window)
    expected = [p for p in everything if 30.0 <= p["arrival_s"] < 60.0]
    assert [p["program_id"] for p in window] == [p["program_id"] for p in expected]
    assert window and all(0.0 <= p["arrival_s"] < 30.0 for p in window)
    assert window[0]["arrival_s"] == pytest.approx(expected[0]["arrival_s"] - 30.0)


def test_azure_bad_count_is_one_line_error(tmp_path):
    bad = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                   "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47.0000000,x,5\n")
    with pytest.raises(SourceTraceError, match=r":3: ContextTokens"):
        list(read_azure(bad))


# --- Mooncake ---------------------------------------------------------------------------

def test_mooncake_requests_carry_hash_ids():
    """Each request is a one-call program with input_tokens, its hash_ids and block 512."""
    path = reference(MOONCAKE_CONV)
    programs = list(read_mooncake(path, limit=200))
    check_trace(programs)
    with open(path) as f:
        source = [json.loads(next(f)) for _ in range(200)]
    for p, rec in zip(programs, source):
        assert p["block_size"] == 512
        (c,) = p["calls"]
        assert c["input_tokens"] == c["new_tokens"] == rec["input_length"]
        assert c["output_tokens"] == rec["output_length"]
        assert c["hash_ids"] == rec["hash_ids"]
        assert p["arrival_s"] == pytest.approx(rec["timestamp"] / 1000)
    shared = [p for p in programs[1:] if p["calls"][0]["hash_ids"][0] == 0]
    assert shared, "the trace's shared first block should show up in the slice"


def test_mooncake_rejects_hash_ids_that_do_not_cover_input(tmp_path):
    bad = tmp_path / "x_trace.jsonl"
    bad.write_text(json.dumps({"timestamp": 0, "input_length": 1025, "output_length": 3,
                               "hash_ids": [1, 2]}) + "\n")
    with pytest.raises(SourceTraceError, match=r":1: hash_ids"):
        list(read_mooncake(bad))


# --- synthetic --------------------------------------------------------------------------

@pytest.mark.parametrize("generate, params", [
    (swe_agent_programs, SweAgentParams(n_programs=20)),
    (chat_programs, ChatParams(n_programs=20)),
])
def test_synthetic_deterministic_under_seed(generate, params):
    """Same seed → identical programs; another seed → different ones."""
    a = list(generate(params, seed=1))
    b = list(generate(params, seed=1))
    c = list(generate(params, seed=2))
    check_trace(a)
    assert a == b
    assert json.dumps(a) == json.dumps(b)
    strip = [{k: v for k, v in p.items() if k != "meta"} for p in a]
    assert strip != [{k: v for k, v in p.items() if k != "meta"} for p in c]


def test_swe_agent_shape():
    """Shared prefix, 5-30 calls, known tools, test runs longer than bash, Poisson rate."""
    params = SweAgentParams(n_programs=400, rate_per_s=2.0)
    programs = list(swe_agent_programs(params, seed=5))
    check_trace(programs)
    assert {p["prefix"]["id"] for p in programs} == {"swe-agent-system-v1"}
    assert all(5 <= len(p["calls"]) <= 30 for p in programs)
    gaps = defaultdict(list)
    for p in programs:
        for c in p["calls"][:-1]:
            gaps[c["tool"]].append(c["tool_s"])
    assert set(gaps) == {"bash", "edit", "test", "search", "view"}
    median = {t: sorted(v)[len(v) // 2] for t, v in gaps.items()}
    assert median["test"] > 10 * median["bash"]
    span = programs[-1]["arrival_s"]
    assert 400 / span == pytest.approx(2.0, rel=0.15)


def test_chat_shape():
    """Human gaps of seconds to minutes and burstier-than-Poisson arrivals."""
    programs = list(chat_programs(ChatParams(n_programs=500, rate_per_s=1.0,
                                             burst_shape=0.25), seed=3))
    check_trace(programs)
    gaps = [c["tool_s"] for p in programs for c in p["calls"][:-1]]
    assert all(c["tool"] == "human" for p in programs for c in p["calls"][:-1])
    assert 10 < sorted(gaps)[len(gaps) // 2] < 40
    inter = [b["arrival_s"] - a["arrival_s"] for a, b in zip(programs, programs[1:])]
    mean = sum(inter) / len(inter)
    cv = (sum((x - mean) ** 2 for x in inter) / len(inter)) ** 0.5 / mean
    assert cv > 1.4  # Gamma shape 0.25 → CV 2; Poisson would give 1


def test_tiny_cpu_limits():
    """The tiny preset stays inside the ranges a vLLM-CPU run with a tiny model needs."""
    for seed in range(5):
        programs = list(tiny_cpu_programs(seed))
        check_trace(programs)
        assert 4 <= len(programs) <= 6
        for p in programs:
            assert p["prefix"]["tokens"] == 256
            assert 3 <= len(p["calls"]) <= 4
            assert all(50 <= c["new_tokens"] <= 300 for c in p["calls"])
            assert all(8 <= c["output_tokens"] <= 32 for c in p["calls"])
            assert all(0.05 <= c["tool_s"] <= 0.5 for c in p["calls"][:-1])
            assert p["arrival_s"] < 2.0
            assert max(prompt_lengths(p)) < 2000


def test_params_are_validated():
    with pytest.raises(ValueError):
        SweAgentParams(min_calls=0)
    with pytest.raises(ValueError):
        ChatParams(burst_shape=0)
    with pytest.raises(ValueError):
        SweAgentParams(rate_per_s=0)


# --- registry, writing, samples ---------------------------------------------------------

def test_registries():
    assert {"tracelab", "azure", "mooncake"} <= set(IMPORTERS)
    assert {"swe_agent", "chat"} <= set(GENERATORS)
    assert all(callable(f) for f in [*IMPORTERS.values(), *GENERATORS.values()])


def test_write_jsonl_round_trips(tmp_path):
    """write_jsonl returns the counts, writes one program per line, and is byte-stable."""
    programs = list(swe_agent_programs(TINY_CPU, seed=0))
    n = write_jsonl(iter(programs), tmp_path / "a.jsonl")
    write_jsonl(iter(programs), tmp_path / "b.jsonl")
    assert n == (len(programs), sum(len(p["calls"]) for p in programs))
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == programs
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def readme_counts() -> dict[str, tuple[int, int]]:
    text = (SAMPLES / "README.md").read_text()
    counts = {}
    for name, body in re.findall(r"^## `([^`]+\.jsonl)`\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        m = re.search(r"Programs / calls: (\d[\d,]*) / (\d[\d,]*)", body)
        assert m, f"README section for {name} has no 'Programs / calls' line"
        counts[name] = (int(m[1].replace(",", "")), int(m[2].replace(",", "")))
    return counts


def test_sample_traces_are_canonical_and_documented():
    """Every sample is well formed, small, and listed in the README with its true counts."""
    files = sorted(SAMPLES.glob("*.jsonl"))
    assert {f.name for f in files} >= {
        "swe_agent_small.jsonl", "tracelab_sessions.jsonl", "chat_multiturn.jsonl",
        "single_call_azure_conv.jsonl", "mooncake_conversation_small.jsonl", "tiny_cpu.jsonl"}
    documented = readme_counts()
    for f in files:
        programs = [json.loads(line) for line in f.read_text().splitlines()]
        check_trace(programs)
        assert f.stat().st_size < 400 * 1024, f"{f.name} is too big for a sample"
        assert documented.get(f.name) == (len(programs), sum(len(p["calls"]) for p in programs))


def test_samples_load_with_the_canonical_loader():
    """replay.trace (the project's loader and validator) accepts every sample unchanged."""
    trace = pytest.importorskip("replay.trace")
    for f in sorted(SAMPLES.glob("*.jsonl")):
        programs = trace.load_trace(f)
        raw = [json.loads(line) for line in f.read_text().splitlines()]
        assert [p.program_id for p in programs] == [p["program_id"] for p in raw]
        for spec, p in zip(programs, raw):
            assert list(spec.all_input_tokens()) == prompt_lengths(p)


def test_make_samples_reproduces_the_committed_files(tmp_path):
    """Regenerating the samples gives byte-identical files (real ones when the reference
    data is present)."""
    sys.path.insert(0, str(SAMPLES))
    try:
        import make_samples
    finally:
        sys.path.remove(str(SAMPLES))
    for name in make_samples.SAMPLES:
        try:
            programs = make_samples.build(name, REFERENCE)
        except FileNotFoundError:
            continue
        write_jsonl(programs, tmp_path / name)
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name
