"""Async scheduling hides a step's host work behind the device's step: with `async_overlap`
the roofline and the operator model price a step at max(device, host), not device + host;
the deployment turns it on with the resolved engine.async_scheduling."""

from __future__ import annotations

import pytest

from replay.cli import _parse_set
from simulator.config import build_config
from simulator.deployment import build_deployment
from simulator.hardware import load_device, load_model
from simulator.latency import LinearStepModel, OperatorModel, RooflineModel
from simulator.latency.base import StepFeatures, step_features

HOST = 1.5e-3
HOST_SEQ = 2e-6
MODEL = "llama-3.2-1b"  # small enough that a lone decode on an H100 is faster than the host work


@pytest.fixture(scope="module")
def h100_1b():
    return load_model(MODEL), load_device("h100-sxm")[0]


def _models(model, device):
    kw = dict(host_overhead_s=HOST, host_overhead_per_seq_s=HOST_SEQ)
    return (RooflineModel(model, device, 1, **kw), RooflineModel(model, device, 1, async_overlap=True, **kw),
            RooflineModel(model, device, 1, host_overhead_s=0.0, host_overhead_per_seq_s=0.0))


def _decode(B, ctx):
    return StepFeatures(0, 0.0, 0, 0, B, B * ctx, B)


def test_small_decode_batch_takes_the_host_time(h100_1b):
    """One decode of Llama-3.2-1B on an H100 (2.5 GB of weights at 80 % of 3.35 TB/s, about
    0.9 ms) is faster than the 1.5 ms of host work: the step takes the host time."""
    sync, over, dev_only = _models(*h100_1b)
    f = _decode(1, 100)
    device = dev_only.time_of(f)
    host = HOST + HOST_SEQ * 1
    assert device < host  # the premise of the case
    assert over.time_of(f) == host
    assert over.decode_step_time(1, 100) == host
    b = over.breakdown(f)
    assert b["total"] == host
    assert b["host"] == pytest.approx(host - device, rel=1e-12)  # only the exposed host time
    assert sum(v for k, v in b.items() if k != "total") == pytest.approx(b["total"], rel=1e-12)


def test_big_batch_takes_the_device_time(h100_1b):
    """A prefill of 8192 tokens (compute-bound, tens of ms) and a decode batch of 512 over 4000
    tokens each (KV reads) take far longer than the host work, which is hidden."""
    sync, over, dev_only = _models(*h100_1b)
    f = step_features([(8192, 0)], 0, 0, 1)
    device = dev_only.time_of(f)
    assert device > HOST + HOST_SEQ  # the premise
    assert over.time_of(f) == device
    b = over.breakdown(f)
    assert b["host"] == 0.0 and b["total"] == device
    # a big decode batch likewise, on the hot path
    B, ctx = 512, 4000
    d = dev_only.decode_step_time(B, B * ctx)
    assert d > HOST + HOST_SEQ * B
    assert over.decode_step_time(B, B * ctx) == d


def test_async_off_is_device_plus_host(h100_1b):
    sync, over, dev_only = _models(*h100_1b)
    for f, host in ((_decode(1, 100), HOST + HOST_SEQ), (step_features([(8192, 0)], 0, 0, 1), HOST + HOST_SEQ)):
        assert sync.time_of(f) == pytest.approx(dev_only.time_of(f) + host, rel=1e-12)
        assert sync.breakdown(f)["host"] == host
        assert over.time_of(f) < sync.time_of(f)
    assert sync.decode_step_time(1, 100) == pytest.approx(dev_only.decode_step_time(1, 100) + HOST + HOST_SEQ,
                                                         rel=1e-12)
    assert "async_overlap" not in sync.describe() and over.describe()["async_overlap"] is True


def _operator_model(host_s, async_overlap):
    _, prof = load_device("h100-sxm-llama-2-7b")
    return OperatorModel.from_profile(prof["latency_model"], load_model("llama-2-7b"), 1, profile=prof,
                                      host_overhead_s=host_s, async_overlap=async_overlap)


def test_operator_model_overlaps_its_host_term():
    plain = _operator_model(0.0, False)
    sync, over = _operator_model(0.05, False), _operator_model(0.05, True)  # 50 ms: more than any small step
    d = plain.decode_step_time(4, 400)
    assert sync.decode_step_time(4, 400) == pytest.approx(d + 0.05, rel=1e-12)
    assert over.decode_step_time(4, 400) == 0.05
    p = plain.step_time([(256, 0)], 2, 200, 3)
    assert over.step_time([(256, 0)], 2, 200, 3) == 0.05
    b = over.breakdown_step([(256, 0)], 2, 200)
    assert b["total"] == 0.05 and b["host"] == pytest.approx(0.05 - p, rel=1e-9)
    small = _operator_model(1e-5, True)  # 10 µs: hidden behind any step
    assert small.decode_step_time(4, 400) == d
    assert small.step_time([(256, 0)], 2, 200, 3) == p
    # no host overhead (the imported GPU profiles): overlap changes nothing
    assert _operator_model(0.0, True).decode_step_time(4, 400) == d


def _deployment(*sets):
    model, (device, _) = load_model(MODEL), load_device("h100-sxm")
    return build_deployment(model, device, build_config(None, _parse_set(list(sets))))


def test_deployment_wires_async_scheduling_to_the_overlap():
    on = _deployment()
    assert on.engine.async_scheduling is True  # the default on a GPU at the default vLLM version
    assert on.latency.async_overlap is True
    off = _deployment("engine.async_scheduling=false")
    assert off.engine.async_scheduling is False and off.latency.async_overlap is False
    assert _deployment("engine.vllm_version=0.11.0").latency.async_overlap is False
    # a lone decode: the host time (1.5 ms by default) with async, device + host without
    host = on.latency.host_s + on.latency.host_seq_s
    assert on.latency.decode_step_time(1, 100) == host
    assert off.latency.decode_step_time(1, 100) > host


def test_linear_profile_is_not_overlapped():
    """A linear (vLLM-CPU) profile's intercept is a measured synchronous step period."""
    model, (device, _) = load_model("llama-3.1-8b"), load_device("h100-sxm")
    prof = {"latency_model": {"kind": "linear", "intercept": 0.002, "coefficients": {"num_decodes": 1e-4}}}
    dep = build_deployment(model, device, build_config(None, {"engine.async_scheduling": True}), prof)
    assert isinstance(dep.latency, LinearStepModel)
    assert dep.latency.decode_step_time(3, 300) == pytest.approx(0.002 + 3e-4)


def test_a_step_scheduled_at_its_launch_hides_no_host_work():
    """A lone call on an idle engine: its prefill step is scheduled when it arrives, with no
    step running to hide the host work behind, so it costs device + host as in the
    synchronous engine (the same first token); its decode steps are each scheduled while the
    one before runs and take max(device, host). With Llama-3.2-1B on an H100 a decode is
    faster than the host work: every decode step after the first takes the host time."""
    from simkit import call, program, run_sim
    from simulator.latency.base import without_overlap

    progs = [program("a", 0.0, [call(200, 20)])]
    rows = {}
    for mode in ("true", "false"):
        cfg = build_config({}, _parse_set([f"engine.async_scheduling={mode}", f"latency.host_overhead_s={HOST}",
                                           "latency.host_overhead_per_seq_s=0"]))
        dep = build_deployment(load_model(MODEL), load_device("h100-sxm")[0], cfg)
        res, sim = run_sim(progs, dep)
        rows[mode] = res.calls[0]
    sync, asyn = rows["false"], rows["true"]
    assert asyn["first_token_s"] == sync["first_token_s"]
    # tokens 2..20 come from 19 decode steps; the first of them was scheduled while the
    # prefill ran, as every later one while its predecessor ran
    assert asyn["finish_s"] - asyn["first_token_s"] == pytest.approx(19 * HOST, rel=1e-9)
    assert sync["finish_s"] - sync["first_token_s"] > 19 * HOST * 1.4  # device + host each
    over = RooflineModel(load_model(MODEL), load_device("h100-sxm")[0], 1, host_overhead_s=HOST,
                         async_overlap=True)
    serial = without_overlap(over)
    assert serial is not over and not serial.async_overlap and over.async_overlap
    assert serial.decode_step_time(1, 100) > over.decode_step_time(1, 100) == HOST
