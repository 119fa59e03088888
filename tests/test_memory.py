"""The tiled path's forward and backward keep memory O(N): far below the materialized op."""

import mlx.core as mx

import mfa
from mfa.ops import tiled
from mfa.ops.reference import attention_reference


def peak_extra_bytes(fn, *arrays):
    mx.eval(*arrays)
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn(*arrays))
    return mx.get_peak_memory() - base


def test_tiled_forward_and_backward_memory_is_linear():
    B, H, N, D = 1, 4, 1024, 16
    q, k, v = (mx.random.normal((B, H, N, D), key=mx.random.key(i)) for i in range(3))
    grad = lambda attn: mx.grad(lambda q, k, v: (attn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))  # noqa: E731
    naive = peak_extra_bytes(grad(lambda q, k, v: attention_reference(q, k, v, causal=True)[0]), q, k, v)
    with tiled.block_sizes(128, 128):
        fused = peak_extra_bytes(grad(lambda q, k, v: mfa.flash_attention(q, k, v, causal=True, backend="tiled")), q, k, v)
        forward = peak_extra_bytes(lambda q, k, v: mfa.flash_attention(q, k, v, causal=True, backend="tiled"), q, k, v)
    score_matrix = B * H * N * N * 4
    assert naive > 2 * score_matrix  # the oracle materializes the scores (sanity of the measurement)
    assert fused < score_matrix / 4, f"tiled fwd+bwd peak {fused / 2**20:.1f} MiB"
    assert forward < score_matrix / 4, f"tiled fwd peak {forward / 2**20:.1f} MiB"
