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
