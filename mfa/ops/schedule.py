"""Host-side tile schedule: which score tiles to visit, and which need no element mask.

The score matrix is cut into row tiles (queries) and column tiles (keys).  A tile is *active*
when some entry in it survives the causal/window band, the varlen segment structure and the
block mask; inactive tiles are skipped by the forward and the backward.  A tile is *full* when
every entry survives, so it needs no per-element mask.

Segments describe varlen packing: rows ``[q_lo, q_hi)`` attend columns ``[k_lo, k_hi)`` of the
same segment, with query row r at key position ``r - q_lo + offset`` (bottom-right alignment,
``offset = len_k - len_q``).  A dense call is one segment.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import numpy as np

from mfa.ops.spec import AttentionSpec


@dataclasses.dataclass(frozen=True)
class Segments:
    """Packed sequences as numpy arrays of shape ``(S,)``."""

    q_lo: np.ndarray
    q_hi: np.ndarray
    k_lo: np.ndarray
    k_hi: np.ndarray

    @classmethod
    def dense(cls, Nq: int, Nk: int) -> "Segments":
        return cls(*(np.array([x], dtype=np.int64) for x in (0, Nq, 0, Nk)))

    @classmethod
    def from_cu_seqlens(cls, cu_q: np.ndarray, cu_k: np.ndarray) -> "Segments":
        cu_q, cu_k = np.asarray(cu_q, np.int64), np.asarray(cu_k, np.int64)
        return cls(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])

    @property
    def offset(self) -> np.ndarray:
        return (self.k_hi - self.k_lo) - (self.q_hi - self.q_lo)


@dataclasses.dataclass
class TileSchedule:
    """Row/column tiles of the score matrix and the boolean maps ``active``/``full`` over them."""

    row_tiles: List[Tuple[int, int]]
    col_tiles: List[Tuple[int, int]]
    active: np.ndarray  # (num_row_tiles, num_col_tiles)
    full: np.ndarray

    def cols_of_row(self, i: int) -> List[int]:
        return [int(j) for j in np.flatnonzero(self.active[i])]

    def rows_of_col(self, j: int) -> List[int]:
        return [int(i) for i in np.flatnonzero(self.active[:, j])]

    @property
    def density(self) -> float:
        return float(self.active.mean()) if self.active.size else 0.0


def _tiles(n: int, size: int) -> List[Tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _segment_tiles(lo: np.ndarray, hi: np.ndarray, size: int) -> List[Tuple[int, int]]:
    """Tiles of at most ``size`` inside each ``[lo, hi)`` range, in order (empty ranges give none)."""
    return [(a + s, min(a + s + size, b)) for a, b in zip(lo.tolist(), hi.tolist()) for s in range(0, b - a, size)]


def _band_maps(spec: AttentionSpec, segs: Segments, rows, cols) -> Tuple[np.ndarray, np.ndarray]:
    """``(active, full)`` of every tile under the band and segment structure."""
    left, right = spec.band
    R0 = np.array([r[0] for r in rows])[None, :, None]
    R1 = np.array([r[1] for r in rows])[None, :, None]
    C0 = np.array([c[0] for c in cols])[None, None, :]
    C1 = np.array([c[1] for c in cols])[None, None, :]
    q_lo, q_hi = segs.q_lo[:, None, None], segs.q_hi[:, None, None]
    k_lo, k_hi = segs.k_lo[:, None, None], segs.k_hi[:, None, None]
    off = segs.offset[:, None, None]
    # the part of each tile inside each segment's rectangle
    r_lo, r_hi = np.maximum(R0, q_lo), np.minimum(R1, q_hi)
    c_lo, c_hi = np.maximum(C0, k_lo), np.minimum(C1, k_hi)
    nonempty = (r_lo < r_hi) & (c_lo < c_hi)
    # key-axis positions: i' in [a, b] for the rows, j in [c, d] for the columns
    a, b = r_lo - q_lo + off, r_hi - 1 - q_lo + off
    c, d = c_lo - k_lo, c_hi - 1 - k_lo
    some_kept = nonempty.copy()
    all_kept = nonempty & (r_lo == R0) & (r_hi == R1) & (c_lo == C0) & (c_hi == C1)
    if left is not None:
        some_kept &= d - a >= -left
        all_kept &= c - b >= -left
    if right is not None:
        some_kept &= c - b <= right
        all_kept &= d - a <= right
    return some_kept.any(axis=0), all_kept.any(axis=0)


def _block_mask_maps(block_mask, rows, cols, tile_q: int, tile_k: int):
    """``(active, full)`` of every tile from a BlockMask whose blocks divide the tiles."""
    bq, bk = block_mask.block_size
    fq, fk = tile_q // bq, tile_k // bk
    nr, nc = len(rows), len(cols)

    def per_tile(m: np.ndarray, fill: bool, reduce) -> np.ndarray:
        mb, mh, nqb, nkb = m.shape
        padded = np.full((mb, mh, nr * fq, nc * fk), fill)
        padded[:, :, :nqb, :nkb] = m
        tiles = padded.reshape(mb, mh, nr, fq, nc, fk)
        return reduce(tiles, axis=(0, 1, 3, 5))

    return per_tile(block_mask.active, False, np.any), per_tile(block_mask.full, True, np.all)


def build_schedule(
    spec: AttentionSpec,
    Nq: int,
    Nk: int,
    tile_q: int,
    tile_k: int,
    segments: Optional[Segments],
) -> TileSchedule:
    """Tile the ``(Nq, Nk)`` score matrix and mark active/full tiles.

    Args:
        spec: the call's static options (band, block mask, varlen).
        Nq, Nk: score matrix size (packed totals for varlen).
        tile_q, tile_k: tile sizes (multiples of the block mask's block sizes, if any).
        segments: the varlen segments, or None when they cannot be read (a varlen call under
            `mx.compile`): then every tile is visited with its element mask.
    """
    if spec.varlen and segments is not None:
        # tiles follow the sequence boundaries: no tile straddles two sequences
        rows = _segment_tiles(segments.q_lo, segments.q_hi, tile_q)
        cols = _segment_tiles(segments.k_lo, segments.k_hi, tile_k)
    else:
        rows, cols = _tiles(Nq, tile_q), _tiles(Nk, tile_k)
    shape = (len(rows), len(cols))
    if spec.varlen and segments is None:
        active, full = np.ones(shape, bool), np.zeros(shape, bool)
    elif spec.varlen or spec.has_band:
        segs = segments if spec.varlen else Segments.dense(Nq, Nk)
        active, full = _band_maps(spec, segs, rows, cols)
    else:
        active, full = np.ones(shape, bool), np.ones(shape, bool)
    if spec.block_mask is not None:
        bm_active, bm_full = _block_mask_maps(spec.block_mask, rows, cols, tile_q, tile_k)
        active, full = active & bm_active, full & bm_full
    return TileSchedule(rows, cols, active, full & active)


def aligned_tile(default: int, block: int) -> int:
    """The multiple of ``block`` closest to ``default`` (at least ``block``)."""
    return block * max(1, int(math.floor(default / block + 0.5)))
