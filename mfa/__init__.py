"""mfa: FlashAttention for MLX — fused O(N)-memory forward and backward for training.

Public names::

    mfa.flash_attention(q, k, v, ...)                 # (B, H, N, D)
    mfa.flash_attention_varlen(q, k, v, cu_q, cu_k)   # packed (total, H, D)
    mfa.scaled_dot_product_attention(q, k, v, ...)    # drop-in for mx.fast's, differentiable mask/sinks
    mfa.BlockMask                                     # block-sparse patterns
    mfa.flash_attn                                    # flash-attention's names, (B, N, H, D) layout
    mfa.install() / mfa.uninstall() / mfa.installed() # route mx.fast.scaled_dot_product_attention to mfa
    mfa.nn, mfa.serving, mfa.distributed              # layers; KV caches and decode; ring attention
"""

from mfa import flash_attn
from mfa.ops.attention import flash_attention
from mfa.ops.block_mask import BlockMask
from mfa.ops.sdpa import scaled_dot_product_attention
from mfa.ops.varlen import flash_attention_varlen
from mfa.patch import install, installed, is_installed, uninstall
from mfa import distributed, nn, serving  # noqa: E402  (built on the ops above)

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "distributed",
    "flash_attention",
    "flash_attention_varlen",
    "flash_attn",
    "install",
    "nn",
    "serving",
    "installed",
    "is_installed",
    "scaled_dot_product_attention",
    "uninstall",
]
