"""Multi-GPU pieces: NCCL collective cost arithmetic, the tensor-parallel collectives of a
step, and data-parallel lockstep."""

from __future__ import annotations

import pytest
from simkit import make_deployment, program, call, rows_by_call, run_sim

from simulator.config import ClusterConfig, ConfigError
from simulator.hardware import LinkSpec, NcclLinkSpec, load_device, load_link
from simulator.latency.base import LatencyModel
from simulator.latency.collectives import nccl_ring_time_s
from simulator.latency.operators import Collective

US = 1e-6


# -- NCCL cost model ---------------------------------------------------------------------------


def test_nccl_all_reduce_two_gpus_arithmetic():
    """2-GPU ring all-reduce: 2 steps; LL = 6.6 + 2·1.0 us + B/(bw/4), Simple = 8.4 + 2·5.7 us + B/bw."""
    bw = 15e9
    small, proto = nccl_ring_time_s("all_reduce", 2, 4096, bw, "pci")
    assert proto == "LL"
    assert small == pytest.approx(8.6 * US + 4096 / (bw / 4))
    big, proto = nccl_ring_time_s("all_reduce", 2, 4 << 20, bw, "pci")
    assert proto == "Simple"
    assert big == pytest.approx(19.8 * US + (4 << 20) / bw)


def test_nccl_gather_moves_half_the_buffer_on_two_gpus():
    """All-gather / reduce-scatter of a B-byte total among 2: one step, (n-1)/n·B over the bus."""
    bw = 15e9
    t, proto = nccl_ring_time_s("all_gather", 2, 8 << 20, bw, "pci")
    assert proto == "Simple"
    assert t == pytest.approx((8.4 + 5.7) * US + (8 << 20) / 2 / bw)
    assert nccl_ring_time_s("reduce_scatter", 2, 8 << 20, bw, "pci")[0] == pytest.approx(t)


def test_nccl_time_grows_with_gpus_and_bytes_and_is_free_alone():
    """More GPUs or more bytes never make a collective cheaper; one GPU costs nothing."""
    bw = 40e9
    assert nccl_ring_time_s("all_reduce", 1, 1 << 20, bw)[0] == 0.0
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        ts = [nccl_ring_time_s(kind, n, 1 << 20, bw)[0] for n in (2, 4, 8)]
        assert ts == sorted(ts)
        sizes = [nccl_ring_time_s(kind, 4, b, bw)[0] for b in (1 << 10, 1 << 16, 1 << 20, 1 << 24)]
        assert sizes == sorted(sizes)


def test_collective_uses_nccl_model_when_the_link_has_one():
    """A link file with an nccl section is priced by NCCL's model, not the spec formula."""
    link = load_link("pcie5-x16-no-p2p")
    assert link.nccl is not None and not link.nccl.p2p
    c = Collective("all_reduce", 2, link=link)
    nbytes = 128 * 5120 * 2
    assert c.time_s(nbytes) == pytest.approx(nccl_ring_time_s("all_reduce", 2, nbytes, link.nccl.bus_bandwidth_Bps)[0])
    plain = LinkSpec(name="x", kind="pcie", bandwidth_Bps=63e9, latency_s=5e-6, allreduce_efficiency=0.6)
    assert Collective("all_reduce", 2, link=plain).time_s(nbytes) == pytest.approx(2 * 5e-6 + nbytes / (63e9 * 0.6))
    with_nccl = LinkSpec(name="y", kind="pcie", bandwidth_Bps=63e9, latency_s=5e-6,
                         nccl=NcclLinkSpec(bus_bandwidth_Bps=63e9 * 0.6))
    assert Collective("all_reduce", 2, link=with_nccl).time_s(nbytes) != pytest.approx(
        Collective("all_reduce", 2, link=plain).time_s(nbytes))


def test_tp_step_adds_embedding_all_reduce_and_logits_gather():
    """At TP 2 a step pays 2 all-reduces per layer + 1 for the vocab-parallel embedding, and an
    all-gather of the logits (sequences x vocab x dtype)."""
    from simulator.deployment import build_deployment
    from simulator.config import build_config
    from simulator.hardware import load_device, load_model

    device, profile = load_device("rtx-pro-6000-qwen3-32b")
    model = load_model("qwen3-32b")
    dep = build_deployment(model, device, build_config(None, {"cluster.tensor_parallel_size": 2}), profile)
    lat = dep.latency
    T, S = 128, 128
    parts = lat.breakdown_step([], T, T * 1000)
    ar = lat.allreduce.time_s(T * model.hidden_size * model.dtype_bytes)
    assert parts["allreduce"] == pytest.approx((2 * model.num_layers + 1) * ar)
    vocab = -(-model.vocab_size // 64) * 64
    assert parts["logits_all_gather"] == pytest.approx(lat.logits_gather.time_s(S * vocab * model.dtype_bytes))
    assert lat.decode_step_time(T, T * 1000) == pytest.approx(parts["total"], rel=1e-9)


# -- data-parallel lockstep ----------------------------------------------------------------------


class PrefillSlow(LatencyModel):
    """A step with any prefill takes 0.1 s; a pure-decode step 0.01 s."""

    kind = "test"

    def time_of(self, f) -> float:
        return 0.1 if f.num_prefills else 0.01


def _two_ranks(lockstep: bool):
    dep = make_deployment(latency=PrefillSlow())
    dep.dp_lockstep = lockstep
    progs = [program("a", 0.0, [call(16, 6)]), program("b", 0.05, [call(16, 3)])]
    res, sim = run_sim(progs, dep, instances=2, router="round-robin")
    return rows_by_call(res), sim


def test_independent_ranks_step_on_their_own():
    """Without lockstep, b's prefill starts on arrival and a's decodes run at 0.01 s."""
    rows, _ = _two_ranks(False)
    a, b = rows[("a", 0)], rows[("b", 0)]
    assert a["instance"] != b["instance"]
    assert a["first_token_s"] == pytest.approx(0.1)
    assert a["finish_s"] == pytest.approx(0.1 + 5 * 0.01)
    assert b["first_token_s"] == pytest.approx(0.05 + 0.1)


def test_lockstep_ranks_step_together_and_wait_for_the_slowest():
    """With lockstep, b (arriving mid-step) starts at the next common step (0.1); that step
    lasts as long as b's prefill, so a's decode in it takes 0.1 s too."""
    rows, sim = _two_ranks(True)
    a, b = rows[("a", 0)], rows[("b", 0)]
    assert a["first_token_s"] == pytest.approx(0.1)
    assert b["first_token_s"] == pytest.approx(0.2)        # waited for the boundary, then 0.1 s
    # a: tokens at 0.1 (prefill), 0.2 (decode stretched by b's prefill), then b decodes with it
    # at 0.01 s: 0.21, 0.22 (b's last), then a alone 0.23, 0.24.
    assert a["finish_s"] == pytest.approx(0.24)
    assert b["finish_s"] == pytest.approx(0.22)
    g = sim.lockstep
    assert g is not None and g.num_steps == 6
    ia, ib = a["instance"], b["instance"]
    assert g.stretched_s[ia] == pytest.approx(0.09)      # a's decode waited for b's prefill
    assert g.dummy_steps[ib] == 3                          # b idle in steps 1, 5 and 6


def test_lockstep_step_ends_coincide():
    """Every step of every rank ends at a common boundary: the ranks' busy time is the same
    while both have work (both ran 0.1 + 0.01 + 0.01 in steps 2-4)."""
    _, sim = _two_ranks(True)
    a_inst, b_inst = sim.instances
    assert a_inst.num_steps + b_inst.num_steps == 6 + 3
    assert b_inst.busy_time == pytest.approx(0.12)


def test_dp_lockstep_config_resolution():
    """auto turns lockstep on only for the data-parallel ranks of a MoE model."""
    assert ClusterConfig(instances=2, data_parallel=True).lockstep(is_moe=True)
    assert not ClusterConfig(instances=2, data_parallel=True).lockstep(is_moe=False)
    assert not ClusterConfig(instances=2).lockstep(is_moe=True)
    assert not ClusterConfig(instances=1, data_parallel=True).lockstep(is_moe=True)
    assert ClusterConfig(instances=2, dp_lockstep="on").lockstep(is_moe=False)
    assert not ClusterConfig(instances=2, data_parallel=True, dp_lockstep="off").lockstep(is_moe=True)
    with pytest.raises(ConfigError):
        ClusterConfig(dp_lockstep="sometimes")


def test_lockstep_ep_tokens_padded_within_cuda_graph_limit_else_summed():
    """Within the CUDA-graph limit every rank is padded to the largest; beyond it the
    expert-parallel layers see the ranks' own tokens (an idle rank's dummy batch: one)."""
    from simulator.engine.lockstep import LockstepGroup

    class M:
        def __init__(self, i):
            self.index, self.group = i, None

    g = LockstepGroup(None, [M(0), M(1)], pad_max_tokens=256)
    assert g.ep_tokens([128, 3]) == 256
    assert g.ep_tokens([200]) == 400
    assert g.ep_tokens([2048, 128]) == 2176
    assert g.ep_tokens([2048]) == 2049
    with pytest.raises(ValueError):
        LockstepGroup(None, [M(2)])


def test_moe_priced_at_the_gathered_tokens():
    """At expert parallel 2 a rank's MoE block and dispatch/combine follow the tokens of all
    ranks: the default (as many on the other rank) equals passing 2·T, and fewer tokens
    elsewhere cost less."""
    from simulator.config import build_config
    from simulator.deployment import build_deployment
    from simulator.hardware import load_device, load_model

    device, profile = load_device("rtx-pro-6000-qwen3-30b-a3b-dp2ep2")
    dep = build_deployment(load_model("qwen3-30b-a3b-instruct-2507"), device, build_config(None, {}), profile)
    lat = dep.latency
    assert lat.ep == 2
    chunks = [(1024, 0)]
    default = lat.step_time(chunks, 0, 0, 1)
    assert lat.step_time(chunks, 0, 0, 1, None, 2048) == pytest.approx(default, rel=1e-12)
    assert lat.step_time(chunks, 0, 0, 1, None, 1025) < default
    assert lat.decode_step_time(64, 64 * 500, None, 128) == pytest.approx(lat.decode_step_time(64, 64 * 500))
    parts = lat.breakdown_step(chunks, 0, 0, ep_tokens=1025)
    assert parts["ep_comm"] < lat.breakdown_step(chunks, 0, 0)["ep_comm"]


def test_deployment_resolves_lockstep_for_data_parallel_moe_only():
    """build_deployment turns dp_lockstep on for data-parallel instances of a MoE model."""
    from simulator.config import build_config
    from simulator.deployment import build_deployment
    from simulator.hardware import load_device, load_model

    device, profile = load_device("rtx-pro-6000-qwen3-30b-a3b-dp2ep2")
    moe = load_model("qwen3-30b-a3b-instruct-2507")
    on = build_config(None, {"cluster.instances": 2, "cluster.data_parallel": True})
    assert build_deployment(moe, device, on, profile).dp_lockstep
    assert not build_deployment(moe, device, build_config(None, {"cluster.instances": 2}), profile).dp_lockstep
    dev8, prof8 = load_device("rtx-pro-6000-llama-3.1-8b")
    assert not build_deployment(load_model("llama-3.1-8b"), dev8, on, prof8).dp_lockstep


def test_rtx_pro_6000_profiles_talk_through_host_memory():
    """The recorded RTX PRO 6000 box's GPU-to-GPU link is the no-P2P path with an NCCL model."""
    device, _ = load_device("rtx-pro-6000-qwen3-32b")
    assert device.intra_node_link.name == "pcie5-x16-no-p2p"
    assert device.intra_node_link.nccl is not None and device.intra_node_link.nccl.p2p is False


def test_lockstep_runs_multi_call_programs_with_pinned_kv_to_completion():
    """Lockstep with tool gaps, pinned KV (pins released from inside a step) and preemption
    pressure: every call finishes, and two runs give the same rows."""
    def run():
        dep = make_deployment(latency=PrefillSlow(), num_gpu_blocks=40, block_size=4)
        dep.dp_lockstep = True
        progs = [program(f"p{i}", 0.013 * i, [call(20 + i, 5, tool_s=0.02), call(8, 4, tool_s=0.01), call(6, 3)])
                 for i in range(8)]
        res, sim = run_sim(progs, dep, instances=2, router="session-affinity", kv="pin-ttl", kv_ttl_s=0.05)
        return res, sim

    res, sim = run()
    assert len(res.calls) == 24 and all(r["status"] == "ok" for r in res.calls)
    assert sim.lockstep.num_steps > 0
    assert run()[0].calls == res.calls


def test_roofline_tp_prices_the_collectives_an_operator_profile_prices():
    """A device given by name at TP 2 pays what the operator model pays over the same link:
    2 all-reduces per layer + 1 per step (NCCL's model over a link file that has one) and the
    logits all-gather; a link with P2P (no nccl section) keeps the ring formula."""
    from simulator.config import build_config
    from simulator.deployment import build_deployment
    from simulator.hardware import load_device, load_model
    from simulator.latency.base import step_features

    model = load_model("qwen3-32b")
    cfg = build_config(None, {"cluster.tensor_parallel_size": 2, "engine.async_scheduling": False})
    device, profile = load_device("rtx-pro-6000-qwen3-32b")  # its intra-node link: pcie5-x16-no-p2p
    roof = build_deployment(model, device, cfg, None).latency
    ops = build_deployment(model, device, cfg, profile).latency
    assert roof.kind == "roofline" and ops.kind == "operators"
    for T in (1, 64, 512, 2048):
        nbytes = T * model.hidden_size * model.dtype_bytes
        assert roof.allreduce.time_s(nbytes) == pytest.approx(ops.allreduce.time_s(nbytes), rel=1e-12)
        assert roof.allreduce.time_s(nbytes) == pytest.approx(
            nccl_ring_time_s("all_reduce", 2, nbytes, device.intra_node_link.nccl.bus_bandwidth_Bps)[0])
    parts = roof.breakdown(step_features([], 64, 64 * 1000, 64))
    o = ops.breakdown_step([], 64, 64 * 1000)
    assert parts["allreduce"] == pytest.approx(o["allreduce"], rel=1e-12)
    assert parts["logits_all_gather"] == pytest.approx(o["logits_all_gather"], rel=1e-12)
    assert roof.decode_step_time(64, 64 * 1000) == pytest.approx(parts["total"], rel=1e-12)
    # the card as named (pcie5-x16: P2P, no nccl section): the link's ring formula
    p2p = build_deployment(model, load_device("rtx-pro-6000")[0], cfg, None).latency
    lk = p2p.link
    nbytes = 512 * model.hidden_size * model.dtype_bytes
    assert lk.nccl is None
    assert p2p.allreduce.time_s(nbytes) == pytest.approx(2 * lk.latency_s + nbytes / (lk.bandwidth_Bps * lk.allreduce_efficiency))
    assert p2p.allreduce.time_s(nbytes) < roof.allreduce.time_s(nbytes)


def test_roofline_expert_parallel_over_data_parallel_ranks():
    """engine.enable_expert_parallel with data-parallel instances of a MoE model, a device by
    name: each rank holds half the experts (more KV blocks), runs the tokens of both ranks
    through them, and pays the all-gather and reduce-scatter of each MoE layer over its link."""
    from simulator.config import build_config
    from simulator.deployment import build_deployment
    from simulator.hardware import load_model
    from simulator.latency.base import step_features

    moe = load_model("qwen3-30b-a3b-instruct-2507")
    dev = load_device("rtx-pro-6000")[0]
    base = {"cluster.instances": 2, "cluster.data_parallel": True}
    plain = build_deployment(moe, dev, build_config(None, base))
    ep = build_deployment(moe, dev, build_config(None, {**base, "engine.enable_expert_parallel": True}))
    assert plain.latency.ep == 1 and ep.latency.ep == 2 and ep.dp_lockstep
    assert ep.engine.num_gpu_blocks > plain.engine.num_gpu_blocks
    assert "expert-parallel" in ep.engine.num_gpu_blocks_source
    lat = ep.latency
    E, k, L = moe.num_experts, moe.num_experts_per_tok, moe.moe_layers
    T, N = 64, 96  # 64 tokens here, 32 on the other rank
    f = step_features([], T, T * 1000, T)
    parts = lat.breakdown(f, ep_tokens=N)
    active = E * (1 - (1 - k / E) ** N) / 2
    assert parts["moe"] == pytest.approx(max(N / 2 * lat._moe_flop_per_tok, active * lat._moe_expert_bytes_time), rel=1e-12)
    states = N * moe.hidden_size * moe.dtype_bytes
    comm = (lat._ep_gather.time_s(states + N * E * 4) + lat._ep_scatter.time_s(states)) * L
    assert parts["ep_comm"] == pytest.approx(comm, rel=1e-12) and comm > 0
    assert lat.decode_step_time(T, T * 1000, None, N) == pytest.approx(parts["total"], rel=1e-12)
    assert lat.step_time([], T, T * 1000, T, None, N) == pytest.approx(parts["total"], rel=1e-12)
    # without ep_tokens: as many tokens on the other rank
    assert lat.decode_step_time(T, T * 1000) == pytest.approx(lat.breakdown(f, ep_tokens=2 * T)["total"], rel=1e-12)
    # dense models ignore the flag (as vLLM does); tensor parallelism with it is refused
    dense = build_deployment(load_model("llama-3.1-8b"), dev, build_config(None, {**base, "engine.enable_expert_parallel": True}))
    assert dense.latency.ep == 1
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        build_deployment(moe, dev, build_config(None, {**base, "engine.enable_expert_parallel": True,
                                                       "cluster.tensor_parallel_size": 2}))
    with pytest.raises(ConfigError, match="enable_expert_parallel"):
        build_config(None, {"engine.enable_expert_parallel": "yes"})


def test_cluster_intra_node_link_replaces_the_devices_link():
    """cluster.intra_node_link names the machine's GPU-to-GPU link (an RTX PRO 6000 box without
    P2P): the TP collectives follow it; an unknown name is a one-line config error."""
    from simulator.config import build_config
    from simulator.deployment import build_deployment
    from simulator.hardware import load_model

    model, dev = load_model("qwen3-32b"), load_device("rtx-pro-6000")[0]
    tp2 = {"cluster.tensor_parallel_size": 2}
    p2p = build_deployment(model, dev, build_config(None, tp2)).latency
    staged = build_deployment(model, dev, build_config(None, {**tp2, "cluster.intra_node_link": "pcie5-x16-no-p2p"}))
    assert p2p.link.name == "pcie5-x16" and staged.device.intra_node_link.name == "pcie5-x16-no-p2p"
    nbytes = 256 * model.hidden_size * model.dtype_bytes
    assert staged.latency.allreduce.time_s(nbytes) == pytest.approx(
        nccl_ring_time_s("all_reduce", 2, nbytes, staged.device.intra_node_link.nccl.bus_bandwidth_Bps)[0])
    assert staged.latency.allreduce.time_s(nbytes) > p2p.allreduce.time_s(nbytes)
    assert "pcie5-x16-no-p2p" in staged.latency.describe()["all_reduce"]["from"]
    with pytest.raises(ConfigError, match="cluster.intra_node_link: unknown interconnect 'nvlink9'"):
        build_deployment(model, dev, build_config(None, {**tp2, "cluster.intra_node_link": "nvlink9"}))


def test_small_all_reduce_over_nvlink4_is_vllms_own_kernel():
    """Over NVLink 4 vLLM all-reduces messages under 8 MiB with its own kernel (measured on
    H100: ~9-12 us up to 128 KiB), not NCCL's ring (14 hops of 5 us at 8 GPUs): the link file's
    curve prices them, its last slope up to 8 MiB, the ring formula beyond; 6 GPUs (not
    measured) and links without a curve keep NCCL's pricing."""
    from simulator.latency.operators import collective_from_spec

    link = load_link("nvlink4")
    ca = link.custom_all_reduce
    assert ca and ca["max_bytes"] == 8 * 1024 * 1024 and set(ca["curves"]) == {2, 4, 8}
    c8 = collective_from_spec("all_reduce", 8, None, link)
    assert c8.time_s(131072) == pytest.approx(11.8e-6)
    assert c8.time_s(4 * 1024 * 1024) == pytest.approx(45.0e-6)
    slope = (45.0 - 30.4) / (2 * 1024 * 1024)
    assert c8.time_s(6 * 1024 * 1024) == pytest.approx((45.0 + slope * 2 * 1024 * 1024) * 1e-6)
    ring = Collective("all_reduce", 8, link=link)  # NCCL over the link's spec, as before
    assert ring.small is None
    big = 16 * 1024 * 1024
    assert c8.time_s(big) == pytest.approx(ring.time_s(big))
    assert c8.time_s(256 * 1024) < ring.time_s(256 * 1024) / 3
    assert collective_from_spec("all_reduce", 6, None, link).small is None
    assert collective_from_spec("all_gather", 8, None, link).small is None
    assert collective_from_spec("all_reduce", 4, None, load_link("nvlink3")).small is None
    # the Vidur-fitted H100 links carry it too (an H100 profile's all-reduce of a decode step)
    fitted = collective_from_spec("all_reduce", 4, {"interconnect": "nvlink4-dgx-h100-fitted"},
                                  load_link("nvlink4-dgx-h100-fitted"))
    assert fitted.time_s(131072) == pytest.approx(9.2e-6) and fitted.curve is not None
    assert "custom all-reduce" in fitted.describe()["from"]
