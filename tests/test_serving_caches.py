"""Cache bookkeeping: KVCache/QuantizedKVCache protocol, page pool refcounts, paged writes, fork copy-on-write."""

import mlx.core as mx
import numpy as np
import pytest

from mfa.ops.reference import attention_reference
from mfa.serving import KVCache, PagedKVCache, PagePool, PoolFullError, PrefixCache, QuantizedKVCache, RotatingKVCache


def _rand(shape, seed):
    return mx.random.normal(shape, key=mx.random.key(seed))


def test_kvcache_update_and_fetch_grows_in_steps():
    cache = KVCache(step=4)
    k, v = _rand((2, 3, 7, 8), 0), _rand((2, 3, 7, 5), 1)
    keys, values = cache.update_and_fetch(k[:, :, :3], v[:, :, :3])
    assert keys.shape == (2, 3, 3, 8) and cache.keys.shape[2] == 4
    keys, values = cache.update_and_fetch(k[:, :, 3:], v[:, :, 3:])
    assert cache.offset == 7 and cache.keys.shape[2] == 8 and values.shape == (2, 3, 7, 5)
    np.testing.assert_array_equal(np.array(keys), np.array(k))
    np.testing.assert_array_equal(np.array(values), np.array(v))
    assert cache.trim(2) == 2 and cache.offset == 5
    with pytest.raises(ValueError, match="do not match"):
        cache.update_and_fetch(k[:1], v[:1])
    with pytest.raises(ValueError, match="empty"):
        KVCache().kv_view()


def test_kvcache_to_quantized_keeps_tokens():
    cache = KVCache()
    k, v = _rand((1, 2, 10, 32), 2), _rand((1, 2, 10, 32), 3)
    cache.update_and_fetch(k, v)
    qc = cache.to_quantized(group_size=32, bits=8)
    assert qc.offset == 10
    kd = mx.dequantize(*qc.keys, group_size=32, bits=8)[:, :, :10]
    assert mx.abs(kd - k).max().item() < 0.05


def test_quantized_cache_bad_config_raises():
    with pytest.raises(ValueError, match="bits"):
        QuantizedKVCache(bits=3)
    with pytest.raises(ValueError, match="divisible by group_size"):
        QuantizedKVCache(group_size=64).update_and_fetch(_rand((1, 1, 2, 48), 0), _rand((1, 1, 2, 48), 1))


def test_rotating_cache_memory_is_fixed():
    cache = RotatingKVCache(6)
    for t in range(20):
        cache.update_and_fetch(_rand((1, 1, 1, 4), t), _rand((1, 1, 1, 4), 100 + t))
    assert cache.keys.shape[2] == 6 and cache.size() == 6
    np.testing.assert_array_equal(np.sort(cache.key_positions()), np.arange(14, 20))


def test_pool_refcounts_and_errors():
    pool = PagePool(3)
    a = pool.allocate(2)
    pool.share(a[:1])
    pool.release(a)
    assert pool.num_free == 2 and pool.refcount[a[0]] == 1
    with pytest.raises(PoolFullError, match="need 3 free pages, have 2"):
        pool.allocate(3)
    pool.release(a[:1])
    with pytest.raises(ValueError, match="is free"):
        pool.release(a[:1])
    with pytest.raises(ValueError, match="out of range"):
        pool.share([7])


def test_paged_write_and_gather_round_trip():
    cache = PagedKVCache(num_pages=10, page_size=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    k, v = _rand((2, 2, 7, 8), 4), _rand((2, 2, 7, 8), 5)
    batch = cache.batch([a, b], 7)
    keys, values = batch.layers[0].update_and_fetch(k, v)
    np.testing.assert_array_equal(np.array(keys), np.array(k))
    np.testing.assert_array_equal(np.array(values), np.array(v))
    assert batch.block_table.shape == (2, 2) and batch.cache_seqlens.tolist() == [7, 7]
    assert cache.pool.num_free == 6
    cache.free(a)
    assert cache.pool.num_free == 8
    with pytest.raises(ValueError, match="unknown sequence"):
        cache.batch([a], 1)


def test_paged_batch_of_different_lengths_decodes_each_row():
    cache = PagedKVCache(num_pages=20, page_size=4)
    H, Hkv, D = 4, 2, 8
    ks = [_rand((1, Hkv, n, D), 10 + n) for n in (5, 9, 1)]
    vs = [_rand((1, Hkv, n, D), 20 + n) for n in (5, 9, 1)]
    seqs = []
    for k, v in zip(ks, vs):
        seqs.append(cache.add_sequence())
        cache.batch([seqs[-1]], k.shape[2]).layers[0].update_and_fetch(k, v)
    q, kn, vn = _rand((3, H, 1, D), 30), _rand((3, Hkv, 1, D), 31), _rand((3, Hkv, 1, D), 32)
    batch = cache.batch(seqs, 1)
    assert batch.layers[0].offset.tolist() == [5, 9, 1]
    out = batch.layers[0].attend(q, kn, vn)
    for b in range(3):
        k = mx.concatenate([ks[b], kn[b : b + 1]], axis=2)
        v = mx.concatenate([vs[b], vn[b : b + 1]], axis=2)
        ref, _ = attention_reference(q[b : b + 1], k, v, causal=True)
        np.testing.assert_allclose(np.array(out[b : b + 1]), np.array(ref), atol=2e-5)
    with pytest.raises(ValueError, match="different lengths"):
        cache.batch(seqs, 1).layers[0].update_and_fetch(kn, vn)


def test_fork_copy_on_write_keeps_parent_intact():
    cache = PagedKVCache(num_pages=8, page_size=4)
    parent = cache.add_sequence()
    k, v = _rand((1, 1, 6, 4), 40), _rand((1, 1, 6, 4), 41)
    cache.batch([parent], 6).layers[0].update_and_fetch(k, v)
    child = cache.fork(parent)
    assert cache.pages(child) == cache.pages(parent)
    assert all(cache.pool.refcount[p] == 2 for p in cache.pages(parent))
    # the child's append lands in the shared, partly filled page 1: it gets its own copy
    assert cache.pages_needed(child, 1) == 1
    kc, vc = _rand((1, 1, 1, 4), 42), _rand((1, 1, 1, 4), 43)
    keys, _ = cache.batch([child], 1).layers[0].update_and_fetch(kc, vc)
    assert cache.pages(child)[0] == cache.pages(parent)[0] and cache.pages(child)[1] != cache.pages(parent)[1]
    np.testing.assert_array_equal(np.array(keys), np.array(mx.concatenate([k, kc], axis=2)))
    # the parent still reads its own 6 tokens, then appends a different 7th
    kp, vp = _rand((1, 1, 1, 4), 44), _rand((1, 1, 1, 4), 45)
    keys, _ = cache.batch([parent], 1).layers[0].update_and_fetch(kp, vp)
    np.testing.assert_array_equal(np.array(keys), np.array(mx.concatenate([k, kp], axis=2)))
    cache.free(parent)
    cache.free(child)
    assert cache.pool.num_free == 8


def test_full_pool_raises_and_changes_nothing():
    cache = PagedKVCache(num_pages=3, page_size=2)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.batch([a], 4)
    with pytest.raises(PoolFullError, match="need 2 free pages, have 1"):
        cache.batch([a, b], 2)
    assert cache.length(a) == 4 and cache.length(b) == 0 and cache.pool.num_free == 1


def test_batch_bad_arguments_raise():
    cache = PagedKVCache(num_pages=4, page_size=2)
    a = cache.add_sequence()
    with pytest.raises(ValueError, match="distinct"):
        cache.batch([a, a], 1)
    with pytest.raises(ValueError, match="num_new"):
        cache.batch([a], 0)
    batch = cache.batch([a], 2)
    with pytest.raises(ValueError, match="keys must be"):
        batch.layers[0].attend(_rand((1, 2, 1, 4), 0), _rand((1, 1, 1, 4), 1), _rand((1, 1, 1, 4), 2))
    with pytest.raises(ValueError, match="no keys yet"):
        batch.layers[0].kv_view()


def test_view_of_freed_pages_raises():
    cache = PagedKVCache(num_pages=4, page_size=2)
    a = cache.add_sequence()
    batch = cache.batch([a], 3)
    batch.layers[0].update_and_fetch(_rand((1, 1, 3, 4), 0), _rand((1, 1, 3, 4), 1))
    cache.free(a)
    with pytest.raises(ValueError, match="freed page"):
        batch.layers[0].kv_view()


def test_prefix_cache_match_insert_evict():
    cache = PagedKVCache(num_pages=6, page_size=2)
    prefix = PrefixCache(cache)
    prompt = [1, 2, 3, 4, 5, 6]
    a = cache.add_sequence(prefix.match(prompt))
    cache.batch([a], len(prompt))
    prefix.insert(prompt, cache.pages(a))
    # full pages of prompt[:-1] are cached: [1, 2], [3, 4] (the last token's page is never shared)
    assert prefix.num_pages == 2
    assert prefix.match([1, 2, 3, 4, 9, 9, 9]) == cache.pages(a)[:2]
    assert prefix.match([1, 2, 7, 4, 9]) == cache.pages(a)[:1]
    assert prefix.match([2, 1, 3, 4, 5]) == []
    cache.free(a)
    assert prefix.num_reclaimable() == 2 and cache.pool.num_free == 4
    # allocation short of pages evicts cached prefixes (least recently used leaves first)
    b = cache.add_sequence()
    cache.batch([b], 10)
    assert prefix.num_pages == 1 and cache.pool.num_free == 0
    with pytest.raises(PoolFullError):
        cache.batch([b], 3)


def test_mlx_lm_model_runs_on_mfa_caches():
    # the mlx-lm cache protocol: an mlx-lm model decodes identically with mfa's KVCache
    llama = pytest.importorskip("mlx_lm.models.llama")
    from mlx_lm.models.cache import KVCache as MlxLmKVCache

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=50)
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7]])

    def run(make):
        cache = [make() for _ in model.layers]
        logits = [model(tokens[:, :5], cache=cache)[:, -1]]
        logits += [model(tokens[:, t : t + 1], cache=cache)[:, -1] for t in (5, 6)]
        return np.array(mx.stack(logits))

    np.testing.assert_allclose(run(KVCache), run(MlxLmKVCache), atol=1e-5)
