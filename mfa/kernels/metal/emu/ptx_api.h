// CPU versions of the PTX warp instructions behind metal/prelude_cuda.h, for the CPU executor:
// mma.sync.m16n8k16 (f32 accumulate, bf16/f16 operands), ldmatrix.x4 (plain and .trans) and
// the operand packing, each with the register layouts of the PTX ISA manual.  They are warp
// collectives: every lane publishes its registers, then computes its own result.
#pragma once

#include <cstdint>
#include <cstring>

#include "runtime.h"
#include "types.h"

namespace emu {

template <typename T>
inline float half_of(unsigned reg, int which) {
  T h;
  uint16_t bits = uint16_t(which ? reg >> 16 : reg & 0xffffu);
  std::memcpy(&h, &bits, 2);
  return float(h);
}

}  // namespace emu

// Two values as one 32-bit operand register: `lo` in bits 0..15, `hi` in bits 16..31.
template <typename T>
inline unsigned mfa_pack2(float lo, float hi) {
  T a(lo), b(hi);
  uint16_t x, y;
  std::memcpy(&x, &a, 2);
  std::memcpy(&y, &b, 2);
  return unsigned(x) | (unsigned(y) << 16);
}

// The low (bits 0..15) or high half of a 32-bit register of two T values, as a float.
template <typename T>
inline float mfa_unpack2(unsigned x, int hi) {
  return emu::half_of<T>(x, hi);
}

// x rounded to T (round to nearest even), as a float.
template <typename T>
inline float mfa_round(float x) {
  return float(T(x));
}

// d[0..3] += A(16x16) * B(16x8): mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.
// a: rows g and g+8, k pairs (2q, 2q+1) and (2q+8, 2q+9) with g = lane/4, q = lane%4;
// b: k pairs (2q, 2q+1) and (2q+8, 2q+9) of column g; d: rows g, g+8, columns 2q, 2q+1.
template <typename T>
inline void mfa_mma16816(float* d, const unsigned* a, const unsigned* b) {
  struct Operands {
    unsigned a[4], b[2];
  };
  Operands mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  emu::Lanes<Operands> lanes = emu::warp_exchange(mine);
  int lane = emu::lane_id();
  for (int e = 0; e < 4; ++e) {
    int row = lane / 4 + 8 * (e / 2), col = 2 * (lane % 4) + (e % 2);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) {
      Operands oa = lanes[(row % 8) * 4 + (k % 8) / 2];
      Operands ob = lanes[col * 4 + (k % 8) / 2];
      float av = emu::half_of<T>(oa.a[(row / 8) + 2 * (k / 8)], k % 2);
      float bv = emu::half_of<T>(ob.b[k / 8], k % 2);
      acc += av * bv;
    }
    d[e] = acc;
  }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 give the row addresses of matrix j;
// r[j] of lane t holds row t/4, columns 2(t%4) and 2(t%4)+1 of matrix j.
inline void mfa_ldmatrix_x4(unsigned* r, const void* row) {
  emu::Lanes<const void*> rows = emu::warp_exchange(row);
  int t = emu::lane_id();
  for (int j = 0; j < 4; ++j) {
    const unsigned char* p = static_cast<const unsigned char*>(rows[8 * j + t / 4]);
    std::memcpy(&r[j], p + 4 * (t % 4), 4);
  }
}

// ldmatrix ... .trans: r[j] of lane t holds rows 2(t%4) and 2(t%4)+1 of column t/4 of matrix j.
inline void mfa_ldmatrix_x4_trans(unsigned* r, const void* row) {
  emu::Lanes<const void*> rows = emu::warp_exchange(row);
  int t = emu::lane_id();
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    std::memcpy(&lo, static_cast<const unsigned char*>(rows[8 * j + 2 * (t % 4)]) + 2 * (t / 4), 2);
    std::memcpy(&hi, static_cast<const unsigned char*>(rows[8 * j + 2 * (t % 4) + 1]) + 2 * (t / 4), 2);
    r[j] = unsigned(lo) | (unsigned(hi) << 16);
  }
}

// stmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lanes 8j..8j+7 give the row addresses of
// matrix j; r[j] of lane t holds (row t/4, columns 2(t%4) and 2(t%4)+1) of matrix j, which land
// transposed: at rows 2(t%4) and 2(t%4)+1, column t/4.
inline void mfa_stmatrix_x4_trans(const unsigned* r, void* row) {
  emu::Lanes<void*> rows = emu::warp_exchange(row);
  int t = emu::lane_id();
  for (int j = 0; j < 4; ++j) {
    const uint16_t lo = uint16_t(r[j] & 0xFFFFu), hi = uint16_t(r[j] >> 16);
    std::memcpy(static_cast<unsigned char*>(rows[8 * j + 2 * (t % 4)]) + 2 * (t / 4), &lo, 2);
    std::memcpy(static_cast<unsigned char*>(rows[8 * j + 2 * (t % 4) + 1]) + 2 * (t / 4), &hi, 2);
  }
}

// wgmma.mma_async m64n64k16 with A in registers, one warp's share: rows 16w .. 16w+15 of the
// warpgroup's product are this warp's, so the warp computes them alone.  Asynchronous as on the
// GPU: the A registers are read at the issue, the product (reading B from shared memory and the
// accumulator then) at the wait, so a kernel that reads d, or refills B's shared memory, before
// its wait gets wrong results here too.  d: the mma.sync accumulator layout, 8 fragments of
// 16 x 8 side by side; a: the mma.sync A fragment; B (16 x 64) at b in the 128-byte swizzle
// layout: 128-byte rows (8 rows to a block of 1024 bytes, blocks `sbo` apart) whose 16-byte chunk
// j is stored at chunk j ^ (address bits 7..9).  TRANS = 0 (k-major): row n holds the k of
// column n, starting at b; TRANS = 1 (n-major): row k holds the n of row k (64 per row, the next
// 64 `lbo` bytes on).
namespace emu {
template <typename T, int TRANS>
inline void wgmma_n64_now(float* d, const unsigned* a, const void* b, int lbo, int sbo) {
  struct Operand {
    unsigned a[4];
  };
  Operand mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  Lanes<Operand> lanes = warp_exchange(mine);
  uintptr_t start = reinterpret_cast<uintptr_t>(b);
  int lane = lane_id();
  for (int i = 0; i < 32; ++i) {
    int row = lane / 4 + 8 * (i % 4 / 2), col = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
    float acc = d[i];
    for (int k = 0; k < 16; ++k) {
      Operand oa = lanes[(row % 8) * 4 + (k % 8) / 2];
      float av = half_of<T>(oa.a[(row / 8) + 2 * (k / 8)], k % 2);
      uintptr_t at = TRANS ? start + (k / 8) * sbo + (k % 8) * 128 + (col / 64) * lbo + (col % 64) * 2
                           : start + (col / 8) * sbo + (col % 8) * 128 + k * 2;
      at ^= ((at >> 7) & 7) << 4;
      T bv;
      std::memcpy(&bv, reinterpret_cast<const void*>(at), 2);
      acc += av * float(bv);
    }
    d[i] = acc;
  }
}

// Run this lane's issued wgmmas, in issue order (every lane of the warp waits together).
inline void wgmma_wait_all() {
  std::vector<std::function<void()>> pending;
  pending.swap(g_fiber->wgmma_pending);
  for (auto& product : pending) product();
}
}  // namespace emu

template <typename T, int TRANS>
inline void mfa_wgmma_n64(float* d, const unsigned* a, const void* b, int lbo, int sbo) {
  unsigned regs[4];
  std::memcpy(regs, a, sizeof(regs));
  emu::g_fiber->wgmma_pending.push_back([=]() { emu::wgmma_n64_now<T, TRANS>(d, regs, b, lbo, sbo); });
}
inline void mfa_wgmma_fence() {}
inline void mfa_wgmma_commit_wait() { emu::wgmma_wait_all(); }
template <int N, typename R>
inline void mfa_fence_regs(R*) {}
inline void mfa_proxy_fence() {}
