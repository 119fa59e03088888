"""`BlockMask`: a block-sparse attention pattern.

A BlockMask keeps a boolean map of which ``(block_q, block_k)`` tiles of the score matrix hold
anything to attend (``active``) and which hold only kept entries (``full``: no per-element mask
needed there).  Tiles that are not active are skipped by the forward and the backward.

Built either from a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (exact per-element mask, like
FlexAttention's) or from a block map (block granularity)::

    # document mask: tokens attend within their own document
    doc = mx.array(doc_ids)                                            # (N,)
    bm = BlockMask.from_mask_mod(lambda b, h, q, kv: doc[q] == doc[kv], 1, 1, N, N)
    # prefix-LM: bidirectional over the first P tokens, causal after
    bm = BlockMask.from_mask_mod(lambda b, h, q, kv: (kv <= q) | (kv < P), 1, 1, N, N)
    # dilated: every 4th key
    bm = BlockMask.from_mask_mod(lambda b, h, q, kv: kv % 4 == 0, 1, 1, N, N)
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

MaskMod = Callable[[mx.array, mx.array, mx.array, mx.array], mx.array]


def _pair(block_size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if int(bq) <= 0 or int(bk) <= 0:
        raise ValueError(f"block_size must be positive, got {block_size=}")
    return int(bq), int(bk)


class BlockMask:
    """Block-sparse attention pattern over a ``(B|1, H|1, Nq, Nk)`` score matrix.

    Use `BlockMask.from_mask_mod` or `BlockMask.from_blocks` rather than the constructor.

    Attributes:
        active: numpy bool ``(B|1, H|1, ceil(Nq/bq), ceil(Nk/bk))``: tile has something to attend.
        full: numpy bool, same shape: every entry of the tile is kept.
        block_size: ``(bq, bk)``.
        mask_mod: the element predicate, or None for block granularity.
        seq_lens: ``(Nq, Nk)`` the mask was built for, or None when built from blocks.
    """

    def __init__(self, active, full, block_size, mask_mod: Optional[MaskMod] = None, seq_lens=None):
        self.active = np.asarray(active, dtype=bool)
        self.full = np.asarray(full, dtype=bool)
        self.block_size = _pair(block_size)
        self.mask_mod = mask_mod
        self.seq_lens = seq_lens
        self._blocks_mx = None

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_mask_mod(
        cls,
        mask_mod: MaskMod,
        B: int,
        H: int,
        Nq: int,
        Nk: int,
        block_size: Union[int, Tuple[int, int]] = 128,
    ) -> "BlockMask":
        """Build from an element predicate.

        Args:
            mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool array``; the arguments are int32
                arrays of shapes ``(B, 1, 1, 1)``, ``(1, H, 1, 1)``, ``(1, 1, bq, 1)``,
                ``(1, 1, 1, Nk)`` and the result broadcasts with them. True means attend.
            B, H: batch and query heads (use 1 when the mask does not depend on them).
            Nq, Nk: query and key lengths.
            block_size: tile size, an int or ``(bq, bk)``. Default: ``128``.
        """
        bq, bk = _pair(block_size)
        nqb, nkb = math.ceil(Nq / bq), math.ceil(Nk / bk)
        b = mx.arange(B, dtype=mx.int32).reshape(B, 1, 1, 1)
        h = mx.arange(H, dtype=mx.int32).reshape(1, H, 1, 1)
        kv = mx.arange(Nk, dtype=mx.int32).reshape(1, 1, 1, Nk)
        # keep the batch/head axes only where the mask depends on them
        probe = mask_mod(b, h, mx.zeros((1, 1, 1, 1), dtype=mx.int32), kv)
        probe_shape = (1,) * (4 - probe.ndim) + tuple(probe.shape)
        mb = B if probe_shape[0] == B else 1
        mh = H if probe_shape[1] == H else 1
        # the tail columns past Nk do not exist: they count as kept for "full"
        tail = (mx.arange(nkb * bk) >= Nk).reshape(nkb, bk)
        active_rows, full_rows = [], []
        for i in range(nqb):
            r0, r1 = i * bq, min((i + 1) * bq, Nq)
            q = mx.arange(r0, r1, dtype=mx.int32).reshape(1, 1, r1 - r0, 1)
            m = mx.broadcast_to(mask_mod(b[:mb], h[:, :mh], q, kv), (mb, mh, r1 - r0, Nk))
            m = mx.pad(m.astype(mx.bool_), [(0, 0), (0, 0), (0, 0), (0, nkb * bk - Nk)])
            m = m.reshape(mb, mh, r1 - r0, nkb, bk)
            any_kept = m.any(axis=(2, 4))
            all_kept = (m | tail).all(axis=(2, 4))
            mx.eval(any_kept, all_kept)
            active_rows.append(np.array(any_kept))
            full_rows.append(np.array(all_kept))
        empty = np.zeros((mb, mh, 0, nkb), bool)
        active = np.stack(active_rows, axis=2) if nqb else empty
        full = np.stack(full_rows, axis=2) if nqb else empty
        return cls(active, full, (bq, bk), mask_mod=mask_mod, seq_lens=(Nq, Nk))

    @classmethod
    def from_blocks(cls, blocks, block_size: Union[int, Tuple[int, int]] = 128) -> "BlockMask":
        """Build from a boolean block map (block granularity: an active tile is attended whole).

        Args:
            blocks: bool ``(B|1, H|1, ceil(Nq/bq), ceil(Nk/bk))`` (numpy, MLX or nested lists).
            block_size: tile size, an int or ``(bq, bk)``. Default: ``128``.
        """
        blocks = np.array(blocks)
        if blocks.ndim != 4:
            raise ValueError(
                f"blocks must be 4-D (B|1, H|1, ceil(Nq/bq), ceil(Nk/bk)), got shape {blocks.shape}"
            )
        if blocks.dtype != bool:
            raise ValueError(f"blocks must be boolean, got dtype {blocks.dtype}")
        return cls(blocks, blocks, block_size)

    # -- queries ----------------------------------------------------------------------------

    @property
    def density(self) -> float:
        """Fraction of active tiles."""
        return float(self.active.mean()) if self.active.size else 0.0

    def num_blocks(self, Nq: int, Nk: int) -> Tuple[int, int]:
        bq, bk = self.block_size
        return math.ceil(Nq / bq), math.ceil(Nk / bk)

    def check(self, B: int, H: int, Nq: int, Nk: int) -> None:
        """Raise ValueError unless this mask fits a ``(B, H, Nq, Nk)`` score matrix."""
        expected = self.num_blocks(Nq, Nk)
        mb, mh, nqb, nkb = self.active.shape
        if (nqb, nkb) != expected or mb not in (1, B) or mh not in (1, H):
            raise ValueError(
                f"block map of shape {self.active.shape} with block_size={self.block_size} does not fit "
                f"{B=}, {H=}, {Nq=}, {Nk=}: expected (1|{B}, 1|{H}, {expected[0]}, {expected[1]})"
            )
        if self.seq_lens is not None and self.seq_lens != (Nq, Nk):
            raise ValueError(f"BlockMask was built for (Nq, Nk)={self.seq_lens}, got {Nq=}, {Nk=}")

    def element_mask(self, r0: int, r1: int, c0: int, c1: int) -> mx.array:
        """Keep-mask of the score tile ``[r0:r1, c0:c1]``, shape ``(B|1, H|1, r1-r0, c1-c0)``."""
        if self.mask_mod is not None:
            mb, mh = self.active.shape[:2]
            b = mx.arange(mb, dtype=mx.int32).reshape(mb, 1, 1, 1)
            h = mx.arange(mh, dtype=mx.int32).reshape(1, mh, 1, 1)
            q = mx.arange(r0, r1, dtype=mx.int32).reshape(1, 1, -1, 1)
            kv = mx.arange(c0, c1, dtype=mx.int32).reshape(1, 1, 1, -1)
            return self.mask_mod(b, h, q, kv).astype(mx.bool_)
        bq, bk = self.block_size
        if self._blocks_mx is None:
            self._blocks_mx = mx.array(self.active)
        rows = mx.arange(r0, r1) // bq
        cols = mx.arange(c0, c1) // bk
        return self._blocks_mx[:, :, rows][:, :, :, cols]

    def dense_mask(self, Nq: int, Nk: int) -> mx.array:
        """The whole keep-mask ``(B|1, H|1, Nq, Nk)`` (for the reference)."""
        return self.element_mask(0, Nq, 0, Nk)

    def __repr__(self) -> str:
        kind = "mask_mod" if self.mask_mod is not None else "blocks"
        return (
            f"BlockMask(shape={self.active.shape}, block_size={self.block_size}, "
            f"density={self.density:.3f}, from={kind})"
        )

