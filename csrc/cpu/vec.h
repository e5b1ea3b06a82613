// Element loaders and vectorisable inner loops shared by the CPU kernels.
//
// One portable build: the hot kernels are CXF_KERNEL templates called through with_isa() (isa.h), which compiles
// them for AVX-512, AVX2+FMA and the baseline and runs the active path. The inline helpers below have no target of
// their own, so they are inlined into (and vectorised for) whichever path calls them.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/isa.h"

namespace cxf {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// Storage-type tags: `T` is the raw element type, `A` the accumulation type, `load` widens one element to A.
// The loads are branch-free integer/float code so that GCC vectorises loops over them. float64 exists for
// gradcheck; everything else accumulates in fp32.
struct F64 {
  using T = double;
  using A = double;
  static inline double load(const T* p, int64_t i) { return p[i]; }
};

struct F32 {
  using T = float;
  using A = float;
  static inline float load(const T* p, int64_t i) { return p[i]; }
};

struct BF16 {
  using T = uint16_t;
  using A = float;
  static inline float load(const T* p, int64_t i) { return bits_to_float(uint32_t(p[i]) << 16); }
};

struct F16 {
  using T = uint16_t;
  using A = float;
  // IEEE half -> float without F16C: shift exponent+mantissa into place and rebias by multiplying with 2^112
  // (this also scales subnormals right); inf/NaN get the all-ones exponent back; the sign is OR-ed in last.
  static inline float load(const T* p, int64_t i) {
    const uint32_t h = p[i];
    const uint32_t magnitude = h & 0x7fffu;
    uint32_t bits = float_to_bits(bits_to_float(magnitude << 13) * 0x1.0p+112f);
    bits |= magnitude >= 0x7c00u ? 0x7f800000u : 0u;
    return bits_to_float(bits | ((h & 0x8000u) << 16));
  }
};

// int8 table rows (inference): symmetric per-row quantisation, so the kernel computes <x, q> (widening q to fp32,
// or on the avx512_vnni / avx512_dot paths in integers against split features, query.h) and multiplies it by the
// row's scale once (see shortlist_score.cpp). dot<I8> is specialised below (explicit per-ISA code); `load` serves
// the other loops (axpy for the input gradient).
struct I8 {
  using T = int8_t;
  using A = float;
  static inline float load(const T* p, int64_t i) { return float(p[i]); }
};

// 32 independent partial sums break the FMA latency chain (4 vectors of 8 on AVX2). The summation order is
// fixed, so a result does not depend on the thread count; it may differ in the last bit between CPUs whose
// clones differ in FMA contraction.
constexpr int64_t kLanes = 32;

template <class L>
inline typename L::A dot(const typename L::A* __restrict x, const typename L::T* __restrict w, int64_t D) {
  using A = typename L::A;
  A lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += x[i + j] * L::load(w, i + j);
  }
  A tail = 0;
  for (; i < D; ++i) tail += x[i] * L::load(w, i);
  A total = 0;
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  return total + tail;
}

// fp32, bf16 and int8 rows: explicit AVX-512 / AVX2 / scalar code on the active path (csrc/cpu/row_dot.cpp,
// 64 lanes reduced by a fixed tree), not the generic loop above, whose single FMA chain per vector and serial lane
// sum would make the scoring kernels compute-bound. The generic loop serves float64 (gradcheck) and fp16.
float dot_f32(const float* x, const float* w, int64_t D);      // the active path's variant (isa.h)
float dot_bf16(const float* x, const uint16_t* w, int64_t D);  // w: bf16 bits
float dot_i8(const float* x, const int8_t* w, int64_t D);

// The dot-product paths' dots (row_dot.cpp; avx512_vnni: int8, avx512_dot: int8 and bf16): n <= kDotRows rows
// against features in two parts (query.h), hi and lo zero-padded to a multiple of 32 elements; out[r] has the same
// bits whatever n. bf16 rows: x ~ hi + lo (bf16 bits) through vdpbf16ps; int8 rows: x ~ scale * (hi + lo / 2^15)
// (int16) through vpdpwssd, summed exactly.
constexpr int kDotRows = 4;
void dot_bf16_parts(const uint16_t* hi, const uint16_t* lo, const uint16_t* const* rows, int n, int64_t D, float* out);
void dot_i8_parts(const int16_t* hi, const int16_t* lo, double scale, const int8_t* const* rows, int n, int64_t D,
                  float* out);

template <>
inline float dot<F32>(const float* __restrict x, const float* __restrict w, int64_t D) {
  return dot_f32(x, w, D);
}

template <>
inline float dot<BF16>(const float* __restrict x, const uint16_t* __restrict w, int64_t D) {
  return dot_bf16(x, w, D);
}

template <>
inline float dot<I8>(const float* __restrict x, const int8_t* __restrict w, int64_t D) {
  return dot_i8(x, w, D);
}

// One document's features as the row dots read them. x always; `hi`/`lo` only where query.h prepared the two parts
// of x for the avx512_vnni / avx512_dot paths' int8 or bf16 rows (int16 or bf16 bits); nullptr otherwise, and the
// dot reads x.
template <class A>
struct Query {
  const A* x = nullptr;
  const void* hi = nullptr;
  const void* lo = nullptr;
  double scale = 1.0;  // int8 rows: x ~ scale * (hi + lo / 2^15)
};

// out[r] = <x, rows[r]> for r < n <= kDotRows, each with the same bits whatever n: where the parts are prepared the
// rows share each load of them, elsewhere they are scored one by one.
template <class L>
inline void dot_rows(const Query<typename L::A>& q, const typename L::T* const* rows, int n, int64_t D,
                     typename L::A* out) {
  if constexpr (std::is_same_v<L, BF16>) {
    if (q.hi) return dot_bf16_parts(static_cast<const uint16_t*>(q.hi), static_cast<const uint16_t*>(q.lo), rows, n,
                                    D, out);
  } else if constexpr (std::is_same_v<L, I8>) {
    if (q.hi) return dot_i8_parts(static_cast<const int16_t*>(q.hi), static_cast<const int16_t*>(q.lo), q.scale,
                                  rows, n, D, out);
  }
  for (int r = 0; r < n; ++r) out[r] = dot<L>(q.x, rows[r], D);
}

// Rows a kernel hands dot_rows at a time for query q: kDotRows where the parts share their loads, else 1, which
// keeps the one-row loops (and their prefetch distance) of the other paths as they were.
template <class A>
inline int rows_per_dot(const Query<A>& q) {
  return q.hi ? kDotRows : 1;
}

// acc[0:D] += a * w[0:D]
template <class L>
inline void axpy(typename L::A a, const typename L::T* __restrict w, typename L::A* __restrict acc, int64_t D) {
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) acc[i] += a * L::load(w, i);
}

// out[0:D] = a * w[0:D]
template <class L>
inline void scale(typename L::A a, const typename L::T* __restrict w, typename L::A* __restrict out, int64_t D) {
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) out[i] = a * L::load(w, i);
}

// Brings a table row into cache ahead of use: shortlists jump between rows, so the hardware prefetcher only
// starts after the first lines of each row have missed. The hint is "L2, not L1" (prefetcht1): a row of fp32
// is 48 lines and several rows are in flight at once, more than L1's miss buffers hold, so T0 prefetches stall
// or get dropped; measured on the 2-core EPYC (benchmarks/README.md, "Huge pages and prefetch"), T1 reads random
// fp32 / bf16 rows 1.4-1.7x faster than T0 (int8 1.1x).
// Prefetch helpers are always inlined: one left out of line does nothing but prefetch, which GCC takes for a "pure"
// function whose calls it may delete (it deleted every row prefetch of the shortlist forward once a helper grew).
#define CXF_PREFETCH_INLINE __attribute__((always_inline)) inline

CXF_PREFETCH_INLINE void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

}  // namespace cxf
