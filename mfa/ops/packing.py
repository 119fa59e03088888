"""In-graph coordinates of packed (varlen) tokens, usable under `mx.compile` and `mx.grad`.

Written without scatter ops: MLX 0.32 fails to compile (``IndexError: _Map_base::at``) a
gradient graph in which a scatter-add on ``cu_seqlens`` feeds two custom VJPs.
"""

from __future__ import annotations

import mlx.core as mx


def segment_ids(cu_seqlens: mx.array, total: int) -> mx.array:
    """Sequence index of every packed token.

    Args:
        cu_seqlens: ``(S+1,)`` int32 cumulative lengths, ``cu_seqlens[-1] == total``.
        total: number of packed tokens.

    Returns:
        ``(total,)`` int32: ``s`` for every token in ``cu_seqlens[s]:cu_seqlens[s+1]``
        (empty sequences own no token).
    """
    inner = cu_seqlens.shape[0] - 2
    if inner <= 0:
        return mx.zeros((total,), dtype=mx.int32)
    # sort the inner boundaries (2·b) together with the tokens (2·t + 1): a boundary at t sorts
    # before token t, so the tokens' sorted rank minus their index counts the boundaries <= t
    keys = mx.concatenate([cu_seqlens[1:-1].astype(mx.int32) * 2, mx.arange(total, dtype=mx.int32) * 2 + 1])
    rank = mx.argsort(mx.argsort(keys))
    return (rank[inner:] - mx.arange(total)).astype(mx.int32)


def segment_positions(cu_seqlens: mx.array, total: int):
    """``(segment_ids, position within the segment)`` of every packed token, both ``(total,)`` int32."""
    seg = segment_ids(cu_seqlens, total)
    return seg, mx.arange(total, dtype=mx.int32) - cu_seqlens[seg].astype(mx.int32)
