// Row top-k under DESIGN.md's rules, shared by the topk op and the cascade search.
//
// Each candidate becomes one uint64 key: an order-preserving image of its fp32 score in the high half (NaN
// canonicalised to 0, below -inf) and the inverted position in the low half, so a larger key is a better
// candidate and equal scores prefer the lower position. Selecting the k largest keys is then a plain
// nth_element + sort with no tie-breaking logic of its own.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace cxf {

inline uint32_t ordered_key(float score) {
  if (std::isnan(score)) return 0u;
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline uint64_t pack_key(float score, int64_t position) {
  return (uint64_t(ordered_key(score)) << 32) | uint64_t(0xffffffffu - uint32_t(position));
}

inline int64_t unpack_position(uint64_t key) { return int64_t(0xffffffffu - uint32_t(key & 0xffffffffu)); }

// Top k of scores[0:n] among positions where valid(i) (any callable; all positions if it always says true).
// Writes k values and positions; slots past the number of candidates get -inf and -1. `keys` is scratch.
template <class Valid>
void select_topk(const float* scores, int64_t n, Valid valid, int64_t k, float* out_values, int64_t* out_positions,
                 std::vector<uint64_t>& keys) {
  keys.clear();
  for (int64_t i = 0; i < n; ++i)
    if (valid(i)) keys.push_back(pack_key(scores[i], i));
  const int64_t m = std::min<int64_t>(k, int64_t(keys.size()));
  if (m < int64_t(keys.size()))
    std::nth_element(keys.begin(), keys.begin() + m, keys.end(), std::greater<uint64_t>());
  std::sort(keys.begin(), keys.begin() + m, std::greater<uint64_t>());
  for (int64_t j = 0; j < m; ++j) {
    const int64_t p = unpack_position(keys[j]);
    out_positions[j] = p;
    out_values[j] = scores[p];
  }
  for (int64_t j = m; j < k; ++j) {
    out_positions[j] = -1;
    out_values[j] = -std::numeric_limits<float>::infinity();
  }
}

}  // namespace cxf
