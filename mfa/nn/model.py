"""A small decoder-only language model built from `TransformerBlock`s (used by examples/training)."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mfa.nn.transformer import TransformerBlock


@dataclasses.dataclass
class ModelConfig:
    """Hyper-parameters of `CausalLM` (JSON-serializable: saved next to checkpoints).

    Attributes:
        vocab_size: number of token ids.
        dims: model dimensions.
        num_layers: transformer blocks.
        num_heads: query heads per block.
        num_kv_heads: key/value heads (GQA); None means ``num_heads``.
        mlp_dims: SwiGLU hidden width; None means ``4 * dims``.
        rope_base: RoPE base frequency.
        window: ``(left, right)`` sliding window of every block, or None.
        tie_embeddings: the output projection reuses the token embedding.
    """

    vocab_size: int = 257
    dims: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    mlp_dims: Optional[int] = None
    rope_base: float = 10000.0
    window: Optional[Sequence[int]] = None
    tie_embeddings: bool = True


class CausalLM(nn.Module):
    """Decoder-only causal language model: embedding, `TransformerBlock`s, RMSNorm, logits.

    Args:
        config (ModelConfig): the model's hyper-parameters.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        window = tuple(config.window) if config.window is not None else None
        self.embed = nn.Embedding(config.vocab_size, config.dims)
        self.layers = [
            TransformerBlock(
                config.dims, config.num_heads, config.num_kv_heads, mlp_dims=config.mlp_dims,
                rope_base=config.rope_base, window=window,
            )
            for _ in range(config.num_layers)
        ]
        self.norm = nn.RMSNorm(config.dims)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.dims, config.vocab_size, bias=False)

    def __call__(
        self,
        tokens: mx.array,
        cache: Optional[List] = None,
        cu_seqlens: Optional[mx.array] = None,
    ) -> mx.array:
        """Next-token logits.

        Args:
            tokens: ``(B, N)`` int token ids; ``(1, total)`` when packed.
            cache: one KV cache per layer (see `Attention`), or None.
            cu_seqlens: ``(S+1,)`` int32 boundaries of the sequences packed in ``tokens``.

        Returns:
            ``(B, N, vocab_size)`` logits.
        """
        x = self.embed(tokens)
        caches = cache if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, caches):
            x = layer(x, mask="causal", cache=layer_cache, cu_seqlens=cu_seqlens)
        x = self.norm(x)
        return self.embed.as_linear(x) if self.config.tie_embeddings else self.lm_head(x)
