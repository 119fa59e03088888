"""The native kernels on the GPU targets present (cuda on an NVIDIA GPU, metal on a Mac).

Same checks as the emulator tests, at sizes that span many tiles.  Skipped where no GPU target
is present (this suite then runs on the GPU machine: see the README's developer section).  The
variants come first, the dense cases after (a time-bounded run reports the newest code first).
"""

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_qkv
from test_kernels_emulator import check

import mfa
from mfa import BlockMask, kernels

TARGETS = [t for t in ("cuda", "metal") if kernels.is_available(t)]
pytestmark = pytest.mark.skipif(not TARGETS, reason="no GPU target (cuda/metal) on this machine")


@pytest.fixture(params=TARGETS)
def target(request):
    return request.param


@pytest.mark.parametrize("slopes_shape,with_sinks", [((4,), False), (None, True), ((2, 4), True)])
def test_alibi_and_sinks(target, slopes_shape, with_sinks):
    q, k, v = random_qkv(2, 4, 2, 600, 555, 64, dtype=mx.bfloat16, seed=23)
    slopes = None if slopes_shape is None else mx.random.uniform(0.05, 0.5, slopes_shape, key=mx.random.key(4))
    sinks = mx.array([0.5, -1.0, 2.0, 0.0]) if with_sinks else None
    check(q, k, v, True, target=target, scale=0.2, window=(300, -1), slopes=slopes, sinks=sinks)


@pytest.mark.parametrize("shape", [(2, 4, 600, 555), (1, 4, 600, 555), (2, 4, 600, 1), (2, 1, 1, 555),
                                   (1, 1, 1, 1)])
def test_bias_and_dbias(target, shape):
    q, k, v = random_qkv(2, 4, 2, 600, 555, 64, dtype=mx.bfloat16, seed=29)
    bias = mx.random.normal(shape, key=mx.random.key(5)).astype(mx.bfloat16)
    check(q, k, v, True, target=target, window=(200, -1), bias=bias)


@pytest.mark.parametrize("shape,dtype", [((2, 4, 600, 560), mx.bfloat16), ((1, 4, 600, 560), mx.bfloat16),
                                         ((2, 4, 600, 560), mx.float32)])
@pytest.mark.parametrize("window", [None, (200, 100)])
def test_staged_bias_and_dbias(target, shape, dtype, window):
    """Biases staged tile by tile through shared memory (BIAS_TILE), with plain and atomic dbias."""
    q, k, v = random_qkv(2, 4, 2, 600, 560, 64, dtype=mx.bfloat16, seed=31)
    bias = mx.random.normal(shape, key=mx.random.key(6)).astype(dtype)
    check(q, k, v, False, target=target, window=window, bias=bias)


@pytest.mark.parametrize("blocks", ["fwd=64x64x4x2x0x1,dq=64x64x4x2x0x2,dkdv=64x64x4x2x0x3",
                                    "fwd=64x64x4x1x4x1,dkdv=64x64x4x1x3x1"])
@pytest.mark.parametrize("form", ["auto", "split"])
def test_staged_bias_copied_ahead(target, monkeypatch, blocks, form):
    """Staged bias tiles copied 1-3 tiles ahead of the others (`Tiles.bias_lead`), also with one
    K/V stage under a register cap; a full bias and a per-head one (the dq kernel's batch loop)."""
    monkeypatch.setenv("MFA_BLOCKS", blocks if target == "cuda" else "")
    monkeypatch.setenv("MFA_BWD", form)
    q, k, v = random_qkv(2, 4, 2, 600, 560, 64, dtype=mx.bfloat16, seed=39)
    for shape in [(2, 4, 600, 560), (1, 4, 600, 560)]:
        bias = mx.random.normal(shape, key=mx.random.key(8)).astype(mx.bfloat16)
        check(q, k, v, True, target=target, window=(300, 40), bias=bias)


@pytest.mark.parametrize("window", [None, (200, 100)])
def test_full_bias_dbias_from_the_dq_kernel(target, monkeypatch, window):
    """$MFA_BWD=split: a full bias's dbias comes from the dq kernel (by default the dk/dv kernel
    writes it and dq is its matmul with k, as in test_staged_bias_and_dbias)."""
    monkeypatch.setenv("MFA_BWD", "split")
    q, k, v = random_qkv(2, 4, 2, 600, 560, 64, dtype=mx.bfloat16, seed=37)
    bias = mx.random.normal((2, 4, 600, 560), key=mx.random.key(7)).astype(mx.bfloat16)
    check(q, k, v, True, target=target, window=window, bias=bias)


@pytest.mark.parametrize("case", ["causal gqa", "window dropout", "varlen", "block-sparse"])
def test_fused_dq_backward(target, monkeypatch, case):
    """$MFA_BWD=fused (dq by atomic adds in the dk/dv kernel) at sizes that span many tiles."""
    monkeypatch.setenv("MFA_BWD", "fused")
    if case == "varlen":
        lengths = [700, 0, 65, 1, 300]
        q, k, v = random_qkv(1, 4, 2, sum(lengths), sum(lengths), 64, dtype=mx.bfloat16, seed=41)
        check(q, k, v, True, target=target, lengths=(lengths, lengths))
        return
    q, k, v = random_qkv(2, 4, 2, 600, 555, 64, dtype=mx.bfloat16, seed=43)
    if case == "causal gqa":
        check(q, k, v, True, target=target)
    elif case == "window dropout":
        check(q, k, v, True, target=target, window=(200, 30), dropout_p=0.1, dropout_seed=2)
    else:
        mask = BlockMask.from_mask_mod(lambda b, h, i, j: (i // 64 + j // 64) % 3 != 1, 1, 1, 600, 555,
                                       block_size=64)
        check(q, k, v, target=target, block_mask=mask)


@pytest.mark.parametrize("lengths", [[700, 0, 65, 1, 300], [128, 256, 0, 64]])
def test_varlen(target, lengths):
    lengths_k = [n + 17 * (i % 2) for i, n in enumerate(lengths)]
    q, k, v = random_qkv(1, 4, 2, sum(lengths), sum(lengths_k), 64, dtype=mx.bfloat16, seed=len(lengths))
    slopes = mx.random.uniform(0.05, 0.3, (len(lengths), 4), key=mx.random.key(6))
    check(q, k, v, True, target=target, window=(150, 0), slopes=slopes, lengths=(lengths, lengths_k))


def test_block_sparse(target):
    N = 1000
    doc = mx.array(np.repeat(np.arange(5), [300, 100, 250, 50, 300]).astype(np.int32))
    mask = BlockMask.from_mask_mod(lambda b, h, i, j: (doc[i] == doc[j]) & (j <= i + h), 1, 4, N, N, block_size=128)
    q, k, v = random_qkv(2, 4, 2, N, N, 64, dtype=mx.bfloat16, seed=31)
    check(q, k, v, target=target, block_mask=mask)


def test_dropout(target):
    q, k, v = random_qkv(2, 4, 2, 500, 700, 64, dtype=mx.bfloat16, seed=37)
    check(q, k, v, True, target=target, dropout_p=0.2, dropout_seed=99)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(1, 300), (257, 1000), (1000, 257), (512, 512), (1031, 1031)])
def test_lengths_and_causal(target, causal, Nq, Nk):
    q, k, v = random_qkv(2, 4, 2, Nq, Nk, 64, dtype=mx.bfloat16, seed=Nq + 3 * Nk)
    check(q, k, v, causal, target=target)


@pytest.mark.parametrize(
    "D,Dv,dtype",
    [(D, D, mx.bfloat16) for D in (32, 64, 80, 96, 128, 192, 256)]
    + [(64, 64, mx.float16), (128, 128, mx.float16), (128, 64, mx.bfloat16)],
)
def test_head_dims_and_dtypes(target, D, Dv, dtype):
    q, k, v = random_qkv(1, 4, 1, 333, 444, D, Dv, dtype=dtype, seed=D)
    check(q, k, v, causal=True, target=target)


@pytest.mark.parametrize("window,softcap", [((256, 0), None), ((100, 50), None), (None, 20.0), ((64, 0), 5.0)])
def test_window_and_softcap(target, window, softcap):
    q, k, v = random_qkv(2, 4, 2, 700, 900, 64, dtype=mx.bfloat16, seed=17)
    check(q, k, v, causal=False, window=window, softcap=softcap, target=target)


def _vjp_bits(target, q, k, v, dout, extra, **options):
    """out and the gradients of one `mfa.flash_attention` call on `target` (mx.vjp with cotangent
    dout), as float32 numpy arrays (bf16 converts exactly), evaluated."""
    def attend(q, k, v, *xs):
        return mfa.flash_attention(q, k, v, backend=target, **dict(zip(extra, xs)), **options)

    (out,), grads = mx.vjp(attend, [q, k, v, *extra.values()], [dout])
    return [np.array(x.astype(mx.float32)) for x in (out, *grads)]


DETERMINISTIC_CASES = {
    "causal gqa": dict(causal=True),
    "window dropout": dict(window=(200, 30), dropout_p=0.1, dropout_seed=5),
    # without GQA at D = 64, CUDA's default fuses the dropout backward (atomic dq adds) unless
    # deterministic=True keeps it split
    "causal dropout mha": dict(causal=True, dropout_p=0.1, dropout_seed=3, kv_heads=4),
    "full bias": dict(bias=(2, 4, 600, 560)),  # dbias stored by the dk/dv kernel, dq its matmul
    "per-row bias": dict(bias=(2, 4, 600, 1), causal=True),  # dbias rows stored by the dq kernel
    "block-sparse": dict(block_mask="mod"),
}


@pytest.mark.parametrize("case", sorted(DETERMINISTIC_CASES))
def test_backward_is_deterministic(target, case, monkeypatch):
    """deterministic=True: the backward writes dq, dk, dv (and a dbias with one writer an entry)
    with plain stores, no atomics, so repeated calls give the same bits (what flash_attn's ``deterministic`` asks for).  A race
    between warps, or a reduction order that depends on scheduling, shows up here as differing
    bits.  The form is pinned to the default: ``$MFA_BWD=fused`` adds dq with atomics
    (`mfa.kernels.atomic_adds`), so the call would be refused.  ("window dropout" has GQA, whose
    backward is split anyway; "causal dropout mha" is the case CUDA's default fuses, and
    test_dropout_backward_is_fused_by_default_on_cuda checks which kernels the emulator launches.)"""
    monkeypatch.setenv("MFA_BWD", "auto")
    options = dict(DETERMINISTIC_CASES[case], deterministic=True)
    q, k, v = random_qkv(2, 4, options.pop("kv_heads", 2), 600, 560, 64, dtype=mx.bfloat16, seed=47)
    dout = mx.random.normal(q.shape, key=mx.random.key(8)).astype(mx.bfloat16)
    extra = {}
    if "bias" in options:
        extra["bias"] = mx.random.normal(options.pop("bias"), key=mx.random.key(9)).astype(mx.bfloat16)
    if options.get("block_mask") == "mod":
        options["block_mask"] = BlockMask.from_mask_mod(lambda b, h, i, j: (i // 64 + j // 64) % 3 != 1,
                                                        1, 1, 600, 560, block_size=64)
    first = _vjp_bits(target, q, k, v, dout, extra, **options)
    for _ in range(2):
        again = _vjp_bits(target, q, k, v, dout, extra, **options)
        for name, a, b in zip(["out", "dq", "dk", "dv", *(f"d{n}" for n in extra)], first, again):
            assert np.array_equal(a, b), f"{case}: {name} differs between runs"
