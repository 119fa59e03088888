"""The native kernels on the GPU targets present (cuda on an NVIDIA GPU, metal on a Mac).

Same checks as the emulator tests, at sizes that span many tiles.  Skipped where no GPU target
is present (this suite then runs on the GPU machine: see the README's developer section).
"""

import mlx.core as mx
import pytest
from conftest import random_qkv
from test_kernels_emulator import check, check_alibi_and_sinks

from mfa import kernels

TARGETS = [t for t in ("cuda", "metal") if kernels.is_available(t)]
pytestmark = pytest.mark.skipif(not TARGETS, reason="no GPU target (cuda/metal) on this machine")


@pytest.fixture(params=TARGETS)
def target(request):
    return request.param


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(1, 300), (257, 1000), (1000, 257), (512, 512), (1031, 1031)])
def test_lengths_and_causal(target, causal, Nq, Nk):
    q, k, v = random_qkv(2, 4, 2, Nq, Nk, 64, dtype=mx.bfloat16, seed=Nq + 3 * Nk)
    check(q, k, v, causal, target=target)


@pytest.mark.parametrize(
    "D,dtype",
    [(D, mx.bfloat16) for D in (32, 64, 80, 96, 128, 192, 256)] + [(64, mx.float16), (128, mx.float16)],
)
def test_head_dims_and_dtypes(target, D, dtype):
    q, k, v = random_qkv(1, 4, 1, 333, 444, D, dtype=dtype, seed=D)
    check(q, k, v, causal=True, target=target)


@pytest.mark.parametrize("window,softcap", [((256, 0), None), ((100, 50), None), (None, 20.0), ((64, 0), 5.0)])
def test_window_and_softcap(target, window, softcap):
    q, k, v = random_qkv(2, 4, 2, 700, 900, 64, dtype=mx.bfloat16, seed=17)
    check(q, k, v, causal=False, window=window, softcap=softcap, target=target)


@pytest.mark.parametrize("slopes_shape,with_sinks", [((4,), False), (None, True), ((2, 4), True)])
def test_alibi_and_sinks(target, slopes_shape, with_sinks):
    q, k, v = random_qkv(2, 4, 2, 600, 555, 64, dtype=mx.bfloat16, seed=23)
    slopes = None if slopes_shape is None else mx.random.uniform(0.05, 0.5, slopes_shape, key=mx.random.key(4))
    sinks = mx.array([0.5, -1.0, 2.0, 0.0]) if with_sinks else None
    check_alibi_and_sinks(q, k, v, slopes, sinks, target=target, window=(300, -1))
