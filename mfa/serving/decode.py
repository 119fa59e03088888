"""`decode_attention`: a few new query tokens against a long KV cache, split-K (flash-decoding).

The cache is cut into splits of consecutive key slots. Each split yields a partial ``(o_s, lse_s)`` for
every query row; the partials are merged by their log-sum-exp (`merge.py`). The query heads sharing a KV
head are processed together, so each split reads its K/V once for all of them (GQA/MQA).

Query ``i`` of ``Nq`` sits at position ``p_i = seqlen - Nq + i`` of its row (bottom-right aligned, as in
flash-attention's ``flash_attn_with_kvcache``)::

    keys:     0 1 2 3 4 5 6 7      seqlen = 8, Nq = 2, causal, window = (3, 0)
    query 0:        x x x x .      p_0 = 6 sees 3..6
    query 1:          x x x x      p_1 = 7 sees 4..7

``tiled`` (MLX array ops, every device) and the native kernels (``cuda``, ``metal``) compute the same thing.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx

from mfa.ops.spec import AttentionSpec
from mfa.serving import native
from mfa.serving.merge import add_sink, merge_stacked
from mfa.serving.view import CONTIGUOUS, PAGED, RING, KVView

MAX_DECODE_QUERIES = 16
TILED_SPLIT = 512
BACKENDS = ("auto", "tiled", "cuda", "metal", "emulator")


def decode_attention(
    q: mx.array,
    cache,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    window: Optional[Tuple[int, int]] = None,
    softcap: Optional[float] = None,
    sinks: Optional[mx.array] = None,
    alibi_slopes: Optional[mx.array] = None,
    split_size: Optional[int] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Attention of the ``Nq`` newest tokens of each cached sequence against the whole cache.

    The new tokens' keys/values must already be in the cache (``cache.update_and_fetch`` or a paged
    write); query ``i`` sits at position ``seqlen - Nq + i`` of its row.

    Args:
        q: ``(B, H, Nq, D)`` queries, ``H % Hkv == 0``.
        cache: a `KVView`, or a cache with ``kv_view()`` (`KVCache`, `RotatingKVCache`, `QuantizedKVCache`,
            a `PagedKVCache` batch layer).
        scale: multiplier of ``q·kᵀ``. Default: ``D ** -0.5``.
        causal: query ``i`` sees keys at positions ``<= p_i``. Default: ``True``.
        window: ``(left, right)`` keeps keys with ``p_i - left <= j <= p_i + right``; ``-1`` = unbounded.
        softcap: ``c`` in ``s = c·tanh(s/c)``, applied before ALiBi and masking.
        sinks: ``(H,)`` per-head sink logits added to the softmax denominator.
        alibi_slopes: ``(H,)`` or ``(B, H)``; adds ``-slope·|p_i - j|`` to each score.
        split_size: key slots per split (rounded up to whole pages when paged). Default: per backend.
        return_lse: also return the log-sum-exp.
        backend: ``"auto"`` (MLX's own decode where it computes the call, see `_sdpa_covers`; else
            the native kernels on a CUDA/Metal GPU where they cover the call; else ``"tiled"``), ``"tiled"``, ``"cuda"``, ``"metal"`` or ``"emulator"`` (the native kernel bodies run
            on the CPU, for tests).

    Returns:
        ``out (B, H, Nq, Dv)`` in ``q.dtype``, and with ``return_lse`` also ``lse (B, H, Nq)`` float32
        (natural log, sink included; ``-inf`` for a row with nothing to attend, whose output is 0).
    """
    view = cache if isinstance(cache, KVView) else cache.kv_view()
    spec = _spec(q, view, scale, causal, window, softcap, sinks, alibi_slopes)
    if alibi_slopes is not None:
        alibi_slopes = _slopes(alibi_slopes, q.shape[0], q.shape[1])
    if backend not in BACKENDS:
        raise ValueError(f"{backend=} must be one of {BACKENDS}")
    if backend == "auto" and _sdpa_covers(q, view, spec, return_lse):
        return _decode_sdpa(q, view, spec, sinks)
    use_native = backend in native.TARGETS or (backend == "auto" and native.available(view, q))
    if use_native:
        out, lse = native.decode(q, view, spec, sinks, alibi_slopes, split_size, backend)
    else:
        out, lse = _decode_tiled(q, view, spec, sinks, alibi_slopes, split_size or TILED_SPLIT)
    return (out, lse) if return_lse else out


def _sdpa_covers(q: mx.array, view: KVView, spec: AttentionSpec, return_lse: bool) -> bool:
    """Whether MLX's own decode (``mx.fast.scaled_dot_product_attention``) computes this call.

    It does for an uncompressed ``(B, Hkv, N, D)`` cache whose rows hold the same number of tokens,
    without window/softcap/ALiBi and without lse. Measured on an H100 (bf16, B=8, H=32, Hkv=8,
    D=128, 32k cache): MLX's vector kernel 0.41 ms, mfa's split-K kernels 0.52 ms at best, so
    ``auto`` leaves these calls to MLX.
    """
    lengths = view.seqlens_host
    return (
        view.layout == CONTIGUOUS
        and not view.quantized
        and not view.token_major
        and not return_lse
        and spec.window is None
        and spec.softcap is None
        and not spec.has_alibi
        and len(lengths) > 0
        and bool((lengths == lengths[0]).all())
        and int(lengths[0]) >= q.shape[2]
    )


def _decode_sdpa(q: mx.array, view: KVView, spec: AttentionSpec, sinks) -> mx.array:
    n = int(view.seqlens_host[0])
    return mx.fast.scaled_dot_product_attention(
        q, view.k[:, :, :n], view.v[:, :, :n], scale=spec.scale,
        mask="causal" if spec.causal and q.shape[2] > 1 else None, sinks=sinks,
    )


def _spec(q, view: KVView, scale, causal, window, softcap, sinks, alibi_slopes) -> AttentionSpec:
    """Check the query against the view and fold the options into an `AttentionSpec`."""
    if q.ndim != 4:
        raise ValueError(f"q must be (B, H, Nq, D), got shape {tuple(q.shape)}")
    B, H, Nq, D = q.shape
    Hkv = view.num_kv_heads
    if B != view.batch_size:
        raise ValueError(f"q has batch {B=} but the cache holds {view.batch_size} sequences")
    if H % Hkv:
        raise ValueError(f"{H=} must be divisible by {Hkv=}")
    if D != view.head_dim:
        raise ValueError(f"q head dim {D=} differs from the cache's {view.head_dim}")
    if Nq < 1:
        raise ValueError(f"need at least one query token, got {Nq=}")
    if window is not None:
        window = tuple(int(w) for w in window)
        if len(window) != 2 or min(window) < -1:
            raise ValueError(f"window={window} must be (left, right) with entries >= -1")
        if window == (-1, -1):
            window = None
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{softcap=} must be positive (or None)")
    if sinks is not None and tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must have shape ({H},), got {tuple(sinks.shape)}")
    return AttentionSpec(
        scale=float(D**-0.5 if scale is None else scale),
        causal=bool(causal),
        window=window,
        softcap=softcap or None,
        has_alibi=alibi_slopes is not None,
        has_sinks=sinks is not None,
    )


def _slopes(alibi_slopes: mx.array, B: int, H: int) -> mx.array:
    """ALiBi slopes as ``(B|1, H)`` float32."""
    slopes = alibi_slopes.astype(mx.float32)
    if slopes.ndim == 1:
        slopes = slopes[None]
    if slopes.ndim != 2 or slopes.shape[1] != H or slopes.shape[0] not in (1, B):
        raise ValueError(f"alibi_slopes must be ({H},) or ({B}, {H}), got {tuple(alibi_slopes.shape)}")
    return slopes


def _decode_tiled(q, view: KVView, spec: AttentionSpec, sinks, slopes, split_size: int):
    """Split-K decode with MLX array ops: one partial per split, merged by lse."""
    B, H, Nq, D = q.shape
    Hkv = view.num_kv_heads
    G = H // Hkv
    # GQA: the G query heads of one KV head share every K/V read -> (B, Hkv, G, Nq, D)
    qg = (q.astype(mx.float32) * spec.scale).reshape(B, Hkv, G, Nq, D)
    qpos = (view.seqlens[:, None] - Nq + mx.arange(Nq, dtype=mx.int32)[None]).reshape(B, 1, 1, Nq, 1)
    if slopes is not None:
        slopes = slopes.reshape(slopes.shape[0], Hkv, G, 1, 1)
    outs, lses = [], []
    for start, stop in _splits(view, spec, Nq, split_size):
        k, v, kpos, valid = _read_split(view, start, stop)
        o, lse = _split_partial(qg, k, v, kpos, valid, qpos, spec, slopes, view)
        outs.append(o)
        lses.append(lse)
    if outs:
        out, lse = merge_stacked(mx.stack(outs), mx.stack(lses))
    else:
        out = mx.zeros((B, Hkv, G, Nq, view.value_dim), mx.float32)
        lse = mx.full((B, Hkv, G, Nq), -float("inf"), mx.float32)
    out, lse = add_sink(out.reshape(B, H, Nq, -1), lse.reshape(B, H, Nq), sinks)
    return out.astype(q.dtype), lse


def _splits(view: KVView, spec: AttentionSpec, Nq: int, split_size: int):
    """``[start, stop)`` slot ranges of the splits, skipping slots no query can see."""
    n_slots = view.num_slots
    lo, hi = 0, n_slots
    if view.layout != RING and view.seqlens_host.size:
        # positions past the longest row, or left of every query's window, are never read
        hi = int(view.seqlens_host.max())
        left, _ = spec.band
        if left is not None:
            lo = max(0, int(view.seqlens_host.min()) - Nq - left)
    if view.layout == PAGED:
        page = view.page_size
        split_size = -(-split_size // page) * page
        lo = lo // page * page
    return [(s, min(s + split_size, hi)) for s in range(lo, hi, split_size)]


def _read_split(view: KVView, start: int, stop: int):
    """K/V of slots ``[start, stop)`` as ``(B, Hkv, 1, C, ·)``, their positions and validity ``(B|1, C)``."""
    if view.layout == PAGED:
        page = view.page_size
        table = view.block_table[:, start // page : -(-stop // page)]
        num_pages = view.k.shape[0]
        # bounds: unused (-1) or bad entries are clamped into the pool and masked out, never read outside it
        ok = (table >= 0) & (table < num_pages)
        pages = mx.clip(table, 0, num_pages - 1)
        B, n = pages.shape
        k = view.k[pages].reshape(B, n * page, *view.k.shape[2:])[:, : stop - start]
        v = view.v[pages].reshape(B, n * page, *view.v.shape[2:])[:, : stop - start]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        kpos = mx.arange(start, stop, dtype=mx.int32)[None]
        valid = mx.repeat(ok, page, axis=1)[:, : stop - start] & (kpos < view.seqlens[:, None])
        return k[:, :, None], v[:, :, None], kpos, valid
    if view.quantized:
        k = tuple(a[:, :, None, start:stop] for a in view.k)
        v = tuple(a[:, :, None, start:stop] for a in view.v)
    else:
        k, v = _heads_first(view)
        k, v = k[:, :, None, start:stop], v[:, :, None, start:stop]
    if view.layout == RING:
        kpos = view.key_positions[:, start:stop]
        valid = (kpos >= 0) & (kpos < view.seqlens[:, None])
    else:
        kpos = mx.arange(start, stop, dtype=mx.int32)[None]
        valid = kpos < view.seqlens[:, None]
    return k, v, kpos, valid


def _split_partial(qg, k, v, kpos, valid, qpos, spec: AttentionSpec, slopes, view: KVView):
    """One split's normalised output ``(B, Hkv, G, Nq, Dv)`` and lse ``(B, Hkv, G, Nq)``, fp32."""
    if view.quantized:
        # quantized cache: dequantize this split inside the matmul
        s = mx.quantized_matmul(qg, *k, transpose=True, group_size=view.group_size, bits=view.bits)
    else:
        s = qg @ k.astype(mx.float32).swapaxes(-1, -2)
    if spec.softcap is not None:
        s = spec.softcap * mx.tanh(s / spec.softcap)
    kpos = kpos[:, None, None, None, :]
    if slopes is not None:
        s = s - slopes * mx.abs(qpos - kpos).astype(mx.float32)
    keep = valid[:, None, None, None, :]
    left, right = spec.band
    if left is not None:
        keep = keep & (kpos >= qpos - left)
    if right is not None:
        keep = keep & (kpos <= qpos + right)
    s = mx.where(keep, s, -float("inf"))
    # online softmax within the split: max, exp, sum
    m = mx.max(s, axis=-1, keepdims=True)
    m = mx.where(mx.isinf(m), mx.zeros_like(m), m)
    p = mx.exp(s - m)
    l = mx.sum(p, axis=-1, keepdims=True)
    if view.quantized:
        o = mx.quantized_matmul(p, *v, transpose=False, group_size=view.group_size, bits=view.bits)
    else:
        o = p @ v.astype(mx.float32)
    o = o / mx.maximum(l, 1e-30)
    return o, (m + mx.log(l)).squeeze(-1)


def _heads_first(view: KVView) -> Tuple[mx.array, mx.array]:
    """Contiguous K/V as ``(B, Hkv, N, ·)`` (a transposed view when stored token-major)."""
    if view.token_major:
        return view.k.transpose(0, 2, 1, 3), view.v.transpose(0, 2, 1, 3)
    return view.k, view.v
