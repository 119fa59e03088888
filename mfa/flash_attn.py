"""flash-attention's Python API over mfa, in its ``(B, N, H, D)`` layout.

Code written for ``flash_attn`` ports by changing one import::

    from mfa.flash_attn import flash_attn_func, flash_attn_varlen_func

Differences: arrays are `mx.array`; ``dropout_seed`` replaces torch's RNG state;
``return_attn_probs=True`` returns ``(out, softmax_lse, None)`` (the probabilities are never
materialized); ``deterministic=True`` is `mfa.flash_attention`'s: the call avoids every route
whose backward sums with atomic adds (on CUDA, cuDNN's SDPA backward, and with dropout the fused
backward that adds dq with atomics: it runs mfa's split kernels instead, whose dq, dk, dv are
plain stores; checked on the GPU by ``test_backward_is_deterministic``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from mfa.ops.attention import flash_attention
from mfa.ops.varlen import flash_attention_varlen


def _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, dropout_seed, return_attn_probs,
             deterministic):
    return dict(
        scale=softmax_scale,
        causal=causal,
        window=tuple(window_size) if tuple(window_size) != (-1, -1) else None,
        softcap=softcap if softcap else None,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        return_lse=return_attn_probs,
        deterministic=deterministic,
    )


def _finish(result, return_attn_probs: bool, to_layout):
    if return_attn_probs:
        out, lse = result
        return to_layout(out), lse, None
    return to_layout(result)


def _bhnd(x: mx.array) -> mx.array:
    """``(B, N, H, D)`` <-> ``(B, H, N, D)``."""
    return x.swapaxes(1, 2)


def flash_attn_func(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    dropout_seed: int = 0,
):
    """flash-attention's ``flash_attn_func``.

    Args:
        q: ``(B, Nq, H, D)``.
        k: ``(B, Nk, Hkv, D)``.
        v: ``(B, Nk, Hkv, Dv)``.
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic: as in
            flash-attention (``softcap=0`` and ``window_size=(-1, -1)`` mean off).

    Returns:
        ``out (B, Nq, H, Dv)``, or ``(out, softmax_lse (B, H, Nq), None)`` when
        ``return_attn_probs``.
    """
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, dropout_seed,
                    return_attn_probs, deterministic)
    return _finish(flash_attention(_bhnd(q), _bhnd(k), _bhnd(v), **opts), return_attn_probs, _bhnd)


def flash_attn_qkvpacked_func(
    qkv: mx.array,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    dropout_seed: int = 0,
):
    """flash-attention's ``flash_attn_qkvpacked_func``: ``qkv (B, N, 3, H, D)``."""
    q, k, v = (qkv[:, :, i] for i in range(3))
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, dropout_seed=dropout_seed)


def flash_attn_kvpacked_func(
    q: mx.array,
    kv: mx.array,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    dropout_seed: int = 0,
):
    """flash-attention's ``flash_attn_kvpacked_func``: ``q (B, Nq, H, D)``, ``kv (B, Nk, 2, Hkv, D)``."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, dropout_seed=dropout_seed)


def flash_attn_varlen_func(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    cu_seqlens_q: mx.array,
    cu_seqlens_k: mx.array,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    dropout_seed: int = 0,
):
    """flash-attention's ``flash_attn_varlen_func``.

    Args:
        q: ``(total_q, H, D)``; k ``(total_k, Hkv, D)``; v ``(total_k, Hkv, Dv)``.
        cu_seqlens_q, cu_seqlens_k: ``(S+1,)`` int32.

    Returns:
        ``out (total_q, H, Dv)``, or ``(out, softmax_lse (H, total_q), None)``.
    """
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, dropout_seed,
                    return_attn_probs, deterministic)
    result = flash_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **opts
    )
    return _finish(result, return_attn_probs, lambda x: x)


def __getattr__(name):
    # flash_attn_with_kvcache lives with the serving caches
    if name == "flash_attn_with_kvcache":
        from mfa.serving import flash_attn_with_kvcache

        return flash_attn_with_kvcache
    raise AttributeError(name)
