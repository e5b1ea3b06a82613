// Stochastic rounding of fp32 results into bf16 / fp16 tables, with a counter-based hash so that every backend
// (ops/reference.py: sr_key, sr_random, stochastic_round; kernels/triton/optim.py) produces the same bits.
//   key    = fmix32(seed32 ^ fmix32(step32 + 0x9E3779B9))      seed32 = lo32(seed ^ (seed >> 32)), step32 = lo32(step)
//   random = fmix32(fmix32(row32 ^ key) ^ col)                  row32 = lo32(row)
//   bits'  = (bits(x) + (random & mask)) & ~mask, mask = 2^drop - 1; drop = 16 (bf16); fp16: 13, more in its
//            subnormal range (13 + 113 - biased exponent), at most 23; then an exact conversion.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cxf {

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

inline uint32_t sr_key(int64_t seed, int64_t step) {
  const uint32_t seed32 = uint32_t(uint64_t(seed ^ (seed >> 32)));
  return fmix32(seed32 ^ fmix32(uint32_t(uint64_t(step)) + 0x9E3779B9u));
}

inline uint32_t sr_row_key(uint32_t key, int64_t row) { return fmix32(uint32_t(uint64_t(row)) ^ key); }

// fp32 -> P: round to nearest unless `sr`, then stochastically with the 32 random bits fmix32(row_key ^ col).
template <class P>
inline P round_to(float x, bool sr, uint32_t row_key, int64_t col) {
  if constexpr (std::is_same_v<P, float> || std::is_same_v<P, double>) {
    return P(x);
  } else {
    if (!sr || !std::isfinite(x)) return P(x);
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    uint32_t drop = 16;
    if constexpr (std::is_same_v<P, c10::Half>) {
      const int32_t exponent = int32_t((bits >> 23) & 0xFF);
      drop = uint32_t(std::min<int32_t>(13 + std::max<int32_t>(113 - exponent, 0), 23));
    }
    const uint32_t mask = (1u << drop) - 1u;
    const uint32_t random = fmix32(row_key ^ uint32_t(col));
    bits = (bits + (random & mask)) & ~mask;
    float y;
    std::memcpy(&y, &bits, 4);
    return P(y);
  }
}

}  // namespace cxf
