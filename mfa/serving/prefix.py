"""`PrefixCache`: identical prompt prefixes share pages (prefix reuse).

A trie of full pages: node ``(parent, tokens of one page)`` -> the page holding that page's K/V for the
prefix ending there. The trie holds one reference on each of its pages, so they outlive the sequence that
wrote them; when the pool runs short it evicts least-recently-used leaves nobody else holds.

Only full pages are shared, and never the page of a prompt's last token (its logits must be computed),
so a sequence starting on shared pages only ever writes into pages of its own.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Sequence, Tuple

from mfa.serving.paged import PagedKVCache

_ROOT = -1


@dataclasses.dataclass
class _Node:
    id: int
    page: int
    key: Tuple[int, Tuple[int, ...]]
    children: int = 0
    last_used: int = 0


class PrefixCache:
    """Page-aligned prompt prefixes of a `PagedKVCache`, reusable by later sequences.

    Registers itself as the pool's ``reclaim`` hook, so allocations evict cached prefixes when short.

    Args:
        cache: the paged cache whose pages are shared.
    """

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.page_size = cache.page_size
        self._nodes: Dict[Tuple[int, Tuple[int, ...]], _Node] = {}
        self._by_id: Dict[int, _Node] = {}
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        cache.pool.reclaim = self.evict

    @property
    def num_pages(self) -> int:
        """Pages the trie holds."""
        return len(self._nodes)

    def num_reclaimable(self, exclude: Sequence[int] = ()) -> int:
        """Pages `evict` could free: those held only by the trie, minus ``exclude``."""
        refcount, keep = self.cache.pool.refcount, set(exclude)
        return sum(1 for x in self._nodes.values() if refcount[x.page] == 1 and x.page not in keep)

    def match(self, tokens: Sequence[int]) -> List[int]:
        """Pages of the longest cached prefix of ``tokens[:-1]`` made of whole pages.

        Args:
            tokens: a prompt.

        Returns:
            page ids holding tokens ``0 .. len(pages)·page_size - 1`` (not yet referenced by the caller).
        """
        pages, parent, now = [], _ROOT, next(self._clock)
        for chunk in self._full_pages(tokens[:-1]):
            node = self._nodes.get((parent, chunk))
            if node is None:
                break
            node.last_used = now
            pages.append(node.page)
            parent = node.id
        return pages

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> None:
        """Record that ``pages`` hold the K/V of ``tokens`` (full pages of ``tokens[:-1]`` only)."""
        parent, now = _ROOT, next(self._clock)
        for chunk, page in zip(self._full_pages(tokens[:-1]), pages):
            node = self._nodes.get((parent, chunk))
            if node is None:
                node = _Node(next(self._ids), page, (parent, chunk))
                self._nodes[node.key] = node
                self._by_id[node.id] = node
                self.cache.pool.share([page])
                if parent != _ROOT:
                    self._by_id[parent].children += 1
            node.last_used = now
            parent = node.id

    def evict(self, n: int) -> int:
        """Release up to ``n`` pages held only by the trie, least recently used leaves first.

        Returns:
            pages released to the pool.
        """
        freed = 0
        refcount = self.cache.pool.refcount
        while freed < n:
            leaves = [x for x in self._nodes.values() if x.children == 0 and refcount[x.page] == 1]
            if not leaves:
                break
            for node in sorted(leaves, key=lambda x: x.last_used)[: n - freed]:
                del self._nodes[node.key], self._by_id[node.id]
                if node.key[0] != _ROOT:
                    self._by_id[node.key[0]].children -= 1
                self.cache.pool.release([node.page])
                freed += 1
        return freed

    def clear(self) -> None:
        """Drop every cached prefix (its pages lose the trie's reference)."""
        self.cache.pool.release([x.page for x in self._nodes.values()])
        self._nodes.clear()
        self._by_id.clear()

    def _full_pages(self, tokens: Sequence[int]):
        ps = self.page_size
        for i in range(len(tokens) // ps):
            yield tuple(int(t) for t in tokens[i * ps : (i + 1) * ps])
