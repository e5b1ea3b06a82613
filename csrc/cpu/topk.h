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
// Small k (the usual case: k << n) keeps a min-heap of the k best keys, so most candidates cost one compare;
// otherwise all keys are collected and partitioned with nth_element.
template <class Valid>
void select_topk(const float* scores, int64_t n, Valid valid, int64_t k, float* out_values, int64_t* out_positions,
                 std::vector<uint64_t>& keys) {
  keys.clear();
  int64_t m = 0;
  if (k > 0 && 8 * k <= n) {
    const auto worse = std::greater<uint64_t>();  // with greater<>, the heap's front is the smallest key
    // Once the heap is full, a score below the k-th best (`bar`) cannot enter: whole chunks whose maximum is
    // below it are skipped by a vectorisable scan. NaN never passes (it ranks below -inf); a NaN at the front
    // lowers the bar to -inf so that every number is compared by key.
    constexpr int64_t kChunk = 64;
    bool full = false;
    float bar = -std::numeric_limits<float>::infinity();
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t c1 = std::min(n, c0 + kChunk);
      if (full) {
        float high = -std::numeric_limits<float>::infinity();
        for (int64_t i = c0; i < c1; ++i) high = high < scores[i] ? scores[i] : high;
        if (high < bar) continue;
      }
      for (int64_t i = c0; i < c1; ++i) {
        const float s = scores[i];
        if ((full && !(s >= bar)) || !valid(i)) continue;
        const uint64_t key = pack_key(s, i);
        if (!full) {
          keys.push_back(key);
          std::push_heap(keys.begin(), keys.end(), worse);
          full = int64_t(keys.size()) == k;
        } else if (key > keys.front()) {
          std::pop_heap(keys.begin(), keys.end(), worse);
          keys.back() = key;
          std::push_heap(keys.begin(), keys.end(), worse);
        } else {
          continue;
        }
        if (full) {
          const float front = scores[unpack_position(keys.front())];
          bar = std::isnan(front) ? -std::numeric_limits<float>::infinity() : front;
        }
      }
    }
    m = int64_t(keys.size());
    std::sort(keys.begin(), keys.end(), std::greater<uint64_t>());
  } else {
    for (int64_t i = 0; i < n; ++i)
      if (valid(i)) keys.push_back(pack_key(scores[i], i));
    m = std::min<int64_t>(k, int64_t(keys.size()));
    if (m < int64_t(keys.size()))
      std::nth_element(keys.begin(), keys.begin() + m, keys.end(), std::greater<uint64_t>());
    std::sort(keys.begin(), keys.begin() + m, std::greater<uint64_t>());
  }
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
