"""The native kernel bodies run by the CPU executor, against the float32 oracle.

Every test runs both fragment families of the tile layer: ``metal`` (simdgroup 8x8 matrices,
what Apple GPUs run) and ``cuda`` (mma.sync m16n8k16 + ldmatrix + cp.async, what the H100 runs),
through the router's interface `mfa.kernels.forward` / `backward`.  Checked: out, lse, dq, dk,
dv with a random cotangent for out *and* lse, under the suite's tolerance rule.
"""

import mlx.core as mx
import numpy as np
import pytest
from conftest import check_rule, random_qkv

from mfa import kernels
from mfa.ops.reference import attention_reference
from mfa.ops.spec import AttentionInputs, AttentionSpec

pytestmark = pytest.mark.skipif(not kernels.is_available("emulator"), reason="no C++ compiler")


@pytest.fixture(params=["metal", "cuda"])
def arch(request, monkeypatch):
    monkeypatch.setenv("MFA_EMULATOR_ARCH", request.param)
    return request.param


def default_dtype(arch):
    return mx.float32 if arch == "metal" else mx.bfloat16  # the CUDA family has no fp32 operands


def run(q, k, v, causal, scale=None, seed=3, target="emulator", window=None, softcap=None):
    """out, lse, dq, dk, dv of the kernels, and of the oracle (fp32 and naive low precision)."""
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    k1, k2 = mx.random.split(mx.random.key(seed))
    dout = mx.random.normal(q.shape, key=k1)
    dlse = mx.random.normal(q.shape[:3], key=k2) * 0.5

    spec = AttentionSpec(scale=scale, causal=causal, window=window, softcap=softcap)
    inputs = AttentionInputs(q, k, v)
    assert kernels.unsupported_reason(target, spec, inputs) is None
    out, lse = kernels.forward(target, spec, inputs)
    finite = mx.isfinite(lse)
    grads = kernels.backward(target, spec, inputs, out, lse, dout.astype(q.dtype), mx.where(finite, dlse, 0.0))
    got = {"out": out, "lse": lse, "dq": grads.dq, "dk": grads.dk, "dv": grads.dv}

    def oracle(upcast, arrays):
        def f(q, k, v):
            return attention_reference(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap,
                                       upcast=upcast)

        (o, l), (dq, dk, dv) = mx.vjp(f, arrays, [dout.astype(arrays[0].dtype), mx.where(finite, dlse, 0.0)])
        return {"out": o, "lse": l, "dq": dq, "dk": dk, "dv": dv}

    ref = oracle(True, [x.astype(mx.float32) for x in (q, k, v)])
    naive = oracle(False, [q, k, v])
    return got, ref, naive


def check(q, k, v, causal, **kw):
    got, ref, naive = run(q, k, v, causal, **kw)
    for name in got:
        assert got[name].shape == ref[name].shape, name
        check_rule(name, got[name], ref[name], naive[name])
    assert got["out"].dtype == q.dtype and got["dk"].dtype == k.dtype
    return got


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 70), (17, 97), (97, 17), (64, 64), (130, 67)])
def test_lengths_and_causal(arch, causal, Nq, Nk):
    q, k, v = random_qkv(1, 2, 2, Nq, Nk, 64, dtype=default_dtype(arch), seed=Nq + 7 * Nk)
    check(q, k, v, causal)


@pytest.mark.parametrize("D", [16, 32, 64, 80, 96, 128, 192, 256])
def test_head_dims(arch, D):
    # float32 tiles of D > 128 exceed Metal's 32 KB of threadgroup memory: half precision there
    dtype = mx.float16 if arch == "metal" and D > 128 else default_dtype(arch)
    q, k, v = random_qkv(1, 2, 1, 33, 40, D, dtype=dtype, seed=D)
    check(q, k, v, causal=True)


def test_float32_large_head_dim_declined_on_metal(arch):
    q, k, v = random_qkv(1, 1, 1, 4, 4, 256)
    reason = kernels.unsupported_reason("emulator", AttentionSpec(scale=0.1), AttentionInputs(q, k, v))
    assert reason is not None and ("threadgroup memory" in reason or "float32" in reason)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_dtypes(arch, dtype):
    if arch == "cuda" and dtype == mx.float32:
        q, k, v = random_qkv(1, 1, 1, 8, 8, 64, dtype=dtype)
        reason = kernels.unsupported_reason("emulator", AttentionSpec(scale=0.125), AttentionInputs(q, k, v))
        assert "float32" in reason
        return
    q, k, v = random_qkv(2, 2, 2, 45, 37, 64, dtype=dtype, seed=11)
    check(q, k, v, causal=False)


@pytest.mark.parametrize("H,Hkv", [(4, 2), (6, 1), (3, 3)])
def test_gqa_without_repeating_kv(arch, H, Hkv):
    q, k, v = random_qkv(2, H, Hkv, 29, 51, 64, dtype=default_dtype(arch), seed=H * 10 + Hkv)
    check(q, k, v, causal=True, scale=0.3)


@pytest.mark.parametrize("window", [(0, 0), (5, 3), (20, -1), (-1, 7), (3, 200)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(90, 90), (40, 130), (130, 40)])
def test_sliding_window_visits_only_band_tiles(arch, window, causal, Nq, Nk):
    q, k, v = random_qkv(1, 2, 1, Nq, Nk, 64, dtype=default_dtype(arch), seed=Nq + Nk + window[0])
    check(q, k, v, causal, window=window)


@pytest.mark.parametrize("softcap", [1.5, 30.0])
@pytest.mark.parametrize("window", [None, (9, 4)])
def test_softcap(arch, softcap, window):
    q, k, v = random_qkv(2, 2, 1, 37, 61, 64, dtype=default_dtype(arch), seed=int(softcap))
    check(q * 2, k * 2, v, causal=True, window=window, softcap=softcap)


def check_alibi_and_sinks(q, k, v, slopes, sinks, target="emulator", scale=0.2, window=(20, -1)):
    """out, lse, dq, dk, dv, dslopes and dsinks of the kernels against the oracle."""
    k1, k2 = mx.random.split(mx.random.key(8))
    dout = mx.random.normal(q.shape, key=k1)
    dlse = mx.random.normal(q.shape[:3], key=k2) * 0.5
    spec = AttentionSpec(scale=scale, causal=True, window=window, has_alibi=slopes is not None,
                         has_sinks=sinks is not None)
    inputs = AttentionInputs(q, k, v, alibi_slopes=slopes, sinks=sinks)
    assert kernels.unsupported_reason(target, spec, inputs) is None
    out, lse = kernels.forward(target, spec, inputs)
    grads = kernels.backward(target, spec, inputs, out, lse, dout.astype(q.dtype), dlse)
    extras = [x for x in (slopes, sinks) if x is not None]
    names = (["dslopes"] if slopes is not None else []) + (["dsinks"] if sinks is not None else [])

    def oracle(upcast, arrays):
        def f(q, k, v, *xs):
            it = iter(xs)
            return attention_reference(q, k, v, scale=scale, causal=True, window=window, upcast=upcast,
                                       alibi_slopes=next(it) if slopes is not None else None,
                                       sinks=next(it) if sinks is not None else None)

        (o, l), g = mx.vjp(f, arrays, [dout.astype(arrays[0].dtype), dlse])
        return {"out": o, "lse": l, **{n: x for n, x in zip(["dq", "dk", "dv", *names], g)}}

    ref = oracle(True, [x.astype(mx.float32) for x in (q, k, v)] + extras)
    naive = oracle(False, [q, k, v] + extras)
    got = {"out": out, "lse": lse, "dq": grads.dq, "dk": grads.dk, "dv": grads.dv}
    if slopes is not None:
        got["dslopes"] = grads.dalibi_slopes
        assert grads.dalibi_slopes.shape == slopes.shape
    if sinks is not None:
        got["dsinks"] = grads.dsinks
        assert grads.dsinks.shape == sinks.shape
    for name in got:
        check_rule(name, got[name], ref[name], naive[name])


@pytest.mark.parametrize("slopes_shape", [None, (3,), (1, 3), (2, 3)])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_alibi_and_sinks_with_their_gradients(arch, slopes_shape, with_sinks):
    if slopes_shape is None and not with_sinks:
        return
    q, k, v = random_qkv(2, 3, 1, 45, 29, 64, dtype=default_dtype(arch), seed=21)
    slopes = None if slopes_shape is None else mx.random.uniform(0.05, 0.5, slopes_shape, key=mx.random.key(4))
    sinks = mx.array([0.5, -1.0, 2.0]) if with_sinks else None
    check_alibi_and_sinks(q, k, v, slopes, sinks)


def test_rows_with_no_key_give_zero_and_minus_inf(arch):
    # causal with Nq > Nk: the first Nq - Nk query rows see no key at all
    q, k, v = random_qkv(1, 2, 2, 40, 9, 64, dtype=default_dtype(arch), seed=5)
    got = check(q, k, v, causal=True)
    assert np.all(np.array(got["out"][:, :, :31].astype(mx.float32)) == 0)
    assert np.all(np.isneginf(np.array(got["lse"][:, :, :31])))
    assert np.all(np.array(got["dq"][:, :, :31].astype(mx.float32)) == 0)
    for name in ("dq", "dk", "dv"):
        assert np.isfinite(np.array(got[name].astype(mx.float32))).all()


def test_unsupported_calls_are_declined():
    q, k, v = random_qkv(1, 2, 1, 8, 8, 64)
    inputs = AttentionInputs(q, k, v)
    assert kernels.unsupported_reason("emulator", AttentionSpec(scale=0.1, has_bias=True), inputs) is not None
    assert kernels.unsupported_reason("emulator", AttentionSpec(scale=0.1, dropout_p=0.1), inputs) is not None
    assert kernels.unsupported_reason("emulator", AttentionSpec(scale=0.1, varlen=True), inputs) is not None
    q, k, v = random_qkv(1, 2, 1, 8, 8, 64, Dv=32)
    assert "Dv" in kernels.unsupported_reason("emulator", AttentionSpec(scale=0.1), AttentionInputs(q, k, v))
    q, k, v = random_qkv(1, 1, 1, 4, 4, 320)
    assert "256" in kernels.unsupported_reason("emulator", AttentionSpec(scale=0.1), AttentionInputs(q, k, v))
    q, k, v = random_qkv(8, 8, 8, 1024, 1024, 16)
    assert "small shapes" in kernels.unsupported_reason("emulator", AttentionSpec(scale=0.1), AttentionInputs(q, k, v))
    with pytest.raises(ValueError, match="cannot run"):
        kernels.forward("emulator", AttentionSpec(scale=0.1, has_bias=True), AttentionInputs(*random_qkv(1, 1, 1, 4, 4, 64)))
    with pytest.raises(ValueError, match="target"):
        kernels.is_available("vulkan")


def test_metal_tiles_fit_threadgroup_memory():
    for D in kernels.blocks.HEAD_DIMS:
        for dtype in (mx.float16, mx.bfloat16):
            blocks = kernels.BlockSizes.default(D, dtype, "metal")
            for name, tiles in (("attention_fwd", blocks.fwd), ("attention_bwd_dq", blocks.dq),
                                ("attention_bwd_dkdv", blocks.dkdv)):
                assert tiles is not None, (D, dtype, name)
                assert kernels.blocks.shared_bytes(name, tiles, D, dtype.size) <= 32 * 1024
