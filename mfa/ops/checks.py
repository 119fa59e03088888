"""Argument checks at the front door: every bad input is a ValueError naming the values."""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from mfa.ops.spec import AttentionSpec

FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
BACKENDS = ("auto", "sdpa", "metal", "cuda", "emulator", "tiled", "reference")


def require_array(name: str, x) -> None:
    if not isinstance(x, mx.array):
        raise ValueError(f"{name} must be an mx.array, got {type(x).__name__}")


def check_qkv(q: mx.array, k: mx.array, v: mx.array, rank: int, layout: str) -> None:
    """Ranks, matching sizes, head ratio and dtypes of q, k, v in ``layout`` (for messages)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        require_array(name, x)
        if x.ndim != rank:
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")
    dtype = q.dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != dtype or v.dtype != dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")


def check_dense_shapes(q: mx.array, k: mx.array, v: mx.array) -> None:
    """q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``, v ``(B, Hkv, Nk, Dv)``."""
    B, H, _, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    Bv, Hv, Nv, _ = v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: q has B={B}, k has B={Bk}, v has B={Bv}")
    check_heads_and_dims(H, Hkv, Hv, D, Dk, Nk, Nv)


def check_heads_and_dims(H: int, Hkv: int, Hv: int, D: int, Dk: int, Nk: int, Nv: int) -> None:
    if Hkv != Hv:
        raise ValueError(f"k and v must have the same number of heads, got {Hkv=} and Hv={Hv}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{H=} must be divisible by {Hkv=}")
    if D != Dk:
        raise ValueError(f"q and k head dims differ: D={D}, Dk={Dk}")
    if Nk != Nv:
        raise ValueError(f"k and v lengths differ: Nk={Nk}, Nv={Nv}")


def check_scale(scale) -> None:
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number or None, got {type(scale).__name__}")


def normalize_window(window) -> Optional[Tuple[int, int]]:
    """``(left, right)`` with ``-1`` = unbounded; returns None when both sides are unbounded."""
    if window is None:
        return None
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be a pair (left, right) of ints, got {window=}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window values must be >= -1 (-1 = unbounded), got {window=}")
    if (left, right) == (-1, -1):
        return None
    return left, right


def check_softcap(softcap) -> None:
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap=}")


def check_dropout(dropout_p, dropout_seed) -> None:
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p=}")
    if not isinstance(dropout_seed, (int, np.integer)):
        raise ValueError(f"dropout_seed must be an int, got {dropout_seed=}")


def bias_as_4d(bias: mx.array, B: int, H: int, Nq: int, Nk: int) -> mx.array:
    """Check that ``bias`` broadcasts to ``(B, H, Nq, Nk)`` and return it as a 4-D array."""
    require_array("bias", bias)
    if bias.dtype not in FLOAT_DTYPES:
        raise ValueError(f"bias must be a float array (use block_mask or -inf for masks), got {bias.dtype}")
    if bias.ndim > 4:
        raise ValueError(f"bias must have rank <= 4, got shape {tuple(bias.shape)}")
    shape = (1,) * (4 - bias.ndim) + tuple(bias.shape)
    for got, want in zip(shape, (B, H, Nq, Nk)):
        if got not in (1, want):
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} is not broadcastable to (B, H, Nq, Nk)={(B, H, Nq, Nk)}"
            )
    return bias.reshape(shape)


def check_per_head(name: str, x: mx.array, H: int, batch: Optional[int]) -> mx.array:
    """``x`` of shape ``(H,)`` or, when ``batch`` is given, ``(batch, H)``; returned as float."""
    require_array(name, x)
    allowed = [(H,)] + ([(batch, H)] if batch is not None else [])
    if tuple(x.shape) not in allowed:
        want = " or ".join(str(s) for s in allowed)
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float array, got {x.dtype}")
    return x


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend=}")


def check_cu_seqlens(name: str, cu: mx.array, total: int) -> mx.array:
    """Rank, dtype and (when readable) values of ``cu_seqlens``; returns it as int32."""
    require_array(name, cu)
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of length S+1 >= 1, got shape {tuple(cu.shape)}")
    if not mx.issubdtype(cu.dtype, mx.integer):
        raise ValueError(f"{name} must be an integer array (int32), got {cu.dtype}")
    return cu.astype(mx.int32)


def check_cu_seqlens_values(name: str, values: np.ndarray, total: int) -> None:
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0]={int(values[0])}")
    steps = np.diff(values)
    if (steps < 0).any():
        bad = int(np.argmax(steps < 0))
        raise ValueError(
            f"{name} must be non-decreasing, got {name}[{bad}]={int(values[bad])} > "
            f"{name}[{bad + 1}]={int(values[bad + 1])}"
        )
    if values[-1] != total:
        raise ValueError(f"{name}[-1]={int(values[-1])} must equal the packed length {total}")


def check_max_seqlen(name: str, max_seqlen, values: np.ndarray) -> None:
    if max_seqlen is None:
        return
    longest = int(np.diff(values).max()) if len(values) > 1 else 0
    if int(max_seqlen) < longest:
        raise ValueError(f"{name}={max_seqlen} is smaller than the longest sequence ({longest})")


def checked_spec(
    D: int,
    H: int,
    batch: int,
    *,
    scale,
    causal,
    window,
    softcap,
    alibi_slopes,
    sinks,
    dropout_p,
    dropout_seed,
    backend,
    has_bias: bool = False,
    block_mask=None,
    varlen: bool = False,
) -> AttentionSpec:
    """Check the options every op shares and build the call's `AttentionSpec`.

    Args:
        D: head dim (for the default scale).
        H: query heads.
        batch: rows a ``(batch, H)`` ALiBi table may have (B, or S sequences for varlen).
        has_bias, block_mask, varlen: the remaining `AttentionSpec` fields.
    """
    check_scale(scale)
    window = normalize_window(window)
    check_softcap(softcap)
    check_dropout(dropout_p, dropout_seed)
    check_backend(backend)
    if alibi_slopes is not None:
        check_per_head("alibi_slopes", alibi_slopes, H, batch=batch)
    if sinks is not None:
        check_per_head("sinks", sinks, H, batch=None)
    return _spec(
        float(D**-0.5 if scale is None else scale), bool(causal), window, None if softcap is None else float(softcap),
        float(dropout_p), int(dropout_seed), alibi_slopes is not None, sinks is not None,
        bool(has_bias), block_mask, bool(varlen),
    )


@functools.lru_cache(maxsize=1024)
def _spec(scale: float, causal: bool, window: Optional[Tuple[int, int]], softcap: Optional[float], dropout_p: float,
          dropout_seed: int, has_alibi: bool, has_sinks: bool, has_bias: bool, block_mask,
          varlen: bool) -> AttentionSpec:
    """One `AttentionSpec` object per value of the checked options (so that the caches keyed by
    the spec downstream find it by identity rather than field by field)."""
    return AttentionSpec(
        scale=scale, causal=causal, window=window, softcap=softcap, dropout_p=dropout_p, dropout_seed=dropout_seed,
        has_bias=has_bias, has_alibi=has_alibi, has_sinks=has_sinks, block_mask=block_mask, varlen=varlen,
    )
