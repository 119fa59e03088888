"""`flash_attention`: the dense public op."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx

from mfa.ops import checks
from mfa.ops.block_mask import BlockMask
from mfa.ops.reference import attention_reference
from mfa.ops.routing import attend
from mfa.ops.spec import AttentionInputs


def flash_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    bias: Optional[mx.array] = None,
    block_mask: Optional[BlockMask] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[mx.array] = None,
    sinks: Optional[mx.array] = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Fused scaled dot-product attention with an O(N)-memory forward and backward.

    Scores are built in this order, in float32::

        s = scale · q kᵀ  →  softcap·tanh(s / softcap)  →  − slope·|i' − j|  →  + bias  →  masks

    Query row ``i`` sits at key position ``i' = i + Nk − Nq`` (bottom-right alignment, as in
    flash-attention >= 2.1 and MLX SDPA).  With Nq = 2, Nk = 5, ``causal`` keeps::

        1 1 1 1 0
        1 1 1 1 1

    and ``window=(1, 0)`` (one key to the left, none to the right) keeps::

        0 0 1 1 0
        0 0 0 1 1

    Args:
        q: queries ``(B, H, Nq, D)``.
        k: keys ``(B, Hkv, Nk, D)``, ``H % Hkv == 0`` (GQA/MQA without repeating K/V).
        v: values ``(B, Hkv, Nk, Dv)``.
        scale: score multiplier. Default: ``D ** -0.5``.
        causal: keep ``j <= i'``. Default: ``False``.
        window: ``(left, right)``: keep ``i' - left <= j <= i' + right``; ``-1`` = unbounded
            on that side. Default: ``None``.
        bias: additive float bias broadcastable to ``(B, H, Nq, Nk)``; its gradient is
            returned, summed over the broadcast axes. Default: ``None``.
        block_mask: an `mfa.BlockMask` (block-sparse pattern; empty tiles are skipped).
        softcap: ``c`` in ``c·tanh(s/c)`` (Gemma-2 / Grok). Default: ``None``.
        alibi_slopes: ALiBi slopes ``(H,)`` or ``(B, H)``: adds ``-slope·|i' - j|``.
        sinks: per-head sink logits ``(H,)``: one extra logit in the softmax denominator
            only (gpt-oss / MLX SDPA semantics); differentiable.
        dropout_p: probability of dropping an attention weight (train mode). Default: ``0``.
        dropout_seed: seed of the counter-based dropout mask (reproducible). Default: ``0``.
        return_lse: also return the log-sum-exp of each row. Default: ``False``.
        deterministic: make the backward reproducible bit for bit: ``auto`` then skips the
            routes known to sum gradients with atomic adds (cuDNN's SDPA backward; in mfa's
            native backward, the dbias of a bias broadcast so that threadgroups share its
            entries, and ``$MFA_BWD=fused``), the native backward of a dropout call takes its
            split form (dq by plain stores) instead of the fused one, and an explicit backend
            that would use atomic adds raises NotImplementedError. Default: ``False``.
        backend: ``"auto"``, ``"sdpa"``, ``"tiled"``, ``"metal"``, ``"cuda"``, ``"emulator"``
            or ``"reference"``. Default: ``"auto"``.

    Returns:
        ``out (B, H, Nq, Dv)`` in q's dtype, or ``(out, lse)`` with ``lse (B, H, Nq)`` float32
        (natural log; includes the sink term). A row with nothing to attend gives ``out = 0``
        and ``lse = -inf`` (``lse = sink`` with sinks), never NaN.
    """
    checks.check_qkv(q, k, v, rank=4, layout="(B, H, N, D)")
    checks.check_dense_shapes(q, k, v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if bias is not None:
        bias = checks.bias_as_4d(bias, B, H, Nq, Nk)
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise ValueError(f"block_mask must be an mfa.BlockMask, got {type(block_mask).__name__}")
        block_mask.check(B, H, Nq, Nk)
    spec = checks.checked_spec(
        D, H, B, scale=scale, causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
        sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout_seed, backend=backend,
        has_bias=bias is not None, block_mask=block_mask,
    )
    inputs = AttentionInputs(q, k, v, bias, alibi_slopes, sinks)

    def reference():
        return attention_reference(
            q, k, v, scale=spec.scale, causal=causal, window=spec.window, bias=bias, block_mask=block_mask,
            softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p,
            dropout_seed=dropout_seed,
        )

    out, lse = attend(spec, inputs, return_lse=return_lse, backend=backend, reference=reference,
                      deterministic=bool(deterministic))
    return (out, lse) if return_lse else out
