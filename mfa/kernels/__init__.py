"""Native fused attention kernels: one kernel logic, three targets.

The kernel bodies in ``mfa/kernels/metal/`` are written once over a tile API and compiled for

- ``"metal"``: MSL through ``mx.fast.metal_kernel`` (simdgroup 8x8 matrices) — Apple GPUs;
- ``"cuda"``: CUDA through ``mx.fast.cuda_kernel`` (mma.sync m16n8k16, ldmatrix, cp.async);
- ``"emulator"``: the CPU executor, the same bodies compiled by the system C++ compiler with
  every GPU thread run as a fiber (small shapes only; ``$MFA_EMULATOR_ARCH`` picks the Metal
  or the CUDA fragment family of the tile layer).

The router calls `is_available`, `unsupported_reason`, `forward` and `backward`.
"""

from __future__ import annotations

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

    Every option runs natively; what remains are limits of the hardware and of the emulator.
    The router falls back to the ``tiled`` backend when a reason is returned.
    """
    _check_target(target)
    q, k, v = inputs.q, inputs.k, inputs.v
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    d = padded_head_dim(max(D, Dv))
    if d is None:
        return f"head dims {D=}, {Dv=} exceed 256"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return f"native kernels take one float dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}"
    arch = build.arch_of(target)
    if arch == "cuda" and q.dtype == mx.float32:
        return "the CUDA kernels use bf16/fp16 tensor cores; float32 inputs are not supported"
    blocks = attention.block_sizes(target, d, q.dtype)
    if blocks.fwd is None or blocks.dq is None or blocks.dkdv is None:
        return f"no tile of D={d} {q.dtype} fits the {arch} threadgroup memory"
    if inputs.bias is not None and inputs.bias.size >= 2**31:
        return f"a bias of {inputs.bias.size} elements: the kernels read it with int32 strides (< 2^31)"
    if target == "emulator" and B * H * Nq * Nk > EMULATOR_MAX_SCORES:
        return f"the emulator is for small shapes (B·H·Nq·Nk = {B * H * Nq * Nk} > {EMULATOR_MAX_SCORES})"
    return None


def forward(target: str, spec: AttentionSpec, inputs: AttentionInputs) -> Tuple[mx.array, mx.array]:
    """Fused attention forward on `target`.

    Args:
        target: one of `TARGETS`.
        spec: the static options (every option of `AttentionSpec`).
        inputs: q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``, v ``(B, Hkv, Nk, Dv)`` and the
            optional bias, alibi_slopes, sinks and cu_seqlens (see `attention.forward`).

    Returns:
        ``(out, lse)``: out ``(B, H, Nq, Dv)`` in q's dtype (float32 for the calls whose backward
        needs it exact: see `attention.exact_out`); lse ``(B, H, Nq)`` float32.
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
        `AttentionGrads` with dq, dk, dv shaped and typed like q, k, v, and dbias /
        dalibi_slopes / dsinks (reduced to their inputs' shapes) when those inputs are given.
    """
    _check_target(target)
    reason = unsupported_reason(target, spec, inputs)
    if reason is not None:
        raise ValueError(f"{target} kernels cannot run this call: {reason}")
    return attention.backward(target, spec, inputs, out, lse, dout, dlse)
