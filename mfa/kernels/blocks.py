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
        min_blocks: CUDA only: threadgroups per SM the compiler must fit registers for
            (``__launch_bounds__(threads, min_blocks)``, i.e. at most 64K / (threads · min_blocks)
            registers a thread); 0 leaves the register count to the compiler.
        bias_lead: with a staged bias (BIAS_TILE), how many tiles (work items in dk/dv) further
            ahead than the others its tiles are copied: the bias streams from DRAM once per
            element while the other tiles mostly come from L2, so its copies may need more time
            in flight.  The ring then holds ``stages + bias_lead`` bias tiles (the BIAS_LEAD
            template value; 0 without a staged bias).
    """

    block_q: int
    block_k: int
    warps: int
    stages: int = 1
    min_blocks: int = 0
    bias_lead: int = 0

    @property
    def threads(self) -> int:
        return 32 * self.warps


def shared_bytes(kernel: str, t: Tiles, d: int, itemsize: int, bias_itemsize: int = 0,
                 dbias_itemsize: int = 0, fused_dq: bool = False, wg: bool = False) -> int:
    """Threadgroup memory of a kernel (the SMEM template value; the bodies static_assert it).

    ``bias_itemsize``: the bias's element size when its tiles are staged (BIAS_TILE), else 0
    (the ring of ``t.stages + t.bias_lead`` bias tiles);
    ``dbias_itemsize``: the kernel (dq, or dk/dv) also gathers dS tiles (in dbias's type) for
    contiguous dbias writes, else 0; ``fused_dq``: the dk/dv kernel also computes dq (through a
    dS tile); ``wg``: the kernel's B tiles are wgmma's (WG, see `wgmma`): dk/dv stages start
    1024-byte aligned.
    """
    if kernel == "attention_bwd_preprocess":
        return 0
    tile = row_stride(d) * itemsize  # bytes of one row of a Q, K, V or dO tile
    bias_tile = t.block_q * (t.block_k * bias_itemsize + 16) if bias_itemsize else 0  # rows padded by 16 bytes
    dq_tile = t.block_q * (t.block_k + 8) * itemsize if fused_dq else 0
    dbias_tile = t.block_q * (t.block_k * dbias_itemsize + 16) if dbias_itemsize else 0
    bias_ring = (t.stages + t.bias_lead) * bias_tile
    if kernel == "attention_bwd_dkdv":  # K, V + stages x (Q, dO, lse and delta rows) + the bias ring
        stage = 2 * t.block_q * tile + 8 * t.block_q
        stage = -(-stage // 1024) * 1024 if wg else stage
        return 2 * t.block_k * tile + t.stages * stage + bias_ring + dq_tile + dbias_tile
    rows = {
        "attention_fwd": t.block_q + 2 * t.stages * t.block_k,  # Q + stages x (K, V)
        "attention_bwd_dq": 2 * t.block_q + 2 * t.stages * t.block_k,  # Q, dO + stages x (K, V)
    }[kernel]
    return rows * tile + bias_ring + dbias_tile + dq_tile


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the forward, dq and dk/dv kernels (None: no tile fits the target)."""

    fwd: Optional[Tiles]
    dq: Optional[Tiles]
    dkdv: Optional[Tiles]

    @staticmethod
    def default(head_dim: int, dtype: mx.Dtype, arch: str, allow_wgmma: bool = True) -> "BlockSizes":
        """Default tiles for a compiled head dim and a fragment family (``"metal"`` or ``"cuda"``).

        Metal: 8-row simdgroup fragments, 32 KB of threadgroup memory, so tiles shrink with D
        and dtype.  CUDA: 16-row mma fragments, up to 227 KB shared; one warpgroup of 16-row
        warps, whose B tiles go to wgmma (`wgmma`), wherever the head dim and dtype allow it.
        """
        if arch == "cuda":
            # measured on an H100 (benchmarks/cuda_check.py --tune, then with wgmma): with
            # mma.sync alone, 4 warps of 32 query rows beat 8 warps of 16 in the forward; with
            # wgmma, 64 x 64 tiles of 4 warps win in every kernel (window forward 129 -> 93 µs;
            # the forward's 128 x 64 tiles of 32-row wgmma warps measured no faster: block-sparse
            # 0.37 ms either way, causal + dropout 0.40 against 0.35; results/h100_profile_1207.md).
            # At D = 64 register caps (`Tiles.min_blocks`) pay: the wgmma dq kernel takes 176
            # registers, two threadgroups an SM; capped at 168 (three) it spills 16 B and runs
            # faster (window 137 -> 117 µs, block-sparse 666 -> 529 µs); the forward, 133 -> 128
            # (four), window 94 -> 89 µs.  `attention.forward_tiles` / `backward_tiles` drop the
            # caps for the variants that spill more under them.
            wg_forward = allow_wgmma and wgmma(arch, "attention_fwd", Tiles(64, 64, 4), head_dim, dtype)
            wide_forward = head_dim <= 128 and not wg_forward
            capped = wg_forward and head_dim == 64
            options = {
                "attention_fwd": [Tiles(128, 64, 4, 2)] if wide_forward else [Tiles(64, 64, 4, 2, 4 if capped else 0)],
                "attention_bwd_dq": [Tiles(64, 64, 4, 2, 3 if capped else 0)],
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
            fits = (t for t in options[kernel]
                    if shared_bytes(kernel, t, head_dim, dtype.size, wg=arch == "cuda") <= limit)
            return next(fits, None)

        return BlockSizes(pick("attention_fwd"), pick("attention_bwd_dq"), pick("attention_bwd_dkdv"))


def wgmma(arch: str, kernel: str, t: Tiles, d: int, dtype: mx.Dtype) -> bool:
    """Whether a kernel can read its B tiles with wgmma (the WG template value, frag_wgmma.h).

    CUDA family only (sm_90a, and the emulator running it), bf16/f16, head dims in 64s, warps in
    warpgroups of 4 that own 16 rows each (the rows of the tile the kernel walks: query rows, or
    key rows in dk/dv; in the forward also 32, two wgmmas a k-step) and score tiles whose other
    side is a multiple of 64.
    """
    if arch != "cuda" or kernel == "attention_bwd_preprocess":
        return False
    rows, cols = (t.block_k, t.block_q) if kernel == "attention_bwd_dkdv" else (t.block_q, t.block_k)
    rows_per_warp = (16, 32) if kernel == "attention_fwd" else (16,)
    return (dtype in (mx.bfloat16, mx.float16) and d % 64 == 0 and t.warps % 4 == 0
            and rows % t.warps == 0 and rows // t.warps in rows_per_warp and cols % 64 == 0)
