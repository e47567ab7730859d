"""The prefix cache's key -> block map, kept in numpy pages so that runs of keys are read and
written with a few array operations instead of one dict operation per block.

A key (int64) lives at page `key >> PAGE_BITS`, slot `key & PAGE_MASK`. Block keys come in
chains of consecutive integers (a program's own blocks, a shared prefix counted downwards,
interned hash chains), so the run of keys one request looks up or caches falls on one or two
pages. An entry is only a candidate block: the owner (BlockPool) holds the truth in
`main_key[block]` and checks every entry against it, so forgetting a key writes nothing here.
Pages whose entries have all gone stale are recycled by a sweep that runs whenever the page
count has grown _SWEEP_GROWTH-fold since the last one, which keeps memory proportional to the
keys cached, not to history.
"""

from __future__ import annotations

import numpy as np

PAGE_BITS = 10
PAGE = 1 << PAGE_BITS
PAGE_MASK = PAGE - 1
_MIN_SWEEP = 64
# A sweep reads every page, so it pays off only when many pages have died since the last one:
# at 2-fold, the bench workload (pages die and come back as programs' blocks are evicted and
# recomputed) swept 431 times and spent 6 % of its time there; 4-fold sweeps 28 times.
_SWEEP_GROWTH = 4
_IOTA = np.arange(PAGE, dtype=np.int64)


class KeyIndex:
    __slots__ = ("main_key", "rows", "row_page", "page_row", "free_rows", "sweep_at")

    def __init__(self, main_key: np.ndarray):
        # main_key[-1] must hold a value no key equals: empty entries (-1) read it.
        self.main_key = main_key
        self.rows = np.full((_MIN_SWEEP, PAGE), -1, np.intp)
        self.row_page = np.zeros(_MIN_SWEEP, np.int64)
        self.page_row: dict[int, int] = {}
        self.free_rows = list(range(_MIN_SWEEP - 1, 0, -1))  # row 0 stays empty: "no page"
        self.sweep_at = _MIN_SWEEP

    # -- scalar access ----------------------------------------------------------------------
    def get(self, key: int) -> int:
        """The entry for key (a candidate block), or -1."""
        r = self.page_row.get(key >> PAGE_BITS)
        return -1 if r is None else self.rows.item(r, key & PAGE_MASK)

    def set(self, key: int, block: int) -> None:
        r = self.page_row.get(key >> PAGE_BITS)
        if r is None:
            r = self._add_page(key >> PAGE_BITS)
        self.rows[r, key & PAGE_MASK] = block

    def put_if_absent(self, key: int, block: int) -> int:
        """The current block for key (its entry, if main_key confirms it); else set the
        entry to `block` and return -1."""
        slot = key & PAGE_MASK
        r = self.page_row.get(key >> PAGE_BITS)
        if r is None:
            r = self._add_page(key >> PAGE_BITS)
        else:
            e = self.rows.item(r, slot)
            if e >= 0 and self.main_key.item(e) == key:
                return e
        self.rows[r, slot] = block
        return -1

    # -- arithmetic runs of keys: (first key, step +1 or -1, count) ------------------------
    def get_runs(self, runs) -> np.ndarray:
        """Entries for the keys of `runs`, in order (a fresh array)."""
        rows, page_row = self.rows, self.page_row
        parts = []
        for k, step, n in runs:
            while n > 0:
                r = page_row.get(k >> PAGE_BITS, 0)
                slot = k & PAGE_MASK
                if step > 0:
                    m = min(n, PAGE - slot)
                    parts.append(rows[r, slot:slot + m])
                else:
                    m = min(n, slot + 1)
                    parts.append(rows[r, slot - m + 1:slot + 1][::-1])
                k += step * m
                n -= m
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def match_runs(self, runs) -> tuple[np.ndarray, int | None]:
        """The current blocks for the keys of `runs`, in order, up to the first key that has
        none (entries checked against main_key), as a fresh array; and that first key, or
        None if every key has its block."""
        rows, page_row, mk = self.rows, self.page_row, self.main_key
        parts = []
        for k, step, n in runs:
            while n > 0:
                r = page_row.get(k >> PAGE_BITS, 0)  # row 0: no page, every entry -1
                slot = k & PAGE_MASK
                if step > 0:
                    m = min(n, PAGE - slot)
                    e = rows[r, slot:slot + m]
                    ok = mk[e] == k + _IOTA[:m]
                else:
                    m = min(n, slot + 1)
                    e = rows[r, slot - m + 1:slot + 1][::-1]
                    ok = mk[e] == k - _IOTA[:m]
                if np.count_nonzero(ok) < m:
                    i = int(ok.argmin())
                    parts.append(e[:i])
                    return np.concatenate(parts), k + step * i
                parts.append(e)
                k += step * m
                n -= m
        if not parts:
            return np.zeros(0, np.intp), None
        return (parts[0].copy() if len(parts) == 1 else np.concatenate(parts)), None

    def set_runs(self, runs, blocks: np.ndarray) -> None:
        """Write entries for the keys of `runs` (distinct keys), in order."""
        self._maybe_sweep()
        page_row = self.page_row
        i = 0
        for k, step, n in runs:
            while n > 0:
                page = k >> PAGE_BITS
                r = page_row.get(page)
                if r is None:
                    r = self._new_row(page)
                slot = k & PAGE_MASK
                if step > 0:
                    m = min(n, PAGE - slot)
                    self.rows[r, slot:slot + m] = blocks[i:i + m]
                else:
                    m = min(n, slot + 1)
                    self.rows[r, slot - m + 1:slot + 1] = blocks[i:i + m][::-1]
                i += m
                k += step * m
                n -= m

    # -- any keys -------------------------------------------------------------------------
    def _row_index(self, keys: np.ndarray, create: bool):
        """Row of each key's page: an int when all keys share a page, else an array. A page
        not present reads as the empty row 0 unless `create`."""
        pages = keys >> PAGE_BITS
        p0 = int(pages[0])
        if p0 == int(pages[-1]) and (len(pages) < 3 or np.count_nonzero(pages != p0) == 0):
            r = self.page_row.get(p0)
            if r is None:
                r = self._new_row(p0) if create else 0
            return r
        cut = np.flatnonzero(pages[1:] != pages[:-1]) + 1
        starts = np.concatenate(([0], cut))
        page_row = self.page_row
        rs = []
        for p in pages[starts].tolist():
            r = page_row.get(p)
            if r is None:
                r = self._new_row(p) if create else 0
            rs.append(r)
        return np.repeat(np.array(rs, dtype=np.intp), np.diff(np.append(starts, len(keys))))

    def get_many(self, keys: np.ndarray) -> np.ndarray:
        """Entries for keys (candidate blocks; -1 or stale where the key has none)."""
        r = self._row_index(keys, False)
        return self.rows[r, keys & PAGE_MASK]

    def set_many(self, keys: np.ndarray, blocks: np.ndarray) -> bool:
        """Write entries; False if a key repeats in `keys` (then only the last one stuck)."""
        self._maybe_sweep()
        r = self._row_index(keys, True)
        slots = keys & PAGE_MASK
        self.rows[r, slots] = blocks
        return bool(np.count_nonzero(self.rows[r, slots] != blocks) == 0)

    # -- pages ------------------------------------------------------------------------------
    def _maybe_sweep(self) -> None:
        # Only at the start of an operation: a page made for the run in hand is still empty.
        if len(self.page_row) >= self.sweep_at:
            self._sweep()

    def _add_page(self, page: int) -> int:
        """A row for a page of a single-key operation."""
        self._maybe_sweep()
        return self._new_row(page)

    def _new_row(self, page: int) -> int:
        if not self.free_rows:
            n = len(self.rows)
            self.rows = np.concatenate((self.rows, np.full((n, PAGE), -1, np.intp)))
            self.row_page = np.concatenate((self.row_page, np.zeros(n, np.int64)))
            self.free_rows = list(range(2 * n - 1, n - 1, -1))
        r = self.free_rows.pop()
        self.page_row[page] = r
        self.row_page[r] = page
        return r

    def _sweep(self) -> None:
        """Recycle pages none of whose entries is current any more."""
        used = np.fromiter(self.page_row.values(), np.intp, len(self.page_row))
        ents = self.rows[used]
        want = (self.row_page[used] << PAGE_BITS)[:, None] + np.arange(PAGE)
        dead = used[~(self.main_key[ents] == want).any(axis=1)]
        for r in dead.tolist():
            del self.page_row[int(self.row_page[r])]
            self.free_rows.append(r)
        self.rows[dead] = -1
        self.sweep_at = max(_MIN_SWEEP, _SWEEP_GROWTH * len(self.page_row))
