"""The ``tiled`` backend's backward: FlashAttention-2's backward written with MLX array ops.

Only ``out`` and ``lse`` were saved; every score tile is recomputed.  Per active tile
``(rows i, cols j)``::

    P   = exp(S - lse)                       # recomputed probabilities
    dV_j += (P∘Z)ᵀ dO_i                      # Z = dropout keep / (1 - p), or 1
    dP  = (dO_i V_jᵀ)∘Z
    dS  = P∘(dP - delta_i)                   # delta = rowsum(dO∘O) - dlse
    dbias tile = dS                          # reduced over the bias's broadcast axes
    dS_raw = dS∘(1 - tanh²)                  # softcap derivative
    dQ_i += scale · dS_raw K_j ;  dK_j += scale · dS_rawᵀ Q_i

The outer loop walks column tiles so each dK_j/dV_j is finished before the next; dQ row tiles
accumulate across it.  Memory stays O(N·D) plus one tile.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import mlx.core as mx

from mfa.ops.spec import AttentionGrads, AttentionInputs, AttentionSpec
from mfa.ops.tiled import NEG_INF, TiledProblem, merge_heads, split_heads


class _BiasGrad:
    """Accumulates dbias tile by tile, reduced over the bias's broadcast axes."""

    def __init__(self, P: TiledProblem, bias: mx.array):
        self.shape = tuple(bias.shape)  # (Bb, Hb, Qb, Kb)
        self.dtype = bias.dtype
        self.rows_full = self.shape[2] > 1
        self.cols_full = self.shape[3] > 1
        self.P = P
        self.tiles: Dict[Tuple[int, int], mx.array] = {}

    def add(self, i: int, j: int, ds: mx.array) -> mx.array:
        Bb, Hb = self.shape[:2]
        if Bb == 1:
            ds = ds.sum(axis=0, keepdims=True)
        if Hb == 1:
            ds = ds.sum(axis=(1, 2), keepdims=True)
        if not self.rows_full:
            ds = ds.sum(axis=3, keepdims=True)
        if not self.cols_full:
            ds = ds.sum(axis=4, keepdims=True)
        key = (i if self.rows_full else 0, j if self.cols_full else 0)
        self.tiles[key] = ds if key not in self.tiles else self.tiles[key] + ds
        return self.tiles[key]

    def result(self) -> mx.array:
        P, sched = self.P, self.P.schedule
        row_ids = range(len(sched.row_tiles)) if self.rows_full else [0]
        col_ids = range(len(sched.col_tiles)) if self.cols_full else [0]
        Bb, Hb = self.shape[:2]
        head_shape = (Bb, P.Hkv, P.G) if Hb > 1 else (Bb, 1, 1)
        rows = []
        for i in row_ids:
            r = sched.row_tiles[i][1] - sched.row_tiles[i][0] if self.rows_full else 1
            tiles = []
            for j in col_ids:
                c = sched.col_tiles[j][1] - sched.col_tiles[j][0] if self.cols_full else 1
                tile = self.tiles.get((i, j))
                tiles.append(mx.zeros(head_shape + (r, c)) if tile is None else tile)
            rows.append(mx.concatenate(tiles, axis=4))
        grad = mx.concatenate(rows, axis=3)
        return grad.reshape(self.shape).astype(self.dtype)


def _transpose_sum_over_groups(lhs: mx.array, rhs: mx.array) -> mx.array:
    """``Σ_g lhs[:, :, g]ᵀ @ rhs[:, :, g]`` as one matmul: ``(B, Hkv, G, bq, bk)``, ``(B, Hkv, G, bq, D)`` -> ``(B, Hkv, bk, D)``.

    The G query heads that share a KV head are folded into the contraction, so dK/dV of GQA
    need no separate reduction.
    """
    B, Hkv, G, bq, bk = lhs.shape
    if G == 1:
        return lhs[:, :, 0].swapaxes(-1, -2) @ rhs[:, :, 0]
    lhs = lhs.transpose(0, 1, 4, 2, 3).reshape(B, Hkv, bk, G * bq)
    return lhs @ rhs.reshape(B, Hkv, G * bq, rhs.shape[-1])


def _slopes_grad(P: TiledProblem, ds: mx.array, r0: int, r1: int, c0: int, c1: int) -> mx.array:
    """d(score)/d(slope) = -|i' - j|: row sums of ``-dS·distance``, ``(B, Hkv, G, bq)``."""
    distance = mx.abs(P.k_pos[None, c0:c1] - P.q_pos[r0:r1, None]).astype(mx.float32)
    return -(ds * distance).sum(axis=-1)


def _reduce_slopes(P: TiledProblem, per_row: mx.array, slopes: mx.array) -> mx.array:
    """Reduce ``(B, Hkv, G, Nq)`` per-row slope gradients to the slopes' own shape."""
    per_row = merge_heads(per_row)  # (B, H, Nq)
    if P.spec.varlen and slopes.ndim == 2:
        # per-sequence slopes: sum the rows of each segment
        one_hot = (P.q_seg[:, None] == mx.arange(slopes.shape[0])[None, :]).astype(mx.float32)
        return (per_row[0] @ one_hot).T.astype(slopes.dtype)  # (S, H)
    grad = per_row.sum(axis=2)  # (B, H)
    if slopes.ndim == 1:
        return grad.sum(axis=0).astype(slopes.dtype)
    return grad.astype(slopes.dtype)


def backward(
    spec: AttentionSpec,
    inputs: AttentionInputs,
    out: mx.array,
    lse: mx.array,
    dout: mx.array,
    dlse: Optional[mx.array],
) -> AttentionGrads:
    """Gradients of the tiled attention.

    Args:
        spec, inputs: as in the forward.
        out: ``(B, H, Nq, Dv)`` forward output.
        lse: ``(B, H, Nq)`` float32 forward log-sum-exp.
        dout: ``(B, H, Nq, Dv)`` cotangent of out.
        dlse: ``(B, H, Nq)`` cotangent of lse, or None.

    Returns:
        `AttentionGrads` matching ``inputs`` field by field.
    """
    P = TiledProblem(spec, inputs)
    sched = P.schedule
    q5, k5, v5 = P.q5, P.k5, P.v5
    do5 = split_heads(dout, P.Hkv, P.G)
    # preprocess: delta = rowsum(dO∘O) - dlse, and lse with +inf for empty rows (P = 0 there)
    delta = (do5.astype(mx.float32) * split_heads(out, P.Hkv, P.G).astype(mx.float32)).sum(-1, keepdims=True)
    if dlse is not None:
        delta = delta - split_heads(dlse, P.Hkv, P.G)[..., None]
    lse5 = split_heads(lse, P.Hkv, P.G)[..., None]
    lse_safe = mx.where(lse5 == NEG_INF, float("inf"), lse5)
    P.step(delta, lse_safe)

    dq_tiles: Dict[int, mx.array] = {}
    dk_tiles, dv_tiles = [], []
    dbias = _BiasGrad(P, inputs.bias) if inputs.bias is not None else None
    dslopes = mx.zeros((P.B, P.Hkv, P.G, P.Nq)) if inputs.alibi_slopes is not None else None
    for j, (c0, c1) in enumerate(sched.col_tiles):
        dk = mx.zeros((P.B, P.Hkv, c1 - c0, P.D), dtype=mx.float32)
        dv = mx.zeros((P.B, P.Hkv, c1 - c0, P.Dv), dtype=mx.float32)
        kt, vt = k5[..., c0:c1, :], v5[..., c0:c1, :]
        for i in sched.rows_of_col(j):
            r0, r1 = sched.row_tiles[i]
            qt, dot = q5[..., r0:r1, :], P.ordered(do5[..., r0:r1, :])
            s, t = P.scores(r0, r1, c0, c1, full=bool(sched.full[i, j]))
            p = mx.exp(s - lse_safe[..., r0:r1, :])
            dp = dot.astype(mx.float32) @ vt.astype(mx.float32).swapaxes(-1, -2)
            p_dropped = p
            if spec.has_dropout:
                z = P.dropout_scale(r0, r1, c0, c1)
                p_dropped, dp = p * z, dp * z
            dv = dv + _transpose_sum_over_groups(p_dropped.astype(vt.dtype), dot).astype(mx.float32)
            ds = p * (dp - delta[..., r0:r1, :])
            updated = [dk, dv]
            if dbias is not None:
                updated.append(dbias.add(i, j, ds))
            if dslopes is not None:
                dslopes[..., r0:r1] = dslopes[..., r0:r1] + _slopes_grad(P, ds, r0, r1, c0, c1)
                updated.append(dslopes)
            if t is not None:
                ds = ds * (1.0 - t * t)
            ds_low = ds.astype(qt.dtype)
            dq_i = (ds_low @ kt).astype(mx.float32) * spec.scale
            dq_tiles[i] = dq_i if i not in dq_tiles else dq_tiles[i] + dq_i
            dk = dk + _transpose_sum_over_groups(ds_low, qt).astype(mx.float32) * spec.scale
            updated[0] = dk
            P.step(dq_tiles[i], *updated)
        dk_tiles.append(dk)
        dv_tiles.append(dv)

    dq_parts = [
        dq_tiles.get(i, mx.zeros((P.B, P.Hkv, P.G, r1 - r0, P.D))) for i, (r0, r1) in enumerate(sched.row_tiles)
    ]
    dq = merge_heads(mx.concatenate(dq_parts, axis=3)) if dq_parts else mx.zeros(inputs.q.shape)
    dk = mx.concatenate(dk_tiles, axis=2) if dk_tiles else mx.zeros(inputs.k.shape)
    dv = mx.concatenate(dv_tiles, axis=2) if dv_tiles else mx.zeros(inputs.v.shape)

    dsinks = None
    if inputs.sinks is not None:
        # the sink's probability is exp(sink - lse); its logit gets -P_sink·delta
        p_sink = mx.exp(P.sinks5 - lse5)
        dsinks = -(p_sink * delta).sum(axis=(0, 3, 4)).reshape(P.H).astype(inputs.sinks.dtype)
    zeros_like = lambda x: None if x is None else mx.zeros_like(x)  # noqa: E731
    return AttentionGrads(
        dq=dq.astype(inputs.q.dtype),
        dk=dk.astype(inputs.k.dtype),
        dv=dv.astype(inputs.v.dtype),
        dbias=None if dbias is None else dbias.result(),
        dalibi_slopes=None if dslopes is None else _reduce_slopes(P, dslopes, inputs.alibi_slopes),
        dsinks=dsinks,
        dcu_seqlens_q=zeros_like(inputs.cu_seqlens_q),
        dcu_seqlens_k=zeros_like(inputs.cu_seqlens_k),
    )
