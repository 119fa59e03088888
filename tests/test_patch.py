"""mfa.install / uninstall / installed: mx.fast.scaled_dot_product_attention routed through mfa, opt-in."""

import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mfa

MLX_SDPA = mx.fast.scaled_dot_product_attention


def test_import_does_not_patch():
    code = ("import mlx.core as mx; f = mx.fast.scaled_dot_product_attention; import mfa, mfa.nn; "
            "assert mx.fast.scaled_dot_product_attention is f")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_install_uninstall_and_context_nest():
    assert mx.fast.scaled_dot_product_attention is MLX_SDPA
    mfa.install()
    try:
        assert mx.fast.scaled_dot_product_attention is not MLX_SDPA
        with mfa.installed():
            assert mx.fast.scaled_dot_product_attention is not MLX_SDPA
        assert mx.fast.scaled_dot_product_attention is not MLX_SDPA  # the outer install still holds
    finally:
        mfa.uninstall()
    assert mx.fast.scaled_dot_product_attention is MLX_SDPA
    with pytest.raises(RuntimeError, match="without a matching"):
        mfa.uninstall()
    with pytest.raises(KeyError):
        with mfa.installed():
            raise KeyError("boom")
    assert mx.fast.scaled_dot_product_attention is MLX_SDPA


def test_installed_routes_calls_through_mfa(monkeypatch):
    calls = []
    mfa_sdpa = mfa.scaled_dot_product_attention
    monkeypatch.setattr(mfa, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or mfa_sdpa(*a, **k))
    q = mx.random.normal((1, 2, 5, 16))
    with mfa.installed():
        mx.eval(mx.fast.scaled_dot_product_attention(q, q, q, scale=0.25, mask="causal"))
    mx.eval(mx.fast.scaled_dot_product_attention(q, q, q, scale=0.25, mask="causal"))
    assert len(calls) == 1 and calls[0]["mask"] == "causal"


@pytest.mark.parametrize("backend_mask", ["causal", "additive", "bool", None])
def test_stock_mlx_layer_trains_identically_through_mfa(backend_mask):
    """An unmodified mlx.nn.MultiHeadAttention gives the same loss and gradients with mfa installed."""
    mx.random.seed(0)
    layer = nn.MultiHeadAttention(32, 4)
    x = mx.random.normal((2, 9, 32))
    masks = {
        "causal": "causal",
        "additive": nn.MultiHeadAttention.create_additive_causal_mask(9),
        "bool": mx.tril(mx.ones((9, 9), dtype=mx.bool_)),
        None: None,
    }
    mask = masks[backend_mask]
    loss_fn = lambda x: (layer(x, x, x, mask=mask) ** 2).sum()  # noqa: E731
    stock = nn.value_and_grad(layer, loss_fn)(x)
    with mfa.installed():
        routed = nn.value_and_grad(layer, loss_fn)(x)
    mx.eval(stock, routed)
    np.testing.assert_allclose(np.array(routed[0]), np.array(stock[0]), rtol=1e-5)
    for (name, g), (_, g_ref) in zip(tree_flatten(routed[1]), tree_flatten(stock[1])):
        np.testing.assert_allclose(np.array(g), np.array(g_ref), rtol=1e-4, atol=1e-5, err_msg=name)


def test_installed_differentiates_the_mask():
    """MLX cannot differentiate SDPA w.r.t. an additive mask on every device; through mfa it can."""
    mx.random.seed(1)
    q, k, v = (mx.random.normal((1, 2, 6, 8)) for _ in range(3))
    bias = mx.random.normal((1, 2, 6, 6))

    def naive(bias):
        return ((mx.softmax(q @ k.swapaxes(-1, -2) * 0.3 + bias, axis=-1) @ v) ** 2).sum()

    def through_sdpa(bias):
        return (mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=bias) ** 2).sum()

    with mfa.installed():
        dbias = mx.grad(through_sdpa)(bias)
    np.testing.assert_allclose(np.array(dbias), np.array(mx.grad(naive)(bias)), rtol=1e-4, atol=1e-5)
