"""The event core: a heap of callbacks keyed (time, priority, seq).

`seq` is a per-loop counter, so ties are broken by scheduling order and the whole order is
total and reproducible. Callbacks are plain functions (no generator processes): they are
cheaper to dispatch at millions of events.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable

# Priorities at equal times: lower runs first. A step that ends at t frees blocks and emits
# tokens before a call released at t is routed, and samples see the state after both.
# Step ends add the instance index, so simultaneous step ends of several instances run in
# instance order whatever order they were scheduled in (fast-forward schedules them early).
PRIO_STEP_END = 0
PRIO_TRANSFER = 1000
PRIO_RELEASE = 2000
# An async-scheduling engine schedules its next step just after launching one: after the
# calls that arrive at that instant (vLLM's engine core reads its input queue in between)
PRIO_SCHEDULE = 2500
PRIO_TIMER = 3000
PRIO_SAMPLE = 9000


class EventLoop:
    """A minimal exact event loop. `schedule` returns a handle that `cancel` accepts."""

    __slots__ = ("_heap", "_seq", "now", "prio", "_cancelled", "events_processed")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Callable[..., Any], tuple]] = []
        self._seq = 0
        self._cancelled: set[int] = set()
        self.now = 0.0
        self.prio = 0  # the priority of the event running (readers of a fast-forwarded instance need it)
        self.events_processed = 0

    def schedule(self, time: float, priority: int, fn: Callable[..., Any], *args: Any) -> int:
        if time < self.now:
            raise ValueError(f"event scheduled in the past: {time} < now {self.now}")
        seq = self._seq
        self._seq = seq + 1
        heapq.heappush(self._heap, (time, priority, seq, fn, args))
        return seq

    def cancel(self, handle: int) -> None:
        self._cancelled.add(handle)

    def peek_time(self) -> float:
        """Time of the next live event, or +inf."""
        heap = self._heap
        while heap and heap[0][2] in self._cancelled:
            self._cancelled.discard(heapq.heappop(heap)[2])
        return heap[0][0] if heap else float("inf")

    def run(self, until: float = float("inf")) -> None:
        heap = self._heap
        cancelled = self._cancelled
        pop = heapq.heappop
        n = 0
        while heap:
            if heap[0][0] > until:
                break
            time, prio, seq, fn, args = pop(heap)
            if cancelled and seq in cancelled:
                cancelled.discard(seq)
                continue
            self.now = time
            self.prio = prio
            fn(*args)
            n += 1
        self.events_processed += n

    def __len__(self) -> int:
        return len(self._heap) - len(self._cancelled)
