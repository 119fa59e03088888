// decode_common.h: helpers of the decode kernels (decode_split, decode_merge) on every target.
//
// Part of the kernels' `header`, after the prelude of the target (prelude_metal.h, prelude_cuda.h
// or prelude_cpu.h), which defines the dialect (MFA_DEV, MFA_THR, MFA_FUNC, ...).  Decoding is
// memory-bound: K/V rows are read with 16-byte loads straight into registers and unpacked to
// float here, one 16-byte word (4 floats or 8 half/bfloat16 values) at a time.

struct DecodeWord {  // one 16-byte load
  unsigned x, y, z, w;
};

#if defined(MFA_METAL)
MFA_FUNC float decode_bits_float(uint u) { return as_type<float>(u); }
MFA_FUNC float decode_half_float(uint u) { return float(as_type<half2>(u)[0]); }
MFA_FUNC DecodeWord decode_load16(const device void* p) {
  const uint4 t = *static_cast<const device uint4*>(p);
  return DecodeWord{t[0], t[1], t[2], t[3]};
}
MFA_FUNC float decode_tanh(float x) { return metal::precise::tanh(x); }
#elif defined(MFA_CUDA)
MFA_FUNC float decode_bits_float(unsigned u) { return __uint_as_float(u); }
MFA_FUNC float decode_half_float(unsigned u) { return __half2float(__ushort_as_half((unsigned short)(u & 0xffffu))); }
MFA_FUNC DecodeWord decode_load16(const void* p) {
  const uint4 t = __ldg(static_cast<const uint4*>(p));
  return DecodeWord{t.x, t.y, t.z, t.w};
}
MFA_FUNC float decode_tanh(float x) { return tanhf(x); }
#else  // CPU executor
MFA_FUNC float decode_bits_float(unsigned u) { return emu::bits_float(u); }
MFA_FUNC float decode_half_float(unsigned u) {
  emu::f16 h;
  h.bits = uint16_t(u & 0xffffu);
  return float(h);
}
MFA_FUNC DecodeWord decode_load16(const void* p) {
  DecodeWord w;
  std::memcpy(&w, p, 16);
  return w;
}
MFA_FUNC float decode_tanh(float x) { return std::tanh(x); }
#endif

MFA_FUNC DecodeWord decode_zero_word() {
  DecodeWord w;
  w.x = w.y = w.z = w.w = 0u;
  return w;
}

// Unpack one 16-byte word of KIND (0: float32, 1: float16, 2: bfloat16) into 16 / sizeof(T) floats.
template <int KIND>
MFA_FUNC void decode_unpack(DecodeWord w, MFA_THR float* out) {
  const unsigned u[4] = {w.x, w.y, w.z, w.w};
  MFA_UNROLL
  for (int i = 0; i < 4; ++i) {
    if (KIND == 0) {
      out[i] = decode_bits_float(u[i]);
    } else if (KIND == 2) {
      out[2 * i] = decode_bits_float(u[i] << 16);
      out[2 * i + 1] = decode_bits_float(u[i] & 0xffff0000u);
    } else {
      out[2 * i] = decode_half_float(u[i]);
      out[2 * i + 1] = decode_half_float(u[i] >> 16);
    }
  }
}
