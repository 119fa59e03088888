// CPU stand-ins for the GPU scalar and vector types the kernels use: half, bfloat16, uint3.
//
// `half` and `bfloat16` store their 16-bit patterns and convert to and from float with
// round-to-nearest-even, so values match the GPUs bit for bit; arithmetic happens in float.
#pragma once

#include <cstdint>
#include <cstring>

namespace emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct bf16 {
  uint16_t bits;
  bf16() = default;
  bf16(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // quiet NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);     // round to nearest even
      bits = uint16_t(u >> 16);
    }
  }
  operator float() const { return bits_float(uint32_t(bits) << 16); }
};

struct f16 {
  uint16_t bits;
  f16() = default;
  f16(float f) {
    uint32_t u = float_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
      bits = uint16_t(sign | 0x7e00u);
    } else if (a >= 0x477ff000u) {            // rounds to >= 65520: infinity
      bits = uint16_t(sign | 0x7c00u);
    } else if (a < 0x38800000u) {             // below the smallest normal half: subnormal
      float v = bits_float(a) * 16777216.0f;  // scale by 2^24: the subnormal step becomes 1
      uint32_t m = uint32_t(v);
      float rest = v - float(m);
      if (rest > 0.5f || (rest == 0.5f && (m & 1u))) ++m;
      bits = uint16_t(sign | m);
    } else {
      uint32_t m = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent 127->15, round
      bits = uint16_t(sign | (m >> 13));
    }
  }
  operator float() const {
    uint32_t sign = uint32_t(bits & 0x8000u) << 16;
    uint32_t e = (bits >> 10) & 0x1fu, m = bits & 0x3ffu;
    if (e == 0) {
      float v = float(m) * (1.0f / 16777216.0f);
      return sign ? -v : v;
    }
    if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
    return bits_float(sign | ((e + 112u) << 23) | (m << 13));
  }
};

}  // namespace emu

struct uint3 {
  unsigned x, y, z;
};
