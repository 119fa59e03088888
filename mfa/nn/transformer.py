"""The pre-norm transformer block: RMSNorm -> `Attention` -> residual, RMSNorm -> SwiGLU -> residual."""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mfa.nn.attention import Attention, Mask


class SwiGLU(nn.Module):
    """Gated feed-forward ``down(silu(gate(x)) * up(x))`` (no biases).

    Args:
        dims (int): input and output dimensions.
        hidden_dims (int): width of the gated hidden layer.
    """

    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with `mfa.nn.Attention` and a SwiGLU MLP.

    Args:
        dims (int): model dimensions.
        num_heads (int): query heads.
        num_kv_heads (int, optional): key/value heads (GQA). Default: ``num_heads``.
        mlp_dims (int, optional): SwiGLU hidden width. Default: ``4 * dims``.
        norm_eps (float, optional): RMSNorm epsilon. Default: ``1e-5``.
        head_dim, rope, rope_base, window, softcap: passed to `Attention`.
    """

    def __init__(
        self,
        dims: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        mlp_dims: Optional[int] = None,
        norm_eps: float = 1e-5,
        head_dim: Optional[int] = None,
        rope: bool = True,
        rope_base: float = 10000,
        window: Optional[Tuple[int, int]] = None,
        softcap: Optional[float] = None,
    ):
        super().__init__()
        self.attention_norm = nn.RMSNorm(dims, eps=norm_eps)
        self.attention = Attention(
            dims, num_heads, num_kv_heads, head_dim=head_dim, rope=rope, rope_base=rope_base,
            window=window, softcap=softcap,
        )
        self.mlp_norm = nn.RMSNorm(dims, eps=norm_eps)
        self.mlp = SwiGLU(dims, mlp_dims or 4 * dims)

    def __call__(self, x: mx.array, mask: Mask = None, cache=None, cu_seqlens: Optional[mx.array] = None) -> mx.array:
        """Apply the block to ``x (B, N, dims)``; ``mask``, ``cache``, ``cu_seqlens`` as in `Attention`."""
        h = x + self.attention(self.attention_norm(x), mask=mask, cache=cache, cu_seqlens=cu_seqlens)
        return h + self.mlp(self.mlp_norm(h))
