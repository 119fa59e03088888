"""Counter-based dropout mask shared by every backend.

The keep decision for attention weight ``(head, i, j)`` is a pure function of
``(seed, head, i, j)``: no random state is stored, so the backward regenerates exactly the
forward's mask, tile by tile, and native kernels reproduce it bit for bit.

    stream = mix(seed ^ mix(head ^ GOLDEN))                 # all uint32, wrapping
    x = mix(mix(i ^ stream) + j * GOLDEN)
    keep  <=>  (x >> 8) * 2**-24 >= p

``mix`` is the "lowbias32" integer finalizer (Chris Wellons' hash-prospector).  ``head`` is the
flat query head ``b * H + h``; ``i`` and ``j`` are the row and column in the (packed) score
matrix.  Each row gets its own key, ``mix(i ^ stream)``, and its columns walk a Weyl sequence
from it (SplitMix's construction), so a weight costs one multiply-add and one ``mix``: a kernel
computes the stream once per head and each row's key once per row.  (The earlier form, four
``mix`` rounds a weight, one of them shared along a column, made the integer work the bound: on
an H100 dropout took the forward from 0.24 to 0.78 ms.)
"""

from __future__ import annotations

import mlx.core as mx

GOLDEN = 0x9E3779B9
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B


def _mix(x: mx.array) -> mx.array:
    """lowbias32 finalizer on uint32 (wrapping multiply)."""
    x = x ^ (x >> 16)
    x = x * _MUL1
    x = x ^ (x >> 15)
    x = x * _MUL2
    return x ^ (x >> 16)


def uniform_bits(seed: int, head: mx.array, row: mx.array, col: mx.array) -> mx.array:
    """24 uniformly distributed bits (as uint32) per ``(head, row, col)``, broadcast together."""
    u32 = mx.uint32
    stream = _mix(mx.array(seed & 0xFFFFFFFF, dtype=u32) ^ _mix(head.astype(u32) ^ GOLDEN))
    x = _mix(_mix(row.astype(u32) ^ stream) + col.astype(u32) * GOLDEN)
    return x >> 8


def keep_mask(seed: int, p: float, head: mx.array, row: mx.array, col: mx.array) -> mx.array:
    """Bool keep-mask for dropout rate ``p``: True where the weight survives.

    Args:
        seed: dropout seed (an int).
        p: drop probability in [0, 1).
        head: flat query-head index ``b * H + h``, broadcastable.
        row: score-matrix row index, broadcastable.
        col: score-matrix column index, broadcastable.
    """
    threshold = int(round(p * (1 << 24)))
    return uniform_bits(seed, head, row, col) >= threshold
