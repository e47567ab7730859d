"""Routers: which instance serves a call.

- round-robin: instances in turn, per call.
- least-loaded: fewest outstanding requests (running + waiting); ties to the lower index.
- session-affinity: a program's first call goes least-loaded, its later calls follow it to
  the same instance (where its KV is).
- vllm-dp: vLLM's internal load balancer across the data-parallel ranks of one engine
  (DPLBAsyncMPClient.get_core_engine_for_request, vllm/v1/engine/core_client.py): the rank
  with the lowest 4·waiting + running; ties to the lower index (one API server scans from
  rank 0). vLLM reads the counts from a snapshot the DP coordinator publishes every 100 ms
  and adds its own assignments since; here they are exact.
- prefix-aware: sgl-router's cache-aware policy. If the load is imbalanced (max - min
  outstanding > `policy.router_balance_abs_threshold` and max > min ·
  `policy.router_balance_rel_threshold`), route least-loaded; else route to the instance
  with the longest cached prefix of the call's prompt if that match covers more than
  `policy.router_cache_threshold` of it, else to the instance with the lowest KV usage.
"""

from __future__ import annotations

from . import Registry

ROUTERS = Registry("router")


def _load(inst) -> int:
    return len(inst.scheduler.running) + inst.scheduler.num_waiting()


def _least_loaded(instances) -> int:
    best, best_load = 0, None
    for i, inst in enumerate(instances):
        ld = _load(inst)
        if best_load is None or ld < best_load:
            best, best_load = i, ld
    return best


class Router:
    name = "base"
    reads_cache = False  # True: instances bring block state up to date before choose()

    def __init__(self, params):
        self.params = params

    def choose(self, req, program, instances, now: float) -> int:
        raise NotImplementedError


@ROUTERS.register("round-robin")
class RoundRobin(Router):
    def __init__(self, params):
        super().__init__(params)
        self._next = 0

    def choose(self, req, program, instances, now):
        i = self._next % len(instances)
        self._next = i + 1
        return i


@ROUTERS.register("least-loaded")
class LeastLoaded(Router):
    def choose(self, req, program, instances, now):
        return _least_loaded(instances)


@ROUTERS.register("vllm-dp")
class VllmDataParallel(Router):
    def choose(self, req, program, instances, now):
        best, best_score = 0, None
        for i, inst in enumerate(instances):
            score = 4 * inst.scheduler.num_waiting() + len(inst.scheduler.running)
            if best_score is None or score < best_score:
                best, best_score = i, score
        return best


@ROUTERS.register("session-affinity")
class SessionAffinity(Router):
    def choose(self, req, program, instances, now):
        if program.instance is not None:
            return program.instance
        return _least_loaded(instances)


@ROUTERS.register("prefix-aware")
class PrefixAware(Router):
    reads_cache = True

    def choose(self, req, program, instances, now):
        if len(instances) == 1:
            return 0
        p = self.params
        loads = [_load(inst) for inst in instances]
        lo, hi = min(loads), max(loads)
        if hi - lo > p.router_balance_abs_threshold and hi > lo * p.router_balance_rel_threshold:
            return loads.index(lo)
        best, best_hit = 0, -1
        for i, inst in enumerate(instances):
            hit = inst.kv.peek_hit_blocks(req.block_key, req.num_tokens)
            if hit > best_hit or (hit == best_hit and loads[i] < loads[best]):
                best, best_hit = i, hit
        if best_hit * instances[best].kv.block_size > p.router_cache_threshold * req.num_tokens:
            return best
        usages = [inst.kv.usage() for inst in instances]
        return usages.index(min(usages))
