"""Scheduling policies: waiting-queue order and the preemption victim.

- fcfs: vLLM's default. Waiting is a FIFO; a preempted request goes back to its front;
  the victim is the most recently admitted running request (the tail of `running`).
- program-fcfs: Continuum. A call is ordered by its program's first arrival, so a program's
  later calls keep the place its first call had (vLLM's priority queue with
  priority = program arrival); the victim is the running request of the latest program.
- plas: Autellix's program-level least attained service. Priority = the service the program
  has received from its finished calls when the call is issued, least first. Autellix counts
  service in time; we count tokens processed (prompt tokens computed, i.e. not served from
  cache, plus output tokens), which tracks time for a given batch and is an exact integer,
  so priorities never depend on float rounding. Optionally quantised to
  `policy.plas_quantum_tokens` levels.
"""

from __future__ import annotations

import heapq
from collections import deque

from . import Registry

SCHEDULERS = Registry("scheduler")


class FCFSQueue:
    __slots__ = ("_q",)

    def __init__(self):
        self._q: deque = deque()

    def add(self, req):
        self._q.append(req)

    def prepend(self, req):
        self._q.appendleft(req)

    def peek(self):
        return self._q[0]

    def pop(self):
        return self._q.popleft()

    def remove(self, req):
        self._q.remove(req)

    def __len__(self):
        return len(self._q)

    def __bool__(self):
        return bool(self._q)

    def __iter__(self):
        return iter(self._q)


class PriorityQueue:
    """vLLM's priority waiting queue: a heap on (priority, arrival_time); request_id breaks ties."""

    __slots__ = ("_h",)

    def __init__(self):
        self._h: list = []

    def add(self, req):
        heapq.heappush(self._h, (req.priority, req.arrival_time, req.request_id, req))

    prepend = add

    def peek(self):
        return self._h[0][3]

    def pop(self):
        return heapq.heappop(self._h)[3]

    def remove(self, req):
        self._h = [e for e in self._h if e[3] is not req]
        heapq.heapify(self._h)

    def __len__(self):
        return len(self._h)

    def __bool__(self):
        return bool(self._h)

    def __iter__(self):
        return (e[3] for e in sorted(self._h))


class SchedulingPolicy:
    name = "base"

    def __init__(self, params):
        self.params = params

    def make_queue(self):
        raise NotImplementedError

    def priority(self, program, now: float) -> float:
        """Priority of a call issued now (lower runs first)."""
        return 0.0

    def pick_victim(self, running: list):
        raise NotImplementedError


@SCHEDULERS.register("fcfs")
class FCFS(SchedulingPolicy):
    def make_queue(self):
        return FCFSQueue()

    def pick_victim(self, running):
        return running[-1]


class _PriorityPolicy(SchedulingPolicy):
    def make_queue(self):
        return PriorityQueue()

    def pick_victim(self, running):
        # vLLM priority scheduling: the lowest priority (largest value), latest arrival.
        return max(running, key=lambda r: (r.priority, r.arrival_time, r.request_id))


@SCHEDULERS.register("program-fcfs")
class ProgramFCFS(_PriorityPolicy):
    def priority(self, program, now):
        return program.spec.arrival_s


@SCHEDULERS.register("plas")
class PLAS(_PriorityPolicy):
    def priority(self, program, now):
        q = self.params.plas_quantum_tokens
        s = program.attained_tokens
        return float(s if q <= 0 else (s // q) * q)
