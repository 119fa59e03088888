"""The CPU executor honours GPU semantics and reports what a GPU would hang or corrupt on.

Small hand-written kernel bodies, run through `EmulatorKernel` like the attention kernels.
"""

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
