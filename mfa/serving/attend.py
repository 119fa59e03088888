"""`cached_attention`: the attention a model layer runs against its cache (the runtime's model protocol).

A model's attention layer, handed a cache ``c`` by the `Runtime` (or a user), calls::

    q = mx.fast.rope(q, ..., offset=c.offset)       # offset: int, or (B,) int32 positions per row
    k = mx.fast.rope(k, ..., offset=c.offset)
    out = c.attend(q, k, v, scale=scale)             # appends k, v; attends over the whole cache

Every mfa cache implements ``attend`` with this function. Up to `MAX_DECODE_QUERIES` new tokens run
through `decode_attention` (split-K); longer chunks (chunked prefill) of rows of equal length through
`mfa.flash_attention` over the rows' cached keys (bottom-right aligned), with the same options.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from mfa.ops.attention import flash_attention
from mfa.serving.decode import MAX_DECODE_QUERIES, decode_attention
from mfa.serving.view import CONTIGUOUS, PAGED, KVView


def cached_attention(
    q: mx.array,
    view: KVView,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    window: Optional[Tuple[int, int]] = None,
    softcap: Optional[float] = None,
    sinks: Optional[mx.array] = None,
    alibi_slopes: Optional[mx.array] = None,
) -> mx.array:
    """Attention of the ``Nq`` newest tokens of each row of ``view`` against the row's cache.

    Args:
        q: ``(B, H, Nq, D)`` queries of the newest ``Nq`` tokens (their K/V already in ``view``).
        view: the cache's `KVView`.
        scale, causal, window, softcap, sinks, alibi_slopes: as in `decode_attention`.

    Returns:
        ``(B, H, Nq, Dv)`` in ``q.dtype``.
    """
    options = dict(scale=scale, causal=causal, window=window, softcap=softcap, sinks=sinks,
                   alibi_slopes=alibi_slopes)
    lens = view.seqlens_host
    prefill = (
        q.shape[2] > MAX_DECODE_QUERIES
        and view.layout in (CONTIGUOUS, PAGED)
        and not view.quantized
        and (lens == lens[0]).all()
    )
    if not prefill:
        return decode_attention(q, view, **options)
    # chunked prefill: every row holds n tokens; gather them and run bottom-right aligned flash attention
    n = int(lens[0])
    k, v = gather_rows(view, n)
    return flash_attention(q, k, v, **options)


def gather_rows(view: KVView, n: int) -> Tuple[mx.array, mx.array]:
    """Tokens ``0 .. n-1`` of every row of a contiguous or paged view, ``(B, Hkv, n, D|Dv)``."""
    if view.layout == CONTIGUOUS:
        k, v = (view.k.transpose(0, 2, 1, 3), view.v.transpose(0, 2, 1, 3)) if view.token_major else (view.k, view.v)
        return k[:, :, :n], v[:, :, :n]
    page = view.page_size
    pages = mx.clip(view.block_table[:, : -(-n // page)], 0, view.k.shape[0] - 1)
    B = pages.shape[0]

    def gather(pool: mx.array) -> mx.array:
        return pool[pages].reshape(B, -1, *pool.shape[2:])[:, :n].transpose(0, 2, 1, 3)

    return gather(view.k), gather(view.v)
