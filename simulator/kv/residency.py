"""KV tiers below HBM: host DRAM, then CXL memory, each an LRU of block identities.

A block offloaded at a tool gap is stored into the first tier; when a tier overflows, its
least recently used block moves down to the next tier, and out of the last one it is gone.
Moving blocks costs `latency + bytes / bandwidth` over the tier's link (the slower of the
link and the tier's own memory); each link is a FIFO resource, so concurrent transfers of an
instance queue behind each other. Transfers run on their own stream, overlapping compute,
as vLLM's offloading connector does: they delay the request that waits for them, not the
steps of the others. Demotion between tiers is a background copy whose time is not charged.
"""

from __future__ import annotations

from collections import OrderedDict

from ..hardware import MemoryTierSpec


class TierStore:
    __slots__ = ("spec", "name", "capacity_blocks", "entries", "link_busy_until", "blocks_in", "blocks_out")

    def __init__(self, spec: MemoryTierSpec, capacity_blocks: int):
        self.spec = spec
        self.name = spec.name
        self.capacity_blocks = capacity_blocks
        self.entries: OrderedDict[int, float] = OrderedDict()  # key -> time it becomes readable
        self.link_busy_until = 0.0
        self.blocks_in = 0
        self.blocks_out = 0

    def transfer(self, nbytes: float, now: float) -> float:
        """Queue a transfer on this tier's link; returns its completion time."""
        start = now if now > self.link_busy_until else self.link_busy_until
        done = start + self.spec.transfer_time(nbytes)
        self.link_busy_until = done
        return done


class KVResidency:
    """The tiers of one instance, fastest first."""

    def __init__(self, tiers: list[TierStore], bytes_per_block: float):
        self.tiers = tiers
        self.bytes_per_block = bytes_per_block

    def store(self, keys: list[int], now: float) -> float:
        """Copy blocks (by identity) into the first tier. Returns when the copy is done."""
        if not keys or not self.tiers:
            return now
        first = self.tiers[0]
        new = [k for k in keys if k not in first.entries]
        done = first.transfer(len(new) * self.bytes_per_block, now) if new else now
        for k in keys:
            if k in first.entries:
                first.entries.move_to_end(k)
            else:
                self._insert(0, k, done)
        first.blocks_in += len(new)
        return done

    def _insert(self, level: int, key: int, ready: float) -> None:
        tier = self.tiers[level]
        tier.entries[key] = ready
        while len(tier.entries) > tier.capacity_blocks:
            old, t = tier.entries.popitem(last=False)
            if level + 1 < len(self.tiers):
                self._insert(level + 1, old, t)

    def match(self, key_fn, start: int, stop: int, now: float) -> list[int]:
        """Blocks start, start+1, ... found (readable by now) in some tier, stopping at the
        first miss. Returns the count found per tier."""
        counts = [0] * len(self.tiers)
        for i in range(start, stop):
            k = key_fn(i)
            for level, tier in enumerate(self.tiers):
                t = tier.entries.get(k)
                if t is not None and t <= now:
                    counts[level] += 1
                    break
            else:
                break
        return counts

    def load(self, key_fn, start: int, counts: list[int], now: float) -> float:
        """Bring the matched blocks back to HBM; returns when the last one has arrived."""
        done = now
        i = start
        for level, n in enumerate(counts):
            if not n:
                continue
            tier = self.tiers[level]
            done = max(done, tier.transfer(n * self.bytes_per_block, now))
            tier.blocks_out += n
        # touch the loaded keys (LRU) in whichever tier holds them
        for _ in range(sum(counts)):
            k = key_fn(i)
            for tier in self.tiers:
                if k in tier.entries:
                    tier.entries.move_to_end(k)
                    break
            i += 1
        return done


class TierConnector:
    """The scheduler's view of the tiers, named after vLLM's KV connector calls."""

    def __init__(self, residency: KVResidency, block_size: int):
        self.residency = residency
        self.block_size = block_size
        self._pending: dict[int, tuple[int, list[int]]] = {}

    def get_num_new_matched_tokens(self, req, num_local_hit: int, now: float) -> tuple[int, float]:
        bs = self.block_size
        start = num_local_hit // bs
        stop = (req.num_tokens - 1) // bs  # never the last prompt token, as for local hits
        if stop <= start:
            return 0, 0.0
        counts = self.residency.match(req.block_key, start, stop, now)
        n = sum(counts)
        if not n:
            return 0, 0.0
        self._pending[req.request_id] = (start, counts)
        return n * bs, 0.0

    def begin_load(self, req, now: float) -> float:
        start, counts = self._pending.pop(req.request_id)
        for tier, n in zip(self.residency.tiers, counts):
            if n:
                req.external_tier_tokens[tier.name] = req.external_tier_tokens.get(tier.name, 0) + n * self.block_size
        return self.residency.load(req.block_key, start, counts, now)
