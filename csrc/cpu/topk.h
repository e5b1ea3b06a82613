// Row top-k under DESIGN.md's rules, shared by the topk op and the cascade search.
//
// Each candidate becomes one uint64 key: an order-preserving image of its fp32 score in the high half (NaN
// canonicalised to 0, below -inf; -0.0 to +0.0's image, as the two compare equal) and the inverted position in the
// low half, so a larger key is a better candidate and equal scores prefer the lower position. Selecting the k
// largest keys then needs no tie-breaking logic of its own.
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
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return 0u;  // NaN
  if (magnitude == 0) bits = 0;             // -0.0 == +0.0: a tie, decided by position
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline uint64_t pack_key(float score, int64_t position) {
  return (uint64_t(ordered_key(score)) << 32) | uint64_t(0xffffffffu - uint32_t(position));
}

inline int64_t unpack_position(uint64_t key) { return int64_t(0xffffffffu - uint32_t(key & 0xffffffffu)); }

// Bit i set where ordered_key(scores[i]) > bar, for n <= 64 scores (topk.cpp: vectorised on the active path).
uint64_t scores_above(const float* scores, int64_t n, uint32_t bar);

// Top k of scores[0:n] among positions where valid(i) (any callable; all positions if it always says true).
// Writes k values and positions; slots past the number of candidates get -inf and -1. `keys` is scratch.
//
// The candidates are read in position order, 64 at a time, into a buffer of keys. Whenever it holds 2k keys it is
// cut back to its best k (nth_element), and the k-th best key's score becomes the bar: a later candidate can only
// enter with a score key above it (one with an equal score has a larger position, so a smaller key), and
// scores_above tests a whole chunk against it in a few vector instructions, so past the first few chunks most
// scores cost no scalar work at all, and valid(i) is asked only of those above the bar. Each cut removes k keys
// from a buffer of 2k + 63 at most, so even an ascending row costs O(n) in all. The order of keys is total: the
// result is the same set in the same order as any exact method's.
//
// Where k is a large share of the row (16k <= n <= 64k), the climb of the bar from the row's first 2k candidates
// would let in several times k of them: a first bar is taken instead from a sample of every (2k / 16)-th candidate,
// just below its 16th best (so ~2k scores are expected at or above it). Should fewer than k candidates reach it,
// the row is read again without it. Measured on the 2-core EPYC, one thread: [256, 4096] k = 128 4.0-4.9 -> 2.6-2.7
// ms (bench_topk.py), [32, 65536] k = 2048 8.1 -> 4.4 ms; rows outside that range unchanged.
template <class Valid>
void select_topk(const float* scores, int64_t n, Valid valid, int64_t k, float* out_values, int64_t* out_positions,
                 std::vector<uint64_t>& keys) {
  constexpr int64_t kChunk = 64, kSampleRank = 16;
  const auto better = std::greater<uint64_t>();
  // Reads the row into keys from a bar (none: every candidate enters until the first cut).
  auto scan = [&](bool have_bar, uint32_t bar) {
    keys.clear();
    for (int64_t c0 = 0; k > 0 && c0 < n; c0 += kChunk) {
      const int64_t len = std::min(kChunk, n - c0);
      if (!have_bar) {
        for (int64_t i = c0; i < c0 + len; ++i)
          if (valid(i)) keys.push_back(pack_key(scores[i], i));
      } else {
        for (uint64_t above = scores_above(scores + c0, len, bar); above != 0; above &= above - 1) {
          const int64_t i = c0 + __builtin_ctzll(above);
          if (valid(i)) keys.push_back(pack_key(scores[i], i));
        }
      }
      if (int64_t(keys.size()) >= 2 * k) {
        std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), better);
        keys.resize(k);
        bar = uint32_t(keys[k - 1] >> 32);
        have_bar = true;
      }
    }
  };
  bool sampled = false;
  uint32_t first_bar = 0;
  if (k >= kSampleRank && n >= 16 * k && n <= 64 * k) {
    keys.clear();
    for (int64_t i = 0; i < n; i += 2 * k / kSampleRank)
      if (valid(i)) keys.push_back(ordered_key(scores[i]));
    if (int64_t(keys.size()) >= kSampleRank) {
      std::nth_element(keys.begin(), keys.begin() + (kSampleRank - 1), keys.end(), better);
      first_bar = uint32_t(keys[kSampleRank - 1]);
      sampled = first_bar > 0;
      if (sampled) --first_bar;  // scores equal to the sample's take part
    }
  }
  scan(sampled, first_bar);
  if (sampled && int64_t(keys.size()) < k) scan(false, 0);  // the sample's bar was above the k-th best
  const int64_t m = std::min<int64_t>(k, int64_t(keys.size()));
  if (m < int64_t(keys.size())) std::nth_element(keys.begin(), keys.begin() + m, keys.end(), better);
  std::sort(keys.begin(), keys.begin() + m, better);
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
