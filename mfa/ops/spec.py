"""The static description of one attention call, shared by every backend.

`AttentionSpec` holds everything about a call that is not an array: it is hashable, so the
custom-VJP functions and native kernels built for it are cached per spec.  The arrays travel
separately (see `mfa/grad/function.py`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx

UNBOUNDED = -1


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static options of an attention call.

    Attributes:
        scale: multiplier of ``q·kᵀ``.
        causal: keep ``j <= i'`` where ``i' = i + Nk - Nq`` (bottom-right aligned).
        window: ``(left, right)`` sliding window, ``-1`` meaning unbounded on that side, or None.
        softcap: ``c`` in ``c·tanh(s/c)``, or None.
        dropout_p: probability of dropping an attention weight.
        dropout_seed: seed of the counter-based dropout mask.
        has_bias: an additive bias array is passed.
        has_alibi: ALiBi slopes are passed.
        has_sinks: per-head sink logits are passed.
        block_mask: an `mfa.BlockMask`, or None.
        varlen: the call is packed varlen (segments come from ``cu_seqlens``).
    """

    scale: float
    causal: bool = False
    window: Optional[Tuple[int, int]] = None
    softcap: Optional[float] = None
    dropout_p: float = 0.0
    dropout_seed: int = 0
    has_bias: bool = False
    has_alibi: bool = False
    has_sinks: bool = False
    block_mask: Optional[object] = None
    varlen: bool = False

    def __hash__(self) -> int:
        # the spec keys every cache a call consults (custom functions, kernel templates, tiles,
        # schedules), several times per call: its hash is computed once
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def band(self) -> Tuple[Optional[int], Optional[int]]:
        """The kept diagonal band ``(left, right)``: ``i' - left <= j <= i' + right``.

        ``None`` means unbounded on that side.  ``causal`` caps ``right`` at 0.
        """
        left, right = self.window if self.window is not None else (UNBOUNDED, UNBOUNDED)
        left = None if left == UNBOUNDED else left
        right = None if right == UNBOUNDED else right
        if self.causal:
            right = 0 if right is None else min(right, 0)
        return left, right

    @property
    def has_band(self) -> bool:
        return self.band != (None, None)

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0

    @property
    def is_plain(self) -> bool:
        """True when the call is dense attention with at most a causal mask (no other option)."""
        return (
            self.window is None
            and self.softcap is None
            and not self.has_dropout
            and not self.has_bias
            and not self.has_alibi
            and not self.has_sinks
            and self.block_mask is None
            and not self.varlen
        )


class AttentionInputs(NamedTuple):
    """The arrays of an attention call, in the internal dense layout.

    Varlen calls arrive here already viewed as one batch row: ``q (1, H, total_q, D)``,
    ``k (1, Hkv, total_k, D)``, ``v (1, Hkv, total_k, Dv)`` plus ``cu_seqlens_q/k``.

    Attributes:
        q: ``(B, H, Nq, D)``.
        k: ``(B, Hkv, Nk, D)``.
        v: ``(B, Hkv, Nk, Dv)``.
        bias: ``(B|1, H|1, Nq|1, Nk|1)`` additive bias (always 4-D here), or None.
        alibi_slopes: ``(1|B, H)`` float32 ALiBi slopes, or None.
        sinks: ``(H,)`` sink logits, or None.
        cu_seqlens_q: ``(S+1,)`` int32 cumulative query lengths (varlen only), or None.
        cu_seqlens_k: ``(S+1,)`` int32 cumulative key lengths (varlen only), or None.
    """

    q: mx.array
    k: mx.array
    v: mx.array
    bias: Optional[mx.array] = None
    alibi_slopes: Optional[mx.array] = None
    sinks: Optional[mx.array] = None
    cu_seqlens_q: Optional[mx.array] = None
    cu_seqlens_k: Optional[mx.array] = None

    def arrays(self) -> Tuple[mx.array, ...]:
        """The present arrays, in field order (the positional inputs of the custom function)."""
        return tuple(a for a in self if a is not None)

    @classmethod
    def from_arrays(cls, spec: AttentionSpec, arrays) -> "AttentionInputs":
        """Inverse of `arrays()`: rebuild the named inputs from the positional ones."""
        it = iter(arrays)
        q, k, v = next(it), next(it), next(it)
        bias = next(it) if spec.has_bias else None
        slopes = next(it) if spec.has_alibi else None
        sinks = next(it) if spec.has_sinks else None
        cu_q = next(it) if spec.varlen else None
        cu_k = next(it) if spec.varlen else None
        return cls(q, k, v, bias, slopes, sinks, cu_q, cu_k)


class AttentionGrads(NamedTuple):
    """Cotangents of `AttentionInputs`, field by field (None where the input is None).

    Integer inputs (``cu_seqlens``) get zeros, never None, as MLX's custom VJPs require.
    """

    dq: mx.array
    dk: mx.array
    dv: mx.array
    dbias: Optional[mx.array] = None
    dalibi_slopes: Optional[mx.array] = None
    dsinks: Optional[mx.array] = None
    dcu_seqlens_q: Optional[mx.array] = None
    dcu_seqlens_k: Optional[mx.array] = None

    def arrays(self) -> Tuple[mx.array, ...]:
        return tuple(a for a in self if a is not None)
