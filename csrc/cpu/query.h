// Documents' features prepared once per call for the row dots of one table (vec.h Query, row_dot.cpp).
//
// On the avx512_vnni path int8 rows, and on avx512_dot also bf16 rows, are multiplied by dot-product instructions
// that take both operands in the rows' width, so each document's fp32 features are split into two parts there,
// once per call instead of once per row:
//   bf16 rows  hi = bf16(x) (round to nearest even), lo = bf16(x - hi): |x - hi - lo| <= 2^-16 |x|
//   int8 rows  s = 2^(e - 14) with max |x| in [2^(e-1), 2^e): hi = round(x / s), lo = round((x / s - hi) 2^15),
//              |hi|, |lo| <= 2^14 (int16), |x - s (hi + lo / 2^15)| <= 2^-29 max |x|; features that are multiples of
//              s (integers below 2^14, say) are exact
// A document's parts depend on its features alone, so a document scores the same bits alone or in any batch. A
// document with a non-finite feature (or one too large for bf16) keeps the fp32 dot, which propagates it. Every
// other path and storage type reads x as it is.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/vec.h"

namespace cxf {

// Fill hi[0:stride) and lo[0:stride) (zero past D) from x[0:D]; false when x cannot be split (non-finite).
bool split_bf16_parts(const float* x, int64_t D, int64_t stride, uint16_t* hi, uint16_t* lo);
bool split_int16_parts(const float* x, int64_t D, int64_t stride, int16_t* hi, int16_t* lo, double* scale);

// The parts are padded to whole 32-element vectors (row_dot.cpp reads them unmasked).
inline int64_t parts_stride(int64_t D) { return (D + 31) / 32 * 32; }

// Which parts a table's rows are dotted with on the active path: none (x itself), bf16 or int16.
enum class Parts { kNone, kBF16, kInt16 };

template <class L>
inline Parts parts_for_rows() {
  const int isa = active_isa();
  if constexpr (std::is_same_v<L, I8>)
    if (isa == kIsaAvx512Vnni || isa == kIsaAvx512Dot) return Parts::kInt16;
  if constexpr (std::is_same_v<L, BF16>)
    if (isa == kIsaAvx512Dot) return Parts::kBF16;
  return Parts::kNone;
}

// The queries of B documents x[B, D] (row-major), with the parts `parts` asks for (float features only).
template <class A>
class Queries {
 public:
  Queries(const A* x, int64_t B, int64_t D, Parts parts) : queries_(size_t(B)) {
    for (int64_t b = 0; b < B; ++b) queries_[b].x = x + b * D;
    if constexpr (std::is_same_v<A, float>) {
      if (parts == Parts::kNone) return;
      const int64_t stride = parts_stride(D);
      parts_.reset(new uint16_t[size_t(B * 2 * stride)]);  // not zeroed: the splits write every element
      // Documents split on all threads for large batches (~1 us each at D = 768; B = 256 on one thread was ~1% of
      // a grouped shortlist forward that the other threads waited for).
      at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          uint16_t* hi = parts_.get() + b * 2 * stride;
          uint16_t* lo = hi + stride;
          const bool ready = parts == Parts::kBF16
                                 ? split_bf16_parts(x + b * D, D, stride, hi, lo)
                                 : split_int16_parts(x + b * D, D, stride, reinterpret_cast<int16_t*>(hi),
                                                     reinterpret_cast<int16_t*>(lo), &queries_[b].scale);
          if (ready) {
            queries_[b].hi = hi;
            queries_[b].lo = lo;
          }
        }
      });
    }
  }
  Queries() = default;
  Queries(Queries&&) = default;  // the parts' buffer moves with its pointers
  Queries& operator=(Queries&&) = default;
  Queries(const Queries&) = delete;
  Queries& operator=(const Queries&) = delete;

  const Query<A>& operator[](int64_t b) const { return queries_[b]; }
  const Query<A>* data() const { return queries_.data(); }

 private:
  std::vector<Query<A>> queries_;
  std::unique_ptr<uint16_t[]> parts_;  // per document: hi[stride] then lo[stride] (bf16 bits or int16)
};

// The queries for rows of storage L.
template <class L>
Queries<typename L::A> queries_for(const typename L::A* x, int64_t B, int64_t D) {
  return Queries<typename L::A>(x, B, D, parts_for_rows<L>());
}

}  // namespace cxf
