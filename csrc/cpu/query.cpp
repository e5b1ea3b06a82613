// The two parts of a document's features for the avx512_vnni / avx512_dot paths' row dots (query.h: the bounds).
//
// Branch-free loops over bit patterns, so that the compiler vectorises them: this runs once per document and call,
// B x D elements (a B = 256 batch of a 4-level cascade splits 786K features).
#include "cpu/query.h"

#include <cmath>
#include <cstring>

namespace cxf {
namespace {

constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kExponentMask = 0x7f800000u;  // |x| bits >= this: inf or NaN

// Largest |x| as float bits (sign cleared): integer max orders finite non-negative floats as their values do.
inline uint32_t max_abs_bits(const float* x, int64_t D) {
  uint32_t top = 0;
  for (int64_t i = 0; i < D; ++i) {
    const uint32_t bits = float_to_bits(x[i]) & kAbsMask;
    top = bits > top ? bits : top;
  }
  return top;
}

// fp32 -> bf16 bits, rounding to nearest even (finite inputs below bf16's largest finite value).
inline uint16_t bf16_round(float v) {
  const uint32_t bits = float_to_bits(v);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// v rounded to the nearest integer, ties to even, for |v| < 2^22: adding and removing 1.5 * 2^23 leaves no fraction
// bits in the default rounding mode (the build has no -ffast-math, which could fold the two additions away).
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

}  // namespace

bool split_bf16_parts(const float* x, int64_t D, int64_t stride, uint16_t* hi, uint16_t* lo) {
  if (max_abs_bits(x, D) >= float_to_bits(0x1p127f)) return false;  // NaN, inf, or rounding to bf16's infinity
  for (int64_t i = 0; i < D; ++i) {
    const uint16_t h = bf16_round(x[i]);
    hi[i] = h;
    lo[i] = bf16_round(x[i] - bits_to_float(uint32_t(h) << 16));  // hi's rounding error: exact in fp32
  }
  std::memset(hi + D, 0, size_t(stride - D) * sizeof *hi);
  std::memset(lo + D, 0, size_t(stride - D) * sizeof *lo);
  return true;
}

bool split_int16_parts(const float* x, int64_t D, int64_t stride, int16_t* hi, int16_t* lo, double* scale) {
  const uint32_t top = max_abs_bits(x, D);
  if (top >= kExponentMask) return false;
  int exponent = 0;
  std::frexp(double(bits_to_float(top)), &exponent);  // max |x| in [2^(exponent-1), 2^exponent); 0 for all-zero x
  *scale = std::ldexp(1.0, exponent - 14);
  if (exponent > -100 && exponent < 100) {
    // x / s = x * 2^(14 - exponent): a power of two in float's normal range, so the product is exact
    const float inverse = float(std::ldexp(1.0, 14 - exponent));
    for (int64_t i = 0; i < D; ++i) {
      const float v = x[i] * inverse, h = round_even(v);  // |v| < 2^14
      hi[i] = int16_t(h);
      lo[i] = int16_t(round_even((v - h) * 0x1p15f));  // v - h: v's fraction bits, exact; |lo| <= 2^14
    }
  } else {  // features near float's range ends: the same in double (x / s would leave float)
    const double inverse = std::ldexp(1.0, 14 - exponent);
    for (int64_t i = 0; i < D; ++i) {
      const double v = double(x[i]) * inverse, h = std::nearbyint(v);
      hi[i] = int16_t(h);
      lo[i] = int16_t(std::nearbyint((v - h) * 0x1p15));
    }
  }
  std::memset(hi + D, 0, size_t(stride - D) * sizeof *hi);
  std::memset(lo + D, 0, size_t(stride - D) * sizeof *lo);
  return true;
}

}  // namespace cxf
