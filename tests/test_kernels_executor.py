"""The CPU executor honours GPU semantics and reports what a GPU would hang or corrupt on.

Small hand-written kernel bodies, run through `EmulatorKernel` like the attention kernels.
"""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mfa.kernels import emulator

pytestmark = pytest.mark.skipif(emulator.compiler() is None, reason="no C++ compiler")



def launch(body, inputs, out_shape, threads=64, groups=1, arch="metal", out_dtype=mx.float32, template=()):
    names = [f"in{i}" for i in range(len(inputs))]
    k = emulator.EmulatorKernel("probe", names, ["out"], body, arch=arch)
    return k(inputs=inputs, output_shapes=[out_shape], output_dtypes=[out_dtype], grid=(groups * threads, 1, 1),
             threadgroup=(threads, 1, 1), template=list(template))[0]


def test_barrier_makes_shared_writes_visible_and_shuffle_exchanges_lanes():
    body = """
    const int t = int(thread_index_in_threadgroup), g = int(threadgroup_position_in_grid.x);
    MFA_SHARED(smem, 64 * 4);
    MFA_TG float* s = reinterpret_cast<MFA_TG float*>(smem);
    s[t] = in0[g * 64 + t];
    mfa_barrier();
    float v = s[63 - t];
    out[g * 64 + t] = v + 1000.0f * mfa_shfl_xor(v, 5);
    """
    x = mx.arange(128, dtype=mx.float32)
    got = np.array(launch(body, [x], (128,), groups=2))
    xs = np.arange(128, dtype=np.float32).reshape(2, 64)
    rev = xs[:, ::-1]
    lanes = np.arange(64)
    expect = rev + 1000.0 * rev[:, (lanes ^ 5)]
    np.testing.assert_array_equal(got, expect.reshape(-1))


@pytest.mark.parametrize("arch", ["metal", "cuda"])
def test_fragment_family_matmuls_match_numpy(arch):
    # one warp: c (16 x 32) = a (16 x 16) · bᵀ (b: 32 x 16), then d (16 x 16) = c · e (e: 32 x 16)
    body = """
    using namespace mfa;
    const int tid = int(thread_index_in_threadgroup);
    const LaneCoord lc = lane_coord(tid);
    MFA_SHARED(smem, (16 + 32 + 32) * 24 * 2);
    MFA_TG T* sa = reinterpret_cast<MFA_TG T*>(smem);
    MFA_TG T* sb = sa + 16 * 24;
    MFA_TG T* se = sb + 32 * 24;
    copy_tile_async<16, 16, 32>(sa, 24, in0, 16, 16, tid);
    copy_tile_async<32, 16, 32>(sb, 24, in1, 16, 32, tid);
    copy_tile_async<32, 16, 32>(se, 24, in2, 16, 32, tid);
    mfa_async_commit();
    mfa_async_wait<0>();
    mfa_barrier();
    Acc<16, 32> c;
    c.zero();
    mma_abt<16>(c, sa, 24, sb, 24, lc);
    Acc<16, 16> d;
    d.zero();
    mma_ab<32>(d, c, se, 24, lc);
    store_acc(d, out, 16, 16, lc);
    """
    rng = np.random.default_rng(0)
    a, b, e = (rng.integers(-3, 4, size=s).astype(np.float32) for s in ((16, 16), (32, 16), (32, 16)))
    inputs = [mx.array(x).astype(mx.float16) for x in (a, b, e)]
    got = np.array(launch(body, inputs, (16, 16), threads=32, arch=arch, out_dtype=mx.float32,
                          template=[("T", mx.float16)]))
    np.testing.assert_array_equal(got, (a @ b.T) @ e)  # small integers: exact in fp16 and fp32


def test_reading_shared_memory_before_async_wait_sees_nan():
    body = """
    const int t = int(thread_index_in_threadgroup);
    MFA_SHARED(smem, 64 * 16);
    MFA_TG float* s = reinterpret_cast<MFA_TG float*>(smem);
    mfa_copy16(s + 4 * t, in0 + 4 * t, true);
    mfa_async_commit();
    mfa_barrier();
    out[t] = s[4 * t];          // too early: the copy lands at the wait
    mfa_async_wait<0>();
    """
    got = np.array(launch(body, [mx.ones((256,))], (64,)))
    assert np.isnan(got).all()


def test_missing_async_wait_is_an_error():
    body = """
    const int t = int(thread_index_in_threadgroup);
    MFA_SHARED(smem, 64 * 16);
    mfa_copy16(smem + 16 * t, in0 + 4 * t, true);
    mfa_async_commit();
    out[t] = 0.0f;
    """
    with pytest.raises(RuntimeError, match="never waited"):
        launch(body, [mx.ones((256,))], (64,))


@pytest.mark.parametrize("access, message", [
    ("mfa_copy16(smem + 16 * t, in0 + 4 * t + 1, true);", "async copy source"),   # 4 bytes past in0
    ("mfa_copy16(smem + 16 * t + 16, in0 + 4 * t, true);", "async copy destination"),  # past smem
    ("mfa_store16(out + 4 * t + 2, smem + 16 * t);", "store"),                        # 8 bytes past out
    ("mfa_atomic_add(out + 256, 1.0f);", "atomic add"),
])
def test_out_of_bounds_access_is_an_error(access, message):
    body = f"""
    const int t = int(thread_index_in_threadgroup);
    MFA_SHARED(smem, 64 * 16);
    if (t == 63) {{ {access} }}
    mfa_async_commit();
    mfa_async_wait<0>();
    """
    with pytest.raises(RuntimeError, match=message + ".*outside"):
        launch(body, [mx.ones((256,))], (256,))


def test_in_bounds_accesses_pass_the_checks():
    body = """
    const int t = int(thread_index_in_threadgroup);
    MFA_SHARED(smem, 64 * 16);
    mfa_copy16(smem + 16 * t, in0 + 4 * t, true);
    mfa_copy16(smem, in0 + 4096, false);  // a zero-fill copy reads nothing, wherever it points
    mfa_async_commit();
    mfa_async_wait<0>();
    mfa_barrier();
    mfa_store16(out + 4 * t, smem + 16 * t);
    """
    got = np.array(launch(body, [mx.arange(256, dtype=mx.float32)], (256,)))
    expect = np.arange(256, dtype=np.float32)
    expect[:4] = 0.0  # every thread's zero-fill lands on row 0, after thread 0's own copy there
    np.testing.assert_array_equal(got, expect)


def test_divergent_barrier_is_reported_not_hung():
    body = """
    const int t = int(thread_index_in_threadgroup);
    if (t < 32) mfa_barrier();   // warp 1 never arrives
    out[t] = 1.0f;
    """
    with pytest.raises(RuntimeError, match="barrier"):
        launch(body, [mx.ones((1,))], (64,))


def test_shuffle_with_missing_lanes_is_reported():
    body = """
    const int t = int(thread_index_in_threadgroup);
    float v = 1.0f;
    if (t % 32 < 16) v = mfa_shfl_xor(v, 1);   // half of each warp skips the shuffle
    out[t] = v;
    """
    with pytest.raises(RuntimeError, match="collective|deadlock"):
        launch(body, [mx.ones((1,))], (64,))


def test_threadgroup_size_must_be_whole_warps():
    with pytest.raises(RuntimeError, match="multiple of 32"):
        launch("out[0] = 1.0f;", [mx.ones((1,))], (1,), threads=48)


# One warp of the CUDA family: a 64 x 64 B tile in the swizzled wgmma layout, then 16 rows of A
# (row stride 72), and c (16 x 64) += a · bᵀ issued from them.
_WGMMA_TILES = """
    using namespace mfa;
    const int tid = int(thread_index_in_threadgroup);
    const LaneCoord lc = lane_coord(tid);
    MFA_SHARED(smem, 64 * 64 * 2 + 16 * 72 * 2);
    MFA_TG T* sb = reinterpret_cast<MFA_TG T*>(smem);
    MFA_TG T* sa = sb + 64 * 64;
"""
_WGMMA_ISSUE = """
    Acc<16, 64> c;
    c.zero();
    unsigned fa[4][4];
    BTile<1>::load_a<4>(fa, sa, 72, 0, lc);
    mfa_wgmma_fence();
    BTile<1>::issue_abt<4, 64, T>(c.v, fa, sb, 0);
"""


def launch_wgmma(body, inputs, out_shape):
    return launch(_WGMMA_TILES + body, inputs, out_shape, threads=32, arch="cuda", template=[("T", mx.bfloat16)])


def test_wgmma_product_lands_at_the_wait():
    """Emulated wgmma is asynchronous as on the GPU: the accumulator holds its old values until
    the wait, and the product is taken then (so a kernel that reads it early fails here too)."""
    body = """
    copy_b_tile_async<1, 64, 64, 32>(sb, 0, in1, 64, 64, tid);
    copy_tile_async<16, 64, 32>(sa, 72, in0, 64, 16, tid);
    mfa_async_commit();
    mfa_async_wait<0>();
    publish_b_tiles<1>();
    mfa_barrier();
    """ + _WGMMA_ISSUE + """
    Acc<16, 64> early = c;
    mfa_wgmma_commit_wait();
    store_acc(early, out, 64, 16, lc);
    store_acc(c, out + 16 * 64, 64, 16, lc);
    """
    rng = np.random.default_rng(1)
    a, b = (rng.integers(-3, 4, size=s).astype(np.float32) for s in ((16, 64), (64, 64)))
    got = np.array(launch_wgmma(body, [mx.array(a).astype(mx.bfloat16), mx.array(b).astype(mx.bfloat16)],
                                (2, 16, 64)))
    np.testing.assert_array_equal(got[0], np.zeros((16, 64), np.float32))
    np.testing.assert_array_equal(got[1], a @ b.T)


def test_missing_wgmma_wait_is_an_error():
    body = _WGMMA_ISSUE + """
    out[tid] = 0.0f;
    """
    with pytest.raises(RuntimeError, match="wgmma products never waited"):
        launch_wgmma(body, [mx.ones((32,))], (32,))


# -- AddressSanitizer builds ($MFA_EMULATOR_SANITIZE=address): plain loads of a kernel body -------

ASAN_PROBE = r'''
import sys
import mlx.core as mx
from mfa.kernels import emulator
body = "const int t = int(thread_index_in_threadgroup); out[t] = in0[t + OFFSET];"
k = emulator.EmulatorKernel("probe", ["in0"], ["out"], body, arch="cuda")
x = mx.arange(64, dtype=mx.float32)
got = k(inputs=[x], output_shapes=[(32,)], output_dtypes=[mx.float32], grid=(32, 1, 1), threadgroup=(32, 1, 1),
        template=[("OFFSET", int(sys.argv[1]))])[0]
print("sum", float(got.sum()))
'''

ASAN_ATTENTION = r'''
import os
import mlx.core as mx
import mfa
finite = True
# a staged bias (rows of whole 16-byte chunks) under a causal window, GQA; then a bias read element
# by element (90 keys), non-causal, B = 2 with the bias shared by the batch and per batch row:
# tiles past the last query row and key, whose elements must not read the bias; last, staged bias
# tiles copied ahead of the others (a ring longer than the tiles to visit)
lead = "fwd=64x64x4x2x0x1,dq=64x64x4x2x0x1,dkdv=64x64x4x2x0x2"
for B, nk, bias_b, kw, blocks in [(1, 72, 1, dict(causal=True, window=(30, 4)), ""), (2, 90, 1, {}, ""),
                                  (2, 90, 2, {}, ""), (2, 136, 1, {}, lead)]:
    os.environ["MFA_BLOCKS"] = blocks
    q = mx.random.normal((B, 4, 70, 64), key=mx.random.key(1)).astype(mx.bfloat16)
    k, v = (mx.random.normal((B, 2, nk, 64), key=mx.random.key(s)).astype(mx.bfloat16) for s in (2, 3))
    bias = mx.random.normal((bias_b, 4, 70, nk), key=mx.random.key(5)).astype(mx.bfloat16)
    f = lambda q, k, v, b: mfa.flash_attention(q, k, v, bias=b, backend="emulator", **kw).sum()
    grads = mx.grad(f, argnums=(0, 1, 2, 3))(q, k, v, bias)
    finite = finite and all(bool(mx.isfinite(g.astype(mx.float32)).all()) for g in grads)
print("finite", finite)
'''


def _run_under_asan(code, *args, tmp_path):
    """Run `code` in a Python subprocess with ASan preloaded and the emulator's kernels built with it."""
    preload = emulator.asan_preload()
    if preload is None:
        pytest.skip("the emulator's compiler has no AddressSanitizer runtime")
    env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0", MFA_EMULATOR_SANITIZE="address",
               MFA_CACHE_DIR=str(tmp_path), MFA_EMULATOR_ARCH="cuda")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


def test_asan_build_reports_a_plain_out_of_bounds_load(tmp_path):
    """A kernel body's own load past its input (no runtime check covers plain loads) ends the
    process with ASan's heap-buffer-overflow report; the same kernel in bounds runs clean."""
    fine = _run_under_asan(ASAN_PROBE, "32", tmp_path=tmp_path)
    assert fine.returncode == 0, fine.stderr[-3000:]
    assert "sum " + str(float(sum(range(32, 64)))) in fine.stdout
    bad = _run_under_asan(ASAN_PROBE, "40", tmp_path=tmp_path)
    assert bad.returncode != 0
    assert "heap-buffer-overflow" in bad.stderr, bad.stderr[-3000:]


def test_attention_kernels_are_clean_under_asan(tmp_path):
    """The forward and backward kernels of biased GQA calls (staged and element by element, edge
    tiles, a partial band, a bias ring with a lead) make no out-of-bounds access, plain loads included.  (The forward and
    dq kernels once took a last query tile as wholly inside the band and read the bias of its rows
    past the last one.)"""
    run = _run_under_asan(ASAN_ATTENTION, tmp_path=tmp_path)
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, run.stderr[-3000:]
    assert "finite True" in run.stdout


def test_asan_build_needs_the_runtime_preloaded(monkeypatch):
    """Without ASan's runtime in the process, asking for an ASan build is a clear error, not a crash."""
    monkeypatch.setenv("MFA_EMULATOR_SANITIZE", "address")
    if emulator._asan_loaded():
        pytest.skip("this process has ASan loaded")
    with pytest.raises(RuntimeError, match="LD_PRELOAD"):
        emulator.build_flags()
    monkeypatch.setenv("MFA_EMULATOR_SANITIZE", "memory")
    with pytest.raises(ValueError, match="MFA_EMULATOR_SANITIZE"):
        emulator.build_flags()
