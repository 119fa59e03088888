// CPU prelude: the kernel dialect for the CPU executor (metal/emu/runtime.h).
//
// Every GPU thread of a threadgroup runs the kernel body as a fiber; barriers, shuffles and the
// warp matrix instructions are emulated as warp/threadgroup collectives.  The executor runs
// either fragment family of the tile layer on top:
//   MFA_EMU_METAL: the Metal one (simdgroup 8x8 matrices, metal/emu/metal_api.h);
//   MFA_EMU_CUDA:  the CUDA one (mma.sync m16n8k16, ldmatrix and wgmma, metal/emu/ptx_api.h).
// Async copies follow cp.async: the data lands in shared memory at the matching wait, so a
// missing wait shows up as wrong (NaN-filled) shared memory.  Copies, stores, atomic adds and
// bulk reductions are bounds-checked against the launch's buffers (an error, not a wrong read).
#pragma once

#include <cmath>
#include <cstring>
#include <cstdint>

#include "emu/runtime.h"
#include "emu/types.h"
#if defined(MFA_EMU_METAL)
#include "stub/metal_stdlib"
using namespace metal;
#elif defined(MFA_EMU_CUDA)
#include "emu/ptx_api.h"
typedef emu::bf16 bfloat16_t;
typedef emu::f16 half;
#else
#error "define MFA_EMU_METAL or MFA_EMU_CUDA"
#endif

#define MFA_CPU 1
#define MFA_DEV
#define MFA_TG
#define MFA_THR
#define MFA_FUNC inline
#define MFA_UNROLL
#define MFA_NO_UNROLL
#define MFA_SHARED(name, bytes) unsigned char* name = emu::shared_memory(bytes)
#define MFA_INF INFINITY

MFA_FUNC void mfa_barrier() { emu::group_barrier(); }
MFA_FUNC void mfa_barrier_device() { emu::group_barrier(); }

MFA_FUNC float mfa_shfl_xor(float v, int mask) {
  emu::Lanes<float> lanes = emu::warp_exchange(v);
  return lanes[emu::lane_id() ^ mask];
}

MFA_FUNC float mfa_exp2f(float x) { return std::exp2(x); }
MFA_FUNC float mfa_log2f(float x) { return std::log2(x); }
MFA_FUNC float mfa_fmaxf(float a, float b) { return std::fmax(a, b); }
MFA_FUNC float mfa_tanhf(float x) { return std::tanh(x); }
// Threadgroups run one after another on one OS thread: a plain add is atomic here.
MFA_FUNC void mfa_atomic_add(float* p, float v) {
  emu::check_device(p, sizeof(float), "atomic add");
  *p += v;
}
// Bulk reductions (see prelude_cuda.h): the source is read at the wait, the latest point the GPU
// may read it, so a source rewritten before its wait shows up as a wrong sum.
MFA_FUNC void mfa_bulk_add(float* dst, const float* src, int bytes) { emu::bulk_add(dst, src, bytes); }
MFA_FUNC void mfa_bulk_fence() {}
MFA_FUNC void mfa_bulk_commit() {}
MFA_FUNC void mfa_bulk_wait_read() { emu::bulk_wait(); }
MFA_FUNC void mfa_bulk_wait() { emu::bulk_wait(); }
MFA_FUNC void mfa_warp_sync() { emu::warp_barrier(); }

// Copy 16 bytes from device to threadgroup memory (zeros when !valid), asynchronously.
MFA_FUNC void mfa_copy16(MFA_TG void* dst, MFA_DEV const void* src, bool valid) {
  emu::async_copy(dst, src, valid ? 16 : 0, 16);
}
// Copy 4 bytes (one float or int) the same way.
MFA_FUNC void mfa_copy4(MFA_TG void* dst, MFA_DEV const void* src, bool valid) {
  emu::async_copy(dst, src, valid ? 4 : 0, 4);
}
// Store 16 bytes from threadgroup to device memory.
MFA_FUNC void mfa_store16(MFA_DEV void* dst, MFA_TG const void* src) {
  emu::check_device(dst, 16, "store");
  std::memcpy(dst, src, 16);
}
MFA_FUNC void mfa_async_commit() { emu::async_commit(); }
template <int Keep>
MFA_FUNC void mfa_async_wait() { emu::async_wait(Keep); }

// Σ a[e]·b[e] over 8 consecutive elements of device memory (each run 16-byte aligned).
template <typename TA, typename TB>
MFA_FUNC float mfa_dot8(const TA* a, const TB* b) {
  emu::check_device(a, 8 * sizeof(TA), "dot8 read");
  emu::check_device(b, 8 * sizeof(TB), "dot8 read");
  float s = 0.0f;
  for (int e = 0; e < 8; ++e) s += float(a[e]) * float(b[e]);
  return s;
}
