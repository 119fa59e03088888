"""flash_attention_varlen: packed sequences against the per-sequence oracle."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_matches_reference, fused_backends

import mfa
from mfa.ops.reference import attention_reference_varlen

BACKENDS = fused_backends()


def packed(lengths_q, lengths_k, H=4, Hkv=2, D=16, Dv=None, dtype=mx.float32, seed=0):
    Dv = D if Dv is None else Dv
    kq, kk, kv = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((sum(lengths_q), H, D), key=kq).astype(dtype)
    k = mx.random.normal((sum(lengths_k), Hkv, D), key=kk).astype(dtype)
    v = mx.random.normal((sum(lengths_k), Hkv, Dv), key=kv).astype(dtype)
    cu = lambda lengths: mx.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))  # noqa: E731
    return q, k, v, cu(lengths_q), cu(lengths_k)


def check(backend, lengths_q, lengths_k, extras=None, dtype=mx.float32, **options):
    q, k, v, cu_q, cu_k = packed(lengths_q, lengths_k, dtype=dtype, seed=len(lengths_q))
    extras = extras or {}
    names = list(extras)

    def fused(q, k, v, *xs):
        out, lse = mfa.flash_attention_varlen(
            q, k, v, cu_q, cu_k, return_lse=True, backend=backend, **options, **dict(zip(names, xs))
        )
        return out, lse

    def reference(q, k, v, *xs, upcast=True):
        return attention_reference_varlen(q, k, v, cu_q, cu_k, upcast=upcast, **options, **dict(zip(names, xs)))

    assert_matches_reference(fused, reference, [q, k, v, *extras.values()], names=["q", "k", "v", *names])


LENGTHS = [
    ([17], [17]),
    ([5, 0, 33, 9, 1], [5, 0, 33, 9, 1]),
    ([3, 20, 0, 11], [7, 20, 4, 0]),
    ([0, 0, 40], [0, 12, 40]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths_q,lengths_k", LENGTHS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_lengths(backend, lengths_q, lengths_k, causal):
    check(backend, lengths_q, lengths_k, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_varlen_every_option(backend, dtype):
    """window + causal + softcap + per-sequence alibi + sinks, with empty sequences, in bf16 too."""
    lengths_q, lengths_k = [6, 0, 29, 13], [9, 4, 29, 0]
    extras = {
        "alibi_slopes": mx.random.uniform(0.05, 0.3, (4, 4), key=mx.random.key(1)),
        "sinks": mx.random.normal((4,), key=mx.random.key(2)),
    }
    check(backend, lengths_q, lengths_k, extras=extras, dtype=dtype, causal=True, window=(8, 0), softcap=6.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_window_only(backend):
    check(backend, [21, 14], [30, 14], window=(3, 4))


def test_varlen_equals_dense_per_sequence():
    """A single packed sequence is exactly the dense op on that sequence."""
    q, k, v, cu_q, cu_k = packed([23], [31])
    out = mfa.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=True, backend="tiled")
    dense = mfa.flash_attention(
        q.transpose(1, 0, 2)[None], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None], causal=True, backend="tiled"
    )
    np.testing.assert_allclose(np.array(out), np.array(dense[0].transpose(1, 0, 2)), atol=1e-6)


def test_varlen_lse_layout_and_int64_cu_seqlens():
    q, k, v, cu_q, cu_k = packed([4, 6], [4, 6])
    out, lse = mfa.flash_attention_varlen(q, k, v, cu_q.astype(mx.int64), cu_k, return_lse=True)
    assert out.shape == (10, 4, 16) and lse.shape == (4, 10) and lse.dtype == mx.float32


def test_varlen_max_seqlen_accepted_when_large_enough():
    q, k, v, cu_q, cu_k = packed([4, 6], [5, 6])
    out = mfa.flash_attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=6, max_seqlen_k=7)
    assert out.shape == (10, 4, 16)
