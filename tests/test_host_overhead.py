"""The host-side caches of a native call still follow the environment and the call's shapes.

Block sizes, the native support check, the spec and the per-call constant buffers are cached by
key; these tests change ``$MFA_BLOCKS``, ``$MFA_EMULATOR_ARCH`` and ``$MFA_KERNEL_VERBOSE``
between calls and check that each change takes effect; others check the shape of the lazy graph
a call builds.  No kernel runs: the CUDA launches are recorded (`mfa.kernels.offline`).
"""

import mlx.core as mx
import numpy as np
import pytest

import mfa
from mfa import kernels
from mfa.kernels import attention, build, offline
from mfa.ops import checks, routing
from mfa.ops.spec import AttentionInputs, AttentionSpec


def _qkv(N=32, D=64, dtype=mx.bfloat16):
    q = mx.zeros((1, 2, N, D), dtype)
    return q, q, q


def _spec(**options):
    defaults = dict(scale=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None,
                    dropout_p=0.0, dropout_seed=0, backend="cuda")
    return checks.checked_spec(64, 2, 1, **{**defaults, **options})


def _forward_and_backward(spec, inputs):
    out, lse = kernels.forward("cuda", spec, inputs)
    kernels.backward("cuda", spec, inputs, out, lse, out, None)


def test_block_sizes_follow_mfa_blocks(monkeypatch):
    monkeypatch.delenv("MFA_BLOCKS", raising=False)
    default = attention.block_sizes("cuda", 64, mx.bfloat16)
    monkeypatch.setenv("MFA_BLOCKS", "fwd=32x32x2x1")
    tuned = attention.block_sizes("cuda", 64, mx.bfloat16)
    assert tuned.fwd == kernels.Tiles(32, 32, 2, 1) != default.fwd
    assert (tuned.dq, tuned.dkdv) == (default.dq, default.dkdv)
    monkeypatch.setenv("MFA_BLOCKS", "bwd=32x32x2")
    with pytest.raises(ValueError, match="unknown kernel 'bwd'"):
        attention.block_sizes("cuda", 64, mx.bfloat16)
    with pytest.raises(ValueError, match="unknown kernel 'bwd'"):  # errors are never cached
        attention.block_sizes("cuda", 64, mx.bfloat16)
    monkeypatch.delenv("MFA_BLOCKS")
    assert attention.block_sizes("cuda", 64, mx.bfloat16) == default


def test_recorded_launches_follow_mfa_blocks(monkeypatch):
    spec, inputs = _spec(causal=True), AttentionInputs(*_qkv())
    monkeypatch.delenv("MFA_BLOCKS", raising=False)
    default = offline.record_cuda_launches(_forward_and_backward, spec, inputs)
    monkeypatch.setenv("MFA_BLOCKS", "fwd=32x32x2x1,dq=32x32x2x1,dkdv=32x32x2x1")
    tuned = offline.record_cuda_launches(_forward_and_backward, spec, inputs)
    names = ["attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"]
    assert [c[0] for c in default] == [c[0] for c in tuned] == names
    block_q = lambda call: dict(call[1]).get("BQ")  # noqa: E731
    assert [block_q(c) for c in tuned] == [32, 32, 32]
    assert [block_q(c) for c in default] != [block_q(c) for c in tuned]


def test_unsupported_reason_follows_the_environment(monkeypatch):
    q = mx.zeros((1, 1, 16, 256), mx.float32)
    inputs, spec = AttentionInputs(q, q, q), AttentionSpec(scale=0.1)
    monkeypatch.setenv("MFA_EMULATOR_ARCH", "metal")
    monkeypatch.delenv("MFA_BLOCKS", raising=False)
    assert "threadgroup memory" in kernels.unsupported_reason("emulator", spec, inputs)
    monkeypatch.setenv("MFA_BLOCKS", "fwd=8x8x1,dq=8x8x1,dkdv=8x8x1")
    assert kernels.unsupported_reason("emulator", spec, inputs) is None
    monkeypatch.setenv("MFA_EMULATOR_ARCH", "cuda")
    assert "float32" in kernels.unsupported_reason("emulator", spec, inputs)
    monkeypatch.setenv("MFA_EMULATOR_ARCH", "metal")
    monkeypatch.delenv("MFA_BLOCKS")
    assert "threadgroup memory" in kernels.unsupported_reason("emulator", spec, inputs)
    big = mx.zeros((1, 1, 4096, 64), mx.float32)
    assert "small shapes" in kernels.unsupported_reason("emulator", spec, AttentionInputs(big, big, big))


def test_kernel_verbose_is_read_at_each_launch(monkeypatch):
    seen = []

    class Kernel:
        def __call__(self, *, output_shapes, output_dtypes, verbose, **_):
            seen.append(verbose)
            return [mx.zeros(s, t) for s, t in zip(output_shapes, output_dtypes)]

    monkeypatch.setattr(build, "kernel", lambda *args: Kernel())
    spec, inputs = _spec(), AttentionInputs(*_qkv())
    monkeypatch.delenv("MFA_KERNEL_VERBOSE", raising=False)
    kernels.forward("cuda", spec, inputs)
    monkeypatch.setenv("MFA_KERNEL_VERBOSE", "1")
    kernels.forward("cuda", spec, inputs)
    monkeypatch.setenv("MFA_KERNEL_VERBOSE", "0")
    kernels.forward("cuda", spec, inputs)
    assert seen == [False, True, False]


def test_checked_spec_is_shared_and_still_checks():
    first = _spec(causal=True, window=(8, 0))
    assert _spec(causal=1, window=[8, 0]) is first  # normalized before the cache: a list window works
    assert _spec(causal=True, window=(8, 1)) != first
    assert _spec(scale=0.5).scale == 0.5 and _spec().scale == 64**-0.5
    for bad in (dict(window=(8, -2)), dict(softcap=-1.0), dict(dropout_p=1.0), dict(backend="vulkan"),
                dict(scale="0.5"), dict(window=[8])):
        with pytest.raises(ValueError):
            _spec(**bad)


def test_call_constants_follow_the_call():
    spec = _spec(causal=True)
    small, large = AttentionInputs(*_qkv(N=32)), AttentionInputs(*_qkv(N=48))
    params = lambda inputs: np.array(attention.Call.of(spec, inputs).params)  # noqa: E731
    assert params(small)[2:4].tolist() == [32, 32]
    assert params(large)[2:4].tolist() == [48, 48]
    sinks = mx.array([0.5, -1.0], mx.bfloat16)
    call = attention.Call.of(_spec(sinks=sinks), AttentionInputs(*_qkv(), sinks=sinks))
    assert np.array(call.params)[6] == 1 and call.sinks.dtype == mx.float32
    bias = mx.zeros((1, 2, 1, 32))
    call = attention.Call.of(_spec(has_bias=True), AttentionInputs(*_qkv(), bias=bias))
    assert call.bias_layout.mode == attention.DBIAS_KEYS and call.bias is bias


def test_routed_native_call_checks_and_logs_each_time(monkeypatch, capsys):
    monkeypatch.setattr(build, "is_available", lambda target: True)
    q, k, v = _qkv()
    monkeypatch.setenv("MFA_LOG", "1")
    offline.record_cuda_launches(lambda: mfa.flash_attention(q, k, v, causal=True, backend="cuda"))
    assert "backend=cuda" in capsys.readouterr().err
    monkeypatch.setenv("MFA_LOG", "0")
    offline.record_cuda_launches(lambda: mfa.flash_attention(q, k, v, causal=True, backend="cuda"))
    assert capsys.readouterr().err == ""
    with pytest.raises(NotImplementedError, match="exceed 256"):
        mfa.flash_attention(*_qkv(D=320), backend="cuda")
    assert routing.choose("cuda", _spec(), AttentionInputs(q, k, v), False).backend == "cuda"


def test_lse_cotangent_is_read_only_when_lse_is_returned():
    """Without return_lse the zeros MLX passes as lse's cotangent are ignored (DLSE = 0, nothing to
    fill); with it, the dq kernel reads dlse."""
    q, k, v = _qkv()

    def dlse_flag(return_lse):
        def loss(q):
            if return_lse:
                out, lse = mfa.flash_attention(q, k, v, causal=True, return_lse=True, backend="cuda")
                return out.astype(mx.float32).sum() + lse.sum()
            return mfa.flash_attention(q, k, v, causal=True, backend="cuda").astype(mx.float32).sum()

        calls = offline.record_cuda_launches(lambda: mx.grad(loss)(q))
        return [dict(c[1])["DLSE"] for c in calls if c[0] == "attention_bwd_dq"]

    assert dlse_flag(False) == [0]
    assert dlse_flag(True) == [1]


def _graph_primitives(outputs) -> set:
    """The primitive names in the lazy graph of `outputs` (from ``mx.export_to_dot``)."""
    import re
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        return set(re.findall(r'label ="?([A-Za-z]+)', f.read()))


def test_packed_gradients_have_no_full_size_scatter(monkeypatch):
    """The varlen op and packed `mfa.nn.Attention` reach the kernels without integer indexing of
    the (1, ...) batch axis: ``x[0]`` is a gather in MLX, whose gradient scatters into zeros of the
    whole tensor (0.8 ms of a 3.7 ms varlen fwd+bwd on an H100, and half of a training step)."""

    class Recorder:  # lazy zeros that still depend on the kernel's inputs, so the graph stays whole
        def __call__(self, *, inputs, output_shapes, output_dtypes, **_):
            dep = sum(mx.stop_gradient(x).reshape(-1)[:1].astype(mx.float32).sum() for x in inputs if x.size)
            return [mx.zeros(s, d) + (dep * 0).astype(d) for s, d in zip(output_shapes, output_dtypes)]

    real_available = build.is_available
    monkeypatch.setattr(build, "kernel", lambda *args: Recorder())
    monkeypatch.setattr(build, "is_available", lambda target: target == "cuda" or real_available(target))
    cu = mx.array([0, 20, 48], mx.int32)
    q, k, v, dout = (mx.zeros((48, 2, 64), mx.bfloat16) for _ in range(4))
    varlen = lambda q, k, v: mfa.flash_attention_varlen(q, k, v, cu, cu, causal=True, backend="cuda")  # noqa: E731
    grads = mx.vjp(varlen, [q, k, v], [dout])[1]
    layer = mfa.nn.Attention(128, 2)
    layer.set_dtype(mx.bfloat16)
    x = mx.zeros((1, 48, 128), mx.bfloat16)
    real_varlen = mfa.flash_attention_varlen
    monkeypatch.setattr(mfa, "flash_attention_varlen", lambda *a, **o: real_varlen(*a, **o, backend="cuda"))
    layer_grads = mx.vjp(lambda x: layer(x, cu_seqlens=cu), [x], [x])[1]
    found = _graph_primitives(grads)
    assert "CustomTransforms" in found  # the custom VJP is in the graph
    assert not found & {"Scatter", "ScatterAxis", "Gather", "SliceUpdate"}, found
    found = _graph_primitives(layer_grads)  # (small gathers of the packed positions for RoPE)
    assert "CustomTransforms" in found and not found & {"Scatter", "ScatterAxis"}, found
