"""Which attention blocks a rank computes against the K/V of one source rank.

Rank ``r``'s queries meet the keys of source rank ``s`` chunk by chunk.  Under a causal mask a
query chunk ``a`` and a key chunk ``b`` (global chunk indices) are

- *full* when ``a > b`` (every key precedes every query),
- *causal-diagonal* when ``a == b`` (same positions: causal attention with ``Nq == Nk``),
- *skipped* when ``a < b``.

Without a mask every pair is full.  The pairs are then covered by as few calls as possible: the
rank's own K/V is one causal call over the whole local sequence, and a rectangle of full pairs
over contiguous local ranges is one full call.  With the zig-zag layout every step is a single
call of the same size::

    own K/V (s == r):  causal(q[all],  kv[all])
    s < r:             full(q[all],    kv[first chunk])
    s > r:             full(q[second chunk], kv[all])
"""

from __future__ import annotations

import dataclasses
import functools
from typing import List, Tuple

from mfa.distributed.layout import chunks_of, chunks_per_rank

FULL, DIAGONAL, SKIP = "full", "diagonal", "skip"


@dataclasses.dataclass(frozen=True)
class Block:
    """One attention call: local query rows ``q`` against the source's local key rows ``kv``.

    Attributes:
        q: ``(start, stop)`` rows of the local queries.
        kv: ``(start, stop)`` rows of the source rank's local keys/values.
        causal: causal mask with equal lengths (the two ranges cover the same positions).
    """

    q: Tuple[int, int]
    kv: Tuple[int, int]
    causal: bool


def _relation(a: int, b: int, causal: bool) -> str:
    if not causal or a > b:
        return FULL
    return DIAGONAL if a == b else SKIP


def _span(indices: List[int]) -> bool:
    return indices == list(range(indices[0], indices[-1] + 1))


@functools.lru_cache(maxsize=4096)
def plan(rank: int, source: int, world: int, n_local: int, *, causal: bool, layout: str) -> Tuple[Block, ...]:
    """The blocks rank ``rank`` computes against the K/V held by rank ``source``.

    Args:
        rank: the rank holding the queries.
        source: the rank whose keys/values they meet.
        world: number of ranks.
        n_local: local sequence length (the same on every rank).
        causal: causal attention over the global sequence.
        layout: ``"zigzag"`` or ``"contiguous"``.

    Returns:
        Blocks whose masks, placed at their global positions, tile exactly the part of the global
        mask between the two ranks' tokens (no pair twice, none missing).
    """
    if not causal:
        return (Block((0, n_local), (0, n_local), False),)
    per = chunks_per_rank(layout)
    c = n_local // per
    q_chunks, kv_chunks = chunks_of(rank, world, layout), chunks_of(source, world, layout)
    rel = [[_relation(a, b, causal) for b in kv_chunks] for a in q_chunks]
    rows = [i for i in range(per) if any(x != SKIP for x in rel[i])]
    cols = [j for j in range(per) if any(rel[i][j] != SKIP for i in range(per))]
    if not rows:
        return ()
    local_causal = [[FULL if i > j else DIAGONAL if i == j else SKIP for j in range(per)] for i in range(per)]
    if rel == local_causal:
        # own K/V (or any source whose chunks align with ours): one causal call
        return (Block((0, n_local), (0, n_local), True),)
    if _span(rows) and _span(cols) and all(rel[i][j] == FULL for i in rows for j in cols):
        return (Block((rows[0] * c, (rows[-1] + 1) * c), (cols[0] * c, (cols[-1] + 1) * c), False),)
    # any other pattern: one call per chunk pair
    return tuple(
        Block((i * c, (i + 1) * c), (j * c, (j + 1) * c), rel[i][j] == DIAGONAL)
        for i in range(per)
        for j in range(per)
        if rel[i][j] != SKIP
    )
