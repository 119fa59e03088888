"""Launchers of the attention kernels (forward, and the FlashAttention-2 backward).

Every option of `AttentionSpec` runs natively: causal and sliding window (a band of kept keys,
with tile skipping), softcap, ALiBi (slopes ``(1|B, H)``, or ``(S, H)`` per varlen sequence,
with their gradient), sinks (``(H,)``, with theirs), an additive bias broadcast in any axis (with
dbias), varlen (one launch over all sequences), block-sparse masks and dropout.

The same code drives every target: the kernel objects of `build.kernel` share one call
interface.  Head dims are zero-padded up to a compiled one, ``max(D, Dv)`` (padding q and k adds
nothing to q·kᵀ; padded v columns are sliced off), and tiny arrays are padded to 8 elements so
that Metal binds every buffer in the device address space.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import mlx.core as mx

from mfa.kernels import build, sparse
from mfa.kernels.blocks import (FRAGMENT_ROWS, SHARED_LIMIT, BlockSizes, Tiles, padded_head_dim, shared_bytes,
                                wgmma)
from mfa.ops.spec import AttentionGrads, AttentionInputs, AttentionSpec
from mfa.settings import Settings, read as read_settings

LOG2E = math.log2(math.e)
PREPROCESS_ROWS = 32  # rows per threadgroup of the backward preprocess (4 warps x 8 rows)
UNBOUNDED = sparse.UNBOUNDED  # band side without a bound (metal/band.h: kUnbounded)

# dbias modes (the DBIAS template value): which kernel reduces dS to the bias's shape
DBIAS_ELEMENTS, DBIAS_ROWS, DBIAS_KEYS, DBIAS_SCALAR = 1, 2, 3, 4
DQ_MODES, DKDV_MODES = (DBIAS_ELEMENTS, DBIAS_ROWS), (DBIAS_KEYS, DBIAS_SCALAR)


def row_contiguous(x: mx.array) -> mx.array:
    """`x` row-contiguous: a copy of a strided view (flattening copies it; the reshape back is a
    view), `x`'s own buffer otherwise.  Like ``mx.contiguous``, which MLX 0.32 cannot export."""
    return x.reshape(-1).reshape(x.shape)


def _buffer(x: mx.array) -> mx.array:
    """`x` itself, or flattened and padded to 8 elements (Metal puts < 8 in constant space)."""
    if x.size >= 8:
        return x
    return mx.concatenate([x.reshape(-1), mx.zeros((8 - x.size,), x.dtype)])


def _pad_head(x: mx.array, d: int) -> mx.array:
    extra = d - x.shape[-1]
    return x if extra == 0 else mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


@functools.lru_cache(maxsize=256)
def _constant(values: Tuple, dtype: mx.Dtype) -> mx.array:
    """A small constant buffer (made once per value: a fresh array costs a host-to-device copy)."""
    p = mx.array(list(values), dtype=dtype)
    mx.eval(p)
    return p


@functools.cache
def _nothing(dtype: mx.Dtype = mx.float32) -> mx.array:
    """Stand-in buffer for an absent input (the kernels' signatures are fixed)."""
    return _constant((0,) * 8, dtype)


def band_bounds(causal: bool, window: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """(left, right) of the kept band ``i' - left <= j <= i' + right``; unbounded sides as 2^30."""
    left, right = window if window is not None else (-1, -1)
    left = UNBOUNDED if left < 0 else left
    right = UNBOUNDED if right < 0 else right
    if causal:
        right = min(right, 0)
    return left, right


def batch_total(spec: AttentionSpec, layout: Optional[BiasLayout]) -> bool:
    """Whether a batch-summed dbias (`BiasLayout.batch_summed`) comes out of the dq kernel in the
    bias's dtype (dbias_total, written by the last batch row: no float32 sums to cast after).  Not
    with a block mask that differs per batch row, whose last row may skip entries that others
    visit."""
    mask = spec.block_mask
    return layout is not None and layout.batch_summed and (mask is None or mask.active.shape[0] == 1)


def skips_tiles(spec: AttentionSpec) -> bool:
    """Whether some (query tile, key tile) pairs are never visited (a band or a block mask)."""
    return spec.has_band or spec.block_mask is not None


def dq_zero_fills(spec: AttentionSpec, layout: Optional[BiasLayout]) -> bool:
    """Whether the dq kernel's outputs are zero-filled before it runs: it reduces dbias (the bias
    has every query row) and some entries lack one writer that visits them (atomic adds, or tiles
    never visited).  One writer per entry (stores, or a batch summed in place) covers a per-row
    dbias, each row written once, and a per-element one where no tile is skipped."""
    if layout is None or layout.mode not in DQ_MODES:
        return False
    owned = layout.unique or layout.batch_summed
    return not (owned and (layout.mode == DBIAS_ROWS or not skips_tiles(spec)))


def _int32(x: int) -> int:
    """The int32 with the bit pattern of ``x mod 2^32``."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


@dataclasses.dataclass(frozen=True)
class BiasLayout:
    """How a bias ``(Bb, Hb, Qb, Kb)`` is read and how its gradient is reduced.

    Attributes:
        strides: element strides (b, h, q, k) of the contiguous bias, 0 on broadcast axes.
        mode: DBIAS_ELEMENTS / DBIAS_ROWS (reduced by the dq kernel: the bias has every query
            row; a full bias's dbias comes from the dk/dv kernel instead where `dq_from_dbias`)
            or DBIAS_KEYS / DBIAS_SCALAR (by the dk/dv kernel: broadcast over rows).
        unique: every dbias entry has one writer (plain stores in the bias's dtype) rather than
            several (float32 atomic adds).
        batch_summed: a per-element dbias (DBIAS_ELEMENTS) shared by the batch but not by the
            heads, ``(1, H, Nq, Nk)`` with B > 1: each dq threadgroup runs every batch row and sums
            their dS into its own entries in place (float32, no atomic adds).
    """

    strides: Tuple[int, int, int, int]
    mode: int
    unique: bool
    batch_summed: bool = False

    @staticmethod
    def of(shape, B: int, H: int, Hkv: int, Nq: int, Nk: int) -> "BiasLayout":
        Bb, Hb, Qb, Kb = shape
        strides = (Hb * Qb * Kb if Bb > 1 else 0, Qb * Kb if Hb > 1 else 0, Kb if Qb > 1 else 0, 1 if Kb > 1 else 0)
        rows, keys = Qb == Nq, Kb == Nk
        if rows:
            mode = DBIAS_ELEMENTS if keys else DBIAS_ROWS
            unique = Bb == B and Hb == H
        else:
            mode = DBIAS_KEYS if keys else DBIAS_SCALAR
            # a dk/dv threadgroup sums the heads of its group: alone only with one key/value head
            unique = mode == DBIAS_KEYS and Bb == B and (Hb == H or Hkv == 1)
        batch_summed = mode == DBIAS_ELEMENTS and Bb == 1 < B and Hb == H
        return BiasLayout(strides, mode, unique, batch_summed)


@dataclasses.dataclass
class Call:
    """The per-call buffers shared by the kernels of one forward or backward."""

    params: mx.array
    fparams: mx.array
    sinks: mx.array
    slopes: mx.array
    bias: mx.array
    bias_layout: Optional[BiasLayout]

    @staticmethod
    def of(spec: AttentionSpec, inputs: AttentionInputs) -> "Call":
        slopes = inputs.alibi_slopes
        params, fparams, layout = Call._constants(
            spec, inputs.q.shape, inputs.k.shape, None if inputs.bias is None else inputs.bias.shape,
            inputs.sinks is not None, None if slopes is None else slopes.shape,
            inputs.cu_seqlens_q.shape[0] if spec.varlen else 0)
        return Call(
            params,
            fparams,
            _nothing() if inputs.sinks is None else inputs.sinks.astype(mx.float32),
            _nothing() if slopes is None else slopes.astype(mx.float32).reshape(-1),
            _nothing() if inputs.bias is None else inputs.bias,
            layout,
        )

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _constants(spec: AttentionSpec, q_shape: Tuple[int, ...], k_shape: Tuple[int, ...], bias_shape,
                   has_sinks: bool, slopes_shape, cu_len: int) -> Tuple[mx.array, mx.array, Optional[BiasLayout]]:
        """``(params, fparams, bias layout)`` of `of`, from the call's shapes (made once per key)."""
        B, H, Nq, _ = q_shape
        Hkv, Nk = k_shape[1], k_shape[2]
        per_row = slopes_shape is not None and len(slopes_shape) == 2 and slopes_shape[0] != 1
        layout = None if bias_shape is None else BiasLayout.of(bias_shape, B, H, Hkv, Nq, Nk)
        strides = layout.strides if layout else (0, 0, 0, 0)
        mask = spec.block_mask
        mask_b, mask_h = mask.active.shape[:2] if mask is not None else (1, 1)
        num_seqs = cu_len - 1 if spec.varlen else 0
        threshold = round(spec.dropout_p * (1 << 24))  # as mfa/ops/dropout.py
        batch_loop = B if layout is not None and layout.batch_summed else 0
        zeroed = int(bool(batch_loop) and dq_zero_fills(spec, layout))
        total = int(batch_total(spec, layout))
        params = _constant((H, Hkv, Nq, Nk, *band_bounds(spec.causal, spec.window), int(has_sinks),
                            int(per_row), threshold, _int32(spec.dropout_seed), *strides,
                            int(bool(layout and layout.unique)), num_seqs, mask_b, mask_h, batch_loop, zeroed,
                            total), mx.int32)
        # scores in raw units (band.h's Scores): log2 units = raw · scale·log2(e)
        cap = [spec.softcap / spec.scale, spec.scale / spec.softcap] if spec.softcap else [0.0, 0.0]
        keep = 1.0 / (1.0 - spec.dropout_p)
        fparams = _constant((spec.scale * LOG2E, spec.scale, *cap, keep, 1.0 / spec.scale, 0.0, 0.0), mx.float32)
        return params, fparams, layout


def block_sizes(target: str, head_dim: int, dtype: mx.Dtype, settings: Optional[Settings] = None) -> BlockSizes:
    """The tiles `target` uses for a (compiled) head dim and dtype.

    ``$MFA_BLOCKS`` (``settings.blocks``; the environment now when ``settings`` is None)
    overrides them for tuning, e.g. ``fwd=128x64x8x2,dq=64x64x4x2x3,dkdv=64x64x4x2x0x1`` (block_q x
    block_k x warps [x stages [x min_blocks [x bias_lead]]] per kernel, see `Tiles`); ``$MFA_WGMMA=0`` turns
    off the wgmma B tiles (`blocks.wgmma`).
    """
    settings = settings or read_settings()
    return _block_sizes(build.arch_of(target), head_dim, dtype, settings.blocks, settings.wgmma)


@functools.lru_cache(maxsize=64)
def _block_sizes(arch: str, head_dim: int, dtype: mx.Dtype, override: str, allow_wgmma: bool) -> BlockSizes:
    """`block_sizes` of a fragment family and ``$MFA_BLOCKS`` / ``$MFA_WGMMA`` values (computed once per key)."""
    blocks = BlockSizes.default(head_dim, dtype, arch, allow_wgmma)
    for item in filter(None, override.split(",")):
        kernel, _, dims = item.partition("=")
        if kernel not in ("fwd", "dq", "dkdv"):
            raise ValueError(f"MFA_BLOCKS: unknown kernel {kernel!r} in {override!r}")
        blocks = dataclasses.replace(blocks, **{kernel: Tiles(*(int(x) for x in dims.split("x")))})
    return blocks


@functools.lru_cache(maxsize=256)
def _template(target: str, name: str, tiles: Tiles, dtype: mx.Dtype, d: int, spec: AttentionSpec, allow_wgmma: bool,
              bias_dtype: mx.Dtype = mx.float32, stage_bias: bool = False, dbias: int = 0,
              dbias_dtype: mx.Dtype = mx.float32, exact: bool = False, fused: bool = False, dlse: bool = False,
              heads_x: bool = False):
    """Template values of an attention kernel (computed once per key): the tiles, WG, then the
    variant switches.

    ``stage_bias`` (see `bias_tiles`) turns on BIAS_TILE where the staged tiles fit the target's
    shared memory (with ``tiles.bias_lead`` more of them in the ring, BIAS_LEAD, where those fit
    too); the kernel reads the bias element by element otherwise.  ``fused``: the dk/dv
    kernel also computes dq (FUSED_DQ, see `fused_dq`); ``dlse``: the dq kernel reads an lse
    cotangent (DLSE); ``heads_x``: the grid's x walks the heads (HX, see `heads_first`).  WG = 1
    (wgmma B tiles) wherever `blocks.wgmma` allows it, when ``allow_wgmma`` (``$MFA_WGMMA`` is
    not ``0``).  CUDA-family tiles with a ``min_blocks`` add
    MIN_BLOCKS, which `_launch` turns into the kernel's ``__launch_bounds__``.
    """
    arch = build.arch_of(target)
    wg = allow_wgmma and wgmma(arch, name, tiles, d, dtype)
    stage_dbias = stage_bias and dbias == DBIAS_ELEMENTS
    smem = shared_bytes(name, tiles, d, dtype.size, bias_dtype.size if stage_bias else 0,
                        dbias_dtype.size if stage_dbias else 0, fused, wg)
    if stage_bias and smem > SHARED_LIMIT[arch] and tiles.bias_lead:  # first without the lead
        tiles = dataclasses.replace(tiles, bias_lead=0)
        smem = shared_bytes(name, tiles, d, dtype.size, bias_dtype.size, dbias_dtype.size if stage_dbias else 0,
                            fused, wg)
    if stage_bias and smem > SHARED_LIMIT[arch]:
        stage_bias, smem = False, shared_bytes(name, tiles, d, dtype.size, fused_dq=fused, wg=wg)
    bias_lead = tiles.bias_lead if stage_bias else 0  # BIAS_LEAD means nothing without staged tiles
    template = [("T", dtype), ("D", d), ("BQ", tiles.block_q), ("BK", tiles.block_k), ("NW", tiles.warps),
                ("STAGES", tiles.stages), ("SMEM", smem), ("WG", int(wg)),
                ("SOFTCAP", int(bool(spec.softcap))), ("ALIBI", int(spec.has_alibi)), ("BIAS", int(spec.has_bias)),
                ("VARLEN", int(spec.varlen)), ("SPARSE", int(spec.block_mask is not None)),
                ("DROPOUT", int(spec.has_dropout)), ("BIAS_TILE", int(stage_bias)), ("TB", bias_dtype),
                ("BIAS_LEAD", bias_lead), ("HX", int(heads_x))]
    if arch == "cuda" and tiles.min_blocks:
        template += [("MIN_BLOCKS", tiles.min_blocks)]  # read by `_launch` for __launch_bounds__
    if name == "attention_fwd":
        template += [("EXACT", int(exact))]
    else:
        template += [("DBIAS", dbias), ("TDB", dbias_dtype)]
    if name == "attention_bwd_dq":
        template += [("DLSE", int(dlse))]
    if name == "attention_bwd_dkdv":
        template += [("FUSED_DQ", int(fused))]
    return tuple(template)


def _launch(target: str, name: str, template, threads: int, inputs, outputs, groups: Tuple[int, int, int],
            settings: Settings, zero_outputs: bool = False):
    """Run one kernel over ``groups`` threadgroups of ``threads`` threads (outputs zero-filled first
    when ``zero_outputs``; MLX prints its source when ``settings.verbose``)."""
    values = dict(template)
    smem = values.get("SMEM", 0) if target == "cuda" else 0
    min_blocks = values.get("MIN_BLOCKS", 0) if target == "cuda" else 0
    k = build.kernel(target, name, build.arch_of(target), smem, (threads, min_blocks) if min_blocks else None)
    return k(inputs=[x if x.size >= 8 else _buffer(x) for x in inputs], output_shapes=[s for s, _ in outputs],
             output_dtypes=[t for _, t in outputs],
             grid=(groups[0] * threads, groups[1], groups[2]), threadgroup=(threads, 1, 1), template=list(template),
             init_value=0 if zero_outputs else None, verbose=settings.verbose)


def _varlen_tiles(inputs: AttentionInputs, tile: int, by_keys: bool) -> Tuple[mx.array, int]:
    """Varlen ``sched = [cu_q, cu_k, tiles per sequence, cumulated]`` and the grid's tile bound.

    Computed with MLX ops on the device (no host read of cu_seqlens, so it traces under
    `mx.compile`); the kernels find their sequence by binary search.
    """
    cu_q = inputs.cu_seqlens_q.astype(mx.int32)
    cu_k = inputs.cu_seqlens_k.astype(mx.int32)
    cu = cu_k if by_keys else cu_q
    S = cu.shape[0] - 1
    total = (inputs.k if by_keys else inputs.q).shape[2]
    counts = (cu[1:] - cu[:-1] + tile - 1) // tile
    sched = mx.concatenate([cu_q, cu_k, mx.cumsum(counts)])
    return sched, (total + S * (tile - 1)) // tile


def _schedule(spec: AttentionSpec, inputs: AttentionInputs, tiles: Tiles, transposed: bool):
    """``(sched, bits, grid tiles)`` of one kernel: varlen tiles, block-sparse lists, or none."""
    tile = tiles.block_k if transposed else tiles.block_q
    if spec.varlen:
        sched, count = _varlen_tiles(inputs, tile, by_keys=transposed)
        return sched, _nothing(mx.uint32), count
    _, H, Nq, _ = inputs.q.shape
    _, Hkv, Nk, _ = inputs.k.shape
    count = -(-(Nk if transposed else Nq) // tile)
    if spec.block_mask is None:
        return _nothing(mx.int32), _nothing(mx.uint32), count
    s = sparse.schedule(spec.block_mask, Nq, Nk, tiles.block_q, tiles.block_k, *band_bounds(spec.causal, spec.window),
                        H // Hkv, transposed)
    return s.sched, _nothing(mx.uint32) if s.bits is None else s.bits, count


def heads_first(target: str, spec: AttentionSpec, count: int) -> bool:
    """Whether a kernel's grid walks the heads in x and its `count` tiles in y (HX): on the CUDA
    family, for a causal call without a window that is not varlen or block-sparse (Metal's
    dispatch order and cache are unmeasured: the tiles stay in x there).

    Each kernel takes its tiles longest first (the causal band's last query tiles, or its first
    key tiles), but a grid with the tiles in x dispatches one head's tiles, longest to shortest,
    then the next head's: the last head's longest tiles start last and run alone at the end.
    With the heads in x the GPU dispatches the same rank of every head together, so the longest
    tiles of all heads go first (FlashAttention-3's longest-processing-time-first order; a
    greedy dispatch model of 4 slots an SM on 132 SMs, causal N = 4096, 64 tiles, 32 heads: 31 %
    over the ideal with the tiles in x, 0 % with the heads).  H100, bf16, B=2 H=16 N=4096 causal,
    pipelined ms, fwd+bwd: D=64 0.91 -> 0.81, D=128 1.60 -> 1.48; with dropout 1.36 -> 1.24,
    a key-padding bias 1.30 -> 1.19, ALiBi + sinks 1.21 -> 1.10 (``h100_dropout_1207.md``).
    Block-sparse calls keep the tiles in x: their lists are already ordered per head, and with
    the heads in x (16 heads of 4 MB of K/V at N = 16384, more than the L2) fwd+bwd went 1.40 ->
    1.43 ms.  The y extent is at most 65535.
    """
    return (build.arch_of(target) == "cuda" and spec.causal and spec.window is None and not spec.varlen
            and spec.block_mask is None and count <= 65535)


def bias_tiles(spec: AttentionSpec, inputs: AttentionInputs, layout: Optional[BiasLayout]) -> bool:
    """Whether the kernels may stage the bias tile by tile through shared memory (BIAS_TILE).

    For a bias with every query row and key (``(B|1, H|1, Nq, Nk)``, Nq > 1, dense) whose rows are
    whole 16-byte chunks: the tiles then come in with contiguous (asynchronous, on CUDA) copies
    instead of one scattered read per score, and the dq kernel writes dbias row by row.  The
    alignment holds because MLX passes such a bias contiguous, at an offset of whole rows.
    """
    if layout is None or layout.mode != DBIAS_ELEMENTS or spec.varlen:
        return False
    return inputs.q.shape[2] > 1 and (inputs.k.shape[2] * inputs.bias.dtype.size) % 16 == 0


def backward_form(settings: Optional[Settings] = None) -> str:
    """``$MFA_BWD``: ``auto`` (the default: `dq_from_dbias` where it applies, `fused_dq` where
    `fuses_by_default`, else ``split``), ``split`` (always the dq kernel, then the dk/dv kernel)
    or ``fused`` (`fused_dq` where it applies, else ``split``); ``settings.backward``, or the
    environment now when ``settings`` is None."""
    choice = (settings or read_settings()).backward
    if choice not in ("auto", "split", "fused"):
        raise ValueError(f"MFA_BWD={choice!r} must be 'auto', 'split' or 'fused'")
    return choice


def fuses_by_default(target: str, spec: AttentionSpec, inputs: AttentionInputs, settings: Settings) -> bool:
    """Whether ``$MFA_BWD=auto`` asks for `fused_dq`: on CUDA, with dropout, a head dim of at
    most 64 and as many key heads as query heads, unless the call is deterministic
    (``settings.deterministic``: the fused form adds dq with atomics).

    Dropout's keep bit is a hash of each weight; the split backward hashes every weight in both
    of its kernels, the fused one once.  H100, bf16, dropout 0.1, fwd+bwd pipelined ms, split /
    fused: B=2 H=16 N=4096 D=64 causal 1.46 / 1.35; B=4 H=16 N=2048 D=64 1.30 / 1.23; B=8 H=16
    N=1024 D=64 causal 0.465 / 0.468; but D=128 causal 2.04 / 2.39 and B=2 H=32 Hkv=8 N=4096
    D=128 causal 4.14 / 5.12 (``benchmarks/results/h100_dropout_1207.md``); at D=80 and 96 (B=2
    H=16 N=4096 causal) they tie, 1.83 / 1.84 and 2.12 / 2.11 (``h100_bias_l2_1208.md``), so those
    keep the split form, which adds nothing with atomics.  Without dropout
    the split form wins (plain causal N=4096 D=64: 0.91 / 1.05 ms; block-sparse and window too).
    Metal's fused form adds element by element and is unmeasured: split.
    """
    return (settings.backward == "auto" and not settings.deterministic and spec.has_dropout
            and build.arch_of(target) == "cuda" and inputs.q.shape[-1] <= 64
            and inputs.k.shape[1] == inputs.q.shape[1])


def atomic_adds(target: str, spec: AttentionSpec, inputs: AttentionInputs,
                settings: Optional[Settings] = None) -> Optional[str]:
    """What this call's native backward sums with float32 atomic adds, whose order (and so whose
    last bits) depends on the GPU's scheduling; None when every gradient is written by plain
    stores (dq, dk, dv, dslopes' per-tile shares, and a dbias with one writer an entry or summed
    over the batch in place): then repeated calls give the same bits.

    Atomic adds come from the fused backward (dq, `fused_dq`: ``$MFA_BWD=fused``, or
    `fuses_by_default`, which a deterministic call's settings turn off) and from a bias broadcast
    so that several threadgroups reduce into one dbias entry (neither `BiasLayout.unique` nor
    ``batch_summed``: e.g. ``(B, 1, 1, Nk)`` over several heads, or a scalar).
    """
    settings = settings or read_settings()
    if backward_form(settings) == "fused":
        return "$MFA_BWD=fused adds dq with float32 atomic adds"
    if fuses_by_default(target, spec, inputs, settings):
        return "the fused backward of a dropout call adds dq with float32 atomic adds"
    if inputs.bias is None:
        return None
    B, H, Nq, _ = inputs.q.shape
    Hkv, Nk = inputs.k.shape[1], inputs.k.shape[2]
    layout = BiasLayout.of(inputs.bias.shape, B, H, Hkv, Nq, Nk)
    if layout.unique or layout.batch_summed:
        return None
    return (f"the dbias of a bias {tuple(inputs.bias.shape)} broadcast to (B, H, Nq, Nk) = {(B, H, Nq, Nk)} is "
            "summed by float32 atomic adds")


def dq_from_dbias(form: str, spec: AttentionSpec, inputs: AttentionInputs, layout: Optional[BiasLayout]) -> bool:
    """Whether dq comes from dbias as one matmul, ``dq = scale · dbias·k``, so that no dq kernel runs.

    A bias with an entry per score (``(B, H, Nq, Nk)``, nothing broadcast) has dbias = dS, the
    gradient of the scores, when no softcap sits between them (the bias is added after it).  The
    dk/dv kernel then writes dbias (DBIAS 1), the preprocess kernel computes delta, and a matmul,
    which reads dbias once, replaces the dq kernel, which read the bias, wrote dbias and
    recomputed P and dP: 5 tile products instead of 7, the same memory traffic (H100, bias
    (2, 16, 4096, 4096), D = 64: backward kernels 2.32 -> 1.78 ms).  dS enters the matmul rounded
    to dbias's dtype, as it enters the dq kernel's tile product in q's: the two agree where those
    dtypes do.  Not for ALiBi (the dq kernel reduces its slope gradient) or varlen (its bias is
    not staged).  ``$MFA_BWD=auto`` only.
    """
    return (form == "auto" and layout is not None and layout.mode == DBIAS_ELEMENTS and layout.unique
            and not spec.softcap and not spec.has_alibi and not spec.varlen and inputs.bias.dtype == inputs.q.dtype)


def _dq_of_dbias(dbias: mx.array, k: mx.array, scale: float) -> mx.array:
    """``scale · dS·k`` for dS = dbias ``(B, H, Nq, Nk)`` and k ``(B, Hkv, Nk, D)``, each group of
    ``H / Hkv`` query heads against its key head: ``(B, H, Nq, D)``.  One product with the scale
    as its alpha (``addmm`` of a zero row: cuBLAS's bias epilogue on CUDA), no scaling pass."""
    B, H, Nq, Nk = dbias.shape
    Hkv, D = k.shape[1], k.shape[-1]
    zero_row = mx.zeros((D,), dtype=mx.result_type(dbias, k))
    # a group's query heads are consecutive: their rows stack into one (group·Nq, Nk) operand
    dq = mx.addmm(zero_row, dbias.reshape(B, Hkv, (H // Hkv) * Nq, Nk), k, alpha=scale, beta=1.0)
    return dq.reshape(B, H, Nq, D)


def fused_dq(settings: Settings, target: str, spec: AttentionSpec, inputs: AttentionInputs,
             layout: Optional[BiasLayout], tiles: Tiles, d: int) -> bool:
    """Whether the dk/dv kernel also computes dq (FUSED_DQ), so that no dq kernel runs.

    FlashAttention-2's backward: dS goes through shared memory and each key tile adds its share
    of dq to a float32 dq buffer — 5 tile products instead of the split backward's 7, plus the
    adds.  Each warp stages its float dq rows over the work item's spent Q and dO tiles and adds
    them as one bulk reduction a row (FlashAttention-3's form: ``cp.reduce.async.bulk`` on CUDA,
    done by the copy engine while the warps go on; atomic adds on Metal).  Chosen by
    ``$MFA_BWD=fused`` or `fuses_by_default` (dropout on CUDA).  Without dropout it loses to the
    split backward on an H100 (block-sparse 10 % of 128 x 128 blocks, N = 16384, fwd+bwd
    pipelined: split 1.43 ms, fused 1.67, with 8-warp 128 x 128 dk/dv tiles 1.50; the earlier
    two-float atomic adds from registers: 1.88 and 1.51).  It needs
    no gradient the dq kernel reduces (ALiBi slopes; a bias with every query row), the query rows
    of a tile split evenly into whole fragments per warp, and the dS tile in the target's shared
    memory.
    """
    arch = build.arch_of(target)
    wanted = backward_form(settings) == "fused" or fuses_by_default(target, spec, inputs, settings)
    return (wanted and not spec.has_alibi and not (layout is not None and layout.mode in DQ_MODES)
            and tiles.block_q % (tiles.warps * FRAGMENT_ROWS[arch]) == 0
            and shared_bytes("attention_bwd_dkdv", tiles, d, inputs.q.dtype.size, fused_dq=True)
            <= SHARED_LIMIT[arch])


def exact_out(spec: AttentionSpec, layout: Optional[BiasLayout]) -> bool:
    """Whether the forward keeps ``out`` in float32 for the backward.

    Gradients that sum dS along query rows — dsinks, dslopes, a dbias broadcast over keys —
    rely on ``Σ_j dS_ij = Σ_j P_ij·dP_ij − delta_i·Σ_j P_ij`` cancelling; ``delta = rowsum(dO·O)``
    from an ``out`` rounded to bf16, or from P rounded to bf16 in P·V (the tensor-core
    forward), breaks that cancellation.  Such calls write out in float32 from P split in two
    bf16 parts (one more P·V product).
    """
    return spec.has_alibi or spec.has_sinks or (layout is not None and layout.mode in (DBIAS_ROWS, DBIAS_SCALAR))


def forward(target: str, spec: AttentionSpec, inputs: AttentionInputs,
            settings: Optional[Settings] = None) -> Tuple[mx.array, mx.array]:
    """Attention forward on a native target.

    Args:
        target: ``"metal"``, ``"cuda"`` or ``"emulator"``.
        spec: the static options.
        settings: the call's ``$MFA_*`` switches (`mfa.settings`); None reads them now.
        inputs: q ``(B, H, Nq, D)``; k ``(B, Hkv, Nk, D)``, v ``(B, Hkv, Nk, Dv)`` (``H % Hkv ==
            0``); optional bias ``(B|1, H|1, Nq|1, Nk|1)``, alibi_slopes ``(H,)``, ``(1|B, H)``
            (or ``(S, H)`` for varlen), sinks ``(H,)``; varlen: ``B = 1`` and cu_seqlens_q/k.

    Returns:
        ``(out, lse)``: out ``(B, H, Nq, Dv)`` in q's dtype (float32 where `exact_out`), lse
        ``(B, H, Nq)`` float32 (natural log, with the sink term; -inf for rows with nothing to
        attend, whose out is 0).
    """
    q, k, v = inputs.q, inputs.k, inputs.v
    B, H, Nq, D = q.shape
    Dv = v.shape[3]
    if Nq == 0:
        return mx.zeros((B, H, 0, Dv), q.dtype), mx.zeros((B, H, 0), mx.float32)
    settings = settings or read_settings()
    d = padded_head_dim(max(D, Dv))
    call = Call.of(spec, inputs)
    stage_bias = bias_tiles(spec, inputs, call.bias_layout)
    tiles = forward_tiles(target, spec, block_sizes(target, d, q.dtype, settings), stage_bias, settings)
    q, k, v = (_pad_head(x, d) for x in (q, k, v))
    sched, bits, count = _schedule(spec, inputs, tiles, transposed=False)
    exact = exact_out(spec, call.bias_layout)
    hx = heads_first(target, spec, count)
    template = _template(target, "attention_fwd", tiles, q.dtype, d, spec, settings.wgmma, call.bias.dtype, stage_bias,
                         exact=exact, heads_x=hx)
    out, lse = _launch(target, "attention_fwd", template,
                       tiles.threads,
                       [q, k, v, call.params, call.fparams, call.sinks, call.slopes, call.bias, sched, bits],
                       [((B, H, Nq, d), mx.float32 if exact else q.dtype), ((B, H, Nq), mx.float32)],
                       (H, count, B) if hx else (count, H, B), settings)
    return (out[..., :Dv] if d != Dv else out), lse


def _dslopes(spec: AttentionSpec, inputs: AttentionInputs, part: mx.array, tile: int) -> mx.array:
    """Reduce the dq kernel's per-tile ``dL/dslope`` shares ``(B, H, tiles)`` to the slopes' shape."""
    slopes = inputs.alibi_slopes
    per_row = slopes.ndim == 2 and slopes.shape[0] != 1
    if spec.varlen and per_row:
        # (S, H): the grid tiles of each sequence, from the cumulated tile counts
        sched, count = _varlen_tiles(inputs, tile, by_keys=False)
        S = slopes.shape[0]
        ends = sched[-S:]
        seq = (ends[None, :] <= mx.arange(count)[:, None]).astype(mx.int32).sum(axis=1)
        one_hot = (seq[:, None] == mx.arange(S)[None, :]).astype(mx.float32)
        return (part[0] @ one_hot).T.astype(slopes.dtype)
    per_bh = part.sum(axis=-1)
    return (per_bh if per_row else per_bh.sum(axis=0)).reshape(slopes.shape).astype(slopes.dtype)


def forward_tiles(target: str, spec: AttentionSpec, blocks: BlockSizes, stage_bias: bool,
                  settings: Optional[Settings] = None) -> Tiles:
    """The forward's tiles: `block_sizes`' default, except on the CUDA family (unless
    ``$MFA_BLOCKS`` sets the forward's tiles) for the variants that measured slower under its
    register cap (``min_blocks``), which spills their extra registers (H100, N = 4096, D = 64,
    causal: dropout 772 -> 785 µs, ALiBi + sinks 362 -> 377 µs; block-sparse 10 %, N = 16384:
    383 -> 435 µs), or were not measured (a staged bias, softcap): those run uncapped.  Plain,
    causal, window and varlen calls and a key-padding bias keep the cap (window 94 -> 89 µs,
    varlen 652 -> 640 µs, key-padding bias 365 -> 316 µs)."""
    return _forward_tiles(build.arch_of(target), spec, blocks, stage_bias, (settings or read_settings()).blocks)


@functools.lru_cache(maxsize=256)
def _forward_tiles(arch: str, spec: AttentionSpec, blocks: BlockSizes, stage_bias: bool, override: str) -> Tiles:
    """`forward_tiles` of a fragment family and ``$MFA_BLOCKS`` value (computed once per key)."""
    if arch != "cuda" or "fwd=" in override:
        return blocks.fwd
    if spec.block_mask is not None or spec.has_dropout or spec.has_alibi or spec.softcap or stage_bias:
        return dataclasses.replace(blocks.fwd, min_blocks=0)
    return blocks.fwd


def backward_tiles(target: str, spec: AttentionSpec, blocks: BlockSizes,
                   settings: Optional[Settings] = None) -> Tuple[Tiles, Tiles]:
    """The dq and dk/dv tiles of one backward: `block_sizes`' defaults, except on the CUDA family
    for a kernel whose tiles ``$MFA_BLOCKS`` does not set:

    - with a bias, dq has no register cap (``min_blocks``): the staged bias and dbias tiles spill
      140 B under it (H100, bias (2, 16, 4096, 4096): dq 1318 µs uncapped, 1576 µs capped);
    - a block mask of blocks at least 128 x 128 gives 128 query rows per dk/dv work item, one mask
      block each (H100, 10 % of 128 x 128 blocks, N = 16384: dk/dv 637 -> 553 µs; 128-key dq
      tiles measured no faster, 660 -> 658 µs, so dq keeps its own).
    """
    return _backward_tiles(build.arch_of(target), spec, blocks, (settings or read_settings()).blocks)


@functools.lru_cache(maxsize=256)
def _backward_tiles(arch: str, spec: AttentionSpec, blocks: BlockSizes, override: str) -> Tuple[Tiles, Tiles]:
    """`backward_tiles` of a fragment family and ``$MFA_BLOCKS`` value (computed once per key)."""
    dq, dkdv = blocks.dq, blocks.dkdv
    if arch != "cuda":
        return dq, dkdv
    if spec.has_bias and "dq=" not in override:
        dq = dataclasses.replace(dq, min_blocks=0)
    mask = spec.block_mask
    if mask is not None and min(mask.block_size) >= 128 and "dkdv=" not in override:
        dkdv = dataclasses.replace(dkdv, block_q=128)
    return dq, dkdv


def backward(target: str, spec: AttentionSpec, inputs: AttentionInputs, out: mx.array, lse: mx.array,
             dout: mx.array, dlse: Optional[mx.array], settings: Optional[Settings] = None) -> AttentionGrads:
    """Attention backward on a native target: the dq kernel (which also computes delta), then the
    dk/dv kernel; or the preprocess kernel for delta, then the dk/dv kernel, which also adds dq
    (FUSED_DQ, `fused_dq`) or writes the dbias that dq is a matmul of (`dq_from_dbias`).

    Args:
        target, spec, inputs, settings: as in `forward`.
        out, lse: the forward's results, ``(B, H, Nq, Dv)`` and ``(B, H, Nq)``.
        dout: cotangent of out, ``(B, H, Nq, Dv)``.
        dlse: cotangent of lse, ``(B, H, Nq)`` float32, or None (zero).

    Returns:
        `AttentionGrads`: dq, dk, dv shaped and typed like q, k, v (dk, dv summed over each GQA
        group), dbias reduced to the bias's shape, dalibi_slopes / dsinks when those inputs are
        given, and zeros for cu_seqlens.
    """
    q, k, v = inputs.q, inputs.k, inputs.v
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dbias = None if inputs.bias is None else mx.zeros_like(inputs.bias)
    dslopes = None if inputs.alibi_slopes is None else mx.zeros_like(inputs.alibi_slopes)
    dsinks = None if inputs.sinks is None else mx.zeros_like(inputs.sinks)
    zeros_like = lambda x: None if x is None else mx.zeros_like(x)  # noqa: E731
    cu_grads = (zeros_like(inputs.cu_seqlens_q), zeros_like(inputs.cu_seqlens_k))
    if Nq == 0 or Nk == 0:
        if dsinks is not None and Nq > 0 and dlse is not None:  # lse = sink: its cotangent flows to it
            dsinks = dlse.astype(mx.float32).sum(axis=(0, 2)).astype(inputs.sinks.dtype)
        return AttentionGrads(mx.zeros_like(q), mx.zeros_like(k), mx.zeros_like(v), dbias, dslopes, dsinks, *cu_grads)
    settings = settings or read_settings()
    d = padded_head_dim(max(D, Dv))
    dq_tiles, dkdv_tiles = backward_tiles(target, spec, block_sizes(target, d, q.dtype, settings), settings)
    # varlen's dout is a transposed view: made row-contiguous once for both kernels
    dout = dout.astype(q.dtype)
    dout = row_contiguous(dout) if spec.varlen else dout
    q, k, v, out, dout = (_pad_head(x, d) for x in (q, k, v, out, dout))
    call = Call.of(spec, inputs)
    lse = lse.astype(mx.float32)

    has_dlse = dlse is not None
    dlse = _nothing() if dlse is None else dlse.astype(mx.float32)

    # dbias: written by the dq kernel (the bias has every query row) or the dk/dv kernel (broadcast
    # over rows; or a full bias whose dbias gives dq, `dq_from_dbias`)
    layout = call.bias_layout
    mode = layout.mode if layout else 0
    dbias_dtype = inputs.bias.dtype if layout and layout.unique else mx.float32
    dbias_shape = tuple(inputs.bias.shape) if layout else (8,)
    form = backward_form(settings)
    by_dbias = dq_from_dbias(form, spec, inputs, layout)
    dkdv_modes = DKDV_MODES + ((DBIAS_ELEMENTS,) if by_dbias else ())
    zero_dq = dq_zero_fills(spec, layout)
    zero_dkdv = mode in DKDV_MODES or (by_dbias and skips_tiles(spec))
    # a batch-summed dbias: the batch rows run in each dq threadgroup, the last one writing the
    # bias-dtype sums (dbias_total) unless `batch_total` says otherwise
    summed = layout is not None and layout.batch_summed
    total = batch_total(spec, layout)

    variants = [call.params, call.fparams, call.slopes, call.bias]
    stage_bias = bias_tiles(spec, inputs, layout)
    fused = not by_dbias and fused_dq(settings, target, spec, inputs, layout, dkdv_tiles, d)

    def launch_grad(name, t, transposed, modes, ins, grads, extra, heads, zero, batches=B):
        """One backward kernel on inputs `ins` (then the variants' buffers): its gradients, dbias
        (when this kernel owns the bias's reduction), then the `extra` outputs; a grid of
        `batches` batch rows."""
        sched, bits, count = _schedule(spec, inputs, t, transposed=transposed)
        own = mode if mode in modes else 0
        dbias_out = (dbias_shape, dbias_dtype) if own else ((8,), mx.float32)
        hx = heads_first(target, spec, count)
        template = _template(target, name, t, q.dtype, d, spec, settings.wgmma, call.bias.dtype, stage_bias, own,
                             dbias_out[1], fused=fused, dlse=has_dlse, heads_x=hx)
        grid = (heads, count, batches) if hx else (count, heads, batches)
        results = _launch(target, name, template, t.threads, [*ins, *variants, sched, bits],
                          [*grads(count), dbias_out, *extra], grid, settings, zero_outputs=zero)
        return own, results

    dq_mode = 0
    if fused or by_dbias:
        # delta = rowsum(dout ∘ out) − dlse (no dlse: zero), by the preprocess kernel
        template = [("T", q.dtype), ("D", d), ("NW", 4), ("ROWS", PREPROCESS_ROWS), ("DLSE", int(has_dlse))]
        (delta,) = _launch(target, "attention_bwd_preprocess", template, 128, [out, dout, dlse, call.params],
                           [((B, H, Nq), mx.float32)], (-(-Nq // PREPROCESS_ROWS), H, B), settings)
    else:
        # dq, and delta for the dk/dv kernel
        total_out = (dbias_shape, inputs.bias.dtype) if total else ((8,), mx.float32)
        dq_mode, (dq, delta, slope_part, dbias_dq, dbias_total) = launch_grad(
            "attention_bwd_dq", dq_tiles, False, DQ_MODES, [q, k, v, dout, lse, out, dlse],
            lambda count: [((B, H, Nq, d), q.dtype), ((B, H, Nq), mx.float32), ((B, H, count), mx.float32)],
            [total_out], H, zero_dq, 1 if summed else B)
    # FUSED_DQ: dq accumulates in float32 (zero-filled with the kernel's other outputs)
    dq_accum = ((B, H, Nq, d), mx.float32) if fused else ((8,), mx.float32)
    _, (dk, dv, dbias_dkdv, dq_sum) = launch_grad(
        "attention_bwd_dkdv", dkdv_tiles, True, dkdv_modes, [q, k, v, dout, lse, delta],
        lambda count: [((B, Hkv, Nk, d), k.dtype), ((B, Hkv, Nk, d), v.dtype)], [dq_accum], Hkv,
        zero_dkdv or fused)
    if fused:
        dq = dq_sum.astype(q.dtype)
    if by_dbias:
        dq = _dq_of_dbias(dbias_dkdv, inputs.k, spec.scale).astype(q.dtype)
    if d != D:
        dq, dk = dq[..., :D], dk[..., :D]
    if d != Dv:
        dv = dv[..., :Dv]
    if dbias is not None and total:
        dbias = dbias_total
    elif dbias is not None:
        dbias = (dbias_dq if dq_mode else dbias_dkdv).astype(inputs.bias.dtype)
    if dslopes is not None:
        # dL/dslope = Σ dS·(−|j − i'|), summed per query tile in the dq kernel
        dslopes = _dslopes(spec, inputs, slope_part, dq_tiles.block_q)
    if dsinks is not None:
        # dL/dsink_h = −Σ_{b,i} exp(sink_h − lse)·(delta − dlse)
        p_sink = mx.exp(inputs.sinks.astype(mx.float32)[None, :, None] - lse)
        dsinks = -(p_sink * delta).sum(axis=(0, 2)).astype(inputs.sinks.dtype)
    return AttentionGrads(dq, dk, dv, dbias, dslopes, dsinks, *cu_grads)
