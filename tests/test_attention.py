"""flash_attention (dense): out, lse and every gradient against the float32 oracle."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_matches_reference, call_or_skip, fused_backends, random_qkv

import mfa
from mfa.ops.reference import attention_reference

BACKENDS = fused_backends()


def check(backend, q, k, v, extras=None, **options):
    """Compare out, lse, dq, dk, dv (and the extras' gradients) with the oracle."""
    extras = extras or {}
    names = list(extras)

    def fused(q, k, v, *xs):
        return mfa.flash_attention(q, k, v, return_lse=True, backend=backend, **options, **dict(zip(names, xs)))

    def reference(q, k, v, *xs, upcast=True):
        return attention_reference(q, k, v, upcast=upcast, **options, **dict(zip(names, xs)))

    assert_matches_reference(fused, reference, [q, k, v, *extras.values()], names=["q", "k", "v", *names])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "Nq,Nk",
    [(1, 1), (1, 17), (17, 17), (97, 97), (17, 97), (97, 33)],
)
def test_dense_lengths(backend, causal, Nq, Nk):
    q, k, v = random_qkv(2, 2, 2, Nq, Nk, 32, seed=Nq * 100 + Nk)
    check(backend, q, k, v, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D,Dv", [(16, 16), (64, 64), (80, 80), (128, 128), (256, 256), (64, 32), (32, 80)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_head_dims_and_dtypes(backend, D, Dv, dtype):
    q, k, v = random_qkv(1, 2, 1, 33, 47, D, Dv, dtype=dtype, seed=D + Dv)
    check(backend, q, k, v, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 1), (8, 2)])
def test_gqa_mqa(backend, H, Hkv):
    q, k, v = random_qkv(2, H, Hkv, 19, 41, 16, seed=H * 10 + Hkv)
    check(backend, q, k, v, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "window,causal",
    [((4, 0), False), ((0, 0), False), ((3, 5), False), ((-1, 2), False), ((6, -1), False), ((7, 7), True), ((0, -1), True)],
)
@pytest.mark.parametrize("Nq,Nk", [(41, 41), (23, 57), (57, 23)])
def test_sliding_window(backend, window, causal, Nq, Nk):
    q, k, v = random_qkv(1, 2, 1, Nq, Nk, 16, seed=sum(window) + Nq)
    check(backend, q, k, v, window=window, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_shape", [(2, 4, 37, 53), (1, 4, 37, 53), (2, 1, 1, 53), (4, 37, 1), (53,), (1, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_bias_and_dbias(backend, bias_shape, dtype):
    q, k, v = random_qkv(2, 4, 2, 37, 53, 16, dtype=dtype, seed=len(bias_shape))
    bias = mx.random.normal(bias_shape, key=mx.random.key(3)).astype(dtype)
    check(backend, q, k, v, extras={"bias": bias})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [2.0, 30.0])
def test_softcap(backend, softcap):
    q, k, v = random_qkv(1, 2, 2, 29, 45, 16, seed=5)
    check(backend, q * 3, k * 3, v, softcap=softcap, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi(backend, per_batch):
    q, k, v = random_qkv(2, 4, 2, 31, 40, 16, seed=6)
    shape = (2, 4) if per_batch else (4,)
    slopes = mx.random.uniform(0.05, 0.5, shape, key=mx.random.key(9))
    check(backend, q, k, v, extras={"alibi_slopes": slopes}, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_sinks(backend, causal):
    q, k, v = random_qkv(2, 4, 1, 26, 26, 16, seed=7)
    sinks = mx.random.normal((4,), key=mx.random.key(11))
    check(backend, q, k, v, extras={"sinks": sinks}, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_every_option_together(backend, dtype):
    """causal + window + bias + GQA + softcap + alibi + sinks in one call, Nq != Nk."""
    q, k, v = random_qkv(2, 6, 2, 45, 70, 32, 24, dtype=dtype, seed=8)
    extras = {
        "bias": mx.random.normal((1, 6, 45, 70), key=mx.random.key(1)).astype(dtype),
        "alibi_slopes": mx.random.uniform(0.01, 0.2, (2, 6), key=mx.random.key(2)),
        "sinks": mx.random.normal((6,), key=mx.random.key(3)),
    }
    check(backend, q, k, v, extras=extras, causal=True, window=(20, 3), softcap=8.0, scale=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero_and_no_nan(backend):
    """Nq > Nk with causal leaves the first Nq - Nk rows empty; a narrow window empties more."""
    q, k, v = random_qkv(1, 2, 2, 40, 24, 16, seed=12)
    check(backend, q, k, v, causal=True)
    check(backend, q, k, v, window=(0, 0), causal=True)
    out, lse = mfa.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    empty = 40 - 24
    assert float(mx.abs(out[:, :, :empty]).max()) == 0.0
    assert bool(mx.all(lse[:, :, :empty] == -mx.inf))
    grads = mx.grad(lambda q, k, v: mfa.flash_attention(q, k, v, causal=True, backend=backend).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(bool(mx.all(mx.isfinite(g))) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_with_sinks(backend):
    """With sinks an empty row has out = 0 and lse = sink."""
    q, k, v = random_qkv(1, 2, 2, 20, 8, 16, seed=13)
    sinks = mx.array([0.5, -1.0])
    out, lse = call_or_skip(mfa.flash_attention, q, k, v, causal=True, sinks=sinks, return_lse=True, backend=backend)
    assert float(mx.abs(out[:, :, :12]).max()) == 0.0
    np.testing.assert_allclose(np.array(lse[0, :, :12]), np.repeat(np.array(sinks)[:, None], 12, 1), rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_with_minus_inf_masks(backend):
    """An additive -inf mask (the classic way to pass a bool mask) keeps gradients finite."""
    q, k, v = random_qkv(1, 2, 2, 24, 24, 16, seed=14)
    keep = mx.random.uniform(shape=(1, 1, 24, 24), key=mx.random.key(5)) > 0.3
    bias = mx.where(keep, 0.0, -mx.inf)
    out, lse = call_or_skip(mfa.flash_attention, q, k, v, bias=bias, return_lse=True, backend=backend)
    ref, ref_lse = attention_reference(q, k, v, bias=bias)
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=2e-5)
    g = mx.grad(lambda b: (mfa.flash_attention(q, k, v, bias=b, backend=backend) ** 2).sum())(bias)
    g_ref = mx.grad(lambda b: (attention_reference(q, k, v, bias=b)[0] ** 2).sum())(bias)
    np.testing.assert_allclose(np.array(g), np.array(g_ref), atol=2e-5)


def test_scale_default_and_explicit():
    q, k, v = random_qkv(1, 1, 1, 9, 9, 16, seed=15)
    default = mfa.flash_attention(q, k, v, backend="tiled")
    explicit = mfa.flash_attention(q, k, v, scale=16**-0.5, backend="tiled")
    other = mfa.flash_attention(q, k, v, scale=1.0, backend="tiled")
    assert float(mx.abs(default - explicit).max()) == 0.0
    assert float(mx.abs(default - other).max()) > 1e-3


@pytest.mark.parametrize("backend", ["sdpa", "reference", "auto"])
def test_other_backends_agree(backend):
    q, k, v = random_qkv(2, 4, 2, 33, 33, 16, seed=16)
    out = mfa.flash_attention(q, k, v, causal=True, backend=backend)
    ref, _ = attention_reference(q, k, v, causal=True)
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=2e-5)
    g = mx.grad(lambda q: (mfa.flash_attention(q, k, v, causal=True, backend=backend) ** 2).sum())(q)
    g_ref = mx.grad(lambda q: (attention_reference(q, k, v, causal=True)[0] ** 2).sum())(q)
    np.testing.assert_allclose(np.array(g), np.array(g_ref), atol=5e-5)


def test_empty_query_and_key_lengths():
    q, k, v = random_qkv(1, 2, 2, 0, 5, 16)
    assert mfa.flash_attention(q, k, v, backend="tiled").shape == (1, 2, 0, 16)
    q, k, v = random_qkv(1, 2, 2, 4, 0, 16)
    out, lse = mfa.flash_attention(q, k, v, return_lse=True)
    assert float(mx.abs(out).max()) == 0.0 and bool(mx.all(lse == -mx.inf))
