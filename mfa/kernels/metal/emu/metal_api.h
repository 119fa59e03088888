// The subset of the Metal standard library the kernels use, for the CPU executor and the g++
// compile check: scalar/vector types, barriers, simd shuffles, 8x8 simdgroup matrices.
//
// simdgroup_matrix<T, 8, 8> keeps only this lane's two elements, in the layout Apple GPUs use
// (MLX steel/attn/mma.h get_coord): lane l holds (row, col) and (row, col + 1) with
//   row = (l / 4 & 4) + (l / 2) % 4,   col = (l / 4 & 2) * 2 + (l % 2) * 2.
// simdgroup_multiply_accumulate gathers the operands from all 32 lanes (a warp collective).
#pragma once

#include <cmath>
#include <cstdint>

#include "runtime.h"
#include "types.h"

typedef emu::f16 half;
typedef emu::bf16 bfloat;
typedef emu::bf16 bfloat16_t;
typedef emu::f16 float16_t;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

namespace metal {

template <typename T, int N>
struct vec {
  T v[N];
  vec() = default;
  vec(T s) {
    for (int i = 0; i < N; ++i) v[i] = s;
  }
  T& operator[](int i) { return v[i]; }
  const T& operator[](int i) const { return v[i]; }
};

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

inline void threadgroup_barrier(mem_flags) { emu::group_barrier(); }
inline void simdgroup_barrier(mem_flags) { emu::warp_barrier(); }

template <typename T>
inline T simd_shuffle_xor(T value, ushort mask) {
  emu::Lanes<T> lanes = emu::warp_exchange(value);
  return lanes[emu::lane_id() ^ int(mask)];
}

template <typename T>
inline T simd_sum(T value) {
  emu::Lanes<T> lanes = emu::warp_exchange(value);
  T s = lanes[0];
  for (int l = 1; l < emu::kWarp; ++l) s = s + lanes[l];
  return s;
}

template <typename T>
inline T simd_max(T value) {
  emu::Lanes<T> lanes = emu::warp_exchange(value);
  T m = lanes[0];
  for (int l = 1; l < emu::kWarp; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

template <typename T, int Rows, int Cols>
struct simdgroup_matrix {
  static_assert(Rows == 8 && Cols == 8, "only 8x8 simdgroup matrices exist");
  vec<T, 2> elements;
  vec<T, 2>& thread_elements() { return elements; }
  const vec<T, 2>& thread_elements() const { return elements; }
};

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;

namespace detail {
inline int frag_row(int lane) { return (lane / 4 & 4) + (lane / 2) % 4; }
inline int frag_col(int lane) { return (lane / 4 & 2) * 2 + (lane % 2) * 2; }
// The lane holding element (row, col) of a fragment, and which of its two elements it is.
inline int frag_owner(int row, int col) {
  for (int l = 0; l < emu::kWarp; ++l)
    if (frag_row(l) == row && (col & ~1) == frag_col(l)) return l;
  return -1;
}
}  // namespace detail

// D = A * B + C over 8x8 matrices held across the simdgroup.
template <typename T>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d,
                                          const simdgroup_matrix<T, 8, 8>& a,
                                          const simdgroup_matrix<T, 8, 8>& b,
                                          const simdgroup_matrix<T, 8, 8>& c) {
  struct Operands {
    T a[2], b[2];
  };
  static const struct Owners {
    int lane[8][8];
    Owners() {
      for (int r = 0; r < 8; ++r)
        for (int col = 0; col < 8; ++col) lane[r][col] = detail::frag_owner(r, col);
    }
  } owners;
  Operands mine{{a.elements[0], a.elements[1]}, {b.elements[0], b.elements[1]}};
  emu::Lanes<Operands> lanes = emu::warp_exchange(mine);
  int l = emu::lane_id(), row = detail::frag_row(l), col = detail::frag_col(l);
  float a_row[8], b_col[2][8];
  for (int k = 0; k < 8; ++k) {
    a_row[k] = float(lanes[owners.lane[row][k]].a[k & 1]);
    for (int j = 0; j < 2; ++j) b_col[j][k] = float(lanes[owners.lane[k][col + j]].b[(col + j) & 1]);
  }
  for (int j = 0; j < 2; ++j) {
    float acc = float(c.elements[j]);
    for (int k = 0; k < 8; ++k) acc += a_row[k] * b_col[j][k];
    d.elements[j] = T(acc);
  }
}

using std::exp2;
using std::log2;
using std::log;
using std::exp;
using std::tanh;
using std::isinf;
using std::isnan;
using std::abs;

template <typename T>
inline T max(T a, T b) { return a > b ? a : b; }
template <typename T>
inline T min(T a, T b) { return a < b ? a : b; }

// Device atomics (relaxed order only); threadgroups run one at a time here.
enum memory_order { memory_order_relaxed };
template <typename T>
struct atomic {
  T value;
};
typedef atomic<float> atomic_float;
template <typename T>
inline T atomic_fetch_add_explicit(atomic<T>* object, T operand, memory_order) {
  T old = object->value;
  object->value = old + operand;
  return old;
}

namespace fast {
using std::exp2;
using std::log2;
}  // namespace fast
namespace precise {
using std::exp2;
using std::log2;
using std::log;
using std::tanh;
}  // namespace precise

}  // namespace metal

typedef metal::vec<float, 2> float2;
typedef metal::vec<float, 4> float4;
typedef metal::vec<half, 2> half2;
typedef metal::vec<half, 4> half4;
typedef metal::vec<int, 2> int2;
typedef metal::vec<int, 4> int4;
typedef metal::vec<uint, 2> uint2;
typedef metal::vec<uint, 4> uint4;
typedef metal::vec<short, 2> short2;
typedef metal::vec<ushort, 2> ushort2;
