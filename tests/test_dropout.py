"""Dropout: reproducible by seed, the right rate, gradients with the forward's mask."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_matches_reference, fused_backends, random_qkv

import mfa
from mfa.ops import dropout
from mfa.ops.reference import attention_reference

BACKENDS = fused_backends()


def revealed_mask(p, seed, H=4, N=256, backend="tiled"):
    """With q = 0 every weight is 1/N, and v = I makes out[i, j] = keep_ij / (N (1 - p))."""
    q = mx.zeros((1, H, N, 16))
    k = mx.random.normal((1, H, N, 16))
    v = mx.broadcast_to(mx.eye(N)[None, None], (1, H, N, N))
    out = mfa.flash_attention(q, k, v, dropout_p=p, dropout_seed=seed, backend=backend)
    return np.array(out) > 0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_rate_within_one_percent(p):
    kept = revealed_mask(p, seed=3)
    assert abs((1.0 - kept.mean()) - p) < 0.01


def test_mask_matches_the_counter_hash():
    kept = revealed_mask(0.3, seed=11, H=2, N=64)
    head = mx.arange(2).reshape(1, 2, 1, 1)
    expected = dropout.keep_mask(11, 0.3, head, mx.arange(64).reshape(-1, 1), mx.arange(64).reshape(1, -1))
    np.testing.assert_array_equal(kept, np.array(expected))


def test_hash_wraps_as_uint32_at_large_indices():
    """`dropout.uniform_bits` equals the same hash in numpy uint32 arithmetic (what the kernels'
    ``unsigned`` computes) at indices and seeds where the products wrap."""
    def mix(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))

    seed, golden = 2**32 - 5, np.uint32(dropout.GOLDEN)
    head = np.array([0, 7, 2**20 + 3], np.uint32).reshape(-1, 1, 1)
    row = np.array([0, 1, 70_000, 2**31 - 1], np.uint32).reshape(1, -1, 1)
    col = np.array([0, 3, 123_457, 2**31 - 1], np.uint32).reshape(1, 1, -1)
    with np.errstate(over="ignore"):
        stream = mix(np.uint32(seed) ^ mix(head ^ golden))
        expected = mix(mix(row ^ stream) + col * golden) >> np.uint32(8)
    got = dropout.uniform_bits(seed, mx.array(head), mx.array(row), mx.array(col))
    np.testing.assert_array_equal(np.array(got), np.broadcast_to(expected, got.shape))


def test_mask_has_no_structure_across_rows_columns_heads_or_seeds():
    """The keep bits of neighbouring rows, columns, heads and seeds are uncorrelated, and no row
    repeats another shifted along the columns (the Weyl walk of each row starts at its own key)."""
    p, N = 0.5, 512
    rows, cols = mx.arange(N).reshape(-1, 1), mx.arange(N).reshape(1, -1)
    head = mx.arange(4).reshape(4, 1, 1)
    keep = np.array(dropout.keep_mask(7, p, head, rows, cols)).astype(np.float64)
    other_seed = np.array(dropout.keep_mask(8, p, head, rows, cols)).astype(np.float64)
    tolerance = 5 / np.sqrt(keep[..., 1:, :].size)  # five standard errors of a correlation

    def correlation(a, b):
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]

    assert abs(keep.mean() - (1 - p)) < tolerance
    assert abs(correlation(keep[:, 1:], keep[:, :-1])) < tolerance  # adjacent rows
    assert abs(correlation(keep[..., 1:], keep[..., :-1])) < tolerance  # adjacent columns
    assert abs(correlation(keep[1:], keep[:-1])) < 5 / np.sqrt(keep[1:].size)  # adjacent heads
    assert abs(correlation(keep, other_seed)) < 5 / np.sqrt(keep.size)  # adjacent seeds
    # a row shifted by s columns against every other row: agreement stays at one half
    flat = keep[0]
    for s in (1, 2, 3, 64):
        agree = (flat[1:, s:] == flat[:-1, :-s]).mean()
        assert abs(agree - 0.5) < 5 * 0.5 / np.sqrt(flat[1:, s:].size)


def test_reproducible_for_a_seed_and_different_across_seeds():
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16)
    a = mfa.flash_attention(q, k, v, dropout_p=0.2, dropout_seed=5, backend="tiled")
    b = mfa.flash_attention(q, k, v, dropout_p=0.2, dropout_seed=5, backend="tiled")
    c = mfa.flash_attention(q, k, v, dropout_p=0.2, dropout_seed=6, backend="tiled")
    assert float(mx.abs(a - b).max()) == 0.0
    assert float(mx.abs(a - c).max()) > 1e-3


def test_expected_value_is_unbiased():
    """Averaged over seeds, dropout output approaches the dropout-free output."""
    q, k, v = random_qkv(1, 1, 1, 8, 64, 16, seed=2)
    clean = mfa.flash_attention(q, k, v, backend="tiled")
    mean = sum(mfa.flash_attention(q, k, v, dropout_p=0.5, dropout_seed=s, backend="tiled") for s in range(200)) / 200
    assert float(mx.abs(mean - clean).max()) < 0.1 * float(mx.abs(clean).max()) + 0.05


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_gradients_use_the_forward_mask(backend, dtype):
    """out, lse, dq, dk, dv with dropout equal the oracle applying the same counter mask."""
    q, k, v = random_qkv(2, 4, 2, 37, 45, 16, dtype=dtype, seed=4)
    options = dict(dropout_p=0.25, dropout_seed=1234, causal=True)

    def fused(q, k, v):
        return mfa.flash_attention(q, k, v, return_lse=True, backend=backend, **options)

    def reference(q, k, v, upcast=True):
        return attention_reference(q, k, v, upcast=upcast, **options)

    assert_matches_reference(fused, reference, [q, k, v])
