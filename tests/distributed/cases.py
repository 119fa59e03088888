"""Inputs shared by the ring attention test and its worker: the same full arrays in every process."""

from __future__ import annotations

from typing import Dict

import mlx.core as mx
import numpy as np

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def full_inputs(case: Dict) -> Dict[str, mx.array]:
    """Full-sequence ``q, k, v`` and the loss weights ``d_out, d_lse`` of a case (numpy seeded)."""
    rng = np.random.default_rng(case["seed"])
    B, H, Hkv, N, D, Dv = (case[key] for key in ("B", "H", "Hkv", "N", "D", "Dv"))
    dtype = DTYPES[case["dtype"]]

    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    return {
        "q": normal(B, H, N, D).astype(dtype),
        "k": normal(B, Hkv, N, D).astype(dtype),
        "v": normal(B, Hkv, N, Dv).astype(dtype),
        "d_out": normal(B, H, N, Dv),
        "d_lse": normal(B, H, N) * 0.5,
    }


def loss_and_grads(attention, q, k, v, d_out, d_lse):
    """``out``, ``lse`` and ``dq, dk, dv`` of ``sum(out·d_out) + sum(lse·d_lse)``.

    ``attention(q, k, v) -> (out, lse)``.
    """

    def loss(q, k, v):
        out, lse = attention(q, k, v)
        return (out.astype(mx.float32) * d_out).sum() + (lse * d_lse).sum()

    out, lse = attention(q, k, v)
    dq, dk, dv = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    result = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    mx.eval(result)
    return result
