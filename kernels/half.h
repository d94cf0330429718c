// IEEE 754 binary16 conversions, portable and exact.
//
// FloatToHalf rounds to nearest, ties to even (the rounding of F16C's _MM_FROUND_TO_NEAREST_INT); values beyond
// the fp16 range become +/-inf, so callers that must not store inf check FitsHalf first. HalfToFloat is exact.
// Pure functions: thread-safe.
#ifndef RAPIDIN_KERNELS_HALF_H_
#define RAPIDIN_KERNELS_HALF_H_

#include <cstdint>
#include <cstring>

namespace rapidin::kernels {

constexpr float kHalfMax = 65504.0f;

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan (keep nan quiet)
    return sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u);
  }
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to inf
  if (abs < 0x38800000u) {                         // below the smallest normal half: subnormal or zero
    if (abs < 0x33000000u) return sign;            // < 2^-25 rounds to 0 (2^-25 itself ties to even 0)
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // so that the result is in units of 2^-24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = ((abs >> 13) - ((127 - 15) << 10));
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // may carry into the exponent: still correct
  return sign | static_cast<uint16_t>(r);
}

// True when f is finite and rounds to a finite half.
inline bool FitsHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  return (x & 0x7fffffffu) < 0x477ff000u;
}

}  // namespace rapidin::kernels

#endif  // RAPIDIN_KERNELS_HALF_H_
