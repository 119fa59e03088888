"""Native fused attention kernels: one kernel logic, three targets.

The kernel bodies in ``mfa/kernels/metal/`` are written once over a tile API and compiled for

- ``"metal"``: MSL through ``mx.fast.metal_kernel`` (simdgroup 8x8 matrices) — Apple GPUs;
- ``"cuda"``: CUDA through ``mx.fast.cuda_kernel`` (mma.sync m16n8k16, ldmatrix, cp.async; wgmma
  on Hopper where the tiles allow it);
- ``"emulator"``: the CPU executor, the same bodies compiled by the system C++ compiler with
  every GPU thread run as a fiber (small shapes only; ``$MFA_EMULATOR_ARCH`` picks the Metal
  or the CUDA fragment family of the tile layer).

The router calls `is_available`, `unsupported_reason`, `atomic_adds` (for deterministic calls), `forward`
and `backward`.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import mlx.core as mx

from mfa.kernels import attention, build
from mfa.kernels.blocks import BlockSizes, Tiles, padded_head_dim
from mfa.ops.spec import AttentionGrads, AttentionInputs, AttentionSpec
from mfa.settings import Settings, read as read_settings

TARGETS = ("metal", "cuda", "emulator")
EMULATOR_MAX_SCORES = 1 << 22  # B·H·Nq·Nk above which the emulator declines (it is slow)
SCALE_RANGE = (1e-30, 1e30)  # scales the native kernels take (positive: they take row maxes of raw q·kᵀ)

__all__ = ["TARGETS", "BlockSizes", "Tiles", "is_available", "unsupported_reason", "atomic_adds", "forward",
           "backward"]

atomic_adds = attention.atomic_adds


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown {target=}; expected one of {TARGETS}")


def is_available(target: str) -> bool:
    """Whether `target`'s kernels can run in this process (device present / compiler present)."""
    _check_target(target)
    return build.is_available(target)


def unsupported_reason(target: str, spec: AttentionSpec, inputs: AttentionInputs,
                       settings: Optional[Settings] = None) -> Optional[str]:
    """Why `target`'s kernels cannot run this call, or None when they can.

    Every option runs natively; what remains are limits of the hardware and of the emulator.
    The router falls back to the ``tiled`` backend when a reason is returned.  ``settings``:
    the call's ``$MFA_*`` switches (`mfa.settings`; None reads them now), whose tile overrides
    decide what fits.
    """
    _check_target(target)
    if not SCALE_RANGE[0] < spec.scale < SCALE_RANGE[1]:
        # the kernels take the row max of raw scores q·kᵀ and also use 1/scale (band.h's Scores)
        return f"scale={spec.scale}: the native kernels need {SCALE_RANGE[0]} < scale < {SCALE_RANGE[1]}"
    q, k, v = inputs.q, inputs.k, inputs.v
    bias_size = 0 if inputs.bias is None else inputs.bias.size
    settings = settings or read_settings()
    return _reason(target, build.arch_of(target), settings, q.shape, k.shape[2], v.shape[3], q.dtype, k.dtype,
                   v.dtype, bias_size)


@functools.lru_cache(maxsize=256)
def _reason(target: str, arch: str, settings: Settings, q_shape: Tuple[int, ...], Nk: int, Dv: int, q_dtype: mx.Dtype,
            k_dtype: mx.Dtype, v_dtype: mx.Dtype, bias_size: int) -> Optional[str]:
    """`unsupported_reason` of one call's shapes and dtypes (computed once per key; ``arch`` and
    ``settings`` are what `attention.block_sizes` reads)."""
    B, H, Nq, D = q_shape
    d = padded_head_dim(max(D, Dv))
    if d is None:
        return f"head dims {D=}, {Dv=} exceed 256"
    if not (q_dtype == k_dtype == v_dtype) or q_dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return f"native kernels take one float dtype for q, k, v, got {q_dtype}, {k_dtype}, {v_dtype}"
    if arch == "cuda" and q_dtype == mx.float32:
        return "the CUDA kernels use bf16/fp16 tensor cores; float32 inputs are not supported"
    blocks = attention.block_sizes(target, d, q_dtype, settings)
    if blocks.fwd is None or blocks.dq is None or blocks.dkdv is None:
        return f"no tile of D={d} {q_dtype} fits the {arch} threadgroup memory"
    if bias_size >= 2**31:
        return f"a bias of {bias_size} elements: the kernels read it with int32 strides (< 2^31)"
    if target == "emulator" and B * H * Nq * Nk > EMULATOR_MAX_SCORES:
        return f"the emulator is for small shapes (B·H·Nq·Nk = {B * H * Nq * Nk} > {EMULATOR_MAX_SCORES})"
    return None


def forward(target: str, spec: AttentionSpec, inputs: AttentionInputs, *, check: bool = True,
            settings: Optional[Settings] = None) -> Tuple[mx.array, mx.array]:
    """Fused attention forward on `target`.

    Args:
        target: one of `TARGETS`.
        spec: the static options (every option of `AttentionSpec`).
        inputs: q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``, v ``(B, Hkv, Nk, Dv)`` and the
            optional bias, alibi_slopes, sinks and cu_seqlens (see `attention.forward`).
        check: raise ValueError when `unsupported_reason` gives a reason (the router, which has
            just asked, passes False). Default: ``True``.
        settings: the call's ``$MFA_*`` switches (`mfa.settings`); None reads them now.

    Returns:
        ``(out, lse)``: out ``(B, H, Nq, Dv)`` in q's dtype (float32 for the calls whose backward
        needs it exact: see `attention.exact_out`); lse ``(B, H, Nq)`` float32.
    """
    _check_target(target)
    settings = settings or read_settings()  # one snapshot for the check and the launch
    if check:
        _require_supported(target, spec, inputs, settings)
    return attention.forward(target, spec, inputs, settings)


def backward(target: str, spec: AttentionSpec, inputs: AttentionInputs, out: mx.array, lse: mx.array,
             dout: mx.array, dlse: Optional[mx.array], *, check: bool = True,
             settings: Optional[Settings] = None) -> AttentionGrads:
    """Fused attention backward on `target`.

    Args:
        target, spec, inputs, check, settings: as in `forward`.
        out, lse: the forward's results.
        dout: cotangent of out ``(B, H, Nq, D)``.
        dlse: cotangent of lse ``(B, H, Nq)`` float32, or None; enters as
            ``dS = P ∘ (dP − (delta − dlse))``.

    Returns:
        `AttentionGrads` with dq, dk, dv shaped and typed like q, k, v, and dbias /
        dalibi_slopes / dsinks (reduced to their inputs' shapes) when those inputs are given.
    """
    _check_target(target)
    settings = settings or read_settings()  # one snapshot for the check and the launches
    if check:
        _require_supported(target, spec, inputs, settings)
    return attention.backward(target, spec, inputs, out, lse, dout, dlse, settings)


def _require_supported(target: str, spec: AttentionSpec, inputs: AttentionInputs, settings: Settings) -> None:
    reason = unsupported_reason(target, spec, inputs, settings)
    if reason is not None:
        raise ValueError(f"{target} kernels cannot run this call: {reason}")
