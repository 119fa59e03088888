"""mfa.nn layers against plain-MLX layers built from naive attention: outputs, parameter gradients,
packed varlen input, and generation with a KV cache."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mfa
from mfa.nn import Attention, CausalLM, ModelConfig, MultiHeadAttention, apply_lora
from mfa.serving import KVCache


def naive_attention(q, k, v, scale, causal=False, window=None, softcap=None, bias=None):
    """Textbook attention on ``(B, H, N, D)`` arrays, K/V repeated for GQA."""
    H, Hkv = q.shape[1], k.shape[1]
    k, v = mx.repeat(k, H // Hkv, axis=1), mx.repeat(v, H // Hkv, axis=1)
    s = (q @ k.swapaxes(-1, -2)) * scale
    if softcap is not None:
        s = softcap * mx.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    Nq, Nk = s.shape[-2:]
    i = mx.arange(Nq)[:, None] + Nk - Nq
    j = mx.arange(Nk)[None]
    keep = mx.ones((Nq, Nk), dtype=mx.bool_)
    if causal:
        keep = keep & (j <= i)
    if window is not None:
        keep = keep & (j >= i - window[0]) & (j <= i + window[1])
    s = mx.where(keep, s, -mx.inf)
    return mx.softmax(s, axis=-1) @ v


class NaiveAttention(Attention):
    """The same parameters as `mfa.nn.Attention`, computed with plain MLX ops per document."""

    def __call__(self, x, mask=None, cache=None, cu_seqlens=None):
        if cu_seqlens is not None:
            cu = cu_seqlens.tolist()
            parts = [self(x[:, a:b], mask) for a, b in zip(cu[:-1], cu[1:]) if b > a]
            return mx.concatenate(parts, axis=1)
        B, N, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, N, H, D).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, N, Hkv, D).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, N, Hkv, D).transpose(0, 2, 1, 3)
        q, k = self._rope(q, 0), self._rope(k, 0)
        bias = mask if isinstance(mask, mx.array) else None
        out = naive_attention(q, k, v, self.scale, mask == "causal" if isinstance(mask, str) else False,
                              self.window, self.softcap, bias)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, N, H * D))


def naive_twin(layer: Attention) -> NaiveAttention:
    """A `NaiveAttention` with ``layer``'s hyper-parameters and weights."""
    twin = NaiveAttention(layer.q_proj.weight.shape[1], layer.num_heads, layer.num_kv_heads, layer.head_dim,
                          rope=layer.use_rope, rope_base=layer.rope_base, window=layer.window, softcap=layer.softcap)
    twin.update(layer.parameters())
    return twin


def naive_model(model: CausalLM) -> CausalLM:
    """A copy of ``model`` whose attention layers are `NaiveAttention` twins."""
    twin = CausalLM(model.config)
    twin.update(model.parameters())
    for block in twin.layers:
        block.attention = naive_twin(block.attention)
    return twin


def loss_and_grads(module, *args, **kwargs):
    """Sum-of-squares loss of ``module(*args)`` and its parameter gradients (via nn.value_and_grad)."""
    loss_fn = lambda *a: (module(*a, **kwargs).astype(mx.float32) ** 2).sum()  # noqa: E731
    loss, grads = nn.value_and_grad(module, loss_fn)(*args)
    mx.eval(loss, grads)
    return loss, dict(tree_flatten(grads))


def assert_close(a, b, tol=2e-5):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, atol=tol * scale, rtol=tol)


def assert_grads_close(g, g_ref, tol=2e-5):
    assert g.keys() == g_ref.keys()
    for name in g:
        assert_close(g[name], g_ref[name], tol)


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, mask, window, softcap",
    [
        (4, 4, None, None, None),
        (4, 2, "causal", None, None),
        (4, 1, "causal", (3, 0), None),
        (2, 2, None, None, 5.0),
    ],
)
def test_attention_matches_naive(num_heads, num_kv_heads, mask, window, softcap):
    mx.random.seed(0)
    layer = Attention(32, num_heads, num_kv_heads, window=window, softcap=softcap)
    x = mx.random.normal((2, 11, 32))
    loss, grads = loss_and_grads(layer, x, mask=mask)
    loss_ref, grads_ref = loss_and_grads(naive_twin(layer), x, mask=mask)
    assert_close(layer(x, mask=mask), naive_twin(layer)(x, mask=mask))
    assert_close(loss, loss_ref)
    assert_grads_close(grads, grads_ref)


def test_attention_additive_bias_and_block_mask():
    mx.random.seed(1)
    layer = Attention(32, 4, 2)
    x = mx.random.normal((1, 16, 32))
    bias = mx.random.normal((1, 4, 16, 16))
    assert_close(layer(x, mask=bias), naive_twin(layer)(x, mask=bias))
    # a boolean keep-mask and a BlockMask from the same predicate (a prefix-LM) agree with the naive layer
    q_idx, kv_idx = mx.arange(16)[:, None], mx.arange(16)[None]
    keep = (kv_idx <= q_idx) | (kv_idx < 5)
    block_mask = mfa.BlockMask.from_mask_mod(lambda b, h, q, kv: (kv <= q) | (kv < 5), 1, 1, 16, 16, block_size=4)
    expected = naive_twin(layer)(x, mask=mx.where(keep, 0.0, -mx.inf))
    assert_close(layer(x, mask=keep), expected)
    assert_close(layer(x, mask=block_mask), expected)


def test_packed_varlen_equals_separate_documents():
    mx.random.seed(2)
    layer = Attention(32, 4, 2)
    lengths = [5, 0, 9, 1, 7]
    cu = mx.array(np.concatenate([[0], np.cumsum(lengths)]), dtype=mx.int32)
    x = mx.random.normal((1, sum(lengths), 32))
    packed = layer(x, mask="causal", cu_seqlens=cu)
    c = cu.tolist()
    for a, b in zip(c[:-1], c[1:]):
        if b > a:
            assert_close(packed[:, a:b], layer(x[:, a:b], mask="causal"))
    loss, grads = loss_and_grads(layer, x, mask="causal", cu_seqlens=cu)
    loss_ref, grads_ref = loss_and_grads(naive_twin(layer), x, mask="causal", cu_seqlens=cu)
    assert_close(loss, loss_ref)
    assert_grads_close(grads, grads_ref)


def test_causal_lm_loss_and_grads_match_naive_model():
    mx.random.seed(3)
    model = CausalLM(ModelConfig(vocab_size=50, dims=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dims=48))
    tokens = mx.random.randint(0, 50, (1, 24))

    def xent(m, t, cu_seqlens):
        logits = m(t[:, :-1], cu_seqlens=cu_seqlens)
        return nn.losses.cross_entropy(logits, t[:, 1:], reduction="mean")

    for cu_seqlens in (None, mx.array([0, 10, 23], dtype=mx.int32)):
        results = []
        for m in (model, naive_model(model)):
            loss, grads = nn.value_and_grad(m, lambda t: xent(m, t, cu_seqlens))(tokens)
            mx.eval(loss, grads)
            results.append((loss, dict(tree_flatten(grads))))
        (loss, grads), (loss_ref, grads_ref) = results
        assert_close(loss, loss_ref)
        assert_grads_close(grads, grads_ref)


class ConcatCache:
    """The smallest mlx-lm style cache: ``offset`` and ``update_and_fetch`` by concatenation."""

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update_and_fetch(self, k, v):
        self.keys = k if self.keys is None else mx.concatenate([self.keys, k], axis=2)
        self.values = v if self.values is None else mx.concatenate([self.values, v], axis=2)
        self.offset += k.shape[2]
        return self.keys, self.values


@pytest.mark.parametrize("make_cache", [ConcatCache, KVCache], ids=["mlx-lm-protocol", "mfa.serving.KVCache"])
def test_generation_with_kv_cache_equals_full_forward(make_cache):
    mx.random.seed(4)
    model = CausalLM(ModelConfig(vocab_size=40, dims=32, num_layers=2, num_heads=4, num_kv_heads=1))
    tokens = mx.random.randint(0, 40, (2, 13))
    full = model(tokens)
    cache = [make_cache() for _ in model.layers]
    # prefill 6 tokens, then one token at a time
    steps = [model(tokens[:, :6], cache=cache)]
    steps += [model(tokens[:, t : t + 1], cache=cache) for t in range(6, 13)]
    assert_close(mx.concatenate(steps, axis=1), full, tol=1e-4)


def test_multihead_attention_is_a_drop_in_for_mlx():
    mx.random.seed(5)
    ours = MultiHeadAttention(32, 4, key_input_dims=24, value_dims=16, value_output_dims=20)
    stock = nn.MultiHeadAttention(32, 4, key_input_dims=24, value_dims=16, value_output_dims=20)
    stock.update(ours.parameters())
    q, kv = mx.random.normal((2, 7, 32)), mx.random.normal((2, 9, 24))
    for mask in (None, mx.random.normal((7, 9)), "causal"):
        assert_close(ours(q, kv, kv, mask=mask), stock(q, kv, kv, mask=mask))
        _, grads = loss_and_grads(ours, q, kv, kv, mask=mask)
        _, grads_ref = loss_and_grads(stock, q, kv, kv, mask=mask)
        assert_grads_close(grads, grads_ref)


def test_lora_starts_at_the_base_model_and_trains_only_adapters():
    mx.random.seed(6)
    model = CausalLM(ModelConfig(vocab_size=30, dims=32, num_layers=1, num_heads=2))
    tokens = mx.random.randint(0, 30, (1, 9))
    before = model(tokens)
    apply_lora(model, rank=4)
    assert_close(model(tokens), before)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(name.split(".")[-1] in ("lora_a", "lora_b") for name in trainable)
    assert len(trainable) == 2 * 4  # q, k, v, o projections of the one block


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Attention(32, 4, 3), "num_heads=4"),
        (lambda: Attention(30, 4), "dims=30"),
        (lambda: Attention(32, 4)(mx.zeros((2, 3, 32)), cu_seqlens=mx.array([0, 3], dtype=mx.int32)), "batch size 1"),
        (lambda: Attention(32, 4)(mx.zeros((1, 3, 32)), mask="diagonal"), "mask='diagonal'"),
        (lambda: Attention(32, 4)(mx.zeros((1, 3, 32)), cache=KVCache(), cu_seqlens=mx.array([0, 3], dtype=mx.int32)),
         "KV cache"),
        (lambda: apply_lora(CausalLM(ModelConfig(num_layers=1, dims=16, num_heads=2)), targets=("nope",)), "nope"),
    ],
)
def test_bad_input_raises_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()
