"""Sequence layouts for context parallelism: which chunks of the sequence each rank holds.

A sequence of ``N`` tokens is cut into equal chunks, numbered in sequence order:

- ``"contiguous"``: ``W`` chunks, rank ``r`` holds chunk ``r``.  Under a causal mask the last rank
  does ``W`` times the work of the first.
- ``"zigzag"``: ``2W`` chunks, rank ``r`` holds chunks ``r`` and ``2W-1-r`` (in that order), so every
  rank does the same work under a causal mask::

      W = 2:   chunks  0 1 2 3   ->  rank 0: [0, 3]   rank 1: [1, 2]
      W = 4:   chunks  0 .. 7    ->  rank 0: [0, 7]   rank 1: [1, 6]   rank 2: [2, 5]   rank 3: [3, 4]

Each rank's local sequence is its chunks concatenated; positions inside it increase (a rank's later
chunk always comes later in the sequence), so plain causal attention over a rank's own tokens is the
right mask for its own K/V.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import mlx.core as mx

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout=}")


def chunks_per_rank(layout: str) -> int:
    """How many chunks each rank holds (2 for zig-zag, 1 for contiguous)."""
    check_layout(layout)
    return 2 if layout == "zigzag" else 1


def chunks_of(rank: int, world: int, layout: str) -> Tuple[int, ...]:
    """Global chunk indices held by ``rank``, in local order."""
    check_layout(layout)
    if not 0 <= rank < world:
        raise ValueError(f"{rank=} must be in [0, {world=})")
    if layout == "zigzag":
        return (rank, 2 * world - 1 - rank)
    return (rank,)


def _chunk_length(n: int, world: int, layout: str) -> int:
    count = world * chunks_per_rank(layout)
    if n % count != 0:
        raise ValueError(f"sequence length {n} must be divisible by {count} ({layout} layout over {world=} ranks)")
    return n // count


def shard(x: mx.array, rank: int, world: int, *, layout: str = "zigzag", axis: int = 2) -> mx.array:
    """The part of a full sequence that ``rank`` holds.

    Args:
        x: full sequence, e.g. ``(B, H, N, D)`` with the sequence on ``axis``.
        rank: this rank, in ``[0, world)``.
        world: number of ranks.
        layout: ``"zigzag"`` or ``"contiguous"``.
        axis: the sequence axis. Default: 2 (mfa's ``(B, H, N, D)`` layout).

    Returns:
        ``x`` restricted to the rank's chunks along ``axis`` (length ``N / world``).
    """
    c = _chunk_length(x.shape[axis], world, layout)
    parts = [mx.take(x, mx.arange(i * c, (i + 1) * c), axis=axis) for i in chunks_of(rank, world, layout)]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)


def unshard(parts: Sequence[mx.array], *, layout: str = "zigzag", axis: int = 2) -> mx.array:
    """Inverse of `shard`: the full sequence from every rank's part.

    Args:
        parts: the ``world`` local parts in rank order, each of length ``N / world`` on ``axis``.
        layout: the layout they were sharded with.
        axis: the sequence axis. Default: 2.

    Returns:
        The full sequence (length ``N`` on ``axis``).
    """
    world = len(parts)
    per = chunks_per_rank(layout)
    n_local = parts[0].shape[axis]
    if n_local % per != 0:
        raise ValueError(f"local length {n_local} must be divisible by {per} ({layout} layout)")
    c = n_local // per
    chunks = [None] * (world * per)
    for rank, part in enumerate(parts):
        if part.shape[axis] != n_local:
            raise ValueError(f"every part must have length {n_local} on {axis=}, rank {rank} has {part.shape[axis]}")
        for slot, chunk in enumerate(chunks_of(rank, world, layout)):
            chunks[chunk] = mx.take(part, mx.arange(slot * c, (slot + 1) * c), axis=axis)
    return mx.concatenate(chunks, axis=axis)


def positions(n_local: int, rank: int, world: int, *, layout: str = "zigzag") -> mx.array:
    """Global sequence position of each of ``rank``'s ``n_local`` tokens (for RoPE, masks, labels).

    Returns:
        ``(n_local,)`` int32.
    """
    c = _chunk_length(n_local * world, world, layout)
    return mx.concatenate([mx.arange(i * c, (i + 1) * c, dtype=mx.int32) for i in chunks_of(rank, world, layout)])


def gather(x: mx.array, group=None, *, layout: str = "zigzag", axis: int = 2) -> mx.array:
    """Collective: the full sequence on every rank, from each rank's local part.

    Args:
        x: this rank's part, length ``N / world`` on ``axis``.
        group: an ``mx.distributed`` group. Default: the global group.
        layout: the layout the parts follow.
        axis: the sequence axis. Default: 2.

    Returns:
        The full sequence (length ``N`` on ``axis``), the same on every rank.
    """
    group = group or mx.distributed.init()
    if group.size() == 1:
        return unshard([x], layout=layout, axis=axis)
    stacked = mx.distributed.all_gather(x[None], group=group)
    return unshard([stacked[i] for i in range(group.size())], layout=layout, axis=axis)
