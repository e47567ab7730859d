"""The canonical trace loader: good traces load, every bad input is a TraceError that names
the file's line number and the field."""

from __future__ import annotations

import copy
import json

import pytest

from simkit import GOOD_LINE, write_jsonl
from replay.trace import TraceError, load_trace, program_to_dict, write_trace


def _line(**over):
    d = copy.deepcopy(GOOD_LINE)
    d["program_id"] = "bad-1"
    d.update(over)
    return d


def _with_call(k, **over):
    d = _line()
    d["calls"][k].update(over)
    return d


def _err(tmp_path, bad) -> str:
    """Load a trace whose line 2 is `bad`; return the error message."""
    p = write_jsonl(tmp_path / "t.jsonl", [GOOD_LINE, bad])
    with pytest.raises(TraceError) as e:
        load_trace(p)
    return str(e.value)


def test_good_trace_loads_sorted_by_arrival(tmp_path):
    """A valid trace loads every program, sorted by arrival_s (stable)."""
    late = dict(GOOD_LINE, program_id="late", arrival_s=5.0)
    early = dict(GOOD_LINE, program_id="early", arrival_s=1.0)
    tie = dict(GOOD_LINE, program_id="tie", arrival_s=1.0)
    progs = load_trace(write_jsonl(tmp_path / "t.jsonl", [late, early, tie]))
    assert [p.program_id for p in progs] == ["early", "tie", "late"]


def test_input_tokens_follow_the_append_only_rule(tmp_path):
    """input_tokens(k) = prefix + sum_{j<k}(new_j + out_j) + new_k."""
    d = {"program_id": "p", "arrival_s": 0, "prefix": {"id": "s", "tokens": 100},
         "calls": [{"new_tokens": 10, "output_tokens": 3}, {"new_tokens": 7, "output_tokens": 2},
                   {"new_tokens": 1, "output_tokens": 1}]}
    (p,) = load_trace(write_jsonl(tmp_path / "t.jsonl", [d]))
    assert p.all_input_tokens() == [110, 120, 123]
    assert [p.input_tokens(k) for k in range(3)] == [110, 120, 123]


def test_write_then_load_round_trips(tmp_path):
    """write_trace then load_trace gives back equal programs."""
    d = {"program_id": "p", "arrival_s": 1.5, "prefix": {"id": "s", "tokens": 64}, "block_size": 16,
         "calls": [{"new_tokens": 10, "output_tokens": 3, "tool": "bash", "tool_s": 0.5},
                   {"new_tokens": 0, "output_tokens": 2, "input_tokens": 40, "hash_ids": [1, 2]},
                   {"new_tokens": 3, "output_tokens": 1, "after": [0, 1]}],
         "meta": {"source": "x"}}
    progs = load_trace(write_jsonl(tmp_path / "a.jsonl", [d]))
    write_trace(progs, tmp_path / "b.jsonl")
    assert load_trace(tmp_path / "b.jsonl") == progs
    assert program_to_dict(progs[0])["meta"] == {"source": "x"}


def test_blank_lines_are_skipped_but_counted(tmp_path):
    """Blank lines are ignored; a later error still names the file's real line number."""
    p = write_jsonl(tmp_path / "t.jsonl", [GOOD_LINE, "", "{oops"])
    with pytest.raises(TraceError, match=r":3: line:"):
        load_trace(p)


BAD_LINES = {
    "unknown program key": (_line(colour="red"), "colour"),
    "unknown prefix key": (_line(prefix={"id": "s", "tokens": 4, "hash": 1}), "prefix.hash"),
    "unknown call key": (_with_call(0, temperature=0.7), "calls[0].temperature"),
    "negative new_tokens": (_with_call(0, new_tokens=-1), "calls[0].new_tokens"),
    "float new_tokens": (_with_call(0, new_tokens=1.5), "calls[0].new_tokens"),
    "integral float new_tokens": (_with_call(0, new_tokens=10.0), "calls[0].new_tokens"),
    "string new_tokens": (_with_call(0, new_tokens="10"), "calls[0].new_tokens"),
    "bool new_tokens": (_with_call(0, new_tokens=True), "calls[0].new_tokens"),
    "bool output_tokens": (_with_call(1, output_tokens=True), "calls[1].output_tokens"),
    "zero output_tokens": (_with_call(1, output_tokens=0), "calls[1].output_tokens"),
    "missing output_tokens": (_line(calls=[{"new_tokens": 3}]), "calls[0].output_tokens"),
    "missing new_tokens": (_line(calls=[{"output_tokens": 3}]), "calls[0].new_tokens"),
    "negative prefix tokens": (_line(prefix={"id": "s", "tokens": -4}), "prefix.tokens"),
    "bool prefix tokens": (_line(prefix={"id": "s", "tokens": False}), "prefix.tokens"),
    "prefix without id": (_line(prefix={"tokens": 4}), "prefix.id"),
    "zero input_tokens": (_with_call(0, input_tokens=0), "calls[0].input_tokens"),
    "empty prompt": (_line(calls=[{"new_tokens": 0, "output_tokens": 1}]), "calls[0].new_tokens"),
    "negative tool_s": (_with_call(0, tool_s=-0.1), "calls[0].tool_s"),
    "string tool_s": (_with_call(0, tool_s="1"), "calls[0].tool_s"),
    "non-string tool": (_with_call(0, tool=3), "calls[0].tool"),
    "missing calls": ({"program_id": "bad-1", "arrival_s": 0}, "calls"),
    "empty calls": (_line(calls=[]), "calls"),
    "calls not a list": (_line(calls={"new_tokens": 1}), "calls"),
    "call not an object": (_line(calls=[5]), "calls[0]"),
    "missing arrival_s": ({"program_id": "bad-1", "calls": GOOD_LINE["calls"]}, "arrival_s"),
    "negative arrival_s": (_line(arrival_s=-1), "arrival_s"),
    "string arrival_s": (_line(arrival_s="0"), "arrival_s"),
    "bool arrival_s": (_line(arrival_s=True), "arrival_s"),
    "nan arrival_s": ('{"program_id": "bad-1", "arrival_s": NaN, "calls": [{"new_tokens": 1, "output_tokens": 1}]}',
                      "arrival_s"),
    "missing program_id": ({"arrival_s": 0, "calls": GOOD_LINE["calls"]}, "program_id"),
    "empty program_id": (_line(program_id=""), "program_id"),
    "numeric program_id": (_line(program_id=7), "program_id"),
    "meta not an object": (_line(meta=[1]), "meta"),
    "after forward": (_with_call(0, after=[1]), "calls[0].after"),
    "after self": (_with_call(1, after=[1]), "calls[1].after"),
    "after negative": (_with_call(1, after=[-1]), "calls[1].after"),
    "after duplicate": (_line(calls=GOOD_LINE["calls"] + [{"new_tokens": 1, "output_tokens": 1, "after": [0, 0]}]),
                        "calls[2].after"),
    "after not a list": (_with_call(1, after=0), "calls[1].after"),
    "after of strings": (_with_call(1, after=["0"]), "calls[1].after"),
    "hash_ids without block_size": (_with_call(0, input_tokens=32, hash_ids=[1, 2]), "block_size"),
    "hash_ids without input_tokens": (dict(_with_call(0, hash_ids=[1, 2]), block_size=16), "calls[0].input_tokens"),
    "hash_ids not integers": (dict(_with_call(0, input_tokens=32, hash_ids=[1, "x"]), block_size=16),
                              "calls[0].hash_ids"),
    "zero block_size": (_line(block_size=0), "block_size"),
    "line not an object": ("[1, 2]", "line"),
    "line not JSON": ('{"program_id": "bad-1", ', "line"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_line_number_and_field(tmp_path, case):
    """Each bad input raises TraceError '<file>:2: <field>: ...'."""
    bad, field = BAD_LINES[case]
    msg = _err(tmp_path, bad)
    assert f"t.jsonl:2: {field}:" in msg


def test_duplicate_program_id_names_both_lines(tmp_path):
    """A repeated program_id is reported on its second line, naming the first."""
    p = write_jsonl(tmp_path / "t.jsonl", [GOOD_LINE, dict(GOOD_LINE, arrival_s=1.0), _line()])
    with pytest.raises(TraceError) as e:
        load_trace(p)
    assert "t.jsonl:2: program_id:" in str(e.value) and "line 1" in str(e.value)


def test_error_message_is_one_line(tmp_path):
    """A TraceError message is a single line."""
    assert "\n" not in _err(tmp_path, _with_call(0, new_tokens=-1))


def test_empty_trace_is_an_error(tmp_path):
    """A trace with no programs is an error."""
    p = tmp_path / "t.jsonl"
    p.write_text("\n\n")
    with pytest.raises(TraceError, match="no programs"):
        load_trace(p)


def test_missing_file_is_a_trace_error(tmp_path):
    """A path that does not exist is a TraceError (not a bare OSError)."""
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "nope.jsonl")


def test_hash_ids_with_block_size_load(tmp_path):
    """A line with hash_ids, input_tokens and block_size is valid."""
    d = dict(_with_call(0, input_tokens=32, hash_ids=[1, 2]), block_size=16)
    (p,) = load_trace(write_jsonl(tmp_path / "t.jsonl", [d]))
    assert p.calls[0].hash_ids == (1, 2) and p.block_size == 16


def test_valid_dag_loads(tmp_path):
    """after lists of earlier calls load as tuples and define the parents."""
    d = _line(calls=[{"new_tokens": 4, "output_tokens": 1}, {"new_tokens": 4, "output_tokens": 1, "after": []},
                     {"new_tokens": 4, "output_tokens": 1, "after": [0, 1]}])
    (p,) = load_trace(write_jsonl(tmp_path / "t.jsonl", [d]))
    assert [p.parents(k) for k in range(3)] == [(), (), (0, 1)]


def test_good_line_fixture_is_valid(tmp_path):
    """The GOOD_LINE used by the bad-line cases loads on its own."""
    assert len(load_trace(write_jsonl(tmp_path / "t.jsonl", [json.dumps(GOOD_LINE)]))) == 1
