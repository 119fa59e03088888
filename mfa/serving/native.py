"""Native decode kernels: ``mfa/kernels/metal/decode_split[_mma]`` + ``decode_merge`` on CUDA, Metal or the CPU executor.

The bodies are written once in the kernel dialect (``mfa/kernels/metal/prelude_*.h``) plus ``decode_common.h``
and built per target like the attention kernels (`mfa.kernels`). A split kernel computes one partial
``(o, lse)`` per (split of the keys, KV head × query-row chunk, batch row), reading each K/V row once for
all query heads of its KV head with 16-byte loads; ``decode_merge`` combines the splits by lse and adds
the sink term. ``decode_split`` does the math on CUDA cores (every target, any supported D);
``decode_split_mma`` on tensor cores (CUDA's mma.sync, half/bfloat16, D in {64, 128}), the CUDA default.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import mlx.core as mx

from mfa.kernels import build, emulator, sources
from mfa.ops.spec import AttentionSpec
from mfa.serving.view import CONTIGUOUS, PAGED, KVView

TARGETS = ("cuda", "metal", "emulator")
SPLIT_IO = (["q", "k", "v", "seqlens", "table", "slopes", "params", "fparams"], ["o_part", "lse_part"])
MERGE_IO = (["o_part", "lse_part", "sinks", "params"], ["out", "lse"])
KINDS = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
MAX_QUERIES = 16


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch shape of the split kernel.

    Attributes:
        threads: threads per threadgroup (a multiple of 32).
        steps: ``decode_split``: K/V rows each lane group loads before computing (the U unroll: more
            bytes in flight, more registers).
        max_rows: ``decode_split``: most query rows (query heads × new tokens of one KV head) per threadgroup; more rows
            are split over threadgroups (each reads the K/V again).
        blocks: threadgroups the automatic split size aims at (enough to fill the GPU, few partials).
        mma: use ``decode_split_mma`` (tensor cores; 16 query rows per threadgroup, ``threads / 32`` warps
            each taking blocks of 16 keys) where it applies: CUDA or the CPU executor, half/bfloat16,
            D in {64, 128}.
    """

    threads: int = 128
    steps: int = 4
    max_rows: int = 4
    blocks: int = 4096
    mma: bool = True

    @staticmethod
    def default(target: str) -> "Tuning":
        """Defaults per target: CUDA fills 132 SMs; Metal and the CPU executor want fewer, larger splits.

        CUDA: the scalar body with 2 rows in flight measured fastest on an H100 (bf16, B=8, H=32,
        Hkv=8, D=128, 32k cache: 0.52 ms, 62% of 3.35 TB/s; the tensor-core body 0.60-0.75 ms).
        """
        return {
            "cuda": Tuning(steps=2, mma=False),
            "metal": Tuning(blocks=1024, mma=False),
            "emulator": Tuning(blocks=8),
        }[target]


def gpu_target() -> Optional[str]:
    """``"cuda"`` or ``"metal"`` when MLX runs on that GPU, else None."""
    if mx.default_device() != mx.gpu:
        return None
    for target in ("cuda", "metal"):
        if build.is_available(target):
            return target
    return None


def unsupported(q: mx.array, view: KVView) -> Optional[str]:
    """Why the kernels cannot run this decode (None when they can)."""
    D = view.head_dim
    if view.layout not in (CONTIGUOUS, PAGED) or view.quantized:
        return f"the {view.layout} layout{' (quantized)' if view.quantized else ''} runs on the tiled path only"
    if view.value_dim != D:
        return f"value dim {view.value_dim} differs from the head dim {D}"
    if view.dtype not in KINDS or q.dtype != view.dtype:
        return f"q {q.dtype} and the cache {view.dtype} must be one float dtype"
    vec = 16 // view.dtype.size
    lanes = D // vec
    if D % vec or lanes > 32 or 32 % lanes:
        return f"head dim {D=} must be {vec}·2^k with at most 32 lanes of {vec} elements"
    if q.shape[2] > MAX_QUERIES:
        return f"{q.shape[2]} queries exceed the kernel's {MAX_QUERIES}"
    return None


def available(view: KVView, q: mx.array) -> bool:
    """Whether ``backend="auto"`` should run the native kernels for this decode."""
    return gpu_target() is not None and unsupported(q, view) is None


def decode(q, view: KVView, spec: AttentionSpec, sinks, slopes, split_size: Optional[int], backend: str,
           tuning: Optional[Tuning] = None):
    """Split-K decode with the native kernels; same contract as the tiled path.

    ``tuning`` overrides `Tuning.default` of the target (benchmarks sweep it).

    Returns:
        ``(out (B, H, Nq, D) in q.dtype, lse (B, H, Nq) float32)``.
    """
    target = gpu_target() if backend == "auto" else backend
    if target not in TARGETS:
        raise ValueError(f"{backend=}: no native decode target here (MLX device {mx.default_device()})")
    if target != "emulator" and not build.is_available(target):
        raise ValueError(f"{backend=} is not available on this machine")
    reason = unsupported(q, view)
    if reason is not None:
        raise ValueError(f"native decode cannot run: {reason}")
    tuning = tuning or Tuning.default(target)
    NT, U = tuning.threads, tuning.steps
    B, H, Nq, D = q.shape
    Hkv, G = view.num_kv_heads, H // view.num_kv_heads
    mma = tuning.mma and target in ("cuda", "emulator") and q.dtype in (mx.float16, mx.bfloat16) and D in (64, 128)
    if mma:
        # 16 query rows per threadgroup (the M of m16n8k16); each warp takes 16 keys per step
        QR, RG, U = min(16, G * Nq), NT // 32, 16
    else:
        rows = 1 << max(0, (G * Nq - 1).bit_length())  # query rows per KV head, rounded to a power of 2
        QR = min(rows, tuning.max_rows)
        RG = NT // (D // (16 // view.dtype.size))
    QC = -(-G * Nq // QR)
    n_max = int(view.seqlens_host.max()) if view.seqlens_host.size else 0
    if split_size is None:
        # enough splits to fill the GPU; each a whole number of steps
        split_size = -(-n_max * B * Hkv * QC // tuning.blocks)
        split_size = min(8192, max(RG * U, -(-split_size // (RG * U)) * RG * U))
    S = max(1, -(-n_max // split_size))
    left, right = spec.band
    params, k, v, table, page = _layout(view)
    slope_b = 0 if slopes is None or slopes.shape[0] == 1 else H
    params = [H, Hkv, Nq, QC, S, split_size, -1 if left is None else left, -1 if right is None else right,
              *params, slope_b, view.num_slots if view.layout == CONTIGUOUS else 0]
    if max(params) >= 2**31:
        raise ValueError(f"cache strides {params[8:11]} exceed int32: split the batch into smaller caches")
    smem = RG * QR * (D + 2) * 4
    if target == "metal" and smem > 32 * 1024:
        raise ValueError(f"{tuning} needs {smem} bytes of threadgroup memory, Metal has 32 KB")
    split = _kernel(target, "decode_split_mma" if mma else "decode_split", smem)
    o_part, lse_part = split(
        inputs=[mx.contiguous(q), k, v, view.seqlens, table,
                mx.zeros((1,), mx.float32) if slopes is None else mx.contiguous(slopes),
                mx.array(params, dtype=mx.int32), mx.array([spec.scale, spec.softcap or 1.0], dtype=mx.float32)],
        output_shapes=[(B, Hkv, QC, S, QR, D), (B, Hkv, QC, S, QR)],
        output_dtypes=[mx.float32, mx.float32],
        grid=(S * NT, Hkv * QC, B),
        threadgroup=(NT, 1, 1),
        template=(
            [("T", q.dtype), ("D", D), ("QR", QR), ("NW", NT // 32)] if mma else
            [("T", q.dtype), ("KIND", KINDS[q.dtype]), ("D", D), ("QR", QR), ("NT", NT), ("U", U)]
        ) + [("PAGE", page), ("SOFTCAP", spec.softcap is not None), ("ALIBI", slopes is not None), ("SMEM", smem)],
    )
    merge = _kernel(target, "decode_merge", 0)
    out, lse = merge(
        inputs=[o_part, lse_part, mx.zeros((1,), mx.float32) if sinks is None else sinks.astype(mx.float32),
                mx.array([H, Hkv, Nq, QC, S, QR], dtype=mx.int32)],
        output_shapes=[(B, H, Nq, D), (B, H, Nq)],
        output_dtypes=[q.dtype, mx.float32],
        grid=(D, H * Nq, B),
        threadgroup=(D, 1, 1),
        template=[("T", q.dtype), ("D", D), ("SINKS", sinks is not None)],
    )
    return out, lse


def _layout(view: KVView) -> Tuple[list, mx.array, mx.array, mx.array, int]:
    """``[s_outer, s_head, s_row, NUM_PAGES, TABLE_W]``, row-contiguous K/V, the table and the page size."""
    k, v = mx.contiguous(view.k), mx.contiguous(view.v)
    D = view.head_dim
    if view.layout == PAGED:
        P, page, Hkv, _ = k.shape
        table = mx.contiguous(view.block_table.astype(mx.int32))
        return [page * Hkv * D, D, Hkv * D, P, int(table.shape[1])], k, v, table, int(page)
    if view.token_major:  # (B, N, Hkv, D)
        _, N, Hkv, _ = k.shape
        return [N * Hkv * D, D, Hkv * D, 0, 0], k, v, mx.zeros((1, 1), mx.int32), 0
    _, Hkv, N, _ = k.shape
    return [Hkv * N * D, N * D, D, 0, 0], k, v, mx.zeros((1, 1), mx.int32), 0


@functools.cache
def _kernel(target: str, name: str, shared: int):
    """The kernel object of ``name`` on ``target`` (one per CUDA dynamic shared size)."""
    inputs, outputs = MERGE_IO if name == "decode_merge" else SPLIT_IO
    body = sources.read(f"{name}.metal")
    common = sources.read("decode_common.h")
    if target == "metal":
        return mx.fast.metal_kernel(name=name, input_names=inputs, output_names=outputs, source=body,
                                    header=sources.header("metal") + common)
    if target == "cuda":
        return mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=outputs, source=body,
                                   header=sources.header("cuda") + common, shared_memory=shared)
    # the tensor-core body needs the CUDA fragment family (mma.sync) in the CPU executor
    arch = "cuda" if name == "decode_split_mma" else build.emulator_arch()
    return emulator.EmulatorKernel(name, inputs, outputs, body, header=common, arch=arch)
