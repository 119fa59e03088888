"""mx.compile / mx.grad composition, backend routing, MFA_BACKEND and MFA_LOG."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_qkv

import mfa
from mfa import BlockMask
from mfa.ops import routing
from mfa.ops.spec import AttentionInputs, AttentionSpec


def allclose(a, b, atol=1e-5):
    for x, y in zip(a if isinstance(a, (tuple, list)) else [a], b if isinstance(b, (tuple, list)) else [b]):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=atol)


def test_compile_forward_and_grad_match_eager():
    q, k, v = random_qkv(1, 4, 2, 37, 37, 16)
    bias = mx.random.normal((1, 4, 1, 37))

    def loss(q, k, v, bias):
        return (mfa.flash_attention(q, k, v, causal=True, bias=bias, softcap=5.0, backend="tiled") ** 2).sum()

    grad = mx.grad(loss, argnums=(0, 1, 2, 3))
    allclose(mx.compile(loss)(q, k, v, bias), loss(q, k, v, bias), atol=1e-4)
    allclose(mx.compile(grad)(q, k, v, bias), grad(q, k, v, bias), atol=1e-4)
    allclose(mx.grad(mx.compile(loss), argnums=(0, 1, 2, 3))(q, k, v, bias), grad(q, k, v, bias), atol=1e-4)


def test_compile_varlen_visits_every_tile_and_matches_eager():
    cu = mx.array([0, 9, 9, 30], dtype=mx.int32)
    q, k, v = (mx.random.normal((30, 2, 16), key=mx.random.key(i)) for i in range(3))

    def loss(q, k, v, cu):
        return (mfa.flash_attention_varlen(q, k, v, cu, cu, causal=True, backend="tiled") ** 2).sum()

    grad = mx.grad(loss, argnums=(0, 1, 2))
    allclose(mx.compile(loss)(q, k, v, cu), loss(q, k, v, cu), atol=1e-4)
    allclose(mx.compile(grad)(q, k, v, cu), grad(q, k, v, cu), atol=1e-4)


def test_compile_with_block_mask():
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16)
    bm = BlockMask.from_mask_mod(lambda b, h, i, j: (j <= i) & (j > i - 12), 1, 1, 40, 40, block_size=16)
    fn = lambda q: mfa.flash_attention(q, k, v, block_mask=bm, backend="tiled")  # noqa: E731
    allclose(mx.compile(fn)(q), fn(q))


def test_integer_inputs_get_zero_cotangents():
    cu = mx.array([0, 4, 10], dtype=mx.int32)
    q, k, v = (mx.random.normal((10, 2, 16), key=mx.random.key(i)) for i in range(3))
    fn = lambda q, k, v, cu: mfa.flash_attention_varlen(q, k, v, cu, cu, backend="tiled").sum()  # noqa: E731
    _, grads = mx.vjp(lambda q, k, v: fn(q, k, v, cu), [q, k, v], [mx.array(1.0)])
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    g_cu = mx.grad(fn, argnums=3)(q, k, v, cu)
    assert float(mx.abs(g_cu).max()) == 0.0


def _route(q, k, v, return_lse=False, **spec):
    spec = AttentionSpec(scale=1.0, **spec)
    return routing.choose("auto", spec, AttentionInputs(q, k, v), return_lse)


def test_auto_routes_small_plain_calls_to_sdpa_and_the_rest_to_tiled():
    small = random_qkv(1, 2, 2, 64, 64, 16)
    assert _route(*small).backend == "sdpa"
    assert _route(*small, return_lse=True).backend == "tiled"
    assert _route(*small, window=(4, 0)).backend == "tiled"
    assert _route(*small, has_bias=True).backend == "tiled"
    big = random_qkv(1, 8, 8, 1024, 1024, 16)
    assert _route(*big, causal=True).backend == "tiled"
    # causal with Nq > Nk leaves empty rows, which MLX SDPA does not zero
    assert _route(*random_qkv(1, 1, 1, 32, 16, 16), causal=True).backend == "tiled"


def test_explicit_backend_that_cannot_run_raises():
    q, k, v = random_qkv(1, 2, 2, 16, 16, 16)
    with pytest.raises(NotImplementedError, match="sdpa"):
        mfa.flash_attention(q, k, v, window=(2, 2), backend="sdpa")
    with pytest.raises(NotImplementedError, match="lse"):
        mfa.flash_attention(q, k, v, return_lse=True, backend="sdpa")


def _fake_cuda_gpu(monkeypatch):
    """Route as on an NVIDIA GPU whose kernels build (nothing is evaluated)."""
    from mfa.kernels import build

    monkeypatch.setattr(routing, "_gpu_kind", lambda: "cuda")
    monkeypatch.setattr(build, "is_available", lambda target: True)
    monkeypatch.setattr(routing, "native_build_error", lambda target: None)


def test_deterministic_calls_avoid_the_routes_with_atomic_adds(monkeypatch):
    """deterministic=True: no cuDNN backward (MLX's SDPA VJP, even for small score matrices), no
    native dbias summed by atomic adds, no $MFA_BWD=fused; the rest of the native backward stays."""
    _fake_cuda_gpu(monkeypatch)
    q, k, v = random_qkv(2, 4, 2, 256, 256, 64, dtype=mx.bfloat16)
    causal = AttentionSpec(scale=0.125, causal=True)
    dense = AttentionInputs(q, k, v)
    assert routing.choose("auto", causal, dense, False).backend == "sdpa"
    assert routing.choose("auto", causal, dense, False, deterministic=True).backend == "cuda"
    small = AttentionInputs(*random_qkv(1, 2, 2, 128, 128, 64, dtype=mx.bfloat16))
    assert routing.choose("auto", causal, small, False).backend == "sdpa"
    assert routing.choose("auto", causal, small, False, deterministic=True).backend == "cuda"
    with pytest.raises(NotImplementedError, match="deterministic option"):
        routing.choose("sdpa", causal, dense, False, deterministic=True)

    with_bias = AttentionSpec(scale=0.125, has_bias=True)
    # shared by the heads and the query rows: several dk/dv threadgroups add into each dbias entry
    shared = AttentionInputs(q, k, v, bias=mx.zeros((2, 1, 1, 256), mx.bfloat16))
    assert routing.choose("auto", with_bias, shared, False).backend == "cuda"
    assert routing.choose("auto", with_bias, shared, False, deterministic=True).backend == "tiled"
    with pytest.raises(NotImplementedError, match=r"bias \(2, 1, 1, 256\).*atomic adds"):
        routing.choose("cuda", with_bias, shared, False, deterministic=True)
    for shape in [(2, 4, 256, 256), (1, 4, 256, 256), (2, 4, 256, 1)]:  # stores, batch sums in place, rows
        full = AttentionInputs(q, k, v, bias=mx.zeros(shape, mx.bfloat16))
        assert routing.choose("cuda", with_bias, full, False, deterministic=True).backend == "cuda", shape

    # dropout: the split backward (`fuses_by_default` is off for a deterministic call)
    dropout = AttentionSpec(scale=0.125, causal=True, dropout_p=0.1)
    assert routing.choose("auto", dropout, dense, False, deterministic=True).backend == "cuda"

    monkeypatch.setenv("MFA_BWD", "fused")
    assert routing.choose("cuda", causal, dense, False).backend == "cuda"
    with pytest.raises(NotImplementedError, match="MFA_BWD=fused"):
        routing.choose("cuda", causal, dense, False, deterministic=True)


def test_deterministic_reaches_the_router_from_every_entry_point(monkeypatch):
    seen = []
    choose = routing.choose
    monkeypatch.setattr(routing, "choose", lambda *args: seen.append(args[4]) or choose(*args))
    q, k, v = random_qkv(1, 2, 2, 16, 16, 16)
    cu = mx.array([0, 6, 16], dtype=mx.int32)
    packed = [x[0].transpose(1, 0, 2) for x in (q, k, v)]
    mfa.flash_attention(q, k, v, deterministic=True)
    mfa.flash_attention_varlen(*packed, cu, cu, deterministic=True)
    mfa.flash_attn.flash_attn_func(*(x.swapaxes(1, 2) for x in (q, k, v)), deterministic=True)
    mfa.flash_attn.flash_attn_varlen_func(*packed, cu, cu, deterministic=True)
    mfa.flash_attention(q, k, v)
    assert seen == [True, True, True, True, False]
    bias = mx.zeros((1, 1, 1, 16))
    with pytest.raises(NotImplementedError, match="atomic adds"):
        mfa.flash_attention(q, k, v, bias=bias, deterministic=True, backend="emulator")
    out = mfa.flash_attention(q, k, v, bias=bias, deterministic=True)  # auto: tiled on this CPU
    np.testing.assert_allclose(np.array(out), np.array(mfa.flash_attention(q, k, v, bias=bias)), atol=1e-6)


def test_mfa_backend_env_and_log(monkeypatch, capsys):
    q, k, v = random_qkv(1, 2, 2, 16, 16, 16)
    monkeypatch.setenv("MFA_BACKEND", "reference")
    monkeypatch.setenv("MFA_LOG", "1")
    mfa.flash_attention(q, k, v)
    assert "backend=reference" in capsys.readouterr().err
    monkeypatch.setenv("MFA_BACKEND", "tiled")
    mfa.flash_attention(q, k, v, backend="auto")
    assert "backend=tiled" in capsys.readouterr().err
    mfa.flash_attention(q, k, v, backend="sdpa")  # an explicit argument wins over the variable
    assert "backend=sdpa" in capsys.readouterr().err


@pytest.mark.parametrize("with_sinks", [False, True])
def test_sdpa_forward_with_mfa_backward(with_sinks):
    """The Metal route: MLX SDPA forward, mfa backward (lse recomputed in the VJP)."""
    from mfa.grad.function import sdpa_forward_function
    from mfa.ops.reference import attention_reference

    q, k, v = random_qkv(1, 4, 2, 33, 33, 16)
    sinks = mx.random.normal((4,)) if with_sinks else None
    spec = AttentionSpec(scale=0.25, causal=True, has_sinks=with_sinks)
    attention = sdpa_forward_function(spec, "tiled")
    arrays = lambda q, k, v: AttentionInputs(q, k, v, sinks=sinks).arrays()  # noqa: E731
    loss = lambda q, k, v: (attention(*arrays(q, k, v)) ** 2).sum()  # noqa: E731
    ref_loss = lambda q, k, v: (attention_reference(q, k, v, scale=0.25, causal=True, sinks=sinks)[0] ** 2).sum()  # noqa: E731
    allclose(mx.grad(loss, argnums=(0, 1, 2))(q, k, v), mx.grad(ref_loss, argnums=(0, 1, 2))(q, k, v), atol=5e-5)


def test_compile_grad_through_stacked_varlen_layers():
    """Two varlen calls sharing cu_seqlens (two layers) under mx.compile(mx.grad(...))."""
    cu = mx.array([0, 7, 7, 30, 41], dtype=mx.int32)
    q = mx.random.normal((41, 4, 16))
    slopes = mx.random.uniform(0.05, 0.3, (4, 4))

    def loss(q, slopes):
        o = mfa.flash_attention_varlen(q, q, q, cu, cu, causal=True, alibi_slopes=slopes, backend="tiled")
        o = mfa.flash_attention_varlen(o, o, o, cu, cu, causal=True, alibi_slopes=slopes, backend="tiled")
        return (o**2).sum()

    grad = mx.grad(loss, argnums=(0, 1))
    allclose(mx.compile(grad)(q, slopes), grad(q, slopes), atol=1e-4)


def test_native_target_that_fails_to_build_is_reported_once(monkeypatch):
    """auto probes a GPU target once; a toolchain failure becomes a warning and a fallback reason."""
    from mfa import kernels

    def broken(*args, **kwargs):
        raise RuntimeError("NVRTC compilation failed")

    monkeypatch.setattr(kernels, "forward", broken)
    routing.native_build_error.cache_clear()
    try:
        with pytest.warns(UserWarning, match="falls back to tiled"):
            assert "NVRTC" in routing.native_build_error("cuda")
        assert "NVRTC" in routing.native_build_error("cuda")  # cached: no second probe, no second warning
    finally:
        routing.native_build_error.cache_clear()
