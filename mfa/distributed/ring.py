"""`ring_attention`: context-parallel attention over the ranks of an ``mx.distributed`` group.

Each rank holds ``N / W`` tokens of the sequence (`mfa.distributed.layout`).  The forward walks the
``W`` K/V slices (`mfa.distributed.comm`): against each it runs the fused attention on the blocks
the mask keeps (`mfa.distributed.plan`) and merges the partial results by their log-sum-exp::

    lse = log Σ_i exp(lse_i)          out = Σ_i exp(lse_i − lse) · out_i

The backward is registered as a custom VJP.  It walks the slices again and runs mfa's fused
backward per block with the *global* ``out`` and ``lse`` of the rows, so every block's recomputed
probabilities ``P_ij = exp(S_ij − lse)`` and ``delta = rowsum(dO·out) − dlse`` are those of the
whole sequence: the per-block dQ add up locally and the per-block dK/dV are sent back to the rank
that owns the slice.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from mfa.distributed import comm as transports
from mfa.distributed.layout import check_layout, chunks_per_rank
from mfa.distributed.plan import plan
from mfa.grad.function import Implementation, implementation
from mfa.ops import checks, routing
from mfa.ops.spec import AttentionInputs, AttentionSpec

FUSED = ("tiled", "metal", "cuda", "emulator")


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Static options of one ring attention call (the same on every rank but ``rank``)."""

    scale: float
    causal: bool
    layout: str
    transport: str
    backend: str
    scatter: bool
    rank: int
    world: int
    n_local: int

    def spec(self, causal: bool) -> AttentionSpec:
        return AttentionSpec(scale=self.scale, causal=causal)

    def blocks(self, source: int):
        return plan(self.rank, source, self.world, self.n_local, causal=self.causal, layout=self.layout)

    @property
    def chunk(self) -> int:
        """Granularity of the plan's row ranges."""
        return self.n_local // chunks_per_rank(self.layout) if self.causal else self.n_local


def merge_partials(o1: mx.array, lse1: mx.array, o2: mx.array, lse2: mx.array) -> Tuple[mx.array, mx.array]:
    """Attention over two disjoint key sets from each one's ``(out (..., Dv), lse)``, float32.

    ``lse = log(exp(lse1) + exp(lse2))``, ``out = exp(lse1 − lse)·o1 + exp(lse2 − lse)·o2``; a side
    with no keys (``lse = -inf``) weighs 0, and rows with none on either side stay ``(0, -inf)``.
    """
    lse = mx.logaddexp(lse1, lse2)
    finite = mx.where(lse == -mx.inf, 0.0, lse)
    out = o1 * mx.exp(lse1 - finite)[..., None] + o2 * mx.exp(lse2 - finite)[..., None]
    return out, lse


def _rows(x: mx.array, span: Tuple[int, int]) -> mx.array:
    """Rows ``span`` of the sequence axis (axis 2 of ``(B, H, N, ...)``, last of ``(B, H, N)``)."""
    return x[:, :, span[0]:span[1]]


class _Chunks:
    """Per-chunk accumulators along the local sequence axis (plan ranges are unions of chunks)."""

    def __init__(self, n_local: int, chunk: int):
        self.spans = [(s, s + chunk) for s in range(0, n_local, chunk)]
        self.chunk = chunk
        self.items: List[Optional[Tuple[mx.array, ...]]] = [None] * len(self.spans)

    def split(self, span: Tuple[int, int], *arrays: mx.array):
        """``(chunk index, the chunk's part of each array)`` for the chunks of ``span``."""
        for index in range(span[0] // self.chunk, span[1] // self.chunk):
            start = self.spans[index][0] - span[0]
            yield index, tuple(_rows(a, (start, start + self.chunk)) for a in arrays)

    def add(self, span: Tuple[int, int], *arrays: mx.array) -> None:
        """Sum ``arrays`` (rows ``span``) into the chunks they cover."""
        for i, parts in self.split(span, *arrays):
            self.items[i] = parts if self.items[i] is None else tuple(a + b for a, b in zip(self.items[i], parts))

    def merge(self, span: Tuple[int, int], out: mx.array, lse: mx.array) -> None:
        """Merge a partial attention result ``(out, lse)`` of rows ``span`` by log-sum-exp."""
        for i, (o, l) in self.split(span, out.astype(mx.float32), lse):
            if self.items[i] is None:
                self.items[i] = (o, l)
            else:
                self.items[i] = merge_partials(*self.items[i], o, l)

    def result(self, empty: Sequence[mx.array]) -> List[mx.array]:
        """Each accumulated array over the whole local sequence; ``empty[k]`` fills untouched chunks."""
        columns = []
        for k, fill in enumerate(empty):
            parts = [item[k] if item is not None else _rows(fill, span) for item, span in zip(self.items, self.spans)]
            columns.append(mx.concatenate(parts, axis=2))
        return columns


def _forward(cfg: RingConfig, group, impl: Implementation, q, k, v) -> Tuple[mx.array, mx.array]:
    B, H, n, _ = q.shape
    state = _Chunks(n, cfg.chunk)
    transport = transports.Transport(cfg.transport, group, (k, v))
    for source, (ks, vs) in transport.slices():
        for block in cfg.blocks(source):
            inputs = AttentionInputs(_rows(q, block.q), _rows(ks, block.kv), _rows(vs, block.kv))
            out, lse = impl.forward(cfg.spec(block.causal), inputs)
            state.merge(block.q, out, lse)
    empty_out = mx.zeros((B, H, n, v.shape[3]))
    out, lse = state.result([empty_out, mx.full((B, H, n), -mx.inf)])
    return out, lse


def _backward(cfg: RingConfig, group, impl: Implementation, q, k, v, out, lse, dout, dlse):
    if cfg.backend != "tiled":
        out = out.astype(q.dtype)  # native kernels read out in the inputs' dtype, as their forward wrote it
    dq = _Chunks(q.shape[2], cfg.chunk)
    transport = transports.Transport(cfg.transport, group, (k, v), scatter=cfg.scatter)
    for source, (ks, vs) in transport.slices():
        dkv = _Chunks(k.shape[2], cfg.chunk)
        for block in cfg.blocks(source):
            rows = lambda x: _rows(x, block.q)  # noqa: E731
            inputs = AttentionInputs(rows(q), _rows(ks, block.kv), _rows(vs, block.kv))
            grads = impl.backward(cfg.spec(block.causal), inputs, rows(out), rows(lse), rows(dout),
                                   None if dlse is None else rows(dlse))
            dq.add(block.q, grads.dq.astype(mx.float32))
            dkv.add(block.kv, grads.dk.astype(mx.float32), grads.dv.astype(mx.float32))
        # dK/dV of this slice go back to its owner (on the ring: with the next hop)
        transport.give_back(source, dkv.result([mx.zeros(k.shape), mx.zeros(v.shape)]))
    dk, dv = transport.owned()
    (dq_full,) = dq.result([mx.zeros(q.shape)])
    return dq_full.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _ring_function(cfg: RingConfig, group):
    """The custom function ``(q, k, v) -> (out float32, lse)`` with the ring backward as its VJP."""
    impl = implementation(cfg.backend)

    @mx.custom_function
    def ring(q, k, v):
        return _forward(cfg, group, impl, q, k, v)

    @ring.vjp
    def ring_vjp(primals, cotangents, outputs):
        q, k, v = primals
        out, lse = outputs
        dout, dlse = cotangents
        return tuple(_backward(cfg, group, impl, q, k, v, out, lse, dout, dlse))

    return ring


def _choose_backend(backend: str, q: mx.array, k: mx.array, v: mx.array, causal: bool) -> str:
    """The fused backend that runs every block: a native kernel where it covers the call, else tiled."""
    if backend not in ("auto",) + FUSED:
        raise ValueError(f"ring_attention needs a fused forward/backward backend, one of {('auto',) + FUSED}, "
                         f"got {backend=}")
    route = routing.choose(backend, AttentionSpec(scale=1.0, causal=causal), AttentionInputs(q, k, v), True)
    return route.backend if route.backend in FUSED else "tiled"


def ring_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    group=None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    layout: str = "zigzag",
    comm: str = "auto",
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Context-parallel (ring) attention: each rank holds a slice of the sequence.

    Collective: every rank of ``group`` calls it with its own slice, in the same order as its
    other collectives.  The result on each rank is exactly the rows of
    ``mfa.flash_attention(Q, K, V, causal=causal)`` over the full sequence that the rank holds,
    and ``mx.grad`` through it gives the rank's rows of dQ, dK, dV.  Slices come from
    `mfa.distributed.shard` (zig-zag order balances the causal work)::

        N = 8, W = 2, zig-zag:  tokens 0 1 | 2 3 | 4 5 | 6 7
                                rank 0: [0 1 6 7]      rank 1: [2 3 4 5]

    Args:
        q: this rank's queries ``(B, H, n, D)``, ``n = N / W``.
        k: this rank's keys ``(B, Hkv, n, D)`` (same positions as q), ``H % Hkv == 0``.
        v: this rank's values ``(B, Hkv, n, Dv)``.
        group: an ``mx.distributed`` group. Default: the global group (``mx.distributed.init()``).
        causal: causal attention over the global sequence. Default: ``False``.
        scale: score multiplier. Default: ``D ** -0.5``.
        layout: how the sequence was sharded, ``"zigzag"`` or ``"contiguous"``. Default: ``"zigzag"``.
        comm: ``"ring"`` (send/recv, K/V hop from rank to rank), ``"all_gather"`` (one
            collective gathers every slice; the only one on MLX's NCCL backend) or ``"auto"``
            (ring where the backend has send/recv). Default: ``"auto"``.
        return_lse: also return the rows' log-sum-exp over the whole sequence. Default: ``False``.
        backend: fused backend of the per-block math, ``"auto"``, ``"tiled"``, ``"cuda"``,
            ``"metal"`` or ``"emulator"``. Default: ``"auto"`` (native kernels where they cover the
            call, else tiled).

    Returns:
        ``out (B, H, n, Dv)`` in q's dtype, or ``(out, lse)`` with ``lse (B, H, n)`` float32.
    """
    checks.check_qkv(q, k, v, rank=4, layout="(B, H, N, D)")
    checks.check_dense_shapes(q, k, v)
    checks.check_scale(scale)
    check_layout(layout)
    n, nk = q.shape[2], k.shape[2]
    if n != nk:
        raise ValueError(f"q and k must hold the same tokens of the sequence, got local lengths {n=} and {nk=}")
    if causal and n % chunks_per_rank(layout) != 0:
        raise ValueError(f"local length {n=} must be divisible by {chunks_per_rank(layout)} for the {layout} layout")
    group = group or mx.distributed.init()
    transport = transports.resolve(comm, group)
    cfg = RingConfig(
        scale=float(q.shape[3] ** -0.5 if scale is None else scale),
        causal=bool(causal),
        layout=layout,
        transport=transport,
        backend=_choose_backend(backend, q, k, v, causal),
        scatter=transport == "all_gather" and group.size() > 1 and transports.sum_scatter_supported(group),
        rank=group.rank(),
        world=group.size(),
        n_local=n,
    )
    out, lse = _ring_function(cfg, group)(q, k, v)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out
