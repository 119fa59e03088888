// CUDA prelude: the kernel dialect in CUDA C++ with inline PTX.  Passed (with the tile layer) as
// the `header` of mx.fast.cuda_kernel, which NVRTC compiles for sm_90a; the kernel body lands
// inside `namespace mlx::core::cu` with the template values as local constexprs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define MFA_CUDA 1
#define MFA_DEV
#define MFA_TG
#define MFA_THR
#define MFA_FUNC __device__ __forceinline__
#define MFA_UNROLL _Pragma("unroll")
#define MFA_NO_UNROLL _Pragma("unroll 1")
#define MFA_SHARED(name, bytes) extern __shared__ __align__(1024) unsigned char name[]
#define MFA_INF __int_as_float(0x7f800000)
#define threadgroup_position_in_grid blockIdx
#define thread_index_in_threadgroup threadIdx.x

MFA_FUNC void mfa_barrier() { __syncthreads(); }
// A barrier after which the threadgroup's writes to device memory are visible to all its threads.
MFA_FUNC void mfa_barrier_device() { __syncthreads(); }

MFA_FUNC float mfa_shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

MFA_FUNC float mfa_exp2f(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
MFA_FUNC float mfa_log2f(float x) { return log2f(x); }
MFA_FUNC float mfa_fmaxf(float a, float b) { return fmaxf(a, b); }
MFA_FUNC float mfa_tanhf(float x) { return tanhf(x); }
MFA_FUNC void mfa_atomic_add(float* p, float v) { atomicAdd(p, v); }

MFA_FUNC unsigned mfa_smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// cp.async of 16 bytes from global to shared memory (zero-filled when !valid).
MFA_FUNC void mfa_copy16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(mfa_smem_addr(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}
// cp.async of 4 bytes (one float or int; through L1, as .cg takes 16 bytes only).
MFA_FUNC void mfa_copy4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(mfa_smem_addr(dst)),
               "l"(src), "r"(valid ? 4 : 0));
}
// Store 16 bytes from shared to global memory.
MFA_FUNC void mfa_store16(void* dst, const void* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}
MFA_FUNC void mfa_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Keep>
MFA_FUNC void mfa_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Keep));
}

// Σ a[e]·b[e] over 8 consecutive elements of device memory (each run 16-byte aligned), read with
// 16-byte loads.
template <typename TA, typename TB>
MFA_FUNC float mfa_dot8(const TA* a, const TB* b) {
  TA av[8];
  TB bv[8];
  MFA_UNROLL
  for (int w = 0; w < int(sizeof(av)) / 16; ++w) reinterpret_cast<uint4*>(av)[w] = reinterpret_cast<const uint4*>(a)[w];
  MFA_UNROLL
  for (int w = 0; w < int(sizeof(bv)) / 16; ++w) reinterpret_cast<uint4*>(bv)[w] = reinterpret_cast<const uint4*>(b)[w];
  float s = 0.0f;
  MFA_UNROLL
  for (int e = 0; e < 8; ++e) s += float(av[e]) * float(bv[e]);
  return s;
}

// Two values as one 32-bit operand register: `lo` in bits 0..15, `hi` in bits 16..31.
template <typename T>
MFA_FUNC unsigned mfa_pack2(float lo, float hi);
template <>
MFA_FUNC unsigned mfa_pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
template <>
MFA_FUNC unsigned mfa_pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// The low (bits 0..15) or high half of a 32-bit register of two T values, as a float.
template <typename T>
MFA_FUNC float mfa_unpack2(unsigned x, int hi);
template <>
MFA_FUNC float mfa_unpack2<__nv_bfloat16>(unsigned x, int hi) {
  return __uint_as_float(hi ? x & 0xffff0000u : x << 16);
}
template <>
MFA_FUNC float mfa_unpack2<__half>(unsigned x, int hi) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(hi ? x >> 16 : x & 0xffffu)));
}

// x rounded to T (round to nearest even), as a float.
template <typename T>
MFA_FUNC float mfa_round(float x);
template <>
MFA_FUNC float mfa_round<__nv_bfloat16>(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}
template <>
MFA_FUNC float mfa_round<__half>(float x) {
  return __half2float(__float2half_rn(x));
}

// d[0..3] += A(16x16) * B(16x8), fp32 accumulate.
template <typename T>
MFA_FUNC void mfa_mma16816(float* d, const unsigned* a, const unsigned* b);
template <>
MFA_FUNC void mfa_mma16816<__nv_bfloat16>(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
MFA_FUNC void mfa_mma16816<__half>(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix.x4: lanes 8j..8j+7 give the row addresses of 8x8 matrix j (16-byte aligned rows).
MFA_FUNC void mfa_ldmatrix_x4(unsigned* r, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(mfa_smem_addr(row)));
}
MFA_FUNC void mfa_ldmatrix_x4_trans(unsigned* r, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(mfa_smem_addr(row)));
}

// stmatrix.x4 .trans (sm_90): lanes 8j..8j+7 give the row addresses of 8x8 matrix j (16-byte
// aligned rows); r[j] holds the ldmatrix layout of matrix j before the transpose, stored transposed.
MFA_FUNC void mfa_stmatrix_x4_trans(const unsigned* r, void* row) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(mfa_smem_addr(row)),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// wgmma (sm_90a), issued by the 4 warps of a warpgroup together: this warp's 16 x 64 slice of the
// warpgroup's 64 x 64 float32 accumulator (the mma.sync m16n8 layout, 8 fragments side by side)
// += A (this warp's 16 x 16 rows, the mma.sync A fragment in registers) · B (16 x 64, shared
// memory, described by `desc`).  TRANS = 0: B is stored k-major (its columns contiguous, e.g. a K tile for
// q·kᵀ); TRANS = 1: n-major (its rows contiguous, e.g. a V tile for p·v).  Asynchronous: the
// registers of d and a stay untouched until mfa_wgmma_commit_wait.
template <typename T, int TRANS>
MFA_FUNC void mfa_wgmma_n64_desc(float* d, const unsigned* a, unsigned long long desc);
#define MFA_WGMMA_N64(TYPE, PTX, TRANS)                                                                                \
  template <>                                                                                                          \
  MFA_FUNC void mfa_wgmma_n64_desc<TYPE, TRANS>(float* d, const unsigned* a, unsigned long long desc) {                     \
    asm volatile(                                                                                                      \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                                   \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " "                                                  \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                      \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, " #TRANS ";\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),              \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),        \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),      \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])       \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                                              \
  }
MFA_WGMMA_N64(__nv_bfloat16, "bf16", 0)
MFA_WGMMA_N64(__nv_bfloat16, "bf16", 1)
MFA_WGMMA_N64(__half, "f16", 0)
MFA_WGMMA_N64(__half, "f16", 1)
#undef MFA_WGMMA_N64

// Shared-memory matrix descriptor, 128-byte swizzle: start address, lbo, sbo in 16-byte units.
MFA_FUNC unsigned long long mfa_wgmma_desc(const void* b, int lbo, int sbo) {
  return (unsigned long long)((mfa_smem_addr(b) >> 4) & 0x3fff) |
         ((unsigned long long)((lbo >> 4) & 0x3fff) << 16) | ((unsigned long long)((sbo >> 4) & 0x3fff) << 32) |
         (1ull << 62);
}
// The wgmma above with B at `b` in the 128-byte swizzle layout (see frag_wgmma.h): 128-byte rows
// whose 16-byte chunks are permuted by XOR with the row's index within its 1024-byte-aligned
// block of 8 rows; `sbo` bytes between blocks of 8 rows; `lbo` bytes between the 64-element
// halves of an n-major operand (unused for k-major ones).
template <typename T, int TRANS>
MFA_FUNC void mfa_wgmma_n64(float* d, const unsigned* a, const void* b, int lbo, int sbo) {
  mfa_wgmma_n64_desc<T, TRANS>(d, a, mfa_wgmma_desc(b, lbo, sbo));
}
// Orders this thread's earlier register writes before the next wgmma reads them.
MFA_FUNC void mfa_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
// Commits this thread's wgmmas and waits for all of them.
MFA_FUNC void mfa_wgmma_commit_wait() {
  asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Keeps the compiler from touching registers r[0..N) across this point (after mfa_wgmma_commit_wait:
// the accumulators and A operands of the wgmmas it waited for).
template <int N>
MFA_FUNC void mfa_fence_regs(float* r) {
  MFA_UNROLL
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
MFA_FUNC void mfa_fence_regs(unsigned* r) {
  MFA_UNROLL
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
// Makes this thread's completed writes to shared memory (cp.async included) visible to wgmma
// reads (the async proxy); before the barrier that publishes them.
MFA_FUNC void mfa_proxy_fence() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Bulk reductions (sm_90 cp.reduce.async.bulk): dst[e] += src[e] over bytes / 4 floats, src in
// shared memory, dst in global memory (both 16-byte aligned, bytes a multiple of 16), done by the
// copy engine while the thread goes on.  The writes to src come first, then mfa_bulk_fence() (they
// are read through the async proxy) and a warp sync where other lanes wrote them; this thread's
// reductions since its last mfa_bulk_commit() form one bulk group.
MFA_FUNC void mfa_bulk_add(float* dst, const float* src, int bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(
                   __cvta_generic_to_global(dst)),
               "r"(mfa_smem_addr(src)), "r"(bytes)
               : "memory");
}
MFA_FUNC void mfa_bulk_fence() { mfa_proxy_fence(); }
MFA_FUNC void mfa_bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until this thread's bulk groups have read their shared memory, which may then be rewritten.
MFA_FUNC void mfa_bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// Waits until this thread's bulk groups are complete.
MFA_FUNC void mfa_bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
MFA_FUNC void mfa_warp_sync() { __syncwarp(); }
