"""Launchers of the attention kernels (forward, and the FlashAttention-2 backward).

Options handled natively: causal and sliding window (a band of kept keys, with tile skipping),
softcap, ALiBi (slopes ``(1|B, H)``, with their gradient) and sinks (``(H,)``, with theirs).

The same code drives every target: the kernel objects of `build.kernel` share one call
interface.  Head dims are zero-padded up to a compiled one (padding q and k adds nothing to
q·kᵀ; padded v columns are sliced off), and tiny arrays are padded to 8 elements so that Metal
binds every buffer in the device address space.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional, Tuple

import mlx.core as mx

from mfa.kernels import build
from mfa.kernels.blocks import BlockSizes, Tiles, padded_head_dim, shared_bytes
from mfa.ops.spec import AttentionGrads, AttentionInputs, AttentionSpec

LOG2E = math.log2(math.e)
PREPROCESS_ROWS = 16  # rows per threadgroup of the backward preprocess (4 warps x 4 rows)
UNBOUNDED = 1 << 30  # band side without a bound (metal/band.h: kUnbounded)


def _verbose() -> bool:
    return os.environ.get("MFA_KERNEL_VERBOSE", "") not in ("", "0")


def _buffer(x: mx.array) -> mx.array:
    """`x` itself, or flattened and padded to 8 elements (Metal puts < 8 in constant space)."""
    if x.size >= 8:
        return x
    return mx.concatenate([x.reshape(-1), mx.zeros((8 - x.size,), x.dtype)])


def _pad_head(x: mx.array, d: int) -> mx.array:
    extra = d - x.shape[-1]
    return x if extra == 0 else mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


@functools.lru_cache(maxsize=256)
def _params(H: int, Hkv: int, Nq: int, Nk: int, left: int, right: int, sinks: bool, slopes_per_batch: bool
            ) -> mx.array:
    """Runtime sizes and flags of a call (made once per shape: a fresh array costs a host-to-device copy)."""
    p = mx.array([H, Hkv, Nq, Nk, left, right, int(sinks), int(slopes_per_batch)], dtype=mx.int32)
    mx.eval(p)
    return p


@functools.lru_cache(maxsize=256)
def _fparams(scale: float, softcap: Optional[float]) -> mx.array:
    """[scale·log2(e), scale, softcap·log2(e), scale/softcap] (zeros without softcap)."""
    cap = [softcap * LOG2E, scale / softcap] if softcap else [0.0, 0.0]
    p = mx.array([scale * LOG2E, scale, *cap, 0, 0, 0, 0], dtype=mx.float32)
    mx.eval(p)
    return p


@functools.lru_cache(maxsize=1)
def _nothing() -> mx.array:
    """Stand-in buffer for absent sinks / slopes (the kernels' signatures are fixed)."""
    p = mx.zeros((8,), mx.float32)
    mx.eval(p)
    return p


def band_bounds(causal: bool, window: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """(left, right) of the kept band ``i' - left <= j <= i' + right``; unbounded sides as 2^30."""
    left, right = window if window is not None else (-1, -1)
    left = UNBOUNDED if left < 0 else left
    right = UNBOUNDED if right < 0 else right
    if causal:
        right = min(right, 0)
    return left, right


def _call_arrays(spec: AttentionSpec, inputs: AttentionInputs):
    """params, fparams, sinks and slopes buffers of a call."""
    B, H, Nq, _ = inputs.q.shape
    Hkv, Nk = inputs.k.shape[1], inputs.k.shape[2]
    slopes = inputs.alibi_slopes
    per_batch = slopes is not None and slopes.ndim == 2 and slopes.shape[0] != 1
    params = _params(H, Hkv, Nq, Nk, *band_bounds(spec.causal, spec.window), inputs.sinks is not None, per_batch)
    sinks = _nothing() if inputs.sinks is None else inputs.sinks.astype(mx.float32)
    slopes = _nothing() if slopes is None else slopes.astype(mx.float32).reshape(-1)
    return params, _fparams(spec.scale, spec.softcap), sinks, slopes


def block_sizes(target: str, head_dim: int, dtype: mx.Dtype) -> BlockSizes:
    """The tiles `target` uses for a (compiled) head dim and dtype.

    ``$MFA_BLOCKS`` overrides them for tuning, e.g. ``fwd=128x64x8x2,dq=64x64x4x2,dkdv=64x64x4``
    (block_q x block_k x warps [x stages] per kernel).
    """
    blocks = BlockSizes.default(head_dim, dtype, build.arch_of(target))
    override = os.environ.get("MFA_BLOCKS", "")
    for item in filter(None, override.split(",")):
        kernel, _, dims = item.partition("=")
        if kernel not in ("fwd", "dq", "dkdv"):
            raise ValueError(f"MFA_BLOCKS: unknown kernel {kernel!r} in {override!r}")
        blocks = dataclasses.replace(blocks, **{kernel: Tiles(*(int(x) for x in dims.split("x")))})
    return blocks


def _template(name: str, tiles: Tiles, dtype: mx.Dtype, d: int, spec: AttentionSpec):
    """Template values of an attention kernel: T, D, BQ, BK, NW, STAGES, SMEM, SOFTCAP, ALIBI."""
    return [("T", dtype), ("D", d), ("BQ", tiles.block_q), ("BK", tiles.block_k), ("NW", tiles.warps),
            ("STAGES", tiles.stages), ("SMEM", shared_bytes(name, tiles, d, dtype.size)),
            ("SOFTCAP", int(bool(spec.softcap))), ("ALIBI", int(spec.has_alibi))]


def _launch(target: str, name: str, template, threads: int, inputs, outputs, groups: Tuple[int, int, int]):
    """Run one kernel over ``groups`` threadgroups of ``threads`` threads."""
    smem = dict(template).get("SMEM", 0)
    k = build.kernel(target, name, build.arch_of(target), smem if target == "cuda" else 0)
    shapes, dtypes = zip(*outputs)
    return k(inputs=[_buffer(x) for x in inputs], output_shapes=list(shapes), output_dtypes=list(dtypes),
             grid=(groups[0] * threads, groups[1], groups[2]), threadgroup=(threads, 1, 1), template=template,
             verbose=_verbose())


def forward(target: str, spec: AttentionSpec, inputs: AttentionInputs) -> Tuple[mx.array, mx.array]:
    """Attention forward on a native target.

    Args:
        target: ``"metal"``, ``"cuda"`` or ``"emulator"``.
        spec: scale, causal, window, softcap (and which of alibi/sinks are given).
        inputs: q ``(B, H, Nq, D)``; k, v ``(B, Hkv, Nk, D)`` (``H % Hkv == 0``); optional
            alibi_slopes ``(H,)``, ``(1, H)`` or ``(B, H)`` and sinks ``(H,)``.

    Returns:
        ``(out, lse)``: out ``(B, H, Nq, D)`` in q's dtype, lse ``(B, H, Nq)`` float32 (natural
        log, with the sink term; -inf for rows with nothing to attend, whose out is 0).
    """
    q, k, v = inputs.q, inputs.k, inputs.v
    B, H, Nq, D = q.shape
    if Nq == 0:
        return mx.zeros((B, H, 0, D), q.dtype), mx.zeros((B, H, 0), mx.float32)
    d = padded_head_dim(D)
    tiles = block_sizes(target, d, q.dtype).fwd
    q, k, v = (_pad_head(x, d) for x in (q, k, v))
    params, fparams, sinks, slopes = _call_arrays(spec, inputs)
    out, lse = _launch(target, "attention_fwd", _template("attention_fwd", tiles, q.dtype, d, spec), tiles.threads,
                       [q, k, v, params, fparams, sinks, slopes],
                       [((B, H, Nq, d), q.dtype), ((B, H, Nq), mx.float32)], (-(-Nq // tiles.block_q), H, B))
    return (out[..., :D] if d != D else out), lse


def backward(target: str, spec: AttentionSpec, inputs: AttentionInputs, out: mx.array, lse: mx.array,
             dout: mx.array, dlse: Optional[mx.array]) -> AttentionGrads:
    """Attention backward on a native target (preprocess, dq kernel, dk/dv kernel).

    Args:
        target, spec, inputs: as in `forward`.
        out, lse: the forward's results, ``(B, H, Nq, D)`` and ``(B, H, Nq)``.
        dout: cotangent of out, ``(B, H, Nq, D)``.
        dlse: cotangent of lse, ``(B, H, Nq)`` float32, or None (zero).

    Returns:
        `AttentionGrads`: dq, dk, dv shaped and typed like q, k, v (dk, dv summed over each GQA
        group), and dalibi_slopes / dsinks when those inputs are given.
    """
    q, k, v = inputs.q, inputs.k, inputs.v
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dslopes = None if inputs.alibi_slopes is None else mx.zeros_like(inputs.alibi_slopes)
    dsinks = None if inputs.sinks is None else mx.zeros_like(inputs.sinks)
    if Nq == 0 or Nk == 0:
        if dsinks is not None and Nq > 0 and dlse is not None:  # lse = sink: its cotangent flows to it
            dsinks = dlse.astype(mx.float32).sum(axis=(0, 2)).astype(inputs.sinks.dtype)
        return AttentionGrads(mx.zeros_like(q), mx.zeros_like(k), mx.zeros_like(v), None, dslopes, dsinks)
    d = padded_head_dim(D)
    blocks = block_sizes(target, d, q.dtype)
    q, k, v, out, dout = (_pad_head(x, d) for x in (q, k, v, out, dout.astype(q.dtype)))
    dlse = mx.zeros((B, H, Nq), mx.float32) if dlse is None else dlse.astype(mx.float32)
    params, fparams, sinks, slopes = _call_arrays(spec, inputs)
    lse = lse.astype(mx.float32)

    # delta = rowsum(dout ∘ out) − dlse
    template = [("T", q.dtype), ("D", d), ("NW", 4), ("ROWS", PREPROCESS_ROWS)]
    (delta,) = _launch(target, "attention_bwd_preprocess", template, 128, [out, dout, dlse, params],
                       [((B, H, Nq), mx.float32)], (-(-Nq // PREPROCESS_ROWS), H, B))

    grads_in = [q, k, v, dout, lse, delta, params, fparams, slopes]
    t = blocks.dq
    nqt = -(-Nq // t.block_q)
    dq, slope_part = _launch(target, "attention_bwd_dq", _template("attention_bwd_dq", t, q.dtype, d, spec), t.threads,
                             grads_in, [((B, H, Nq, d), q.dtype), ((B, H, nqt), mx.float32)], (nqt, H, B))
    t = blocks.dkdv
    dk, dv = _launch(target, "attention_bwd_dkdv", _template("attention_bwd_dkdv", t, q.dtype, d, spec), t.threads,
                     grads_in, [((B, Hkv, Nk, d), k.dtype), ((B, Hkv, Nk, d), v.dtype)],
                     (-(-Nk // t.block_k), Hkv, B))
    if d != D:
        dq, dk, dv = dq[..., :D], dk[..., :D], dv[..., :D]
    if dslopes is not None:
        # dL/dslope_h = Σ dS·(−|j − i'|), summed per query tile in the dq kernel
        per_bh = slope_part.sum(axis=-1)
        per_batch = dslopes.ndim == 2 and dslopes.shape[0] != 1
        dslopes = (per_bh if per_batch else per_bh.sum(axis=0)).reshape(dslopes.shape).astype(dslopes.dtype)
    if dsinks is not None:
        # dL/dsink_h = −Σ_{b,i} exp(sink_h − lse)·(delta − dlse)
        p_sink = mx.exp(inputs.sinks.astype(mx.float32)[None, :, None] - lse)
        dsinks = -(p_sink * delta).sum(axis=(0, 2)).astype(inputs.sinks.dtype)
    return AttentionGrads(dq, dk, dv, None, dslopes, dsinks)
