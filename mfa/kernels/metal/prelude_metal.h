// Metal prelude: the kernel dialect in MSL.  Passed (with the tile layer) as the `header` of
// mx.fast.metal_kernel; MLX has already prepended its kernels/utils.h (metal_stdlib, bfloat16_t).
#include <metal_stdlib>
using namespace metal;

#define MFA_METAL 1
#define MFA_DEV device
#define MFA_TG threadgroup
#define MFA_THR thread
#define MFA_FUNC inline
#define MFA_UNROLL _Pragma("clang loop unroll(full)")
#define MFA_NO_UNROLL _Pragma("clang loop unroll(disable)")
#define MFA_SHARED(name, bytes)                                    \
  threadgroup float4 name##_words[((bytes) + 15) / 16];            \
  threadgroup uchar* name = reinterpret_cast<threadgroup uchar*>(name##_words)
#define MFA_INF INFINITY

MFA_FUNC void mfa_barrier() { threadgroup_barrier(mem_flags::mem_threadgroup); }
// A barrier after which the threadgroup's writes to device memory are visible to all its threads.
MFA_FUNC void mfa_barrier_device() { threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup); }

MFA_FUNC float mfa_shfl_xor(float v, int mask) { return simd_shuffle_xor(v, ushort(mask)); }

MFA_FUNC float mfa_exp2f(float x) { return metal::exp2(x); }
MFA_FUNC float mfa_log2f(float x) { return metal::log2(x); }
MFA_FUNC float mfa_fmaxf(float a, float b) { return metal::max(a, b); }
MFA_FUNC float mfa_tanhf(float x) { return metal::precise::tanh(x); }
MFA_FUNC void mfa_atomic_add(device float* p, float v) {
  atomic_fetch_add_explicit(reinterpret_cast<device atomic_float*>(p), v, memory_order_relaxed);
}
// Bulk reductions (see prelude_cuda.h): here the calling thread adds element by element, at once.
MFA_FUNC void mfa_bulk_add(device float* dst, const threadgroup float* src, int bytes) {
  for (int e = 0; e < bytes / 4; ++e) mfa_atomic_add(dst + e, src[e]);
}
MFA_FUNC void mfa_bulk_fence() {}
MFA_FUNC void mfa_bulk_commit() {}
MFA_FUNC void mfa_bulk_wait_read() {}
MFA_FUNC void mfa_bulk_wait() {}
MFA_FUNC void mfa_warp_sync() { simdgroup_barrier(mem_flags::mem_threadgroup); }

// Copy 16 bytes from device to threadgroup memory (zeros when !valid).  Metal has no
// asynchronous copy here: the copy is immediate and commit/wait do nothing.
MFA_FUNC void mfa_copy16(threadgroup void* dst, const device void* src, bool valid) {
  *static_cast<threadgroup uint4*>(dst) = valid ? *static_cast<const device uint4*>(src) : uint4(0);
}
// Copy 4 bytes (one float or int) the same way.
MFA_FUNC void mfa_copy4(threadgroup void* dst, const device void* src, bool valid) {
  *static_cast<threadgroup uint*>(dst) = valid ? *static_cast<const device uint*>(src) : 0u;
}
// Store 16 bytes from threadgroup to device memory.
MFA_FUNC void mfa_store16(device void* dst, const threadgroup void* src) {
  *static_cast<device uint4*>(dst) = *static_cast<const threadgroup uint4*>(src);
}
MFA_FUNC void mfa_async_commit() {}
template <int Keep>
MFA_FUNC void mfa_async_wait() {}

// Σ a[e]·b[e] over 8 consecutive elements of device memory (each run 16-byte aligned).
template <typename TA, typename TB>
MFA_FUNC float mfa_dot8(const device TA* a, const device TB* b) {
  float s = 0.0f;
  MFA_UNROLL
  for (int e = 0; e < 8; ++e) s += float(a[e]) * float(b[e]);
  return s;
}
