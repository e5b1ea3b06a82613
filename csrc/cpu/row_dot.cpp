// <x, w> for one table row (fp32 x, fp32 result), the inner loop of every scoring kernel: fp32, bf16 and int8 rows.
//
// The generic loader loop (vec.h dot<L>) keeps 32 lanes in one FMA chain per vector and ends with a serial sum of
// the 32 lanes, which for a 768-long row costs about as much as reading the row from DRAM (bf16 and int8 rows
// most: they are half and a quarter of the bytes). Here each ISA gets explicit code, following the kernels' active
// path (isa.h: the default, or the one set_cpu_isa forces):
//
//   avx512 (x86-64-v4)  4 zmm accumulators of 16 lanes; rows widened to fp32 in registers (bf16: zero-extend and
//                       shift into the high half; int8: vpmovsxbd + vcvtdq2ps), then vfmadd
//   avx2   (x86-64-v3)  8 ymm accumulators of 8 lanes, the same 64 lanes and the same FMAs
//   scalar (baseline)   64 lanes in plain C++ (mul + add, no FMA)
//
// All three keep 64 lanes (lane j sums the elements 64 i + j) and reduce them by one fixed tree: 64 -> 16 as
// (L[j] + L[j+16]) + (L[j+32] + L[j+48]), then halving (j + 8, j + 4, j + 2, j + 1); the D % 64 trailing elements
// are summed in order (explicit fused multiply-adds on avx512 and avx2: left to contraction, GCC vectorised the
// multiplies of part of an fp32 tail, in 16/8/4-element pieces on avx512 and 8/4 on avx2, so rows with a tail
// differed in the last bit between the two) and added last. avx512 and avx2 are therefore bit-identical; scalar
// differs only by the rounding of the fused multiply-adds. Results never depend on the thread count.
//
//   avx512_vnni         int8 rows against the two parts of x that query.h prepares once per document, multiplied
//                       as stored, without widening: vpdpwssd on x = s (hi + lo / 2^15) (int16, s a power of two),
//                       summed exactly in int32 / int64 and scaled once. Every other row type as avx512.
//   avx512_dot          avx512_vnni, and bf16 rows through vdpbf16ps on x = hi + lo (bf16), products exact in
//                       fp32, hi and lo in their own accumulators. Per 64 elements of a row that is 4 dot
//                       instructions instead of 4 widenings + 4 conversions or shifts + 4 FMAs, which on Zen 4's
//                       double-pumped units is where one thread spent its time on bf16 and int8 rows
//                       (benchmarks/microbench/hot_rows.py).
#include "cpu/isa.h"
#include "cpu/vec.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_*() (GCC bug 105593): harmless.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define CXF_X86_DOT 1
#endif

namespace cxf {
namespace {

constexpr int64_t kDotLanes = 64;

// Element widening per storage type, shared by the three paths.
inline float widen(float v) { return v; }
inline float widen(uint16_t bf16) { return bits_to_float(uint32_t(bf16) << 16); }
inline float widen(int8_t v) { return float(v); }

template <class T>
float dot_scalar(const float* __restrict x, const T* __restrict w, int64_t D) {
  float lanes[kDotLanes] = {};
  int64_t i = 0;
  for (; i + kDotLanes <= D; i += kDotLanes)
    for (int64_t j = 0; j < kDotLanes; ++j) lanes[j] += x[i + j] * widen(w[i + j]);
  float s[16];
  for (int j = 0; j < 16; ++j) s[j] = (lanes[j] + lanes[j + 16]) + (lanes[j + 32] + lanes[j + 48]);
  for (int width = 8; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) s[j] = s[j] + s[j + width];
  float tail = 0.f;
  for (; i < D; ++i) tail += x[i] * widen(w[i]);
  return s[0] + tail;
}

#ifdef CXF_X86_DOT
#define CXF_AVX2 __attribute__((target("arch=x86-64-v3"), always_inline)) inline
#define CXF_AVX512 __attribute__((target("arch=x86-64-v4"), always_inline)) inline

// Sum of 8 lanes by the tree above: (t[j] + t[j+4]), then (j + 2), then (j + 1).
CXF_AVX2 float hsum8(__m256 t) {
  __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  u = _mm_add_ps(u, _mm_movehl_ps(u, u));
  u = _mm_add_ss(u, _mm_shuffle_ps(u, u, 1));
  return _mm_cvtss_f32(u);
}

// 8 elements at p widened to fp32 (AVX2) and 16 (AVX-512).
CXF_AVX2 __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
CXF_AVX2 __m256 widen8(const uint16_t* p) {
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}
CXF_AVX2 __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
CXF_AVX512 __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
CXF_AVX512 __m512 widen16(const uint16_t* p) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
CXF_AVX512 __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <class T>
__attribute__((target("arch=x86-64-v4"))) float dot_avx512(const float* __restrict x, const T* __restrict w,
                                                            int64_t D) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + kDotLanes <= D; i += kDotLanes) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), widen16(w + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), widen16(w + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), widen16(w + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), widen16(w + i + 48), a3);
  }
  const __m512 s = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
  const float total = hsum8(_mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1)));
  float tail = 0.f;
  for (; i < D; ++i) tail = std::fma(x[i], widen(w[i]), tail);
  return total + tail;
}

template <class T>
__attribute__((target("arch=x86-64-v3"))) float dot_avx2(const float* __restrict x, const T* __restrict w,
                                                          int64_t D) {
  // a[2k] and a[2k+1] are the low and high halves of avx512's accumulator k.
  __m256 a[8];
  for (auto& v : a) v = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + kDotLanes <= D; i += kDotLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8 * j), widen8(w + i + 8 * j), a[j]);
  }
  const __m256 lo = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[4], a[6]));
  const __m256 hi = _mm256_add_ps(_mm256_add_ps(a[1], a[3]), _mm256_add_ps(a[5], a[7]));
  const float total = hsum8(_mm256_add_ps(lo, hi));
  float tail = 0.f;
  for (; i < D; ++i) tail = std::fma(x[i], widen(w[i]), tail);
  return total + tail;
}

// ---- avx512_vnni / avx512_dot: the rows as stored, through the dot-product instructions
//
// Up to 4 rows against one query at a time: each 32-element slice of the parts is loaded once for all of them (one
// row at a time, loading the parts was as slow as the widening it replaces). Every row keeps its own accumulators in
// the same order whatever the number of rows, so a row's score has the same bits alone or beside others.

#define CXF_AVX512_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#define CXF_AVX512_VNNI __attribute__((target("arch=x86-64-v4,avx512vnni")))

// A mask of the first min(n, 32) elements: the rows' last slice (the parts are zero-padded to 32).
CXF_AVX512 __mmask32 first_lanes(int64_t n) { return n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }

// bf16 rows: per row, hi and lo products in separate accumulators, even and odd 64-element halves apart (4 chains of
// D / 64 dependent vdpbf16ps), the last partial slice into the even ones, summed as (h0 + h1) + (l0 + l1).
template <int R>
CXF_AVX512_BF16 void dot_bf16_parts_avx512(const uint16_t* hi, const uint16_t* lo, const uint16_t* const* rows,
                                          int64_t D, float* out) {
  __m512 h0[R], h1[R], l0[R], l1[R];
  for (int r = 0; r < R; ++r) h0[r] = h1[r] = l0[r] = l1[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= D; i += 64) {
    const __m512bh xh0 = (__m512bh)_mm512_loadu_si512(hi + i), xh1 = (__m512bh)_mm512_loadu_si512(hi + i + 32);
    const __m512bh xl0 = (__m512bh)_mm512_loadu_si512(lo + i), xl1 = (__m512bh)_mm512_loadu_si512(lo + i + 32);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(rows[r] + i);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(rows[r] + i + 32);
      h0[r] = _mm512_dpbf16_ps(h0[r], w0, xh0);
      h1[r] = _mm512_dpbf16_ps(h1[r], w1, xh1);
      l0[r] = _mm512_dpbf16_ps(l0[r], w0, xl0);
      l1[r] = _mm512_dpbf16_ps(l1[r], w1, xl1);
    }
  }
  for (; i < D; i += 32) {
    const __mmask32 m = first_lanes(D - i);
    const __m512bh xh = (__m512bh)_mm512_loadu_si512(hi + i), xl = (__m512bh)_mm512_loadu_si512(lo + i);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(m, rows[r] + i);
      h0[r] = _mm512_dpbf16_ps(h0[r], w, xh);
      l0[r] = _mm512_dpbf16_ps(l0[r], w, xl);
    }
  }
  for (int r = 0; r < R; ++r)
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(h0[r], h1[r]), _mm512_add_ps(l0[r], l1[r])));
}

// Sum of the 16 int32 lanes in int64.
CXF_AVX512 int64_t lanes_sum(__m512i v) {
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                                  _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}

// Elements per int32 accumulation: a lane gains 2 products of |w| <= 128 and |part| <= 2^14 per 32 elements, so
// 2^13 elements keep every lane below 2^30.
constexpr int64_t kInt32Span = int64_t(1) << 13;

// int8 rows: integer sums, exact in any order; one rounding in double (2^-53) and one to float.
template <int R>
CXF_AVX512_VNNI void dot_i8_parts_avx512(const int16_t* hi, const int16_t* lo, double scale,
                                        const int8_t* const* rows, int64_t D, float* out) {
  int64_t sum_hi[R] = {}, sum_lo[R] = {};
  for (int64_t c = 0; c < D; c += kInt32Span) {
    const int64_t end = std::min(D, c + kInt32Span);
    __m512i h[R], l[R];
    for (int r = 0; r < R; ++r) h[r] = l[r] = _mm512_setzero_si512();
    int64_t i = c;
    for (; i + 32 <= end; i += 32) {
      const __m512i xh = _mm512_loadu_si512(hi + i), xl = _mm512_loadu_si512(lo + i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + i)));
        h[r] = _mm512_dpwssd_epi32(h[r], w, xh);
        l[r] = _mm512_dpwssd_epi32(l[r], w, xl);
      }
    }
    if (i < end) {
      const __mmask32 m = first_lanes(end - i);
      const __m512i xh = _mm512_loadu_si512(hi + i), xl = _mm512_loadu_si512(lo + i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, rows[r] + i));
        h[r] = _mm512_dpwssd_epi32(h[r], w, xh);
        l[r] = _mm512_dpwssd_epi32(l[r], w, xl);
      }
    }
    for (int r = 0; r < R; ++r) {
      sum_hi[r] += lanes_sum(h[r]);
      sum_lo[r] += lanes_sum(l[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = float(scale * (double(sum_hi[r]) + double(sum_lo[r]) * 0x1p-15));
}
#endif

// The path in use is the kernels' (isa.h): forcing a path with set_cpu_isa switches these dots too.
template <class T>
inline float dot_active(const float* x, const T* w, int64_t D) {
#ifdef CXF_X86_DOT
  switch (active_isa()) {
    case kIsaAvx512Dot:  // rows without prepared parts (query.h: fp32, fp16, non-finite x) read x as avx512 does
    case kIsaAvx512Vnni:
    case kIsaAvx512: return dot_avx512<T>(x, w, D);
    case kIsaAvx2: return dot_avx2<T>(x, w, D);
    default: break;
  }
#endif
  return dot_scalar<T>(x, w, D);
}

}  // namespace

float dot_f32(const float* x, const float* w, int64_t D) { return dot_active<float>(x, w, D); }
float dot_bf16(const float* x, const uint16_t* w, int64_t D) { return dot_active<uint16_t>(x, w, D); }
float dot_i8(const float* x, const int8_t* w, int64_t D) { return dot_active<int8_t>(x, w, D); }

// Parts exist only where their path is supported (query.h prepares them there and nowhere else).
void dot_bf16_parts(const uint16_t* hi, const uint16_t* lo, const uint16_t* const* rows, int n, int64_t D,
                    float* out) {
#ifdef CXF_X86_DOT
  switch (n) {
    case 1: return dot_bf16_parts_avx512<1>(hi, lo, rows, D, out);
    case 2: return dot_bf16_parts_avx512<2>(hi, lo, rows, D, out);
    case 3: return dot_bf16_parts_avx512<3>(hi, lo, rows, D, out);
    case 4: return dot_bf16_parts_avx512<4>(hi, lo, rows, D, out);
  }
#endif
  TORCH_CHECK(false, "dot_bf16_parts: ", n, " rows (1 to ", kDotRows, " on the avx512_dot path only)");
}

void dot_i8_parts(const int16_t* hi, const int16_t* lo, double scale, const int8_t* const* rows, int n, int64_t D,
                  float* out) {
#ifdef CXF_X86_DOT
  switch (n) {
    case 1: return dot_i8_parts_avx512<1>(hi, lo, scale, rows, D, out);
    case 2: return dot_i8_parts_avx512<2>(hi, lo, scale, rows, D, out);
    case 3: return dot_i8_parts_avx512<3>(hi, lo, scale, rows, D, out);
    case 4: return dot_i8_parts_avx512<4>(hi, lo, scale, rows, D, out);
  }
#endif
  TORCH_CHECK(false, "dot_i8_parts: ", n, " rows (1 to ", kDotRows, " on the avx512_vnni / avx512_dot paths only)");
}

}  // namespace cxf
