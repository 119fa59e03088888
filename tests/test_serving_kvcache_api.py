"""flash_attn_with_kvcache: flash-attention's semantics (in-place append, paged, rotary, lse) in (B, N, H, D)."""

import mlx.core as mx
import numpy as np
import pytest

from mfa.flash_attn import flash_attn_with_kvcache
from mfa.ops.reference import attention_reference


def _rand(shape, seed):
    return mx.random.normal(shape, key=mx.random.key(seed))


def _bhnd(x):
    return x.transpose(0, 2, 1, 3)


def _row_reference(q, k_cache, v_cache, b, n, **options):
    """Oracle for row ``b`` attending to its first ``n`` cached tokens; (B, N, H, D) in and out."""
    out, lse = attention_reference(_bhnd(q[b : b + 1]), _bhnd(k_cache[b : b + 1, :n]), _bhnd(v_cache[b : b + 1, :n]),
                                   **options)
    return _bhnd(out), lse


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (6, 0)), (False, (3, 3))])
def test_append_in_place_and_attend(causal, window):
    B, Nc, H, Hkv, D, Nnew = 3, 40, 4, 2, 16, 2
    k_cache, v_cache = _rand((B, Nc, Hkv, D), 0), _rand((B, Nc, Hkv, D), 1)
    before_k = np.array(k_cache)
    q, k, v = _rand((B, Nnew, H, D), 2), _rand((B, Nnew, Hkv, D), 3), _rand((B, Nnew, Hkv, D), 4)
    lens = mx.array([0, 17, 38], dtype=mx.int32)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=causal,
                                       window_size=window, return_softmax_lse=True, num_splits=3)
    after_k = np.array(k_cache)
    for b, n in enumerate(lens.tolist()):
        # the new keys landed at n, n+1; nothing else changed
        np.testing.assert_array_equal(after_k[b, n : n + Nnew], np.array(k[b]))
        np.testing.assert_array_equal(np.delete(after_k[b], [n, n + 1], axis=0), np.delete(before_k[b], [n, n + 1], axis=0))
        ref, ref_lse = _row_reference(q, k_cache, v_cache, b, n + Nnew, causal=causal,
                                      window=None if window == (-1, -1) else window)
        np.testing.assert_allclose(np.array(out[b : b + 1]), np.array(ref), atol=2e-5)
        np.testing.assert_allclose(np.array(lse[b : b + 1]), np.array(ref_lse), atol=2e-5)


def test_paged_block_table_append():
    B, H, Hkv, D, page, Nnew = 2, 4, 1, 8, 4, 1
    k_pool, v_pool = mx.zeros((10, page, Hkv, D)), mx.zeros((10, page, Hkv, D))
    table = mx.array([[7, 2, 9, -1], [0, 5, -1, -1]], dtype=mx.int32)
    k_full, v_full = _rand((B, 13, Hkv, D), 5), _rand((B, 13, Hkv, D), 6)
    lens = [11, 5]
    # fill the pages with the first lens[b] tokens through the API itself, one call per row
    for b, n in enumerate(lens):
        flash_attn_with_kvcache(mx.zeros((1, n, H, D)), k_pool, v_pool, k_full[b : b + 1, :n], v_full[b : b + 1, :n],
                                cache_seqlens=0, block_table=table[b : b + 1])
    q = _rand((B, Nnew, H, D), 7)
    out = flash_attn_with_kvcache(q, k_pool, v_pool, k_full[:, 12:13], v_full[:, 12:13],
                                  cache_seqlens=mx.array(lens), block_table=table, causal=True)
    np.testing.assert_array_equal(np.array(k_pool[9, 3]), np.array(k_full[0, 12]))
    for b, n in enumerate(lens):
        k_row = mx.concatenate([k_full[b : b + 1, :n], k_full[b : b + 1, 12:13]], axis=1)
        v_row = mx.concatenate([v_full[b : b + 1, :n], v_full[b : b + 1, 12:13]], axis=1)
        ref, _ = attention_reference(_bhnd(q[b : b + 1]), _bhnd(k_row), _bhnd(v_row), causal=True)
        np.testing.assert_allclose(np.array(out[b : b + 1]), np.array(_bhnd(ref)), atol=2e-5)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_matches_mlx_rope(interleaved):
    B, Nc, H, D, rot = 2, 20, 2, 16, 8
    base = 10000.0
    inv = base ** (-np.arange(0, rot, 2) / rot)
    angles = np.arange(64)[:, None] * inv[None]
    cos, sin = mx.array(np.cos(angles), dtype=mx.float32), mx.array(np.sin(angles), dtype=mx.float32)
    k_cache, v_cache = _rand((B, Nc, H, D), 8), _rand((B, Nc, H, D), 9)
    q, k, v = _rand((B, 3, H, D), 10), _rand((B, 3, H, D), 11), _rand((B, 3, H, D), 12)
    lens = [4, 11]
    k_cache_ref = mx.array(np.array(k_cache))
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=mx.array(lens),
                                  causal=True, rotary_interleaved=interleaved)
    for b, n in enumerate(lens):
        rope = lambda x: _bhnd(mx.fast.rope(_bhnd(x[b : b + 1]), rot, traditional=interleaved, base=base, scale=1.0,
                                            offset=n))
        np.testing.assert_allclose(np.array(k_cache[b : b + 1, n : n + 3]), np.array(rope(k)), atol=1e-5)
        k_row = mx.concatenate([k_cache_ref[b : b + 1, :n], rope(k)], axis=1)
        v_row = mx.concatenate([v_cache[b : b + 1, :n], v[b : b + 1]], axis=1)
        ref, _ = attention_reference(_bhnd(rope(q)), _bhnd(k_row), _bhnd(v_row), causal=True)
        np.testing.assert_allclose(np.array(out[b : b + 1]), np.array(_bhnd(ref)), atol=2e-5)


def test_cache_batch_idx_softcap_no_append():
    k_cache, v_cache = _rand((4, 30, 2, 8), 13), _rand((4, 30, 2, 8), 14)
    q = _rand((2, 1, 4, 8), 15)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=mx.array([30, 9]),
                                  cache_batch_idx=mx.array([3, 1]), softcap=5.0, causal=True)
    for b, (row, n) in enumerate([(3, 30), (1, 9)]):
        ref, _ = attention_reference(_bhnd(q[b : b + 1]), _bhnd(k_cache[row : row + 1, :n]),
                                     _bhnd(v_cache[row : row + 1, :n]), causal=True, softcap=5.0)
        np.testing.assert_allclose(np.array(out[b : b + 1]), np.array(_bhnd(ref)), atol=2e-5)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(cache_seqlens=9), ValueError, "capacity"),
        (dict(cache_seqlens=None), ValueError, "cache_seqlens"),
        (dict(cache_seqlens=0, cache_leftpad=mx.zeros((1,))), NotImplementedError, "cache_leftpad"),
        (dict(cache_seqlens=1, block_table=mx.array([[0, 3]])), ValueError, r"pages in \[0, 1\)"),
        (dict(cache_seqlens=0, v=None), ValueError, "both k and v"),
        (dict(cache_seqlens=0, cache_batch_idx=mx.array([5])), ValueError, "cache_batch_idx"),
    ],
)
def test_bad_input_raises(kwargs, error, match):
    k_cache, v_cache = mx.zeros((2, 10, 1, 8)), mx.zeros((2, 10, 1, 8))
    args = dict(k=mx.zeros((1, 2, 1, 8)), v=mx.zeros((1, 2, 1, 8)))
    args.update(kwargs)
    if "block_table" in kwargs:
        k_cache, v_cache = mx.zeros((2, 2, 1, 8)), mx.zeros((2, 2, 1, 8))
    with pytest.raises(error, match=match):
        flash_attn_with_kvcache(mx.zeros((1, 1, 1, 8)), k_cache[:1], v_cache[:1], **args)
