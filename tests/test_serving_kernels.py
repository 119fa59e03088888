"""Native decode kernels (metal/decode_split + decode_merge): run by the CPU executor, compiled by nvcc."""

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mfa.kernels import build, sources
from mfa.ops.reference import attention_reference
from mfa.serving import KVView, decode_attention
from mfa.serving.decode import _slopes, _spec
from mfa.serving.native import Tuning, decode

pytestmark = pytest.mark.skipif(not build.is_available("emulator"), reason="the CPU executor needs a C++ compiler")


def _rand(shape, seed, dtype=mx.float32):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def _rows_reference(q, k, v, lens, **options):
    outs, lses = [], []
    for b, n in enumerate(lens):
        if n == 0:  # nothing cached: output 0, lse -inf (or the sink)
            sinks = options.get("sinks")
            outs.append(mx.zeros((1, *q.shape[1:3], v.shape[-1])))
            lse = mx.full((1, *q.shape[1:3]), -mx.inf) if sinks is None else mx.broadcast_to(sinks[None, :, None], (1, *q.shape[1:3]))
            lses.append(lse)
            continue
        row_options = dict(options)
        if row_options.get("alibi_slopes") is not None and row_options["alibi_slopes"].ndim == 2:
            row_options["alibi_slopes"] = row_options["alibi_slopes"][b : b + 1]
        o, l = attention_reference(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], **row_options)
        outs.append(o)
        lses.append(l)
    return mx.concatenate(outs), mx.concatenate(lses)


def _check(out, lse, ref_out, ref_lse, atol):
    out, ref_out = np.array(out.astype(mx.float32)), np.array(ref_out)
    lse, ref_lse = np.array(lse), np.array(ref_lse)
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=0)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=max(atol, 1e-5), rtol=1e-5)


def _paged(k, v, lens, page, seed):
    """Copy each row's tokens into shuffled pages of a pool; -1 pads the block table."""
    B, Hkv, N, D = k.shape
    num_pages = B * -(-N // page) + 3
    perm = np.random.default_rng(seed).permutation(num_pages)
    table = np.full((B, -(-N // page)), -1, np.int32)
    kp = np.zeros((num_pages, page, Hkv, D), np.float32)
    vp = np.zeros((num_pages, page, Hkv, D), np.float32)
    kn, vn, used = np.array(k.astype(mx.float32)), np.array(v.astype(mx.float32)), 0
    for b, n in enumerate(lens):
        for p in range(-(-n // page)):
            table[b, p] = perm[used]
            rows = np.arange(p * page, min(n, (p + 1) * page))
            kp[perm[used], : rows.size] = kn[b][:, rows].transpose(1, 0, 2)
            vp[perm[used], : rows.size] = vn[b][:, rows].transpose(1, 0, 2)
            used += 1
    return mx.array(kp).astype(k.dtype), mx.array(vp).astype(v.dtype), table


CASES = [
    # (D, H, Hkv, Nq, dtype, options)
    (64, 8, 2, 1, mx.float32, {}),
    (128, 8, 2, 1, mx.bfloat16, {}),
    (32, 6, 2, 3, mx.float16, {"window": (21, 0)}),
    (64, 4, 1, 2, mx.float32, {"softcap": 2.5, "alibi": True, "sinks": True}),
    (64, 4, 4, 16, mx.bfloat16, {"causal": False, "window": (30, 4)}),
]


def _options(opts, B, H):
    opts = dict(opts)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = mx.abs(_rand((B, H), 40)) * 0.2
    if opts.pop("sinks", False):
        opts["sinks"] = _rand((H,), 41)
    return opts


def _native(q, view, tuning, split_size=None, causal=True, window=None, softcap=None, sinks=None, alibi_slopes=None):
    """`decode_attention` through the CPU executor with an explicit launch `Tuning`."""
    spec = _spec(q, view, None, causal, window, softcap, sinks, alibi_slopes)
    slopes = None if alibi_slopes is None else _slopes(alibi_slopes, q.shape[0], q.shape[1])
    return decode(q, view, spec, sinks, slopes, split_size, "emulator", tuning)


KERNELS = {"scalar": Tuning(mma=False, blocks=8), "mma": Tuning(mma=True, blocks=8)}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("D,H,Hkv,Nq,dtype,opts", CASES)
def test_kernel_matches_reference(kernel, paged, D, H, Hkv, Nq, dtype, opts):
    # the mma kernel covers half/bfloat16 with D in {64, 128}; elsewhere it falls back to the scalar one
    B, N = 3, 150
    lens = [150, Nq + 2, 0 if not paged else 37]
    q, k, v = _rand((B, H, Nq, D), 1, dtype), _rand((B, Hkv, N, D), 2, dtype), _rand((B, Hkv, N, D), 3, dtype)
    options = _options(opts, B, H)
    if paged:
        kp, vp, table = _paged(k, v, lens, page=16, seed=D)
        view = KVView.paged(kp, vp, table, lens)
    else:
        view = KVView.contiguous(k, v, lens)
    out, lse = _native(q, view, KERNELS[kernel], split_size=48, **options)
    assert out.dtype == dtype and lse.dtype == mx.float32
    causal = options.pop("causal", True)
    ref_out, ref_lse = _rows_reference(q, k, v, lens, causal=causal, **options)
    tiled_out, _ = decode_attention(q, view, backend="tiled", split_size=48, return_lse=True, causal=causal, **options)
    # low precision: no worse than the tiled path's rounding of the same result (plus fp32 noise)
    atol = 2e-5 if dtype == mx.float32 else 2 * mx.abs(tiled_out.astype(mx.float32) - ref_out).max().item() + 1e-4
    _check(out, lse, ref_out, ref_lse, atol)


@pytest.mark.parametrize(
    "tuning,dtype",
    [(Tuning(threads=64, steps=1, max_rows=1, mma=False), mx.float32),
     (Tuning(threads=256, steps=8, max_rows=2, mma=False), mx.float32),
     (Tuning(threads=64), mx.bfloat16), (Tuning(threads=256), mx.bfloat16)],
)
def test_launch_shapes_do_not_change_result(tuning, dtype):
    B, H, Hkv, N, D = 2, 8, 2, 200, 64
    q, k, v = _rand((B, H, 2, D), 4, dtype), _rand((B, Hkv, N, D), 5, dtype), _rand((B, Hkv, N, D), 6, dtype)
    view = KVView.contiguous(k, v, [200, 90])
    out, lse = _native(q, view, tuning)
    ref_out, ref_lse = _rows_reference(q, k, v, [200, 90], causal=True)
    tiled = decode_attention(q, view, backend="tiled")
    atol = 2e-5 if dtype == mx.float32 else 2 * mx.abs(tiled.astype(mx.float32) - ref_out).max().item() + 1e-4
    _check(out, lse, ref_out, ref_lse, atol)


def test_kernel_bounds_checks_unvalidated_views():
    # a view built without checks, naming pages outside the pool and a length past capacity:
    # the kernel reads none of them (out-of-range pages count as masked, lengths are clamped)
    H, Hkv, D, page = 4, 2, 32, 8
    kp, vp = _rand((4, page, Hkv, D), 7), _rand((4, page, Hkv, D), 8)
    q = _rand((2, H, 1, D), 9)
    table = np.array([[2, 99, -7, 1], [3, 0, 1, 2]], np.int32)
    view = KVView.paged(kp, vp, table, [32, 10_000], check=False)
    out, lse = decode_attention(q, view, backend="emulator", return_lse=True, causal=False)
    assert np.isfinite(np.array(out)).all()
    # row 0 attends exactly its in-range pages 2 and 1; row 1 its 4 pages (32 tokens)
    good = KVView.paged(kp, vp, np.array([[2, 1], [3, 0]]), [16, 16], check=False)
    k0 = mx.concatenate([kp[2], kp[1]]).transpose(1, 0, 2)[None]
    v0 = mx.concatenate([vp[2], vp[1]]).transpose(1, 0, 2)[None]
    ref0, _ = attention_reference(q[:1], k0, v0)
    np.testing.assert_allclose(np.array(out[:1]), np.array(ref0), atol=2e-5)
    k1 = mx.concatenate([kp[i] for i in (3, 0, 1, 2)]).transpose(1, 0, 2)[None]
    v1 = mx.concatenate([vp[i] for i in (3, 0, 1, 2)]).transpose(1, 0, 2)[None]
    ref1, _ = attention_reference(q[1:], k1, v1)
    np.testing.assert_allclose(np.array(out[1:]), np.array(ref1), atol=2e-5)
    assert good.num_slots == 16


def test_unsupported_shapes_raise_for_native_and_fall_back_on_auto():
    q, k, v = _rand((1, 2, 1, 40), 10), _rand((1, 2, 20, 40), 11), _rand((1, 2, 20, 40), 12)
    with pytest.raises(ValueError, match="head dim"):
        decode_attention(q, KVView.contiguous(k, v, 20), backend="emulator")
    out = decode_attention(q, KVView.contiguous(k, v, 20), backend="auto")  # CPU: tiled
    ref, _ = attention_reference(q, k, v, causal=True)
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=2e-5)


NVCC = shutil.which("nvcc") or (Path("/usr/local/bin/nvcc") if Path("/usr/local/bin/nvcc").exists() else None)

# What MLX's custom-kernel JIT puts around a body (mlx/backend/cuda/custom_kernel.cpp), stubbed
MLX_PREAMBLE = """#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cstdint>
#define WARP_SIZE 32
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
#include <cooperative_groups.h>
"""

def _cuda_kernel(name, tag, params, template):
    """One kernel as MLX's JIT would emit it: template values as local constants around the body."""
    consts = "\n".join(
        f"  using {n} = {v};" if n == "T" else f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {n} = "
        f"{str(v).lower() if isinstance(v, bool) else v};"
        for n, v in template
    )
    return (f"namespace mlx::core::cu {{ namespace cg = cooperative_groups;\n__global__ void custom_kernel_{name}_{tag}("
            + ", ".join(params) + ") {\n" + consts + "\n" + sources.read(f"{name}.metal") + "\n}}\n")


VARIANTS = [  # (C type, KIND, D, PAGE, SOFTCAP, ALIBI)
    ("__nv_bfloat16", 2, 128, 0, False, False),
    ("__nv_bfloat16", 2, 128, 16, True, True),
    ("__half", 1, 64, 64, False, True),
    ("float", 0, 128, 0, True, False),
]


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cuda_kernels_compile_for_sm90a(tmp_path):
    units = [MLX_PREAMBLE, sources.header("cuda"), sources.read("decode_common.h")]
    for i, (ctype, kind, D, page, softcap, alibi) in enumerate(VARIANTS):
        lanes = D // (16 // (4 if ctype == "float" else 2))
        smem = (128 // lanes) * 4 * (D + 2) * 4
        units.append(_cuda_kernel(
            "decode_split", i,
            [f"const {ctype}* q", f"const {ctype}* k", f"const {ctype}* v", "const int32_t* seqlens",
             "const int32_t* table", "const float* slopes", "const int32_t* params", "const float* fparams",
             "float* o_part", "float* lse_part"],
            [("T", ctype), ("KIND", kind), ("D", D), ("QR", 4), ("NT", 128), ("U", 4), ("PAGE", page),
             ("SOFTCAP", softcap), ("ALIBI", alibi), ("SMEM", smem)]))
        if ctype != "float" and D in (64, 128):
            units.append(_cuda_kernel(
                "decode_split_mma", i,
                [f"const {ctype}* q", f"const {ctype}* k", f"const {ctype}* v", "const int32_t* seqlens",
                 "const int32_t* table", "const float* slopes", "const int32_t* params", "const float* fparams",
                 "float* o_part", "float* lse_part"],
                [("T", ctype), ("D", D), ("QR", 16), ("NW", 4), ("PAGE", page), ("SOFTCAP", softcap),
                 ("ALIBI", alibi), ("SMEM", 4 * 16 * (D + 2) * 4)]))
        units.append(_cuda_kernel(
            "decode_merge", i,
            ["const float* o_part", "const float* lse_part", "const float* sinks", "const int32_t* params",
             f"{ctype}* out", "float* lse"],
            [("T", ctype), ("D", D), ("SINKS", True)]))
    src = tmp_path / "decode.cu"
    src.write_text("\n".join(units))
    result = subprocess.run(
        [str(NVCC), "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-c", str(src), "-o",
         str(tmp_path / "decode.o"), "--resource-usage"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # every kernel compiled, none spills registers to local memory
    kernels = sum(u.startswith("namespace mlx::core::cu") for u in units)
    assert result.stderr.count("0 bytes spill stores") == kernels == 11, result.stderr[-3000:]


@pytest.mark.parametrize("backend", ["tiled", "emulator"])
def test_token_major_cache_is_read_in_place(backend):
    # flash-attention's cache layout (B, N, Hkv, D): same result as (B, Hkv, N, D)
    B, H, Hkv, N, D = 2, 4, 2, 90, 64
    q, k, v = _rand((B, H, 2, D), 20), _rand((B, Hkv, N, D), 21), _rand((B, Hkv, N, D), 22)
    lens = [90, 41]
    view = KVView.contiguous(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), lens, token_major=True)
    out, lse = decode_attention(q, view, backend=backend, split_size=32, return_lse=True)
    ref_out, ref_lse = _rows_reference(q, k, v, lens, causal=True)
    _check(out, lse, ref_out, ref_lse, 2e-5)
