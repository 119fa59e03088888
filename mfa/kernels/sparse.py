"""Block-sparse schedules of the attention kernels, compiled from a `mfa.BlockMask`.

A kernel tile (``BQ x BK`` scores of the kernel, whatever the mask's block size) is *active* when
any mask block it overlaps is active and it meets the causal/window band, and *full* when every
block it overlaps is full.  The kernels get, in one int32 buffer ``sched = [offsets, entries,
order]``:

- forward and dq: one list per (mask batch, mask head, query tile) of ``(key tile, partial)``;
- dk/dv: one list per (mask batch, key/value head or 1, key tile) of ``(group head, query
  tile, partial)`` — the transpose, with the query heads of a GQA group one after another;

and ``order``, per (mask batch, head) row of lists, its tiles by decreasing list length (the
order the threadgroups take them in, longest first).  ``partial`` is -1 for a full tile, else
the index of the tile's element mask in the uint32 ``bits`` buffer (``BQ`` rows of
``ceil(BK/32)`` words, bit ``c % 32`` of word ``c // 32`` is key ``c``), built from `BlockMask.element_mask` (the ``mask_mod``) for partial tiles only.
Schedules are cached per mask object and kernel tile.
"""

from __future__ import annotations

import weakref
from typing import Dict, NamedTuple, Tuple

import mlx.core as mx
import numpy as np

UNBOUNDED = 1 << 30  # band side without a bound (metal/band.h: kUnbounded)

_cache: "weakref.WeakKeyDictionary[object, Dict[tuple, Schedule]]" = weakref.WeakKeyDictionary()


class Schedule(NamedTuple):
    """A compiled block-sparse schedule: ``sched`` int32, ``bits`` uint32 (None: no partial tile)
    and the mask's batch and head extents."""

    sched: mx.array
    bits: object
    mask_b: int
    mask_h: int


def _range_reduce(m: np.ndarray, axis: int, block: int, tile: int, n: int, want_all: bool) -> np.ndarray:
    """Reduce the block axis `axis` of `m` to kernel tiles: any/all over the blocks each tile overlaps."""
    starts = np.arange(0, n, tile)
    lo = starts // block
    hi = (np.minimum(starts + tile, n) - 1) // block + 1  # blocks [lo, hi) overlap the tile
    counts = np.cumsum(np.moveaxis(m, axis, -1).astype(np.int64), axis=-1)
    counts = np.concatenate([np.zeros(counts.shape[:-1] + (1,), np.int64), counts], axis=-1)
    inside = counts[..., hi] - counts[..., lo]
    reduced = inside == (hi - lo) if want_all else inside > 0
    return np.moveaxis(reduced, -1, axis)


def tile_maps(block_mask, Nq: int, Nk: int, BQ: int, BK: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(active, full)`` of the kernel tiles, ``(mask_b, mask_h, ceil(Nq/BQ), ceil(Nk/BK))``."""
    bq, bk = block_mask.block_size
    active = _range_reduce(block_mask.active, 3, bk, BK, Nk, want_all=False)
    active = _range_reduce(active, 2, bq, BQ, Nq, want_all=False)
    full = _range_reduce(block_mask.full, 3, bk, BK, Nk, want_all=True)
    full = _range_reduce(full, 2, bq, BQ, Nq, want_all=True)
    return active, full & active


def band_map(Nq: int, Nk: int, BQ: int, BK: int, left: int, right: int) -> np.ndarray:
    """Kernel tiles ``(ceil(Nq/BQ), ceil(Nk/BK))`` that meet the band ``i' - left <= j <= i' + right``
    (the test the kernels' dense loops use)."""
    q0 = np.arange(0, Nq, BQ)
    q1 = np.minimum(q0 + BQ, Nq)
    kv_lo = np.maximum(q0 + (Nk - Nq) - left, 0)
    kv_hi = np.minimum(q1 - 1 + (Nk - Nq) + right + 1, Nk)
    k0 = np.arange(0, Nk, BK)
    return (kv_hi > kv_lo)[:, None] & (k0[None, :] < kv_hi[:, None]) & (k0[None, :] + BK > kv_lo[:, None])


def _bits(block_mask, partial: np.ndarray, Nq: int, Nk: int, BQ: int, BK: int) -> np.ndarray:
    """Element bitmasks of the partial tiles, in their C order: ``(count, BQ, ceil(BK/32))`` uint32."""
    words = -(-BK // 32)
    mb, mh = partial.shape[:2]
    out = np.zeros((int(partial.sum()), BQ, words * 32), dtype=bool)
    index = np.cumsum(partial.ravel()).reshape(partial.shape) - 1
    for tq in np.flatnonzero(partial.any(axis=(0, 1, 3))):
        r0, r1 = int(tq) * BQ, min(int(tq) * BQ + BQ, Nq)
        rows = np.broadcast_to(np.array(block_mask.element_mask(r0, r1, 0, Nk)), (mb, mh, r1 - r0, Nk))
        for b, h, tk in zip(*np.nonzero(partial[:, :, tq])):
            c0, c1 = tk * BK, min(tk * BK + BK, Nk)
            out[index[b, h, tq, tk], : r1 - r0, : c1 - c0] = rows[b, h, :, c0:c1]
    return np.packbits(out, axis=-1, bitorder="little").view("<u4")


def schedule(block_mask, Nq: int, Nk: int, BQ: int, BK: int, left: int, right: int, group: int,
             transposed: bool) -> Schedule:
    """The (cached) schedule of one kernel's tiles.

    Args:
        block_mask: the call's `mfa.BlockMask` (``(mask_b, mask_h, ...)`` block maps).
        Nq, Nk: score matrix size.
        BQ, BK: the kernel's query / key tile.
        left, right: the band (``UNBOUNDED`` where open).
        group: query heads per key/value head (dk/dv lists take a group's heads in turn).
        transposed: lists per key tile (dk/dv) instead of per query tile (forward, dq).
    """
    key = (Nq, Nk, BQ, BK, left, right, group, transposed)
    per_mask = _cache.setdefault(block_mask, {})
    if key not in per_mask:
        per_mask[key] = _build(block_mask, Nq, Nk, BQ, BK, left, right, group, transposed)
    return per_mask[key]


def _build(block_mask, Nq, Nk, BQ, BK, left, right, group, transposed) -> Schedule:
    active, full = tile_maps(block_mask, Nq, Nk, BQ, BK)
    active = active & band_map(Nq, Nk, BQ, BK, left, right)[None, None]
    partial = active & ~full
    mb, mh, nqt, nkt = active.shape
    pid = np.where(partial, np.cumsum(partial.ravel()).reshape(partial.shape) - 1, -1)
    if not transposed:
        lists = active  # (mb, mh, nqt, nkt): rows (mb, mh, query tile), entries by key tile
        b, h, tq, tk = np.nonzero(lists)
        entries = np.stack([tk, pid[b, h, tq, tk]], axis=-1)
        counts = lists.sum(axis=-1).ravel()
    else:
        # (mb, Hkv or 1, key tile, group head, query tile): the group's heads one after another
        if mh > 1:
            lists = active.reshape(mb, mh // group, group, nqt, nkt).transpose(0, 1, 4, 2, 3)
        else:
            lists = np.broadcast_to(active.transpose(0, 1, 3, 2)[:, :, :, None, :], (mb, 1, nkt, group, nqt))
        b, hk, tk, g, tq = np.nonzero(lists)
        h = hk * group + g if mh > 1 else np.zeros_like(g)
        entries = np.stack([g, tq, pid[b, h, tq, tk]], axis=-1)
        counts = lists.sum(axis=(-2, -1)).ravel()
    offsets = np.concatenate([[0], np.cumsum(counts)])
    # each (mask batch, head)'s tiles by decreasing list length: threadgroups take them in this
    # order, so the longest start first and the last to start are the shortest (for the benchmark's
    # 10 % of 128 x 128 blocks, greedy dispatch onto 396 slots ends 5 % over the ideal, 10 % unordered)
    order = np.argsort(-counts.reshape(-1, nkt if transposed else nqt), axis=1, kind="stable")
    sched = mx.array(np.concatenate([offsets, entries.ravel(), order.ravel()]).astype(np.int32))
    bits = mx.array(_bits(block_mask, partial, Nq, Nk, BQ, BK).reshape(-1)) if partial.any() else None
    return Schedule(sched, bits, mb, mh)
