"""`flash_attention_varlen`: attention over packed sequences of different lengths."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from mfa.ops import checks
from mfa.ops.reference import attention_reference_varlen
from mfa.ops.routing import attend
from mfa.ops.spec import AttentionInputs
from mfa.ops.tiled import is_tracing


def flash_attention_varlen(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    cu_seqlens_q: mx.array,
    cu_seqlens_k: mx.array,
    *,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[mx.array] = None,
    sinks: Optional[mx.array] = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Attention over packed variable-length sequences (no padding, no cross-sequence attention).

    Sequence ``s`` owns query rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` and key rows
    ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``; causal and window are aligned bottom-right within
    each sequence, as in `flash_attention`.  Zero-length sequences are allowed.

    Args:
        q: packed queries ``(total_q, H, D)``.
        k: packed keys ``(total_k, Hkv, D)``.
        v: packed values ``(total_k, Hkv, Dv)``.
        cu_seqlens_q: ``(S+1,)`` int32 cumulative query lengths, starting at 0.
        cu_seqlens_k: ``(S+1,)`` int32 cumulative key lengths, starting at 0.
        max_seqlen_q, max_seqlen_k: longest sequence (optional; checked when given).
        alibi_slopes: ``(H,)`` or ``(S, H)`` (per sequence).
        scale, causal, window, softcap, sinks, dropout_p, dropout_seed, return_lse, deterministic,
            backend: as in `mfa.flash_attention`.

    Returns:
        ``out (total_q, H, Dv)`` in q's dtype, or ``(out, lse)`` with ``lse (H, total_q)``
        float32 (flash-attention's varlen layout).
    """
    checks.check_qkv(q, k, v, rank=3, layout="(total, H, D)")
    total_q, H, D = q.shape
    total_k, Hkv, Dk = k.shape
    checks.check_heads_and_dims(H, Hkv, v.shape[1], D, Dk, total_k, v.shape[0])
    cu_q = checks.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q)
    cu_k = checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k)
    if cu_q.shape != cu_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length S+1, got {cu_q.shape[0]} and {cu_k.shape[0]}"
        )
    num_seqs = cu_q.shape[0] - 1
    if not is_tracing(cu_q):
        values_q, values_k = np.array(cu_q), np.array(cu_k)
        checks.check_cu_seqlens_values("cu_seqlens_q", values_q, total_q)
        checks.check_cu_seqlens_values("cu_seqlens_k", values_k, total_k)
        checks.check_max_seqlen("max_seqlen_q", max_seqlen_q, values_q)
        checks.check_max_seqlen("max_seqlen_k", max_seqlen_k, values_k)
    spec = checks.checked_spec(
        D, H, num_seqs, scale=scale, causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
        sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout_seed, backend=backend, varlen=True,
    )
    # the dense layout with one batch row: (1, H, total, D)
    dense = lambda x: x.transpose(1, 0, 2)[None]  # noqa: E731
    inputs = AttentionInputs(dense(q), dense(k), dense(v), None, alibi_slopes, sinks,
                             cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)

    def reference():
        out, lse = attention_reference_varlen(
            q, k, v, cu_q, cu_k, scale=spec.scale, causal=causal, window=spec.window, softcap=softcap,
            alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout_seed,
        )
        return dense(out), lse[None]

    out, lse = attend(spec, inputs, return_lse=return_lse, backend=backend, reference=reference,
                      deterministic=bool(deterministic))
    # squeeze, not out[0]: an integer index is a gather in MLX, and its gradient a scatter into
    # zeros of the whole (1, H, total, D) (0.8 ms of the H100 varlen benchmark's 3.7)
    out = out.squeeze(0).transpose(1, 0, 2)
    return (out, lse.squeeze(0)) if return_lse else out
