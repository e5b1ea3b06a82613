// The two parts of a document's features for the avx512_dot path's row dots (see query.h for the bounds).
#include "cpu/query.h"

#include <cmath>
#include <cstring>

namespace cxf {
namespace {

// fp32 -> bf16 bits, rounding to nearest even (finite inputs below bf16's largest finite value).
inline uint16_t bf16_round(float v) {
  const uint32_t bits = float_to_bits(v);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace

bool split_bf16_parts(const float* x, int64_t D, int64_t stride, uint16_t* hi, uint16_t* lo) {
  for (int64_t i = 0; i < D; ++i)
    if (!(std::fabs(x[i]) < 0x1p127f)) return false;  // NaN, inf, or rounding up to bf16's infinity
  for (int64_t i = 0; i < D; ++i) {
    hi[i] = bf16_round(x[i]);
    lo[i] = bf16_round(x[i] - BF16::load(hi, i));  // the rounding error of hi: exact in fp32
  }
  std::memset(hi + D, 0, size_t(stride - D) * sizeof *hi);
  std::memset(lo + D, 0, size_t(stride - D) * sizeof *lo);
  return true;
}

bool split_int16_parts(const float* x, int64_t D, int64_t stride, int16_t* hi, int16_t* lo, double* scale) {
  float top = 0.f;
  for (int64_t i = 0; i < D; ++i) top = std::fmax(top, std::fabs(x[i]));  // fmax skips a NaN: checked below
  for (int64_t i = 0; i < D; ++i)
    if (!std::isfinite(x[i])) return false;
  int exponent = 0;
  std::frexp(double(top), &exponent);  // top in [2^(exponent-1), 2^exponent); 0 for top == 0
  const double inverse = std::ldexp(1.0, 14 - exponent);  // 1 / s: x / s is exact in double, |x / s| < 2^14
  *scale = std::ldexp(1.0, exponent - 14);
  for (int64_t i = 0; i < D; ++i) {
    const double v = double(x[i]) * inverse, h = std::nearbyint(v);
    hi[i] = int16_t(h);
    lo[i] = int16_t(std::nearbyint((v - h) * 0x1p15));
  }
  std::memset(hi + D, 0, size_t(stride - D) * sizeof *hi);
  std::memset(lo + D, 0, size_t(stride - D) * sizeof *lo);
  return true;
}

}  // namespace cxf
