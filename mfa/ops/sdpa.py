"""`scaled_dot_product_attention`: a drop-in for `mx.fast.scaled_dot_product_attention`."""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx

from mfa.ops.attention import flash_attention


def scaled_dot_product_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: Union[None, str, mx.array] = None,
    sinks: Optional[mx.array] = None,
    backend: str = "auto",
) -> mx.array:
    """`mx.fast.scaled_dot_product_attention`'s contract, differentiable w.r.t. mask and sinks.

    Unlike MLX's op, gradients flow to an additive ``mask`` and to ``sinks`` (MLX's CUDA VJP
    raises for them, its Metal/CPU VJP materializes the score matrix); here the backward is
    mfa's O(N)-memory one.

    Args:
        q: ``(B, H, Nq, D)``.
        k: ``(B, Hkv, Nk, D)``.
        v: ``(B, Hkv, Nk, Dv)``.
        scale: score multiplier (required, as in MLX).
        mask: ``"causal"`` (bottom-right aligned), a bool keep-mask or an additive float mask,
            either broadcastable to ``(B, H, Nq, Nk)``. Default: ``None``.
        sinks: per-head sink logits ``(H,)``. Default: ``None``.
        backend: as in `mfa.flash_attention`. Default: ``"auto"``.

    Returns:
        ``(B, H, Nq, Dv)`` in q's dtype.
    """
    causal, bias = False, None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask string must be 'causal', got {mask!r}")
        causal = True
    elif mask is not None:
        if not isinstance(mask, mx.array):
            raise ValueError(f"mask must be None, 'causal' or an mx.array, got {type(mask).__name__}")
        if mask.dtype == mx.bool_:
            bias = mx.where(mask, mx.array(0.0, dtype=q.dtype), mx.array(-mx.inf, dtype=q.dtype))
        else:
            bias = mask
    return flash_attention(q, k, v, scale=scale, causal=causal, bias=bias, sinks=sinks, backend=backend)
