"""BlockMask: block-sparse patterns from mask_mod and from block maps."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_matches_reference, fused_backends, random_qkv

import mfa
from mfa import BlockMask
from mfa.ops.reference import attention_reference

BACKENDS = fused_backends()


def check(backend, q, k, v, block_mask, **options):
    def fused(q, k, v):
        return mfa.flash_attention(q, k, v, block_mask=block_mask, return_lse=True, backend=backend, **options)

    def reference(q, k, v, upcast=True):
        return attention_reference(q, k, v, block_mask=block_mask, upcast=upcast, **options)

    assert_matches_reference(fused, reference, [q, k, v])


N = 75
DOC = mx.array(np.repeat(np.arange(4), [20, 7, 33, 15]).astype(np.int32))
MASK_MODS = {
    "document": lambda b, h, q, kv: DOC[q] == DOC[kv],
    "document_causal": lambda b, h, q, kv: (DOC[q] == DOC[kv]) & (kv <= q),
    "prefix_lm": lambda b, h, q, kv: (kv <= q) | (kv < 19),
    "dilated": lambda b, h, q, kv: kv % 3 == 0,
    "per_head": lambda b, h, q, kv: (kv <= q + h * 5) & (kv >= q - 20),
    "per_batch": lambda b, h, q, kv: kv < 30 + b * 20,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MASK_MODS))
@pytest.mark.parametrize("block_size", [16, (8, 32)])
def test_mask_mod(backend, name, block_size):
    q, k, v = random_qkv(2, 4, 2, N, N, 16, seed=len(name))
    bm = BlockMask.from_mask_mod(MASK_MODS[name], 2, 4, N, N, block_size=block_size)
    check(backend, q, k, v, bm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_blocks_with_causal_and_gqa(backend):
    q, k, v = random_qkv(1, 4, 2, 40, 70, 16, dtype=mx.bfloat16, seed=3)
    blocks = np.random.default_rng(0).random((1, 4, 3, 5)) > 0.4
    bm = BlockMask.from_blocks(blocks, block_size=16)
    check(backend, q, k, v, bm, causal=True)


def test_mask_mod_skips_empty_tiles():
    bm = BlockMask.from_mask_mod(MASK_MODS["document"], 1, 1, N, N, block_size=16)
    assert bm.active.shape == (1, 1, 5, 5)
    assert 0 < bm.density < 1
    assert not bm.active[0, 0, 0, 4]  # rows 0-15 (doc 0) never see cols 64-74 (doc 3)
    assert bm.full[0, 0, 0, 0] and not bm.full[0, 0, 1, 1]


def test_from_blocks_equals_its_mask_mod():
    blocks = np.array([[[[1, 0, 1], [0, 1, 1]]]], dtype=bool)
    q, k, v = random_qkv(1, 2, 2, 32, 40, 16)
    by_blocks = mfa.flash_attention(q, k, v, block_mask=BlockMask.from_blocks(blocks, (16, 16)), backend="tiled")
    table = mx.array(blocks[0, 0])
    by_mod = mfa.flash_attention(
        q, k, v, backend="tiled",
        block_mask=BlockMask.from_mask_mod(lambda b, h, i, j: table[i // 16, j // 16], 1, 1, 32, 40, block_size=16),
    )
    np.testing.assert_allclose(np.array(by_blocks), np.array(by_mod), atol=1e-6)


def test_rows_without_any_block_are_zero():
    blocks = np.array([[[[0, 0], [1, 0]]]], dtype=bool)
    q, k, v = random_qkv(1, 1, 1, 32, 32, 16)
    out, lse = mfa.flash_attention(q, k, v, block_mask=BlockMask.from_blocks(blocks, 16), return_lse=True)
    assert float(mx.abs(out[:, :, :16]).max()) == 0.0 and bool(mx.all(lse[:, :, :16] == -mx.inf))
