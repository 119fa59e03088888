"""The ``tiled`` backend: FlashAttention-2 written with MLX array ops (forward half).

Runs on every MLX device.  Queries are cut into row tiles and keys into column tiles; for each
row tile the forward walks the active column tiles with an fp32 online softmax and keeps only
``out`` and ``lse``.  The backward (`mfa/grad/tiled_backward.py`) recomputes the scores tile by
tile from ``lse``.

GQA never repeats K/V: q is viewed as ``(B, Hkv, G, Nq, D)`` with ``G = H // Hkv`` and K/V as
``(B, Hkv, 1, Nk, D)``, so one K/V tile serves its G query heads by broadcasting.

Memory: the loop builds one lazy graph and never calls `mx.eval` (an eval inside a VJP, or on
arrays derived from differentiated inputs, keeps the whole graph alive: MLX retains the graph
of every evaluated tracer).  Instead each tile's inputs `mx.depends` on the previous tile's
running state, so MLX runs the tiles one after another and frees each score tile before the
next: O(tile) extra memory in eager mode, under `mx.grad` and under `mx.compile` alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional, Tuple

import mlx.core as mx
import numpy as np

from mfa.ops import dropout
from mfa.ops.packing import segment_positions
from mfa.ops.schedule import Segments, TileSchedule, aligned_tile, build_schedule
from mfa.ops.spec import AttentionInputs, AttentionSpec

NEG_INF = -float("inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the tiled backend.

    Attributes:
        block_q: query rows per tile.
        block_k: key columns per tile.
    """

    block_q: int
    block_k: int

    @staticmethod
    def default(device: Optional[mx.Device] = None) -> "BlockSizes":
        """Per-device defaults: big tiles on GPUs (fewer launches), moderate ones on CPU."""
        device = device or mx.default_device()
        if device.type == mx.DeviceType.gpu:
            return BlockSizes(block_q=1024, block_k=1024)
        return BlockSizes(block_q=512, block_k=512)


_override: Optional[BlockSizes] = None


@contextlib.contextmanager
def block_sizes(block_q: int, block_k: int) -> Iterator[None]:
    """Use these tile sizes for tiled calls inside the ``with`` block (tests use small tiles)."""
    global _override
    saved, _override = _override, BlockSizes(block_q, block_k)
    try:
        yield
    finally:
        _override = saved


def is_tracing(x: mx.array) -> bool:
    """True inside `mx.compile`/`mx.vmap` tracing, where arrays cannot be evaluated."""
    try:
        mx.eval(x)
        return False
    except ValueError:
        return True


def split_heads(x: mx.array, Hkv: int, G: int) -> mx.array:
    """``(B|1, H|1, ...)`` -> ``(B|1, Hkv|1, G|1, ...)``."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], Hkv, G, *x.shape[2:])


def merge_heads(x: mx.array) -> mx.array:
    """``(B, Hkv, G, ...)`` -> ``(B, H, ...)``."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


class TiledProblem:
    """One attention call in the tiled backend's layout, with per-tile score helpers."""

    def __init__(self, spec: AttentionSpec, inputs: AttentionInputs):
        self.spec, self.inputs = spec, inputs
        q, k, v = inputs.q, inputs.k, inputs.v
        self.B, self.H, self.Nq, self.D = q.shape
        self.Hkv, self.Nk, self.Dv = k.shape[1], k.shape[2], v.shape[3]
        self.G = self.H // self.Hkv
        self._after = []
        self.q5 = split_heads(q, self.Hkv, self.G)
        self.k5, self.v5 = k[:, :, None], v[:, :, None]
        self.bias5 = None if inputs.bias is None else split_heads(inputs.bias, self.Hkv, self.G)
        self.sinks5 = None
        if inputs.sinks is not None:
            self.sinks5 = inputs.sinks.astype(mx.float32).reshape(1, self.Hkv, self.G, 1, 1)
        self._coordinates()
        self.schedule = self._schedule()

    # -- coordinates and schedule -------------------------------------------------------------

    def _coordinates(self) -> None:
        """Key-axis position of every query row (``i'``) and key column, plus varlen segments."""
        spec, inputs = self.spec, self.inputs
        self.q_seg = self.k_seg = None
        if spec.varlen:
            self.q_seg, q_local = segment_positions(inputs.cu_seqlens_q, self.Nq)
            self.k_seg, self.k_pos = segment_positions(inputs.cu_seqlens_k, self.Nk)
            lengths_q = inputs.cu_seqlens_q[1:] - inputs.cu_seqlens_q[:-1]
            lengths_k = inputs.cu_seqlens_k[1:] - inputs.cu_seqlens_k[:-1]
            self.q_pos = q_local + (lengths_k - lengths_q)[self.q_seg]
        else:
            self.q_pos = mx.arange(self.Nq, dtype=mx.int32) + (self.Nk - self.Nq)
            self.k_pos = mx.arange(self.Nk, dtype=mx.int32)
        # ALiBi slopes per query row: (B|1, Hkv, G, Nq|1, 1)
        self.row_slopes = None
        slopes = inputs.alibi_slopes
        if slopes is not None:
            slopes = slopes.astype(mx.float32)
            if spec.varlen and slopes.ndim == 2:
                per_row = slopes[self.q_seg].T  # (H, Nq)
                self.row_slopes = per_row.reshape(1, self.Hkv, self.G, self.Nq, 1)
            else:
                self.row_slopes = slopes.reshape(-1, self.Hkv, self.G, 1, 1)

    def _schedule(self) -> TileSchedule:
        spec = self.spec
        sizes = _override or BlockSizes.default()
        tile_q, tile_k = sizes.block_q, sizes.block_k
        if spec.block_mask is not None:
            bq, bk = spec.block_mask.block_size
            tile_q, tile_k = aligned_tile(tile_q, bq), aligned_tile(tile_k, bk)
        segments = None
        if spec.varlen and not is_tracing(self.inputs.cu_seqlens_q):
            cu_q, cu_k = self.inputs.cu_seqlens_q, self.inputs.cu_seqlens_k
            segments = Segments.from_cu_seqlens(np.array(cu_q), np.array(cu_k))
        return build_schedule(spec, self.Nq, self.Nk, tile_q, tile_k, segments)

    def step(self, *arrays: mx.array) -> None:
        """End of one tile: the next tile's inputs wait for this running state (O(tile) memory)."""
        self._after = list(arrays)

    def ordered(self, x: mx.array) -> mx.array:
        """``x``, scheduled after the last tile's state, so MLX runs tiles one after another."""
        return mx.depends(x, self._after) if self._after else x

    # -- one score tile -------------------------------------------------------------------------

    def keep_mask(self, r0: int, r1: int, c0: int, c1: int) -> Optional[mx.array]:
        """Element keep-mask of tile ``[r0:r1, c0:c1]``, broadcastable to ``(B, Hkv, G, bq, bk)``."""
        spec = self.spec
        keep = None

        def both(a, b):
            return b if a is None else a & b

        if spec.varlen:
            keep = self.q_seg[r0:r1, None] == self.k_seg[None, c0:c1]
        left, right = spec.band
        if left is not None or right is not None:
            diff = self.k_pos[None, c0:c1] - self.q_pos[r0:r1, None]
            if left is not None:
                keep = both(keep, diff >= -left)
            if right is not None:
                keep = both(keep, diff <= right)
        if spec.block_mask is not None:
            element = split_heads(spec.block_mask.element_mask(r0, r1, c0, c1), self.Hkv, self.G)
            keep = element if keep is None else element & keep
        return keep

    def scores(self, r0: int, r1: int, c0: int, c1: int, full: bool) -> Tuple[mx.array, Optional[mx.array]]:
        """Masked fp32 scores of tile ``[r0:r1, c0:c1]``, shape ``(B, Hkv, G, bq, bk)``.

        Returns ``(s, t)`` with ``t = tanh(raw / softcap)`` when softcap is on (the backward
        needs it for the softcap derivative), else None.
        """
        spec = self.spec
        # the forward runs in float32 (operands upcast per tile): the backward's delta then
        # matches the recomputed P, which keeps broadcast-bias/sink gradients accurate
        qt, kt = self.ordered(self.q5[..., r0:r1, :]), self.k5[..., c0:c1, :]
        s = (qt.astype(mx.float32) @ kt.astype(mx.float32).swapaxes(-1, -2)) * spec.scale
        t = None
        if spec.softcap is not None:
            t = mx.tanh(s / spec.softcap)
            s = spec.softcap * t
        if self.row_slopes is not None:
            distance = mx.abs(self.k_pos[None, c0:c1] - self.q_pos[r0:r1, None]).astype(mx.float32)
            rows = self.row_slopes if self.row_slopes.shape[3] == 1 else self.row_slopes[..., r0:r1, :]
            s = s - rows * distance
        if self.bias5 is not None:
            bias = self.bias5
            bias = bias[..., r0:r1, :] if bias.shape[3] > 1 else bias
            bias = bias[..., c0:c1] if bias.shape[4] > 1 else bias
            s = s + bias.astype(mx.float32)
        if not full:
            keep = self.keep_mask(r0, r1, c0, c1)
            if keep is not None:
                s = mx.where(keep, s, NEG_INF)
        return s, t

    def dropout_scale(self, r0: int, r1: int, c0: int, c1: int) -> mx.array:
        """``keep / (1 - p)`` of tile ``[r0:r1, c0:c1]`` (float32, ``(B, Hkv, G, bq, bk)``)."""
        p = self.spec.dropout_p
        head = (mx.arange(self.B) * self.H).reshape(-1, 1, 1, 1, 1) + mx.arange(self.H).reshape(
            1, self.Hkv, self.G, 1, 1
        )
        rows = self.ordered(mx.arange(r0, r1)).reshape(-1, 1)
        cols = mx.arange(c0, c1).reshape(1, -1)
        keep = dropout.keep_mask(self.spec.dropout_seed, p, head, rows, cols)
        return mx.where(keep, 1.0 / (1.0 - p), 0.0)

    def initial_state(self, rows: int) -> Tuple[mx.array, mx.array]:
        """Running max and sum of the online softmax; sinks start them at ``(sink, 1)``."""
        shape = (self.B, self.Hkv, self.G, rows, 1)
        if self.sinks5 is not None:
            return mx.broadcast_to(self.sinks5, shape), mx.ones(shape)
        return mx.full(shape, NEG_INF), mx.zeros(shape)


def _finite(m: mx.array) -> mx.array:
    """The running max with -inf (nothing seen yet) replaced by 0, so ``exp(x - m)`` is safe."""
    return mx.where(m == NEG_INF, 0.0, m)


def _finalize_lse(m: mx.array, l: mx.array) -> mx.array:
    """``lse = m + log(l)``, and -inf for rows with nothing to attend (``l == 0``)."""
    return mx.where(l > 0, _finite(m) + mx.log(mx.where(l > 0, l, 1.0)), NEG_INF)


def forward(spec: AttentionSpec, inputs: AttentionInputs) -> Tuple[mx.array, mx.array]:
    """Tiled FlashAttention-2 forward.

    Args:
        spec: static options.
        inputs: q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``, v ``(B, Hkv, Nk, Dv)`` and extras.

    Returns:
        ``(out, lse)``: out ``(B, H, Nq, Dv)`` float32 (the op casts it to q's dtype; the
        backward's ``delta = rowsum(dO·O)`` is then consistent with the recomputed P, which
        keeps gradients of broadcast biases, slopes and sinks accurate), lse ``(B, H, Nq)``
        float32.
    """
    P = TiledProblem(spec, inputs)
    sched = P.schedule
    outs, lses = [], []
    for i, (r0, r1) in enumerate(sched.row_tiles):
        m, l = P.initial_state(r1 - r0)
        acc = mx.zeros((P.B, P.Hkv, P.G, r1 - r0, P.Dv), dtype=mx.float32)
        for j in sched.cols_of_row(i):
            c0, c1 = sched.col_tiles[j]
            s, _ = P.scores(r0, r1, c0, c1, full=bool(sched.full[i, j]))
            # online softmax: new running max, rescale the running sum and accumulator
            m_new = mx.maximum(m, s.max(axis=-1, keepdims=True))
            alpha = mx.exp(m - _finite(m_new))
            p = mx.exp(s - _finite(m_new))
            l = l * alpha + p.sum(axis=-1, keepdims=True)
            if spec.has_dropout:
                p = p * P.dropout_scale(r0, r1, c0, c1)
            acc = acc * alpha + p @ P.v5[..., c0:c1, :].astype(mx.float32)
            m = m_new
            P.step(m, l, acc)
        outs.append(acc / mx.where(l > 0, l, 1.0))
        lses.append(_finalize_lse(m, l))
    out = mx.concatenate(outs, axis=3) if outs else mx.zeros((P.B, P.Hkv, P.G, 0, P.Dv))
    lse = mx.concatenate(lses, axis=3) if lses else mx.zeros((P.B, P.Hkv, P.G, 0, 1))
    return merge_heads(out), merge_heads(lse)[..., 0]


def logsumexp(spec: AttentionSpec, inputs: AttentionInputs) -> mx.array:
    """Only the ``lse (B, H, Nq)`` of the forward (no ``P·V``): for a backward after an SDPA forward."""
    P = TiledProblem(spec, inputs)
    sched = P.schedule
    lses = []
    for i, (r0, r1) in enumerate(sched.row_tiles):
        m, l = P.initial_state(r1 - r0)
        for j in sched.cols_of_row(i):
            c0, c1 = sched.col_tiles[j]
            s, _ = P.scores(r0, r1, c0, c1, full=bool(sched.full[i, j]))
            m_new = mx.maximum(m, s.max(axis=-1, keepdims=True))
            l = l * mx.exp(m - _finite(m_new)) + mx.exp(s - _finite(m_new)).sum(axis=-1, keepdims=True)
            m = m_new
            P.step(m, l)
        lses.append(_finalize_lse(m, l))
    lse = mx.concatenate(lses, axis=3) if lses else mx.zeros((P.B, P.Hkv, P.G, 0, 1))
    return merge_heads(lse)[..., 0]
