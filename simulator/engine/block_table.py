"""A request's block table: the blocks that hold its KV, in token order.

Tables grow in two ways: by arrays (an admission's cache hits, a prefill chunk's new blocks,
straight from the block pool) and one block at a time (a decode entering a new block). Kept
as the arrays it was built from plus a short list of single blocks, a table is never
converted element by element: freeing one hands the pool a single array, and nothing builds
or tears down a Python list of hundreds of ints per call. It reads like a list of ints
(len, index, slice, iteration, ==), which is what tests and callers see.
"""

from __future__ import annotations

import numpy as np

_EMPTY = np.zeros(0, np.intp)


class BlockTable:
    __slots__ = ("_parts", "_n", "_tail")

    def __init__(self):
        self._parts: list[np.ndarray] = []  # arrays whose concatenation is blocks 0 .. _n-1
        self._n = 0
        self._tail: list[int] = []          # blocks _n .. appended one at a time

    def __len__(self) -> int:
        return self._n + len(self._tail)

    def append(self, block: int) -> None:
        self._tail.append(block)

    def extend_array(self, blocks: np.ndarray) -> None:
        """Append an array of blocks. The table keeps the array: callers must not write to it."""
        if self._tail:
            self._flush()
        self._parts.append(blocks)
        self._n += len(blocks)

    def _flush(self) -> None:
        self._parts.append(np.array(self._tail, dtype=np.intp))
        self._n += len(self._tail)
        self._tail = []

    def array(self) -> np.ndarray:
        """The whole table as one array (do not write to it)."""
        if self._tail:
            self._flush()
        parts = self._parts
        if len(parts) > 1:
            parts[:] = [np.concatenate(parts)]
        return parts[0] if parts else _EMPTY

    def __getitem__(self, i):
        if i.__class__ is not int:
            if isinstance(i, slice):
                return self.array()[i].tolist()
            i = int(i)
        if i < 0:
            i += len(self)
            if i < 0:
                raise IndexError("block table index out of range")
        n = self._n
        if i >= n:
            return self._tail[i - n]
        for p in reversed(self._parts):  # the block wanted is most often in the last array
            start = n - len(p)
            if i >= start:
                return p.item(i - start)
            n = start
        raise IndexError(i)

    def tolist(self) -> list[int]:
        return self.array().tolist()

    def __iter__(self):
        return iter(self.tolist())

    def __eq__(self, other) -> bool:
        if isinstance(other, BlockTable):
            other = other.tolist()
        elif not isinstance(other, list):
            return NotImplemented
        return self.tolist() == other

    __hash__ = None

    def __repr__(self) -> str:
        return f"BlockTable({self.tolist()})"
