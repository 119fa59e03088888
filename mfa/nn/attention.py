"""Attention layers that run through `mfa.flash_attention`.

`Attention` is the layer a transformer uses (GQA, RoPE, packed varlen, KV cache);
`MultiHeadAttention` is a drop-in for `mlx.nn.MultiHeadAttention`.  Neither holds attention math:
they project, rotate and reshape, then call the ops.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

import mfa
from mfa.ops.packing import segment_positions

Mask = Union[None, str, mx.array, Any]


def packed_positions(cu_seqlens: mx.array, total: int) -> mx.array:
    """Position of every packed token inside its own sequence.

    Args:
        cu_seqlens: ``(S+1,)`` int32 cumulative sequence lengths, ``cu_seqlens[-1] == total``.
        total: number of packed tokens.

    Returns:
        ``(total,)`` int32: ``t - cu_seqlens[s]`` for token ``t`` of sequence ``s``.
    """
    return segment_positions(cu_seqlens, total)[1]


def _attention_kwargs(mask: Mask, dtype: mx.Dtype) -> dict:
    """Translate a layer ``mask`` into `mfa.flash_attention` keywords."""
    if mask is None:
        return {}
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be None, 'causal', an mfa.BlockMask or an array, got {mask=}")
        return {"causal": True}
    if isinstance(mask, mfa.BlockMask):
        return {"block_mask": mask}
    if isinstance(mask, mx.array):
        if mask.dtype == mx.bool_:
            # boolean keep-mask -> additive bias
            mask = mx.where(mask, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))
        return {"bias": mask}
    raise ValueError(f"mask must be None, 'causal', an mfa.BlockMask or an array, got {type(mask)=}")


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, RoPE, packing and a KV cache.

    Args:
        dims (int): model dimensions of the input and the output.
        num_heads (int): number of query heads ``H``.
        num_kv_heads (int, optional): number of key/value heads ``Hkv`` (GQA; 1 is MQA); must
            divide ``num_heads``. Default: ``num_heads``.
        head_dim (int, optional): per-head dimension ``D``. Default: ``dims // num_heads``.
        bias (bool, optional): use biases in the projections. Default: ``False``.
        rope (bool, optional): rotate queries and keys with RoPE (``mx.fast.rope``). Default: ``True``.
        rope_base (float, optional): RoPE base frequency. Default: ``10000``.
        window (tuple, optional): ``(left, right)`` sliding window as in `mfa.flash_attention`
            (``-1`` = unbounded). Default: ``None``.
        softcap (float, optional): logit soft cap ``c·tanh(s/c)``. Default: ``None``.
    """

    def __init__(
        self,
        dims: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        bias: bool = False,
        rope: bool = True,
        rope_base: float = 10000,
        window: Optional[Tuple[int, int]] = None,
        softcap: Optional[float] = None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"{num_heads=} must be a positive multiple of {num_kv_heads=}")
        if head_dim is None:
            if dims % num_heads != 0:
                raise ValueError(f"{dims=} must be divisible by {num_heads=} (or pass head_dim)")
            head_dim = dims // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.use_rope, self.rope_base = rope, float(rope_base)
        self.window, self.softcap = window, softcap
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(dims, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dims, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dims, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dims, bias=bias)

    def _rope(self, x: mx.array, offset) -> mx.array:
        if not self.use_rope:
            return x
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)

    def __call__(
        self,
        x: mx.array,
        mask: Mask = None,
        cache=None,
        cu_seqlens: Optional[mx.array] = None,
    ) -> mx.array:
        """Attend over ``x``.

        Args:
            x: ``(B, N, dims)``; ``(1, total, dims)`` when packed.
            mask: None (full attention), ``"causal"``, an `mfa.BlockMask`, or an additive
                (or boolean keep-) mask broadcastable to ``(B, H, N, Nk)``.  Packed input takes
                only None or ``"causal"``.
            cache: a KV cache: an `mfa.serving` cache (attends through its ``attend``), or any
                mlx-lm style cache (``offset`` and ``update_and_fetch(k, v)`` with
                ``k, v (B, Hkv, N, D)``); new tokens are rotated from position ``cache.offset``.
            cu_seqlens: ``(S+1,)`` int32 cumulative lengths of the sequences packed in ``x``:
                no token attends outside its own sequence, and RoPE positions restart at 0 in
                each one.

        Returns:
            ``(B, N, dims)``.
        """
        B, N, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, N, H, D)
        k = self.k_proj(x).reshape(B, N, Hkv, D)
        v = self.v_proj(x).reshape(B, N, Hkv, D)
        options = dict(scale=self.scale, window=self.window, softcap=self.softcap)
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"packed input must have batch size 1, got {x.shape=}")
            if cache is not None:
                raise ValueError("cu_seqlens (packed input) cannot be combined with a KV cache")
            if not (mask is None or isinstance(mask, str) and mask == "causal"):
                raise ValueError(f"packed input takes mask None or 'causal', got {type(mask)=}")
            # RoPE per token at its position in its own sequence: view tokens as a batch of 1-long rows
            positions = packed_positions(cu_seqlens, N)
            q = self._rope(q.squeeze(0)[:, :, None], positions).squeeze(2)
            k = self._rope(k.squeeze(0)[:, :, None], positions).squeeze(2)
            out = mfa.flash_attention_varlen(
                q, k, v.squeeze(0), cu_seqlens, cu_seqlens, causal=mask is not None, **options
            )
            return self.o_proj(out.reshape(1, N, H * D))

        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        offset = 0 if cache is None else cache.offset
        q, k = self._rope(q, offset), self._rope(k, offset)
        mask_options = _attention_kwargs(mask, q.dtype)
        if cache is not None and hasattr(cache, "attend") and set(mask_options) <= {"causal"}:
            # mfa.serving caches pick decode (split-K) or prefill attention themselves
            out = cache.attend(q, k, v, causal="causal" in mask_options, **options)
        else:
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            out = mfa.flash_attention(q, k, v, **options, **mask_options)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, N, H * D))


class MultiHeadAttention(nn.MultiHeadAttention):
    """`mlx.nn.MultiHeadAttention` computed by `mfa.scaled_dot_product_attention`.

    Same constructor, parameters and call as the MLX layer (so checkpoints load either way);
    swap ``nn.MultiHeadAttention`` for ``mfa.nn.MultiHeadAttention`` and nothing else changes.
    """

    def __call__(self, queries: mx.array, keys: mx.array, values: mx.array, mask=None) -> mx.array:
        """Attend from ``queries (B, Nq, dims)`` over ``keys, values (B, Nk, dims)``.

        Args:
            queries: ``(B, Nq, query_input_dims)``.
            keys: ``(B, Nk, key_input_dims)``.
            values: ``(B, Nk, value_input_dims)``.
            mask: as for ``mx.fast.scaled_dot_product_attention``: None, ``"causal"``, or an
                additive / boolean mask broadcastable to ``(B, H, Nq, Nk)``.

        Returns:
            ``(B, Nq, value_output_dims)``.
        """
        queries, keys, values = self.query_proj(queries), self.key_proj(keys), self.value_proj(values)
        H = self.num_heads
        queries, keys, values = (mx.unflatten(t, -1, (H, -1)).transpose(0, 2, 1, 3) for t in (queries, keys, values))
        out = mfa.scaled_dot_product_attention(queries, keys, values, scale=queries.shape[-1] ** -0.5, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).flatten(-2, -1))
