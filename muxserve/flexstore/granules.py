"""The free pages of a KV range that is mapped granule by granule.

The KV pool is an address range of ``num_granules`` granules (2 MiB by default), each holding
``pages_per_granule`` consecutive page ids: page ``p`` lies in granule ``p // pages_per_granule``.
Only pages of *mapped* granules exist. :class:`GranulePages` keeps the free pages of every mapped
granule and hands them out **fullest granule first** (fewest free pages; ties: lowest granule),
so that free pages gather in whole granules, and only a granule whose pages are all free can be
unmapped. Mapping takes the lowest unmapped granules.

Pure bookkeeping: the physical mapping is the caller's (see ``device_memory.py``).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Iterator


class GranulePages:
    """Free pages per mapped granule; see the module docstring."""

    def __init__(self, num_granules: int, pages_per_granule: int):
        if num_granules < 1:
            raise ValueError(f"num_granules must be >= 1, got {num_granules}")
        if pages_per_granule < 1:
            raise ValueError(f"pages_per_granule must be >= 1, got {pages_per_granule}")
        self.num_granules = num_granules
        self.pages_per_granule = pages_per_granule
        # Mapped granule -> its free pages; pop() gives the one to hand out next.
        self._free: dict[int, list[int]] = {}
        # (free pages, granule) of granules with free pages. Entries go stale when a count changes
        # and are skipped when popped (a lazy heap: every change costs one push, not a search).
        self._heap: list[tuple[int, int]] = []
        self._unmapped: list[int] = list(range(num_granules))  # a heap (a sorted list is one)
        self._whole: set[int] = set()  # mapped granules whose pages are all free
        self.num_free = 0  # free pages in mapped granules

    # -- figures ----------------------------------------------------------------------------
    @property
    def num_mapped(self) -> int:
        return len(self._free)

    def is_mapped(self, granule: int) -> bool:
        return granule in self._free

    def mapped(self) -> list[int]:
        return sorted(self._free)

    def whole_free(self) -> list[int]:
        """Mapped granules with every page free (the ones that can be unmapped), ascending."""
        return sorted(self._whole)

    def free_in(self, granule: int) -> int:
        """Free pages of a mapped granule (0 for an unmapped one)."""
        pages = self._free.get(granule)
        return 0 if pages is None else len(pages)

    def free_pages(self) -> list[int]:
        """Every free page of the mapped granules (for checks; O(free pages))."""
        return [p for pages in self._free.values() for p in pages]

    # -- mapping ----------------------------------------------------------------------------
    def map(self, count: int) -> list[int]:
        """Map the ``count`` lowest unmapped granules (all their pages free); returns them, ascending."""
        if not 0 <= count <= len(self._unmapped):
            raise ValueError(f"cannot map {count} granules: {len(self._unmapped)} of {self.num_granules} "
                             f"are unmapped")
        ppg = self.pages_per_granule
        granules = [heapq.heappop(self._unmapped) for _ in range(count)]
        for g in granules:
            first = g * ppg
            self._free[g] = list(range(first + ppg - 1, first - 1, -1))  # pop() gives first, first + 1, ...
            self._whole.add(g)
            heapq.heappush(self._heap, (ppg, g))
        self.num_free += count * ppg
        return granules

    def unmap(self, granules: list[int]) -> None:
        """Unmap whole free granules; a granule that is unmapped or has a page in use is an error."""
        ppg = self.pages_per_granule
        busy = [g for g in granules if g not in self._whole]
        if busy:
            detail = ", ".join(f"{g} ({'unmapped' if g not in self._free else f'{ppg - self.free_in(g)} pages in use'})"
                               for g in busy)
            raise ValueError(f"cannot unmap granules {detail}: only mapped granules with every page free can go")
        if len(set(granules)) != len(granules):
            raise ValueError(f"granules to unmap are listed twice: {sorted(granules)}")
        for g in granules:
            del self._free[g]
            self._whole.discard(g)
            heapq.heappush(self._unmapped, g)
        self.num_free -= len(granules) * ppg
        self._compact_heap()

    # -- pages ------------------------------------------------------------------------------
    def take(self, n: int) -> list[int]:
        """``n`` free pages in hand-out order, from the fullest granules first."""
        if not 0 <= n <= self.num_free:
            raise ValueError(f"cannot take {n} pages: {self.num_free} are free in mapped granules")
        out: list[int] = []
        heap, free, ppg = self._heap, self._free, self.pages_per_granule
        while len(out) < n:
            count, g = heapq.heappop(heap)
            pages = free.get(g)
            if pages is None or len(pages) != count:
                continue  # stale entry
            k = min(n - len(out), count)
            out += pages[:-k - 1:-1]  # the last k, in the order k pops would return them
            del pages[-k:]
            if count == ppg:
                self._whole.discard(g)
            if count > k:
                heapq.heappush(heap, (count - k, g))
        self.num_free -= n
        return out

    def put(self, pages: list[int]) -> None:
        """Return free pages. Within a granule the lowest returned page is handed out first."""
        free, ppg = self._free, self.pages_per_granule
        for g, run in granule_runs(pages, ppg):
            held = free.get(g)
            if held is None:
                raise ValueError(f"page {run[0]} lies in granule {g}, which is not mapped")
            held.extend(reversed(run))
            if len(held) > ppg:
                raise RuntimeError(f"granule {g} has {len(held)} free pages of {ppg}: a page was freed twice")
            heapq.heappush(self._heap, (len(held), g))
            if len(held) == ppg:
                self._whole.add(g)
        self.num_free += len(pages)
        self._compact_heap()

    def _compact_heap(self) -> None:
        if len(self._heap) > 2 * len(self._free) + 64:
            self._heap = [(len(p), g) for g, p in self._free.items() if p]
            heapq.heapify(self._heap)


def granule_runs(pages: list[int], pages_per_granule: int) -> Iterator[tuple[int, list[int]]]:
    """(granule, its pages ascending) for the granules that ``pages`` touch, ascending.

    Sorting (in C, fast on the ascending runs a request's pages form) and one bisection per
    granule is several times faster than grouping page by page.
    """
    ordered = sorted(pages)
    i, n = 0, len(ordered)
    while i < n:
        g = ordered[i] // pages_per_granule
        j = bisect_left(ordered, (g + 1) * pages_per_granule, i)
        yield g, ordered[i:j]
        i = j
