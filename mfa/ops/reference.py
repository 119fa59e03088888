"""Naive, materialized attention: the test oracle (and ``backend="reference"``).

Written as plainly as possible and independently of the tiled path: it builds the whole
``(B, H, Nq, Nk)`` score matrix, repeats K/V for GQA and applies every option with its textbook
formula.  Gradients come from MLX's autodiff through these ops.  Only for tests and tiny inputs.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import mlx.core as mx

from mfa.ops import dropout


def _band_keep(Nq: int, Nk: int, causal: bool, window) -> Optional[mx.array]:
    """Keep-mask ``(Nq, Nk)`` of the causal/window band, query row i at ``i' = i + Nk - Nq``."""
    if not causal and window is None:
        return None
    i = mx.arange(Nq)[:, None] + (Nk - Nq)
    j = mx.arange(Nk)[None, :]
    keep = mx.ones((Nq, Nk), dtype=mx.bool_)
    if causal:
        keep = keep & (j <= i)
    if window is not None:
        left, right = window
        if left >= 0:
            keep = keep & (j >= i - left)
        if right >= 0:
            keep = keep & (j <= i + right)
    return keep


def attention_reference(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    bias: Optional[mx.array] = None,
    block_mask=None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[mx.array] = None,
    sinks: Optional[mx.array] = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_offsets: Tuple[int, int, int] = (0, 0, 0),
    upcast: bool = True,
) -> Tuple[mx.array, mx.array]:
    """Materialized attention with every mfa option.

    Args:
        q: ``(B, H, Nq, D)``.
        k: ``(B, Hkv, Nk, D)``.
        v: ``(B, Hkv, Nk, Dv)``.
        scale: score multiplier. Default: ``D**-0.5``.
        causal, window, bias, block_mask, softcap, alibi_slopes, sinks, dropout_p, dropout_seed:
            as in `mfa.flash_attention`.
        dropout_offsets: ``(head, row, col)`` added to the dropout counters (used to check
            packed varlen calls one sequence at a time).
        upcast: compute in float32 (the oracle). With False, compute like a plain low-precision
            implementation: matmuls in the input dtype, softmax in float32 rounded back to it.

    Returns:
        ``(out, lse)``: out ``(B, H, Nq, Dv)`` (float32 when ``upcast``, else q's dtype) and lse
        ``(B, H, Nq)`` float32.
    """
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    work = mx.float32 if upcast else q.dtype
    q, k, v = q.astype(work), k.astype(work), v.astype(work)
    if Hkv != H:
        k = mx.repeat(k, H // Hkv, axis=1)
        v = mx.repeat(v, H // Hkv, axis=1)

    s = (q @ k.swapaxes(-1, -2)).astype(mx.float32) * scale
    if softcap is not None:
        s = softcap * mx.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.astype(mx.float32).reshape(-1, H, 1, 1)
        distance = mx.abs(mx.arange(Nk)[None, :] - (mx.arange(Nq)[:, None] + Nk - Nq))
        s = s - slopes * distance.astype(mx.float32)
    if bias is not None:
        s = s + bias.astype(mx.float32)
    keep = _band_keep(Nq, Nk, causal, window)
    if block_mask is not None:
        bm = block_mask.dense_mask(Nq, Nk)
        keep = bm if keep is None else keep & bm
    if keep is not None:
        s = mx.where(keep, s, -mx.inf)

    # softmax with an optional sink logit in the denominator, safe for fully-masked rows
    m = s.max(axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(mx.float32).reshape(1, H, 1, 1)
        m = mx.maximum(m, sink)
    m = mx.where(m == -mx.inf, 0.0, m)
    p = mx.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + mx.exp(sink - m)
    nonempty = denom > 0
    safe_denom = mx.where(nonempty, denom, 1.0)
    lse = mx.where(nonempty, m + mx.log(safe_denom), -mx.inf).squeeze(-1)
    p = p / safe_denom

    if dropout_p > 0.0:
        h0, r0, c0 = dropout_offsets
        head = mx.arange(B)[:, None, None, None] * H + mx.arange(H)[None, :, None, None] + h0
        rows = mx.arange(Nq)[:, None] + r0
        cols = mx.arange(Nk)[None, :] + c0
        keep_drop = dropout.keep_mask(dropout_seed, dropout_p, head, rows, cols)
        p = mx.where(keep_drop, p / (1.0 - dropout_p), 0.0)

    out = p.astype(work) @ v
    if not upcast:
        out = out.astype(q.dtype)
    return out, lse


def attention_reference_varlen(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    cu_seqlens_q: Sequence[int],
    cu_seqlens_k: Sequence[int],
    *,
    alibi_slopes: Optional[mx.array] = None,
    dropout_p: float = 0.0,
    upcast: bool = True,
    **options,
) -> Tuple[mx.array, mx.array]:
    """Packed varlen attention, one sequence at a time through `attention_reference`.

    Args:
        q: ``(total_q, H, D)``; k ``(total_k, Hkv, D)``; v ``(total_k, Hkv, Dv)``.
        cu_seqlens_q, cu_seqlens_k: cumulative lengths ``(S+1,)`` (host ints or an array).
        alibi_slopes: ``(H,)`` or ``(S, H)``.
        options: the other keyword options of `attention_reference`.

    Returns:
        ``(out (total_q, H, Dv), lse (H, total_q) float32)``.
    """
    cq = [int(x) for x in (cu_seqlens_q.tolist() if isinstance(cu_seqlens_q, mx.array) else cu_seqlens_q)]
    ck = [int(x) for x in (cu_seqlens_k.tolist() if isinstance(cu_seqlens_k, mx.array) else cu_seqlens_k)]
    H, Dv = q.shape[1], v.shape[2]
    outs, lses = [], []
    for s in range(len(cq) - 1):
        qs = q[cq[s] : cq[s + 1]].transpose(1, 0, 2)[None]
        ks = k[ck[s] : ck[s + 1]].transpose(1, 0, 2)[None]
        vs = v[ck[s] : ck[s + 1]].transpose(1, 0, 2)[None]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[s]
        if qs.shape[2] == 0:
            continue
        if ks.shape[2] == 0:
            out = mx.zeros((1, H, qs.shape[2], Dv), dtype=mx.float32 if upcast else q.dtype)
            lse = mx.full((1, H, qs.shape[2]), -mx.inf)
            if options.get("sinks") is not None:
                lse = mx.broadcast_to(options["sinks"].astype(mx.float32)[None, :, None], lse.shape)
        else:
            out, lse = attention_reference(
                qs, ks, vs, alibi_slopes=slopes, dropout_p=dropout_p,
                dropout_offsets=(0, cq[s], ck[s]), upcast=upcast, **options,
            )
        outs.append(out[0].transpose(1, 0, 2))
        lses.append(lse[0])
    if not outs:
        return mx.zeros((0, H, Dv), dtype=mx.float32 if upcast else q.dtype), mx.zeros((H, 0))
    return mx.concatenate(outs, axis=0), mx.concatenate(lses, axis=1)
