"""`flash_attn_with_kvcache`: flash-attention's decode entry point, ``(B, N, H, D)`` layout, on `decode_attention`."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from mfa.serving.decode import decode_attention
from mfa.serving.view import KVView


def flash_attn_with_kvcache(
    q: mx.array,
    k_cache: mx.array,
    v_cache: mx.array,
    k: Optional[mx.array] = None,
    v: Optional[mx.array] = None,
    rotary_cos: Optional[mx.array] = None,
    rotary_sin: Optional[mx.array] = None,
    cache_seqlens=None,
    cache_batch_idx: Optional[mx.array] = None,
    cache_leftpad: Optional[mx.array] = None,
    block_table: Optional[mx.array] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[mx.array] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    sinks: Optional[mx.array] = None,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Attend new queries to a KV cache, first appending new keys/values to it in place.

    flash-attention's semantics: with ``k``/``v`` given, ``k_cache[b, cache_seqlens[b] + t] = k[b, t]``
    (the caller's ``k_cache``/``v_cache`` arrays are updated), then ``q`` attends to the first
    ``cache_seqlens[b] + Nnew`` keys of row ``b``. ``causal``/``window_size`` are bottom-right aligned:
    query ``i`` sits at position ``cache_seqlens[b] + Nnew - Nq + i``. Splits of the cache are computed
    separately and merged by log-sum-exp (flash-decoding).

    Args:
        q: ``(B, Nq, H, D)``.
        k_cache: ``(B_cache, N_cache, Hkv, D)``, or with ``block_table`` a page pool
            ``(num_pages, page_size, Hkv, D)``.
        v_cache: like ``k_cache`` with ``Dv`` last.
        k: ``(B, Nnew, Hkv, D)`` new keys to append, or None.
        v: ``(B, Nnew, Hkv, Dv)`` new values to append, or None.
        rotary_cos: ``(N_ro, rotary_dim / 2)``; with ``rotary_sin``, rotates ``k`` at positions
            ``cache_seqlens + t`` and ``q`` at ``cache_seqlens + i`` (causal/local) or ``cache_seqlens``.
        rotary_sin: ``(N_ro, rotary_dim / 2)``.
        cache_seqlens: int or ``(B,)`` int32 tokens in the cache before the append. Default: ``N_cache``
            (full; not allowed with ``k``).
        cache_batch_idx: ``(B,)`` int32 rows of ``k_cache`` to use (contiguous caches), or None.
        cache_leftpad: not supported (raises).
        block_table: ``(B, max_pages)`` int32 page ids (``-1`` = unused), or None (contiguous).
        softmax_scale: multiplier of ``q·kᵀ``. Default: ``D ** -0.5``.
        causal: bottom-right causal mask.
        window_size: ``(left, right)``, ``-1`` = unbounded.
        softcap: ``c`` in ``c·tanh(s/c)``; ``0`` = off.
        rotary_interleaved: rotate pairs ``(0,1), (2,3), …`` (GPT-J) instead of halves (GPT-NeoX).
        alibi_slopes: ``(H,)`` or ``(B, H)``; adds ``-slope·|i' - j|``.
        num_splits: cache splits; ``0`` = automatic.
        return_softmax_lse: also return the log-sum-exp ``(B, H, Nq)`` float32.
        sinks: ``(H,)`` per-head sink logits (mfa extension).

    Returns:
        ``out (B, Nq, H, Dv)`` in ``q.dtype``, and with ``return_softmax_lse`` also ``lse (B, H, Nq)``.
    """
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad is not supported by mfa's flash_attn_with_kvcache")
    if q.ndim != 4 or k_cache.ndim != 4 or v_cache.ndim != 4:
        raise ValueError(f"q, k_cache, v_cache must be 4-D, got {q.shape=}, {k_cache.shape=}, {v_cache.shape=}")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError("cache_batch_idx cannot be combined with block_table")
    B, Nq = q.shape[:2]
    paged = block_table is not None
    if paged:
        table = np.array(block_table, dtype=np.int64)
        capacity = table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    n_new = 0 if k is None else k.shape[1]
    if cache_seqlens is None:
        if n_new:
            raise ValueError("appending k/v needs cache_seqlens (the fill level of each row)")
        cache_seqlens = capacity
    lens = np.asarray(cache_seqlens, dtype=np.int64).reshape(-1)
    lens = np.broadcast_to(lens, (B,)).copy() if lens.size == 1 else lens
    if lens.shape != (B,):
        raise ValueError(f"cache_seqlens must be an int or ({B},), got shape {lens.shape}")
    if lens.min() < 0 or lens.max() + n_new > capacity:
        raise ValueError(f"cache_seqlens={lens.tolist()} + {n_new} new tokens exceed the cache capacity {capacity}")

    if rotary_cos is not None:
        rotate_q = causal or window_size != (-1, -1)
        q = _rotary(q, rotary_cos, rotary_sin, lens, per_token=rotate_q, interleaved=rotary_interleaved)
        if k is not None:
            k = _rotary(k, rotary_cos, rotary_sin, lens, per_token=True, interleaved=rotary_interleaved)

    rows = np.arange(B) if cache_batch_idx is None else np.array(cache_batch_idx, dtype=np.int64).reshape(-1)
    if not paged and (rows.shape != (B,) or rows.min() < 0 or rows.max() >= k_cache.shape[0]):
        raise ValueError(f"cache_batch_idx={rows.tolist()} must hold {B} rows of [0, {k_cache.shape[0]})")
    if k is not None:
        # in-place append: the caller's cache arrays are updated (MLX __setitem__)
        pos = lens[:, None] + np.arange(n_new)[None]
        if paged:
            _check_table(table, lens + n_new, k_cache.shape[0], k_cache.shape[1])
            idx = (mx.array(table[np.arange(B)[:, None], pos // k_cache.shape[1]]), mx.array(pos % k_cache.shape[1]))
        else:
            idx = (mx.array(rows[:, None]), mx.array(pos))
        k_cache[idx] = k.astype(k_cache.dtype)
        v_cache[idx] = v.astype(v_cache.dtype)
    total = lens + n_new
    if paged:
        view = KVView.paged(k_cache, v_cache, table, total)
    else:
        kc, vc = (k_cache, v_cache) if cache_batch_idx is None else (k_cache[mx.array(rows)], v_cache[mx.array(rows)])
        view = KVView.contiguous(kc, vc, total, token_major=True)
    split_size = None if num_splits <= 0 else max(1, -(-int(total.max()) // num_splits))
    out, lse = decode_attention(
        q.transpose(0, 2, 1, 3), view, scale=softmax_scale, causal=causal, window=window_size,
        softcap=softcap or None, sinks=sinks, alibi_slopes=alibi_slopes, split_size=split_size, return_lse=True,
    )
    out = out.transpose(0, 2, 1, 3)
    return (out, lse) if return_softmax_lse else out


def _check_table(table: np.ndarray, lens: np.ndarray, num_pages: int, page_size: int) -> None:
    """The pages the append writes into must exist (checked before any write)."""
    for b, n in enumerate(lens.tolist()):
        used = table[b, : -(-n // page_size)]
        if used.size and (used.min() < 0 or used.max() >= num_pages):
            raise ValueError(f"block_table[{b}]={used.tolist()} must name pages in [0, {num_pages}) for {n} tokens")


def _rotary(x: mx.array, cos: mx.array, sin: mx.array, lens: np.ndarray, *, per_token: bool,
            interleaved: bool) -> mx.array:
    """Rotate the first ``2·cos.shape[1]`` features of ``x (B, N, H, D)`` at positions ``lens + t`` (or ``lens``)."""
    B, N = x.shape[:2]
    half = cos.shape[1]
    pos = lens[:, None] + (np.arange(N)[None] if per_token else np.zeros((1, N), np.int64))
    if pos.max() >= cos.shape[0]:
        raise ValueError(f"rotary tables hold {cos.shape[0]} positions, position {int(pos.max())} is needed")
    pos = mx.array(pos.astype(np.int32))
    c, s = cos[pos][:, :, None].astype(mx.float32), sin[pos][:, :, None].astype(mx.float32)
    rot, rest = x[..., : 2 * half].astype(mx.float32), x[..., 2 * half :]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = mx.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(rot.shape)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        y = mx.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return mx.concatenate([y.astype(x.dtype), rest], axis=-1)
