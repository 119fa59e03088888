"""Samplers: ``sampler(logits (B, V)) -> tokens (B,)`` for `Runtime.generate`."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]


def greedy(logits: mx.array) -> mx.array:
    """The most likely token of each row.

    Args:
        logits: ``(B, V)``.

    Returns:
        ``(B,)`` int32.
    """
    return mx.argmax(logits, axis=-1).astype(mx.int32)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> Sampler:
    """A sampler drawing from ``softmax(logits / temperature)``, optionally truncated to top-k / top-p.

    Args:
        temperature: ``0`` means greedy. Default: ``0``.
        top_p: keep the smallest set of tokens whose probability reaches ``top_p``. Default: ``1`` (all).
        top_k: keep the ``top_k`` most likely tokens; ``0`` keeps all. Default: ``0``.

    Returns:
        a callable ``logits (B, V) -> tokens (B,) int32`` (uses MLX's global random state).
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature=}, {top_p=}, {top_k=}")
    if temperature == 0:
        return greedy

    def sample(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32) / temperature
        if top_k:
            kth = mx.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
            logits = mx.where(logits >= kth, logits, -mx.inf)
        if top_p < 1:
            # nucleus: drop tokens whose higher-probability neighbours already reach top_p
            order = mx.argsort(-logits, axis=-1)
            probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
            drop_sorted = (mx.cumsum(probs, axis=-1) - probs) >= top_p
            drop = mx.put_along_axis(mx.zeros_like(drop_sorted), order, drop_sorted, axis=-1)
            logits = mx.where(drop, -mx.inf, logits)
        return mx.random.categorical(logits, axis=-1).astype(mx.int32)

    return sample
