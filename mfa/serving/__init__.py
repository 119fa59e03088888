"""mfa.serving: KV caches, paged KV with block tables, split-K decode attention, prefix reuse, a runtime.

Public names::

    KVCache, RotatingKVCache, QuantizedKVCache     # contiguous caches (mlx-lm protocol + attend)
    PagedKVCache, PagePool, PoolFullError          # paged K/V: page pool, block tables, copy-on-write
    PrefixCache                                    # identical prompt prefixes share pages
    KVView                                         # the arrays a decode reads (contiguous/paged/ring)
    decode_attention(q, cache, ...)                # split-K (flash-decoding), merged by lse
    merge_attention_states(outs, lses)             # combine partial attention results
    flash_attn_with_kvcache(...)                   # flash-attention's decode API, (B, N, H, D)
    Runtime(model, ...)                            # chunked prefill, continuous batching, generate
    greedy, make_sampler                           # samplers for Runtime.generate
"""

from mfa.serving.cache import KVCache, RotatingKVCache
from mfa.serving.decode import decode_attention
from mfa.serving.merge import merge_attention_states
from mfa.serving.paged import PagedBatch, PagedKVCache
from mfa.serving.pool import PagePool, PoolFullError
from mfa.serving.prefix import PrefixCache
from mfa.serving.quantized import QuantizedKVCache
from mfa.serving.runtime import Runtime
from mfa.serving.sampling import greedy, make_sampler
from mfa.serving.view import KVView
from mfa.serving.with_kvcache import flash_attn_with_kvcache

__all__ = [
    "KVCache",
    "KVView",
    "PagePool",
    "PagedBatch",
    "PagedKVCache",
    "PoolFullError",
    "PrefixCache",
    "QuantizedKVCache",
    "RotatingKVCache",
    "Runtime",
    "decode_attention",
    "flash_attn_with_kvcache",
    "greedy",
    "make_sampler",
    "merge_attention_states",
]
