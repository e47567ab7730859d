"""asim-replay end to end (replay.cli.main): determinism of every output file, fast-forward
equivalence, and user errors as one line and exit code 2."""

from __future__ import annotations

import json
import random

import pytest

from simkit import GOOD_LINE, write_jsonl
from replay.cli import main

RESULT_FILES = ("calls.csv", "programs.csv", "timeseries.csv", "summary.json")


def _workload(n=16, seed=5):
    """Agent programs with shared prefixes, tool gaps and a DAG, arriving within ~0.3 s: on
    80 blocks per instance they preempt and reuse prefixes."""
    rng = random.Random(seed)
    out = []
    t = 0.0
    for i in range(n):
        t += rng.uniform(0.0, 0.02)
        calls = []
        for _ in range(rng.randint(1, 4)):
            calls.append({"new_tokens": rng.randint(20, 150), "output_tokens": rng.randint(1, 120),
                          "tool": rng.choice(["bash", "edit", "search"]), "tool_s": round(rng.uniform(0.0, 0.3), 3)})
        calls[-1].pop("tool_s")
        if i % 5 == 4 and len(calls) >= 3:
            calls[2]["after"] = [0]
        line = {"program_id": f"p{i:02d}", "arrival_s": round(t, 4), "calls": calls}
        if i % 3:
            line["prefix"] = {"id": f"sys-{i % 2}", "tokens": 200 + 56 * (i % 2)}
        out.append(line)
    return out


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("trace") / "w.jsonl", _workload())


BASE = ["--hardware", "h100-sxm", "--model", "tiny-llama", "--quiet",
        "--set", "engine.num_gpu_blocks_override=80", "--set", "metrics.sample_interval_s=0.05",
        "--set", "cluster.instances=2", "--set", "policy.router=prefix-aware"]


def _run(trace, out, *extra):
    rc = main([str(trace), "--out", str(out), *BASE, *extra])
    assert rc == 0
    return {f: (out / f).read_bytes() for f in RESULT_FILES + ("steps.csv",) if (out / f).exists()}


def test_same_inputs_give_byte_identical_outputs(trace, tmp_path):
    """Two runs with the same trace, config and seed write byte-identical result files."""
    a = _run(trace, tmp_path / "a", "--seed", "3")
    b = _run(trace, tmp_path / "b", "--seed", "3")
    for f in RESULT_FILES:
        assert a[f] == b[f], f


def test_workload_exercises_preemption_and_reuse(trace, tmp_path):
    """The determinism workload really preempts and hits the prefix cache (not a trivial run)."""
    s = json.loads(_run(trace, tmp_path / "a")["summary.json"])
    assert s["preemptions"] > 0 and s["prefix_cache_hit_rate"] > 0.1
    assert s["completed"] == sum(len(p["calls"]) for p in _workload())


@pytest.mark.parametrize("policy", ["--set=policy.kv=lru", "--set=policy.kv=pin-ttl", "--set=policy.kv=drop",
                                    "--set=policy.scheduler=plas", "--set=policy.scheduler=program-fcfs",
                                    "--set=policy.kv=offload"])
def test_fast_forward_on_and_off_give_identical_calls(trace, tmp_path, policy):
    """fast_forward=true and false write identical calls.csv and programs.csv."""
    on = _run(trace, tmp_path / "on", policy, "--set", "fast_forward=true")
    off = _run(trace, tmp_path / "off", policy, "--set", "fast_forward=false")
    assert on["calls.csv"] == off["calls.csv"]
    assert on["programs.csv"] == off["programs.csv"]


def test_fast_forward_on_and_off_give_identical_timeseries(trace, tmp_path):
    """fast_forward does not change the sampled timeseries (state seen mid-run)."""
    on = _run(trace, tmp_path / "on", "--set", "fast_forward=true")
    off = _run(trace, tmp_path / "off", "--set", "fast_forward=false")
    assert on["timeseries.csv"] == off["timeseries.csv"]


def test_fast_forward_on_and_off_give_identical_latency_summary(trace, tmp_path):
    """fast_forward does not change any latency statistic (ITL included)."""
    on = json.loads(_run(trace, tmp_path / "on", "--set", "fast_forward=true")["summary.json"])
    off = json.loads(_run(trace, tmp_path / "off", "--set", "fast_forward=false")["summary.json"])
    keys = [k for k in on if k.endswith("_ms") or k.endswith("_jct_s")]
    assert {k: on[k] for k in keys} == {k: off[k] for k in keys}
    assert [i["steps"] for i in on["instances"]] == [i["steps"] for i in off["instances"]]


def test_results_layout_has_the_documented_columns(trace, tmp_path):
    """calls.csv and programs.csv start with the columns DESIGN.md lists."""
    files = _run(trace, tmp_path / "a")
    calls_head = files["calls.csv"].decode().splitlines()[0].split(",")
    assert calls_head[:14] == ["program_id", "call_index", "instance", "arrival_s", "scheduled_s", "first_token_s",
                               "finish_s", "input_tokens", "cached_tokens", "output_tokens", "ttft_s", "tpot_s",
                               "e2e_s", "preemptions"]
    prog_head = files["programs.csv"].decode().splitlines()[0].split(",")
    assert prog_head[:6] == ["program_id", "arrival_s", "finish_s", "jct_s", "calls", "tool_s_total"]


# --- user errors ----------------------------------------------------------------------------


def _expect_user_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("asim-replay: error:")
    return err


def test_bad_trace_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    """A bad trace: exit 2, one line naming line and field, no results directory."""
    bad = dict(GOOD_LINE, program_id="x", calls=[{"new_tokens": -3, "output_tokens": 1}])
    trace = write_jsonl(tmp_path / "bad.jsonl", [GOOD_LINE, bad])
    out = tmp_path / "res"
    err = _expect_user_error(capsys, [str(trace), "--out", str(out), *BASE])
    assert "bad.jsonl:2: calls[0].new_tokens" in err
    assert not out.exists()


def test_missing_trace_exits_2(tmp_path, capsys):
    """A trace path that does not exist: exit 2, one line."""
    _expect_user_error(capsys, [str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r"), *BASE])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting", ["engine.bogus=1", "bogus.key=1", "seed.x.y=1", "engine.max_num_seqs=0",
                                     "tools.mode=sometimes", "engine=3", "novalue"])
def test_bad_set_exits_2(trace, tmp_path, capsys, setting):
    """An unknown or invalid --set: exit 2, one line, nothing written."""
    _expect_user_error(capsys, [str(trace), "--out", str(tmp_path / "r"), *BASE, "--set", setting])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting", ["policy.scheduler=sjf", "policy.kv=keep-forever", "policy.router=random"])
def test_unknown_policy_exits_2(trace, tmp_path, capsys, setting):
    """An unknown policy name: exit 2, one line naming it, nothing written."""
    err = _expect_user_error(capsys, [str(trace), "--out", str(tmp_path / "r"), *BASE, "--set", setting])
    assert setting.split("=")[1] in err
    assert not (tmp_path / "r").exists()


def test_unknown_hardware_exits_2(trace, tmp_path, capsys):
    """An unknown --hardware name: exit 2, one line listing known devices, nothing written."""
    argv = [str(trace), "--out", str(tmp_path / "r"), "--hardware", "tpu-v9", "--model", "tiny-llama", "--quiet"]
    err = _expect_user_error(capsys, argv)
    assert "tpu-v9" in err and "h100-sxm" in err
    assert not (tmp_path / "r").exists()


def test_unknown_model_exits_2(trace, tmp_path, capsys):
    """An unknown --model name: exit 2, one line."""
    argv = [str(trace), "--out", str(tmp_path / "r"), "--hardware", "h100-sxm", "--model", "gpt-17", "--quiet"]
    assert "gpt-17" in _expect_user_error(capsys, argv)


def test_missing_hardware_exits_2(trace, tmp_path, capsys):
    """A simulated replay without --hardware: exit 2, one line."""
    _expect_user_error(capsys, [str(trace), "--out", str(tmp_path / "r"), "--model", "tiny-llama", "--quiet"])


def test_missing_config_file_exits_2(trace, tmp_path, capsys):
    """A --config path that does not exist: exit 2, one line."""
    _expect_user_error(capsys, [str(trace), "--out", str(tmp_path / "r"), *BASE, "--config", str(tmp_path / "c.yaml")])


def test_config_file_and_set_combine(trace, tmp_path):
    """A --config YAML and --set overrides both reach the run's recorded config."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("policy:\n  kv: drop\nengine:\n  max_num_seqs: 7\n")
    out = tmp_path / "r"
    assert main([str(trace), "--out", str(out), *BASE, "--config", str(cfg), "--set", "engine.max_num_seqs=9"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["policy"]["kv"] == "drop"
    assert s["deployment"]["engine"]["max_num_seqs"] == 9


def test_step_log_is_identical_with_and_without_fast_forward(trace, tmp_path):
    """metrics.step_log writes one row per engine step; a decode run fast-forwarded logs the
    same steps, ends and periods as stepping one at a time."""
    on = _run(trace, tmp_path / "on", "--set", "fast_forward=true", "--set", "metrics.step_log=true")
    off = _run(trace, tmp_path / "off", "--set", "fast_forward=false", "--set", "metrics.step_log=true")
    assert on["steps.csv"] == off["steps.csv"]
    rows = on["steps.csv"].decode().splitlines()
    assert rows[0] == "t_s,instance,num_prefill_reqs,num_prefill_tokens,num_decode_reqs,period_ms,elapsed_ms"
    s = json.loads(on["summary.json"])
    assert len(rows) - 1 == sum(i["steps"] for i in s["instances"])
    assert "steps.csv" not in _run(trace, tmp_path / "none")  # off by default


# -- design-space sweeps ------------------------------------------------------------------------


def _sweep(trace, out, *extra, rc=0):
    got = main([str(trace), "--out", str(out), *BASE, *extra])
    assert got == rc
    return out


def test_sweep_points_equal_single_replays(trace, tmp_path):
    """Each point of a 2 x 2 grid, run in a process pool, writes exactly the files a plain
    asim-replay with those --set values writes; sweep.csv has one row per point with its values."""
    out = _sweep(trace, tmp_path / "sw", "--sweep", "policy.kv=lru,drop", "--sweep", "engine.max_num_seqs=2,64",
                 "--jobs", "2")
    import csv
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["policy.kv"], r["engine.max_num_seqs"]) for r in rows] == [
        ("lru", "2"), ("lru", "64"), ("drop", "2"), ("drop", "64")]
    calls = sum(len(p["calls"]) for p in _workload())
    for r in rows:
        assert r["error"] == "" and int(r["completed"]) == calls
        single = _run(trace, tmp_path / r["point"], "--set", f"policy.kv={r['policy.kv']}",
                      "--set", f"engine.max_num_seqs={r['engine.max_num_seqs']}")
        for f in RESULT_FILES:
            assert (out / r["point"] / f).read_bytes() == single[f], (r["point"], f)
    # the points differ (the sweep is not one run copied four times). (With async scheduling
    # this tiny model's steps all take the 1.5 ms of host work, which hides the device's, so
    # lru and drop at 64 seats time alike; their prefix-cache hits differ.)
    assert len({(r["mean_ttft_ms"], r["prefix_cache_hit_rate"]) for r in rows}) == 4


def test_sweep_hardware_axis_and_in_process(trace, tmp_path):
    """`hardware` is swept like a config key; --jobs 1 runs in this process, same files."""
    # (no host overhead: with async scheduling it would hide this tiny model's device time on both)
    nohost = ("--set", "latency.host_overhead_s=0")
    a = _sweep(trace, tmp_path / "a", "--sweep", "hardware=h100-sxm,a100-80gb-sxm", "--jobs", "1", *nohost)
    b = _sweep(trace, tmp_path / "b", "--sweep", "hardware=h100-sxm,a100-80gb-sxm", "--jobs", "2", *nohost)
    for point in ("hardware=h100-sxm", "hardware=a100-80gb-sxm"):
        for f in RESULT_FILES:
            assert (a / point / f).read_bytes() == (b / point / f).read_bytes()
    h100 = json.loads((a / "hardware=h100-sxm" / "summary.json").read_text())
    a100 = json.loads((a / "hardware=a100-80gb-sxm" / "summary.json").read_text())
    assert a100["mean_tpot_ms"] > h100["mean_tpot_ms"]


@pytest.mark.parametrize("args,msg", [
    (["--sweep", "policy.kv=lru,bogus"], "sweep point policy.kv=bogus: unknown kv policy"),
    (["--sweep", "hardware=h100-sxm,nope"], "sweep point hardware=nope: unknown hardware"),
    (["--sweep", "engine.max_num_seqs=4,-1"], "sweep point engine.max_num_seqs=-1"),
    (["--sweep", "policy.kv=lru", "--sweep", "policy.kv=drop"], "given twice"),
    (["--sweep", "policy.kv=lru,,drop"], "an empty value"),
    (["--sweep", "policy.kv=lru,lru"], "a value repeats"),
    (["--sweep", "policy.kv"], "--sweep expects KEY=V1,V2"),
    (["--sweep", "policy.kv=lru", "--jobs", "0"], "--jobs must be >= 1"),
])
def test_sweep_bad_values_stop_before_anything_runs(trace, tmp_path, capsys, args, msg):
    out = tmp_path / "sw"
    _sweep(trace, out, *args, rc=2)
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_sweep_point_failing_while_running_is_reported_and_others_run(trace, tmp_path, monkeypatch, capsys):
    """A point that raises mid-run gets its error in sweep.csv (exit 1); the others complete."""
    import csv

    from replay import sweep

    real = sweep._run_point

    def flaky(programs, point, out_dir, trace_name):
        if point.name == "policy.kv=drop":
            raise RuntimeError("disk full\nsecond line")
        return real(programs, point, out_dir, trace_name)

    monkeypatch.setattr(sweep, "_run_point", flaky)
    out = _sweep(trace, tmp_path / "sw", "--sweep", "policy.kv=lru,drop,pin-ttl", "--jobs", "1", rc=1)
    rows = {r["point"]: r for r in csv.DictReader(open(out / "sweep.csv"))}
    assert rows["policy.kv=drop"]["error"] == "RuntimeError: disk full"
    assert rows["policy.kv=drop"]["completed"] == ""
    for ok in ("policy.kv=lru", "policy.kv=pin-ttl"):
        assert rows[ok]["error"] == "" and (out / ok / "summary.json").exists()
