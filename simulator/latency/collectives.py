"""Collective times from NCCL's own cost model, for links that have no measured curve.

NCCL picks an algorithm and protocol per call from a latency + bandwidth model of each
(NVIDIA/nccl, src/graph/tuning.cc, `ncclTopoTuneModel` / `ncclTopoGetAlgoTime`, BSD-3):

    time = baseLat[proto] + nsteps * hwLat[hw][proto] + nBytes / algBw
    algBw = busBw * protoFactor * nRanks / nsteps            (ring)

with nsteps = 2(n-1) for all-reduce and n-1 for all-gather / reduce-scatter, nBytes the
buffer size NCCL counts (the reduced buffer for all-reduce; the whole gathered buffer for
all-gather and reduce-scatter), and NCCL taking the fastest protocol. We keep the ring
algorithm with the LL and Simple protocols: LL128 is enabled by default only over NVLink,
and on one node with few GPUs the tree does not beat the ring.

The constants are NCCL's (tuning.cc, NCCL 2.19 and later): Ring baseLat LL 6.6 us, Simple
8.4 us; Ring hwLat over PCI LL 1.0 us, Simple 5.7 us; over NVLink LL 0.6 us, Simple 3.4 us.
LL sends 8 bytes of data per 16-byte line and NCCL models its ring bandwidth as busBw/4 for
all-reduce and busBw/3 for the other collectives. The bus bandwidth itself, the one input
that depends on the machine, comes from the link file (`nccl.bus_bandwidth_Bps`), with its
source.
"""

from __future__ import annotations

US = 1e-6

# (base latency us, per-step hardware latency us by hw class, bandwidth factor for
# all-reduce, bandwidth factor for all-gather / reduce-scatter); NVIDIA/nccl tuning.cc.
NCCL_RING_PROTOCOLS = {
    "LL": (6.6, {"pci": 1.0, "nvlink": 0.6}, 1.0 / 4.0, 1.0 / 3.0),
    "Simple": (8.4, {"pci": 5.7, "nvlink": 3.4}, 1.0, 1.0),
}

KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def ring_steps(kind: str, n: int) -> int:
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r} (known: {', '.join(KINDS)})")
    return 2 * (n - 1) if kind == "all_reduce" else n - 1


def nccl_ring_time_s(kind: str, n: int, nbytes: float, bus_bw_Bps: float, hw: str = "pci") -> tuple[float, str]:
    """(seconds, protocol) of one NCCL ring collective among `n` GPUs on `nbytes` (NCCL's
    count: the all-reduce buffer, or the whole gathered / scattered buffer)."""
    if n <= 1 or nbytes <= 0:
        return 0.0, ""
    steps = ring_steps(kind, n)
    best, proto = float("inf"), ""
    for name, (base_us, hw_lat, f_ar, f_other) in NCCL_RING_PROTOCOLS.items():
        factor = f_ar if kind == "all_reduce" else f_other
        alg_bw = bus_bw_Bps * factor * n / steps
        t = (base_us + steps * hw_lat[hw]) * US + nbytes / alg_bw
        if t < best:
            best, proto = t, name
    return best, proto
