"""The `vllm bench serve` importer on hand-made result files: its arithmetic, failed requests,
a shared prefix, and the clear errors for files it cannot replay (the real run is checked in
tests/integration/test_vllm_bench_import.py)."""

from __future__ import annotations

import json

import pytest

from validation.cli import main as validate_main
from validation.importers.llmservingsim import ImportError_
from validation.importers.vllm_bench import import_vllm_bench_run


def _result(**over):
    d = {"model_id": "m", "request_rate": 2.0, "completed": 2, "failed": 1,
         "start_times": [10.5, 10.0, 11.0], "input_lens": [300, 200, 100], "output_lens": [4, 3, 0],
         "ttfts": [0.05, 0.04, 0.0], "latencies": [0.11, 0.08, 0.0],
         "itls": [[0.02, 0.02, 0.02], [0.02, 0.02], []], "errors": ["", "", "timeout"]}
    d.update(over)
    return d


def test_import_arithmetic_failed_requests_and_prefix(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(_result()))
    run = import_vllm_bench_run(f, tmp_path / "m", prefix_tokens=64)
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["mean_ttft_ms"] == pytest.approx(45.0) and s["mean_e2el_ms"] == pytest.approx(95.0)
    assert s["mean_tpot_ms"] == pytest.approx(((0.11 - 0.05) / 3 + (0.08 - 0.04) / 2) / 2 * 1e3)
    assert s["mean_itl_ms"] == pytest.approx(20.0) and s["prefix_cache_hit_rate"] is None
    # programs in send order, arrivals from the first send; the prefix shared by all
    assert [p.program_id for p in run.programs] == ["req-000001", "req-000000", "req-000002"]
    assert [p.arrival_s for p in run.programs] == [0.0, 0.5, 1.0]
    assert all(p.prefix_tokens == 64 and p.prefix_id for p in run.programs)
    assert [p.input_tokens(0) for p in run.programs] == [200, 300, 100] and run.model == "m"


@pytest.mark.parametrize("change,msg", [
    ({"start_times": None}, "--save-detailed"),
    ({"ttfts": [0.1]}, "ttfts has 1 entries"),
    ({"start_times": [], "input_lens": [], "output_lens": [], "ttfts": [], "latencies": [], "itls": [],
      "errors": []}, "no requests"),
])
def test_files_that_cannot_be_replayed_are_refused_clearly(tmp_path, change, msg):
    f = tmp_path / "r.json"
    d = _result(**change)
    f.write_text(json.dumps({k: v for k, v in d.items() if v is not None}))
    with pytest.raises(ImportError_, match=msg):
        import_vllm_bench_run(f, tmp_path / "m")


def test_cli_import_writes_the_measured_dir_and_trace(tmp_path, capsys):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(_result()))
    assert validate_main(["import", "vllm-bench", str(f), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "calls.csv").exists() and (tmp_path / "m" / "trace.jsonl").exists()
    assert "asim-replay" in capsys.readouterr().out
    assert validate_main(["import", "vllm-bench", str(tmp_path / "nothere.json"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
