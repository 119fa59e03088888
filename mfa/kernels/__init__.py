"""Native fused attention kernels: one kernel logic, three targets.

The kernel bodies in ``metal/`` are written once over a tile API and compiled for

- ``"metal"``: MSL through ``mx.fast.metal_kernel`` (simdgroup 8x8 matrices) — Apple GPUs;
- ``"cuda"``: CUDA through ``mx.fast.cuda_kernel`` (mma.sync m16n8k16, ldmatrix, cp.async);
- ``"emulator"``: the CPU executor, the same bodies compiled by the system C++ compiler with
  every GPU thread run as a fiber (small shapes only; ``$MFA_EMULATOR_ARCH`` picks the Metal
  or the CUDA fragment family of the tile layer).

The router calls `is_available`, `unsupported_reason`, `forward` and `backward`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import mlx.core as mx

from mfa.kernels import attention, build
from mfa.kernels.blocks import BlockSizes, Tiles, padded_head_dim
from mfa.ops.spec import AttentionGrads, AttentionInputs, AttentionSpec

TARGETS = ("metal", "cuda", "emulator")
EMULATOR_MAX_SCORES = 1 << 22  # B·H·Nq·Nk above which the emulator declines (it is slow)

__all__ = ["TARGETS", "BlockSizes", "Tiles", "is_available", "unsupported_reason", "forward", "backward"]


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown {target=}; expected one of {TARGETS}")


def is_available(target: str) -> bool:
    """Whether `target`'s kernels can run in this process (device present / compiler present)."""
    _check_target(target)
    return build.is_available(target)


def unsupported_reason(target: str, spec: AttentionSpec, inputs: AttentionInputs) -> Optional[str]:
    """Why `target`'s kernels cannot run this call, or None when they can.

    The router falls back to the ``tiled`` backend when a reason is returned.
    """
    _check_target(target)
    if not dataclasses.replace(spec, causal=False, window=None, softcap=None, has_alibi=False, has_sinks=False).is_plain:
        return "native kernels cover dense attention with causal, window, softcap, alibi and sinks only"
    q, k, v = inputs.q, inputs.k, inputs.v
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if Dv != D:
        return f"native kernels need Dv == D, got {D=}, {Dv=}"
    d = padded_head_dim(D)
    if d is None:
        return f"head dim {D=} exceeds 256"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return f"native kernels take one float dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}"
    arch = build.arch_of(target)
    if arch == "cuda" and q.dtype == mx.float32:
        return "the CUDA kernels use bf16/fp16 tensor cores; float32 inputs are not supported"
    blocks = attention.block_sizes(target, d, q.dtype)
    if blocks.fwd is None or blocks.dq is None or blocks.dkdv is None:
        return f"no tile of D={d} {q.dtype} fits the {arch} threadgroup memory"
    if target == "emulator" and B * H * Nq * Nk > EMULATOR_MAX_SCORES:
        return f"the emulator is for small shapes (B·H·Nq·Nk = {B * H * Nq * Nk} > {EMULATOR_MAX_SCORES})"
    return None


def forward(target: str, spec: AttentionSpec, inputs: AttentionInputs) -> Tuple[mx.array, mx.array]:
    """Fused attention forward on `target`.

    Args:
        target: one of `TARGETS`.
        spec: the static options (causal, window, softcap, alibi, sinks; see `unsupported_reason`).
        inputs: q ``(B, H, Nq, D)``, k, v ``(B, Hkv, Nk, D)``, optional alibi_slopes ``(1|B, H)``
            and sinks ``(H,)``.

    Returns:
        ``(out, lse)``: out ``(B, H, Nq, D)`` in q's dtype; lse ``(B, H, Nq)`` float32.
    """
    _check_target(target)
    reason = unsupported_reason(target, spec, inputs)
    if reason is not None:
        raise ValueError(f"{target} kernels cannot run this call: {reason}")
    return attention.forward(target, spec, inputs)


def backward(target: str, spec: AttentionSpec, inputs: AttentionInputs, out: mx.array, lse: mx.array,
             dout: mx.array, dlse: Optional[mx.array]) -> AttentionGrads:
    """Fused attention backward on `target`.

    Args:
        target, spec, inputs: as in `forward`.
        out, lse: the forward's results.
        dout: cotangent of out ``(B, H, Nq, D)``.
        dlse: cotangent of lse ``(B, H, Nq)`` float32, or None; enters as
            ``dS = P ∘ (dP − (delta − dlse))``.

    Returns:
        `AttentionGrads` with dq, dk, dv shaped and typed like q, k, v, and dalibi_slopes / dsinks
        when those inputs are given.
    """
    _check_target(target)
    reason = unsupported_reason(target, spec, inputs)
    if reason is not None:
        raise ValueError(f"{target} kernels cannot run this call: {reason}")
    return attention.backward(target, spec, inputs, out, lse, dout, dlse)
