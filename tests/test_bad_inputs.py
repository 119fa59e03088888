"""Every bad input is a ValueError that names the offending values."""

import mlx.core as mx
import numpy as np
import pytest

import mfa
from mfa import BlockMask

q = mx.zeros((2, 4, 8, 16))
k = mx.zeros((2, 2, 10, 16))
v = mx.zeros((2, 2, 10, 16))


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((q[0], k, v), {}, r"q must have rank 4 .*\(4, 8, 16\)"),
        ((q, k, v[..., 0]), {}, r"v must have rank 4"),
        ((q, k[:1], v[:1]), {}, r"batch sizes differ: q has B=2, k has B=1"),
        ((q, mx.zeros((2, 3, 10, 16)), mx.zeros((2, 3, 10, 16))), {}, r"H=4 must be divisible by Hkv=3"),
        ((q, k, mx.zeros((2, 1, 10, 16))), {}, r"same number of heads, got Hkv=2 and Hv=1"),
        ((q, k[..., :8], v), {}, r"head dims differ: D=16, Dk=8"),
        ((q, k, v[:, :, :9]), {}, r"lengths differ: Nk=10, Nv=9"),
        ((q, k.astype(mx.float16), v), {}, r"share one dtype.*float16"),
        ((q.astype(mx.int32), k, v), {}, r"q must be float16, bfloat16 or float32, got mlx.core.int32"),
        (("q", k, v), {}, r"q must be an mx.array, got str"),
        ((q, k, v), {"bias": mx.zeros((2, 4, 8, 9))}, r"bias of shape \(2, 4, 8, 9\) is not broadcastable to .*\(2, 4, 8, 10\)"),
        ((q, k, v), {"bias": mx.zeros((3, 1, 1, 1))}, r"bias of shape \(3, 1, 1, 1\)"),
        ((q, k, v), {"bias": mx.zeros((1, 1, 1, 1, 1))}, r"rank <= 4"),
        ((q, k, v), {"bias": mx.zeros((8, 10), dtype=mx.bool_)}, r"bias must be a float array"),
        ((q, k, v), {"window": (-2, 0)}, r"window values must be >= -1.*\(-2, 0\)"),
        ((q, k, v), {"window": (3,)}, r"window must be a pair"),
        ((q, k, v), {"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\), got dropout_p=1.0"),
        ((q, k, v), {"dropout_p": -0.1}, r"dropout_p=-0.1"),
        ((q, k, v), {"softcap": 0.0}, r"softcap must be a positive number"),
        ((q, k, v), {"alibi_slopes": mx.zeros((2,))}, r"alibi_slopes must have shape \(4,\) or \(2, 4\), got \(2,\)"),
        ((q, k, v), {"sinks": mx.zeros((2, 4))}, r"sinks must have shape \(4,\), got \(2, 4\)"),
        ((q, k, v), {"backend": "cudnn"}, r"backend must be one of .* got backend='cudnn'"),
        ((q, k, v), {"block_mask": np.ones((1, 1, 1, 1), bool)}, r"block_mask must be an mfa.BlockMask"),
        ((q, k, v), {"block_mask": BlockMask.from_blocks(np.ones((1, 1, 2, 2), bool), 8)},
         r"block map of shape \(1, 1, 2, 2\) .* expected \(1\|2, 1\|4, 1, 2\)"),
        ((q, k, v), {"block_mask": BlockMask.from_blocks(np.ones((3, 1, 1, 2), bool), 8)}, r"block map of shape \(3, 1, 1, 2\)"),
        ((q, k, v), {"block_mask": BlockMask.from_mask_mod(lambda b, h, i, j: j <= i, 1, 1, 8, 9, block_size=8)},
         r"built for \(Nq, Nk\)=\(8, 9\)"),
    ],
)
def test_flash_attention_rejects(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mfa.flash_attention(*args, **kwargs)


qp = mx.zeros((10, 4, 16))
kp = mx.zeros((12, 2, 16))
vp = mx.zeros((12, 2, 16))
CU_Q = mx.array([0, 4, 10], dtype=mx.int32)
CU_K = mx.array([0, 5, 12], dtype=mx.int32)


@pytest.mark.parametrize(
    "cu_q,cu_k,kwargs,match",
    [
        (mx.array([0, 6, 4, 10], dtype=mx.int32), mx.array([0, 5, 6, 12], dtype=mx.int32), {},
         r"cu_seqlens_q must be non-decreasing, got cu_seqlens_q\[1\]=6 > cu_seqlens_q\[2\]=4"),
        (CU_Q, mx.array([0, 5, 12, 12], dtype=mx.int32), {}, r"same length S\+1, got 3 and 4"),
        (mx.array([1, 4, 10], dtype=mx.int32), CU_K, {}, r"must start at 0, got cu_seqlens_q\[0\]=1"),
        (mx.array([0, 4, 9], dtype=mx.int32), CU_K, {}, r"cu_seqlens_q\[-1\]=9 must equal the packed length 10"),
        (CU_Q, mx.array([0, 5, 13], dtype=mx.int32), {}, r"cu_seqlens_k\[-1\]=13 must equal the packed length 12"),
        (CU_Q.astype(mx.float32), CU_K, {}, r"cu_seqlens_q must be an integer array"),
        (CU_Q[None], CU_K, {}, r"cu_seqlens_q must be 1-D"),
        (CU_Q, CU_K, {"max_seqlen_q": 5}, r"max_seqlen_q=5 is smaller than the longest sequence \(6\)"),
        (CU_Q, CU_K, {"max_seqlen_k": 6}, r"max_seqlen_k=6 is smaller than the longest sequence \(7\)"),
        (CU_Q, CU_K, {"alibi_slopes": mx.zeros((3, 4))}, r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
        (CU_Q, CU_K, {"window": (0, -3)}, r"window values must be >= -1"),
        (CU_Q, CU_K, {"dropout_p": 2.0}, r"dropout_p must be in"),
    ],
)
def test_varlen_rejects(cu_q, cu_k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mfa.flash_attention_varlen(qp, kp, vp, cu_q, cu_k, **kwargs)


def test_varlen_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"q must have rank 3 \(total, H, D\)"):
        mfa.flash_attention_varlen(q, kp, vp, CU_Q, CU_K)
    with pytest.raises(ValueError, match=r"H=4 must be divisible by Hkv=3"):
        mfa.flash_attention_varlen(qp, mx.zeros((12, 3, 16)), mx.zeros((12, 3, 16)), CU_Q, CU_K)


def test_block_mask_constructors_reject():
    with pytest.raises(ValueError, match=r"blocks must be 4-D"):
        BlockMask.from_blocks(np.ones((2, 2), bool), 16)
    with pytest.raises(ValueError, match=r"blocks must be boolean"):
        BlockMask.from_blocks(np.ones((1, 1, 2, 2)), 16)
    with pytest.raises(ValueError, match=r"block_size must be positive"):
        BlockMask.from_blocks(np.ones((1, 1, 2, 2), bool), 0)


def test_sdpa_rejects_unknown_mask_string():
    with pytest.raises(ValueError, match=r"mask string must be 'causal', got 'upper'"):
        mfa.scaled_dot_product_attention(q, k, v, scale=1.0, mask="upper")
