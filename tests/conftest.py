"""Shared test helpers: inputs, the tolerance rule and gradient collection.

Tolerance rule (flash-attention's): for every checked quantity ``X`` (out, lse, dq, dk, dv,
dbias, ...), with ``X_ref`` from the float32 oracle on the same (upcast) inputs and ``X_naive``
from the naive op run in the inputs' own low precision::

    max|X_mfa - X_ref|  <=  2 · max|X_naive - X_ref|  +  atol

``atol`` is one rounding to the output dtype at the magnitude of ``X_ref`` plus a float32 floor
(FA3 adds the same kind of term), so float32 runs are held to float32 accuracy.
"""

from __future__ import annotations

import os

# the float32 oracle must be float32: MLX's CUDA matmuls use TF32 unless told otherwise
os.environ.setdefault("MLX_ENABLE_TF32", "0")
from typing import Callable, Dict, Sequence

import mlx.core as mx
import numpy as np
import pytest

from mfa.ops import tiled
from mfa.ops.reference import attention_reference

# tiled tiles small enough that every test shape spans several tiles with ragged edges
TEST_TILES = (16, 32)


def fused_backends() -> list:
    """Backends whose fused forward/backward the suite checks: tiled, plus native targets present.

    ``MFA_TEST_BACKENDS=tiled,emulator,cuda`` overrides the list.
    """
    names = os.environ.get("MFA_TEST_BACKENDS")
    if names:
        return [n for n in names.split(",") if n]
    found = ["tiled"]
    try:
        from mfa import kernels

        found += [t for t in ("emulator", "cuda", "metal") if kernels.is_available(t)]
    except ImportError:
        pass
    return found


def call_or_skip(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, skipping the test when a native target does not cover the call."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as err:
        pytest.skip(str(err))


def random_qkv(B, H, Hkv, Nq, Nk, D, Dv=None, dtype=mx.float32, seed=0):
    """``q (B, H, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)`` with unit normal entries."""
    Dv = D if Dv is None else Dv
    key = mx.random.key(seed)
    kq, kk, kv = mx.random.split(key, 3)
    q = mx.random.normal((B, H, Nq, D), key=kq).astype(dtype)
    k = mx.random.normal((B, Hkv, Nk, D), key=kk).astype(dtype)
    v = mx.random.normal((B, Hkv, Nk, Dv), key=kv).astype(dtype)
    return q, k, v


EPS = {mx.float32: 2.0**-23, mx.bfloat16: 2.0**-7, mx.float16: 2.0**-10}


def rounding_atol(ref: mx.array, dtype) -> float:
    """One rounding of ``ref`` to ``dtype`` (half an ulp at its largest magnitude), plus a float32 floor."""
    finite = mx.where(mx.isfinite(ref), ref, 0.0)
    scale = float(mx.abs(finite).max()) if ref.size else 0.0
    return 0.5 * EPS[dtype] * scale + 1e-5 * (1.0 + scale)


def max_err(a: mx.array, b: mx.array) -> float:
    """max |a - b| over entries, treating equal infinities as equal; inf if the pattern differs."""
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape} != {b.shape}")
    if np.isnan(a).any():
        return float("inf")
    same_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    if (np.isinf(a) != np.isinf(b)).any():
        return float("inf")
    diff = np.abs(np.where(same_inf, 0.0, a) - np.where(same_inf, 0.0, b))
    return float(diff.max()) if diff.size else 0.0


def check_rule(name: str, got: mx.array, ref: mx.array, naive: mx.array) -> None:
    """Assert the tolerance rule for one quantity."""
    err = max_err(got, ref)
    base = max_err(naive, ref)
    atol = rounding_atol(ref, got.dtype)
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 × naive error {base:.3g} + atol {atol:.3g}"


def outputs_and_grads(fn: Callable, arrays: Sequence[mx.array], seed: int = 1) -> Dict[str, mx.array]:
    """``out``, ``lse`` and the gradient of every array under a fixed random loss.

    ``fn(*arrays) -> (out, lse)``; the loss is ``sum(out·dO) + sum(lse·dlse)`` with random
    dO/dlse (lse terms only where lse is finite), so gradients through lse are checked too.
    """
    out, lse = fn(*arrays)
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    d_out = mx.random.normal(out.shape, key=k1)
    d_lse = mx.random.normal(lse.shape, key=k2) * 0.5

    def loss(*xs):
        o, l = fn(*xs)
        l = mx.where(mx.isfinite(l), l, 0.0)
        return (o.astype(mx.float32) * d_out).sum() + (l * d_lse).sum()

    grads = mx.grad(loss, argnums=tuple(range(len(arrays))))(*arrays)
    result = {"out": out, "lse": lse}
    result.update({f"d{i}": g for i, g in enumerate(grads)})
    mx.eval(result)
    return result


def assert_matches_reference(fused: Callable, reference: Callable, arrays: Sequence[mx.array], names=None) -> None:
    """Check ``fused(*arrays)`` against ``reference(*arrays, upcast=...)`` with the tolerance rule.

    Args:
        fused: ``(*arrays) -> (out, lse)`` under test.
        reference: ``(*arrays, upcast: bool) -> (out, lse)``.
        arrays: the differentiable inputs (low precision or float32).
    """
    got = call_or_skip(outputs_and_grads, fused, arrays)
    upcast = [a.astype(mx.float32) for a in arrays]
    ref = outputs_and_grads(lambda *xs: reference(*xs, upcast=True), upcast)
    naive = outputs_and_grads(lambda *xs: reference(*xs, upcast=False), arrays)
    for key in got:
        label = key if names is None or not key.startswith("d") else "d" + names[int(key[1:])]
        check_rule(label, got[key], ref[key], naive[key])


def reference_fn(**options) -> Callable:
    """``(q, k, v, *extras, upcast) -> (out, lse)`` of the oracle with fixed options."""

    def fn(q, k, v, upcast=True):
        return attention_reference(q, k, v, upcast=upcast, **options)

    return fn


@pytest.fixture(autouse=True)
def small_tiles():
    """Every test runs the tiled path with small tiles (many tiles, ragged edges)."""
    with tiled.block_sizes(*TEST_TILES):
        yield
