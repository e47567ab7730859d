"""KV retention policies: what happens to a program's blocks when one of its calls ends.

- lru: vLLM's default. The call's blocks are freed (tail first) and stay in the prefix
  cache until the allocator reuses them.
- drop: the call's blocks are freed and forgotten at once: no reuse across turns. The shared
  prefix stays cached unless `policy.kv_drop_shared_prefix`.
- pin-ttl: Continuum. If the program goes on after a tool gap (and the gap is at most
  `policy.kv_pin_max_tool_s`, when set), its blocks stay allocated, unevictable, for
  `policy.kv_ttl_s` seconds; the program's next call on the same instance hits them and the
  pin is released when that call gets its blocks; otherwise they are freed at the TTL.
- offload: at a tool gap of at least `policy.kv_offload_min_tool_s`, the call's full blocks
  are copied to host DRAM (then CXL, on overflow; `policy.kv_offload_tiers`) and freed in
  HBM once the copy is done (they stay hit-able there until reused). The next call loads
  what HBM no longer has back from the tiers before it runs, paying the transfer.
"""

from __future__ import annotations

from ..events import PRIO_TIMER, PRIO_TRANSFER
from . import Registry

RETENTION = Registry("kv")


class RetentionPolicy:
    name = "base"
    needs_tiers = False

    def __init__(self, params):
        self.params = params

    def on_call_finished(self, inst, req, gap_s: float | None, now: float) -> None:
        inst.kv.free(req)

    def on_admitted(self, inst, req) -> None:
        pass


@RETENTION.register("lru")
class LRU(RetentionPolicy):
    pass


@RETENTION.register("drop")
class Drop(RetentionPolicy):
    def on_call_finished(self, inst, req, gap_s, now):
        # Forget each freed block nobody else holds; shared-prefix keys are the negative ones.
        inst.kv.pool.uncache_free(inst.kv.free(req), keep_negative_keys=not self.params.kv_drop_shared_prefix)


@RETENTION.register("pin-ttl")
class PinTTL(RetentionPolicy):
    def on_call_finished(self, inst, req, gap_s, now):
        max_tool = self.params.kv_pin_max_tool_s
        if gap_s is None or self.params.kv_ttl_s <= 0 or (max_tool is not None and gap_s > max_tool):
            inst.kv.free(req)
            return
        prog = req.program
        old = prog.pins.pop(inst.index, None)
        if old is not None:  # a DAG sibling pinned already: keep the newest
            inst.release_pin(old)
        blocks = inst.kv.take_blocks(req)
        pin = [blocks, -1]
        pin[1] = inst.loop.schedule(now + self.params.kv_ttl_s, PRIO_TIMER, self._expire, inst, prog, pin)
        prog.pins[inst.index] = pin
        inst.num_pinned_blocks += len(blocks)

    def _expire(self, inst, prog, pin):
        if prog.pins.get(inst.index) is pin:
            del prog.pins[inst.index]
            pin[1] = -1
            inst.release_pin(pin)
            inst.wake()

    def on_admitted(self, inst, req):
        pin = req.program.pins.pop(inst.index, None)
        if pin is not None:
            inst.release_pin(pin)


@RETENTION.register("offload")
class Offload(RetentionPolicy):
    needs_tiers = True

    def on_call_finished(self, inst, req, gap_s, now):
        if gap_s is None or gap_s < self.params.kv_offload_min_tool_s or inst.residency is None:
            inst.kv.free(req)
            return
        pool = inst.kv.pool
        blocks = inst.kv.take_blocks(req)
        keys = pool.keys_of(blocks)
        done = inst.residency.store(keys, now)
        pin = [blocks, -1]
        inst.num_pinned_blocks += len(blocks)
        if done <= now:
            inst.release_pin(pin)
        else:
            pin[1] = inst.loop.schedule(done, PRIO_TRANSFER, self._stored, inst, pin)

    def _stored(self, inst, pin):
        pin[1] = -1
        inst.release_pin(pin)
        inst.wake()
