"""The baseline mfa is compared with: the same model on ``mx.fast.scaled_dot_product_attention``.

MLX's SDPA has no varlen form, so packed rows are attended the way plain MLX code would do it:
the ``rows · seq_len`` packed tokens are viewed as a batch of ``rows`` sequences of ``seq_len``,
and a boolean ``(rows, 1, seq_len, seq_len)`` mask keeps each token to earlier tokens of its own
document.  Same parameters, same loss as the mfa model (tests/test_training.py checks it).
"""

from __future__ import annotations

import mlx.core as mx

from mfa.nn import Attention, CausalLM, packed_positions


class SDPAAttention(Attention):
    """`mfa.nn.Attention`'s parameters, attention by MLX SDPA with a per-row document mask.

    Args:
        seq_len (int): tokens per packed row (rows are attended as a batch).
        args, kwargs: as for `mfa.nn.Attention`.
    """

    def __init__(self, *args, seq_len: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seq_len = seq_len

    def __call__(self, x: mx.array, mask=None, cache=None, cu_seqlens=None) -> mx.array:
        if cu_seqlens is None or cache is not None:
            raise ValueError("the SDPA baseline runs packed training batches only (pass cu_seqlens, no cache)")
        _, total, _ = x.shape
        T, H, Hkv, D = self.seq_len, self.num_heads, self.num_kv_heads, self.head_dim
        rows = total // T
        positions = packed_positions(cu_seqlens, total)
        q = self.q_proj(x).reshape(total, H, 1, D)
        k = self.k_proj(x).reshape(total, Hkv, 1, D)
        v = self.v_proj(x).reshape(rows, T, Hkv, D).transpose(0, 2, 1, 3)
        q = self._rope(q, positions).reshape(rows, T, H, D).transpose(0, 2, 1, 3)
        k = self._rope(k, positions).reshape(rows, T, Hkv, D).transpose(0, 2, 1, 3)
        # document-causal mask: j <= i and j in i's document (a document starts at position 0)
        pos = positions.reshape(rows, T)
        i, j = mx.arange(T)[:, None], mx.arange(T)[None, :]
        keep = (j <= i) & (j >= (i - pos[:, :, None]))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=keep[:, None])
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(1, total, H * D))


def use_sdpa_attention(model: CausalLM, seq_len: int) -> CausalLM:
    """Swap every block's attention for an `SDPAAttention` with the same weights (rows of ``seq_len``)."""
    for block in model.layers:
        old = block.attention
        new = SDPAAttention(old.q_proj.weight.shape[1], old.num_heads, old.num_kv_heads, old.head_dim,
                            rope=old.use_rope, rope_base=old.rope_base, seq_len=seq_len)
        new.update(old.parameters())
        block.attention = new
    return model
