"""Merging partial attention results by their log-sum-exp (the combine step of flash-decoding).

Attention over keys split into disjoint parts ``K = K_1 ∪ … ∪ K_S`` is recovered exactly from each part's
normalised output ``o_s`` and log-sum-exp ``lse_s``::

    lse = log Σ_s exp(lse_s)           o = Σ_s exp(lse_s - lse) · o_s

Parts with nothing to attend carry ``lse_s = -inf`` and weigh 0; if every part is empty the result is
``o = 0``, ``lse = -inf``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import mlx.core as mx


def merge_attention_states(outs: Sequence[mx.array], lses: Sequence[mx.array]) -> Tuple[mx.array, mx.array]:
    """Combine attention results over disjoint key sets into the result over their union.

    Args:
        outs: S partial outputs, each ``(..., Nq, Dv)`` (any float dtype), normalised within its part.
        lses: S log-sum-exps, each ``(..., Nq)`` float32 (``-inf`` for a part with no key).

    Returns:
        ``(out, lse)``: ``out (..., Nq, Dv)`` float32 and ``lse (..., Nq)`` float32.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"need as many partial outputs as lses (at least one), got {len(outs)} and {len(lses)}")
    o = mx.stack([x.astype(mx.float32) for x in outs])
    lse = mx.stack([x.astype(mx.float32) for x in lses])
    return merge_stacked(o, lse)


def merge_stacked(o: mx.array, lse: mx.array, axis: int = 0) -> Tuple[mx.array, mx.array]:
    """`merge_attention_states` over an axis of stacked partials.

    Args:
        o: ``(..., S, ..., Nq, Dv)`` float32 partial outputs, the parts along ``axis``.
        lse: ``(..., S, ..., Nq)`` float32 partial log-sum-exps, the parts along ``axis``.
        axis: the parts axis (counted on ``lse``; must not be one of the last two axes of ``o``).

    Returns:
        ``(out, lse)`` with ``axis`` reduced.
    """
    axis = axis % lse.ndim
    # lse merge: subtract the running max so exp() cannot overflow; empty parts stay -inf
    m = mx.max(lse, axis=axis, keepdims=True)
    m = mx.where(mx.isinf(m) & (m < 0), mx.zeros_like(m), m)
    w = mx.exp(lse - m)
    total = mx.sum(w, axis=axis, keepdims=True)
    out = mx.sum(w[..., None] * o, axis=axis) / mx.maximum(total, _TINY)[..., None].squeeze(axis)
    return out, (m + mx.log(total)).squeeze(axis)


def add_sink(o: mx.array, lse: mx.array, sinks: Optional[mx.array]) -> Tuple[mx.array, mx.array]:
    """Fold per-head sink logits into the softmax denominator: ``lse' = logaddexp(lse, sink)``.

    Args:
        o: ``(B, H, Nq, Dv)`` float32 normalised output.
        lse: ``(B, H, Nq)`` float32.
        sinks: ``(H,)`` sink logits, or None (no change).

    Returns:
        ``(o · exp(lse - lse'), lse')``.
    """
    if sinks is None:
        return o, lse
    sink = sinks.astype(mx.float32)[None, :, None]
    new_lse = mx.logaddexp(lse, sink)
    return o * mx.exp(lse - new_lse)[..., None], new_lse


_TINY = 1e-30
