"""Tile sizes of the attention kernels, per (head dim, dtype, target)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import mlx.core as mx

HEAD_DIMS = (64, 80, 96, 128, 192, 256)  # compiled head dims; others are zero-padded up
SHARED_LIMIT = {"metal": 32 * 1024, "cuda": 227 * 1024}
FRAGMENT_ROWS = {"metal": 8, "cuda": 16}  # rows of one accumulator fragment (a warp's row granule)


def padded_head_dim(d: int) -> Optional[int]:
    """The smallest compiled head dim >= d, or None when d > 256."""
    return next((h for h in HEAD_DIMS if h >= d), None)


def row_stride(d: int) -> int:
    """Padded row stride of a shared tile (elements): 16 spare bytes keep loads conflict-free."""
    return d + 8


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tiles of one kernel.

    Attributes:
        block_q, block_k: query / key rows per tile.
        warps: warps (simdgroups) per threadgroup; each owns ``block_q / warps`` query rows
            (``block_k / warps`` key rows in the dk/dv kernel).
        stages: key/value tiles in flight (2: cp.async double buffering on CUDA).
    """

    block_q: int
    block_k: int
    warps: int
    stages: int = 1

    @property
    def threads(self) -> int:
        return 32 * self.warps


def shared_bytes(kernel: str, t: Tiles, d: int, itemsize: int, bias_itemsize: int = 0,
                 dbias_itemsize: int = 0, fused_dq: bool = False) -> int:
    """Threadgroup memory of a kernel (the SMEM template value; the bodies static_assert it).

    ``bias_itemsize``: the bias's element size when its tiles are staged (BIAS_TILE), else 0;
    ``dbias_itemsize``: the dq kernel also gathers dS tiles (in dbias's type) for contiguous dbias
    writes, else 0; ``fused_dq``: the dk/dv kernel also computes dq (through a dS tile).
    """
    if kernel == "attention_bwd_preprocess":
        return 0
    rows = {
        "attention_fwd": t.block_q + 2 * t.stages * t.block_k,  # Q + stages x (K, V)
        "attention_bwd_dq": 2 * t.block_q + 2 * t.stages * t.block_k,  # Q, dO + stages x (K, V)
        "attention_bwd_dkdv": 2 * t.block_k + 2 * t.stages * t.block_q,  # K, V + stages x (Q, dO)
    }[kernel]
    extra = 8 * t.stages * t.block_q if kernel == "attention_bwd_dkdv" else 0  # lse, delta rows (float32)
    if bias_itemsize:  # stages x (block_q x block_k) bias tiles, rows padded by 16 bytes
        extra += t.stages * t.block_q * (t.block_k * bias_itemsize + 16)
    if dbias_itemsize:
        extra += t.block_q * (t.block_k * dbias_itemsize + 16)
    if fused_dq:
        extra += t.block_q * (t.block_k + 8) * itemsize
    return rows * row_stride(d) * itemsize + extra


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the forward, dq and dk/dv kernels (None: no tile fits the target)."""

    fwd: Optional[Tiles]
    dq: Optional[Tiles]
    dkdv: Optional[Tiles]

    @staticmethod
    def default(head_dim: int, dtype: mx.Dtype, arch: str) -> "BlockSizes":
        """Default tiles for a compiled head dim and a fragment family (``"metal"`` or ``"cuda"``).

        Metal: 8-row simdgroup fragments, 32 KB of threadgroup memory, so tiles shrink with D
        and dtype.  CUDA: 16-row mma fragments, one warp per 16 rows, up to 227 KB shared.
        """
        if arch == "cuda":
            # measured on an H100 (benchmarks/cuda_check.py --tune): 4 warps of 32 query rows
            # beat 8 warps of 16 in the forward; 16-row warps elsewhere (register budget)
            options = {
                "attention_fwd": [Tiles(128, 64, 4, 2)] if head_dim <= 128 else [Tiles(64, 64, 4, 2)],
                "attention_bwd_dq": [Tiles(64, 64, 4, 2)],
                "attention_bwd_dkdv": [Tiles(64, 64, 4, 2)],
            }
        else:
            fwd = [Tiles(32, 32, 4), Tiles(32, 16, 4), Tiles(16, 16, 2), Tiles(8, 16, 1), Tiles(8, 8, 1)]
            options = {
                "attention_fwd": fwd,
                "attention_bwd_dq": fwd,
                "attention_bwd_dkdv": [Tiles(32, 32, 4), Tiles(16, 32, 4), Tiles(16, 16, 2), Tiles(8, 16, 2),
                                       Tiles(8, 8, 1)],
            }
        limit = SHARED_LIMIT[arch]

        def pick(kernel):
            fits = (t for t in options[kernel] if shared_bytes(kernel, t, head_dim, dtype.size) <= limit)
            return next(fits, None)

        return BlockSizes(pick("attention_fwd"), pick("attention_bwd_dq"), pick("attention_bwd_dkdv"))
