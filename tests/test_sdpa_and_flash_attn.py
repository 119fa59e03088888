"""The drop-in `mfa.scaled_dot_product_attention` and the `mfa.flash_attn` adapters."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_qkv

import mfa
from mfa import flash_attn
from mfa.ops.reference import attention_reference, attention_reference_varlen


def close(a, b, atol=2e-5):
    np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), atol=atol)


@pytest.mark.parametrize("mask_kind", [None, "causal", "bool", "additive"])
def test_sdpa_matches_mlx(mask_kind):
    q, k, v = random_qkv(2, 4, 2, 24, 24, 16)
    mask = {
        None: None,
        "causal": "causal",
        "bool": mx.random.uniform(shape=(2, 1, 24, 24), key=mx.random.key(1)) > 0.2,
        "additive": mx.random.normal((4, 24, 24), key=mx.random.key(2)),
    }[mask_kind]
    ours = mfa.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask, backend="tiled")
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    close(ours, theirs)


def test_sdpa_gradient_wrt_additive_mask_and_sinks():
    q, k, v = random_qkv(1, 4, 4, 20, 20, 16)
    mask = mx.random.normal((1, 4, 20, 20), key=mx.random.key(3))
    sinks = mx.random.normal((4,), key=mx.random.key(4))

    def loss(fn):
        return lambda m, s: (fn(m, s) ** 2).sum()

    ours = mx.grad(loss(lambda m, s: mfa.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m, sinks=s)), argnums=(0, 1))(mask, sinks)
    ref = mx.grad(loss(lambda m, s: attention_reference(q, k, v, scale=0.25, bias=m, sinks=s)[0]), argnums=(0, 1))(mask, sinks)
    close(ours[0], ref[0])
    close(ours[1], ref[1], atol=1e-4)


def test_sdpa_with_sinks_matches_mlx():
    q, k, v = random_qkv(1, 4, 2, 16, 16, 16)
    sinks = mx.random.normal((4,))
    close(
        mfa.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal", sinks=sinks, backend="tiled"),
        mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal", sinks=sinks),
    )


def _bnhd(*xs):
    return [x.swapaxes(1, 2) for x in xs]


def test_flash_attn_func_layout_and_options():
    q, k, v = random_qkv(2, 4, 2, 19, 23, 16)
    slopes = mx.array([0.1, 0.2, 0.3, 0.4])
    out, lse, probs = flash_attn.flash_attn_func(
        *_bnhd(q, k, v), causal=True, window_size=(5, -1), softcap=4.0, alibi_slopes=slopes, return_attn_probs=True
    )
    ref, ref_lse = attention_reference(q, k, v, causal=True, window=(5, -1), softcap=4.0, alibi_slopes=slopes)
    assert out.shape == (2, 19, 4, 16) and probs is None
    close(out.swapaxes(1, 2), ref)
    close(lse, ref_lse)


def test_flash_attn_packed_variants():
    q, k, v = random_qkv(1, 2, 2, 12, 12, 16)
    qb, kb, vb = _bnhd(q, k, v)
    expected = flash_attn.flash_attn_func(qb, kb, vb, causal=True)
    close(flash_attn.flash_attn_qkvpacked_func(mx.stack([qb, kb, vb], axis=2), causal=True), expected)
    close(flash_attn.flash_attn_kvpacked_func(qb, mx.stack([kb, vb], axis=2), causal=True), expected)


def test_flash_attn_varlen_func():
    cu = mx.array([0, 5, 12], dtype=mx.int32)
    q = mx.random.normal((12, 2, 16))
    k = mx.random.normal((12, 2, 16))
    v = mx.random.normal((12, 2, 16))
    out, lse, _ = flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True, return_attn_probs=True)
    ref, ref_lse = attention_reference_varlen(q, k, v, cu, cu, causal=True)
    close(out, ref)
    close(lse, ref_lse)
