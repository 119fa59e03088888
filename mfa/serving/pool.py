"""`PagePool`: a fixed set of page ids with reference counts (the allocator of `PagedKVCache`)."""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import numpy as np


class PoolFullError(ValueError):
    """The page pool has fewer free pages than an allocation needs."""


class PagePool:
    """Hands out page ids ``0 .. num_pages-1``; a page is free again when its reference count drops to 0.

    Args:
        num_pages: pages in the pool.
        reclaim: called as ``reclaim(n)`` when an allocation is ``n`` pages short; it may release pages it
            holds (a prefix cache does) before the allocation gives up.
    """

    def __init__(self, num_pages: int, reclaim: Optional[Callable[[int], None]] = None):
        if num_pages < 1:
            raise ValueError(f"{num_pages=} must be positive")
        self.num_pages = num_pages
        self.refcount = np.zeros(num_pages, dtype=np.int64)
        self._free: List[int] = list(range(num_pages - 1, -1, -1))
        self.reclaim = reclaim
        self.version = 0  # bumped by every change of the reference counts

    @property
    def num_free(self) -> int:
        return len(self._free)

    def live(self) -> np.ndarray:
        """Boolean ``(num_pages,)``: pages currently allocated."""
        return self.refcount > 0

    def ensure_free(self, n: int) -> None:
        """Make at least ``n`` pages free (reclaiming if possible) or raise `PoolFullError`."""
        if n > self.num_free and self.reclaim is not None:
            self.reclaim(n - self.num_free)
        if n > self.num_free:
            raise PoolFullError(f"the page pool is full: need {n} free pages, have {self.num_free} of {self.num_pages}")

    def allocate(self, n: int) -> List[int]:
        """``n`` fresh pages, each with reference count 1."""
        self.ensure_free(n)
        pages = [self._free.pop() for _ in range(n)]
        self.refcount[pages] = 1
        self.version += 1
        return pages

    def share(self, pages: Iterable[int]) -> None:
        """Add one reference to each (allocated) page."""
        for p in pages:
            self._check_live(p)
            self.refcount[p] += 1
            self.version += 1

    def release(self, pages: Iterable[int]) -> None:
        """Drop one reference from each page; pages reaching 0 return to the free list."""
        for p in pages:
            self._check_live(p)
            self.refcount[p] -= 1
            self.version += 1
            if self.refcount[p] == 0:
                self._free.append(p)

    def _check_live(self, p: int) -> None:
        if not 0 <= p < self.num_pages:
            raise ValueError(f"page {p} is out of range [0, {self.num_pages})")
        if self.refcount[p] <= 0:
            raise ValueError(f"page {p} is free")
