"""How much CPU other programs took while an experiment ran (Linux /proc; 0 elsewhere).

A profiling run on a shared machine (here: 2 cores, other engineers' tests) measures the
engine *and* whatever else ran. We read the machine's busy CPU time (/proc/stat) and the CPU
time of the engine's process group and of this process before and after each experiment;
the rest, over the wall time, is the number of cores others used. Experiments run under
contention are re-run, and the fit can leave out what stayed contended.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSnapshot:
    busy_s: float  # whole machine, all cores
    ours_s: float  # the engine's process group + this process

    def others_since(self, before: "CpuSnapshot") -> float:
        return max((self.busy_s - before.busy_s) - (self.ours_s - before.ours_s), 0.0)


def snapshot(pgid: int | None) -> CpuSnapshot:
    return CpuSnapshot(_machine_busy_s(), _group_cpu_s(pgid) + _proc_cpu_s("self"))


def _machine_busy_s() -> float:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0
    vals = [int(x) for x in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice
    busy = sum(vals[:8]) - idle
    return busy / _HZ


def _proc_cpu_s(pid) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # after "(comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    return (int(fields[11]) + int(fields[12])) / _HZ


def _group_cpu_s(pgid: int | None) -> float:
    if pgid is None:
        return 0.0
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / _HZ
    return total
