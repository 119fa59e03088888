"""decode_attention (split-K, lse merge) against the naive oracle: contiguous, paged, quantized, ring."""

import mlx.core as mx
import numpy as np
import pytest

from mfa.ops.reference import attention_reference
from mfa.serving import (
    KVCache,
    KVView,
    QuantizedKVCache,
    RotatingKVCache,
    decode_attention,
    merge_attention_states,
)


def _rand(shape, seed, dtype=mx.float32):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def _rows_reference(q, k, v, lens, **options):
    """Per-row oracle: row b's queries are the last Nq of its lens[b] tokens."""
    outs, lses = [], []
    for b, n in enumerate(lens):
        o, l = attention_reference(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], **options)
        outs.append(o)
        lses.append(l)
    return mx.concatenate(outs), mx.concatenate(lses)


def _close(got, want, atol=2e-5):
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    finite = np.isfinite(want)
    assert np.array_equal(finite, np.isfinite(got))
    np.testing.assert_allclose(got[finite], want[finite], atol=atol, rtol=1e-4)


OPTIONS = [
    {},
    {"causal": False},
    {"window": (37, 0)},
    {"window": (5, 2), "causal": False},
    {"softcap": 3.0},
    {"sinks": "sinks"},
    {"alibi_slopes": "alibi"},
    {"softcap": 2.0, "window": (60, -1), "sinks": "sinks", "alibi_slopes": "alibi"},
]


def _materialize(options, H, seed):
    out = dict(options)
    if out.get("sinks") == "sinks":
        out["sinks"] = _rand((H,), seed + 7)
    if out.get("alibi_slopes") == "alibi":
        out["alibi_slopes"] = mx.abs(_rand((H,), seed + 8)) * 0.1
    return out


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("Nq", [1, 3, 16])
def test_contiguous_matches_reference(options, Nq):
    B, H, Hkv, N, D = 3, 8, 2, 300, 32
    q, k, v = _rand((B, H, Nq, D), 1), _rand((B, Hkv, N, D), 2), _rand((B, Hkv, N, D), 3)
    lens = [300, Nq + 1, 129]
    opts = _materialize(options, H, 0)
    out, lse = decode_attention(q, KVView.contiguous(k, v, lens), split_size=64, return_lse=True, **opts)
    ref_out, ref_lse = _rows_reference(q, k, v, lens, causal=opts.pop("causal", True), **opts)
    _close(out, ref_out)
    _close(lse, ref_lse)


@pytest.mark.parametrize("D,Dv,H,Hkv", [(16, 16, 4, 4), (64, 32, 6, 2), (80, 80, 8, 1), (128, 128, 4, 2)])
def test_head_dims_and_gqa(D, Dv, H, Hkv):
    B, N = 2, 97
    q, k, v = _rand((B, H, 2, D), 4), _rand((B, Hkv, N, D), 5), _rand((B, Hkv, N, Dv), 6)
    out = decode_attention(q, KVView.contiguous(k, v, [N, 50]), split_size=32)
    ref, _ = _rows_reference(q, k, v, [N, 50], causal=True)
    _close(out, ref)


@pytest.mark.parametrize("split_size", [1, 17, 64, 10_000])
def test_split_size_does_not_change_result(split_size):
    q, k, v = _rand((1, 4, 1, 16), 7), _rand((1, 2, 200, 16), 8), _rand((1, 2, 200, 16), 9)
    out = decode_attention(q, KVView.contiguous(k, v, 200), split_size=split_size)
    ref, _ = attention_reference(q, k, v, causal=True)
    _close(out, ref)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_low_precision_error_at_most_twice_naive(dtype):
    B, H, Hkv, N, D = 2, 8, 2, 513, 64
    q, k, v = (_rand(s, i, dtype) for i, s in enumerate([(B, H, 1, D), (B, Hkv, N, D), (B, Hkv, N, D)]))
    out = decode_attention(q, KVView.contiguous(k, v, N), split_size=128)
    assert out.dtype == dtype
    ref, _ = attention_reference(q, k, v, causal=True)
    naive, _ = attention_reference(q, k, v, causal=True, upcast=False)
    err = mx.abs(out.astype(mx.float32) - ref).max().item()
    err_naive = mx.abs(naive.astype(mx.float32) - ref).max().item()
    assert err <= 2 * err_naive + 1e-5


def _paged_from_contiguous(k, v, lens, page_size, num_pages, seed):
    """Scatter rows of k/v into shuffled pages; returns pools and a -1 padded block table."""
    B, Hkv, N, D = k.shape
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_pages)
    max_pages = -(-N // page_size)
    table = np.full((B, max_pages), -1, np.int32)
    k_pool = np.zeros((num_pages, page_size, Hkv, D), np.float32)
    v_pool = np.zeros((num_pages, page_size, Hkv, v.shape[-1]), np.float32)
    kn, vn, used = np.array(k), np.array(v), 0
    for b, n in enumerate(lens):
        for p in range(-(-n // page_size)):
            page = perm[used]
            used += 1
            table[b, p] = page
            rows = slice(p * page_size, min(n, (p + 1) * page_size))
            cnt = rows.stop - rows.start
            k_pool[page, :cnt] = kn[b, :, rows].transpose(1, 0, 2)
            v_pool[page, :cnt] = vn[b, :, rows].transpose(1, 0, 2)
    return mx.array(k_pool), mx.array(v_pool), table


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("options", OPTIONS[:4] + OPTIONS[-1:], ids=lambda o: "-".join(o) or "plain")
def test_paged_shuffled_pages_match_reference(page_size, options):
    B, H, Hkv, N, D = 3, 4, 2, 200, 16
    lens = [200, 1, 131]
    q, k, v = _rand((B, H, 2 if min(lens) > 1 else 1, D), 10), _rand((B, Hkv, N, D), 11), _rand((B, Hkv, N, D), 12)
    k_pool, v_pool, table = _paged_from_contiguous(k, v, lens, page_size, 2 * -(-N // page_size) * B, seed=page_size)
    opts = _materialize(options, H, 1)
    out, lse = decode_attention(q, KVView.paged(k_pool, v_pool, table, lens), split_size=48, return_lse=True, **opts)
    ref_out, ref_lse = _rows_reference(q, k, v, lens, causal=opts.pop("causal", True), **opts)
    _close(out, ref_out)
    _close(lse, ref_lse)


@pytest.mark.parametrize("bits,atol", [(8, 2e-2), (4, 2.5e-1)])
def test_quantized_within_stated_tolerance(bits, atol):
    B, H, Hkv, N, D = 2, 4, 2, 150, 64
    q, k, v = _rand((B, H, 1, D), 13), _rand((B, Hkv, N, D), 14), _rand((B, Hkv, N, D), 15)
    cache = QuantizedKVCache(group_size=32, bits=bits, step=64)
    cache.update_and_fetch(k[:, :, :100], v[:, :, :100])
    cache.update_and_fetch(k[:, :, 100:], v[:, :, 100:])
    out = decode_attention(q, cache, split_size=40)
    ref, _ = attention_reference(q, k, v, causal=True)
    err = mx.abs(out - ref).max().item()
    assert err < atol
    # the quantization, not the split-K, is the error: dequantized K/V give the same result
    kd = mx.dequantize(*cache.keys, group_size=32, bits=bits)[:, :, :N]
    vd = mx.dequantize(*cache.values, group_size=32, bits=bits)[:, :, :N]
    ref_q, _ = attention_reference(q, kd, vd, causal=True)
    _close(out, ref_q, atol=1e-4)


def test_kvcache_decode_matches_full_attention():
    H, Hkv, N, D = 4, 1, 40, 16
    q, k, v = _rand((2, H, N, D), 16), _rand((2, Hkv, N, D), 17), _rand((2, Hkv, N, D), 18)
    cache = KVCache(step=8)
    outs = [cache.attend(q[:, :, :25], k[:, :, :25], v[:, :, :25])]
    for t in range(25, N):
        outs.append(cache.attend(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]))
    ref, _ = attention_reference(q, k, v, causal=True)
    _close(mx.concatenate(outs, axis=2), ref)


@pytest.mark.parametrize("max_size,chunks", [(8, [20, 1, 1, 5, 1, 12]), (16, [1] * 30), (5, [3, 1, 9, 1])])
def test_rotating_matches_windowed_attention(max_size, chunks):
    H, Hkv, D = 4, 2, 16
    N = sum(chunks)
    q, k, v = _rand((1, H, N, D), 19), _rand((1, Hkv, N, D), 20), _rand((1, Hkv, N, D), 21)
    cache = RotatingKVCache(max_size)
    outs, t = [], 0
    for c in chunks:
        outs.append(cache.attend(q[:, :, t : t + c], k[:, :, t : t + c], v[:, :, t : t + c]))
        t += c
    assert cache.keys.shape[2] == max_size
    ref, _ = attention_reference(q, k, v, causal=True, window=(max_size - 1, 0))
    _close(mx.concatenate(outs, axis=2), ref)


def test_rotating_narrower_window_and_too_wide_window():
    q, k, v = _rand((1, 2, 30, 8), 22), _rand((1, 2, 30, 8), 23), _rand((1, 2, 30, 8), 24)
    cache = RotatingKVCache(10)
    cache.attend(q[:, :, :29], k[:, :, :29], v[:, :, :29], window=(4, 0))
    out = cache.attend(q[:, :, 29:], k[:, :, 29:], v[:, :, 29:], window=(4, 0))
    ref, _ = attention_reference(q, k, v, causal=True, window=(4, 0))
    _close(out, ref[:, :, 29:])
    with pytest.raises(ValueError, match="further back"):
        cache.attend(q[:, :, :1], k[:, :, :1], v[:, :, :1], window=(10, 0))


def test_empty_rows_give_zero_and_minus_inf():
    q, k, v = _rand((2, 2, 1, 8), 25), _rand((2, 2, 20, 8), 26), _rand((2, 2, 20, 8), 27)
    out, lse = decode_attention(q, KVView.contiguous(k, v, [0, 20]), return_lse=True)
    assert np.all(np.array(out[0]) == 0) and np.all(np.isneginf(np.array(lse[0])))
    sinks = mx.array([0.5, -1.0])
    out, lse = decode_attention(q, KVView.contiguous(k, v, [0, 20]), sinks=sinks, return_lse=True)
    assert np.all(np.array(out[0]) == 0)
    np.testing.assert_allclose(np.array(lse[0, :, 0]), [0.5, -1.0])


def test_merge_attention_states_recovers_full_attention():
    q, k, v = _rand((1, 2, 3, 8), 28), _rand((1, 2, 50, 8), 29), _rand((1, 2, 50, 8), 30)
    parts = [attention_reference(q, k[:, :, a:b], v[:, :, a:b]) for a, b in [(0, 7), (7, 30), (30, 50)]]
    empty = (mx.zeros((1, 2, 3, 8)), mx.full((1, 2, 3), -mx.inf))
    out, lse = merge_attention_states([p[0] for p in parts] + [empty[0]], [p[1] for p in parts] + [empty[1]])
    ref_out, ref_lse = attention_reference(q, k, v)
    _close(out, ref_out)
    _close(lse, ref_lse)
    with pytest.raises(ValueError, match="as many"):
        merge_attention_states([parts[0][0]], [])


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda q, k, v: decode_attention(q[:, :3], KVView.contiguous(k, v, 10)), "divisible"),
        (lambda q, k, v: decode_attention(q[..., :4], KVView.contiguous(k, v, 10)), "head dim"),
        (lambda q, k, v: decode_attention(q, KVView.contiguous(k, v, 11)), "capacity"),
        (lambda q, k, v: decode_attention(q, KVView.contiguous(k, v, [-1])), "capacity"),
        (lambda q, k, v: decode_attention(q, KVView.contiguous(k, v, [3, 4])), "shape"),
        (lambda q, k, v: decode_attention(q, KVView.contiguous(k, v, 10), backend="nope"), "backend"),
        (lambda q, k, v: decode_attention(q, KVView.contiguous(k, v, 10), window=(-2, 0)), "window"),
        (lambda q, k, v: decode_attention(q, KVView.contiguous(k, v, 10), sinks=mx.zeros((3,))), "sinks"),
        (lambda q, k, v: decode_attention(q, KVView.contiguous(k, v, 10), alibi_slopes=mx.zeros((2, 3))), "alibi"),
        (lambda q, k, v: decode_attention(q, KVView.contiguous(k, v[:, :, :5], 10)), "differ"),
    ],
)
def test_bad_input_raises(make, match):
    q, k, v = _rand((1, 4, 1, 8), 31), _rand((1, 2, 10, 8), 32), _rand((1, 2, 10, 8), 33)
    with pytest.raises(ValueError, match=match):
        make(q, k, v)


@pytest.mark.parametrize(
    "table,lens,live,match",
    [
        ([[0, 1, 9]], [20], None, r"page 9 .*\[0, 8\)"),
        ([[0, -1, 2]], [20], None, "page -1"),
        ([[0, 1, 2]], [25], None, "capacity"),
        ([[0, 1, 2]], [20], [True, True, False] + [True] * 5, "freed page 2"),
        ([[0, 1]], [5, 5], None, "shape"),
    ],
)
def test_bad_block_table_raises(table, lens, live, match):
    k_pool, v_pool = _rand((8, 8, 2, 8), 34), _rand((8, 8, 2, 8), 35)
    with pytest.raises(ValueError, match=match):
        KVView.paged(k_pool, v_pool, np.array(table), lens, live_pages=None if live is None else np.array(live))


def test_unused_table_slots_past_length_are_not_read():
    # a -1 or garbage entry beyond a row's length is never dereferenced
    k_pool, v_pool = _rand((4, 4, 1, 8), 36), _rand((4, 4, 1, 8), 37)
    q = _rand((1, 1, 1, 8), 38)
    good = decode_attention(q, KVView.paged(k_pool, v_pool, np.array([[2, 0, -1, -1]]), [6]))
    bad_tail = decode_attention(q, KVView.paged(k_pool, v_pool, np.array([[2, 0, 1_000_000, -5]]), [6]))
    _close(good, bad_tail, atol=0)


@pytest.mark.parametrize("options", [{}, {"causal": False}, {"sinks": "sinks"}], ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("Nq", [1, 3])
def test_auto_leaves_plain_equal_length_decodes_to_mlx(options, Nq):
    """``auto`` hands plain decodes of equal-length rows to MLX's own kernel; same result as tiled."""
    B, H, Hkv, N, D = 2, 8, 2, 200, 32
    q, k, v = _rand((B, H, Nq, D), 4), _rand((B, Hkv, N, D), 5), _rand((B, Hkv, N, D), 6)
    view = KVView.contiguous(k, v, [150, 150])
    opts = _materialize(options, H, 1)
    _close(decode_attention(q, view, **opts), decode_attention(q, view, backend="tiled", **opts))
